"""The engine's lifecycle: load the pipeline once, apply the optimization stack, warm up, then run one job at a time.

    starting -> loading -> warming_up -> ready | failed

No FastAPI here, and no optimization named: the engine calls only the Stack (flux_kontext/stack) and hands each
job to its Generation (generation.py). ``generate`` is called from the single GPU worker thread (see queue.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
import traceback

import torch

from flux_kontext.device import Device, is_sticky_gpu_error, resolve_device, resolve_dtype, seconds_since_process_start
from flux_kontext.generation import Generation, output_size
from flux_kontext.jobs import EngineNotReady, EngineOutOfMemory, Job, JobCancelled, JobRejected, JobResult
from flux_kontext.loading import host_rss_bytes, host_rss_peak_bytes
from flux_kontext.memory_plan import GIB, ModelSizes, plan_for_settings
from flux_kontext.models import LoadedModel, load_model
from flux_kontext.resolution import RequestShape
from flux_kontext.settings import Settings
from flux_kontext.stack import Report, Stack, stack_for
from flux_kontext.startup_decisions import DecisionCache, open_decisions
from flux_kontext.warmup_record import WarmupRecord, generation_key, open_record
from flux_kontext.warmup_shapes import (
    ShapeReadiness,
    captured_graph_shapes,
    compile_cache_state,
    compile_strategy,
    graphs_captured_by,
    graphs_compiled_by,
    vae_readiness,
    warmup_plan,
)

log = logging.getLogger(__name__)
# From process start until torch, diffusers and the rest of what a start needs were imported (this module is imported
# after them): the interpreter and the imports, the first part of /health's ``before_load``.
IMPORTED_AT = seconds_since_process_start()


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / GIB, 3)


class _NoPromptText(logging.Filter):
    """diffusers logs the cut-off part of a long prompt verbatim; user text stays out of our logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "part of your input was truncated" not in record.getMessage()


logging.getLogger("diffusers.pipelines.flux.pipeline_flux_kontext").addFilter(_NoPromptText())


