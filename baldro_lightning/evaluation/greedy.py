"""Greedy generation: tokens known from verified drafts, then a decode loop that drops finished rows.

Two savings over one ``model.generate`` per batch (:func:`~baldro_lightning.evaluation.engine.generate_answers`),
both exact for greedy decoding:

- **Verified drafts.** Scoring an answer teacher-forced already computes the model's argmax after the prompt and
  after every prefix of that answer. Greedy decoding follows the argmax, so as long as the argmax equals the next
  answer token, the generation *is* the answer; at the first position where it differs, the argmax is the next
  generated token (:func:`verified_tokens`). A model that reproduces an answer (a target model on its training
  data, any model on easy questions) needs no decoding step at all for that row; one that departs after k tokens
  starts decoding after them, from one prefill forward.
- **A decode loop that drops finished rows** (:func:`greedy_generate`): a row that emits a stop token or reaches its
  length leaves the batch and its key/value cache, so later steps run only the rows still generating, and a batch
  ends when its longest row does.

What is computed equals greedy decoding within float rounding; whether rounding flips a near-tied argmax is
checked, not assumed: ``experiments/benchmarks/eval_throughput.py`` and ``tests/test_fast_evaluation.py`` compare
every generation with ``model.generate``'s. Generation settings that change the argmax (a repetition penalty,
forced or suppressed tokens, a minimum length; :func:`plain_greedy_problem`) rule both savings out, and the caller
falls back to ``model.generate``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
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
from baldro_lightning.evaluation.model_calls import ModelCalls, prompt_cache_problem

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
    ) -> None:
        length = max(len(s) for s in starts)
        ids = torch.full((len(starts), length), pad, dtype=torch.long)
        mask = torch.zeros((len(starts), length), dtype=torch.long)
        for i, start in enumerate(starts):
            ids[i, length - len(start) :] = torch.as_tensor(list(start), dtype=torch.long)
            mask[i, length - len(start) :] = 1
        self.mask = mask.to(device)
        positions = (self.mask.cumsum(-1) - 1).clamp_min(0)
        self.calls, self.model, self.stops = calls, model, stops
        logits, self.cache = calls.start(model, ids.to(device), self.mask, positions, max(budgets))
        self.next_position = positions[:, -1] + 1
        self.rows = list(range(len(starts)))  # batch row -> caller's row, for the rows still generating
        self.budgets = budgets
        self.generated: list[list[int]] = [[] for _ in starts]
        self._take(logits)

    def _take(self, logits: Tensor) -> None:
        tokens = logits.argmax(-1)
        keep = []
        for k, token in enumerate(tokens.tolist()):
            row = self.rows[k]
            self.generated[row].append(token)
            if not (token in self.stops or len(self.generated[row]) >= self.budgets[row]):
                keep.append(k)
        self.tokens = tokens
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
            if keep:
                self.cache.batch_select_indices(index)
            self.mask, self.next_position, self.tokens = self.mask[index], self.next_position[index], tokens[index]
            self.rows = [self.rows[k] for k in keep]

    @property
    def active(self) -> bool:
        return bool(self.rows)

    def step(self) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits = self.calls.step(
            self.model, self.tokens.unsqueeze(1), self.mask, self.next_position.unsqueeze(1), self.cache
        )
        self.next_position = self.next_position + 1
        self._take(logits)


def greedy_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    batch_size: int,
    max_new_tokens: int,
    synced_gpus: bool = False,
    stop_strings: Sequence[str] = (),
    drafts: Sequence[Sequence[Draft]] | None = None,
) -> list[str]:
    """Greedy continuations of prompts, as :func:`~baldro_lightning.evaluation.engine.generate_answers` returns them.

    Rows are sorted by length and decoded ``batch_size`` at a time; each stops at a stop token
    (:func:`stop_token_ids`) or after ``max_new_tokens`` and leaves its batch. Only the new tokens are decoded
    (special tokens skipped), then cut with :func:`metrics.clean_generation`.

    Args:
        model: A causal LM whose generation is a plain argmax (:func:`plain_greedy_problem`) and whose layers all
            keep key/value caches; call in eval mode under ``torch.no_grad()``. When sharded (FSDP2), every rank
            calls this with ``synced_gpus=True``: ranks agree on the number of batches before the first forward and
            on whether any rank still decodes before every step, and idle ranks run dummy forwards meanwhile.
        tokenizer: Its tokenizer (``pad_token_id`` must be set).
        prompts: Token ids of each prompt.
        batch_size: Most rows per decode batch.
        max_new_tokens: Most generated tokens per prompt.
        synced_gpus: Keep sharded ranks in lockstep.
        stop_strings: Cut each text at these strings, in order.
        drafts: Per prompt, scored continuations whose verified tokens are taken as generated (:func:`draft_of`).

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
    open_rows.sort(key=lambda i: len(prompts[i]) + len(generated[i]), reverse=True)
    batches = [open_rows[k : k + batch_size] for k in range(0, len(open_rows), batch_size)]
    done = len(prompts) - len(open_rows)  # the drafts finished these
    _report("generating", done, len(prompts))
    count = _synced_count(len(batches), device, synced_gpus)  # before any forward, as in score_examples
    for b in range(count):
        batch = None
        if b < len(batches):
            rows = batches[b]
            starts = [list(prompts[i]) + generated[i] for i in rows]
            budgets = [max_new_tokens - len(generated[i]) for i in rows]
            batch = _Batch(calls, model, starts, budgets, stops, pad, device)
        else:
            calls.dummy_forward(model, pad, device)
        while True:
            active = batch is not None and batch.active
            if synced_gpus and dist.is_available() and dist.is_initialized():
                if _all_ranks_done(not active, device):
                    break
            elif not active:
                break
            if active:
                batch.step()
            else:
                calls.dummy_forward(model, pad, device)
        if batch is not None:
            for k, i in enumerate(batches[b]):
                generated[i] += batch.generated[k]
            done += len(batches[b])
            _report("generating", done, len(prompts))
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [metrics.clean_generation(text, stop_strings) for text in texts]
