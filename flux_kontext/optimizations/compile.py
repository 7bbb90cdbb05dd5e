"""compile: regional torch.compile. Each repeated transformer block's forward compiled once (one graph per block
kind serves all 57 blocks, fullgraph, Inductor's default mode); the VAE's encoder and decoder compiled whole.

Default mode, not max-autotune: on an FP8 FLUX block autotuning measured no faster and compiled 30x longer
(docs/FACTS.md). Regional rather than whole-model: one compile per block type instead of one graph of 57 blocks,
the same steady-state speed, a fraction of the start-up. It fills the blocks' ``compiled`` slot: whatever sits in
``body`` (diffusers' forward or our fused one) is compiled, and the CUDA graphs and the first-block cache's hooks
sit above the compiled code, so the cache's per-step decision is no graph break. VAE figures: bench/vae.py,
BENCHMARKS.md.

One graph per block kind holds only while nothing a block reads differs from block to block: dynamo guards on every
Python value the traced code reads, so a per-block attribute (a layer index) or a stride of a size-1 dimension
compiles each block apart (57 graphs: minutes at start). FP8 attention's per-layer choice is therefore a bool per
layer (attention/fp8_policy.py), and the blocks' contiguous inputs get standard strides (``canonical_strides``).

Shapes (FLUX_COMPILE_DYNAMIC, on by default): a request's size changes the blocks' token count (resolution, plus
the context image's tokens for an edit) and batch (num_images). Compiled for those dimensions as symbols, one graph
per block kind serves every resolution, explicit sizes included, and nothing compiles at request time; static
compilation would compile again per shape. Per step both measured the same (BENCHMARKS.md "Start-up"). Every
compile is counted (``graphs_compiled``, per request too).

The VAE (FLUX_COMPILE_VAE): by default compiled with static shapes for one 1024² image and eager at every other size
(``CompiledAtShapes``). Compiled for dynamic height and width, its encoder and decoder took 54 and 60 s to compile on
an H200 and ran slower than static graphs (38 / 57 ms against 19 / 46 ms); static ones compile in about 20 s each,
and eager code at the other sizes costs tens of milliseconds per image, never a compile.

With FLUX_COMPILE_CACHE_DIR, Inductor's and Triton's on-disk caches live in a directory per torch/GPU/settings
fingerprint under it (compile_cache.py), so a restart on a kept directory reuses the compiled code; the report
says which directory, its fingerprint, and whether it held compiled artifacts at start (hit) or not (cold).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

import torch
from torch._dynamo.exc import FailOnRecompileLimitHit

from flux_kontext.jobs import Job
from flux_kontext.optimizations import compile_cache
from flux_kontext.stack import APPLY, Decision, Hardware, Model, Optimization, Outcome, RequestRun, skip
from flux_kontext.warmup_shapes import HOT_SIZE

log = logging.getLogger(__name__)

# Variants per block type: static shapes, then dynamic ones after a second resolution. dynamo's limit is process
# configuration; it is only ever raised here, so another engine in the process is not slowed by it.
RECOMPILE_LIMIT = 64

# The dimensions of a block's inputs that change between requests: batch (num_images) and tokens (the resolution,
# plus the context image's tokens in an edit). Text tokens (max_sequence_length) and widths stay static.
BLOCK_DYNAMIC_DIMS = {"hidden_states": (0, 1), "encoder_hidden_states": (0,), "temb": (0,), "image_rotary_emb": (0,)}
# Of those, the inputs with a batch, always their dimension 0 (the rotary embedding has none: its 0 is tokens).
BLOCK_BATCH_INPUTS = ("hidden_states", "encoder_hidden_states", "temb")


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far, recompiles included (one serving engine per process: they
    are its own)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def mark_dynamic_dims(kwargs: dict, unbacked_batch: bool = False) -> None:
    """Mark the varying dimensions of a block's keyword inputs as dynamic, so the first compile already serves
    every size. ``maybe_mark_dynamic``: a dimension of size 1 (one image) may still be specialized, never an error;
    the next batch size then compiles once for all batch sizes above one. With ``unbacked_batch`` the batch
    dimensions are unbacked symbols instead (``mark_unbacked``): dynamo cannot specialize them, so the first call
    (one image) compiles the graph every batch size runs, and a batch never compiles again; the batches the inputs
    must share are checked at run time (an assert in the compiled code, not a guard)."""
    for name, dims in BLOCK_DYNAMIC_DIMS.items():
        value = kwargs.get(name)
        for tensor in value if isinstance(value, tuple | list) else (value,):
            if isinstance(tensor, torch.Tensor):
                for dim in dims:
                    if unbacked_batch and dim == 0 and name in BLOCK_BATCH_INPUTS:
                        torch._dynamo.decorators.mark_unbacked(tensor, dim)
                    else:
                        torch._dynamo.maybe_mark_dynamic(tensor, dim)


def canonical_strides(kwargs: dict) -> None:
    """Contiguous tensor inputs as views with the standard strides (no copy). A dimension of size 1 (one image) can
    carry any stride, and dynamo guards on it: the double blocks' text stream arrives from the context embedder with
    one and as a slice of the previous block's joint output with another, which compiled the block twice."""
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.is_contiguous():
            kwargs[name] = value.view(value.shape)


