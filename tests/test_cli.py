"""The command lines end to end on a tiny run: attnzoo-train's early checks, failure cleanup, run extension and
TensorBoard scalars, attnzoo-generate, attnzoo-eval and attnzoo-export."""

import contextlib
import io
import json
import re
import shutil
import signal
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tensorboard_events import jsonl_scalars, read_scalars

from attnzoo import LanguageModel, ModelConfig, generate
from attnzoo.data import TokenDataset, load_tokenizer, text_corpus
from attnzoo.interop import load_pretrained
from attnzoo.provenance import code_identity
from attnzoo.train import TrainConfig, eval_cli, export_cli, generate_cli, train
from attnzoo.train import cli as train_cli
from attnzoo.train import trainer as trainer_module
from attnzoo.train.runs import load_run

TINY_ARGS = ["--preset", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--sample-tokens", "0",
             "--no-progress", "--log-every", "1"]


def _run_cli(main, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a CLI `main`, whether it returns or exits."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_info:
            code = exit_info.code
    return code, out.getvalue(), err.getvalue()


def _write_corpus(directory, docs: int = 3, sentences: int = 60):
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "his", "red", "ball"]
    directory.mkdir()
    for i in range(docs):
        (directory / f"doc{i}.txt").write_text(". ".join(" ".join(rng.choice(words, 6)) for _ in range(sentences)))
    return directory


