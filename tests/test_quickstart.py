"""The quickstart's own logic: threads for the free cores, the expected range and how a phase is announced."""

from __future__ import annotations

import os

import pytest

from baldro_lightning.embedded import quickstart
from baldro_lightning.evaluation.callbacks import EvaluationProgress, headline_text


@pytest.mark.parametrize(
    ("cores", "busy", "threads"),
    [(2, 0.0, 2), (2, 0.1, 2), (2, 0.7, 1), (2, 9.0, 1), (8, 2.6, 5), (8, 2.4, 6), (1, 0.0, 1), (16, 0.0, 16)],
)
def test_threads_are_the_free_cores(cores, busy, threads):
    # round(cores - busy), between 1 and cores: 8 - 2.6 = 5.4 -> 5; 8 - 2.4 = 5.6 -> 6; 2 - 9 < 1 -> 1.
    assert quickstart.threads_for_free_cores(cores, busy) == threads


def test_busy_cores_is_a_share_of_the_machine():
    busy = quickstart.busy_cores_now(interval=0.05)
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9


def test_final_metrics_are_checked_against_the_measured_range(monkeypatch):
    monkeypatch.setattr(quickstart, "EXPECTED_FINAL", {"model_utility": (0.55, 0.75), "forget_Q_A_ROUGE": (0.2, 0.5)})
    lines = quickstart.within_expected({"model_utility": 0.699, "forget_Q_A_ROUGE": 0.61})
    assert lines[0].split() == ["model_utility", "0.699", "expected", "0.55..0.75:", "inside"]
    assert lines[1].split() == ["forget_Q_A_ROUGE", "0.61", "expected", "0.2..0.5:", "OUTSIDE"]
    assert quickstart.within_expected({})[0].endswith("not evaluated")


def test_every_phase_has_an_expected_duration():
    assert set(quickstart.PHASES) == set(quickstart.IDLE_SECONDS)


def test_a_phase_is_announced_before_it_runs(capsys):
    quickstart.announce(2, "target")
    quickstart.announce(3, "retain", skipped="models/embedded/retain90 exists")
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"[quickstart] 2/5 {quickstart.PHASES['target']}"
    assert out[2].startswith(f"  about {quickstart.IDLE_SECONDS['target']:.0f} s on an idle 2-core CPU; using ")
    assert out[-1].endswith("skipped, models/embedded/retain90 exists")


def test_evaluation_progress_opens_a_bar_per_phase():
    progress = EvaluationProgress("evaluation at step 3")
    progress("scoring", 5, 12)
    first = progress._bar
    progress("scoring", 12, 12)
    assert progress._bar is first and first.n == 12
    progress("generating", 3, 4)
    assert progress._bar is not first and progress._bar.n == 3 and progress._bar.total == 4
    progress.close()
    assert progress._bar is None


def test_headline_names_the_step_time_and_main_metrics():
    metrics = {"forget_Q_A_ROUGE": {"agg_value": 0.8125}, "model_utility": {"agg_value": 0.70123}}
    headline = (("forget ROUGE", "forget_Q_A_ROUGE"), ("MU", "model_utility"), ("FQ", "forget_quality"))
    assert headline_text(13, 4.2, metrics, headline) == "evaluation at step 13 (4 s): forget ROUGE 0.812 | MU 0.701"
