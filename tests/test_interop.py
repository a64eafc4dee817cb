"""attnzoo.interop: Hugging Face-format checkpoints in and out, against transformers' own outputs.

The fixtures in tests/fixtures/hf/<arch>/ were made by `experiments/hf_reference.py` (the command is in each
reference.json): a tiny random transformers config, its tensor names and shapes, and the logits and greedy
generations transformers computed from weights drawn by `hf_reference.random_tensors(shapes, seed)`. Here the same
weights are written as a safetensors checkpoint beside that config.json and loaded with `load_pretrained`.
"""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from attnzoo import LanguageModel, ModelConfig, generate
from attnzoo.data import ByteTokenizer
from attnzoo.interop import CheckpointTensorError, UnsupportedConfigError, load_pretrained, save_pretrained
from attnzoo.train.export_cli import write_reference
from attnzoo.interop.pretrained import INDEX_FILE
from attnzoo.interop.tables import deinterleave_order
from attnzoo.layers import apply_rope
from attnzoo.train import cli as train_cli

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
ARCHS = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").exists())
XLA = {"flash_attention": "xla", "decode_attention": "xla"}

_spec = importlib.util.spec_from_file_location("hf_reference", ROOT / "experiments" / "hf_reference.py")
hf_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_reference)


def write_checkpoint(arch: str, directory: Path, *, max_shard_bytes: int | None = None, dtype=np.float32) -> dict:
    """The fixture's config.json and its seeded weights as safetensors (sharded with an index past
    max_shard_bytes). Returns the reference."""
    fixture = FIXTURES / arch
    reference = json.loads((fixture / "reference.json").read_text())
    tensors = hf_reference.random_tensors(json.loads((fixture / "tensors.json").read_text()), reference["seed"])
    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((fixture / "config.json").read_text())
    if dtype != np.float32:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
        config["dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(config))
    if max_shard_bytes is None:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return reference
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for k, half in enumerate(halves, 1):
        shard = f"model-{k:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in half}, directory / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(half, shard))
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return reference


# Default runs cover every rotary / bias / window / latent / SSM path at least once within the test-time budget;
# -m slow runs every architecture both ways.
LOGITS_DEFAULT = ("llama", "mamba2")  # qwen2 (biases, windows): the bf16 test; deepseek_v3: greedy below
GENERATION_DEFAULT = ("deepseek_v3",)


@nnx.jit
def logits_of(model, tokens_BT):
    return model(tokens_BT).logits_BTV


def _by_budget(default: tuple[str, ...]) -> list:
    return [arch if arch in default else pytest.param(arch, marks=pytest.mark.slow) for arch in ARCHS]


@pytest.mark.parametrize("arch", _by_budget(LOGITS_DEFAULT))
def test_loaded_checkpoint_matches_transformers_logits(arch, tmp_path):
    reference = write_checkpoint(arch, tmp_path, max_shard_bytes=1 if arch == "llama" else None)
    model, tokenizer = load_pretrained(tmp_path, kernels=XLA)
    assert tokenizer is None
    logits = logits_of(model, jnp.asarray(reference["logits_tokens"]))
    np.testing.assert_allclose(logits, np.load(FIXTURES / arch / "logits.npy"), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", _by_budget(GENERATION_DEFAULT))
def test_loaded_checkpoint_matches_transformers_greedy_generation(arch, tmp_path):
    reference = write_checkpoint(arch, tmp_path)
    model, _ = load_pretrained(tmp_path, kernels=XLA)
    assert generate(model, reference["prompts"], len(reference["generated"][0])) == reference["generated"]


@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_round_trips_every_architecture(arch, tmp_path):
    """Bit-identical tensors under transformers' names and an equal ModelConfig, hence identical logits (checked
    with -m slow)."""
    write_checkpoint(arch, tmp_path / "in")
    model, _ = load_pretrained(tmp_path / "in", kernels=XLA)
    written = save_pretrained(model, tmp_path / "out", max_shard_bytes=4096)
    again, _ = load_pretrained(tmp_path / "out", kernels=XLA)
    assert again.config == model.config
    original = load_file(tmp_path / "in" / "model.safetensors")
    shards = {}
    for path in (tmp_path / "out").glob("*.safetensors"):
        shards.update(load_file(path))
    assert (tmp_path / "out" / INDEX_FILE).exists() and len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    assert sorted(shards) == sorted(original)
    for name, array in original.items():
        np.testing.assert_array_equal(shards[name], array, err_msg=name)
    for (path, before), (_, after) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                          nnx.to_flat_state(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(before[...], after[...], err_msg=str(path))
    expected_type = {"llama_tied_linear": "llama"}.get(arch, arch)
    assert written.model_type == expected_type


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_logits_are_identical(arch, tmp_path):
    write_checkpoint(arch, tmp_path / "in")
    model, _ = load_pretrained(tmp_path / "in", kernels=XLA)
    save_pretrained(model, tmp_path / "out")
    again, _ = load_pretrained(tmp_path / "out", kernels=XLA)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 7)))
    np.testing.assert_array_equal(model(tokens).logits_BTV, again(tokens).logits_BTV)


