"""CUDA graphs per block, on CPU: the capture/replay contract is played by a backend that re-runs the block into
the captured output tensors, so a stale or wrongly shared input, or a consumer reading a static output too late,
gives a wrong number here just as it would on a GPU."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.utils._pytree import tree_flatten

from flux_kontext.models import TINY_TRANSFORMER, build_random_pipeline
from flux_kontext.optimizations import OptimizationContext, Report
from flux_kontext.optimizations.caching import FirstBlockCache
from flux_kontext.optimizations.cuda_graphs import GraphedBlock, apply, install
from flux_kontext.settings import Settings
from tests.test_optimizations import transformer_inputs


class RerunBackend:
    """Stands in for torch.cuda.CUDAGraph: fixed output tensors, rewritten in place from the static inputs."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.captures = 0
        self.pools = 1

    def new_pool(self):
        self.pools += 1

    def capture(self, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        outputs = fn()

        def replay():
            fresh = fn()
            for static, new in zip(tree_flatten(outputs)[0], tree_flatten(fresh)[0], strict=True):
                static.copy_(new)

        return replay, outputs


def small_transformer(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**TINY_TRANSFORMER, "num_layers": 2, "num_single_layers": 3}).eval()


def blocks(transformer) -> list:
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def calls(transformer, seeds, tokens: int = 64) -> list[torch.Tensor]:
    outputs = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        kwargs = transformer_inputs(transformer, generator)
        if tokens != 64:
            kwargs["hidden_states"] = torch.randn(1, tokens, kwargs["hidden_states"].shape[-1], generator=generator)
            kwargs["img_ids"] = torch.rand(tokens, 3, generator=generator)
        outputs.append(transformer(**kwargs)[0].clone())
    return outputs


@torch.inference_mode()
def test_replayed_graphs_compute_what_the_blocks_compute_for_new_inputs_every_call():
    reference_model, graphed = small_transformer(), small_transformer()
    manager = install(graphed, RerunBackend(), max_shapes=4)
    seeds = [1, 2, 3, 4]
    expected, got = calls(reference_model, seeds), calls(graphed, seeds)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=0, atol=0)
    assert not torch.equal(got[2], got[3])  # different inputs, different outputs: nothing stale is replayed
    # 5 blocks: first call runs them, second captures, the last two replay.
    assert manager.counts == {"eager": 5, "captured": 5, "replayed": 10}


@torch.inference_mode()
def test_each_block_reads_the_previous_blocks_output_in_place_and_shares_one_copy_of_temb_and_rope():
    transformer = small_transformer()
    install(transformer, RerunBackend(), max_shapes=4)
    calls(transformer, [1, 2])
    graphed = [block.forward for block in blocks(transformer)]
    captured = [next(iter(g.graphs.values())) for g in graphed]

    def kwargs_of(entry):
        names = ["hidden_states", "encoder_hidden_states", "temb", "cos", "sin"]
        return dict(zip(names, [x for x in entry.inputs if isinstance(x, torch.Tensor)], strict=False))

    for previous, current in zip(captured, captured[1:], strict=False):
        encoder_out, hidden_out = previous.outputs
        assert kwargs_of(current)["hidden_states"].data_ptr() == hidden_out.data_ptr()
        assert kwargs_of(current)["encoder_hidden_states"].data_ptr() == encoder_out.data_ptr()
    for name in ("temb", "cos", "sin"):
        assert len({kwargs_of(entry)[name].data_ptr() for entry in captured}) == 1, name


@torch.inference_mode()
def test_first_block_cache_on_top_of_graphs_decides_and_skips_exactly_as_without():
    seeds = [1, 1, 2, 2, 2, 3]  # a repeated input has zero residual change: the cache skips it
    results = {}
    for graphs in (False, True):
        transformer = small_transformer()
        manager = install(transformer, RerunBackend(), max_shapes=4) if graphs else None
        cache = FirstBlockCache(transformer, threshold=0.12)
        with cache.request(None, None):
            results[graphs] = (calls(transformer, seeds), cache.summary())
        if manager is not None:
            assert manager.counts["replayed"] > 0
    (plain, plain_counts), (graphed, graphed_counts) = results[False], results[True]
    assert plain_counts == graphed_counts and plain_counts["skipped"] >= 3
    for want, have in zip(plain, graphed, strict=True):
        torch.testing.assert_close(have, want, rtol=0, atol=0)


