"""Context parallelism, 1 GPU against N in one call: the same random-weight model, the same seed.

    torchrun --nproc-per-node 2 bench/context_parallel.py --out bench/results/context-parallel-h200x2.json
    torchrun --nproc-per-node 2 bench/context_parallel.py --tiny --out /tmp/cp.json        # CPU check (gloo)

Each rank builds the full-size pipeline with random weights (seed 0: the same weights on every rank) and applies
the serving stack's fuse_qkv, attention, flash_attention_3 (and low_precision_gemm with --fp8), eager (no
compile, no CUDA graphs: their start-up does not fit one call's budget). Then, in order:

1. one GPU: rank 0 alone (the others wait) times the transformer step of a 1024² text-to-image (4,608 tokens) and
   edit (8,704), and one whole generation of each through the service's Generation (14 steps, unipc);
2. context_parallel applied on every rank; the same steps and generations on N GPUs; the step output and the
   images against rank 0's single-GPU ones;
3. the all-to-alls alone at the shapes of one attention call (packed q/k/v there, the output back), times the 57
   attention layers of a step, and the output's gather: the communication floor of a step.

One JSON (rank 0 writes it after each part). Numbers: BENCHMARKS.md "Context parallelism".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from flux_kontext.device import Device  # noqa: E402
from flux_kontext.generation import Generation  # noqa: E402
from flux_kontext.jobs import Job  # noqa: E402
from flux_kontext.logging_setup import configure_logging  # noqa: E402
from flux_kontext.models import LoadedModel, build_random_pipeline, step_inputs  # noqa: E402
from flux_kontext.optimizations.context_parallel import ContextParallel  # noqa: E402
from flux_kontext.parallel.group import connect_store, join_group  # noqa: E402
from flux_kontext.parallel.ranks import rank_environment  # noqa: E402
from flux_kontext.parallel.sharding import SequencePlan, gather  # noqa: E402
from flux_kontext.parallel.ulysses import heads_to_seq, seq_to_heads  # noqa: E402
from flux_kontext.settings import Settings  # noqa: E402
from flux_kontext.stack import Hardware, Model, stack_for  # noqa: E402

log = logging.getLogger("bench.context_parallel")
STEPS = 14
REPEATS = 5


def arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (gloo): checks the script")
    parser.add_argument("--fp8", action="store_true", help="also FP8 GEMMs (low_precision_gemm)")
    parser.add_argument("--steps", type=int, default=STEPS)
    return parser.parse_args()


class Clock:
    """Wall time of work on this rank's device (synchronised before and after)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def ms(self, fn, repeats: int = REPEATS, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - start) * 1000.0)
        return statistics.median(times)


def step_cases(config, device, dtype, tiny: bool) -> dict[str, dict]:
    image, text = (256, 64) if tiny else (4096, 512)  # tiny: a 256² image (the tiny model reads 64 text tokens)
    return {
        "text_to_image": step_inputs(config, device, dtype, image, text_tokens=text),
        "edit": step_inputs(config, device, dtype, image, image, text_tokens=text),
    }


def jobs(tiny: bool, steps: int) -> dict[str, Job]:
    from PIL import Image

    side = 256 if tiny else 1024
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
    common = dict(prompt="a lighthouse at dawn", seed=3, width=side, height=side, steps=steps)
    return {"text_to_image": Job(**common), "edit": Job(**common, image=picture)}


def transformer_steps(transformer, cases, clock) -> dict:
    results = {}
    with torch.inference_mode():
        for name, kwargs in cases.items():
            output = transformer(**kwargs)[0].float()
            results[name] = {"ms": clock.ms(lambda kwargs=kwargs: transformer(**kwargs)), "output": output}
    return results


def generations(generation, stack, job_cases) -> dict:
    results = {}
    for name, job in job_cases.items():
        generation.run(dataclasses.replace(job, steps=2), stack)  # first sight of the shape (kernels, allocator)
        result = generation.run(job, stack)
        denoise = result.timings_ms["denoising"]
        results[name] = {
            "timings_ms": result.timings_ms,
            "ms_per_step": round(denoise / result.steps, 2),
            "pixels": np.asarray(result.images[0], dtype=np.int16) if result.images else None,
        }
    return results


