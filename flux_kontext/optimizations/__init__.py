"""The optimization stack: one entry per optimization, applied in a fixed order, each reporting its state.

Contract: every step is ``apply(pipe, context) -> Report | list[Report]``. ``Report.status`` is one of
applied | skipped | unavailable | failed, and ``detail`` always says why. What /health and each response
report comes from these reports, never from a requested flag.

Order (each constraint has its reason), see STEPS:
1. fuse_qkv      - before quantization, so the fused (q|k|v) weight is what gets quantized.
2. channels_last - VAE only; independent of the transformer steps.
3. attention     - installs our processor (kernel chosen by measurement); before compile so the compiled
                   graph holds the kernel call.
4. quantization  - swaps Linear weights for FP8/MXFP4 tensors; before compile, which must trace them.
4b. gelu_sigmoid_form - rewrites the blocks' tanh-GELU (same function); before compile, which fuses it.
4c. fused_gelu_fp8 / fused_norm_rope - route the MLP outputs (and, where every layer is FP8, whole blocks) through
                   our Triton kernels; need the FP8 weights (after quantization) and our attention processor,
                   before compile, which traces the kernels as torch ops.
5. compile       - wraps each block's forward: everything above is inside the compiled code.
6. cuda_graphs   - wraps each (compiled) block's forward in a per-shape graph; after compile, whose kernels
                   it captures.
7. first_block_cache - diffusers' hooks, outermost on each block: its per-step decision runs on the host
                   between graph replays and outside compiled code (no graph break).
8. dpm_solver    - per request, no weights touched; listed so its state is reported like the rest.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

log = logging.getLogger(__name__)

Status = Literal["applied", "skipped", "unavailable", "failed"]


@dataclass
class Report:
    """What one optimization did at load time."""

    name: str
    status: Status
    detail: str
    seconds: float = 0.0
    # Request flag (the seed's API) that may turn this off per request, if any.
    flag: str | None = None
    # Measurements behind the decision (kernel timings, per-layer errors); shown in /health except keys
    # starting with "_" (bulky: e.g. the error of each of 342 quantized layers).
    data: dict = field(default_factory=dict)
    # Context manager factory that disables it for one request; None when it cannot be switched off.
    disable: Callable[[], contextlib.AbstractContextManager] | None = field(default=None, repr=False)
    # Reverts it when it breaks at first use (warm-up); None when it cannot be reverted.
    undo: Callable[[], None] | None = field(default=None, repr=False)

    def public(self) -> dict:
        data = asdict(self)
        data.pop("disable")
        data.pop("undo")
        data["data"] = {key: value for key, value in self.data.items() if not key.startswith("_")}
        data["seconds"] = round(self.seconds, 3)
        data["switchable_per_request"] = self.disable is not None
        return data


@dataclass
class OptimizationContext:
    """What an optimization may look at when it is applied."""

    device_type: str  # "cuda" or "cpu"
    capability: tuple[int, int] | None  # CUDA compute capability, None on CPU
    settings: object


def _steps():
    from flux_kontext.optimizations import (
        activation,
        attention,
        caching,
        compile,
        cuda_graphs,
        fused_fp8,
        layout,
        quantization,
        scheduler,
    )

    return (
        ("fuse_qkv", layout.apply_fuse_qkv),
        ("channels_last", layout.apply_channels_last),
        ("attention", attention.apply),
        (quantization.NAME, quantization.apply),
        (activation.NAME, activation.apply),
        (fused_fp8.NAME, fused_fp8.apply),
        ("compile", compile.apply),
        (cuda_graphs.NAME, cuda_graphs.apply),
        (caching.NAME, caching.apply),
        (scheduler.NAME, scheduler.apply),
    )


def _timed(name: str, apply: Callable) -> list[Report]:
    start = time.perf_counter()
    try:
        result = apply()
        reports = result if isinstance(result, list) else [result]
    except Exception as exc:  # an optimization that breaks must not take the service down
        log.exception("optimization %s failed", name)
        reports = [Report(name, "failed", f"{type(exc).__name__}: {exc}")]
    reports[0].seconds = time.perf_counter() - start
    return reports


def apply_all(pipe, context: OptimizationContext) -> list[Report]:
    """Apply the stack in order; return one report per optimization."""
    reports = [report for name, step in _steps() for report in _timed(name, lambda s=step: s(pipe, context))]
    for report in reports:
        log.info("optimization %-20s %-11s %s", report.name, report.status, report.detail)
    return reports


@dataclass
class RequestPlan:
    """Which optimizations run for one request, and why a requested one does not (or an unwanted one does)."""

    ran: list[str]
    not_applied: list[dict]  # requested (flag true) but did not run
    forced_on: list[dict]  # turned off by the request, but cannot be switched off per request
    switches: list[Callable[[], contextlib.AbstractContextManager]]

    def public(self) -> dict:
        return {"ran": self.ran, "not_applied": self.not_applied, "could_not_turn_off": self.forced_on}


def plan_for_request(reports: list[Report], flags: dict[str, bool]) -> RequestPlan:
    """Resolve a request's use_* flags against what the server really loaded."""
    plan = RequestPlan(ran=[], not_applied=[], forced_on=[], switches=[])
    for report in reports:
        wanted = flags.get(report.flag, True) if report.flag else True
        entry = {"flag": report.flag, "optimization": report.name}
        if report.status != "applied":
            if report.flag and wanted:
                plan.not_applied.append({**entry, "reason": report.detail})
        elif wanted:
            plan.ran.append(report.name)
        elif report.disable is not None:
            plan.switches.append(report.disable)
        else:
            plan.ran.append(report.name)
            plan.forced_on.append(
                {**entry, "reason": "applied to the loaded weights; it cannot be switched per request"}
            )
    return plan
