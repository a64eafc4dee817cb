"""Hugging Face-format directories in and out: config.json, `*.safetensors` (one file or shards with
model.safetensors.index.json) and the tokenizer files, read and written with the `safetensors` package (numpy; no
torch).

Loading builds the model abstractly (`nnx.eval_shape`: no random init) and fills each parameter from its tensor,
one tensor at a time, in the checkpoint's dtype (bf16 stays bf16: no float32 copy is made unless `param_dtype`
asks for one). Every parameter must find its tensor and every tensor its parameter: a missing tensor, a shape
mismatch or an extra tensor is an error naming the tensor and what was expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from attnzoo.config import ModelConfig
from attnzoo.data.tokenizers import load_directory_tokenizer, save_tokenizer
from attnzoo.interop.tables import (
    LINEAR,
    ROPE_KV,
    ROPE_Q,
    Architecture,
    LayerContext,
    Layout,
    UnsupportedConfigError,
    architecture_for_config,
    architecture_for_model,
)
from attnzoo.model import LanguageModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TRANSPOSED = (LINEAR, ROPE_Q, ROPE_KV)


class CheckpointTensorError(ValueError):
    """The tensors of a directory do not fit the model its config.json describes."""


@dataclasses.dataclass(frozen=True)
class _Pair:
    """One tensor <-> parameter pairing of a concrete model."""

    hf: str
    zoo: str
    layout: Layout
    layer: LayerContext
    optional: bool  # a replaced layer's block tensors: loaded when present and of the same shape

    def hf_shape(self, zoo_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(zoo_shape)) if self.layout in TRANSPOSED else tuple(zoo_shape)


def read_config(directory: str | os.PathLike) -> tuple[dict, Architecture, ModelConfig]:
    """(config.json, its architecture table, the equivalent ModelConfig); raises UnsupportedConfigError naming a
    field that attnzoo cannot represent."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; a Hugging Face model directory holds config.json "
                                f"and *.safetensors")
    hf = json.loads(path.read_text())
    arch = architecture_for_config(hf)
    return hf, arch, arch.read_config(hf)


def _params(model: LanguageModel) -> dict[str, nnx.Variable]:
    return {".".join(map(str, path)): variable for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _pairs(model: LanguageModel, arch: Architecture, hf: dict, fresh_layers: Iterable[int] = ()) -> list[_Pair]:
    """Every parameter of `model` paired with its tensor. Layers in `fresh_layers` (a replaced mixer) pair their
    block tensors (norms, MLP) as optional and their mixer not at all."""
    params, fresh = _params(model), set(fresh_layers)
    pairs = [_Pair(row.hf, row.zoo, row.layout, LayerContext(None, hf), False) for row in arch.top
             if row.zoo in params]
    for i, block in enumerate(model.blocks):
        layer = LayerContext(block.mixer, hf)
        for row in arch.layer:
            zoo = f"blocks.{i}.{row.zoo}"
            if zoo in params and not (i in fresh and row.zoo.startswith("mixer.")):
                pairs.append(_Pair(row.hf.format(i=i), zoo, row.layout, layer, i in fresh))
    paired = {pair.zoo for pair in pairs}
    fresh_mixers = tuple(f"blocks.{i}.mixer." for i in fresh)
    unpaired = sorted(name for name in params if name not in paired and not name.startswith(fresh_mixers))
    if unpaired:
        raise CheckpointTensorError(f"the {arch.name} table has no tensor for attnzoo parameter(s) "
                                    f"{', '.join(unpaired)} (plan {model.config.plan})")
    return pairs


class _TensorFiles(contextlib.ExitStack):
    """The tensors of a directory: model.safetensors.index.json's shards, else every *.safetensors file."""

    def __init__(self, directory: str | os.PathLike):
        super().__init__()
        directory = Path(directory)
        if (directory / INDEX_FILE).exists():
            weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory}: no *.safetensors weights (nor {INDEX_FILE})")
        self.where: dict[str, Any] = {}
        for name in files:
            if not (directory / name).exists():
                raise FileNotFoundError(f"{directory}: {INDEX_FILE} names shard {name}, which is missing")
            handle = self.enter_context(safe_open(directory / name, framework="numpy"))
            for key in handle.keys():
                self.where[key] = handle

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self.where[name].get_tensor(name)


