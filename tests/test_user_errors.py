"""The pieces that turn a bad input into one line: parse-error summaries, vocabularies, and the pre-flight checks of
output locations, weight files, checkpoints, references and row order (function by function; ``test_cli_errors.py``
runs them through the commands)."""

from __future__ import annotations

import json
from argparse import ArgumentError
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser

from baldro_lightning.analysis.sweep import first_error_line
from baldro_lightning.atomic_files import check_writable, unwritable_reason
from baldro_lightning.data.rows import BenchmarkDataError
from baldro_lightning.data.tofu import check_perturbed_alignment, load_split
from baldro_lightning.evaluation.run_record import EvalLogError, question_digest, reference_truth_ratios
from baldro_lightning.train.export import checkpoint_policy_shapes, plain_parameter_name
from baldro_lightning.train.models import ModelLoadError, safetensors_shapes, shape_mismatch
from baldro_lightning.user_errors import CommandParser, UserInputError, describe_argument_error, in_vocabulary

# --------------------------------------------------------------------------------------------------------------
# Parse errors


def _chain(*messages: str) -> BaseException:
    """Errors linked by ``__cause__`` as jsonargparse links them, outermost first."""
    errors = [ArgumentError(None, text) if text.startswith("Parser key") else ValueError(text) for text in messages]
    for outer, inner in zip(errors, errors[1:], strict=False):
        outer.__cause__ = inner
    return errors[0]


def test_a_nested_bad_value_becomes_its_flag_and_what_is_wrong():
    """The keys of the ``Parser key`` links make the flag; the last link says what is wrong."""
    error = _chain(
        'Parser key "model":\n  Does not validate against any of the Union subtypes ...',
        "Problem with given class_path 'baldro_lightning.train.module.UnlearningModule':\n  ...",
        'Parser key "forget_objective":\n  Does not validate ...',
        "Problem with given class_path 'baldro_lightning.train.objectives.DV':\n  ...",
        "Parser key \"tau\":\n  Expected a <class 'float'>. Got value: nan",
        "Expected a <class 'float'>. Got value: nan",
    )
    assert describe_argument_error(error, "prog fit") == (
        "--model.forget_objective.tau: expected a float, got 'nan' (nan and inf are not numbers a run can use); "
        "see `prog fit --help`"
    )


def test_an_unknown_option_names_its_class_and_where_its_options_are_listed():
    error = _chain(
        'Parser key "model":\n  ...',
        "Problem with given class_path 'baldro_lightning.train.module.UnlearningModule':\n  Option 'gama' is not ...",
        "Option 'gama' is not accepted",
    )
    assert describe_argument_error(error, "prog fit") == (
        "--model.gama: UnlearningModule has no option 'gama'; check its spelling (`prog fit --model.help "
        "UnlearningModule` lists its options)"
    )


def test_a_real_jsonargparse_parser_gives_the_flag_and_what_is_wrong():
    """Guards the message format of the jsonargparse version in use (the chain above is read from it)."""
    parser = ArgumentParser(prog="prog", exit_on_error=False)
    parser.add_argument("--count", type=int, default=1)
    with pytest.raises(ArgumentError) as caught:
        parser.parse_args(["--count", "two"])
    assert describe_argument_error(caught.value, "prog") == "--count: expected an int, got 'two'; see `prog --help`"


def test_command_parser_errors_are_user_errors():
    parser = CommandParser(prog="prog")
    parser.add_argument("--out", required=True)
    with pytest.raises(UserInputError, match=r"^the following arguments are required: --out; see `prog --help`$"):
        parser.parse_args([])


