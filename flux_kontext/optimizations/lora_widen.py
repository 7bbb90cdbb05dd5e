"""Where LoRA's side path widens the fused blocks' FP8 GEMMs (FLUX_LORA_K_AUGMENT), decided once at start by
measurement and within the memory the plan leaves:

- the up projection folded into the GEMM (lora_k_augment.py: W_aug, K widened by the slots' rank), per input shape
  (a single block's proj_mlp and to_qkv share one input, so they fold together or not at all);
- for the layers that keep the in-place up projection, A's rows appended to the weight (lora_gemm.RowWeight: the down
  projection inside the layer's own GEMM), per layer shape.

Both cost a wider e4m3 copy of the layer's weight; ``fold_memory`` (bytes, None: no limit) bounds them together, the
folds with the most measured saving per byte first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flux_kontext.optimizations import lora_gemm, lora_k_augment


@dataclass
class Widening:
    """What ``widen`` did: the layers folded and with rows appended (names), and the measurements behind each."""

    folded: list[str] = field(default_factory=list)
    fold_choice: dict = field(default_factory=dict)
    rows: list[str] = field(default_factory=list)
    rows_choice: dict = field(default_factory=dict)


def widen(sides: dict, layers: dict, groups: list, fold_memory: int | None) -> Widening:
    """Fold, then append rows, on the side paths ``sides`` ({name: LoraSide}) of ``layers`` ({name: Linear})."""
    widening = Widening()
    widening.folded, widening.fold_choice = _fold(sides, layers, groups, fold_memory)
    left = None if fold_memory is None else fold_memory - sum(s.aug.nbytes for s in sides.values() if s.aug)
    widening.rows, widening.rows_choice = _append_rows(sides, layers, left)
    return widening


def input_key(linears, columns) -> tuple:
    """(in_features, ((out_features, rank columns) of each layer)): what lora_k_augment.choose measures."""
    pairs = zip(linears, columns, strict=True)
    return linears[0].in_features, tuple((x.out_features, end - start) for x, (start, end) in pairs)


def _fold(sides: dict, layers: dict, groups: list, fold_memory: int | None) -> tuple[list[str], dict]:
    """W_aug for the fused-block layers where folding the up projection into the GEMM measured faster
    (lora_k_augment.choose, per input shape: a group's layers share one x_aug; candidates are every layer the fused
    blocks feed: q|k|v and MLP in from ln_mod_fp8, proj_out and MLP out from gelu_fp8); their names."""
    name_of = {id(linear): name for name, linear in layers.items()}
    inputs: dict[tuple, list[list[tuple]]] = {}  # input shape -> [the layers reading one such input]
    grouped = set()
    for group in groups:
        grouped.update(map(id, group.linears))
        extra = group.columns[-1][1]
        members = [
            (name_of[id(x)], x, extra, start) for x, (start, _) in zip(group.linears, group.columns, strict=True)
        ]
        inputs.setdefault(input_key(group.linears, group.columns), []).append(members)
    for name, side in sides.items():
        linear = layers[name]
        if side.down8 is not None and id(linear) not in grouped:
            width = side.up.shape[1]
            inputs.setdefault(input_key([linear], [(0, width)]), []).append([(name, linear, width, 0)])
    if not inputs:
        return [], {}
    device = next(iter(sides.values())).up.device
    chosen, choice = lora_k_augment.choose(device, set(inputs))
    chosen = _within_memory(inputs, chosen, choice, fold_memory)
    folded = []
    for key, readers in inputs.items():
        for members in readers if chosen[key] is not None else ():
            for name, linear, extra, start in members:
                sides[name].augment(linear, extra, start, chosen[key])
                folded.append(name)
    return folded, choice


def _within_memory(inputs: dict, chosen: dict, choice: dict, fold_memory: int | None) -> dict:
    """``chosen`` without the folds whose W_aug would not fit ``fold_memory`` (what the memory plan leaves beyond its
    largest request), keeping those that measured the most saving per byte; says so in ``choice``."""
    if fold_memory is None:
        return chosen
    by_input = choice.get("by_input", {})

    def cost(key) -> int:  # W_aug bytes of every layer reading an input of this shape
        fan_in, shapes = key
        return len(inputs[key]) * sum(n for n, _ in shapes) * (fan_in + sum(r for _, r in shapes) + chosen[key])

    def saving_per_byte(key) -> float:
        row = by_input.get(lora_k_augment.label(key), {})
        saved = row.get("in_place_ms", 0.0) - min(row.get("fold_ms", {0: 0.0}).values())
        return saved * len(inputs[key]) / cost(key)

    kept, used, left_out = dict(chosen), 0, []
    for key in sorted((k for k, pad in chosen.items() if pad is not None), key=saving_per_byte, reverse=True):
        if used + cost(key) <= fold_memory:
            used += cost(key)
        else:
            kept[key] = None
            left_out.append(lora_k_augment.label(key))
    choice["memory"] = {
        "allowed_mib": round(fold_memory / 2**20, 1),
        "folded_mib": round(used / 2**20, 1),
        "not_folded_for_memory": left_out,
    }
    return kept


def _append_rows(sides: dict, layers: dict, memory_left: int | None) -> tuple[list[str], dict]:
    """A's rows appended to the weights of the fused-block layers whose up projection stays in place, where one GEMM
    on [W8; A8] measured faster than the GEMM plus the separate down projection (lora_gemm.choose_rows) and the
    memory left allows; their names."""
    candidates = {
        name: side for name, side in sides.items() if side.down8 is not None and side.aug is None and side.group is None
    }
    if not candidates:
        return [], {}
    shape_of = {name: (side.down.shape[1], side.up.shape[0], side.down.shape[0]) for name, side in candidates.items()}
    device = next(iter(candidates.values())).up.device
    use, choice = lora_gemm.choose_rows(device, set(shape_of.values()))
    chosen = [name for name in candidates if use[shape_of[name]]]
    cost = sum((n + r) * k for k, n, r in (shape_of[name] for name in chosen))
    if memory_left is not None and cost > memory_left:
        choice["memory"] = f"not appended: {cost / 2**20:.0f} MiB, {max(memory_left, 0) / 2**20:.0f} MiB left"
        return [], choice
    for name in chosen:
        candidates[name].append_rows(layers[name])
    return chosen, choice
