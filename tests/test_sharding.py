"""dp and fsdp on 8 simulated CPU devices give the single-device training step's results.

What is compared is what sharding must preserve: the step-1 loss, and the gradients, read off one step of the
real train step with plain SGD at learning rate 1 (the update is -grad). Parameters after Adam steps are not
compared: Adam divides by sqrt(v), so float reassociation in the sharded reductions moves near-zero gradients'
updates by a sizeable fraction of lr. The device count must be fixed before jax is imported, so the check runs in
a subprocess.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
from jax.sharding import PartitionSpec

from attnzoo.train.sharding import fsdp_spec, maybe_initialize_distributed

STATE_LAYOUTS = ("params_specs", "mu_specs")

CHECK = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from attnzoo import LanguageModel, ModelConfig
    from attnzoo.train import Placement, TrainConfig, init_train_state, make_optimizer, make_train_step

    assert jax.device_count() == 8, jax.devices()
    model_config = ModelConfig(vocab_size=264, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    x = np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0, 264), np.int32)
    y = np.roll(x, -1, axis=1)
    # Plain SGD at lr 1, in make_optimizer's shape (a chain whose second part injects the learning rate).
    sgd = optax.chain(optax.identity(), optax.inject_hyperparams(optax.sgd)(learning_rate=1.0))
    adamw = make_optimizer(TrainConfig(steps=10, warmup_steps=1, lr=1e-3))

    def one_step(parallelism, optimizer):
        placement = Placement.create(parallelism)
        place_batch = jnp.asarray if placement is None else placement.place_batch
        model = LanguageModel(model_config, rngs=nnx.Rngs(0))
        graphdef, params, rest, opt_state = init_train_state(model, optimizer, placement)
        train_step = make_train_step(graphdef, rest, optimizer, placement)
        return train_step(params, opt_state, place_batch(x), place_batch(y))

    def specs(tree):
        return np.array(sorted({str(getattr(leaf.sharding, "spec", None)) for leaf in jax.tree.leaves(tree)}))

    _, params = nnx.split(LanguageModel(model_config, rngs=nnx.Rngs(0)), nnx.Param)
    report = {f"before_{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(params))}
    for parallelism in ("none", "dp", "fsdp"):
        params, _, metrics = one_step(parallelism, sgd)
        report[f"{parallelism}_loss"] = float(metrics["loss"])
        report.update({f"{parallelism}_{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(params))})
        if parallelism != "none":  # the layout of AdamW's state, as the train step leaves it
            params, opt_state, _ = one_step(parallelism, adamw)
            report[f"{parallelism}_params_specs"] = specs(params)
            report[f"{parallelism}_mu_specs"] = specs(opt_state[1].inner_state[0].mu)
    np.savez(sys.argv[1], **report)
""")


def assert_same_sgd_step(got_loss: float, got_params: list, want_loss: float, params_before: list,
                         want_params: list, grad_rtol: float = 1e-4) -> None:
    """Two runs of one SGD step at lr 1 agree: the step-1 loss up to float reassociation, and each parameter's
    gradient (params before - after) within `grad_rtol` of its largest entry, plus the rounding of
    params - grad (one float32 epsilon of the result)."""
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    assert len(got_params) == len(want_params) == len(params_before)
    for i, (got, want, before) in enumerate(zip(got_params, want_params, params_before)):
        grad_error = np.abs((before - got) - (before - want))
        bound = grad_rtol * np.max(np.abs(before - want)) + np.finfo(np.float32).eps * np.abs(want)
        assert np.all(grad_error <= bound), f"parameter {i}: gradient error {np.max(grad_error - bound):.3g} " \
                                            f"over its bound {np.max(bound):.3g}"


def test_dp_and_fsdp_match_a_single_device_on_8_simulated_devices(tmp_path):
    env = {**os.environ, "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path / "report.npz")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "report.npz") as saved:
        report = dict(saved)
    n_params = sum(key.startswith("before_") for key in report)
    before = [report[f"before_{i}"] for i in range(n_params)]

    def params(parallelism):
        return [report[f"{parallelism}_{i}"] for i in range(n_params)]

    for parallelism in ("dp", "fsdp"):
        assert_same_sgd_step(report[f"{parallelism}_loss"], params(parallelism), report["none_loss"], before,
                             params("none"))
    # The check notices a sharding bug: one device's shard of the embedding gradient dropped.
    embedding = next(i for i, p in enumerate(before) if p.shape == (264, 64))
    dropped = params("fsdp")
    dropped[embedding] = dropped[embedding].copy()
    dropped[embedding][:264 // 8] = before[embedding][:264 // 8]
    try:
        assert_same_sgd_step(report["fsdp_loss"], dropped, report["none_loss"], before, params("none"))
    except AssertionError:
        pass
    else:
        raise AssertionError("a dropped gradient shard went unnoticed")

    replicated, rows, columns = str(PartitionSpec()), str(PartitionSpec("data")), str(PartitionSpec(None, "data"))
    for layout in STATE_LAYOUTS:
        assert list(report[f"dp_{layout}"]) == [replicated], layout
        # e.g. embedding rows over 8 devices, and matrices whose rows 8 does not divide by columns
        assert {rows, columns} <= set(report[f"fsdp_{layout}"]), layout


def test_fsdp_spec_picks_the_largest_divisible_dimension():
    assert fsdp_spec((264, 64), 8) == PartitionSpec("data")
    assert fsdp_spec((63, 128), 8) == PartitionSpec(None, "data")
    assert fsdp_spec((64,), 8) == PartitionSpec("data")
    assert fsdp_spec((7, 5), 8) == PartitionSpec()
    assert fsdp_spec((), 8) == PartitionSpec()


def test_distributed_initialization_only_for_multi_process_launches(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not maybe_initialize_distributed() and calls == []
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert maybe_initialize_distributed() and calls == [()]
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert maybe_initialize_distributed() and calls[-1] == ("10.0.0.1:1234", 2, 1)
