"""The embedded benchmark's acceptance figures and the quickstart's wall time, measured end to end (issue 13).

    python experiments/benchmarks/embedded_acceptance.py --work /tmp/acceptance --threads 2 --out acceptance.json

In a fresh work folder (``data/`` and ``experiments/`` linked from the repository), it runs
``python -m baldro_lightning quickstart`` as a user would, with the shipped configs, and times it. It then trains a
second retain90 that differs only in the data seed (``--data.init_args.seed``; ``--seed_everything`` alone does not
change the data order) and evaluates it against the first. One JSON comes out:

- ``quickstart_s`` and the quickstart's own per-step times (``steps_s``), plus the machine's load average before
  and after: timings are only comparable on an idle machine;
- ``target``, ``retain90``, ``retain90_seed1``, ``unlearned``: forget quality against the shipped retain90, model
  utility, forget ROUGE and the median forget truth ratio of each model (the target is the unlearning run's step-0
  evaluation, the unlearned model its last);
- ``truth_ratio_moved``: how far the unlearned model's median forget truth ratio went from the target's towards
  the retain model's, on a log scale (0: not at all, 1: all the way);
- ``acceptance``: each figure of the issue with its threshold and whether it holds.

``tests/test_embedded_acceptance.py`` (``pytest -m training``) runs this script and asserts ``acceptance``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
EMBEDDED = Path("experiments/embedded")
RUN = Path("runs/embedded/npo_dv")
"""The quickstart's unlearning run (its default ``--run_dir``): shipped NPO + BalDRO-DV on forget10."""

THRESHOLDS = {
    "unlearned_forget_quality_min": 0.01,
    "unlearned_model_utility_min_fraction_of_target": 0.9,
    "truth_ratio_moved_min": 0.5,
    "retain_seed_forget_quality_min": 0.05,
    "target_forget_quality_max": 1e-5,
    "target_truth_ratio_max_fraction_of_retain": 0.5,
}
"""The figures of issue 13, item 2."""


def prepare_workspace(work: Path) -> None:
    """``work/data`` and ``work/experiments``: links to the repository's, so every step reads the shipped files."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("data", "experiments"):
        if not (work / name).exists():
            (work / name).symlink_to(REPO / name, target_is_directory=True)


def run(command: list[str], work: Path, threads: int, log: Path) -> float:
    """Run ``python -m baldro_lightning ...`` in ``work`` with ``threads`` torch threads; returns its wall time."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(
            [sys.executable, "-m", "baldro_lightning", *command], cwd=work, env=env, stdout=handle, stderr=handle
        )
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - started


def quickstart_steps(log: str) -> dict[str, Any]:
    """The seconds the quickstart prints for each phase (``[quickstart] target done in 101 s (...)``), its total,
    and the thread counts it chose (``using 2 threads (2 cores, 0.1 busy with other work)``): the quickstart sets
    its own threads from the free cores, whatever ``--threads`` says."""
    steps: dict[str, Any] = {"threads": []}
    for line in log.splitlines():
        phase = re.search(r"\[quickstart\] (\w+) done in (\d+) s", line)
        total = re.search(r"\[quickstart\] done in (\d+) s", line)
        threads = re.search(r"; using (\d+) thread", line)
        if phase:
            steps[phase.group(1)] = float(phase.group(2))
        elif total:
            steps["total"] = float(total.group(1))
        elif threads:
            steps["threads"].append(int(threads.group(1)))
    return steps


def model_figures(result: dict[str, Any]) -> dict[str, float]:
    """Forget quality, model utility, forget ROUGE and median forget truth ratio of one ``eval.json``."""
    metrics = result["metrics"]
    ratios = [v for v in metrics["forget_truth_ratio"]["value_by_index"].values() if v is not None]

    def value(key: str) -> float:
        return float(metrics[key]["agg_value"]) if key in metrics else math.nan

    return {
        "forget_quality": value("forget_quality"),
        "model_utility": value("model_utility"),
        "forget_rouge": value("forget_Q_A_ROUGE"),
        "median_forget_truth_ratio": statistics.median(ratios),
    }


def log_fraction_moved(start: float, end: float, goal: float) -> float:
    """How far ``end`` went from ``start`` towards ``goal`` on a log scale (0: nowhere, 1: all the way)."""
    return math.log(end / start) / math.log(goal / start)


