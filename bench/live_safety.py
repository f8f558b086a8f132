"""What careless or hostile live changes cost a running loop: the worst-case prompt blend, a flood of prompts.

    python bench/live_safety.py                      # both cases, this checkout
    python bench/live_safety.py --pack /work/main    # the same cases on another checkout (e.g. before a fix)

* blend: the toy model (128x128, its CLIP) streams frames; live prompt A = 4,000 x '龘' (160 CLIP chunks) is
  in effect, then B = 3,975 x '龘' (159 chunks) is blended in over 4 frames, as the loop's steering blends it
  (``prompt_schedule.blend_entry``). Reported: seconds per frame before, during and after the blend, and the
  process's peak RSS (each case runs in a fresh process).
* flood: the loop's steering with a session; before each frame enters, ``--per-frame`` prompt changes arrive
  (a MIDI knob, a script in a loop). Reported: CLIP encodes per frame, seconds per frame, what the route
  refused (429 before coalescing).

Frames are timed from one output to the next (the engine hands each one over as soon as it is finished), in CPU
seconds of the process (one torch thread): wall time on a shared machine measures the neighbours too.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
TALL = "\u9f98"  # 龘: 4,000 of them make 160 CLIP chunks


def _host(pack: str):
    sys.path.insert(0, str(pathlib.Path(pack) / "tests"))
    from host.inprocess import setup_host

    return setup_host("cpu", threads=1)


def _frames(count: int, size: int = 128):
    import torch

    g = torch.Generator().manual_seed(0)
    canvas = torch.rand(1, 3, 16, 16 + count, generator=g)
    canvas = torch.nn.functional.interpolate(canvas, scale_factor=size / 16, mode="bilinear")[0].permute(1, 2, 0)
    return [canvas[:, 8 * i: 8 * i + size].contiguous() for i in range(count)]


def _encode(clip, text: str) -> list:
    encoded = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return [encoded[0][0], {"pooled_output": encoded[0][1]["pooled_output"]}]


def _frame_api() -> bool:
    """Whether the engine takes ``Frame``s (stream/frame.py) rather than (index, image) pairs (older checkouts)."""
    try:
        from streamv2v.streamv2v_core.stream.frame import Frame  # noqa: F401
    except ImportError:
        return False
    return True


def _run(model, empty, vae, frames, provider):
    """CPU seconds of this process between consecutive outputs (the first measured from the start: on a shared
    machine wall time measures the neighbours too); ``provider(index, image)``."""
    import torch

    from streamv2v.nodes.engine import StreamSettings, run_stream

    stamps = [time.process_time()]
    if _frame_api():
        provider = (lambda given: lambda frame: given(frame.index, frame.image))(provider)
    with torch.inference_mode():
        # stream_batch off: before this checkout's fix, a stream batch holding frames of two prompt lengths
        # ended the run (torch.cat of their rows); the blend costs the same either way
        run_stream(model, empty, empty, vae, iter(frames), StreamSettings(seed=0, steps=2, strength=0.5,
                                                                          stream_batch=False),
                   lambda *output: stamps.append(time.process_time()), conditioning=provider)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def case_blend(pack: str) -> dict:
    _host(pack)
    from streamv2v.nodes.toy_model import load_toy_model
    from streamv2v.streamv2v_core.stream.conditioning import FrameConditioning
    from streamv2v.streamv2v_core.stream.prompt_schedule import blend_entry

    model, clip, vae = load_toy_model()
    empty, short = [_encode(clip, "")], [_encode(clip, "a watercolor painting")]
    reference = _run(model, empty, vae, _frames(6), lambda index, image: FrameConditioning(positive=short))
    a, b = _encode(clip, TALL * 4000), _encode(clip, TALL * 3975)
    start, blend = 3, 4
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def provider(index, image):  # frames 3, 4, 5 blended (1/4, 2/4, 3/4 of B), B from frame 6
        weight = min(1.0, max(0.0, (index - start + 1) / blend))
        return FrameConditioning(positive=[blend_entry(a, b, weight)])
    seconds = _run(model, empty, vae, _frames(10), provider)
    return {"tokens": [int(a[0].shape[1]), int(b[0].shape[1])], "short_prompt_cpu_s": round(statistics.median(
            reference[1:]), 3), "cpu_s_per_output": [round(s, 2) for s in seconds],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_before_blend_mib": round(rss_before)}


def case_flood(pack: str, per_frame: int, count: int = 12) -> dict:
    _host(pack)
    from streamv2v.nodes.toy_model import load_toy_model
    from streamv2v.streamv2v_core.live.session import SESSIONS

    if _frame_api():
        from streamv2v.nodes.loop.steering import FrameSteering as Steering, SteeringChoice as Choice
        from streamv2v.streamv2v_core.stream.frame import Frame
    else:
        from streamv2v.nodes.loop_conditioning import ConditioningChoice as Choice, LoopConditioning as Steering
    model, clip, vae = load_toy_model()
    encodes = []
    original = clip.encode_from_tokens_scheduled

    def counted(tokens, *args, **kwargs):
        encodes.append(1)
        return original(tokens, *args, **kwargs)
    clip.encode_from_tokens_scheduled = counted
    session = SESSIONS.get("flood")
    empty = [_encode(clip, "")]
    steering = Steering(model, [_encode(clip, "a photo")], clip, Choice(blend_frames=4), session)
    encodes.clear()
    refused = []

    def provider(index, image):
        for k in range(per_frame):
            try:
                session.params.offer({"prompt": f"a watercolor painting {index} {k}"})
            except OverflowError:
                refused.append(k)
        return steering(Frame(image, index=index)) if _frame_api() else steering(index, image)
    seconds = _run(model, empty, vae, _frames(count), provider)
    status = session.params.status()
    steering.close()
    return {"frames": count, "offered": count * per_frame, "refused_429": len(refused), "encodes": len(encodes),
            "encodes_per_frame": len(encodes) / count, "cpu_s_per_frame": round(statistics.median(seconds[1:]), 3),
            "superseded": status.get("superseded")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", default=str(HERE.parent), help="checkout whose pack runs (default: this one)")
    parser.add_argument("--case", choices=("blend", "flood"), help="run one case in this process (JSON out)")
    parser.add_argument("--per-frame", type=int, default=16, help="flood: prompt changes sent before each frame")
    args = parser.parse_args(argv)
    if args.case:
        result = case_blend(args.pack) if args.case == "blend" else case_flood(args.pack, args.per_frame)
        print("RESULT " + json.dumps(result))
        return
    for case in ("blend", "flood"):
        out = subprocess.run([sys.executable, __file__, "--pack", args.pack, "--case", case,
                              "--per-frame", str(args.per_frame)], capture_output=True, text=True, check=True).stdout
        print(case, next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))


if __name__ == "__main__":
    main()
