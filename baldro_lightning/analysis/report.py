"""``python -m baldro_lightning report RUN_DIRS... --out DIR``: the paper's tables and figures from run directories.

Reads each run's evaluations (``<run>/tensorboard/eval/step_N/eval.json`` and ``per_sample.csv``, written by
:class:`~baldro_lightning.evaluation.callbacks.TofuEvaluation`; or a ``<run>/eval.json`` of ``evaluate`` /
``baldro_lightning.evaluation.muse``) and the config Lightning saved with the run (``config.yaml``), and writes:

- ``report.md``: Table 1 (FQ, MU, [Fluency], EM, ES, F-TR, Ra-TR, R-TR, Rw-TR) and Table 3 (MIA AUCs: LOSS, ZLib,
  MinK, MinK++, and GradNorm and Reference when an evaluation computed them) per forget
  split, forgetting synchrony (forget-step spread), balance (spread of per-sample forgetting) and model utility at
  matched forgetting, Table 2 (MUSE), the selected configurations and the selection rule;
- one CSV per table and ``runs.csv`` with every run's final evaluation and hyperparameters;
- figures: FQ vs MU of every run, the beta x lambda heatmap (Fig. 4), per-sample curves (Fig. 1a), forget-step
  spread (Fig. 1b), forgetting balance and utility against forget EM over training, and the forget-ratio sweep
  (Fig. 3), each drawn when the runs hold what it needs.

Every number is the run's **last** evaluation: choosing the epoch with the best forget quality would select on
the test metric itself (methods P-24). A directory argument without evaluations of its own is read as a sweep root
and each sub-directory as a run.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from baldro_lightning.analysis import figures as report_figures
from baldro_lightning.analysis.runs import (
    AttackRow,
    ReportError,
    RunResult,
    SelectionRule,
    SplitSummary,
    attack_rows,
    group_by_method,
    load_eval,
    load_runs,
    method_order_key,
    metric_value,
    nested,
    retain_from_meta,
    selected_by_method,
    split_order_key,
    summarise_tofu,
    tradeoff_history,
)
from baldro_lightning.atomic_files import check_writable
from baldro_lightning.evaluation import metrics
from baldro_lightning.robustness.recovery import MUSE_RECOVERED, TOFU_RECOVERED, RecoveredMetric
from baldro_lightning.user_errors import CommandParser

# (column, eval.json key) in the order of the paper's tables.
TABLE1 = (
    ("FQ", "forget_quality"),
    ("MU", "model_utility"),
    ("Fluency", "forget_Q_A_gibberish"),
    ("EM", "exact_memorization"),
    ("ES", "extraction_strength"),
    ("F-TR", "forget_truth_ratio"),
    ("Ra-TR", "ra_Truth_Ratio"),
    ("R-TR", "retain_Truth_Ratio"),
    ("Rw-TR", "wf_Truth_Ratio"),
)
TABLE3 = (("LOSS", "mia_loss"), ("ZLib", "mia_zlib"), ("MinK", "mia_min_k"), ("MinK++", "mia_min_k_plus_plus"))
TABLE3_EXTRA = (("GradNorm", "mia_gradnorm"), ("Reference", "mia_reference"))
"""Attacks open-unlearning has beyond the paper's four; a column only when some row's evaluation computed it."""
TABLE2 = (
    ("KM-Dr", "retain_knowmem_ROUGE"),
    ("KM-Df", "forget_knowmem_ROUGE"),
    ("VM-Df", "forget_verbmem_ROUGE"),
    ("PL", "privleak"),
)
SYNCHRONY = (
    ("median step", "forget_step_median"),
    ("IQR", "forget_step_iqr"),
    ("std", "forget_step_std"),
    ("forgotten at start", "fraction_forgotten_at_start"),
    ("never forgotten", "fraction_never_forgotten"),
    ("over-forgotten", "fraction_over_forgotten"),
)
BALANCE = (
    ("mean", "forgetting_mean"),
    ("std", "forgetting_std"),
    ("CV", "forgetting_cv"),
    ("bottom-10% share", "forgetting_bottom_share"),
)
UTILITY_INPUTS = (
    ("R-Prob", "retain_Q_A_Prob"),
    ("R-ROUGE", "retain_Q_A_ROUGE"),
    ("R-TR", "retain_Truth_Ratio"),
    ("Ra-Prob", "ra_Q_A_Prob_normalised"),
    ("Ra-ROUGE", "ra_Q_A_ROUGE"),
    ("Ra-TR", "ra_Truth_Ratio"),
    ("Rw-Prob", "wf_Q_A_Prob_normalised"),
    ("Rw-ROUGE", "wf_Q_A_ROUGE"),
    ("Rw-TR", "wf_Truth_Ratio"),
)
"""Model utility's nine inputs (``metrics.MODEL_UTILITY_KEYS``), named as Table 1 names its truth-ratio columns."""
HPARAMS = ("lr", "batch_size", "accumulate", "beta", "lambda", "gamma", "epochs")
CORPUS_NAMES = {"news": "News", "books": "Books"}

