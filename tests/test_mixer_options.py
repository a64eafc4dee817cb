"""Every option a mixer accepts changes what it computes, or the mixer declares it inert (`Mixer.inert_options`).

Parameterised over the registry: for every registered name and every option its registration does not fix,
alternative values come from the option's annotation and default (`alternatives`), and the contract's tiny
two-layer models built with and without an alternative are compared. "Computes differently" is the first of, in
order: the parameter layout (paths and shapes; the default run takes it as evidence, the slow run goes on to the
output); the initial parameters or constants (same seed: an initialisation option); the forward output (logits,
aux loss, metrics) with the parameters both models have copied over and every parameter perturbed, so that a
zero-initialised bias counts and a changed draw order does not; the state a training-mode forward updates; the
decode path; the gradients.

The rules, per option X:
1. X is honoured: two accepted settings that differ only in X compute differently. The settings tried are the
   defaults, each other option changed, and the CONTEXTS below (llama3 RoPE scaling, under which the rope_*
   factors act); a context that needs X (rejected without it) counts when it computes differently from the
   defaults.
2. X is not ignored where it is accepted: if X is accepted with the other options at their defaults, one of its
   values changes the output there, or X enables another option (one rejected without X, as rope_scaling enables
   rope_factor), or X's default is none (often a value derived from the others, which an explicit value may
   repeat: gated's additive). An option that does nothing in some setting is rejected there at config time (a
   ValueError that names it), never accepted and ignored.
3. An X rejected with every alternative, alone and beside each other option, is a setting the name rules out (e.g.
   the fixed stream's sigma with decon_fixed_seq_qk's text stream): every rejection must name X.
4. An X the class declares in `inert_options` (a kernel choice, a decode-only algorithm) leaves the forward alone.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
import zlib
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_mixer_contract import VOCAB, random_tokens, tiny_model

from attnzoo import LayerSpec, get_mixer, registered
from attnzoo.mixers.bilevel_routing import BilevelRoutingOptions
from attnzoo.mixers.gqa import GQAOptions

B, T = 2, 64  # T = the tiny model's max_seq_len: several blocks / chunks / windows of the default sizes
CHANGED = 1e-4  # relative difference above which two outputs differ (float32 reassociation stays far below)
PERTURBATION = 0.05  # added to every parameter (seeded by its path), so zero-initialised ones matter
MAX_COMPARISONS = 8  # model comparisons per option before giving up (a failure lists what was tried)

# Settings besides the defaults in which each options class's options are also tried, for options that act only
# together with others. Keyed by options class; subclasses inherit them.
CONTEXTS: dict[type, tuple[dict[str, Any], ...]] = {
    # llama3 blends the wavelengths between 128 / 4 and 128 tokens (within T of the small heads' few frequencies).
    GQAOptions: ({"rope_scaling": "linear", "rope_factor": 8.0},
                 {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_len": 128}),
    BilevelRoutingOptions: ({"image_side": 8, "regions_per_side": 4},),  # BiFormer's image form: T = 8 x 8 tokens
}



def free_options(name: str) -> list[str]:
    entry = get_mixer(name)
    return [f.name for f in dataclasses.fields(entry.options) if f.name not in entry.defaults]


def field_default(name: str, option: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(get_mixer(name).options)}[option]


def alternatives(name: str, option: str) -> list[Any]:
    """Plan values other than the default, those most likely to act within T tokens first."""
    hint, default = typing.get_type_hints(get_mixer(name).options)[option], field_default(name, option)
    forms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    values: list[Any] = []
    # Named values first: a small int may be what None already means (n_kv_heads=2 with a 2-kv-head model).
    for form in sorted(forms, key=lambda form: typing.get_origin(form) is not Literal):
        if typing.get_origin(form) is Literal:
            values += typing.get_args(form)
        elif form is bool:
            values += [True, False]
        elif form is int:
            near = [default // 2, default * 2, default + 1, default - 1] if type(default) is int else []
            values += near + [2, 4, 8, 1, 3, 16]
        elif form is float:
            near = [default / 2, default * 2] if type(default) is float and default else []
            values += near + [0.5, 2.0, 0.1, 0.01, 5.0]
        elif form is type(None):
            values.append(None)
    typed = list(dict.fromkeys((type(v), v) for v in values))  # True == 1 in Python: keep the type in the key
    return [v for t, v in typed if (t, v) != (type(default), default)][:7]


def contexts(name: str) -> list[dict[str, Any]]:
    entry = get_mixer(name)
    return [c for cls, cs in CONTEXTS.items() if issubclass(entry.options, cls) for c in cs
            if not set(c) & set(entry.defaults)]


def key(options: dict[str, Any]) -> tuple:
    return tuple(sorted(options.items(), key=lambda item: item[0]))


def describe(options: dict[str, Any]) -> str:
    return ",".join(f"{k}={v!r}" for k, v in key(options)) or "defaults"


@functools.cache
def _rejection(name: str, options: tuple) -> str | None:
    config = built(name, {})[0].config  # (the defaults must build)
    try:
        dataclasses.replace(config, plan=[LayerSpec(name, dict(options))] * 2)
    except ValueError as error:
        return str(error)
    return None


def rejection(name: str, options: dict[str, Any]) -> str | None:
    """The config-time error for these options (None: accepted)."""
    return _rejection(name, key(options))


def variables(model, kind=nnx.Variable, arrays: bool = True) -> dict[str, Any]:
    """The model's arrays (or, not `arrays`, abstract arrays too) in variables of `kind` (an nnx filter), by path."""
    return {"/".join(map(str, path)): v.value for path, v in nnx.to_flat_state(nnx.state(model, kind))
            if isinstance(v.value, jax.Array) or not arrays and hasattr(v.value, "shape")}


