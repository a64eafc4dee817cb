"""experiments/compare (plans compared on one budget, runs cached by settings), compare_zoo (the families), MQAR
recall across mixers and widths, and the gated-sink probes: smoke runs in process, and the pieces they rest on."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # experiments/ is not installed

from attnzoo import LanguageModel, ModelConfig  # noqa: E402
from experiments import mqar_recall  # noqa: E402
from experiments.compare import run as compare_run  # noqa: E402
from experiments.compare.config import SCALES  # noqa: E402
from experiments.compare.reports import pareto_front  # noqa: E402
from attnzoo.provenance import code_identity, describe  # noqa: E402
from experiments import study  # noqa: E402
from experiments.study import Variant  # noqa: E402


@pytest.fixture
def fast_compile():
    """Smoke runs check the pipeline, not the numbers: compile without XLA's optimisations (less CPU time)."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(256, 4.5), (0, 5.0), (512, 3.0), (128, 4.0), (128, 4.2), (1024, 3.0)]
    assert pareto_front(points) == [1, 3, 2]


def test_run_directories_are_keyed_by_every_setting():
    def names(plans, scale=SCALES["smoke"]):
        study = compare_run.keyed_study("t", [Variant(compare_run.plan_slug(p), p) for p in plans], "smoke", scale)
        return [variant.name for variant in study.variants]

    [gqa] = names(["gqa*2"])
    assert gqa.startswith("gqax2-") and names(["gqa,gqa"]) == [gqa]  # the resolved plan, not its spelling
    assert names(["gqa*2", "mqa*2"])[0] == gqa  # other plans beside it change nothing
    longer = compare_run.with_overrides(SCALES["smoke"], training={"steps": 5})
    wider = compare_run.with_overrides(SCALES["smoke"], model={"d_model": 64})
    assert len({gqa, *names(["gqa*2"], longer), *names(["gqa*2"], wider)}) == 3
    assert compare_run.plan_slug("mamba2[mlp=none]*3,gqa") == "mamba2-mlp-none-x3-gqa"


def test_compare_writes_results_and_reuses_cached_runs(tmp_path, fast_compile):
    first = compare_run.compare(["mqa*1"], "smoke", tmp_path, progress=False, echo=lambda _: None)
    [row] = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert row["plan"] == "mqa" and int(row["kv_cache_bytes_per_token"]) == 2 * 8 * 4  # k and v, 1 head of 8, fp32
    assert math.isfinite(float(row["val_loss_mean"])) and float(row["tokens_per_s_mean"]) > 0
    for name in ("frontier.png", "loss_curves.png"):
        assert (tmp_path / name).stat().st_size > 0 and f"![{name}]({name})" in first.files["results.md"].read_text()
    lines = []  # a later comparison (results elsewhere, same run cache) of this plan and settings trains nothing
    again = compare_run.compare(["mqa*1"], "smoke", tmp_path / "other", cache=tmp_path, progress=False,
                                echo=lines.append)
    assert len(lines) == 1 and "reused" in lines[0]
    assert again.rows == first.rows and (tmp_path / "other" / "results.csv").exists()
    assert (tmp_path / "other" / "runs").resolve() == (tmp_path / "runs").resolve()


def test_a_cached_run_made_by_other_code_is_never_reused_silently(tmp_path, fast_compile, monkeypatch):
    first = compare_run.compare(["mqa*1"], "smoke", tmp_path, progress=False, echo=lambda _: None)
    [record] = first.records
    assert record["code"] == code_identity()  # the run records the code that made it
    [row] = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert row["commit"] == study.run_commits([record]) and describe(record["code"]) in first.table + \
        first.files["results.md"].read_text()
    [run_dir] = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["code"] == record["code"]

    other_code = {**record["code"], "commit": "0" * 40, "source_hash": "feedfacefeedface"}
    monkeypatch.setattr(study, "code_identity", lambda: other_code)
    with pytest.raises(study.StudyConfigError, match=f"{run_dir.name}: made by commit {record['code']['commit'][:10]}"):
        compare_run.compare(["mqa*1"], "smoke", tmp_path, progress=False, echo=lambda _: None)

    lines = []
    reused = compare_run.compare(["mqa*1"], "smoke", tmp_path, progress=False, stale="reuse", echo=lines.append)
    assert reused.records[0]["stale"] and "STALE" in lines[0] and "[stale]" in reused.files["results.md"].read_text()
    assert reused.records[0]["metrics"] == record["metrics"]

    retrained = compare_run.compare(["mqa*1"], "smoke", tmp_path, progress=False, stale="retrain",
                                    echo=lambda _: None)
    assert retrained.records[0]["code"] == other_code and "stale" not in retrained.records[0]
    [moved] = (tmp_path / study.STALE_RUNS_DIR).iterdir()  # the old run is kept aside, not deleted
    assert moved.name.startswith(run_dir.name) and json.loads((moved / "result.json").read_text()) == record