# --------------------------------------------------------------------------------------------------------------
# Fluency (optional; needs a local text classifier)


def fluency(generations: Sequence[str], classifier: str, max_length: int = 32, batch_size: int = 32) -> float:
    """Mean probability of the "clean" class of a gibberish classifier over generations (methods §3.5).

    The class is the label named ``clean`` in the classifier's ``id2label``, else index 0 as in open-unlearning.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(classifier)
    model = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    labels = {str(v).lower(): int(k) for k, v in (model.config.id2label or {}).items()}
    clean = labels.get("clean", 0)
    probs = []
    with torch.no_grad():
        for start in range(0, len(generations), batch_size):
            batch = tokenizer(
                list(generations[start : start + batch_size]),
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            logits = model(**batch).logits.float()
            probs += torch.softmax(logits, dim=-1)[:, clean].tolist()
    return float(np.mean(probs))


def forget_generations(result: Mapping[str, Any]) -> list[str]:
    rows = nested(result, "metrics", "forget_Q_A_ROUGE", "value_by_index") or {}
    return [row["generation"] for _, row in sorted(rows.items(), key=lambda kv: int(kv[0])) if "generation" in row]


def add_fluency(summaries: Sequence[SplitSummary], classifier: str, max_length: int) -> None:
    """Compute Fluency for every selected run and for Original/Retain, unless their eval.json already has it.

    An evaluation without forget-set generations (ROUGE not computed) keeps an empty Fluency cell.
    """
    for summary in summaries:
        for result in (summary.original, summary.retain):
            texts = forget_generations(result or {})
            if texts and metric_value(result, "forget_Q_A_gibberish") is None:
                value = fluency(texts, classifier, max_length)
                result.setdefault("metrics", {})["forget_Q_A_gibberish"] = {"agg_value": value}
        for run, _ in summary.selected:
            texts = forget_generations(run.final)
            if texts and run.metric("forget_Q_A_gibberish") is None:
                run.extra["forget_Q_A_gibberish"] = fluency(texts, classifier, max_length)


# --------------------------------------------------------------------------------------------------------------
# Tables


def fmt(value: float | None) -> str:
    """Four decimals as in the paper; scientific notation below 1e-3 so tiny forget qualities stay readable."""
    if value is None or not math.isfinite(value):
        return "–"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def table_rows(
    summary: SplitSummary, columns: Sequence[tuple[str, str]], retain_fq: bool
) -> tuple[list[str], list[list[str]], list[list[Any]]]:
    """Header, Markdown rows and CSV rows of a Table-1/3-style table: Original, Retain, then one row per method."""
    header = ["Method", *(name for name, _ in columns)]
    md, raw = [], []
    for name, result in (("Original", summary.original), ("Retain", summary.retain)):
        if result is None:
            continue
        values = [metric_value(result, key) for _, key in columns]
        if retain_fq and name == "Retain" and columns[0][1] == "forget_quality" and values[0] is None:
            values[0] = 1.0  # the KS test of the retain model against itself
        md.append([name, *map(fmt, values)])
        raw.append([name, *values, ""])
    for run, meets in summary.selected:
        values = [run.metric(key) for _, key in columns]
        md.append([run.label + ("" if meets else " †"), *map(fmt, values)])
        raw.append([run.label, *values, str(run.directory)])
    return header, md, raw


def table3_columns(summary: SplitSummary) -> tuple[tuple[str, str], ...]:
    """:data:`TABLE3`, plus each attack of :data:`TABLE3_EXTRA` that the Original, Retain or a selected run has."""
    results = [r for r in (summary.original, summary.retain) if r is not None]
    extra = tuple(
        column
        for column in TABLE3_EXTRA
        if any(metric_value(r, column[1]) is not None for r in results)
        or any(run.metric(column[1]) is not None for run, _ in summary.selected)
    )
    return TABLE3 + extra


def _hparam_text(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(
    runs: Sequence[RunResult],
    out: Path,
    rule: SelectionRule,
    target_evals: Mapping[str, dict[str, Any]] | None = None,
    retain_evals: Mapping[str, dict[str, Any]] | None = None,
    muse_target_evals: Mapping[str, dict[str, Any]] | None = None,
    muse_retain_evals: Mapping[str, dict[str, Any]] | None = None,
    fluency_classifier: str | None = None,
    fluency_max_length: int = 32,
    fig3_methods: Sequence[str] = ("NPO", "SimNPO"),
    figures: bool = True,
) -> Path:
    """Write ``report.md``, the CSV tables and the figures into ``out``; returns the Markdown path."""
    summaries = summarise_tofu(runs, rule, target_evals or {}, retain_evals or {})
    out.mkdir(parents=True, exist_ok=True)  # after the selection, whose errors (no MU threshold) leave nothing
    if fluency_classifier is not None:
        add_fluency(summaries, fluency_classifier, fluency_max_length)
    table1 = TABLE1 if fluency_classifier is not None else tuple(c for c in TABLE1 if c[0] != "Fluency")
    md = ["# Unlearning report", ""]
    md += [
        f"{len(runs)} runs. Each number is a run's last evaluation (not its best epoch, which would select on the "
        "test metric, methods P-24).",
        "",
        f"**Selection rule.** For every forget split and method, the row shows {rule.describe()}.",
        "",
    ]
    if fluency_classifier is None:
        md += ["Fluency is omitted: no classifier was given (`--fluency_classifier`).", ""]
    for summary in summaries:
        md += _tofu_section(summary, table1, out)
    md += _muse_section(runs, rule, muse_target_evals or {}, muse_retain_evals or {}, out)
    _write_runs_csv(runs, out / "runs.csv")
    if figures:
        drawn = report_figures.draw_all(summaries, rule, out, fig3_methods)
        if drawn:
            md += ["## Figures", ""] + [f"![{path.stem}]({path.name})" for path in drawn] + [""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def _tofu_section(summary: SplitSummary, table1: Sequence[tuple[str, str]], out: Path) -> list[str]:
    split = summary.split
    md = [f"## TOFU {split}", ""]
    if summary.threshold is not None:
        md += [f"MU threshold: {summary.threshold:.4f}.", ""]
    if summary.original is None:
        md += ["No Original row: no run has a step-0 evaluation and no `--target_eval` was given.", ""]
    if summary.retain is None:
        md += ["No Retain row: the retain reference named in the evaluations was not found (`--retain_eval`).", ""]
    if summary.untrained:
        md += [f"Left out (no evaluation after step 0): {', '.join(f'`{n}`' for n in summary.untrained)}.", ""]
    header, rows, raw = table_rows(summary, table1, retain_fq=True)
    md += [f"### Table 1 ({split})", "", _markdown(header, rows), ""]
    _write_csv(out / f"table1_{split}.csv", [*header, "run"], raw)
    md += _utility_inputs_section(summary, out)
    header, rows, raw = table_rows(summary, table3_columns(summary), retain_fq=False)
    md += [f"### Table 3: MIA AUC ({split})", "", _markdown(header, rows), ""]
    _write_csv(out / f"table3_{split}.csv", [*header, "run"], raw)
    sync_rows = [
        [run.label, *(_hparam_text(run.metric(key)) for _, key in SYNCHRONY)]
        for run, _ in summary.selected
        if "synchrony" in run.final
    ]
    if sync_rows:
        criterion = next(
            r.final["synchrony"].get("criterion", "?") for r, _ in summary.selected if "synchrony" in r.final
        )
        md += [
            f"### Forgetting synchrony ({split})",
            "",
            f"Per-sample forget step (criterion: {criterion}); a smaller spread means samples are forgotten together.",
            "",
            _markdown(["Method", *(name for name, _ in SYNCHRONY)], sync_rows),
            "",
        ]
        _write_csv(out / f"synchrony_{split}.csv", ["Method", *(k for _, k in SYNCHRONY)], sync_rows)
    md += _balance_section(summary, out)
    md += _tradeoff_section(summary, out)
    md += robustness_section(summary.runs, f"TOFU {split}", TOFU_RECOVERED, out / f"robustness_{split}.csv")
    config_rows = [
        [run.label, f"`{run.name}`", *(_hparam_text(run.hparams.get(k)) for k in HPARAMS)]
        for run, _ in summary.selected
    ]
    md += [
        f"### Selected configurations ({split})",
        "",
        _markdown(["Method", "run", *HPARAMS], config_rows),
        "",
        "beta is the DV temperature `tau`, lambda the retain weight `alpha`.",
        "",
    ]
    return md


def _utility_inputs_section(summary: SplitSummary, out: Path) -> list[str]:
    """MU's nine inputs, shown only where one of them is 0: a harmonic mean with a zero input is 0 whatever the
    other eight are, so a column of MU = 0 says nothing until the zero is named (a tiny model on real TOFU answers
    none of the real-authors questions, for instance)."""
    header, rows, raw = table_rows(summary, UTILITY_INPUTS, retain_fq=False)
    zeros = sorted(
        {name for line in raw for (name, _), value in zip(UTILITY_INPUTS, line[1:10], strict=True) if value == 0}
    )
    if not zeros:
        return []
    flagged = [
        [row[0], *(f"**{cell}**" if value == 0 else cell for cell, value in zip(row[1:], line[1:10], strict=True))]
        for row, line in zip(rows, raw, strict=True)
    ]
    _write_csv(out / f"utility_inputs_{summary.split}.csv", [*header, "run"], raw)
    return [
        f"### Model utility's inputs ({summary.split})",
        "",
        f"MU is the harmonic mean of these nine values, so a single 0 makes it 0. Zero here: {', '.join(zeros)}; "
        "read MU from the other inputs rather than as no utility at all.",
        "",
        _markdown(header, flagged),
        "",
    ]


def _balance_section(summary: SplitSummary, out: Path) -> list[str]:
    """Spread of per-sample forgetting at the last evaluation, and at equal mean forgetting within each method."""
    header = ["Method", *(name for name, _ in BALANCE), "matched mean", "std at matched mean"]
    rows = []
    for entries in selected_by_method(summary, lambda run: run.balance).values():
        # Variants of one base method forget at different speeds; their spreads are compared where each run's mean
        # forgetting first reaches the level that every one of them reaches (the smallest final mean).
        level = min(trajectory.stats[-1]["forgetting_mean"] for _, trajectory in entries)
        for run, trajectory in entries:
            at_level = trajectory.std_at_mean(level) if level > 0 else math.nan
            final = trajectory.stats[-1]
            rows.append([run.label, *(fmt(final[key]) for _, key in BALANCE), fmt(level), fmt(at_level)])
    if not rows:
        return []
    _write_csv(out / f"balance_{summary.split}.csv", header, rows)
    return [
        f"### Forgetting balance ({summary.split})",
        "",
        "A forget sample's forgetting is its log perplexity ratio to the model before unlearning (mean NLL per "
        "answer token, now minus then). Columns: mean, std, coefficient of variation and the mean of the 10% "
        "least-forgotten samples over the overall mean, at the last evaluation; then the std where the run's mean "
        "forgetting first reached the smallest final mean among the variants of its base method (interpolated "
        "between evaluations). Lower CV, a bottom share nearer 1 and a lower matched std mean more even forgetting.",
        "",
        _markdown(header, rows),
        "",
    ]


def _tradeoff_section(summary: SplitSummary, out: Path) -> list[str]:
    """Model utility at equal forgetting: where each variant's forget EM first drops to a common level."""
    header = ["Method", "EM", "MU", "matched EM", "MU at matched EM", "step at matched EM"]
    rows = []
    for entries in selected_by_method(summary, tradeoff_history).values():
        # The least-forgotten variant's final EM: every variant of the base method gets at least that far.
        level = max(em[-1] for _, (em, _) in entries)
        for run, (em, mu) in entries:
            steps = np.array([r.get("meta", {}).get("global_step", math.nan) for r in run.history], dtype=float)
            # EM falls as forgetting proceeds, so the crossing is searched on its negation.
            at = [metrics.at_first_crossing(-em, values, -level) for values in (mu, steps)]
            rows.append([run.label, fmt(em[-1]), fmt(mu[-1]), fmt(level), fmt(at[0]), fmt(at[1])])
    if not rows:
        return []
    _write_csv(out / f"tradeoff_{summary.split}.csv", header, rows)
    return [
        f"### Utility at matched forgetting ({summary.split})",
        "",
        "Variants of one base method forget at different speeds, so their last evaluations compare different "
        "amounts of forgetting. Here each run's model utility is read where its forget-set exact memorisation "
        "first fell to the level every variant of the base method reached (the largest final EM among them), "
        "interpolated between evaluations. Higher MU at the same EM is the better trade-off.",
        "",
        _markdown(header, rows),
        "",
    ]


def _before_after(entry: Mapping[str, tuple[float, float]]) -> str:
    """``before → after`` (means); the delta's sd in brackets when there are several runs."""
    (before, _), (after, _), (_, sd) = entry["before"], entry["after"], entry["delta"]
    text = f"{fmt(before)} → {fmt(after)}"
    return text + (f" (±{fmt(sd)})" if math.isfinite(sd) else "")


def robustness_section(
    runs: Sequence[RunResult], title: str, recovered: Sequence[RecoveredMetric], csv_path: Path
) -> list[str]:
    """Method x attack: every recovered metric unattacked → attacked (means over the method's runs), and a CSV."""
    rows: list[AttackRow] = attack_rows(runs, recovered)
    if not rows:
        return []
    header = ["Method", "Attack", "runs", *(f"{m.label} (unattacked → attacked)" for m in recovered)]
    md = [
        [row.label, f"`{row.attack}`", str(row.runs), *(_before_after(row.values[m.key]) for m in recovered)]
        for row in rows
    ]
    stats = [
        f"{m.key}_{side}_{stat}" for m in recovered for side in ("before", "after", "delta") for stat in ("mean", "sd")
    ]
    raw = [
        [
            row.label,
            row.attack,
            row.runs,
            *(row.values[m.key][side][k] for m in recovered for side in ("before", "after", "delta") for k in (0, 1)),
        ]
        for row in rows
    ]
    _write_csv(csv_path, ["Method", "Attack", "runs", *stats], raw)
    return [
        f"### Robustness: attacks on the unlearned model ({title})",
        "",
        "Each attacked run's last model, before and after each attack (relearning attacks are scored on the forget "
        "rows they did not train on, quantization on every row; see each run's `attacks/<attack>/attack.json`). "
        "Means over the method's runs; in brackets the sd of the change over runs. Forget ROUGE, probability and "
        "truth ratio rising (FQ falling) toward the original model's values means forgotten answers came back.",
        "",
        _markdown(header, md),
        "",
    ]


