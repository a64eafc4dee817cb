"""The training loop, functional style: `graphdef, params, rest = nnx.split(model, nnx.Param, ...)`.

Only `params` (fp32 master weights, in `ModelConfig.param_dtype`) are trained; `rest` (any other nnx state) is
passed through unchanged. The model computes in `ModelConfig.dtype`. A jitted
`train_step(params, opt_state, x, y) -> params, opt_state, metrics` does one AdamW update on
loss = mean cross-entropy over targets != IGNORE_INDEX + out.aux_loss.

A run directory collects metrics.jsonl (one JSON line per log step and per evaluation), checkpoints/, loss.png
and sample.txt; see `attnzoo.train.checkpoint` for its layout and for resuming.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from attnzoo.data.dataset import IGNORE_INDEX
from attnzoo.generate import generate
from attnzoo.train.checkpoint import Checkpointer, prepare_run_dir
from attnzoo.train.optim import TrainConfig, current_learning_rate, make_optimizer
from attnzoo.train.sharding import Placement, is_primary_process

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SAMPLE_FILE = "sample.txt"
TOKENIZER_DIR = "tokenizer"


def cross_entropy_sum(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token cross-entropies, number of scored tokens) over targets != IGNORE_INDEX."""
    scored = targets_BT != IGNORE_INDEX
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV.astype(jnp.float32), jnp.where(scored, targets_BT, 0))
    return jnp.sum(jnp.where(scored, ce, 0.0)), jnp.sum(scored)


def loss_fn(params, graphdef, rest, x_BT, y_BT) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training loss = mean cross-entropy + the mixers' aux loss; aux = {ce, aux_loss, model metrics}."""
    out = nnx.merge(graphdef, params, rest)(x_BT)
    ce_sum, count = cross_entropy_sum(out.logits_BTV, y_BT)
    ce = ce_sum / jnp.maximum(count, 1)
    return ce + out.aux_loss, {"ce": ce, "aux_loss": out.aux_loss, **out.metrics}


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation,
                     placement: Placement | None = None):
    """`(graphdef, params, rest, opt_state)` of `model`, placed on the mesh when there is a placement
    (the optimizer state is created directly in its sharded layout)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if placement is None:
        return graphdef, params, rest, optimizer.init(params)
    params, rest = placement.place_state(params), jax.device_put(rest, placement.replicated)
    opt_shardings = placement.state_shardings(jax.eval_shape(optimizer.init, params))
    return graphdef, params, rest, jax.jit(optimizer.init, out_shardings=opt_shardings)(params)


def make_train_step(graphdef, rest, optimizer: optax.GradientTransformation,
                    placement: Placement | None = None) -> Callable:
    """A jitted `train_step(params, opt_state, x, y) -> (params, opt_state, metrics)` for an optimizer made by
    `make_optimizer`. Params and opt_state are donated; with a placement they keep their shardings."""

    def step(params, opt_state, rest, x_BT, y_BT):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, rest, x_BT, y_BT)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if placement is not None:
            params = jax.lax.with_sharding_constraint(params, placement.state_shardings(params))
            opt_state = jax.lax.with_sharding_constraint(opt_state, placement.state_shardings(opt_state))
        metrics = {"loss": loss, **metrics, "grad_norm": optax.global_norm(grads),
                   "lr": current_learning_rate(opt_state)}
        return params, opt_state, metrics

    jitted = jax.jit(step, donate_argnums=(0, 1))
    return lambda params, opt_state, x_BT, y_BT: jitted(params, opt_state, rest, x_BT, y_BT)


def make_eval_step(graphdef, rest) -> Callable:
    """A jitted `eval_step(params, x, y) -> (sum of cross-entropies, scored tokens)`."""

    @jax.jit
    def step(params, rest, x_BT, y_BT):
        return cross_entropy_sum(nnx.merge(graphdef, params, rest)(x_BT).logits_BTV, y_BT)

    return lambda params, x_BT, y_BT: step(params, rest, x_BT, y_BT)


def evaluate(eval_step: Callable, params, batches: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int,
             place_batch: Callable = jnp.asarray) -> dict[str, float]:
    """Token-weighted validation cross-entropy and perplexity. A short last batch is padded with ignored rows,
    so every batch has one shape (one compilation)."""
    total, count = 0.0, 0
    for x, y in batches:
        if len(x) < batch_size:
            pad = ((0, batch_size - len(x)), (0, 0))
            x, y = np.pad(x, pad), np.pad(y, pad, constant_values=IGNORE_INDEX)
        ce_sum, n = eval_step(params, place_batch(x), place_batch(y))
        total, count = total + ce_sum, count + n  # summed on device: no host sync per batch
    if int(count) == 0:
        raise ValueError("evaluate: the validation batches hold no scored tokens")
    val_loss = float(total) / int(count)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}


class _Throughput:
    """Training tokens/s per log window and overall, leaving out compilation, evaluation and checkpointing."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step, self.start = tokens_per_step, None

    def begin(self, step: int) -> None:
        self.start = self.window_start = time.perf_counter()
        self.start_step = self.window_step = step

    def exclude(self, seconds: float) -> None:
        self.start, self.window_start = self.start + seconds, self.window_start + seconds

    def _rate(self, steps: int, since: float) -> float | None:
        return steps * self.tokens_per_step / (time.perf_counter() - since) if steps > 0 else None

    def window(self, step: int) -> float | None:
        """Since the previous call (or `begin`); starts the next window."""
        rate = self._rate(step - self.window_step, self.window_start)
        self.window_start, self.window_step = time.perf_counter(), step
        return rate

    def overall(self, step: int) -> float | None:
        return None if self.start is None else self._rate(step - self.start_step, self.start)


