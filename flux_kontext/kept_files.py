"""JSON files the service keeps in the operator's cache directory between starts (start-up decisions, the warm-up
record): each belongs to one key (what it was measured with), is read back only for that key, and is written
atomically (a reader never sees half a file; two processes never interleave one)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_keyed(path: Path, fmt: int, key: dict) -> tuple[dict | None, str]:
    """(the file's content, "read back") when it exists, parses and was written with format ``fmt`` for ``key``;
    else (None, why: "missing", "unreadable (...)", "for another key (differs in ...)")."""
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(content, dict) or content.get("format") != fmt or content.get("key") != key:
        kept = (content.get("key") if isinstance(content, dict) else None) or {}
        differs = sorted(k for k in key if not isinstance(kept, dict) or kept.get(k) != key[k])
        return None, "for another key" + (f" (differs in {', '.join(differs)})" if differs else "")
    return content, "read back"


def write_atomically(path: Path, content: dict) -> None:
    """``content`` as indented JSON at ``path``, through a temporary file renamed over it (raises OSError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)


class KeptFile:
    """A kept JSON file of one key in the cache directory: ``path`` (None: nothing is kept), ``key``, ``why_off``
    (why nothing is kept, where it is not)."""

    def __init__(self, path: Path | None, key: dict | None, why_off: str | None):
        self.path, self.key, self.why_off = path, key or {}, why_off

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def read_content(self, fmt: int) -> tuple[dict | None, str]:
        """read_keyed of this file."""
        return read_keyed(self.path, fmt, self.key)
