"""Recovery of forget metrics under an attack: the unattacked and the attacked value, per forget row and overall.

Both evaluations are of the same rows (the attack's scope), so ``delta = after - before`` is the attack's effect on
that metric. Which direction is "recovery" depends on the metric (forget ROUGE and probability rise as answers come
back; forget quality falls); the record keeps the signed change and the two values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RecoveredMetric:
    """One metric of an ``eval.json`` whose recovery is reported."""

    key: str
    """The ``eval.json`` metric key."""
    label: str
    """Its name in tables and figures."""
    row_field: str | None = None
    """The field of a per-row value that holds the number (ROUGE rows are dicts); None: the value is the number."""
    per_sample: bool = True
    """Whether the metric has per-row values (forget quality and model utility do not)."""


TOFU_RECOVERED: tuple[RecoveredMetric, ...] = (
    RecoveredMetric("forget_Q_A_ROUGE", "forget ROUGE-L", "rougeL_recall"),
    RecoveredMetric("forget_Q_A_Prob", "forget probability"),
    RecoveredMetric("forget_truth_ratio", "forget truth ratio"),
    RecoveredMetric("forget_quality", "FQ", per_sample=False),
    RecoveredMetric("model_utility", "MU", per_sample=False),
)
"""TOFU: the forget metrics of issue 20, and model utility (benign relearning moves it too)."""

MUSE_RECOVERED: tuple[RecoveredMetric, ...] = (
    RecoveredMetric("forget_knowmem_ROUGE", "KnowMem forget", "rougeL_f1"),
    RecoveredMetric("forget_verbmem_ROUGE", "VerbMem forget", "rougeL_f1"),
    RecoveredMetric("retain_knowmem_ROUGE", "KnowMem retain", "rougeL_f1"),
    RecoveredMetric("privleak", "PrivLeak", per_sample=False),
)
"""MUSE: KnowMem and VerbMem on the forget corpus, KnowMem on the retain corpus, PrivLeak."""


def _number(value: Any, row_field: str | None) -> float:
    if isinstance(value, Mapping):
        value = value.get(row_field) if row_field else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _difference(after: float, before: float) -> float:
    return after - before if math.isfinite(after) and math.isfinite(before) else math.nan


def recovery(
    before: Mapping[str, Any], after: Mapping[str, Any], metrics: Sequence[RecoveredMetric]
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Aggregate and per-row change of each metric from ``before`` to ``after`` (two eval.json results).

    Example: forget probability 0.2 before and 0.5 after gives ``{"before": 0.2, "after": 0.5, "delta": 0.3}``;
    a row at 0.1 then 0.4 gives the CSV row ``index, forget_Q_A_Prob, 0.1, 0.4, 0.3``.

    Args:
        before: The unattacked evaluation (``{"metrics": ...}``) of the rows the attack is scored on.
        after: The attacked evaluation of the same rows.
        metrics: What to compare; a metric absent from either side gets NaN.

    Returns:
        ``({key: {"before", "after", "delta"}}, per-row dicts with index, metric, before, after, delta)`` for the
        rows both evaluations hold, in row order.
    """
    aggregate: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    for metric in metrics:
        old = before.get("metrics", {}).get(metric.key) or {}
        new = after.get("metrics", {}).get(metric.key) or {}
        b, a = _number(old.get("agg_value"), None), _number(new.get("agg_value"), None)
        aggregate[metric.key] = {"before": b, "after": a, "delta": _difference(a, b)}
        if not metric.per_sample:
            continue
        old_rows, new_rows = old.get("value_by_index") or {}, new.get("value_by_index") or {}
        for index in sorted((set(old_rows) & set(new_rows)), key=int):
            rb, ra = _number(old_rows[index], metric.row_field), _number(new_rows[index], metric.row_field)
            rows.append({"index": int(index), "metric": metric.key, "before": rb, "after": ra, "delta": ra - rb})
    return aggregate, rows
