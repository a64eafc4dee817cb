"""Gated attention: GQA with a learned, query-dependent gate at one point of the attention computation.

Qiu et al. (Qwen team), "Gated Attention for Large Language Models: Non-linearity, Sparsity, and Attention-Sink-Free",
arXiv 2505.06708. The gate score is computed from X, the hidden state after the block's pre-normalisation (the mixer's
input x_BTD, the same X that produces q; the gate sees no QK-norm and no RoPE):

    score = X W_θ                     (input_dependent=false: a learned, zero-initialised θ, the same for every token)
    multiplicative:   Y' = Y ⊙ act(score),   act ∈ {sigmoid, silu, ns_sigmoid(s) = 0.5 + 0.5 sigmoid(s)}
    additive:         Y' = Y + act(score),   act ∈ {silu, identity}

with Y, the gated tensor, at one `position`:

    G1  the SDPA output o_h of each query head, before concat and W_o   (default; the paper's best)
    G2  the values  x W_v of each kv head
    G3  the keys    x W_k of each kv head   (gated before QK-norm and RoPE, then cached gated)
    G4  the queries x W_q of each query head (before QK-norm and RoPE)
    G5  the dense output concat_h(o_h) W_o

`granularity`: elementwise (a score per head and channel, [T, N, E]) or headwise (one per head, [T, N]), N = H at
G1/G4 and K at G2/G3. `head_specific=false` shares one [T, E] score across heads (the paper's head-shared gate,
elementwise only). The gate weight W_θ is D x (gate width): G1/G4 elementwise H*E, headwise H, head-shared E;
G2/G3 K*E, K, E; G5 D. It adds D x width parameters and 2 D width FLOPs per token (width parameters and no matmul
FLOPs when input-independent). The score's columns are head-major ([N, E] in order), as q_proj's are.

Paper settings kept as defaults: QK-norm on (every model in the paper has it; qk_norm=false for the ablation
without), and the gate weight W_θ initialised like the released code's (where the gate is extra columns of q_proj)
from N(0, 0.02^2), the Hugging Face initializer_range, not fan-in: gate_init_std (none: fan-in, 1/sqrt(D), as
attnzoo's other projections). The paper matches parameters against its baseline by narrowing the gated model's FFN;
that is the experiment's job (e.g. a block option mlp_hidden), not the mixer's.

A headwise multiplicative G1 gate runs in the flash kernel's output-gate epilogue (`attention(..., gate_BTH=...)`);
every other gate is applied in JAX around the attention call (XLA fuses it), in float32 as the paper recommends.
Decode applies the same gate to the new tokens, before the keys / values go into the cache, so decode == full
forward. With `ctx.diagnostics` the layer reports attention_diagnostics plus gate_mean (the paper's "gate mean") and,
for sigmoid gates, gate_below_half (the share of gate values < 0.5: the paper's sparsity observation).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.cache import KVCache
from attnzoo.config import ModelConfig
from attnzoo.mixers.base import ForwardContext, MixerOutput, SharedParams
from attnzoo.mixers.gqa import GQAOptions, GQAttention
from attnzoo.registry import register

ACTIVATIONS = {
    "sigmoid": jax.nn.sigmoid,
    "ns_sigmoid": lambda s: 0.5 + 0.5 * jax.nn.sigmoid(s),  # the paper's non-sparse control
    "silu": jax.nn.silu,
    "identity": lambda s: s,
}
# The paper multiplies by bounded gates and adds unbounded ones (Y + SiLU(X W_θ)); SiLU also appears as a
# multiplicative gate in its ablations (additive=false).
MULTIPLICATIVE = ("sigmoid", "ns_sigmoid", "silu")
ADDITIVE = ("silu", "identity")
GATE_INIT_STD = 0.02  # the released code's initializer_range for q_proj, whose extra columns are the gate


@dataclasses.dataclass(frozen=True)
class GatedOptions(GQAOptions):
    """GQA's options (heads, window, qk_norm, rope, soft cap; qk_norm on by default here, as in every model of the
    paper) plus the gate: `position` G1..G5 (module docstring), `granularity`, `head_specific`, `activation`,
    `additive` (none: the paper's pairing, sigmoid / ns_sigmoid multiply, silu / identity add), `input_dependent`
    (false: the paper's input-independent probe, act(θ)), `gate_init_std` (std of W_θ's normal init, 0.02 as in the
    released code; none: fan-in 1/sqrt(d_model))."""

    qk_norm: bool = True

    position: Literal["G1", "G2", "G3", "G4", "G5"] = "G1"
    granularity: Literal["elementwise", "headwise"] = "elementwise"
    head_specific: bool = True
    activation: Literal["sigmoid", "ns_sigmoid", "silu", "identity"] = "sigmoid"
    additive: bool | None = None
    input_dependent: bool = True
    gate_init_std: float | None = GATE_INIT_STD

    def __post_init__(self):
        super().__post_init__()
        if self.gate_init_std is not None and self.gate_init_std <= 0:
            raise ValueError(f"gate_init_std={self.gate_init_std} must be > 0 (or none for fan-in, 1/sqrt(d_model))")
        if self.gate_init_std != GATE_INIT_STD and not self.input_dependent:
            raise ValueError(f"gate_init_std={self.gate_init_std} has no effect with input_dependent=false (its gate "
                             f"logits start at zero)")
        if self.additive is None:
            object.__setattr__(self, "additive", self.activation in ADDITIVE)
        allowed = ADDITIVE if self.additive else MULTIPLICATIVE
        if self.activation not in allowed:
            raise ValueError(f"activation={self.activation!r} with additive={str(self.additive).lower()}: "
                             f"{'additive' if self.additive else 'multiplicative'} gates take activation "
                             f"{' or '.join(allowed)}")
        if self.position == "G5" and (self.granularity != "elementwise" or not self.head_specific):
            raise ValueError("position=G5 gates the dense output, which has no heads: it needs "
                             "granularity=elementwise and head_specific=true")
        if self.granularity == "headwise" and not self.head_specific:
            raise ValueError("head_specific=false shares an elementwise [T, head_dim] score across heads: it needs "
                             "granularity=elementwise")
        if self.position in ("G3", "G4") and self.granularity == "headwise" and not self.additive and self.qk_norm:
            raise ValueError(f"position={self.position} with granularity=headwise and qk_norm=true (the default): "
                             f"the per-head RMSNorm would cancel a per-head scale; use granularity=elementwise or "
                             f"qk_norm=false")


@register("gated", options=GatedOptions)
class GatedAttention(GQAttention):
    """GQA (its projections, KVCache, check and accounting) with the gate of `GatedOptions`."""

    def __init__(self, config: ModelConfig, options: GatedOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        super().__init__(config, options, shared=shared, rngs=rngs)
        self.position, self.additive = options.position, options.additive
        self.activation = options.activation
        heads = {"G1": self.n_heads, "G2": self.n_kv_heads, "G3": self.n_kv_heads, "G4": self.n_heads}
        if options.position == "G5":
            self.gate_dims = (config.d_model,)
        elif options.granularity == "headwise":
            self.gate_dims = (heads[options.position], 1)
        else:
            self.gate_dims = (heads[options.position] if options.head_specific else 1, self.head_dim)
        width = math.prod(self.gate_dims)
        # The headwise multiplicative SDPA-output gate is the flash kernel's output-gate epilogue.
        self.gate_in_kernel = options.position == "G1" and options.granularity == "headwise" and not self.additive
        param_dtype = jnp.dtype(config.param_dtype)
        if options.input_dependent:
            std = config.d_model**-0.5 if options.gate_init_std is None else options.gate_init_std
            self.gate_proj = nnx.Linear(config.d_model, width, use_bias=False,
                                        kernel_init=jax.nn.initializers.normal(stddev=std),
                                        dtype=jnp.dtype(config.dtype), param_dtype=param_dtype, rngs=rngs)
            self.gate_logits = None
        else:
            self.gate_proj = None
            self.gate_logits = nnx.Param(jnp.zeros((width,), param_dtype))

    def _gate(self, x_BTD):
        """act(score) in float32, shaped to broadcast against the gated tensor: [B, T, *gate_dims] (or [*gate_dims]
        when input-independent)."""
        score = self.gate_logits[...] if self.gate_proj is None else self.gate_proj(x_BTD)
        score = score.reshape(score.shape[:-1] + self.gate_dims)
        return ACTIVATIONS[self.activation](score.astype(jnp.float32))

    def _apply(self, y, gate):
        gated = y.astype(jnp.float32) + gate if self.additive else y.astype(jnp.float32) * gate
        return gated.astype(y.dtype)

    def __call__(self, x_BTD, ctx: ForwardContext, cache: KVCache | None = None) -> MixerOutput:
        gate = self._gate(x_BTD)
        q_BTHE, k_BTKE, v_BTKE = self.project(x_BTD)
        # G2 / G3 / G4 gate the projection they follow, before QK-norm and RoPE, so the cache holds gated k / v.
        if self.position == "G4":
            q_BTHE = self._apply(q_BTHE, gate)
        elif self.position == "G3":
            k_BTKE = self._apply(k_BTKE, gate)
        elif self.position == "G2":
            v_BTKE = self._apply(v_BTKE, gate)
        q_BTHE, k_BTKE = self.position_qk(q_BTHE, k_BTKE, ctx.positions_BT)
        gate_BTH = jnp.broadcast_to(gate[..., 0], q_BTHE.shape[:3]) if self.gate_in_kernel else None
        o_BTHE, cache, metrics = self.attend(q_BTHE, k_BTKE, v_BTKE, ctx, cache, gate_BTH=gate_BTH)
        if self.position == "G1" and not self.gate_in_kernel:
            o_BTHE = self._apply(o_BTHE, gate)
        y_BTD = self.output(o_BTHE)
        if self.position == "G5":
            y_BTD = self._apply(y_BTD, gate)
        if ctx.diagnostics:
            metrics |= self._gate_metrics(gate)
        return MixerOutput(y_BTD, cache, metrics=metrics)

    def _gate_metrics(self, gate) -> dict[str, jax.Array]:
        metrics = {"gate_mean": jnp.mean(gate)}
        if self.activation in ("sigmoid", "ns_sigmoid"):
            metrics["gate_below_half"] = jnp.mean((gate < 0.5).astype(jnp.float32))
        return metrics

    def flops_per_token(self, seq_len: int) -> int:
        gate = 0 if self.gate_proj is None else 2 * self.gate_proj.in_features * self.gate_proj.out_features
        return super().flops_per_token(seq_len) + gate


# The paper's released checkpoints: gate_elementwise ("gated", the default) and gate_headwise.
register("gated_headwise", options=GatedOptions, granularity="headwise")(GatedAttention)