def test_bf16_checkpoint_loads_as_bf16_parameters(tmp_path):
    reference = write_checkpoint("qwen2", tmp_path, dtype=ml_dtypes.bfloat16)
    model, _ = load_pretrained(tmp_path, kernels=XLA)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)} and model.config.dtype == "bfloat16"
    logits = logits_of(model, jnp.asarray(reference["logits_tokens"]))
    reference_logits = np.load(FIXTURES / "qwen2" / "logits.npy")
    assert float(np.abs(logits - reference_logits).max()) < 0.15 * float(np.abs(reference_logits).max())


def test_deinterleaving_the_rotary_columns_turns_deepseek_rope_into_rotate_half():
    """DeepSeek rotates pairs (x_2i, x_2i+1) by angle p * base^(-2i/R) (as complex numbers); attnzoo rotates
    (x_i, x_i+R/2). On columns reordered by deinterleave_order both give the reordered result, so q.k agrees."""
    rng = np.random.default_rng(0)
    rope, base = 8, 10_000.0
    x_BTHR = rng.standard_normal((1, 5, 2, rope)).astype(np.float32)
    positions = np.arange(5)[None]
    angle_TF = positions[0, :, None] * base ** (-np.arange(rope // 2) * 2 / rope)
    pairs = (x_BTHR[..., 0::2] + 1j * x_BTHR[..., 1::2]) * np.exp(1j * angle_TF)[None, :, None]
    deepseek = np.stack([pairs.real, pairs.imag], axis=-1).reshape(x_BTHR.shape)
    order = deinterleave_order(rope)
    ours = apply_rope(jnp.asarray(x_BTHR[..., order]), jnp.asarray(positions), base=base)
    np.testing.assert_allclose(ours, deepseek[..., order], atol=1e-5)


# -- what cannot be represented fails, naming it -------------------------------------------------------------------

def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("arch, changes, match", [
    ("llama", dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "model_type='gpt2'.*supported: llama"),
    ("deepseek_v3", dict(first_k_dense_replace=1, n_routed_experts=4), "layers 1..1 are MoE layers"),
    ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "RoPE scaling type 'yarn' is not implemented"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    ("llama", dict(quantization_config={"quant_method": "gptq"}), "quantization_config have no attnzoo counterpart"),
    ("mamba2", dict(norm_before_gate=True), "norm_before_gate=True is not supported"),
])
def test_unrepresentable_config_fields_fail_naming_them(arch, changes, match, tmp_path):
    write_checkpoint(arch, tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(UnsupportedConfigError, match=match):
        load_pretrained(tmp_path)


def test_mamba2_time_step_limit_is_the_dt_clamp_both_ways(tmp_path):
    write_checkpoint("mamba2", tmp_path / "in")
    _edit_config(tmp_path / "in", time_step_limit=[0.01, 0.5])
    model, _ = load_pretrained(tmp_path / "in", kernels=XLA)
    assert {(o.dt_limit_min, o.dt_limit_max) for o in model.config.layer_options} == {(0.01, 0.5)}
    save_pretrained(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["time_step_limit"] == [0.01, 0.5]


def test_deepseek_v2_checkpoint_saves_as_deepseek_v2(tmp_path):
    """A model loaded from a V2 directory is written back as V2 (model_type, architectures, no rope_interleave:
    V2 always interleaves), reloads to identical logits, which are still transformers'; model_type= picks V3, and
    one that cannot hold the plan fails naming it."""
    reference = write_checkpoint("deepseek_v2", tmp_path / "in")
    model, _ = load_pretrained(tmp_path / "in", kernels=XLA)
    assert save_pretrained(model, tmp_path / "out").model_type == "deepseek_v2"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("deepseek_v2", ["DeepseekV2ForCausalLM"])
    assert "rope_interleave" not in config
    again, _ = load_pretrained(tmp_path / "out", kernels=XLA)
    tokens = jnp.asarray(reference["logits_tokens"])
    logits = logits_of(again, tokens)
    np.testing.assert_array_equal(logits, logits_of(model, tokens))
    np.testing.assert_allclose(logits, np.load(FIXTURES / "deepseek_v2" / "logits.npy"), atol=1e-4, rtol=0)
    assert save_pretrained(model, tmp_path / "v3", model_type="deepseek_v3").model_type == "deepseek_v3"
    assert json.loads((tmp_path / "v3" / "config.json").read_text())["rope_interleave"] is True
    with pytest.raises(UnsupportedConfigError, match="model_type='llama' cannot hold plan"):
        save_pretrained(model, tmp_path / "llama", model_type="llama")


def _edit_tensors(directory: Path, edit) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
     r"(?s)missing tensor.*model\.layers\.1\.self_attn\.k_proj\.weight \(expected shape \[16, 32\]"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((40, 32), np.float32)}),
     r"model\.layers\.0\.mlp\.up_proj\.weight has shape \[40, 32\]; config\.json implies \[48, 32\]"),
    (lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32)}),
     r"unexpected tensor\(s\) model\.layers\.0\.self_attn\.rotary_emb\.inv_freq"),
])
def test_tensor_mismatches_fail_naming_the_tensor_and_the_expectation(edit, match, tmp_path):
    write_checkpoint("llama", tmp_path)
    _edit_tensors(tmp_path, edit)
    with pytest.raises(CheckpointTensorError, match=match):
        load_pretrained(tmp_path)


