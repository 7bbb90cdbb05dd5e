"""Text encoding per new prompt: the pipeline's encode_prompt (CLIP 77 tokens + T5-XXL 512 tokens), eager against
text_encoder_graphs (one CUDA graph per encoder), on the full-size architecture with random weights (same speed as
real ones). Also the eager T5 forward's GPU-busy time from the profiler, to show how much of it is host launch time.

    FLUX_MODEL=random python bench/text_encoder.py --out bench/results/text-encoder-h200.json

``--tiny`` runs the tiny model on the CPU (checks the script, no figures worth reading).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from flux_kontext.logging_setup import configure_logging  # noqa: E402
from flux_kontext.models import build_random_pipeline  # noqa: E402
from flux_kontext.settings import Settings  # noqa: E402
from flux_kontext.stack import Hardware, stack_for  # noqa: E402
from flux_kontext.stack.protocol import Model  # noqa: E402
from flux_kontext.stack.slots import ForwardSlots  # noqa: E402

log = logging.getLogger("bench.text_encoder")
PROMPTS = ["Change the car's color to a deep red, keep everything else", "a watercolor fox in a snowy forest"]


def encode_ms(pipe, sync, repeats: int = 10) -> float:
    """Median ms of encode_prompt over alternating prompts (every call a new prompt for the encoders)."""
    samples = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            sync()
            start = time.perf_counter()
            pipe.encode_prompt(
                prompt=PROMPTS[i % 2], prompt_2=None, max_sequence_length=pipe.tokenizer_2.model_max_length
            )
            sync()
            if i >= 2:
                samples.append((time.perf_counter() - start) * 1000)
    return sorted(samples)[len(samples) // 2]


def t5_busy_ms(pipe) -> dict:
    """The eager T5 forward's kernel time on the GPU against its wall time (the rest is the host launching)."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, 32000, (1, pipe.tokenizer_2.model_max_length), device="cuda")
    with torch.inference_mode():
        pipe.text_encoder_2(ids)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            pipe.text_encoder_2(ids)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) * 1000
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.device_time for e in events) / 1000
    return {"wall_ms": round(wall, 2), "kernel_ms": round(busy, 2), "kernels": len(events)}


def host_profile(pipe, sync, top: int = 12) -> list[dict]:
    """Where encode_prompt's wall time goes on the host (cProfile, cumulative), after the encoders are graphed."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    with torch.inference_mode():
        profiler.enable()
        for prompt in PROMPTS * 3:
            pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=pipe.tokenizer_2.model_max_length)
            sync()
        profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][3])[:top]  # (file, line, name) -> cc, nc, tt, ct
    calls = len(PROMPTS) * 3
    return [
        {"function": f"{Path(key[0]).name}:{key[1]}:{key[2]}", "ms_per_call": round(value[3] * 1000 / calls, 2)}
        for key, value in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    configure_logging()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    pipe = build_random_pipeline(tiny=not cuda, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    import diffusers
    import transformers

    result.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["eager_encode_prompt_ms"] = encode_ms(pipe, sync)
    if cuda:
        result["t5_eager_profile"] = t5_busy_ms(pipe)
        [optimization] = stack_for(Settings(model="random"), only=["text_encoder_graphs"])
        outcome = optimization.apply(Model(pipe=pipe, slots=ForwardSlots(), hardware=Hardware("cuda", (9, 0))))
        result["text_encoder_graphs"] = {"status": outcome.status, "detail": outcome.detail, **outcome.data}
        result["graphed_encode_prompt_ms"] = encode_ms(pipe, sync)
        result["host_profile_graphed"] = host_profile(pipe, sync)
    log.info("%s", json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
