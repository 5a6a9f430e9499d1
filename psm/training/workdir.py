"""Checks and bookkeeping of a run's working directory.

A workdir belongs to one config: rerunning the same config resumes; a
different config is refused instead of silently mixing two runs' checkpoints.
A workdir that holds only a failed start (config.json, no checkpoint and no
results) has nothing to mix, so it is taken over by the new config with a
warning. A config that differs only in what happens after training
(`POST_TRAINING_KEYS`: the merge and the export) is also accepted: training
resumes or is already done, and the replicas are merged, evaluated and exported
again with the new values (the earlier results.json is removed first, so a
killed re-evaluation is never mistaken for a finished one). This is how a
trained run is re-merged, e.g. with `--config.merge.storage_dtype=bfloat16`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

log = logging.getLogger(__name__)

# Config keys (prefixes) the cached pre-trained base in <workdir>/base depends on.
_BASE_KEYS = ("seed", "model.", "pretrain.", "task.")

# Config sections that act only after the last training step: a run may change them.
POST_TRAINING_KEYS = ("merge.", "export.")


def training_keys(diff) -> list[str]:
    """The keys of `diff` (dotted config keys) that change training itself."""
    return sorted(k for k in diff if not k.startswith(POST_TRAINING_KEYS))


def config_to_dict(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def read_config(path: str) -> dict:
    """A run's config.json, in the current form (`upgrade_config`); invalid JSON is a
    ValueError naming the file and line."""
    with open(path) as f:
        try:
            return upgrade_config(json.load(f))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); a run's config.json "
                             "is written by psm.train, so this one is damaged") from None


# Speed options added after runs were already written, with the values those runs
# had; a config.json without them is read as having them. They compute the same
# model (on a GPU, attention 'auto' may now pick cuDNN: equal up to rounding). An
# older run was never packed: rerunning it under a config that now packs (the
# decoder paper tasks) is refused as a different config, naming train.packing.
_ADDED_SPEED_KEYS = (("model", "attention", "auto"), ("train", "loss_chunk", 0),
                     ("train", "packing", False), ("task", "pad_to_multiple", 0))


def upgrade_config(saved: dict) -> dict:
    """A config.json written by an older psm, in the current form, so that rerunning
    it resumes instead of being refused as a different config.

    `model.remat` was a bool (True / False = today's 'full' / 'none');
    `model.attention`, `train.loss_chunk`, `train.packing` and
    `task.pad_to_multiple` did not exist (read as 'auto', 0, False and 0). Other
    keys are left as they are.
    """
    out = json.loads(json.dumps(saved))  # a deep copy
    model = out.get("model")
    if isinstance(model, dict) and isinstance(model.get("remat"), bool):
        model["remat"] = "full" if model["remat"] else "none"
    for section, key, default in _ADDED_SPEED_KEYS:
        if isinstance(out.get(section), dict):
            out[section].setdefault(key, default)
    return out


def check_writable(workdir: str, what: str = "workdir") -> None:
    """Refuses a workdir (or another output folder, named `what` in the message)
    that cannot be created or written, without creating anything.

    Raises:
      PermissionError: naming the folder that refuses the write (the workdir
        itself, or the nearest existing folder above it).
    """
    path = os.path.abspath(workdir)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise PermissionError(f"{what} {workdir}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        problem = ("is not writable" if probe == path
                   else f"cannot be created: {probe} is not writable")
        raise PermissionError(f"{what} {workdir} {problem} (permission denied)")


def prepare(workdir: str, config, *, write: bool = True) -> bool:
    """Creates `workdir`, checks it is writable and that it holds this config's run.

    Writes `config.json` on first use. With `write=False` (the processes of a
    multi-process run other than process 0) nothing is created or written: the
    same checks are made on what is there, so every process refuses the same
    workdir.

    Returns:
      True when the workdir already held a run of this config (a resume), a
      trained run whose config differs in POST_TRAINING_KEYS only (resumed, then
      merged and evaluated with the new values), or a failed start of another
      config that is taken over (its partial records are then truncated by the
      caller like a resume from step 0).
    Raises:
      PermissionError: the workdir cannot be written.
      ValueError: the workdir holds a run of a different config (lists the keys).
    """
    wanted = config_to_dict(config)
    path = os.path.join(workdir, "config.json")
    if not write:
        if not os.path.exists(path):
            return False
        _compare(workdir, read_config(path), wanted)  # raises for another config's run
        return True
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"workdir {workdir} is not writable: "
                              f"{e.strerror or e} ({e.filename or workdir})") from e
    if not os.path.exists(path):
        _write_config(path, wanted)
        return False
    existing = read_config(path)
    verdict = _compare(workdir, existing, wanted)
    if verdict == "same":
        return True
    diff = sorted(diff_keys(existing, wanted))
    if verdict == "after_training":
        log.warning("workdir %s: the config differs only after training (%s); the trained "
                    "replicas are merged and evaluated again with the new values",
                    workdir, ", ".join(diff[:20]))
        results = os.path.join(workdir, "results.json")
        if os.path.exists(results):
            os.remove(results)
    else:
        log.warning("workdir %s holds only a failed start of a different config (no "
                    "checkpoint, no results; differing keys: %s); reusing it for this config",
                    workdir, ", ".join(diff[:20]))
        base = os.path.join(workdir, "base")
        if os.path.isdir(base) and any(k == p.rstrip(".") or k.startswith(p)
                                       for k in diff for p in _BASE_KEYS):
            # The cached base is a function of these keys: pre-train it again.
            log.warning("removing the cached base %s, made for the old config", base)
            shutil.rmtree(base)
    _write_config(path, wanted)
    return True


def _compare(workdir: str, existing: dict, wanted: dict) -> str:
    """How a workdir's config (`existing`) relates to the wanted one: 'same',
    'after_training' (a run with progress, differing in POST_TRAINING_KEYS only) or
    'failed_start' (differing, but nothing trained to mix).

    Raises:
      ValueError: a run with progress differs in keys that change training.
    """
    if existing == wanted:
        return "same"
    if not has_progress(workdir):
        return "failed_start"
    changed = training_keys(diff_keys(existing, wanted))
    if changed:
        raise ValueError(
            f"workdir {workdir!r} holds a run of a different config (differing keys: "
            f"{', '.join(changed[:20])}); use a new --workdir or the same config (only keys "
            f"under {', '.join(k.rstrip('.') for k in POST_TRAINING_KEYS)} may change on a "
            "trained run)")
    return "after_training"


def has_progress(workdir: str) -> bool:
    """True when the workdir holds a training checkpoint or a run's results."""
    if os.path.exists(os.path.join(workdir, "results.json")):
        return True
    ckpts = os.path.join(workdir, "checkpoints")
    # Orbax names a finished step's folder by the step number; temporary
    # folders of an interrupted save carry a suffix.
    return os.path.isdir(ckpts) and any(name.isdigit() for name in os.listdir(ckpts))


def _write_config(path: str, wanted: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(wanted, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def diff_keys(a, b, prefix=""):
    """Yields the dotted keys where two config dicts differ (a key missing on one side
    differs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
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
