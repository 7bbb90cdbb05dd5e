"""A bounded job queue in front of one GPU worker thread. The event loop never waits on the GPU."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """No room for another job; the caller should answer 429 with Retry-After."""


class JobQueue:
    """FIFO of at most ``max_waiting`` jobs; one worker runs them one at a time in a dedicated thread.

    A job whose caller went away (cancelled future) before it started is skipped, not run.
    """

    def __init__(self, run: Callable[[Any], Any], max_waiting: int):
        self._run = run
        self.max_waiting = max_waiting
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-worker")
        self.running = 0

    @property
    def depth(self) -> int:
        """Jobs waiting plus the one running."""
        return (self._queue.qsize() if self._queue else 0) + self.running

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_waiting)
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="gpu-worker")

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, job: Any, timeout_s: float) -> tuple[Any, float]:
        """Queue a job and wait for it; returns (result, queue wait in ms). Raises QueueFull at once."""
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((job, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise QueueFull(f"{self.depth} jobs queued or running; the limit is {self.max_waiting} waiting") from None
        return await asyncio.wait_for(future, timeout_s)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job, future, enqueued = await self._queue.get()
            if future.done():  # caller disconnected or timed out while waiting
                continue
            wait_ms = (time.perf_counter() - enqueued) * 1000.0
            self.running = 1
            try:
                result = await loop.run_in_executor(self._executor, self._run, job)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result((result, wait_ms))
            finally:
                self.running = 0
