"""compile's on-disk caches kept between restarts (FLUX_COMPILE_CACHE_DIR).

Inductor's and Triton's caches go to ``<dir>/<fingerprint>/inductor`` and ``<dir>/<fingerprint>/triton``. The
fingerprint names what makes compiled code belong to this start: torch, triton, CUDA and Python versions, the GPU
and its capability, the model's dtype, and the settings that change the generated code. It is a short hash, with
``fingerprint.json`` beside it holding the readable fields; a directory whose fingerprint.json says otherwise (a
hash collision, a hand edit) is never used: the next free ``<hash>-<n>`` is.

The knobs: torch (2.11 to 2.13) has no ``torch._inductor.config`` entry for the cache location. Inductor reads the
``TORCHINDUCTOR_CACHE_DIR`` environment variable on every call of ``torch._inductor.runtime.cache_dir_utils.
cache_dir()`` (nothing memoizes it; its compile workers get the variable passed at each submit), and Triton's
location comes from ``TRITON_CACHE_DIR``, which Inductor only fills in when unset, at the first Triton kernel, and
which Triton reads when it compiles. Compile's ``apply`` runs before anything is compiled (the first compile is the
warm-up's first call), so setting both variables there is early enough; in-memory caches Inductor may already
hold from an earlier engine in the process are cleared, as torch's own ``temporary_cache_dir`` does.

Why directories, not torch's portable mega-cache (``torch.compiler.save_cache_artifacts`` /
``load_cache_artifacts``): saving needs a hook after warm-up has compiled every shape (and again after each
request that compiles a new one), which the stack has no place for; the directories fill themselves as Inductor
and Triton work, hold every shape compiled in any earlier run, and are what those functions package anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flux_kontext.stack import Hardware

FINGERPRINT_FILE = "fingerprint.json"
HASH_LENGTH = 12
MAX_SUFFIX = 100
# Settings that change the code compile generates (whatever the blocks and the VAE compute is in the graph).
CODE_SETTINGS = (
    "compile",
    "compile_multi_kernel",
    "compile_dynamic",
    "compile_batch",
    "compile_vae",
    "fuse_qkv",
    "channels_last",
    "attention",
    "fp8_attention",
    "low_precision_gemm",
    "fp8_max_layer_error",
    "gelu_sigmoid_form",
    "fused_gelu_fp8",
    "fused_norm_rope",
)
ENV = {"inductor": "TORCHINDUCTOR_CACHE_DIR", "triton": "TRITON_CACHE_DIR"}
PROCESS_DEFAULT = "process default"


@dataclass(frozen=True)
class CachePlan:
    """Where compile's caches went, for the report."""

    cache: str  # "hit", "cold", or PROCESS_DEFAULT (the setting unset, or the directory unusable)
    detail: str
    cache_dir: str | None = None
    fingerprint: dict | None = None
    notes: dict = field(default_factory=dict)

    def data(self) -> dict:
        return {"cache": self.cache, "cache_dir": self.cache_dir, "fingerprint": self.fingerprint, **self.notes}


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return getattr(triton, "__version__", "unknown")


def gpu_name(hardware: Hardware) -> str | None:
    if hardware.name:
        return hardware.name
    if hardware.is_cuda and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            return torch.cuda.get_device_name()
    return None


def fingerprint(settings, hardware: Hardware, dtype: torch.dtype | None) -> dict:
    """The readable fields a cache directory belongs to."""
    return {
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device_type": hardware.device_type,
        "gpu": gpu_name(hardware),
        "capability": list(hardware.capability) if hardware.capability else None,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "settings": {name: getattr(settings, name, None) for name in CODE_SETTINGS},
    }


def fingerprint_hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:HASH_LENGTH]


