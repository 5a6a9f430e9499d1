"""The offline default: K = 4 replicas of a tiny Llama on synthetic word problems.

Command (a few minutes on a 2-core CPU):

  python -m psm.train --config=configs/tiny.py --workdir=runs/tiny

What it does: pre-trains a ~0.56M-parameter Llama-style decoder on a synthetic
corpus (cached in the workdir), fine-tunes K = 4 replicas of it for 3 epochs on
1,200 generated arithmetic word problems, each replica in its own data order,
merges them (average, parameter selection, selection + resampling), adds the
reference rows greedy soup and logit ensemble, and reports validation loss and
test exact-match accuracy for every single and merged model, the per-sample
loss vs first-epoch position trend, and the merge-readiness diagnostics (loss
barriers between replicas, task-vector geometry).

Expected result: see the table in README.md, produced by this command. The
imbalance trend is reported as measured, whatever its sign.

Variants (`--config=configs/tiny.py:<arg>`):
  test   a few steps of a smaller model, for the test suite (~20 s).

Hyper-parameters follow common SFT practice (AdamW, linear warm-up then linear
decay, 3 epochs); nothing here was tuned to make merging win.
"""

from configs import common


def get_config(arg: str | None = None):
    arg = common.parse_arg(arg, ("test",), "tiny")
    c = common.base()
    c.task.name = "arithmetic"
    c.task.data_dir = ""  # generated in code
    c.task.num_train = 1200
    c.task.num_validation = 200
    c.task.num_test = 200
    c.task.max_len = 72
    c.task.prompt_len = 64
    c.task.max_new_tokens = 32

    c.model.init = "pretrain"
    c.model.kind = ""
    c.model.dtype = "float32"
    c.model.hidden_size = 128
    c.model.intermediate_size = 352
    c.model.num_layers = 3
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.rope_theta = 10_000.0
    c.model.tie_embeddings = True

    c.pretrain.steps = 300
    c.pretrain.batch_size = 32
    c.pretrain.learning_rate = 3e-3
    c.pretrain.warmup_steps = 40
    c.pretrain.num_documents = 6000

    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20
    c.train.batch_size = 16
    c.train.log_every = 25
    c.train.eval_every = 50
    c.checkpoint.every_steps = 50
    c.export.hf = ("average",)  # a transformers-loadable folder of one merged model
    # Reference rows: greedy soup (K - 1 extra validation passes of one model) and the
    # logit ensemble (K forward passes per token at evaluation).
    c.merge.methods = ("average", "select", "select_resample", "greedy_soup", "ensemble")

    if arg == "test":
        c.task.num_train, c.task.num_validation, c.task.num_test = 96, 32, 16
        c.task.max_new_tokens = 24
        c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 2
        c.pretrain.steps, c.pretrain.batch_size, c.pretrain.num_documents = 6, 8, 200
        c.train.batch_size, c.train.log_every, c.train.eval_every = 8, 4, 12
        c.checkpoint.every_steps = 6
        c.eval.batch_size = 32
    return c
