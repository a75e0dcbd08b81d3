"""The offline quickstart: make the embedded models if they are missing, then unlearn forget10 with NPO + BalDRO-DV.

``python -m baldro_lightning quickstart`` runs from the repository root on a laptop CPU. Each phase is announced
before it starts, with how long it took on an idle 2-core machine; training shows Lightning's progress bar and every
evaluation its own. A phase whose output already exists is skipped, so a second run goes straight to unlearning. The
run ends with its final metrics against the range the quickstart gave on the machines it was measured on.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import transformers

from baldro_lightning.cli import cli_main
from baldro_lightning.data.tokenization import load_tokenizer
from baldro_lightning.embedded.models import init_tiny_llama, train_tokenizer
from baldro_lightning.evaluation.callbacks import EvaluationProgress
from baldro_lightning.evaluation.engine import reporting_progress
from baldro_lightning.evaluation.run_record import load_eval_json, run_step_evals
from baldro_lightning.evaluation.tofu import TofuEvaluator, TofuSettings
from baldro_lightning.train.models import load_causal_lm

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

# -- what to expect ------------------------------------------------------------------------------------------------
# Measured, not derived: re-measure both tables whenever the embedded benchmark, the tiny models or the quickstart's
# recipe change (a fresh run on an idle machine: `rm -rf models/embedded runs/embedded`, then the quickstart).
PHASES: dict[str, str] = {
    "models": "train the tokenizer and write a random tiny Llama",
    "target": "fine-tune the target model on all QA pairs (full)",
    "retain": "fine-tune the retain model on retain90 (never sees forget10)",
    "reference": "evaluate the retain model on forget10 (the reference for forget quality)",
    "unlearning": "unlearn forget10 from the target with NPO + BalDRO-DV (5 epochs, 6 evaluations)",
}
"""Each phase of the quickstart, in order, as it is announced."""

IDLE_SECONDS: dict[str, float] = {"models": 1, "target": 99, "retain": 85, "reference": 3, "unlearning": 28}
"""Wall seconds of each phase on the 2-core development machine near idle (load 0.8-1.8, 2026-12-06, data/README.md)."""

EXPECTED_FINAL: dict[str, tuple[float, float]] = {
    "forget_quality": (0.01, 1.0),
    "model_utility": (0.55, 0.75),
    "forget_Q_A_ROUGE": (0.05, 0.3),
}
"""Range of the final evaluation's metrics. Measured on the development machine (data/README.md, "Measured"): forget
quality 0.052, MU 0.644 and forget ROUGE 0.118, from a target at forget quality 4e-28, MU 0.677 and forget ROUGE
0.97; the models came out byte-identical at 1 and 2 threads. Other machines sum floats in other orders, so their
models and numbers differ: the MU and ROUGE ranges are widened by about 0.1, and forget quality's lower end is the
issue's bar for a run that reaches the retain model (0.01)."""


# -- threads -------------------------------------------------------------------------------------------------------
def threads_for_free_cores(cores: int, busy_cores: float) -> int:
    """Threads for the cores other processes leave free: ``round(cores - busy_cores)``, between 1 and ``cores``.

    Each thread of a PyTorch op waits for the slowest at every barrier, so one thread more than there are free cores
    makes every op wait for a descheduled thread: on the loaded 2-core machine the quickstart took 2,616 s against
    175 s idle with two threads per process. Examples: 2 cores, 0.1 busy -> 2; 2 cores, 0.7 busy -> 1; 8 cores, 2.6
    busy -> 5; 2 cores, 9 busy -> 1.
    """
    return max(1, min(cores, math.floor(cores - busy_cores + 0.5)))


def busy_cores_now(interval: float = 0.5) -> float:
    """How many cores other processes keep busy: from ``/proc/stat`` over ``interval`` seconds, else the load average.

    The 1-minute load average lags by up to a minute; ``/proc/stat`` (Linux) sees the last half second.
    """
    try:
        first = _cpu_times()
        time.sleep(interval)
        second = _cpu_times()
    except OSError:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    total = sum(second) - sum(first)
    idle = (second[3] + second[4]) - (first[3] + first[4])  # the idle and iowait columns
    return (os.cpu_count() or 1) * (1.0 - idle / total) if total > 0 else 0.0


def _cpu_times() -> list[int]:
    with open("/proc/stat", encoding="ascii") as handle:
        return [int(v) for v in handle.readline().split()[1:]]


def use_free_cores() -> str:
    """Set PyTorch's threads to the free cores (:func:`threads_for_free_cores`); returns a line that says so."""
    cores = os.cpu_count() or 1
    busy = busy_cores_now()
    threads = threads_for_free_cores(cores, busy)
    torch.set_num_threads(threads)
    return f"{threads} thread{'s' * (threads > 1)} ({cores} cores, {busy:.1f} busy with other work)"


# -- output ----------------------------------------------------------------------------------------------------------
class _DropTips(logging.Filter):
    """Lightning's advertisements ("💡 Tip: ... try installing litlogger") say nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_known_noise() -> None:
    """Silence what the quickstart's output would otherwise hold that is no news to its user.

    Lightning's advertisements, the deprecation warning Lightning 2.6's ``_pytree`` gives on torch 2.13 (Lightning's
    to fix), and transformers' per-file progress bars for loading and writing 8 MB models. The model summary (whose
    FLOPs are always 0 without an example input) is switched off per run in :func:`_fit`.
    """
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    transformers.utils.logging.disable_progress_bar()


def announce(number: int, phase: str, skipped: str | None = None) -> float:
    """Print a phase's line before it starts (or why it is skipped); returns its start time."""
    head = f"\n[quickstart] {number}/{len(PHASES)} {PHASES[phase]}"
    if skipped is not None:
        print(f"{head}: skipped, {skipped}", flush=True)
    else:
        expected = f"about {IDLE_SECONDS[phase]:.0f} s on an idle 2-core CPU"
        print(f"{head}\n  {expected}; using {use_free_cores()}", flush=True)
    return time.perf_counter()


