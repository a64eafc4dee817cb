"""`attnzoo-eval`: loss and perplexity of a trained run's checkpoint, optionally with layers removed.

    attnzoo-eval --run-dir runs/x                          # the run's validation split, as training evaluated it
    attnzoo-eval --run-dir runs/x --data notes/ --max-batches 0 --json
    attnzoo-eval --run-dir runs/x --skip-layers 1,3        # how much do layers 1 and 3 matter?
    attnzoo-eval --run-dir runs/x --diagnostics            # per-layer attention sink share, entropy, max |logit|

Text is tokenized with the run's tokenizer. Without --data, the run's own corpus is read back from the token
cache ($ATTNZOO_CACHE, else ~/.cache/attnzoo) that training filled. Scoring takes consecutive windows of
--seq-len tokens from the start of the split, each token predicted once, as the trainer's validation does.
"""

from __future__ import annotations

import argparse
import json
import sys

from attnzoo.data import TokenDataset, stdlib_corpus, text_corpus
from attnzoo.data.corpus import DATA_HELP, SPLITS
from attnzoo.train.checkpoint import RunDirError
from attnzoo.train.cli import cache_dir
from attnzoo.train.runs import LoadedRun, diagnose_model, evaluate_model, load_run, scored_tokens


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnzoo-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a run directory written by attnzoo-train")
    p.add_argument("--data", nargs="+", help=f"text to score (default: the run's own corpus); {DATA_HELP}")
    p.add_argument("--split", choices=SPLITS, default="val", help="which split of the text to score (default val)")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: the run's; at most the model's "
                                               "max_seq_len)")
    p.add_argument("--batch-size", type=int, help="windows per batch (default: the run's)")
    p.add_argument("--max-batches", type=int, help="batches to score; 0: the whole split (default: the run's "
                                                   "eval_batches, so the result matches training's validation)")
    p.add_argument("--skip-layers", help="comma-separated layer indices to remove, e.g. 1,3; the table then shows "
                                         "the loss with and without them")
    p.add_argument("--step", type=int, help="checkpoint step to use (default: the latest)")
    p.add_argument("--diagnostics", action="store_true",
                   help="also report each layer's evaluation diagnostics (attention sink share, entropy, max |logit|, "
                        "and what each mixer adds), averaged over the scored windows")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def parse_layers(text: str | None, n_layers: int) -> tuple[int, ...]:
    """'1,3' -> (1, 3), each index checked against the model's layers."""
    if text is None:
        return ()
    layers = []
    for item in text.split(","):
        try:
            layer = int(item)
        except ValueError:
            raise ValueError(f"--skip-layers: {item.strip()!r} is not a layer index; give comma-separated "
                             f"indices such as 1,3") from None
        if not 0 <= layer < n_layers:
            raise ValueError(f"--skip-layers: layer {layer} does not exist; the model has {n_layers} layers, "
                             f"0 to {n_layers - 1}")
        layers.append(layer)
    return tuple(sorted(set(layers)))


def _settings(args, run: LoadedRun) -> tuple[int, int, int | None]:
    """(seq_len, batch_size, max_batches), defaulting to the run's training and validation settings."""
    seq_len = run.training.seq_len if args.seq_len is None else args.seq_len
    batch_size = run.training.batch_size if args.batch_size is None else args.batch_size
    max_batches = run.training.eval_batches if args.max_batches is None else args.max_batches
    max_seq_len = run.model.config.max_seq_len
    if not 0 < seq_len <= max_seq_len:
        raise ValueError(f"--seq-len {seq_len} must be between 1 and the model's max_seq_len={max_seq_len}")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be at least 1")
    if max_batches < 0:
        raise ValueError(f"--max-batches {max_batches} must be >= 0 (0: the whole split)")
    return seq_len, batch_size, max_batches or None


