"""Sharded TOFU evaluation on several ranks, recorded for tests/test_sharded_evaluation.py.

Launched on 2 CPU processes with ``python -m torch.distributed.run --nproc_per_node=2
tests/sharded_evaluation_worker.py`` (gloo), or imported and called in-process for the single-process baseline.

Two kinds of run:

- ``fit:<strategy>`` (``single``, ``ddp``, ``fsdp2``): a short unlearning run with the :class:`TofuEvaluation`
  callback evaluating at the start and after every step. The callback writes into ``<out>/<run>/rank<r>/`` (one
  directory per rank, so that a file written by any rank but 0 shows up), and every rank records what it scored
  and aggregated in ``<out>/records/<run>-rank<r>.json``.
- ``standalone:<layout>`` (``single``, ``replicated``, ``fsdp2``): :meth:`TofuEvaluator.score` on each rank's
  :func:`shard_rows`, the :class:`RowScores` gathered with ``all_gather_object`` and joined with
  :meth:`RowScores.concat`, aggregated on every rank; rank 0 writes ``<out>/<run>/eval.json``.

A record holds, per evaluation, the row indices this rank scored per split, whether it asked for ``synced_gpus``,
how many forwards its policy ran while scoring (sharded ranks must run equally many), and the aggregated metrics.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from worker_setup import cpu_trainer, is_sharded, seeded_sgd_module, worker_parser

from baldro_lightning.data.datamodule import ForgetRetainDataModule
from baldro_lightning.data.tokenization import load_tokenizer
from baldro_lightning.evaluation.callbacks import TofuEvaluation
from baldro_lightning.evaluation.engine import RowScores, shard_rows
from baldro_lightning.evaluation.run_record import write_eval_json
from baldro_lightning.evaluation.tofu import TofuEvaluator, TofuSettings
from baldro_lightning.train.distributed import release_process_group
from baldro_lightning.train.losses import NLL, NPO
from baldro_lightning.train.models import load_causal_lm
from baldro_lightning.train.objectives import DV

MAX_LENGTH = 64


class _Recorder:
    """Wraps an evaluator's ``score`` and ``aggregate`` to keep what this rank did at each evaluation."""

    def __init__(self, evaluator: TofuEvaluator) -> None:
        self.evaluations: list[dict[str, Any]] = []
        self.forwards = 0
        self._model: torch.nn.Module | None = None
        score, aggregate = evaluator.score, evaluator.aggregate

        def recorded_score(model, rows=None, synced_gpus=False):
            self._watch(model)
            before = self.forwards
            out = score(model, rows, synced_gpus=synced_gpus)
            self.evaluations.append(
                {
                    "scored": {role: list(part.indices) for role, part in out.items()},
                    "synced_gpus": synced_gpus,
                    "forwards": self.forwards - before,
                    "sharded": is_sharded(model),
                }
            )
            return out

        def recorded_aggregate(scores):
            result = aggregate(scores)
            self.evaluations[-1]["metrics"] = result
            self.evaluations[-1]["gathered"] = {role: list(part.indices) for role, part in scores.items()}
            return result

        evaluator.score = recorded_score
        evaluator.aggregate = recorded_aggregate

    def _watch(self, model: torch.nn.Module) -> None:
        if self._model is not model:
            # The root module's forward: every likelihood batch, every generate step and every dummy call.
            model.register_forward_pre_hook(self._count)
            self._model = model

    def _count(self, module, args) -> None:
        self.forwards += 1


