"""The Hugging Face architectures attnzoo reads and writes, one table each: the config translation both ways and
every tensor's name, attnzoo parameter and layout.

A table row `Row(hf, zoo, layout)` pairs a Hugging Face tensor name (`{i}` for the layer index) with an attnzoo
parameter path (relative to the model, or to `blocks.{i}` for layer rows) and the `Layout` that turns one into the
other. A row applies when the model built from the config has that parameter (q_norm only with qk_norm, biases
only with bias options, q_proj or q_a_proj by q_lora_rank, lm_head only untied), so optional tensors need no
special cases. Adding an architecture is one `Architecture(...)` with its two config functions and its rows.

Config fields: `read_config` turns config.json into a ModelConfig and raises `UnsupportedConfigError` naming any
field it cannot represent (MoE layers, an unimplemented RoPE type, ...) instead of building a different model;
fields that only matter to training in PyTorch or to the tokenizer are listed in IGNORED_FIELDS.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from attnzoo import registry
from attnzoo.config import LayerSpec, ModelConfig

DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class UnsupportedConfigError(ValueError):
    """A config.json field (or a model option, when saving) has no counterpart on the other side."""


# -- layouts -----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """How a tensor is stored on each side: `to_zoo(array, layer)` and its inverse `to_hf(array, layer)`, where
    `layer` is a `LayerContext` (for layouts that depend on the mixer's widths or a config field)."""

    name: str
    to_zoo: Callable[[np.ndarray, Any], np.ndarray]
    to_hf: Callable[[np.ndarray, Any], np.ndarray]


@dataclasses.dataclass(frozen=True)
class LayerContext:
    mixer: Any  # the layer's attnzoo mixer (None for model-level tensors)
    hf_config: dict


COPY = Layout("as is", lambda w, layer: w, lambda w, layer: w)
# torch.nn.Linear.weight is [out, in]; a Flax Linear kernel is [in, out].
LINEAR = Layout("transposed", lambda w, layer: w.T, lambda w, layer: w.T)


def deinterleave_order(rope_dims: int) -> np.ndarray:
    """The column order that turns DeepSeek's interleaved rotary pairs (x0, x1), (x2, x3), ... into attnzoo's
    rotate-half layout [x0, x2, ...; x1, x3, ...]: RoPE on interleaved pairs then equals rotate-half RoPE on the
    reordered columns (the same frequency i rotates (x_2i, x_2i+1) there and (x_i, x_i+half) here), and q.k is
    unchanged because queries and keys are reordered alike."""
    return np.concatenate([np.arange(0, rope_dims, 2), np.arange(1, rope_dims, 2)])


def _rope_columns(w_out_in: np.ndarray, layer: LayerContext, per_head: bool, inverse: bool) -> np.ndarray:
    """Reorder the rotary output rows of a torch [out, in] weight: per head (q: [nope | rope] per head) or the last
    qk_rope_head_dim rows (kv_a_proj_with_mqa: [kv_lora | rope]). No reordering unless the checkpoint interleaves
    (DeepSeek-V2 always does; V3 says so in rope_interleave)."""
    dims = layer.mixer.dims
    if not layer.hf_config.get("rope_interleave", True):
        return w_out_in
    order = deinterleave_order(dims.rope)
    if inverse:
        order = np.argsort(order)
    if per_head:
        w_HXI = w_out_in.reshape(dims.n_heads, dims.qk, -1)
        rope_HRI = w_HXI[:, dims.nope:][:, order]
        return np.concatenate([w_HXI[:, :dims.nope], rope_HRI], axis=1).reshape(w_out_in.shape)
    return np.concatenate([w_out_in[:dims.kv_lora], w_out_in[dims.kv_lora:][order]], axis=0)


def _rope_layout(per_head: bool) -> Layout:
    return Layout("transposed, rotary rows de-interleaved",
                  lambda w, layer: _rope_columns(w, layer, per_head, inverse=False).T,
                  lambda w, layer: _rope_columns(w.T, layer, per_head, inverse=True))


ROPE_Q = _rope_layout(per_head=True)
ROPE_KV = _rope_layout(per_head=False)


@dataclasses.dataclass(frozen=True)
class Row:
    hf: str
    zoo: str
    layout: Layout = COPY


# -- config helpers ----------------------------------------------------------------------------------------------

# Fields that do not change the forward pass (ids, tokenizer, generation, PyTorch runtime, init-only).
IGNORED_FIELDS = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "name_or_path", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "torch_dtype", "dtype", "pretraining_tp", "output_attentions", "output_hidden_states", "return_dict",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder",
    "output_router_logits", "router_aux_loss_coef", "attention_dropout", "auto_map", "max_window_layers",
    "use_sliding_window", "layer_types", "rope_theta", "rope_scaling", "rope_parameters", "head_dim",
    "tie_word_embeddings", "max_position_embeddings", "hidden_act", "rms_norm_eps", "vocab_size", "hidden_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "attention_bias",
    "mlp_bias", "sliding_window", "bos_token", "eos_token", "generation_config",
    "residual_in_fp32", "rescale_prenorm_residual", "time_step_rank", "_attn_implementation_autoset",
    "tokenizer_class", "keys_to_ignore_at_inference", "base_model_tp_plan", "base_model_pp_plan",
})


