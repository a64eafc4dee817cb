"""Block-sparse attention (bf16, causal, GQA 16q/4kv, D128, blocks 64; lists: the diagonal block plus k - 1 random
earlier blocks per query block) at 16k / 32k / 64k tokens and 90% / 97% block sparsity (1 - k / causal blocks per
query block), forward and forward+backward: attnzoo_block_sparse_triton (block_sparse_attention(implementation=
"triton")) against dense causal attention at the same length through attnzoo_triton_dense (flash_attention triton)
and cudnn_dense; reported as speedups beside the ideal N / (2 k B). The sparse kernel is checked (output and
gradients, f32 block-sparse XLA reference) on its batch 0, first kv head and last <= 1024 queries.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from experiments.bench_common import FWD_TOL, GRAD_TOL, Bench, case_fields, fmt, length_label, rel_err, status_cell
from experiments.bench_kernels.flash_attention import dense_causal_flash


@dataclasses.dataclass(frozen=True)
class BlockSparseCase:
    name: str
    b: int
    s: int
    hq: int
    hkv: int
    d: int
    block: int
    k: int  # selected kv blocks per query block (the diagonal included)

    @property
    def sparsity(self) -> float:
        """1 - k / average causal blocks per query block: the work skipped relative to dense causal attention."""
        return 1 - self.k / ((self.s // self.block + 1) / 2)

    @property
    def ideal_speedup(self) -> float:
        return self.s / (2 * self.k * self.block)


def _sparse_cases(s: int, sparsities=(0.90, 0.97), **shape) -> list[BlockSparseCase]:
    shape = dict(dict(b=1, hq=16, hkv=4, d=128, block=64), **shape)
    causal_blocks = (s // shape["block"] + 1) / 2
    return [BlockSparseCase(f"bsa_s{length_label(s)}_gqa{shape['hq']}x{shape['hkv']}_d{shape['d']}_sparsity"
                            f"{round(100 * p)}",
                            s=s, k=max(1, round((1 - p) * causal_blocks)), **shape) for p in sparsities]


CASES = [case for s in (16384, 32768, 65536) for case in _sparse_cases(s)]
SMOKE_CASES = _sparse_cases(256, sparsities=(0.6,), hq=2, hkv=1, d=64, block=32)


def implementations(smoke: bool) -> dict[str, Callable]:
    """name -> make(case, lists, counts) -> fn(q, k, v), in priority order (sparse kernel, then the dense
    baselines at the same length, which ignore the lists)."""
    def sparse(case, lists, counts):
        from pallas_kernels import block_sparse_attention
        return lambda q, k, v: block_sparse_attention(q, k, v, lists, counts, block_q=case.block, block_k=case.block,
                                                      implementation="triton")

    def dense(implementation):
        make = dense_causal_flash(implementation, smoke)
        return lambda case, lists, counts: make(case)

    return {"attnzoo_block_sparse_triton": sparse, "cudnn_dense": dense("cudnn"),
            "attnzoo_triton_dense": dense("triton")}


def run(bench: Bench, cases: list[BlockSparseCase], reserve_s: float) -> None:
    """The block-sparse kernel per case; the dense baselines once per sequence length (its first case)."""
    from experiments.bench_block_sparse import causal_random_lists
    from pallas_kernels import block_sparse_attention
    impls = implementations(bench.args.smoke)
    cases = [case for case in cases if any(bench.wanted(case.name, name) for name in impls)]
    dense_done = set()
    for i, case in enumerate(cases):
        case_deadline = bench.share(len(cases) - i, reserve_s)
        ks = jax.random.split(jax.random.key(case.s + case.k), 4)
        q = jax.random.normal(ks[0], (case.b, case.s, case.hq, case.d), jnp.bfloat16)
        k = jax.random.normal(ks[1], (case.b, case.s, case.hkv, case.d), jnp.bfloat16)
        v = jax.random.normal(ks[2], (case.b, case.s, case.hkv, case.d), jnp.bfloat16)
        do = jax.random.normal(ks[3], (case.b, case.s, case.hq, case.d), jnp.bfloat16)
        lists, counts = causal_random_lists(case.s // case.block, case.k, seed=case.s + case.k, kv_heads=case.hkv)
        # Check on batch 0, kv head 0 (its q heads) and the last <= 1024 queries, against the f32 XLA path.
        group, tail = case.hq // case.hkv, min(case.s, 1024)
        sub = dict(block_q=case.block, block_k=case.block, q_positions_BT=jnp.arange(case.s - tail, case.s)[None],
                   kv_positions_BS=jnp.arange(case.s)[None])
        sub_lists, sub_counts = lists[:, :1, -tail // case.block:], counts[:, :1, -tail // case.block:]
        sub_args = (q[:1, -tail:, :group], k[:1, :, :1], v[:1, :, :1], do[:1, -tail:, :group])

        def sub_loss(implementation, q_, k_, v_, do_):
            out = block_sparse_attention(q_, k_, v_, sub_lists, sub_counts, implementation=implementation, **sub)
            return jnp.sum(out.astype(jnp.float32) * do_.astype(jnp.float32)), out

        f32 = [x.astype(jnp.float32) for x in sub_args]
        (_, ref_out), ref_grads = jax.jit(jax.value_and_grad(lambda *a: sub_loss("xla", *a), argnums=(0, 1, 2),
                                                             has_aux=True))(*f32)
        first = True
        for name, make in impls.items():
            is_dense = name.endswith("_dense")
            if not bench.wanted(case.name, name) or (is_dense and case.s in dense_done):
                continue
            row = dict(part="block_sparse", impl=name, **case_fields(case), sparsity=case.sparsity,
                       ideal_speedup=case.ideal_speedup)
            fn = bench.prepare(row, lambda c: make(c, lists, counts), case, case_deadline, first)
            if fn is None:
                continue
            first = False
            fwd = jax.jit(fn)
            fwd_bwd = jax.jit(jax.value_and_grad(
                lambda q_, k_, v_, do_, fn=fn: jnp.sum(fn(q_, k_, v_).astype(jnp.float32) * do_.astype(jnp.float32)),
                argnums=(0, 1, 2)))
            try:
                if not is_dense:
                    row["fwd_err"] = rel_err(fwd(q, k, v)[:1, -tail:, :group], ref_out)
                    (_, _), grads = jax.jit(jax.value_and_grad(
                        lambda *a: sub_loss("triton", *a), argnums=(0, 1, 2), has_aux=True))(*sub_args)
                    row["grad_err"] = max(rel_err(g, r) for g, r in zip(grads, ref_grads))
                    if row["fwd_err"] > FWD_TOL or row["grad_err"] > GRAD_TOL:
                        row["status"] = "wrong"
                if row["status"] == "ok":
                    t, row["fwd_spread"] = bench.time(fwd, q, k, v)
                    row["fwd_ms"] = t * 1e3
                    if bench.left() > reserve_s:
                        t, row["fwdbwd_spread"] = bench.time(fwd_bwd, q, k, v, do)
                        row["fwdbwd_ms"] = t * 1e3
                    else:
                        row["fwdbwd_error"] = "skipped: time budget"
            except Exception as e:
                row.update(status="error", note=f"{type(e).__name__}: {e}"[:300])
            if is_dense and row["status"] == "ok":
                dense_done.add(case.s)
            bench.record(row)
            del fwd, fwd_bwd


def report(rows: list[dict]) -> list[str]:
    lines = ["", "## Block-sparse attention, bf16 causal: ms and speedup over dense causal attention at the same "
             "length (cuDNN / our dense Triton) beside the ideal N/(2kB)",
             "| case | k | sparsity | ideal | fwd ms | fwd x cuDNN / x triton | fwd+bwd ms "
             "| fwd+bwd x cuDNN / x triton | err fwd / grad | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    sparse_rows = [r for r in rows if r["part"] == "block_sparse"]
    for r in sparse_rows:
        if r["impl"] != "attnzoo_block_sparse_triton":
            continue
        dense = {p["impl"]: p for p in sparse_rows if p["s"] == r["s"] and p["impl"].endswith("_dense")}

        def speedups(key):
            return " / ".join(fmt(dense.get(d, {}).get(key) / r[key] if r.get(key) and dense.get(d, {}).get(key)
                                  else None, ".2f") for d in ("cudnn_dense", "attnzoo_triton_dense"))

        note = status_cell(r) + " " + (r.get("note") or r.get("fwdbwd_error") or "")[:70]
        lines.append(f"| {r['case']} | {r['k']} | {100 * r['sparsity']:.1f}% | {r['ideal_speedup']:.1f}x "
                     f"| {fmt(r.get('fwd_ms'), '.2f')} | {speedups('fwd_ms')} | {fmt(r.get('fwdbwd_ms'), '.2f')} "
                     f"| {speedups('fwdbwd_ms')} | {fmt(r.get('fwd_err'), '.1e')} / {fmt(r.get('grad_err'), '.1e')} "
                     f"| {note.strip()} |")
    for r in sparse_rows:
        if r["impl"].endswith("_dense"):
            lines.append(f"dense {r['impl']} at S={r['s']}: fwd {fmt(r.get('fwd_ms'), '.2f')} ms, fwd+bwd "
                         f"{fmt(r.get('fwdbwd_ms'), '.2f')} ms {status_cell(r)} {(r.get('note') or '')[:70]}".rstrip())
    return lines
