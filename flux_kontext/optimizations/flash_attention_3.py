"""flash_attention_3: FlashAttention 3's state on this server (bf16 or FP8), and the seed's per-request switch.

The attention optimization measures and picks the kernel; this one reports what that means for FA3 and honours
``use_flash_attention: false`` by switching the request to the fastest non-FA3 kernel. Setting for the FP8 tier:
FLUX_FP8_ATTENTION (auto | on | off).
"""

from __future__ import annotations

from flux_kontext.optimizations.attention.kernels import FA3_FP8
from flux_kontext.optimizations.attention.selection import FA3_MIN_GAIN, summary
from flux_kontext.stack import APPLY, Decision, Hardware, Model, Optimization, Outcome, unavailable


class FlashAttention3(Optimization):
    name = "flash_attention_3"
    flag = "use_flash_attention"
    after = ("attention",)
    requires = ("attention",)

    def __init__(self, settings):
        super().__init__(settings)
        self._choice = None

    def decide(self, hardware: Hardware) -> Decision:
        if not hardware.is_cuda:
            return unavailable("FlashAttention 3 needs an NVIDIA Hopper GPU (sm_90); this is a CPU")
        return APPLY

    def apply(self, model: Model) -> Outcome:
        attention = model.earlier["attention"]
        choice, selection, setting = attention.choice, attention.selection, self.settings.attention
        if choice.active == FA3_FP8:
            self._choice = choice
            return Outcome.applied(
                f"FA3 in FP8 (FLUX_FP8_ATTENTION={selection.mode}): e4m3 q/k with static scales from their RMSNorm "
                f"bound, v with per-head scales; per request falls back to {choice.fallback} in bf16"
            )
        if choice.active == "fa3":
            self._choice = choice
            return Outcome.applied(f"fa3 kernel active; per request falls back to {choice.fallback}")
        if "fa3" in choice.kernels:
            margin = f"not {FA3_MIN_GAIN:.0%} faster than" if selection.within_noise else "measured slower than"
            return Outcome.skipped(f"{margin} {choice.active} on this GPU ({summary(selection.measured)})")
        if setting not in ("auto", "fa3"):
            return Outcome.skipped(f"FLUX_ATTENTION={setting}")
        why = selection.rejected.get("fa3")
        return Outcome("unavailable", f"FlashAttention 3 not usable: {why}; using {choice.active}")

    def switched_off(self):
        return None if self._choice is None else self._choice.use(self._choice.fallback)
