"""``python -m baldro_lightning {fit,validate,test} --config X.yaml``: LightningCLI over our modules."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.cli import LightningCLI


class BaldroCLI(LightningCLI):
    """Any LightningModule/DataModule by ``class_path``; the tokenizer follows the model unless set.

    ``--trainer.default_root_dir`` is the run directory: the logger's ``save_dir`` is linked to it (one given in a
    config is replaced), so the saved ``config.yaml``, checkpoints and evaluations (under the logger's directory)
    follow it, and so does the exported model (``ExportPretrained`` without a ``dirpath``). Composed configs thus
    name a run once, on the command line.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model", "data.init_args.tokenizer")
        # Lightning's own rule for the directory: the working directory when none is given.
        parser.link_arguments(
            "trainer.default_root_dir", "trainer.logger.init_args.save_dir", compute_fn=_run_directory
        )


def _run_directory(default_root_dir: str | None) -> str:
    return os.getcwd() if default_root_dir is None else default_root_dir


def cli_main(args: list[str] | None = None, run: bool = True) -> BaldroCLI:
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
