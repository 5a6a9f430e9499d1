"""Shared config skeleton: every field a run reads, with common SFT defaults.

Task configs start from `base()` and override what differs; `smoke(c)` turns a
real-task config into a few CPU steps of a random tiny model that keeps the
real model's tokenizer (used by the tests).
"""

import os

from ml_collections import config_dict


def base() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.seed = 0  # model init, pre-training batches, merge draws
    c.data_seed = 0  # the K data orders
    c.num_replicas = 4  # K

    c.task = config_dict.ConfigDict()
    c.task.name = ""
    c.task.seed = 0  # generator (synthetic) / validation hold-out draw (real tasks)
    c.task.data_dir = os.environ.get("PSM_DATA_DIR", "")  # local data root ('' = download)
    c.task.train_file = ""  # HumanEval only: instruction data for SFT
    c.task.chat_template = False  # wrap prompt/response in the model's chat template
    c.task.num_train = 0  # 0 = all
    c.task.num_validation = 200
    c.task.num_test = 0  # 0 = all
    c.task.max_len = 384  # tokens per training row (BOS and EOS included)
    # BERT batches only: keep the columns the longest example needs, rounded up to this
    # (a few compiled lengths); 0 = every batch max_len columns. Decoders: train.packing.
    c.task.pad_to_multiple = 0
    c.task.prompt_len = 256  # left-padded prompt length for generation
    c.task.max_new_tokens = 256

    c.model = config_dict.ConfigDict()
    c.model.init = "pretrained"  # 'pretrain' | 'pretrained' | 'random' (psm/training/base_model.py)
    c.model.kind = "smollm2"  # 'smollm2' | 'gguf' | 'hf'
    c.model.path = ""  # GGUF file or HF folder (smollm2: the wheel's file)
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"  # compute dtype
    # Speed options (docs/performance.md, "Speed options"); none changes the model's maths.
    c.model.remat = "none"  # 'none' | 'full' | 'dots_saveable' (True / False: 'full' / 'none')
    c.model.scan_layers = False
    c.model.attention = "auto"  # 'auto' | 'xla' | 'cudnn' (GPU flash attention, bf16/fp16)

    c.pretrain = config_dict.ConfigDict()  # only read by model.init == 'pretrain'
    c.pretrain.steps = 0
    c.pretrain.batch_size = 32
    c.pretrain.learning_rate = 3e-3
    c.pretrain.warmup_steps = 0
    c.pretrain.num_documents = 0
    c.pretrain.qa_fraction = 0.0  # share of documents that are solved word problems (synthetic.make_corpus)

    c.optim = config_dict.ConfigDict()  # AdamW, linear warm-up then decay
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 30
    c.optim.schedule = "linear"
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.clip_norm = 1.0

    c.train = config_dict.ConfigDict()
    c.train.epochs = 3
    c.train.batch_size = 16  # per replica
    c.train.fixed_intra_batch = False  # METHOD.md section 2 ablation
    # Several examples per training row (psm/data/packed_batches.py): the same batches and
    # loss, fewer padding slots computed. Decoder paper tasks turn it on; BERT cannot.
    c.train.packing = False
    c.train.log_every = 25
    c.train.eval_every = 100  # validation loss of singles and their average (Fig. 4); 0 = off
    # Decoder loss computed this many positions at a time, never holding the [B, T, V]
    # float32 logits (psm/models/chunked_loss.py); 0 = the whole sequence at once.
    c.train.loss_chunk = 0

    c.mesh = config_dict.ConfigDict()
    # (replica, fsdp, tensor) mesh, psm/training/sharding.py. -1 fills from the device count
    # (replica: the largest divisor of K that fits; then fsdp or tensor: the rest).
    c.mesh.replica = -1  # the K replicas
    c.mesh.fsdp = 1  # inside a replica: batch and parameters' embed dimension
    c.mesh.tensor = 1  # inside a replica: heads, MLP and vocabulary dimensions
    c.mesh.data = config_dict.placeholder(int)  # deprecated alias of mesh.fsdp

    c.checkpoint = config_dict.ConfigDict()
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 2

    c.merge = config_dict.ConfigDict()
    # Paper: average, select, select_resample. Beyond it: ties, dare (merges), and the
    # reference rows best_single, greedy_soup (need validation losses) and ensemble
    # (the mean of the K replicas' output probabilities: K forward passes per token).
    c.merge.methods = ("average", "select", "select_resample")
    c.merge.resample = 3  # n extra draws for select_resample
    c.merge.seed = 0
    # Replicas and base are rounded to this dtype before merging (as released
    # checkpoints are), and every row is scored from the rounded replicas;
    # None = the training dtype. E.g. 'bfloat16': updates below half a bf16 ulp
    # leave parameters equal to the base, which is where resampling acts.
    c.merge.storage_dtype = config_dict.placeholder(str)
    c.merge.ties_density = 0.2  # fraction of each task vector kept (TIES paper's k = 20%)
    c.merge.ties_trim = "tensor"  # top-k per 'tensor' or over the whole 'model'
    c.merge.dare_drop_rate = 0.5  # p; survivors rescaled (below), then averaged over K
    c.merge.dare_rescale = "inverse"  # 1/(1-p) | 'l1' | 'none' (psm.merge.dare)
    c.merge.dare_combine = "linear"  # 'linear' | 'ties'

    c.export = config_dict.ConfigDict()  # merged models written as HF folders in export/
    c.export.hf = ("select_resample",)  # names from merge.methods; () = none
    c.export.dtype = ""  # on-disk dtype ('' = the model's parameter dtype)

    c.eval = config_dict.ConfigDict()
    c.eval.batch_size = 64
    c.eval.num_bins = 20
    # Merge readiness (psm/training/diagnostics.py): validation loss on straight lines between
    # replica pairs and from each replica to their average, and task-vector geometry.
    c.eval.barrier = True
    c.eval.barrier_grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    # Interpolated models per stacked evaluation; 0 = K + 1, the stack the evaluation
    # during training already runs (same memory, same compiled step).
    c.eval.barrier_models_per_pass = 0
    return c


def smoke(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """A few CPU steps: random tiny Llama with the real tokenizer, tiny splits."""
    c.num_replicas = 2
    c.model.init = "random"
    c.model.dtype = "float32"
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 1
    c.model.num_heads, c.model.num_kv_heads = 2, 1
    c.model.tie_embeddings = True
    c.task.num_train, c.task.num_validation, c.task.num_test = 8, 4, 2
    c.task.max_len, c.task.prompt_len, c.task.max_new_tokens = 256, 224, 4
    c.train.epochs, c.train.batch_size, c.train.log_every, c.train.eval_every = 1, 4, 1, 0
    c.optim.warmup_steps = 0
    c.checkpoint.every_steps = 2
    c.eval.batch_size = 4
    return c


def parse_arg(arg, known: tuple[str, ...], name: str) -> str:
    if arg and arg not in known:
        raise ValueError(f"unknown variant {arg!r} of configs/{name}.py; known: {list(known)}")
    return arg or ""