def joint_layout(kwargs: dict) -> None:
    """The text and image rows of a batch of two or more as two slices of one (batch, text + image, C) tensor: the
    layout in which every single block but the first receives them (the previous single block's output, split). The
    first receives the double blocks' two separate tensors, whose batch strides differ from the slices', and dynamo
    guards on strides: the single blocks compiled a third graph for num_images >= 2 (about 3 s cold, 1 s on a
    restart). The price: one copy of the rows per step, for the first single block only (the same rows its first
    kernel reads anyway). A batch of one needs nothing (a dimension of size 1 carries any stride: canonical_strides).
    Not with an unbacked batch: there the graph one image compiled serves the first block's two tensors at any batch,
    and the slices' layout would compile another."""
    text, image = kwargs.get("encoder_hidden_states"), kwargs.get("hidden_states")
    if not (isinstance(text, torch.Tensor) and isinstance(image, torch.Tensor)) or text.shape[0] < 2:
        return
    if text.is_contiguous() and image.is_contiguous():
        joint = torch.cat([text, image], dim=1)
        kwargs["encoder_hidden_states"], kwargs["hidden_states"] = joint.split([text.shape[1], image.shape[1]], dim=1)


class CompiledForward:
    """A forward, compiled (the ``compiled`` slot's content).

    With fullgraph, dynamo raises instead of silently running eager once a block has used up its recompile limit
    (too many distinct shapes): that block then runs eager from here on, and ``on_fallback`` says so in the report.
    """

    def __init__(
        self,
        eager: Callable,
        options: dict,
        on_fallback: Callable[[str], None],
        dynamic: bool,
        unbacked_batch: bool = False,
        on_batch_fallback: Callable[[str], None] | None = None,
        joint_inputs: bool = False,
    ):
        self.eager = eager
        self.joint_inputs = joint_inputs  # the first single block: its inputs given the later blocks' layout
        self.__wrapped__ = eager  # inspect.signature sees the block's own parameters
        self.on_fallback = on_fallback
        self.dynamic = dynamic
        self.unbacked_batch = unbacked_batch
        self.options = options
        self.on_batch_fallback = on_batch_fallback  # this block's batch could not be unbacked: the reason
        self.run = self._compiled()

    def _compiled(self) -> Callable:
        # dynamic=False: a graph per shape; None: dynamo's default, with the varying dimensions marked (below).
        traced = with_batch_bounds(self.eager) if self.unbacked_batch else self.eager
        return torch.compile(
            traced, fullgraph=True, dynamic=None if self.dynamic else False, options=self.options or None
        )

    def __call__(self, *args, **kwargs):
        if self.run is not self.eager:  # diffusers calls the blocks with keywords
            if self.joint_inputs and not self.unbacked_batch:  # unbacked: batch 1's graph takes what batch 2 brings
                joint_layout(kwargs)
            canonical_strides(kwargs)
            if self.dynamic:
                mark_dynamic_dims(kwargs, self.unbacked_batch)
        try:
            return self.run(*args, **kwargs)
        except FailOnRecompileLimitHit as exc:  # raised before the frame runs: nothing was computed
            self.run = self.eager
            self.on_fallback(str(exc).splitlines()[0])
            return self.eager(*args, **kwargs)
        except UNBACKED_FAILURES as exc:  # traced code guards on the batch: compile it the dynamo way instead
            if not self.unbacked_batch:
                raise
            reason = str(exc).splitlines()[0]
            log.warning("compile: this block cannot be compiled for an unbacked batch (%s); batch specialized", reason)
            self.unbacked_batch, self.run = False, self._compiled()
            if self.on_batch_fallback is not None:
                self.on_batch_fallback(reason)
            return self(*args, **unmarked(kwargs))


# Raised while tracing when code guards on an unbacked size (nothing has run yet: the call can be traced again).
UNBACKED_FAILURES = (torch._dynamo.exc.UserError, torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode)


