"""How the joint token sequence is split across ranks, and how the output comes back together.

The text tokens and the image tokens (with the context image's, for an edit) are split separately, in contiguous
pieces, as evenly as they go: a length that does not divide the world size gives the first ranks one token more
(no padding, so nothing needs masking and every attention kernel, FA3 and cuDNN included, runs unchanged). Each
rank's attention sequence is its text piece then its image piece; after Ulysses' all-to-all a rank holds every
rank's piece for its heads, in rank order. Attention without a mask does not depend on the order of the keys, and
each query's output goes back to the rank it came from, so the result is the single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def split_sizes(length: int, world_size: int) -> tuple[int, ...]:
    """Contiguous piece lengths of ``length`` tokens over ``world_size`` ranks: the first ``length % world_size``
    get one more."""
    base, extra = divmod(length, world_size)
    return tuple(base + (1 if rank < extra else 0) for rank in range(world_size))


@dataclass(frozen=True)
class SequencePlan:
    """One transformer call's split: text and image piece lengths per rank."""

    rank: int
    text: tuple[int, ...]
    image: tuple[int, ...]

    @classmethod
    def for_lengths(cls, rank: int, world_size: int, text_tokens: int, image_tokens: int) -> SequencePlan:
        return cls(rank, split_sizes(text_tokens, world_size), split_sizes(image_tokens, world_size))

    @property
    def joint(self) -> tuple[int, ...]:
        """Each rank's attention sequence length (its text piece + its image piece)."""
        return tuple(t + i for t, i in zip(self.text, self.image, strict=True))

    @property
    def even(self) -> bool:
        return len(set(self.joint)) == 1

    def public(self) -> dict:
        return {"text_tokens_per_rank": list(self.text), "image_tokens_per_rank": list(self.image)}


def shard(tensor: torch.Tensor, dim: int, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    """This rank's contiguous piece of ``tensor`` along ``dim``."""
    start = sum(sizes[:rank])
    return tensor.narrow(dim, start, sizes[rank])


def gather(tensor: torch.Tensor, dim: int, sizes: tuple[int, ...], group) -> torch.Tensor:
    """Every rank's piece along ``dim`` (lengths ``sizes``), concatenated in rank order, on every rank. Pieces of
    unequal length are padded to the longest for the collective and trimmed after."""
    longest = max(sizes)
    local = tensor.contiguous()
    if local.shape[dim] < longest:
        pad_shape = list(local.shape)
        pad_shape[dim] = longest - local.shape[dim]
        local = torch.cat([local, local.new_zeros(pad_shape)], dim=dim)
    pieces = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(pieces, local, group=group)
    return torch.cat([piece.narrow(dim, 0, size) for piece, size in zip(pieces, sizes, strict=True)], dim=dim)
