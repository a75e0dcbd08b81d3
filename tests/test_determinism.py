"""Same seed, same config, same numbers: two tiny CPU fits log identical losses and write identical eval.json.

Each fit is four optimizer steps (4 forget rows, batch 2, 2 epochs) of NPO + NLL under BalDRO-DV on the tiny
random Llama, with the TOFU evaluation callback (ROUGE criterion; forget and retain metrics, which exercise
likelihoods, generation and ROUGE alike) at the start and after each epoch. A third fit with another data seed
shows that the comparison is sensitive: its losses differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest

from baldro_lightning.data.datamodule import ForgetRetainDataModule
from baldro_lightning.evaluation.callbacks import TofuEvaluation
from baldro_lightning.evaluation.tofu import TofuSettings
from baldro_lightning.train.losses import NLL, NPO
from baldro_lightning.train.module import UnlearningModule
from baldro_lightning.train.objectives import DV

# Written fresh by every evaluation; everything else in eval.json must be reproducible.
VOLATILE_META = {"created", "elapsed_s"}


class TrainLog(L.Callback):
    """Every ``train/*`` value logged at every step, as Python floats."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = trainer.callback_metrics
        self.steps.append({k: float(v) for k, v in logged.items() if k.startswith("train/")})


def fit(out: Path, model: Path, benchmark: Path, seed: int = 0, evaluate: bool = True) -> list[dict[str, float]]:
    L.seed_everything(0)
    log = TrainLog()
    callbacks: list[L.Callback] = [log]
    if evaluate:
        callbacks.append(
            TofuEvaluation(
                TofuSettings(max_new_tokens=4, metric_groups=("forget", "retain")),
                criterion="rouge",
                every_epoch=True,
                dirpath=str(out / "eval"),
            )
        )
    module = UnlearningModule(str(model), NPO(), NLL(), DV(tau=1.0), lr_schedule="constant")
    data = ForgetRetainDataModule(str(model), str(benchmark), batch_size=2, max_length=64, seed=seed)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=callbacks,
    )
    trainer.fit(module, data)
    return log.steps


def eval_results(out: Path) -> dict[str, dict]:
    results = {}
    for path in sorted((out / "eval").glob("step_*/eval.json")):
        result = json.loads(path.read_text())
        result["meta"] = {k: v for k, v in result["meta"].items() if k not in VOLATILE_META}
        results[path.parent.name] = result
    return results


def test_same_seed_gives_identical_losses_and_metrics(tiny_model, tiny_benchmark, tmp_path):
    first = fit(tmp_path / "a", tiny_model, tiny_benchmark)
    second = fit(tmp_path / "b", tiny_model, tiny_benchmark)

    assert len(first) == 4
    assert {"train/loss", "train/forget_loss", "train/retain_loss"} <= set(first[0])
    assert first == second  # exact float equality, step by step

    evals_a, evals_b = eval_results(tmp_path / "a"), eval_results(tmp_path / "b")
    assert sorted(evals_a) == ["step_000000", "step_000002", "step_000004"]
    assert evals_a == evals_b
    assert evals_a["step_000004"]["metrics"]["forget_Q_A_Prob"]["agg_value"] is not None
    table_a = (tmp_path / "a" / "eval" / "per_sample.csv").read_text()
    assert table_a == (tmp_path / "b" / "eval" / "per_sample.csv").read_text()

    # The comparison can fail: another data seed deals other batches, so the losses differ from step 0 on.
    other = fit(tmp_path / "c", tiny_model, tiny_benchmark, seed=1, evaluate=False)
    assert [s["train/loss"] for s in other] != pytest.approx([s["train/loss"] for s in first])
