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
Chunked linear attention (`linear` part, chunk 64): pallas_kernels.chunked_linear_attention(implementation="triton")
(`attnzoo_triton`; `_bf16`: on bf16 copies of float32 inputs) and "xla" on float32 inputs (`attnzoo_xla_f32`, the
float32 chunked reference), forward and forward+backward (value_and_grad of sum(o * dO) over q, k, v, log_decay), at
  * the peers' selective-scan shape B4 L2048 D2048 N16 fp32, mapped onto SSD: D = 32 heads x P 64 channels, one
    group of B, C (N = 16) as k, q, v = x * dt, log decay dt * A_h with one A per head (Mamba-2's scalar decay;
    the peers' Mamba-1 scan has one A per channel and state dimension, which the kernel does not take), against
    `lax.associative_scan` of the same recurrence (every token's [H, N, P] f32 state materialised, as the anchor
    does) and a sequential `lax.scan`;
  * a length sweep at 64k tokens per batch (B64 x T1k, B16 x T4k, B4 x T16k, B1 x T64k), Mamba-2 heads (H32, P64,
    N128, one group, bf16), against dense causal flash attention at the same B, T, 32 heads of width 64
    (`flash_attnzoo_triton`, `flash_cudnn`): tokens/s, the kernel's flatness min / max tokens/s over the sweep;
  * Lightning / RetNet heads B4 T8192 H16 E128 F128 bf16 (log decay log(1 - 2^(-5-h))), same baselines;
  * the peers' Mamba-1 scan itself (one value head per channel, F = 1, per-key decays [B, T, 2048, 16]):
    associative_scan and sequential scan, to calibrate this run against the anchor's 2.33 ms / 32.1 ms.
Every linear implementation is checked first against the case's reference on float32 inputs (the xla row; the
sequential scan for the Mamba-1 case): output and the four gradients, 2e-2 / 5e-2 (log_decay's gradient, a reverse
cumsum of cancelling terms: 2.5e-1, LOG_DECAY_GRAD_TOL). FLOPs: the kernel's per chunk of C, value head and value
tile, 2C²E + 2C²F + 4CEF (KERNEL_NOTES "linear v1"), forward+backward 3.7x; flash rows: the FA convention below.
Decode (bf16, one KV cache per sequence, full lengths): attnzoo's split-K kernel (implementation="triton": default
and two variants), its XLA reference (implementation="xla"), and for Tq == 1 jax.nn (xla, cudnn with
key_value_seq_lengths) and JAX's Pallas `decode_attention.gqa`.

Every implementation is first checked against a float32 reference (flash: batch 0, kv head 0 and its q heads, output
and all three gradients; decode: the whole output) by ||out - ref|| / ||ref||; a wrong one is marked and not timed.
Timing: compile, one warm call, then the median over `--reps` repetitions of `iters` back-to-back calls, each
repetition closed by block_until_ready. `--budget-s` caps the run; each case gets an equal share of what is left.
FLOPs: forward 2*B*Hq*S^2*(Dqk + Dv), halved when causal (= 4*B*S^2*H*D when Dqk == Dv, the FA convention of
the peer numbers in BENCHMARKS.md); forward+backward 3.5x that. Decode: GB/s over the K + V bytes below the lengths, and % of the
4.2 TB/s device-to-device copy ceiling measured in the peer run (BENCHMARKS.md) (also re-measured in this run).

GPU:   python experiments/bench_kernels.py --out $OUT/bench.json          (~6.5 min budget, see --budget-s)
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

COPY_CEILING_TBPS = 4.20  # BENCHMARKS.md peer numbers: H200 device-to-device copy (bytes read + written)
FWD_TOL, GRAD_TOL = 2e-2, 5e-2  # relative L2 error for bf16 operands (expected 1e-3 .. 1e-2)
# d log_decay of chunked linear attention is a reverse cumsum over the whole sequence of q·dq - k·dk, terms that
# cancel, so the bf16 rounding inside dq, dk accumulates with T (interpret mode, bf16, Mamba-2 decays, H2 E128 F64:
# 1.7e-3 at T128, 9.6e-3 at T4k, 3.1e-2 at T16k; the sweep's 64k may reach ~0.1). A wrong term gives O(1).
LOG_DECAY_GRAD_TOL = 2.5e-1


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


