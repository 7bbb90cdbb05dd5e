"""LoRA adapters on the serving stack's fast path (flux_kontext/optimizations/lora.py): what the side path costs per
step, what a switch costs, and how far FP8 + adapter is from bf16 + adapter. Results: BENCHMARKS.md, "LoRA adapters".

The full-size random transformer; random adapters of rank 16 (two of them) and 64 in diffusers keys on every
attention and MLP Linear layer of every block (q, k, v, out, the text stream's too, both MLP layers; single blocks:
q, k, v, proj_mlp, proj_out), written to files and loaded as the service loads them (FLUX_LORAS).

1. bf16 reference: fuse_qkv + attention (cuDNN) + lora, eager: the 1024² text-to-image step without adapter, with
   r16 and with r64. Then the side paths are undone.
2. The serving path on the same weights: low_precision_gemm (FP8 rowwise), gelu_sigmoid_form, fused_gelu_fp8,
   fused_norm_rope, then lora + compile + cuda_graphs (one stack, as served).
   A. Slots sized for one rank-16 adapter per request (FLUX_LORAS=r16,r16b): ms per step (transformer forward,
      graphs replaying) for the 1024² text-to-image and edit, without adapter and with r16; the first request after
      switching r16 -> r16b against its repeat, with the compiles and graph captures that switch caused; FP8 + r16
      against bf16 + r16 (whole output, and the adapter's delta alone).
   A'. A again with FLUX_LORA_K_AUGMENT (the up projection folded into the wide FP8 GEMMs: lora_k_augment.py).
   B. Slots for one rank-64 adapter (FLUX_LORAS=r64): r64 per step against A's no-adapter step (the same compiled
      code); FP8 + r64 against bf16 + r64.
3. Merging instead (one layer, 3072 -> 12288): dequantize, add the rank-16 delta, requantize rowwise FP8: its time
   (times the adapted layers: the cost of one switch) and how much of the delta survives FP8's rounding.
4. ``--check`` (alone): the side path on FP8, eager, the fused blocks' path (from their FP8 activations, A in e4m3)
   against torchao's layers (the forward hook on bf16 activations), each against bf16: the adapter's effect on the
   output, the whole output's error with and without the adapter, and the error of the effect itself.
5. The side path's levers layer by layer (bench/lora_layers.py), at the end of the main run when time is left.
6. ``--fold`` (alone, the fifth session's comparison): lora_fold_input's kernel against its reference on the GPU;
   the bf16 reference; part A' (the default now: folded, no x_aug copy, the saturation guard) with a kernel table of
   one text-to-image step with r16 against one without (torch.profiler: what the side path adds, kernel by kernel),
   then part A (in place); in both a strong adapter (r16s: r16's B times 4) at scale 2 against bf16 + r16s at 2.

    python bench/lora.py --out bench/results/lora-h200-2026-12-01.json
    python bench/lora.py --check --out bench/results/lora-check-h200-2026-12-01.json
    python bench/lora.py --fold --out bench/results/lora-h200-2026-12-01-s5b.json
    python bench/lora.py --tiny --out /tmp/lora-tiny.json   # the same flow on the CPU's tiny model (no timings)
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from flux_kontext.jobs import Job  # noqa: E402
from flux_kontext.settings import Settings  # noqa: E402
from flux_kontext.stack import SLOTS, Hardware, stack_for  # noqa: E402

log = logging.getLogger("bench.lora")
TINY = "--tiny" in sys.argv
CHECK = "--check" in sys.argv  # only part 4
NO_R64 = "--no-r64" in sys.argv  # skip part B (a shorter device call)
FOLD = "--fold" in sys.argv  # only part 6
for _flag in ("--tiny", "--check", "--no-r64", "--fold"):
    if _flag in sys.argv:
        sys.argv.remove(_flag)
BASE = dict(attention="auto" if TINY else "cudnn", compile_multi_kernel=False, first_block_cache=False)
SERVING_BODY = ["low_precision_gemm", "gelu_sigmoid_form", "fused_gelu_fp8", "fused_norm_rope"]
ON_TOP = ["lora", "compile", "cuda_graphs"]
# Stop before part B / the layer levers when this much of the run has gone (the device lease is short; A is the
# target's part).
SECONDS_BEFORE_B = 150.0
SECONDS_BEFORE_LAYERS = 220.0


def block_targets(config) -> dict[str, tuple[int, int]]:
    """{module key: (in, out)} of every attention and MLP Linear layer of every block (diffusers' unfused names)."""
    inner = config.num_attention_heads * config.attention_head_dim
    mlp = 4 * inner
    targets = {}
    for i in range(config.num_layers):
        block = f"transformer_blocks.{i}"
        for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            targets[f"{block}.attn.{name}"] = (inner, inner)
        for ff in ("ff", "ff_context"):
            targets[f"{block}.{ff}.net.0.proj"] = (inner, mlp)
            targets[f"{block}.{ff}.net.2"] = (mlp, inner)
    for i in range(config.num_single_layers):
        block = f"single_transformer_blocks.{i}"
        for name in ("to_q", "to_k", "to_v"):
            targets[f"{block}.attn.{name}"] = (inner, inner)
        targets[f"{block}.proj_mlp"] = (inner, mlp)
        targets[f"{block}.proj_out"] = (inner + mlp, inner)
    return targets


def write_adapter(config, folder: Path, name: str, rank: int, seed: int, strength: float = 1.0) -> str:
    """A random adapter (A ~ N(0, 1/in), B ~ N(0, (0.06/sqrt(rank))^2): a delta of roughly a tenth of each layer's
    output on random weights; B times ``strength``) in diffusers keys; returns 'name=path'."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (fan_in, fan_out) in block_targets(config).items():
        down = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        up = torch.randn(fan_out, rank, generator=generator) * 0.06 * strength / rank**0.5
        tensors[f"transformer.{module}.lora_A.weight"] = down.to(torch.bfloat16)
        tensors[f"transformer.{module}.lora_B.weight"] = up.to(torch.bfloat16)
    path = folder / f"{name}.safetensors"
    save_file(tensors, str(path))
    return f"{name}={path}"


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


class Bench:
    def __init__(self, model, hardware: Hardware, out: Path, result: dict):
        self.model, self.hardware, self.out, self.result = model, hardware, out, result
        self.slots = None

    def apply(self, names, slots=None, **settings):
        stack = stack_for(Settings(**BASE, **settings), only=names, slots=slots)
        stack.apply(SimplePipe(self.model), self.hardware)
        failed = [f"{r.name}: {r.detail}" for r in stack.reports() if r.status == "failed"]
        if failed:
            raise RuntimeError(f"optimization failed: {'; '.join(failed)}")
        self.result.setdefault("reports", []).extend(r.public() for r in stack.reports())
        return stack

    def step(self, stack, kwargs, loras=()) -> tuple[torch.Tensor, dict]:
        """One transformer call as one request: the stack's per-request context around it (the side path's copy)."""
        with stack.request(Job(prompt="bench", seed=0, loras=loras)) as run, torch.inference_mode():
            output = self.model(**kwargs)[0]
        return output, run.counters

    def ms(self, fn, repeats: int, warmup: int) -> float:
        if TINY:
            for _ in range(warmup):
                fn()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            return (time.perf_counter() - start) * 1000 / repeats
        from bench.common import time_ms

        return time_ms(fn, repeats=repeats, warmup=warmup)

    def save(self) -> None:
        from bench.common import write_json

        write_json(self.out, self.result)


class SimplePipe:
    def __init__(self, transformer):
        self.transformer, self.vae = transformer, None


def compiles() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def reference(bench: Bench, cases: dict, loras: list[str]) -> dict[str, torch.Tensor]:
    """Part 1: bf16 + adapter, eager (then the side paths are taken off again)."""
    stack = bench.apply(["fuse_qkv", "attention", "lora"], loras=loras, lora_max_per_request=1)
    t2i = cases["text_to_image"]
    loaded = set(stack["lora"].adapters)
    outputs = {
        label: bench.step(stack, t2i, choice)[0].float()
        for label, choice in CHOICES.items()
        if all(name in loaded for name, _ in choice)
    }
    stack["lora"].undo()
    bench.slots = stack.slots
    return outputs


CHOICES = {"none": (), "r16": (("r16", 1.0),), "r64": (("r64", 1.0),), "r16s_at_2": (("r16s", 2.0),)}


def part_a(bench: Bench, cases: dict, loras: list[str], ref: dict, k_augment: bool = False, profile=False) -> dict:
    stack = bench.apply(ON_TOP, slots=bench.slots, loras=loras, lora_max_per_request=1, lora_k_augment=k_augment)
    names = ",".join(Path(entry.split("=", 1)[1]).stem for entry in loras)
    settings = f"FLUX_LORAS={names} FLUX_LORA_MAX_PER_REQUEST=1 FLUX_LORA_K_AUGMENT={str(k_augment).lower()}"
    part = {"settings": settings, "lora": stack["lora"].report().public()}
    for case, kwargs in cases.items():
        row = part[case] = {}
        for label in ("none", "r16"):
            choice = CHOICES[label]
            before = compiles()
            row[f"{label}_ms"] = round(bench.ms(lambda c=choice, k=kwargs: bench.step(stack, k, c), 10, 3), 3)
            row[f"{label}_compiled_graphs"] = compiles() - before
            if case == "text_to_image":
                output = bench.step(stack, kwargs, choice)[0]
                row[f"{label}_fp8_vs_bf16_rel_error"] = rel(output, ref[label])
                row[f"_{label}"] = output.float()
        row["r16_overhead_pct"] = round(100 * (row["r16_ms"] / row["none_ms"] - 1), 2)
        # The switch: the first request with another adapter, against its repeat (each includes the slot copy check).
        before = compiles()
        switch = (("r16b", 1.0),)
        first, counters = timed_once(bench, stack, kwargs, switch)
        repeat, _ = timed_once(bench, stack, kwargs, switch)
        row["switch_first_ms"], row["switch_repeat_ms"] = round(first, 3), round(repeat, 3)
        row["switch_compiled_graphs"] = compiles() - before
        row["switch_cuda_graphs"] = counters.get("cuda_graphs")
        row["switch_lora"] = counters.get("lora")
        log.info("A (k_augment=%s) %s: %s", k_augment, case, {k: v for k, v in row.items() if not k.startswith("_")})
        bench.result[f"A_k_augment_{k_augment}_partial"] = _public(part)
        bench.save()
        if profile and case == "text_to_image":
            with contextlib.suppress(Exception):  # a measurement on the side; never loses the rest
                part["profile_text_to_image"] = kernel_table(bench, stack, kwargs)
                bench.result[f"A_k_augment_{k_augment}_partial"] = _public(part)
                bench.save()
    t2i = part["text_to_image"]
    if "r16s_at_2" in ref:  # a strong adapter at scale 2: what e4m3's range does to it (the fold's guard)
        strong = bench.step(stack, cases["text_to_image"], CHOICES["r16s_at_2"])[0].float()
        t2i["r16s_at_2_fp8_vs_bf16_rel_error"] = rel(strong, ref["r16s_at_2"])
        t2i["r16s_at_2_effect_bf16_rel"] = rel(ref["r16s_at_2"], ref["none"])
        t2i["r16s_at_2_delta_fp8_vs_bf16_rel_error"] = rel(strong - t2i["_none"], ref["r16s_at_2"] - ref["none"])
        if "_fp8_r16s" in ref:
            t2i["r16s_at_2_vs_other_part_rel"] = rel(strong, ref["_fp8_r16s"])
        ref.setdefault("_fp8_r16s", strong)
        bench.step(stack, cases["text_to_image"])  # the guard's counts are read back at the next request
        t2i["fold_guard"] = stack["lora"].report().public()["data"].get("fold_guard")
    fp8_r16 = t2i.pop("_r16")
    t2i["r16_delta_fp8_vs_bf16_rel_error"] = rel(fp8_r16 - t2i["_none"], ref["r16"] - ref["none"])
    # What that error is made of: the adapter's effect against FP8's own error (two runs' FP8 rounding noise does
    # not cancel in their difference when their activations differ), and the delta against the first part's
    # delta (same FP8 base, another side path: only the side path's arithmetic differs).
    t2i["r16_effect_bf16_rel"] = rel(ref["r16"], ref["none"])
    if "_fp8_r16" in ref:
        t2i["r16_delta_vs_in_place_delta_rel_error"] = rel(fp8_r16 - t2i["_none"], ref["_fp8_r16"] - ref["_fp8_none"])
    ref.setdefault("_fp8_r16", fp8_r16)
    ref.setdefault("_fp8_none", t2i.pop("_none"))
    t2i.pop("_none", None)
    bench.result.pop(f"A_k_augment_{k_augment}_partial", None)
    undo(stack)
    return part


def _public(part: dict) -> dict:
    return {
        key: {k: v for k, v in value.items() if not k.startswith("_")} if isinstance(value, dict) else value
        for key, value in part.items()
    }


def kernel_table(bench: Bench, stack, kwargs, steps: int = 3, top: int = 30) -> dict:
    """GPU kernels of one step (torch.profiler, CUDA graphs replaying: their kernels are traced too), without adapter
    and with r16, by kernel name: ms and launches per step; then the names whose time differs most (r16 - none)."""
    import json
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for label in ("none", "r16"):
        choice = CHOICES[label]
        bench.step(stack, kwargs, choice)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                bench.step(stack, kwargs, choice)
            torch.cuda.synchronize()
        path = Path(tempfile.mkdtemp(prefix="lora-prof-")) / "trace.json"
        prof.export_chrome_trace(str(path))
        per = defaultdict(lambda: [0.0, 0])
        for event in json.loads(path.read_text()).get("traceEvents", []):
            if event.get("cat") == "kernel":
                per[event["name"]][0] += event.get("dur", 0) / 1000 / steps
                per[event["name"]][1] += 1
        tables[label] = {name: (round(ms, 4), count // steps) for name, (ms, count) in per.items()}
    none, r16 = tables["none"], tables["r16"]
    names = set(none) | set(r16)
    diff = sorted(
        ((name, round(r16.get(name, (0, 0))[0] - none.get(name, (0, 0))[0], 4)) for name in names),
        key=lambda item: -abs(item[1]),
    )
    return {
        "steps": steps,
        "kernel_ms_per_step": {label: round(sum(ms for ms, _ in t.values()), 3) for label, t in tables.items()},
        "launches_per_step": {label: sum(c for _, c in t.values()) for label, t in tables.items()},
        "largest_differences": [
            {"kernel": name[:160], "ms_diff": ms, "none": none.get(name), "r16": r16.get(name)}
            for name, ms in diff[:top]
        ],
    }


def fold_kernel_check() -> dict:
    """lora_fold_input's Triton kernel against its reference on the GPU, at the single blocks' shape (4608 rows,
    K 3072, 64 t' columns, padded to 3200), with a few rows that need rescaling; and its time against the copy it
    replaced (x_aug = cat(x8, tail): one more pass over the FP8 activations)."""
    from flux_kontext.gpu_timing import gpu_milliseconds
    from flux_kontext.optimizations import kernels
    from flux_kontext.optimizations.kernels.e4m3 import quantize_rowwise_fp8
    from flux_kontext.optimizations.lora_fold_input import _kernel, reference_fold_input

    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    rows, fan_in, extra, width = 4608, 3072, 64, 3200
    x8, sx = quantize_rowwise_fp8(torch.randn(rows, fan_in, device=device, generator=generator))
    low = (torch.randn(rows, extra, device=device, generator=generator) * sx * 100).bfloat16()
    low[::97] *= 30  # about 1 row in 100 past e4m3's range: rescaled
    t_scale = torch.rand(1, extra, device=device, generator=generator)

    def fresh():
        x_aug = torch.empty(rows, width, dtype=torch.float8_e4m3fn, device=device)
        x_aug[:, :fan_in].copy_(x8)
        return x_aug, sx.clone(), torch.zeros(2, dtype=torch.int32, device=device)

    fold = _kernel()
    want, got = fresh(), fresh()
    reference_fold_input(*want[:2], low, t_scale, want[2], fan_in)
    fold(*got[:2], low, t_scale, got[2], fan_in)
    differ = (want[0].view(torch.uint8) != got[0].view(torch.uint8)).sum()
    calm = low / 30  # no row past the range
    x_aug, scale, counters = fresh()
    tail = torch.zeros(rows, width - fan_in, dtype=torch.float8_e4m3fn, device=device)
    ops = kernels.ops()
    rows_in = torch.randn(1, 512, 3072, device=device, generator=generator).bfloat16()
    mod = [torch.randn(1, 3072, device=device, generator=generator).bfloat16() * 0.1 for _ in range(2)]
    plain, _ = ops.launch_ln_mod_fp8(rows_in, rows_in, *mod, False, 1e-6)
    wide, _ = ops.launch_ln_mod_fp8(rows_in, rows_in, *mod, False, 1e-6, extra=128)
    attn, mlp = rows_in[0], torch.randn(512, 12288, device=device, generator=generator).bfloat16()
    gelu_plain, _ = ops.launch_gelu_fp8(attn, mlp, True)
    gelu_wide, _ = ops.launch_gelu_fp8(attn, mlp, True, extra=128)
    ff_plain, _ = ops.launch_gelu_fp8(mlp, mlp, False)
    ff_wide, _ = ops.launch_gelu_fp8(mlp, mlp, False, extra=128)

    def same(a, b) -> bool:
        return bool(torch.equal(a.view(torch.uint8), b[:, : a.shape[1]].contiguous().view(torch.uint8)))

    return {
        "ln_mod_extra_columns_same_values": same(plain, wide),
        "gelu_extra_columns_same_values": [same(gelu_plain, gelu_wide), same(ff_plain, ff_wide)],
        "counters_reference": want[2].tolist(),
        "counters_kernel": got[2].tolist(),
        "x_aug_bytes_differing": int(differ),
        "x_aug_values_rel_error": rel(got[0].float(), want[0].float()),
        "row_scales_equal": bool(torch.equal(want[1], got[1])),
        "kernel_ms_no_rescale": round(gpu_milliseconds(lambda: fold(x_aug, scale, calm, t_scale, counters, fan_in)), 4),
        "cat_copy_ms_it_replaces": round(gpu_milliseconds(lambda: torch.cat([x8, tail], dim=1)), 4),
    }


def part_b(bench: Bench, cases: dict, loras: list[str], ref: dict, none_ms: dict) -> dict:
    stack = bench.apply(ON_TOP, slots=bench.slots, loras=loras, lora_max_per_request=1)
    part = {"settings": "FLUX_LORAS=r64 FLUX_LORA_MAX_PER_REQUEST=1", "lora": stack["lora"].report().public()}
    for case, kwargs in cases.items():
        row = part[case] = {}
        choice = CHOICES["r64"]
        row["r64_ms"] = round(bench.ms(lambda c=choice, k=kwargs: bench.step(stack, k, c), 10, 3), 3)
        row["r64_overhead_pct_vs_A_none"] = round(100 * (row["r64_ms"] / none_ms[case] - 1), 2)
        if case == "text_to_image":
            output = bench.step(stack, kwargs, choice)[0]
            row["r64_fp8_vs_bf16_rel_error"] = rel(output, ref["r64"])
            row["r64_delta_fp8_vs_bf16_rel_error"] = rel(output.float() - ref["_fp8_none"], ref["r64"] - ref["none"])
        log.info("B %s: %s", case, row)
        bench.save()
    undo(stack)
    return part


def timed_once(bench: Bench, stack, kwargs, loras) -> tuple[float, dict]:
    if not TINY:
        torch.cuda.synchronize()
    start = time.perf_counter()
    _, counters = bench.step(stack, kwargs, loras)
    if not TINY:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000, counters


def undo(stack) -> None:
    for opt in reversed(list(stack)):
        if opt.applied and opt.undoable:
            opt.undo()
    for slot in reversed(SLOTS[1:]):
        stack.slots.clear_everywhere(slot)


def merge_cost(model, adapted_layers: int) -> dict:
    """Part 3: merging a rank-16 delta into one FP8 layer (3072 -> 12288) instead of a side path."""
    from flux_kontext.optimizations.kernels.e4m3 import quantize_rowwise_fp8

    layer = model.single_transformer_blocks[0].proj_mlp
    weight = getattr(layer, "fp8_weight_t", None)
    if weight is None:
        return {"skipped": "no exposed FP8 weight (CPU or FP8 not applied)"}
    generator = torch.Generator(device=weight.device).manual_seed(3)
    fan_out, fan_in = layer.out_features, layer.in_features
    down = torch.randn(16, fan_in, device=weight.device, generator=generator).bfloat16() / fan_in**0.5
    up = (torch.randn(fan_out, 16, device=weight.device, generator=generator) * 0.015).bfloat16()
    base = weight.t().float() * layer.fp8_weight_scale.t()

    def merge():
        merged = base + (up.float() @ down.float())
        return quantize_rowwise_fp8(merged)

    from bench.common import time_ms

    ms = time_ms(merge, repeats=5, warmup=1)
    values, scale = merge()
    merged_delta = values.float() * scale - base
    return {
        "one_layer_ms": round(ms, 3),
        "adapted_layers": adapted_layers,
        "estimated_switch_ms": round(ms * adapted_layers, 1),
        "delta_rel_error_after_fp8_rounding": rel(merged_delta, up.float() @ down.float()),
    }


def main() -> int:
    from bench.common import header, output_path_from_args

    out = output_path_from_args(__doc__)
    start = time.perf_counter()
    if TINY:
        from flux_kontext.models import build_random_pipeline, step_inputs

        model = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32).transformer
        hardware = Hardware("cpu")
        config = model.config
        cases = {
            "text_to_image": step_inputs(config, "cpu", torch.float32, 64, 0, 16),
            "edit": step_inputs(config, "cpu", torch.float32, 64, 64, 16),
        }
        result = {"device": "cpu (tiny model: the flow only)", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    else:
        from bench.common import cuda_hardware, full_random_transformer, step_cases

        model, hardware, cases = full_random_transformer(), cuda_hardware(), step_cases()
        config = model.config
        result = header()
    bench = Bench(model, hardware, out, result)
    folder = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    files = {name: write_adapter(config, folder, name, rank, seed, strength) for name, rank, seed, strength in ADAPTERS}
    result["adapter_layers"] = len(block_targets(config))
    result["seconds_setup"] = round(time.perf_counter() - start, 1)
    if CHECK:
        result["check"] = side_path_check(bench, cases, files["r16"])
        bench.save()
        return 0
    if FOLD:
        return fold_comparison(bench, cases, files, start)
    ref = reference(bench, cases, [files["r16"], files["r64"]])
    bench.apply(SERVING_BODY, slots=bench.slots)
    result["seconds_reference_and_fp8"] = round(time.perf_counter() - start, 1)
    bench.save()
    result["A"] = part_a(bench, cases, [files["r16"], files["r16b"]], ref)
    result["seconds_after_A"] = round(time.perf_counter() - start, 1)
    bench.save()
    try:  # the up projection folded into the wide FP8 GEMMs (lora_k_augment.py), the same adapters
        result["A_k_augment"] = part_a(bench, cases, [files["r16"], files["r16b"]], ref, k_augment=True)
    except Exception as exc:  # never loses the rest
        log.exception("part A with FLUX_LORA_K_AUGMENT failed")
        result["A_k_augment"] = {"failed": f"{type(exc).__name__}: {exc}"[:1000]}
    result["seconds_after_A_k_augment"] = round(time.perf_counter() - start, 1)
    bench.save()
    if time.perf_counter() - start < SECONDS_BEFORE_B and not NO_R64:
        none_ms = {case: result["A"][case]["none_ms"] for case in cases}
        result["B"] = part_b(bench, cases, [files["r64"]], ref, none_ms)
    else:
        why = "--no-r64" if NO_R64 else f"more than {SECONDS_BEFORE_B:g} s gone after part A"
        result["B"] = {"skipped": why}
    with contextlib.suppress(Exception):  # a measurement on the side; never loses the rest
        result["merge_instead"] = merge_cost(model, result["adapter_layers"]) if not TINY else {"skipped": "CPU"}
    bench.save()
    if time.perf_counter() - start < SECONDS_BEFORE_LAYERS:
        result["layer_levers"] = layer_levers_here(bench)
    else:
        result["layer_levers"] = {"skipped": f"more than {SECONDS_BEFORE_LAYERS:g} s gone"}
    result["seconds_total"] = round(time.perf_counter() - start, 1)
    bench.save()
    log.info("done in %.0f s", result["seconds_total"])
    return 0


def fold_comparison(bench: Bench, cases: dict, files: dict, start: float) -> int:
    """Part 6: the default now (folded, guarded, no x_aug copy) against the in-place up projection, in one call."""
    result = bench.result
    if not TINY:
        try:
            result["fold_kernel_check"] = fold_kernel_check()
        except Exception as exc:  # never loses the rest
            log.exception("fold kernel check failed")
            result["fold_kernel_check"] = {"failed": f"{type(exc).__name__}: {exc}"[:1000]}
        log.info("fold kernel check: %s", result["fold_kernel_check"])
    ref = reference(bench, cases, [files["r16"], files["r16s"]])
    bench.apply(SERVING_BODY, slots=bench.slots)
    result["seconds_reference_and_fp8"] = round(time.perf_counter() - start, 1)
    bench.save()
    adapters = [files["r16"], files["r16b"], files["r16s"]]
    for key, k_augment in (("A_k_augment", True), ("A", False)):
        try:
            result[key] = part_a(bench, cases, adapters, ref, k_augment=k_augment, profile=k_augment)
        except Exception as exc:  # never loses the rest
            log.exception("part A (k_augment=%s) failed", k_augment)
            result[key] = {"failed": f"{type(exc).__name__}: {exc}"[:1000]}
        result[f"seconds_after_{key}"] = round(time.perf_counter() - start, 1)
        bench.save()
    result["seconds_total"] = round(time.perf_counter() - start, 1)
    bench.save()
    log.info("done in %.0f s", result["seconds_total"])
    return 0


def layer_levers_here(bench: Bench) -> dict:
    """Part 5: bench/lora_layers.py's levers, one block's layers at a time."""
    from bench.lora_layers import layer_levers

    if TINY:
        return layer_levers(torch.device("cpu"), tokens=32, inner=32, timer=lambda fn: bench.ms(fn, 1, 1))
    return layer_levers(torch.device("cuda"), timer=lambda fn: bench.ms(fn, 20, 3))


def side_path_check(bench: Bench, cases: dict, lora: str) -> dict:
    """Part 4: eager outputs without and with r16: bf16, FP8 with the fused blocks, FP8 on torchao's layers."""
    t2i = cases["text_to_image"]
    choice = CHOICES["r16"]

    def pair(stack) -> tuple[torch.Tensor, torch.Tensor]:
        return bench.step(stack, t2i)[0].float(), bench.step(stack, t2i, choice)[0].float()

    stack = bench.apply(["fuse_qkv", "attention", "lora"], loras=[lora])
    bf16 = pair(stack)
    stack["lora"].undo()
    bench.apply(SERVING_BODY, slots=stack.slots)
    check = {"r16_effect_bf16": rel(bf16[1], bf16[0])}
    for label in ("fused_blocks", "torchao_layers"):
        if label == "torchao_layers":
            stack.slots.clear_everywhere("body")
        side = bench.apply(["lora"], slots=stack.slots, loras=[lora])
        fp8 = pair(side)
        check[label] = {
            "r16_effect": rel(fp8[1], fp8[0]),
            "none_vs_bf16": rel(fp8[0], bf16[0]),
            "r16_vs_bf16_r16": rel(fp8[1], bf16[1]),
            "effect_vs_bf16_effect": rel(fp8[1] - fp8[0], bf16[1] - bf16[0]),
        }
        side["lora"].undo()
        log.info("check %s: %s", label, check[label])
    return check


ADAPTERS = (("r16", 16, 1, 1.0), ("r16b", 16, 2, 1.0), ("r64", 64, 3, 1.0), ("r16s", 16, 1, 4.0))

if __name__ == "__main__":
    raise SystemExit(main())
