"""What each warm-up generation compiled when it last ran, kept in FLUX_COMPILE_CACHE_DIR, so that a restart on a
kept cache skips the generations that compiled nothing (FLUX_WARMUP_SKIP_CACHED, on by default).

Why: on a restart whose compile cache hits, the generations that compile reload their graphs from Inductor's cache
and must run (else the first request would trace and load them). The others (text-to-image after the edit, each
per-request switch variant) find every graph they need already in memory: they only generate, 0.3-0.7 s each on an
H200 (BENCHMARKS.md, "Start to ready"). Whether one compiled is what the engine counts anyway (compile's
``graphs_compiled`` per request, dynamo's traced frames: a graph reloaded from Inductor's cache counts too).

One JSON file per key, ``<dir>/warmup/<hash>.json``, beside ``decisions/`` and with their discipline: the key is the
start-up decisions' (compile cache's fingerprint, package versions, the weights' identity) plus a hash of every
setting but the log's (the warm-up plan, the switches and the adapters are settings). One entry per generation,
keyed by ``generation_key`` (shape, steps and job fields), with the graphs it compiled, the CUDA graphs it captured
and when it ran. Skipped only while all of these hold: the setting is on, the cache directory is set, compile is
applied and its cache hit at this start, and the file is read back with this key and says the generation compiled
nothing; a cold start, another key, a missing or unreadable file run everything (with a warning where the cache hit).
A warm-up retried after an undo neither skips nor writes (what it measured holds for the undone stack only). A
skipped generation keeps its entry, so the date /health shows is when it last ran.

A skipped generation captures no CUDA graphs: a shape whose graphs it captured (text-to-image at 1024²) captures them
on its first request instead (a few hundred milliseconds, once; /health's shapes say "not captured" until then).

Importing this module needs no torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flux_kontext.kept_files import KeptFile, write_atomically

log = logging.getLogger(__name__)

FORMAT = 1
SUBDIR = "warmup"
# Settings that cannot change what a generation compiles (left out of the key, so changing them skips as before).
IGNORED_SETTINGS = ("log_level", "log_format", "warmup_skip_cached")
MISSING = "not found for this key (the first start with it, or a new key: other software, weights or settings)"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def settings_hash(settings) -> str:
    """A hash of every setting but IGNORED_SETTINGS (values never written: some are secrets or hosts)."""
    dumped = settings.model_dump(mode="json", exclude=set(IGNORED_SETTINGS))
    return hashlib.sha256(json.dumps(dumped, sort_keys=True, default=str).encode()).hexdigest()


def record_key(decision_key: dict, settings) -> dict:
    """The fields a warm-up record belongs to: the start-up decisions' key and the settings' hash."""
    return {**decision_key, "settings_sha256": settings_hash(settings)}


def generation_key(shape_key: str, steps: int, fields: dict) -> str:
    """One warm-up generation: its shape, its steps and the job fields of its variant (flags off, adapters on)."""
    variant = json.dumps(fields, sort_keys=True, default=str)
    return f"{shape_key}, {steps} step(s), {variant}"


@dataclass(frozen=True)
class Entry:
    graphs_compiled: int
    cuda_graphs_captured: int
    seconds: float
    ran_at: str


class WarmupRecord(KeptFile):
    """The record of one key: ``skip_reason`` says whether a generation may be skipped this start, ``ran`` and
    ``skipped`` note what this warm-up did, ``save`` writes it, ``report`` is /health's ``shapes.warmup``."""

    def __init__(self, path: Path | None = None, key: dict | None = None, why_off: str | None = None, may_skip=False):
        super().__init__(path, key, why_off)
        self.found: str = "off" if path is None else MISSING  # or: read back, unreadable (why), for another key
        self.may_skip = may_skip and path is not None
        self._stored: dict[str, Entry] = {}
        self._ran_now: dict[str, Entry] = {}  # this warm-up's, in order
        self._skipped: dict[str, str] = {}  # generation -> why
        self._lock = threading.Lock()  # written by warm-up, read by /health
        if path is not None:
            self._read()
        if self.may_skip and self.found != "read back":
            log.warning("warm-up record %s is %s: running every warm-up generation", self.path, self.found)
            self.may_skip = False

    def _read(self) -> None:
        content, found = self.read_content(FORMAT)
        if content is None:
            if found != "missing":  # missing: self.found keeps its own wording
                self.found = found
            return
        try:
            self._stored = {name: Entry(**entry) for name, entry in content["generations"].items()}
            if not all(isinstance(e.graphs_compiled, int) and isinstance(e.ran_at, str) for e in self._stored.values()):
                raise ValueError("an entry's graphs_compiled is not a whole number")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self.found = f"unreadable ({type(exc).__name__}: {exc})"
            self._stored = {}
            return
        self.found = found

    def skip_reason(self, generation: str) -> str | None:
        """Why this generation may be skipped this start (None: it runs)."""
        entry = self._stored.get(generation)
        if not self.may_skip or entry is None or entry.graphs_compiled:
            return None
        why = f"compiled nothing on {entry.ran_at} with this fingerprint"
        if entry.cuda_graphs_captured:
            why += f" (its {entry.cuda_graphs_captured} CUDA graph(s) are captured on its shape's first request)"
        return why

    def skipped(self, generation: str, why: str) -> None:
        with self._lock:
            self._skipped[generation] = why

    def ran(self, generation: str, graphs_compiled: int, cuda_graphs_captured: int, seconds: float) -> None:
        with self._lock:
            self._ran_now[generation] = Entry(graphs_compiled, cuda_graphs_captured, round(seconds, 2), _now())

    def save(self) -> None:
        """Write what this warm-up ran over what the file held (atomically; a failure is logged, never raised)."""
        if not self.enabled or not self._ran_now:
            return
        with self._lock:
            generations = {**self._stored, **self._ran_now}
        content = {
            "format": FORMAT,
            "key": self.key,
            "generations": {name: entry.__dict__ for name, entry in generations.items()},
        }
        try:
            write_atomically(self.path, content)
        except OSError as exc:
            log.warning("warm-up record not kept: %s (%s)", self.path, exc)

    def report(self) -> dict:
        """What this warm-up ran and skipped, and why it could or could not skip."""
        with self._lock:
            ran = {
                name: {
                    "graphs_compiled": e.graphs_compiled,
                    "cuda_graphs_captured": e.cuda_graphs_captured,
                    "seconds": e.seconds,
                }
                for name, e in self._ran_now.items()
            }
            skipped = dict(self._skipped)
        return {
            "skipping": self.may_skip,
            "why_not": None if self.may_skip else (self.why_off or f"the record is {self.found}"),
            "record": self.found,
            "file": str(self.path) if self.path else None,
            "ran": ran,
            "skipped": skipped,
        }


