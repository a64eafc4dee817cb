"""The experiments' plots read at a glance: the Pareto frontier's legend entry always shows something, error bars
take their marker's colour, point labels in a panel never overlap, the Deconstructing study's lines are pairwise
distinct with the legend outside the data, and its figures are redrawn from a results folder without training."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # noqa: E402 - before pyplot is imported anywhere
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.text import Annotation, Text  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # experiments/ is not installed

from experiments.compare.reports import plot_frontier  # noqa: E402
from experiments.deconstructing_attention import run as decon  # noqa: E402
from experiments.deconstructing_attention.config import LAYOUT_STUDY, STUDY  # noqa: E402
from experiments.study import read_results, write_results  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def frontier_rows(points, std=0.05):
    """Rows as results.csv has them: (label, KV-cache bytes/token, parameters, validation loss) per point."""
    return [{"variant": f"v{i}", "label": label, "kv_cache_bytes_per_token": kv, "params": params,
             "val_loss_mean": loss, "val_loss_std": std} for i, (label, kv, params, loss) in enumerate(points)]


def test_a_frontier_of_one_plan_still_shows_in_its_legend_entry():
    rows = frontier_rows([("best", 0, 100, 2.0), ("b", 256, 200, 2.5), ("c", 1024, 300, 2.7)])
    kv_ax = plot_frontier(rows, "caption").axes[0]
    [front] = [line for line in kv_ax.lines if line.get_label() == "Pareto frontier"]
    assert list(front.get_xdata()) == [0] and list(front.get_ydata()) == [2.0]  # only "best" is Pareto-optimal
    legend = kv_ax.get_legend()
    [entry] = [handle for handle, text in zip(legend.legend_handles, legend.get_texts())
               if text.get_text() == "Pareto frontier"]
    assert entry.get_marker() not in (None, "", "None")  # a line of one point draws nothing; the ring does


def test_error_bars_take_their_markers_colour():
    rows = frontier_rows([("a", 0, 100, 2.0), ("b", 256, 200, 2.5), ("c", 1024, 300, 2.7)])
    fig = plot_frontier(rows, "caption", groups={"v0": "recurrent", "v1": "attention", "v2": "attention"})
    for ax in fig.axes:
        for data_line, caplines, barlines in ax.containers:
            marker = to_rgba(data_line.get_markerfacecolor())
            assert {to_rgba(cap.get_markeredgecolor()) for cap in caplines} == {marker}  # the caps are markers
            assert {to_rgba(color) for bars in barlines for color in bars.get_colors()} == {marker}
        markers = [to_rgba(data_line.get_markerfacecolor()) for data_line, _, _ in ax.containers]
        assert markers[1] == markers[2] != markers[0]  # one colour per family


def label_boxes(ax):
    renderer = ax.figure.canvas.get_renderer()
    labels = [text for text in ax.texts if isinstance(text, Annotation)]
    for label in labels:
        label.update_positions(renderer)
    return {label.get_text(): Text.get_window_extent(label, renderer) for label in labels}


def test_point_labels_in_each_panel_do_not_overlap():
    # The zoo's crowded corner (2026-12-07): on the parameters panel "Routing Transformer" ran into
    # "gated (G1 headwise)", although the points are far apart in parameters; on the KV panel five share x=1024.
    rows = frontier_rows([("GQA (2 kv heads)", 1024, 213760, 2.607), ("MASA (QKVO atoms)", 1024, 189216, 2.462),
                          ("CCGQA", 256, 188292, 2.646), ("gated (G1 elementwise)", 1024, 230272, 2.520),
                          ("gated (G1 headwise)", 1024, 214912, 2.543), ("MoH", 1024, 215296, 2.547),
                          ("Routing Transformer", 2112, 221952, 2.515), ("Mamba-2", 0, 189464, 2.056)])
    fig = plot_frontier(rows, "caption")
    fig.canvas.draw()
    for ax in fig.axes:
        boxes = label_boxes(ax)
        assert len(boxes) == len(rows)
        for (a, box_a), (b, box_b) in itertools.combinations(boxes.items(), 2):
            assert not box_a.overlaps(box_b), (ax.get_xlabel(), a, b)


def decon_rows(study):
    """A results row per variant of `study`, with perplexities by context and per-layer indicators."""
    rows = []
    for i, variant in enumerate(study.variants):
        row = {"variant": variant.name, "label": variant.label}
        row.update({f"ppl_ctx{n}_mean": 10.0 + i + 8 / n for n in (8, 16, 32)})
        row.update({f"layer{layer}/{name}_mean": 0.1 * (i + layer) for layer in range(3)
                    for name in decon.PLOTTED_INDICATORS})
        rows.append(row)
    return rows


@pytest.mark.parametrize("study", [STUDY, LAYOUT_STUDY], ids=["main", "layouts"])
def test_deconstructing_lines_are_pairwise_distinct_and_the_legend_is_outside_the_data(study):
    rows = decon_rows(study)
    for plot in (decon.plot_ppl_vs_context, decon.plot_indicators):
        fig = plot(rows, "caption")
        fig.canvas.draw()
        for ax in fig.axes:
            # the rendered look of each line: colour and dash pattern (private: Line2D has no public getter)
            looks = [(to_rgba(line.get_color()), line._unscaled_dash_pattern) for line in ax.lines]
            assert len(looks) == len(rows) and len(set(looks)) == len(rows)
        legend_ax = fig.axes[-1]
        legend_box = legend_ax.get_legend().get_window_extent()
        assert not any(legend_box.overlaps(ax.get_window_extent()) for ax in fig.axes)
        assert legend_box.x1 <= fig.bbox.x1  # and inside the figure, so the PNG shows it
    if study is STUDY:  # uniform solid, hybrid dashed, every variant its own colour
        by_variant = {line.get_label(): line for line in decon.plot_ppl_vs_context(rows, "caption").axes[0].lines}
        assert by_variant["uniform MLP"].get_linestyle() == "-" and by_variant["hybrid MLP"].get_linestyle() == "--"
        assert by_variant["uniform MLP"].get_color() == by_variant["hybrid MLP"].get_color()
        assert len({by_variant[f"uniform {name}"].get_color() for name in ("MLP", "Approx.", "RndEmbQK")}) == 3


def test_report_only_redraws_a_results_folder_without_training(tmp_path, capsys):
    rows = [{"variant": row["variant"], "label": row["label"], "plan": "mha*6", "seeds": "0 1", "params": 100,
             "kv_cache_bytes_per_token": 0, "flops_per_token": 200, "val_ppl_mean": 10.5, "val_ppl_std": 0.25,
             **{key: value for key, value in row.items() if key.endswith("_mean")},
             **{key.replace("_mean", "_std"): None for key in row if key.endswith("_mean")}}
            for row in decon_rows(STUDY)[:3]]
    files = write_results(rows, [], tmp_path, "the caption", decon.REPORTS).files
    written = {name: path.read_bytes() for name, path in files.items() if path.suffix != ".png"}
    assert read_results(tmp_path) == (rows, "the caption")
    for path in files.values():
        path.unlink()
    (tmp_path / "results.csv").write_bytes(written["results.csv"])
    (tmp_path / "results.md").write_bytes(written["results.md"])

    assert decon.main(["--report-only", str(tmp_path)]) == 0
    assert {name: files[name].read_bytes() for name in written} == written
    assert (tmp_path / "ppl_vs_context.png").stat().st_size > 0 and (tmp_path / "indicators.png").stat().st_size > 0
    with pytest.raises(SystemExit) as exit_info:
        decon.main(["--report-only", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "no results.csv there" in capsys.readouterr().err
