"""The one place where the service's defaults live (environment prefix FLUX_)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "black-forest-labs/FLUX.1-Kontext-dev"
# Sources that are not a hub id or a folder: built in-process with random weights.
RANDOM_MODEL = "random"
TINY_MODEL = "tiny"


def setting_list(value, name: str):
    """A list setting from the environment: a JSON list, or the same comma-separated; other values pass through.
    A malformed JSON list is refused with where it broke, never with the value (it may hold keys)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not a valid JSON list ({exc.msg}; character {exc.pos})") from None
    return [item.strip() for item in text.split(",") if item.strip()]


class ServiceSettings(BaseModel):
    """The service itself: model, device, queue, limits."""

    # Settings inherits this: a validation error never repeats the input, which can hold API keys or secrets.
    model_config = ConfigDict(hide_input_in_errors=True)

    model: str = Field(
        DEFAULT_MODEL,
        description="Hugging Face repo id, local diffusers folder, 'random' (full size) or 'tiny'.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    device: str = Field("auto", description="'auto' picks cuda when available, else cpu.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="'auto' is bfloat16 on cuda and float32 on cpu."
    )
    max_queue: int = Field(16, ge=1, le=1024, description="Jobs waiting for the GPU before 429.")
    max_body_mb: float = Field(32.0, gt=0, description="Largest request body accepted (413 above).")
    max_input_pixels: int = Field(
        4096 * 4096, ge=64 * 64, description="Largest input image (width*height), checked before decoding."
    )
    request_timeout_s: float = Field(600.0, gt=0, description="Longest a request waits for its result.")
    warmup: bool = Field(True, description="Run the warm-up generations (and compile, on a GPU) before ready.")
    warmup_shapes: Literal["compiled", "all", "minimal"] = Field(
        "compiled",
        description="With compiled code for dynamic shapes (FLUX_COMPILE_DYNAMIC): 'compiled' runs what compiles "
        "(the 1024² edit and text-to-image with each per-request switch off, and num_images 2): every other shape is "
        "served by those graphs, none compiles at request time; 'all' also runs every shape a request can bring once "
        "(the 17 preferred resolutions for edit and text-to-image, num_images 1-4, true CFG, an explicit size), so "
        "their CUDA graphs are captured before ready; 'minimal' only the 1024² edit and text-to-image (a first "
        "num_images above 1 then compiles). /health's 'shapes' says which are ready.",
    )
    warmup_skip_cached: bool = Field(
        True,
        description="On a restart whose compile cache hits (FLUX_COMPILE_CACHE_DIR), skip the warm-up generations "
        "that compiled no graph when they last ran with the same fingerprint (warmup/ beside decisions/: the per-"
        "request switch variants, text-to-image after the edit); those that compiled still run (they reload the "
        "cached graphs). A skipped shape's CUDA graphs are captured on its first request. /health shapes.warmup "
        "says what was skipped and why.",
    )
    max_sequence_length: int | None = Field(
        None, ge=16, le=512, description="T5 tokens; default 512 (real/random) or 64 (tiny)."
    )
    benchmark_max_runs: int = Field(20, ge=1, le=200, description="Upper bound for /benchmark?runs=.")
    retry_after_s: int = Field(5, ge=1, description="Retry-After header sent with 429 and 503.")
    drain_timeout_s: float = Field(
        25.0,
        ge=0,
        le=3600,
        description="On SIGTERM/SIGINT (`serve`): how long the running and queued jobs may take to finish while new "
        "requests get 503; what is left then gets a 503 (not run, or stopped). Below Kubernetes' grace period.",
    )
    # Async jobs (/v1/jobs): in this process's memory, lost on restart; jobs not finished are bounded by the queue.
    job_result_ttl_s: float = Field(600.0, gt=0, description="How long a finished async job stays readable.")
    max_kept_jobs: int = Field(256, ge=1, le=100_000, description="Finished async jobs kept; oldest evicted first.")
    max_kept_job_mb: float = Field(
        1024.0, gt=0, description="Encoded images of finished async jobs kept; oldest evicted first beyond it."
    )
    # Webhooks of async jobs: off unless the operator names the URL prefixes a job may ask to be called at.
    webhook_allowed_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="URL prefixes a job's webhook_url must start with, e.g. '[\"https://hooks.example.com/\"]' "
        "(a JSON list; commas also work); empty (the default): webhooks are off.",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="HMAC-SHA256 key of the webhook signatures (Standard Webhooks): 'whsec_<base64>' (the key is "
        "the decoded bytes) or any other string (its UTF-8 bytes), 16 bytes at least; required with prefixes.",
    )
    webhook_timeout_s: float = Field(10.0, gt=0, le=300, description="Longest one webhook attempt may take.")
    webhook_retries: int = Field(
        2, ge=0, le=10, description="Attempts after the first on a network error, 5xx or 429 (0.5 s, 1 s, ... apart)."
    )
    # API keys (flux_kontext/auth.py): none configured (the default) = no authentication, as before.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Keys accepted as 'Authorization: Bearer <key>' or 'X-API-Key: <key>', e.g. '[\"k1\", \"k2\"]' "
        "(a JSON list; commas also work); 16 characters at least. With FLUX_API_KEYS_FILE, both are accepted.",
    )
    api_keys_file: str | None = Field(
        None,
        description="A file of hashed keys, one 'sha256:<hex of the key's UTF-8 bytes>' a line ('#' comments and "
        "blank lines allowed), read at start: the keys themselves need not be stored on the server.",
    )
    auth_protect_info: bool = Field(
        False,
        description="With keys set, also key /health, /metrics, /docs, /redoc and /openapi.json (open by default); "
        "/health/live and /health/ready stay open for probes.",
    )
    benchmark_enabled: bool = Field(
        True,
        description="Serve /benchmark (keyed when keys are set); false: it answers 403 (it occupies the GPU).",
    )
    max_requests_per_key: int = Field(
        0,
        ge=0,
        description="Generation requests one key may have in flight (429 beyond, with Retry-After); 0: no limit. "
        "Async job submissions count while submitting, not while the job runs.",
    )
    # Browsers: the playground page (flux_kontext/playground/) and pages of other origins (flux_kontext/cors.py).
    playground: bool = Field(
        True, description="Serve the playground page at / (package files only: it works without internet)."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins whose web pages may call this API from a browser (CORS), e.g. "
        "'[\"https://app.example.com\"]' (a JSON list; commas also work), or '*' for any; empty (the default): no "
        "CORS headers, browsers keep other origins out. API keys still apply.",
    )
    seed_for_warmup: int = 0

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origin_list(cls, value):
        """FLUX_CORS_ORIGINS='["https://a.example", "http://localhost:3000"]', or the same comma-separated."""
        return setting_list(value, "FLUX_CORS_ORIGINS")

    @field_validator("cors_origins")
    @classmethod
    def _origins_are_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin == "*":
                continue
            parts = urlsplit(origin)
            if (
                parts.scheme not in ("http", "https")
                or not parts.hostname
                or origin != f"{parts.scheme}://{parts.netloc}"
            ):
                raise ValueError(
                    f"FLUX_CORS_ORIGINS entry {origin!r} must be an origin as browsers send it: scheme and host (and "
                    "port), no path or trailing '/' (https://app.example.com, http://localhost:3000), or '*'"
                )
        return origins

    @model_validator(mode="after")
    def _check_device(self):
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"FLUX_DEVICE must be 'auto', 'cpu' or 'cuda[:N]', not {self.device!r}")
        return self

    @field_validator("webhook_allowed_prefixes", mode="before")
    @classmethod
    def _prefix_list(cls, value):
        """FLUX_WEBHOOK_ALLOWED_PREFIXES='["https://a/", "https://b/"]', or the same comma-separated."""
        return setting_list(value, "FLUX_WEBHOOK_ALLOWED_PREFIXES")

    @field_validator("webhook_allowed_prefixes")
    @classmethod
    def _prefixes_name_a_host(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            parts = urlsplit(prefix)
            if parts.scheme not in ("http", "https") or not parts.hostname or not parts.path.startswith("/"):
                raise ValueError(
                    f"FLUX_WEBHOOK_ALLOWED_PREFIXES entry {prefix!r} must be an http(s) URL with its host and at "
                    "least the '/' after it (https://hooks.example.com/), so that it cannot match another host"
                )
            if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
                raise ValueError(f"FLUX_WEBHOOK_ALLOWED_PREFIXES entry {prefix!r}: no user, query or fragment")
        return prefixes

    @model_validator(mode="after")
    def _webhook_rules(self):
        if self.webhook_allowed_prefixes and self.webhook_secret is None:
            raise ValueError(
                "FLUX_WEBHOOK_ALLOWED_PREFIXES enables webhooks, which are signed: set FLUX_WEBHOOK_SECRET too "
                "(e.g. whsec_ and 32 random bytes in base64)"
            )
        if self.webhook_secret is not None and len(self.webhook_key) < 16:
            raise ValueError("FLUX_WEBHOOK_SECRET must be a key of 16 bytes at least")
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _key_list(cls, value):
        """FLUX_API_KEYS='["k1", "k2"]', or the same comma-separated (the message never repeats the value)."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return setting_list(value, "FLUX_API_KEYS")

    @field_validator("api_keys")
    @classmethod
    def _keys_are_long(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for number, key in enumerate(keys, 1):
            secret = key.get_secret_value()
            if len(secret) < 16 or secret != secret.strip() or any(c.isspace() or ord(c) < 32 for c in secret):
                raise ValueError(
                    f"FLUX_API_KEYS: key {number} must be 16 characters at least, with no spaces or control "
                    "characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
        return keys

    @model_validator(mode="after")
    def _key_file_readable(self):
        if self.api_keys_file is not None:
            self.api_key_digests  # noqa: B018 - reads and checks the file now, not at the first request
        return self

    @property
    def api_key_digests(self) -> list[bytes]:
        """SHA-256 digests of every accepted key (FLUX_API_KEYS and FLUX_API_KEYS_FILE), without duplicates."""
        digests = [hashlib.sha256(key.get_secret_value().encode()).digest() for key in self.api_keys]
        if self.api_keys_file is not None:
            digests += read_key_digests(self.api_keys_file)
        return list(dict.fromkeys(digests))

    @property
    def webhook_key(self) -> bytes:
        """The HMAC key: Standard Webhooks' 'whsec_<base64>' decoded, else the secret's UTF-8 bytes."""
        secret = self.webhook_secret.get_secret_value() if self.webhook_secret is not None else ""
        if secret.startswith("whsec_"):
            try:
                return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
            except binascii.Error:
                raise ValueError("FLUX_WEBHOOK_SECRET starts with whsec_ but the rest is not base64") from None
        return secret.encode()


def read_key_digests(path: str) -> list[bytes]:
    """The digests of FLUX_API_KEYS_FILE: one 'sha256:<64 hex>' a line; '#' starts a comment; blank lines skipped."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise ValueError(f"FLUX_API_KEYS_FILE {path!r} cannot be read: {exc.strerror or exc}") from None
    digests = []
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        kind, _, hexdigest = entry.partition(":")
        try:
            digest = bytes.fromhex(hexdigest) if kind.lower() == "sha256" else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ValueError(
                f"FLUX_API_KEYS_FILE {path!r} line {number}: expected 'sha256:<64 hex digits>' (e.g. "
                'printf %s "$KEY" | sha256sum), not what is there'
            )
        digests.append(digest)
    if not digests:
        raise ValueError(f"FLUX_API_KEYS_FILE {path!r} holds no key (one 'sha256:<hex>' a line)")
    return digests


class MemoryPlanSettings(BaseModel):
    """Where each component lives (flux_kontext/memory_plan.py), chosen at start."""

    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        description="GPU memory the memory plan may use, in GiB; default: the GPU's free memory at start. On a CPU "
        "it simulates a GPU of that size for the plan and its request limits (tests).",
    )
    prompt_cache: Literal["auto", "on", "off"] = Field(
        "auto", description="Cache prompt embeddings (LRU); auto: on when the memory plan keeps T5 off the GPU."
    )
    prompt_cache_size: int = Field(64, ge=1, le=4096, description="Prompts whose embeddings are kept (LRU).")


