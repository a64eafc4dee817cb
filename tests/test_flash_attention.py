"""flash_attention: the Pallas kernels (interpret mode on CPU) against the float32 reference, forward and every
gradient; lse and branch merging; poisoned (unwritten) tiles; CUDA cross-lowering of every default kernel config;
input errors; dispatch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import pallas as pl

from pallas_kernels.common import lower_for_cuda
from pallas_kernels.flash_attention import flash_attention, flash_attention_reference, pallas_triton

TOL = {jnp.float32: 1e-4, jnp.float16: 5e-3, jnp.bfloat16: 2e-2}
TRITON_CALL = "__gpu$xla.gpu.triton"


def mismatch(actual, expected, tol, what) -> str | None:
    """Why `actual` is not within max |actual - expected| / max |expected| <= tol of `expected` (any NaN/inf
    fails), or None when it is."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    if actual.shape != expected.shape:
        return f"{what}: shape {actual.shape} != {expected.shape}"
    if not np.isfinite(actual).all():
        return f"{what}: non-finite values"
    err = np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-6)
    return f"{what}: max abs err / max abs ref = {err:.2e} > {tol:.0e}" if err > tol else None


def assert_close(actual, expected, tol, what):
    assert (why := mismatch(actual, expected, tol, what)) is None, why


@dataclasses.dataclass(frozen=True)
class Problem:
    batch: int = 1
    seq_q: int = 64
    seq_k: int = 64
    heads_q: int = 4
    heads_kv: int = 2
    dqk: int = 64
    dv: int = 64
    dtype: type = jnp.float32
    causal: bool = False
    sliding_window: int | None = None
    segments: bool = False
    soft_cap: float | None = None
    gate: bool = False
    block_q: int | None = None
    block_k: int | None = None
    seed: int = 0

    def inputs(self):
        """Fresh random (q, k, v, gate, segment_ids, d_out, d_lse)."""
        ks = jax.random.split(jax.random.key(self.seed), 7)
        b, t, s = self.batch, self.seq_q, self.seq_k
        q = jax.random.normal(ks[0], (b, t, self.heads_q, self.dqk), self.dtype)
        k = jax.random.normal(ks[1], (b, s, self.heads_kv, self.dqk), self.dtype)
        v = jax.random.normal(ks[2], (b, s, self.heads_kv, self.dv), self.dtype)
        gate = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, self.heads_q))).astype(self.dtype) if self.gate else None
        segments = None
        if self.segments:  # a few segments of random lengths per row
            segments = jnp.cumsum(jax.random.bernoulli(ks[4], min(0.5, 4 / t), (b, t)), axis=1).astype(jnp.int32)
        d_out = jax.random.normal(ks[5], (b, t, self.heads_q, self.dv), jnp.float32)
        d_lse = jax.random.normal(ks[6], (b, self.heads_q, t), jnp.float32)
        return q, k, v, gate, segments, d_out, d_lse

    def options(self):
        return dict(causal=self.causal, sliding_window=self.sliding_window, logits_soft_cap=self.soft_cap)


def value_and_grads(fn, problem: Problem, cast=None):
    """(out, lse) and the gradients of sum(out * dO) + sum(lse * dlse) w.r.t. q, k, v (and the gate), jitted as
    one program (compiling op by op dominates the CPU test time otherwise)."""
    q, k, v, gate, segments, d_out, d_lse = problem.inputs()
    diff = [q, k, v] + ([gate] if gate is not None else [])
    if cast is not None:
        diff = [x.astype(cast) for x in diff]

    def loss(diff, segments, d_out, d_lse):
        out, lse = fn(*diff[:3], gate=diff[3] if len(diff) == 4 else None, segment_ids=segments, return_lse=True,
                      **problem.options())
        return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(lse * d_lse), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(diff, segments, d_out, d_lse)
    return out, lse, grads


def reference_mismatches(problem: Problem) -> list[str]:
    """Every way the Pallas kernel's out, lse and gradients differ from the float32 reference (empty: none)."""
    pallas = lambda *a, **kw: flash_attention(*a, **kw, implementation="pallas", block_q=problem.block_q,
                                              block_k=problem.block_k)
    out, lse, grads = value_and_grads(pallas, problem)
    ref_out, ref_lse, ref_grads = value_and_grads(flash_attention_reference, problem, cast=jnp.float32)
    tol = TOL[problem.dtype]
    found = [f"{name}: dtype {x.dtype} != {problem.dtype}"
             for name, x in zip(("out", "dq", "dk", "dv", "dgate"), (out, *grads)) if x.dtype != problem.dtype]
    checks = [(out, ref_out, tol, "out"), (lse, ref_lse, 1e-5 if problem.dtype == jnp.float32 else 1e-2, "lse")]
    checks += [(g, ref_g, tol, name) for name, g, ref_g in zip(("dq", "dk", "dv", "dgate"), grads, ref_grads)]
    return found + [why for check in checks if (why := mismatch(*check)) is not None]


