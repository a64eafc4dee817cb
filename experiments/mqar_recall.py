"""Associative recall (MQAR, the Zoology protocol) across the zoo's mixers, sequence lengths and model widths: one
small model per (mixer, sequence length, width, learning rate, seed), trained on the same synthetic examples and
scored by recall accuracy at the query positions.

    python experiments/mqar_recall.py --smoke --out /tmp/mqar                  # seconds: checks the pipeline
    python experiments/mqar_recall.py --out runs/mqar                          # every registered mixer
    python experiments/mqar_recall.py --mixers gqa mamba2 based --seq-lens 64 128 --widths 32 64 --steps 600
    python experiments/mqar_recall.py --plans "mamba2[mlp=none]*3,gqa[mlp=none]" --mixers mamba2 gqa

As Zoology (arXiv 2312.04927, Fig. 2): a mixer is a stack of `--layers` (2) layers without MLP
(`<mixer>[mlp=none]*2`), sequence lengths 64 / 128 / 256 with seq_len / 16 key-value pairs (4 / 8 / 16), widths
on the x axis, the best learning rate of `--lrs` per cell. Our CPU-sized defaults train far fewer examples and steps
than Zoology's 100k examples x 64 epochs (and a smaller vocabulary: Zoology uses 8192), so read orderings, not
absolute accuracies. A recurrent state of fixed size must compress every pair it has seen, so recurrent mixers
fall behind attention as pairs grow unless their state grows with the width.

Each cell is cached in OUT/cells/<cell>.json (keyed by plan, model and training config, data settings and seed), so
a rerun with more mixers, widths or seeds trains only what is new. A cell that fails to build or train is reported
and left out. Writes OUT/results.csv (one row per cell), OUT/results.md (accuracy table: mixer x (sequence length,
width)) and OUT/mqar_recall.png (accuracy vs width, one line per mixer, one panel per sequence length).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

if not __package__:  # run as a file: import `experiments` from this checkout (it is not installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnzoo import LanguageModel, ModelConfig, parse_plan, registered  # noqa: E402
from attnzoo.data import IGNORE_INDEX, ArrayDataset, mqar  # noqa: E402
from attnzoo.registry import get_mixer  # noqa: E402
from attnzoo.train import TrainConfig  # noqa: E402
from attnzoo.provenance import code_identity, describe, same_code  # noqa: E402
from attnzoo.train.trainer import Trainer  # noqa: E402
from experiments.study import STALE_POLICIES, run_commits, runs_code  # noqa: E402

CELLS_DIR = "cells"
MIXER_MODULE_PREFIX = "attnzoo.mixers."  # test-only mixers registered elsewhere are not swept by default


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The grid and the per-cell training; `pairs` None: seq_len // 16 key-value pairs (Zoology's ratio)."""

    plans: tuple[tuple[str, str], ...]  # (label, plan)
    seq_lens: tuple[int, ...] = (64, 128, 256)
    widths: tuple[int, ...] = (32, 64, 128)
    lrs: tuple[float, ...] = (3e-3,)
    seeds: tuple[int, ...] = (0,)
    pairs: int | None = None
    vocab: int = 512
    heads: int = 2
    steps: int = 400
    batch_size: int = 32
    train_examples: int = 4096
    val_examples: int = 256

    def pairs_for(self, seq_len: int) -> int:
        return self.pairs or max(1, seq_len // 16)


SMOKE = dict(seq_lens=(16,), widths=(16,), steps=2, batch_size=4, train_examples=16, val_examples=8, vocab=32)
SMOKE_MIXERS = ("gqa", "based")


def recall_accuracy(model: LanguageModel, inputs_NT: np.ndarray, labels_NT: np.ndarray) -> float:
    """Fraction of query positions whose argmax prediction is the stored value."""
    logits = jax.jit(lambda tokens: model(tokens).logits_BTV)(jnp.asarray(inputs_NT))
    scored = labels_NT != IGNORE_INDEX
    return float(np.mean(np.asarray(jnp.argmax(logits, -1))[scored] == labels_NT[scored]))


def model_config(plan: str, sweep: Sweep, seq_len: int, width: int) -> ModelConfig:
    return ModelConfig(vocab_size=sweep.vocab, d_model=width, n_layers=len(parse_plan(plan)), n_heads=sweep.heads,
                       max_seq_len=seq_len, plan=plan)


def training_config(sweep: Sweep, seq_len: int, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(steps=sweep.steps, batch_size=sweep.batch_size, seq_len=seq_len, lr=lr,
                       warmup_steps=max(1, sweep.steps // 10), eval_every=sweep.steps,
                       eval_batches=max(1, sweep.val_examples // sweep.batch_size), ckpt_every=sweep.steps,
                       log_every=max(1, sweep.steps // 10), seed=seed)


def cells(sweep: Sweep):
    """Every (label, plan, seq_len, width, lr, seed) of the grid, shortest sequences and narrowest models first (an
    interrupted sweep has whole columns of the table)."""
    for seq_len, width, (label, plan), lr, seed in itertools.product(sweep.seq_lens, sweep.widths, sweep.plans,
                                                                     sweep.lrs, sweep.seeds):
        yield label, plan, seq_len, width, lr, seed


def cell_key(sweep: Sweep, plan: str, seq_len: int, width: int, lr: float, seed: int) -> str:
    """The cache file's name: readable settings and a digest of everything that defines the cell's result."""
    request = {"model": model_config(plan, sweep, seq_len, width).to_dict(),
               "train": training_config(sweep, seq_len, lr, seed).to_dict(),
               "data": {"pairs": sweep.pairs_for(seq_len), "train_examples": sweep.train_examples,
                        "val_examples": sweep.val_examples, "power_a": 0.01}}
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:10]
    slug = "".join(c if c.isalnum() else "-" for c in plan.replace("*", "x"))
    return f"{slug}-T{seq_len}-d{width}-lr{lr:g}-s{seed}-{digest}"


def mqar_splits(sweep: Sweep, seq_len: int, seed: int):
    """Train and validation examples of one sequence length, from distinct seeds."""
    kwargs = dict(num_kv_pairs=sweep.pairs_for(seq_len), vocab_size=sweep.vocab)
    return {"train": mqar(sweep.train_examples, seq_len, seed=2 * seed, **kwargs),
            "val": mqar(sweep.val_examples, seq_len, seed=2 * seed + 1, **kwargs)}


def train_cell(sweep: Sweep, plan: str, seq_len: int, width: int, lr: float, seed: int) -> dict:
    model = LanguageModel(model_config(plan, sweep, seq_len, width), rngs=nnx.Rngs(seed))
    splits = mqar_splits(sweep, seq_len, seed)
    with tempfile.TemporaryDirectory(prefix="mqar-run-") as run_dir:
        trainer = Trainer(model, training_config(sweep, seq_len, lr, seed), ArrayDataset(splits, sweep.vocab),
                          run_dir, progress=False, echo=lambda _: None)
        try:
            result = trainer.run()
        finally:
            trainer.close()
    return dict(params=model.summary(seq_len).total_params, val_loss=result.val_loss,
                accuracy=recall_accuracy(trainer.model, *splits["val"]))


def check_cells(sweep: Sweep, strict: bool, echo: Callable[[str], None]) -> set[tuple[str, int, int]]:
    """(plan, seq_len, width) combinations whose config does not build: a ValueError naming the first when `strict`
    (plans the user chose), else skipped with a note (the default sweep over every registered mixer)."""
    skipped = set()
    for (label, plan), seq_len, width in itertools.product(sweep.plans, sweep.seq_lens, sweep.widths):
        try:
            model_config(plan, sweep, seq_len, width)
            mqar(1, seq_len, sweep.pairs_for(seq_len), sweep.vocab)
        except ValueError as error:
            if strict:
                raise ValueError(f"{label} at seq_len {seq_len}, width {width}: {error}") from None
            echo(f"skipped {label} at seq_len {seq_len}, width {width}: {error}")
            skipped.add((plan, seq_len, width))
    return skipped


def _print(line: str) -> None:
    print(line, flush=True)  # one line per cell, visible at once in a log file


def run_sweep(sweep: Sweep, out: Path, *, strict: bool = True, stale: str = "error",
              echo: Callable[[str], None] = _print) -> list[dict]:
    """Train (or reuse from OUT/cells) every cell; a cell that fails to train is reported and left out.
    stale: a cached cell made by other code (`attnzoo.provenance`): "error" (list them before training anything),
    "retrain" (train it again, overwriting it) or "reuse" (keep it, marked stale)."""
    if stale not in STALE_POLICIES:
        raise ValueError(f"stale={stale!r}: must be one of {', '.join(STALE_POLICIES)}")
    skipped = check_cells(sweep, strict, echo)
    (out / CELLS_DIR).mkdir(parents=True, exist_ok=True)
    grid = [cell for cell in cells(sweep) if (cell[1], cell[2], cell[3]) not in skipped]
    paths = [out / CELLS_DIR / f"{cell_key(sweep, plan, seq_len, width, lr, seed)}.json"
             for _, plan, seq_len, width, lr, seed in grid]
    cached = {path: json.loads(path.read_text()) for path in paths if path.exists()}
    code = code_identity()
    stale_cells = [f"{path.name}: made by {describe(row.get('code'))}" for path, row in cached.items()
                   if not same_code(row.get("code"), code)]
    if stale_cells and stale == "error":
        raise ValueError(f"{len(stale_cells)} cached cell(s) were made by other code than this ({describe(code)}):"
                         "\n  " + "\n  ".join(stale_cells) + "\npass --stale retrain or --stale reuse")
    rows = []
    for number, ((label, plan, seq_len, width, lr, seed), path) in enumerate(zip(grid, paths), 1):
        prefix = f"cell {number}/{len(grid)} {label} T={seq_len} d={width} lr={lr:g} seed={seed}"
        row = cached.get(path)
        if row is not None and (stale == "reuse" or same_code(row.get("code"), code)):
            if not same_code(row.get("code"), code):
                row = {**row, "stale": True}
                echo(f"{prefix}: STALE: reusing a cell made by {describe(row.get('code'))}")
            rows.append(row)
            echo(f"{prefix}: reused, recall accuracy {rows[-1]['accuracy']:.3f}")
            continue
        start = time.perf_counter()
        try:
            measured = train_cell(sweep, plan, seq_len, width, lr, seed)
        except Exception as error:  # noqa: BLE001 - one mixer's failure must not end the sweep
            echo(f"{prefix}: failed, left out: {type(error).__name__}: {error}")
            continue
        row = dict(mixer=label, plan=plan, seq_len=seq_len, pairs=sweep.pairs_for(seq_len), d_model=width, lr=lr,
                   seed=seed, **measured, code=code)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row) + "\n")
        os.replace(tmp, path)
        rows.append(row)
        echo(f"{prefix}: recall accuracy {row['accuracy']:.3f}, val loss {row['val_loss']:.3f} "
             f"({time.perf_counter() - start:.0f} s)")
    return rows


def best_accuracy(rows: Sequence[dict]) -> dict[tuple[str, int, int], tuple[float, float | None]]:
    """Per (mixer, seq_len, width): the mean over seeds and its sample std at the learning rate with the best
    mean (Zoology reports the best learning rate of its sweep)."""
    by_lr: dict[tuple, dict[float, list[float]]] = {}
    for row in rows:
        by_lr.setdefault((row["mixer"], row["seq_len"], row["d_model"]), {}).setdefault(row["lr"], []).append(
            row["accuracy"])
    best = {}
    for cell, runs in by_lr.items():
        accuracies = max(runs.values(), key=statistics.fmean)
        best[cell] = (statistics.fmean(accuracies), statistics.stdev(accuracies) if len(accuracies) > 1 else None)
    return best


def accuracy_table(rows: Sequence[dict], sweep: Sweep) -> str:
    """Markdown: one row per mixer, one column per (sequence length, width): best-lr accuracy (± std over seeds)."""
    best = best_accuracy(rows)
    columns = list(itertools.product(sweep.seq_lens, sweep.widths))
    header = ["mixer", *(f"T={t} ({sweep.pairs_for(t)} pairs), d={d}" for t, d in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in dict.fromkeys(row["mixer"] for row in rows):
        cells_text = []
        for seq_len, width in columns:
            mean, std = best.get((label, seq_len, width), (None, None))
            cells_text.append("–" if mean is None else f"{mean:.3f}" + (f" ± {std:.3f}" if std else ""))
        lines.append(f"| {label} | " + " | ".join(cells_text) + " |")
    return "\n".join(lines)


def plot_accuracy(rows: Sequence[dict], sweep: Sweep, caption: str):
    """Zoology's figure: recall accuracy against model width, one line per mixer, one panel per sequence length."""
    import matplotlib.pyplot as plt

    best = best_accuracy(rows)
    mixers = list(dict.fromkeys(row["mixer"] for row in rows))
    fig, axes = plt.subplots(1, len(sweep.seq_lens), figsize=(4.2 * len(sweep.seq_lens) + 2.5, 4), sharey=True,
                             squeeze=False)
    palette = plt.get_cmap("tab10" if len(mixers) <= 10 else "tab20")
    for ax, seq_len in zip(axes[0], sweep.seq_lens):
        for i, mixer in enumerate(mixers):
            points = [(w, *best[(mixer, seq_len, w)]) for w in sweep.widths if (mixer, seq_len, w) in best]
            if points:
                ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] or 0.0 for p in points],
                            marker="o", capsize=3, color=palette(i % palette.N), label=mixer,
                            linestyle=("-", "--", ":")[i // palette.N % 3])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sweep.widths, [str(w) for w in sweep.widths])
        ax.set_title(f"sequence length {seq_len}, {sweep.pairs_for(seq_len)} pairs", fontsize=9)
        ax.set_xlabel("model width (d_model)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR recall accuracy")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    return fig


def write_results(rows: list[dict], sweep: Sweep, out: Path, caption: str) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {name: out / name for name in ("results.csv", "results.md", "mqar_recall.png")}
    csv_rows = [{**{k: v for k, v in row.items() if k != "code"}, "commit": run_commits([row])} for row in rows]
    with files["results.csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
    table = accuracy_table(rows, sweep)
    plans = "\n".join(f"- {label}: `{plan}`" for label, plan in sweep.plans)
    files["results.md"].write_text(f"# {caption}\n\nRecall accuracy at the query positions on {sweep.val_examples} "
                                   f"held-out examples; best learning rate of {list(sweep.lrs)}, mean ± std over "
                                   f"seeds {list(sweep.seeds)}; {runs_code(rows)}.\n\n{table}\n\nPlans:\n{plans}\n\n"
                                   f"![mqar_recall.png](mqar_recall.png)\n")
    fig = plot_accuracy(rows, sweep, caption)
    fig.savefig(files["mqar_recall.png"], dpi=110)
    plt.close(fig)
    print(table)
    return files


def default_mixers() -> list[str]:
    """Every registered mixer of attnzoo.mixers (aliases included: each is its own configuration)."""
    return [name for name in registered() if get_mixer(name).cls.__module__.startswith(MIXER_MODULE_PREFIX)]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="experiments/mqar_recall.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixers", nargs="+", help="mixer names, each as <mixer>[mlp=none]*LAYERS (default: every "
                                               "registered mixer, or none when --plans is given)")
    p.add_argument("--plans", nargs="+", default=[], help="full layer plans to add (e.g. hybrids)")
    p.add_argument("--layers", type=int, default=2, help="layers per --mixers plan (Zoology: 2)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=list(Sweep.seq_lens))
    p.add_argument("--widths", type=int, nargs="+", default=list(Sweep.widths), help="d_model values")
    p.add_argument("--lrs", type=float, nargs="+", default=list(Sweep.lrs), help="the best one is reported")
    p.add_argument("--seeds", type=int, nargs="+", default=list(Sweep.seeds))
    p.add_argument("--pairs", type=int, help="key-value pairs per example (default: seq_len // 16)")
    p.add_argument("--vocab", type=int, default=Sweep.vocab)
    p.add_argument("--heads", type=int, default=Sweep.heads)
    p.add_argument("--steps", type=int, default=Sweep.steps)
    p.add_argument("--batch-size", type=int, default=Sweep.batch_size)
    p.add_argument("--train-examples", type=int, default=Sweep.train_examples)
    p.add_argument("--smoke", action="store_true", help=f"a seconds-long grid ({', '.join(SMOKE_MIXERS)}; "
                                                        f"{SMOKE['steps']} steps) that checks the pipeline")
    p.add_argument("--out", default=None, help="output directory and cell cache (default: a new temporary one)")
    p.add_argument("--stale", choices=STALE_POLICIES, default="error",
                   help="a cached cell made by other code: stop and list them (error), train again (retrain), or "
                        "keep it marked stale (reuse)")
    args = p.parse_args(argv)
    chosen = args.mixers is not None or bool(args.plans)
    mixers = args.mixers if args.mixers is not None else ([] if args.plans else
                                                          list(SMOKE_MIXERS) if args.smoke else default_mixers())
    unknown = sorted(set(mixers) - set(registered()))
    if unknown:
        p.error(f"--mixers: {', '.join(unknown)} not registered; registered: {', '.join(registered())}")
    plans = [(name, f"{name}[mlp=none]*{args.layers}") for name in mixers] + [(plan, plan) for plan in args.plans]
    settings = dict(seq_lens=tuple(args.seq_lens), widths=tuple(args.widths), lrs=tuple(args.lrs),
                    seeds=tuple(args.seeds), pairs=args.pairs, vocab=args.vocab, heads=args.heads, steps=args.steps,
                    batch_size=args.batch_size, train_examples=args.train_examples)
    if args.smoke:
        settings.update(SMOKE)
    sweep = Sweep(plans=tuple(plans), **settings)
    out = Path(args.out or tempfile.mkdtemp(prefix="mqar-"))
    try:
        rows = run_sweep(sweep, out, strict=chosen, stale=args.stale)
    except ValueError as error:
        p.exit(2, f"{p.prog}: error: {error}\n")
    if not rows:
        p.exit(1, f"{p.prog}: error: no cell trained\n")
    pairs = sweep.pairs or "seq_len/16"
    caption = (f"MQAR recall: {len(sweep.plans)} plans, {pairs} pairs, vocab {sweep.vocab}, {sweep.steps} steps of "
               f"{sweep.batch_size} from {sweep.train_examples} examples")
    for path in write_results(rows, sweep, out, caption).values():
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
