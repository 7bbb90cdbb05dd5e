"""The optimization stack: one entry per optimization, applied in a fixed order, each reporting its state.

Contract: every module exports ``apply(pipe, context) -> Report``. ``Report.status`` is one of
applied | skipped | unavailable | failed, and ``detail`` always says why. What /health and each response
report comes from these reports, never from a requested flag.

Order (each constraint has its reason):
1. attention  - picks the attention kernel; must precede compile so the compiled graph holds the kernel.
2. scheduler  - per request, no weights touched; listed so its state is reported like the rest.
The rest of the seed's stack (QKV fusion, channels-last, first-block cache, FlashAttention 3,
FP8/MXFP4, compile, CUDA graphs) is listed in PLANNED and reported as unavailable until it is built,
with the reason, so that no response claims what did not run.
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
    # Context manager factory that disables it for one request; None when it cannot be switched off.
    disable: Callable[[], contextlib.AbstractContextManager] | None = field(default=None, repr=False)

    def public(self) -> dict:
        data = asdict(self)
        data.pop("disable")
        data["seconds"] = round(self.seconds, 3)
        data["switchable_per_request"] = self.disable is not None
        return data


@dataclass
class OptimizationContext:
    """What an optimization may look at when it is applied."""

    device_type: str  # "cuda" or "cpu"
    capability: tuple[int, int] | None  # CUDA compute capability, None on CPU
    settings: object


# Optimizations of the seed's stack not built yet: (name, request flag, what it will be).
PLANNED: tuple[tuple[str, str | None, str], ...] = (
    ("fuse_qkv", None, "QKV projection fusion"),
    ("channels_last", None, "channels-last VAE"),
    ("first_block_cache", None, "first-block cache"),
    ("flash_attention_3", "use_flash_attention", "FlashAttention 3"),
    ("low_precision_gemm", "use_mxfp4", "FP8 rowwise on Hopper / MXFP4 on Blackwell"),
    ("dpm_solver", "use_dpm_solver", "DPM-Solver++ 2M"),
    ("compile", None, "Inductor compile"),
    ("cuda_graphs", "use_cuda_graphs", "CUDA graphs"),
)
NOT_BUILT = "not built into this server version yet (planned: see the optimization-stack issue)"


def _timed(name: str, apply: Callable[[], Report]) -> Report:
    start = time.perf_counter()
    try:
        report = apply()
    except Exception as exc:  # an optimization that breaks must not take the service down
        log.exception("optimization %s failed", name)
        report = Report(name, "failed", f"{type(exc).__name__}: {exc}")
    report.seconds = time.perf_counter() - start
    return report


def apply_all(pipe, context: OptimizationContext) -> list[Report]:
    """Apply the stack in order; return one report per optimization, built or planned."""
    from flux_kontext.optimizations import attention, scheduler

    reports = [_timed(module.NAME, lambda m=module: m.apply(pipe, context)) for module in (attention, scheduler)]
    built = {r.name for r in reports}
    for name, flag, what in PLANNED:
        if name not in built:
            reports.append(Report(name, "unavailable", f"{what}: {NOT_BUILT}", flag=flag))
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
