"""How micro-batches group into optimizer updates under gradient accumulation: Lightning's way and the HF Trainer's.

With ``G`` micro-batches per update and ``M`` micro-batches per epoch (per rank):

- **Lightning** counts within each epoch and also steps on the epoch's leftover ``M mod G`` micro-batches (their
  loss still divided by ``G``): ``ceil(M / G)`` updates per epoch, every epoch a full pass over the data.
- **The HF Trainer** of the reference code (transformers 4.45, methods §1.6, P-26) makes ``U = max(floor(M / G), 1)``
  updates per epoch and ``epochs * U`` in all; it counts micro-batches across epochs, so the leftovers of one epoch
  join the first micro-batches of the next, and it stops as soon as the last update is made. When ``M <= G`` it
  also steps on the last micro-batch of every epoch. TOFU forget01 at batch 8 x 4 for 10 epochs: 10 updates over
  8 passes (Lightning: 20 over 10); forget10: 120 over 9.6 passes (Lightning: 130 over 10).

:func:`hf_update_groups` lists the reference's updates; the data modules deal one Lightning epoch as ``U`` of them
(:class:`~baldro_lightning.data.datamodule.UpdateAlignedBatches`), so Lightning's own per-epoch count steps exactly
where the reference does and the schedule's step estimate is the reference's ``epochs * U``.
"""

from __future__ import annotations

import math
from typing import Literal

UpdateAccounting = Literal["lightning", "hf"]
"""``lightning``: every epoch one pass, leftovers stepped at its end; ``hf``: the reference trainer's updates."""


def _check_counts(micro_batches: int, accumulation: int) -> None:
    if micro_batches < 1:
        raise ValueError(f"an epoch must hold at least one micro-batch, got {micro_batches}")
    if accumulation < 1:
        raise ValueError(f"--trainer.accumulate_grad_batches must be >= 1, got {accumulation}")


def hf_updates_per_epoch(micro_batches: int, accumulation: int) -> int:
    """Optimizer updates per epoch as the HF Trainer counts them: ``max(floor(M / G), 1)``.

    Args:
        micro_batches: ``M``, micro-batches of one epoch on one rank.
        accumulation: ``G``, micro-batches per update.
    """
    _check_counts(micro_batches, accumulation)
    return max(micro_batches // accumulation, 1)


def hf_warmup_updates(warmup_epochs: float, rows: int, batch_size: int, accumulation: int, world_size: int) -> int:
    """Warm-up length in updates as the reference computes it: ``floor(warmup_epochs * |F| / (B * G * W))``.

    open-unlearning's ``load_trainer_args`` turns ``warmup_epochs`` into steps this way (methods §1.6): forget01/05/10
    at batch 8 x 4 on one device give 1/6/12 (40/32 = 1.25, 200/32 = 6.25, 400/32 = 12.5).

    Args:
        warmup_epochs: Warm-up length in epochs.
        rows: ``|F|``, rows of one epoch (the forget set).
        batch_size: ``B``, rows per device per micro-batch.
        accumulation: ``G``, micro-batches per update.
        world_size: ``W``, devices.
    """
    return math.floor(warmup_epochs * rows / (batch_size * accumulation * world_size))


def hf_update_groups(micro_batches: int, accumulation: int, epochs: int) -> list[list[tuple[int, int]]]:
    """The micro-batches of each optimizer update the HF Trainer makes, as ``(epoch, micro-batch)`` pairs.

    An update fires when the micro-batch count since the start of training reaches a multiple of ``G``, or at the
    last micro-batch of an epoch that has no more than ``G`` micro-batches; training stops after
    ``epochs * hf_updates_per_epoch(M, G)`` updates.

    Example: ``M = 5, G = 4, epochs = 10`` gives 10 updates; the first is ``(0, 0) .. (0, 3)``, the second
    ``(0, 4), (1, 0), (1, 1), (1, 2)``, and the last ends at ``(7, 4)``: 40 micro-batches, 8 passes.

    Args:
        micro_batches: ``M``, micro-batches of one epoch on one rank.
        accumulation: ``G``, micro-batches per update.
        epochs: The number of epochs asked for (``num_train_epochs``).

    Returns:
        One list per update, in order.
    """
    if epochs < 1:
        raise ValueError(f"--trainer.max_epochs must be >= 1 with the HF update accounting, got {epochs}")
    total = epochs * hf_updates_per_epoch(micro_batches, accumulation)
    groups: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    seen = 0
    epoch = 0
    while len(groups) < total:
        for position in range(micro_batches):
            seen += 1
            current.append((epoch, position))
            short_epoch_ends = micro_batches <= accumulation and position == micro_batches - 1
            if seen % accumulation == 0 or short_epoch_ends:
                groups.append(current)
                current = []
                if len(groups) == total:
                    break
        epoch += 1
    return groups


def lightning_epochs(micro_batches: int, accumulation: int, epochs: int) -> list[list[tuple[int, int]]]:
    """The reference's micro-batches cut into ``epochs`` Lightning epochs of ``hf_updates_per_epoch`` updates each.

    Every Lightning epoch but possibly the short-epoch case (``M <= G``, one update of up to ``G`` micro-batches)
    holds exactly ``U * G`` micro-batches, so Lightning, counting within the epoch, steps after every ``G``-th one
    and has no leftover.

    Returns:
        ``epochs`` lists of ``(reference epoch, micro-batch)`` pairs.
    """
    per_epoch = hf_updates_per_epoch(micro_batches, accumulation)
    groups = hf_update_groups(micro_batches, accumulation, epochs)
    return [[pair for group in groups[e * per_epoch : (e + 1) * per_epoch] for pair in group] for e in range(epochs)]
