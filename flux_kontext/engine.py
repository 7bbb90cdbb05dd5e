"""The engine: load the pipeline once, apply the stack, warm up, then run one job at a time.

No FastAPI here. ``generate`` is called from the single GPU worker thread (see queue.py); it never runs
concurrently with itself, so the per-request scheduler swap below is safe.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import torch
from PIL import Image

from flux_kontext.device import Device, is_sticky_gpu_error, resolve_device, resolve_dtype
from flux_kontext.jobs import (
    DEFAULT_DPM,
    PHASES,
    EngineNotReady,
    EngineOutOfMemory,
    Job,
    JobCancelled,
    JobRejected,
    JobResult,
)
from flux_kontext.models import LoadedModel, load_model
from flux_kontext.optimizations import (
    OptimizationContext,
    Report,
    RequestPlan,
    apply_all,
    cuda_graphs,
    plan_for_request,
)
from flux_kontext.optimizations.scheduler import DEFAULT_STEPS, make_scheduler
from flux_kontext.optimizations.scheduler import NAME as DPM_REPORT
from flux_kontext.resolution import kontext_resolution
from flux_kontext.settings import Settings
from utils import PhaseTimer, pixels_to_pil

log = logging.getLogger(__name__)


class _NoPromptText(logging.Filter):
    """diffusers logs the cut-off part of a long prompt verbatim; user text stays out of our logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "part of your input was truncated" not in record.getMessage()


logging.getLogger("diffusers.pipelines.flux.pipeline_flux_kontext").addFilter(_NoPromptText())

DEFAULT_TEXT_TO_IMAGE_SIZE = (1024, 1024)


