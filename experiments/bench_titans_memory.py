"""Peak memory of a Titans training step against sequence length, from XLA's compiled memory analysis (compile only,
nothing runs, so it works on a CPU host for any length).

    python experiments/bench_titans_memory.py --out /tmp/titans_memory               # 1k / 2k / 4k / 8k
    python experiments/bench_titans_memory.py --seq-lens 256 512 --plans lmm         # a quick look

For each plan and length: `jax.jit(grad step).lower(...).compile().memory_analysis()` of one loss + gradient step of
a one-layer model (batch 1), and the growth factor of the peak temporary memory from the previous length. At a fixed
memory chunk size the memory layers grow linearly (each chunk is rematerialised: only the carried memory state is
kept per chunk), so doubling the length about doubles their temporaries; the `gqa` row (full attention through the
XLA reference, which materialises the T x T scores) is the quadratic contrast. MAG's sliding-window attention also
runs through that reference on this backend (a T x T masked score matrix), so its growth is quadratic here and
linear only with the flash kernels on a GPU; MAC's attention is per segment, so it stays linear.
Writes OUT/results.md and OUT/results.csv.

    python experiments/bench_titans_memory.py --timing --seq-lens 2048           # runs: is a memory kernel worth it?

`--timing` instead runs the chunked memory alone (depth 2, momentum, decay; E = d_model / n_heads) forward and
forward + backward on this backend, next to a dense matmul, and reports the memory's achieved GFLOP/s (its forward
FLOPs from `memory_flops_per_head`), the backward / forward time ratio, and the matmul's GFLOP/s: the head-room a
hand-written kernel could win back. Writes OUT/timing.md.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo import LanguageModel, ModelConfig
from attnzoo.mixers.titans_memory import Gates, MemoryState, memory_flops_per_head, memory_layer_widths, scan_memory

DEFAULT_PLANS = ("lmm(chunk_size=64)", "titans_mac(chunk_size=64)", "titans_mag(chunk_size=64,window=256)", "gqa")


def training_step_memory(plan: str, seq_len: int, d_model: int, n_heads: int) -> dict:
    """Compiled memory analysis of one loss + grad step of a one-layer model of `plan` at batch 1."""
    cfg = ModelConfig(vocab_size=256, d_model=d_model, n_layers=1, n_heads=n_heads, max_seq_len=seq_len,
                      plan=f"{plan}[mlp=none]", kernels={"flash_attention": "xla", "decode_attention": "xla"})
    graphdef, params = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)))

    def loss(params, tokens_BT):
        logits = nnx.merge(graphdef, params)(tokens_BT[:, :-1]).logits_BTV
        target = jnp.take_along_axis(logits, tokens_BT[:, 1:, None], -1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - target)

    started = time.time()
    tokens = jax.ShapeDtypeStruct((1, seq_len + 1), jnp.int32)
    analysis = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile().memory_analysis()
    return dict(plan=plan, seq_len=seq_len, temp_mib=analysis.temp_size_in_bytes / 2**20,
                argument_mib=analysis.argument_size_in_bytes / 2**20,
                output_mib=analysis.output_size_in_bytes / 2**20, compile_s=time.time() - started)


def best_time(fn, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - started)
    return min(times)


def memory_timing(seq_len: int, d_model: int, n_heads: int, chunk: int, batch: int = 1) -> dict:
    """Forward and forward + backward time of the chunked memory alone, its achieved GFLOP/s, and a dense matmul's."""
    e = d_model // n_heads
    widths = memory_layer_widths(e, 2, 4)
    keys = iter(jax.random.split(jax.random.key(0), 8))

    def normal(*shape, scale=1.0):
        return scale * jax.random.normal(next(keys), shape, jnp.float32)

    weights = tuple(normal(batch, n_heads, p, q, scale=p**-0.5) for p, q in widths)
    q, k, v = (normal(batch, seq_len, n_heads, e) for _ in range(3))
    q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    gates = Gates(jnp.full((batch, seq_len, n_heads), 0.01), jnp.full((batch, seq_len, n_heads), -0.7),
                  jnp.full((batch, seq_len, n_heads), -0.01))

    def forward(weights, q, k, v):
        state = MemoryState(weights, weights, tuple(jnp.zeros_like(w) for w in weights))
        return scan_memory(state, q, k, v, gates, None, chunk=chunk, track_start=False, implementation="xla",
                           use_kernel=True)[0]

    forward_s = best_time(jax.jit(forward), weights, q, k, v)
    train_s = best_time(jax.jit(jax.grad(lambda *a: jnp.sum(forward(*a) ** 2), argnums=(0, 1, 2, 3))),
                        weights, q, k, v)
    flops = batch * seq_len * n_heads * memory_flops_per_head(widths, chunk, True)
    a, b = normal(1024, 1024), normal(1024, 1024)
    matmul_s = best_time(jax.jit(lambda a, b: a @ b), a, b)
    return dict(seq_len=seq_len, chunk=chunk, head_dim=e, forward_ms=1e3 * forward_s, train_ms=1e3 * train_s,
                train_over_forward=train_s / forward_s, memory_gflops=flops / forward_s / 1e9,
                matmul_gflops=2 * 1024**3 / matmul_s / 1e9)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output directory (default: a new temporary one)")
    p.add_argument("--plans", nargs="+", default=list(DEFAULT_PLANS))
    p.add_argument("--seq-lens", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--timing", action="store_true", help="time the memory alone instead (see the module docstring)")
    p.add_argument("--chunks", nargs="+", type=int, default=[16, 64], help="memory chunk sizes for --timing")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="titans-memory-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.timing:
        rows = [memory_timing(t, args.d_model, args.n_heads, c) for t in args.seq_lens for c in args.chunks]
        table = ["| seq len | chunk | E | forward ms | fwd+bwd ms | fwd+bwd / fwd | memory GFLOP/s (fwd) | "
                 "matmul GFLOP/s |", "|---|---|---|---|---|---|---|---|"]
        table += [f"| {r['seq_len']} | {r['chunk']} | {r['head_dim']} | {r['forward_ms']:.1f} | {r['train_ms']:.1f} | "
                  f"{r['train_over_forward']:.1f} | {r['memory_gflops']:.1f} | {r['matmul_gflops']:.1f} |"
                  for r in rows]
        (out / "timing.md").write_text(f"Chunked memory alone, d_model {args.d_model}, {args.n_heads} heads, batch 1, "
                                       f"on {jax.default_backend()}\n\n" + "\n".join(table) + "\n")
        print("\n".join(table))
        return rows
    rows = []
    for plan in args.plans:
        previous = None
        for seq_len in args.seq_lens:
            row = training_step_memory(plan, seq_len, args.d_model, args.n_heads)
            row["growth"] = row["temp_mib"] / previous if previous else float("nan")
            previous = row["temp_mib"]
            rows.append(row)
            print(f"{plan} T={seq_len}: temp {row['temp_mib']:.1f} MiB (x{row['growth']:.2f}), "
                  f"compiled in {row['compile_s']:.0f} s", flush=True)
    write_results(rows, out, f"one layer, d_model {args.d_model}, {args.n_heads} heads, batch 1, float32, "
                             f"jax {jax.__version__} on {jax.default_backend()}")
    return rows


def write_results(rows: list[dict], out: Path, caption: str) -> None:
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = ["| plan | seq len | peak temp (MiB) | x previous | arguments (MiB) |", "|---|---|---|---|---|"]
    table += [f"| `{r['plan']}` | {r['seq_len']} | {r['temp_mib']:.1f} | "
              f"{'' if r['growth'] != r['growth'] else f'{r['growth']:.2f}'} | {r['argument_mib']:.1f} |"
              for r in rows]
    (out / "results.md").write_text(f"Training-step memory (compiled, not run): {caption}\n\n" + "\n".join(table)
                                    + "\n")
    print("\n".join(table))
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}")


if __name__ == "__main__":
    main(sys.argv[1:])
