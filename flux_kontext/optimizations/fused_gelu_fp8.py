"""fused_gelu_fp8: GELU + rowwise FP8 quantization of the MLP outputs in one kernel (ours, Triton), then
the FP8 GEMM (forwards in fp8_blocks.py).

Needs the FP8 weights (after low_precision_gemm) and runs before compile, which traces the kernels as torch ops.
It fills the ``body`` slot of each rerouted single block and feed-forward; ``undo`` empties them again (diffusers'
forward).
"""

from __future__ import annotations

import torch

from flux_kontext.optimizations import kernels
from flux_kontext.optimizations.fp8_blocks import (
    BodyRerouting,
    feed_forward,
    fusable_feed_forwards,
    mlp_output_fusable,
    single_block_forward,
)
from flux_kontext.stack import APPLY, Decision, Hardware, Model, Outcome, skip

GPU_ONLY = "Triton kernels for the GPU's FP8 path"


class FusedGeluFp8(BodyRerouting):
    name = "fused_gelu_fp8"
    after = ("low_precision_gemm", "attention", "gelu_sigmoid_form")

    def decide(self, hardware: Hardware) -> Decision:
        if not hardware.is_cuda:
            return skip(GPU_ONLY)
        if not self.settings.fused_gelu_fp8:
            return skip("FLUX_FUSED_GELU_FP8=false")
        return APPLY

    def apply(self, model: Model) -> Outcome:
        if torch.cuda.is_available():
            kernels.ops()  # registered now, at load: never for the first time inside compiled code
        transformer = model.pipe.transformer
        for block in transformer.single_transformer_blocks:
            if mlp_output_fusable(block):
                self._reroute(model, block, single_block_forward)
        for block in transformer.transformer_blocks:
            for ff in fusable_feed_forwards(block):
                self._reroute(model, ff, feed_forward)
        if not self._rerouted:
            return Outcome.skipped("no rowwise-FP8 MLP output layer to feed (FP8 not applied)")
        count = len(self._rerouted)
        return Outcome.applied(
            f"{count} MLP outputs: GELU and rowwise FP8 quantization in one Triton kernel (the single blocks' rows "
            "read twice: absmax, then quantization), straight into the FP8 GEMM",
            mlp_outputs=count,
        )
