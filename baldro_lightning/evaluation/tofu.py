"""TOFU evaluation of a causal LM: batched likelihoods and generations, per-row values, ``eval.json`` (spec §3).

The evaluator works in two steps so that rows can be split across ranks:

1. :meth:`TofuEvaluator.score` runs the model on a list of rows per split and returns :class:`RowScores`: plain
   per-row numbers and strings (mean NLLs, MIA scores, ES/EM, generations, ROUGE), nothing model-sized.
2. :meth:`TofuEvaluator.aggregate` turns the per-row values of all rows into the metrics of spec §3.2-§3.6, in
   open-unlearning's layout ``{metric: {"agg_value", "value_by_index"}}`` keyed by the dataset row index.

Every likelihood needed by a split (the answer, the paraphrased answer and the K perturbed answers of every
row, and the holdout answers) is one example in a single pool. The pool is sorted by length and run in padded
forwards of ``batch_size`` examples, so short and long answers are not padded to each other's length and no
forward is spent on one answer at a time. Token statistics (MinK, MinK++, argmax predictions) are computed from
each batch's logits and only per-position numbers are kept. Generation for ROUGE is greedy on left-padded
prompts, also sorted by length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

import baldro_lightning
from baldro_lightning.atomic_files import write_atomic
from baldro_lightning.data.tofu import load_split, split_pairing
from baldro_lightning.data.tokenization import IGNORE_INDEX, PromptTemplate, collate, encode_example, encode_prompt
from baldro_lightning.evaluation import metrics
from baldro_lightning.train.logprobs import sequence_logprobs

log = logging.getLogger(__name__)

MetricGroup = Literal["forget", "retain", "ra", "wf", "mia"]
"""Groups of metrics: forget-set metrics, retain_perturbed, real authors, world facts, membership inference."""

Role = Literal["forget", "retain", "ra", "wf", "holdout"]
"""What a split is used for in one evaluation."""

ALL_GROUPS: tuple[MetricGroup, ...] = get_args(MetricGroup)

MINK_FRACTION = 0.4
"""Fraction k of lowest-scoring tokens kept by MinK and MinK++ (spec §3.6)."""


class EvalLogError(ValueError):
    """An ``eval.json`` file is missing, unreadable, or does not fit the evaluation it is used with."""


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


@dataclass(frozen=True)
class ExampleScore:
    """Likelihood statistics of one :class:`AnswerExample`.

    Token-level arrays cover the answer positions **excluding the last labelled token** (the EOS the reference
    drops for MinK, MinK++, ES and EM, spec §3.1b); they are ``None`` unless the example asked for them.
    """

    nll_mean: float
    """Mean NLL over all labelled tokens, EOS included (spec §3.1a); 0 for an example without labels."""
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


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside the block; every submodule's own train/eval flag is restored after.

    Restoring per submodule (not ``model.train()``) keeps a frozen submodule that was in eval mode in eval mode.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


def score_examples(
    model: nn.Module,
    examples: Sequence[AnswerExample],
    batch_size: int,
    pad_token_id: int,
    synced_gpus: bool = False,
) -> list[ExampleScore]:
    """Likelihood statistics of many examples, in right-padded forwards of ``batch_size`` length-sorted examples.

    The caller puts the model in eval mode under ``torch.no_grad()`` (see :func:`evaluation_mode`). Logits live
    only for one batch: MinK++ moments are reduced from them chunk by chunk and then dropped.

    Args:
        model: A causal LM returning ``.logits`` (B, T, V); may be sharded (FSDP2), in which case every rank must
            call this function and ``synced_gpus`` must be True.
        examples: The examples, in any order.
        batch_size: Examples per forward.
        pad_token_id: Id written into padded positions (masked by the attention mask built from lengths).
        synced_gpus: Pad this rank's number of forwards to the largest over ranks with dummy forwards, so that
            sharded parameters are gathered in lockstep when ranks hold different numbers of rows.

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
    for batch_rows in batches:
        items = [{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in batch_rows]
        batch = collate(items, pad_token_id, padding_side="right")
        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
        stats = sequence_logprobs(logits, labels)
        nll = stats.nll_mean.float().cpu().tolist()
        need = torch.tensor([examples[i].token_stats for i in batch_rows], device=device)
        token_parts: list[dict[str, np.ndarray]] | None = None
        if bool(need.any()):
            token_parts = _token_statistics(logits, labels, stats.token_logps, stats.mask, need)
        for position, i in enumerate(batch_rows):
            extra = token_parts[position] if token_parts is not None and examples[i].token_stats else {}
            results[i] = ExampleScore(nll_mean=float(nll[position]), **extra)
        del logits, stats
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


def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    batch_size: int,
    max_new_tokens: int,
    synced_gpus: bool = False,
    stop_strings: Sequence[str] = (),
) -> list[str]:
    """Greedy continuations of prompts, in left-padded batches of length-sorted prompts (spec §3.1c).

    Only the new tokens are decoded (special tokens skipped), then cut with :func:`metrics.clean_generation`.
    Generation stops at the model's generation-config EOS ids or after ``max_new_tokens``.

    Args:
        model: A causal LM with ``.generate``; call under :func:`evaluation_mode`.
        tokenizer: Its tokenizer (``pad_token_id`` must be set, see ``load_tokenizer``).
        prompts: Token ids of each prompt (from :func:`encode_prompt`).
        batch_size: Prompts per ``generate`` call.
        max_new_tokens: Most generated tokens per prompt (200 for TOFU).
        synced_gpus: Passed to ``generate`` for sharded models; ranks with fewer batches run dummy calls so that
            every rank calls ``generate`` equally often.
        stop_strings: Cut each text at these strings, in order (none for TOFU).

    Returns:
        One cleaned text per prompt, in the order of ``prompts``.
    """
    if batch_size < 1:
        raise ValueError(f"--generation_batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token; load it with load_tokenizer()")
    device = _input_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    batches = _batches(order, batch_size)
    texts: list[str] = [""] * len(prompts)
    options = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": pad, "use_cache": True}
    calls = _synced_count(len(batches), device, synced_gpus)  # before any generate, as in score_examples
    for batch_rows in batches:
        batch = collate([{"input_ids": list(prompts[i])} for i in batch_rows], pad, padding_side="left")
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
    for _ in range(calls - len(batches)):
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        dummy = torch.tensor([[start]], dtype=torch.long, device=device)
        model.generate(input_ids=dummy, attention_mask=torch.ones_like(dummy), synced_gpus=True, **options)
    return texts