def _records(run_dir, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _all_records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _trajectory(run_dir) -> list[tuple[int, float, float]]:
    """(step, loss, lr) of every logged training step: what a bit-exact rerun reproduces (timings are not)."""
    return [(r["step"], r["loss"], r["lr"]) for r in _records(run_dir, "train")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 4-step run; ATTNZOO_CACHE points into the module's tmp dir for every test here.
    Returns (corpus dir, run dir)."""
    root = tmp_path_factory.mktemp("cli")
    corpus = _write_corpus(root / "corpus")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATTNZOO_CACHE", str(root / "cache"))
        code, _, err = _run_cli(train_cli.main, [*TINY_ARGS, "--data", str(corpus), "--run-dir", str(root / "run")])
        assert code == 0, err
        yield corpus, root / "run"


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ATTNZOO_CACHE", str(cache))
    return cache


# -- attnzoo-train: checks before anything is written -----------------------------------------------------------

@pytest.mark.parametrize("flags, option", [
    (["--plan", "gqa(window=0)*4"], "window"),
    (["--plan", "gqa(bogus=1)*4"], "bogus"),
    (["--plan", "gqa[mlp=moe]*4"], "mlp='moe' must be one of 'swiglu' or none"),
    (["--kernel", "flash_attention=fast"], "flash_attention: implementation='fast' is not one of 'auto', "),
    (["--kernel", "flash_attention"], "write OP=IMPL"),
])
def test_bad_model_flag_exits_2_before_tokenizing(tmp_path, fresh_cache, flags, option):
    corpus = _write_corpus(tmp_path / "corpus")
    code, _, err = _run_cli(train_cli.main, [*TINY_ARGS, *flags, "--data", str(corpus),
                                             "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert "attnzoo-train: error:" in err and option in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert not fresh_cache.exists() or not any(fresh_cache.iterdir())


@pytest.mark.parametrize("size, split, tokens", [(10, "train", 10), (300, "val", 16)])
def test_corpus_shorter_than_a_window_exits_2_naming_the_split(tmp_path, fresh_cache, size, split, tokens):
    """One file is split inside itself (its last 5% is val); each split ends with an <eos> token."""
    (tmp_path / "short.txt").write_text("x" * size)
    code, _, err = _run_cli(train_cli.main, [*TINY_ARGS, "--data", str(tmp_path / "short.txt"),
                                             "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert f"the '{split}' split has {tokens} tokens, fewer than seq_len + 1 = 17" in err
    assert not (tmp_path / "run").exists()


def test_a_missing_tracker_package_exits_2_before_tokenizing(tmp_path, fresh_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable, whether installed here or not
    code, _, err = _run_cli(train_cli.main, [*TINY_ARGS, "--wandb", "zoo", "--run-dir", str(tmp_path / "run")])
    assert code == 2 and "--wandb zoo: the wandb package is not installed; `pip install wandb`" in err
    assert not (tmp_path / "run").exists() and not fresh_cache.exists()


def test_seq_len_beyond_the_models_max_exits_2(tmp_path, fresh_cache):
    code, _, err = _run_cli(train_cli.main, [*TINY_ARGS, "--seq-len", "512", "--run-dir", str(tmp_path / "run")])
    assert code == 2 and "seq_len=512 exceeds the model's max_seq_len=256" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("existed", [False, True])
def test_a_failure_before_the_first_checkpoint_removes_what_the_run_wrote(tiny_run, tmp_path, monkeypatch, existed):
    corpus, _ = tiny_run
    run_dir = tmp_path / "run"
    if existed:
        run_dir.mkdir()

    def fail(self, until=None):
        raise RuntimeError("simulated failure during setup")

    monkeypatch.setattr(trainer_module.Trainer, "run", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        train_cli.main([*TINY_ARGS, "--data", str(corpus), "--run-dir", str(run_dir)])
    assert run_dir.exists() == existed
    assert not existed or not any(run_dir.iterdir())


@pytest.mark.parametrize("stop, code, says", [
    (lambda: trainer_module.TrainingInterrupted(signal.SIGTERM, step=2), 143, "continue with: attnzoo-train"),
    (lambda: trainer_module.TrainingInterrupted(signal.SIGINT, step=2), 130, "continue with: attnzoo-train"),
    (lambda: trainer_module.NonFiniteLossError(3, 3, None, Path("ckpt")), 3, "non-finite loss"),
])
def test_a_stopped_run_exits_with_the_signal_or_non_finite_code(tiny_run, tmp_path, monkeypatch, stop, code, says):
    """SIGTERM / Ctrl-C (the trainer checkpointed and raised) exit 128 + signum with the resume hint; a run of
    non-finite steps exits 3 with the trainer's message."""
    corpus, _ = tiny_run

    def stopped(self, until=None):
        self.save()
        self.checkpointer.wait()
        raise stop()

    monkeypatch.setattr(trainer_module.Trainer, "run", stopped)
    exit_code, out, err = _run_cli(train_cli.main, [*TINY_ARGS, "--data", str(corpus),
                                                    "--run-dir", str(tmp_path / "run")])
    assert exit_code == code
    assert says in out + err


def test_a_run_dir_without_a_checkpoint_resumes_from_step_0(tiny_run, tmp_path):
    """A run killed before its first checkpoint (run.json and tokenizer written) is not stuck."""
    corpus, finished = tiny_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(finished / "run.json", run_dir)
    code, out, err = _run_cli(train_cli.main, [*TINY_ARGS, "--data", str(corpus), "--run-dir", str(run_dir),
                                               "--resume"])
    assert code == 0, err
    assert "(resuming)" in out
    assert _trajectory(run_dir) == _trajectory(finished)
    assert load_tokenizer(run_dir / "tokenizer").identity == "byte"


# -- attnzoo-train: TensorBoard ----------------------------------------------------------------------------------

def test_a_run_writes_tensorboard_scalars_equal_to_metrics_jsonl(tiny_run):
    _, run_dir = tiny_run
    logged = read_scalars(run_dir / "tb")
    assert logged == jsonl_scalars(_all_records(run_dir))
    assert {(tag, 4) for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                                 "eval/val_loss", "eval/val_ppl")} <= set(logged)


# -- attnzoo-train --resume --steps: extending a run -----------------------------------------------------------

def test_resume_with_more_steps_extends_the_run_at_the_floor_lr(tiny_run, tmp_path):
    corpus, finished = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    code, out, err = _run_cli(train_cli.main, ["--data", str(corpus), "--run-dir", str(run_dir), "--resume",
                                               "--steps", "6", "--no-progress", "--sample-tokens", "0"])
    assert code == 0, err
    assert "(resuming)" in out
    saved = json.loads((run_dir / "run.json").read_text())
    assert saved["train"]["steps"] == 6 and saved["train"]["schedule_steps"] == 4
    extended = _trajectory(run_dir)
    assert [step for step, _, _ in extended] == [1, 2, 3, 4, 5, 6]
    assert extended[:4] == _trajectory(finished)  # the trained part is untouched
    training = TrainConfig.from_dict(saved["train"])
    floor = np.float32(training.lr * training.min_lr_ratio)
    assert [np.float32(lr) for _, _, lr in extended[4:]] == [floor, floor]
    assert read_scalars(run_dir / "tb") == jsonl_scalars(_all_records(run_dir))  # both sessions' event files

    # The same 6 steps from scratch, with the schedule of the original 4, match bit for bit.
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    dataset = TokenDataset.build(text_corpus([str(corpus)]), tokenizer, train_cli.cache_dir())
    model = LanguageModel(ModelConfig.from_dict(saved["model"]), rngs=nnx.Rngs(training.seed))
    train(model, training, dataset, tmp_path / "scratch", data=saved["data"], tokenizer=tokenizer, progress=False,
          sample_tokens=0)
    assert _trajectory(tmp_path / "scratch") == extended


def test_resume_refuses_fewer_steps_and_other_changes(tiny_run, tmp_path):
    corpus, finished = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = (run_dir / "run.json").read_text()
    code, _, err = _run_cli(train_cli.main, ["--data", str(corpus), "--run-dir", str(run_dir), "--resume",
                                             "--steps", "3"])
    assert code == 2 and "--steps 3: the run in" in err and "has 4 steps" in err and "not shorten" in err
    code, _, err = _run_cli(train_cli.main, ["--data", str(corpus), "--run-dir", str(run_dir), "--resume",
                                             "--steps", "6", "--lr", "0.01"])
    assert code == 2 and "train.lr: saved 0.003, requested 0.01" in err and "train.steps" not in err
    assert (run_dir / "run.json").read_text() == before


# -- attnzoo-generate -------------------------------------------------------------------------------------------

def test_generate_is_deterministic_by_seed_and_greedy_matches_the_library(tiny_run):
    _, run_dir = tiny_run
    args = ["--run-dir", str(run_dir), "--prompt", "the cat", "--max-new-tokens", "12"]
    first, second, other_seed = (_run_cli(generate_cli.main, [*args, "--seed", seed]) for seed in ("1", "1", "2"))
    assert first[0] == 0 and first[1] == second[1] and first[1] != other_seed[1]
    assert first[1].startswith("the cat") and "checkpoint step 4" in first[2]

    code, greedy, _ = _run_cli(generate_cli.main, [*args, "--temperature", "0"])
    run = load_run(run_dir)
    prompt = [int(t) for t in run.tokenizer.encode("the cat")]
    [tokens] = generate(run.model, [prompt], 12, temperature=0.0)
    assert code == 0 and greedy == "the cat" + run.tokenizer.decode(tokens) + "\n"


# -- attnzoo-eval -----------------------------------------------------------------------------------------------

def test_eval_reproduces_the_final_val_loss_and_skipping_layers_changes_it(tiny_run):
    _, run_dir = tiny_run
    code, out, err = _run_cli(eval_cli.main, ["--run-dir", str(run_dir), "--skip-layers", "1,3", "--json"])
    assert code == 0, err
    report = json.loads(out)
    full, skipped = report["results"]
    assert report["step"] == 4 and report["seq_len"] == 16 and full["skip_layers"] == []
    assert full["loss"] == pytest.approx(_records(run_dir, "eval")[-1]["val_loss"], rel=1e-6)
    assert skipped["skip_layers"] == [1, 3] and abs(skipped["loss"] - full["loss"]) > 1e-3
    assert skipped["perplexity"] == pytest.approx(np.exp(skipped["loss"]))

    code, table, _ = _run_cli(eval_cli.main, ["--run-dir", str(run_dir), "--data", str(run_dir.parent / "corpus"),
                                              "--max-batches", "0", "--seq-len", "32"])
    assert code == 0 and "perplexity" in table and "all" in table and "windows of 32" in table


def test_eval_diagnostics_average_the_models_per_layer_metrics(tiny_run):
    _, run_dir = tiny_run
    code, out, err = _run_cli(eval_cli.main, ["--run-dir", str(run_dir), "--diagnostics", "--json"])
    assert code == 0, err
    diagnostics = json.loads(out)["diagnostics"]
    run = load_run(run_dir)
    dataset = TokenDataset.from_cache(run.config["data"]["name"], run.config["data"]["fingerprint"], run.tokenizer,
                                      train_cli.cache_dir())
    batches = list(dataset.eval_batches("val", run.training.batch_size, run.training.seq_len,
                                        run.training.eval_batches))
    metrics = nnx.jit(lambda model, x_BT: model(x_BT, diagnostics=True).metrics)  # one compile for all batches
    per_batch = [metrics(run.model, x_BT) for x_BT, _ in batches]
    assert set(diagnostics) == set(per_batch[0]) and "layer3/sink_share" in diagnostics
    for name in diagnostics:
        assert diagnostics[name] == pytest.approx(np.mean([float(m[name]) for m in per_batch]), rel=1e-5), name
    code, table, _ = _run_cli(eval_cli.main, ["--run-dir", str(run_dir), "--diagnostics"])
    assert code == 0 and "sink_share" in table and "layer3" in table


def test_cli_bad_inputs_exit_2_with_a_clear_message(tiny_run, tmp_path):
    _, run_dir = tiny_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "unstarted").mkdir()
    shutil.copy(run_dir / "run.json", tmp_path / "unstarted")
    cases = [
        (eval_cli.main, ["--run-dir", str(tmp_path / "empty")], "holds no run (run.json not found)"),
        (generate_cli.main, ["--run-dir", str(tmp_path / "unstarted"), "--prompt", "a"], "holds no checkpoint yet"),
        (eval_cli.main, ["--run-dir", str(run_dir), "--skip-layers", "1,4"],
         "--skip-layers: layer 4 does not exist; the model has 4 layers, 0 to 3"),
        (eval_cli.main, ["--run-dir", str(run_dir), "--skip-layers", "x"], "'x' is not a layer index"),
        (eval_cli.main, ["--run-dir", str(run_dir), "--seq-len", "257"],
         "--seq-len 257 must be between 1 and the model's max_seq_len=256"),
        (eval_cli.main, ["--run-dir", str(run_dir), "--step", "3"], "no checkpoint of step 3 in"),
        (generate_cli.main, ["--run-dir", str(run_dir), "--prompt", "a", "--max-new-tokens", "300"],
         "exceeds the model's max_seq_len=256"),
    ]
    for main, argv, message in cases:
        code, _, err = _run_cli(main, argv)
        assert code == 2, (argv, err)
        assert message in err, (argv, err)
        assert "Traceback" not in err


