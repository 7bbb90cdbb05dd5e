"""LoRA's side path inside the fused FP8 blocks (fp8_blocks.fp8_linear / fp8_linears, lora_gemm.py) on the tiny
transformer as the GPU stack leaves it (CPU: the kernels' references and CPU FP8 GEMMs stand in for the GPU's):
against the forward hook's path on the same FP8 layers, scale 0 bit for bit, and under torch.compile."""

from __future__ import annotations

import pytest
import torch

from flux_kontext.jobs import Job
from flux_kontext.optimizations.fuse_qkv import UNFUSED
from flux_kontext.settings import Settings
from flux_kontext.stack import stack_for
from tests.lora_files import peft_lora
from tests.test_fused_fp8 import HOPPER, _fp8_tiny_transformer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fused-loras")
    return [f"style={peft_lora(folder / 'style', seed=1)}", f"light={peft_lora(folder / 'light', seed=3, rank=8)}"]


def fused_with_lora(adapters, seed: int = 0, compiled: bool = False):
    transformer, pipe, kwargs, _ = _fp8_tiny_transformer(seed)
    for module in transformer.modules():  # as fuse_qkv serves it: only the fused q|k|v layers remain
        for name in UNFUSED:
            if isinstance(getattr(module, name, None), torch.nn.Linear):
                setattr(module, name, None)
    names = ["fused_gelu_fp8", "fused_norm_rope", "lora", *(["compile"] if compiled else [])]
    stack = stack_for(Settings(model="tiny", loras=adapters, lora_max_per_request=2), only=names)
    stack.apply(pipe, HOPPER)

    def run(loras=()):
        with stack.request(Job(prompt="x", seed=0, loras=tuple(loras))), torch.inference_mode():
            return transformer(**kwargs)[0].clone()

    return stack, run


def test_fused_blocks_add_the_adapter_from_their_fp8_activations_as_the_layers_hooks_do(adapters):
    stack, run = fused_with_lora(adapters)
    report = stack["lora"].report().public()
    assert report["status"] == "applied", report
    singles = 1  # the tiny transformer's single blocks: each shares one down projection for proj_mlp and to_qkv
    assert f"{singles} shared by two layers" in report["detail"] and "A in e4m3" in report["detail"]
    # The up projection's kernel is chosen by measurement on the GPU; /health says why not here.
    assert report["data"]["up_projection"] == {"kernel": "cublas addmm_", "why": "not a CUDA device"}
    none, zero = run(), run([("style", 0.0), ("light", 0.0)])
    assert torch.equal(zero, none)  # scale 0: the base bit for bit, through the side path's own GEMM call
    style, both = run([("style", 1.0)]), run([("style", 1.0), ("light", -0.7)])
    assert torch.equal(run(), none) and torch.equal(run([("style", 1.0)]), style)  # no leakage between requests

    stack.slots.clear_everywhere("body")  # diffusers' forwards on the same FP8 layers: the forward hooks' side path
    hook_none = run()
    assert rel(hook_none, none) < 1e-5  # the same base either way
    for fused, choice in ((style, [("style", 1.0)]), (both, [("style", 1.0), ("light", -0.7)])):
        effect, hook_effect = fused - none, run(choice) - hook_none
        assert rel(fused, none) > 0.05  # the adapter does move the output
        # The fused path's A is in e4m3 (an FP8-sized error on the adapter's contribution only); the hooks' is not.
        assert rel(effect, hook_effect) < 0.15, rel(effect, hook_effect)  # measured 5-6% here


def test_the_fused_side_path_compiles_once_and_a_switch_between_adapters_compiles_nothing(adapters):
    from flux_kontext.optimizations.compile import graphs_compiled

    _, eager = fused_with_lora(adapters, seed=1)
    _, compiled = fused_with_lora(adapters, seed=1, compiled=True)
    choices = {"none": [], "style": [("style", 1.0)], "light": [("light", 0.5)]}
    expected = {label: eager(choice) for label, choice in choices.items()}
    compiled(choices["none"]), compiled(choices["style"])  # both variants compiled (as warm-up does)
    before = graphs_compiled()
    for label in ["light", "style", "none", "light"]:
        assert rel(compiled(choices[label]), expected[label]) < 1e-5, label
    assert graphs_compiled() == before
