"""The offline default: K = 4 replicas of a tiny Llama on synthetic word problems.

Command (under 5 minutes on a 2-core CPU shared with other jobs, see README.md):

  python -m psm.train --config=configs/tiny.py --workdir=runs/tiny

What it does: pre-trains a ~0.56M-parameter Llama-style decoder for 450 steps
on a synthetic corpus (cached in the workdir) in which 3 of 4 documents are
solved word problems of the task family, in the task's Q/A format but with
starting amounts 10-29 (the task's start at 2-9, so no corpus problem is a task
problem; the rest are arithmetic facts and narratives). It then fine-tunes
K = 4 replicas of that base for 3 epochs on 480 generated arithmetic word
problems at learning rate 3e-4, each replica in its own data order, merges them
(average, parameter selection, selection + resampling), adds the reference rows
greedy soup and the output ensemble, and reports validation loss and test
exact-match accuracy for every single and merged model, the per-sample loss vs
first-epoch position trend, and the merge-readiness diagnostics (loss barriers
between replicas, task-vector geometry).

Expected result: see the table in README.md, produced by this command. The
imbalance trend is reported as measured, whatever its sign.

How the setting was chosen. Merge results hold only when the replicas fine-tune
from a base that already does well on the task family and stay in one loss
basin. The earlier default (base pre-trained 300 steps on facts and narratives
only, replicas learning the Q/A task from scratch at lr 1e-3 on 1,200 problems)
broke that: pairwise loss barriers 0.13-0.25 nats, task vectors differing by
0.75 of their norm. Four candidates were run (niced, one at a time, on the
shared 2-core machine; barrier = max over t in {.25, .5, .75} of validation
loss minus the chord; d = mean ||tau_a - tau_b|| / mean ||tau||):

  cand.  pre-train          fine-tune             pair barrier   replica->avg  d     singles'   wall (CPU)
         steps  Q/A share   problems  steps  lr   max            max                 val loss
  A      600    0.5         1200      225   3e-4  0              7e-5          0.35  0.138      11:20 (5:54)
  B      400    0.5          480       90   3e-4  4e-4           6e-4          0.39  0.557       8:13 (3:35)
  C      600    0.75         480       90   3e-4  0              0             0.37  0.147       5:40 (4:12)
  D      450    0.75         480       90   3e-4  0              0             0.38  0.250       4:55 (3:31)

(A validated on 200 problems, B-D on the first 100 of them.) All four keep
the replicas in one basin (target: pair barrier < 0.02 nats, replica->average
~0). A costs twice the 5-minute budget; B's base is not competent (fine-tuning
starts at train loss 0.86 and ends at validation loss 0.56, four times A's).
C and D both fine-tune from a base that knows the task family (train loss
0.35-0.41 resp. 0.45-0.51 after 15 steps); C ends better but took 5:40 under
load (5:42 on a rerun), over the budget, while D took 4:55. D is this config;
C (`--config.pretrain.steps=600`) is the better base when time allows. The
choice used the barrier lines, the singles' validation loss and the wall time
only; the merged models' scores were not used to choose. Wall times are under load averages of 4-15 on 2 cores, so
they are noisy; CPU time (user + sys) is the steadier measure.

Variants (`--config=configs/tiny.py:<arg>`):
  test   a few steps of a smaller model, for the test suite (~20 s).

Hyper-parameters otherwise follow common SFT practice (AdamW, linear warm-up
then linear decay, 3 epochs).
"""

from configs import common


def get_config(arg: str | None = None):
    arg = common.parse_arg(arg, ("test",), "tiny")
    c = common.base()
    c.task.name = "arithmetic"
    c.task.data_dir = ""  # generated in code
    c.task.num_train = 480
    c.task.num_validation = 100
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

    c.pretrain.steps = 450
    c.pretrain.batch_size = 32
    c.pretrain.learning_rate = 3e-3
    c.pretrain.warmup_steps = 40
    c.pretrain.num_documents = 6000
    c.pretrain.qa_fraction = 0.75

    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 10
    c.train.batch_size = 16
    c.train.log_every = 15
    c.train.eval_every = 30  # once per epoch (30 steps of 16)
    c.checkpoint.every_steps = 30
    c.export.hf = ("average",)  # a transformers-loadable folder of one merged model
    # Reference rows: greedy soup (K - 1 extra validation passes of one model) and the
    # ensemble (mean of the K output distributions; K forward passes per token).
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
