"""The kernel benchmark's command line: `python experiments/bench_kernels [--smoke] [--only ...] --out FILE`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # a checkout

from experiments import bench_kernels  # noqa: E402
from experiments.bench_common import Bench  # noqa: E402
from experiments.bench_kernels import (  # noqa: E402
    block_sparse_attention,
    chunked_linear_attention,
    decode_attention,
    flash_attention,
)

warnings.filterwarnings("ignore", category=DeprecationWarning)  # Triton backend and ops.gpu deprecations


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="bench_kernels", description=bench_kernels.__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode: runs on a CPU")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_results.json"))
    parser.add_argument("--only", default=None, help="comma-separated substrings of 'case/impl' to run")
    parser.add_argument("--budget-s", type=float, default=385.0, help="wall-clock budget for the whole run")
    parser.add_argument("--decode-reserve-s", type=float, default=85.0, help="budget kept back for decode")
    parser.add_argument("--block-sparse-s", type=float, default=105.0,
                        help="budget kept back from flash for the block-sparse part")
    parser.add_argument("--linear-s", type=float, default=70.0,
                        help="budget kept back from flash and block-sparse for the chunked linear attention part")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rep-s", type=float, default=0.03, help="target seconds per timed repetition")
    args = parser.parse_args(argv)
    bench = Bench(args)
    print(json.dumps(bench.env()), flush=True)

    def cases(op):
        return op.SMOKE_CASES if args.smoke else op.CASES

    # Each part keeps back the shares of the parts after it; time a part leaves unused carries on to the next.
    for part in (lambda: decode_attention.ceiling(bench),
                 lambda: flash_attention.run(bench, cases(flash_attention),
                                             args.decode_reserve_s + args.linear_s + args.block_sparse_s),
                 lambda: block_sparse_attention.run(bench, cases(block_sparse_attention),
                                                    args.decode_reserve_s + args.linear_s),
                 lambda: chunked_linear_attention.run(bench, chunked_linear_attention.linear_cases(args.smoke),
                                                      args.decode_reserve_s),
                 lambda: decode_attention.run(bench, cases(decode_attention))):
        try:
            part()
        except Exception:
            bench.record(dict(part="error", traceback=traceback.format_exc()[-1500:]))
    bench.record(dict(part="done", elapsed_s=round(time.perf_counter() - bench.t_start, 1)))
    print("\n".join(line for op in (flash_attention, block_sparse_attention, chunked_linear_attention,
                                    decode_attention) for line in op.report(bench.rows)))


if __name__ == "__main__":
    main()
