"""Training survives bad steps and preemption.

A non-finite step changes neither the parameters nor the optimizer state and is counted; `max_bad_steps` of them
in a row stop the run, leaving only good checkpoints; SIGTERM checkpoints and exits like Ctrl-C, and the run
resumes bit-exactly.
"""

import json
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import LanguageModel, ModelConfig
from attnzoo.train import Checkpointer, TrainConfig, Trainer, make_optimizer, make_train_step
from attnzoo.train.optim import applied_updates
from attnzoo.train.trainer import NonFiniteLossError

TINY = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
OUT_OF_VOCABULARY = TINY.vocab_size  # its embedding lookup gives NaN, and so do the loss and the gradients
TRAINING = TrainConfig(steps=6, batch_size=4, seq_len=16, warmup_steps=1, lr=1e-2, eval_every=6, eval_batches=2,
                       ckpt_every=6, log_every=1)


class PoisonedDataset:
    """`dataset` whose training batches at `bad_steps` hold an out-of-vocabulary token: a corrupt batch."""

    def __init__(self, dataset, bad_steps):
        self.dataset, self.bad_steps = dataset, set(bad_steps)

    def batch(self, split, step, batch_size, seq_len, seed=0):
        x, y = self.dataset.batch(split, step, batch_size, seq_len, seed)
        if split == "train" and step in self.bad_steps:
            x = x.copy()
            x[0, 0] = OUT_OF_VOCABULARY
        return x, y

    def eval_batches(self, *args, **kwargs):
        return self.dataset.eval_batches(*args, **kwargs)


def _trainer(run_dir, data, config=TRAINING, **options):
    return Trainer(LanguageModel(TINY, rngs=nnx.Rngs(0)), config, data, run_dir, progress=False, **options)


def _records(run_dir, kind="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in map(json.loads, lines) if r["kind"] == kind]


def _assert_bitwise_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), strict=True)


def test_a_non_finite_step_leaves_params_and_optimizer_state_bitwise_unchanged():
    graphdef, params, rest = nnx.split(LanguageModel(TINY, rngs=nnx.Rngs(0)), nnx.Param, ...)
    optimizer = make_optimizer(TRAINING)
    train_step = make_train_step(graphdef, rest, optimizer)
    opt_state = optimizer.init(params)
    x = np.asarray(jax.random.randint(jax.random.key(1), (4, 16), 0, TINY.vocab_size), np.int32)
    y = np.roll(x, -1, axis=1)
    bad_x = x.copy()
    bad_x[0, 0] = OUT_OF_VOCABULARY

    params, opt_state, metrics = train_step(params, opt_state, x, y)  # a good step: Adam's moments are set
    assert int(metrics["skipped"]) == 0 and applied_updates(opt_state) == 1
    before = jax.device_get(jax.tree.map(jnp.copy, (params, opt_state)))  # host views would block donation
    donated = jax.tree.leaves(params)[0]
    params, opt_state, metrics = train_step(params, opt_state, bad_x, y)
    assert donated.is_deleted()  # the skip is a select inside the step: the inputs are still donated
    assert not np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 1
    _assert_bitwise_equal(jax.device_get((params, opt_state)), before)
    params, opt_state, metrics = train_step(params, opt_state, x, y)
    assert int(metrics["skipped"]) == 0 and applied_updates(opt_state) == 2
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(params)))


def test_skipped_steps_are_counted_logged_and_carried_across_a_resume(tmp_path, dataset):
    data = PoisonedDataset(dataset, bad_steps={1, 3})  # batch i is trained on at step i + 1
    first = _trainer(tmp_path, data)
    first.run(until=4)
    first.close()
    resumed = _trainer(tmp_path, data)
    assert resumed.restore_latest() == 4
    result = resumed.run()
    resumed.close()
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in records] == [0, 1, 0, 1, 0, 0]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 2, 2, 2]  # the total survives the resume
    assert [np.isfinite(r["loss"]) for r in records] == [True, False, True, False, True, True]
    assert result.step == 6 and applied_updates(resumed.opt_state) == 4 and np.isfinite(result.val_loss)


