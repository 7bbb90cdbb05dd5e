"""The memory plan: where each component lives, chosen once at start from the GPU's memory and capability.

Tiers, tried fastest first: the first that holds the largest accepted request (a 1568x672 edit, num_images 4) with
the activation margin wins; if none does, the tier keeping the transformer on the GPU that holds the most images
(at least one; requests above get a 422 naming the limit) comes before streaming the transformer; if no tier holds
one image, the service refuses to start and says what it needs:

1. ``resident``: everything on the GPU (the transformer in FP8 where the GPU has FP8 tensor cores, quantized block by
   block on its way there, so the bf16 transformer never sits whole on the GPU).
2. ``text_encoder_off_gpu``: T5-XXL kept in pinned host memory and copied to the GPU for each new prompt, whole
   (``on_demand``) or one layer at a time as it runs (``streamed``, for when T5 cannot visit whole); repeated
   prompts come from the prompt-embedding cache. Running T5 on the CPU instead costs about 4.8 TFLOP per 512-token
   prompt there: seconds to minutes, so it is not a tier. The VAE decodes in tiles when a whole image would not fit.
3. ``group_offload``: the transformer's blocks stay in host memory and are streamed to the GPU for every step
   (diffusers' group offloading with CUDA streams): the last resort, several times slower.

Pure: no torch. ``choose_plan`` is a function of the budget, the capability and the model's sizes (tests: a table).
The activation margins are fitted to peaks measured on an H200 (bench/memory_tiers.py, BENCHMARKS.md "Memory tiers").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from flux_kontext.resolution import RequestShape

GIB = 2**30
MAX_NUM_IMAGES = 4  # the request schema's limit
LARGEST_REQUEST = (1568, 672)  # the widest preferred Kontext resolution, edited: the most tokens accepted
VAE_TILE = 512  # pixels a side of a tiled decode (diffusers' default, the VAE's sample_size, would not tile 1024²)


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of each component as the loader would place it, and the geometry activations scale with."""

    transformer_bf16: int
    transformer_fp8: int  # quantized layers at 1 byte per weight + row scales; embedders and output kept bf16
    text_encoder_2: int  # T5
    text_encoder_2_streamed: int  # T5 bytes on the GPU at once when streamed: its largest layer, embedding, norm
    text_encoder: int  # CLIP
    vae: int
    hidden: int = 3072  # transformer width
    blocks: int = 57  # double + single blocks
    text_tokens: int = 512
    vae_channels: int = 128  # the decoder's width at full resolution


@dataclass(frozen=True)
class ActivationModel:
    """Transient GPU memory of one request, fitted to peaks measured on an H200 (BENCHMARKS.md "Memory tiers").

    ``reserve``: what the allocator, compile and the warm-up shapes hold beyond the weights, whatever the request.
    Transformer phase: ``transformer`` bytes per token, image and unit of width. VAE phase: ``vae`` bytes per pixel
    and decoder channel of one image (decoded one at a time); a tiled decode needs one tile's worth. CUDA graphs:
    ``graphs`` bytes per token, image, block and unit of width, held for as long as the shape stays captured."""

    reserve: int = int(2.5 * GIB)
    transformer: float = 50.0
    vae: float = 20.0
    graphs: float = 1.3
    graph_warmup_tokens: int = 8704 + 4608  # the shapes warm-up captures (1024² edit and text-to-image), kept


