"""A trained run directory, loaded for use: its model with one checkpoint's parameters, and its tokenizer.

Loading reads run.json, tokenizer/ and the checkpoint's parameters only: neither the training data nor the
optimizer state (see `Checkpointer.restore_params`). Used by `attnzoo-generate` and `attnzoo-eval`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from attnzoo.config import ModelConfig
from attnzoo.data import TokenDataset, Tokenizer, load_tokenizer
from attnzoo.model import LanguageModel
from attnzoo.train.checkpoint import RUN_CONFIG_FILE, Checkpointer, RunDirError, has_checkpoint, read_run_config
from attnzoo.train.optim import TrainConfig
from attnzoo.train.trainer import TOKENIZER_DIR, cross_entropy_sum, evaluate


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    run_dir: Path
    config: dict[str, Any]  # run.json
    training: TrainConfig
    tokenizer: Tokenizer
    model: LanguageModel  # holds the parameters of checkpoint `step`
    step: int


def load_run(run_dir: str | Path, step: int | None = None) -> LoadedRun:
    """The run in `run_dir` with the parameters of checkpoint `step` (default: the latest).

    Raises RunDirError when `run_dir` holds no run or no checkpoint, FileNotFoundError when `step` is not saved.
    """
    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG_FILE).exists():
        raise RunDirError(f"--run-dir: {run_dir} holds no run ({RUN_CONFIG_FILE} not found); "
                          f"pass a directory that attnzoo-train wrote")
    saved = read_run_config(run_dir)
    if not has_checkpoint(run_dir):
        raise RunDirError(f"--run-dir: {run_dir} holds no checkpoint yet; continue its training with "
                          f"attnzoo-train --run-dir {run_dir} --resume")
    training = TrainConfig.from_dict(saved["train"])
    model = LanguageModel(ModelConfig.from_dict(saved["model"]), rngs=nnx.Rngs(training.seed))
    # Non-parameter state that training updates (e.g. Routing Transformer centroids) is restored with the params.
    _, params_like, rest_like = nnx.split(model, nnx.Param, ...)
    with Checkpointer(run_dir, create=False) as checkpointer:
        params, meta, rest = checkpointer.restore_params(params_like, step, rest_like=rest_like)
    nnx.update(model, params, rest)
    return LoadedRun(run_dir, saved, training, load_tokenizer(run_dir / TOKENIZER_DIR), model, meta["step"])


def evaluate_model(model: LanguageModel, dataset: TokenDataset, split: str, batch_size: int, seq_len: int,
                   max_batches: int | None = None, skip_layers: tuple[int, ...] = ()) -> dict[str, float]:
    """Token-weighted cross-entropy and perplexity over the split's consecutive windows (as the trainer's
    validation does), optionally with the layers `skip_layers` removed."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def eval_step(params, rest, x_BT, y_BT):
        return cross_entropy_sum(nnx.merge(graphdef, params, rest)(x_BT, skip_layers=skip_layers).logits_BTV, y_BT)

    batches = dataset.eval_batches(split, batch_size, seq_len, max_batches)
    return evaluate(lambda p, x_BT, y_BT: eval_step(p, rest, x_BT, y_BT), params, batches, batch_size)


def diagnose_model(model: LanguageModel, dataset: TokenDataset, split: str, batch_size: int, seq_len: int,
                   max_batches: int | None = None, skip_layers: tuple[int, ...] = ()) -> dict[str, float]:
    """The mixers' evaluation diagnostics (`model(..., diagnostics=True)`, e.g. `layer0/sink_share`) averaged over
    the split's windows (`max_logit`-style maxima too: the mean of per-batch values)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def metrics_of(params, rest, x_BT):
        return nnx.merge(graphdef, params, rest)(x_BT, skip_layers=skip_layers, diagnostics=True).metrics

    totals, batches = {}, 0
    for x_BT, _ in dataset.eval_batches(split, batch_size, seq_len, max_batches):
        for name, value in metrics_of(params, rest, x_BT).items():
            totals[name] = totals.get(name, 0.0) + value
        batches += 1
    return {name: float(total) / batches for name, total in sorted(totals.items())}


def scored_tokens(dataset: TokenDataset, split: str, batch_size: int, seq_len: int,
                  max_batches: int | None = None) -> int:
    """How many targets `evaluate_model` scores with these settings."""
    windows = (dataset.num_tokens(split) - 1) // seq_len
    if max_batches is not None:
        windows = min(windows, max_batches * batch_size)
    return windows * seq_len
