"""Parameter checkpoints: nested dicts of arrays saved with Orbax, written atomically.

A flare-jax checkpoint directory holds ``params/`` (Orbax), ``config.json`` (the model config), the
source ``hf_config.json`` and the tokenizer files. Directories are assembled under a temporary name
next to the destination and renamed when complete, so a crash leaves no half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from flare_jax.config import ModelConfig

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
HF_CONFIG_FILE = "hf_config.json"
GROUPS_FILE = "groups.json"
FORMAT_NAME = "flare-jax"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json")

Nested = dict[str, Any]


class CheckpointError(ValueError):
    """A flare-jax checkpoint directory is missing pieces or does not match its config."""


@contextlib.contextmanager
def atomic_directory(destination: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``destination`` when the block succeeds."""
    destination = Path(destination).absolute()
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination}: already exists (pass overwrite=True to replace it)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.parent / f".{destination.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(tmp, destination)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def nest(flat: dict[tuple[str, ...], Any]) -> Nested:
    """``{("a", "b"): x}`` -> ``{"a": {"b": x}}``."""
    root: Nested = {}
    for path, value in flat.items():
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return root


def flatten(tree: Nested, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Inverse of :func:`nest`."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out


def param_group(path: tuple[str, ...]) -> str:
    """The save group of a parameter: one per decoder layer, one per other top-level entry."""
    return f"{path[0]}.{path[1]}" if path[0] == "layers" else path[0]


def split_groups(params: Nested) -> dict[str, Nested]:
    """``params`` as ``{group name: sub-tree}`` (see :func:`param_group`)."""
    groups: dict[str, dict] = {}
    for path, value in flatten(params).items():
        groups.setdefault(param_group(path), {})[path] = value
    return {name: nest(flat) for name, flat in groups.items()}


def save_param_groups(directory: Path, groups: Iterable[tuple[str, Nested]]) -> None:
    """Write parameter groups one at a time, each as an Orbax checkpoint ``directory/<group>``,
    then the manifest ``groups.json``. Only one group need be in memory at a time, which keeps
    conversion of large checkpoints near one copy of the weights."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    names = []
    for name, tree in groups:
        checkpointer.save(directory / name, tree)
        checkpointer.wait_until_finished()
        names.append(name)
    (directory / GROUPS_FILE).write_text(json.dumps(names) + "\n")


def save_params(directory: Path, params: Nested) -> None:
    """Write ``params`` (nested dict of numpy/jax arrays) as grouped Orbax checkpoints."""
    save_param_groups(directory, split_groups(params).items())


def param_group_names(directory: Path) -> list[str]:
    """The groups of a parameter checkpoint, from its manifest."""
    manifest = Path(directory) / GROUPS_FILE
    if not manifest.is_file():
        raise CheckpointError(f"{directory}: no {GROUPS_FILE}; not a complete flare-jax parameter "
                              "checkpoint")
    return json.loads(manifest.read_text())


def load_param_group(directory: Path, name: str, abstract: Nested | None = None) -> Nested:
    """Read one parameter group (optionally onto the shapes/shardings of ``abstract``)."""
    checkpointer = ocp.StandardCheckpointer()
    path = Path(directory).absolute() / name
    return checkpointer.restore(path, abstract) if abstract is not None else \
        checkpointer.restore(path)


def load_params(directory: Path, abstract: Nested | None = None) -> Nested:
    """Read a whole parameter checkpoint (optionally onto ``abstract``'s shapes/shardings)."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: parameter checkpoint not found")
    targets = split_groups(abstract) if abstract is not None else {}
    flat: dict[tuple[str, ...], Any] = {}
    for name in param_group_names(directory):
        flat.update(flatten(load_param_group(directory, name, targets.get(name))))
    return nest(flat)


def write_model_config(directory: Path, config: ModelConfig, hf_config: dict | None) -> None:
    """Write our config (and the source HF config, kept for export)."""
    payload = {"format": FORMAT_NAME, "model": config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    if hf_config is not None:
        (directory / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")


def read_model_config(directory: Path) -> ModelConfig:
    """Read the model config of a flare-jax checkpoint directory."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; is {directory} a flare-jax checkpoint?")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if payload.get("format") != FORMAT_NAME or "model" not in payload:
        raise CheckpointError(f"{path}: not a flare-jax model config (expected "
                              f"'format': '{FORMAT_NAME}' and a 'model' entry)")
    return ModelConfig.from_dict(payload["model"])


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy whichever tokenizer files exist in ``source``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied


def as_numpy_tree(tree: Nested) -> Nested:
    """Nested dict with every leaf as a host numpy array."""
    return {k: as_numpy_tree(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}
