"""block_sparse_attention's XLA path on CPU against like-for-like baselines at ~90% block sparsity, and its cost
against the number of selected blocks per query block (k), which should be linear.

    nice -n 5 python experiments/bench_block_sparse.py --out /tmp/bench_block_sparse.json   # ~5.5 min on 2 cores
    python experiments/bench_block_sparse.py --smoke                  # tiny shapes: checks the script runs

Shape: B1, T = S = 8192, 4 query heads on 2 kv heads (GQA), head dim 64, fp32, blocks 64 (128 kv blocks), causal.
Lists: for query block i, the diagonal block plus k - 1 distinct random earlier blocks (fewer near the start);
the token-level causal mask applies inside every block. Block sparsity is counted against causal attention:
1 - (listed blocks per query block, averaged) / ((NKB + 1) / 2), ~1 - k / ((NKB + 1) / 2).

Rows (every row computes causal attention; the sparse rows attend only their listed blocks):
* block_sparse xla, k blocks: `block_sparse_attention(implementation="xla")`, which gathers each query block's
  MAXK = k listed key blocks and computes all MAXK slots (a slot past the count is masked, not skipped).
* baseline "all causal blocks listed": the same call and code path with every causal block listed (MAXK = NKB:
  the slots of the blocks after the diagonal are computed and masked).
* baseline "dense xla_chunked": `flash_attention(implementation="xla_chunked")`, query blocks over only the keys
  they can see, so it skips the fully masked key blocks, as the sparse lists do.
* baseline "dense xla": `flash_attention(implementation="xla")`, which materialises every [T, S] logit (causal
  masking saves it no work): not like-for-like; a ratio against it also counts the masked half it computes and
  the traffic of its [T, S] logits, so it overstates what the sparsity buys.

Each row also states the query-key pairs it computes (logits, masked or not), so the ideal speed against a
baseline is the ratio of their pairs. Forward and forward + backward of sum(out * dO) are jitted with the cotangent
dO and the block lists as arguments (a constant closed over would let XLA fold part of the work), and timed as
alternating runs (bench_common.alternating_seconds): each repeat calls every row once, in turn, after one untimed
compiling call, so the rows of a repeat share the machine's load, with an untimed pause (--settle-s) after each
call (bench_common.settled_alternating_seconds: small calls just after a dense one ran 2-7x slower). A row reports
its median seconds with the spread (max - min) / median, and its speed against each baseline as the median, min
and max of the per-repeat ratios.
Before timing, the baselines' forward outputs are checked against dense xla. Prints markdown tables; --out writes
JSON. The GPU comparison (Triton kernel vs dense flash Triton vs cuDNN) is the block_sparse part of bench_kernels.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from experiments.bench_common import rel_err, settled_alternating_seconds, summary, write_json  # noqa: E402
from pallas_kernels import block_sparse_attention, flash_attention  # noqa: E402
from pallas_kernels.flash_attention.xla_chunked import block_ranges, query_block  # noqa: E402

ALL_BLOCKS = "block_sparse xla, all causal blocks listed"
DENSE_CHUNKED = "dense flash xla_chunked (skips masked key blocks)"
DENSE_XLA = "dense flash xla (materialises every logit)"
BASELINES = (ALL_BLOCKS, DENSE_CHUNKED, DENSE_XLA)
CHECK_TOL = 1e-4  # fp32 baselines computing the same attention


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


def forward_backward(attend):
    """jit of (q, k, v, d_out, *lists) -> (sum(out * d_out), its gradients w.r.t. q, k, v)."""
    def loss(q_BTHE, k_BSKE, v_BSKE, d_out_BTHE, *lists):
        return jnp.sum(attend(q_BTHE, k_BSKE, v_BSKE, *lists) * d_out_BTHE)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def contenders(seq: int, block: int, ks: list[int], heads_q: int, heads_kv: int) -> dict[str, dict]:
    """name -> dict(attend=fn(q, k, v, *lists), lists (the block ids and counts, passed as arguments like a router's
    output; none when dense), k (list slots per query block; None when dense), block sparsity against causal
    attention (from the counts; 0 when dense), query-key pairs computed), baselines first."""
    num_blocks = seq // block
    causal_blocks = (num_blocks + 1) / 2
    attend_sparse = functools.partial(block_sparse_attention, block_q=block, block_k=block, implementation="xla")

    def sparse(k):
        ids, counts = causal_random_lists(num_blocks, k, seed=k, kv_heads=heads_kv)
        return dict(attend=attend_sparse, lists=(ids, counts), k=k,
                    sparsity=1 - float(counts.mean()) / causal_blocks, pairs=seq * k * block)

    def dense(implementation, pairs):
        return dict(attend=functools.partial(flash_attention, causal=True, implementation=implementation), lists=(),
                    k=None, sparsity=0.0, pairs=pairs)

    chunk = query_block(1, seq, seq, heads_q, None)
    chunked_pairs = sum((t1 - t0) * (k1 - k0) for t0, t1, k0, k1 in block_ranges(seq, seq, chunk, causal=True,
                                                                                     sliding_window=None))
    return {ALL_BLOCKS: sparse(num_blocks), DENSE_CHUNKED: dense("xla_chunked", chunked_pairs),
            DENSE_XLA: dense("xla", seq * seq), **{f"block_sparse xla, k={k}": sparse(k) for k in ks}}


def timed_rows(rows: dict[str, dict], q, k, v, d_out, repeats: int, settle_s: float) -> list[dict]:
    """One result row per contender and pass ("fwd", "fwd+bwd"), from alternating runs of that pass."""
    out = []
    for pass_name, make, operands in (("fwd", jax.jit, (q, k, v)), ("fwd+bwd", forward_backward, (q, k, v, d_out))):
        runs = {name: functools.partial(make(row["attend"]), *operands, *row["lists"]) for name, row in rows.items()}
        seconds = settled_alternating_seconds(runs, repeats, warmup=1, settle_s=settle_s)
        for name, s in seconds.items():
            row = rows[name]
            out.append({"name": name, "pass": pass_name, "k": row["k"], "sparsity": row["sparsity"],
                        "pairs": row["pairs"], **summary(s, seconds, BASELINES),
                        "ideal_vs": {base: rows[base]["pairs"] / row["pairs"] for base in BASELINES}})
        print(f"timed {pass_name}", flush=True)
    return out


def print_tables(result: dict) -> None:
    env = result["env"]
    print(f"\nB{env['batch']} T=S={env['seq']} H{env['heads_q']}/K{env['heads_kv']} D{env['head_dim']} fp32, "
          f"blocks {env['block']} ({env['num_blocks']} kv blocks), causal, {env['repeats']} alternating repeats "
          f"({env['settle_s']} s pauses); "
          f"speed vs a baseline: median [min-max] of the per-repeat ratios (ideal: the ratio of query-key pairs)")
    for pass_name in ("fwd", "fwd+bwd"):
        print(f"\n| {pass_name} | k | block sparsity | pairs (M) | median ms | spread | "
              + " | ".join(f"vs {base} (ideal)" for base in BASELINES) + " |")
        print("|---|---|---|---|---|---|" + "---|" * len(BASELINES))
        for r in result["rows"]:
            if r["pass"] != pass_name:
                continue
            ratios = [f"{r['speed_vs'][b]['median']:.2f}x [{r['speed_vs'][b]['min']:.2f}-"
                      f"{r['speed_vs'][b]['max']:.2f}] ({r['ideal_vs'][b]:.2f}x)" for b in BASELINES]
            print(f"| {r['name']} | {'–' if r['k'] is None else r['k']} | {100 * r['sparsity']:.1f}% "
                  f"| {r['pairs'] / 1e6:.2f} | {1e3 * r['median_s']:,.1f} | {100 * r['spread']:.0f}% | "
                  + " | ".join(ratios) + " |")
    fit = result["fwd_cost_vs_k"]
    print(f"\nforward cost vs k (k = {', '.join(map(str, fit['ks']))}): {fit['ms_per_block']:.2f} ms per selected "
          f"block + {fit['intercept_ms']:.2f} ms (least-squares line; worst deviation from it "
          f"{100 * fit['worst_deviation']:.0f}%)")
    checks = ", ".join(f"{name} {err:.1e}" for name, err in result["rel_err_vs_dense_xla"].items())
    print(f"forward outputs against dense xla (relative error): {checks}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, two repeats")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--ks", default="2,4,6,8,16", help="selected blocks per query block to sweep")
    parser.add_argument("--repeats", type=int, default=7, help="alternating repeats (default 7)")
    parser.add_argument("--settle-s", type=float, default=1.0,
                        help="untimed pause after each timed call (default 1; smoke: 0)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    seq, block, ks, repeats = ((256, 16, [2, 4], 2) if args.smoke else
                               (args.seq, args.block, [int(k) for k in args.ks.split(",")], args.repeats))
    b, hq, hkv, d = 1, 4, 2, 64
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, seq, hq, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, seq, hkv, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, seq, hkv, d), jnp.float32)
    d_out = jax.random.normal(keys[3], (b, seq, hq, d), jnp.float32)
    rows = contenders(seq, block, ks, hq, hkv)
    reference = jax.jit(rows[DENSE_XLA]["attend"])(q, k, v)
    errors = {name: rel_err(jax.jit(rows[name]["attend"])(q, k, v, *rows[name]["lists"]), reference)
              for name in BASELINES[:2]}
    if max(errors.values()) > CHECK_TOL:
        raise AssertionError(f"baselines disagree with dense xla: {errors}")
    settle_s = 0.0 if args.smoke else args.settle_s
    timed = timed_rows(rows, q, k, v, d_out, repeats, settle_s)
    sparse_fwd = [r for r in timed if r["pass"] == "fwd" and r["name"] not in BASELINES]
    slope, intercept = np.polyfit([r["k"] for r in sparse_fwd], [r["median_s"] for r in sparse_fwd], 1)
    worst = max(abs(slope * r["k"] + intercept - r["median_s"]) / r["median_s"] for r in sparse_fwd)
    num_blocks = seq // block
    result = dict(
        env=dict(jax=jax.__version__, backend=jax.default_backend(), machine=platform.machine(), cpus=os.cpu_count(),
                 date=time.strftime("%Y-%m-%d"), seq=seq, block=block, num_blocks=num_blocks, batch=b, heads_q=hq,
                 heads_kv=hkv, head_dim=d, dtype="float32", repeats=repeats, settle_s=settle_s,
                 argv=sys.argv[1:] if argv is None else argv, elapsed_s=round(time.perf_counter() - start, 1)),
        baselines=list(BASELINES), rel_err_vs_dense_xla=errors, rows=timed,
        fwd_cost_vs_k=dict(ks=[r["k"] for r in sparse_fwd], ms_per_block=1e3 * slope, intercept_ms=1e3 * intercept,
                           worst_deviation=worst))
    print_tables(result)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
