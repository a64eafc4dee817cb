"""The shared sizes of comparisons: every plan compared at one scale gets the same width, heads, data, tokens and
schedule (its layer count is its plan's). `experiments/compare_zoo` and the notebooks use these scales too, so
runs of one (plan, scale) are trained once and reused by all of them (results are cached per plan, model config,
training config, data fingerprint and seed: see experiments/compare/run.py).

`smoke` checks the pipeline in seconds; `cpu` is sized so that the whole zoo (about 20 plans, one seed) trains in
under 40 minutes on a busy 2-core CPU: a comparison of the mixers' early learning, not of converged models.
"""

from attnzoo.train import TrainConfig
from experiments.study import Scale

SHAPE = dict(n_heads=4, n_kv_heads=2)  # GQA with 2 kv heads; mha / mqa set their own

SCALES = {
    "smoke": Scale(model=dict(SHAPE, d_model=32, max_seq_len=64),
                   training=TrainConfig(steps=3, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=3,
                                        eval_batches=1, ckpt_every=3, log_every=1)),
    "cpu": Scale(model=dict(SHAPE, d_model=64, max_seq_len=128),
                 training=TrainConfig(steps=200, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=20,
                                      eval_every=200, eval_batches=16, ckpt_every=200, log_every=10)),
}
