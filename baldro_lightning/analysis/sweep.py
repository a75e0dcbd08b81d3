"""``python -m baldro_lightning sweep GRID.yaml``: expand a grid of LightningCLI runs and run, skip or script them.

A grid YAML (see ``experiments/sweeps/``) names base configs and axes::

    root: runs/sweeps/embedded_grid          # every run gets its own directory under here
    configs:                                 # the method x DRO-variant axis: name -> config files, composed in order
      npo: [experiments/embedded/defaults.yaml, experiments/methods/npo.yaml]
      npo_dv: [experiments/embedded/defaults.yaml, experiments/methods/npo.yaml, experiments/objectives/dv.yaml]
    axes:                                    # one run per combination of one value of each axis
      split:                                 # linked values: one label sets several keys together
        values:
          forget01:
            data.init_args.forget_split: forget01
            trainer.callbacks.TofuEvaluation.init_args.settings.retain_reference: runs/embedded/eval/retain99/eval.json
      beta:                                  # a plain axis: one key, a list of values
        key: model.init_args.forget_objective.init_args.tau
        values: [1.0, 2.0]
        configs: ["*_dv*"]                   # fnmatch patterns: the configs this axis applies to (default all)
    set: {trainer.max_epochs: 3}             # overrides for every run
    requires:                                # files that must exist before running, with the command making each
      runs/embedded/eval/retain99/eval.json: python -m baldro_lightning evaluate ...

Keys are LightningCLI override keys (``--model.init_args.optimizer.init_args.lr``). A key
``trainer.callbacks.<Class>.init_args.<arg>`` edits that callback of the base configs' callback list. Each run
directory is ``<root>/<config>__<axis>-<label>__...``, given as ``--trainer.default_root_dir``: the logger follows
it (``baldro_lightning.cli``), and with it the saved config, checkpoints and evaluations, and so does the exported
model; a base config whose callbacks name a ``dirpath`` of their own is rejected, so no two runs share a path.

A finished run has ``DONE.json`` (command, effective config, wall time, final evaluation) and is skipped while
the grid and the contents of its config files still give it the same effective config (``stale`` otherwise, which
stops the sweep with the changed keys); a failed run keeps its log (``sweep.log``) and ``FAILED.json`` and does not
stop the others; a summary is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from baldro_lightning.atomic_files import write_text_atomic
from baldro_lightning.cli import CALLBACK_KEY, CallbackEditError, callback_class_name, cli_main, edited_callbacks
from baldro_lightning.evaluation.run_record import load_eval_json, run_step_evals
from baldro_lightning.user_errors import CommandParser, UserInputError

DONE = "DONE.json"
FAILED = "FAILED.json"
RUN_INFO = "sweep_run.json"
LOG = "sweep.log"
GRID_KEYS = {"root", "configs", "axes", "set", "requires"}
AXIS_KEYS = {"key", "values", "configs"}


class GridError(UserInputError):
    """A grid YAML, its configs or the command-line flags of the sweep are wrong; the message says how to fix it."""


@dataclass(frozen=True)
class Axis:
    """One axis of a grid: labelled values, each a set of override keys."""

    name: str
    values: dict[str, dict[str, Any]]
    """label -> {override key: value}."""
    configs: tuple[str, ...] = ("*",)
    """fnmatch patterns of the config names this axis applies to."""

    def applies_to(self, config_name: str) -> bool:
        return any(fnmatch.fnmatchcase(config_name, pattern) for pattern in self.configs)


@dataclass(frozen=True)
class Grid:
    """A parsed grid YAML."""

    path: Path
    root: Path
    configs: dict[str, tuple[Path, ...]]
    axes: tuple[Axis, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    requires: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One expanded run: its directory and the exact ``fit`` arguments."""

    name: str
    directory: Path
    config: str
    labels: dict[str, str]
    """axis name -> value label."""
    overrides: dict[str, Any]
    """override key -> value, including the path redirects."""
    fit_args: tuple[str, ...]
    """Arguments after ``python -m baldro_lightning fit``."""
    composed: str = "{}"
    """The run's config files composed (:func:`effective_config` with no overrides), as JSON text."""

    def effective_config(self) -> dict[str, Any]:
        """What the run's config files say after its overrides (:func:`effective_config`); ``DONE.json`` records it.

        Computed when asked (for finished runs and when a run is recorded), not for every run of a large grid.
        """
        return _overridden(self.composed, self.overrides)

    def command(self, nproc_per_node: int = 1) -> list[str]:
        if nproc_per_node == 1:
            return [sys.executable, "-m", "baldro_lightning", "fit", *self.fit_args]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}"]
        return [*launcher, "-m", "baldro_lightning", "fit", *self.fit_args, f"--trainer.devices={nproc_per_node}"]