def test_max_bad_steps_in_a_row_stop_the_run_and_leave_only_good_checkpoints(tmp_path, dataset):
    config = TRAINING.replace(steps=20, ckpt_every=2, eval_every=20, keep_checkpoints=20)
    trainer = _trainer(tmp_path, PoisonedDataset(dataset, bad_steps=range(4, 20)), config, max_bad_steps=3)
    with pytest.raises(NonFiniteLossError, match=r"step 7: 3 steps in a row \(steps 5-7\).* those of step 4\..*"
                                                 r"last good checkpoint is step 6") as error:
        trainer.run()
    trainer.close()
    assert (error.value.step, error.value.bad_steps, error.value.last_checkpoint_step) == (7, 3, 6)
    with Checkpointer(tmp_path, keep=20) as checkpointer:
        assert checkpointer.all_steps() == [2, 4, 6]  # nothing after the abort
        good = checkpointer.restore(trainer.params, trainer.opt_state, step=4)
        during_bad_steps = checkpointer.restore(trainer.params, trainer.opt_state, step=6)
    _assert_bitwise_equal(during_bad_steps[:2], good[:2])  # steps 5 and 6 were skipped: the step-4 state
    assert during_bad_steps[2]["data_position"] == 6  # ... with their batches consumed
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(good[:2])))
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4, 5, 6]  # the aborting step is not logged


# -- SIGTERM: training in a subprocess -----------------------------------------------------------------------

# Trains like `_trainer`, exiting as a shell reports a signal (128 + signum) when interrupted. Each training batch
# is announced in a progress file and slowed down, so that the test can signal mid-run; batches are unchanged.
TRAIN_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import numpy as np
    from flax import nnx
    from attnzoo import LanguageModel, ModelConfig
    from attnzoo.data import ByteTokenizer, TokenDataset
    from attnzoo.train import TrainConfig, Trainer
    from attnzoo.train.trainer import TrainingInterrupted

    run_dir, progress, data_dir = map(Path, sys.argv[1:4])
    model_config, config = ModelConfig.from_dict(json.loads(sys.argv[4])), TrainConfig(**json.loads(sys.argv[5]))

    class AnnouncedSlowDataset(TokenDataset):
        def batch(self, split, step, *args, **kwargs):
            if split == "train":
                progress.write_text(str(step))
                time.sleep(0.1)
            return super().batch(split, step, *args, **kwargs)

    dataset = AnnouncedSlowDataset({split: np.load(data_dir / f"{split}.npy") for split in ("train", "val")},
                                   ByteTokenizer())
    trainer = Trainer(LanguageModel(model_config, rngs=nnx.Rngs(0)), config, dataset, run_dir, progress=False)
    try:
        trainer.run()
    except TrainingInterrupted as stop:
        sys.exit(stop.exit_code)
    finally:
        trainer.close()
""")
SCRIPT_TIMEOUT_S = 120


def _sigterm_once_training(process: subprocess.Popen, progress, step: int, deadline: float) -> None:
    """SIGTERM `process` once it has started training on batch `step`."""
    while process.poll() is None and time.monotonic() < deadline:
        announced = progress.read_text().strip() if progress.exists() else ""  # empty while being rewritten
        if announced and int(announced) >= step:
            process.send_signal(signal.SIGTERM)
            return
        time.sleep(0.02)


def test_sigterm_checkpoints_and_exits_cleanly_and_the_run_resumes_bit_exactly(tmp_path, dataset):
    config = TRAINING.replace(steps=16, ckpt_every=16, eval_every=16)
    for split, tokens in dataset.tokens.items():
        np.save(tmp_path / f"{split}.npy", tokens)
    script, progress, interrupted = tmp_path / "train.py", tmp_path / "progress", tmp_path / "interrupted"
    script.write_text(TRAIN_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script), str(interrupted), str(progress), str(tmp_path),
         json.dumps(TINY.to_dict()), json.dumps(config.to_dict())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + SCRIPT_TIMEOUT_S
    # Signal from a thread while this process trains the uninterrupted reference run.
    signaller = threading.Thread(target=_sigterm_once_training, args=(process, progress, 3, deadline), daemon=True)
    signaller.start()
    try:
        straight = _trainer(tmp_path / "straight", dataset, config)
        straight.run()
        straight.close()
        output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
    finally:
        process.kill()
    signaller.join()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    saved_at = int(re.search(r"^SIGTERM: checkpoint saved at step (\d+) in ", output, re.MULTILINE)[1])
    assert 3 <= saved_at < config.steps
    with Checkpointer(interrupted, keep=3) as checkpointer:
        assert checkpointer.all_steps() == [saved_at]

    resumed = _trainer(interrupted, dataset, config)
    assert resumed.restore_latest() == saved_at
    resumed.run()
    resumed.close()
    assert _records(interrupted) == _records(straight.run_dir)  # losses, gradient norms, ... at every step
    assert _records(interrupted, "eval") == _records(straight.run_dir, "eval")
    _assert_bitwise_equal(jax.device_get(resumed.params), jax.device_get(straight.params))
