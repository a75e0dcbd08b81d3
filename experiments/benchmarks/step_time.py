"""Median training-step time of BalDRO variants relative to plain NPO, and their peak memory.

    python experiments/benchmarks/step_time.py --model models/embedded/target --benchmark data/tofu_embedded

Variants run interleaved (round-robin, ``--rounds`` times ``--steps`` steps each) so machine noise hits all of them
alike; each step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forwards, backward, optimizer
step) and the first ``--warmup`` steps of every round are dropped. Peak memory is the resident-set high-water mark
of a fresh subprocess that runs the same steps, so it includes everything the variant allocates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import lightning as L
import torch

from baldro_lightning.datamodule import ForgetRetainDataModule
from baldro_lightning.losses import NLL, NPO
from baldro_lightning.module import UnlearningModule
from baldro_lightning.objectives import DV, Group, Mean

VARIANTS = {
    "npo": dict(forget_objective=Mean(), reference="live"),
    "npo_dv": dict(forget_objective=DV(tau=2.0), reference="live"),
    "npo_g": dict(forget_objective=Group(passes="two"), reference="live"),
    "npo_g_one_pass": dict(forget_objective=Group(passes="one"), reference="live"),
    "npo_g_released": dict(forget_objective=Group(passes="released"), reference="live"),
    "npo_g_released_subsample": dict(
        forget_objective=Group(passes="released", subsample_retain=True), reference="live"
    ),
    "npo_cached": dict(forget_objective=Mean(), reference="cached"),
}


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


def run_variant(name: str, args: argparse.Namespace) -> list[float]:
    module = UnlearningModule(args.model, NPO(beta=0.1), NLL(), lr_schedule="constant", **VARIANTS[name])
    data = ForgetRetainDataModule(args.model, args.benchmark, batch_size=args.batch_size, max_length=128)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, data)
    return timer.times[args.warmup :]


def peak_rss_mib(name: str, args: argparse.Namespace) -> float:
    code = (
        "import resource, sys, argparse; sys.argv=['x']; "
        "from experiments.benchmarks.step_time import run_variant; "
        f"run_variant({name!r}, argparse.Namespace(**{vars(args)!r})); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/embedded/target")
    parser.add_argument("--benchmark", default="data/tofu_embedded")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)

    times: dict[str, list[float]] = {name: [] for name in args.variants}
    for _ in range(args.rounds):
        for name in args.variants:
            times[name] += run_variant(name, args)
    baseline = statistics.median(times["npo"])
    rows = []
    for name in args.variants:
        median = statistics.median(times[name])
        memory = peak_rss_mib(name, args) if args.memory else float("nan")
        rows.append(
            {"variant": name, "median_step_s": median, "ratio_vs_npo": median / baseline, "peak_rss_mib": memory}
        )
    print(f"{'variant':28s} {'median step (s)':>16s} {'/ npo':>8s} {'peak RSS (MiB)':>15s}")
    for row in rows:
        print(
            f"{row['variant']:28s} {row['median_step_s']:16.4f} {row['ratio_vs_npo']:8.3f} {row['peak_rss_mib']:15.1f}"
        )
    print(f"steps per variant: {len(times['npo'])} ({args.rounds} rounds x {args.steps}); batch {args.batch_size}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"settings": vars(args), "results": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
