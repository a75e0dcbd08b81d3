"""TOFU benchmark splits: the schema of every config, loading from a local directory or the Hub, row validation.

Each TOFU config (methods §1.1) is one list of QA rows. :func:`load_split` reads it from a local directory of
``{name}.jsonl`` / ``{name}.json`` files or, when the source is not a directory, from a Hugging Face Hub dataset id
(``locuslab/TOFU``). Every row is checked against the split's :class:`SplitSchema` before anything downstream sees
it, so a broken export fails here with the file, row, field and fix instead of as a tokeniser error or a NaN metric.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baldro_lightning.data.rows import (
    BenchmarkDataError,
    NumberedRows,
    check_object,
    check_string,
    fetch_hub_rows,
    number_rows,
    read_rows_file,
    shorten,
)

_FIX_ROW = "fix or remove that row, or re-export the split from the `locuslab/TOFU` dataset"


@dataclass(frozen=True)
class SplitSchema:
    """What every row of one TOFU config must hold."""

    rows: int
    """Number of rows in the published dataset (methods §1.1); informative, not enforced, so small test files load."""
    string_fields: tuple[str, ...] = ("question", "answer")
    """Fields that must be non-empty strings."""
    perturbed_answers: int | None = None
    """Required length of the ``perturbed_answer`` list, or ``None`` when the split has no such field."""


def _forget_perturbed(rows: int) -> SplitSchema:
    return SplitSchema(rows=rows, string_fields=("question", "answer", "paraphrased_answer"), perturbed_answers=5)


TOFU_SPLITS: dict[str, SplitSchema] = {
    "full": SplitSchema(rows=4000),
    "forget01": SplitSchema(rows=40),
    "forget05": SplitSchema(rows=200),
    "forget10": SplitSchema(rows=400),
    "retain99": SplitSchema(rows=3960),
    "retain95": SplitSchema(rows=3800),
    "retain90": SplitSchema(rows=3600),
    "holdout01": SplitSchema(rows=40),
    "holdout05": SplitSchema(rows=200),
    "holdout10": SplitSchema(rows=400),
    "forget01_perturbed": _forget_perturbed(40),
    "forget05_perturbed": _forget_perturbed(200),
    "forget10_perturbed": _forget_perturbed(400),
    "retain_perturbed": _forget_perturbed(400),
    "real_authors_perturbed": SplitSchema(rows=100, perturbed_answers=3),
    "world_facts_perturbed": SplitSchema(rows=117, perturbed_answers=3),
    "real_authors": SplitSchema(rows=100),
    "world_facts": SplitSchema(rows=117),
}
"""Every TOFU config name (methods §1.1) and the schema its rows must satisfy."""

_OPTIONAL_STRING_FIELDS = ("paraphrased_question",)
# forget percentage -> retain percentage of the complementary split (methods §1.1 "Split pairing").
_RETAIN_OF_FORGET = {"01": "99", "05": "95", "10": "90"}


def split_pairing(forget_split: str) -> tuple[str, str, str]:
    """Name the splits that go with a forget split.

    Args:
        forget_split: ``forget01``, ``forget05`` or ``forget10``.

    Returns:
        ``(retain, holdout, perturbed)`` config names, e.g. ``("retain90", "holdout10", "forget10_perturbed")``.

    Raises:
        BenchmarkDataError: ``forget_split`` is not one of the three forget splits.
    """
    percent = forget_split.removeprefix("forget")
    if not forget_split.startswith("forget") or percent not in _RETAIN_OF_FORGET:
        valid = ", ".join(f"forget{p}" for p in _RETAIN_OF_FORGET)
        raise BenchmarkDataError(
            f"forget split {forget_split!r} has no retain/holdout pairing; use one of {valid} (methods §1.1) as "
            "--data.forget_split"
        )
    return f"retain{_RETAIN_OF_FORGET[percent]}", f"holdout{percent}", f"{forget_split}_perturbed"


def load_split(source: str | os.PathLike[str], name: str) -> list[dict[str, Any]]:
    """Load and validate one TOFU config.

    Args:
        source: A local directory holding ``{name}.jsonl`` or ``{name}.json`` (a JSON list or JSON lines), or a
            Hub dataset id such as ``locuslab/TOFU``. A source that exists as a directory is read locally; any
            other value is treated as a Hub id.
        name: A key of :data:`TOFU_SPLITS`.

    Returns:
        One plain dict per row, in file order, holding every field of the row plus ``index``: the row's 0-based
        position in the split (the key for per-row evaluation results).

    Raises:
        BenchmarkDataError: unknown split, missing file or directory, unreachable Hub, unreadable bytes, malformed
            JSON, an empty split, a row that breaks the split's :class:`SplitSchema`, or (in a forget or holdout
            split, whose rows are identified one by one) a question that occurs twice.
    """
    if name not in TOFU_SPLITS:
        raise BenchmarkDataError(
            f"unknown TOFU split {name!r}; valid names: {', '.join(TOFU_SPLITS)}; correct the split name where it "
            "was given (--data.forget_split, --data.retain_split, --data.splits or --data.val_splits)"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        origin, unit, rows = _read_local(path, name)
    else:
        origin, unit, rows = f"Hub dataset {source!r} (config {name!r})", "row", _fetch_hub(str(source), name)
    validated = [_validate_row(row, TOFU_SPLITS[name], f"{origin}, {unit} {number}") for number, row in rows]
    if name.startswith(("forget", "holdout")):
        _check_distinct_questions(validated, [number for number, _ in rows], origin, unit)
    return number_rows(
        validated,
        f"{origin} holds no rows; split {name!r} should have {TOFU_SPLITS[name].rows}; re-export the split from "
        "`locuslab/TOFU`",
    )


def _read_local(directory: Path, name: str) -> tuple[str, str, NumberedRows]:
    """Read ``{name}.jsonl`` or ``{name}.json`` from ``directory``.

    Returns:
        The file path, the unit that numbers its rows (``line`` for JSON lines, ``row`` for a JSON list) and the
        parsed rows, each with its 1-based number in that unit.
    """
    candidates = [directory / f"{name}.jsonl", directory / f"{name}.json"]
    file = next((c for c in candidates if c.is_file()), None)
    not_files = [c for c in candidates if c.exists() and not c.is_file()]
    if file is None and not_files:
        raise BenchmarkDataError(
            f"{not_files[0]} is a directory, not a file; split {name!r} must be one {name}.jsonl file (one JSON "
            "object per line): replace the directory with that file"
        )
    if file is None:
        present = sorted(p.name for p in directory.iterdir() if p.suffix in {".json", ".jsonl"})
        listing = ", ".join(present) if present else "no .json/.jsonl files"
        raise BenchmarkDataError(
            f"{directory} has no {name}.jsonl or {name}.json (it holds: {listing}); point --data.benchmark at the "
            f"directory that holds the TOFU splits as {{split}}.jsonl, e.g. --data.benchmark /path/to/tofu_jsonl"
        )
    unit, rows = read_rows_file(file, _FIX_ROW)
    return str(file), unit, rows


def _fetch_hub(source: str, name: str) -> NumberedRows:
    """Load ``source``/``name`` (split ``train``) with ``datasets``."""
    return fetch_hub_rows(
        source,
        name,
        "train",
        not_a_directory=lambda kind: (
            f"--data.benchmark {source!r} {kind}; pass the directory that holds {name}.jsonl, or a Hub dataset id "
            "such as locuslab/TOFU"
        ),
        unreachable=lambda reason: (
            f"could not fetch TOFU split {name!r} from the Hub dataset {source!r} ({reason}); pass a local "
            f"directory instead, e.g. --data.benchmark /path/to/tofu_jsonl holding {name}.jsonl (one JSON object "
            "per line), exported once on a machine with network access"
        ),
    )


def _validate_row(row: Any, schema: SplitSchema, where: str) -> dict[str, Any]:
    row = check_object(row, schema.string_fields, where, _FIX_ROW)
    for field in schema.string_fields:
        check_string(row[field], f"{where}: field {field!r}", _FIX_ROW)
    for field in _OPTIONAL_STRING_FIELDS:
        if row.get(field) is not None:
            check_string(row[field], f"{where}: optional field {field!r}", _FIX_ROW)
    if schema.perturbed_answers is not None:
        _check_perturbed(row.get("perturbed_answer"), schema.perturbed_answers, where, "perturbed_answer" in row)
    return dict(row)


def _check_perturbed(value: Any, expected: int, where: str, present: bool) -> None:
    field = f"{where}: field 'perturbed_answer'"
    if not present:
        raise BenchmarkDataError(
            f"{where}: missing field 'perturbed_answer' (a list of {expected} strings); {_FIX_ROW}"
        )
    if not isinstance(value, list):
        raise BenchmarkDataError(
            f"{field} must be a list of {expected} strings, got {type(value).__name__} {shorten(repr(value))}; "
            f"{_FIX_ROW}"
        )
    if len(value) != expected:
        raise BenchmarkDataError(
            f"{field} must hold {expected} answers, got {len(value)}: {shorten(repr(value))}; {_FIX_ROW}"
        )
    for position, entry in enumerate(value):
        check_string(entry, f"{field}[{position}]", _FIX_ROW)


def _check_distinct_questions(rows: list[dict[str, Any]], numbers: list[int], origin: str, unit: str) -> None:
    """A forget or holdout split lists each question once: a duplicate would be trained on and counted twice.

    Real TOFU has no duplicate question in these splits (its ``full`` and ``retain*`` splits hold one question twice,
    with two different answers, and are not checked).
    """
    first: dict[str, int] = {}
    for number, row in zip(numbers, rows, strict=True):
        question = row["question"].strip()
        if question in first:
            raise BenchmarkDataError(
                f"{origin}, {unit}s {first[question]} and {number}: the question {shorten(question, 60)!r} occurs "
                "twice; each row of a forget or holdout split must be a distinct question (a duplicate is unlearned "
                f"and scored twice, skewing per-row metrics); remove {unit} {number}"
            )
        first[question] = number


def split_location(source: str | os.PathLike[str], name: str) -> str:
    """Where split ``name`` of ``source`` is read from, for messages: the local file, or the Hub dataset."""
    directory = Path(source).expanduser()
    for suffix in (".jsonl", ".json"):
        if (directory / f"{name}{suffix}").is_file():
            return str(directory / f"{name}{suffix}")
    return f"Hub dataset {str(source)!r} (config {name!r})"


def check_perturbed_alignment(
    source: str | os.PathLike[str],
    forget_split: str,
    forget: list[dict[str, Any]],
    perturbed: list[dict[str, Any]],
) -> None:
    """The perturbed split lists the forget split's rows in the same order (row ``i`` is the same question).

    Training identifies a forget row by its index in ``forget_split``, evaluation by its index in
    ``<forget_split>_perturbed``; per-sample DRO weights and forgetting curves join the two by that index. Rows in
    another order would attach each weight to another question, silently.

    Args:
        source: The benchmark (directory or Hub id), for messages.
        forget_split: ``forget01``, ``forget05`` or ``forget10``.
        forget: Its rows (:func:`load_split`).
        perturbed: The rows of ``<forget_split>_perturbed`` (all, or the first N of an evaluation ``limit``).

    Raises:
        BenchmarkDataError: naming both files, the first row that differs, and both questions.
    """
    perturbed_split = f"{forget_split}_perturbed"
    where = f"{split_location(source, perturbed_split)} and {split_location(source, forget_split)}"
    if len(perturbed) > len(forget):
        raise BenchmarkDataError(
            f"{where} do not hold the same rows: {len(perturbed)} against {len(forget)}; re-export {perturbed_split} "
            f"with exactly the rows of {forget_split}"
        )
    for position, (pert, row) in enumerate(zip(perturbed, forget, strict=False)):
        if pert["question"].strip() != row["question"].strip():
            raise BenchmarkDataError(
                f"{where} differ at row {position} (0-based; line {position + 1} of a JSON-lines file): "
                f"{shorten(pert['question'], 60)!r} against {shorten(row['question'], 60)!r}; the two files must "
                "list the same questions in the same order (per-sample weights and curves are joined by row): "
                f"re-export {perturbed_split} in the order of {forget_split}"
            )
