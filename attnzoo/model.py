"""A composable decoder-only LM (Flax NNX): embedding -> blocks (pre-norm mixer, then an optional MLP) -> RMSNorm
-> head.

Each block's token mixer and layout come from the layer plan (`ModelConfig.plan`) through the registry, so a
hybrid is just a plan. Layers that carry the same '@tag' in the plan are one Block object reused at several depths
(its parameters exist once); mixers may also draw on `SharedParams` built once for the whole model.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.cache import DecodeState, ensure_within_capacity
from attnzoo.config import BlockOptions, LayerSpec, ModelConfig
from attnzoo.layers import RMSNorm, SwiGLU
from attnzoo.mixers.base import SIDE_STREAM, ForwardContext, Mixer, Mode, SharedParams
from attnzoo.registry import get_mixer


class ModelOutput(NamedTuple):
    logits_BTV: jax.Array
    aux_loss: jax.Array  # sum of the mixers' weighted auxiliary losses
    metrics: dict[str, jax.Array]
    caches: DecodeState | None = None


class Block(nnx.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)) unless the block has no MLP."""

    def __init__(self, config: ModelConfig, spec: LayerSpec, options, block: BlockOptions, *,
                 shared: SharedParams, rngs: nnx.Rngs):
        param_dtype, dtype = jnp.dtype(config.param_dtype), jnp.dtype(config.dtype)
        self.spec = spec
        self.mixer_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
        self.mixer: Mixer = get_mixer(spec.mixer).cls(config, options, shared=shared, rngs=rngs)
        has_mlp = block.mlp == "swiglu"
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype) if has_mlp else None
        self.mlp = SwiGLU(config.d_model, block.mlp_hidden or config.mlp_width, dtype=dtype, param_dtype=param_dtype,
                          out_scale=1 / (2 * config.n_layers) ** 0.5, rngs=rngs) if has_mlp else None

    def __call__(self, x_BTD, ctx: ForwardContext, cache=None):
        out = self.mixer(self.mixer_norm(x_BTD), ctx, cache)
        x_BTD = x_BTD + out.y_BTD
        if self.mlp is not None:
            x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return x_BTD, out

    def flops_per_token(self, seq_len: int) -> int:
        return self.mixer.flops_per_token(seq_len) + (0 if self.mlp is None else self.mlp.flops_per_token())


def _build_shared(config: ModelConfig, rngs: nnx.Rngs) -> SharedParams:
    modules: dict[str, nnx.Module] = {}
    asked: set[tuple[type, object]] = set()
    for spec, options in zip(config.layers, config.layer_options):
        mixer = get_mixer(spec.mixer).cls
        if (mixer, options) in asked:  # layers of one kind and options ask once, not once per layer
            continue
        asked.add((mixer, options))
        for key, module in mixer.make_shared(config, options, rngs).items():
            modules.setdefault(key, module)
    return SharedParams(modules)


