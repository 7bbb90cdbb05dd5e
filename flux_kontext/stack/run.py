"""What ran for one request: filled in by the Stack and the optimizations while the request runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRun:
    """One request's view of the stack.

    ``ran``: optimizations that really ran; ``not_applied``: requested (flag true or no flag) but did not run, with
    the reason; ``could_not_turn_off``: turned off by the request but applied to the loaded weights; ``counters``:
    per optimization with counters, what it counted for this request (None where it is not loaded);
    ``scheduler``: the scheduler this request uses. The generation fills ``negative_prompt_embeds`` once the text is
    encoded (the first-block cache tells the true-CFG pass apart by it).
    """

    scheduler: str = "euler"
    ran: list[str] = field(default_factory=list)
    not_applied: list[dict] = field(default_factory=list)
    could_not_turn_off: list[dict] = field(default_factory=list)
    counters: dict[str, dict | None] = field(default_factory=dict)
    negative_prompt_embeds: Any = None

    def record_ran(self, name: str) -> None:
        self.ran.append(name)

    def record_not_applied(self, name: str, flag: str | None, reason: str) -> None:
        self.not_applied.append({"flag": flag, "optimization": name, "reason": reason})

    def withdraw(self, name: str, flag: str | None, reason: str) -> None:
        """It was expected to run but did not, after all (e.g. no CUDA graph was replayed for a new shape)."""
        if name in self.ran:
            self.ran.remove(name)
        self.record_not_applied(name, flag, reason)

    def record_forced_on(self, name: str, flag: str | None) -> None:
        self.ran.append(name)
        self.could_not_turn_off.append(
            {
                "flag": flag,
                "optimization": name,
                "reason": "applied to the loaded weights; it cannot be switched per request",
            }
        )

    def public(self) -> dict:
        return {"ran": self.ran, "not_applied": self.not_applied, "could_not_turn_off": self.could_not_turn_off}