class RecordedEvaluation(TofuEvaluation):
    """:class:`TofuEvaluation` whose evaluator keeps a per-rank record (see :class:`_Recorder`)."""

    recorder: _Recorder | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.recorder is None:
            self.recorder = _Recorder(self.evaluator)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_fit(
    strategy: str,
    model: str,
    benchmark: str,
    out: Path,
    batch_size: int,
    eval_batch_size: int,
    max_new_tokens: int,
    steps: int,
) -> Path:
    """Train ``steps`` steps with the evaluation callback at the start and after every step; returns the record."""
    module = seeded_sgd_module(
        model, forget_loss=NPO(beta=0.1), retain_loss=NLL(), forget_objective=DV(tau=1.0), reference="live"
    )
    data = ForgetRetainDataModule(
        model, benchmark, forget_split="forget10", batch_size=batch_size, max_length=MAX_LENGTH
    )
    rank = int(os.environ.get("RANK", "0"))
    run_dir = out / f"fit-{strategy}" / f"rank{rank}"
    callback = RecordedEvaluation(
        TofuSettings(batch_size=eval_batch_size, max_new_tokens=max_new_tokens),
        every_n_steps=1,
        every_epoch=False,
        on_start=True,
        criterion="rouge",
        dirpath=str(run_dir / "eval"),
    )
    trainer = cpu_trainer(
        strategy, steps, logger=TensorBoardLogger(run_dir, name="tb", version=""), callbacks=[callback]
    )
    trainer.fit(module, datamodule=data)
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "evaluations": callback.recorder.evaluations,
    }
    path = out / "records" / f"fit-{strategy}-rank{trainer.global_rank}.json"
    write_eval_json(record, path)
    return path


def run_standalone(
    layout: str, model: str, benchmark: str, out: Path, eval_batch_size: int, max_new_tokens: int
) -> Path:
    """Score each rank's share of the rows, gather, aggregate on every rank; rank 0 writes ``eval.json``.

    ``layout``: ``single`` (one process, all rows), ``replicated`` (a full model per rank) or ``fsdp2`` (the model
    sharded over the ranks, so scoring must keep them in lockstep with ``synced_gpus``).
    """
    if layout != "single" and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = _rank_world() if layout != "single" else (0, 1)
    policy = load_causal_lm(model, "float32")
    if layout == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        from baldro_lightning.train.sharding import shard_model

        shard_model(policy, init_device_mesh("cpu", (world,)))
    elif layout not in ("single", "replicated"):
        raise ValueError(f"--runs standalone:{layout}: unknown layout; use single, replicated or fsdp2")
    evaluator = TofuEvaluator(
        benchmark,
        load_tokenizer(model),
        "forget10",
        max_length=MAX_LENGTH,
        settings=TofuSettings(batch_size=eval_batch_size, max_new_tokens=max_new_tokens),
    )
    recorder = _Recorder(evaluator)
    local = evaluator.score(
        policy, {role: shard_rows(rows, rank, world) for role, rows in evaluator.rows.items()}, layout == "fsdp2"
    )
    parts: list[dict[str, RowScores]] = [local]
    if world > 1:
        parts = [{} for _ in range(world)]
        dist.all_gather_object(parts, local)
    merged = {role: RowScores.concat([part[role] for part in parts]) for role in local}
    result = {"meta": evaluator.meta(policy), "metrics": evaluator.aggregate(merged)}
    if rank == 0:
        write_eval_json(result, out / f"standalone-{layout}" / "eval.json")
    path = out / "records" / f"standalone-{layout}-rank{rank}.json"
    write_eval_json({"rank": rank, "world_size": world, "evaluations": recorder.evaluations}, path)
    return path


def main() -> None:
    parser = worker_parser(
        __doc__,
        out_help="directory for the runs' files and records",
        runs_help="fit:<single|ddp|fsdp2> or standalone:<replicated|fsdp2>",
        steps=1,
    )
    parser.add_argument("--eval-batch-size", type=int, default=4, help="examples per likelihood forward / generate")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        kind, _, name = run.partition(":")
        if kind == "fit":
            run_fit(
                name,
                args.model,
                args.benchmark,
                args.out,
                args.batch_size,
                args.eval_batch_size,
                args.max_new_tokens,
                args.steps,
            )
        elif kind == "standalone":
            run_standalone(name, args.model, args.benchmark, args.out, args.eval_batch_size, args.max_new_tokens)
        else:
            raise ValueError(f"--runs {run!r}: expected fit:<strategy> or standalone:<layout>")


if __name__ == "__main__":
    main()
    release_process_group()
