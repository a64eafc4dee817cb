"""Token mixers by name.

A mixer is one file under `attnzoo/mixers/` that calls `register`, so a new mixer needs no other edit. A lookup
imports only the file that registers the name: an index of name -> file is read from the files' source (each
literal `register("name", ...)`, as a decorator or called on a class), without importing them. `registered()`
imports every file. Mixers defined elsewhere register when their module is imported.

`register(name, options=OptionsDataclass, **defaults)` ties a name to a mixer class and its frozen options
dataclass; a second name for the same class may fix options (`register("mqa", options=GQAOptions,
n_kv_heads=1)(GQAttention)`). A plan entry's options are resolved here, once, into that dataclass:
the name's defaults, then the plan's own options, each checked against the field's annotated type.

This module imports nothing from attnzoo, so the config can validate plans without an import loop.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

MIXER_PACKAGE = "attnzoo.mixers"


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a mixer that has none."""


@dataclasses.dataclass(frozen=True)
class MixerEntry:
    name: str
    cls: type
    options: type  # a frozen dataclass
    defaults: Mapping[str, Any]  # options this name fixes, e.g. "mqa" fixes n_kv_heads=1

    def resolve(self, given: Mapping[str, Any]) -> Any:
        """This name's options dataclass from a plan entry's options."""
        return make_options(f"mixer {self.name!r}", self.options, given, self.defaults)


_MIXERS: dict[str, MixerEntry] = {}
_INDEX: dict[str, str] = {}  # name -> the module of MIXER_PACKAGE whose source registers it


def register(name: str, *, options: type = NoOptions, **defaults) -> Callable[[type], type]:
    """Class decorator: `@register("gqa", options=GQAOptions)`."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"register({name!r}): options must be a dataclass, got {options!r}")
    unknown = sorted(set(defaults) - {f.name for f in dataclasses.fields(options)})
    if unknown:
        raise TypeError(f"register({name!r}): {options.__name__} has no field {', '.join(unknown)}")

    def wrap(cls: type) -> type:
        # The same class defined again (its module re-imported) replaces itself; another class may not take the name.
        if name in _MIXERS and _qualified(_MIXERS[name].cls) != _qualified(cls):
            raise ValueError(f"mixer {name!r} is already registered by {_MIXERS[name].cls.__name__}")
        _MIXERS[name] = MixerEntry(name, cls, options, types.MappingProxyType(dict(defaults)))
        return cls

    return wrap


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def registered() -> tuple[str, ...]:
    """Every registered name (imports every mixer file)."""
    for module in _mixer_sources():
        importlib.import_module(module)
    return tuple(sorted(_MIXERS))


def get_mixer(name: str) -> MixerEntry:
    """The entry of `name`, importing the one file that registers it; a ValueError listing every name if none does."""
    if name not in _MIXERS and (module := _module_registering(name)):
        importlib.import_module(module)
    if name not in _MIXERS:
        registered()  # a name the index cannot see (registered without a literal name), or an error to list them all
    if name not in _MIXERS:
        raise ValueError(f"mixer {name!r} is not registered; registered mixers: {', '.join(sorted(_MIXERS))}")
    return _MIXERS[name]


def make_options(owner: str, options_cls: type, given: Mapping[str, Any], defaults: Mapping[str, Any] = {}) -> Any:
    """`options_cls(**defaults, **given)`, each value checked against its field's annotation; errors name `owner`,
    the option and what is allowed."""
    fields = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(given) - fields)
    if unknown:
        allowed = ", ".join(sorted(fields)) or "(none)"
        raise ValueError(f"{owner} has no option {', '.join(unknown)}; allowed: {allowed}")
    hints = typing.get_type_hints(options_cls)
    values = {**defaults, **given}
    for key, value in values.items():
        problem = type_problem(value, hints[key])
        if problem:
            raise ValueError(f"{owner}: option {key}={value!r} {problem}")
    try:
        return options_cls(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{owner}: {error}") from None


def _mixer_sources() -> dict[str, Path]:
    """The mixer package's modules and their files, listed again on each call so that new files are found."""
    package = importlib.import_module(MIXER_PACKAGE)
    return {f"{MIXER_PACKAGE}.{path.stem}": path
            for folder in package.__path__ for path in sorted(Path(folder).glob("*.py")) if path.stem != "__init__"}


def _module_registering(name: str) -> str | None:
    """The mixer module whose source registers `name`, from the index (rebuilt when it lacks the name)."""
    if name not in _INDEX:
        _INDEX.clear()
        _INDEX.update(_index())
    return _INDEX.get(name)


def _index() -> dict[str, str]:
    """Name -> the mixer module whose source registers it, read from the files without importing them."""
    return {name: module for module, path in _mixer_sources().items()
            for name in _registered_names(path.read_text())}


def _registered_names(source: str) -> list[str]:
    """The literal names of a file's `register("name", ...)` calls, decorators and `register(...)(Cls)` alike."""
    return [node.args[0].value for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "register"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)]


def type_problem(value: Any, hint: Any) -> str | None:
    """Why `value` does not fit the annotation `hint` (None if it does). Plan values are bool/int/float/str/None."""
    forms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if any(_fits(value, form) for form in forms):
        return None
    return "must be " + " or ".join(_describe(form) for form in forms)


def _fits(value: Any, form: Any) -> bool:
    if typing.get_origin(form) is Literal:
        return value in typing.get_args(form)
    if form is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if form is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if form is type(None):
        return value is None
    if form in (bool, str):
        return isinstance(value, form)
    return True  # annotations richer than a plan value (Any, tuples, ...): the dataclass checks them


def _describe(form: Any) -> str:
    if typing.get_origin(form) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(form)))
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string", type(None): "none"}
    return names.get(form, getattr(form, "__name__", str(form)))
