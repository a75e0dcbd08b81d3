"""LightningDataModules: forget/retain pairs for unlearning, and plain QA splits for fine-tuning.

Batches are sharded by our own samplers (subclasses of ``DistributedSampler``, so Lightning does not replace
them). Both use the same permutation for every world size: with 2 ranks of batch ``B/2`` the union of one step's
rows is exactly the batch a single process with batch ``B`` sees, which is what makes DRO weights over the
global batch comparable across device counts. When the rows do not divide among the ranks, the sampler repeats the
first ones to fill the last batch (as ``DistributedSampler`` does); the unlearning batches mark those repeats
(``forget["padded"]``) so that the module gives them no weight and no loss.

``update_accounting: hf`` deals the micro-batches as the reference HF Trainer groups them into updates
(:mod:`~baldro_lightning.data.accumulation`): one Lightning epoch is then ``U`` updates of ``G`` micro-batches
rather than one pass over the data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, get_args

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from baldro_lightning.data.accumulation import UpdateAccounting, lightning_epochs
from baldro_lightning.data.tofu import load_split, split_location, split_pairing
from baldro_lightning.data.tokenization import (
    AttentionFrom,
    PaddingCollator,
    PromptTemplate,
    QADataset,
    load_tokenizer,
)
from baldro_lightning.user_errors import UserInputError

log = logging.getLogger(__name__)


class ShardedPermutation(DistributedSampler):
    """A seeded per-epoch permutation, padded to a multiple of the world size and dealt out round-robin."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.resume_epoch: int | None = None
        self.resume_rows = 0

    def resume_after(self, epoch: int, batches_done: int, batch_size: int) -> None:
        """Skip the ``batches_done`` batches of ``batch_size`` rows this rank trained on in ``epoch`` (once)."""
        self.resume_epoch, self.resume_rows = epoch, batches_done * batch_size

    def _skip_consumed(self, mine: list) -> list:
        """After a mid-epoch resume, drop the rows this rank already trained on in that epoch (once)."""
        if self.epoch == self.resume_epoch:
            mine = mine[self.resume_rows :]
            self.resume_epoch = None
        return mine

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + epoch)

    def _global_order(self, generator: torch.Generator) -> list[int]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
        # DistributedSampler's padding: repeat from the start so every rank has the same number of rows.
        order += order[: self.total_size - n]
        return order

    def rank_items(self, epoch: int) -> list:
        """What this rank is dealt in ``epoch``, in order (before any resume skip)."""
        order = self._global_order(self._generator(epoch))
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._skip_consumed(self.rank_items(self.epoch)))


class LengthGroupedPermutation(ShardedPermutation):
    """A seeded permutation whose global batches hold rows of similar length, so right padding wastes little.

    Each window of ``window`` global batches of the shuffled order is sorted by length and cut into global
    batches, and the batch order is shuffled again, so batches stay random in content and position. A global
    batch is ``global_batch`` consecutive rows of the global order, which the round-robin deal turns into the
    union of one step's rows on every rank: the same rows for any world size with the same global batch.
    """

    def __init__(
        self,
        dataset: Dataset,
        lengths: Sequence[int],
        global_batch: int,
        num_replicas: int,
        rank: int,
        seed: int,
        window: int = 16,
    ) -> None:
        super().__init__(dataset, num_replicas, rank, seed)
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for a dataset of {len(dataset)} rows")
        self.lengths = list(lengths)
        self.global_batch = global_batch
        self.window = window

    def _global_order(self, generator: torch.Generator) -> list[int]:
        order = super()._global_order(generator)
        span = self.global_batch * self.window
        batches: list[list[int]] = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: self.lengths[i], reverse=True)
            batches += [chunk[i : i + self.global_batch] for i in range(0, len(chunk), self.global_batch)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [row for b in shuffled for row in batches[b]]


class ForgetRetainSampler(ShardedPermutation):
    """Yields ``(forget_row, retain_row, padded)``: forget rows in a seeded order, each with a uniformly drawn retain
    row; ``padded`` marks the repeats that fill the last global batch when the ranks do not divide the forget set.

    The retain draw is with replacement and independent of the forget row (the reference's forget-anchored
    pairing, methods §1.4), but it comes from the sampler's seeded generator rather than the global RNG, so it is
    reproducible and identical across world sizes.
    """

    def __init__(self, dataset: ForgetRetainPairs, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas, rank, seed)

    def rank_items(self, epoch: int) -> list[tuple[int, int, bool]]:
        generator = self._generator(epoch)
        order = self._global_order(generator)
        retain = torch.randint(len(self.dataset.retain), (len(order),), generator=generator).tolist()
        # Positions past the dataset are DistributedSampler's repeats of the first rows.
        padded = [position >= len(self.dataset) for position in range(len(order))]
        triples = list(zip(order, retain, padded, strict=True))
        return triples[self.rank : self.total_size : self.num_replicas]


class UpdateAlignedBatches(DistributedSampler):
    """The micro-batches of a row sampler, dealt as the reference HF Trainer groups them into updates.

    Lightning epoch ``e`` is the reference's updates ``e*U .. (e+1)*U - 1`` (:func:`~.accumulation.lightning_epochs`);
    micro-batch ``j`` of reference epoch ``h`` is items ``j*B .. (j+1)*B - 1`` of what ``rows`` deals this rank in
    its epoch ``h``, so a micro-batch never mixes two passes (the last one of a pass may be short, as in the
    reference). Yields one list of items per micro-batch, for ``DataLoader(MicroBatches(dataset), batch_size=None)``;
    a ``DistributedSampler`` so that Lightning leaves it in place.
    """

    def __init__(self, rows: ShardedPermutation, batch_size: int, accumulation: int, epochs: int) -> None:
        super().__init__(rows.dataset, num_replicas=rows.num_replicas, rank=rows.rank, shuffle=False, seed=rows.seed)
        self.rows = rows
        self.batch_size = batch_size
        self.schedule = lightning_epochs(math.ceil(rows.num_samples / batch_size), accumulation, epochs)
        self.resume_epoch: int | None = None
        self.resume_batches = 0

    def __len__(self) -> int:
        # Epochs are equally long unless an epoch holds no more than G micro-batches; Lightning ends a shorter one at
        # its last batch.
        return max(len(epoch) for epoch in self.schedule)

    def resume_after(self, epoch: int, batches_done: int, batch_size: int) -> None:
        """Skip the ``batches_done`` micro-batches this rank trained on in ``epoch`` (once)."""
        self.resume_epoch, self.resume_batches = epoch, batches_done

    def __iter__(self) -> Iterator[list]:
        if self.epoch >= len(self.schedule):
            raise ValueError(
                f"epoch {self.epoch} is past the {len(self.schedule)} epochs the HF update accounting was planned "
                "for; keep --trainer.max_epochs as it was when the run started"
            )
        micro_batches = self.schedule[self.epoch]
        if self.epoch == self.resume_epoch:
            micro_batches = micro_batches[self.resume_batches :]
            self.resume_epoch = None
        dealt: dict[int, list] = {}
        for reference_epoch, position in micro_batches:
            if reference_epoch not in dealt:
                dealt[reference_epoch] = self.rows.rank_items(reference_epoch)
            yield dealt[reference_epoch][position * self.batch_size : (position + 1) * self.batch_size]


class MicroBatches(Dataset):
    """``dataset`` indexed by a list of its items at once (what :class:`UpdateAlignedBatches` yields)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, items: list) -> list:
        return [self.dataset[item] for item in items]


class ForgetRetainPairs(Dataset):
    """Indexed by ``(forget_row, retain_row, padded)``; the forget set's size is the epoch's length."""

    def __init__(self, forget: QADataset, retain: QADataset) -> None:
        self.forget = forget
        self.retain = retain

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, triple: tuple[int, int, bool]) -> dict[str, Any]:
        i, j, padded = triple
        return {"forget": self.forget[i], "retain": self.retain[j], "padded": padded}


class PairCollator:
    """Collates ``{"forget": item, "retain": item, "padded": bool}`` into two right-padded batches; the forget batch
    also holds ``padded`` (B,) bool, True for the sampler's repeats that only fill the last global batch."""

    def __init__(self, pad_token_id: int, attention_from: AttentionFrom = "lengths") -> None:
        self.pad = PaddingCollator(pad_token_id, "right", attention_from)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        forget = self.pad([x["forget"] for x in items])
        forget["padded"] = torch.tensor([bool(x["padded"]) for x in items], dtype=torch.bool)
        return {"forget": forget, "retain": self.pad([x["retain"] for x in items])}


def world_and_rank(trainer: L.Trainer | None) -> tuple[int, int]:
    """``(world_size, global_rank)`` of the trainer a data module is attached to; ``(1, 0)`` outside one."""
    if trainer is None:
        return 1, 0
    return trainer.world_size, trainer.global_rank


class BenchmarkDataModule(L.LightningDataModule):
    """Tokenizer, template, batch size, mid-epoch resume and loader construction shared by every data module."""

    def __init__(
        self,
        tokenizer: str,
        benchmark: str,
        template: PromptTemplate | None,
        max_length: int,
        batch_size: int,
        seed: int,
        workers: int,
        attention_from: AttentionFrom = "lengths",
        update_accounting: UpdateAccounting = "lightning",
    ) -> None:
        """Check and store the options every data module has; subclasses pass their own arguments on.

        Args:
            tokenizer: Tokenizer path or Hub id (linked to ``--model.model`` by the CLI).
            benchmark: A local directory of benchmark files, or a Hub dataset id.
            template: Prompt rendering; the plain ``Question: …\\nAnswer:`` form when None.
            max_length: Tokens per example.
            batch_size: Rows per device per step.
            seed: Seeds the data order.
            workers: DataLoader worker processes.
            attention_from: The attention mask of training batches: ``lengths`` (each row's own tokens) or
                ``pad_ids`` (the reference's ``ids != pad``, methods P-14; for parity runs).
            update_accounting: How micro-batches group into optimizer updates (:mod:`~.accumulation`); ``hf`` is only
                offered by the unlearning data modules.
        """
        super().__init__()
        problems = []
        if max_length < 8:
            problems.append(f"--data.max_length must be at least 8 tokens, got {max_length}")
        if batch_size < 1:
            problems.append(f"--data.batch_size must be >= 1, got {batch_size}")
        if attention_from not in get_args(AttentionFrom):
            problems.append(f"--data.init_args.attention_from must be 'lengths' or 'pad_ids', got {attention_from!r}")
        if update_accounting not in get_args(UpdateAccounting):
            problems.append(
                f"--data.init_args.update_accounting must be 'lightning' or 'hf', got {update_accounting!r}"
            )
        if problems:
            raise UserInputError("; ".join(problems))
        self.attention_from = attention_from
        self.update_accounting = update_accounting
        self.tokenizer_path = tokenizer
        self.benchmark = benchmark
        self.template = template or PromptTemplate()
        self.max_length = max_length
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = workers
        self.tokenizer = None
        self._resume: tuple[int, int] | None = None

    # Lightning restores the step count of an interrupted epoch but restarts a plain DataLoader from its first
    # batch; saving the position here lets the sampler skip what was already trained on, so a resumed run
    # sees exactly the batches an uninterrupted one would.
    def state_dict(self) -> dict[str, int]:
        if self.trainer is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "batches_done": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict:
            self._resume = (state_dict["epoch"], state_dict["batches_done"])

    def _resumable(self, sampler: ShardedPermutation) -> ShardedPermutation:
        if self._resume is not None:
            epoch, done = self._resume
            sampler.resume_after(epoch, done, self.batch_size)
            self._resume = None
        return sampler

    def _collator(self) -> PaddingCollator:
        return PaddingCollator(self.tokenizer.pad_token_id, "right", self.attention_from)

    def _load_tokenizer(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_path)

    def qa_dataset(self, split: str, answer_key: str = "answer") -> QADataset:
        self._load_tokenizer()
        rows = load_split(self.benchmark, split)
        try:
            return QADataset(rows, self.tokenizer, self.template, self.max_length, answer_key=answer_key)
        except UserInputError as err:  # a row that cannot be encoded: say in which file
            raise UserInputError(f"{split_location(self.benchmark, split)}, {err}") from err

    def _loader(self, dataset: Dataset, sampler: ShardedPermutation, collate) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class PairedDataModule(BenchmarkDataModule):
    """Unlearning batches ``{"forget": batch, "retain": batch}``: forget rows in a seeded order, each paired with a
    uniformly drawn retain row, so the forget set defines the epoch. Subclasses fill ``forget`` and ``retain`` in
    :meth:`setup`."""

    forget: Dataset | None = None
    retain: Dataset | None = None

    @property
    def forget_size(self) -> int:
        """Number of forget rows (the length of an epoch and of the per-sample records)."""
        self.setup()
        return len(self.forget)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        world, rank = world_and_rank(self.trainer)
        pairs = ForgetRetainPairs(self.forget, self.retain)
        sampler = ForgetRetainSampler(pairs, world, rank, self.seed)
        collate = PairCollator(self.tokenizer.pad_token_id, self.attention_from)
        if self.update_accounting == "lightning":
            return self._loader(pairs, self._resumable(sampler), collate)
        if self.trainer is None or not self.trainer.max_epochs or self.trainer.max_epochs < 1:
            raise ValueError(
                "--data.init_args.update_accounting=hf plans the updates of --trainer.max_epochs epochs; set "
                "--trainer.max_epochs (not max_steps alone) or use update_accounting=lightning"
            )
        trainer = self.trainer
        stream = UpdateAlignedBatches(sampler, self.batch_size, trainer.accumulate_grad_batches, trainer.max_epochs)
        return DataLoader(
            MicroBatches(pairs),
            batch_size=None,  # the sampler yields whole micro-batches
            sampler=self._resumable(stream),
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def forget_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Every forget row once, in row order, on every rank (for the reference cache)."""
        self.setup()
        return DataLoader(
            self.forget, batch_size=batch_size or self.batch_size, shuffle=False, collate_fn=self._collator()
        )


class SplitsDataModule(BenchmarkDataModule):
    """Fine-tuning on the union of some splits, with optional validation splits; subclasses name them with
    :meth:`_use_splits` and say how one split becomes a dataset (:meth:`split_dataset`)."""

    example_split = "full"
    """Shown in the error for an empty ``--data.splits``."""
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    group_by_length = False
    """Batch rows of similar length together (:class:`LengthGroupedPermutation`)."""

    def _use_splits(self, splits: Sequence[str], val_splits: Sequence[str]) -> None:
        if not splits:
            raise UserInputError(
                f"--data.splits is empty; name at least one split to train on, e.g. [{self.example_split}]"
            )
        self.splits = list(splits)
        self.val_splits = list(val_splits)
        if self.val_splits:
            # Lightning builds a validation loop only when `val_dataloader` is overridden, so it is defined only
            # where there is something to validate on: an empty list of loaders would still be asked for its
            # length and warned about ("Total length of `list` across ranks is zero").
            self.val_dataloader = self._val_dataloader

    def split_dataset(self, name: str) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = ConcatDataset([self.split_dataset(s) for s in self.splits])
            if self.val_splits:
                self.val_set = ConcatDataset([self.split_dataset(s) for s in self.val_splits])

    def train_dataloader(self) -> DataLoader:
        self.setup()
        world, rank = world_and_rank(self.trainer)
        if self.group_by_length:
            lengths = [len(self.train_set[i]["input_ids"]) for i in range(len(self.train_set))]
            sampler = LengthGroupedPermutation(self.train_set, lengths, self.batch_size * world, world, rank, self.seed)
        else:
            sampler = ShardedPermutation(self.train_set, world, rank, self.seed)
        return self._loader(self.train_set, self._resumable(sampler), self._collator())

    def _val_dataloader(self) -> DataLoader:
        """``val_dataloader`` of a data module with ``val_splits`` (see :meth:`_use_splits`)."""
        self.setup()
        world, rank = world_and_rank(self.trainer)
        sampler = ShardedPermutation(self.val_set, world, rank, self.seed, shuffle=False)
        return self._loader(self.val_set, sampler, self._collator())

    def steps_per_epoch(self) -> int:
        self.setup()
        return math.ceil(len(self.train_set) / self.batch_size)


class ForgetRetainDataModule(PairedDataModule):
    """Each training step: one forget batch and one retain batch; the forget set defines the epoch."""

    def __init__(
        self,
        tokenizer: str,
        benchmark: str = "data/tofu_embedded",
        forget_split: str = "forget10",
        retain_split: str | None = None,
        batch_size: int = 4,
        max_length: int = 512,
        template: PromptTemplate | None = None,
        seed: int = 0,
        num_workers: int = 0,
        attention_from: AttentionFrom = "lengths",
        update_accounting: UpdateAccounting = "lightning",
    ) -> None:
        """Pairs forget and retain batches for unlearning; rows are read and tokenised in ``setup``.

        Args:
            tokenizer: Tokenizer path or Hub id (linked to ``--model.model`` by the CLI).
            benchmark: A local directory of ``{split}.jsonl`` files, or a Hub dataset id such as ``locuslab/TOFU``.
            forget_split: ``forget01``, ``forget05`` or ``forget10``.
            retain_split: Defaults to the complement of the forget split (``retain90`` for ``forget10``).
            batch_size: Forget rows (and retain rows) per device per step.
            max_length: Tokens per example; longer answers are truncated with one warning.
            template: Prompt rendering; the plain ``Question: …\\nAnswer:`` form by default.
            seed: Seeds the forget order and the retain draws (the epoch is added each epoch); ``--seed_everything``
                does not change the data order, this does.
            num_workers: DataLoader worker processes.
            attention_from: ``lengths`` (true mask) or ``pad_ids``: the reference's ``ids != pad`` mask, which hides
                genuine EOS tokens when pad is EOS (methods P-14); for parity with runs of the reference code on
                Llama-3.
            update_accounting: ``lightning``: each epoch one pass, leftover micro-batches stepped at its end;
                ``hf``: the reference HF Trainer's updates, ``max(floor(M/G), 1)`` per epoch with leftovers carried
                into the next pass and its warm-up length (methods §1.6; :mod:`~baldro_lightning.data.accumulation`).
        """
        super().__init__(
            tokenizer, benchmark, template, max_length, batch_size, seed, num_workers, attention_from, update_accounting
        )
        retain_default, _, _ = split_pairing(forget_split)
        self.forget_split = forget_split
        self.retain_split = retain_split or retain_default
        self.forget: QADataset | None = None
        self.retain: QADataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.forget is not None:
            return
        self.forget = self.qa_dataset(self.forget_split)
        self.retain = self.qa_dataset(self.retain_split)
        if len(self.forget) == 0:
            raise UserInputError(f"--data.forget_split={self.forget_split!r} in {self.benchmark} has no rows")
        self._warn_overlap()

    def _warn_overlap(self) -> None:
        forget_q = {tuple(x.input_ids) for x in self.forget.examples}
        shared = sum(tuple(x.input_ids) in forget_q for x in self.retain.examples)
        if shared:
            log.warning(
                "%d row(s) of --data.retain_split=%s also occur in --data.forget_split=%s; the retain term will "
                "pull them back. Pick the complementary retain split.",
                shared,
                self.retain_split,
                self.forget_split,
            )


class QADataModule(SplitsDataModule):
    """Fine-tuning on the union of QA splits (the embedded target model: ``full`` plus the general sets)."""

    def __init__(
        self,
        tokenizer: str,
        benchmark: str = "data/tofu_embedded",
        splits: Sequence[str] = ("full",),
        val_splits: Sequence[str] = (),
        batch_size: int = 16,
        max_length: int = 512,
        template: PromptTemplate | None = None,
        seed: int = 0,
        num_workers: int = 0,
        group_by_length: bool = False,
        attention_from: AttentionFrom = "lengths",
    ) -> None:
        """Batches of QA rows from one or more splits, for fine-tuning target and retain models.

        Args:
            tokenizer: Tokenizer path or Hub id.
            benchmark: A local directory of ``{split}.jsonl`` files, or a Hub dataset id.
            splits: Training splits, concatenated.
            val_splits: Splits whose mean NLL is reported as ``val/loss``.
            batch_size: Rows per device per step.
            max_length: Tokens per example.
            template: Prompt rendering.
            seed: Seeds the shuffle order.
            num_workers: DataLoader worker processes.
            group_by_length: Batch rows of similar length (less padding, faster steps; batches stay shuffled).
            attention_from: ``lengths`` (true mask) or ``pad_ids`` (the reference's ``ids != pad``, methods P-14).
        """
        super().__init__(tokenizer, benchmark, template, max_length, batch_size, seed, num_workers, attention_from)
        self._use_splits(splits, val_splits)
        self.group_by_length = group_by_length

    def split_dataset(self, name: str) -> QADataset:
        return self.qa_dataset(name)
