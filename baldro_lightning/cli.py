"""``python -m baldro_lightning {fit,validate,test} --config X.yaml``: LightningCLI over our modules."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI


class BaldroCLI(LightningCLI):
    """Any LightningModule/DataModule by ``class_path``; the tokenizer follows the model unless set."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model", "data.init_args.tokenizer")


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
