"""Deconstructing Attention's StaticEmbQK variant (Xue, Moosavi, Aletras, arXiv 2510.11602, Eq. 13): queries and
keys from the uncontextualised input embeddings instead of the layer's hidden state (relaxes "current QK"):

    e = Emb(t)                          (the model's token embeddings, `ForwardContext.input_embeddings_BTD`)
    Q = RoPE(norm(e) W_Q),  K = RoPE(norm(e) W_K),  V = H W_V
    O = softmax(Q K^T / sqrt(E) + causal mask) V,  y = concat_h(O_h) W_O

The map depends on the input but not on context, so every layer's scores could be computed in parallel. `norm`
is an RMSNorm of this layer (`normalize_embeddings`; whether the paper normalises e is not stated: with pre-norm
blocks the hidden state the other projections see is normalised too). MHA; softmax, the KV cache, decode,
diagnostics and FLOPs are GQA's (attnzoo.mixers.gqa).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from attnzoo.cache import KVCache
from attnzoo.config import ModelConfig
from attnzoo.layers import RMSNorm, softmax_map
from attnzoo.mixers.base import ForwardContext, MixerOutput, SharedParams
from attnzoo.mixers.gqa import GQAOptions, GQAttention
from attnzoo.registry import register


@dataclasses.dataclass(frozen=True)
class DeconStaticEmbQKOptions(GQAOptions):
    """GQA's options (MHA by default), and normalize_embeddings: RMSNorm on the embeddings before W_Q, W_K."""

    normalize_embeddings: bool = True


class DecoupledQKAttention(GQAttention):
    """Softmax attention whose queries and keys come from another stream than its values (`qk_source`)."""

    def qk_source(self, x_BTD, ctx: ForwardContext):
        raise NotImplementedError(f"{type(self).__name__} must say which stream its queries and keys come from")

    def queries_keys(self, x_BTD, ctx: ForwardContext):
        """q [B,T,H,E] and k [B,T,K,E] after QK-norm and RoPE, from `qk_source`."""
        source_BTD = self.qk_source(x_BTD, ctx)
        q_BTHE, k_BTKE, _ = self.project(source_BTD)
        return self.position_qk(q_BTHE, k_BTKE, ctx.positions_BT)

    def __call__(self, x_BTD, ctx: ForwardContext, cache: KVCache | None = None) -> MixerOutput:
        b, t, _ = x_BTD.shape
        q_BTHE, k_BTKE = self.queries_keys(x_BTD, ctx)
        v_BTKE = self.v_proj(x_BTD).reshape(b, t, self.n_kv_heads, self.head_dim)
        o_BTHE, cache, metrics = self.attend(q_BTHE, k_BTKE, v_BTKE, ctx, cache)
        return MixerOutput(self.output(o_BTHE), cache, metrics=metrics)

    def attention_map(self, x_BTD, ctx: ForwardContext):
        """The causal softmax map A [B,H,T,T] and its pre-softmax logits (for the indicators)."""
        return softmax_map(*self.queries_keys(x_BTD, ctx), self.head_dim**-0.5)


@register("decon_static_emb_qk", options=DeconStaticEmbQKOptions, n_kv_heads="all")
class DeconStaticEmbQK(DecoupledQKAttention):
    def __init__(self, config: ModelConfig, options: DeconStaticEmbQKOptions, *,
                 shared: SharedParams | None = None, rngs: nnx.Rngs):
        super().__init__(config, options, shared=shared, rngs=rngs)
        self.embedding_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=jnp.dtype(
            config.param_dtype)) if options.normalize_embeddings else None

    def qk_source(self, x_BTD, ctx: ForwardContext):
        if ctx.input_embeddings_BTD is None:
            raise ValueError("decon_static_emb_qk needs the input embeddings (ForwardContext.input_embeddings_BTD)")
        e_BTD = ctx.input_embeddings_BTD
        return e_BTD if self.embedding_norm is None else self.embedding_norm(e_BTD)
