"""The offline default: K = 4 replicas of a tiny Llama on synthetic word problems.

Command (about 3-4 minutes on a 2-core CPU):

  python -m psm.train --config=configs/tiny.py --workdir=runs/tiny

What it does: pre-trains a ~0.8M-parameter Llama-style decoder on a synthetic
corpus (cached in the workdir), fine-tunes K = 4 replicas of it for 3 epochs on
1,600 generated arithmetic word problems, each replica in its own data order,
merges them (average, parameter selection, selection + resampling), and reports
validation loss and test exact-match accuracy for every single and merged
model, plus the per-sample loss vs first-epoch position trend.

Expected result: see the table in README.md, produced by this command. The
tiny model learns the task only partly; the imbalance trend it shows is
reported as measured, whatever its sign.

Variants (`--config=configs/tiny.py:<arg>`):
  test   a few steps of a smaller model, for the test suite (~20 s).

Hyper-parameters follow common SFT practice (AdamW, linear warm-up then linear
decay, 3 epochs); nothing here was tuned to make merging win.
"""

from ml_collections import config_dict


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.seed = 0  # model init, pre-training batches, merge draws
    c.data_seed = 0  # the K data orders
    c.num_replicas = 4  # K

    c.task = config_dict.ConfigDict()
    c.task.name = "arithmetic"
    c.task.seed = 0  # problem generator
    c.task.num_train = 1600
    c.task.num_validation = 200
    c.task.num_test = 200
    c.task.max_len = 80  # tokens per training row
    c.task.prompt_len = 64  # left-padded prompt length for generation
    c.task.max_new_tokens = 32

    c.model = config_dict.ConfigDict()
    c.model.init = "pretrain"  # 'pretrain' (make a base here) or 'checkpoint'
    c.model.path = ""  # checkpoint to start from when init == 'checkpoint'
    c.model.hidden_size = 128
    c.model.intermediate_size = 352
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.rope_theta = 10_000.0
    c.model.tie_embeddings = True
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"

    c.pretrain = config_dict.ConfigDict()
    c.pretrain.steps = 400
    c.pretrain.batch_size = 32
    c.pretrain.learning_rate = 3e-3
    c.pretrain.warmup_steps = 40
    c.pretrain.num_documents = 6000

    c.optim = config_dict.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20
    c.optim.schedule = "linear"
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.clip_norm = 1.0

    c.train = config_dict.ConfigDict()
    c.train.epochs = 3
    c.train.batch_size = 16  # per replica
    c.train.fixed_intra_batch = False  # METHOD.md section 2 ablation
    c.train.log_every = 25
    c.train.eval_every = 50  # validation loss of singles and their average (Fig. 4)

    c.mesh = config_dict.ConfigDict()
    c.mesh.replica = -1  # -1: as many devices as divide K
    c.mesh.data = 1

    c.checkpoint = config_dict.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 2

    c.merge = config_dict.ConfigDict()
    c.merge.methods = ("average", "select", "select_resample")
    c.merge.resample = 3  # n extra draws for select_resample
    c.merge.seed = 0

    c.eval = config_dict.ConfigDict()
    c.eval.batch_size = 64
    c.eval.num_bins = 20

    if arg == "test":
        c.task.num_train, c.task.num_validation, c.task.num_test = 96, 32, 16
        c.task.max_new_tokens = 24
        c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 2
        c.pretrain.steps, c.pretrain.batch_size, c.pretrain.num_documents = 6, 8, 200
        c.train.batch_size, c.train.log_every, c.train.eval_every = 8, 4, 12
        c.checkpoint.every_steps = 6
        c.eval.batch_size = 32
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/tiny.py; known: 'test'")
    return c
