r"""The batched scoring engine every evaluator shares: likelihoods, generations, per-row values, whole runs.

- :func:`score_examples` scores many (prompt, answer) :class:`AnswerExample`\ s in padded forwards of
  length-sorted examples and returns an :class:`ExampleScore` each (mean NLL, and on request the per-token values
  MinK, MinK++, ES and EM need).
- :func:`generate_answers` generates greedily for many prompts in left-padded, length-sorted batches.
- :func:`reporting_progress` lets a caller watch both, batch by batch (the in-training evaluation's progress bar).
- :func:`collector_paused` keeps Python's cyclic garbage collector off for one evaluation pass.
- :class:`RowScores` holds an evaluator's per-row values of one split (plain numbers and strings, nothing
  model-sized), so ranks can score disjoint rows (:func:`shard_rows`) and join them (:meth:`RowScores.concat`).
- :func:`nan_mean`, :func:`values_by_index` and :func:`mia_entries` build ``eval.json`` entries from per-row values;
  they are here, not in one benchmark's module, because TOFU and MUSE build their MIA and memorisation entries the
  same way.
- :class:`BenchmarkEvaluator` is what the TOFU and MUSE evaluators share: provenance (``meta``), a whole evaluation
  and writing it (through :mod:`~baldro_lightning.evaluation.run_record`).

Every forward and generation is sorted by length, so short and long examples are not padded to each other's
length and no forward is spent on one example at a time. Token statistics are computed from each batch's logits
and only per-position numbers are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

import numpy as np
import torch
import torch.distributed as dist
import transformers
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

import baldro_lightning
from baldro_lightning.data.tokenization import AttentionFrom, collate
from baldro_lightning.evaluation import metrics
from baldro_lightning.evaluation.run_record import write_eval_json
from baldro_lightning.train.logprobs import sequence_logprobs

log = logging.getLogger(__name__)

MINK_FRACTION = 0.4
"""Fraction k of lowest-scoring tokens kept by MinK and MinK++ (methods §3.6)."""

GENERATION_NOTE = "greedy, left-padded prompts, new tokens decoded without special tokens, stripped"
"""How every evaluator generates (recorded in ``meta.generation``)."""

Engine = Literal["prompt_cache", "per_example"]
"""How an evaluator runs the model. ``prompt_cache``: examples grouped by prompt, each distinct prefix (the prompt,
a stretch several answers share) computed once (:mod:`~baldro_lightning.evaluation.prefix_scoring`), and greedy
generation that takes the tokens the scored answers prove and decodes the rest dropping finished rows
(:mod:`~baldro_lightning.evaluation.greedy`). ``per_example``: :func:`score_examples` and :func:`generate_answers`,
one padded forward per batch of whole examples and ``model.generate`` per batch of prompts (the evaluator before
issue 18, kept as the reference the other is checked against)."""


# --------------------------------------------------------------------------------------------------------------
# Forward passes and generation


@dataclass(frozen=True)
class AnswerExample:
    """One (prompt, answer) pair to score by likelihood."""

    input_ids: list[int]
    """(T,) prompt, answer and EOS tokens."""
    labels: list[int]
    """(T,) ``-100`` on the prompt, the token ids on the answer and EOS."""
    token_stats: bool = False
    """Also return per-token log-probs, argmax predictions and MinK++ moments of the answer."""
    draft: bool = False
    """Also return the teacher-forced argmax at every labelled position (``ExampleScore.greedy_ids``), a verified
    draft of the greedy generation from the prompt; computed by
    :func:`~baldro_lightning.evaluation.prefix_scoring.score_groups` only."""


@dataclass(frozen=True)
class ExampleScore:
    """Likelihood statistics of one :class:`AnswerExample`.

    Token-level arrays cover the answer positions **excluding the last labelled token** (the EOS the reference
    drops for MinK, MinK++, ES and EM, methods §3.1b); they are ``None`` unless the example asked for them.
    """

    nll_mean: float
    """Mean NLL over all labelled tokens, EOS included (methods §3.1a); NaN for an example without labels (no answer
    token left after truncation), which the evaluators leave out of their aggregates."""
    token_logps: np.ndarray | None = None
    """(n,) fp32 log-prob of each target token."""
    pred_ids: np.ndarray | None = None
    """(n,) teacher-forced argmax prediction at each position."""
    target_ids: np.ndarray | None = None
    """(n,) the target token at each position."""
    mu: np.ndarray | None = None
    """(n,) mean of log p under the model's next-token distribution (MinK++)."""
    sigma2: np.ndarray | None = None
    """(n,) variance of log p under that distribution (MinK++)."""
    greedy_ids: np.ndarray | None = None
    """(m,) teacher-forced argmax at every labelled position, EOS included (for examples that asked for a draft)."""


