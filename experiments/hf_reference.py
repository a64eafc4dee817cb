"""Hugging Face `transformers` references for attnzoo.interop (runs in a separate venv with torch CPU +
transformers: `pip install -e '.[hf]'`, see the command below; attnzoo itself never needs torch).

    /work/hfvenv/bin/python experiments/hf_reference.py                      # regenerate tests/fixtures/hf/*
    /work/hfvenv/bin/python experiments/hf_reference.py --check-saved DIR   # transformers loads DIR, same outputs?

Fixtures: for each architecture, a tiny random config built by transformers (config.json), the names and shapes
of its checkpoint tensors (tensors.json), the logits transformers computes for a fixed batch (logits.npy) and its
greedy generations (reference.json). The weights are not committed: `random_tensors(shapes, seed)` (numpy only,
imported by tests/test_interop.py too) draws them from the seed, the script writes them as model.safetensors,
transformers loads that file strictly (no missing, unexpected or mismatched tensor) and computes the reference.

--check-saved DIR: DIR is what `attnzoo-export RUN_DIR DIR` (save_pretrained of a trained model, and a model card)
wrote, with attnzoo's own logits and greedy tokens in attnzoo_reference.json; transformers loads DIR strictly and
must reproduce both (logits within 1e-4, identical tokens). Exit status 0 when it does.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"
COMMAND = "/work/hfvenv/bin/python experiments/hf_reference.py"
SEED = 0
LOGITS_TOKENS = [[3, 17, 5, 29, 11, 2, 23, 7, 13, 31], [30, 1, 12, 4, 19, 8, 26, 6, 15, 9]]
PROMPTS = [[5, 9, 14, 3, 22], [7, 2, 11]]
NEW_TOKENS = 8
TOLERANCE = 1e-4

_LLAMA = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
# Tiny random configs, one per supported architecture (and the options each exercises).
CONFIGS = {
    "llama": ("LlamaConfig", dict(_LLAMA, rms_norm_eps=1e-5, rope_parameters={"rope_type": "llama3", "factor": 4.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
              "rope_theta": 500.0})),
    "llama_tied_linear": ("LlamaConfig", dict(_LLAMA, tie_word_embeddings=True, attention_bias=True,
                          rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "mistral": ("MistralConfig", dict(_LLAMA, head_dim=16, sliding_window=4)),
    "qwen2": ("Qwen2Config", dict(_LLAMA, use_sliding_window=True, sliding_window=3, max_window_layers=1,
              layer_types=["full_attention", "sliding_attention"])),
    "qwen3": ("Qwen3Config", dict(_LLAMA, head_dim=8, tie_word_embeddings=True)),
    "deepseek_v3": ("DeepseekV3Config", dict(_LLAMA, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8, first_k_dense_replace=2,
                    rope_interleave=True)),
    "deepseek_v2": ("DeepseekV2Config", dict(_LLAMA, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
                    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, head_dim=4, first_k_dense_replace=2)),
    "mamba2": ("Mamba2Config", dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
               head_dim=16, num_heads=4, n_groups=2, conv_kernel=4, chunk_size=16, bos_token_id=None,
               eos_token_id=None, pad_token_id=None)),
}


def random_tensors(shapes: dict[str, list[int]], seed: int = SEED) -> dict[str, np.ndarray]:
    """Deterministic float32 weights for the named tensors (numpy's PCG64 stream, names in sorted order), scaled so
    a tiny model's logits have clear margins: matrices N(0, 1/fan_in), embeddings N(0, 1), norm weights 1 +
    N(0, 0.2^2), biases N(0, 0.2^2), Mamba-2's A_log / dt_bias / D in their usual ranges."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        normal = rng.standard_normal(shape)
        if name.endswith("A_log"):
            value = np.log(1 + 15 * rng.random(shape))
        elif name.endswith("dt_bias"):
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), shape))
            value = dt + np.log(-np.expm1(-dt))
        elif name.endswith(".D"):
            value = 1 + 0.2 * normal
        elif name.endswith("conv1d.weight"):
            value = normal / math.sqrt(shape[-1])
        elif name.endswith(".bias"):
            value = 0.2 * normal
        elif "norm" in name.rsplit(".", 2)[-2]:
            value = 1 + 0.2 * normal
        elif "embed" in name:
            value = normal
        else:
            value = normal / math.sqrt(shape[-1])
        out[name] = value.astype(np.float32)
    return out


