"""Every psm command reports bad input in one line, exit status 2, writing nothing.

Each case runs the real command (`python -m psm.<command>` in a subprocess) on
a bad input and checks: exit status 2, the key / file named on stderr, no
traceback, at most two lines on stderr, and that the command's output path was
not created. The table of docs/errors.md lists the same cases.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from psm import cli

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY = "configs/tiny.py:test"


def _hf_folder(path, nan=False, config=True):
    """A 1-layer Llama HF folder (model.safetensors + config.json)."""
    from psm.models.llama import LlamaConfig
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, max_seq_len=32)
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (64, 16), "model.norm.weight": (16,),
              "lm_head.weight": (64, 16), "model.layers.0.input_layernorm.weight": (16,),
              "model.layers.0.post_attention_layernorm.weight": (16,),
              "model.layers.0.self_attn.q_proj.weight": (16, 16),
              "model.layers.0.self_attn.k_proj.weight": (8, 16),
              "model.layers.0.self_attn.v_proj.weight": (8, 16),
              "model.layers.0.self_attn.o_proj.weight": (16, 16),
              "model.layers.0.mlp.gate_proj.weight": (32, 16),
              "model.layers.0.mlp.up_proj.weight": (32, 16),
              "model.layers.0.mlp.down_proj.weight": (16, 32)}
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    if nan:
        tensors["model.norm.weight"][3] = np.nan
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if config:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg.to_hf_config(bos_token_id=1, eos_token_id=2), f)
    return str(path)


def _psm_config(**model):
    from configs import tiny
    from psm.training import workdir
    c = tiny.get_config("test")
    for k, v in model.items():
        c.model[k] = v
    return workdir.config_to_dict(c)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad inputs, built once: {name: path}."""
    from psm.training import checkpoint
    d = tmp_path_factory.mktemp("bad")
    p = {"dir": str(d)}
    p["hf1"] = _hf_folder(d / "hf1")
    p["hf2"] = _hf_folder(d / "hf2")
    p["hf_nan"] = _hf_folder(d / "hf_nan", nan=True)
    p["hf_no_config"] = _hf_folder(d / "hf_no_config", config=False)
    # A run that failed before its first checkpoint: config.json only.
    failed = d / "failed_run"
    failed.mkdir()
    (failed / "config.json").write_text(json.dumps(_psm_config()))
    p["failed_run"] = str(failed)
    # A run of another model size: config.json + a checkpoint of another tree.
    other = d / "other_run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(_psm_config(hidden_size=48)))
    ck = checkpoint.Checkpointer(str(other / "checkpoints"), interval=1, keep=1)
    ck.save(1, {"params": {"w": np.zeros((2, 3), np.float32)}})
    ck.close()
    p["other_run"] = str(other)
    (d / "text.gguf").write_text("hello, this is not a GGUF file\n")
    p["text_gguf"] = str(d / "text.gguf")
    (d / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    p["truncated_gguf"] = str(d / "truncated.gguf")
    corrupt = d / "corrupt_records"
    corrupt.mkdir()
    good = {"id": 0, "position": [0.1], "loss": {"replicas": [1.0], "merged": {}}}
    (corrupt / "per_sample.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    p["corrupt_records"] = str(corrupt)
    (d / "empty_records").mkdir()
    (d / "empty_records" / "per_sample.jsonl").write_text("")
    p["empty_records"] = str(d / "empty_records")
    seed0 = d / "exp_corrupt" / "seed0"
    seed0.mkdir(parents=True)
    (seed0 / "results.json").write_text('{"models": {}\n,,\n')
    p["exp_corrupt"] = str(d / "exp_corrupt")
    # A resumed run whose metrics.jsonl has a corrupt line (not the last).
    resumed = d / "resumed_run"
    resumed.mkdir()
    (resumed / "config.json").write_text(json.dumps(_psm_config()))
    (resumed / "metrics.jsonl").write_text('{"step": 4}\n{"step": 8, "tr\n{"step": 12}\n')
    p["resumed_run"] = str(resumed)
    (d / "damaged_run").mkdir()
    (d / "damaged_run" / "config.json").write_text('{"seed": 0,\n')  # cut off
    p["damaged_run"] = str(d / "damaged_run")
    # A finished experiment whose seed0/metrics.jsonl has a corrupt line.
    from test_experiment import write_seed
    write_seed(str(d / "exp_metrics" / "seed0"), 0)
    with open(d / "exp_metrics" / "seed0" / "metrics.jsonl", "a") as f:
        f.write('{"step": 15, "val/lo\n{"step": 20}\n')
    p["exp_metrics"] = str(d / "exp_metrics")
    (d / "a_file").write_text("")
    p["a_file"] = str(d / "a_file")
    return p


# (id, argv after `python -m`, substrings stderr must hold, substrings it must not hold,
#  paths (relative to the inputs folder) that must not exist afterwards)
CASES = [
    ("train-required-flags", ["psm.train"], ["--config is required", "--workdir is required"],
     [], []),
    ("train-missing-config-file", ["psm.train", "--config={dir}/nope.py", "--workdir={dir}/w"],
     ["nope.py", "no such file"], [], ["w"]),
    ("train-unknown-flag", ["psm.train", f"--config={TINY}", "--workdir={dir}/w", "--bogus=1"],
     ["bogus"], ["FATAL"], ["w"]),
    ("train-bad-value-type", ["psm.train", f"--config={TINY}", "--workdir={dir}/w",
                              "--config.train.batch_size=abc"],
     ["config.train.batch_size", "abc"], [], ["w"]),
    ("train-misspelt-key", ["psm.train", f"--config={TINY}", "--workdir={dir}/w",
                            "--config.optim.learning_rte=0.1"],
     ["optim.learning_rte", "did you mean optim.learning_rate"], [], ["w"]),
    ("train-negative-learning-rate", ["psm.train", f"--config={TINY}", "--workdir={dir}/w",
                                      "--config.optim.learning_rate=-1e-3"],
     ["config.optim.learning_rate must be a finite number > 0, got -0.001"], [], ["w"]),
    ("train-negative-warmup", ["psm.train", f"--config={TINY}", "--workdir={dir}/w",
                               "--config.optim.warmup_steps=-5"],
     ["config.optim.warmup_steps must be >= 0, got -5"], [], ["w"]),
    ("train-workdir-of-another-config", ["psm.train", f"--config={TINY}",
                                         "--workdir={other_run}"],
     ["other_run", "differing keys: model.hidden_size"], [], ["other_run/base"]),
    ("train-damaged-workdir-config", ["psm.train", f"--config={TINY}",
                                      "--workdir={damaged_run}"],
     ["damaged_run/config.json:2: invalid JSON"], [], ["damaged_run/base",
                                                       "damaged_run/metrics.jsonl"]),
    ("train-unwritable-workdir", ["psm.train", f"--config={TINY}", "--workdir={a_file}/w"],
     ["a_file", "not a folder"], [], []),
    ("train-resume-corrupt-metrics", ["psm.train", f"--config={TINY}",
                                      "--workdir={resumed_run}"],
     ["resumed_run/metrics.jsonl, line 2: invalid JSON"], [], ["resumed_run/base"]),
    ("evaluate-missing-checkpoint", ["psm.evaluate", f"--config={TINY}",
                                     "--checkpoint={dir}/missing", "--out={dir}/e"],
     ["missing", "no such file"], [], ["e"]),
    ("evaluate-hf-without-config-json", ["psm.evaluate", f"--config={TINY}",
                                         "--checkpoint={hf_no_config}", "--out={dir}/e"],
     ["hf_no_config", "no config.json"], ["orbax"], ["e"]),
    ("evaluate-failed-run", ["psm.evaluate", f"--config={TINY}", "--checkpoint={failed_run}",
                             "--out={dir}/e"],
     ["failed_run", "without a checkpoint"], ["architectures"], ["e"]),
    ("evaluate-config-mismatch", ["psm.evaluate", f"--config={TINY}",
                                  "--checkpoint={other_run}", "--out={dir}/e"],
     ["other_run", "model.hidden_size"], ["partial_restore"], ["e"]),
    ("evaluate-replica-of-hf-folder", ["psm.evaluate", f"--config={TINY}", "--checkpoint={hf1}",
                                       "--replica=1", "--out={dir}/e"],
     ["--replica needs a psm training workdir", "hf1", "Hugging Face folder"], [], ["e"]),
    ("evaluate-merge-of-hf-folder", ["psm.evaluate", f"--config={TINY}", "--checkpoint={hf1}",
                                     "--merge=average", "--out={dir}/e"],
     ["--merge needs a psm training workdir", "hf1", "Hugging Face folder"], [], ["e"]),
    ("evaluate-out-under-a-file", ["psm.evaluate", f"--config={TINY}", "--checkpoint={hf1}",
                                   "--out={a_file}/e"],
     ["--out", "a_file is a file, not a folder"], [], []),
    ("convert-text-as-gguf", ["psm.models.convert", "--kind=gguf", "--path={text_gguf}",
                              "--out={dir}/c"],
     ["text.gguf", "not a GGUF file"], [], ["c"]),
    ("convert-truncated-gguf", ["psm.models.convert", "--kind=gguf", "--path={truncated_gguf}",
                                "--out={dir}/c"],
     ["truncated.gguf", "truncated"], [], ["c"]),
    ("convert-missing-gguf", ["psm.models.convert", "--kind=gguf", "--path={dir}/none.gguf",
                              "--out={dir}/c"],
     ["none.gguf", "no such"], [], ["c"]),
    ("convert-hf-without-config-json", ["psm.models.convert", "--kind=hf",
                                        "--path={hf_no_config}", "--out={dir}/c"],
     ["hf_no_config", "no config.json"], [], ["c"]),
    ("convert-failed-run", ["psm.models.convert", "--kind=hf", "--path={failed_run}",
                            "--out={dir}/c"],
     ["failed_run", "psm training workdir"], ["architectures"], ["c"]),
    ("convert-bad-flag", ["psm.models.convert", "--kind=hf", "--path={hf1}", "--out={dir}/c",
                          "--max-shard-gb=x"],
     ["--max-shard-gb"], [], ["c"]),
    ("convert-out-under-a-file", ["psm.models.convert", "--kind=hf", "--path={hf1}",
                                  "--out={a_file}/c"],
     ["a_file is a file, not a folder"], [], []),
    ("merge-nan-input", ["psm.merge", "--models={hf1},{hf_nan}", "--method=average",
                         "--out={dir}/m", "--no-progress"],
     ["hf_nan", "model.norm.weight", "--allow-nonfinite"], ["allow_nonfinite="], ["m"]),
    ("merge-missing-input", ["psm.merge", "--models={hf1},{dir}/missing", "--method=average",
                             "--out={dir}/m", "--no-progress"],
     ["missing", "no such file"], [], ["m"]),
    ("merge-failed-run", ["psm.merge", "--models={hf1},{failed_run}", "--method=average",
                          "--out={dir}/m", "--no-progress"],
     ["failed_run", "without checkpoints"], ["_METADATA"], ["m"]),
    ("merge-probs-sum", ["psm.merge", "--models={hf1},{hf2}", "--method=select",
                         "--probs=0.6,0.6", "--out={dir}/m", "--no-progress"],
     ["probs", "1.2"], ["np.float64"], ["m"]),
    ("imbalance-corrupt-records", ["psm.imbalance", "--workdir={corrupt_records}"],
     ["per_sample.jsonl, line 2"], [], ["corrupt_records/plots"]),
    ("imbalance-empty-records", ["psm.imbalance", "--workdir={empty_records}"],
     ["empty_records/per_sample.jsonl holds no records"], [], ["empty_records/plots"]),
    ("imbalance-missing-records", ["psm.imbalance", "--workdir={dir}/nowhere"],
     ["nowhere/per_sample.jsonl"], [], ["nowhere"]),
    ("experiment-invalid-value", ["psm.experiment", f"--config={TINY}", "--workdir={dir}/x",
                                  "--seeds=1", "--config.optim.warmup_steps=-5"],
     ["config.optim.warmup_steps"], [], ["x"]),
    ("experiment-corrupt-results", ["psm.experiment", "--workdir={exp_corrupt}", "--seeds=1",
                                    "--report_only"],
     ["seed0/results.json:2", "invalid JSON"], [], ["exp_corrupt/RESULTS.md"]),
    ("experiment-corrupt-metrics", ["psm.experiment", "--workdir={exp_metrics}", "--seeds=1",
                                    "--report_only"],
     ["seed0/metrics.jsonl, line 3: invalid JSON"], [], ["exp_metrics/RESULTS.md"]),
]


# The CPU backend only: no probe for accelerators (seconds, and log lines on stderr).
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _run(argv, inputs, *extra):
    args = [a.format(**inputs) for a in argv] + list(extra)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=ENV)


@pytest.mark.parametrize("argv,needles,absent,unwritten",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(inputs, argv, needles, absent, unwritten):
    proc = _run(argv, inputs)
    err = proc.stderr
    # absl INFO/WARNING log lines (JAX's backend probe) are not the error report.
    lines = [ln for ln in err.splitlines() if ln.strip() and not re.match(r"[IW]\d{4} ", ln)]
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) <= 2, err[-3000:]
    for needle in needles:
        assert needle in err, (needle, err)
    for word in absent:
        assert word not in err, (word, err)
    for rel in unwritten:
        assert not os.path.exists(os.path.join(inputs["dir"], rel)), rel


def test_verbose_adds_the_traceback(inputs):
    proc = _run(["psm.models.convert", "--kind=gguf", "--path={text_gguf}", "--out={dir}/c"],
                inputs, "--verbose")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_merge_models_with_spaces_after_commas_overwriting_a_file(inputs, tmp_path):
    """`--models='a, b'` names a and b; `--out=<file> --overwrite` replaces the file and
    leaves no `.<name>.tmp-*` entry beside it (one command checks both)."""
    out = tmp_path / "spaced"
    out.write_text("an old file in the way")
    proc = _run(["psm.merge", "--models={hf1}, {hf2}", "--method=average", f"--out={out}",
                 "--overwrite", "--no-progress"], inputs)
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert os.listdir(tmp_path) == ["spaced"], os.listdir(tmp_path)


def test_train_help_lists_config_keys():
    proc = subprocess.run([sys.executable, "-m", "psm.train", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=ENV)
    text = proc.stdout + proc.stderr
    assert "--config.optim.learning_rate = " in text, text[:2000]
    assert "configs/common.py" in text
    assert "--verbose" in text


def test_convert_help_describes_every_flag():
    proc = subprocess.run([sys.executable, "-m", "psm.models.convert", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr
    options = proc.stdout.split("options:", 1)[1]
    # argparse puts a flag's help on its line or on the next, more indented one.
    entries = re.split(r"\n  (?=-)", "\n" + options)[1:]
    flags = [e.split()[0].rstrip(",") for e in entries]
    assert {"--kind", "--path", "--out", "--overwrite", "--dtype", "--max-shard-gb",
            "--verbose"} <= set(flags), flags
    for entry in entries:
        words = re.sub(r"\{[^}]*\}", "", entry).split()
        described = [w for w in words[1:] if not w.startswith("-") and not w.isupper()]
        assert described, f"no help text for {entry.strip()!r}"


def test_user_errors_and_bugs_are_told_apart():
    from psm.merge import streaming
    with pytest.raises(ValueError) as psm_raised:
        streaming.parse_size("-1")
    assert cli.is_user_error(psm_raised.value)
    with pytest.raises(ValueError) as numpy_raised:
        np.zeros(3).reshape(2)
    assert not cli.is_user_error(numpy_raised.value)  # a bug: keeps its traceback
    assert cli.is_user_error(FileNotFoundError(2, "No such file or directory", "x"))
    assert cli.one_line(PermissionError(13, "Permission denied", "/x")) == \
        "/x: permission denied"
    assert not cli.is_user_error(KeyError("k"))


def test_evaluate_merge_choices_are_the_trainers():
    from psm import evaluate
    from psm.training import trainer
    assert evaluate.MERGE_CHOICES == trainer.MERGE_METHODS