@st.composite
def problems(draw, max_seq=150):
    mask = draw(st.sampled_from(["none", "cross", "causal", "window", "segments", "causal+segments"]))
    seq_q = draw(st.integers(1, max_seq))
    dqk = draw(st.sampled_from([32, 64, 72, 128, 192, 256]))
    heads_kv, group = draw(st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2), (2, 3), (1, 4), (1, 8)]))
    return Problem(
        batch=draw(st.integers(1, 2)), seq_q=seq_q,
        seq_k=draw(st.integers(1, max_seq)) if mask == "cross" else seq_q,
        heads_kv=heads_kv, heads_q=heads_kv * group,
        dqk=dqk, dv=draw(st.sampled_from([dqk, 32, 128])),
        dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        causal=mask in ("causal", "window", "causal+segments"),
        sliding_window=draw(st.integers(1, 40)) if mask == "window" else None,
        segments="segments" in mask, soft_cap=draw(st.sampled_from([None, 2.0])), gate=draw(st.booleans()),
        block_q=draw(st.sampled_from([None, 16, 32])), block_k=draw(st.sampled_from([None, 16, 32, 64])),
        seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(problems())
def test_kernel_matches_reference(problem):
    assert not (found := reference_mismatches(problem)), found


@pytest.mark.parametrize("problem", [
    Problem(seq_q=100, seq_k=100, heads_q=8, heads_kv=1, dqk=192, dv=128, causal=True, gate=True, block_q=32,
            block_k=16),                                                   # MLA head dims, MQA, skipped blocks
    Problem(seq_q=40, seq_k=40, heads_q=2, heads_kv=1, dqk=576, dv=512, dtype=jnp.bfloat16,
            causal=True),                                                  # absorbed MLA, 576 = 512 + 64 chunks
    Problem(seq_q=130, seq_k=130, heads_q=2, heads_kv=2, dqk=64, dv=64, dtype=jnp.float16, causal=True,
            sliding_window=33),                                            # default blocks, fp16
    Problem(batch=2, seq_q=77, seq_k=77, heads_q=6, heads_kv=2, dqk=72, dv=72, dtype=jnp.bfloat16, segments=True,
            soft_cap=2.0, gate=True, block_q=16, block_k=32),              # odd head dim, GQA 3, packed segments
    Problem(seq_q=20, seq_k=90, heads_q=2, heads_kv=1, dqk=256, dv=256),   # cross attention, default blocks
], ids=["mla-192-128-mqa", "mla-576-512-bf16", "window-default-blocks-fp16", "segments-gqa3-d72", "d256-cross"])
def test_kernel_matches_reference_named_cases(problem):
    assert not (found := reference_mismatches(problem)), found


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(problems(max_seq=300))
def test_kernel_matches_reference_sweep(problem):
    assert not (found := reference_mismatches(problem)), found


def test_lse_is_logsumexp_and_branches_merge_exactly():
    q, k, v, *_ = Problem(seq_q=48, seq_k=80, heads_q=4, heads_kv=2, dqk=32, dv=64, seed=1).inputs()
    attend = jax.jit(lambda k, v: flash_attention(q, k, v, return_lse=True, implementation="pallas", block_q=16,
                                                  block_k=16))
    out, lse = attend(k, v)
    logits = jnp.einsum("btkgd,bskd->bkgts", q.reshape(1, 48, 2, 2, 32), k) / np.sqrt(32)
    assert_close(lse, jax.nn.logsumexp(logits, axis=-1).reshape(1, 4, 48), 1e-5, "lse")

    (out_a, lse_a), (out_b, lse_b) = attend(k[:, :37], v[:, :37]), attend(k[:, 37:], v[:, 37:])
    lse_ab = jnp.logaddexp(lse_a, lse_b)
    weight = lambda part: jnp.exp(part - lse_ab).transpose(0, 2, 1)[..., None]  # [B, T, Hq, 1]
    assert_close(weight(lse_a) * out_a + weight(lse_b) * out_b, out, 1e-5, "merged out")
    assert_close(lse_ab, lse, 1e-6, "merged lse")


@pytest.mark.parametrize("kernel, num_inputs", [("_fwd_kernel", 5), ("_dq_kernel", 8), ("_dkv_kernel", 8)])
def test_unwritten_tile_cannot_pass(kernel, num_inputs, monkeypatch):
    """Interpret mode starts every output as NaN: if a kernel never stored the tiles of its first program (here:
    their prior contents are put back after it ran), the checks must fail."""
    original = getattr(pallas_triton, kernel)

    def forgets_first_tile(*refs, **kwargs):
        outputs = [r for r in refs[num_inputs:] if r is not None]
        before = [r[...] for r in outputs]
        first = pl.program_id(0) == 0
        original(*refs, **kwargs)
        for r, old in zip(outputs, before):
            r[...] = jnp.where(first, old, r[...])

    monkeypatch.setattr(pallas_triton, kernel, forgets_first_tile)
    found = reference_mismatches(Problem(seq_q=48, seq_k=48, block_q=16, block_k=16, causal=True))
    assert any("non-finite" in why for why in found), found


CROSS_LOWERING_CASES = {
    "d64-gqa": dict(heads_q=8, heads_kv=2, dqk=64, dv=64),
    "d128-gqa": dict(heads_q=8, heads_kv=2, dqk=128, dv=128),
    "d128-all-options": dict(heads_q=8, heads_kv=2, dqk=128, dv=128, window=128, segments=True, cap=30.0, gate=True),
    "mla-192-128": dict(heads_q=8, heads_kv=8, dqk=192, dv=128),
    "d256-mqa": dict(heads_q=8, heads_kv=1, dqk=256, dv=256),
    "mla-576-512": dict(heads_q=16, heads_kv=1, dqk=576, dv=512),
    "d72-odd-seq": dict(heads_q=6, heads_kv=3, dqk=72, dv=72, seq=1000),
    "d128-fp32": dict(heads_q=4, heads_kv=4, dqk=128, dv=128, dtype=jnp.float32),
    "d64-fp16": dict(heads_q=4, heads_kv=2, dqk=64, dv=64, dtype=jnp.float16),
}


@pytest.mark.parametrize("case", CROSS_LOWERING_CASES.values(), ids=CROSS_LOWERING_CASES.keys())
def test_default_kernels_cross_lower_to_triton(case):
    """Forward, dQ and dK/dV kernels with the default tiles pass Triton's lowering rules (causal; bf16 unless
    stated)."""
    b, t, hq, hkv, dtype = 2, case.get("seq", 2048), case["heads_q"], case["heads_kv"], case.get("dtype", jnp.bfloat16)
    sds = jax.ShapeDtypeStruct
    args = (sds((b, t, hq, case["dqk"]), dtype), sds((b, t, hkv, case["dqk"]), dtype),
            sds((b, t, hkv, case["dv"]), dtype), sds((b, t, hq), dtype) if case.get("gate") else None,
            sds((b, t), jnp.int32) if case.get("segments") else None)

    def value_and_grad(q, k, v, gate, segment_ids):
        def loss(q, k, v, gate):
            out, lse = flash_attention(q, k, v, causal=True, sliding_window=case.get("window"), gate=gate,
                                       segment_ids=segment_ids, logits_soft_cap=case.get("cap"), return_lse=True,
                                       implementation="pallas", interpret=False)
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, gate)

    text = lower_for_cuda(value_and_grad, *args)
    assert text.count(TRITON_CALL) == 3
    for name in ("flash_fwd", "flash_dq", "flash_dkv"):
        assert name in text


