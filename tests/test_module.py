"""Behaviour of ``UnlearningModule`` with ``ForgetRetainDataModule`` on a tiny random Llama (CPU, a few steps).

Every run here is short (two optimizer steps of a 2-layer, 32-wide model on 4 forget rows); what is checked is
behaviour: the policy moves, the reference does not and never trains, checkpoints omit the reference, the cached
and live references agree, the two-pass BalDRO-G optimises the same objective as the one-pass form, every
objective goes through the same selection hook and call (a new selecting objective needs no module change), the sampler
deals the same pairs to one process and to two ranks, and a non-finite loss stops training with a useful message.
"""

from __future__ import annotations

import configparser
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.testing import assert_close
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from baldro_lightning.cli import cli_main
from baldro_lightning.data.datamodule import (
    ForgetRetainDataModule,
    ForgetRetainPairs,
    ForgetRetainSampler,
    QADataModule,
)
from baldro_lightning.train.batches import select_rows
from baldro_lightning.train.logprobs import SequenceLogProbs
from baldro_lightning.train.losses import KL, NLL, NPO, WGA, GradAscent, PerSampleLoss
from baldro_lightning.train.module import CausalLMModule, FinetuneModule, NonFiniteLossError, UnlearningModule
from baldro_lightning.train.objectives import DV, Group, Mean, Objective

FORGET_ROWS = 4  # forget10 of the tiny benchmark: the last two authors × two questions


def unlearning_module(model: Path, forget_loss: PerSampleLoss | None = None, **kwargs) -> UnlearningModule:
    kwargs.setdefault("retain_loss", NLL())
    kwargs.setdefault("lr_schedule", "constant")  # the linear warm-up's first update has lr 0
    return UnlearningModule(str(model), forget_loss or NPO(), **kwargs)


def data_module(model: Path, benchmark: Path, batch_size: int = 2) -> ForgetRetainDataModule:
    return ForgetRetainDataModule(str(model), str(benchmark), batch_size=batch_size, max_length=64)


def trainer(**kwargs) -> L.Trainer:
    kwargs.setdefault("max_steps", 2)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def pristine(model: Path) -> dict[str, torch.Tensor]:
    """The weights as saved on disk, i.e. the policy and the reference before any update."""
    return AutoModelForCausalLM.from_pretrained(str(model)).state_dict()