@dataclass(frozen=True)
class MemoryPlan:
    tier: int  # 0: no GPU (everything on the CPU, no limit)
    name: str
    budget: int | None  # bytes the plan may use; None on the CPU
    budget_source: str
    placements: dict[str, str]
    gpu_bytes: dict[str, int]  # bytes each component keeps on the GPU (0: off the GPU)
    host_bytes: dict[str, int]  # bytes each component keeps in host memory
    transformer_fp8: bool
    vae_tiling: bool
    cuda_graphs: bool
    sizes: ModelSizes
    activations: ActivationModel = field(default_factory=ActivationModel)
    notes: tuple[str, ...] = ()

    @property
    def text_encoder_on_gpu(self) -> bool:
        return self.placements.get("text_encoder_2") == "gpu"

    @property
    def reserve(self) -> int:
        """Held whatever the request: the allocator's and compile's share, and the warm-up shapes' graphs."""
        act, sizes = self.activations, self.sizes
        graphs = act.graphs * act.graph_warmup_tokens * sizes.hidden * sizes.blocks if self.cuda_graphs else 0
        return int(act.reserve + graphs)

    def per_image(self, request: RequestShape) -> int:
        """Transient bytes per image of ``request`` in the transformer phase (graphs included where captured)."""
        return transformer_bytes_per_image(self.sizes, self.activations, request, self.cuda_graphs)

    def vae_bytes(self, request: RequestShape) -> int:
        """Transient bytes of the VAE phase (one image at a time; one tile when tiled)."""
        return vae_bytes(self.sizes, self.activations, request, self.vae_tiling)

    def max_num_images(self, request: RequestShape) -> int:
        """How many images of this size the plan holds (MAX_NUM_IMAGES when there is no GPU budget)."""
        if self.budget is None:
            return MAX_NUM_IMAGES
        room = self.budget - sum(self.gpu_bytes.values()) - self.reserve
        if room < self.vae_bytes(request):
            return 0
        return max(0, min(MAX_NUM_IMAGES, room // max(1, self.per_image(request))))

    def request_headroom(self) -> int:
        """Bytes to keep free beside the weights and the graphs kept: what the largest request the plan admits needs
        (its transformer phase, the graphs of its own shape included, or its VAE phase). CUDA graphs of other shapes
        are evicted to keep this free (FLUX_CUDA_GRAPH_MIN_FREE_GIB's default)."""
        largest = RequestShape("edit", *LARGEST_REQUEST)
        most = max(1, self.max_num_images(largest))
        return max(most * self.per_image(largest), self.vae_bytes(largest))

    def stack_limits(self, on_gpu: bool) -> dict:
        """What the optimizations may know of the plan (Hardware's memory fields); nothing off a GPU."""
        if not on_gpu or self.budget is None:
            return {}
        return {"memory_budget": self.budget, "request_headroom": self.request_headroom()}

    def refusal(self, request: RequestShape) -> str | None:
        """Why this request cannot run in the plan (None: it fits)."""
        most = self.max_num_images(request)
        if request.num_images <= most:
            return None
        kind = "edit" if request.edit else "text-to-image"
        need = (request.num_images * self.per_image(request) + self.reserve) / GIB
        holds = f"at most {most} image(s)" if most else "no image"
        return (
            f"num_images={request.num_images} at {request.width}x{request.height} ({kind}) needs about {need:.1f} GiB "
            f"beyond the weights; this GPU's memory plan (tier {self.tier} {self.name}, budget "
            f"{self.budget / GIB:.1f} GiB) holds {holds} at this size: ask for fewer images or a smaller size"
        )

    def public(self) -> dict:
        largest = RequestShape("edit", *LARGEST_REQUEST)
        return {
            "tier": self.tier,
            "name": self.name,
            "budget_gib": None if self.budget is None else round(self.budget / GIB, 2),
            "budget_source": self.budget_source,
            "placements": dict(self.placements),
            "gpu_bytes": dict(self.gpu_bytes),
            "host_bytes": dict(self.host_bytes),
            "gpu_weights_gib": round(sum(self.gpu_bytes.values()) / GIB, 2),
            "host_weights_gib": round(sum(self.host_bytes.values()) / GIB, 2),
            "transformer_fp8": self.transformer_fp8,
            "vae_tiling": self.vae_tiling,
            "cuda_graphs": self.cuda_graphs,
            "reserve_gib": round(self.reserve / GIB, 2),
            "max_num_images_largest_edit": self.max_num_images(largest),
            "largest_edit": f"{largest.width}x{largest.height}",
            "notes": list(self.notes),
        }


def plan_for_settings(settings, sizes: ModelSizes, capability, free: int | None, at_load: list[str]):
    """(plan, what it rules out) for the service's settings: ``free`` is the GPU's free memory (None: a CPU),
    ``at_load`` the optimizations that will run block by block while loading (FP8 among them or not)."""
    budget = settings.gpu_memory_gib
    if free is None and budget is None:
        return cpu_plan(sizes), ()
    graphs = settings.cuda_graphs and free is not None
    source = "FLUX_GPU_MEMORY_GIB" if budget is not None else "free GPU memory at start"
    plan = choose_plan(
        int(budget * GIB) if budget is not None else free,
        capability,
        sizes,
        fp8_wanted="low_precision_gemm" in at_load,
        cuda_graphs_wanted=graphs,
        budget_source=source if free is not None else f"{source} (simulated: this is a CPU)",
    )
    return plan, ruled_out_by(plan, graphs)


def ruled_out_by(plan: MemoryPlan, cuda_graphs_wanted: bool) -> tuple[tuple[str, str], ...]:
    """The optimizations this plan leaves no room for, with the reason (the stack skips them, saying so)."""
    where = f"memory plan tier {plan.tier} {plan.name}"
    out = []
    if cuda_graphs_wanted and not plan.cuda_graphs:
        out.append(("cuda_graphs", f"{where}: no room for the per-shape graph memory (BENCHMARKS.md Memory tiers)"))
    if plan.placements.get("transformer") == "group_offload":
        out.append(("low_precision_gemm", f"{where}: the transformer is streamed from host memory in bf16"))
    return tuple(out)


class PlanDoesNotFit(RuntimeError):
    """Not even the last tier holds one image of the largest request: the service refuses to start."""


def transformer_bytes_per_image(sizes: ModelSizes, act: ActivationModel, request: RequestShape, graphs: bool) -> int:
    tokens = sizes.text_tokens + request.tokens
    per_image = act.transformer * tokens * sizes.hidden
    if graphs:
        per_image += act.graphs * tokens * sizes.hidden * sizes.blocks
    return int(per_image)


def vae_bytes(sizes: ModelSizes, act: ActivationModel, request: RequestShape, tiled: bool) -> int:
    width, height = (
        (min(request.width, VAE_TILE), min(request.height, VAE_TILE)) if tiled else (request.width, request.height)
    )
    return int(act.vae * width * height * sizes.vae_channels)


def cpu_plan(sizes: ModelSizes, act: ActivationModel | None = None) -> MemoryPlan:
    """No GPU: everything in host memory, no limit enforced."""
    names = ("transformer", "text_encoder_2", "text_encoder", "vae")
    return MemoryPlan(
        tier=0,
        name="cpu",
        budget=None,
        budget_source="no GPU",
        placements=dict.fromkeys(names, "cpu"),
        gpu_bytes=dict.fromkeys(names, 0),
        host_bytes=_component_bytes(sizes, fp8=False),
        transformer_fp8=False,
        vae_tiling=False,
        cuda_graphs=False,
        sizes=sizes,
        activations=act or ActivationModel(),
    )


def _component_bytes(sizes: ModelSizes, fp8: bool) -> dict[str, int]:
    return {
        "transformer": sizes.transformer_fp8 if fp8 else sizes.transformer_bf16,
        "text_encoder_2": sizes.text_encoder_2,
        "text_encoder": sizes.text_encoder,
        "vae": sizes.vae,
    }


def _candidates():
    """(tier, name, placements), fastest first."""
    yield 1, "resident", {"transformer": "gpu", "text_encoder_2": "gpu", "text_encoder": "gpu", "vae": "gpu"}
    off = {"transformer": "gpu", "text_encoder": "gpu", "vae": "gpu"}
    yield 2, "text_encoder_off_gpu", {**off, "text_encoder_2": "on_demand"}
    yield 2, "text_encoder_off_gpu", {**off, "text_encoder_2": "streamed"}
    streamed = {"transformer": "group_offload", "text_encoder_2": "streamed", "text_encoder": "cpu", "vae": "gpu"}
    yield 3, "group_offload", streamed


def _build(tier, name, placements, budget, source, sizes, act, fp8, tiled, graphs) -> MemoryPlan:
    full = _component_bytes(sizes, fp8)
    on_gpu = {k: (full[k] if placements[k] == "gpu" else 0) for k in full}
    if placements["transformer"] == "group_offload":
        on_gpu["transformer"] = full["transformer"] // sizes.blocks * 2  # two blocks in flight (prefetch)
    host = {k: full[k] - on_gpu[k] if placements[k] != "gpu" else 0 for k in full}
    return MemoryPlan(tier, name, budget, source, placements, on_gpu, host, fp8, tiled, graphs, sizes, act)


def choose_plan(
    budget: int,
    capability: tuple[int, int] | None,
    sizes: ModelSizes,
    *,
    fp8_wanted: bool = True,
    cuda_graphs_wanted: bool = True,
    budget_source: str = "free GPU memory",
    act: ActivationModel | None = None,
) -> MemoryPlan:
    """The fastest tier that holds the largest request at MAX_NUM_IMAGES, else the one holding the most images.

    ``fp8_wanted``: the transformer is quantized to FP8 when the GPU has FP8 tensor cores (sm_89+) and
    low_precision_gemm is not switched off. Raises PlanDoesNotFit when no tier holds one image."""
    act = act or ActivationModel()
    fp8 = fp8_wanted and capability is not None and capability >= (8, 9)
    largest = RequestShape("edit", *LARGEST_REQUEST, num_images=MAX_NUM_IMAGES)
    fitting = [
        plan
        for tier, name, placements in _candidates()
        if (
            plan := _fit(
                tier, name, placements, budget, budget_source, sizes, act, fp8 and tier < 3, cuda_graphs_wanted
            )
        )
        and plan.max_num_images(largest) >= 1
    ]
    # Streaming the transformer every step is the last resort: a faster tier holding fewer images comes first.
    for group in ([p for p in fitting if p.tier < 3], [p for p in fitting if p.tier == 3]):
        if group:
            full = [plan for plan in group if plan.max_num_images(largest) >= MAX_NUM_IMAGES]
            chosen = full[0] if full else max(group, key=lambda p: p.max_num_images(largest))
            return _with_notes(chosen, largest, cuda_graphs_wanted)
    raise PlanDoesNotFit(_does_not_fit(budget, sizes, act, fp8))


def _fit(tier, name, placements, budget, source, sizes, act, fp8, graphs_wanted) -> MemoryPlan | None:
    """The plan for these placements, graphs and tiling only where needed or affordable; None when the weights do
    not fit. Graphs hold every block's outputs per captured shape: tier 1 only, and only with room for the largest."""
    largest = RequestShape("edit", *LARGEST_REQUEST, num_images=MAX_NUM_IMAGES)
    graph_options = (True, False) if graphs_wanted and tier == 1 else (False,)
    plans = [
        _build(tier, name, placements, budget, source, sizes, act, fp8, tiled, graphs)
        for graphs in graph_options
        for tiled in (False, True)
    ]
    holding_all = [plan for plan in plans if plan.max_num_images(largest) >= MAX_NUM_IMAGES]
    plan = holding_all[0] if holding_all else max(plans, key=lambda p: p.max_num_images(largest))
    resident = sum(plan.gpu_bytes.values())
    transient = {"on_demand": sizes.text_encoder_2, "streamed": sizes.text_encoder_2_streamed}.get(
        placements["text_encoder_2"], 0
    )
    if resident + transient + act.reserve > budget:
        return None
    return plan


def _with_notes(plan: MemoryPlan, largest: RequestShape, cuda_graphs_wanted: bool) -> MemoryPlan:
    notes = []
    t5 = plan.placements["text_encoder_2"]
    if t5 == "on_demand":
        notes.append("T5 lives in host memory and is copied to the GPU for each new prompt (cached prompts skip it)")
    elif t5 == "streamed":
        notes.append(
            "T5 lives in host memory; its layers visit the GPU one at a time for each new prompt (cached skip)"
        )
    if plan.placements["transformer"] == "group_offload":
        notes.append("the transformer's blocks are streamed from host memory every step: several times slower")
    if plan.vae_tiling:
        notes.append(f"the VAE decodes in {VAE_TILE}x{VAE_TILE} tiles (blended seams) above that size")
    if cuda_graphs_wanted and not plan.cuda_graphs:
        notes.append("CUDA graphs off: the graphs of one large shape alone would not fit beside the activations")
    most = plan.max_num_images(largest)
    if most < MAX_NUM_IMAGES:
        notes.append(
            f"num_images is limited to {most} at {largest.width}x{largest.height} edits (more at smaller sizes)"
        )
    return dataclasses.replace(plan, notes=tuple(notes))


def _does_not_fit(budget: int, sizes: ModelSizes, act: ActivationModel, fp8: bool) -> str:
    one = RequestShape("edit", *LARGEST_REQUEST)
    streamed = _build(3, "", {"transformer": "group_offload", "text_encoder_2": "streamed", "text_encoder": "cpu",
                              "vae": "gpu"}, budget, "", sizes, act, fp8, True, False)  # fmt: skip
    need = sum(streamed.gpu_bytes.values()) + act.reserve + max(streamed.per_image(one), streamed.vae_bytes(one))
    fast = _component_bytes(sizes, fp8)["transformer"] + sizes.vae + sizes.text_encoder
    fast_need = fast + act.reserve + transformer_bytes_per_image(sizes, act, one, False)
    return (
        f"GPU memory budget {budget / GIB:.1f} GiB is too small for FLUX.1-Kontext: one {one.width}x{one.height} "
        f"edit needs about {math.ceil(need / GIB * 10) / 10} GiB even with the transformer streamed from host memory, "
        f"and about {math.ceil(fast_need / GIB * 10) / 10} GiB with it resident "
        f"({'FP8' if fp8 else 'bf16'} transformer, T5 off the GPU); free GPU memory or set FLUX_GPU_MEMORY_GIB"
    )
