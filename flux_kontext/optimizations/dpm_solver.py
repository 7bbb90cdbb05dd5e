"""dpm_solver: the few-step solver (default unipc: UniPC-2 on a tapered-shift schedule) chosen per request; no
weights touched. The name is the seed's (its flag is use_dpm_solver); the solver it selects is DEFAULT_SOLVER.

The schedulers themselves (names, default steps, classes, maths) live in flux_kontext.schedulers. This optimization
checks at load that the model's scheduler config seeds every one of them, and per request picks the scheduler: the
request's ``scheduler``, else DEFAULT_SOLVER when ``use_dpm_solver`` allows it, else the model's Euler.
"""

from __future__ import annotations

import contextlib

from flux_kontext.jobs import Job, JobRejected
from flux_kontext.schedulers import DEFAULT_SOLVER, EULER, SCHEDULER_DEFAULT_STEPS, SCHEDULERS, make_scheduler
from flux_kontext.stack import Model, Optimization, Outcome, RequestRun


class DpmSolver(Optimization):
    name = "dpm_solver"
    flag = "use_dpm_solver"

    def apply(self, model: Model) -> Outcome:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = model.pipe.scheduler
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            return Outcome(
                "failed", f"loaded scheduler is {type(scheduler).__name__}; expected FlowMatchEulerDiscreteScheduler"
            )
        config = dict(scheduler.config)
        for name in SCHEDULERS:  # a config a scheduler cannot take fails here at load, not on the first request
            trial = make_scheduler(name, config)
            trial.set_timesteps(2, sigmas=[1.0, 0.5], mu=1.0)  # the pipeline's call: custom sigmas plus the shift mu
        listed = ", ".join(f"{name} ({SCHEDULER_DEFAULT_STEPS[name]} steps)" for name in SCHEDULERS)
        return Outcome.applied(f"default {DEFAULT_SOLVER}; available: {listed}; new instance per request")

    def switched_off(self):
        return contextlib.nullcontext()  # off means euler, which request() picks; nothing to undo

    @contextlib.contextmanager
    def request(self, job: Job, run: RequestRun):
        wanted = self.wanted(job)
        if not self.applied:
            if job.scheduler not in (None, EULER):
                raise JobRejected(f"scheduler {job.scheduler!r} is not available on this server; use 'euler'")
            if wanted:
                run.record_not_applied(self.name, self.flag, self.detail)
            run.scheduler = EULER
            yield
            return
        run.scheduler = job.scheduler or (DEFAULT_SOLVER if wanted else EULER)
        if run.scheduler != EULER:
            run.record_ran(self.name)
        elif wanted:
            run.record_not_applied(self.name, self.flag, "the request chose scheduler 'euler'")
        yield