def perturb(module: UnlearningModule, seed: int = 1, scale: float = 0.05) -> None:
    """Move the policy away from the reference, identically for every module given the same seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.policy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def first_batch(model: Path, benchmark: Path, batch_size: int) -> dict:
    datamodule = data_module(model, benchmark, batch_size)
    return next(iter(datamodule.train_dataloader()))


# --------------------------------------------------------------------------------------------------------------
# The frozen reference


class ReferenceWatch(L.Callback):
    """Records, during training, whether the reference was ever in train mode or ever held a gradient."""

    def __init__(self) -> None:
        self.batches = 0
        self.reference_training: list[bool] = []
        self.reference_grads: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1
        self.reference_training.append(any(m.training for m in pl_module.reference.modules()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.reference_training.append(any(m.training for m in pl_module.reference.modules()))
        self.reference_grads.append(any(p.grad is not None for p in pl_module.reference.parameters()))


def test_fit_moves_policy_and_leaves_reference_untouched(tiny_model, tiny_benchmark):
    """Two AdamW steps at lr 1e-3: every policy matrix changes; the reference is bit-identical to the file,
    stays in eval mode inside the loop, holds no gradient, and is not in the optimizer."""
    module = unlearning_module(tiny_model)
    watch = ReferenceWatch()
    fit = trainer(callbacks=[watch])
    fit.fit(module, data_module(tiny_model, tiny_benchmark))
    before = pristine(tiny_model)

    assert watch.batches == 2
    assert watch.reference_training == [False] * 4
    assert watch.reference_grads == [False] * 2

    reference = module.reference.state_dict()
    for name, value in before.items():
        assert torch.equal(reference[name], value), name
    assert all(not p.requires_grad and p.grad is None for p in module.reference.parameters())
    assert module.reference is not module.policy

    policy = module.policy.state_dict()
    changed = [name for name, value in before.items() if not torch.equal(policy[name], value)]
    assert changed == list(before)  # every matrix and norm gain, the tied embedding included

    in_optimizer = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.policy.parameters()}
    assert not in_optimizer & {id(p) for p in module.reference.parameters()}


def test_logged_keys(tiny_model, tiny_benchmark):
    """train/forget_loss, train/retain_loss, train/loss, train/lr; loss = forget + retain with gamma = alpha = 1."""
    module = unlearning_module(tiny_model)
    fit = trainer()
    fit.fit(module, data_module(tiny_model, tiny_benchmark))
    metrics = fit.callback_metrics
    for key in ("train/forget_loss", "train/retain_loss", "train/loss", "train/lr"):
        assert key in metrics, sorted(metrics)
    assert_close(metrics["train/loss"], metrics["train/forget_loss"] + metrics["train/retain_loss"])
    assert_close(metrics["train/lr"].float(), torch.tensor(1e-3))  # AdamW's default, constant schedule


def test_checkpoint_omits_reference_and_loads_back(tiny_model, tiny_benchmark, tmp_path):
    module = unlearning_module(tiny_model)
    fit = trainer()
    fit.fit(module, data_module(tiny_model, tiny_benchmark))
    path = tmp_path / "last.ckpt"
    fit.save_checkpoint(path)

    checkpoint = torch.load(path, weights_only=False)
    keys = list(checkpoint["state_dict"])
    assert keys and all(key.startswith("policy.") for key in keys)
    assert not [key for key in keys if "reference" in key]
    assert checkpoint["forget_weights"].shape == (FORGET_ROWS,)

    loaded = UnlearningModule.load_from_checkpoint(path, weights_only=False)
    assert loaded.forget_loss == NPO() and loaded.retain_loss == NLL()
    trained = module.policy.state_dict()
    for name, value in loaded.policy.state_dict().items():
        assert torch.equal(value, trained[name]), name
    # The reference is rebuilt from the model path, not from the (trained) checkpoint.
    before = pristine(tiny_model)
    for name, value in loaded.reference.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_fit_resumes_from_checkpoint_with_default_loading(tiny_model, tiny_benchmark, tmp_path):
    module = unlearning_module(tiny_model, forget_objective=DV())
    fit = trainer(max_steps=1)
    fit.fit(module, data_module(tiny_model, tiny_benchmark))
    path = tmp_path / "step1.ckpt"
    fit.save_checkpoint(path)

    resumed = trainer(max_steps=2)
    fresh = unlearning_module(tiny_model, forget_objective=DV())
    resumed.fit(fresh, data_module(tiny_model, tiny_benchmark), ckpt_path=path)
    assert resumed.global_step == 2


# --------------------------------------------------------------------------------------------------------------
# Cached vs live reference


def test_cached_and_live_reference_give_the_same_npo_loss(tiny_model, tiny_benchmark):
    """The cache holds log pi_ref(y|x) of every forget row from the untouched policy; after moving both policies
    the same way, NPO on one batch (eval mode) must match the live reference row by row."""
    datamodule = data_module(tiny_model, tiny_benchmark, batch_size=FORGET_ROWS)
    batch = next(iter(datamodule.train_dataloader()))

    live = unlearning_module(tiny_model, reference="live")
    live.configure_model()
    cached = unlearning_module(tiny_model, reference="cached")
    cached.configure_model()
    assert cached.reference is None  # no second model is held
    cached.reference_cache = cached._compute_reference_cache(datamodule.forget_dataloader(), datamodule.forget_size)
    assert cached.reference_cache.shape == (FORGET_ROWS,)

    losses = {}
    for name, module in (("live", live), ("cached", cached)):
        perturb(module)
        module.eval()
        with torch.no_grad():
            _, _, losses[name], index, _ = module._forget_term(batch["forget"], None)
        assert index.tolist() == batch["forget"]["index"].tolist()

    # r != 0 for every row, so the reference actually enters the loss (13.862944 would be r = 0).
    assert (losses["live"] - 20 * math.log(2)).abs().min() > 1e-2
    assert_close(losses["cached"], losses["live"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("keep_vocab", [[False, False], [False, True]])
def test_one_forward_over_forget_and_retain_equals_separate_forwards(tiny_model, tiny_benchmark, keep_vocab):
    """The policy scores forget and retain rows in one padded forward; per-sample sums, token log-probs and the
    gradient of their total must equal two separate forwards (the batches differ in length, so padding is cut)."""
    batch = first_batch(tiny_model, tiny_benchmark, batch_size=2)
    forget, retain = batch["forget"], batch["retain"]
    assert forget["input_ids"].shape[1] != retain["input_ids"].shape[1]
    module = unlearning_module(tiny_model, retain_loss=KL())
    module.configure_model()

    def scored(parts, vocab):
        module.policy.zero_grad()
        stats = module.forward_stats(module.policy, parts, vocab)
        sum(s.logp_sum.sum() for s in stats).backward()
        return stats, [p.grad.clone() for p in module.policy.parameters()]

    joined, joined_grads = scored([forget, retain], keep_vocab)
    separate = [scored([part], [vocab])[0][0] for part, vocab in zip((forget, retain), keep_vocab, strict=True)]
    _, separate_grads = scored([forget], [keep_vocab[0]])
    _, retain_grads = scored([retain], [keep_vocab[1]])
    for got, want in zip(joined, separate, strict=True):
        assert got.token_logps.shape == want.token_logps.shape
        assert_close(got.logp_sum, want.logp_sum, rtol=0, atol=1e-5)
        assert_close(got.token_logps, want.token_logps, rtol=0, atol=1e-5)
        assert torch.equal(got.count, want.count)
        assert (got.vocab_logps is None) == (want.vocab_logps is None)
    for got, want_forget, want_retain in zip(joined_grads, separate_grads, retain_grads, strict=True):
        assert_close(got, want_forget + want_retain, rtol=1e-4, atol=1e-6)


def test_cached_reference_cannot_serve_kl_retain(tiny_model):
    with pytest.raises(ValueError, match=r"--model\.reference=cached.*--model\.retain_loss=KL"):
        UnlearningModule(str(tiny_model), NPO(), KL(), reference="cached")


def test_invalid_configurations_are_reported(tiny_model):
    with pytest.raises(ValueError, match="forget_loss=KL"):
        UnlearningModule(str(tiny_model), KL())
    with pytest.raises(ValueError, match="gamma=-1"):
        UnlearningModule(str(tiny_model), NPO(), gamma=-1.0)
    with pytest.raises(ValueError, match="--model.loss=NPO"):
        FinetuneModule(str(tiny_model), loss=NPO())


# --------------------------------------------------------------------------------------------------------------
# BalDRO-G: the two-pass form optimises the one-pass objective


def group_loss_and_grads(
    model: Path, batch: dict, forget_loss: PerSampleLoss, passes: str
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """gamma · forget + alpha · retain on ``batch`` (as training_step sums them), its weights and its gradients."""
    module = unlearning_module(model, forget_loss, forget_objective=Group(ratio=0.5), selection_passes=passes)
    module.configure_model()
    perturb(module)
    module.eval()
    forget_value, weights, _, _, retain_stats = module._forget_term(batch["forget"], batch["retain"])
    loss = module.gamma * forget_value + module.alpha * module._retain_term(retain_stats)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.policy.named_parameters() if p.grad is not None}
    return loss.detach(), weights, grads


@pytest.fixture(scope="module")
def group_batch(tiny_model, tiny_benchmark) -> dict:
    return first_batch(tiny_model, tiny_benchmark, FORGET_ROWS)


@pytest.fixture(scope="module")
def npo_one_pass(tiny_model, group_batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    return group_loss_and_grads(tiny_model, group_batch, NPO(), "one")


@pytest.mark.parametrize("passes", ["two", "released"])
def test_group_npo_two_pass_matches_one_pass(tiny_model, group_batch, npo_one_pass, passes):
    """Four forget rows, k = 2: the same rows are kept, and loss and every gradient agree with passes='one'."""
    one_loss, one_weights, one_grads = npo_one_pass
    loss, weights, grads = group_loss_and_grads(tiny_model, group_batch, NPO(), passes)

    assert sorted(one_weights.tolist()) == [0.0, 0.0, 0.5, 0.5]
    assert_close(weights, one_weights)
    assert_close(loss, one_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == one_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, one_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("forget_loss", [GradAscent(), WGA()], ids=["GradAscent", "WGA"])
def test_group_pooled_loss_two_pass_matches_one_pass(tiny_model, group_batch, forget_loss):
    one_loss, _, _ = group_loss_and_grads(tiny_model, group_batch, forget_loss, "one")
    two_loss, _, _ = group_loss_and_grads(tiny_model, group_batch, forget_loss, "two")
    assert_close(two_loss, one_loss, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# One call path for every objective: the selection hook


def recording(objective_class: type[Objective]) -> type[Objective]:
    """``objective_class`` that keeps the arguments and the result of each call."""

    @dataclass(frozen=True)
    class Recording(objective_class):
        calls: list = field(default_factory=list, compare=False)

        def __call__(self, losses, scores=None, row_ids=None):
            out = super().__call__(losses, scores=scores, row_ids=row_ids)
            self.calls.append({"losses": losses, "scores": scores, "row_ids": row_ids, "out": out})
            return out

    return Recording


@pytest.mark.parametrize("objective_class", [Mean, DV, Group])
def test_every_objective_is_called_the_same_way(tiny_model, group_batch, objective_class):
    """One call per step, ``objective(global_losses, scores=..., row_ids=global_index)``, whose value and weights
    the module uses as they are; scores only when the objective selects (Group), so Mean and DV take one pass."""
    objective = recording(objective_class)()
    module = unlearning_module(tiny_model, forget_objective=objective)
    module.configure_model()
    value, weights, _, index, _ = module._forget_term(group_batch["forget"], group_batch["retain"])
    (call,) = objective.calls
    assert call["out"][0] is value and call["out"][1] is weights
    assert torch.equal(call["row_ids"], index) and index.tolist() == group_batch["forget"]["index"].tolist()
    assert call["losses"].shape == (FORGET_ROWS,) and call["losses"].requires_grad
    assert (call["scores"] is not None) == objective.selects_rows


@dataclass(frozen=True)
class LargestRowIds(Objective):
    """A selecting objective the module has never heard of: the mean over the two rows with the largest dataset ids,
    whatever their scores."""

    selects_rows: ClassVar[bool] = True

    def kept_count(self, batch_size: int) -> int:
        return min(2, batch_size)

    def select(self, scores: torch.Tensor, row_ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = torch.arange(scores.numel()) if row_ids is None else row_ids
        return torch.sort(ids, descending=True, stable=True).indices[: self.kept_count(scores.numel())].sort().values

    def __call__(self, losses, scores=None, row_ids=None):
        kept = self.select(losses if scores is None else scores, row_ids)
        weights = torch.zeros_like(losses)
        weights[kept] = 1.0 / kept.numel()
        return losses[kept].mean(), weights.detach()


def loss_and_grads(module: UnlearningModule, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The forget term on ``batch`` (no retain rows), its weights and its gradients; perturbed policy, eval mode."""
    module.configure_model()
    perturb(module)
    module.eval()
    value, weights, _, _, _ = module._forget_term(batch, None)
    value.backward()
    return value.detach(), weights, [p.grad.clone() for p in module.policy.parameters()]


