"""LoRA's side path: next to each adapted Linear layer, y = base(x) + (x A^T) B^T, in the activations' dtype (bf16
on the GPU), whatever the base GEMM is (torchao FP8 rowwise, MXFP4, bf16).

Fixed slots. Every adapted layer gets one ``LoraSide`` (a child module ``lora_side``) with two buffers allocated once
at start: ``down`` (R, in_features) and ``up`` (out_features, R), R = adapters per request x parts x slot rank, zero
padded. A request's adapters are copied into them in place, each into its own columns, with its scale folded into
``up``; columns no adapter uses hold zeros in ``up``, so they add exactly 0. Compiled code and captured CUDA graphs
therefore always see the same tensors: switching adapters is a copy, never a recompile or a recapture. Whether the
side path runs at all is one Python flag (``SideState.enabled``): compile guards on it and CUDA graphs key on it
(``Model.graph_variants``), so requests without adapters run the plain forward, at full speed.

Fused layers: after fuse_qkv, to_q/to_k/to_v live in one to_qkv (add_*_proj in to_added_qkv). An adapter of to_q is
part 0 of to_qkv: its A goes into the part's columns of ``down`` and its B into the part's rows (and columns) of
``up``; the three parts make a block-diagonal ``up``.

Where the path runs: a forward hook on the Linear (every call through the module: diffusers' forwards, our attention
processor, torchao's FP8 layers), and ``fp8_blocks.fp8_linear`` for the fused FP8 blocks, which call the GEMM on
activations they quantized themselves: there the side path reads the FP8 activations times their row scales (the
bf16 input is never written), an error of FP8's size on the adapter's small contribution only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch

# (part, A (rank, in_features), B (part rows, rank) with the adapter's alpha/rank scaling folded in)
Parts = list[tuple[int, torch.Tensor, torch.Tensor]]


class SideState:
    """Shared by every side path of one model: on for a request with adapters, off otherwise."""

    def __init__(self):
        self.enabled = False

    def variant(self) -> bool:
        return self.enabled


class LoraSide(torch.nn.Module):
    """The zero-padded slot buffers of one adapted Linear layer and its side-path arithmetic."""

    def __init__(self, linear: torch.nn.Linear, parts: int, width: int, state: SideState, dtype, device):
        super().__init__()
        self.parts, self.part_rows = parts, linear.out_features // parts
        self.state = state
        self.register_buffer("down", torch.zeros(width, linear.in_features, dtype=dtype, device=device), False)
        self.register_buffer("up", torch.zeros(linear.out_features, width, dtype=dtype, device=device), False)

    @property
    def enabled(self) -> bool:
        return self.state.enabled

    def add(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + (x A^T) B^T, for x of any leading shape."""
        low = torch.mm(x.reshape(-1, x.shape[-1]).to(self.down.dtype), self.down.t())
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), low.to(out.dtype), self.up.t())
        return flat.view(out.shape)

    def add_quantized(self, out: torch.Tensor, values: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        """The same on rowwise-quantized activations (values * row_scale = x): the row scale applies after A."""
        low = torch.mm(values.to(self.down.dtype), self.down.t()) * row_scale
        return torch.addmm(out, low.to(out.dtype), self.up.t())


def _side_hook(linear: torch.nn.Module, args: tuple, output: torch.Tensor):
    side = linear.lora_side
    if not side.enabled:
        return None
    return side.add(output, args[0])


class SidePaths:
    """The side paths installed on one transformer, and the copy of a request's adapters into their slots."""

    def __init__(self, layers: dict[str, tuple[torch.nn.Linear, int]], adapters_per_request: int, slot_rank: int):
        """``layers``: {layer name: (Linear, parts)}, every layer some adapter targets."""
        self.state = SideState()
        self.slot_rank = slot_rank
        self.sides: dict[str, LoraSide] = {}
        self._hooks = []
        for name, (linear, parts) in layers.items():
            weight = linear.weight
            dtype = _compute_dtype(weight)
            width = adapters_per_request * parts * slot_rank
            side = LoraSide(linear, parts, width, self.state, dtype, weight.device)
            linear.lora_side = side
            self.sides[name] = side
            self._hooks.append(linear.register_forward_hook(_side_hook))
        self._layers = {name: linear for name, (linear, _) in layers.items()}
        self.filled: tuple | None = None  # the (name, scale) tuple the slots hold now

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for side in self.sides.values() for b in side.buffers())

    @torch.no_grad()
    def fill(self, chosen: tuple[tuple[str, float], ...], weights_of: Callable[[str], dict[str, Parts]]) -> bool:
        """Copy the chosen adapters (name, scale) into the slots in place; False when they hold them already."""
        if chosen == self.filled:
            return False
        self.filled = None  # a copy that breaks half way leaves no stale claim
        for side in self.sides.values():
            side.up.zero_()
        for index, (name, scale) in enumerate(chosen):
            for layer, parts in weights_of(name).items():
                side = self.sides[layer]
                for part, down, up in parts:
                    start = (index * side.parts + part) * self.slot_rank
                    columns = slice(start, start + down.shape[0])
                    rows = slice(part * side.part_rows, (part + 1) * side.part_rows)
                    side.down[columns].copy_(down)
                    side.up[rows, columns].copy_(up).mul_(scale)
        self.filled = chosen
        return True

    def remove(self) -> None:
        """Take every side path off again (undo)."""
        for hook in self._hooks:
            hook.remove()
        for linear in self._layers.values():
            del linear.lora_side
        self._hooks.clear()
        self.sides.clear()
        self._layers.clear()
        self.state.enabled = False


def _compute_dtype(weight) -> torch.dtype:
    """The activations' dtype of a layer: its weight's, or the original dtype of a quantized weight."""
    dtype = weight.dtype
    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    return torch.bfloat16


class ResidentAdapters:
    """Adapters' weights on the device, at most ``capacity`` of them (least recently used evicted); every adapter
    stays in host memory (pinned on CUDA) and is copied back when needed again."""

    def __init__(self, host: dict[str, dict[str, Parts]], device: torch.device, capacity: int):
        self.host, self.device, self.capacity = host, device, capacity
        self._resident: OrderedDict[str, dict[str, Parts]] = OrderedDict()
        self.loads = 0  # copies from host memory since start
        self.evictions = 0

    def __call__(self, name: str) -> dict[str, Parts]:
        weights = self._resident.get(name)
        if weights is not None:
            self._resident.move_to_end(name)
            return weights
        while len(self._resident) >= self.capacity:
            self._resident.popitem(last=False)
            self.evictions += 1
        weights = {layer: _to(parts, self.device) for layer, parts in self.host[name].items()}
        self._resident[name] = weights
        self.loads += 1
        return weights

    @property
    def names(self) -> list[str]:
        """Resident now, least recently used first."""
        return list(self._resident)

    def nbytes(self, names: Iterable[str]) -> int:
        tensors = [t for n in names for parts in self.host[n].values() for _, *pair in parts for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)


def _to(parts: Parts, device: torch.device) -> Parts:
    return [(part, down.to(device, non_blocking=True), up.to(device, non_blocking=True)) for part, down, up in parts]
