"""LoRA's side path: next to each adapted Linear layer, y = base(x) + (x A^T) B^T, whatever the base GEMM is
(torchao FP8 rowwise, MXFP4, bf16).

Fixed slots. Every adapted layer gets one ``LoraSide`` (a child module ``lora_side``) with buffers allocated once at
start: ``down`` (R, in_features) and ``up`` (out_features, R), R = adapters per request x parts x slot rank, zero
padded (plus ``down8`` / ``down_scale``, A in e4m3, on the fused FP8 blocks' layers). A request's adapters are
copied into them in place, each into its own columns, with its scale folded into ``up``; columns no adapter uses
hold zeros in ``up``, so they add exactly 0. Compiled code and captured CUDA graphs therefore always see the same
tensors: switching adapters is a copy, never a recompile or a recapture. Whether the side path runs at all is one
Python flag (``SideState.enabled``): compile guards on it and CUDA graphs key on it (``Model.graph_variants``), so
requests without adapters run the plain forward, at full speed.

Fused layers: after fuse_qkv, to_q/to_k/to_v live in one to_qkv (add_*_proj in to_added_qkv). An adapter of to_q is
part 0 of to_qkv: its A goes into the part's columns of ``down`` and its B into the part's rows (and columns) of
``up``; the three parts make a block-diagonal ``up``.

Where the path runs: a forward hook on the Linear (every call through the module: diffusers' forwards, our attention
processor, torchao's FP8 layers; ``out + (x A^T) B^T``, which Inductor fuses into the pointwise code that reads the
output), and ``fp8_blocks.fp8_linear`` / ``fp8_linears`` for the fused FP8 blocks, which call the GEMM on
activations they quantized themselves: there the side path runs from those FP8 activations (lora_gemm.py), or, with
FLUX_LORA_K_AUGMENT where start-up measured it faster, inside their GEMM: the up projection folded into it
(lora_k_augment.py: a wider copy of the layer's FP8 weight, W_aug, allocated once here; ``fill`` writes the
adapters' B' into it in place), or the down projection (lora_gemm.RowWeight: A's rows appended to the weight).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch

from flux_kontext.optimizations import lora_gemm, lora_k_augment, lora_widen
from flux_kontext.optimizations.kernels.e4m3 import FP8, quantize_rowwise_fp8
from flux_kontext.optimizations.lora_k_augment import AugmentedWeight

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
        self.group: SharedInput | None = None
        self.triton_up = False  # the fused blocks' up projection on lora_triton's kernel (measured at start)
        self.aug: AugmentedWeight | None = None  # the up projection folded into the FP8 GEMM (lora_k_augment.py)
        self.rows: lora_gemm.RowWeight | None = None  # A's rows appended to the FP8 weight (lora_gemm.py)
        self.counters: torch.Tensor | None = None  # the fold's guard: [rows rescaled, entries clamped] (SidePaths)
        self.register_buffer("down", torch.zeros(width, linear.in_features, dtype=dtype, device=device), False)
        self.register_buffer("up", torch.zeros(linear.out_features, width, dtype=dtype, device=device), False)
        fp8 = getattr(linear, "fp8_weight_t", None) is not None  # the fused FP8 blocks call this layer's GEMM
        down8 = torch.zeros(width, linear.in_features, dtype=FP8, device=device) if fp8 else None
        self.register_buffer("down8", down8, False)
        self.register_buffer("down_scale", torch.ones(1, width, device=device) if fp8 else None, False)
        self.register_buffer("t_scale", torch.zeros(1, width, device=device) if fp8 else None, False)

    @property
    def enabled(self) -> bool:
        return self.state.enabled

    def add(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + (x A^T) B^T, for x of any leading shape."""
        low = torch.mm(x.reshape(-1, x.shape[-1]).to(self.down.dtype), self.down.t())
        return out + torch.mm(low.to(out.dtype), self.up.t()).view(out.shape)

    def fp8_linear(self, values: torch.Tensor, scale: torch.Tensor, linear, out_dtype) -> torch.Tensor:
        """``linear``'s FP8 GEMM on rowwise-quantized activations (values * scale = x) with the side path added;
        ``values`` may be x_aug, x8 with the columns ``input_columns`` asked for after it."""
        fan_in = linear.in_features
        x8 = values[:, :fan_in]
        if self.rows is not None:  # the down projection inside the layer's own GEMM
            return lora_gemm.rows_linear(x8, scale, self.rows, self.up, out_dtype, self.triton_up)
        low = lora_gemm.down_projection(x8, scale, self.down8, self.down_scale, out_dtype)
        if self.aug is not None:
            x_aug, scale = self._augmented(values, scale, low, self.t_scale, fan_in)
            return lora_k_augment.augmented_linear(x_aug, scale, self.aug, linear.bias, out_dtype)
        return self._with_up(x8, scale, linear, low, out_dtype)

    def input_columns(self, linears) -> int:
        """Columns the block's quantization kernel should leave after x8 for ``linears``' folded input (x_aug's t'
        and padding: lora_k_augment.py); 0 when they are not folded, or not this layer's group."""
        if self.aug is None or (len(linears) > 1 and not self.shares_input(linears)):
            return 0
        return self.aug.input_width - self.aug.fan_in

    def _augmented(self, values, scale, low, t_scale, fan_in):
        """(x_aug, its row scales): the block's buffer with t' written into it (in place), or a copy where the block
        did not leave the columns."""
        if values.shape[1] == self.aug.input_width:
            return lora_k_augment.fold_into(values, scale, low, t_scale, self.counters, fan_in, self.aug.copies), scale
        return lora_k_augment.augmented_input(values, scale, low, t_scale, self.counters, self.aug)

    def shares_input(self, linears) -> bool:
        """True when ``linears`` are this layer's group, in its order: one down projection serves them all."""
        group = self.group
        return (
            group is not None and len(linears) == len(group.linears) and all(map(operator.is_, linears, group.linears))
        )

    def fp8_linears(self, values: torch.Tensor, scale: torch.Tensor, linears, out_dtype) -> list[torch.Tensor]:
        """The group's layers on the same quantized activations, with one down projection for all their A rows."""
        group = self.group
        fan_in = linears[0].in_features
        x8 = values[:, :fan_in]
        low = lora_gemm.down_projection(x8, scale, group.down8, group.down_scale, out_dtype)
        sides = [linear.lora_side for linear in linears]
        folded = next((side for side in sides if side.aug is not None), None)
        x_aug = None
        if folded is not None:  # one x_aug: every layer's t' columns
            x_aug, scale = folded._augmented(values, scale, low, group.t_scale, fan_in)
            x8 = x_aug[:, :fan_in]  # rows the guard rescaled are rescaled for every layer, with their scales
        return [
            lora_k_augment.augmented_linear(x_aug, scale, side.aug, linear.bias, out_dtype)
            if side.aug is not None
            else side._with_up(x8, scale, linear, low[:, start:end], out_dtype)
            for linear, side, (start, end) in zip(linears, sides, group.columns, strict=True)
        ]

    def _with_up(self, values, scale, linear, low, out_dtype) -> torch.Tensor:
        weight, weight_scale = linear.fp8_weight_t, linear.fp8_weight_scale
        return lora_gemm.fp8_linear_low_rank(
            values, scale, weight, weight_scale, linear.bias, low, self.up, out_dtype, self.triton_up
        )

    @torch.no_grad()
    def quantize_down(self) -> None:
        """A's e4m3 copy (one scale per rank row) from ``down``, and B' into W_aug where the up projection is
        folded into the GEMM; zero rows stay zero."""
        if self.down8 is not None:
            values, scales = quantize_rowwise_fp8(self.down)
            self.down8.copy_(values)
            self.down_scale.copy_(scales.view(1, -1))
        if self.aug is not None:
            self.aug.fill(self.up, self.t_scale)

    def append_rows(self, linear) -> None:
        """A's e4m3 rows appended to this layer's FP8 weight (lora_gemm.RowWeight): ``down8`` / ``down_scale`` become
        views of them, so quantize_down fills the combined weight in place."""
        self.rows = lora_gemm.RowWeight(linear.fp8_weight_t, linear.fp8_weight_scale, linear.bias, self.down.shape[0])
        self.rows.down8.copy_(self.down8)
        self.rows.down_scale.copy_(self.down_scale)
        self.down8, self.down_scale = self.rows.down8, self.rows.down_scale

    def augment(self, linear, extra: int, start: int, pad: int) -> None:
        """Fold this layer's up projection into its FP8 GEMM: W_aug with ``extra`` t' columns per copy (its own from
        ``start``) and ``pad`` zero columns (lora_k_augment.py)."""
        width = self.up.shape[1]
        self.aug = AugmentedWeight(linear.fp8_weight_t, linear.fp8_weight_scale, extra, start, width, pad)


