"""``last.ckpt`` is the latest state; a resume keeps the cached reference honest; one directory per run.

Pinned against the installed Lightning (2.6): its ``ModelCheckpoint(save_last=True)`` leaves ``last.ckpt`` at the
best-scoring state under a monitor and writes nothing before the end with ``save_top_k=0``, which is why the
shipped configs use :class:`~baldro_lightning.train.checkpointing.LatestCheckpoint`.
"""

from __future__ import annotations

import functools
import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import lightning as L
import pytest
import torch
import yaml
from fit_configs import benchmark_with_forget_rows
from lightning.pytorch.callbacks import ModelCheckpoint
from shipped_configs import COMBINATIONS, REPO, fit_args

from baldro_lightning.analysis.sweep import _base_section
from baldro_lightning.cli import RunDirectoryError, claim_run_directory, cli_main, run_outputs
from baldro_lightning.data.datamodule import ForgetRetainDataModule
from baldro_lightning.evaluation.callbacks import ScheduledEvaluation
from baldro_lightning.train.checkpointing import LatestCheckpoint, surviving_checkpoints
from baldro_lightning.train.export import ExportPretrained
from baldro_lightning.train.losses import NLL, NPO
from baldro_lightning.train.module import UnlearningModule

ROWS = 5  # batch 1: five steps per epoch


