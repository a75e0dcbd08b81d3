"""Per-sample figure pieces: quantiles over samples, the forget-step order, colour range, log-axis labels, figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from baldro_lightning.evaluation.per_sample_figure import (
    _two_and_five,
    color_limit,
    forget_order,
    quantile_bands,
    run_figure,
)
from baldro_lightning.evaluation.run_record import SampleCurves


def test_quantile_bands_over_samples_ignore_nan():
    matrix = np.array([[0.0, 1.0, 2.0, 3.0, 4.0], [np.nan, np.nan, 5.0, np.nan, np.nan], [np.nan] * 5])
    bands = quantile_bands(matrix)
    # Linear interpolation over [0, 1, 2, 3, 4]: 10% -> 0.4, 25% -> 1, median 2, 75% -> 3, 90% -> 3.6.
    np.testing.assert_allclose(bands[:, 0], [0.4, 1.0, 2.0, 3.0, 3.6])
    np.testing.assert_allclose(bands[:, 1], [5.0] * 5)  # one sample with a value: every quantile is it
    assert np.isnan(bands[:, 2]).all()


def test_samples_are_ordered_by_forget_step_never_forgotten_last():
    order = forget_order(np.array([20.0, math.nan, 10.0, 20.0]), np.array([0, 1, 2, 3]))
    np.testing.assert_array_equal(order, [2, 0, 3, 1])


def test_colour_limit_is_robust_to_one_outlier():
    values = np.append(np.arange(100.0), 500.0)
    assert color_limit([values[None, :]]) == pytest.approx(np.quantile(np.abs(values), 0.98))
    assert color_limit([np.zeros((2, 3))]) == 1.0
    assert color_limit([np.full((1, 2), np.nan)]) == 1.0


@pytest.mark.parametrize(("value", "label"), [(0.2, "0.2"), (0.5, "0.5"), (5.0, "5"), (0.3, ""), (7.0, ""), (0.0, "")])
def test_minor_log_labels_only_at_two_and_five(value, label):
    assert _two_and_five(value, 0) == label


def test_run_figure_draws_four_panels_with_and_without_dro_weights():
    steps = np.array([0.0, 5.0, 10.0])
    values = {
        "log_ppl_ratio": np.array([[0.0, 0.0, 0.0], [0.2, 0.5, 0.1], [0.6, 1.2, 0.2]]),
        "truth_ratio": np.array([[0.5, 0.6, 0.7], [0.6, 0.9, 0.7], [0.8, 1.5, 0.7]]),
        "rougeL_recall": np.ones((3, 3)),
        "dro_weight": np.full((3, 3), np.nan),
    }
    curves = SampleCurves(steps, np.array([0, 1, 2]), values, np.array([5.0, 10.0, math.nan]))
    fig = run_figure(curves, "a run", retain_band=(0.4, 1.2))
    assert isinstance(fig, Figure)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "no values yet" in texts  # the DRO-weight panel of a run without weights says so
    assert {"forgotten", "over-forgotten"} <= set(texts)
    truth = next(ax for ax in fig.axes if ax.get_ylabel().startswith("truth ratio"))
    assert truth.get_yscale() == "log"
