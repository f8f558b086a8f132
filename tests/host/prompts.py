"""API prompts shared by several server tests."""

TINY = {"1": {"class_type": "TinyCheckpointLoader", "inputs": {"kind": "sd15", "seed": 0, "vae": "taesd"}},
        "2": {"class_type": "TinyConditioning", "inputs": {"kind": "sd15", "seed": 0}}}
SAMPLING = {"seed": 0, "steps": 2, "strength": 0.5, "cfg": 1.0, "stream_batch": True, "fixed_noise": True}


def loop_prompt(filename_prefix: str, **inputs) -> dict:
    """Tiny model -> StreamV2VLoop (node "3"), 2 steps; ``inputs`` override the loop's (source, file, video, ...)."""
    loop = {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "vae": ["1", 2],
            "source": "video file", "file": "", "skip_first": 0, "every_nth": 1, "width": 0, "height": 0,
            "resize_mode": "crop", "max_frames": 0, "camera_index": 0, "session": "webcam", "fps": 0.0,
            "filename_prefix": filename_prefix, **SAMPLING, **inputs}
    return {**TINY, "3": {"class_type": "StreamV2VLoop", "inputs": loop}}


def webcam_loop_prompt(session: str, filename_prefix: str, **inputs) -> dict:
    """Tiny model -> StreamV2VLoop on the browser-webcam source of ``session``, 64x64, 2 steps."""
    return loop_prompt(filename_prefix, source="browser webcam", session=session, width=64, height=64, **inputs)
