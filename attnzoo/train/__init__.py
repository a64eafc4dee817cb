"""Training: optimizer, checkpoints and run directories, sharding, the training loop, and the CLIs."""

from attnzoo.train.checkpoint import Checkpointer, ConfigMismatchError, RunDirError, prepare_run_dir
from attnzoo.train.optim import TrainConfig, learning_rate_schedule, make_optimizer, weight_decay_mask
from attnzoo.train.sharding import Placement, maybe_initialize_distributed
from attnzoo.train.tracking import TrackingConfig
from attnzoo.train.trainer import (
                                   NonFiniteLossError,
                                   Trainer,
                                   TrainingInterrupted,
                                   TrainResult,
                                   evaluate,
                                   init_train_state,
                                   make_eval_step,
                                   make_train_step,
                                   train,
)

__all__ = ["Checkpointer", "ConfigMismatchError", "NonFiniteLossError", "Placement", "RunDirError", "TrainConfig",
           "TrainResult", "Trainer", "TrainingInterrupted", "evaluate", "init_train_state", "learning_rate_schedule",
           "make_eval_step", "make_optimizer", "make_train_step", "maybe_initialize_distributed", "prepare_run_dir",
           "TrackingConfig", "train", "weight_decay_mask"]
