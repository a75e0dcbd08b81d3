"""Reading run directories and choosing one run per method: what the report's tables and figures are drawn from.

A run is a directory written by ``fit`` (its in-training evaluations and the ``config.yaml`` LightningCLI saved) or
an ``eval.json`` of the evaluate commands. Every number is the run's **last** evaluation: choosing the epoch with
the best forget quality would select on the test metric itself (methods P-24).
"""

from __future__ import annotations

import functools
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import yaml

from baldro_lightning.evaluation import metrics
from baldro_lightning.evaluation.run_record import (
    EvalLogError,
    load_eval_json,
    per_sample_of,
    read_attack_record,
    read_per_sample,
    run_attack_records,
    run_step_evals,
)
from baldro_lightning.robustness.recovery import RecoveredMetric
from baldro_lightning.user_errors import UserInputError

METHOD_ORDER = ("GradAscent", "GradDiff", "NPO", "SimNPO", "SatImp")
VARIANT_ORDER = ("", "BalDRO-G", "BalDRO-DV", "BalDRO-DV (released sign)")

Rule = Literal["fq_at_mu", "fq", "mu"]


class ReportError(UserInputError):
    """Inputs of the report are missing or inconsistent; the message names the flag or file and the fix."""


# --------------------------------------------------------------------------------------------------------------
# Reading runs


