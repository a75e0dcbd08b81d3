"""The in-training evaluation callback: val/* metrics, eval.json per evaluation, per-sample curves, synchrony."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from baldro_lightning.data.datamodule import ForgetRetainDataModule
from baldro_lightning.data.tokenization import load_tokenizer
from baldro_lightning.evaluation.callbacks import TofuEvaluation, per_sample_layout
from baldro_lightning.evaluation.run_record import CURVES
from baldro_lightning.evaluation.tofu import TofuEvaluator, TofuSettings
from baldro_lightning.train.losses import NLL, NPO
from baldro_lightning.train.models import load_causal_lm
from baldro_lightning.train.module import UnlearningModule
from baldro_lightning.train.objectives import DV


def _fit(tmp_path: Path, tiny_model: Path, tiny_benchmark: Path, callback: TofuEvaluation, steps: int = 2):
    module = UnlearningModule(str(tiny_model), NPO(), NLL(), DV(tau=1.0), reference="cached", lr_schedule="constant")
    data = ForgetRetainDataModule(str(tiny_model), str(tiny_benchmark), batch_size=2, max_length=64)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/forget_Q_A_Prob", mode="min")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=TensorBoardLogger(tmp_path, name="tb", version="", default_hp_metric=False),
        callbacks=[callback, checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    return trainer, module, checkpoint


def test_evaluates_at_start_and_every_step_with_curves(tmp_path, tiny_model, tiny_benchmark):
    callback = TofuEvaluation(
        TofuSettings(max_new_tokens=6),
        every_n_steps=1,
        every_epoch=False,
        criterion="rouge",
        dirpath=str(tmp_path / "eval"),
    )
    trainer, module, checkpoint = _fit(tmp_path, tiny_model, tiny_benchmark, callback)

    steps = sorted(p.name for p in (tmp_path / "eval").glob("step_*"))
    assert steps == ["step_000000", "step_000001", "step_000002"]
    result = json.loads((tmp_path / "eval" / "step_000002" / "eval.json").read_text())
    assert result["meta"]["global_step"] == 2
    assert {"forget_truth_ratio", "model_utility", "mia_min_k", "privleak"} <= set(result["metrics"])
    assert result["synchrony"]["criterion"] == "rouge"
    assert set(result["synchrony"]["forget_step_by_index"]) == {"0", "1", "2", "3"}

    for key in ("val/model_utility", "val/forget_truth_ratio", "val/forget_Q_A_Prob"):
        assert key in trainer.callback_metrics
    assert checkpoint.best_model_path, "ModelCheckpoint should have kept a best checkpoint by val/forget_Q_A_Prob"

    with (tmp_path / "eval" / "per_sample.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 3 * 4  # three evaluations x four forget rows
    assert set(table[0]) == {"step", "index", *CURVES, "forget_step"}
    # At the first evaluation the policy is the reference: the log perplexity ratio is exactly 0.
    assert all(float(r["log_ppl_ratio"]) == 0.0 for r in table if r["step"] == "0")
    assert any(float(r["log_ppl_ratio"]) != 0.0 for r in table if r["step"] == "2")
    # DRO weights are recorded once training has seen the rows: a distribution over each batch.
    weights = [float(r["dro_weight"]) for r in table if r["step"] == "2"]
    assert all(0.0 <= w <= 1.0 for w in weights)

    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0]), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert "val/model_utility" in tags["scalars"]
    # The spread over samples, not one chart per sample (that is opt-in, per_sample_scalars).
    quantiles = {f"val_per_sample/{c}/{q}" for c in ("log_ppl_ratio", "truth_ratio") for q in ("q10", "median", "q90")}
    assert quantiles <= set(tags["scalars"])
    assert not [t for t in tags["scalars"] if t.split("/")[-1].isdigit()]
    assert "val_per_sample/truth_ratio" in tags["histograms"]
    assert "val_per_sample/figure" in tags["images"]
    assert "hp_metric" not in tags["scalars"]
    # Train and val first: every other tag group sorts after them.
    groups = {t.split("/")[0] for t in tags["scalars"]} - {"epoch", "train", "val"}
    assert groups == {"val_per_sample"} and sorted(["train", "val", *groups])[-1] == "val_per_sample"
    # Evaluation restored training mode on the policy and left the module usable.
    assert module.policy.training


def test_per_sample_scalars_are_opt_in_and_drawn_in_one_chart_per_curve(tmp_path, tiny_model, tiny_benchmark):
    callback = TofuEvaluation(
        TofuSettings(max_new_tokens=4), criterion="rouge", per_sample_scalars=True, dirpath=str(tmp_path / "eval")
    )
    _fit(tmp_path, tiny_model, tiny_benchmark, callback, steps=1)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    rows = {t for t in accumulator.Tags()["scalars"] if t.startswith("val_per_sample/truth_ratio/0")}
    assert rows == {f"val_per_sample/truth_ratio/{i:04d}" for i in range(4)}


def test_per_sample_layout_has_a_band_chart_per_curve_and_lines_on_request():
    layout = per_sample_layout(samples=False)
    (charts,) = layout.values()
    assert charts["truth_ratio: median, 10-90% of samples"] == [
        "Margin",
        ["val_per_sample/truth_ratio/median", "val_per_sample/truth_ratio/q10", "val_per_sample/truth_ratio/q90"],
    ]
    assert len(charts) == len(CURVES)
    lines = per_sample_layout(samples=True)["per-sample forgetting: one line per sample"]
    assert lines["dro_weight"] == ["Multiline", [r"val_per_sample/dro_weight/\d+"]]


def test_truth_ratio_criterion_reads_the_retain_reference(tmp_path, tiny_model, tiny_benchmark):
    tokenizer = load_tokenizer(str(tiny_model))
    reference = tmp_path / "retain" / "eval.json"
    evaluator = TofuEvaluator(
        str(tiny_benchmark), tokenizer, "forget10", max_length=64, settings=TofuSettings(max_new_tokens=4)
    )
    evaluator.run(load_causal_lm(str(tiny_model), "float32"), reference)

    settings = TofuSettings(retain_reference=str(reference), max_new_tokens=4)
    callback = TofuEvaluation(settings, every_epoch=True, dirpath=str(tmp_path / "eval"))
    trainer, _, _ = _fit(tmp_path, tiny_model, tiny_benchmark, callback, steps=2)
    first = json.loads((tmp_path / "eval" / "step_000000" / "eval.json").read_text())
    # The policy before any update is the model the reference was made from: identical truth ratios.
    assert first["metrics"]["forget_quality"]["agg_value"] == pytest.approx(1.0)
    synchrony = first["synchrony"]
    assert synchrony["criterion"] == "truth_ratio"
    assert {"forget_step_iqr", "forget_step_std", "fraction_never_forgotten", "fraction_over_forgotten"} <= set(
        synchrony
    )
    # Forget steps count from each sample's start: against its own truth ratios, the 2 of 4 samples at or above the
    # retain median are already "forgotten" before any update. They get no step and are counted apart.
    assert synchrony["fraction_forgotten_at_start"] == pytest.approx(0.5)
    fractions = ("fraction_forgotten_at_start", "fraction_forgotten_later", "fraction_never_forgotten")
    assert sum(synchrony[key] for key in fractions) == pytest.approx(1.0)
    assert list(synchrony["forget_step_by_index"].values()) == [None] * 4
    assert "val/forget_quality" in trainer.callback_metrics
    assert "val/fraction_forgotten_at_start" in trainer.callback_metrics


def test_retain_quantiles_must_be_ordered():
    with pytest.raises(ValueError, match=r"retain_quantiles must be \(forgotten, over-forgotten\)"):
        TofuEvaluation(criterion="rouge", retain_quantiles=(0.9, 0.5))


def test_truth_ratio_criterion_without_reference_is_an_error():
    with pytest.raises(ValueError, match="retain_reference"):
        TofuEvaluation(criterion="truth_ratio")