def _length_label(s: int) -> str:
    return f"{s // 1024}k" if s >= 1024 else str(s)


def _sparse_cases(s: int, sparsities=(0.90, 0.97), **shape) -> list[BlockSparseCase]:
    shape = dict(dict(b=1, hq=16, hkv=4, d=128, block=64), **shape)
    causal_blocks = (s // shape["block"] + 1) / 2
    return [BlockSparseCase(f"bsa_s{_length_label(s)}_gqa{shape['hq']}x{shape['hkv']}_d{shape['d']}_sparsity"
                            f"{round(100 * p)}",
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


@dataclasses.dataclass(frozen=True)
class LinearCase:
    """One chunked_linear_attention problem: q, k [B, T, K, E], v [B, T, H, F], log decays [B, T, H] (float32),
    and the implementations to time, in priority order (the reference among them: it is timed on float32 inputs).

    decay: "ssd" (Mamba-2: dt = softplus(N(0, 1)) per token and head, A_h = -exp(N(0, 1)), log decay dt * A_h,
    v = x * dt), "mamba1" (the peers' Mamba-1 scan: dt per channel h, A per channel and state dimension, so the
    log decay is [B, T, H, E], per key dimension; v = x * dt) or "retnet" (constant log(1 - 2^(-5-h)) per head)."""
    name: str
    b: int
    t: int
    k: int  # q/k heads (Mamba-2 groups)
    h: int  # value heads
    e: int  # q/k width (the SSM state size N)
    f: int  # value width (Mamba-2's head dim P)
    dtype: str
    decay: str
    impls: tuple[str, ...]
    reference: str  # the implementation whose float32 outputs and gradients every other one is checked against
    essential: int  # the first `essential` impls run while the part has time left, the others within the case's share
    chunk: int = 64

    @property
    def tokens(self) -> int:
        return self.b * self.t

    @property
    def fwd_flops(self) -> float | None:
        """The Triton kernel's FLOPs (KERNEL_NOTES "linear v1"): per chunk of C tokens, value head and value tile,
        2C²E (q kᵀ, recomputed per value tile) + 2C²F_tile (A v) + 2CEF_tile (q S) + 2CEF_tile (kᵀ v), the masked
        upper triangle included; None for per-key-dimension decays (no kernel, another algorithm)."""
        if self.decay == "mamba1":
            return None
        from pallas_kernels.chunked_linear_attention.pallas_triton_common import padded_sizes
        _, _, f_pad, block_f = padded_sizes(self.t, self.e, self.f, self.chunk)
        c, chunks = self.chunk, -(-self.t // self.chunk)
        return self.b * self.h * chunks * (2 * c * c * self.e * (f_pad // block_f) + 2 * c * c * self.f
                                           + 4 * c * self.e * self.f)

    @property
    def flash_fwd_flops(self) -> float:
        """Dense causal attention at the same B, T, H heads of width F (the FA convention, halved for causal)."""
        return 2 * self.b * self.t ** 2 * self.h * self.f


LINEAR_FWD_BWD_FLOPS = 3.7  # forward + backward FLOPs / forward FLOPs of the Triton kernels (KERNEL_NOTES "linear v2")
LINEAR_SWEEP_TOKENS = 65536
_ANCHOR_IMPLS = ("attnzoo_triton", "associative_scan", "attnzoo_triton_bf16", "attnzoo_xla_f32", "sequential_scan")
_DENSE_IMPLS = ("attnzoo_triton", "flash_attnzoo_triton", "flash_cudnn", "attnzoo_xla_f32")


def _linear_cases(smoke: bool) -> list[LinearCase]:
    """The peers' selective-scan shape mapped onto SSD, the length sweep at fixed tokens per batch (Mamba-2
    heads), fixed-decay RetNet heads (Lightning's slopes differ only in value: the same kernel cost), and the peers'
    Mamba-1 scan itself (the calibration of this run's timing
    against the anchor's 2.33 ms / 32.1 ms)."""
    # Anchor B4 L2048 D2048 N16 (fp32): D = H x P = 32 x 64 channels, one group of B, C with N = 16.
    b, t, h, p, n = (1, 128, 2, 16, 16) if smoke else (4, 2048, 32, 64, 16)
    d = h * p
    cases = [LinearCase(f"linear_anchor_ssd_b{b}_l{t}_d{d}_h{h}p{p}_n{n}_f32", b, t, 1, h, n, p, "float32", "ssd",
                        _ANCHOR_IMPLS, "attnzoo_xla_f32", essential=2)]
    tokens, lengths, (h, p, n) = ((256, (128, 256), (2, 64, 32)) if smoke
                                  else (LINEAR_SWEEP_TOKENS, (1024, 4096, 16384, 65536), (32, 64, 128)))
    cases += [LinearCase(f"linear_mamba2_b{tokens // t}_t{_length_label(t)}_h{h}p{p}_n{n}_bf16", tokens // t, t, 1,
                         h, n, p, "bfloat16", "ssd", _DENSE_IMPLS, "attnzoo_xla_f32", essential=2) for t in lengths]
    b, t, h, e = (1, 128, 2, 64) if smoke else (4, 8192, 16, 128)
    cases.append(LinearCase(f"linear_retnet_b{b}_t{_length_label(t)}_h{h}_e{e}_f{e}_bf16", b, t, h, h, e, e,
                            "bfloat16", "retnet", _DENSE_IMPLS, "attnzoo_xla_f32", essential=1))
    # The peers' own recurrence: one value head per channel (F = 1) and the state dimension as E.
    b, t, d, n = (1, 128, 8, 4) if smoke else (4, 2048, 2048, 16)
    cases.append(LinearCase(f"linear_anchor_mamba1_b{b}_l{t}_d{d}_n{n}_f32", b, t, 1, d, n, 1, "float32", "mamba1",
                            ("associative_scan", "sequential_scan", "attnzoo_triton", "attnzoo_xla_f32"),
                            "sequential_scan", essential=1))
    return cases


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
        make = dense_causal_flash(implementation, smoke)
        return lambda case, lists, counts: make(case)

    return {"attnzoo_block_sparse_triton": sparse, "cudnn_dense": dense("cudnn"),
            "attnzoo_triton_dense": dense("triton")}


def dense_causal_flash(implementation: str, smoke: bool) -> Callable:
    """make(case) -> fn(q, k, v): dense causal attention through `pallas_kernels.flash_attention`, the baseline the
    block-sparse and linear parts time at their lengths (its correctness is the flash part's check)."""
    def make(case):
        if implementation == "cudnn" and smoke:
            raise NotApplicable("cuDNN needs a GPU")
        from pallas_kernels import flash_attention
        return lambda q, k, v: flash_attention(q, k, v, causal=True, implementation=implementation)
    return make


def associative_scan_linear(q_BTKE, k_BTKE, v_BTHF, log_decay):
    """The chunked op's recurrence through `lax.associative_scan` over (decay, kᵀ v) pairs, as the peers' Mamba
    baseline does: every token's float32 state [B, T, H, E, F] is materialised (log_decay [B, T, H] or, per key
    dimension, [B, T, H, E]; q/k head h // (H / K) serves value head h, broadcast, never repeated in HBM)."""
    b, t, kh, e = q_BTKE.shape
    h, f = v_BTHF.shape[2:]
    q, k = q_BTKE.astype(jnp.float32), k_BTKE.astype(jnp.float32)
    v_BTKGF = v_BTHF.astype(jnp.float32).reshape(b, t, kh, h // kh, f)
    kv_BTHEF = (k[:, :, :, None, :, None] * v_BTKGF[:, :, :, :, None, :]).reshape(b, t, h, e, f)
    decay = jnp.exp(log_decay.astype(jnp.float32))
    decay = decay[..., None] if decay.ndim == 4 else decay[..., None, None]  # [B, T, H, E or 1, 1]

    def combine(left, right):
        (a_l, s_l), (a_r, s_r) = left, right
        return a_l * a_r, a_r * s_l + s_r

    _, s_BTHEF = jax.lax.associative_scan(combine, (decay, kv_BTHEF), axis=1)
    o = jnp.einsum("btke,btkgef->btkgf", q, s_BTHEF.reshape(b, t, kh, h // kh, e, f))
    return o.reshape(b, t, h, f).astype(q_BTKE.dtype)


def sequential_scan_linear(q_BTKE, k_BTKE, v_BTHF, log_decay):
    """The same recurrence one token at a time (`lax.scan`, float32 state [B, H, E, F], HIGHEST precision): the
    peers' sequential baseline, and the reference where no chunked implementation takes the case."""
    b, t, kh, e = q_BTKE.shape
    h, f = v_BTHF.shape[2:]
    g = h // kh
    decay = jnp.exp(log_decay.astype(jnp.float32))
    decay = (decay[..., None] if decay.ndim == 3 else decay).reshape(b, t, kh, g, -1)  # [B, T, K, G, E or 1]
    xs = [x.astype(jnp.float32).swapaxes(0, 1) for x in (q_BTKE, k_BTKE, v_BTHF.reshape(b, t, kh, g, f), decay)]

    def step(s_BKGEF, inputs):
        q_BKE, k_BKE, v_BKGF, decay_BKGD = inputs
        s_BKGEF = decay_BKGD[..., None] * s_BKGEF + k_BKE[:, :, None, :, None] * v_BKGF[:, :, :, None, :]
        return s_BKGEF, jnp.einsum("bke,bkgef->bkgf", q_BKE, s_BKGEF, precision=jax.lax.Precision.HIGHEST)

    _, o_TBKGF = jax.lax.scan(step, jnp.zeros((b, kh, g, e, f), jnp.float32), xs)
    return o_TBKGF.swapaxes(0, 1).reshape(b, t, h, f).astype(q_BTKE.dtype)


def linear_implementations(smoke: bool) -> dict[str, Callable[[LinearCase], Callable]]:
    """name -> make(case) -> fn. Linear ones take (q, k, v, log_decay) in the dtype their name ends with (_f32,
    _bf16; else the case's); the flash_* ones take dense (q, k, v) [B, T, H, F] bf16 (`LINEAR_DENSE`)."""
    def chunked(implementation):
        def make(case):
            if implementation == "triton" and case.decay == "mamba1":
                raise NotApplicable("per-key-dimension decays: the Triton kernels take one decay per head")
            decay_tiles_gb = case.tokens * case.h * case.chunk * case.e * 4 / 1e9
            if case.decay == "mamba1" and decay_tiles_gb > 8:
                raise NotApplicable(f"per-key-dimension decays: the XLA reference materialises [B, T/C, H, C, C, E] "
                                    f"float32 decays, {decay_tiles_gb:.0f} GB")
            from pallas_kernels import chunked_linear_attention
            return lambda q, k, v, g: chunked_linear_attention(q, k, v, g, chunk_size=case.chunk,
                                                               implementation=implementation)
        return make

    def scan(fn, max_state_gb=None):
        def make(case):
            state_gb = case.tokens * case.h * case.e * case.f * 4 / 1e9
            if max_state_gb is not None and state_gb > max_state_gb:
                raise NotApplicable(f"materialises {state_gb:.0f} GB of float32 states per tensor")
            return fn
        return make

    return {"attnzoo_triton": chunked("triton"), "attnzoo_triton_bf16": chunked("triton"),
            "attnzoo_xla_f32": chunked("xla"), "associative_scan": scan(associative_scan_linear, max_state_gb=8),
            "sequential_scan": scan(sequential_scan_linear),
            "flash_attnzoo_triton": dense_causal_flash("triton", smoke),
            "flash_cudnn": dense_causal_flash("cudnn", smoke)}


LINEAR_DENSE = ("flash_attnzoo_triton", "flash_cudnn")


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


def linear_inputs(case: LinearCase):
    """((q, k, v, log_decay) in the case's dtype, log_decay float32; the output cotangent dO), as the module's
    `LinearCase.decay` describes."""
    ks = jax.random.split(jax.random.key(case.t + case.h), 6)
    dtype = jnp.dtype(case.dtype)
    q = jax.random.normal(ks[0], (case.b, case.t, case.k, case.e), jnp.float32)
    k = jax.random.normal(ks[1], (case.b, case.t, case.k, case.e), jnp.float32)
    v = jax.random.normal(ks[2], (case.b, case.t, case.h, case.f), jnp.float32)
    if case.decay == "retnet":
        log_decay = jnp.broadcast_to(jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(case.h)))), (case.b, case.t, case.h))
    else:
        dt = jax.nn.softplus(jax.random.normal(ks[3], (case.b, case.t, case.h), jnp.float32))
        a = -jnp.exp(jax.random.normal(ks[4], (case.h, case.e) if case.decay == "mamba1" else (case.h,)))
        log_decay = dt[..., None] * a if case.decay == "mamba1" else dt * a
        v = v * dt[..., None]  # v = x * dt
    do = jax.random.normal(ks[5], (case.b, case.t, case.h, case.f), dtype)
    return (q.astype(dtype), k.astype(dtype), v.astype(dtype), log_decay.astype(jnp.float32)), do


def linear(bench: Bench, cases: list[LinearCase], reserve_s: float) -> None:
    """Per case: every implementation checked against the case's reference (float32 inputs) on the output and the
    gradients of sum(o · dO) with respect to q, k, v and log_decay, then timed; the flash_* baselines run on their
    own bf16 q, k, v [B, T, H, F], unchecked here (the flash part checks that kernel)."""
    impls = linear_implementations(bench.args.smoke)
    cases = [case for case in cases if any(bench.wanted(case.name, name) for name in case.impls)]
    for i, case in enumerate(cases):
        linear_case(bench, case, impls, bench.share(len(cases) - i, reserve_s), reserve_s)
    if cases:
        bench.record(dict(part="linear_summary", **linear_summary(bench.rows)))


def linear_case(bench: Bench, case: LinearCase, impls: dict, case_deadline: float, reserve_s: float) -> None:
    """One case of the linear part (its arrays are freed on return)."""
    linear_args, do = linear_inputs(case)
    compiled, ref, args_cache = {}, {}, {}

    def args_for(name):
        """(args, dO) of an implementation: dense bf16 q, k, v for flash; else the linear inputs in its dtype."""
        if name in LINEAR_DENSE:
            if "dense" not in args_cache:
                ks = jax.random.split(jax.random.key(case.t), 3)
                args_cache["dense"] = tuple(jax.random.normal(key, (case.b, case.t, case.h, case.f), jnp.bfloat16)
                                            for key in ks), do.astype(jnp.bfloat16)
            return args_cache["dense"]
        dtype = (jnp.float32 if name == case.reference or name.endswith("_f32") else
                 jnp.bfloat16 if name.endswith("_bf16") else jnp.dtype(case.dtype))
        if dtype not in args_cache:
            args_cache[dtype] = (*(x.astype(dtype) for x in linear_args[:3]), linear_args[3]), do.astype(dtype)
        return args_cache[dtype]

    def jitted(name, fn):
        """(forward, value_and_grad of sum(o · dO) over all inputs), once per implementation."""
        if name not in compiled:
            def loss(args, do_):
                return jnp.sum(fn(*args).astype(jnp.float32) * do_.astype(jnp.float32))
            compiled[name] = jax.jit(fn), jax.jit(jax.value_and_grad(loss))
        return compiled[name]

    def reference(what):
        """The reference's float32 output ("out") or gradients ("grads"), both from one compiled call."""
        if not ref:
            fn = impls[case.reference](case)

            def out_and_grads(args, do_):
                o, vjp = jax.vjp(fn, *args)
                return o, vjp(do_.astype(o.dtype))
            ref["out"], ref["grads"] = jax.jit(out_and_grads)(*args_for(case.reference))
        return ref[what]

    fields = case_fields(case)
    del fields["impls"]
    for position, name in enumerate(case.impls):
        if not bench.wanted(case.name, name):
            continue
        row = dict(part="linear", impl=name, **fields, tokens=case.tokens)
        # --smoke runs every path while the part has time: CPU timings say nothing, the shares would only skip rows.
        essential = position < case.essential or bench.args.smoke
        fn = bench.prepare(row, impls[name], case, case_deadline, essential)
        if fn is None:
            continue
        fwd, fwd_bwd = jitted(name, fn)
        args, do_ = args_for(name)
        checked = name not in LINEAR_DENSE and name != case.reference
        row["check"] = ("reference (float32 inputs)" if name == case.reference else
                        f"vs {case.reference}" if checked else "unchecked baseline (see the flash part)")
        fwd_flops = case.flash_fwd_flops if name in LINEAR_DENSE else case.fwd_flops
        fwdbwd_factor = 3.5 if name in LINEAR_DENSE else LINEAR_FWD_BWD_FLOPS

        def timed(key, fn_, *a, flops):
            t, row[f"{key}_spread"] = bench.time(fn_, *a)
            row.update({f"{key}_ms": t * 1e3, f"{key}_tokens_per_s": case.tokens / t,
                        f"{key}_tflops": None if flops is None else flops / t / 1e12})

        try:
            if checked:
                row["fwd_err"] = rel_err(fwd(*args), reference("out"))
                if row["fwd_err"] > FWD_TOL:
                    row["status"] = "wrong"
            if row["status"] == "ok":
                timed("fwd", fwd, *args, flops=fwd_flops)
        except Exception as e:
            row.update(status="error", fwd_error=f"{type(e).__name__}: {e}"[:300])
        if row["status"] == "ok" and bench.left() > reserve_s:
            try:
                if checked:
                    _, grads = fwd_bwd(args, do_)
                    errs = [rel_err(g, r) for g, r in zip(grads, reference("grads"))]
                    row.update(grad_err=max(errs[:3]), log_decay_grad_err=errs[3])
                    if row["grad_err"] > GRAD_TOL or row["log_decay_grad_err"] > LOG_DECAY_GRAD_TOL:
                        row["status"] = "wrong_grad"
                if row["status"] == "ok":
                    timed("fwdbwd", fwd_bwd, args, do_, flops=None if fwd_flops is None else fwdbwd_factor * fwd_flops)
            except Exception as e:
                row.update(fwdbwd_error=f"{type(e).__name__}: {e}"[:300])
        elif row["status"] == "ok":
            row["fwdbwd_error"] = "skipped: time budget"
        bench.record(row)


def linear_summary(rows: list[dict]) -> dict:
    """The goals of the linear part from its rows: the kernel's forward+backward speedup over associative_scan at
    the anchor shape (goal >= 5x), the flatness of its tokens/s over the length sweep (min / max, goal >= 0.85, i.e.
    within 15%), its speedup over dense causal flash attention per length (goal > 1 from 4k tokens up), and this
    run's peer-recurrence timings beside the peers' 2.33 ms / 32.1 ms."""
    linear_rows = [r for r in rows if r["part"] == "linear"]

    def get(case_prefix, impl, key):
        return next((r.get(key) for r in linear_rows if r["case"].startswith(case_prefix) and r["impl"] == impl),
                    None)

    def ratio(a, b):
        return a / b if a and b else None

    summary = dict(anchor={}, sweep=[], anchor_mamba1_ms={})
    for impl in ("attnzoo_triton", "attnzoo_triton_bf16", "attnzoo_xla_f32"):
        summary["anchor"][impl] = {f"{key}_x_associative_scan": ratio(get("linear_anchor_ssd", "associative_scan",
                                                                          f"{key}_ms"),
                                                                      get("linear_anchor_ssd", impl, f"{key}_ms"))
                                   for key in ("fwd", "fwdbwd")}
    for impl in ("associative_scan", "sequential_scan"):
        summary["anchor_mamba1_ms"][impl] = {key: get("linear_anchor_mamba1", impl, f"{key}_ms")
                                             for key in ("fwd", "fwdbwd")}
    sweep_cases = sorted({r["case"]: r["t"] for r in linear_rows if r["case"].startswith("linear_mamba2")}.items(),
                         key=lambda item: item[1])
    for case, t in sweep_cases:
        entry = dict(case=case, t=t)
        for key in ("fwd", "fwdbwd"):
            tps = get(case, "attnzoo_triton", f"{key}_tokens_per_s")
            entry[f"{key}_tokens_per_s"] = tps
            for flash in LINEAR_DENSE:
                entry[f"{key}_x_{flash}"] = ratio(tps, get(case, flash, f"{key}_tokens_per_s"))
        summary["sweep"].append(entry)
    for key in ("fwd", "fwdbwd"):
        tps = [e[f"{key}_tokens_per_s"] for e in summary["sweep"]]
        summary[f"sweep_{key}_flatness"] = min(tps) / max(tps) if tps and all(tps) else None
        for flash in LINEAR_DENSE:
            from_4k = [e[f"{key}_x_{flash}"] for e in summary["sweep"] if e["t"] >= 4096]
            summary[f"sweep_{key}_faster_than_{flash}_from_4k"] = (
                all(x > 1 for x in from_4k) if from_4k and all(from_4k) else None)
    return summary


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
    lines += linear_report(rows)
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


def linear_report(rows: list[dict]) -> list[str]:
    lines = ["", "## Chunked linear attention: ms, tokens/s and TFLOP/s (kernel FLOPs; flash_*: FA convention), "
             "forward / forward+backward",
             "| case | impl | ms | M tokens/s | TFLOP/s | x associative_scan | err fwd / q,k,v / log_decay | note |",
             "|---|---|---|---|---|---|---|---|"]
    linear_rows = [r for r in rows if r["part"] == "linear"]
    for r in linear_rows:
        scan = next((p for p in linear_rows if p["case"] == r["case"] and p["impl"] == "associative_scan"), {})

        def pair(key, spec, scale=1.0):
            return " / ".join(_fmt(None if r.get(f"{k}_{key}") is None else r[f"{k}_{key}"] * scale, spec)
                              for k in ("fwd", "fwdbwd"))

        speedup = " / ".join(_fmt(scan[f"{k}_ms"] / r[f"{k}_ms"] if r.get(f"{k}_ms") and scan.get(f"{k}_ms")
                                  else None, ".2f") for k in ("fwd", "fwdbwd"))
        note = _status(r) + " " + (r.get("note") or r.get("fwd_error") or r.get("fwdbwd_error") or "")[:70]
        lines.append(f"| {r['case']} | {r['impl']} | {pair('ms', '.3g')} | {pair('tokens_per_s', '.3g', 1e-6)} "
                     f"| {pair('tflops', '.3g')} | {speedup} | {_fmt(r.get('fwd_err'), '.1e')} / "
                     f"{_fmt(r.get('grad_err'), '.1e')} / {_fmt(r.get('log_decay_grad_err'), '.1e')} "
                     f"| {note.strip()} |")
    if not linear_rows:
        return lines
    summary = linear_summary(rows)
    speedups = summary["anchor"]["attnzoo_triton"]
    lines.append(f"anchor, SSD-shaped: attnzoo_triton vs associative_scan: fwd "
                 f"{_fmt(speedups['fwd_x_associative_scan'], '.2f')}x, fwd+bwd "
                 f"{_fmt(speedups['fwdbwd_x_associative_scan'], '.2f')}x (goal >= 5x)")
    mamba1 = summary["anchor_mamba1_ms"]
    lines.append(f"peers' Mamba-1 scan in this run: associative_scan fwd "
                 f"{_fmt(mamba1['associative_scan']['fwd'], '.3g')} ms (anchor 2.33), sequential fwd "
                 f"{_fmt(mamba1['sequential_scan']['fwd'], '.3g')} ms (anchor 32.1)")
    for e in summary["sweep"]:
        tps = e["fwdbwd_tokens_per_s"]
        lines.append(f"sweep T={e['t']}: attnzoo_triton fwd+bwd {_fmt(tps and tps / 1e6, '.3g')} M tokens/s, "
                     f"x flash triton {_fmt(e['fwdbwd_x_flash_attnzoo_triton'], '.2f')}, "
                     f"x flash cuDNN {_fmt(e['fwdbwd_x_flash_cudnn'], '.2f')}")
    lines.append(f"sweep flatness (min / max tokens/s): fwd {_fmt(summary['sweep_fwd_flatness'], '.2f')}, fwd+bwd "
                 f"{_fmt(summary['sweep_fwdbwd_flatness'], '.2f')} (goal >= 0.85); fwd+bwd faster than flash from "
                 f"4k: triton {summary['sweep_fwdbwd_faster_than_flash_attnzoo_triton_from_4k']}, cuDNN "
                 f"{summary['sweep_fwdbwd_faster_than_flash_cudnn_from_4k']}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode: runs on a CPU")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_results.json"))
    parser.add_argument("--only", default=None, help="comma-separated substrings of 'case/impl' to run")
    parser.add_argument("--budget-s", type=float, default=385.0, help="wall-clock budget for the whole run")
    parser.add_argument("--decode-reserve-s", type=float, default=85.0, help="budget kept back for decode")
    parser.add_argument("--block-sparse-s", type=float, default=105.0,
                        help="budget kept back from flash for the block-sparse part")
    parser.add_argument("--linear-s", type=float, default=70.0,
                        help="budget kept back from flash and block-sparse for the chunked linear attention part")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rep-s", type=float, default=0.03, help="target seconds per timed repetition")
    args = parser.parse_args(argv)
    bench = Bench(args)
    print(json.dumps(bench.env()), flush=True)
    # Each part keeps back the shares of the parts after it; time a part leaves unused carries on to the next.
    for part in (lambda: ceiling(bench),
                 lambda: flash(bench, SMOKE_FLASH if args.smoke else FLASH_CASES,
                               args.decode_reserve_s + args.linear_s + args.block_sparse_s),
                 lambda: block_sparse(bench, SMOKE_BLOCK_SPARSE if args.smoke else BLOCK_SPARSE_CASES,
                                      args.decode_reserve_s + args.linear_s),
                 lambda: linear(bench, _linear_cases(args.smoke), args.decode_reserve_s),
                 lambda: decode(bench, SMOKE_DECODE if args.smoke else DECODE_CASES)):
        try:
            part()
        except Exception:
            bench.record(dict(part="error", traceback=traceback.format_exc()[-1500:]))
    bench.record(dict(part="done", elapsed_s=round(time.perf_counter() - bench.t_start, 1)))
    print(report(bench.rows))


if __name__ == "__main__":
    main()
