"""MHA vs GQA vs MQA vs sliding-window GQA: validation loss against KV-cache bytes per token and parameters.

    python experiments/compare_attention/run.py --scale smoke --out /tmp/compare   # seconds: checks the pipeline
    python experiments/compare_attention/run.py --scale cpu --seeds 0 1 2          # the comparison, on a CPU

Writes OUT/results.csv, OUT/results.md and OUT/compare_attention.png (loss vs KV cache, loss vs parameters;
error bars over seeds). Rerunning into the same OUT reuses finished runs; see experiments/README.md.
"""

import sys
from pathlib import Path

if not __package__:  # run as a file: import `experiments` from this checkout (it is not installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib.pyplot as plt  # noqa: E402

from experiments.compare_attention.config import STUDY  # noqa: E402
from experiments.study import StudyResults, main as study_main, run_study, scatter_metric, separate_labels  # noqa: E402


def plot_tradeoffs(rows, caption: str):
    """Validation loss against KV-cache bytes per token (left) and against parameters (right)."""
    fig, (kv_ax, params_ax) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    scatter_metric(kv_ax, rows, "kv_cache_bytes_per_token")
    scatter_metric(params_ax, rows, "params")
    kv_ax.set_xlabel("KV-cache bytes per token")
    params_ax.set_xlabel("parameters")
    kv_ax.set_ylabel("validation loss (nats/token)")
    fig.suptitle(caption, fontsize=10)
    fig.tight_layout()
    for ax in (kv_ax, params_ax):
        separate_labels(ax)  # after the layout, which moves the points
    return fig


REPORTS = {"compare_attention.png": plot_tradeoffs}


def run(scale: str, out, **options) -> StudyResults:
    """The study at `scale` into `out`; options as for experiments.study.run_study (seeds, progress, echo)."""
    return run_study(STUDY, scale, out, reports=REPORTS, **options)


def main(argv=None) -> int:
    return study_main(STUDY, argv, reports=REPORTS, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
