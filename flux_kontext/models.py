"""Pipeline sources: real weights (hub id or local folder), random full-size, tiny random.

The random and tiny sources keep the real geometry (8x VAE downsample, 2x2 latent packing, 16 latent
channels, the FLUX scheduler config), so everything above this module runs the same code for all four.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config

from flux_kontext.loading import (
    BlockTransform,
    CheckpointWeights,
    RandomWeights,
    Skeleton,
    folder_configs,
    folder_scheduler_and_tokenizers,
    hub_snapshot,
    load_large_component,
    meta_skeleton,
    model_sizes,
    module_bytes,
    small_components_from,
    small_components_random,
)
from flux_kontext.memory_plan import VAE_TILE, MemoryPlan, ModelSizes
from flux_kontext.settings import Settings, hub_token

log = logging.getLogger(__name__)

# FLUX.1's scheduler: flow matching with resolution-dependent shift (see docs/FACTS.md).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
VAE_SCALING = dict(scaling_factor=0.3611, shift_factor=0.1159, latent_channels=16)

FULL_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FULL_T5 = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"
)
FULL_CLIP = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    # Ids of the in-process tokenizer below; CLIP pools the hidden state at the end-of-sequence token.
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=0,
)
FULL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)

# Tiny: same structure, widths cut so a 1024x1024 edit runs in about a second on two CPU cores.
TINY_TRANSFORMER = dict(
    FULL_TRANSFORMER,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
)
TINY_T5 = dict(vocab_size=320, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu")
TINY_CLIP = dict(
    FULL_CLIP,
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=32,
)
TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
TINY_MAX_SEQUENCE_LENGTH = 64
FULL_MAX_SEQUENCE_LENGTH = 512
CLIP_MAX_LENGTH = 77


@dataclass
class LoadedModel:
    """A pipeline plus what the service reports about where it came from and where its parts live."""

    pipe: FluxKontextPipeline
    source: str
    kind: str  # hub | local | random | tiny
    demo: bool
    max_sequence_length: int
    fallback_reason: str | None = None
    plan: MemoryPlan | None = None  # None: built outside the engine (tests, benches): everything on one device
    # Seconds of the load's parts (host clock): the parts and configs, each large component with the block
    # transforms run at load (of it: ``at_load_transforms``), the small components; /health's memory_plan.load.
    seconds: dict[str, float] | None = None


def byte_level_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """A tokenizer built in-process: one token per UTF-8 byte, then an end-of-sequence token.

    Different prompts give different ids (unlike a word-level tokenizer with an empty vocabulary), and it
    needs no download. Ids stay below 260, valid for the tiny and the full-size vocabularies.
    """
    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def build_vae(config: dict = FULL_VAE) -> AutoencoderKL:
    """The FLUX VAE's architecture (16 latent channels, 8x downsampling) at the given widths, random weights."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=1024,
        **config,
        **VAE_SCALING,
    )


@dataclass
class Parts:
    """Everything a pipeline is made of before the large components have weights (see loading.py)."""

    skeleton: Skeleton
    clip: torch.nn.Module
    vae: AutoencoderKL
    scheduler: FlowMatchEulerDiscreteScheduler
    tokenizer: object
    tokenizer_2: object
    weights: object  # loading.RandomWeights | loading.CheckpointWeights
    max_sequence_length: int

    def sizes(self, dtype: torch.dtype) -> ModelSizes:
        small = {
            "text_encoder": module_bytes(self.clip),
            "vae": module_bytes(self.vae),
            "vae_channels": self.vae.config.block_out_channels[0],
        }
        return model_sizes(self.skeleton, dtype, small, self.max_sequence_length)


def random_parts(*, tiny: bool, dtype: torch.dtype, seed: int = 0, scratch: torch.device | None = None) -> Parts:
    """The full-size or tiny architecture with random weights (drawn block by block when loaded)."""
    transformer_cfg, t5_cfg, clip_cfg, vae_cfg = (
        (TINY_TRANSFORMER, TINY_T5, TINY_CLIP, TINY_VAE) if tiny else (FULL_TRANSFORMER, FULL_T5, FULL_CLIP, FULL_VAE)
    )
    max_len = TINY_MAX_SEQUENCE_LENGTH if tiny else FULL_MAX_SEQUENCE_LENGTH
    clip, vae = small_components_random(clip_cfg, lambda: build_vae(vae_cfg), dtype, seed, scratch)
    return Parts(
        skeleton=meta_skeleton(transformer_cfg, T5Config(**t5_cfg), dtype),
        clip=clip,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        tokenizer=byte_level_tokenizer(CLIP_MAX_LENGTH),
        tokenizer_2=byte_level_tokenizer(max_len),
        weights=RandomWeights(seed, scratch),
        max_sequence_length=max_len,
    )


