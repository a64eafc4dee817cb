"""MASA specifics (arXiv 2508.04581; the registry-wide contract is in test_mixer_contract.py): a MASA layer is a GQA
layer with W^P_l = sum_n c^P_{l,n} A^P_n, its atoms are one object shared by every MASA layer, the gradient into the
atoms sums every layer's, the paper's parameter closed form, and config-time errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import LanguageModel, ModelConfig
from attnzoo.mixers.masa import AtomProjection, CoefficientGenerator, MASAttention

VOCAB = 53
BASE = dict(vocab_size=VOCAB, d_model=32, n_heads=4, kernels={"flash_attention": "xla", "decode_attention": "xla"})


def random_tokens(seed: int, shape) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


def generated(projection: AtomProjection) -> jax.Array:
    """c_l = W3 relu(W2 relu(W1 e_l + b1) + b2) + b3 from the layer's embedding and the shared MLP, written out."""
    h = projection.embedding[...]
    for i, layer in enumerate(projection.dictionary.generator.layers):
        h = h @ layer.kernel[...] + layer.bias[...]
        h = jax.nn.relu(h) if i < 2 else h
    return h


def combined(projection: AtomProjection) -> jax.Array:
    """The paper's W_l = sum_n c_{l,n} A_n, written out atom by atom."""
    coeffs = projection.coeffs[...] if projection.embedding is None else generated(projection)
    atoms = projection.dictionary.atoms[...]
    return sum(coeffs[n] * atoms[n] for n in range(atoms.shape[0]))


def gqa_twin(masa: LanguageModel, gqa_plan: str) -> LanguageModel:
    """A GQA model holding the MASA model's parameters, each shared projection set explicitly to sum_n c_n A_n."""
    twin = LanguageModel(masa.config.replace(plan=gqa_plan), rngs=nnx.Rngs(99))
    for name in ("embed", "final_norm"):
        nnx.update(getattr(twin, name), nnx.state(getattr(masa, name)))
    for src, dst in zip(masa.blocks, twin.blocks, strict=True):
        for name in ("mixer_norm", "mlp_norm", "mlp"):
            nnx.update(getattr(dst, name), nnx.state(getattr(src, name)))
        if src.mixer.q_norm is not None:
            nnx.update(dst.mixer.q_norm, nnx.state(src.mixer.q_norm))
            nnx.update(dst.mixer.k_norm, nnx.state(src.mixer.k_norm))
        for p in "qkvo":
            proj = getattr(src.mixer, f"{p}_proj")
            weight = combined(proj) if isinstance(proj, AtomProjection) else proj.kernel[...]
            getattr(dst.mixer, f"{p}_proj").kernel[...] = weight
    return twin


@pytest.mark.parametrize("masa_plan, gqa_plan", [
    ("masa(n_atoms=2,qk_norm=true)*3", "gqa(qk_norm=true)*3"),
    ("masa_qkv(n_kv_heads=2,rope=false),masa_qkv(n_kv_heads=2,rope=false),masa_qkv(n_kv_heads=2,rope=false)",
     "gqa(n_kv_heads=2,rope=false)*3"),
    ("masa(coeff_generator=true,generator_width=8)*3", "gqa*3"),
])
def test_masa_equals_gqa_with_combined_weights(masa_plan, gqa_plan):
    masa = LanguageModel(ModelConfig(n_layers=3, plan=masa_plan, **BASE), rngs=nnx.Rngs(0))
    twin = gqa_twin(masa, gqa_plan)
    tokens = random_tokens(0, (2, 11))
    forward = nnx.jit(lambda model: model(tokens, diagnostics=True))
    a, b = forward(masa), forward(twin)
    np.testing.assert_allclose(a.logits_BTV, b.logits_BTV, rtol=1e-5, atol=1e-5)
    assert set(a.metrics) == set(b.metrics) == {f"layer{i}/{k}" for i in range(3)
                                                for k in ("sink_share", "entropy", "max_logit")}
    for key in a.metrics:
        np.testing.assert_allclose(a.metrics[key], b.metrics[key], rtol=1e-4, atol=1e-6)
    # The layers differ (per-layer coefficients), so the equality above is not a coincidence of identical layers.
    q = [combined(masa.blocks[i].mixer.q_proj) for i in range(3)]
    assert float(jnp.abs(q[0] - q[1]).max()) > 1e-3
    assert not masa(tokens, diagnostics=False).metrics


