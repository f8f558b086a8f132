"""Who may change a running show over HTTP: the one guard of every state-changing route of the pack.

ComfyUI's own origin check (``server.py``, ``create_origin_only_middleware``) compares the Origin
with the Host only for loopback hosts, only by host name when either lacks a port, and not at
all for an Origin without a host. So a web page can reach the pack's routes with

* ``Origin: null`` (a sandboxed iframe, a ``file://`` page) or ``file://``,
* a page on another port of the same machine (``http://127.0.0.1``, port 80),
* DNS rebinding: a page on ``evil.example`` whose name now resolves to the server: Host and
  Origin are both ``evil.example``,

and a browser sends a ``text/plain`` or form body cross-site without asking first (no CORS
preflight). Every state-changing route (``guarded(kind)(handler)``) therefore refuses, before
it reads anything:

1. a Host (when sent) that is not the server's own address: a loopback name or address, the
   address the connection arrived on, an address ComfyUI listens on (``--listen``), or a name
   in ``STREAMV2V_ALLOWED_HOSTS`` (comma-separated: a LAN name, a proxy's name) -- 403;
2. an Origin (browsers send one with every POST, DELETE and WebSocket) other than the server's
   own, ``http(s)://`` + the Host exactly (port included), or the origin ComfyUI was given with
   ``--enable-cors-header`` -- 403; ``Sec-Fetch-Site: cross-site`` / ``same-site`` -- 403;
3. a body type a page could send without a preflight: ``"json"`` routes take only
   ``Content-Type: application/json``; ``"image"`` routes only an image type they decode plus
   the ``X-StreamV2V-Client`` header (no simple request can carry it) -- 415; ``"none"``
   (DELETE, WebSocket): no body type (a browser preflights DELETE; a WebSocket has none).

Plain HTTP clients (curl, scripts, OSC bridges) send no Origin and pass with the right
Content-Type. The pack's panel (``web/*.js``) sends both. Read-only routes are not guarded.
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import os
import urllib.parse
from typing import Awaitable, Callable

from aiohttp import web

log = logging.getLogger("streamv2v")

KINDS = ("json", "image", "none")
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
CLIENT_HEADER = "X-StreamV2V-Client"
ALLOWED_HOSTS_ENV = "STREAMV2V_ALLOWED_HOSTS"
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def guarded(kind: str) -> Callable[[Handler], Handler]:
    """Wrap a state-changing route's handler: refused requests are answered before it runs."""
    if kind not in KINDS:
        raise ValueError(f"guard kind must be one of {KINDS}, got {kind!r}")

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded_handler(request: web.Request) -> web.StreamResponse:
            refusal = refuse(request, kind)
            if refusal is not None:
                status, text = refusal
                log.warning("StreamV2V: refused %s %s: %s", request.method, request.path[:200], text)
                return web.json_response({"error": text}, status=status)
            return await handler(request)
        return guarded_handler
    return wrap


def refuse(request: web.Request, kind: str) -> tuple[int, str] | None:
    """(status, reason) when ``request`` must be refused (see the module docstring), else None."""
    headers = request.headers
    return check_headers(headers.get("Host"), headers.get("Origin"), headers.get("Sec-Fetch-Site"),
                         request.content_type if kind != "none" else None, CLIENT_HEADER in headers,
                         kind, _own_addresses(request), _allowed_names(), _cors_origin())


def check_headers(host: str | None, origin: str | None, fetch_site: str | None, content_type: str | None,
                  client_header: bool, kind: str, own: set, names: set[str], cors_origin: str | None
                  ) -> tuple[int, str] | None:
    """The guard's decision from the request's headers (pure: tests call it directly)."""
    host_name, host_port = _split_host(host)
    if host is not None and not _is_own(host_name, own, names):
        return 403, (f"this server is not reached as {host_name!r} (a page of another site can point that name "
                     f"at it): use its own address, or add the name to {ALLOWED_HOSTS_ENV}")
    if origin is not None and origin != cors_origin and not _same_origin(origin, host_name, host_port):
        return 403, (f"requests from pages of other origins ({origin[:80]!r}) are refused: use the pack's panel "
                     f"in ComfyUI's own page, or an HTTP client that sends no Origin")
    if fetch_site in ("cross-site", "same-site"):
        return 403, f"requests from other sites are refused (Sec-Fetch-Site: {fetch_site})"
    if kind == "json" and content_type != "application/json":
        return 415, "send the body as JSON with 'Content-Type: application/json'"
    if kind == "image" and (content_type not in IMAGE_TYPES or not client_header):
        return 415, (f"send one image with 'Content-Type' one of {', '.join(IMAGE_TYPES)} and the header "
                     f"'{CLIENT_HEADER}: 1'")
    return None


def _split_host(host: str | None) -> tuple[str | None, int | None]:
    """('name', port or None) of a Host header value (IPv6 brackets removed, lower case, no trailing dot)."""
    if host is None:
        return None, None
    try:
        parts = urllib.parse.urlsplit("//" + host.strip())
        return (parts.hostname or "").rstrip("."), parts.port
    except ValueError:  # a port that is not a number
        return "", None


def _same_origin(origin: str, host_name: str | None, host_port: int | None) -> bool:
    """Whether ``origin`` is ``http(s)://`` + the Host the request was sent to (same name, same port)."""
    try:
        parts = urllib.parse.urlsplit(origin.strip())
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or host_name is None:
        return False
    return parts.hostname.rstrip(".") == host_name and port == (host_port or _DEFAULT_PORTS[parts.scheme])


def _is_own(name: str | None, own: set, names: set[str]) -> bool:
    if not name:
        return False
    if name == "localhost" or name in names:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    address = getattr(address, "ipv4_mapped", None) or address
    return address.is_loopback or address in own


def _own_addresses(request: web.Request) -> set:
    """The address the connection arrived on and the addresses ComfyUI listens on (wildcards excepted)."""
    found = set()
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    candidates = [sockname[0]] if isinstance(sockname, (tuple, list)) and sockname else []
    candidates += _listen_addresses()
    for text in candidates:
        try:
            address = ipaddress.ip_address(str(text).split("%")[0])
        except ValueError:
            continue
        address = getattr(address, "ipv4_mapped", None) or address
        if not address.is_unspecified:
            found.add(address)
    return found


def _listen_addresses() -> list[str]:
    try:
        from comfy.cli_args import args
    except ImportError:  # the pack imported outside ComfyUI (tests of the guard alone)
        return []
    return [part.strip() for part in str(getattr(args, "listen", "") or "").split(",") if part.strip()]


def _allowed_names() -> set[str]:
    return {part.strip().lower().rstrip(".") for part in os.environ.get(ALLOWED_HOSTS_ENV, "").split(",")
            if part.strip()}


def _cors_origin() -> str | None:
    """The one origin ComfyUI was told to allow (``--enable-cors-header ORIGIN``); ``*`` allows none here."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return None
    value = getattr(args, "enable_cors_header", None)
    return value if isinstance(value, str) and value not in ("", "*") else None

