"""A run's evaluation record on disk: the one module that knows where its files are and what they hold.

An evaluation directory (``<log_dir>/eval`` unless a callback's ``dirpath`` says otherwise) holds::

    step_000000/eval.json      one evaluation per step it ran at (in-training evaluation)
    step_000040/eval.json
    per_sample.csv             TOFU forgetting curves: one row per (evaluation, forget sample)

and the evaluate commands write one ``eval.json`` wherever ``--out`` says. Attacks on a finished model (relearning,
quantization: :mod:`baldro_lightning.robustness`) write an attack directory (``<log_dir>/attacks`` at the end of
``fit``, or the ``--out`` of the attack commands)::

    unattacked/eval.json               the model before any attack, every forget row
    unattacked_held_out/eval.json      the same scores restricted to the forget rows relearning attacks hold out
    <attack>/eval.json                 the attacked model's evaluation
    <attack>/attack.json               what the attack did and the recovery of each forget metric (before, after)
    <attack>/per_sample.csv            that recovery per forget row

Everything that writes or reads these files goes through this module: ``eval.json`` (:func:`write_eval_json`,
:func:`load_eval_json`), the step layout (:func:`step_eval_path`, :func:`run_step_evals`, :func:`remove_steps_after`
for a resumed run), ``per_sample.csv`` (:data:`CURVES`, :func:`write_per_sample`, :func:`read_per_sample`,
:class:`SampleCurves`), the attack layout (:func:`attack_paths`,
:func:`write_attack_record`, :func:`read_attack_record`, :func:`run_attack_records`) and the retain model's
``eval.json`` that forget quality and privleak compare to (:func:`reference_truth_ratios`,
:func:`reference_min_k_auc`, :func:`reference_privleak_auc`), with the checks that it fits the evaluation at hand.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from baldro_lightning.atomic_files import write_atomic, write_text_atomic
from baldro_lightning.user_errors import UserInputError

EVAL_JSON = "eval.json"
"""File name of one evaluation."""
PER_SAMPLE_CSV = "per_sample.csv"
"""File name of the per-sample forgetting curves, in the evaluation directory."""
EVAL_DIR = "eval"
"""The evaluation directory under a trainer's log directory when no ``dirpath`` is given."""

CURVES: tuple[str, ...] = ("log_ppl_ratio", "truth_ratio", "rougeL_recall", "dro_weight")
"""The per-sample quantities of ``per_sample.csv``, between its ``step, index`` and ``forget_step`` columns.

``log_ppl_ratio`` is a sample's forgetting: its answer's mean NLL per token now minus before the first update, the
log of its perplexity ratio (0 at the start, > 0 once forgotten). TensorBoard, this file and the report all use it
with this sign. ``truth_ratio`` is wrong/correct answer likelihood (rises as a sample is forgotten),
``rougeL_recall`` its greedy answer's ROUGE-L recall, ``dro_weight`` the weight its last forget batch gave it.
"""

LEGACY_LOG_LIKELIHOOD_RATIO = "log_likelihood_ratio"
"""The column files written before the sign was unified held: ``NLL_before - NLL_now``, i.e. ``-log_ppl_ratio``."""


ATTACKS_DIR = "attacks"
"""The attack directory under a trainer's log directory when the attack callback sets no ``dirpath``."""
ATTACK_JSON = "attack.json"
"""File name of one attack's record."""
UNATTACKED = "unattacked"
"""Attack-directory entry of the model's evaluation before any attack (every forget row)."""
UNATTACKED_HELD_OUT = "unattacked_held_out"
"""Attack-directory entry of the unattacked evaluation on the forget rows relearning attacks hold out."""
ATTACK_PER_SAMPLE_COLUMNS: tuple[str, ...] = ("index", "metric", "before", "after", "delta")
"""Columns of an attack's ``per_sample.csv``: one line per (forget row, recovered metric)."""


class EvalLogError(UserInputError):
    """An ``eval.json`` file is missing, unreadable, or does not fit the evaluation it is used with."""