def acceptance(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each figure of the issue: its value, its threshold and whether it holds."""
    t, r, u, s = (figures[k] for k in ("target", "retain90", "unlearned", "retain90_seed1"))
    rows = {
        "unlearned_forget_quality": (u["forget_quality"], ">=", THRESHOLDS["unlearned_forget_quality_min"]),
        "unlearned_model_utility_over_target": (
            u["model_utility"] / t["model_utility"],
            ">=",
            THRESHOLDS["unlearned_model_utility_min_fraction_of_target"],
        ),
        "truth_ratio_moved": (figures["truth_ratio_moved"], ">=", THRESHOLDS["truth_ratio_moved_min"]),
        "retain_seed_forget_quality": (s["forget_quality"], ">=", THRESHOLDS["retain_seed_forget_quality_min"]),
        "target_forget_quality": (t["forget_quality"], "<=", THRESHOLDS["target_forget_quality_max"]),
        "target_over_retain_truth_ratio": (
            t["median_forget_truth_ratio"] / r["median_forget_truth_ratio"],
            "<=",
            THRESHOLDS["target_truth_ratio_max_fraction_of_retain"],
        ),
    }
    return {
        name: {"value": value, "threshold": f"{op} {limit}", "ok": value >= limit if op == ">=" else value <= limit}
        for name, (value, op, limit) in rows.items()
    }


def second_retain(work: Path, threads: int, data_seed: int) -> float:
    """Train ``models/embedded/retain90_seed<N>``: the shipped retain90 run with another data order only."""
    name = f"retain90_seed{data_seed}"
    return run(
        [
            *("fit", "--config", str(EMBEDDED / "finetune.yaml"), "--config", str(EMBEDDED / "finetune_retain90.yaml")),
            f"--data.init_args.seed={data_seed}",
            f"--trainer.default_root_dir=runs/embedded/finetune_{name}",
            f"--trainer.callbacks.ExportPretrained.init_args.dirpath=models/embedded/{name}",
            "--trainer.enable_progress_bar=false",
        ],
        work,
        threads,
        work / f"{name}.log",
    )


def measure(work: Path, threads: int, data_seed: int) -> dict[str, Any]:
    prepare_workspace(work)
    load_before = os.getloadavg()
    quickstart_s = run(["quickstart", "--run_dir", str(RUN)], work, threads, work / "quickstart.log")
    load_after = os.getloadavg()
    figures: dict[str, Any] = {
        "threads": threads,
        "load_average_before": load_before,
        "load_average_after_quickstart": load_after,
        "quickstart_s": quickstart_s,
        "steps_s": quickstart_steps((work / "quickstart.log").read_text()),
    }
    second_retain(work, threads, data_seed)
    reference = "runs/embedded/eval/retain90/eval.json"
    run(
        [
            "evaluate",
            *("--model", f"models/embedded/retain90_seed{data_seed}", "--benchmark", "data/tofu_embedded"),
            *("--forget_split", "forget10", "--max_new_tokens", "48", "--max_length", "128"),
            *("--retain_reference", reference, "--out", f"runs/embedded/eval/retain90_seed{data_seed}/eval.json"),
        ],
        work,
        threads,
        work / "evaluate_seed.log",
    )
    evals = sorted(
        (work / RUN / "tensorboard/eval").glob("step_*/eval.json"),
        key=lambda p: int(p.parent.name.removeprefix("step_")),
    )
    read = lambda path: model_figures(json.loads(Path(path).read_text()))  # noqa: E731
    figures["target"] = read(evals[0])
    figures["unlearned"] = read(evals[-1])
    figures["unlearned"]["step"] = int(evals[-1].parent.name.removeprefix("step_"))
    figures["retain90"] = read(work / reference)
    figures["retain90_seed1"] = read(work / f"runs/embedded/eval/retain90_seed{data_seed}/eval.json")
    figures["truth_ratio_moved"] = log_fraction_moved(
        figures["target"]["median_forget_truth_ratio"],
        figures["unlearned"]["median_forget_truth_ratio"],
        figures["retain90"]["median_forget_truth_ratio"],
    )
    figures["acceptance"] = acceptance(figures)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="fresh folder for models and runs (emptied first)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every step")
    parser.add_argument("--data-seed", type=int, default=1, help="data seed of the second retain90")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.work.exists():
        shutil.rmtree(args.work)
    figures = measure(args.work, args.threads, args.data_seed)
    text = json.dumps(figures, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
