"""Optimizer schedule and masking, the train/eval steps, and an end-to-end `attnzoo-train` run."""

import contextlib
import hashlib
import io
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import LanguageModel, ModelConfig
from attnzoo.data import IGNORE_INDEX
from attnzoo.train import TrainConfig, learning_rate_schedule, make_eval_step, make_optimizer, make_train_step
from attnzoo.train import evaluate, weight_decay_mask
from attnzoo.train.cli import main
from attnzoo.train.trainer import cross_entropy_sum

TINY = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(steps=101, warmup_steps=10, lr=1e-2, min_lr_ratio=0.1)
    schedule = learning_rate_schedule(cfg)
    lrs = np.array([float(schedule(i)) for i in range(cfg.steps)])
    np.testing.assert_allclose(lrs[:10], 1e-2 * np.arange(1, 11) / 10, rtol=1e-6)
    np.testing.assert_allclose(lrs[10], 1e-2, rtol=1e-6)
    np.testing.assert_allclose(lrs[55], 1e-3 + 0.5 * 9e-3, rtol=1e-5)  # half way through the cosine
    np.testing.assert_allclose(lrs[-1], 1e-3, rtol=1e-5)
    assert np.all(np.diff(lrs[10:]) <= 0)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="parallelism"):
        TrainConfig(parallelism="tp")


def test_weight_decay_skips_norms_and_one_dimensional_params():
    _, params = nnx.split(LanguageModel(TINY, rngs=nnx.Rngs(0)), nnx.Param)
    mask = {jax.tree_util.keystr(path): decays
            for path, decays in jax.tree_util.tree_leaves_with_path(weight_decay_mask(params))}
    assert mask["['embed']['embedding'].value"]
    assert not mask["['final_norm']['scale'].value"]
    for path, decays in mask.items():
        assert decays == ("norm" not in path and "bias" not in path), path
    # With zero gradients, AdamW only shrinks the decayed parameters.
    cfg = TrainConfig(steps=10, warmup_steps=0, lr=0.1, weight_decay=0.5)
    optimizer = make_optimizer(cfg)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    for (path, update), decays in zip(jax.tree_util.tree_leaves_with_path(updates), mask.values()):
        assert bool(jnp.any(update != 0)) == decays, jax.tree_util.keystr(path)


def test_cross_entropy_ignores_masked_targets():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    targets = jnp.array([[1, IGNORE_INDEX, 4], [0, 2, IGNORE_INDEX]])
    total, count = cross_entropy_sum(logits, targets)
    log_probs = jax.nn.log_softmax(logits)
    expected = -(log_probs[0, 0, 1] + log_probs[0, 2, 4] + log_probs[1, 0, 0] + log_probs[1, 1, 2])
    assert int(count) == 4
    np.testing.assert_allclose(total, expected, rtol=1e-6)


def test_train_step_reports_metrics_and_fits_a_fixed_batch():
    cfg = TrainConfig(steps=30, warmup_steps=2, lr=1e-2)
    graphdef, params, rest = nnx.split(LanguageModel(TINY, rngs=nnx.Rngs(0)), nnx.Param, ...)
    optimizer = make_optimizer(cfg)
    train_step = make_train_step(graphdef, rest, optimizer)
    opt_state = optimizer.init(params)
    x = jax.random.randint(jax.random.key(1), (4, 16), 0, 259)
    y = jnp.roll(x, -1, axis=1)
    losses = []
    for step in range(cfg.steps):
        params, opt_state, metrics = train_step(params, opt_state, x, y)
        losses.append(float(metrics["loss"]))
        if step == 0:
            assert {"loss", "ce", "aux_loss", "grad_norm", "lr"} <= set(metrics)
            np.testing.assert_allclose(metrics["lr"], learning_rate_schedule(cfg)(0), rtol=1e-6)
            np.testing.assert_allclose(metrics["loss"], metrics["ce"] + metrics["aux_loss"], rtol=1e-6)
    assert losses[-1] < 0.5 * losses[0]


