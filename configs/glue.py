"""GLUE (sst2, mrpc, rte, cola, stsb) as label-word generation with a decoder.

Command: PSM_DATA_DIR=../shared/data python -m psm.train --config=configs/glue.py:sst2 --workdir=runs/sst2
The task is the config argument (default sst2); `smoke` may follow, e.g.
`configs/glue.py:rte,smoke`. Test = GLUE's labelled validation split.
Expected: minutes on a GPU; accuracy of the label word (STS-B: within 0.5).
"""

from configs import common

TASKS = ("sst2", "mrpc", "rte", "cola", "stsb")


def get_config(arg=None):
    parts = [p for p in (arg or "").split(",") if p]
    unknown = [p for p in parts if p not in TASKS + ("smoke",)]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown} of configs/glue.py; known: "
                         f"{list(TASKS)} and 'smoke'")
    c = common.base()
    c.task.name = next((p for p in parts if p in TASKS), "sst2")
    c.task.max_len = 320  # RTE passages are long
    c.task.prompt_len = 304
    c.task.max_new_tokens = 4
    c.task.num_train = 8000
    c.train.packing = True  # short examples: far fewer padding slots, same loss
    # Reference rows: greedy soup (K - 1 extra validation passes of one model) and the
    # ensemble (mean of the K output distributions; K forward passes per token).
    c.merge.methods = ("average", "select", "select_resample", "greedy_soup", "ensemble")
    if "smoke" in parts:
        c = common.smoke(c)
    return c
