"""Length-grouped batches for fine-tuning: every row once per epoch, less padding, same steps on any world size."""

from __future__ import annotations

import random

import pytest
from torch.utils.data import DataLoader

from baldro_lightning.data.datamodule import LengthGroupedPermutation, QADataModule, ShardedPermutation

ROWS = 203  # not a multiple of any batch size used below


@pytest.fixture(scope="module")
def lengths() -> list[int]:
    rng = random.Random(0)
    return [rng.randint(5, 60) for _ in range(ROWS)]


def batches(sampler, batch: int) -> list[list[int]]:
    rows = list(range(len(sampler.dataset)))
    return [list(step) for step in DataLoader(rows, batch_size=batch, sampler=sampler, collate_fn=list)]


def grouped(lengths, batch: int, replicas: int = 1, rank: int = 0, seed: int = 0, epoch: int = 0):
    rows = list(range(len(lengths)))
    sampler = LengthGroupedPermutation(rows, lengths, batch * replicas, replicas, rank, seed)
    sampler.set_epoch(epoch)
    return batches(sampler, batch)


def padded_tokens(steps: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in step) * len(step) for step in steps)


def test_every_row_once_per_epoch(lengths):
    steps = grouped(lengths, 16)
    assert sorted(i for step in steps for i in step) == list(range(ROWS))


def test_less_padding_than_a_plain_shuffle(lengths):
    plain = batches(ShardedPermutation(list(range(ROWS)), 1, 0, seed=0), 16)
    assert padded_tokens(grouped(lengths, 16), lengths) < 0.8 * padded_tokens(plain, lengths)


def test_epochs_and_seeds_reshuffle(lengths):
    first = grouped(lengths, 16)
    assert first == grouped(lengths, 16)
    assert first != grouped(lengths, 16, epoch=1)
    assert first != grouped(lengths, 16, seed=1)


def test_two_ranks_union_is_the_single_process_batch(lengths):
    # An even row count: with an odd one the ranks' padding row is a step no single process takes.
    even = lengths[:-1]
    single = grouped(even, 8)
    rank0, rank1 = grouped(even, 4, 2, 0), grouped(even, 4, 2, 1)
    assert len(single) == len(rank0) == len(rank1) == 26
    for step, (whole, a, b) in enumerate(zip(single, rank0, rank1, strict=True)):
        assert sorted(a + b) == sorted(whole), step


def test_length_count_must_match_the_dataset(lengths):
    with pytest.raises(ValueError, match="202 lengths for a dataset of 203 rows"):
        LengthGroupedPermutation(list(range(ROWS)), lengths[:-1], 8, 1, 0, 0)


def test_datamodule_groups_when_asked(tiny_model, tiny_benchmark):
    kwargs = dict(tokenizer=str(tiny_model), benchmark=str(tiny_benchmark), splits=["full"], batch_size=4)
    plain, grouped_dm = QADataModule(**kwargs), QADataModule(**kwargs, group_by_length=True)
    plain_rows = [b["index"].tolist() for b in plain.train_dataloader()]
    grouped_rows = [b["index"].tolist() for b in grouped_dm.train_dataloader()]
    assert isinstance(grouped_dm.train_dataloader().sampler, LengthGroupedPermutation)
    assert sorted(sum(grouped_rows, [])) == sorted(sum(plain_rows, []))
