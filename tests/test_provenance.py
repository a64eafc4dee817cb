"""attnzoo.provenance: the commit, dirty flag and source hash a run records, read from a scratch git checkout."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from attnzoo.provenance import code_identity, describe, read_code_identity, same_code


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


@pytest.fixture
def checkout(tmp_path):
    (tmp_path / "attnzoo").mkdir()
    (tmp_path / "pallas_kernels").mkdir()
    (tmp_path / "attnzoo" / "model.py").write_text("x = 1\n")
    (tmp_path / "pallas_kernels" / "op.py").write_text("y = 2\n")
    (tmp_path / "README.md").write_text("docs\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def test_clean_checkout_records_its_commit(checkout):
    code = read_code_identity(checkout)
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert code["commit"] == head.strip() and code["dirty"] is False
    assert code["jax"] and code["flax"] and code["python"]
    assert describe(code).startswith(f"commit {head[:10]}") and "dirty" not in describe(code)


def test_source_hash_follows_the_result_code_not_the_docs(checkout):
    before = read_code_identity(checkout)
    (checkout / "README.md").write_text("other docs\n")
    docs_only = read_code_identity(checkout)
    assert docs_only["dirty"] is True and same_code(before, docs_only)  # a docs edit keeps cached runs valid
    (checkout / "pallas_kernels" / "op.py").write_text("y = 3\n")
    edited = read_code_identity(checkout)
    assert not same_code(before, edited) and "(dirty)" in describe(edited)
    (checkout / "attnzoo" / "new_mixer.py").write_text("z = 0\n")  # an untracked new file counts too
    assert not same_code(edited, read_code_identity(checkout))


def test_a_process_keeps_the_identity_it_first_read():
    first = code_identity()
    first["commit"] = "changed by the caller"
    assert code_identity() != first and code_identity() == code_identity()


def test_without_git_the_source_hash_still_identifies_the_code(tmp_path):
    (tmp_path / "attnzoo").mkdir()
    (tmp_path / "attnzoo" / "a.py").write_text("a = 1\n")
    code = read_code_identity(tmp_path)
    assert code["commit"] is None and code["dirty"] is None and len(code["source_hash"]) == 16
    assert not same_code(None, code) and not same_code({}, code)  # a run from before runs recorded code
    assert "no git commit" in describe(code) and "unrecorded" in describe(None)
