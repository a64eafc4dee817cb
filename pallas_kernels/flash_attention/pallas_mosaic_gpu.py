"""FlashAttention-3 style forward (Shah et al., https://arxiv.org/abs/2407.08608) as a Pallas Mosaic GPU kernel for
Hopper (sm_90), the "mosaic_gpu" implementation of flash_attention. Its backward is the portable Triton dQ and dK/dV
kernels, reached through their public entry `pallas_triton_bwd.flash_attention_backward` on the same residuals.

Layout [batch, seq, heads, head_dim]. One CTA = 3 warpgroups per (q head, 2*block_q query rows, batch):

  wg 0, 1  consumers: each owns block_q query rows (its Q tile arrives by TMA), runs S = Q K^T and O += P V with
           `plgpu.wgmma` (fp32 accumulators in registers), the online softmax in base 2, and the epilogue
           (O / l to SMEM, then TMA to HBM; lse [B, Hq, T] f32 natural log).
  wg 2     producer: streams K and V tiles of the GQA kv head (q head // group) by TMA into a `num_stages`-deep
           ring of SMEM slots; `*_ready` barriers complete on the TMA byte count, `*_free` barriers need one
           arrival from each consumer before the slot is refilled.

A 2-arrival "schedule" barrier ping-pongs the consumers (FA3's inter-warpgroup overlap): one warpgroup's softmax
runs while the other's GEMMs occupy the tensor cores. Each consumer passes it twice per KV step; wg 1 passes it
once before its loop and wg 0 once after, so the two interleave. With causal masking wg 0 needs fewer KV steps than
wg 1 (its rows end earlier); it keeps releasing the slots and passing the schedule barrier for the steps it skips,
so the producer and wg 1 never wait on it.

Loops: unmasked KV blocks first, then the blocks that need the causal mask and/or the padded-key mask (keys
>= the real length), so interior blocks pay no iota/select. Sequences are padded to the tiles outside the kernel
(and to the Triton backward's tiles, so both see one padded problem); padded query rows are sliced off.

Two code paths exist only because of the CPU interpreter (jax 0.11.2 `plgpu.InterpretGPUParams`), which
(1) cannot run `pl.run_state` (the documented way to accumulate into a pre-initialised wgmma accumulator: it fails
with "Cannot lower jaxpr with effects: _WGMMAPipelineEffect ...") and (2) only simulates wgmma with both operands
in SMEM (a register operand fails in `HostAllocationKey.from_array`). Interpret mode therefore stages P through
SMEM and accumulates P V into a fresh zero accumulator that is added to O; the GPU default keeps P in registers
and accumulates in place (what JAX's `attention_mgpu` and tokamax do). Both knobs are `Config` fields so the GPU
benchmark can also time the interpreter-tested variant.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import LN2, LOG2E, MASK_VALUE, on_gpu, pad_axis, round_up
from pallas_kernels.flash_attention import pallas_triton_bwd

COMPUTE_WGS = 2  # consumer warpgroups per CTA; warpgroup COMPUTE_WGS is the TMA producer
HEAD_DIMS = (64, 128, 256)
_WGMMA = plgpu.Layout.WGMMA
_WGMMA_ROW = plgpu.Layout.WGMMA.reduce(1)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one Mosaic GPU forward call (hashable: a `nondiff_argnums` of the custom VJP)."""
    scale: float
    causal: bool
    seq_k: int  # real key length; the kernel sees keys padded to a multiple of block_kv
    group: int  # q heads per kv head
    block_q: int  # rows per consumer warpgroup (a CTA covers 2 * block_q)
    block_kv: int
    num_stages: int  # K/V SMEM ring depth
    p_in_smem: bool  # stage P through SMEM for the P V wgmma (required by the interpreter)
    acc_in_place: bool  # P V accumulates into O via pl.run_state (not supported by the interpreter)
    interpret: bool


def default_blocks(head_dim: int) -> tuple[int, int, int]:
    """(block_q, block_kv, num_stages), untuned. SMEM per CTA (bf16): Q/O 2*bq*D*2 B, K/V ring
    2*stages*bkv*D*2 B, P 2*bq*bkv*2 B: D64 -> 16+64+32 KiB, D128 -> 32+128+32 KiB, D256 -> 64+128+16 KiB, all
    under Hopper's 227 KiB; the fp32 O accumulator is bq*D/128 registers per thread (32 / 64 / 128)."""
    if head_dim <= 128:
        return 64, 128, 2
    return 64, 64, 2


