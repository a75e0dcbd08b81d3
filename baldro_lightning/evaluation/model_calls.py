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
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

try:  # transformers >= 4.56 builds caches from layer objects; before, only the concatenating DynamicCache exists.
    from transformers.cache_utils import Cache, DynamicLayer
except ImportError:  # pragma: no cover - older transformers
    Cache = DynamicLayer = None

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


if DynamicLayer is not None:

    class _BufferLayer(DynamicLayer):
        """A cache layer over a preallocated (B, H_kv, capacity, D) buffer: new keys and values are written in place.

        ``DynamicLayer`` concatenates past and new at every call, copying the whole past each time: for scoring
        after a gathered past, and for every decoding step, a copy as large as the cache itself.
        """

        def __init__(self, keys: Tensor, values: Tensor, length: int) -> None:
            super().__init__()
            self._keys, self._values, self._length = keys, values, length
            self.is_initialized = True
            self.device, self.dtype = keys.device, keys.dtype
            self._expose()

        def _expose(self) -> None:
            self.keys = self._keys[:, :, : self._length]
            self.values = self._values[:, :, : self._length]

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            end = self._length + key_states.shape[-2]
            if end > self._keys.shape[2]:  # out of room: grow to twice the size (amortised)
                grown = max(end, 2 * self._keys.shape[2])
                self._keys = torch.cat([self._keys, self._keys.new_empty(self._shape(grown))], dim=2)
                self._values = torch.cat([self._values, self._values.new_empty(self._shape(grown))], dim=2)
            self._keys[:, :, self._length : end] = key_states
            self._values[:, :, self._length : end] = value_states
            self._length = end
            self._expose()
            return self.keys, self.values

        def _shape(self, capacity: int) -> tuple[int, ...]:
            b, h, c, d = self._keys.shape
            return (b, h, capacity - c, d)

        def get_seq_length(self) -> int:
            return self._length

        def batch_select_indices(self, indices: Tensor) -> None:
            # Copy only the filled slots: the free room is as large as the longest generation still to come.
            keys = self._keys.new_empty((len(indices), *self._keys.shape[1:]))
            values = self._values.new_empty((len(indices), *self._values.shape[1:]))
            keys[:, :, : self._length] = self._keys[indices, :, : self._length]
            values[:, :, : self._length] = self._values[indices, :, : self._length]
            self._keys, self._values = keys, values
            self._expose()


def buffer_cache(buffers: Sequence[tuple[Tensor, Tensor]], length: int):
    """A cache over per-layer (B, H_kv, capacity, D) key and value buffers whose first ``length`` slots are filled.

    With transformers older than 4.56 it is a plain ``DynamicCache`` of those slots (same values, more copying).
    """
    if DynamicLayer is None:  # pragma: no cover - older transformers
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(buffers):
            if length:
                cache.update(keys[:, :, :length], values[:, :, :length], layer)
        return cache
    return Cache(layers=[_BufferLayer(keys, values, length) for keys, values in buffers])


@dataclass(frozen=True)
class PromptCache:
    """The keys and values a scoring pass computed for the first tokens of a prompt, kept for its generation."""

    tokens: tuple[int, ...]
    """The token ids they belong to (positions 0 .. len - 1)."""
    layers: list[tuple[Tensor, Tensor]]
    """Per layer, (H_kv, len(tokens), D) keys and values."""


def row_prompt_cache(cache: DynamicCache, row: int, slots: Tensor, tokens: Sequence[int]) -> PromptCache:
    """Row ``row``'s keys and values at ``slots`` (its unmasked slots, in order) of a batch's cache, copied out as
    the prompt cache of ``tokens`` (one token per slot)."""
    layers = [(keys[row][:, slots], values[row][:, slots]) for keys, values in _cache_layers(cache)]
    return PromptCache(tuple(tokens), layers)


PROMPT_CACHE_BYTES = 2**29
"""Memory for the prompt caches one evaluation keeps from scoring until generation (every prompt of a small model;
a few of a large one)."""


