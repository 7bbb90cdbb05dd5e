"""CUDA graphs per block, on CPU: the capture/replay contract is played by a backend that re-runs the block into
the captured output tensors, so a stale or wrongly shared input, or a consumer reading a static output too late,
gives a wrong number here just as it would on a GPU.

The capture contract is tested on the bare ``GraphManager`` (``install(transformer, slots, manager)``); reports,
undo and per-request switching through the ``CudaGraphs`` optimization in a ``Stack``. ``Hardware("cuda", ...)``
on a CPU machine is fine there: with the fake backend nothing in these stacks touches CUDA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.utils._pytree import tree_flatten

from flux_kontext.jobs import Job
from flux_kontext.models import TINY_TRANSFORMER, build_random_pipeline
from flux_kontext.optimizations.attention import Selection
from flux_kontext.optimizations.attention.kernels import FA3_FP8, KernelChoice, sdpa
from flux_kontext.optimizations.attention.processor import install as install_processor
from flux_kontext.optimizations.cuda_graphs import CudaGraphs, GraphManager, install
from flux_kontext.optimizations.first_block_cache import FirstBlockCache, FirstBlockCacheControl
from flux_kontext.optimizations.flash_attention_3 import FlashAttention3
from flux_kontext.settings import Settings
from flux_kontext.stack import APPLY, ForwardSlots, Hardware, Optimization, Outcome, RequestRun, Stack
from tests.test_optimizations import transformer_inputs

GPU = Hardware("cuda", (9, 0))
ZERO_COUNTS = {"replayed": 0, "captured": 0, "eager": 0}


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


def graphed(transformer, backend=None, max_shapes: int = 4, **callbacks) -> GraphManager:
    """The bare capture machinery on ``transformer``'s blocks (no optimization, no report)."""
    manager = GraphManager(backend or RerunBackend(), max_shapes, **callbacks)
    install(transformer, ForwardSlots(), manager)
    return manager


def graphs_stack(transformer, backend=None, with_cache: bool = False, **settings) -> tuple[Stack, CudaGraphs]:
    """``transformer`` (as a pipeline's) under a Stack of CudaGraphs on the fake backend, optionally the cache."""
    settings = Settings(model="tiny", **settings)
    backend = backend or RerunBackend()
    opt = CudaGraphs(settings, backend_factory=lambda: backend)
    stack = Stack([opt, FirstBlockCache(settings)] if with_cache else [opt])
    stack.apply(SimpleNamespace(transformer=transformer), GPU)
    assert opt.applied == settings.cuda_graphs, opt.detail
    return stack, opt


def job(**fields) -> Job:
    return Job(prompt="a cat", seed=0, **fields)


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for have, expected in zip(got, want, strict=True):
        torch.testing.assert_close(have, expected, rtol=0, atol=0)


@torch.inference_mode()
def test_replayed_graphs_compute_what_the_blocks_compute_for_new_inputs_every_call():
    reference_model, transformer = small_transformer(), small_transformer()
    manager = graphed(transformer)
    seeds = [1, 2, 3, 4]
    expected, got = calls(reference_model, seeds), calls(transformer, seeds)
    assert_same(got, expected)
    assert not torch.equal(got[2], got[3])  # different inputs, different outputs: nothing stale is replayed
    # 5 blocks: first call runs them, second captures, the last two replay.
    assert manager.counts == {"eager": 5, "captured": 5, "replayed": 10}


