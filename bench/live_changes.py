"""What a live seed or strength change costs the frame that applies it, against a plain frame (one run).

    .venv/bin/python -P bench/live_changes.py [--frames 160] [--every 8] [--steps 4] [--threads 1]

Runs the stream engine in-process on the CPU (tiny random SD1.5 model with a DyMe bank, TAESD, 64x64,
stream batch) with a steering callable that changes the seed (blended over 4 frames) or the strength
(alternately, each time to a value not seen before, so every strength change reads its sigmas from the
model) every ``--every`` frames, and prints the median time of the frames that applied a change, of the
``steps - 1`` frames after it (rows of two schedules in one call) and of plain frames, with their ratios.
Frame time is the time between consecutive outputs (one model call per frame in the stream batch). A
second, shorter pass counts what a GPU would pay per frame (``bench/counting.py``: kernels
launched and host-device syncs), which the CPU's timings hide and which do not depend on the machine's load.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=160)
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    from _host import setup_host, tiny_banked_parts

    setup_host("cpu", threads=args.threads)
    import torch

    from streamv2v.nodes.engine import StreamSettings, run_stream
    from streamv2v.streamv2v_core.live.params import Change
    from streamv2v.streamv2v_core.live.sampling_track import SamplingTrack
    from streamv2v.streamv2v_core.stream.conditioning import FrameConditioning

    model, cond, vae = tiny_banked_parts("live_changes")
    from counting import counting

    track, kinds = SamplingTrack(), {}

    def steer(frame):
        index = frame.index
        if index and index % args.every == 0:
            n = index // args.every
            kind = "seed" if n % 2 else "strength"
            kinds[index] = kind
            change = Change(seed=1000 + n) if kind == "seed" else Change(strength=round(0.3 + 0.004 * n, 4))
            track.apply(change, index, 4, 0)
        if not track.steered:
            return None
        return FrameConditioning(strength=track.strength, seed=track.seed_for(index))

    def run(count, on_output):
        g = torch.Generator().manual_seed(0)
        frames = (torch.rand(64, 64, 3, generator=g) for _ in range(count))
        with torch.inference_mode():
            run_stream(model, cond, cond, vae, frames, StreamSettings(steps=args.steps, strength=0.3), on_output,
                       conditioning=steer)

    times = []
    run(args.frames, lambda out: times.append(time.perf_counter()))
    _table(times, kinds, args)
    track.__init__()
    with counting() as (ops, syncs):  # the same changes at the same frames, counted
        marks = []
        run(6 * args.every, lambda out: marks.append((ops.total("kernels"), syncs.syncs())))
    _table([m[0] for m in marks], kinds, args, "kernels launched", scale=1, unit="")
    _table([m[1] for m in marks], kinds, args, "host-device syncs", scale=1, unit="")


def _table(times, kinds, args, what="median time (ms)", scale=1000, unit="ms") -> None:
    lag = args.steps - 1  # output j is handed out by the model call that input j + lag entered with
    call = {i: times[i - lag] - times[i - lag - 1] for i in range(lag + 1, len(times))}  # input i's call
    after = {i + d for i in kinds for d in range(1, args.steps)}
    plain = [t for i, t in call.items() if i > args.every and i not in kinds and i not in after]
    rows = {"plain frame": plain}
    for kind in ("seed", "strength"):
        rows[f"frame applying a {kind} change"] = [call[i] for i, k in kinds.items() if k == kind and i in call]
        rows[f"the {args.steps - 1} frames after a {kind} change"] = [
            call[i + d] for i, k in kinds.items() if k == kind for d in range(1, args.steps) if i + d in call]
    base = statistics.median(plain)
    print(f"\n{len(times)} frames, a change every {args.every} (tiny SD1.5 + DyMe bank, 64x64, {args.steps} steps, "
          f"stream batch, CPU, {args.threads} thread(s))\n")
    print(f"| frames | count | {what} per frame | vs plain |\n|---|---|---|---|")
    for name, values in rows.items():
        if values:
            median = statistics.median(values)
            shown = f"{median * scale:.1f}" if unit else f"{median:g}"
            print(f"| {name} | {len(values)} | {shown} | {median / base:.2f}x |" if base else
                  f"| {name} | {len(values)} | {shown} | - |")


if __name__ == "__main__":
    main()
