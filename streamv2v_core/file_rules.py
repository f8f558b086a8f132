"""The one rule for every file the pack opens, and the bounds on what it decodes (pure Python + PIL).

A file is read only if its *real* path (every symbolic link followed) lies inside the folder
it was allowed from (ComfyUI's input folder, or output/temp with an annotation): a link in an
image folder that points elsewhere is never followed. An image's pixel count is read from its
header and bounded before anything is decoded, and the bytes that are checked are the bytes
that are decoded (the file is read once), so a small file that promises a huge image (a
"pixel bomb": a 775 KB PNG of 16000x16000 decodes to 768 MB) costs nothing.

Bounds (stated in the README's Security section):

- ``MAX_SOURCE_PIXELS``: a source frame (image or video) of at most 8K UHD, 7680x4320 = 33.2 MP;
- ``MAX_STREAM_PIXELS``: the size the model runs at, at most 2048x2048 = 4.2 MP (a video
  read at its own size above that must be given a width/height);
- ``MAX_IMAGE_BYTES``: an image file of at most 256 MiB.
"""
from __future__ import annotations

import io
import os
import re
import warnings

from PIL import Image

MAX_SOURCE_PIXELS = 7680 * 4320
MAX_STREAM_PIXELS = 2048 * 2048
MAX_IMAGE_BYTES = 256 * 2**20
LIMIT_TEXT = (f"at most {MAX_SOURCE_PIXELS / 1e6:.1f} megapixels (8K, 7680x4320) are decoded; scale it down "
              f"first")


class FileRefused(ValueError):
    """A file the rule does not allow (outside the folder, too large, unreadable header)."""


def real_inside(folder: str, path: str) -> bool:
    """Whether ``path`` resolves (links followed) inside ``folder`` (itself resolved)."""
    folder, path = os.path.realpath(folder), os.path.realpath(path)
    try:
        return os.path.commonpath((folder, path)) == folder
    except ValueError:  # different drives (Windows)
        return False


def check_inside(folder: str, path: str) -> str:
    """The real path of ``path``; ``FileRefused`` if it leaves ``folder`` (e.g. through a link)."""
    if not real_inside(folder, path):
        raise FileRefused(f"{os.path.basename(path)!r} is a link that leaves the allowed folder: StreamV2V does "
                          f"not follow it (copy the file itself into the folder)")
    return os.path.realpath(path)


def check_pixels(width: int, height: int, what: str) -> None:
    """``FileRefused`` naming ``what`` if ``width x height`` is over ``MAX_SOURCE_PIXELS``."""
    if width * height > MAX_SOURCE_PIXELS:
        raise FileRefused(f"{what} is {width}x{height} ({width * height / 1e6:.1f} megapixels): {LIMIT_TEXT}")


def read_image_bytes(folder: str, path: str) -> bytes:
    """The bytes of the image file ``path`` after the rule: inside ``folder``, at most ``MAX_IMAGE_BYTES``,
    a header PIL can read that declares at most ``MAX_SOURCE_PIXELS``. ``FileRefused`` says why not."""
    name = os.path.basename(path)
    real = check_inside(folder, path)
    try:
        with open(real, "rb") as file:
            data = file.read(MAX_IMAGE_BYTES + 1)
    except OSError as error:
        raise FileRefused(f"{name!r} cannot be read ({error.strerror or error})") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise FileRefused(f"{name!r} is over {MAX_IMAGE_BYTES // 2**20} MiB")
    width, height = header_size(data, repr(name))
    check_pixels(width, height, repr(name))
    return data


def header_size(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) from an encoded image's header, without decoding its pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError as error:  # PIL's own bound (over 179 MP) came first
        found = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{int(found.group(1)) / 1e6:.1f} megapixels" if found else "too many pixels"
        raise FileRefused(f"{what} declares {pixels}: {LIMIT_TEXT}") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise FileRefused(f"{what} is not an image PIL can read ({type(error).__name__})") from None
