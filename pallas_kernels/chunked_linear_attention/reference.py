"""Pure-JAX chunked linear attention in float32 (the `implementation="xla"` backend), the token-by-token recurrence
the tests use as ground truth, and the length masking both share with the kernels.

    S_t = exp(log_decay_t) * S_{t-1} + k_t^T v_t        S: [E, F] per head, float32
    o_t = scale * q_t S_t

The chunked form is Mamba-2's SSD (arXiv 2405.21060, "Listing 1") / Lightning Attention-2 (arXiv 2401.04658): inside a
chunk a causal quadratic form, between chunks a state passed by `lax.scan`. Every decay exponent is a difference of
chunk-local cumulative sums, G_i - G_j (i >= j) or G_last - G_j, so it is <= 0 and masked *before* exp: nothing
overflows at any length, and autodiff sees no inf * 0.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import cdiv, pad_axis

HI = lax.Precision.HIGHEST


def mask_past_lengths(k_BTKE, v_BTHF, log_decay_BTH, lengths_B):
    """Tokens at t >= lengths_B[b] made inert: k = v = 0 (so a non-finite padding value cannot reach the state) and
    log_decay = 0 (the state passes through unchanged). Identity when lengths_B is None."""
    if lengths_B is None:
        return k_BTKE, v_BTHF, log_decay_BTH
    valid_BT = jnp.arange(k_BTKE.shape[1])[None, :] < lengths_B[:, None]

    def mask(x):
        return jnp.where(valid_BT.reshape(valid_BT.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))

    return mask(k_BTKE), mask(v_BTHF), mask(log_decay_BTH)


def _decay_per_head(log_decay):
    """log_decay [B, T, H] or [B, T, H, E] as float32 [B, T, H, D], D = 1 (scalar per head) or E (per key dim)."""
    log_decay = log_decay.astype(jnp.float32)
    return log_decay[..., None] if log_decay.ndim == 3 else log_decay


def linear_attention_step_reference(q_BTKE, k_BTKE, v_BTHF, log_decay_BTH, *, scale: float = 1.0,
                                    initial_state_BHEF=None, lengths_B=None):
    """The recurrence one token at a time (`lax.scan` over T), in float32: (o [B, T, H, F] in q.dtype, final state
    [B, H, E, F] float32). Tokens at t >= lengths_B leave the state as it was. The tests' ground truth."""
    b, t, kh, e = q_BTKE.shape
    h, f = v_BTHF.shape[2:]
    q_TBHE, k_TBHE = (jnp.repeat(x.astype(jnp.float32), h // kh, axis=2).swapaxes(0, 1) for x in (q_BTKE, k_BTKE))
    v_TBHF = v_BTHF.astype(jnp.float32).swapaxes(0, 1)
    g_TBHD = _decay_per_head(log_decay_BTH).swapaxes(0, 1)
    lengths_B = jnp.full((b,), t) if lengths_B is None else lengths_B
    valid_TB = jnp.arange(t)[:, None] < lengths_B[None, :]
    s0_BHEF = jnp.zeros((b, h, e, f), jnp.float32) if initial_state_BHEF is None else initial_state_BHEF

    def step(s_BHEF, xs):
        q_BHE, k_BHE, v_BHF, g_BHD, valid_B = xs
        new_BHEF = jnp.exp(g_BHD)[..., None] * s_BHEF + k_BHE[..., :, None] * v_BHF[..., None, :]
        s_BHEF = jnp.where(valid_B[:, None, None, None], new_BHEF, s_BHEF)
        return s_BHEF, scale * jnp.einsum("bhe,bhef->bhf", q_BHE, s_BHEF, precision=HI)

    s_BHEF, o_TBHF = lax.scan(step, s0_BHEF.astype(jnp.float32), (q_TBHE, k_TBHE, v_TBHF, g_TBHD, valid_TB))
    return o_TBHF.swapaxes(0, 1).astype(q_BTKE.dtype), s_BHEF


def chunked_linear_attention_reference(q_BTKE, k_BTKE, v_BTHF, log_decay_BTH, *, scale: float = 1.0,
                                       initial_state_BHEF=None, lengths_B=None, chunk_size: int = 64):
    """The chunked (SSD) algorithm in float32: (o [B, T, H, F] in q.dtype, final state [B, H, E, F] float32).

    log_decay_BTH is [B, T, H] (one decay per head and token: Mamba-2, RetNet, Lightning) or [B, T, H, E] (per key
    dimension: GLA). q/k head k serves the H / K value heads k * H/K .. (k + 1) * H/K - 1."""
    k_BTKE, v_BTHF, log_decay_BTH = mask_past_lengths(k_BTKE, v_BTHF, log_decay_BTH, lengths_B)
    b, t, kh, e = q_BTKE.shape
    h, f = v_BTHF.shape[2:]
    g, c = h // kh, chunk_size
    n = cdiv(t, c)

    def chunks(x):  # [B, T, ...] -> float32 [B, N, C, ...]; padded tokens have k = v = 0 and log_decay = 0
        x = pad_axis(x.astype(jnp.float32), 1, n * c)
        return x.reshape(b, n, c, *x.shape[2:])

    q, k = chunks(q_BTKE), chunks(k_BTKE)                                        # [b, n, i, k, e]
    v = chunks(v_BTHF).reshape(b, n, c, kh, g, f)                                # [b, n, j, k, g, f]
    decay = chunks(_decay_per_head(log_decay_BTH))
    cum = jnp.cumsum(decay.reshape(b, n, c, kh, g, -1), axis=2).transpose(0, 1, 3, 4, 2, 5)  # [b, n, k, g, i, d]
    cum_last = cum[..., -1:, :]

    # Intra-chunk: A_ij = sum_e q_ie k_je exp(G_i - G_j), i >= j.
    causal = jnp.tril(jnp.ones((c, c), bool))[:, :, None]
    diff = cum[..., :, None, :] - cum[..., None, :, :]                            # [b, n, k, g, i, j, d]
    decay_ij = jnp.exp(jnp.where(causal, diff, -jnp.inf))
    if decay_ij.shape[-1] == 1:
        a = jnp.einsum("bnike,bnjke->bnkij", q, k, precision=HI)[:, :, :, None] * decay_ij[..., 0]
    else:
        a = jnp.einsum("bnike,bnjke,bnkgije->bnkgij", q, k, decay_ij, precision=HI)
    o_intra = jnp.einsum("bnkgij,bnjkgf->bnikgf", a, v, precision=HI)

    # Each chunk's own contribution to the state, and the state passed between chunks.
    k_dec = k.transpose(0, 1, 3, 2, 4)[:, :, :, None] * jnp.exp(cum_last - cum)  # [b, n, k, g, j, e]
    chunk_states = jnp.einsum("bnkgje,bnjkgf->bnkgef", k_dec, v, precision=HI)
    chunk_decay = jnp.exp(cum_last[..., 0, :])[..., None]                      # [b, n, k, g, d, 1]

    def pass_state(s_BKGEF, xs):
        decay_BKGD1, state_BKGEF = xs
        return decay_BKGD1 * s_BKGEF + state_BKGEF, s_BKGEF

    s0 = (jnp.zeros((b, h, e, f), jnp.float32) if initial_state_BHEF is None
          else initial_state_BHEF.astype(jnp.float32)).reshape(b, kh, g, e, f)
    s_final, s_in = lax.scan(pass_state, s0, (chunk_decay.swapaxes(0, 1), chunk_states.swapaxes(0, 1)))

    # Inter-chunk: the state entering the chunk, read by q decayed to each position.
    q_dec = q.transpose(0, 1, 3, 2, 4)[:, :, :, None] * jnp.exp(cum)             # [b, n, k, g, i, e]
    o_inter = jnp.einsum("bnkgie,nbkgef->bnikgf", q_dec, s_in, precision=HI)
    o = (scale * (o_intra + o_inter)).reshape(b, n * c, h, f)[:, :t]
    return o.astype(q_BTKE.dtype), s_final.reshape(b, h, e, f)


def unsupported_reason(call) -> None:
    """The reference takes every call the API accepts."""
    return None


def run(call):
    return chunked_linear_attention_reference(
        call.q_BTKE, call.k_BTKE, call.v_BTHF, call.log_decay_BTH, scale=call.scale,
        initial_state_BHEF=call.initial_state_BHEF, lengths_B=call.lengths_B, chunk_size=call.chunk_size)