def test_non_power_of_2_tile_fails_to_lower():
    """Proves the cross-lowering check is live: the same forward kernel with a 48-row tile is rejected."""
    cfg = pallas_triton.Config(scale=0.125, causal=True, window=None, soft_cap=None, seq_k=192, seq_k_padded=192,
                               group=1, fwd_blocks=(64, 64), dq_blocks=(64, 64), dkv_blocks=(64, 64), num_warps=4,
                               num_stages=2, interpret=False)
    x = jax.ShapeDtypeStruct((1, 192, 2, 64), jnp.bfloat16)
    forward = lambda cfg: lambda q, k, v: pallas_triton.forward(q, k, v, None, None, cfg, save_ungated=False)[0]
    assert TRITON_CALL in lower_for_cuda(forward(cfg), x, x, x)
    with pytest.raises(ValueError, match="power of 2"):
        lower_for_cuda(forward(dataclasses.replace(cfg, fwd_blocks=(48, 64))), x, x, x)


@pytest.mark.parametrize("kwargs, shapes, match", [
    (dict(), ((1, 8, 6, 32), (1, 8, 4, 32), (1, 8, 4, 32)), "q has 6 heads, k has 4"),
    (dict(), ((1, 8, 4, 32), (1, 8, 2, 16), (1, 8, 2, 32)), "share head_dim"),
    (dict(), ((1, 8, 4, 32), (1, 8, 2, 32), (1, 9, 2, 32)), "k and v must be"),
    (dict(), ((8, 4, 32), (1, 8, 2, 32), (1, 8, 2, 32)), r"q must be \[batch, seq, heads, head_dim\]"),
    (dict(causal=True), ((1, 8, 4, 32), (1, 9, 2, 32), (1, 9, 2, 32)), "aligned self-attention"),
    (dict(sliding_window=4), ((1, 8, 4, 32),) * 3, "sliding_window needs causal"),
    (dict(gate=jnp.ones((1, 8, 2))), ((1, 8, 4, 32),) * 3, r"gate must be \[batch, seq, q_heads\]"),
    (dict(implementation="triton"), ((1, 8, 4, 32),) * 3, "implementation='triton' is not one of"),
    (dict(implementation="pallas", block_q=48), ((1, 8, 4, 32),) * 3, "block_q must be a power of 2"),
    (dict(implementation="cudnn"), ((1, 8, 4, 64), (1, 8, 2, 64), (1, 8, 2, 32)), "cudnn.*unequal q/k and v head"),
])
def test_bad_inputs_raise(kwargs, shapes, match):
    q, k, v = (jnp.zeros(s, jnp.bfloat16) for s in shapes)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, **kwargs)


