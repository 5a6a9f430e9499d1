"""Output folders written atomically: a temporary folder beside the destination,
renamed onto it when complete.

A killed writer leaves only a `.<name>.tmp-<pid>-<hex>` entry, which the next
writer to the same destination removes once that process is gone; readers
never see a half-written folder, nor a new folder mixed with an old one's files.
Used by `psm.merge` (streaming merge) and `psm.models.convert`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid


def tmp_prefix(out: str) -> str:
    """`<parent>/.<name>.tmp-`: temporary entries of `out` start with this."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-")


def new_tmp_path(out: str) -> str:
    """A fresh temporary path beside `out` that names this process."""
    return f"{tmp_prefix(out)}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove(path: str) -> None:
    """Removes a file, link or folder; missing is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def clean_stale(out: str) -> None:
    """Removes temporary entries of `out` left by processes that no longer exist
    (folders, or a replaced destination that was a file)."""
    prefix = tmp_prefix(out)
    parent, base = os.path.dirname(prefix), os.path.basename(prefix)
    if not os.path.isdir(parent):
        return
    for d in os.listdir(parent):
        m = re.fullmatch(re.escape(base) + r"(\d+)-[0-9a-f]+", d)
        if m is None:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            remove(os.path.join(parent, d))


def check_destination(out: str, overwrite: bool, *, allow_empty_dir: bool = False) -> None:
    """ValueError when `out` exists (a non-empty folder if allow_empty_dir) and
    `overwrite` is not set. Call it before any work."""
    if not os.path.lexists(out) or overwrite:
        return
    if allow_empty_dir and os.path.isdir(out) and not os.listdir(out):
        return
    what = "folder" if os.path.isdir(out) else "file"
    raise ValueError(f"{out} exists (a {what}{' that is not empty' if what == 'folder' else ''}"
                     "); pass --overwrite to replace it")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str, out: str, overwrite: bool, *, allow_empty_dir: bool = False) -> None:
    """Moves the finished temporary folder `tmp` to `out` (renames, same filesystem).

    An existing `out` (file or folder) is replaced when `overwrite` (or when it
    is an empty folder and allow_empty_dir), else refused.
    """
    if os.path.lexists(out):
        check_destination(out, overwrite, allow_empty_dir=allow_empty_dir)
        # Named like a temporary entry: if the run dies between the two renames, the
        # next run removes it as stale (the destination was being replaced anyway).
        old = new_tmp_path(out)
        os.rename(out, old)
        os.rename(tmp, out)
        remove(old)  # a file as well as a folder: nothing stays behind
    else:
        os.rename(tmp, out)
