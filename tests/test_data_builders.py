"""Dataset builders and `psm.data.sources.load` on the shared data, offline.

Expected counts come from the datasets' own documentation (the LICENSE.md
notes beside the data and the papers), and record contents are checked
against the raw files read here with the standard library.
"""

import csv
import gzip
import json
import os
import sys
import time

import pytest

from psm.data import jsonl, sources
from psm.data.builders import MissingDataError, hendrycks_math

# (task, split) -> number of examples, as documented by each source.
EXPECTED_COUNTS = {
    ("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319,
    ("math", "train"): 7500, ("math", "test"): 5000,
    ("humaneval", "test"): 164,
    ("alpaca_1k", "train"): 1000,
    ("cola", "train"): 8551, ("cola", "validation"): 1043, ("cola", "test"): 1063,
    ("sst2", "train"): 67349, ("sst2", "validation"): 872, ("sst2", "test"): 1821,
    ("mrpc", "train"): 3668, ("mrpc", "validation"): 408, ("mrpc", "test"): 1725,
    ("rte", "train"): 2490, ("rte", "validation"): 277, ("rte", "test"): 3000,
    ("stsb", "train"): 5749, ("stsb", "validation"): 1500, ("stsb", "test"): 1379,
    ("wnli", "train"): 635, ("wnli", "validation"): 71, ("wnli", "test"): 146,
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def loaded(shared_data_dir, cache_dir):
    """Every (task, split) loaded once from the shared data into a fresh cache."""
    return {key: sources.load(*key, data_dir=cache_dir, manual_dir=shared_data_dir)
            for key in EXPECTED_COUNTS}


def test_counts_and_dense_ids(loaded):
    for key, n in EXPECTED_COUNTS.items():
        recs = loaded[key]
        assert len(recs) == n, key
        assert [r["id"] for r in recs] == list(range(n)), key


def test_no_tensorflow_and_array_record_files(loaded, cache_dir):
    assert "tensorflow" not in sys.modules
    files = [f for _, _, fs in os.walk(cache_dir) for f in fs]
    assert any(".array_record-" in f for f in files)
    assert not any(".tfrecord" in f for f in files)


def test_builder_random_access(loaded, cache_dir, shared_data_dir):
    b = sources.builder("gsm8k", data_dir=cache_dir, manual_dir=shared_data_dir)
    src = b.as_data_source(split="test")
    assert len(src) == 1319
    for i in (0, 700, 1318):
        assert int(src[i]["id"]) == i
        assert src[i]["question"].decode() == loaded[("gsm8k", "test")][i]["question"]


def test_gsm8k_matches_raw_lines(loaded, shared_data_dir):
    for split in ("train", "test"):
        with open(os.path.join(shared_data_dir, "gsm8k", f"{split}.jsonl")) as f:
            raw = [json.loads(line) for line in f if line.strip()]
        recs = loaded[("gsm8k", split)]
        for i in (0, 1, len(raw) // 2, len(raw) - 1):
            assert recs[i]["question"] == raw[i]["question"]
            assert recs[i]["answer"] == raw[i]["answer"]
            assert "####" in recs[i]["answer"]


def test_humaneval_fields(loaded, shared_data_dir):
    with gzip.open(os.path.join(shared_data_dir, "humaneval", "HumanEval.jsonl.gz"), "rt") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    recs = loaded[("humaneval", "test")]
    for r, x in zip(recs, raw):
        assert r["task_id"] == f"HumanEval/{r['id']}" == x["task_id"]
        for k in ("prompt", "canonical_solution", "test", "entry_point"):
            assert r[k] == x[k]
    assert "def check(candidate)" in recs[0]["test"]


def test_alpaca_sample_matches_raw(loaded, shared_data_dir):
    with open(os.path.join(shared_data_dir, "alpaca", "alpaca_data_1k.json")) as f:
        raw = json.load(f)
    recs = loaded[("alpaca_1k", "train")]
    assert [(r["instruction"], r["input"], r["output"]) for r in recs] == \
        [(x["instruction"], x["input"], x["output"]) for x in raw]
    assert sum(r["input"] != "" for r in recs) == 392  # stated in the data's LICENSE.md


def test_math_keys_levels_subjects(loaded, shared_data_dir):
    for split in ("train", "test"):
        recs = loaded[("math", split)]
        # id order: subjects in SUBJECTS order, then numeric file stem.
        keys = [(hendrycks_math.SUBJECTS.index(r["subject"]), int(r["source_key"].split("/")[1]
                                                                  [:-5])) for r in recs]
        assert keys == sorted(keys)
        for subject in hendrycks_math.SUBJECTS:
            n_files = len(os.listdir(os.path.join(shared_data_dir, "math", split, subject)))
            assert sum(r["subject"] == subject for r in recs) == n_files
        for r in recs[::997]:
            with open(os.path.join(shared_data_dir, "math", split, r["source_key"])) as f:
                raw = json.load(f)
            assert (r["problem"], r["solution"], r["type"]) == \
                (raw["problem"], raw["solution"], raw["type"])
            assert raw["level"] == (f"Level {r['level']}" if r["level"] > 0 else "Level ?")
    levels = [r["level"] for r in loaded[("math", "train")]]
    assert levels.count(-1) == 2 and set(levels) == {-1, 1, 2, 3, 4, 5}
    assert all("\\boxed" in r["solution"] for r in loaded[("math", "test")][:50])


def _read_tsv(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_glue_labels_match_tsv(loaded, shared_data_dir):
    g = os.path.join(shared_data_dir, "glue", "glue_data")
    sst = _read_tsv(os.path.join(g, "SST-2", "dev.tsv"))[1:]
    assert [(r["sentence"], r["label"]) for r in loaded[("sst2", "validation")]] == \
        [(s, int(label)) for s, label in sst]
    rte = _read_tsv(os.path.join(g, "RTE", "train.tsv"))[1:]
    assert [r["label"] for r in loaded[("rte", "train")]] == \
        [{"entailment": 0, "not_entailment": 1}[row[3]] for row in rte]
    cola = _read_tsv(os.path.join(g, "CoLA", "train.tsv"))  # no header
    assert [(r["sentence"], r["label"]) for r in loaded[("cola", "train")]] == \
        [(row[3], int(row[1])) for row in cola]
    stsb = _read_tsv(os.path.join(g, "STS-B", "dev.tsv"))[1:]
    got = [r["label"] for r in loaded[("stsb", "validation")]]
    assert got == pytest.approx([float(row[9]) for row in stsb], abs=1e-6)
    for task in ("cola", "sst2", "mrpc", "rte", "stsb", "wnli"):
        assert {r["label"] for r in loaded[(task, "test")]} == {-1}


def test_mrpc_built_from_raw_files(loaded, shared_data_dir):
    m = os.path.join(shared_data_dir, "glue", "glue_data", "MRPC")
    dev_pairs = {tuple(r[:2]) for r in _read_tsv(os.path.join(m, "dev_ids.tsv"))}
    raw = _read_tsv(os.path.join(m, "msr_paraphrase_train.txt"))[1:]
    train, dev = loaded[("mrpc", "train")], loaded[("mrpc", "validation")]
    assert len(train) + len(dev) == len(raw)
    for r in dev:
        row = raw[r["idx"]]
        assert (row[1], row[2]) in dev_pairs
        assert (r["sentence1"], r["label"]) == (row[3], int(row[0]))
    assert all((raw[r["idx"]][1], raw[r["idx"]][2]) not in dev_pairs for r in train)


def test_rebuild_gives_same_records(loaded, shared_data_dir, tmp_path):
    for key in (("humaneval", "test"), ("mrpc", "train"), ("gsm8k", "test")):
        again = sources.load(*key, data_dir=str(tmp_path), manual_dir=shared_data_dir)
        assert again == loaded[key]


def test_env_var_is_default_manual_dir(shared_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PSM_DATA_DIR", shared_data_dir)
    recs = sources.load("humaneval", "test", data_dir=str(tmp_path))
    assert len(recs) == 164


# --- errors -----------------------------------------------------------------


def test_unknown_task_lists_known(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'gsm9k'.*gsm8k.*sst2"):
        sources.load("gsm9k", "train", data_dir=str(tmp_path), manual_dir=str(tmp_path))


def test_missing_split(tmp_path):
    with pytest.raises(ValueError, match=r"no split 'validation'.*\('train', 'test'\)"):
        sources.load("gsm8k", "validation", data_dir=str(tmp_path), manual_dir=str(tmp_path))


def test_missing_manual_folder(tmp_path):
    with pytest.raises(MissingDataError, match="does-not-exist.*does not exist"):
        sources.load("gsm8k", "train", data_dir=str(tmp_path / "c"),
                     manual_dir=str(tmp_path / "does-not-exist"))
    # Root present, dataset folder absent: names the folder and the files.
    with pytest.raises(MissingDataError, match=r"gsm8k does not exist(.|\n)*train\.jsonl"):
        sources.load("gsm8k", "train", data_dir=str(tmp_path / "c"), manual_dir=str(tmp_path))


def test_incomplete_manual_folder_names_missing_file(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(MissingDataError, match=r"lacks \['test.jsonl'\]"):
        sources.load("gsm8k", "train", data_dir=str(tmp_path / "c"), manual_dir=str(tmp_path))
    glue = tmp_path / "glue" / "glue_data" / "RTE"
    glue.mkdir(parents=True)
    (glue / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(MissingDataError, match="RTE/dev.tsv"):
        sources.load("rte", "train", data_dir=str(tmp_path / "c"), manual_dir=str(tmp_path))


def test_no_data_and_no_network_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("PSM_DATA_DIR", raising=False)
    monkeypatch.setenv("PSM_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(MissingDataError, match=r"PSM_OFFLINE(.|\n)*HumanEval\.jsonl\.gz"):
        sources.load("humaneval", "test", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10


def test_malformed_jsonl_in_builder_names_file_and_line(tmp_path):
    d = tmp_path / "gsm8k"
    d.mkdir()
    good = json.dumps({"question": "q", "answer": "a #### 1"})
    (d / "test.jsonl").write_text(good + "\n")
    (d / "train.jsonl").write_text(f"{good}\n\n{good}\n{{\"question\": \"q\", \"answer\": }}\n")
    with pytest.raises(jsonl.DataFormatError, match=r"train\.jsonl:4:\d+: invalid JSON"):
        sources.load("gsm8k", "train", data_dir=str(tmp_path / "c"), manual_dir=str(tmp_path))


def test_malformed_math_file_is_named(tmp_path):
    for split in ("train", "test"):
        for s in hendrycks_math.SUBJECTS:
            (tmp_path / "math" / split / s).mkdir(parents=True)
    good = {"problem": "p", "level": "Level 2", "type": "Algebra", "solution": "\\boxed{1}"}
    (tmp_path / "math" / "test" / "algebra" / "3.json").write_text(json.dumps(good))
    (tmp_path / "math" / "train" / "geometry" / "7.json").write_text('{"problem": "p",\n  oops}')
    with pytest.raises(jsonl.DataFormatError, match=r"geometry/7\.json:2:\d+: invalid JSON"):
        sources.load("math", "train", data_dir=str(tmp_path / "c"), manual_dir=str(tmp_path))


def test_alpaca_picks_full_file_then_sample(tmp_path):
    rec = {"instruction": "Say hi.", "input": "", "output": "hi"}
    folder = tmp_path / "alpaca"
    folder.mkdir()
    with pytest.raises(MissingDataError, match="alpaca_data.json.*alpaca_data_1k.json"):
        sources.load("alpaca", "train", data_dir=str(tmp_path / "c"), manual_dir=str(tmp_path))
    (folder / "alpaca_data_1k.json").write_text(json.dumps([rec] * 2))
    assert len(sources.load("alpaca", "train", data_dir=str(tmp_path / "c"),
                            manual_dir=str(tmp_path))) == 2
    (folder / "alpaca_data.json").write_text(json.dumps([rec] * 3))
    assert len(sources.load("alpaca", "train", data_dir=str(tmp_path / "c"),
                            manual_dir=str(tmp_path))) == 3
    with pytest.raises(jsonl.DataFormatError, match=r"alpaca_data\.json: record 1: missing"):
        (folder / "alpaca_data.json").write_text(json.dumps([rec, {"instruction": "x"}]))
        sources.load("alpaca_full", "train", data_dir=str(tmp_path / "d"),
                     manual_dir=str(tmp_path))


def test_bad_glue_row_names_line(tmp_path):
    d = tmp_path / "glue" / "glue_data" / "SST-2"
    d.mkdir(parents=True)
    (d / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t7\n")
    (d / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    (d / "test.tsv").write_text("index\tsentence\n0\tfine\n")
    with pytest.raises(jsonl.DataFormatError, match=r"train\.tsv:3: bad label '7'"):
        sources.load("sst2", "train", data_dir=str(tmp_path / "c"), manual_dir=str(tmp_path))
    (d / "train.tsv").write_text("sentence\tlabel\ngood film\t1\textra\n")
    with pytest.raises(jsonl.DataFormatError, match=r"train\.tsv:2: 3 tab-separated fields"):
        sources.load("sst2", "train", data_dir=str(tmp_path / "d"), manual_dir=str(tmp_path))


# --- readers ----------------------------------------------------------------


def test_jsonl_reader_errors(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(jsonl.DataFormatError, match=r"x\.jsonl:3: expected a JSON object"):
        jsonl.read_jsonl(p)
    p.write_text('{"a": 1}\n{"b": 2}\n')
    with pytest.raises(jsonl.DataFormatError, match=r"x\.jsonl:2: missing key\(s\) \['a'\]"):
        jsonl.read_jsonl(p, required_keys=("a",))
    p.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(jsonl.DataFormatError, match=r"x\.jsonl:2: not valid UTF-8"):
        jsonl.read_jsonl(p)
    q = tmp_path / "y.json"
    q.write_text('[\n  {"a": 1},\n  {"a": 2,}\n]')
    with pytest.raises(jsonl.DataFormatError, match=r"y\.json:3:\d+: invalid JSON"):
        jsonl.read_json_records(q)


def test_jsonl_reader_gzip_and_bom(tmp_path):
    p = tmp_path / "hashed_name"  # no .gz suffix: detected from the bytes
    with gzip.open(p, "wt") as f:
        f.write('{"a": 1}\n{"a": 2}\n')
    assert [r["a"] for r in jsonl.read_jsonl(p)] == [1, 2]
    b = tmp_path / "bom.jsonl"
    b.write_bytes('\ufeff{"a": 3}\n'.encode())
    assert jsonl.read_jsonl(b) == [{"a": 3}]


class _FakeDownloadManager:
    """The two members of a TFDS DownloadManager that `locate_files` uses."""

    def __init__(self, manual):
        self._manual_dir = manual
        self.downloads = 0

    @property
    def manual_dir(self):
        if not self._manual_dir.exists() or not list(self._manual_dir.iterdir()):
            raise AssertionError("absent")  # what TFDS raises
        return self._manual_dir


def test_locate_files_order_manual_then_network(tmp_path, monkeypatch):
    from etils import epath

    from psm.data.builders import base
    files, urls = {"train": "train.jsonl"}, {"train": "https://example.org/train.jsonl"}
    dl = _FakeDownloadManager(epath.Path(tmp_path / "manual"))

    def download(m):
        m.downloads += 1
        return {"train": epath.Path("/downloaded/train.jsonl")}

    monkeypatch.setattr(base, "network_available", lambda url, timeout=3.0: True)
    got = base.locate_files(dl, dataset="x", files=files, urls=urls, download=download)
    assert got == {"train": epath.Path("/downloaded/train.jsonl")} and dl.downloads == 1
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "train.jsonl").write_text("{}\n")
    got = base.locate_files(dl, dataset="x", files=files, urls=urls, download=download)
    assert got == {"train": epath.Path(tmp_path / "manual" / "train.jsonl")}
    assert dl.downloads == 1  # a complete manual folder never downloads
    monkeypatch.setattr(base, "network_available", lambda url, timeout=3.0: False)
    empty = _FakeDownloadManager(epath.Path(tmp_path / "nothing"))
    with pytest.raises(MissingDataError, match="example.org is not reachable"):
        base.locate_files(empty, dataset="x", files=files, urls=urls, download=download)


def test_offline_env_skips_network(monkeypatch):
    from psm.data.builders import base
    monkeypatch.setenv("PSM_OFFLINE", "1")
    start = time.monotonic()
    assert not base.network_available("https://raw.githubusercontent.com/x")
    assert time.monotonic() - start < 0.5
