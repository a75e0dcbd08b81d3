"""How the evaluator calls a Hugging Face causal LM with a key/value cache it builds itself.

Prompt-cached scoring (:mod:`~baldro_lightning.evaluation.prefix_scoring`) and greedy decoding
(:mod:`~baldro_lightning.evaluation.greedy`) run the model on a prefix, copy or select rows of its keys and values,
and continue with explicit position ids and a 2-D attention mask over every cached slot (padded slots masked).
:class:`ModelCalls` is the one place that knows the argument names this takes across transformers versions
(``cache`` since 5.x, ``past_key_values`` before; ``logits_to_keep``) and how a cache's per-layer tensors are read;
:func:`prompt_cache_problem` says when a model cannot be run that way.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

ATTENTION_LAYERS = ("full_attention", "sliding_attention")
"""Layer types whose state is a plain key/value cache; any other layer (recurrent, compressed, ...) is not."""


def _hf_model(model: nn.Module) -> PreTrainedModel | None:
    """The outermost Hugging Face model inside ``model`` (itself, or the base of a PEFT wrapper)."""
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def prompt_cache_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot be scored with copied key/value caches; ``None`` when it can.

    Every layer must be an attention layer with a plain key/value cache (``layer_types`` of the text config within
    :data:`ATTENTION_LAYERS`); a sliding window is fine as long as no sequence is longer than it, which
    :meth:`ModelCalls.check_span` checks per batch.
    """
    hf = _hf_model(model)
    if hf is None:
        return f"{type(model).__name__} is not a Hugging Face PreTrainedModel"
    config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    if getattr(config, "is_encoder_decoder", False):
        return f"{type(hf).__name__} is an encoder-decoder model"
    others = sorted(set(getattr(config, "layer_types", None) or ()) - set(ATTENTION_LAYERS))
    if others:
        return f"{type(hf).__name__} has {', '.join(others)} layers, whose state is not a key/value cache"
    return None


def _cache_layers(cache: DynamicCache) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the (B, H_kv, T, D) keys and values of ``cache``."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


@dataclass(frozen=True)
class ModelCalls:
    """Forward calls with an explicit cache, explicit positions and, where the model allows it, no unused logits."""

    cache_argument: str
    """``cache`` (transformers 5.x) or ``past_key_values``."""
    keep_argument: str | None
    """``logits_to_keep``, ``num_logits_to_keep`` or ``None`` (the model always returns every position's logits)."""
    window: int | None
    """The shortest sliding attention window, or ``None`` without one."""

    @staticmethod
    def of(model: nn.Module) -> ModelCalls:
        """The calls for ``model``; raises ``ValueError`` naming the fix when :func:`prompt_cache_problem` applies."""
        problem = prompt_cache_problem(model)
        if problem is not None:
            raise ValueError(f"prompt-cached evaluation cannot run this model: {problem}; set prompt_cache: false")
        hf = _hf_model(model)
        parameters = inspect.signature(type(hf).forward).parameters
        keep = next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters), None)
        config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
        sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ()) or (
            getattr(config, "use_sliding_window", True) and getattr(config, "sliding_window", None)
        )
        window = getattr(config, "sliding_window", None) if sliding else None
        return ModelCalls("cache" if "cache" in parameters else "past_key_values", keep, window)

    def check_span(self, slots: int) -> None:
        """Fail when a batch spans more cached slots than the sliding window (padding would shift the window)."""
        if self.window is not None and slots > self.window:
            raise ValueError(
                f"a batch spans {slots} cached positions, beyond the model's sliding window {self.window}; "
                "set prompt_cache: false for this model"
            )

    def _call(self, model: nn.Module, ids: Tensor, mask: Tensor, positions: Tensor, cache, keep: int | None) -> Tensor:
        self.check_span(mask.shape[1])
        options = {self.cache_argument: cache, "use_cache": cache is not None}
        if keep is not None and self.keep_argument is not None:
            options[self.keep_argument] = keep
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, **options).logits

    def forward(
        self,
        model: nn.Module,
        ids: Tensor,
        mask: Tensor,
        positions: Tensor,
        past: Sequence[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """(B, T, V) logits of ``ids`` after the cached ``past``.

        Args:
            model: The causal LM.
            ids: (B, T) input ids.
            mask: (B, P + T) attention mask over the past slots and then ``ids`` (1 = attend).
            positions: (B, T) position ids of ``ids``.
            past: Per layer, (B, H_kv, P, D) keys and values; ``None``: no past (``mask`` is (B, T)).
        """
        cache = None
        if past is not None:
            cache = DynamicCache()
            for layer, (keys, values) in enumerate(past):
                cache.update(keys, values, layer)
        return self._call(model, ids, mask, positions, cache, keep=None)

    def prefill(self, model: nn.Module, ids: Tensor, mask: Tensor, positions: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per layer, the (B, H_kv, T, D) keys and values of ``ids``; the logits are skipped where the model lets."""
        cache = DynamicCache()
        self._call(model, ids, mask, positions, cache, keep=1)
        return _cache_layers(cache)

    def start(self, model: nn.Module, ids: Tensor, mask: Tensor, positions: Tensor) -> tuple[Tensor, DynamicCache]:
        """(B, V) logits of the last position of ``ids`` and the cache to continue from (greedy decoding)."""
        cache = DynamicCache()
        logits = self._call(model, ids, mask, positions, cache, keep=1)
        return logits[:, -1], cache

    def step(self, model: nn.Module, ids: Tensor, mask: Tensor, positions: Tensor, cache: DynamicCache) -> Tensor:
        """(B, V) logits of one new token per row; ``cache`` grows by it."""
        return self._call(model, ids, mask, positions, cache, keep=1)[:, -1]

    @staticmethod
    def dummy_forward(model: nn.Module, pad_token_id: int, device: torch.device) -> None:
        """One forward of a 2-token input, so that sharded ranks run as many forwards as the busiest rank."""
        dummy = torch.full((1, 2), pad_token_id, dtype=torch.long, device=device)
        model(input_ids=dummy, attention_mask=torch.ones_like(dummy), use_cache=False)
