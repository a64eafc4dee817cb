"""decode_attention: the split-K Pallas kernel (interpret mode) against the float32 reference, CUDA lowering of the
default configurations, and input errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.common import lower_for_cuda
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.decode_attention import pallas_triton

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}
TRITON_CALL = "__gpu$xla.gpu.triton"


def make_inputs(seed, b, s, tq, hq, hkv, dqk, dv, dtype, lengths):
    """Random q/k/v with NaN written into every cache entry at or beyond its sequence's length."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, tq, hq, dqk), np.float32)
    k = rng.standard_normal((b, s, hkv, dqk), np.float32)
    v = rng.standard_normal((b, s, hkv, dv), np.float32)
    lengths = np.asarray(lengths, np.int32)
    stale = np.arange(s)[None, :] >= lengths[:, None]
    k[stale], v[stale] = np.nan, np.nan
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(lengths))


def assert_matches_reference(q, k, v, lengths, **kwargs):
    options = {name: kwargs[name] for name in ("scale", "sliding_window", "logits_soft_cap") if name in kwargs}
    out = decode_attention(q, k, v, lengths, implementation="pallas", interpret=True, **kwargs)
    ref = decode_attention_reference(q, k, v, lengths, **options)
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == q.dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(ref).all() and np.isfinite(out).all(), "NaN/inf in the output"
    tol = TOL[q.dtype.type]
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol, equal_nan=False)


@st.composite
def decode_cases(draw, max_s=300, max_batch=3):
    b = draw(st.integers(1, max_batch))
    tq = draw(st.integers(1, 4))
    s = draw(st.integers(max(tq, 16), max_s))
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 4, 8]))
    dqk = draw(st.sampled_from([32, 64, 72, 128]))
    dv = draw(st.sampled_from([dqk, 32, 64]))
    lengths = [draw(st.one_of(st.just(tq), st.just(s), st.integers(tq, s))) for _ in range(b)]
    kwargs = dict(
        sliding_window=draw(st.one_of(st.none(), st.integers(1, s))),
        logits_soft_cap=draw(st.sampled_from([None, 5.0])),
        num_splits=draw(st.sampled_from([None, 1, 2, 3, 5])),
        block_k=draw(st.sampled_from([None, 16, 32, 64])),
    )
    if draw(st.booleans()):
        kwargs["scale"] = 0.3
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    return (draw(st.integers(0, 2**31 - 1)), b, s, tq, hkv * group, hkv, dqk, dv, dtype, lengths), kwargs


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decode_cases())
def test_kernel_matches_reference(case):
    args, kwargs = case
    assert_matches_reference(*make_inputs(*args), **kwargs)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decode_cases(max_s=1200, max_batch=4))
def test_kernel_matches_reference_sweep(case):
    args, kwargs = case
    assert_matches_reference(*make_inputs(*args), **kwargs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_boundary_lengths_and_empty_splits(dtype):
    """length == Tq (the first query sees one key), length == S, and splits wholly past the length."""
    q, k, v, lengths = make_inputs(1, 3, 96, 3, 8, 2, 64, 64, dtype, [3, 96, 20])
    assert_matches_reference(q, k, v, lengths, num_splits=6, block_k=16)


def test_absorbed_mla():
    """One latent KV head, Dqk 576 (= 512 + 64 rope) and Dv 512: two power-of-2 column chunks, 16 heads x 2 tokens."""
    q, k, v, lengths = make_inputs(2, 2, 64, 2, 16, 1, 576, 512, jnp.bfloat16, [64, 33])
    assert_matches_reference(q, k, v, lengths, num_splits=2, block_k=16)


def test_window_of_one_returns_own_value():
    """With sliding_window=1 each query sees only its own key, so the output is exactly its value row."""
    q, k, v, lengths = make_inputs(3, 2, 50, 2, 4, 2, 32, 32, jnp.float32, [50, 7])
    out = decode_attention(q, k, v, lengths, sliding_window=1, implementation="pallas", interpret=True)
    pos = np.asarray(lengths)[:, None] - 2 + np.arange(2)
    own_v = np.repeat(np.asarray(v)[np.arange(2)[:, None], pos], 2, axis=2)  # [B, Tq, Hq, Dv]
    np.testing.assert_allclose(np.asarray(out), own_v, atol=1e-6, equal_nan=False)


def test_xla_and_auto_are_the_reference():
    q, k, v, lengths = make_inputs(4, 2, 40, 1, 4, 2, 32, 32, jnp.float32, [40, 5])
    ref = decode_attention_reference(q, k, v, lengths)
    for implementation in ("xla", "auto"):  # "auto" is xla off GPU
        out = decode_attention(q, k, v, lengths, implementation=implementation)
        np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6, equal_nan=False)


