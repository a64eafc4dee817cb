"""Model configuration: a frozen, JSON-able `ModelConfig`, the layer plan, and named presets.

A layer plan says which token mixer each layer uses and how its block is laid out. Two spellings resolve to the
same thing:

    "gqa*3,mamba2"                         # three GQA layers, then one Mamba-2 layer
    "gqa(window=256,qk_norm=true)*2,mqa"   # mixer options in parentheses
    "mamba2[mlp=none]*4"                   # block options in brackets (see BlockOptions)
    "gqa@a,mqa,gqa@a"                      # '@tag': layers with one tag share one block's parameters
    [LayerSpec("gqa"), {"mixer": "mqa", "options": {"window": 64}, "block": {"mlp": "none"}}]

Every option is checked when the config is built (names, types, values, fit with the model), before any work.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, Mapping, Sequence

from attnzoo import registry
from pallas_kernels import ops as kernel_ops

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """How one layer's block is laid out around its mixer: x + mixer(norm(x)), then x + mlp(norm(x)).

    mlp: "swiglu" (default) or None (written `mlp=none` in a plan: a mixer-only block, e.g. Mamba stacks, Titans'
      memory layer).
    mlp_hidden: this block's MLP width (default: the model's), e.g. to match parameter counts in an ablation.
    """

    mlp: Literal["swiglu"] | None = "swiglu"
    mlp_hidden: int | None = None

    def __post_init__(self):
        if self.mlp_hidden is not None and self.mlp_hidden <= 0:
            raise ValueError(f"mlp_hidden={self.mlp_hidden} must be positive")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of the plan: the mixer's registered name, its options, block options, and an optional sharing tag."""

    mixer: str
    options: tuple[tuple[str, Any], ...] = ()
    share: str | None = None
    block: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        for name in ("options", "block"):
            if isinstance(getattr(self, name), Mapping):
                object.__setattr__(self, name, tuple(sorted(getattr(self, name).items())))

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    def __str__(self) -> str:
        text = self.mixer
        if self.options:
            text += "(" + ",".join(f"{k}={_format_value(v)}" for k, v in self.options) + ")"
        if self.block:
            text += "[" + ",".join(f"{k}={_format_value(v)}" for k, v in self.block) + "]"
        if self.share:
            text += f"@{self.share}"
        return text


_ITEM = re.compile(r"^(?P<mixer>[A-Za-z_][\w\-]*)(?:\((?P<opts>[^()]*)\))?(?:\[(?P<block>[^\[\]]*)\])?"
                   r"(?:@(?P<share>\w+))?(?:\*(?P<n>\d+))?$")


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


