"""The benchmark scripts' shared timing (experiments/bench_common.py) and the kernel benchmark's command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # experiments/ is not installed

from experiments import bench_common  # noqa: E402


class FakeClock:
    """time.perf_counter for the timing helpers: each call of `step` advances it by the next scripted duration."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def perf_counter(self):
        return self.now

    def step(self):
        self.now += self.durations[self.calls]
        self.calls += 1


@pytest.fixture
def clock(monkeypatch):
    def make(durations):
        fake = FakeClock(durations)
        monkeypatch.setattr(bench_common.time, "perf_counter", fake.perf_counter)
        return fake
    return make


def test_timed_is_the_median_after_a_compiling_call_with_its_spread(clock):
    fake = clock([100.0, 3.0, 1.0, 2.0])  # the compiling call, then three repetitions of one call
    assert bench_common.timed(fake.step, repeats=3) == (2.0, (3.0 - 1.0) / 2.0)
    assert fake.calls == 4


def test_timed_with_rep_s_fills_each_repetition_with_back_to_back_calls(clock):
    # compile, one warm call of 0.01 s (so rep_s=0.03 gives 3 calls per repetition), then 2 repetitions.
    fake = clock([100.0, 0.01] + [0.01, 0.01, 0.01] + [0.02, 0.02, 0.02])
    seconds, spread = bench_common.timed(fake.step, repeats=2, rep_s=0.03)
    assert fake.calls == 8
    assert seconds == pytest.approx(0.015) and spread == pytest.approx(0.01 / 0.015)


def test_seconds_per_step_is_the_mean_after_the_warm_up(clock):
    fake = clock([50.0, 40.0, 1.0, 2.0, 6.0])
    assert bench_common.seconds_per_step(fake.step, 2, 3) == pytest.approx(3.0)
    assert fake.calls == 5


SMOKE_CASE = "smoke_decode_b2_s512_gqa4x2_d64"