@dataclass
class RunResult:
    """What the report needs from one run directory."""

    name: str
    directory: Path
    benchmark: Literal["tofu", "muse"]
    split: str
    """Forget split (TOFU) or corpus (MUSE)."""
    method: str
    variant: str
    hparams: dict[str, Any]
    final: dict[str, Any]
    """The last ``eval.json``."""
    first: dict[str, Any] | None = None
    """The evaluation at step 0 (the model before unlearning), when the run has one."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every evaluation, in step order (``final`` is the last)."""
    per_sample: Path | None = None
    extra: dict[str, float] = field(default_factory=dict)
    """Metrics computed by the report (Fluency)."""
    attacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Attack records (``attack.json``: ``meta`` and ``recovery``) by attack name, when the run was attacked."""

    @functools.cached_property
    def balance(self) -> BalanceTrajectory | None:
        """Forgetting balance at each evaluation, from ``per_sample.csv``; read once, for tables and figures."""
        return balance_trajectory(self.per_sample) if self.per_sample is not None else None

    @property
    def trained(self) -> bool:
        """False when the last evaluation is the step-0 one (the run stopped before its first update)."""
        return self.first is None or self.final is not self.first

    @property
    def label(self) -> str:
        return self.method if not self.variant else f"{self.method} + {self.variant}"

    def metric(self, key: str) -> float | None:
        if key in self.extra:
            return self.extra[key]
        return metric_value(self.final, key)


def metric_value(result: Mapping[str, Any] | None, key: str) -> float | None:
    """``agg_value`` of ``key`` in an eval.json, or from its synchrony block; None when absent or not finite."""
    if result is None:
        return None
    entry = result.get("metrics", {}).get(key)
    value = entry.get("agg_value") if isinstance(entry, Mapping) else result.get("synchrony", {}).get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def load_eval(path: Path) -> dict[str, Any]:
    """An ``eval.json`` (or open-unlearning log) as :func:`~baldro_lightning.evaluation.run_record.load_eval_json`
    reads it; a file that cannot be read is a :class:`ReportError`."""
    try:
        return load_eval_json(path)
    except EvalLogError as err:
        raise ReportError(str(err)) from err


def _saved_config(directory: Path) -> dict[str, Any] | None:
    for pattern in ("config.yaml", "*/config.yaml", "*/version_*/config.yaml"):
        for path in sorted(directory.glob(pattern)):
            return yaml.safe_load(path.read_text())
    return None


def nested(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _tail(class_path: Any) -> str:
    return str(class_path or "").rsplit(".", 1)[-1]


def describe_config(config: Mapping[str, Any] | None) -> tuple[str | None, str, dict[str, Any]]:
    """Method name, DRO variant and hyperparameters from a saved LightningCLI config (the paper's names).

    GradAscent with a retain term (``alpha > 0`` and a retain loss) is GradDiff. The paper's beta is the DV
    temperature ``tau`` and its lambda the retain weight ``alpha``.
    """
    model = nested(config, "model", "init_args") or {}
    loss = _tail(nested(model, "forget_loss", "class_path"))
    alpha = model.get("alpha")
    method = None
    if loss:
        method = loss
        if loss == "GradAscent" and model.get("retain_loss") and alpha:
            method = "GradDiff"
    objective = nested(model, "forget_objective") or {}
    kind = _tail(objective.get("class_path"))
    variant = {"Group": "BalDRO-G", "DV": "BalDRO-DV"}.get(kind, "")
    if kind == "DV" and nested(objective, "init_args", "sign") == "released":
        variant = "BalDRO-DV (released sign)"
    hparams = {
        "lr": nested(model, "optimizer", "init_args", "lr"),
        "batch_size": nested(config, "data", "init_args", "batch_size"),
        "accumulate": nested(config, "trainer", "accumulate_grad_batches"),
        "beta": nested(objective, "init_args", "tau") if kind == "DV" else None,
        "lambda": alpha,
        "gamma": model.get("gamma"),
        "epochs": nested(config, "trainer", "max_epochs"),
    }
    return method, variant, hparams


def _is_muse(result: Mapping[str, Any]) -> bool:
    return "corpus" in result.get("meta", {}) or "forget_knowmem_ROUGE" in result.get("metrics", {})


@dataclass(frozen=True)
class BalanceTrajectory:
    """:func:`baldro_lightning.evaluation.metrics.forgetting_balance` at every evaluation of one run."""

    steps: np.ndarray
    stats: list[dict[str, float]]

    def series(self, key: str) -> np.ndarray:
        return np.array([entry[key] for entry in self.stats])

    def std_at_mean(self, level: float) -> float:
        return metrics.at_first_crossing(self.series("forgetting_mean"), self.series("forgetting_std"), level)


def balance_trajectory(per_sample: Path) -> BalanceTrajectory | None:
    """The run's forgetting balance per evaluation, from its ``per_sample.csv``; None without log-likelihoods."""
    table = read_per_sample(per_sample)
    if "log_ppl_ratio" not in table or "step" not in table:
        return None
    steps = np.unique(table["step"])
    stats = [metrics.forgetting_balance(table["log_ppl_ratio"][table["step"] == step]) for step in steps]
    return BalanceTrajectory(steps, stats)


def load_run(path: Path) -> RunResult | None:
    """One run from a run directory or an ``eval.json`` file; None when the directory holds no evaluation."""
    if path.is_file():
        directory, evals = path.parent, [path]
    else:
        directory, evals = path, run_step_evals(path)
        if not evals and (path / "eval.json").is_file():
            evals = [path / "eval.json"]
    if not evals:
        return None
    results = [load_eval(p) for p in evals]
    final = results[-1]
    first = next((r for r in results if r.get("meta", {}).get("global_step") == 0), None)
    method, variant, hparams = describe_config(_saved_config(directory))
    muse = _is_muse(final)
    split = final.get("meta", {}).get("corpus" if muse else "forget_split") or "unknown"
    per_sample = per_sample_of(evals[-1])
    try:
        attacks = {path.parent.name: read_attack_record(path) for path in run_attack_records(directory)}
    except EvalLogError as err:
        raise ReportError(str(err)) from err
    return RunResult(
        name=directory.name,
        directory=directory,
        benchmark="muse" if muse else "tofu",
        split=str(split),
        method=method or directory.name,
        variant=variant,
        hparams=hparams,
        final=final,
        first=first,
        history=results,
        per_sample=per_sample if per_sample.is_file() else None,
        attacks=attacks,
    )


def load_runs(paths: Iterable[str | os.PathLike[str]]) -> list[RunResult]:
    """Every run under ``paths``: run directories, eval.json files, or sweep roots (their sub-directories).

    Raises:
        ReportError: a path does not exist, or no evaluation is found under any of them.
    """
    runs: list[RunResult] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ReportError(f"run directory {path} does not exist; pass run directories or a sweep root")
        run = load_run(path)
        if run is not None:
            runs.append(run)
            continue
        children = [load_run(child) for child in sorted(path.iterdir()) if child.is_dir() and child.name[0] != "."]
        found = [child for child in children if child is not None]
        if not found:
            raise ReportError(
                f"{path} holds no evaluation (<run>/*/eval/step_*/eval.json or <run>/eval.json) and no run "
                "directories with one; train with the TofuEvaluation callback or run `python -m "
                "baldro_lightning evaluate`"
            )
        runs += found
    return runs


# --------------------------------------------------------------------------------------------------------------
# Selecting the best configuration per method


@dataclass(frozen=True)
class SelectionRule:
    """How one run per method is chosen among a sweep's runs of that method (and forget split)."""

    rule: Rule = "fq_at_mu"
    """``fq_at_mu``: highest FQ among runs with MU at or above the threshold; ``fq``: highest FQ; ``mu``: highest
    MU. Ties go to the higher MU (FQ), then to the run name."""
    mu_ratio: float = 0.9
    """Threshold = ``mu_ratio`` x the MU of the model before unlearning (on the same forget split)."""
    mu_min: float | None = None
    """An absolute MU threshold; replaces ``mu_ratio``."""

    def threshold(self, target_mu: float | None, split: str) -> float | None:
        if self.rule != "fq_at_mu":
            return None
        if self.mu_min is not None:
            return self.mu_min
        if target_mu is None:
            raise ReportError(
                f"--rule fq_at_mu with --mu_ratio {self.mu_ratio} needs the original model's MU on {split}, but no "
                "run has a step-0 evaluation and no --target_eval for it was given; pass --target_eval PATH or "
                "--mu_min VALUE"
            )
        return self.mu_ratio * target_mu

    def describe(self) -> str:
        if self.rule == "fq":
            return "the run with the highest FQ (no utility constraint); ties go to the higher MU"
        if self.rule == "mu":
            return "the run with the highest MU; ties go to the higher FQ"
        bound = f"MU ≥ {self.mu_min:g}" if self.mu_min is not None else f"MU ≥ {self.mu_ratio:g} × MU of Original"
        return (
            f"the run with the highest FQ among the runs with {bound} (same forget split); ties go to the higher MU. "
            "A method with no run above the threshold shows its highest-MU run, marked †"
        )

    def pick(self, runs: Sequence[RunResult], threshold: float | None) -> tuple[RunResult, bool]:
        """The selected run and whether it meets the threshold."""

        def score(key_a: str, key_b: str):
            def key(run: RunResult) -> tuple[float, float, str]:
                a, b = run.metric(key_a), run.metric(key_b)
                return (-math.inf if a is None else a, -math.inf if b is None else b, run.name)

            return key

        by_fq, by_mu = score("forget_quality", "model_utility"), score("model_utility", "forget_quality")
        if self.rule == "fq":
            return max(runs, key=by_fq), True
        if self.rule == "mu":
            return max(runs, key=by_mu), True
        ok = [r for r in runs if (mu := r.metric("model_utility")) is not None and mu >= threshold]
        if ok:
            return max(ok, key=by_fq), True
        return max(runs, key=by_mu), False


def method_order_key(label_parts: tuple[str, str]) -> tuple[int, str, int, str]:
    method, variant = label_parts
    m = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    v = VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER)
    return (m, method, v, variant)


