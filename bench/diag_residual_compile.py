"""The residual LayerNorm op (kernels.residual_ln_mod_fp8) compiled alone against eager, in argument variants: the
GPU test test_the_ops_compile_to_what_they_run_eagerly finds its values differ only with every op in one graph.
Logs, per variant, the fraction of each output's elements that differ (0.0: bit for bit). GPU only:

    python bench/diag_residual_compile.py 2>&1 | tee bench/results/diag-residual-h200-2026-12-02.log
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from flux_kontext.optimizations import kernels  # noqa: E402

log = logging.getLogger("bench.diag_residual_compile")
TEXT, IMAGE, WIDTH, EPS = 16, 48, 3072, 1e-6


def randn(*shape, scale=1.0, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, device="cuda", generator=generator) * scale).bfloat16()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    attn, mlp = randn(1, TEXT + IMAGE, WIDTH, seed=32), randn(TEXT + IMAGE, 4 * WIDTH, scale=3, seed=33)
    shift, scale, gate = (randn(1, WIDTH, scale=0.5, seed=seed) for seed in (30, 31, 34))
    kernels.ops()

    def residual(x, y, gate_):
        return kernels.residual_ln_mod_fp8(x, y, gate_, shift, scale, EPS)

    cases = {
        "test_args(gate=shift, y strided)": lambda a, m: residual(a, m[:, :WIDTH], shift),
        "gate distinct, y strided": lambda a, m: residual(a, m[:, :WIDTH], gate),
        "gate=shift, y contiguous": lambda a, m: residual(a, m[:, :WIDTH].contiguous(), shift),
        "distinct, contiguous": lambda a, m: residual(a, m[:, :WIDTH].contiguous(), gate),
        "with ln_mod on attn too": lambda a, m: (
            *kernels.ln_mod_fp8(a[:, :TEXT], a[:, TEXT:], shift, scale, EPS),
            *residual(a, m[:, :WIDTH], shift),
        ),
    }
    for name, fn in cases.items():
        torch._dynamo.reset()
        eager = fn(attn, mlp)
        compiled = torch.compile(fn, fullgraph=True)(attn, mlp)
        differing = [float((g.float() != w.float()).float().mean()) for g, w in zip(compiled, eager, strict=True)]
        log.info("%s fraction differing per output: %s", name, differing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
