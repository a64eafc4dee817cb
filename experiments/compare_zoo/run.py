"""The zoo compared: every registered mixer family (attention variants, recurrent, linear attention, hybrids) on one
small decoder, trained on the same data, tokens and budget: validation loss against KV cache and parameters.

    python experiments/compare_zoo/run.py --scale smoke --out /tmp/zoo --cache /tmp/zoo   # seconds: the pipeline
    python experiments/compare_zoo/run.py --scale cpu --seeds 0 1                          # the comparison, on a CPU
    python experiments/compare_zoo/run.py --scale cpu --families attention hybrid --exclude mamba

Runs go through experiments/compare, cached per plan, config, data fingerprint and seed in --cache (default
runs/compare, shared with that command and the notebooks), so a rerun trains only what is new. Writes into --out
(default runs/compare_zoo-<scale>) results.csv, results.md, frontier.png (loss vs KV cache with the Pareto
frontier, loss vs parameters; colours by family), loss_curves.png and zoo_by_family.md. The variants are declared
in config.py (FAMILIES).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a file: import `experiments` from this checkout (it is not installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attnzoo.data import ByteTokenizer  # noqa: E402
from attnzoo.train import RunDirError  # noqa: E402
from experiments.compare.run import DEFAULT_OUT, compare  # noqa: E402
from experiments.compare_zoo.config import FAMILIES, FAMILY_OF, STUDY, zoo_variants  # noqa: E402
from experiments.study import (StudyConfigError, StudyResults, add_stale_argument, markdown_table,  # noqa: E402
                               run_command)

FAMILY_TABLE = "zoo_by_family.md"


def family_table(family_of_label: dict[str, str]):
    """A report: results.md's table split by family, each sorted by validation loss."""
    def report(rows, caption: str) -> str:
        sections = [f"# {caption}\n"]
        for family in dict.fromkeys(family_of_label.values()):
            members = sorted((row for row in rows if family_of_label.get(row["label"]) == family),
                             key=lambda row: row["val_loss_mean"])
            if members:
                sections.append(f"## {family}\n\n{markdown_table(members)}\n")
        return "\n".join(sections)
    return report


def run(scale: str, out=None, *, cache=DEFAULT_OUT, families=None, exclude=(), **options) -> StudyResults:
    """The zoo (optionally some `families`, without the variants named in `exclude`) at `scale`: results into
    `out` (default runs/compare_zoo-<scale>), runs into the shared cache `cache` (None: `out` itself); options as
    for experiments.compare.run.compare (seeds, progress, echo)."""
    out = Path(out or Path("runs") / f"compare_zoo-{scale}")
    STUDY.check(ByteTokenizer().vocab_size)  # every variant at every scale, before anything runs
    unknown = sorted(set(families or ()) - set(FAMILIES)) + sorted(set(exclude) - set(FAMILY_OF))
    if unknown:
        raise StudyConfigError(f"{', '.join(unknown)}: not a family ({', '.join(FAMILIES)}) or a variant of the "
                               f"zoo ({', '.join(FAMILY_OF)})")
    chosen = [v for v in STUDY.variants
              if (families is None or FAMILY_OF[v.name] in families) and v.name not in exclude]
    if not chosen:
        raise StudyConfigError("no variant left to compare")
    echo = options.get("echo", print)
    trained = []
    for variant in chosen:  # one at a time: a mixer still being written fails alone, the zoo goes on
        try:
            compare([variant], scale, out, cache=cache, name="compare_zoo", plots=False, **options)
            trained.append(variant)
        except (StudyConfigError, RunDirError):
            raise
        except Exception as error:  # noqa: BLE001 - reported, and the variant is left out of the results
            echo(f"zoo: {variant.name} ({variant.plan}) failed and is left out: {type(error).__name__}: {error}")
    if not trained:
        raise StudyConfigError("every variant failed to train")
    labels = {v.label: FAMILY_OF[v.name] for v in trained}
    return compare(trained, scale, out, cache=cache, name="compare_zoo", groups=FAMILY_OF,
                   reports={FAMILY_TABLE: family_table(labels)}, **options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="experiments/compare_zoo/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", required=True, choices=list(STUDY.scales), help="the comparison's size")
    parser.add_argument("--out", help="results (default runs/compare_zoo-<scale>)")
    parser.add_argument("--cache", default=str(DEFAULT_OUT), help=f"the run cache shared with experiments/compare "
                                                                  f"and the notebooks (default {DEFAULT_OUT})")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of every variant (default: the scale's)")
    parser.add_argument("--families", nargs="+", help=f"only these families ({', '.join(FAMILIES)})")
    parser.add_argument("--exclude", nargs="+", default=[], help="leave out these variants (config.py names)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while training")
    add_stale_argument(parser)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # the command only writes image files
    zoo_variants(echo=print)  # say which declared variants this checkout cannot run
    return run_command(parser, Path(args.cache), lambda: run(args.scale, args.out, cache=args.cache,
                                                             families=args.families, exclude=args.exclude,
                                                             seeds=args.seeds, progress=not args.no_progress,
                                                             stale=args.stale))


if __name__ == "__main__":
    sys.exit(main())
