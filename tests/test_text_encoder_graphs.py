"""text_encoder_graphs: CLIP's and T5's forward replayed from a captured graph. On the CPU the capture is a stand-in
that records the call and replays it into the same static outputs (what a CUDA graph does), so the wrapper's logic
(static inputs, cloned outputs, which calls replay, undo) is tested through the pipeline's own encode_prompt; the
real CUDA capture runs in the GPU test at the end."""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_flatten

from flux_kontext.models import build_random_pipeline
from flux_kontext.optimizations import text_encoder_graphs as graphs_module
from flux_kontext.settings import Settings
from flux_kontext.stack import Hardware, stack_for
from flux_kontext.stack.protocol import Model
from flux_kontext.stack.slots import ForwardSlots


def replaying_capture(fn):
    """Like CudaGraphBackend.capture: outputs allocated once; each replay recomputes into those same tensors."""
    outputs = fn()

    def replay():
        fresh, _ = tree_flatten(fn())
        static, _ = tree_flatten(outputs)
        for into, value in zip(static, fresh, strict=True):
            if isinstance(into, torch.Tensor):
                into.copy_(value)

    return replay, outputs


def encode(pipe, prompt):
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=64)
    return embeds, pooled


def apply_graphs(pipe, monkeypatch, faster_by: float):
    monkeypatch.setattr(graphs_module, "FASTER_BY", faster_by)
    [optimization] = stack_for(Settings(model="tiny"), only=["text_encoder_graphs"])
    model = Model(pipe=pipe, slots=ForwardSlots(), hardware=Hardware("cpu"))
    outcome = optimization.apply_with(model, replaying_capture, lambda: None, device_type="cpu")
    return optimization, outcome


@pytest.fixture
def pipe():
    pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_graphed_encoders_give_the_eager_bytes_and_count_their_replays(pipe, monkeypatch):
    before = encode(pipe, "a red barn in snow")
    other_before = encode(pipe, "a lighthouse at dusk")
    optimization, outcome = apply_graphs(pipe, monkeypatch, faster_by=1e6)  # any replay time is kept

    assert outcome.status == "applied", outcome.detail
    assert set(outcome.data["encoders"]) == {"CLIP", "T5"}
    assert all(m["kept"] and m["same_bytes"] for m in outcome.data["encoders"].values())
    assert outcome.data["encoders"]["T5"]["tokens"] == 64  # the tiny model's T5 length, CLIP's 77
    assert outcome.data["encoders"]["CLIP"]["tokens"] == 77
    after, other_after = encode(pipe, "a red barn in snow"), encode(pipe, "a lighthouse at dusk")
    for eager, graphed in ((before, after), (other_before, other_after)):
        assert all(torch.equal(a, b) for a, b in zip(eager, graphed, strict=True))
    # The second prompt's embeddings are its own: the first's were cloned out, not left in the static buffers.
    assert not torch.equal(after[0], other_after[0])
    # Two calls each since apply (its own measuring calls are not counted).
    assert (pipe.text_encoder.forward.replays, pipe.text_encoder_2.forward.replays) == (2, 2)


def test_a_call_the_graph_was_not_captured_for_runs_eager(pipe, monkeypatch):
    apply_graphs(pipe, monkeypatch, faster_by=1e6)
    t5 = pipe.text_encoder_2.forward
    replays, eager = t5.replays, t5.eager_calls
    ids = torch.randint(0, 100, (2, 64))  # a batch of two prompts
    out = pipe.text_encoder_2(ids, output_hidden_states=False)[0]
    assert out.shape[0] == 2
    assert (t5.replays, t5.eager_calls) == (replays, eager + 1)
    pipe.text_encoder_2(ids[:1], output_hidden_states=True)  # other arguments: eager too
    pipe.text_encoder_2(ids[:1], attention_mask=torch.ones_like(ids[:1]))  # a tensor argument: eager, not an error
    assert t5.eager_calls == eager + 3


def test_a_graph_not_faster_than_eager_is_not_kept(pipe, monkeypatch):
    # The stand-in's replay recomputes the forward and copies: never 1000x faster than the eager call.
    optimization, outcome = apply_graphs(pipe, monkeypatch, faster_by=1e-3)
    assert outcome.status == "skipped"
    assert "CLIP eager: not faster" in outcome.detail and "T5 eager: not faster" in outcome.detail
    assert "forward" not in pipe.text_encoder.__dict__ and "forward" not in pipe.text_encoder_2.__dict__


def test_undo_restores_the_eager_forward(pipe, monkeypatch):
    optimization, _ = apply_graphs(pipe, monkeypatch, faster_by=1e6)
    optimization.undo()
    assert "forward" not in pipe.text_encoder.__dict__ and "forward" not in pipe.text_encoder_2.__dict__
    assert optimization.status == "skipped"
    embeds, _ = encode(pipe, "a cat")
    assert embeds.shape[1] == 64


def test_an_encoder_off_the_gpu_stays_eager_and_the_report_says_why(pipe):
    [optimization] = stack_for(Settings(model="tiny"), only=["text_encoder_graphs"])
    model = Model(pipe=pipe, slots=ForwardSlots(), hardware=Hardware("cpu"))
    outcome = optimization.apply_with(model, replaying_capture, lambda: None)  # wants CUDA weights
    assert outcome.status == "skipped"
    assert "T5 eager: its weights are not on the GPU" in outcome.detail


def test_a_forward_that_cannot_be_captured_is_reported_and_left_eager(pipe):
    def failing_capture(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    [optimization] = stack_for(Settings(model="tiny"), only=["text_encoder_graphs"])
    model = Model(pipe=pipe, slots=ForwardSlots(), hardware=Hardware("cpu"))
    outcome = optimization.apply_with(model, failing_capture, lambda: None, device_type="cpu")
    assert outcome.status == "skipped"
    assert "capture failed: RuntimeError: operation not permitted" in outcome.detail
    assert "forward" not in pipe.text_encoder_2.__dict__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_on_the_gpu_the_captured_graphs_give_the_eager_bytes(monkeypatch):
    pipe = build_random_pipeline(tiny=True, device=torch.device("cuda"), dtype=torch.bfloat16)
    before = encode(pipe, "a red barn in snow")
    monkeypatch.setattr(graphs_module, "FASTER_BY", 1e6)  # the tiny encoders: keep the graph whatever it measures
    [optimization] = stack_for(Settings(model="tiny"), only=["text_encoder_graphs"])
    report = optimization.apply(Model(pipe=pipe, slots=ForwardSlots(), hardware=Hardware("cuda", (9, 0))))
    assert report.status == "applied", report.detail
    after = encode(pipe, "a red barn in snow")
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert pipe.text_encoder_2.forward.replays == 1