@pytest.mark.parametrize("passes", ["two", "one", "released"])
def test_a_new_selecting_objective_needs_no_module_change(tiny_model, group_batch, passes):
    """LargestRowIds on the 4-row batch (ids 0, 1, 3, 2) equals Mean on its rows 2 and 3 (ids 3, 2) alone: same NPO
    value and gradients (scoring pass, gradient pass on the kept rows and weights all come from the hook), weight 1/2
    on each."""
    forget = group_batch["forget"]
    largest = torch.tensor([2, 3])
    assert forget["index"].tolist() == [0, 1, 3, 2]
    value, weights, grads = loss_and_grads(
        unlearning_module(tiny_model, forget_objective=LargestRowIds(), selection_passes=passes), forget
    )
    mean_value, _, mean_grads = loss_and_grads(unlearning_module(tiny_model), select_rows(forget, largest))

    expected = torch.zeros(FORGET_ROWS)
    expected[largest] = 0.5
    assert torch.equal(weights, expected)
    assert_close(value, mean_value, rtol=1e-6, atol=1e-6)
    for grad, mean_grad in zip(grads, mean_grads, strict=True):
        assert_close(grad, mean_grad, rtol=1e-4, atol=1e-6)


def test_subsample_retain_keeps_as_many_retain_rows_as_the_objective_keeps(tiny_model, group_batch):
    """LargestRowIds keeps 2 of 4 forget rows, so the retain batch is cut to 2 of its rows."""
    module = unlearning_module(tiny_model, forget_objective=LargestRowIds(), subsample_retain=True)
    retain = group_batch["retain"]
    cut = module._subsample_retain(retain, FORGET_ROWS)
    assert cut["input_ids"].shape[0] == 2
    assert set(cut["index"].tolist()) < set(retain["index"].tolist())


