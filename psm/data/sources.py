"""The one entry point for task data: `load(task, split)` -> records with stable ids.

Each task is a TFDS builder (see `psm.data.builders`) written as array_record
files into a cache (`data_dir`, else `$PSM_CACHE_DIR`, else `~/.cache/psm/tfds`)
on first use and read back with `as_data_source()`; no TensorFlow is involved.

Raw files come from a local folder with the layout `<root>/<dataset>/...`
(`<root>/gsm8k/train.jsonl`, `<root>/math/train/algebra/0.json`,
`<root>/humaneval/HumanEval.jsonl.gz`, `<root>/alpaca/alpaca_data.json`,
`<root>/glue/glue_data/SST-2/train.tsv`, ...), where `<root>` is the
`manual_dir` argument or else the `PSM_DATA_DIR` environment variable. When a
root is given it is the only source: a missing folder or file is an error
that names what to put where. With no root, the builders download from the
original public URLs (when the network answers within a few seconds).

A cache built from a local folder is keyed by that folder's files: the
builder's cache folder holds `psm_source.json` with the folder's real path and
a digest of every file's relative path, size and modification time. When the
data folder or any file in it differs (another `$PSM_DATA_DIR`, an edited or
replaced `train.jsonl`), the cache is rebuilt from the given files with a
warning, instead of serving records of other files. With no local folder (a
download), an existing cache is reused as is. A split with no records is an
error naming the file (or folder) it is read from (`builders.base.nonempty`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from psm.data.builders import alpaca, glue, gsm8k, hendrycks_math, humaneval
from psm.data.builders.base import MissingDataError, SourceBuilder

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "psm", "tfds")
DATA_DIR_ENV = "PSM_DATA_DIR"
CACHE_DIR_ENV = "PSM_CACHE_DIR"  # the TFDS cache folder, when no data_dir is passed
SOURCE_FILE = "psm_source.json"  # in a builder's cache folder: what it was built from


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How a task name maps onto a builder.

    Attributes:
      builder: the builder class.
      config: the builder config name; None for builders without configs, or
        "auto" for Alpaca (full file when present, else the 1k sample).
      dataset: the dataset folder in the shared layout (`<root>/<dataset>/`).
      splits: the split names.
    """

    builder: type[SourceBuilder]
    config: str | None
    dataset: str
    splits: tuple[str, ...]


_GLUE_SPLITS = ("train", "validation", "test")
KNOWN_TASKS: Mapping[str, TaskSpec] = {
    "gsm8k": TaskSpec(gsm8k.Gsm8k, None, "gsm8k", ("train", "test")),
    "math": TaskSpec(hendrycks_math.HendrycksMath, None, "math", ("train", "test")),
    "humaneval": TaskSpec(humaneval.HumanEval, None, "humaneval", ("test",)),
    "alpaca": TaskSpec(alpaca.Alpaca, "auto", "alpaca", ("train",)),
    "alpaca_full": TaskSpec(alpaca.Alpaca, "full", "alpaca", ("train",)),
    "alpaca_1k": TaskSpec(alpaca.Alpaca, "sample_1k", "alpaca", ("train",)),
    **{name: TaskSpec(glue.Glue, name, "glue", _GLUE_SPLITS) for name in glue.CONFIGS},
}


def task_spec(task: str) -> TaskSpec:
    """The `TaskSpec` of `task`; ValueError listing the known names otherwise."""
    if task not in KNOWN_TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(KNOWN_TASKS))}")
    return KNOWN_TASKS[task]


def _manual_root(manual_dir) -> tuple[epath.Path | None, str]:
    if manual_dir is not None:
        return epath.Path(os.path.expanduser(os.fspath(manual_dir))), "manual_dir"
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        return epath.Path(os.path.expanduser(env)), f"${DATA_DIR_ENV}"
    return None, ""


