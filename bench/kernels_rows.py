"""The row kernels (flux_kontext/optimizations/kernels) against an earlier version of themselves and against their
variants, on one GPU (#18).

For the 1024² text-to-image shapes (512 text + 4,096 image tokens, 3,072 wide, 24 heads): each kernel variant of this
tree and the same kernel from ``--before DIR`` (a directory holding earlier gelu.py / layer_norm.py / rope.py, e.g.
``git show main:flux_kontext/optimizations/kernels/gelu.py > DIR/gelu.py``), timed as raw Triton launches inside a
CUDA graph (µs per launch: a graph of ``LAUNCHES`` launches cycling through ``ROTATE`` input sets so the L2 holds none
of them, replayed; the median replay over the launches: the GPU time a graphed step sees, no host launch in it), with
what each agrees on: FP8 codes that differ from the earlier kernel and from the PyTorch reference, scale error.

Variants: GELU + FP8 (the two-pass kernel at several tile widths and warps, the row-in-registers kernels in two
pieces and padded); LayerNorm + modulation + FP8 at 1 / 2 / 4 / 8 warps; RMSNorm + RoPE in FP8 with v to e4m3 at 1
and 2 tokens per program, at 1 / 2 / 4 / 8 warps, in head groups of 8 / 4 / 2 heads per program (24 heads: no padded
head) and with v's kernel at 1 / 2 / 8 warps; the double blocks' gated residual fused into the LayerNorm kernel (1
to 8 warps) against main's Inductor add/mul + ln_mod_fp8 (both compiled), and their joint attention output quantized
once (rows_fp8) against torchao's quantization per stream, GEMMs included (both compiled; rows_fp8 alone at 1 to 8
warps; ``--only`` picks benches). ``best`` names each case's fastest variant (gelu.py's tables are set from it).
Runs before 2026-12-01's fourth session timed one launch between CUDA events, host launch included (BENCHMARKS.md
#18); that session's run also measured a LayerNorm kernel with several rows per program and a RoPE kernel on
interleaved pairs, at this script's commit de10500 (not kept: BENCHMARKS.md #18).

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

from flux_kontext.optimizations import kernels  # noqa: E402
from flux_kontext.optimizations.kernels import gelu, layer_norm, rope  # noqa: E402

log = logging.getLogger("bench.kernels_rows")
TEXT, IMAGE, WIDTH, HEADS, EPS = 512, 4096, 3072, 24, 1e-6
DEVICE = "cuda"
ROTATE = 4  # input sets per case, so each launch reads from HBM (4 x the largest case is well above the 60 MB L2)
LAUNCHES = 24  # launches per graph


def _load_before(directory: Path | None, name: str):
    """The earlier module ``name`` from ``directory`` (None where not given or not there)."""
    if directory is None or not (directory / f"{name}.py").exists():
        return None
    spec = importlib.util.spec_from_file_location(f"before_{name}", directory / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _randn(*shape, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)


def _us(fn, inputs: list, replays: int = 7) -> float:
    """µs per launch of ``fn(*inputs[i])`` inside a CUDA graph of LAUNCHES launches cycling through the input sets
    (median of ``replays`` timed replays)."""
    for args in inputs:  # compiles, outside the capture
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(LAUNCHES):
            fn(*inputs[i % len(inputs)])
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / LAUNCHES)
    del graph
    return round(statistics.median(times), 2)


def _codes(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() != b.float().reshape(a.shape)).float().mean())


def _agreement(got, want) -> dict:
    (values, scale), (ref_values, ref_scale) = got[:2], want[:2]
    ref_scale = ref_scale.reshape(scale.shape)
    return {
        "codes_differing": _codes(values, ref_values.reshape(values.shape)),
        "scale_max_rel_diff": float(((scale - ref_scale) / ref_scale).abs().max()),
    }


def _variants(row: dict, variants: dict, inputs: list, check) -> None:
    """Time each variant (``name: fn(*args)``) into ``row``, with ``check(output)``'s agreement; one failing
    variant is recorded and the others still run."""
    for name, fn in variants.items():
        try:
            row[f"{name}_us"] = _us(fn, inputs)
            row[f"{name}_agreement"] = check(fn(*inputs[0]))
        except Exception as exc:  # keep the other variants' numbers
            log.exception("variant %s failed", name)
            row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:400]
    timed = {k.removesuffix("_us"): v for k, v in row.items() if k.endswith("_us")}
    row["best"] = min(timed, key=timed.get) if timed else None


def bench_gelu(before) -> dict:
    new = gelu.build(lambda kernel, raw: kernel)["launch_gelu_fp8"]
    old = before.build(lambda kernel, raw: kernel)["launch_gelu_fp8"] if before else None
    cases = {
        "single_block_4608x(3072+12288)": (TEXT + IMAGE, True),
        "feed_forward_image_4096x12288": (IMAGE, False),
        "feed_forward_text_512x12288": (TEXT, False),
    }
    result = {}
    for label, (rows, has_attn) in cases.items():
        inputs = []
        for i in range(ROTATE):
            mlp = _randn(rows, 4 * WIDTH, scale=3, seed=10 + i)
            inputs.append((_randn(rows, WIDTH, seed=i) if has_attn else mlp, mlp, has_attn))
        attn, mlp, _ = inputs[0]
        reference = gelu.reference_gelu_fp8(attn if has_attn else None, mlp)
        split = new(attn, mlp, has_attn, raw=True, variant="split")

        def check(got, reference=reference, split=split):
            return {**_agreement(got, reference), "codes_differing_from_split": _codes(got[0], split[0])}

        variants = {}
        if old:
            variants["before"] = lambda a, m, h: old(a, m, h, raw=True)
        for block, warps in ((1024, 2), (1024, 4), (2048, 2), (2048, 4), (2048, 8), (4096, 8), (4096, 16)):
            variants[f"two_pass_{block}_{warps}w"] = lambda a, m, h, b=block, w=warps: new(
                a, m, h, w, raw=True, variant="two_pass", block=b
            )
        for warps in (8, 16, 32):
            variants[f"split_{warps}w"] = lambda a, m, h, w=warps: new(a, m, h, w, raw=True, variant="split")
        variants["padded_32w" if has_attn else "padded_8w"] = lambda a, m, h: new(a, m, h, raw=True, variant="padded")
        variants["default"] = lambda a, m, h: new(a, m, h, raw=True)
        row = {"bytes_mb": round((attn.numel() * has_attn + mlp.numel()) * 3 / 1e6, 1)}
        _variants(row, variants, inputs, check)
        result[label] = row
        log.info("gelu %s: %s", label, row)
    return result


def bench_layer_norm(before) -> dict:
    new = layer_norm.build(lambda kernel, raw: kernel)["launch_ln_mod_fp8"]
    old = before.build(lambda kernel, raw: kernel)["launch_ln_mod_fp8"] if before else None
    cases = {"single_block_512+4096": (TEXT, IMAGE), "image_4096": (IMAGE, 0), "text_512": (TEXT, 0)}
    result = {}
    for label, (n_first, n_second) in cases.items():
        inputs = []
        for i in range(ROTATE):
            first = _randn(1, n_first, WIDTH, scale=4, seed=30 + i)
            second = _randn(1, n_second, WIDTH, scale=4, seed=40 + i) if n_second else first
            modulation = (_randn(1, WIDTH, scale=0.5, seed=50 + i), _randn(1, WIDTH, scale=0.5, seed=60 + i))
            inputs.append((first, second, *modulation))
        has_second = bool(n_second)
        first, second, shift, scale = inputs[0]
        reference = layer_norm.reference_ln_mod_fp8(first, second if has_second else None, shift, scale, EPS)
        this = new(first, second, shift, scale, has_second, EPS, raw=True)

        def check(got, reference=reference, this=this):
            return {**_agreement(got, reference), "codes_differing_from_this_tree": _codes(got[0], this[0])}

        variants = {}
        if old:
            variants["before"] = lambda f, s, sh, sc, h=has_second: old(f, s, sh, sc, h, EPS, raw=True)
        for warps in (1, 2, 4, 8):
            variants[f"one_row_{warps}w"] = lambda f, s, sh, sc, h=has_second, w=warps: new(
                f, s, sh, sc, h, EPS, raw=True, num_warps=w
            )
        row = {"bytes_mb": round((n_first + n_second) * WIDTH * 3 / 1e6, 1)}
        _variants(row, variants, inputs, check)
        result[label] = row
        log.info("layer_norm %s: %s", label, row)
    return result


def bench_rope(before) -> dict:
    new = rope.build(lambda kernel, raw: kernel)["launch_qk_norm_rope"]
    old = before.build(lambda kernel, raw: kernel)["launch_qk_norm_rope"] if before else None
    angles = (_randn(TEXT + IMAGE, 64, seed=70).float() * 3).repeat_interleave(2, dim=1)
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    norms = [1 + 0.1 * _randn(128, seed=s) for s in (71, 72, 73, 74)]
    scales = torch.tensor([0.02, 0.02], device="cuda")
    inputs = [
        (_randn(1, TEXT, 3 * WIDTH, seed=80 + i), _randn(1, IMAGE, 3 * WIDTH, seed=90 + i)) for i in range(ROTATE)
    ]

    def call(launch, text, image, **kw):
        return launch(text, image, *norms, cos, sin, scales, True, HEADS, EPS, True, raw=True, **kw)

    text, image = inputs[0]
    ref = rope.reference_qk_norm_rope_fp8(text, image, norms[:2], norms[2:], (cos, sin), HEADS, EPS, scales)
    this = call(new, text, image)

    def check(got):
        return {
            "codes_differing_from_reference": {n: _codes(a, b) for n, a, b in zip("qkv", got, ref, strict=False)},
            "codes_differing_from_this_tree": {n: _codes(a, b) for n, a, b in zip("qkv", got, this, strict=False)},
            "v_descale_equal_to_this_tree": bool(torch.equal(got[3], this[3])),
        }

    variants = {}
    if old:
        variants["before"] = lambda t, i: call(old, t, i)
    for tokens in (1, 2):
        variants[f"tokens_{tokens}"] = lambda t, i, r=tokens: call(new, t, i, rows=r)
    for warps in (1, 2, 4, 8):
        variants[f"warps_{warps}"] = lambda t, i, w=warps: call(new, t, i, num_warps=w)
    for warps in (1, 2, 8):
        variants[f"v_warps_{warps}"] = lambda t, i, w=warps: call(new, t, i, v_warps=w)
    for heads, warps in ((8, 1), (8, 2), (8, 4), (4, 1), (4, 2), (2, 1)):  # head groups: no padded head
        variants[f"heads_{heads}_{warps}w"] = lambda t, i, h=heads, w=warps: call(new, t, i, block_h=h, num_warps=w)
    row = {"bytes_mb": round((TEXT + IMAGE) * WIDTH * (3 * 2 + 2 + 2 + 1) / 1e6, 1)}
    _variants(row, variants, inputs, check)
    log.info("qk_norm_rope_fp8 (with v to e4m3): %s", row)
    return row


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _bf16_differing(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() != b.float().reshape(a.shape)).float().mean())


def bench_residual_layer_norm(_before) -> dict:
    """The double blocks' gated residual x + gate·y and the LayerNorm + modulation + FP8 of it: as main runs it in the
    compiled block (Inductor's add/mul kernel, then the ln_mod_fp8 op) against the one fused kernel (its op compiled,
    and raw at 4 / 8 warps); per stream, 1 launch (or 2) per double block."""
    ops = kernels.ops()

    def unfused(x, y, gate, shift, scale):
        x = x + gate.unsqueeze(1) * y.view(x.shape)
        return (x, *kernels.ln_mod_fp8(x, None, shift, scale, EPS))

    def fused(x, y, gate, shift, scale):
        return kernels.residual_ln_mod_fp8(x, y, gate, shift, scale, EPS)

    result = {}
    for label, tokens in {"image_4096": IMAGE, "text_512": TEXT}.items():
        inputs = []
        for i in range(ROTATE):
            gate = _randn(1, 6 * WIDTH, scale=0.5, seed=100 + i)[:, 2 * WIDTH : 3 * WIDTH]  # a modulation chunk
            x, y = _randn(1, tokens, WIDTH, scale=4, seed=110 + i), _randn(tokens, WIDTH, seed=120 + i)
            inputs.append(
                (x, y, gate, _randn(1, WIDTH, scale=0.5, seed=130 + i), _randn(1, WIDTH, scale=0.5, seed=140))
            )
        before = _compiled(unfused)
        want = before(*inputs[0])

        def check(got, want=want):
            return {
                "new_x_differing_from_before": _bf16_differing(got[0], want[0]),
                "codes_differing_from_before": _codes(got[1], want[1]),
                "scale_max_rel_diff_from_before": float(((got[2] - want[2]) / want[2]).abs().max()),
            }

        variants = {"before_inductor_add_then_ln_mod_fp8": before, "fused_op_compiled": _compiled(fused)}
        for warps in (1, 2, 4, 8):
            variants[f"fused_raw_{warps}w"] = lambda x, y, g, sh, sc, w=warps: ops.launch_residual_ln_mod_fp8(
                x, y.view(x.shape), g, sh, sc, EPS, raw=True, num_warps=w
            )
        row = {"bytes_mb_fused": round(tokens * WIDTH * (2 + 2 + 2 + 1) / 1e6, 1)}
        _variants(row, variants, inputs, check)
        before_us, after_us = row.get("before_inductor_add_then_ln_mod_fp8_us"), row.get("fused_op_compiled_us")
        if before_us and after_us:
            row["saved_us_per_launch"] = round(before_us - after_us, 2)
        result[label] = row
        log.info("residual_ln_mod_fp8 %s: %s", label, row)
    saved = [row.get("saved_us_per_launch", 0.0) for row in result.values()]
    result["predicted_saving_ms_per_t2i_step"] = round(sum(saved) * 19 / 1000, 3)  # 19 double blocks, one per stream
    return result


def bench_attention_output(_before) -> dict:
    """The double blocks' joint attention output (512 text + 4,096 image rows) into to_add_out / to_out[0]: main's
    path (each torchao FP8 layer quantizes its stream in an Inductor reduction, then its GEMM) against one rows_fp8
    launch and the two GEMMs on its codes (fp8_blocks._attention_outputs), both compiled; and the quantization alone."""
    from types import SimpleNamespace

    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from flux_kontext.optimizations.fp8_blocks import _attention_outputs, expose_fp8_weight
    from flux_kontext.optimizations.kernels.e4m3 import quantize_rowwise_fp8

    ops = kernels.ops()
    layers = torch.nn.ModuleDict({"to_out": torch.nn.Linear(WIDTH, WIDTH), "to_add_out": torch.nn.Linear(WIDTH, WIDTH)})
    layers = layers.to(DEVICE, torch.bfloat16)
    quantize_(layers, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
    attn = SimpleNamespace(to_out=[layers["to_out"]], to_add_out=layers["to_add_out"])

    def unfused(joint):
        text, image = joint.split_with_sizes([TEXT, IMAGE], dim=1)
        return attn.to_add_out(text.contiguous()), attn.to_out[0](image.contiguous())

    before = _compiled(unfused)
    inputs = [(_randn(1, TEXT + IMAGE, WIDTH, scale=2, seed=150 + i),) for i in range(ROTATE)]
    want = before(*inputs[0])  # compiled while the layers are torchao's only (no exposed weights needed)
    result = {"exposed": all(expose_fp8_weight(x) for x in layers.values())}
    fused = _compiled(lambda joint: _attention_outputs(attn, joint, TEXT, torch.bfloat16))

    def check(got, want=want):
        out = {}
        for name, g, w in zip(("text", "image"), got, want, strict=True):
            g, w = g.float().reshape(w.shape), w.float()
            out[f"{name}_equal_fraction"] = float((g == w).float().mean())
            out[f"{name}_max_rel_diff"] = float((g - w).abs().max() / w.abs().max())
        return out

    row = {}
    _variants(row, {"before_torchao_per_stream": before, "rows_fp8_then_gemms": fused}, inputs, check)
    if "rows_fp8_then_gemms_us" in row and "before_torchao_per_stream_us" in row:
        row["saved_us_per_block"] = round(row["before_torchao_per_stream_us"] - row["rows_fp8_then_gemms_us"], 2)
        row["predicted_saving_ms_per_t2i_step"] = round(row["saved_us_per_block"] * 19 / 1000, 3)
    result["with_gemms"] = row
    quant = {}
    joint = inputs[0][0]
    ref = quantize_rowwise_fp8(joint.reshape(-1, WIDTH))

    def check_quant(got, ref=ref):
        return {**_agreement(got, ref), "scales_equal": bool(torch.equal(got[1], ref[1]))}

    inductor_quant = _compiled(lambda j: quantize_rowwise_fp8(j.reshape(-1, WIDTH)))
    quant_variants = {"inductor_rowwise_quantization": inductor_quant}
    for warps in (1, 2, 4, 8):
        quant_variants[f"rows_fp8_raw_{warps}w"] = lambda j, w=warps: ops.launch_rows_fp8(
            j.reshape(-1, WIDTH), raw=True, num_warps=w
        )
    _variants(quant, quant_variants, inputs, check_quant)
    result["quantization_alone_4608_rows"] = quant
    log.info("attention output: %s", result)
    return result


BENCHES = {
    "gelu_fp8": ("gelu", bench_gelu),
    "ln_mod_fp8": ("layer_norm", bench_layer_norm),
    "qk_norm_rope_fp8": ("rope", bench_rope),
    "residual_ln_mod_fp8": ("layer_norm", bench_residual_layer_norm),
    "attention_output": ("layer_norm", bench_attention_output),
}


@torch.inference_mode()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="directory with the earlier gelu.py, layer_norm.py, rope.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated, of: {', '.join(BENCHES)}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "timing": f"CUDA graph of {LAUNCHES} launches over {ROTATE} input sets, median of 7 replays, us per launch",
    }
    for name in args.only.split(","):
        module, fn = BENCHES[name]
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
