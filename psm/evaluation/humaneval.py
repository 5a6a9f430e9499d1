"""HumanEval (Chen et al. 2021) scoring: functional correctness and pass@k.

A completion is the code a model writes after a problem's ``prompt`` (the
function signature and docstring). It is correct when the program
``prompt + completion + test + check(entry_point)`` runs to the end in the
sandbox of `psm.evaluation.sandbox`, i.e. every assertion of the problem's
``check`` passes within the time and memory limits.

pass@k uses the unbiased estimator of the Codex paper: with n samples of which
c are correct, ``pass@k = 1 - C(n-c, k) / C(n, k)``, computed in the
numerically stable product form ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import gzip
import json
from typing import Iterable, Mapping, Sequence

import numpy as np

from psm.evaluation import sandbox

# Stop sequences used for HumanEval in the Codex paper: generation after the
# function body (a new top-level statement) is not part of the completion.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
_REQUIRED_KEYS = ("task_id", "prompt", "test", "entry_point")


def load_problems(path: str) -> dict[str, dict]:
    """Reads HumanEval problems from a ``.jsonl`` or ``.jsonl.gz`` file.

    Returns:
      ``{task_id: problem}`` in file order; each problem has at least
      ``task_id``, ``prompt``, ``test`` and ``entry_point``.
    """
    opener = gzip.open if path.endswith(".gz") else open
    problems = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                problem = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            missing = [k for k in _REQUIRED_KEYS if k not in problem]
            if missing:
                raise ValueError(f"{path}:{lineno}: problem lacks keys {missing}; "
                                 f"expected {list(_REQUIRED_KEYS)}")
            problems[problem["task_id"]] = problem
    return problems


def truncate_completion(text: str, stop: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cuts `text` at the first stop sequence (the Codex paper's post-processing)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def build_program(problem: Mapping, completion: str) -> str:
    """The program that tests `completion`: prompt, completion, tests, ``check`` call."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def score(completion: str, problem: Mapping, **sandbox_kwargs) -> dict:
    """Runs one completion against its problem's tests.

    Args:
      completion: code that continues ``problem["prompt"]``.
      problem: a HumanEval problem (``task_id``, ``prompt``, ``test``,
        ``entry_point``).
      **sandbox_kwargs: passed to `sandbox.run_program` (``timeout_s``,
        ``memory_mb``, ``isolation``, ...).

    Returns:
      JSON-serialisable ``{"id", "correct", "extracted", "status", "detail",
      "elapsed_s"}``; ``extracted`` is the completion that was run.
    """
    if not isinstance(completion, str):
        raise TypeError(f"humaneval.score: completion for {problem.get('task_id')} must be "
                        f"str, got {type(completion).__name__}")
    result = sandbox.run_program(build_program(problem, completion), **sandbox_kwargs)
    return {"id": problem["task_id"], "correct": result.passed, "extracted": completion,
            "status": result.status, "detail": result.detail, "elapsed_s": result.elapsed_s}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `n` samples, `c` of them correct.

    Equals ``1 - C(n-c, k) / C(n, k)``, computed as a stable product.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def estimate_pass_at_k(num_samples, num_correct, k: int) -> np.ndarray:
    """pass@k per problem.

    Args:
      num_samples: ``[P]`` samples per problem, or one int for all problems.
      num_correct: ``[P]`` correct samples per problem.
      k: the k of pass@k.

    Returns:
      ``[P]`` float64 array of pass@k values.
    """
    num_correct = np.asarray(num_correct, dtype=np.int64).reshape(-1)
    num_samples = np.broadcast_to(np.asarray(num_samples, dtype=np.int64), num_correct.shape)
    return np.array([pass_at_k(int(n), int(c), k) for n, c in zip(num_samples, num_correct)],
                    dtype=np.float64)


def evaluate(problems: Mapping[str, Mapping], samples: Iterable[Mapping],
             ks: Sequence[int] = (1,), workers: int = 2, truncate: bool = False,
             **sandbox_kwargs) -> dict:
    """Runs every sample and aggregates pass@k.

    Args:
      problems: ``{task_id: problem}`` as from `load_problems`.
      samples: dicts with ``task_id`` and ``completion`` (several per task for
        pass@k with k > 1).
      ks: the k values to report; a k larger than the smallest number of
        samples of a problem is skipped (listed under ``skipped_k``).
      workers: sandboxed programs run at the same time.
      truncate: apply `truncate_completion` before running.
      **sandbox_kwargs: passed to `sandbox.run_program`.

    Returns:
      ``{"pass_at_k": {"pass@1": float, ...}, "per_example": [...],
      "num_problems": int, "num_samples": int, "skipped_k": [...]}`` where
      ``per_example`` follows the order of `samples` and adds ``prediction``
      (the raw completion) and ``sample`` (its index within its task).
    """
    samples = list(samples)
    if workers < 1:
        raise ValueError(f"humaneval.evaluate: workers must be >= 1, got {workers}")
    jobs = []
    per_task = collections.Counter()
    for i, sample in enumerate(samples):
        for key in ("task_id", "completion"):
            if key not in sample:
                raise ValueError(f"humaneval.evaluate: sample {i} lacks {key!r}")
        if sample["task_id"] not in problems:
            raise ValueError(f"humaneval.evaluate: sample {i} names unknown task "
                             f"{sample['task_id']!r}")
        raw = sample["completion"]
        jobs.append((sample["task_id"], per_task[sample["task_id"]], raw,
                     truncate_completion(raw) if truncate else raw))
        per_task[sample["task_id"]] += 1

    def run(job):
        task_id, index, raw, completion = job
        record = score(completion, problems[task_id], **sandbox_kwargs)
        return {"id": task_id, "sample": index, "prediction": raw, **{
            k: v for k, v in record.items() if k != "id"}}

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        per_example = list(pool.map(run, jobs))

    correct = collections.Counter()
    for record in per_example:
        correct[record["id"]] += bool(record["correct"])
    tasks = list(per_task)
    n = np.array([per_task[t] for t in tasks])
    c = np.array([correct[t] for t in tasks])
    results, skipped = {}, []
    for k in ks:
        if len(tasks) and k <= n.min():
            results[f"pass@{k}"] = float(estimate_pass_at_k(n, c, k).mean())
        else:
            skipped.append(int(k))
    return {"pass_at_k": results, "per_example": per_example, "num_problems": len(tasks),
            "num_samples": len(samples), "skipped_k": skipped}

