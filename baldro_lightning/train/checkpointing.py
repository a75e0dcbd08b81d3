"""A run's latest state on disk: ``last.ckpt``, written often and whole, and what a resume from it continues.

Lightning 2.6's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when it saves another checkpoint
(a new best by its ``monitor``, or every N steps/epochs) and, at the end of training, only if it never saved one.
With a monitor, ``last.ckpt`` is therefore the best-scoring state, not the latest; with ``save_top_k=0`` nothing is
written until training ends. :class:`LatestCheckpoint` makes ``last.ckpt`` the latest state (at most N optimizer
steps old) and leaves a best-by-metric file to a separate, ordinary ``ModelCheckpoint``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.compat.proto.event_pb2 import Event, SessionLog

from baldro_lightning.atomic_files import honour_umask, remove_leftovers, replace_path, staging_name

log = logging.getLogger(__name__)


class LatestCheckpoint(ModelCheckpoint):
    """``last.ckpt`` is the run's latest state: saved every N optimizer steps, at each epoch end and when fit ends.

    Each save goes to a staging sibling first and is then renamed into place (swapped in one step for the
    directory an FSDP2 run writes), so a kill while saving leaves the previous ``last.ckpt`` whole. A run resumed
    from any checkpoint of this run directory continues its TensorBoard record from that checkpoint's step: what
    the interrupted run logged after it is marked for TensorBoard to drop (a ``SessionLog.START`` purge event), and
    the evaluation callbacks log again what they had logged at that step.
    """

    def __init__(self, every_n_train_steps: int, dirpath: str | None = None) -> None:
        """Save ``last.ckpt`` every ``every_n_train_steps`` optimizer steps, at every epoch end and at the end.

        Args:
            every_n_train_steps: Optimizer steps between saves; a kill loses at most this many steps of training.
            dirpath: Where ``last.ckpt`` goes; ``<log_dir>/checkpoints`` when null (Lightning's default).
        """
        if every_n_train_steps < 1:
            raise ValueError(
                f"LatestCheckpoint every_n_train_steps must be >= 1, got {every_n_train_steps}; it bounds the steps "
                "a kill loses (trainer.callbacks LatestCheckpoint init_args.every_n_train_steps)"
            )
        # No version counter: the file is always last.ckpt, never last-v1.ckpt beside a stale one (as when this
        # callback's state is not restored because every_n_train_steps, part of its state key, changed).
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            save_top_k=0,
            save_last=True,
            enable_version_counter=False,
        )
        self.latest_step: int | None = None
        """The global step of the state in ``last.ckpt``; None until one is saved (or restored)."""

    # -- when -------------------------------------------------------------------------------------------------
    # every N steps: ModelCheckpoint.on_train_batch_end saves last.ckpt (save_top_k=0 saves nothing else).
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_latest(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_latest(trainer)

    def _save_latest(self, trainer: L.Trainer) -> None:
        # Skips fast_dev_run, sanity checks, other stages and a step already saved.
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # -- how --------------------------------------------------------------------------------------------------
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        final = Path(filepath)
        staging = staging_name(final)
        if trainer.is_global_zero:
            remove_leftovers(final)
        trainer.strategy.barrier("LatestCheckpoint.staging")
        # Set before the save: the checkpoint holds this callback's state.
        self.latest_step = trainer.global_step
        super()._save_checkpoint(trainer, str(staging))
        if trainer.is_global_zero:
            honour_umask(staging)
            replace_path(staging, final)
        trainer.strategy.barrier("LatestCheckpoint.replace")
        self._last_checkpoint_saved = filepath

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "latest_step": self.latest_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.latest_step = state_dict.get("latest_step")

    # -- resume -----------------------------------------------------------------------------------------------
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            purge_tensorboard_from(trainer, int(checkpoint.get("global_step", 0)))


def log_directory(trainer: L.Trainer) -> Path:
    """``trainer.log_dir`` computed on this process alone: the same path, without its broadcast.

    ``Trainer.log_dir`` broadcasts from rank 0, a collective that stalls a distributed run when only rank 0 asks
    (as when rank 0 alone writes a file); this reads the same configuration on whichever rank calls it.
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    return Path(logger.log_dir if isinstance(logger, TensorBoardLogger | CSVLogger) else logger.save_dir)


def purge_tensorboard_from(trainer: L.Trainer, step: int) -> None:
    """Make TensorBoard drop every event at ``step`` or later that earlier sessions of this log directory wrote.

    Writes a ``SessionLog.START`` event at ``step`` into each TensorBoard logger's new event file (what
    ``SummaryWriter(purge_step=step)`` writes); TensorBoard's readers then discard the older events of every tag at
    steps ``>= step``. A resumed run calls this before it logs anything at ``step``: Lightning logs the training
    values of update ``k`` at step ``k - 1``, so an interrupted run's values at ``>= step`` all come from updates
    after the checkpoint, except the evaluations at ``step`` itself, which the evaluation callbacks log again.
    """
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            # The same private writer accessor Lightning's own TensorBoardLogger.log_hyperparams uses.
            writer = logger.experiment._get_file_writer()
            writer.add_event(Event(session_log=SessionLog(status=SessionLog.START)), step=step)
            writer.flush()


def surviving_checkpoints(trainer: L.Trainer | None) -> str:
    """One sentence for an error that stops training: which checkpoints of this run are on disk, or that none is.

    Args:
        trainer: The running trainer (None outside a fit: nothing is known to survive).
    """
    found: list[str] = []
    for callback in [] if trainer is None else trainer.checkpoint_callbacks:
        for path in (callback.last_model_path, callback.best_model_path):
            if path and Path(path).exists() and path not in found:
                step = getattr(callback, "latest_step", None) if path == callback.last_model_path else None
                found.append(path if step is None else f"{path} (global step {step})")
    if not found:
        return "No checkpoint of this run has been saved, so none survives: the run must start again."
    return (
        f"Checkpoints on disk, unchanged by this step: {'; '.join(found)}. Resume from one with --ckpt_path after the "
        "fix (a resume continues this run's record)."
    )
