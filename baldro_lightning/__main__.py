"""``python -m baldro_lightning <command>``: every command of the toolkit behind one entry point.

``fit``, ``validate`` and ``test`` are LightningCLI's (``--config``, overrides); the others are this package's own
command lines, each defined next to what it runs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from baldro_lightning.analysis import report, sweep
from baldro_lightning.cli import cli_main
from baldro_lightning.embedded import models, muse_world, quickstart, world
from baldro_lightning.evaluation import command as evaluate
from baldro_lightning.robustness import command as attack
from baldro_lightning.train import export
from baldro_lightning.train.distributed import release_process_group

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
"""Subcommands handed to LightningCLI."""

COMMANDS: dict[str, tuple[Callable[[Sequence[str]], Any], str]] = {
    "evaluate": (evaluate.main, "evaluate a saved model on TOFU and write eval.json"),
    "evaluate-muse": (evaluate.muse_main, "evaluate a saved model on one MUSE corpus and write eval.json"),
    "attack": (attack.main, "relearning and quantization attacks on a saved model, scored on TOFU before and after"),
    "attack-muse": (attack.muse_main, "the same attacks scored on one MUSE corpus"),
    "export": (export.main, "turn a training checkpoint into a Hugging Face model directory"),
    "sweep": (sweep.main, "run, resume or script a grid of fit runs"),
    "report": (report.main, "the paper's tables and figures from run directories"),
    "quickstart": (quickstart.main, "the offline embedded benchmark end to end on a CPU"),
    "embedded-world": (world.main, "regenerate the embedded TOFU-shaped benchmark (data/tofu_embedded)"),
    "embedded-muse": (muse_world.main, "regenerate the embedded MUSE-shaped corpus (data/muse_embedded)"),
    "embedded-models": (models.main, "train the embedded tokenizer and write a random tiny Llama"),
}
"""The package's own commands: name -> (main taking the remaining arguments, one-line description)."""

USER_ERRORS: tuple[type[BaseException], ...] = (report.ReportError, sweep.GridError)
"""Errors whose message is the whole story: printed as ``error: ...`` without a traceback."""


def usage() -> str:
    width = max(len(name) for name in (*LIGHTNING_COMMANDS, *COMMANDS))
    lines = ["usage: python -m baldro_lightning <command> [options]   (<command> --help for its options)", ""]
    lines += [
        f"  {name:<{width}}  LightningCLI: {name} a model (--config FILE, overrides)" for name in LIGHTNING_COMMANDS
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    try:
        if name in COMMANDS:
            logging.basicConfig(level=logging.WARNING)
            status = COMMANDS[name][0](rest)
            return status if isinstance(status, int) else 0
        if name in LIGHTNING_COMMANDS or name.startswith("-"):
            # LightningCLI reads sys.argv itself when given no args (and warns when given both).
            cli_main(None if argv is None else args)
            return 0
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        release_process_group()
    print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