def finished(phase: str, started: float) -> None:
    seconds = time.perf_counter() - started
    print(f"[quickstart] {phase} done in {seconds:.0f} s ({seconds / IDLE_SECONDS[phase]:.1f}x the idle time)")


def _fit(configs: Sequence[Path], run_dir: Path) -> None:
    args = [arg for config in configs for arg in ("--config", str(config))]
    # The tqdm bar rather than Lightning's default Rich one where rich is installed: the evaluation bars are tqdm's.
    view = ["--trainer.enable_model_summary=false", "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"]
    # A second quickstart runs again where the first did, replacing its run (fit refuses that without the flag).
    cli_main(["fit", *args, f"--trainer.default_root_dir={run_dir}", "--overwrite=true", *view])


# -- phases ----------------------------------------------------------------------------------------------------------
def ensure_base_models(models: Path = MODELS) -> None:
    """Tokenizer + random tiny Llama, then the target (full) and retain (retain90) fine-tunes."""
    init = models / "init"
    if (init / "config.json").exists():
        announce(1, "models", skipped=f"{init} exists")
    else:
        started = announce(1, "models")
        tokenizer_dir = models / "tokenizer"
        train_tokenizer(BENCHMARK, tokenizer_dir)
        init_tiny_llama(tokenizer_dir, init, seed=0, **TINY_LLAMA)
        finished("models", started)
    for number, (phase, name) in enumerate((("target", "target"), ("retain", "retain90")), start=2):
        out = models / name
        if (out / "config.json").exists():
            announce(number, phase, skipped=f"{out} exists")
            continue
        started = announce(number, phase)
        run = f"embedded/finetune_{name}"
        _fit(FINETUNE[run], Path("runs") / run)
        finished(phase, started)


def ensure_retain_reference(out: Path = REFERENCE, model: Path = MODELS / "retain90") -> None:
    """The retain model's eval.json on forget10: what forget quality and the synchrony criterion compare to."""
    if out.exists():
        announce(4, "reference", skipped=f"{out} exists")
        return
    started = announce(4, "reference")
    evaluator = TofuEvaluator(
        str(BENCHMARK), load_tokenizer(str(model)), "forget10", max_length=128, settings=TofuSettings(max_new_tokens=48)
    )
    progress = EvaluationProgress("retain model")
    try:
        with reporting_progress(progress):
            evaluator.run(load_causal_lm(str(model), "float32"), out, model_name=str(model))
    finally:
        progress.close()
    finished("reference", started)


def within_expected(metrics: Mapping[str, float | None]) -> list[str]:
    """One line per metric of :data:`EXPECTED_FINAL`: its value, the expected range, and whether it lies inside."""
    lines = []
    for key, (low, high) in EXPECTED_FINAL.items():
        value = metrics.get(key)
        if not isinstance(value, float):
            lines.append(f"    {key:27s} -        expected {low:g}..{high:g}: not evaluated")
            continue
        verdict = "inside" if low <= value <= high else "OUTSIDE"
        lines.append(f"    {key:27s} {value:<8.3g} expected {low:g}..{high:g}: {verdict}")
    return lines


def _final_metrics(run_dir: Path) -> str:
    evals = run_step_evals(run_dir)
    if not evals:
        return "  (no evaluation found)"
    result = load_eval_json(evals[-1])
    values = {key: entry.get("agg_value") for key, entry in result["metrics"].items() if isinstance(entry, dict)}
    keys = ("forget_quality", "retain_Q_A_ROUGE", "forget_truth_ratio", "privleak")
    lines = [f"  final evaluation ({evals[-1].parent.name}):"]
    for key in keys:
        value = values.get(key)
        lines.append(f"    {key:27s} {value:.4g}" if isinstance(value, float) else f"    {key:27s} -")
    synchrony = result.get("synchrony", {})
    synchrony_keys = (
        "forget_step_median",
        "forget_step_iqr",
        "fraction_forgotten_at_start",
        "fraction_never_forgotten",
    )
    for key in (*synchrony_keys, "fraction_over_forgotten"):
        if isinstance(synchrony.get(key), float):
            lines.append(f"    {key:27s} {synchrony[key]:.4g}")
    lines.append("  against the range measured so far (EXPECTED_FINAL, baldro_lightning/embedded/quickstart.py):")
    lines += within_expected(values)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m baldro_lightning quickstart", description=__doc__)
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

    quiet_known_noise()
    started = time.perf_counter()
    ensure_base_models()
    ensure_retain_reference()
    run_dir = args.run_dir
    unlearning = announce(5, "unlearning")
    _fit(args.experiment, run_dir)
    finished("unlearning", unlearning)
    print(
        f"\n[quickstart] done in {time.perf_counter() - started:.0f} s\n"
        f"  unlearned model:   {run_dir / 'model'}\n"
        f"  run directory:     {run_dir / 'tensorboard'} (config.yaml, checkpoints/, eval/step_*/eval.json, "
        "eval/per_sample.csv)\n"
        f"  tensorboard:       tensorboard --logdir {run_dir.parent}   (the run is {run_dir.name}/tensorboard)\n"
        f"{_final_metrics(run_dir)}"
    )