def test_attnzoo_train_trains_a_zoo_hybrid(tiny_run, tmp_path):
    corpus, _ = tiny_run
    run_dir = tmp_path / "zoo"
    code, out, err = _run_cli(train_cli.main, [*TINY_ARGS, "--plan", "mla,ccgqa,moh,gated", "--data", str(corpus),
                                               "--run-dir", str(run_dir), "--no-tb"])
    assert code == 0, err
    assert "plan mla,ccgqa,moh,gated" in out
    assert not (run_dir / "tb").exists()  # --no-tb
    losses = [record["loss"] for record in _records(run_dir, "train")]
    assert len(losses) == 4 and np.isfinite(losses).all()
    assert np.isfinite(_records(run_dir, "eval")[-1]["val_loss"])


# -- attnzoo-export ---------------------------------------------------------------------------------------------

def _card_tables(card: str) -> dict[str, dict[str, str]]:
    """{section heading: {row name: value}} of the model card's two-column tables."""
    tables, current = {}, None
    for line in card.splitlines():
        if heading := re.fullmatch(r"#{2,3} (.+)", line):
            current = tables.setdefault(heading[1], {})
        elif current is not None and (row := re.fullmatch(r"\| (.+?) \| (.*) \|", line)):
            current[row[1]] = row[2]
    return tables


