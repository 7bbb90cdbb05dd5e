"""A module's forward composed in fixed, named slots, so that optimizations stack without knowing each other.

    body -> compiled -> graphed

- ``body``: what computes the block (diffusers' own forward, or our fused-kernel forward);
- ``compiled``: ``torch.compile`` of whatever the body is;
- ``graphed``: a per-shape CUDA graph of whatever the compiled code is.

Each slot holds a *wrapper factory*, ``make(inner) -> callable``. The first time a module gets a slot, one
``ComposedForward`` is installed as its ``forward`` (an instance attribute) and stays there for good: later changes
swap what it calls, never the attribute. diffusers' hooks (the first-block cache) wrap ``module.forward`` once, when
they are registered, so they keep wrapping the composition whatever happens to the slots below them (an undo at
warm-up, say). Setting or clearing a slot rebuilds the chain from that slot up, calling the
factories of the slots above it again: what they wrap is then the new inner forward, never a stale one; the slots
below keep what they built (a compiled forward keeps its state when graphs are added on top). Clearing every slot
makes it call its class's forward again.

One ``ForwardSlots`` belongs to one Stack (one engine); two engines in one process have separate pipelines and
separate slots.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

SLOTS = ("body", "compiled", "graphed")
Factory = Callable[[Callable], Callable]


class ComposedForward:
    """What a slotted module's ``forward`` is: calls the current composition of its slots."""

    def __init__(self, module: torch.nn.Module):
        self.class_forward = types.MethodType(type(module).forward, module)
        self.__wrapped__ = self.class_forward  # inspect.signature sees the module's own parameters
        self.current: Callable = self.class_forward

    def __call__(self, *args, **kwargs):
        return self.current(*args, **kwargs)


class ForwardSlots:
    """The slot contents of every module an optimization has touched."""

    def __init__(self):
        self._slots: dict[torch.nn.Module, dict[str, Factory]] = {}
        self._built: dict[torch.nn.Module, dict[str, Callable]] = {}  # what each filled slot's factory returned
        self._composed: dict[torch.nn.Module, ComposedForward] = {}

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
        composed = self._composed.get(module)
        if composed is None:
            if "forward" in vars(module):
                raise RuntimeError(
                    f"{type(module).__name__}.forward was already replaced (a hook?); fill forward slots before "
                    "installing hooks, which must wrap the composition"
                )
            composed = self._composed[module] = module.forward = ComposedForward(module)
        slots, built = self._slots[module], self._built.setdefault(module, {})
        forward = composed.class_forward
        start = SLOTS.index(changed)
        for slot in SLOTS[:start]:
            forward = built.get(slot, forward)
        for slot in SLOTS[start:]:
            built.pop(slot, None)
            if slot in slots:
                forward = built[slot] = slots[slot](forward)
        composed.current = forward