def _run_dataset(run: LoadedRun) -> TokenDataset:
    """The run's own corpus, from the token cache that training filled (or the stdlib, when it is unchanged)."""
    data = run.config["data"]
    dataset = TokenDataset.from_cache(data["name"], data["fingerprint"], run.tokenizer, cache_dir())
    if dataset is None and data["name"].startswith("stdlib-"):
        corpus = stdlib_corpus()
        if corpus.fingerprint == data["fingerprint"]:
            dataset = TokenDataset.build(corpus, run.tokenizer, cache_dir())
    if dataset is None:
        raise FileNotFoundError(f"the run's corpus {data['name']!r} (fingerprint {data['fingerprint'][:16]}) is not "
                                f"in the token cache {cache_dir()}; pass --data with the text it was trained on")
    return dataset


def _dataset(args, run: LoadedRun) -> tuple[TokenDataset, str]:
    """The dataset to score and a description of it."""
    if args.data is None:
        return _run_dataset(run), f"the run's corpus {run.config['data']['name']!r}"
    corpus = stdlib_corpus() if args.data == ["stdlib"] else text_corpus(args.data)
    return TokenDataset.build(corpus, run.tokenizer, cache_dir()), f"{corpus.name!r}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run = load_run(args.run_dir, args.step)
        skip_layers = parse_layers(args.skip_layers, run.model.config.n_layers)
        seq_len, batch_size, max_batches = _settings(args, run)
        dataset, description = _dataset(args, run)
        dataset.check_seq_len(seq_len, [args.split])
    except (ValueError, FileNotFoundError, RunDirError) as error:
        parser.exit(2, f"attnzoo-eval: error: {error}\n")
    variants = [()] + ([skip_layers] if skip_layers else [])
    results = []
    for skip in variants:
        scores = evaluate_model(run.model, dataset, args.split, batch_size, seq_len, max_batches, skip)
        results.append({"skip_layers": list(skip), "loss": scores["val_loss"], "perplexity": scores["val_ppl"]})
    tokens = scored_tokens(dataset, args.split, batch_size, seq_len, max_batches)
    diagnostics = (diagnose_model(run.model, dataset, args.split, batch_size, seq_len, max_batches, skip_layers)
                   if args.diagnostics else {})
    if args.json:
        print(json.dumps({"run_dir": str(run.run_dir), "step": run.step, "data": description, "split": args.split,
                          "seq_len": seq_len, "batch_size": batch_size, "max_batches": max_batches,
                          "scored_tokens": tokens, "results": results, "diagnostics": diagnostics}))
        return 0
    print(f"run {run.run_dir}, checkpoint step {run.step}")
    print(f"data: {description}, {args.split} split ({dataset.num_tokens(args.split):,} tokens); "
          f"{tokens:,} tokens scored in windows of {seq_len}")
    print(f"{'layers':<24}{'loss':>10}{'perplexity':>14}")
    for result in results:
        skipped = result["skip_layers"]
        label = "all" if not skipped else "without " + ",".join(map(str, skipped))
        print(f"{label:<24}{result['loss']:>10.4f}{result['perplexity']:>14.2f}")
    if diagnostics:
        print_diagnostics(diagnostics)
    return 0


def print_diagnostics(diagnostics: dict[str, float]) -> None:
    """One row per layer, one column per diagnostic ('layer3/entropy' -> row layer3, column entropy)."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in diagnostics.items():
        layer, _, name = key.partition("/")
        rows.setdefault(layer, {})[name] = value
    columns = sorted({name for row in rows.values() for name in row})
    print(f"{'layer':<10}" + "".join(f"{name:>14}" for name in columns))
    for layer in sorted(rows, key=lambda name: int(name.removeprefix("layer"))):
        print(f"{layer:<10}" + "".join(f"{rows[layer][name]:>14.4f}" if name in rows[layer] else f"{'-':>14}"
                                      for name in columns))


if __name__ == "__main__":
    sys.exit(main())
