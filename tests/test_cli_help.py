"""``--help`` shows a description for every argument of every class the CLI offers, and short class names work."""

from __future__ import annotations

import inspect

import lightning as L
import pytest
from jsonargparse import ArgumentParser

from baldro_lightning import cli
from baldro_lightning.train.losses import PerSampleLoss
from baldro_lightning.train.objectives import Objective


def _project_classes() -> list[type]:
    bases = (L.LightningModule, L.LightningDataModule, L.Callback, PerSampleLoss, Objective)
    found, todo = set(), list(bases)
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("baldro_lightning.") and not inspect.isabstract(sub):
                found.add(sub)
    return sorted(found, key=lambda c: (c.__module__, c.__name__))


CLASSES = _project_classes()


def test_the_cli_knows_the_project_classes():
    names = {c.__name__ for c in CLASSES}
    assert {"UnlearningModule", "ForgetRetainDataModule", "TofuEvaluation", "NPO", "DV", "Group"} <= names
    assert cli.BaldroCLI is not None


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_argument_has_a_description(cls: type):
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "x", sub_configs=True)
    undocumented = [
        action.dest
        for action in parser._actions
        if action.dest.startswith("x.")
        and not action.dest.endswith(".help")
        and (action.help is None or action.help.lstrip().startswith("("))
    ]
    assert not undocumented, f"{cls.__name__}: no --help text for {undocumented} (document them in the docstring)"
