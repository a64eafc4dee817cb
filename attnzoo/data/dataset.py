"""Token datasets with batches that are a pure function of (seed, step).

`TokenDataset` holds one token stream per split (memory-mapped from a cache built file by file);
`ArrayDataset` holds fixed-length (inputs, labels) examples in memory, e.g. a synthetic task.
Both give `batch(split, step, batch_size, seq_len, seed) -> (x, y)` and `eval_batches(...)`, int32 [B, T].
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterable, Iterator, Mapping

import numpy as np

from attnzoo.data.corpus import SPLITS, TextCorpus, check_split
from attnzoo.data.tokenizers import Tokenizer

IGNORE_INDEX = -100
Batch = tuple[np.ndarray, np.ndarray]


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _write_tokens(path: str, texts: Iterable[str], tokenizer: Tokenizer) -> None:
    """Tokenize `texts` one at a time into `path` (each followed by <eos>); atomic via a temp file + os.replace."""
    dtype = token_dtype(tokenizer.vocab_size)
    directory = os.path.dirname(path)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for text in texts:
                np.append(tokenizer.encode(text), tokenizer.eos_id).astype(dtype).tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def _cache_path(cache_dir: str, corpus_name: str, fingerprint: str, tokenizer: Tokenizer, split: str) -> str:
    dtype = token_dtype(tokenizer.vocab_size).name
    return os.path.join(cache_dir, f"{corpus_name}-{fingerprint[:16]}-{tokenizer.identity}-{split}.{dtype}")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


class TokenDataset:
    """One token stream per split; documents are separated by the tokenizer's <eos>."""

    def __init__(self, tokens: Mapping[str, np.ndarray], tokenizer: Tokenizer):
        self.tokens = {split: tokens[split] for split in SPLITS}
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size

    @classmethod
    def build(cls, corpus: TextCorpus, tokenizer: Tokenizer, cache_dir: str | os.PathLike) -> TokenDataset:
        """Tokenize each split into `cache_dir` (reused when corpus and tokenizer match) and memory-map it."""
        cache_dir = os.fspath(cache_dir)
        os.makedirs(cache_dir, exist_ok=True)
        tokens = {}
        for split in SPLITS:
            path = _cache_path(cache_dir, corpus.name, corpus.fingerprint, tokenizer, split)
            if not os.path.exists(path):
                _write_tokens(path, corpus.iter_texts(split), tokenizer)
            tokens[split] = np.memmap(path, dtype=token_dtype(tokenizer.vocab_size), mode="r")
        return cls(tokens, tokenizer)

    @classmethod
    def from_cache(cls, corpus_name: str, fingerprint: str, tokenizer: Tokenizer,
                   cache_dir: str | os.PathLike) -> TokenDataset | None:
        """The dataset an earlier `build` cached for this corpus (name and fingerprint) and tokenizer, without the
        corpus files; None when the cache does not hold both splits."""
        paths = {split: _cache_path(os.fspath(cache_dir), corpus_name, fingerprint, tokenizer, split)
                 for split in SPLITS}
        if not all(os.path.exists(path) for path in paths.values()):
            return None
        dtype = token_dtype(tokenizer.vocab_size)
        return cls({split: np.memmap(path, dtype=dtype, mode="r") for split, path in paths.items()}, tokenizer)

    def num_tokens(self, split: str) -> int:
        check_split(split)
        return len(self.tokens[split])

    def check_seq_len(self, seq_len: int, splits: Iterable[str] = SPLITS) -> None:
        """Raise ValueError if a split is too short for one window of `seq_len` inputs plus its next-token target."""
        for split in splits:
            self._tokens_for(split, seq_len)

    def _tokens_for(self, split: str, seq_len: int) -> np.ndarray:
        check_split(split)
        tokens = self.tokens[split]
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"seq_len: the {split!r} split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1} "
                f"(one window and its next-token target); use more text or a smaller seq_len"
            )
        return tokens

    def batch(self, split: str, step: int, batch_size: int, seq_len: int, seed: int = 0) -> Batch:
        """`batch_size` random windows; y is x shifted by one token. A pure function of (seed, step, split)."""
        tokens = self._tokens_for(split, seq_len)
        rng = np.random.default_rng((int(seed), int(step), check_split(split)))
        starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
        return _windows(tokens, starts, seq_len)

    def eval_batches(
        self, split: str, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[Batch]:
        """Consecutive non-overlapping windows from the start of the split (each token predicted once).

        Every batch holds `batch_size` windows except possibly the last, so a full pass covers the whole split.
        """
        tokens = self._tokens_for(split, seq_len)
        num_windows = (len(tokens) - 1) // seq_len
        if max_batches is not None:
            num_windows = min(num_windows, max_batches * batch_size)
        for first in range(0, num_windows, batch_size):
            starts = np.arange(first, min(first + batch_size, num_windows)) * seq_len
            yield _windows(tokens, starts, seq_len)


class ArrayDataset:
    """Fixed-length examples per split: `splits[split] = (inputs, labels)`, int arrays [N, T].

    Labels equal to IGNORE_INDEX (-100) are not scored. Training batches walk a fresh permutation of the examples
    each epoch, seeded by (seed, epoch, split), so a batch is still a pure function of (seed, step).
    """

    def __init__(self, splits: Mapping[str, tuple[np.ndarray, np.ndarray]], vocab_size: int):
        self.examples = {}
        for split, (inputs, labels) in splits.items():
            check_split(split)
            inputs, labels = np.asarray(inputs, np.int32), np.asarray(labels, np.int32)
            if inputs.ndim != 2 or inputs.shape != labels.shape or len(inputs) == 0:
                raise ValueError(
                    f"splits[{split!r}]: inputs {inputs.shape} and labels {labels.shape} "
                    "must have the same non-empty [N, T] shape"
                )
            self.examples[split] = (inputs, labels)
        self.vocab_size = vocab_size

    def num_examples(self, split: str) -> int:
        return len(self._examples_for(split)[0])

    def _examples_for(self, split: str, seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        check_split(split)
        if split not in self.examples:
            raise ValueError(f"split: this dataset has no {split!r} split, only {sorted(self.examples)}")
        inputs, labels = self.examples[split]
        if seq_len is not None and seq_len != inputs.shape[1]:
            raise ValueError(f"seq_len: {seq_len} differs from the {split!r} examples' length {inputs.shape[1]}")
        return inputs, labels

    def batch(self, split: str, step: int, batch_size: int, seq_len: int, seed: int = 0) -> Batch:
        """The step's `batch_size` examples, taken in a per-epoch random order."""
        inputs, labels = self._examples_for(split, seq_len)
        positions = int(step) * batch_size + np.arange(batch_size)
        epochs, offsets = np.divmod(positions, len(inputs))
        rows = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            order = np.random.default_rng((int(seed), int(epoch), check_split(split))).permutation(len(inputs))
            rows[in_epoch] = order[offsets[in_epoch]]
        return inputs[rows], labels[rows]

    def eval_batches(
        self, split: str, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[Batch]:
        """The examples in order; the last batch may be smaller, so a full pass scores every example once."""
        inputs, labels = self._examples_for(split, seq_len)
        num_rows = len(inputs) if max_batches is None else min(len(inputs), max_batches * batch_size)
        for first in range(0, num_rows, batch_size):
            last = min(first + batch_size, num_rows)
            yield inputs[first:last], labels[first:last]


def unigram_entropy(dataset: TokenDataset, split: str = "train", chunk_size: int = 1 << 24) -> float:
    """Entropy of the split's token frequencies in nats per token: what a model ignoring context achieves."""
    check_split(split)
    tokens = dataset.tokens[split]
    counts = np.zeros(dataset.vocab_size, dtype=np.int64)
    for first in range(0, len(tokens), chunk_size):
        counts += np.bincount(tokens[first : first + chunk_size], minlength=dataset.vocab_size)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())