def _load_pretrained(source: str, settings: Settings, device: torch.device, dtype: torch.dtype) -> Parts:
    """A local diffusers folder or a hub id (its diffusers files, fetched into the local cache)."""
    folder = os.path.expanduser(source)
    if not os.path.isdir(folder):
        folder = hub_snapshot(source, settings.revision, hub_token())
    transformer_config, t5_config = folder_configs(folder)
    clip, vae = small_components_from(folder, dtype)
    scheduler, tokenizer, tokenizer_2 = folder_scheduler_and_tokenizers(folder)
    return Parts(
        skeleton=meta_skeleton(transformer_config, t5_config, dtype),
        clip=clip,
        vae=vae,
        scheduler=scheduler,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        weights=CheckpointWeights(folder),
        max_sequence_length=FULL_MAX_SEQUENCE_LENGTH,
    )


ALL_ON_DEVICE = {"transformer": "gpu", "text_encoder_2": "gpu", "text_encoder": "gpu", "vae": "gpu"}


def assemble(
    parts: Parts,
    device: torch.device,
    dtype: torch.dtype,
    plan: MemoryPlan | None = None,
    transforms: Sequence[BlockTransform] = (),
    seconds: dict[str, float] | None = None,
) -> FluxKontextPipeline:
    """Give the large components their weights block by block where ``plan`` puts them ("gpu" is ``device``,
    which may be the CPU), the small ones whole, and make the pipeline; ``seconds`` gets each part's time."""
    placements = plan.placements if plan is not None else ALL_ON_DEVICE
    host = torch.device("cpu")
    skeleton = parts.skeleton
    seconds = {} if seconds is None else seconds
    with contextlib.closing(parts.weights):
        _load_large(parts, device, dtype, placements, transforms, seconds)
    clock = time.perf_counter()
    clip = parts.clip.to(device if placements["text_encoder"] == "gpu" else host)
    vae = parts.vae.to(device)
    seconds["small_components"] = round(time.perf_counter() - clock, 2)
    for module in (clip, vae):
        module.eval().requires_grad_(False)
    pipe = FluxKontextPipeline(
        scheduler=parts.scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=parts.tokenizer,
        text_encoder_2=skeleton.text_encoder_2,
        tokenizer_2=parts.tokenizer_2,
        transformer=skeleton.transformer,
    )
    if plan is not None:
        apply_vae_plan(vae, plan)
        if placements["transformer"] == "group_offload":
            stream_transformer(skeleton.transformer, device)
    return pipe


def _load_large(parts: Parts, device, dtype, placements: dict, transforms: Sequence[BlockTransform], seconds) -> None:
    host = torch.device("cpu")
    spent = [0.0]  # the transforms' seconds, summed over blocks

    def timed(transform: BlockTransform) -> BlockTransform:
        def run(block, prefix):
            clock = time.perf_counter()
            transform(block, prefix)
            spent[0] += time.perf_counter() - clock
            seconds["at_load_transforms"] = round(spent[0], 2)

        return run

    seconds["at_load_transforms"] = 0.0

    for component in ("transformer", "text_encoder_2"):
        place = placements[component]
        clock = time.perf_counter()
        load_large_component(
            getattr(parts.skeleton, component),
            component,
            parts.weights,
            device if place == "gpu" else host,
            dtype,
            [timed(t) for t in transforms] if component == "transformer" else (),
            pin=place in ("on_demand", "streamed", "group_offload"),
        )
        seconds[component] = round(time.perf_counter() - clock, 2)


def apply_vae_plan(vae: AutoencoderKL, plan: MemoryPlan) -> None:
    """One image decoded at a time (the same pixels); tiles of VAE_TILE pixels where the plan needs them."""
    if plan.tier >= 1:
        vae.enable_slicing()
    if plan.vae_tiling:
        vae.enable_tiling()
        vae.tile_sample_min_size = VAE_TILE
        vae.tile_latent_min_size = VAE_TILE // 8


def stream_transformer(transformer: torch.nn.Module, device: torch.device) -> None:
    """diffusers' group offloading: each block copied in on a side stream just before it runs (slow, last tier)."""
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(
        transformer,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=True,
    )


