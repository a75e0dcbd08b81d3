"""PNG figures of :mod:`baldro_lightning.analysis.report`, after the paper's Figs. 1, 3 and 4 plus an FQ-vs-MU scatter.

Each function draws one figure from already-selected runs and returns the paths it wrote; a figure whose data the
runs do not hold (one forget split only, no beta/lambda grid, no per-sample table) is skipped, not drawn empty.

Figures are sized for a paper: :data:`PAPER_WIDTH` inches wide (two columns), fonts of 7-9 pt (:data:`PAPER_STYLE`),
legends outside the data, one colour per DRO variant (:data:`VARIANT_COLORS`) or per base method, and medians drawn
wherever a distribution is.
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
from baldro_lightning.evaluation.per_sample_figure import LABELS, color_limit, draw_bands, draw_heatmap
from baldro_lightning.evaluation.run_record import SampleCurves, read_sample_curves
from baldro_lightning.robustness.recovery import TOFU_RECOVERED

MARKERS = {"": "o", "BalDRO-G": "s", "BalDRO-DV": "^", "BalDRO-DV (released sign)": "v"}
VARIANT_COLORS = {
    "": "tab:blue",
    "BalDRO-G": "tab:orange",
    "BalDRO-DV": "tab:green",
    "BalDRO-DV (released sign)": "tab:red",
}
"""One colour per DRO variant, the same in every figure (the default cycle's first four, as in the balance figure)."""
SHORT_VARIANT = {"": "Mean", "BalDRO-G": "G", "BalDRO-DV": "DV", "BalDRO-DV (released sign)": "DV rel."}
"""Variant names where a tick label has little room."""
FQ_FLOOR = 1e-30
"""FQ is drawn on a log axis; a p-value of exactly 0 is drawn here."""
PAPER_WIDTH = 7.0
"""Inches: the text width of a two-column paper, the width of the redrawn figures."""
PAPER_STYLE = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "figure.titlesize": 10,
}
"""Font sizes that stay readable when a :data:`PAPER_WIDTH` figure is printed at that width."""


