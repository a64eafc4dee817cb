"""The attention zoo beside GQA: validation loss, parameters and KV-cache bytes per token of every variant.

    python experiments/compare_zoo/run.py --scale smoke --out /tmp/zoo   # seconds: checks the pipeline
    python experiments/compare_zoo/run.py --scale cpu --seeds 0 1        # the comparison, on a CPU

Writes OUT/results.csv, OUT/results.md and OUT/compare_zoo.png (loss vs KV cache, loss vs parameters). Rerunning
into the same OUT reuses finished runs; see experiments/README.md.
"""

import sys
from pathlib import Path

if not __package__:  # run as a file: import `experiments` from this checkout (it is not installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.compare_attention.run import plot_tradeoffs  # noqa: E402
from experiments.compare_zoo.config import STUDY  # noqa: E402
from experiments.study import main as study_main  # noqa: E402

REPORTS = {"compare_zoo.png": plot_tradeoffs}

if __name__ == "__main__":
    sys.exit(study_main(STUDY, sys.argv[1:], reports=REPORTS, description=__doc__))
