"""Per-layer measurements of a trained model beyond its loss: the residual stream's largest activation, explicit
attention probabilities of GQA-family layers (attention maps), and the evaluation diagnostics averaged over a
split. Used by experiments/gated_sink and the notebooks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo import LanguageModel
from attnzoo.data import TokenDataset
from attnzoo.mixers.base import ForwardContext
from attnzoo.mixers.gqa import GQAttention


def _context(tokens_BT, x_BTD) -> ForwardContext:
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    return ForwardContext("full", positions_BT, input_embeddings_BTD=x_BTD)


def hidden_states(model: LanguageModel, tokens_BT, layers: int | None = None) -> list[jax.Array]:
    """The residual stream [B, T, D] entering each layer and leaving the last (n_layers + 1 arrays; with `layers`,
    only the inputs of the first `layers` + 1), by running the model's own blocks in order, as
    LanguageModel.__call__ does for a full forward."""
    x_BTD = model.embed(jnp.asarray(tokens_BT))
    ctx = _context(tokens_BT, x_BTD)
    states = [x_BTD]
    for block in list(model.blocks)[:layers]:
        x_BTD, _ = block(x_BTD, ctx)
        states.append(x_BTD)
    return states


@nnx.jit
def max_activation_per_layer(model: LanguageModel, tokens_BT) -> jax.Array:
    """max |h| of the residual stream leaving each layer [n_layers] (the Gated Attention paper's M-Act is the mean
    of these over layers)."""
    return jnp.stack([jnp.max(jnp.abs(h_BTD)) for h_BTD in hidden_states(model, tokens_BT)[1:]])


def attention_probabilities(model: LanguageModel, layer: int, tokens_BT) -> np.ndarray:
    """The causal attention probabilities [B, H, T, T] of `layer`, a GQA-family mixer (mha / gqa / mqa / gated at
    G1, G2 or G5), computed explicitly from its q and k for plotting; the mixers themselves never materialise them."""
    mixer = model.blocks[layer].mixer
    if not isinstance(mixer, GQAttention) or getattr(mixer, "position", None) in ("G3", "G4"):
        raise ValueError(f"layer {layer} ({model.blocks[layer].spec}): attention maps are drawn for GQA-family "
                         f"mixers whose q and k are project() then position_qk() (not gated at G3 / G4)")
    if mixer.soft_cap is not None or mixer.window is not None:
        raise ValueError(f"layer {layer} ({model.blocks[layer].spec}): no soft cap or window in attention maps")
    x_BTD = hidden_states(model, tokens_BT, layers=layer)[layer]
    ctx = _context(tokens_BT, x_BTD)
    q_BTHE, k_BTKE, _ = mixer.project(model.blocks[layer].mixer_norm(x_BTD))
    q_BTHE, k_BTKE = mixer.position_qk(q_BTHE, k_BTKE, ctx.positions_BT)
    k_BTHE = jnp.repeat(k_BTKE, mixer.n_heads // mixer.n_kv_heads, axis=2)
    logits_BHTS = jnp.einsum("bthe,bshe->bhts", q_BTHE.astype(jnp.float32), k_BTHE.astype(jnp.float32))
    t = logits_BHTS.shape[-1]
    causal_TS = jnp.tril(jnp.ones((t, t), bool))
    logits_BHTS = jnp.where(causal_TS, logits_BHTS * mixer.head_dim**-0.5, -jnp.inf)
    return np.asarray(jax.nn.softmax(logits_BHTS, axis=-1))


def layer_metric(metrics: dict[str, float], name: str, n_layers: int) -> list[float | None]:
    """[metrics['layer{i}/<name>'] or None for each layer]: one diagnostic across depth."""
    return [metrics.get(f"layer{i}/{name}") for i in range(n_layers)]


def eval_windows(dataset: TokenDataset, batch_size: int, seq_len: int, max_batches: int) -> list[np.ndarray]:
    """The validation windows the trainer evaluates on, as token batches."""
    return [x_BT for x_BT, _ in dataset.eval_batches("val", batch_size, seq_len, max_batches)]
