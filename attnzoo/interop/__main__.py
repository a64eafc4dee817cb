"""`python -m attnzoo.interop export RUN_DIR OUT_DIR`: a trained run's checkpoint as a Hugging Face directory.

Writes save_pretrained's files (config.json, safetensors, the run's tokenizer) and attnzoo_reference.json: attnzoo's
logits for a fixed batch and its greedy continuations of fixed prompts, which
`experiments/hf_reference.py --check-saved OUT_DIR` compares with what transformers computes from the same files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from attnzoo.generate import generate
from attnzoo.interop.pretrained import save_pretrained
from attnzoo.train.checkpoint import RunDirError
from attnzoo.train.runs import load_run

REFERENCE_FILE = "attnzoo_reference.json"


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnzoo.interop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="a run's checkpoint as a Hugging Face directory")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    export.add_argument("--shard-mb", type=float, help="largest safetensors shard in MB (default: one file)")
    args = parser.parse_args(argv)
    try:
        run = load_run(args.run_dir, args.step)
        shard = None if args.shard_mb is None else int(args.shard_mb * 2**20)
        arch = save_pretrained(run.model, args.out_dir, run.tokenizer, max_shard_bytes=shard)
        write_reference(run.model, args.out_dir)
    except (ValueError, FileNotFoundError, RunDirError) as error:
        parser.exit(2, f"attnzoo.interop: error: {error}\n")
    print(f"{args.out_dir}: {arch.hf_class} ({arch.model_type}) from {run.run_dir} step {run.step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