def test_cudnn_rejections_name_the_option():
    q = jnp.zeros((1, 8, 4, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="cudnn.*float32"):
        flash_attention(q.astype(jnp.float32), q.astype(jnp.float32), q.astype(jnp.float32), implementation="cudnn")
    with pytest.raises(ValueError, match="cudnn.*logits_soft_cap"):
        flash_attention(q, q, q, implementation="cudnn", logits_soft_cap=5.0)
    with pytest.raises(ValueError, match="cudnn.*segment_ids"):
        flash_attention(q, q, q, implementation="cudnn", segment_ids=jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="cudnn.*return_lse"):
        flash_attention(q, q, q, implementation="cudnn", return_lse=True)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="cudnn.*needs a GPU"):
            flash_attention(q, q, q, implementation="cudnn")


def test_public_api_xla_pallas_auto_agree():
    problem = Problem(batch=2, seq_q=37, seq_k=37, heads_q=6, heads_kv=2, dqk=48, dv=32, causal=True,
                      sliding_window=9, segments=True, soft_cap=3.0, gate=True, seed=3)
    q, k, v, gate, segments, *_ = problem.inputs()
    attend = jax.jit(lambda q, k, v, gate, segments, implementation: flash_attention(
        q, k, v, gate=gate, segment_ids=segments, return_lse=True, implementation=implementation,
        **problem.options()), static_argnames="implementation")
    out_x, lse_x = attend(q, k, v, gate, segments, "xla")
    out_p, lse_p = attend(q, k, v, gate, segments, "pallas")
    assert_close(out_p, out_x, 1e-4, "out")
    assert_close(lse_p, lse_x, 1e-5, "lse")
    if jax.default_backend() != "gpu":  # auto is XLA off GPU
        out_a, _ = attend(q, k, v, gate, segments, "auto")
        np.testing.assert_array_equal(out_a, out_x)


def test_reference_window_matches_jax_nn():
    """The window convention (the last W tokens) equals jax.nn's local_window_size=(W-1, 0), which is what the
    cuDNN path passes."""
    q, k, v, *_ = Problem(seq_q=50, seq_k=50, heads_q=4, heads_kv=2, dqk=32, dv=32, seed=4).inputs()
    ours = flash_attention_reference(q, k, v, causal=True, sliding_window=7)
    theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(6, 0), implementation="xla")
    assert_close(ours, theirs, 1e-5, "windowed attention")
