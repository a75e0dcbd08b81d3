"""A callback the kill-and-resume test loads into ``python -m baldro_lightning fit`` by ``class_path``.

The subprocess imports it as ``resume_worker.RecordBatches`` (``tests/`` is put on ``PYTHONPATH``); it appends one
JSON line per training step, so the test can compare which rows an interrupted and resumed run trained on with
the rows of an uninterrupted one.
"""

from __future__ import annotations

import json

import lightning as L


class RecordBatches(L.Callback):
    """Appends ``{"epoch", "step", "batch_idx", "forget", "retain"}`` to ``path`` before every training step."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        record = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "batch_idx": batch_idx,
            "forget": batch["forget"]["index"].tolist(),
            "retain": batch["retain"]["index"].tolist(),
        }
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