def test_export_writes_a_loadable_directory_whose_model_card_describes_the_run(tiny_run, tmp_path):
    _, run_dir = tiny_run
    out_dir = tmp_path / "hf"
    code, out, err = _run_cli(export_cli.main, [str(run_dir), str(out_dir)])
    assert code == 0, err
    assert "LlamaForCausalLM (llama)" in out and "step 4" in out

    run = load_run(run_dir)
    saved, summary = run.config, run.model.summary(run.training.seq_len)
    last_eval = _records(run_dir, "eval")[-1]
    card = (out_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "\n- attnzoo\n- jax\n" in card
    tables, config = _card_tables(card), run.model.config
    assert tables["Architecture"] == {
        "plan": f"`{config.plan}`", "layers": "4", "d_model": str(config.d_model), "heads": str(config.n_heads),
        "kv heads": str(config.n_kv_heads or config.n_heads), "vocab": "259", "max_seq_len": "256",
        "parameters": f"{summary.total_params:,}", "KV-cache bytes / token": f"{summary.kv_cache_bytes_per_token:,}"}
    assert tables["Data"]["corpus"] == saved["data"]["name"]
    assert tables["Data"]["fingerprint"] == saved["data"]["fingerprint"]
    training = tables["Training"]
    assert (training["steps"], training["batch size"], training["seq_len"], training["peak lr"]) == (
        "4 of 4", "2", "16", "0.003")
    assert tables["Results"] == {"val loss (nats/token)": f"{last_eval['val_loss']:.4f}",
                                 "perplexity": f"{last_eval['val_ppl']:.2f}", "evaluated at step": "4"}
    unknown = "unknown (no git checkout)"
    assert tables["Trained by"]["commit"] == (saved["code"]["commit"] or unknown)
    assert tables["Trained by"]["dirty"].startswith({True: "yes", False: "no", None: "unknown"}[saved["code"]["dirty"]])
    assert tables["Trained by"]["source hash"] == saved["code"]["source_hash"]
    assert tables["Exported by"]["commit"] == (code_identity()["commit"] or unknown)
    assert "load_pretrained(" in card

    model, tokenizer = load_pretrained(out_dir, kernels={"flash_attention": "xla", "decode_attention": "xla"})
    assert tokenizer.identity == run.tokenizer.identity
    tokens = jnp.asarray([[int(t) for t in run.tokenizer.encode("the cat sat on")]])
    np.testing.assert_allclose(model(tokens).logits_BTV, run.model(tokens).logits_BTV, rtol=1e-5, atol=1e-5)
    assert json.loads((out_dir / "attnzoo_reference.json").read_text())["new_tokens"] == 12

    code, _, err = _run_cli(export_cli.main, [str(run_dir), str(tmp_path / "other"), "--step", "3"])
    assert code == 2 and "attnzoo-export: error: " in err and "no checkpoint of step 3" in err
    assert not (tmp_path / "other").exists()
