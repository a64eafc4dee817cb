"""Deconstructing Attention's RndEmbQK and FixedSeqQK variants (Xue, Moosavi, Aletras, arXiv 2510.11602, Eqs.
9-12): the attention map comes from a fixed sequence run through the same stack beside the batch, so it does not
depend on the input (relaxes sequence-dependency); only the values do:

    X^(l) = hidden state at layer l of the fixed stream (normalised as the mixer input),
    Q = RoPE(X^(l) W_Q),  K = RoPE(X^(l) W_K),  V = H W_V              (H: this layer's input, per sequence)
    O = softmax(Q K^T / sqrt(E) + causal mask) V,  y = concat_h(O_h) W_O

decon_rnd_emb_qk (Eqs. 9-10): the fixed stream starts from random embeddings eps ~ N(0, sigma^2 I) (seeded,
constant across inputs and steps; sigma is not stated in the paper: default 0.02, the token embeddings' init).
decon_fixed_seq_qk (Eqs. 11-12): it starts from Emb(t_s), a fixed text (the paper: the first 2048 tokens of
FineWeb; here FIXED_TEXT, the opening of Genesis in the KJV, 2,105 UTF-8 bytes, as token ids = bytes modulo
vocab_size (exactly the text with attnzoo's byte tokenizer), repeated if max_seq_len is longer).

The stream is the model's own: the mixer asks for it through `make_shared` (key attnzoo.mixers.base.SIDE_STREAM, a
`FixedSideStream` of max_seq_len positions holding non-trainable constants), and the model runs it through every
layer beside the batch, handing each mixer its normalised hidden state as `ForwardContext.side_BSD`. Gradients
flow through it into earlier layers (W_Q, W_K learn only through it). Inside the stream's own pass (side_BSD is
None) the layer attends with its own q/k: the stream is an extra batch row, as in the paper. Query i and key j
of the map are the stream's positions i and j (each sequence's token positions, so packed documents each start
at the map's row 0); decoding gathers the map's row at the new position (the stream is fixed, so decode is
exact), the KV cache holding the stream's keys beside the sequence's values. Softmax, cache, diagnostics and
FLOPs are GQA's (the stream's own forward is not counted, as it is one extra row per batch).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.cache import KVCache
from attnzoo.config import ModelConfig
from attnzoo.mixers.base import SIDE_STREAM, ForwardContext, SharedParams, reject_unused
from attnzoo.mixers.decon_static_emb_qk import DecoupledQKAttention
from attnzoo.mixers.gqa import GQAOptions
from attnzoo.registry import get_mixer, register

SOURCES = ("random", "text")

FIXED_TEXT = (
    'In the beginning God created the heaven and the earth. And the earth was without form, and void; and '
    'darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God'
    ' said, Let there be light: and there was light. And God saw the light, that it was good: and God divided'
    ' the light from the darkness. And God called the light Day, and the darkness he called Night. And the '
    'evening and the morning were the first day. And God said, Let there be a firmament in the midst of the '
    'waters, and let it divide the waters from the waters. And God made the firmament, and divided the waters'
    ' which were under the firmament from the waters which were above the firmament: and it was so. And God '
    'called the firmament Heaven. And the evening and the morning were the second day. And God said, Let the '
    'waters under the heaven be gathered together unto one place, and let the dry land appear: and it was so.'
    ' And God called the dry land Earth; and the gathering together of the waters called he Seas: and God saw'
    ' that it was good. And God said, Let the earth bring forth grass, the herb yielding seed, and the fruit '
    'tree yielding fruit after his kind, whose seed is in itself, upon the earth: and it was so. And the '
    'earth brought forth grass, and herb yielding seed after his kind, and the tree yielding fruit, whose '
    'seed was in itself, after his kind: and God saw that it was good. And the evening and the morning were '
    'the third day. And God said, Let there be lights in the firmament of the heaven to divide the day from '
    'the night; and let them be for signs, and for seasons, and for days, and years: And let them be for '
    'lights in the firmament of the heaven to give light upon the earth: and it was so. And God made two '
    'great lights; the greater light to rule the day, and the lesser light to rule the night: he made the '
    'stars also. And God set them in the firmament of the heaven to give light upon the earth, And to rule '
    'over the day and over the night, and to divide the light from the darkness: and God saw that it was '
    'good. And the evening and the morning were the fourth day.'
)


@dataclasses.dataclass(frozen=True)
class DeconFixedQKOptions(GQAOptions):
    """GQA's options (MHA by default), and the fixed stream: source "random" (embeddings ~ N(0, sigma^2), drawn
    with `seed`) or "text" (FIXED_TEXT's bytes as tokens through the model's embedding; sigma and seed are then
    errors)."""

    source: Literal["random", "text"] = "random"
    sigma: float = 0.02
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r} must be one of {', '.join(SOURCES)}")
        if not self.sigma > 0:
            raise ValueError(f"sigma={self.sigma} must be > 0")
        if self.source == "text":
            reject_unused(self, ("sigma", "seed"), "with source='text' (they draw the random stream)")

    def stream(self) -> tuple:
        """What fixes the stream's content (every layer of a model must agree on it: there is one stream)."""
        return (self.source, self.sigma, self.seed) if self.source == "random" else (self.source,)


