"""Decode (bf16, one KV cache per sequence, full lengths): attnzoo's split-K kernel (implementation="triton": default
and two variants), its XLA reference (implementation="xla"), and for Tq == 1 jax.nn (xla, cudnn with
key_value_seq_lengths) and JAX's Pallas `decode_attention.gqa`. Each implementation is checked on the whole output
against a float32 reference. Reported: GB/s over the K + V bytes below the lengths, and % of the 4.2 TB/s
device-to-device copy ceiling measured in the peer run (BENCHMARKS.md), which `ceiling` re-measures in this run.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from experiments.bench_common import FWD_TOL, Bench, NotApplicable, case_fields, fmt, rel_err, status_cell

COPY_CEILING_TBPS = 4.20  # BENCHMARKS.md peer numbers: H200 device-to-device copy (bytes read + written)


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


CASES = [
    DecodeCase("decode_b8_s4k_gqa32x8_d128", 8, 4096, 1, 32, 8, 128, 128),
    DecodeCase("decode_b8_s16k_gqa32x8_d128", 8, 16384, 1, 32, 8, 128, 128),
    DecodeCase("decode_b8_s64k_gqa32x8_d128", 8, 65536, 1, 32, 8, 128, 128),
    DecodeCase("decode_b8_s128k_gqa32x8_d128", 8, 131072, 1, 32, 8, 128, 128),
    DecodeCase("decode_b8_s16k_tq4_gqa32x8_d128", 8, 16384, 4, 32, 8, 128, 128),
    DecodeCase("decode_b8_s16k_mla_absorbed_h128_576x512", 8, 16384, 1, 128, 1, 576, 512),
]
SMOKE_CASES = [
    DecodeCase("smoke_decode_b2_s512_gqa4x2_d64", 2, 512, 1, 4, 2, 64, 64),
    DecodeCase("smoke_decode_b2_s256_tq2_mla_absorbed_h4_576x512", 2, 256, 2, 4, 1, 576, 512),
]


def implementations(smoke: bool) -> dict[str, Callable[[DecodeCase], Callable]]:
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


def decode_config(case: DecodeCase, **overrides):
    """The attnzoo kernel's launch configuration for a case (recorded with its rows)."""
    from pallas_kernels.decode_attention import pallas_triton
    return pallas_triton.decode_config(case.b, case.s, case.tq, case.hq, case.hkv, case.dqk, case.dv, 2, **overrides)


def ceiling(bench: Bench) -> None:
    """The device-to-device copy rate (float32, bytes read + written): the ceiling decode reads KV against."""
    n = (1 << 20) if bench.args.smoke else (1 << 30)
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    copy = jax.jit(lambda x: x * 1.0001)
    jax.block_until_ready(copy(x))
    t, spread = bench.time(copy, x)
    bench.record(dict(part="ceiling", name="copy_f32", bytes=8 * n, us=t * 1e6, tbps=8 * n / t / 1e12,
                      spread=spread))


def run(bench: Bench, cases: list[DecodeCase]) -> None:
    from pallas_kernels.decode_attention import decode_attention_reference
    impls = implementations(bench.args.smoke)
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


def report(rows: list[dict]) -> list[str]:
    lines = ["", f"## Decode, bf16: achieved HBM GB/s on the KV bytes read (% of {COPY_CEILING_TBPS} TB/s copy)",
             "| case | impl | us | GB/s | % ceiling | x jax gqa | err | note |", "|---|---|---|---|---|---|---|---|"]
    decode_rows = [r for r in rows if r["part"] == "decode"]
    for r in decode_rows:
        gqa = next((p.get("gbps") for p in decode_rows if p["case"] == r["case"] and p["impl"] == "jax_pallas_gqa"),
                   None)
        note = status_cell(r) + " " + (r.get("note") or "")[:70]
        lines.append(f"| {r['case']} | {r['impl']} | {fmt(r.get('us'), '.1f')} | {fmt(r.get('gbps'))} "
                     f"| {fmt(r.get('pct_copy_ceiling'), '.1f')} "
                     f"| {fmt(r['gbps'] / gqa if gqa and r.get('gbps') else None, '.2f')} "
                     f"| {fmt(r.get('err'), '.1e')} | {note.strip()} |")
    for r in rows:
        if r["part"] == "ceiling":
            lines.append(f"\ncopy ceiling this run: {r['tbps']:.2f} TB/s (anchor {COPY_CEILING_TBPS})")
    return lines
