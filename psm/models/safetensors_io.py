"""Reading and writing HF-style safetensors checkpoints.

A checkpoint folder holds either one `model.safetensors` or shards listed in
`model.safetensors.index.json` (`{"weight_map": {tensor name: file name}}`).
`SafetensorsCheckpoint` opens the files lazily and hands out one tensor at a
time (as numpy), so a loader can convert and place each tensor before reading
the next instead of holding a second full copy of the model.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: str) -> dict:
    """Parses a JSON file; a clear error names the file when it is absent or invalid."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


class SafetensorsCheckpoint:
    """The tensors of a HF checkpoint (folder, single file or sharded), read on demand.

    Args:
      path: a checkpoint folder or one `.safetensors` file.
    Raises:
      ValueError: no safetensors file found, or the index names a missing shard.
    """

    def __init__(self, path: str):
        self.where = path
        if os.path.isfile(path):
            files = {None: path}
            self._file_of = None
        elif os.path.isfile(os.path.join(path, INDEX_FILE)):
            index = read_json(os.path.join(path, INDEX_FILE))
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{os.path.join(path, INDEX_FILE)} has no 'weight_map' dict")
            files = {}
            for fname in sorted(set(weight_map.values())):
                full = os.path.join(path, fname)
                if not os.path.isfile(full):
                    raise ValueError(f"shard {fname} listed in {INDEX_FILE} is missing from {path}")
                files[fname] = full
            self._file_of = dict(weight_map)
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            files = {None: os.path.join(path, SINGLE_FILE)}
            self._file_of = None
        else:
            raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
        self._handles = {k: safe_open(v, framework="numpy") for k, v in files.items()}
        if self._file_of is None:
            self._file_of = {n: None for n in self._handles[None].keys()}
        else:
            for fname, h in self._handles.items():
                listed = {n for n, f in self._file_of.items() if f == fname}
                absent = sorted(listed - set(h.keys()))
                if absent:
                    raise ValueError(f"{INDEX_FILE} in {path} places {absent} in {fname}, "
                                     "which does not contain them")

    def names(self) -> set[str]:
        return set(self._file_of)

    def _handle(self, name: str):
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} not in {self.where}")
        return self._handles[self._file_of[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def metadata(self) -> dict:
        meta = {}
        for h in self._handles.values():
            meta.update(h.metadata() or {})
        return meta


def shard_file_names(n: int) -> list[str]:
    """HF's shard names: one `model.safetensors`, or `model-0000i-of-0000n.safetensors`."""
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def save_safetensors(out_dir: str,
                     entries: Sequence[tuple[str, int, Callable[[], np.ndarray]]],
                     *, max_shard_bytes: int = 2 ** 31,
                     metadata: dict[str, str] | None = None) -> list[str]:
    """Writes tensors as one file or as shards with an index, one shard in memory at a time.

    Args:
      entries: `(name, nbytes, make)` in the order to write; `make()` returns
        the tensor as a numpy array (called only when its shard is written).
      max_shard_bytes: a new shard starts before a tensor that would push the
        current one past this size.
      metadata: safetensors header metadata (HF expects `{"format": "pt"}`).
    Returns:
      The file names written (shards, then the index when sharded).
    """
    shards: list[list[tuple[str, Callable[[], np.ndarray]]]] = [[]]
    size = 0
    for name, nbytes, make in entries:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, make))
        size += nbytes
    names = shard_file_names(len(shards))
    os.makedirs(out_dir, exist_ok=True)
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        tensors = {}
        for name, make in shard:
            tensors[name] = np.ascontiguousarray(make())
            total += tensors[name].nbytes
            weight_map[name] = fname
        save_file(tensors, os.path.join(out_dir, fname), metadata=metadata)
        del tensors
    if len(names) > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                      indent=2, sort_keys=True)
        names.append(INDEX_FILE)
    return names


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
