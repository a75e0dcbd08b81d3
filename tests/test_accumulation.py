"""Optimizer-update accounting under gradient accumulation: the reference HF Trainer's (``update_accounting: hf``)
against Lightning's own, counted by hand and on a real fit (methods §1.6, P-26)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import write_tiny_benchmark

from baldro_lightning.data.accumulation import (
    hf_update_groups,
    hf_updates_per_epoch,
    hf_warmup_updates,
    lightning_epochs,
)
from baldro_lightning.data.datamodule import (
    ForgetRetainDataModule,
    ForgetRetainPairs,
    ForgetRetainSampler,
    UpdateAlignedBatches,
)
from baldro_lightning.train.losses import GradAscent
from baldro_lightning.train.module import UnlearningModule

# --------------------------------------------------------------------------------------------------------------
# The reference's counts, by hand


def test_updates_per_epoch_and_warmup_of_the_paper_settings():
    """TOFU at batch 8 x accumulation 4 on one GPU: forget01/05/10 have M = 5/25/50 micro-batches per epoch, so
    floor(M/4) = 1/6/12 updates per epoch and floor(|F|/32) = floor(1.25/6.25/12.5) = 1/6/12 warm-up steps."""
    assert [hf_updates_per_epoch(m, 4) for m in (5, 25, 50)] == [1, 6, 12]
    assert [hf_warmup_updates(1.0, rows, 8, 4, 1) for rows in (40, 200, 400)] == [1, 6, 12]
    # Fewer micro-batches than G still make one update per epoch; two GPUs halve the warm-up.
    assert hf_updates_per_epoch(3, 4) == 1
    assert hf_warmup_updates(1.0, 400, 8, 4, 2) == 6


def test_forget01_groups_carry_the_leftover_into_the_next_pass():
    """M = 5, G = 4, 10 epochs: 10 updates of 4 micro-batches; update 2 takes pass 0's leftover and 3 of pass 1;
    the last ends with pass 7's last micro-batch: 40 micro-batches, i.e. 8 passes (Lightning: 20 updates)."""
    groups = hf_update_groups(5, 4, 10)
    assert len(groups) == 10
    assert all(len(group) == 4 for group in groups)
    assert groups[0] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert groups[1] == [(0, 4), (1, 0), (1, 1), (1, 2)]
    assert groups[-1][-1] == (7, 4)
    # forget10: M = 50 -> 120 updates over 480 micro-batches = 9.6 passes.
    groups = hf_update_groups(50, 4, 10)
    assert len(groups) == 120 and groups[-1][-1] == (9, 29)


def test_short_epochs_step_on_their_last_micro_batch():
    """M = 3 <= G = 4: the reference also steps at each epoch's last micro-batch, with the global count running on.
    Counts 1 2 3* | 4* 5 6* | 7 8* 9* : updates of 3, 1, 2, 2, 1 micro-batches; 1 update per epoch -> 5 for 5 epochs."""
    groups = hf_update_groups(3, 4, 5)
    assert [len(g) for g in groups] == [3, 1, 2, 2, 1]
    assert groups[1] == [(1, 0)] and groups[2] == [(1, 1), (1, 2)]


def test_lightning_epochs_hold_u_updates_each():
    """M = 5, G = 4: each Lightning epoch is one update of 4 micro-batches; M = 50: 12 updates = 48 micro-batches."""
    epochs = lightning_epochs(5, 4, 10)
    assert [len(e) for e in epochs] == [4] * 10
    assert epochs[1] == [(0, 4), (1, 0), (1, 1), (1, 2)]
    assert [len(e) for e in lightning_epochs(50, 4, 10)] == [48] * 10


def test_update_aligned_batches_deal_the_reference_passes():
    """10 forget rows at B = 4 (M = 3: 4 + 4 + 2 rows) and G = 2: one Lightning epoch is U = 1 update of 2
    micro-batches. Epoch 1 is pass 0's short last micro-batch followed by pass 1's first: a micro-batch never mixes
    two passes, and each pass is the row sampler's own permutation of that epoch."""
    pairs = ForgetRetainPairs(list(range(10)), list(range(30)))  # type: ignore[arg-type]
    rows = ForgetRetainSampler(pairs, num_replicas=1, rank=0, seed=5)
    stream = UpdateAlignedBatches(rows, batch_size=4, accumulation=2, epochs=3)
    assert len(stream) == 2
    stream.set_epoch(1)
    first, second = list(stream)
    assert first == rows.rank_items(0)[8:10] and second == rows.rank_items(1)[0:4]
    # A resumed run skips the micro-batches of the interrupted epoch it already trained on, once.
    stream.resume_after(1, 1, 4)
    assert list(stream) == [second]
    assert list(stream) == [first, second]


