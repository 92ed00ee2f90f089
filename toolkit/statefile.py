"""State files that run no code when they are read.

A checkpoint holds tensors (weights, optimizer moments, RNG states) and plain values
(config, position, the privacy accountant's history). Pickle, which `torch.save` uses,
can run any code on load, and run folders travel between parties. Here tensors go into a
safetensors file (a JSON header and raw little-endian arrays: nothing to execute), and
everything else into that header as JSON, with tensors referred to by name:

    tensor     -> {"$tensor": "t3"}                  numpy array -> {"$ndarray": "t4", "dtype": "uint32"}
    tuple      -> {"$tuple": [...]}                  dict with non-string keys -> {"$items": [[k, v], ...]}

Reading rebuilds exactly dicts, lists, tuples, strings, numbers, booleans, None, tensors
and numpy arrays; anything else in a file is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gankit.errors import UserError
from gankit.files import Exists, parse_json, write_bytes

HEADER_KEY = "gankit"
FORMAT = 2  # 1 was the pickled .pt checkpoint
MARKERS = ("$tensor", "$ndarray", "$tuple", "$items")


class StateFileError(UserError):
    pass


def _encode(value: Any, tensors: dict) -> Any:
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        # A copy of its own: safetensors refuses tensors that share memory (views, EMA).
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {"$tensor": name}
    if isinstance(value, np.ndarray):
        name = f"t{len(tensors)}"
        # Stored widened to int64/float64 where torch has no such dtype (numpy's uint32 RNG key).
        wide = value.astype(np.int64) if value.dtype.kind in "ui" else value.astype(np.float64)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(wide))
        return {"$ndarray": name, "dtype": value.dtype.str}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"$items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in a state file")


def _decode(value: Any, tensors: dict, where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if isinstance(value, dict):
        marker = next((m for m in MARKERS if m in value), None)
        if marker is None:
            if any(k.startswith("$") for k in value):
                raise StateFileError(f"{where}: unknown entry {sorted(value)}")
            return {k: _decode(v, tensors, where) for k, v in value.items()}
        body = value[marker]
        if marker in ("$tensor", "$ndarray"):
            if not isinstance(body, str) or body not in tensors:
                raise StateFileError(f"{where}: refers to a missing tensor {body!r}")
            if marker == "$tensor":
                return tensors[body]
            try:
                dtype = np.dtype(value["dtype"])
            except (TypeError, KeyError):
                raise StateFileError(f"{where}: an array without a valid dtype") from None
            if dtype.kind not in "uifb":
                raise StateFileError(f"{where}: arrays of dtype {dtype} are not stored here")
            return tensors[body].numpy().astype(dtype)
        if not isinstance(body, list):
            raise StateFileError(f"{where}: a malformed {marker} entry")
        if marker == "$tuple":
            return tuple(_decode(v, tensors, where) for v in body)
        items = {}
        for pair in body:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise StateFileError(f"{where}: a malformed dictionary entry")
            key = _decode(pair[0], tensors, where)
            if not isinstance(key, (str, int, float, bool, tuple)) and key is not None:
                raise StateFileError(f"{where}: a dictionary key of type {type(key).__name__}")
            items[key] = _decode(pair[1], tensors, where)
        return items
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise StateFileError(f"{where}: unexpected value of type {type(value).__name__}")


def decode(skeleton: Any, tensors: dict, where: str) -> Any:
    try:
        return _decode(skeleton, tensors, where)
    except RecursionError:  # JSON nested just shallow enough to parse
        raise StateFileError(f"{where}: nests deeper than a state file does") from None


def to_parts(state: dict) -> tuple[str, dict]:
    """(JSON text, tensors): a state as what a message can carry without pickle (a Flower
    ConfigRecord string and ArrayRecord), read back by `from_parts`."""
    tensors: dict = {}
    return json.dumps(_encode(state, tensors)), tensors


def from_parts(text: str, tensors: dict, where: str) -> dict:
    if not isinstance(text, str):
        raise StateFileError(f"{where}: not a JSON state")
    try:
        skeleton = parse_json(text, where)
    except UserError:
        raise StateFileError(f"{where}: not a JSON state") from None
    state = decode(skeleton, tensors, where)
    if not isinstance(state, dict):
        raise StateFileError(f"{where}: not a state dictionary")
    return state


def save_state(state: dict, path: Path, exists: Exists = "replace") -> Path:
    """Write `state` to `path` atomically (a crash mid-write leaves the old file whole)."""
    from safetensors.torch import save

    path = Path(path)
    tensors: dict = {}
    header = json.dumps({"format": FORMAT, "state": _encode(state, tensors)})
    try:
        # Atomic and never through a link (gankit.files); a full disk leaves the old file whole.
        return write_bytes(path, save(tensors, metadata={HEADER_KEY: header}), exists)
    except OSError as err:
        raise StateFileError(f"could not write {path}: {err.strerror or err}") from None


def load_state(path: Path, device="cpu") -> dict:
    """Read a state file written by `save_state`; refuses anything else with one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"no state file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise StateFileError(f"{path} is not a gankit state file ({err})") from None
    if not isinstance(metadata.get(HEADER_KEY), str):
        raise StateFileError(f"{path} is a safetensors file without gankit's header")
    header = parse_json(metadata[HEADER_KEY], f"{path}'s header")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StateFileError(f"{path} has state-file format {header.get('format') if isinstance(header, dict) else '?'}, "
                             f"this gankit reads format {FORMAT}")
    state = decode(header.get("state"), tensors, str(path))
    if not isinstance(state, dict):
        raise StateFileError(f"{path} does not hold a state dictionary")
    return state
