"""Median training-step time of BalDRO variants relative to plain NPO, and the memory each one holds.

    python experiments/benchmarks/step_time.py --model models/embedded/target --benchmark data/tofu_embedded

Variants run interleaved: each round runs every variant for ``--steps`` steps, in an order rotated from round to
round, so machine noise and position in the round hit all of them alike. Each step is timed from
``on_train_batch_start`` to ``on_train_batch_end`` (forwards, backward, optimizer step) and the first ``--warmup``
steps of every run are dropped. Two ratios are printed per variant: the median over all its steps against NPO's,
and the median over rounds of the within-round ratio, with the rounds' range, which shows how much of a
difference is noise.

Memory, per variant: the bytes of model state it holds (policy weights, gradients, optimizer state, the frozen
reference or the cached reference log-probs), counted exactly, and the peak resident set during training (Linux:
``VmHWM`` after resetting it when training starts) of a fresh subprocess.

Model FLOPs utilisation (MFU), on a GPU whose bf16 peak is known (:data:`PEAK_TFLOPS`, or ``--peak-tflops``): model
FLOPs per step over the median step time and the peak. Model FLOPs count 6N per trained token (the policy's forward
and backward over the forget and retain rows) and 2N per token of the live reference's forward, N the policy's
parameters, tokens without padding; attention's own FLOPs are left out, so the figure is a lower bound. On a GPU::

    python experiments/benchmarks/step_time.py --model MODEL --benchmark data/tofu_embedded --accelerator gpu \
        --precision bf16-true --torch-dtype bfloat16 --variants npo npo_dv npo_cached --no-memory
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

from baldro_lightning.data.datamodule import ForgetRetainDataModule
from baldro_lightning.train.losses import NLL, NPO
from baldro_lightning.train.module import UnlearningModule
from baldro_lightning.train.objectives import DV, Group, Mean

PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0}
"""Dense bf16 tensor-core peak (TFLOP/s) by a part of the device name, from the vendors' data sheets (SXM parts)."""

VARIANTS = {
    "npo": dict(forget_objective=Mean(), reference="live"),
    "npo_dv": dict(forget_objective=DV(tau=2.0), reference="live"),
    "npo_g": dict(forget_objective=Group(), selection_passes="two", reference="live"),
    "npo_g_one_pass": dict(forget_objective=Group(), selection_passes="one", reference="live"),
    "npo_g_released": dict(forget_objective=Group(), selection_passes="released", reference="live"),
    "npo_g_released_subsample": dict(
        forget_objective=Group(), selection_passes="released", subsample_retain=True, reference="live"
    ),
    "npo_cached": dict(forget_objective=Mean(), reference="cached"),
}


class StepTimer(L.Callback):
    """Wall time of each step and, with a live reference, of the reference's forward inside it.

    The reference's share of a live step bounds what a cached reference can save: cached / live >= 1 - share.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.reference_times: list[float] = []
        self.model_flops: list[float] = []
        self._reference_time = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.reference is not None:
            pl_module.reference.register_forward_pre_hook(self._reference_start)
            pl_module.reference.register_forward_hook(self._reference_end)

    def _reference_start(self, module, args) -> None:
        self._reference_started = time.perf_counter()

    def _reference_end(self, module, args, output) -> None:
        self._reference_time += time.perf_counter() - self._reference_started

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.model_flops.append(model_flops(pl_module, batch))
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        self._reference_time = 0.0
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        self.times.append(time.perf_counter() - self._start)
        self.reference_times.append(self._reference_time)


def model_flops(pl_module, batch: dict) -> float:
    """6N per trained (forget and retain) token plus 2N per live-reference token; tokens without padding."""
    parameters = sum(p.numel() for p in pl_module.policy.parameters())
    forget = int(batch["forget"]["attention_mask"].sum())
    retain = int(batch["retain"]["attention_mask"].sum()) if "retain" in batch else 0
    reference = forget if pl_module.reference is not None else 0
    return 6.0 * parameters * (forget + retain) + 2.0 * parameters * reference


def peak_tflops(device_name: str, precision: str, given: float | None) -> float | None:
    """``given``, else the bf16 peak of a known GPU when training in bf16 or fp16; ``None``: no MFU."""
    if given is not None:
        return given
    if not precision.startswith(("bf16", "16")):
        return None
    return next((peak for part, peak in PEAK_TFLOPS.items() if part in device_name), None)


class StateBytes(L.Callback):
    """Bytes of training state after the first optimizer step, when AdamW's moments exist."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bytes:
            return

        def size(tensors) -> int:
            return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

        policy = list(pl_module.policy.parameters())
        optimizer = trainer.optimizers[0]
        reference = pl_module.reference
        self.bytes = {
            "policy": size(policy),
            "grads": size(p.grad for p in policy),
            "optimizer": size(v for state in optimizer.state.values() for v in state.values()),
            "reference": size(reference.parameters()) if reference is not None else 0,
            "reference_cache": size([pl_module.reference_cache]) if pl_module.reference_cache is not None else 0,
        }


class PeakRSS(L.Callback):
    """Linux only: reset the resident-set high-water mark when training starts, read it when it ends."""

    def __init__(self) -> None:
        self.mib = float("nan")

    def on_train_start(self, trainer, pl_module) -> None:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")

    def on_train_end(self, trainer, pl_module) -> None:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    self.mib = int(line.split()[1]) / 1024


