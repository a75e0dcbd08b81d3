"""The offline quickstart: make the embedded models if they are missing, then unlearn forget10 with NPO + BalDRO-DV.

``python -m baldro_lightning.quickstart`` runs from the repository root on a laptop CPU. Each step is skipped when
its output already exists, so a second run goes straight to unlearning.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from baldro_lightning.cli import cli_main

log = logging.getLogger("baldro_lightning.quickstart")

MODELS = Path("models/embedded")
BENCHMARK = Path("data/tofu_embedded")
EXPERIMENTS = Path("experiments/embedded")
REFERENCE = Path("runs/embedded/eval/retain90/eval.json")
# 2.2M parameters: memorises the 1,100 training QA pairs in 20 epochs at lr 3e-3 (data/README.md has the numbers).
TINY_LLAMA = {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512}


def _fit(config: Path, *overrides: str) -> None:
    cli_main(["fit", "--config", str(config), "--trainer.enable_progress_bar=false", *overrides])


def ensure_base_models(models: Path = MODELS) -> None:
    """Tokenizer + random tiny Llama, then the target (full) and retain (retain90) fine-tunes, side by side."""
    from baldro_lightning.embedded_models import init_tiny_llama, train_tokenizer

    init = models / "init"
    if not (init / "config.json").exists():
        started = time.perf_counter()
        tokenizer_dir = models / "tokenizer"
        train_tokenizer(BENCHMARK, tokenizer_dir)
        init_tiny_llama(tokenizer_dir, init, seed=0, **TINY_LLAMA)
        print(f"[quickstart] tokenizer and random tiny Llama written to {init} ({time.perf_counter() - started:.0f} s)")
    missing = [name for name in ("target", "retain90") if not (models / name / "config.json").exists()]
    for name in sorted({"target", "retain90"} - set(missing)):
        print(f"[quickstart] {models / name} exists, not retrained")
    if missing:
        train_concurrently([EXPERIMENTS / f"finetune_{name}.yaml" for name in missing])


def train_concurrently(configs: list[Path]) -> None:
    """Run one ``fit`` process per config at once, the machine's threads split evenly between them.

    A 2.2M-parameter model's matrices are too small for two threads to halve a step, so two single-threaded
    fits finish together sooner than two two-threaded fits in a row.
    """
    threads = str(max(1, (os.cpu_count() or 1) // len(configs)))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    started = time.perf_counter()
    jobs = []
    for config in configs:
        log_path = Path("runs/embedded") / f"{config.stem}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "baldro_lightning", "fit", "--config", str(config)]
        command.append("--trainer.enable_progress_bar=false")
        handle = open(log_path, "w")  # noqa: SIM115 - closed below, after the process ends
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        jobs.append((config, log_path, handle, process))
        print(f"[quickstart] training {config.stem} ({threads} thread(s)); log: {log_path}")
    failed = []
    for config, log_path, handle, process in jobs:
        process.wait()
        handle.close()
        if process.returncode != 0:
            failed.append(f"{config} (exit {process.returncode}; see {log_path})")
    if failed:
        raise SystemExit("[quickstart] fine-tuning failed: " + "; ".join(failed))
    print(f"[quickstart] trained {', '.join(c.stem for c in configs)} in {time.perf_counter() - started:.0f} s")


def ensure_retain_reference(out: Path = REFERENCE, model: Path = MODELS / "retain90") -> None:
    """The retain model's eval.json on forget10: what forget quality and the synchrony criterion compare to."""
    if out.exists():
        print(f"[quickstart] {out} exists, not re-evaluated")
        return
    from baldro_lightning.evaluation import TofuEvaluator
    from baldro_lightning.module import load_causal_lm
    from baldro_lightning.tokenization import load_tokenizer

    started = time.perf_counter()
    evaluator = TofuEvaluator(str(BENCHMARK), load_tokenizer(str(model)), "forget10", max_length=128, max_new_tokens=48)
    evaluator.run(load_causal_lm(str(model), "float32"), out, model_name=str(model))
    print(f"[quickstart] evaluated the retain model into {out} ({time.perf_counter() - started:.0f} s)")


def _final_metrics(run_dir: Path) -> str:
    evals = sorted((run_dir / "tensorboard" / "eval").glob("step_*/eval.json"))
    if not evals:
        return "  (no evaluation found)"
    result = json.loads(evals[-1].read_text())
    keys = ("forget_quality", "model_utility", "forget_Q_A_ROUGE", "retain_Q_A_ROUGE", "forget_truth_ratio", "privleak")
    lines = [f"  final evaluation ({evals[-1].parent.name}):"]
    for key in keys:
        value = result["metrics"].get(key, {}).get("agg_value")
        lines.append(f"    {key:22s} {value:.4g}" if isinstance(value, float) else f"    {key:22s} -")
    synchrony = result.get("synchrony", {})
    for key in ("forget_step_median", "forget_step_iqr", "fraction_never_forgotten", "fraction_over_forgotten"):
        if isinstance(synchrony.get(key), float):
            lines.append(f"    {key:22s} {synchrony[key]:.4g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment", default=str(EXPERIMENTS / "npo_dv.yaml"), help="unlearning config to run")
    args = parser.parse_args(argv)
    if not BENCHMARK.is_dir():
        raise SystemExit(f"{BENCHMARK} not found: run the quickstart from the repository root")

    started = time.perf_counter()
    ensure_base_models()
    ensure_retain_reference()
    experiment = Path(args.experiment)
    _fit(experiment)
    run_dir = Path("runs/embedded") / experiment.stem
    print(
        f"\n[quickstart] done in {time.perf_counter() - started:.0f} s\n"
        f"  unlearned model:   {run_dir / 'model'}\n"
        f"  run directory:     {run_dir / 'tensorboard'} (config.yaml, checkpoints/, eval/step_*/eval.json, "
        "eval/per_sample.csv)\n"
        f"  tensorboard:       tensorboard --logdir {run_dir / 'tensorboard'}\n"
        f"{_final_metrics(run_dir)}"
    )


if __name__ == "__main__":
    main()
