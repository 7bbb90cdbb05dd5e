"""The job queue on its own: capacity, callers that leave, a dead worker."""

from __future__ import annotations

import asyncio
import threading

import pytest

from flux_kontext.queue import JobQueue, QueueFull, WorkerStopped


class FakeJob:
    def __init__(self, name: str):
        self.name, self.cancelled = name, threading.Event()

    def cancel(self):
        self.cancelled.set()


def run_async(coroutine):
    return asyncio.run(coroutine)


def test_capacity_is_one_running_plus_max_waiting_even_in_a_burst():
    async def scenario():
        gate, ran = threading.Event(), []
        queue = JobQueue(lambda job: (gate.wait(5), ran.append(job.name))[1], max_waiting=2)
        queue.start()
        tasks = [asyncio.ensure_future(queue.submit(FakeJob(f"j{i}"), 10)) for i in range(4)]
        await asyncio.sleep(0.1)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await queue.stop()
        return results, ran

    results, ran = run_async(scenario())
    assert [isinstance(r, QueueFull) for r in results] == [False, False, False, True]
    assert ran == ["j0", "j1", "j2"]


def test_a_caller_that_leaves_frees_its_place_and_its_job_is_skipped_or_stopped():
    async def scenario():
        gate, ran = threading.Event(), []
        queue = JobQueue(lambda job: (gate.wait(5), ran.append(job.name))[1], max_waiting=1)
        queue.start()
        running, waiting = FakeJob("running"), FakeJob("waiting")
        first = asyncio.ensure_future(queue.submit(running, 10))
        second = asyncio.ensure_future(queue.submit(waiting, 10))
        await asyncio.sleep(0.1)
        assert queue.depth == 2 and not queue.has_room()
        second.cancel()  # the waiting caller disconnects
        first.cancel()  # so does the running one
        await asyncio.sleep(0.05)
        depth_after = queue.depth  # only the running job still holds a place
        gate.set()
        await asyncio.sleep(0.2)
        await queue.stop()
        return running, waiting, depth_after, ran

    running, waiting, depth_after, ran = run_async(scenario())
    assert running.cancelled.is_set() and waiting.cancelled.is_set()
    assert depth_after == 1
    assert ran == ["running"]  # the waiting job never ran


class WorkerCrash(BaseException):
    """Not an Exception: what a job's failure never is (those go to its caller), a crash of the worker itself."""


def test_a_dead_worker_answers_its_jobs_and_refuses_new_ones():
    async def scenario():
        def run(job):
            raise WorkerCrash("boom")

        queue = JobQueue(run, max_waiting=1)
        queue.start()
        with pytest.raises(WorkerStopped, match="GPU worker stopped.*boom"):
            await queue.submit(FakeJob("x"), 5)
        with pytest.raises(WorkerStopped, match="GPU worker stopped"):
            await queue.submit(FakeJob("y"), 1)
        await queue.stop()

    run_async(scenario())


def test_jobs_run_in_order_and_a_failing_job_fails_only_its_caller():
    async def scenario():
        def run(job):
            if job.name == "bad":
                raise ValueError("bad job")
            return job.name

        queue = JobQueue(run, max_waiting=4)
        queue.start()
        names = ["a", "bad", "b"]
        results = await asyncio.gather(*(queue.submit(FakeJob(n), 5) for n in names), return_exceptions=True)
        await queue.stop()
        return results

    first, failed, last = run_async(scenario())
    assert first[0] == "a" and last[0] == "b"
    assert isinstance(failed, ValueError) and "bad job" in str(failed)