def _alpaca_config(folder: epath.Path | None) -> str:
    if folder is None:
        return alpaca.FULL.name
    if (folder / alpaca.FULL.file_name).exists():
        return alpaca.FULL.name
    if (folder / alpaca.SAMPLE_1K.file_name).exists():
        logging.warning("alpaca: %s not in %s; using the 1,000-record sample %s",
                        alpaca.FULL.file_name, folder, alpaca.SAMPLE_1K.file_name)
        return alpaca.SAMPLE_1K.name
    raise MissingDataError(
        f"{folder} holds neither {alpaca.FULL.file_name} (the full 52k set) nor "
        f"{alpaca.SAMPLE_1K.file_name} (the 1k sample); put one of them there")


def cache_dir(data_dir=None) -> str:
    """The TFDS cache folder: `data_dir`, else `$PSM_CACHE_DIR`, else ~/.cache/psm/tfds."""
    chosen = data_dir or os.environ.get(CACHE_DIR_ENV, "").strip() or DEFAULT_DATA_DIR
    return os.path.expanduser(os.fspath(chosen))


def source_identity(folder) -> dict:
    """What a cache built from the local folder `folder` depends on.

    Returns:
      {"folder": real path, "files": number of files, "digest": sha256 over the
      sorted (relative path, size, mtime in ns) of every file below it}.
    """
    root = os.path.realpath(os.fspath(folder))
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            entries.append(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}")
    entries.sort()
    digest = hashlib.sha256("\n".join(entries).encode("utf-8", "surrogateescape")).hexdigest()
    return {"folder": root, "files": len(entries), "digest": digest}


