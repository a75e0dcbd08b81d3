"""FSDP2 runs end to end on 2 gloo processes: resume from a distributed checkpoint, a killed run's record, export, LoRA.

Three launches of ``python -m baldro_lightning fit`` on 2 gloo processes under ``ModelParallelStrategy``: an
uninterrupted run of 6 steps, a run stopped after 3 steps (its checkpoint is a directory of ``.distcp`` shards),
and that run resumed with ``--ckpt_path``. The resumed steps must train on the same rows with the same losses as
steps 4-6 of the uninterrupted run, and both runs' exports (``ExportPretrained`` under FSDP2) must agree. AdamW
keeps per-parameter state, so the optimizer's shards must be restored too, not only the weights. The checkpoint
must hold the policy and no reference, and ``python -m baldro_lightning export`` must turn it into the model the
stopped run exported. Two more launches train LoRA adapters with activation checkpointing on 2 FSDP2 ranks and
in 1 process with the same global batch; the merged exports must agree. Three more run the shipped record (TOFU
evaluations, TensorBoard, latest and best checkpoints) uninterrupted, killed with SIGKILL at step 10, and resumed
from ``last.ckpt``: the resumed record must equal the uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from fit_configs import benchmark_with_forget_rows, make_retain_reference, write_npo_fit_config, write_record_config
from gloo_launch import kill_launch, start_torchrun, torchrun
from run_records import assert_same_record, stray_files, tensorboard_scalars
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM

from baldro_lightning.train.export import main as export_main

FORGET_ROWS = 8  # 2 ranks x batch 1: four steps per epoch, so the stop at step 3 is inside the first epoch
STOP, TOTAL = 3, 6  # the resumed run crosses an epoch boundary (a reshuffle)
TIMEOUT_S = 420

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable"
    ),
    pytest.mark.distributed,
    pytest.mark.slow,
]


def write_config(
    run: Path, model: Path, benchmark: Path, devices: int = 2, batch_size: int = 1, **model_args: Any
) -> Path:
    """FSDP2 on 2 CPU processes (or 1 plain process); a checkpoint every ``STOP`` steps; NPO with a live reference."""
    strategy = {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": devices, "tensor_parallel_size": 1},
    }
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(run / "ckpt"),
                "filename": "{step}",
                "every_n_train_steps": STOP,
                "save_top_k": -1,
                "save_last": True,
            },
        },
        {"class_path": "distributed_resume_worker.RecordSteps", "init_args": {"path": str(run / "steps")}},
        {"class_path": "baldro_lightning.train.export.ExportPretrained", "init_args": {"dirpath": str(run / "model")}},
    ]
    return write_npo_fit_config(
        run,
        model,
        benchmark,
        callbacks,
        trainer={"devices": devices, "strategy": strategy if devices > 1 else "auto"},
        model_args={
            "reference": "live",
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
            **model_args,
        },
        data_args={"batch_size": batch_size, "max_length": 48},
    )


def fit(config: Path, max_steps: int, ckpt_path: Path | None = None, processes: int = 2) -> None:
    """``python -m baldro_lightning fit`` on ``processes`` gloo processes, run from the config's directory."""
    program = ["-m", "baldro_lightning", "fit", "--config", str(config), f"--trainer.max_steps={max_steps}"]
    if ckpt_path is not None:
        program += ["--ckpt_path", str(ckpt_path)]
    torchrun(program, f"the {processes}-process fit", TIMEOUT_S, processes, cwd=config.parent)