def test_atoms_are_one_object_shared_by_every_masa_layer():
    model = LanguageModel(ModelConfig(n_layers=4, plan="masa,gqa,masa,masa", **BASE), rngs=nnx.Rngs(0))
    masa_layers = [model.blocks[i].mixer for i in (0, 2, 3)]
    for p in "qkvo":
        dictionary = model.shared[f"masa_{p}"]
        assert all(getattr(m, f"{p}_proj").dictionary is dictionary for m in masa_layers)
        assert dictionary.atoms.shape[0] == 2  # default: at least 2 (3 MASA layers / 3 = 1); the GQA layer not counted
    assert isinstance(model.blocks[1].mixer.q_proj, nnx.Linear)  # the GQA layer keeps its own matrices
    qkv = LanguageModel(ModelConfig(n_layers=2, plan="masa_qkv*2", **BASE), rngs=nnx.Rngs(0))
    assert set(qkv.shared.modules) == {"masa_q", "masa_k", "masa_v"}
    o_projs = [block.mixer.o_proj for block in qkv.blocks]
    assert all(isinstance(o, nnx.Linear) for o in o_projs) and o_projs[0] is not o_projs[1]


@pytest.mark.parametrize("n_layers, plan, expected", [(12, "masa*12", 4), (5, "masa*5", 2), (6, "masa*4,gqa*2", 2),
                                                      (4, "masa*4", 2), (2, "masa*2", 2), (18, "masa*18", 6),
                                                      (3, "masa(n_atoms=1)*3", 1), (3, "masa,gqa*2", 1)])
