"""Two processes joined by `jax.distributed` over localhost, 2 simulated CPU devices each (gloo collectives).

They give the single-process results for dp and fsdp (the step-1 loss, and the gradients read off a plain-SGD
step of the real train step), checkpoint together on a SIGTERM sent to one of them only (JAX's preemption
service makes both stop at the same step), and a second launch resumes that checkpoint bit-exactly.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from attnzoo import LanguageModel, ModelConfig
from attnzoo.train import make_train_step
from test_sharding import assert_same_sgd_step

MODEL = ModelConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2)
BATCH_SIZE, SEQ_LEN = 8, 16
LAUNCH_TIMEOUT_S = 120
XLA_FLAGS = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=2"  # 2 devices per process

WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path

    from attnzoo.train.sharding import maybe_initialize_distributed

    assert maybe_initialize_distributed()  # before anything touches a jax backend
    import jax, numpy as np, optax
    from flax import nnx
    from jax.experimental import multihost_utils
    from attnzoo import LanguageModel, ModelConfig
    from attnzoo.data import ByteTokenizer, TokenDataset
    from attnzoo.train import Placement, TrainConfig, Trainer, init_train_state, make_train_step
    from attnzoo.train.trainer import TrainingInterrupted

    phase, out = sys.argv[1], Path(sys.argv[2])
    # Both launches and both Trainers of the first one compile the same train step: compile it once.
    jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    MODEL = ModelConfig.from_dict(json.loads(sys.argv[3]))
    BATCH_SIZE, SEQ_LEN = 8, 16
    TRAINING = TrainConfig(steps=8, batch_size=BATCH_SIZE, seq_len=SEQ_LEN, warmup_steps=2, lr=1e-2, eval_every=8,
                           eval_batches=2, ckpt_every=8, log_every=1, parallelism="fsdp")

    def tokens(seed, n):
        return np.random.default_rng(seed).integers(0, 256, n).astype(np.uint16)

    class SlowDataset(TokenDataset):
        # Leaves the test time to send SIGTERM mid-run; batches are unchanged.
        def batch(self, *args, **kwargs):
            time.sleep(0.2)
            return super().batch(*args, **kwargs)

    dataset = TokenDataset({"train": tokens(0, 4000), "val": tokens(1, 1000)}, ByteTokenizer())

    def trainer(run_dir, data=dataset):
        return Trainer(LanguageModel(MODEL, rngs=nnx.Rngs(0)), TRAINING, data, out / run_dir, progress=False)

    if phase == "first":
        # The real train step with plain SGD at lr 1 (shaped like make_optimizer's chain): params - grads.
        x, y = dataset.batch("train", 0, BATCH_SIZE, SEQ_LEN)
        sgd = optax.chain(optax.identity(), optax.inject_hyperparams(optax.sgd)(learning_rate=1.0))
        for parallelism in ("dp", "fsdp"):
            placement = Placement.create(parallelism)
            graphdef, params, rest, opt_state = init_train_state(LanguageModel(MODEL, rngs=nnx.Rngs(0)), sgd,
                                                                 placement)
            train_step = make_train_step(graphdef, rest, sgd, placement)
            params, _, metrics = train_step(params, opt_state, placement.place_batch(x), placement.place_batch(y))
            leaves = [multihost_utils.process_allgather(leaf, tiled=True) for leaf in jax.tree.leaves(params)]
            if jax.process_index() == 0:
                np.savez(out / f"{parallelism}.npz", *leaves, loss=float(metrics["loss"]))
        straight = trainer("straight")
        straight.run()
        straight.close()
        interrupted = trainer("resumed", SlowDataset(dataset.tokens, dataset.tokenizer))
        try:
            interrupted.run()
        except TrainingInterrupted as stop:
            interrupted.close()
            print(f"STOPPED {stop.step}", flush=True)
            sys.exit(stop.exit_code)
        sys.exit("the run was not interrupted")
    else:
        resumed = trainer("resumed")
        print(f"RESUMED {resumed.restore_latest()}", flush=True)
        resumed.run()
        resumed.close()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(worker: Path, phase: str, out: Path) -> list[subprocess.Popen]:
    port = _free_port()
    processes = []
    for process_id in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": XLA_FLAGS,
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(process_id)}
        processes.append(subprocess.Popen([sys.executable, str(worker), phase, str(out), json.dumps(MODEL.to_dict())],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return processes


def _finish(processes: list[subprocess.Popen], deadline: float) -> list[tuple[int, str]]:
    """(exit code, output) of each process; kills all of them at the deadline."""
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((process.returncode, output))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def _lines_written(path: Path) -> int:
    """Complete lines in a file another process may be appending to."""
    return path.read_text().count("\n") if path.exists() else 0


def _train_records(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k != "tokens_per_s"} for r in records if r["kind"] == "train"}


def _single_process_sgd_step() -> tuple[float, list[np.ndarray], list[np.ndarray]]:
    """(step-1 loss, params before, params after) of the same SGD step on one device."""
    from attnzoo.data import ByteTokenizer, TokenDataset

    tokens = np.random.default_rng(0).integers(0, 256, 4000).astype(np.uint16)
    x, y = TokenDataset({"train": tokens, "val": tokens}, ByteTokenizer()).batch("train", 0, BATCH_SIZE, SEQ_LEN)
    sgd = optax.chain(optax.identity(), optax.inject_hyperparams(optax.sgd)(learning_rate=1.0))
    graphdef, params, rest = nnx.split(LanguageModel(MODEL, rngs=nnx.Rngs(0)), nnx.Param, ...)
    params_before = [np.asarray(leaf) for leaf in jax.tree.leaves(params)]
    params, _, metrics = make_train_step(graphdef, rest, sgd)(params, sgd.init(params), x, y)
    return float(metrics["loss"]), params_before, [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


def test_two_processes_match_one_and_resume_a_sigterm_checkpoint(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    processes = _launch(worker, "first", tmp_path)
    try:
        want_loss, params_before, want_params = _single_process_sgd_step()
        # SIGTERM to process 1 alone once the second run has logged 2 steps: both must stop at the same step.
        metrics = tmp_path / "resumed" / "metrics.jsonl"
        while _lines_written(metrics) < 2 and all(process.poll() is None for process in processes):
            assert time.monotonic() < deadline, "the two-process run made no progress"
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGTERM)
    finally:
        (code0, output0), (code1, output1) = _finish(processes, deadline)
    assert code0 == code1 == 128 + signal.SIGTERM, output0[-3000:] + output1[-3000:]
    stop_steps = [int(line.split()[1]) for output in (output0, output1) for line in output.splitlines()
                  if line.startswith("STOPPED")]
    assert len(stop_steps) == 2 and stop_steps[0] == stop_steps[1], stop_steps  # the same step in both
    stop_step = stop_steps[0]
    assert 2 <= stop_step < 8 and max(_train_records(tmp_path / "resumed")) == stop_step

    for parallelism in ("dp", "fsdp"):
        with np.load(tmp_path / f"{parallelism}.npz") as saved:
            got_params = [saved[f"arr_{i}"] for i in range(len(want_params))]
            assert_same_sgd_step(float(saved["loss"]), got_params, want_loss, params_before, want_params)

    results = _finish(_launch(worker, "resume", tmp_path), time.monotonic() + LAUNCH_TIMEOUT_S)
    for code, output in results:
        assert code == 0 and f"RESUMED {stop_step}" in output, output[-3000:]
    straight, resumed = _train_records(tmp_path / "straight"), _train_records(tmp_path / "resumed")
    assert sorted(resumed) == sorted(straight) == list(range(1, 9))
    assert resumed == straight  # bit-identical losses, gradient norms, ... at every step
