"""The offline quickstart: make the embedded models if they are missing, then unlearn forget10 with NPO + BalDRO-DV.

``python -m baldro_lightning.quickstart`` runs from the repository root on a laptop CPU. Each step is skipped when
its output already exists, so a second run goes straight to unlearning.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from baldro_lightning.cli import cli_main

log = logging.getLogger("baldro_lightning.quickstart")

MODELS = Path("models/embedded")
BENCHMARK = Path("data/tofu_embedded")
EXPERIMENTS = Path("experiments/embedded")


def _fit(config: Path, *overrides: str) -> None:
    cli_main(["fit", "--config", str(config), "--trainer.enable_progress_bar=false", *overrides])


def ensure_base_models(models: Path = MODELS) -> None:
    """Tokenizer + random tiny Llama, then the target (full) and retain (retain90) fine-tunes."""
    from baldro_lightning.embedded_models import init_tiny_llama, train_tokenizer

    init = models / "init"
    if not (init / "config.json").exists():
        started = time.perf_counter()
        tokenizer_dir = models / "tokenizer"
        train_tokenizer(BENCHMARK, tokenizer_dir)
        init_tiny_llama(tokenizer_dir, init, seed=0)
        print(f"[quickstart] tokenizer and random tiny Llama written to {init} ({time.perf_counter() - started:.0f} s)")
    for name in ("target", "retain90"):
        out = models / name
        if (out / "config.json").exists():
            print(f"[quickstart] {out} exists, not retrained")
            continue
        started = time.perf_counter()
        _fit(EXPERIMENTS / f"finetune_{name}.yaml")
        print(f"[quickstart] trained {out} in {time.perf_counter() - started:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment", default=str(EXPERIMENTS / "npo_dv.yaml"), help="unlearning config to run")
    args = parser.parse_args(argv)
    if not BENCHMARK.is_dir():
        raise SystemExit(f"{BENCHMARK} not found: run the quickstart from the repository root")

    started = time.perf_counter()
    ensure_base_models()
    experiment = Path(args.experiment)
    _fit(experiment)
    run_dir = Path("runs/embedded") / experiment.stem
    print(
        f"\n[quickstart] done in {time.perf_counter() - started:.0f} s\n"
        f"  unlearned model:  {run_dir / 'model'}\n"
        f"  run directory:    {run_dir} (config.yaml, checkpoints)\n"
        f"  tensorboard:      tensorboard --logdir {run_dir / 'tensorboard'}\n"
    )


if __name__ == "__main__":
    main()