class Engine:
    """Owns the pipeline and its lifecycle state: loading -> warming_up -> ready | failed."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.state = "starting"
        self.reason: str | None = "not loaded yet"
        self.model: LoadedModel | None = None
        self.reports: list[Report] = []
        self._config_error: str | None = None
        try:
            torch_device = resolve_device(settings.device)
        except ValueError as exc:  # reported by load(), so /health can say why
            torch_device, self._config_error = torch.device("cpu"), str(exc)
        self.hardware = Device(torch_device, resolve_dtype(settings.dtype, torch_device))
        self._scheduler_config: dict = {}
        self.load_seconds: float | None = None
        self.warmup_seconds: float | None = None
        self._timer: PhaseTimer | None = None
        self._lock = threading.Lock()

    # ----- lifecycle -------------------------------------------------------------------------------
    def load(self) -> None:
        """Load, optimize and warm up. Never raises: a failure is recorded in ``state``/``reason``."""
        start = time.perf_counter()
        try:
            if self._config_error:
                raise ValueError(self._config_error)
            self._set_state("loading", f"loading model {self.settings.model!r}")
            self.model = load_model(self.settings, self.device, self.hardware.dtype)
            self._instrument(self.model.pipe)
            self._scheduler_config = dict(self.model.pipe.scheduler.config)
            self.reports = apply_all(self.model.pipe, self._optimization_context())
            if self.settings.warmup:
                self._set_state("warming_up", "running warm-up generations (and compiling, on a GPU)")
                self._warm_up_or_fall_back()
            self.load_seconds = time.perf_counter() - start
            self._set_state("ready", None)
            log.info("engine ready in %.1f s (%s)", self.load_seconds, self.model.kind)
        except Exception as exc:
            log.exception("engine failed to start")
            self._set_state("failed", f"{type(exc).__name__}: {exc}")

    def _set_state(self, state: str, reason: str | None) -> None:
        self.state, self.reason = state, reason

    @property
    def device(self) -> torch.device:
        return self.hardware.torch_device

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def _optimization_context(self) -> OptimizationContext:
        return OptimizationContext(
            device_type=self.device.type, capability=self.hardware.capability(), settings=self.settings
        )

    def _warm_up_or_fall_back(self) -> None:
        """Warm up; if that fails, undo the optimizations that can be undone (compile), say why, and retry."""
        try:
            self._warm_up()
            return
        except Exception as exc:
            undoable = [r for r in self.reports if r.status == "applied" and r.undo is not None]
            if not undoable:
                raise
            log.exception("warm-up failed; undoing %s and retrying", ", ".join(r.name for r in undoable))
            for report in reversed(undoable):
                report.undo()
                report.status, report.undo = "failed", None
                report.detail = f"broke at warm-up and was undone ({type(exc).__name__}: {exc})"
        self._warm_up()

    def _warm_up(self) -> None:
        """Run every shape the benchmarks use, with each per-request switch on and off, so compiled code exists.

        On the GPU that is a 1024² edit and a 1024² text-to-image (compile happens here, before /health is 200);
        on the CPU one small edit checks the whole path.
        """
        start = time.perf_counter()
        seed = self.settings.seed_for_warmup
        if self.hardware.is_cuda:
            image = Image.new("RGB", (1024, 1024), (128, 64, 32))
            jobs = [Job(prompt="warm-up", seed=seed, image=image, steps=2), Job(prompt="warm-up", seed=seed, steps=2)]
        else:
            jobs = [Job(prompt="warm-up", seed=seed, image=Image.new("RGB", (64, 48), (128, 64, 32)), steps=2)]
        switchable = [r.flag for r in self.reports if r.status == "applied" and r.flag and r.disable is not None]
        variants = [{}] + [{flag: False} for flag in switchable]
        for flags in variants:
            for job in jobs:
                job.flags = flags
                self._generate(job)
        self.warmup_seconds = time.perf_counter() - start
        log.info("warm-up: %d generations in %.1f s", len(variants) * len(jobs), self.warmup_seconds)

    def _instrument(self, pipe) -> None:
        # The pipeline encodes the context image inside its own call; wrapping vae.encode on this instance
        # (not the class) is how image encoding gets its own timing.
        original = pipe.vae.encode

        def timed_encode(*args, **kwargs):
            timer = self._timer
            if timer is None:
                return original(*args, **kwargs)
            with timer.measure("image_encoding"):
                return original(*args, **kwargs)

        pipe.vae.encode = timed_encode

    # ----- generation ------------------------------------------------------------------------------
    def generate(self, job: Job) -> JobResult:
        """Run one job. Raises EngineNotReady, EngineOutOfMemory, JobRejected or JobCancelled."""
        if not self.ready:
            raise EngineNotReady(f"engine is {self.state}: {self.reason}")
        try:
            return self._generate(job)
        except torch.OutOfMemoryError as exc:
            self.hardware.release_memory()
            raise EngineOutOfMemory(
                f"out of GPU memory for this request ({job.num_images} image(s)); "
                "retry with fewer images or a smaller size"
            ) from exc
        except RuntimeError as exc:
            if self.hardware.is_cuda and is_sticky_gpu_error(exc):
                # After an illegal access or device assert every later CUDA call fails: say so, so that
                # /health and the readiness probe turn 503 and the orchestrator restarts the process.
                self._set_state("failed", f"GPU error, the process needs a restart: {exc}")
                raise EngineNotReady(self.reason) from exc
            raise

    def _generate(self, job: Job) -> JobResult:
        with self._lock:
            return self._run(job)

    def _output_size(self, job: Job) -> tuple[int, int, str, tuple[int, int] | None]:
        context = kontext_resolution(*job.image.size) if job.image is not None else None
        if job.width is not None and job.height is not None:
            return job.width, job.height, "request", context
        if context is not None:
            return context[0], context[1], "input_aspect_snapped", context
        return (*DEFAULT_TEXT_TO_IMAGE_SIZE, "default", None)

    def _scheduler_for(self, job: Job, plan: RequestPlan) -> str:
        """The request's scheduler, else DPM when it is loaded and allowed, else the model's Euler."""
        dpm_loaded = any(r.name == DPM_REPORT and r.status == "applied" for r in self.reports)
        if job.scheduler not in (None, "euler") and not dpm_loaded:
            raise JobRejected(f"scheduler {job.scheduler!r} is not available on this server; use 'euler'")
        name = job.scheduler or (DEFAULT_DPM if DPM_REPORT in plan.ran else "euler")
        if name == "euler" and DPM_REPORT in plan.ran:  # the request chose euler over the default DPM
            plan.ran.remove(DPM_REPORT)
            plan.not_applied.append(
                {"flag": "use_dpm_solver", "optimization": DPM_REPORT, "reason": "the request chose scheduler 'euler'"}
            )
        return name

    def _run(self, job: Job) -> JobResult:
        if job.cancelled.is_set():
            raise JobCancelled("the caller went away before the job started")
        plan = plan_for_request(self.reports, job.flags)
        scheduler = self._scheduler_for(job, plan)
        width, height, size_source, context = self._output_size(job)
        steps = job.steps or DEFAULT_STEPS[scheduler]
        seeds = [job.seed + i for i in range(job.num_images)]
        timer = PhaseTimer(sync=self.hardware.sync)
        true_cfg = job.true_cfg_scale > 1.0 and bool(job.negative_prompt)
        cache = getattr(self.model.pipe, "first_block_cache", None)
        graphs = getattr(self.model.pipe, "cuda_graphs", None)
        if graphs is not None:
            graphs.reset_counts()
        total_start = time.perf_counter()
        self._timer = timer
        try:
            self.model.pipe.scheduler = make_scheduler(scheduler, self._scheduler_config)
            with contextlib.ExitStack() as stack, torch.inference_mode():
                for switch in plan.switches:
                    stack.enter_context(switch())
                with timer.measure("text_encoding"):
                    embeds = self._encode_text(job.prompt, job.num_images)
                    negative = self._encode_text(job.negative_prompt, job.num_images) if true_cfg else (None, None)
                if cache is not None:
                    stack.enter_context(cache.request(job.cache_threshold, negative[0]))
                denoise_start = time.perf_counter()
                latents = self._denoise(job, embeds, negative, width, height, context, steps, seeds)
                self.hardware.sync()
                if job.cancelled.is_set():
                    raise JobCancelled("the caller went away; denoising stopped early")
                denoise_ms = (time.perf_counter() - denoise_start) * 1000.0
                timer.add("denoising", denoise_ms - timer.phases.get("image_encoding", 0.0))
                with timer.measure("decoding"):
                    images = self._decode(latents, width, height)
        finally:
            self._timer = None
        graph_counts = graphs.reset_counts() if graphs is not None else None
        _report_graph_use(plan, graph_counts)
        timings = {phase: round(timer.phases.get(phase, 0.0), 2) for phase in PHASES}
        timings["engine_total"] = round((time.perf_counter() - total_start) * 1000.0, 2)
        return JobResult(
            images=images,
            seeds=seeds,
            width=width,
            height=height,
            context_size=context,
            size_source=size_source,
            steps=steps,
            scheduler=scheduler,
            true_cfg=true_cfg,
            timings_ms=timings,
            optimizations=plan.public(),
            first_block_cache=cache.summary() if cache is not None else None,
            cuda_graphs=graph_counts,
            warnings=self._truncation_warnings(job.prompt),
        )

    def _denoise(self, job: Job, embeds, negative, width, height, context, steps, seeds) -> torch.Tensor:
        """The pipeline's denoising loop (with the context image's VAE encode); returns packed latents."""
        return self.model.pipe(
            image=job.image.resize(context, Image.LANCZOS) if job.image is not None else None,
            prompt_embeds=embeds[0],
            pooled_prompt_embeds=embeds[1],
            negative_prompt_embeds=negative[0],
            negative_pooled_prompt_embeds=negative[1],
            true_cfg_scale=job.true_cfg_scale,
            width=width,
            height=height,
            # The pipeline rescales to max_area at the input's aspect ratio: pin it to the size asked.
            max_area=width * height,
            _auto_resize=False,  # the context image is already at its snapped Kontext resolution
            num_inference_steps=steps,
            guidance_scale=job.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            max_sequence_length=self.model.max_sequence_length,
            callback_on_step_end=_stop_when_cancelled(job),
            callback_on_step_end_tensor_inputs=[],
            output_type="latent",
            return_dict=False,
        )[0]

    def _truncation_warnings(self, prompt: str) -> list[str]:
        """Say when the prompt is longer than T5 reads (CLIP's 77 tokens only feed the pooled vector)."""
        limit = self.model.max_sequence_length
        tokens = len(self.model.pipe.tokenizer_2(prompt, truncation=False)["input_ids"])
        if tokens <= limit:
            return []
        return [f"prompt is {tokens} T5 tokens; only the first {limit} are used"]

    def _encode_text(self, prompt: str, num_images: int):
        prompt_embeds, pooled, _ = self.model.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=num_images,
            max_sequence_length=self.model.max_sequence_length,
        )
        return prompt_embeds, pooled

    def _decode(self, latents: torch.Tensor, width: int, height: int) -> list[Image.Image]:
        pipe = self.model.pipe
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        decoded = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        # diffusers' own denormalization, then its uint8 conversion done on the device (utils.pixels_to_pil): the same
        # pixels as postprocess(output_type="pil"), without the host converting 3M floats per 1024² image.
        return pixels_to_pil(pipe.image_processor.postprocess(decoded, output_type="pt"))

    # ----- reporting (used by /health, /benchmark and the bench scripts) --------------------------------
    def reset_peak_memory(self) -> None:
        self.hardware.reset_peak_memory()

    def peak_memory_gib(self) -> float | None:
        return self.hardware.peak_memory_gib()

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


def _report_graph_use(plan: RequestPlan, counts: dict | None) -> None:
    """CUDA graphs count as run only if a block was replayed or captured; a shape's first call runs without."""
    if counts is None or cuda_graphs.NAME not in plan.ran or counts["replayed"] + counts["captured"] > 0:
        return
    plan.ran.remove(cuda_graphs.NAME)
    plan.not_applied.append(
        {
            "flag": cuda_graphs.FLAG,
            "optimization": cuda_graphs.NAME,
            "reason": "no block was replayed: this input shape was seen for the first time (captured on its next call)",
        }
    )


def _stop_when_cancelled(job: Job):
    """A step callback that makes the pipeline skip its remaining steps once the job is cancelled."""

    def callback(pipe, step, timestep, tensors):
        if job.cancelled.is_set():
            pipe._interrupt = True  # the pipeline's own flag: each later step is skipped
        return {}

    return callback
