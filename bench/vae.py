"""The FLUX VAE at 1024² on a GPU: eager vs compiled, each in the default layout and channels-last.

Why: the service compiles the VAE with the transformer and leaves channels-last off; this is the measurement behind
both. Results: BENCHMARKS.md, "The VAE, eager and compiled".

Full-size VAE with random weights (timing does not depend on the values), QKV fused as the service does.
Decode of 1024² latents and encode of a 1024² image; median of 10 after warm-up; relative error against eager
bf16, and (is a difference just bf16 rounding?) eager and compiled bf16 each against the same VAE in fp32.
Channels-last is the serving stack's channels_last optimization; QKV fusion and compile are what fuse_qkv and
compile do to the VAE (diffusers' fuse_qkv_projections, Module.compile of the encoder and decoder), called directly:
those two optimizations also need a transformer.

    python bench/vae.py --out bench/results/vae-h100.json
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import apply_stack, header, output_path_from_args, rel, time_ms, write_json  # noqa: E402
from flux_kontext.models import build_vae  # noqa: E402
from flux_kontext.settings import Settings  # noqa: E402

log = logging.getLogger("bench.vae")


@torch.inference_mode()
def main() -> int:
    out = output_path_from_args(__doc__)
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = build_vae()
    base = base.to(torch.bfloat16).eval()
    base.fuse_qkv_projections()  # what fuse_qkv does to the VAE
    g = torch.Generator(device="cpu").manual_seed(1)
    latents = torch.randn(1, 16, 128, 128, generator=g).to("cuda", torch.bfloat16)
    image = torch.rand(1, 3, 1024, 1024, generator=g).to("cuda", torch.bfloat16) * 2 - 1
    result = {**header(), "variants": {}}
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
                apply_stack(SimpleNamespace(vae=vae), Settings(channels_last=True), ["channels_last"])
            if compiled:  # what compile does to the VAE
                vae.decoder.compile()
                vae.encoder.compile()
            name = ("compiled" if compiled else "eager") + ("+channels_last" if channels_last else "")
            first = {}

            def first_call(v=vae, first=first):
                first["decode"] = v.decode(latents).sample.float()
                first["encode"] = v.encode(image).latent_dist.mean.float()

            row = {"first_call_s": round(time_ms(first_call, repeats=1, warmup=0) / 1000, 1)}
            row["decode_ms"] = round(time_ms(lambda v=vae: v.decode(latents), repeats=10, warmup=0, per_call=True), 2)
            row["encode_ms"] = round(time_ms(lambda v=vae: v.encode(image), repeats=10, warmup=0, per_call=True), 2)
            if not reference:
                reference = dict(first)
            row["decode_rel_error"] = rel(first["decode"], reference["decode"])
            row["encode_rel_error"] = rel(first["encode"], reference["encode"])
            row["decode_rel_error_vs_fp32"] = rel(first["decode"], reference_fp32["decode"])
            row["encode_rel_error_vs_fp32"] = rel(first["encode"], reference_fp32["encode"])
            result["variants"][name] = row
            log.info("%-24s %s", name, row)
            del vae, first
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
