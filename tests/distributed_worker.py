"""One short unlearning run per case, recorded for the world-size invariance tests (tests/test_distributed.py).

Launched on 2 CPU processes with ``python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py``
(gloo), or imported and called in-process for the single-process baseline. Each case trains ``--steps`` steps
with plain SGD at a constant learning rate and writes ``<out>/<strategy>-<case>.pt`` on rank 0 holding the
per-step ``train/loss``, the per-step snapshot of the per-sample DRO weights, and the final full (unsharded) state
dicts of the policy and, when one is held, of the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from worker_setup import cpu_trainer, is_sharded, seeded_sgd_module, worker_parser, world_size

from baldro_lightning.data.datamodule import ForgetRetainDataModule
from baldro_lightning.train.distributed import release_process_group
from baldro_lightning.train.losses import KL, NLL, NPO, SatImp, SimNPO
from baldro_lightning.train.module import UnlearningModule
from baldro_lightning.train.objectives import DV, Group

StrategyName = Literal["single", "ddp", "fsdp2"]


@dataclass(frozen=True)
class Case:
    """One unlearning configuration: the module's keyword arguments (built fresh per run) and the clipping."""

    module: Callable[[], dict[str, Any]]
    gradient_clip_val: float | None = None


def _npo_dv() -> dict[str, Any]:
    return {"forget_loss": NPO(beta=0.1), "forget_objective": DV(tau=1.0), "retain_loss": NLL(), "reference": "live"}


def _simnpo() -> SimNPO:
    # The margin sits near a random model's mean NLL (log 300 = 5.7), where the log-sigmoid is not saturated.
    return SimNPO(beta=2.5, delta=5.5)


# The retain term is on everywhere so that the token-mean retain normalisation (which needs the global token count)
# is part of what must match.
CASES: dict[str, Case] = {
    "npo_dv": Case(_npo_dv),
    # Clipping rescales the gradient to a fixed norm, which would hide a wrong data-parallel scale; hence a case
    # of its own rather than clipping everywhere.
    "npo_dv_clip": Case(_npo_dv, gradient_clip_val=1.0),
    # NPO losses all equal (2/beta) log 2 at step 0 (policy == reference), so ranking by the loss would pick rows
    # by tie-breaking (see npo_group_loss); the released hardness proxy (lowest mean NLL) differs row to row.
    "npo_group": Case(
        lambda: {
            "forget_loss": NPO(beta=0.1),
            "forget_objective": Group(ratio=0.5),
            "selection_score": "mean_nll",
            "selection_passes": "two",
            "retain_loss": NLL(),
            "reference": "cached",
        }
    ),
    "npo_group_released": Case(
        lambda: {
            "forget_loss": NPO(beta=0.1),
            "forget_objective": Group(ratio=0.5),
            "selection_score": "mean_nll",
            "selection_passes": "released",
            "retain_loss": NLL(),
            "reference": "live",
        }
    ),
    "simnpo_group": Case(
        lambda: {
            "forget_loss": _simnpo(),
            "forget_objective": Group(ratio=0.5),
            "selection_score": "loss",
            "selection_passes": "two",
            "retain_loss": NLL(),
        }
    ),
    "npo_dv_released": Case(
        lambda: {
            "forget_loss": NPO(beta=0.1),
            "forget_objective": DV(tau=2.0, sign="released"),
            "retain_loss": NLL(normalization="sample_mean"),
            "reference": "live",
        }
    ),
    "satimp_dv": Case(
        # A small beta1: with the default 5 the token weights p^5 of a random model are ~1e-13 and the forget term
        # would vanish, leaving nothing of it to compare.
        lambda: {"forget_loss": SatImp(beta1=0.1), "forget_objective": DV(tau=2.0), "retain_loss": NLL()}
    ),
    "npo_kl": Case(
        lambda: {
            "forget_loss": NPO(beta=0.1),
            "forget_objective": DV(tau=1.0),
            "retain_loss": KL(positions="answer"),
            "reference": "live",
        }
    ),
    # NPO + Group ranked by the loss (ties broken by row id) and KL over all positions (retain padded globally).
    "npo_group_loss": Case(
        lambda: {
            "forget_loss": NPO(beta=0.1),
            "forget_objective": Group(ratio=0.5),
            "selection_score": "loss",
            "selection_passes": "two",
            "retain_loss": NLL(),
            "reference": "live",
        }
    ),
    "npo_kl_all": Case(
        lambda: {
            "forget_loss": NPO(beta=0.1),
            "forget_objective": DV(tau=1.0),
            "retain_loss": KL(positions="all"),
            "reference": "live",
        }
    ),
    # The released DrSatImp: DV over every answer token of the global micro-batch, sequence-sum retain NLL.
    "satimp_dv_token": Case(
        lambda: {
            "forget_loss": SatImp(beta1=0.1),
            "forget_objective": DV(tau=1.0, sign="released", granularity="token"),
            "retain_loss": NLL(normalization="seq_sum"),
        }
    ),
    "simnpo_group_subsample": Case(
        lambda: {
            "forget_loss": _simnpo(),
            "forget_objective": Group(ratio=0.5),
            "selection_score": "loss",
            "selection_passes": "two",
            "subsample_retain": True,
            "retain_loss": NLL(),
        }
    ),
}


class StepRecorder(L.Callback):
    """Keeps each step's logged ``train/loss`` and a copy of the per-sample weight record."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: UnlearningModule, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        self.weights.append(pl_module.forget_weights.clone())


def _full_state(model: torch.nn.Module | None) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict on CPU (a collective under FSDP2: every rank must call it)."""
    if model is None:
        return None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.detach().clone() for k, v in get_model_state_dict(model, options=options).items()}


def run_case(
    case: str, strategy: StrategyName, model: str, benchmark: str, batch_size: int, steps: int, out: Path
) -> Path:
    """Train one case and write its record; returns the record's path (written on rank 0 only)."""
    module = seeded_sgd_module(model, **CASES[case].module())
    data = ForgetRetainDataModule(model, benchmark, forget_split="forget10", batch_size=batch_size, max_length=48)
    recorder = StepRecorder()
    trainer = cpu_trainer(
        strategy, steps, logger=False, callbacks=[recorder], gradient_clip_val=CASES[case].gradient_clip_val
    )
    trainer.fit(module, datamodule=data)
    record = {
        "losses": recorder.losses,
        "weights": recorder.weights,
        "policy": _full_state(module.policy),
        "reference": _full_state(module.reference),
        "sharded": {"policy": is_sharded(module.policy), "reference": is_sharded(module.reference)},
        "world_size": world_size(),
    }
    path = out / f"{strategy}-{case}.pt"
    if trainer.is_global_zero:
        torch.save(record, path)
    return path


def main() -> None:
    parser = worker_parser(
        __doc__,
        out_help="directory for the <strategy>-<case>.pt records",
        runs_help="strategy:case pairs, e.g. ddp:npo_dv fsdp2:npo_dv",
        steps=3,
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        strategy, case = run.split(":")
        run_case(case, strategy, args.model, args.benchmark, args.batch_size, args.steps, args.out)


if __name__ == "__main__":
    main()
    release_process_group()
