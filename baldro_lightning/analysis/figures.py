"""PNG figures of :mod:`baldro_lightning.analysis.report`, after the paper's Figs. 1, 3 and 4 plus an FQ-vs-MU scatter.

Each function draws one figure from already-selected runs and returns the paths it wrote; a figure whose data the
runs do not hold (one forget split only, no beta/lambda grid, no per-sample table) is skipped, not drawn empty.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from baldro_lightning.analysis.runs import (
    AttackRow,
    RunResult,
    SelectionRule,
    SplitSummary,
    attack_rows,
    metric_value,
    selected_by_method,
    tradeoff_history,
)
from baldro_lightning.evaluation.run_record import read_per_sample
from baldro_lightning.robustness.recovery import TOFU_RECOVERED

MARKERS = {"": "o", "BalDRO-G": "s", "BalDRO-DV": "^", "BalDRO-DV (released sign)": "v"}
FQ_FLOOR = 1e-30
"""FQ is drawn on a log axis; a p-value of exactly 0 is drawn here."""


def _colors(methods: Sequence[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: cycle[k % len(cycle)] for k, m in enumerate(dict.fromkeys(methods))}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fq(value: float | None) -> float:
    return math.nan if value is None else max(value, FQ_FLOOR)


def fq_vs_mu(summaries: Sequence[SplitSummary], out: Path) -> list[Path]:
    """Every run's final FQ (log) against MU, one panel per forget split; Original, Retain and the MU threshold."""

    if not summaries:
        return []
    colors = _colors([r.method for s in summaries for r in s.runs])
    fig, axes = plt.subplots(1, len(summaries), figsize=(5.5 * len(summaries), 4.5), squeeze=False)
    for ax, summary in zip(axes[0], summaries, strict=True):
        for run in summary.runs:
            ax.scatter(
                run.metric("model_utility") or math.nan,
                _fq(run.metric("forget_quality")),
                color=colors[run.method],
                marker=MARKERS.get(run.variant, "x"),
                alpha=0.8,
            )
        for name, result, color in (("Original", summary.original, "black"), ("Retain", summary.retain, "green")):
            mu = metric_value(result, "model_utility")
            fq = metric_value(result, "forget_quality") if name == "Original" else 1.0
            if mu is not None:
                ax.scatter(mu, _fq(fq), color=color, marker="*", s=160, label=name)
        if summary.threshold is not None:
            ax.axvline(summary.threshold, color="grey", linestyle="--", linewidth=1, label="MU threshold")
        ax.set_yscale("log")
        ax.set_xlabel("model utility (MU)")
        ax.set_ylabel("forget quality (FQ)")
        ax.set_title(f"TOFU {summary.split}")
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=m) for m, c in colors.items()]
    handles += [
        plt.Line2D([], [], color="grey", marker=mk, linestyle="", label=v or "Mean") for v, mk in MARKERS.items()
    ]
    handles += axes[0][-1].get_legend_handles_labels()[0]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    return [_save(fig, out / "fig_fq_vs_mu.png")]


def beta_lambda_heatmaps(summaries: Sequence[SplitSummary], rule: SelectionRule, out: Path) -> list[Path]:
    """Fig. 4: FQ and MU of BalDRO-DV over the beta x lambda grid; each cell is the rule's pick over other axes."""
    paths = []
    for summary in summaries:
        groups: dict[str, list[RunResult]] = defaultdict(list)
        for run in summary.runs:
            if run.hparams.get("beta") is not None and run.hparams.get("lambda") is not None:
                groups[run.label].append(run)
        for label, runs in groups.items():
            betas = sorted({r.hparams["beta"] for r in runs}, reverse=True)
            lambdas = sorted({r.hparams["lambda"] for r in runs}, reverse=True)
            if len(betas) < 2 and len(lambdas) < 2:
                continue
            fq = np.full((len(betas), len(lambdas)), np.nan)
            mu = np.full_like(fq, np.nan)
            for i, beta in enumerate(betas):
                for j, lam in enumerate(lambdas):
                    cell = [r for r in runs if r.hparams["beta"] == beta and r.hparams["lambda"] == lam]
                    if cell:
                        best, _ = rule.pick(cell, summary.threshold)
                        fq[i, j] = best.metric("forget_quality") or np.nan
                        mu[i, j] = best.metric("model_utility") or np.nan
            fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(lambdas) * 2, 1.5 + 0.8 * len(betas)))
            for ax, values, title in ((axes[0], fq, "FQ"), (axes[1], mu, "MU")):
                image = ax.imshow(values, cmap="viridis", aspect="auto")
                ax.set_xticks(range(len(lambdas)), [f"{v:g}" for v in lambdas])
                ax.set_yticks(range(len(betas)), [f"{v:g}" for v in betas])
                ax.set_xlabel("λ (alpha)")
                ax.set_ylabel("β (DV tau)")
                ax.set_title(f"{title}: {label}, {summary.split}", fontsize=9)
                middle = np.nanmean([np.nanmin(values), np.nanmax(values)])
                for (i, j), v in np.ndenumerate(values):
                    if np.isfinite(v):
                        color = "black" if v > middle else "white"  # readable on viridis' light and dark ends
                        ax.text(j, i, f"{v:.3g}", ha="center", va="center", color=color, fontsize=8)
                fig.colorbar(image, ax=ax)
            slug = label.replace(" + ", "_").replace(" ", "_").replace("(", "").replace(")", "")
            paths.append(_save(fig, out / f"fig4_beta_lambda_{summary.split}_{slug}.png"))
    return paths


def per_sample_curves(summaries: Sequence[SplitSummary], out: Path) -> list[Path]:
    """Fig. 1a: per-sample log perplexity ratio to the original model and truth ratio over training steps.

    One figure per (forget split, base method), one column per DRO variant of that method's selected runs.
    """

    paths = []
    for summary in summaries:
        for method, entries in selected_by_method(summary, lambda run: run.per_sample).items():
            runs = [run for run, _ in entries]
            fig, axes = plt.subplots(2, len(runs), figsize=(4 * len(runs), 6), squeeze=False, sharey="row")
            for k, run in enumerate(runs):
                table = read_per_sample(run.per_sample)
                for row, (key, ylabel, sign) in enumerate(
                    (("log_likelihood_ratio", "log(PPL / PPL before unlearning)", -1.0), ("truth_ratio", "TR", 1.0))
                ):
                    ax = axes[row][k]
                    for index in np.unique(table["index"]):
                        mask = table["index"] == index
                        ax.plot(table["step"][mask], sign * table[key][mask], linewidth=0.7, alpha=0.6)
                    ax.set_xlabel("step")
                    ax.set_ylabel(ylabel)
                    ax.set_title(run.label, fontsize=9)
            fig.suptitle(f"Per-sample forgetting curves, TOFU {summary.split}")
            paths.append(_save(fig, out / f"fig1a_curves_{summary.split}_{method}.png"))
    return paths


