"""A ``fast_dev_run`` of every shipped run (experiments/combinations.yaml), through LightningCLI, as a user would
start it: its config files composed in order, its run directory on the command line.

Each run keeps its module, objective, data module, precision, reference mode and callbacks; only what cannot
exist offline is swapped: the model becomes a random tiny Llama and a Hub benchmark becomes a local copy of the
same shape. ``tests/test_configs.py`` checks that every run parses; this checks that every one trains a step,
evaluates, and exports.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from lightning.pytorch.callbacks import Callback
from shipped_configs import COMBINATIONS, REPO, fit_args, resolved

from baldro_lightning.cli import cli_main
from baldro_lightning.evaluation import command as evaluate
from baldro_lightning.evaluation.callbacks import MuseEvaluation, TofuEvaluation
from baldro_lightning.robustness.callbacks import AttackEvaluation
from baldro_lightning.train.export import ExportPretrained
from baldro_lightning.train.module import UnlearningModule

EMBEDDED_TOFU = REPO / "data" / "tofu_embedded"
EMBEDDED_MUSE = REPO / "data" / "muse_embedded"
ROWS = 3  # rows per split that the smoke-sized evaluations score


@pytest.fixture(scope="module")
def embedded_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama whose tokenizer is fitted on the embedded benchmarks, as the quickstart's is.

    The session's tiny model knows only the tiny benchmark's words; spelled out byte by byte, an embedded question
    can fill ``max_length`` 128 on its own.
    """
    corpus = []
    for file in sorted([*EMBEDDED_TOFU.glob("*.jsonl"), *EMBEDDED_MUSE.glob("*.jsonl")]):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            corpus += [value for value in row.values() if isinstance(value, str)]
            # Lists of texts (perturbed answers); a QA document's author_idx is a list of ints.
            corpus += [
                text for value in row.values() if isinstance(value, list) for text in value if isinstance(text, str)
            ]
    return build_tiny_model(tmp_path_factory.mktemp("embedded_tiny_model"), corpus, vocab_size=2000)


@pytest.fixture(scope="module")
def muse_books_benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded MUSE files under the Books corpus name, so the Books configs read a local MUSE layout."""
    root = tmp_path_factory.mktemp("muse_books")
    for file in EMBEDDED_MUSE.glob("news_*.jsonl"):
        shutil.copy(file, root / file.name.replace("news_", "books_", 1))
    return root


@pytest.fixture(scope="module")
def hub_tofu_benchmark(tmp_path_factory: pytest.TempPathFactory, tiny_benchmark: Path) -> Path:
    """The tiny benchmark with every retain split the Hub's TOFU has (retain95 and retain99 as retain90's rows)."""
    root = Path(shutil.copytree(tiny_benchmark, tmp_path_factory.mktemp("hub_tofu") / "tofu"))
    for split in ("retain95", "retain99"):
        shutil.copy(root / "retain90.jsonl", root / f"{split}.jsonl")
    return root


@pytest.fixture(scope="module")
def retain_references(tmp_path_factory: pytest.TempPathFactory):
    """``reference(callback, data, model) -> eval.json``: the run's model's own evaluation as the retain reference.

    Made once per benchmark and split, with the evaluation command a user runs; the run reads it from the path
    its config names.
    """
    made: dict[tuple, Path] = {}

    def reference(callback: TofuEvaluation | MuseEvaluation | AttackEvaluation, data, model: Path) -> Path:
        # The benchmark decides the reference: the attack callback takes TOFU or MUSE settings by its data module.
        if not hasattr(data, "corpus"):
            key = ("tofu", model, data.benchmark, data.forget_split)
            flags = ["--forget_split", data.forget_split, "--limit", str(ROWS), "--max_new_tokens", "4"]
            command = evaluate.main
        else:
            key = ("muse", model, data.benchmark, data.corpus)
            flags = ["--corpus", data.corpus, "--limit", str(ROWS), "--metric_groups", "[privleak]"]
            command = evaluate.muse_main
        if key not in made:
            out = tmp_path_factory.mktemp("retain_reference") / "eval.json"
            command(["--model", str(model), "--benchmark", str(data.benchmark), *flags, "--out", str(out)])
            made[key] = out
        return made[key]

    return reference


class _Steps(Callback):
    """Counts optimizer steps and remembers the loss of each, so the test sees that training happened."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))