def _torch():
    import torch
    import transformers

    torch.manual_seed(SEED)
    return torch, transformers


def _strict_load(directory: Path):
    torch, transformers = _torch()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True,
                                                                    dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs" or (k == "error_msgs" and v)}
    if problems:
        raise SystemExit(f"transformers did not load {directory} cleanly: {problems}")
    return model.eval()


def _outputs(model, tokens: list[list[int]], prompts: list[list[int]], new_tokens: int) -> dict:
    """Logits of `tokens`, each prompt's greedy continuation, and the smallest top-1 / top-2 margin on the way."""
    torch, transformers = _torch()
    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits.float().numpy()
        generated, margin = [], math.inf
        for prompt in prompts:
            config = transformers.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False,
                                                   eos_token_id=None, pad_token_id=0, bos_token_id=None)
            out = model.generate(torch.tensor([prompt]), generation_config=config)[0].tolist()[len(prompt):]
            generated.append(out)
            steps = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1].float()
            top2 = torch.topk(steps, 2, dim=-1).values
            margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
    return {"logits": logits, "generated": generated, "min_margin": margin}


def make_fixture(arch: str) -> None:
    """The first seed (from SEED) whose greedy path has clear top-1 margins, so that rounding cannot flip a token."""
    torch, transformers = _torch()
    from safetensors.numpy import load_file, save_file

    class_name, fields = CONFIGS[arch]
    config = getattr(transformers, class_name)(**fields)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp)  # names as transformers writes
        shapes = {name: list(a.shape) for name, a in load_file(tmp / "model.safetensors").items()}
        for seed in range(SEED, SEED + 20):
            save_file(random_tensors(shapes, seed), tmp / "model.safetensors", metadata={"format": "pt"})
            out = _outputs(_strict_load(tmp), LOGITS_TOKENS, PROMPTS, NEW_TOKENS)
            if out["min_margin"] >= 1e-2:
                break
        else:
            raise SystemExit(f"{arch}: no seed gave greedy margins >= 1e-2")
        target = FIXTURES / arch
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        shutil.copy(tmp / "config.json", target / "config.json")
    (target / "tensors.json").write_text(json.dumps(shapes, indent=1, sort_keys=True) + "\n")
    np.save(target / "logits.npy", out["logits"].astype(np.float32))
    reference = {"command": COMMAND, "transformers": transformers.__version__, "torch": torch.__version__,
                 "seed": seed, "logits_tokens": LOGITS_TOKENS, "prompts": PROMPTS, "generated": out["generated"],
                 "min_margin": out["min_margin"]}
    (target / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    print(f"{arch}: {len(shapes)} tensors, seed {seed}, greedy {out['generated']}, "
          f"min margin {out['min_margin']:.3f}")


def check_saved(directory: Path) -> int:
    """transformers loads `directory` strictly and reproduces attnzoo's logits and greedy tokens."""
    if not (directory / "attnzoo_reference.json").exists():
        raise SystemExit(f"{directory}: no attnzoo_reference.json; write the directory with "
                         f"`attnzoo-export RUN_DIR {directory}`")
    expected = json.loads((directory / "attnzoo_reference.json").read_text())
    model = _strict_load(directory)
    out = _outputs(model, expected["logits_tokens"], expected["prompts"], expected["new_tokens"])
    diff = float(np.abs(out["logits"] - np.asarray(expected["logits"], np.float32)).max())
    same_tokens = out["generated"] == expected["generated"]
    print(f"{directory}: {type(model).__name__}, max |logits - attnzoo| = {diff:.2e} (tolerance {TOLERANCE}), "
          f"greedy tokens {'identical' if same_tokens else 'DIFFER'}: transformers {out['generated']}, "
          f"attnzoo {expected['generated']}")
    return 0 if diff <= TOLERANCE and same_tokens else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-saved", type=Path, metavar="DIR",
                        help="check a directory written by attnzoo's save_pretrained instead of making fixtures")
    parser.add_argument("--arch", nargs="+", choices=sorted(CONFIGS), help="fixtures to regenerate (default all)")
    args = parser.parse_args(argv)
    if args.check_saved:
        return check_saved(args.check_saved)
    for arch in args.arch or sorted(CONFIGS):
        make_fixture(arch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