def _split_top_level(plan: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(plan):
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            items.append(plan[start:i])
            start = i + 1
    items.append(plan[start:])
    return [item.strip() for item in items if item.strip()]


def _parse_options(text: str | None, item: str) -> dict[str, Any]:
    options = {}
    for pair in (text or "").split(","):
        if not pair:
            continue
        if "=" not in pair:
            raise ValueError(f"plan: option {pair!r} in {item!r} must be written key=value")
        key, value = pair.split("=", 1)
        options[key.strip()] = _parse_value(value.strip())
    return options


def parse_plan(plan: str | Sequence[LayerSpec | Mapping[str, Any] | str]) -> tuple[LayerSpec, ...]:
    """Resolve a plan string or a list of per-layer specs into a tuple of `LayerSpec`s."""
    if isinstance(plan, str):
        layers: list[LayerSpec] = []
        for item in _split_top_level(plan):
            match = _ITEM.match(item.replace(" ", ""))
            if match is None:
                raise ValueError(f"plan: cannot parse {item!r}; write items like 'gqa', 'gqa*3', 'gqa(window=128)', "
                                 f"'mamba2[mlp=none]', 'gqa@shared'")
            spec = LayerSpec(match["mixer"], _parse_options(match["opts"], item), match["share"],
                             _parse_options(match["block"], item))
            layers.extend([spec] * int(match["n"] or 1))
        if not layers:
            raise ValueError("plan: the layer plan is empty; give e.g. 'gqa*4'")
        return tuple(layers)
    resolved = []
    for item in plan:
        if isinstance(item, LayerSpec):
            resolved.append(item)
        elif isinstance(item, str):
            resolved.extend(parse_plan(item))
        elif isinstance(item, Mapping):
            unknown = sorted(set(item) - {"mixer", "options", "share", "block"})
            if unknown or "mixer" not in item:
                raise ValueError(f"plan: a layer dict needs 'mixer' and may have 'options', 'block', 'share'; "
                                 f"got keys {sorted(item)}")
            resolved.append(LayerSpec(item["mixer"], dict(item.get("options", {})), item.get("share"),
                                      dict(item.get("block", {}))))
        else:
            raise ValueError(f"plan: entries must be LayerSpec, dict or str, got {type(item).__name__}")
    if not resolved:
        raise ValueError("plan: the layer plan is empty; give e.g. 'gqa*4'")
    return tuple(resolved)


def format_plan(layers: Sequence[LayerSpec]) -> str:
    """The canonical plan string (runs of identical layers written as 'spec*n')."""
    out, i = [], 0
    while i < len(layers):
        j = i
        while j < len(layers) and layers[j] == layers[i]:
            j += 1
        out.append(str(layers[i]) + (f"*{j - i}" if j - i > 1 else ""))
        i = j
    return ",".join(out)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder LM: token embedding, `n_layers` pre-norm blocks (mixer + optional MLP), final RMSNorm, LM head.

    `kernels` chooses, per pallas_kernels op, which implementation the mixers call: {"flash_attention": "cudnn",
    "decode_attention": "triton"}; a value is "auto" (the op's ordered default), one implementation name, or a
    sequence of names tried in order. Ops not named use "auto".
    """

    vocab_size: int = 259
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (MHA)
    head_dim: int | None = None  # None: d_model // n_heads
    mlp_hidden: int | None = None  # None: 8/3 * d_model rounded up to a multiple of 64
    norm_eps: float = 1e-6
    rope_base: float = 10_000.0
    tie_embeddings: bool = True
    max_seq_len: int = 1024
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    kernels: Any = ()  # {op: implementation}, stored as sorted (op, implementation) pairs
    plan: Any = None  # str or sequence of specs, resolved into `layers`; None: GQA in every layer
    layers: tuple[LayerSpec, ...] = dataclasses.field(init=False, compare=False, repr=False)
    # Each layer's resolved mixer options dataclass and BlockOptions, in plan order.
    layer_options: tuple[Any, ...] = dataclasses.field(init=False, compare=False, repr=False)
    block_options: tuple[BlockOptions, ...] = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self):
        for name, value, allowed in (("dtype", self.dtype, DTYPES), ("param_dtype", self.param_dtype, DTYPES)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        for name in ("head_dim", "mlp_hidden"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive (or None for the default)")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model} (or set head_dim)")
        kv = self.kv_heads
        if kv <= 0 or self.n_heads % kv:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        object.__setattr__(self, "kernels", _resolve_kernels(self.kernels))

        layers = parse_plan(f"gqa*{self.n_layers}" if self.plan is None else self.plan)
        if len(layers) != self.n_layers:
            raise ValueError(
                f"plan: {format_plan(layers)!r} has {len(layers)} layers but n_layers={self.n_layers}; "
                f"give exactly n_layers entries, e.g. '{layers[0].mixer}*{self.n_layers}'")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "plan", format_plan(layers))
        layer_options, block_options, tagged = [], [], {}
        for i, spec in enumerate(layers):
            if spec.share is not None and tagged.setdefault(spec.share, spec) != spec:
                raise ValueError(f"plan: layers tagged @{spec.share} share one block and must be identical, got "
                                 f"{tagged[spec.share]} and {spec}")
            try:
                layer_options.append(registry.get_mixer(spec.mixer).resolve(spec.kwargs))
                block_options.append(registry.make_options("block", BlockOptions, dict(spec.block)))
            except ValueError as error:
                raise ValueError(f"plan: layer {i} ({spec}): {error}") from None
        object.__setattr__(self, "layer_options", tuple(layer_options))
        object.__setattr__(self, "block_options", tuple(block_options))
        # Checks against the model run once every layer is resolved, so a mixer may look at the other layers.
        for i, (spec, options) in enumerate(zip(layers, layer_options)):
            try:
                registry.get_mixer(spec.mixer).cls.check(options, self)
            except ValueError as error:
                raise ValueError(f"plan: layer {i} ({spec}): {error}") from None

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or 64 * -(-(8 * self.d_model // 3) // 64)

    def kernel(self, op: str) -> str | tuple[str, ...]:
        """The implementation chosen for pallas_kernels op `op` ("auto" unless `kernels` names it)."""
        return dict(self.kernels).get(op, "auto")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["kernels"] = dict(self.kernels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown fields {unknown}; allowed: {sorted(known)}")
        return cls(**d)


def _resolve_kernels(kernels: Any) -> tuple[tuple[str, str | tuple[str, ...]], ...]:
    """Sorted (op, implementation) pairs, each checked against the op's implementation table."""
    items = kernels.items() if isinstance(kernels, Mapping) else kernels
    resolved = {}
    for op, implementation in items:
        if not isinstance(implementation, str):
            implementation = tuple(implementation)  # a JSON list, or any sequence of names
        try:
            kernel_ops.check_implementation(op, implementation)
        except ValueError as error:
            raise ValueError(f"kernels: {error}") from None
        resolved[op] = implementation
    return tuple(sorted(resolved.items()))


# Named presets. `tiny` trains on a 2-core CPU in minutes; `gpt2-small` is the 124M GPT-2 shape.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "small": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=1024),
    "gpt2-small": dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4,
                       mlp_hidden=2048, max_seq_len=1024),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A named preset with overrides; the plan defaults to GQA in every layer."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not one of {', '.join(PRESETS)}")
    fields = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig(**fields)
