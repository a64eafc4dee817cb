"""The study as data: the attention zoo (MLA, MASA, CCGQA, MoH, gated attention) beside GQA on one small decoder.

`smoke` checks the pipeline in seconds (tests, CI); `cpu` is a short comparison on a 2-core CPU (a few minutes per
run). Every plan has four layers of one variant; the width, heads and training are the scale's, so the variants
differ in parameters, KV-cache bytes and FLOPs as their papers say (see results.md).
"""

from attnzoo.train import TrainConfig
from experiments.study import Scale, Study, Variant

SHAPE = dict(n_layers=4, n_heads=4, n_kv_heads=2)

STUDY = Study(
    name="compare_zoo",
    variants=(
        Variant("gqa", "gqa*4", "GQA (2 kv heads)"),
        Variant("mla", "mla*4", "MLA"),
        Variant("masa", "masa*4", "MASA (QKVO atoms)"),
        Variant("ccgqa", "ccgqa*4", "CCGQA"),
        Variant("moh", "moh*4", "MoH"),
        Variant("gated", "gated*4", "gated (G1 elementwise)"),
    ),
    scales={
        "smoke": Scale(model=dict(SHAPE, d_model=32, max_seq_len=64),
                       training=TrainConfig(steps=4, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=1,
                                            eval_every=4, eval_batches=1, ckpt_every=4, log_every=1)),
        "cpu": Scale(model=dict(SHAPE, d_model=128),
                     training=TrainConfig(steps=300, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=30,
                                          eval_every=300, eval_batches=10, ckpt_every=100, log_every=20)),
    },
)