@torch.inference_mode()
def test_each_block_reads_the_previous_blocks_output_in_place_and_shares_one_copy_of_temb_and_rope():
    """What each block's body computes on (recorded by a body slot, so inside the replayed graph) against what the
    block was called with and what it returned (torch's forward hooks, around the whole slot chain)."""
    transformer = small_transformer()
    slots, manager = ForwardSlots(), GraphManager(RerunBackend(), 4)
    reads, called, returned = {}, {}, {}

    def recording_body(module, **kwargs):
        cos, sin = kwargs["image_rotary_emb"]
        reads[module] = {
            "hidden_states": kwargs["hidden_states"].data_ptr(),
            "encoder_hidden_states": kwargs["encoder_hidden_states"].data_ptr(),
            "temb": kwargs["temb"].data_ptr(),
            "cos": cos.data_ptr(),
            "sin": sin.data_ptr(),
        }
        return type(module).forward(module, **kwargs)

    def record_call(module, args, kwargs, output):
        called[module] = {"temb": kwargs["temb"].data_ptr()}
        encoder_out, hidden_out = output
        returned[module] = {"encoder_hidden_states": encoder_out.data_ptr(), "hidden_states": hidden_out.data_ptr()}

    for block in blocks(transformer):
        slots.set_body(block, recording_body)
        block.register_forward_hook(record_call, with_kwargs=True)
    install(transformer, slots, manager)
    calls(transformer, [1, 2])  # run, then capture
    for seed in (3, 4):  # replays
        manager.reset_counts()
        calls(transformer, [seed])
        assert manager.counts["replayed"] == 5
        chain = blocks(transformer)
        for previous, current in zip(chain, chain[1:], strict=False):
            for name in ("hidden_states", "encoder_hidden_states"):
                assert reads[current][name] == returned[previous][name], name  # no copy between blocks
        for name in ("temb", "cos", "sin"):
            assert len({reads[block][name] for block in chain}) == 1, name  # one static copy for all blocks
        assert reads[chain[0]]["temb"] != called[chain[0]]["temb"]  # a copy, refreshed for this call's values


@torch.inference_mode()
def test_first_block_cache_on_top_of_graphs_decides_and_skips_exactly_as_without():
    seeds = [1, 1, 2, 2, 2, 3]  # a repeated input has zero residual change: the cache skips it
    results = {}
    for graphs in (False, True):
        transformer = small_transformer()
        stack, _ = graphs_stack(transformer, with_cache=True, cuda_graphs=graphs, cache_threshold=0.12)
        with stack.request(job()) as run:
            outputs = calls(transformer, seeds)
        results[graphs] = (outputs, run.counters["first_block_cache"])
        if graphs:
            assert run.counters["cuda_graphs"]["replayed"] > 0
            assert run.ran == ["cuda_graphs", "first_block_cache"]
        else:
            assert run.counters["cuda_graphs"] is None  # FLUX_CUDA_GRAPHS=false: not loaded
            assert run.ran == ["first_block_cache"]
    (plain, plain_counts), (graphs_out, graphs_counts) = results[False], results[True]
    assert plain_counts == graphs_counts and plain_counts["skipped"] >= 3
    assert_same(graphs_out, plain)


@torch.inference_mode()
def test_least_recently_used_shape_is_evicted_and_recaptured_when_it_returns():
    reference_model, transformer = small_transformer(), small_transformer()
    published = []
    manager = graphed(transformer, max_shapes=1, on_shapes=published.append)
    for tokens in (64, 64, 32, 32, 64, 64, 64):
        want = calls(reference_model, [5], tokens)[0]
        torch.testing.assert_close(calls(transformer, [5], tokens)[0], want, rtol=0, atol=0)
    channels = TINY_TRANSFORMER["in_channels"]
    assert published[-1] == [[[1, 64, channels], [1, 8, 32]]]  # only the most recent shape holds graphs
    assert manager.counts["captured"] == 3 * 5  # 64, then 32, then 64 again after its eviction


class MemoryGauge(RerunBackend):
    """A backend that says how much device memory is free: what the test sets, minus 10 per graph captured."""

    def __init__(self, free: int):
        super().__init__()
        self.free = free

    def free_bytes(self) -> int:
        return self.free - 10 * self.captures