def _require(hf: dict, field: str, allowed, why: str = "") -> None:
    value = hf.get(field, allowed[0])
    if value not in allowed:
        raise UnsupportedConfigError(f"config.json: {field}={value!r} is not supported (attnzoo can represent "
                                     f"{' or '.join(map(repr, allowed))}){'; ' + why if why else ''}")


def _check_known(hf: dict, known: frozenset[str], arch: str) -> None:
    unknown = sorted(set(hf) - IGNORED_FIELDS - known)
    if unknown:
        raise UnsupportedConfigError(f"config.json ({arch}): field(s) {', '.join(unknown)} have no attnzoo "
                                     f"counterpart; refusing to build a model that might differ")


def rope_parameters(hf: dict) -> tuple[float, dict]:
    """(rope_theta, the scaling dict) from either spelling: transformers 5's `rope_parameters` or 4's
    `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    if "rope_theta" not in params:
        params.update(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = rope_type
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedConfigError(f"config.json: partial_rotary_factor={params['partial_rotary_factor']} is not "
                                     f"supported (attnzoo rotates the whole head)")
    return float(params["rope_theta"]), params


def gqa_rope_options(params: dict) -> dict[str, Any]:
    kind = params["rope_type"]
    if kind == "default":
        return {}
    if kind == "linear":
        return {"rope_scaling": "linear", "rope_factor": float(params["factor"])}
    if kind == "llama3":
        return {"rope_scaling": "llama3", "rope_factor": float(params["factor"]),
                "rope_low_freq_factor": float(params["low_freq_factor"]),
                "rope_high_freq_factor": float(params["high_freq_factor"]),
                "rope_original_max_len": int(params["original_max_position_embeddings"])}
    raise UnsupportedConfigError(f"config.json: RoPE scaling type {kind!r} is not implemented in attnzoo; "
                                 f"supported: 'default', 'linear', 'llama3' (GQA architectures)")


def _checkpoint_dtype(hf: dict) -> str:
    name = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
    if name not in DTYPE_NAMES:
        raise UnsupportedConfigError(f"config.json: dtype={name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return name


def _base_fields(hf: dict, *, n_heads: int, head_dim: int | None, n_kv_heads: int | None, norm_eps: float,
                 rope_base: float, mlp_hidden: int | None) -> dict[str, Any]:
    dtype = _checkpoint_dtype(hf)
    return dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, mlp_hidden=mlp_hidden,
                norm_eps=float(norm_eps), rope_base=rope_base, tie_embeddings=bool(hf.get("tie_word_embeddings")),
                max_seq_len=int(hf.get("max_position_embeddings") or 4096), dtype=dtype, param_dtype=dtype)


def layer_spec(mixer: str, options: dict[str, Any], block: dict[str, Any] | None = None) -> LayerSpec:
    """A plan entry with the options that differ from the mixer's defaults (short, readable plan strings)."""
    defaults = {f.name: f.default for f in dataclasses.fields(registry.get_mixer(mixer).options)}
    return LayerSpec(mixer, {k: v for k, v in options.items() if k not in defaults or v != defaults[k]}, None,
                     block or {})