def test_selection_options_are_checked(tiny_model):
    """Values outside the choices, and options set for a forget objective that keeps every row, name the flag."""
    with pytest.raises(ValueError, match=r"--model\.init_args\.selection_passes must be .* got 'three'"):
        UnlearningModule(str(tiny_model), NPO(), forget_objective=Group(), selection_passes="three")
    with pytest.raises(ValueError, match=r"--model\.init_args\.selection_score must be .* got 'nll'"):
        UnlearningModule(str(tiny_model), NPO(), forget_objective=Group(), selection_score="nll")
    for flag, value in (("selection_passes", "one"), ("selection_score", "mean_nll"), ("subsample_retain", True)):
        with pytest.raises(ValueError, match=rf"--model\.init_args\.{flag}={value!r} applies only .* DV keeps every"):
            UnlearningModule(str(tiny_model), NPO(), forget_objective=DV(), **{flag: value})
    module = UnlearningModule(str(tiny_model), NPO(), forget_objective=DV(), selection_passes="two")
    assert (module.selection_passes, module.selection_score, module.subsample_retain) == ("two", "loss", False)


# --------------------------------------------------------------------------------------------------------------
# DV over tokens (the released DrSatImp) and the sampler's repeated rows


def token_stats(token_logps: list[list[float]], mask: list[list[bool]]) -> SequenceLogProbs:
    logps, keep = torch.tensor(token_logps), torch.tensor(mask)
    return SequenceLogProbs(logp_sum=(logps * keep).sum(-1), count=keep.sum(-1), token_logps=logps, mask=keep)


