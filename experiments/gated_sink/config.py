"""The study as data: GQA against gated attention (the paper's G1 elementwise and headwise gates) and the paper's
controls that keep most of the sink (G1 head-shared, G2 on the values, NS-sigmoid, an input-independent gate).

Qiu et al., arXiv 2505.06708, Table 1 (15B MoE, 400B tokens): first-token attention share 0.467 (baseline) ->
0.048 (G1 elementwise), 0.073 (headwise), 0.301 (head-shared), 0.297 (G2), 0.451 (NS-sigmoid), 0.364
(input-independent); M-Act 1053 -> 94. The gate changes the sink through training dynamics only, so each variant
is trained from scratch on the same data and budget. `smoke` checks the pipeline in seconds; `cpu` is a short
run on a 2-core CPU (about 2 minutes per variant).

As in the paper's models, every arm has QK-norm (the gated mixers' default; the baseline asks for it) and the arms
are parameter-matched the paper's way: each gated arm's FFN is narrowed to pay for its gate. A gate of width w
(its D x w weight) costs w / 3 SwiGLU hidden units (3 D weights each), so a gated arm's mlp_hidden is the
baseline's minus round(w / 3); every arm's total then lies within 1% of the baseline's (the rounding leaves at most
D parameters per layer; tests/test_gated_sink_config.py checks it). Both scales share d_model, so the widths fit
both.
"""

from attnzoo.train import TrainConfig
from experiments.study import Scale, Study, Variant

# mlp_hidden: the baseline's SwiGLU width (the model's default at d_model 64); gated arms narrow it.
SHAPE = dict(n_layers=4, n_heads=4, n_kv_heads=2, d_model=64, mlp_hidden=192)
LAYERS = SHAPE["n_layers"]
HEAD_DIM = SHAPE["d_model"] // SHAPE["n_heads"]


def gated(name: str, plan: str, label: str, gate_width: int) -> Variant:
    """A gated arm whose FFN is narrowed by the gate's cost: gate_width / 3 hidden units per layer."""
    return Variant(name, plan, label, model={"mlp_hidden": SHAPE["mlp_hidden"] - round(gate_width / 3)})


STUDY = Study(
    name="gated_sink",
    variants=(
        Variant("baseline", "gqa(qk_norm=true)*4", "baseline (GQA)"),
        # Gate widths: G1 per query head and channel (H E), headwise one per head (H), head-shared one per channel
        # (E), G2 per kv head and channel (K E); the input-independent gate has no D x w weight (its H E logits
        # are below the matching's resolution).
        gated("g1-elementwise", "gated*4", "G1 elementwise", SHAPE["n_heads"] * HEAD_DIM),
        gated("g1-headwise", "gated_headwise*4", "G1 headwise", SHAPE["n_heads"]),
        gated("g1-head-shared", "gated(head_specific=false)*4", "G1 head-shared", HEAD_DIM),
        gated("g2-elementwise", "gated(position=G2)*4", "G2 (values) elementwise", SHAPE["n_kv_heads"] * HEAD_DIM),
        gated("g1-ns-sigmoid", "gated(activation=ns_sigmoid)*4", "G1 NS-sigmoid", SHAPE["n_heads"] * HEAD_DIM),
        gated("g1-input-independent", "gated(input_dependent=false)*4", "G1 input-independent", 0),
    ),
    scales={
        "smoke": Scale(model=dict(SHAPE, max_seq_len=64),
                       training=TrainConfig(steps=3, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1,
                                            eval_every=3, eval_batches=1, ckpt_every=3, log_every=1)),
        "cpu": Scale(model=dict(SHAPE, max_seq_len=128),
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