def _trajectory_figure(
    summary: SplitSummary,
    curve: Callable[[RunResult], tuple[np.ndarray, np.ndarray] | None],
    labels: tuple[str, str, str],
    path: Path,
    invert_x: bool = False,
    threshold: float | None = None,
) -> list[Path]:
    """One panel per base method, one line per selected run through its ``curve`` (x, y at each evaluation)."""

    by_method = selected_by_method(summary, curve)
    if not by_method:
        return []
    xlabel, ylabel, title = labels
    fig, axes = plt.subplots(1, len(by_method), figsize=(4.2 * len(by_method), 4), squeeze=False)
    for ax, (method, entries) in zip(axes[0], by_method.items(), strict=True):
        for run, (x, y) in entries:
            ax.plot(x, y, marker=MARKERS.get(run.variant, "x"), markersize=4, label=run.variant or "Mean")
        if threshold is not None:
            ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label="MU threshold")
        if invert_x:
            ax.invert_xaxis()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(method, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return [_save(fig, path)]


def _balance_curve(run: RunResult) -> tuple[np.ndarray, np.ndarray] | None:
    if run.balance is None:
        return None
    return run.balance.series("forgetting_mean"), run.balance.series("forgetting_std")


def forgetting_balance(summaries: Sequence[SplitSummary], out: Path) -> list[Path]:
    """Spread (std) against mean of per-sample forgetting at every evaluation: one panel per base method.

    At equal mean forgetting, a lower curve means the samples were forgotten more evenly.
    """
    paths = []
    for summary in summaries:
        title = f"Forgetting balance over training, TOFU {summary.split} (lower = more even)"
        labels = ("mean log(PPL / PPL before)", "std over forget samples", title)
        path = out / f"fig1c_balance_{summary.split}.png"
        paths += _trajectory_figure(summary, _balance_curve, labels, path)
    return paths


def tradeoff_curves(summaries: Sequence[SplitSummary], out: Path) -> list[Path]:
    """Model utility against forget-set exact memorisation at every evaluation: one panel per base method.

    The x axis runs from no forgetting (EM 1) to more; a curve above another reached the same EM with more utility.
    """

    paths = []
    for summary in summaries:
        title = f"Utility against forgetting over training, TOFU {summary.split} (higher = better trade-off)"
        labels = ("forget exact memorisation (EM)", "model utility (MU)", title)
        path = out / f"fig_tradeoff_{summary.split}.png"
        paths += _trajectory_figure(summary, tradeoff_history, labels, path, invert_x=True, threshold=summary.threshold)
    return paths


def forget_step_spread(summaries: Sequence[SplitSummary], out: Path) -> list[Path]:
    """Fig. 1b: the distribution of per-sample forget steps of each selected run (never-forgotten counted apart)."""
    paths = []
    for summary in summaries:
        runs = [run for run, _ in summary.selected if "forget_step_by_index" in run.final.get("synchrony", {})]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(1.2 * len(runs) + 2, 4.5))
        data, labels = [], []
        for run in runs:
            steps = [v for v in run.final["synchrony"]["forget_step_by_index"].values()]
            finite = [float(v) for v in steps if v is not None]
            data.append(finite or [math.nan])
            never = len(steps) - len(finite)
            labels.append(f"{run.label}\n(never: {never}/{len(steps)})")
        ax.boxplot(data, showfliers=False)
        rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
        for k, values in enumerate(data, 1):
            ax.scatter(k + rng.uniform(-0.15, 0.15, len(values)), values, s=8, alpha=0.5, color="black")
        ax.set_xticks(range(1, len(runs) + 1), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("forget step")
        ax.set_title(f"Forget-step spread, TOFU {summary.split}")
        paths.append(_save(fig, out / f"fig1b_forget_steps_{summary.split}.png"))
    return paths


def forget_ratio_sweep(summaries: Sequence[SplitSummary], methods: Sequence[str], out: Path) -> list[Path]:
    """Fig. 3: FQ and MU of the selected runs against the forget split, for the base methods in ``methods``."""
    if len(summaries) < 2:
        return []
    series: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    for summary in summaries:
        for run, _ in summary.selected:
            if run.method in methods:
                series[run.label][summary.split] = (run.metric("forget_quality"), run.metric("model_utility"))
    if not series:
        return []
    splits = [s.split for s in summaries]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, points in series.items():
        x = [k for k, s in enumerate(splits) if s in points]
        axes[0].plot(x, [_fq(points[splits[k]][0]) for k in x], marker="o", label=label)
        axes[1].plot(x, [points[splits[k]][1] or math.nan for k in x], marker="o", label=label)
    for ax, name in ((axes[0], "FQ"), (axes[1], "MU")):
        ax.set_xticks(range(len(splits)), splits)
        ax.set_xlabel("forget split")
        ax.set_ylabel(name)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.suptitle("Forget-ratio sweep (selected run per split)")
    return [_save(fig, out / "fig3_forget_ratio.png")]


ROBUSTNESS_PANELS = tuple(
    m for m in TOFU_RECOVERED if m.key in ("forget_Q_A_ROUGE", "forget_Q_A_Prob", "forget_quality")
)
"""The recovered metrics the robustness figure draws, one row of panels each."""


def _attack_panel(ax, rows: Sequence[AttackRow], key: str, label: str, log: bool) -> None:
    x = np.arange(len(rows))
    for offset, side, shade in ((-0.2, "before", 0.35), (0.2, "after", 1.0)):
        means = np.array([row.values[key][side][0] for row in rows])
        sds = np.array([row.values[key][side][1] for row in rows])
        if log:
            means = np.array([_fq(m) if math.isfinite(m) else math.nan for m in means])
        # Error bars only where a method has several runs (the sd over them).
        errors = np.where(np.isfinite(sds), sds, 0.0) if np.isfinite(sds).any() else None
        label = "unattacked" if side == "before" else "attacked"
        ax.bar(x + offset, means, width=0.4, alpha=shade, color="C0", yerr=errors, capsize=2, label=label)
    ax.set_xticks(x, [row.label for row in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(label)
    if log:
        ax.set_yscale("log")


def robustness(summaries: Sequence[SplitSummary], out: Path) -> list[Path]:
    """Per forget split: forget ROUGE, probability and FQ of each method unattacked and attacked, one column of
    panels per attack (means over the method's runs, sd as error bars)."""
    written = []
    for summary in summaries:
        rows = attack_rows(summary.runs, ROBUSTNESS_PANELS)
        attacks = sorted({row.attack for row in rows})
        if not attacks:
            continue
        fig, axes = plt.subplots(
            len(ROBUSTNESS_PANELS),
            len(attacks),
            figsize=(3.2 * len(attacks), 2.6 * len(ROBUSTNESS_PANELS)),
            squeeze=False,
        )
        for column, attack in enumerate(attacks):
            chosen = [row for row in rows if row.attack == attack]
            for line, metric in enumerate(ROBUSTNESS_PANELS):
                ax = axes[line][column]
                _attack_panel(ax, chosen, metric.key, metric.label, log=metric.key == "forget_quality")
                if line == 0:
                    ax.set_title(attack)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"Attacks on the unlearned model, TOFU {summary.split}")
        written.append(_save(fig, out / f"fig_robustness_{summary.split}.png"))
    return written


def draw_all(
    summaries: Sequence[SplitSummary], rule: SelectionRule, out: Path, fig3_methods: Sequence[str]
) -> list[Path]:
    """Every figure the runs support; returns the files written."""
    return [
        *fq_vs_mu(summaries, out),
        *beta_lambda_heatmaps(summaries, rule, out),
        *per_sample_curves(summaries, out),
        *forget_step_spread(summaries, out),
        *forgetting_balance(summaries, out),
        *tradeoff_curves(summaries, out),
        *forget_ratio_sweep(summaries, fig3_methods, out),
        *robustness(summaries, out),
    ]
