"""``python -m baldro_lightning {fit,validate,test} --config X.yaml``: LightningCLI over the project's modules.

The project's LightningModules, data modules, losses, objectives and callbacks are imported here so that
jsonargparse knows them as subclasses of the types the CLI asks for: short class names then work on the command
line and in YAML (``--model UnlearningModule``, ``--model.forget_objective DV``), besides full ``class_path``\\ s.

A bad value reaches the user as one :class:`ConfigError` whose message is the project's own sentence: a parse error
as the flag and what is wrong with it (not jsonargparse's nested "Does not validate against any of the Union
subtypes" dump), a constructor's check as its message with the config key of the object that raised it, and a
``nan``/``inf`` anywhere in the config as an error of its own. Before the subcommand runs, :meth:`BaldroCLI.preflight`
checks what can be checked without training: output directories, the model's files, ``--ckpt_path``, the data and
the evaluation callbacks' retain references. Lightning's start-up messages are held until those checks pass, so a
bad input's error is the first line the command prints.

One callback of the composed list is changed by its class name: ``--trainer.callbacks.ExportPretrained.dirpath=X``
(or ``...ExportPretrained.init_args.dirpath=X``, the key form sweep grids use) sets that argument of every
``ExportPretrained`` in the list and leaves the other callbacks as the configs made them.
"""

from __future__ import annotations

import dataclasses
import json
import linecache
import logging
import math
import os
import re
import shutil
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Iterator, Mapping, Sequence
from logging.handlers import BufferingHandler
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import ArgumentParser, Namespace, set_parsing_settings
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from baldro_lightning.atomic_files import check_writable

# Imported for their classes (see the module docstring); callbacks and export also for the run-directory check.
from baldro_lightning.data import datamodule, muse  # noqa: F401
from baldro_lightning.evaluation import callbacks as evaluation_callbacks
from baldro_lightning.evaluation.callbacks import ScheduledEvaluation
from baldro_lightning.evaluation.muse import MuseSettings
from baldro_lightning.evaluation.run_record import PER_SAMPLE_CSV, default_eval_dir
from baldro_lightning.evaluation.tofu import TofuSettings
from baldro_lightning.train import checkpointing, export, losses, module, objectives, sharding  # noqa: F401
from baldro_lightning.train.export import ExportPretrained, check_checkpoint_fits, checkpoint_policy_shapes
from baldro_lightning.train.models import check_model_files, model_shapes
from baldro_lightning.user_errors import UserInputError, describe_argument_error

log = logging.getLogger(__name__)

# Losses, objectives and LoRA options are dataclasses documented field by field; without this, --help shows no
# description for their arguments.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

PROGRAM = "python -m baldro_lightning"
"""How the commands are started; ``--help`` and error messages name it (instead of ``__main__.py``)."""

VOCABULARY: dict[str, str] = {
    # The evaluation settings are the `settings:` block of an evaluation callback in a training config.
    **{f"--{f.name}": f"settings.{f.name}" for s in (TofuSettings, MuseSettings) for f in dataclasses.fields(s)},
    "--benchmark": "--data.benchmark",
    "--forget_split": "--data.forget_split",
    "--corpus": "--data.corpus",
    "--max_length": "--data.max_length",
    "--chat": "--data.template.chat",
    "--system_prompt": "--data.template.system_prompt",
    "--date_string": "--data.template.date_string",
    "--question_prefix": "--data.template.question_prefix",
    "--answer_prefix": "--data.template.answer_prefix",
    "--answer_separator": "--data.template.answer_separator",
    "--attention_from": "--data.attention_from",
}
"""The ``evaluate`` flags that messages name, as a training config names them (``user_errors.in_vocabulary``)."""

_CHECKPOINT_ALIASES = {"last", "best", "hpc"}
"""``--ckpt_path`` values Lightning resolves itself (not files)."""


class ConfigError(UserInputError):
    """A command-line or config value that LightningCLI cannot parse or the project's classes reject."""


