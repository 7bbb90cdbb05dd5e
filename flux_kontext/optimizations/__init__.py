"""The optimizations, one module each, named as their report, their settings section and the docs name them.

The serving order (``build_all``), each constraint declared by the optimization itself (``after`` / ``requires``)
and checked when the Stack is built (flux_kontext/stack):

 1. fuse_qkv           one q|k|v GEMM; before quantization, so the fused weight is what gets quantized
 2. channels_last      VAE layout only (off by default)
 3. attention          our processor, kernel chosen by measurement; before compile, whose graph holds the call
 4. flash_attention_3  FA3's state and the per-request switch (use_flash_attention)
 5. low_precision_gemm FP8 (MXFP4 on sm_100+) weights; before the fused blocks and compile (use_mxfp4)
 6. gelu_sigmoid_form  the same GELU, cheaper once compiled
 7. fused_gelu_fp8     MLP outputs on our kernels: the blocks' ``body`` slot
 8. fused_norm_rope    whole FP8 blocks on our kernels: the ``body`` slot
 9. lora               LoRA adapters' side path next to the (FP8) layers, the fused blocks' too; before compile
10. context_parallel   several ranks: Ulysses around the kernel choice, the transformer's forward on a shard
11. compile            the ``compiled`` slot, and the VAE
12. cuda_graphs        the ``graphed`` slot (use_cuda_graphs), keyed on LoRA's side path being on or off
13. first_block_cache  diffusers' hooks, above every slot (its skip decision global under context_parallel)
14. dpm_solver         the scheduler per request (use_dpm_solver)
15. text_encoder_graphs CLIP's and T5's forward as CUDA graphs (no constraint: nothing else touches the encoders)

Optional dependencies (torchao, FA3, Triton) are imported inside ``apply``: importing this package needs no GPU.
"""

from __future__ import annotations


def build_all(settings) -> list:
    """One instance of every optimization, in serving order, for these settings."""
    from flux_kontext.optimizations.attention import Attention
    from flux_kontext.optimizations.channels_last import ChannelsLast
    from flux_kontext.optimizations.compile import Compile
    from flux_kontext.optimizations.context_parallel import ContextParallel
    from flux_kontext.optimizations.cuda_graphs import CudaGraphs
    from flux_kontext.optimizations.dpm_solver import DpmSolver
    from flux_kontext.optimizations.first_block_cache import FirstBlockCache
    from flux_kontext.optimizations.flash_attention_3 import FlashAttention3
    from flux_kontext.optimizations.fuse_qkv import FuseQkv
    from flux_kontext.optimizations.fused_gelu_fp8 import FusedGeluFp8
    from flux_kontext.optimizations.fused_norm_rope import FusedNormRope
    from flux_kontext.optimizations.gelu_sigmoid_form import GeluSigmoidForm
    from flux_kontext.optimizations.lora import Lora
    from flux_kontext.optimizations.low_precision_gemm import LowPrecisionGemm
    from flux_kontext.optimizations.text_encoder_graphs import TextEncoderGraphs

    order = (
        FuseQkv,
        ChannelsLast,
        Attention,
        FlashAttention3,
        LowPrecisionGemm,
        GeluSigmoidForm,
        FusedGeluFp8,
        FusedNormRope,
        Lora,
        ContextParallel,
        Compile,
        CudaGraphs,
        FirstBlockCache,
        DpmSolver,
        TextEncoderGraphs,
    )
    return [cls(settings) for cls in order]
