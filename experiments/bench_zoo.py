"""Training and decode throughput of every attention-zoo variant beside GQA at equal width, in one run on one device.

    python experiments/bench_zoo.py                 # `small` preset (d 512, 8 layers), bf16, B16 x S1024 (GPU)
    python experiments/bench_zoo.py --smoke         # tiny shapes on CPU: checks the script runs

Per variant (every layer that mixer): parameters, KV-cache bytes per token, training tokens/s (one AdamW step of
B x S tokens), and decode tokens/s (`generate`: B prompts of `--prompt` tokens, then `--new` tokens each, greedy;
prefill included, compilation excluded). Prints a markdown table; --out writes JSON rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from attnzoo import LanguageModel, generate, get_preset  # noqa: E402
from experiments.bench_common import seconds_per_step  # noqa: E402
from experiments.bench_train import attnzoo_step  # noqa: E402

VARIANTS = ("gqa", "mla", "masa", "ccgqa", "moh", "gated")


def decode_tokens_per_s(preset: str, plan: str, batch: int, prompt: int, new: int, dtype: str, impl: str) -> float:
    cfg = get_preset(preset, plan=plan, dtype=dtype, max_seq_len=prompt + new,
                     kernels={"flash_attention": impl, "decode_attention": "xla" if impl == "xla" else "auto"})
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)).tolist()
    seconds = seconds_per_step(lambda: generate(model, prompts, new), 1, 2)  # generate returns host lists: already blocked
    return batch * new / seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script runs)")
    p.add_argument("--preset", default="small")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--out", default=None, help="write JSON rows here")
    args = p.parse_args(argv)
    impl = "xla" if args.smoke else "auto"
    if args.smoke:
        args.preset, args.batch, args.seq, args.steps = "tiny", 2, 32, 1
        args.decode_batch, args.prompt, args.new = 2, 8, 4
    n_layers = get_preset(args.preset).n_layers
    rows = [dict(name="env", jax=jax.__version__, device=str(jax.devices()[0]), date=time.strftime("%Y-%m-%d"),
                 preset=args.preset)]
    for variant in args.variants:
        plan = f"{variant}*{n_layers}"
        started = time.perf_counter()
        try:
            train = attnzoo_step(args.preset, plan, args.batch, args.seq, "bfloat16", impl, args.steps)
            summary = LanguageModel(get_preset(args.preset, plan=plan, dtype="bfloat16"), rngs=nnx.Rngs(0)).summary()
            rows.append(dict(name=variant, plan=plan, params_m=summary.total_params / 1e6,
                             kv_bytes_per_token=summary.kv_cache_bytes_per_token,
                             train_tokens_per_s=train["tokens_per_s"], model_tflops=train["model_tflops"],
                             decode_tokens_per_s=decode_tokens_per_s(args.preset, plan, args.decode_batch,
                                                                     args.prompt, args.new, "bfloat16", impl)))
        except Exception as err:  # noqa: BLE001  (a failing row is reported, the others still run)
            rows.append(dict(name=variant, error=f"{type(err).__name__}: {err}"[:500]))
        print(f"{variant}: {time.perf_counter() - started:.0f} s", flush=True)
    print(json.dumps(rows[0]))
    print("\n| variant | params (M) | KV bytes/token | train tokens/s | model TFLOP/s | decode tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows[1:]:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error']} |")
        else:
            print(f"| {r['name']} | {r['params_m']:.1f} | {r['kv_bytes_per_token']:,} | "
                  f"{r['train_tokens_per_s']:,.0f} | {r['model_tflops']:.1f} | {r['decode_tokens_per_s']:,.0f} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