def _input_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _synced_count(count: int, device: torch.device, synced_gpus: bool) -> int:
    """The largest ``count`` over ranks when ``synced_gpus`` (so every rank runs as many sharded forwards).

    A collective: every rank calls it before its first forward, never between forwards.
    """
    if not (synced_gpus and dist.is_available() and dist.is_initialized()):
        return count
    value = torch.tensor([count], device=device, dtype=torch.long)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[start : start + size]) for start in range(0, len(order), size)]


Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: called after every batch of a phase (``"scoring"`` or ``"generating"``)."""

_PROGRESS: ContextVar[Progress | None] = ContextVar("baldro_evaluation_progress", default=None)


@contextlib.contextmanager
def reporting_progress(progress: Progress | None) -> Iterator[None]:
    """Within the block, :func:`score_examples` and :func:`generate_answers` report each batch to ``progress``.

    A context rather than an argument, so that the evaluators between the caller and the engine need not pass it on.
    """
    token = _PROGRESS.set(progress)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off within the block (one evaluation pass), then as it was before.

    A pass allocates tens of thousands of containers that live until the pass ends (token lists, examples, plan
    segments) and are then freed by reference counting. With the collector on, they outlive its young generations
    and count towards a full collection, which the embedded evaluation triggered every second pass: a scan of every
    object in the process (500,000 after importing torch and transformers; 0.26-0.30 s on one core of the
    development VM, an eighth of a pass on two threads). A pass makes no reference cycles (0 unreachable objects
    after one with the collector off; ``tests/test_prompt_cache.py`` checks it), so pausing defers no garbage.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _report(phase: str, done: int, total: int) -> None:
    progress = _PROGRESS.get()
    if progress is not None:
        progress(phase, done, total)


def score_examples(
    model: nn.Module,
    examples: Sequence[AnswerExample],
    batch_size: int,
    pad_token_id: int,
    synced_gpus: bool = False,
    attention_from: AttentionFrom = "lengths",
) -> list[ExampleScore]:
    """Likelihood statistics of many examples, in right-padded forwards of ``batch_size`` length-sorted examples.

    The caller puts the model in eval mode under ``torch.no_grad()`` (see
    :func:`baldro_lightning.train.models.eval_mode`). Logits live only for one batch: MinK++ moments are reduced
    from them chunk by chunk and then dropped.

    Args:
        model: A causal LM returning ``.logits`` (B, T, V); may be sharded (FSDP2), in which case every rank must
            call this function and ``synced_gpus`` must be True.
        examples: The examples, in any order.
        batch_size: Examples per forward.
        pad_token_id: Id written into padded positions (masked by the attention mask built from lengths).
        synced_gpus: Pad this rank's number of forwards to the largest over ranks with dummy forwards, so that
            sharded parameters are gathered in lockstep when ranks hold different numbers of rows.
        attention_from: The attention mask: ``lengths`` or the reference's ``pad_ids`` (methods P-14; parity runs).

    Returns:
        One :class:`ExampleScore` per example, in the order of ``examples``.
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    device = _input_device(model)
    # Longest first: a batch that does not fit in memory fails at once, not at the end of the split.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids), reverse=True)
    batches = _batches(order, batch_size)
    # Agreed before any forward: a rank asking later would meet the others' FSDP all-gathers and deadlock.
    forwards = _synced_count(len(batches), device, synced_gpus)
    results: list[ExampleScore | None] = [None] * len(examples)
    done = 0
    for batch_rows in batches:
        items = [{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in batch_rows]
        batch = collate(items, pad_token_id, padding_side="right", attention_from=attention_from)
        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
        stats = sequence_logprobs(logits, labels)
        # 0/0 for an example without labels, as in open-unlearning: NaN, never a loss of 0 that would pass for one.
        nll = torch.where(stats.count > 0, stats.nll_mean, torch.nan).float().cpu().tolist()
        need = torch.tensor([examples[i].token_stats for i in batch_rows], device=device)
        token_parts: list[dict[str, np.ndarray]] | None = None
        if bool(need.any()):
            token_parts = _token_statistics(logits, labels, stats.token_logps, stats.mask, need)
        for position, i in enumerate(batch_rows):
            extra = token_parts[position] if token_parts is not None and examples[i].token_stats else {}
            results[i] = ExampleScore(nll_mean=float(nll[position]), **extra)
        del logits, stats
        done += len(batch_rows)
        _report("scoring", done, len(examples))
    for _ in range(forwards - len(batches)):
        dummy = torch.full((1, 2), pad_token_id, dtype=torch.long, device=device)
        model(input_ids=dummy, attention_mask=torch.ones_like(dummy), use_cache=False)
    return cast(list[ExampleScore], results)


def _token_statistics(
    logits: Tensor, labels: Tensor, token_logps: Tensor, mask: Tensor, need: Tensor
) -> list[dict[str, np.ndarray]]:
    """Per-row token arrays over the labelled positions minus the last one (the EOS), for rows in ``need``.

    Args:
        logits: (B, T, V) batch logits.
        labels: (B, T) labels.
        token_logps: (B, T-1) target log-probs from :func:`sequence_logprobs`.
        mask: (B, T-1) labelled shifted positions.
        need: (B,) bool, rows that want token statistics.

    Returns:
        One dict per row with ``token_logps``, ``pred_ids``, ``target_ids``, ``mu``, ``sigma2`` (empty arrays for
        rows that did not ask).
    """
    count = mask.sum(-1, keepdim=True)
    last = mask & (mask.cumsum(-1) == count)
    keep = mask & ~last & need.unsqueeze(-1)  # (B, T-1)
    shifted = logits[:, :-1, :]
    picked = shifted[keep]  # (N, V): only the positions asked for, never a (B, T, V) fp32 copy
    mu, sigma2 = metrics.min_k_plus_plus_stats(picked, from_logits=True)
    pred = picked.argmax(-1)
    del picked
    lengths = keep.sum(-1).tolist()
    columns = {
        "token_logps": token_logps[keep].float().cpu().numpy(),
        "pred_ids": pred.cpu().numpy(),
        "target_ids": labels[:, 1:][keep].cpu().numpy(),
        "mu": mu.cpu().numpy(),
        "sigma2": sigma2.cpu().numpy(),
    }
    splits = np.cumsum(lengths)[:-1]
    per_row = {name: np.split(values, splits) for name, values in columns.items()}
    return [{name: per_row[name][row] for name in columns} for row in range(len(lengths))]


def position_budget_problem(longest_prompt: int, max_new_tokens: int, max_positions: int | None) -> str | None:
    """Why a generation would run past the model's positions, or None when it fits (or the model sets no limit).

    Example: a 71-token prompt + 200 new tokens = 271 positions > a tiny Llama's 256, so generated answers would
    reach positions the model never saw in training.
    """
    if max_positions is None or longest_prompt + max_new_tokens <= max_positions:
        return None
    return (
        f"max_new_tokens={max_new_tokens}: the longest prompt ({longest_prompt} tokens) + {max_new_tokens} new tokens "
        f"= {longest_prompt + max_new_tokens} positions, more than the model's max_position_embeddings="
        f"{max_positions}, so answers run past the lengths it was trained on; lower --max_new_tokens (in-training "
        f"evaluation: settings.max_new_tokens) to at most {max(max_positions - longest_prompt, 0)}, or use a model "
        "made for longer sequences (python -m baldro_lightning embedded-models --max-position-embeddings N)"
    )


def generation_pad_id(tokenizer: PreTrainedTokenizerBase, batch_size: int, max_new_tokens: int) -> int:
    """The pad id a greedy generation pads prompts with, after checking the generation's sizes.

    Raises:
        ValueError: ``batch_size`` or ``max_new_tokens`` below 1, or a tokenizer without a pad token.
    """
    if batch_size < 1:
        raise ValueError(f"--generation_batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token; load it with load_tokenizer()")
    return int(tokenizer.pad_token_id)


def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    batch_size: int,
    max_new_tokens: int,
    synced_gpus: bool = False,
    stop_strings: Sequence[str] = (),
    attention_from: AttentionFrom = "lengths",
) -> list[str]:
    """Greedy continuations of prompts, in left-padded batches of length-sorted prompts (methods §3.1c).

    Only the new tokens are decoded (special tokens skipped), then cut with :func:`metrics.clean_generation`.
    Generation stops at the model's generation-config EOS ids or after ``max_new_tokens``.

    Args:
        model: A causal LM with ``.generate``; call in eval mode under ``torch.no_grad()``.
        tokenizer: Its tokenizer (``pad_token_id`` must be set, see ``load_tokenizer``).
        prompts: Token ids of each prompt (e.g. from :func:`~baldro_lightning.data.tokenization.encode_prompt`).
        batch_size: Prompts per ``generate`` call.
        max_new_tokens: Most generated tokens per prompt (200 for TOFU).
        synced_gpus: Passed to ``generate`` for sharded models; ranks with fewer batches run dummy calls so that
            every rank calls ``generate`` equally often.
        stop_strings: Cut each text at these strings, in order (none for TOFU).
        attention_from: The prompts' attention mask: ``lengths`` or the reference's ``pad_ids`` (methods P-14).

    Returns:
        One cleaned text per prompt, in the order of ``prompts``.
    """
    pad = generation_pad_id(tokenizer, batch_size, max_new_tokens)
    device = _input_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    batches = _batches(order, batch_size)
    texts: list[str] = [""] * len(prompts)
    options = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": pad, "use_cache": True}
    calls = _synced_count(len(batches), device, synced_gpus)  # before any generate, as in score_examples
    config = getattr(model, "config", None)
    problem = position_budget_problem(
        max((len(p) for p in prompts), default=0), max_new_tokens, getattr(config, "max_position_embeddings", None)
    )
    if problem:
        # A warning, not an error: rotary models still generate there (MUSE's verbatim prompts alone can exceed an
        # embedded model's positions), but the answers leave the lengths the model was trained on.
        warnings.warn(problem, stacklevel=2)
    done = 0
    for batch_rows in batches:
        items = [{"input_ids": list(prompts[i])} for i in batch_rows]
        batch = collate(items, pad, padding_side="left", attention_from=attention_from)
        input_ids = batch["input_ids"].to(device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"].to(device),
            synced_gpus=synced_gpus,
            **options,
        )
        decoded = tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
        for i, text in zip(batch_rows, decoded, strict=True):
            texts[i] = metrics.clean_generation(text, stop_strings)
        done += len(batch_rows)
        _report("generating", done, len(prompts))
    for _ in range(calls - len(batches)):
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        dummy = torch.tensor([[start]], dtype=torch.long, device=device)
        model.generate(input_ids=dummy, attention_mask=torch.ones_like(dummy), synced_gpus=True, **options)
    return texts


