"""Inputs that used to give a wrong result with exit status 0.

- the TFDS cache served the first data folder's records for any later one;
- `psm.models.convert` left an old folder's shards and index beside the new
  file, and psm's reader then returned the old weights;
- `psm.merge --out=<file> --overwrite` left a `.<name>.tmp-*` file behind;
- `psm.evaluate --replica/--merge` on a single model was silently ignored.
"""

import json
import os

import jax
import numpy as np
import pytest

from psm import atomic_out
from psm import evaluate as ev
from psm.merge import streaming as S
from psm.data import jsonl, sources
from psm.models import convert
from psm.models.hf_llama import load_hf_llama, save_hf_llama
from psm.models.llama import LlamaConfig
from psm.training.pretrain import init_params

# ---- the data cache is keyed by the source files -------------------------------------------


def _gsm8k_root(root, questions, test=("t",)):
    d = root / "gsm8k"
    d.mkdir(parents=True, exist_ok=True)
    for name, qs in (("train.jsonl", questions), ("test.jsonl", test)):
        (d / name).write_text("".join(json.dumps({"question": q, "answer": "x #### 1"}) + "\n"
                                      for q in qs))
    return str(root)


def _questions(records):
    return [r["question"] for r in records]


def test_cache_follows_the_data_folder(tmp_path):
    cache = str(tmp_path / "cache")
    a = _gsm8k_root(tmp_path / "a", ["a0", "a1"])
    b = _gsm8k_root(tmp_path / "b", ["b0", "b1", "b2"])
    assert _questions(sources.load("gsm8k", "train", data_dir=cache, manual_dir=a)) == \
        ["a0", "a1"]
    assert _questions(sources.load("gsm8k", "train", data_dir=cache, manual_dir=b)) == \
        ["b0", "b1", "b2"]
    # Back to the first folder, and reused while nothing changes.
    assert _questions(sources.load("gsm8k", "train", data_dir=cache, manual_dir=a)) == \
        ["a0", "a1"]
    built = os.path.join(sources.builder("gsm8k", data_dir=cache, manual_dir=a).data_dir,
                         sources.SOURCE_FILE)
    stamp = os.stat(built).st_mtime_ns
    sources.load("gsm8k", "train", data_dir=cache, manual_dir=a)
    assert os.stat(built).st_mtime_ns == stamp


