"""The optimization stack's owner and its protocol (see protocol.py and stack.py; the optimizations themselves
live in flux_kontext.optimizations, one module each)."""

from flux_kontext.stack.protocol import (
    APPLY,
    Decision,
    Hardware,
    Model,
    Optimization,
    Outcome,
    Report,
    Status,
    skip,
    unavailable,
)
from flux_kontext.stack.run import RequestRun
from flux_kontext.stack.slots import SLOTS, ForwardSlots
from flux_kontext.stack.stack import Stack, StackOrderError, check_order, stack_for

__all__ = [
    "APPLY",
    "SLOTS",
    "Decision",
    "ForwardSlots",
    "Hardware",
    "Model",
    "Optimization",
    "Outcome",
    "Report",
    "RequestRun",
    "Stack",
    "StackOrderError",
    "Status",
    "check_order",
    "skip",
    "stack_for",
    "unavailable",
]
