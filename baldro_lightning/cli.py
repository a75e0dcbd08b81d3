"""``python -m baldro_lightning {fit,validate,test} --config X.yaml``: LightningCLI over the project's modules.

The project's LightningModules, data modules, losses, objectives and callbacks are imported here so that
jsonargparse knows them as subclasses of the types the CLI asks for: short class names then work on the command
line and in YAML (``--model UnlearningModule``, ``--model.forget_objective DV``), besides full ``class_path``\\ s.

One callback of the composed list is changed by its class name: ``--trainer.callbacks.ExportPretrained.dirpath=X``
(or ``...ExportPretrained.init_args.dirpath=X``, the key form sweep grids use) sets that argument of every
``ExportPretrained`` in the list and leaves the other callbacks as the configs made them.
"""

from __future__ import annotations

import json
import os
import re
import sys
from argparse import ArgumentError
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import yaml
from jsonargparse import ArgumentParser, Namespace, set_parsing_settings
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported for their classes (see the module docstring), not called here.
from baldro_lightning.data import datamodule, muse  # noqa: F401
from baldro_lightning.evaluation import callbacks as evaluation_callbacks  # noqa: F401
from baldro_lightning.train import export, losses, module, objectives, sharding  # noqa: F401

# Losses, objectives and LoRA options are dataclasses documented field by field; without this, --help shows no
# description for their arguments.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


PROG = "python -m baldro_lightning"
"""How the commands are started; ``--help`` and error messages name it (instead of ``__main__.py``)."""

CALLBACK_KEY = "trainer.callbacks."
"""Prefix of an override key that edits one callback of the list by class name: ``trainer.callbacks.<Class>.<arg>``."""

_CALLBACK_FLAG = re.compile(r"--trainer\.callbacks\.(?P<key>[A-Z]\w*\..+)")
"""A command-line flag ``--trainer.callbacks.<Class>.<arg>[=value]``: a capitalised class name, then its argument.

jsonargparse's own ``--trainer.callbacks.<arg>`` (lower-case, no class) edits the last callback of the list and is
left to it.
"""


class CallbackEditError(ValueError):
    """An edit of the callback list names a class the list lacks, or is not ``<Class>[.init_args].<arg>``."""


def callback_class_name(entry: Mapping[str, Any]) -> str:
    """The class name of a ``class_path`` entry: ``ExportPretrained`` for ``...train.export.ExportPretrained``."""
    return str(entry.get("class_path", "")).rsplit(".", 1)[-1]


