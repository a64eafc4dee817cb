"""attnzoo.train.tracking: TensorBoard event files hold what metrics.jsonl holds, also across a resume that redoes
steps; only the primary process writes; W&B / trackio get the same scalars when asked for. (A real `attnzoo-train`
run's event files are checked against its metrics.jsonl in test_cli.py.)"""

import importlib.machinery
import json
import sys
import types

import pytest
from tensorboard_events import jsonl_scalars, read_scalars

from attnzoo.train import tracking as tracking_module
from attnzoo.train.tracking import Tracking, TrackingConfig


def _record(step: int, loss: float) -> dict:
    return {"kind": "train", "step": step, "loss": loss, "lr": 1e-3 * step}


def test_a_resume_hides_the_redone_steps_in_tensorboard_as_in_metrics_jsonl(tmp_path):
    """Session 1 logs steps 1-4 but its last checkpoint is step 2; session 2 resumes there and stops after step 3.
    TensorBoard then shows session 1's steps 1-2 and session 2's step 3, like metrics.jsonl (step 4 is gone)."""
    first = Tracking(tmp_path)
    for step in range(1, 5):
        first.write(_record(step, 10.0 - step))
    first.close()
    second = Tracking(tmp_path)
    second.rewind(2)
    second.write(_record(3, 0.5))
    second.close()
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2  # the second file did not overwrite
    records = second.records()
    assert [(r["step"], r["loss"]) for r in records] == [(1, 9.0), (2, 8.0), (3, 0.5)]
    assert read_scalars(tmp_path / "tb") == jsonl_scalars(records)


def test_only_the_primary_process_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking_module, "is_primary_process", lambda: False)
    tracker = Tracking(tmp_path)
    tracker.write(_record(1, 1.0))
    tracker.rewind(0)
    tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_no_tensorboard_when_turned_off(tmp_path):
    tracker = Tracking(tmp_path, TrackingConfig(tensorboard=False))
    tracker.write(_record(1, 1.0))
    tracker.close()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


class _FakeHostedRun:
    def __init__(self, project, name, config):
        self.init = {"project": project, "name": name, "config": config}
        self.logged, self.finished = [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.mark.parametrize("package", ["wandb", "trackio"])
def test_a_hosted_tracker_gets_the_records_scalars_and_run_json(tmp_path, monkeypatch, package):
    runs = []
    module = types.ModuleType(package)
    module.__spec__ = importlib.machinery.ModuleSpec(package, None)
    module.init = lambda project, name, config: runs.append(_FakeHostedRun(project, name, config)) or runs[-1]
    monkeypatch.setitem(sys.modules, package, module)
    run_dir = tmp_path / "run-7"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"train": {"lr": 0.003}}))
    tracker = Tracking(run_dir, TrackingConfig(tensorboard=False, **{package: "zoo"}))
    tracker.write(_record(1, 2.0))
    tracker.write({"kind": "eval", "step": 1, "val_loss": 1.5, "val_ppl": 4.5})
    tracker.close()
    [run] = runs
    assert run.init == {"project": "zoo", "name": "run-7", "config": {"train": {"lr": 0.003}}}
    assert run.logged == [(1, {"train/loss": 2.0, "train/lr": 0.001}),
                          (1, {"eval/val_loss": 1.5, "eval/val_ppl": 4.5})]
    assert run.finished


@pytest.mark.parametrize("package", ["wandb", "trackio"])
def test_asking_for_a_missing_hosted_tracker_names_the_package(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # not importable, whether installed here or not
    with pytest.raises(ValueError, match=rf"--{package} zoo: the {package} package is not installed; "
                                         rf"`pip install {package}`"):
        TrackingConfig(**{package: "zoo"})
    with pytest.raises(ValueError, match=f"--{package}: give a project name"):
        TrackingConfig(**{package: ""})