def run_variant(
    name: str, args: argparse.Namespace, extra: list[L.Callback] = (), flops: list[float] | None = None
) -> tuple[list[float], list[float]]:
    """Step times and reference-forward times of ``name``'s steps after the warm-up (their model FLOPs go to
    ``flops``)."""
    flops = [] if flops is None else flops
    module = UnlearningModule(
        args.model, NPO(beta=0.1), NLL(), lr_schedule="constant", torch_dtype=args.torch_dtype, **VARIANTS[name]
    )
    data = ForgetRetainDataModule(args.model, args.benchmark, batch_size=args.batch_size, max_length=args.max_length)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, *extra],
    )
    trainer.fit(module, data)
    flops.extend(timer.model_flops[args.warmup :])
    return timer.times[args.warmup :], timer.reference_times[args.warmup :]


def memory_of(name: str, args: argparse.Namespace) -> dict:
    """State bytes and training peak RSS of ``name``, measured in a fresh process so earlier runs do not count."""
    code = (
        "import json, sys, argparse; sys.argv=['x']; "
        "from experiments.benchmarks.step_time import run_variant, StateBytes, PeakRSS; "
        "state, peak = StateBytes(), PeakRSS(); "
        f"run_variant({name!r}, argparse.Namespace(**{vars(args)!r}), [state, peak]); "
        "print(json.dumps({'state': state.bytes, 'peak_rss_mib': peak.mib}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--accelerator", default="cpu", help="cpu or gpu (one device)")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-true on a GPU")
    parser.add_argument("--torch-dtype", dest="torch_dtype", default="float32", help="weights dtype")
    parser.add_argument("--max-length", dest="max_length", type=int, default=128, help="most tokens per row")
    parser.add_argument(
        "--peak-tflops", dest="peak_tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)"
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if "npo" not in args.variants:
        parser.error(f"--variants must include npo, the baseline of every ratio; got {args.variants}")
    torch.manual_seed(0)

    times: dict[str, list[float]] = {name: [] for name in args.variants}
    flops: dict[str, list[float]] = {name: [] for name in args.variants}
    reference_shares: dict[str, list[float]] = {name: [] for name in args.variants}
    round_medians: list[dict[str, float]] = []
    for round_index in range(args.rounds):
        shift = round_index % len(args.variants)
        medians = {}
        for name in args.variants[shift:] + args.variants[:shift]:
            steps, reference = run_variant(name, args, flops=flops[name])
            times[name] += steps
            reference_shares[name] += [r / t for r, t in zip(reference, steps, strict=True)]
            medians[name] = statistics.median(steps)
        round_medians.append(medians)
    baseline = statistics.median(times["npo"])
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else "cpu"
    peak = peak_tflops(device, args.precision, args.peak_tflops)
    rows = []
    for name in args.variants:
        median = statistics.median(times[name])
        per_round = [m[name] / m["npo"] for m in round_medians]
        memory = memory_of(name, args) if args.memory else {"state": {}, "peak_rss_mib": float("nan")}
        rows.append(
            {
                "variant": name,
                "median_step_s": median,
                "ratio_vs_npo": median / baseline,
                "round_ratio_median": statistics.median(per_round),
                "round_ratio_min": min(per_round),
                "round_ratio_max": max(per_round),
                "reference_share": statistics.median(reference_shares[name]),
                "state_mib": sum(memory["state"].values()) / 2**20 if memory["state"] else float("nan"),
                "state_bytes": memory["state"],
                "peak_rss_mib": memory["peak_rss_mib"],
                "model_tflops_per_s": statistics.median(flops[name]) / median / 1e12,
                "mfu": statistics.median(flops[name]) / median / (peak * 1e12) if peak else None,
            }
        )
    print(
        f"{'variant':26s} {'median step (s)':>15s} {'/ npo':>7s} {'rounds: median [min, max]':>26s}"
        f" {'ref share':>9s} {'state (MiB)':>11s} {'train peak RSS (MiB)':>20s} {'TFLOP/s':>8s} {'MFU':>6s}"
    )
    for row in rows:
        spread = f"{row['round_ratio_median']:.3f} [{row['round_ratio_min']:.3f}, {row['round_ratio_max']:.3f}]"
        print(
            f"{row['variant']:26s} {row['median_step_s']:15.4f} {row['ratio_vs_npo']:7.3f} {spread:>26s}"
            f" {row['reference_share']:9.3f} {row['state_mib']:11.2f} {row['peak_rss_mib']:20.1f}"
            f" {row['model_tflops_per_s']:8.3f} {'-' if row['mfu'] is None else format(row['mfu'], '6.3f'):>6s}"
        )
    print(f"steps per variant: {len(times['npo'])} ({args.rounds} rounds x {args.steps}); batch {args.batch_size}")
    print("ref share: median fraction of a step spent in the live reference's forward (0 when cached)")
    print(
        f"device {device}, precision {args.precision}; model TFLOP/s: 6N per trained token + 2N per reference token; "
        f"MFU against {peak} TFLOP/s"
        if peak
        else f"device {device}, precision {args.precision}; no MFU (peak unknown)"
    )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(
                {"settings": vars(args), "device": device, "peak_tflops": peak, "results": rows}, handle, indent=2
            )


if __name__ == "__main__":
    main()
