"""The frame walk: how many of the pack's own functions one frame passes through, from the file to the MP4.

    .venv/bin/python -P bench/frame_walk.py [--frames 12] [--steps 2]

Runs a short H.264 clip file-to-file through the StreamV2V Loop node (in-process ComfyUI on the
CPU, tiny random SD1.5 model with a DyMe bank, TAESD) under ``sys.setprofile`` and counts calls
into the pack's code (files under the repository, tests and benches excluded), per frame in the
steady state: a second run of ``2 x --frames`` frames minus a run of ``--frames`` frames, divided
by ``--frames`` (so the per-run set-up cancels out). *Callbacks* are calls to functions defined
inside other functions (closures and lambdas handed from one layer to another). Deterministic: the
same code gives the same counts. Prints a table. Needs the test host (scripts/setup_host.sh).
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
SKIP = (str(REPO / "tests"), str(REPO / "bench"), str(REPO / ".venv"), str(REPO / ".comfyui"))
COMPREHENSIONS = ("<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>")  # expressions, not calls of the design
# Code run inside every attention layer of every UNet call (the bank's patches): counted apart from the walk.
PER_LAYER = ("streamv2v_core/bank/", "nodes/engine/bank_wrappers.py")


def counting_profile(calls: collections.Counter):
    """A ``sys.setprofile`` hook counting calls of the pack's functions by (file, qualified name)."""
    root = str(REPO)

    def hook(frame, event, arg):
        if event != "call":
            return
        path = frame.f_code.co_filename
        if path.startswith(root) and not path.startswith(SKIP) and not frame.f_code.co_name.endswith(COMPREHENSIONS):
            calls[(pathlib.Path(path).relative_to(REPO).as_posix(), frame.f_code.co_qualname)] += 1
    return hook


def loop_run(frames: int, steps: int, work: pathlib.Path, name: str) -> collections.Counter:
    """Calls into the pack while the loop node runs ``frames`` frames of a fresh clip."""
    import torch

    from host import tiny_models
    from host.clips import make_clip
    from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
    try:
        from streamv2v.nodes.loop.node import StreamV2VLoop
    except ImportError:  # the layout before the loop's own package
        from streamv2v.nodes.loop_node import StreamV2VLoop

    make_clip(work / "input" / f"{name}.mp4", frames=frames, fps=24)
    handle = FeatureBankNode.execute("frame_walk", "dyme", 1, 4, 0).args[0]
    model = tiny_models.tiny_sd15_model(0, out_scale=0.1)
    model = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
    model = FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]
    cond, vae = tiny_models.random_conditioning("sd15", 0), tiny_models.tiny_taesd_vae(0)
    calls: collections.Counter = collections.Counter()
    sys.setprofile(counting_profile(calls))
    try:
        with torch.inference_mode():
            StreamV2VLoop.execute(model=model, positive=cond, negative=cond, vae=vae, source="video file",
                                  file=f"{name}.mp4", seed=0, steps=steps, strength=0.5, cfg=1.0, stream_batch=True,
                                  fixed_noise=True, filename_prefix=f"walk/{name}")
    finally:
        sys.setprofile(None)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    from _host import setup_host

    setup_host("cpu", threads=1)
    import folder_paths

    work = pathlib.Path(tempfile.mkdtemp(prefix="streamv2v_walk_"))
    for sub in ("input", "output"):
        (work / sub).mkdir()
    folder_paths.set_input_directory(str(work / "input"))
    folder_paths.set_output_directory(str(work / "output"))
    loop_run(4, args.steps, work, "warm")  # imports and first-call caches out of the way
    short = loop_run(args.frames, args.steps, work, "short")
    long = loop_run(2 * args.frames, args.steps, work, "long")
    per_frame = {key: (long[key] - short.get(key, 0)) / args.frames for key in long}
    per_frame = {key: n for key, n in per_frame.items() if n > 0}
    walk = {key: n for key, n in per_frame.items() if not key[0].startswith(PER_LAYER)}
    callbacks = {key: n for key, n in walk.items() if "<locals>" in key[1] or "<lambda>" in key[1]}
    print(f"| per frame (steady state, {args.steps} steps, DyMe bank, file -> MP4) | count |")
    print("|---|---|")
    print(f"| calls into the pack's functions, all | {sum(per_frame.values()):.1f} |")
    print(f"| of them outside the per-layer bank code ({', '.join(PER_LAYER)}) | {sum(walk.values()):.1f} |")
    print(f"| distinct pack functions on that walk | {len(walk)} |")
    print(f"| calls of callbacks on that walk (closures, lambdas) | {sum(callbacks.values()):.1f} |")
    print(f"| distinct callbacks on that walk | {len(callbacks)} |")
    print()
    for (path, name), n in sorted(walk.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{n:7.1f}  {path}:{name}")


if __name__ == "__main__":
    main()
