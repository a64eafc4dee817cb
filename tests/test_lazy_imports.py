"""What an import costs: building a config imports only its own mixer files (the registry finds a name's file from
the files' source) and no kernel op module (pallas_kernels imports an op's api module on first lookup). A
fresh interpreter, so that nothing an earlier test imported counts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
LIGHT_KERNEL_MODULES = {"pallas_kernels", "pallas_kernels.ops", "pallas_kernels.common"}
OPS = ("flash_attention", "decode_attention", "chunked_linear_attention", "block_sparse_attention")

# One fresh interpreter records, step by step, the mixer and pallas_kernels modules loaded so far (and any
# jax.experimental.pallas module), then how the op functions resolve once their subpackages are imported first.
SCRIPT = f"""
import importlib, json, sys

def loaded():
    names = sorted(sys.modules)
    return {{"mixers": [m for m in names if m.startswith("attnzoo.mixers.")],
             "kernels": [m for m in names if m.startswith("pallas_kernels")],
             "pallas": [m for m in names if m.startswith("jax.experimental.pallas")]}}

import attnzoo
from attnzoo import registry
attnzoo.ModelConfig(plan="gqa*2", n_layers=2)
steps = {{"config": loaded()}}
import pallas_kernels.common
steps["common"] = loaded()
registry.get_mixer("ccgqa")  # registered by register("ccgqa", ...)(CompressedConvAttention)
steps["ccgqa"] = loaded()
sys.path.insert(0, {str(TESTS)!r})
import toy_mixers
attnzoo.ModelConfig(plan="toy_side_inputs*2", n_layers=2)
steps["toy"] = loaded()
try:
    registry.get_mixer("no_such_mixer")
except ValueError as error:
    steps["unknown"] = str(error)
names = attnzoo.registered()
steps["registered"] = names
steps["shipped"] = sorted(n for n in names if registry.get_mixer(n).cls.__module__.startswith("attnzoo.mixers."))
steps["index"] = sorted(registry._index())

import jax.numpy as jnp
import pallas_kernels
steps["before_ops"] = loaded()
for op in {OPS!r}:  # the subpackage first: the import system then sets the package attribute `op` to it
    importlib.import_module(f"pallas_kernels.{{op}}.reference")
apis = [importlib.import_module(f"pallas_kernels.{{op}}.api") for op in {OPS!r}]
steps["op_is_function"] = [getattr(pallas_kernels, op) is getattr(api, op) for op, api in zip({OPS!r}, apis)]
from pallas_kernels import flash_attention
from pallas_kernels.flash_attention import api, reference
steps["imported_op_is_function"] = flash_attention is api.flash_attention
steps["api_module"] = api.__name__
q_BTHE = jnp.linspace(-2.0, 2.0, 80).reshape(1, 5, 2, 8)
steps["max_error"] = float(jnp.abs(pallas_kernels.flash_attention(q_BTHE, q_BTHE, q_BTHE, causal=True)
                                   - reference.flash_attention_reference(q_BTHE, q_BTHE, q_BTHE, causal=True)).max())
print(json.dumps(steps))
"""


@pytest.fixture(scope="module")
def steps():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_building_a_config_imports_only_its_mixer_and_no_op_module(steps):
    assert steps["config"]["mixers"] == ["attnzoo.mixers.base", "attnzoo.mixers.gqa"]
    assert set(steps["config"]["kernels"]) <= LIGHT_KERNEL_MODULES
    assert set(steps["common"]["kernels"]) <= LIGHT_KERNEL_MODULES
    assert steps["config"]["pallas"] == steps["common"]["pallas"] == []


def test_a_name_registered_by_a_call_on_a_class_imports_only_its_file(steps):
    assert steps["ccgqa"]["mixers"] == ["attnzoo.mixers.base", "attnzoo.mixers.cca", "attnzoo.mixers.gqa"]


def test_a_mixer_registered_outside_the_package_needs_no_mixer_file(steps):
    assert steps["toy"]["mixers"] == steps["ccgqa"]["mixers"]
    assert {"toy_side_inputs", "toy_shared_dict"} <= set(steps["registered"])


def test_an_unknown_name_lists_every_registered_mixer(steps):
    assert steps["unknown"] == ("mixer 'no_such_mixer' is not registered; registered mixers: "
                                + ", ".join(steps["registered"]))
    assert "mamba2" in steps["unknown"] and "toy_side_inputs" in steps["unknown"]


def test_the_index_holds_every_name_the_mixer_files_register(steps):
    assert steps["index"] == steps["shipped"]
    assert {"gqa", "mha", "mqa", "ccgqa", "gated_headwise", "based"} <= set(steps["index"])


def test_an_op_subpackage_imported_first_never_shadows_the_op_function(steps):
    assert set(steps["before_ops"]["kernels"]) <= LIGHT_KERNEL_MODULES  # so the subpackage imports come first
    assert steps["op_is_function"] == [True] * len(OPS)
    assert steps["imported_op_is_function"] and steps["api_module"] == "pallas_kernels.flash_attention.api"
    assert steps["max_error"] < 1e-5  # float32, the backend "auto" picks against the reference


def test_a_value_set_on_the_package_replaces_the_op_but_the_subpackage_does_not(monkeypatch):
    import pallas_kernels
    from pallas_kernels.decode_attention import api

    monkeypatch.setattr(pallas_kernels, "decode_attention", sys.modules["pallas_kernels.decode_attention"])
    assert pallas_kernels.decode_attention is api.decode_attention
    monkeypatch.setattr(pallas_kernels, "decode_attention", len)
    assert pallas_kernels.decode_attention is len
    monkeypatch.undo()
    assert pallas_kernels.decode_attention is api.decode_attention
    assert set(OPS) <= set(dir(pallas_kernels)) and set(OPS) <= set(pallas_kernels.__all__)
