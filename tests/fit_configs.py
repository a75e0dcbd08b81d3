"""Fit configs and benchmarks written on the fly for tests that launch ``python -m baldro_lightning fit``.

The resume tests (one process and FSDP2) need the same small NPO run with a different trainer around it; the
config is written as JSON, which LightningCLI reads as YAML.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def benchmark_with_forget_rows(tiny_benchmark: Path, root: Path, rows: int) -> Path:
    """A copy of the tiny benchmark whose forget10 is the last ``rows`` rows of ``full`` and retain90 the rest."""
    benchmark = Path(shutil.copytree(tiny_benchmark, root))
    lines = (benchmark / "full.jsonl").read_text().splitlines()
    (benchmark / "forget10.jsonl").write_text("\n".join(lines[-rows:]) + "\n")
    (benchmark / "retain90.jsonl").write_text("\n".join(lines[:-rows]) + "\n")
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
