"""The mixer contract: the base class every token mixer subclasses, the forward context, the output record.

A mixer is one file under `attnzoo/mixers/`: its frozen options dataclass (every knob a plan option), a `Mixer`
subclass registered by name, and its decode cache. The registry resolves a plan entry's options into the dataclass
and hands it to the mixer:

    @register("name", options=NameOptions)
    class NameMixer(Mixer):
        supports = Supports(kernel_ops=("flash_attention",))   # what the contract tests may exercise
        def __init__(self, config: ModelConfig, options: NameOptions, *, shared: SharedParams, rngs: nnx.Rngs)
        def __call__(self, x_BTD, ctx: ForwardContext, cache=None) -> MixerOutput
        def flops_per_token(self, seq_len: int) -> int
        # optional, with defaults here: check (config-time validation), make_shared, init_cache,
        # cache_bytes_per_token, inert_options (options that cannot change the output, with why)

`ctx.mode` is static: "full" (training / scoring), "prefill" (fill an empty cache from right-padded prompts of
`ctx.lengths_B` tokens), "decode" (the new tokens sit at positions `ctx.lengths_B` .. `ctx.lengths_B + T - 1` of each
sequence). The model keeps the per-sequence lengths; a cache holds only the mixer's own state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Iterable, Literal, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.config import ModelConfig

Mode = Literal["full", "prefill", "decode"]


@dataclasses.dataclass(frozen=True)
class ForwardContext:
    """What a mixer sees besides its input: static mode, positions and the model-level inputs some variants read."""

    mode: Mode
    positions_BT: jax.Array
    segment_ids_BT: jax.Array | None = None
    # prefill: prompt lengths; decode: tokens already in the cache before this call; full: the real lengths of
    # right-padded sequences when the caller gives them (per-token statistics, e.g. MoH's balance loss, skip the
    # padding), else None.
    lengths_B: jax.Array | None = None
    # The token embeddings (the model's input stream), for mixers that read them at every depth (StaticEmbQK).
    input_embeddings_BTD: jax.Array | None = None
    # A second stream run through the same stack beside the batch (e.g. a fixed sequence for FixedSeqQK): its
    # normalised hidden state at this layer's mixer input, [B or 1, S, D]; None when the model has no side stream
    # (and inside the side stream's own pass).
    side_BSD: jax.Array | None = None
    # Evaluation only: softmax mixers add attention diagnostics (attnzoo.diagnostics) and other per-layer
    # statistics (gate means, head load) to their metrics; off in training, so it costs nothing there.
    diagnostics: bool = False


class MixerOutput(NamedTuple):
    y_BTD: jax.Array
    cache: Any = None
    aux_loss: jax.Array | float = 0.0  # already weighted; added to the training loss
    metrics: dict[str, jax.Array] = {}  # diagnostics logged beside the loss


@dataclasses.dataclass(frozen=True)
class Supports:
    """What a mixer can do; the contract tests read this instead of keeping skip lists."""

    decode: bool = True  # prefill + cached decode through init_cache
    multi_token_decode: bool = True  # a decode call may append T > 1 tokens at once
    kernel_ops: tuple[str, ...] = ()  # pallas_kernels ops it calls; their implementation is the model's choice


SIDE_STREAM = "side_stream"  # the SharedParams key of a fixed side stream built by a mixer's make_shared


class SharedParams(nnx.Module):
    """Modules shared by several layers, built once per key by the model (e.g. a weight dictionary that every
    attention layer draws from); a mixer asks for them through `make_shared`."""

    def __init__(self, modules: dict[str, nnx.Module]):
        self.modules = nnx.Dict(modules)

    def __getitem__(self, key: str) -> nnx.Module:
        return self.modules[key]


class Mixer(nnx.Module):
    """Base of every token mixer; see the module docstring for the contract."""

    supports: ClassVar[Supports] = Supports()
    # Options that cannot change the forward output, each with why (e.g. "kernel implementation choice: numerically
    # equal", "decode algorithm only: numerically equal"). Every other option must change what the mixer computes
    # for some input, and an option that does nothing in some setting is rejected there by `check` or the options'
    # __post_init__ (tests/test_mixer_options.py). A subclass extends its parent's: {**Parent.inert_options, ...}.
    inert_options: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def check(cls, options: Any, config: ModelConfig) -> None:
        """Raise ValueError (naming the option) when `options` cannot work with `config`; runs when the config is
        built. Checks that need only the options belong in the options dataclass's __post_init__."""

    @classmethod
    def make_shared(cls, config: ModelConfig, options: Any, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
        """Modules shared by every layer of this kind, by key (built once per model, by the first layer asking)."""
        return {}

    def init_cache(self, batch: int, max_len: int) -> Any:
        """The empty decode state of this layer for `batch` sequences of up to `max_len` tokens."""
        raise NotImplementedError(f"{type(self).__name__} does not support cached decoding")

    def cache_bytes_per_token(self) -> int:
        """Decode-state growth per token (0 for constant-size recurrent states)."""
        return 0

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token averaged over a causal sequence of `seq_len` (2 per multiply-add)."""
        raise NotImplementedError


def reject_unused(options: Any, names: Iterable[str], where: str) -> None:
    """For an options dataclass's __post_init__ (or a mixer's check): raise ValueError naming the first of `names`
    set away from its default, since the setting `where` describes does not read it ("without image_side"). An
    option that does nothing in some setting is rejected there, never accepted and ignored."""
    defaults = {f.name: f.default for f in dataclasses.fields(options)}
    for name in names:
        if getattr(options, name) != defaults[name]:
            raise ValueError(f"{name}={getattr(options, name)!r} has no effect {where}")


def head_counts(config: ModelConfig, options) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) of a mixer whose options have `n_heads`, `n_kv_heads` ("all": one per
    query head) and `head_dim`, each None for the model's default."""
    n_heads = options.n_heads or config.n_heads
    kv = options.n_kv_heads if options.n_kv_heads is not None else config.kv_heads
    return n_heads, n_heads if kv == "all" else kv, options.head_dim or config.dim_per_head


def average_context(seq_len: int, window: int | None) -> float:
    """Mean number of keys a causal query sees over positions 0..seq_len-1 (window-limited if given)."""
    w = seq_len if window is None else min(window, seq_len)
    # positions < w see i+1 keys; the rest see w.
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def dtype_bytes(dtype) -> int:
    return jnp.dtype(dtype).itemsize


def compiled_forward(forward):
    """Run a mixer's `__call__` as one `jax.jit` keyed by the module's graph and the static mode: eager callers
    (tests, notebooks, a first `model(tokens)`) compile its scans once per shape instead of on every call; under an
    outer jit or grad it is inlined."""
    @functools.wraps(forward)
    def call(self, x_BTD, ctx: ForwardContext, cache=None) -> MixerOutput:
        graphdef, state = nnx.split(self)
        arrays = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)
                  if f.name not in ("mode", "diagnostics")}
        return _run_forward(graphdef, state, x_BTD, arrays, cache, forward=forward, mode=ctx.mode,
                            diagnostics=ctx.diagnostics)

    return call


@functools.partial(jax.jit, static_argnames=("graphdef", "forward", "mode", "diagnostics"))
def _run_forward(graphdef, state, x_BTD, ctx_arrays, cache, *, forward, mode, diagnostics):
    ctx = ForwardContext(mode=mode, diagnostics=diagnostics, **ctx_arrays)
    return forward(nnx.merge(graphdef, state), x_BTD, ctx, cache)