def test_cache_is_built_by_one_process_at_a_time(tmp_path):
    """A second builder (another process: parallel tests, two runs started together) waits
    for the cache lock instead of building into the same folder, then uses that cache."""
    import subprocess
    import sys
    import textwrap
    cache, done = str(tmp_path / "cache"), tmp_path / "holder_built"
    root = _gsm8k_root(tmp_path / "a", ["a0", "a1"])
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time
        from psm.data import sources
        with sources.cache_lock({cache!r}, "gsm8k"):
            print("locked", flush=True)
            time.sleep(3)
            # What `sources.builder` does under the lock (calling it here would wait for
            # this very lock).
            sources._prepared(sources.task_spec("gsm8k"), "gsm8k", {cache!r}, {{}},
                              sources.epath.Path({root!r}) / "gsm8k")
            pathlib.Path({str(done)!r}).touch()
        """)], stdout=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert holder.stdout.readline().strip() == "locked"
        records = sources.load("gsm8k", "train", data_dir=cache, manual_dir=root)
        assert done.exists(), "built while another process held the cache lock"
    finally:
        assert holder.wait(timeout=120) == 0
    assert _questions(records) == ["a0", "a1"]


def test_cache_is_rebuilt_when_a_file_changes_in_place(tmp_path):
    cache = str(tmp_path / "cache")
    a = _gsm8k_root(tmp_path / "a", ["a0", "a1"])
    sources.load("gsm8k", "train", data_dir=cache, manual_dir=a)
    path = tmp_path / "a" / "gsm8k" / "train.jsonl"
    before = os.stat(path)
    _gsm8k_root(tmp_path / "a", ["c0", "c1"])  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert _questions(sources.load("gsm8k", "train", data_dir=cache, manual_dir=a)) == \
        ["c0", "c1"]


def test_empty_or_corrupt_train_file_in_a_new_folder_is_an_error(tmp_path):
    cache = str(tmp_path / "cache")
    sources.load("gsm8k", "train", data_dir=cache,
                 manual_dir=_gsm8k_root(tmp_path / "a", ["a0", "a1"]))
    empty = _gsm8k_root(tmp_path / "empty", [])
    with pytest.raises(jsonl.DataFormatError,
                       match=r"empty/gsm8k/train\.jsonl: no records in this file; the 'train' "
                             "split"):
        sources.load("gsm8k", "train", data_dir=cache, manual_dir=empty)
    bad = _gsm8k_root(tmp_path / "bad", ["b0"])
    with open(tmp_path / "bad" / "gsm8k" / "train.jsonl", "a") as f:
        f.write('{"question": "q", "answer": }\n')
    with pytest.raises(jsonl.DataFormatError, match=r"train\.jsonl:2:\d+: invalid JSON"):
        sources.load("gsm8k", "train", data_dir=cache, manual_dir=bad)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


_SST2_HEADER = "sentence\tlabel\n"
# task -> (files {relative path: text} with one empty split, the empty file named)
_EMPTY_SPLITS = {
    "gsm8k": ({"gsm8k/train.jsonl": '{"question": "q", "answer": "a #### 1"}\n',
               "gsm8k/test.jsonl": "\n\n"}, "gsm8k/test.jsonl"),
    "humaneval": ({"humaneval/HumanEval.jsonl": ""}, "humaneval/HumanEval.jsonl"),
    "alpaca_full": ({"alpaca/alpaca_data.json": "[]"}, "alpaca/alpaca_data.json"),
    "sst2": ({"glue/glue_data/SST-2/train.tsv": _SST2_HEADER,  # a header, no rows
              "glue/glue_data/SST-2/dev.tsv": _SST2_HEADER + "good\t1\n",
              "glue/glue_data/SST-2/test.tsv": "index\tsentence\n0\tok\n"},
             "glue/glue_data/SST-2/train.tsv"),
}


@pytest.mark.parametrize("task", sorted(_EMPTY_SPLITS))
def test_an_empty_split_file_is_named(tmp_path, task):
    """A split read from an empty file names that file (TFDS alone says "No examples
    were yielded"), and the commands report it as a user error (one line, exit 2)."""
    from psm import cli
    files, empty = _EMPTY_SPLITS[task]
    for rel, text in files.items():
        _write(tmp_path / "data" / rel, text)
    split = sources.task_spec(task).splits[0]
    with pytest.raises(jsonl.DataFormatError) as raised:
        sources.load(task, split, data_dir=str(tmp_path / "cache"),
                     manual_dir=str(tmp_path / "data"))
    assert f"{tmp_path / 'data' / empty}: no records in this file" in str(raised.value)
    assert cli.is_user_error(raised.value)


def test_cache_dir_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.CACHE_DIR_ENV, str(tmp_path / "env-cache"))
    root = _gsm8k_root(tmp_path / "a", ["a0"])
    assert _questions(sources.load("gsm8k", "train", manual_dir=root)) == ["a0"]
    assert os.path.isdir(tmp_path / "env-cache" / "gsm8k")


# ---- convert: atomic, never mixed with an old folder ----------------------------------------

def _tiny_hf(path, seed, **kw):
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                      num_heads=2, num_kv_heads=1, max_seq_len=32)
    _, params = init_params(cfg, seed)
    save_hf_llama(str(path), cfg, params, **kw)
    return params


def _embed(path):
    _, params = load_hf_llama(str(path))
    return np.asarray(jax.tree.leaves(params)[0])


