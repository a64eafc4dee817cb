"""The per-op implementation tables (pallas_kernels.ops) and the op APIs in front of them: names and "auto" order,
fallback through a sequence, errors that name the reason / the allowed values, a backend whose import fails, the
light package import, and input validation."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import DecodeProblem, FlashProblem

from pallas_kernels import decode_attention, flash_attention, ops
from pallas_kernels.decode_attention import decode_attention_reference
from pallas_kernels.flash_attention.api import FlashCall

MOSAIC_MODULE = "pallas_kernels.flash_attention.pallas_mosaic_gpu"


def flash_call(dtype=jnp.float32, dims=(64, 64), **options) -> FlashCall:
    q = jnp.zeros((1, 64, 2, dims[0]), dtype)
    v = jnp.zeros((1, 64, 2, dims[1]), dtype)
    defaults = dict(segment_ids_BT=None, gate_BTH=None, causal=False, sliding_window=None, scale=0.125,
                    logits_soft_cap=None, return_lse=False, block_q=None, block_k=None, interpret=True)
    return FlashCall(q_BTHE=q, k_BSKE=q, v_BSKF=v, **(defaults | options))


def test_tables_list_implementations_in_auto_order():
    assert ops.implementations("flash_attention") == ("cudnn", "mosaic_gpu", "triton", "xla_chunked", "xla")
    assert ops.implementations("decode_attention") == ("triton", "xla")
    assert ops.implementations("chunked_linear_attention") == ("triton", "xla")
    assert ops.implementations("block_sparse_attention") == ("triton", "xla")
    assert set(ops.TABLES) == {"flash_attention", "decode_attention", "chunked_linear_attention",
                               "block_sparse_attention"}
    assert ops.available("flash_attention") == {name: None for name in ops.implementations("flash_attention")}


def test_auto_order(monkeypatch):
    assert ops.auto_order("flash_attention", gpu=False) == ("xla_chunked", "xla")
    assert ops.auto_order("flash_attention", gpu=True) == ("cudnn", "xla")  # xla_chunked is tuned for CPU
    assert ops.auto_order("decode_attention", gpu=True) == ("xla",)
    monkeypatch.setattr(ops, "PALLAS_IN_AUTO", True)
    assert ops.auto_order("flash_attention", gpu=True) == ("cudnn", "mosaic_gpu", "triton", "xla")
    assert ops.auto_order("flash_attention", gpu=False) == ("xla_chunked", "xla")  # the kernels would interpret
    assert ops.select("flash_attention", "auto", flash_call(jnp.float32), gpu=True)[0] == "triton"  # fp32: no cuDNN
    monkeypatch.setattr(ops, "PALLAS_IN_AUTO", False)
    assert ops.select("flash_attention", "auto", flash_call(jnp.float32), gpu=True)[0] == "xla"


def test_auto_is_xla_chunked_off_gpu(monkeypatch):
    from pallas_kernels.flash_attention import api
    monkeypatch.setattr(api, "on_gpu", lambda: False)  # the off-GPU choice, on any backend
    q, k, v, *_ = FlashProblem(seq_q=37, seq_k=37, heads_q=6, heads_kv=2, dqk=48, dv=32, seed=3).inputs()
    both = jax.jit(lambda q, k, v: (flash_attention(q, k, v, causal=True, return_lse=True),
                                    flash_attention(q, k, v, causal=True, return_lse=True,
                                                    implementation="xla_chunked")))
    for got, want in zip(*both(q, k, v)):
        np.testing.assert_array_equal(got, want)
    q, k, v, lengths = DecodeProblem(2, 40, 1, 4, 2, 32, 32, jnp.float32, lengths=(40, 5), seed=4).inputs()
    np.testing.assert_allclose(decode_attention(q, k, v, lengths), decode_attention_reference(q, k, v, lengths),
                               atol=1e-6, rtol=1e-6)


def _kernels_in(fn, *args) -> str:
    return str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("kwargs, dtype, dims, uses_mosaic", [
    (dict(), jnp.bfloat16, (64, 64), True),
    (dict(causal=True), jnp.float16, (128, 128), True),
    (dict(causal=True, sliding_window=8), jnp.bfloat16, (64, 64), False),
    (dict(logits_soft_cap=5.0), jnp.bfloat16, (64, 64), False),
    (dict(gate=True), jnp.bfloat16, (64, 64), False),
    (dict(segment_ids=True), jnp.bfloat16, (64, 64), False),
    (dict(), jnp.float32, (64, 64), False),
    (dict(), jnp.bfloat16, (32, 32), False),
    (dict(), jnp.bfloat16, (64, 32), False),
    (dict(block_q=32), jnp.bfloat16, (64, 64), False),
], ids=["bf16", "fp16-d128-causal", "window", "soft-cap", "gate", "segments", "fp32", "d32", "dv-ne-dqk",
        "block-q-32"])
def test_sequence_falls_back_in_order(kwargs, dtype, dims, uses_mosaic):
    """("mosaic_gpu", "triton") runs the Mosaic kernel where it applies and the Triton kernel otherwise."""
    b, t, h = 1, 64, 2
    q, v = jnp.zeros((b, t, h, dims[0]), dtype), jnp.zeros((b, t, h, dims[1]), dtype)
    if kwargs.pop("gate", False):
        kwargs["gate"] = jnp.ones((b, t, h), dtype)
    if kwargs.pop("segment_ids", False):
        kwargs["segment_ids"] = jnp.zeros((b, t), jnp.int32)
    jaxpr = _kernels_in(lambda q, k, v: flash_attention(q, k, v, implementation=("mosaic_gpu", "triton"),
                                                        **kwargs), q, q, v)
    assert ("flash_fwd_mosaic" in jaxpr) == uses_mosaic
    assert ("flash_fwd" in jaxpr.replace("flash_fwd_mosaic", "")) != uses_mosaic


def test_single_name_that_cannot_take_the_call_names_reason_and_alternatives():
    q = jnp.zeros((1, 8, 4, 64), jnp.bfloat16)
    f32 = q.astype(jnp.float32)
    for kwargs, match in [
        (dict(q=f32, k=f32, v=f32), "float32 inputs"),
        (dict(logits_soft_cap=5.0), "logits_soft_cap"),
        (dict(segment_ids=jnp.zeros((1, 8), jnp.int32)), "segment_ids"),
        (dict(return_lse=True), "return_lse"),
        (dict(v=jnp.zeros((1, 8, 4, 32), jnp.bfloat16)), "unequal q/k and v head dims"),
    ]:
        args = dict(q=q, k=q, v=q) | kwargs
        with pytest.raises(ValueError, match=rf"flash_attention: implementation='cudnn' cannot take this call: "
                                             rf"{match}.*; implementations that can: .*'triton', 'xla_chunked', 'xla'"):
            flash_attention(**args, implementation="cudnn")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'cudnn' cannot take this call: needs a GPU"):
            flash_attention(q, q, q, implementation="cudnn")
    with pytest.raises(ValueError, match=r"'mosaic_gpu' cannot take this call: sliding_window \(not in this "
                                         r"kernel\); implementations that can: 'triton', 'xla_chunked', 'xla'"):
        flash_attention(q, q, q, causal=True, sliding_window=4, implementation="mosaic_gpu")


def test_sequence_none_can_take_lists_each_reason():
    q = jnp.zeros((1, 8, 4, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"no implementation of \('cudnn', 'mosaic_gpu'\) can take this call: "
                                         r"cudnn: float32 inputs .*; mosaic_gpu: float32 inputs"):
        flash_attention(q, q, q, implementation=("cudnn", "mosaic_gpu"))


@pytest.mark.parametrize("op, implementation, allowed", [
    ("flash_attention", "pallas", "'auto', 'cudnn', 'mosaic_gpu', 'triton', 'xla_chunked', 'xla'"),
    ("flash_attention", ("triton", "auto"), "'auto', 'cudnn', 'mosaic_gpu', 'triton', 'xla_chunked', 'xla'"),
    ("flash_attention", (), "'auto', 'cudnn', 'mosaic_gpu', 'triton', 'xla_chunked', 'xla'"),
    ("decode_attention", "cudnn", "'auto', 'triton', 'xla'"),
    ("decode_attention", None, "'auto', 'triton', 'xla'"),
])
def test_unknown_name_error_names_op_and_allowed_values(op, implementation, allowed):
    with pytest.raises(ValueError, match=rf"^{op}: implementation=.* is not one of {allowed} "):
        ops.check_implementation(op, implementation)
    q = jnp.zeros((1, 4, 2, 16), jnp.float32)
    run = {"flash_attention": lambda: flash_attention(q, q, q, implementation=implementation),
           "decode_attention": lambda: decode_attention(q, q, q, jnp.array([4]), implementation=implementation)}[op]
    with pytest.raises(ValueError, match=rf"^{op}: implementation=.* is not one of {allowed} "):
        run()


def test_check_implementation():
    assert ops.check_implementation("flash_attention", "auto") is None
    assert ops.check_implementation("flash_attention", "triton") == ("triton",)
    assert ops.check_implementation("flash_attention", ["mosaic_gpu", "triton"]) == ("mosaic_gpu", "triton")
    with pytest.raises(ValueError, match="op='attention' is not one of 'flash_attention', 'decode_attention'"):
        ops.check_implementation("attention", "auto")


def test_backend_whose_import_fails_is_disabled(monkeypatch):
    real_import = ops._import_module

    def broken(module):
        if module == MOSAIC_MODULE:
            raise AttributeError("module 'jax.experimental.pallas.mosaic_gpu' has no attribute 'Layout'")
        return real_import(module)

    monkeypatch.setattr(ops, "_import_module", broken)
    monkeypatch.setattr(ops, "_loaded", {})
    x = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    with pytest.warns(RuntimeWarning, match=rf"flash_attention implementation 'mosaic_gpu' is disabled: importing "
                                            rf"{MOSAIC_MODULE} failed \(AttributeError: .*'Layout'\)"):
        jaxpr = _kernels_in(lambda x: flash_attention(x, x, x, implementation=("mosaic_gpu", "triton")), x)
    assert "flash_fwd" in jaxpr and "flash_fwd_mosaic" not in jaxpr
    with pytest.raises(ValueError, match=r"'mosaic_gpu' cannot take this call: disabled: importing .* failed "
                                         r"\(AttributeError: .*'Layout'\); implementations that can: 'triton', "
                                         r"'xla_chunked', 'xla'"):
        flash_attention(x, x, x, implementation="mosaic_gpu")
    status = ops.available("flash_attention")  # warned once: no second warning above or here
    assert status["mosaic_gpu"].startswith(f"disabled: importing {MOSAIC_MODULE} failed (AttributeError")
    assert status["triton"] is None and status["xla"] is None
    flash_attention(x, x, x)  # "auto" works; the package too


def test_package_import_loads_no_kernel_module():
    """`import pallas_kernels` / `pallas_kernels.ops` import neither jax.experimental.pallas nor any backend; the op
    functions stay functions even after a submodule of the same name is imported."""
    script = textwrap.dedent("""
        import sys
        import pallas_kernels.ops
        import pallas_kernels
        assert pallas_kernels.ops.check_implementation("flash_attention", "triton") == ("triton",)
        kernels = [m for m in sys.modules if m.startswith(("jax.experimental.pallas", "jax._src.pallas"))
                   or m.startswith("pallas_kernels.") and m.rsplit(".", 1)[1].startswith(("pallas_", "cudnn"))]
        assert not kernels, kernels
        import pallas_kernels.flash_attention.reference, pallas_kernels.decode_attention.reference
        assert callable(pallas_kernels.flash_attention) and callable(pallas_kernels.decode_attention)
        assert callable(pallas_kernels.lower_for_cuda) and "triton" in pallas_kernels.available("decode_attention")
        assert "jax.experimental.pallas" in sys.modules  # available() imported the backends
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=os.environ | {"JAX_PLATFORMS": "cpu"}, cwd=pathlib.Path(ops.__file__).parents[1])
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ input checks