class SharedInput:
    """Layers that read the same activations (a single block's proj_mlp and to_qkv): their FP8 A rows in one buffer,
    each layer's ``down8`` / ``down_scale`` a view of its rows, so one GEMM computes every layer's x A^T."""

    def __init__(self, linears: tuple):
        self.linears = linears
        sides = [linear.lora_side for linear in linears]
        widths = [side.down.shape[0] for side in sides]
        first = sides[0].down8
        self.down8 = torch.zeros(sum(widths), first.shape[1], dtype=FP8, device=first.device)
        flat_scale = torch.ones(sum(widths), dtype=torch.float32, device=first.device)
        self.down_scale = flat_scale.view(1, -1)
        flat_t_scale = torch.zeros(sum(widths), dtype=torch.float32, device=first.device)
        self.t_scale = flat_t_scale.view(1, -1)  # K-augmentation's t' factors, every layer's columns
        self.columns, start = [], 0
        for side, width in zip(sides, widths, strict=True):
            side.down8, side.down_scale, side.t_scale = (
                self.down8[start : start + width],
                flat_scale[start : start + width].view(1, -1),
                flat_t_scale[start : start + width].view(1, -1),
            )
            side.group = self
            self.columns.append((start, start + width))
            start += width


def _side_hook(linear: torch.nn.Module, args: tuple, output: torch.Tensor):
    side = linear.lora_side
    if not side.enabled:
        return None
    return side.add(output, args[0])