class SideStreamConstant(nnx.Variable):
    """A fixed, non-trainable input (not an nnx.Param: the optimizer and the parameter count leave it out)."""


class FixedSideStream(nnx.Module):
    """The model's fixed side stream: token ids [1, S] embedded by the model's embedding, or embeddings [1, S, D]."""

    def __init__(self, *, tokens_1S=None, embeddings_1SD=None):
        self.tokens_1S = None if tokens_1S is None else SideStreamConstant(tokens_1S)
        self.embeddings_1SD = None if embeddings_1SD is None else SideStreamConstant(embeddings_1SD)

    def __call__(self, embed: nnx.Embed):
        return embed(self.tokens_1S[...]) if self.tokens_1S is not None else self.embeddings_1SD[...]


def fixed_text_tokens(length: int, vocab_size: int) -> np.ndarray:
    """FIXED_TEXT's UTF-8 bytes modulo vocab_size, repeated to `length`, [1, length] int32."""
    data = np.frombuffer(FIXED_TEXT.encode("utf-8"), np.uint8).astype(np.int32) % vocab_size
    return np.resize(data, (1, length))


@register("decon_rnd_emb_qk", options=DeconFixedQKOptions, n_kv_heads="all", source="random")
class DeconFixedQK(DecoupledQKAttention):
    @classmethod
    def check(cls, options: DeconFixedQKOptions, config: ModelConfig) -> None:
        super().check(options, config)
        for i, (spec, other) in enumerate(zip(config.layers, config.layer_options)):
            if get_mixer(spec.mixer).cls is cls and other.stream() != options.stream():
                raise ValueError(f"the model has one fixed side stream, but layer {i} ({spec}) asks for "
                                 f"{other.stream()} and this layer for {options.stream()}: give every "
                                 f"fixed-QK layer the same source, sigma and seed")

    @classmethod
    def make_shared(cls, config: ModelConfig, options: DeconFixedQKOptions, rngs: nnx.Rngs) -> dict:
        length = config.max_seq_len
        if options.source == "text":
            return {SIDE_STREAM: FixedSideStream(tokens_1S=jnp.asarray(fixed_text_tokens(length, config.vocab_size)))}
        noise = np.random.default_rng(options.seed).normal(0.0, options.sigma, (1, length, config.d_model))
        return {SIDE_STREAM: FixedSideStream(embeddings_1SD=jnp.asarray(noise, jnp.dtype(config.dtype)))}

    def __init__(self, config: ModelConfig, options: DeconFixedQKOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        super().__init__(config, options, shared=shared, rngs=rngs)
        self.stream_length = config.max_seq_len

    def queries_keys(self, x_BTD, ctx: ForwardContext):
        if ctx.side_BSD is None:  # the fixed stream's own pass: its own queries and keys
            return super().queries_keys(x_BTD, ctx)
        b, t, _ = x_BTD.shape
        side_BSD = jnp.broadcast_to(ctx.side_BSD, (b, *ctx.side_BSD.shape[1:]))
        s = side_BSD.shape[1]
        if ctx.mode == "full" and t > s:
            raise ValueError(f"{t} tokens but the fixed side stream has {s} positions (max_seq_len)")
        q_BSHE, k_BSKE, _ = self.project(side_BSD)
        q_BSHE, k_BSKE = self.position_qk(q_BSHE, k_BSKE, jnp.broadcast_to(jnp.arange(s), (b, s)))
        at_BT11 = ctx.positions_BT[:, :, None, None]  # each token takes the map's row (and key) at its position
        return jnp.take_along_axis(q_BSHE, at_BT11, axis=1), jnp.take_along_axis(k_BSKE, at_BT11, axis=1)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        if max_len > self.stream_length:
            raise ValueError(f"cache capacity {max_len} exceeds the fixed side stream's {self.stream_length} "
                             f"positions (max_seq_len): the map has no rows beyond them")
        return super().init_cache(batch, max_len)

    def qk_source(self, x_BTD, ctx: ForwardContext):
        return x_BTD  # only inside the stream's own pass (queries_keys handles the side stream)


register("decon_fixed_seq_qk", options=DeconFixedQKOptions, n_kv_heads="all", source="text")(DeconFixedQK)
