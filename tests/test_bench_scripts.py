"""The benchmark scripts' shared timing (experiments/bench_common.py) and the kernel benchmark's command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