@pytest.mark.parametrize("kwargs, shapes, match", [
    (dict(), ((1, 8, 6, 32), (1, 8, 4, 32), (1, 8, 4, 32)), "q has 6 heads, k has 4"),
    (dict(), ((1, 8, 4, 32), (1, 8, 2, 16), (1, 8, 2, 32)), "q and k must share head_dim"),
    (dict(), ((1, 8, 4, 32), (1, 8, 2, 32), (1, 9, 2, 32)), "k and v must have q's batch"),
    (dict(), ((8, 4, 32), (1, 8, 2, 32), (1, 8, 2, 32)), r"q must be \[batch, seq, heads, head_dim\]"),
    (dict(causal=True), ((1, 8, 4, 32), (1, 9, 2, 32), (1, 9, 2, 32)), "aligned self-attention"),
    (dict(sliding_window=4), ((1, 8, 4, 32),) * 3, "sliding_window needs causal"),
    (dict(causal=True, sliding_window=0), ((1, 8, 4, 32),) * 3, "sliding_window must be an int >= 1"),
    (dict(logits_soft_cap=0.0), ((1, 8, 4, 32),) * 3, "logits_soft_cap must be > 0"),
    (dict(gate=jnp.ones((1, 8, 2))), ((1, 8, 4, 32),) * 3, r"gate must be \[batch, seq, q_heads\]"),
    (dict(implementation="triton", block_q=48), ((1, 8, 4, 32),) * 3, "block_q must be a power of 2"),
])
def test_flash_bad_inputs_raise(kwargs, shapes, match):
    q, k, v = (jnp.zeros(s, jnp.bfloat16) for s in shapes)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, **kwargs)


