"""experiments/titans_recall.py at its smoke size: trains each plan a couple of steps on MQAR from a seed and writes
the table (markdown + CSV) and the plot; recall split by the key's distance against the window."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from attnzoo.provenance import code_identity, describe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # experiments/ is not installed

from attnzoo.data import mqar  # noqa: E402
from experiments.titans_recall import key_distances, main  # noqa: E402


def test_key_distances_follow_the_mqar_layout():
    inputs, labels = mqar(3, 32, num_kv_pairs=4, vocab_size=64, seed=0)
    rows, cols = np.nonzero(labels >= 0)
    distances = key_distances(inputs, labels, 4)
    for row, col, distance in zip(rows, cols, distances):
        assert inputs[row, col - distance] == inputs[row, col]  # the key itself
        assert inputs[row, col - distance + 1] == labels[row, col]  # followed by its value


def test_smoke_run_writes_table_csv_and_plot(tmp_path):
    rows = main(["--smoke", "--out", str(tmp_path)])
    assert [r["label"] for r in rows] == ["SWA", "MAG"]
    table = (tmp_path / "results.md").read_text()
    assert "titans_mag(chunk_size=4,max_lr=0.005,window=4)*1" in table and "beyond the SWA stack's reach" in table
    written = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["label"] for r in written] == ["SWA", "MAG"]
    for row, record in zip(rows, written):
        assert 0 <= row["accuracy"] <= 1 and float(record["accuracy"]) == row["accuracy"]
        assert np.isfinite(row["val_loss"])
        assert record["source_hash"] == code_identity()["source_hash"] == row["source_hash"]  # the code is recorded
    assert describe(code_identity()) in table
    assert (tmp_path / "titans_recall.png").stat().st_size > 0
