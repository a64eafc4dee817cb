"""A composable decoder-only LM (Flax NNX): embedding -> blocks (pre-norm mixer + SwiGLU) -> RMSNorm -> head.

Each block's token mixer comes from the layer plan (`ModelConfig.plan`) through the registry, so a hybrid is
just a plan. Layers that carry the same '@tag' in the plan are one Block object reused at several depths (its
parameters exist once); mixers may also draw on `SharedParams` built once for the whole model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo.config import LayerSpec, ModelConfig
from attnzoo.layers import RMSNorm, SwiGLU
from attnzoo.mixers.base import ForwardContext, Mode, SharedParams
from attnzoo.registry import get_mixer


class ModelOutput(NamedTuple):
    logits_BTV: jax.Array
    aux_loss: jax.Array  # sum of the mixers' weighted auxiliary losses
    metrics: dict[str, jax.Array]
    caches: tuple | None = None


class Block(nnx.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, spec: LayerSpec, *, shared: SharedParams, rngs: nnx.Rngs):
        param_dtype, dtype = jnp.dtype(config.param_dtype), jnp.dtype(config.dtype)
        self.spec = spec
        self.mixer_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
        self.mixer = get_mixer(spec.mixer).cls(config, spec, shared=shared, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
        self.mlp = SwiGLU(config.d_model, config.mlp_width, dtype=dtype, param_dtype=param_dtype,
                          out_scale=1 / (2 * config.n_layers) ** 0.5, rngs=rngs)

    def __call__(self, x_BTD, ctx: ForwardContext, cache=None):
        out = self.mixer(self.mixer_norm(x_BTD), ctx, cache)
        x_BTD = x_BTD + out.y_BTD
        return x_BTD + self.mlp(self.mlp_norm(x_BTD)), out


def _build_shared(config: ModelConfig, rngs: nnx.Rngs) -> SharedParams:
    modules: dict[str, nnx.Module] = {}
    for spec in config.layers:
        make = getattr(get_mixer(spec.mixer).cls, "make_shared", None)
        if make is not None:
            for key, module in make(config, rngs).items():
                modules.setdefault(key, module)
    return SharedParams(modules)


class LanguageModel(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        param_dtype = jnp.dtype(config.param_dtype)
        self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=jnp.dtype(config.dtype),
                               param_dtype=param_dtype, embedding_init=jax.nn.initializers.normal(0.02), rngs=rngs)
        self.shared = _build_shared(config, rngs)
        by_tag: dict[str, Block] = {}
        blocks = []
        for spec in config.layers:
            if spec.share is not None and spec.share in by_tag:
                if by_tag[spec.share].spec != spec:
                    raise ValueError(f"plan: layers tagged @{spec.share} must be identical, got "
                                     f"{by_tag[spec.share].spec} and {spec}")
                blocks.append(by_tag[spec.share])
                continue
            block = Block(config, spec, shared=self.shared, rngs=rngs)
            if spec.share is not None:
                by_tag[spec.share] = block
            blocks.append(block)
        self.blocks = nnx.List(blocks)
        self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
        self.lm_head = None if config.tie_embeddings else nnx.Linear(
            config.d_model, config.vocab_size, use_bias=False, dtype=jnp.dtype(config.dtype),
            param_dtype=param_dtype, kernel_init=jax.nn.initializers.normal(0.02), rngs=rngs)

    # -- forward -------------------------------------------------------------------------------------------
    def __call__(self, tokens_BT, *, segment_ids_BT=None, positions_BT=None, caches=None, lengths_B=None,
                 mode: Mode = "full", skip_layers: tuple[int, ...] = (), extras: dict[str, Any] | None = None
                 ) -> ModelOutput:
        """mode="full" scores whole sequences; "prefill"/"decode" thread `caches` (see `init_caches`).
        `skip_layers` drops those layers (evaluation with layers removed)."""
        b, t = tokens_BT.shape
        if positions_BT is None:
            if mode == "decode":
                positions_BT = self._cache_lengths(caches)[:, None] + jnp.arange(t)[None, :]
            else:
                positions_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
        ctx = ForwardContext(mode, positions_BT, segment_ids_BT, lengths_B, dict(extras or {}))
        x = self.embed(tokens_BT)
        aux_loss, metrics, new_caches = jnp.zeros((), jnp.float32), {}, []
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            if i in skip_layers:
                new_caches.append(cache)
                continue
            x, out = block(x, ctx, cache)
            new_caches.append(out.cache)
            aux_loss = aux_loss + out.aux_loss
            metrics.update({f"layer{i}/{k}": v for k, v in out.metrics.items()})
        logits = self._logits(self.final_norm(x))
        return ModelOutput(logits, aux_loss, metrics, None if caches is None else tuple(new_caches))

    def _logits(self, h_BTD):
        if self.lm_head is not None:
            return self.lm_head(h_BTD).astype(jnp.float32)
        return self.embed.attend(h_BTD).astype(jnp.float32)

    def init_caches(self, batch: int, max_len: int) -> tuple:
        """One decode cache per layer (a shared block still keeps one cache per depth)."""
        return tuple(block.mixer.init_cache(batch, max_len) for block in self.blocks)

    @staticmethod
    def _cache_lengths(caches) -> jax.Array:
        for cache in caches:
            lengths = getattr(cache, "lengths_B", None)
            if lengths is not None:
                return lengths
        raise ValueError("decode: no cache carries lengths_B; pass positions_BT explicitly")

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
    """Parameters per component (shared ones counted once), decode-cache bytes and forward FLOPs per token."""

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
                  f"forward FLOPs / token (seq {self.seq_len}): {self.flops_per_token:,}"]
        return "\n".join(lines)

    __str__ = table


def summarize(model: LanguageModel, seq_len: int) -> Summary:
    cfg = model.config
    shared = _params_by_id(model.shared)
    rows = [("embed", _param_count(model.embed))]
    seen: set[int] = set()
    flops = 0
    for i, block in enumerate(model.blocks):
        flops += block.mixer.flops_per_token(seq_len) + block.mlp.flops_per_token()
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