def _shapes(**override):
    return dict(q=(2, 1, 4, 32), k=(2, 64, 2, 32), v=(2, 64, 2, 32), lengths=(2,)) | override


@pytest.mark.parametrize("shapes, kwargs, match", [
    (_shapes(q=(2, 4, 32)), {}, r"q must be \[batch, seq, heads, head_dim\]"),
    (_shapes(k=(2, 64, 32)), {}, r"k_cache must be \[batch, seq, heads, head_dim\]"),
    (_shapes(k=(3, 64, 2, 32)), {}, "k_cache and v_cache must have q's batch"),
    (_shapes(v=(2, 60, 2, 32)), {}, "k_cache and v_cache must have q's batch .* same seq and heads"),
    (_shapes(k=(2, 64, 2, 16)), {}, "q and k_cache must share head_dim"),
    (_shapes(q=(2, 1, 3, 32)), {}, "q heads must be a multiple of kv heads"),
    (_shapes(q=(2, 65, 4, 32)), {}, "Tq"),
    (_shapes(lengths=(3,)), {}, "lengths must be"),
    (_shapes(), dict(sliding_window=0), "sliding_window"),
    (_shapes(), dict(logits_soft_cap=-1.0), "logits_soft_cap"),
    (_shapes(), dict(num_splits=0), "num_splits"),
    (_shapes(), dict(block_k=24), "block_k"),
])
def test_decode_bad_inputs_raise(shapes, kwargs, match):
    q, k, v = (jnp.zeros(shapes[name], jnp.float32) for name in ("q", "k", "v"))
    with pytest.raises(ValueError, match=match):
        decode_attention(q, k, v, jnp.ones(shapes["lengths"], jnp.int32), **kwargs)


def test_decode_float_lengths_rejected():
    q, k, v, _ = DecodeProblem(1, 16, 1, 2, 1, 16, 16, jnp.float32, lengths=(16,)).inputs()
    with pytest.raises(ValueError, match="lengths must be an integer"):
        decode_attention(q, k, v, jnp.array([16.0]))
