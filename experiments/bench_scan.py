"""The chunked linear recurrence (SSD) against `lax.associative_scan` and a sequential `lax.scan`, and recurrent vs
KV-cache decode against context length, in one run on one device.

    python experiments/bench_scan.py                 # B4, T4096, 8 heads, head dim 64 (the recurrent issue's shape)
    python experiments/bench_scan.py --smoke         # tiny shapes: checks the script runs

Recurrence per head: S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t (S is [E, E], fp32). Training: forward +
backward of sum(o * dO) through (1) `pallas_kernels.chunked_linear_attention(implementation="xla")` (chunk 64; its
backward is autodiff of the chunked reference), (2) the same op with implementation="triton" (the Pallas forward
and backward kernels; on a GPU, and in interpret mode with --smoke only: interpreted at full size it would take
hours), (3) `lax.associative_scan` over (decay, k^T v) pairs (materialises a [E, E] state per token), (4) `lax.scan`
token by token. Decode: one new token per sequence, through the recurrent state (constant size) and through
`decode_attention` against a KV cache of growing length. Prints markdown tables; --out writes JSON rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from experiments.bench_common import timed  # noqa: E402
from pallas_kernels import chunked_linear_attention, decode_attention  # noqa: E402
from pallas_kernels.common import on_gpu  # noqa: E402


def associative_scan_attention(q_BTHE, k_BTHE, v_BTHE, g_BTH):
    def combine(left, right):
        (a_l, s_l), (a_r, s_r) = left, right
        return a_l * a_r, a_r[..., None, None] * s_l + s_r

    decay = jnp.exp(g_BTH)
    kv_BTHEE = jnp.einsum("bthe,bthf->bthef", k_BTHE, v_BTHE)
    _, states_BTHEE = jax.lax.associative_scan(combine, (decay, kv_BTHEE), axis=1)
    return jnp.einsum("bthe,bthef->bthf", q_BTHE, states_BTHEE)


def sequential_scan_attention(q_BTHE, k_BTHE, v_BTHE, g_BTH):
    def step(state_BHEE, inputs):
        q, k, v, g = inputs
        state_BHEE = jnp.exp(g)[..., None, None] * state_BHEE + jnp.einsum("bhe,bhf->bhef", k, v)
        return state_BHEE, jnp.einsum("bhe,bhef->bhf", q, state_BHEE)

    b, _, h, e = q_BTHE.shape
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q_BTHE, k_BTHE, v_BTHE, g_BTH))
    _, o_TBHE = jax.lax.scan(step, jnp.zeros((b, h, e, e), jnp.float32), xs)
    return jnp.moveaxis(o_TBHE, 0, 1)


def chunked_attention(implementation: str):
    def attend(q_BTHE, k_BTHE, v_BTHE, g_BTH):
        return chunked_linear_attention(q_BTHE, k_BTHE, v_BTHE, g_BTH, chunk_size=64, implementation=implementation)
    return attend


def training_rows(batch: int, seq: int, heads: int, dim: int, *, with_triton: bool) -> list[dict]:
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v, d_out = (jax.random.normal(key, (batch, seq, heads, dim), jnp.float32) / dim**0.5 for key in keys[:4])
    g = -jax.nn.softplus(jax.random.normal(keys[4], (batch, seq, heads)))  # decays in (0, 1)
    rows = []
    triton = [("chunked SSD (triton kernels fwd + bwd, chunk 64)", chunked_attention("triton"))] * with_triton
    for name, fn in (("chunked SSD (xla, chunk 64)", chunked_attention("xla")), *triton,
                     ("lax.associative_scan", associative_scan_attention),
                     ("sequential lax.scan", sequential_scan_attention)):
        loss_and_grads = jax.jit(jax.value_and_grad(lambda *a, fn=fn: jnp.sum(fn(*a) * d_out), argnums=(0, 1, 2, 3)))
        try:
            seconds = timed(loss_and_grads, q, k, v, g).seconds
            rows.append(dict(kind="train", name=name, ms=seconds * 1e3, tokens_per_s=batch * seq / seconds))
        except Exception as err:  # noqa: BLE001  (e.g. out of memory: reported, the others still run)
            rows.append(dict(kind="train", name=name, error=f"{type(err).__name__}: {err}"[:300]))
    return rows


def decode_rows(batch: int, heads: int, dim: int, contexts: list[int]) -> list[dict]:
    """Tokens/s of one decode step after `context` tokens: the recurrent state (built by a chunked prefill of the
    context) and a KV cache holding the context."""
    keys = jax.random.split(jax.random.key(1), 2)
    q = jax.random.normal(keys[0], (batch, 1, heads, dim), jnp.float32) / dim**0.5
    step = jax.jit(lambda q, state: chunked_linear_attention(
        q, q, q, jnp.full(q.shape[:3], -0.01), initial_state_BHEF=state, chunk_size=1, return_final_state=True,
        implementation="xla"))
    attend = jax.jit(lambda q, cache, lengths: decode_attention(q, cache, cache, lengths, implementation="xla"))
    rows = []
    for context in contexts:
        history = jax.random.normal(keys[1], (batch, context, heads, dim), jnp.float32) / dim**0.5
        _, state = chunked_linear_attention(history, history, history, jnp.full(history.shape[:3], -0.01),
                                            chunk_size=64, return_final_state=True, implementation="xla")
        lengths = jnp.full((batch,), context, jnp.int32)
        rows.append(dict(kind="decode", context=context, recurrent_tokens_per_s=batch / timed(step, q, state).seconds,
                         kv_cache_tokens_per_s=batch / timed(attend, q, history, lengths).seconds))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script runs)")
    p.add_argument("--out", default=None, help="write JSON rows here")
    args = p.parse_args(argv)
    batch, seq, heads, dim = (1, 128, 2, 16) if args.smoke else (4, 4096, 8, 64)
    contexts = [256, 1024] if args.smoke else [1024, 4096, 16384, 32768]
    env = dict(kind="env", jax=jax.__version__, device=str(jax.devices()[0]), date=time.strftime("%Y-%m-%d"),
               shape=f"B{batch} T{seq} H{heads} E{dim}")
    rows = [env, *training_rows(batch, seq, heads, dim, with_triton=on_gpu() or args.smoke),
            *decode_rows(8 if not args.smoke else 1, heads, dim, contexts)]
    print(json.dumps(env))
    print("\n| forward + backward | ms | tokens/s | vs associative_scan |")
    print("|---|---|---|---|")
    train = [r for r in rows if r["kind"] == "train"]
    baseline = next((r["ms"] for r in train if r["name"] == "lax.associative_scan" and "ms" in r), None)
    for r in train:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error']} | | |")
        else:
            ratio = f"{baseline / r['ms']:.2f}x" if baseline else "n/a"
            print(f"| {r['name']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {ratio} |")
    print("\n| context | recurrent decode tokens/s | KV-cache decode tokens/s |")
    print("|---|---|---|")
    for r in rows:
        if r["kind"] == "decode":
            print(f"| {r['context']:,} | {r['recurrent_tokens_per_s']:,.0f} | {r['kv_cache_tokens_per_s']:,.0f} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