@torch.inference_mode()
def test_shapes_are_evicted_while_free_memory_is_below_the_floor_and_the_newest_always_stays():
    reference_model, transformer = small_transformer(), small_transformer()
    backend, published = MemoryGauge(free=1000), []
    manager = graphed(transformer, backend, max_shapes=8, on_shapes=published.append, min_free_bytes=900)
    for tokens in (64, 64, 32, 32):  # two shapes captured (10 graphs: 900 left): both fit
        torch.testing.assert_close(calls(transformer, [5], tokens)[0], calls(reference_model, [5], tokens)[0])
    channels = TINY_TRANSFORMER["in_channels"]
    assert len(published[-1]) == 2 and manager.evictions == 0
    backend.free = 950  # memory got short: the next capture drops the least recently used shape
    for tokens in (16, 16):
        torch.testing.assert_close(calls(transformer, [5], tokens)[0], calls(reference_model, [5], tokens)[0])
    assert published[-1] == [[[1, 16, channels], [1, 8, 32]]] and manager.evictions == 2
    assert manager.free_bytes == 950 - 10 * backend.captures
    backend.free = 0  # nothing left at all: the shape being captured still keeps its graphs
    calls(transformer, [5, 5], 48)
    assert published[-1] == [[[1, 48, channels], [1, 8, 32]]]


class CappedProcess(RerunBackend):
    """A process capped below its card: the device has plenty free; what its tensors hold grows 10 per graph."""

    def free_bytes(self) -> int:
        return 10**6

    def allocated_bytes(self) -> int:
        return 500 + 10 * self.captures


@pytest.mark.parametrize("budget, kept", [(None, 3), (1000, 1)])
@torch.inference_mode()
def test_free_memory_is_counted_within_the_memory_plans_budget(budget, kept):
    transformer, published = small_transformer(), []
    backend = CappedProcess()
    manager = graphed(
        transformer, backend, max_shapes=8, on_shapes=published.append, min_free_bytes=400, budget_bytes=budget
    )
    for tokens in (64, 64, 32, 32, 16, 16):  # 5 graphs a shape: within the budget 450, 400, then 350 left
        calls(transformer, [5], tokens)
    assert len(published[-1]) == kept  # the card's free memory alone keeps every shape; the budget does not
    if budget is not None:
        assert manager.free_bytes == budget - 500 - 10 * backend.captures
        assert published[-1] == [[[1, 16, TINY_TRANSFORMER["in_channels"]], [1, 8, 32]]] and manager.evictions == 2


@pytest.mark.parametrize(
    "setting, headroom, want, source",
    [
        (7.0, 3 * 2**30, 7 * 2**30, "FLUX_CUDA_GRAPH_MIN_FREE_GIB"),  # the operator's number wins
        (None, 3 * 2**30, 3 * 2**30, "memory plan"),  # else what the plan's largest request needs
        (None, None, 20 * 2**30, "no memory plan"),  # a stack built outside the engine
    ],
)
def test_the_floor_kept_free_comes_from_the_setting_the_memory_plan_or_a_default(setting, headroom, want, source):
    hardware = Hardware(
        "cuda", (9, 0), memory_budget=None if headroom is None else 24 * 2**30, request_headroom=headroom
    )
    opt = CudaGraphs(Settings(model="tiny", cuda_graph_min_free_gib=setting), backend_factory=RerunBackend)
    stack = Stack([opt])
    stack.apply(build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32), hardware)
    report = opt.report()
    assert report.status == "applied"
    assert report.data["min_free_gib"] == round(want / 2**30, 2) and source in report.data["min_free_source"]
    assert report.data["budget_gib"] == (None if headroom is None else 24.0)
    assert f"{want / 2**30:.1f} GiB" in report.detail