# --------------------------------------------------------------------------------------------------------------
# Where the files are


def default_eval_dir(log_dir: str | os.PathLike[str]) -> Path:
    """``<log_dir>/eval``: where in-training evaluations go when their callback sets no ``dirpath``."""
    return Path(log_dir) / EVAL_DIR


def step_eval_path(eval_dir: str | os.PathLike[str], step: int) -> Path:
    """``<eval_dir>/step_<step, 6 digits>/eval.json``: zero-padded, so name order is step order."""
    return Path(eval_dir) / f"step_{step:06d}" / EVAL_JSON


def per_sample_path(eval_dir: str | os.PathLike[str]) -> Path:
    """``<eval_dir>/per_sample.csv``."""
    return Path(eval_dir) / PER_SAMPLE_CSV


def per_sample_of(step_eval: Path) -> Path:
    """The ``per_sample.csv`` of the evaluation directory that holds the step evaluation ``step_eval``."""
    return per_sample_path(step_eval.parent.parent)


def step_of(step_dir: Path) -> int | None:
    """The step a ``step_<N>`` directory is named for; None for any other name."""
    found = re.fullmatch(r"step_(\d+)", step_dir.name)
    return None if found is None else int(found.group(1))


def remove_steps_after(eval_dir: str | os.PathLike[str], step: int) -> list[Path]:
    """Remove the evaluations of ``eval_dir`` made after ``step``; returns the step directories removed.

    A run resumed from a checkpoint at ``step`` evaluates those steps again; what the interrupted run wrote for them
    after its last checkpoint is not part of the resumed run's record.
    """
    removed = []
    for directory in sorted(Path(eval_dir).glob("step_*")):
        found = step_of(directory)
        if found is not None and found > step and directory.is_dir():
            shutil.rmtree(directory)
            removed.append(directory)
    return removed


def run_step_evals(run: str | os.PathLike[str]) -> list[Path]:
    """A run directory's in-training evaluations, in step order.

    Searched in ``<run>/eval``, ``<run>/<logger name>/eval`` and ``<run>/<name>/version_N/eval``. Deeper matches are
    not searched, so a sweep root (whose runs hold ``<run>/tensorboard/eval``) is not mistaken for one run.
    """
    directory = Path(run)
    found: list[Path] = []
    for prefix in ("", "*/", "*/version_*/"):
        found += directory.glob(f"{prefix}{EVAL_DIR}/step_*/{EVAL_JSON}")
    return sorted(found, key=lambda p: p.parent.name)


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
    """Read an ``eval.json`` of this package (``{"meta", "metrics", ...}``) or an open-unlearning ``TOFU_EVAL.json``.

    Returns:
        The file's object with ``meta`` (a dict) and ``metrics``, plus any other top-level entry it holds (an
        in-training evaluation's ``synchrony``). ``meta`` is empty for open-unlearning logs, whose metrics sit at
        the top level.

    Raises:
        EvalLogError: the file is missing, is not JSON, or is not a JSON object.
    """
    file = Path(path)
    if not file.is_file():
        what = "is a directory, not a file" if file.is_dir() else "does not exist"
        raise EvalLogError(f"{file} {what}; write it with `python -m baldro_lightning evaluate --out {file}`")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalLogError(f"{file} is not a JSON file ({err}); re-run the evaluation that wrote it") from err
    if not isinstance(data, dict):
        raise EvalLogError(
            f"{file} holds a JSON {type(data).__name__}, not an object of metrics; re-run the evaluation"
        )
    if "metrics" in data and isinstance(data["metrics"], dict):
        return {**data, "meta": dict(data.get("meta") or {}), "metrics": data["metrics"]}
    return {"meta": {}, "metrics": data}


# --------------------------------------------------------------------------------------------------------------
# per_sample.csv


