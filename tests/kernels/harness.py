"""Kernel test harness shared by every op and backend: random problems (shapes, dtypes, masks), comparison with the
float32 reference (outputs, lse, and gradients of sum(out * dO) + sum(lse * dlse)), and CUDA cross-lowering.

Each op has one parameterised base class (`FlashAttentionTestBase`, `DecodeAttentionTestBase`,
`ChunkedLinearAttentionTestBase`) that a backend's test file subclasses with its implementation name, problem space
and named cases (tokamax's test_base pattern); `conftest.py` parametrises `named_case` from the subclass's
`named_cases`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import chunked_linear_attention, decode_attention, flash_attention
from pallas_kernels.chunked_linear_attention import linear_attention_step_reference
from pallas_kernels.common import lower_for_cuda, on_gpu, pad_axis
from pallas_kernels.decode_attention import decode_attention_reference
from pallas_kernels.flash_attention import flash_attention_reference

TOL = {jnp.float32: 1e-4, jnp.float16: 5e-3, jnp.bfloat16: 2e-2}  # max abs err / max abs ref, any CPU
LSE_TOL = {jnp.float32: 1e-5, jnp.float16: 1e-2, jnp.bfloat16: 1e-2}
TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_CALL = "mosaic_gpu_v2"


def mismatch(actual, expected, tol, what, *, floor: float = 1e-6) -> str | None:
    """Why `actual` is not within max |actual - expected| / max(max |expected|, floor) <= tol of `expected` (any
    NaN/inf fails), or None when it is."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    if actual.shape != expected.shape:
        return f"{what}: shape {actual.shape} != {expected.shape}"
    if not np.isfinite(actual).all():
        return f"{what}: non-finite values"
    err = np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), floor)
    return f"{what}: max abs err / max abs ref = {err:.2e} > {tol:.0e}" if err > tol else None


def assert_close(actual, expected, tol, what):
    assert (why := mismatch(actual, expected, tol, what)) is None, why


def lower_value_and_grad(attend, *args) -> str:
    """StableHLO, lowered for an H200 on this machine, of the value and (q, k, v) gradients of sum(out) + sum(lse)
    where (out, lse) = attend(q, k, v, *rest); args are ShapeDtypeStructs (or None), q, k, v first."""
    def loss(q, k, v, *rest):
        out, lse = attend(q, k, v, *rest)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)
    return lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), *args)


# ------------------------------------------------------------------------------------------------ flash_attention

@dataclasses.dataclass(frozen=True)
class FlashProblem:
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


def flash_value_and_grads(fn, problem: FlashProblem, *, with_lse: bool = True, cast=None):
    """out, lse (None without `with_lse`) and the gradients of sum(out * dO) (+ sum(lse * dlse)) w.r.t. q, k, v
    (and the gate), jitted as one program (compiling op by op dominates the CPU test time otherwise)."""
    q, k, v, gate, segments, d_out, d_lse = problem.inputs()
    diff = [q, k, v] + ([gate] if gate is not None else [])
    if cast is not None:
        diff = [x.astype(cast) for x in diff]

    def loss(diff, segments, d_out, d_lse):
        result = fn(*diff[:3], gate=diff[3] if len(diff) == 4 else None, segment_ids=segments, return_lse=with_lse,
                    **problem.options())
        out, lse = result if with_lse else (result, None)
        value = jnp.sum(out.astype(jnp.float32) * d_out)
        return (value + jnp.sum(lse * d_lse) if with_lse else value), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(diff, segments, d_out, d_lse)
    return out, lse, grads


def flash_mismatches(problem: FlashProblem, implementation, *, with_lse: bool = True) -> list[str]:
    """Every way `implementation`'s out, lse and gradients differ from the float32 reference (empty: none)."""
    attend = lambda *a, **kw: flash_attention(*a, **kw, implementation=implementation, block_q=problem.block_q,
                                              block_k=problem.block_k)
    out, lse, grads = flash_value_and_grads(attend, problem, with_lse=with_lse)
    ref_out, ref_lse, ref_grads = flash_value_and_grads(flash_attention_reference, problem, with_lse=with_lse,
                                                        cast=jnp.float32)
    tol = TOL[problem.dtype]
    found = [f"{name}: dtype {x.dtype} != {problem.dtype}"
             for name, x in zip(("out", "dq", "dk", "dv", "dgate"), (out, *grads)) if x.dtype != problem.dtype]
    checks = [(out, ref_out, tol, "out")]
    if with_lse:
        checks.append((lse, ref_lse, LSE_TOL[problem.dtype], "lse"))
    checks += [(g, ref_g, tol, name) for name, g, ref_g in zip(("dq", "dk", "dv", "dgate"), grads, ref_grads)]
    return found + [why for check in checks if (why := mismatch(*check)) is not None]