def set_parameters(model, value_for) -> None:
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            node.value = value_for("/".join(map(str, path)), node.value)


def perturbed(path: str, value: jax.Array) -> jax.Array:
    noise = np.random.default_rng(zlib.crc32(path.encode())).standard_normal(value.shape)  # numpy: no compilation
    return jnp.asarray(np.asarray(value) + PERTURBATION * noise, value.dtype)


@functools.cache
def _built(name: str, options: tuple):
    """(the contract's two-layer model with perturbed parameters, its initial variables); built once per setting."""
    model = tiny_model(name, plan=[LayerSpec(name, dict(options))] * 2)
    initial = variables(model)
    set_parameters(model, perturbed)
    return model, initial


def built(name: str, options: dict[str, Any]):
    return _built(name, key(options))


@functools.cache
def _layout(name: str, options: tuple) -> dict[str, tuple]:
    abstract = nnx.eval_shape(lambda: tiny_model(name, plan=[LayerSpec(name, dict(options))] * 2))
    return {path: (v.shape, v.dtype) for path, v in variables(abstract, kind=nnx.Variable, arrays=False).items()}


def layout(name: str, options: dict[str, Any]) -> dict[str, tuple]:
    """Path -> (shape, dtype) of the model's variables, traced without building it (no compilation)."""
    return _layout(name, key(options))


def sharing_parameters(model, source):
    """A copy of `model` whose parameters that `source` has too (same path and shape) are source's."""
    model, theirs = nnx.clone(model), variables(source, nnx.Param)
    set_parameters(model, lambda path, v: theirs[path] if path in theirs and theirs[path].shape == v.shape else v)
    return model


def tokens() -> jax.Array:
    return random_tokens(7, (B, T))


def outputs(out) -> dict[str, Any]:
    return {"logits": out.logits_BTV, "aux_loss": out.aux_loss, **{f"metric {k}": v for k, v in out.metrics.items()}}


def forward(model) -> dict[str, Any]:
    return outputs(model(tokens()))


def training_forward(model) -> dict[str, Any]:
    """A training-mode forward's output and the non-parameter state it leaves (e.g. EMA statistics)."""
    model = nnx.clone(model)
    model.train()
    out = outputs(model(tokens()))
    return out | {f"state {path}": v for path, v in variables(model, nnx.Not(nnx.Param)).items()}


def decoding(model) -> dict[str, Any]:
    prompt = T - 3
    out = model(tokens()[:, :prompt], caches=model.init_caches(B, T), mode="prefill")
    logits = {}
    for i in range(prompt, T):
        out = model(tokens()[:, i:i + 1], caches=out.caches, mode="decode")
        logits[f"decode logits at {i}"] = out.logits_BTV
    return logits


def gradients(model) -> dict[str, Any]:
    weights_BTV = jax.random.normal(jax.random.key(3), (B, T, VOCAB))

    def loss(model):
        out = model(tokens())
        return (out.logits_BTV * weights_BTV).sum() + out.aux_loss

    return {f"grad {path}": g for path, g in variables(nnx.grad(loss)(model)).items()}


def relative_difference(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return np.inf
    return float(np.abs(a - b).max(initial=0) / max(np.abs(a).max(initial=0), np.abs(b).max(initial=0), 1e-30))


def difference(a: dict, b: dict, *, same_shape_only: bool = False) -> str | None:
    """The first entry of two output dicts that differs, as text (None: equal within CHANGED). same_shape_only
    compares only the entries both have with one shape (a parameter that an option adds or reshapes is skipped)."""
    for name in sorted(set(a) | set(b)):
        if same_shape_only and not (name in a and name in b and np.shape(a[name]) == np.shape(b[name])):
            continue
        if name not in a or name not in b:
            return f"{name} on one side only"
        if (rel := relative_difference(a[name], b[name])) > CHANGED:
            return f"{name} (relative {rel:.2g})"
    return None


def effect(name: str, before: dict, after: dict, *, thorough: bool, forward_only: bool = False,
           deep: bool = False) -> str | None:
    """How the two settings' models compute differently (None: they do not), in the module docstring's order;
    the decode path and the gradients (each a compilation of its own) only when `deep`."""
    layout_a, layout_b = layout(name, before), layout(name, after)
    if layout_a != layout_b and not thorough and not forward_only:
        return f"parameter layout ({sorted(set(layout_a.items()) ^ set(layout_b.items()))[0][0]})"
    model_a, initial_a = built(name, before)
    model_b, initial_b = built(name, after)
    if layout_a == layout_b and not forward_only and (found := difference(initial_a, initial_b)):
        return f"initial {found}"
    model_b = sharing_parameters(model_b, model_a)
    if (found := difference(forward(model_a), forward(model_b))) or forward_only:
        return found and f"forward: {found}"
    if variables(model_a, nnx.Not(nnx.Param)) or variables(model_b, nnx.Not(nnx.Param)):
        if found := difference(training_forward(model_a), training_forward(model_b), same_shape_only=True):
            return f"training-mode forward: {found}"
    if not deep:
        return None
    if get_mixer(name).cls.supports.decode and (found := difference(decoding(model_a), decoding(model_b))):
        return f"decode: {found}"
    if found := difference(gradients(model_a), gradients(model_b), same_shape_only=True):
        return f"gradients: {found}"
    return None


class Trial:
    """Comparisons of settings that differ in one option, with a line for each (the failure message)."""

    def __init__(self, name: str, thorough: bool):
        self.name, self.thorough, self.log = name, thorough, []

    def compare(self, before: dict, after: dict, **kw) -> bool:
        if len(self.log) >= MAX_COMPARISONS:
            return False
        try:
            found = effect(self.name, before, after, thorough=self.thorough, **kw)
            outcome = found or "no difference"
        except ValueError as error:  # e.g. the image form called with T != image_side^2 tokens
            found, outcome = None, f"the forward raised {error}"
        self.log.append(f"  {describe(before)} -> {describe(after)}: {outcome}")
        return found is not None

    def report(self) -> str:
        return "\n".join(self.log)


def enables(name: str, option: str, values: list) -> str | None:
    """Another option's value rejected without `option` but accepted with one of `values` (None: none)."""
    for other in free_options(name):
        for y in alternatives(name, other) if other != option else ():
            if rejection(name, {other: y}) and any(not rejection(name, {other: y, option: x}) for x in values):
                return f"{other}={y!r}"
    return None


def bases(name: str, option: str) -> list[dict]:
    """Settings to change `option` in besides the defaults: the contexts, then each other option changed, first
    those that accept a value of `option` rejected beside the defaults (activation=silu for gated's additive=true)."""
    singles = [{other: y} for other in free_options(name) if other != option
               for y in alternatives(name, other) if not rejection(name, {other: y})]
    rejected = [x for x in alternatives(name, option) if rejection(name, {option: x})]
    return contexts(name) + sorted(singles, key=lambda base: all(rejection(name, base | {option: x})
                                                                  for x in rejected))


def primary(name: str) -> bool:
    """Whether `name` is the one of its class that fixes the fewest options (its aliases run the same code)."""
    cls = get_mixer(name).cls
    return name == min((n for n in registered() if get_mixer(n).cls is cls),
                       key=lambda n: (len(get_mixer(n).defaults), n))


def inherits_options(name: str) -> bool:
    """Whether the name's options dataclass extends another mixer's (GQAOptions' family): where an inherited option
    the subclass never reads is most easily accepted and ignored."""
    options = get_mixer(name).options
    return any(dataclasses.is_dataclass(base) and base is not options for base in options.__mro__[1:])


def cases():
    """Every (name, option). The default run (the CI budget) takes the classes whose options extend another
    mixer's, at their primary name; every other mixer, the aliases and the thorough variant (no layout shortcut)
    run with -m slow (about 4 CPU-minutes in all)."""
    for name in registered():
        for option in free_options(name):
            yield pytest.param(name, option, False, id=f"{name}-{option}",
                               marks=[] if primary(name) and inherits_options(name) else [pytest.mark.slow])
            yield pytest.param(name, option, True, id=f"{name}-{option}-thorough", marks=pytest.mark.slow)


@pytest.mark.parametrize("name,option,thorough", cases())
def test_option_changes_what_the_mixer_computes(name, option, thorough):
    cls = get_mixer(name).cls
    trial = Trial(name, thorough)
    where = f"mixer {name!r} ({cls.__name__}), option {option} (default {field_default(name, option)!r})"
    accepted = [x for x in alternatives(name, option) if not rejection(name, {option: x})]
    if option in cls.inert_options:
        for x in accepted[:2]:
            assert not trial.compare({}, {option: x}, forward_only=True), (
                f"{where} is declared inert ({cls.inert_options[option]}) but changes the forward output:\n"
                f"{trial.report()}\nremove it from {cls.__name__}.inert_options")
        return
    # Every accepted value on the forward; unless the option enables another, the first on the decode path and the
    # gradients too.
    if any(trial.compare({}, {option: x}) for x in accepted):
        return
    # (A default of none often stands for a value derived from the others, which an explicit value may repeat.)
    if accepted and field_default(name, option) is not None and not enables(name, option, accepted):
        assert trial.compare({}, {option: accepted[0]}, deep=True), (
            f"{where} is accepted with the other options at their defaults but changes nothing there:\n"
            f"{trial.report()}\nhonour it, reject it in that setting (a ValueError naming {option} from the options' "
            f"__post_init__ or the mixer's check, e.g. with attnzoo.mixers.base.reject_unused), or, if it cannot "
            f"change the output, declare it in {cls.__name__}.inert_options")
        return
    for base in bases(name, option):
        for x in alternatives(name, option):
            after = base | {option: x}
            if base.get(option, field_default(name, option)) != x and not rejection(name, after):
                if trial.compare(base, after):
                    return
    for context in contexts(name):  # a context that needs X, against the defaults
        if option in context and rejection(name, {k: v for k, v in context.items() if k != option}):
            if trial.compare({}, context):
                return
    assert not trial.log, (
        f"{where}: no two accepted settings that differ only in {option} compute differently:\n{trial.report()}\n"
        f"honour it, reject it where it does nothing, or, if it cannot change the output, declare it in "
        f"{cls.__name__}.inert_options")
    for x in alternatives(name, option):  # ruled out with this name: the errors must say by which option
        message = rejection(name, {option: x})
        assert option in message.partition("): ")[2], f"{where}={x!r} is rejected without naming it: {message}"


# Settings in which an option does nothing, which the options reject (the test above sees each option alone only
# beside the defaults): the error names the option and the mixer.
UNUSED = [("gqa", {"rope_factor": 2.0}), ("mha", {"rope_scaling": "linear", "rope_original_max_len": 4096}),
          ("decon_fixed_seq_qk", {"seed": 1}), ("bilevel_routing", {"regions_per_side": 4}),
          ("bilevel_routing", {"image_side": 8, "regions_per_side": 4, "block_size": 32})]


@pytest.mark.parametrize("name,options", UNUSED, ids=[f"{n}-{describe(o)}" for n, o in UNUSED])
def test_options_are_rejected_where_they_do_nothing(name, options):
    option = list(options)[-1]
    message = rejection(name, options) or ""
    assert f"mixer {name!r}: {option}=" in message, f"{name} with {describe(options)}: {message or 'accepted'}"


@pytest.mark.parametrize("name", registered())
def test_inert_options_are_options_with_a_reason(name):
    cls = get_mixer(name).cls
    for option, why in cls.inert_options.items():
        assert option in {f.name for f in dataclasses.fields(get_mixer(name).options)}, (
            f"{cls.__name__}.inert_options names {option!r}, not an option of mixer {name!r}")
        assert isinstance(why, str) and why.strip(), f"{cls.__name__}.inert_options[{option!r}] needs a reason"
