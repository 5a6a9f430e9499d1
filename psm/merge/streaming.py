"""Merging checkpoints larger than memory: `psm.merge` applied tensor by tensor on disk.

`merge_checkpoints` reads one tensor of every input at a time, merges it with
`psm.merge` as a one-leaf flat dict `{tensor name: array}`, and appends the
result to the output file before the next tensor is merged, so its memory is a
few tensors per input however large the models are (the next tensor is read
while the current one is merged, and the previous one is written).

Same numbers as in memory. `psm.merge` draws the random numbers of a leaf from
the key, the leaf's canonical name (`psm.merge.leaf_name`) and each scalar's flat
index only, and TIES trims each tensor on its own; so merging
`{name: x}` for every tensor gives bit for bit the result of merging the flat
dict of all tensors `{name: x for every tensor}` in memory. The name used as
the leaf path is the tensor's name in the *first model's* format:

- HF folders: the safetensors tensor name, e.g. `model.layers.0.mlp.up_proj.weight`;
- orbax checkpoints and psm training workdirs: the leaf's key path joined with
  "/" with a final `value` entry dropped (as `leaf_name` does for NNX
  variables), e.g. `layers/0/mlp/up_proj/kernel`. For a workdir this is the
  name the trainer's in-memory merge of its stacked `params` uses, so the
  command reproduces that merge exactly.

A layout conversion (psm Llama `[in, out]` kernels -> HF `[out, in]` weights)
happens after merging, when the output format asks for it.

Inputs (`open_input`): a HF folder (`config.json` + `model.safetensors` or
shards with `model.safetensors.index.json`) or a single `.safetensors` file;
an orbax PyTree checkpoint folder (the one holding `_METADATA`, or a folder
with a single item such as `default/` inside); a psm training workdir
(`config.json` + `checkpoints/<step>/`), whose K stacked replicas are K
models. Safetensors data is read with `os.preadv` into fresh aligned buffers
(no memory map, so only live tensors count in the resident set; the alignment
lets `jax.device_put` use the buffer without a copy). Orbax data is
read through tensorstore (see `OrbaxReader` for replica slices).

Output: HF safetensors shards filled in order and closed as they fill (each
shard's header is known in advance from the shapes), the index file, and the
config / tokenizer files of the base (or first model); or an orbax
checkpoint written leaf by leaf with tensorstore in the layout orbax itself
writes (OCDBT, zarr, `_METADATA`). Everything goes to a temporary folder beside
the destination that is renamed at the end, so a killed run leaves nothing at
the destination.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import resource
import shutil
import struct
import sys
import time
from typing import Any, Callable, Sequence

import jax
import ml_dtypes
import numpy as np

from psm import atomic_out
from psm.merge import methods as M
from psm.models.safetensors_io import INDEX_FILE, SINGLE_FILE, shard_file_names

# ---- dtypes ----------------------------------------------------------------------------

_ST_TO_NP = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}
DTYPE_NAMES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "float16": np.dtype(np.float16), "float64": np.dtype(np.float64)}
"""Values accepted by `dtype` / `--dtype`."""

_ALIGN = 64
_HUGE = 2 << 20
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
HF_EXTRA_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                  "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                  "chat_template.json")
"""Files copied from the base (or first model) next to a HF output, where present."""
ARCH_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size",
             "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
             "vocab_size", "tie_word_embeddings")
"""`config.json` keys that must agree between HF inputs."""


def _is_float(dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype in (
        np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn),
        np.dtype(ml_dtypes.float8_e5m2))


def aligned_empty(shape: Sequence[int], dtype) -> np.ndarray:
    """An uninitialised C-order array whose data starts on a 64-byte boundary.

    Arrays of 4 MiB or more start on a 2 MiB boundary: numpy advises transparent
    huge pages for such allocations, and the alignment lets each 2 MiB of the
    array be one huge page (one page fault instead of 512).
    """
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    align = _HUGE if n >= 2 * _HUGE else _ALIGN
    raw = np.empty(n + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + n].view(dtype).reshape(tuple(shape))


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor, and where it is (for error messages)."""

    name: str
    shape: tuple
    dtype: np.dtype
    where: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


# ---- safetensors reading ------------------------------------------------------------------