MASKS = ("none", "cross", "causal", "window", "segments", "causal+segments")


@st.composite
def flash_problems(draw, max_seq=150, dtypes=(jnp.float32, jnp.bfloat16), head_dims=(32, 64, 72, 128, 192, 256),
                   other_dvs=(32, 128), masks=MASKS, soft_caps=(None, 2.0), gates=(False, True),
                   block_qs=(None, 16, 32), block_ks=(None, 16, 32, 64)):
    """Random problems; the keyword arguments narrow the space to what a backend takes (other_dvs=(): Dv == Dqk)."""
    mask = draw(st.sampled_from(masks))
    seq_q = draw(st.integers(1, max_seq))
    dqk = draw(st.sampled_from(head_dims))
    heads_kv, group = draw(st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2), (2, 3), (1, 4), (1, 8)]))
    return FlashProblem(
        batch=draw(st.integers(1, 2)), seq_q=seq_q,
        seq_k=draw(st.integers(1, max_seq)) if mask == "cross" else seq_q,
        heads_kv=heads_kv, heads_q=heads_kv * group,
        dqk=dqk, dv=draw(st.sampled_from([dqk, *other_dvs])), dtype=draw(st.sampled_from(dtypes)),
        causal=mask in ("causal", "window", "causal+segments"),
        sliding_window=draw(st.integers(1, 40)) if mask == "window" else None,
        segments="segments" in mask, soft_cap=draw(st.sampled_from(soft_caps)), gate=draw(st.sampled_from(gates)),
        block_q=draw(st.sampled_from(block_qs)), block_k=draw(st.sampled_from(block_ks)),
        seed=draw(st.integers(0, 2**31 - 1)))


