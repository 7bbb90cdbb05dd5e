"""What a restart pays to get a compiled VAE part back: dynamo on a kept Inductor cache, or an AOTInductor package.

Why (issue 11): on a restart with a kept FLUX_COMPILE_CACHE_DIR the warm-up's edit spends 9-11 s bringing back 4
compiled graphs (both block kinds, the VAE encoder and decoder) whose code the cache already holds: dynamo traces
each again, then finds the compiled code on disk. An AOTInductor package (torch.export, then
``torch._inductor.aoti_compile_and_package``) is loaded without tracing. This measures both for the full-size FLUX VAE
(random weights, fixed seed) in fresh processes over the same directory:

- ``compile-cold``: ``torch.compile`` (static shapes, as FLUX_COMPILE_VAE=hot) with the caches in the directory;
  seconds of the first call (trace + compile) and of a later call;
- ``compile-hit``: a fresh process over the filled directory: the first call (trace + cache lookups + load);
- ``aoti-build``: export + compile into a package in the directory;
- ``aoti-load``: a fresh process: ``aoti_load_package`` and its first call;
and each output's largest difference from eager. The tracing is host work, so on a CPU the hit's and the load's
seconds are the part a GPU restart shares (plus the GPU's module loads); the compute of a call is not.

    python bench/vae_reload.py --device cpu --part decoder --out bench/results/vae-reload-cpu-<date>.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench.vae_reload")
MODES = ("compile-cold", "compile-hit", "aoti-build", "aoti-load")


def _part_and_input(part_name: str, device: str, latent: int):
    import torch

    sys.path.insert(0, str(ROOT))
    from flux_kontext.models import build_vae

    torch.manual_seed(0)
    vae = build_vae().to(device=device, dtype=torch.float32).eval()
    part = getattr(vae, part_name)
    generator = torch.Generator(device="cpu").manual_seed(1)
    if part_name == "decoder":
        sample = torch.randn(1, vae.config.latent_channels, latent, latent, generator=generator)
    else:
        sample = torch.randn(1, 3, latent * 8, latent * 8, generator=generator)
    return part, sample.to(device)


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return round(time.perf_counter() - start, 3), out


def child(mode: str, part_name: str, device: str, latent: int, directory: Path) -> dict:
    """One mode in this (fresh) process; the caches point into ``directory``."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(directory / "triton")
    import torch

    result: dict = {"mode": mode}
    result["import_and_build_s"], (part, sample) = _timed(lambda: _part_and_input(part_name, device, latent))
    package = directory / f"{part_name}-{device}-{latent}.pt2"
    with torch.inference_mode():
        eager = part(sample)
    if mode.startswith("compile"):
        compiled = torch.compile(part, dynamic=False)
        with torch.inference_mode():
            result["first_call_s"], out = _timed(lambda: compiled(sample))
            result["later_call_s"], _ = _timed(lambda: compiled(sample))
        result["graphs_compiled"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    elif mode == "aoti-build":
        result["export_s"], exported = _timed(lambda: torch.export.export(part, (sample,)))
        result["package_s"], _ = _timed(
            lambda: torch._inductor.aoti_compile_and_package(exported, package_path=str(package))
        )
        result["package_mb"] = round(package.stat().st_size / 2**20, 1)
        return result
    else:
        result["load_s"], runner = _timed(lambda: torch._inductor.aoti_load_package(str(package)))
        with torch.inference_mode():
            result["first_call_s"], out = _timed(lambda: runner(sample))
            result["later_call_s"], _ = _timed(lambda: runner(sample))
    result["max_abs_diff_vs_eager"] = float((out - eager).abs().max())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--part", choices=("decoder", "encoder"), default="decoder")
    parser.add_argument("--latent", type=int, default=32, help="latent height/width (the image is 8x)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/flux-vae-reload"), help="emptied first")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.stdout.write(json.dumps(child(args.child, args.part, args.device, args.latent, args.dir)) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    import torch

    runs = []
    for mode in MODES:
        command = [sys.executable, __file__, "--child", mode, "--part", args.part, "--device", args.device]
        command += ["--latent", str(args.latent), "--dir", str(args.dir)]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = round(time.perf_counter() - start, 2)
        if done.returncode:
            runs.append({"mode": mode, "process_s": wall, "error": done.stderr.strip().splitlines()[-5:]})
        else:
            runs.append({**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": wall})
        log.info("%s", json.dumps(runs[-1]))
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "device": args.device,
        "part": args.part,
        "latent": args.latent,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "runs": runs,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