def _data_override(config: dict, tiny_benchmark: Path, muse_books: Path) -> list[str]:
    data = config["data"]["init_args"]
    benchmark = data["benchmark"]
    if benchmark == "locuslab/TOFU":
        return [f"--data.init_args.benchmark={tiny_benchmark}"]
    if benchmark == "muse-bench/MUSE-News":
        return [f"--data.init_args.benchmark={EMBEDDED_MUSE}"]
    if benchmark == "muse-bench/MUSE-Books":
        return [f"--data.init_args.benchmark={muse_books}"]
    assert not benchmark.startswith(("locuslab/", "muse-bench/")), f"no offline stand-in for {benchmark}"
    return []  # the committed embedded benchmarks are read as shipped


@pytest.mark.parametrize("name", COMBINATIONS)
def test_config_fast_dev_run(
    name: str,
    tiny_model: Path,
    embedded_tiny_model: Path,
    hub_tofu_benchmark: Path,
    muse_books_benchmark: Path,
    retain_references,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    config = resolved(fit_args(name))
    if config["trainer"]["accelerator"] == "gpu" and not torch.cuda.is_available():
        pytest.skip("FSDPStrategy needs GPUs; tests/test_fsdp_strategy.py checks this config's strategy and policies")
    # The configs name paths relative to the repository root: the committed data is read from there, and the run,
    # model and reference paths land in tmp_path.
    (tmp_path / "data").symlink_to(REPO / "data")
    monkeypatch.chdir(tmp_path)
    data = _data_override(config, hub_tofu_benchmark, muse_books_benchmark)
    # A Hub benchmark's stand-in is the tiny benchmark, which the session's tiny model was fitted on.
    model = tiny_model if config["data"]["init_args"]["benchmark"] == "locuslab/TOFU" else embedded_tiny_model
    overrides = [f"--model.init_args.model={model}", *data]
    cli = cli_main([*fit_args(name), *overrides, "--trainer.fast_dev_run=true"], run=False)
    for callback in cli.trainer.callbacks:
        reference = getattr(getattr(callback, "settings", None), "retain_reference", None)
        if reference:
            Path(reference).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(retain_references(callback, cli.datamodule, model), reference)
        # Smoke-sized evaluation on a random model: short generations, few rows; the schedule is the config's.
        if isinstance(callback, TofuEvaluation):
            callback.settings = dataclasses.replace(callback.settings, limit=ROWS, max_new_tokens=4)
            callback.dirpath = str(tmp_path / "eval")
        if isinstance(callback, MuseEvaluation):
            short = {"knowmem_max_new_tokens": 4, "verbmem_max_new_tokens": 4}
            callback.settings = dataclasses.replace(callback.settings, limit=ROWS, **short)
            callback.dirpath = str(tmp_path / "eval")
        if isinstance(callback, AttackEvaluation):
            callback.settings = dataclasses.replace(callback.settings, limit=ROWS, max_new_tokens=4)
            callback.dirpath = str(tmp_path / "attacks")
    steps = _Steps()
    cli.trainer.callbacks.append(steps)

    cli.trainer.fit(cli.model, cli.datamodule)

    assert len(steps.losses) == 1 and all(map(torch.isfinite, torch.tensor(steps.losses)))
    evaluations = [c for c in cli.trainer.callbacks if isinstance(c, (TofuEvaluation, MuseEvaluation))]
    if evaluations:
        # Configs evaluate before the first update and after the epoch.
        assert sorted(p.name for p in (tmp_path / "eval").glob("step_*")) == ["step_000000", "step_000001"]
        assert any(key.startswith("val/") for key in cli.trainer.callback_metrics)
    if isinstance(cli.model, UnlearningModule):
        assert cli.model.forget_weights is not None and torch.isfinite(cli.model.forget_weights).any()
    if any(isinstance(c, AttackEvaluation) for c in cli.trainer.callbacks):
        # One relearning step each (fast_dev_run), then every attack's record.
        records = sorted(p.parent.name for p in (tmp_path / "attacks").glob("*/attack.json"))
        assert records == ["quantize_int4", "quantize_int8", "relearn_forget", "relearn_retain"]
    exported = [c.directory(cli.trainer) for c in cli.trainer.callbacks if isinstance(c, ExportPretrained)]
    assert exported and all((path / "config.json").is_file() for path in exported)
    if not any(c.dirpath for c in cli.trainer.callbacks if isinstance(c, ExportPretrained)):
        assert exported == [Path(f"runs/{name}/model")]  # the run directory's, from --trainer.default_root_dir
