"""Pure-JAX chunked linear attention in float32 (the `implementation="xla"` backend), the token-by-token recurrence
the tests use as ground truth, and the length masking and document resets it shares with the kernels.

    S_t = exp(log_decay_t) * S_{t-1} + k_t^T v_t        S: [E, F] per head, float32
    o_t = scale * q_t S_t

The chunked form is Mamba-2's SSD (arXiv 2405.21060, "Listing 1") / Lightning Attention-2 (arXiv 2401.04658): inside a
chunk a causal quadratic form, between chunks a state passed by `lax.scan`. Every decay exponent is a difference of
chunk-local cumulative sums, G_i - G_j (i >= j) or G_last - G_j, so it is <= 0 and masked *before* exp: nothing
overflows at any length, and autodiff sees no inf * 0.

Packed documents (segment_ids_BT): the state is reset before every token whose segment id differs from the previous
token's. Chunk-locally that is one integer per token, r = the number of documents started in its chunk up to and
including it (`segment_resets`); the masks are then r_i == r_j (intra-chunk pairs), r_i == 0 (reads the state that
entered the chunk), r_j == r_last (writes the state that leaves it) and r_last == 0 (the entering state carries on),
each applied to the exponent before exp.
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


def segment_resets(segment_ids_BT, lengths_B, chunk_size: int):
    """[B, N * C] int32 (T padded to N chunks of C): per token, how many documents started inside its chunk up to
    and including it; 0 means the token still sees the state that entered the chunk. A document starts where the
    segment id differs from the previous token's (inside lengths_B: padding starts nothing); the initial state
    belongs to token 0's document."""
    b, t = segment_ids_BT.shape
    n = cdiv(t, chunk_size)
    starts_BT = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    if lengths_B is not None:
        starts_BT &= jnp.arange(1, t)[None, :] < lengths_B[:, None]
    starts_BT = jnp.pad(starts_BT, [(0, 0), (1, n * chunk_size - t)]).reshape(b, n, chunk_size)
    return jnp.cumsum(starts_BT.astype(jnp.int32), axis=2).reshape(b, n * chunk_size)


def masked_exp(exponent, keep=None):
    """exp(exponent) where `keep` (None: everywhere), exactly 0 elsewhere; masked before exp, so no inf * 0 in
    autodiff."""
    return jnp.exp(exponent if keep is None else jnp.where(keep, exponent, -jnp.inf))


def _decay_per_head(log_decay):
    """log_decay [B, T, H] or [B, T, H, E] as float32 [B, T, H, D], D = 1 (scalar per head) or E (per key dim)."""
    log_decay = log_decay.astype(jnp.float32)
    return log_decay[..., None] if log_decay.ndim == 3 else log_decay


