"""``python -m baldro_lightning <command>``: every command of the toolkit behind one entry point.

``fit``, ``validate`` and ``test`` are LightningCLI's (``--config``, overrides); the others are this package's own
command lines, each defined next to what it runs.

This is also the one place where a user error (:mod:`baldro_lightning.user_errors`) becomes what the user reads:
``error: <message>`` on stderr, in the command's own vocabulary, and exit status 2, with no traceback unless
``--debug`` (anywhere on the command line) or ``BALDRO_DEBUG=1`` asks for one. Any other exception is a
programming error and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from baldro_lightning import cli
from baldro_lightning.analysis import report, sweep
from baldro_lightning.embedded import models, muse_world, quickstart, world
from baldro_lightning.evaluation import command as evaluate
from baldro_lightning.robustness import command as attack
from baldro_lightning.train import export
from baldro_lightning.train.distributed import release_process_group
from baldro_lightning.train.module import NonFiniteLossError
from baldro_lightning.user_errors import USER_ERROR_STATUS, UserInputError, in_vocabulary

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
"""Subcommands handed to LightningCLI."""


class Command(NamedTuple):
    """One of the package's own commands."""

    main: Callable[[Sequence[str]], Any]
    """Runs the command on the arguments after its name."""
    description: str
    """One line for the usage text."""
    vocabulary: Mapping[str, str] = {}
    """Other commands' flag names that its messages may hold -> its own (``user_errors.in_vocabulary``)."""


COMMANDS: dict[str, Command] = {
    "evaluate": Command(evaluate.main, "evaluate a saved model on TOFU and write eval.json", evaluate.VOCABULARY),
    "evaluate-muse": Command(
        evaluate.muse_main, "evaluate a saved model on one MUSE corpus and write eval.json", evaluate.VOCABULARY
    ),
    "attack": Command(
        attack.main,
        "relearning and quantization attacks on a saved model, scored on TOFU before and after",
        evaluate.VOCABULARY,
    ),
    "attack-muse": Command(attack.muse_main, "the same attacks scored on one MUSE corpus", evaluate.VOCABULARY),
    "export": Command(export.main, "turn a training checkpoint into a Hugging Face model directory", export.VOCABULARY),
    "sweep": Command(sweep.main, "run, resume or script a grid of fit runs"),
    "report": Command(report.main, "the paper's tables and figures from run directories"),
    "quickstart": Command(quickstart.main, "the offline embedded benchmark end to end on a CPU"),
    "embedded-world": Command(world.main, "regenerate the embedded TOFU-shaped benchmark (data/tofu_embedded)"),
    "embedded-muse": Command(muse_world.main, "regenerate the embedded MUSE-shaped corpus (data/muse_embedded)"),
    "embedded-models": Command(models.main, "train the embedded tokenizer and write a random tiny Llama"),
}
"""The package's own commands by name."""

SHOWN_AS_MESSAGES: tuple[type[BaseException], ...] = (UserInputError, NonFiniteLossError)
"""Errors whose message is the whole story (see :mod:`baldro_lightning.user_errors`): no traceback."""

DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "BALDRO_DEBUG"
"""Set to 1 (or pass ``--debug``) for the traceback of a user error."""


def usage() -> str:
    width = max(len(name) for name in (*LIGHTNING_COMMANDS, *COMMANDS))
    lines = ["usage: python -m baldro_lightning <command> [options]   (<command> --help for its options)", ""]
    lines += [
        f"  {name:<{width}}  LightningCLI: {name} a model (--config FILE, overrides)" for name in LIGHTNING_COMMANDS
    ]
    lines += [f"  {name:<{width}}  {command.description}" for name, command in COMMANDS.items()]
    lines += ["", f"{DEBUG_FLAG} (or {DEBUG_VARIABLE}=1): show the traceback of an input error as well"]
    return "\n".join(lines)


def debug_requested(args: Sequence[str]) -> bool:
    """Whether ``--debug`` is among ``args`` or ``BALDRO_DEBUG`` is set to something other than 0/empty."""
    return DEBUG_FLAG in args or os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit status (2 for a user error, printed as ``error: ...``)."""
    given = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(given)
    args = [arg for arg in given if arg != DEBUG_FLAG]
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    vocabulary: Mapping[str, str] = {}
    try:
        if name in COMMANDS:
            logging.basicConfig(level=logging.WARNING)
            vocabulary = COMMANDS[name].vocabulary
            status = COMMANDS[name].main(rest)
            return status if isinstance(status, int) else 0
        if name in LIGHTNING_COMMANDS or name.startswith("-"):
            vocabulary = cli.VOCABULARY
            if argv is None:
                # LightningCLI reads sys.argv itself when given no args (and warns when given both); --debug is ours.
                sys.argv[1:] = args
            cli.cli_main(None if argv is None else args, debug=debug)
            return 0
    except SHOWN_AS_MESSAGES as err:
        if debug:
            raise
        print(f"error: {in_vocabulary(str(err), vocabulary)}", file=sys.stderr)
        return USER_ERROR_STATUS
    finally:
        release_process_group()
    print(f"error: unknown command {name!r}; choose one of these:\n\n{usage()}", file=sys.stderr)
    return USER_ERROR_STATUS


if __name__ == "__main__":
    sys.exit(main())
