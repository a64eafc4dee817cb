"""The training loop, functional style: `graphdef, params, rest = nnx.split(model, nnx.Param, ...)`.

Only `params` (fp32 master weights, in `ModelConfig.param_dtype`) are trained by the optimizer; `rest` (any other
nnx state) is what the forward itself updates in training mode: the step merges the model, calls `model.train()`
(modules with running statistics then update them in place, e.g. the Routing Transformer's k-means centroids) and
carries the new `rest` out beside the parameters; it is checkpointed with them. The model computes in
`ModelConfig.dtype`. A jitted `train_step(params, opt_state, x, y) -> params, opt_state, metrics` (its `rest`
attribute holding the current non-parameter state) does one AdamW update on
loss = mean cross-entropy over targets != IGNORE_INDEX + out.aux_loss.

A step whose loss or gradient norm is not finite is skipped: params, optimizer state and rest come out unchanged (so
the learning-rate schedule does not advance either), metrics["skipped"] is 1, and the batch still counts as
consumed: the trainer's step (its data position) advances, so a checkpoint written after skipped steps holds a
finite state. `max_bad_steps` skipped steps in a row stop the run with NonFiniteLossError, without a checkpoint.

SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption notice) both finish the current step, checkpoint it and
raise TrainingInterrupted; `--resume` then continues bit-exactly.

A run directory collects metrics.jsonl (one JSON line per log step and per evaluation) and, unless turned off,
TensorBoard event files of the same scalars in tb/ (the writers are `attnzoo.train.tracking`'s), checkpoints/,
loss.png and sample.txt; see `attnzoo.train.checkpoint` for its layout and for resuming.
"""

from __future__ import annotations

import dataclasses
import functools
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
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from attnzoo.data.dataset import IGNORE_INDEX
from attnzoo.generate import generate
from attnzoo.provenance import code_identity
from attnzoo.train.checkpoint import Checkpointer, discard_run_dir, has_checkpoint, prepare_run_dir
from attnzoo.train.optim import TrainConfig, applied_updates, current_learning_rate, make_optimizer
from attnzoo.train.sharding import Placement, is_primary_process, uses_preemption_service
from attnzoo.train.tracking import Tracking, TrackingConfig

DEFAULT_TRACKING = TrackingConfig()  # metrics.jsonl and TensorBoard

PLOT_FILE = "loss.png"
SAMPLE_FILE = "sample.txt"
TOKENIZER_DIR = "tokenizer"


