"""Train any list of layer plans on the same data, tokens and budget (several seeds), and compare them: validation
loss (mean ± std over seeds), KV-cache bytes per token, parameters, FLOPs per token and tokens/s, with plots of
loss against KV cache (the Pareto frontier) and against parameters, and the training-loss curves.

    python experiments/compare/run.py --scale smoke --out /tmp/compare                # seconds: the pipeline
    python experiments/compare/run.py --scale cpu --seeds 0 1                         # MHA/GQA/MQA/MLA/CCA/CCGQA
    python experiments/compare/run.py --scale cpu --plans "gqa*4" "mamba2[mlp=none]*3,gqa" --model d_model=96 \\
        --train steps=300 lr=1e-3

Each run is cached under OUT/runs/<plan>-<digest>-s<seed>, the digest covering the resolved model config (plan
included), the training config and the data's fingerprint: rerunning with more plans, seeds or another scale into
the same OUT (default runs/compare, shared with experiments/compare_zoo and the notebooks) trains only what is new,
and an interrupted run resumes from its latest checkpoint. Writes OUT/results.csv, OUT/results.md,
OUT/frontier.png and OUT/loss_curves.png for the plans of this invocation.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

if not __package__:  # run as a file: import `experiments` from this checkout (it is not installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attnzoo import parse_plan  # noqa: E402
from attnzoo.registry import type_problem  # noqa: E402
from attnzoo.data import ByteTokenizer, load_corpus  # noqa: E402
from attnzoo.train import TrainConfig  # noqa: E402
from experiments.compare.config import SCALES  # noqa: E402
from experiments.study import (RUNS_DIR, Scale, Study, StudyConfigError, StudyResults, Variant,  # noqa: E402
                               add_stale_argument, cache_dir, run_command, run_study)

DEFAULT_OUT = Path("runs") / "compare"
# The KV-cache frontier of the attention zoo: full heads, grouped, one kv head, latent, compressed convolutional.
FRONTIER_PLANS = ("mha*4", "gqa*4", "mqa*4", "mla*4", "cca*4", "ccgqa*4")
FRONTIER_PNG, LOSS_CURVES_PNG = "frontier.png", "loss_curves.png"


def plan_slug(plan: str) -> str:
    """A directory-safe name for a plan: 'mamba2[mlp=none]*3,gqa' -> 'mamba2-mlp-none-x3-gqa'."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", plan.replace("*", "x").replace(",", "_")).strip("-_.")
    return slug[:60] or "plan"


def with_overrides(scale: Scale, model: Mapping[str, Any] | None = None,
                   training: Mapping[str, Any] | None = None) -> Scale:
    """`scale` with some ModelConfig fields and TrainConfig fields changed (a StudyConfigError names a bad one;
    model fields are checked when the plans' configs are built)."""
    allowed = [field.name for field in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(training or {}) - set(allowed))
    if unknown:
        raise StudyConfigError(f"--train: TrainConfig has no field {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    hints = typing.get_type_hints(TrainConfig)
    for key, value in (training or {}).items():
        problem = type_problem(value, hints[key])
        if problem:
            raise StudyConfigError(f"--train: {key}={value!r} {problem}")
    try:
        new_training = scale.training.replace(**(training or {}))
    except ValueError as error:
        raise StudyConfigError(f"--train: {error}") from None
    return dataclasses.replace(scale, model={**scale.model, **(model or {})}, training=new_training)


def data_identity(data: str | Sequence[str], out: Path) -> dict[str, str]:
    """What the cache key records of the data: the corpus name and content fingerprint, and the tokenizer."""
    try:
        corpus = load_corpus(data, cache_dir(out))
    except ValueError as error:
        raise StudyConfigError(f"data: {error}") from None
    return {"name": corpus.name, "fingerprint": corpus.fingerprint, "tokenizer": ByteTokenizer().identity}


def keyed_study(name: str, variants: Sequence[Variant], scale_name: str, scale: Scale,
                data: str | tuple[str, ...] = "stdlib", out: str | Path = "") -> Study:
    """A one-scale Study whose variants are named <plan>-<digest> of their resolved model config, the training
    config and the data, so that run directories never mix settings and every tool writing into one OUT (this
    command, compare_zoo, the notebooks) reuses the others' runs of the same plan and settings."""
    sized = [dataclasses.replace(variant, model={"n_layers": _layer_count(variant), **variant.model})
             for variant in variants]
    layers = scale.model.get("n_layers")
    if layers is not None and any(variant.model["n_layers"] != layers for variant in sized):
        mismatched = ", ".join(f"{v.plan!r} has {v.model['n_layers']}" for v in sized if v.model["n_layers"] != layers)
        raise StudyConfigError(f"model field n_layers={layers}: a comparison takes each plan's own layer count "
                               f"({mismatched}); write the plans with {layers} layers instead")
    study = Study(name=name, variants=tuple(sized), scales={scale_name: scale}, data=data)
    study.check(ByteTokenizer().vocab_size)  # every plan's config, before any digest or data
    identity = data_identity(data, Path(out or DEFAULT_OUT))
    keyed = []
    for variant in sized:
        model = study.model_config(scale_name, variant, ByteTokenizer().vocab_size).to_dict()
        request = json.dumps({"model": model, "train": scale.training.to_dict(), "data": identity}, sort_keys=True)
        digest = hashlib.sha256(request.encode()).hexdigest()[:8]
        keyed.append(dataclasses.replace(variant, name=f"{plan_slug(model['plan'])}-{digest}"))
    return dataclasses.replace(study, variants=tuple(keyed))


def _layer_count(variant: Variant) -> int:
    try:
        return len(parse_plan(variant.plan))
    except ValueError as error:
        raise StudyConfigError(f"variant {variant.name}: {error}") from None


def reports_for(out: Path, groups: Mapping[str, str] | None = None) -> dict[str, Callable]:
    """The comparison's plots (experiments/compare/reports.py); `groups` maps a variant's name to its family."""
    from experiments.compare.reports import plot_frontier, plot_loss_curves

    return {FRONTIER_PNG: lambda rows, caption: plot_frontier(rows, caption, groups),
            LOSS_CURVES_PNG: lambda rows, caption: plot_loss_curves(out, rows, caption, groups)}


def share_runs(out: Path, cache: Path) -> None:
    """Make OUT/runs the run cache CACHE/runs (a symlink), so that a comparison writes its results files into
    its own OUT while its runs are shared with every other comparison using that cache."""
    target = (cache / RUNS_DIR).resolve()
    link = out / RUNS_DIR
    if link.resolve() == target:  # already linked, or OUT is the cache itself
        return
    if link.exists() or link.is_symlink():
        raise StudyConfigError(f"{link} already holds other runs than the run cache {target}; choose another "
                               f"--out or --cache")
    target.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)


