r"""Likelihood scoring of answers that share a prompt: each prompt's key/value cache is computed once.

A TOFU row is scored on up to seven answers to one question (answer, paraphrase, five perturbed answers), so
:func:`~baldro_lightning.evaluation.engine.score_examples` runs the prompt through the model seven times; on the
embedded benchmark prompts are 62% of the scored tokens. :func:`score_groups` takes the examples grouped by
question instead. For each group it runs the shared prefix once (one "prefix" forward for many groups, its
logits skipped), copies the prefix's keys and values to every answer of the group, and runs only the answers
("suffix" forwards, with the language-model head on answer positions only). Per example it returns what
:func:`~baldro_lightning.evaluation.engine.score_examples` returns, equal within float rounding (different matmul
shapes, padded key slots that are masked), plus on request the teacher-forced argmax at every labelled position,
which :mod:`~baldro_lightning.evaluation.greedy` uses as a verified draft of the greedy generation.

Where the split falls: the prefix is ``input_ids[:cut]`` with ``cut`` one less than the first position that is
not shared by every example of the group or is a target, so the suffix starts at the last shared token, whose
logits predict the first answer token, and every target is predicted inside the suffix forward. A group of one
example gets ``cut = 0`` (nothing to share; it is scored in one forward).

Batching keeps the meaning of ``batch_size`` (examples per suffix forward; a prefix forward holds at most as many
prompts). Groups are ordered by their longest suffix, cut into chunks of at most :data:`CHUNK_BATCHES` batches,
and inside a chunk the examples are sorted by suffix length, so padding stays small although one group's answers
differ in length. The chunk's prefix keys and values are held in one padded pool from which each suffix batch
selects its rows, so the extra memory is one chunk's prompts, never the whole split's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from baldro_lightning.data.tokenization import IGNORE_INDEX, common_prefix_length
from baldro_lightning.evaluation.engine import (
    AnswerExample,
    ExampleScore,
    _input_device,
    _synced_count,
    _token_statistics,
)
from baldro_lightning.evaluation.model_calls import ModelCalls
from baldro_lightning.train.logprobs import sequence_logprobs

CHUNK_BATCHES = 4
"""Suffix batches per chunk: the chunk's examples are sorted by length together, and its prompts' keys and values
are held at once (about a batch's worth of memory for seven answers per prompt)."""


def prefix_cut(examples: Sequence[AnswerExample]) -> int:
    """Length of the prefix a group of examples shares in :func:`score_groups` (0: nothing shared).

    The cut is one less than the shortest of: the common prefix of all ``input_ids`` and each example's first
    target position (the first ``t >= 1`` with a label; position 0 is never a target). Ending the prefix one token
    early puts the last shared token into every suffix, where its logits predict the first target.

    Example: two examples ``[1, 5, 6, 7, 2]`` and ``[1, 5, 6, 9, 9, 2]`` with labels from position 3 share
    ``[1, 5, 6]`` (3 tokens) and first target 3, so the cut is ``min(3, 3) - 1 = 2``: prefix ``[1, 5]``, suffixes
    ``[6, 7, 2]`` and ``[6, 9, 9, 2]``.
    """
    if len(examples) < 2:
        return 0
    shared = len(examples[0].input_ids)
    for example in examples[1:]:
        shared = min(shared, common_prefix_length(examples[0].input_ids, example.input_ids))
    for example in examples:
        first_target = next((t for t in range(1, len(example.labels)) if example.labels[t] != IGNORE_INDEX), None)
        if first_target is not None:
            shared = min(shared, first_target)
    return max(shared - 1, 0)


@dataclass(frozen=True)
class _Chunk:
    """Groups whose prefixes are pooled together, and the forwards that score them."""

    groups: list[int]
    """Group numbers; a group's pool row is its position here."""
    prefix_batches: list[list[int]]
    """Positions in ``groups`` per prefix forward (groups with a non-empty prefix only)."""
    suffix_batches: list[list[tuple[int, int]]]
    """(group, example position) per suffix forward."""


def plan_chunks(cuts: Sequence[int], suffix_lengths: Sequence[Sequence[int]], batch_size: int) -> list[_Chunk]:
    """The forwards of :func:`score_groups`: chunks of whole groups, each a few prefix and suffix batches.

    Args:
        cuts: Each group's prefix length (:func:`prefix_cut`).
        suffix_lengths: Per group, the suffix length of each example (``len(input_ids) - cut``).
        batch_size: Most examples per suffix forward and prompts per prefix forward.

    Returns:
        Chunks, longest suffixes first: a batch that does not fit in memory fails at once, not at the end.
    """
    order = sorted(range(len(cuts)), key=lambda g: max(suffix_lengths[g], default=0), reverse=True)
    chunks: list[_Chunk] = []
    current: list[int] = []
    size = 0
    limit = CHUNK_BATCHES * batch_size
    for group in order:
        count = len(suffix_lengths[group])
        if current and size + count > limit:
            chunks.append(_chunk(current, cuts, suffix_lengths, batch_size))
            current, size = [], 0
        current.append(group)
        size += count
    if current:
        chunks.append(_chunk(current, cuts, suffix_lengths, batch_size))
    return chunks


def _chunk(groups: list[int], cuts: Sequence[int], suffix_lengths: Sequence[Sequence[int]], size: int) -> _Chunk:
    with_prefix = sorted((p for p, g in enumerate(groups) if cuts[g] > 0), key=lambda p: cuts[groups[p]], reverse=True)
    examples = [(g, k) for g in groups for k in range(len(suffix_lengths[g]))]
    examples.sort(key=lambda item: suffix_lengths[item[0]][item[1]], reverse=True)
    return _Chunk(
        groups=groups,
        prefix_batches=[with_prefix[i : i + size] for i in range(0, len(with_prefix), size)],
        suffix_batches=[examples[i : i + size] for i in range(0, len(examples), size)],
    )


def _right_padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(B, T) ids right-padded with ``pad`` and the (B, T) long mask of real tokens."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _greedy_ids(logits: Tensor, mask: Tensor, rows: Sequence[int]) -> dict[int, np.ndarray]:
    """Teacher-forced argmax at the labelled shifted positions of ``rows``: ``{row: (m,) ids}``."""
    if not rows:
        return {}
    predicted = logits.argmax(-1).cpu()  # (B, T-1); no copy of the logits
    keep = mask.cpu()
    return {row: predicted[row][keep[row]].numpy() for row in rows}


def score_groups(
    model: nn.Module,
    groups: Sequence[Sequence[AnswerExample]],
    batch_size: int,
    pad_token_id: int,
    synced_gpus: bool = False,
) -> list[list[ExampleScore]]:
    """Likelihood statistics of grouped examples, each group's shared prompt run once (see the module docstring).

    The caller puts the model in eval mode under ``torch.no_grad()``.

    Args:
        model: A causal LM whose layers are all attention layers (see :class:`ModelCalls`); may be FSDP2-sharded, in
            which case every rank calls this with ``synced_gpus=True``.
        groups: Examples grouped by shared prompt (any grouping is correct; only shared prefixes save time).
        batch_size: Examples per suffix forward, prompts per prefix forward.
        pad_token_id: Id written into padded positions (masked by the attention mask built from lengths).
        synced_gpus: Pad this rank's number of forwards to the largest over ranks with dummy forwards.

    Returns:
        Per group, one :class:`ExampleScore` per example, in the given order; ``greedy_ids`` is set for examples
        that asked for a draft.
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    calls = ModelCalls.of(model)
    device = _input_device(model)
    cuts = [prefix_cut(group) for group in groups]
    suffix_lengths = [[len(e.input_ids) - cut for e in group] for group, cut in zip(groups, cuts, strict=True)]
    chunks = plan_chunks(cuts, suffix_lengths, batch_size)
    planned = sum(len(c.prefix_batches) + len(c.suffix_batches) for c in chunks)
    # Agreed before any forward: a rank asking later would meet the others' FSDP all-gathers and deadlock.
    forwards = _synced_count(planned, device, synced_gpus)
    results: list[list[ExampleScore | None]] = [[None] * len(group) for group in groups]
    for chunk in chunks:
        pool = _prefix_pool(calls, model, chunk, groups, cuts, pad_token_id, device)
        for batch in chunk.suffix_batches:
            _score_suffixes(calls, model, batch, chunk, pool, groups, cuts, pad_token_id, device, results)
    for _ in range(forwards - planned):
        calls.dummy_forward(model, pad_token_id, device)
    return cast(list[list[ExampleScore]], results)


@dataclass
class _PrefixPool:
    """Keys and values of a chunk's prefixes, one padded row per group of the chunk."""

    keys: list[Tensor]
    """Per layer, (G, H_kv, P, D)."""
    values: list[Tensor]
    """Per layer, (G, H_kv, P, D)."""
    lengths: Tensor
    """(G,) each group's prefix length (0: no prefix; its row is zeros and always masked)."""


def _prefix_pool(
    calls: ModelCalls,
    model: nn.Module,
    chunk: _Chunk,
    groups: Sequence[Sequence[AnswerExample]],
    cuts: Sequence[int],
    pad: int,
    device: torch.device,
) -> _PrefixPool | None:
    if not chunk.prefix_batches:
        return None
    longest = max(cuts[g] for g in chunk.groups)
    keys: list[Tensor] = []
    values: list[Tensor] = []
    for batch in chunk.prefix_batches:
        prompts = [groups[chunk.groups[p]][0].input_ids[: cuts[chunk.groups[p]]] for p in batch]
        ids, mask = _right_padded(prompts, pad, device)
        positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
        layers = calls.prefill(model, ids, mask, positions)
        if not keys:
            # Zero rows for groups without a prefix: finite values, masked out of every attention.
            keys = [k.new_zeros((len(chunk.groups), k.shape[1], longest, k.shape[3])) for k, _ in layers]
            values = [v.new_zeros((len(chunk.groups), v.shape[1], longest, v.shape[3])) for _, v in layers]
        rows = torch.tensor(batch, device=device)
        for layer, (k, v) in enumerate(layers):
            keys[layer][rows, :, : k.shape[2]] = k
            values[layer][rows, :, : v.shape[2]] = v
    lengths = torch.tensor([cuts[g] for g in chunk.groups], device=device)
    return _PrefixPool(keys, values, lengths)


def _score_suffixes(
    calls: ModelCalls,
    model: nn.Module,
    batch: list[tuple[int, int]],
    chunk: _Chunk,
    pool: _PrefixPool | None,
    groups: Sequence[Sequence[AnswerExample]],
    cuts: Sequence[int],
    pad: int,
    device: torch.device,
    results: list[list[ExampleScore | None]],
) -> None:
    examples = [groups[g][k] for g, k in batch]
    starts = [cuts[g] for g, _ in batch]
    ids, suffix_mask = _right_padded([e.input_ids[c:] for e, c in zip(examples, starts, strict=True)], pad, device)
    labels, _ = _right_padded([e.labels[c:] for e, c in zip(examples, starts, strict=True)], IGNORE_INDEX, device)
    start = torch.tensor(starts, device=device).unsqueeze(1)
    positions = start + torch.arange(ids.shape[1], device=device)
    if pool is None:
        logits = calls.forward(model, ids, suffix_mask, positions)
    else:
        slot = {g: p for p, g in enumerate(chunk.groups)}
        rows = torch.tensor([slot[g] for g, _ in batch], device=device)
        width = pool.keys[0].shape[2]
        prefix_mask = (torch.arange(width, device=device) < pool.lengths[rows].unsqueeze(1)).long()
        past = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in zip(pool.keys, pool.values, strict=True)]
        logits = calls.forward(model, ids, torch.cat([prefix_mask, suffix_mask], dim=1), positions, past)
    stats = sequence_logprobs(logits, labels)
    nll = stats.nll_mean.float().cpu().tolist()
    need = torch.tensor([e.token_stats for e in examples], device=device)
    token_parts = _token_statistics(logits, labels, stats.token_logps, stats.mask, need) if bool(need.any()) else None
    drafts = _greedy_ids(logits[:, :-1], stats.mask, [i for i, e in enumerate(examples) if e.draft])
    for i, ((g, k), example) in enumerate(zip(batch, examples, strict=True)):
        extra = token_parts[i] if token_parts is not None and example.token_stats else {}
        results[g][k] = ExampleScore(nll_mean=float(nll[i]), greedy_ids=drafts.get(i), **extra)
