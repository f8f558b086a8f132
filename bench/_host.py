"""Benchmarks' way to the in-process host: ``tests/host/inprocess.py``, shared with the tests and the demo."""
import pathlib
import sys

_TESTS = str(pathlib.Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from host.inprocess import setup_host  # noqa: E402,F401  (re-exported)

__all__ = ["setup_host"]


def tiny_banked_parts(bank: str):
    """(model, conditioning, vae) for CPU benchmarks: the tiny SD1.5 UNet with a DyMe bank of 1 (EA on every
    self-attention, FF on the low-res decoder), random conditioning, TAESD. Call after ``setup_host``."""
    from host import tiny_models
    from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode, FeatureFusionPatch

    handle = FeatureBankNode.execute(bank, "dyme", 1, 1, 0).args[0]
    model = ExtendedAttentionPatch.execute(tiny_models.tiny_sd15_model(0), handle, "all").args[0]
    model = FeatureFusionPatch.execute(model, handle, 0.75, 0.9, "low-res decoder").args[0]
    return model, tiny_models.random_conditioning("sd15", 0), tiny_models.tiny_taesd_vae(0)
