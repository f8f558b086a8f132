"""The stage: a session's restyled frames outside ComfyUI's editor (read-only GET routes).

GET /streamv2v/stage/{session}        a standalone page (web/stage/streamv2v_stage.html): the newest frames full
                                      window on black, reconnecting by itself; for OBS (Browser Source), a
                                      projector, another machine
GET /streamv2v/stage/{session}/mjpeg  the same frames as multipart/x-mixed-replace JPEG (OBS Media Source, VLC,
                                      ffmpeg, an <img>); parts carry X-StreamV2V-Frame (the frame's number in
                                      its take) and X-StreamV2V-Stamp (its source frame's capture stamp).
                                      503 when the session has 32 viewers (128 in all)

Both may be opened before a loop runs and stay open across takes: the stream sends frames whenever a loop
of the session publishes them (streamv2v_core/live/viewers.py says why a viewer can never slow the loop).
No route creates a session.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import pathlib
import time

from aiohttp import web

from ...streamv2v_core.live.viewers import CONTENT_TYPE, KEEPALIVE_S, SEATS, STALL_S, TooManyViewers, mjpeg_part
from .routes import SessionFollower, session_name

PAGE = pathlib.Path(__file__).resolve().parents[2] / "web" / "stage" / "streamv2v_stage.html"
FOLLOW_S = 0.5  # how often a viewer looks for a session that does not exist yet (or was replaced)
PAGE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' blob:"}


@functools.lru_cache(maxsize=1)
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


async def stage_page(request: web.Request) -> web.Response:
    session_name(request)  # 400 for a name no session can have
    return web.Response(text=_page(), content_type="text/html", headers=PAGE_HEADERS)


async def stage_mjpeg(request: web.Request) -> web.StreamResponse:
    name = session_name(request)
    try:
        with SEATS.seat(name):
            response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store",
                                                   "X-Content-Type-Options": "nosniff"})
            await response.prepare(request)
            await _Viewer(name, request, response).run()
            return response
    except TooManyViewers as error:
        return web.json_response({"error": str(error)}, status=503, headers={"Retry-After": "5"})


class _Viewer:
    """One MJPEG viewer: wakes when the session publishes a frame, sends the newest (see the module docstring)."""

    def __init__(self, name: str, request: web.Request, response: web.StreamResponse):
        self.name, self.request, self.response = name, request, response
        self.wake = asyncio.Event()
        self.follower = SessionFollower(name, lambda event: event == "output" and self.wake.set())
        self.sent = None  # the published frame sent last
        self.sent_at = 0.0

    async def run(self) -> None:
        try:
            while self.request.transport is not None and not self.request.transport.is_closing():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), FOLLOW_S)
                self.wake.clear()
                if self.follower.follow():
                    self.sent = None
                session = self.follower.session
                output = session.output if session is not None else None
                if output is None or (output is self.sent and time.monotonic() - self.sent_at < KEEPALIVE_S):
                    continue
                part = mjpeg_part(output.jpeg, output.number, output.stamp)
                await asyncio.wait_for(self.response.write(part), STALL_S)
                self.sent, self.sent_at = output, time.monotonic()
        except asyncio.TimeoutError:  # stalled: drop the connection and what its buffer holds
            if self.request.transport is not None:
                self.request.transport.abort()
        except (ConnectionResetError, ConnectionError):
            pass  # the viewer went away
        finally:
            self.follower.close()


def add_stage_routes(routes: web.RouteTableDef) -> None:
    routes.get("/streamv2v/stage/{session}")(stage_page)
    routes.get("/streamv2v/stage/{session}/mjpeg")(stage_mjpeg)