def _muse_section(
    runs: Sequence[RunResult],
    rule: SelectionRule,
    targets: Mapping[str, dict[str, Any]],
    retains: Mapping[str, dict[str, Any]],
    out: Path,
) -> list[str]:
    every = [run for run in runs if run.benchmark == "muse"]
    muse = [run for run in every if run.trained]
    if not every:
        return []
    corpora = sorted({run.split for run in muse} | set(targets) | set(retains))
    # Without --muse_target_eval, a run's step-0 evaluation is the target model before unlearning.
    targets, retains = dict(targets), dict(retains)
    for run in every:
        if run.first is not None:
            targets.setdefault(run.split, run.first)
        if run.split not in retains and (retain := retain_from_meta([run])) is not None:
            retains[run.split] = retain
    chosen: dict[tuple[str, str], dict[str, RunResult]] = defaultdict(dict)
    below_bound: set[tuple[str, str]] = set()
    for corpus in corpora:
        target_km = metric_value(targets.get(corpus), "retain_knowmem_ROUGE")
        bound = None if target_km is None else rule.mu_ratio * target_km
        for key, group in group_by_method(r for r in muse if r.split == corpus).items():
            ok = [r for r in group if bound is None or (r.metric("retain_knowmem_ROUGE") or -1) >= bound]
            if not ok:
                below_bound.add(key)
            chosen[key][corpus] = min(ok or group, key=lambda r: (r.metric("forget_verbmem_ROUGE") or math.inf, r.name))
    header = ["Method", *(f"{CORPUS_NAMES.get(c, c)} {name}" for c in corpora for name, _ in TABLE2)]
    rows, raw = [], []
    for name, evals in (("Original", targets), ("Retain", retains)):
        if evals:
            values = [metric_value(evals.get(c), key) for c in corpora for _, key in TABLE2]
            rows.append([name, *map(fmt, values)])
            raw.append([name, *values])
    for (method, variant), per_corpus in chosen.items():
        label = method if not variant else f"{method} + {variant}"
        label += " †" if (method, variant) in below_bound else ""
        values = [per_corpus[c].metric(key) if c in per_corpus else None for c in corpora for _, key in TABLE2]
        rows.append([label, *map(fmt, values)])
        raw.append([label, *values])
    _write_csv(out / "table2_muse.csv", header, raw)
    return [
        "## MUSE",
        "",
        f"Per corpus and method: the run with the lowest VM-Df among runs with KM-Dr ≥ {rule.mu_ratio:g} × KM-Dr of "
        "Original (the runs' step-0 evaluation or `--muse_target_eval`; no constraint without either); a method "
        "with no run above that bound shows its "
        "lowest-VM-Df run, marked †.",
        "",
        "### Table 2",
        "",
        _markdown(header, rows),
        "",
        *[
            line
            for corpus in corpora
            for line in robustness_section(
                [r for r in muse if r.split == corpus],
                f"MUSE {corpus}",
                MUSE_RECOVERED,
                out / f"robustness_{corpus}.csv",
            )
        ],
    ]