class SafetensorsFile:
    """One `.safetensors` file: its header is parsed and checked on opening.

    Raises:
        ValueError: the file is missing, or its header is corrupt (names the file
            and, where it applies, the tensor).
    """

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise ValueError(f"{path}: file not found")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: corrupt safetensors header: file is {size} bytes, "
                                 "shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{path}: corrupt safetensors header: header length {n} "
                                 f"exceeds the file size {size}")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header: not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt safetensors header: not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.entries: dict[str, tuple[TensorInfo, int]] = {}
        for name, e in header.items():
            bad = f"{path}: corrupt safetensors header: tensor {name!r}"
            if not isinstance(e, dict) or e.get("dtype") not in _ST_TO_NP:
                raise ValueError(f"{bad} has dtype {e.get('dtype') if isinstance(e, dict) else e!r}"
                                 f"; known: {sorted(_ST_TO_NP)}")
            shape, offs = e.get("shape"), e.get("data_offsets")
            if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0
                                                       for s in shape)):
                raise ValueError(f"{bad} has shape {shape!r}; expected a list of sizes")
            if (not isinstance(offs, list) or len(offs) != 2
                    or not all(isinstance(o, int) for o in offs)):
                raise ValueError(f"{bad} has data_offsets {offs!r}; expected [begin, end]")
            info = TensorInfo(name, tuple(shape), _ST_TO_NP[e["dtype"]], path)
            begin, end = offs
            if not 0 <= begin <= end <= data_size or end - begin != info.nbytes:
                raise ValueError(f"{bad}: data_offsets {offs} do not hold {info.nbytes} bytes "
                                 f"of {e['dtype']}{list(shape)} within the {data_size} data bytes")
            self.entries[name] = (info, begin)

    def read(self, name: str, fd: int) -> np.ndarray:
        """Tensor `name` as a fresh aligned numpy array (`aligned_empty`)."""
        info, begin = self.entries[name]
        out = aligned_empty(info.shape, info.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        pos, offset = 0, self.data_start + begin
        while pos < len(view):
            got = os.preadv(fd, [view[pos:]], offset + pos)
            if got <= 0:
                raise ValueError(f"{self.path}: tensor {name!r}: file ended while reading")
            pos += got
        return out


class HFReader:
    """The tensors of a HF folder (single file or shards with an index) or one file.

    Attributes:
        path: the folder or file.
        config: parsed `config.json`, or None where the folder has none.
        infos: tensor name -> `TensorInfo`, in file order (shards sorted, then
            data offset): the order HF writers use, so reading is sequential.
    """

    kind = "hf"

    def __init__(self, path: str):
        self.path = path
        self.config = None
        if os.path.isfile(path):
            files = [path]
            weight_map = None
        elif not os.path.isdir(path):
            raise ValueError(f"{path}: no such file or folder")
        elif os.path.isfile(os.path.join(path, INDEX_FILE)):
            index_path = os.path.join(path, INDEX_FILE)
            index = _read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path}: no 'weight_map' object")
            files = []
            for fname in sorted(set(weight_map.values())):
                full = os.path.join(path, fname)
                if not os.path.isfile(full):
                    tensor = next(n for n, f in weight_map.items() if f == fname)
                    raise ValueError(f"{full}: file not found (listed in {index_path} for "
                                     f"tensor {tensor!r} and others)")
                files.append(full)
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            files = [os.path.join(path, SINGLE_FILE)]
            weight_map = None
        else:
            raise ValueError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (not a HF model folder)")
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
            self.config = _read_json(os.path.join(path, "config.json"))
        self.files = [SafetensorsFile(f) for f in files]
        self.infos: dict[str, TensorInfo] = {}
        self._file_of: dict[str, SafetensorsFile] = {}
        for sf in self.files:
            for name, (info, _) in sorted(sf.entries.items(), key=lambda kv: kv[1][1]):
                if name in self.infos:
                    raise ValueError(f"{sf.path}: tensor {name!r} is also in "
                                     f"{self.infos[name].where}")
                self.infos[name] = info
                self._file_of[name] = sf
        if weight_map is not None:
            for name, fname in weight_map.items():
                full = os.path.join(path, fname)
                if name not in self.infos or self.infos[name].where != full:
                    raise ValueError(f"{os.path.join(path, INDEX_FILE)} places tensor {name!r} "
                                     f"in {fname}, which does not contain it")
        self._fds: dict[str, int] = {}

    def read(self, name: str, replica: int | None = None) -> np.ndarray:
        sf = self._file_of[name]
        if sf.path not in self._fds:
            self._fds[sf.path] = os.open(sf.path, os.O_RDONLY)
        return sf.read(name, self._fds[sf.path])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


# ---- orbax reading ------------------------------------------------------------------------

def _orbax_item_dir(path: str) -> str:
    """The folder holding `_METADATA`: `path` itself or its single item sub-folder."""
    if os.path.isfile(os.path.join(path, "_METADATA")):
        return path
    if os.path.isdir(path):
        subs = [d for d in sorted(os.listdir(path))
                if os.path.isfile(os.path.join(path, d, "_METADATA"))]
        if len(subs) == 1:
            return os.path.join(path, subs[0])
        if len(subs) > 1:
            raise ValueError(f"{path}: orbax checkpoint with several items {subs}; pass the "
                             "folder of the one to merge")
    raise ValueError(f"{path}: no orbax _METADATA (not an orbax checkpoint folder)")


def _canonical(keys: Sequence[str]) -> str:
    """Leaf name of a key path, as `psm.merge.leaf_name` names NNX variables."""
    keys = list(keys)
    if len(keys) > 1 and keys[-1] == "value":
        keys.pop()
    return "/".join(keys)


class OrbaxReader:
    """Leaves of an orbax PyTree checkpoint, read one at a time through tensorstore.

    With `stacked=True` every leaf (below `prefix`) carries a leading model axis
    of size K and `read(name, i)` returns model i's slice. tensorstore reads a
    slice by decoding only the chunks it touches. The psm trainer's checkpoints
    (orbax defaults) store each array as one chunk spanning all K replicas, so
    there a slice costs a decode of the whole stacked leaf; this reader then
    decodes the leaf once and hands out its K slices from a one-leaf cache (the
    merge needs all K slices of a leaf together anyway). Checkpoints chunked
    along the replica axis (e.g. saved sharded over replicas) are read one
    replica slice at a time.

    Args:
        path: the orbax checkpoint item folder (holding `_METADATA`) or its parent.
        prefix: keys of the subtree to read (e.g. `("params",)`).
        stacked: leaves carry a leading `[K]` model axis.
    """

    kind = "orbax"

    def __init__(self, path: str, prefix: Sequence[str] = (), *, stacked: bool = False):
        import orbax.checkpoint as ocp
        import tensorstore as ts
        self._ts = ts
        self.path = _orbax_item_dir(path)
        self.config = None
        self.hf_dir = None  # set for workdirs fine-tuned from a HF folder
        meta_json = _read_json(os.path.join(self.path, "_METADATA"))
        self._use_ocdbt = bool(meta_json.get("use_ocdbt", True))
        self._zarr = "zarr3" if meta_json.get("use_zarr3", False) else "zarr"
        try:
            meta = ocp.PyTreeCheckpointer().metadata(self.path)
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds
            raise ValueError(f"{self.path}: cannot read the orbax metadata ({e})") from None
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
        self.infos: dict[str, TensorInfo] = {}
        self.key_paths: dict[str, tuple] = {}
        self._param: dict[str, str] = {}
        self._chunk0: dict[str, int] = {}
        prefix = tuple(prefix)
        self.k = None
        for path_, leaf in pairs:
            keys = tuple(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))))
                         for p in path_)
            if keys[:len(prefix)] != prefix or not hasattr(leaf, "shape"):
                continue
            rel = keys[len(prefix):]
            name = _canonical(rel)
            shape = tuple(int(s) for s in leaf.shape)
            where = f"{self.path} leaf {'/'.join(keys)}"
            if stacked:
                if not shape:
                    raise ValueError(f"{where}: scalar leaf in a stacked checkpoint")
                if self.k is None:
                    self.k = shape[0]
                elif shape[0] != self.k:
                    raise ValueError(f"{where}: leading axis {shape[0]}, but other leaves "
                                     f"have K = {self.k} replicas")
                shape = shape[1:]
            self.infos[name] = TensorInfo(name, shape, np.dtype(leaf.dtype), where)
            self.key_paths[name] = rel
            self._param[name] = ".".join(keys)
            chunk = getattr(getattr(leaf, "storage", None), "chunk_shape", None)
            self._chunk0[name] = int(chunk[0]) if stacked and chunk else (self.k or 1)
        if not self.infos:
            raise ValueError(f"{self.path}: no array leaves under {'/'.join(prefix) or 'the root'}")
        self._stacked = stacked
        self._ctx = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 64 << 20}})
        self._cache: tuple[str, np.ndarray] | None = None

    def _open(self, name: str):
        param = self._param[name]
        if self._use_ocdbt:
            kv = {"driver": "ocdbt", "base": f"file://{self.path}/", "path": param + "/",
                  "cache_pool": "cache_pool#ocdbt"}
        else:
            kv = {"driver": "file", "path": os.path.join(self.path, param) + "/"}
        try:
            return self._ts.open({"driver": self._zarr, "kvstore": kv, "open": True},
                                 context=self._ctx).result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/OSError kinds
            raise ValueError(f"{self.infos[name].where}: cannot open its data ({e})") from None

    def read(self, name: str, replica: int | None = None) -> np.ndarray:
        if not self._stacked:
            return np.asarray(self._open(name).read().result())
        if self._chunk0[name] == 1:  # one chunk per replica: read just the slice
            return np.asarray(self._open(name)[replica].read().result())
        if self._cache is None or self._cache[0] != name:
            self._cache = (name, np.asarray(self._open(name).read().result()))
        return self._cache[1][replica]

    def close(self) -> None:
        self._cache = None


# ---- inputs ---------------------------------------------------------------------------

@dataclasses.dataclass
class ModelRef:
    """One input model: a reader and, for stacked checkpoints, the replica index."""

    reader: Any
    replica: int | None
    label: str
    layout: str  # "hf" (HF tensor names) or "tree" (orbax leaf names)
    llama: Any = None  # psm LlamaConfig where the tree is a psm Llama (workdirs)

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self.reader.infos

    def read(self, name: str) -> np.ndarray:
        return self.reader.read(name, self.replica)


def _latest_step_dir(folder: str) -> str | None:
    steps = [int(d) for d in os.listdir(folder) if d.isdigit()] if os.path.isdir(folder) else []
    return os.path.join(folder, str(max(steps))) if steps else None


def _workdir_llama(workdir: str, infos: dict):
    """(psm `LlamaConfig` of a training workdir's model or None, HF folder or None).

    The architecture comes from the workdir's `config.json`: its `model` sizes
    (runs of a model built here), or the pre-trained model it names (`kind`
    'hf' with a folder, 'smollm2' / 'gguf' with a GGUF file).
    """
    from psm.models.llama import LlamaConfig
    cfg = _read_json(os.path.join(workdir, "config.json"))
    model = cfg.get("model", {})
    layout = {k: model[k] for k in ("param_dtype", "scan_layers") if k in model}
    fields = {k: model[k] for k in ("hidden_size", "intermediate_size", "num_layers",
                                    "num_heads", "num_kv_heads", "rope_theta",
                                    "tie_embeddings", "dtype") if k in model}
    embed = infos.get("embed/embedding")
    if embed is None:
        return None, None
    if {"hidden_size", "num_layers", "num_heads"} <= set(fields):
        return LlamaConfig(vocab_size=int(embed.shape[0]),
                           max_seq_len=int(cfg.get("task", {}).get("max_len", 2048)),
                           **fields, **layout), None
    kind, path = model.get("kind"), model.get("path") or None
    if kind == "hf" and path and os.path.isfile(os.path.join(path, "config.json")):
        hf = _read_json(os.path.join(path, "config.json"))
        if "LlamaForCausalLM" not in (hf.get("architectures") or []):
            return None, None
        return LlamaConfig.from_hf_config(hf, **layout), path
    if kind in ("smollm2", "gguf"):
        from psm.models import gguf_llama, registry
        path = path or registry.smollm2_gguf_path()
        meta = gguf_llama.read_metadata(gguf_llama.open_reader(path))
        fields = gguf_llama.config_fields(meta, path, **layout)
        fields.setdefault("tie_embeddings", "lm_head/kernel" not in infos)
        return LlamaConfig(**fields), None
    return None, None


def is_workdir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "config.json"))
            and os.path.isdir(os.path.join(path, "checkpoints")))


def open_input(path: str) -> list[ModelRef]:
    """The models stored at `path`: one for a HF folder, file or orbax checkpoint,
    K for a psm training workdir (its latest checkpoint's stacked replicas).

    Raises:
        ValueError: `path` is missing or holds none of these (names the file).
    """
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or folder")
    if is_workdir(path):
        step = _latest_step_dir(os.path.join(path, "checkpoints"))
        if step is None:
            raise ValueError(f"{path}/checkpoints: no checkpoint step folder")
        reader = OrbaxReader(step, ("params",), stacked=True)
        llama, reader.hf_dir = _workdir_llama(path, reader.infos)
        return [ModelRef(reader, i, f"{path} replica {i}", "tree", llama)
                for i in range(reader.k)]
    if (path.endswith(".safetensors") or os.path.isfile(os.path.join(path, SINGLE_FILE))
            or os.path.isfile(os.path.join(path, INDEX_FILE))):
        return [ModelRef(HFReader(path), None, path, "hf")]
    if os.path.isfile(path):
        raise ValueError(f"{path}: not a .safetensors file; inputs are HF folders, "
                         ".safetensors files, orbax checkpoints or psm workdirs")
    if os.path.isfile(os.path.join(path, "config.json")):
        what = ("a psm workdir without checkpoints/ (its run failed before its first "
                "checkpoint)" if _is_psm_config(os.path.join(path, "config.json"))
                else f"a folder with config.json but no {SINGLE_FILE} or {INDEX_FILE}")
        raise ValueError(f"{path}: {what}; nothing to merge")
    return [ModelRef(OrbaxReader(path), None, path, "tree")]


def _is_psm_config(path: str) -> bool:
    """Whether `path` is a psm run's config.json (rather than a HF model's)."""
    try:
        cfg = _read_json(path)
    except ValueError:
        return False
    return isinstance(cfg, dict) and "num_replicas" in cfg and "task" in cfg


def workdir_base(path: str) -> ModelRef | None:
    """The pre-trained base a workdir cached (`base/<step>/`), or None."""
    step = _latest_step_dir(os.path.join(os.path.abspath(path), "base"))
    if step is None:
        return None
    return ModelRef(OrbaxReader(step), None, step, "tree")


class _HFAsLlamaTree:
    """A HF Llama folder read under psm Llama leaf names (`[in, out]` kernels).

    Lets a HF base (the model a workdir was fine-tuned from) serve as the base
    of psm-layout replicas.
    """

    kind = "hf-as-tree"

    def __init__(self, hf: HFReader, llama):
        from psm.models.hf_llama import hf_slots
        self.hf, self.path, self.config = hf, hf.path, hf.config
        canon = llama.replace(scan_layers=False)
        self._slots = {"/".join(map(str, p)): s for p, s in hf_slots(canon).items()}
        self._layers = llama.num_layers if llama.scan_layers else 0
        self.infos = {}
        names = self._stacked_names() if self._layers else self._slots
        for name in names:
            parts = self._parts(name)
            try:
                first = hf.infos[parts[0].name]
            except KeyError:
                raise ValueError(f"{hf.path}: no tensor {parts[0].name!r} (needed as "
                                 f"{name!r} of the psm Llama layout)") from None
            shape = first.shape[::-1] if parts[0].transpose else first.shape
            if self._layers and name.startswith("layers/"):
                shape = (self._layers,) + shape
            self.infos[name] = TensorInfo(name, shape, first.dtype, first.where)

    def _stacked_names(self):
        out = []
        for name in self._slots:
            m = re.fullmatch(r"layers/(\d+)/(.*)", name)
            if m is None:
                out.append(name)
            elif m.group(1) == "0":
                out.append("layers/" + m.group(2))
        return out

    def _parts(self, name):
        if self._layers and name.startswith("layers/"):
            rest = name[len("layers/"):]
            return [self._slots[f"layers/{i}/{rest}"] for i in range(self._layers)]
        return [self._slots[name]]

    def read(self, name: str, replica=None) -> np.ndarray:
        arrays = []
        for slot in self._parts(name):
            x = self.hf.read(slot.name)
            arrays.append(x.T if slot.transpose else x)
        out = aligned_empty(self.infos[name].shape, self.infos[name].dtype)
        if self._layers and name.startswith("layers/"):
            for i, x in enumerate(arrays):
                out[i] = x
        else:
            out[...] = arrays[0]
        return out

    def close(self) -> None:
        self.hf.close()


# ---- output layouts ------------------------------------------------------------------------

@dataclasses.dataclass
class OutTensor:
    """One tensor of the output: its name (or key path), shape and dtype."""

    name: str
    shape: tuple
    dtype: np.dtype
    key_path: tuple = ()


def _llama_to_hf(llama) -> Callable:
    """merged psm-Llama leaf name -> [(HF name, array -> HF array)]."""
    from psm.models.hf_llama import hf_slots
    slots = {"/".join(map(str, p)): s for p, s in
             hf_slots(llama.replace(scan_layers=False)).items()}

    def convert(name: str):
        if name in slots:
            slot = slots[name]
            return [(slot.name, (lambda x: x.T) if slot.transpose else (lambda x: x))]
        if llama.scan_layers and name.startswith("layers/"):
            rest = name[len("layers/"):]
            out = []
            for i in range(llama.num_layers):
                slot = slots[f"layers/{i}/{rest}"]
                out.append((slot.name, (lambda x, i=i, t=slot.transpose: x[i].T if t
                                        else x[i])))
            return out
        raise ValueError(f"leaf {name!r} is not a parameter of the psm Llama {llama}")

    return convert


# ---- writers ------------------------------------------------------------------------------

class SafetensorsWriter:
    """Writes planned tensors into shards, each shard's header first, data as it arrives.

    Data is flushed to disk every `SYNC_BYTES` and each shard is fsync'ed when
    closed, so the folder is durable before it is renamed into place.

    Args:
        folder: output folder (exists).
        tensors: `OutTensor`s in the order `write` will receive them.
        max_shard_bytes: a new shard starts before a tensor that would push the
            current one past this size.
    """

    SYNC_BYTES = 256 << 20

    def __init__(self, folder: str, tensors: Sequence[OutTensor], max_shard_bytes: int):
        shards: list[list[OutTensor]] = [[]]
        size = 0
        for t in tensors:
            nbytes = int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += nbytes
        self.folder = folder
        self.names = shard_file_names(len(shards))
        self._plan = [(fname, t) for fname, shard in zip(self.names, shards) for t in shard]
        self._headers = {fname: self._header(shard) for fname, shard in zip(self.names, shards)}
        self._pos = 0
        self._file = None
        self._fname = None
        self.bytes_written = 0
        self._unsynced = 0

    def _header(self, shard: list[OutTensor]) -> bytes:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for t in shard:
            n = int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
            header[t.name] = {"dtype": _NP_TO_ST[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)  # data starts 8-byte aligned, as safetensors pads
        return struct.pack("<Q", len(raw)) + raw

    def write(self, name: str, array: np.ndarray) -> None:
        fname, t = self._plan[self._pos]
        if name != t.name or tuple(array.shape) != t.shape or array.dtype != t.dtype:
            raise AssertionError(f"writer expected {t} next, got {name} {array.shape} "
                                 f"{array.dtype}")
        if fname != self._fname:
            self._close_file()
            self._fname = fname
            self._file = open(os.path.join(self.folder, fname), "wb")
            self._file.write(self._headers[fname])
        data = np.ascontiguousarray(array)
        self._file.write(memoryview(data.reshape(-1).view(np.uint8)))
        self.bytes_written += data.nbytes
        self._unsynced += data.nbytes
        if self._unsynced >= self.SYNC_BYTES:
            # Flush to disk as we go (this runs beside the merge), so the final fsync
            # before the rename has little left to wait for.
            self._file.flush()
            os.fdatasync(self._file.fileno())
            self._unsynced = 0
        self._pos += 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> list[str]:
        if self._pos != len(self._plan):
            raise AssertionError(f"{len(self._plan) - self._pos} tensors were never written")
        self._close_file()
        files = list(self.names)
        if len(self.names) > 1:
            weight_map = {t.name: fname for fname, t in self._plan}
            with open(os.path.join(self.folder, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": self.bytes_written},
                           "weight_map": weight_map}, f, indent=2, sort_keys=True)
            files.append(INDEX_FILE)
        return files


class OrbaxWriter:
    """Writes a plain orbax PyTree checkpoint one leaf at a time.

    orbax's own `save` gathers every leaf in host memory before writing (for
    asynchronous checkpointing), so leaves are written here with tensorstore in
    the layout orbax itself produces (an OCDBT key-value store of zarr arrays,
    zstd-compressed, named by the key path joined with "."), followed by the
    `_METADATA` tree file; `orbax.checkpoint.StandardCheckpointer().restore`
    reads the result. Chunks are cut along the first axis to at most 64 MiB.
    """

    CHUNK_BYTES = 64 << 20

    def __init__(self, folder: str, tensors: Sequence[OutTensor]):
        import tensorstore as ts
        self._ts = ts
        self.folder = folder
        self._tensors = list(tensors)
        self._ctx = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 64 << 20}})
        self._pos = 0
        self.bytes_written = 0
        params = [".".join(t.key_path) for t in tensors]
        if len(set(params)) != len(params):
            raise ValueError("two output leaves map to the same orbax parameter name")

    def write(self, name: str, array: np.ndarray) -> None:
        t = self._tensors[self._pos]
        if name != t.name:
            raise AssertionError(f"writer expected {t.name} next, got {name}")
        shape = tuple(array.shape)
        row = int(np.prod(shape[1:], dtype=np.int64)) * array.dtype.itemsize if shape else 1
        chunks = list(shape)
        if shape and row * shape[0] > self.CHUNK_BYTES:
            chunks[0] = max(1, self.CHUNK_BYTES // max(row, 1))
        dtype = "bfloat16" if array.dtype == ml_dtypes.bfloat16 else array.dtype.str
        spec = {"driver": "zarr",
                "kvstore": {"driver": "ocdbt", "base": f"file://{self.folder}/",
                            "path": ".".join(t.key_path) + "/",
                            "cache_pool": "cache_pool#ocdbt"},
                "metadata": {"shape": list(shape), "chunks": chunks or [], "dtype": dtype,
                             "compressor": {"id": "zstd", "level": 1}},
                "create": True}
        arr = self._ts.open(spec, context=self._ctx).result()
        arr.write(array).result()
        self.bytes_written += array.nbytes
        self._pos += 1

    def finish(self) -> list[str]:
        if self._pos != len(self._tensors):
            raise AssertionError(f"{len(self._tensors) - self._pos} leaves were never written")
        tree = {}
        for t in self._tensors:
            tree[str(tuple(t.key_path))] = {
                "key_metadata": [{"key": k, "key_type": 2} for k in t.key_path],
                "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
        with open(os.path.join(self.folder, "_METADATA"), "w") as f:
            json.dump({"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
                       "store_array_data_equal_to_fill_value": True,
                       "custom_metadata": None}, f)
        now = time.time_ns()
        with open(os.path.join(self.folder, "_CHECKPOINT_METADATA"), "w") as f:
            json.dump({"item_handlers": "orbax.checkpoint._src.handlers."
                       "standard_checkpoint_handler.StandardCheckpointHandler",
                       "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now,
                       "commit_timestamp_nsecs": now, "custom_metadata": {}}, f)
        return ["_METADATA", "_CHECKPOINT_METADATA"]


# ---- method options -------------------------------------------------------------------------

_METHOD_OPTIONS = {
    "average": {"weights", "allow_nonfinite"},
    "linear": {"weights", "allow_nonfinite"},
    "select": {"probs", "resample", "tolerance", "allow_nonfinite"},
    "task_arithmetic": {"scale", "weights", "allow_nonfinite"},
    "ties": {"density", "weights", "scale", "normalize", "trim", "allow_nonfinite"},
    "dare": {"drop_rate", "weights", "scale", "rescale", "combine", "normalize",
             "allow_nonfinite"},
    "dare_linear": {"drop_rate", "weights", "scale", "rescale", "normalize", "allow_nonfinite"},
    "dare_ties": {"drop_rate", "weights", "scale", "rescale", "normalize", "allow_nonfinite"},
}
_NEEDS_BASE = {"task_arithmetic", "ties", "dare", "dare_linear", "dare_ties"}
_KEYED = {"select", "dare", "dare_linear", "dare_ties"}


def method_kwargs(method: str, options: dict, seed: int) -> dict:
    """`psm.merge` keyword arguments (without `base`) for `method` and `options`.

    Raises:
        ValueError: unknown method, or an option the method does not take.
    """
    if method not in _METHOD_OPTIONS:
        raise ValueError(f"unknown merge method {method!r}; the streaming merge supports "
                         f"{sorted(_METHOD_OPTIONS)}")
    given = {k: v for k, v in options.items() if v is not None}
    extra = sorted(set(given) - _METHOD_OPTIONS[method])
    if extra:
        raise ValueError(f"method {method!r} does not take option(s) {extra}; it takes "
                         f"{sorted(_METHOD_OPTIONS[method])}")
    if given.get("trim", "tensor") != "tensor":
        raise ValueError("ties trim='model' ranks every tensor of a model together, which needs "
                         "the whole model at once; the streaming merge supports trim='tensor' "
                         "(mergekit's convention); use psm.merge.ties in memory for 'model'")
    if method == "ties" and "density" not in given:
        raise ValueError("method 'ties' needs a density (--density)")
    if method in ("dare", "dare_linear", "dare_ties") and "drop_rate" not in given:
        raise ValueError(f"method {method!r} needs a drop rate (--drop-rate)")
    kwargs = dict(given)
    if method in _KEYED:
        kwargs["key"] = jax.random.key(int(seed))
    return kwargs


def needs_base(method: str, kwargs: dict) -> bool:
    return method in _NEEDS_BASE or (method == "select" and kwargs.get("resample", 0) > 0)


# ---- checks --------------------------------------------------------------------------------

def _list(items, limit=8) -> str:
    items = list(items)
    return ", ".join(map(str, items[:limit])) + (f" ... ({len(items)} in all)"
                                                 if len(items) > limit else "")


def check_inputs(models: Sequence[ModelRef], base: ModelRef | None, dtype) -> None:
    """Refuses inputs that cannot be merged, naming the files and tensors.

    Checks tensor names, shapes, dtypes (unless `dtype` casts them all) and, for
    HF folders, the architecture keys of `config.json` (`ARCH_KEYS`).
    """
    refs = list(models) + ([base] if base is not None else [])
    ref0 = refs[0]
    names0 = set(ref0.infos)
    for ref in refs[1:]:
        what = "base" if ref is base else "model"
        names = set(ref.infos)
        if names != names0:
            missing, extra = sorted(names0 - names), sorted(names - names0)
            msg = f"tensor names differ between {ref0.label} and {what} {ref.label}:"
            if missing:
                msg += f" missing from the {what}: [{_list(missing)}];"
            if extra:
                msg += f" only in the {what}: [{_list(extra)}];"
            raise ValueError(msg.rstrip(";"))
    for ref in refs[1:]:
        what = "base" if ref is base else "model"
        bad = [n for n in ref0.infos if ref.infos[n].shape != ref0.infos[n].shape]
        if bad:
            diff = [f"{n} {ref.infos[n].shape} vs {ref0.infos[n].shape}" for n in bad]
            raise ValueError(f"tensor shapes differ between {what} {ref.label} and "
                             f"{ref0.label}: {_list(diff)} (first in {ref.infos[bad[0]].where})")
        if dtype is None:
            ddiff = [f"{n} {ref.infos[n].dtype} vs {ref0.infos[n].dtype}" for n in ref0.infos
                     if ref.infos[n].dtype != ref0.infos[n].dtype]
            if ddiff:
                raise ValueError(f"tensor dtypes differ between {what} {ref.label} and "
                                 f"{ref0.label}: {_list(ddiff)}; pass --dtype to cast every "
                                 "input to one dtype")
    hf = [r for r in refs if getattr(r.reader, "config", None) is not None]
    for ref in hf[1:]:
        c0, c = hf[0].reader.config, ref.reader.config
        diff = [f"{k}: {c.get(k)!r} vs {c0.get(k)!r}" for k in ARCH_KEYS if c.get(k) != c0.get(k)]
        if diff:
            raise ValueError(f"architectures differ: {ref.reader.path}/config.json vs "
                             f"{hf[0].reader.path}/config.json: {'; '.join(diff)}")


def _check_options(method: str, kwargs: dict, k: int, with_base: bool) -> None:
    """Runs the method on a 4-element dummy so bad options fail before any output."""
    dummy = {"option-check": np.zeros(4, np.float32)}
    base = {"option-check": np.zeros(4, np.float32)} if with_base else None
    M.merge(method, [dummy] * k, **({"base": base} if with_base else {}), **kwargs)


# ---- persistent compilation cache -------------------------------------------------------------

COMPILE_CACHE_ENV = "PSM_COMPILE_CACHE"
"""Environment variable naming the command's compilation cache folder ('' for none)."""

_CACHE_SETTINGS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
                   "jax_persistent_cache_min_compile_time_secs",
                   "jax_persistent_cache_min_entry_size_bytes")


def default_compile_cache() -> str:
    """The command's compilation cache folder: $PSM_COMPILE_CACHE if set (empty:
    none), else $XDG_CACHE_HOME/psm/jax (~/.cache/psm/jax)."""
    env = os.environ.get(COMPILE_CACHE_ENV)
    if env is not None:
        return env
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "psm", "jax")


@contextlib.contextmanager
def compile_cache(path: str | None):
    """JAX's persistent compilation cache in folder `path` while the block runs.

    A merge's kernels depend on the method, the dtypes and (for tensors below
    `psm.merge.host_staging.MIN_SIZE` scalars, merged whole) the tensor shapes, not on
    the data, so a rerun on checkpoints of the same architecture finds every
    executable on disk instead of compiling it (XLA compiles each in 0.05-0.5 s;
    JAX caches by default only those that took over a second). Every
    executable is cached here, however fast it compiled. `path` None or '':
    no persistent cache for the block. The previous settings are restored after.
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    if path:
        path = os.path.abspath(os.path.expanduser(path))
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"--compile-cache {path}: exists and is not a folder")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--compile-cache {path}: cannot create the folder ({e})") from e
        updates = dict(zip(_CACHE_SETTINGS, (path, True, 0.0, 0)))
    else:
        updates = {"jax_enable_compilation_cache": False}
    saved = {name: getattr(jax.config, name) for name in _CACHE_SETTINGS}
    try:
        for name, value in updates.items():
            jax.config.update(name, value)
        cc.reset_cache()  # the cache is opened once per setting: open this one
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        cc.reset_cache()


# ---- the engine --------------------------------------------------------------------------------

def parse_size(text) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB'."""
    if isinstance(text, (int, np.integer)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"shard size {text!r}: expected bytes or a size like '5GB'")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    value = int(float(m.group(1)) * base ** power)
    if value <= 0:
        raise ValueError(f"shard size {text!r} must be positive")
    return value


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _extra_files_source(models, base) -> str | None:
    for ref in ([base] if base is not None else []) + list(models):
        reader = ref.reader
        path = getattr(reader, "path", None)
        if getattr(reader, "config", None) is not None and os.path.isdir(path):
            return path
    return None


