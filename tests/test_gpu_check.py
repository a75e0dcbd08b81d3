"""experiments/benchmarks/gpu_check.sh without a GPU: the script parses, its fits' configs resolve, and its dry run
(DRY_RUN=1: a tiny model on CPU, every step but the FSDP1 fit, whose config is only resolved) runs end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from shipped_configs import resolved

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "benchmarks" / "gpu_check.sh"
TOFU_NPO_DV = ["experiments/tofu/defaults.yaml", "experiments/methods/npo.yaml", "experiments/objectives/dv.yaml"]


def fit_config(tmp_path: Path) -> Path:
    """The override config the script writes (its heredoc), written to ``tmp_path``."""
    text = SCRIPT.read_text()
    body = re.search(r"<<'YAML'\n(.*?)\nYAML\n", text, re.S)
    assert body, "gpu_check.sh no longer writes its fit config with a <<'YAML' heredoc"
    path = tmp_path / "gpu_check.yaml"
    path.write_text(body.group(1) + "\n")
    return path


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize("strategy", ["fsdp1", "fsdp2"])
def test_fit_configs_resolve_to_one_device_bf16_npo_dv(tmp_path, strategy):
    configs = [*TOFU_NPO_DV, str(fit_config(tmp_path))]
    args = [arg for path in configs for arg in ("--config", str(REPO / path) if not Path(path).is_absolute() else path)]
    args += [
        "--model.init_args.model=models/none",
        "--trainer.accelerator=gpu",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    if strategy == "fsdp1":
        args += ["--config", str(REPO / "experiments/tofu/fsdp1.yaml"), "--trainer.devices=1", "--trainer.callbacks=[]"]
    else:
        args += [
            "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
            "--trainer.strategy.data_parallel_size=1",
            "--trainer.strategy.tensor_parallel_size=1",
        ]
    config = resolved(args)
    trainer, model = config["trainer"], config["model"]["init_args"]
    assert str(trainer["devices"]) == "1" and trainer["precision"] == "bf16-true" and trainer["max_steps"] == 12
    assert model["torch_dtype"] == "bfloat16" and model["reference"] == "live"
    assert model["forget_loss"]["class_path"].endswith("NPO") and model["forget_objective"]["class_path"].endswith("DV")
    assert config["data"]["init_args"]["benchmark"] == "data/tofu_embedded"
    if strategy == "fsdp1":
        assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
        assert trainer["callbacks"] in ([], None)  # FSDP1 runs no evaluation callback
    else:
        assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
        (evaluation,) = trainer["callbacks"]
        assert evaluation["class_path"].endswith("TofuEvaluation")
        assert evaluation["init_args"]["every_n_steps"] == 12 and evaluation["init_args"]["settings"]["limit"] == 16


@pytest.mark.slow
def test_dry_run_runs_every_step_on_cpu(tmp_path):
    out = tmp_path / "gpu_check"
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=1200)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else done.stdout
    assert done.returncode == 0, summary[-4000:] + done.stderr[-2000:]
    for step in ("model", "fit_fsdp1_config", "fit_fsdp2", "step_time", "eval"):
        assert f"{step}: done" in summary, f"step {step} did not finish:\n{summary}"
    step_time = {row["variant"]: row for row in json.loads((out / "step_time.json").read_text())["results"]}
    assert set(step_time) == {"npo", "npo_dv", "npo_cached"}
    assert all(row["model_tflops_per_s"] > 0 and row["mfu"] is None for row in step_time.values())  # no peak on CPU
    evaluation = json.loads((out / "eval.json").read_text())
    check = evaluation["checks"]["current"]
    assert check["max_abs_nll_diff"] <= 1e-5 and check["metric_disagreements"] == 0
    total = int(check["identical_generations"].split("/")[1])
    assert total > 0 and check["identical_generations"] == f"{total}/{total}"
    # The in-training evaluation ran under ModelParallelStrategy at the last step.
    assert list((out / "fit_fsdp2").rglob("step_000012/eval.json"))