def _write_runs_csv(runs: Sequence[RunResult], path: Path) -> None:
    keys = [key for _, key in TABLE1 + TABLE3 + TABLE3_EXTRA + TABLE2 + SYNCHRONY]
    balance_keys = [key for _, key in BALANCE]
    header = ["run", "benchmark", "split", "method", "variant", *HPARAMS, "global_step", *keys, *balance_keys]
    rows = []
    for run in sorted(
        runs, key=lambda r: (r.benchmark, split_order_key(r.split), method_order_key((r.method, r.variant)), r.name)
    ):
        balance = run.balance.stats[-1] if run.balance is not None else {}
        rows.append(
            [
                run.name,
                run.benchmark,
                run.split,
                run.method,
                run.variant,
                *(run.hparams.get(k) for k in HPARAMS),
                run.final.get("meta", {}).get("global_step"),
                *(run.metric(k) for k in keys),
                *(balance.get(k) for k in balance_keys),
                str(run.directory),
            ]
        )
    _write_csv(path, [*header, "directory"], rows)


# --------------------------------------------------------------------------------------------------------------
# Command line


def _evals_by(paths: Sequence[str], key: str, flag: str) -> dict[str, dict[str, Any]]:
    out = {}
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise ReportError(f"{flag} {path} does not exist; pass the eval.json of that model")
        data = load_eval(path)
        value = data.get("meta", {}).get(key)
        if value is None:
            raise ReportError(f"{flag} {path} has no meta.{key}; write it with baldro_lightning's evaluation")
        out[str(value)] = data
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m baldro_lightning report",
        description="Paper-style tables (Markdown + CSV) and figures (PNG) from unlearning run directories.",
    )
    parser.add_argument("runs", nargs="+", help="run directories, eval.json files, or sweep roots")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--rule", default="fq_at_mu", choices=["fq_at_mu", "fq", "mu"], help="selection rule")
    parser.add_argument("--mu_ratio", type=float, default=0.9, help="fq_at_mu: MU >= ratio x MU of Original")
    parser.add_argument("--mu_min", type=float, default=None, help="fq_at_mu: absolute MU threshold instead")
    parser.add_argument("--target_eval", nargs="*", default=[], help="eval.json of the original model, per split")
    parser.add_argument("--retain_eval", nargs="*", default=[], help="eval.json of the retain model, per split")
    parser.add_argument("--muse_target_eval", nargs="*", default=[], help="MUSE eval.json of the target, per corpus")
    parser.add_argument("--muse_retain_eval", nargs="*", default=[], help="MUSE eval.json of the retain model")
    parser.add_argument("--fluency_classifier", default=None, help="local gibberish classifier; adds Fluency")
    parser.add_argument("--fluency_max_length", type=int, default=32, help="classifier truncation (TOFU: 32)")
    parser.add_argument("--fig3_methods", nargs="*", default=["NPO", "SimNPO"], help="base methods in Fig. 3")
    parser.add_argument("--no_figures", action="store_true", help="tables only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.mu_ratio <= 10:
        raise ReportError(f"--mu_ratio must be a positive ratio such as 0.9, got {args.mu_ratio}")
    check_writable(args.out, "--out", "directory")
    rule = SelectionRule(rule=args.rule, mu_ratio=args.mu_ratio, mu_min=args.mu_min)
    path = write_report(
        load_runs(args.runs),
        Path(args.out),
        rule,
        target_evals=_evals_by(args.target_eval, "forget_split", "--target_eval"),
        retain_evals=_evals_by(args.retain_eval, "forget_split", "--retain_eval"),
        muse_target_evals=_evals_by(args.muse_target_eval, "corpus", "--muse_target_eval"),
        muse_retain_evals=_evals_by(args.muse_retain_eval, "corpus", "--muse_retain_eval"),
        fluency_classifier=args.fluency_classifier,
        fluency_max_length=args.fluency_max_length,
        fig3_methods=args.fig3_methods,
        figures=not args.no_figures,
    )
    print(f"wrote {path}")
    return 0
