"""The shipped experiment runs, read from ``experiments/combinations.yaml``: each run's config files and command."""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from baldro_lightning.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
COMBINATIONS: dict[str, tuple[str, ...]] = {
    name: tuple(files) for name, files in yaml.safe_load((EXPERIMENTS / "combinations.yaml").read_text()).items()
}
"""Run name (``<benchmark>/<run>``) -> its config files, relative to the repository root, in composition order."""


def run_directory(name: str) -> str:
    return f"runs/{name}"


def command(name: str) -> str:
    """The command that starts run ``name`` from the repository root, as experiments/README.md gives it."""
    configs = " ".join(f"--config {path}" for path in COMBINATIONS[name])
    return f"python -m baldro_lightning fit {configs} --trainer.default_root_dir={run_directory(name)}"


def fit_args(name: str) -> list[str]:
    """``command(name)``'s arguments after ``fit``, with absolute config paths (tests change directory)."""
    configs = [arg for path in COMBINATIONS[name] for arg in ("--config", str(REPO / path))]
    return [*configs, f"--trainer.default_root_dir={run_directory(name)}"]


def resolved(args: list[str]) -> dict[str, Any]:
    """The config LightningCLI resolves from ``fit`` arguments (``--print_config``), as a mapping."""
    out = io.StringIO()
    # pytest's own arguments would otherwise make LightningCLI warn about mixing `args` with sys.argv.
    with mock.patch.object(sys, "argv", sys.argv[:1]), redirect_stdout(out), redirect_stderr(io.StringIO()):
        with pytest.raises(SystemExit) as exit_:
            cli_main(["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(out.getvalue())
