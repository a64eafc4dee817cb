"""Run directories and checkpoints: a thin wrapper over Orbax's V0 `CheckpointManager`.

A run directory holds
    run.json         the run's full configuration (model, training, data fingerprint, tokenizer) and the code that
                     made it (commit, dirty flag, source hash, versions; `resumed_by` lists other code that
                     continued it)
    checkpoints/<step>/{state, meta}   params + optimizer state (+ "rest", the model's non-parameter state, such as
                     k-means centroids, when it has any) (Orbax), and {step, seed, data position} (JSON)
    metrics.jsonl, tb/ (TensorBoard events), loss.png, sample.txt, tokenizer files   written by the trainer / CLI

Orbax saves into `<step>.orbax-checkpoint-tmp*` and renames it only when complete, so a crash mid-save leaves
a temporary directory that `latest_step` and `restore` never pick up. A run directory with run.json but no
checkpoint yet (a run killed early) resumes from step 0.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from attnzoo.provenance import describe, same_code
from attnzoo.train.sharding import is_primary_process, sync_processes

RUN_CONFIG_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"


class RunDirError(RuntimeError):
    """The run directory cannot be used as requested (it already holds a run, or holds no run to resume)."""


class ConfigMismatchError(ValueError):
    """`--resume` was asked with a configuration that differs from the saved run's."""


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        flat: dict[str, Any] = {}
        for key, value in config.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: config}


def config_differences(saved: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """One line per differing (dotted) field: 'field: saved X, requested Y'."""
    saved_flat, requested_flat = _flatten(saved), _flatten(_json_roundtrip(requested))

    def show(flat: dict[str, Any], key: str) -> str:
        return repr(flat[key]) if key in flat else "<absent>"

    return [f"{key}: saved {show(saved_flat, key)}, requested {show(requested_flat, key)}"
            for key in sorted(set(saved_flat) | set(requested_flat))
            if key not in saved_flat or key not in requested_flat or saved_flat[key] != requested_flat[key]]


def _json_roundtrip(config: dict[str, Any]) -> dict[str, Any]:
    """The config as run.json will hold it (tuples become lists, ...), so comparisons are like for like."""
    return json.loads(json.dumps(config))


CODE_KEYS = ("code", "resumed_by")  # which code made / continued the run: recorded, never a reason to refuse


def resume_differences(saved: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """`config_differences` of the settings (not the code identity), except that more `train.steps` than saved is
    no difference: it extends the run."""
    saved, requested = ({k: v for k, v in c.items() if k not in CODE_KEYS} for c in (saved, requested))
    saved_steps = saved.get("train", {}).get("steps")
    requested_steps = requested.get("train", {}).get("steps")
    if isinstance(saved_steps, int) and isinstance(requested_steps, int) and requested_steps > saved_steps:
        requested = {**requested, "train": {**requested["train"], "steps": saved_steps}}
    return [line + " (a resumed run can be given more steps, not fewer)" if line.startswith("train.steps:") else line
            for line in config_differences(saved, requested)]


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / RUN_CONFIG_FILE).read_text())


def write_run_config(run_dir: str | Path, run_config: dict[str, Any]) -> None:
    """Write run.json atomically (a temporary file renamed over it), so a crash never leaves half a file."""
    config_file = Path(run_dir) / RUN_CONFIG_FILE
    tmp = config_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run_config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_file)


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds a complete checkpoint (Orbax names a finished one by its bare step number)."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def discard_run_dir(run_dir: str | Path, keep_directory: bool) -> None:
    """Remove what a fresh run wrote into `run_dir` (and the directory itself unless `keep_directory`)."""
    run_dir = Path(run_dir)
    if not keep_directory:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for path in run_dir.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def ensure_no_run(run_dir: str | Path) -> None:
    """Raise RunDirError if `run_dir` exists and is not empty: an existing run is never overwritten."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(f"{run_dir} already holds a run (or other files); it will not be overwritten. "
                          f"Pass --resume to continue it, or choose another --run-dir")


def prepare_run_dir(run_dir: str | Path, run_config: dict[str, Any], resume: bool) -> Path:
    """Validate `run_dir` for a fresh run or a resume, and write run.json.

    Fresh: the directory must not exist or be empty; it is created. Resume: run.json must exist and equal
    `run_config` field by field, except that `train.steps` may be larger (the run is extended; run.json then
    records the new steps). Nothing is written when a check fails; every process checks before process 0 writes.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / RUN_CONFIG_FILE
    if resume:
        if not config_file.exists():
            raise RunDirError(f"--resume: {run_dir} holds no run ({RUN_CONFIG_FILE} not found); "
                              f"drop --resume to start a fresh run there")
        saved = read_run_config(run_dir)
        differences = resume_differences(saved, run_config)
        if differences:
            raise ConfigMismatchError(
                f"--resume: the requested configuration differs from the saved run in {config_file}:\n  "
                + "\n  ".join(differences)
                + "\nrerun with the saved settings, or start a fresh run in another --run-dir")
        sync_processes("attnzoo: run config checked")
        updated = {**saved, **{k: v for k, v in run_config.items() if k not in CODE_KEYS}}
        code = run_config.get("code")
        if code is not None and not same_code(saved.get("code"), code):
            warnings.warn(f"--resume: {run_dir} was started by {describe(saved.get('code'))} and continues with "
                          f"{describe(code)}; run.json records both (resumed_by)", stacklevel=2)
            updated["resumed_by"] = [*saved.get("resumed_by", []), code]
        if is_primary_process() and _json_roundtrip(updated) != saved:  # extended, or continued by other code
            write_run_config(run_dir, updated)
        return run_dir
    ensure_no_run(run_dir)
    sync_processes("attnzoo: run dir checked")
    if is_primary_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, run_config)
    return run_dir


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding stand-ins for `tree`'s arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _has_leaves(tree: Any) -> bool:
    return tree is not None and bool(jax.tree.leaves(tree))


class Checkpointer:
    """Saves and restores {params, opt_state} (and the non-parameter state `rest`, where the model has one) plus
    {step, seed, data position} under `run_dir/checkpoints`.

    Saves are asynchronous (training continues while the files are written); keeps the latest `keep`.
    """

    def __init__(self, run_dir: str | Path, keep: int | None = None, *, create: bool = True):
        """`keep=None` keeps every checkpoint; `create=False` opens an existing directory without creating it."""
        self.directory = Path(run_dir).absolute() / CHECKPOINT_DIR
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create))

    def save(self, step: int, params: Any, opt_state: Any, seed: int, rest: Any = None) -> None:
        """Checkpoint the state after `step` updates; the next batch to train on is batch index `step`. `rest`: the
        model's non-parameter state (saved when it holds arrays)."""
        state = {"params": params, "opt_state": opt_state}
        if _has_leaves(rest):
            state["rest"] = rest
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"step": step, "seed": seed, "data_position": step})))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def _existing_step(self, step: int | None) -> int:
        """`step` (default: the latest), checked to be on disk."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is None:
            return self.latest_step()
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; "
                                    f"saved steps: {', '.join(map(str, steps))}")
        return step

    def restore(self, params_like: Any, opt_state_like: Any, step: int | None = None, *,
                rest_like: Any = None) -> tuple:
        """(params, opt_state, meta) of `step` (default: the latest), shaped and sharded like the given trees; with
        `rest_like` (the model's non-parameter state), (params, opt_state, meta, rest)."""
        step = self._existing_step(step)
        target = {"params": abstract_like(params_like), "opt_state": abstract_like(opt_state_like)}
        if _has_leaves(rest_like):
            target["rest"] = abstract_like(rest_like)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        state = restored["state"]
        if rest_like is None:
            return state["params"], state["opt_state"], restored["meta"]
        return state["params"], state["opt_state"], restored["meta"], state.get("rest", rest_like)

    def restore_params(self, params_like: Any, step: int | None = None, *, rest_like: Any = None) -> tuple:
        """(params, meta) of `step` (default: the latest), shaped and sharded like `params_like`; with `rest_like`
        (the model's non-parameter state), (params, meta, rest). The optimizer state is not read (an Orbax partial
        restore), so no optimizer needs to be built."""
        step = self._existing_step(step)
        target = {"params": abstract_like(params_like)}
        if _has_leaves(rest_like):
            target["rest"] = abstract_like(rest_like)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                         partial_restore=True),
            meta=ocp.args.JsonRestore()))
        if rest_like is None:
            return restored["state"]["params"], restored["meta"]
        return restored["state"]["params"], restored["meta"], restored["state"].get("rest", rest_like)

    def wait(self) -> None:
        """Block until pending saves are on disk (raises if one failed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