class ScriptedScore(L.Callback):
    """Publishes ``score`` = ``scores[epoch]`` at each epoch end, before the checkpoint callbacks (which run last)."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.callback_metrics["score"] = torch.tensor(self.scores[trainer.current_epoch])


def _data(tiny_model: Path, benchmark: Path) -> ForgetRetainDataModule:
    return ForgetRetainDataModule(str(tiny_model), str(benchmark), batch_size=1, max_length=48)


def _module(tiny_model: Path, reference: str = "live") -> UnlearningModule:
    return UnlearningModule(str(tiny_model), NPO(), NLL(), reference=reference, lr_schedule="constant")


def _trainer(callbacks: list, epochs: int = 2, **kwargs) -> L.Trainer:
    """No logger; with no checkpoint callback given, none at all (Lightning would add one in the working directory)."""
    kwargs.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def benchmark(tiny_benchmark, tmp_path_factory) -> Path:
    return benchmark_with_forget_rows(tiny_benchmark, tmp_path_factory.mktemp("checkpointing") / "benchmark", ROWS)


def _global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_last_ckpt_is_the_latest_state_unlike_lightnings_save_last(tiny_model, benchmark, tmp_path):
    """Two epochs of five steps. Lightning's ``ModelCheckpoint(monitor, save_last=True)`` leaves last.ckpt at the
    best epoch (step 5, score 1.0 > 0.0) and ``save_top_k=0`` writes only at the end; ``LatestCheckpoint(3)`` saves
    at steps 3, 5 (epoch end), 6, 9 and 10 (epoch and training end), each time via a staging sibling."""
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="score", mode="max", save_last=True)
    only_last = ModelCheckpoint(dirpath=tmp_path / "only_last", save_top_k=0, save_last=True)
    latest = LatestCheckpoint(every_n_train_steps=3, dirpath=str(tmp_path / "latest"))
    trainer = _trainer([ScriptedScore([1.0, 0.0]), best, only_last, latest])
    saves: list[tuple[str, str, int]] = []
    save = trainer.save_checkpoint

    def recording(filepath, *args, **kwargs):
        saves.append((Path(filepath).parent.name, Path(filepath).name, trainer.global_step))
        return save(filepath, *args, **kwargs)

    trainer.save_checkpoint = recording
    trainer.fit(_module(tiny_model), _data(tiny_model, benchmark))

    assert _global_step(tmp_path / "best" / "last.ckpt") == ROWS  # Lightning: last.ckpt is the best state
    assert [s for s in saves if s[0] == "only_last"] == [("only_last", "last.ckpt", 2 * ROWS)]
    assert [step for where, _, step in saves if where == "latest"] == [3, 5, 6, 9, 10]
    assert {name for where, name, _ in saves if where == "latest"} == {".last.ckpt.staging.tmp"}
    assert sorted(p.name for p in (tmp_path / "latest").iterdir()) == ["last.ckpt"]
    assert _global_step(tmp_path / "latest" / "last.ckpt") == 2 * ROWS
    assert latest.latest_step == 2 * ROWS


def test_latest_checkpoint_keeps_the_previous_state_when_a_save_fails(tiny_model, benchmark, tmp_path):
    """A save that dies half way (here: the staged checkpoint is written, then the rename fails) leaves last.ckpt
    at the state before; the staging file is removed by the next save."""
    latest = LatestCheckpoint(every_n_train_steps=2, dirpath=str(tmp_path))

    class Interrupted(Exception):
        """Stands in for a crash in the middle of the save."""

    class FailAt4(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 4:
                # Runs before the checkpoint callbacks (Lightning orders them last): break the next rename.
                mock.patch("baldro_lightning.train.checkpointing.replace_path", side_effect=Interrupted).start()

    try:
        with pytest.raises(Interrupted):
            _trainer([FailAt4(), latest], epochs=1).fit(_module(tiny_model), _data(tiny_model, benchmark))
    finally:
        mock.patch.stopall()
    assert _global_step(tmp_path / "last.ckpt") == 2
    assert (tmp_path / ".last.ckpt.staging.tmp").is_file()
    resumed = LatestCheckpoint(every_n_train_steps=2, dirpath=str(tmp_path))
    data = _data(tiny_model, benchmark)
    _trainer([resumed], epochs=1).fit(_module(tiny_model), data, ckpt_path=tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and _global_step(tmp_path / "last.ckpt") == ROWS


def test_every_shipped_run_checkpoints_its_latest_state_every_n_steps():
    """Every combination keeps last.ckpt as its latest state, every N optimizer steps (a config value), next to at
    most one ordinary best-by-metric checkpoint that writes no last.ckpt of its own."""
    for name, files in COMBINATIONS.items():
        # A later file's callback list replaces an earlier one whole (tests/test_configs.py checks the composition).
        callbacks = _base_section([yaml.safe_load((REPO / f).read_text()) for f in files], "callbacks")
        latest = [c for c in callbacks if c["class_path"].endswith(".LatestCheckpoint")]
        assert len(latest) == 1 and latest[0]["init_args"]["every_n_train_steps"] >= 1, name
        others = [c for c in callbacks if c["class_path"].endswith(".ModelCheckpoint")]
        assert all(not (c.get("init_args") or {}).get("save_last") for c in others), name


# --------------------------------------------------------------------------------------------------------------
# Resuming a cached reference


def test_resuming_a_live_run_as_cached_is_refused(tiny_model, benchmark, tmp_path):
    """A cache computed now would hold the updated policy's log-probs: the error names the flag and the fix."""
    latest = LatestCheckpoint(every_n_train_steps=2, dirpath=str(tmp_path))
    _trainer([latest], epochs=1, max_steps=2).fit(_module(tiny_model, "live"), _data(tiny_model, benchmark))
    cached = _module(tiny_model, "cached")
    with pytest.raises(ValueError, match=r"--model\.init_args\.reference=cached cannot resume .* global step 2") as err:
        _trainer([], epochs=1).fit(cached, _data(tiny_model, benchmark), ckpt_path=tmp_path / "last.ckpt")
    assert "Resume with --model.init_args.reference=live" in str(err.value)
    assert cached.reference_cache is None


def test_cached_reference_is_restored_not_recomputed(tiny_model, benchmark, tmp_path):
    latest = LatestCheckpoint(every_n_train_steps=2, dirpath=str(tmp_path))
    first = _module(tiny_model, "cached")
    _trainer([latest], epochs=1, max_steps=2).fit(first, _data(tiny_model, benchmark))
    resumed = _module(tiny_model, "cached")
    with mock.patch.object(UnlearningModule, "_compute_reference_cache", side_effect=AssertionError("recomputed")):
        _trainer([], epochs=1).fit(resumed, _data(tiny_model, benchmark), ckpt_path=tmp_path / "last.ckpt")
    assert torch.equal(resumed.reference_cache, first.reference_cache)


# --------------------------------------------------------------------------------------------------------------
# What survives a non-finite loss


def test_surviving_checkpoints_names_them_or_says_none_survives(tmp_path):
    last, best = tmp_path / "last.ckpt", tmp_path / "best-epoch=0-step=4.ckpt"
    callback = SimpleNamespace(last_model_path=str(last), best_model_path=str(best), latest_step=6)
    trainer = SimpleNamespace(checkpoint_callbacks=[callback])
    assert surviving_checkpoints(None).startswith("No checkpoint of this run has been saved, so none survives")
    assert "none survives" in surviving_checkpoints(trainer)  # named, but not on disk
    last.write_bytes(b"")
    best.write_bytes(b"")
    assert f"{last} (global step 6); {best}." in surviving_checkpoints(trainer)


