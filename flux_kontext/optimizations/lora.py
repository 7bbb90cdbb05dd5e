"""lora: LoRA adapters per request, on whatever the base weights are (FP8 stays FP8), under compile and CUDA graphs.

At start: every adapter of FLUX_LORAS / FLUX_LORA_DIR is read and checked (lora_adapters.py); a bad one is reported
in /health ("rejected", with the reason) and skipped. The layers any good adapter targets get a side path with
fixed, zero-padded slots (lora_side.py; its arithmetic in the fused FP8 blocks: lora_gemm.py, lora_triton.py):
FLUX_LORA_MAX_PER_REQUEST adapters x the largest rank loaded (rounded up to 16). Per request (``loras: [{"name",
"scale"}]``): names and scales are checked before the job is queued (422 with the names loaded), the chosen adapters
are copied into the slots (skipped when they hold them already), the side path is switched on for that generation
only. At most FLUX_LORA_GPU_ADAPTERS adapters stay on the GPU (LRU); the others are copied from host memory when
asked for.

With FLUX_LORA_K_AUGMENT (on by default) the fused FP8 blocks' layers, where start-up measures it faster and the
memory plan leaves room (``fold_memory``), fold the up projection into their FP8 GEMM instead (lora_k_augment.py: K
widened by the slots' rank, B' written into a wider copy of the weight at switch time), with a guard against
e4m3's range (lora_fold_input.py: rows rescaled, never a silently cut delta; what it did is counted per adapter in
/health, ``fold_guard``); the others get A's rows appended to their weight (lora_gemm.RowWeight: the down projection
inside their GEMM). Adapters at scale 0 are left out; a request whose adapters are all at scale 0 runs the plain
forward.

Side path, not merged weights: merging B·A into an FP8 weight means re-quantizing every adapted layer on each switch
and keeping an unmerged copy of the base, and FP8's rounding then falls on the adapter's small delta;
bench/lora.py measures what the side path costs per step (BENCHMARKS.md, "LoRA adapters").

After the fused FP8 blocks (the side path is added in their GEMM helper too) and before compile and CUDA graphs
(which trace and capture it, keyed on it being on or off); warm-up runs once with an adapter on, so the first
request with adapters compiles and captures nothing.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from flux_kontext.jobs import Job, JobRejected
from flux_kontext.optimizations import lora_triton
from flux_kontext.optimizations.lora_adapters import Adapter, AdapterError, load_adapter, sources
from flux_kontext.optimizations.lora_fold_input import GuardCounts
from flux_kontext.optimizations.lora_side import ResidentAdapters, SidePaths
from flux_kontext.stack import APPLY, Decision, Hardware, Model, Optimization, Outcome, RequestRun, skip

log = logging.getLogger(__name__)

RANK_MULTIPLE = 16  # slot rank rounded up to this (tensor-core friendly shapes)


class Lora(Optimization):
    name = "lora"
    after = ("fuse_qkv", "low_precision_gemm", "gelu_sigmoid_form", "fused_gelu_fp8", "fused_norm_rope")
    undoable = True
    counters = True

    def __init__(self, settings):
        super().__init__(settings)
        self.adapters: dict[str, Adapter] = {}
        self.rejected: dict[str, str] = {}
        self.paths: SidePaths | None = None
        self.resident: ResidentAdapters | None = None
        self.guard: GuardCounts | None = None

    def decide(self, hardware: Hardware) -> Decision:
        if not sources(self.settings):
            return skip("no adapters configured (FLUX_LORAS, FLUX_LORA_DIR)")
        return APPLY

    def apply(self, model: Model) -> Outcome:
        transformer = model.pipe.transformer
        modules = dict(transformer.named_modules())
        dtype = _activation_dtype(transformer)
        for name, source in sources(self.settings).items():
            try:
                self.adapters[name] = load_adapter(name, source, modules, self.settings.lora_max_rank, dtype)
            except AdapterError as exc:
                log.error("LoRA adapter %r skipped: %s", name, exc)
                self.rejected[name] = str(exc)
        if not self.adapters:
            return Outcome("skipped", "no adapter could be loaded (see rejected)", {"rejected": dict(self.rejected)})
        slot_rank = -(-max(a.rank for a in self.adapters.values()) // RANK_MULTIPLE) * RANK_MULTIPLE
        layers = {}
        for adapter in self.adapters.values():
            for layer, parts in adapter.parts.items():
                layers[layer] = (modules[layer], parts)
        self.paths = SidePaths(
            layers,
            self.settings.lora_max_per_request,
            slot_rank,
            shared_inputs(transformer),
            k_augment=self.settings.lora_k_augment,
            fold_memory=fold_memory(model.hardware, next(transformer.parameters()).device),
        )
        model.graph_variants.append(self.paths.state.variant)
        self.guard = GuardCounts(self.paths.guard)
        device = next(transformer.parameters()).device
        up_kernel = self._choose_up_kernel(device)
        host = {name: adapter.weights for name, adapter in self.adapters.items()}
        self.resident = ResidentAdapters(host, device, self.settings.lora_gpu_adapters)
        detail = (
            f"{len(self.adapters)} adapter(s) on a low-rank side path next to {len(layers)} layers (base weights as "
            f"they are; {fp8_note(self.paths)}); slots for {self.settings.lora_max_per_request} per request at rank "
            f"{slot_rank}, switched by copy (no recompile, no recapture); up to {self.settings.lora_gpu_adapters} kept "
            "on the GPU"
        )
        if self.rejected:
            detail += f"; {len(self.rejected)} rejected"
        data = self._data_now(slot_rank, len(layers))
        for info in data["adapters"].values():
            info["path"] = path_note(self.paths)
        folded = {
            "k_augmented": len(self.paths.augmented),
            "k_augment": self.paths.k_augment_choice,
            "rows_appended": len(self.paths.rows_appended),
            "rows_choice": self.paths.rows_choice,
        }
        return Outcome.applied(
            detail + self.decisions.note(self.name),
            **data,
            up_projection=up_kernel,
            decisions=self.decisions.describe(self.name),
            **folded,
        )

    def _choose_up_kernel(self, device) -> dict:
        """Per layer shape, the fused blocks' in-place up projection: Triton kernel or cuBLAS, by measurement."""
        fp8 = [side for side in self.paths.sides.values() if side.down8 is not None and side.aug is None]
        if not fp8:
            return {}
        shapes = {tuple(side.up.shape) for side in fp8}
        names = {f"{cols}x{rank}" for cols, rank in shapes}
        data, _ = self.decisions.cached_or_measured(  # read back on a restart on a kept cache (startup_decisions.py)
            self.name,
            lambda: lora_triton.choose(device, shapes)[1],
            "up_kernel",
            valid=lambda kept: names <= set(kept.get("by_layer_shape", {})),
            keep=lambda measured: "by_layer_shape" in measured,  # not the CPU's or a broken Triton's fallback
        )
        by_shape = data.get("by_layer_shape", {})  # absent in a fallback: cuBLAS everywhere
        for side in fp8:
            cols, rank = side.up.shape
            side.triton_up = by_shape.get(f"{cols}x{rank}", {}).get("kernel") == "triton"
        return data

    def _data_now(self, slot_rank: int, layers: int) -> dict:
        return {
            "adapters": {name: adapter.public() for name, adapter in self.adapters.items()},
            "rejected": dict(self.rejected),
            "slot_rank": slot_rank,
            "max_per_request": self.settings.lora_max_per_request,
            "max_scale": self.settings.lora_max_scale,
            "layers": layers,
            "slot_mib": round(self.paths.nbytes / 2**20, 1),
            "gpu_adapters": self.settings.lora_gpu_adapters,
            "resident": [],
            "loads_from_host": 0,
            "evictions": 0,
            "fold_guard": {},
        }

    def undo(self) -> None:
        if self.paths is not None:
            self.paths.remove()
        self.paths = self.resident = self.guard = None

    # ----- per request ---------------------------------------------------------------------------------------
    def check(self, job: Job) -> None:
        if not job.loras:
            return
        names = ", ".join(sorted(self.adapters)) if self.applied else ""
        loaded = f"loaded adapters: {names}" if names else f"no LoRA adapters are loaded on this server ({self.detail})"
        limit, bound = self.settings.lora_max_per_request, self.settings.lora_max_scale
        if len(job.loras) > limit:
            raise JobRejected(f"{len(job.loras)} LoRA adapters asked for; at most {limit} per request; {loaded}")
        seen = set()
        for name, scale in job.loras:
            if not self.applied or name not in self.adapters:
                raise JobRejected(f"unknown LoRA adapter {name!r}; {loaded}")
            if name in seen:
                raise JobRejected(f"LoRA adapter {name!r} is named twice; {loaded}")
            seen.add(name)
            if not -bound <= scale <= bound:
                raise JobRejected(f"LoRA scale {scale:g} of {name!r} is outside [-{bound:g}, {bound:g}]; {loaded}")

    def warmup_fields(self) -> list[dict]:
        """One warm-up with an adapter on: the side path's compiled code and graphs exist before ready."""
        return [{"loras": ((next(iter(self.adapters)), 1.0),)}] if self.adapters else []

    @contextlib.contextmanager
    def request(self, job: Job, run: RequestRun):
        if self.applied and self.guard is not None:  # the fold guard's counts of the requests before, now back
            self._note(fold_guard=_copy(self.guard.collect()))
        if not job.loras or not self.applied:
            yield
            return
        self.check(job)  # also for jobs that did not come through the service (benches, tests)
        run.record_ran(self.name)
        # Adapters at scale 0 add nothing: left out, and with none left the plain variant runs (the base bit for bit,
        # whatever GEMM the side path would use).
        active = tuple((name, scale) for name, scale in job.loras if scale != 0)
        loads = self.resident.loads
        copied = self.paths.fill(active, self.resident) if active else False
        run.counters[self.name] = {
            "adapters": [{"name": name, "scale": scale, "rank": self.adapters[name].rank} for name, scale in job.loras],
            "copied_into_slots": copied,
            "loaded_from_host": self.resident.loads - loads,
            "side_path": bool(active),
        }
        self._note(resident=self.resident.names, loads_from_host=self.resident.loads, evictions=self.resident.evictions)
        if not active:
            yield
            return
        self.paths.state.enabled = True
        try:
            yield
        finally:
            self.paths.state.enabled = False
            if self.paths.augmented:  # what the fold's guard did, read back without waiting for the GPU
                self.guard.after_request(tuple(name for name, _ in active))


