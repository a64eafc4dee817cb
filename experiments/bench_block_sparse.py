"""block_sparse_attention's XLA path on CPU: its forward against dense causal XLA attention at 8k tokens and ~90%
block sparsity, and its cost against the number of selected blocks per query block (k), which should be linear.

    nice -n 10 python experiments/bench_block_sparse.py --out /tmp/bench_block_sparse.json
    python experiments/bench_block_sparse.py --smoke                  # tiny shapes: checks the script runs

Shape: B1, T = S = 8192, 4 query heads on 2 kv heads (GQA), head dim 64, fp32, blocks 64 (128 kv blocks). Lists:
for query block i, the diagonal block plus k - 1 distinct random earlier blocks (fewer near the start), token-level
causal mask. Block sparsity is counted against dense causal attention: 1 - k / (average causal blocks per query
block = (NKB + 1) / 2), so the ideal speedup is N / (2 k B) = 1 / (1 - sparsity). Dense baseline:
`flash_attention(implementation="xla")`, which materialises the [T, S] logits. Timing: jit, one compiling call,
then the median of --repeats calls. Prints markdown tables; --out writes JSON. The GPU comparison (Triton kernel vs
dense flash Triton vs cuDNN) is the block_sparse part of bench_kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from experiments.bench_common import timed  # noqa: E402
from pallas_kernels import block_sparse_attention, flash_attention  # noqa: E402


def causal_random_lists(num_q_blocks: int, k: int, *, seed: int = 0, kv_heads: int = 1):
    """[1, kv_heads, NQB, k] ids and [1, kv_heads, NQB] counts: the diagonal block and k - 1 distinct random earlier
    blocks (ascending), count min(k, i + 1)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((1, kv_heads, num_q_blocks, k), np.int32)
    counts = np.zeros((1, kv_heads, num_q_blocks), np.int32)
    for h in range(kv_heads):
        for i in range(num_q_blocks):
            chosen = np.sort(np.append(rng.permutation(i)[:k - 1], i))
            ids[0, h, i, :len(chosen)], counts[0, h, i] = chosen, len(chosen)
    return jnp.asarray(ids), jnp.asarray(counts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--ks", default="2,4,6,8,16", help="selected blocks per query block to sweep")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    seq, block, ks = (256, 16, [2, 4]) if args.smoke else (args.seq, args.block, [int(k) for k in args.ks.split(",")])
    b, hq, hkv, d = 1, 4, 2, 64
    num_blocks = seq // block
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, seq, hq, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, seq, hkv, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, seq, hkv, d), jnp.float32)
    d_out = jax.random.normal(keys[3], (b, seq, hq, d), jnp.float32)
    causal_blocks = (num_blocks + 1) / 2

    def both_passes(attend):
        def loss(q, k, v):
            return jnp.sum(attend(q, k, v) * d_out)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    dense = lambda q, k, v: flash_attention(q, k, v, causal=True, implementation="xla")
    rows = [dict(impl="dense_xla", k=num_blocks, sparsity=0.0, ideal_speedup=1.0,
                 fwd_s=timed(jax.jit(dense), q, k, v, repeats=args.repeats).seconds,
                 fwdbwd_s=timed(both_passes(dense), q, k, v, repeats=args.repeats).seconds)]
    print(json.dumps(rows[-1]), flush=True)
    for n_sel in ks:
        lists, counts = causal_random_lists(num_blocks, n_sel, seed=n_sel, kv_heads=hkv)
        sparse = lambda q, k, v, lists=lists, counts=counts: block_sparse_attention(
            q, k, v, lists, counts, block_q=block, block_k=block, implementation="xla")
        rows.append(dict(impl="block_sparse_xla", k=n_sel, sparsity=1 - n_sel / causal_blocks,
                         ideal_speedup=seq / (2 * n_sel * block),
                         fwd_s=timed(jax.jit(sparse), q, k, v, repeats=args.repeats).seconds,
                         fwdbwd_s=timed(both_passes(sparse), q, k, v, repeats=args.repeats).seconds))
        print(json.dumps(rows[-1]), flush=True)

    dense_row, sparse_rows = rows[0], rows[1:]
    per_k = np.polyfit([r["k"] for r in sparse_rows], [r["fwd_s"] for r in sparse_rows], 1)
    env = dict(jax=jax.__version__, backend=jax.default_backend(), machine=platform.processor() or platform.machine(),
               cpus=os.cpu_count(), seq=seq, block=block, batch=b, heads_q=hq, heads_kv=hkv, head_dim=d,
               dtype="float32", argv=sys.argv[1:])
    print(f"\nB{b} T=S={seq} H{hq}/K{hkv} D{d} fp32, blocks {block} ({num_blocks} kv blocks), causal; "
          f"speedup = dense XLA time / block-sparse XLA time")
    print("| impl | k | block sparsity | ideal N/(2kB) | fwd ms | fwd speedup | fwd+bwd ms | fwd+bwd speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['k']} | {100 * r['sparsity']:.1f}% | {r['ideal_speedup']:.1f}x "
              f"| {1e3 * r['fwd_s']:.1f} | {dense_row['fwd_s'] / r['fwd_s']:.1f}x | {1e3 * r['fwdbwd_s']:.1f} "
              f"| {dense_row['fwdbwd_s'] / r['fwdbwd_s']:.1f}x |")
    fit = [per_k[0] * r["k"] + per_k[1] for r in sparse_rows]
    worst = max(abs(f - r["fwd_s"]) / r["fwd_s"] for f, r in zip(fit, sparse_rows))
    print(f"\nforward cost vs k: {1e3 * per_k[0]:.2f} ms per selected block + {1e3 * per_k[1]:.2f} ms "
          f"(least-squares line; worst deviation from it {100 * worst:.0f}%)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(env=env, rows=rows, fwd_ms_per_block=1e3 * per_k[0], fwd_ms_intercept=1e3 * per_k[1],
                           worst_fit_deviation=worst), fh, indent=1)


if __name__ == "__main__":
    main()