# --------------------------------------------------------------------------------------------------------------
# Per-row values


@dataclass
class RowScores:
    """Per-row values of one split; every column is aligned with ``indices``.

    TOFU's columns (:class:`~baldro_lightning.evaluation.tofu.TofuEvaluator`, present as its plan asks):
    ``answer_nll``, ``para_nll``, ``pert_nll`` (list of K), ``mia_loss``, ``mia_zlib``, ``mia_min_k``,
    ``mia_min_k_plus_plus``, ``extraction_strength``, ``exact_memorization`` (NaN for a row without answer
    positions), ``generation`` and ``rouge1_recall``, ``rougeL_recall``, ``rougeL_f1`` (``None`` for rows beyond
    ``rouge_rows_limit``). Other evaluators keep their own columns
    (:class:`baldro_lightning.evaluation.muse.MuseEvaluator`).
    """

    role: str
    """The split's use (a TOFU :data:`~baldro_lightning.evaluation.tofu.Role`) or, for MUSE, its ``{config}/{split}``
    name."""
    split: str
    indices: list[int]
    """Dataset row index of each row."""
    columns: dict[str, list[Any]] = field(default_factory=dict)

    @staticmethod
    def concat(parts: Sequence[RowScores]) -> RowScores:
        """Join the scores of disjoint row subsets (e.g. gathered from ranks), sorted by row index.

        Raises:
            ValueError: the parts belong to different splits, have different columns, or share a row index.
        """
        if not parts:
            raise ValueError("RowScores.concat() needs at least one part")
        first = parts[0]
        if any((p.role, p.split, set(p.columns)) != (first.role, first.split, set(first.columns)) for p in parts):
            raise ValueError(
                "RowScores.concat(): parts come from different splits or plans; gather one split at a time"
            )
        indices = [i for p in parts for i in p.indices]
        if len(set(indices)) != len(indices):
            raise ValueError(f"RowScores.concat(): split {first.split!r} has a row index on several parts")
        order = np.argsort(indices, kind="stable")
        columns = {name: [v for p in parts for v in p.columns[name]] for name in first.columns}
        return RowScores(
            role=first.role,
            split=first.split,
            indices=[indices[k] for k in order],
            columns={name: [values[k] for k in order] for name, values in columns.items()},
        )


