"""Writing files and directories so that a reader never sees a partial one: a staging sibling, then one rename.

A run killed or failing while writing leaves the previous file (or none) under the final name. A process killed
with SIGKILL cannot remove its staging sibling, so the next write of the same path removes what an earlier, killed
write left (:func:`remove_leftovers`). Used for everything this package writes as it goes (``eval.json``,
``per_sample.csv``, exported models, ``last.ckpt``) and for the generated benchmark files, whose bytes must not
depend on the platform (``\\n`` line endings, UTF-8). What is written gets the permissions of any file the process
creates (``0666`` or ``0777`` less the umask), not ``tempfile``'s private ``0600``/``0700``. :func:`check_writable`
tells, before a command does any work, whether its outputs can be written there at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TextIO

from baldro_lightning.user_errors import UserInputError

STAGING_SUFFIX = ".tmp"
"""The suffix of every staging sibling: ``.<name>.<random>.tmp``."""


def staging_pattern(out: Path) -> str:
    """The glob that matches the staging siblings of ``out`` (and no other file of its folder)."""
    return f".{out.name}.*{STAGING_SUFFIX}"


def remove_leftovers(out: Path) -> list[Path]:
    """Remove the staging siblings of ``out`` that a killed earlier write left; returns what was removed.

    Only one writer writes a given path at a time here (rank 0, one command), so a staging sibling that exists
    before a write starts belongs to a write that never finished.
    """
    moved_aside = _moved_aside(out)
    if not out.exists() and moved_aside.exists():
        # A kill between the two renames of replace_path's fallback: the previous version goes back first.
        os.replace(moved_aside, out)
    removed = []
    for leftover in out.parent.glob(staging_pattern(out)):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        removed.append(leftover)
    return removed


def _moved_aside(out: Path) -> Path:
    """Where :func:`replace_path` moves the old directory when it cannot swap atomically."""
    return out.with_name(f".{out.name}.old{STAGING_SUFFIX}")


def _umask() -> int:
    """The process's umask, read without changing it where the kernel reports it (Linux >= 4.7)."""
    with contextlib.suppress(OSError):
        found = re.search(r"^Umask:\s*([0-7]+)$", Path("/proc/self/status").read_text(), re.MULTILINE)
        if found:
            return int(found.group(1), 8)
    # Elsewhere the only way to read it is to set it; the old value is back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    remove_leftovers(out)
    handle, staging = tempfile.mkstemp(prefix=f".{out.name}.", suffix=STAGING_SUFFIX, dir=out.parent)
    try:
        # mkstemp creates the file 0600; the result should read like any other file this process writes.
        os.fchmod(handle, 0o666 & ~_umask())
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


# --------------------------------------------------------------------------------------------------------------
# Directories (exported models) and checkpoint paths (a file, or a directory of shards)


def staging_directory(out: str | os.PathLike[str]) -> Path:
    """A new, empty staging sibling directory of ``out``, after removing what killed earlier writes left.

    Fill it, then move it into place with :func:`replace_path`.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=STAGING_SUFFIX, dir=out.parent))
    # mkdtemp creates the directory 0700; the result should read like any other directory this process makes.
    staging.chmod(0o777 & ~_umask())
    return staging


def staging_name(out: str | os.PathLike[str]) -> Path:
    """The staging sibling of ``out`` for a writer that creates the staged file or directory itself (a checkpoint).

    The same name on every process, so that ranks can write their shards into it together; remove leftovers of a
    killed earlier write (:func:`remove_leftovers`) before writing to it.
    """
    out = Path(out)
    return out.with_name(f".{out.name}.staging{STAGING_SUFFIX}")


def honour_umask(path: str | os.PathLike[str]) -> None:
    """Give a file another writer created privately (``0600``, e.g. through ``mkstemp``) the umask's permissions."""
    path = Path(path)
    if path.is_file():
        path.chmod(0o666 & ~_umask())


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    # ENOSYS/EINVAL/ENOTSUP: no exchange on this kernel or filesystem; anything else is a real failure.
    if error in (38, 22, 95):
        return False
    raise OSError(error, os.strerror(error), str(first), 0, str(second))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def replace_path(staging: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Put ``staging`` (a file or a directory) at ``out``, replacing what is there, so that ``out`` is never missing.

    A file, or anything replacing nothing, is renamed into place. A directory replacing a directory is swapped
    with it in one atomic step where the platform can (Linux ``renameat2``), and the old one, now at the staging
    name, is removed; a kill at any moment leaves the old or the new version at ``out``, and at most the staging
    sibling, which the next write removes. Without an atomic swap (other platforms and filesystems) the old
    directory is moved aside first, so a kill between the two renames leaves ``out`` missing until the next write.

    Returns:
        ``out``.
    """
    staging, out = Path(staging), Path(out)
    both_dirs = staging.is_dir() and out.is_dir() and not out.is_symlink()
    if not both_dirs:
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)  # a directory replaced by a file: nothing can swap those
        os.replace(staging, out)
        return out
    if _exchange(staging, out):
        _remove(staging)
        return out
    old = _moved_aside(out)
    _remove(old)
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old, out)
        raise
    _remove(old)
    return out


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
