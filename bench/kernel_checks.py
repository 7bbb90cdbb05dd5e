"""Two checks behind the ninth session's restart changes (issue 11), on the GPU:

1. the cuDNN attention kernel as its aten op (``attention.kernels.cudnn``) against SDPA under
   ``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``, which it replaced: largest difference, bitwise equality;
2. what ``compile.joint_layout`` costs a step: the concatenation of a two-image 1024² edit's text and image rows
   (2 x (512 + 8192) x 3072 bf16), CUDA-event timed over 200 launches.

    python bench/kernel_checks.py --out bench/results/kernel-checks-<gpu>.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cudnn_against_sdpa_kernel() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flux_kontext.optimizations.attention.kernels import cudnn, sdpa

    q, k, v = (torch.randn(1, 4608, 24, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        reference = sdpa(q, k, v)
    out = cudnn(q, k, v)
    return {
        "shape": list(out.shape),
        "max_abs_diff": (out - reference).abs().max().item(),
        "bitwise_equal": torch.equal(out, reference),
    }


def joint_layout_microseconds(launches: int = 200) -> dict:
    from flux_kontext.optimizations.compile import joint_layout

    text = torch.randn(2, 512, 3072, device="cuda", dtype=torch.bfloat16)
    image = torch.randn(2, 8192, 3072, device="cuda", dtype=torch.bfloat16)
    for _ in range(20):
        joint_layout({"encoder_hidden_states": text, "hidden_states": image})
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(launches):
        joint_layout({"encoder_hidden_states": text, "hidden_states": image})
    end.record()
    torch.cuda.synchronize()
    return {"rows": "2 x (512 + 8192) x 3072 bf16", "microseconds": round(start.elapsed_time(end) / launches * 1000, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from bench.resolution_sweep import versions

    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name(),
        "versions": versions(),
        "cudnn_op_against_sdpa_kernel": cudnn_against_sdpa_kernel(),
        "joint_layout": joint_layout_microseconds(),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
