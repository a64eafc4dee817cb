"""CPU throughput of attnzoo (JAX) against Hugging Face transformers (PyTorch, eager) on the same random tiny Llama,
and of attnzoo's mixer families against its own GQA on the same model shape.

    python experiments/bench_cpu_vs_torch.py --threads 2 --out cpu_vs_torch.json   # a venv with torch + transformers
    python experiments/bench_cpu_vs_torch.py --smoke                               # tiny shapes, one repeat

The model: 4 layers, d_model 256, 8 query heads / 2 key-value heads (GQA), SwiGLU width 704 (attnzoo's rule: 8/3 d
rounded up to a multiple of 64; Llama's own rule, a multiple of 256, would give 768), vocab 1024, tied embeddings
(attnzoo's default; the Llama table reads tie_word_embeddings), float32, RoPE base 10^4, RMSNorm eps 1e-6. With
transformers installed, `LlamaForCausalLM` is built from a `LlamaConfig` (attn_implementation="sdpa", weights drawn
with initializer_range 0.1 so that greedy choices have clear margins), written with `save_pretrained` and read into
attnzoo with `attnzoo.interop.load_pretrained`: the same weights. Before any timing the two must agree on greedy
ids and on the loss of one batch, or the script stops with MismatchError. Without transformers the attnzoo model is
built directly from the same shape and only attnzoo's numbers are reported.

Workloads: prefill (forward over B x T tokens, all logits), one training step (cross-entropy, global-norm clipping
at 1, AdamW; attnzoo: its trainer's jitted step, torch: `backward(); clip_grad_norm_(); step(); zero_grad()`) and
greedy decode (a prompt, then N new tokens with a cache; attnzoo `generate`, torch `generate(do_sample=False)`,
prompt prefill included on both sides). Ratios come from alternating runs: each repeat calls every contender once,
in turn, after untimed warm-up calls (compilation), so each per-repeat ratio pairs runs under the same machine
load; the table gives the median ratio with its min-max over repeats, and each side's median tokens/s.

Threads: torch runs with `torch.set_num_threads(threads)`; XLA's CPU client uses every CPU this process may run on,
recorded as `schedulable_cpus` (run under `taskset -c 0-1` to give both sides the same cores).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
from typing import Any, Callable, Protocol

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import attnzoo  # noqa: E402
from attnzoo import LanguageModel, ModelConfig  # noqa: E402
from attnzoo.interop import load_pretrained  # noqa: E402
from attnzoo.provenance import code_identity  # noqa: E402
from attnzoo.train.optim import TrainConfig, make_optimizer  # noqa: E402
from attnzoo.train.trainer import make_eval_step, make_train_step  # noqa: E402
from experiments.bench_common import settled_alternating_seconds, speed_ratio, write_json  # noqa: E402

LOSS_RTOL = 1e-4  # |loss_a - loss_b| <= LOSS_RTOL * max(1, |loss_b|)
SEED = 0
GQA, HYBRID = "softmax GQA", "hybrid Mamba-2 + GQA"
MIXER_FAMILIES = (GQA, "MLA", "gated", "linear attention (simple GLA)", "Mamba-2", "Mamba", HYBRID)
FAMILY_MIXERS = ("gqa", "mla", "gated", "simple_gla", "mamba2", "mamba")  # every layer; the hybrid's is in plans()


@dataclasses.dataclass(frozen=True)
class Setup:
    """Model shape and workload sizes."""

    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 8
    n_kv_heads: int = 2
    vocab_size: int = 1024
    prefill: tuple[int, int] = (4, 512)  # (batch, tokens)
    train: tuple[int, int] = (8, 256)
    decode_batches: tuple[int, ...] = (1, 4)
    decode_prompt: int = 64
    decode_new: int = 64
    check_prompts: tuple[int, int] = (2, 8)  # the greedy check: (prompts, tokens each)
    check_new: int = 16
    warmup: int = 2  # untimed calls per contender and workload (the first compiles)
    settle_s: float = 1.0  # untimed pause after each timed call (bench_common.settled_alternating_seconds)
    families: tuple[str, ...] = MIXER_FAMILIES  # the mixer families timed against GQA (the first)

    @property
    def max_seq_len(self) -> int:
        return max(self.prefill[1], self.train[1], self.decode_prompt + self.decode_new,
                   self.check_prompts[1] + self.check_new)

    def plans(self) -> dict[str, str]:
        """{family: plan} of `families`; the hybrid puts one GQA layer after the Mamba-2 ones."""
        n = self.n_layers
        plans = {family: f"{mixer}*{n}" for family, mixer in zip(MIXER_FAMILIES, FAMILY_MIXERS)}
        plans[HYBRID] = f"mamba2*{n - 1},gqa"
        return {family: plans[family] for family in self.families}


FULL = Setup()
# Compilation dominates a smoke run: one decode batch, and GQA beside one other family.
SMOKE = Setup(n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=128, prefill=(2, 32), train=(2, 32),
              decode_batches=(2,), decode_prompt=8, decode_new=8, check_prompts=(2, 4), check_new=4, warmup=1,
              settle_s=0.0, families=(GQA, "MLA"))


def zoo_config(setup: Setup) -> ModelConfig:
    """The benchmark model as attnzoo builds it directly (GQA in every layer; the other defaults are Llama's)."""
    config = ModelConfig(vocab_size=setup.vocab_size, d_model=setup.d_model, n_layers=setup.n_layers,
                         n_heads=setup.n_heads, n_kv_heads=setup.n_kv_heads, max_seq_len=setup.max_seq_len)
    # The widths spelled out, as a config.json holds them (so that the Llama read back compares equal).
    return config.replace(head_dim=config.dim_per_head, mlp_hidden=config.mlp_width)


# -- the contenders ------------------------------------------------------------------------------------------------

class Contender(Protocol):
    """One implementation of the benchmark model. The workload methods do their setup at once and return the
    callable of one timed unit."""

    name: str

    def greedy(self, prompts_BP: np.ndarray, new_tokens: int) -> list[list[int]]: ...

    def loss(self, tokens_BT: np.ndarray) -> float: ...  # mean cross-entropy of tokens[:, 1:] given tokens[:, :-1]

    def prefill(self, tokens_BT: np.ndarray) -> Callable[[], Any]: ...

    def train(self, tokens_BT: np.ndarray) -> Callable[[], Any]: ...

    def decode(self, prompts_BP: np.ndarray, new_tokens: int) -> Callable[[], Any]: ...


class ZooContender:
    name = "attnzoo"

    def __init__(self, model: LanguageModel):
        self.model = model
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        # Built once, so that timing this contender again (as the families' GQA baseline) reuses the compilations.
        self._forward = jax.jit(lambda params, x_BT: nnx.merge(self.graphdef, params, self.rest)(x_BT).logits_BTV)
        self._optimizer = make_optimizer(TrainConfig())
        self._train_step = make_train_step(self.graphdef, self.rest, self._optimizer)

    def greedy(self, prompts_BP, new_tokens):
        return attnzoo.generate(self.model, prompts_BP.tolist(), new_tokens)

    def loss(self, tokens_BT):
        ce_sum, count = make_eval_step(self.graphdef, self.rest)(self.params, tokens_BT[:, :-1], tokens_BT[:, 1:])
        return float(ce_sum / count)

    def prefill(self, tokens_BT):
        x_BT = jnp.asarray(tokens_BT)
        return lambda: self._forward(self.params, x_BT)

    def train(self, tokens_BT):
        params = jax.tree.map(jnp.copy, self.params)  # the step donates its params; the model keeps its own
        state = {"params": params, "opt": self._optimizer.init(params)}
        x_BT, y_BT = jnp.asarray(tokens_BT[:, :-1]), jnp.asarray(tokens_BT[:, 1:])

        def one_step():
            state["params"], state["opt"], metrics = self._train_step(state["params"], state["opt"], x_BT, y_BT)
            return metrics["loss"]

        return one_step

    def decode(self, prompts_BP, new_tokens):
        prompts = prompts_BP.tolist()
        return lambda: attnzoo.generate(self.model, prompts, new_tokens)


class TorchContender:
    name = "torch"

    def __init__(self, torch, transformers, model):
        self.torch, self.transformers, self.model = torch, transformers, model.eval()

    def _generate(self, prompts_BP, new_tokens):
        config = self.transformers.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                    do_sample=False, eos_token_id=None, pad_token_id=0,
                                                    bos_token_id=None)
        ids_BP = self.torch.from_numpy(prompts_BP.astype(np.int64))
        with self.torch.inference_mode():
            return self.model.generate(ids_BP, attention_mask=self.torch.ones_like(ids_BP),
                                       generation_config=config)

    def greedy(self, prompts_BP, new_tokens):
        return self._generate(prompts_BP, new_tokens)[:, prompts_BP.shape[1]:].tolist()

    def _loss(self, model, x_BT, y_BT):
        logits_BTV = model(input_ids=x_BT, use_cache=False).logits
        return self.torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1), y_BT.flatten())

    def loss(self, tokens_BT):
        tokens_BT = self.torch.from_numpy(tokens_BT.astype(np.int64))
        with self.torch.inference_mode():
            return float(self._loss(self.model, tokens_BT[:, :-1], tokens_BT[:, 1:]))

    def prefill(self, tokens_BT):
        x_BT = self.torch.from_numpy(tokens_BT.astype(np.int64))

        def forward():
            with self.torch.inference_mode():
                return self.model(input_ids=x_BT, use_cache=False).logits

        return forward

    def train(self, tokens_BT):
        model = copy.deepcopy(self.model).train()  # the benchmarked model keeps its weights
        config = TrainConfig()  # attnzoo's defaults: the same AdamW and clipping
        optimizer = self.torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.b1, config.b2),
                                           weight_decay=config.weight_decay)
        tokens_BT = self.torch.from_numpy(tokens_BT.astype(np.int64))
        x_BT, y_BT = tokens_BT[:, :-1], tokens_BT[:, 1:]

        def one_step():
            loss = self._loss(model, x_BT, y_BT)
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad()
            return loss

        return one_step

    def decode(self, prompts_BP, new_tokens):
        return lambda: self._generate(prompts_BP, new_tokens)


def torch_modules():
    """(torch, transformers), or None when either is not installed."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    return torch, transformers


def build_pair(setup: Setup, torch, transformers, threads: int) -> tuple[ZooContender, TorchContender]:
    """transformers' random Llama, and attnzoo's copy of it read back from its save_pretrained directory."""
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    hf_config = transformers.LlamaConfig(
        vocab_size=setup.vocab_size, hidden_size=setup.d_model, intermediate_size=zoo_config(setup).mlp_width,
        num_hidden_layers=setup.n_layers, num_attention_heads=setup.n_heads, num_key_value_heads=setup.n_kv_heads,
        max_position_embeddings=setup.max_seq_len, rms_norm_eps=1e-6, tie_word_embeddings=True,
        initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        attn_implementation="sdpa")
    hf_model = transformers.LlamaForCausalLM(hf_config)
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        model, _ = load_pretrained(directory)
    if model.config != zoo_config(setup):
        raise MismatchError(f"the Llama read back is {model.config}, not the benchmark shape {zoo_config(setup)}")
    return ZooContender(model), TorchContender(torch, transformers, hf_model)


# -- checks and timings --------------------------------------------------------------------------------------------

class MismatchError(RuntimeError):
    """The contenders disagree (greedy ids or loss): their timings would not compare the same computation."""


def tokens(setup: Setup, batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, setup.vocab_size, (batch, length), dtype=np.int32)


def check_agreement(contenders: list[Contender], setup: Setup) -> dict[str, Any]:
    """Greedy ids of fixed prompts and the loss of one batch, per contender; MismatchError unless every contender
    matches the first (ids exactly, loss within LOSS_RTOL)."""
    prompts_BP = tokens(setup, *setup.check_prompts, seed=1)
    batch_BT = tokens(setup, setup.train[0], setup.train[1] + 1, seed=2)
    checks = {c.name: {"greedy": c.greedy(prompts_BP, setup.check_new), "loss": c.loss(batch_BT)}
              for c in contenders}
    for name, check in checks.items():
        print(f"check {name}: loss {check['loss']:.6f}, greedy ids {check['greedy']}")
    first, reference = contenders[0].name, checks[contenders[0].name]
    for name, check in checks.items():
        if check["greedy"] != reference["greedy"]:
            raise MismatchError(f"greedy ids differ: {first} {reference['greedy']} vs {name} {check['greedy']}")
        if abs(check["loss"] - reference["loss"]) > LOSS_RTOL * max(1.0, abs(reference["loss"])):
            raise MismatchError(f"initial loss differs: {first} {reference['loss']:.6f} vs {name} "
                                f"{check['loss']:.6f} (tolerance {LOSS_RTOL} relative)")
    return checks


def workloads(setup: Setup, decode: bool = True) -> list[tuple[str, int, Callable[[Contender], Callable]]]:
    """(name, tokens per timed call, contender -> the callable of one timed call)."""
    prefill_BT = tokens(setup, *setup.prefill, seed=3)
    train_BT = tokens(setup, setup.train[0], setup.train[1] + 1, seed=4)
    rows = [(f"prefill {setup.prefill[0]}x{setup.prefill[1]}", prefill_BT.size, lambda c: c.prefill(prefill_BT))]
    if decode:
        for batch in setup.decode_batches:
            prompts_BP = tokens(setup, batch, setup.decode_prompt, seed=5)
            rows.append((f"decode b{batch} {setup.decode_prompt}+{setup.decode_new}", batch * setup.decode_new,
                         lambda c, p=prompts_BP: c.decode(p, setup.decode_new)))
    # last, as a precaution: both sides train a copy of the weights, so the model timed above stays as checked
    rows.append((f"train step {setup.train[0]}x{setup.train[1]}", setup.train[0] * setup.train[1],
                 lambda c: c.train(train_BT)))
    return rows


def time_contenders(contenders: dict[str, Contender], setup: Setup, repeats: int, baseline: str,
                    decode: bool = True) -> list[dict[str, Any]]:
    """One row per workload: each contender's median tokens/s and its speed relative to `baseline`'s, from
    alternating runs (in the dict's order) with an untimed pause after each call."""
    rows = []
    for workload, n_tokens, make in workloads(setup, decode):
        runs = {name: make(contender) for name, contender in contenders.items()}
        seconds = settled_alternating_seconds(runs, repeats, setup.warmup, setup.settle_s)
        rows.append({"workload": workload, "tokens_per_call": n_tokens, "contenders": {
            name: {"tokens_per_s": n_tokens / statistics.median(s), "seconds": s,
                   "speed_vs_baseline": speed_ratio(s, seconds[baseline])}
            for name, s in seconds.items()}, "baseline": baseline})
        print(f"timed {workload}", flush=True)
    return rows


def family_contenders(gqa: ZooContender, setup: Setup) -> dict[str, ZooContender]:
    """The benchmark shape with each family's plan, GQA first: `gqa` itself (the benchmark model, already
    compiled), the others initialised from SEED."""
    config = gqa.model.config
    return {f"{family}: {plan}": gqa if family == GQA else
            ZooContender(LanguageModel(config.replace(plan=plan), rngs=nnx.Rngs(SEED)))
            for family, plan in setup.plans().items()}


# -- report --------------------------------------------------------------------------------------------------------

def machine(threads: int) -> dict[str, Any]:
    return {"processor": platform.processor(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "schedulable_cpus": len(os.sched_getaffinity(0)), "threads": threads, "jax_devices": str(jax.devices())}


def _ratio(entry: dict[str, float]) -> str:
    return f"{entry['median']:.2f} [{entry['min']:.2f}-{entry['max']:.2f}]"


def print_tables(result: dict[str, Any]) -> None:
    print(f"\n{result['machine']['processor'] or result['machine']['machine']}, {result['machine']['threads']} "
          f"threads, jax {result['versions']['jax']}, torch {result['versions']['torch']}")
    print("\n| workload | tokens/call | attnzoo tok/s | torch tok/s | attnzoo / torch speed (median [min-max]) |")
    print("|---|---|---|---|---|")
    for row in result["vs_torch"]:
        zoo, torch = row["contenders"]["attnzoo"], row["contenders"].get("torch")
        torch_columns = (f"{torch['tokens_per_s']:,.0f} | {_ratio(zoo['speed_vs_baseline'])}" if torch
                         else "– | –")
        print(f"| {row['workload']} | {row['tokens_per_call']} | {zoo['tokens_per_s']:,.0f} | {torch_columns} |")
    print("\n| mixer family: plan | " + " | ".join(f"{r['workload']} tok/s | vs GQA" for r in result["families"])
          + " |")
    print("|---|" + "---|---|" * len(result["families"]))
    for name in result["families"][0]["contenders"]:
        cells = [f"{r['contenders'][name]['tokens_per_s']:,.0f} | "
                 f"{_ratio(r['contenders'][name]['speed_vs_baseline'])}" for r in result["families"]]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch's intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=7, help="timed alternating repeats per workload (default 7)")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    p.add_argument("--smoke", action="store_true", help="tiny model and lengths, one repeat (checks the script)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        p.error(f"--threads={args.threads} and --repeats={args.repeats} must be >= 1")
    setup, repeats = (SMOKE, 1) if args.smoke else (FULL, args.repeats)

    modules = torch_modules()
    if modules is None:
        print("torch / transformers not installed: attnzoo rows only")
        contenders: dict[str, Contender] = {"attnzoo": ZooContender(LanguageModel(zoo_config(setup),
                                                                                  rngs=nnx.Rngs(SEED)))}
        checks = None
    else:
        zoo, torch_side = build_pair(setup, *modules, args.threads)
        contenders = {"attnzoo": zoo, "torch": torch_side}
        checks = check_agreement(list(contenders.values()), setup)
    families = family_contenders(contenders["attnzoo"], setup)
    result = {
        "code": code_identity(),
        "versions": {"jax": jax.__version__, "torch": modules and modules[0].__version__,
                     "transformers": modules and modules[1].__version__},
        "machine": machine(args.threads),
        "settings": {**dataclasses.asdict(setup), "repeats": repeats, "smoke": args.smoke},
        "model": zoo_config(setup).to_dict(),
        "checks": checks,
        "vs_torch": time_contenders(contenders, setup, repeats, baseline=list(contenders)[-1]),
        "families": time_contenders(families, setup, repeats, baseline=next(iter(families)), decode=False),
    }
    print_tables(result)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
