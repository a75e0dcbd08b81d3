"""Writing files so that a reader never sees a partial one: a temporary sibling, then ``os.replace``.

A run killed or failing while writing leaves the previous file (or none). Used for everything this package writes
as it goes (``eval.json``, ``per_sample.csv``) and for the generated benchmark files, whose bytes must not depend
on the platform (``\\n`` line endings, UTF-8). :func:`check_writable` tells, before a command does any work, whether
its outputs can be written there at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TextIO

from baldro_lightning.user_errors import UserInputError


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


def unwritable_reason(path: str | os.PathLike[str], kind: Literal["file", "directory"]) -> str | None:
    """Why a ``kind`` cannot be created or replaced at ``path``, or None if it can; nothing is created.

    Args:
        path: Where a command will write.
        kind: ``file`` (replaced by :func:`write_atomic`: its folder must be writable) or ``directory``.

    Returns:
        A clause that continues "``<flag> <path>`` ...", e.g. "is a directory, not a file".
    """
    target = Path(path).expanduser()
    if target.exists():
        if kind == "file" and target.is_dir():
            return "is a directory, not a file"
        if kind == "directory" and not target.is_dir():
            return "is a file, not a directory"
        folder = target if kind == "directory" else target.parent
        return None if os.access(folder, os.W_OK | os.X_OK) else f"cannot be written: {folder} is read-only for you"
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot be created: {ancestor} is a file, not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot be created: {ancestor} is read-only for you"
    return None


def check_writable(path: str | os.PathLike[str], flag: str, kind: Literal["file", "directory"]) -> None:
    """Raise :class:`UserInputError` naming ``flag`` if :func:`unwritable_reason` finds a reason.

    Args:
        path: Where a command will write.
        flag: The flag or config key that gave ``path`` (``--out``, ``--trainer.default_root_dir``).
        kind: ``file`` or ``directory``.
    """
    reason = unwritable_reason(path, kind)
    if reason is not None:
        raise UserInputError(f"{flag} {str(path)!r} {reason}; pass a {kind} path you can write to")
