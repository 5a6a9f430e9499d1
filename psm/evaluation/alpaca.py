"""Alpaca scoring: validation loss/perplexity and judged pairwise win rate.

Loss and perplexity are computed from per-example sums: an evaluation loop
records, for every example, the summed negative log-likelihood (nats) of its
response tokens and how many tokens that was. The aggregate loss is
token-weighted (total NLL / total tokens), which is what perplexity means;
the per-example mean loss is reported alongside as ``macro_loss``.

Instruction-following quality is judged pairwise, in the style of
AlpacaEval: a `Judge` says how strongly it prefers one output to another for
an instruction, and `win_rate` averages that preference of the model's output
over a reference output. No judge ships with psm; plug one in (a larger model,
an API, a human annotation file) by implementing `Judge.compare`.
"""

from __future__ import annotations

import math
from typing import Optional, Protocol, Sequence, runtime_checkable

import numpy as np


def _check_sums(nll_sums, token_counts) -> tuple[np.ndarray, np.ndarray]:
    nll = np.asarray(nll_sums, dtype=np.float64)
    tokens = np.asarray(token_counts)
    if nll.ndim != 1 or tokens.ndim != 1 or nll.shape != tokens.shape:
        raise ValueError(f"alpaca: nll_sums and token_counts must be 1-D of equal length [N], "
                         f"got shapes {nll.shape} and {tokens.shape}")
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"alpaca: token_counts must be integers, got dtype {tokens.dtype}")
    bad = np.flatnonzero(tokens <= 0)
    if bad.size:
        raise ValueError(f"alpaca: example {bad[0]} has {tokens[bad[0]]} tokens; every example "
                         "needs at least one scored token")
    bad = np.flatnonzero(~np.isfinite(nll) | (nll < 0))
    if bad.size:
        raise ValueError(f"alpaca: example {bad[0]} has NLL sum {nll[bad[0]]}; expected a "
                         "finite value >= 0 (nats)")
    return nll, tokens.astype(np.int64)


def loss_and_perplexity(nll_sums, token_counts) -> dict:
    """Token-weighted loss and perplexity from per-example sums.

    Args:
      nll_sums: ``[N]`` summed negative log-likelihood (nats) of each example's
        scored tokens.
      token_counts: ``[N]`` number of scored tokens of each example (> 0).

    Returns:
      ``{"loss": total_nll / total_tokens, "perplexity": exp(loss),
      "macro_loss": mean of per-example losses, "tokens": int,
      "examples": int}``.
    """
    nll, tokens = _check_sums(nll_sums, token_counts)
    if nll.size == 0:
        raise ValueError("alpaca.loss_and_perplexity: no examples")
    loss = float(nll.sum() / tokens.sum())
    return {"loss": loss, "perplexity": math.exp(loss),
            "macro_loss": float(np.mean(nll / tokens)), "tokens": int(tokens.sum()),
            "examples": int(nll.size)}


def per_example_losses(ids: Sequence, nll_sums, token_counts) -> list[dict]:
    """JSON-serialisable ``{"id", "nll", "tokens", "loss", "perplexity"}`` records."""
    nll, tokens = _check_sums(nll_sums, token_counts)
    if len(ids) != nll.size:
        raise ValueError(f"alpaca.per_example_losses: {len(ids)} ids for {nll.size} examples")
    records = []
    for i in range(nll.size):
        loss = float(nll[i] / tokens[i])
        key = ids[i].item() if hasattr(ids[i], "item") else ids[i]
        records.append({"id": key, "nll": float(nll[i]), "tokens": int(tokens[i]),
                        "loss": loss, "perplexity": math.exp(loss)})
    return records


@runtime_checkable
class Judge(Protocol):
    """Compares two responses to one instruction."""

    def compare(self, instruction: str, output_a: str, output_b: str) -> float:
        """Preference for `output_a` over `output_b` in [0, 1].

        1.0: `output_a` is better; 0.0: `output_b` is better; 0.5: a tie.
        """
        ...


def _preference(judge: Judge, instruction: str, a: str, b: str, index: int,
                order: str) -> float:
    value = judge.compare(instruction, a, b)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"win_rate: judge returned {value!r} for example {index} ({order}); "
                         "expected a float in [0, 1]") from None
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise ValueError(f"win_rate: judge returned {value} for example {index} ({order}); "
                         "expected a float in [0, 1]")
    return value


def win_rate(judge: Judge, instructions: Sequence[str], outputs: Sequence[str],
             references: Sequence[str], swap: bool = True,
             ids: Optional[Sequence] = None) -> dict:
    """Judged win rate of `outputs` against `references`.

    Args:
      judge: any object with ``compare(instruction, output_a, output_b)``.
      instructions: ``[N]`` instruction texts (with their input, if any).
      outputs: ``[N]`` model outputs.
      references: ``[N]`` reference outputs (e.g. the dataset's outputs).
      swap: also ask with the two outputs swapped and average, which cancels a
        judge's preference for the first (or second) position.
      ids: optional ``[N]`` example ids for the per-example records.

    Returns:
      ``{"win_rate": mean preference for the model output, "stderr": its
      standard error, "wins": count > 0.5, "ties": count == 0.5,
      "losses": count < 0.5, "examples": N, "per_example": [...]}``.
    """
    n = len(outputs)
    if not (len(instructions) == n == len(references)):
        raise ValueError(f"win_rate: {len(instructions)} instructions, {n} outputs and "
                         f"{len(references)} references; expected equal lengths")
    if ids is not None and len(ids) != n:
        raise ValueError(f"win_rate: {len(ids)} ids for {n} outputs")
    if n == 0:
        raise ValueError("win_rate: no examples")
    if not callable(getattr(judge, "compare", None)):
        raise TypeError(f"win_rate: judge {type(judge).__name__} has no compare() method")
    prefs, records = [], []
    for i in range(n):
        p = _preference(judge, instructions[i], outputs[i], references[i], i, "model first")
        if swap:
            q = _preference(judge, instructions[i], references[i], outputs[i], i,
                            "reference first")
            p = (p + (1.0 - q)) / 2.0
        prefs.append(p)
        record = {"preference": p, "win": p > 0.5, "tie": p == 0.5}
        if ids is not None:
            key = ids[i].item() if hasattr(ids[i], "item") else ids[i]
            record = {"id": key, **record}
        records.append(record)
    prefs_arr = np.asarray(prefs)
    stderr = float(prefs_arr.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return {"win_rate": float(prefs_arr.mean()), "stderr": stderr,
            "wins": int(np.sum(prefs_arr > 0.5)), "ties": int(np.sum(prefs_arr == 0.5)),
            "losses": int(np.sum(prefs_arr < 0.5)), "examples": n, "per_example": records}