def linear_attention_step_reference(q_BTKE, k_BTKE, v_BTHF, log_decay_BTH, *, scale: float = 1.0,
                                    initial_state_BHEF=None, lengths_B=None, segment_ids_BT=None):
    """The recurrence one token at a time (`lax.scan` over T), in float32: (o [B, T, H, F] in q.dtype, final state
    [B, H, E, F] float32). Tokens at t >= lengths_B leave the state as it was; a token whose segment id differs from
    the previous token's starts from a zero state. The tests' ground truth."""
    b, t, kh, e = q_BTKE.shape
    h, f = v_BTHF.shape[2:]
    q_TBHE, k_TBHE = (jnp.repeat(x.astype(jnp.float32), h // kh, axis=2).swapaxes(0, 1) for x in (q_BTKE, k_BTKE))
    v_TBHF = v_BTHF.astype(jnp.float32).swapaxes(0, 1)
    g_TBHD = _decay_per_head(log_decay_BTH).swapaxes(0, 1)
    lengths_B = jnp.full((b,), t) if lengths_B is None else lengths_B
    valid_TB = jnp.arange(t)[:, None] < lengths_B[None, :]
    starts_TB = jnp.zeros((t, b), bool)
    if segment_ids_BT is not None:
        starts_TB = starts_TB.at[1:].set((segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]).T)
    s0_BHEF = jnp.zeros((b, h, e, f), jnp.float32) if initial_state_BHEF is None else initial_state_BHEF

    def step(s_BHEF, xs):
        q_BHE, k_BHE, v_BHF, g_BHD, valid_B, start_B = xs
        previous_BHEF = jnp.where(start_B[:, None, None, None], 0.0, s_BHEF)
        new_BHEF = jnp.exp(g_BHD)[..., None] * previous_BHEF + k_BHE[..., :, None] * v_BHF[..., None, :]
        s_BHEF = jnp.where(valid_B[:, None, None, None], new_BHEF, s_BHEF)
        return s_BHEF, scale * jnp.einsum("bhe,bhef->bhf", q_BHE, s_BHEF, precision=HI)

    s_BHEF, o_TBHF = lax.scan(step, s0_BHEF.astype(jnp.float32),
                              (q_TBHE, k_TBHE, v_TBHF, g_TBHD, valid_TB, starts_TB))
    return o_TBHF.swapaxes(0, 1).astype(q_BTKE.dtype), s_BHEF


def chunked_linear_attention_reference(q_BTKE, k_BTKE, v_BTHF, log_decay_BTH, *, scale: float = 1.0,
                                       initial_state_BHEF=None, lengths_B=None, segment_ids_BT=None,
                                       chunk_size: int = 64):
    """The chunked (SSD) algorithm in float32: (o [B, T, H, F] in q.dtype, final state [B, H, E, F] float32).

    log_decay_BTH is [B, T, H] (one decay per head and token: Mamba-2, RetNet, Lightning) or [B, T, H, E] (per key
    dimension: GLA). q/k head k serves the H / K value heads k * H/K .. (k + 1) * H/K - 1. segment_ids_BT: packed
    documents, the state reset at each document's first token (module docstring)."""
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
    # Document masks (None: one document), broadcast against [b, n, k, g, i, (j,) d].
    same_ij = reads_i = writes_j = carries = None
    if segment_ids_BT is not None:
        r = segment_resets(segment_ids_BT, lengths_B, c).reshape(b, n, 1, 1, c, 1)
        same_ij = r[..., :, None, :] == r[..., None, :, :]
        reads_i, writes_j, carries = r == 0, r == r[..., -1:, :], r[..., -1, :] == 0

    # Intra-chunk: A_ij = sum_e q_ie k_je exp(G_i - G_j), i >= j (and in one document).
    causal = jnp.tril(jnp.ones((c, c), bool))[:, :, None]
    diff = cum[..., :, None, :] - cum[..., None, :, :]                            # [b, n, k, g, i, j, d]
    decay_ij = masked_exp(diff, causal if same_ij is None else causal & same_ij)
    if decay_ij.shape[-1] == 1:
        a = jnp.einsum("bnike,bnjke->bnkij", q, k, precision=HI)[:, :, :, None] * decay_ij[..., 0]
    else:
        a = jnp.einsum("bnike,bnjke,bnkgije->bnkgij", q, k, decay_ij, precision=HI)
    o_intra = jnp.einsum("bnkgij,bnjkgf->bnikgf", a, v, precision=HI)

    # Each chunk's own contribution to the state, and the state passed between chunks.
    k_dec = k.transpose(0, 1, 3, 2, 4)[:, :, :, None] * masked_exp(cum_last - cum, writes_j)  # [b, n, k, g, j, e]
    chunk_states = jnp.einsum("bnkgje,bnjkgf->bnkgef", k_dec, v, precision=HI)
    chunk_decay = masked_exp(cum_last[..., 0, :], carries)[..., None]          # [b, n, k, g, d, 1]

    def pass_state(s_BKGEF, xs):
        decay_BKGD1, state_BKGEF = xs
        return decay_BKGD1 * s_BKGEF + state_BKGEF, s_BKGEF

    s0 = (jnp.zeros((b, h, e, f), jnp.float32) if initial_state_BHEF is None
          else initial_state_BHEF.astype(jnp.float32)).reshape(b, kh, g, e, f)
    s_final, s_in = lax.scan(pass_state, s0, (chunk_decay.swapaxes(0, 1), chunk_states.swapaxes(0, 1)))

    # Inter-chunk: the state entering the chunk, read by q decayed to each position.
    q_dec = q.transpose(0, 1, 3, 2, 4)[:, :, :, None] * masked_exp(cum, reads_i)  # [b, n, k, g, i, e]
    o_inter = jnp.einsum("bnkgie,nbkgef->bnikgf", q_dec, s_in, precision=HI)
    o = (scale * (o_intra + o_inter)).reshape(b, n * c, h, f)[:, :t]
    return o.astype(q_BTKE.dtype), s_final.reshape(b, h, e, f)


def unsupported_reason(call) -> None:
    """The reference takes every call the API accepts."""
    return None


def run(call):
    return chunked_linear_attention_reference(
        call.q_BTKE, call.k_BTKE, call.v_BTHF, call.log_decay_BTH, scale=call.scale,
        initial_state_BHEF=call.initial_state_BHEF, lengths_B=call.lengths_B, segment_ids_BT=call.segment_ids_BT,
        chunk_size=call.chunk_size)