def merge_checkpoints(models: Sequence[str], out: str, *, method: str,
                      base: str | None = None, seed: int = 0, options: dict | None = None,
                      fmt: str = "safetensors", dtype: str | None = None,
                      shard_size="5GB", overwrite: bool = False, progress: bool = True,
                      log: Callable[[str], None] | None = None) -> dict:
    """Merges checkpoints on disk tensor by tensor and writes the result to `out`.

    Args:
        models: input paths (HF folders or files, orbax checkpoints, psm
            workdirs; a workdir contributes its K replicas).
        out: destination folder; refused if it exists unless `overwrite`.
        method: a `psm.merge` method name (`average`/`linear`, `select`,
            `task_arithmetic`, `ties`, `dare`, `dare_linear`, `dare_ties`).
        base: the pre-trained model; for a workdir whose run cached its base
            (`base/<step>/`) that one is used when the method needs a base and
            none is given.
        seed: `jax.random.key(seed)` is the key of `select` and `dare`.
        options: method options (`weights`, `probs`, `resample`, `tolerance`,
            `density`, `drop_rate`, `scale`, `rescale`, `combine`, `normalize`,
            `allow_nonfinite`), passed to `psm.merge`.
        fmt: "safetensors" (HF layout) or "orbax".
        dtype: cast every floating input tensor to this dtype when read
            ("float32", "bfloat16", "float16", "float64"); the output has it too.
        shard_size: largest safetensors shard (bytes or e.g. "5GB").
        overwrite: replace an existing `out`.
        progress: show a tqdm bar over bytes read.
        log: where the summary and notes go (default: print to stdout).

    Returns:
        The summary: tensors, bytes_read, bytes_written, seconds, gb_per_s,
        peak_rss_bytes, files, out.

    Raises:
        ValueError: bad inputs or options, before anything is written.
    """
    t0 = time.perf_counter()
    log = log or print
    if fmt not in ("safetensors", "orbax"):
        raise ValueError(f"format must be 'safetensors' or 'orbax'; got {fmt!r}")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}; got {dtype!r}")
    cast = DTYPE_NAMES[dtype] if dtype else None
    max_shard = parse_size(shard_size)
    if not models:
        raise ValueError("no input models; pass --models=dir1,dir2,...")
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    inputs = [os.path.abspath(p) for p in list(models) + ([base] if base else [])]
    if out in inputs:
        raise ValueError(f"--out {out} is also an input; write to a new folder")
    if not os.path.isdir(os.path.dirname(out)):
        raise ValueError(f"{os.path.dirname(out)}: the destination's parent folder does not exist")
    kwargs = method_kwargs(method, dict(options or {}), seed)

    refs: list[ModelRef] = []
    readers = []
    try:
        for path in models:
            got = open_input(path)
            readers.append(got[0].reader)
            refs.extend(got)
        base_ref = None
        if base:
            got = open_input(base)
            if len(got) != 1:
                raise ValueError(f"--base {base} holds {len(got)} models; the base is one model")
            base_ref = got[0]
            readers.append(base_ref.reader)
        elif needs_base(method, kwargs) and is_workdir(os.path.abspath(models[0])):
            base_ref = workdir_base(models[0])
            if base_ref is not None:
                readers.append(base_ref.reader)
                log(f"base: {base_ref.label} (cached by the training run)")
        if needs_base(method, kwargs) and base_ref is None:
            raise ValueError(f"method {method!r} with these options needs --base (the "
                             "pre-trained model)")
        files_ref = base_ref  # config / tokenizer files come from the base even if unused
        if not needs_base(method, kwargs):
            base_ref = None
        layout = refs[0].layout
        for ref in refs[1:]:
            if ref.layout != layout:
                raise ValueError(f"{ref.label} stores {ref.layout} tensor names but "
                                 f"{refs[0].label} stores {layout} names; merge models of one "
                                 "format")
        if base_ref is not None and base_ref.layout != layout:
            if base_ref.layout == "hf" and refs[0].llama is not None:
                base_ref = ModelRef(_HFAsLlamaTree(base_ref.reader, refs[0].llama), None,
                                    base_ref.label, "tree")
            else:
                raise ValueError(f"base {base_ref.label} stores {base_ref.layout} tensor names "
                                 f"but the models store {layout} names")
        check_inputs(refs, base_ref, cast)
        _check_options(method, kwargs, len(refs), base_ref is not None)
        plan, convert = _plan_output(refs, cast, fmt)
        return _run(refs, base_ref, files_ref, method, kwargs, cast, plan, convert, out, fmt,
                    max_shard, overwrite, progress, log, t0)
    finally:
        for reader in readers:
            reader.close()


def _plan_output(refs, cast, fmt):
    """(list of OutTensor, converter merged name -> [(out name, fn)])."""
    ref0 = refs[0]
    to_hf = fmt == "safetensors" and ref0.llama is not None
    convert = _llama_to_hf(ref0.llama) if to_hf else (lambda n: [(n, lambda x: x)])
    plan = []
    for name, info in ref0.infos.items():
        dt = cast if cast is not None and _is_float(info.dtype) else info.dtype
        for out_name, fn in convert(name):
            shape = jax.eval_shape(fn, jax.ShapeDtypeStruct(info.shape, np.float32)).shape
            key_path = ref0.reader.key_paths[name] if ref0.layout == "tree" else (name,)
            plan.append(OutTensor(out_name, tuple(shape), np.dtype(dt), tuple(key_path)))
    if fmt == "safetensors":
        for t in plan:
            if t.dtype not in _NP_TO_ST:
                raise ValueError(f"tensor {t.name!r} has dtype {t.dtype}, which safetensors "
                                 "cannot store")
    return plan, convert


def _read_inputs(refs, base_ref, name, cast):
    """Host arrays of tensor `name` for every model (and the base), cast if asked."""
    def get(ref):
        x = ref.read(name)
        if cast is not None and _is_float(x.dtype) and x.dtype != cast:
            y = aligned_empty(x.shape, cast)
            y[...] = x
            x = y
        return x
    xs = [get(r) for r in refs]
    return xs, (get(base_ref) if base_ref is not None else None)


