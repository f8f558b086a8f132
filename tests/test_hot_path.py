"""The hot path's deterministic costs on the CPU, as a GPU would pay them (issue 13).

Counted with ``bench/counting.py`` (a dispatch mode for kernels and views, a function
mode for calls that would make the host wait for a GPU), never timed: no host sync inside
the UNet forward; none per frame outside it either (a run pays a fixed few when it starts);
bank kernels within 1.15x of no bank for the paper's DyMe(1) every 4th frame, and no bank
within 1.05x of the floor (one stream-batch UNet call + TAESD encode + decode).
"""
import pathlib
import sys

import pytest
import torch

import comfy.patcher_extension
from host import tiny_models
from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch
from streamv2v.nodes.engine.device_vae import DeviceCodec
from streamv2v.nodes.engine import IN_FLIGHT, StreamSettings, run_stream
from streamv2v.streamv2v_core import BANKS

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
from counting import OpCounter, SyncCounter  # noqa: E402  (benchmark counters live with the benchmarks)

STEPS, SIZE = 4, 64


@pytest.fixture(scope="module")
def parts():
    return tiny_models.tiny_sd15_model(0), tiny_models.tiny_taesd_vae(1), tiny_models.random_conditioning("sd15", 1)


def frames(n, seed=0):
    return list(torch.rand(n, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed)))


def counted(parts, bank, n):
    """Counters after ``n`` frames of a steady-state stream (bank filled, pipeline full) in one run."""
    model, vae, cond = parts
    ops, syncs = OpCounter(), SyncCounter()

    def forward(executor, *args, **kwargs):
        with ops.region("forward"), syncs.region("forward"):
            return executor(*args, **kwargs)

    if bank:
        BANKS.remove(f"hot-{bank}")
        handle = FeatureBankNode.execute(f"hot-{bank}", "dyme", 1, bank, 0).args[0]
        model = ExtendedAttentionPatch.execute(model, handle, "all").args[0]
        model = FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]
    model = model.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.forward", forward)
    settings = StreamSettings(steps=STEPS, bank_start=IN_FLIGHT)
    key = f"hot path {bank} {n}"
    run_stream(model, cond, cond, vae, iter(frames(8, 1)), StreamSettings(steps=STEPS), lambda out: None,
               stream_key=key)  # fills the bank (fresh stream)
    run_stream(model, cond, cond, vae, iter(frames(STEPS, 2)), settings, lambda out: None, stream_key=key)
    outputs = []
    with syncs, ops:
        run_stream(model, cond, cond, vae, iter(frames(n, 3)), settings, lambda out: outputs.append(out.index),
                   stream_key=key)
    assert len(outputs) == n
    return ops, syncs


def floor_kernels(parts):
    model, vae, cond = parts
    base = model.model
    codec = DeviceCodec(vae)
    frame = frames(1)[0]
    context = cond[0][0].repeat(STEPS, 1, 1)
    sigmas = torch.linspace(6.0, 0.5, STEPS)
    ops = OpCounter()
    with torch.inference_mode(), ops:
        latent = base.process_latent_in(codec.encode(frame))
        out = base.apply_model(latent.repeat(STEPS, 1, 1, 1), sigmas, c_crossattn=context)
        codec.decode(base.process_latent_out(out[:1]))
    return ops.total("kernels")


def test_no_host_sync_inside_the_unet_and_none_per_frame_outside(parts):
    for bank in (0, 4, 1):
        short_ops, short = counted(parts, bank, 4)
        long_ops, long = counted(parts, bank, 12)
        assert long.syncs("forward") == 0 and long_ops.total("scalar reads", "forward") == 0, long.counts["forward"]
        # Outside the forward only a run's fixed start-up reads remain: 8 more frames add none.
        assert long.syncs() == short.syncs() and long.syncs() <= 8, (dict(short.counts), dict(long.counts))
        assert long.total("Python-list indexing") == long.total("cross-device copies") == 0


def test_bank_kernels_stay_close_to_no_bank_and_no_bank_close_to_the_floor(parts):
    per_frame = {}
    for bank in (0, 4):
        short, _ = counted(parts, bank, 4)
        long, _ = counted(parts, bank, 12)
        per_frame[bank] = (long.total("kernels") - short.total("kernels")) / 8  # a run's fixed part cancels
    floor = floor_kernels(parts)
    print(f"kernels per frame: floor {floor}, no bank {per_frame[0]:.1f}, DyMe(1) every 4th {per_frame[4]:.1f}")
    assert per_frame[4] <= 1.15 * per_frame[0]
    assert per_frame[0] <= 1.05 * floor
