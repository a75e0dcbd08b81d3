"""Reading benchmark rows from JSON / JSON-lines files or the Hub, and checking them, for every benchmark.

:mod:`baldro_lightning.data.tofu` and :mod:`baldro_lightning.data.muse` know their splits and schemas; this module knows
how rows are read and what a broken row looks like. Every error is a :class:`BenchmarkDataError` that names the
file (or Hub dataset), the line or row, the field and the fix, so a broken export fails here rather than as a
tokeniser error or a NaN metric.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from baldro_lightning.user_errors import UserInputError

HUB_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
"""Environment flags under which no split is fetched from the Hub."""
_TRUE_STRINGS = {"1", "on", "yes", "true"}

NumberedRows = list[tuple[int, Any]]
"""Parsed rows, each with its 1-based line (JSON lines) or row (JSON list, Hub) number."""


class BenchmarkDataError(UserInputError):
    """A benchmark split is missing, unreadable or holds a row that breaks its schema."""


def shorten(value: Any, limit: int = 80) -> str:
    """``value`` (``repr`` unless a string) cut to ``limit`` characters for an error message."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_rows_file(file: Path, fix: str) -> tuple[str, NumberedRows]:
    """Parse a ``.jsonl`` file (JSON lines) or a ``.json`` file (one JSON list, or JSON lines).

    Args:
        file: The file.
        fix: What to do about a malformed row; ends the error message.

    Returns:
        The unit that numbers the rows (``line`` for JSON lines, ``row`` for a JSON list) and the parsed rows.

    Raises:
        BenchmarkDataError: bytes that are not UTF-8, or malformed JSON; the message names the line.
    """
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
    # A .json file is either one JSON list or JSON lines; a list starts with "[", a JSON-lines row with "{".
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise BenchmarkDataError(
                f"{file}, line {err.lineno}: malformed JSON ({err.msg}, column {err.colno}); {fix}"
            ) from err
        return "row", list(enumerate(data, start=1))
    return "line", list(_parse_json_lines(file, text, fix))


def _parse_json_lines(file: Path, text: str, fix: str) -> Iterable[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # a trailing newline or a blank separator line is not a row
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise BenchmarkDataError(
                f"{file}, line {number}: malformed JSON ({err.msg}, column {err.colno}): {shorten(line)}; {fix}"
            ) from err


def fetch_hub_rows(
    source: str,
    config: str,
    split: str,
    not_a_directory: Callable[[str], str],
    unreachable: Callable[[str], str],
) -> NumberedRows:
    """Load a split with ``datasets.load_dataset(source, config, split=split)``; rows come numbered from 1.

    Args:
        source: The ``--benchmark`` value that is not an existing directory.
        config: The dataset config (TOFU: the split name; MUSE: ``knowmem``, ``raw``...).
        split: The split of that config.
        not_a_directory: Message for a ``source`` that looks like a path, given ``"does not exist"`` or
            ``"is a file, not a directory"``.
        unreachable: Message for a Hub that cannot be reached, given the reason.

    Raises:
        BenchmarkDataError: ``source`` looks like a local path, an offline flag is set, or loading failed.
    """
    looks_like_path = source.startswith((".", "~", os.sep)) or source.count("/") > 1 or Path(source).exists()
    if looks_like_path:
        raise BenchmarkDataError(
            not_a_directory("is a file, not a directory" if Path(source).exists() else "does not exist")
        )
    # datasets reads its offline flags once at import, so a flag set later (or in a test) would be missed and
    # load_dataset could block on the network; check the environment ourselves first.
    offline = [var for var in HUB_OFFLINE_VARS if os.environ.get(var, "").strip().lower() in _TRUE_STRINGS]
    if offline:
        raise BenchmarkDataError(unreachable(f"{offline[0]} is set"))
    # Imported here: `datasets` takes seconds to import and local runs never need it.
    import datasets
    from huggingface_hub.errors import HFValidationError

    try:
        dataset = datasets.load_dataset(source, config, split=split)
    except (OSError, ValueError, HFValidationError) as err:  # network, Hub HTTP errors, missing config or split
        raise BenchmarkDataError(unreachable(f"{type(err).__name__}: {shorten(str(err))}")) from err
    return [(number, dict(row)) for number, row in enumerate(dataset, start=1)]


def check_object(row: Any, fields: Sequence[str], where: str, fix: str) -> Mapping[str, Any]:
    """``row`` must be a JSON object holding every field of ``fields``.

    Args:
        row: A parsed row.
        fields: Required fields.
        where: ``"<file>, line <n>"`` (or the Hub equivalent), the start of every message.
        fix: What to do about the row; ends every message.
    """
    if not isinstance(row, Mapping):
        raise BenchmarkDataError(
            f"{where}: expected a JSON object with fields {', '.join(fields)}, got {type(row).__name__} "
            f"{shorten(repr(row))}; {fix}"
        )
    for field in fields:
        if field not in row:
            raise BenchmarkDataError(
                f"{where}: missing field {field!r} (row has {', '.join(map(str, row)) or 'no fields'}); {fix}"
            )
    return row


def check_string(value: Any, what: str, fix: str, allow_empty: bool = False) -> None:
    """``value`` must be a string, and not empty or whitespace unless ``allow_empty``.

    Args:
        value: The field's value.
        what: ``"<where>: field '<name>'"``, the start of the message.
        fix: What to do about the row.
        allow_empty: Accept ``""`` and whitespace.
    """
    if not isinstance(value, str):
        raise BenchmarkDataError(f"{what} must be a string, got {type(value).__name__} {shorten(repr(value))}; {fix}")
    if not allow_empty and not value.strip():
        raise BenchmarkDataError(f"{what} is empty or whitespace ({value!r}); {fix}")


def number_rows(rows: list[dict[str, Any]], empty_message: str) -> list[dict[str, Any]]:
    """Give each validated row its 0-based ``index`` in the split (the key of per-row evaluation results).

    Raises:
        BenchmarkDataError: ``rows`` is empty (``empty_message``).
    """
    if not rows:
        raise BenchmarkDataError(empty_message)
    for index, row in enumerate(rows):
        row["index"] = index
    return rows