# --------------------------------------------------------------------------------------------------------------
# One directory per run


def _cli(args: list[str]):
    with mock.patch.object(sys, "argv", sys.argv[:1]), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        return cli_main(["fit", *args])


def _run_args(tiny_model: Path, benchmark: Path, root: Path) -> list[str]:
    """The embedded NPO run's files on the tiny model: TensorBoard, evaluations, both checkpoints, the export."""
    return [
        *fit_args("embedded/npo")[:-1],
        f"--trainer.default_root_dir={root}",
        f"--model.init_args.model={tiny_model}",
        f"--data.init_args.benchmark={benchmark}",
        "--trainer.accelerator=cpu",
    ]


def test_a_finished_runs_directory_is_refused_unless_resumed_or_overwritten(tiny_model, benchmark, tmp_path):
    root = tmp_path / "run"
    cli = cli_main(_run_args(tiny_model, benchmark, root), run=False)
    assert run_outputs(cli.trainer) == []
    # What the earlier run left: TensorBoard events, a step evaluation, the latest checkpoint and the export.
    logs = root / "tensorboard"
    for path in (logs / "events.out.tfevents.1.host", logs / "checkpoints" / "last.ckpt", root / "model" / "x"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    (logs / "eval" / "step_000000").mkdir(parents=True)
    (root / "sweep.log").write_text("")  # the sweep's own files are not a run's outputs
    found = {str(p.relative_to(root)) for p in run_outputs(cli.trainer)}
    assert found == {
        "tensorboard/events.out.tfevents.1.host",
        "tensorboard/checkpoints/last.ckpt",
        "tensorboard/eval/step_000000",
        "model",
    }

    with pytest.raises(RunDirectoryError, match=r"holds another run's outputs") as err:
        claim_run_directory(cli.trainer, None, False)
    message = str(err.value)
    assert f"--ckpt_path={logs / 'checkpoints' / 'last.ckpt'}" in message and "--overwrite=true" in message
    claim_run_directory(cli.trainer, str(logs / "checkpoints" / "last.ckpt"), False)  # a resume of that run
    with pytest.raises(RunDirectoryError, match="pass one of them"):
        claim_run_directory(cli.trainer, str(logs / "checkpoints" / "last.ckpt"), True)
    claim_run_directory(cli.trainer, None, True)
    assert run_outputs(cli.trainer) == [] and (root / "sweep.log").is_file()


def test_fit_refuses_before_training_and_saves_no_overwrite_flag(tiny_model, benchmark, tmp_path, monkeypatch):
    """Through the CLI: a refused fit fails before anything is written; an overwriting one runs, and its saved
    config.yaml says overwrite: false, so fitting that config again cannot delete the run."""
    root = tmp_path / "run"
    (root / "model").mkdir(parents=True)
    (root / "model" / "config.json").write_text("{}")
    args = _run_args(tiny_model, benchmark, root)
    fitted = []

    @functools.wraps(L.Trainer.fit)  # LightningCLI reads fit's signature
    def fit(self, *args, **kwargs) -> None:
        fitted.append(kwargs)

    monkeypatch.setattr(L.Trainer, "fit", fit)
    # The config's retain reference (under runs/) need not exist here: its pre-flight check is not this test's.
    monkeypatch.setattr(ScheduledEvaluation, "prepare", lambda self, data: None)
    with pytest.raises(RunDirectoryError, match="--trainer.default_root_dir=.* holds another run's outputs"):
        _cli(args)
    assert not fitted
    cli = _cli([*args, "--overwrite=true"])
    assert len(fitted) == 1 and not (root / "model").exists()
    assert cli.config["fit"]["overwrite"] is False


def test_export_callback_directory_counts_as_an_output(tiny_model, benchmark, tmp_path):
    export = ExportPretrained(str(tmp_path / "elsewhere"))
    trainer = _trainer([export], default_root_dir=str(tmp_path / "run"))
    (tmp_path / "elsewhere").mkdir()
    assert run_outputs(trainer) == []  # an empty directory holds no model
    (tmp_path / "elsewhere" / "config.json").write_text("{}")
    assert run_outputs(trainer) == [tmp_path / "elsewhere"]
