"""Loading a Hugging Face causal LM and switching its modes: what training, export and evaluation share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

TorchDtype = Literal["float32", "bfloat16", "float16"]


class ModelLoadError(OSError, ValueError):
    """A model path that ``from_pretrained`` cannot load (an OSError for callers that expect one)."""


def load_causal_lm(path: str, torch_dtype: TorchDtype) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` for a Hub id or a local directory, with an error that helps."""
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, torch_dtype))
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"--model.model={path!r}: could not load a causal LM ({type(err).__name__}: {str(err)[:300]}). "
            "Pass a local directory written by save_pretrained (config.json and the weights; for the embedded "
            "default run `python -m baldro_lightning quickstart` first) or a Hub id in the local Hugging Face cache."
        ) from err


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them.

    Non-reentrant checkpointing back-propagates into LoRA adapters inside a layer whether or not the layer's input
    requires grad. The reentrant variant does only while a hook makes the frozen embedding's output require grad;
    without it the adapters get no gradient (open-unlearning#178). tests/test_lora.py checks the gradients.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed gradient_checkpointing_enable
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule of ``model`` in eval mode inside the block, each restored to its own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