class ReferenceComparisonBase:
    """What every op's test base shares: random problems (a short derandomized run by default, a longer sweep with
    `-m slow`) and named cases, each compared with the op's reference. Subclasses set `implementation`, the problem
    strategies and `named_cases`, and define `mismatches(problem) -> list[str]` (empty: it agrees)."""
    implementation: str
    examples = 12  # random problems in the default run
    sweep_examples = 40
    named_cases: dict = {}

    def mismatches(self, problem) -> list[str]:
        raise NotImplementedError

    def test_random_problems(self):
        @settings(max_examples=self.examples, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(self.problems)
        def agrees_with_reference(problem):
            assert not (found := self.mismatches(problem)), (problem, found)

        agrees_with_reference()

    @pytest.mark.slow
    def test_random_problems_sweep(self):
        @settings(max_examples=self.sweep_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(self.sweep_problems)
        def agrees_with_reference(problem):
            assert not (found := self.mismatches(problem)), (problem, found)

        agrees_with_reference()

    def test_named_case(self, named_case):
        assert not (found := self.mismatches(named_case)), (named_case, found)


class FlashAttentionTestBase(ReferenceComparisonBase):
    """flash_attention(implementation=<name>) against the float32 reference. Subclasses set `implementation` and
    narrow `problems` / `sweep_problems` / `named_cases` to what the backend takes: a case it can't take fails
    (ValueError), it is not skipped."""
    requires_gpu = False  # skip off GPU (cuDNN)
    returns_lse = True
    problems = flash_problems()
    sweep_problems = flash_problems(max_seq=300)
    named_cases: dict[str, FlashProblem] = {}
    merge_problem = FlashProblem(seq_q=48, seq_k=80, heads_q=4, heads_kv=2, dqk=32, dv=64, seed=1,
                                 block_q=16, block_k=16)

    @pytest.fixture(autouse=True)
    def _needs_gpu(self):
        if self.requires_gpu and not on_gpu():
            pytest.skip(f"implementation={self.implementation!r} needs a GPU")

    def mismatches(self, problem: FlashProblem) -> list[str]:
        return flash_mismatches(problem, self.implementation, with_lse=self.returns_lse)

    def test_lse_is_logsumexp_and_branches_merge_exactly(self):
        """lse is the log-sum-exp of the scaled logits, and attention over two key ranges merges into the whole."""
        if not self.returns_lse:
            pytest.skip(f"implementation={self.implementation!r} returns no lse")
        p = self.merge_problem
        q, k, v, *_ = p.inputs()
        attend = jax.jit(lambda k, v: flash_attention(q, k, v, return_lse=True, implementation=self.implementation,
                                                      block_q=p.block_q, block_k=p.block_k))
        out, lse = attend(k, v)
        group = p.heads_q // p.heads_kv
        q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
        logits = jnp.einsum("btkgd,bskd->bkgts", q32.reshape(p.batch, p.seq_q, p.heads_kv, group, p.dqk), k32,
                            precision=jax.lax.Precision.HIGHEST) / np.sqrt(p.dqk)
        lse_tol = LSE_TOL[p.dtype]
        assert_close(lse, jax.nn.logsumexp(logits, axis=-1).reshape(p.batch, p.heads_q, p.seq_q), lse_tol, "lse")

        split = p.seq_k // 2 - 3
        (out_a, lse_a), (out_b, lse_b) = attend(k[:, :split], v[:, :split]), attend(k[:, split:], v[:, split:])
        lse_ab = jnp.logaddexp(lse_a, lse_b)
        weight = lambda part: jnp.exp(part - lse_ab).transpose(0, 2, 1)[..., None]  # [B, T, Hq, 1]
        merged = weight(lse_a) * out_a.astype(jnp.float32) + weight(lse_b) * out_b.astype(jnp.float32)
        assert_close(merged, out, TOL[p.dtype] / 10 if p.dtype == jnp.float32 else TOL[p.dtype], "merged out")
        assert_close(lse_ab, lse, lse_tol / 10, "merged lse")


# ----------------------------------------------------------------------------------------------- decode_attention

@dataclasses.dataclass(frozen=True)
class DecodeProblem:
    batch: int
    seq: int  # cache length S
    tokens: int  # Tq
    heads_q: int
    heads_kv: int
    dqk: int
    dv: int
    dtype: type
    lengths: tuple[int, ...]
    seed: int = 0

    def inputs(self):
        """Random q/k/v with NaN written into every cache entry at or beyond its sequence's length."""
        rng = np.random.default_rng(self.seed)
        q = rng.standard_normal((self.batch, self.tokens, self.heads_q, self.dqk), np.float32)
        k = rng.standard_normal((self.batch, self.seq, self.heads_kv, self.dqk), np.float32)
        v = rng.standard_normal((self.batch, self.seq, self.heads_kv, self.dv), np.float32)
        lengths = np.asarray(self.lengths, np.int32)
        stale = np.arange(self.seq)[None, :] >= lengths[:, None]
        k[stale], v[stale] = np.nan, np.nan
        return (jnp.asarray(q, self.dtype), jnp.asarray(k, self.dtype), jnp.asarray(v, self.dtype),
                jnp.asarray(lengths))


def decode_mismatch(problem: DecodeProblem, implementation, **kwargs) -> str | None:
    """Why `implementation` differs from the float32 reference on `problem` (kwargs: the op's options)."""
    q, k, v, lengths = problem.inputs()
    out = decode_attention(q, k, v, lengths, implementation=implementation, **kwargs)
    options = {name: kwargs[name] for name in ("scale", "sliding_window", "logits_soft_cap") if name in kwargs}
    ref = decode_attention_reference(q, k, v, lengths, **options)
    if out.shape != (*q.shape[:3], v.shape[-1]) or out.dtype != q.dtype:
        return f"out: {out.dtype}{out.shape}, expected {q.dtype}{(*q.shape[:3], v.shape[-1])}"
    assert np.isfinite(np.asarray(ref, np.float32)).all(), "the reference read a stale (NaN) cache entry"
    return mismatch(out, ref, TOL[problem.dtype], "out")


@st.composite
def decode_problems(draw, max_s=300, max_batch=3):
    """(problem, options) pairs: random GQA groups, head dims, lengths (== Tq, == S, between), windows, soft caps,
    split counts and KV tiles."""
    b = draw(st.integers(1, max_batch))
    tq = draw(st.integers(1, 4))
    s = draw(st.integers(max(tq, 16), max_s))
    hkv = draw(st.integers(1, 2))
    dqk = draw(st.sampled_from([32, 64, 72, 128]))
    problem = DecodeProblem(
        batch=b, seq=s, tokens=tq, heads_kv=hkv, heads_q=hkv * draw(st.sampled_from([1, 2, 4, 8])), dqk=dqk,
        dv=draw(st.sampled_from([dqk, 32, 64])), dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        lengths=tuple(draw(st.one_of(st.just(tq), st.just(s), st.integers(tq, s))) for _ in range(b)),
        seed=draw(st.integers(0, 2**31 - 1)))
    options = dict(sliding_window=draw(st.one_of(st.none(), st.integers(1, s))),
                   logits_soft_cap=draw(st.sampled_from([None, 5.0])),
                   num_splits=draw(st.sampled_from([None, 1, 2, 3, 5])),
                   block_k=draw(st.sampled_from([None, 16, 32, 64])))
    if draw(st.booleans()):
        options["scale"] = 0.3
    return problem, options


class DecodeAttentionTestBase(ReferenceComparisonBase):
    """decode_attention(implementation=<name>) against the float32 reference, with NaN in every stale cache entry.
    A problem is (DecodeProblem, the op's options). Subclasses set `implementation` (and `examples`)."""
    problems = decode_problems()
    sweep_problems = decode_problems(max_s=1200, max_batch=4)
    named_cases = {
        # length == Tq (the first query sees one key), length == S, and splits wholly past the length
        **{f"boundary_lengths_and_empty_splits_{name}": (
            DecodeProblem(3, 96, 3, 8, 2, 64, 64, dtype, lengths=(3, 96, 20), seed=1), dict(num_splits=6, block_k=16))
           for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16))},
        # one latent KV head, Dqk 576 (= 512 + 64 rope) and Dv 512, 16 heads x 2 tokens
        "absorbed_mla": (DecodeProblem(2, 64, 2, 16, 1, 576, 512, jnp.bfloat16, lengths=(64, 33), seed=2),
                         dict(num_splits=2, block_k=16)),
    }

    def mismatches(self, case) -> list[str]:
        problem, options = case
        why = decode_mismatch(problem, self.implementation, **options)
        return [] if why is None else [why]

    def test_window_of_one_returns_own_value(self):
        """With sliding_window=1 each query sees only its own key, so the output is exactly its value row."""
        q, k, v, lengths = DecodeProblem(2, 50, 2, 4, 2, 32, 32, jnp.float32, lengths=(50, 7), seed=3).inputs()
        out = decode_attention(q, k, v, lengths, sliding_window=1, implementation=self.implementation)
        pos = np.asarray(lengths)[:, None] - 2 + np.arange(2)
        own_v = np.repeat(np.asarray(v)[np.arange(2)[:, None], pos], 2, axis=2)  # [B, Tq, Hq, Dv]
        np.testing.assert_allclose(np.asarray(out), own_v, atol=1e-6, equal_nan=False)


