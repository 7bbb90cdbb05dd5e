"""The contract every optimization follows, and the records it produces.

An optimization is one class with ONE name (its module, its report, its settings section and the docs use it):

- ``decide(hardware)``: from the settings and the hardware alone (no model), whether it is worth applying here.
  Testable as a table.
- ``apply(model)``: does the work on the loaded pipeline; returns an ``Outcome`` (applied, or skipped/unavailable
  when the model itself says no, e.g. no layer survived the FP8 screen). An exception is recorded as failed by the
  Stack, which goes on with the next optimization.
- ``undo()``: reverts it when warm-up breaks (only where ``undoable``).
- ``active(job, run)``: a context manager around one generation when it is applied and the request wants it
  (per-request knobs, counters); ``switched_off()``: the context that turns it off for one request, or None when
  it cannot be (quantized weights).
- ``check(job)``: refuses, before the job is queued, a request it cannot serve (``JobRejected``: a 422);
  ``warmup_fields()``: Job fields of extra warm-up generations (a LoRA adapter on), so that what they compile exists
  before the service is ready.
- ``report()``: a frozen snapshot. Only the optimization itself changes its state, through ``_record``.

Ordering: ``after`` names the optimizations that must come earlier in the Stack (checked when it is built), and
``requires`` those that must have been applied for this one to apply (else it is skipped, saying why).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from flux_kontext.startup_decisions import DecisionCache

if TYPE_CHECKING:
    from flux_kontext.jobs import Job
    from flux_kontext.stack.run import RequestRun
    from flux_kontext.stack.slots import ForwardSlots

Status = Literal["applied", "skipped", "unavailable", "failed"]


@dataclass(frozen=True)
class Hardware:
    """What ``decide`` may look at besides the settings."""

    device_type: str  # "cuda" or "cpu"
    capability: tuple[int, int] | None = None  # CUDA compute capability, None on CPU
    name: str | None = None  # the GPU's name (torch.cuda.get_device_name), None on CPU or when not known
    # (optimization, why) pairs the memory plan (flux_kontext/memory_plan.py) leaves no room for: skipped, saying so.
    ruled_out: tuple[tuple[str, str], ...] = ()
    # The memory plan's GPU budget (bytes the process may use) and what must stay free for the largest request it
    # admits; None: no plan (built outside the engine) or no GPU.
    memory_budget: int | None = None
    request_headroom: int | None = None

    @property
    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    def ruled_out_reason(self, name: str) -> str | None:
        return dict(self.ruled_out).get(name)


@dataclass(frozen=True)
class Decision:
    """``decide``'s answer: go ahead, or skipped / unavailable with the reason."""

    status: Literal["apply", "skipped", "unavailable"]
    detail: str = ""

    @property
    def go(self) -> bool:
        return self.status == "apply"


APPLY = Decision("apply")


def skip(detail: str) -> Decision:
    return Decision("skipped", detail)


def unavailable(detail: str) -> Decision:
    return Decision("unavailable", detail)


@dataclass(frozen=True)
class Outcome:
    """``apply``'s answer: what it did (or why the model made it skip), with the measurements behind it."""

    status: Status
    detail: str
    data: dict = field(default_factory=dict)

    @classmethod
    def applied(cls, detail: str, **data: Any) -> Outcome:
        return cls("applied", detail, data)

    @classmethod
    def skipped(cls, detail: str) -> Outcome:
        return cls("skipped", detail)


@dataclass(frozen=True)
class Report:
    """A snapshot of one optimization's state, as /health shows it (keys starting with "_" in ``data`` are bulky
    and kept out of /health, e.g. the error of each of 342 quantized layers)."""

    name: str
    status: Status
    detail: str
    seconds: float = 0.0
    flag: str | None = None  # the seed's request flag that may turn it off, if any
    data: Mapping = field(default_factory=dict)
    switchable_per_request: bool = False

    def public(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
            "flag": self.flag,
            "data": {key: value for key, value in self.data.items() if not key.startswith("_")},
            "switchable_per_request": self.switchable_per_request,
        }


