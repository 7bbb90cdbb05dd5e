"""A bounded job queue in front of one GPU worker thread. The event loop never waits on the GPU, and the GPU worker
never waits on the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
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
    """One job running plus at most ``max_waiting`` waiting; one worker thread runs them back to back.

    The worker thread takes the next job itself as soon as one ends, so the GPU's next job never waits for the
    event loop (busy answering the finished one: JSON, base64); results go back to the loop with
    ``call_soon_threadsafe``. A caller that goes away (its task cancelled, or its timeout) frees its place at once;
    its job is skipped if it has not started, and told to stop (``job.cancel()``) if it has.
    """

    def __init__(self, run: Callable[[Any], Any], max_waiting: int):
        self._run = run
        self.max_waiting = max_waiting
        self.waiting = 0
        self.running = 0
        self.failure: str | None = None
        self._items: set[_Item] = set()  # submitted and still awaited by their callers
        self._pending: deque[_Item] = deque()
        self._ready = threading.Condition()  # guards _pending, waiting, running, started/abandoned
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def depth(self) -> int:
        """Jobs waiting plus the one running."""
        return self.waiting + self.running

    def has_room(self) -> bool:
        return self.depth < self.max_waiting + 1

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._work, name="gpu-worker", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop taking jobs (one running finishes in its thread; nothing waits for it)."""
        with self._ready:
            self._stopping = True
            self._ready.notify_all()

    async def submit(self, job: Any, timeout_s: float) -> tuple[Any, float]:
        """Queue a job and wait for it; returns (result, queue wait in ms). Raises QueueFull at once."""
        if self.failure:
            raise WorkerStopped(self.failure)
        if not self.has_room():
            raise QueueFull(f"{self.depth} jobs queued or running; the limit is {self.max_waiting} waiting")
        item = _Item(job, asyncio.get_running_loop().create_future(), time.perf_counter())
        with self._ready:
            self.waiting += 1
            self._pending.append(item)
            self._ready.notify()
        self._items.add(item)
        try:
            return await asyncio.wait_for(item.future, timeout_s)
        except BaseException:  # cancelled (client gone) or timed out: free the place, stop the work
            with self._ready:
                if not item.started and not item.abandoned:
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

    # ----- the worker thread ------------------------------------------------------------------------------
    def _next(self) -> _Item | None:
        """The next job not abandoned (marked started), or None once stopping."""
        with self._ready:
            while True:
                while not self._pending and not self._stopping:
                    self._ready.wait()
                if self._stopping:
                    return None
                item = self._pending.popleft()
                if item.abandoned:
                    continue
                item.started = True
                self.waiting -= 1
                self.running = 1
                return item

    def _work(self) -> None:
        item = None
        try:
            while (item := self._next()) is not None:
                wait_ms = (time.perf_counter() - item.enqueued) * 1000.0
                try:
                    outcome = (self._run(item.job), wait_ms), None
                except Exception as exc:
                    outcome = None, exc
                self.running = 0
                self._settle(item, *outcome)
        except BaseException as exc:  # the worker itself died: no job can run any more
            self.failure = f"GPU worker stopped: {exc!r}"
            log.critical(self.failure)
            self.running = 0
            for left in [item, *self._pending] if item is not None else list(self._pending):
                self._settle(left, None, WorkerStopped(self.failure))

    def _settle(self, item: _Item, value, exc: BaseException | None) -> None:
        def settle() -> None:
            if item.future.done():
                return
            if exc is not None:
                item.future.set_exception(exc)
            else:
                item.future.set_result(value)

        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass
