"""Time to evaluate each paper task's full test set with a tiny model, on this machine.

  PSM_DATA_DIR=../shared/data python benchmarks/bench_eval_tasks.py [--tasks=gsm8k,rte]

The model is the `:smoke` configs' random 1-layer Llama with SmolLM2's
tokenizer: the numbers measure the evaluation pipeline (prompt formatting,
tokenization, batched KV-cache generation of the config's `max_new_tokens`,
answer extraction and scoring; HumanEval runs every completion in the
sandbox), not model quality. Prints one row per task.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from psm.training import base_model  # noqa: E402
from psm.data import paper_tasks, tasks  # noqa: E402
from psm.evaluation import lm, runner  # noqa: E402

CONFIGS = {"gsm8k": ("gsm8k", "smoke"), "math": ("math", "smoke"),
           "alpaca": ("alpaca", "smoke"), "humaneval": ("humaneval", "smoke"),
           **{t: ("glue", f"{t},smoke") for t in ("sst2", "mrpc", "rte", "cola", "stsb")}}


def run(task_name: str) -> dict:
    module, arg = CONFIGS[task_name]
    full = importlib.import_module(f"configs.{module}").get_config(arg.replace("smoke", "")
                                                                    .strip(",") or None)
    config = importlib.import_module(f"configs.{module}").get_config(arg)
    # The full test set and the real config's lengths; the smoke model and batch.
    config.task.num_test = full.task.num_test
    config.task.prompt_len, config.task.max_new_tokens = (full.task.prompt_len,
                                                          full.task.max_new_tokens)
    config.eval.batch_size = 64
    if module == "humaneval":
        config.task.train_file = os.path.join(config.task.data_dir, "alpaca",
                                              "alpaca_data_1k.json")
    t0 = time.time()
    graphdef, params, tokenizer, _ = base_model.load_base(config, "")
    task = paper_tasks.paper_task(config.task, tokenizer)
    val_arrays, _ = tasks.encode_split(task, "validation", config.task.max_len)
    t_load = time.time() - t0
    test = task.splits["test"]
    bos = 0 if task.tokenizer.bos_id is None else 1
    long = sum(len(task.tokenizer.encode(task.prompt(e))) + bos > config.task.prompt_len
               for e in test)  # generation keeps only the end of these prompts
    t1 = time.time()
    result = runner.evaluate_models(graphdef, lm.stack_models([params]), ["tiny"], task,
                                    val_arrays, config)
    return {"task": task_name, "examples": len(test), "long_prompts": long,
            "prompt_len": config.task.prompt_len, "new_tokens": config.task.max_new_tokens,
            "load_s": t_load, "eval_s": time.time() - t1,
            "accuracy": float(np.asarray(result["test_accuracy"])[0])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(CONFIGS))
    args = ap.parse_args()
    if not os.environ.get("PSM_DATA_DIR"):
        raise SystemExit("set PSM_DATA_DIR to the data root (e.g. ../shared/data)")
    rows = [run(t) for t in args.tasks.split(",")]
    print(f"load average {os.getloadavg()[0]:.1f}; model: random 1-layer Llama (d=32), "
          "SmolLM2 tokenizer; batch 64; greedy; cut = prompts longer than the prompt "
          "length (their start is dropped)")
    print(f"{'task':10} {'examples':>8} {'cut':>8} {'prompt':>6} {'new tok':>7} "
          f"{'load s':>7} {'eval s':>7} {'acc':>5}")
    for r in rows:
        print(f"{r['task']:10} {r['examples']:8d} {r['long_prompts']:8d} {r['prompt_len']:6d} "
              f"{r['new_tokens']:7d} {r['load_s']:7.1f} {r['eval_s']:7.1f} {r['accuracy']:5.3f}")


if __name__ == "__main__":
    main()
