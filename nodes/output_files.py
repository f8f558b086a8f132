"""Output file names: a prefix is checked before any work, and a new file never replaces an old one."""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import folder_paths

FORBIDDEN = '<>:"|?*\\'  # characters Windows cannot hold in a file name (and "\\" is not a separator here)
MAX_PART = 200           # bytes per path part, leaving room for "_00001_.mp4" under the usual 255


@dataclass(frozen=True)
class OutputFile:
    path: str       # absolute
    filename: str   # e.g. "loop_00001_.mp4"
    subfolder: str  # inside the output folder, "" for none


DATE = re.compile(r"%date:([^%]*)%")
DATE_FIELDS = re.compile(r"yyyy|yy|MM|M|dd|d|hh|h|mm|m|ss|s")


def expand_date(prefix: str, now: time.struct_time | None = None) -> str:
    """``%date:yyyy-MM-dd%`` (and hh, mm, ss; yy, M, d, h, m, s unpadded) replaced by the time ``now``.

    ComfyUI's frontend expands these only for core save nodes, before queueing; core SaveImage then
    also fills ``%year%`` .. ``%second%`` (``folder_paths.get_save_image_path``, which this pack calls
    too). Expanded here, so the same prefix works in this node and through the API.
    """
    now = now or time.localtime()
    values = {"yyyy": f"{now.tm_year:04}", "yy": f"{now.tm_year % 100:02}", "MM": f"{now.tm_mon:02}",
              "M": str(now.tm_mon), "dd": f"{now.tm_mday:02}", "d": str(now.tm_mday), "hh": f"{now.tm_hour:02}",
              "h": str(now.tm_hour), "mm": f"{now.tm_min:02}", "m": str(now.tm_min), "ss": f"{now.tm_sec:02}",
              "s": str(now.tm_sec)}
    return DATE.sub(lambda found: DATE_FIELDS.sub(lambda f: values[f.group(0)], found.group(1)), str(prefix))


def check_prefix(prefix: str) -> str:
    """``prefix`` (with ``%date:...%`` expanded) if it can name a file in ComfyUI's output folder;
    ValueError saying what to change."""
    prefix = expand_date(prefix)
    shown = repr(prefix if len(prefix) <= 60 else prefix[:60] + "...")
    if not prefix.strip():
        raise ValueError("filename_prefix is empty: give the MP4 a name, e.g. 'StreamV2V/loop' "
                         "(a subfolder and a name inside ComfyUI's output folder)")
    bad = sorted({c for c in prefix if ord(c) < 32 or ord(c) == 127 or c in FORBIDDEN})
    if bad:
        listed = " ".join(repr(c) for c in bad)
        raise ValueError(f"filename_prefix {shown} contains {listed}, which a file name cannot hold: use letters, "
                         f"digits, spaces, '-', '_' and '/' for subfolders")
    if prefix.startswith("/"):
        raise ValueError(f"filename_prefix {shown} is an absolute path: give a name inside ComfyUI's output folder, "
                         f"e.g. 'StreamV2V/loop'")
    parts = prefix.split("/")
    for part in parts:
        if part in ("", ".", "..") or part != part.rstrip(" .") or len(part.encode()) > MAX_PART:
            raise ValueError(f"filename_prefix {shown}: {part!r} cannot be a folder or file name (no empty, '.' or "
                             f"'..' parts, no trailing space or dot, at most {MAX_PART} bytes each)")
    return prefix


def reserve_output(prefix: str, extension: str = "mp4") -> OutputFile:
    """Create a new, empty ``<prefix>_NNNNN_.<extension>`` in the output folder and return it.

    The file is created exclusively, so a run that races another for the same counter takes
    the next one instead of overwriting it.
    """
    prefix = check_prefix(prefix)
    root = folder_paths.get_output_directory()
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, root)
    os.makedirs(folder, exist_ok=True)
    for attempt in range(1000):
        filename = f"{name}_{counter + attempt:05}_.{extension}"
        path = os.path.join(folder, filename)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue
        return OutputFile(path, filename, subfolder)
    raise FileExistsError(f"no free file name for {prefix!r} in {folder} after 1000 tries")