def _load_tensors(model: LanguageModel, directory: str | os.PathLike, hf: dict, arch: Architecture,
                  fresh_layers: Iterable[int] = ()) -> tuple[dict[str, Any], list[str]]:
    """({parameter path: array}, the optional tensors skipped), every check done before any tensor is read."""
    pairs = _pairs(model, arch, hf, fresh_layers)
    params = _params(model)
    with _TensorFiles(directory) as files:
        names = set(files.where)
        required = [p for p in pairs if not p.optional]
        missing = [p for p in required if p.hf not in names]
        if missing:
            lines = [f"{p.hf} (expected shape {list(p.hf_shape(params[p.zoo].shape))}, for attnzoo {p.zoo})"
                     for p in missing[:8]]
            raise CheckpointTensorError(f"{directory}: missing tensor(s) that config.json implies:\n  "
                                        + "\n  ".join(lines) + (f"\n  ... {len(missing) - 8} more" if len(missing) > 8
                                                                else ""))
        for p in required:
            expected = p.hf_shape(params[p.zoo].shape)
            if files.shape(p.hf) != expected:
                raise CheckpointTensorError(f"{directory}: tensor {p.hf} has shape {list(files.shape(p.hf))}; "
                                            f"config.json implies {list(expected)} (attnzoo {p.zoo})")
        allowed = {p.hf for p in pairs} | _fresh_layer_tensors(arch, fresh_layers)
        if model.config.tie_embeddings and "lm_head.weight" in names:
            allowed.add("lm_head.weight")  # some tied checkpoints store the head too; it must be the embedding
            embed = next(p.hf for p in pairs if p.zoo == "embed.embedding")
            if not np.array_equal(files.get("lm_head.weight"), files.get(embed)):
                raise CheckpointTensorError(f"{directory}: tie_word_embeddings is true but lm_head.weight differs "
                                            f"from {embed}")
        extra = sorted(names - allowed)
        if extra:
            raise CheckpointTensorError(f"{directory}: unexpected tensor(s) {', '.join(extra[:8])}"
                                        f"{' ...' if len(extra) > 8 else ''}: config.json ({arch.name}, plan "
                                        f"{model.config.plan}) has no parameter for them")
        values, skipped = {}, []
        for p in pairs:
            variable = params[p.zoo]
            if p.hf not in names or files.shape(p.hf) != p.hf_shape(variable.shape):
                skipped.append(p.hf)
                continue
            array = p.layout.to_zoo(files.get(p.hf), p.layer)
            if array.dtype != variable.dtype:  # only where the checkpoint and the model differ, tensor by tensor
                array = array.astype(variable.dtype)
            values[p.zoo] = jnp.asarray(array)
    return values, skipped


def _fresh_layer_tensors(arch: Architecture, fresh_layers: Iterable[int]) -> set[str]:
    return {row.hf.format(i=i) for i in fresh_layers for row in arch.layer}


def _assign(state: nnx.State, values: dict[str, Any]) -> None:
    pure = nnx.to_pure_dict(state)
    for name, value in values.items():
        node = pure
        *parents, leaf = name.split(".")
        for key in parents:
            node = node[int(key) if key.isdigit() and int(key) in node else key]
        node[int(leaf) if leaf.isdigit() and int(leaf) in node else leaf] = value
    nnx.replace_by_pure_dict(state, pure)


def load_pretrained(directory: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None,
                    kernels: Any = None, max_seq_len: int | None = None):
    """(LanguageModel, tokenizer or None) from a Hugging Face directory.

    The parameters keep the checkpoint's dtype (config.json `dtype` / `torch_dtype`) unless `param_dtype` is
    given; the compute `dtype` defaults to the parameters'. `kernels` as ModelConfig.kernels. The model remembers
    the directory's model_type (`model.hf_model_type`), which save_pretrained writes back where several
    architectures hold the plan (a DeepSeek-V2 checkpoint saves as deepseek_v2, not V3)."""
    hf, arch, config = read_config(directory)
    overrides = dict(dtype=dtype or param_dtype, param_dtype=param_dtype, kernels=kernels, max_seq_len=max_seq_len)
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
    abstract = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if nnx.to_flat_state(rest):
        raise CheckpointTensorError(f"plan {config.plan}: the model has non-parameter state, which a Hugging Face "
                                    f"directory does not hold")
    values, _ = _load_tensors(abstract, directory, hf, arch)
    _assign(params, values)
    model = nnx.merge(graphdef, params, rest)
    model.hf_model_type = arch.model_type
    return model, load_directory_tokenizer(directory, hf)


def load_weights(model: LanguageModel, directory: str | os.PathLike, fresh_layers: Iterable[int] = ()) -> list[str]:
    """Fill `model` (built from a config compatible with the directory's) from its tensors; layers in
    `fresh_layers` keep their mixer as initialised and load their norms / MLP where the shapes agree. Returns the
    tensors that were left out."""
    hf, arch, _ = read_config(directory)
    params = nnx.state(model, nnx.Param)
    values, skipped = _load_tensors(model, directory, hf, arch, fresh_layers)
    _assign(params, values)
    nnx.update(model, params)
    return skipped


def save_pretrained(model: LanguageModel, directory: str | os.PathLike, tokenizer=None, *,
                    max_shard_bytes: int | None = None, model_type: str | None = None) -> Architecture:
    """Write `model` as the Hugging Face architecture that holds its plan exactly (config.json, safetensors
    shards of at most `max_shard_bytes` with an index when there are several, and the tokenizer's files).
    Where several hold it (MLA: deepseek_v3, deepseek_v2), `model_type` chooses; by default the model_type the
    model was loaded from (load_pretrained), else deepseek_v3. A plan with no Hugging Face counterpart (e.g. a
    gated or hybrid layer), or a `model_type` that cannot hold it, raises UnsupportedConfigError naming it.
    Returns the architecture written."""
    config = model.config
    arch = architecture_for_model(config, prefer=model_type or model.hf_model_type)
    if model_type is not None and arch.model_type != model_type:
        raise UnsupportedConfigError(f"save_pretrained: model_type={model_type!r} cannot hold plan {config.plan}; "
                                     f"it is written as {arch.model_type!r}")
    hf = arch.write_config(config, arch)
    params = _params(model)
    tensors = {p.hf: np.ascontiguousarray(p.layout.to_hf(np.asarray(params[p.zoo][...]), p.layer))
               for p in _pairs(model, arch, hf)}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        save_tokenizer(directory, tokenizer)
        hf.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    (directory / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    _write_shards(directory, tensors, max_shard_bytes)
    return arch


def _write_shards(directory: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int | None) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if max_shard_bytes is not None and shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    for stale in [*directory.glob("*.safetensors"), directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # a rewrite must not leave old shards behind
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
