"""The offline quickstart: make the embedded models if they are missing, then unlearn forget10 with NPO + BalDRO-DV.

``python -m baldro_lightning quickstart`` runs from the repository root on a laptop CPU. Each step is skipped when
its output already exists, so a second run goes straight to unlearning.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from baldro_lightning.cli import cli_main
from baldro_lightning.data.tokenization import load_tokenizer
from baldro_lightning.embedded.models import init_tiny_llama, train_tokenizer
from baldro_lightning.evaluation.run_record import load_eval_json, run_step_evals
from baldro_lightning.evaluation.tofu import TofuEvaluator, TofuSettings
from baldro_lightning.train.models import load_causal_lm

log = logging.getLogger("baldro_lightning.embedded.quickstart")

MODELS = Path("models/embedded")
BENCHMARK = Path("data/tofu_embedded")
# Runs of experiments/combinations.yaml: name -> config files composed in order; each runs in runs/<name>.
FINETUNE = {
    f"embedded/finetune_{name}": (
        Path("experiments/embedded/finetune.yaml"),
        Path(f"experiments/embedded/finetune_{name}.yaml"),
    )
    for name in ("target", "retain90")
}
EXPERIMENT = (
    Path("experiments/embedded/defaults.yaml"),
    Path("experiments/methods/npo.yaml"),
    Path("experiments/objectives/dv.yaml"),
)
REFERENCE = Path("runs/embedded/eval/retain90/eval.json")
# 2.2M parameters: memorises the 1,096 training QA pairs in 18 epochs at lr 3e-3 (data/README.md has the numbers).
TINY_LLAMA = {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512}


def _fit(configs: Sequence[Path], run_dir: Path) -> None:
    args = [arg for config in configs for arg in ("--config", str(config))]
    # A second quickstart runs again where the first did, replacing its run (fit refuses that without the flag).
    args += [f"--trainer.default_root_dir={run_dir}", "--trainer.enable_progress_bar=false", "--overwrite=true"]
    cli_main(["fit", *args])


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
        run = f"embedded/finetune_{name}"
        _fit(FINETUNE[run], Path("runs") / run)
        print(f"[quickstart] trained {out} in {time.perf_counter() - started:.0f} s")


def ensure_retain_reference(out: Path = REFERENCE, model: Path = MODELS / "retain90") -> None:
    """The retain model's eval.json on forget10: what forget quality and the synchrony criterion compare to."""
    if out.exists():
        print(f"[quickstart] {out} exists, not re-evaluated")
        return
    started = time.perf_counter()
    evaluator = TofuEvaluator(
        str(BENCHMARK), load_tokenizer(str(model)), "forget10", max_length=128, settings=TofuSettings(max_new_tokens=48)
    )
    evaluator.run(load_causal_lm(str(model), "float32"), out, model_name=str(model))
    print(f"[quickstart] evaluated the retain model into {out} ({time.perf_counter() - started:.0f} s)")


def _final_metrics(run_dir: Path) -> str:
    evals = run_step_evals(run_dir)
    if not evals:
        return "  (no evaluation found)"
    result = load_eval_json(evals[-1])
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
    parser.add_argument(
        "--experiment",
        nargs="+",
        type=Path,
        default=list(EXPERIMENT),
        help="unlearning config files to compose (experiments/README.md lists the shipped combinations)",
    )
    parser.add_argument("--run_dir", type=Path, default=Path("runs/embedded/npo_dv"), help="the run directory")
    args = parser.parse_args(argv)
    if not BENCHMARK.is_dir():
        raise SystemExit(f"{BENCHMARK} not found: run the quickstart from the repository root")

    started = time.perf_counter()
    ensure_base_models()
    ensure_retain_reference()
    run_dir = args.run_dir
    _fit(args.experiment, run_dir)
    print(
        f"\n[quickstart] done in {time.perf_counter() - started:.0f} s\n"
        f"  unlearned model:   {run_dir / 'model'}\n"
        f"  run directory:     {run_dir / 'tensorboard'} (config.yaml, checkpoints/, eval/step_*/eval.json, "
        "eval/per_sample.csv)\n"
        f"  tensorboard:       tensorboard --logdir {run_dir / 'tensorboard'}\n"
        f"{_final_metrics(run_dir)}"
    )
