"""Interruptions: a fit killed mid-epoch and resumed, and writes interrupted half way.

``test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run`` runs ``python -m baldro_lightning fit`` three
times in subprocesses: once to the end, once killed with SIGKILL in the middle of the second epoch, and once
resumed from that run's ``last.ckpt``; the exported policies must agree. The atomic-output tests make a write
fail half way (the writer or ``os.replace`` raises) and check that the previous file or model is still whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fit_configs import benchmark_with_forget_rows, write_npo_fit_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from baldro_lightning.evaluation.run_record import per_sample_path, write_eval_json, write_per_sample
from baldro_lightning.train import export
from baldro_lightning.train.export import save_pretrained_atomic

TESTS = Path(__file__).resolve().parent
FORGET_ROWS = 8  # batch 1: eight steps per epoch, so a kill lands well inside an epoch
EPOCHS = 2
KILL_AFTER = f"epoch=1-step={FORGET_ROWS + 3}.ckpt"  # the fourth step of the second epoch has been saved
DEADLINE_S = 420


class Interrupted(BaseException):
    """Stands in for a signal or a crash arriving in the middle of a write."""


# --------------------------------------------------------------------------------------------------------------
# Kill and resume


def write_config(run: Path, model: Path, benchmark: Path) -> Path:
    """A fit config that checkpoints every step, records each step's rows, and exports the policy."""
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(run / "ckpt"), "every_n_train_steps": 1, "save_top_k": -1, "save_last": True},
        },
        {"class_path": "resume_worker.RecordBatches", "init_args": {"path": str(run / "batches.jsonl")}},
        {"class_path": "baldro_lightning.train.export.ExportPretrained", "init_args": {"dirpath": str(run / "model")}},
    ]
    return write_npo_fit_config(
        run, model, benchmark, callbacks, trainer={"max_epochs": EPOCHS}, data_args={"max_length": 64}
    )


def launch(config: Path, ckpt_path: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "baldro_lightning", "fit", "--config", str(config)]
    if ckpt_path is not None:
        command += ["--ckpt_path", str(ckpt_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    log = (config.parent / ("resume.log" if ckpt_path else "fit.log")).open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=config.parent)


def finish(process: subprocess.Popen, config: Path) -> None:
    try:
        code = process.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    if code != 0:
        logs = "\n".join(p.read_text()[-3000:] for p in sorted(config.parent.glob("*.log")))
        pytest.fail(f"fit exited with {code}:\n{logs}")


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "batches.jsonl").read_text().splitlines()]


def rows_by_step(steps: list[dict]) -> list[tuple[int, list[int], list[int]]]:
    return [(s["step"], s["forget"], s["retain"]) for s in steps]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tiny_model, tiny_benchmark, tmp_path):
    benchmark = benchmark_with_forget_rows(tiny_benchmark, tmp_path / "benchmark", FORGET_ROWS)
    full = write_config(tmp_path / "full", tiny_model, benchmark)
    finish(launch(full), full)

    killed = write_config(tmp_path / "killed", tiny_model, benchmark)
    process = launch(killed)
    target = killed.parent / "ckpt" / KILL_AFTER
    deadline = time.monotonic() + DEADLINE_S
    while not target.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(
                f"the run ended or stalled before writing {target.name}: {(killed.parent / 'fit.log').read_text()}"
            )
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed.parent / "model").exists()  # killed runs export nothing

    # Checkpoints are written to a temporary file and renamed, so last.ckpt is whole even under SIGKILL.
    last = killed.parent / "ckpt" / "last.ckpt"
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert FORGET_ROWS < step < EPOCHS * FORGET_ROWS, f"last.ckpt is at step {step}, not inside the second epoch"
    seen_before_kill = len(records(killed.parent))

    finish(launch(killed, ckpt_path=last), killed)

    reference = load_file(full.parent / "model" / "model.safetensors")
    resumed = load_file(killed.parent / "model" / "model.safetensors")
    assert reference.keys() == resumed.keys()
    drift = max((reference[k] - resumed[k]).abs().max().item() for k in reference)

    # What the resumed run trained on must be what the uninterrupted run trained on from `step` on.
    expected = rows_by_step(records(full.parent))[step:]
    after_resume = rows_by_step(records(killed.parent)[seen_before_kill:])
    assert after_resume == expected, (
        f"resumed at global step {step} (batch {step - FORGET_ROWS} of epoch 1): the resumed run trained on "
        f"(step, forget rows, retain rows) {after_resume}, the uninterrupted run on {expected}; "
        f"final weights differ by up to {drift:.3g}"
    )
    assert drift <= 1e-6


# --------------------------------------------------------------------------------------------------------------
# Atomic outputs


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_eval_json_interrupted_at_rename_keeps_previous_file(tmp_path, monkeypatch):
    """The JSON is fully written to a staging file; the interruption hits ``os.replace``: the old file stays, and
    the staging file is removed (the failure of ``json.dump`` itself is covered in test_run_record.py)."""
    out = tmp_path / "step_000002" / "eval.json"
    write_eval_json({"meta": {"global_step": 1}, "metrics": {"x": {"agg_value": 1.0}}}, out)
    previous = out.read_text()

    def interrupted(src, dst):
        raise Interrupted

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(Interrupted):
        write_eval_json({"meta": {"global_step": 2}, "metrics": {"x": {"agg_value": float("nan")}}}, out)
    assert out.read_text() == previous
    assert json.loads(previous)["meta"]["global_step"] == 1
    assert _entries(out.parent) == ["eval.json"]


def _model_snapshot(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


class HalfWritten:
    """A model whose ``save_pretrained`` writes a whole model, then truncates its weights file and dies."""

    def __init__(self, model) -> None:
        self.model = model

    def save_pretrained(self, directory) -> None:
        self.model.save_pretrained(directory)
        weights = Path(directory) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        raise Interrupted


@pytest.fixture
def exported(tiny_model, tmp_path) -> tuple[Path, dict[str, torch.Tensor], object]:
    """A first export of the tiny model to ``tmp_path/export/model``, its weights, and a changed second version."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    out = save_pretrained_atomic(model, None, tmp_path / "export" / "model")
    before = _model_snapshot(out)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # version two differs from version one
    return out, before, model


def _assert_previous_version(out: Path, before: dict[str, torch.Tensor]) -> None:
    assert out.is_dir(), f"{out} is gone; its directory holds {_entries(out.parent)}"
    after = _model_snapshot(out)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert _entries(out.parent) == ["model"], "staging or backup directories were left behind"


def test_export_interrupted_while_writing_keeps_previous_model(exported):
    out, before, model = exported
    with pytest.raises(Interrupted):
        save_pretrained_atomic(HalfWritten(model), None, out)
    _assert_previous_version(out, before)


def test_export_interrupted_at_first_rename_keeps_previous_model(exported, monkeypatch):
    """``out -> .out.old`` fails: nothing was moved yet."""
    out, before, model = exported
    real_replace = os.replace

    def fail_first(src, dst):
        raise Interrupted

    monkeypatch.setattr(export.os, "replace", fail_first)
    with pytest.raises(Interrupted):
        save_pretrained_atomic(model, None, out)
    monkeypatch.setattr(export.os, "replace", real_replace)
    _assert_previous_version(out, before)


def test_export_interrupted_at_second_rename_keeps_previous_model(exported, monkeypatch):
    """``out -> .out.old`` succeeds, ``staging -> out`` fails: the previous model must be back at ``out``."""
    out, before, model = exported
    real_replace = os.replace
    calls = []

    def fail_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise Interrupted
        real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", fail_second)
    with pytest.raises(Interrupted):
        save_pretrained_atomic(model, None, out)
    monkeypatch.setattr(export.os, "replace", real_replace)
    assert len(calls) == 3, "the old model is moved back after the failed rename"
    _assert_previous_version(out, before)


def _curves_history() -> list[dict]:
    """Two evaluations of two forget rows, as ``TofuEvaluation._record_curves`` keeps them."""
    history = []
    for step, rouge in ((0, [1.0, 0.8]), (5, [0.2, 0.9])):
        history.append(
            {
                "step": step,
                "index": [0, 1],
                "log_ppl_ratio": np.array([0.0, 0.5 * step]),
                "truth_ratio": np.array([0.4, 0.6]),
                "rougeL_recall": np.array(rouge),
                "dro_weight": np.array([0.5, 0.5]),
            }
        )
    return history


def test_per_sample_csv_interrupted_midway_keeps_previous_table(tmp_path, monkeypatch):
    table = per_sample_path(tmp_path / "eval")
    write_per_sample(table, _curves_history()[:1], {"0": None, "1": None})
    previous = table.read_text()
    assert previous.count("\n") == 3  # header + one evaluation of two rows

    real_fdopen = os.fdopen

    class HalfFile:
        """Writes the first half of what it is given, then the process 'dies'."""

        def __init__(self, *args, **kwargs) -> None:
            self.handle = real_fdopen(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

        def write(self, text: str) -> int:
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            raise Interrupted

    monkeypatch.setattr(os, "fdopen", HalfFile)
    with pytest.raises(Interrupted):
        write_per_sample(table, _curves_history(), {"0": 5.0, "1": None})
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert table.read_text() == previous
    assert _entries(table.parent) == ["per_sample.csv"]

    def interrupted(src, dst):
        raise Interrupted

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(Interrupted):
        write_per_sample(table, _curves_history(), {"0": 5.0, "1": None})
    assert table.read_text() == previous
    assert _entries(table.parent) == ["per_sample.csv"]
