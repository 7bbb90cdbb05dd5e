"""Render a stages JSON (bench/stages.py) as the markdown table in BENCHMARKS.md ("The stage table"), so that the
table there is the raw result's, not retyped. CPU only; reads the JSON, writes markdown to stdout.

    python bench/stage_table.py bench/results/stages-h100-2026-11-25b.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HEADER = (
    "| stage | adds | mode | steps | transformer ms/step | x floor | VAE ms | text enc ms | end-to-end ms "
    "| vs stage 0 | vs previous | peak GiB | first call s | cache computed/skipped |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def row(stage: dict, mode: str) -> str:
    m = stage["modes"][mode]
    previous = f"{m['speedup_vs_previous']:.2f}x" if m.get("speedup_vs_previous") else "-"
    cache = m.get("first_block_cache")
    cache_text = f"{cache['computed']}/{cache['skipped']} @ {cache['threshold']}" if cache else "off"
    cells = [
        stage["stage"],
        stage["what"],
        "edit" if mode == "edit" else "t2i",
        m["steps"],
        f"{m['transformer_ms_per_step']:.1f}",
        f"{m['floor_ratio']:.2f}",
        f"{m['vae_ms']:.0f}",
        f"{m['text_encoder_ms']:.0f}",
        f"{m['end_to_end_ms']:,.0f}",
        f"{m['speedup_vs_stage0']:.2f}x",
        previous,
        f"{m['peak_gpu_memory_gib']:.1f}",
        f"{stage['first_call_seconds']:.0f}",
        cache_text,
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(path: str) -> int:
    data = json.loads(Path(path).read_text())
    lines = [HEADER]
    for stage in data["stages"]:
        if "error" in stage:
            lines.append(f"| {stage['stage']} | {stage['what']} | failed: {stage['error']} |")
            continue
        lines.extend(row(stage, mode) for mode in ("edit", "text_to_image"))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a JSON written by bench/stages.py")
    sys.exit(main(parser.parse_args().path))
