"""One-shot kernel benchmark for one lent GPU (an H200): attnzoo's Pallas kernels against what JAX users have.

Flash attention (bf16, layout [B, S, H, D]), forward and forward+backward (jax.value_and_grad of sum(out * dO)):
  attnzoo_triton      pallas_kernels.flash_attention(..., implementation="triton")
  attnzoo_mosaic_gpu  the same with implementation="mosaic_gpu": FA3-style Mosaic GPU forward, Triton backward
                      (n/a where it cannot take the case: Dv != Dqk, head dims other than 64/128/256);
                      attnzoo_mosaic_gpu_psmem: its interpreter-tested variant (P staged through SMEM, fresh P V
                      accumulator added to O)
  cudnn, xla          jax.nn.dot_product_attention(implementation=...)  (cuDNN has no Dv != Dqk: n/a for MLA;
                                                                        xla gets V zero-padded to Dqk there)
  jax_pallas_mha      jax.experimental.pallas.ops.gpu.attention.mha      (K/V heads repeated for GQA)
  tokamax_mosaic, tokamax_triton   tokamax.dot_product_attention, when tokamax imports
Block-sparse attention (bf16, causal, GQA 16q/4kv, D128, blocks 64; lists: the diagonal block plus k - 1 random
earlier blocks per query block) at 16k / 32k / 64k tokens and 90% / 97% block sparsity (1 - k / causal blocks per
query block), forward and forward+backward: attnzoo_block_sparse_triton (block_sparse_attention(implementation=
"triton")) against dense causal attention at the same length through attnzoo_triton_dense (flash_attention triton)
and cudnn_dense; reported as speedups beside the ideal N / (2 k B). The sparse kernel is checked (output and
gradients, f32 block-sparse XLA reference) on its batch 0, first kv head and last <= 1024 queries.
Decode (bf16, one KV cache per sequence, full lengths): attnzoo's split-K kernel (implementation="triton": default
and two variants), its XLA reference (implementation="xla"), and for Tq == 1 jax.nn (xla, cudnn with
key_value_seq_lengths) and JAX's Pallas `decode_attention.gqa`.

Every implementation is first checked against a float32 reference (flash: batch 0, kv head 0 and its q heads, output
and all three gradients; decode: the whole output) by ||out - ref|| / ||ref||; a wrong one is marked and not timed.
Timing: compile, one warm call, then the median over `--reps` repetitions of `iters` back-to-back calls, each
repetition closed by block_until_ready. `--budget-s` caps the run; each case gets an equal share of what is left.
FLOPs: forward 2*B*Hq*S^2*(Dqk + Dv), halved when causal (= 4*B*S^2*H*D when Dqk == Dv, the FA convention of
shared/anchors); forward+backward 3.5x that. Decode: GB/s over the K + V bytes below the lengths, and % of the
4.2 TB/s device-to-device copy ceiling measured in the anchors (also re-measured in this run).

GPU:   python experiments/bench_kernels.py --out $OUT/bench.json          (~6 min budget, see --budget-s)
CPU:   python experiments/bench_kernels.py --smoke --out /tmp/bench.json  (tiny shapes, interpret mode)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

warnings.filterwarnings("ignore", category=DeprecationWarning)  # Triton backend and ops.gpu deprecations

COPY_CEILING_TBPS = 4.20  # shared/anchors/README.md, H200 device-to-device copy (bytes read + written)
FWD_TOL, GRAD_TOL = 2e-2, 5e-2  # relative L2 error for bf16 operands (expected 1e-3 .. 1e-2)


@dataclasses.dataclass(frozen=True)
class FlashCase:
    name: str
    b: int
    s: int
    hq: int
    hkv: int
    dqk: int
    dv: int
    causal: bool

    @property
    def fwd_flops(self) -> float:
        return 2 * self.b * self.hq * self.s ** 2 * (self.dqk + self.dv) * (0.5 if self.causal else 1.0)


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    name: str
    b: int
    s: int
    tq: int
    hq: int
    hkv: int
    dqk: int
    dv: int

    @property
    def kv_bytes(self) -> int:  # full lengths: every cache entry is read once
        return self.b * self.s * self.hkv * (self.dqk + self.dv) * 2


FLASH_CASES = [
    FlashCase("b8_s2048_h16_d128_causal", 8, 2048, 16, 16, 128, 128, True),
    FlashCase("b2_s8192_h16_d128_causal", 2, 8192, 16, 16, 128, 128, True),
    FlashCase("b1_s16384_h16_d128_causal", 1, 16384, 16, 16, 128, 128, True),
    FlashCase("b4_s4096_h16_d64_causal", 4, 4096, 16, 16, 64, 64, True),
    FlashCase("b2_s8192_h16_d128_full", 2, 8192, 16, 16, 128, 128, False),
    FlashCase("b2_s8192_gqa32x8_d128_causal", 2, 8192, 32, 8, 128, 128, True),
    FlashCase("b2_s8192_h16_mla192x128_causal", 2, 8192, 16, 16, 192, 128, True),
]
DECODE_CASES = [
    DecodeCase("decode_b8_s4k_gqa32x8_d128", 8, 4096, 1, 32, 8, 128, 128),
    DecodeCase("decode_b8_s16k_gqa32x8_d128", 8, 16384, 1, 32, 8, 128, 128),
    DecodeCase("decode_b8_s64k_gqa32x8_d128", 8, 65536, 1, 32, 8, 128, 128),
    DecodeCase("decode_b8_s128k_gqa32x8_d128", 8, 131072, 1, 32, 8, 128, 128),
    DecodeCase("decode_b8_s16k_tq4_gqa32x8_d128", 8, 16384, 4, 32, 8, 128, 128),
    DecodeCase("decode_b8_s16k_mla_absorbed_h128_576x512", 8, 16384, 1, 128, 1, 576, 512),
]
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
    length = f"{s // 1024}k" if s >= 1024 else str(s)
    return [BlockSparseCase(f"bsa_s{length}_gqa{shape['hq']}x{shape['hkv']}_d{shape['d']}_sparsity{round(100 * p)}",
                            s=s, k=max(1, round((1 - p) * causal_blocks)), **shape) for p in sparsities]


BLOCK_SPARSE_CASES = [case for s in (16384, 32768, 65536) for case in _sparse_cases(s)]
SMOKE_BLOCK_SPARSE = _sparse_cases(256, sparsities=(0.6,), hq=2, hkv=1, d=64, block=32)
SMOKE_FLASH = [
    FlashCase("smoke_b1_s256_h2_d64_causal", 1, 256, 2, 2, 64, 64, True),
    FlashCase("smoke_b1_s256_gqa4x2_d64_full", 1, 256, 4, 2, 64, 64, False),
    FlashCase("smoke_b1_s256_h2_mla96x64_causal", 1, 256, 2, 2, 96, 64, True),
]
SMOKE_DECODE = [
    DecodeCase("smoke_decode_b2_s512_gqa4x2_d64", 2, 512, 1, 4, 2, 64, 64),
    DecodeCase("smoke_decode_b2_s256_tq2_mla_absorbed_h4_576x512", 2, 256, 2, 4, 1, 576, 512),
]


class NotApplicable(Exception):
    """The implementation does not support this case (recorded as n/a, not as a failure)."""


# ----------------------------------------------------------------------------------------------- implementations
def flash_implementations(smoke: bool) -> dict[str, Callable[[FlashCase], Callable]]:
    def attnzoo(implementation):
        def make(case):
            from pallas_kernels import flash_attention
            return lambda q, k, v: flash_attention(q, k, v, causal=case.causal, implementation=implementation)
        return make

    def attnzoo_mosaic_gpu_psmem(case):
        from pallas_kernels.flash_attention import pallas_mosaic_gpu
        return lambda q, k, v: pallas_mosaic_gpu.flash_attention_mosaic_gpu(
            q, k, v, causal=case.causal, scale=case.dqk ** -0.5, interpret=smoke, p_in_smem=True,
            acc_in_place=False)[0]

    def mosaic_gpu(make_impl):
        def make(case):
            from pallas_kernels.flash_attention import pallas_mosaic_gpu
            if case.dqk != case.dv or case.dqk not in pallas_mosaic_gpu.HEAD_DIMS:
                raise NotApplicable("implementation='mosaic_gpu' needs Dv == Dqk in (64, 128, 256)")
            if smoke and (os.cpu_count() or 1) < 4:
                raise NotApplicable("Mosaic GPU interpreter can deadlock on < 4 host cores")
            return make_impl(case)
        return make

    def jax_nn(implementation):
        def make(case):
            if implementation == "cudnn" and smoke:
                raise NotApplicable("cuDNN needs a GPU")
            if implementation == "cudnn" and case.dqk != case.dv:
                raise NotApplicable("jax.nn cuDNN path needs Dv == Dqk")

            def f(q, k, v):
                pad = case.dqk - case.dv  # xla only: V zero-padded to Dqk, output sliced back
                v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, pad))) if pad else v
                o = jax.nn.dot_product_attention(q, k, v, is_causal=case.causal, implementation=implementation)
                return o[..., :case.dv]
            return f
        return make

    def jax_pallas_mha(case):
        if case.dqk != case.dv:
            raise NotApplicable("mha needs Dv == Dqk")
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention
        rep = case.hq // case.hkv

        def f(q, k, v):
            if rep > 1:
                k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
            return pallas_attention.mha(q, k, v, None, sm_scale=case.dqk ** -0.5, causal=case.causal,
                                        interpret=smoke)
        return f

    def tokamax_impl(implementation):
        def make(case):
            import tokamax
            return lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=case.causal,
                                                                 implementation=implementation)
        return make

    # In priority order: when a case runs out of its share of the budget, the last ones are skipped.
    return {"attnzoo_triton": attnzoo("triton"), "attnzoo_mosaic_gpu": mosaic_gpu(attnzoo("mosaic_gpu")),
            "cudnn": jax_nn("cudnn"), "jax_pallas_mha": jax_pallas_mha, "tokamax_mosaic": tokamax_impl("mosaic"),
            "tokamax_triton": tokamax_impl("triton"), "xla": jax_nn("xla"),
            "attnzoo_mosaic_gpu_psmem": mosaic_gpu(attnzoo_mosaic_gpu_psmem)}


def decode_implementations(smoke: bool) -> dict[str, Callable[[DecodeCase], Callable]]:
    def attnzoo(implementation, block_k=None, splits_factor=None):
        def make(case):
            from pallas_kernels import decode_attention
            num_splits = None if splits_factor is None else splits_factor * decode_config(case).num_splits
            return lambda q, k, v, lengths: decode_attention(q, k, v, lengths, implementation=implementation,
                                                             block_k=block_k, num_splits=num_splits)
        return make

    def jax_nn(implementation):
        def make(case):
            if implementation == "cudnn" and smoke:
                raise NotApplicable("cuDNN needs a GPU")
            if case.tq != 1 or case.dqk != case.dv:
                raise NotApplicable("jax.nn decode: Tq == 1 and Dv == Dqk only")
            return lambda q, k, v, lengths: jax.nn.dot_product_attention(
                q, k, v, key_value_seq_lengths=lengths, implementation=implementation)
        return make

    def jax_pallas_gqa(case):
        if case.tq != 1 or case.dqk != case.dv:
            raise NotApplicable("ops.gpu.decode_attention.gqa: Tq == 1 and Dv == Dqk only")
        from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode
        return lambda q, k, v, lengths: pallas_decode.gqa(q[:, 0], k, v, kv_seq_len=lengths,
                                                          interpret=smoke)[:, None]

    # In priority order, as for flash.
    return {"attnzoo_triton": attnzoo("triton"), "cudnn": jax_nn("cudnn"), "jax_pallas_gqa": jax_pallas_gqa,
            "attnzoo_triton_bk64": attnzoo("triton", block_k=64),
            "attnzoo_triton_splits_x2": attnzoo("triton", splits_factor=2), "jax_nn_xla": jax_nn("xla"),
            "attnzoo_xla": attnzoo("xla")}


def block_sparse_implementations(smoke: bool) -> dict[str, Callable]:
    """name -> make(case, lists, counts) -> fn(q, k, v), in priority order (sparse kernel, then the dense
    baselines at the same length, which ignore the lists)."""
    def sparse(case, lists, counts):
        from pallas_kernels import block_sparse_attention
        return lambda q, k, v: block_sparse_attention(q, k, v, lists, counts, block_q=case.block, block_k=case.block,
                                                      implementation="triton")

    def dense(implementation):
        def make(case, lists, counts):
            if implementation == "cudnn" and smoke:
                raise NotApplicable("cuDNN needs a GPU")
            from pallas_kernels import flash_attention
            return lambda q, k, v: flash_attention(q, k, v, causal=True, implementation=implementation)
        return make

    return {"attnzoo_block_sparse_triton": sparse, "cudnn_dense": dense("cudnn"),
            "attnzoo_triton_dense": dense("triton")}


def decode_config(case: DecodeCase, **overrides):
    """The attnzoo kernel's launch configuration for a case (recorded with its rows)."""
    from pallas_kernels.decode_attention import pallas_triton
    return pallas_triton.decode_config(case.b, case.s, case.tq, case.hq, case.hkv, case.dqk, case.dv, 2, **overrides)


