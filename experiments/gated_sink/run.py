"""Gated attention vs GQA: per-layer first-token attention share (the attention sink), largest residual activation
and gate mean of each trained model, beside the paper's Table 1 (sink 0.467 -> 0.048 with the G1 gate).

    python experiments/gated_sink/run.py --scale smoke --out /tmp/sink   # seconds: checks the pipeline
    python experiments/gated_sink/run.py --scale cpu --seeds 0 1         # the study, on a CPU

Writes OUT/results.csv, OUT/results.md, OUT/gated_sink.png (share and max activation per layer) and
OUT/paper_table.md (ours beside the paper's). Rerunning into the same OUT reuses finished runs; see
experiments/README.md.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

if not __package__:  # run as a file: import `experiments` from this checkout (it is not installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from attnzoo.train.runs import diagnose_model  # noqa: E402
from experiments.gated_sink.config import LAYERS, PAPER, STUDY  # noqa: E402
from experiments.gated_sink.probes import eval_windows, layer_metric, max_activation_per_layer  # noqa: E402
from experiments.study import StudyResults, main as study_main, run_study  # noqa: E402

SHARE, MAX_ACT, GATE = "first_token_share", "max_activation", "gate_mean"


def evaluate_run(model, dataset, training) -> dict[str, float | None]:
    """On the validation windows the trainer scores: the mean first-token attention share per layer (over batch,
    heads and queries) and over layers (the paper's F-Attn), the largest |residual activation| per layer and its
    mean over layers (M-Act), and the mean gate value over layers (None without a gate)."""
    n = model.config.n_layers
    diagnostics = diagnose_model(model, dataset, "val", training.batch_size, training.seq_len,
                                 training.eval_batches)
    shares = layer_metric(diagnostics, "sink_share", n)
    gates = [g for g in layer_metric(diagnostics, "gate_mean", n) if g is not None]
    windows = eval_windows(dataset, training.batch_size, training.seq_len, training.eval_batches)
    maxima = np.max([np.asarray(max_activation_per_layer(model, x_BT)) for x_BT in windows], axis=0)
    return {SHARE: statistics.fmean(shares), MAX_ACT: float(np.mean(maxima)),
            GATE: statistics.fmean(gates) if gates else None,
            **{f"{SHARE}_l{i}": share for i, share in enumerate(shares)},
            **{f"{MAX_ACT}_l{i}": float(value) for i, value in enumerate(maxima)}}


def plot_layers(rows, caption: str):
    """First-token attention share (left) and the largest residual activation (right) per layer, one line per
    variant; error bars over seeds."""
    fig, (share_ax, act_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    layers = np.arange(LAYERS)
    for row in rows:
        for ax, metric in ((share_ax, SHARE), (act_ax, MAX_ACT)):
            means = [row[f"{metric}_l{i}_mean"] for i in layers]
            stds = [row[f"{metric}_l{i}_std"] or 0.0 for i in layers]
            ax.errorbar(layers, means, yerr=stds, marker="o", capsize=3, label=row["label"])
    share_ax.set_ylabel("attention share of the first token")
    act_ax.set_ylabel("max |residual activation|")
    for ax in (share_ax, act_ax):
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    share_ax.legend(fontsize=8)
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    return fig


def paper_table(rows, caption: str) -> str:
    """Ours beside the paper's Table 1 (15B MoE, 400B tokens: a very different scale; compare orderings)."""
    def cell(row, metric, fmt):
        mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
        return "–" if mean is None else format(mean, fmt) + (f" ± {format(std, fmt)}" if std else "")

    def paper(value, fmt):
        return "–" if value is None else format(value, fmt)

    lines = [f"{caption}\n", "| variant | val loss | F-Attn (ours) | F-Attn (paper) | M-Act (ours) | M-Act (paper) | "
             "gate mean (ours) | gate mean (paper) |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        f_attn, m_act, gate = PAPER.get(row["variant"], (None, None, None))
        lines.append(f"| {row['label']} | {cell(row, 'val_loss', '.4f')} | {cell(row, SHARE, '.3f')} | "
                     f"{paper(f_attn, '.3f')} | {cell(row, MAX_ACT, '.1f')} | {paper(m_act, '.0f')} | "
                     f"{cell(row, GATE, '.3f')} | {paper(gate, '.3f')} |")
    return "\n".join(lines) + "\n"


REPORTS = {"gated_sink.png": plot_layers, "paper_table.md": paper_table}


def run(scale: str, out, **options) -> StudyResults:
    """The study at `scale` into `out`; options as for experiments.study.run_study (seeds, progress, echo)."""
    return run_study(STUDY, scale, out, reports=REPORTS, evaluate_run=evaluate_run, **options)


def main(argv=None) -> int:
    return study_main(STUDY, argv, reports=REPORTS, evaluate_run=evaluate_run, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