def test_frontier_plot_joins_the_pareto_optimal_plans():
    from experiments.compare.reports import plot_frontier

    rows = [{"variant": f"v{i}", "label": f"v{i}", "kv_cache_bytes_per_token": kv, "params": 1000 + i,
             "val_loss_mean": loss, "val_loss_std": 0.01} for i, (kv, loss) in enumerate([(0, 3.0), (256, 2.5),
                                                                                         (512, 2.7), (1024, 2.4)])]
    fig = plot_frontier(rows, "caption", groups={"v0": "recurrent", "v1": "attention"})
    kv_ax = fig.axes[0]
    [front] = [line for line in kv_ax.lines if line.get_label() == "Pareto frontier"]
    assert list(front.get_xdata()) == [0, 256, 1024]
    assert {text.get_text() for text in kv_ax.get_legend().get_texts()} == {"Pareto frontier", "recurrent",
                                                                              "attention", "other"}


def test_command_line_errors_name_the_problem_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    for argv, expected in ((["--plans", "gqa(windw=3)*2"], "windw"), (["--train", "stepz=3"], "no field stepz"),
                           (["--model", "d_model"], "not KEY=VALUE"),
                           (["--train", "steps=abc"], "steps='abc' must be an integer"),
                           (["--plans", "gqa*4", "--model", "n_layers=6"], "n_layers=6: a comparison takes each "
                                                                             "plan's own layer count ('gqa*4' has 4)")):
        with pytest.raises(SystemExit) as exit_info:
            compare_run.main(["--scale", "smoke", "--out", str(out), *argv])
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err
    assert not out.exists()


def test_an_unfinished_run_with_other_settings_fails_before_tokenizing(tmp_path, monkeypatch):
    study_ = compare_run.keyed_study("t", [Variant("gqa", "gqa*1")], "smoke", SCALES["smoke"], out=tmp_path)
    run_dir = tmp_path / study.RUNS_DIR / f"{study_.variants[0].name}-s0"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"model": {"plan": "mqa"}, "train": {}, "data": {}}))

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized before the settings were checked")

    monkeypatch.setattr(study.TokenDataset, "build", no_tokenizing)
    with pytest.raises(study.RunDirError, match="model.plan: saved 'mqa', requested 'gqa'"):
        study.run_study(study_, "smoke", tmp_path, progress=False, echo=lambda _: None)


def test_zoo_lists_every_family_and_every_registered_mixer():
    from attnzoo import registered
    from experiments.compare_zoo import config as zoo

    zoo.STUDY.check(vocab_size=259)  # every variant builds at every scale
    families = set(zoo.FAMILY_OF.values())
    assert {"attention", "recurrent", "linear_attention", "hybrid"} <= families
    in_zoo = set().union(*(zoo.mixers_of(v.plan) for v in zoo.STUDY.variants))
    assert {"mha", "gqa", "mqa", "mla", "cca", "ccgqa", "mamba", "mamba2", "based"} <= in_zoo
    assert "toy_side_inputs" not in in_zoo and "toy_side_inputs" in registered()  # test-only mixers stay out
    notes = []
    fake = {"new": (Variant("nope", "not_a_mixer*4"), Variant("gqa", "gqa*4"))}
    variants, family_of = zoo.zoo_variants(fake, echo=notes.append)
    assert family_of["gqa"] == "new" and "nope" not in family_of and "not_a_mixer" in notes[0]
    assert family_of["mla"] == zoo.UNLISTED  # registered, not named by a family: added, not dropped


def test_mqar_sweep_smoke_caches_cells(tmp_path, capsys, fast_compile):
    argv = ["--smoke", "--mixers", "based", "--layers", "1", "--out", str(tmp_path)]
    rows = mqar_recall.main(argv)
    assert [(row["mixer"], row["plan"], row["seq_len"]) for row in rows] == [("based", "based[mlp=none]*1", 16)]
    assert all(0 <= row["accuracy"] <= 1 and math.isfinite(row["val_loss"]) for row in rows)
    assert (tmp_path / "mqar_recall.png").stat().st_size > 0
    assert all(row["code"] == code_identity() for row in rows)
    capsys.readouterr()
    assert mqar_recall.main(argv) == rows
    assert capsys.readouterr().out.count("reused") == len(rows)
    with pytest.MonkeyPatch.context() as patch:  # cells cached by other code are not reused silently
        patch.setattr(mqar_recall, "code_identity", lambda: {**rows[0]["code"], "source_hash": "other"})
        with pytest.raises(SystemExit):
            mqar_recall.main(argv)
        assert "made by other code" in capsys.readouterr().err


def test_mqar_bad_plan_fails_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mqar_recall.main(["--smoke", "--plans", "gqa(windw=4)*2", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "gqa(windw=4)*2 at seq_len 16, width 16" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_mqar_table_takes_the_best_learning_rate_and_spreads_over_seeds():
    sweep = mqar_recall.Sweep(plans=(("a", "gqa*1"),), seq_lens=(64,), widths=(32, 64), lrs=(1e-3, 3e-3),
                              seeds=(0, 1))
    rows = [dict(mixer="a", seq_len=64, d_model=32, lr=lr, seed=seed, accuracy=acc)
            for lr, seed, acc in ((1e-3, 0, 0.2), (1e-3, 1, 0.4), (3e-3, 0, 0.5), (3e-3, 1, 0.9))]
    best = mqar_recall.best_accuracy(rows)
    assert best[("a", 64, 32)] == pytest.approx((0.7, math.sqrt(0.08)))
    table = mqar_recall.accuracy_table(rows, sweep)
    assert "| T=64 (4 pairs), d=32 | T=64 (4 pairs), d=64 |" in table
    assert "| a | 0.700 ± 0.283 | – |" in table


@pytest.fixture(scope="module")
def gated_model():
    config = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                         plan="gqa,gated")
    return LanguageModel(config, rngs=nnx.Rngs(3))


def test_probes_match_the_model_and_its_diagnostics(gated_model):
    from experiments.gated_sink import probes

    tokens_BT = np.random.default_rng(0).integers(0, 259, (2, 12))
    out = gated_model(jnp.asarray(tokens_BT), diagnostics=True)
    final = probes.hidden_states(gated_model, tokens_BT)[-1]
    np.testing.assert_allclose(gated_model._logits(gated_model.final_norm(final)), out.logits_BTV, atol=1e-5)
    maxima = np.asarray(probes.max_activation_per_layer(gated_model, jnp.asarray(tokens_BT)))
    states = probes.hidden_states(gated_model, tokens_BT)
    np.testing.assert_allclose(maxima, [float(jnp.max(jnp.abs(h))) for h in states[1:]], rtol=1e-6)
    for layer in (0, 1):
        p_BHTS = probes.attention_probabilities(gated_model, layer, tokens_BT)
        np.testing.assert_allclose(p_BHTS.sum(-1), 1.0, atol=1e-5)
        assert np.all(np.triu(p_BHTS, k=1) == 0)  # causal
        # the first column's mean is the diagnostics' sink share, computed there from the kernel's LSE
        assert p_BHTS[..., 0].mean() == pytest.approx(float(out.metrics[f"layer{layer}/sink_share"]), rel=1e-4)


def test_sink_evaluation_reports_per_layer_values(gated_model, dataset):
    from attnzoo.train import TrainConfig
    from experiments.gated_sink.run import evaluate_run, paper_table

    training = TrainConfig(steps=1, batch_size=2, seq_len=16, warmup_steps=0, eval_batches=2)
    metrics = evaluate_run(gated_model, dataset, training)
    assert metrics["first_token_share"] == pytest.approx(
        (metrics["first_token_share_l0"] + metrics["first_token_share_l1"]) / 2)
    assert 0 < metrics["first_token_share_l0"] < 1 and metrics["gate_mean"] == pytest.approx(0.5, abs=0.1)
    assert metrics["max_activation"] == pytest.approx((metrics["max_activation_l0"] + metrics["max_activation_l1"]) / 2)
    row = {"variant": "g1-elementwise", "label": "G1", **{f"{k}_mean": v for k, v in metrics.items()},
           **{f"{k}_std": None for k in metrics}, "val_loss_mean": 3.0, "val_loss_std": None}
    assert "| G1 | 3.0000 | " in paper_table([row], "c") and "| 0.048 |" in paper_table([row], "c")


@pytest.mark.slow
def test_gated_sink_and_zoo_smoke_end_to_end(tmp_path):
    from experiments.compare_zoo.run import run as run_zoo
    from experiments.gated_sink.run import run as run_sink

    sink = run_sink("smoke", tmp_path / "sink", progress=False, echo=lambda _: None)
    assert {row["variant"] for row in sink.rows} >= {"baseline", "g1-elementwise"}
    assert (tmp_path / "sink" / "paper_table.md").read_text().count("\n| ") == len(sink.rows) + 1
    zoo = run_zoo("smoke", tmp_path / "zoo", cache=None, families=["hybrid"], progress=False, echo=lambda _: None)
    assert len(zoo.rows) == 2 and "## hybrid" in (tmp_path / "zoo" / "zoo_by_family.md").read_text()
    assert json.loads(next((tmp_path / "zoo").glob("runs/*/result.json")).read_text())["study"] == "compare_zoo"