# --------------------------------------------------------------------------------------------------- references
def reference_attention_f32(q, k, v, causal):
    """Plain float32 attention, [1, S, G, D] queries against one kv head [1, S, 1, D]."""
    hi = jax.lax.Precision.HIGHEST
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    logits = jnp.einsum("bqhd,bkd->bhqk", q, k[:, :, 0], precision=hi) * q.shape[-1] ** -0.5
    if causal:
        s = q.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((s, s), bool)), logits, -jnp.inf)
    return jnp.einsum("bhqk,bkd->bqhd", jax.nn.softmax(logits, axis=-1), v[:, :, 0], precision=hi)


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if not np.isfinite(x).all():
        return float("inf")
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


# ------------------------------------------------------------------------------------------------------ harness
def case_fields(case) -> dict:
    fields = dataclasses.asdict(case)
    return dict(case=fields.pop("name"), **fields)



class Bench:
    def __init__(self, args):
        self.args, self.rows, self.t_start = args, [], time.perf_counter()
        self.deadline = self.t_start + args.budget_s
        self.only = [t for t in (args.only or "").split(",") if t]

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def share(self, cases_left: int, reserve_s: float) -> float:
        """Deadline for the next case: an equal share of what is left after `reserve_s` (unused time carries on)."""
        self.reserve_s = reserve_s
        return time.perf_counter() + (self.left() - reserve_s) / cases_left

    def prepare(self, row: dict, make, case, case_deadline: float, first: bool):
        """`make(case)` with row["status"] = "ok", or None once the row is recorded as n/a, error or skipped.

        A case's first (most important) runnable implementation runs while the part has time left; the others
        only within the case's share."""
        try:
            fn = make(case)
        except NotApplicable as e:
            self.record(dict(row, status="n/a", note=str(e)))
            return None
        except Exception as e:  # import errors etc. are a row, not the end of the run
            self.record(dict(row, status="error", note=f"{type(e).__name__}: {e}"[:300]))
            return None
        if self.left() < self.reserve_s if first else time.perf_counter() > case_deadline:
            self.record(dict(row, status="skipped", note="time budget"))
            return None
        row["status"] = "ok"
        return fn

    def wanted(self, case_name: str, impl: str) -> bool:
        return not self.only or any(t in f"{case_name}/{impl}" for t in self.only)

    def record(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        with open(self.args.out, "w") as fh:  # rewritten after every row: a killed run keeps what it measured
            json.dump(dict(env=self.env(), rows=self.rows), fh, indent=1)

    def env(self) -> dict:
        return dict(jax=jax.__version__, backend=jax.default_backend(),
                    device=jax.devices()[0].device_kind, smoke=self.args.smoke, argv=sys.argv[1:],
                    elapsed_s=round(time.perf_counter() - self.t_start, 1))

    def time(self, fn, *args) -> tuple[float, float]:
        """Median seconds per call and the spread (max - min) / median over the reps; fn is compiled already."""
        jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        once = time.perf_counter() - t0
        iters = 1 if self.args.smoke else int(np.clip(round(self.args.rep_s / max(once, 1e-6)), 1, 50))
        reps = 1 if self.args.smoke else self.args.reps
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(iters):
                out = fn(*args)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - t0) / iters)
        med = statistics.median(times)
        return med, (max(times) - min(times)) / med