@dataclass
class Model:
    """What ``apply`` works on: the pipeline, the forward slots of its modules, the hardware."""

    pipe: Any
    slots: ForwardSlots
    hardware: Hardware
    # Applied earlier in this Stack, by name: an optimization may use an earlier one's public results (the kernel
    # choice of attention, say). Only names listed in its ``after`` are guaranteed to be here.
    earlier: dict[str, Optimization] = field(default_factory=dict)
    # State besides a block's arguments that changes what its forward computes (LoRA's side path on or off): each
    # returns a hashable value; CUDA graphs key their captures on all of them, as compile's guards do.
    graph_variants: list[Callable[[], Hashable]] = field(default_factory=list)


class Optimization:
    """Base class: subclasses set ``name`` (and ``flag``/``after``/``requires``), ``decide`` and ``apply``."""

    name: ClassVar[str]
    flag: ClassVar[str | None] = None
    after: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    undoable: ClassVar[bool] = False
    counters: ClassVar[bool] = False  # reports per-request counters (RequestRun.counters[name])

    def __init__(self, settings):
        self.settings = settings
        # What start-up measured earlier for this key (flux_kontext/startup_decisions.py); set by the Stack.
        self.decisions = DecisionCache(why_off="not opened (built outside the engine)")
        self._status: Status = "skipped"
        self._detail = "not applied yet"
        self._data: dict = {}
        self._seconds = 0.0

    # ----- to implement ----------------------------------------------------------------------------------
    def decide(self, hardware: Hardware) -> Decision:
        return APPLY

    def apply(self, model: Model) -> Outcome:
        raise NotImplementedError

    def undo(self) -> None:
        raise NotImplementedError(f"{self.name} cannot be undone")

    def at_load(self, hardware: Hardware):
        """A transform ``(block, name) -> None`` the loader runs on each transformer block as soon as it has its
        weights on the device (so that a full-precision copy never sits there whole), or None. Called only when
        ``decide`` says apply; ``apply`` then reports what was done at load."""
        return None

    def active(self, job: Job, run: RequestRun) -> contextlib.AbstractContextManager:
        """Around one generation that runs it; may add counters or withdraw it from ``run`` (see RequestRun)."""
        return contextlib.nullcontext()

    def switched_off(self) -> contextlib.AbstractContextManager | None:
        """The context that turns it off for one request; None: it cannot be switched per request."""
        return None

    def check(self, job: Job) -> None:
        """Raise JobRejected (a 422 with the reason) for a job this optimization cannot serve; called before the job
        is queued, whatever the optimization's status."""

    def warmup_fields(self) -> list[dict]:
        """Job fields of extra warm-up generations, e.g. {"loras": ...}; none by default."""
        return []

    def wanted(self, job: Job) -> bool:
        return job.flags.get(self.flag, True) if self.flag else True

    @contextlib.contextmanager
    def request(self, job: Job, run: RequestRun):
        """One request: runs it (``active``), switches it off (``switched_off``), or says why it does not run."""
        wanted = self.wanted(job)
        if not self.applied:
            if self.flag and wanted:
                run.record_not_applied(self.name, self.flag, self._detail)
            yield
            return
        off = None if wanted else self.switched_off()
        if off is not None:
            with off:
                yield
            return
        if wanted:
            run.record_ran(self.name)
        else:
            run.record_forced_on(self.name, self.flag)
        with self.active(job, run):
            yield

    # ----- state (read by everyone, written only here) ---------------------------------------------------------
    @property
    def status(self) -> Status:
        return self._status

    @property
    def applied(self) -> bool:
        return self._status == "applied"

    @property
    def detail(self) -> str:
        return self._detail

    def _record(self, status: Status, detail: str, data: dict | None = None, seconds: float | None = None) -> None:
        self._status, self._detail = status, detail
        if data is not None:
            self._data = dict(data)
        if seconds is not None:
            self._seconds = seconds

    def _note(self, **data: Any) -> None:
        """Add measurements to the report (e.g. counts that change while serving)."""
        self._data.update(data)

    def report(self) -> Report:
        return Report(
            name=self.name,
            status=self._status,
            detail=self._detail,
            seconds=self._seconds,
            flag=self.flag,
            data=MappingProxyType(dict(self._data)),
            switchable_per_request=self.applied and self.switched_off() is not None,
        )
