"""What the benchmark scripts share: timing (median and spread, or the mean of a stateful step), the relative error
of an output against its reference, markdown cells, the device header, and `Bench`, the budgeted harness of the
kernel benchmark (rows recorded as they are measured, a killed run keeps what it measured).

Every timing blocks on the result (`jax.block_until_ready`) and excludes compilation: the first call compiles.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

FWD_TOL, GRAD_TOL = 2e-2, 5e-2  # relative L2 error for bf16 operands (expected 1e-3 .. 1e-2)
MAX_ITERS = 50  # back-to-back calls per repetition at most (rep_s mode)


class Timing(NamedTuple):
    seconds: float  # median seconds per call over the repetitions
    spread: float  # (max - min) / median over the repetitions


def timed(fn, *args, repeats: int = 3, rep_s: float | None = None) -> Timing:
    """Median seconds per call of `fn(*args)` over `repeats` repetitions, after one compiling call.

    rep_s None: each repetition is one call. Otherwise one warm call is measured first and each repetition runs
    back-to-back as many calls (1 .. MAX_ITERS) as fill about rep_s seconds, closed by one block_until_ready, so that
    a microsecond kernel is not timed by the host's dispatch and sync (rep_s=0: one call)."""
    jax.block_until_ready(fn(*args))
    iters = 1
    if rep_s is not None:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        once = time.perf_counter() - start
        iters = int(np.clip(round(rep_s / max(once, 1e-6)), 1, MAX_ITERS))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / iters)
    median = statistics.median(times)
    return Timing(median, (max(times) - min(times)) / median)


def seconds_per_step(step, n_warmup: int, n_timed: int) -> float:
    """Mean seconds per call of `step()` (no arguments: it carries its own state, e.g. a training step feeding the
    next one its parameters) over n_timed back-to-back calls after n_warmup blocked ones. Unlike `timed`, the calls
    are not separated by a host sync, as in a training loop, and each one sees a new state, so there is no median of
    repeats of the same call."""
    for _ in range(n_warmup):
        jax.block_until_ready(step())
    start = time.perf_counter()
    for _ in range(n_timed):
        out = step()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n_timed


def alternating_seconds(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of `repeats` timed calls of each run, interleaved: repeat r calls every run once, in dict order, so
    the calls of one repeat share the machine's load. `warmup` untimed calls of each run come first (compilation).
    A run's result is blocked on (jax arrays; anything else is returned as is)."""
    for run in runs.values():
        for _ in range(warmup):
            jax.block_until_ready(run())
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            seconds[name].append(time.perf_counter() - start)
    return seconds


def speed_ratio(seconds: list[float], baseline_seconds: list[float]) -> dict[str, float]:
    """Speed relative to the baseline (> 1: faster) per repeat, paired by repeat: median, min and max."""
    ratios = [base / own for own, base in zip(seconds, baseline_seconds, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def settled_alternating_seconds(runs: dict, repeats: int, warmup: int, settle_s: float) -> dict[str, list[float]]:
    """`alternating_seconds` with an untimed pause of `settle_s` after each run. Without it, the calls just after
    one that had used GBs of memory ran slower (that memory's release, most likely): on the 2-core CPU, block-sparse
    forwards of 25-55 ms took 130-220 ms when they followed a 3 s dense one, and 25-55 ms with a 1 s pause after
    every call. Each row then also escapes its own release, which favours the rows that use the most memory."""
    with_pauses = {}
    for name, run in runs.items():
        with_pauses[name], with_pauses[f"{name}, then a pause"] = run, functools.partial(time.sleep, settle_s)
    seconds = alternating_seconds(with_pauses, repeats, warmup)
    return {name: seconds[name] for name in runs}


def summary(seconds: list[float], all_seconds: dict[str, list[float]], baselines) -> dict:
    """A row's timing from alternating runs (`all_seconds`: every row's, by name): its median seconds, the spread
    (max - min) / median, and its speed against each named baseline."""
    median = statistics.median(seconds)
    return dict(seconds=seconds, median_s=median, spread=(max(seconds) - min(seconds)) / median,
                speed_vs={base: speed_ratio(seconds, all_seconds[base]) for base in baselines})


def write_json(result: dict, path: str | None) -> None:
    """The benchmark's result as indented JSON at `path` (nothing when it is None)."""
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64; inf when x has a non-finite entry."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if not np.isfinite(x).all():
        return float("inf")
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def length_label(s: int) -> str:
    """A sequence length as case names write it: 16384 -> "16k", 256 -> "256"."""
    return f"{s // 1024}k" if s >= 1024 else str(s)


def fmt(x, spec=".0f") -> str:
    """A markdown table cell: "–" for a missing value."""
    return "–" if x is None else format(x, spec)


def status_cell(row: dict) -> str:
    """A row's status as the report's note shows it: nothing when ok."""
    return {"ok": "", "n/a": "n/a", "skipped": "skipped"}.get(row["status"], row["status"].upper())


def device_header() -> dict:
    return dict(jax=jax.__version__, backend=jax.default_backend(), device=jax.devices()[0].device_kind)


class NotApplicable(Exception):
    """The implementation does not support this case (recorded as n/a, not as a failure)."""


def case_fields(case) -> dict:
    """A case dataclass as row fields, its name as "case"."""
    fields = dataclasses.asdict(case)
    return dict(case=fields.pop("name"), **fields)


class Bench:
    """A budgeted run of parts, cases and implementations, from the command line's `args` (smoke, out, only,
    budget_s, reps, rep_s): every row is printed and the whole result rewritten to args.out as it is recorded."""

    def __init__(self, args):
        self.args, self.rows, self.t_start = args, [], time.perf_counter()
        self.deadline = self.t_start + args.budget_s
        self.only = [t for t in (args.only or "").split(",") if t]

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def share(self, cases_left: int, reserve_s: float) -> float:
        """Deadline for the next case: an equal share of what is left after `reserve_s` (unused time carries on)."""
        self.reserve_s = reserve_s
        return time.perf_counter() + (self.left() - reserve_s) / cases_left

    def prepare(self, row: dict, make, case, case_deadline: float, first: bool):
        """`make(case)` with row["status"] = "ok", or None once the row is recorded as n/a, error or skipped.

        A case's first (most important) runnable implementation runs while the part has time left; the others
        only within the case's share."""
        try:
            fn = make(case)
        except NotApplicable as e:
            self.record(dict(row, status="n/a", note=str(e)))
            return None
        except Exception as e:  # import errors etc. are a row, not the end of the run
            self.record(dict(row, status="error", note=f"{type(e).__name__}: {e}"[:300]))
            return None
        if self.left() < self.reserve_s if first else time.perf_counter() > case_deadline:
            self.record(dict(row, status="skipped", note="time budget"))
            return None
        row["status"] = "ok"
        return fn

    def wanted(self, case_name: str, impl: str) -> bool:
        return not self.only or any(t in f"{case_name}/{impl}" for t in self.only)

    def record(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        with open(self.args.out, "w") as fh:  # rewritten after every row: a killed run keeps what it measured
            json.dump(dict(env=self.env(), rows=self.rows), fh, indent=1)

    def env(self) -> dict:
        return dict(device_header(), smoke=self.args.smoke, argv=sys.argv[1:],
                    elapsed_s=round(time.perf_counter() - self.t_start, 1))

    def time(self, fn, *args) -> Timing:
        """`timed` with the run's repetitions and seconds per repetition (smoke: one call); fn is compiled already."""
        if self.args.smoke:
            return timed(fn, *args, repeats=1, rep_s=0.0)
        return timed(fn, *args, repeats=self.args.reps, rep_s=self.args.rep_s)