def _writer_base(config: ModelConfig, arch: "Architecture") -> dict[str, Any]:
    return {"architectures": [arch.hf_class], "model_type": arch.model_type, "vocab_size": config.vocab_size,
            "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
            "tie_word_embeddings": config.tie_embeddings, "max_position_embeddings": config.max_seq_len,
            "dtype": config.param_dtype, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def _uniform(config: ModelConfig, what: str, values: list) -> Any:
    """The one value every layer has for `what` (HF configs hold it once), or an error naming the layers."""
    if any(v != values[0] for v in values):
        raise UnsupportedConfigError(f"save_pretrained: every layer must have the same {what} for this architecture; "
                                     f"got {values}")
    return values[0]


# -- Llama family (Llama, Mistral, Qwen2, Qwen3) -------------------------------------------------------------------

LLAMA_TOP = (Row("model.embed_tokens.weight", "embed.embedding"), Row("model.norm.weight", "final_norm.scale"),
             Row("lm_head.weight", "lm_head.kernel", LINEAR))
_ATTN = "model.layers.{i}.self_attn."
LLAMA_LAYER = (
    Row("model.layers.{i}.input_layernorm.weight", "mixer_norm.scale"),
    Row("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm.scale"),
    Row("model.layers.{i}.mlp.gate_proj.weight", "mlp.gate_proj.kernel", LINEAR),
    Row("model.layers.{i}.mlp.up_proj.weight", "mlp.up_proj.kernel", LINEAR),
    Row("model.layers.{i}.mlp.down_proj.weight", "mlp.down_proj.kernel", LINEAR),
    *(Row(_ATTN + f"{p}_proj.weight", f"mixer.{p}_proj.kernel", LINEAR) for p in "qkvo"),
    *(Row(_ATTN + f"{p}_proj.bias", f"mixer.{p}_proj.bias") for p in "qkvo"),
    Row(_ATTN + "q_norm.weight", "mixer.q_norm.scale"),
    Row(_ATTN + "k_norm.weight", "mixer.k_norm.scale"),
)


def _llama_family_reader(arch: str, *, qkv_bias_field: str | None, out_bias: bool | None, qk_norm: bool,
                         windows: str) -> Callable[[dict], ModelConfig]:
    """qkv_bias_field: the config field that switches q/k/v biases (None: Qwen2, always on); out_bias: None when
    the same field also switches o_proj's bias. windows: "none", "all" (Mistral) or "layer_types" (Qwen)."""

    def read(hf: dict) -> ModelConfig:
        _check_known(hf, frozenset(), arch)
        _require(hf, "hidden_act", ["silu"], "the MLP is SwiGLU")
        _require(hf, "mlp_bias", [False])
        if float(hf.get("attention_dropout") or 0.0) != 0.0:
            raise UnsupportedConfigError(f"config.json: attention_dropout={hf['attention_dropout']} is not "
                                         f"supported (attnzoo has no attention dropout)")
        rope_base, rope = rope_parameters(hf)
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        qkv_bias = True if qkv_bias_field is None else bool(hf.get(qkv_bias_field, False))
        options = {**gqa_rope_options(rope), "qk_norm": qk_norm, "qkv_bias": qkv_bias,
                   "out_bias": qkv_bias if out_bias is None else out_bias}
        n_layers = hf["num_hidden_layers"]
        if windows == "all" and hf.get("sliding_window"):
            per_layer = [int(hf["sliding_window"])] * n_layers
        elif windows == "layer_types":
            types = hf.get("layer_types") or ["full_attention"] * n_layers
            if hf.get("layer_types") is None and hf.get("use_sliding_window") and hf.get("sliding_window"):
                first = hf.get("max_window_layers", n_layers)
                types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
            for kind in types:
                _require({"layer_types": kind}, "layer_types", ["full_attention", "sliding_attention"])
            per_layer = [int(hf["sliding_window"]) if kind == "sliding_attention" else None for kind in types]
        else:
            per_layer = [None] * n_layers
        plan = [layer_spec("gqa", {**options, "window": w}) for w in per_layer]
        return ModelConfig(**_base_fields(hf, n_heads=n_heads, head_dim=head_dim,
                                          n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                                          norm_eps=hf.get("rms_norm_eps", 1e-6), rope_base=rope_base,
                                          mlp_hidden=hf["intermediate_size"]), plan=plan)

    return read


def _write_llama_family(config: ModelConfig, arch: "Architecture") -> dict[str, Any]:
    opts = config.layer_options
    hf = _writer_base(config, arch)
    hf.update(num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads, head_dim=config.dim_per_head,
              intermediate_size=config.mlp_width, rms_norm_eps=config.norm_eps, hidden_act="silu",
              attention_dropout=0.0)
    scaling = _uniform(config, "RoPE scaling", [o.rope_frequency_scaling() for o in opts])
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_base}
    if scaling is not None:
        rope.update(rope_type=scaling.kind, factor=scaling.factor)
        if scaling.kind == "llama3":
            rope.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                        original_max_position_embeddings=scaling.original_max_len)
    hf["rope_parameters"] = rope
    windows = [o.window for o in opts]
    if arch.name == "mistral":
        hf["sliding_window"] = windows[0]
    elif arch.name in ("qwen2", "qwen3"):
        sliding = sorted({w for w in windows if w is not None})
        if len(sliding) > 1:
            raise UnsupportedConfigError(f"save_pretrained: {arch.name} has one sliding_window for all its sliding "
                                         f"layers; got windows {windows}")
        hf.update(sliding_window=sliding[0] if sliding else None, use_sliding_window=bool(sliding),
                  max_window_layers=config.n_layers,
                  layer_types=["full_attention" if w is None else "sliding_attention" for w in windows])
    if arch.name in ("llama", "qwen3"):
        hf["attention_bias"] = opts[0].qkv_bias
    if arch.name == "llama":
        hf["mlp_bias"] = False
    return hf


