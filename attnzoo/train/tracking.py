"""Experiment tracking: where a run's metrics go.

The trainer hands every record it logs (a dict with "kind": "train" or "eval", "step", and scalars such as loss,
lr, grad_norm, tokens_per_s, val_loss) to a `Tracking`, which passes it to each of its writers:

    metrics.jsonl      always: one JSON line per record (what loss.png, attnzoo-eval and attnzoo-export read)
    tb/                TensorBoard event files (written by tensorboardX), on by default: the record's numeric
                       values as scalars tagged "<kind>/<name>" (e.g. train/loss, eval/val_loss); view them with
                       `tensorboard --logdir RUN_DIR/tb` (the `tensorboard` package)
    Weights & Biases, trackio   when asked for with a project name (and installed): the same tags, one hosted run
                       named after the run directory, with run.json as its config

Only the primary process writes. A resumed run rewinds the writers to the restored step: metrics.jsonl drops its
later lines, and the next TensorBoard event file starts with a purge at the following step, so TensorBoard hides
the events that the resumed run redoes. A hosted run cannot drop points: a resumed run is a new hosted run.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Protocol

from attnzoo.train.checkpoint import RUN_CONFIG_FILE, read_run_config
from attnzoo.train.sharding import is_primary_process

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
HOSTED = ("wandb", "trackio")  # importable package = TrackingConfig field = CLI flag


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Which writers a run gets besides metrics.jsonl: TensorBoard (default on), and a Weights & Biases and/or
    trackio project. Asking for a hosted tracker whose package is not installed is an error here, before any
    work."""

    tensorboard: bool = True
    wandb: str | None = None  # project name
    trackio: str | None = None

    def __post_init__(self):
        for package in HOSTED:
            project = getattr(self, package)
            if project is None:
                continue
            if not project:
                raise ValueError(f"--{package}: give a project name, e.g. --{package} attnzoo")
            if importlib.util.find_spec(package) is None:
                raise ValueError(f"--{package} {project}: the {package} package is not installed; "
                                 f"`pip install {package}`, or leave out --{package}")


class MetricsWriter(Protocol):
    """One destination of the run's records."""

    def write(self, record: dict[str, Any]) -> None: ...

    def rewind(self, step: int) -> None:
        """Forget what was written after `step` (a resumed run redoes it)."""

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric values (all but "kind" and "step") as "<kind>/<name>" tags."""
    return {f"{record['kind']}/{name}": float(value) for name, value in record.items()
            if name not in ("kind", "step") and isinstance(value, (int, float))}


class MetricsLog:
    """metrics.jsonl: append-only JSON lines; `rewind` drops the lines after a step."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def rewind(self, step: int) -> None:
        kept = [r for r in self.records() if r["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

    def close(self) -> None:
        pass


class TensorBoardWriter:
    """Event files in `directory`, one per training session. The file is opened at the first write, so that a
    rewind before it (a resume) can start the file with TensorBoard's purge marker."""

    def __init__(self, directory: str | Path, flush_secs: int = 30):
        self.directory, self.flush_secs = Path(directory), flush_secs
        self._writer, self._purge_step = None, None

    def write(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            # Event files are named by the second they were opened: a session number keeps a quick resume's
            # file from overwriting the last one.
            session = len(list(self.directory.glob("events.out.tfevents.*"))) if self.directory.exists() else 0
            self._writer = SummaryWriter(str(self.directory), purge_step=self._purge_step,
                                         flush_secs=self.flush_secs, filename_suffix=f".{session}")
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, record["step"])

    def rewind(self, step: int) -> None:
        self.close()
        self._purge_step = step + 1  # TensorBoard hides earlier files' events from this step on

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class HostedWriter:
    """A Weights & Biases or trackio run (both have `init(project=, name=, config=)` and `run.log(data, step=)`),
    started here, so that a login or network failure shows before training starts."""

    def __init__(self, package: str, project: str, name: str, config: dict[str, Any]):
        self._run = importlib.import_module(package).init(project=project, name=name, config=config)

    def write(self, record: dict[str, Any]) -> None:
        self._run.log(scalars(record), step=record["step"])

    def rewind(self, step: int) -> None:
        pass  # logged points stay; the resumed session logs into a new hosted run

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class Tracking:
    """All the writers of the run in `run_dir` as one (none outside the primary process): the trainer calls
    `write`, `rewind` on resume and `close`. `records()` reads metrics.jsonl back."""

    def __init__(self, run_dir: str | Path, config: TrackingConfig = TrackingConfig()):
        run_dir = Path(run_dir)
        self.metrics = MetricsLog(run_dir / METRICS_FILE)
        self.writers: list[MetricsWriter] = []
        if not is_primary_process():
            return
        self.writers.append(self.metrics)
        if config.tensorboard:
            self.writers.append(TensorBoardWriter(run_dir / TENSORBOARD_DIR))
        hosted = [package for package in HOSTED if getattr(config, package) is not None]
        run_config = read_run_config(run_dir) if hosted and (run_dir / RUN_CONFIG_FILE).exists() else {}
        self.writers += [HostedWriter(package, getattr(config, package), run_dir.name, run_config)
                         for package in hosted]

    @property
    def path(self) -> Path:
        return self.metrics.path

    def write(self, record: dict[str, Any]) -> None:
        for writer in self.writers:
            writer.write(record)

    def rewind(self, step: int) -> None:
        for writer in self.writers:
            writer.rewind(step)

    def records(self) -> list[dict[str, Any]]:
        return self.metrics.records()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
