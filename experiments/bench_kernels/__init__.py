"""One-shot kernel benchmark for one lent GPU (an H200): attnzoo's Pallas kernels against what JAX users have.

One module per op, each with its cases (`CASES`, `SMOKE_CASES`; the linear part: `linear_cases(smoke)`), its
implementations in priority order, `run(bench, cases, ...)` and `report(rows)`:

  flash_attention.py           flash attention against cuDNN, XLA, JAX's Pallas mha and tokamax
  block_sparse_attention.py    the block-sparse kernel against dense causal attention at 16k-64k
  chunked_linear_attention.py  chunked linear attention against associative_scan and dense flash attention
  decode_attention.py          split-K decode against jax.nn and JAX's Pallas gqa, and the copy ceiling

Every implementation is first checked against a float32 reference by ||out - ref|| / ||ref|| (the part's module
says on what); a wrong one is marked and not timed. Timing (`experiments.bench_common.timed`): compile, one warm
call, then the median over `--reps` repetitions of `iters` back-to-back calls, each repetition closed by
block_until_ready. `--budget-s` caps the run; each part keeps back the shares of the parts after it, and each case
gets an equal share of what is left. Rows are printed as JSON lines and the JSON file (env + rows) is rewritten after
each one; a markdown report follows at the end.

GPU:   python experiments/bench_kernels --out $OUT/bench.json          (~6.5 min budget, see --budget-s)
CPU:   python experiments/bench_kernels --smoke --out /tmp/bench.json  (tiny shapes, interpret mode)
(or `python -m experiments.bench_kernels ...` from the repository root)
"""
