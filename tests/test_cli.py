"""The fit command line: its name in ``--help``, no option prefixes, and edits of one callback by class name."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from shipped_configs import fit_args, resolved

from baldro_lightning.cli import CallbackEditError, ConfigError, cli_main, edited_callbacks, split_callback_flags
from baldro_lightning.evaluation.callbacks import TofuEvaluation
from baldro_lightning.train.checkpointing import LatestCheckpoint
from baldro_lightning.train.export import ExportPretrained

EXPORT = {"class_path": "baldro_lightning.train.export.ExportPretrained"}
EVALUATION = {
    "class_path": "baldro_lightning.evaluation.callbacks.TofuEvaluation",
    "init_args": {"criterion": "rouge", "settings": {"max_new_tokens": 48}},
}


def _one(callbacks, kind):
    (found,) = [c for c in callbacks if isinstance(c, kind)]
    return found


def test_fit_help_names_the_command(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m baldro_lightning [options] fit")
    assert "__main__.py" not in out


def test_a_prefix_of_an_option_is_refused():
    with pytest.raises(ConfigError, match=r"unrecognized arguments: --trainer\.max_epoch=3"):
        cli_main([*fit_args("embedded/npo_dv"), "--trainer.max_epoch=3"], run=False)


def test_split_callback_flags_takes_both_value_forms_and_leaves_the_rest():
    args = ["--config", "a.yaml", "--trainer.callbacks.ExportPretrained.dirpath=out/m", "--trainer.max_epochs=2"]
    args += ["--trainer.callbacks.TofuEvaluation.init_args.every_n_steps", "4", "--trainer.callbacks+=EarlyStopping"]
    edits, rest = split_callback_flags(args)
    assert edits == {"ExportPretrained.dirpath": "out/m", "TofuEvaluation.init_args.every_n_steps": 4}
    # jsonargparse's own list flags (append; the last item's argument) are left to it.
    assert rest == ["--config", "a.yaml", "--trainer.max_epochs=2", "--trainer.callbacks+=EarlyStopping"]
    with pytest.raises(CallbackEditError, match="needs a value"):
        split_callback_flags(["--trainer.callbacks.ExportPretrained.dirpath"])


def test_edited_callbacks_sets_nested_arguments_of_the_named_class_only():
    edits = {"TofuEvaluation.settings.retain_reference": "r.json", "ExportPretrained.init_args.dirpath": "m"}
    out = edited_callbacks([EVALUATION, EXPORT], edits)
    settings = {"max_new_tokens": 48, "retain_reference": "r.json"}
    assert out[0]["init_args"] == {"criterion": "rouge", "settings": settings}
    assert out[1] == {**EXPORT, "init_args": {"dirpath": "m"}}
    assert "retain_reference" not in EVALUATION["init_args"]["settings"]  # the input is not changed
    with pytest.raises(CallbackEditError, match="names callback 'EarlyStopping', but the composed config has only"):
        edited_callbacks([EVALUATION, EXPORT], {"EarlyStopping.patience": 3})
    with pytest.raises(CallbackEditError, match="name a callback and one of its arguments"):
        edited_callbacks([EXPORT], {"ExportPretrained.init_args": "m"})


def test_fit_sets_any_callback_option_by_class_name(tmp_path):
    edits = [
        f"--trainer.callbacks.ExportPretrained.init_args.dirpath={tmp_path / 'model'}",
        f"--trainer.callbacks.TofuEvaluation.settings.retain_reference={tmp_path / 'retain.json'}",
        "--trainer.callbacks.TofuEvaluation.criterion",
        "truth_ratio",
        "--trainer.callbacks.TofuEvaluation.every_n_steps=2",
        "--trainer.callbacks.ModelCheckpoint.monitor=val/model_utility",
    ]
    cli = cli_main([*fit_args("embedded/npo_dv"), *edits], run=False)
    export = _one(cli.trainer.callbacks, ExportPretrained)
    evaluation = _one(cli.trainer.callbacks, TofuEvaluation)
    assert export.dirpath == str(tmp_path / "model")
    assert evaluation.settings.retain_reference == str(tmp_path / "retain.json")
    assert (evaluation.criterion, evaluation.every_n_steps) == ("truth_ratio", 2)
    assert evaluation.settings.max_new_tokens == 48  # what the configs set is kept
    assert evaluation.every_epoch and evaluation.on_start
    # The class named, not its subclass LatestCheckpoint (class_path LatestCheckpoint), whose monitor stays unset.
    (checkpoint,) = [c for c in cli.trainer.callbacks if type(c) is ModelCheckpoint]
    assert checkpoint.monitor == "val/model_utility"
    assert _one(cli.trainer.callbacks, LatestCheckpoint).monitor is None


def test_callback_edits_reach_the_saved_config():
    config = resolved([*fit_args("embedded/npo_dv"), "--trainer.callbacks.TofuEvaluation.rouge_threshold=0.5"])
    (evaluation,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(".TofuEvaluation")]
    assert evaluation["init_args"]["rouge_threshold"] == 0.5
    assert [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]] == [
        "TofuEvaluation",
        "ModelCheckpoint",
        "LatestCheckpoint",
        "ExportPretrained",
    ]


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--trainer.callbacks.EarlyStopping.patience=3", "names callback 'EarlyStopping'"),
        ("--trainer.callbacks.TofuEvaluation.rouge_threshold=abc", "rouge_threshold: expected a float, got 'abc'"),
        ("--trainer.callbacks.ExportPretrained.no_such_arg=1", "no_such_arg"),
    ],
)
def test_bad_callback_edits_are_refused_with_the_key(flag, message):
    with pytest.raises(CallbackEditError) as refused:
        cli_main([*fit_args("embedded/npo_dv"), flag], run=False)
    text = str(refused.value)
    assert text.startswith("--trainer.callbacks.") and "\n" not in text and message in text
