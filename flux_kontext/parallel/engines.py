"""The engines of a parallel service: rank 0's (HTTP's engine: it publishes each job, then runs it with the others)
and the followers' (no HTTP: they run what rank 0 publishes, and rank 0 decodes).

Every rank runs the whole generation (text encoding, the scheduler, the latents: the same on every rank for the
same seed); only the transformer is split (context_parallel). Rank 0's warm-up generations are published like
any job, so the followers compile and capture what rank 0 does, in the same order.

A rank that fails mid-job leaves the others waiting in a collective: the group is then broken for good (readiness
503 with the reason) and the process needs a restart. So rank 0 refuses jobs once broken, and a caller that goes
away stops every rank at the same step (control.StepAgreement).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time

from flux_kontext.engine import Engine
from flux_kontext.jobs import EngineNotReady, Job, JobCancelled
from flux_kontext.parallel.control import (
    STOP,
    Heartbeat,
    JobChannel,
    LeaderGone,
    StepAgreement,
    Watchdog,
    job_to_wire,
)
from flux_kontext.parallel.group import ParallelGroup, connect_store, join_group
from flux_kontext.parallel.ranks import RankEnvironment, rank_settings

log = logging.getLogger(__name__)

CUDA_GRAPHS_WHY = (
    "context parallelism: the graphs would hold NCCL all-to-alls, not run on GPUs here yet "
    "(FLUX_PARALLEL_CUDA_GRAPHS=true keeps them)"
)


class _ParallelEngine(Engine):
    """What both kinds of rank share: their settings, the group, the checks on the stack."""

    def __init__(self, settings, ranks: RankEnvironment):
        self.ranks = ranks
        self.group: ParallelGroup | None = None
        super().__init__(rank_settings(settings, ranks))

    def _join(self, store) -> None:
        self.group = join_group(self.ranks, store, self.device, self.settings.parallel_collective_timeout_s)
        self.stack["context_parallel"].attach(self.group)

    def _choose_plan(self, sizes):
        plan, transforms = super()._choose_plan(sizes)
        if not self.settings.parallel_cuda_graphs:
            ruled_out = (*self._stack_hardware.ruled_out, ("cuda_graphs", CUDA_GRAPHS_WHY))
            self._stack_hardware = dataclasses.replace(self._stack_hardware, ruled_out=ruled_out)
        return plan, transforms

    def after_optimize(self) -> None:
        parallel = self.stack["context_parallel"]
        if not parallel.applied:  # this rank would run the whole sequence while the others wait for it
            raise RuntimeError(f"context_parallel {parallel.status}: {parallel.detail}")


class LeaderEngine(_ParallelEngine):
    """Rank 0: starts (FLUX_PARALLEL) or meets (torchrun) the other ranks, watches them, publishes every job."""

    def __init__(self, settings, ranks: RankEnvironment):
        self.broken: str | None = None
        self.processes: dict = {}
        self.channel: JobChannel | None = None
        self.agreement: StepAgreement | None = None
        self.watchdog: Watchdog | None = None
        super().__init__(settings, ranks)

    def load(self) -> None:
        try:
            self._set_state("starting", f"starting {self.ranks.world_size} ranks ({self.ranks.launcher})")
            store = connect_store(self.ranks, self.settings.parallel_port, self.settings.parallel_start_timeout_s)
            if self.ranks.launcher == "spawn":
                from flux_kontext.parallel.launch import spawn_followers

                self.processes = spawn_followers(self.ranks.world_size)
            self.watchdog = Watchdog(store, self.ranks.world_size, self.settings, self._break, self.processes).start()
            self._join(store)
            self.channel, self.agreement = JobChannel(store), StepAgreement(self.group.control)
        except Exception as exc:
            log.exception("context parallelism: the ranks could not start")
            self._set_state("failed", f"the ranks could not start: {type(exc).__name__}: {exc}")
            return
        super().load()
        self.watchdog.serving = self.ready

    def _run(self, job: Job):
        if job.cancelled.is_set():
            raise JobCancelled("the caller went away before the job started")
        if self.broken is not None:
            raise EngineNotReady(self.broken)
        self.channel.publish(("job", job_to_wire(job)))
        agreed = self.agreement.job_for_run(job, job.cancelled, job.step_done)
        try:
            return self.generation.run(agreed, self.stack)
        except JobCancelled:
            raise  # every rank stopped at the same step
        except BaseException as exc:
            self._break(f"rank 0 failed mid-job ({type(exc).__name__}: {exc}): the ranks are out of step")
            raise

    def _set_state(self, state: str, reason: str | None) -> None:
        if self.broken is None or state == "failed":
            super()._set_state(state, reason)

    def _break(self, why: str) -> None:
        """The group cannot go on: readiness 503 with ``why``, for good."""
        if self.broken is None:
            self.broken = f"{why}; the process group needs a restart"
            log.error("context parallelism broken: %s", self.broken)
        self._set_state("failed", self.broken)

    def describe_parallel(self) -> dict:
        """/health's ``parallel``: the world, whether it is whole, each rank's state."""
        leader = {"rank": 0, "state": self.state, "device": str(self.device), "pid": os.getpid()}
        return {
            "world_size": self.ranks.world_size,
            "launcher": self.ranks.launcher,
            "backend": self.group.backend if self.group else None,
            "healthy": self.broken is None,
            "problem": self.broken,
            "ranks": [leader, *(self.watchdog.describe() if self.watchdog else [])],
        }

    def close(self) -> None:
        """Tell the other ranks to stop, wait for the ones this process started, leave the group."""
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.channel is not None:
            try:
                self.channel.publish(STOP)
            except Exception as exc:
                log.warning("could not tell the ranks to stop: %s", exc)
        for rank, process in self.processes.items():
            try:
                process.wait(10)
            except Exception:
                log.warning("rank %d did not stop within 10 s: killed", rank)
                process.kill()
                process.wait()
        if self.group is None:
            return
        if self.broken is None or self.group.backend == "gloo":
            self.group.close()
            return
        # A rank gone mid-job leaves NCCL kernels waiting on it, which a normal exit would wait for too.
        log.error("context parallelism broken (%s): exiting now", self.broken)
        logging.shutdown()
        os._exit(1)


class FollowerEngine(_ParallelEngine):
    """Ranks 1..N-1: load, apply the stack, then run each job rank 0 publishes, until it says stop."""

    def __init__(self, settings, ranks: RankEnvironment):
        self.heartbeat: Heartbeat | None = None
        self._stop_by: float | None = None  # SIGTERM: stop when rank 0 says so, or by this time
        super().__init__(settings, ranks)

    def serve(self) -> int:
        """Run until rank 0 says stop (0), rank 0 disappears (the process exits), or SIGTERM's grace ends."""
        signal.signal(signal.SIGTERM, self._terminated)
        store = connect_store(self.ranks, self.settings.parallel_port, self.settings.parallel_start_timeout_s)
        self.heartbeat = Heartbeat(store, self.ranks.rank, str(self.device), _leader_lost).start()
        try:
            self._join(store)
            self.load()
            if not self.ready:
                self.heartbeat.update(state="failed", detail=self.reason)
                return self._wait_for_stop(JobChannel(store))
            self.generation._decode = lambda latents, width, height: []  # rank 0 decodes
            return self._serve_jobs(JobChannel(store), StepAgreement(self.group.control))
        except LeaderGone as exc:
            _leader_lost(exc)
        except Exception as exc:
            log.exception("rank %d failed", self.ranks.rank)
            self.heartbeat.update(state="failed", detail=f"{type(exc).__name__}: {exc}")
            try:
                return self._wait_for_stop(JobChannel(store))
            except LeaderGone as gone:
                _leader_lost(gone)
        finally:
            self.heartbeat.stop()
            if self.group is not None:
                self.group.close()

    def _serve_jobs(self, channel: JobChannel, agreement: StepAgreement) -> int:
        self.heartbeat.update(state="idle", detail=None)
        while True:
            message = channel.receive(0.5)
            if message is None:
                if self._stop_by is not None and time.time() > self._stop_by:
                    log.warning("rank %d: SIGTERM and no stop from rank 0: leaving", self.ranks.rank)
                    return 0
                continue
            if message == STOP:
                return 0
            number = channel.received - 1
            self.heartbeat.update(state="running", job=number, step=None)
            job = agreement.job_for_run(Job(**message[1]), threading.Event(), self._step_done)
            try:
                self.generation.run(job, self.stack)
            except JobCancelled:
                pass  # rank 0's caller went away; every rank stopped at the same step
            self.heartbeat.update(state="idle", job=None, step=None)

    def _step_done(self, done: int, total: int) -> None:
        self.heartbeat.update(step=[done, total])

    def _wait_for_stop(self, channel: JobChannel) -> int:
        """A failed rank stays (its heartbeat says why, for rank 0's /health) until stopped."""
        while self._stop_by is None or time.time() < self._stop_by:
            message = channel.receive(0.5)
            if message == STOP:
                break
        return 1

    def _terminated(self, signum, frame) -> None:
        # torchrun signals every rank at once: rank 0 drains (needing us for the jobs it finishes), then says stop.
        self._stop_by = time.time() + self.settings.drain_timeout_s + 15
        log.warning("rank %d: SIGTERM, stopping when rank 0 says so", self.ranks.rank)


def _leader_lost(exc: Exception) -> None:
    """Rank 0's store is gone: rank 0 died. Nothing here can finish a job alone; leave now."""
    log.error("rank 0 is gone (%s): exiting", exc)
    os._exit(3)
