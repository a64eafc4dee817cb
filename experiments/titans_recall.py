"""Associative recall past the attention window: Titans' MAG / MAC / MAL against sliding-window attention of the same
window (MQAR from `attnzoo.data.synthetic`, generated from a seed).

    python experiments/titans_recall.py --out /tmp/titans_recall                  # the default comparison
    python experiments/titans_recall.py --smoke --out /tmp/smoke                  # seconds: tiny sizes, 2 steps

Every plan is trained on the same examples with the same budget and scored by recall accuracy at the query
positions, split by how far the query sits after its key: "near" (within reach of the sliding-window stack: L layers
of window W see L (W - 1) tokens back, so attention alone can look the pair up) and "far" (beyond it: only a memory
can carry the pair). Writes OUT/results.md, OUT/results.csv and OUT/titans_recall.png (accuracy per plan, near and
far).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnzoo import LanguageModel, ModelConfig, parse_plan
from attnzoo.data import IGNORE_INDEX, ArrayDataset, mqar
from attnzoo.provenance import code_identity, describe
from attnzoo.train import TrainConfig
from attnzoo.train.trainer import NonFiniteLossError, Trainer


def default_plans(window: int, chunk: int, layers: int, max_lr: float) -> dict[str, str]:
    """label -> plan, every attention window `window`, every memory chunk / MAC segment `chunk`, the memory's
    learning-rate bound `max_lr`."""
    memory = f"chunk_size={chunk},max_lr={max_lr}"
    return {
        "SWA": f"gqa(window={window})*{layers}",
        "MAG": f"titans_mag({memory},window={window})*{layers}",
        "MAC": f"titans_mac({memory})*{layers}",
        "MAL": f"lmm({memory})[mlp=none],gqa(window={window})" + f",gqa(window={window})" * (layers - 2),
    }


def key_distances(inputs_NT: np.ndarray, labels_NT: np.ndarray, num_kv_pairs: int) -> np.ndarray:
    """For every scored query position, how many tokens after its key it sits (keys at 0, 2, .., 2 pairs - 2)."""
    keys_NP = inputs_NT[:, 0:2 * num_kv_pairs:2]
    rows, cols = np.nonzero(labels_NT != IGNORE_INDEX)
    pair = np.argmax(keys_NP[rows] == inputs_NT[rows, cols][:, None], axis=1)
    return cols - 2 * pair


def recall_by_distance(model, inputs_NT, labels_NT, num_kv_pairs: int, reach: int) -> dict[str, float]:
    """Recall accuracy overall, for keys at most `reach` tokens before their query, and for keys further back."""
    logits = jax.jit(lambda tokens: model(tokens).logits_BTV)(jnp.asarray(inputs_NT))
    rows, cols = np.nonzero(labels_NT != IGNORE_INDEX)
    hit = np.asarray(jnp.argmax(logits, -1))[rows, cols] == labels_NT[rows, cols]
    far = key_distances(inputs_NT, labels_NT, num_kv_pairs) > reach
    return dict(accuracy=float(hit.mean()), near=float(hit[~far].mean()) if (~far).any() else float("nan"),
                far=float(hit[far].mean()) if far.any() else float("nan"), far_share=float(far.mean()))


def model_config(plan: str, vocab: int, seq_len: int, d_model: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=len(parse_plan(plan)), n_heads=4,
                       max_seq_len=seq_len, plan=plan)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output directory (default: a new temporary one)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, one layer, 2 steps, SWA and MAG only: checks the script end to end")
    p.add_argument("--plans", nargs="+", default=None, help="label=plan pairs (default: SWA, MAG, MAC, MAL)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--pairs", type=int, default=4, help="key-value pairs per example")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--window", type=int, default=8, help="attention window of every plan")
    p.add_argument("--chunk", type=int, default=8, help="memory chunk size / MAC segment")
    p.add_argument("--max-lr", type=float, default=0.005,
                   help="the memory's theta bound (its step size on ||M(k) - v||^2): MQAR's repeated filler token "
                        "makes larger steps diverge at chunk 8 (MAG at 0.01; see titans_memory's docstring)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print each run's training log (loss every steps / 10)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.pairs, args.seq_len, args.window, args.chunk = 2, 2, 24, 4, 4
        args.d_model, args.batch_size, args.layers = 16, 4, 1
    vocab = 2 * args.seq_len  # MQAR needs more token ids than positions
    plans = (dict(item.split("=", 1) for item in args.plans) if args.plans
             else default_plans(args.window, args.chunk, args.layers, args.max_lr))
    if args.smoke and not args.plans:
        plans = {label: plans[label] for label in ("SWA", "MAG")}
    for plan in plans.values():  # every config first: a bad plan fails before any training
        model_config(plan, vocab, args.seq_len, args.d_model)
    out = Path(args.out or tempfile.mkdtemp(prefix="titans-recall-"))
    out.mkdir(parents=True, exist_ok=True)
    splits = {split: mqar(n, args.seq_len, num_kv_pairs=args.pairs, vocab_size=vocab, seed=seed)
              for split, n, seed in (("train", 8192, args.seed), ("val", 256, args.seed + 1))}
    training = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                           warmup_steps=max(1, args.steps // 10), eval_every=args.steps, eval_batches=4,
                           ckpt_every=args.steps, log_every=max(1, args.steps // 10), seed=args.seed)
    reach = args.layers * (args.window - 1)  # how far back the sliding-window baseline can see
    rows, code = [], code_identity()
    for i, (label, plan) in enumerate(plans.items(), 1):
        started = time.time()
        model = LanguageModel(model_config(plan, vocab, args.seq_len, args.d_model), rngs=nnx.Rngs(args.seed))
        trainer = Trainer(model, training, ArrayDataset(splits, vocab), Path(tempfile.mkdtemp(prefix="run-", dir=out)),
                          progress=False, echo=print if args.verbose else (lambda _: None))
        try:
            val_loss = trainer.run().val_loss
            scores = recall_by_distance(trainer.model, *splits["val"], args.pairs, reach)
        except NonFiniteLossError as error:  # reported as a result, not hidden: the row says it diverged
            print(f"plan {label}: {error}", flush=True)
            val_loss, scores = float("nan"), dict(accuracy=float("nan"), near=float("nan"), far=float("nan"),
                                                  far_share=float("nan"))
        finally:
            trainer.close()
        rows.append(dict(label=label, plan=plan, params=model.summary(args.seq_len).total_params,
                         val_loss=val_loss, **scores, minutes=(time.time() - started) / 60,
                         commit=code["commit"], dirty=code["dirty"], source_hash=code["source_hash"]))
        print(f"plan {i}/{len(plans)} {label} ({plan}): recall {scores['accuracy']:.3f} (near {scores['near']:.3f}, "
              f"far {scores['far']:.3f}), val loss {val_loss:.3f}, {rows[-1]['minutes']:.1f} min", flush=True)
    caption = (f"MQAR, {args.pairs} pairs, seq {args.seq_len}, window {args.window} (reach of {args.layers} SWA "
               f"layers: {reach} tokens), memory chunk {args.chunk}, max_lr {args.max_lr}, "
               f"{args.layers} layers, d {args.d_model}, {args.steps} steps x {args.batch_size}, seed {args.seed}; "
               f"made by {describe(code)}")
    write_results(rows, out, caption)
    return rows


def write_results(rows: list[dict], out: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = ["| variant | plan | params | val loss | recall | near (within reach) | far (beyond reach) | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['label']} | `{r['plan']}` | {r['params']:,} | {r['val_loss']:.3f} | {r['accuracy']:.3f} | "
              f"{r['near']:.3f} | {r['far']:.3f} | {r['minutes']:.1f} |" for r in rows]
    share = np.nanmax([r["far_share"] for r in rows])
    (out / "results.md").write_text(f"{caption}; {share:.0%} of the queries sit beyond the SWA stack's reach.\n\n"
                                    + "\n".join(table) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r["near"] for r in rows], 0.4, label="key within the SWA stack's reach")
    ax.barh(y + 0.2, [r["far"] for r in rows], 0.4, label="key beyond it")
    ax.set_yticks(y, [r["label"] for r in rows])
    ax.set_xlabel("recall accuracy at query positions")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("\n".join(textwrap.wrap(caption, 100)), fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "titans_recall.png", dpi=110)
    plt.close(fig)
    print("\n".join(table))
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'titans_recall.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
