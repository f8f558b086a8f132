"""FeatureBank, ExtendedAttentionPatch and FeatureFusionPatch nodes."""
from __future__ import annotations

from comfy_api.latest import io

from ..streamv2v_core.bank.feature_bank import MODES, BankConfig
from ..streamv2v_core.bank.registry import BankHandle, check_bank_name
from ..streamv2v_core.bank.patches import ALL, BLOCK_CHOICES, LOW_RES_DECODER, ExtendedAttention, FeatureFusion
from ._schema import BANK_CATEGORY, advanced
from .engine import bank_status, patched_clone

Bank = io.Custom("STREAMV2V_BANK")


class FeatureBankNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FeatureBank",
            display_name="StreamV2V Feature Bank",
            category=BANK_CATEGORY,
            description="A named bank of past frames' features. It lives beyond one run: every prompt that "
                        "uses the same name shares it, so frames queued one by one still see their past. The "
                        "node that runs the frames decides when a stream starts (StreamV2V Sampler / Loop: "
                        "bank_start); a plain KSampler continues the bank. It is cleared, with the reason in "
                        "its status line, when the model, LoRA, size, steps, strength or cfg change, and by the "
                        "Clear button under this node.",
            inputs=[
                io.String.Input("name", default="default",
                                tooltip="Banks with the same name are the same bank, across prompts and workflows."),
                io.Combo.Input("mode", options=list(MODES), default="dyme",
                               tooltip="dyme: merge new frames into a bank of constant size (paper default). "
                                       "queue: keep the last `size` frames as they are (more memory, shorter memory)."),
                io.Int.Input("size", default=1, min=1, max=16,
                             tooltip="Frames' worth of features the bank keeps. 1 is the paper's DyMe setting; "
                                     "larger costs time and memory."),
                io.Int.Input("interval", default=4, min=1, max=1000,
                             tooltip="Update the bank every this many frames. Larger holds the look longer; "
                                     "smaller follows fast motion better."),
                advanced(io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                                      tooltip="Seed of the bank's own random split for dynamic merging.")),
            ],
            outputs=[Bank.Output(display_name="bank", tooltip="Connect to the patch nodes and the StreamV2V sampler.")],
        )

    @classmethod
    def validate_inputs(cls, name):
        # Only `name` is checked here; ComfyUI keeps checking the other inputs' ranges.
        try:
            check_bank_name(name)
        except ValueError as error:
            return f"{error}; banks with the same name are shared"
        return True

    @classmethod
    def execute(cls, name, mode, size, interval, seed=0) -> io.NodeOutput:
        handle = BankHandle(check_bank_name(name), BankConfig(mode=mode, size=size, interval=interval, seed=seed))
        # The status line under the node (web/streamv2v_bank_status.js); a changed mode/size/interval
        # clears the bank here, with the reason.
        return io.NodeOutput(handle, ui={"streamv2v_bank": [bank_status(handle.open())]})


class ExtendedAttentionPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ExtendedAttentionPatch",
            display_name="StreamV2V Extended Attention",
            category=BANK_CATEGORY,
            description="Self-attention also attends to the bank's past frames (paper eq. 1): the main source "
                        "of temporal consistency. Returns a patched copy; the input model is unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5- or SDXL-family model (LoRAs and other patches are kept)."),
                Bank.Input("bank", tooltip="The feature bank to read and fill."),
                io.Combo.Input("blocks", options=list(BLOCK_CHOICES), default=ALL,
                               tooltip="Which self-attentions to extend. all (paper) is the most consistent; "
                                       "fewer blocks are faster."),
            ],
            outputs=[io.Model.Output(tooltip="The model with extended self-attention.")],
        )

    @classmethod
    def execute(cls, model, bank, blocks=ALL) -> io.NodeOutput:
        return io.NodeOutput(patched_clone(model, "attn1_patch", ExtendedAttention(bank, blocks)))


class FeatureFusionPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FeatureFusionPatch",
            display_name="StreamV2V Feature Fusion",
            category=BANK_CATEGORY,
            description="Blends each self-attention output with its most similar feature in the bank (paper "
                        "eq. 2). Returns a patched copy; the input model is unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5- or SDXL-family model (LoRAs and other patches are kept)."),
                Bank.Input("bank", tooltip="The feature bank to read and fill."),
                io.Float.Input("alpha", default=0.75, min=0.0, max=1.0, step=0.01,
                               tooltip="Fusion strength: 0 keeps the current frame, 1 copies the past. "
                                       "Paper 0.75, the authors' code 0.8."),
                io.Float.Input("threshold", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="Only tokens whose best cosine match in the bank reaches this are fused; "
                                       "new content stays as is. Paper 0.9, the authors' code 0.98."),
                io.Combo.Input("blocks", options=list(BLOCK_CHOICES), default=LOW_RES_DECODER,
                               tooltip="low-res decoder (paper): middle block and the two lowest-resolution "
                                       "decoder levels. all blocks can blur details."),
            ],
            outputs=[io.Model.Output(tooltip="The model with feature fusion.")],
        )

    @classmethod
    def execute(cls, model, bank, alpha=0.75, threshold=0.9, blocks=LOW_RES_DECODER) -> io.NodeOutput:
        return io.NodeOutput(patched_clone(model, "attn1_output_patch", FeatureFusion(bank, blocks, alpha, threshold)))


NODES = [FeatureBankNode, ExtendedAttentionPatch, FeatureFusionPatch]
