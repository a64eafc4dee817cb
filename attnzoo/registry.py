"""Token mixers by name. A new mixer arrives by adding a file that calls `register`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

_MIXERS: dict[str, "MixerEntry"] = {}


@dataclasses.dataclass(frozen=True)
class MixerEntry:
    name: str
    cls: type
    defaults: dict[str, Any]  # options this name fixes, e.g. "mqa" fixes n_kv_heads=1


def register(name: str, **defaults) -> Callable[[type], type]:
    """Class decorator: `@register("gqa")`; a second name for the same class may fix options
    (`register("mqa", n_kv_heads=1)(GQAttention)`)."""

    def wrap(cls: type) -> type:
        if name in _MIXERS and _MIXERS[name].cls is not cls:
            raise ValueError(f"mixer {name!r} is already registered by {_MIXERS[name].cls.__name__}")
        _MIXERS[name] = MixerEntry(name, cls, dict(defaults))
        return cls

    return wrap


def registered() -> tuple[str, ...]:
    _load_builtin_mixers()
    return tuple(sorted(_MIXERS))


def get_mixer(name: str) -> MixerEntry:
    _load_builtin_mixers()
    if name not in _MIXERS:
        raise ValueError(f"mixer {name!r} is not registered; registered mixers: {', '.join(sorted(_MIXERS))}")
    return _MIXERS[name]


def _load_builtin_mixers() -> None:
    from attnzoo import mixers  # noqa: F401  (importing registers every built-in mixer)