def _choose_llama_family(config: ModelConfig) -> str:
    """The architecture that represents an all-GQA plan exactly, or an error naming the option that none does."""
    opts = config.layer_options
    for name, allowed in (("n_heads", (None, config.n_heads)), ("head_dim", (None, config.dim_per_head)),
                          ("logits_soft_cap", (None,)), ("rope", (True,))):
        for i, o in enumerate(opts):
            if getattr(o, name) not in allowed:
                raise UnsupportedConfigError(f"save_pretrained: layer {i} ({config.layers[i]}) has {name}="
                                             f"{getattr(o, name)!r}, which no Llama-family config can hold")
    kv = _uniform(config, "n_kv_heads", [config.kv_heads if o.n_kv_heads is None else
                                         (config.n_heads if o.n_kv_heads == "all" else o.n_kv_heads) for o in opts])
    if kv != config.kv_heads:
        raise UnsupportedConfigError(f"save_pretrained: the layers' n_kv_heads={kv} differs from the model's "
                                     f"n_kv_heads={config.kv_heads}; set it on the model instead")
    qk_norm = _uniform(config, "qk_norm", [o.qk_norm for o in opts])
    biases = _uniform(config, "(qkv_bias, out_bias)", [(o.qkv_bias, o.out_bias) for o in opts])
    windows = [o.window for o in opts]
    if qk_norm:
        if biases[0] != biases[1]:
            raise UnsupportedConfigError("save_pretrained: Qwen3 (qk_norm) has attention_bias on q, k, v and o "
                                         f"together; got qkv_bias={biases[0]}, out_bias={biases[1]}")
        return "qwen3"
    if biases == (True, False):
        return "qwen2"
    if biases == (False, True):
        raise UnsupportedConfigError("save_pretrained: out_bias without qkv_bias has no Hugging Face counterpart")
    if any(w is not None for w in windows):
        if len(set(windows)) == 1 and not biases[0]:
            return "mistral"
        raise UnsupportedConfigError("save_pretrained: per-layer sliding windows need Qwen2 (qkv_bias=true) or "
                                     f"Qwen3 (qk_norm=true); got windows {windows}")
    return "llama"