def open_record(settings, decision_key: dict, compile_cache: str | None, retry: bool = False) -> WarmupRecord:
    """The warm-up record for this start. ``decision_key``: the start-up decisions' key (empty: no cache directory);
    ``compile_cache``: compile's report's ``cache`` (None: compile not applied). Skipping is allowed only on a hit."""
    root = getattr(settings, "compile_cache_dir", None)
    if not root or not decision_key:
        return WarmupRecord(why_off="FLUX_COMPILE_CACHE_DIR unset: every warm-up generation runs")
    if compile_cache is None:
        return WarmupRecord(why_off="compile is not applied: warm-up compiles nothing, nothing to skip or keep")
    if retry:
        return WarmupRecord(why_off="warm-up retried after an undo: every generation runs, the record is not kept")
    from flux_kontext.optimizations.compile_cache import fingerprint_hash  # needs torch; the engine has it

    key = record_key(decision_key, settings)
    path = Path(root).expanduser().absolute() / SUBDIR / f"{fingerprint_hash(key)}.json"
    if not settings.warmup_skip_cached:
        why = "FLUX_WARMUP_SKIP_CACHED=false: every warm-up generation runs"
    elif compile_cache != "hit":
        why = f"compile cache {compile_cache}: every warm-up generation runs (each may compile)"
    else:
        why = None
    return WarmupRecord(path, key, why, may_skip=why is None)
