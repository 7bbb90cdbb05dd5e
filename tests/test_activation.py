"""tanh-GELU in sigmoid form: the same function as PyTorch's, swapped into every block, only for compiled code."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flux_kontext.models import build_random_pipeline
from flux_kontext.optimizations.gelu_sigmoid_form import SigmoidFormGELU, replace_tanh_gelus, tanh_gelu
from flux_kontext.settings import Settings
from flux_kontext.stack import Hardware, stack_for
from tests.test_optimizations import tiny_pipe_with_reference


def test_sigmoid_form_is_the_tanh_gelu():
    x = torch.cat([torch.linspace(-12, 12, 10001), torch.randn(10000) * 3])
    torch.testing.assert_close(tanh_gelu(x), F.gelu(x, approximate="tanh"), rtol=2e-6, atol=2e-6)
    # bf16 in, bf16 out, computed in fp32: at most one bf16 rounding step apart from PyTorch's kernel.
    xb = x.bfloat16()
    torch.testing.assert_close(tanh_gelu(xb), F.gelu(xb, approximate="tanh"), rtol=8e-3, atol=1e-5)
    assert tanh_gelu(xb).dtype == torch.bfloat16
    assert not torch.allclose(tanh_gelu(x), F.gelu(x), rtol=1e-5, atol=1e-5)  # it is the tanh one, not erf


@torch.inference_mode()
def test_every_block_gelu_is_replaced_and_the_transformer_output_holds():
    pipe, kwargs, reference = tiny_pipe_with_reference(2)
    transformer = pipe.transformer
    # per double block: the image and the context feed-forward; per single block: its MLP
    expected = 2 * len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert replace_tanh_gelus(transformer) == expected
    assert all(isinstance(b.act_mlp, SigmoidFormGELU) for b in transformer.single_transformer_blocks)
    assert replace_tanh_gelus(transformer) == 0  # nothing left to replace
    torch.testing.assert_close(transformer(**kwargs)[0], reference, rtol=1e-5, atol=1e-5)


def test_it_is_only_applied_for_compiled_gpu_code():
    pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)

    def apply(hardware, **settings):
        [report] = stack_for(Settings(model="tiny", **settings), only=["gelu_sigmoid_form"]).apply(pipe, hardware)
        return report

    hopper = Hardware("cuda", (9, 0))
    assert apply(Hardware("cpu")).status == "skipped"
    off = apply(hopper, gelu_sigmoid_form=False)
    assert off.status == "skipped" and "FLUX_GELU_SIGMOID_FORM" in off.detail
    assert apply(hopper, compile=False).status == "skipped"
    applied = apply(hopper)
    assert applied.status == "applied" and applied.detail.startswith("3 tanh-GELUs")
