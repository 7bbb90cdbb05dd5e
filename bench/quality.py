"""Fidelity of each lossy step: the loaded model's images and latents against the naive reference.

For the loaded model (FLUX_MODEL: real weights when you have them; random or tiny otherwise) a fixed set of prompts
(a text-to-image and an edit of a fixed synthetic picture) is generated with the naive reference (bf16, eager,
Euler 28 steps; Euler 50 as a second reference), then with each lossy step: first each per-request step alone on the
bf16 model (the solver at 14 steps, the first-block cache at 0.05 / 0.08 / 0.12), then, cumulatively, FP8 GEMMs,
FP8 attention, the solver and the cache (the serving stack without compile and CUDA graphs, which change no
arithmetic beyond rounding). Each row: PSNR and SSIM of the decoded images and the relative error of the packed
latents against Euler 28 (and Euler 50), and the cache's skip rate. Run it where the weights are:

    FLUX_MODEL=/path/to/FLUX.1-Kontext-dev python bench/quality.py --out bench/results/quality.json

With random weights the images are noise: PSNR/SSIM then say nothing about what a user would see; the latent errors
still measure how far each step moves the computation. Quick check on a CPU: FLUX_MODEL=tiny ... --size 64.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from bench.common import versions, write_json  # noqa: E402
from bench.image_metrics import psnr, relative_error, ssim  # noqa: E402
from flux_kontext.device import Device, resolve_device, resolve_dtype  # noqa: E402
from flux_kontext.generation import Generation  # noqa: E402
from flux_kontext.jobs import Job  # noqa: E402
from flux_kontext.logging_setup import configure_logging  # noqa: E402
from flux_kontext.models import load_model  # noqa: E402
from flux_kontext.schedulers import DEFAULT_SOLVER, SCHEDULER_DEFAULT_STEPS  # noqa: E402
from flux_kontext.settings import Settings  # noqa: E402
from flux_kontext.stack import Stack, stack_for  # noqa: E402

log = logging.getLogger("bench.quality")

CACHE_THRESHOLDS = (0.05, 0.08, 0.12)
SOLVER_STEPS = SCHEDULER_DEFAULT_STEPS[DEFAULT_SOLVER]
# The optimizations this bench loads, in serving order; compile and CUDA graphs are left out (no arithmetic change
# beyond rounding, and minutes of compiling), as are the fused kernels (tested against references elsewhere).
LOADED = ("attention", "flash_attention_3", "low_precision_gemm", "first_block_cache", "dpm_solver")
PER_REQUEST = ("first_block_cache", "dpm_solver")  # loaded first: they change nothing until a request asks
# The bench's own settings over the environment's (FLUX_MODEL and the rest still come from it). The cache is loaded
# but held at threshold 0 (never skips: the exact uncached result) except in the rows that test it; FP8 attention
# is forced on so its effect is measured whatever the start-up screen says (the screen's verdict is reported).
OVERRIDES = dict(warmup=False, compile=False, cuda_graphs=False, first_block_cache=True, fp8_attention="on")


@dataclass(frozen=True)
class Variant:
    name: str
    scheduler: str = "euler"
    steps: int = 28
    cache_threshold: float = 0.0
    needs: tuple[str, ...] = ()  # optimizations that must be active for the row to mean anything
    flags: dict = field(default_factory=dict)


def per_request_variants() -> list[Variant]:
    rows = [Variant("reference: eager, euler 28"), Variant("reference: eager, euler 50", steps=50)]
    rows.append(Variant(f"solver: {DEFAULT_SOLVER} {SOLVER_STEPS}", scheduler=DEFAULT_SOLVER, steps=SOLVER_STEPS))
    rows.append(Variant(f"solver: dpmpp_2m {SOLVER_STEPS}", scheduler="dpmpp_2m", steps=SOLVER_STEPS))
    rows += [Variant(f"cache {t} (euler 28)", cache_threshold=t) for t in CACHE_THRESHOLDS]
    return rows


def cumulative_variants() -> list[list[Variant]]:
    """Per loading phase (FP8 GEMMs, then attention), the rows it adds on top of what is loaded already."""
    gemm = [Variant("+ FP8 GEMMs (euler 28)", needs=("low_precision_gemm",))]
    fp8 = ("low_precision_gemm", "fa3_fp8")
    attention = [
        Variant(
            "+ attention kernel bf16 (FA3 off for the request)",
            needs=("low_precision_gemm",),
            flags={"use_flash_attention": False},
        ),
        Variant("+ FP8 attention (euler 28)", needs=fp8),
        # From here on: whatever is loaded (each prompt's "ran" says what that was).
        Variant(f"+ solver {DEFAULT_SOLVER} {SOLVER_STEPS}", DEFAULT_SOLVER, SOLVER_STEPS),
    ]
    attention += [Variant(f"+ cache {t}", DEFAULT_SOLVER, SOLVER_STEPS, cache_threshold=t) for t in CACHE_THRESHOLDS]
    return [gemm, attention]


def edit_picture(size: int) -> Image.Image:
    """A fixed synthetic picture to edit (no files, no downloads): sky, ground, a sun, a house."""
    image = Image.new("RGB", (size, size), (110, 160, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, size * 0.62, size, size], fill=(70, 130, 60))
    draw.ellipse([size * 0.68, size * 0.08, size * 0.88, size * 0.28], fill=(250, 220, 90))
    draw.rectangle([size * 0.2, size * 0.42, size * 0.5, size * 0.7], fill=(180, 90, 60))
    roof = [(size * 0.16, size * 0.44), (size * 0.35, size * 0.26), (size * 0.54, size * 0.44)]
    draw.polygon(roof, fill=(120, 40, 30))
    return image


def prompt_set(size: int) -> list[dict]:
    return [
        dict(name="text_to_image", prompt="a red fox sitting in fresh snow, golden hour photograph", image=None),
        dict(name="edit", prompt="make it night with a full moon, keep the house", image=edit_picture(size)),
    ]


class CapturingGeneration(Generation):
    """The service's generation, keeping the packed latents it decodes."""

    latents: torch.Tensor | None = None

    def _decode(self, latents, width, height):
        self.latents = latents.detach().float().cpu()
        return super()._decode(latents, width, height)


