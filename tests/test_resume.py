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
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fit_configs import benchmark_with_forget_rows, make_retain_reference, write_npo_fit_config, write_record_config
from run_records import assert_same_record, stray_files, tensorboard_scalars
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from baldro_lightning import atomic_files
from baldro_lightning.evaluation.run_record import per_sample_path, write_eval_json, write_per_sample
from baldro_lightning.train.export import save_pretrained_atomic

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
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


def fit_env() -> dict[str, str]:
    """The environment of a fit subprocess: ``tests/`` on the path, for the test callbacks named by class_path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


def launch(config: Path, ckpt_path: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "baldro_lightning", "fit", "--config", str(config)]
    if ckpt_path is not None:
        command += ["--ckpt_path", str(ckpt_path)]
    log = (config.parent / ("resume.log" if ckpt_path else "fit.log")).open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=fit_env(), cwd=config.parent)


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
# Kill and resume: the run's record


RECORD_ROWS = 6  # batch 1: six steps per epoch, twelve in all
PAUSE_AT = 10  # killed after the evaluation of step 10, with last.ckpt at step 8 (the second epoch's second step)


def kill_when_paused(process: subprocess.Popen, config: Path) -> None:
    marker = config.parent / "paused"
    deadline = time.monotonic() + DEADLINE_S
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run ended or stalled before step {PAUSE_AT}: {(config.parent / 'fit.log').read_text()}")
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_record(tiny_model, tiny_benchmark, tmp_path):
    """Evaluations, per_sample.csv, synchrony and TensorBoard scalars of a run killed in its second epoch and
    resumed from last.ckpt equal those of an uninterrupted run, and so do the final weights."""
    benchmark = benchmark_with_forget_rows(tiny_benchmark, tmp_path / "benchmark", RECORD_ROWS)
    # The reference scores the same forget rows (the tiny model stands in for a retain model).
    retain_reference = make_retain_reference(tiny_model, benchmark, tmp_path / "retain" / "eval.json")
    full = write_record_config(tmp_path / "full", tiny_model, benchmark, retain_reference)
    finish(launch(full), full)
    killed = write_record_config(tmp_path / "killed", tiny_model, benchmark, retain_reference, pause_at=PAUSE_AT)
    kill_when_paused(launch(killed), killed)

    run, logs = killed.parent, killed.parent / "tensorboard"
    last = logs / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 8
    # What the killed run recorded after its checkpoint, which the resumed run must replace, not add to.
    assert (logs / "eval" / f"step_{PAUSE_AT:06d}" / "eval.json").is_file()
    assert max(step for step, _ in tensorboard_scalars(logs)["train/loss"]) >= 8
    assert f"{PAUSE_AT}," in (logs / "eval" / "per_sample.csv").read_text()
    # The run directory is taken: a fit there must resume that run or be told to overwrite it.
    again = subprocess.run(
        [sys.executable, "-m", "baldro_lightning", "fit", "--config", str(killed)],
        capture_output=True,
        text=True,
        env=fit_env(),
        cwd=run,
    )
    # A user error: exit status 2 and one line that names the flag.
    assert again.returncode == 2, again.stderr[-2000:]
    assert (
        again.stderr.startswith("error: --trainer.default_root_dir=") and "holds another run's outputs" in again.stderr
    )

    finish(launch(killed, ckpt_path=last), killed)

    assert_same_record(full.parent, run)
    reference = load_file(full.parent / "model" / "model.safetensors")
    resumed = load_file(run / "model" / "model.safetensors")
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=f"final {name}")
    best = sorted(p.name for p in (full.parent / "tensorboard" / "checkpoints").glob("best-*"))
    assert sorted(p.name for p in (logs / "checkpoints").glob("best-*")) == best and len(best) == 1
    for directory in (full.parent, run):
        assert (
            torch.load(directory / "tensorboard" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
            == EPOCHS * RECORD_ROWS
        )
    assert stray_files(run) == []


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


def _assert_version_two(out: Path, before: dict[str, torch.Tensor]) -> None:
    after = _model_snapshot(out)
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"] + 1.0)


def test_export_interrupted_at_the_swap_keeps_previous_model(exported, monkeypatch):
    """The atomic swap of staging and ``out`` fails: nothing was moved, and the staging copy is removed."""
    out, before, model = exported

    def interrupted(first, second):
        raise Interrupted

    monkeypatch.setattr(atomic_files, "_exchange", interrupted)
    with pytest.raises(Interrupted):
        save_pretrained_atomic(model, None, out)
    _assert_previous_version(out, before)


def test_export_swaps_in_one_step_where_the_platform_can(exported, monkeypatch):
    """On Linux the new model replaces the old by one ``renameat2(RENAME_EXCHANGE)``, never two renames."""
    out, before, model = exported
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(atomic_files.os, "replace", lambda src, dst: renames.append(dst) or real_replace(src, dst))
    save_pretrained_atomic(model, None, out)
    if sys.platform.startswith("linux"):
        assert renames == [], "the model was moved aside, leaving a moment without one at --out"
    _assert_version_two(out, before)
    assert _entries(out.parent) == ["model"]


def test_export_without_atomic_swap_interrupted_at_second_rename_keeps_previous_model(exported, monkeypatch):
    """Where no atomic swap exists, ``out -> .out.old`` succeeds and ``staging -> out`` fails: the previous model
    must be back at ``out``."""
    out, before, model = exported
    real_replace = os.replace
    calls = []

    def fail_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise Interrupted
        real_replace(src, dst)

    monkeypatch.setattr(atomic_files, "_exchange", lambda first, second: False)
    monkeypatch.setattr(atomic_files.os, "replace", fail_second)
    with pytest.raises(Interrupted):
        save_pretrained_atomic(model, None, out)
    monkeypatch.setattr(atomic_files.os, "replace", real_replace)
    assert len(calls) == 3, "the old model is moved back after the failed rename"
    _assert_previous_version(out, before)


KILLED_EXPORT = """
import os, signal, sys
import torch
from transformers import AutoModelForCausalLM
from baldro_lightning import atomic_files
from baldro_lightning.train.export import save_pretrained_atomic

model_path, out, where = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(model_path)
with torch.no_grad():
    model.model.norm.weight.add_(1.0)  # version two


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


if where == "after_swap":  # the new model is in place, the old one not yet removed
    atomic_files._remove = die
elif where == "between_renames":  # no atomic swap: the old model moved aside, the new one not yet in place
    atomic_files._exchange = lambda first, second: False
    real_replace = os.replace
    calls = []
    def replace_then_die(src, dst):
        calls.append(dst)
        real_replace(src, dst)
        if len(calls) == 1:
            die()
    atomic_files.os.replace = replace_then_die
save_pretrained_atomic(model, None, out)
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["after_swap", "between_renames"])
def test_export_killed_between_renames_leaves_a_model(exported, tiny_model, where):
    """An export SIGKILLed inside the replacement: with the atomic swap (Linux) ``out`` holds the new model at once;
    without it, between its two renames, ``out`` is missing until the next export puts the old one back first. Either
    way the next export leaves the new model and no staging copies."""
    out, before, model = exported
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT, str(tiny_model), str(out), where], env=env, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    if where == "after_swap":
        _assert_version_two(out, before)
        assert len(_entries(out.parent)) == 2, "the old model is left in a staging sibling"
    else:
        assert not out.exists() and len(_entries(out.parent)) == 2

    save_pretrained_atomic(model, None, out)
    _assert_version_two(out, before)
    assert _entries(out.parent) == ["model"]


KILLED_WRITE = """
import os, signal, sys
from baldro_lightning.evaluation.run_record import write_eval_json


class Dies(dict):
    def items(self):  # json.dump iterates the result: half of the file is written by then
        os.kill(os.getpid(), signal.SIGKILL)


write_eval_json({"meta": {}, "metrics": Dies()}, sys.argv[1])
"""


def test_staging_file_of_a_killed_write_is_gone_after_the_next_write(tmp_path):
    """SIGKILL cannot be cleaned up after: the killed write leaves its staging sibling and the previous file; the
    next write of the same file (a resumed run's, a re-run evaluation's) removes the staging file."""
    out = tmp_path / "step_000004" / "eval.json"
    write_eval_json({"meta": {"global_step": 4}, "metrics": {}}, out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(out)], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert json.loads(out.read_text())["meta"]["global_step"] == 4
    assert len(_entries(out.parent)) == 2  # eval.json and the killed write's .eval.json.*.tmp

    write_eval_json({"meta": {"global_step": 4}, "metrics": {"x": {"agg_value": 1.0}}}, out)
    assert _entries(out.parent) == ["eval.json"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_get_the_permissions_the_umask_gives(tiny_model, tmp_path, mask):
    """eval.json, per_sample.csv and an exported model read like any file the process creates, not 0600/0700."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    previous = os.umask(mask)
    try:
        written = [
            write_eval_json({"meta": {}, "metrics": {}}, tmp_path / "eval" / "step_000000" / "eval.json"),
            write_per_sample(per_sample_path(tmp_path / "eval"), _curves_history(), {"0": None, "1": 5.0}),
        ]
        exported = save_pretrained_atomic(model, None, tmp_path / "model")
    finally:
        os.umask(previous)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    assert stat.S_IMODE(exported.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((exported / "config.json").stat().st_mode) == 0o666 & ~mask


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