def test_evaluate_weights_tokens_and_pads_a_short_last_batch():
    graphdef, params, rest = nnx.split(LanguageModel(TINY, rngs=nnx.Rngs(0)), nnx.Param, ...)
    eval_step = make_eval_step(graphdef, rest)
    x = np.asarray(jax.random.randint(jax.random.key(2), (5, 8), 0, 259), np.int32)
    y = np.roll(x, -1, axis=1)
    result = evaluate(eval_step, params, [(x[:4], y[:4]), (x[4:], y[4:])], batch_size=4)
    total, count = eval_step(params, jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(result["val_loss"], float(total) / int(count), rtol=1e-5)
    np.testing.assert_allclose(result["val_ppl"], np.exp(result["val_loss"]), rtol=1e-6)


# -- end to end: the CLI on a small text corpus -------------------------------------------------------------

CLI_ARGS = ["--preset", "tiny", "--steps", "40", "--batch-size", "8", "--seq-len", "32", "--warmup", "4",
            "--eval-every", "20", "--ckpt-every", "20", "--sample-tokens", "16", "--prompt", "the ", "--no-progress"]


def _file_digests(directory: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 40-step CLI run on a generated corpus; returns (corpus dir, run dir, stdout)."""
    root = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "his", "red", "ball"]
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(". ".join(" ".join(rng.choice(words, 6)) for _ in range(400)))
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATTNZOO_CACHE", str(root / "cache"))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main([*CLI_ARGS, "--data", str(corpus), "--run-dir", str(run_dir)]) == 0
    return corpus, run_dir, out.getvalue()


def test_cli_run_writes_metrics_plot_and_sample_and_learns(finished_run):
    _, run_dir, stdout = finished_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    assert train[-1]["step"] == 40 and train[-1]["tokens"] == 40 * 8 * 32
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "sample.txt").read_text().startswith("the ")
    assert json.loads((run_dir / "run.json").read_text())["train"]["steps"] == 40
    for expected in ("unigram entropy", "fingerprint", "final val loss", "perplexity", "tokens/s", "sample:",
                     "metrics.jsonl", "loss.png", "total parameters"):
        assert expected in stdout


def test_cli_refuses_to_overwrite_an_existing_run(finished_run, monkeypatch, capsys):
    corpus, run_dir, _ = finished_run
    monkeypatch.setenv("ATTNZOO_CACHE", str(run_dir.parent / "cache"))
    before = _file_digests(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        main([*CLI_ARGS, "--data", str(corpus), "--run-dir", str(run_dir)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "already holds a run" in message and "--resume" in message and "--run-dir" in message
    assert _file_digests(run_dir) == before


def test_cli_resume_with_different_settings_names_each_field(finished_run, monkeypatch, capsys):
    corpus, run_dir, _ = finished_run
    monkeypatch.setenv("ATTNZOO_CACHE", str(run_dir.parent / "cache"))
    before = _file_digests(run_dir)
    changed = [a if a != "40" else "50" for a in CLI_ARGS]  # --steps 40 -> 50: extending a run is allowed
    with pytest.raises(SystemExit):
        main([*changed, "--lr", "0.01", "--plan", "gqa*3,mqa", "--data", str(corpus), "--run-dir", str(run_dir),
              "--resume"])
    message = capsys.readouterr().err
    assert "train.steps" not in message
    assert "train.lr: saved 0.003, requested 0.01" in message
    assert "model.plan: saved 'gqa*4', requested 'gqa*3,mqa'" in message
    assert _file_digests(run_dir) == before


def test_cli_resume_of_a_finished_run_reports_it_again(finished_run, monkeypatch, capsys):
    corpus, run_dir, _ = finished_run
    monkeypatch.setenv("ATTNZOO_CACHE", str(run_dir.parent / "cache"))
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert main([*CLI_ARGS, "--data", str(corpus), "--run-dir", str(run_dir), "--resume"]) == 0
    assert "(resuming)" in capsys.readouterr().out
    assert (run_dir / "metrics.jsonl").read_text() == metrics


@pytest.mark.parametrize("flags, field", [
    (["--plan", "gqa*2"], "plan: 'gqa\\*2' has 2 layers but n_layers=4"),
    (["--plan", "nosuch*4"], "mixer 'nosuch' is not registered; registered mixers: .*gqa"),
    (["--preset", "huge"], "preset='huge' is not one of tiny, small, gpt2-small"),
    (["--data", "/nonexistent/*.txt"], "data"),
])
def test_cli_bad_input_names_the_field_and_writes_nothing(tmp_path, monkeypatch, capsys, flags, field):
    monkeypatch.setenv("ATTNZOO_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main([*CLI_ARGS, *flags, "--run-dir", str(run_dir)])
    assert exit_info.value.code == 2
    assert re.search(field, capsys.readouterr().err)
    assert not run_dir.exists()


def test_trains_on_a_synthetic_task_scoring_only_labelled_positions(tmp_path):
    """MQAR examples (labels -100 except at the queries) through ArrayDataset and the Trainer: the loss is the
    cross-entropy of the recalled values alone, so it starts near ln(V/2) and falls."""
    from attnzoo.data import ArrayDataset, mqar
    from attnzoo.train.trainer import Trainer

    vocab, seq = 64, 32
    splits = {split: mqar(n, seq, num_kv_pairs=4, vocab_size=vocab, seed=seed)
              for split, n, seed in (("train", 512, 0), ("val", 64, 1))}
    cfg = TrainConfig(steps=60, batch_size=32, seq_len=seq, lr=3e-3, warmup_steps=5, eval_every=60,
                      ckpt_every=60, log_every=10)
    model = LanguageModel(TINY.replace(vocab_size=vocab, kernels={"flash_attention": "xla"}), rngs=nnx.Rngs(0))
    trainer = Trainer(model, cfg, ArrayDataset(splits, vocab), tmp_path, progress=False)
    result = trainer.run()
    trainer.close()
    train = [r for r in trainer.log.records() if r["kind"] == "train"]
    assert train[0]["ce"] == pytest.approx(np.log(vocab / 2), abs=0.6)  # values are uniform over V/2 ids
    assert train[-1]["ce"] < train[0]["ce"] - 0.3
    assert result.val_loss is not None and np.isfinite(result.val_loss)
