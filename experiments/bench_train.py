"""Training-step throughput and model FLOP utilisation of an attnzoo preset beside the plain-JAX GPT-2-small step
of the peer numbers in BENCHMARKS.md (409 model TFLOP/s on an H200), measured in one run on one device.

    python experiments/bench_train.py                      # gpt2-small, GQA plan, bf16, B16 x S1024 (GPU)
    python experiments/bench_train.py --smoke              # tiny shapes on CPU: checks the script runs

Model FLOPs = 3 x forward FLOPs per token (model.summary(): 2 x matmul weights + LM head + causal attention) x
tokens; MFU is against the bf16 matmul rate measured in the same run. Prints a table; --out writes JSON rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from attnzoo import LanguageModel, get_preset  # noqa: E402
from attnzoo.train.optim import TrainConfig, make_optimizer  # noqa: E402
from attnzoo.train.trainer import make_train_step  # noqa: E402
from experiments.bench_common import seconds_per_step  # noqa: E402


def matmul_tflops(n: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / seconds_per_step(lambda: mm(a, a), 2, 10) / 1e12


def attnzoo_step(preset: str, plan: str | None, batch: int, seq: int, dtype: str, impl: str, n: int):
    overrides = dict(dtype=dtype, kernels={"flash_attention": impl}, max_seq_len=seq)
    if plan:
        overrides["plan"] = plan
    cfg = get_preset(preset, **overrides)
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    flops_per_token = 3 * model.summary(seq_len=seq).flops_per_token
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(TrainConfig(steps=1000, batch_size=batch, seq_len=seq, warmup_steps=10))
    step = make_train_step(graphdef, rest, tx)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size)
    x, y = tokens[:, :-1], tokens[:, 1:]
    state = {"params": params, "opt": tx.init(params)}

    def one():
        state["params"], state["opt"], metrics = step(state["params"], state["opt"], x, y)
        return metrics["loss"]

    seconds = seconds_per_step(one, 2, n)
    return dict(name=f"attnzoo {preset} {cfg.plan}", params_m=model.summary().total_params / 1e6,
                step_ms=seconds * 1e3, tokens_per_s=batch * seq / seconds,
                model_tflops=flops_per_token * batch * seq / seconds / 1e12)


def plain_jax_gpt2_step(layers: int, d: int, heads: int, vocab: int, seq: int, batch: int, impl: str, n: int):
    """The peer: plain-JAX GPT-2 (learned positions, MHA, GELU MLP, tied head), bf16 compute, AdamW."""
    keys = iter(jax.random.split(jax.random.key(3), 8 * layers + 8))
    init = lambda shape: jax.random.normal(next(keys), shape, jnp.float32) * 0.02
    params = dict(wte=init((vocab, d)), wpe=init((seq, d)), lnf=jnp.ones(d), blocks=[dict(
        ln1=jnp.ones(d), qkv=init((d, 3 * d)), o=init((d, d)), ln2=jnp.ones(d), up=init((d, 4 * d)),
        down=init((4 * d, d))) for _ in range(layers)])
    bf = lambda a: a.astype(jnp.bfloat16)

    def rms(x, g):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(x.dtype) * bf(g)

    def loss_fn(p, tok):
        x = bf(p["wte"])[tok[:, :-1]] + bf(p["wpe"])[None]
        for blk in p["blocks"]:
            h = rms(x, blk["ln1"]) @ bf(blk["qkv"])
            q, k, v = jnp.split(h.reshape(batch, seq, 3 * heads, d // heads), 3, axis=2)
            a = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
            x = x + a.reshape(batch, seq, d) @ bf(blk["o"])
            x = x + jax.nn.gelu(rms(x, blk["ln2"]) @ bf(blk["up"])) @ bf(blk["down"])
        logits = (rms(x, p["lnf"]) @ bf(p["wte"]).T).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()

    tx = optax.adamw(3e-4)

    @jax.jit
    def step(p, s, tok):
        loss, g = jax.value_and_grad(loss_fn)(p, tok)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    tok = jax.random.randint(jax.random.key(9), (batch, seq + 1), 0, vocab)
    state = {"p": params, "s": tx.init(params)}

    def one():
        state["p"], state["s"], loss = step(state["p"], state["s"], tok)
        return loss

    seconds = seconds_per_step(one, 2, n)
    n_params = sum(x.size for x in jax.tree.leaves(params)) - seq * d
    flops = 6 * n_params * batch * seq + 6 * layers * batch * seq * seq * d
    return dict(name="plain-JAX GPT-2-small (peer)", params_m=n_params / 1e6, step_ms=seconds * 1e3,
                tokens_per_s=batch * seq / seconds, model_tflops=flops / seconds / 1e12)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script runs)")
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--plan", default=None, help="layer plan (default: the preset's GQA plan)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--out", default=None, help="write JSON rows here")
    args = p.parse_args(argv)
    impl = "xla" if args.smoke else "auto"
    if args.smoke:
        args.preset, args.batch, args.seq, args.steps = "tiny", 2, 64, 2
    rows = [dict(name="env", jax=jax.__version__, device=str(jax.devices()[0]), date=time.strftime("%Y-%m-%d"))]
    peak = matmul_tflops(512 if args.smoke else 8192)
    rows.append(dict(name="bf16 matmul", model_tflops=peak))
    for run in (lambda: plain_jax_gpt2_step(*((2, 128, 4, 512) if args.smoke else (12, 768, 12, 50304)), args.seq,
                                            args.batch, "xla" if args.smoke else "cudnn", args.steps),
                lambda: attnzoo_step(args.preset, args.plan, args.batch, args.seq, "bfloat16", impl, args.steps)):
        try:
            rows.append(run())
        except Exception as err:  # noqa: BLE001  (a failing row is reported, the others still run)
            rows.append(dict(name="error", error=f"{type(err).__name__}: {err}"[:500]))
    print(json.dumps(rows[0]))
    print("\n| run | params (M) | step (ms) | tokens/s | model TFLOP/s | MFU vs measured matmul |")
    print("|---|---|---|---|---|---|")
    for r in rows[1:]:
        if "error" in r:
            print(f"| error | {r['error']} |")
        elif "step_ms" in r:
            print(f"| {r['name']} | {r['params_m']:.1f} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['model_tflops']:.1f} | {r['model_tflops'] / peak:.0%} |")
        else:
            print(f"| {r['name']} | | | | {r['model_tflops']:.1f} | 100% |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
