"""One job's generation on the loaded pipeline: output size, seeds, text encoding, denoising (with the context
image's VAE encode), decoding and the per-phase timings. The Stack's per-request context wraps it: what the stack
decides for this request (scheduler, switches, counters) comes back in ``RequestRun``.

Runs only on the engine's single GPU worker thread (see queue.py), never concurrently with itself: the scheduler
swap on the shared pipeline below is safe.
"""

from __future__ import annotations

import logging
import time

import torch
from PIL import Image

from flux_kontext.device import Device
from flux_kontext.jobs import PHASES, Job, JobCancelled, JobResult
from flux_kontext.models import LoadedModel
from flux_kontext.resolution import kontext_resolution
from flux_kontext.schedulers import SCHEDULER_DEFAULT_STEPS, make_scheduler
from flux_kontext.text_encoding import PromptEncoder
from utils import PhaseTimer, pixels_to_pil

log = logging.getLogger(__name__)

DEFAULT_TEXT_TO_IMAGE_SIZE = (1024, 1024)


class Generation:
    """Generates jobs on one loaded model; ``run(job, stack)`` is the whole of one job."""

    def __init__(self, model: LoadedModel, hardware: Device, prompt_cache_size: int = 0):
        self.model = model
        self.hardware = hardware
        t5_placement = model.plan.placements["text_encoder_2"] if model.plan is not None else "gpu"
        self.prompts = PromptEncoder(
            model.pipe, hardware.torch_device, model.max_sequence_length, t5_placement, prompt_cache_size
        )
        self.scheduler_config = dict(model.pipe.scheduler.config)  # the model's own; seeds every scheduler
        self._timer: PhaseTimer | None = None
        self._time_image_encoding(model.pipe)

    def _time_image_encoding(self, pipe) -> None:
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

    def run(self, job: Job, stack) -> JobResult:
        width, height, size_source, context = output_size(job)
        seeds = [job.seed + i for i in range(job.num_images)]
        true_cfg = job.true_cfg_scale > 1.0 and bool(job.negative_prompt)
        timer = PhaseTimer(sync=self.hardware.sync)
        total_start = time.perf_counter()
        self._timer = timer
        try:
            with stack.request(job) as run, torch.inference_mode():
                steps = job.steps or SCHEDULER_DEFAULT_STEPS[run.scheduler]
                self.model.pipe.scheduler = make_scheduler(run.scheduler, self.scheduler_config)
                with timer.measure("text_encoding"):
                    embeds = self._encode_text(job.prompt, job.num_images)
                    negative = self._encode_text(job.negative_prompt, job.num_images) if true_cfg else (None, None)
                    job.fault_point("text_encoding", device=self.hardware.torch_device)
                if job.cancelled.is_set():
                    raise JobCancelled("the caller went away; stopped after text encoding")
                run.negative_prompt_embeds = negative[0]
                denoise_start = time.perf_counter()
                latents = self._denoise(job, embeds, negative, width, height, context, steps, seeds)
                self.hardware.sync()
                if job.cancelled.is_set():
                    raise JobCancelled("the caller went away; denoising stopped early")
                denoise_ms = (time.perf_counter() - denoise_start) * 1000.0
                timer.add("denoising", denoise_ms - timer.phases.get("image_encoding", 0.0))
                with timer.measure("decoding"):
                    job.fault_point("decoding", device=self.hardware.torch_device)
                    images = self._decode(latents, width, height)
        finally:
            self._timer = None
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
            scheduler=run.scheduler,
            true_cfg=true_cfg,
            timings_ms=timings,
            optimizations=run.public(),
            counters=run.counters,
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
            callback_on_step_end=_step_callback(job, steps),
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
        return self.prompts.encode(prompt, num_images)

    def _decode(self, latents: torch.Tensor, width: int, height: int) -> list[Image.Image]:
        pipe = self.model.pipe
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        decoded = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        # diffusers' own denormalization, then its uint8 conversion done on the device (utils.pixels_to_pil): the same
        # pixels as postprocess(output_type="pil"), without the host converting 3M floats per 1024² image.
        return pixels_to_pil(pipe.image_processor.postprocess(decoded, output_type="pt"))


def output_size(job: Job) -> tuple[int, int, str, tuple[int, int] | None]:
    """(width, height, where the size came from, the context image's snapped size or None)."""
    context = kontext_resolution(*job.image.size) if job.image is not None else None
    if job.width is not None and job.height is not None:
        return job.width, job.height, "request", context
    if context is not None:
        return context[0], context[1], "input_aspect_snapped", context
    return (*DEFAULT_TEXT_TO_IMAGE_SIZE, "default", None)


def _step_callback(job: Job, steps: int):
    """After each step: report progress, and make the pipeline skip its remaining steps once the job is cancelled."""

    def callback(pipe, step, timestep, tensors):
        job.step_done(step + 1, steps)
        job.fault_point("denoising", step + 1, pipe.transformer.device)
        if job.cancelled.is_set():
            pipe._interrupt = True  # the pipeline's own flag: each later step is skipped
        return {}

    return callback
