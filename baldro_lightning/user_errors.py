"""What a user error is, and how a command turns one into the first line a user reads.

A **user error** is a bad value the user gave (a flag, a config entry, a file, a row) that the project rejects
before or while running. It is:

- a :class:`UserInputError`: raised by the project's own validation (rows, splits, files, checkpoints, retain
  references, output locations; :class:`~baldro_lightning.data.rows.BenchmarkDataError`,
  :class:`~baldro_lightning.evaluation.run_record.EvalLogError`, the sweep's and the report's errors derive from
  it), or made at the boundary where a command builds objects from its arguments: a constructor's
  ``ValueError`` (the project's constructors validate their arguments and raise ``ValueError``, style rule 11)
  and a parser's error (:class:`CommandParser`, :func:`describe_argument_error`) become one there;
- or ``NonFiniteLossError``: training diverged; its message names the step, the rows and the fix.

``python -m baldro_lightning`` prints a user error as ``error: <message>`` on stderr, in the vocabulary of the
command that was run (:func:`in_vocabulary`), and exits with status 2, without a traceback unless ``--debug`` (or
``BALDRO_DEBUG=1``) asks for one. Every other exception is a programming error and keeps its traceback.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from typing import NoReturn

USER_ERROR_STATUS = 2
"""Exit status of a command stopped by a user error (argparse's status for a usage error)."""


class UserInputError(ValueError):
    """A bad value the user gave; the message names the flag or file (and row, field), the bad value and the fix.

    Its message is the whole story: the entry point prints it without a traceback.
    """


class CommandParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are :class:`UserInputError` s (printed once, by the entry point)."""

    def error(self, message: str) -> NoReturn:
        raise UserInputError(f"{message}; see `{self.prog} --help`")


# --------------------------------------------------------------------------------------------------------------
# jsonargparse's errors

_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":')
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_EXPECTED = re.compile(r"^Expected a (.+?)\. Got value: (.*)$", re.DOTALL)
_CLASS_TYPE = re.compile(r"^<class '(?:builtins\.)?([\w.]+)'>$")
_LITERAL = re.compile(r"^typing\.Literal\[(.*)\]$")


def _expected_text(expected: str, got: str) -> str:
    """``expected a float, got 'nan'`` from jsonargparse's ``Expected a <class 'float'>. Got value: nan``."""
    if match := _CLASS_TYPE.match(expected):
        expected = match.group(1)
    elif match := _LITERAL.match(expected):
        expected = f"one of {match.group(1)}"
    if not expected.startswith("one of"):
        expected = f"{'an' if expected[:1].lower() in 'aeiou' else 'a'} {expected}"
    note = " (nan and inf are not numbers a run can use)" if got.strip().lower().lstrip("+-") in {"nan", "inf"} else ""
    return f"expected {expected}, got {got.strip()!r}{note}"


def describe_argument_error(error: BaseException, help_command: str) -> str:
    """One line for a jsonargparse parse error: the flag, what was wrong with its value, and where help is.

    jsonargparse reports a bad value deep inside a config as a chain of errors (``Parser key "model"`` → the
    ``class_path`` it names → ``Parser key "forget_objective"`` → ... → ``Expected a <class 'float'>. Got value:
    nan``), printed as one nested "Does not validate against any of the Union subtypes" dump. Each link of the
    chain (``__cause__``) adds one key; the last link says what is wrong.

    Args:
        error: The ``ArgumentError`` a parser built with ``exit_on_error=False`` raised.
        help_command: The command whose ``--help`` lists the options, e.g. ``python -m baldro_lightning fit``.

    Returns:
        ``--model.forget_objective.tau: expected a float, got 'nan' ...; see `<help_command> --help```.
    """
    keys: list[str] = []
    class_path = None
    innermost: BaseException = error
    node: BaseException | None = error
    while node is not None:
        text = str(node).strip()
        if match := _PARSER_KEY.match(text):
            if not keys or keys[-1] != match.group(1):
                keys.append(match.group(1))
        if match := re.match(r"^Problem with given class_path '([^']+)'", text):
            class_path = match.group(1)
        innermost = node
        node = node.__cause__
    detail = str(innermost).strip()
    if match := _NOT_ACCEPTED.match(detail):
        keys.append(match.group(1))
        owner = class_path.rsplit(".", 1)[-1] if class_path else "this section"
        detail = f"{owner} has no option {match.group(1)!r}; check its spelling"
        if class_path and len(keys) > 1:
            section = ".".join(k for k in keys[:-1] if k != "init_args")
            help_command = f"{help_command} --{section}.help {owner}"
            return f"--{_flag(keys)}: {detail} (`{help_command}` lists its options)"
    elif match := _EXPECTED.match(detail):
        detail = _expected_text(match.group(1), match.group(2))
    elif match := re.match(r"^the following arguments are required: (.*)$", detail):
        names = [name.strip() for name in match.group(1).split(",")]
        detail = "missing " + ", ".join(name if name.startswith("-") else f"--{name}" for name in names)
    elif match := re.match(r"^Expected a dot import path string: (.*)$", detail):
        detail = (
            f"{match.group(1).strip()!r} is not a class this option accepts (a name of the project's classes or an "
            "import path such as package.module.Class); check the spelling"
        )
    else:
        detail = detail.splitlines()[0] if detail else type(innermost).__name__
    where = f"--{_flag(keys)}: " if keys else ""
    return f"{where}{detail}; see `{help_command} --help`"


def _flag(keys: list[str]) -> str:
    """``model.forget_objective.tau`` from the keys of a chain (``init_args`` levels dropped, as flags allow)."""
    parts = [part for key in keys for part in key.split(".") if part != "init_args"]
    return ".".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Vocabulary


def in_vocabulary(message: str, names: Mapping[str, str]) -> str:
    """``message`` with the flags of other commands replaced by the current command's (``names``: theirs -> ours).

    The data and model code names the training flags (``--data.max_length``), the evaluation code the
    ``evaluate`` flags (``--batch_size``); each command maps the others' names to its own. A flag is replaced only
    as a whole name (``--data.max_length`` is not a part of ``--data.max_length_x``), and text between backticks
    (a command to run, quoted literally) is left as it is.

    Example: with ``{"--data.max_length": "--max_length"}``, "raise --data.max_length." becomes
    "raise --max_length.", and "`... fit --data.max_length 64`" stays.
    """
    if not names:
        return message
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.-])({alternatives})(?!\w|\.\w)")
    parts = message.split("`")
    for k in range(0, len(parts), 2):  # even parts lie outside backticks
        parts[k] = pattern.sub(lambda match: names[match.group(1)], parts[k])
    return "`".join(parts)