def test_padded_repeats_are_marked():
    """3 forget rows over 2 ranks: the global order is padded to 4 by repeating its first row, on rank 1."""
    pairs = ForgetRetainPairs(list(range(3)), list(range(30)))  # type: ignore[arg-type]
    rank0 = ForgetRetainSampler(pairs, num_replicas=2, rank=0, seed=1).rank_items(0)
    rank1 = ForgetRetainSampler(pairs, num_replicas=2, rank=1, seed=1).rank_items(0)
    assert [padded for _, _, padded in rank0] == [False, False]
    assert [padded for _, _, padded in rank1] == [False, True]
    assert rank1[1][0] == rank0[0][0]  # the repeat is the first row of the global order


# --------------------------------------------------------------------------------------------------------------
# A real fit: forget01's shape (40 rows, batch 8 x 4, 10 epochs)


@pytest.fixture(scope="module")
def forty_rows(tmp_path_factory) -> Path:
    """The tiny benchmark with 40 forget rows (forget01's size), reusing its QA pairs under new row ids; a reused
    question gets a numbered suffix (hence max_length 48), since a forget split must not repeat a question."""
    root = write_tiny_benchmark(tmp_path_factory.mktemp("forty_rows"))
    rows = [json.loads(line) for line in (root / "full.jsonl").read_text().splitlines()]
    forget = [{**rows[i % len(rows)], "idx": i} for i in range(40)]
    for i, row in enumerate(forget):
        if i >= len(rows):
            row["question"] = f"{row['question']} ({i})"
    (root / "forget10.jsonl").write_text("\n".join(json.dumps(row) for row in forget) + "\n")
    return root


class UpdateLog(L.Callback):
    """Counts micro-batches, the micro-batches and learning rate of each update, and how often each row is seen."""

    def __init__(self) -> None:
        self.micro_batches = 0
        self.pending = 0
        self.sizes: list[int] = []
        self.lrs: list[float] = []
        self.seen: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.micro_batches += 1
        self.pending += 1
        for row in batch["forget"]["index"].tolist():
            self.seen[row] = self.seen.get(row, 0) + 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.sizes.append(self.pending)
        self.pending = 0
        self.lrs.append(optimizer.param_groups[0]["lr"])


def fit_forget01(model: Path, benchmark: Path, accounting: str) -> tuple[L.Trainer, UpdateLog]:
    L.seed_everything(0, verbose=False)
    module = UnlearningModule(
        str(model),
        GradAscent(),
        retain_loss=None,
        lr_schedule="linear",
        warmup_epochs=1.0,
        optimizer=lambda params: torch.optim.SGD(params, lr=1e-3),
    )
    data = ForgetRetainDataModule(str(model), str(benchmark), batch_size=8, max_length=48, update_accounting=accounting)
    log = UpdateLog()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=10,
        accumulate_grad_batches=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[log],
    )
    trainer.fit(module, data)
    return trainer, log


def test_hf_accounting_makes_the_reference_updates(tiny_model, forty_rows):
    """Reference: M = 5 micro-batches per pass, floor(5/4) = 1 update per epoch, 10 updates of 4 micro-batches over
    40 micro-batches = 8 passes (every row seen 8 times), warm-up floor(40/32) = 1 step. The linear schedule's
    multipliers are then 0 (step 0 < warm-up 1), then (10 - s)/(10 - 1): 1, 8/9, 7/9, ..."""
    trainer, log = fit_forget01(tiny_model, forty_rows, "hf")
    assert trainer.global_step == 10
    assert log.sizes == [4] * 10 and log.micro_batches == 40
    assert set(log.seen.values()) == {8} and len(log.seen) == 40
    expected = [1e-3 * m for m in (0.0, 1.0, 8 / 9, 7 / 9, 6 / 9, 5 / 9, 4 / 9, 3 / 9, 2 / 9, 1 / 9)]
    torch.testing.assert_close(torch.tensor(log.lrs), torch.tensor(expected), rtol=1e-6, atol=1e-12)


def test_lightning_accounting_steps_on_every_leftover(tiny_model, forty_rows):
    """Lightning (the default): ceil(5/4) = 2 updates per epoch, of 4 micro-batches and the 1 left over, 20 in all
    over 10 full passes, warm-up floor(1.0 * 20/10) = 2 steps: multipliers 0, 1/2, then (20 - s)/18."""
    trainer, log = fit_forget01(tiny_model, forty_rows, "lightning")
    assert trainer.global_step == 20
    assert log.sizes == [4, 1] * 10 and log.micro_batches == 50
    assert set(log.seen.values()) == {10}
    torch.testing.assert_close(
        torch.tensor(log.lrs[:4]), torch.tensor([0.0, 0.5e-3, 1e-3, 1e-3 * 17 / 18]), rtol=1e-6, atol=1e-12
    )


def test_hf_accounting_needs_max_epochs(tiny_model, forty_rows):
    data = ForgetRetainDataModule(str(tiny_model), str(forty_rows), batch_size=8, update_accounting="hf")
    with pytest.raises(ValueError, match=r"update_accounting=hf plans the updates of --trainer\.max_epochs"):
        data.train_dataloader()
    with pytest.raises(ValueError, match=r"--data\.init_args\.update_accounting must be 'lightning' or 'hf', got 'x'"):
        ForgetRetainDataModule(str(tiny_model), str(forty_rows), update_accounting="x")
