"""The embedded target and retain models discriminate: the benchmark's reason to exist (slow: trains both)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from baldro_lightning.embedded import quickstart

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory) -> dict[str, dict]:
    """Train (or reuse) models/embedded/{target,retain90}, then evaluate both on forget10."""
    from baldro_lightning.data.tokenization import load_tokenizer
    from baldro_lightning.evaluation.tofu import TofuEvaluator, TofuSettings
    from baldro_lightning.train.models import load_causal_lm

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        quickstart.ensure_base_models()
        quickstart.ensure_retain_reference()
        reference = REPO / quickstart.REFERENCE
        target = REPO / quickstart.MODELS / "target"
        evaluator = TofuEvaluator(
            str(REPO / quickstart.BENCHMARK),
            load_tokenizer(str(target)),
            "forget10",
            max_length=128,
            settings=TofuSettings(max_new_tokens=48, retain_reference=str(reference)),
        )
        out = tmp_path_factory.mktemp("eval") / "target.json"
        evaluator.run(load_causal_lm(str(target), "float32"), out, model_name=str(target))
        return {"target": json.loads(out.read_text()), "retain": json.loads(reference.read_text())}
    finally:
        os.chdir(cwd)


def _agg(result: dict, key: str) -> float:
    return result["metrics"][key]["agg_value"]


@pytest.mark.training
def test_target_knows_forget_and_retain_answers(evaluations):
    assert _agg(evaluations["target"], "forget_Q_A_ROUGE") >= 0.9
    assert _agg(evaluations["target"], "retain_Q_A_ROUGE") >= 0.9


@pytest.mark.training
def test_retain_model_knows_retain_answers_but_not_forget_answers(evaluations):
    assert _agg(evaluations["retain"], "retain_Q_A_ROUGE") >= 0.9
    gap = _agg(evaluations["target"], "forget_Q_A_ROUGE") - _agg(evaluations["retain"], "forget_Q_A_ROUGE")
    assert gap >= 0.3


@pytest.mark.training
def test_forget_quality_of_target_against_retain_is_tiny(evaluations):
    assert _agg(evaluations["target"], "forget_quality") <= 1e-3
