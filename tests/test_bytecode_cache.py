"""Python's bytecode kept in FLUX_COMPILE_CACHE_DIR where the interpreter would keep none (bytecode_cache.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What a fresh interpreter reports after importing the package and one of its modules (as a start would).
PROBE = (
    "import json, sys, flux_kontext, flux_kontext.resolution; from flux_kontext import bytecode_cache; "
    "print(json.dumps({**bytecode_cache.state(), 'prefix': sys.pycache_prefix}))"
)


def start(cache_dir: Path | None, *flags: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    environ.pop("FLUX_COMPILE_CACHE_DIR", None)
    if cache_dir is not None:
        environ["FLUX_COMPILE_CACHE_DIR"] = str(cache_dir)
    done = subprocess.run(
        [sys.executable, *flags, "-c", PROBE],
        cwd=ROOT,
        env={**environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_without_bytecode_writes_a_restart_reads_bytecode_from_the_cache_directory(tmp_path):
    first = start(tmp_path, PYTHONDONTWRITEBYTECODE="1")
    assert first["kept"] is True and first["cache"] == "cold"
    assert first["prefix"] == str(tmp_path / "bytecode")
    # The package's own modules were compiled into the directory (mirroring the source path), none beside them.
    written = list((tmp_path / "bytecode").rglob("resolution.cpython-*.pyc"))
    assert len(written) == 1 and "flux_kontext" in written[0].parts
    second = start(tmp_path, "-B")
    assert second["kept"] is True and second["cache"] == "hit"


def test_bytecode_stays_where_python_keeps_it_unless_it_would_be_lost(tmp_path):
    kept_beside = start(tmp_path)
    assert kept_beside["kept"] is False and "beside the sources" in kept_beside["why"]
    assert kept_beside["prefix"] is None and not (tmp_path / "bytecode").exists()
    assert start(None, "-B")["why"] == "FLUX_COMPILE_CACHE_DIR unset"
    own = start(tmp_path, "-B", PYTHONPYCACHEPREFIX=str(tmp_path / "mine"))
    assert own["kept"] is False and own["prefix"] == str(tmp_path / "mine")


def test_an_unusable_cache_directory_leaves_python_as_it_was(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    state = start(blocked, "-B")
    assert state["kept"] is False and "unusable" in state["why"] and state["prefix"] is None