# -- DeepSeek-V2 / V3 MLA with dense MLPs -------------------------------------------------------------------------

_MLA = "model.layers.{i}.self_attn."
DEEPSEEK_LAYER = (
    *LLAMA_LAYER[:5],
    Row(_MLA + "q_proj.weight", "mixer.q_proj.kernel", ROPE_Q),
    Row(_MLA + "q_a_proj.weight", "mixer.q_a_proj.kernel", LINEAR),
    Row(_MLA + "q_a_layernorm.weight", "mixer.q_a_layernorm.scale"),
    Row(_MLA + "q_b_proj.weight", "mixer.q_b_proj.kernel", ROPE_Q),
    Row(_MLA + "kv_a_proj_with_mqa.weight", "mixer.kv_a_proj_with_mqa.kernel", ROPE_KV),
    Row(_MLA + "kv_a_layernorm.weight", "mixer.kv_a_layernorm.scale"),
    Row(_MLA + "kv_b_proj.weight", "mixer.kv_b_proj.kernel", LINEAR),
    Row(_MLA + "o_proj.weight", "mixer.o_proj.kernel", LINEAR),
)
DEEPSEEK_FIELDS = frozenset({"q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                             "qk_head_dim", "rope_interleave", "first_k_dense_replace", "n_routed_experts",
                             "n_shared_experts", "moe_intermediate_size", "num_experts_per_tok", "n_group",
                             "topk_group", "topk_method", "norm_topk_prob", "routed_scaling_factor", "scoring_func",
                             "moe_layer_freq", "num_nextn_predict_layers", "aux_loss_alpha", "seq_aux",
                             "ep_size"})
LATENT_NORM_EPS = 1e-6  # DeepseekV3RMSNorm's default, which q_a_layernorm / kv_a_layernorm keep in transformers


def _read_deepseek(arch: str) -> Callable[[dict], ModelConfig]:
    def read(hf: dict) -> ModelConfig:
        _check_known(hf, DEEPSEEK_FIELDS, arch)
        n_layers, n_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
        dense = hf.get("first_k_dense_replace", 0)
        if hf.get("n_routed_experts") and dense < n_layers:
            raise UnsupportedConfigError(
                f"config.json: layers {dense}..{n_layers - 1} are MoE layers (n_routed_experts="
                f"{hf['n_routed_experts']}, first_k_dense_replace={dense}); attnzoo reads DeepSeek checkpoints with "
                f"dense MLPs only (first_k_dense_replace >= num_hidden_layers)")
        _require(hf, "hidden_act", ["silu"], "the MLP is SwiGLU")
        _require(hf, "attention_bias", [False])
        _require(hf, "mlp_bias", [False])
        if hf.get("num_key_value_heads", n_heads) != n_heads:
            raise UnsupportedConfigError(f"config.json: num_key_value_heads={hf['num_key_value_heads']} must equal "
                                         f"num_attention_heads={n_heads} for MLA")
        if hf.get("rms_norm_eps", 1e-6) != LATENT_NORM_EPS:
            raise UnsupportedConfigError(
                f"config.json: rms_norm_eps={hf['rms_norm_eps']}: transformers keeps {LATENT_NORM_EPS} in "
                f"q_a_layernorm / kv_a_layernorm while attnzoo's MLA uses the model's eps everywhere")
        rope_base, rope = rope_parameters(hf)
        if rope["rope_type"] != "default":
            raise UnsupportedConfigError(f"config.json: RoPE scaling type {rope['rope_type']!r} is not implemented "
                                         f"for MLA in attnzoo; supported: 'default'")
        options = {"n_heads": n_heads, "q_lora_rank": hf.get("q_lora_rank") or 0,
                   "kv_lora_rank": hf["kv_lora_rank"], "qk_nope_head_dim": hf["qk_nope_head_dim"],
                   "qk_rope_head_dim": hf["qk_rope_head_dim"], "v_head_dim": hf["v_head_dim"]}
        return ModelConfig(**_base_fields(hf, n_heads=n_heads, head_dim=hf["v_head_dim"], n_kv_heads=None,
                                          norm_eps=LATENT_NORM_EPS, rope_base=rope_base,
                                          mlp_hidden=hf["intermediate_size"]),
                           plan=[layer_spec("mla", options)] * n_layers)

    return read


