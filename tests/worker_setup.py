"""What the 2-process test workers share: their common flags, the strategy by name, and a seeded SGD run on CPU.

Imported by tests/distributed_worker.py, tests/sharded_evaluation_worker.py and tests/distributed_resume_worker.py,
both under ``torch.distributed.run`` (``tests/`` is on the path) and in the test process for 1-process baselines.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from baldro_lightning.train.module import UnlearningModule

LEARNING_RATE = 0.05


def worker_parser(doc: str, out_help: str, runs_help: str, steps: int) -> argparse.ArgumentParser:
    """The flags every worker takes (``gloo_launch.run_worker`` passes them); the worker adds its own.

    Args:
        doc: the worker's module docstring; its first line describes the worker in ``--help``.
        out_help: ``--help`` text of ``--out``.
        runs_help: ``--help`` text of ``--runs``.
        steps: the default of ``--steps``.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", required=True, help="directory of a save_pretrained causal LM and tokenizer")
    parser.add_argument("--benchmark", required=True, help="directory of {split}.jsonl files with a forget10 split")
    parser.add_argument("--out", required=True, type=Path, help=out_help)
    parser.add_argument("--runs", required=True, nargs="+", help=runs_help)
    parser.add_argument("--batch-size", type=int, default=2, help="forget (and retain) rows per rank per step")
    parser.add_argument("--steps", type=int, default=steps)
    return parser


def world_size() -> int:
    """The number of processes ``torch.distributed.run`` started (1 outside it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def strategy(name: str, world: int):
    """Lightning's strategy for ``single``, ``ddp`` or ``fsdp2`` (``ModelParallelStrategy``, data parallel only)."""
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    if name == "ddp":
        return "ddp"
    if name == "single":
        return "auto"
    raise ValueError(f"unknown strategy {name!r}; use single, ddp or fsdp2")


def is_sharded(model: torch.nn.Module | None) -> bool | None:
    """Whether every parameter is an FSDP2 shard (a DTensor); ``None`` when there is no model."""
    if model is None:
        return None
    return all(isinstance(p, DTensor) for p in model.parameters())


def seeded_sgd_module(model: str, **options: Any) -> UnlearningModule:
    """Seed 0, then the module with plain SGD at a constant ``LEARNING_RATE`` and no weight decay."""
    L.seed_everything(0, verbose=False)
    return UnlearningModule(
        model,
        optimizer=lambda params: torch.optim.SGD(params, lr=LEARNING_RATE),
        weight_decay=0.0,
        lr_schedule="constant",
        **options,
    )


def cpu_trainer(strategy_name: str, steps: int, **options: Any) -> L.Trainer:
    """A CPU trainer over all launched processes, ``steps`` steps, with no checkpoints, progress bar or summary."""
    world = world_size()
    return L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy(strategy_name, world),
        max_steps=steps,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )
