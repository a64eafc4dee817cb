"""Chunked linear attention (`linear` part, chunk 64): pallas_kernels.chunked_linear_attention(implementation="triton")
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
tile, 2C²E + 2C²F + 4CEF (KERNEL_NOTES "linear v1"), forward+backward 3.7x; flash rows: the FA convention.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from experiments.bench_common import (
    FWD_TOL,
    GRAD_TOL,
    Bench,
    NotApplicable,
    case_fields,
    fmt,
    length_label,
    rel_err,
    status_cell,
)
from experiments.bench_kernels.flash_attention import dense_causal_flash

# d log_decay of chunked linear attention is a reverse cumsum over the whole sequence of q·dq - k·dk, terms that
# cancel, so the bf16 rounding inside dq, dk accumulates with T (interpret mode, bf16, Mamba-2 decays, H2 E128 F64:
# 1.7e-3 at T128, 9.6e-3 at T4k, 3.1e-2 at T16k; the sweep's 64k may reach ~0.1). A wrong term gives O(1).
LOG_DECAY_GRAD_TOL = 2.5e-1


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


def linear_cases(smoke: bool) -> list[LinearCase]:
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
    cases += [LinearCase(f"linear_mamba2_b{tokens // t}_t{length_label(t)}_h{h}p{p}_n{n}_bf16", tokens // t, t, 1,
                         h, n, p, "bfloat16", "ssd", _DENSE_IMPLS, "attnzoo_xla_f32", essential=2) for t in lengths]
    b, t, h, e = (1, 128, 2, 64) if smoke else (4, 8192, 16, 128)
    cases.append(LinearCase(f"linear_retnet_b{b}_t{length_label(t)}_h{h}_e{e}_f{e}_bf16", b, t, h, h, e, e,
                            "bfloat16", "retnet", _DENSE_IMPLS, "attnzoo_xla_f32", essential=1))
    # The peers' own recurrence: one value head per channel (F = 1) and the state dimension as E.
    b, t, d, n = (1, 128, 8, 4) if smoke else (4, 2048, 2048, 16)
    cases.append(LinearCase(f"linear_anchor_mamba1_b{b}_l{t}_d{d}_n{n}_f32", b, t, 1, d, n, 1, "float32", "mamba1",
                            ("associative_scan", "sequential_scan", "attnzoo_triton", "attnzoo_xla_f32"),
                            "sequential_scan", essential=1))
    return cases


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


def implementations(smoke: bool) -> dict[str, Callable[[LinearCase], Callable]]:
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


def run(bench: Bench, cases: list[LinearCase], reserve_s: float) -> None:
    """Per case: every implementation checked against the case's reference (float32 inputs) on the output and the
    gradients of sum(o · dO) with respect to q, k, v and log_decay, then timed; the flash_* baselines run on their
    own bf16 q, k, v [B, T, H, F], unchecked here (the flash part checks that kernel)."""
    impls = implementations(bench.args.smoke)
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

        def measure(key, fn_, *a, flops):
            t, row[f"{key}_spread"] = bench.time(fn_, *a)
            row.update({f"{key}_ms": t * 1e3, f"{key}_tokens_per_s": case.tokens / t,
                        f"{key}_tflops": None if flops is None else flops / t / 1e12})

        try:
            if checked:
                row["fwd_err"] = rel_err(fwd(*args), reference("out"))
                if row["fwd_err"] > FWD_TOL:
                    row["status"] = "wrong"
            if row["status"] == "ok":
                measure("fwd", fwd, *args, flops=fwd_flops)
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
                    measure("fwdbwd", fwd_bwd, args, do_,
                            flops=None if fwd_flops is None else fwdbwd_factor * fwd_flops)
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


def report(rows: list[dict]) -> list[str]:
    lines = ["", "## Chunked linear attention: ms, tokens/s and TFLOP/s (kernel FLOPs; flash_*: FA convention), "
             "forward / forward+backward",
             "| case | impl | ms | M tokens/s | TFLOP/s | x associative_scan | err fwd / q,k,v / log_decay | note |",
             "|---|---|---|---|---|---|---|---|"]
    linear_rows = [r for r in rows if r["part"] == "linear"]
    for r in linear_rows:
        scan = next((p for p in linear_rows if p["case"] == r["case"] and p["impl"] == "associative_scan"), {})

        def pair(key, spec, scale=1.0):
            return " / ".join(fmt(None if r.get(f"{k}_{key}") is None else r[f"{k}_{key}"] * scale, spec)
                              for k in ("fwd", "fwdbwd"))

        speedup = " / ".join(fmt(scan[f"{k}_ms"] / r[f"{k}_ms"] if r.get(f"{k}_ms") and scan.get(f"{k}_ms")
                                 else None, ".2f") for k in ("fwd", "fwdbwd"))
        note = status_cell(r) + " " + (r.get("note") or r.get("fwd_error") or r.get("fwdbwd_error") or "")[:70]
        lines.append(f"| {r['case']} | {r['impl']} | {pair('ms', '.3g')} | {pair('tokens_per_s', '.3g', 1e-6)} "
                     f"| {pair('tflops', '.3g')} | {speedup} | {fmt(r.get('fwd_err'), '.1e')} / "
                     f"{fmt(r.get('grad_err'), '.1e')} / {fmt(r.get('log_decay_grad_err'), '.1e')} "
                     f"| {note.strip()} |")
    if not linear_rows:
        return lines
    summary = linear_summary(rows)
    speedups = summary["anchor"]["attnzoo_triton"]
    lines.append(f"anchor, SSD-shaped: attnzoo_triton vs associative_scan: fwd "
                 f"{fmt(speedups['fwd_x_associative_scan'], '.2f')}x, fwd+bwd "
                 f"{fmt(speedups['fwdbwd_x_associative_scan'], '.2f')}x (goal >= 5x)")
    mamba1 = summary["anchor_mamba1_ms"]
    lines.append(f"peers' Mamba-1 scan in this run: associative_scan fwd "
                 f"{fmt(mamba1['associative_scan']['fwd'], '.3g')} ms (anchor 2.33), sequential fwd "
                 f"{fmt(mamba1['sequential_scan']['fwd'], '.3g')} ms (anchor 32.1)")
    for e in summary["sweep"]:
        tps = e["fwdbwd_tokens_per_s"]
        lines.append(f"sweep T={e['t']}: attnzoo_triton fwd+bwd {fmt(tps and tps / 1e6, '.3g')} M tokens/s, "
                     f"x flash triton {fmt(e['fwdbwd_x_flash_attnzoo_triton'], '.2f')}, "
                     f"x flash cuDNN {fmt(e['fwdbwd_x_flash_cudnn'], '.2f')}")
    lines.append(f"sweep flatness (min / max tokens/s): fwd {fmt(summary['sweep_fwd_flatness'], '.2f')}, fwd+bwd "
                 f"{fmt(summary['sweep_fwdbwd_flatness'], '.2f')} (goal >= 0.85); fwd+bwd faster than flash from "
                 f"4k: triton {summary['sweep_fwdbwd_faster_than_flash_attnzoo_triton_from_4k']}, cuDNN "
                 f"{summary['sweep_fwdbwd_faster_than_flash_cudnn_from_4k']}")
    return lines
