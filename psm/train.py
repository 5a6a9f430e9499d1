"""Entry point: `python -m psm.train --config=configs/tiny.py --workdir=runs/tiny`.

Override any config field with `--config.<key>=<value>` (the config is locked:
a misspelt key is an error). Rerunning with the same workdir resumes.
"""

import logging

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Library chatter (orbax logs every save at INFO) stays at WARNING; psm's own
    # progress messages are shown. `--verbosity=0` restores absl's INFO for all.
    if absl_logging.get_verbosity() < absl_logging.INFO or not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("psm").setLevel(logging.INFO)
    import jax
    logging.getLogger("psm").info("JAX devices: %s", jax.devices())
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
