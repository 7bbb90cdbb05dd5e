"""Rank 0 and the others, through the store: the jobs, each rank's heartbeat and state, and rank 0's watchdog.

Jobs are pickled into ``job/<n>`` keys that the followers wait on, so an idle service holds no collective open
(collectives time out; an idle service must not). A heartbeat thread in every follower writes ``status/<rank>``
twice a second: its state (loading | idle | running | failed | stopped), the job and step it is at, when it last
made progress. Rank 0's watchdog reads them: a rank that exited, stopped writing (killed, frozen), failed, or sits
on one step past FLUX_PARALLEL_STEP_TIMEOUT_S breaks the group (readiness 503 with the reason; a group whose
ranks are out of step cannot be mended, the process needs a restart).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from flux_kontext.jobs import Job

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
POLL_S = 0.005  # a follower waiting for the next job looks this often
STOP = ("stop",)
# Job fields that stay with rank 0: the cancel event (agreed per step instead), progress reporting, the test-only fault.
LOCAL_FIELDS = ("cancelled", "progress", "on_step", "fault")


class LeaderGone(RuntimeError):
    """Rank 0 (and its store) is gone: a follower has nothing left to do."""


def job_to_wire(job: Job) -> dict:
    return {f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.name not in LOCAL_FIELDS}


class JobChannel:
    """Rank 0 publishes messages ("job", fields) / ("stop",) in order; every follower reads them in order."""

    def __init__(self, store: dist.Store):
        self.store = store
        self.sent = 0
        self.received = 0

    def publish(self, message: tuple) -> None:
        self.store.set(f"job/{self.sent}", pickle.dumps(message))
        if self.sent >= 2:  # every follower has read it: job n-1 needed them all in its collectives
            self.store.delete_key(f"job/{self.sent - 2}")
        self.sent += 1

    def receive(self, timeout_s: float) -> tuple | None:
        """The next message, or None if none came within ``timeout_s`` (polled: the store's blocking wait logs a
        warning at every timeout, and a job must start on every rank within milliseconds)."""
        key, deadline = f"job/{self.received}", time.monotonic() + timeout_s
        try:
            while not self.store.check([key]):
                if time.monotonic() > deadline:
                    return None
                time.sleep(POLL_S)
            message = pickle.loads(self.store.get(key))
        except dist.DistError as exc:  # the store lives in rank 0
            raise LeaderGone(f"rank 0's store is gone ({type(exc).__name__}: {exc})") from exc
        self.received += 1
        return message


class Heartbeat:
    """A follower's state in the store, written by a thread so that a busy rank still shows it is alive; the main
    thread calls ``update`` as it goes (each denoising step too). ``on_lost(exc)`` runs when the store is gone
    (rank 0 died): the follower must not outlive it."""

    def __init__(self, store: dist.Store, rank: int, device: str, on_lost: Callable[[Exception], None]):
        self.store, self.rank, self.on_lost = store, rank, on_lost
        self.status = {"rank": rank, "pid": os.getpid(), "device": device, "state": "loading", "detail": None}
        self.status["progress_at"] = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{rank}", daemon=True)

    def start(self) -> Heartbeat:
        self._write()
        self._thread.start()
        return self

    def update(self, **fields) -> None:
        self.status = {**self.status, **fields, "progress_at": time.time()}

    def stop(self, state: str = "stopped") -> None:
        self.update(state=state)
        self._stop.set()
        try:
            self._write()
        except Exception:  # rank 0 may be gone already
            pass

    def _write(self) -> None:
        self.store.set(f"status/{self.rank}", json.dumps({**self.status, "alive_at": time.time()}))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except Exception as exc:
                self.on_lost(exc)
                return


def read_status(store: dist.Store, rank: int) -> dict | None:
    key = f"status/{rank}"
    if not store.check([key]):
        return None
    return json.loads(store.get(key))


class Watchdog:
    """Rank 0's view of the others; ``problem`` is set once (the first thing found wrong) and ``on_problem`` called."""

    def __init__(self, store, world_size: int, settings, on_problem: Callable[[str], None], processes=None):
        self.store, self.world_size, self.settings = store, world_size, settings
        self.on_problem = on_problem
        self.processes = processes or {}  # rank -> subprocess.Popen, when rank 0 started them
        self.problem: str | None = None
        self.statuses: dict[int, dict | None] = {rank: None for rank in range(1, world_size)}
        self.serving = False  # set once the engine is ready: from then on a long step is a hang
        self._stop = threading.Event()
        self._started = time.time()
        self._thread = threading.Thread(target=self._watch, name="parallel-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(HEARTBEAT_S / 2):
            for rank in self.statuses:
                try:
                    why = self.check(rank)
                except Exception as exc:  # the store itself failing is a problem too
                    why = f"rank {rank}: the store failed ({type(exc).__name__}: {exc})"
                if why and self.problem is None:
                    self.problem = why
                    log.error("context parallelism: %s", why)
                    self.on_problem(why)

    def check(self, rank: int) -> str | None:
        """What is wrong with ``rank`` now (None: nothing)."""
        now = time.time()
        process = self.processes.get(rank)
        if process is not None and process.poll() is not None:
            return f"rank {rank} exited (status {process.returncode}): the process group needs a restart"
        status = self.statuses[rank] = read_status(self.store, rank)
        if status is None:
            if now - self._started > self.settings.parallel_start_timeout_s:
                return f"rank {rank} never joined ({self.settings.parallel_start_timeout_s:g} s)"
            return None
        silent = now - status["alive_at"]
        if status["state"] != "stopped" and silent > self.settings.parallel_heartbeat_timeout_s:
            return f"rank {rank} stopped responding: no heartbeat for {silent:.1f} s (dead or frozen)"
        if status["state"] == "failed":
            return f"rank {rank} failed: {status['detail']}"
        stuck = now - status["progress_at"]
        if self.serving and status["state"] == "running" and stuck > self.settings.parallel_step_timeout_s:
            return f"rank {rank} hung: no denoising step for {stuck:.1f} s (job {status.get('job')})"
        return None

    def describe(self) -> list[dict]:
        now = time.time()
        ranks = []
        for rank, status in self.statuses.items():
            if status is None:
                ranks.append({"rank": rank, "state": "not joined"})
                continue
            public = {k: status.get(k) for k in ("rank", "state", "detail", "device", "pid", "job", "step")}
            public["heartbeat_age_s"] = round(now - status["alive_at"], 2)
            ranks.append(public)
        return ranks


class StepAgreement:
    """After each denoising step every rank asks the others whether to stop (rank 0's caller went away): a one-int
    all-reduce on the host group, so that all ranks stop at the same step and their collectives stay in step."""

    def __init__(self, control_group):
        self.group = control_group

    def any(self, flag: bool) -> bool:
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def job_for_run(self, job: Job, cancelled: threading.Event, report: Callable[[int, int], None]) -> Job:
        """``job`` with a cancel event that is set only where all ranks agree, after a step; ``report(done, total)``
        runs first (rank 0: the original job's ``step_done``, which its caller watches)."""
        agreed = threading.Event()

        def step(done: int, total: int) -> None:
            report(done, total)
            if self.any(cancelled.is_set()):
                agreed.set()

        return dataclasses.replace(job, cancelled=agreed, on_step=step, fault=None)