def _small_model(plan: str, *, seed: int = 0, abstract: bool = False, **fields) -> LanguageModel:
    config = ModelConfig(**{**dict(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                                   kernels=XLA, plan=plan), **fields})
    if abstract:  # shapes only: enough where saving fails before reading a value
        return nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(seed)))
    return LanguageModel(config, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("plan, match", [
    ("gqa,gated", r"layer 1 \(gated\) has no Hugging Face counterpart"),
    ("gqa,mla", r"layer 1 \(mla\) has no Hugging Face counterpart"),
    ("gqa@a,gqa@a", r"layer 0 \(gqa@a\) shares its block"),
    ("gqa(logits_soft_cap=30.0)*2", "logits_soft_cap=30.0, which no Llama-family config can hold"),
    ("gqa(qk_norm=true),gqa", "every layer must have the same qk_norm"),
])
def test_save_pretrained_of_an_unmappable_plan_fails_naming_the_layer(plan, match, tmp_path):
    with pytest.raises(UnsupportedConfigError, match=match):
        save_pretrained(_small_model(plan, abstract=True), tmp_path)
    assert not (tmp_path / "config.json").exists()


# -- fine-tuning and export ------------------------------------------------------------------------------------------

def test_init_from_loads_the_checkpoint_and_replaced_layers_start_fresh(tmp_path, monkeypatch):
    source = _small_model("gqa*2", seed=1)  # another seed than the run's, so fresh and loaded weights differ
    save_pretrained(source, tmp_path / "hf", ByteTokenizer())
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the cat sat on the mat. " * 200)
    monkeypatch.setenv("ATTNZOO_CACHE", str(tmp_path / "cache"))
    captured = {}

    def fake_train(model, *args, **kwargs):
        captured["model"] = model
        raise SystemExit(0)

    monkeypatch.setattr(train_cli, "train", fake_train)
    with pytest.raises(SystemExit):
        train_cli.main(["--init-from", str(tmp_path / "hf"), "--plan", "gqa,gated", "--data", str(corpus),
                        "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--run-dir", str(tmp_path / "run"),
                        "--kernel", "flash_attention=xla", "--no-progress"])
    model = captured["model"]
    assert model.config.plan == "gqa,gated" and model.config.param_dtype == "float32"
    same = lambda a, b: np.array_equal(np.asarray(a[...]), np.asarray(b[...]))  # noqa: E731
    assert same(model.embed.embedding, source.embed.embedding)
    assert same(model.blocks[0].mixer.q_proj.kernel, source.blocks[0].mixer.q_proj.kernel)
    assert same(model.blocks[1].mlp.up_proj.kernel, source.blocks[1].mlp.up_proj.kernel)
    assert not same(model.blocks[1].mixer.q_proj.kernel, source.blocks[1].mixer.q_proj.kernel)  # fresh mixer


def test_saved_tokenizer_and_special_ids_come_back(tmp_path):
    save_pretrained(_small_model("gqa*2"), tmp_path, ByteTokenizer())
    _, tokenizer = load_pretrained(tmp_path, kernels=XLA)
    assert isinstance(tokenizer, ByteTokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (256, 257, 258)


@pytest.mark.slow
def test_export_writes_a_reference_that_the_saved_model_reproduces(tmp_path):
    model = _small_model("gqa*2", tie_embeddings=False)
    save_pretrained(model, tmp_path, ByteTokenizer())
    reference = write_reference(model, tmp_path, new_tokens=4)
    loaded, _ = load_pretrained(tmp_path, kernels=XLA)
    np.testing.assert_array_equal(loaded(jnp.asarray(reference["logits_tokens"])).logits_BTV,
                                  np.asarray(reference["logits"], np.float32))
    assert generate(loaded, reference["prompts"], 4) == reference["generated"]