def test_default_atoms_are_a_third_of_the_masa_layers_and_at_least_two(n_layers, plan, expected):
    """The paper's S = L/3 (Transformer-S: L = 12, S = 4), L counting only MASA layers, and at least two atoms (at
    L = 4, round(4/3) = 1 atom would make every layer a scalar multiple of one matrix); one atom when asked for, or
    for a single MASA layer (its own matrix)."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=16, n_heads=2, n_layers=n_layers, plan=plan)
    dictionaries = MASAttention.make_shared(cfg, cfg.layer_options[0], nnx.Rngs(0))
    assert {key: d.atoms.shape for key, d in dictionaries.items()} == {
        f"masa_{p}": (expected, 16, 16) for p in "qkvo"}


def test_gradients_reach_the_atoms_from_every_layer():
    """Chain rule through W_l = sum_n c_{l,n} A_n: dL/dA_n = sum_l c_{l,n} dL/dW_l and dL/dc_{l,n} = <A_n, dL/dW_l>,
    with dL/dW_l read from the GQA twin (same function, explicit per-layer matrices)."""
    masa = LanguageModel(ModelConfig(n_layers=3, n_kv_heads=2, plan="masa(n_atoms=2)*3", **BASE), rngs=nnx.Rngs(1))
    twin = gqa_twin(masa, "gqa*3")
    tokens = random_tokens(1, (2, 10))

    def loss(model):
        logp = jax.nn.log_softmax(model(tokens[:, :-1]).logits_BTV)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    grad = nnx.jit(nnx.grad(loss))
    masa_grads = nnx.clone(masa)  # the model's graph (shared atoms once) holding the gradients as values
    nnx.update(masa_grads, grad(masa))
    twin_grads = nnx.clone(twin)
    nnx.update(twin_grads, grad(twin))
    for p in "qkvo":
        atoms = masa.shared[f"masa_{p}"].atoms[...]
        coeffs_LN = jnp.stack([getattr(b.mixer, f"{p}_proj").coeffs[...] for b in masa.blocks])
        dW_LIO = jnp.stack([getattr(b.mixer, f"{p}_proj").kernel[...] for b in twin_grads.blocks])
        per_layer_LNIO = coeffs_LN[:, :, None, None] * dW_LIO[:, None]
        d_atoms = masa_grads.shared[f"masa_{p}"].atoms[...]
        tol = 1e-4 * float(jnp.abs(d_atoms).max())
        np.testing.assert_allclose(d_atoms, per_layer_LNIO.sum(0), atol=tol)
        for layer in range(3):  # every layer's term is there: leaving any one out breaks the equality
            without = per_layer_LNIO.sum(0) - per_layer_LNIO[layer]
            assert float(jnp.abs(d_atoms - without).max()) > 100 * tol
            d_coeffs = getattr(masa_grads.blocks[layer].mixer, f"{p}_proj").coeffs[...]
            np.testing.assert_allclose(d_coeffs, jnp.einsum("nio,io->n", atoms, dW_LIO[layer]), rtol=1e-3,
                                       atol=1e-4 * float(jnp.abs(d_coeffs).max()))


@pytest.mark.parametrize("mixer, n_shared, paper_rate", [("masa", 4, 2 / 3), ("masa_qkv", 3, 1 / 2)])
def test_summary_matches_closed_form(mixer, n_shared, paper_rate):
    """6 MASA layers, 2 atoms (S = L/3): shared atoms + L * S coefficients per shared projection type, versus
    4 L d^2 for per-layer matrices (MHA layout); KV cache and per-token FLOPs exactly GQA's."""
    d, h, hd, layers, atoms, mlp, seq = 32, 4, 8, 6, 2, 64, 24
    cfg = ModelConfig(vocab_size=VOCAB, d_model=d, n_layers=layers, n_heads=h, mlp_hidden=mlp,
                      plan=f"{mixer}(n_atoms={atoms})*{layers}", tie_embeddings=False)
    s = LanguageModel(cfg, rngs=nnx.Rngs(0)).summary(seq_len=seq)
    dense_attn = 4 * layers * d * d
    masa_attn = n_shared * (atoms * d * d + layers * atoms) + (4 - n_shared) * layers * d * d
    assert s.total_params == VOCAB * d + masa_attn + layers * (3 * d * mlp + 2 * d) + d + d * VOCAB
    assert dict(s.rows)["shared"] == n_shared * atoms * d * d
    # The paper's rate per projection, r = 1 - S (d h + L) / (L d h), over the shared share of Q, K, V, O.
    rate = 1 - atoms * (d * d + layers) / (layers * d * d)
    assert 1 - masa_attn / dense_attn == pytest.approx(n_shared / 4 * rate, rel=1e-12)
    assert 1 - masa_attn / dense_attn == pytest.approx(paper_rate, abs=0.01)
    assert s.kv_cache_bytes_per_token == layers * 2 * h * hd * 4
    # Per token: the four d x d products and causal attention; forming W_l (S d^2 per layer) is once per forward.
    flops = layers * (2 * 4 * d * d + 4 * h * hd * (seq + 1) / 2 + 2 * 3 * d * mlp) + 2 * d * VOCAB
    assert s.flops_per_token == pytest.approx(flops, rel=1e-9, abs=layers)