def _built_from(b: SourceBuilder) -> dict | None:
    try:
        with open(os.path.join(os.fspath(b.data_dir), SOURCE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def builder(task: str, *, data_dir=None, manual_dir=None) -> SourceBuilder:
    """Returns the prepared TFDS builder of `task` (building the cache if needed).

    Args:
      task: one of `KNOWN_TASKS`.
      data_dir: the TFDS cache folder; default `$PSM_CACHE_DIR` or
        `~/.cache/psm/tfds`.
      manual_dir: the root of the local data layout; default `$PSM_DATA_DIR`.
        A cache built from other files than this folder's is rebuilt.

    Raises:
      ValueError: for an unknown task.
      MissingDataError: when the local folder is missing or incomplete, or when
        there is none and nothing can be downloaded.
    """
    spec = task_spec(task)
    root, origin = _manual_root(manual_dir)
    folder = None
    if root is not None:
        if not root.is_dir():
            raise MissingDataError(
                f"data folder {root} (from {origin}) does not exist; it should hold "
                f"<dataset>/ folders such as {root / spec.dataset}/")
        folder = root / spec.dataset
        if not folder.is_dir():
            raise MissingDataError(
                f"{folder} does not exist: task {task!r} reads its files from there "
                f"(data folder {root} from {origin}).\n"
                + spec.builder.MANUAL_DOWNLOAD_INSTRUCTIONS)
    config = spec.config
    if config == "auto":
        config = _alpaca_config(folder)
    data_dir = cache_dir(data_dir)
    kwargs = {"config": config} if config else {}
    # Two processes (parallel tests, two runs started together) must not build, check or
    # rebuild one cache at the same time: TFDS renames its finished build onto the cache
    # folder, and the source record is written after it.
    with cache_lock(data_dir, spec.dataset):
        return _prepared(spec, task, data_dir, kwargs, folder)


@contextlib.contextmanager
def cache_lock(data_dir: str, dataset: str):
    """An exclusive lock on `<data_dir>/.<dataset>.lock` while the block runs (fcntl.flock:
    released when the holder exits, even if it is killed)."""
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{dataset}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepared(spec: TaskSpec, task: str, data_dir: str, kwargs: dict, folder) -> SourceBuilder:
    """`builder`'s work under the cache lock: the cache of `task`, checked against the
    source files in `folder` and (re)built when needed."""
    b = spec.builder(data_dir=data_dir, file_format="array_record", **kwargs)
    identity = source_identity(folder) if folder is not None else None
    if b.is_prepared() and identity is not None:
        built = _built_from(b)
        if built != identity:
            was = ("an unrecorded source" if built is None else
                   f"{built.get('folder')}" if built.get("folder") != identity["folder"] else
                   f"earlier versions of its {built.get('files')} files")
            logging.warning("%s: the cache %s was built from %s, not from the files now in "
                            "%s; rebuilding it", task, b.data_dir, was, folder)
            shutil.rmtree(os.fspath(b.data_dir))
            b = spec.builder(data_dir=data_dir, file_format="array_record", **kwargs)
    if not b.is_prepared():
        # Per-example progress bars flood logs of non-interactive runs (global TFDS switch).
        tfds.disable_progress_bar()
        try:
            b.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(folder) if folder is not None else None))
        except AssertionError as e:  # TFDS's way of refusing an empty split (a builder
            # that does not check its files itself; `base.nonempty` names the file)
            if "No examples were yielded" not in str(e):
                raise
            where = f"the files in {folder}" if folder is not None else "the download"
            raise ValueError(f"{task}: {e} ({where} hold no records for that split)") from None
        if identity is not None:
            if source_identity(folder) != identity:
                # Written to while being read: the cache may mix two versions.
                shutil.rmtree(os.fspath(b.data_dir))
                raise RuntimeError(f"{folder} changed while the {task} cache was being built "
                                   "from it; run again once it is complete")
            tmp = os.path.join(os.fspath(b.data_dir), SOURCE_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(identity, f)
            os.replace(tmp, os.path.join(os.fspath(b.data_dir), SOURCE_FILE))
    return b


def _plain(value):
    """TFDS numpy values -> plain Python (bytes -> str, numpy scalars -> int/float)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


def load(task: str, split: str, *, data_dir=None, manual_dir=None) -> list[dict]:
    """Loads one split of a task as a list of records in source order.

    Every record is a dict of plain Python values with an integer `id`, equal
    to its index in the list and stable across runs and rebuilds (see each
    builder's docstring for how it follows from the source files).

    Args:
      task: one of `KNOWN_TASKS` (gsm8k, math, humaneval, alpaca, alpaca_full,
        alpaca_1k, cola, sst2, mrpc, rte, stsb, wnli).
      split: a split of that task (e.g. "train", "test", "validation").
      data_dir: the TFDS cache folder; default `$PSM_CACHE_DIR` or
        `~/.cache/psm/tfds`.
      manual_dir: the root of the local data layout; default `$PSM_DATA_DIR`.

    Raises:
      ValueError: for an unknown task, a split the task does not have, or a
        split with no records.
      MissingDataError: when the data cannot be found (the message says which
        files to place where).
    """
    spec = task_spec(task)
    if split not in spec.splits:
        raise ValueError(f"task {task!r} has no split {split!r}; its splits are {spec.splits}")
    b = builder(task, data_dir=data_dir, manual_dir=manual_dir)
    source = b.as_data_source(split=split)
    if len(source) == 0:
        root, origin = _manual_root(manual_dir)
        where = f"the files in {root / spec.dataset} (from {origin})" if root else "the download"
        raise ValueError(f"{task}/{split} has no records: {where} hold none for this split")
    records = []
    chunk = 8192  # batched reads are ~5x faster than one __getitem__ per record
    for start in range(0, len(source), chunk):
        keys = list(range(start, min(start + chunk, len(source))))
        records.extend({k: _plain(v) for k, v in r.items()} for r in source.__getitems__(keys))
    for i, r in enumerate(records):
        if r["id"] != i:  # the builders write in id order; a mismatch is a corrupt cache
            raise ValueError(f"{task}/{split}: record {i} has id {r['id']}; delete the cache "
                             f"{b.data_dir} and rebuild")
    return records