def write_per_sample(
    path: str | os.PathLike[str], history: Sequence[Mapping[str, Any]], forget_step_by_index: Mapping[str, Any]
) -> Path:
    """Write every evaluation's per-sample curves as ``per_sample.csv``, atomically.

    Args:
        path: The file to write (:func:`per_sample_path`).
        history: One entry per evaluation: ``step``, ``index`` (row indices) and each of :data:`CURVES` as a
            sequence aligned with ``index``.
        forget_step_by_index: ``{str(row index): step or None}``, the ``forget_step`` column (the same on every
            evaluation of a row: the latest synchrony).

    Returns:
        The path written.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["step", "index", *CURVES, "forget_step"])
    for entry in history:
        for k, index in enumerate(entry["index"]):
            values = [f"{float(entry[c][k]):.6g}" for c in CURVES]
            writer.writerow([entry["step"], index, *values, forget_step_by_index[str(index)]])
    return write_text_atomic(path, buffer.getvalue())


def read_per_sample(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """``per_sample.csv`` as columns: ``step``, ``index`` and each curve, one value per (evaluation, sample).

    Empty cells and ``None`` (a sample never forgotten) read as NaN. A file of the former layout, with
    ``log_likelihood_ratio`` instead of ``log_ppl_ratio``, reads as the current one (the column negated).
    """
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns: dict[str, np.ndarray] = {}
    for key in rows[0] if rows else []:
        values = [row[key] for row in rows]
        columns[key] = np.array([math.nan if v in ("", "None", "nan") else float(v) for v in values])
    if LEGACY_LOG_LIKELIHOOD_RATIO in columns and "log_ppl_ratio" not in columns:
        columns["log_ppl_ratio"] = -columns.pop(LEGACY_LOG_LIKELIHOOD_RATIO)
    return columns


@dataclass(frozen=True)
class SampleCurves:
    """One run's per-sample forgetting curves as matrices: what ``per_sample.csv`` holds, one row per evaluation."""

    steps: np.ndarray
    """(E,) the step of each evaluation, ascending."""
    indices: np.ndarray
    """(N,) the forget rows' indices, ascending."""
    values: dict[str, np.ndarray]
    """Each of :data:`CURVES` present -> (E, N); NaN where a sample has no value (e.g. no DRO weight yet)."""
    forget_step: np.ndarray
    """(N,) the step at which each sample counted as forgotten; NaN if it never did."""

    @classmethod
    def from_history(
        cls, history: Sequence[Mapping[str, Any]], forget_step_by_index: Mapping[str, Any]
    ) -> SampleCurves:
        """From the in-training history (:func:`write_per_sample`'s arguments); every entry has the same rows."""
        order = np.argsort(np.asarray(history[0]["index"]))
        indices = np.asarray(history[0]["index"])[order]
        values = {c: np.stack([np.asarray(h[c], dtype=float)[order] for h in history]) for c in CURVES}
        forget = [forget_step_by_index.get(str(int(i))) for i in indices]
        return cls(
            steps=np.array([h["step"] for h in history], dtype=float),
            indices=indices,
            values=values,
            forget_step=np.array([math.nan if f is None else float(f) for f in forget]),
        )

    @classmethod
    def from_table(cls, table: Mapping[str, np.ndarray]) -> SampleCurves:
        """From :func:`read_per_sample`'s columns (one row per evaluation and sample, in any order).

        Example: rows (step, index) = (0, 7), (0, 3), (5, 3), (5, 7) give steps [0, 5], indices [3, 7] and 2 x 2
        matrices.
        """
        steps, step_at = np.unique(table["step"], return_inverse=True)
        indices, index_at = np.unique(table["index"], return_inverse=True)
        values = {}
        for curve in CURVES:
            if curve in table:
                matrix = np.full((len(steps), len(indices)), np.nan)
                matrix[step_at, index_at] = table[curve]
                values[curve] = matrix
        forget = np.full(len(indices), np.nan)
        if "forget_step" in table:
            forget[index_at] = table["forget_step"]  # the same on every evaluation of a row
        return cls(steps=steps, indices=indices.astype(int), values=values, forget_step=forget)


