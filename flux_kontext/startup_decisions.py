"""Start-up decisions kept between restarts in FLUX_COMPILE_CACHE_DIR: what the optimize phase measured.

At start the stack measures before it decides: the FP8 screen of every transformer layer (which stay bf16, and each
layer's error once quantized), the attention kernels' error and timing and the FP8 attention screen, the LoRA up
projection's kernel per layer shape. None of it changes while the GPU, the software, the weights and the settings
stay the same, so a restart on the operator's kept cache directory reads it back instead of measuring again
(seconds of a restart: BENCHMARKS.md, "Start to ready").

One JSON file per key, ``<dir>/decisions/<hash>.json``; the key holds everything a measurement depends on: compile
cache's fingerprint (torch, triton, CUDA, Python, the GPU and its capability, the dtype, the settings that change
the generated code), the versions of diffusers, transformers, torchao and FA3, the decision settings below, and the
weights' identity (the model source and revision, and each weight file's size and modification time; random
weights: their seed). Anything else re-measures, and the file is rewritten. A decision read back says so in its
optimization's report, with when it was measured; /health's ``startup_decisions`` says hit, cold or partial.

Importing this module needs no torch (the HTTP layer may read a report).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flux_kontext.kept_files import KeptFile, write_atomically

log = logging.getLogger(__name__)

FORMAT = 1  # bumped when what a decision holds changes meaning: older files re-measure
SUBDIR = "decisions"
# Settings a measured decision depends on beyond compile cache's CODE_SETTINGS.
DECISION_SETTINGS = ("fp8_attention_bf16_blocks", "fp8_attention_bf16_below_sigma", "lora_max_rank")
PACKAGES = ("diffusers", "transformers", "torchao", "fa3-fwd", "triton")


@dataclass(frozen=True)
class Cached:
    """A decision read back: its value and when it was measured (ISO 8601, UTC)."""

    value: Any
    measured_at: str


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _plain(value: Any) -> Any:
    """A JSON copy (tuples become lists, later changes to ``value`` stay out of the store)."""
    return json.loads(json.dumps(value, default=str))


class DecisionCache(KeptFile):
    """The decisions of one key. ``get`` / ``put`` by (name, part); ``save`` writes what was measured this start."""

    def __init__(self, path: Path | None = None, key: dict | None = None, why_off: str | None = None):
        super().__init__(path, key, why_off)
        self._stored: dict[str, dict[str, dict]] = {}
        self._found_file = False
        self._used: dict[str, str] = {}  # "name/part" -> measured_at, read back this start
        self._measured: set[str] = set()  # "name/part" measured this start
        self._dirty = False
        if path is not None:
            self._read()

    def _read(self) -> None:
        content, found = self.read_content(FORMAT)
        if content is None:
            if found != "missing":
                log.warning("start-up decisions: %s is %s; measuring again", self.path, found)
            return
        self._found_file = True
        self._stored = content.get("decisions", {})

    def get(self, name: str, part: str = "") -> Cached | None:
        entry = self._stored.get(name, {}).get(part)
        if entry is None:
            return None
        self._used[f"{name}/{part}"] = entry["measured_at"]
        return Cached(copy.deepcopy(entry["value"]), entry["measured_at"])

    def put(self, name: str, value: Any, part: str = "") -> None:
        if not self.enabled:
            return
        self._stored.setdefault(name, {})[part] = {"value": _plain(value), "measured_at": _now()}
        self._measured.add(f"{name}/{part}")
        self._used.pop(f"{name}/{part}", None)
        self._dirty = True

    def cached_or_measured(
        self,
        name: str,
        measure: Callable[[], Any],
        part: str = "",
        valid: Callable[[Any], bool] = lambda _: True,
        keep: Callable[[Any], bool] = lambda _: True,
    ) -> tuple[Any, Cached | None]:
        """The decision read back (and ``valid`` for what is there now), else ``measure()``'s, stored where ``keep``
        says it was a measurement (not a fallback); with the ``Cached`` record when it was read back (None: now)."""
        cached = self.get(name, part)
        if cached is not None and valid(cached.value):
            return cached.value, cached
        if cached is not None:
            self._used.pop(f"{name}/{part}", None)
            log.info("start-up decision %s/%s no longer fits the loaded model: measuring again", name, part)
        value = measure()
        if keep(value):
            self.put(name, value, part)
        return value, None

    def describe(self, name: str) -> dict:
        """For ``name``'s report: whether its decisions were read back, and when they were measured."""
        if not self.enabled:
            return {"cached": False, "why": self.why_off}
        mine = name + "/"
        measured = [key for key in self._measured if key.startswith(mine)]
        used = [key for key in self._used if key.startswith(mine)]
        cached = bool(used) and not measured
        # measured_at: when the last of the decisions it runs on was measured (read back, or stored this start)
        stamps = [self._stored[name][key[len(mine) :]]["measured_at"] for key in (used if cached else measured)]
        return {"cached": cached, "measured_at": max(stamps, default=None), "file": str(self.path)}

    def note(self, name: str) -> str:
        """A phrase for the report's detail."""
        described = self.describe(name)
        if not described["cached"]:
            return ""
        return f"; measurements read back from the kept cache (measured {described['measured_at']})"

    def save(self) -> None:
        """Write the file if anything was measured this start (atomically; a failure is logged, never raised)."""
        if not self.enabled or not self._dirty:
            return
        try:
            write_atomically(self.path, {"format": FORMAT, "key": self.key, "decisions": self._stored})
            self._dirty = False
        except OSError as exc:
            log.warning("start-up decisions not kept: %s (%s)", self.path, exc)

    def report(self) -> dict:
        """/health's ``startup_decisions``: hit (everything read back), cold (everything measured), partial, off
        (no cache directory), or "none measured" (nothing on this device measures at start: the CPU)."""
        if not self.enabled:
            state = "off"
        elif self._used:
            state = "partial" if self._measured else "hit"
        else:
            state = "cold" if self._measured else "none measured"
        return {
            "decisions": state,
            "file": str(self.path) if self.path else None,
            "why": self.why_off,
            "read_back": dict(sorted(self._used.items())),
            "measured_now": sorted(self._measured),
            "key": self.key or None,
        }