# --------------------------------------------------------------------------------------------------------------
# Vocabulary


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("raise --data.max_length.", "raise --max_length."),  # a sentence's full stop is not part of the flag
        ("--data.max_length=12 is short", "--max_length=12 is short"),
        ("--data.max_length_x stays", "--data.max_length_x stays"),  # only whole flag names
        ("run `fit --data.max_length 64` again", "run `fit --data.max_length 64` again"),  # quoted commands stay
        ("--data.template.chat and --data.template.chat_format", "--chat and --data.template.chat_format"),
    ],
)
def test_in_vocabulary_replaces_whole_flags_outside_backticks(message, expected):
    names = {"--data.max_length": "--max_length", "--data.template.chat": "--chat"}
    assert in_vocabulary(message, names) == expected


# --------------------------------------------------------------------------------------------------------------
# Output locations


def test_unwritable_reason(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert unwritable_reason(tmp_path / "new" / "deeper", "directory") is None
    assert unwritable_reason(tmp_path / "eval.json", "file") is None
    assert unwritable_reason(tmp_path, "file") == "is a directory, not a file"
    assert unwritable_reason(a_file, "directory") == "is a file, not a directory"
    assert unwritable_reason(a_file / "run", "directory") == f"cannot be created: {a_file} is a file, not a directory"
    with pytest.raises(UserInputError, match=r"^--out '.*a_file' is a file, not a directory; pass a directory path"):
        check_writable(a_file, "--out", "directory")
    assert not (tmp_path / "new").exists(), "checking must create nothing"


# --------------------------------------------------------------------------------------------------------------
# Weight files and checkpoints


def _safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    from safetensors.torch import save_file

    save_file({name: torch.zeros(shape) for name, shape in shapes.items()}, str(path))
    return path


def test_safetensors_shapes_reads_the_header_and_rejects_cut_or_padded_files(tmp_path):
    file = _safetensors(tmp_path / "w.safetensors", {"a": (2, 3), "b": (4,)})
    assert safetensors_shapes(file, "--model") == {"a": (2, 3), "b": (4,)}
    whole = file.read_bytes()
    file.write_bytes(whole[:-4])
    with pytest.raises(ModelLoadError, match=r"is truncated: its header describes \d+ bytes, the file has \d+"):
        safetensors_shapes(file, "--model")
    file.write_bytes(whole + b"\0")
    with pytest.raises(ModelLoadError, match=r"is longer than its header says"):
        safetensors_shapes(file, "--model")
    file.write_bytes(b"\xff" * 16)
    with pytest.raises(ModelLoadError, match=r"is not a complete safetensors file \(16 bytes\)"):
        safetensors_shapes(file, "--model")


def test_shape_mismatch_names_the_first_tensor_that_differs():
    """Tensors only one side has are not compared (a tied head, peft's adapters)."""
    found = {"embed": (300, 64), "only_here": (1,)}
    assert shape_mismatch(found, {"embed": (300, 64)}, ("a", "b")) is None
    assert shape_mismatch(found, {"embed": (300, 32)}, ("a", "b")) == "embed is (300, 64) in a but (300, 32) in b"


def test_checkpoint_policy_shapes_and_peft_names(tmp_path):
    torch.save({"state_dict": {"policy.w": torch.zeros(2, 3), "other": torch.zeros(1)}}, tmp_path / "c.ckpt")
    assert checkpoint_policy_shapes(tmp_path / "c.ckpt", "--ckpt_path") == {"w": (2, 3)}
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "c.ckpt").read_bytes()[:100])
    with pytest.raises(UserInputError, match=r"--ckpt_path='.*cut\.ckpt' is not a readable checkpoint"):
        checkpoint_policy_shapes(tmp_path / "cut.ckpt", "--ckpt_path")
    peft = "base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"
    assert plain_parameter_name(peft) == "model.layers.0.mlp.up_proj.weight"


# --------------------------------------------------------------------------------------------------------------
# Rows