@dataclass
class Bench:
    generation: CapturingGeneration
    size: int
    loaded: dict  # name -> optimization instance (applied or not)
    references: dict = field(default_factory=dict)  # (prompt, reference steps) -> (image, latents)
    slots: object = None  # the forward slots every phase shares

    def load(self, names: tuple[str, ...], hardware) -> None:
        """Apply the optimizations ``names`` (in serving order) to the model, on top of what is loaded."""
        phase = Stack([self.loaded[name] for name in names], self.slots)
        self.slots = phase.slots
        phase.apply(self.generation.model.pipe, hardware)

    def stack(self) -> Stack:
        """Every optimization of the bench as one stack for requests; those not loaded yet say so and do nothing."""
        return Stack(list(self.loaded.values()), self.slots)

    def active(self, need: str) -> bool:
        if need == "fa3_fp8":
            choice = getattr(self.loaded["attention"], "choice", None)
            return choice is not None and choice.fp8
        return self.loaded[need].applied

    def generate(self, variant: Variant, prompt: dict):
        job = Job(
            prompt=prompt["prompt"],
            seed=1234,
            image=prompt["image"],
            width=self.size,
            height=self.size,
            steps=variant.steps,
            scheduler=variant.scheduler,
            cache_threshold=variant.cache_threshold,
            flags=dict(variant.flags),
        )
        start = time.perf_counter()
        result = self.generation.run(job, self.stack())
        seconds = time.perf_counter() - start
        return result, self.generation.latents, seconds

    def row(self, variant: Variant) -> dict:
        missing = [need for need in variant.needs if not self.active(need)]
        if missing:
            return {"variant": variant.name, "skipped": f"not active: {', '.join(missing)} ({self.why(missing)})"}
        row = {"variant": variant.name, "scheduler": variant.scheduler, "steps": variant.steps, "prompts": {}}
        for prompt in prompt_set(self.size):
            result, latents, seconds = self.generate(variant, prompt)
            image = result.images[0]
            if variant.name.startswith("reference"):
                self.references[(prompt["name"], variant.steps)] = (image, latents)
            entry = {"seconds": round(seconds, 2), "ran": result.optimizations["ran"]}
            for steps, (ref_image, ref_latents) in sorted(self.references.items()):
                if steps[0] != prompt["name"]:
                    continue
                suffix = f"vs_euler{steps[1]}"
                entry[f"latent_rel_error_{suffix}"] = round(relative_error(latents, ref_latents), 6)
                entry[f"psnr_db_{suffix}"] = round(psnr(image, ref_image), 3)
                entry[f"ssim_{suffix}"] = round(ssim(image, ref_image), 5)
            cache = result.counters.get("first_block_cache")
            if cache and variant.cache_threshold > 0:
                calls = cache["computed"] + cache["skipped"]
                entry["cache_skip_rate"] = round(cache["skipped"] / calls, 4) if calls else 0.0
            row["prompts"][prompt["name"]] = entry
        log.info("%s: %s", variant.name, row["prompts"])
        return row

    def why(self, missing: list[str]) -> str:
        opt = self.loaded["attention" if missing[0] == "fa3_fp8" else missing[0]]
        return f"{opt.status}: {opt.detail}"


