"""Synthetic recall tasks, generated in NumPy from a seed (no files)."""

from __future__ import annotations

import numpy as np

from attnzoo.data.dataset import IGNORE_INDEX


def _distinct_per_row(rng: np.random.Generator, num_rows: int, low: int, high: int, k: int) -> np.ndarray:
    """[num_rows, k] ints from [low, high), distinct within each row, uniformly at random."""
    return low + np.stack([rng.choice(high - low, size=k, replace=False) for _ in range(num_rows)])


def _power_law_gaps(rng: np.random.Generator, num_rows: int, space: int, k: int, power_a: float) -> np.ndarray:
    """[num_rows, k] distinct slots from [0, space), drawn one after another without replacement with
    p(i) ∝ a·(i+1)^(a-1); the Gumbel top-k trick gives exactly that sequential (Plackett-Luce) law, vectorized."""
    log_p = np.log(power_a) + (power_a - 1) * np.log(np.arange(1, space + 1))
    scores = log_p + rng.gumbel(size=(num_rows, space))
    return np.argsort(-scores, axis=1)[:, :k]


def _check_mqar_args(num_examples: int, seq_len: int, num_kv_pairs: int, vocab_size: int, power_a: float) -> None:
    if num_examples < 1:
        raise ValueError(f"num_examples: {num_examples} must be at least 1")
    if num_kv_pairs < 1:
        raise ValueError(f"num_kv_pairs: {num_kv_pairs} must be at least 1")
    if seq_len % 2:
        raise ValueError(f"seq_len: {seq_len} must be even")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size: {vocab_size} must exceed seq_len={seq_len}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"num_kv_pairs: 4 * {num_kv_pairs} must be at most seq_len={seq_len}")
    if power_a <= 0:
        raise ValueError(f"power_a: {power_a} must be positive")


def mqar(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    power_a: float = 0.01,
    random_non_queries: bool = False,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-query associative recall, as Zoology's `multiquery_ar.py` defines it. Returns int32 (inputs, labels).

    Each row starts with `num_kv_pairs` pairs `k1 v1 k2 v2 ...`: distinct keys from [1, V/2) and distinct values
    from [V/2, V). Each key then appears once more, at position `2·num_kv_pairs + 2·gap` with the gaps drawn
    without replacement from p(gap) ∝ a·(gap+1)^(a-1) (small gaps likely); the first-drawn gap goes to k1.
    Every other position holds 0, or a uniform token from [0, V) with `random_non_queries`.

    Label alignment (next-token prediction, as in Zoology after its one-token shift): `labels[t]` is the target
    for the model's output at position t, so the value sits at the query key's own position t
    (`inputs[t] == k_j` → `labels[t] == v_j`); every other label is IGNORE_INDEX (-100). The value itself never
    appears after the query in `inputs`. Exactly `num_kv_pairs` labels per row are set.
    """
    _check_mqar_args(num_examples, seq_len, num_kv_pairs, vocab_size, power_a)
    rng = np.random.default_rng(seed)
    context_size = 2 * num_kv_pairs
    keys = _distinct_per_row(rng, num_examples, 1, vocab_size // 2, num_kv_pairs)
    values = _distinct_per_row(rng, num_examples, vocab_size // 2, vocab_size, num_kv_pairs)
    query_positions = context_size + 2 * _power_law_gaps(
        rng, num_examples, (seq_len - context_size) // 2, num_kv_pairs, power_a
    )

    inputs = np.zeros((num_examples, seq_len), dtype=np.int32)
    inputs[:, 0:context_size:2] = keys
    inputs[:, 1:context_size:2] = values
    np.put_along_axis(inputs, query_positions, keys, axis=1)
    labels = np.full((num_examples, seq_len), IGNORE_INDEX, dtype=np.int32)
    np.put_along_axis(labels, query_positions, values, axis=1)
    if random_non_queries:
        filler = inputs == 0
        inputs[filler] = rng.integers(0, vocab_size, size=int(filler.sum()))
    return inputs, labels
