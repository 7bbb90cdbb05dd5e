"""Loading a pipeline module by module, the same way for every source (hub id, local folder, random, tiny).

The transformer and T5-XXL (the two large components) are built on the meta device, then each block gets real
weights on its way to where the memory plan puts it: read from the checkpoint's safetensors (memory-mapped) or drawn
at random, each tensor from its own seeded generator. Per-block transforms the stack offers (fused QKV, FP8
quantization) run on each block as soon as it is on the GPU, so the full bf16 transformer never sits there whole and
the host holds at most one block beyond the checkpoint's mapped pages. CLIP and the VAE (0.4 GB together) load whole.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from flux_kontext.memory_plan import ModelSizes

log = logging.getLogger(__name__)

BlockTransform = Callable[[torch.nn.Module, str], None]  # (block, its name in the transformer)
LARGE = ("transformer", "text_encoder_2")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    # Parameters are created directly in the target dtype: a 12B model built in fp32 first would need 48 GB.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ----- where weights come from ---------------------------------------------------------------------------------
class RandomWeights:
    """Random weights with torch's default scale (uniform within 1/sqrt(fan_in)); 1-D weights (norm scales) are
    ones and biases zeros. Each tensor has its own generator seeded from its name: the same weights whatever the
    order or the device they are made on (drawn on the GPU when there is one: the CPU's generator is slow for 17B)."""

    kind = "random"

    def __init__(self, seed: int = 0, scratch: torch.device | None = None):
        self.seed, self.scratch = seed, scratch

    def close(self) -> None:
        pass

    def tensor(self, component: str, names: Sequence[str], like: torch.Tensor, device, dtype) -> torch.Tensor:
        name = names[0]
        where = self.scratch if self.scratch is not None else torch.device(device)
        if like.ndim <= 1:
            fill = 1.0 if name.endswith("weight") else 0.0
            return torch.full(like.shape, fill, device=device, dtype=dtype)
        generator = torch.Generator(device=where).manual_seed(self.seed ^ zlib.crc32(f"{component}.{name}".encode()))
        bound = 1.0 / math.sqrt(like[0].numel())
        values = torch.empty(like.shape, device=where, dtype=dtype).uniform_(-bound, bound, generator=generator)
        return values.to(device)


class CheckpointWeights:
    """Tensors read from a diffusers folder's safetensors files, one at a time (the files are memory-mapped)."""

    kind = "checkpoint"

    def __init__(self, folder: str):
        self.folder = folder
        self._files: dict[str, dict[str, str]] = {}
        self._open = contextlib.ExitStack()
        self._handles: dict[str, object] = {}

    def close(self) -> None:
        """Unmap the files (after the last block)."""
        self._open.close()
        self._handles.clear()

    def _handle(self, path: str):
        if path not in self._handles:
            from safetensors import safe_open

            self._handles[path] = self._open.enter_context(safe_open(path, framework="pt"))
        return self._handles[path]

    def _index(self, component: str) -> dict[str, str]:
        if component not in self._files:
            from safetensors import safe_open

            index = {}
            for path in sorted(glob.glob(os.path.join(self.folder, component, "*.safetensors"))):
                with safe_open(path, framework="pt") as handle:
                    index.update(dict.fromkeys(handle.keys(), path))
            if not index:
                raise FileNotFoundError(f"no *.safetensors under {os.path.join(self.folder, component)}")
            self._files[component] = index
        return self._files[component]

    def tensor(self, component: str, names: Sequence[str], like: torch.Tensor, device, dtype) -> torch.Tensor:
        index = self._index(component)
        name = next((n for n in names if n in index), None)
        if name is None:
            raise KeyError(f"{component}: no tensor {' or '.join(names)} in the checkpoint")
        value = self._handle(index[name]).get_tensor(name)
        if tuple(value.shape) != tuple(like.shape):
            raise ValueError(f"{component}.{name}: checkpoint shape {tuple(value.shape)}, model {tuple(like.shape)}")
        return value.to(device=device, dtype=dtype)


# ----- building on meta, then block by block ------------------------------------------------------------------
@dataclass
class Skeleton:
    """The large components on the meta device plus the small ones' configs, before any weight is read."""

    transformer: torch.nn.Module
    text_encoder_2: torch.nn.Module
    clip_config: CLIPTextConfig | None = None
    vae_config: dict | None = None


def meta_skeleton(transformer_config: dict, t5_config: T5Config, dtype: torch.dtype) -> Skeleton:
    with torch.device("meta"), default_dtype(dtype):
        return Skeleton(FluxTransformer2DModel(**transformer_config), T5EncoderModel(t5_config))


def folder_configs(folder: str) -> tuple[dict, T5Config]:
    with open(os.path.join(folder, "transformer", "config.json")) as handle:
        config = {k: v for k, v in json.load(handle).items() if not k.startswith("_")}
    return config, T5Config.from_pretrained(folder, subfolder="text_encoder_2")


def blocks_of(component: str, module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The units loaded one at a time: the transformer's 57 blocks, T5's 24 layers (the rest follows whole)."""
    if component == "transformer":
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(module.transformer_blocks)] + [
            (f"single_transformer_blocks.{i}", b) for i, b in enumerate(module.single_transformer_blocks)
        ]
    return [(f"encoder.block.{i}", b) for i, b in enumerate(module.encoder.block)]


def _aliases(root: torch.nn.Module) -> dict[int, list[str]]:
    """Every name each parameter is known by (T5's embedding is both ``shared`` and ``encoder.embed_tokens``)."""
    names: dict[int, list[str]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def materialize(root, component, unit, prefix, source, device, dtype, aliases) -> None:
    """Give each parameter of ``unit`` still on the meta device its real tensor on ``device`` (a tied parameter
    once, set in every module that holds it)."""
    for local, param in list(unit.named_parameters()):
        if not param.is_meta:
            continue
        full = f"{prefix}.{local}" if prefix else local
        names = sorted(aliases.get(id(param), [full]), key=lambda n: n != full)
        value = torch.nn.Parameter(source.tensor(component, names, param, device, dtype), requires_grad=False)
        for name in names:
            owner_name, _, leaf = name.rpartition(".")
            (root.get_submodule(owner_name) if owner_name else root)._parameters[leaf] = value


def load_large_component(
    root: torch.nn.Module,
    component: str,
    source,
    device: torch.device,
    dtype: torch.dtype,
    transforms: Sequence[BlockTransform] = (),
    pin: bool = False,
) -> None:
    """Materialize ``root`` block by block on ``device``; each block gets ``transforms`` right after it lands."""
    aliases = _aliases(root)
    for prefix, block in blocks_of(component, root):
        materialize(root, component, block, prefix, source, device, dtype, aliases)
        for transform in transforms:
            transform(block, prefix)
        if pin:
            _pin(block)
    materialize(root, component, root, "", source, device, dtype, aliases)  # embedders, norms, output layer
    if pin:
        _pin(root)
    root.eval().requires_grad_(False)


def _pin(module: torch.nn.Module) -> None:
    """Page-locked host memory: copies to the GPU run at full PCIe speed (on-demand T5, group offloading)."""
    if not torch.cuda.is_available():
        return
    for param in module.parameters():
        if not param.is_meta and not param.is_pinned():
            param.data = param.data.pin_memory()


# ----- sizes for the memory plan -------------------------------------------------------------------------------
def model_sizes(skeleton: Skeleton, dtype: torch.dtype, small_bytes: dict[str, int], max_sequence_length: int):
    """Bytes of each component in ``dtype`` and of the transformer once FP8 (from the meta modules: no weights)."""
    from flux_kontext.optimizations.low_precision_gemm import quantizable

    itemsize = torch.empty((), dtype=dtype).element_size()
    transformer = skeleton.transformer
    total = sum(p.numel() for p in transformer.parameters())
    fp8_layers = [m for n, m in transformer.named_modules() if quantizable(m, n)]
    fp8_weights = sum(m.weight.numel() for m in fp8_layers)
    scales = sum(m.out_features for m in fp8_layers) * 4
    config = transformer.config
    return ModelSizes(
        transformer_bf16=total * itemsize,
        transformer_fp8=(total - fp8_weights) * itemsize + fp8_weights + scales,
        text_encoder_2=sum(p.numel() for p in skeleton.text_encoder_2.parameters()) * itemsize,
        text_encoder_2_streamed=streamed_bytes(skeleton.text_encoder_2, itemsize),
        text_encoder=small_bytes["text_encoder"],
        vae=small_bytes["vae"],
        hidden=config.num_attention_heads * config.attention_head_dim,
        blocks=config.num_layers + config.num_single_layers,
        text_tokens=max_sequence_length,
        vae_channels=small_bytes["vae_channels"],
    )


def streamed_bytes(t5: torch.nn.Module, itemsize: int) -> int:
    """T5's bytes on the GPU at once when its layers visit one at a time: the largest layer and the rest."""
    layers = [sum(p.numel() for p in block.parameters()) for _, block in blocks_of("text_encoder_2", t5)]
    rest = sum(p.numel() for p in t5.parameters()) - sum(layers)
    return (max(layers) + rest) * itemsize


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ----- small components and the rest of the pipeline ----------------------------------------------------------
def small_components_random(
    clip_config: dict, vae_factory: Callable[[], AutoencoderKL], dtype, seed: int, scratch: torch.device | None = None
):
    """CLIP and the VAE with random weights (0.4 GB at full size), built whole on ``scratch`` (the GPU where there is
    one: their initialisation on the host took seconds of a start) or the CPU."""
    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(scratch or "cpu"):
        return CLIPTextModel(CLIPTextConfig(**clip_config)), vae_factory()


def small_components_from(folder: str, dtype):
    clip = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
    return clip, vae


def folder_scheduler_and_tokenizers(folder: str):
    from transformers import AutoTokenizer

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    return (
        scheduler,
        AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
    )


def hub_snapshot(repo: str, revision: str | None, token: str | None) -> str:
    """The diffusers-format files of a hub repo in the local cache (not the single-file checkpoint beside them)."""
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/config.json", "*/*.safetensors", "*/*.safetensors.index.json"]
    patterns += ["scheduler/*", "tokenizer/*", "tokenizer_2/*"]
    return snapshot_download(repo, revision=revision, token=token, allow_patterns=patterns)


# ----- host memory --------------------------------------------------------------------------------------------
def host_rss_bytes() -> int | None:
    """This process's resident set now (Linux), None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def host_rss_peak_bytes() -> int | None:
    """The process's peak resident set so far (the kernel's high-water mark)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return None


def iter_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()
