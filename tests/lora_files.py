"""LoRA adapter files for the tests, made here: with peft on the tiny transformer, saved by diffusers in its
diffusers/peft keys; and in kohya's (sd-scripts) keys, which diffusers' loader converts."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from flux_kontext.models import TINY_TRANSFORMER, build_random_pipeline

ATTENTION_AND_MLP = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
]


def peft_lora(folder: Path, seed: int, rank: int = 4, alpha: float = 8.0, targets=ATTENTION_AND_MLP) -> Path:
    """A LoRA made with peft on the tiny transformer (random A and B, alpha != rank), saved by diffusers'
    ``save_lora_weights`` (diffusers/peft keys and its adapter metadata); returns the file."""
    from diffusers import FluxKontextPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32).transformer
    # Whole-name targets in the blocks only: "proj_out" alone would also match the transformer's own output layer.
    blocks = r"(transformer_blocks|single_transformer_blocks)\.\d+\.(attn\.)?"
    names = "|".join(re.escape(target) for target in targets)
    pattern = rf"{blocks}({names})"
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern, init_lora_weights=False)
    transformer.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    FluxKontextPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
        weight_name="adapter.safetensors",
    )
    return folder / "adapter.safetensors"


def kohya_lora(path: Path, seed: int, rank: int = 4, alpha: float = 2.0) -> Path:
    """A LoRA in kohya's sd-scripts keys (BFL's layer names, fused qkv, lora_down/lora_up, alpha) for the tiny
    transformer's double block and its single block's output layer; returns the file."""
    inner = TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]
    mlp = 4 * inner
    shapes = {}  # kohya module -> (in, out)
    for stream in ("img", "txt"):
        prefix = f"lora_unet_double_blocks_0_{stream}"
        shapes |= {
            f"{prefix}_attn_qkv": (inner, 3 * inner),
            f"{prefix}_attn_proj": (inner, inner),
            f"{prefix}_mlp_0": (inner, mlp),
            f"{prefix}_mlp_2": (mlp, inner),
        }
    shapes["lora_unet_single_blocks_0_linear2"] = (inner + mlp, inner)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (fan_in, fan_out) in shapes.items():
        tensors[f"{module}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.3
        tensors[f"{module}.lora_up.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.3
        tensors[f"{module}.alpha"] = torch.tensor(alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
