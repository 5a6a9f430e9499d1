"""Every config value is checked before anything is written or computed.

Several bad values used to fail only after the base was pre-trained, with
config.json already in the workdir, so the rerun with the corrected value was
refused as "a different config"; a negative learning rate trained by gradient
ascent and exited 0. A misspelt `--config.` key gave three chained tracebacks.
"""

import json
import logging
import os
import subprocess
import sys

import pytest

from configs import tiny
from psm.training import trainer
from psm.training import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("key, value, match", [
    ("optim.schedule", "nope", r"config\.optim\.schedule must be one of"),
    ("optim.learning_rate", -1e-3, r"config\.optim\.learning_rate must be a finite number > 0"),
    ("optim.warmup_steps", -5, r"config\.optim\.warmup_steps must be >= 0"),
    ("model.num_heads", 3, r"config\.model\.num_heads \(3\) must be a multiple of "
                           r"config\.model\.num_kv_heads \(2\)"),
    ("model.num_kv_heads", 3, r"config\.model\.num_heads \(4\) must be a multiple"),
    ("model.hidden_size", 30, r"config\.model\.hidden_size \(30\) must be divisible by "
                              r"config\.model\.num_heads \(4\)"),
    ("model.dtype", "float8", r"config\.model\.dtype must be one of"),
    ("model.param_dtype", "fp32", r"config\.model\.param_dtype must be one of"),
    ("checkpoint.every_steps", 0, r"config\.checkpoint\.every_steps must be >= 1"),
    ("checkpoint.keep", 0, r"config\.checkpoint\.keep must be >= 1"),
    ("mesh.data", 3, r"config\.mesh\.data \(3\) must divide config\.train\.batch_size"),
    ("mesh.replica", 64, r"config\.mesh asks for 64 x 1 devices"),
    ("merge.methods", ("average", "mean"), r"config\.merge\.methods has unknown methods"),
    ("export.dtype", "int8", r"config\.export\.dtype must be"),
    ("pretrain.steps", 0, r"config\.pretrain\.steps must be >= 1"),
    ("pretrain.learning_rate", -1.0, r"config\.pretrain\.learning_rate must be"),
    ("pretrain.qa_fraction", 1.5, r"config\.pretrain\.qa_fraction must be a number in \[0, 1\]"),
    ("eval.batch_size", 0, r"config\.eval\.batch_size must be >= 1"),
    ("model.remat", "partial", r"config\.model\.remat must be one of \['none', 'full', "
                               r"'dots_saveable'\]"),
    ("model.attention", "flash", r"config\.model\.attention must be one of \['auto', 'xla', "
                                 r"'cudnn'\]"),
    ("model.attention", "cudnn", r"config\.model\.attention='cudnn' needs"),  # a GPU / bf16
    ("train.loss_chunk", -1, r"config\.train\.loss_chunk must be an int >= 0"),
    ("task.pad_to_multiple", 16, r"config\.task\.pad_to_multiple=16 cuts the padding of "
                                 r"BERT batches"),
])
def test_bad_value_fails_before_anything_is_written(tmp_path, key, value, match):
    config = tiny.get_config("test")
    section, name = key.split(".")
    with config.unlocked():
        config[section][name] = value
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        trainer.train_and_evaluate(config, str(workdir))
    assert not workdir.exists(), sorted(os.listdir(workdir))


def test_model_kind_is_checked_for_pretrained_models():
    from configs import gsm8k
    config = gsm8k.get_config()
    config.model.kind = "llama3"
    with pytest.raises(ValueError, match=r"config\.model\.kind must be one of"):
        trainer.validate_config(config)


def _write_failed_start(workdir, config):
    os.makedirs(workdir / "checkpoints")
    (workdir / "config.json").write_text(json.dumps(wd.config_to_dict(config)))
    os.makedirs(workdir / "base" / "6")  # a cached base of the old config


def test_failed_start_is_reused_with_a_changed_config(tmp_path, caplog):
    old, new = tiny.get_config("test"), tiny.get_config("test")
    old.pretrain.learning_rate = -3e-3  # what a run without validation left behind
    workdir = tmp_path / "run"
    _write_failed_start(workdir, old)
    with caplog.at_level(logging.WARNING, logger="psm.training.workdir"):
        assert wd.prepare(str(workdir), new) is True
    assert "only a failed start" in caplog.text and "pretrain.learning_rate" in caplog.text
    assert json.loads((workdir / "config.json").read_text()) == wd.config_to_dict(new)
    assert not (workdir / "base").exists()  # made for the old config: pre-trained again
    assert wd.prepare(str(workdir), new) is True  # and now it resumes quietly


