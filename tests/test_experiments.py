"""experiments/: the study convention's worked example (compare_attention) at its smoke scale, run from the repo
root as a user runs it; a second invocation reuses the finished runs; a bad plan fails before anything is written;
results aggregate over seeds into results.csv, results.md and the study's reports."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # experiments/ is not installed

from experiments.compare_attention.config import STUDY  # noqa: E402
from experiments.study import (MODEL_FACTS, StudyConfigError, Variant, aggregate, main,  # noqa: E402
                              markdown_table, run_study, write_results)

METRICS = ("val_loss", "val_ppl", "tokens_per_s")


def _run_from_repo_root(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _finished_files(out: Path) -> dict[Path, int]:
    """Modification times of what training writes: unchanged when runs are reused."""
    return {path: path.stat().st_mtime_ns for path in out.glob("runs/*/metrics.jsonl")}


@pytest.mark.slow  # the runner's train-then-reuse path runs by default through tests/test_compare.py
def test_compare_attention_smoke_writes_results_and_reuses_finished_runs(tmp_path):
    out = tmp_path / "study"
    first = _run_from_repo_root("experiments/compare_attention/run.py", "--scale", "smoke", "--out", str(out),
                                "--no-progress")
    names = [variant.name for variant in STUDY.variants]
    assert f"run {len(names)}/{len(names)}" in first.stdout

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["variant"] for row in rows] == names
    for row in rows:
        record = json.loads((out / "runs" / f"{row['variant']}-s0" / "result.json").read_text())
        assert record["step"] == STUDY.scales["smoke"].training.steps
        for fact in MODEL_FACTS:
            assert int(row[fact]) == record["model"][fact] > 0
        for metric in METRICS:
            assert math.isfinite(float(row[f"{metric}_mean"]))
            assert float(row[f"{metric}_mean"]) == pytest.approx(record["metrics"][metric])
            assert row[f"{metric}_std"] == ""  # one seed: no spread
    kv_bytes = {row["variant"]: int(row["kv_cache_bytes_per_token"]) for row in rows}
    assert kv_bytes["mha"] > kv_bytes["gqa"] > kv_bytes["mqa"]
    report = (out / "results.md").read_text()
    assert all(variant.label in report for variant in STUDY.variants)
    assert "![compare_attention.png](compare_attention.png)" in report
    assert (out / "compare_attention.png").stat().st_size > 0

    trained = _finished_files(out)
    assert len(trained) == len(names)
    results_csv = (out / "results.csv").read_text()
    second = _run_from_repo_root("-m", "experiments.compare_attention.run", "--scale", "smoke", "--out", str(out),
                                 "--no-progress")
    assert second.stdout.count("reused") == len(names), second.stdout
    assert _finished_files(out) == trained  # nothing retrained
    assert (out / "results.csv").read_text() == results_csv


def test_bad_plan_fails_before_anything_is_written(tmp_path, capsys):
    study = dataclasses.replace(STUDY, variants=STUDY.variants + (Variant("typo", "gqa(windw=32)*4"),))
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as exit_info:
        main(study, ["--scale", "smoke", "--out", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "variant typo" in error and "layer 0" in error and "windw" in error
    assert not out.exists()


def test_bad_plan_in_a_scale_not_run_fails_too(tmp_path):
    shape = dict(STUDY.scales["cpu"].model, n_layers=3)  # the plans have four layers
    study = dataclasses.replace(STUDY, scales={**STUDY.scales, "cpu": dataclasses.replace(STUDY.scales["cpu"],
                                                                                          model=shape)})
    with pytest.raises(StudyConfigError, match="scale cpu, variant mha: plan: 'mha\\*4' has 4 layers"):
        run_study(study, "smoke", tmp_path / "study")
    assert not (tmp_path / "study").exists()


def test_variant_names_must_be_path_safe():
    with pytest.raises(StudyConfigError, match="variant name 'gqa/2'"):
        Variant("gqa/2", "gqa*4")


def test_aggregate_over_seeds_gives_mean_and_sample_std(tmp_path):
    def record(variant: str, seed: int, val_loss: float, tokens_per_s: float | None) -> dict:
        return {"variant": variant, "label": variant.upper(), "plan": f"{variant}*4", "seed": seed,
                "model": {"params": 100, "kv_cache_bytes_per_token": 64, "flops_per_token": 1000},
                "metrics": {"val_loss": val_loss, "tokens_per_s": tokens_per_s}}

    rows = aggregate([record("mha", 0, 2.0, 10.0), record("mha", 1, 3.0, None), record("mqa", 0, 4.0, 5.0)])
    assert [row["variant"] for row in rows] == ["mha", "mqa"]
    assert rows[0]["seeds"] == "0 1"
    assert rows[0]["val_loss_mean"] == 2.5 and rows[0]["val_loss_std"] == pytest.approx(math.sqrt(0.5))
    assert rows[0]["tokens_per_s_mean"] == 10.0 and rows[0]["tokens_per_s_std"] is None  # one value
    assert rows[1]["val_loss_std"] is None
    table = markdown_table(rows)
    assert "| MHA | `mha*4` | 100 | 64 | 1,000 | 2.5000 ± 0.7071 | 10 | 0 1 |" in table
    assert "| MQA | `mqa*4` | 100 | 64 | 1,000 | 4.0000 | 5 | 0 |" in table

    def variant_count(rows, caption):  # a text report, as a paper-style table would be
        return f"{caption}: {len(rows)} variants\n"

    results = write_results(rows, [], tmp_path, "a caption", {"count.md": variant_count})
    assert (tmp_path / "count.md").read_text() == "a caption: 2 variants\n"
    assert "[count.md](count.md)" in (tmp_path / "results.md").read_text() and results.figures == {}
    assert list(csv.DictReader((tmp_path / "results.csv").open()))[0]["val_loss_std"] == str(math.sqrt(0.5))


def test_every_study_declares_valid_configs_at_every_scale():
    from experiments.compare_zoo.config import STUDY as ZOO

    for study in (STUDY, ZOO):
        study.check(vocab_size=259)  # raises StudyConfigError naming the variant and scale
        for scale in study.scales:
            plans = [study.model_config(scale, variant, 259).plan for variant in study.variants]
            assert plans == [variant.plan for variant in study.variants]


def test_variants_option_runs_a_subset_and_names_unknown_ones(tmp_path, capsys, monkeypatch):
    chosen = []

    def record_and_stop(study, *args, **kwargs):
        chosen.append([variant.name for variant in study.variants])
        raise StudyConfigError("stopped before training")

    monkeypatch.setattr("experiments.study.run_study", record_and_stop)
    with pytest.raises(SystemExit):
        main(STUDY, ["--scale", "smoke", "--out", str(tmp_path), "--variants", "mqa", "mha"])
    assert chosen == [["mha", "mqa"]]  # the study's order, not the command's
    with pytest.raises(SystemExit) as exit_info:
        main(STUDY, ["--scale", "smoke", "--variants", "gqa", "nope"])
    assert exit_info.value.code == 2 and "--variants: nope not in the study" in capsys.readouterr().err
