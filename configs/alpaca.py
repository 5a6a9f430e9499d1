"""Alpaca instruction following: K = 4 SmolLM2-135M-Instruct replicas, scored by held-out loss.

Command: PSM_DATA_DIR=../shared/data python -m psm.train --config=configs/alpaca.py --workdir=runs/alpaca
Offline only the 1k sample exists; the full 52k file is used when present
(`alpaca/alpaca_data.json`). A judge (psm.evaluation.alpaca.Judge) is optional
and not run by default. Variants: `:smoke` (CPU, used by the tests).
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, ("smoke",), "alpaca")
    c = common.base()
    c.task.name = "alpaca"
    c.task.num_validation = 100
    c.task.num_test = 100
    c.task.max_new_tokens = 128
    c.train.packing = True  # short examples: far fewer padding slots, same loss
    if arg == "smoke":
        c = common.smoke(c)
    return c