class PromptCaches:
    """Prompt caches a scoring pass keeps for later generation: only for the groups asked for, within a byte budget.

    Scoring computes each question's prompt once (:mod:`~baldro_lightning.evaluation.prefix_scoring`); greedy
    generation from the same prompt (:mod:`~baldro_lightning.evaluation.greedy`) would compute it again. A kept
    prompt costs its keys and values in memory until generation: ``2 x layers x H_kv x D x dtype`` bytes per token
    (8 KiB for a 4-layer, 256-wide fp32 model, 0.5 MiB for a 7B model in bf16), so a large model keeps few.
    """

    def __init__(self, groups: Collection[int], budget: int) -> None:
        self.wanted = frozenset(groups)
        self.left = budget
        self.kept: dict[int, PromptCache] = {}

    def offer(self, group: int, tokens: Sequence[int], layers: Sequence[tuple[Tensor, Tensor]]) -> None:
        """Keep copies of ``layers`` ((H_kv, T, D) per layer) for ``group`` if it is wanted and they fit."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if group not in self.wanted or group in self.kept or size > self.left:
            return
        self.left -= size
        self.kept[group] = PromptCache(tuple(tokens), [(k.clone(), v.clone()) for k, v in layers])


@dataclass(frozen=True)
class ModelCalls:
    """Forward calls with an explicit cache, explicit positions and, where the model allows it, no unused logits."""

    cache_argument: str
    """``cache`` (transformers 5.x) or ``past_key_values``."""
    keep_argument: str | None
    """``logits_to_keep``, ``num_logits_to_keep`` or ``None`` (the model always returns every position's logits)."""
    window: int | None
    """The shortest sliding attention window, or ``None`` without one."""
    layers: int
    """Decoder layers (each with its keys and values)."""
    kv_heads: int
    """Key/value heads per layer."""
    head_dim: int
    """Size of a key or value head."""

    @staticmethod
    def of(model: nn.Module) -> ModelCalls:
        """The calls for ``model``; raises ``ValueError`` naming the fix when :func:`prompt_cache_problem` applies."""
        problem = prompt_cache_problem(model)
        if problem is not None:
            raise ValueError(
                f"prompt-cached evaluation cannot run this model: {problem}; set engine: per_example "
                "(--engine per_example)"
            )
        hf = _hf_model(model)
        parameters = inspect.signature(type(hf).forward).parameters
        keep = next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters), None)
        config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
        sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ()) or (
            getattr(config, "use_sliding_window", True) and getattr(config, "sliding_window", None)
        )
        window = getattr(config, "sliding_window", None) if sliding else None
        heads = getattr(config, "num_attention_heads", 1)
        return ModelCalls(
            cache_argument="cache" if "cache" in parameters else "past_key_values",
            keep_argument=keep,
            window=window,
            layers=config.num_hidden_layers,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        )

    def kv_bytes_per_token(self, model: nn.Module) -> int:
        """Bytes of keys and values one token holds in a cache: 2 x layers x key/value heads x head size x dtype."""
        return 2 * self.layers * self.kv_heads * self.head_dim * next(model.parameters()).element_size()

    def buffers(self, model: nn.Module, batch: int, capacity: int) -> list[tuple[Tensor, Tensor]]:
        """Empty per-layer (batch, H_kv, capacity, D) key and value buffers in the model's dtype and device."""
        parameter = next(model.parameters())
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        # A sharded (FSDP2) parameter is a DTensor; its local shard names the device and dtype.
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        return [(local.new_empty(shape), local.new_empty(shape)) for _ in range(self.layers)]

    def check_span(self, slots: int) -> None:
        """Fail when a batch spans more cached slots than the sliding window (padding would shift the window)."""
        if self.window is not None and slots > self.window:
            raise ValueError(
                f"a batch spans {slots} cached positions, beyond the model's sliding window {self.window}; "
                "set engine: per_example (--engine per_example) for this model"
            )

    def _call(self, model: nn.Module, ids: Tensor, mask: Tensor, positions: Tensor, cache, keep: int | None) -> Tensor:
        self.check_span(mask.shape[1])
        options = {self.cache_argument: cache, "use_cache": cache is not None}
        if keep is not None and self.keep_argument is not None:
            options[self.keep_argument] = keep
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, **options).logits

    def run(
        self,
        model: nn.Module,
        ids: Tensor,
        mask: Tensor,
        positions: Tensor,
        past: Sequence[tuple[Tensor, Tensor]] | None = None,
        past_length: int = 0,
        keep_all: bool = True,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Logits of ``ids`` after ``past_length`` cached slots, and every layer's keys and values.

        Args:
            model: The causal LM.
            ids: (B, T) input ids.
            mask: (B, P + T) attention mask over the past slots and then ``ids`` (1 = attend).
            positions: (B, T) position ids of ``ids``.
            past: Per layer, (B, H_kv, >= P + T, D) key and value buffers (:meth:`buffers`) whose first ``P`` slots
                hold the past; ``ids``' keys and values are written after them. ``None``: new buffers, no past.
            past_length: ``P``.
            keep_all: Logits of every position, (B, T, V); False: the last position's only where the model lets
                (the language-model head is skipped elsewhere).

        Returns:
            ``(logits, layers)``; ``layers`` holds per layer the (B, H_kv, P + T, D) keys and values.
        """
        if past is None:
            past = self.buffers(model, ids.shape[0], ids.shape[1])
        cache = buffer_cache(past, past_length)
        logits = self._call(model, ids, mask, positions, cache, keep=None if keep_all else 1)
        return logits, _cache_layers(cache)

    def start(
        self,
        model: nn.Module,
        ids: Tensor,
        mask: Tensor,
        positions: Tensor,
        room: int,
        past: Sequence[tuple[Tensor, Tensor]] | None = None,
        past_length: int = 0,
    ) -> tuple[Tensor, DynamicCache]:
        """(B, V) logits of the last position of ``ids``, and the cache to continue from with ``room`` free slots.

        ``past``/``past_length`` as in :meth:`run`: buffers of at least ``past_length + ids.shape[1] + room`` slots
        whose first ``past_length`` hold keys and values computed earlier (``mask`` then covers them too).
        """
        if past is None:
            past = self.buffers(model, ids.shape[0], ids.shape[1] + room)
        cache = buffer_cache(past, past_length)
        logits = self._call(model, ids, mask, positions, cache, keep=1)
        return logits[:, -1], cache

    def step(self, model: nn.Module, ids: Tensor, mask: Tensor, positions: Tensor, cache: DynamicCache) -> Tensor:
        """(B, V) logits of one new token per row; ``cache`` grows by it."""
        return self._call(model, ids, mask, positions, cache, keep=1)[:, -1]

    def run_reduced(
        self,
        model: nn.Module,
        head: nn.Module,
        ids: Tensor,
        mask: Tensor,
        positions: Tensor,
        rows: Tensor,
        reduce: Callable[[Tensor, int], None],
        past: Sequence[tuple[Tensor, Tensor]] | None = None,
        past_length: int = 0,
    ) -> list[tuple[Tensor, Tensor]]:
        """:meth:`run`, with the logits of only the positions ``rows`` computed, a block at a time, and reduced.

        ``head`` is the model's output embedding as :func:`reducible_head` returns it. For this call it computes
        the (k, V) logits of :func:`head_rows` positions at a time, in the order of ``rows`` (indices into the
        flattened ``B x T`` positions), and hands each block to ``reduce(logits, first)``, ``first`` being the
        block's first index into ``rows``; no block outlives its call and no other position reaches the head.

        Returns:
            Per layer, the (B, H_kv, P + T, D) keys and values, as :meth:`run` does.
        """
        if past is None:
            past = self.buffers(model, ids.shape[0], ids.shape[1])
        cache = buffer_cache(past, past_length)
        block = head_rows(head)
        own = head.__dict__.get("forward")  # an instance-level forward (e.g. a device-placement hook) stays in use
        compute = own if own is not None else type(head).forward.__get__(head)

        def forward(hidden: Tensor) -> Tensor:
            flat = hidden.reshape(-1, hidden.shape[-1])
            for first in range(0, len(rows), block):
                reduce(compute(flat.index_select(0, rows[first : first + block])), first)
            return hidden.new_empty((*hidden.shape[:-1], 0))

        head.forward = forward
        try:
            self._call(model, ids, mask, positions, cache, keep=None)
        finally:
            if own is None:
                del head.forward
            else:
                head.forward = own
        return _cache_layers(cache)

    @staticmethod
    def dummy_forward(model: nn.Module, pad_token_id: int, device: torch.device) -> Tensor:
        """One forward of a 2-token input, so that sharded ranks run as many forwards as the busiest rank.

        Returns its logits.
        """
        dummy = torch.full((1, 2), pad_token_id, dtype=torch.long, device=device)
        return model(input_ids=dummy, attention_mask=torch.ones_like(dummy), use_cache=False).logits


HEAD_BYTES = 2**22
"""Logits :meth:`ModelCalls.run_reduced` computes at once: a 4 MiB fp32 block is read by every reduction (max,
log-softmax, picked tokens, MinK++ moments) while it is still in a CPU's cache, where a whole (B, T, V) tensor is
read from memory each time (and would take 3.3 GB for 6,400 positions of a 128k vocabulary)."""

HEAD_MIN_ROWS = 16
"""Fewest positions per block, however large the vocabulary (a GPU wants rows to fill its matrix units)."""


def head_rows(head: nn.Module) -> int:
    """Positions per block of logits: as many as fill :data:`HEAD_BYTES` in fp32, at least :data:`HEAD_MIN_ROWS`."""
    vocabulary = getattr(head, "out_features", None) or head.weight.shape[0]
    return max(HEAD_MIN_ROWS, HEAD_BYTES // (4 * vocabulary))


def reducible_head(model: nn.Module, pad_token_id: int, device: torch.device) -> nn.Module | None:
    """The output embedding whose output *is* the model's logits; ``None`` when something is applied after it.

    Some models change the head's output before returning it (Gemma 2's soft-capping, Cohere's logit scale), and
    some compute it without calling the module; :meth:`ModelCalls.run_reduced` must not bypass either. One 2-token
    forward (:meth:`ModelCalls.dummy_forward`, which sharded ranks all run here) records what the head returns and
    checks that the model returns that very tensor.
    """
    hf = _hf_model(model)
    head = hf.get_output_embeddings() if hf is not None else None
    if head is None:
        return None
    seen: list[Tensor] = []
    handle = head.register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        logits = ModelCalls.dummy_forward(model, pad_token_id, device)
    finally:
        handle.remove()
    return head if len(seen) == 1 and seen[0] is logits else None
