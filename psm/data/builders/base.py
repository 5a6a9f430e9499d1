"""Shared pieces of the dataset builders: where the source files come from.

Every builder takes its raw files from one of two places, in this order:

1. a local folder (TFDS `manual_dir`), laid out as the dataset's folder in the
   shared data layout (e.g. `<root>/gsm8k/train.jsonl`, where the builder's
   `manual_dir` is `<root>/gsm8k`). When a manual folder is given it is the
   only source: an incomplete folder is an error, never a silent download.
2. the original public URL, through the TFDS download manager, but only after
   a TCP connection to the host succeeded within `NETWORK_TIMEOUT_S` seconds
   (the TFDS downloader sets no timeout and would hang on a dropped network).
   Setting `PSM_OFFLINE=1` skips the network entirely.

When neither works, `MissingDataError` says which files to put where.
"""

from __future__ import annotations

import inspect
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping

import tensorflow_datasets as tfds
from etils import epath

from psm.data import jsonl

NETWORK_TIMEOUT_S = 3.0


class SourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders here: TFDS builder that works without TensorFlow.

    Subclasses pass `skip_registration=True` too, so that their names never
    clash with the TFDS catalogue (which has its own `gsm8k` and `glue`).
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 computes this through `importlib_resources`, the
        # Python < 3.9 backport that it only declares for Python < 3.9, so
        # `download_and_prepare` fails with ModuleNotFoundError for any builder
        # defined in a package. The class's own file is what it looks for.
        return epath.Path(inspect.getfile(cls))


class MissingDataError(FileNotFoundError):
    """The raw files of a dataset are neither in the manual folder nor downloadable."""


def offline() -> bool:
    """True when `PSM_OFFLINE` is set to a true value (1, true, yes)."""
    return os.environ.get("PSM_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def network_available(url: str, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the host of `url` opens within `timeout` seconds."""
    if offline():
        return False
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def configured_manual_dir(dl_manager: tfds.download.DownloadManager) -> epath.Path | None:
    """The manual folder the download manager was given (it may not exist)."""
    # TFDS only exposes `manual_dir` through a property that raises when the
    # folder is absent or empty; the message must still name the folder.
    path = getattr(dl_manager, "_manual_dir", None)
    return epath.Path(path) if path else None


def existing_manual_dir(dl_manager: tfds.download.DownloadManager) -> epath.Path | None:
    """The manual folder when it exists and is non-empty, else None."""
    try:
        return dl_manager.manual_dir
    except AssertionError:
        return None


def instructions(dataset: str, files: Mapping[str, str], urls: Mapping[str, str]) -> str:
    """Text telling a user which files to place where (used in errors and TFDS)."""
    lines = [f"Place these files in the manual folder of '{dataset}' "
             f"(with the shared layout: $PSM_DATA_DIR/{dataset}/):"]
    lines += [f"  {rel}" for rel in sorted(set(files.values()))]
    if urls:
        lines.append("They come from:")
        lines += [f"  {u}" for u in sorted(set(urls.values()))]
    return "\n".join(lines)


def locate_files(
    dl_manager: tfds.download.DownloadManager,
    *,
    dataset: str,
    files: Mapping[str, str],
    urls: Mapping[str, str],
    download: Callable[[tfds.download.DownloadManager], Mapping[str, epath.Path]] | None,
) -> dict[str, epath.Path]:
    """Returns `{key: path}` for the raw files of a dataset.

    Args:
      dl_manager: the TFDS download manager passed to `_split_generators`.
      dataset: the dataset folder name in the shared layout (for messages).
      files: `{key: path relative to the manual folder}`.
      urls: the public source URLs (for messages and the network probe).
      download: fetches the files and returns `{key: path}`; None when the data
        has no public download (then only the manual folder works).

    Raises:
      MissingDataError: when the manual folder lacks files, or when there is no
        manual folder and no network.
    """
    manual = existing_manual_dir(dl_manager)
    if manual is not None:
        missing = [rel for rel in files.values() if not (manual / rel).exists()]
        if missing:
            raise MissingDataError(
                f"manual folder {manual} lacks {sorted(missing)}.\n"
                + instructions(dataset, files, urls))
        return {k: manual / rel for k, rel in files.items()}
    given = configured_manual_dir(dl_manager)
    if download is not None and urls:
        probe = next(iter(urls.values()))
        if network_available(probe):
            return dict(download(dl_manager))
        reason = ("PSM_OFFLINE is set" if offline() else
                  f"{urllib.parse.urlsplit(probe).hostname} is not reachable")
    else:
        reason = "this data has no public download"
    raise MissingDataError(
        f"no local copy of '{dataset}' (manual folder {given} does not exist or is empty; pass "
        f"manual_dir= or set $PSM_DATA_DIR) and no download ({reason}).\n"
        + instructions(dataset, files, urls))


def nonempty(examples: Iterable, source, split: str) -> Iterator:
    """Yields `examples` (a split generator's `(key, example)` pairs); raises
    `DataFormatError` naming `source` (the split's file or folder) when they are none.

    TFDS refuses an empty split only after generation, with "No examples were
    yielded" and no file named; this check names the file the split was read from.
    """
    count = 0
    for item in examples:
        count += 1
        yield item
    if not count:
        kind = "folder" if os.path.isdir(os.fspath(source)) else "file"
        raise jsonl.DataFormatError(
            f"{os.fspath(source)}: no records in this {kind}; the {split!r} split is read "
            "from it and needs at least one")


def text_info(builder: tfds.core.GeneratorBasedBuilder, features: dict, *, description: str,
              homepage: str, citation: str) -> tfds.core.DatasetInfo:
    """A `DatasetInfo` that keeps the generation order (record i has `id` i).

    `disable_shuffling=True` makes the array_record files hold the examples
    in the order `_generate_examples` yields them, so random access by index
    matches the stable `id`.
    """
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=tfds.features.FeaturesDict(features),
        homepage=homepage,
        citation=citation,
        disable_shuffling=True,
    )
