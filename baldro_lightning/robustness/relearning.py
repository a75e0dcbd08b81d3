"""The relearning attack's fine-tune: a few optimizer steps of plain NLL through Lightning, on a given dataset.

The attacked model is trained by :class:`~baldro_lightning.train.module.FinetuneModule` (the module that trains the
embedded target and retain models) in a Trainer of its own, on :class:`AttackDataModule` batches: the same loss,
optimizer, gradient clipping and seeded batch order as any fine-tune here, for ``max_steps`` steps.
"""

from __future__ import annotations

import functools
import logging
import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from baldro_lightning.data.datamodule import ShardedPermutation, world_and_rank
from baldro_lightning.data.tokenization import PaddingCollator
from baldro_lightning.train.module import FinetuneModule

PRECISION_OF_DTYPE = {torch.float32: "32-true", torch.bfloat16: "bf16-true", torch.float16: "16-true"}
"""The Lightning precision that trains weights of a dtype as they are (no casting of the attacked model)."""


class AttackDataModule(L.LightningDataModule):
    """Right-padded batches of an already-encoded dataset in a seeded order (reshuffled each epoch)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, pad_token_id: int) -> None:
        """Serve ``dataset`` for a relearning attack.

        Args:
            dataset: Items ``{"input_ids", "labels", "index"}`` (:class:`~baldro_lightning.data.tokenization.QADataset`
                or MUSE chunks).
            batch_size: Rows per step.
            seed: Seeds the order (the epoch is added each epoch).
            pad_token_id: Id of padded positions.
        """
        super().__init__()
        if len(dataset) == 0:
            raise ValueError("the relearning attack has no rows to train on")
        if batch_size < 1:
            raise ValueError(f"relearning batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.pad_token_id = pad_token_id

    def train_dataloader(self) -> DataLoader:
        world, rank = world_and_rank(self.trainer)
        sampler = ShardedPermutation(self.dataset, world, rank, self.seed)
        collate = PaddingCollator(self.pad_token_id, "right")
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate)


def relearn(
    model: nn.Module,
    model_name: str,
    data: AttackDataModule,
    max_steps: int,
    lr: float,
    seed: int,
    gradient_clip_val: float | None = 1.0,
) -> nn.Module:
    """Fine-tune ``model`` in place for ``max_steps`` optimizer steps of NLL at a constant ``lr`` (AdamW, no decay).

    Args:
        model: The model to attack (a copy: it is changed).
        model_name: Its path or name (recorded by the module; nothing is loaded from it).
        data: The attack's rows.
        max_steps: Optimizer steps; epochs repeat over the rows as needed.
        lr: Learning rate.
        seed: Seeds Lightning's RNGs (``seed_everything``) before training.
        gradient_clip_val: Gradient-norm clip, as the embedded configs train.

    Returns:
        ``model``, trained and in eval mode.
    """
    if max_steps < 1:
        raise ValueError(f"relearning max_steps must be >= 1, got {max_steps}")
    if lr <= 0:
        raise ValueError(f"relearning lr must be > 0, got {lr}")
    parameter = next(model.parameters())
    precision = PRECISION_OF_DTYPE.get(parameter.dtype)
    if precision is None:
        raise ValueError(f"cannot relearn a model with {parameter.dtype} weights; load it in float32 or bfloat16")
    module = FinetuneModule(
        model_name,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr),
        weight_decay=0.0,
        lr_schedule="constant",
        warmup_epochs=0.0,
    )
    # configure_model keeps a policy that is already there, so the attacked copy is trained, not a fresh load.
    module.policy = model
    model.train()
    L.seed_everything(seed, workers=True, verbose=False)
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    # Each attack is a Trainer of its own: its device banner and the warnings about a few-row loader and the
    # module's unused validation_step would repeat for every attack of every run.
    lightning_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in ("does not have many workers", "smaller than the logging interval", "no `val_dataloader`"):
                warnings.filterwarnings("ignore", message=f".*{message}.*")
            trainer = L.Trainer(
                accelerator="gpu" if parameter.is_cuda else "cpu",
                devices=[parameter.device.index or 0] if parameter.is_cuda else 1,
                precision=precision,
                max_steps=max_steps,
                max_epochs=-1,
                gradient_clip_val=gradient_clip_val,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
            )
            trainer.fit(module, data)
    finally:
        lightning_log.setLevel(level)
    return model.eval()