@pytest.mark.parametrize("progress", ["checkpoint", "results"])
def test_workdir_with_progress_is_still_refused(tmp_path, progress):
    old, new = tiny.get_config("test"), tiny.get_config("test")
    new.optim.learning_rate = 5e-4
    workdir = tmp_path / "run"
    _write_failed_start(workdir, old)
    if progress == "checkpoint":
        os.makedirs(workdir / "checkpoints" / "6")
    else:
        (workdir / "results.json").write_text("{}")
    with pytest.raises(ValueError, match=r"different config \(differing keys: "
                                         r"optim\.learning_rate\)"):
        wd.prepare(str(workdir), new)


@pytest.mark.parametrize("progress", ["checkpoint", "results"])
def test_a_trained_run_may_change_only_what_happens_after_training(tmp_path, caplog, progress):
    """merge.* / export.* act after the last step: a trained run takes new values (and its
    stale results.json goes, so a killed re-evaluation is not read as finished); any
    training key in the difference still refuses the workdir, naming only that key."""
    old = tiny.get_config("test")
    workdir = tmp_path / "run"
    _write_failed_start(workdir, old)
    os.makedirs(workdir / "checkpoints" / "6")
    if progress == "results":
        (workdir / "results.json").write_text("{}")
    new = tiny.get_config("test")
    new.merge.storage_dtype, new.export.hf = "bfloat16", ()
    with caplog.at_level(logging.WARNING, logger="psm.training.workdir"):
        assert wd.prepare(str(workdir), new) is True
    assert "differs only after training (export.hf, merge.storage_dtype)" in caplog.text
    assert json.loads((workdir / "config.json").read_text()) == wd.config_to_dict(new)
    assert not (workdir / "results.json").exists()
    assert (workdir / "base" / "6").is_dir()  # the base does not depend on merge keys

    newer = tiny.get_config("test")
    newer.merge.resample, newer.optim.learning_rate = 5, 5e-4
    with pytest.raises(ValueError, match=r"differing keys: optim\.learning_rate\); .*only "
                                         r"keys under merge, export may change"):
        wd.prepare(str(workdir), newer)


@pytest.mark.parametrize("remat", [False, True])
def test_a_run_written_before_the_speed_options_still_resumes(tmp_path, remat):
    """config.json of an older psm: model.remat a bool, no model.attention,
    train.loss_chunk, train.packing or task.pad_to_multiple. Rerunning the same config (remat spelt as
    today's name) resumes; packing the old run's batches now is another config."""
    new = tiny.get_config("test")
    new.model.remat = "full" if remat else "none"
    old = wd.config_to_dict(new)
    old["model"]["remat"] = remat
    del old["model"]["attention"], old["train"]["loss_chunk"], old["train"]["packing"]
    del old["task"]["pad_to_multiple"]
    workdir = tmp_path / "run"
    os.makedirs(workdir / "checkpoints" / "6")
    (workdir / "config.json").write_text(json.dumps(old))
    assert wd.prepare(str(workdir), new) is True
    other = tiny.get_config("test")
    other.model.remat = "none" if remat else "full"
    with pytest.raises(ValueError, match=r"differing keys: model\.remat\)"):
        wd.prepare(str(workdir), other)
    packed = tiny.get_config("test")
    packed.model.remat = new.model.remat
    packed.train.packing = True
    with pytest.raises(ValueError, match=r"differing keys: train\.packing\)"):
        wd.prepare(str(workdir), packed)


def _train_cli(tmp_path, *overrides):
    workdir = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "psm.train", "--config=configs/tiny.py:test",
         f"--workdir={workdir}", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return proc, workdir


def test_cli_key_typo_is_one_line_with_the_suggestion(tmp_path):
    proc, workdir = _train_cli(tmp_path, "--config.optim.learning_rte=0.1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("error: unknown config key optim.learning_rte; did you mean "
                                   "optim.learning_rate?")
    assert "Traceback" not in proc.stderr and not workdir.exists()


def test_cli_bad_value_is_one_line_and_writes_nothing(tmp_path):
    proc, workdir = _train_cli(tmp_path, "--config.optim.schedule=nope")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: invalid config: config.optim.schedule must be one of" in proc.stderr
    assert "Traceback" not in proc.stderr and not workdir.exists()
