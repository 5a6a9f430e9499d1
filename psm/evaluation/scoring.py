"""Aggregation shared by the exact-match scorers (GSM8K, MATH)."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence


def aggregate(results: Iterable[Mapping], task: str) -> dict:
    """Accuracy over per-example results (dicts with a boolean ``correct``).

    Returns:
      ``{"accuracy": float, "correct": int, "total": int}`` (0.0 when empty).
    """
    total = correct = 0
    for i, result in enumerate(results):
        if "correct" not in result:
            raise ValueError(f"{task}.aggregate: result {i} has no 'correct' key: {result!r}")
        total += 1
        correct += bool(result["correct"])
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total}


def evaluate(score: Callable[[str, str], dict], task: str, predictions: Sequence[str],
             references: Sequence[str], ids: Optional[Sequence] = None) -> dict:
    """Scores a list of outputs with `score(prediction, reference)`.

    Args:
      predictions: ``[N]`` generated texts.
      references: ``[N]`` references, as accepted by `score`.
      ids: optional ``[N]`` example ids (default: 0..N-1).

    Returns:
      ``{"accuracy", "correct", "total", "per_example"}`` where each record is
      ``{"id", "prediction", "extracted", "reference", "correct"}``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{task}.evaluate: {len(predictions)} predictions but "
                         f"{len(references)} references")
    if ids is None:
        ids = range(len(predictions))
    elif len(ids) != len(predictions):
        raise ValueError(f"{task}.evaluate: {len(ids)} ids for {len(predictions)} predictions")
    records = []
    for key, prediction, reference in zip(ids, predictions, references):
        try:
            result = score(prediction, reference)
        except ValueError as e:
            raise ValueError(f"{task}.evaluate: example id={key!r}: {e}") from None
        records.append({"id": key.item() if hasattr(key, "item") else key,
                        "prediction": prediction, **result})
    return {**aggregate(records, task), "per_example": records}