def _merge_one(method, kwargs, name, xs, b):
    """psm.merge of the one-leaf flat dicts {name: x_i}; returns a host array.

    The numpy arrays go to psm.merge as they are: it reads large host operands in
    place, chunk by chunk, whatever their alignment (tensorstore's orbax reads
    need not be aligned; a whole-array `jax.device_put` would copy those), and
    64-bit ones stay 64-bit (psm.merge switches jax's x64 mode on itself)."""
    models = [{name: x} for x in xs]
    extra = {"base": {name: b}} if b is not None else {}
    out = M.merge(method, models, **extra, **kwargs)[name]
    return np.asarray(out)


def _run(refs, base_ref, files_ref, method, kwargs, cast, plan, convert, out, fmt, max_shard,
         overwrite, progress, log, t0):
    names = list(refs[0].infos)
    per_tensor_read = {n: sum(r.infos[n].nbytes for r in refs)
                       + (base_ref.infos[n].nbytes if base_ref is not None else 0)
                       for n in names}
    total_read = sum(per_tensor_read.values())
    atomic_out.clean_stale(out)
    tmp = atomic_out.new_tmp_path(out)
    os.makedirs(tmp)
    bar = None
    try:
        writer = (SafetensorsWriter(tmp, plan, max_shard) if fmt == "safetensors"
                  else OrbaxWriter(tmp, plan))
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total_read, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"merge ({method})", file=sys.stderr, mininterval=0.5)
        bytes_read = 0
        with concurrent.futures.ThreadPoolExecutor(1) as rpool, \
                concurrent.futures.ThreadPoolExecutor(1) as wpool:
            pending_read = rpool.submit(_read_inputs, refs, base_ref, names[0], cast)
            pending_write = None
            for j, name in enumerate(names):
                xs, b = pending_read.result()
                if j + 1 < len(names):  # read the next tensor while this one is merged
                    pending_read = rpool.submit(_read_inputs, refs, base_ref, names[j + 1],
                                                cast)
                try:
                    merged = _merge_one(method, kwargs, name, xs, b)
                except ValueError:
                    _nonfinite_input(refs, base_ref, name, xs, b, kwargs)
                    raise
                del xs, b
                if pending_write is not None:
                    pending_write.result()  # at most one output tensor waits for the disk
                pending_write = wpool.submit(_write_all, writer, convert(name), merged)
                del merged
                bytes_read += per_tensor_read[name]
                if bar is not None:
                    bar.set_postfix_str(f"tensor {j + 1}/{len(names)}", refresh=False)
                    bar.update(per_tensor_read[name])
            if pending_write is not None:
                pending_write.result()
        if bar is not None:
            bar.close()
            bar = None
        files = writer.finish()
        if fmt == "safetensors":
            files += _copy_extra_files(tmp, refs, base_ref or files_ref, cast)
        atomic_out.fsync_dir(tmp)
        atomic_out.publish(tmp, out, overwrite)
        tmp = None
    finally:
        if bar is not None:
            bar.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    summary = {"out": out, "files": files, "tensors": len(names), "bytes_read": bytes_read,
               "bytes_written": writer.bytes_written, "seconds": seconds,
               "gb_per_s": (bytes_read + writer.bytes_written) / seconds / 1e9,
               "peak_rss_bytes": _peak_rss_bytes()}
    log(format_summary(summary))
    return summary


def _nonfinite_input(refs, base_ref, name, xs, b, kwargs) -> None:
    """Raises the command-line form of psm.merge's NaN/inf refusal: the input
    (file) and tensor that hold it and the --allow-nonfinite option. Returns
    when every input is finite (the ValueError was another one)."""
    if kwargs.get("allow_nonfinite"):
        return
    inputs = list(zip(refs, xs)) + ([(base_ref, b)] if b is not None else [])
    for ref, x in inputs:
        if _is_float(x.dtype) and not np.isfinite(x).all():
            what = "--base " if ref is base_ref else ""
            raise ValueError(f"{what}{ref.label}: tensor {name!r} contains NaN or inf; pass "
                             "--allow-nonfinite to merge it anyway") from None


def _write_all(writer, conversions, merged) -> None:
    for out_name, fn in conversions:
        writer.write(out_name, np.ascontiguousarray(fn(merged)))


def _copy_extra_files(tmp, refs, base_ref, cast) -> list[str]:
    """config.json, generation_config.json and tokenizer files next to a HF output."""
    src = _extra_files_source(refs, base_ref)
    if isinstance(getattr(base_ref, "reader", None), _HFAsLlamaTree):
        src = base_ref.reader.path
    elif src is None and refs[0].llama is not None:
        src = getattr(refs[0].reader, "hf_dir", None)  # the HF model a workdir started from
    copied = []
    if src is not None:
        for fname in HF_EXTRA_FILES:
            path = os.path.join(src, fname)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(tmp, fname))
                copied.append(fname)
    llama = refs[0].llama
    if "config.json" not in copied and llama is not None:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(llama.to_hf_config(), f, indent=2, sort_keys=True)
        copied.append("config.json")
    if cast is not None and "config.json" in copied:
        path = os.path.join(tmp, "config.json")
        cfg = _read_json(path)
        name = {v: k for k, v in DTYPE_NAMES.items()}[cast]
        for key in ("torch_dtype", "dtype"):
            if key in cfg or key == "torch_dtype":
                cfg[key] = name
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    return copied


def format_summary(s: dict) -> str:
    """The closing summary line(s) of a run."""
    return (f"merged {s['tensors']} tensors -> {s['out']}\n"
            f"read {s['bytes_read'] / 1e9:.3f} GB, wrote {s['bytes_written'] / 1e9:.3f} GB "
            f"in {s['seconds']:.2f} s ({s['gb_per_s']:.2f} GB/s); "
            f"peak memory (max RSS) {s['peak_rss_bytes'] / 2**20:.0f} MiB")
