"""`attnzoo-generate`: continue a prompt with a trained run's model, from its latest checkpoint or --step.

    attnzoo-generate --run-dir runs/x --prompt "def parse("
    attnzoo-generate --run-dir runs/x --prompt "import " --temperature 0 --max-new-tokens 50   # greedy

The run's own tokenizer encodes the prompt; the text (prompt and continuation) goes to stdout.
"""

from __future__ import annotations

import argparse
import sys

from attnzoo.generate import generate
from attnzoo.train.checkpoint import RunDirError
from attnzoo.train.runs import load_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnzoo-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a run directory written by attnzoo-train")
    p.add_argument("--prompt", required=True, help="text to continue ('' starts a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens; 0: all (default 40)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text")
    p.add_argument("--step", type=int, help="checkpoint step to use (default: the latest)")
    return p


def _check_sampling(args) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.temperature < 0:
        raise ValueError(f"--temperature {args.temperature} must be >= 0 (0: greedy)")
    if args.top_k < 0:
        raise ValueError(f"--top-k {args.top_k} must be >= 0 (0: no top-k cut)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_sampling(args)
        run = load_run(args.run_dir, args.step)
        # In training every document follows an <eos>, so an empty prompt starts from one.
        prompt = [int(t) for t in run.tokenizer.encode(args.prompt)] or [run.tokenizer.eos_id]
        max_seq_len = run.model.config.max_seq_len
        if len(prompt) + args.max_new_tokens > max_seq_len:
            raise ValueError(f"the prompt ({len(prompt)} tokens) plus --max-new-tokens {args.max_new_tokens} "
                             f"exceeds the model's max_seq_len={max_seq_len}")
    except (ValueError, FileNotFoundError, RunDirError) as error:
        parser.exit(2, f"attnzoo-generate: error: {error}\n")
    print(f"run {run.run_dir}, checkpoint step {run.step}", file=sys.stderr)
    [tokens] = generate(run.model, [prompt], args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k or None, seed=args.seed)
    print(args.prompt + run.tokenizer.decode(tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
