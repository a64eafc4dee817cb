"""Per-layer attention indicators from explicit maps, for analysis studies (Deconstructing Attention, arXiv
2510.11602, Sec. 4.4), on short evaluation sequences (they materialise [B, H, T, T] per layer).

For a causal map A (rows i, keys j <= i; o = A v) and its pre-softmax logits, averaged over batch and heads:

    sink_share   mean_i A[i, 0]
    entropy      mean_i -sum_j P_ij log P_ij, P_ij = A_ij / sum_j A_ij   (nats, <= ln T; non-negative maps
                 only, else None: a map that is not a softmax, e.g. Approx.'s, is normalised per row first, so
                 the value stays the entropy of a distribution over the visible keys)
    conc         mean ||A||_F
    head_div     mean over the T (T + 1) / 2 causal (i, j) of the standard deviation of A_ij across heads
    locfoc_N     mean_i A[i, i - N] over the rows that have one, N = 0..3
    max_logit    max |logit| over visible entries

The paper min-max normalises entropy, conc and head_div across its models; these are the raw values.
A mixer exposes its map through `attention_map(x_BTD, ctx) -> (A [B,H,T,T], logits [B,H,T,T])` (the
Deconstructing Attention mixers); plain GQA / MHA / MQA maps are computed here; other mixers have none.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from attnzoo.layers import softmax_map
from attnzoo.mixers.base import ForwardContext
from attnzoo.mixers.gqa import GQAttention
from attnzoo.model import LanguageModel

LOCAL_OFFSETS = (0, 1, 2, 3)
INDICATORS = ("sink_share", "entropy", "conc", "head_div", *(f"locfoc_{n}" for n in LOCAL_OFFSETS), "max_logit")


def attention_map(mixer, x_BTD, ctx: ForwardContext):
    """(A [B,H,T,T], logits [B,H,T,T]) of the mixer on its input, or None for a mixer without a softmax-like map."""
    if hasattr(mixer, "attention_map"):
        return mixer.attention_map(x_BTD, ctx)
    if type(mixer) is GQAttention and mixer.window is None and mixer.soft_cap is None:
        q_BTHE, k_BTKE, _ = mixer.project(x_BTD)
        return softmax_map(*mixer.position_qk(q_BTHE, k_BTKE, ctx.positions_BT), mixer.head_dim**-0.5)
    return None


def map_indicators(a_BHTS, logits_BHTS) -> dict[str, float | None]:
    """The indicators of one causal map (see the module docstring)."""
    t = a_BHTS.shape[-1]
    a_BHTS = a_BHTS.astype(jnp.float32)
    causal_TS = jnp.tril(jnp.ones((t, t), bool))
    positive = bool(jnp.all(a_BHTS >= 0))
    row_sums = jnp.sum(a_BHTS, axis=-1, keepdims=True)
    p_BHTS = a_BHTS / jnp.where(row_sums > 0, row_sums, 1.0)
    plogp = jnp.where(p_BHTS > 0, p_BHTS * jnp.log(jnp.where(p_BHTS > 0, p_BHTS, 1.0)), 0.0)
    out = {"sink_share": jnp.mean(a_BHTS[..., 0]),
           "entropy": -jnp.mean(plogp.sum(-1)) if positive else None,
           "conc": jnp.mean(jnp.sqrt(jnp.sum(a_BHTS**2, axis=(-2, -1)))),
           "head_div": jnp.sum(jnp.where(causal_TS, jnp.std(a_BHTS, axis=1), 0.0), axis=(-2, -1)).mean()
           / (t * (t + 1) / 2)}
    for n in LOCAL_OFFSETS:
        out[f"locfoc_{n}"] = jnp.mean(jnp.diagonal(a_BHTS, offset=-n, axis1=-2, axis2=-1)) if n < t else None
    out["max_logit"] = jnp.max(jnp.where(causal_TS, jnp.abs(logits_BHTS), 0.0))
    return {name: None if value is None else float(value) for name, value in out.items()}


def layer_indicators(model: LanguageModel, tokens_BT) -> dict[str, float | None]:
    """`layer<i>/<indicator>` for every layer (None where a layer has no map), from one full forward of
    `tokens_BT`; the layer inputs are computed as `LanguageModel.__call__` does in mode "full" (with the model's
    fixed side stream, if any)."""
    b, t = tokens_BT.shape
    x_BTD = model.embed(tokens_BT)
    ctx = ForwardContext("full", jnp.broadcast_to(jnp.arange(t), (b, t)), input_embeddings_BTD=x_BTD)
    side, side_ctx = model.side_stream(), None
    if side is not None:
        side_ctx = ForwardContext("full", jnp.broadcast_to(jnp.arange(side.shape[1]), side.shape[:2]),
                                  input_embeddings_BTD=side)
    out = {}
    for i, block in enumerate(model.blocks):
        layer_ctx = ctx if side is None else dataclasses.replace(ctx, side_BSD=block.mixer_norm(side))
        found = attention_map(block.mixer, block.mixer_norm(x_BTD), layer_ctx)
        values = map_indicators(*found) if found is not None else dict.fromkeys(INDICATORS)
        out.update({f"layer{i}/{name}": value for name, value in values.items()})
        x_BTD, _ = block(x_BTD, layer_ctx)
        if side is not None:
            side, _ = block(side, side_ctx)
    return out

