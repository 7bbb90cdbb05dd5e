"""The transformer's forward on this rank's shard: split the inputs, run, gather the output (diffusers' own context
parallel plan for FLUX splits and gathers at the same places: ``FluxTransformer2DModel._cp_plan``).

Split: the image tokens (``hidden_states``, ``img_ids``) and the text tokens (``encoder_hidden_states``, ``txt_ids``)
along the sequence (sharding.py). RoPE is computed inside the forward from the ids each rank keeps, so every token
is rotated by its own position. The time, guidance and pooled embeddings are the same on every rank. Gathered: the
output's image tokens, which every rank then needs for the scheduler step (every rank keeps the whole latents).
"""

from __future__ import annotations

from diffusers.models.modeling_outputs import Transformer2DModelOutput

from flux_kontext.parallel.sharding import SequencePlan, gather, shard


def install_sharded_forward(transformer, choice, group, rank: int, world_size: int):
    """Wrap ``transformer.forward`` (this instance) so each call runs on this rank's tokens; ``choice`` (a
    UlyssesChoice) learns each call's plan. Returns the undo."""
    original = transformer.forward

    def sharded_forward(*args, **kwargs):
        if args:
            raise TypeError("context parallelism: call the transformer with keyword arguments")
        hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        plan = SequencePlan.for_lengths(rank, world_size, text.shape[1], hidden.shape[1])
        img_ids, txt_ids = (_two_dims(kwargs[name]) for name in ("img_ids", "txt_ids"))
        kwargs.update(
            hidden_states=shard(hidden, 1, plan.image, rank),
            encoder_hidden_states=shard(text, 1, plan.text, rank),
            img_ids=shard(img_ids, 0, plan.image, rank),
            txt_ids=shard(txt_ids, 0, plan.text, rank),
        )
        return_dict = kwargs.pop("return_dict", True)
        choice.plan = plan
        try:
            output = original(**kwargs, return_dict=False)[0]
        finally:
            choice.plan = None
        whole = gather(output, 1, plan.image, group)
        return Transformer2DModelOutput(sample=whole) if return_dict else (whole,)

    transformer.forward = sharded_forward

    def undo():
        del transformer.forward  # the class's forward again (the instance attribute was ours)

    return undo


def _two_dims(ids):
    """diffusers still accepts (1, tokens, 3) ids (deprecated) and squeezes them in the forward; do it first."""
    return ids[0] if ids.ndim == 3 else ids
