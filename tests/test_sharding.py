"""dp and fsdp on 8 simulated CPU devices give the single-device training step's results.

The device count must be fixed before jax is imported, so the check runs in a subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
from jax.sharding import PartitionSpec

from attnzoo.train.sharding import fsdp_spec, maybe_initialize_distributed

CHECK = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from attnzoo import LanguageModel, ModelConfig
    from attnzoo.train import Placement, TrainConfig, init_train_state, make_optimizer, make_train_step

    assert jax.device_count() == 8, jax.devices()
    model_config = ModelConfig(vocab_size=264, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    optimizer = make_optimizer(TrainConfig(steps=10, warmup_steps=1, lr=1e-3))
    x = jax.random.randint(jax.random.key(1), (8, 16), 0, 264)
    y = jnp.roll(x, -1, axis=1)

    def run(parallelism):
        placement = Placement.create(parallelism)
        place_batch = jnp.asarray if placement is None else placement.place_batch
        model = LanguageModel(model_config, rngs=nnx.Rngs(0))
        graphdef, params, rest, opt_state = init_train_state(model, optimizer, placement)
        train_step = make_train_step(graphdef, rest, optimizer, placement)
        losses = []
        for _ in range(3):
            params, opt_state, metrics = train_step(params, opt_state, place_batch(np.asarray(x)),
                                                    place_batch(np.asarray(y)))
            losses.append(float(metrics["loss"]))

        def specs(tree):
            return sorted({str(getattr(leaf.sharding, "spec", None)) for leaf in jax.tree.leaves(tree)})

        return losses, jax.device_get(params), specs(params), specs(opt_state[1].inner_state[0].mu)

    base_losses, base_params, _, _ = run("none")
    report = {}
    for parallelism in ("dp", "fsdp"):
        losses, params, specs, mu_specs = run(parallelism)
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, base_params))
        report[parallelism] = {"loss_diff": max(abs(a - b) for a, b in zip(losses, base_losses)),
                               "param_diff": max(diffs), "specs": specs, "mu_specs": mu_specs}
    print("REPORT" + json.dumps(report))
""")


def test_dp_and_fsdp_match_a_single_device_on_8_simulated_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    for parallelism in ("dp", "fsdp"):
        assert report[parallelism]["loss_diff"] < 1e-5, report
        # Adam divides by sqrt(v): float reassociation in the sharded reductions moves a parameter by up to
        # ~1% of an lr-sized step, so compare against lr = 1e-3.
        assert report[parallelism]["param_diff"] < 2e-5, report
    replicated, rows, columns = str(PartitionSpec()), str(PartitionSpec("data")), str(PartitionSpec(None, "data"))
    assert report["dp"]["specs"] == report["dp"]["mu_specs"] == [replicated]
    assert rows in report["fsdp"]["specs"] and columns in report["fsdp"]["specs"]  # e.g. embedding rows over 8
    assert rows in report["fsdp"]["mu_specs"] and columns in report["fsdp"]["mu_specs"]  # optimizer state too


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
