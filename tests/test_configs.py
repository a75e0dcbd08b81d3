"""Every shipped experiment YAML parses and instantiates through LightningCLI, and matches its generator."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from baldro_lightning.cli import BaldroCLI, cli_main
from baldro_lightning.data.muse import MuseDataModule
from baldro_lightning.evaluation.callbacks import MuseEvaluation
from baldro_lightning.train.module import UnlearningModule

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
# Sweep grids are not LightningCLI configs; tests/test_sweep.py checks them and parses a run of each config.
CONFIGS = sorted(p for p in EXPERIMENTS.glob("**/*.yaml") if p.relative_to(EXPERIMENTS).parts[0] != "sweeps")


def _generator():
    spec = importlib.util.spec_from_file_location("generate_configs", EXPERIMENTS / "generate_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_exist():
    assert len(CONFIGS) >= 40, "expected the base x objective grid for both benchmarks"
    # Paper Table 2: News and Books x (NPO, SimNPO, SatImp) x (Mean, G, DV), the same on the embedded MUSE corpus,
    # plus the embedded MUSE target and retain fine-tunes.
    muse = [p.relative_to(EXPERIMENTS).as_posix() for p in CONFIGS if p.parent.name.startswith("muse_")]
    assert len(muse) == 3 * 3 * 3 + 2
    assert {"muse_news/satimp_g.yaml", "muse_books/simnpo_dv.yaml", "muse_embedded/finetune_retain.yaml"} <= set(muse)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_config_instantiates(config: Path, monkeypatch):
    if yaml.safe_load(config.read_text())["trainer"].get("accelerator") == "gpu" and not torch.cuda.is_available():
        # Lightning builds no Trainer for a GPU-only config (FSDPStrategy) without CUDA: check the rest;
        # tests/test_fsdp_strategy.py checks its strategy.
        monkeypatch.setattr(BaldroCLI, "instantiate_trainer", lambda self, **kwargs: None)
    cli = cli_main(["--config", str(config)], run=False)
    assert isinstance(cli.model, L.LightningModule)
    assert isinstance(cli.datamodule, L.LightningDataModule)
    if isinstance(cli.model, UnlearningModule):
        assert cli.datamodule.tokenizer_path == cli.model.model_path
    if isinstance(cli.model, UnlearningModule) and isinstance(cli.datamodule, MuseDataModule):
        # Spec §5.1: MUSE unlearning runs use a constant learning rate, no warm-up and no weight decay.
        assert (cli.model.lr_schedule, cli.model.warmup_epochs, cli.model.weight_decay) == ("constant", 0.0, 0.0)
        assert any(isinstance(c, MuseEvaluation) for c in cli.trainer.callbacks)


def test_generated_files_are_current():
    generator = _generator()
    for path, config in generator.all_configs().items():
        assert path.read_text() == generator.render(config), f"{path} is stale: run experiments/generate_configs.py"


def test_override_and_print_config_round_trip(tmp_path, capsys):
    config = EXPERIMENTS / "embedded" / "npo_dv.yaml"
    with pytest.raises(SystemExit):
        cli_main(
            ["fit", "--config", str(config), "--model.init_args.forget_objective.init_args.tau=5", "--print_config"]
        )
    printed = capsys.readouterr().out
    assert "tau: 5.0" in printed
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(saved), "--print_config"])
    assert capsys.readouterr().out == printed


def test_config_key_typo_is_rejected(capsys):
    config = EXPERIMENTS / "embedded" / "npo_dv.yaml"
    with pytest.raises(SystemExit):
        cli_main(["--config", str(config), "--model.init_args.gama=0.5"], run=False)
    assert "gama" in capsys.readouterr().err
