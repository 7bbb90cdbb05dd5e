"""A module's forward composed in fixed, named slots, so that optimizations stack without knowing each other.

    body -> compiled -> graphed

- ``body``: what computes the block (diffusers' own forward, or our fused-kernel forward);
- ``compiled``: ``torch.compile`` of whatever the body is;
- ``graphed``: a per-shape CUDA graph of whatever the compiled code is.

Each slot holds a *wrapper factory*, ``make(inner) -> callable``; the composed callable is installed as the
module's ``forward`` (an instance attribute: diffusers' hooks, e.g. the first-block cache, call ``module.forward``
and so stay above every slot). Setting or clearing a slot rebuilds the chain from that slot up, calling the
factories of the slots above it again: what they wrap is then the new inner forward, never a stale one; the slots
below keep what they built (a compiled forward keeps its state when graphs are added on top). Clearing every slot
gives the module back its class's forward.

One ``ForwardSlots`` belongs to one Stack (one engine); two engines in one process have separate pipelines and
separate slots.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

SLOTS = ("body", "compiled", "graphed")
Factory = Callable[[Callable], Callable]


class ForwardSlots:
    """The slot contents of every module an optimization has touched."""

    def __init__(self):
        self._slots: dict[torch.nn.Module, dict[str, Factory]] = {}
        self._built: dict[torch.nn.Module, dict[str, Callable]] = {}  # what each filled slot's factory returned

    def set(self, module: torch.nn.Module, slot: str, make: Factory) -> None:
        """Put ``make`` in ``slot`` of ``module`` and reinstall its forward."""
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
        self._slots.setdefault(module, {})[slot] = make
        self._install(module, slot)

    def set_body(self, module: torch.nn.Module, forward: Callable) -> None:
        """The body slot with ``forward(module, *args, **kwargs)``, written like a method of the module's class."""
        self.set(module, "body", lambda _class_forward: types.MethodType(forward, module))

    def clear(self, module: torch.nn.Module, slot: str) -> None:
        """Empty ``slot`` of ``module`` (a no-op when it is empty) and reinstall its forward."""
        slots = self._slots.get(module)
        if slots is None or slots.pop(slot, None) is None:
            return
        self._install(module, slot)

    def clear_everywhere(self, slot: str) -> None:
        for module in list(self._slots):
            self.clear(module, slot)

    def filled(self, module: torch.nn.Module) -> tuple[str, ...]:
        """The slots of ``module`` that hold something, in composition order."""
        return tuple(slot for slot in SLOTS if slot in self._slots.get(module, {}))

    def _install(self, module: torch.nn.Module, changed: str) -> None:
        slots, built = self._slots[module], self._built.setdefault(module, {})
        if not slots:
            del self._slots[module], self._built[module]
            module.__dict__.pop("forward", None)  # the class's forward again
            return
        forward = types.MethodType(type(module).forward, module)
        start = SLOTS.index(changed)
        for slot in SLOTS[:start]:
            forward = built.get(slot, forward)
        for slot in SLOTS[start:]:
            built.pop(slot, None)
            if slot in slots:
                forward = built[slot] = slots[slot](forward)
        module.forward = forward
