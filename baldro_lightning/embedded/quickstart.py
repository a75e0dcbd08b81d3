"""The offline quickstart: make the embedded models if they are missing, then unlearn forget10 with NPO + BalDRO-DV.

``python -m baldro_lightning quickstart`` runs from the repository root on a laptop CPU. Each step is skipped when
its output already exists, so a second run goes straight to unlearning.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from baldro_lightning.cli import cli_main
from baldro_lightning.data.tokenization import load_tokenizer
from baldro_lightning.embedded.models import init_tiny_llama, train_tokenizer
from baldro_lightning.evaluation.tofu import TofuEvaluator
from baldro_lightning.train.models import load_causal_lm

log = logging.getLogger("baldro_lightning.embedded.quickstart")

MODELS = Path("models/embedded")
BENCHMARK = Path("data/tofu_embedded")
EXPERIMENTS = Path("experiments/embedded")
REFERENCE = Path("runs/embedded/eval/retain90/eval.json")
# 2.6M parameters: memorises the 2,096 training QA pairs in 10 epochs at lr 3e-3 (data/README.md has the numbers).
# Untied embeddings: unlearning then pushes answer tokens down in the output projection without moving the input
# embeddings that every question reads, and the target learns better in the same steps (same compute per step).
TINY_LLAMA = {
    "hidden_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "tie_word_embeddings": False,
}


def _fit(config: Path, *overrides: str) -> None:
    cli_main(["fit", "--config", str(config), "--trainer.enable_progress_bar=false", *overrides])


def ensure_base_models(models: Path = MODELS) -> None:
    """Tokenizer + random tiny Llama, then the target (full) and retain (retain90) fine-tunes."""
    init = models / "init"
    if not (init / "config.json").exists():
        started = time.perf_counter()
        tokenizer_dir = models / "tokenizer"
        train_tokenizer(BENCHMARK, tokenizer_dir)
        init_tiny_llama(tokenizer_dir, init, seed=0, **TINY_LLAMA)
        print(f"[quickstart] tokenizer and random tiny Llama written to {init} ({time.perf_counter() - started:.0f} s)")
    for name in ("target", "retain90"):
        out = models / name
        if (out / "config.json").exists():
            print(f"[quickstart] {out} exists, not retrained")
            continue
        started = time.perf_counter()
        _fit(EXPERIMENTS / f"finetune_{name}.yaml")
        print(f"[quickstart] trained {out} in {time.perf_counter() - started:.0f} s")


def ensure_retain_reference(out: Path = REFERENCE, model: Path = MODELS / "retain90") -> None:
    """The retain model's eval.json on forget10: what forget quality and the synchrony criterion compare to."""
    if out.exists():
        print(f"[quickstart] {out} exists, not re-evaluated")
        return
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