def ceiling(bench: Bench) -> None:
    n = (1 << 20) if bench.args.smoke else (1 << 30)
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    copy = jax.jit(lambda x: x * 1.0001)
    jax.block_until_ready(copy(x))
    t, spread = bench.time(copy, x)
    bench.record(dict(part="ceiling", name="copy_f32", bytes=8 * n, us=t * 1e6, tbps=8 * n / t / 1e12,
                      spread=spread))


def flash(bench: Bench, cases: list[FlashCase], reserve_s: float) -> None:
    impls = flash_implementations(bench.args.smoke)
    cases = [case for case in cases if any(bench.wanted(case.name, name) for name in impls)]
    for i, case in enumerate(cases):
        case_deadline = bench.share(len(cases) - i, reserve_s)
        first = True
        ks = jax.random.split(jax.random.key(case.s + case.dqk), 4)
        q = jax.random.normal(ks[0], (case.b, case.s, case.hq, case.dqk), jnp.bfloat16)
        k = jax.random.normal(ks[1], (case.b, case.s, case.hkv, case.dqk), jnp.bfloat16)
        v = jax.random.normal(ks[2], (case.b, case.s, case.hkv, case.dv), jnp.bfloat16)
        do = jax.random.normal(ks[3], (case.b, case.s, case.hq, case.dv), jnp.bfloat16)
        group = case.hq // case.hkv

        def sub(x, heads):  # batch 0, kv head 0 and its q heads: exact references for outputs and gradients
            return x[:1, :, :heads].astype(jnp.float32)

        def ref_loss(q_, k_, v_, do_):
            return jnp.sum(reference_attention_f32(q_, k_, v_, case.causal) * do_)

        ref_out = jax.jit(reference_attention_f32, static_argnums=3)(
            sub(q, group), sub(k, 1), sub(v, 1), case.causal)
        ref_grads = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(sub(q, group), sub(k, 1), sub(v, 1),
                                                                   sub(do, group))
        for name, make in impls.items():
            if not bench.wanted(case.name, name):
                continue
            row = dict(part="flash", impl=name, **case_fields(case))
            fn = bench.prepare(row, make, case, case_deadline, first)
            if fn is None:
                continue
            first = False
            fwd = jax.jit(fn)

            def loss(q_, k_, v_, do_, fn=fn):
                return jnp.sum(fn(q_, k_, v_).astype(jnp.float32) * do_.astype(jnp.float32))

            fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            try:
                row["fwd_err"] = rel_err(sub(fwd(q, k, v), group), ref_out)
                if row["fwd_err"] > FWD_TOL:
                    row["status"] = "wrong"
                else:
                    t, row["fwd_spread"] = bench.time(fwd, q, k, v)
                    row.update(fwd_ms=t * 1e3, fwd_tflops=case.fwd_flops / t / 1e12)
            except Exception as e:
                row.update(status="error", fwd_error=f"{type(e).__name__}: {e}"[:300])
            if row["status"] == "ok" and bench.left() > reserve_s:
                try:
                    _, grads = fwd_bwd(q, k, v, do)
                    errs = [rel_err(sub(g, h), r) for g, h, r in zip(grads, (group, 1, 1), ref_grads)]
                    row["grad_err"] = max(errs)
                    if row["grad_err"] > GRAD_TOL:
                        row["status"] = "wrong_grad"
                    else:
                        t, row["fwdbwd_spread"] = bench.time(fwd_bwd, q, k, v, do)
                        row.update(fwdbwd_ms=t * 1e3, fwdbwd_tflops=3.5 * case.fwd_flops / t / 1e12)
                except Exception as e:
                    row.update(fwdbwd_error=f"{type(e).__name__}: {e}"[:300])
            elif row["status"] == "ok":
                row["fwdbwd_error"] = "skipped: time budget"
            bench.record(row)
            del fwd, fwd_bwd