@pytest.mark.parametrize("plan, message", [
    ("masa(n_atoms=0)*3", r"layer 0 .*n_atoms=0 must be >= 1"),
    ("masa(n_atoms=4)*3", r"n_atoms=4 must be between 1 and the number of MASA layers \(3\)"),
    ("masa(n_atoms=3),gqa,masa(n_atoms=3)", r"n_atoms=3 must be between 1 and the number of MASA layers \(2\)"),
    ("masa(share=qk)*3", r"share='qk' must be one of 'qkv', 'qkvo'"),
    ("masa(coeff_init_std=0.0)*3", r"coeff_init_std=0.0 must be > 0"),
    ("masa(n_atoms=1),masa(n_atoms=2),masa(n_atoms=2)", r"must agree on n_atoms.*layer 1 \(masa\(n_atoms=2\)\)"),
    ("masa,masa_qkv,masa", r"must agree on n_atoms, share.*layer 1 \(masa_qkv\) differs"),
    ("masa(n_kv_heads=1),masa,masa", r"n_heads, n_kv_heads, head_dim.*; layer 1 \(masa\) differs"),
    ("masa(n_kv_heads=3)*3", r"n_kv_heads=3 must divide n_heads=4"),
    ("masa(generator_width=0)*3", r"generator_width=0 must be >= 1"),
    ("masa(generator_width=32)*3", r"generator_width=32 has no effect without coeff_generator=true"),
    ("masa(coeff_generator=true),masa,masa", r"coeff_generator and generator_width; layer 1 \(masa\) differs"),
])
def test_bad_config_fails_when_the_config_is_built(plan, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(n_layers=3, plan=plan, **BASE)


def test_coefficient_generator_init_gradients_and_parameters():
    """coeff_generator: each layer's c_l comes from its embedding through the shared MLP. At init c has the direct
    coefficients' std 1/sqrt(N); the LM loss trains the MLP and every layer's embedding; the parameters are the
    atoms and one MLP per projection (shared) plus one [w] embedding per layer and projection, and no coefficients."""
    d, layers, atoms, width, mlp = 32, 6, 2, 16, 64
    cfg = ModelConfig(vocab_size=VOCAB, d_model=d, n_layers=layers, n_heads=4, mlp_hidden=mlp, tie_embeddings=False,
                      plan=f"masa(n_atoms={atoms},coeff_generator=true,generator_width={width})*{layers}")
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    # The init's std is exact in expectation over the MLP's draw: pool a few draws (embeddings e ~ N(0, I)).
    e_SW = jax.random.normal(jax.random.key(1), (512, width))
    c = [CoefficientGenerator(width, atoms, coeff_std=atoms**-0.5, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))(e_SW)
         for seed in range(16)]
    assert float(jnp.std(jnp.stack(c))) == pytest.approx(atoms**-0.5, rel=0.1)
    assert all(block.mixer.q_proj.coeffs is None for block in model.blocks)

    tokens = random_tokens(2, (2, 9))
    grads = nnx.clone(model)  # the model's graph (shared modules once) holding the gradients as values
    nnx.update(grads, nnx.jit(nnx.grad(lambda m: jnp.mean(m(tokens).logits_BTV ** 2)))(model))
    for layer in grads.shared["masa_o"].generator.layers:
        assert float(jnp.abs(layer.kernel[...]).max()) > 0
    for block in grads.blocks:
        assert float(jnp.abs(block.mixer.k_proj.embedding[...]).max()) > 0

    s = model.summary(seq_len=8)
    mlp_params = 2 * (width * width + width) + width * atoms + atoms
    assert dict(s.rows)["shared"] == 4 * (atoms * d * d + mlp_params)
    assert s.total_params == (VOCAB * d + dict(s.rows)["shared"] + layers * (4 * width + 3 * d * mlp + 2 * d) + d
                              + d * VOCAB)


def test_weight_decay_reaches_the_atoms_and_matrices_not_the_coefficients():
    """What the module docstring states about our trainer's weight decay: atoms and the generator's matrices
    decay; the direct coefficients, the generator's biases and the layer embeddings do not."""
    from attnzoo.train.optim import weight_decay_mask

    def decayed(plan: str, name: str) -> set[bool]:
        """The mask's values over every parameter whose path has `name` (e.g. "['coeffs']")."""
        model = LanguageModel(ModelConfig(n_layers=3, plan=plan, **BASE), rngs=nnx.Rngs(0))
        mask = weight_decay_mask(nnx.state(model, nnx.Param))
        return {bool(v) for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
                if name in jax.tree_util.keystr(path)}

    assert decayed("masa*3", "['atoms']") == {True}
    assert decayed("masa*3", "['coeffs']") == {False}
    assert decayed("masa(coeff_generator=true)*3", "['generator']['layers'][0]['kernel']") == {True}
    assert decayed("masa(coeff_generator=true)*3", "['generator']['layers'][2]['bias']") == {False}
    assert decayed("masa(coeff_generator=true)*3", "['q_proj']['embedding']") == {False}
