"""The chunked linear recurrence (SSD) against a sequential `lax.scan` and `lax.associative_scan` of the same
recurrence, and recurrent vs KV-cache decode against context length, in one run on one device.

    nice -n 5 python experiments/bench_scan.py --out /tmp/bench_scan.json   # B4 T4096 H8 E64: ~4 min on 2 cores
    python experiments/bench_scan.py --smoke                                # tiny shapes: checks the script runs

Recurrence per head: S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t (S is [E, E], fp32). Every training row is
the forward + backward of sum(o * dO) w.r.t. q, k, v and g, jitted with the cotangent dO as an argument (a constant
closed over would let XLA fold part of the backward), and computes the same o (its relative error against the
sequential scan is reported):

* chunked SSD, xla: `chunked_linear_attention(implementation="xla")`, chunk 64: per chunk, the masked, decayed
  [64, 64] q k^T times v, plus one [E, E] state carried from chunk to chunk (T / 64 sequential steps); its backward
  is autodiff of that reference.
* chunked SSD, triton: the same op with implementation="triton" (the Pallas forward and backward kernels); on a
  GPU, and in interpret mode with --smoke only (interpreted at full size it would take hours).
* sequential `lax.scan`: one [E, E] state update per token, T sequential steps: the baseline of the ratios.
* `lax.associative_scan` over (decay, k^T v) pairs: materialises an [E, E] state per token (B T H E E floats) at
  each of its ~log2 T levels: the second baseline.

Timing: alternating runs (bench_common.alternating_seconds): each repeat calls every row once, in turn, after one
untimed compiling call each, so the rows of one repeat share the machine's load, with an untimed pause (--settle-s)
after each call (see `settled_alternating_seconds`); a row reports its median seconds
with the spread (max - min) / median of its repeats, and its speed against each named baseline as the median, min
and max of the per-repeat ratios.

Decode: one new token per sequence through the recurrent state (constant size: `chunked_linear_attention` with
chunk 1 from the state after the context) and through `decode_attention` (xla) against a KV cache holding the
context, timed alternately per context; the ratio is the recurrent step's speed against the KV-cache step's.
Prints markdown tables; --out writes the result as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from experiments.bench_common import alternating_seconds, rel_err, settled_alternating_seconds, summary, write_json  # noqa: E402
from pallas_kernels import chunked_linear_attention, decode_attention  # noqa: E402
from pallas_kernels.common import on_gpu  # noqa: E402

SEQUENTIAL, ASSOCIATIVE = "sequential lax.scan", "lax.associative_scan"
CHUNKED_XLA, CHUNKED_TRITON = "chunked SSD (xla, chunk 64)", "chunked SSD (triton kernels, chunk 64)"
TRAINING_BASELINES = (SEQUENTIAL, ASSOCIATIVE)
RECURRENT, KV_CACHE = "recurrent decode", "KV-cache decode"


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


def forward_backward(attend):
    """jit of (q, k, v, g, d_out) -> (sum(o * d_out), its gradients w.r.t. q, k, v, g)."""
    def loss(q_BTHE, k_BTHE, v_BTHE, g_BTH, d_out_BTHE):
        return jnp.sum(attend(q_BTHE, k_BTHE, v_BTHE, g_BTH) * d_out_BTHE)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def training_result(batch: int, seq: int, heads: int, dim: int, *, with_triton: bool, repeats: int,
                    settle_s: float) -> dict:
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v, d_out = (jax.random.normal(key, (batch, seq, heads, dim), jnp.float32) / dim**0.5 for key in keys[:4])
    g = -jax.nn.softplus(jax.random.normal(keys[4], (batch, seq, heads)))  # decays in (0, 1)
    triton = {CHUNKED_TRITON: chunked_attention("triton")} if with_triton else {}
    attends = {CHUNKED_XLA: chunked_attention("xla"), **triton, SEQUENTIAL: sequential_scan_attention,
               ASSOCIATIVE: associative_scan_attention}
    reference = jax.jit(sequential_scan_attention)(q, k, v, g)
    errors = {name: rel_err(jax.jit(attend)(q, k, v, g), reference) for name, attend in attends.items()}
    runs = {name: functools.partial(forward_backward(attend), q, k, v, g, d_out) for name, attend in attends.items()}
    seconds = settled_alternating_seconds(runs, repeats, warmup=1, settle_s=settle_s)
    rows = [dict(name=name, rel_err_vs_sequential=errors[name], tokens_per_s=batch * seq / statistics.median(s),
                 **summary(s, seconds, TRAINING_BASELINES)) for name, s in seconds.items()]
    return dict(shape=f"B{batch} T{seq} H{heads} E{dim} fp32", repeats=repeats, settle_s=settle_s,
                baselines=list(TRAINING_BASELINES), rows=rows)


def decode_result(batch: int, heads: int, dim: int, contexts: list[int], repeats: int) -> dict:
    """Tokens/s of one decode step after `context` tokens: the recurrent state (built by a chunked prefill of the
    context) and a KV cache holding the context, timed alternately."""
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
        seconds = alternating_seconds({RECURRENT: functools.partial(step, q, state),
                                       KV_CACHE: functools.partial(attend, q, history, lengths)}, repeats, warmup=2)
        rows.append(dict(context=context, **{name: dict(tokens_per_s=batch / statistics.median(s),
                                                        **summary(s, seconds, (KV_CACHE,)))
                                             for name, s in seconds.items()}))
    return dict(batch=batch, repeats=repeats, baseline=KV_CACHE, rows=rows)


def ratio_cell(entry: dict) -> str:
    return f"{entry['median']:.2f}x [{entry['min']:.2f}-{entry['max']:.2f}]"


def print_tables(result: dict) -> None:
    train = result["training"]
    print(f"\nforward + backward, {train['shape']}, {train['repeats']} alternating repeats ({train['settle_s']} s "
          f"pauses); speed vs a baseline: "
          f"median [min-max] of the per-repeat ratios (> 1: faster than the baseline)")
    print(f"| forward + backward | median ms | spread | tokens/s | rel. err vs {SEQUENTIAL} | "
          + " | ".join(f"speed vs {base}" for base in train["baselines"]) + " |")
    print("|---|---|---|---|---|" + "---|" * len(train["baselines"]))
    for r in train["rows"]:
        print(f"| {r['name']} | {1e3 * r['median_s']:,.1f} | {100 * r['spread']:.0f}% | {r['tokens_per_s']:,.0f} "
              f"| {r['rel_err_vs_sequential']:.1e} | "
              + " | ".join(ratio_cell(r["speed_vs"][base]) for base in train["baselines"]) + " |")
    decode = result["decode"]
    print(f"\ndecode, batch {decode['batch']}, one new token per sequence, {decode['repeats']} alternating repeats")
    print(f"| context | recurrent tokens/s (spread) | KV-cache tokens/s (spread) | recurrent speed vs {KV_CACHE} |")
    print("|---|---|---|---|")
    for r in decode["rows"]:
        recurrent, cache = r[RECURRENT], r[KV_CACHE]
        print(f"| {r['context']:,} | {recurrent['tokens_per_s']:,.0f} ({100 * recurrent['spread']:.0f}%) "
              f"| {cache['tokens_per_s']:,.0f} ({100 * cache['spread']:.0f}%) "
              f"| {ratio_cell(recurrent['speed_vs'][KV_CACHE])} |")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, two repeats (checks the script runs)")
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats of the training rows (default 5)")
    p.add_argument("--settle-s", type=float, default=1.0,
                   help="untimed pause after each timed training call (default 1; smoke: 0)")
    p.add_argument("--out", default=None, help="write the result here as JSON")
    args = p.parse_args(argv)
    start = time.perf_counter()
    batch, seq, heads, dim = (1, 128, 2, 16) if args.smoke else (4, 4096, 8, 64)
    contexts = [256, 1024] if args.smoke else [1024, 4096, 16384, 32768]
    repeats = 2 if args.smoke else args.repeats
    result = dict(env=dict(jax=jax.__version__, device=str(jax.devices()[0]), machine=platform.machine(),
                           cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d"), argv=sys.argv[1:] if argv is None
                           else argv),
                  training=training_result(batch, seq, heads, dim, with_triton=on_gpu() or args.smoke,
                                           repeats=repeats, settle_s=0.0 if args.smoke else args.settle_s),
                  decode=decode_result(1 if args.smoke else 8, heads, dim, contexts, 3 if args.smoke else 30))
    result["env"]["elapsed_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result["env"]))
    print_tables(result)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
