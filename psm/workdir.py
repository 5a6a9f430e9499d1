"""Checks and bookkeeping of a run's working directory.

A workdir belongs to one config: rerunning the same config resumes; a
different config is refused instead of silently mixing two runs' checkpoints.
"""

from __future__ import annotations

import json
import os


def config_to_dict(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def prepare(workdir: str, config) -> bool:
    """Creates `workdir`, checks it is writable and that it holds this config's run.

    Writes `config.json` on first use.

    Returns:
      True when the workdir already held a run of this config (a resume).
    Raises:
      PermissionError: the workdir cannot be written.
      ValueError: the workdir holds a run of a different config (lists the keys).
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"workdir {workdir!r} is not writable: {e}") from e
    wanted = config_to_dict(config)
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
        if existing != wanted:
            diff = sorted(_diff_keys(existing, wanted))
            raise ValueError(
                f"workdir {workdir!r} holds a run of a different config (differing keys: "
                f"{', '.join(diff[:20])}); use a new --workdir or the same config")
        return True
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(wanted, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return False


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def write_json(workdir: str, name: str, obj) -> str:
    """Atomically writes `obj` as JSON into the workdir. Returns the path."""
    path = os.path.join(workdir, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
    return path
