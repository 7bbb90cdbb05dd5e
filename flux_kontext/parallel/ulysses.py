"""Ulysses sequence parallelism around our attention kernels: an all-to-all turns (my tokens, all heads) into (all
tokens, my heads), the kernel runs on whole sequences, and a second all-to-all brings the output back.

Why ours and not diffusers' ContextParallelConfig: diffusers' hooks split the transformer's inputs (we split at the
same place, with the same plan) but do the all-to-all inside its own ``dispatch_attention_fn``, which our
processor and the fused FP8 blocks never call: they call a KernelChoice (fa3_fp8, fa3, cudnn, sdpa). So the
all-to-alls wrap that choice (``UlyssesChoice``), and both callers get them without a change.

The collectives are torch's functional ones (``_functional_collectives``), which torch.compile traces inside a
block's graph (fullgraph). Uneven pieces (sharding.py) use all-to-all with split sizes.

The FP8 path of the fused blocks hands us e4m3 q and k (static scales: the same on every rank) and e4m3 v with a
per-head scale measured on this rank's tokens only. q and k travel as bytes; v is dequantized, travels in bf16 and
is quantized again per head over the whole sequence, as one GPU would (one more e4m3 rounding of v than there).
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from flux_kontext.optimizations.kernels.e4m3 import quantize_per_head


def _all_to_all(flat: torch.Tensor, output_splits, input_splits, group) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_to_all_single(flat, output_splits, input_splits, group))


def seq_to_heads(x: torch.Tensor, sizes: tuple[int, ...], rank: int, group) -> torch.Tensor:
    """(batch, my tokens, heads, dim) -> (batch, all tokens, heads / world, dim), ranks' tokens in rank order."""
    world = len(sizes)
    batch, tokens, heads, dim = x.shape
    per_rank = heads // world
    send = x.reshape(batch, tokens, world, per_rank, dim).permute(2, 0, 1, 3, 4).contiguous()
    chunk = batch * per_rank * dim
    if len(set(sizes)) == 1:
        received = _all_to_all(send.view(world, -1), None, None, group)
        received = received.view(world, batch, tokens, per_rank, dim).permute(1, 0, 2, 3, 4)
        return received.reshape(batch, world * tokens, per_rank, dim)
    received = _all_to_all(send.view(-1), [chunk * s for s in sizes], [chunk * tokens] * world, group)
    pieces = received.split([chunk * s for s in sizes])
    return torch.cat([p.view(batch, s, per_rank, dim) for p, s in zip(pieces, sizes, strict=True)], dim=1)


def heads_to_seq(y: torch.Tensor, sizes: tuple[int, ...], rank: int, group) -> torch.Tensor:
    """The inverse of seq_to_heads: (batch, all tokens, heads / world, dim) -> (batch, my tokens, heads, dim)."""
    world = len(sizes)
    batch, _, per_rank, dim = y.shape
    mine = sizes[rank]
    chunk = batch * per_rank * dim
    if len(set(sizes)) == 1:
        send = y.reshape(batch, world, mine, per_rank, dim).permute(1, 0, 2, 3, 4).contiguous()
        received = _all_to_all(send.view(world, -1), None, None, group)
    else:
        send = torch.cat([p.contiguous().view(-1) for p in y.split(list(sizes), dim=1)])
        received = _all_to_all(send, [chunk * mine] * world, [chunk * s for s in sizes], group)
    received = received.view(world, batch, mine, per_rank, dim).permute(1, 2, 0, 3, 4)
    return received.reshape(batch, mine, world * per_rank, dim)


class UlyssesChoice:
    """A KernelChoice seen through Ulysses: the same kernels, policy and per-request switches (every attribute is
    the wrapped choice's), with the all-to-alls around each call. ``plan`` is the current transformer call's
    SequencePlan (set by transformer.py around each call)."""

    def __init__(self, choice, group, rank: int, world_size: int):
        self.__dict__.update(_inner=choice, _group=group, _rank=rank, _world=world_size, plan=None)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        if name == "plan":
            self.__dict__["plan"] = value
        else:
            setattr(self._inner, name, value)

    def _sizes(self, tokens: int) -> tuple[int, ...]:
        plan = self.plan
        if plan is None or plan.joint[self._rank] != tokens:
            raise RuntimeError(
                f"context parallelism: attention over {tokens} local tokens outside a sharded transformer call "
                f"(plan {plan})"
            )
        return plan.joint

    def __call__(self, q, k, v, attn=None):
        sizes = self._sizes(q.shape[1])
        packed = torch.cat([q, k, v], dim=2)  # one all-to-all for the three: (batch, tokens, 3 * heads, dim)
        whole = seq_to_heads(_interleave_heads(packed, 3, self._world), sizes, self._rank, self._group)
        q, k, v = _deinterleave_heads(whole, 3)
        out = self._inner(q, k, v, attn)
        return heads_to_seq(out, sizes, self._rank, self._group)

    def fp8_call(self, q8, k8, v8, q_descale, k_descale, v_descale):
        sizes = self._sizes(q8.shape[1])
        per_rank = q8.shape[2] // self._world
        heads = slice(self._rank * per_rank, (self._rank + 1) * per_rank)
        qk = torch.cat([q8.view(torch.uint8), k8.view(torch.uint8)], dim=2)
        qk = seq_to_heads(_interleave_heads(qk, 2, self._world), sizes, self._rank, self._group)
        q8, k8 = (t.view(torch.float8_e4m3fn) for t in _deinterleave_heads(qk, 2))
        v = (v8.float() * v_descale[:, None, :, None]).to(torch.bfloat16)
        v8, v_descale = quantize_per_head(seq_to_heads(v, sizes, self._rank, self._group))
        out = self._inner.fp8_call(
            q8, k8, v8, q_descale[:, heads].contiguous(), k_descale[:, heads].contiguous(), v_descale
        )
        return heads_to_seq(out, sizes, self._rank, self._group)


def _interleave_heads(packed: torch.Tensor, parts: int, world: int) -> torch.Tensor:
    """(batch, tokens, parts * heads, dim) with the parts one after the other -> heads ordered so that each rank's
    contiguous slice of heads holds its heads of every part: [q_r, k_r, v_r] for rank r."""
    batch, tokens, total, dim = packed.shape
    heads = total // parts
    grouped = packed.view(batch, tokens, parts, world, heads // world, dim).transpose(2, 3)
    return grouped.reshape(batch, tokens, total, dim)


def _deinterleave_heads(whole: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    """This rank's (batch, tokens, parts * heads / world, dim) -> ``parts`` tensors of its heads."""
    return tuple(t.contiguous() for t in whole.chunk(parts, dim=2))
