"""Greedy generation: tokens known from verified drafts, then a decode loop that drops finished rows.

Three savings over one ``model.generate`` per batch (:func:`~baldro_lightning.evaluation.engine.generate_answers`),
all exact for greedy decoding:

- **Verified drafts.** Scoring an answer teacher-forced already computes the model's argmax after the prompt and
  after every prefix of that answer. Greedy decoding follows the argmax, so as long as the argmax equals the next
  answer token, the generation *is* the answer; at the first position where it differs, the argmax is the next
  generated token (:func:`verified_tokens`). A model that reproduces an answer (a target model on its training
  data, any model on easy questions) needs no decoding step at all for that row; one that departs after k tokens
  starts decoding after them, from one prefill forward.
- **The prompt's keys and values from scoring.** Scoring computed each question's prompt once for all its answers
  and can keep its keys and values (:class:`~baldro_lightning.evaluation.model_calls.PromptCaches`); the prefill
  then runs only what follows them (the prompt's last token and the verified tokens).
- **A decode loop that drops finished rows** (:func:`greedy_generate`): a row that emits a stop token or reaches its
  length stops being read; once half the batch has finished, the finished rows leave it and its key/value cache
  (each compaction copies the cache, so it is not done at every finish), and a batch ends when its longest row
  does. A small model decodes more rows at once than ``batch_size`` when their cache fits in
  :data:`DECODE_BYTES`: on a CPU a decode step of such a model costs little more for 128 rows than for 32.
  When there are several batches, each stops with its last few rows still live (:data:`PARK_AT`); their keys and
  values are copied out and they decode together at the end, so those rows' long tails share their steps.

What is computed equals greedy decoding within float rounding; whether rounding flips a near-tied argmax is
checked, not assumed: ``experiments/benchmarks/eval_throughput.py`` and ``tests/test_prompt_cache.py`` compare
every generation with ``model.generate``'s. Generation settings that change the argmax (a repetition penalty,
forced or suppressed tokens, a minimum length; :func:`plain_greedy_problem`) rule these savings out, and the caller
falls back to ``model.generate``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from baldro_lightning.data.tokenization import AttentionFrom
from baldro_lightning.evaluation import metrics
from baldro_lightning.evaluation.engine import (
    AnswerExample,
    Engine,
    ExampleScore,
    _input_device,
    _report,
    _synced_count,
    generation_pad_id,
)
from baldro_lightning.evaluation.model_calls import ModelCalls, PromptCache, prompt_cache_problem, row_prompt_cache

ARGMAX_CHANGING_SETTINGS: dict[str, object] = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "forced_decoder_ids": None,
}
"""Generation-config fields whose non-neutral values make ``generate``'s greedy token differ from the argmax of the
logits (each with its neutral value)."""


def plain_greedy_problem(model: nn.Module) -> str | None:
    """Which of the model's generation settings make greedy decoding more than an argmax; ``None`` when none do."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return None
    changed = [
        f"{name}={getattr(config, name)!r}"
        for name, neutral in ARGMAX_CHANGING_SETTINGS.items()
        if getattr(config, name, neutral) not in (neutral, None, [], 0, 1.0)
    ]
    return f"its generation config sets {', '.join(changed)}" if changed else None


def choose_engines(
    engine: Engine, model: nn.Module, attention_from: AttentionFrom = "lengths"
) -> tuple[bool, bool, str | None]:
    """Whether scoring and generation run on the prompt-cache engine, and why not where they cannot.

    ``attention_from="pad_ids"`` (the reference's mask, which also hides real tokens equal to the pad id) rules the
    prompt cache out: it attends to every token it computes.

    Returns:
        ``(cached scoring, cached generation, note)``: both False for ``per_example``; the note (for ``meta.notes``)
        says which part falls back and why when the model rules the engine out (:func:`prompt_cache_problem`,
        :func:`plain_greedy_problem`).
    """
    if engine == "per_example":
        return False, False, None
    if attention_from == "pad_ids":
        return False, False, "engine per_example: attention_from=pad_ids masks tokens the prompt cache would attend to"
    problem = prompt_cache_problem(model)
    if problem is not None:
        return False, False, f"engine per_example: {problem}"
    problem = plain_greedy_problem(model)
    if problem is not None:
        return True, False, f"generation with model.generate: {problem}"
    return True, True, None


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The ids that end a generation: the generation config's EOS ids, as ``generate`` uses them.

    The tokenizer's EOS is the fallback for a model without a generation config or without an EOS id in it.
    """
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    return frozenset(int(i) for i in ids)


@dataclass(frozen=True)
class Draft:
    """A scored continuation of a prompt, checked against the model's own argmax."""

    tokens: Sequence[int]
    """(m,) the ids that follow the prompt in the scored example."""
    predicted: np.ndarray
    """(m,) the teacher-forced argmax at each of those positions (after the prompt and each earlier token)."""


def draft_of(prompt: Sequence[int], example: AnswerExample, score: ExampleScore) -> Draft | None:
    """The draft an example gives for greedy generation from ``prompt``; ``None`` when it gives none.

    It gives one when it asked for a draft, its ids start with the prompt and every later position is labelled
    (so the argmax is known at each of them).
    """
    cut = len(prompt)
    if score.greedy_ids is None or list(example.input_ids[:cut]) != list(prompt):
        return None
    tokens = example.input_ids[cut:]
    if len(score.greedy_ids) != len(tokens) or any(label == -100 for label in example.labels[cut:]):
        return None
    return Draft(tokens, score.greedy_ids)


def verified_tokens(drafts: Sequence[Draft], stops: Collection[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """The greedy tokens the drafts prove, and whether they end the generation.

    Walking a draft: the argmax at position j is the j-th greedy token as long as the tokens before it are the
    draft's; it is kept, and the walk stops after it if it differs from the draft's token (the sequences part),
    is a stop token, or is the ``max_new_tokens``-th token. Each draft proves a prefix of the same greedy sequence,
    so the longest is taken.

    Example: draft tokens ``[7, 8, 2]`` with argmax ``[7, 9, 4]`` prove ``[7, 9]`` (7 agrees; 9 is the greedy token
    after 7, where the draft has 8), not finished; with argmax ``[7, 8, 2]`` and stop id 2 they prove ``[7, 8, 2]``,
    finished.

    Returns:
        ``(tokens, finished)``; ``finished`` when the last token is a stop token or there are ``max_new_tokens``.
    """
    best: tuple[list[int], bool] = ([], False)
    for draft in drafts:
        known: list[int] = []
        finished = False
        for target, predicted in zip(draft.tokens, draft.predicted.tolist(), strict=True):
            known.append(int(predicted))
            if predicted in stops or len(known) >= max_new_tokens:
                finished = True
                break
            if predicted != target:
                break
        if (len(known), finished) > (len(best[0]), best[1]):
            best = (known, finished)
    return best


def _all_ranks_done(done: bool, device: torch.device) -> bool:
    flag = torch.tensor([0 if done else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return int(flag.item()) == 0


COMPACT_AT = 0.5
"""A decode batch drops its finished rows from the cache once at most this fraction of its rows are still live."""

PARK_AT = 0.125
"""When there is more than one decode batch, a batch stops once at most this fraction of its rows are still live,
and those rows are parked: their keys and values are copied out and they decode together with the other batches'
parked rows at the end. A decode step costs about as much for a few rows as for many (its fixed part: the layers'
Python and kernel launches, every weight read once), so a batch's last few rows would otherwise spend most of its
steps."""

PARK_BYTES = 2**28
"""Keys and values the parked rows of one generation may hold: a batch parks only rows that still fit, and otherwise
runs to its end (a large model's rows are large, so it parks few)."""


class _Batch:
    """Rows decoding together: their cache, attention mask, next positions and what each has generated."""

    def __init__(
        self,
        calls: ModelCalls,
        model: nn.Module,
        starts: Sequence[Sequence[int]],
        budgets: list[int],
        stops: Collection[int],
        pad: int,
        device: torch.device,
        cached: Sequence[PromptCache | None] = (),
    ) -> None:
        # Row i's first cuts[i] tokens come from its prompt cache (left-aligned in the past slots); the rest run in
        # this prefill, left-padded so that every row's last token is the last column.
        cuts = [len(c.tokens) if c is not None else 0 for c in cached] or [0] * len(starts)
        past_length = max(cuts)
        rests = [list(start[cut:]) for start, cut in zip(starts, cuts, strict=True)]
        length = max(len(r) for r in rests)
        ids = torch.full((len(starts), length), pad, dtype=torch.long)
        mask = torch.zeros((len(starts), past_length + length), dtype=torch.long)
        for i, (rest, cut) in enumerate(zip(rests, cuts, strict=True)):
            ids[i, length - len(rest) :] = torch.as_tensor(rest, dtype=torch.long)
            mask[i, :cut] = 1
            mask[i, past_length + length - len(rest) :] = 1
        self.mask = mask.to(device)
        positions = (self.mask.cumsum(-1)[:, past_length:] - 1).clamp_min(0)
        self.calls, self.model, self.stops = calls, model, stops
        past = None
        if past_length:
            past = calls.buffers(model, len(starts), past_length + length + max(budgets))
            for keys, values in past:
                # Masked slots must still be finite: attention scores them before the mask, and NaN * 0 is NaN.
                keys[:, :, :past_length] = 0
                values[:, :, :past_length] = 0
            for i, prompt in enumerate(cached):
                if prompt is not None:
                    for (keys, values), (k, v) in zip(past, prompt.layers, strict=True):
                        keys[i, :, : cuts[i]] = k
                        values[i, :, : cuts[i]] = v
        logits, self.cache = calls.start(
            model, ids.to(device), self.mask, positions, max(budgets), past=past, past_length=past_length
        )
        self.next_position = positions[:, -1] + 1
        self.starts = starts
        self.kv_bytes = calls.kv_bytes_per_token(model)
        self.rows = list(range(len(starts)))  # batch row -> caller's row, for the rows still generating
        self.budgets = budgets
        self.generated: list[list[int]] = [[] for _ in starts]
        self.live = [True] * len(starts)  # per batch row: still generating
        self._take(logits)

    def _take(self, logits: Tensor) -> None:
        tokens = logits.argmax(-1)
        for k, token in enumerate(tokens.tolist()):
            if not self.live[k]:
                continue
            row = self.rows[k]
            self.generated[row].append(token)
            if token in self.stops or len(self.generated[row]) >= self.budgets[row]:
                self.live[k] = False
        self.tokens = tokens
        live = [k for k, alive in enumerate(self.live) if alive]
        # Compacting copies every cached slot of the kept rows, so it waits until half the rows have finished;
        # until then a finished row rides along (its outputs unread), which costs less than a copy per finish.
        if live and len(live) <= COMPACT_AT * len(self.rows):
            index = torch.tensor(live, dtype=torch.long, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.next_position, self.tokens = self.mask[index], self.next_position[index], tokens[index]
            self.rows = [self.rows[k] for k in live]
            self.live = [True] * len(live)

    @property
    def active(self) -> bool:
        return any(self.live)

    def parkable(self, rows: float, room: int) -> bool:
        """Whether at most ``rows`` rows are live and their keys and values take at most ``room`` bytes."""
        if sum(self.live) > rows:
            return False
        live = torch.tensor(self.live, device=self.mask.device)
        return int(self.mask[live].sum()) * self.kv_bytes <= room

    def park(self) -> dict[int, PromptCache]:
        """Stop: per live row (by its index in ``starts``), the keys and values of its start and of what it
        generated, all but its last token (which has not run yet), to go on from in another batch."""
        parked = {}
        for k, alive in enumerate(self.live):
            if alive:
                row = self.rows[k]
                slots = self.mask[k].nonzero().squeeze(1)
                tokens = [*self.starts[row], *self.generated[row][:-1]]
                parked[row] = row_prompt_cache(self.cache, k, slots, tokens)
                self.live[k] = False
        return parked

    def step(self) -> None:
        live = torch.tensor(self.live, device=self.mask.device)
        # A finished row's new slot is masked and its position does not advance: whatever it computes stays out of
        # every other row and no position grows past what its generation used.
        self.mask = torch.cat([self.mask, live.long().unsqueeze(1)], dim=1)
        logits = self.calls.step(
            self.model, self.tokens.unsqueeze(1), self.mask, self.next_position.unsqueeze(1), self.cache
        )
        self.next_position = self.next_position + live.long()
        self._take(logits)


def _usable(cache: PromptCache | None, start: Sequence[int]) -> PromptCache | None:
    """``cache`` when its tokens begin ``start`` and leave at least one token to run; else ``None``."""
    if cache is None or len(cache.tokens) >= len(start) or tuple(start[: len(cache.tokens)]) != cache.tokens:
        return None
    return cache


DECODE_BYTES = 2**28
"""Key/value cache a decode batch may fill beyond ``batch_size`` rows: a small model decodes many more rows at once
(each step costs about as much for 32 rows as for 128 on a CPU), a large one stays at ``batch_size``."""


def decode_rows(
    kv_bytes_per_token: int,
    batch_size: int,
    open_rows: Sequence[int],
    prompts: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]],
    max_new_tokens: int,
) -> int:
    """Rows per decode batch: ``batch_size``, or as many as fill :data:`DECODE_BYTES` if that is more.

    A row's cache holds its prompt, its verified tokens and ``max_new_tokens`` more; the longest open row sets the
    size. Example: 8 KiB per token and a longest row of 56 + 200 slots make 2 MiB per row, so 128 rows fill 256 MiB.
    """
    if not open_rows:
        return batch_size
    slots = max(len(prompts[i]) + len(generated[i]) for i in open_rows) + max_new_tokens
    return max(batch_size, DECODE_BYTES // (kv_bytes_per_token * slots))


def _decode(
    batch: _Batch | None,
    calls: ModelCalls,
    model: nn.Module,
    pad: int,
    device: torch.device,
    synced_gpus: bool,
    park_at: float,
    park_room: int,
) -> None:
    """Step ``batch`` until its rows finish, or until they can be parked (:meth:`_Batch.parkable`: at most
    ``park_at`` rows live, within ``park_room`` bytes); ``None`` (a rank with no batch left) runs dummy forwards
    while other ranks step. Ranks agree before every step on whether any still steps."""
    while True:
        active = batch is not None and batch.active and not batch.parkable(park_at, park_room)
        if synced_gpus and dist.is_available() and dist.is_initialized():
            if _all_ranks_done(not active, device):
                break
        elif not active:
            break
        if active:
            batch.step()
        else:
            calls.dummy_forward(model, pad, device)


def greedy_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    batch_size: int,
    max_new_tokens: int,
    synced_gpus: bool = False,
    stop_strings: Sequence[str] = (),
    drafts: Sequence[Sequence[Draft]] | None = None,
    prompt_caches: Sequence[PromptCache | None] | None = None,
) -> list[str]:
    """Greedy continuations of prompts, as :func:`~baldro_lightning.evaluation.engine.generate_answers` returns them.

    Rows are sorted by length and decoded ``batch_size`` at a time, or more when their cache fits in
    :data:`DECODE_BYTES` (:func:`decode_rows`); each stops at a stop token
    (:func:`stop_token_ids`) or after ``max_new_tokens`` and leaves its batch. Only the new tokens are decoded
    (special tokens skipped), then cut with :func:`metrics.clean_generation`.

    Args:
        model: A causal LM whose generation is a plain argmax (:func:`plain_greedy_problem`) and whose layers all
            keep key/value caches; call in eval mode under ``torch.no_grad()``. When sharded (FSDP2), every rank
            calls this with ``synced_gpus=True``: ranks agree on the number of batches before the first forward and
            on whether any rank still decodes before every step, and idle ranks run dummy forwards meanwhile.
        tokenizer: Its tokenizer (``pad_token_id`` must be set).
        prompts: Token ids of each prompt.
        batch_size: Rows per decode batch, at least.
        max_new_tokens: Most generated tokens per prompt.
        synced_gpus: Keep sharded ranks in lockstep.
        stop_strings: Cut each text at these strings, in order.
        drafts: Per prompt, scored continuations whose verified tokens are taken as generated (:func:`draft_of`).
        prompt_caches: Per prompt, keys and values of its first tokens that scoring computed
            (:class:`~baldro_lightning.evaluation.model_calls.PromptCaches`); a prefill runs only the tokens after
            them. One whose tokens are not a proper prefix of the prompt is not used.

    Returns:
        One cleaned text per prompt, in the order of ``prompts``.
    """
    pad = generation_pad_id(tokenizer, batch_size, max_new_tokens)
    calls = ModelCalls.of(model)
    device = _input_device(model)
    stops = stop_token_ids(model, tokenizer)
    generated: list[list[int]] = []
    open_rows = []
    for i in range(len(prompts)):
        known, finished = verified_tokens(drafts[i] if drafts is not None else (), stops, max_new_tokens)
        generated.append(known)
        if not finished:
            open_rows.append(i)
    cached = [
        _usable(prompt_caches[i], list(prompts[i]) + generated[i]) if prompt_caches else None
        for i in range(len(prompts))
    ]
    cuts = [len(c.tokens) if c is not None else 0 for c in cached]
    # A batch spans its longest cached part plus its longest part to run (the two are separate column blocks), so
    # rows are grouped by the length to run first and the cached length second; without caches: by length.
    open_rows.sort(key=lambda i: (len(prompts[i]) + len(generated[i]) - cuts[i], cuts[i]), reverse=True)
    rows = decode_rows(calls.kv_bytes_per_token(model), batch_size, open_rows, prompts, generated, max_new_tokens)
    batches = [open_rows[k : k + rows] for k in range(0, len(open_rows), rows)]
    done = len(prompts) - len(open_rows)  # the drafts finished these
    _report("generating", done, len(prompts))

    def decode(
        batches: list[list[int]], caches: Mapping[int, PromptCache] | Sequence[PromptCache | None], park_at: float
    ) -> dict[int, PromptCache]:
        """Decode ``batches`` of rows from their ``caches``; the rows each batch parks (at ``park_at``) and their
        keys and values."""
        nonlocal done
        parked: dict[int, PromptCache] = {}
        room = PARK_BYTES
        for b in range(_synced_count(len(batches), device, synced_gpus)):  # before any forward, as in scoring
            batch = None
            if b < len(batches):
                starts = [list(prompts[i]) + generated[i] for i in batches[b]]
                budgets = [max_new_tokens - len(generated[i]) for i in batches[b]]
                batch = _Batch(calls, model, starts, budgets, stops, pad, device, [caches[i] for i in batches[b]])
            else:
                calls.dummy_forward(model, pad, device)
            _decode(batch, calls, model, pad, device, synced_gpus, park_at * len(batches[b]) if batch else 0, room)
            if batch is not None:
                stopped = {batches[b][k]: cache for k, cache in batch.park().items()}
                room -= sum(len(cache.tokens) for cache in stopped.values()) * batch.kv_bytes
                for k, i in enumerate(batches[b]):
                    generated[i] += batch.generated[k]
                parked |= stopped
                done += len(batches[b]) - len(stopped)
                _report("generating", done, len(prompts))
        return parked

    parked = decode(batches, cached, PARK_AT if len(batches) > 1 else 0.0)
    # The parked rows keep their order (longest to run first), so each of their batches spans similar lengths.
    order = [i for i in open_rows if i in parked]
    decode([order[k : k + rows] for k in range(0, len(order), rows)], parked, 0.0)
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [metrics.clean_generation(text, stop_strings) for text in texts]
