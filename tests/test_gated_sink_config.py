"""The gated-sink study's arms as the paper runs them: QK-norm in every arm, and total parameters matched to the
baseline's (each gated arm's FFN narrowed by its gate's cost), at every scale."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from attnzoo import LanguageModel
from experiments.gated_sink.config import STUDY

VOCAB = 259  # the study's byte tokenizer


def n_params(config) -> int:
    abstract = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("scale", sorted(STUDY.scales))
def test_every_arm_has_qk_norm_and_the_baselines_parameter_count(scale):
    baseline, *gated = STUDY.variants
    base_config = STUDY.model_config(scale, baseline, VOCAB)
    base = n_params(base_config)
    for variant in STUDY.variants:
        config = STUDY.model_config(scale, variant, VOCAB)
        assert all(options.qk_norm for options in config.layer_options), variant.name
        assert n_params(config) == pytest.approx(base, rel=0.01), variant.name
    # The gated arms pay for their gates with a narrower FFN; the baseline keeps the model's default width.
    assert base_config.mlp_hidden == base_config.replace(mlp_hidden=None).mlp_width
    elementwise = STUDY.model_config(scale, gated[0], VOCAB)
    assert elementwise.mlp_hidden < base_config.mlp_hidden