def shard_rows(rows: Sequence[Mapping[str, Any]], rank: int, world_size: int) -> list[Mapping[str, Any]]:
    """Rows ``rank, rank + world_size, …``: a rank's share for an evaluator's ``score``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return list(rows[rank::world_size])


# --------------------------------------------------------------------------------------------------------------
# eval.json entries from per-row values


def nan_mean(values: Sequence[float]) -> float:
    """Mean of ``values`` ignoring NaN (rows without a value); NaN when no value is left."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if arr.size and not np.all(np.isnan(arr)) else math.nan


def values_by_index(indices: Sequence[int], values: Sequence[Any]) -> dict[str, Any]:
    """``{str(row index): value}``: the ``value_by_index`` of an ``eval.json`` entry."""
    return {str(i): v for i, v in zip(indices, values, strict=True)}


MIA_ATTACKS: tuple[str, ...] = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus")
"""Membership-inference attacks scored on members vs non-members; PrivLeak uses ``mia_min_k`` (methods §3.6)."""


def mia_entries(
    members: Mapping[str, Sequence[float]],
    nonmembers: Mapping[str, Sequence[float]],
    member_indices: Sequence[int],
    nonmember_indices: Sequence[int],
    reference_auc: float | None,
) -> dict[str, dict[str, Any]]:
    """MIA AUC entries and PrivLeak from per-row attack scores (methods §3.6).

    Args:
        members: Attack name -> (N_f,) scores of the member rows (loss-like: higher = less likely a member).
        nonmembers: Attack name -> (N_h,) scores of the non-member rows.
        member_indices: Row indices of the members.
        nonmember_indices: Row indices of the non-members.
        reference_auc: The retain model's ``mia_min_k`` AUC; None gives the default 0.5 (methods P-23).

    Returns:
        One entry per attack (``agg_value`` = AUC, members in ``value_by_index``, non-members in
        ``holdout_value_by_index``) and ``privleak`` (needs ``mia_min_k``). A row without a finite score (no answer
        token) is left out of the AUC; its value is null.
    """
    out: dict[str, dict[str, Any]] = {}
    for name in members:
        out[name] = {
            "agg_value": metrics.mia_auc(_finite(members[name]), _finite(nonmembers[name])),
            "value_by_index": values_by_index(member_indices, list(members[name])),
            "holdout_value_by_index": values_by_index(nonmember_indices, list(nonmembers[name])),
        }
    out["privleak"] = {
        "agg_value": metrics.privleak(out["mia_min_k"]["agg_value"], reference_auc),
        "value_by_index": {},
    }
    return out