# --------------------------------------------------------------------------------------------------------------
# Per-row values


@dataclass(frozen=True)
class RolePlan:
    """What is computed for every row of one split."""

    role: Role
    """The split's use in this evaluation."""
    split: str
    """TOFU config name, e.g. ``forget10_perturbed``."""
    paraphrased: bool = False
    """Score ``paraphrased_answer`` (the correct answer of the forget/retain truth ratio)."""
    perturbed: bool = False
    """Score every ``perturbed_answer``."""
    token_stats: bool = False
    """MinK, MinK++, ZLib, ES and EM from the answer."""
    generate: bool = False
    """Greedy generation and ROUGE against the answer."""


@dataclass
class RowScores:
    """Per-row values of one split; every column is aligned with ``indices``.

    Columns (present as the plan asks): ``answer_nll``, ``para_nll``, ``pert_nll`` (list of K), ``mia_loss``,
    ``mia_zlib``, ``mia_min_k``, ``mia_min_k_plus_plus``, ``extraction_strength``, ``exact_memorization``
    (NaN for a row without answer positions), ``generation`` and ``rouge1_recall``, ``rougeL_recall``,
    ``rougeL_f1`` (``None`` for rows beyond ``rouge_rows_limit``). Other evaluators keep their own columns
    (:class:`baldro_lightning.evaluation.muse.MuseEvaluator`).
    """

    role: str
    """The split's use (a TOFU :data:`Role`) or, for MUSE, its ``{config}/{split}`` name."""
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
    """Rows ``rank, rank + world_size, …``: a rank's share for :meth:`TofuEvaluator.score`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return list(rows[rank::world_size])


# --------------------------------------------------------------------------------------------------------------
# eval.json


def _jsonable(value: Any) -> Any:
    """Python scalars, lists and dicts only; NaN and inf become ``None`` so the file stays strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_eval_json(result: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``result`` as strict JSON, atomically (:func:`atomic_files.write_atomic`).

    Returns:
        The path written.
    """
    return write_atomic(path, lambda file: json.dump(_jsonable(result), file, indent=1, allow_nan=False))


def load_eval_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an ``eval.json`` of this package (``{"meta", "metrics"}``) or an open-unlearning ``TOFU_EVAL.json``.

    Returns:
        ``{"meta": dict, "metrics": dict}``; ``meta`` is empty for open-unlearning logs, whose metrics sit at the
        top level.

    Raises:
        EvalLogError: the file is missing, is not JSON, or is not a JSON object.
    """
    file = Path(path)
    if not file.is_file():
        raise EvalLogError(f"{file} does not exist; write it with `python -m baldro_lightning evaluate --out {file}`")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalLogError(f"{file} is not a JSON file ({err}); re-run the evaluation that wrote it") from err
    if not isinstance(data, dict):
        raise EvalLogError(
            f"{file} holds a JSON {type(data).__name__}, not an object of metrics; re-run the evaluation"
        )
    if "metrics" in data and isinstance(data["metrics"], dict):
        return {"meta": dict(data.get("meta") or {}), "metrics": data["metrics"]}
    return {"meta": {}, "metrics": data}


def _remake_hint(path: Path, forget_split: str) -> str:
    return (
        f"make the right one by evaluating the retain model with the same split: python -m baldro_lightning evaluate "
        f"--model <retain model> --benchmark <benchmark> --forget_split {forget_split} --out {path}"
    )


def _load_reference(path: str | os.PathLike[str], forget_split: str) -> tuple[Path, dict[str, Any]]:
    file = Path(path)
    if not file.is_file():
        raise EvalLogError(
            f"retain reference {file} does not exist (expected the eval.json of the retain model on "
            f"{forget_split}); {_remake_hint(file, forget_split)}"
        )
    data = load_eval_json(file)
    found = data["meta"].get("forget_split")
    if found is not None and found != forget_split:
        raise EvalLogError(
            f"retain reference {file} was made on forget split {found!r}, but this evaluation uses {forget_split!r}; "
            f"{_remake_hint(file, forget_split)}"
        )
    return file, data


def _describe_indices(keys: Sequence[int]) -> str:
    if not keys:
        return "0 rows"
    ordered = sorted(keys)
    contiguous = ordered == list(range(ordered[0], ordered[0] + len(ordered)))
    shown = f"{ordered[0]}..{ordered[-1]}" if contiguous else ", ".join(map(str, ordered[:6])) + ", ..."
    return f"{len(ordered)} rows (indices {shown})"


def _row_value(value: Any) -> float:
    """A per-row number of our layout (a float) or open-unlearning's (``{"score": x}``); ``None`` is NaN."""
    if isinstance(value, Mapping):
        value = value.get("score")
    return math.nan if value is None else float(value)


def reference_truth_ratios(
    path: str | os.PathLike[str], forget_split: str, n_rows: int, indices: Sequence[int] | None = None
) -> np.ndarray:
    """The retain model's raw per-row forget truth ratios, checked against this evaluation's rows (spec §3.4).

    Args:
        path: The retain model's ``eval.json`` (or an open-unlearning ``TOFU_EVAL.json``).
        forget_split: The forget split of this evaluation; must equal the reference's.
        n_rows: Number of forget rows of this evaluation.
        indices: Their row indices; ``range(n_rows)`` when omitted.

    Returns:
        (n_rows,) truth ratios ordered as ``sorted(indices)``.

    Raises:
        EvalLogError: the file is missing, was made on another forget split, has no ``forget_truth_ratio``, or
            holds different rows; the message names the file, what was expected and found, and how to remake it.
    """
    file, data = _load_reference(path, forget_split)
    expected = sorted(range(n_rows) if indices is None else (int(i) for i in indices))
    entry = data["metrics"].get("forget_truth_ratio", data["metrics"].get("forget_Truth_Ratio"))
    if not isinstance(entry, Mapping) or not isinstance(entry.get("value_by_index"), Mapping):
        raise EvalLogError(
            f"retain reference {file} has no per-row forget_truth_ratio (value_by_index); it was evaluated without "
            f"the forget metrics; {_remake_hint(file, forget_split)}"
        )
    by_index = entry["value_by_index"]
    try:
        found = sorted(int(k) for k in by_index)
    except ValueError as err:
        raise EvalLogError(f"retain reference {file}: forget_truth_ratio has a non-integer row key ({err})") from err
    if found != expected:
        raise EvalLogError(
            f"retain reference {file} holds forget truth ratios for {_describe_indices(found)} but this evaluation "
            f"of {forget_split} has {_describe_indices(expected)} (a different --limit or split); "
            f"{_remake_hint(file, forget_split)}"
        )
    return np.array([_row_value(by_index[str(i)]) for i in expected], dtype=np.float64)


def reference_min_k_auc(
    path: str | os.PathLike[str], forget_split: str, rows: Mapping[str, int] | None = None
) -> float | None:
    """The retain model's ``mia_min_k`` AUC (PrivLeak reference, spec §3.6), or ``None`` if the file has none.

    Args:
        path: The retain model's ``eval.json``.
        forget_split: The forget split of this evaluation; must equal the reference's.
        rows: Row counts of this evaluation's member and non-member splits (e.g. ``{"forget10_perturbed": 400,
            "holdout10": 400}``); checked against the reference's ``meta.rows`` when it records them.

    Raises:
        EvalLogError: the file is missing, was made on another forget split, or scored other row counts.
    """
    file, data = _load_reference(path, forget_split)
    return checked_min_k_auc(file, data, rows, _remake_hint(file, forget_split))


def checked_min_k_auc(
    file: Path, data: Mapping[str, Any], rows: Mapping[str, int] | None, remake_hint: str
) -> float | None:
    """The ``mia_min_k`` AUC of a loaded retain reference (``None`` if it has none), once its row counts match.

    Args:
        file: Where the reference was read from (for messages).
        data: The reference as :func:`load_eval_json` returns it.
        rows: Row counts of this evaluation's member and non-member splits; checked against ``meta.rows``.
        remake_hint: How to make the right reference; ends the error message.

    Raises:
        EvalLogError: the reference scored another number of rows of one of those splits.
    """
    found_rows = data["meta"].get("rows") or {}
    for split, count in (rows or {}).items():
        if split in found_rows and found_rows[split] != count:
            raise EvalLogError(
                f"retain reference {file} scored {found_rows[split]} rows of {split} but this evaluation scores "
                f"{count} (a different --limit), so their MinK AUCs are not comparable; {remake_hint}"
            )
    entry = data["metrics"].get("mia_min_k")
    if not isinstance(entry, Mapping) or entry.get("agg_value") is None:
        return None
    return float(entry["agg_value"])


# --------------------------------------------------------------------------------------------------------------
# The evaluator


def nan_mean(values: Sequence[float]) -> float:
    """Mean of ``values`` ignoring NaN (rows without a value); NaN when no value is left."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if arr.size and not np.all(np.isnan(arr)) else math.nan


def values_by_index(indices: Sequence[int], values: Sequence[Any]) -> dict[str, Any]:
    """``{str(row index): value}``: the ``value_by_index`` of an ``eval.json`` entry."""
    return {str(i): v for i, v in zip(indices, values, strict=True)}


MIA_ATTACKS: tuple[str, ...] = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus")
"""Membership-inference attacks scored on members vs non-members; PrivLeak uses ``mia_min_k`` (spec §3.6)."""


def mia_entries(
    members: Mapping[str, Sequence[float]],
    nonmembers: Mapping[str, Sequence[float]],
    member_indices: Sequence[int],
    nonmember_indices: Sequence[int],
    reference_auc: float | None,
) -> dict[str, dict[str, Any]]:
    """MIA AUC entries and PrivLeak from per-row attack scores (spec §3.6).

    Args:
        members: Attack name -> (N_f,) scores of the member rows (loss-like: higher = less likely a member).
        nonmembers: Attack name -> (N_h,) scores of the non-member rows.
        member_indices: Row indices of the members.
        nonmember_indices: Row indices of the non-members.
        reference_auc: The retain model's ``mia_min_k`` AUC; None gives the default 0.5 (P-23).

    Returns:
        One entry per attack (``agg_value`` = AUC, members in ``value_by_index``, non-members in
        ``holdout_value_by_index``) and ``privleak`` (needs ``mia_min_k``).
    """
    out: dict[str, dict[str, Any]] = {}
    for name in members:
        out[name] = {
            "agg_value": metrics.mia_auc(members[name], nonmembers[name]),
            "value_by_index": values_by_index(member_indices, list(members[name])),
            "holdout_value_by_index": values_by_index(nonmember_indices, list(nonmembers[name])),
        }
    out["privleak"] = {
        "agg_value": metrics.privleak(out["mia_min_k"]["agg_value"], reference_auc),
        "value_by_index": {},
    }
    return out


GENERATION_NOTE = "greedy, left-padded prompts, new tokens decoded without special tokens, stripped"
"""How every evaluator generates (recorded in ``meta.generation``)."""


class BenchmarkEvaluator:
    """What every evaluator shares: provenance, whole runs and the ``eval.json`` file.

    Subclasses (dataclasses) hold ``benchmark``, ``template``, ``retain_reference``, ``rows`` (scored rows per
    role), ``notes`` and ``_reference_auc``, and define :meth:`score` (per-row values of some rows, so ranks can
    split them; :class:`~baldro_lightning.evaluation.callbacks.ScheduledEvaluation` does), :meth:`aggregate`
    (metrics of all
    rows) and :meth:`settings` (what ``meta`` records of their options).
    """

    def score(
        self, model: nn.Module, rows: Mapping[str, Sequence[Mapping[str, Any]]] | None = None, synced_gpus: bool = False
    ) -> dict[str, RowScores]:
        raise NotImplementedError

    def aggregate(self, scores: Mapping[str, RowScores]) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def _option_problems(
        self, allowed_groups: Sequence[str], counts: Sequence[str], optional_counts: Sequence[str]
    ) -> list[str]:
        """What is wrong with the options every evaluator has: its metric groups, counts that must be at least 1
        (``optional_counts`` may also be unset), and the tokenizer's pad token."""
        problems = []
        if not self.metric_groups or any(g not in allowed_groups for g in self.metric_groups):
            problems.append(f"--metrics {list(self.metric_groups)}: choose from {', '.join(allowed_groups)}")
        for flag in counts:
            if getattr(self, flag) < 1:
                problems.append(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        for flag in optional_counts:
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                problems.append(f"--{flag} must be >= 1 or unset, got {getattr(self, flag)}")
        if self.tokenizer.pad_token_id is None:
            problems.append(
                "the tokenizer has no pad token; load it with baldro_lightning.data.tokenization.load_tokenizer"
            )
        return problems

    def meta(self, model: nn.Module, model_name: str | None = None) -> dict[str, Any]:
        """Provenance of an evaluation: model, data, settings, versions, time."""
        import transformers

        parameter = next(model.parameters(), None)
        config = getattr(model, "config", None)
        name = model_name or getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
        return {
            "model": name,
            "model_dtype": None if parameter is None else str(parameter.dtype).removeprefix("torch."),
            "benchmark": str(self.benchmark),
            **self.settings(),
            "template": dataclasses.asdict(self.template),
            "retain_reference": None if self.retain_reference is None else str(self.retain_reference),
            "privleak_reference_auc": 0.5 if self._reference_auc is None else self._reference_auc,
            "notes": list(self.notes),
            "versions": {
                "baldro_lightning": baldro_lightning.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    def evaluate(self, model: nn.Module, model_name: str | None = None, synced_gpus: bool = False) -> dict[str, Any]:
        """Score every loaded row and aggregate: ``{"meta": ..., "metrics": ...}``."""
        started = time.perf_counter()
        scores = self.score(model, synced_gpus=synced_gpus)
        result = {"meta": self.meta(model, model_name), "metrics": self.aggregate(scores)}
        result["meta"]["elapsed_s"] = round(time.perf_counter() - started, 3)
        return result

    def run(self, model: nn.Module, out: str | os.PathLike[str], model_name: str | None = None) -> dict[str, Any]:
        """:meth:`evaluate`, then write the result to ``out`` atomically (nothing is written if anything fails)."""
        result = self.evaluate(model, model_name)
        write_eval_json(result, out)
        return result


@dataclass
class TofuEvaluator(BenchmarkEvaluator):
    """Evaluates a causal LM on the TOFU splits that go with ``forget_split`` (spec §3.2-§3.6)."""

    benchmark: str
    """Directory of ``{split}.jsonl`` files, or a Hub dataset id (``locuslab/TOFU``)."""
    tokenizer: PreTrainedTokenizerBase
    """The model's tokenizer, with a pad token (``load_tokenizer`` sets one)."""
    forget_split: str = "forget10"
    """``forget01``, ``forget05`` or ``forget10``; fixes the paired retain/holdout splits."""
    template: PromptTemplate = field(default_factory=PromptTemplate)
    """Prompt rendering; must be the one the model was trained with."""
    max_length: int = 512
    """Most tokens per likelihood example (spec §1.2)."""
    batch_size: int = 32
    """Examples per likelihood forward (answers, paraphrases and perturbed answers are all examples)."""
    generation_batch_size: int | None = None
    """Prompts per ``generate`` call; ``batch_size`` when unset."""
    max_new_tokens: int = 200
    """Greedy generation length for ROUGE (spec §3.2)."""
    metric_groups: tuple[MetricGroup, ...] = ALL_GROUPS
    """Which metrics to compute."""
    retain_reference: str | None = None
    """``eval.json`` of the retain model on the same forget split: enables forget_quality and the privleak
    reference AUC."""
    rouge_rows_limit: int | None = None
    """Generate for only the first N rows of each split (None = all); ROUGE then covers those rows. The rows are
    the first N loaded ones, wherever they are scored, so shards from :func:`shard_rows` generate for the same
    rows as one process."""
    limit: int | None = None
    """Evaluate only the first N rows of each split (smoke runs); recorded in ``meta``."""

    def __post_init__(self) -> None:
        problems = self._option_problems(
            ALL_GROUPS, ("batch_size", "max_new_tokens"), ("generation_batch_size", "rouge_rows_limit", "limit")
        )
        if problems:
            raise ValueError("TofuEvaluator settings are invalid: " + "; ".join(problems))
        self.retain_split, self.holdout_split, self.perturbed_split = split_pairing(self.forget_split)
        self.metric_groups = tuple(dict.fromkeys(self.metric_groups))
        self.rows = {plan.role: self._load(plan.split) for plan in self.plans()}
        self.notes: list[str] = []
        self._reference_tr: np.ndarray | None = None
        self._reference_auc: float | None = None
        self._check_reference()

    # -- set-up -------------------------------------------------------------------------------------------------

    def plans(self) -> list[RolePlan]:
        """The splits this evaluation reads and what is computed on each."""
        groups = set(self.metric_groups)
        plans = []
        if groups & {"forget", "mia"}:
            forget = "forget" in groups
            plans.append(RolePlan("forget", self.perturbed_split, forget, forget, token_stats=True, generate=forget))
        if "retain" in groups:
            plans.append(RolePlan("retain", "retain_perturbed", paraphrased=True, perturbed=True, generate=True))
        if "ra" in groups:
            plans.append(RolePlan("ra", "real_authors_perturbed", perturbed=True, generate=True))
        if "wf" in groups:
            plans.append(RolePlan("wf", "world_facts_perturbed", perturbed=True, generate=True))
        if "mia" in groups:
            plans.append(RolePlan("holdout", self.holdout_split, token_stats=True))
        return plans

    def _load(self, split: str) -> list[dict[str, Any]]:
        rows = load_split(self.benchmark, split)
        return rows if self.limit is None else rows[: self.limit]

    def _check_reference(self) -> None:
        """Validate the retain reference now, before any model time is spent."""
        if self.retain_reference is None:
            if "forget" in self.metric_groups:
                self.notes.append("forget_quality not computed: no retain reference (--retain_reference) was given")
            if "mia" in self.metric_groups:
                self.notes.append("privleak uses the default reference AUC 0.5 (no retain reference, spec P-23)")
            return
        if "forget" in self.metric_groups:
            forget_rows = self.rows["forget"]
            self._reference_tr = reference_truth_ratios(
                self.retain_reference, self.forget_split, len(forget_rows), [row["index"] for row in forget_rows]
            )
        if "mia" in self.metric_groups:
            counts = {
                split: len(self.rows[role])
                for role, split in (("forget", self.perturbed_split), ("holdout", self.holdout_split))
            }
            self._reference_auc = reference_min_k_auc(self.retain_reference, self.forget_split, counts)
            if self._reference_auc is None:
                self.notes.append(
                    f"privleak uses the default reference AUC 0.5: {self.retain_reference} has no mia_min_k"
                )
                log.warning(
                    "%s has no mia_min_k AUC; privleak falls back to the reference AUC 0.5", self.retain_reference
                )

    # -- step 1: per-row values ---------------------------------------------------------------------------------

    def score(
        self,
        model: nn.Module,
        rows: Mapping[Role, Sequence[Mapping[str, Any]]] | None = None,
        synced_gpus: bool = False,
    ) -> dict[Role, RowScores]:
        """Per-row values of ``rows`` (default: all loaded rows); the model's train/eval modes are restored.

        Args:
            model: A causal LM (may be FSDP2-sharded; then every rank calls this with its share of rows, e.g. from
                :func:`shard_rows`, and ``synced_gpus=True``).
            rows: Rows per role; roles missing here are skipped.
            synced_gpus: Keep ranks in lockstep for sharded models.

        Returns:
            :class:`RowScores` per role.
        """
        rows = self.rows if rows is None else rows
        plans = [plan for plan in self.plans() if plan.role in rows]
        with evaluation_mode(model):
            return self._score(model, [(plan, list(rows[plan.role])) for plan in plans], synced_gpus)

    def _generated_indices(self, role: Role) -> set[int] | None:
        """Row indices that get a generation (``None``: all), decided on the whole split rather than on a shard.

        Taking the first ``rouge_rows_limit`` rows of a shard instead would generate for N rows per rank, and for
        other rows than a single process does.
        """
        if self.rouge_rows_limit is None:
            return None
        return {int(row["index"]) for row in self.rows[role][: self.rouge_rows_limit]}

    def _encode(self, row: Mapping[str, Any], answer: str, token_stats: bool) -> AnswerExample:
        example = encode_example(self.tokenizer, self.template, row["question"], answer, self.max_length)
        return AnswerExample(example.input_ids, example.labels, token_stats)

    def _score(
        self, model: nn.Module, tasks: Sequence[tuple[RolePlan, list[Mapping[str, Any]]]], synced_gpus: bool
    ) -> dict[Role, RowScores]:
        started = time.perf_counter()
        examples: list[AnswerExample] = []
        slots: list[tuple[int, int, str, int]] = []  # (task, row position, variant, perturbed answer number)
        for task, (plan, rows) in enumerate(tasks):
            for position, row in enumerate(rows):
                examples.append(self._encode(row, row["answer"], plan.token_stats))
                slots.append((task, position, "answer", 0))
                if plan.paraphrased:
                    examples.append(self._encode(row, row["paraphrased_answer"], False))
                    slots.append((task, position, "para", 0))
                if plan.perturbed:
                    for j, wrong in enumerate(row["perturbed_answer"]):
                        examples.append(self._encode(row, wrong, False))
                        slots.append((task, position, "pert", j))
        log.info("scoring %d answers of %d rows", len(examples), sum(len(rows) for _, rows in tasks))
        scored = score_examples(model, examples, self.batch_size, self.tokenizer.pad_token_id, synced_gpus)

        answers: list[list[ExampleScore | None]] = [[None] * len(rows) for _, rows in tasks]
        answer_labels: list[list[list[int]]] = [[[] for _ in rows] for _, rows in tasks]
        para: list[list[float]] = [[math.nan] * len(rows) for _, rows in tasks]
        pert: list[list[list[float]]] = [[[] for _ in rows] for _, rows in tasks]
        for (task, position, variant, _), example, result in zip(slots, examples, scored, strict=True):
            if variant == "answer":
                answers[task][position] = result
                answer_labels[task][position] = example.labels
            elif variant == "para":
                para[task][position] = result.nll_mean
            else:
                pert[task][position].append(result.nll_mean)

        prompts = []
        prompt_slots = []
        for task, (plan, rows) in enumerate(tasks):
            if plan.generate:
                chosen = self._generated_indices(plan.role)
                for position, row in enumerate(rows):
                    if chosen is None or int(row["index"]) in chosen:
                        prompts.append(encode_prompt(self.tokenizer, self.template, row["question"]))
                        prompt_slots.append((task, position))
        if prompts:
            log.info("generating answers for %d prompts (max_new_tokens=%d)", len(prompts), self.max_new_tokens)
        texts = generate_answers(
            model,
            self.tokenizer,
            prompts,
            self.generation_batch_size or self.batch_size,
            self.max_new_tokens,
            synced_gpus,
        )
        generations: list[dict[int, str]] = [{} for _ in tasks]
        for (task, position), text in zip(prompt_slots, texts, strict=True):
            generations[task][position] = text

        out: dict[Role, RowScores] = {}
        for task, (plan, rows) in enumerate(tasks):
            scores = RowScores(plan.role, plan.split, [int(row["index"]) for row in rows])
            row_answers = cast(list[ExampleScore], answers[task])
            scores.columns["answer_nll"] = [a.nll_mean for a in row_answers]
            if plan.paraphrased:
                scores.columns["para_nll"] = para[task]
            if plan.perturbed:
                scores.columns["pert_nll"] = pert[task]
            if plan.token_stats:
                self._token_columns(scores, row_answers, answer_labels[task])
            if plan.generate:
                self._rouge_columns(scores, rows, generations[task])
            out[plan.role] = scores
        log.info("scored %d examples in %.1f s", len(examples), time.perf_counter() - started)
        return out

    def _token_columns(
        self, scores: RowScores, answers: Sequence[ExampleScore], labels: Sequence[Sequence[int]]
    ) -> None:
        token_logps = [a.token_logps for a in answers]
        nll = scores.columns["answer_nll"]
        # ZLib compresses the answer as decoded from its labelled tokens, specials skipped (spec §3.6).
        texts = [
            self.tokenizer.decode([t for t in lab if t != IGNORE_INDEX], skip_special_tokens=True) for lab in labels
        ]
        scores.columns["mia_loss"] = metrics.mia_loss(nll).tolist()
        scores.columns["mia_zlib"] = metrics.mia_zlib(nll, texts).tolist()
        scores.columns["mia_min_k"] = metrics.mia_min_k(token_logps, MINK_FRACTION).tolist()
        scores.columns["mia_min_k_plus_plus"] = metrics.mia_min_k_plus_plus(
            token_logps, [a.mu for a in answers], [a.sigma2 for a in answers], MINK_FRACTION
        ).tolist()
        preds = [a.pred_ids for a in answers]
        targets = [a.target_ids for a in answers]
        scores.columns["extraction_strength"] = metrics.extraction_strength(preds, targets).tolist()
        scores.columns["exact_memorization"] = metrics.exact_memorization(preds, targets).tolist()

    def _rouge_columns(self, scores: RowScores, rows: Sequence[Mapping[str, Any]], generated: dict[int, str]) -> None:
        positions = sorted(generated)
        rouge = metrics.rouge_scores([generated[p] for p in positions], [rows[p]["answer"].strip() for p in positions])
        names = ("generation", "rouge1_recall", "rougeL_recall", "rougeL_f1")
        columns: dict[str, list[Any]] = {name: [None] * len(rows) for name in names}
        for k, position in enumerate(positions):
            columns["generation"][position] = generated[position]
            for name in names[1:]:
                columns[name][position] = float(rouge[name][k])
        scores.columns.update(columns)

    # -- step 2: metrics over all rows --------------------------------------------------------------------------

    def aggregate(self, scores: Mapping[Role, RowScores]) -> dict[str, dict[str, Any]]:
        """Metrics in open-unlearning's layout from the per-row values of every row (spec §3.2-§3.6).

        Args:
            scores: :class:`RowScores` per role, covering all rows (join ranks' parts with
                :meth:`RowScores.concat` first).

        Returns:
            ``{metric: {"agg_value": float | None, "value_by_index": {str(index): value}}}``; MIA entries also hold
            ``holdout_value_by_index`` (non-member scores), aggregate-only metrics an empty ``value_by_index``.
        """
        out: dict[str, dict[str, Any]] = {}
        groups = set(self.metric_groups)
        if "forget" in groups:
            self._forget_metrics(scores["forget"], out)
        for role in ("retain", "ra", "wf"):
            if role in groups:
                self._utility_metrics(scores[role], out)
        if {"retain", "ra", "wf"} <= groups:
            values = {key: out[key]["agg_value"] for key in metrics.MODEL_UTILITY_KEYS}
            out["model_utility"] = {"agg_value": metrics.model_utility(values), "value_by_index": {}}
        if "mia" in groups:
            self._mia_metrics(scores["forget"], scores["holdout"], out)
        return out

    def _rouge_entry(self, scores: RowScores) -> dict[str, Any]:
        keep = [k for k, text in enumerate(scores.columns["generation"]) if text is not None]
        by_index = {
            str(scores.indices[k]): {
                name: scores.columns[name][k] for name in ("generation", "rougeL_recall", "rouge1_recall", "rougeL_f1")
            }
            for k in keep
        }
        agg = nan_mean([scores.columns["rougeL_recall"][k] for k in keep])
        return {"agg_value": agg, "value_by_index": by_index}

    def _forget_metrics(self, scores: RowScores, out: dict[str, dict[str, Any]]) -> None:
        c, idx = scores.columns, scores.indices
        prob = metrics.probability(c["answer_nll"])
        para = metrics.probability(c["para_nll"])
        pert = np.exp(-np.asarray(c["pert_nll"], dtype=np.float64))  # (N, K)
        tr = metrics.truth_ratio(c["para_nll"], c["pert_nll"])
        out["forget_Q_A_Prob"] = {"agg_value": nan_mean(prob), "value_by_index": values_by_index(idx, prob.tolist())}
        out["forget_Q_A_ROUGE"] = self._rouge_entry(scores)
        out["forget_Q_A_PARA_Prob"] = {
            "agg_value": nan_mean(para),
            "value_by_index": values_by_index(idx, para.tolist()),
        }
        out["forget_Q_A_PERT_Prob"] = {
            "agg_value": nan_mean(pert.mean(axis=1)),
            "value_by_index": values_by_index(idx, pert.tolist()),
        }
        out["forget_truth_ratio"] = {
            "agg_value": metrics.truth_ratio_forget_aggregate(tr),
            "value_by_index": values_by_index(idx, tr.tolist()),
        }
        if self._reference_tr is not None:
            if sorted(idx) != sorted(int(row["index"]) for row in self.rows["forget"]):
                raise EvalLogError(
                    f"forget rows scored ({_describe_indices(idx)}) differ from the rows the retain reference "
                    f"{self.retain_reference} was checked against; aggregate all rows (RowScores.concat) first"
                )
            out["forget_quality"] = {
                "agg_value": metrics.forget_quality(tr, self._reference_tr),
                "value_by_index": {},
            }
        for name in ("extraction_strength", "exact_memorization"):
            out[name] = {"agg_value": nan_mean(c[name]), "value_by_index": values_by_index(idx, c[name])}

    def _utility_metrics(self, scores: RowScores, out: dict[str, dict[str, Any]]) -> None:
        c, idx, prefix = scores.columns, scores.indices, scores.role
        if scores.role == "retain":
            prob = metrics.probability(c["answer_nll"])
            out["retain_Q_A_Prob"] = {
                "agg_value": nan_mean(prob),
                "value_by_index": values_by_index(idx, prob.tolist()),
            }
            tr = metrics.truth_ratio(c["para_nll"], c["pert_nll"])
        else:
            # Real authors / world facts have no paraphrase: the answer itself is the correct option.
            normalised = metrics.normalised_probability(c["answer_nll"], c["pert_nll"])
            out[f"{prefix}_Q_A_Prob_normalised"] = {
                "agg_value": nan_mean(normalised),
                "value_by_index": values_by_index(idx, normalised.tolist()),
            }
            tr = metrics.truth_ratio(c["answer_nll"], c["pert_nll"])
        out[f"{prefix}_Q_A_ROUGE"] = self._rouge_entry(scores)
        out[f"{prefix}_Truth_Ratio"] = {
            "agg_value": metrics.truth_ratio_true_aggregate(tr),
            "value_by_index": values_by_index(idx, tr.tolist()),
        }

    def _mia_metrics(self, forget: RowScores, holdout: RowScores, out: dict[str, dict[str, Any]]) -> None:
        members = {name: forget.columns[name] for name in MIA_ATTACKS}
        nonmembers = {name: holdout.columns[name] for name in MIA_ATTACKS}
        out.update(mia_entries(members, nonmembers, forget.indices, holdout.indices, self._reference_auc))

    # -- whole runs ---------------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The options ``meta`` records."""
        return {
            "forget_split": self.forget_split,
            "retain_split": self.retain_split,
            "holdout_split": self.holdout_split,
            "rows": {plan.split: len(self.rows[plan.role]) for plan in self.plans()},
            "limit": self.limit,
            "rouge_rows_limit": self.rouge_rows_limit,
            "metric_groups": list(self.metric_groups),
            "max_length": self.max_length,
            "max_new_tokens": self.max_new_tokens,
            "generation": GENERATION_NOTE,
            "rouge": "rougeL_recall with Porter stemming (rouge_score)",
            "mink_fraction": MINK_FRACTION,
            "batch_size": self.batch_size,
        }
