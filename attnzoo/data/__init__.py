"""Data for attnzoo: tokenizers (byte, BPE, a Hugging Face tokenizer.json), text corpora, token datasets with
(seed, step)-pure batches, synthetic tasks."""

from __future__ import annotations

import os

from attnzoo.data.corpus import NAMED_CORPORA, TextCorpus, kjv_corpus, load_corpus, stdlib_corpus, text_corpus
from attnzoo.data.dataset import IGNORE_INDEX, ArrayDataset, TokenDataset, unigram_entropy
from attnzoo.data.synthetic import mqar
from attnzoo.data.tokenizers import BPETokenizer, ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, make_tokenizer


def load_text_dataset(data: str | list[str], tokenizer: Tokenizer, cache_dir: str | os.PathLike) -> TokenDataset:
    """A cached TokenDataset of `data`: a named corpus (NAMED_CORPORA: "stdlib", "kjv"), else text sources."""
    return TokenDataset.build(load_corpus(data, cache_dir), tokenizer, cache_dir)


__all__ = [
    "IGNORE_INDEX",
    "NAMED_CORPORA",
    "ArrayDataset",
    "BPETokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "TextCorpus",
    "TokenDataset",
    "Tokenizer",
    "kjv_corpus",
    "load_corpus",
    "load_text_dataset",
    "load_tokenizer",
    "make_tokenizer",
    "mqar",
    "stdlib_corpus",
    "text_corpus",
    "unigram_entropy",
]