class HeldMessages:
    """Lightning's log records and the warnings of parsing and building the objects, kept until released.

    Released with ``show=True`` they are emitted as they would have been; with ``show=False`` (a bad input) they
    are dropped, so the error is the first thing the command prints.
    """

    LOGGERS = ("lightning.pytorch", "lightning.fabric")
    """Lightning's loggers: seed, accelerator, tips."""

    def __init__(self) -> None:
        self._buffer = BufferingHandler(capacity=1 << 30)
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
        self._warnings: warnings.catch_warnings | None = None
        self._caught: list[warnings.WarningMessage] = []

    def hold(self) -> None:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.handlers[:], logger.propagate))
            logger.handlers, logger.propagate = [self._buffer], False
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()

    def release(self, show: bool) -> None:
        """Restore the loggers and warnings; emit what was held when ``show``. Idempotent."""
        if self._warnings is None:
            return
        self._warnings.__exit__(None, None, None)
        self._warnings = None
        for logger, handlers, propagate in self._saved:
            logger.handlers, logger.propagate = handlers, propagate
        self._saved = []
        if show:
            for record in self._buffer.buffer:
                logging.getLogger(record.name).handle(record)
            for caught in self._caught:
                warnings.showwarning(caught.message, caught.category, caught.filename, caught.lineno)
        self._buffer.buffer.clear()


CALLBACK_KEY = "trainer.callbacks."
"""Prefix of an override key that edits one callback of the list by class name: ``trainer.callbacks.<Class>.<arg>``."""

_CALLBACK_FLAG = re.compile(r"--trainer\.callbacks\.(?P<key>[A-Z]\w*\..+)")
"""A command-line flag ``--trainer.callbacks.<Class>.<arg>[=value]``: a capitalised class name, then its argument.

jsonargparse's own ``--trainer.callbacks.<arg>`` (lower-case, no class) edits the last callback of the list and is
left to it.
"""