def test_convert_refuses_a_non_empty_destination(tmp_path, capsys):
    _tiny_hf(tmp_path / "src", seed=1)
    old = tmp_path / "out"
    _tiny_hf(old, seed=2, max_shard_bytes=2048)  # sharded: index + shards
    before = sorted(os.listdir(old))
    with pytest.raises(SystemExit) as e:
        convert.main(["--kind", "hf", "--path", str(tmp_path / "src"), "--out", str(old)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "out exists (a folder that is not empty); pass --overwrite" in err
    assert sorted(os.listdir(old)) == before


def test_convert_overwrite_replaces_the_whole_folder(tmp_path):
    _tiny_hf(tmp_path / "src", seed=1)
    out = tmp_path / "out"
    _tiny_hf(out, seed=2, max_shard_bytes=2048)
    assert "model.safetensors.index.json" in os.listdir(out)
    convert.main(["--kind", "hf", "--path", str(tmp_path / "src"), "--out", str(out),
                  "--overwrite"])
    assert "model.safetensors.index.json" not in os.listdir(out)
    assert not [f for f in os.listdir(out) if f.startswith("model-")]
    np.testing.assert_array_equal(_embed(out), _embed(tmp_path / "src"))
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no temporary folder left
    # An empty folder is a fine destination without --overwrite.
    (tmp_path / "empty").mkdir()
    convert.main(["--kind", "hf", "--path", str(tmp_path / "src"), "--out",
                  str(tmp_path / "empty")])
    np.testing.assert_array_equal(_embed(tmp_path / "empty"), _embed(tmp_path / "src"))


def test_convert_flags_have_help(capsys):
    with pytest.raises(SystemExit):
        convert.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--kind {smollm2,minilm,gguf,hf} source format",
                  "--path PATH source GGUF file or HF folder",
                  "--out OUT output folder; must not exist or be empty unless --overwrite",
                  "--overwrite replace an existing --out",
                  "--dtype {float32,bfloat16,float16} tensor dtype on disk",
                  "--max-shard-gb MAX_SHARD_GB largest safetensors shard in GiB"):
        assert words in text, words


# ---- psm.merge --out=<file> --overwrite -------------------------------------------------------

def test_merge_overwriting_a_file_leaves_no_temporary_file(tmp_path):
    for i in range(2):
        _tiny_hf(tmp_path / f"m{i}", seed=i)
    out = tmp_path / "merged"
    out.write_text("an old file in the way")
    S.merge_checkpoints([str(tmp_path / "m0"), str(tmp_path / "m1")], str(out),
                        method="average", overwrite=True, progress=False, log=lambda s: None)
    assert os.path.isdir(out)
    assert sorted(os.listdir(tmp_path)) == ["m0", "m1", "merged"], os.listdir(tmp_path)


def test_stale_temporary_file_of_a_dead_process_is_removed(tmp_path):
    out = tmp_path / "merged"
    stale = f"{atomic_out.tmp_prefix(str(out))}999999999-abcdef01"
    with open(stale, "w") as f:
        f.write("left by a killed run")
    atomic_out.clean_stale(str(out))
    assert not os.path.exists(stale)


# ---- psm.evaluate: --replica / --merge need a workdir ----------------------------------------

@pytest.mark.parametrize("flag", [{"replica": 1}, {"merge": "average"}])
def test_evaluate_refuses_replica_or_merge_for_a_single_model(tmp_path, flag):
    from configs import tiny
    _tiny_hf(tmp_path / "hf", seed=0)
    with pytest.raises(ValueError, match=r"needs a psm training workdir.*Hugging Face "
                                         r"folder, a single model"):
        ev.load_models(tiny.get_config("test"), str(tmp_path / "hf"), **flag)
    (tmp_path / "orbax").mkdir()
    with pytest.raises(ValueError, match="an orbax checkpoint of one tree"):
        ev.load_models(tiny.get_config("test"), str(tmp_path / "orbax"), **flag)


def test_evaluate_refuses_replica_and_merge_together(tmp_path):
    from configs import tiny
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="exclude each other"):
        ev.load_models(tiny.get_config("test"), str(tmp_path), merge="average", replica=0)