class LanguageModel(nnx.Module):
    # The Hugging Face model_type a model was loaded from (attnzoo.interop.load_pretrained sets it), which
    # save_pretrained writes back where several types could hold the plan (DeepSeek V2 / V3); None: not loaded.
    hf_model_type: str | None = None

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        param_dtype = jnp.dtype(config.param_dtype)
        self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=jnp.dtype(config.dtype),
                               param_dtype=param_dtype, embedding_init=jax.nn.initializers.normal(0.02), rngs=rngs)
        self.shared = _build_shared(config, rngs)
        by_tag: dict[str, Block] = {}
        blocks = []
        for spec, options, block_options in zip(config.layers, config.layer_options, config.block_options):
            if spec.share is not None and spec.share in by_tag:
                blocks.append(by_tag[spec.share])  # the config checked that tagged layers are identical
                continue
            block = Block(config, spec, options, block_options, shared=self.shared, rngs=rngs)
            if spec.share is not None:
                by_tag[spec.share] = block
            blocks.append(block)
        self.blocks = nnx.List(blocks)
        self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
        self.lm_head = None if config.tie_embeddings else nnx.Linear(
            config.d_model, config.vocab_size, use_bias=False, dtype=jnp.dtype(config.dtype),
            param_dtype=param_dtype, kernel_init=jax.nn.initializers.normal(0.02), rngs=rngs)

    # -- forward -------------------------------------------------------------------------------------------
    def __call__(self, tokens_BT, *, segment_ids_BT=None, positions_BT=None, caches: DecodeState | None = None,
                 lengths_B=None, mode: Mode = "full", skip_layers: tuple[int, ...] = (), side_tokens_BS=None,
                 diagnostics: bool = False, check_capacity: bool = True) -> ModelOutput:
        """Score `tokens_BT`.

        mode="full" scores whole sequences (right-padded ones when `lengths_B` is given: the causal outputs of the
        real tokens do not depend on it, but per-token statistics such as MoH's balance loss leave the padding
        out). "prefill" fills the empty `caches` (from `init_caches`) with
        right-padded prompts of `lengths_B` tokens (default: all T); "decode" appends T tokens to each sequence
        and raises if a sequence would pass the caches' capacity (`check_capacity=False` skips that check where
        the caller sized the caches, as `generate` does). The returned `caches` are the updated decode state.
        `skip_layers` drops those layers (evaluation with layers removed). `side_tokens_BS` ([B or 1, S]) is a
        second stream run through the same stack beside the batch; each mixer sees its hidden state as
        `ctx.side_BSD`; without it, a model whose mixers built a fixed stream (the shared module
        `mixers.base.SIDE_STREAM`, e.g. decon_fixed_seq_qk's) runs that one. `diagnostics=True` (evaluation) adds
        the mixers' attention diagnostics to `metrics`.
        """
        b, t = tokens_BT.shape
        if mode != "full" and caches is None:
            raise ValueError(f"mode={mode!r} needs caches from model.init_caches(batch, max_len)")
        if mode == "prefill":
            if t > caches.capacity:
                raise ValueError(f"prefill: {t} prompt tokens exceed the cache capacity {caches.capacity}")
            lengths_B = jnp.full((b,), t, jnp.int32) if lengths_B is None else jnp.asarray(lengths_B, jnp.int32)
            new_lengths_B = lengths_B
        elif mode == "decode":
            lengths_B = caches.lengths_B
            new_lengths_B = lengths_B + t
            if check_capacity:
                ensure_within_capacity(new_lengths_B, caches.capacity)
        if positions_BT is None:
            start_B = lengths_B if mode == "decode" else jnp.zeros((b,), jnp.int32)
            positions_BT = start_B[:, None] + jnp.arange(t)[None, :]
        x = self.embed(tokens_BT)
        if mode == "full" and lengths_B is not None:  # right-padded sequences: what per-token statistics count
            lengths_B = jnp.asarray(lengths_B, jnp.int32)
        ctx = ForwardContext(mode, positions_BT, segment_ids_BT, lengths_B,
                             input_embeddings_BTD=x, diagnostics=diagnostics)
        side, side_ctx = self.side_stream(side_tokens_BS), None
        if side is not None:
            side_positions = jnp.broadcast_to(jnp.arange(side.shape[1]), side.shape[:2])
            side_ctx = ForwardContext("full", side_positions, input_embeddings_BTD=side)
        aux_loss, metrics, new_caches = jnp.zeros((), jnp.float32), {}, []
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches.layers[i]
            if i in skip_layers:
                new_caches.append(cache)
                continue
            layer_ctx = ctx if side is None else dataclasses.replace(ctx, side_BSD=block.mixer_norm(side))
            x, out = block(x, layer_ctx, cache)
            if side is not None:
                side, _ = block(side, side_ctx)
            new_caches.append(out.cache)
            aux_loss = aux_loss + out.aux_loss
            metrics.update({f"layer{i}/{k}": v for k, v in out.metrics.items()})
        logits = self._logits(self.final_norm(x))
        state = None if caches is None else DecodeState(tuple(new_caches), new_lengths_B, caches.capacity)
        return ModelOutput(logits, aux_loss, metrics, state)

    def side_stream(self, side_tokens_BS=None):
        """The side stream's input [B or 1, S, D]: `side_tokens_BS` embedded, else the fixed stream a mixer built
        (the shared module "side_stream", called with the embedding), else None."""
        if side_tokens_BS is not None:
            return self.embed(side_tokens_BS)
        if SIDE_STREAM in self.shared.modules:
            return self.shared[SIDE_STREAM](self.embed)
        return None

    def _logits(self, h_BTD):
        if self.lm_head is not None:
            return self.lm_head(h_BTD).astype(jnp.float32)
        return self.embed.attend(h_BTD).astype(jnp.float32)

    def init_caches(self, batch: int, max_len: int) -> DecodeState:
        """Empty decode state for `batch` sequences of up to `max_len` tokens each (prompt + generated)."""
        for i, block in enumerate(self.blocks):
            if not block.mixer.supports.decode:
                raise ValueError(f"layer {i} ({block.spec}) does not support cached decoding")
        return DecodeState(tuple(block.mixer.init_cache(batch, max_len) for block in self.blocks),
                           jnp.zeros((batch,), jnp.int32), max_len)

    # -- accounting ----------------------------------------------------------------------------------------
    def summary(self, seq_len: int | None = None) -> "Summary":
        return summarize(self, seq_len or self.config.max_seq_len)