def block_sparse(bench: Bench, cases: list[BlockSparseCase], reserve_s: float) -> None:
    """The block-sparse kernel per case; the dense baselines once per sequence length (its first case)."""
    from experiments.bench_block_sparse import causal_random_lists
    from pallas_kernels import block_sparse_attention
    impls = block_sparse_implementations(bench.args.smoke)
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


def decode(bench: Bench, cases: list[DecodeCase]) -> None:
    from pallas_kernels.decode_attention import decode_attention_reference
    impls = decode_implementations(bench.args.smoke)
    cases = [case for case in cases if any(bench.wanted(case.name, name) for name in impls)]
    for i, case in enumerate(cases):
        case_deadline = bench.share(len(cases) - i, 0.0)
        first = True
        ks = jax.random.split(jax.random.key(case.s), 3)
        q = jax.random.normal(ks[0], (case.b, case.tq, case.hq, case.dqk), jnp.bfloat16)
        k = jax.random.normal(ks[1], (case.b, case.s, case.hkv, case.dqk), jnp.bfloat16)
        v = jax.random.normal(ks[2], (case.b, case.s, case.hkv, case.dv), jnp.bfloat16)
        lengths = jnp.full((case.b,), case.s, jnp.int32)
        ref = jax.jit(decode_attention_reference)(q.astype(jnp.float32), k.astype(jnp.float32),
                                                  v.astype(jnp.float32), lengths)
        for name, make in impls.items():
            if not bench.wanted(case.name, name):
                continue
            row = dict(part="decode", impl=name, **case_fields(case))
            if name.startswith("attnzoo_triton"):
                cfg = decode_config(case, block_k=64 if name.endswith("bk64") else None)
                if name.endswith("splits_x2"):
                    cfg = decode_config(case, num_splits=2 * cfg.num_splits)
                row["config"] = dataclasses.asdict(cfg)
            fn = bench.prepare(row, make, case, case_deadline, first)
            if fn is None:
                continue
            first = False
            try:
                fn = jax.jit(fn)
                row["err"] = rel_err(fn(q, k, v, lengths), ref)
                if row["err"] > FWD_TOL:
                    row["status"] = "wrong"
                else:
                    t, row["spread"] = bench.time(fn, q, k, v, lengths)
                    gbps = case.kv_bytes / t / 1e9
                    row.update(us=t * 1e6, gbps=gbps, pct_copy_ceiling=100 * gbps / 1e3 / COPY_CEILING_TBPS)
            except Exception as e:
                row.update(status="error", note=f"{type(e).__name__}: {e}"[:300])
            bench.record(row)