# GradAscent's per-token loss is log p: rows with tokens (0, -ln 2) and (-ln 4), the last slot of row 1 masked.
TWO_ROWS = token_stats([[0.0, -math.log(2)], [-math.log(4), -9.0]], [[True, True], [True, False]])


@pytest.mark.parametrize(
    ("sign", "value", "row_weights"),
    [
        # paper: weights softmax(l) = (1, 1/2, 1/4) / (7/4) = (4/7, 2/7, 1/7); value ln((7/4)/3) = ln(7/12).
        ("paper", math.log(7 / 12), [6 / 7, 1 / 7]),
        # released: weights softmax(-l) = (1, 2, 4) / 7; value -ln((1 + 2 + 4)/3) = -ln(7/3).
        ("released", -math.log(7 / 3), [3 / 7, 4 / 7]),
    ],
)
def test_dv_over_tokens_by_hand(tiny_model, sign, value, row_weights):
    """granularity=token: DV over the N = 3 labelled tokens of the batch, not its 2 rows (released DrSatImp,
    methods P-3); a row's weight is the sum of its tokens', the masked slot (log p -9) takes no part."""
    module = unlearning_module(
        tiny_model, GradAscent(), retain_loss=None, forget_objective=DV(tau=1.0, sign=sign, granularity="token")
    )
    out, weights, row_losses = module._token_forget_term(TWO_ROWS, None, torch.tensor([True, True]))
    assert_close(out, torch.tensor(value))
    assert_close(weights, torch.tensor(row_weights))
    # The record keeps each row's per-sample (pooled) loss: (B/N) sum_t l_t = (2/3)(-ln 2) and (2/3)(-ln 4).
    assert_close(row_losses, torch.tensor([-(2 / 3) * math.log(2), -(2 / 3) * math.log(4)]))


