"""Training hyperparameters and the optimizer: global-norm clipping + AdamW, linear warmup then cosine decay."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

PARALLELISMS = ("none", "dp", "fsdp")

# Parameters whose (lower-cased) path mentions one of these never get weight decay (in addition to every 1-D
# parameter): norms, biases, and state-space decay rates (Mamba's A_log, as the reference exempts it).
NO_DECAY_NAMES = ("norm", "bias", "a_log")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run besides the model and the data (JSON-able, frozen).

    The compute dtype is the model's (`ModelConfig.dtype`); parameters and optimizer state stay in
    `ModelConfig.param_dtype`.

    `schedule_steps` is the length of the learning-rate schedule (None: `steps`): linear warmup over
    `warmup_steps` updates, then a cosine to `lr * min_lr_ratio` at update `schedule_steps - 1`, then that floor
    for any later update. A run extended past its original end keeps its original schedule and continues at the
    floor, so its first `schedule_steps` updates are exactly those of the original run.
    """

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 100
    eval_batches: int = 20
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    parallelism: str = "none"  # "none" | "dp" (replicated params) | "fsdp" (sharded params + optimizer state)
    schedule_steps: int | None = None  # length of the learning-rate schedule; None: steps

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "ckpt_every",
                     "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.schedule_steps is not None and not 0 < self.schedule_steps <= self.steps:
            raise ValueError(f"schedule_steps={self.schedule_steps} must be in [1, steps={self.steps}] "
                             "(or None for steps)")
        if not 0 <= self.warmup_steps < self.schedule_length:
            bound = "steps" if self.schedule_steps is None else "schedule_steps"
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, {bound}={self.schedule_length})")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got lr={self.lr}, "
                             f"min_lr_ratio={self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if self.parallelism not in PARALLELISMS:
            raise ValueError(f"parallelism={self.parallelism!r} is not one of {', '.join(PARALLELISMS)}")

    @property
    def schedule_length(self) -> int:
        """Updates the warmup + cosine schedule spans; later updates use the floor learning rate."""
        return self.steps if self.schedule_steps is None else self.schedule_steps

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"train config: unknown fields {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Learning rate of update `count` (0-based): linear warmup to `lr` over `warmup_steps` updates (the first
    update already uses lr / warmup_steps), then a cosine to `lr * min_lr_ratio` at update `schedule_length - 1`,
    and that floor afterwards."""
    warmup, decay_steps = cfg.warmup_steps, max(cfg.schedule_length - 1 - cfg.warmup_steps, 1)
    floor = cfg.lr * cfg.min_lr_ratio

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = cfg.lr * (count + 1) / max(warmup, 1)
        progress = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
        cosine = floor + 0.5 * (cfg.lr - floor) * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(count < warmup, warm, cosine)

    return schedule


def weight_decay_mask(params) -> Any:
    """True for parameters that get weight decay: matrices and embeddings, not norms, biases or 1-D params."""

    def decays(path, leaf) -> bool:
        names = jax.tree_util.keystr(path).lower()
        return jnp.ndim(leaf) >= 2 and not any(name in names for name in NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) -> AdamW(schedule, b1, b2, masked weight decay).

    The learning rate of the latest update is readable from the state with `current_learning_rate`.
    """
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
        weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)


def current_learning_rate(opt_state) -> jax.Array:
    """The learning rate the latest update used (state made by `make_optimizer`)."""
    return opt_state[1].hyperparams["learning_rate"]


def applied_updates(opt_state) -> int:
    """How many updates the optimizer (made by `make_optimizer`) has applied: skipped steps do not count."""
    return int(opt_state[1].count)
