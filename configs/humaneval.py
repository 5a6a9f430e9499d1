"""HumanEval: SFT on a user-supplied instruction dataset, evaluated by pass@1 in a sandbox.

HumanEval has no training split. Give an instruction file (JSONL or Alpaca JSON
with instruction/input/output):

  PSM_DATA_DIR=../shared/data python -m psm.train --config=configs/humaneval.py \\
      --config.task.train_file=code_instructions.jsonl --workdir=runs/humaneval

The default train file is the offline Alpaca 1k sample (general instructions,
a stand-in). Variants: `:smoke` (CPU, used by the tests).
"""

import os

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, ("smoke",), "humaneval")
    c = common.base()
    c.task.name = "humaneval"
    root = c.task.data_dir or ""
    c.task.train_file = os.path.join(root, "alpaca", "alpaca_data_1k.json") if root else ""
    c.task.max_len = 512
    c.task.prompt_len = 384
    c.task.max_new_tokens = 384
    c.train.packing = True  # short examples: far fewer padding slots, same loss
    if arg == "smoke":
        c = common.smoke(c)
    return c
