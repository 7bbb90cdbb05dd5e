"""attention: our FLUX attention processor with a pluggable kernel, the kernel picked by measurement.

Layout of this package: kernels.py (the kernels and the per-engine KernelChoice), processor.py (the processor and
the static FP8 q/k scales), selection.py (check and time the candidates, pick the fastest), fp8_screen.py (may FA3
in FP8 serve these weights?). Its companion optimization flash_attention_3 reports FlashAttention 3's state and
turns it off per request (``use_flash_attention``).

Before quantization and compile: the compiled graph holds the kernel call. `use_flash_attention: false` switches a
request to the fastest non-FA3 kernel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from flux_kontext.optimizations.attention.fp8_policy import (
    Fp8Policy,
    describe_screen,
    fp8_verdict,
    install_sigma_switch,
    mark_bf16_layers,
    number_attention_layers,
)
from flux_kontext.optimizations.attention.fp8_screen import screen_fp8_attention
from flux_kontext.optimizations.attention.kernels import FA3_FP8, KernelChoice, sdpa
from flux_kontext.optimizations.attention.processor import install, register_fp8_qk_scales
from flux_kontext.optimizations.attention.selection import (
    TIMING_TOKENS,
    candidates,
    measure_kernels,
    select_kernel,
    summary,
)
from flux_kontext.stack import Model, Optimization, Outcome

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """What start-up decided, read by flash_attention_3 for its own report."""

    best: str  # fastest bf16 kernel (fa3 only with its margin)
    mode: str  # FLUX_FP8_ATTENTION
    measured: dict = field(default_factory=dict)
    rejected: dict = field(default_factory=dict)
    within_noise: bool = False  # FA3 was fastest, but not by FA3_MIN_GAIN


class Attention(Optimization):
    name = "attention"
    after = ("fuse_qkv",)  # the processor reads the fused to_qkv where there is one

    def __init__(self, settings):
        super().__init__(settings)
        self.choice: KernelChoice | None = None
        self.selection: Selection | None = None

    def apply(self, model: Model) -> Outcome:
        transformer, setting = model.pipe.transformer, self.settings.attention
        if not model.hardware.is_cuda:
            if setting not in ("auto", "sdpa"):
                raise ValueError(f"FLUX_ATTENTION={setting} needs a CUDA GPU")
            self.choice = KernelChoice(kernels={"sdpa": sdpa})
            self.selection = Selection(best="sdpa", mode=self.settings.fp8_attention)
            install(transformer, self.choice)
            return Outcome.applied("PyTorch scaled_dot_product_attention on CPU")
        # Where the candidates are timed: the current GPU (the transformer may be streamed from host memory); the
        # transformer's own device where torch has no CUDA (the CPU tests of this path, with stand-in kernels).
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else next(transformer.parameters()).device
        )
        mode = self.settings.fp8_attention
        usable, measured, rejected = self._measured_kernels(setting, device, fp8=mode != "off")
        timing = {name: sum(m[f"ms_{t}"] for t in TIMING_TOKENS) for name, m in measured.items() if name != FA3_FP8}
        if not timing:
            raise RuntimeError(f"no usable attention kernel for FLUX_ATTENTION={setting}: {rejected}")
        best, fallback, within_noise = select_kernel(timing)
        self.choice = KernelChoice(kernels=usable, active=best, fallback=fallback)
        self.selection = Selection(best, mode, measured, rejected, within_noise)
        install(transformer, self.choice)
        tokens = "/".join(str(t) for t in TIMING_TOKENS)
        detail = f"{best} (fastest at {tokens} tokens; measured {summary(measured)})"
        if FA3_FP8 in usable:
            detail = self._screen_fp8(transformer, measured, detail)
        elif mode != "off":
            detail += f"; FA3 in FP8 not usable: {rejected.get(FA3_FP8)}"
            if mode == "on":
                log.warning("FLUX_FP8_ATTENTION=on but FA3 in FP8 is not usable: %s", rejected.get(FA3_FP8))
        detail += self.decisions.note(self.name)
        return Outcome.applied(
            detail, measured=measured, rejected=rejected, decisions=self.decisions.describe(self.name)
        )

    def _measured_kernels(self, setting: str, device, fp8: bool) -> tuple[dict, dict, dict]:
        """``measure_kernels``, or its measurements read back from a kept cache (startup_decisions.py) while every
        kernel they name can still be loaded."""
        kernels, _ = candidates(setting, fp8)

        def measure() -> dict:
            _, measured, rejected = measure_kernels(setting, device, fp8)
            return {"measured": measured, "rejected": rejected}

        value, _ = self.decisions.cached_or_measured(
            self.name, measure, "kernels", valid=lambda kept: set(kept["measured"]) <= set(kernels)
        )
        measured = value["measured"]  # the usable kernels: those measured (measure_kernels rejects the others)
        return {name: kernels[name] for name in measured}, measured, value["rejected"]

    def _screen(self, transformer) -> dict:
        """The FP8 screen against the active bf16 kernel, or its result read back for the same kernel."""
        value, _ = self.decisions.cached_or_measured(
            self.name,
            lambda: {"bf16": self.choice.active, "screen": screen_fp8_attention(transformer, self.choice)},
            "fp8_screen",
            valid=lambda kept: kept["bf16"] == self.choice.active,
        )
        return value["screen"]

    def _screen_fp8(self, transformer, measured: dict, detail: str) -> str:
        """Run the FP8 screen (several sigmas); make FA3 in FP8 the active kernel where the layers and steps the
        policy serves in FP8 pass it (or FLUX_FP8_ATTENTION=on). Its bf16 layers and steps use the best bf16 kernel."""
        mode, limit = self.settings.fp8_attention, self.settings.fp8_max_layer_error
        register_fp8_qk_scales(transformer)
        self.choice.policy = Fp8Policy.from_settings(self.settings, number_attention_layers(transformer))
        mark_bf16_layers(transformer, self.choice.policy)
        self.choice.bf16 = self.choice.active
        screen = self._screen(transformer)
        verdict = fp8_verdict(screen, self.choice.policy, mode, limit)
        measured[FA3_FP8]["screen"] = screen
        measured[FA3_FP8]["policy"] = {**self.choice.policy.describe(), **verdict}
        text = describe_screen(screen, self.choice.policy, verdict)
        if not verdict["use"]:
            return f"{detail}; FA3 in FP8 not used: {text}"
        self.choice.active = FA3_FP8
        if self.choice.policy.per_step:
            install_sigma_switch(transformer, self.choice)
        return f"fa3_fp8 (FLUX_FP8_ATTENTION={mode}: {text}; measured {summary(measured)})"


__all__ = ["FA3_FP8", "Attention", "KernelChoice", "Selection"]