# --------------------------------------------------------------------------------------- chunked_linear_attention

@dataclasses.dataclass(frozen=True)
class LinearProblem:
    batch: int = 2
    seq: int = 50
    heads: int = 4  # H, value heads
    groups: int = 2  # K, q/k heads
    e: int = 32
    f: int = 32
    dtype: type = jnp.float32
    chunk_size: int = 16
    lengths: tuple[int, ...] | None = None
    initial_state: bool = False
    per_dim_decay: bool = False  # log_decay [B, T, H, E] (GLA) instead of [B, T, H]
    decays: tuple[float, ...] | None = None  # constant log decay per head (cycled), or None: random in ~[-5, 0)
    segments: bool = False  # packed documents: a few per row, ids reused (0, 1, 2, 0, ...): documents are runs
    scale: float = 0.5
    seed: int = 0

    def valid(self) -> np.ndarray:
        """[B, T] bool: the tokens inside each sequence's length."""
        lengths = np.full(self.batch, self.seq) if self.lengths is None else np.asarray(self.lengths)
        return np.arange(self.seq)[None, :] < lengths[:, None]

    def inputs(self):
        """Fresh random (q, k, v, log_decay, initial_state or None, lengths or None, d_o, d_state, segment_ids or
        None); k and v are NaN at and past each sequence's length, and d_o is 0 there (those outputs are
        unspecified)."""
        rng = np.random.default_rng(self.seed)
        b, t, h, kh, e, f = self.batch, self.seq, self.heads, self.groups, self.e, self.f
        normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
        q, k, v = normal(b, t, kh, e) / np.sqrt(e), normal(b, t, kh, e), normal(b, t, h, f)
        decay_shape = (b, t, h, e) if self.per_dim_decay else (b, t, h)
        if self.decays is None:
            log_decay = -np.exp(1.5 * normal(*decay_shape) - 1.5)
        else:
            per_head = np.resize(np.asarray(self.decays, np.float32), h).reshape(h, *([1] * self.per_dim_decay))
            log_decay = np.broadcast_to(per_head, decay_shape).copy()
        lengths = None if self.lengths is None else np.asarray(self.lengths, np.int32)
        valid = self.valid()
        k[~valid], v[~valid] = np.nan, np.nan
        d_o = normal(b, t, h, f) * valid[:, :, None, None]
        state = normal(b, h, e, f) if self.initial_state else None
        d_state = normal(b, h, e, f)
        segments = None
        if self.segments:
            segments = jnp.asarray(np.cumsum(rng.random((b, t)) < min(0.5, 4 / t), axis=1) % 3, jnp.int32)
        return (jnp.asarray(q, self.dtype), jnp.asarray(k, self.dtype), jnp.asarray(v, self.dtype),
                jnp.asarray(log_decay), None if state is None else jnp.asarray(state),
                None if lengths is None else jnp.asarray(lengths), jnp.asarray(d_o), jnp.asarray(d_state), segments)