def _finite(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    return arr[np.isfinite(arr)]


# --------------------------------------------------------------------------------------------------------------
# What every evaluator shares


def settings_problems(
    settings: Any, allowed_groups: Sequence[str], counts: Sequence[str], optional_counts: Sequence[str] = ()
) -> list[str]:
    """What is wrong with the options every benchmark's settings have, each naming its flag and bad value.

    Args:
        settings: A settings dataclass with ``metric_groups``, ``engine`` and the fields named in the counts.
        allowed_groups: The benchmark's metric groups; ``metric_groups`` must be a non-empty subset.
        counts: Fields that must be at least 1.
        optional_counts: Fields that must be at least 1 or unset (``None``).
    """
    problems = []
    groups = settings.metric_groups
    if not groups or any(g not in allowed_groups for g in groups):
        problems.append(f"--metric_groups {list(groups)}: choose from {', '.join(allowed_groups)}")
    for flag in counts:
        if getattr(settings, flag) < 1:
            problems.append(f"--{flag} must be >= 1, got {getattr(settings, flag)}")
    for flag in optional_counts:
        if getattr(settings, flag) is not None and getattr(settings, flag) < 1:
            problems.append(f"--{flag} must be >= 1 or unset, got {getattr(settings, flag)}")
    if settings.engine not in get_args(Engine):
        problems.append(f"--engine {settings.engine!r}: choose from {', '.join(get_args(Engine))}")
    return problems


EXTRA_ATTACKS: tuple[str, ...] = ("mia_gradnorm", "mia_reference")
"""Attacks beyond :data:`MIA_ATTACKS`, each a metric group (asked for by name) and an AUC entry of that name."""


def extra_attack_problems(groups: Sequence[str], mia_group: str, retain_reference: str | None) -> list[str]:
    """What is wrong with asking for ``mia_gradnorm``/``mia_reference``: they extend ``mia_group`` (whose member and
    non-member rows and PrivLeak entry they share), and the Reference attack reads the retain reference's losses."""
    problems = []
    asked = [group for group in EXTRA_ATTACKS if group in groups]
    if asked and mia_group not in groups:
        problems.append(f"--metric_groups {list(groups)}: {', '.join(asked)} extend {mia_group}; add {mia_group}")
    if "mia_reference" in groups and retain_reference is None:
        problems.append(
            "--metric_groups mia_reference scores against the retain model's per-row losses: give --retain_reference "
            "(an eval.json of the retain model with the MIA metrics)"
        )
    return problems


def tokenizer_problems(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Batched scoring pads: a tokenizer without a pad token cannot be used."""
    if tokenizer.pad_token_id is None:
        return ["the tokenizer has no pad token; load it with baldro_lightning.data.tokenization.load_tokenizer"]
    return []


class BenchmarkEvaluator:
    """What every evaluator shares: provenance, whole runs and the ``eval.json`` file.

    Subclasses (dataclasses) hold ``benchmark``, ``template``, ``settings`` (their benchmark's settings dataclass,
    with ``retain_reference``), ``rows`` (scored rows per role or split), ``notes`` and ``_reference_auc``, and
    define :meth:`score` (per-row values of some rows, so ranks can split them;
    :class:`~baldro_lightning.evaluation.callbacks.ScheduledEvaluation` does), :meth:`aggregate` (metrics of all
    rows) and :meth:`recorded_settings` (what ``meta`` records of their options).
    """

    row_notes: Sequence[str] = ()
    """Notes about the rows of the last :meth:`aggregate` (rows left out); ``meta`` adds them to ``notes``, so
    call ``aggregate`` before ``meta``."""
    unscorable_rows: Mapping[str, Sequence[int]] = {}
    """Split -> indices of the rows the last :meth:`aggregate` left out for having no answer token to score
    (``meta.unscorable_rows``; a retain reference's nulls there are not damage)."""

    def score(
        self, model: nn.Module, rows: Mapping[str, Sequence[Mapping[str, Any]]] | None = None, synced_gpus: bool = False
    ) -> dict[str, RowScores]:
        raise NotImplementedError

    def aggregate(self, scores: Mapping[str, RowScores]) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def recorded_settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def meta(self, model: nn.Module, model_name: str | None = None) -> dict[str, Any]:
        """Provenance of an evaluation: model, data, settings, versions, time."""
        parameter = next(model.parameters(), None)
        config = getattr(model, "config", None)
        name = model_name or getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
        reference = self.settings.retain_reference
        return {
            "model": name,
            "model_dtype": None if parameter is None else str(parameter.dtype).removeprefix("torch."),
            "benchmark": str(self.benchmark),
            **self.recorded_settings(),
            "template": dataclasses.asdict(self.template),
            "retain_reference": None if reference is None else str(reference),
            "privleak_reference_auc": 0.5 if self._reference_auc is None else self._reference_auc,
            "notes": [*self.notes, *self.row_notes],
            "unscorable_rows": {split: list(rows) for split, rows in self.unscorable_rows.items()},
            "versions": {
                "baldro_lightning": baldro_lightning.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    def _note(self, note: str | None) -> None:
        """Record ``note`` in ``meta.notes`` (once) and log it; ``None`` is no note."""
        if note is not None and note not in self.notes:
            log.warning("%s", note)
            self.notes.append(note)

    def evaluate(self, model: nn.Module, model_name: str | None = None, synced_gpus: bool = False) -> dict[str, Any]:
        """Score every loaded row and aggregate: ``{"meta": ..., "metrics": ...}``."""
        started = time.perf_counter()
        scores = self.score(model, synced_gpus=synced_gpus)
        aggregated = self.aggregate(scores)  # before meta, which records its row notes
        result = {"meta": self.meta(model, model_name), "metrics": aggregated}
        result["meta"]["elapsed_s"] = round(time.perf_counter() - started, 3)
        return result

    def run(self, model: nn.Module, out: str | os.PathLike[str], model_name: str | None = None) -> dict[str, Any]:
        """:meth:`evaluate`, then write the result to ``out`` atomically (nothing is written if anything fails)."""
        result = self.evaluate(model, model_name)
        write_eval_json(result, out)
        return result