# --------------------------------------------------------------------------------------------------------------
# Grid parsing and expansion


def _format_label(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def cli_value(value: Any) -> str:
    """A YAML value as a LightningCLI command-line value (jsonargparse reads it back as the same YAML value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _parse_axis(name: str, spec: Any, where: str, errors: list[str]) -> Axis | None:
    if not isinstance(spec, dict) or "values" not in spec:
        errors.append(f"{where}: axis {name!r} must be a mapping with `values` (and `key` for a list of values)")
        return None
    unknown = set(spec) - AXIS_KEYS
    if unknown:
        errors.append(f"{where}: axis {name!r} has unknown keys {sorted(unknown)}; allowed: {sorted(AXIS_KEYS)}")
    patterns = spec.get("configs", ["*"])
    if isinstance(patterns, str):
        patterns = [patterns]
    raw = spec["values"]
    values: dict[str, dict[str, Any]] = {}
    if isinstance(raw, list):
        key = spec.get("key")
        if not isinstance(key, str):
            errors.append(f"{where}: axis {name!r} lists values, so it needs `key: <override key>`")
            return None
        for value in raw:
            label = _format_label(value)
            if label in values:
                errors.append(f"{where}: axis {name!r} values give the label {label!r} twice; make the values distinct")
            values[label] = {key: value}
    elif isinstance(raw, dict):
        if "key" in spec:
            errors.append(f"{where}: axis {name!r} has labelled values ({{label: {{key: value}}}}), so drop `key`")
        for label, keys in raw.items():
            if not isinstance(keys, dict) or not keys:
                errors.append(f"{where}: axis {name!r} value {label!r} must map override keys to values")
                continue
            values[_format_label(label)] = dict(keys)
    else:
        errors.append(f"{where}: axis {name!r} `values` must be a list or a mapping, got {type(raw).__name__}")
        return None
    if not values:
        errors.append(f"{where}: axis {name!r} has no values")
        return None
    return Axis(name=name, values=values, configs=tuple(patterns))


def load_grid(path: str | os.PathLike[str], root: str | None = None) -> Grid:
    """Read and check a grid YAML; every problem is reported at once.

    Raises:
        GridError: the file is missing or malformed, or names a config that does not exist.
    """
    file = Path(path)
    if not file.is_file():
        raise GridError(f"grid file {file} does not exist; see experiments/sweeps/ for examples")
    data = yaml.safe_load(file.read_text())
    if not isinstance(data, dict):
        raise GridError(f"{file} must hold a mapping with keys {sorted(GRID_KEYS)}")
    errors: list[str] = []
    unknown = set(data) - GRID_KEYS
    if unknown:
        errors.append(f"{file}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(GRID_KEYS)}")
    root_value = root or data.get("root")
    if not root_value:
        errors.append(f"{file}: set `root:` (the directory that holds the run directories) or pass --root")
    configs: dict[str, tuple[Path, ...]] = {}
    raw_configs = data.get("configs")
    if not isinstance(raw_configs, dict) or not raw_configs:
        errors.append(f"{file}: `configs:` must map run names to config path(s), e.g. `npo: experiments/x/npo.yaml`")
        raw_configs = {}
    for name, paths in raw_configs.items():
        paths = [paths] if isinstance(paths, str) else list(paths or [])
        missing = [p for p in paths if not Path(p).is_file()]
        if not paths or missing:
            errors.append(f"{file}: configs.{name} names missing file(s) {missing or paths} (relative to {Path.cwd()})")
        if _format_label(name) != name or "__" in name:
            errors.append(f"{file}: config name {name!r} must use only letters, digits, '.', '_', '+', '-' (no '__')")
        configs[str(name)] = tuple(Path(p) for p in paths)
    axes = []
    for name, spec in (data.get("axes") or {}).items():
        if _format_label(name) != name or "__" in name:
            errors.append(f"{file}: axis name {name!r} must use only letters, digits, '.', '_', '+', '-' (no '__')")
        axis = _parse_axis(str(name), spec, str(file), errors)
        if axis is not None:
            unmatched = [p for p in axis.configs if not any(fnmatch.fnmatchcase(c, p) for c in configs)]
            if unmatched and configs:
                errors.append(f"{file}: axis {name!r} config patterns {unmatched} match none of {sorted(configs)}")
            axes.append(axis)
    fixed = data.get("set") or {}
    requires = data.get("requires") or {}
    if not isinstance(fixed, dict) or not isinstance(requires, dict):
        errors.append(f"{file}: `set:` and `requires:` must be mappings")
    if errors:
        raise GridError("invalid sweep grid:\n  " + "\n  ".join(errors))
    return Grid(
        path=file,
        root=Path(root_value),
        configs=configs,
        axes=tuple(axes),
        fixed=dict(fixed),
        requires={str(k): str(v) for k, v in requires.items()},
    )


# libyaml's loader when installed: a paper-sized grid reads thousands of runs' worth of configs.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _base_section(configs: Sequence[dict[str, Any]], section: str) -> Any:
    """The value of ``trainer.<section>`` the configs compose to: a later config replaces it, and a list under
    ``<section>+`` (jsonargparse's append, e.g. the attack callback of ``experiments/attacks/``) extends it."""
    found = None
    for data in configs:
        trainer = data.get("trainer") or {}
        if section in trainer:
            found = trainer[section]
        if isinstance(trainer.get(f"{section}+"), list):
            found = [*(found or []), *trainer[f"{section}+"]]
    return found


def _edited_callbacks(callbacks: list[Any], edits: dict[str, Any], where: str) -> list[Any]:
    """The base callback list with ``edits`` (``trainer.callbacks.<Class>.init_args.<arg>: value``) applied."""
    try:
        return edited_callbacks(callbacks, {key[len(CALLBACK_KEY) :]: value for key, value in edits.items()})
    except CallbackEditError as err:
        raise GridError(f"{where}: {err}") from None


def _pinned_outputs(callbacks: list[Any], logger: Any) -> list[str]:
    """Outputs that would not follow ``--trainer.default_root_dir``, so that every run of a grid would share them."""
    pinned = [
        f"{callback_class_name(entry)}.init_args.dirpath={entry['init_args']['dirpath']}"
        for entry in callbacks
        if isinstance(entry, dict) and (entry.get("init_args") or {}).get("dirpath") is not None
    ]
    if isinstance(logger, list):
        # The CLI links default_root_dir to one logger's save_dir only.
        pinned.append("trainer.logger (a list of loggers)")
    return pinned


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base`` as repeated ``--config`` files compose: mappings merge key by key, any other value
    (a list such as ``trainer.callbacks`` included) replaces the earlier one whole."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def effective_config(configs: Sequence[dict[str, Any]], overrides: dict[str, Any]) -> dict[str, Any]:
    """A run's settings as its config files' contents and its override keys compose them, as JSON values.

    Files compose left to right (:func:`_merge`); each override ``a.b.c`` then sets that path. This is what a
    finished run is compared by (:func:`status_of`): editing a base config changes it for every run that does not
    override the edited key, while a change a run overrides anyway does not. Defaults in the source code are not
    part of it.
    """
    composed: dict[str, Any] = {}
    for config in configs:
        composed = _merge(composed, config)
    return _overridden(json.dumps(composed), overrides)


def _overridden(composed: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The composed files (as JSON text, parsed afresh for each run) with the ``overrides`` set."""
    config = json.loads(composed)
    for key, value in overrides.items():
        *parents, last = key.split(".")
        target = config
        for name in parents:
            if not isinstance(target.get(name), dict):
                target[name] = {}
            target = target[name]
        # Through JSON, so that what DONE.json holds compares equal to what a fresh expansion gives.
        target[last] = json.loads(json.dumps(value))
    return config


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two JSON values (``[prefix]`` when they differ otherwise)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        return [k for key in keys for k in changed_keys(old.get(key), new.get(key), f"{prefix}.{key}".lstrip("."))]
    return [] if old == new else [prefix or "<config>"]


def expand(grid: Grid, extra: dict[str, Any] | None = None) -> list[Run]:
    """Every run of ``grid``, in a stable order (configs, then axes, as written).

    Args:
        grid: the parsed grid.
        extra: overrides applied to every run after the grid's ``set:`` (the ``--set`` flags).

    Raises:
        GridError: two runs would share a directory, or a callback override names no callback.
    """
    runs: list[Run] = []
    for config_name, paths in grid.configs.items():
        axes = [axis for axis in grid.axes if axis.applies_to(config_name)]
        configs = [yaml.load(path.read_text(), Loader=_YAML_LOADER) or {} for path in paths]
        callbacks = _base_section(configs, "callbacks") or []
        composed = json.dumps(effective_config(configs, {}))
        logger = _base_section(configs, "logger")
        for combo in itertools.product(*[list(axis.values.items()) for axis in axes]):
            labels = {axis.name: label for axis, (label, _) in zip(axes, combo, strict=True)}
            name = "__".join([config_name, *(f"{a}-{label}" for a, label in labels.items())])
            directory = grid.root / name
            keys: dict[str, Any] = {}
            for _, values in combo:
                keys.update(values)
            keys.update(grid.fixed)
            keys.update(extra or {})
            if any(k in ("trainer.callbacks", "trainer.default_root_dir") for k in keys):
                raise GridError(
                    f"{grid.path}: run {name} overrides trainer.callbacks or trainer.default_root_dir, which the "
                    "sweep sets per run; edit a callback with trainer.callbacks.<Class>.init_args.<arg> instead"
                )
            edits = {k: v for k, v in keys.items() if k.startswith(CALLBACK_KEY)}
            plain = {k: v for k, v in keys.items() if not k.startswith(CALLBACK_KEY)}
            edited = _edited_callbacks(callbacks, edits, str(grid.path))
            pinned = _pinned_outputs(edited, plain.get("trainer.logger", logger))
            if pinned:
                raise GridError(
                    f"{grid.path}: run {name} would write where every run of the grid writes: {', '.join(pinned)}; "
                    "leave callback dirpaths null (they follow trainer.default_root_dir, the run directory)"
                )
            # The run directory: the logger (linked in baldro_lightning.cli), and with it config.yaml, checkpoints
            # and evaluations, and the exported model all follow it.
            overrides = {**plain, "trainer.default_root_dir": str(directory)}
            if edits:
                overrides["trainer.callbacks"] = edited
            args = [arg for path in paths for arg in ("--config", str(path))]
            args += [f"--{key}={cli_value(value)}" for key, value in overrides.items()]
            runs.append(Run(name, directory, config_name, labels, overrides, tuple(args), composed))
    seen: dict[Path, str] = {}
    for run in runs:
        if run.directory in seen:
            raise GridError(f"{grid.path}: runs share the directory {run.directory}; give the axis values other labels")
        seen[run.directory] = run.name
    return runs


def select(runs: Sequence[Run], patterns: Sequence[str]) -> list[Run]:
    """The runs whose name matches any of the fnmatch ``patterns`` (all runs when there are none)."""
    if not patterns:
        return list(runs)
    picked = [run for run in runs if any(fnmatch.fnmatchcase(run.name, p) for p in patterns)]
    if not picked:
        raise GridError(f"--only {list(patterns)} matches no run; `--dry-run` lists the run names")
    return picked


def parse_set_flags(items: Sequence[str]) -> dict[str, Any]:
    """``--set key=value`` flags; the value is read as YAML (``3`` is an int, ``1e-3`` a float)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise GridError(f"--set {item!r} must look like key=value, e.g. --set trainer.max_epochs=2")
        out[key] = yaml.safe_load(value)
    return out


# --------------------------------------------------------------------------------------------------------------
# Validation through LightningCLI, without instantiating anything


def check_args(fit_args: Sequence[str]) -> str | None:
    """Parse ``fit`` arguments with the project's LightningCLI (``--print_config``); the error's message (one line
    naming the option and what is wrong with it), or None.

    Nothing is instantiated, so no model or data is loaded: this only checks keys, types and class paths.
    """
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    try:
        # LightningCLI warns when it sees command-line arguments besides `args`; here those are the sweep's own.
        sys.argv = argv[:1]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_main(["fit", *fit_args, "--print_config"])
    except UserInputError as error:
        return str(error)
    except SystemExit as exit_:
        if exit_.code in (0, None):
            return None
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        return "\n".join(lines[-6:]) or f"LightningCLI exited with {exit_.code}"
    finally:
        sys.argv = argv
    return None


def check_runs(runs: Sequence[Run]) -> None:
    """Raise one :class:`GridError` listing every run whose arguments LightningCLI rejects."""
    problems = []
    for run in runs:
        message = check_args(run.fit_args)
        if message is not None:
            problems.append(f"run {run.name}: " + message.replace("\n", "\n    "))
    if problems:
        more = f" (and {len(problems) - 1} more run(s), listed below)" if len(problems) > 1 else ""
        raise GridError(
            f"{problems[0]}{more}; fix the grid's keys or values\n  LightningCLI rejects:\n  " + "\n  ".join(problems)
        )


def check_requires(grid: Grid, runs: Sequence[Run]) -> list[str]:
    """Messages for each ``requires:`` file that ``runs`` use (in their arguments or base configs) and that is missing.

    A file no selected run mentions is not asked for, so ``--only`` can run the forget10 runs before the forget01
    retain reference exists.
    """
    texts = {" ".join(run.fit_args) for run in runs}
    texts |= {path.read_text() for run in runs for path in grid.configs[run.config]}
    missing = [
        (path, command)
        for path, command in grid.requires.items()
        if not Path(path).exists() and any(path in text for text in texts)
    ]
    return [f"{path} is missing; make it with: {command}" for path, command in missing]


# --------------------------------------------------------------------------------------------------------------
# Running


def final_eval(directory: Path) -> dict[str, Any] | None:
    """The last in-training evaluation of a run: its path, step, forget quality and model utility."""
    found = run_step_evals(directory)
    if not found:
        return None
    last = found[-1]
    data = load_eval_json(last)
    metrics = data["metrics"]

    def value(key: str) -> float | None:
        entry = metrics.get(key)
        return entry.get("agg_value") if isinstance(entry, dict) else None

    return {
        "path": str(last),
        "global_step": data["meta"].get("global_step"),
        "forget_quality": value("forget_quality"),
        "model_utility": value("model_utility"),
    }


def stale_keys(run: Run) -> list[str] | None:
    """How a finished run's recorded config differs from what the grid now gives it: None when it has not finished,
    ``[]`` when it is the same, else the changed dotted keys (``["<no effective config recorded>"]`` for a
    ``DONE.json`` that predates recording one, which cannot be trusted)."""
    done = run.directory / DONE
    if not done.is_file():
        return None
    recorded = json.loads(done.read_text()).get("effective_config")
    if recorded is None:
        return ["<no effective config recorded>"]
    return changed_keys(recorded, run.effective_config())


def status_of(run: Run) -> str:
    """``done``, ``stale`` (finished with another effective config), ``failed`` (last attempt failed) or ``pending``.

    A finished run is compared by its effective config (the composed contents of its config files after its
    overrides), not by its arguments: editing a base config makes the runs it changes stale.
    """
    changed = stale_keys(run)
    if changed is not None:
        return "stale" if changed else "done"
    return "failed" if (run.directory / FAILED).is_file() else "pending"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def _set_aside(run: Run) -> None:
    """Move an earlier, unfinished attempt out of the run directory so that its files cannot mix with the new one."""
    if not run.directory.exists() or not any(run.directory.iterdir()):
        return
    attempts = run.directory.parent / ".attempts"
    attempts.mkdir(parents=True, exist_ok=True)
    k = 1
    while (attempts / f"{run.name}.{k}").exists():
        k += 1
    shutil.move(str(run.directory), attempts / f"{run.name}.{k}")


def execute(run: Run, nproc_per_node: int = 1, command: Callable[[Run], Sequence[str]] | None = None) -> dict[str, Any]:
    """Run one run in a subprocess, log to ``<run>/sweep.log`` and write ``DONE.json`` or ``FAILED.json``.

    Args:
        run: the run.
        nproc_per_node: processes (GPUs) per run; above 1 the run is launched with torchrun.
        command: maps the run to the command to run instead of ``run.command(...)`` (tests use a cheap stand-in).

    Returns:
        The record written to ``DONE.json`` / ``FAILED.json``.
    """
    _set_aside(run)
    run.directory.mkdir(parents=True, exist_ok=True)
    cmd = list(command(run) if command else run.command(nproc_per_node))
    info = {"name": run.name, "config": run.config, "labels": run.labels, "overrides": run.overrides}
    _write_json(run.directory / RUN_INFO, {**info, "command": cmd, "fit_args": list(run.fit_args)})
    started = time.time()
    with open(run.directory / LOG, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        returncode = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    record = {
        "name": run.name,
        "returncode": returncode,
        "wall_s": round(time.time() - started, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": cmd,
        "fit_args": list(run.fit_args),
        "effective_config": run.effective_config(),
        "log": str(run.directory / LOG),
        "final_eval": final_eval(run.directory),
    }
    _write_json(run.directory / (DONE if returncode == 0 else FAILED), record)
    return record


def first_error_line(log: Path) -> str | None:
    """The ``error: ...`` line a failed run printed (``python -m baldro_lightning`` prints one for a bad input), or
    the last line of its traceback; None for an empty or missing log."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1]
    return lines[-1] if len(lines) > 1 else None


def _format_metric(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table of run name, status, wall time, forget quality and model utility."""
    width = max([len("run"), *(len(r["name"]) for r in rows)])
    lines = [f"{'run':<{width}}  {'status':<8} {'wall_s':>8} {'FQ':>10} {'MU':>8}"]
    for r in rows:
        final = r.get("final_eval") or {}
        wall = "-" if r.get("wall_s") is None else f"{r['wall_s']:.0f}"
        fq, mu = _format_metric(final.get("forget_quality")), _format_metric(final.get("model_utility"))
        lines.append(f"{r['name']:<{width}}  {r['status']:<8} {wall:>8} {fq:>10} {mu:>8}")
    return "\n".join(lines)


def run_all(
    runs: Sequence[Run], nproc_per_node: int = 1, command: Callable[[Run], Sequence[str]] | None = None
) -> list[dict]:
    """Run every run not yet done, one after another; a failure is recorded and the next run starts.

    Returns:
        One summary row per run: ``name``, ``status`` (``skipped``, ``done``, ``failed``), ``wall_s``,
        ``final_eval``, ``log``.
    """
    rows = []
    for k, run in enumerate(runs, 1):
        if status_of(run) == "done":
            record = json.loads((run.directory / DONE).read_text())
            print(f"[{k}/{len(runs)}] {run.name}: already done, skipped", flush=True)
            rows.append({**record, "status": "skipped"})
            continue
        print(f"[{k}/{len(runs)}] {run.name}: running (log: {run.directory / LOG})", flush=True)
        record = execute(run, nproc_per_node, command)
        status = "done" if record["returncode"] == 0 else "failed"
        if status == "failed":
            cause = first_error_line(Path(record["log"]))
            print(
                f"[{k}/{len(runs)}] {run.name}: FAILED with exit code {record['returncode']}"
                + (f": {cause}" if cause else "")
                + f"; see {record['log']}"
            )
        rows.append({**record, "status": status})
    return rows


# --------------------------------------------------------------------------------------------------------------
# Cluster scripts


def _sweep_call(grid: Grid, args: argparse.Namespace, task: str) -> str:
    parts = ["python", "-m", "baldro_lightning", "sweep", str(grid.path), "--task", task, "--root", str(grid.root)]
    for item in args.set:
        parts += ["--set", item]
    for pattern in args.only:
        parts += ["--only", pattern]
    if args.nproc_per_node != 1:
        parts += ["--nproc-per-node", str(args.nproc_per_node)]
    return " ".join(p if p.startswith("$") or p.startswith('"$') else shlex.quote(p) for p in parts)


def slurm_script(grid: Grid, runs: Sequence[Run], args: argparse.Namespace) -> str:
    """A SLURM array script: array task ``i`` runs run ``i`` through ``--task`` (same skip and failure rules)."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={grid.path.stem}",
        f"#SBATCH --array=0-{len(runs) - 1}",
        f"#SBATCH --output={grid.root}/slurm-%A_%a.out",
        *[f"#SBATCH {option}" for option in args.slurm_option],
        f"# {len(runs)} runs of {grid.path}; task i is run [i] of `python -m baldro_lightning sweep ... --dry-run`.",
        "# Activate the project's environment before the python line if the job does not inherit it.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        _sweep_call(grid, args, '"$SLURM_ARRAY_TASK_ID"'),
    ]
    return "\n".join(lines) + "\n"


def torchrun_script(grid: Grid, runs: Sequence[Run], args: argparse.Namespace) -> str:
    """A bash script that runs every run in turn with torchrun on this node's GPUs; failures do not stop it."""
    lines = [
        "#!/bin/bash",
        f"# {len(runs)} runs of {grid.path}, each with torchrun on {args.nproc_per_node} local process(es).",
        "# A finished run is skipped; a failed run is logged in its directory and the next one starts.",
        f"cd {shlex.quote(str(Path.cwd()))}",
        "status=0",
    ]
    for k, run in enumerate(runs):
        lines.append(f"{_sweep_call(grid, args, str(k))} || status=1  # {run.name}")
    lines.append("exit $status")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m baldro_lightning sweep",
        description="Expand a grid YAML into LightningCLI runs; run them one after another, or write a SLURM array "
        "or torchrun script. Finished runs (DONE.json) are skipped; a failed run does not stop the rest.",
    )
    parser.add_argument("grid", help="grid YAML, e.g. experiments/sweeps/embedded_grid.yaml")
    parser.add_argument("--root", default=None, help="directory for the run directories (default: the grid's root)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--only", action="append", default=[], metavar="GLOB", help="run only matching run names")
    parser.add_argument(
        "--dry-run", "--dry_run", action="store_true", help="print each run's status and command; run nothing"
    )
    parser.add_argument("--task", type=int, default=None, help="run only run number TASK (0-based; for scripts)")
    parser.add_argument(
        "--nproc-per-node", "--nproc_per_node", type=int, default=1, help="processes per run; >1 launches torchrun"
    )
    parser.add_argument(
        "--no-check", "--no_check", action="store_true", help="skip parsing every run through LightningCLI first"
    )
    parser.add_argument("--slurm", metavar="PATH", default=None, help="write a SLURM array script here, run nothing")
    parser.add_argument(
        "--slurm-option", "--slurm_option", action="append", default=[], help="extra #SBATCH line, e.g. '--gpus=1'"
    )
    parser.add_argument("--torchrun", metavar="PATH", default=None, help="write a torchrun launcher script here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nproc_per_node < 1:
        raise GridError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    grid = load_grid(args.grid, args.root)
    runs = select(expand(grid, parse_set_flags(args.set)), args.only)
    if args.task is not None:
        if not 0 <= args.task < len(runs):
            raise GridError(f"--task {args.task} is out of range: this grid (with --only) has {len(runs)} runs")
        runs = [runs[args.task]]
    missing = check_requires(grid, runs)
    stale = [run for run in runs if status_of(run) == "stale"]

    if args.dry_run:
        for k, run in enumerate(runs):
            print(f"# [{k}] {run.name} ({status_of(run)})")
            print(shlex.join(run.command(args.nproc_per_node)))
        for message in missing:
            print(f"# warning: {message}")
        print(f"# {len(runs)} runs under {grid.root}")
        return 0
    for path, writer in ((args.slurm, slurm_script), (args.torchrun, torchrun_script)):
        if path is not None:
            grid.root.mkdir(parents=True, exist_ok=True)  # SLURM drops a job's output if its directory is missing
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(writer(grid, runs, args))
            print(f"wrote {path} for {len(runs)} runs" + "".join(f"\nwarning: {m}" for m in missing))
    if args.slurm or args.torchrun:
        return 0

    if stale:
        names = "\n  ".join(f"{run.directory}: {', '.join(stale_keys(run)[:6])}" for run in stale)
        raise GridError(
            f"these runs finished with other settings than the grid and its config files now give (changed keys):"
            f"\n  {names}\ndelete their {DONE} to rerun them with the new settings, or pass --root to sweep into a "
            "fresh directory"
        )
    if missing:
        raise GridError("required files are missing:\n  " + "\n  ".join(missing))
    if not args.no_check:
        check_runs([run for run in runs if status_of(run) != "done"])
    rows = run_all(runs, args.nproc_per_node)
    print("\n" + summary_table(rows))
    failed = [r for r in rows if r["status"] == "failed"]
    if args.task is None:
        _write_json(grid.root / "sweep_summary.json", {"grid": str(grid.path), "runs": rows})
        print(
            f"\n{len(rows)} runs: {len(rows) - len(failed)} ok, {len(failed)} failed; summary: "
            f"{grid.root / 'sweep_summary.json'}"
        )
    for r in failed:
        cause = first_error_line(Path(r["log"]))
        print(f"failed: {r['name']} (exit {r['returncode']}), log {r['log']}" + (f"\n  {cause}" if cause else ""))
    return 1 if failed else 0
