"""Callbacks the kill-and-resume tests load into ``python -m baldro_lightning fit`` by ``class_path``.

The subprocess imports them as ``resume_worker.RecordBatches`` and ``resume_worker.PauseAt`` (``tests/`` is put on
``PYTHONPATH``). ``RecordBatches`` appends one JSON line per training step, so the test can compare which rows an
interrupted and resumed run trained on with the rows of an uninterrupted one; ``PauseAt`` holds a run at a given
step until the test kills it.
"""

from __future__ import annotations

import json
import time

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


class PauseAt(L.Callback):
    """At global step ``step`` (after the evaluations of that step, before its checkpoint), flush the loggers, write
    ``marker`` and wait to be killed: the kill then lands at the same place of every run, with what the run logged
    after its last checkpoint on disk."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.ckpt_path is not None:
            return
        for logger in trainer.loggers:
            logger.save()
            flush = getattr(logger.experiment, "flush", None)
            if flush is not None:
                flush()
        if trainer.is_global_zero:
            with open(self.marker, "w", encoding="utf-8") as handle:
                handle.write(str(trainer.global_step))
        while True:
            time.sleep(1)
