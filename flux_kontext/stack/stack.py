"""The Stack: the one owner of every optimization, their order, their undo, their per-request knobs and reports.

The engine calls only this: ``apply(pipe, hardware)`` at start, ``warmup_job_variants()`` and
``undo_after_failed_warmup(exc)`` around warm-up, ``check(job)`` before a job is queued, ``request(job)`` around
each generation, ``reports()`` for /health. It never names an optimization. Benches and tests build any subset
with ``stack_for(settings, only=...)``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence

from flux_kontext.stack.protocol import Hardware, Model, Optimization, Report
from flux_kontext.stack.run import RequestRun
from flux_kontext.stack.slots import ForwardSlots

log = logging.getLogger(__name__)


class StackOrderError(ValueError):
    """Two optimizations are in an order their constraints forbid."""


class Stack:
    def __init__(self, optimizations: Sequence[Optimization], slots: ForwardSlots | None = None):
        """``slots``: share another stack's forward slots, to apply several subsets to one model (benches)."""
        self._optimizations = list(optimizations)
        self._by_name = {opt.name: opt for opt in self._optimizations}
        if len(self._by_name) != len(self._optimizations):
            raise StackOrderError(f"an optimization is listed twice: {[opt.name for opt in self._optimizations]}")
        check_order(self._optimizations)
        self.slots = slots if slots is not None else ForwardSlots()

    # ----- lookup ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Optimization]:
        return iter(self._optimizations)

    def __getitem__(self, name: str) -> Optimization:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        return [opt.name for opt in self._optimizations]

    def reports(self) -> list[Report]:
        return [opt.report() for opt in self._optimizations]

    # ----- start-up ----------------------------------------------------------------------------------------
    def use_decisions(self, decisions) -> None:
        """Every optimization reads back and stores its start-up measurements in ``decisions`` (a
        startup_decisions.DecisionCache), before ``load_transforms`` and ``apply``."""
        for opt in self._optimizations:
            opt.decisions = decisions

    def apply(self, pipe, hardware: Hardware) -> list[Report]:
        """Decide and apply each optimization in order; one that breaks is recorded as failed, the rest go on."""
        model = Model(pipe=pipe, slots=self.slots, hardware=hardware)
        for opt in self._optimizations:
            start = time.perf_counter()
            try:
                status, detail, data = self._apply_one(opt, model)
            except Exception as exc:  # an optimization that breaks must not take the service down
                log.exception("optimization %s failed", opt.name)
                status, detail, data = "failed", f"{type(exc).__name__}: {exc}", {}
            opt._record(status, detail, data, seconds=time.perf_counter() - start)
            if status == "applied":
                model.earlier[opt.name] = opt
            log.info("optimization %-20s %-11s %s", opt.name, status, detail)
        return self.reports()

    def load_transforms(self, hardware: Hardware) -> list[tuple[str, object]]:
        """(name, transform) of every optimization that will apply and can work block by block while the
        transformer loads (see ``Optimization.at_load``), in serving order."""
        transforms = []
        for opt in self._optimizations:
            if hardware.ruled_out_reason(opt.name) is None and opt.decide(hardware).go:
                transform = opt.at_load(hardware)
                if transform is not None:
                    transforms.append((opt.name, transform))
        return transforms

    def _apply_one(self, opt: Optimization, model: Model) -> tuple[str, str, dict]:
        ruled_out = model.hardware.ruled_out_reason(opt.name)
        if ruled_out is not None:
            return "skipped", ruled_out, {}
        decision = opt.decide(model.hardware)
        if not decision.go:
            return decision.status, decision.detail, {}
        for needed in opt.requires:
            if needed not in model.earlier:
                why = f"{self[needed].status}: {self[needed].detail}" if needed in self else "not in this stack"
                return "skipped", f"needs {needed} ({why})", {}
        outcome = opt.apply(model)
        return outcome.status, outcome.detail, outcome.data

    def warmup_flag_variants(self) -> list[dict[str, bool]]:
        """The request flags warm-up runs with: all on, then each per-request switch off in turn, so that the code
        each combination needs (compiled variants) exists before the service reports ready."""
        switchable = [opt.flag for opt in self._optimizations if opt.applied and opt.flag and opt.switched_off()]
        return [{}] + [{flag: False} for flag in switchable]

    def warmup_job_variants(self) -> list[dict]:
        """Job fields of each warm-up generation: every flag variant, then what applied optimizations add (a LoRA
        adapter on), so that compiled code and graphs for each exist before the service reports ready."""
        variants = [{"flags": flags} for flags in self.warmup_flag_variants()]
        return variants + [fields for opt in self._optimizations if opt.applied for fields in opt.warmup_fields()]

    def check(self, job) -> None:
        """Every optimization's ``check``: raises JobRejected for a job that cannot be served (before it is queued)."""
        for opt in self._optimizations:
            opt.check(job)

    def undo_after_failed_warmup(self, exc: BaseException) -> list[str]:
        """Undo, newest first, every applied optimization that can be undone; returns their names (none: re-raise)."""
        undone = [opt for opt in reversed(self._optimizations) if opt.applied and opt.undoable]
        for opt in undone:
            opt.undo()
            opt._record("failed", f"broke at warm-up and was undone ({type(exc).__name__}: {exc})")
        return [opt.name for opt in undone]

    # ----- per request ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def request(self, job) -> Iterator[RequestRun]:
        """Around one generation: every optimization's per-request knob; yields what ran, filled in on exit."""
        run = RequestRun(counters={opt.name: None for opt in self._optimizations if opt.counters})
        with contextlib.ExitStack() as stack:
            for opt in self._optimizations:
                stack.enter_context(opt.request(job, run))
            yield run


def check_order(optimizations: Sequence[Optimization]) -> None:
    """Each ``after`` and ``requires`` constraint names an optimization that, if present, comes earlier."""
    position = {opt.name: i for i, opt in enumerate(optimizations)}
    for opt in optimizations:
        for earlier in (*opt.after, *opt.requires):
            if earlier in position and position[earlier] > position[opt.name]:
                raise StackOrderError(f"{opt.name} must come after {earlier}")


def stack_for(settings, only: Iterable[str] | None = None, slots: ForwardSlots | None = None) -> Stack:
    """The serving stack for ``settings`` (every optimization, in order), or the subset named in ``only``; ``slots``
    as for Stack."""
    from flux_kontext.optimizations import build_all

    optimizations = build_all(settings)
    if only is not None:
        wanted = set(only)
        unknown = wanted - {opt.name for opt in optimizations}
        if unknown:
            raise ValueError(f"unknown optimization(s) {sorted(unknown)}")
        optimizations = [opt for opt in optimizations if opt.name in wanted]
    return Stack(optimizations, slots)