class Engine:
    """Owns the pipeline, its optimization stack and its lifecycle state."""

    def __init__(self, settings: Settings, stack: Stack | None = None):
        self.settings = settings
        self.state = "starting"
        self.reason: str | None = "not loaded yet"
        self.model: LoadedModel | None = None
        self.stack = stack if stack is not None else stack_for(settings)
        self.generation: Generation | None = None
        self._config_error: str | None = None
        try:
            torch_device = resolve_device(settings.device)
        except ValueError as exc:  # reported by load(), so /health can say why
            torch_device, self._config_error = torch.device("cpu"), str(exc)
        self.hardware = Device(torch_device, resolve_dtype(settings.dtype, torch_device))
        self.load_seconds: float | None = None
        self.warmup_seconds: float | None = None
        # Seconds per start-up phase (before_load: from process start to the model load; logged and in /health).
        self.startup_seconds: dict[str, float | None] = {}
        self.load_memory: dict[str, float | None] = {}
        self.decisions = DecisionCache(why_off="not opened yet (the model is not loaded)")
        self._stack_hardware = self.hardware.for_stack()
        self.shapes = ShapeReadiness()  # per request shape: ready before /health is 200, or not (why)
        self.warmup_record = WarmupRecord(
            why_off="warm-up has not run (FLUX_WARMUP=false, or not yet)"
        )  # what it ran, skipped, and why
        self._lock = threading.Lock()

    @property
    def reports(self) -> list[Report]:
        """What each optimization did (snapshots; /health shows them)."""
        return self.stack.reports()

    # ----- lifecycle -------------------------------------------------------------------------------
    def load(self) -> None:
        """Load, optimize and warm up. Never raises: a failure is recorded in ``state``/``reason``."""
        start = time.perf_counter()
        try:
            if self._config_error:
                raise ValueError(self._config_error)
            self.startup_seconds["interpreter_and_imports"] = IMPORTED_AT
            self.startup_seconds["before_load"] = seconds_since_process_start()  # interpreter, imports, app
            self._set_state("loading", f"loading model {self.settings.model!r}")
            with self._phase("load_model"):
                self._load_with_plan()
            with self._phase("optimize"):
                self.stack.apply(self.model.pipe, self._stack_hardware)
                self.after_optimize()
            self.decisions.save()
            log.info("start-up decisions: %s", self.decisions.report()["decisions"])
            if self.settings.warmup:
                self._set_state("warming_up", "running warm-up generations (and compiling, on a GPU)")
                with self._phase("warm_up"):
                    self._warm_up_or_fall_back()
            self.load_seconds = time.perf_counter() - start
            self.startup_seconds["since_process_start"] = seconds_since_process_start()
            self._set_state("ready", None)
            log.info("start-up phases (s): %s", {k: v and round(v, 2) for k, v in self.startup_seconds.items()})
            log.info("engine ready in %.1f s (%s)", self.load_seconds, self.model.kind)
        except Exception as exc:
            log.exception("engine failed to start")
            self._set_state("failed", f"{type(exc).__name__}: {exc}")

    def after_optimize(self) -> None:
        """A check after the stack is applied, before warm-up; an exception fails the start (the parallel engines
        check that every rank splits the transformer)."""

    def _load_with_plan(self) -> None:
        """Load the model where the memory plan puts each part, measuring host and GPU memory on the way."""
        rss_before = host_rss_bytes()
        self.hardware.reset_peak_memory()
        self.model = load_model(self.settings, self.device, self.hardware.dtype, self._choose_plan, self._identify)
        self.load_memory = {
            "host_rss_before_load_gib": _gib(rss_before),
            "host_rss_peak_gib": _gib(host_rss_peak_bytes()),
            "host_rss_after_load_gib": _gib(host_rss_bytes()),
            "gpu_peak_during_load_gib": self.hardware.peak_memory_gib(),
            "seconds": self.model.seconds,
        }
        plan = self.model.plan
        cache = self.settings.prompt_cache == "on" or (
            self.settings.prompt_cache == "auto" and not plan.text_encoder_on_gpu
        )
        self.generation = Generation(self.model, self.hardware, self.settings.prompt_cache_size if cache else 0)
        log.info("memory plan: %s", json.dumps(plan.public()))
        log.info("load memory: %s", self.load_memory)

    def _identify(self, model: dict) -> None:
        """The weights are known (``model``: models.model_identity): open the start-up decisions kept for them on
        this GPU, software and settings, before the loader's transforms measure anything."""
        self.decisions = open_decisions(self.settings, self.hardware.for_stack(), self.hardware.dtype, model)
        self.stack.use_decisions(self.decisions)

    def describe_decisions(self) -> dict:
        """/health's ``startup_decisions``: whether the optimize phase's measurements were read back (hit), measured
        (cold), or both (partial); the key they belong to."""
        return self.decisions.report()

    def _choose_plan(self, sizes: ModelSizes):
        """The memory plan for this device and model, and the block transforms the loader runs (called once)."""
        base = self.hardware.for_stack()
        free = self.hardware.free_memory_bytes() if self.hardware.is_cuda else None
        at_load = [name for name, _ in self.stack.load_transforms(base)]
        plan, ruled_out = plan_for_settings(self.settings, sizes, base.capability, free, at_load)
        self._stack_hardware = dataclasses.replace(base, ruled_out=ruled_out, **plan.stack_limits(free is not None))
        return plan, [transform for _, transform in self.stack.load_transforms(self._stack_hardware)]

    def memory_refusal(self, job: Job) -> str | None:
        """Why the memory plan cannot hold this job (None: it can, or nothing is loaded yet)."""
        if self.model is None or self.model.plan is None:
            return None
        width, height, _, context = output_size(job)
        mode = "edit" if context is not None else "text_to_image"
        request = RequestShape(mode, width, height, num_images=job.num_images, context=context)
        return self.model.plan.refusal(request)

    def describe_memory(self) -> dict | None:
        """The memory plan, the prompt cache and the memory measured at load (/health)."""
        if self.model is None or self.model.plan is None:
            return None
        cache = self.generation.prompts.cache if self.generation else None
        return {
            **self.model.plan.public(),
            "prompt_cache": cache.public() if cache else None,
            "load": self.load_memory,
        }

    @contextlib.contextmanager
    def _phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.startup_seconds[name] = time.perf_counter() - start

    def _set_state(self, state: str, reason: str | None) -> None:
        self.state, self.reason = state, reason

    @property
    def device(self) -> torch.device:
        return self.hardware.torch_device

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def _warm_up_or_fall_back(self) -> None:
        """Warm up; if that fails, let the stack undo what can be undone (it says why), and retry once."""
        try:
            self._warm_up()
            return
        except Exception as exc:
            undone = self.stack.undo_after_failed_warmup(exc)
            if not undone:
                raise
            log.exception("warm-up failed; undid %s and retrying", ", ".join(undone))
        self._warm_up(retry=True)

    def _warm_up(self, retry: bool = False) -> None:
        """Run every shape a request can bring (flux_kontext/warmup_shapes.py), so that compiled code exists for each
        before /health is 200; the 1024² shapes also with each per-request switch off (their compiled variants).

        On the GPU the 1024² edit and text-to-image run two steps (their CUDA graphs are captured here); the rest,
        and those two with a switch off, one. Without compiled code (the CPU path) one small edit checks the whole path.

        On a restart whose kept compiled-code caches hit, the generations that compiled nothing when they last ran
        with this fingerprint are skipped (warmup_record.py); ``retry``: after an undo, everything runs and nothing
        is kept."""
        start = time.perf_counter()
        seed = self.settings.seed_for_warmup
        self.shapes.start_warmup(compile_strategy(self.reports))
        record = open_record(self.settings, self.decisions.key, compile_cache_state(self.reports), retry)
        self.warmup_record = record
        plan = warmup_plan(self.settings.warmup_shapes, self.shapes.strategy)
        variants = self.stack.warmup_job_variants()  # job fields: flags switched off, adapters on, ...
        runs = 0
        for fields in variants:
            default = fields == {"flags": {}}
            for planned in plan:
                if not default and not planned.all_variants:
                    continue
                # A variant needs its compiled code only: one step. Its CUDA graphs are captured by its shape's first
                # request (0.3-0.5 s on an H200, as for a generation a restart skips), not on every start.
                steps = planned.steps if default else 1
                generation = generation_key(planned.shape.key, steps, fields)
                why = record.skip_reason(generation)
                if why is not None:
                    record.skipped(generation, why)
                    if default:
                        self.shapes.record_skipped(planned.shape, why)
                    log.info("warm-up %s %s, %d step(s): skipped, %s", planned.shape.key, fields, steps, why)
                    continue
                job_start = time.perf_counter()
                result = self._generate(dataclasses.replace(planned.shape.job(seed, steps), **fields))
                seconds = time.perf_counter() - job_start
                if default:
                    self.shapes.record_warmup(planned.shape, result, seconds)
                record.ran(generation, graphs_compiled_by(result), graphs_captured_by(result), seconds)
                log.info(
                    "warm-up %s %s, %d step(s): %.2f s, %d graph(s) compiled",
                    planned.shape.key,
                    fields,
                    steps,
                    seconds,
                    graphs_compiled_by(result),
                )
                runs += 1
        record.save()
        self.warmup_seconds = time.perf_counter() - start
        report = record.report()
        skipped = len(report["skipped"])
        log.info(
            "warm-up: %d generations in %.1f s (%s shapes), %d skipped (%s)",
            runs,
            self.warmup_seconds,
            self.shapes.strategy,
            skipped,
            "compiled nothing when last run with this fingerprint" if skipped else report["why_not"],
        )

    def shapes_report(self) -> dict:
        """/health's ``shapes``: per shape class, how each is served (warmup_shapes.Readiness), which hold CUDA
        graphs, where the VAE runs compiled code, and which warm-up generations ran or were skipped (``warmup``)."""
        reports = self.reports
        report = self.shapes.report(captured_graph_shapes(reports), vae_readiness(reports))
        return {**report, "warmup": self.warmup_record.report()}

    # ----- generation ------------------------------------------------------------------------------
    def check(self, job: Job) -> None:
        """Raise JobRejected (a 422) for a job this engine cannot serve (an adapter it has not loaded, say), before
        the job is queued."""
        self.stack.check(job)

    def generate(self, job: Job) -> JobResult:
        """Run one job. Raises EngineNotReady, EngineOutOfMemory, JobRejected or JobCancelled."""
        if not self.ready:
            raise EngineNotReady(f"engine is {self.state}: {self.reason}")
        refusal = self.memory_refusal(job)  # the service refused it before queueing; the CLI's way in is here
        if refusal is not None:
            raise JobRejected(refusal)
        try:
            result = self._generate(job)
        except torch.OutOfMemoryError as exc:
            self._release_after(exc)
            raise EngineOutOfMemory(
                f"out of GPU memory for this request ({job.num_images} image(s)); "
                "retry with fewer images or a smaller size"
            ) from exc
        except BaseException as exc:
            self._release_after(exc)
            if isinstance(exc, RuntimeError) and self.hardware.is_cuda and is_sticky_gpu_error(exc):
                # After an illegal access or device assert every later CUDA call fails: say so, so that
                # /health and the readiness probe turn 503 and the orchestrator restarts the process.
                self._set_state("failed", f"GPU error, the process needs a restart: {exc}")
                raise EngineNotReady(self.reason) from exc
            raise
        self.shapes.record_request(job, result)
        log.info(  # in the worker thread, under the request's id (queue.py runs the job in its caller's context)
            "generated %d image(s) %dx%d, %d steps (%s) in %.0f ms",
            len(result.images),
            result.width,
            result.height,
            result.steps,
            result.scheduler,
            result.timings_ms["engine_total"],
        )
        return result

    def _release_after(self, exc: BaseException) -> None:
        """A failed job's memory back to the GPU. Its traceback's frames hold the job's tensors (latents, embeddings)
        for as long as the exception lives (it travels to the caller through the queue): drop their locals first."""
        traceback.clear_frames(exc.__traceback__)
        self.hardware.release_memory()

    def _generate(self, job: Job) -> JobResult:
        with self._lock:
            return self._run(job)

    def _run(self, job: Job) -> JobResult:
        if job.cancelled.is_set():
            raise JobCancelled("the caller went away before the job started")
        return self.generation.run(job, self.stack)

    # ----- reporting (used by /health, /benchmark and the bench scripts) --------------------------------
    def reset_peak_memory(self) -> None:
        self.hardware.reset_peak_memory()

    def peak_memory_gib(self) -> float | None:
        return self.hardware.peak_memory_gib()

    def memory_bytes(self) -> dict[str, int] | None:
        return self.hardware.memory_bytes()

    def describe_device(self) -> dict:
        return self.hardware.describe()

    def versions(self) -> dict:
        return self.hardware.software_versions()

    def describe_model(self) -> dict:
        if self.model is None:
            return {"source": self.settings.model, "kind": self.settings.model_kind, "demo": None}
        return {
            "source": self.model.source,
            "kind": self.model.kind,
            "demo": self.model.demo,
            "fallback_reason": self.model.fallback_reason,
            "max_sequence_length": self.model.max_sequence_length,
        }
