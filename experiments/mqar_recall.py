"""Associative recall (MQAR, Zoology) of recurrent, attention and hybrid plans: a small model per plan, trained on
the same examples, scored by recall accuracy at the query positions.

    python experiments/mqar_recall.py --out /tmp/mqar                       # pure Mamba-2 vs hybrids vs GQA
    python experiments/mqar_recall.py --plans "mamba2*4" "mamba2*3,gqa" --steps 300

Writes OUT/results.md, OUT/results.csv and OUT/mqar_recall.png (recall accuracy per plan). A recurrent state of
fixed size must compress every key-value pair it has seen, so pure recurrent stacks fall behind as pairs grow;
one attention layer in the stack restores exact lookup (Zoology, arXiv 2312.04927; the Mamba-2 paper's hybrids).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo import LanguageModel, ModelConfig, parse_plan
from attnzoo.data import IGNORE_INDEX, ArrayDataset, mqar
from attnzoo.train import TrainConfig
from attnzoo.train.trainer import Trainer

DEFAULT_PLANS = ("mamba2[mlp=none]*4", "mamba2[mlp=none]*3,gqa", "gqa*4")


def recall_accuracy(model: LanguageModel, inputs_NT: np.ndarray, labels_NT: np.ndarray) -> float:
    """Fraction of query positions whose argmax prediction is the stored value."""
    logits = jax.jit(lambda tokens: model(tokens).logits_BTV)(jnp.asarray(inputs_NT))
    scored = labels_NT != IGNORE_INDEX
    return float(np.mean(np.asarray(jnp.argmax(logits, -1))[scored] == labels_NT[scored]))


def model_config(plan: str, vocab: int, seq_len: int, d_model: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=len(parse_plan(plan)), n_heads=4,
                       max_seq_len=seq_len, plan=plan)


def run_plan(plan: str, splits, vocab: int, seq_len: int, training: TrainConfig, out: Path, d_model: int) -> dict:
    model = LanguageModel(model_config(plan, vocab, seq_len, d_model), rngs=nnx.Rngs(training.seed))
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=out))
    trainer = Trainer(model, training, ArrayDataset(splits, vocab), run_dir, progress=False, echo=lambda _: None)
    result = trainer.run()
    trainer.close()
    inputs, labels = splits["val"]
    accuracy = recall_accuracy(trainer.model, inputs, labels)
    return dict(plan=plan, params=model.summary(seq_len).total_params, val_loss=result.val_loss, accuracy=accuracy)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plans", nargs="+", default=list(DEFAULT_PLANS))
    p.add_argument("--out", default=None, help="output directory (default: a new temporary one)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--pairs", type=int, default=8, help="key-value pairs per example")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for plan in args.plans:  # every plan's config first: a bad plan fails before any training
        model_config(plan, args.vocab, args.seq_len, args.d_model)
    out = Path(args.out or tempfile.mkdtemp(prefix="mqar-"))
    out.mkdir(parents=True, exist_ok=True)
    splits = {split: mqar(n, args.seq_len, num_kv_pairs=args.pairs, vocab_size=args.vocab, seed=seed)
              for split, n, seed in (("train", 4096, args.seed), ("val", 256, args.seed + 1))}
    training = TrainConfig(steps=args.steps, batch_size=32, seq_len=args.seq_len, lr=3e-3,
                           warmup_steps=max(1, args.steps // 10), eval_every=args.steps, eval_batches=8,
                           ckpt_every=args.steps, log_every=max(1, args.steps // 10), seed=args.seed)
    rows = []
    for i, plan in enumerate(args.plans, 1):
        rows.append(run_plan(plan, splits, args.vocab, args.seq_len, training, out, args.d_model))
        print(f"plan {i}/{len(args.plans)} {plan}: recall accuracy {rows[-1]['accuracy']:.3f}, "
              f"val loss {rows[-1]['val_loss']:.3f}", flush=True)
    write_results(rows, out, f"MQAR, {args.pairs} pairs, seq {args.seq_len}, {args.steps} steps, d {args.d_model}")
    return rows


def write_results(rows: list[dict], out: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = ["| plan | params | val loss | recall accuracy |", "|---|---|---|---|"]
    table += [f"| `{r['plan']}` | {r['params']:,} | {r['val_loss']:.3f} | {r['accuracy']:.3f} |" for r in rows]
    (out / "results.md").write_text(f"{caption}\n\n" + "\n".join(table) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["plan"] for r in rows], [r["accuracy"] for r in rows])
    ax.set_xlabel("recall accuracy at query positions")
    ax.set_xlim(0, 1)
    ax.set_title(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "mqar_recall.png", dpi=110)
    plt.close(fig)
    print("\n".join(table))
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'mqar_recall.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
