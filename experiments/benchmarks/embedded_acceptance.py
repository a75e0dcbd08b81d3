"""The embedded benchmark's acceptance figures and the quickstart's wall time, measured end to end (issue 13).

    python experiments/benchmarks/embedded_acceptance.py --work /tmp/acceptance --threads 2 --out acceptance.json

In a fresh work folder (``data/`` linked from the repository, ``experiments/embedded`` copied with ``RECIPE``
applied), it runs ``python -m baldro_lightning quickstart`` as a user would and times it. It then trains a second
retain90 that differs only in the data seed (``--data.init_args.seed``; ``--seed_everything`` alone does not change
the data order) and evaluates it against the first. One JSON comes out:

- ``quickstart_s`` and the quickstart's own per-step times (``steps_s``), plus the machine's load average before
  and after: timings are only comparable on an idle machine;
- ``target``, ``retain90``, ``retain90_seed1``, ``unlearned``: forget quality against the shipped retain90, model
  utility, forget ROUGE and the median forget truth ratio of each model (the target is the unlearning run's step-0
  evaluation, the unlearned model its last);
- ``truth_ratio_moved``: how far the unlearned model's median forget truth ratio went from the target's towards
  the retain model's, on a log scale (0: not at all, 1: all the way);
- ``acceptance``: each figure of the issue with its threshold and whether it holds.

``RECIPE`` holds the values this branch recommends for the shipped configs; once they carry them it can be empty.
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

import yaml

REPO = Path(__file__).resolve().parents[2]
EMBEDDED = Path("experiments/embedded")

RECIPE: dict[str, dict[str, Any]] = {
    "finetune_target.yaml": {"trainer.max_epochs": 10},
    "finetune_retain90.yaml": {"trainer.max_epochs": 10},
    "npo_dv.yaml": {"model.init_args.optimizer.init_args.lr": 3e-4, "model.init_args.alpha": 5.0},
}
"""Config file -> dotted key -> value, applied to the copies in the work folder (the recommended recipe)."""

THRESHOLDS = {
    "unlearned_forget_quality_min": 0.01,
    "unlearned_model_utility_min_fraction_of_target": 0.9,
    "truth_ratio_moved_min": 0.5,
    "retain_seed_forget_quality_min": 0.05,
    "target_forget_quality_max": 1e-5,
    "target_truth_ratio_max_fraction_of_retain": 0.5,
}
"""The figures of issue 13, item 2."""


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``config[a][b][c] = value`` for ``key = "a.b.c"``; every level but the last must exist."""
    *path, last = key.split(".")
    for part in path:
        config = config[part]
    config[last] = value


def prepare_workspace(work: Path, recipe: dict[str, dict[str, Any]]) -> None:
    """``work/data`` -> the repository's data; ``work/experiments/embedded``: the shipped configs with ``recipe``."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data").exists():
        (work / "data").symlink_to(REPO / "data", target_is_directory=True)
    configs = work / EMBEDDED
    configs.mkdir(parents=True, exist_ok=True)
    for source in sorted((REPO / EMBEDDED).glob("*.yaml")):
        config = yaml.safe_load(source.read_text())
        for key, value in recipe.get(source.name, {}).items():
            set_dotted(config, key, value)
        (configs / source.name).write_text(yaml.safe_dump(config, sort_keys=False))


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


def quickstart_steps(log: str) -> dict[str, float]:
    """The seconds the quickstart prints for each step (``[quickstart] trained models/embedded/target in 75 s``)."""
    steps = {}
    for line in log.splitlines():
        trained = re.search(r"\[quickstart\] trained \S+/(\w+) in (\d+) s", line)
        if trained:
            steps[trained.group(1)] = float(trained.group(2))
        elif "[quickstart] evaluated the retain model" in line:
            steps["retain_reference"] = float(re.search(r"\((\d+) s\)", line).group(1))
        elif "[quickstart] tokenizer and random tiny Llama" in line:
            steps["init"] = float(re.search(r"\((\d+) s\)", line).group(1))
        elif "[quickstart] done in" in line:
            steps["total"] = float(re.search(r"done in (\d+) s", line).group(1))
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
    """Train ``models/embedded/retain90_seed<N>``: the retain90 recipe with another data order only."""
    config = yaml.safe_load((work / EMBEDDED / "finetune_retain90.yaml").read_text())
    name = f"retain90_seed{data_seed}"
    set_dotted(config, "data.init_args.seed", data_seed)
    set_dotted(config, "trainer.default_root_dir", f"runs/embedded/finetune_{name}")
    set_dotted(config, "trainer.logger.init_args.save_dir", f"runs/embedded/finetune_{name}")
    export = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ExportPretrained"))
    export["init_args"]["dirpath"] = f"models/embedded/{name}"
    path = work / EMBEDDED / f"finetune_{name}.json"
    path.write_text(json.dumps(config))
    return run(
        ["fit", "--config", str(path.relative_to(work)), "--trainer.enable_progress_bar=false"],
        work,
        threads,
        work / f"{name}.log",
    )


def measure(work: Path, threads: int, experiment: str, data_seed: int) -> dict[str, Any]:
    prepare_workspace(work, RECIPE)
    load_before = os.getloadavg()
    quickstart_s = run(
        ["quickstart", "--experiment", str(EMBEDDED / experiment)], work, threads, work / "quickstart.log"
    )
    load_after = os.getloadavg()
    figures: dict[str, Any] = {
        "threads": threads,
        "load_average_before": load_before,
        "load_average_after_quickstart": load_after,
        "quickstart_s": quickstart_s,
        "steps_s": quickstart_steps((work / "quickstart.log").read_text()),
        "recipe": RECIPE,
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
        (work / "runs/embedded" / Path(experiment).stem / "tensorboard/eval").glob("step_*/eval.json"),
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
    parser.add_argument("--experiment", default="npo_dv.yaml", help="unlearning config the quickstart runs")
    parser.add_argument("--data-seed", type=int, default=1, help="data seed of the second retain90")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.work.exists():
        shutil.rmtree(args.work)
    figures = measure(args.work, args.threads, args.experiment, args.data_seed)
    text = json.dumps(figures, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