def build_random_pipeline(
    *, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> FluxKontextPipeline:
    """A FluxKontextPipeline with random weights, full-size or tiny, everything on ``device`` (tests, benches)."""
    parts = random_parts(tiny=tiny, dtype=dtype, seed=seed, scratch=device if device.type == "cuda" else None)
    pipe = assemble(parts, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PlanChooser = Callable[[ModelSizes], tuple[MemoryPlan, Sequence[BlockTransform]]]


def load_model(
    settings: Settings,
    device: torch.device,
    dtype: torch.dtype,
    choose: PlanChooser | None = None,
    identify: Callable[[dict], None] | None = None,
) -> LoadedModel:
    """Load the configured source; ``choose`` picks the memory plan from the model's sizes and returns the block
    transforms to run at load; ``identify`` gets the weights' identity first (``model_identity``: what start-up
    measurements of these weights are kept under). Progress bars off: a server logs, it does not draw."""
    clock = time.perf_counter()
    parts, model = _parts(settings, device, dtype)
    if identify is not None:
        identify(model_identity(settings, model, parts))
    plan, transforms = choose(parts.sizes(dtype)) if choose is not None else (None, ())
    model.seconds = {"parts": round(time.perf_counter() - clock, 2)}
    model.pipe = assemble(parts, device, dtype, plan, transforms, model.seconds)
    model.plan = plan
    model.pipe.set_progress_bar_config(disable=True)
    return model


def model_identity(settings: Settings, model: LoadedModel, parts: Parts) -> dict:
    """The source, its revision, the transformer's architecture and the weight files (or random weights' seed)."""
    from flux_kontext.startup_decisions import weights_identity

    weights = parts.weights
    return {
        "kind": model.kind,
        "source": model.source,
        "revision": settings.revision,
        "transformer": dict(parts.skeleton.transformer.config),
        **weights_identity(getattr(weights, "folder", None), getattr(weights, "seed", None)),
    }


def _parts(settings: Settings, device: torch.device, dtype: torch.dtype) -> tuple[Parts, LoadedModel]:
    """The configured source's parts. A defaulted hub model that cannot be found falls back to tiny (demo)."""
    kind = settings.model_kind
    scratch = device if device.type == "cuda" else None
    if kind in ("random", "tiny"):
        tiny = kind == "tiny"
        log.info("building the %s FLUX.1-Kontext architecture with random weights for %s (%s)", kind, device, dtype)
        log.warning("random weights (%s): images are noise, not FLUX.1-Kontext output; timings are real", kind)
        parts = random_parts(tiny=tiny, dtype=dtype, scratch=scratch)
        return parts, _loaded(settings, settings.model, kind, tiny, parts)
    try:
        log.info("loading FLUX.1-Kontext pipeline from %s %s", kind, settings.model)
        parts = _load_pretrained(settings.model, settings, device, dtype)
    except Exception as exc:
        if settings.model_is_explicit:
            raise
        reason = f"could not load default model {settings.model!r}: {type(exc).__name__}: {exc}"
        log.warning("=" * 78)
        log.warning("DEMO MODE: %s", reason)
        log.warning("Serving the TINY RANDOM pipeline: images are noise, not FLUX.1-Kontext output.")
        log.warning("Set HF_TOKEN (gated repo) or FLUX_MODEL=<hub id | folder> to serve the real model.")
        log.warning("=" * 78)
        parts = random_parts(tiny=True, dtype=dtype, scratch=scratch)
        model = _loaded(settings, "tiny", "tiny", True, parts)
        model.fallback_reason = reason
        return parts, model
    return parts, _loaded(settings, settings.model, kind, False, parts)


def _loaded(settings: Settings, source: str, kind: str, demo: bool, parts: Parts) -> LoadedModel:
    max_len = settings.max_sequence_length or parts.max_sequence_length
    parts.max_sequence_length = max_len
    return LoadedModel(pipe=None, source=source, kind=kind, demo=demo, max_sequence_length=max_len)


def step_inputs(config, device, dtype, image_tokens: int, context_tokens: int = 0, text_tokens: int = 512) -> dict:
    """Transformer inputs of one denoising step from a fixed seed: a square latent of ``image_tokens`` packed tokens
    (+ as many context tokens for an edit), random text embeddings. ``config``: the transformer's (in_channels,
    joint_attention_dim, pooled_projection_dim, guidance_embeds). For measurements (start-up screens, benchmarks),
    not for serving."""
    g = torch.Generator(device="cpu").manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    side = int(image_tokens**0.5)
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(len(ids), 1), ids.float()], 1)
    if context_tokens:
        img_ids = torch.cat([img_ids, torch.cat([torch.ones(len(ids), 1), ids.float()], 1)])
    return dict(
        hidden_states=randn(1, image_tokens + context_tokens, config.in_channels),
        encoder_hidden_states=randn(1, text_tokens, config.joint_attention_dim),
        pooled_projections=randn(1, config.pooled_projection_dim),
        timestep=torch.tensor([0.7], device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=torch.float32) if config.guidance_embeds else None,
        img_ids=img_ids.to(device),
        txt_ids=torch.zeros(text_tokens, 3, device=device),
        return_dict=False,
    )
