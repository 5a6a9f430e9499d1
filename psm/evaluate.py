"""Evaluate a single or merged model: `python -m psm.evaluate`.

  python -m psm.evaluate --config=configs/gsm8k.py --checkpoint=runs/gsm8k [--merge=select_resample]
  python -m psm.evaluate --config=configs/gsm8k.py --checkpoint=<HF folder>
  python -m psm.evaluate --config=configs/tiny.py --checkpoint=runs/tiny --replica=2

`--checkpoint` is a psm training workdir (its replicas, from the latest
checkpoint; `--merge` merges them first, `--replica` picks one), a Hugging Face
model folder, or an orbax checkpoint of one parameter tree for the config's
model. Writes `eval.json` (to `--out`, default the checkpoint folder or the
current folder) with the metrics and per-example results (id, prediction,
extracted answer, correct), using the same code as the trainer's final
evaluation.

A bad flag or `--checkpoint` (missing, a folder without config.json, a run that
failed before its first checkpoint, a workdir of another config) is one
`error:` line, exit status 2, before any model is loaded (`psm.cli`).
"""

from __future__ import annotations

import json
import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from psm import cli
from psm.training import report
from psm.training import workdir as wd

# JAX, the models and the trainer are imported where they are used, so that a bad
# flag or --checkpoint path is refused before those imports (seconds).

log = logging.getLogger(__name__)
MERGE_CHOICES = report.MERGE_METHODS  # psm.training.report is light: no JAX before the flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file.",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "psm workdir, HF folder or orbax "
                                  "checkpoint of one parameter tree.")
_MERGE = flags.DEFINE_enum("merge", None, list(MERGE_CHOICES), "Merge a workdir's replicas "
                           "with this method first.")
_REPLICA = flags.DEFINE_integer("replica", None, "Evaluate only this replica of a workdir.")
_OUT = flags.DEFINE_string("out", None, "Folder for eval.json (default: see module doc).")


def _looks_like_psm_config(path: str) -> bool:
    """Whether `path` is a psm run's config.json (not a Hugging Face model config)."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "num_replicas" in cfg and "task" in cfg


def _kind(path: str) -> str:
    """'workdir', 'hf' or 'orbax' for a --checkpoint path; a ValueError naming what
    is missing otherwise (checked before anything is loaded)."""
    if not os.path.exists(path):
        raise ValueError(f"--checkpoint {path}: no such file or folder")
    if not os.path.isdir(path):
        raise ValueError(f"--checkpoint {path} is a file; expected a psm workdir, a Hugging "
                         "Face model folder or an orbax checkpoint folder")
    config_json = os.path.join(path, "config.json")
    if os.path.exists(config_json) and _looks_like_psm_config(config_json):
        ckpts = os.path.join(path, "checkpoints")
        if not (os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts))):
            raise ValueError(
                f"--checkpoint {path} is a psm workdir without a checkpoint ({ckpts} holds no "
                "step folder): its run failed or stopped before its first checkpoint; rerun "
                "`python -m psm.train` on it")
        return "workdir"
    if os.path.exists(config_json):
        return "hf"
    weights = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".bin", ".gguf")))
    if weights:
        raise ValueError(f"--checkpoint {path} holds {weights[:3]} but no config.json: a "
                         "Hugging Face model folder needs its config.json beside the weights")
    return "orbax"  # restore_tree names the folder if it is not one


def load_models(config, path: str, *, merge: str | None = None, replica: int | None = None):
    """Loads the model(s) to evaluate.

    Returns:
      (graphdef, params `[M, ...]` stacked, names [M], model tokenizer or None).
    """
    kind = _kind(path)
    _check_selection(path, kind, merge, replica)
    import jax

    from psm.training import base_model, checkpoint, replicas
    from psm.data import tasks
    from psm.evaluation import lm
    from psm.training.trainer import make_optimizer, merge_models
    if kind == "hf":
        cfg = dict(config.model.to_dict(), kind="hf", path=path, init="pretrained")
        graphdef, params, tokenizer, _ = base_model.load_base(_with_model(config, cfg), "")
        return graphdef, lm.stack_models([params]), [os.path.basename(path.rstrip("/"))], \
            tokenizer
    # The config builds the model's structure; weights then come from the checkpoint.
    task_tok = tasks.get_task(config.task).tokenizer if config.model.init == "pretrain" else None
    if config.model.init == "pretrain":
        cfg = base_model._arch(config, task_tok.vocab_size)
        graphdef, like = base_model.llama.abstract_model(cfg)
        tokenizer = None
    else:
        graphdef, like, tokenizer, _ = base_model.load_base(config, "")
    if kind == "orbax":
        return graphdef, lm.stack_models([checkpoint.restore_tree(path, like)]), ["model"], \
            tokenizer
    ckpt = checkpoint.Checkpointer(os.path.join(path, "checkpoints"), interval=1, keep=10**9)
    step = ckpt.latest_step()
    if step is None:
        raise ValueError(f"{path}/checkpoints holds no checkpoint")
    k = config.num_replicas
    params_like = jax.tree.map(lambda x: jax.ShapeDtypeStruct((k,) + x.shape, x.dtype), like)
    tx, _ = make_optimizer(config, total_steps=1)  # only the state's structure matters
    state_like = {"params": params_like,
                  "opt_state": jax.eval_shape(lambda p: replicas.init_opt_state(tx, p),
                                              params_like)}
    try:
        params_k = ckpt.restore(step, state_like)["params"]
    except (ValueError, KeyError, TypeError) as e:
        _config_mismatch(config, path, e)
        raise
    finally:
        ckpt.close()
    if replica is not None:
        if not 0 <= replica < k:
            raise ValueError(f"--replica={replica} is not in [0, {k})")
        return graphdef, lm.stack_models([replicas.unstack(params_k, replica)]), \
            [f"replica {replica}"], tokenizer
    if merge:
        base = like if config.model.init != "pretrain" else _base_of(path, like)
        merged = merge_models(config, params_k, base, methods=(merge,))
        return graphdef, lm.stack_models(list(merged.values())), list(merged), tokenizer
    return graphdef, params_k, [f"replica {i}" for i in range(k)], tokenizer


def _config_mismatch(config, path: str, error: Exception) -> None:
    """Raises a ValueError listing the keys where --config differs from the workdir's
    config.json, for a checkpoint that does not restore with --config's structure
    (orbax's own message is a dump of both trees). Returns when they agree."""
    saved = wd.read_config(os.path.join(path, "config.json"))
    diff = sorted(wd.diff_keys(saved, wd.config_to_dict(config)))
    if not diff:
        return
    raise ValueError(
        f"--config does not match the run in {path}: its checkpoint does not restore with "
        f"this config's model (differing keys vs {path}/config.json: {', '.join(diff[:20])}"
        f"{' ...' if len(diff) > 20 else ''}); pass the config the run was trained with "
        f"({type(error).__name__} from the restore; --verbose shows it)") from error


def _check_selection(path: str, kind: str, merge, replica) -> None:
    """--merge / --replica pick among a workdir's K replicas; a single model (HF
    folder, orbax tree) has none, and evaluating it anyway would report it
    under a merge's or replica's name."""
    given = [f for f, v in (("--merge", merge), ("--replica", replica)) if v is not None]
    if merge is not None and replica is not None:
        raise ValueError("--merge and --replica exclude each other: --replica evaluates one "
                         "replica of a workdir, --merge the merge of all its replicas")
    if given and kind != "workdir":
        what = "a Hugging Face folder" if kind == "hf" else "an orbax checkpoint of one tree"
        raise ValueError(
            f"{given[0]} needs a psm training workdir (checkpoints/ + config.json) holding "
            f"K replicas, but --checkpoint {path!r} is {what}, a single model; drop "
            f"{given[0]} to evaluate that model, or merge replicas with `python -m psm.merge`")


def _base_of(workdir: str, like):
    from psm.training import checkpoint
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "base"), interval=1, keep=1)
    try:
        return ckpt.restore(ckpt.latest_step(), like)
    finally:
        ckpt.close()


def _with_model(config, model_cfg: dict):
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for key, value in model_cfg.items():
            config.model[key] = value
    return config


def evaluate(config, path: str, *, merge=None, replica=None, out=None) -> dict:
    """Evaluates and writes `eval.json`; returns its content."""
    from psm.data import paper_tasks, tasks
    from psm.evaluation import runner
    graphdef, params_m, names, tokenizer = load_models(config, path, merge=merge,
                                                       replica=replica)
    task = (tasks.get_task(config.task) if config.model.init == "pretrain"
            else paper_tasks.paper_task(config.task, tokenizer))
    val_arrays, _ = tasks.encode_split(task, "validation", config.task.max_len)
    result = runner.evaluate_models(graphdef, params_m, names, task, val_arrays, config)
    report = {
        "checkpoint": os.path.abspath(path), "task": task.name,
        "models": {n: {"val_loss": float(result["val_loss"][m]),
                       "test_accuracy": float(result["test_accuracy"][m])}
                   for m, n in enumerate(names)},
        "per_example": result["per_example"],
    }
    out = out or (path if os.path.isdir(path) else ".")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(report, f, indent=1)
    for n, m in report["models"].items():
        print(f"{n}: val loss {m['val_loss']:.4f}, test accuracy {m['test_accuracy']:.3f}")
    return report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("psm").setLevel(logging.INFO)
    # Refused before anything is loaded (eval.json is written after the evaluation).
    kind = _kind(_CHECKPOINT.value)
    _check_selection(_CHECKPOINT.value, kind, _MERGE.value, _REPLICA.value)
    wd.check_writable(_OUT.value or (_CHECKPOINT.value if os.path.isdir(_CHECKPOINT.value)
                                     else "."), what="--out")
    evaluate(_CONFIG.value, _CHECKPOINT.value, merge=_MERGE.value, replica=_REPLICA.value,
             out=_OUT.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "checkpoint"])
    cli.run_absl(main)
