"""A callback that tests/test_distributed_resume.py loads into ``python -m baldro_lightning fit`` by ``class_path``.

The 2-process run imports it as ``distributed_resume_worker.RecordSteps`` (``tests/`` is put on ``PYTHONPATH``).
Each rank appends to its own file, so the test can compare, step by step and rank by rank, which forget rows an
interrupted-and-resumed run trained on and the loss it logged with those of an uninterrupted run.
"""

from __future__ import annotations

import json

import lightning as L
from worker_setup import is_sharded


class RecordSteps(L.Callback):
    """Appends ``{"step", "forget", "loss"}`` per training step to ``<path>.rank<k>``; ``{"sharded"}`` at start."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, trainer: L.Trainer, record: dict) -> None:
        with open(f"{self.path}.rank{trainer.global_rank}", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Whether FSDP2 really sharded the policy: every parameter a DTensor.
        self._write(trainer, {"sharded": is_sharded(pl_module.policy)})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        record = {
            "step": trainer.global_step,
            "forget": batch["forget"]["index"].tolist(),
            "loss": float(trainer.callback_metrics["train/loss"]),
        }
        self._write(trainer, record)