def _read_fingerprint(directory: Path) -> dict | None:
    try:
        return json.loads((directory / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        return None


def _has_files(directory: Path) -> bool:
    for _, _, files in os.walk(directory):
        if files:
            return True
    return False


def _choose(root: Path, fields: dict) -> tuple[Path, str | None]:
    """The fingerprint's directory: ``<hash>``, or the first ``<hash>-<n>`` that is free or says the same fields;
    with the reason when ``<hash>`` itself was not used."""
    digest = fingerprint_hash(fields)
    reason = None
    for n in range(MAX_SUFFIX):
        candidate = root / (digest if n == 0 else f"{digest}-{n}")
        if not candidate.exists():
            return candidate, reason
        found = _read_fingerprint(candidate)
        if found == fields:
            return candidate, reason
        if found is None and candidate.is_dir() and not any(candidate.iterdir()):
            return candidate, reason  # made by a start that stopped before writing fingerprint.json
        if reason is None:
            differs = sorted(k for k in fields if (found or {}).get(k) != fields[k]) if found else []
            why = (
                f"its {FINGERPRINT_FILE} differs in {', '.join(differs)}" if differs else f"no valid {FINGERPRINT_FILE}"
            )
            reason = f"{candidate} not used: {why}"
    raise OSError(f"{MAX_SUFFIX} directories for fingerprint {digest} under {root} belong to other fingerprints")


def _write_fingerprint(directory: Path, fields: dict) -> None:
    target = directory / FINGERPRINT_FILE
    if _read_fingerprint(directory) == fields:
        probe = directory / f".write-check-{os.getpid()}"  # the directory must stay writable for the caches
        probe.write_text("")
        probe.unlink()
        return
    partial = directory / f".{FINGERPRINT_FILE}.{os.getpid()}"
    partial.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    os.replace(partial, target)


WARM_POOL = "TORCH_WARM_POOL"  # torch: "1" (its default) starts Inductor's compile workers at the first compile


def compile_workers_on_demand() -> str:
    """On a hit, Inductor's compile worker processes start when a kernel must be compiled, not at the first compile.

    torch starts one worker per CPU (16 on an H200 host) as soon as a graph goes to Inductor, each importing torch,
    while a hit only loads compiled code: on an H200 a restart's warm-up took 9.9-10.0 s without them against
    11.3-13.1 s with them (BENCHMARKS.md, ninth session). Where something does compile, the pool starts then (until
    it is ready Inductor compiles in the process). An operator's own TORCH_WARM_POOL is left as it is."""
    if WARM_POOL in os.environ:
        return f"as the environment's {WARM_POOL}={os.environ[WARM_POOL]} says"
    os.environ[WARM_POOL] = "0"  # read by torch at the first compile, which is warm-up's, after this
    return f"started when a kernel must compile, not at the first compile ({WARM_POOL}=0: compile cache hit)"


def point_caches_at(directory: Path) -> None:
    """Inductor and Triton write and read their caches under ``directory`` from now on (module docstring: why
    these variables are read late enough)."""
    for sub, variable in ENV.items():
        os.environ[variable] = str(directory / sub)
    inductor_utils = sys.modules.get("torch._inductor.utils")
    if inductor_utils is not None:  # not imported: nothing of Inductor's is cached in memory yet
        inductor_utils.clear_caches()


def prepare(cache_root: str | None, settings, hardware: Hardware, dtype: torch.dtype | None) -> CachePlan:
    """Points the caches at the fingerprint's directory under ``cache_root``; never raises: an unusable directory
    leaves the process defaults in place and the plan says why."""
    if not cache_root:
        return CachePlan(
            PROCESS_DEFAULT,
            "Inductor/Triton caches: the process defaults, not kept by the service (FLUX_COMPILE_CACHE_DIR unset)",
        )
    fields = fingerprint(settings, hardware, dtype)
    try:
        root = Path(cache_root).expanduser().absolute()
        root.mkdir(parents=True, exist_ok=True)
        directory, reason = _choose(root, fields)
        directory.mkdir(exist_ok=True)
        _write_fingerprint(directory, fields)
        hit = (directory / "inductor").is_dir() and _has_files(directory / "inductor")
        for sub in ENV:
            (directory / sub).mkdir(exist_ok=True)
    except OSError as exc:
        why = f"{type(exc).__name__}: {exc}"
        return CachePlan(
            PROCESS_DEFAULT,
            f"Inductor/Triton caches: the process defaults, not kept: FLUX_COMPILE_CACHE_DIR={cache_root} unusable "
            f"({why})",
            fingerprint=fields,
            notes={"cache_dir_error": why},
        )
    point_caches_at(directory)
    cache = "hit" if hit else "cold"
    said = (
        "hit: compiled artifacts from an earlier start" if hit else "cold: the first start with these fields fills it"
    )
    notes = {"cache_dir_not_reused": reason} if reason else {}
    if hit:
        notes["compile_workers"] = compile_workers_on_demand()
    detail = f"Inductor/Triton caches in {directory} ({said})" + (f"; {reason}" if reason else "")
    return CachePlan(cache, detail, str(directory), fields, notes)