def _colors(methods: Sequence[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: cycle[k % len(cycle)] for k, m in enumerate(dict.fromkeys(methods))}


def _save(fig, path: Path, dpi: int = 120) -> Path:
    if not fig.get_layout_engine():
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _variant_label(variant: str) -> str:
    return variant or "Mean"


def _fq(value: float | None) -> float:
    return math.nan if value is None else max(value, FQ_FLOOR)


def fq_vs_mu(summaries: Sequence[SplitSummary], out: Path) -> list[Path]:
    """Every run's final FQ (log) against MU, one panel per forget split; Original, Retain and the MU threshold.

    Colour is the base method, the marker the DRO variant; points are translucent with white edges so that
    coinciding runs stay visible, and the legend sits below the panels, off the data.
    """

    if not summaries:
        return []
    colors = _colors([r.method for s in summaries for r in s.runs])
    with plt.rc_context(PAPER_STYLE):
        fig, axes = plt.subplots(
            1, len(summaries), figsize=(PAPER_WIDTH, 2.7), squeeze=False, layout="constrained", sharey=True
        )
        for ax, summary in zip(axes[0], summaries, strict=True):
            for run in summary.runs:
                ax.scatter(
                    run.metric("model_utility") or math.nan,
                    _fq(run.metric("forget_quality")),
                    color=colors[run.method],
                    marker=MARKERS.get(run.variant, "x"),
                    s=22,
                    alpha=0.7,
                    edgecolors="white",
                    linewidths=0.4,
                )
            for name, result, color in (("Original", summary.original, "black"), ("Retain", summary.retain, "green")):
                mu = metric_value(result, "model_utility")
                fq = metric_value(result, "forget_quality") if name == "Original" else 1.0
                if mu is not None:
                    ax.scatter(mu, _fq(fq), color=color, marker="*", s=90, zorder=3, edgecolors="white", linewidths=0.5)
            if summary.threshold is not None:
                ax.axvline(summary.threshold, color="grey", linestyle="--", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xlabel("model utility (MU)")
            ax.set_title(f"TOFU {summary.split}")
            ax.grid(alpha=0.3, linewidth=0.5)
        axes[0][0].set_ylabel("forget quality (FQ)")
        handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=m) for m, c in colors.items()]
        handles += [
            plt.Line2D([], [], color="grey", marker=mk, linestyle="", label=_variant_label(v))
            for v, mk in MARKERS.items()
        ]
        handles += [
            plt.Line2D([], [], color="black", marker="*", markersize=9, linestyle="", label="Original"),
            plt.Line2D([], [], color="green", marker="*", markersize=9, linestyle="", label="Retain"),
            plt.Line2D([], [], color="grey", linestyle="--", label="MU threshold"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False)
        return [_save(fig, out / "fig_fq_vs_mu.png", dpi=200)]


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
    """Fig. 1a: how the forget samples' forgetting spreads out over training, per DRO variant.

    One figure per (forget split, base method). Top: the median over samples with the 25-75% band of each
    selected variant, overlaid, for the log perplexity ratio to the model before unlearning (> 0: forgotten), the
    truth ratio (log scale) and the DRO weight. Bottom: one heat map per variant, every sample a row sorted by its
    forget step, on one colour scale.
    """
    paths = []
    for summary in summaries:
        for method, entries in selected_by_method(summary, lambda run: run.per_sample).items():
            curves = [(run, read_sample_curves(path)) for run, path in entries]
            paths.append(_per_sample_figure(summary.split, method, curves, out))
    return paths


def _per_sample_figure(split: str, method: str, runs: Sequence[tuple[RunResult, SampleCurves]], out: Path) -> Path:
    overlay = ((1, 3, 0.2),)  # the 25-75% band only: four variants' 10-90% bands would cover each other
    limit = color_limit([c.values["log_ppl_ratio"] for _, c in runs])
    with plt.rc_context(PAPER_STYLE):
        fig = plt.figure(figsize=(PAPER_WIDTH, 5.2), layout="constrained")
        top, bottom = fig.subfigures(2, 1, height_ratios=(1.0, 1.15))
        axes = top.subplots(1, 3)
        for run, curves in runs:
            color = VARIANT_COLORS.get(run.variant, "black")
            for ax, curve in zip(axes, ("log_ppl_ratio", "truth_ratio", "dro_weight"), strict=True):
                if curve in curves.values:
                    draw_bands(
                        ax,
                        curves.steps,
                        curves.values[curve],
                        color,
                        _variant_label(run.variant),
                        log=curve == "truth_ratio",
                        bands=overlay,
                    )
        for ax, curve in zip(axes, ("log_ppl_ratio", "truth_ratio", "dro_weight"), strict=True):
            ax.set_xlabel("step")
            ax.set_ylabel(LABELS[curve])
            ax.grid(alpha=0.3, linewidth=0.5)
        axes[0].axhline(0.0, color="grey", linewidth=0.6)
        axes[0].set_title("forgetting (median, 25-75%)")
        axes[1].set_title("truth ratio")
        axes[2].set_title("DRO weight")
        top.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", frameon=False)
        maps = bottom.subplots(1, len(runs), sharey=True, squeeze=False)[0]
        image = None
        for ax, (run, curves) in zip(maps, runs, strict=True):
            image = draw_heatmap(ax, curves, limit=limit)
            ax.set_title(_variant_label(run.variant), color=VARIANT_COLORS.get(run.variant, "black"), fontsize=8)
            if ax is not maps[0]:
                ax.set_ylabel("")
        bottom.colorbar(image, ax=list(maps), label="log(PPL / PPL before)", shrink=0.9)
        fig.suptitle(f"Per-sample forgetting, {method}, TOFU {split}")
        return _save(fig, out / f"fig1a_curves_{split}_{method}.png", dpi=200)


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
    """Fig. 1b: the distribution of per-sample forget steps of each selected run, one panel per base method.

    Within a panel each DRO variant is a box (quartiles, whiskers at 10% and 90%) over the samples that were
    forgotten, with the samples as jittered dots and the median as a thick line with its value; the share never
    forgotten, which a box cannot show, is written at the foot of each variant's column.
    """
    paths = []
    for summary in summaries:
        groups = selected_by_method(summary, lambda run: run.final.get("synchrony", {}).get("forget_step_by_index"))
        if not groups:
            continue
        columns = min(3, len(groups))
        rows = math.ceil(len(groups) / columns)
        with plt.rc_context(PAPER_STYLE):
            fig, axes = plt.subplots(
                rows, columns, figsize=(PAPER_WIDTH, 2.3 * rows + 0.4), squeeze=False, sharey=True, layout="constrained"
            )
            rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
            for ax, (method, entries) in zip(axes.flat, groups.items(), strict=False):
                _forget_step_panel(ax, method, entries, rng)
            for ax in axes.flat[len(groups) :]:
                ax.set_visible(False)
            low, high = axes.flat[0].get_ylim()
            axes.flat[0].set_ylim(low - 0.2 * (high - low), high)  # room for the "never" shares under the data
            for row in axes:
                row[0].set_ylabel("forget step")
            fig.suptitle(f"Forget-step spread, TOFU {summary.split} (narrower = forgotten more together)")
            paths.append(_save(fig, out / f"fig1b_forget_steps_{summary.split}.png", dpi=200))
    return paths


def _forget_step_panel(ax, method: str, entries: Sequence[tuple[RunResult, dict]], rng: np.random.Generator) -> None:
    labels = []
    for k, (run, by_index) in enumerate(entries, 1):
        steps = [float(v) for v in by_index.values() if v is not None]
        color = VARIANT_COLORS.get(run.variant, "black")
        never = 1 - len(steps) / max(len(by_index), 1)
        labels.append(SHORT_VARIANT.get(run.variant, run.variant))
        # Inside the axes, under the box: the share a box of forget steps cannot show.
        ax.text(k, 0.02, f"{never:.0%}\nnever", transform=ax.get_xaxis_transform(), ha="center", fontsize=6)
        if not steps:
            continue
        ax.boxplot(
            [steps],
            positions=[k],
            widths=0.55,
            whis=(10, 90),
            showfliers=False,
            patch_artist=True,
            boxprops={"facecolor": color, "alpha": 0.25, "edgecolor": color},
            whiskerprops={"color": color},
            capprops={"color": color},
            medianprops={"color": "black", "linewidth": 2},
        )
        ax.scatter(k + rng.uniform(-0.18, 0.18, len(steps)), steps, s=4, alpha=0.45, color=color, linewidths=0)
        median = float(np.median(steps))
        ax.annotate(f"{median:g}", (k + 0.3, median), fontsize=6.5, va="center")
    ax.set_xticks(range(1, len(entries) + 1), labels)
    ax.set_xlim(0.4, len(entries) + 0.7)
    ax.set_title(method)
    ax.grid(axis="y", alpha=0.3, linewidth=0.5)


def forget_ratio_sweep(summaries: Sequence[SplitSummary], methods: Sequence[str], out: Path) -> list[Path]:
    """Fig. 3: FQ and MU of the selected runs against the forget split, for the base methods in ``methods``.

    Colour is the base method, marker and line style the DRO variant; each variant is shifted a little along x so
    that runs with equal values do not hide each other, and the legend sits below the panels.
    """
    if len(summaries) < 2:
        return []
    series: dict[tuple[str, str], dict[str, tuple[float | None, float | None]]] = defaultdict(dict)
    for summary in summaries:
        for run, _ in summary.selected:
            if run.method in methods:
                series[(run.method, run.variant)][summary.split] = (
                    run.metric("forget_quality"),
                    run.metric("model_utility"),
                )
    if not series:
        return []
    splits = [s.split for s in summaries]
    colors = _colors([method for method, _ in series])
    variants = list(MARKERS)
    styles = dict(zip(variants, ("-", "--", "-.", ":"), strict=True))
    with plt.rc_context(PAPER_STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(PAPER_WIDTH, 3.0), layout="constrained")
        for (method, variant), points in series.items():
            shift = 0.06 * (variants.index(variant) - 1.5) if variant in variants else 0.0
            x = [k for k, s in enumerate(splits) if s in points]
            style = {
                "color": colors[method],
                "marker": MARKERS.get(variant, "x"),
                "linestyle": styles.get(variant, "-"),
                "markersize": 4,
                "linewidth": 1.2,
                "label": f"{method} + {variant}" if variant else method,
            }
            axes[0].plot([k + shift for k in x], [_fq(points[splits[k]][0]) for k in x], **style)
            axes[1].plot([k + shift for k in x], [points[splits[k]][1] or math.nan for k in x], **style)
        for ax, name in ((axes[0], "forget quality (FQ)"), (axes[1], "model utility (MU)")):
            ax.set_xticks(range(len(splits)), splits)
            ax.set_xlabel("forget split")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3, linewidth=0.5)
        axes[0].set_yscale("log")
        fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncol=4, frameon=False)
        fig.suptitle("Forget-ratio sweep (selected run per split)")
        return [_save(fig, out / "fig3_forget_ratio.png", dpi=200)]


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
        legend = "unattacked" if side == "before" else "attacked"
        ax.bar(x + offset, means, width=0.4, alpha=shade, color="C0", yerr=errors, capsize=2, label=legend)
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
