"""Every shipped run of experiments/combinations.yaml parses and instantiates through LightningCLI, is documented in
experiments/README.md, and uses only config files that exist (and every config file is used)."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from shipped_configs import COMBINATIONS, EXPERIMENTS, REPO, command, fit_args, resolved

from baldro_lightning.cli import BaldroCLI, ConfigError, cli_main
from baldro_lightning.data.muse import MuseDataModule
from baldro_lightning.embedded import quickstart
from baldro_lightning.evaluation.callbacks import MuseEvaluation
from baldro_lightning.train.module import UnlearningModule

METHODS = ("ga", "gd", "npo", "simnpo", "satimp")
TOFU_OBJECTIVES = ("", "_g", "_dv", "_dv_released")
MUSE_OBJECTIVES = ("", "_g", "_dv")
MUSE = ("muse_embedded", "muse_news", "muse_books")


def test_combinations_are_the_shipped_grid():
    names = set(COMBINATIONS)
    tofu = {f"{b}/{m}{o}" for b in ("embedded", "tofu") for m in METHODS for o in TOFU_OBJECTIVES}
    # Paper Table 2: News and Books x (NPO, SimNPO, SatImp) x (Mean, G, DV), the same on the embedded MUSE corpus.
    muse = {f"{b}/{m}{o}" for b in MUSE for m in METHODS[2:] for o in MUSE_OBJECTIVES}
    finetune = {f"embedded/finetune_{n}" for n in ("target", "retain90", "retain95", "retain99")}
    finetune |= {"muse_embedded/finetune_target", "muse_embedded/finetune_retain"}
    finetune |= {"muse_embedded/knowledge_target", "muse_embedded/knowledge_retain90"}
    # Issue 20: the embedded NPO runs x {mean, G, DV, DV released} with the attacks at the end of fit.
    attacked = {f"embedded/npo{o}_attacks" for o in TOFU_OBJECTIVES}
    # Real TOFU on a CPU: tiny target and retain models, NPO x (Mean, G, DV).
    tofu_cpu = {f"tofu_cpu/finetune_{n}" for n in ("target", "retain90", "retain95", "retain99")}
    tofu_cpu |= {f"tofu_cpu/npo{o}" for o in ("", "_g", "_dv")}
    assert names == tofu | muse | finetune | attacked | tofu_cpu | {"tofu/npo_dv_fsdp1"}
    assert len(names) == 40 + 27 + 8 + 4 + 7 + 1


def test_every_config_file_exists_and_is_used():
    used = {path for files in COMBINATIONS.values() for path in files}
    assert all((REPO / path).is_file() for path in used), sorted(p for p in used if not (REPO / p).is_file())
    # Sweep grids are not LightningCLI configs; tests/test_sweep.py checks them.
    shipped = {
        p.relative_to(REPO).as_posix()
        for p in EXPERIMENTS.glob("**/*.yaml")
        if p.relative_to(EXPERIMENTS).parts[0] != "sweeps" and p.name != "combinations.yaml"
    }
    assert shipped == used, f"config files no run uses: {sorted(shipped - used)}"


def test_readme_gives_the_command_of_every_run():
    readme = (EXPERIMENTS / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    documented = {}
    for row in rows:
        name, cmd = re.fullmatch(r"\| `([^`]+)`: [^|]+ \| `([^`]+)` \|", row).groups()
        documented[name] = cmd
    assert list(documented) == list(COMBINATIONS)
    assert documented == {name: command(name) for name in COMBINATIONS}


def test_quickstart_runs_shipped_combinations():
    runs = {**quickstart.FINETUNE, "embedded/npo_dv": quickstart.EXPERIMENT}
    for name, files in runs.items():
        assert tuple(str(f) for f in files) == COMBINATIONS[name], name


# What each method and objective file sets, as the run names spell them.
FORGET_LOSS = {"ga": "GradAscent", "gd": "GradAscent", "npo": "NPO", "simnpo": "SimNPO", "satimp": "SatImp"}
OBJECTIVE = {"": ("Mean", {}), "_g": ("Group", {"ratio": 0.5}), "_dv": ("DV", {"sign": "paper"})}
OBJECTIVE["_dv_released"] = ("DV", {"sign": "released"})
# The rest of each released Dr* trainer (methods §2.12.2): objective options and the retain NLL's normalisation.
RELEASED = {
    "npo": ({}, "seq_sum"),
    "simnpo": ({}, "token_mean"),
    "satimp": ({"granularity": "token"}, "seq_sum"),
}
# The configs that mirror the paper's runs count optimizer updates as the reference's HF Trainer does (methods §1.6).
HF_ACCOUNTING = ("tofu", "muse_news", "muse_books")


@pytest.mark.parametrize("name", COMBINATIONS)
def test_combination_instantiates(name: str, monkeypatch, tmp_path):
    config = resolved(fit_args(name))
    if config["trainer"]["accelerator"] == "gpu" and not torch.cuda.is_available():
        # Lightning builds no Trainer for a GPU-only config (FSDPStrategy) without CUDA: check the rest;
        # tests/test_fsdp_strategy.py checks its strategy.
        monkeypatch.setattr(BaldroCLI, "instantiate_trainer", lambda self, **kwargs: None)
    cli = cli_main(fit_args(name), run=False)
    assert isinstance(cli.model, L.LightningModule)
    assert isinstance(cli.datamodule, L.LightningDataModule)
    if isinstance(cli.model, UnlearningModule):
        assert cli.datamodule.tokenizer_path == cli.model.model_path
    if isinstance(cli.model, UnlearningModule) and isinstance(cli.datamodule, MuseDataModule):
        # Methods §5.1: MUSE unlearning runs use a constant learning rate, no warm-up and no weight decay.
        assert (cli.model.lr_schedule, cli.model.warmup_epochs, cli.model.weight_decay) == ("constant", 0.0, 0.0)
        assert any(isinstance(c, MuseEvaluation) for c in cli.trainer.callbacks)
    if cli.trainer is None:
        return
    # Every output of the run goes to its directory, named once on the command line.
    assert cli.trainer.default_root_dir == f"runs/{name}"
    assert Path(cli.trainer.log_dir) == Path(f"runs/{name}/tensorboard")
    # The config.yaml that LightningCLI saves as fit starts is the full record: the resolved config of the composed
    # files, with the method's forget loss and the objective the run's name says.
    monkeypatch.chdir(tmp_path)
    save = next(c for c in cli.trainer.callbacks if isinstance(c, SaveConfigCallback))
    save.setup(cli.trainer, cli.model, "fit")
    saved = yaml.safe_load(Path(f"runs/{name}/tensorboard/config.yaml").read_text())
    # run=False parses no subcommand, so only `fit`'s own arguments (ckpt_path, weights_only) are missing.
    assert saved == {k: v for k, v in config.items() if k not in ("ckpt_path", "weights_only")}
    run = name.split("/")[1]
    if run.endswith("_attacks"):
        # experiments/attacks/embedded.yaml appends the attack callback to the benchmark's callbacks.
        classes = [c["class_path"].rsplit(".", 1)[-1] for c in saved["trainer"]["callbacks"]]
        assert classes == [
            "TofuEvaluation",
            "ModelCheckpoint",
            "LatestCheckpoint",
            "ExportPretrained",
            "AttackEvaluation",
        ]
        run = run.removesuffix("_attacks")
    if isinstance(cli.model, UnlearningModule):
        method, _, objective = run.partition("_")
        objective_class, objective_args = OBJECTIVE["_" + objective if objective else ""]
        model = saved["model"]["init_args"]
        assert model["forget_loss"]["class_path"].endswith("." + FORGET_LOSS[method])
        assert model["forget_objective"]["class_path"].endswith("." + objective_class)
        assert objective_args.items() <= (model["forget_objective"].get("init_args") or {}).items()
        if objective == "dv_released" and method in RELEASED:
            released_args, retain_normalization = RELEASED[method]
            assert released_args.items() <= model["forget_objective"]["init_args"].items()
            assert model["retain_loss"]["init_args"]["normalization"] == retain_normalization
        benchmark = name.split("/")[0]
        assert cli.datamodule.update_accounting == ("hf" if benchmark in HF_ACCOUNTING else "lightning")


def test_method_and_objective_files_change_only_their_keys():
    """A composed run differs from its benchmark's plain-mean run only in the keys its method and objective name:
    NPO's forget loss, DV's objective, and the released DrNPO's sequence-sum retain NLL."""
    base = resolved(fit_args("embedded/gd"))
    composed = resolved([*fit_args("embedded/npo_dv_released")[:-1], "--trainer.default_root_dir=runs/embedded/gd"])
    before, after = base["model"]["init_args"], composed["model"]["init_args"]
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {"forget_loss", "forget_objective", "retain_loss"}
    assert composed["model"]["init_args"]["forget_objective"] == {
        "class_path": "baldro_lightning.train.objectives.DV",
        "init_args": {"tau": 2.0, "sign": "released", "granularity": "sample"},
    }
    assert after["retain_loss"] == {**before["retain_loss"], "init_args": {"normalization": "seq_sum"}}
    assert {k: v for k, v in base.items() if k != "model"} == {k: v for k, v in composed.items() if k != "model"}


def test_override_and_print_config_round_trip(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tau = "--model.init_args.forget_objective.init_args.tau=5"
        cli_main(["fit", *fit_args("embedded/npo_dv"), tau, "--print_config"])
    printed = capsys.readouterr().out
    assert "tau: 5.0" in printed
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(saved), "--print_config"])
    assert capsys.readouterr().out == printed


def test_config_key_typo_is_rejected():
    with pytest.raises(ConfigError, match=r"^--model\.gama: UnlearningModule has no option 'gama'; check its spelling"):
        cli_main([*fit_args("embedded/npo_dv"), "--model.init_args.gama=0.5"], run=False)


def test_tensorboard_loggers_write_no_hp_metric():
    """LightningCLI logs the hyperparameters; with the default hp_metric TensorBoard would show an empty tag."""
    files = [path for path in EXPERIMENTS.rglob("*.yaml") if "TensorBoardLogger" in path.read_text()]
    assert files
    for path in files:
        logger = yaml.safe_load(path.read_text())["trainer"]["logger"]
        assert logger["init_args"]["default_hp_metric"] is False, path