def test_dv_over_tokens_leaves_out_a_repeated_row(tiny_model):
    """With row 1 a repeat (not real), DV runs over row 0's two tokens: released, exp(-l) = (1, 2), value
    -ln(3/2), weights (1/3, 2/3) summing to row 0's 1; row 1 gets 0."""
    module = unlearning_module(
        tiny_model, GradAscent(), retain_loss=None, forget_objective=DV(tau=1.0, sign="released", granularity="token")
    )
    out, weights, _ = module._token_forget_term(TWO_ROWS, None, torch.tensor([True, False]))
    assert_close(out, torch.tensor(-math.log(3 / 2)))
    assert_close(weights, torch.tensor([1.0, 0.0]))


def test_repeated_rows_get_no_weight_and_no_loss():
    """Losses (1, 3, 1) where the last 1 is a repeat of row 0: Mean over the real rows is 2 (not 5/3), DV paper tau 1
    is ln((e + e^3)/2) = 2.4338 with weights (e, e^3)/(e + e^3) = (0.1192, 0.8808, 0), Group keeps the larger
    real row only; the repeat stays in the graph with gradient 0."""
    losses = torch.tensor([1.0, 3.0, 1.0], requires_grad=True)
    real = torch.tensor([True, True, False])
    ids = torch.tensor([0, 1, 0])
    value, weights = UnlearningModule._reduce_real(Mean(), losses, real, row_ids=ids)
    assert_close(value, torch.tensor(2.0))
    assert_close(weights, torch.tensor([0.5, 0.5, 0.0]))
    value, weights = UnlearningModule._reduce_real(DV(tau=1.0), losses, real, row_ids=ids)
    e1, e3 = math.e, math.e**3
    assert_close(value, torch.tensor(math.log((e1 + e3) / 2)))
    assert_close(weights, torch.tensor([e1 / (e1 + e3), e3 / (e1 + e3), 0.0]))
    value.backward()
    assert_close(losses.grad, torch.tensor([e1 / (e1 + e3), e3 / (e1 + e3), 0.0]))
    value, weights = UnlearningModule._reduce_real(Group(ratio=0.5), losses.detach(), real, row_ids=ids)
    assert_close(value, torch.tensor(3.0))
    assert_close(weights, torch.tensor([0.0, 1.0, 0.0]))


def test_token_granularity_needs_a_token_level_loss(tiny_model):
    with pytest.raises(ValueError, match=r"granularity=token needs a forget loss with per-token values .* NPO"):
        UnlearningModule(str(tiny_model), NPO(), forget_objective=DV(granularity="token"))
    with pytest.raises(ValueError, match=r"DV granularity must be 'sample' or 'token', got granularity='row'"):
        DV(granularity="row")


# --------------------------------------------------------------------------------------------------------------
# Sampling: reproducible pairs, identical global batches for 1 and 2 ranks, epoch = forget set


def sampled_batches(forget: int, retain: int, batch: int, replicas: int, rank: int, seed: int) -> list[list[tuple]]:
    pairs = ForgetRetainPairs(list(range(forget)), list(range(retain)))  # type: ignore[arg-type]
    sampler = ForgetRetainSampler(pairs, num_replicas=replicas, rank=rank, seed=seed)
    loader = DataLoader(pairs, batch_size=batch, sampler=sampler, collate_fn=list)
    return [[(item["forget"], item["retain"]) for item in step] for step in loader]


def test_sampler_same_seed_same_pairs():
    first = sampled_batches(12, 30, 4, 1, 0, seed=7)
    assert first == sampled_batches(12, 30, 4, 1, 0, seed=7)
    assert first != sampled_batches(12, 30, 4, 1, 0, seed=8)
    # Every forget row exactly once per epoch; retain rows are drawn from the retain set.
    assert sorted(f for step in first for f, _ in step) == list(range(12))
    assert all(0 <= r < 30 for step in first for _, r in step)


def test_sampler_two_ranks_union_is_the_single_process_batch():
    """12 forget rows, B = 4 on one process vs B/2 = 2 on each of two ranks: 3 steps, same pairs each step."""
    single = sampled_batches(12, 30, 4, 1, 0, seed=3)
    rank0 = sampled_batches(12, 30, 2, 2, 0, seed=3)
    rank1 = sampled_batches(12, 30, 2, 2, 1, seed=3)
    assert len(single) == len(rank0) == len(rank1) == 3
    for step, (whole, a, b) in enumerate(zip(single, rank0, rank1, strict=True)):
        assert sorted(a + b) == sorted(whole), step


