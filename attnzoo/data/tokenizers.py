"""Tokenizers: exact byte-level ids (the default), a byte-level BPE trained locally, and any Hugging Face
`tokenizer.json` (HFTokenizer, from a pretrained directory).

The byte and BPE tokenizers round-trip any text exactly and carry the same three special tokens (<bos>, <eos>,
<pad>); an HFTokenizer takes its special ids from the directory. Each saves to a directory that `load_tokenizer`
restores. `identity` names the exact vocabulary, so token caches can be keyed on it. `save_tokenizer` and
`load_directory_tokenizer` write and read the tokenizer files of a Hugging Face-format directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
import tokenizers

KINDS = ("byte", "bpe")  # built here; a saved "hf" tokenizer (from a pretrained directory) is restored too
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")
META_FILE = "tokenizer_meta.json"
BPE_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class Tokenizer(Protocol):
    """What the rest of attnzoo relies on."""

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def identity(self) -> str: ...

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...

    def save(self, directory: str | os.PathLike) -> None: ...


def _write_meta(directory: str | os.PathLike, kind: str, vocab_size: int) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump({"kind": kind, "vocab_size": vocab_size}, f)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then <bos>=256, <eos>=257, <pad>=258."""

    kind = "byte"
    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258
    identity = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        _write_meta(directory, self.kind, self.vocab_size)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library; special tokens take ids 0, 1, 2."""

    kind = "bpe"

    def __init__(self, backend: tokenizers.Tokenizer):
        backend.encode_special_tokens = True  # a literal "<eos>" in the text is text, not the special token
        self._backend = backend
        self.vocab_size = backend.get_vocab_size()
        self.bos_id, self.eos_id, self.pad_id = (backend.token_to_id(t) for t in SPECIAL_TOKENS)
        self.identity = "bpe-" + hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> BPETokenizer:
        """Learn merges from an iterable of documents (streamed; any iterable of str works)."""
        backend = tokenizers.Tokenizer(tokenizers.models.BPE())
        backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._backend.encode(text).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._backend.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> None:
        _write_meta(directory, self.kind, self.vocab_size)
        self._backend.save(os.path.join(directory, BPE_FILE))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, identity={self.identity!r})"


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class HFTokenizer:
    """Any `tokenizers` tokenizer.json with its special ids (from tokenizer_config.json, else config.json).
    Encodes without adding special tokens (attnzoo's data pipeline places <eos> itself)."""

    kind = "hf"

    def __init__(self, backend: tokenizers.Tokenizer, bos_id: int | None, eos_id: int | None, pad_id: int | None):
        self._backend = backend
        self.vocab_size = backend.get_vocab_size()
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.identity = "hf-" + hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, hf_config: dict | None = None) -> HFTokenizer:
        backend = tokenizers.Tokenizer.from_file(os.path.join(directory, BPE_FILE))
        settings = {}
        path = Path(directory) / TOKENIZER_CONFIG_FILE
        if path.exists():
            settings = json.loads(path.read_text())
        ids = {}
        for role in ("bos", "eos", "pad"):
            text = _token_text(settings.get(f"{role}_token"))
            token_id = backend.token_to_id(text) if text else None
            if token_id is None:
                token_id = (hf_config or {}).get(f"{role}_token_id")
                if isinstance(token_id, list):  # several end tokens: the first ends attnzoo's documents
                    token_id = token_id[0] if token_id else None
            ids[role] = token_id
        return cls(backend, ids["bos"], ids["eos"], ids["pad"])

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._backend.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._backend.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> None:
        _write_meta(directory, self.kind, self.vocab_size)
        self._backend.save(os.path.join(directory, BPE_FILE))
        write_tokenizer_config(directory, self)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, identity={self.identity!r})"


def write_tokenizer_config(directory: str | os.PathLike, tokenizer: BPETokenizer | HFTokenizer) -> None:
    """tokenizer_config.json naming the special tokens, so transformers' AutoTokenizer reads tokenizer.json."""
    backend = tokenizer._backend
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False}
    for role in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{role}_id")
        if token_id is not None:
            settings[f"{role}_token"] = backend.id_to_token(token_id)
    Path(directory, TOKENIZER_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def save_tokenizer(directory: str | os.PathLike, tokenizer: Tokenizer) -> None:
    """attnzoo's own files (tokenizer_meta.json, and tokenizer.json for BPE / HF tokenizers) plus
    tokenizer_config.json where there is a tokenizer.json. A byte tokenizer has no tokenizer.json form."""
    tokenizer.save(directory)
    if getattr(tokenizer, "_backend", None) is not None:
        write_tokenizer_config(directory, tokenizer)


def load_directory_tokenizer(directory: str | os.PathLike, hf_config: dict | None = None) -> Tokenizer | None:
    """The tokenizer a pretrained directory holds: attnzoo's byte / BPE tokenizer when tokenizer_meta.json names
    one, else tokenizer.json as an HFTokenizer (special ids from tokenizer_config.json, else `hf_config`, the
    directory's config.json), else None."""
    meta = Path(directory) / META_FILE
    if meta.exists() and json.loads(meta.read_text()).get("kind") in KINDS:
        return load_tokenizer(directory)
    if (Path(directory) / BPE_FILE).exists():
        return HFTokenizer.from_directory(directory, hf_config)
    return None


def load_tokenizer(directory: str | os.PathLike) -> ByteTokenizer | BPETokenizer | HFTokenizer:
    """Restore a tokenizer from what its `save(directory)` wrote."""
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"tokenizer: no {META_FILE} in {os.fspath(directory)!r}; save a tokenizer there first")
    with open(meta_path) as f:
        kind = json.load(f)["kind"]
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer(tokenizers.Tokenizer.from_file(os.path.join(directory, BPE_FILE)))
    if kind == "hf":  # a run started from a Hugging Face checkpoint (attnzoo-train --init-from)
        return HFTokenizer.from_directory(directory)
    raise ValueError(f"tokenizer: {meta_path} names kind {kind!r}; expected one of {KINDS + ('hf',)}")


def make_tokenizer(
    kind: str, train_texts: Iterable[str] | None = None, vocab_size: int = 4096, min_frequency: int = 2
) -> ByteTokenizer | BPETokenizer:
    """Build a tokenizer by kind: 'byte' needs nothing; 'bpe' trains on `train_texts`."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if train_texts is None:
            raise ValueError("tokenizer: 'bpe' needs train_texts to learn its merges from")
        return BPETokenizer.train(train_texts, vocab_size=vocab_size, min_frequency=min_frequency)
    raise ValueError(f"tokenizer: unknown kind {kind!r}; allowed values are {', '.join(map(repr, KINDS))}")