def read_sample_curves(path: str | os.PathLike[str]) -> SampleCurves:
    """``per_sample.csv`` as :class:`SampleCurves`."""
    return SampleCurves.from_table(read_per_sample(path))


# --------------------------------------------------------------------------------------------------------------
# The retain reference


def tofu_remake_hint(path: Path, forget_split: str) -> str:
    """How to make the right TOFU retain reference at ``path`` (ends the messages of a reference that does not fit)."""
    return (
        f"make the right one by evaluating the retain model with the same split: `python -m baldro_lightning evaluate "
        f"--model <retain model> --benchmark <benchmark> --forget_split {forget_split} --out {path}`"
    )


def muse_remake_hint(path: Path, corpus: str) -> str:
    """How to make the MUSE retain reference at ``path``."""
    return (
        "make it by evaluating the retain model on the same data: `python -m baldro_lightning evaluate-muse "
        f"--model <retain model> --benchmark <benchmark> --corpus {corpus} --out {path}`"
    )


def describe_indices(keys: Sequence[int]) -> str:
    """``"N rows (indices a..b)"`` for a contiguous range, else the first few indices: for error messages."""
    if not keys:
        return "0 rows"
    ordered = sorted(keys)
    contiguous = ordered == list(range(ordered[0], ordered[0] + len(ordered)))
    shown = f"{ordered[0]}..{ordered[-1]}" if contiguous else ", ".join(map(str, ordered[:6])) + ", ..."
    return f"{len(ordered)} rows (indices {shown})"


def question_digest(questions: Sequence[str]) -> str:
    """A short fingerprint of a split's questions, in order: ``meta.question_digests[<split>]`` of an ``eval.json``.

    Two evaluations scored the same rows exactly when their digests agree; the split name and the row count alone
    do not tell a re-exported or other benchmark's split from the same one.
    """
    text = "\n".join(question.strip() for question in questions)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _unscorable_rows(data: Mapping[str, Any], split: str) -> set[int]:
    """The rows of ``split`` the reference's ``meta.unscorable_rows`` says had no answer token to score.

    Those rows are null in the reference for a reason it records (the evaluator leaves them out of every aggregate,
    and so does forget quality); nulls it does not account for mean a damaged file.
    """
    recorded = (data.get("meta", {}).get("unscorable_rows") or {}).get(split) or []
    return {int(index) for index in recorded}


def _check_same_questions(
    file: Path,
    data: Mapping[str, Any],
    split: str,
    questions: Sequence[str] | None,
    benchmark: str | None,
    remake_hint: str,
) -> None:
    """A reference that records the digest of ``split`` must have scored exactly ``questions`` (in order).

    References written before digests were recorded carry none and are not checked.
    """
    recorded = (data["meta"].get("question_digests") or {}).get(split)
    if questions is None or recorded is None or recorded == question_digest(questions):
        return
    theirs = data["meta"].get("benchmark")
    where = f" (it read {theirs!r}, this evaluation reads {benchmark!r})" if theirs and benchmark else ""
    raise EvalLogError(
        f"retain reference {file} scored other questions of {split} than this evaluation{where}: the same split "
        f"name and row count, but question digest {recorded} against {question_digest(questions)}; {remake_hint}"
    )


def _load_tofu_reference(path: str | os.PathLike[str], forget_split: str) -> tuple[Path, dict[str, Any]]:
    file = Path(path)
    if not file.is_file():
        what = "is a directory, not a file" if file.is_dir() else "does not exist"
        raise EvalLogError(
            f"retain reference {file} {what} (expected the eval.json of the retain model on {forget_split}); "
            f"{tofu_remake_hint(file, forget_split)}"
        )
    data = load_eval_json(file)
    found = data["meta"].get("forget_split")
    if found is not None and found != forget_split:
        raise EvalLogError(
            f"retain reference {file} was made on forget split {found!r}, but this evaluation uses {forget_split!r}; "
            f"{tofu_remake_hint(file, forget_split)}"
        )
    return file, data