def edited_callbacks(callbacks: Sequence[Any], edits: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A copy of ``callbacks`` (``class_path`` entries) with each ``{"<Class>.<arg>": value}`` edit applied.

    ``<arg>`` may start with ``init_args.`` and may be nested (``TofuEvaluation.settings.retain_reference``); every
    callback of that class in the list gets the value.

    Raises:
        CallbackEditError: an entry is not a ``class_path`` mapping, a key names no class of the list, or names no
            argument.
    """
    out = []
    for entry in callbacks:
        if not isinstance(entry, Mapping) or "class_path" not in entry:
            raise CallbackEditError(f"callback {entry!r} is not a `class_path:` entry; write it out in the config")
        out.append(json.loads(json.dumps(entry)))
    for key, value in edits.items():
        name, _, arg = key.partition(".")
        path = arg.split(".")
        if path[0] == "init_args":
            path = path[1:]
        if not name or not path or not all(path):
            raise CallbackEditError(
                f"{CALLBACK_KEY}{key}: name a callback and one of its arguments, "
                f"{CALLBACK_KEY}<Class>.<arg> (e.g. {CALLBACK_KEY}ExportPretrained.dirpath)"
            )
        targets = [entry for entry in out if callback_class_name(entry) == name]
        if not targets:
            have = ", ".join(sorted({callback_class_name(entry) for entry in out})) or "none"
            raise CallbackEditError(
                f"{CALLBACK_KEY}{key} names callback {name!r}, but the composed config has only: {have}; "
                f"add it with --trainer.callbacks+={name} or fix the class name"
            )
        for entry in targets:
            target = entry["init_args"] = entry.get("init_args") or {}
            for part in path[:-1]:  # a nested argument, e.g. settings.retain_reference
                if not isinstance(target.get(part), dict):
                    target[part] = {}
                target = target[part]
            target[path[-1]] = value
    return out


def split_callback_flags(args: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The ``--trainer.callbacks.<Class>.<arg>`` flags of a command line, and the other arguments.

    Returns:
        ``({"<Class>.<arg>": value read as YAML, as jsonargparse reads a flag's value}, the other arguments)``.
        ``--flag=value`` and ``--flag value`` are both accepted.
    """
    edits: dict[str, Any] = {}
    rest: list[str] = []
    position = 0
    while position < len(args):
        arg = args[position]
        match = _CALLBACK_FLAG.fullmatch(arg.split("=", 1)[0]) if arg.startswith("--") else None
        if match is None:
            rest.append(arg)
        elif "=" in arg:
            edits[match["key"]] = yaml.safe_load(arg.split("=", 1)[1])
        elif position + 1 < len(args):
            position += 1
            edits[match["key"]] = yaml.safe_load(args[position])
        else:
            raise CallbackEditError(f"{arg} needs a value: {arg}=<value>")
        position += 1
    return edits, rest


def _check_edited(callbacks: Sequence[Mapping[str, Any]], names: set[str]) -> None:
    """Validate the edited callbacks against their classes' signatures, so that a bad value is reported on its own.

    Raises:
        CallbackEditError: naming the callback, the argument and the expected type.
    """
    checker = ArgumentParser(exit_on_error=False)
    checker.add_argument("--callback", type=Callback)
    for entry in callbacks:
        if callback_class_name(entry) in names:
            try:
                checker.parse_object({"callback": entry})
            except ArgumentError as err:
                raise CallbackEditError(f"{CALLBACK_KEY}{callback_class_name(entry)}: {err}") from None


class BaldroCLI(LightningCLI):
    """Any LightningModule/DataModule by ``class_path``; the tokenizer follows the model unless set.

    ``--trainer.default_root_dir`` is the run directory: the logger's ``save_dir`` is linked to it (one given in a
    config is replaced), so the saved ``config.yaml``, checkpoints and evaluations (under the logger's directory)
    follow it, and so does the exported model (``ExportPretrained`` without a ``dirpath``). Composed configs thus
    name a run once, on the command line.
    """

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """LightningCLI's parsing, plus edits of one callback by class name (``--trainer.callbacks.<Class>.<arg>``).

        jsonargparse alone applies ``--trainer.callbacks.<arg>`` to the last callback of the list, so an edit by class
        name is done in two passes: parse without the edits to get the composed callback list, then parse again with
        the edited list given as ``--trainer.callbacks``, which validates each value against its class's signature
        and puts it in the saved ``config.yaml``.
        """
        if isinstance(args, dict | Namespace) or (args is None and len(sys.argv) <= 1):
            return super().parse_arguments(parser, args)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            edits, rest = split_callback_flags(argv)
        except CallbackEditError as err:
            parser.error(str(err))
        if not edits or any(arg in ("-h", "--help") for arg in rest):
            self.config = parser.parse_args(argv)
            return
        # --print_config would print the unedited config and exit during the first pass.
        first = parser.parse_args([arg for arg in rest if not arg.startswith("--print_config")])
        prefix = f"{first.subcommand}." if first.get("subcommand") else ""
        callbacks = first.get(f"{prefix}trainer.callbacks") or []
        plain = [entry.as_dict() if hasattr(entry, "as_dict") else entry for entry in callbacks]
        try:
            edited = edited_callbacks(plain, edits)
            _check_edited(edited, {key.split(".", 1)[0] for key in edits})
        except CallbackEditError as err:
            parser.error(str(err))
        self.config = parser.parse_args([*rest, f"--trainer.callbacks={json.dumps(edited)}"])

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model", "data.init_args.tokenizer")
        # Lightning's own rule for the directory: the working directory when none is given.
        parser.link_arguments(
            "trainer.default_root_dir", "trainer.logger.init_args.save_dir", compute_fn=_run_directory
        )


def _run_directory(default_root_dir: str | None) -> str:
    return os.getcwd() if default_root_dir is None else default_root_dir


def cli_main(args: list[str] | None = None, run: bool = True) -> BaldroCLI:
    """Build (and with ``run``, run) the CLI on ``args``, or on the process's command line when None."""
    return BaldroCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
        parser_kwargs=parser_kwargs(),
    )


def parser_kwargs() -> dict[str, Any]:
    """The main parser's and every subcommand parser's options: named after :data:`PROG`, no option prefixes.

    ``allow_abbrev=False``: argparse would otherwise take ``--trainer.max_epoch=3`` as ``--trainer.max_epochs``.
    """
    strict = {"allow_abbrev": False}
    return {"prog": PROG, **strict, **{name: dict(strict) for name in LightningCLI.subcommands()}}
