"""What a start spends before the model load: the imports (``python -X importtime``, the modules with the most time of
their own), CUDA's initialisation alone, and whether initialising CUDA in a thread while the main thread imports
the service overlaps the two. Each figure from a fresh process. Run on the GPU:

    python bench/startup_imports.py --out bench/results/startup-imports-<gpu>.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

IMPORT_SERVICE = "import flux_kontext_optimized as m; m.app"
CUDA_ALONE = "import torch; torch.empty(1, device='cuda')"
# The engine module and what it imports (torch, diffusers, transformers), then CUDA, in one thread or two.
SERIAL = "import flux_kontext.engine, torch; torch.empty(1, device='cuda')"
OVERLAPPED = (
    "import threading, torch; t = threading.Thread(target=lambda: torch.empty(1, device='cuda')); t.start(); "
    "import flux_kontext.engine; t.join()"
)


def wall(code: str, *flags: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stderr


def top_self_times(importtime: str, count: int = 25) -> list[dict]:
    rows = []
    for line in importtime.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if match:
            rows.append({"module": match[4], "self_s": int(match[1]) / 1e6, "cumulative_s": int(match[2]) / 1e6})
    return sorted(rows, key=lambda row: row["self_s"], reverse=True)[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overlap", action="store_true", help="also time CUDA's init in a thread during the imports")
    args = parser.parse_args()
    service_s, importtime = wall(IMPORT_SERVICE, "-X", "importtime")
    args.out.with_suffix(".importtime.txt").write_text(importtime)
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "import_service_wall_s": round(service_s, 2),
        "top_self_times": top_self_times(importtime),
    }
    result["import_torch_wall_s"] = round(wall("import torch")[0], 2)
    result["import_torch_and_cuda_init_wall_s"] = round(wall(CUDA_ALONE)[0], 2)
    for name, code in (("serial", SERIAL), ("overlapped", OVERLAPPED)) if args.overlap else ():
        result[f"engine_import_and_cuda_{name}_s"] = round(wall(code)[0], 2)
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