def test_heuristics():
    assert pallas_triton.head_dim_chunks(576) == ((0, 512), (512, 64))
    assert pallas_triton.head_dim_chunks(72) == ((0, 64), (64, 16))
    assert pallas_triton.head_dim_chunks(128) == ((0, 128),)
    assert pallas_triton.default_block_k(128, 128, 131072, 2) == 128
    assert pallas_triton.default_block_k(576, 512, 4096, 2) == 32
    assert pallas_triton.default_block_m(1 * 4, 128) == 16
    assert pallas_triton.default_block_m(4 * 128, 512) == 16
    for programs, s in [(64, 4096), (64, 131072), (8, 16384), (256, 65536)]:
        splits = pallas_triton.default_num_splits(programs, s, 128)
        assert programs * splits >= pallas_triton.NUM_SMS or splits == s // (4 * 128), (programs, s, splits)
    assert pallas_triton.default_num_splits(64, 256, 128) == 1  # a short cache is never split below 4 tiles


SD = jax.ShapeDtypeStruct


@pytest.mark.parametrize("b, s, tq, hq, hkv, dqk, dv, dtype, kwargs", [
    (8, 4096, 1, 32, 8, 128, 128, jnp.bfloat16, {}),                      # GQA decode
    (8, 16384, 4, 32, 8, 128, 128, jnp.bfloat16, {}),                     # speculative decode, 4 tokens
    (4, 8192, 1, 16, 16, 64, 64, jnp.bfloat16, {}),                       # MHA, D64
    (2, 131072, 1, 32, 8, 128, 128, jnp.bfloat16, {}),                    # long cache
    (4, 4096, 1, 128, 1, 576, 512, jnp.bfloat16, {}),                     # absorbed MLA, 128 heads
    (2, 1000, 3, 12, 4, 72, 40, jnp.float32, dict(sliding_window=100, logits_soft_cap=30.0)),
])
def test_lowers_to_triton_for_cuda(b, s, tq, hq, hkv, dqk, dv, dtype, kwargs):
    fn = functools.partial(decode_attention, implementation="pallas", interpret=False, **kwargs)
    text = lower_for_cuda(fn, SD((b, tq, hq, dqk), dtype), SD((b, s, hkv, dqk), dtype), SD((b, s, hkv, dv), dtype),
                          SD((b,), jnp.int32))
    assert TRITON_CALL in text


def _shapes(**override):
    shapes = dict(q=(2, 1, 4, 32), k=(2, 64, 2, 32), v=(2, 64, 2, 32), lengths=(2,))
    shapes.update(override)
    return shapes


@pytest.mark.parametrize("shapes, kwargs, match", [
    (_shapes(q=(2, 4, 32)), {}, "q must be"),
    (_shapes(k=(2, 64, 32)), {}, "k_cache and v_cache must be"),
    (_shapes(k=(3, 64, 2, 32)), {}, "batch size"),
    (_shapes(v=(2, 60, 2, 32)), {}, "must agree on"),
    (_shapes(k=(2, 64, 2, 16)), {}, "k_cache head dim"),
    (_shapes(q=(2, 1, 3, 32)), {}, "multiple of the cache's kv heads"),
    (_shapes(q=(2, 65, 4, 32)), {}, "Tq"),
    (_shapes(lengths=(3,)), {}, "lengths must be"),
    (_shapes(), dict(sliding_window=0), "sliding_window"),
    (_shapes(), dict(logits_soft_cap=-1.0), "logits_soft_cap"),
    (_shapes(), dict(num_splits=0), "num_splits"),
    (_shapes(), dict(block_k=24), "block_k"),
    (_shapes(), dict(implementation="cudnn"), "not available for decode"),
    (_shapes(), dict(implementation="triton"), "implementation"),
])
def test_bad_inputs(shapes, kwargs, match):
    q, k, v = (jnp.zeros(shapes[name], jnp.float32) for name in ("q", "k", "v"))
    with pytest.raises(ValueError, match=match):
        decode_attention(q, k, v, jnp.ones(shapes["lengths"], jnp.int32), **kwargs)


def test_float_lengths_rejected():
    q, k, v, _ = make_inputs(0, 1, 16, 1, 2, 1, 16, 16, jnp.float32, [16])
    with pytest.raises(ValueError, match="lengths must be an integer"):
        decode_attention(q, k, v, jnp.array([16.0]))
