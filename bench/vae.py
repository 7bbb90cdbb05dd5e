"""The FLUX VAE at 1024² on a GPU: eager vs compiled, each in the default layout and channels-last.

Full-size VAE with random weights (timing does not depend on the values), QKV fused as the service does.
Decode of 1024² latents and encode of a 1024² image; median of 10 after warm-up; relative error against eager
bf16, and (is a difference just bf16 rounding?) eager and compiled bf16 each against the same VAE in fp32.

    python bench/vae.py --out bench/results/vae-h100.json
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.correctness import output_path_from_args, rel  # noqa: E402
from flux_kontext.models import build_vae  # noqa: E402

log = logging.getLogger("bench.vae")


def median_ms(fn, repeats: int = 10) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.inference_mode()
def main() -> int:
    out = output_path_from_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = build_vae()
    base = base.to(torch.bfloat16).eval()
    base.fuse_qkv_projections()
    g = torch.Generator(device="cpu").manual_seed(1)
    latents = torch.randn(1, 16, 128, 128, generator=g).to("cuda", torch.bfloat16)
    image = torch.rand(1, 3, 1024, 1024, generator=g).to("cuda", torch.bfloat16) * 2 - 1
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": {}}
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    fp32 = copy.deepcopy(base).float()
    reference_fp32 = {
        "decode": fp32.decode(latents.float()).sample.float(),
        "encode": fp32.encode(image.float()).latent_dist.mean.float(),
    }
    del fp32
    reference = {}
    for compiled in (False, True):
        for channels_last in (False, True):
            vae = copy.deepcopy(base)
            if channels_last:
                vae = vae.to(memory_format=torch.channels_last)
            if compiled:
                vae.decoder.compile()
                vae.encoder.compile()
            name = ("compiled" if compiled else "eager") + ("+channels_last" if channels_last else "")
            start = time.perf_counter()
            decoded = vae.decode(latents).sample.float()
            encoded = vae.encode(image).latent_dist.mean.float()
            torch.cuda.synchronize()
            row = {"first_call_s": round(time.perf_counter() - start, 1)}
            row["decode_ms"] = round(median_ms(lambda v=vae: v.decode(latents)), 2)
            row["encode_ms"] = round(median_ms(lambda v=vae: v.encode(image)), 2)
            if not reference:
                reference = {"decode": decoded, "encode": encoded}
            row["decode_rel_error"] = rel(decoded, reference["decode"])
            row["encode_rel_error"] = rel(encoded, reference["encode"])
            row["decode_rel_error_vs_fp32"] = rel(decoded, reference_fp32["decode"])
            row["encode_rel_error_vs_fp32"] = rel(encoded, reference_fp32["encode"])
            result["variants"][name] = row
            log.info("%-24s %s", name, row)
            del vae
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
