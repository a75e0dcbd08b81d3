"""Drawing per-sample forgetting curves so that their spread shows: quantile bands, heat maps, DRO weights.

A hundred overlaid lines hide the one thing the curves are for, how unevenly samples are forgotten. Here every
quantity of :data:`~baldro_lightning.evaluation.run_record.CURVES` is drawn as its median over the forget samples
with the 25-75% and 10-90% bands (:func:`draw_bands`), and every sample stays visible in a heat map of samples x
evaluations, sorted by forget step (:func:`draw_heatmap`). :func:`run_figure` puts one run's four panels together
(TensorBoard's figure); :mod:`baldro_lightning.analysis.figures` draws the report's Fig. 1a from the same pieces.

The sign is the one of ``per_sample.csv``: ``log_ppl_ratio`` > 0 means forgotten. Figures are built on
:class:`matplotlib.figure.Figure` directly, without pyplot's global state, so a training process never keeps them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from baldro_lightning.evaluation.run_record import SampleCurves

LABELS: dict[str, str] = {
    "log_ppl_ratio": "log(PPL / PPL before)",
    "truth_ratio": "truth ratio (log scale)",
    "rougeL_recall": "answer ROUGE-L recall",
    "dro_weight": "DRO weight",
}
"""Axis label of each curve of ``per_sample.csv``."""

LOG_SCALE = frozenset({"truth_ratio"})
"""Curves drawn on a log axis: the truth ratio is a likelihood ratio, spread over orders of magnitude."""

QUANTILES: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
"""The quantiles over samples that :func:`quantile_bands` gives by default; the median is the middle one."""

BANDS: tuple[tuple[int, int, float], ...] = ((0, 4, 0.15), (1, 3, 0.3))
"""(lower, upper position in :data:`QUANTILES`, opacity) of the bands around the median: 10-90%, 25-75%."""


def quantile_bands(matrix: np.ndarray, quantiles: Sequence[float] = QUANTILES) -> np.ndarray:
    """Quantiles over samples at each evaluation, ignoring NaN: (E, N) -> (len(quantiles), E).

    An evaluation where no sample has a value gives NaN (e.g. DRO weights before the first update). Example: one
    evaluation with values [0, 1, 2, 3, 4] has median 2 and 25% quantile 1 (linear interpolation).
    """
    matrix = np.asarray(matrix, dtype=float)
    out = np.full((len(quantiles), matrix.shape[0]), np.nan)
    for row, values in enumerate(matrix):
        finite = values[np.isfinite(values)]
        if finite.size:
            out[:, row] = np.quantile(finite, quantiles)
    return out


def forget_order(forget_step: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Positions that sort samples by forget step, earliest first; never-forgotten (NaN) last; ties by row index.

    Example: forget steps [20, NaN, 10, 20] of rows [0, 1, 2, 3] give [2, 0, 3, 1].
    """
    forget_step = np.asarray(forget_step, dtype=float)
    never = ~np.isfinite(forget_step)
    return np.lexsort((np.asarray(indices), np.where(never, np.inf, forget_step), never))


def draw_bands(
    ax: Axes,
    steps: np.ndarray,
    matrix: np.ndarray,
    color: str,
    label: str,
    log: bool = False,
    bands: Sequence[tuple[int, int, float]] = BANDS,
) -> bool:
    """The median over samples at each evaluation, with quantile bands (:data:`BANDS`: 10-90% and 25-75%).

    Returns False, drawing nothing, when no evaluation has a value.
    """
    qs = quantile_bands(matrix)
    if not np.isfinite(qs[2]).any():
        return False
    if log:
        # A log axis cannot show 0 or negative values: they are left out rather than drawn at the bottom.
        qs = np.where(qs > 0, qs, np.nan)
    for low, high, alpha in bands:
        ax.fill_between(steps, qs[low], qs[high], color=color, alpha=alpha, linewidth=0)
    ax.plot(steps, qs[2], color=color, linewidth=1.8, marker="o", markersize=3, label=label)
    if log:
        ax.set_yscale("log")
        # Plain numbers (0.5, 2) rather than 5x10^-1: a truth ratio is read against 1.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_two_and_five))
    return True


def _two_and_five(value: float, _: int) -> str:
    """Minor log-axis labels at 2 and 5 times a power of ten only (0.2, 0.5, 2, 5), so they do not crowd."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** np.floor(np.log10(value))
    return f"{value:g}" if round(mantissa) in (2, 5) and abs(mantissa - round(mantissa)) < 1e-6 else ""


def color_limit(matrices: Sequence[np.ndarray], quantile: float = 0.98) -> float:
    """The colour range of heat maps: the ``quantile`` of |value| over all matrices, so one outlier does not wash
    out every other sample (1.0 when there are no values). Example: |values| 0..99 once each and 500 -> about 98.
    """
    values = np.concatenate([np.abs(np.asarray(m, dtype=float)).ravel() for m in matrices])
    values = values[np.isfinite(values)]
    return float(np.quantile(values, quantile)) if values.size and np.quantile(values, quantile) > 0 else 1.0


def draw_heatmap(ax: Axes, curves: SampleCurves, curve: str = "log_ppl_ratio", limit: float | None = None):
    """Samples (rows, sorted by forget step, never-forgotten at the bottom) x evaluations, coloured by ``curve``.

    A diverging colour map centred on 0 (blue: the sample became more likely, red: forgotten); ``limit`` fixes the
    colour range (shared between panels), else :func:`color_limit` of this matrix. A white tick marks each sample's
    forget step; a black line separates the samples never forgotten. Returns the image, for a colour bar.
    """
    order = forget_order(curves.forget_step, curves.indices)
    matrix = curves.values[curve][:, order].T  # (N, E)
    span = limit if limit is not None else color_limit([matrix])
    image = ax.imshow(
        matrix,
        aspect="auto",
        interpolation="nearest",
        cmap="RdBu_r",
        norm=TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span),
    )
    steps = curves.steps
    forgotten = curves.forget_step[order]
    rows = np.flatnonzero(np.isfinite(forgotten))
    columns = np.searchsorted(steps, forgotten[rows])
    ax.scatter(columns, rows, marker="|", s=12, color="white", linewidths=0.8)
    never = int((~np.isfinite(forgotten)).sum())
    if never:
        ax.axhline(len(order) - never - 0.5, color="black", linewidth=0.8)
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int))
    ax.set_xticks(ticks, [f"{steps[t]:.0f}" for t in ticks])
    ax.set_xlabel("step")
    ax.set_ylabel(f"forget samples by forget step ({never} never)")
    return image


def run_figure(curves: SampleCurves, title: str, retain_band: tuple[float, float] | None = None) -> Figure:
    """One run's per-sample forgetting, four panels: log PPL ratio and truth ratio as median and quantile bands,
    the heat map of every sample, and the DRO weights.

    Args:
        curves: The run's curves so far.
        title: The figure's title (the run, the step).
        retain_band: The retain model's truth-ratio quantiles that bound forgotten and over-forgotten
            (``TofuEvaluation.retain_quantiles``), drawn on the truth-ratio panel; None to leave them out.
    """
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    steps = curves.steps
    color = "tab:red"
    panels = ((axes[0, 0], "log_ppl_ratio"), (axes[0, 1], "truth_ratio"), (axes[1, 1], "dro_weight"))
    for ax, curve in panels:
        drawn = curve in curves.values and draw_bands(
            ax, steps, curves.values[curve], color, "median", log=curve in LOG_SCALE
        )
        ax.set_xlabel("step")
        ax.set_ylabel(LABELS[curve])
        if not drawn:
            ax.text(0.5, 0.5, "no values yet", ha="center", va="center", transform=ax.transAxes)
    axes[0, 0].axhline(0.0, color="grey", linewidth=0.8)
    axes[0, 0].set_title("forgetting: median, 25-75% and 10-90% of samples", fontsize=10)
    axes[0, 1].set_title("truth ratio (rises as samples are forgotten)", fontsize=10)
    if retain_band is not None:
        for value, name in zip(retain_band, ("forgotten", "over-forgotten"), strict=True):
            axes[0, 1].axhline(value, color="green", linestyle="--", linewidth=1)
            axes[0, 1].annotate(name, (steps[0], value), fontsize=8, color="green", va="bottom")
    axes[1, 1].set_title("DRO weight of each sample's last forget batch", fontsize=10)
    image = draw_heatmap(axes[1, 0], curves)
    axes[1, 0].set_title("every sample: log(PPL / PPL before)", fontsize=10)
    fig.colorbar(image, ax=axes[1, 0], label="log(PPL / PPL before)")
    fig.suptitle(title)
    return fig
