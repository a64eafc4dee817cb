"""experiments/bench_cpu_vs_torch.py: its smoke run (attnzoo rows only where torch is not installed) writes sane
numbers and the code identity; the alternating timer pairs its runs by repeat; the agreement check stops on any
greedy or loss difference (stand-in contenders, so no torch is needed); the full run's family plans are valid."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from attnzoo import ModelConfig

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # experiments/ is not installed

from experiments import bench_common  # noqa: E402
from experiments import bench_cpu_vs_torch as bench  # noqa: E402


@pytest.mark.slow  # compiles two models' train steps (10-50 s); the timing and checking helpers are tested below
def test_smoke_run_writes_positive_rates_ratios_to_gqa_and_code_identity(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())

    assert result["code"]["source_hash"] and "commit" in result["code"] and "dirty" in result["code"]
    assert result["machine"]["threads"] == 2 and result["machine"]["cpu_count"] >= 1
    assert result["settings"]["smoke"] and result["settings"]["repeats"] == 1
    with_torch = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers")
    contenders = {"attnzoo", "torch"} if with_torch else {"attnzoo"}
    assert (result["checks"] is None) == (not with_torch)
    assert [row["workload"].split()[0] for row in result["vs_torch"]] == ["prefill", "decode", "train"]
    for row in result["vs_torch"]:
        assert set(row["contenders"]) == contenders
        for side in row["contenders"].values():
            assert side["tokens_per_s"] > 0
            assert side["tokens_per_s"] == pytest.approx(row["tokens_per_call"] / side["seconds"][0])

    plans = bench.SMOKE.plans()
    assert [row["workload"].split()[0] for row in result["families"]] == ["prefill", "train"]
    for row in result["families"]:
        assert list(row["contenders"]) == [f"{family}: {plan}" for family, plan in plans.items()]
        assert row["baseline"] == f"{bench.GQA}: {plans[bench.GQA]}"
        for name, side in row["contenders"].items():
            ratio = side["speed_vs_baseline"]
            assert side["tokens_per_s"] > 0
            assert math.isfinite(ratio["median"]) and ratio["min"] > 0
            if name == row["baseline"]:
                assert ratio["median"] == ratio["min"] == ratio["max"] == 1.0
            else:  # one repeat: the ratio is the baseline's time over this one's
                base = row["contenders"][row["baseline"]]
                assert ratio["median"] == pytest.approx(base["seconds"][0] / side["seconds"][0])


def test_alternating_seconds_warms_up_then_interleaves_and_ratios_pair_repeats():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    seconds = bench_common.alternating_seconds(runs, repeats=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(s) for s in seconds.values()] == [3, 3]

    own, baseline = [1.0, 2.0, 4.0], [2.0, 2.0, 2.0]  # per repeat: 2x, 1x and 0.5x the baseline's speed
    assert bench_common.speed_ratio(own, baseline) == {"median": 1.0, "min": 0.5, "max": 2.0}
    with pytest.raises(ValueError):
        bench_common.speed_ratio(own, baseline[:2])


class _StandIn:
    def __init__(self, name, greedy, loss):
        self.name, self._greedy, self._loss = name, greedy, loss

    def greedy(self, prompts_BP, new_tokens):
        return self._greedy

    def loss(self, tokens_BT):
        return self._loss


def test_check_agreement_stops_on_greedy_or_loss_differences():
    setup = bench.SMOKE
    loss = float(np.log(setup.vocab_size))
    same = bench.check_agreement([_StandIn("a", [[1, 2]], loss), _StandIn("b", [[1, 2]], loss * (1 + 1e-6))], setup)
    assert same["a"] == {"greedy": [[1, 2]], "loss": loss}
    with pytest.raises(bench.MismatchError, match="greedy ids differ"):
        bench.check_agreement([_StandIn("a", [[1, 2]], loss), _StandIn("b", [[1, 3]], loss)], setup)
    with pytest.raises(bench.MismatchError, match="initial loss differs"):
        bench.check_agreement([_StandIn("a", [[1, 2]], loss), _StandIn("b", [[1, 2]], loss * (1 + 1e-3))], setup)


def test_full_run_plans_cover_every_family_at_the_benchmark_shape():
    plans = bench.FULL.plans()
    assert list(plans) == list(bench.MIXER_FAMILIES)
    base = bench.zoo_config(bench.FULL)
    assert (base.n_layers, base.d_model, base.n_heads, base.kv_heads, base.vocab_size) == (4, 256, 8, 2, 1024)
    mixers = set()
    for plan in plans.values():
        config = ModelConfig(**{**base.to_dict(), "plan": plan})
        assert config.n_layers == base.n_layers
        mixers |= {layer.mixer for layer in config.layers}
    assert mixers == {"gqa", "mla", "gated", "simple_gla", "mamba2", "mamba"}