class CallbackEditError(UserInputError):
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
                f"--{CALLBACK_KEY}{key}: name a callback and one of its arguments, "
                f"--{CALLBACK_KEY}<Class>.<arg> (e.g. --{CALLBACK_KEY}ExportPretrained.dirpath)"
            )
        targets = [entry for entry in out if callback_class_name(entry) == name]
        if not targets:
            have = ", ".join(sorted({callback_class_name(entry) for entry in out})) or "none"
            raise CallbackEditError(
                f"--{CALLBACK_KEY}{key} names callback {name!r}, but the composed config has only: {have}; "
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
                # One line naming the edited flag, as for any other bad value (user_errors.describe_argument_error).
                flag = f"--{CALLBACK_KEY}{callback_class_name(entry)}."
                text = describe_argument_error(err, f"{PROGRAM} fit")
                raise CallbackEditError(
                    text.replace("--callback.help", "--trainer.callbacks.help").replace("--callback.", flag)
                ) from None


class BaldroCLI(LightningCLI):
    """Any LightningModule/DataModule by ``class_path``; the data module's tokenizer is the model's (a link).

    ``--trainer.default_root_dir`` is the run directory: the logger's ``save_dir`` is linked to it (one given in a
    config is replaced), so the saved ``config.yaml``, checkpoints and evaluations (under the logger's directory)
    follow it, and so does the exported model (``ExportPretrained`` without a ``dirpath``). Composed configs thus
    name a run once, on the command line. ``fit`` refuses a directory that holds another run's outputs unless
    ``--ckpt_path`` resumes that run or ``--overwrite=true`` deletes them (:func:`claim_run_directory`).
    """

    def __init__(self, *args: Any, debug: bool = False, **kwargs: Any) -> None:
        """LightningCLI's arguments; bad values raise :class:`ConfigError` (or another ``UserInputError``).

        Args:
            *args: Passed to ``LightningCLI``.
            debug: Show Lightning's held start-up messages even when a bad input stops the command.
            **kwargs: Passed to ``LightningCLI``.
        """
        self._held = HeldMessages()
        self._subcommand_name = "fit"
        self._checkpoint_shapes: dict[str, tuple[int, ...]] | None = None
        self._held.hold()
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self._held.release(show=debug)
            raise
        self._held.release(show=True)

    def init_parser(self, **kwargs: Any):
        # Parse errors as exceptions, so parse_arguments can turn them into one line instead of jsonargparse's
        # usage text and nested dump.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model", "data.init_args.tokenizer")
        # Lightning's own rule for the directory: the working directory when none is given.
        parser.link_arguments(
            "trainer.default_root_dir", "trainer.logger.init_args.save_dir", compute_fn=_run_directory
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: delete the outputs of an earlier run in the run directory (--trainer.default_root_dir) and "
            "start afresh; without it, fit refuses such a directory unless --ckpt_path resumes that run",
        )

    # -- bad values as one message ------------------------------------------------------------------------------
    def parse_arguments(self, parser, args) -> None:
        given = [str(a) for a in args] if isinstance(args, list | tuple) else sys.argv[1:] if args is None else []
        self._subcommand_name = next((a for a in given if a in self.subcommands()), self._subcommand_name)
        for path in _config_files(given):
            _check_yaml(path)
        if any(arg.startswith(("--data.tokenizer", "--data.init_args.tokenizer")) for arg in given):
            # jsonargparse silently replaces a link target's value with the linked one.
            raise ConfigError(
                "--data.tokenizer cannot be set: the CLI sets it from --model.model (the model directory's own "
                "tokenizer), so a value given here would be ignored; drop it and keep the tokenizer files in the "
                "model directory"
            )
        try:
            self._parse_with_callback_edits(parser, args)
        except ArgumentError as err:
            raise ConfigError(describe_argument_error(err, f"{PROGRAM} {self._subcommand_name}")) from err
        # Before LightningCLI reads the checkpoint's hyperparameters into the config (_parse_ckpt_path).
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and str(ckpt_path) not in _CHECKPOINT_ALIASES:
            self._checkpoint_shapes = checkpoint_policy_shapes(ckpt_path, "--ckpt_path")

    def _parse_with_callback_edits(self, parser: LightningArgumentParser, args: Any) -> None:
        """LightningCLI's parsing, plus edits of one callback by class name (``--trainer.callbacks.<Class>.<arg>``).

        jsonargparse alone applies ``--trainer.callbacks.<arg>`` to the last callback of the list, so an edit by class
        name is done in two passes: parse without the edits to get the composed callback list, then parse again with
        the edited list given as ``--trainer.callbacks``, which validates each value against its class's signature
        and puts it in the saved ``config.yaml``.
        """
        if isinstance(args, dict | Namespace) or (args is None and len(sys.argv) <= 1):
            return super().parse_arguments(parser, args)
        argv = list(sys.argv[1:] if args is None else args)
        edits, rest = split_callback_flags(argv)
        if not edits or any(arg in ("-h", "--help") for arg in rest):
            self.config = parser.parse_args(argv)
            return
        # --print_config would print the unedited config and exit during the first pass.
        first = parser.parse_args([arg for arg in rest if not arg.startswith("--print_config")])
        prefix = f"{first.subcommand}." if first.get("subcommand") else ""
        callbacks = first.get(f"{prefix}trainer.callbacks") or []
        plain = [entry.as_dict() if hasattr(entry, "as_dict") else entry for entry in callbacks]
        edited = edited_callbacks(plain, edits)
        _check_edited(edited, {key.split(".", 1)[0] for key in edits})
        self.config = parser.parse_args([*rest, f"--trainer.callbacks={json.dumps(edited)}"])

    def _subcommand_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        for key, value in _leaves(self._subcommand_config().as_dict()):
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(
                    f"--{key}={value}: nan and inf are not numbers a run can use; give a finite number (check the "
                    "config files and the command line for this key)"
                )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            message = self._rejection(err)
            if message is None:
                raise
            raise ConfigError(message) from err

    def _rejection(self, err: BaseException) -> str | None:
        """The project's sentence for an error raised while building the config's objects, or None when the error
        is not a rejected value (a programming error keeps its traceback)."""
        chain = [err]
        while chain[-1].__cause__ is not None:
            chain.append(chain[-1].__cause__)
        innermost = chain[-1]
        if any(isinstance(link, MisconfigurationException) for link in chain):
            found = next(link for link in chain if isinstance(link, MisconfigurationException))
            return f"--trainer: {found}"
        owner = _constructor_owner(innermost)
        if not isinstance(innermost, UserInputError) and not (isinstance(innermost, ValueError) and owner):
            return None
        message = str(innermost)
        key = None if owner is None or "--" in message.split(";")[0] else self._config_key_of(type(owner))
        return message if key is None else f"--{key}: {message}"

    def _config_key_of(self, cls: type) -> str | None:
        """The config key (``model.forget_objective``) of the one object of class ``cls`` the config names."""
        wanted = f"{cls.__module__}.{cls.__qualname__}"
        keys = [key for key, value in _nodes(self._subcommand_config().as_dict()) if value.get("class_path") == wanted]
        return keys[0] if len(keys) == 1 else None

    # -- pre-flight ---------------------------------------------------------------------------------------------
    def before_fit(self) -> None:
        self.preflight("fit")
        # One directory per run, checked after every other input so that a bad one deletes nothing.
        config = self.config[self.subcommand]
        claim_run_directory(self.trainer, config.get("ckpt_path"), bool(config.get("overwrite")))
        # The flag acts once, on the directory as found: the saved config.yaml must not carry it, or fitting that
        # config again would delete this run.
        config["overwrite"] = False
        self._held.release(show=True)

    def before_validate(self) -> None:
        self.preflight("validate")
        self._held.release(show=True)

    def before_test(self) -> None:
        self.preflight("test")
        self._held.release(show=True)

    def before_predict(self) -> None:
        self.preflight("predict")
        self._held.release(show=True)

    def preflight(self, stage: str) -> None:
        """Check, before any weight loads or any file is written, what would otherwise fail later: every output
        directory can be written, the model's files are whole and of the config's shapes, ``--ckpt_path`` is a
        readable checkpoint of that model, the data loads, and the evaluation callbacks' references fit it.
        The ``before_<stage>`` hooks show Lightning's held start-up messages once it (and, for ``fit``, the
        run-directory check) passed."""
        trainer = self.trainer
        check_writable(trainer.default_root_dir, "--trainer.default_root_dir", "directory")
        for logger in trainer.loggers:
            if getattr(logger, "save_dir", None) is not None:
                check_writable(logger.save_dir, f"the save_dir of {type(logger).__name__}", "directory")
        for callback in trainer.callbacks:
            if isinstance(callback, ExportPretrained):
                check_writable(callback.directory(trainer), "the model directory of ExportPretrained", "directory")
            elif getattr(callback, "dirpath", None) is not None:
                check_writable(callback.dirpath, f"the dirpath of {type(callback).__name__}", "directory")
        model_path = getattr(self.model, "model_path", None)
        if model_path is not None:
            check_model_files(model_path, "--model.model")
        if self._checkpoint_shapes is not None and model_path is not None:
            ckpt_path = str(self.config_init[self.subcommand].get("ckpt_path"))
            flags = ("--ckpt_path", "--model.model")
            check_checkpoint_fits(self._checkpoint_shapes, model_shapes(model_path), ckpt_path, model_path, flags)
        if self.datamodule is not None:
            self.datamodule.setup(stage)
            for callback in trainer.callbacks:
                if isinstance(callback, ScheduledEvaluation):
                    callback.prepare(self.datamodule)


def _config_files(args: list[str]) -> list[str]:
    """The values of ``--config``/``-c`` on a command line."""
    files = []
    for position, arg in enumerate(args):
        if arg in ("--config", "-c") and position + 1 < len(args):
            files.append(args[position + 1])
        elif arg.startswith("--config="):
            files.append(arg.removeprefix("--config="))
    return files


def _check_yaml(path: str) -> None:
    """A config file that exists must be YAML; jsonargparse's own message does not say which file is broken."""
    if not os.path.isfile(path):
        return  # jsonargparse names a missing file itself
    try:
        with open(path, encoding="utf-8") as handle:
            yaml.safe_load(handle)
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path} is not UTF-8 text ({err}); re-save it as UTF-8") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--config {path}{where}: not valid YAML ({problem}); fix the file") from err


