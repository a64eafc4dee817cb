"""The study as data: every mixer family of the zoo on one small decoder, at the shared comparison scales.

FAMILIES lists the variants of each family; a new mixer joins by adding its line here (a variant whose mixers
are not registered in this checkout is left out, with a note). A registered mixer of attnzoo.mixers that no
family names is added under "unlisted" as `<name>*4`, so nothing registered is silently missing from the zoo;
give it a proper line (options, label, family) when it lands. Every plan has four layers; width, heads, data and
training are the scale's (experiments/compare/config.py), shared with experiments/compare/ and the notebooks.
"""

from __future__ import annotations

from attnzoo import ModelConfig, parse_plan, registered
from attnzoo.registry import get_mixer
from experiments.compare.config import SCALES
from experiments.study import Study, Variant

FAMILIES: dict[str, tuple[Variant, ...]] = {
    "attention": (
        Variant("mha", "mha*4", "MHA"),
        Variant("gqa", "gqa*4", "GQA (2 kv heads)"),
        Variant("mqa", "mqa*4", "MQA"),
        Variant("gqa-window32", "gqa(window=32)*3,gqa", "GQA + window 32"),
        Variant("mla", "mla*4", "MLA"),
        Variant("masa", "masa*4", "MASA (QKVO atoms)"),
        Variant("cca", "cca*4", "CCA"),
        Variant("ccgqa", "ccgqa*4", "CCGQA"),
        Variant("moh", "moh*4", "MoH"),
        Variant("gated", "gated*4", "gated (G1 elementwise)"),
        Variant("gated-headwise", "gated_headwise*4", "gated (G1 headwise)"),
    ),
    "recurrent": (
        Variant("mamba", "mamba[mlp=none]*4", "Mamba"),
        Variant("mamba2", "mamba2[mlp=none]*4", "Mamba-2"),
    ),
    "linear_attention": (
        Variant("linear-attention", "linear_attention*4", "linear attention"),
        Variant("retnet", "retnet*4", "RetNet"),
        Variant("simple-gla", "simple_gla*4", "Simple GLA"),
        Variant("based", "based*4", "Based"),
        Variant("lightning", ",".join(f"lightning(layer_depth={round(i / 3, 4)})" for i in range(4)),
                "Lightning (TransNormerLLM depth-scaled decays)"),
    ),
    "hybrid": (
        Variant("mamba2-gqa", "mamba2[mlp=none]*3,gqa", "Mamba-2 x3 + GQA"),
        Variant("gla-gqa", "simple_gla*3,gqa", "Simple GLA x3 + GQA"),
    ),
}
UNLISTED = "unlisted"
MIXER_MODULE_PREFIX = "attnzoo.mixers."  # test-only mixers registered elsewhere are not part of the zoo


def mixers_of(plan: str) -> set[str]:
    return {spec.mixer for spec in parse_plan(plan)}


def zoo_variants(families: dict[str, tuple[Variant, ...]] = FAMILIES, echo=lambda _: None
                 ) -> tuple[tuple[Variant, ...], dict[str, str]]:
    """The variants of `families` whose mixers are registered, plus one `<name>*4` variant for every registered
    zoo mixer that no family names (family "unlisted", kept when its config builds at every scale). Returns the
    variants and {variant name: family}."""
    available = set(registered())
    variants, family_of = [], {}
    for family, members in families.items():
        for variant in members:
            missing = mixers_of(variant.plan) - available
            if missing:
                echo(f"zoo: {variant.name} left out: mixer {', '.join(sorted(missing))} is not registered")
                continue
            variants.append(variant)
            family_of[variant.name] = family
    named = set().union(*(mixers_of(variant.plan) for members in families.values() for variant in members))
    for name in sorted(available - named):
        if not get_mixer(name).cls.__module__.startswith(MIXER_MODULE_PREFIX):
            continue
        variant = Variant(name.replace("_", "-"), f"{name}*4", f"{name} (unlisted)")
        problem = _config_problem(variant)
        if problem:
            echo(f"zoo: registered mixer {name} left out: {name}*4 does not build at the zoo's scales: {problem}")
            continue
        variants.append(variant)
        family_of[variant.name] = UNLISTED
    return tuple(variants), family_of


def _config_problem(variant: Variant) -> str | None:
    for scale in SCALES.values():
        try:
            ModelConfig(**{**scale.model, "n_layers": 4, "vocab_size": 259, "plan": variant.plan})
        except (TypeError, ValueError) as error:
            return str(error)
    return None


VARIANTS, FAMILY_OF = zoo_variants()
STUDY = Study(name="compare_zoo", variants=tuple(Variant(v.name, v.plan, v.label, {"n_layers": 4, **v.model})
                                                 for v in VARIANTS), scales=SCALES)
