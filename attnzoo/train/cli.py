"""`attnzoo-train`: train a decoder LM from a preset and a layer plan on local text, resumable.

    attnzoo-train --preset tiny                                  # stdlib Python sources, byte tokens
    attnzoo-train --preset tiny --plan "gqa*3,mqa" --data notes/ --tokenizer bpe --bpe-vocab 2048
    attnzoo-train --run-dir runs/x --resume                      # continue a run (same model and data flags)
    attnzoo-train --run-dir runs/x --resume --steps 2000         # ... and extend it to 2000 steps
    attnzoo-train --init-from hf/llama --data notes/             # fine-tune a Hugging Face-format checkpoint
    attnzoo-train --init-from hf/llama --plan "gqa*6,gated*2"    # ... with the last two layers' mixers replaced

--resume takes the training settings it is not given from the run's run.json; the model, data and tokenizer
flags must match the run's. A larger --steps extends the run: its learning-rate schedule keeps its original
length (warmup, then cosine to the floor at the original last step) and the added steps train at the floor
learning rate, so the steps already trained are unchanged.

--init-from DIR takes the model's shape and weights from a Hugging Face directory (attnzoo.interop; its tokenizer
too, else --tokenizer's, which must fit the vocabulary) instead of --preset. With --plan (one entry per layer),
the layers whose entry differs from the checkpoint's start with a freshly initialised mixer; their norms and MLP
and every other layer load. Parameters train in float32 whatever the checkpoint's dtype.

Metrics go to RUN_DIR/metrics.jsonl and, unless --no-tb, as TensorBoard scalars to RUN_DIR/tb
(`tensorboard --logdir RUN_DIR/tb`); --wandb PROJECT / --trackio PROJECT log them to Weights & Biases / trackio too
(when installed).

A run's checkpoints are used afterwards with attnzoo-generate (sampling), attnzoo-eval (loss, perplexity) and
attnzoo-export (a Hugging Face directory with a model card).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from flax import nnx

from attnzoo.config import PRESETS, get_preset
from attnzoo.data import TokenDataset, load_corpus, load_tokenizer, make_tokenizer, unigram_entropy
from attnzoo.data.corpus import DATA_HELP
from attnzoo.data.tokenizers import load_directory_tokenizer
from attnzoo.model import LanguageModel
from attnzoo.train.checkpoint import RUN_CONFIG_FILE, ConfigMismatchError, RunDirError, ensure_no_run, read_run_config
from attnzoo.train.optim import PARALLELISMS, TrainConfig
from attnzoo.train.sharding import maybe_initialize_distributed
from attnzoo.train.tracking import TENSORBOARD_DIR, TrackingConfig
from attnzoo.train.trainer import TOKENIZER_DIR, NonFiniteLossError, TrainingInterrupted, train

# Training defaults per preset. `tiny` is sized to finish on a 2-core CPU in a few minutes.
PRESET_TRAINING: dict[str, TrainConfig] = {
    "tiny": TrainConfig(steps=600, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=50, eval_every=100,
                        eval_batches=10, ckpt_every=200, log_every=10),
    "small": TrainConfig(steps=5000, batch_size=32, seq_len=512, lr=1e-3, warmup_steps=200, eval_every=250,
                         ckpt_every=1000),
    "gpt2-small": TrainConfig(steps=20000, batch_size=64, seq_len=1024, lr=6e-4, warmup_steps=1000,
                              eval_every=500, ckpt_every=2000),
}
BPE_TRAINING_CHARS = 20_000_000  # the BPE tokenizer learns its merges from at most this much training text

# argparse destination -> TrainConfig field, for the flags that override the preset's training defaults.
TRAIN_FLAGS = {"steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len", "lr": "lr",
               "warmup": "warmup_steps", "weight_decay": "weight_decay", "grad_clip": "grad_clip",
               "eval_every": "eval_every", "ckpt_every": "ckpt_every", "keep": "keep_checkpoints",
               "log_every": "log_every", "seed": "seed", "parallelism": "parallelism"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnzoo-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help=f"model size: {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--plan", help="layer plan with one entry per layer of the preset, e.g. 'gqa*3,mqa' for tiny "
                                  "(default: GQA in every layer; with --init-from: the checkpoint's, and layers "
                                  "given another mixer start fresh)")
    p.add_argument("--init-from", metavar="DIR", help="start from a Hugging Face-format checkpoint directory "
                                                      "(config.json + *.safetensors) instead of --preset")
    p.add_argument("--kernel", action="append", default=[], metavar="OP=IMPL",
                   help="a kernel op's implementation, e.g. flash_attention=cudnn or flash_attention=mosaic_gpu,triton "
                        "(tried in order); repeatable; default auto (see pallas_kernels.ops)")
    p.add_argument("--data", nargs="+", default=["stdlib"], help=f"training text; {DATA_HELP} (default stdlib)")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    p.add_argument("--bpe-vocab", type=int, default=4096, help="BPE vocabulary size (with --tokenizer bpe)")
    p.add_argument("--steps", type=int, help="training steps; with --resume, more than the run's extends it "
                                             "(the added steps train at the schedule's floor learning rate)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="warmup steps (default: the preset's, at most steps/10)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float, help="max global gradient norm (0: off)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype; parameters and optimizer state stay float32")
    p.add_argument("--parallelism", choices=PARALLELISMS, help="none, dp (data parallel) or fsdp (sharded)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--log-every", type=int, help="steps between metrics lines in metrics.jsonl")
    p.add_argument("--keep", type=int, help="checkpoints to keep")
    p.add_argument("--run-dir", help="output directory (default runs/<preset>-<plan>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint "
                                                         "(training flags not given keep the run's values)")
    p.add_argument("--seed", type=int)
    p.add_argument("--sample-tokens", type=int, default=200, help="tokens to generate at the end (0: none)")
    p.add_argument("--prompt", help="prompt for the final sample (default 'def ' on stdlib, else a newline)")
    p.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after this many non-finite steps in a row (each is skipped, never applied; default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-tb", action="store_true", help="no TensorBoard event files (default: in RUN_DIR/tb)")
    p.add_argument("--wandb", metavar="PROJECT", help="also log the metrics to this Weights & Biases project "
                                                      "(needs the wandb package)")
    p.add_argument("--trackio", metavar="PROJECT", help="also log the metrics to this trackio project "
                                                        "(needs the trackio package)")
    return p


def cache_dir() -> Path:
    """Where tokenized corpora are cached: $ATTNZOO_CACHE, else ~/.cache/attnzoo."""
    return Path(os.environ.get("ATTNZOO_CACHE") or Path.home() / ".cache" / "attnzoo")


def _default_run_dir(preset: str, plan: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{preset}-{plan}").strip("_")
    return Path("runs") / f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def _bounded_texts(texts, max_chars: int):
    for text in texts:
        if max_chars <= 0:
            return
        yield text[:max_chars]
        max_chars -= len(text)


def _tokenizer(args, corpus, run_dir: Path):
    """--init-from: the checkpoint's tokenizer when it has one. Resume: the run's saved tokenizer (run.json then
    checks it is the requested one). Fresh: bytes, or BPE learned from the training split."""
    if args.init_from:
        from attnzoo.interop import read_config  # safetensors is needed only here

        tokenizer = load_directory_tokenizer(args.init_from, read_config(args.init_from)[0])
        if tokenizer is not None:
            return tokenizer
    if args.resume and (run_dir / TOKENIZER_DIR).exists():
        return load_tokenizer(run_dir / TOKENIZER_DIR)
    texts = _bounded_texts(corpus.iter_texts("train"), BPE_TRAINING_CHARS) if args.tokenizer == "bpe" else None
    return make_tokenizer(args.tokenizer, texts, vocab_size=args.bpe_vocab)


def _data_identity(args, corpus) -> dict:
    """The data part of run.json: the corpus and the tokenizer as requested (`--resume` compares it)."""
    identity = {"name": corpus.name, "fingerprint": corpus.fingerprint, "tokenizer": args.tokenizer}
    if args.tokenizer == "bpe":
        identity["bpe_vocab"] = args.bpe_vocab
    return identity


def _kernel_choices(flags: list[str]) -> dict[str, str | tuple[str, ...]]:
    """--kernel OP=IMPL[,IMPL...] flags as ModelConfig.kernels (the config checks the names)."""
    choices = {}
    for flag in flags:
        op, sep, implementation = flag.partition("=")
        if not sep or not op or not implementation:
            raise ValueError(f"--kernel {flag!r}: write OP=IMPL, e.g. flash_attention=cudnn")
        names = tuple(implementation.split(","))
        choices[op] = names[0] if len(names) == 1 else names
    return choices


def _training_config(args, run_dir: Path) -> TrainConfig:
    """Fresh: the preset's training defaults with the flags' overrides; a shortened run shortens the warmup too.
    Resume: the run's saved settings with the flags' overrides; `--steps` may only grow (the schedule keeps its
    length, so the trained steps stay as they were)."""
    overrides = {field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    if args.resume:
        if not (run_dir / RUN_CONFIG_FILE).exists():
            raise RunDirError(f"--resume: {run_dir} holds no run ({RUN_CONFIG_FILE} not found); "
                              f"drop --resume to start a fresh run there")
        saved = TrainConfig.from_dict(read_run_config(run_dir)["train"])
        if args.steps is not None and args.steps < saved.steps:
            raise ConfigMismatchError(f"--steps {args.steps}: the run in {run_dir} has {saved.steps} steps; "
                                      f"--resume can extend a run (a larger --steps) but not shorten it")
        return saved.replace(**overrides)
    preset = PRESET_TRAINING.get(args.preset, TrainConfig())
    if args.steps is not None and args.warmup is None:
        overrides["warmup_steps"] = min(preset.warmup_steps, args.steps // 10)
    return preset.replace(**overrides)


def _model_shape(args):
    """(ModelConfig without the vocabulary and compute dtype, the checkpoint's config or None)."""
    kernels = _kernel_choices(args.kernel)
    if not args.init_from:
        return get_preset(args.preset, plan=args.plan, kernels=kernels), None
    from attnzoo.interop import read_config  # safetensors is needed only here

    pretrained = read_config(args.init_from)[2]
    return pretrained.replace(plan=args.plan or pretrained.plan, kernels=kernels, param_dtype="float32"), pretrained


def _fresh_layers(config, pretrained) -> list[int]:
    """The layers whose plan entry differs from the checkpoint's: their mixers start fresh."""
    return [i for i, (new, old) in enumerate(zip(config.layers, pretrained.layers)) if new != old]


def _init_from(model, args, pretrained) -> None:
    from attnzoo.interop import load_weights

    fresh = _fresh_layers(model.config, pretrained)
    skipped = load_weights(model, args.init_from, fresh_layers=fresh)
    print(f"init: weights from {args.init_from}"
          + (f"; layers {', '.join(map(str, fresh))} start with fresh mixers" if fresh else "")
          + (f"; left out (shapes differ): {', '.join(skipped)}" if skipped else ""))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and not args.run_dir:
        parser.error("--resume needs --run-dir (the run to continue)")
    maybe_initialize_distributed()
    try:
        # Configuration first, data last: a bad flag (ModelConfig checks every plan option) fails before any
        # tokenizing or writing.
        shape, pretrained = _model_shape(args)
        tracking = TrackingConfig(tensorboard=not args.no_tb, wandb=args.wandb, trackio=args.trackio)
        source = Path(args.init_from).name if args.init_from else args.preset
        run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(source, shape.plan)
        training = _training_config(args, run_dir)
        if training.seq_len > shape.max_seq_len:
            raise ValueError(f"seq_len={training.seq_len} exceeds the model's max_seq_len={shape.max_seq_len} "
                             f"({args.init_from or 'preset ' + args.preset}); choose --seq-len <= {shape.max_seq_len}")
        if not args.resume:
            ensure_no_run(run_dir)  # fail before reading data; `train` checks again before writing
        corpus = load_corpus(args.data, cache_dir())
        tokenizer = _tokenizer(args, corpus, run_dir)
        if tokenizer.eos_id is None:
            raise ValueError(f"--init-from {args.init_from}: its tokenizer names no end-of-text token (eos_token in "
                             f"tokenizer_config.json or eos_token_id in config.json); documents need one")
        if pretrained is not None and tokenizer.vocab_size > shape.vocab_size:
            raise ValueError(f"--init-from {args.init_from}: the tokenizer's {tokenizer.vocab_size} ids do not fit "
                             f"the checkpoint's vocab_size={shape.vocab_size}; give the directory a tokenizer.json")
        model_config = shape.replace(vocab_size=shape.vocab_size if pretrained else tokenizer.vocab_size,
                                     dtype=args.dtype)
        dataset = TokenDataset.build(corpus, tokenizer, cache_dir())
        dataset.check_seq_len(training.seq_len)  # before `train` writes the run directory
        entropy = unigram_entropy(dataset, "val")
    except (ValueError, FileNotFoundError, RunDirError) as error:
        parser.exit(2, f"attnzoo-train: error: {error}\n")
    model = LanguageModel(model_config, rngs=nnx.Rngs(training.seed))
    if pretrained is not None:
        try:
            _init_from(model, args, pretrained)
        except ValueError as error:
            parser.exit(2, f"attnzoo-train: error: {error}\n")
    origin = f"init from {args.init_from}" if pretrained else f"preset {args.preset}"
    print(f"model: {origin}, plan {model_config.plan}, compute {model_config.dtype}")
    print(model.summary(training.seq_len).table())
    print(f"data: {corpus.name} ({corpus.num_bytes():,} bytes), fingerprint {corpus.fingerprint[:16]}, "
          f"tokenizer {tokenizer.identity} (vocab {tokenizer.vocab_size}), "
          f"{dataset.num_tokens('train'):,} train / {dataset.num_tokens('val'):,} val tokens")
    print(f"unigram entropy of the val split: {entropy:.4f} nats/token (the loss to beat)")
    print(f"run dir: {run_dir}{' (resuming)' if args.resume else ''}")
    prompt = args.prompt if args.prompt is not None else ("def " if args.data == ["stdlib"] else "\n")
    try:
        result = train(model, training, dataset, run_dir, resume=args.resume, tokenizer=tokenizer,
                       data=_data_identity(args, corpus),
                       sample_prompt=prompt, sample_tokens=args.sample_tokens, progress=not args.no_progress,
                       loss_baseline=entropy, max_bad_steps=args.max_bad_steps, tracking=tracking)
    except (RunDirError, ConfigMismatchError) as error:
        parser.exit(2, f"attnzoo-train: error: {error}\n")
    except NonFiniteLossError as error:
        parser.exit(3, f"attnzoo-train: error: {error}\n")
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: the trainer checkpointed the last finished step
        if (run_dir / RUN_CONFIG_FILE).exists():
            print(f"continue with: attnzoo-train --run-dir {run_dir} --resume (and the same model and data flags)")
        else:
            print(f"stopped before the first checkpoint; nothing was kept in {run_dir}")
        return interrupt.exit_code if isinstance(interrupt, TrainingInterrupted) else 130
    if result.val_loss is not None:
        print(f"final val loss {result.val_loss:.4f} nats/token (unigram entropy {entropy:.4f}), "
              f"perplexity {result.val_ppl:.2f}")
    if result.tokens_per_s:
        print(f"throughput: {result.tokens_per_s:,.0f} tokens/s")
    if result.sample is not None:
        print(f"sample:\n{result.sample}\n")
    print(f"metrics: {result.metrics_path}"
          + (f", TensorBoard: {run_dir / TENSORBOARD_DIR}" if tracking.tensorboard else ""))
    if result.plot_path is not None:
        print(f"loss plot: {result.plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
