"""Multi-seed experiments: one config, several data seeds, one report with paired statistics.

  python -m psm.experiment --config=configs/tiny.py --seeds=3 --workdir=runs/tiny3 \
      [--config.key=value ...] [--report_only] [--draws=10000]

Seed s trains `config` with `config.data_seed = <base data_seed> + s` (new K data orders;
the base model, merge draws and hyper-parameters are unchanged) into `<workdir>/seed<s>/`
through `psm.training.trainer.train_and_evaluate`. A rerun resumes: a seed whose `results.json`
exists for this config is never retrained, an unfinished one resumes from its checkpoints.
Overrides of merge or export keys only (e.g. `--config.merge.storage_dtype=bfloat16`) merge
and evaluate every seed's trained replicas again without training a step (copy the folder
first, `cp -al <workdir> <new>`, to keep the earlier report beside the new one). Then the
report over all seeds is written into the workdir (`RESULTS.md`, `report.json`,
`plots/`, see `psm.experiment_report`); `--report_only` rebuilds it from the seed folders
without training.

Bad input (a flag, a config key, a seed folder of another config, a missing or corrupt
record file) is one `error:` line naming the key or file, exit status 2, before any
training (`psm.cli`; `--verbose` adds the traceback).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import sys

import numpy as np

from psm import imbalance, stats
from psm.training import workdir as wd
from psm.training.metrics import read_metrics

log = logging.getLogger(__name__)

# The GLUE metric a report uses for tasks not scored by plain accuracy (METHOD.md).
TASK_METRICS = {"cola": "mcc", "mrpc": "f1", "stsb": "pearson"}
REGRESSION_TASKS = ("stsb",)


def seed_dir(workdir: str, s: int) -> str:
    return os.path.join(workdir, f"seed{s}")


def seed_config(config, s: int):
    """A copy of `config` for data seed s: only `data_seed` differs (base + s)."""
    c = config.copy_and_resolve_references()
    c.data_seed = int(config.data_seed) + s
    return c


def check_seed_folders(config, workdir: str, seeds: int) -> None:
    """Refuses, before any training, seed folders that hold a run of another config.

    A seed folder whose config differs only after training (merge / export keys,
    `psm.training.workdir.POST_TRAINING_KEYS`) is accepted: `run_seeds` merges and
    evaluates its trained replicas again.

    Raises:
      ValueError: naming the seed folder and the differing config keys.
    """
    for s in range(seeds):
        path = os.path.join(seed_dir(workdir, s), "config.json")
        if not os.path.exists(path):
            continue
        existing = wd.upgrade_config(_read_json(path))
        wanted = wd.config_to_dict(seed_config(config, s))
        diff = wd.training_keys(wd.diff_keys(existing, wanted))
        if diff:
            raise ValueError(f"{path} holds a run of a different config (differing keys: "
                             f"{', '.join(diff[:20])}); use a new --workdir or the same config "
                             "and overrides")


def seed_finished(config, workdir: str, s: int) -> bool:
    """True when seed s's folder holds results.json of exactly this config."""
    folder = seed_dir(workdir, s)
    if not os.path.exists(os.path.join(folder, "results.json")):
        return False
    return wd.upgrade_config(_read_json(os.path.join(folder, "config.json"))) == \
        wd.config_to_dict(seed_config(config, s))


def run_seeds(config, workdir: str, seeds: int, train_fn=None) -> list[int]:
    """Trains (or resumes) every unfinished seed. Returns the seeds trained in this call."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    check_seed_folders(config, workdir, seeds)
    if train_fn is None:
        from psm.training import trainer
        train_fn = trainer.train_and_evaluate
    trained = []
    for s in range(seeds):
        folder = seed_dir(workdir, s)
        if seed_finished(config, workdir, s):
            log.info("seed %d: finished (%s/results.json), not retrained", s, folder)
            continue
        log.info("seed %d: data_seed %d -> %s", s, config.data_seed + s, folder)
        train_fn(seed_config(config, s), folder)
        trained.append(s)
    return trained


# ------------------------------------------------------------------ reading seed folders

@dataclasses.dataclass
class SeedRun:
    """What one seed folder holds, as arrays.

    Attributes:
      names: M model names in results.json order ("replica i" first).
      results: the parsed results.json.
      config: the parsed config.json.
      test_ids: `[N_test]` test example ids.
      correct: `[M, N_test]` bool, per model per test example.
      extracted: M lists of N_test extracted answers (None where none was found).
      positions, losses: `[K, N_train]` first-epoch positions and final train losses.
      merged_losses: merged name -> `[N_train]` final train losses.
      metrics: metrics.jsonl records.
    """
    folder: str
    names: list
    results: dict
    config: dict
    test_ids: np.ndarray
    correct: np.ndarray
    extracted: list
    positions: np.ndarray
    losses: np.ndarray
    merged_losses: dict
    metrics: list

    @property
    def num_replicas(self) -> int:
        return int(self.config["num_replicas"])


def _read_json(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; is the run in {os.path.dirname(path)} "
                                "finished? (rerun without --report_only to train it)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _read_jsonl(path: str) -> list:
    """The records of a JSON-lines file; a bad line is a ValueError naming file and line."""
    rows = []
    # Bytes, decoded per line by json.loads: a bad byte is reported with its line.
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {line_no}: invalid JSON ({e.msg})") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {line_no}: not valid UTF-8 ({e.reason})") \
                    from None
    return rows


def load_seed(folder: str) -> SeedRun:
    """Reads a finished run's files (results.json, config.json, test_predictions.jsonl,
    per_sample.jsonl, metrics.jsonl)."""
    results = _read_json(os.path.join(folder, "results.json"))
    config = _read_json(os.path.join(folder, "config.json"))
    names = list(results["models"])
    path = os.path.join(folder, "test_predictions.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing")
    rows = _read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} has no test examples; the bootstrap needs some")
    for i, r in enumerate(rows):
        missing = [n for n in names if n not in r["models"]]
        if missing:
            raise ValueError(f"{path} line {i + 1} (id {r.get('id')}) has no predictions for "
                             f"{missing}, which results.json lists")
    correct = np.array([[bool(r["models"][n]["correct"]) for r in rows] for n in names])
    extracted = [[r["models"][n].get("extracted") for r in rows] for n in names]
    positions, losses, merged_losses, _ = imbalance.load_records(folder)
    metrics = read_metrics(folder)  # a corrupt line is an error naming file and line
    if not metrics:  # a finished run logs its training loss at least at its last step
        raise ValueError(f"{os.path.join(folder, 'metrics.jsonl')} is missing or holds no "
                         "records, but a finished run logs its training loss there")
    return SeedRun(folder=folder, names=names, results=results, config=config,
                   test_ids=np.array([r["id"] for r in rows]), correct=correct,
                   extracted=extracted, positions=positions, losses=losses,
                   merged_losses=merged_losses, metrics=metrics)


def load_seeds(workdir: str, seeds: int) -> list[SeedRun]:
    """Every seed folder `seed0 .. seed<seeds-1>`; checks they report the same models."""
    runs = [load_seed(seed_dir(workdir, s)) for s in range(seeds)]
    for r in runs[1:]:
        if r.names != runs[0].names:
            raise ValueError(f"{r.folder}/results.json lists models {r.names}, but "
                             f"{runs[0].folder}/results.json lists {runs[0].names}")
        if r.config["task"]["name"] != runs[0].config["task"]["name"]:
            raise ValueError(f"{r.folder} ran task {r.config['task']['name']!r}, "
                             f"{runs[0].folder} ran {runs[0].config['task']['name']!r}")
    return runs


def task_metric(task_name: str, override: str = "") -> str:
    """The metric a report bootstraps: `override`, else the task's GLUE metric, else accuracy."""
    name = override or TASK_METRICS.get(task_name, "accuracy")
    stats.get_metric(name)  # raises for an unknown name
    return name


def metric_inputs(runs: list[SeedRun], metric: str, labels_fn=None):
    """Per seed `(predictions [M, N], labels [N] or None)` for the metric.

    Accuracy reads the `correct` flags (labels None: all-True). Other metrics compare
    each model's extracted answer with the gold label: an answer that could not be
    extracted counts as class -1 (always wrong; its own class in Matthews' multi-class
    form) or, for a regression task, as score 0.0.
    """
    if metric == "accuracy":
        return [(r.correct, None) for r in runs]
    labels_fn = labels_fn or task_labels
    out = []
    for r in runs:
        task = r.config["task"]["name"]
        regression = task in REGRESSION_TASKS
        missing = -1.0 if not regression else 0.0
        preds = np.array([[missing if v is None else float(v) for v in row]
                          for row in r.extracted])
        labels = np.asarray(labels_fn(r.config, r.test_ids), dtype=np.float64)
        if not regression:
            preds, labels = preds.astype(np.int64), labels.astype(np.int64)
        out.append((preds, labels))
    return out


def task_labels(config: dict, ids) -> np.ndarray:
    """Gold labels `[N]` of a GLUE task's test examples (GLUE's validation split), by id."""
    from psm.data import sources
    task = config["task"]
    root = task.get("data_dir") or os.environ.get("PSM_DATA_DIR", "") or None
    records = sources.load(task["name"], "validation", manual_dir=root)
    by_id = {int(r["id"]): r["label"] for r in records}
    missing = [int(i) for i in ids if int(i) not in by_id]
    if missing:
        raise ValueError(f"test ids {missing[:10]} are not in {task['name']}/validation")
    return np.array([by_id[int(i)] for i in ids])


# ------------------------------------------------------------------------------ command

def command_line(argv=None) -> str:
    argv = sys.argv if argv is None else argv
    return "python -m psm.experiment " + " ".join(shlex.quote(a) for a in argv[1:])


def main(argv) -> None:
    from absl import flags
    from absl import logging as absl_logging

    from psm import experiment_report

    if len(argv) > 1:
        from absl import app
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if absl_logging.get_verbosity() < absl_logging.INFO or not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("psm").setLevel(logging.INFO)
    workdir, seeds = _WORKDIR.value, _SEEDS.value
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if _DRAWS.value < 1:
        raise ValueError(f"--draws must be >= 1, got {_DRAWS.value}")
    config = _CONFIG.value
    command = command_line()
    if config is None and not _REPORT_ONLY.value:
        raise ValueError("--config is required unless --report_only")
    if config is not None and not _REPORT_ONLY.value:
        from psm.training import trainer
        try:  # before any seed folder is written
            trainer.validate_config(config)
        except ValueError as e:
            raise ValueError(f"invalid config: {e}") from e
    if _REPORT_ONLY.value:
        if config is not None:
            check_seed_folders(config, workdir, seeds)
        # The command that trained the seeds, when this workdir recorded one.
        saved = os.path.join(workdir, "experiment.json")
        if os.path.exists(saved):
            command = _read_json(saved).get("command", command)
    else:
        check_seed_folders(config, workdir, seeds)
        wd.check_writable(workdir)
        os.makedirs(workdir, exist_ok=True)
        wd.write_json(workdir, "experiment.json", {
            "command": command, "seeds": seeds, "base_data_seed": int(config.data_seed),
            "config": wd.config_to_dict(config)})
        run_seeds(config, workdir, seeds)
    runs = load_seeds(workdir, seeds)
    metric = task_metric(runs[0].config["task"]["name"], _METRIC.value)
    report = experiment_report.build_report(runs, metric, draws=_DRAWS.value,
                                            bootstrap_seed=_BOOTSTRAP_SEED.value,
                                            command=command)
    paths = experiment_report.write_report(workdir, runs, report)
    print(experiment_report.summary(report))
    print("\n".join(paths))


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "A config file, e.g. configs/tiny.py (add :variant to pick one).",
        lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Experiment folder: seed<s>/ runs and "
                                   "the report.", required=True)
    _SEEDS = flags.DEFINE_integer("seeds", 3, "Number of data seeds (data_seed + 0 .. "
                                  "seeds - 1).")
    _REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Rebuild the report from the "
                                     "seed folders without training.")
    _DRAWS = flags.DEFINE_integer("draws", stats.DRAWS, "Bootstrap resamples.")
    _BOOTSTRAP_SEED = flags.DEFINE_integer("bootstrap_seed", 0, "Seed of the resamples.")
    _METRIC = flags.DEFINE_string("metric", "", f"Test metric, one of {sorted(stats.METRICS)}"
                                  " ('' = the task's: accuracy, or mcc/f1/pearson for "
                                  "CoLA/MRPC/STS-B).")
    from psm import cli
    cli.run_absl(main)
