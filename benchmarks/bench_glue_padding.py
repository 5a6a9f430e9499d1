"""What cutting BERT batches to their longest example saves (config.task.pad_to_multiple).

  PSM_DATA_DIR=../shared/data python benchmarks/bench_glue_padding.py            # cola
  PSM_DATA_DIR=../shared/data python benchmarks/bench_glue_padding.py --task=sst2 --steps=3

For one task of configs/glue_bert.py (all-MiniLM-L6-v2, K = 4, batch 32 per
replica, the config's max_len) it prints three tables:

  lengths    over the run's real data order (`psm.data.orders`, every step of
             every epoch): how many steps need each cut length, and the token
             slots computed with and without the cut;
  step time  the vmapped K-replica training step at each cut length that occurs
             and at max_len (compiled first, then --steps timed steps each);
             the run's expected training time follows from the two tables;
  outputs    per-example losses of the base model (pretrained encoder, fresh
             head) on the validation split, batches of config.eval.batch_size
             cut (sorted by length, as the evaluation does) vs uncut: the largest
             absolute difference, and how many argmax predictions differ. Padding
             is masked out of attention, so only rounding may differ.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import glue_bert  # noqa: E402
from psm.data import orders, paper_tasks  # noqa: E402
from psm.training import encoder_task, replicas, sharding, trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="cola", choices=glue_bert.TASKS)
    p.add_argument("--multiple", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps per length")
    args = p.parse_args()
    if not os.environ.get("PSM_DATA_DIR"):
        raise SystemExit("set PSM_DATA_DIR to the folder holding the GLUE data")

    config = glue_bert.get_config(args.task)
    config.task.pad_to_multiple = args.multiple
    graphdef, base, tokenizer, _ = encoder_task.load_base(config)
    task = paper_tasks.paper_task(config.task, tokenizer)
    train, _ = encoder_task.encode_split(task.splits["train"], tokenizer, task.name,
                                         config.task.max_len)
    val, _ = encoder_task.encode_split(task.splits["validation"], tokenizer, task.name,
                                       config.task.max_len)
    k, b, t = config.num_replicas, config.train.batch_size, config.task.max_len
    n = len(train["label"])
    kw = dict(data_seed=config.data_seed, num_replicas=k, num_samples=n, batch_size=b,
              fixed_intra_batch=config.train.fixed_intra_batch)
    total = orders.steps_per_epoch(n, b) * config.train.epochs
    lengths = [encoder_task.batch_length(train, orders.batch_indices(s, **kw), args.multiple)
               for s in range(total)]
    count = collections.Counter(lengths)
    print(f"\n{task.name}: {n} train examples, K = {k}, batch {b}, max_len {t}, "
          f"{total} steps; cut to a multiple of {args.multiple}\n")
    print("| length | steps |\n| --- | --- |")
    for length in sorted(count):
        print(f"| {length} | {count[length]} |")
    print(f"\ntoken slots per replica: {sum(lengths) * b:,} cut vs {total * t * b:,} uncut "
          f"({sum(lengths) / (total * t):.0%})")

    # ------------------------------------------------------------- step time
    tx, _ = trainer.make_optimizer(config, total)
    mesh = sharding.mesh_from_config(config, b)
    params_k, opt_k, state_sh, opt_sh = replicas.place_state(base, k, tx, mesh)
    step_fn = encoder_task.make_train_step(graphdef, tx, state_sh,
                                           sharding.batch_sharding(mesh), opt_sh)
    idx = orders.batch_indices(0, **kw)
    seconds = {}
    with jax.set_mesh(mesh):
        for length in sorted(count) + ([t] if t not in count else []):
            batch = encoder_task.gather_batch(train, idx, length)
            params_k, opt_k, _ = step_fn(params_k, opt_k, batch)  # compiles
            jax.block_until_ready(params_k)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                params_k, opt_k, _ = step_fn(params_k, opt_k, batch)
            jax.block_until_ready(params_k)
            seconds[length] = (time.perf_counter() - t0) / args.steps
    print(f"\n| length | s per K = {k} step | vs max_len |\n| --- | --- | --- |")
    for length, s in sorted(seconds.items()):
        print(f"| {length} | {s:.2f} | {s / seconds[t]:.2f} |")
    cut = sum(seconds[length] for length in lengths)
    print(f"\nexpected training time: {cut / 60:.1f} min cut vs {total * seconds[t] / 60:.1f} "
          f"min uncut ({cut / (total * seconds[t]):.2f}x)")

    # --------------------------------------------------------------- outputs
    eval_step = encoder_task.make_eval_step(graphdef)
    predict = encoder_task.make_predict_step(graphdef)
    models = jax.tree.map(lambda x: x[None], base)
    bs = config.eval.batch_size
    loss = {m: encoder_task.per_sample_losses(eval_step, models, val, bs, pad_to_multiple=m)[0]
            for m in (0, args.multiple)}
    pred = {m: encoder_task.predictions(predict, models, val, bs, pad_to_multiple=m)[0]
            for m in (0, args.multiple)}
    diff = np.abs(loss[0] - loss[args.multiple])
    print(f"\nbase model on {len(diff)} validation examples, cut vs uncut batches: largest "
          f"|loss difference| {diff.max():.2e} (relative {np.max(diff / loss[0]):.2e}); "
          f"predictions differing: {int(np.sum(pred[0] != pred[args.multiple]))}")


if __name__ == "__main__":
    main()
