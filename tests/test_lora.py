"""LoRA through peft on a tiny random Llama (CPU): adapters train, base weights and the reference do not move.

The reference under LoRA is the policy with its adapters switched off, so these tests also check that no second
model is loaded and that the adapter-off forward is the pristine model's forward even after the adapters moved.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from baldro_lightning.cli import cli_main
from baldro_lightning.data.datamodule import ForgetRetainDataModule
from baldro_lightning.train import module as module_file
from baldro_lightning.train.lora import LoRA
from baldro_lightning.train.losses import NLL, NPO
from baldro_lightning.train.module import UnlearningModule

ADAPTERS = LoRA(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))


def lora_module(model: Path, lora: LoRA = ADAPTERS, **kwargs) -> UnlearningModule:
    kwargs.setdefault("lr_schedule", "constant")  # the linear warm-up's first update has lr 0
    kwargs.setdefault("optimizer", lambda params: torch.optim.AdamW(params, lr=1e-2))
    return UnlearningModule(str(model), NPO(), retain_loss=NLL(), lora=lora, **kwargs)


def data_module(model: Path, benchmark: Path) -> ForgetRetainDataModule:
    return ForgetRetainDataModule(str(model), str(benchmark), batch_size=2, max_length=64)


def fit(module: UnlearningModule, model: Path, benchmark: Path, steps: int = 2, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, data_module(model, benchmark))
    return trainer


def base_name(peft_name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` -> the plain model's key."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


class AdapterGradients(L.Callback):
    """Keeps a copy of every trainable parameter's gradient just before each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append(
            {
                n: p.grad.clone()
                for n, p in pl_module.policy.named_parameters()
                if p.requires_grad and p.grad is not None
            }
        )


# --------------------------------------------------------------------------------------------------------------
# Training


def test_adapters_train_and_base_weights_stay_bit_identical(tiny_model, tiny_benchmark, monkeypatch):
    loads = []
    real_load = module_file.load_causal_lm
    monkeypatch.setattr(module_file, "load_causal_lm", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    module = lora_module(tiny_model)
    initial = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            initial.update({n: p.detach().clone() for n, p in pl_module.policy.named_parameters() if p.requires_grad})

    trainer = fit(module, tiny_model, tiny_benchmark, callbacks=[Snapshot()])

    # NPO needs a live reference; with LoRA it is the base model inside the policy, not a second load.
    assert len(loads) == 1
    assert module.reference is None
    trainable = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    # 2 layers x 3 targets x (A, B)
    assert len(trainable) == 12 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in module.policy.named_parameters() if n in trainable}

    policy = dict(module.policy.named_parameters())
    unchanged = [n for n in trainable if torch.equal(policy[n], initial[n])]
    assert not unchanged, f"adapters that did not train: {unchanged}"

    pristine = AutoModelForCausalLM.from_pretrained(str(tiny_model)).state_dict()
    frozen = {base_name(n): p for n, p in policy.items() if n not in trainable}
    assert frozen.keys() == pristine.keys() - {"lm_head.weight"}  # the head is tied to the embedding
    for name, value in pristine.items():
        if name in frozen:
            assert torch.equal(frozen[name], value), f"base weight {name} changed"


def test_activation_checkpointing_gives_adapters_the_same_gradients(tiny_model, tiny_benchmark):
    """The known trap: checkpointed layers whose inputs do not require grad back-propagate nothing into adapters.

    After one step ``B`` is non-zero, so the second step's gradients reach ``A`` as well; both steps must give the
    gradients of the run without checkpointing, and they must be non-zero.
    """
    runs = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the adapters' A is drawn at random
        module = lora_module(tiny_model, gradient_checkpointing=checkpointing)
        grads = AdapterGradients()
        fit(module, tiny_model, tiny_benchmark, callbacks=[grads])
        layers = module.policy.get_base_model().model.layers
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
        runs[checkpointing] = grads.steps

    with_ckpt, without = runs[True], runs[False]
    assert len(with_ckpt) == len(without) == 2
    assert with_ckpt[0].keys() == without[0].keys() and len(with_ckpt[0]) == 12
    zero = [n for n, g in with_ckpt[1].items() if not g.abs().sum() > 0]
    assert not zero, f"adapters without gradient under activation checkpointing: {zero}"
    for step in range(2):
        for name, grad in without[step].items():
            assert_close(with_ckpt[step][name], grad, rtol=1e-5, atol=1e-7, msg=f"step {step} {name}")


def test_reference_is_the_pristine_base_model_after_training(tiny_model, tiny_benchmark):
    module = lora_module(tiny_model)
    fit(module, tiny_model, tiny_benchmark)
    batch = next(iter(data_module(tiny_model, tiny_benchmark).train_dataloader()))["forget"]
    modes = [m.training for m in module.policy.modules()]

    (reference,) = module._reference_stats([batch], [False])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    with torch.no_grad():
        (expected,) = module.forward_stats(base, [batch])
        (adapted,) = module.forward_stats(module.policy.eval(), [batch])
    assert_close(reference.logp_sum, expected.logp_sum, rtol=1e-5, atol=1e-5)
    assert (adapted.logp_sum - expected.logp_sum).abs().max() > 1e-3, "the adapters did not change the policy"
    module.policy.train()
    assert modes == [m.training for m in module.policy.modules()]
    assert not reference.logp_sum.requires_grad


# --------------------------------------------------------------------------------------------------------------
# Configuration


def test_lora_from_the_command_line(tiny_model, tiny_benchmark, tmp_path):
    cli = cli_main(
        [
            "--model=baldro_lightning.train.module.UnlearningModule",
            f"--model.model={tiny_model}",
            "--model.forget_loss=baldro_lightning.train.losses.NPO",
            "--model.lora.r=4",
            "--model.lora.target_modules=[q_proj, v_proj]",
            "--data=baldro_lightning.data.datamodule.ForgetRetainDataModule",
            f"--data.benchmark={tiny_benchmark}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert cli.model.lora == LoRA(r=4, alpha=16.0, dropout=0.0, target_modules=("q_proj", "v_proj"))


def test_bad_lora_options_name_the_flag():
    with pytest.raises(ValueError, match=r"lora\.r must be an integer >= 1, got 0(.|\n)*lora\.dropout"):
        LoRA(r=0, dropout=1.5)
    with pytest.raises(ValueError, match=r"target_modules must be a non-empty list"):
        LoRA(target_modules=())


def test_unknown_target_module_lists_the_linear_layers(tiny_model):
    module = lora_module(tiny_model, LoRA(target_modules=("q_proj", "c_attn")))
    with pytest.raises(ValueError, match=r"no linear layer named \['c_attn'\].*'q_proj'"):
        module.configure_model()
