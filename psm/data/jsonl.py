"""Strict readers for JSON Lines and JSON files.

Every problem is reported with the file and the 1-based line (and column where
JSON gives one), so a broken record in a 50k-line file can be found with an
editor. Records are returned in file order; blank lines in JSONL are skipped
and do not count as records, so a record's 0-based index (its stable id in the
builders) is its position among the non-blank lines.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

PathLike = str | os.PathLike


class DataFormatError(ValueError):
    """A data file is not in the expected format (bad JSON, wrong type, missing key)."""


def _check_record(obj: Any, where: str, required_keys: Sequence[str]) -> dict:
    if not isinstance(obj, dict):
        raise DataFormatError(
            f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in required_keys if k not in obj]
    if missing:
        raise DataFormatError(
            f"{where}: missing key(s) {missing}; the record has keys {sorted(obj)}")
    return obj


def _open_binary(path: PathLike):
    """Opens `path` for binary reading; gzip is detected by its magic bytes.

    (Sniffing rather than trusting a `.gz` suffix matters for files kept under
    hashed names, as the TFDS download manager does.)
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def iter_jsonl(path: PathLike, required_keys: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """Yields `(line_number, record)` for each non-blank line of a JSONL file.

    Args:
      path: a JSONL file, plain or gzip-compressed (detected from its bytes).
      required_keys: keys every record must have.

    Raises:
      DataFormatError: naming `path:line` for invalid JSON, invalid UTF-8, a
        line that is not an object, or a missing key.
    """
    name = os.fspath(path)
    # Lines are read as bytes and decoded one at a time, so that a bad byte is
    # reported on its own line (a text stream decodes ahead in blocks).
    with _open_binary(path) as f:
        line_no = 0
        while True:
            try:
                raw = f.readline()
            except (OSError, EOFError) as e:  # truncated or corrupt gzip stream
                raise DataFormatError(f"{name}:{line_no + 1}: cannot read file ({e})") from e
            if not raw:
                return
            line_no += 1
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            where = f"{name}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{where}: not valid UTF-8 ({e.reason} at byte "
                                      f"{e.start})") from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(
                    f"{where}:{e.colno}: invalid JSON ({e.msg}); each line must hold one "
                    "JSON object") from e
            yield line_no, _check_record(obj, where, required_keys)


def read_jsonl(path: PathLike, required_keys: Sequence[str] = ()) -> list[dict]:
    """Reads a JSONL file into a list of records (see `iter_jsonl`)."""
    return [rec for _, rec in iter_jsonl(path, required_keys)]


def read_json(path: PathLike) -> Any:
    """Reads one JSON document; errors name `path:line:column`."""
    try:
        with _open_binary(path) as f:
            text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{os.fspath(path)}: not valid UTF-8 ({e.reason} at byte "
                              f"{e.start})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(
            f"{os.fspath(path)}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from e


def read_json_records(path: PathLike, required_keys: Sequence[str] = ()) -> list[dict]:
    """Reads a JSON file holding a list of objects (e.g. `alpaca_data.json`).

    Errors for a bad record name the file and the record's 0-based index.
    """
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(
            f"{os.fspath(path)}: expected a JSON list of objects, got {type(data).__name__}")
    return [_check_record(obj, f"{os.fspath(path)}: record {i}", required_keys)
            for i, obj in enumerate(data)]


def read_json_object(path: PathLike, required_keys: Sequence[str] = ()) -> dict:
    """Reads a JSON file holding one object (e.g. a MATH problem file)."""
    return _check_record(read_json(path), os.fspath(path), required_keys)
