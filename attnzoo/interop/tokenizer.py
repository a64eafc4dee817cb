"""A Hugging Face `tokenizer.json` as an attnzoo tokenizer, and the tokenizer files of a pretrained directory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import tokenizers

from attnzoo.data.tokenizers import BPE_FILE, KINDS, META_FILE, load_tokenizer

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


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
    def from_directory(cls, directory: str | os.PathLike, hf_config: dict | None = None) -> "HFTokenizer":
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
        os.makedirs(directory, exist_ok=True)
        self._backend.save(os.path.join(directory, BPE_FILE))
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump({"kind": self.kind, "vocab_size": self.vocab_size}, f)
        write_tokenizer_config(directory, self)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, identity={self.identity!r})"


def write_tokenizer_config(directory: str | os.PathLike, tokenizer) -> None:
    """tokenizer_config.json naming the special tokens, so transformers' AutoTokenizer reads tokenizer.json."""
    backend = tokenizer._backend
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False}
    for role in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{role}_id")
        if token_id is not None:
            settings[f"{role}_token"] = backend.id_to_token(token_id)
    Path(directory, TOKENIZER_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def save_tokenizer(directory: str | os.PathLike, tokenizer) -> None:
    """attnzoo's own files (tokenizer_meta.json, and tokenizer.json for BPE / HF tokenizers) plus
    tokenizer_config.json where there is a tokenizer.json. A byte tokenizer has no tokenizer.json form."""
    tokenizer.save(directory)
    if getattr(tokenizer, "_backend", None) is not None:
        write_tokenizer_config(directory, tokenizer)


def load_directory_tokenizer(directory: str | os.PathLike, hf_config: dict | None = None):
    """The tokenizer a pretrained directory holds: attnzoo's byte / BPE tokenizer when tokenizer_meta.json names
    one, else tokenizer.json as an HFTokenizer, else None."""
    meta = Path(directory) / META_FILE
    if meta.exists() and json.loads(meta.read_text()).get("kind") in KINDS:
        return load_tokenizer(directory)
    if (Path(directory) / BPE_FILE).exists():
        return HFTokenizer.from_directory(directory, hf_config)
    return None