def unsupported_reason(call) -> str | None:
    """Why the Mosaic GPU forward can't take this call, or None if it can."""
    q, v = call.q_BTHE, call.v_BSKF
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"{q.dtype} inputs (wgmma path takes bf16/fp16)"
    if v.shape[-1] != q.shape[-1]:
        return f"unequal q/k and v head dims ({q.shape[-1]} vs {v.shape[-1]})"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (supported: {', '.join(map(str, HEAD_DIMS))})"
    for name, value in (("sliding_window", call.sliding_window), ("segment_ids", call.segment_ids_BT),
                        ("logits_soft_cap", call.logits_soft_cap), ("gate", call.gate_BTH)):
        if value is not None:
            return f"{name} (not in this kernel)"
    for name, block in (("block_q", call.block_q), ("block_k", call.block_k)):
        if block is not None and block % 64:
            return f"{name}={block} (its tiles are multiples of 64)"
    if not call.interpret and on_gpu() and not jax.devices()[0].compute_capability.startswith("9."):
        return f"a {jax.devices()[0].device_kind} GPU (wgmma and TMA need Hopper, sm_90)"
    return None


# ------------------------------------------------------------------------------------------------------- kernel

def _kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, scoped, *, cfg: Config, head_dim: int, kv_steps_total: int,
            stages: int):
    (q_smems, k_smems, v_smems, p_smems, lse_smems), barriers = scoped
    q_ready, k_ready, v_ready, k_free, v_free, schedule = barriers
    block_q, block_kv = cfg.block_q, cfg.block_kv
    dtype = q_ref.dtype
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    q_tile = lax.axis_index("q_tiles")
    wg = lax.axis_index("wg")
    n_full_kv = cfg.seq_k // block_kv  # KV blocks without padded keys

    def cta_kv_steps():
        """KV blocks any row of this CTA sees (the producer loads exactly these)."""
        if not cfg.causal:
            return kv_steps_total
        return jnp.minimum(kv_steps_total, pl.cdiv((q_tile + 1) * (COMPUTE_WGS * block_q), block_kv))

    def schedule_pass():
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    @pl.when(wg < COMPUTE_WGS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")  # 2*232 + 40 regs x 128 threads <= 64K
        q_smem, lse_smem = q_smems.at[wg], lse_smems.at[wg]
        p_smem = p_smems.at[wg] if cfg.p_in_smem else None
        q_base = (q_tile * COMPUTE_WGS + wg) * block_q
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, block_q), h], q_smem, q_ready.at[wg])

        if cfg.causal:
            kv_steps = jnp.minimum(kv_steps_total, pl.cdiv(q_base + block_q, block_kv))
            n_unmasked = jnp.minimum(lax.div(q_base, block_kv), n_full_kv)
        else:
            kv_steps = kv_steps_total
            n_unmasked = n_full_kv

        m = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), _WGMMA_ROW)
        l = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), _WGMMA_ROW)
        acc = plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32), _WGMMA)

        plgpu.barrier_wait(q_ready.at[wg])

        @pl.when(kv_steps > 0)
        def _():
            plgpu.barrier_wait(k_ready.at[0])

        pl.when(wg == 1)(schedule_pass)

        def step(j, carry, *, masked: bool):
            acc, m, l = carry
            slot = lax.rem(j, stages)

            def qk(s_ref):
                plgpu.wgmma(s_ref, q_smem, k_smems.at[slot].T)
                schedule_pass()
                return s_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            s = s * (cfg.scale * LOG2E)  # base-2 logits
            if masked:
                cols = j * block_kv + plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1, layout=_WGMMA)
                keep = cols < cfg.seq_k
                if cfg.causal:
                    rows = q_base + plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 0, layout=_WGMMA)
                    keep = keep & (cols <= rows)
                s = jnp.where(keep, s, MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            if cfg.p_in_smem:
                p_smem[...] = p16
                plgpu.commit_smem()  # generic-proxy stores -> visible to the async (wgmma) proxy
            acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
            plgpu.barrier_arrive(schedule)  # softmax done
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(schedule)  # the other warpgroup's GEMM has been issued: tensor cores are ours
            p_operand = p_smem if cfg.p_in_smem else p16

            def prefetch_wait():
                @pl.when(j + 1 < kv_steps)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(j + 1, stages)])

            if cfg.acc_in_place:
                def pv(o_ref):
                    plgpu.wgmma(o_ref, p_operand, v_smems.at[slot])
                    prefetch_wait()
                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            else:
                def pv(o_ref):
                    plgpu.wgmma(o_ref, p_operand, v_smems.at[slot])
                    prefetch_wait()
                    return o_ref[...]
                acc = acc + pl.run_scoped(pv, plgpu.ACC((block_q, head_dim), jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        carry = lax.fori_loop(0, n_unmasked, functools.partial(step, masked=False), (acc, m, l))
        acc, m, l = lax.fori_loop(n_unmasked, kv_steps, functools.partial(step, masked=True), carry)

        if cfg.causal:
            # This warpgroup's rows end before the CTA's last KV blocks: release them and keep the ping-pong.
            @pl.loop(kv_steps, cta_kv_steps())
            def _skip(j):
                slot = lax.rem(j, stages)
                # Observe the loads too: every barrier phase must be waited on by each thread that uses it before
                # the barrier dies (the interpreter checks this); wg 1 waits for the same loads anyway.
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                schedule_pass()
                schedule_pass()

        pl.when(wg == 0)(schedule_pass)

        # Every row sees key 0 (all queries, padded ones included, see >= 1 real key), so l >= 1.
        acc = acc * lax.broadcast_in_dim(1.0 / l, acc.shape, [0])
        q_smem[...] = acc.astype(dtype)  # the Q tile is dead after the last QK^T: reuse it for O
        lse_smem[...] = m * LN2 + jnp.log(l)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, pl.ds(q_base, block_q), h])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_base, block_q)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(h, cfg.group)
        n_steps = cta_kv_steps()

        def load(j, slot):
            keys = (b, pl.ds(j * block_kv, block_kv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smems.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smems.at[slot], v_ready.at[slot])

        for j in range(stages):  # stages <= kv_steps_total, and every CTA has >= 1 step
            @pl.when(j < n_steps)
            def _():  # traced at once by pl.when, inside this iteration: j is bound when it runs
                load(j, j)  # noqa: B023

        @pl.loop(stages, n_steps)
        def _refill(j):
            slot = lax.rem(j, stages)
            keys = (b, pl.ds(j * block_kv, block_kv), kv_head)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smems.at[slot], k_ready.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smems.at[slot], v_ready.at[slot])

        # Observe the consumers' last releases (no barrier phase may go unobserved; the CTA can't retire before the
        # consumers finish anyway, so this costs the producer nothing).
        @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
        def _drain(j):
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