# ------------------------------------------------------------------------------------------------------- report
def _fmt(x, spec=".0f") -> str:
    return "–" if x is None else format(x, spec)


def _status(r: dict) -> str:
    return {"ok": "", "n/a": "n/a", "skipped": "skipped"}.get(r["status"], r["status"].upper())


def report(rows: list[dict]) -> str:
    lines = ["", "## Flash attention, bf16: TFLOP/s forward / forward+backward (ratio vs cuDNN, vs JAX Pallas mha)",
             "| case | impl | fwd | fwd+bwd | x cuDNN | x mha | fwd err | grad err | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    flash_rows = [r for r in rows if r["part"] == "flash"]
    for r in flash_rows:
        peers = {p["impl"]: p for p in flash_rows if p["case"] == r["case"]}

        def ratio(peer):
            p = peers.get(peer, {})
            parts = [(r.get(key) / p[key]) if r.get(key) and p.get(key) else None
                     for key in ("fwd_tflops", "fwdbwd_tflops")]
            return " / ".join(_fmt(x, ".2f") for x in parts)

        note = _status(r) + " " + (r.get("note") or r.get("fwd_error") or r.get("fwdbwd_error") or "")[:70]
        tflops = " | ".join(_fmt(r.get(key), ".3g") for key in ("fwd_tflops", "fwdbwd_tflops"))
        lines.append(f"| {r['case']} | {r['impl']} | {tflops} "
                     f"| {ratio('cudnn')} | {ratio('jax_pallas_mha')} | {_fmt(r.get('fwd_err'), '.1e')} "
                     f"| {_fmt(r.get('grad_err'), '.1e')} | {note.strip()} |")
    lines += ["", "## Block-sparse attention, bf16 causal: ms and speedup over dense causal attention at the same "
              "length (cuDNN / our dense Triton) beside the ideal N/(2kB)",
              "| case | k | sparsity | ideal | fwd ms | fwd x cuDNN / x triton | fwd+bwd ms "
              "| fwd+bwd x cuDNN / x triton | err fwd / grad | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    sparse_rows = [r for r in rows if r["part"] == "block_sparse"]
    for r in sparse_rows:
        if r["impl"] != "attnzoo_block_sparse_triton":
            continue
        dense = {p["impl"]: p for p in sparse_rows if p["s"] == r["s"] and p["impl"].endswith("_dense")}

        def speedups(key):
            return " / ".join(_fmt(dense.get(d, {}).get(key) / r[key] if r.get(key) and dense.get(d, {}).get(key)
                                   else None, ".2f") for d in ("cudnn_dense", "attnzoo_triton_dense"))

        note = _status(r) + " " + (r.get("note") or r.get("fwdbwd_error") or "")[:70]
        lines.append(f"| {r['case']} | {r['k']} | {100 * r['sparsity']:.1f}% | {r['ideal_speedup']:.1f}x "
                     f"| {_fmt(r.get('fwd_ms'), '.2f')} | {speedups('fwd_ms')} | {_fmt(r.get('fwdbwd_ms'), '.2f')} "
                     f"| {speedups('fwdbwd_ms')} | {_fmt(r.get('fwd_err'), '.1e')} / {_fmt(r.get('grad_err'), '.1e')} "
                     f"| {note.strip()} |")
    for r in sparse_rows:
        if r["impl"].endswith("_dense"):
            lines.append(f"dense {r['impl']} at S={r['s']}: fwd {_fmt(r.get('fwd_ms'), '.2f')} ms, fwd+bwd "
                         f"{_fmt(r.get('fwdbwd_ms'), '.2f')} ms {_status(r)} {(r.get('note') or '')[:70]}".rstrip())
    lines += ["", f"## Decode, bf16: achieved HBM GB/s on the KV bytes read (% of {COPY_CEILING_TBPS} TB/s copy)",
              "| case | impl | us | GB/s | % ceiling | x jax gqa | err | note |", "|---|---|---|---|---|---|---|---|"]
    decode_rows = [r for r in rows if r["part"] == "decode"]
    for r in decode_rows:
        gqa = next((p.get("gbps") for p in decode_rows if p["case"] == r["case"] and p["impl"] == "jax_pallas_gqa"),
                   None)
        note = _status(r) + " " + (r.get("note") or "")[:70]
        lines.append(f"| {r['case']} | {r['impl']} | {_fmt(r.get('us'), '.1f')} | {_fmt(r.get('gbps'))} "
                     f"| {_fmt(r.get('pct_copy_ceiling'), '.1f')} "
                     f"| {_fmt(r['gbps'] / gqa if gqa and r.get('gbps') else None, '.2f')} "
                     f"| {_fmt(r.get('err'), '.1e')} | {note.strip()} |")
    for r in rows:
        if r["part"] == "ceiling":
            lines.append(f"\ncopy ceiling this run: {r['tbps']:.2f} TB/s (anchor {COPY_CEILING_TBPS})")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode: runs on a CPU")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_results.json"))
    parser.add_argument("--only", default=None, help="comma-separated substrings of 'case/impl' to run")
    parser.add_argument("--budget-s", type=float, default=340.0, help="wall-clock budget for the whole run")
    parser.add_argument("--decode-reserve-s", type=float, default=90.0, help="budget kept back for decode")
    parser.add_argument("--block-sparse-s", type=float, default=110.0,
                        help="budget kept back from flash for the block-sparse part")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rep-s", type=float, default=0.03, help="target seconds per timed repetition")
    args = parser.parse_args(argv)
    bench = Bench(args)
    print(json.dumps(bench.env()), flush=True)
    for part in (lambda: ceiling(bench),
                 lambda: flash(bench, SMOKE_FLASH if args.smoke else FLASH_CASES,
                               args.decode_reserve_s + args.block_sparse_s),
                 lambda: block_sparse(bench, SMOKE_BLOCK_SPARSE if args.smoke else BLOCK_SPARSE_CASES,
                                      args.decode_reserve_s),
                 lambda: decode(bench, SMOKE_DECODE if args.smoke else DECODE_CASES)):
        try:
            part()
        except Exception:
            bench.record(dict(part="error", traceback=traceback.format_exc()[-1500:]))
    bench.record(dict(part="done", elapsed_s=round(time.perf_counter() - bench.t_start, 1)))
    print(report(bench.rows))


if __name__ == "__main__":
    main()
