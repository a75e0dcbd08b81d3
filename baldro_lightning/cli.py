"""``python -m baldro_lightning {fit,validate,test} --config X.yaml``: LightningCLI over the project's modules.

The project's LightningModules, data modules, losses, objectives and callbacks are imported here so that
jsonargparse knows them as subclasses of the types the CLI asks for: short class names then work on the command
line and in YAML (``--model UnlearningModule``, ``--model.forget_objective DV``), besides full ``class_path``\\ s.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

# Imported for their classes (see the module docstring); callbacks and export also for the run-directory check.
from baldro_lightning.data import datamodule, muse  # noqa: F401
from baldro_lightning.evaluation import callbacks
from baldro_lightning.evaluation.run_record import PER_SAMPLE_CSV, default_eval_dir
from baldro_lightning.train import checkpointing, export, losses, module, objectives, sharding  # noqa: F401

log = logging.getLogger(__name__)

# Losses, objectives and LoRA options are dataclasses documented field by field; without this, --help shows no
# description for their arguments.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class BaldroCLI(LightningCLI):
    """Any LightningModule/DataModule by ``class_path``; the tokenizer follows the model unless set.

    ``--trainer.default_root_dir`` is the run directory: the logger's ``save_dir`` is linked to it (one given in a
    config is replaced), so the saved ``config.yaml``, checkpoints and evaluations (under the logger's directory)
    follow it, and so does the exported model (``ExportPretrained`` without a ``dirpath``). Composed configs thus
    name a run once, on the command line. ``fit`` refuses a directory that holds another run's outputs unless
    ``--ckpt_path`` resumes that run or ``--overwrite=true`` deletes them (:func:`claim_run_directory`).
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model", "data.init_args.tokenizer")
        # Lightning's own rule for the directory: the working directory when none is given.
        parser.link_arguments(
            "trainer.default_root_dir", "trainer.logger.init_args.save_dir", compute_fn=_run_directory
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: delete the outputs of an earlier run in the run directory (--trainer.default_root_dir) and "
            "start afresh; without it, fit refuses such a directory unless --ckpt_path resumes that run",
        )

    # -- one directory per run ----------------------------------------------------------------------------------
    def before_fit(self) -> None:
        config = self.config[self.subcommand]
        claim_run_directory(self.trainer, config.get("ckpt_path"), bool(config.get("overwrite")))
        # The flag acts once, on the directory as found: the saved config.yaml must not carry it, or fitting that
        # config again would delete this run.
        config["overwrite"] = False


def _run_directory(default_root_dir: str | None) -> str:
    return os.getcwd() if default_root_dir is None else default_root_dir


class RunDirectoryError(ValueError):
    """``fit`` would write into a directory that holds another run's outputs."""


def _listed(directory: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted(path for pattern in patterns for path in directory.glob(pattern)) if directory.is_dir() else []


def run_outputs(trainer: L.Trainer) -> list[Path]:
    """What a fit with ``trainer`` writes that is already on disk: an earlier run's logs, checkpoints, evaluations
    and exported model where this one would put its own.

    The logger's files (TensorBoard events, ``hparams.yaml``, ``metrics.csv``; not ``config.yaml``, which may be the
    input config itself), every ``ModelCheckpoint``'s ``*.ckpt``, every evaluation callback's ``step_*`` and
    ``per_sample.csv``, and a non-empty export directory.
    """
    log_dir = checkpointing.log_directory(trainer)
    found = _listed(log_dir, ("events.out.tfevents.*", "hparams.yaml", "metrics.csv"))
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint):
            found += _listed(Path(callback.dirpath or log_dir / "checkpoints"), ("*.ckpt",))
        elif isinstance(callback, callbacks.ScheduledEvaluation):
            eval_dir = Path(callback.dirpath) if callback.dirpath else default_eval_dir(log_dir)
            found += _listed(eval_dir, ("step_*", PER_SAMPLE_CSV))
        elif isinstance(callback, export.ExportPretrained):
            directory = callback.directory(trainer)
            if directory.is_dir() and any(directory.iterdir()):
                found.append(directory)
    return list(dict.fromkeys(found))


def claim_run_directory(trainer: L.Trainer, ckpt_path: str | None, overwrite: bool) -> None:
    """Refuse to fit where another run's outputs are, unless resuming that run or told to overwrite them.

    Args:
        trainer: The trainer about to fit (nothing written yet).
        ckpt_path: ``--ckpt_path``: a resume, which continues the run whose outputs are there.
        overwrite: ``--overwrite``: delete those outputs first (on global rank 0) and start afresh.

    Raises:
        RunDirectoryError: outputs are there and neither flag says what to do with them, or both flags are given.
    """
    found = run_outputs(trainer)
    if not found:
        return
    root = trainer.default_root_dir
    if ckpt_path is not None and overwrite:
        raise RunDirectoryError(
            f"--overwrite=true deletes the run in --trainer.default_root_dir={root}, --ckpt_path={ckpt_path} resumes "
            "it: pass one of them"
        )
    if ckpt_path is not None:
        return
    if overwrite:
        if rank_zero_only.rank == 0:
            for path in found:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            log.warning("--overwrite: removed %d outputs of the earlier run in %s", len(found), root)
        return
    last = [str(p) for p in found if p.name == "last.ckpt"]
    shown = ", ".join(map(str, found[:4])) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    raise RunDirectoryError(
        f"--trainer.default_root_dir={root} holds another run's outputs ({shown}); a new run there would mix its "
        f"files with them. Resume that run with --ckpt_path={last[0] if last else '<its checkpoint>'}, give this "
        "run its own directory with --trainer.default_root_dir, or pass --overwrite=true to delete them and start "
        "again"
    )


def cli_main(args: list[str] | None = None, run: bool = True) -> BaldroCLI:
    """Build (and with ``run``, run) the CLI on ``args``, or on the process's command line when None."""
    return BaldroCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )
