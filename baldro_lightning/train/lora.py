"""LoRA adapters on the policy through peft: the YAML options, attaching them, and merging them for export.

With LoRA the base weights stay frozen, so the frozen reference *is* the base model: the unlearning module runs
its reference forward with the adapters switched off (``PeftModel.disable_adapter()``) instead of holding a second
copy, as torchtune's ``lora_dpo_single_device`` recipe and trl's ``DPOTrainer`` do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedModel

from baldro_lightning.user_errors import UserInputError

if TYPE_CHECKING:
    # peft is imported where it is used: parsing a config without LoRA should not pay for it.
    from peft import LoraConfig, PeftModel


@dataclass(frozen=True)
class LoRA:
    """Low-rank adapters on the policy's linear layers (Hu et al., 2021, arXiv:2106.09685).

    Chosen in YAML as ``model.init_args.lora: {r: 8, alpha: 16, target_modules: [q_proj, v_proj]}`` or on the
    command line as ``--model.init_args.lora.r=8``.
    """

    r: int = 8
    """Rank of each adapter's update ``B @ A``."""
    alpha: float = 16.0
    """The update is scaled by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on each adapter's input while training (the adapters' only randomness)."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Names (last path component) of the linear layers that get an adapter; the default covers Llama, Mistral and
    Qwen attention and MLP projections."""

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.r, int) and self.r >= 1):
            problems.append(f"--model.init_args.lora.r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            problems.append(f"--model.init_args.lora.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            problems.append(f"--model.init_args.lora.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            problems.append(
                f"--model.init_args.lora.target_modules must be a non-empty list of layer names, got "
                f"{self.target_modules!r}; e.g. [q_proj, v_proj]"
            )
        if problems:
            raise ValueError("invalid LoRA configuration:\n  - " + "\n  - ".join(problems))

    def peft_config(self) -> LoraConfig:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )


def _linear_layer_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})


def add_adapters(model: PreTrainedModel, lora: LoRA) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; only the adapters keep ``requires_grad``.

    peft initialises ``B`` to zero, so the wrapped model computes exactly what ``model`` did until the first update.

    Raises:
        ValueError: if no layer of ``model`` matches ``lora.target_modules``; the message lists the linear layers.
    """
    missing = set(lora.target_modules) - set(_linear_layer_names(model))
    if missing:
        raise UserInputError(
            f"--model.init_args.lora.target_modules={list(lora.target_modules)}: {type(model).__name__} has no "
            f"linear layer named {sorted(missing)}. Its linear layers are {_linear_layer_names(model)}; choose "
            "target_modules among them."
        )
    from peft import get_peft_model

    return get_peft_model(model, lora.peft_config())


def merged_model(model: PreTrainedModel, state_dict: dict[str, torch.Tensor], peft_config: LoraConfig | None):
    """A plain model holding ``state_dict`` with any LoRA adapters folded into the base weights.

    The model is built on the meta device and takes ``state_dict``'s tensors by assignment, so no second set of
    weights is allocated. ``model`` supplies only its class, config and generation config; ``state_dict`` must be a
    copy that is not shared with a live model, because merging adds ``B @ A`` to the base weights in place.

    Args:
        model: The trained policy's base model (or any model of the same class and config).
        state_dict: Full, unsharded weights of the policy, with peft's key names when ``peft_config`` is given.
        peft_config: The adapters' config; ``None`` for a policy without adapters.

    Raises:
        ValueError: if ``state_dict`` misses weights the model needs or holds weights it does not know.
    """
    # fully_shard swaps a sharded model's class for an ``FSDP<class>`` subclass; build the plain class.
    cls = next(c for c in type(model).__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule))
    config = copy.deepcopy(model.config)
    # Training turns the KV cache off for activation checkpointing; the exported model is for generation.
    config.use_cache = True
    with torch.device("meta"):
        skeleton = cls._from_config(config)
    if getattr(model, "generation_config", None) is not None:
        # The base model's own sampling defaults (e.g. a chat model's), not ones rebuilt from the config.
        skeleton.generation_config = copy.deepcopy(model.generation_config)
    if peft_config is not None:
        from peft import get_peft_model

        skeleton = get_peft_model(skeleton, copy.deepcopy(peft_config))
    result = skeleton.load_state_dict(state_dict, strict=False, assign=True)
    # A tied output head may be absent from the state dict; re-tying below restores it from the embedding.
    missing = [k for k in result.missing_keys if not _is_tied(skeleton, k)]
    if missing or result.unexpected_keys:
        raise UserInputError(
            f"the policy weights do not fit {type(model).__name__}: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}. Export with the same --model.init_args.model and "
            "--model.init_args.lora as training used."
        )
    # Loading by assignment unties a tied head; re-tie it before merging, or peft records the model as untied.
    (skeleton.get_base_model() if peft_config is not None else skeleton).tie_weights()
    if peft_config is not None:
        skeleton = skeleton.merge_and_unload()
    return skeleton


def _is_tied(model: nn.Module, key: str) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False)) and key.endswith("lm_head.weight")