def steps(run: Path, rank: int) -> list[dict]:
    lines = (run / f"steps.rank{rank}").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def runs(tiny_model, tiny_benchmark, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed_resume")
    benchmark = benchmark_with_forget_rows(tiny_benchmark, root / "benchmark", FORGET_ROWS)
    full = write_config(root / "full", tiny_model, benchmark)
    fit(full, TOTAL)
    stopped = write_config(root / "stopped", tiny_model, benchmark)
    fit(stopped, STOP)
    # What the stopped run exported (weights after step 3), kept before the resumed run replaces it.
    shutil.copytree(stopped.parent / "model", root / "export_at_stop")
    fit(stopped, TOTAL, ckpt_path=stopped.parent / "ckpt" / "last.ckpt")
    return {"full": full.parent, "resumed": stopped.parent, "export_at_stop": root / "export_at_stop"}


def test_resumed_fsdp2_run_matches_the_uninterrupted_run(runs):
    full, resumed = runs["full"], runs["resumed"]
    for rank in range(2):
        uninterrupted, interrupted = steps(full, rank), steps(resumed, rank)
        assert uninterrupted[0] == {"sharded": True}, "the policy was not sharded by FSDP2"
        assert [r["step"] for r in uninterrupted[1:]] == list(range(1, TOTAL + 1))
        # The stopped run's records, a start marker of the resumed run, then the resumed steps.
        assert interrupted[STOP + 1] == {"sharded": True}
        after = interrupted[STOP + 2 :]
        expected = uninterrupted[STOP + 1 :]
        assert [(r["step"], r["forget"]) for r in after] == [(r["step"], r["forget"]) for r in expected], (
            f"rank {rank}: the resumed run trained on other rows than the uninterrupted one"
        )
        losses = torch.tensor([r["loss"] for r in after])
        torch.testing.assert_close(losses, torch.tensor([r["loss"] for r in expected]), rtol=0, atol=1e-6)

    reference = load_file(full / "model" / "model.safetensors")
    continued = load_file(resumed / "model" / "model.safetensors")
    assert reference.keys() == continued.keys()
    for name, value in reference.items():
        torch.testing.assert_close(continued[name], value, rtol=0, atol=1e-6, msg=f"final {name}")
    stopped = load_file(runs["export_at_stop"] / "model.safetensors")
    moved = max((reference[k] - stopped[k]).abs().max().item() for k in reference)
    assert moved > 1e-3, "steps 4-6 barely moved the weights, so the comparison above shows little"


def test_distributed_checkpoint_holds_policy_and_optimizer_but_no_reference(runs):
    checkpoint = runs["resumed"] / "ckpt" / f"step={STOP}.ckpt"
    assert checkpoint.is_dir() and (checkpoint / "meta.pt").is_file()
    keys = list(FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)
    assert any(k.startswith("state_dict.policy.") for k in keys)
    assert any(k.startswith("optimizer_0.state.") for k in keys), "AdamW's moments are not in the checkpoint"
    assert not [k for k in keys if "reference" in k], "the frozen reference was checkpointed"


@pytest.mark.parametrize(
    ("checkpoint", "callback_export"), [(f"step={STOP}.ckpt", "export_at_stop"), ("last.ckpt", "resumed")]
)
def test_export_command_consolidates_the_distributed_checkpoint(runs, tmp_path, checkpoint, callback_export):
    """The command's export of a checkpoint equals what ``ExportPretrained`` wrote at that step under FSDP2."""
    path = runs["resumed"] / "ckpt" / checkpoint
    assert path.is_dir(), f"{checkpoint} is not a distributed checkpoint directory"
    out = export_main(["--checkpoint", str(path), "--out", str(tmp_path / "model")])
    exported = load_file(out / "model.safetensors")
    directory = runs[callback_export] if callback_export == "export_at_stop" else runs[callback_export] / "model"
    expected = load_file(directory / "model.safetensors")
    assert exported.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(exported[name], value), name
    assert (out / "tokenizer.json").is_file()


# --------------------------------------------------------------------------------------------------------------
# Killed with SIGKILL and resumed: the run's record

RECORD_ROWS = 12  # 2 ranks x batch 1: six steps per epoch, twelve in all
PAUSE_AT = 10  # killed after the evaluation of step 10, with last.ckpt at step 8 (inside the second epoch)
FSDP2 = {
    "devices": 2,
    "strategy": {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
    },
}


def fit_record(config: Path, ckpt_path: Path | None = None) -> None:
    program = ["-m", "baldro_lightning", "fit", "--config", str(config)]
    if ckpt_path is not None:
        program += ["--ckpt_path", str(ckpt_path)]
    torchrun(program, "the 2-process fit", TIMEOUT_S, cwd=config.parent)


@pytest.fixture(scope="module")
def record_runs(tiny_model, tiny_benchmark, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted FSDP2 run and one killed (SIGKILL, every process) at step 10 and resumed from last.ckpt."""
    root = tmp_path_factory.mktemp("distributed_record")
    benchmark = benchmark_with_forget_rows(tiny_benchmark, root / "benchmark", RECORD_ROWS)
    reference = make_retain_reference(tiny_model, benchmark, root / "retain" / "eval.json")
    live = {"reference": "live"}  # as the other FSDP2 runs here
    full = write_record_config(root / "full", tiny_model, benchmark, reference, trainer=FSDP2, model_args=live)
    fit_record(full)

    killed = write_record_config(
        root / "killed", tiny_model, benchmark, reference, pause_at=PAUSE_AT, trainer=FSDP2, model_args=live
    )
    log = killed.parent / "fit.log"
    program = ["-m", "baldro_lightning", "fit", "--config", str(killed)]
    process = start_torchrun(program, cwd=killed.parent, log=log)
    deadline = time.monotonic() + TIMEOUT_S
    while not (killed.parent / "paused").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            kill_launch(process)
            pytest.fail(f"the 2-process run ended or stalled before step {PAUSE_AT}:\n{log.read_text()[-6000:]}")
        time.sleep(0.05)
    kill_launch(process)

    logs = killed.parent / "tensorboard"
    before = {
        "checkpoint": torch.load(logs / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=False)["global_step"],
        "evaluations": sorted(p.name for p in (logs / "eval").glob("step_*")),
        "train_steps": [step for step, _ in tensorboard_scalars(logs)["train/loss"]],
    }
    (root / "before_resume.json").write_text(json.dumps(before))
    fit_record(killed, ckpt_path=logs / "checkpoints" / "last.ckpt")
    return {"full": full.parent, "resumed": killed.parent, "before_resume": root / "before_resume.json"}


def test_killed_fsdp2_run_resumes_its_record_exactly(record_runs):
    """Evaluations, per_sample.csv, synchrony and TensorBoard scalars of the killed-and-resumed 2-rank run equal
    the uninterrupted run's; so do the final weights and the best checkpoint's name."""
    full, resumed = record_runs["full"], record_runs["resumed"]
    before = json.loads(record_runs["before_resume"].read_text())
    # The kill left a sharded last.ckpt at step 8 and a record reaching past it, which the resume must replace.
    assert before["checkpoint"] == 8
    assert f"step_{PAUSE_AT:06d}" in before["evaluations"] and max(before["train_steps"]) >= 8

    assert_same_record(full, resumed)
    reference = load_file(full / "model" / "model.safetensors")
    continued = load_file(resumed / "model" / "model.safetensors")
    for name, value in reference.items():
        torch.testing.assert_close(continued[name], value, rtol=0, atol=1e-6, msg=f"final {name}")
    saved = {run: sorted(p.name for p in (run / "tensorboard" / "checkpoints").iterdir()) for run in (full, resumed)}
    assert saved[resumed] == saved[full] and "last.ckpt" in saved[full]
    meta = resumed / "tensorboard" / "checkpoints" / "last.ckpt" / "meta.pt"
    assert torch.load(meta, weights_only=False)["global_step"] == 2 * RECORD_ROWS // 2
    assert stray_files(resumed) == []


# --------------------------------------------------------------------------------------------------------------
# LoRA under FSDP2


@pytest.fixture(scope="module")
def lora_runs(tiny_model, tiny_benchmark, tmp_path_factory) -> dict[str, Path]:
    """LoRA with activation checkpointing: 2 FSDP2 ranks x batch 1 and 1 process x batch 2, plain SGD."""
    root = tmp_path_factory.mktemp("distributed_lora")
    benchmark = benchmark_with_forget_rows(tiny_benchmark, root / "benchmark", FORGET_ROWS)
    options = {
        "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "gradient_checkpointing": True,
        # SGD: AdamW's normalised first steps would magnify float rounding between the two layouts.
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}},
    }
    runs = {}
    for name, devices in (("fsdp2", 2), ("single", 1)):
        config = write_config(root / name, tiny_model, benchmark, devices, batch_size=2 // devices, **options)
        fit(config, STOP, processes=devices)
        runs[name] = config.parent
    return runs


def test_lora_under_fsdp2_matches_one_process_and_exports_merged(lora_runs, tiny_model):
    fsdp2, single = lora_runs["fsdp2"], lora_runs["single"]
    assert steps(fsdp2, 0)[0] == {"sharded": True}
    sharded_losses = torch.tensor([r["loss"] for r in steps(fsdp2, 0)[1:]])
    single_losses = torch.tensor([r["loss"] for r in steps(single, 0)[1:]])
    assert len(single_losses) == STOP
    torch.testing.assert_close(sharded_losses, single_losses, rtol=1e-5, atol=1e-5)

    merged = load_file(fsdp2 / "model" / "model.safetensors")
    expected = load_file(single / "model" / "model.safetensors")
    pristine = AutoModelForCausalLM.from_pretrained(str(tiny_model)).state_dict()
    assert merged.keys() == expected.keys() and not [k for k in merged if "lora" in k]
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-5, msg=f"merged {name}")
    moved = {k for k in merged if not torch.equal(merged[k], pristine[k])}
    # Only the targeted projections change when the adapters are merged in.
    assert moved == {
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    }
    assert max((merged[k] - pristine[k]).abs().max().item() for k in moved) > 1e-4
