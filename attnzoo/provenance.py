"""Which code made a run: the git commit, a dirty flag, a hash of the source that computes results, versions.

Every run records `code_identity()` (run.json, a study's result.json, a recall cell), so a number in a table can be
traced to the code that produced it, and a cached run is reused only when `same_code` says its source matches.

`source_hash` covers the Python files of the packages whose code decides a result (`attnzoo`, `pallas_kernels`):
it changes with any edit there, committed or not, and stays put when only docs, tests or experiment reports
change, so rerunning a study after an unrelated commit still reuses its runs. It works without git (an installed
wheel); `commit` and `dirty` are None there.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

RESULT_PACKAGES = ("attnzoo", "pallas_kernels")
_REPO_ROOT = Path(__file__).resolve().parent.parent


def source_hash(root: Path = _REPO_ROOT, packages: tuple[str, ...] = RESULT_PACKAGES) -> str:
    """sha256 (first 16 hex digits) over the relative path and bytes of every .py file of `packages`."""
    digest = hashlib.sha256()
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _git(root: Path, *args: str) -> str | None:
    """`git args` in `root`, or None when root is no git checkout or git is missing."""
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def code_identity() -> dict[str, Any]:
    """This process's code: read once, on first use (near import time), so that edits made to the files while a
    long study runs do not relabel the code that is actually loaded. A fresh dict each call."""
    return dict(_process_code_identity())


@functools.cache
def _process_code_identity() -> dict[str, Any]:
    return read_code_identity(_REPO_ROOT)


def read_code_identity(root: Path) -> dict[str, Any]:
    """{commit, dirty, source_hash, attnzoo, jax, jaxlib, flax, python} of the checkout at `root`, read now.
    dirty: tracked files differ from the commit or untracked files exist (ignored ones, such as runs/, do not
    count)."""
    return {**_git_state(root), "source_hash": source_hash(root), **_versions()}


@functools.cache
def _versions() -> dict[str, str | None]:
    return {"attnzoo": _version("attnzoo"), "jax": _version("jax"), "jaxlib": _version("jaxlib"),
            "flax": _version("flax"), "python": platform.python_version()}


def _git_state(root: Path) -> dict[str, Any]:
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def same_code(recorded: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """Whether a run recorded as `recorded` was made by source equal to `current` (a run recording no code
    identity, made before runs recorded one, is never the same)."""
    return bool(recorded) and recorded.get("source_hash") == current["source_hash"]


def describe(code: dict[str, Any] | None) -> str:
    """'commit 1a2b3c4d (dirty), source 0123abcd...' for messages and tables."""
    if not code:
        return "unrecorded code (a run made before runs recorded their commit)"
    commit = code.get("commit")
    where = f"commit {commit[:10]}" if commit else "no git commit"
    return f"{where}{' (dirty)' if code.get('dirty') else ''}, source {code.get('source_hash')}"