def communication(group, rank, world, cases, transformer, device, dtype, clock) -> dict:
    """The all-to-alls of one attention call at each case's shapes, per step (x attention layers) and the gather."""
    config = transformer.config
    heads, dim = config.num_attention_heads, config.attention_head_dim
    layers = config.num_layers + config.num_single_layers
    results = {}
    for name, kwargs in cases.items():
        plan = SequencePlan.for_lengths(
            rank, world, kwargs["encoder_hidden_states"].shape[1], kwargs["hidden_states"].shape[1]
        )
        mine, total = plan.joint[rank], sum(plan.joint)
        qkv = torch.randn(1, mine, 3 * heads, dim, device=device, dtype=dtype)
        out = torch.randn(1, total, heads // world, dim, device=device, dtype=dtype)
        image = torch.randn(1, plan.image[rank], config.in_channels, device=device, dtype=dtype)
        there = clock.ms(lambda x=qkv, p=plan: seq_to_heads(x, p.joint, rank, group), repeats=20)
        back = clock.ms(lambda y=out, p=plan: heads_to_seq(y, p.joint, rank, group), repeats=20)
        gathered = clock.ms(lambda z=image, p=plan: gather(z, 1, p.image, group), repeats=20)
        sent = (qkv.numel() + out.numel() * world) * qkv.element_size() * (world - 1) / world
        results[name] = {
            "qkv_all_to_all_ms": round(there, 4),
            "output_all_to_all_ms": round(back, 4),
            "output_gather_ms": round(gathered, 4),
            "per_step_ms": round(layers * (there + back) + gathered, 2),
            "bytes_sent_per_rank_per_layer": int(sent),
            "algorithm_GBps": round(sent / ((there + back) / 1000.0) / 1e9, 1),
        }
    return results


def compare(single: dict, parallel: dict) -> dict:
    found = {}
    for name in single:
        entry = {}
        if "output" in single[name]:
            a, b = parallel[name]["output"], single[name]["output"]
            entry["step_output_rel_error"] = float((a - b).norm() / b.norm())
        if single[name].get("pixels") is not None and parallel[name].get("pixels") is not None:
            difference = np.abs(parallel[name]["pixels"] - single[name]["pixels"])
            mse = float((difference.astype(np.float64) ** 2).mean())
            entry["image_max_abs_diff"] = int(difference.max())
            entry["image_psnr_db"] = round(float(10 * np.log10(255.0**2 / mse)), 2) if mse else float("inf")
        found[name] = entry
    return found


def public(results: dict) -> dict:
    return {name: {k: v for k, v in entry.items() if k not in ("output", "pixels")} for name, entry in results.items()}


def main() -> int:
    args = arguments()
    configure_logging()
    settings = Settings(
        model="tiny" if args.tiny else "random",
        device="cpu" if args.tiny else "auto",
        first_block_cache=False,
        compile=False,
        cuda_graphs=False,
        quantize="fp8" if args.fp8 else "none",
        fp8_attention="off",
    )
    ranks = rank_environment(settings)
    device = torch.device("cpu") if args.tiny else torch.device("cuda", ranks.local_rank)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    store = connect_store(ranks, settings.parallel_port, 600)
    group = join_group(ranks, store, device, 600)
    rank, world, clock = ranks.rank, ranks.world_size, Clock(device)
    result: dict = {
        "world_size": world,
        "settings": "fuse_qkv, attention (measured), eager, no cache" + (", FP8 GEMMs" if args.fp8 else ""),
    }
    if device.type == "cuda":
        result.update(device=torch.cuda.get_device_name(device), gpus=world, torch=torch.__version__)
        import diffusers

        result.update(diffusers=diffusers.__version__, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def write():
        if rank == 0:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    start = time.perf_counter()
    pipe = build_random_pipeline(tiny=args.tiny, device=device, dtype=dtype)
    hardware = Hardware(device.type, torch.cuda.get_device_capability(device) if device.type == "cuda" else None)
    names = ["fuse_qkv", "attention", "flash_attention_3", "dpm_solver"] + (["low_precision_gemm"] if args.fp8 else [])
    stack = stack_for(settings, only=names)
    stack.apply(pipe, hardware)
    result["build_s"] = round(time.perf_counter() - start, 1)
    result["reports"] = {r.name: f"{r.status}: {r.detail}"[:300] for r in stack.reports()}
    loaded = LoadedModel(pipe, "random", settings.model, True, 64 if args.tiny else 512)
    generation = Generation(loaded, Device(device, dtype))
    cases, job_cases = step_cases(pipe.transformer.config, device, dtype, args.tiny), jobs(args.tiny, args.steps)

    single: dict = {}
    if rank == 0:
        single = transformer_steps(pipe.transformer, cases, clock)
        for name, entry in generations(generation, stack, job_cases).items():
            single[name].update(entry)
        result["one_gpu"] = public(single)
        write()
    dist.barrier(group=group.control)

    parallel = ContextParallel(settings)
    parallel.attach(group)
    outcome = parallel.apply(Model(pipe, stack.slots, hardware, earlier={"attention": stack["attention"]}))
    result["context_parallel"] = outcome.detail
    steps = transformer_steps(pipe.transformer, cases, clock)
    result["n_gpus"] = public(steps)
    result["communication"] = communication(group.compute, rank, world, cases, pipe.transformer, device, dtype, clock)
    write()  # the parts most likely to be cut short come last
    for name, entry in generations(generation, stack, job_cases).items():
        steps[name].update(entry)
    result["n_gpus"] = public(steps)
    if rank == 0:
        result["against_one_gpu"] = compare(single, steps)
        result["speedup"] = {
            name: {
                "step": round(single[name]["ms"] / steps[name]["ms"], 3),
                "end_to_end": round(
                    single[name]["timings_ms"]["engine_total"] / steps[name]["timings_ms"]["engine_total"], 3
                ),
                "denoising_ms_per_step": (single[name]["ms_per_step"], steps[name]["ms_per_step"]),
            }
            for name in cases
        }
        for name in cases:
            log.info(
                "%s: step %.1f -> %.1f ms (%.2fx), all-to-all %.1f ms/step, end to end %.0f -> %.0f ms; %s",
                name,
                single[name]["ms"],
                steps[name]["ms"],
                result["speedup"][name]["step"],
                result["communication"][name]["per_step_ms"],
                single[name]["timings_ms"]["engine_total"],
                steps[name]["timings_ms"]["engine_total"],
                result["against_one_gpu"][name],
            )
    write()
    dist.barrier(group=group.control)  # no rank leaves (rank 0 hosts the store) while another still talks
    group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
