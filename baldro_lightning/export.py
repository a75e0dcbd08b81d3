"""Writing a trained policy as a Hugging Face model directory that ``from_pretrained`` loads."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def save_pretrained_atomic(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` model and tokenizer into a temporary sibling, then rename it into place.

    A run killed while writing leaves the previous directory (or none), never a half-written model.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


class ExportPretrained(Callback):
    """At the end of ``fit``, save the policy (and the data module's tokenizer) to ``dirpath``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        out = save_pretrained_atomic(pl_module.policy, tokenizer, self.dirpath)
        log.warning("exported the trained model to %s", out)
