"""The row kernels (flux_kontext/optimizations/kernels) against an earlier version of themselves, on one GPU (#18).

For the 1024² text-to-image shapes (512 text + 4,096 image tokens, 3,072 wide, 24 heads): each kernel of this tree
and the same kernel from ``--before DIR`` (a directory holding earlier gelu.py / layer_norm.py / rope.py, e.g.
``git show main:flux_kontext/optimizations/kernels/gelu.py > DIR/gelu.py``), timed as raw Triton launches (median of
CUDA-event timings, inputs rotated so the L2 holds none of them), with what each agrees on: FP8 codes that differ from
the earlier kernel and from the PyTorch reference, scale error. Variants: the GELU kernels (rows in two pieces, with
and without the approximate exp2 / reciprocal, and the padded kernel), the LayerNorm kernel at 4 and 8 warps, the
RMSNorm + RoPE kernel at 1, 2, 4 and 8 tokens per program. Timing: CUDA events around each launch, so the host's
launch of a raw Triton kernel (tens of µs) is inside every figure: compare variants, not absolute times.

    python bench/kernels_rows.py --before /tmp/kernels-main --out bench/results/kernels-rows-h200.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from flux_kontext.optimizations.kernels import gelu, layer_norm, rope  # noqa: E402
from flux_kontext.optimizations.kernels.e4m3 import quantize_static  # noqa: E402

log = logging.getLogger("bench.kernels_rows")
TEXT, IMAGE, WIDTH, HEADS, EPS = 512, 4096, 3072, 24, 1e-6
ROTATE = 4  # input sets per case, so each launch reads from HBM (4 x the largest case is well above the 60 MB L2)


def _load_before(directory: Path | None, name: str):
    """The earlier module ``name`` from ``directory`` (None where not given or not there)."""
    if directory is None or not (directory / f"{name}.py").exists():
        return None
    spec = importlib.util.spec_from_file_location(f"before_{name}", directory / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _randn(*shape, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to("cuda", torch.bfloat16)


def _us(fn, inputs: list, repeats: int = 30) -> float:
    """Median µs of ``fn(*inputs[i])`` launches, cycling through the input sets."""
    for args in inputs:
        fn(*args)
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = inputs[i % len(inputs)]
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return round(statistics.median(times), 2)


def _codes(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() != b.float()).float().mean())


def _agreement(got, want) -> dict:
    (values, scale), (ref_values, ref_scale) = got, want
    ref_scale = ref_scale.reshape(scale.shape)
    return {
        "codes_differing": _codes(values, ref_values.reshape(values.shape)),
        "scale_max_rel_diff": float(((scale - ref_scale) / ref_scale).abs().max()),
    }


def bench_gelu(before) -> dict:
    new = gelu.build(lambda kernel, raw: kernel)
    old = before.build(lambda kernel, raw: kernel) if before else None
    cases = {
        "single_block_4608x(3072+12288)": [
            (_randn(TEXT + IMAGE, WIDTH, seed=i), _randn(TEXT + IMAGE, 4 * WIDTH, scale=3, seed=10 + i), True)
            for i in range(ROTATE)
        ],
        "feed_forward_4096x12288": [
            (m, m, False) for m in (_randn(IMAGE, 4 * WIDTH, scale=3, seed=20 + i) for i in range(ROTATE))
        ],
    }
    result = {}
    for label, inputs in cases.items():
        attn, mlp, has_attn = inputs[0]
        reference = gelu.reference_gelu_fp8(attn if has_attn else None, mlp)
        row = {"bytes_mb": round((attn.numel() * has_attn + mlp.numel()) * 3 / 1e6, 1)}
        launch = new["launch_gelu_fp8"]
        variants = (("split", True, True), ("split_exact_math", True, False), ("padded", False, True))
        for variant, split, fast in variants:
            got = launch(attn, mlp, has_attn, raw=True, fast=fast, split=split)
            row[f"{variant}_us"] = _us(
                lambda a, m, h, f=fast, p=split, run=launch: run(a, m, h, raw=True, fast=f, split=p), inputs
            )
            row[f"{variant}_vs_reference"] = _agreement(got, reference)
            if old:
                row[f"{variant}_codes_differing_from_before"] = _codes(got[0], old["launch_gelu_fp8"](*inputs[0])[0])
        row["default"] = "split" if gelu.GELU_SPLIT[has_attn] else "padded"
        if old:
            row["before_us"] = _us(lambda a, m, h: old["launch_gelu_fp8"](a, m, h, raw=True), inputs)
            row["before_vs_reference"] = _agreement(old["launch_gelu_fp8"](*inputs[0]), reference)
            row["speedup_of_default"] = round(row["before_us"] / row[f"{row['default']}_us"], 3)
        result[label] = row
        log.info("gelu %s: %s", label, row)
    return result


def bench_layer_norm(before) -> dict:
    new = layer_norm.build(lambda kernel, raw: kernel)
    old = before.build(lambda kernel, raw: kernel) if before else None
    inputs = [
        (
            _randn(1, TEXT, WIDTH, seed=30 + i),
            _randn(1, IMAGE, WIDTH, scale=4, seed=40 + i),
            _randn(1, WIDTH, scale=0.5, seed=50 + i),
            _randn(1, WIDTH, scale=0.5, seed=60 + i),
        )
        for i in range(ROTATE)
    ]
    first, second, shift, scale = inputs[0]
    reference = layer_norm.reference_ln_mod_fp8(first, second, shift, scale, EPS)
    got = new["launch_ln_mod_fp8"](first, second, shift, scale, True, EPS, raw=True)
    row = {"bytes_mb": round((TEXT + IMAGE) * WIDTH * 3 / 1e6, 1), "new_vs_reference": _agreement(got, reference)}
    # (the run of 2026-12-01 measured a LayerNorm kernel in two pieces here: 83 / 79 µs at 4 / 8 warps against 79;
    # not kept, so this tree's kernel is the earlier one)
    for warps in (4, 8):
        row[f"new_{warps}_warps_us"] = _us(
            lambda f, s, sh, sc, w=warps: new["launch_ln_mod_fp8"](f, s, sh, sc, True, EPS, raw=True, num_warps=w),
            inputs,
        )
    if old:
        before_got = old["launch_ln_mod_fp8"](first, second, shift, scale, True, EPS, raw=True)
        row["codes_differing_from_before"] = _codes(got[0], before_got[0])
        row["before_vs_reference"] = _agreement(before_got, reference)
        row["before_us"] = _us(lambda f, s, sh, sc: old["launch_ln_mod_fp8"](f, s, sh, sc, True, EPS, raw=True), inputs)
        row["speedup"] = round(row["before_us"] / row["new_4_warps_us"], 3)
    log.info("layer_norm: %s", row)
    return row


def bench_rope(before) -> dict:
    new = rope.build(lambda kernel, raw: kernel)
    old = before.build(lambda kernel, raw: kernel) if before else None
    angles = (_randn(TEXT + IMAGE, 64, seed=70).float() * 3).repeat_interleave(2, dim=1)
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    norms = [1 + 0.1 * _randn(128, seed=s) for s in (71, 72, 73, 74)]
    scales = torch.tensor([0.02, 0.02], device="cuda")
    inputs = [
        (_randn(1, TEXT, 3 * WIDTH, seed=80 + i), _randn(1, IMAGE, 3 * WIDTH, seed=90 + i)) for i in range(ROTATE)
    ]

    def call(module, text, image, **kw):
        return module["launch_qk_norm_rope"](
            text, image, *norms, cos, sin, scales, True, HEADS, EPS, True, raw=True, **kw
        )

    text, image = inputs[0]
    ref = rope.reference_qk_norm_rope(text, image, norms[:2], norms[2:], (cos, sin), HEADS, EPS, None)
    ref_q8 = quantize_static(ref[0], scales[0])
    row = {"bytes_mb": round((TEXT + IMAGE) * WIDTH * (3 * 2 + 2 + 2 + 1) / 1e6, 1)}
    base = call(new, text, image, rows=1)
    for rows in (1, 2, 4, 8):
        got = call(new, text, image, rows=rows)
        row[f"rows_{rows}_us"] = _us(lambda t, i, r=rows: call(new, t, i, rows=r), inputs)
        row[f"rows_{rows}_identical_to_rows_1"] = all(
            torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype.itemsize == 1 else torch.equal(a, b)
            for a, b in zip(got, base, strict=True)
        )
    row["q_codes_differing_from_reference"] = _codes(base[0], ref_q8)
    if old:
        before_got = call(old, text, image)
        row["before_us"] = _us(lambda t, i: call(old, t, i), inputs)
        row["codes_differing_from_before"] = {n: _codes(a, b) for n, a, b in zip("qkv", base, before_got, strict=False)}
        row["v_descale_equal_to_before"] = bool(torch.equal(base[3], before_got[3]))
        default = f"rows_{rope.QK_ROWS_PER_PROGRAM}_us"
        row["speedup_at_default_rows"] = round(row["before_us"] / row[default], 3)
    log.info("qk_norm_rope_fp8 (with v to e4m3): %s", row)
    return row


@torch.inference_mode()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="directory with the earlier gelu.py, layer_norm.py, rope.py")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    kernels = (("gelu_fp8", "gelu", bench_gelu), ("ln_mod_fp8", "layer_norm", bench_layer_norm))
    for name, module, fn in (*kernels, ("qk_norm_rope_fp8", "rope", bench_rope)):
        try:
            result[name] = fn(_load_before(args.before, module))
        except Exception as exc:  # keep the other kernels' numbers
            log.exception("%s failed", name)
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