def group_by_method(runs: Iterable[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    groups: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for run in runs:
        groups[(run.method, run.variant)].append(run)
    return {key: groups[key] for key in sorted(groups, key=method_order_key)}


def split_order_key(split: str) -> tuple[int, str]:
    digits = "".join(ch for ch in split if ch.isdigit())
    return (int(digits) if digits else 10**6, split)


@dataclass
class SplitSummary:
    """Original, Retain and the selected run per method on one forget split."""

    split: str
    original: dict[str, Any] | None
    retain: dict[str, Any] | None
    threshold: float | None
    selected: list[tuple[RunResult, bool]]
    runs: list[RunResult]
    """The runs that trained past step 0."""
    untrained: list[str] = field(default_factory=list)
    """Runs left out: their only evaluation is at step 0."""


T = TypeVar("T")


def selected_by_method(
    summary: SplitSummary, value: Callable[[RunResult], T | None]
) -> dict[str, list[tuple[RunResult, T]]]:
    """The split's selected runs by base method, each with ``value(run)``; runs where it is None are left out."""
    groups: dict[str, list[tuple[RunResult, T]]] = defaultdict(list)
    for run, _ in summary.selected:
        if (item := value(run)) is not None:
            groups[run.method].append((run, item))
    return groups


def summarise_tofu(
    runs: Sequence[RunResult],
    rule: SelectionRule,
    target_evals: Mapping[str, dict[str, Any]],
    retain_evals: Mapping[str, dict[str, Any]],
) -> list[SplitSummary]:
    """Pick one run per (forget split, method, variant) by ``rule``."""
    by_split: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        if run.benchmark == "tofu":
            by_split[run.split].append(run)
    out = []
    for split in sorted(by_split, key=split_order_key):
        split_runs = by_split[split]
        original = target_evals.get(split) or next((r.first for r in split_runs if r.first is not None), None)
        retain = retain_evals.get(split) or retain_from_meta(split_runs)
        threshold = rule.threshold(metric_value(original, "model_utility"), split)
        trained = [r for r in split_runs if r.trained]
        selected = [rule.pick(group, threshold) for group in group_by_method(trained).values()]
        untrained = sorted(r.name for r in split_runs if not r.trained)
        out.append(SplitSummary(split, original, retain, threshold, selected, trained, untrained))
    return out


def retain_from_meta(runs: Sequence[RunResult]) -> dict[str, Any] | None:
    """The retain reference the runs' evaluations name in ``meta.retain_reference``, when it can be read."""
    for run in runs:
        reference = run.final.get("meta", {}).get("retain_reference")
        if reference and Path(reference).is_file():
            data = load_eval(Path(reference))
            if data.get("meta", {}).get("corpus" if run.benchmark == "muse" else "forget_split") in (None, run.split):
                return data
    return None


def tradeoff_history(run: RunResult, forget_key: str = "exact_memorization") -> tuple[np.ndarray, np.ndarray] | None:
    """``(forget_key, model_utility)`` at each of the run's evaluations; None when any evaluation lacks one."""
    pairs = [(metric_value(r, forget_key), metric_value(r, "model_utility")) for r in run.history]
    if len(pairs) < 2 or any(v is None for pair in pairs for v in pair):
        return None
    forget, utility = zip(*pairs, strict=True)
    return np.array(forget), np.array(utility)


@dataclass(frozen=True)
class AttackRow:
    """One method under one attack: each recovered metric's unattacked and attacked value over the method's runs."""

    method: tuple[str, str]
    """``(method, variant)``."""
    attack: str
    runs: int
    """How many runs the means are over (e.g. seeds)."""
    values: dict[str, dict[str, tuple[float, float]]]
    """metric key -> ``{"before"|"after"|"delta": (mean, sd)}``; sd is NaN for one run, NaN means no value."""

    @property
    def label(self) -> str:
        method, variant = self.method
        return method if not variant else f"{method} + {variant}"


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else math.nan


def attack_rows(runs: Sequence[RunResult], metrics: Sequence[RecoveredMetric]) -> list[AttackRow]:
    """Method x attack: the mean and sd over each method's attacked runs of every metric's before/after/delta.

    Example: two NPO runs whose ``relearn_forget`` records give forget probability 0.1 -> 0.3 and 0.2 -> 0.6 make
    one row with before (0.15, 0.071), after (0.45, 0.212) and delta (0.3, 0.141).
    """
    rows = []
    for key, group in group_by_method(r for r in runs if r.attacks).items():
        names = sorted({name for run in group for name in run.attacks})
        for name in names:
            records = [run.attacks[name]["recovery"] for run in group if name in run.attacks]
            values = {
                metric.key: {
                    side: _mean_sd([(record.get(metric.key) or {}).get(side) for record in records])
                    for side in ("before", "after", "delta")
                }
                for metric in metrics
            }
            rows.append(AttackRow(key, name, len(records), values))
    return rows