def shared_inputs(transformer) -> list[tuple[str, str]]:
    """Layers that read one activation tensor, in the order the fused single block calls them (fp8_blocks.fp8_linears):
    each single block's proj_mlp and attn.to_qkv."""
    blocks = getattr(transformer, "single_transformer_blocks", ())
    return [
        (f"single_transformer_blocks.{i}.proj_mlp", f"single_transformer_blocks.{i}.attn.to_qkv")
        for i in range(len(blocks))
    ]


def fp8_note(paths: SidePaths) -> str:
    """What the report says about the side path's arithmetic."""
    fp8 = sum(side.down8 is not None for side in paths.sides.values())
    triton = sum(side.triton_up for side in paths.sides.values())
    if not fp8:
        return "bf16"
    return (
        f"{fp8} fed by the fused FP8 blocks: down projection from their FP8 activations with A in e4m3, "
        f"{len(paths.groups)} shared by two layers, up projection folded into the FP8 GEMM (K widened by the slots' "
        f"rank) on {len(paths.augmented)} and added in place on the rest ({triton} by a Triton kernel); the others bf16"
    )


FOLD_MARGIN = 2**30  # kept free beyond the memory plan's largest request when widened weights are laid out


def fold_memory(hardware: Hardware, device: torch.device) -> int | None:
    """Bytes the folded GEMMs' widened weights (W_aug) may take: what the GPU has free now beyond the memory plan's
    headroom for its largest admitted request (and a margin); None without a plan (no limit)."""
    if device.type != "cuda" or hardware.request_headroom is None:
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, free - hardware.request_headroom - FOLD_MARGIN)


def path_note(paths: SidePaths) -> str:
    """Which path an adapter's layers run (every adapter runs the same: the slots are shared)."""
    fp8 = sum(side.down8 is not None for side in paths.sides.values())
    bf16 = len(paths.sides) - fp8
    folded, rows = len(paths.augmented), len(paths.rows_appended)
    return (
        f"up projection folded into the FP8 GEMM on {folded} layers (saturation guard: rows rescaled, counted in "
        f"fold_guard), added in place after it on {fp8 - folded} ({rows} with the down projection inside the GEMM: "
        f"A's rows appended to the weight), bf16 side path on {bf16}"
    )


def _copy(by_adapter: dict) -> dict:
    return {name: dict(counts) for name, counts in by_adapter.items()}


def _activation_dtype(transformer) -> torch.dtype:
    """What the blocks compute in: the dtype of the (never quantized) embedders' weights."""
    return transformer.x_embedder.weight.dtype
