"""The attacks at the end of ``fit``: :class:`AttackEvaluation`, an optional callback after the evaluation callbacks.

It attacks a copy of the final policy (the weights ``fit`` ends with, as the report reads the last evaluation), so
the trained model, its checkpoints and its export are untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

from baldro_lightning.evaluation.muse import MuseSettings
from baldro_lightning.evaluation.run_record import default_attack_dir
from baldro_lightning.evaluation.tofu import TofuSettings
from baldro_lightning.robustness.attacks import Attack, default_attacks
from baldro_lightning.robustness.suite import AttackPlan, check_names, muse_plan, run_attacks, tofu_plan

log = logging.getLogger(__name__)


class AttackEvaluation(Callback):
    """Relearning and quantization attacks on the unlearned policy when ``fit`` ends, each scored before and after.

    Writes the attack directory (``<log_dir>/attacks`` unless ``dirpath``; see
    :mod:`~baldro_lightning.evaluation.run_record`) and logs ``attack/<name>/<metric>`` (the attacked value) and
    ``attack/<name>/<metric>_delta``. Under ``fast_dev_run`` every relearning attack takes one step.
    """

    def __init__(
        self,
        attacks: list[Attack] | None = None,
        settings: TofuSettings | None = None,
        muse_settings: MuseSettings | None = None,
        forget_fraction: float = 0.5,
        split_seed: int = 0,
        muse_chunk_length: int | None = None,
        dirpath: str | None = None,
    ) -> None:
        """Attack the final policy on the trainer's benchmark.

        Args:
            attacks: The attacks (``Relearn``, ``Quantize`` by ``class_path``); relearning on forget and on retain
                rows and 8- and 4-bit quantization when null.
            settings: How each TOFU evaluation runs (retain reference, generation length, ...); TOFU's defaults
                when null.
            muse_settings: The same for a MUSE data module.
            forget_fraction: Share of the forget facts (rows asking one fact stay together) relearning attacks
                train on; they are scored on the rest.
            split_seed: Seeds that split.
            muse_chunk_length: MUSE training chunk length; the data module's ``max_length`` when null.
            dirpath: The attack directory; ``<log_dir>/attacks`` when null.
        """
        self.attacks = list(attacks) if attacks is not None else default_attacks()
        check_names(self.attacks)
        if not 0 < forget_fraction < 1:
            raise ValueError(f"AttackEvaluation forget_fraction must be in (0, 1), got {forget_fraction}")
        self.settings = settings or TofuSettings()
        self.muse_settings = muse_settings or MuseSettings()
        self.forget_fraction = forget_fraction
        self.split_seed = split_seed
        self.muse_chunk_length = muse_chunk_length
        self.dirpath = dirpath
        self.plan: AttackPlan | None = None
        self.records: dict[str, dict] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            raise ValueError(
                "AttackEvaluation runs in one process; with several devices attack the exported model instead: "
                "python -m baldro_lightning attack --model <run>/model ..."
            )
        if self.plan is not None or stage != "fit":
            return
        data = trainer.datamodule
        data.setup(stage)
        name = str(getattr(pl_module, "model_path", "policy"))
        if hasattr(data, "corpus"):
            self.plan = muse_plan(
                data.benchmark,
                data.tokenizer,
                data.corpus,
                self.muse_settings,
                self.forget_fraction,
                self.split_seed,
                name,
                chunk_length=self.muse_chunk_length or data.max_length,
                forget_split=data.forget_split,
                retain_split=data.retain_split,
                template=data.template,
                attention_from=data.attention_from,
            )
        else:
            self.plan = tofu_plan(
                data.benchmark,
                data.tokenizer,
                data.forget_split,
                self.settings,
                self.forget_fraction,
                self.split_seed,
                name,
                template=data.template,
                max_length=data.max_length,
                retain_split=data.retain_split,
                attention_from=data.attention_from,
            )

    def directory(self, trainer: L.Trainer) -> Path:
        """Where the attack directory goes."""
        return Path(self.dirpath) if self.dirpath else default_attack_dir(trainer.log_dir or trainer.default_root_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        attacks = [attack.smoke_sized() for attack in self.attacks] if trainer.fast_dev_run else self.attacks
        self.records = run_attacks(pl_module.policy, attacks, self.plan, self.directory(trainer))
        values = {}
        for name, record in self.records.items():
            for key, entry in record["recovery"].items():
                values[f"attack/{name}/{key}"] = entry["after"]
                values[f"attack/{name}/{key}_delta"] = entry["delta"]
        finite = {key: value for key, value in values.items() if np.isfinite(value)}
        if trainer.logger is not None and finite:
            trainer.logger.log_metrics(finite, step=trainer.global_step)
            trainer.logger.save()
        log.info("attacks written to %s", self.directory(trainer))
