"""A trained model as a folder: `model.json` (head parameters, feature spec, label names, backbone
and extraction settings) and `head.safetensors` (weights). Nothing is pickled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from llmembed.classify.heads import HEADS

FORMAT = 2  # 2: each source carries its full cache entry spec (weights identity included)


def save_trained(folder: Path, head, *, head_name: str, info: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: np.ascontiguousarray(v) for k, v in head.state().items()}
    save_file(state, str(folder / "head.safetensors"))
    meta = {"format": FORMAT, "head": head_name, "params": head.get_params(), **info}
    (folder / "model.json").write_text(json.dumps(meta, indent=2, default=_jsonable))
    return folder


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot save {type(value).__name__} in model.json")


def load_trained(folder: Path):
    """(head, meta) from a folder written by `save_trained`."""
    folder = Path(folder)
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved llmembed model (no model.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{folder}: model format {meta.get('format')}, this llmembed reads {FORMAT}"
        )
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()}
    head = HEADS[meta["head"]](**params).load_state(load_file(str(folder / "head.safetensors")))
    return head, meta
