"""A bounded job queue in front of one GPU worker thread, and its watchdog. The event loop never waits on the GPU, and
the GPU worker never waits on the event loop.

Watchdog: a job told to stop (its caller timed out or left, or a drain ended) stops at its next denoising step or
phase boundary. If it has not stopped ``stop_grace_s`` (FLUX_JOB_STOP_GRACE_S) later, the worker is *stuck* (a hung
kernel or driver call: a Python thread cannot be killed): ``stuck`` says why, readiness turns 503 with that reason
and new jobs are refused, until the job does return. A worker thread that died is ``failure`` (for good: the
process needs a restart). Both are logged once, when they happen.
"""

from __future__ import annotations

import asyncio
import contextvars
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
    context: contextvars.Context  # the caller's (its request id): the worker thread runs the job in it
    started: bool = False
    abandoned: bool = False  # the caller left (disconnect, timeout) before the job started
    stop_asked: float | None = None  # monotonic time the running job was told to stop
    stop_reason: str = ""


class JobQueue:
    """One job running plus at most ``max_waiting`` waiting; one worker thread runs them back to back.

    The worker thread takes the next job itself as soon as one ends, so the GPU's next job never waits for the
    event loop (busy answering the finished one: JSON, base64); results go back to the loop with
    ``call_soon_threadsafe``. A caller that goes away (its task cancelled, or its timeout) frees its place at once;
    its job is skipped if it has not started, and told to stop (``job.cancel()``) if it has.
    """

    def __init__(self, run: Callable[[Any], Any], max_waiting: int, stop_grace_s: float = 10.0):
        self._run = run
        self.max_waiting = max_waiting
        self.stop_grace_s = stop_grace_s
        self._current: _Item | None = None  # the job the worker thread runs now
        self._watchdog: asyncio.Task | None = None
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
        self._watchdog = self._loop.create_task(self._watch(), name="gpu-watchdog")

    async def stop(self) -> None:
        """Stop taking jobs (one running finishes in its thread; nothing waits for it)."""
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
        if self._watchdog:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)

    @property
    def stuck(self) -> str | None:
        """Why the worker is stuck (its job was told to stop and has not, past the grace); None when it is not."""
        item = self._current
        if item is None or item.stop_asked is None:
            return None
        overdue = time.monotonic() - item.stop_asked
        if overdue < self.stop_grace_s:
            return None
        return (
            f"GPU worker stuck: its job was told to stop {overdue:.0f} s ago ({item.stop_reason}) and has not "
            f"(FLUX_JOB_STOP_GRACE_S={self.stop_grace_s:g}); new jobs are refused until it returns"
        )

    def stuck_seconds(self) -> float:
        """How long the worker has been stuck (0 when it is not)."""
        item = self._current
        if self.stuck is None or item is None or item.stop_asked is None:
            return 0.0
        return time.monotonic() - item.stop_asked - self.stop_grace_s

    async def _watch(self, tick_s: float = 0.5) -> None:
        """Log the worker turning stuck and coming back, once each (readiness reads ``stuck`` itself)."""
        was_stuck = False
        while True:
            await asyncio.sleep(tick_s)
            reason = self.stuck
            if reason and not was_stuck:
                log.error("%s", reason)
            elif was_stuck and not reason:
                log.warning("GPU worker recovered: the stuck job returned")
            was_stuck = reason is not None

    def _ask_to_stop(self, item: _Item, reason: str) -> None:
        if item.started and item.stop_asked is None:
            item.stop_asked, item.stop_reason = time.monotonic(), reason
        cancel = getattr(item.job, "cancel", None)
        if cancel is not None:
            cancel()

    async def submit(self, job: Any, timeout_s: float) -> tuple[Any, float]:
        """Queue a job and wait for it; returns (result, queue wait in ms). Raises QueueFull at once."""
        if self.failure:
            raise WorkerStopped(self.failure)
        if not self.has_room():
            raise QueueFull(f"{self.depth} jobs queued or running; the limit is {self.max_waiting} waiting")
        item = _Item(job, asyncio.get_running_loop().create_future(), time.perf_counter(), contextvars.copy_context())
        with self._ready:
            self.waiting += 1
            self._pending.append(item)
            self._ready.notify()
        self._items.add(item)
        try:
            return await asyncio.wait_for(item.future, timeout_s)
        except BaseException as exc:  # cancelled (client gone) or timed out: free the place, stop the work
            with self._ready:
                if not item.started and not item.abandoned:
                    item.abandoned = True
                    self.waiting -= 1
            reason = f"no result within {timeout_s:g} s" if isinstance(exc, asyncio.TimeoutError) else "caller left"
            self._ask_to_stop(item, reason)
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
            if item.started:
                self._ask_to_stop(item, "the server is shutting down")
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
                self._current = item
                return item

    def _work(self) -> None:
        item = None
        try:
            while (item := self._next()) is not None:
                wait_ms = (time.perf_counter() - item.enqueued) * 1000.0
                try:
                    outcome = (item.context.run(self._run, item.job), wait_ms), None
                except Exception as exc:
                    outcome = None, exc
                self.running = 0
                self._current = None
                self._settle(item, *outcome)
        except BaseException as exc:  # the worker itself died: no job can run any more
            self.failure = f"GPU worker stopped: {exc!r}; the process needs a restart"
            log.critical(self.failure)
            self.running = 0
            self._current = None
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
