"""channels_last: the VAE's weights in channels-last layout, only when asked.

Off by default: our eager VAE decode measured slower with it (docs/FACTS.md); compiled, no faster.
"""

from __future__ import annotations

import torch

from flux_kontext.stack import APPLY, Decision, Hardware, Model, Optimization, Outcome, skip


class ChannelsLast(Optimization):
    name = "channels_last"

    def decide(self, hardware: Hardware) -> Decision:
        if not hardware.is_cuda:
            return skip("a GPU layout; the CPU demo keeps the default")
        if not self.settings.channels_last:
            return skip("measured slower for the VAE decode on H100 (FLUX_CHANNELS_LAST=true to force)")
        return APPLY

    def apply(self, model: Model) -> Outcome:
        model.pipe.vae.to(memory_format=torch.channels_last)
        return Outcome.applied("VAE weights in channels-last (FLUX_CHANNELS_LAST=true)")
