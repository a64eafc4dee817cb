"""Checkpoints and run directories: round trip, keep-last-N, exact resume, no overwrite, config checks, atomicity."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from orbax.checkpoint._src.path import atomicity

from attnzoo import LanguageModel, ModelConfig
from attnzoo.data import ByteTokenizer
from attnzoo.train import (Checkpointer, ConfigMismatchError, RunDirError, TrainConfig, Trainer, learning_rate_schedule,
                           prepare_run_dir)
from attnzoo.train.trainer import run_config

TINY = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
TRAINING = TrainConfig(steps=8, batch_size=4, seq_len=16, warmup_steps=2, lr=1e-2, eval_every=4, eval_batches=2,
                       ckpt_every=4, log_every=1)


def _trainer(run_dir, dataset, config=TRAINING):
    return Trainer(LanguageModel(TINY, rngs=nnx.Rngs(config.seed)), config, dataset, run_dir, progress=False)


def _train_losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def test_round_trip_restores_into_an_abstract_model(tmp_path):
    model = LanguageModel(TINY, rngs=nnx.Rngs(3))
    _, params = nnx.split(model, nnx.Param)
    with Checkpointer(tmp_path, keep=2) as checkpointer:
        checkpointer.save(5, params, {"count": jnp.int32(5)}, seed=3)
        checkpointer.wait()
    abstract = nnx.eval_shape(lambda: LanguageModel(TINY, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    with Checkpointer(tmp_path, keep=2) as checkpointer:
        assert checkpointer.latest_step() == 5
        restored, opt_state, meta = checkpointer.restore(abstract_params, {"count": jnp.int32(0)})
    assert meta == {"step": 5, "seed": 3, "data_position": 5} and int(opt_state["count"]) == 5
    tokens = jnp.arange(24).reshape(2, 12) % 259
    rest = jax.tree.map(jnp.zeros_like, rest)  # no non-parameter arrays in this model; keeps merge concrete
    np.testing.assert_array_equal(nnx.merge(graphdef, restored, rest)(tokens).logits_BTV, model(tokens).logits_BTV)


def test_restore_params_reads_only_the_parameters(tmp_path):
    model = LanguageModel(TINY, rngs=nnx.Rngs(3))
    params = nnx.state(model, nnx.Param)
    with Checkpointer(tmp_path, keep=2) as checkpointer:
        checkpointer.save(5, params, {"mu": jax.tree.map(jnp.zeros_like, params)}, seed=3)
        checkpointer.wait()
    with Checkpointer(tmp_path, create=False) as checkpointer:
        restored, meta = checkpointer.restore_params(nnx.state(LanguageModel(TINY, rngs=nnx.Rngs(0)), nnx.Param))
        with pytest.raises(FileNotFoundError, match="no checkpoint of step 4 .* saved steps: 5"):
            checkpointer.restore_params(params, step=4)
    assert meta["step"] == 5
    jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_keeps_only_the_latest_checkpoints(tmp_path):
    params = {"w": jnp.ones((2, 2))}
    with Checkpointer(tmp_path, keep=2) as checkpointer:
        for step in range(1, 6):
            checkpointer.save(step, params, {}, seed=0)
        checkpointer.wait()
        assert checkpointer.all_steps() == [4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "5"]


def test_resumed_run_matches_an_uninterrupted_run_exactly(tmp_path, dataset):
    straight = _trainer(tmp_path / "straight", dataset)
    straight.run()
    straight.close()

    first_half = _trainer(tmp_path / "resumed", dataset)
    first_half.run(until=4)
    first_half.close()
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:  # a step logged after the checkpoint, then a crash
        f.write(json.dumps({"kind": "train", "step": 5, "loss": -1.0}) + "\n")
    resumed = _trainer(tmp_path / "resumed", dataset)
    assert resumed.restore_latest() == 4
    result = resumed.run()
    resumed.close()

    expected, got = _train_losses(tmp_path / "straight"), _train_losses(tmp_path / "resumed")
    assert sorted(got) == list(range(1, 9)) == sorted(expected)
    assert got == expected  # bit-identical losses at every step
    assert result.step == 8 and result.val_loss is not None


def test_fresh_run_refuses_a_directory_holding_a_run(tmp_path):
    config = {"model": TINY.to_dict(), "train": TRAINING.to_dict()}
    prepare_run_dir(tmp_path / "run", config, resume=False)
    saved = (tmp_path / "run" / "run.json").read_bytes()
    with pytest.raises(RunDirError, match="already holds a run.*--resume.*--run-dir"):
        prepare_run_dir(tmp_path / "run", config, resume=False)
    assert (tmp_path / "run" / "run.json").read_bytes() == saved
    with pytest.raises(RunDirError, match="holds no run"):
        prepare_run_dir(tmp_path / "elsewhere", config, resume=True)
    assert not (tmp_path / "elsewhere").exists()


def test_resume_with_a_different_config_names_every_differing_field(tmp_path):
    tokenizer = ByteTokenizer()
    data = {"name": "corpus", "fingerprint": "abc"}
    prepare_run_dir(tmp_path, run_config(TINY, TRAINING, data, tokenizer), resume=False)
    saved = (tmp_path / "run.json").read_bytes()
    assert prepare_run_dir(tmp_path, run_config(TINY, TRAINING, data, tokenizer), resume=True) == tmp_path
    requested = run_config(TINY.replace(plan="gqa,mqa"), TRAINING.replace(lr=0.5), {**data, "fingerprint": "xyz"},
                           tokenizer)
    with pytest.raises(ConfigMismatchError) as error:
        prepare_run_dir(tmp_path, requested, resume=True)
    message = str(error.value)
    assert "model.plan: saved 'gqa*2', requested 'gqa,mqa'" in message
    assert "train.lr: saved 0.01, requested 0.5" in message
    assert "data.fingerprint: saved 'abc', requested 'xyz'" in message
    assert "train.steps" not in message
    assert (tmp_path / "run.json").read_bytes() == saved and sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_resume_may_extend_the_steps_and_records_them(tmp_path):
    tokenizer, data = ByteTokenizer(), {"name": "corpus", "fingerprint": "abc"}
    pinned = TRAINING.replace(schedule_steps=TRAINING.steps)
    prepare_run_dir(tmp_path, run_config(TINY, pinned, data, tokenizer), resume=False)
    extended = pinned.replace(steps=12)
    prepare_run_dir(tmp_path, run_config(TINY, extended, data, tokenizer), resume=True)
    saved = json.loads((tmp_path / "run.json").read_text())["train"]
    assert saved["steps"] == 12 and saved["schedule_steps"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temporary file left behind
    with pytest.raises(ConfigMismatchError, match="train.steps: saved 12, requested 10 .*more steps, not fewer"):
        prepare_run_dir(tmp_path, run_config(TINY, pinned.replace(steps=10), data, tokenizer), resume=True)


def test_resume_by_other_code_is_recorded_and_said_not_refused(tmp_path):
    tokenizer, data = ByteTokenizer(), {"name": "corpus", "fingerprint": "abc"}
    first = run_config(TINY, TRAINING, data, tokenizer)
    assert first["code"]["source_hash"] and "commit" in first["code"]
    prepare_run_dir(tmp_path, first, resume=False)
    assert json.loads((tmp_path / "run.json").read_text())["code"] == first["code"]
    prepare_run_dir(tmp_path, run_config(TINY, TRAINING, data, tokenizer), resume=True)  # same code: silent
    assert "resumed_by" not in json.loads((tmp_path / "run.json").read_text())
    later = {**first, "code": {**first["code"], "commit": "f" * 40, "source_hash": "0" * 16}}
    with pytest.warns(UserWarning, match="continues with commit ffffffffff"):
        prepare_run_dir(tmp_path, later, resume=True)
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["code"] == first["code"] and saved["resumed_by"] == [later["code"]]


def test_an_extended_schedule_keeps_the_original_and_then_holds_the_floor():
    original = TrainConfig(steps=10, warmup_steps=2, lr=1e-2, min_lr_ratio=0.1)
    extended = original.replace(steps=15, schedule_steps=10)
    lrs = [learning_rate_schedule(extended)(i) for i in range(15)]
    assert lrs[:10] == [learning_rate_schedule(original)(i) for i in range(10)]  # bit-identical
    np.testing.assert_allclose(lrs[9:], 1e-3, rtol=1e-6)
    with pytest.raises(ValueError, match="schedule_steps=11 must be in \\[1, steps=10\\]"):
        original.replace(schedule_steps=11)
    with pytest.raises(ValueError, match="warmup_steps=2 must be in \\[0, schedule_steps=2\\)"):
        original.replace(schedule_steps=2)


def test_a_crash_mid_save_leaves_no_checkpoint_that_restore_would_use(tmp_path, monkeypatch):
    params = {"w": jnp.zeros((3,))}
    with Checkpointer(tmp_path, keep=3) as checkpointer:
        checkpointer.save(1, params, {}, seed=0)
        checkpointer.wait()

    async def crash_before_rename(self):
        raise OSError("simulated crash before the final rename")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash_before_rename)
    checkpointer = Checkpointer(tmp_path, keep=3)
    with pytest.raises(Exception):
        checkpointer.save(2, {"w": jnp.ones((3,))}, {}, seed=0)
        checkpointer.wait()
    monkeypatch.undo()
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert leftovers and leftovers[0].startswith("2.")  # the half-written step 2 exists only as a tmp dir

    with Checkpointer(tmp_path, keep=3) as reopened:
        assert reopened.all_steps() == [1]
        restored, _, meta = reopened.restore(params, {})
    assert meta["step"] == 1
    np.testing.assert_array_equal(restored["w"], np.zeros(3))
