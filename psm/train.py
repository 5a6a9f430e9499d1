"""Entry point: `python -m psm.train --config=configs/tiny.py --workdir=runs/tiny`.

Override any config field with `--config.<key>=<value>` (the config is locked:
a misspelt key is an error). Rerunning with the same workdir resumes.

A misspelt key, a bad value, a missing config file or an unwritable workdir is
reported in one line (with the nearest key for a misspelling), exit status 2,
before anything is written (`psm.cli`; `--verbose` adds the traceback).

Several processes (one per host, or several on one host) run one job on one
mesh: start each with the same command plus

  --coordinator=host:port --num_processes=N --process_id=i

(host:port: where process 0 listens). Without these flags, an environment that
`jax.distributed.initialize()` recognises (JAX_COORDINATOR_ADDRESS set, a
multi-host Cloud TPU slice, Slurm, ...) starts one process per host with no
flags; anywhere else the run is a single process. Only process 0 writes the
workdir's files; every process writes its part of the checkpoints.
"""

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from psm import cli
from psm.training import workdir

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, e.g. configs/tiny.py (add :variant to pick one).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and "
                               "reports; rerunning on it resumes.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "Several processes: host:port of process 0's coordinator (give "
    "--num_processes and --process_id too).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Several processes: how many take part.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Several processes: this one's id, in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    workdir.check_writable(_WORKDIR.value)  # creates nothing
    # Imported here, not at the top: a refused flag or workdir is then reported
    # before JAX and the model code are imported (seconds).
    from psm.training import distributed
    try:
        distributed.check_flags(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:
        raise cli.UserError(str(e)) from e
    # Before any JAX computation (the config checks below already list devices).
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from psm.training import trainer
    try:
        # Every process stops, naming the keys, when another was given a different config.
        distributed.check_same_config(workdir.config_to_dict(_CONFIG.value))
    except ValueError as e:
        raise cli.UserError(str(e)) from e
    try:
        # Before anything is written or computed: a rerun with the corrected value
        # then starts clean.
        trainer.validate_config(_CONFIG.value)
    except ValueError as e:
        raise cli.UserError(f"invalid config: {e}") from e
    # Library chatter (orbax logs every save at INFO) stays at WARNING; psm's own
    # progress messages are shown. `--verbosity=0` restores absl's INFO for all.
    if absl_logging.get_verbosity() < absl_logging.INFO or not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("psm").setLevel(logging.INFO)
    import jax
    logging.getLogger("psm").info("process %d of %d; JAX devices: %s", jax.process_index(),
                                  jax.process_count(), jax.devices())
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def _keys_help() -> str:
    """The config keys and their defaults (configs/common.py), for `--help`."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        from configs import common
        keys = cli.config_keys_help(common.base(), indent="  --config.")
    except Exception as e:  # noqa: BLE001 - help must print even without the configs folder
        return f"(config keys: see configs/common.py; not readable here: {e})"
    finally:
        sys.path.pop(0)
    return ("Config keys and their defaults (configs/common.py; a config file such as "
            "configs/tiny.py overrides some):\n" + keys)


if __name__ == "__main__":
    if any(a in ("--help", "-h", "--helpshort", "--helpfull", "-?") for a in sys.argv[1:]):
        __doc__ += "\n" + _keys_help() + "\n"
    cli.run_absl(main)
