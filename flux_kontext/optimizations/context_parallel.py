"""context_parallel: each generation's transformer runs on every rank of a parallel service, each rank on its share
of the tokens (flux_kontext/parallel/): Ulysses all-to-alls around our attention kernels, the inputs split and the
output gathered around the transformer's forward.

After attention and the fused FP8 blocks (both call the KernelChoice it wraps) and LoRA; before compile (the
all-to-alls are traced into each block's graph), CUDA graphs and the first-block cache (whose per-step decision it
makes global: every rank must skip the same steps).

Applied only in a parallel service: its engine attaches the process group before the stack is applied.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from flux_kontext.stack import Decision, Hardware, Model, Optimization, Outcome, skip

AGREED_FIELDS = ("active", "fallback", "bf16")  # the kernel choice every rank must share (the same collectives)


class ContextParallel(Optimization):
    name = "context_parallel"
    after = ("attention", "flash_attention_3", "low_precision_gemm", "fused_norm_rope", "fused_gelu_fp8", "lora")

    def __init__(self, settings):
        super().__init__(settings)
        self.group = None  # a flux_kontext.parallel.group.ParallelGroup, from the parallel engines
        self.choice = None

    def attach(self, group) -> None:
        self.group = group

    def decide(self, hardware: Hardware) -> Decision:
        if self.group is None or self.group.world_size == 1:
            return skip("one process (FLUX_PARALLEL=1, no torchrun)")
        return super().decide(hardware)

    def apply(self, model: Model) -> Outcome:
        from flux_kontext.parallel.transformer import install_sharded_forward
        from flux_kontext.parallel.ulysses import UlyssesChoice

        transformer, group = model.pipe.transformer, self.group
        heads, world = transformer.config.num_attention_heads, group.world_size
        if heads % world:
            return Outcome("unavailable", f"Ulysses needs the {heads} heads to divide among {world} ranks")
        attention = model.earlier.get("attention")
        if attention is None or attention.choice is None:
            raise RuntimeError("context parallelism needs our attention processor (the attention optimization)")
        agreed = self._agree_with_rank_0(attention.choice)
        self.choice = UlyssesChoice(attention.choice, group.compute, group.rank, world)
        for processor in transformer.attn_processors.values():
            processor.choice = self.choice  # our processor's; the fused blocks read it from there (kernel_choice)
        install_sharded_forward(transformer, self.choice, group.compute, group.rank, world)
        return Outcome.applied(
            f"Ulysses over {world} ranks ({group.backend}, {group.ranks.launcher}): text and image tokens split "
            f"across ranks (uneven where they do not divide, no padding), q/k/v all-to-all to whole sequences x "
            f"{heads // world} heads around the {agreed['active']} kernel, output gathered on every rank",
            **group.describe(),
            rank=group.rank,
            heads_per_rank=heads // world,
            kernel_choice=agreed,
        )

    def _agree_with_rank_0(self, choice) -> dict:
        """Every rank takes rank 0's kernel choice (start-up timing can differ per GPU, and FP8 against bf16
        attention moves different bytes through the all-to-all: the ranks must agree)."""
        mine = [{name: getattr(choice, name) for name in AGREED_FIELDS}]
        dist.broadcast_object_list(mine, src=0, group=self.group.control)
        for name, value in mine[0].items():
            if value is not None and value not in choice.kernels:
                raise RuntimeError(f"rank 0 chose attention kernel {value!r}, not available on rank {self.group.rank}")
            setattr(choice, name, value)
        return mine[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (the first-block cache's decision)."""
        dist.all_reduce(tensor, group=self.group.compute)
        return tensor
