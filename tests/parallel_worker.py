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


def outputs(transformer) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [transformer(**case_inputs(transformer.config, *case))[0] for case in CASES]


def rank_main(rank: int, world_size: int, port: int, out_path: str) -> None:
    from flux_kontext.parallel.group import connect_store, join_group
    from flux_kontext.parallel.ranks import RankEnvironment
    from flux_kontext.settings import Settings

    ranks = RankEnvironment(rank, world_size, rank, "test")
    store = connect_store(ranks, port, 60)
    group = join_group(ranks, store, torch.device("cpu"), 60)
    try:
        settings = Settings(model="tiny", device="cpu", first_block_cache=False)
        transformer = tiny_transformer()
        stack = stack_on(transformer, settings, group)
        assert stack["context_parallel"].applied, stack["context_parallel"].detail
        results = outputs(transformer)
        if rank == 0:
            torch.save(results, out_path)
    finally:
        group.close()
