"""MATH (Hendrycks): K = 4 SmolLM2-135M-Instruct replicas, scored by boxed-answer equivalence.

Command: PSM_DATA_DIR=../shared/data python -m psm.train --config=configs/math.py --workdir=runs/math
Expected: a GPU run of tens of minutes; a 135M model solves few MATH problems,
so compare losses first. Variants: `:smoke` (CPU, used by the tests).
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, ("smoke",), "math")
    c = common.base()
    c.task.name = "math"
    c.task.max_len = 512
    c.task.prompt_len = 256
    c.task.max_new_tokens = 384
    c.task.num_test = 500  # a fixed subset (the first 500 ids) keeps evaluation affordable
    c.train.packing = True  # short examples: far fewer padding slots, same loss
    if arg == "smoke":
        c = common.smoke(c)
    return c
