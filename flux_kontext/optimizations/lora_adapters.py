"""The LoRA adapters the operator makes available: where they come from (FLUX_LORAS, FLUX_LORA_DIR), read and
converted by diffusers' own loader (``FluxKontextPipeline.lora_state_dict``: diffusers/peft keys as they are, kohya /
ai-toolkit / xlabs / fal keys converted by diffusers' FLUX conversion utilities), then checked against this
transformer: every target is a Linear layer (or a part of a fused to_qkv), every A/B pair has that layer's shapes and
one rank, the rank is within FLUX_LORA_MAX_RANK. What fails is an ``AdapterError`` with the reason; the caller
reports it and skips that adapter.

Each adapter ends as {layer name: [(part, A, B)]} in host memory, with peft's alpha/rank scaling (from diffusers'
adapter metadata or the file's alphas; kohya's is folded in by the converter) folded into B.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from flux_kontext.optimizations.lora_side import Parts

PREFIX = "transformer."
# diffusers' separate projections -> (the fused layer fuse_qkv made, the part); used when the separate one is gone
FUSED_PARTS = {
    "to_q": ("to_qkv", 0, 3),
    "to_k": ("to_qkv", 1, 3),
    "to_v": ("to_qkv", 2, 3),
    "add_q_proj": ("to_added_qkv", 0, 3),
    "add_k_proj": ("to_added_qkv", 1, 3),
    "add_v_proj": ("to_added_qkv", 2, 3),
}
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be served here, with the reason."""


@dataclass
class Adapter:
    name: str
    source: str
    rank: int
    weights: dict[str, Parts]  # layer name -> [(part, A, B scaled)], in host memory
    parts: dict[str, int]  # layer name -> how many parts it has (3 for a fused q|k|v layer, else 1)
    ignored: int  # LoRA tensors outside the transformer (a text encoder's), not applied

    def public(self) -> dict:
        info = {"source": self.source, "rank": self.rank, "layers": sum(len(p) for p in self.weights.values())}
        if self.ignored:
            info["ignored_text_encoder_tensors"] = self.ignored
        return info


def sources(settings) -> dict[str, str]:
    """{name: source}: FLUX_LORAS, then each *.safetensors of FLUX_LORA_DIR named after its stem (FLUX_LORAS wins)."""
    found = dict(settings.lora_sources)
    if settings.lora_dir:
        folder = Path(settings.lora_dir).expanduser()
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            found.setdefault(path.stem, str(path))
    return found


def read_state_dict(source: str) -> tuple[dict, dict | None, dict | None]:
    """(state dict in diffusers keys, network alphas, diffusers' adapter metadata) of a file, a folder or a hub id
    ('owner/repo' or 'owner/repo:file.safetensors')."""
    from diffusers import FluxKontextPipeline

    path = Path(source).expanduser()
    location, weight_name = source, None
    if not path.exists() and (source.startswith(("/", ".", "~")) or source.endswith(".safetensors")):
        raise AdapterError(f"cannot read {source!r}: no such file or folder")  # a path, never a hub id to fetch
    if path.is_file():
        location, weight_name = str(path.parent), path.name
    elif not path.exists() and ":" in source:
        location, weight_name = source.split(":", 1)
    try:
        return FluxKontextPipeline.lora_state_dict(
            location, weight_name=weight_name, return_alphas=True, return_lora_metadata=True
        )
    except Exception as exc:  # unreadable file, no such repo, no network, a format diffusers does not know
        raise AdapterError(f"cannot read {source!r}: {type(exc).__name__}: {exc}") from None


