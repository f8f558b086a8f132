"""Which files the loop nodes may read: names in ComfyUI's input folder, nothing outside it.

Security policy. A prompt can come from anyone who can reach the server, so a node input
cannot be what allows reading elsewhere: StreamV2V reads only what ComfyUI's own file nodes
read. A name is taken relative to the input folder (``clip.mp4``, ``frames/``), or to the
output or temp folder with ComfyUI's annotation (``clip.mp4 [output]``); absolute paths,
``..`` and symbolic links that leave that folder are refused before anything is opened (as
ComfyUI 0.38's ``folder_paths.get_annotated_filepath`` does, with a message that says what to
do). A server owner who keeps videos elsewhere starts ComfyUI with ``--input-directory``.
"""
from __future__ import annotations

import os

import folder_paths

from ..streamv2v_core.file_rules import real_inside
from ..streamv2v_core.media.video_io import IMAGE_EXTENSIONS

NO_FILE = ("no file chosen: pick a video (or a folder of images) from ComfyUI's input folder, upload one with the "
           "node's upload button, or connect a VIDEO")


def input_choices() -> list[str]:
    """For the file list: "" (none: a connected VIDEO or a live source), the input folder's videos, and its
    subfolders that hold images (as ``name/``)."""
    root = folder_paths.get_input_directory()
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return [""]
    # Links that leave the input folder are not offered: they would be refused when read.
    entries = [e for e in entries if real_inside(root, os.path.join(root, e))]
    files = [e for e in entries if os.path.isfile(os.path.join(root, e))]
    folders = [f"{e}/" for e in entries if not e.startswith(".") and _holds_images(os.path.join(root, e), root)]
    return ["", *folder_paths.filter_files_content_types(files, ["video"]), *folders]


def _holds_images(path: str, root: str) -> bool:
    """Whether ``path`` is a folder with at least one image that stays inside ``root``."""
    try:
        return os.path.isdir(path) and any(f.lower().endswith(IMAGE_EXTENSIONS) and
                                           real_inside(root, os.path.join(path, f)) for f in os.listdir(path))
    except OSError:
        return False


def resolve_input(name: str) -> str:
    """The absolute path of ``name`` inside ComfyUI's input (or annotated output/temp) folder.

    Raises ValueError before touching the file for empty names and for names that leave the
    folder; existence is checked by whoever opens it.
    """
    name = str(name).strip()
    if not name:
        raise ValueError(NO_FILE)
    relative, base = folder_paths.annotated_filepath(name)
    base = base or folder_paths.get_input_directory()
    where = "input" if base == folder_paths.get_input_directory() else "output/temp"
    refusal = (f"{name!r} is outside ComfyUI's {where} folder: StreamV2V reads only files there. Upload the "
               f"video with the node's upload button or copy it into {base} (a server owner can start ComfyUI "
               f"with --input-directory pointing at a video folder)")
    if "\x00" in relative or os.path.isabs(relative) or os.path.splitdrive(relative)[0]:
        raise ValueError(refusal)
    path = os.path.abspath(os.path.join(base, relative))
    if not real_inside(base, path):
        raise ValueError(refusal)
    return path


def allowed_folder(name: str) -> str:
    """The folder ``name`` may be read from (input, or the annotated output/temp folder): for checking
    the files of an image folder one by one."""
    return folder_paths.annotated_filepath(str(name).strip())[1] or folder_paths.get_input_directory()


def check_input(name: str) -> str | None:
    """For ``validate_inputs``: None if ``name`` is empty or an existing file/folder in the input folder,
    else the message saying what is wrong."""
    if not str(name).strip():
        return None
    try:
        path = resolve_input(name)
    except ValueError as error:
        return str(error)
    if not os.path.exists(path):
        return f"{str(name).strip()!r} is not in ComfyUI's input folder (upload it, or pick one from the list)"
    return None


def modified_time(name: str) -> float | None:
    """The modification time of ``name`` in the input folder, or None (for caching: a changed file re-runs)."""
    try:
        return os.path.getmtime(resolve_input(name))
    except (ValueError, OSError):
        return None