def forward(q_BTHE, k_BSKE, v_BSKE, cfg: Config):
    """Mosaic GPU forward on arrays padded to the tiles: (out [B, T, Hq, D], lse [B, Hq, T] f32, natural log)."""
    b, t, hq, d = q_BTHE.shape
    s = k_BSKE.shape[1]
    block_q, block_kv = cfg.block_q, cfg.block_kv
    assert t % (COMPUTE_WGS * block_q) == 0 and s % block_kv == 0 and d in HEAD_DIMS, (q_BTHE.shape, cfg)
    kv_steps_total = s // block_kv
    stages = min(cfg.num_stages, kv_steps_total)
    dtype = q_BTHE.dtype
    swizzle = 128  # bytes: 64 bf16/fp16 columns, the widest wgmma/TMA swizzle; needs D and block_kv % 64 == 0
    transforms = (plgpu.TilingTransform((8, swizzle // dtype.itemsize)), plgpu.SwizzleTransform(swizzle))

    def entry(q_ref, k_ref, v_ref, out_ref, lse_ref):
        def smem(*shape):
            return plgpu.SMEM(shape, dtype, transforms=transforms)

        p_smem = smem(COMPUTE_WGS, block_q, block_kv) if cfg.p_in_smem else None
        pl.run_scoped(
            lambda *scoped: _kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, (scoped[:5], scoped[5:]), cfg=cfg,
                                    head_dim=d, kv_steps_total=kv_steps_total, stages=stages),
            smem(COMPUTE_WGS, block_q, d),  # Q, then O
            smem(stages, block_kv, d),  # K ring
            smem(stages, block_kv, d),  # V ring
            p_smem,
            plgpu.SMEM((COMPUTE_WGS, block_q), jnp.float32),  # lse
            plgpu.Barrier(num_barriers=COMPUTE_WGS),  # q_ready
            plgpu.Barrier(num_barriers=stages),  # k_ready
            plgpu.Barrier(num_barriers=stages),  # v_ready
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # k_free
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # v_free
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),  # schedule
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((b, t, hq, d), dtype), jax.ShapeDtypeStruct((b, hq, t), jnp.float32)),
        grid=(hq, t // (COMPUTE_WGS * block_q), b),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if cfg.interpret else None,
        kernel_name="flash_fwd_mosaic",
    )(q_BTHE, k_BSKE, v_BSKE)


# ------------------------------------------------------------------------------------------------------ autodiff

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, cfg: Config):
    return forward(q, k, v, cfg)


