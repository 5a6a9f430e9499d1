"""Evaluate M models on a task: validation loss and test-set generation scores.

Shared by the trainer (end of a run) and `python -m psm.evaluate`, so a model
scores the same whichever route evaluates it.
"""

from __future__ import annotations

import numpy as np

from psm.training import replicas
from psm.evaluation import lm


def token_weighted_loss(per_sample: np.ndarray, arrays) -> np.ndarray:
    """Token-weighted mean loss `[M]` from per-sample mean losses `[M, N]`."""
    counts = arrays["loss_mask"].sum(axis=1)
    return (per_sample * counts).sum(axis=1) / counts.sum()


def validation_loss(eval_step, params_m, val_arrays, batch_size: int,
                    desc: str | None = None) -> np.ndarray:
    """Token-weighted validation loss `[M]` of M stacked models `[M, ...]`."""
    per_sample = lm.per_sample_losses(eval_step, params_m, val_arrays, batch_size, desc=desc)
    return token_weighted_loss(per_sample, val_arrays)


def evaluate_models(graphdef, params_m, names: list[str], task, val_arrays, config,
                    eval_step=None) -> dict:
    """Scores M stacked models.

    Args:
      graphdef: the model's graph definition.
      params_m: `[M, ...]` stacked parameters, one model per name.
      names: M model names.
      task: a `psm.data.tasks.Task`.
      val_arrays: the encoded validation split.
      config: the run config (eval.batch_size, task.prompt_len, task.max_new_tokens).
    Returns:
      {"val_loss": [M], "test_accuracy": [M], "texts": [M][N_test], "scores": [M][N_test],
       "per_example": {name: [{id, prediction, extracted, correct}, ...]}}.
    """
    eval_step = eval_step or replicas.make_eval_step(graphdef)
    val_loss = validation_loss(eval_step, params_m, val_arrays, config.eval.batch_size,
                               desc="validation loss")
    test = task.splits["test"]
    texts = lm.generate_texts(graphdef, params_m, task.tokenizer, [task.prompt(e) for e in test],
                              batch_size=config.eval.batch_size,
                              prompt_len=config.task.prompt_len,
                              max_new_tokens=config.task.max_new_tokens, desc="test generation")
    scores = [[task.score(t, e) for t, e in zip(texts[m], test)] for m in range(len(names))]
    accuracy = np.array([np.mean([bool(s["correct"]) for s in sc]) if sc else float("nan")
                         for sc in scores])
    per_example = {
        name: [{"id": int(e["id"]), "prediction": texts[m][i],
                "extracted": _plain(scores[m][i].get("extracted")),
                "correct": bool(scores[m][i]["correct"])} for i, e in enumerate(test)]
        for m, name in enumerate(names)}
    return {"val_loss": val_loss, "test_accuracy": accuracy, "texts": texts, "scores": scores,
            "per_example": per_example}


def _plain(v):
    """JSON-friendly extracted answers (numbers, strings, None)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)