class ImageEncodingSettings(BaseModel):
    """Output images to bytes on the host, after the engine (flux_kontext/image_encoding.py)."""

    png_encoder: Literal["fast", "pillow"] = Field(
        "fast",
        description="'fast': PNG row filters in numpy and the deflate in threads (flux_kontext/png_fast.py), "
        "lossless like Pillow's and 3-4x faster on one core (BENCHMARKS.md); 'pillow': Pillow's encoder.",
    )
    png_threads: int = Field(
        0, ge=0, le=64, description="Threads one PNG is deflated in; 0: the CPUs this process may use, up to 16."
    )


class LoggingSettings(BaseModel):
    """Logs (flux_kontext/logging_setup.py); read once at start, before the rest of the settings."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Level of the service's log (any case)."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="'text': one readable line a record; 'json': one JSON object a line (for log pipelines)."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value):
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def from_environment(cls) -> LoggingSettings:
        """Only FLUX_LOG_*, so that logging works (and can report it) when another setting is invalid."""

        class FromEnvironment(cls, BaseSettings):
            model_config = SettingsConfigDict(env_prefix="FLUX_", extra="ignore")

        return cls.model_validate(FromEnvironment().model_dump())


class ReliabilitySettings(BaseModel):
    """Watchdog, memory bound on request bodies, and the test-only fault injection (docs: RELIABILITY.md)."""

    max_body_mb_in_flight: float = Field(
        128.0,
        gt=0,
        description="Request bodies being read or held at once, in MiB; a request whose body would go beyond it "
        "gets 429 with Retry-After before its body is read (a body alone is always let in, up to FLUX_MAX_BODY_MB). "
        "A maximal edit body costs about 7x its size while decoded (RELIABILITY.md): 4 at the default.",
    )
    job_stop_grace_s: float = Field(
        10.0,
        gt=0,
        description="After a job is told to stop (timeout, disconnect, drain): how long it may take to reach its "
        "next step; past that the worker counts as stuck and readiness turns 503 with the reason.",
    )
    stuck_restart_s: float = Field(
        300.0,
        ge=0,
        description="A worker stuck this long (or dead) also fails liveness (/health/live 503), so that the "
        "orchestrator restarts the process (a thread cannot be killed); 0: liveness never fails for it.",
    )
    fault_injection: bool = Field(
        False,
        description="TEST ONLY: honour the X-Fault-Inject request header (an error, a CUDA out-of-memory or a hang "
        "in a chosen phase, see flux_kontext/faults.py). Never enable it in production.",
    )


# ----- one section per optimization (flux_kontext/optimizations/<name>.py); each rule sits with its feature -----
class FuseQkvSettings(BaseModel):
    fuse_qkv: bool = Field(True, description="Fuse the Q/K/V projections of the transformer and the VAE.")


class ChannelsLastSettings(BaseModel):
    channels_last: bool = Field(
        False,
        description="Channels-last VAE; off by default: measured slower for the eager VAE decode (BENCHMARKS.md).",
    )


class AttentionSettings(BaseModel):
    attention: Literal["auto", "sdpa", "cudnn", "fa3"] = Field(
        "auto", description="'auto' measures the available kernels on this GPU at start-up and keeps the fastest."
    )

    @model_validator(mode="after")
    def _attention_rules(self):
        if self.device == "cpu" and self.attention in ("cudnn", "fa3"):
            raise ValueError(f"FLUX_ATTENTION={self.attention} is a GPU kernel; with FLUX_DEVICE=cpu use auto or sdpa")
        return self


class FlashAttention3Settings(BaseModel):
    fp8_attention: Literal["auto", "on", "off"] = Field(
        "auto",
        description="FlashAttention 3 in FP8 (e4m3 q/k/v; Hopper with FA3). auto: used when a start-up screen on the "
        "loaded transformer keeps every attention layer within FLUX_FP8_MAX_LAYER_ERROR of bf16 attention; on: used "
        "without that limit (still measured and reported); off: never.",
    )
    fp8_attention_bf16_blocks: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="Attention layers kept in bf16 when FA3 runs in FP8, by index in forward order (the double blocks, "
        "then the single blocks; negative counts from the end): e.g. '0,1,-1' keeps the first two and the last. A "
        "JSON list or comma-separated. The start-up screen then judges only the layers served in FP8.",
    )
    fp8_attention_bf16_below_sigma: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Steps whose sigma is below this run bf16 attention when FA3 runs in FP8 (the late, low-noise "
        "steps); 0: none. Needs FLUX_CUDA_GRAPHS=false (a captured graph replays the kernel it captured).",
    )

    @field_validator("fp8_attention_bf16_blocks", mode="before")
    @classmethod
    def _bf16_block_list(cls, value):
        return setting_list(value, "FLUX_FP8_ATTENTION_BF16_BLOCKS")

    @field_validator("fp8_attention", mode="before")
    @classmethod
    def _fp8_attention_booleans(cls, value):
        """true/false (and 1/0, yes/no) mean on/off, as for the other switches."""
        if isinstance(value, bool):
            return "on" if value else "off"
        lowered = str(value).strip().lower()
        return {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(lowered, lowered)

    @model_validator(mode="after")
    def _flash_attention_3_rules(self):
        if self.fp8_attention == "on" and self.attention in ("sdpa", "cudnn"):
            raise ValueError(
                f"FLUX_FP8_ATTENTION=on runs FlashAttention 3 in FP8; FLUX_ATTENTION={self.attention} excludes it "
                "(use auto or fa3, or FLUX_FP8_ATTENTION=auto/off)"
            )
        if self.fp8_attention == "on" and self.device == "cpu":
            raise ValueError("FLUX_FP8_ATTENTION=on needs a Hopper GPU (FlashAttention 3); not with FLUX_DEVICE=cpu")
        if self.fp8_attention_bf16_below_sigma > 0 and self.cuda_graphs:
            raise ValueError(
                "FLUX_FP8_ATTENTION_BF16_BELOW_SIGMA switches the attention kernel per step, which a captured CUDA "
                "graph cannot follow: set FLUX_CUDA_GRAPHS=false with it (or leave it at 0)"
            )
        return self


class LowPrecisionGemmSettings(BaseModel):
    # FLUX_LOW_PRECISION_GEMM, the feature's name; FLUX_QUANTIZE (and quantize=) stay as aliases.
    low_precision_gemm: Literal["auto", "none", "fp8", "mxfp4"] = Field(
        "auto",
        validation_alias=AliasChoices("low_precision_gemm", "quantize", "flux_low_precision_gemm", "flux_quantize"),
        description="'auto': MXFP4 where FP4 tensor cores exist (sm_100+), FP8 rowwise on sm_89/sm_90.",
    )
    fp8_max_layer_error: float = Field(
        0.06,
        gt=0,
        description="Layers whose simulated FP8 output error exceeds this stay bf16; with FLUX_FP8_ATTENTION=auto, "
        "also the limit for every attention layer in FP8 (measured values: BENCHMARKS.md).",
    )

    @property
    def quantize(self) -> str:
        """The seed-era name of ``low_precision_gemm``."""
        return self.low_precision_gemm

    @model_validator(mode="after")
    def _low_precision_gemm_rules(self):
        if self.device == "cpu" and self.low_precision_gemm in ("fp8", "mxfp4"):
            raise ValueError(
                f"FLUX_QUANTIZE={self.low_precision_gemm} needs a GPU with FP8/FP4 tensor cores; with FLUX_DEVICE=cpu "
                "use auto or none"
            )
        return self


class GeluSigmoidFormSettings(BaseModel):
    gelu_sigmoid_form: bool = Field(
        True, description="Compute the blocks' tanh-GELU as x*sigmoid(2z) (same function, cheaper once compiled)."
    )


class FusedGeluFp8Settings(BaseModel):
    fused_gelu_fp8: bool = Field(
        True, description="One-pass GELU + rowwise FP8 quantization (Triton) before the MLP output GEMMs (GPU, FP8)."
    )


class FusedNormRopeSettings(BaseModel):
    fused_norm_rope: bool = Field(
        True,
        description="Whole FP8 blocks through our Triton kernels: LayerNorm + modulation + FP8 quantization before "
        "the QKV/MLP GEMMs, RMSNorm + RoPE on q/k (GPU, FP8; needs FLUX_FUSED_GELU_FP8=true).",
    )

    @model_validator(mode="after")
    def _fused_norm_rope_rules(self):
        if self.fused_norm_rope and not self.fused_gelu_fp8 and "fused_norm_rope" in self.model_fields_set:
            raise ValueError(
                "FLUX_FUSED_NORM_ROPE=true routes whole blocks through the fused kernels, GELU included; it needs "
                "FLUX_FUSED_GELU_FP8=true"
            )
        return self


class CompileSettings(BaseModel):
    compile: bool = Field(True, description="Regional torch.compile of the transformer blocks and the VAE (GPU only).")
    compile_multi_kernel: bool = Field(
        False,
        description="Inductor multi-kernel (persistent row reductions, the faster kept): slightly faster steps, but "
        "off by default: on torch 2.11 it fails whenever Inductor's on-disk cache hits (BENCHMARKS.md).",
    )
    compile_cache_dir: str | None = Field(
        None,
        description="A directory kept between restarts for Inductor's and Triton's caches (one subdirectory per "
        "torch/GPU/settings fingerprint): a restart on the same fingerprint reuses the compiled code; unset: the "
        "process defaults, not kept by the service. Also holds the start-up decisions (decisions/: the FP8 layer "
        "screen, the attention kernels' timing and FP8 screen, the LoRA kernel choice), read back on a restart with "
        "the same GPU, software, weights and settings (/health startup_decisions). Where the interpreter writes no "
        "bytecode (PYTHONDONTWRITEBYTECODE), Python's bytecode too (bytecode/, read from the environment before "
        "the imports: /health startup_bytecode).",
    )
    compile_dynamic: bool = Field(
        True,
        description="Compile the blocks for dynamic batch and token dimensions and the VAE for dynamic batch, height "
        "and width: one graph per part serves every size (as fast as static ones: BENCHMARKS.md, Shapes); false: "
        "one static graph per shape, each new shape compiling on its first request.",
    )
    compile_batch: Literal["specialized", "unbacked"] = Field(
        "specialized",
        description="How the compiled blocks treat the batch (num_images, true CFG) under FLUX_COMPILE_DYNAMIC: "
        "'specialized' dynamo's default, a graph for one image and another for every larger batch (warm-up "
        "compiles both); 'unbacked' one graph per block kind for every batch size (a block whose code guards on "
        "its batch falls back to 'specialized'): 4.1 s less to reload on a restart, 3 s less compile on a cold "
        "start, but each step measured 1.6-5% slower on an H200 (BENCHMARKS.md, Batch), so not the default.",
    )
    compile_vae: Literal["hot", "all", "off"] = Field(
        "hot",
        description="Which VAE encoder/decoder shapes run compiled code: 'hot' the 1024² ones (one image; static "
        "graphs, compiled at warm-up), eager at every other size; 'all' every shape (dynamic graphs with "
        "FLUX_COMPILE_DYNAMIC, else one graph per shape); 'off' none. 'hot' because a dynamic VAE graph compiled "
        "for minutes at start and ran slower than a static one (BENCHMARKS.md, Start-up).",
    )

    @model_validator(mode="after")
    def _compile_rules(self):
        if self.compile_multi_kernel and not self.compile:
            raise ValueError("FLUX_COMPILE_MULTI_KERNEL=true configures compile; it needs FLUX_COMPILE=true")
        return self


class CudaGraphsSettings(BaseModel):
    cuda_graphs: bool = Field(
        True, description="CUDA graph per transformer block and input shape (GPU only; per request: use_cuda_graphs)."
    )
    cuda_graph_max_shapes: int = Field(
        64,
        ge=1,
        le=256,
        description="At most this many input shapes keep their graphs (memory per shape: BENCHMARKS.md); fewer when "
        "free GPU memory runs short (FLUX_CUDA_GRAPH_MIN_FREE_GIB); least recently used evicted.",
    )
    cuda_graph_min_free_gib: float | None = Field(
        None,
        ge=0,
        description="GPU memory left free for requests' activations after a capture: least recently used shapes' "
        "graphs are evicted until this much is free again (the newest always stays). Default: from the memory plan "
        "(what the largest request it admits needs, the graphs of its own shape included), counted within the "
        "plan's budget (FLUX_GPU_MEMORY_GIB); 20 where there is no plan.",
    )


class TextEncoderGraphsSettings(BaseModel):
    text_encoder_graphs: bool = Field(
        True,
        description="CLIP's and T5's forward at batch 1 replayed as one CUDA graph each (GPU only, encoders resident "
        "on the GPU; kept per encoder where start-up measures it faster with the same bytes).",
    )


class FirstBlockCacheSettings(BaseModel):
    first_block_cache: bool = Field(True, description="diffusers' first-block cache (threshold per request).")
    cache_threshold: float = Field(
        0.12, ge=0, le=1, description="First-block cache residual threshold (the seed's 0.12); 0 never skips."
    )


class ContextParallelSettings(BaseModel):
    """Several GPUs of one host running each generation together (flux_kontext/parallel/, context_parallel)."""

    parallel: int = Field(
        1,
        ge=1,
        le=8,
        description="Processes (one GPU each) that run every generation together (context parallelism, Ulysses): "
        "rank 0 serves HTTP and starts the others. Under torchrun, WORLD_SIZE decides (this must then be 1 or equal).",
    )
    parallel_port: int = Field(
        29517, ge=1024, le=65535, description="TCP port of rank 0's store (jobs, heartbeats, the process group)."
    )
    parallel_heartbeat_timeout_s: float = Field(
        5.0, gt=0, le=300, description="A rank whose heartbeat is older than this turns readiness 503 (dead or frozen)."
    )
    parallel_step_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Once ready, a rank running a job without finishing a denoising step for this long turns "
        "readiness 503 (hung in a kernel or a collective).",
    )
    parallel_start_timeout_s: float = Field(
        600.0, gt=0, description="How long rank 0 waits for every rank to join and load before it reports failed."
    )
    parallel_collective_timeout_s: float = Field(
        600.0, gt=0, description="Timeout of the process group's collectives (a rank gone mid-job ends there)."
    )
    parallel_cuda_graphs: bool = Field(
        False,
        description="Keep CUDA graphs with context parallelism (the graphs then hold NCCL all-to-alls; not yet run "
        "on GPUs here, so off by default: cuda_graphs is skipped, saying why).",
    )


class LoraSettings(BaseModel):
    """LoRA adapters the operator makes available (flux_kontext/optimizations/lora.py); requests choose among them by
    name, never by path or URL."""

    loras: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Adapters as 'name=source', e.g. 'relight=/models/relight.safetensors,style=owner/repo' (a JSON "
        "list or comma-separated): a .safetensors file, a folder or a Hugging Face repo id (':file.safetensors' after "
        "it picks a file); diffusers/peft or kohya/ai-toolkit keys. Each is checked at start; a bad one is reported "
        "in /health and skipped.",
    )
    lora_dir: str | None = Field(
        None, description="A folder whose *.safetensors files are adapters too, each named after its file's stem."
    )
    lora_max_per_request: int = Field(
        2, ge=1, le=8, description="Adapters one request may combine (the side path's slots are sized for this many)."
    )
    lora_max_scale: float = Field(2.0, gt=0, le=100, description="A request's scale must lie in [-this, this].")
    lora_max_rank: int = Field(
        128, ge=1, le=1024, description="Adapters of a higher rank are refused at start (reported in /health)."
    )
    lora_gpu_adapters: int = Field(
        4, ge=1, le=256, description="Adapters kept on the GPU (least recently used evicted; all stay in host memory)."
    )
    lora_k_augment: bool = Field(
        True,
        description="In the fused FP8 blocks, widen the FP8 GEMMs for the adapters' side path where start-up measured "
        "it faster and the memory plan leaves room (a wider e4m3 copy of those layers' weights on the GPU): the up "
        "projection folded into the GEMM by widening its K (t' in copies where the padding leaves room; rows whose "
        "low-rank part would still not fit e4m3 are rescaled, never cut: lora_k_augment.py, lora_fold_input.py), or "
        "A's rows appended to its N (the down projection inside the GEMM: lora_gemm.py). Off: a separate down "
        "projection and the up projection added in place after the GEMM (measured slower: BENCHMARKS.md, LoRA).",
    )

    @field_validator("loras", mode="before")
    @classmethod
    def _lora_list(cls, value):
        return setting_list(value, "FLUX_LORAS")

    @field_validator("loras")
    @classmethod
    def _lora_entries(cls, entries: list[str]) -> list[str]:
        names = [lora_entry(entry)[0] for entry in entries]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"FLUX_LORAS names {', '.join(repeated)} more than once")
        return entries

    @property
    def lora_sources(self) -> dict[str, str]:
        """FLUX_LORAS as {name: source}."""
        return dict(lora_entry(entry) for entry in self.loras)


LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def lora_entry(entry: str) -> tuple[str, str]:
    """'name=source' -> (name, source); the name is what requests use (letters, digits, '_', '.', '-')."""
    name, sep, source = entry.partition("=")
    name, source = name.strip(), source.strip()
    if not sep or not source or not LORA_NAME.match(name):
        raise ValueError(
            f"FLUX_LORAS entry {entry!r} must be 'name=source' with a name of letters, digits, '_', '.' or '-' "
            "(64 characters at most)"
        )
    return name, source


class Settings(
    ContextParallelSettings,
    LoraSettings,
    TextEncoderGraphsSettings,
    FirstBlockCacheSettings,
    CudaGraphsSettings,
    CompileSettings,
    FusedNormRopeSettings,
    FusedGeluFp8Settings,
    GeluSigmoidFormSettings,
    LowPrecisionGemmSettings,
    FlashAttention3Settings,
    AttentionSettings,
    ChannelsLastSettings,
    FuseQkvSettings,
    MemoryPlanSettings,
    ImageEncodingSettings,
    LoggingSettings,
    ReliabilitySettings,
    ServiceSettings,
    BaseSettings,
):
    """Service configuration, read from FLUX_* environment variables or passed directly: the service's section and
    one section per optimization (rules between features are validated in the feature's own section)."""

    model_config = SettingsConfigDict(env_prefix="FLUX_", extra="forbid", frozen=True, populate_by_name=True)

    @property
    def model_is_explicit(self) -> bool:
        """True when the model was chosen by the user (argument or FLUX_MODEL), not defaulted."""
        return "model" in self.model_fields_set

    @property
    def model_kind(self) -> Literal["hub", "local", "random", "tiny"]:
        if self.model == RANDOM_MODEL:
            return "random"
        if self.model == TINY_MODEL:
            return "tiny"
        if os.path.isdir(os.path.expanduser(self.model)):
            return "local"
        return "hub"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_body_bytes_in_flight(self) -> int:
        return int(self.max_body_mb_in_flight * 1024 * 1024)


def hub_token() -> str | None:
    """The Hugging Face token, from the environment variables huggingface_hub itself honours."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None
