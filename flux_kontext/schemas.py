"""HTTP request and response models. No torch or diffusers here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flux_kontext.resolution import parse_aspect_ratio, resolution_for_aspect
from flux_kontext.schedulers import DEFAULT_DPM, SCHEDULER_DEFAULT_STEPS, SCHEDULERS
from utils import MAX_SEED

MIN_SIDE, MAX_SIDE, SIZE_MULTIPLE = 256, 1568, 16
MATCH_INPUT_IMAGE = "match_input_image"
DEFAULT_OUTPUT_QUALITY = 95  # JPEG/WebP encoder quality when the request names none


class InferenceRequest(BaseModel):
    """POST /inference. Editing when ``image`` is given, text-to-image otherwise."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=4000, description="Instruction (edit) or description.")
    image: str | None = Field(
        None, description="Input image for editing: base64 or a data: URI (PNG, JPEG, WebP). Omit for text-to-image."
    )
    negative_prompt: str | None = Field(
        None, max_length=4000, description="Used only with true_cfg_scale > 1 (true classifier-free guidance)."
    )
    width: int | None = Field(
        None,
        ge=MIN_SIDE,
        le=MAX_SIDE,
        description="Output width, a multiple of 16 (256-1568; the seed capped at 1024, raised so every "
        "preferred Kontext resolution is reachable). Default: edit follows the input's aspect ratio snapped "
        "to the nearest preferred Kontext resolution; text-to-image is 1024.",
    )
    height: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, description="Output height; see width.")
    aspect_ratio: str | None = Field(
        None,
        description=f"Instead of width/height: '{MATCH_INPUT_IMAGE}' (what an edit does by default) or 'W:H' from "
        "9:21 to 21:9 ('1:1', '16:9', '9:16', '4:3', '3:4', '3:2', '2:3', '21:9', '9:21', ...), snapped to the "
        "nearest of the 17 preferred Kontext resolutions. Not together with width/height.",
        examples=["16:9"],
    )
    steps: int | None = Field(
        None, ge=1, le=50, description="Denoising steps; default follows the scheduler: 14 for DPM, 28 for euler."
    )
    scheduler: str | None = Field(
        None,
        description=f"One of {', '.join(SCHEDULERS)}. Default: {DEFAULT_DPM} when use_dpm_solver is true "
        "(and the server has it), else euler.",
        json_schema_extra={"enum": [*SCHEDULERS, None]},  # the validator's list, in the document
    )
    guidance_scale: float = Field(3.5, ge=0, le=20, description="Distilled guidance (prompt adherence).")
    true_cfg_scale: float = Field(1.0, ge=0, le=20, description="True CFG; > 1 with a negative_prompt runs it.")
    cache_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="First-block cache residual threshold for this request (server default 0.12; 0 never skips). "
        "Higher skips more transformer steps: faster, less faithful.",
    )
    num_images: int = Field(1, ge=1, le=4, description="Images for this prompt; image i uses seed + i.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED - 4, description="Random when absent; returned per image.")
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_quality: int | None = Field(
        None, ge=1, le=100, description=f"JPEG/WebP encoder quality (default {DEFAULT_OUTPUT_QUALITY}); not with png."
    )
    use_flash_attention: bool = Field(True, description="Allow FlashAttention 3 if the server loaded it.")
    use_mxfp4: bool = Field(True, description="Allow the best low-precision GEMMs the GPU has (MXFP4 or FP8).")
    use_dpm_solver: bool = Field(True, description="Allow DPM-Solver++ 2M if the server has it.")
    use_cuda_graphs: bool = Field(True, description="Allow CUDA graphs if the server captured them.")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty or only whitespace")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, value: int | None) -> int | None:
        if value is not None and value % SIZE_MULTIPLE:
            raise ValueError(f"must be a multiple of {SIZE_MULTIPLE}, got {value}")
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        if value is not None and value not in SCHEDULER_DEFAULT_STEPS:
            raise ValueError(f"unknown scheduler {value!r}; valid: {', '.join(SCHEDULERS)}")
        return value

    @field_validator("aspect_ratio")
    @classmethod
    def _known_aspect_ratio(cls, value: str | None) -> str | None:
        if value is not None and value != MATCH_INPUT_IMAGE:
            parse_aspect_ratio(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> InferenceRequest:
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither (then the size follows the input image)")
        if self.aspect_ratio is not None and self.width is not None:
            raise ValueError("give aspect_ratio or width/height, not both")
        if self.aspect_ratio == MATCH_INPUT_IMAGE and self.image is None:
            raise ValueError(f"aspect_ratio '{MATCH_INPUT_IMAGE}' needs an input image")
        if self.output_quality is not None and self.output_format == "png":
            raise ValueError("output_quality applies to jpeg and webp only; png is lossless")
        if self.scheduler not in (None, "euler") and not self.use_dpm_solver:
            raise ValueError(f"scheduler {self.scheduler!r} is a DPM solver but use_dpm_solver is false")
        return self

    def output_size(self) -> tuple[int | None, int | None]:
        """(width, height) for the engine: as given, from aspect_ratio, or (None, None) for the engine's default."""
        if self.aspect_ratio is not None and self.aspect_ratio != MATCH_INPUT_IMAGE:
            return resolution_for_aspect(parse_aspect_ratio(self.aspect_ratio))
        return self.width, self.height

    @property
    def encoder_quality(self) -> int:
        return self.output_quality if self.output_quality is not None else DEFAULT_OUTPUT_QUALITY

    def flags(self) -> dict[str, bool]:
        return {
            "use_flash_attention": self.use_flash_attention,
            "use_mxfp4": self.use_mxfp4,
            "use_dpm_solver": self.use_dpm_solver,
            "use_cuda_graphs": self.use_cuda_graphs,
        }


class GeneratedImage(BaseModel):
    image: str = Field(..., description="Base64-encoded image bytes.")
    seed: int
    width: int
    height: int
    format: str


class InferenceResponse(BaseModel):
    id: str
    mode: Literal["edit", "text_to_image"]
    prompt: str
    images: list[GeneratedImage]
    size_source: str = Field(..., description="request | aspect_ratio_snapped | input_aspect_snapped | default")
    context_size: list[int] | None = Field(None, description="Size the input image was resized to (edit).")
    steps: int
    scheduler: str
    guidance_scale: float
    true_cfg_scale: float
    true_cfg_active: bool
    first_block_cache: dict | None = Field(
        None, description="Threshold and transformer calls computed/skipped; null when the cache is not loaded."
    )
    cuda_graphs: dict | None = Field(
        None,
        description="Transformer block calls replayed from a CUDA graph, captured, or run uncaptured (a shape's "
        "first call); null when graphs are not loaded.",
    )
    timings_ms: dict[str, float]
    warnings: list[str] = Field(default_factory=list, description="Things the client should know, e.g. truncation.")
    model: dict
    optimizations: dict


class ErrorBody(BaseModel):
    type: str
    message: str
    details: list[dict] | None = None
    request_id: str | None = Field(None, description="The request's X-Request-ID: quote it to find its log lines.")


class ErrorEnvelope(BaseModel):
    """Every failure, whatever the status code, has this shape."""

    error: ErrorBody
