"""A bounded job queue in front of one GPU worker thread. The event loop never waits on the GPU."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """No room for another job; the caller should answer 429 with Retry-After."""


class WorkerStopped(RuntimeError):
    """The GPU worker died; the service cannot run jobs until it is restarted."""


class ShuttingDown(RuntimeError):
    """The server stopped before this job could finish: ``started`` False, it was never run; True, it was stopped."""

    def __init__(self, message: str, started: bool):
        super().__init__(message)
        self.started = started


@dataclass(eq=False)
class _Item:
    job: Any
    future: asyncio.Future
    enqueued: float
    started: bool = False
    abandoned: bool = False  # the caller left (disconnect, timeout) before the job started


class JobQueue:
    """One job running plus at most ``max_waiting`` waiting; one worker runs them in a dedicated thread.

    A caller that goes away (its task cancelled, or its timeout) frees its place at once; its job is skipped
    if it has not started, and told to stop (``job.cancel()``) if it has.
    """

    def __init__(self, run: Callable[[Any], Any], max_waiting: int):
        self._run = run
        self.max_waiting = max_waiting
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-worker")
        self.waiting = 0
        self.running = 0
        self.failure: str | None = None
        self._items: set[_Item] = set()  # submitted and still awaited by their callers

    @property
    def depth(self) -> int:
        """Jobs waiting plus the one running."""
        return self.waiting + self.running

    def has_room(self) -> bool:
        return self.depth < self.max_waiting + 1

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="gpu-worker")
        self._worker.add_done_callback(self._on_worker_exit)

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _on_worker_exit(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        self.failure = f"GPU worker stopped: {task.exception()!r}"
        log.critical(self.failure)

    async def submit(self, job: Any, timeout_s: float) -> tuple[Any, float]:
        """Queue a job and wait for it; returns (result, queue wait in ms). Raises QueueFull at once."""
        if self.failure:
            raise WorkerStopped(self.failure)
        if not self.has_room():
            raise QueueFull(f"{self.depth} jobs queued or running; the limit is {self.max_waiting} waiting")
        item = _Item(job, asyncio.get_running_loop().create_future(), time.perf_counter())
        self.waiting += 1
        self._queue.put_nowait(item)
        self._items.add(item)
        try:
            return await asyncio.wait_for(item.future, timeout_s)
        except BaseException:  # cancelled (client gone) or timed out: free the place, stop the work
            if not item.started:
                item.abandoned = True
                self.waiting -= 1
            cancel = getattr(job, "cancel", None)
            if cancel is not None:
                cancel()
            raise
        finally:
            self._items.discard(item)

    async def until_idle(self, timeout_s: float) -> bool:
        """Wait until no job is queued or running, at most ``timeout_s``; True if it got there."""
        deadline = time.monotonic() + timeout_s
        while self.depth and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self.depth

    def abort(self, not_run: str, stopped: str) -> int:
        """Answer every job still awaited at once with ShuttingDown (``not_run`` for those waiting, ``stopped`` for
        the running one): waiting jobs are skipped, the running one is told to stop at its next step (its caller's
        ``submit`` cancels it). Returns how many were answered."""
        count = 0
        for item in list(self._items):
            if not item.future.done():
                item.future.set_exception(ShuttingDown(stopped if item.started else not_run, item.started))
                count += 1
        return count

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._queue.get()
            if item.abandoned:
                continue
            item.started = True
            self.waiting -= 1
            self.running = 1
            wait_ms = (time.perf_counter() - item.enqueued) * 1000.0
            try:
                result = await loop.run_in_executor(self._executor, self._run, item.job)
            except Exception as exc:
                if not item.future.done():
                    item.future.set_exception(exc)
            else:
                if not item.future.done():
                    item.future.set_result((result, wait_ms))
            finally:
                self.running = 0
