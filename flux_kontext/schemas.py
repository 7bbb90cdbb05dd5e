"""HTTP request and response models. No torch or diffusers here."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flux_kontext.resolution import parse_aspect_ratio, resolution_for_aspect
from flux_kontext.schedulers import DEFAULT_SOLVER, SCHEDULER_DEFAULT_STEPS, SCHEDULERS
from utils import MAX_SEED

MIN_SIDE, MAX_SIDE, SIZE_MULTIPLE = 256, 1568, 16
MATCH_INPUT_IMAGE = "match_input_image"
DEFAULT_OUTPUT_QUALITY = 95  # JPEG/WebP encoder quality when the request names none
# Entries the loras field takes at all; the server's own limit (FLUX_LORA_MAX_PER_REQUEST) is checked by the engine.
MAX_LORAS_FIELD = 8


class LoraChoice(BaseModel):
    """One LoRA adapter for a request: a name the server loaded (GET /health lists them) and its scale."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=64, description="An adapter the server loaded, by name.")
    scale: float = Field(1.0, allow_inf_nan=False, description="Its strength (0: no effect); bounded by the server.")


class InferenceRequest(BaseModel):
    """POST /inference. Editing when ``image`` is given, text-to-image otherwise."""

    model_config = ConfigDict(extra="forbid")

    # Every field's example is one valid request together (Swagger UI fills its forms from them); a field with no
    # sensible value in that request has the example null, which leaves it empty.
    prompt: str = Field(
        ...,
        min_length=1,
        max_length=4000,
        description="Instruction (edit) or description.",
        examples=["make it a winter scene"],
    )
    image: str | None = Field(
        None,
        description="Input image for editing: base64 or a data: URI (PNG, JPEG, WebP). Omit for text-to-image.",
        examples=[None],
    )
    negative_prompt: str | None = Field(
        None,
        max_length=4000,
        description="Used only with true_cfg_scale > 1 (true classifier-free guidance).",
        examples=[None],
    )
    width: int | None = Field(
        None,
        ge=MIN_SIDE,
        le=MAX_SIDE,
        description="Output width, a multiple of 16 (256-1568; the seed capped at 1024, raised so every "
        "preferred Kontext resolution is reachable). Default: edit follows the input's aspect ratio snapped "
        "to the nearest preferred Kontext resolution; text-to-image is 1024.",
        examples=[None],
    )
    height: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, description="Output height; see width.", examples=[None])
    aspect_ratio: str | None = Field(
        None,
        description=f"Instead of width/height: '{MATCH_INPUT_IMAGE}' (what an edit does by default) or 'W:H' from "
        "9:21 to 21:9 ('1:1', '16:9', '9:16', '4:3', '3:4', '3:2', '2:3', '21:9', '9:21', ...), snapped to the "
        "nearest of the 17 preferred Kontext resolutions. Not together with width/height.",
        examples=["16:9"],
    )
    steps: int | None = Field(
        None,
        ge=1,
        le=50,
        description="Denoising steps; default by scheduler: 14 (few-step solvers), 28 (euler).",
        examples=[14],
    )
    scheduler: Literal[SCHEDULERS] | None = Field(
        None,
        description=f"Default: {DEFAULT_SOLVER} when use_dpm_solver is true (and the server has it), else euler.",
        examples=[DEFAULT_SOLVER],
    )
    guidance_scale: float = Field(3.5, ge=0, le=20, description="Distilled guidance (prompt adherence).")
    true_cfg_scale: float = Field(1.0, ge=0, le=20, description="True CFG; > 1 with a negative_prompt runs it.")
    cache_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="First-block cache residual threshold for this request (server default 0.12; 0 never skips). "
        "Higher skips more transformer steps: faster, less faithful.",
        examples=[0.12],
    )
    num_images: int = Field(1, ge=1, le=4, description="Images for this prompt; image i uses seed + i.")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED - 4, description="Random when absent; returned per image.", examples=[42]
    )
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_quality: int | None = Field(
        None,
        ge=1,
        le=100,
        description=f"JPEG/WebP encoder quality (default {DEFAULT_OUTPUT_QUALITY}); not with png.",
        examples=[None],
    )
    use_flash_attention: bool = Field(True, description="Allow FlashAttention 3 if the server loaded it.")
    use_mxfp4: bool = Field(True, description="Allow the best low-precision GEMMs the GPU has (MXFP4 or FP8).")
    use_dpm_solver: bool = Field(True, description="Allow the few-step solver (default unipc) if the server has it.")
    use_cuda_graphs: bool = Field(True, description="Allow CUDA graphs if the server captured them.")
    loras: list[LoraChoice] = Field(
        default_factory=list,
        max_length=MAX_LORAS_FIELD,
        description="LoRA adapters to apply, by the names the server loaded (FLUX_LORAS; /health lists them), e.g. "
        '[{"name": "relight", "scale": 0.8}]; in a form, the same as a JSON text field.',
        examples=[[]],  # none in the example request (Swagger UI's form then sends none)
    )

    @field_validator("use_flash_attention", "use_mxfp4", "use_dpm_solver", "use_cuda_graphs", mode="before")
    @classmethod
    def _switch_is_a_boolean(cls, value):
        """A switch is true or false (a form's text "true"/"false" too), never a number: 0 or 1 is refused as the
        document says, rather than read as a boolean."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ValueError("must be true or false, not a number")
        return value

    @field_validator("seed", "num_images", "steps", "width", "height", mode="before")
    @classmethod
    def _number_is_not_a_boolean(cls, value):
        """JSON's true is not the number 1."""
        if isinstance(value, bool):
            raise ValueError("must be an integer, not true or false")
        return value

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_text(cls, value):
        """A form sends the list as one JSON text field."""
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else []
            except ValueError as exc:
                example = '[{"name": "style", "scale": 1.0}]'
                raise ValueError(f"loras must be a JSON list such as {example} ({exc})") from None
        return value

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

    @field_validator("scheduler", mode="before")
    @classmethod
    def _known_scheduler(cls, value):
        if isinstance(value, str) and value not in SCHEDULER_DEFAULT_STEPS:
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

    def lora_choices(self) -> tuple[tuple[str, float], ...]:
        """(name, scale) per adapter, for the engine (which checks them against what it loaded)."""
        return tuple((choice.name, choice.scale) for choice in self.loras)

    def flags(self) -> dict[str, bool]:
        return {
            "use_flash_attention": self.use_flash_attention,
            "use_mxfp4": self.use_mxfp4,
            "use_dpm_solver": self.use_dpm_solver,
            "use_cuda_graphs": self.use_cuda_graphs,
        }


def request_schema() -> dict:
    """InferenceRequest's JSON schema with its ``$defs`` inlined: the OpenAPI document embeds it where a ``$ref`` to
    the schema's own ``$defs`` would point nowhere."""
    schema = InferenceRequest.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return inline(schema)


class GeneratedImage(BaseModel):
    image: str = Field(..., description="Base64-encoded image bytes.")
    seed: int
    width: int
    height: int
    format: str
    encoder: str | None = Field(
        None,
        description="What encoded the image: 'png_fast' (PNG row filters in numpy, deflate in threads) or 'pillow'.",
    )


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
    loras: list[dict] = Field(
        default_factory=list,
        description="The LoRA adapters that ran for this request, each with its name, scale and rank; [] when none.",
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