def lora_note(settings: Settings) -> str:
    from flux_kontext.optimizations import build_all

    if not any("lora" in opt.name for opt in build_all(settings)):
        return "skipped: this build has no LoRA support yet"
    return "skipped: LoRA is present but this bench does not load an adapter yet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the JSON result is written")
    parser.add_argument("--size", type=int, default=1024, help="output side in pixels (default 1024)")
    args = parser.parse_args()
    configure_logging()
    settings = Settings(**OVERRIDES)
    torch_device = resolve_device(settings.device)
    hardware = Device(torch_device, resolve_dtype(settings.dtype, torch_device))
    start = time.perf_counter()
    model = load_model(settings, torch_device, hardware.dtype)
    bench = Bench(CapturingGeneration(model, hardware), args.size, {o.name: o for o in stack_for(settings, LOADED)})
    noise = model.kind in ("random", "tiny")
    result = dict(
        device=hardware.describe(),
        versions={**versions(), **hardware.software_versions()},
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        command=" ".join(["python", *sys.argv]),
        model=model.kind,
        size=args.size,
        load_seconds=round(time.perf_counter() - start, 1),
        images_are_noise=noise,
        note="random weights: the images are noise, so PSNR/SSIM say nothing about what a user would see; the "
        "latent errors still measure how far each step moves the computation"
        if noise
        else "real weights: PSNR/SSIM compare decoded images",
        lora=lora_note(settings),
        rows=[],
    )
    phases = [(PER_REQUEST, per_request_variants())]
    phases += zip((("low_precision_gemm",), ("attention", "flash_attention_3")), cumulative_variants(), strict=True)
    for names, variants in phases:
        bench.load(names, hardware.for_stack())
        # the reports (the FP8 attention screen among them) first, so that a run cut short keeps them
        result["optimizations"] = [opt.report().public() for opt in bench.loaded.values()]
        for variant in variants:
            result["rows"].append(bench.row(variant))
            write_json(args.out, result)
    result["optimizations"] = [opt.report().public() for opt in bench.loaded.values()]  # with the last counters
    write_json(args.out, result)
    print(markdown(result))


def markdown(result: dict) -> str:
    """The table: per row and prompt, latent error and PSNR/SSIM vs Euler 28, and the cache's skip rate."""
    lines = [
        "| variant | prompt | latent rel. error vs euler 28 | vs euler 50 | PSNR dB vs euler 28 | SSIM vs euler 28 "
        "| cache skip rate |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['variant']} | - | {row['skipped']} | | | | |")
            continue
        for name, e in row["prompts"].items():
            cells = [
                f"{e.get('latent_rel_error_vs_euler28', float('nan')):.4f}",
                f"{e['latent_rel_error_vs_euler50']:.4f}" if "latent_rel_error_vs_euler50" in e else "-",
                f"{e.get('psnr_db_vs_euler28', float('nan')):.2f}",
                f"{e.get('ssim_vs_euler28', float('nan')):.4f}",
                f"{e['cache_skip_rate']:.2f}" if "cache_skip_rate" in e else "-",
            ]
            lines.append("| " + " | ".join([row["variant"], name, *cells]) + " |")
    lines.append(f"\n{result['note']}. LoRA: {result['lora']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