def linear_value_and_grads(fn, problem: LinearProblem, *, cast=None):
    """(o, final state, grads of sum(o * d_o) + sum(state * d_state) w.r.t. q, k, v, log_decay and the initial state
    when given) of fn(q, k, v, log_decay, initial_state_BHEF=, lengths_B=, segment_ids_BT=, scale=) -> (o, state),
    jitted as one program. `cast`: the dtype q, k, v are cast to first (the float32 reference)."""
    q, k, v, log_decay, state, lengths, d_o, d_state, segments = problem.inputs()
    diff = [x if cast is None else x.astype(cast) for x in (q, k, v)] + [log_decay] + ([state] * (state is not None))

    def loss(diff, lengths, segments, d_o, d_state):
        o, s = fn(*diff[:4], initial_state_BHEF=diff[4] if len(diff) == 5 else None, lengths_B=lengths,
                  segment_ids_BT=segments, scale=problem.scale)
        return jnp.sum(o.astype(jnp.float32) * d_o) + jnp.sum(s * d_state), (o, s)

    (_, (o, s)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(diff, lengths, segments, d_o, d_state)
    return o, s, grads


def linear_op(implementation, chunk_size: int):
    """chunked_linear_attention(implementation=...) with the final state, in the signature of the step reference."""
    return functools.partial(chunked_linear_attention, implementation=implementation, chunk_size=chunk_size,
                             return_final_state=True)


@functools.cache  # backends share named cases: compile and run the recurrence once per problem and process
def _linear_reference_value_and_grads(problem: LinearProblem):
    return linear_value_and_grads(linear_attention_step_reference, problem, cast=jnp.float32)


def linear_mismatches(problem: LinearProblem, implementation) -> list[str]:
    """Every way `implementation`'s outputs (inside the lengths), final state and gradients differ from the
    token-by-token float32 recurrence (empty: none)."""
    o, s, grads = linear_value_and_grads(linear_op(implementation, problem.chunk_size), problem)
    ref_o, ref_s, ref_grads = _linear_reference_value_and_grads(problem)
    valid = problem.valid()[:, :, None, None]
    names = ("dq", "dk", "dv", "dlog_decay", "dinitial_state")
    found = [f"{name}: dtype {x.dtype} != {problem.dtype}" for name, x in zip(("o", *names[:3]), (o, *grads[:3]))
             if x.dtype != problem.dtype]
    tol = TOL[problem.dtype]
    checks = [(jnp.where(valid, o, 0), jnp.where(valid, ref_o, 0), tol, "o"), (s, ref_s, tol, "final state")]
    checks += [(g, ref_g, tol, name) for name, g, ref_g in zip(names, grads, ref_grads) if name != "dlog_decay"]
    found += [why for check in checks if (why := mismatch(*check)) is not None]
    why = mismatch(grads[3], ref_grads[3], tol, "dlog_decay", floor=_closed_form_scale(problem, ref_grads))
    return found + ([] if why is None else [why])


def _closed_form_scale(problem: LinearProblem, ref_grads) -> float:
    """The size of the terms q.dq and k.dk whose reverse cumsum is d log_decay in the Triton backward's closed form:
    their float32 rounding is its noise floor, which shows where the true gradient is ~0 (one token and no initial
    state: the decay then changes nothing, and the reference's gradient is exactly 0)."""
    q, k = problem.inputs()[:2]
    valid = problem.valid()[:, :, None]
    return max(float(np.max(np.abs(np.where(valid, np.sum(np.asarray(x, np.float32) * np.asarray(dx), -1), 0))))
               for x, dx in ((q, ref_grads[0]), (k, ref_grads[1])))


@st.composite
def linear_problems(draw, max_seq=100, dtypes=(jnp.float32, jnp.bfloat16), chunk_sizes=(16, 32, 64),
                    per_dim_decays=(False,)):
    """Random problems: GQA-style groups, widths off the powers of 2, ragged lengths (0 included), initial states,
    packed documents."""
    groups, per_group = draw(st.sampled_from([(1, 1), (1, 2), (2, 2), (1, 4), (2, 1)]))
    seq, batch = draw(st.integers(1, max_seq)), draw(st.integers(1, 2))
    lengths = draw(st.one_of(st.none(), st.tuples(*[st.integers(0, seq)] * batch)))
    return LinearProblem(
        batch=batch, seq=seq, heads=groups * per_group, groups=groups, e=draw(st.sampled_from([16, 32, 40, 64])),
        f=draw(st.sampled_from([16, 24, 64])), dtype=draw(st.sampled_from(dtypes)),
        chunk_size=draw(st.sampled_from(chunk_sizes)), lengths=lengths, initial_state=draw(st.booleans()),
        per_dim_decay=draw(st.sampled_from(per_dim_decays)), segments=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)))


