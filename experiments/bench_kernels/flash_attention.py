"""Flash attention (bf16, layout [B, S, H, D]), forward and forward+backward (jax.value_and_grad of sum(out * dO)):

  attnzoo_triton      pallas_kernels.flash_attention(..., implementation="triton")
  attnzoo_mosaic_gpu  the same with implementation="mosaic_gpu": FA3-style Mosaic GPU forward, Triton backward
                      (n/a where it cannot take the case: Dv != Dqk, head dims other than 64/128/256);
                      attnzoo_mosaic_gpu_psmem: its interpreter-tested variant (P staged through SMEM, fresh P V
                      accumulator added to O)
  cudnn, xla          jax.nn.dot_product_attention(implementation=...)  (cuDNN has no Dv != Dqk: n/a for MLA;
                                                                        xla gets V zero-padded to Dqk there)
  jax_pallas_mha      jax.experimental.pallas.ops.gpu.attention.mha      (K/V heads repeated for GQA)
  tokamax_mosaic, tokamax_triton   tokamax.dot_product_attention, when tokamax imports

Every implementation is first checked against a float32 reference on batch 0, kv head 0 and its q heads (output and
all three gradients). FLOPs: forward 2*B*Hq*S^2*(Dqk + Dv), halved when causal (= 4*B*S^2*H*D when Dqk == Dv, the FA
convention of the peer numbers in BENCHMARKS.md); forward+backward 3.5x that. `dense_causal_flash` is the dense
baseline the block-sparse and linear parts time at their own lengths.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp

from experiments.bench_common import FWD_TOL, GRAD_TOL, Bench, NotApplicable, case_fields, fmt, rel_err, status_cell


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


CASES = [
    FlashCase("b8_s2048_h16_d128_causal", 8, 2048, 16, 16, 128, 128, True),
    FlashCase("b2_s8192_h16_d128_causal", 2, 8192, 16, 16, 128, 128, True),
    FlashCase("b1_s16384_h16_d128_causal", 1, 16384, 16, 16, 128, 128, True),
    FlashCase("b4_s4096_h16_d64_causal", 4, 4096, 16, 16, 64, 64, True),
    FlashCase("b2_s8192_h16_d128_full", 2, 8192, 16, 16, 128, 128, False),
    FlashCase("b2_s8192_gqa32x8_d128_causal", 2, 8192, 32, 8, 128, 128, True),
    FlashCase("b2_s8192_h16_mla192x128_causal", 2, 8192, 16, 16, 192, 128, True),
]
SMOKE_CASES = [
    FlashCase("smoke_b1_s256_h2_d64_causal", 1, 256, 2, 2, 64, 64, True),
    FlashCase("smoke_b1_s256_gqa4x2_d64_full", 1, 256, 4, 2, 64, 64, False),
    FlashCase("smoke_b1_s256_h2_mla96x64_causal", 1, 256, 2, 2, 96, 64, True),
]


def implementations(smoke: bool) -> dict[str, Callable[[FlashCase], Callable]]:
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


def dense_causal_flash(implementation: str, smoke: bool) -> Callable:
    """make(case) -> fn(q, k, v): dense causal attention through `pallas_kernels.flash_attention`, the baseline the
    block-sparse and linear parts time at their lengths (its correctness is the flash part's check)."""
    def make(case):
        if implementation == "cudnn" and smoke:
            raise NotApplicable("cuDNN needs a GPU")
        from pallas_kernels import flash_attention
        return lambda q, k, v: flash_attention(q, k, v, causal=True, implementation=implementation)
    return make


def reference_attention_f32(q, k, v, causal):
    """Plain float32 attention, [1, S, G, D] queries against one kv head [1, S, 1, D]."""
    hi = jax.lax.Precision.HIGHEST
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    logits = jnp.einsum("bqhd,bkd->bhqk", q, k[:, :, 0], precision=hi) * q.shape[-1] ** -0.5
    if causal:
        s = q.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((s, s), bool)), logits, -jnp.inf)
    return jnp.einsum("bhqk,bkd->bqhd", jax.nn.softmax(logits, axis=-1), v[:, :, 0], precision=hi)


def run(bench: Bench, cases: list[FlashCase], reserve_s: float) -> None:
    impls = implementations(bench.args.smoke)
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


def report(rows: list[dict]) -> list[str]:
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
            return " / ".join(fmt(x, ".2f") for x in parts)

        note = status_cell(r) + " " + (r.get("note") or r.get("fwd_error") or r.get("fwdbwd_error") or "")[:70]
        tflops = " | ".join(fmt(r.get(key), ".3g") for key in ("fwd_tflops", "fwdbwd_tflops"))
        lines.append(f"| {r['case']} | {r['impl']} | {tflops} "
                     f"| {ratio('cudnn')} | {ratio('jax_pallas_mha')} | {fmt(r.get('fwd_err'), '.1e')} "
                     f"| {fmt(r.get('grad_err'), '.1e')} | {note.strip()} |")
    return lines
