"""Per-op tables of implementations (the pattern of tokamax's api.py), light enough for config-time validation.

Each op lists its implementations in "auto" order. An implementation is a backend module, imported on first use
(never by this module's import), that defines

    unsupported_reason(call) -> str | None    why it cannot take this call (None: it can)
    run(call)                                  the op on it

where `call` is the op's validated call record (`FlashCall`, `DecodeCall`, `LinearCall`, `BlockSparseCall` in the
op's api.py).

`implementation=` of an op accepts "auto", one name, or a sequence of names tried in order:

* a sequence (and "auto") runs the first implementation that can take the call, and raises listing each reason
  when none can;
* one name runs that implementation, and raises naming the reason and the alternatives when it cannot;
* "auto" is the op's table order, keeping cuDNN and the Pallas kernels to a GPU, the CPU-tuned XLA backends off it,
  and the Pallas kernels out until `PALLAS_IN_AUTO` is set (flash: cudnn, then xla on GPU; xla_chunked, then xla
  elsewhere).

A backend module that fails to import (e.g. a jax API change) disables that implementation with a one-time
warning: "auto" and sequences skip it, asking for it alone raises with the import error, the package still works.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Sequence
from types import ModuleType

# The Pallas kernels pass every CPU check (interpret mode, CUDA cross-lowering) but have not yet been compiled and
# timed on a real GPU (experiments/gpu_checks.sh). Until a GPU run sets this True, "auto" keeps to cuDNN / XLA on
# GPU and the kernels are an explicit opt-in.
PALLAS_IN_AUTO = False


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    module: str  # backend module, imported on first use
    gpu_only: bool = False  # "auto" tries it on GPU only (cuDNN; the Pallas kernels, which elsewhere interpret)
    off_gpu_only: bool = False  # "auto" tries it off GPU only (tuned and measured on CPU)
    pallas: bool = False  # a Pallas kernel: "auto" tries it only once PALLAS_IN_AUTO


_FLASH = "pallas_kernels.flash_attention."
_DECODE = "pallas_kernels.decode_attention."
_LINEAR = "pallas_kernels.chunked_linear_attention."
_SPARSE = "pallas_kernels.block_sparse_attention."
TABLES: dict[str, tuple[Implementation, ...]] = {
    "flash_attention": (
        Implementation("cudnn", _FLASH + "cudnn", gpu_only=True),
        Implementation("mosaic_gpu", _FLASH + "pallas_mosaic_gpu", gpu_only=True, pallas=True),
        Implementation("triton", _FLASH + "pallas_triton", gpu_only=True, pallas=True),
        Implementation("xla_chunked", _FLASH + "xla_chunked", off_gpu_only=True),
        Implementation("xla", _FLASH + "reference"),
    ),
    "decode_attention": (
        Implementation("triton", _DECODE + "pallas_triton", gpu_only=True, pallas=True),
        Implementation("xla", _DECODE + "reference"),
    ),
    "chunked_linear_attention": (
        Implementation("triton", _LINEAR + "pallas_triton", gpu_only=True, pallas=True),
        Implementation("xla", _LINEAR + "reference"),
    ),
    "block_sparse_attention": (
        Implementation("triton", _SPARSE + "pallas_triton", gpu_only=True, pallas=True),
        Implementation("xla", _SPARSE + "reference"),
    ),
}


def _table(op: str) -> tuple[Implementation, ...]:
    if op not in TABLES:
        raise ValueError(f"op={op!r} is not one of {', '.join(map(repr, TABLES))}")
    return TABLES[op]


def implementations(op: str) -> tuple[str, ...]:
    """The op's implementation names, in "auto" order."""
    return tuple(impl.name for impl in _table(op))


