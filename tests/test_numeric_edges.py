"""Decisions at the edges of their range: FF's threshold in the features' own precision, the similarity
filter's skip limit as StreamDiffusion counts it."""
import torch

from streamv2v.streamv2v_core.bank.attention import feature_fusion
from streamv2v.streamv2v_core.bank.feature_bank import BankConfig, FeatureBank
from streamv2v.streamv2v_core.bank.calls import BankCall, RowPlan
from streamv2v.streamv2v_core.stream.similarity import SimilarityFilter


def nearly_parallel(tokens=16, channels=8, cosine_gap=1e-8):
    """``out [1, T, C]`` and ``bank [1, T, C]`` (float64) whose rows have cosine ``1 - cosine_gap``: one in
    float64, exactly 1.0 once rounded to float32."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(1, tokens, channels, generator=g, dtype=torch.float64)
    side = torch.randn(1, tokens, channels, generator=g, dtype=torch.float64)
    side -= (side * out).sum(-1, keepdim=True) / (out * out).sum(-1, keepdim=True) * out  # orthogonal to out
    side *= out.norm(dim=-1, keepdim=True) / side.norm(dim=-1, keepdim=True)
    angle = torch.tensor(2 * cosine_gap, dtype=torch.float64).sqrt()  # 1 - cos(a) ~= a^2 / 2
    bank = torch.cos(angle) * out + torch.sin(angle) * side
    cosine = torch.nn.functional.cosine_similarity(out, bank, dim=-1)
    assert (cosine < 1).all() and (cosine.float() == 1).all()
    return out, bank


def test_ff_threshold_1_fuses_nothing_in_float64():
    out, bank = nearly_parallel()
    assert torch.equal(feature_fusion(out, bank, 0.75, 1.0), out)
    # The same through a bank: its stored unit-norm copy must keep float64 too.
    store = FeatureBank(BankConfig(interval=1))
    layer = ("output", 3, 0)
    first = BankCall(store, RowPlan((0,), (0,), 1), [0], 1)
    first.fuse(layer, bank, 0.75, 1.0)
    first.flush()
    second = BankCall(store, RowPlan((1,), (0,), 1), [0], 1)
    assert torch.equal(second.fuse(layer, out, 0.75, 1.0), out)
    assert not torch.equal(second.fuse(layer, out, 0.75, 0.99), out)  # below the threshold it does fuse


def test_similarity_filter_forces_a_frame_through_after_more_than_max_skips():
    still = torch.zeros(4, 4, 3)
    flt = SimilarityFilter(threshold=0.5, max_skips=2)
    assert [flt.skip(still) for _ in range(8)] == [False, True, True, True, False, True, True, True]


def test_flow_on_frames_under_12_pixels_says_to_raise_flow_size():
    import pytest

    from streamv2v.streamv2v_core.metrics.warp import compute_flows
    with pytest.raises(ValueError, match="too small for optical flow .* use flow_size 16 or more"):
        compute_flows(torch.rand(3, 8, 8, 3), size=None)
    assert len(compute_flows(torch.rand(3, 8, 8, 3), size=(16, 16))) == 2


def test_the_vae_scale_factor_is_read_not_guessed():
    """device_vae used to turn any exception into a factor of 8."""
    import copy

    import pytest
    from host import tiny_models

    from streamv2v.nodes.engine.device_vae import vae_downscale
    vae = tiny_models.tiny_taesd_vae(0)
    assert vae_downscale(vae) == 8
    odd = copy.copy(vae)
    odd.downscale_ratio = "eight"
    with pytest.raises(ValueError, match="reports 't' pixels per latent cell"):
        vae_downscale(odd)
    broken = copy.copy(vae)
    broken.downscale_ratio = None  # spacial_compression_encode itself fails: the error is not hidden
    with pytest.raises(Exception) as raised:
        vae_downscale(broken)
    assert "pixels per latent cell" in str(raised.value) or isinstance(raised.value, TypeError)
