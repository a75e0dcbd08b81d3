"""TOFU benchmark splits: the schema of every config, loading from a local directory or the Hub, row validation.

Each TOFU config (spec §1.1) is one list of QA rows. :func:`load_split` reads it from a local directory of
``{name}.jsonl`` / ``{name}.json`` files or, when the source is not a directory, from a Hugging Face Hub dataset id
(``locuslab/TOFU``). Every row is checked against the split's :class:`SplitSchema` before anything downstream sees
it, so a broken export fails here with the file, row, field and fix instead of as a tokeniser error or a NaN metric.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_FIX_ROW = "fix or remove that row, or re-export the split from the `locuslab/TOFU` dataset"
_HUB_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
_TRUE_STRINGS = {"1", "on", "yes", "true"}


class BenchmarkDataError(ValueError):
    """A benchmark split is missing, unreadable or holds a row that breaks its schema."""


@dataclass(frozen=True)
class SplitSchema:
    """What every row of one TOFU config must hold."""

    rows: int
    """Number of rows in the published dataset (spec §1.1); informative, not enforced, so small test files load."""
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
"""Every TOFU config name (spec §1.1) and the schema its rows must satisfy."""

_OPTIONAL_STRING_FIELDS = ("paraphrased_question",)
# forget percentage -> retain percentage of the complementary split (spec §1.1 "Split pairing").
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
            f"forget split {forget_split!r} has no retain/holdout pairing; use one of {valid} (spec §1.1) as "
            "--data.forget_split (training) or --forget_split (python -m baldro_lightning.evaluate)"
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
            JSON, an empty split, or a row that breaks the split's :class:`SplitSchema`.
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
    validated = [_validate_row(row, TOFU_SPLITS[name], origin, number, unit) for number, row in rows]
    if not validated:
        expected = TOFU_SPLITS[name].rows
        raise BenchmarkDataError(
            f"{origin} holds no rows; split {name!r} should have {expected}; re-export the split from `locuslab/TOFU`"
        )
    for index, row in enumerate(validated):
        row["index"] = index
    return validated


def _read_local(directory: Path, name: str) -> tuple[str, str, list[tuple[int, Any]]]:
    """Read ``{name}.jsonl`` or ``{name}.json`` from ``directory``.

    Returns:
        The file path, the unit that numbers its rows (``line`` for JSON lines, ``row`` for a JSON list) and the
        parsed rows, each with its 1-based number in that unit.
    """
    candidates = [directory / f"{name}.jsonl", directory / f"{name}.json"]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        present = sorted(p.name for p in directory.iterdir() if p.suffix in {".json", ".jsonl"})
        listing = ", ".join(present) if present else "no .json/.jsonl files"
        raise BenchmarkDataError(
            f"{directory} has no {name}.jsonl or {name}.json (it holds: {listing}); point --data.benchmark at the "
            f"directory that holds the TOFU splits as {{split}}.jsonl, e.g. --data.benchmark /path/to/tofu_jsonl"
        )
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        line = raw.count(b"\n", 0, err.start) + 1
        raise BenchmarkDataError(
            f"{file}, line {line}, byte offset {err.start - line_start} (offset {err.start} in the file): bytes "
            f"{raw[err.start : err.end]!r} are not UTF-8; re-save the file as UTF-8"
        ) from err
    origin = str(file)
    # A .json file is either one JSON list or JSON lines; a list starts with "[", a JSON-lines row with "{".
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise BenchmarkDataError(
                f"{file}, line {err.lineno}: malformed JSON ({err.msg}, column {err.colno}); {_FIX_ROW}"
            ) from err
        return origin, "row", list(enumerate(data, start=1))
    return origin, "line", list(_parse_json_lines(file, text))


def _parse_json_lines(file: Path, text: str) -> Iterable[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # a trailing newline or a blank separator line is not a row
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise BenchmarkDataError(
                f"{file}, line {number}: malformed JSON ({err.msg}, column {err.colno}): {_shorten(line)}; {_FIX_ROW}"
            ) from err


def _hub_unreachable(source: str, name: str, reason: str) -> BenchmarkDataError:
    return BenchmarkDataError(
        f"could not fetch TOFU split {name!r} from the Hub dataset {source!r} ({reason}); pass a local directory "
        f"instead, e.g. --data.benchmark /path/to/tofu_jsonl holding {name}.jsonl (one JSON object per line), "
        f"exported once on a machine with network access"
    )


def _fetch_hub(source: str, name: str) -> list[tuple[int, Any]]:
    """Load ``source``/``name`` with ``datasets``; rows come with their 1-based row number."""
    looks_like_path = source.startswith((".", "~", os.sep)) or source.count("/") > 1 or Path(source).exists()
    if looks_like_path:
        kind = "is a file, not a directory" if Path(source).exists() else "does not exist"
        raise BenchmarkDataError(
            f"--data.benchmark {source!r} {kind}; pass the directory that holds {name}.jsonl, or a Hub dataset id "
            f"such as locuslab/TOFU"
        )
    # datasets reads its offline flags once at import, so a flag set later (or in a test) would be missed and
    # load_dataset could block on the network; check the environment ourselves first.
    offline = [var for var in _HUB_OFFLINE_VARS if os.environ.get(var, "").strip().lower() in _TRUE_STRINGS]
    if offline:
        raise _hub_unreachable(source, name, f"{offline[0]} is set")
    # Imported here: `datasets` takes seconds to import and local runs never need it.
    import datasets
    from huggingface_hub.errors import HFValidationError

    try:
        dataset = datasets.load_dataset(source, name, split="train")
    except (OSError, HFValidationError) as err:  # covers ConnectionError, FileNotFoundError and Hub HTTP errors
        raise _hub_unreachable(source, name, f"{type(err).__name__}: {_shorten(str(err))}") from err
    return [(number, dict(row)) for number, row in enumerate(dataset, start=1)]


def _shorten(value: Any, limit: int = 80) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validate_row(row: Any, schema: SplitSchema, origin: str, number: int, unit: str) -> dict[str, Any]:
    where = f"{origin}, {unit} {number}"
    if not isinstance(row, Mapping):
        raise BenchmarkDataError(
            f"{where}: expected a JSON object with fields {', '.join(schema.string_fields)}, got "
            f"{type(row).__name__} {_shorten(repr(row))}; {_FIX_ROW}"
        )
    for field in schema.string_fields:
        if field not in row:
            raise BenchmarkDataError(
                f"{where}: missing field {field!r} (row has {', '.join(map(str, row)) or 'no fields'}); {_FIX_ROW}"
            )
        _check_string(row[field], f"{where}: field {field!r}")
    for field in _OPTIONAL_STRING_FIELDS:
        if row.get(field) is not None:
            _check_string(row[field], f"{where}: optional field {field!r}")
    if schema.perturbed_answers is not None:
        _check_perturbed(row.get("perturbed_answer"), schema.perturbed_answers, where, "perturbed_answer" in row)
    return dict(row)


def _check_string(value: Any, where: str) -> None:
    if not isinstance(value, str):
        raise BenchmarkDataError(
            f"{where} must be a string, got {type(value).__name__} {_shorten(repr(value))}; {_FIX_ROW}"
        )
    if not value.strip():
        raise BenchmarkDataError(f"{where} is empty or whitespace ({value!r}); {_FIX_ROW}")


def _check_perturbed(value: Any, expected: int, where: str, present: bool) -> None:
    field = f"{where}: field 'perturbed_answer'"
    if not present:
        raise BenchmarkDataError(
            f"{where}: missing field 'perturbed_answer' (a list of {expected} strings); {_FIX_ROW}"
        )
    if not isinstance(value, list):
        raise BenchmarkDataError(
            f"{field} must be a list of {expected} strings, got {type(value).__name__} {_shorten(repr(value))}; "
            f"{_FIX_ROW}"
        )
    if len(value) != expected:
        raise BenchmarkDataError(
            f"{field} must hold {expected} answers, got {len(value)}: {_shorten(repr(value))}; {_FIX_ROW}"
        )
    for position, entry in enumerate(value):
        _check_string(entry, f"{field}[{position}]")
