"""The study as data: Deconstructing Attention's variants (arXiv 2510.11602) in uniform and hybrid layouts.

Variants (registered mixers): Standard = `mha`; MLP `decon_mlp` (no token mixing, width matched to attention's
4 d^2 parameters); Approx `decon_approx` (the paper's separately normalised Taylor form) and Approx-joint
(Based's jointly normalised form, not in the paper); Non-apx `decon_nonapprox`; RndEmbQK `decon_rnd_emb_qk`;
FixedSeqQK `decon_fixed_seq_qk`; StaticEmbQK `decon_static_emb_qk`. Layouts: uniform (the variant in every layer)
and hybrid (the variant in the odd 1-indexed layers, Standard in the even ones); hybrid-skip is not trained: it is
each hybrid evaluated with its variant layers removed (run.py's evaluate_run). The optional `LAYOUT_STUDY` is the
paper's nine-layout ablation (Appx. P, Table 11) for Non-apx and RndEmbQK.

Scales: `smoke` (seconds, tests), `cpu` (the default grid on a 2-core CPU, one seed: 6 layers like the paper's
70M model, d_model 64, 200 steps of 16 x 128 bytes; `--seeds 0 1` doubles it), `paper-70m` (Table 10's 70M
shape: d 512, FFN 2048, 6 layers, 8 heads, MHA, sequence 2048; Table 9's optimiser: Adam 0.9 / 0.9999, peak
lr 4e-4, cosine to 0, weight decay 0.1, clip 1.0; batch 32 x 2048 and 20k steps: 1.3B tokens, a GPU-day budget
rather than the paper's 15B).
"""

from __future__ import annotations

from attnzoo.train import TrainConfig
from experiments.study import Scale, Study, Variant

N_LAYERS = 6  # the paper's 70M model; every plan has this many layers
STANDARD = "mha"
# key -> (mixer plan entry, label as in the paper's tables)
MIXERS = {
    "mlp": ("decon_mlp", "MLP"),
    "approx": ("decon_approx", "Approx."),
    "approx_joint": ("decon_approx(normalization=joint)", "Approx. (joint, Based)"),
    "nonapprox": ("decon_nonapprox", "Non-apx."),
    "rnd_emb_qk": ("decon_rnd_emb_qk", "RndEmbQK"),
    "fixed_seq_qk": ("decon_fixed_seq_qk", "FixedSeqQK"),
    "static_emb_qk": ("decon_static_emb_qk", "StaticEmbQK"),
}

# Appx. P, Table 11: the 1-indexed layers that KEEP Standard attention in a 24-layer model, as fractions of the
# depth so that they carry over to other depths (checked against Table 11 at 24 layers in the tests).
LAYOUTS = ("even", "odd", "top", "middle", "bottom", "25%", "first", "last", "bilateral")


def standard_layers(layout: str, n_layers: int) -> tuple[int, ...]:
    """The 1-indexed layers that keep Standard attention in `layout` (Table 11), for a model of `n_layers`."""
    n, half, quarter = n_layers, n_layers // 2, n_layers // 4
    by_layout = {
        "even": range(2, n + 1, 2), "odd": range(1, n + 1, 2),
        "top": range(1, half + 1), "bottom": range(half + 1, n + 1),
        "middle": [*range(1, quarter + 1), *range(n - quarter + 1, n + 1)],
        "25%": range(4, n + 1, 4), "first": [1], "last": [n], "bilateral": [1, n],
    }
    if layout not in by_layout:
        raise ValueError(f"layout={layout!r} must be one of {', '.join(LAYOUTS)}")
    return tuple(sorted(set(by_layout[layout])))


def layout_plan(mixer: str, standard: tuple[int, ...], n_layers: int = N_LAYERS) -> str:
    """A plan with Standard at the 1-indexed layers `standard` and `mixer` elsewhere."""
    if not standard:
        return f"{mixer}*{n_layers}"
    return ",".join(STANDARD if i in standard else mixer for i in range(1, n_layers + 1))


# The grid trains in this order: the paper's headline contrast first (uniform MLP / Non-apx. far worse than
# Standard, their hybrids close to it), so that an interrupted run has the runs that matter most.
FIRST = ("mlp", "nonapprox")


def main_variants() -> tuple[Variant, ...]:
    layouts = {"uniform": (), "hybrid": standard_layers("even", N_LAYERS)}
    keys = [*FIRST, *(key for key in MIXERS if key not in FIRST)]
    order = [(layout, key) for key in FIRST for layout in layouts]
    order += [(layout, key) for layout in layouts for key in keys if key not in FIRST]
    return (Variant("standard", f"{STANDARD}*{N_LAYERS}", "Standard"),
            *(Variant(f"{layout}-{key}", layout_plan(MIXERS[key][0], layouts[layout]), f"{layout} {MIXERS[key][1]}")
              for layout, key in order))


def layout_variants(keys=("nonapprox", "rnd_emb_qk")) -> tuple[Variant, ...]:
    return tuple(Variant(f"{layout.replace('%', 'pct')}-{key}", layout_plan(MIXERS[key][0],
                                                                             standard_layers(layout, N_LAYERS)),
                         f"{layout} {MIXERS[key][1]}") for key in keys for layout in LAYOUTS)


SCALES = {
    "smoke": Scale(model=dict(d_model=32, n_layers=N_LAYERS, n_heads=2, max_seq_len=32),
                   training=TrainConfig(steps=3, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=3,
                                        eval_batches=1, ckpt_every=3, log_every=1)),
    "cpu": Scale(model=dict(d_model=64, n_layers=N_LAYERS, n_heads=4, max_seq_len=128),
                 training=TrainConfig(steps=200, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=20,
                                      eval_every=200, eval_batches=8, ckpt_every=100, log_every=25)),
    "paper-70m": Scale(model=dict(d_model=512, n_layers=N_LAYERS, n_heads=8, mlp_hidden=2048, max_seq_len=2048),
                       training=TrainConfig(steps=20_000, batch_size=32, seq_len=2048, lr=4e-4, warmup_steps=2000,
                                            b2=0.9999, weight_decay=0.1, grad_clip=1.0, min_lr_ratio=0.0,
                                            eval_every=2000, eval_batches=16, ckpt_every=2000, log_every=100)),
}

STUDY = Study(name="deconstructing_attention", variants=main_variants(), scales=SCALES, data="kjv")
LAYOUT_STUDY = Study(name="deconstructing_attention_layouts", variants=layout_variants(), scales=SCALES, data="kjv")
