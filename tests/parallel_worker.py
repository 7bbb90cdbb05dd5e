"""Ranks of a gloo process group on the CPU for tests/test_context_parallel.py: the tiny transformer with our
attention processor, sharded by the context_parallel optimization, on step inputs of the given token counts."""

from __future__ import annotations

import types

import torch

# (image tokens, text tokens): one that divides two ranks, one that does not, and an edit's image + context tokens.
CASES = ((64, 8), (63, 7), (2 * 49, 5))


def tiny_transformer():
    from diffusers import FluxTransformer2DModel

    from flux_kontext.models import TINY_TRANSFORMER

    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY_TRANSFORMER).eval()


def case_inputs(config, image_tokens: int, text_tokens: int) -> dict:
    from flux_kontext.models import step_inputs

    inputs = step_inputs(config, torch.device("cpu"), torch.float32, image_tokens, text_tokens=text_tokens)
    if image_tokens != int(image_tokens**0.5) ** 2:  # a non-square count: ids of a strip, one row per token
        rows = torch.arange(image_tokens, dtype=torch.float32)
        inputs["img_ids"] = torch.stack([torch.zeros_like(rows), rows / 3, rows % 5], 1)
    return inputs


def stack_on(transformer, settings, group=None):
    from flux_kontext.stack import Hardware, stack_for

    stack = stack_for(settings, only=["attention", "context_parallel", "first_block_cache"])
    if group is not None:
        stack["context_parallel"].attach(group)
    stack.apply(types.SimpleNamespace(transformer=transformer), Hardware("cpu"))
    return stack


def outputs(transformer, cases=CASES) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [transformer(**case_inputs(transformer.config, *case))[0] for case in cases]


def compiled_blocks(transformer) -> None:
    """Each block's forward through torch.compile as serving compiles it (fullgraph, dynamic shapes), with the
    aot_eager backend (no C++ toolchain needed): the all-to-alls must trace into the blocks' graphs."""
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        block.forward = torch.compile(block.forward, fullgraph=True, backend="aot_eager", dynamic=True)


class FakeFp8Choice:
    """FA3 in FP8's ``fp8_call`` contract on the CPU: e4m3 q/k/v and per-(batch, head) descales, dequantized, then
    attention in float32."""

    def fp8_call(self, q8, k8, v8, q_descale, k_descale, v_descale):
        from flux_kontext.optimizations.attention.kernels import sdpa

        q, k, v = (t.float() * d[:, None, :, None] for t, d in ((q8, q_descale), (k8, k_descale), (v8, v_descale)))
        return sdpa(q, k, v)


def fp8_inputs(tokens: int = 13, heads: int = 4):
    """q, k with static per-head scales (different per head), v with per-head scales over ``tokens``, all e4m3."""
    from flux_kontext.optimizations.kernels.e4m3 import quantize_per_head, quantize_static

    g = torch.Generator().manual_seed(3)
    # Small logits (a soft softmax, where a wrong scale shows) and scales that differ per head, none clipping.
    q, k, v = (
        torch.randn(1, tokens, heads, 8, generator=g) * (0.3 + 0.2 * torch.arange(heads))[:, None] for _ in range(3)
    )
    scales = [t.abs().amax(dim=(1, 3)) / 448 * (1 + torch.rand(1, heads, generator=g)) for t in (q, k)]
    q8, k8 = (quantize_static(t, s[:, None, :, None]) for t, s in zip((q, k), scales, strict=True))
    v8, v_descale = quantize_per_head(v)
    return q8, k8, v, v8, scales[0], scales[1], v_descale


def fp8_through_ulysses(group, rank: int, world_size: int) -> torch.Tensor:
    """This rank's piece of the FP8 attention through UlyssesChoice.fp8_call, gathered (13 tokens: uneven)."""
    from flux_kontext.optimizations.kernels.e4m3 import quantize_per_head
    from flux_kontext.parallel.sharding import SequencePlan, gather, shard
    from flux_kontext.parallel.ulysses import UlyssesChoice

    q8, k8, v, _, q_descale, k_descale, _ = fp8_inputs()
    plan = SequencePlan.for_lengths(rank, world_size, 0, q8.shape[1])
    local_v8, local_v_descale = quantize_per_head(shard(v, 1, plan.joint, rank))  # this rank's tokens only
    choice = UlyssesChoice(FakeFp8Choice(), group, rank, world_size)
    choice.plan = plan
    pieces = (shard(t, 1, plan.joint, rank) for t in (q8, k8))
    out = choice.fp8_call(*pieces, local_v8, q_descale, k_descale, local_v_descale)
    return gather(out, 1, plan.joint, group)


def rank_main(rank: int, world_size: int, port: int, out_path: str) -> None:
    from flux_kontext.parallel.group import connect_store, join_group
    from flux_kontext.parallel.ranks import RankEnvironment
    from flux_kontext.settings import Settings

    torch.set_num_threads(1)  # two ranks on a 2-CPU machine
    ranks = RankEnvironment(rank, world_size, rank, "test")
    store = connect_store(ranks, port, 60)
    group = join_group(ranks, store, torch.device("cpu"), 60)
    try:
        settings = Settings(model="tiny", device="cpu", first_block_cache=False)
        transformer = tiny_transformer()
        stack = stack_on(transformer, settings, group)
        assert stack["context_parallel"].applied, stack["context_parallel"].detail
        results = {"eager": outputs(transformer), "fp8": fp8_through_ulysses(group.compute, rank, world_size)}
        compiled_blocks(transformer)
        results["compiled"] = outputs(transformer, CASES[-1:])  # tracing is slow on 2 CPUs: the uneven edit only
        if rank == 0:
            torch.save(results, out_path)
    finally:
        group.close()