def with_batch_bounds(eager: Callable) -> Callable:
    """``eager`` with what the compiler may assume of an unbacked batch: at least one image, the same in every input.
    Without the bound a shape check such as ``batch x tokens == 1`` (torch's FP8 GEMM asks it of its rows) cannot
    be decided, and tracing fails; the checks become asserts in the compiled code."""

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        batch = kwargs["hidden_states"].shape[0]
        torch._check(batch >= 1)
        for name in BLOCK_BATCH_INPUTS:
            if isinstance(kwargs.get(name), torch.Tensor):
                torch._check(kwargs[name].shape[0] == batch)
        return eager(*args, **kwargs)

    return forward


def unmarked(kwargs: dict) -> dict:
    """The tensor inputs as new views: dynamo's marks (mark_unbacked) live on the tensor objects."""
    return {
        name: value.view(value.shape) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()
    }


class WithoutDuckSizing:
    """A compiled VAE part traced without dynamo's duck sizing: a square first call (1024²) would otherwise tie
    height to width (a guard), and the first non-square request would compile again. Only at trace time does the
    setting matter; it is set around the call, not for the process."""

    def __init__(self, compiled: Callable):
        self.compiled = compiled

    def __call__(self, *args, **kwargs):
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return self.compiled(*args, **kwargs)


class CompiledAtShapes:
    """A VAE part's call: static compiled code at the listed input shapes, the part's own eager call at any other
    (FLUX_COMPILE_VAE=hot). No request compiles, and no start waits minutes for a dynamic VAE graph."""

    def __init__(self, part: torch.nn.Module, shapes: set[tuple[int, ...]], options: dict):
        self.eager = part._call_impl
        self.compiled = torch.compile(self.eager, dynamic=False, options=options or None)
        self.shapes = shapes

    def __call__(self, *args, **kwargs):
        sample = args[0] if args else next(iter(kwargs.values()))
        run = self.compiled if tuple(sample.shape) in self.shapes else self.eager
        return run(*args, **kwargs)


