"""Writing files so that a reader never sees a partial one: a temporary sibling, then ``os.replace``.

A run killed or failing while writing leaves the previous file (or none). Used for everything this package writes
as it goes (``eval.json``, ``per_sample.csv``) and for the generated benchmark files, whose bytes must not depend
on the platform (``\\n`` line endings, UTF-8).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO


def write_atomic(path: str | os.PathLike[str], write: Callable[[TextIO], object]) -> Path:
    """Call ``write`` on a UTF-8 text file with ``\\n`` line endings, then put that file at ``path`` in one step.

    Args:
        path: The file to create or replace; its folder is created.
        write: Writes the whole content into the open file (e.g. ``json.dump`` into it).

    Returns:
        The path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as file:
            write(file)
            file.flush()
            # Without fsync a crash just after the rename can leave an empty file under the final name.
            os.fsync(file.fileno())
        os.replace(staging, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise
    return out


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`write_atomic`)."""
    return write_atomic(path, lambda file: file.write(text))


def write_jsonl_atomic(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line, non-ASCII kept as is, keys in the rows' own order (byte-stable output)."""
    return write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