OFF = "FLUX_COMPILE_CACHE_DIR unset: measured at every start"


def weights_identity(folder: str | None, seed: int | None = None) -> dict:
    """What identifies the weights: a folder's weight and config files (path, size, modification time; a hub
    snapshot's path names its commit), or random weights' seed."""
    if folder is None:
        return {"random_seed": seed}
    root = Path(folder).expanduser().absolute()
    files = []
    for path in sorted(root.rglob("*")):
        if path.suffix in (".safetensors", ".json", ".bin") and path.is_file():
            with contextlib.suppress(OSError):
                stat = path.stat()
                files.append([str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns])
    return {"folder": str(root), "files": files}


def decision_key(settings, hardware, dtype, model: dict) -> dict:
    """The fields a start's measurements belong to (module docstring)."""
    from flux_kontext.optimizations.compile_cache import fingerprint

    return {
        **fingerprint(settings, hardware, dtype),
        "packages": {package: _version(package) for package in PACKAGES},
        "decision_settings": {name: _plain(getattr(settings, name, None)) for name in DECISION_SETTINGS},
        "model": _plain(model),
    }


def open_decisions(settings, hardware, dtype, model: dict) -> DecisionCache:
    """The decisions kept for this start's key under FLUX_COMPILE_CACHE_DIR, or an off store (measure every start)."""
    root = getattr(settings, "compile_cache_dir", None)
    if not root:
        return DecisionCache(why_off=OFF)
    from flux_kontext.optimizations.compile_cache import fingerprint_hash

    key = decision_key(settings, hardware, dtype, model)
    return DecisionCache(Path(root).expanduser().absolute() / SUBDIR / f"{fingerprint_hash(key)}.json", key)