def vae_hot_shapes(vae) -> dict[str, tuple[int, ...]]:
    """The encoder's and the decoder's input shapes for one 1024² image (warmup_shapes.HOT_SIZE)."""
    config = vae.config
    factor = 2 ** (len(config.block_out_channels) - 1)
    width, height = HOT_SIZE
    return {
        "Encoder": (1, config.in_channels, height, width),
        "Decoder": (1, config.latent_channels, height // factor, width // factor),
    }


class Compile(Optimization):
    name = "compile"
    # Everything that changes what a block computes comes first: the compiled graph holds it.
    after = (
        "fuse_qkv",
        "attention",
        "low_precision_gemm",
        "gelu_sigmoid_form",
        "fused_gelu_fp8",
        "fused_norm_rope",
        "lora",
    )
    undoable = True
    counters = True  # graphs compiled during each request (none, once warm-up covered its shape)

    def __init__(self, settings):
        super().__init__(settings)
        self._model: Model | None = None
        self._vae_parts: list[torch.nn.Module] = []
        self._compiled_at_apply = 0

    def decide(self, hardware: Hardware) -> Decision:
        if not hardware.is_cuda:
            return skip("compile is for the GPU path; the CPU demo runs eager")
        if not self.settings.compile:
            return skip("FLUX_COMPILE=false")
        return APPLY

    def inductor_options(self) -> dict:
        """Inductor configuration for this engine's compiled code only (passed per compile, not set globally).

        Multi-kernel: Inductor also generates a one-pass (persistent) version of each row reduction up to 16k wide
        and keeps whichever is faster at the first call (the FP8 row quantizations are such reductions). Off by
        default: with torch 2.11 a start that hits Inductor's on-disk cache fails to load the multi-kernel, and
        warm-up then undoes compile (BENCHMARKS.md)."""
        return {"triton.multi_kernel": 1} if self.settings.compile_multi_kernel else {}

    def apply(self, model: Model) -> Outcome:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
        # Before anything compiles (the first compile is warm-up's first call): where the caches go.
        caches = compile_cache.prepare(
            self.settings.compile_cache_dir,
            self.settings,
            model.hardware,
            getattr(model.pipe.transformer, "dtype", None),
        )
        self._model = model
        self._compiled_at_apply = graphs_compiled()
        transformer, vae = model.pipe.transformer, model.pipe.vae
        options, dynamic = self.inductor_options(), self.settings.compile_dynamic
        unbacked = dynamic and self.settings.compile_batch == "unbacked"
        first_single = transformer.single_transformer_blocks[0] if transformer.single_transformer_blocks else None
        for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
            model.slots.set(
                block,
                "compiled",
                lambda inner, joint=block is first_single: CompiledForward(
                    inner, options, self._fell_back, dynamic, unbacked, self._batch_fell_back, joint
                ),
            )
        vae_detail, vae_shapes = self._compile_vae(vae, options, dynamic)
        if dynamic:
            shapes = "compiled for dynamic batch and tokens: one graph per block kind serves every resolution"
            shapes += (
                " and every num_images (batch unbacked, FLUX_COMPILE_BATCH=unbacked)"
                if unbacked
                else ", one for one image and one for every larger batch (FLUX_COMPILE_BATCH=specialized)"
            )
        else:
            shapes = "static shapes (FLUX_COMPILE_DYNAMIC=false): each new shape compiles on its first call"
        return Outcome.applied(
            "regional torch.compile of the FluxTransformerBlock and FluxSingleTransformerBlock forward (default mode, "
            f"fullgraph{', Inductor multi-kernel' if options else ''}), {shapes}; {vae_detail}; " + caches.detail,
            **caches.data(),
            startup_decisions=self.decisions.report()["decisions"],
            dynamic_shapes=dynamic,
            batch=("unbacked" if unbacked else "specialized") if dynamic else "static",
            dynamic_dims={
                "transformer_blocks": {name: list(dims) for name, dims in BLOCK_DYNAMIC_DIMS.items()},
                **({"vae": ["batch", "height", "width"]} if self.settings.compile_vae == "all" else {}),
            }
            if dynamic
            else {},
            vae=self.settings.compile_vae,
            vae_compiled_shapes=vae_shapes,
            graphs_compiled=0,
        )

    def _compile_vae(self, vae, options: dict, dynamic: bool) -> tuple[str, dict | str]:
        """The VAE's encoder and decoder as FLUX_COMPILE_VAE says; (what the report says, the compiled shapes)."""
        mode = self.settings.compile_vae
        found = [part for part in (getattr(vae, "encoder", None), getattr(vae, "decoder", None)) if part is not None]
        self._vae_parts = [] if mode == "off" else found
        names = " and ".join(type(part).__name__ for part in found)
        if not found:
            return "no VAE encoder or decoder to compile", {}
        if mode == "off":
            return f"VAE {names} eager (FLUX_COMPILE_VAE=off)", {}
        if mode == "hot":
            hot = vae_hot_shapes(vae)
            for part in self._vae_parts:
                shape = hot[type(part).__name__]
                part._compiled_call_impl = CompiledAtShapes(part, {shape}, options)  # what Module.compile sets
            return (
                f"VAE {names} compiled (static) for one 1024² image, eager at other sizes and batches "
                "(FLUX_COMPILE_VAE=hot)",
                {type(part).__name__: list(hot[type(part).__name__]) for part in self._vae_parts},
            )
        for part in self._vae_parts:
            # The VAE's only varying dimensions are its input's batch, height and width (channels follow the weights).
            part.compile(dynamic=dynamic, options=options or None)
            if dynamic:  # what Module.compile set (undo clears it)
                part._compiled_call_impl = WithoutDuckSizing(part._compiled_call_impl)
        how = "for dynamic batch, height and width" if dynamic else "per shape"
        return f"VAE {names} compiled {how} (FLUX_COMPILE_VAE=all)", "all"

    @contextlib.contextmanager
    def active(self, job: Job, run: RequestRun):
        """Counts the graphs compiled while this request ran (0 when its shapes were already compiled)."""
        before = graphs_compiled()
        yield
        compiled = graphs_compiled() - before
        run.counters[self.name] = {"graphs_compiled": compiled}
        if compiled:
            self._note(graphs_compiled=graphs_compiled() - self._compiled_at_apply)

    def undo(self) -> None:
        self._model.slots.clear_everywhere("compiled")
        for part in self._vae_parts:
            part._compiled_call_impl = None  # what Module.compile() set: the module runs eager again
        torch._dynamo.reset()

    def _batch_fell_back(self, reason: str) -> None:
        """A block's traced code guards on its batch: it was compiled with the batch specialized instead (a graph for
        one image and one for larger batches). Counted in the report; warm-up's batch of two compiles the second."""
        fallen = self._data.get("blocks_batch_specialized", 0) + 1
        self._note(blocks_batch_specialized=fallen, batch_specialized_reason=reason)

    def _fell_back(self, reason: str) -> None:
        """A block hit dynamo's recompile limit and runs eager from now on: count it in the report."""
        fallen = self._data.get("blocks_running_eager", 0) + 1
        log.error("compile: a block fell back to eager (%d so far): %s", fallen, reason)
        base = self._detail.split(" | ")[0]
        self._note(blocks_running_eager=fallen, eager_fallback_reason=reason)
        self._record(
            self._status,
            f"{base} | {fallen} block(s) now run eager: dynamo's recompile limit was hit ({reason})",
        )