def check_implementation(op: str, implementation: str | Sequence[str]) -> tuple[str, ...] | None:
    """Validate an `implementation=` value of `op` without importing any backend: the names to try in order, or
    None for "auto". Raises ValueError naming the op and the allowed values."""
    names = implementations(op)
    if isinstance(implementation, str):
        requested = (implementation,)
    elif isinstance(implementation, Sequence):
        requested = tuple(implementation)
    else:
        requested = ()
    if requested == ("auto",):
        return None
    if not requested or any(not isinstance(name, str) or name not in names for name in requested):
        raise ValueError(f"{op}: implementation={implementation!r} is not one of "
                         f"{', '.join(map(repr, ('auto', *names)))} (or a non-empty sequence of those names but "
                         f"'auto', tried in order)")
    return requested


def auto_order(op: str, gpu: bool) -> tuple[str, ...]:
    """What "auto" tries, in order, on a GPU or elsewhere."""
    return tuple(impl.name for impl in _table(op)
                 if not (impl.off_gpu_only if gpu else impl.gpu_only) and (PALLAS_IN_AUTO or not impl.pallas))


# ----------------------------------------------------------------------------------------------- backend imports

_import_module = importlib.import_module  # tests replace it to simulate a backend whose import fails
_loaded: dict[str, ModuleType | Exception] = {}


def _impl(op: str, name: str) -> Implementation:
    return next(impl for impl in _table(op) if impl.name == name)


def _load(op: str, name: str) -> ModuleType | Exception:
    """The backend module of op's `name`, or the exception its import raised (warned about once)."""
    impl = _impl(op, name)
    if impl.module not in _loaded:
        try:
            _loaded[impl.module] = _import_module(impl.module)
        except Exception as err:  # a broken backend disables itself, never the package
            _loaded[impl.module] = err
            warnings.warn(f"pallas_kernels: {op} implementation {name!r} is {_disabled(impl, err)}; 'auto' and "
                          f"sequences skip it", RuntimeWarning, stacklevel=3)
    return _loaded[impl.module]


def _disabled(impl: Implementation, err: Exception) -> str:
    return f"disabled: importing {impl.module} failed ({type(err).__name__}: {err})"


def load(op: str, name: str) -> ModuleType:
    """The backend module of op's `name`; raises ValueError with the import error when it is disabled."""
    module = _load(op, name)
    if isinstance(module, Exception):
        raise ValueError(f"{op}: implementation {name!r} is {_disabled(_impl(op, name), module)}") from module
    return module


def available(op: str) -> dict[str, str | None]:
    """Each implementation of `op` (imported now if not yet), in "auto" order: None where its backend imported,
    else why it is disabled."""
    status = {}
    for impl in _table(op):
        module = _load(op, impl.name)
        status[impl.name] = _disabled(impl, module) if isinstance(module, Exception) else None
    return status


# ------------------------------------------------------------------------------------------------------ dispatch

def _reason(op: str, name: str, call) -> str | None:
    module = _load(op, name)
    if isinstance(module, Exception):
        return _disabled(_impl(op, name), module)
    return module.unsupported_reason(call)


def select(op: str, implementation: str | Sequence[str], call, *, gpu: bool) -> tuple[str, ModuleType]:
    """(name, backend module) of the first implementation in `implementation` that can take `call`."""
    requested = check_implementation(op, implementation)
    names = auto_order(op, gpu) if requested is None else requested
    reasons = {}
    for name in names:
        reason = _reason(op, name, call)
        if reason is None:
            return name, _load(op, name)
        reasons[name] = reason
    if requested is not None and len(requested) == 1:
        (name, reason), = reasons.items()
        others = [other for other in implementations(op) if other != name and _reason(op, other, call) is None]
        module = _load(op, name)
        raise ValueError(f"{op}: implementation={name!r} cannot take this call: {reason}; implementations that can: "
                         f"{', '.join(map(repr, others)) or 'none'}") from (
            module if isinstance(module, Exception) else None)
    raise ValueError(f"{op}: no implementation of {'auto' if requested is None else requested!r} can take this "
                     f"call: " + "; ".join(f"{name}: {reason}" for name, reason in reasons.items()))