def test_kernel_bench_smoke_row_json_and_report(tmp_path, capsys):
    """One decode row (the XLA implementation, checked against its float32 reference), the copy ceiling, the JSON
    file rewritten after every row, and the markdown report of every part."""
    from experiments.bench_kernels.__main__ import main
    out = tmp_path / "bench.json"
    main(["--smoke", "--only", f"{SMOKE_CASE}/attnzoo_xla", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["env"]["smoke"] is True and result["env"]["backend"] == "cpu"
    assert [row["part"] for row in result["rows"]] == ["ceiling", "decode", "done"]
    decode = result["rows"][1]
    assert (decode["case"], decode["impl"], decode["status"]) == (SMOKE_CASE, "attnzoo_xla", "ok")
    assert decode["err"] < bench_common.FWD_TOL
    printed = capsys.readouterr().out
    assert f"| {SMOKE_CASE} | attnzoo_xla | {decode['us']:.1f} |" in printed
    for heading in ("## Flash attention", "## Block-sparse attention", "## Chunked linear attention", "## Decode"):
        assert heading in printed
    assert f"copy ceiling this run: {result['rows'][0]['tbps']:.2f} TB/s" in printed


@pytest.mark.slow
def test_kernel_bench_runs_as_the_command_line_of_gpu_checks(tmp_path):
    """`python experiments/bench_kernels ...` from the repository root, as gpu_checks.sh and BENCHMARKS.md run it."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "experiments/bench_kernels", "--smoke", "--only", f"{SMOKE_CASE}/attnzoo_xla", "--out",
         str(out)], cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["part"] for row in json.loads(out.read_text())["rows"]] == ["ceiling", "decode", "done"]


@pytest.fixture
def recorded_runs(monkeypatch):
    """The timed runs of each alternating measurement of the CPU scripts ({name: run}, in call order), timed once."""
    calls, alternating_seconds = [], bench_common.alternating_seconds

    def record(runs, repeats, warmup):
        calls.append({name: run for name, run in runs.items() if not name.endswith(", then a pause")})
        return alternating_seconds(runs, repeats=1, warmup=1)
    monkeypatch.setattr(bench_common, "alternating_seconds", record)
    return calls


def assert_cotangent_is_an_argument(run, position: int):
    """A timed forward + backward run is the jitted function applied to its arguments, the cotangent among them at
    `position`: no array of its shape is a constant of the traced function, and doubling it doubles the loss and
    the gradients."""
    d_out = run.args[position]
    assert all(np.shape(c) != d_out.shape for c in run.func.trace(*run.args).jaxpr.consts)
    doubled = list(run.args)
    doubled[position] = 2 * d_out
    (loss, grads), (loss2, grads2) = run(), run.func(*doubled)
    np.testing.assert_allclose(loss2, 2 * loss, rtol=1e-5)
    np.testing.assert_allclose(grads2[0], 2 * grads[0], rtol=1e-5, atol=1e-6)


def test_bench_scan_times_fwd_bwd_with_the_cotangent_as_argument_against_named_baselines(recorded_runs):
    from experiments import bench_scan
    result = bench_scan.training_result(1, 16, 1, 4, with_triton=False, repeats=1, settle_s=0.0)
    (runs,) = recorded_runs
    for run in runs.values():  # (q, k, v, g, d_out)
        assert_cotangent_is_an_argument(run, position=4)
    rows = {row["name"]: row for row in result["rows"]}
    assert result["baselines"] == [bench_scan.SEQUENTIAL, bench_scan.ASSOCIATIVE]
    assert set(rows) == {bench_scan.CHUNKED_XLA, *result["baselines"]}
    for row in rows.values():
        assert row["rel_err_vs_sequential"] < 1e-5  # every row computes the same recurrence
        assert set(row["speed_vs"]) == set(result["baselines"])
        seconds, base_seconds = row["seconds"][0], rows[bench_scan.SEQUENTIAL]["seconds"][0]
        assert row["speed_vs"][bench_scan.SEQUENTIAL]["median"] == pytest.approx(base_seconds / seconds)


def test_bench_block_sparse_has_the_like_for_like_baselines_and_passes_the_cotangent(recorded_runs):
    from experiments import bench_block_sparse as bbs
    rows = bbs.contenders(seq=64, block=16, ks=[2], heads_q=2, heads_kv=1)
    assert list(rows)[:3] == [bbs.ALL_BLOCKS, bbs.DENSE_CHUNKED, bbs.DENSE_XLA]
    ids, counts = rows[bbs.ALL_BLOCKS]["lists"]
    np.testing.assert_array_equal(counts[0, 0], [1, 2, 3, 4])  # every causal block listed, the diagonal included
    np.testing.assert_array_equal(ids[0, 0, 3], [0, 1, 2, 3])
    assert rows[bbs.ALL_BLOCKS]["sparsity"] == 0.0 and rows["block_sparse xla, k=2"]["sparsity"] == 1 - 1.75 / 2.5
    q, d_out = (jax.random.normal(jax.random.key(i), (1, 64, 2, 64)) for i in (0, 1))
    k, v = (jax.random.normal(jax.random.key(i), (1, 64, 1, 64)) for i in (2, 3))
    timed = bbs.timed_rows(rows, q, k, v, d_out, repeats=1, settle_s=0.0)
    forward_runs, backward_runs = recorded_runs
    np.testing.assert_allclose(forward_runs[bbs.ALL_BLOCKS](), forward_runs[bbs.DENSE_XLA](), rtol=1e-5, atol=1e-5)
    for run in backward_runs.values():  # (q, k, v, d_out, *lists)
        assert_cotangent_is_an_argument(run, position=3)
    sparse = {r["pass"]: r for r in timed if r["name"] == "block_sparse xla, k=2"}
    assert set(sparse) == {"fwd", "fwd+bwd"}
    assert sparse["fwd"]["ideal_vs"] == {bbs.ALL_BLOCKS: 2.0, bbs.DENSE_CHUNKED: 2.0, bbs.DENSE_XLA: 2.0}
    base = next(r for r in timed if r["pass"] == "fwd" and r["name"] == bbs.DENSE_CHUNKED)
    assert sparse["fwd"]["speed_vs"][bbs.DENSE_CHUNKED]["median"] == pytest.approx(
        base["seconds"][0] / sparse["fwd"]["seconds"][0])


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_scan", "bench_block_sparse"])
def test_cpu_bench_smoke_writes_ratios_against_named_baselines(script, tmp_path, capsys):
    import importlib
    module = importlib.import_module(f"experiments.{script}")
    out = tmp_path / "result.json"
    module.main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["training"]["rows"] if script == "bench_scan" else result["rows"]
    baselines = result["training"]["baselines"] if script == "bench_scan" else result["baselines"]
    assert set(baselines) <= {row["name"] for row in rows}
    assert all(set(row["speed_vs"]) == set(baselines) for row in rows)
    printed = capsys.readouterr().out
    assert all(f"vs {base}" in printed for base in baselines)


def test_settled_alternating_seconds_pauses_untimed_after_each_run(clock, monkeypatch):
    fake, calls = clock([10.0, 20.0, 1.0, 2.0, 3.0, 4.0]), []  # warm-up a, b; then repeats (a, b) x 2
    monkeypatch.setattr(bench_common.time, "sleep", lambda s: calls.append(("pause", s)))

    def run(name):
        def call():
            calls.append(name)
            fake.step()
        return call
    seconds = bench_common.settled_alternating_seconds({"a": run("a"), "b": run("b")}, repeats=2, warmup=1,
                                                       settle_s=0.5)
    assert seconds == {"a": [1.0, 3.0], "b": [2.0, 4.0]}
    pause = ("pause", 0.5)
    assert calls == ["a", pause, "b", pause] + ["a", pause, "b", pause] * 2
