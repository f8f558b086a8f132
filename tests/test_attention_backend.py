"""The bank patches keep ComfyUI's attention backend (issue 18: xformers, SDPA, sage, ...).

ComfyUI's ``CrossAttention.forward`` projects ``to_k(context)`` / ``to_v(value)`` and calls the module-level
``optimized_attention(q, k, v, heads, ...)``, chosen once at import from the command line (xformers, SDPA,
sage, flash, split or sub-quadratic). The EA patch only returns a longer ``context`` / ``value``: the call
still goes to that function, with the query unchanged and K/V ``T + banked`` tokens long. Shown here by
routing the call through a recorder around each backend installed on this machine (xformers needs a CUDA
build and cannot be installed here; its wrapper reshapes K/V with ``-1`` tokens like the others).
"""
import pytest
import torch

import comfy.ldm.modules.attention as attention
import comfy.ops
from host import tiny_models
from streamv2v.nodes.bank_nodes import ExtendedAttentionPatch, FeatureBankNode
from streamv2v.streamv2v_core import BANKS
from streamv2v.streamv2v_core.bank.calls import BankCall, RowPlan
from streamv2v.streamv2v_core.bank.state import STATE_KEY, ModelState

TOKENS, CHANNELS = 16, 32


def block_and_options():
    """A ComfyUI transformer block with the EA patch, and a bank holding one frame (DyMe(1), every frame)."""
    BANKS.remove("backend")
    handle = FeatureBankNode.execute("backend", "dyme", 1, 1, 0).args[0]
    patched = ExtendedAttentionPatch.execute(tiny_models.tiny_sd15_model(0), handle, "all").args[0]
    patches = patched.model_options["transformer_options"]["patches"]
    block = tiny_models.init_params_(attention.BasicTransformerBlock(CHANNELS, 4, 8, context_dim=16,
                                                                     operations=comfy.ops.disable_weight_init), 3)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, 7, 16, generator=g)

    def call(frame):
        bank_call = BankCall(handle.open(), RowPlan((frame,), (0,), 1), [0], 1)
        options = {"patches": patches, "block": ("middle", 0), "block_index": 0, "original_shape": [1, 4, 4, 4],
                   "cond_or_uncond": [0], STATE_KEY: ModelState(calls={handle.name: bank_call})}
        return bank_call, torch.randn(1, TOKENS, CHANNELS, generator=g), options

    with torch.inference_mode():
        bank_call, x, options = call(0)
        block(x, context, transformer_options=options)
        bank_call.flush()  # the bank now holds frame 0
    return block, context, call


@pytest.mark.parametrize("backend", ["attention_pytorch", "attention_basic", "attention_sub_quad", "attention_split"])
def test_the_extended_attention_goes_through_the_selected_backend_with_longer_keys_only(backend, monkeypatch):
    block, context, call = block_and_options()
    chosen = getattr(attention, backend)
    seen = []

    def recorder(q, k, v, heads, *args, **kwargs):
        seen.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return chosen(q, k, v, heads, *args, **kwargs)
    monkeypatch.setattr(attention, "optimized_attention", recorder)
    _, x, options = call(1)
    with torch.inference_mode():
        out = block(x, context, transformer_options=options)
    self_attention = seen[0]  # attn1 (attn2, the cross-attention, uses the masked variant or this one)
    assert self_attention[0] == (1, TOKENS, CHANNELS)
    assert self_attention[1] == self_attention[2] == (1, 2 * TOKENS, CHANNELS)  # own tokens + one banked frame
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    with torch.inference_mode():
        reference = block(x, context, transformer_options=options)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
