"""fused_norm_rope: whole FP8 blocks on our Triton kernels (forwards in fp8_blocks.py): LayerNorm + modulation + FP8
quantization before the QKV/MLP GEMMs, RMSNorm + RoPE writing q/k/v (in e4m3 when FA3 runs in FP8), with diffusers'
arithmetic; the single blocks' proj_out with the gated residual in its GEMM's epilogue where measured right and fast
at start (kernels/gemm_residual.py).

On top of fused_gelu_fp8 (it uses the same GELU kernel): a block qualifies only when every QKV/MLP layer it feeds is
rowwise FP8, and its ``body`` slot then holds the whole-block forward; the others keep the path below.
"""

from __future__ import annotations

from flux_kontext.optimizations.fp8_blocks import (
    BodyRerouting,
    double_block_fusable,
    fusable_feed_forwards,
    fused_double_block_forward,
    fused_single_block_forward,
    mlp_output_fusable,
    single_block_fusable,
)
from flux_kontext.optimizations.fused_gelu_fp8 import GPU_ONLY
from flux_kontext.optimizations.kernels import gemm_residual
from flux_kontext.stack import APPLY, Decision, Hardware, Model, Outcome, skip


class FusedNormRope(BodyRerouting):
    name = "fused_norm_rope"
    after = ("fused_gelu_fp8",)
    requires = ("fused_gelu_fp8",)

    def decide(self, hardware: Hardware) -> Decision:
        if not hardware.is_cuda:
            return skip(GPU_ONLY)
        if not self.settings.fused_gelu_fp8:
            return skip("needs FLUX_FUSED_GELU_FP8=true")
        if not self.settings.fused_norm_rope:
            return skip("FLUX_FUSED_NORM_ROPE=false")
        return APPLY

    def apply(self, model: Model) -> Outcome:
        transformer = model.pipe.transformer
        # The MLP outputs on the GELU kernel are reported here too, beside the whole blocks (as /health always has).
        mlp_outputs = model.earlier["fused_gelu_fp8"].report().data.get("mlp_outputs", 0)
        counts = {"mlp_outputs": mlp_outputs, "single_blocks": 0, "double_blocks": 0}
        for block in transformer.single_transformer_blocks:
            if mlp_output_fusable(block) and single_block_fusable(block):
                self._reroute(model, block, fused_single_block_forward)
                counts["single_blocks"] += 1
        for block in transformer.transformer_blocks:
            if len(fusable_feed_forwards(block)) == 2 and double_block_fusable(block):
                self._reroute(model, block, fused_double_block_forward)
                counts["double_blocks"] += 1
        if not self._rerouted:
            return Outcome.skipped("no block has all its QKV/MLP layers in rowwise FP8")
        single = [block for block in self._rerouted if block in set(transformer.single_transformer_blocks)]
        epilogue = self._residual_epilogue(single)
        total = len(transformer.single_transformer_blocks) + len(transformer.transformer_blocks)
        detail = (
            f"{len(self._rerouted)} of {total} blocks on fused kernels (LayerNorm+modulation+FP8 quantization, "
            "RMSNorm+RoPE on q/k); the others keep torchao's quantization"
        )
        if epilogue.get("use"):
            detail += f"; {len(single)} single blocks' proj_out with the gated residual in the GEMM's epilogue"
        detail += self.decisions.note(self.name)
        return Outcome.applied(
            detail, **counts, proj_out_residual_epilogue=epilogue, decisions=self.decisions.describe(self.name)
        )

    def _residual_epilogue(self, single_blocks: list) -> dict:
        """The single blocks' proj_out on the FP8 GEMM with the gated residual in its epilogue, where the start-up
        measurement (gemm_residual.measure, on the first block's weights; read back from a kept cache) finds it
        right and no slower; else cuBLAS's GEMM and the residual kernel, as before. What it found, for /health."""
        self._epilogue_layers = [block.proj_out for block in single_blocks]
        for linear in self._epilogue_layers:
            linear.fp8_residual_epilogue = False
        if not single_blocks:
            return {"use": False, "why": "no single block on the fused path"}
        proj_out = single_blocks[0].proj_out
        if not proj_out.fp8_weight_t.is_cuda:
            return {"use": False, "why": "weights not on a GPU"}
        value, _ = self.decisions.cached_or_measured(
            self.name, lambda: gemm_residual.measure(proj_out), "proj_out_epilogue", keep=lambda v: "fused_ms" in v
        )
        for linear in self._epilogue_layers:
            linear.fp8_residual_epilogue = bool(value.get("use"))
        return value

    def undo(self) -> None:
        for linear in getattr(self, "_epilogue_layers", ()):
            linear.fp8_residual_epilogue = False
        super().undo()