def test_datamodule_two_ranks_union_is_the_single_process_batch(tiny_model, tiny_benchmark):
    """Through train_dataloader and the pair collator: the (forget index, retain index) pairs of each step."""

    def steps(batch_size: int, world: int, rank: int) -> list[list[tuple[int, int]]]:
        datamodule = data_module(tiny_model, tiny_benchmark, batch_size)
        datamodule.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        out = []
        for batch in datamodule.train_dataloader():
            forget, retain = batch["forget"]["index"].tolist(), batch["retain"]["index"].tolist()
            out.append(list(zip(forget, retain, strict=True)))
        return out

    single, rank0, rank1 = steps(2, 1, 0), steps(1, 2, 0), steps(1, 2, 1)
    assert len(single) == len(rank0) == len(rank1) == FORGET_ROWS // 2
    for whole, a, b in zip(single, rank0, rank1, strict=True):
        assert sorted(a + b) == sorted(whole)


def test_epoch_length_is_the_number_of_forget_batches(tiny_model, tiny_benchmark):
    """4 forget rows at B = 3 -> ceil(4/3) = 2 steps per epoch (the 12 retain rows would give 4)."""
    datamodule = data_module(tiny_model, tiny_benchmark, batch_size=3)
    assert len(datamodule.train_dataloader()) == 2
    fit = trainer(max_steps=-1, max_epochs=1)
    fit.fit(unlearning_module(tiny_model), datamodule)
    assert fit.global_step == 2


# --------------------------------------------------------------------------------------------------------------
# Failure reporting


