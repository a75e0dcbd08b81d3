"""Fit configs and benchmarks written on the fly for tests that launch ``python -m baldro_lightning fit``.

The resume tests (one process and FSDP2) need the same small NPO run with a different trainer around it; the
config is written as JSON, which LightningCLI reads as YAML. :func:`write_record_config` adds what the shipped
configs record (TensorBoard, evaluations, checkpoints, export), for the tests that compare records.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from conftest import tiny_full_rows

from baldro_lightning.evaluation.command import main as evaluate_main


def benchmark_with_forget_rows(tiny_benchmark: Path, root: Path, rows: int) -> Path:
    """A copy of the tiny benchmark whose forget10 is the last ``rows`` rows of ``full`` and retain90 the rest;
    forget10_perturbed holds the same questions in the same order, as the data checks require."""
    benchmark = Path(shutil.copytree(tiny_benchmark, root))
    lines = (benchmark / "full.jsonl").read_text().splitlines()
    (benchmark / "forget10.jsonl").write_text("\n".join(lines[-rows:]) + "\n")
    (benchmark / "retain90.jsonl").write_text("\n".join(lines[:-rows]) + "\n")
    perturbed = [json.dumps({**row, "idx": i}) for i, row in enumerate(tiny_full_rows()[-rows:])]
    (benchmark / "forget10_perturbed.jsonl").write_text("\n".join(perturbed) + "\n")
    return benchmark


def write_npo_fit_config(
    run: Path,
    model: Path,
    benchmark: Path,
    callbacks: list[dict],
    *,
    trainer: dict[str, Any] | None = None,
    model_args: dict[str, Any] | None = None,
    data_args: dict[str, Any] | None = None,
) -> Path:
    """``run/config.yaml``: NPO + NLL retain on CPU with a constant lr, no logger; ``trainer``, ``model_args`` and
    ``data_args`` add to or replace the defaults."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run),
            "callbacks": callbacks,
            **(trainer or {}),
        },
        "model": {
            "class_path": "baldro_lightning.train.module.UnlearningModule",
            "init_args": {
                "model": str(model),
                "forget_loss": "baldro_lightning.train.losses.NPO",
                "retain_loss": "baldro_lightning.train.losses.NLL",
                # Constant: a schedule over max_steps would differ between a stopped run and a full one.
                "lr_schedule": "constant",
                **(model_args or {}),
            },
        },
        "data": {
            "class_path": "baldro_lightning.data.datamodule.ForgetRetainDataModule",
            "init_args": {"benchmark": str(benchmark), "batch_size": 1, **(data_args or {})},
        },
    }
    run.mkdir(parents=True, exist_ok=True)
    path = run / "config.yaml"
    path.write_text(json.dumps(config, indent=1))
    return path


CHECKPOINT_EVERY, EVALUATE_EVERY = 4, 2
"""The record configs' schedule: last.ckpt every 4 optimizer steps (and at epoch ends), an evaluation every 2."""


def make_retain_reference(model: Path, benchmark: Path, out: Path) -> Path:
    """``out``: the TOFU evaluation of ``model`` on ``benchmark`` (forget10), as a truth-ratio retain reference."""
    evaluate_main(["--model", str(model), "--benchmark", str(benchmark), "--max_new_tokens", "4", "--out", str(out)])
    return out


def write_record_config(
    run: Path,
    model: Path,
    benchmark: Path,
    reference: Path,
    pause_at: int | None = None,
    trainer: dict[str, Any] | None = None,
    model_args: dict[str, Any] | None = None,
) -> Path:
    """The shipped configs' record in small: TensorBoard, TOFU evaluations with curves and synchrony, a best and a
    latest checkpoint, the export; 2 epochs. ``pause_at`` holds the run at that step for the test to kill it
    (``resume_worker.PauseAt``); ``trainer`` and ``model_args`` add to or replace the run's settings."""
    callbacks = [
        {
            "class_path": "baldro_lightning.evaluation.callbacks.TofuEvaluation",
            "init_args": {
                "settings": {"retain_reference": str(reference), "max_new_tokens": 4},
                "every_n_steps": EVALUATE_EVERY,
                "criterion": "truth_ratio",
            },
        },
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"monitor": "val/forget_quality", "mode": "max", "filename": "best-{epoch}-{step}"},
        },
        {
            "class_path": "baldro_lightning.train.checkpointing.LatestCheckpoint",
            "init_args": {"every_n_train_steps": CHECKPOINT_EVERY},
        },
        {"class_path": "baldro_lightning.train.export.ExportPretrained"},
    ]
    if pause_at is not None:
        # After the evaluation callback, so the evaluation of that step is on disk when the run is killed.
        pause = {"step": pause_at, "marker": str(run / "paused")}
        callbacks.insert(1, {"class_path": "resume_worker.PauseAt", "init_args": pause})
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        # As the shipped configs: no hp_metric placeholder, which every (re)start would log again at step 0.
        "init_args": {"name": "tensorboard", "version": "", "default_hp_metric": False, "flush_secs": 1},
    }
    return write_npo_fit_config(
        run,
        model,
        benchmark,
        callbacks,
        trainer={"max_epochs": 2, "logger": logger, "log_every_n_steps": 1, **(trainer or {})},
        model_args={"reference": "cached", **(model_args or {})},
        data_args={"max_length": 64},
    )
