"""experiments/deconstructing_attention: Table 11's layouts, the grid's plans, the hybrid-skip and per-layer
indicator measurements, and a smoke run of part of the grid end to end (every report written); the KJV corpus."""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # experiments/ is not installed

from attnzoo.attention_indicators import map_indicators  # noqa: E402
from attnzoo.config import ModelConfig  # noqa: E402
from experiments.deconstructing_attention import run  # noqa: E402
from experiments.deconstructing_attention.config import (LAYOUT_STUDY, STUDY, layout_plan,  # noqa: E402
                                                         standard_layers)

TABLE_11 = {  # Appx. P, Table 11: the 1-indexed layers that keep Standard attention in the 24-layer model
    "even": list(range(2, 25, 2)), "odd": list(range(1, 24, 2)), "top": list(range(1, 13)),
    "middle": [*range(1, 7), *range(19, 25)], "bottom": list(range(13, 25)), "25%": [4, 8, 12, 16, 20, 24],
    "first": [1], "last": [24], "bilateral": [1, 24],
}


def test_layouts_are_table_11():
    for layout, layers in TABLE_11.items():
        assert list(standard_layers(layout, 24)) == layers, layout
    with pytest.raises(ValueError, match="layout='outer' must be one of even, odd"):
        standard_layers("outer", 24)
    # Hybrid = the variant at the odd 1-indexed layers, Standard at the even ones.
    assert layout_plan("decon_mlp", standard_layers("even", 6)) == "decon_mlp,mha,decon_mlp,mha,decon_mlp,mha"
    plans = {variant.name: variant.plan for variant in STUDY.variants}
    assert plans["hybrid-nonapprox"] == "decon_nonapprox,mha," * 2 + "decon_nonapprox,mha"
    assert plans["uniform-rnd_emb_qk"] == "decon_rnd_emb_qk*6" and plans["standard"] == "mha*6"
    assert len(LAYOUT_STUDY.variants) == 2 * len(TABLE_11)
    assert run.variant_layers(ModelConfig(vocab_size=9, d_model=8, n_heads=2, n_layers=4,
                                          plan="decon_mlp,mha,decon_mlp,mha").layers) == (0, 2)


def test_indicators_of_a_known_map():
    t = 4
    uniform = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]  # causal mean: row i spreads 1/(i+1)
    a = jnp.asarray(np.stack([uniform, np.eye(t)])[None], jnp.float32)  # heads: uniform, diagonal
    found = map_indicators(a, 5 * a - 7)
    assert found["sink_share"] == pytest.approx((np.mean(1 / np.arange(1, t + 1)) + 0.25) / 2)
    assert found["entropy"] == pytest.approx(np.mean(np.log(np.arange(1, t + 1))) / 2, rel=1e-6)
    assert found["locfoc_0"] == pytest.approx((np.mean(1 / np.arange(1, t + 1)) + 1) / 2)
    assert found["locfoc_3"] == pytest.approx(0.25 / 2)
    std = np.std(np.stack([uniform, np.eye(t)]), axis=0)
    assert found["head_div"] == pytest.approx(std[np.tril_indices(t)].mean(), rel=1e-6)
    assert found["max_logit"] == pytest.approx(7.0)
    assert map_indicators(-a, a)["entropy"] is None  # not a distribution
    # An unnormalised non-negative map (Approx.'s weights are not a softmax): the entropy of its row-normalised
    # form, never above ln T (a raw -sum A log A of weights summing to 30 would be far above it).
    scaled = map_indicators(30 * a, a)
    assert scaled["entropy"] == pytest.approx(found["entropy"], rel=1e-6) and scaled["entropy"] <= np.log(t)


def test_reports_lay_out_tables_1_and_4_beside_the_paper():
    def row(variant, label, ppl, skip=None):
        values = {"variant": variant, "label": label, "params": 100, "val_ppl_mean": ppl, "val_ppl_std": None,
                  "skip_val_ppl_mean": skip, "skip_val_ppl_std": None}
        values.update({f"ppl_ctx{n}_mean": ppl * (1 + 8 / n) for n in (8, 16)})
        values.update({f"layer{i}/{name}_mean": 0.1 * i for i in range(2) for name in run.PLOTTED_INDICATORS})
        return values

    rows = [row("standard", "Standard", 10.0), row("uniform-mlp", "uniform MLP", 12.0),
            row("hybrid-nonapprox", "hybrid Non-apx.", 11.0, skip=300.0)]
    table1 = run.table1(rows, "cap")
    assert "| — | Standard | 100 | 10 | 1 | 38.1 | 1 | 51.9 |" in table1
    assert "| uniform | MLP | 100 | 12 | 1.2 | 993.5 | 26.1 | 40 |" in table1
    assert "| hybrid-skip | Non-apx. | 100 | 300 | 30 | 5e+05 | 1.31e+04 | 37.5 |" in table1
    assert table1.index("| uniform |") < table1.index("| hybrid |") < table1.index("| hybrid-skip |")
    table4 = run.table4(rows, "cap")
    assert "| model | ctx 8 | ctx 16 |" in table4 and "| uniform MLP | 24 | 18 |" in table4
    assert "| uniform RndEmbQK | 107.1 | 95.7 | 89.6 | 86.3 | 84.8 |" in table4
    for plot in (run.plot_ppl_vs_context, run.plot_indicators):
        assert plot(rows, "cap").axes


@pytest.mark.slow  # a few minutes: every variant compiles its training and six evaluation programs
def test_smoke_grid_writes_the_paper_style_reports(tmp_path):
    corpus = tmp_path / "text.txt"
    words = np.random.default_rng(0).choice(["the", "light", "waters", "and", "God", "said", "day"], 3000)
    corpus.write_text(" ".join(words))
    keep = {"hybrid-nonapprox", "uniform-rnd_emb_qk"}
    study = dataclasses.replace(STUDY, variants=tuple(v for v in STUDY.variants if v.name in keep))
    out = tmp_path / "out"
    results = run.run_study(study, "smoke", out, data=str(corpus), reports=run.REPORTS, evaluate_run=run.evaluate_run,
                            progress=False, echo=lambda _: None)
    rows = {row["variant"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == keep
    for name, row in rows.items():
        for length in (2, 4, 8, 16, 32):
            assert math.isfinite(float(row[f"ppl_ctx{length}_mean"]))
        assert (row["skip_val_ppl_mean"] != "") == (name == "hybrid-nonapprox")
        assert math.isfinite(float(row["layer5/sink_share_mean"]))  # every layer of these has a map
    table1 = (out / "table1.md").read_text()
    assert "| hybrid-skip | Non-apx. |" in table1 and "| 5e+05 | 1.31e+04 | 37.5 |" in table1  # the paper's beside
    assert "uniform RndEmbQK | 107.1" in (out / "table4.md").read_text()
    assert {"ppl_vs_context.png", "indicators.png", "table1.csv"} <= set(results.files)


def test_kjv_corpus(tmp_path):
    from attnzoo.data.corpus import load_corpus

    corpus = load_corpus("kjv", tmp_path)
    assert corpus.name == "kjv" and corpus.num_bytes() > 4_000_000 and corpus.within_file_val_fraction == 0.05
    train, val = (next(corpus.iter_texts(split)) for split in ("train", "val"))
    assert train.startswith("Genesis\n\nIn the beginning God created the heaven and the earth.\n")
    assert val.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert load_corpus("kjv", tmp_path).fingerprint == corpus.fingerprint  # deterministic


def test_help_lists_the_grid_option_with_the_study_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert "--grid {main,layouts}" in shown and "--scale" in shown and "--stale" in shown