def cross_entropy_sum(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token cross-entropies, number of scored tokens) over targets != IGNORE_INDEX."""
    scored = targets_BT != IGNORE_INDEX
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV.astype(jnp.float32), jnp.where(scored, targets_BT, 0))
    return jnp.sum(jnp.where(scored, ce, 0.0)), jnp.sum(scored)


def loss_fn(params, graphdef, rest, x_BT, y_BT) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
    """Training loss = mean cross-entropy + the mixers' aux loss, of the model in training mode; aux = ({ce,
    aux_loss, model metrics}, the non-parameter state after the forward)."""
    model = nnx.merge(graphdef, params, rest, copy=True)  # fresh variables, so the forward may update them here
    model.train()  # modules with running statistics (k-means centroids) update them during this forward
    out = model(x_BT)
    ce_sum, count = cross_entropy_sum(out.logits_BTV, y_BT)
    ce = ce_sum / jnp.maximum(count, 1)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return ce + out.aux_loss, ({"ce": ce, "aux_loss": out.aux_loss, **out.metrics}, new_rest)


class NonFiniteLossError(RuntimeError):
    """`bad_steps` training steps in a row, ending at `step`, had a non-finite loss or gradient norm. Their updates
    were skipped (so any checkpoint written among them holds the last good parameters) and the run stopped without
    checkpointing `step`: `last_checkpoint_step` (None when there is none) is the latest checkpoint, a finite
    state to resume from once the cause is fixed."""

    def __init__(self, step: int, bad_steps: int, last_checkpoint_step: int | None, checkpoint_dir: Path):
        self.step, self.bad_steps, self.last_checkpoint_step = step, bad_steps, last_checkpoint_step
        checkpoint = ("no checkpoint was written yet" if last_checkpoint_step is None else
                      f"the last good checkpoint is step {last_checkpoint_step} in {checkpoint_dir}")
        super().__init__(
            f"step {step}: {bad_steps} steps in a row (steps {step - bad_steps + 1}-{step}) had a non-finite loss "
            f"or gradient norm; their updates were skipped, so the parameters are those of step "
            f"{step - bad_steps}. Training stopped without a final checkpoint; {checkpoint}. Lower the learning rate "
            f"or check the data of those steps before resuming")


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on signal `signum` (SIGINT: Ctrl-C, SIGTERM: a scheduler's preemption notice) after
    checkpointing `step` (None when a second signal interrupted at once, without a new checkpoint). A shell
    reports such an exit as 128 + signum: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, signum: int, step: int | None):
        self.signum, self.step = signum, step
        super().__init__(f"{signal.Signals(signum).name}"
                         + (f": checkpoint saved at step {step}" if step is not None else ""))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


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


class TrainStep:
    """`train_step(params, opt_state, x, y) -> (params, opt_state, metrics)`; `train_step.rest` holds the model's
    non-parameter state (empty for most models), which each step reads and replaces with the state its forward
    left (see the module docstring)."""

    def __init__(self, jitted: Callable, rest):
        self._jitted, self.rest = jitted, rest

    def __call__(self, params, opt_state, x_BT, y_BT):
        params, opt_state, self.rest, metrics = self._jitted(params, opt_state, self.rest, x_BT, y_BT)
        return params, opt_state, metrics


def make_train_step(graphdef, rest, optimizer: optax.GradientTransformation,
                    placement: Placement | None = None) -> TrainStep:
    """A jitted `train_step(params, opt_state, x, y) -> (params, opt_state, metrics)` for an optimizer made by
    `make_optimizer`, starting from the non-parameter state `rest` (then in `train_step.rest`). Params and
    opt_state are donated; with a placement they keep their shardings (rest stays replicated).

    When the loss or the gradient norm is not finite, params, opt_state and rest are returned unchanged and
    metrics["skipped"] is 1 (else 0)."""

    def step(params, opt_state, rest, x_BT, y_BT):
        (loss, (metrics, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, rest, x_BT,
                                                                                       y_BT)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A select rather than lax.cond: the outputs still alias the donated inputs, and the cost is one pass.
        params, opt_state, rest = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                               (new_params, new_opt_state, new_rest), (params, opt_state, rest))
        if placement is not None:
            params = jax.lax.with_sharding_constraint(params, placement.state_shardings(params))
            opt_state = jax.lax.with_sharding_constraint(opt_state, placement.state_shardings(opt_state))
            rest = jax.lax.with_sharding_constraint(rest, placement.replicated)
        metrics = {"loss": loss, **metrics, "grad_norm": grad_norm, "lr": current_learning_rate(opt_state),
                   "skipped": jnp.logical_not(finite).astype(jnp.int32)}
        return params, opt_state, rest, metrics

    return TrainStep(jax.jit(step, donate_argnums=(0, 1)), rest)


def make_eval_step(graphdef, rest) -> Callable:
    """A jitted `eval_step(params, x, y, rest=rest) -> (sum of cross-entropies, scored tokens)`; pass the current
    non-parameter state as `rest` when training changes it."""

    @jax.jit
    def step(params, rest, x_BT, y_BT):
        return cross_entropy_sum(nnx.merge(graphdef, params, rest)(x_BT).logits_BTV, y_BT)

    return lambda params, x_BT, y_BT, rest=rest: step(params, rest, x_BT, y_BT)


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


class _DeferredSignals:
    """Turns the first of `signums` into a request (its signal number) that the loop checks between steps, so
    that the checkpoint it then writes holds a consistent (step, params, opt_state); a second one raises
    TrainingInterrupted at once. Handlers can only be installed from the main thread; elsewhere signals keep
    their default behaviour."""

    def __init__(self, signums: tuple[int, ...]):
        self.signums = signums

    def __enter__(self) -> "_DeferredSignals":
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.signums}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise TrainingInterrupted(signum, step=None)
        self.requested = signum

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class _SkippedSteps:
    """Counts skipped (non-finite) steps and the current run of them. The per-step flags are read one step late,
    so that the host never waits for the step it has just dispatched."""

    def __init__(self, max_in_a_row: int, total: int = 0):
        self.max_in_a_row, self.total, self.in_a_row = max_in_a_row, total, 0
        self._pending: list[tuple[int, jax.Array]] = []  # (step, its "skipped" flag on device), oldest first

    def add(self, step: int, skipped: jax.Array) -> None:
        self._pending.append((step, skipped))

    def settle(self, keep_latest: int = 0) -> int | None:
        """Read all pending flags but the latest `keep_latest`; returns the step at which `max_in_a_row` skipped
        steps in a row were reached, if they were."""
        cut = max(len(self._pending) - keep_latest, 0)
        ready, self._pending = self._pending[:cut], self._pending[cut:]
        for step, skipped in zip([step for step, _ in ready], jax.device_get([flag for _, flag in ready])):
            self.in_a_row = self.in_a_row + 1 if skipped else 0
            self.total += bool(skipped)
            if self.in_a_row >= self.max_in_a_row:
                return step
        return None


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
    `max_bad_steps` non-finite (skipped) steps in a row raise NonFiniteLossError. `tracking` picks the writers
    besides metrics.jsonl (TensorBoard by default; see `attnzoo.train.tracking`).
    """

    def __init__(self, model: nnx.Module, config: TrainConfig, dataset, run_dir: str | Path, *,
                 tokenizer=None, sample_prompt: str = "\n", sample_tokens: int = 200,
                 sample_temperature: float = 0.8, echo: Callable[[str], None] = print, progress: bool = True,
                 loss_baseline: float | None = None, max_bad_steps: int = 10,
                 tracking: TrackingConfig = DEFAULT_TRACKING):
        if max_bad_steps <= 0:
            raise ValueError(f"max_bad_steps={max_bad_steps} must be positive")
        self.config, self.dataset, self.run_dir = config, dataset, Path(run_dir)
        self.max_bad_steps = max_bad_steps
        self.tokenizer, self.sample_prompt, self.sample_tokens = tokenizer, sample_prompt, sample_tokens
        self.sample_temperature, self.echo, self.progress = sample_temperature, echo, progress
        self.loss_baseline = loss_baseline
        self.placement = Placement.create(config.parallelism)
        self.optimizer = make_optimizer(config)
        self.graphdef, self.params, rest, self.opt_state = init_train_state(model, self.optimizer, self.placement)
        self.step = 0
        self.train_step = make_train_step(self.graphdef, rest, self.optimizer, self.placement)
        self.eval_step = make_eval_step(self.graphdef, rest)
        self.checkpointer = Checkpointer(self.run_dir, config.keep_checkpoints)
        self.log = Tracking(self.run_dir, tracking)

    def _place_batch(self, batch: np.ndarray) -> jax.Array:
        return jnp.asarray(batch) if self.placement is None else self.placement.place_batch(batch)

    @property
    def rest(self):
        """The model's current non-parameter state (what the forward updates in training, e.g. centroids)."""
        return self.train_step.rest

    @property
    def model(self) -> nnx.Module:
        """The model with the current parameters and non-parameter state."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    def restore_latest(self) -> int:
        """Load the latest checkpoint (if any) and rewind the metrics log to it; returns the step reached."""
        if self.checkpointer.latest_step() is not None:
            self.params, self.opt_state, meta, self.train_step.rest = self.checkpointer.restore(
                self.params, self.opt_state, rest_like=self.rest)
            if meta["seed"] != self.config.seed:
                raise ValueError(f"checkpoint seed {meta['seed']} differs from config seed {self.config.seed}")
            self.step = meta["step"]
        self.log.rewind(self.step)
        return self.step

    def save(self) -> None:
        """Checkpoint the current step (no-op if it is already the latest checkpoint)."""
        if self.checkpointer.latest_step() != self.step:
            self.checkpointer.save(self.step, self.params, self.opt_state, self.config.seed, rest=self.rest)

    def evaluate(self) -> dict[str, float]:
        cfg = self.config
        batches = self.dataset.eval_batches("val", cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        return evaluate(functools.partial(self.eval_step, rest=self.rest), self.params, batches, cfg.batch_size,
                        self._place_batch)

    def run(self, until: int | None = None) -> TrainResult:
        """Train up to step `until` (default: config.steps), logging, evaluating and checkpointing on the way.

        A checkpoint is written at `until`. The first SIGINT (Ctrl-C) or SIGTERM finishes the current step,
        checkpoints it and raises TrainingInterrupted (a KeyboardInterrupt); a second one interrupts at once. In a
        multi-process run SIGTERM goes through JAX's preemption service instead, so that every process stops and
        checkpoints at the same step even when only some of them received it. `max_bad_steps` skipped
        (non-finite) steps in a row raise NonFiniteLossError without checkpointing.
        """
        cfg = self.config
        until = cfg.steps if until is None else min(until, cfg.steps)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.progress and is_primary_process()))
        speed = _Throughput(cfg.tokens_per_step)
        last_eval: dict[str, float] | None = None
        skipped = _SkippedSteps(self.max_bad_steps, total=self.step - applied_updates(self.opt_state))
        preemption_service = uses_preemption_service()

        def check_skipped(keep_latest: int = 0) -> None:
            if (abort_step := skipped.settle(keep_latest)) is not None:
                bar.close()
                self.checkpointer.wait()
                raise NonFiniteLossError(abort_step, skipped.in_a_row, self.checkpointer.latest_step(),
                                         self.checkpointer.directory)

        def checkpoint_and_stop(signum: int) -> None:
            bar.close()
            self.save()
            self.checkpointer.wait()
            self.echo(f"{signal.Signals(signum).name}: checkpoint saved at step {self.step} in "
                      f"{self.checkpointer.directory}")
            raise TrainingInterrupted(signum, self.step)

        deferred = (signal.SIGINT,) if preemption_service else (signal.SIGINT, signal.SIGTERM)
        with _DeferredSignals(deferred) as signals:
            while self.step < until:
                x, y = self.dataset.batch("train", self.step, cfg.batch_size, cfg.seq_len, cfg.seed)
                self.params, self.opt_state, metrics = self.train_step(
                    self.params, self.opt_state, self._place_batch(x), self._place_batch(y))
                self.step += 1
                bar.update(1)
                skipped.add(self.step, metrics["skipped"])
                check_skipped(keep_latest=1)
                if speed.start is None:  # the first step compiles: time throughput from its end
                    jax.block_until_ready(metrics["loss"])
                    speed.begin(self.step)
                if self.step % cfg.log_every == 0 or self.step == until:
                    check_skipped()
                    record = {"kind": "train", "step": self.step, "tokens": self.step * cfg.tokens_per_step,
                              **{k: float(v) for k, v in jax.device_get(metrics).items()},
                              "skipped_steps": skipped.total}
                    if (tokens_per_s := speed.window(self.step)) is not None:
                        record["tokens_per_s"] = tokens_per_s
                        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                    self.log.write(record)
                eval_due = self.step % cfg.eval_every == 0 or self.step == cfg.steps
                save_due = self.step % cfg.ckpt_every == 0 or self.step == until
                if eval_due or save_due:
                    jax.block_until_ready(self.params)  # updates still in flight count as training time
                    check_skipped()  # never checkpoint past the step that ends a run of max_bad_steps
                    pause_start = time.perf_counter()
                    if eval_due:
                        last_eval = self.evaluate()
                        self.log.write({"kind": "eval", "step": self.step,
                                        "tokens": self.step * cfg.tokens_per_step, **last_eval})
                        bar.write(f"step {self.step}: val loss {last_eval['val_loss']:.4f}, "
                                  f"perplexity {last_eval['val_ppl']:.2f}")
                    if save_due:
                        self.save()
                    speed.exclude(time.perf_counter() - pause_start)
                # Every process calls the preemption sync point at every step, as JAX requires.
                preempted = preemption_service and multihost_utils.reached_preemption_sync_point(self.step)
                if signals.requested is not None or preempted:
                    check_skipped()
                    checkpoint_and_stop(signal.SIGTERM if preempted else signals.requested)
            check_skipped()
            tokens_per_s = speed.overall(self.step)
            bar.close()
            self.checkpointer.wait()  # a signal arriving now waits for the last checkpoint, then stops the run
            if signals.requested is not None:
                checkpoint_and_stop(signals.requested)
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
        self.log.close()


def run_config(model_config, train_config: TrainConfig, data: dict[str, Any], tokenizer) -> dict[str, Any]:
    """What run.json holds: the model, training, data and tokenizer identity (what `--resume` compares) and the
    code making the run (recorded; a resume by other code is noted, not refused)."""
    return {"model": model_config.to_dict(), "train": train_config.to_dict(), "data": data,
            "tokenizer": {"kind": tokenizer.kind, "identity": tokenizer.identity, "vocab_size": tokenizer.vocab_size},
            "code": code_identity()}


def train(model: nnx.Module, config: TrainConfig, dataset, run_dir: str | Path, *, data: dict[str, Any],
          tokenizer, resume: bool = False, **trainer_options) -> TrainResult:
    """Prepare `run_dir` (fresh: write run.json and the tokenizer; resume: check the saved config, which may
    differ only by more `steps`), then train to `config.steps`, continuing from the latest checkpoint when
    resuming. A fresh run that fails before its first checkpoint removes what it wrote, so that `run_dir` can be
    used again. `model` ends up holding the trained parameters."""
    config = config.replace(schedule_steps=config.schedule_length)  # run.json records the schedule in use
    run_dir = Path(run_dir)
    run_dir_existed = run_dir.exists()
    prepare_run_dir(run_dir, run_config(model.config, config, data, tokenizer), resume)
    try:
        if is_primary_process() and not (run_dir / TOKENIZER_DIR).exists():
            tokenizer.save(run_dir / TOKENIZER_DIR)
        trainer = Trainer(model, config, dataset, run_dir, tokenizer=tokenizer, **trainer_options)
        try:
            if resume:
                trainer.restore_latest()
            result = trainer.run()
        finally:
            trainer.close()
    except BaseException:
        if not resume and is_primary_process() and not has_checkpoint(run_dir):
            discard_run_dir(run_dir, keep_directory=run_dir_existed)
        raise
    nnx.update(model, trainer.params, trainer.rest)
    return result