@dataclass(frozen=True)
class NaNOnSecondCall(PerSampleLoss):
    """NLL on the first call, NaN from the second: a forget loss that blows up at global step 1."""

    calls: list = field(default_factory=list, compare=False)

    def __call__(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> torch.Tensor:
        self.calls.append(1)
        losses = policy.nll_sum
        return losses * float("nan") if len(self.calls) > 1 else losses


class ForgetIndexLog(L.Callback):
    def __init__(self) -> None:
        self.indices: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.indices.append(batch["forget"]["index"].tolist())


def test_non_finite_loss_names_step_and_forget_rows(tiny_model, tiny_benchmark):
    seen = ForgetIndexLog()
    module = unlearning_module(tiny_model, NaNOnSecondCall(), retain_loss=None)
    fit = trainer(max_steps=3, callbacks=[seen])
    with pytest.raises(NonFiniteLossError) as caught:
        fit.fit(module, data_module(tiny_model, tiny_benchmark))
    assert len(seen.indices) == 2
    message = str(caught.value)
    assert "global step 1" in message
    assert f"forget rows in this batch: {seen.indices[1]}" in message
    assert "No checkpoint of this run has been saved, so none survives" in message  # checkpointing is off


# --------------------------------------------------------------------------------------------------------------
# The CLI builds the same objects


def test_cli_builds_module_and_links_tokenizer(tiny_model, tiny_benchmark, tmp_path):
    cli = cli_main(
        [
            "--model=baldro_lightning.train.module.UnlearningModule",
            f"--model.model={tiny_model}",
            "--model.forget_loss=baldro_lightning.train.losses.NPO",
            "--model.forget_loss.beta=0.2",
            "--model.retain_loss=baldro_lightning.train.losses.NLL",
            "--model.forget_objective=baldro_lightning.train.objectives.DV",
            "--model.forget_objective.sign=released",
            "--data=baldro_lightning.data.datamodule.ForgetRetainDataModule",
            f"--data.benchmark={tiny_benchmark}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert isinstance(cli.model, UnlearningModule)
    assert cli.model.forget_loss == NPO(beta=0.2)
    assert cli.model.forget_objective == DV(tau=1.0, sign="released")
    assert cli.datamodule.tokenizer_path == str(tiny_model)

    # BalDRO-G: the objective takes its ratio; how rows are scored are options of the module.
    cli = cli_main(
        [
            "--model=baldro_lightning.train.module.UnlearningModule",
            f"--model.model={tiny_model}",
            "--model.forget_loss=baldro_lightning.train.losses.NPO",
            "--model.forget_objective=baldro_lightning.train.objectives.Group",
            "--model.forget_objective.ratio=0.25",
            "--model.selection_passes=released",
            "--model.selection_score=mean_nll",
            "--model.subsample_retain=true",
            "--data=baldro_lightning.data.datamodule.ForgetRetainDataModule",
            f"--data.benchmark={tiny_benchmark}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert cli.model.forget_objective == Group(ratio=0.25)
    assert (cli.model.selection_passes, cli.model.selection_score, cli.model.subsample_retain) == (
        "released",
        "mean_nll",
        True,
    )

    # Options shared through the base class: the subclasses pass them on as **kwargs.
    cli = cli_main(
        [
            "--model=baldro_lightning.train.module.FinetuneModule",
            f"--model.model={tiny_model}",
            "--model.optimizer=torch.optim.SGD",
            "--model.optimizer.lr=0.5",
            "--model.weight_decay=0.2",
            "--model.lr_schedule=constant",
            "--model.warmup_epochs=0.5",
            "--model.torch_dtype=bfloat16",
            "--data=baldro_lightning.data.datamodule.QADataModule",
            f"--data.benchmark={tiny_benchmark}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    model = cli.model
    assert (model.weight_decay, model.lr_schedule, model.warmup_epochs, model.torch_dtype) == (
        0.2,
        "constant",
        0.5,
        "bfloat16",
    )
    assert model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))]).defaults["lr"] == 0.5


@pytest.mark.parametrize("module_class", [FinetuneModule, UnlearningModule])
def test_shared_options_have_the_base_types_and_defaults(module_class):
    """LightningCLI follows each subclass's ``super().__init__(model, **kwargs)`` to ``CausalLMModule``'s signature."""
    from jsonargparse import ArgumentParser

    def defaults(cls: type) -> dict:
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "model")
        return dict(parser.get_defaults().items())

    shared = {k: v for k, v in defaults(CausalLMModule).items() if k != "model.model"}
    assert {"model.weight_decay", "model.lr_schedule", "model.warmup_epochs", "model.torch_dtype"} <= set(shared)
    subclass = defaults(module_class)
    assert {k: subclass.get(k, "missing") for k in shared} == shared


def test_weight_decay_groups_survive_flattened_parameters(tiny_model):
    """FSDPStrategy (FSDP1) turns each parameter into a 1-D view after ``configure_model``, before the optimizer is
    built; matrices must still be decayed and vectors not."""
    module = unlearning_module(tiny_model, weight_decay=0.1)
    module.configure_model()
    matrices = {id(p) for name, p in module.policy.named_parameters() if p.dim() == 2 and "norm" not in name}
    for param in module.policy.parameters():
        param.data = param.data.reshape(-1)  # what FSDP1's use_orig_params views look like
    decay, no_decay = module.configure_optimizers().param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert {id(p) for p in decay["params"]} == matrices
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.policy.parameters()))


def test_frozen_reference_warning_is_the_one_setup_cfg_filters(tiny_model, tiny_benchmark):
    """Lightning warns about the reference's eval mode at fit start (expected); setup.cfg's pattern must match it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=1).fit(unlearning_module(tiny_model), data_module(tiny_model, tiny_benchmark))
    messages = [str(w.message) for w in caught if "eval mode" in str(w.message)]
    assert messages, "Lightning no longer warns about modules in eval mode: drop the setup.cfg filter"
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    patterns = [line.split(":")[1] for line in ini["tool:pytest"]["filterwarnings"].splitlines() if "eval" in line]
    assert patterns and all(any(re.match(p, m) for p in patterns) for m in messages), (patterns, messages)


@pytest.mark.parametrize("val_splits", [[], ["forget10"]], ids=["no_val_splits", "val_splits"])
def test_validation_runs_only_with_val_splits(tiny_model, tiny_benchmark, val_splits):
    data = QADataModule(str(tiny_model), str(tiny_benchmark), ["retain90"], val_splits, batch_size=4, max_length=64)
    fit = trainer(max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(FinetuneModule(str(tiny_model), lr_schedule="constant"), data)
    assert not [w for w in caught if "across ranks is zero" in str(w.message)]
    assert is_overridden("val_dataloader", data) == bool(val_splits)
    assert ("val/loss" in fit.callback_metrics) == bool(val_splits)
    if val_splits:
        assert fit.num_val_batches == [1]  # the 4 forget10 rows, one batch