def _constructor_owner(error: BaseException) -> object | None:
    """The project object whose ``__init__``/``__post_init__`` raised ``error`` with its own ``raise`` statement.

    The project's constructors check their arguments and raise ``ValueError`` naming the bad value (style rule 11),
    so such an error is a rejected config value. One raised anywhere else (a helper, a library, ``int("x")`` or a
    failed unpacking inside the constructor) is not, and keeps its traceback.
    """
    traceback = error.__traceback__
    last = None
    while traceback is not None:
        last, traceback = traceback, traceback.tb_next
    if last is None or last.tb_frame.f_code.co_name not in ("__init__", "__post_init__"):
        return None
    line = linecache.getline(last.tb_frame.f_code.co_filename, last.tb_lineno).strip()
    owner = last.tb_frame.f_locals.get("self")
    if not line.startswith("raise ") or owner is None:
        return None
    return owner if type(owner).__module__.startswith("baldro_lightning.") else None


def _leaves(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """``(flag-style key, value)`` for every scalar of a parsed config (``init_args`` levels left out)."""
    if isinstance(value, dict):
        for name, child in value.items():
            part = "" if name == "init_args" else str(name)
            yield from _leaves(child, f"{key}.{part}".strip(".") if part else key)
    elif isinstance(value, list | tuple):
        for position, child in enumerate(value):
            yield from _leaves(child, f"{key}[{position}]")
    else:
        yield key, value


def _nodes(value: Any, key: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(flag-style key, mapping)`` for every mapping of a parsed config."""
    if isinstance(value, dict):
        yield key, value
        for name, child in value.items():
            part = "" if name == "init_args" else str(name)
            yield from _nodes(child, f"{key}.{part}".strip(".") if part else key)
    elif isinstance(value, list | tuple):
        for position, child in enumerate(value):
            yield from _nodes(child, f"{key}[{position}]")


def _run_directory(default_root_dir: str | None) -> str:
    return os.getcwd() if default_root_dir is None else default_root_dir


class RunDirectoryError(UserInputError):
    """``fit`` would write into a directory that holds another run's outputs."""


def _listed(directory: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted(path for pattern in patterns for path in directory.glob(pattern)) if directory.is_dir() else []


def run_outputs(trainer: L.Trainer) -> list[Path]:
    """What a fit with ``trainer`` writes that is already on disk: an earlier run's logs, checkpoints, evaluations
    and exported model where this one would put its own.

    The logger's files (TensorBoard events, ``hparams.yaml``, ``metrics.csv``; not ``config.yaml``, which may be the
    input config itself), every ``ModelCheckpoint``'s ``*.ckpt``, every evaluation callback's ``step_*`` and
    ``per_sample.csv``, and a non-empty export directory.
    """
    log_dir = checkpointing.log_directory(trainer)
    found = _listed(log_dir, ("events.out.tfevents.*", "hparams.yaml", "metrics.csv"))
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint):
            found += _listed(Path(callback.dirpath or log_dir / "checkpoints"), ("*.ckpt",))
        elif isinstance(callback, evaluation_callbacks.ScheduledEvaluation):
            eval_dir = Path(callback.dirpath) if callback.dirpath else default_eval_dir(log_dir)
            found += _listed(eval_dir, ("step_*", PER_SAMPLE_CSV))
        elif isinstance(callback, export.ExportPretrained):
            directory = callback.directory(trainer)
            if directory.is_dir() and any(directory.iterdir()):
                found.append(directory)
    return list(dict.fromkeys(found))


def claim_run_directory(trainer: L.Trainer, ckpt_path: str | None, overwrite: bool) -> None:
    """Refuse to fit where another run's outputs are, unless resuming that run or told to overwrite them.

    Args:
        trainer: The trainer about to fit (nothing written yet).
        ckpt_path: ``--ckpt_path``: a resume, which continues the run whose outputs are there.
        overwrite: ``--overwrite``: delete those outputs first (on global rank 0) and start afresh.

    Raises:
        RunDirectoryError: outputs are there and neither flag says what to do with them, or both flags are given.
    """
    found = run_outputs(trainer)
    if not found:
        return
    root = trainer.default_root_dir
    if ckpt_path is not None and overwrite:
        raise RunDirectoryError(
            f"--overwrite=true deletes the run in --trainer.default_root_dir={root}, --ckpt_path={ckpt_path} resumes "
            "it: pass one of them"
        )
    if ckpt_path is not None:
        return
    if overwrite:
        if rank_zero_only.rank == 0:
            for path in found:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            log.warning("--overwrite: removed %d outputs of the earlier run in %s", len(found), root)
        return
    last = [str(p) for p in found if p.name == "last.ckpt"]
    shown = ", ".join(map(str, found[:4])) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    raise RunDirectoryError(
        f"--trainer.default_root_dir={root} holds another run's outputs ({shown}); a new run there would mix its "
        f"files with them. Resume that run with --ckpt_path={last[0] if last else '<its checkpoint>'}, give this "
        "run its own directory with --trainer.default_root_dir, or pass --overwrite=true to delete them and start "
        "again"
    )


def cli_main(args: list[str] | None = None, run: bool = True, debug: bool = False) -> BaldroCLI:
    """Build (and with ``run``, run) the CLI on ``args``, or on the process's command line when None.

    Raises:
        UserInputError: a bad value (:class:`ConfigError` for the command line and configs), found before the
            subcommand loads weights or writes anything where it can be.
    """
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
        debug=debug,
        parser_kwargs=parser_kwargs(),
    )


def parser_kwargs() -> dict[str, Any]:
    """The main parser's and every subcommand parser's options: named after :data:`PROGRAM`, no option prefixes.

    ``allow_abbrev=False``: argparse would otherwise take ``--trainer.max_epoch=3`` as ``--trainer.max_epochs``.
    """
    strict = {"allow_abbrev": False}
    return {"prog": PROGRAM, **strict, **{name: dict(strict) for name in LightningCLI.subcommands()}}