def _write_deepseek(config: ModelConfig, arch: "Architecture") -> dict[str, Any]:
    from attnzoo.mixers.mla import MLADims

    dims = _uniform(config, "MLA widths", [MLADims.resolve(config, o) for o in config.layer_options])
    if config.norm_eps != LATENT_NORM_EPS:
        raise UnsupportedConfigError(f"save_pretrained: norm_eps={config.norm_eps}: transformers' DeepSeek keeps "
                                     f"{LATENT_NORM_EPS} in its latent norms; build the model with "
                                     f"norm_eps={LATENT_NORM_EPS}")
    hf = _writer_base(config, arch)
    hf.update(num_attention_heads=dims.n_heads, num_key_value_heads=dims.n_heads,
              q_lora_rank=dims.q_lora or None, kv_lora_rank=dims.kv_lora, qk_nope_head_dim=dims.nope,
              qk_rope_head_dim=dims.rope, v_head_dim=dims.v, head_dim=dims.rope, intermediate_size=config.mlp_width,
              rms_norm_eps=config.norm_eps, hidden_act="silu", attention_bias=False,
              rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
              first_k_dense_replace=config.n_layers)  # every layer dense: the MoE fields keep their defaults
    if arch.model_type == "deepseek_v3":  # V2 has no such field: its checkpoints always interleave
        hf["rope_interleave"] = True
    return hf


# -- Mamba-2 -------------------------------------------------------------------------------------------------------

_MAMBA = "backbone.layers.{i}.mixer."
MAMBA2_TOP = (Row("backbone.embeddings.weight", "embed.embedding"), Row("backbone.norm_f.weight", "final_norm.scale"),
              Row("lm_head.weight", "lm_head.kernel", LINEAR))
MAMBA2_LAYER = (
    Row("backbone.layers.{i}.norm.weight", "mixer_norm.scale"),
    Row(_MAMBA + "in_proj.weight", "mixer.in_proj.kernel", LINEAR),
    Row(_MAMBA + "in_proj.bias", "mixer.in_proj.bias"),
    Row(_MAMBA + "conv1d.weight", "mixer.conv1d.weight"),  # [channels, 1, d_conv] on both sides
    Row(_MAMBA + "conv1d.bias", "mixer.conv1d.bias"),
    Row(_MAMBA + "dt_bias", "mixer.dt_bias"),
    Row(_MAMBA + "A_log", "mixer.A_log"),
    Row(_MAMBA + "D", "mixer.D"),
    Row(_MAMBA + "norm.weight", "mixer.norm.weight"),
    Row(_MAMBA + "out_proj.weight", "mixer.out_proj.kernel", LINEAR),
    Row(_MAMBA + "out_proj.bias", "mixer.out_proj.bias"),
)
MAMBA2_FIELDS = frozenset({"state_size", "expand", "conv_kernel", "n_groups", "num_heads", "chunk_size", "use_bias",
                           "use_conv_bias", "time_step_min", "time_step_max", "time_step_floor", "time_step_limit",
                           "layer_norm_epsilon", "rms_norm", "norm_before_gate"})
GATED_NORM_EPS = 1e-5  # attnzoo's Mamba-2 gated RMSNorm eps (fixed, as the reference's)


