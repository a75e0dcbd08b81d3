"""Which forget rows a relearning attack trains on and which it is scored on: disjoint by construction and checked.

A relearning attack on a fraction of the forget set is only an attack on the *rest* of it: a row the attack trained
on would be recalled because it was just re-taught, not because the unlearning was shallow. :func:`split_forget_rows`
deals the forget rows into two disjoint sets with a seeded permutation, keeping the rows of one fact together
(:func:`fact_key`: a benchmark may ask one fact in several phrasings, as the embedded one asks each fact twice), and
:func:`leaked_questions` checks the rows themselves (a benchmark may hold the same question twice under two indices).
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any

import torch

from baldro_lightning.evaluation.engine import RowScores


def fact_key(row: Mapping[str, Any]) -> Hashable:
    """What a TOFU-style row asks about: rows with the same paraphrased question and answer ask one fact.

    The embedded benchmark trains each fact in two phrasings, so two forget rows share their paraphrase; on real TOFU
    every row has its own, and the key is the row's. A row without both fields is its own fact (its ``index``).
    """
    if row.get("paraphrased_question") and row.get("paraphrased_answer"):
        return ("paraphrase", str(row["paraphrased_question"]), str(row["paraphrased_answer"]))
    return ("row", int(row["index"]))


def split_forget_rows(
    indices: Sequence[int], fraction: float, seed: int, facts: Sequence[Hashable] | None = None
) -> tuple[list[int], list[int]]:
    """Deal forget row indices into ``(trained, held_out)`` with a seeded permutation of their facts.

    Rows with the same fact (``facts``) land on the same side, so no held-out fact is relearned through another
    phrasing; without ``facts`` every row is its own fact. ``round(fraction * n)`` of the ``n`` facts (at least one,
    and at least one left over) are trained on; both lists come back sorted. Example: 10 rows, ``fraction=0.3`` -> 3
    trained rows and 7 held-out rows, the same ones for the same seed; rows ``[0, 1, 2, 3]`` with facts ``"aabb"``
    and ``fraction=0.5`` -> ``[0, 1]`` and ``[2, 3]`` in one order or the other.

    Args:
        indices: The forget rows' indices (distinct).
        fraction: Share of the facts the attack trains on, in (0, 1).
        seed: Seeds the permutation.
        facts: One key per index (:func:`fact_key`); rows with equal keys stay together.

    Raises:
        ValueError: ``fraction`` outside (0, 1), fewer than two facts, repeated indices, or ``facts`` of another
            length.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"--forget_fraction must be in (0, 1) (a share of the forget rows to relearn), got {fraction}")
    if len(set(indices)) != len(indices):
        raise ValueError("forget row indices repeat; each forget row must have its own index")
    if facts is not None and len(facts) != len(indices):
        raise ValueError(f"{len(facts)} fact keys for {len(indices)} forget rows; give one per row")
    # Facts in order of first appearance, each with its rows; one fact per row when no keys are given.
    groups: dict[Hashable, list[int]] = {}
    for position, key in enumerate(facts if facts is not None else range(len(indices))):
        groups.setdefault(key, []).append(int(indices[position]))
    members = list(groups.values())
    if len(members) < 2:
        raise ValueError(
            f"{len(members)} forget fact(s): a relearning split needs at least 2 (one trained, one scored)"
        )
    n = len(members)
    k = min(max(round(fraction * n), 1), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    trained = sorted(index for j in order[:k] for index in members[j])
    held_out = sorted(index for j in order[k:] for index in members[j])
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