@torch.inference_mode()
def test_clear_drops_every_graph_and_the_shapes_are_captured_again():
    reference_model, transformer = small_transformer(), small_transformer()
    backend, published = RerunBackend(), []
    manager = graphed(transformer, backend, on_shapes=published.append)
    calls(transformer, [1, 2])
    assert published[-1] != []
    manager.clear()
    assert published[-1] == []
    assert backend.pools == 2  # CUDA destroys a pool with its last graph: new captures need a new one
    manager.reset_counts()
    assert_same(calls(transformer, [3, 4, 5]), calls(reference_model, [3, 4, 5]))
    assert manager.counts == {"eager": 5, "captured": 5, "replayed": 5}  # run, captured, replayed anew
    assert backend.captures == 10


class OutOfMemoryAt(RerunBackend):
    """A capture runs out of memory at the capture numbered ``at`` (counting from 1), as the GPU would."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.released = at, 0

    def capture(self, fn):
        if self.captures + 1 == self.at:
            self.captures += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 154.00 MiB.")
        return super().capture(fn)

    def release_memory(self):
        self.released += 1


@torch.inference_mode()
def test_a_shape_whose_capture_runs_out_of_memory_runs_without_graphs_and_the_others_keep_them():
    reference_model, transformer = small_transformer(), small_transformer()
    backend = OutOfMemoryAt(5 + 3)  # the third block of the second shape
    stack, opt = graphs_stack(transformer, backend)
    channels = TINY_TRANSFORMER["in_channels"]
    for tokens in (64, 64, 32):
        calls(transformer, [5], tokens)
    with stack.request(job()) as run:
        got = calls(transformer, [6], 32)  # captures, runs out of memory at block 2: finishes without graphs
    torch.testing.assert_close(got[0], calls(reference_model, [6], 32)[0], rtol=0, atol=0)
    report = opt.report()
    assert report.status == "applied" and backend.released == 1
    assert report.data["too_large_shapes"] == [[[1, 32, channels], [1, 8, 32]]]
    assert report.data["captured_shapes"] == []  # every graph dropped: their memory goes back to the requests
    assert "do not fit" in run.not_applied[0]["reason"]
    with stack.request(job()) as run:
        assert_same(calls(transformer, [7], 32), calls(reference_model, [7], 32))
    assert run.counters["cuda_graphs"] == {"replayed": 0, "captured": 0, "eager": 5}  # not tried again
    with stack.request(job()) as run:
        assert_same(calls(transformer, [8, 9], 64), calls(reference_model, [8, 9], 64))
    assert run.counters["cuda_graphs"]["captured"] == 5  # the other shape is captured again: graphs stay on
    assert opt.report().data["captured_shapes"] == [[[1, 64, channels], [1, 8, 32]]]


@torch.inference_mode()
def test_a_capture_that_fails_turns_graphs_off_says_why_and_the_call_still_succeeds():
    reference_model, transformer = small_transformer(), small_transformer()
    stack, opt = graphs_stack(transformer, RerunBackend(fail=True))
    with stack.request(job()) as run:
        calls(transformer, [1])  # first sight of the shape: nothing is captured yet
    assert opt.report().status == "applied" and opt.report().data["captured_shapes"] == []
    assert run.counters["cuda_graphs"] == {"replayed": 0, "captured": 0, "eager": 5}
    got = []
    for seed in (1, 2, 3):
        with stack.request(job()) as run:
            got += calls(transformer, [seed])
        assert "cuda_graphs" not in run.ran
        assert [entry["optimization"] for entry in run.not_applied] == ["cuda_graphs"]
        assert "stream is capturing" in run.not_applied[0]["reason"]  # the request it failed in says why, too
        assert run.counters["cuda_graphs"]["replayed"] == 0
    assert_same(got, calls(reference_model, [1, 2, 3]))
    report = opt.report()
    assert report.status == "failed" and "stream is capturing" in report.detail
    assert report.public()["status"] == "failed"
    # Later requests say why graphs did not run: the failure.
    assert run.not_applied[0]["flag"] == "use_cuda_graphs"
    assert "stream is capturing" in run.not_applied[0]["reason"]


@torch.inference_mode()
def test_graphs_switched_off_per_request_run_the_blocks_directly():
    reference_model, transformer = small_transformer(), small_transformer()
    backend = RerunBackend()
    stack, opt = graphs_stack(transformer, backend)
    assert opt.report().switchable_per_request
    assert {"use_cuda_graphs": False} in stack.warmup_flag_variants()
    off = job(flags={"use_cuda_graphs": False})
    for seed in (1, 2, 3):
        with stack.request(off) as run:
            torch.testing.assert_close(calls(transformer, [seed])[0], calls(reference_model, [seed])[0], rtol=0, atol=0)
        assert run.counters["cuda_graphs"] == ZERO_COUNTS
        assert run.ran == [] and run.not_applied == [] and run.could_not_turn_off == []
    assert backend.captures == 0
    # The same shapes with graphs on: the first sight of a shape is said not to have used graphs, then they run.
    reports = []
    for seed in (1, 2, 3):
        with stack.request(job()) as run:
            calls(transformer, [seed])
        reports.append((run.ran, [entry["optimization"] for entry in run.not_applied], run.counters["cuda_graphs"]))
    assert reports == [
        ([], ["cuda_graphs"], {"replayed": 0, "captured": 0, "eager": 5}),
        (["cuda_graphs"], [], {"replayed": 0, "captured": 5, "eager": 0}),
        (["cuda_graphs"], [], {"replayed": 5, "captured": 0, "eager": 0}),
    ]


class Fa3Fp8StandIn(Optimization):
    """attention with FA3 in FP8 chosen (both kernels SDPA here: what matters is which one the request asks for)."""

    name = "attention"

    def apply(self, model) -> Outcome:
        self.choice = KernelChoice(kernels={"sdpa": sdpa, FA3_FP8: sdpa}, active=FA3_FP8, fallback="sdpa")
        self.selection = Selection(best="sdpa", mode="on")
        install_processor(model.pipe.transformer, self.choice)
        return Outcome.applied("FA3 in FP8 (stand-in)")


class FlashAttention3OnCpu(FlashAttention3):
    def decide(self, hardware):
        return APPLY


@torch.inference_mode()
def test_a_request_that_switches_fa3_off_never_replays_graphs_captured_with_it_on():
    transformer, settings, backend = small_transformer(), Settings(model="tiny"), RerunBackend()
    graphs = CudaGraphs(settings, backend_factory=lambda: backend)
    stack = Stack([Fa3Fp8StandIn(settings), FlashAttention3OnCpu(settings), graphs])
    stack.apply(SimpleNamespace(transformer=transformer), GPU)
    assert stack["flash_attention_3"].applied, stack["flash_attention_3"].detail

    def counts(request: Job) -> dict:
        with stack.request(request) as run:
            calls(transformer, [1])
        return run.counters["cuda_graphs"]

    on, off = job(), job(flags={"use_flash_attention": False})
    assert [counts(on) for _ in range(3)][-1] == {"replayed": 5, "captured": 0, "eager": 0}
    # Switched off, the blocks run with the other kernel: their own first sight and capture, never the FP8 graphs.
    assert [counts(off) for _ in range(3)] == [
        {"replayed": 0, "captured": 0, "eager": 5},
        {"replayed": 0, "captured": 5, "eager": 0},
        {"replayed": 5, "captured": 0, "eager": 0},
    ]
    assert counts(on) == {"replayed": 5, "captured": 0, "eager": 0}  # the FP8 captures are still there


def test_apply_on_cpu_is_skipped_with_the_reason_and_the_request_flag():
    pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    stack = Stack([CudaGraphs(Settings(model="tiny"), backend_factory=RerunBackend)])
    (report,) = stack.apply(pipe, Hardware("cpu"))
    assert (report.status, report.flag) == ("skipped", "use_cuda_graphs")
    assert "CUDA" in report.detail
    assert all(stack.slots.filled(block) == () for block in blocks(pipe.transformer))
    with stack.request(job()) as run:
        pass
    assert run.counters["cuda_graphs"] is None
    assert run.not_applied == [{"flag": "use_cuda_graphs", "optimization": "cuda_graphs", "reason": report.detail}]


@torch.inference_mode()
def test_undo_after_a_failed_warmup_runs_the_blocks_as_before_and_says_why():
    reference_model, transformer = small_transformer(), small_transformer()
    backend = RerunBackend()
    stack, opt = graphs_stack(transformer, backend)
    calls(transformer, [1, 2, 3])
    assert stack.undo_after_failed_warmup(RuntimeError("warm-up broke")) == ["cuda_graphs"]
    assert all(stack.slots.filled(block) == () for block in blocks(transformer))
    assert opt.report().status == "failed" and "warm-up broke" in opt.report().detail
    captures = backend.captures
    with stack.request(job()) as run:
        assert_same(calls(transformer, [4, 5, 6]), calls(reference_model, [4, 5, 6]))
    assert backend.captures == captures and run.counters["cuda_graphs"] == ZERO_COUNTS
    assert [entry["optimization"] for entry in run.not_applied] == ["cuda_graphs"]


def encoded(pipe, prompt: str | None):
    if prompt is None:
        return None, None
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=16)
    return embeds, pooled


@pytest.mark.parametrize("true_cfg", [False, True])
@torch.inference_mode()
def test_the_kontext_pipeline_gives_the_same_image_with_graphs_and_the_cache(true_cfg):
    from PIL import Image

    images, counters = [], []
    for graphs in (False, True):
        pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
        settings = Settings(model="tiny", cuda_graphs=graphs, cache_threshold=0.05)
        stack = Stack([CudaGraphs(settings, backend_factory=RerunBackend), FirstBlockCache(settings)])
        stack.apply(pipe, GPU)
        with stack.request(job()) as run:
            prompt, pooled = encoded(pipe, "make it blue")
            negative, negative_pooled = encoded(pipe, "blurry" if true_cfg else None)
            run.negative_prompt_embeds = negative  # as the generation does: tells the true-CFG pass apart
            result = pipe(
                image=Image.new("RGB", (64, 64), (200, 30, 30)),
                prompt_embeds=prompt,
                pooled_prompt_embeds=pooled,
                negative_prompt_embeds=negative,
                negative_pooled_prompt_embeds=negative_pooled,
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
        counters.append(run.counters)
        if graphs:
            assert run.counters["cuda_graphs"]["replayed"] > 0
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=0)
    plain, with_graphs = (c["first_block_cache"] for c in counters)
    assert plain == with_graphs
    assert plain["computed"] + plain["skipped"] == (8 if true_cfg else 4)  # cond (+ uncond) per step


@torch.inference_mode()
def test_health_data_lists_the_shapes_that_hold_graphs():
    transformer = small_transformer()
    _, opt = graphs_stack(transformer, cuda_graph_max_shapes=1)
    calls(transformer, [1, 2])
    assert opt.report().public()["data"]["captured_shapes"] == [[[1, 64, 64], [1, 8, 32]]]  # (hidden, text) inputs
    calls(transformer, [1, 2], tokens=32)
    assert opt.report().data["captured_shapes"] == [[[1, 32, 64], [1, 8, 32]]]  # the other was evicted
    assert opt.report().data["evictions"] == 1
    opt.manager.clear()
    assert opt.report().data["captured_shapes"] == []


class CountingCompiled:
    """A fake ``compiled`` slot content: calls what it wraps and counts the calls."""

    made = 0

    def __init__(self, inner):
        type(self).made += 1
        self.inner = inner
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def nudged_body(module, **kwargs):
    """A ``body`` that computes something else than the class forward (so its output tells it ran)."""
    encoder_out, hidden_out = type(module).forward(module, **kwargs)
    return encoder_out, hidden_out + 0.25


@torch.inference_mode()
def test_slots_compose_body_compiled_graphed_in_order_and_the_cache_hooks_stay_above():
    seeds = [1, 2, 3, 4]
    class_forward = calls(small_transformer(), seeds)
    body_only = small_transformer()
    reference_slots = ForwardSlots()
    for block in blocks(body_only):
        reference_slots.set_body(block, nudged_body)
    with_body = calls(body_only, seeds)
    assert not torch.equal(with_body[0], class_forward[0])

    transformer, slots = small_transformer(), ForwardSlots()
    compiled = {}
    CountingCompiled.made = 0

    def compile_for(block):
        def make(inner):
            compiled[block] = CountingCompiled(inner)
            return compiled[block]

        return make

    for block in blocks(transformer):
        slots.set_body(block, nudged_body)
        slots.set(block, "compiled", compile_for(block))
    manager = GraphManager(RerunBackend(), 4)
    install(transformer, slots, manager)
    assert all(slots.filled(block) == ("body", "compiled", "graphed") for block in blocks(transformer))
    assert CountingCompiled.made == 5  # graphs on top: the compiled forwards below are kept, not rebuilt
    assert_same(calls(transformer, seeds), with_body)  # the graphs capture compiled(body)
    assert manager.counts == {"eager": 5, "captured": 5, "replayed": 10}
    assert all(compiled[block].calls >= 4 for block in blocks(transformer))  # replays run the compiled code

    slots.clear_everywhere("graphed")
    assert all(slots.filled(block) == ("body", "compiled") for block in blocks(transformer))
    manager.reset_counts()
    before = {block: compiled[block].calls for block in blocks(transformer)}
    assert_same(calls(transformer, seeds), with_body)  # unchanged, now without graphs
    assert manager.counts == ZERO_COUNTS and CountingCompiled.made == 5
    assert all(compiled[block].calls == before[block] + 4 for block in blocks(transformer))

    for slot in ("compiled", "body"):
        slots.clear_everywhere(slot)
    assert all(slots.filled(block) == () for block in blocks(transformer))
    assert_same(calls(transformer, seeds), class_forward)
    assert all(compiled[block].calls == before[block] + 4 for block in blocks(transformer))

    # The first-block cache's hooks, installed last, sit above the graphs: its decisions and counts are those of
    # the same body without graphs, while the remaining blocks' graphs replay under it.
    seeds = [1, 1, 2, 2, 2, 3]
    counts = {}
    for name, model in (("graphs", small_transformer()), ("reference", body_only)):
        if name == "graphs":
            layered = ForwardSlots()
            for block in blocks(model):
                layered.set_body(block, nudged_body)
                layered.set(block, "compiled", CountingCompiled)
            manager = GraphManager(RerunBackend(), 4)
            install(model, layered, manager)
            assert all(layered.filled(block) == ("body", "compiled", "graphed") for block in blocks(model))
        cache = FirstBlockCacheControl(model, threshold=0.12)
        with cache.request(None, RequestRun()):
            counts[name] = (calls(model, seeds), cache.summary())
    assert counts["graphs"][1] == counts["reference"][1] and counts["graphs"][1]["skipped"] >= 3
    assert_same(counts["graphs"][0], counts["reference"][0])
    assert manager.counts["replayed"] > 0


@torch.inference_mode()
def test_undoing_graphs_under_the_first_block_cache_keeps_the_cache_working():
    seeds = [1, 1, 1]  # the same input: every call after the first is skipped
    transformer = small_transformer()
    stack, _ = graphs_stack(transformer, with_cache=True)
    with stack.request(job()) as run:
        calls(transformer, seeds)
    assert run.counters["first_block_cache"]["skipped"] == 2
    assert stack.undo_after_failed_warmup(RuntimeError("warm-up broke")) == ["cuda_graphs"]
    with stack.request(job()) as run:
        calls(transformer, seeds)
    assert run.counters["first_block_cache"]["skipped"] == 2
