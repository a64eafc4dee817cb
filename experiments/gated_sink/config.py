"""The study as data: GQA against gated attention (the paper's G1 elementwise and headwise gates) and the paper's
controls that keep most of the sink (G1 head-shared, G2 on the values, NS-sigmoid, an input-independent gate).

Qiu et al., arXiv 2505.06708, Table 1 (15B MoE, 400B tokens): first-token attention share 0.467 (baseline) ->
0.048 (G1 elementwise), 0.073 (headwise), 0.301 (head-shared), 0.297 (G2), 0.451 (NS-sigmoid), 0.364
(input-independent); M-Act 1053 -> 94. The gate changes the sink through training dynamics only, so each variant
is trained from scratch on the same data and budget. `smoke` checks the pipeline in seconds; `cpu` is a short
run on a 2-core CPU (about 2 minutes per variant).
"""

from attnzoo.train import TrainConfig
from experiments.study import Scale, Study, Variant

SHAPE = dict(n_layers=4, n_heads=4, n_kv_heads=2)
LAYERS = SHAPE["n_layers"]

STUDY = Study(
    name="gated_sink",
    variants=(
        Variant("baseline", "gqa*4", "baseline (GQA)"),
        Variant("g1-elementwise", "gated*4", "G1 elementwise"),
        Variant("g1-headwise", "gated_headwise*4", "G1 headwise"),
        Variant("g1-head-shared", "gated(head_specific=false)*4", "G1 head-shared"),
        Variant("g2-elementwise", "gated(position=G2)*4", "G2 (values) elementwise"),
        Variant("g1-ns-sigmoid", "gated(activation=ns_sigmoid)*4", "G1 NS-sigmoid"),
        Variant("g1-input-independent", "gated(input_dependent=false)*4", "G1 input-independent"),
    ),
    scales={
        "smoke": Scale(model=dict(SHAPE, d_model=32, max_seq_len=64),
                       training=TrainConfig(steps=3, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1,
                                            eval_every=3, eval_batches=1, ckpt_every=3, log_every=1)),
        "cpu": Scale(model=dict(SHAPE, d_model=64, max_seq_len=128),
                     training=TrainConfig(steps=300, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=30,
                                          eval_every=300, eval_batches=16, ckpt_every=300, log_every=10)),
    },
)

# The paper's Table 1 numbers for the variants above (F-Attn, M-Act, gate mean; None: not reported).
PAPER = {
    "baseline": (0.467, 1053, None),
    "g1-elementwise": (0.048, 94, 0.116),
    "g1-headwise": (0.073, 98, 0.172),
    "g1-head-shared": (0.301, 286, 0.271),
    "g2-elementwise": (0.297, 125, 0.221),
    "g1-ns-sigmoid": (0.451, 892, 0.653),
    "g1-input-independent": (0.364, 471, 0.335),
}