def _attention_fwd(q, k, v, cfg: Config):
    out, lse = forward(q, k, v, cfg)
    return (out, lse), (q, k, v, out, lse)


def _attention_bwd(cfg: Config, res, cotangents):
    return pallas_triton_bwd.flash_attention_backward(res, cotangents, causal=cfg.causal, scale=cfg.scale,
                                                      seq_k=cfg.seq_k, interpret=cfg.interpret)


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention_mosaic_gpu(q_BTHE, k_BSKE, v_BSKE, *, causal: bool, scale: float, block_q: int | None = None,
                               block_k: int | None = None, interpret: bool, p_in_smem: bool | None = None,
                               acc_in_place: bool | None = None):
    """Pads to the tiles, runs the Mosaic GPU forward (Triton dQ/dK/dV backward), slices back: (out [B,T,Hq,D],
    lse [B,Hq,T] f32). Inputs are assumed validated (api.flash_attention) and supported (`unsupported_reason`).

    block_q (rows per consumer warpgroup) and block_k override the forward tiles (multiples of 64); the Triton
    backward keeps its own defaults. p_in_smem / acc_in_place default to the GPU fast path, and are forced to the
    interpreter-compatible path (True / False) in interpret mode."""
    _, t, hq, d = q_BTHE.shape
    s, hkv = k_BSKE.shape[1], k_BSKE.shape[2]
    dbq, dbk, stages = default_blocks(d)
    block_q, block_kv = block_q or dbq, block_k or dbk
    for name, block in (("block_q", block_q), ("block_k", block_kv)):
        if block % 64:
            raise ValueError(f"{name} must be a multiple of 64 for the Mosaic GPU kernel, got {block}")
    if interpret:
        if p_in_smem is False or acc_in_place:
            raise ValueError("the Mosaic GPU interpreter needs p_in_smem=True and acc_in_place=False")
        p_in_smem, acc_in_place = True, False
    else:
        p_in_smem = False if p_in_smem is None else p_in_smem
        acc_in_place = True if acc_in_place is None else acc_in_place
    # One padded problem for the forward's tiles and the Triton backward's.
    bwd_multiple = pallas_triton_bwd.seq_multiple(d)
    t_pad = round_up(t, math.lcm(COMPUTE_WGS * block_q, bwd_multiple))
    s_pad = round_up(s, math.lcm(block_kv, bwd_multiple))
    if causal:  # T == S: one padded length, so the causal diagonal stays aligned
        t_pad = s_pad = max(t_pad, s_pad)
    cfg = Config(scale=scale, causal=causal, seq_k=s, group=hq // hkv, block_q=block_q, block_kv=block_kv,
                 num_stages=stages, p_in_smem=p_in_smem, acc_in_place=acc_in_place, interpret=interpret)
    out, lse = _attention(pad_axis(q_BTHE, 1, t_pad), pad_axis(k_BSKE, 1, s_pad), pad_axis(v_BSKE, 1, s_pad), cfg)
    return out[:, :t], lse[:, :, :t]


def run(call):
    out, lse = flash_attention_mosaic_gpu(call.q_BTHE, call.k_BSKE, call.v_BSKF, causal=call.causal,
                                          scale=call.scale, block_q=call.block_q, block_k=call.block_k,
                                          interpret=call.interpret)
    return (out, lse) if call.return_lse else out
