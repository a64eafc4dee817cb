"""`attnzoo-export RUN_DIR OUT_DIR`: a trained run's checkpoint as a Hugging Face directory with a model card.

    attnzoo-export runs/x hf_out/                           # the latest checkpoint
    attnzoo-export runs/x hf_out/ --step 400 --shard-mb 500   # another checkpoint, in shards of at most 500 MB

Writes save_pretrained's files (config.json, safetensors, the run's tokenizer); README.md, a model card: the
architecture, the data, the training settings, the validation loss logged at the exported step, the code that
trained and the code that exported it, and how to load the directory; and attnzoo_reference.json: attnzoo's logits
for a fixed batch and its greedy continuations of fixed prompts, which
`experiments/hf_reference.py --check-saved OUT_DIR` compares with what transformers computes from the same files.
(Also `python -m attnzoo.train.export_cli RUN_DIR OUT_DIR`.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from attnzoo.generate import generate
from attnzoo.interop.pretrained import save_pretrained
from attnzoo.interop.tables import Architecture
from attnzoo.provenance import code_identity
from attnzoo.train.checkpoint import RunDirError
from attnzoo.train.runs import LoadedRun, load_run
from attnzoo.train.tracking import METRICS_FILE, MetricsLog

REFERENCE_FILE = "attnzoo_reference.json"
CARD_FILE = "README.md"


def write_reference(model, directory: str | Path, *, seed: int = 0, batch: int = 2, length: int = 16,
                    prompt_lengths: tuple[int, ...] = (6, 3), new_tokens: int = 12) -> dict:
    """attnzoo's logits of a random batch and greedy continuations of random prompts, as REFERENCE_FILE."""
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    tokens = rng.integers(0, vocab, (batch, length)).tolist()
    prompts = [rng.integers(0, vocab, n).tolist() for n in prompt_lengths]
    reference = {"logits_tokens": tokens, "logits": np.asarray(model(jnp.asarray(tokens)).logits_BTV).tolist(),
                 "prompts": prompts, "new_tokens": new_tokens, "generated": generate(model, prompts, new_tokens)}
    Path(directory, REFERENCE_FILE).write_text(json.dumps(reference) + "\n")
    return reference


def last_evaluation(run: LoadedRun) -> dict[str, Any] | None:
    """The last validation record of metrics.jsonl at or before the exported step (None when there is none)."""
    evals = [r for r in MetricsLog(run.run_dir / METRICS_FILE).records()
             if r["kind"] == "eval" and r["step"] <= run.step]
    return evals[-1] if evals else None


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def _code_rows(code: dict[str, Any] | None) -> list[tuple[str, Any]]:
    if not code:
        return [("code", "not recorded (a run made before runs recorded their code)")]
    dirty = {True: "yes (uncommitted changes)", False: "no", None: "unknown (no git checkout)"}[code.get("dirty")]
    return [("attnzoo", code.get("attnzoo")), ("commit", code.get("commit") or "unknown (no git checkout)"),
            ("dirty", dirty), ("source hash", code.get("source_hash")),
            ("jax / flax", f"{code.get('jax')} / {code.get('flax')}")]


def model_card(run: LoadedRun, arch: Architecture, exported_by: dict[str, Any]) -> str:
    """README.md of the exported directory: Hugging Face model-card front matter, then what the model is, what it
    was trained on and how, how well it did, which code made it, and how to load it."""
    config, training, saved = run.model.config, run.training, run.config
    summary = run.model.summary(training.seq_len)
    data, tokenizer = saved["data"], saved["tokenizer"]
    evaluation = last_evaluation(run)
    results = [("validation loss", "none logged at or before this step")] if evaluation is None else [
        ("val loss (nats/token)", f"{evaluation['val_loss']:.4f}"),
        ("perplexity", f"{evaluation['val_ppl']:.2f}"),
        ("evaluated at step", evaluation["step"])]
    resumed = [("resumed by", "; ".join(str(c.get("commit")) for c in saved["resumed_by"]))] \
        if saved.get("resumed_by") else []
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:",
             *(f"- {tag}" for tag in ("attnzoo", "jax", "flax", arch.model_type)), "---"]
    return "\n".join([
        *front, "",
        f"# {run.run_dir.name}", "",
        f"A {summary.total_params:,}-parameter decoder language model trained with attnzoo "
        f"(run `{run.run_dir}`, checkpoint step {run.step}), saved as a Hugging Face {arch.hf_class} "
        f"(`{arch.model_type}`).", "",
        "## Architecture", "",
        _table([("plan", f"`{config.plan}`"), ("layers", config.n_layers), ("d_model", config.d_model),
                ("heads", config.n_heads), ("kv heads", config.n_kv_heads or config.n_heads),
                ("vocab", config.vocab_size), ("max_seq_len", config.max_seq_len),
                ("parameters", f"{summary.total_params:,}"),
                ("KV-cache bytes / token", f"{summary.kv_cache_bytes_per_token:,}")]), "",
        "## Data", "",
        _table([("corpus", data["name"]), ("fingerprint", data["fingerprint"]),
                ("tokenizer", f"{tokenizer['kind']} ({tokenizer['identity']}), {tokenizer['vocab_size']} ids")]), "",
        "## Training", "",
        _table([("steps", f"{run.step} of {training.steps}"), ("batch size", training.batch_size),
                ("seq_len", training.seq_len), ("tokens seen", f"{run.step * training.tokens_per_step:,}"),
                ("peak lr", training.lr), ("warmup steps", training.warmup_steps),
                ("weight decay", training.weight_decay), ("seed", training.seed)]), "",
        "## Results", "",
        _table(results), "",
        "## Code", "",
        "### Trained by", "",
        _table(_code_rows(saved.get("code")) + resumed), "",
        "### Exported by", "",
        _table(_code_rows(exported_by)), "",
        "## Use", "",
        "```python",
        "from attnzoo.generate import generate",
        "from attnzoo.interop import load_pretrained",
        "",
        'model, tokenizer = load_pretrained("path/to/this/directory")',
        'prompt = [int(t) for t in tokenizer.encode("Hello")]',
        "print(tokenizer.decode(generate(model, [prompt], 50)[0]))",
        "```", "",
        f"The weights and config.json are those of transformers' {arch.hf_class}, so "
        "`transformers.AutoModelForCausalLM.from_pretrained` reads them too.", ""])


def export(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None,
           max_shard_bytes: int | None = None) -> tuple[LoadedRun, Architecture]:
    """The run's checkpoint `step` (default: the latest) as a Hugging Face directory, with its model card and
    reference outputs."""
    run = load_run(run_dir, step)
    arch = save_pretrained(run.model, out_dir, run.tokenizer, max_shard_bytes=max_shard_bytes)
    Path(out_dir, CARD_FILE).write_text(model_card(run, arch, code_identity()))
    write_reference(run.model, out_dir)
    return run, arch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnzoo-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by attnzoo-train")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face directory to write")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--shard-mb", type=float, help="largest safetensors shard in MB (default: one file)")
    args = parser.parse_args(argv)
    try:
        shard = None if args.shard_mb is None else int(args.shard_mb * 2**20)
        run, arch = export(args.run_dir, args.out_dir, step=args.step, max_shard_bytes=shard)
    except (ValueError, FileNotFoundError, RunDirError) as error:
        parser.exit(2, f"attnzoo-export: error: {error}\n")
    print(f"{args.out_dir}: {arch.hf_class} ({arch.model_type}) from {run.run_dir} step {run.step}, "
          f"model card {Path(args.out_dir, CARD_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