class SidePaths:
    """The side paths installed on one transformer, and the copy of a request's adapters into their slots."""

    def __init__(
        self,
        layers: dict[str, tuple[torch.nn.Linear, int]],
        adapters_per_request: int,
        slot_rank: int,
        shared_inputs: Iterable[tuple[str, ...]] = (),
        k_augment: bool = False,
        fold_memory: int | None = None,
    ):
        """``layers``: {layer name: (Linear, parts)}, every layer some adapter targets; ``shared_inputs``: tuples of
        layer names that read one activation tensor (grouped where every one of them is adapted and FP8);
        ``k_augment``: fold the up projection into the FP8 GEMMs where it measures faster (lora_k_augment.py), with
        at most ``fold_memory`` bytes of widened weights (None: no limit)."""
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
        self.groups = [
            SharedInput(tuple(self._layers[name] for name in names))
            for names in shared_inputs
            if all(name in self.sides and self.sides[name].down8 is not None for name in names)
        ]
        device = next(iter(self.sides.values())).up.device if self.sides else torch.device("cpu")
        self.guard = torch.zeros(2, dtype=torch.int32, device=device)  # folded rows rescaled, entries clamped
        for side in self.sides.values():
            side.counters = self.guard
        widened = (
            lora_widen.widen(self.sides, self._layers, self.groups, fold_memory) if k_augment else lora_widen.Widening()
        )
        self.augmented, self.k_augment_choice = widened.folded, widened.fold_choice
        self.rows_appended, self.rows_choice = widened.rows, widened.rows_choice
        self.filled: tuple | None = None  # the (name, scale) tuple the slots hold now

    @property
    def nbytes(self) -> int:
        """Slot memory (a group's A rows counted once: each layer's buffer is a view of its own rows), W_aug
        included."""
        buffers = sum(b.numel() * b.element_size() for side in self.sides.values() for b in side.buffers())
        widened = sum(side.aug.nbytes for side in self.sides.values() if side.aug is not None)
        return buffers + widened + sum(side.rows.nbytes for side in self.sides.values() if side.rows is not None)

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
        for side in self.sides.values():
            side.quantize_down()
        self.filled = chosen
        return True

    def remove(self) -> None:
        """Take every side path off again (undo)."""
        for hook in self._hooks:
            hook.remove()
        for linear in self._layers.values():
            del linear.lora_side
        self._hooks.clear()
        self.groups.clear()
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
