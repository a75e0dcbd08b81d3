"""Which forget rows a relearning attack trains on and which it is scored on: disjoint by construction and checked.

A relearning attack on a fraction of the forget set is only an attack on the *rest* of it: a row the attack trained
on would be recalled because it was just re-taught, not because the unlearning was shallow. :func:`split_forget_rows`
deals the forget rows into two disjoint sets with a seeded permutation, and :func:`leaked_questions` checks the rows
themselves (a benchmark may hold the same question twice under two indices).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from baldro_lightning.evaluation.engine import RowScores


def split_forget_rows(indices: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deal forget row indices into ``(trained, held_out)`` with a seeded permutation.

    ``round(fraction * n)`` rows (at least one, and at least one left over) are trained on; both lists come back
    sorted. Example: 10 rows, ``fraction=0.3`` -> 3 trained rows and 7 held-out rows, the same ones for the same seed.

    Args:
        indices: The forget rows' indices (distinct).
        fraction: Share of the rows the attack trains on, in (0, 1).
        seed: Seeds the permutation.

    Raises:
        ValueError: ``fraction`` outside (0, 1), fewer than two rows, or repeated indices.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"--forget_fraction must be in (0, 1) (a share of the forget rows to relearn), got {fraction}")
    if len(set(indices)) != len(indices):
        raise ValueError("forget row indices repeat; each forget row must have its own index")
    if len(indices) < 2:
        raise ValueError(f"{len(indices)} forget row(s): a relearning split needs at least 2 (one trained, one scored)")
    n = len(indices)
    k = min(max(round(fraction * n), 1), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    trained = sorted(int(indices[j]) for j in order[:k])
    held_out = sorted(int(indices[j]) for j in order[k:])
    return trained, held_out


def leaked_questions(trained: Sequence[Mapping[str, Any]], scored: Sequence[Mapping[str, Any]]) -> list[str]:
    """Questions (or texts) of ``scored`` rows that also occur among ``trained`` rows; empty when nothing leaks."""

    def text(row: Mapping[str, Any]) -> str:
        return " ".join(str(row.get(key, "")) for key in ("question", "prompt", "text")).strip()

    seen = {text(row) for row in trained}
    return sorted({text(row) for row in scored if text(row) in seen})


def rows_with_indices(rows: Sequence[Mapping[str, Any]], indices: Collection[int]) -> list[Mapping[str, Any]]:
    """The rows whose ``index`` is in ``indices``, in row order."""
    wanted = set(indices)
    return [row for row in rows if int(row["index"]) in wanted]


def held_out_scores(scores: RowScores, indices: Collection[int]) -> RowScores:
    """``scores`` restricted to the rows in ``indices`` (every column alike), e.g. the held-out forget rows."""
    wanted = set(indices)
    keep = [k for k, index in enumerate(scores.indices) if index in wanted]
    return RowScores(
        role=scores.role,
        split=scores.split,
        indices=[scores.indices[k] for k in keep],
        columns={name: [values[k] for k in keep] for name, values in scores.columns.items()},
    )
