"""Python's bytecode kept in the compile cache directory when the interpreter would otherwise keep none.

Why (issue 11): an image built with ``PYTHONDONTWRITEBYTECODE=1`` (a common container habit) and packages installed
without their ``.pyc`` files compiles every module from source at every start. On the H200 machine this
project measures on, torch ships no ``__pycache__`` and that variable is set: importing the diffusers pipeline took
18 s, most of a restart's 44 s. Python can keep its bytecode outside the source tree (``sys.pycache_prefix``,
PYTHONPYCACHEPREFIX), which is what an operator who keeps a directory for caches (FLUX_COMPILE_CACHE_DIR) wants
here: the source tree stays clean, and a restart reads bytecode instead of compiling it.

It has to act before the heavy imports, so it runs when the ``flux_kontext`` package is first imported (before
torch, pydantic and the settings), and it reads FLUX_COMPILE_CACHE_DIR from the environment itself (a .env file is
read later, by the settings: too late for the imports). It changes nothing unless all of these hold:

- FLUX_COMPILE_CACHE_DIR is set (the operator keeps a directory for caches);
- the interpreter writes no bytecode (``PYTHONDONTWRITEBYTECODE`` or ``-B``): otherwise Python keeps it next to the
  sources already, and moving it would compile everything once more;
- the operator chose no prefix of their own (PYTHONPYCACHEPREFIX / ``-X pycache_prefix``).

Then bytecode is read from and written to ``<FLUX_COMPILE_CACHE_DIR>/bytecode`` (Python checks each file against its
source's modification time, so an upgraded package is recompiled, never served stale), and the same goes for the
processes this one starts (Inductor's compile workers) through the environment. ``state()`` says what was done,
for /health's ``startup_bytecode``. Processes sharing the directory (replicas, parallel ranks) are safe: Python
writes each file to a temporary name and renames it. The directory is trusted as Inductor's caches beside it are:
both hold code this process runs, so it must be writable by the service alone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SUBDIRECTORY = "bytecode"
_state: dict = {"kept": False, "why": "not checked"}


def keep_bytecode(environ=os.environ) -> dict:
    """Point Python's bytecode cache into the compile cache directory where that is what keeps it (see the module
    docstring); returns (and remembers) what it did."""
    global _state
    directory = environ.get("FLUX_COMPILE_CACHE_DIR")
    if not directory:
        _state = {"kept": False, "why": "FLUX_COMPILE_CACHE_DIR unset"}
    elif sys.pycache_prefix:
        _state = {"kept": False, "why": f"the interpreter's own prefix is used: {sys.pycache_prefix}"}
    elif not sys.dont_write_bytecode:
        _state = {"kept": False, "why": "Python keeps bytecode beside the sources (__pycache__)"}
    else:
        target = Path(directory) / SUBDIRECTORY
        try:
            target.mkdir(parents=True, exist_ok=True)
            held = next(target.iterdir(), None) is not None
        except OSError as exc:
            _state = {"kept": False, "why": f"{target} unusable: {exc}"}
            return dict(_state)
        sys.pycache_prefix, sys.dont_write_bytecode = str(target), False
        environ["PYTHONPYCACHEPREFIX"] = str(target)
        environ.pop("PYTHONDONTWRITEBYTECODE", None)
        _state = {
            "kept": True,
            "directory": str(target),
            "cache": "hit" if held else "cold",
            "why": "PYTHONDONTWRITEBYTECODE (or -B) was set: bytecode kept in the compile cache directory instead "
            "of being compiled from source at every start",
        }
    return dict(_state)


def state() -> dict:
    """What ``keep_bytecode`` did in this process."""
    return dict(_state)