def test_duplicate_questions_are_rejected_in_forget_splits_only(tiny_benchmark, tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("forget10", "retain90"):
        lines = (tiny_benchmark / f"{name}.jsonl").read_text().splitlines()
        (bench / f"{name}.jsonl").write_text("\n".join([lines[0], *lines]) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"forget10\.jsonl, lines 1 and 2: the question .* occurs twice"):
        load_split(bench, "forget10")
    assert len(load_split(bench, "retain90")) == 13  # real TOFU's retain splits repeat a question


def test_perturbed_rows_must_follow_the_forget_order(tiny_benchmark):
    forget = load_split(tiny_benchmark, "forget10")
    perturbed = load_split(tiny_benchmark, "forget10_perturbed")
    check_perturbed_alignment(tiny_benchmark, "forget10", forget, perturbed)
    check_perturbed_alignment(tiny_benchmark, "forget10", forget, perturbed[:2])  # an evaluation limit
    swapped = [perturbed[1], perturbed[0], *perturbed[2:]]
    with pytest.raises(BenchmarkDataError, match=r"differ at row 0 \(0-based; line 1 of a JSON-lines file\)"):
        check_perturbed_alignment(tiny_benchmark, "forget10", forget, swapped)
    with pytest.raises(BenchmarkDataError, match=r"do not hold the same rows: 5 against 4"):
        check_perturbed_alignment(tiny_benchmark, "forget10", forget, [*perturbed, perturbed[0]])


def test_a_split_file_that_is_a_directory_is_named_as_one(tiny_benchmark, tmp_path):
    bench = tmp_path / "bench"
    (bench / "forget10.jsonl").mkdir(parents=True)
    with pytest.raises(BenchmarkDataError, match=r"forget10\.jsonl is a directory, not a file"):
        load_split(bench, "forget10")


# --------------------------------------------------------------------------------------------------------------
# Retain references


def _reference(tmp_path: Path, values: list, questions: list[str] | None) -> Path:
    meta = {"forget_split": "forget10", "benchmark": "bench_a"}
    if questions is not None:
        meta["question_digests"] = {"forget10_perturbed": question_digest(questions)}
    by_index = {str(i): value for i, value in enumerate(values)}
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"meta": meta, "metrics": {"forget_truth_ratio": {"value_by_index": by_index}}}))
    return path


def test_question_digest_depends_on_the_questions_and_their_order():
    assert question_digest(["a", "b"]) == question_digest([" a", "b "])  # surrounding spaces do not count
    assert question_digest(["a", "b"]) != question_digest(["b", "a"])
    assert len(question_digest(["a"])) == 16


def test_reference_checks_questions_and_null_truth_ratios(tmp_path):
    questions = ["q0", "q1", "q2"]
    ok = _reference(tmp_path, [0.5, 0.25, 1.0], questions)
    assert reference_truth_ratios(ok, "forget10", 3, questions=questions).tolist() == [0.5, 0.25, 1.0]
    with pytest.raises(EvalLogError, match=r"scored other questions of forget10_perturbed .*\(it read 'bench_a', this"):
        reference_truth_ratios(ok, "forget10", 3, questions=["q0", "q1", "other"], benchmark="bench_b")
    unrecorded = _reference(tmp_path, [0.5, 0.25, 1.0], None)  # written before digests were recorded
    assert reference_truth_ratios(unrecorded, "forget10", 3, questions=["x", "y", "z"]).shape == (3,)
    null = _reference(tmp_path, [0.5, None, 1.0], questions)
    with pytest.raises(EvalLogError, match=r"holds null \(or non-finite\) forget truth ratios for 1 rows \(indices 1"):
        reference_truth_ratios(null, "forget10", 3, questions=questions)


# --------------------------------------------------------------------------------------------------------------
# Sweep summaries


def test_first_error_line_of_a_failed_run(tmp_path):
    log = tmp_path / "sweep.log"
    log.write_text("$ python -m baldro_lightning fit ...\nSeed set to 0\nerror: --model.gama: no such option\n")
    assert first_error_line(log) == "error: --model.gama: no such option"
    log.write_text("$ cmd\nTraceback (most recent call last):\n  ...\nKeyError: 'x'\n")
    assert first_error_line(log) == "KeyError: 'x'"
    assert first_error_line(tmp_path / "missing.log") is None
