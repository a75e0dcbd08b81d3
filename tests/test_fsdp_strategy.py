"""Lightning's ``FSDPStrategy`` (FSDP1) from YAML, checked without a GPU.

FSDP1 refuses to wrap anything without an accelerator, so what is checked on CPU is everything up to the wrap:
the shipped config builds an ``FSDPStrategy`` holding our policies; the policies pick the right modules of a real
``UnlearningModule`` through the very calls FSDP1 and Lightning's activation checkpointing make; configurations
that FSDP1 cannot run are refused before training; gradient clipping by norm goes to the FSDP root; the module's
device is the strategy's, which FSDP1 does not tell Lightning.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from unittest.mock import Mock

import pytest
import torch
from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
from lightning.pytorch.strategies import FSDPStrategy
from shipped_configs import fit_args
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.testing import assert_close
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from baldro_lightning.cli import BaldroCLI, cli_main
from baldro_lightning.train.export import ExportPretrained
from baldro_lightning.train.lora import LoRA
from baldro_lightning.train.losses import NLL, NPO
from baldro_lightning.train.module import UnlearningModule
from baldro_lightning.train.sharding import DecoderLayerPolicy, DecoderLayerWrapPolicy

LAYERS = 2  # the tiny Llama of conftest.py


def loaded(model: Path, **kwargs) -> UnlearningModule:
    """An ``UnlearningModule`` with a live reference, its models loaded as ``configure_model`` does before a wrap."""
    module = UnlearningModule(str(model), NPO(), retain_loss=NLL(), **kwargs)
    module.configure_model()
    return module


def test_shipped_config_builds_fsdp_strategy_with_our_policies(monkeypatch):
    # Without CUDA, Lightning builds no Trainer for FSDPStrategy; the parsed and instantiated arguments are checked.
    monkeypatch.setattr(BaldroCLI, "instantiate_trainer", lambda self, **kwargs: None)
    cli = cli_main(fit_args("tofu/npo_dv_fsdp1"), run=False)
    strategy = cli.config_init["trainer"]["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], DecoderLayerWrapPolicy)
    assert strategy.kwargs["auto_wrap_policy"].layer_classes is None  # found on the model: _no_split_modules
    # Lightning's default, which FSDP1 needs for units that mix frozen and trainable parameters (LoRA).
    assert strategy.kwargs["use_orig_params"] is True
    checkpointing = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert type(checkpointing) is DecoderLayerPolicy
    assert isinstance(cli.model, UnlearningModule)
    assert cli.model.reference_mode == "live" and not cli.model.gradient_checkpointing


@pytest.mark.parametrize("lora", [None, LoRA(r=2, target_modules=("q_proj",))], ids=["reference", "lora"])
def test_wrap_policy_makes_a_unit_of_every_layer_and_every_model(tiny_model, lora):
    module = loaded(tiny_model, lora=lora)
    units = DecoderLayerWrapPolicy()._run_policy(module, set(), {"sharding_strategy": "FULL_SHARD"})
    models = [module.policy.get_base_model()] if lora else [module.policy, module.reference]
    layers = [m for m in units if isinstance(m, LlamaDecoderLayer)]
    assert len(layers) == LAYERS * len(models)
    assert set(units) == set(layers) | set(models)
    assert all(kwargs == {"sharding_strategy": "FULL_SHARD"} for kwargs in units.values())
    # Every parameter sits in a unit below the root, so the root unit mixes no frozen and trainable weights.
    assert {id(p) for unit in units for p in unit.parameters()} == {id(p) for p in module.parameters()}


def test_wrap_policy_respects_ignored_modules(tiny_model):
    module = loaded(tiny_model)
    units = DecoderLayerWrapPolicy()._run_policy(module, {module.reference}, {})
    assert module.reference not in units and module.policy in units


def test_checkpointing_policy_wraps_each_layer_and_keeps_the_gradients(tiny_model):
    module = loaded(tiny_model)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        module.policy.zero_grad()
        loss = module.policy(input_ids=ids).logits.float().pow(2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in module.policy.parameters()]

    before = loss_and_grads()
    # What FSDPStrategy does after wrapping, with its activation_checkpointing_policy.
    _setup_activation_checkpointing(module, {"auto_wrap_policy": DecoderLayerPolicy()})
    wrapped = [m for m in module.modules() if isinstance(m, CheckpointWrapper)]
    assert len(wrapped) == 2 * LAYERS
    assert all(isinstance(m._checkpoint_wrapped_module, LlamaDecoderLayer) for m in wrapped)
    after = loss_and_grads()
    assert_close(after, before)


def test_layer_classes_override_and_unknown_class_is_reported(tiny_model):
    module = loaded(tiny_model)
    assert len(DecoderLayerPolicy(["LlamaDecoderLayer"]).layers(module)) == 2 * LAYERS
    with pytest.raises(ValueError, match=r"selects no module.*layer_classes.*'LlamaDecoderLayer'"):
        DecoderLayerPolicy(["GPT2Block"]).layers(module)
    with pytest.raises(ValueError, match="selects nothing"):
        DecoderLayerPolicy([])


def test_wrap_policy_refuses_to_be_the_checkpointing_policy(tiny_model):
    module = loaded(tiny_model)
    with pytest.raises(TypeError, match="activation_checkpointing_policy use .*DecoderLayerPolicy"):
        _setup_activation_checkpointing(module, {"auto_wrap_policy": DecoderLayerWrapPolicy()})


def test_unsupported_fsdp1_setups_are_refused_before_training(tiny_model):
    module = UnlearningModule(str(tiny_model), NPO(), retain_loss=NLL(), reference="cached")
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[ExportPretrained("unused")])
    with pytest.raises(ValueError, match=r"(?s)FSDPStrategy.*ExportPretrained.*reference=cached"):
        module.configure_model()
    assert module.policy is None  # refused before any weights were loaded


def test_clipping_by_norm_goes_to_the_fsdp_root(tiny_model):
    module = UnlearningModule(str(tiny_model), NPO())
    root = Mock(spec=FullyShardedDataParallel)
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(model=root))
    module.configure_gradient_clipping(Mock(), gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    root.clip_grad_norm_.assert_called_once_with(1.0)


def test_module_device_follows_the_strategy(tiny_model):
    # FSDP1 moves the weights itself, so Lightning would leave the module's device at "cpu".
    module = UnlearningModule(str(tiny_model), NPO(), retain_loss=NLL())
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(parallel_devices=[torch.device("cuda", 3)]), callbacks=[])
    module.configure_model()
    assert module.device == torch.device("cuda", 3)
    assert module.reference is not None
