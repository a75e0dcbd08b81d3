"""``python -m baldro_lightning {fit,validate,test} --config X.yaml``: LightningCLI over the project's modules.

The project's LightningModules, data modules, losses, objectives and callbacks are imported here so that
jsonargparse knows them as subclasses of the types the CLI asks for: short class names then work on the command
line and in YAML (``--model UnlearningModule``, ``--model.forget_objective DV``), besides full ``class_path``\\ s.
"""

from __future__ import annotations

import os

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

# Imported for their classes (see the module docstring), not called here.
from baldro_lightning.data import datamodule, muse  # noqa: F401
from baldro_lightning.evaluation import callbacks  # noqa: F401
from baldro_lightning.train import export, losses, module, objectives, sharding  # noqa: F401

# Losses, objectives and LoRA options are dataclasses documented field by field; without this, --help shows no
# description for their arguments.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


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