def _read_mamba2(hf: dict) -> ModelConfig:
    _check_known(hf, MAMBA2_FIELDS, "mamba2")
    _require(hf, "hidden_act", ["silu"])
    _require(hf, "rms_norm", [True], "attnzoo's Mamba-2 always has the gated RMSNorm")
    _require(hf, "norm_before_gate", [False])
    # transformers 5 writes infinity as {"__float__": "Infinity"} (JSON has no inf).
    limit = [float(v["__float__"]) if isinstance(v, dict) else float(v)
             for v in hf.get("time_step_limit") or [0.0, math.inf]]
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if eps != GATED_NORM_EPS:
        raise UnsupportedConfigError(f"config.json: layer_norm_epsilon={eps}: attnzoo's Mamba-2 gated norm uses "
                                     f"eps {GATED_NORM_EPS}; only that value is representable")
    d, expand, head_dim = hf["hidden_size"], hf.get("expand", 2), hf["head_dim"]
    if hf.get("num_heads") is not None and hf["num_heads"] * head_dim != expand * d:
        raise UnsupportedConfigError(f"config.json: num_heads={hf['num_heads']} * head_dim={head_dim} must equal "
                                     f"expand * hidden_size = {expand * d} (attnzoo derives the heads)")
    options = {"d_state": hf.get("state_size", 128), "d_conv": hf.get("conv_kernel", 4), "expand": expand,
               "head_dim": head_dim, "n_groups": hf.get("n_groups", 1), "chunk_size": hf.get("chunk_size", 256),
               "bias": bool(hf.get("use_bias", False)), "conv_bias": bool(hf.get("use_conv_bias", True)),
               "dt_min": hf.get("time_step_min", 1e-3), "dt_max": hf.get("time_step_max", 1e-1),
               "dt_init_floor": hf.get("time_step_floor", 1e-4), "dt_limit_min": limit[0],
               "dt_limit_max": None if limit[1] == math.inf else limit[1]}
    fields = _base_fields(hf, n_heads=1, head_dim=None, n_kv_heads=None, norm_eps=eps, rope_base=10_000.0,
                          mlp_hidden=None)
    return ModelConfig(**fields, plan=[layer_spec("mamba2", options, {"mlp": None})] * hf["num_hidden_layers"])


def _write_mamba2(config: ModelConfig, arch: "Architecture") -> dict[str, Any]:
    o = _uniform(config, "Mamba-2 options", list(config.layer_options))
    if config.norm_eps != GATED_NORM_EPS:
        raise UnsupportedConfigError(f"save_pretrained: norm_eps={config.norm_eps}: transformers' Mamba-2 uses "
                                     f"layer_norm_epsilon for the block norms and the gated norm ({GATED_NORM_EPS} "
                                     f"here); build the model with norm_eps={GATED_NORM_EPS}")
    hf = _writer_base(config, arch)
    hf.update(state_size=o.d_state, conv_kernel=o.d_conv, expand=o.expand, head_dim=o.head_dim,
              num_heads=o.expand * config.d_model // o.head_dim, n_groups=o.n_groups, chunk_size=o.chunk_size,
              use_bias=o.bias, use_conv_bias=o.conv_bias, hidden_act="silu", layer_norm_epsilon=config.norm_eps,
              time_step_min=o.dt_min, time_step_max=o.dt_max, time_step_floor=o.dt_init_floor,
              time_step_limit=[o.dt_limit_min, math.inf if o.dt_limit_max is None else o.dt_limit_max],
              residual_in_fp32=True)
    return hf


# -- the table of architectures ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    model_type: str
    hf_class: str
    mixer: str  # the attnzoo mixer every layer holds
    top: tuple[Row, ...]
    layer: tuple[Row, ...]
    read_config: Callable[[dict], ModelConfig]
    write_config: Callable[[ModelConfig, "Architecture"], dict]


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", "llama", "LlamaForCausalLM", "gqa", LLAMA_TOP, LLAMA_LAYER,
                 _llama_family_reader("llama", qkv_bias_field="attention_bias", out_bias=None, qk_norm=False,
                                      windows="none"), _write_llama_family),
    Architecture("mistral", "mistral", "MistralForCausalLM", "gqa", LLAMA_TOP, LLAMA_LAYER,
                 _llama_family_reader("mistral", qkv_bias_field="attention_bias", out_bias=None, qk_norm=False,
                                      windows="all"), _write_llama_family),
    Architecture("qwen2", "qwen2", "Qwen2ForCausalLM", "gqa", LLAMA_TOP, LLAMA_LAYER,
                 _llama_family_reader("qwen2", qkv_bias_field=None, out_bias=False, qk_norm=False,
                                      windows="layer_types"), _write_llama_family),
    Architecture("qwen3", "qwen3", "Qwen3ForCausalLM", "gqa", LLAMA_TOP, LLAMA_LAYER,
                 _llama_family_reader("qwen3", qkv_bias_field="attention_bias", out_bias=None, qk_norm=True,
                                      windows="layer_types"), _write_llama_family),
    Architecture("deepseek_v2", "deepseek_v2", "DeepseekV2ForCausalLM", "mla", LLAMA_TOP, DEEPSEEK_LAYER,
                 _read_deepseek("deepseek_v2"), _write_deepseek),
    Architecture("deepseek_v3", "deepseek_v3", "DeepseekV3ForCausalLM", "mla", LLAMA_TOP, DEEPSEEK_LAYER,
                 _read_deepseek("deepseek_v3"), _write_deepseek),
    Architecture("mamba2", "mamba2", "Mamba2ForCausalLM", "mamba2", MAMBA2_TOP, MAMBA2_LAYER, _read_mamba2,
                 _write_mamba2),
)}


def architecture_for_config(hf: dict) -> Architecture:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedConfigError(f"config.json: model_type={model_type!r} (architectures "
                                     f"{hf.get('architectures')}) is not supported; supported: "
                                     f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def architecture_for_model(config: ModelConfig, prefer: str | None = None) -> Architecture:
    """The Hugging Face architecture that holds this plan exactly, or an error naming the layer that none holds.
    `prefer`: a model_type to choose where several hold the plan alike (an MLA plan: deepseek_v2 or, by default,
    deepseek_v3); ignored where it does not hold the plan."""
    supported = ("plans of only gqa / mha / mqa layers (Llama, Mistral, Qwen2, Qwen3), only mla layers "
                 "(DeepSeek-V3 or V2) or only mamba2[mlp=none] layers (Mamba-2)")
    kinds = {"gqa": "gqa", "mha": "gqa", "mqa": "gqa", "mla": "mla", "mamba2": "mamba2"}
    first = kinds.get(config.layers[0].mixer)
    for i, (spec, block) in enumerate(zip(config.layers, config.block_options)):
        if kinds.get(spec.mixer) != first or first is None:
            raise UnsupportedConfigError(f"save_pretrained: layer {i} ({spec}) has no Hugging Face counterpart in "
                                         f"this plan ({config.plan}); supported: {supported}")
        if spec.share is not None:
            raise UnsupportedConfigError(f"save_pretrained: layer {i} ({spec}) shares its block (@{spec.share}); "
                                         f"Hugging Face checkpoints hold every layer's weights separately")
        wants_mlp = first != "mamba2"
        if (block.mlp is not None) != wants_mlp or block.mlp_hidden not in (None, config.mlp_width):
            needs = "a SwiGLU MLP of the model's width" if wants_mlp else "mlp=none"
            raise UnsupportedConfigError(f"save_pretrained: layer {i} ({spec}) has block options {block}; this "
                                         f"architecture needs {needs}")
    if first == "mla":
        return ARCHITECTURES["deepseek_v2" if prefer == "deepseek_v2" else "deepseek_v3"]
    if first == "mamba2":
        return ARCHITECTURES["mamba2"]
    return ARCHITECTURES[_choose_llama_family(config)]
