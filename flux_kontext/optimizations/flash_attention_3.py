"""flash_attention_3: FlashAttention 3's state on this server (bf16 or FP8), and the seed's per-request switch.

The attention optimization measures and picks the kernel; this one reports what that means for FA3 and honours
``use_flash_attention: false`` by switching the request to the fastest non-FA3 kernel. Setting for the FP8 tier:
FLUX_FP8_ATTENTION (auto | on | off), and what stays bf16 under it: FLUX_FP8_ATTENTION_BF16_BLOCKS and
FLUX_FP8_ATTENTION_BF16_BELOW_SIGMA (attention/fp8_policy.py). Its report carries the start-up screen per sigma and
per layer (``fp8_screen``) and the policy it was judged under (``fp8_policy``), so /health shows both.
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
        screened = fp8_screen_report(selection)
        if choice.active in (FA3_FP8, "fa3"):  # switchable per request: CUDA graphs key their captures on it
            model.graph_variants.append(choice.graph_variant)
        if choice.active == FA3_FP8:
            self._choice = choice
            return Outcome.applied(
                f"FA3 in FP8 (FLUX_FP8_ATTENTION={selection.mode}): e4m3 q/k with static scales from their RMSNorm "
                f"bound, v with per-head scales; {kept_in_bf16(choice)}; per request falls back to {choice.fallback} "
                "in bf16",
                **screened,
            )
        if choice.active == "fa3":
            self._choice = choice
            return Outcome.applied(f"fa3 kernel active; per request falls back to {choice.fallback}", **screened)
        if "fa3" in choice.kernels:
            margin = f"not {FA3_MIN_GAIN:.0%} faster than" if selection.within_noise else "measured slower than"
            return Outcome.skipped(f"{margin} {choice.active} on this GPU ({summary(selection.measured)})")
        if setting not in ("auto", "fa3"):
            return Outcome.skipped(f"FLUX_ATTENTION={setting}")
        why = selection.rejected.get("fa3")
        return Outcome("unavailable", f"FlashAttention 3 not usable: {why}; using {choice.active}")

    def switched_off(self):
        return None if self._choice is None else self._choice.use(self._choice.fallback)


def fp8_screen_report(selection) -> dict:
    """The FP8 screen's figures for /health (per sigma, per layer, the worst pairs) and the policy, if it ran."""
    fp8 = selection.measured.get(FA3_FP8, {})
    screen = fp8.get("screen")
    if screen is None:
        return {}
    keys = ("sigmas", "per_sigma", "per_layer_max", "worst", "layer_errors")
    return {"fp8_screen": {key: screen[key] for key in keys}, "fp8_policy": fp8.get("policy", {})}


def kept_in_bf16(choice) -> str:
    policy, kernel = choice.policy, choice.bf16 or choice.fallback
    kept = [f"layers {sorted(policy.bf16_layers)}"] if policy.bf16_layers else []
    if policy.per_step:
        kept.append(f"steps below sigma {policy.bf16_below_sigma:g}")
    return f"{' and '.join(kept)} in bf16 ({kernel})" if kept else "every layer and step in FP8"