def _params_by_id(module: nnx.Module) -> dict[int, int]:
    """Sizes of the module's parameters keyed by identity, so a shared parameter is counted once."""
    return {id(node): int(np.prod(node.shape)) for _, node in nnx.iter_graph(module) if isinstance(node, nnx.Param)}


def _param_count(module: nnx.Module, exclude: dict[int, int] | None = None) -> int:
    return sum(size for key, size in _params_by_id(module).items() if key not in (exclude or {}))


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameters per component (shared ones counted once), decode-cache bytes and forward FLOPs per token.

    FLOPs count 2 per multiply-add, with causal attention at the average context (halved), the convention of
    FlashAttention and of the peer MFU figures in BENCHMARKS.md (6N + causal-halved attention); PaLM counts it whole."""

    rows: tuple[tuple[str, int], ...]
    total_params: int
    kv_cache_bytes_per_token: int
    flops_per_token: int
    seq_len: int

    def table(self) -> str:
        width = max(len(name) for name, _ in self.rows)
        lines = [f"{name:<{width}}  {count:>12,}" for name, count in self.rows]
        lines += [f"{'total parameters':<{width}}  {self.total_params:>12,}",
                  f"KV-cache bytes / token: {self.kv_cache_bytes_per_token:,}",
                  f"forward FLOPs / token (seq {self.seq_len}): {self.flops_per_token:,}",
                  "  (2 per multiply-add; causal attention counted at the average context, i.e. halved, as in the "
                  "FlashAttention and BENCHMARKS.md peer MFU convention; PaLM's MFU counts it whole)"]
        return "\n".join(lines)

    __str__ = table


def summarize(model: LanguageModel, seq_len: int) -> Summary:
    cfg = model.config
    shared = _params_by_id(model.shared)
    rows = [("embed", _param_count(model.embed))]
    seen: set[int] = set()
    flops = 0
    for i, block in enumerate(model.blocks):
        flops += block.flops_per_token(seq_len)
        if id(block) in seen:
            rows.append((f"layer{i} ({block.spec}, shared)", 0))
            continue
        seen.add(id(block))
        mixer = _param_count(block.mixer, exclude=shared)
        rows.append((f"layer{i} mixer ({block.spec})", mixer))
        rows.append((f"layer{i} mlp+norms", _param_count(block, exclude=shared) - mixer))
    if shared:
        rows.append(("shared", sum(shared.values())))
    rows.append(("final norm", _param_count(model.final_norm)))
    if model.lm_head is not None:
        rows.append(("lm_head", _param_count(model.lm_head)))
    flops += 2 * cfg.d_model * cfg.vocab_size  # LM head (tied or not)
    cache = sum(block.mixer.cache_bytes_per_token() for block in model.blocks)
    return Summary(tuple(rows), _param_count(model), cache, flops, seq_len)
