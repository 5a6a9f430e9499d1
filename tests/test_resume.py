"""Resume is a real resume: a rerun starts at the last checkpoint, skips the finished
steps and leaves each metric row once.

Training is deterministic, so retraining from step 0 would reproduce the same bits; these
tests therefore count the steps a rerun executes and read the rows it writes, instead of
comparing final parameters only (tests/test_train_e2e.py does that across processes).
"""

import json
import os
import time

import pytest

from configs import tiny
from psm.training import trainer


def _config():
    # Resume is about the training loop and the rows it writes: one merge and no
    # ensemble, greedy soup or barrier lines, which each of the four runs below
    # would otherwise evaluate again (tests/test_train_e2e.py covers those rows).
    c = tiny.get_config("test")
    c.mesh.replica = 1
    c.merge.methods = ("average", "select_resample")
    c.eval.barrier = False
    return c


_BATCH_INDICES = trainer.orders.batch_indices


class _Crash(Exception):
    pass


def _counting_steps(monkeypatch, crash_before_call=None):
    """Counts the training steps the trainer's loop runs (one batch drawn per step; the
    base model's pre-training draws none); raises _Crash before step call `crash_before_call`.
    """
    real = _BATCH_INDICES  # not the attribute: an earlier spy may still be installed
    calls = []

    def counted(step, **kwargs):
        if crash_before_call is not None and len(calls) + 1 == crash_before_call:
            raise _Crash("simulated crash")
        calls.append(step)
        return real(step, **kwargs)

    monkeypatch.setattr(trainer.orders, "batch_indices", counted)
    return calls


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _steps(rows, key):
    return [r["step"] for r in rows if key in r]


def test_crashed_run_resumes_at_its_last_checkpoint(tmp_path, monkeypatch):
    c = _config()
    total = 3 * (c.task.num_train // c.train.batch_size)  # 36 steps
    every, log_every, eval_every = (c.checkpoint.every_steps, c.train.log_every,
                                    c.train.eval_every)
    assert (every, log_every, eval_every, total) == (6, 4, 12, 36), "test assumes tiny:test"

    # An uninterrupted reference run, in this process (same compilation as below).
    reference_dir = str(tmp_path / "reference")
    calls = _counting_steps(monkeypatch)
    reference = trainer.train_and_evaluate(c, reference_dir)
    assert calls == list(range(total)) and reference["resumed_from_step"] == 0

    # A run that dies before its 21st step: checkpoints 6, 12, 18 are on disk and
    # metric rows up to step 20 were written after the last checkpoint.
    workdir = str(tmp_path / "crashed")
    calls = _counting_steps(monkeypatch, crash_before_call=21)
    with pytest.raises(_Crash):
        trainer.train_and_evaluate(c, workdir)
    assert calls == list(range(20))
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                   if d.isdigit())
    assert saved[-1] == 18
    assert _steps(_rows(workdir), "train/loss") == [4, 8, 12, 16, 20]

    # The rerun executes exactly the 18 steps after the checkpoint...
    calls = _counting_steps(monkeypatch)
    t_rerun = time.time()
    resumed = trainer.train_and_evaluate(c, workdir)
    assert calls == list(range(18, total))
    assert resumed["resumed_from_step"] == 18
    rows = _rows(workdir)
    # ...its first logged row is the first log step after the checkpoint (the
    # crashed run's row 20 was trimmed and written again, not kept twice)...
    new_rows = [r for r in rows if r["time"] >= t_rerun - 1e-3]
    assert new_rows[0]["step"] == 20
    assert all(r["time"] < t_rerun for r in rows if r["step"] <= 18)
    # ...and every step's row appears once, as in the uninterrupted run.
    assert _steps(rows, "train/loss") == list(range(log_every, total + 1, log_every))
    assert _steps(rows, "val/loss") == list(range(eval_every, total + 1, eval_every))
    ref_rows = _rows(reference_dir)
    for key in ("train/loss", "val/loss"):
        assert [r[key] for r in rows if key in r] == [r[key] for r in ref_rows if key in r]
    assert resumed["models"] == reference["models"]

    # Rerunning the finished run trains nothing and leaves the rows as they are.
    calls = _counting_steps(monkeypatch)
    again = trainer.train_and_evaluate(c, workdir)
    assert calls == [] and again["resumed_from_step"] == total
    assert _rows(workdir) == rows
    assert again["models"] == reference["models"]

    # Changing only what happens after training re-merges the trained replicas without
    # training a step: bfloat16 storage, as released checkpoints would be merged.
    c.merge.storage_dtype = "bfloat16"
    calls = _counting_steps(monkeypatch)
    remerged = trainer.train_and_evaluate(c, workdir)
    assert calls == [] and remerged["resumed_from_step"] == total
    assert _rows(workdir) == rows
    assert remerged["storage_dtype"] == "bfloat16" and reference["storage_dtype"] == "float32"
    assert json.load(open(os.path.join(workdir, "results.json")))["storage_dtype"] == "bfloat16"
    replicas_only = lambda models: {k: v for k, v in models.items() if k.startswith("replica")}
    assert replicas_only(remerged["models"]) != replicas_only(reference["models"])  # rounded



def test_resume_drops_a_torn_last_metrics_line_and_refuses_a_corrupt_one(tmp_path):
    """A run killed mid-write leaves metrics.jsonl's last line cut off: resume drops it
    (else the next record would be glued onto it). A bad line elsewhere is corruption,
    an error naming the file and line that leaves the file as it was."""
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "train/loss": 1.0}) for s in (4, 8, 12)]
    path.write_text("\n".join(good) + '\n{"step": 16, "train/lo')
    trainer._truncate_metrics(str(path), 8)
    assert path.read_text() == "\n".join(good[:2]) + "\n"

    path.write_text("\n".join(good) + '\n{"step": 16, "train/lo')
    trainer._truncate_metrics(str(path), 12)  # nothing after the checkpoint but the torn line
    assert path.read_text() == "\n".join(good) + "\n"

    for corrupt, line in ((good[0] + "\n{not json\n" + good[1] + "\n", 2),
                          # a torn line that is not last: another record was appended to it
                          (good[0] + '\n{"step": 8, "tr' + good[1] + "\n", 2),
                          (good[0] + "\n[1, 2]\n", 2),
                          (good[0] + "\n" + good[1] + "\nnot json\n", 3)):
        path.write_text(corrupt)
        with pytest.raises(ValueError, match=rf"{path}, line {line}: "):
            trainer._truncate_metrics(str(path), 8)
        assert path.read_text() == corrupt

    path.write_text("")  # killed before its first record was flushed
    trainer._truncate_metrics(str(path), 0)
    assert path.read_text() == ""


def test_read_metrics_refuses_a_torn_last_line_unless_resuming(tmp_path):
    from psm.training import metrics
    (tmp_path / "metrics.jsonl").write_text('{"step": 4}\n{"step": 8, "val/l')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: the last line is cut off"):
        metrics.read_metrics(str(tmp_path))
    assert metrics.read_metrics(str(tmp_path), torn_tail="drop") == [{"step": 4}]
    assert metrics.read_metrics(str(tmp_path / "nowhere")) == []
