"""Entry point: `python -m psm.train --config=configs/tiny.py --workdir=runs/tiny`.

Override any config field with `--config.<key>=<value>` (the config is locked:
a misspelt key is an error). Rerunning with the same workdir resumes.

A misspelt key or a bad value is reported in one line (with the nearest key
for a misspelling), exit status 2, before anything is written.
"""

import difflib
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from psm import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, e.g. configs/tiny.py (add :variant to pick one).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and "
                               "reports; rerunning on it resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def _unknown_key(argv) -> str | None:
    """'unknown config key a.b; did you mean a.c?' for the first `--config.a.b=`
    override that names no field of the config, or None."""
    spec = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    if spec is None:
        return None
    try:  # the config file alone, without the overrides that failed
        config = flags.FLAGS["config"].parser.parse(spec)
    except Exception:  # noqa: BLE001 - the caller reports the original error
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node, done, parts = config, [], key.split(".")
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                known = list(node.keys()) if hasattr(node, "keys") else []
                prefix = ".".join(done) + ("." if done else "")
                near = difflib.get_close_matches(part, known, n=1)
                if near and _has_path(node[near[0]], parts[i + 1:]):
                    near = [".".join([near[0]] + parts[i + 1:])]
                hint = (f"; did you mean {prefix}{near[0]}?" if near else
                        f"; keys under {prefix.rstrip('.') or 'the config'}: {sorted(known)}"
                        if known else f"; {prefix.rstrip('.')} has no sub-keys")
                return f"unknown config key {key}{hint}"
            node = node[part]
            done.append(part)
    return None


def _has_path(node, parts) -> bool:
    for part in parts:
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def _parse_flags(argv):
    """absl's flag parsing, with a misspelt `--config.` key reported in one line.

    ml_collections raises an AttributeError/KeyError from deep inside absl for
    such a key (three chained tracebacks); it is a usage error: exit status 2.
    """
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):
        message = _unknown_key(argv)
        if message is None:  # not a misspelt key: keep the full report
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        # Before anything is imported, written or computed: a rerun with the
        # corrected value then starts clean.
        trainer.validate_config(_CONFIG.value)
    except ValueError as e:
        print(f"error: invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    # Library chatter (orbax logs every save at INFO) stays at WARNING; psm's own
    # progress messages are shown. `--verbosity=0` restores absl's INFO for all.
    if absl_logging.get_verbosity() < absl_logging.INFO or not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("psm").setLevel(logging.INFO)
    import jax
    logging.getLogger("psm").info("JAX devices: %s", jax.devices())
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