@torch.inference_mode()
def test_least_recently_used_shape_is_evicted_and_recaptured_when_it_returns():
    reference_model, transformer = small_transformer(), small_transformer()
    manager = install(transformer, RerunBackend(), max_shapes=1)
    for tokens in (64, 64, 32, 32, 64, 64, 64):
        want = calls(reference_model, [5], tokens)[0]
        torch.testing.assert_close(calls(transformer, [5], tokens)[0], want, rtol=0, atol=0)
    assert manager.report is None  # install() alone: apply() attaches the report
    graph_shapes = {sig[0][1] for block in blocks(transformer) for sig in block.forward.graphs}
    assert graph_shapes == {(1, 64, TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"])}
    assert manager.counts["captured"] == 3 * 5  # 64, then 32, then 64 again after its eviction


@torch.inference_mode()
def test_clear_drops_every_graph_and_the_shapes_are_captured_again():
    transformer = small_transformer()
    manager = install(transformer, RerunBackend(), max_shapes=4)
    calls(transformer, [1, 2])
    manager.clear()
    assert all(not block.forward.graphs and not block.forward.seen for block in blocks(transformer))
    assert manager.backend.pools == 2  # CUDA destroys a pool with its last graph: new captures need a new one
    manager.reset_counts()
    calls(transformer, [3, 4, 5])
    assert manager.counts == {"eager": 5, "captured": 5, "replayed": 5}


@torch.inference_mode()
def test_a_capture_that_fails_turns_graphs_off_says_why_and_the_call_still_succeeds():
    reference_model, transformer = small_transformer(), small_transformer()
    manager = install(transformer, RerunBackend(fail=True), max_shapes=4)
    manager.report = Report("cuda_graphs", "applied", "per block")
    calls(transformer, [1])
    assert manager.report.data == {}  # nothing captured yet
    for want, have in zip(calls(reference_model, [1, 2, 3]), calls(transformer, [1, 2, 3]), strict=True):
        torch.testing.assert_close(have, want, rtol=0, atol=0)
    assert manager.failure and "stream is capturing" in manager.failure
    assert manager.report.status == "failed" and "stream is capturing" in manager.report.detail
    assert manager.counts["replayed"] == 0


@torch.inference_mode()
def test_graphs_switched_off_per_request_run_the_blocks_directly():
    transformer = small_transformer()
    backend = RerunBackend()
    manager = install(transformer, backend, max_shapes=4)
    manager.enabled = False
    calls(transformer, [1, 2, 3])
    assert backend.captures == 0 and manager.counts == {"eager": 0, "captured": 0, "replayed": 0}


def test_apply_on_cpu_is_skipped_with_the_reason_and_the_request_flag():
    pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    report = apply(pipe, OptimizationContext("cpu", None, Settings(model="tiny")))
    assert (report.status, report.flag) == ("skipped", "use_cuda_graphs")
    assert "CUDA" in report.detail
    assert not isinstance(pipe.transformer.transformer_blocks[0].forward, GraphedBlock)


@pytest.mark.parametrize("true_cfg", [False, True])
@torch.inference_mode()
def test_the_kontext_pipeline_gives_the_same_image_with_graphs_and_the_cache(true_cfg):
    from PIL import Image

    images = []
    for graphs in (False, True):
        pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
        if graphs:
            install(pipe.transformer, RerunBackend(), max_shapes=4)
        cache = FirstBlockCache(pipe.transformer, threshold=0.05)
        negative = "blurry" if true_cfg else None
        with cache.request(None, None):
            result = pipe(
                image=Image.new("RGB", (64, 64), (200, 30, 30)),
                prompt="make it blue",
                negative_prompt=negative,
                true_cfg_scale=2.0 if true_cfg else 1.0,
                width=64,
                height=64,
                num_inference_steps=4,
                generator=torch.Generator().manual_seed(0),
                max_sequence_length=16,
                output_type="pt",
                _auto_resize=False,
            ).images
        images.append(result)
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=0)


@torch.inference_mode()
def test_health_data_lists_the_shapes_that_hold_graphs():
    transformer = small_transformer()
    manager = install(transformer, RerunBackend(), max_shapes=1)
    manager.report = Report("cuda_graphs", "applied", "per block")
    calls(transformer, [1, 2])
    assert manager.report.data["captured_shapes"] == [[[1, 64, 64], [1, 8, 32]]]  # (hidden, text) inputs
    calls(transformer, [1, 2], tokens=32)
    assert manager.report.data["captured_shapes"] == [[[1, 32, 64], [1, 8, 32]]]  # the other was evicted
    manager.clear()
    assert manager.report.data["captured_shapes"] == []