def _row_value(value: Any) -> float:
    """A per-row number of our layout (a float) or open-unlearning's (``{"score": x}``); ``None`` is NaN."""
    if isinstance(value, Mapping):
        value = value.get("score")
    return math.nan if value is None else float(value)


def reference_truth_ratios(
    path: str | os.PathLike[str],
    forget_split: str,
    n_rows: int,
    indices: Sequence[int] | None = None,
    questions: Sequence[str] | None = None,
    benchmark: str | None = None,
    subset: bool = False,
) -> np.ndarray:
    """The retain model's raw per-row forget truth ratios, checked against this evaluation's rows (methods §3.4).

    Args:
        path: The retain model's ``eval.json`` (or an open-unlearning ``TOFU_EVAL.json``).
        forget_split: The forget split of this evaluation; must equal the reference's.
        n_rows: Number of forget rows of this evaluation.
        indices: Their row indices; ``range(n_rows)`` when omitted.
        questions: Their questions (of ``<forget_split>_perturbed``), in row order; checked against the
            reference's ``meta.question_digests`` when it records one.
        benchmark: This evaluation's benchmark, named in the message when the questions differ.
        subset: The evaluation scores only some of the reference's rows (the rows a relearning attack held out):
            the reference must hold every one of ``indices``, and may hold more.

    Returns:
        (n_rows,) truth ratios ordered as ``sorted(indices)``.

    Raises:
        EvalLogError: the file is missing, was made on another forget split or other questions, has no
            ``forget_truth_ratio``, holds different rows, or holds null (non-finite) truth ratios that its notes do not
            account for (``meta.unscorable_rows``: rows without an answer token); the message names
            the file, what was expected and found, and how to remake it.
    """
    file, data = _load_tofu_reference(path, forget_split)
    hint = tofu_remake_hint(file, forget_split)
    expected = sorted(range(n_rows) if indices is None else (int(i) for i in indices))
    entry = data["metrics"].get("forget_truth_ratio", data["metrics"].get("forget_Truth_Ratio"))
    if not isinstance(entry, Mapping) or not isinstance(entry.get("value_by_index"), Mapping):
        raise EvalLogError(
            f"retain reference {file} has no per-row forget_truth_ratio (value_by_index); it was evaluated without "
            f"the forget metrics; {tofu_remake_hint(file, forget_split)}"
        )
    by_index = entry["value_by_index"]
    try:
        found = sorted(int(k) for k in by_index)
    except ValueError as err:
        raise EvalLogError(f"retain reference {file}: forget_truth_ratio has a non-integer row key ({err})") from err
    if (not set(expected) <= set(found)) if subset else found != expected:
        raise EvalLogError(
            f"retain reference {file} holds forget truth ratios for {describe_indices(found)} but this evaluation "
            f"of {forget_split} has {describe_indices(expected)} (a different --limit or split); "
            f"{tofu_remake_hint(file, forget_split)}"
        )
    _check_same_questions(file, data, f"{forget_split}_perturbed", questions, benchmark, hint)
    try:
        values = np.array([_row_value(by_index[str(i)]) for i in expected], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise EvalLogError(f"retain reference {file}: forget_truth_ratio holds a non-number ({err}); {hint}") from err
    undefined = [i for i, value in zip(expected, values, strict=True) if not math.isfinite(value)]
    if undefined and not set(undefined) <= _unscorable_rows(data, f"{forget_split}_perturbed"):
        raise EvalLogError(
            f"retain reference {file} holds null (or non-finite) forget truth ratios for {describe_indices(undefined)} "
            f"of its {len(expected)}, so forget quality would be undefined; {hint}"
        )
    return values


def reference_min_k_auc(
    path: str | os.PathLike[str], forget_split: str, rows: Mapping[str, int] | None = None
) -> float | None:
    """The retain model's ``mia_min_k`` AUC (PrivLeak reference, methods §3.6), or ``None`` if the file has none.

    Args:
        path: The retain model's ``eval.json``.
        forget_split: The forget split of this evaluation; must equal the reference's.
        rows: Row counts of this evaluation's member and non-member splits (e.g. ``{"forget10_perturbed": 400,
            "holdout10": 400}``); checked against the reference's ``meta.rows`` when it records them.

    Raises:
        EvalLogError: the file is missing, was made on another forget split, or scored other row counts.
    """
    file, data = _load_tofu_reference(path, forget_split)
    return _checked_min_k_auc(file, data, rows, tofu_remake_hint(file, forget_split))


def reference_privleak_auc(
    path: str | os.PathLike[str], corpus: str, rows: Mapping[str, int] | None = None
) -> float | None:
    """The retain model's ``mia_min_k`` AUC from its MUSE ``eval.json`` (or open-unlearning ``MUSE_EVAL.json``).

    Args:
        path: The retain model's evaluation file.
        corpus: This evaluation's MUSE corpus; must equal the reference's when it records one.
        rows: Row counts of this evaluation's privleak splits, checked against the reference's ``meta.rows``.

    Returns:
        The AUC, or None when the file holds no ``mia_min_k``.

    Raises:
        EvalLogError: the file is missing or unreadable, is a TOFU evaluation, was made on the other corpus, or
            scored other row counts.
    """
    file, data = _load_muse_reference(path, corpus)
    return _checked_min_k_auc(file, data, rows, muse_remake_hint(file, corpus))


def _load_muse_reference(path: str | os.PathLike[str], corpus: str) -> tuple[Path, dict[str, Any]]:
    file = Path(path)
    if not file.is_file():
        raise EvalLogError(f"retain reference {file} does not exist; {muse_remake_hint(file, corpus)}")
    data = load_eval_json(file)
    meta = data["meta"]
    found = meta.get("corpus")
    if found is None and meta.get("forget_split") is not None:
        raise EvalLogError(
            f"retain reference {file} is a TOFU evaluation (forget split {meta['forget_split']!r}), not a MUSE one; "
            f"{muse_remake_hint(file, corpus)}"
        )
    if found is not None and found != corpus:
        raise EvalLogError(
            f"retain reference {file} was made on MUSE corpus {found!r}, but this evaluation uses {corpus!r}; "
            f"{muse_remake_hint(file, corpus)}"
        )
    return file, data


def _checked_min_k_auc(
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


def reference_row_losses(
    path: str | os.PathLike[str],
    members: Sequence[int],
    nonmembers: Sequence[int],
    forget_split: str | None = None,
    corpus: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A reference model's per-row mean NLLs (its ``mia_loss`` scores) of this evaluation's members and non-members.

    What the Reference attack subtracts (:func:`~baldro_lightning.evaluation.metrics.mia_reference`): read from the
    reference model's evaluation of the same rows, so no second model is loaded. Our layout keeps them in
    ``mia_loss.value_by_index`` / ``holdout_value_by_index``, open-unlearning's in ``mia_loss.forget`` /
    ``holdout`` ``.value_by_index`` (``{"score": x}``).

    Args:
        path: The reference model's ``eval.json`` (TOFU with ``forget_split``, MUSE with ``corpus``).
        members: Row indices of this evaluation's members (forget rows).
        nonmembers: Row indices of its non-members (holdout rows).
        forget_split: The TOFU forget split of this evaluation.
        corpus: The MUSE corpus of this evaluation.

    Returns:
        ``(member losses, non-member losses)`` in the order of ``members`` and ``nonmembers``; NaN where the
        reference stored null.

    Raises:
        EvalLogError: the file is missing, was made on other data, has no per-row ``mia_loss`` (evaluated without
            the MIA group), or lacks some of the rows.
    """
    if forget_split is not None:
        file, data = _load_tofu_reference(path, forget_split)
        hint = tofu_remake_hint(file, forget_split)
    else:
        file, data = _load_muse_reference(path, corpus or "")
        hint = muse_remake_hint(file, corpus or "")
    entry = data["metrics"].get("mia_loss")
    if not isinstance(entry, Mapping):
        raise EvalLogError(
            f"reference {file} has no mia_loss, which the Reference attack needs; it was evaluated without the MIA "
            f"metrics; {hint}"
        )
    if "forget" in entry and "holdout" in entry:  # open-unlearning's layout
        sides = (entry["forget"].get("value_by_index"), entry["holdout"].get("value_by_index"))
    else:
        sides = (entry.get("value_by_index"), entry.get("holdout_value_by_index"))
    out = []
    for name, by_index, wanted in zip(("member", "non-member"), sides, (members, nonmembers), strict=True):
        missing = [int(i) for i in wanted if not isinstance(by_index, Mapping) or str(int(i)) not in by_index]
        if missing:
            raise EvalLogError(
                f"reference {file} has no mia_loss {name} score of {describe_indices(missing)} that this evaluation "
                f"scores (a different --limit or split); {hint}"
            )
        out.append(np.array([_row_value(by_index[str(int(i))]) for i in wanted], dtype=np.float64))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------------------
# Attack records


def default_attack_dir(log_dir: str | os.PathLike[str]) -> Path:
    """``<log_dir>/attacks``: where the attack callback writes when it sets no ``dirpath``."""
    return Path(log_dir) / ATTACKS_DIR


def attack_paths(attack_dir: str | os.PathLike[str], name: str) -> dict[str, Path]:
    """The files of entry ``name`` of an attack directory: ``eval`` (eval.json), ``record`` (attack.json) and
    ``per_sample`` (per_sample.csv); the unattacked entries hold an ``eval`` only."""
    folder = Path(attack_dir) / name
    return {"eval": folder / EVAL_JSON, "record": folder / ATTACK_JSON, "per_sample": folder / PER_SAMPLE_CSV}


def write_attack_record(
    attack_dir: str | os.PathLike[str],
    name: str,
    record: Mapping[str, Any],
    per_sample: Sequence[Mapping[str, Any]],
) -> Path:
    """Write one attack's ``attack.json`` and ``per_sample.csv`` (both atomically); returns the ``attack.json`` path.

    Args:
        attack_dir: The attack directory.
        name: The attack's entry (its name).
        record: ``{"meta": {...}, "recovery": {metric: {"before", "after", "delta"}}}``.
        per_sample: Rows with the keys of :data:`ATTACK_PER_SAMPLE_COLUMNS`.
    """
    paths = attack_paths(attack_dir, name)
    missing = [key for key in ("meta", "recovery") if key not in record]
    if missing:
        raise ValueError(f"attack record {name!r} lacks {missing}; it needs meta and recovery")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ATTACK_PER_SAMPLE_COLUMNS)
    for row in per_sample:
        writer.writerow([_csv_cell(row[column]) for column in ATTACK_PER_SAMPLE_COLUMNS])
    write_text_atomic(paths["per_sample"], buffer.getvalue())
    return write_eval_json(record, paths["record"])


def _csv_cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return "" if value is None else str(value)


def read_attack_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An ``attack.json``: ``{"meta", "recovery"}``.

    Raises:
        EvalLogError: the file is missing, is not JSON, or lacks ``meta`` or ``recovery``.
    """
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalLogError(f"{file} cannot be read as an attack record ({err}); re-run the attack") from err
    if not isinstance(data, dict) or not all(isinstance(data.get(key), dict) for key in ("meta", "recovery")):
        raise EvalLogError(f"{file} is not an attack record (no meta/recovery); re-run the attack that wrote it")
    return data


def run_attack_records(run: str | os.PathLike[str]) -> list[Path]:
    """A run directory's attack records (``attack.json``), by attack name.

    Searched in ``<run>/attacks``, ``<run>/<logger name>/attacks`` and ``<run>/<name>/version_N/attacks``, as
    :func:`run_step_evals` searches evaluations.
    """
    directory = Path(run)
    found: list[Path] = []
    for prefix in ("", "*/", "*/version_*/"):
        found += directory.glob(f"{prefix}{ATTACKS_DIR}/*/{ATTACK_JSON}")
    return sorted(found, key=lambda p: p.parent.name)