class ChunkedLinearAttentionTestBase(ReferenceComparisonBase):
    """chunked_linear_attention(implementation=<name>) against the token-by-token float32 recurrence: outputs, final
    state and every gradient. Subclasses set `implementation` and narrow `problems` to what the backend takes."""
    examples = 6
    sweep_examples = 30
    problems = sweep_problems = linear_problems()
    named_cases: dict[str, LinearProblem] = {
        "ragged_seq_groups": LinearProblem(seq=83, heads=8, groups=2, chunk_size=32, seed=1),
        "one_token": LinearProblem(batch=1, seq=1, initial_state=True, seed=2),
        "lengths_and_initial_state": LinearProblem(seq=70, lengths=(70, 17), initial_state=True, chunk_size=32,
                                                   seed=3),
        # per token: decay exp(-50) ~ 2e-22 (the state is nearly replaced) and 1 - 1e-6 (it barely decays)
        "extreme_decays": LinearProblem(seq=150, heads=4, groups=1, decays=(-50.0, -1e-6), chunk_size=64, seed=4),
        "bf16_mqa": LinearProblem(seq=96, heads=4, groups=1, e=64, f=64, dtype=jnp.bfloat16, chunk_size=32, seed=5),
        # documents across chunk boundaries, past the lengths, after an initial state, with decays near 1
        "documents": LinearProblem(seq=90, lengths=(90, 52), segments=True, initial_state=True, decays=(-1e-6, -0.3),
                                   chunk_size=16, seed=12),
    }

    def mismatches(self, problem: LinearProblem) -> list[str]:
        return linear_mismatches(problem, self.implementation)

    def test_continuation_equals_one_call(self):
        """T tokens in one call == T1 tokens, then T2 more from the carried state (T1 off the chunk grid)."""
        p = LinearProblem(seq=90, initial_state=True, chunk_size=32, seed=6)
        q, k, v, log_decay, state, *_ = p.inputs()
        op = functools.partial(linear_op(self.implementation, p.chunk_size), scale=p.scale)
        o, s = op(q, k, v, log_decay, initial_state_BHEF=state)
        t1 = 37
        o1, s1 = op(q[:, :t1], k[:, :t1], v[:, :t1], log_decay[:, :t1], initial_state_BHEF=state)
        o2, s2 = op(q[:, t1:], k[:, t1:], v[:, t1:], log_decay[:, t1:], initial_state_BHEF=s1)
        assert_close(jnp.concatenate([o1, o2], axis=1), o, TOL[p.dtype], "o")
        assert_close(s2, s, TOL[p.dtype], "final state")

    def test_packed_documents_equal_separate_calls(self):
        """Documents packed in one row (ids reused: documents are runs of equal ids) get the outputs and gradients
        of the same documents run separately (one right-padded batch), the first continuing the initial state and
        only the last reaching the final state."""
        p = LinearProblem(batch=1, seq=70, heads=4, groups=2, initial_state=True, chunk_size=16, seed=13)
        q, k, v, log_decay, state, _, d_o, d_state, _ = p.inputs()
        bounds = (0, 16, 23, 70)  # one document ends on a chunk boundary, one inside a chunk
        docs = list(zip(bounds[:-1], bounds[1:]))
        packed = jnp.asarray(np.repeat([1, 0, 1], np.diff(bounds))[None], jnp.int32)

        def separate(x):  # [1, T, ...] -> [documents, T, ...], each document at the start of its row
            return jnp.concatenate([pad_axis(x[:, start:end], 1, p.seq) for start, end in docs])

        @jax.jit
        def value_and_grads(q, k, v, log_decay, state, d_o, d_state, segments, lengths):
            def loss(q, k, v, log_decay, state):
                o, s = chunked_linear_attention(q, k, v, log_decay, initial_state_BHEF=state, lengths_B=lengths,
                                                segment_ids_BT=segments, scale=p.scale, chunk_size=p.chunk_size,
                                                return_final_state=True, implementation=self.implementation)
                return jnp.sum(o.astype(jnp.float32) * d_o) + jnp.sum(s * d_state), o
            (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, log_decay, state)
            return o, grads

        o, grads = value_and_grads(q, k, v, log_decay, state, d_o, d_state, packed, None)
        first_only = jnp.arange(len(docs))[:, None, None, None] == 0
        o_docs, grads_docs = value_and_grads(
            *map(separate, (q, k, v, log_decay)), jnp.where(first_only, state, 0), separate(d_o),
            jnp.where(first_only[::-1], d_state, 0), None, jnp.asarray(np.diff(bounds), jnp.int32))
        tol = TOL[p.dtype]
        for name, x, x_docs in zip(("o", "dq", "dk", "dv", "dlog_decay"), (o, *grads), (o_docs, *grads_docs)):
            for i, (start, end) in enumerate(docs):
                assert_close(x[:, start:end], x_docs[i:i + 1, :end - start], tol, f"{name} of document {i}")
        assert_close(grads[4], grads_docs[4][:1], tol, "dinitial_state")

    def test_final_state_is_state_at_each_length(self):
        """With lengths_B (NaN k, v past them), each sequence's final state and outputs equal an unpadded run of that
        sequence alone."""
        p = LinearProblem(batch=3, seq=75, lengths=(75, 40, 1), heads=4, groups=2, chunk_size=16, seed=7)
        q, k, v, log_decay, _, lengths, *_ = p.inputs()
        o, s = linear_op(self.implementation, p.chunk_size)(q, k, v, log_decay, lengths_B=lengths, scale=p.scale)
        for i, n in enumerate(p.lengths):
            ref_o, ref_s = linear_attention_step_reference(q[i:i + 1, :n], k[i:i + 1, :n], v[i:i + 1, :n],
                                                           log_decay[i:i + 1, :n], scale=p.scale)
            assert_close(o[i:i + 1, :n], ref_o, TOL[p.dtype], f"o of sequence {i}")
            assert_close(s[i:i + 1], ref_s, TOL[p.dtype], f"final state of sequence {i}")
