"""The study as data: four attention plans on one small decoder, at two scales.

`smoke` checks the pipeline in seconds (tests, CI); `cpu` is the comparison itself (the settings notebooks/01 used),
2-3 minutes per run on a 2-core CPU, about 20 minutes for its 4 variants x 2 seeds. Every plan has four layers;
the model shape and training settings are the scale's.
"""

from attnzoo.train import TrainConfig
from experiments.study import Scale, Study, Variant

SHAPE = dict(n_layers=4, n_heads=4, n_kv_heads=2)  # GQA with 2 kv heads; "mha" and "mqa" set their own

STUDY = Study(
    name="compare_attention",
    variants=(
        Variant("mha", "mha*4", "MHA"),
        Variant("gqa", "gqa*4", "GQA (2 kv heads)"),
        Variant("mqa", "mqa*4", "MQA"),
        Variant("gqa-window32", "gqa(window=32)*3,gqa", "GQA + window 32"),
    ),
    scales={
        "smoke": Scale(model=dict(SHAPE, d_model=32, max_seq_len=64),
                       training=TrainConfig(steps=4, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=1,
                                            eval_every=4, eval_batches=1, ckpt_every=4, log_every=1)),
        "cpu": Scale(model=dict(SHAPE, d_model=128),
                     training=TrainConfig(steps=400, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=40,
                                          eval_every=400, eval_batches=10, ckpt_every=100, log_every=20),
                     seeds=(0, 1)),
    },
)