def compare(variants: Sequence[Variant | str], scale_name: str, out: str | Path = DEFAULT_OUT, *,
            cache: str | Path | None = None, scale: Scale | None = None, name: str = "compare",
            data: str | tuple[str, ...] = "stdlib", seeds: Sequence[int] | None = None,
            groups: Mapping[str, str] | None = None,
            reports: Mapping[str, Callable] | None = None, plots: bool = True, progress: bool = True,
            stale: str = "error", echo: Callable[[str], None] = print) -> StudyResults:
    """Train (or reuse from `out`) every variant (a Variant or a plan string) at scale `scale_name` (one of
    SCALES, or any name with `scale` given), then write results.csv / results.md / frontier.png /
    loss_curves.png for these variants into `out`. cache: the directory whose runs/ holds the runs (default
    `out` itself); `out`/runs then links to it.

    groups: variant name -> family, for the plots' colours. reports: more reports, as experiments.study.run_study
    takes them (their rows' "variant" is the run directory's <plan>-<digest>); plots=False: only those.
    stale: a cached run made by other code, as experiments.study.run_study takes it.
    Raises StudyConfigError for a bad plan or setting before anything is trained, RunDirError when a run
    directory holds other settings.
    """
    if scale is None and scale_name not in SCALES:
        raise StudyConfigError(f"scale {scale_name!r} is not one of {', '.join(SCALES)}")
    variants = [Variant(plan_slug(v), v, v) if isinstance(v, str) else v for v in variants]
    study = keyed_study(name, variants, scale_name, scale or SCALES[scale_name], data, out)
    keyed_groups = {keyed.name: groups.get(variant.name, "other")
                    for variant, keyed in zip(variants, study.variants)} if groups else None
    out = Path(out)
    if cache is not None:
        share_runs(out, Path(cache))
    return run_study(study, scale_name, out, seeds=seeds, progress=progress, echo=echo, stale=stale,
                     reports={**(reports_for(out, keyed_groups) if plots else {}), **(reports or {})})


def parse_assignments(items: Sequence[str], flag: str) -> dict[str, Any]:
    """['d_model=96', 'lr=1e-3', 'qk_norm=true'] -> {'d_model': 96, 'lr': 0.001, 'qk_norm': True} (JSON values,
    else strings)."""
    fields = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise StudyConfigError(f"{flag}: {item!r} is not KEY=VALUE")
        try:
            fields[key] = json.loads(text)
        except json.JSONDecodeError:
            fields[key] = text
    return fields


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="experiments/compare/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", nargs="+", default=list(FRONTIER_PLANS), help="layer plans to compare")
    parser.add_argument("--labels", nargs="+", help="a label per plan for tables and plots (default: the plan)")
    parser.add_argument("--scale", required=True, choices=list(SCALES), help="model width, data and schedule")
    parser.add_argument("--model", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="ModelConfig fields on top of the scale's, e.g. d_model=96 n_kv_heads=1")
    parser.add_argument("--train", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="TrainConfig fields on top of the scale's, e.g. steps=400 lr=1e-3")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of every plan (default: the scale's)")
    parser.add_argument("--data", nargs="+", default=["stdlib"], help="'stdlib' or text files / directories")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"results, and the run cache unless --cache is "
                                                              f"given (default {DEFAULT_OUT})")
    parser.add_argument("--cache", help="keep the runs in CACHE/runs instead (OUT/runs links there)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while training")
    add_stale_argument(parser)
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.plans):
        parser.error(f"--labels: give one label per plan ({len(args.plans)}), got {len(args.labels)}")
    import matplotlib

    matplotlib.use("Agg")  # the command only writes image files
    labels = args.labels or args.plans
    variants = [Variant(plan_slug(plan), plan, label) for plan, label in zip(args.plans, labels)]
    data = "stdlib" if args.data == ["stdlib"] else tuple(args.data)
    try:
        scale = with_overrides(SCALES[args.scale], parse_assignments(args.model, "--model"),
                               parse_assignments(args.train, "--train"))
    except StudyConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    scale_name = args.scale + (" (with --model / --train changes)" if args.model or args.train else "")
    return run_command(parser, Path(args.out), lambda: compare(variants, scale_name, args.out, cache=args.cache,
                                                               scale=scale, data=data, seeds=args.seeds,
                                                               progress=not args.no_progress,
                                                               stale=args.stale))


if __name__ == "__main__":
    sys.exit(main())