class _DeferredInterrupt:
    """Turns the first Ctrl-C into a flag the loop checks between steps, so that the checkpoint it then writes
    holds a consistent (step, params, opt_state); a second Ctrl-C raises at once."""

    def __enter__(self) -> "_DeferredInterrupt":
        self.requested, self._previous = False, None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class MetricsLog:
    """Append-only JSON lines (written by process 0); on resume, lines after the restored step are dropped
    (they will be redone)."""

    def __init__(self, path: str | Path):
        self.path, self.writes = Path(path), is_primary_process()

    def append(self, record: dict[str, Any]) -> None:
        if self.writes:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        if not self.writes:
            return
        kept = [r for r in self.records() if r["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)


def plot_losses(records: list[dict[str, Any]], path: str | Path, baseline: float | None = None) -> Path:
    """Train loss and validation loss against step, saved as a PNG; `baseline` (e.g. the unigram entropy, the
    loss of a model that ignores context) is drawn as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss (cross-entropy)")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label=f"unigram entropy {baseline:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int
    val_loss: float | None
    val_ppl: float | None
    tokens_per_s: float | None  # this session's training throughput, compilation excluded
    sample: str | None
    metrics_path: Path
    plot_path: Path | None


class Trainer:
    """Trains `model` on `dataset` (anything with `batch` and `eval_batches`, see attnzoo.data) into `run_dir`.

    `run_dir` must already be prepared (`prepare_run_dir`, or use `train`). After training, a sample continuing
    `sample_prompt` is generated with `tokenizer` (skipped when there is no tokenizer or sample_tokens == 0).
    The model's parameter arrays are donated to the first step: read the trained model from `trainer.model`.
    """

    def __init__(self, model: nnx.Module, config: TrainConfig, dataset, run_dir: str | Path, *,
                 tokenizer=None, sample_prompt: str = "\n", sample_tokens: int = 200,
                 sample_temperature: float = 0.8, echo: Callable[[str], None] = print, progress: bool = True,
                 loss_baseline: float | None = None):
        self.config, self.dataset, self.run_dir = config, dataset, Path(run_dir)
        self.tokenizer, self.sample_prompt, self.sample_tokens = tokenizer, sample_prompt, sample_tokens
        self.sample_temperature, self.echo, self.progress = sample_temperature, echo, progress
        self.loss_baseline = loss_baseline
        self.placement = Placement.create(config.parallelism)
        self.optimizer = make_optimizer(config)
        self.graphdef, self.params, self.rest, self.opt_state = init_train_state(model, self.optimizer,
                                                                                 self.placement)
        self.step = 0
        self.train_step = make_train_step(self.graphdef, self.rest, self.optimizer, self.placement)
        self.eval_step = make_eval_step(self.graphdef, self.rest)
        self.checkpointer = Checkpointer(self.run_dir, config.keep_checkpoints)
        self.log = MetricsLog(self.run_dir / METRICS_FILE)

    def _place_batch(self, batch: np.ndarray) -> jax.Array:
        return jnp.asarray(batch) if self.placement is None else self.placement.place_batch(batch)

    @property
    def model(self) -> nnx.Module:
        """The model with the current parameters."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    def restore_latest(self) -> int:
        """Load the latest checkpoint (if any) and rewind the metrics log to it; returns the step reached."""
        if self.checkpointer.latest_step() is not None:
            self.params, self.opt_state, meta = self.checkpointer.restore(self.params, self.opt_state)
            if meta["seed"] != self.config.seed:
                raise ValueError(f"checkpoint seed {meta['seed']} differs from config seed {self.config.seed}")
            self.step = meta["step"]
        self.log.truncate_after(self.step)
        return self.step

    def save(self) -> None:
        """Checkpoint the current step (no-op if it is already the latest checkpoint)."""
        if self.checkpointer.latest_step() != self.step:
            self.checkpointer.save(self.step, self.params, self.opt_state, self.config.seed)

    def evaluate(self) -> dict[str, float]:
        cfg = self.config
        batches = self.dataset.eval_batches("val", cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        return evaluate(self.eval_step, self.params, batches, cfg.batch_size, self._place_batch)

    def run(self, until: int | None = None) -> TrainResult:
        """Train up to step `until` (default: config.steps), logging, evaluating and checkpointing on the way.

        A checkpoint is written at `until`. The first Ctrl-C finishes the current step, checkpoints it and raises
        KeyboardInterrupt; a second one interrupts at once.
        """
        cfg = self.config
        until = cfg.steps if until is None else min(until, cfg.steps)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.progress and is_primary_process()))
        speed = _Throughput(cfg.tokens_per_step)
        last_eval: dict[str, float] | None = None
        with _DeferredInterrupt() as interrupt:
            while self.step < until:
                x, y = self.dataset.batch("train", self.step, cfg.batch_size, cfg.seq_len, cfg.seed)
                self.params, self.opt_state, metrics = self.train_step(
                    self.params, self.opt_state, self._place_batch(x), self._place_batch(y))
                self.step += 1
                bar.update(1)
                if speed.start is None:  # the first step compiles: time throughput from its end
                    jax.block_until_ready(metrics["loss"])
                    speed.begin(self.step)
                if self.step % cfg.log_every == 0 or self.step == until:
                    record = {"kind": "train", "step": self.step, "tokens": self.step * cfg.tokens_per_step,
                              **{k: float(v) for k, v in jax.device_get(metrics).items()}}
                    if (tokens_per_s := speed.window(self.step)) is not None:
                        record["tokens_per_s"] = tokens_per_s
                        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                    self.log.append(record)
                eval_due = self.step % cfg.eval_every == 0 or self.step == cfg.steps
                save_due = self.step % cfg.ckpt_every == 0 or self.step == until
                if eval_due or save_due:
                    jax.block_until_ready(self.params)  # updates still in flight count as training time
                    pause_start = time.perf_counter()
                    if eval_due:
                        last_eval = self.evaluate()
                        self.log.append({"kind": "eval", "step": self.step,
                                         "tokens": self.step * cfg.tokens_per_step, **last_eval})
                        bar.write(f"step {self.step}: val loss {last_eval['val_loss']:.4f}, "
                                  f"perplexity {last_eval['val_ppl']:.2f}")
                    if save_due:
                        self.save()
                    speed.exclude(time.perf_counter() - pause_start)
                if interrupt.requested:
                    bar.close()
                    self.save()
                    self.checkpointer.wait()
                    self.echo(f"interrupted: checkpoint saved at step {self.step} in {self.checkpointer.directory}")
                    raise KeyboardInterrupt
        tokens_per_s = speed.overall(self.step)
        bar.close()
        self.checkpointer.wait()
        finished = self.step == cfg.steps
        if finished and last_eval is None:  # resumed an already finished run
            last_eval = self.evaluate()
        sample = self.write_sample() if finished else None
        plot = None
        if finished and is_primary_process():
            plot = plot_losses(self.log.records(), self.run_dir / PLOT_FILE, self.loss_baseline)
        last_eval = last_eval or {}
        return TrainResult(self.step, last_eval.get("val_loss"), last_eval.get("val_ppl"), tokens_per_s, sample,
                           self.log.path, plot)

    def write_sample(self) -> str | None:
        """Continue `sample_prompt` with the current model; written to sample.txt and returned."""
        if self.tokenizer is None or self.sample_tokens <= 0:
            return None
        prompt = [int(t) for t in self.tokenizer.encode(self.sample_prompt)] or [self.tokenizer.bos_id]
        [tokens] = generate(self.model, [prompt], self.sample_tokens, temperature=self.sample_temperature,
                            top_k=40, seed=self.config.seed)
        text = self.sample_prompt + self.tokenizer.decode(tokens)
        if is_primary_process():
            (self.run_dir / SAMPLE_FILE).write_text(text)
        return text

    def close(self) -> None:
        self.checkpointer.close()


def run_config(model_config, train_config: TrainConfig, data: dict[str, Any], tokenizer) -> dict[str, Any]:
    """What run.json holds and what `--resume` compares: the model, training, data and tokenizer identity."""
    return {"model": model_config.to_dict(), "train": train_config.to_dict(), "data": data,
            "tokenizer": {"kind": tokenizer.kind, "identity": tokenizer.identity, "vocab_size": tokenizer.vocab_size}}


def train(model: nnx.Module, config: TrainConfig, dataset, run_dir: str | Path, *, data: dict[str, Any],
          tokenizer, resume: bool = False, **trainer_options) -> TrainResult:
    """Prepare `run_dir` (fresh: write run.json and the tokenizer; resume: check the saved config), then train
    to `config.steps`, continuing from the latest checkpoint when resuming. `model` ends up holding the trained
    parameters."""
    prepare_run_dir(run_dir, run_config(model.config, config, data, tokenizer), resume)
    if not resume and is_primary_process():
        tokenizer.save(Path(run_dir) / TOKENIZER_DIR)
    trainer = Trainer(model, config, dataset, run_dir, tokenizer=tokenizer, **trainer_options)
    try:
        if resume:
            trainer.restore_latest()
        result = trainer.run()
    finally:
        trainer.close()
    nnx.update(model, trainer.params)
    return result
