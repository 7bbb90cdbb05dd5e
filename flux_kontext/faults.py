"""TEST ONLY: fault injection, to test what a failure inside a generation does to the service.

Off unless FLUX_FAULT_INJECTION=true; then a request may carry ``X-Fault-Inject: <kind>@<phase>[:<step>]``:

- kind ``error``: a RuntimeError (the envelope's 500 ``internal_error``); ``oom``: a CUDA out-of-memory error
  (503 ``out_of_memory``); both first allocate a 64 MiB tensor on the model's device, the memory a real failure
  would leave behind, which the engine must release. ``hang`` / ``hang=<seconds>`` (default 30): the GPU worker
  blocks that long, ignoring any request to stop, as a stuck kernel or driver call would (the watchdog's case).
  ``crash``: the GPU worker itself dies (a BaseException no handler catches; the service needs a restart).
- phase ``text_encoding``, ``denoising`` (``:<step>``, the step it fails after, 1-based; default 1) or ``decoding``.

Examples: ``error@text_encoding``, ``oom@denoising:3``, ``hang=5@decoding``. With injection off the header is
ignored; with it on, a malformed one is a 400. Never enable this in production: any client could fail or stall the
GPU worker.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from flux_kontext.errors import ServiceError

HEADER = "X-Fault-Inject"
PHASES = ("text_encoding", "denoising", "decoding")
SPEC = re.compile(
    r"(?P<kind>error|oom|crash|hang(?:=(?P<seconds>\d+(?:\.\d+)?))?)@(?P<phase>" + "|".join(PHASES) + r")"
    r"(?::(?P<step>[1-9]\d{0,3}))?"
)
BALLAST_BYTES = 64 * 2**20
DEFAULT_HANG_S = 30.0


class InjectedFault(RuntimeError):
    """The ``error`` fault."""


class WorkerCrash(BaseException):
    """The ``crash`` fault: not an Exception, so nothing between the worker and its task catches it."""


@dataclass(frozen=True)
class Fault:
    kind: str  # error | oom | hang | crash
    phase: str
    step: int = 1  # denoising only
    seconds: float = DEFAULT_HANG_S  # hang only

    def describe(self) -> str:
        where = f"denoising step {self.step}" if self.phase == "denoising" else self.phase
        return f"injected {self.kind} in {where} ({HEADER}, FLUX_FAULT_INJECTION)"

    def at(self, phase: str, step: int | None = None, device=None) -> None:
        """Called by the generation at each point it can fail: fires here if this is the fault's point."""
        if phase != self.phase or (phase == "denoising" and step != self.step):
            return
        if self.kind == "hang":
            time.sleep(self.seconds)
            return
        if self.kind == "crash":
            raise WorkerCrash(self.describe())
        import torch

        ballast = torch.empty(BALLAST_BYTES, dtype=torch.uint8, device=device)  # noqa: F841 - held by this frame
        if self.kind == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory: {self.describe()}")
        raise InjectedFault(self.describe())


def fault_from_headers(headers, enabled: bool) -> Fault | None:
    """The fault a request asks for, when injection is enabled; None otherwise (the header is then ignored)."""
    value = headers.get(HEADER)
    if not enabled or value is None:
        return None
    match = SPEC.fullmatch(value.strip())
    if match is None:
        raise ServiceError(
            400,
            "invalid_fault",
            f"{HEADER} must be <error|oom|hang[=seconds]|crash>@<{'|'.join(PHASES)}>[:<step>], e.g. oom@denoising:3",
        )
    kind = match["kind"].split("=")[0]
    seconds = float(match["seconds"]) if match["seconds"] else DEFAULT_HANG_S
    return Fault(kind=kind, phase=match["phase"], step=int(match["step"] or 1), seconds=seconds)
