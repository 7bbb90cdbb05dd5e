"""text_encoder_graphs: CLIP's and T5's forward replayed as CUDA graphs at the one shape the pipeline calls them with.

For each new prompt the pipeline runs CLIP on 77 tokens and T5-XXL on ``max_sequence_length`` tokens (padded: always
the same length), once each, eagerly: T5 alone is about 24 layers x 30 kernels launched from Python, and at batch one
the GPU finishes each small GEMM before the host has launched the next. One CUDA graph per encoder, captured at start
for a batch of one, replays the same kernels in one launch: the same bytes out, no host time per kernel.

Decided by measurement at start, per encoder: the graph is kept only where its replay is faster than the eager call
and gives the same bytes (both in the report); otherwise that encoder stays eager and the report says why. Only an
encoder whose weights live on the GPU is graphed: T5 visiting the GPU per prompt (memory plan tier 2 or 3) or an
encoder on the CPU keeps its eager call. Any other call (a batch of several prompts, other arguments) runs eager.
No request flag: a request cannot tell the two apart except by the time.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

from flux_kontext.stack import APPLY, Decision, Hardware, Model, Optimization, Outcome, skip

log = logging.getLogger(__name__)

CLIP_TOKENS = 77  # CLIP's context length: the pipeline pads every prompt to it
FASTER_BY = 0.95  # a graph is kept when its replay takes at most this fraction of the eager call
TIMING_REPEATS = 5


class GraphedEncoder:
    """A text encoder's ``forward`` that replays one captured CUDA graph for ``(1, tokens)`` input ids.

    ``capture(fn)`` is the backend's: it runs ``fn`` once to warm up, captures it, and returns (replay, outputs),
    like ``graph_capture.CudaGraphBackend.capture``. The static outputs are cloned on the way out: the next replay
    overwrites them.
    """

    def __init__(self, module: torch.nn.Module, tokens: int, capture: Callable):
        self.module = module
        self.tokens = tokens
        self.eager = module.forward  # the bound method (or an earlier wrapper) it replaces
        self.replays = self.eager_calls = 0
        device = next(module.parameters()).device
        self._ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
        self._replay, self._outputs = capture(lambda: self.eager(self._ids, output_hidden_states=False))

    def matches(self, input_ids, args: tuple, kwargs: dict) -> bool:
        """The call the graph was captured for: ids of shape (1, tokens) and no other inputs."""
        if args or any(value is not None and value is not False for value in kwargs.values()):
            return False
        return (
            isinstance(input_ids, torch.Tensor)
            and tuple(input_ids.shape) == (1, self.tokens)
            and input_ids.dtype == self._ids.dtype
        )

    def __call__(self, input_ids=None, *args, **kwargs):
        if not self.matches(input_ids, args, kwargs):
            self.eager_calls += 1
            return self.eager(input_ids, *args, **kwargs)
        with torch.inference_mode():  # the static tensors were made under it (apply runs there)
            self._ids.copy_(input_ids, non_blocking=True)
            self._replay()
            outputs = _cloned(self._outputs)
        self.replays += 1
        return outputs

    def install(self) -> None:
        self.module.forward = self

    def uninstall(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.forward  # back to the class's forward (or the instance's earlier one, kept as eager)
            if getattr(self.eager, "__self__", None) is not self.module:
                self.module.forward = self.eager


def _cloned(outputs):
    """The outputs with every tensor copied (a transformers ModelOutput is a registered pytree node)."""
    return tree_map_only(torch.Tensor, torch.Tensor.clone, outputs)


def _same(a, b) -> bool:
    """Bitwise equal outputs: the same structure, tensors equal by torch.equal (shapes included), the rest by ==."""
    (leaves_a, spec_a), (leaves_b, spec_b) = tree_flatten(a), tree_flatten(b)
    return spec_a == spec_b and all(map(_same_leaf, leaves_a, leaves_b))


def _same_leaf(x, y) -> bool:
    tensors = isinstance(x, torch.Tensor), isinstance(y, torch.Tensor)
    return all(tensors) and torch.equal(x, y) if any(tensors) else x == y


def _milliseconds(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Median wall milliseconds of ``fn`` to its result on the device (the host's launch time included)."""
    fn()
    sync()
    samples = []
    for _ in range(TIMING_REPEATS):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1000)
    return sorted(samples)[len(samples) // 2]


class TextEncoderGraphs(Optimization):
    name = "text_encoder_graphs"
    undoable = True

    def __init__(self, settings):
        super().__init__(settings)
        self._graphed: list[GraphedEncoder] = []

    def decide(self, hardware: Hardware) -> Decision:
        if not self.settings.text_encoder_graphs:
            return skip("FLUX_TEXT_ENCODER_GRAPHS=false")
        if not hardware.is_cuda:
            return skip("CUDA graphs need a GPU")
        return APPLY

    def apply(self, model: Model) -> Outcome:
        from flux_kontext.optimizations.graph_capture import CudaGraphBackend

        return self.apply_with(model, CudaGraphBackend().capture, torch.cuda.synchronize)

    def apply_with(
        self, model: Model, capture: Callable, sync: Callable[[], None], device_type: str = "cuda"
    ) -> Outcome:
        """``apply`` with the capture backend, the device sync and the weights' device given (the CPU tests pass
        stand-ins)."""
        pipe = model.pipe
        tokens = int(getattr(pipe, "tokenizer_max_length", CLIP_TOKENS) or CLIP_TOKENS)
        candidates = [("CLIP", getattr(pipe, "text_encoder", None), tokens)]
        candidates.append(("T5", getattr(pipe, "text_encoder_2", None), self._t5_tokens(pipe)))
        measured: dict[str, dict] = {}
        eager_reasons: list[str] = []
        for label, module, length in candidates:
            why_not = _why_not_graphable(module, device_type)
            if why_not:
                eager_reasons.append(f"{label} eager: {why_not}")
                continue
            outcome = self._graph_one(label, module, length, capture, sync)
            measured[label] = outcome
            if not outcome["kept"]:
                eager_reasons.append(f"{label} eager: {outcome['why']}")
        if not self._graphed:
            return Outcome.skipped("; ".join(eager_reasons) or "no text encoder found")
        kept = ", ".join(
            f"{label} {m['tokens']} tokens {m['eager_ms']:.1f} -> {m['graphed_ms']:.1f} ms"
            for label, m in measured.items()
            if m["kept"]
        )
        rest = f"; {'; '.join(eager_reasons)}" if eager_reasons else ""
        return Outcome.applied(
            f"one CUDA graph per text encoder at batch 1, same bytes as eager ({kept}, measured at start){rest}; "
            "other calls eager",
            encoders=measured,
        )

    def _t5_tokens(self, pipe) -> int:
        """The length the pipeline pads T5's ids to: FLUX_MAX_SEQUENCE_LENGTH, else the model's (its tokenizer's)."""
        from flux_kontext.models import FULL_MAX_SEQUENCE_LENGTH

        if self.settings.max_sequence_length:
            return self.settings.max_sequence_length
        tokenizer = getattr(pipe, "tokenizer_2", None)
        length = getattr(tokenizer, "model_max_length", None)
        return (
            length if isinstance(length, int) and 0 < length <= FULL_MAX_SEQUENCE_LENGTH else FULL_MAX_SEQUENCE_LENGTH
        )

    def _graph_one(self, label: str, module, tokens: int, capture: Callable, sync) -> dict:
        record: dict[str, Any] = {"tokens": tokens}
        vocab = int(getattr(module.config, "vocab_size", 2) or 2)
        ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
        ids = ids.to(next(module.parameters()).device)
        with torch.inference_mode():
            try:
                graphed = GraphedEncoder(module, tokens, capture)
            except Exception as exc:  # a kernel that cannot be captured (a host sync inside the forward)
                log.warning("text_encoder_graphs: %s could not be captured: %s", label, exc)
                return {**record, "kept": False, "why": f"capture failed: {type(exc).__name__}: {exc}"[:300]}
            eager_out = graphed.eager(ids, output_hidden_states=False)
            graphed_out = graphed(ids)
            same = _same(eager_out, graphed_out)
            eager_ms = _milliseconds(lambda: graphed.eager(ids, output_hidden_states=False), sync)
            graphed_ms = _milliseconds(lambda: graphed(ids), sync)
        graphed.replays = graphed.eager_calls = 0  # the report counts requests' calls, not these
        record.update(eager_ms=round(eager_ms, 2), graphed_ms=round(graphed_ms, 2), same_bytes=same)
        if not same:
            return {**record, "kept": False, "why": "the graph's output differs from the eager call's"}
        if graphed_ms > eager_ms * FASTER_BY:
            return {**record, "kept": False, "why": f"not faster ({eager_ms:.1f} -> {graphed_ms:.1f} ms)"}
        graphed.install()
        self._graphed.append(graphed)
        return {**record, "kept": True}

    def undo(self) -> None:
        for graphed in self._graphed:
            graphed.uninstall()
        self._graphed.clear()
        self._record("skipped", "undone after a failed warm-up")

    @contextlib.contextmanager
    def active(self, job, run):
        try:
            yield
        finally:  # what the report shows: replays of each graph, and the calls that ran eager instead
            self._note(
                calls={type(g.module).__name__: {"replayed": g.replays, "eager": g.eager_calls} for g in self._graphed}
            )


def _why_not_graphable(module, device_type: str) -> str | None:
    if module is None:
        return "not in this pipeline"
    params = list(module.parameters())
    if not params:
        return "no weights"
    if any(param.device.type != device_type for param in params):
        return "its weights are not on the GPU (memory plan: it visits per prompt, or runs on the CPU)"
    if getattr(module, "_hf_hook", None) is not None or module._forward_pre_hooks:
        return "hooks move its weights per call (offloading)"
    return None