def load_adapter(name: str, source: str, modules: dict, max_rank: int, dtype: torch.dtype) -> Adapter:
    """Read, convert and check one adapter against the transformer's ``modules`` (named_modules())."""
    state_dict, alphas, metadata = read_state_dict(source)
    pairs, ignored = _pairs(state_dict)
    if not pairs:
        raise AdapterError(f"{source!r} holds no LoRA layer of the transformer (lora_A/lora_B weights)")
    scaling = _scaling_rule(alphas, metadata)
    weights: dict[str, Parts] = {}
    layer_parts: dict[str, int] = {}
    ranks = set()
    for module, (down, up) in sorted(pairs.items()):
        layer, linear, part, parts = _target(modules, module)
        rank = down.shape[0]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != rank:
            raise AdapterError(f"{module}: A {tuple(down.shape)} and B {tuple(up.shape)} are not one low-rank pair")
        if down.shape[1] != linear.in_features or up.shape[0] * parts != linear.out_features:
            want = f"A (r, {linear.in_features}), B ({linear.out_features // parts}, r)"
            raise AdapterError(f"{module}: A {tuple(down.shape)}, B {tuple(up.shape)} do not fit the layer: {want}")
        if rank > max_rank:
            raise AdapterError(f"{module}: rank {rank} is above FLUX_LORA_MAX_RANK={max_rank}")
        up = up.float() * scaling(module, rank)
        weights.setdefault(layer, []).append((part, _host(down, dtype), _host(up, dtype)))
        layer_parts[layer] = parts
        ranks.add(rank)
    return Adapter(name, source, max(ranks), weights, layer_parts, ignored)


def _pairs(state_dict: dict) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """{transformer module: (A, B)} and the count of LoRA tensors of other models; refuses what it cannot apply."""
    keys = list(state_dict)
    prefixed = any(key.startswith(PREFIX) for key in keys)
    found: dict[str, dict[str, torch.Tensor]] = {}
    ignored = 0
    for key in keys:
        if prefixed and not key.startswith(PREFIX):
            ignored += 1
            continue
        bare = key.removeprefix(PREFIX)
        match = LORA_KEY.match(bare)
        if match is None:
            raise AdapterError(f"{key}: not a LoRA A/B weight (DoRA, biases and norm layers are not supported)")
        found.setdefault(match["module"], {})[match["which"]] = state_dict[key]
    pairs = {}
    for module, tensors in found.items():
        if set(tensors) != {"A", "B"}:
            raise AdapterError(f"{module}: lora_A and lora_B must both be present")
        pairs[module] = (tensors["A"], tensors["B"])
    return pairs, ignored


def _target(modules: dict, module: str) -> tuple[str, torch.nn.Linear, int, int]:
    """(layer name, Linear, part, parts) that an adapter's module key adapts."""
    layer = modules.get(module)
    if isinstance(layer, torch.nn.Linear):
        return module, layer, 0, 1
    parent, _, leaf = module.rpartition(".")
    if leaf in FUSED_PARTS:
        fused_name, part, parts = FUSED_PARTS[leaf]
        fused = modules.get(f"{parent}.{fused_name}")
        if isinstance(fused, torch.nn.Linear):
            return f"{parent}.{fused_name}", fused, part, parts
    raise AdapterError(f"{module}: the transformer has no such Linear layer")


def _scaling_rule(alphas: dict | None, metadata: dict | None):
    """alpha / rank per module, as peft applies it: diffusers' adapter metadata (peft LoraConfig: lora_alpha,
    alpha_pattern, use_rslora) first, else the file's alphas, else 1 (alpha = rank)."""
    config = _transformer_config(metadata)
    if config:
        alpha, patterns = config.get("lora_alpha"), config.get("alpha_pattern") or {}
        rslora = bool(config.get("use_rslora"))

        def from_config(module: str, rank: int) -> float:
            value = next((v for p, v in patterns.items() if re.fullmatch(rf"(.*\.)?({p})", module)), alpha)
            value = rank if value is None else value
            return value / (rank**0.5 if rslora else rank)

        return from_config
    per_module = {key.removeprefix(PREFIX).removesuffix(".alpha"): float(v) for key, v in (alphas or {}).items()}

    def from_alphas(module: str, rank: int) -> float:
        return per_module[module] / rank if module in per_module else 1.0

    return from_alphas


def _transformer_config(metadata: dict | None) -> dict:
    if not metadata:
        return {}
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    nested = {key.removeprefix(PREFIX): value for key, value in metadata.items() if key.startswith(PREFIX)}
    return nested or metadata


def _host(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach().to("cpu", dtype).contiguous()
    return t.pin_memory() if torch.cuda.is_available() else t
