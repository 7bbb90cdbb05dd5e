"""One graph for every batch size, or one for one image and another for larger batches (FLUX_COMPILE_BATCH).

Why (issue 11): with the batch dimension marked dynamic the dynamo way (``maybe_mark_dynamic``), a batch of one is
specialized, and the first request with ``num_images`` 2 (or true CFG) compiles a second graph per block kind. A
restart on a kept cache reloads both (the warm-up's batch of two spent 4.6 s reloading 3 graphs on the H200). Marked
unbacked (``mark_unbacked``), the batch is a symbol dynamo cannot specialize: one graph serves every batch.

This runs the serving engine in-process (random weights, full size, no warm-up) once per variant, each in a fresh
process on fresh caches (cold), then again on the caches it filled (hit, as a restart):
- the first call per shape (2 steps): wall seconds and graphs compiled, for 1024² text-to-image and edit at
  ``num_images`` 1 and 2, and text-to-image at 4;
- the steady state per step (``--steps`` per call; a warm-up call first, then ``--runs`` timed) at 1024², text-to-image
  and edit at one image, text-to-image at two;
- the steady-state images' largest difference between the variants (same seeds and weights).

    FLUX_MODEL=random python bench/compile_batch.py --out bench/results/compile-batch-h200-<date>.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("specialized", "unbacked")
FIRST_CALLS = (("text_to_image", 1), ("edit", 1), ("text_to_image", 2), ("edit", 2), ("text_to_image", 4))
STEADY = (("text_to_image", 1), ("edit", 1), ("text_to_image", 2))


def timed_call(engine, mode: str, num_images: int, steps: int) -> tuple[dict, object]:
    from bench.warmup_profile import job_for
    from flux_kontext.warmup_shapes import graphs_compiled_by

    start = time.perf_counter()
    out = engine.generate(job_for(mode, steps, num_images=num_images))
    row = {
        "call": f"{mode} x{num_images}",
        "wall_s": round(time.perf_counter() - start, 3),
        "ms_per_step": round(out.timings_ms["denoising"] / out.steps, 2),
        "graphs_compiled": graphs_compiled_by(out),
    }
    return row, out


def child(variant: str, phase: str, steps: int, runs: int, images: Path) -> dict:
    """One variant in this fresh process (its caches set by the parent)."""
    import numpy as np

    from flux_kontext.engine import Engine
    from flux_kontext.logging_setup import configure_logging
    from flux_kontext.settings import Settings

    configure_logging()
    engine = Engine(Settings(warmup=False, compile_batch=variant))
    engine.load()
    if not engine.ready:
        raise SystemExit(f"engine failed: {engine.reason}")
    compiled = next(r for r in engine.reports if r.name == "compile")
    result: dict = {"variant": variant, "phase": phase, "cache": compiled.data.get("cache"), "first_calls": []}
    result["compile_batch"] = compiled.data.get("batch")
    for mode, num_images in FIRST_CALLS:
        row, _ = timed_call(engine, mode, num_images, 2)
        result["first_calls"].append(row)
        print(json.dumps(row), flush=True)
    if phase == "hit":
        return result
    result["steady"] = []
    for mode, num_images in STEADY:
        timed_call(engine, mode, num_images, steps)  # a new step count: the CUDA graphs and solver warm up
        rows = [timed_call(engine, mode, num_images, steps) for _ in range(runs)]
        best = min(rows, key=lambda pair: pair[0]["ms_per_step"])
        result["steady"].append({**best[0], "runs_ms_per_step": [row["ms_per_step"] for row, _ in rows]})
        print(json.dumps(result["steady"][-1]), flush=True)
        array = np.stack([np.asarray(image) for image in best[1].images])
        np.save(images / f"{variant}-{mode}-x{num_images}.npy", array)
    result["peak_gpu_memory_gib"] = engine.peak_memory_gib()
    return result


def variant_forward(variant: str):
    """CompiledForward for one variant of the unbacked batch, for ``--in-process``: the compiled code told the batch's
    upper bound (the API's largest num_images: int32 indexing can then be proven), or Inductor given the real batch
    as its size hint (``hint_override``: its kernel heuristics otherwise assume 8192)."""
    import torch

    from flux_kontext.optimizations import compile as compile_module

    class Forward(compile_module.CompiledForward):
        def _compiled(self):
            if not self.unbacked_batch or variant != "unbacked_max4":
                return super()._compiled()
            bounded = compile_module.with_batch_bounds(self.eager)

            def forward(*args, **kwargs):
                torch._check(kwargs["hidden_states"].shape[0] <= 4)
                return bounded(*args, **kwargs)

            return torch.compile(forward, fullgraph=True, dynamic=None, options=self.options or None)

        def __call__(self, *args, **kwargs):
            if variant == "unbacked_hint" and self.unbacked_batch:
                for name in compile_module.BLOCK_BATCH_INPUTS:
                    value = kwargs.get(name)
                    if isinstance(value, torch.Tensor):
                        torch._dynamo.decorators.mark_unbacked(value, 0, hint_override=value.shape[0])
            return super().__call__(*args, **kwargs)

    return Forward


IN_PROCESS = ("specialized", "unbacked_max4", "unbacked_hint", "unbacked")


def in_process(steps: int, runs: int, save) -> dict:
    """Every variant in one process on the same weights: the blocks' compiled slot refilled per variant (dynamo
    reset between), then its first calls and steady state."""
    import torch

    from flux_kontext.engine import Engine
    from flux_kontext.logging_setup import configure_logging
    from flux_kontext.settings import Settings

    configure_logging()
    engine = Engine(Settings(warmup=False))
    engine.load()
    transformer = engine.model.pipe.transformer
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    compile_opt, slots = engine.stack["compile"], engine.stack.slots
    result: dict = {"variants": []}
    for variant in IN_PROCESS:
        torch._dynamo.reset()
        forward, unbacked = variant_forward(variant), variant != "specialized"
        options = compile_opt.inductor_options()
        for block in blocks:
            slots.set(
                block, "compiled", lambda inner, f=forward, o=options, u=unbacked: f(inner, o, print, True, u, print)
            )
        row: dict = {"variant": variant, "first_calls": [], "steady": []}
        try:
            for mode, num_images in (("text_to_image", 1), ("text_to_image", 2), ("edit", 1)):
                row["first_calls"].append(timed_call(engine, mode, num_images, 2)[0])
            for mode, num_images in (("text_to_image", 1), ("edit", 1)):
                timed_call(engine, mode, num_images, steps)
                rows = [timed_call(engine, mode, num_images, steps)[0] for _ in range(runs)]
                row["steady"].append(
                    {**min(rows, key=lambda r: r["ms_per_step"]), "runs": [r["ms_per_step"] for r in rows]}
                )
        except Exception as exc:  # a variant that does not compile: recorded, the next one runs
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        result["variants"].append(row)
        save(result)  # a run cut short keeps the variants it finished
        print(json.dumps(row), flush=True)
    return result


def image_differences(images: Path) -> dict:
    import numpy as np

    differences = {}
    for mode, num_images in STEADY:
        name = f"{mode}-x{num_images}"
        a, b = (np.load(images / f"{variant}-{name}.npy").astype(np.int16) for variant in VARIANTS)
        differences[name] = {"max_abs_uint8": int(np.abs(a - b).max()), "mean_abs_uint8": float(np.abs(a - b).mean())}
    return differences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="the report (required unless --child)")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "PHASE"), help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--in-process", action="store_true", help="the variants of IN_PROCESS in one process")
    args = parser.parse_args()
    if args.in_process:
        from bench.resolution_sweep import versions

        report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv)}
        report["versions"] = versions()
        args.out.parent.mkdir(parents=True, exist_ok=True)

        def save(result: dict) -> None:
            args.out.write_text(json.dumps({**report, **result}, indent=1) + "\n")

        in_process(args.steps, args.runs, save)
        return 0
    if args.child:
        result = child(*args.child, args.steps, args.runs, args.images)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.out is None:
        parser.error("--out is required")
    from bench.resolution_sweep import versions

    work = Path(tempfile.mkdtemp(prefix="compile-batch-"))
    report: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv)}
    report["versions"], report["runs"] = versions(), []
    for variant in args.variants.split(","):
        env = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": str(work / variant / "inductor"),
            "TRITON_CACHE_DIR": str(work / variant / "triton"),
        }
        for phase in ("cold", "hit"):
            command = [sys.executable, __file__, "--child", variant, phase, "--images", str(work)]
            command += ["--steps", str(args.steps), "--runs", str(args.runs)]
            start = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            run = json.loads(lines[-1][7:]) if lines else {"variant": variant, "phase": phase}
            run["process_s"] = round(time.perf_counter() - start, 1)
            if done.returncode:
                run["error"] = [line for line in done.stderr.strip().splitlines() if "Error" in line][
                    -6:
                ] or done.stderr.strip().splitlines()[-8:]
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    if set(args.variants.split(",")) == set(VARIANTS) and not any("error" in run for run in report["runs"]):
        report["image_differences"] = image_differences(work)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
