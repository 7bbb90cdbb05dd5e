"""The shapes warm-up runs, and which shapes are ready to serve without compiling (/health's ``shapes``).

What a request can bring to the compiled parts: the transformer blocks see (batch, tokens), where tokens are the
output's (width/16 x height/16) plus, for an edit, the context image's; the VAE encoder sees the context image
(one at a time), the decoder the output (num_images at a time). True CFG runs the transformer a second time on the
same shapes. With compile for dynamic shapes (FLUX_COMPILE_DYNAMIC) one graph serves all of them, so warm-up runs
each shape class once (FLUX_WARMUP_SHAPES=all): the 17 preferred resolutions for edit and text-to-image,
num_images 1-4, true CFG and one explicit size. Each run is checked: the graphs compiled while it ran are counted,
so /health says which shapes warm-up compiled, which are served by code compiled for dynamic dimensions, and
whether any request compiled after ready (it should not; it is logged and counted when it does).

FLUX_WARMUP_SHAPES=compiled (the default) runs only what compiles: the 1024² edit and text-to-image (with each
per-request switch off) and a batch of two; every other shape is then served by those graphs without compiling,
and its CUDA graphs are captured on its second request. A start (cold, or a restart on kept caches) is the shorter
for it; 'all' also captures every shape's graphs before ready. On a restart whose compile cache hits, the warm-up
generations that compiled nothing when they last ran with the same key are skipped (warmup_record.py); a skipped
shape counts as compiled (the graphs it ran on are loaded by the generations before it).

With static compile, warming every shape would compile each one (tens of seconds apiece): warm-up then runs the
1024² shapes only, and the others say "will compile". Without compile (the CPU path) one small edit checks the
whole path and every shape runs eager.

The VAE (FLUX_COMPILE_VAE=hot, the default) runs compiled code for one 1024² image and eager code at other sizes and
batches: ``vae`` in the report says which.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from flux_kontext.jobs import Job, JobResult
from flux_kontext.resolution import PREFERRED_KONTEXT_RESOLUTIONS, Mode, RequestShape, kontext_resolution

log = logging.getLogger(__name__)

HOT_SIZE = (1024, 1024)  # the default size, the one benchmarks and most requests use
EXPLICIT_SIZE = (1280, 720)  # not a preferred resolution: stands for every explicit width/height
CPU_CHECK_IMAGE = (64, 48)  # the CPU path's one edit (snapped to the nearest preferred resolution)
BATCH_SIZES = (2, 3, 4)
# How a shape is served: compiled before ready | by code compiled for dynamic dimensions | compiles on its first
# request | no compiled code at all.
Readiness = Literal["compiled", "dynamic", "will compile", "eager"]


class Shape(RequestShape):
    """One shape class a request can bring (warm-up's view of a RequestShape: its key, a job of it)."""

    @property
    def key(self) -> str:
        key = f"{self.mode} {self.width}x{self.height}"
        if self.context is not None and self.context != (self.width, self.height):
            key += f" context {self.context[0]}x{self.context[1]}"
        if self.num_images != 1:
            key += f" x{self.num_images}"
        return key + (" true_cfg" if self.true_cfg else "")

    def job(self, seed: int, steps: int, flags: dict[str, bool] | None = None) -> Job:
        """A warm-up job of this shape (a flat image: its pixels do not matter, its size does)."""
        context = self.context_size
        return Job(
            prompt="warm-up",
            seed=seed,
            image=Image.new("RGB", context, (128, 64, 32)) if context else None,
            width=self.width,
            height=self.height,
            steps=steps,
            num_images=self.num_images,
            true_cfg_scale=2.0 if self.true_cfg else 1.0,
            negative_prompt="warm-up, negative" if self.true_cfg else None,
            flags=dict(flags or {}),
        )

    @classmethod
    def of_result(cls, job: Job, result: JobResult) -> Shape:
        """The shape a finished job ran at."""
        mode: Mode = "edit" if job.image is not None else "text_to_image"
        context = tuple(result.context_size) if result.context_size else None
        return cls(mode, result.width, result.height, len(result.seeds), result.true_cfg, context)


@dataclass(frozen=True)
class Planned:
    shape: Shape
    steps: int  # 2 where the CUDA graphs should be captured at warm-up (a shape's second call captures)
    all_variants: bool = False  # also with each per-request switch off (their compiled variants)


def _applied(reports, name: str):
    return next((report for report in reports if report.name == name and report.status == "applied"), None)


def compile_strategy(reports) -> Literal["dynamic", "static", "eager"]:
    """From the stack's reports: how the compiled parts treat a new shape."""
    compiled = _applied(reports, "compile")
    if compiled is None:
        return "eager"
    return "dynamic" if compiled.data.get("dynamic_shapes") else "static"


def compile_cache_state(reports) -> str | None:
    """compile's cache at this start ("hit", "cold", "process default"), or None where compile is not applied."""
    compiled = _applied(reports, "compile")
    return None if compiled is None else compiled.data.get("cache")


def captured_graph_shapes(reports) -> list | None:
    """The input shapes that hold CUDA graphs now ([[batch, tokens, channels], [batch, text, width]] each), or None
    where graphs are not applied."""
    graphs = _applied(reports, "cuda_graphs")
    return None if graphs is None else list(graphs.data.get("captured_shapes", []))


def vae_readiness(reports) -> dict:
    """How the VAE's encoder and decoder serve each shape (compile's FLUX_COMPILE_VAE): compiled at every shape, at
    the listed input shapes only (eager elsewhere), or eager everywhere."""
    compiled = _applied(reports, "compile")
    shapes = None if compiled is None else compiled.data.get("vae_compiled_shapes")
    if shapes == "all":
        return {"every_shape": "compiled"}
    if shapes:
        return {"compiled_for_inputs": shapes, "other_shapes": "eager"}
    return {"every_shape": "eager"}


def preferred_shapes() -> list[Shape]:
    """The preferred resolutions, edit (input at that aspect) and text-to-image, one image each."""
    return [Shape(mode, w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS for mode in ("edit", "text_to_image")]


def warmup_plan(warmup_shapes: str, strategy: str) -> list[Planned]:
    """What warm-up runs: see the module docstring. ``warmup_shapes``: FLUX_WARMUP_SHAPES; ``strategy``: from
    ``compile_strategy``."""
    if strategy == "eager":
        width, height = kontext_resolution(*CPU_CHECK_IMAGE)
        return [Planned(Shape("edit", width, height), steps=2)]
    hot = [Planned(Shape(mode, *HOT_SIZE), steps=2, all_variants=True) for mode in ("edit", "text_to_image")]
    if warmup_shapes == "minimal" or strategy == "static":
        return hot
    # A batch above one is the only other graph (dynamo specializes a batch of one): with it every graph a request
    # can need exists, and each other shape is served by them (its CUDA graphs captured on its second request).
    batched = [Planned(Shape(mode, *HOT_SIZE, num_images=2), steps=1) for mode in ("edit", "text_to_image")]
    if warmup_shapes == "compiled":
        return hot + batched
    others = [s for s in preferred_shapes() if (s.width, s.height) != HOT_SIZE]
    for mode in ("edit", "text_to_image"):
        others += [Shape(mode, *HOT_SIZE, num_images=n) for n in BATCH_SIZES]
        others.append(Shape(mode, *HOT_SIZE, true_cfg=True))
    others += [Shape("text_to_image", *EXPLICIT_SIZE), Shape("edit", *EXPLICIT_SIZE, context=HOT_SIZE)]
    return hot + [Planned(shape, steps=1) for shape in others]


class ShapeReadiness:
    """What warm-up compiled per shape and what compiled after ready; ``report`` is /health's ``shapes``."""

    def __init__(self):
        self.strategy: str = "eager"
        self.warmed: dict[str, dict] = {}  # shape key -> graphs compiled while it ran, seconds
        self.after_ready: dict[str, int] = {}  # shape key -> graphs compiled by requests after ready
        self.requests_that_compiled = 0
        self._lock = threading.Lock()  # written by the GPU worker, read by /health

    def start_warmup(self, strategy: str) -> None:
        """A warm-up begins (again, after an undo): what the last one recorded no longer holds."""
        self.strategy = strategy
        self.warmed.clear()

    def record_warmup(self, shape: Shape, result: JobResult, seconds: float) -> None:
        compiled = graphs_compiled_by(result)
        entry = self.warmed.setdefault(shape.key, {"graphs_compiled": 0, "seconds": 0.0})
        entry["graphs_compiled"] += compiled
        entry["seconds"] = round(entry["seconds"] + seconds, 2)

    def record_skipped(self, shape: Shape, why: str) -> None:
        """Warm-up skipped this shape (warmup_record.py): the graphs it ran on last time were loaded by the
        generations before it, so it is served compiled; its CUDA graphs are captured on its first request."""
        self.warmed[shape.key] = {"graphs_compiled": 0, "seconds": 0.0, "skipped": why}

    def record_request(self, job: Job, result: JobResult) -> None:
        compiled = graphs_compiled_by(result)
        if not compiled:
            return
        key = Shape.of_result(job, result).key
        with self._lock:
            self.after_ready[key] = self.after_ready.get(key, 0) + compiled
            self.requests_that_compiled += 1
        log.warning(
            "a request compiled %d graph(s) after ready (%s, %s ms): warm-up did not cover its shape",
            compiled,
            key,
            result.timings_ms.get("engine_total"),
        )

    def readiness(self, shape: Shape) -> Readiness:
        if self.strategy != "eager" and (shape.key in self.warmed or shape.key in self.after_ready):
            return "compiled"
        return self.unwarmed()

    def unwarmed(self) -> Readiness:
        """How a shape that neither warm-up nor a request has run yet is served."""
        return {"eager": "eager", "dynamic": "dynamic"}.get(self.strategy, "will compile")

    def report(self, captured_shapes: list | None = None, vae: dict | None = None) -> dict:
        """``captured_shapes``: the CUDA graphs' captured input shapes ([[batch, tokens, channels], text]), if any;
        ``vae``: ``vae_readiness``."""
        captured = {(shape[0][0], shape[0][1]) for shape in captured_shapes or []}

        def entry(shape: Shape) -> dict:
            item = {"code": self.readiness(shape)}
            if captured_shapes is not None:
                item["cuda_graphs"] = "captured" if (shape.num_images, shape.tokens) in captured else "not captured"
            return item

        preferred = {mode: {} for mode in ("edit", "text_to_image")}
        for shape in preferred_shapes():
            preferred[shape.mode][f"{shape.width}x{shape.height}"] = entry(shape)
        with self._lock:
            after_ready = dict(self.after_ready)
        return {
            "strategy": self.strategy,
            "preferred": preferred,
            "num_images_1024": {
                mode: {str(n): entry(Shape(mode, *HOT_SIZE, num_images=n)) for n in (1, *BATCH_SIZES)}
                for mode in ("edit", "text_to_image")
            },
            "true_cfg_1024": {mode: entry(Shape(mode, *HOT_SIZE, true_cfg=True)) for mode in ("edit", "text_to_image")},
            "explicit_sizes": self.unwarmed(),
            "vae": vae or {"every_shape": "eager"},
            "warmed": {key: dict(value) for key, value in self.warmed.items()},
            "compiled_after_ready": {"requests": self.requests_that_compiled, "graphs_by_shape": after_ready},
        }


def graphs_captured_by(result: JobResult) -> int:
    """CUDA graphs captured while the job ran (cuda_graphs' per-request counter; 0 where graphs are not applied)."""
    counted = result.counters.get("cuda_graphs") or {}
    return int(counted.get("captured", 0))


def graphs_compiled_by(result: JobResult) -> int:
    """Graphs compiled while the job ran, from compile's per-request counter (0 where nothing is compiled)."""
    counted = result.counters.get("compile") or {}
    return int(counted.get("graphs_compiled", 0))
