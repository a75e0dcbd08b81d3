"""Bad inputs as a user meets them: ``python -m baldro_lightning <command> ...`` and the first line it prints.

Every case in :data:`CASES` is one kind of bad input to ``fit``, ``evaluate``, ``export``, ``sweep`` or
``report``. Each must end with exit status 2 and, as the first line on stderr, ``error: `` followed by the
project's own sentence (the flag or file, the bad value, the fix, in the words of the command that was run), with
no traceback; and the case's directory, which holds its inputs and earlier outputs (an ``eval.json``, an exported
model), must be byte for byte what it was: nothing half-written is left, nothing earlier is damaged.

Two tests run the same cases:

- ``test_bad_input_in_process`` (default suite) calls ``baldro_lightning.__main__.main(argv)`` in this process;
- ``test_bad_input_in_subprocess`` (``slow``) starts ``python -m baldro_lightning`` for each, as a user does. Lines
  that the environment's libraries print while being imported (in some environments torchao warns about its
  compiled kernels) come before anything the command prints; they are learned once from ``python -c "import
  baldro_lightning.__main__"`` and skipped.

The function-level corpus of ``test_bad_inputs.py`` checks the same validation one layer down.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import baldro_lightning.__main__ as entry_point
from baldro_lightning.__main__ import main
from baldro_lightning.data.tokenization import load_tokenizer
from baldro_lightning.evaluation.run_record import question_digest
from baldro_lightning.evaluation.tofu import TofuEvaluator, TofuSettings
from baldro_lightning.train.models import load_causal_lm
from baldro_lightning.user_errors import UserInputError

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class World:
    """Inputs built once per module; cases copy what they corrupt into their own directory."""

    model: Path
    """The tiny model (hidden size 32)."""
    other_model: Path
    """A valid model of another size (hidden size 64), with the same tokenizer."""
    benchmark: Path
    """The tiny benchmark."""
    checkpoint: Path
    """A training checkpoint of the tiny model's policy (``policy.*`` weights)."""
    reference: Path
    """A retain reference: the tiny model's real ``eval.json`` on forget10 (forget metrics)."""


@dataclass
class Paths:
    """What a case's arguments may name: the shared inputs and the case's own directory."""

    world: World
    case: Path
    """The case's directory: its inputs, and ``out/`` with the earlier outputs."""
    benchmark: Path = field(init=False)
    """The shared benchmark, or the case's corrupted copy after :meth:`own_benchmark`."""

    def __post_init__(self) -> None:
        self.benchmark = self.world.benchmark

    def own_benchmark(self) -> Path:
        self.benchmark = Path(shutil.copytree(self.world.benchmark, self.case / "bench"))
        return self.benchmark

    @property
    def out(self) -> Path:
        return self.case / "out"

    @property
    def a_file(self) -> Path:
        """A plain file, for paths that try to pass through one."""
        return self.case / "a_file"

    def values(self) -> dict[str, str]:
        return {
            "model": str(self.world.model),
            "other_model": str(self.world.other_model),
            "bench": str(self.benchmark),
            "ckpt": str(self.world.checkpoint),
            "ref": str(self.world.reference),
            "case": str(self.case),
            "out": str(self.out),
            "a_file": str(self.a_file),
            "repo": str(REPO),
        }


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    """The command line after ``python -m baldro_lightning``; ``{name}`` fields are :meth:`Paths.values`."""
    first_line: str
    """Regex the first line of stderr must match from its start (``error: ...``)."""
    prepare: Callable[[Paths], None] | None = None
    """Builds the bad input inside the case directory before the command runs."""


# --------------------------------------------------------------------------------------------------------------
# Command lines

FIT = (
    "fit",
    "--model=UnlearningModule",
    "--model.model={model}",
    "--model.forget_loss=NPO",
    "--data=ForgetRetainDataModule",
    "--data.benchmark={bench}",
    "--data.batch_size=2",
    "--data.max_length=64",
    "--trainer.default_root_dir={out}/run",
    "--trainer.accelerator=cpu",
    "--trainer.max_steps=1",
    "--trainer.enable_progress_bar=false",
)
EVALUATE = (
    "evaluate",
    "--model",
    "{model}",
    "--benchmark",
    "{bench}",
    "--max_length",
    "64",
    "--max_new_tokens",
    "2",
    "--metric_groups",
    "[forget]",
    "--out",
    "{out}/eval.json",
)
EXPORT = ("export", "--checkpoint", "{ckpt}", "--model", "{model}", "--out", "{out}/model")
EVALUATION_CALLBACK = (
    "--trainer.callbacks=TofuEvaluation",
    "--trainer.callbacks.criterion=rouge",
    "--trainer.callbacks.settings.metric_groups=[forget]",
    "--trainer.callbacks.settings.max_new_tokens=2",
)


def fit(*extra: str) -> tuple[str, ...]:
    return (*FIT, *extra)


def evaluate(*extra: str) -> tuple[str, ...]:
    """``evaluate`` with ``extra``; a flag given twice takes the later value."""
    return (*EVALUATE, *extra)


def with_reference(*extra: str) -> tuple[str, ...]:
    return fit(*EVALUATION_CALLBACK, "--trainer.callbacks.settings.retain_reference={case}/ref.json", *extra)


# --------------------------------------------------------------------------------------------------------------
# Corruptions


def _edit_rows(paths: Paths, split: str, edit: Callable[[list[str]], list[str]]) -> None:
    file = paths.own_benchmark() / f"{split}.jsonl"
    file.write_text("\n".join(edit(file.read_text().splitlines())) + "\n")


def _edit_row(paths: Paths, split: str, line: int, **fields) -> None:
    def edit(lines: list[str]) -> list[str]:
        row = json.loads(lines[line - 1])
        for key, value in fields.items():
            row.pop(key) if value is None else row.__setitem__(key, value)
        lines[line - 1] = json.dumps(row)
        return lines

    _edit_rows(paths, split, edit)


def malformed_row(paths: Paths) -> None:
    _edit_rows(paths, "forget10", lambda lines: [*lines[:2], lines[2][:40], *lines[3:]])


def missing_field(paths: Paths) -> None:
    _edit_row(paths, "retain90", 2, answer=None)


def empty_split(paths: Paths) -> None:
    (paths.own_benchmark() / "forget10.jsonl").write_text("\n")


def split_is_a_directory(paths: Paths) -> None:
    file = paths.own_benchmark() / "forget10.jsonl"
    file.unlink()
    file.mkdir()


def non_utf8(paths: Paths) -> None:
    file = paths.own_benchmark() / "retain90.jsonl"
    file.write_bytes(file.read_bytes().replace(b"AuthorA", b"Author\xff", 1))


def duplicate_forget_row(paths: Paths) -> None:
    _edit_rows(paths, "forget10", lambda lines: [lines[0], lines[0], *lines[2:]])


def perturbed_in_other_order(paths: Paths) -> None:
    _edit_rows(paths, "forget10_perturbed", lambda lines: [lines[1], lines[0], *lines[2:]])


def perturbed_answer_not_a_list(paths: Paths) -> None:
    _edit_row(paths, "forget10_perturbed", 2, perturbed_answer="AuthorG comes from Pradow.")


def a_file(paths: Paths) -> None:
    paths.a_file.write_text("not a directory\n")


def config_file(body: str) -> Callable[[Paths], None]:
    def write(paths: Paths) -> None:
        (paths.case / "config.yaml").write_text(body)

    return write


def model_copy(paths: Paths) -> Path:
    return Path(shutil.copytree(paths.world.model, paths.case / "model"))


def truncated_weights(paths: Paths) -> None:
    weights = model_copy(paths) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def garbage_weights(paths: Paths) -> None:
    (model_copy(paths) / "model.safetensors").write_bytes(b"\x00" * 64)


def config_of_another_size(paths: Paths) -> None:
    config = model_copy(paths) / "config.json"
    values = json.loads(config.read_text())
    config.write_text(json.dumps({**values, "hidden_size": 64, "intermediate_size": 128}))


def tokenizer_only(paths: Paths) -> None:
    AutoTokenizer.from_pretrained(str(paths.world.model)).save_pretrained(paths.case / "model")


def tokenizer_without_eos(paths: Paths) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(paths.world.model))
    tokenizer.pad_token = tokenizer.eos_token = None
    tokenizer.save_pretrained(paths.case / "tokenizer")


def truncated_checkpoint(paths: Paths) -> None:
    (paths.case / "cut.ckpt").write_bytes(paths.world.checkpoint.read_bytes()[:2000])


def checkpoint_of(value: object) -> Callable[[Paths], None]:
    def save(paths: Paths) -> None:
        torch.save(value, paths.case / "other.ckpt")

    return save


def checkpoint_of_other_model(paths: Paths) -> None:
    state = AutoModelForCausalLM.from_pretrained(str(paths.world.other_model)).state_dict()
    torch.save({"state_dict": {f"policy.{k}": v for k, v in state.items()}}, paths.case / "other.ckpt")


def reference(edit: Callable[[dict], None] | None = None, text: Callable[[str], str] | None = None):
    """A copy of the real retain reference at ``<case>/ref.json``, its JSON edited or its text cut."""

    def write(paths: Paths) -> None:
        data = json.loads(paths.world.reference.read_text())
        if edit is not None:
            edit(data)
        body = json.dumps(data)
        (paths.case / "ref.json").write_text(text(body) if text else body)

    return write


def _null_truth_ratios(data: dict) -> None:
    by_index = data["metrics"]["forget_truth_ratio"]["value_by_index"]
    by_index.update({key: None for key in list(by_index)[:2]})


def _other_questions(data: dict) -> None:
    data["meta"]["benchmark"] = "/data/another_benchmark"
    data["meta"]["question_digests"]["forget10_perturbed"] = question_digest(["Who wrote Hamlet?"] * 4)


def _other_split(data: dict) -> None:
    data["meta"]["forget_split"] = "forget05"


def grid(body: dict) -> Callable[[Paths], None]:
    def write(paths: Paths) -> None:
        configs = [str(REPO / "experiments/embedded/defaults.yaml"), str(REPO / "experiments/methods/npo.yaml")]
        content = {"root": str(paths.out / "sweep"), "configs": {"npo": configs}, **body}
        (paths.case / "grid.yaml").write_text(yaml.safe_dump(content))

    return write


def empty_directory(paths: Paths) -> None:
    (paths.case / "runs").mkdir()


# --------------------------------------------------------------------------------------------------------------
# The cases

CASES: dict[str, Case] = {
    # fit: the command line and the configs
    "fit_config_key_typo": Case(
        fit("--model.gama=0.5"),
        r"error: --model\.gama: UnlearningModule has no option 'gama'; check its spelling "
        r"\(`python -m baldro_lightning fit --model\.help UnlearningModule` lists its options\)",
    ),
    "fit_unknown_flag": Case(fit("--trainer.max_stepz=3"), r"error: unrecognized arguments: --trainer\.max_stepz=3"),
    "fit_choice_not_allowed": Case(
        fit("--model.forget_objective=DV", "--model.forget_objective.sign=foo"),
        r"error: --model\.forget_objective\.sign: expected one of 'paper', 'released', got 'foo'",
    ),
    "fit_nan_flag": Case(
        fit("--model.forget_objective=DV", "--model.forget_objective.tau=nan"),
        r"error: --model\.forget_objective\.tau: expected a float, got 'nan' \(nan and inf are not numbers",
    ),
    "fit_inf_in_config": Case(
        fit("--config={case}/config.yaml"),
        r"error: --model\.gamma=inf: nan and inf are not numbers a run can use; give a finite number",
        config_file("model:\n  init_args:\n    gamma: .inf\n"),
    ),
    "fit_not_a_number": Case(fit("--data.batch_size=two"), r"error: --data\.batch_size: expected an int, got 'two'"),
    "fit_unknown_class": Case(
        fit("--model.forget_loss=NPOO"),
        r"error: --model\.forget_loss: 'NPOO' is not a class this option accepts",
    ),
    "fit_missing_config_file": Case(
        fit("--config={case}/missing.yaml"), r"error: --config: File does not exist: '.*missing\.yaml'"
    ),
    "fit_malformed_config_file": Case(
        fit("--config={case}/config.yaml"),
        r"error: --config .*config\.yaml, line 2, column 1: not valid YAML \(expected ',' or '\]', but got "
        r"'<stream end>'\); fix the file$",
        config_file("model: [unclosed\n"),
    ),
    # fit: constructor checks, as the project's sentence
    "fit_dv_tau_zero": Case(
        fit("--model.forget_objective=DV", "--model.forget_objective.tau=0"),
        r"error: --model\.forget_objective: DV tau must be > 0 \(try 1\.0 to 10\.0\), got tau=0\.0$",
    ),
    "fit_group_ratio_above_one": Case(
        fit("--model.forget_objective=Group", "--model.forget_objective.ratio=1.5"),
        r"error: --model\.forget_objective: Group ratio must be in \(0, 1\], got ratio=1\.5$",
    ),
    "fit_npo_beta_zero": Case(
        fit("--model.forget_loss.beta=0"), r"error: --model\.forget_loss: NPO beta must be > 0, got beta=0\.0$"
    ),
    "fit_batch_size_zero": Case(fit("--data.batch_size=0"), r"error: --data\.batch_size must be >= 1, got 0$"),
    "fit_forget_split_typo": Case(
        fit("--data.forget_split=forget20"),
        r"error: forget split 'forget20' has no retain/holdout pairing; use one of forget01, forget05, forget10 "
        r"\(methods §1\.1\) as --data\.forget_split$",
    ),
    "fit_retain_split_typo": Case(
        fit("--data.retain_split=retain80"), r"error: unknown TOFU split 'retain80'; valid names: full, .*retain_split"
    ),
    "fit_warmup_negative": Case(
        fit("--model.warmup_epochs=-1"), r"error: --model\.warmup_epochs must be >= 0, got -1\.0$"
    ),
    "fit_callback_every_n_steps_zero": Case(
        fit(*EVALUATION_CALLBACK, "--trainer.callbacks.every_n_steps=0"),
        r"error: --trainer\.callbacks\[0\]: TofuEvaluation every_n_steps must be >= 1 or null, got 0$",
    ),
    "fit_system_prompt_without_chat": Case(
        fit("--data.template.system_prompt=Be brief."),
        r"error: --data\.template\.system_prompt='Be brief\.' / --data\.template\.date_string=None are only used by "
        r"chat templates; turn on --data\.template\.chat",
    ),
    # fit: pre-flight checks of files and directories
    "fit_accelerator_not_available": Case(
        fit("--trainer.accelerator=mps"),
        r"error: --trainer: `MPSAccelerator` can not run on your system since the accelerator is not available",
    ),
    "fit_missing_model": Case(
        fit("--model.model={case}/no_model"), r"error: --model\.model '.*no_model' does not exist; pass a directory"
    ),
    "fit_model_without_weights": Case(
        fit("--model.model={case}/model"),
        r"error: --model\.model '.*model' holds no config\.json \(it holds: tokenizer\.json, tokenizer_config\.json\), "
        r"so it is not a saved model",
        tokenizer_only,
    ),
    "fit_truncated_weights": Case(
        fit("--model.model={case}/model"),
        r"error: --model\.model: .*model\.safetensors is truncated: its header describes \d+ bytes, the file has \d+",
        truncated_weights,
    ),
    "fit_weights_of_another_size": Case(
        fit("--model.model={case}/model"),
        r"error: --model\.model: the weights in .*model\.safetensors do not fit its config\.json: "
        r"model\.embed_tokens\.weight is \(\d+, 32\) in model\.safetensors but \(\d+, 64\)",
        config_of_another_size,
    ),
    "fit_run_directory_under_a_file": Case(
        fit("--trainer.default_root_dir={a_file}/run"),
        r"error: --trainer\.default_root_dir '.*a_file/run' cannot be created: .*a_file is a file, not a directory",
        a_file,
    ),
    "fit_export_directory_under_a_file": Case(
        fit("--trainer.callbacks=ExportPretrained", "--trainer.callbacks.dirpath={a_file}/model"),
        r"error: the model directory of ExportPretrained '.*a_file/model' cannot be created: .*a_file is a file",
        a_file,
    ),
    "fit_missing_checkpoint": Case(
        fit("--ckpt_path={case}/missing.ckpt"), r"error: --ckpt_path='.*missing\.ckpt' does not exist"
    ),
    "fit_truncated_checkpoint": Case(
        fit("--ckpt_path={case}/cut.ckpt"),
        r"error: --ckpt_path='.*cut\.ckpt' is not a readable checkpoint \(.*\); a file cut short \(2000 bytes\)",
        truncated_checkpoint,
    ),
    "fit_checkpoint_of_another_model": Case(
        fit("--ckpt_path={case}/other.ckpt"),
        r"error: --ckpt_path '.*other\.ckpt' does not fit --model\.model '.*': model\.embed_tokens\.weight is "
        r"\(\d+, 64\) in the checkpoint but \(\d+, 32\)",
        checkpoint_of_other_model,
    ),
    "fit_checkpoint_not_lightning": Case(
        fit("--ckpt_path={case}/other.ckpt"),
        r"error: --ckpt_path='.*other\.ckpt' holds a list, not a Lightning checkpoint",
        checkpoint_of([1, 2, 3]),
    ),
    # fit: the data, read before anything is written
    "fit_malformed_row": Case(
        fit(), r"error: .*forget10\.jsonl, line 3: malformed JSON \(.*\): .*; fix or remove that row", malformed_row
    ),
    "fit_missing_field": Case(
        fit(), r"error: .*retain90\.jsonl, line 2: missing field 'answer' \(row has question, idx\)", missing_field
    ),
    "fit_empty_split": Case(
        fit(), r"error: .*forget10\.jsonl holds no rows; split 'forget10' should have 400", empty_split
    ),
    "fit_split_is_a_directory": Case(
        fit(),
        r"error: .*forget10\.jsonl is a directory, not a file; split 'forget10' must be one",
        split_is_a_directory,
    ),
    "fit_non_utf8_bytes": Case(
        fit(),
        r"error: .*retain90\.jsonl, line 1, byte offset \d+ .* are not UTF-8; re-save the file as UTF-8",
        non_utf8,
    ),
    "fit_duplicate_forget_row": Case(
        fit(),
        r"error: .*forget10\.jsonl, lines 1 and 2: the question 'Where was AuthorG born\?' occurs twice",
        duplicate_forget_row,
    ),
    "fit_perturbed_rows_in_another_order": Case(
        fit(*EVALUATION_CALLBACK),
        r"error: .*forget10_perturbed\.jsonl and .*forget10\.jsonl differ at row 0 \(0-based; line 1 of a "
        r"JSON-lines file\): 'What genre does AuthorG write\?' against 'Where was AuthorG born\?'",
        perturbed_in_other_order,
    ),
    "fit_max_length_shorter_than_a_prompt": Case(
        fit("--data.max_length=12"),
        r"error: .*forget10\.jsonl, row 0 \(0-based\): question 'Where was AuthorG born\?' alone is \d+ tokens, which "
        r"leaves no room for its answer within --data\.max_length=12; raise --data\.max_length$",
    ),
    "evaluate_tokenizer_without_eos": Case(
        evaluate("--tokenizer", "{case}/tokenizer"),
        r"error: tokenizer at '.*tokenizer' has no EOS token nor a pad token; every answer must end with EOS",
        tokenizer_without_eos,
    ),
    "fit_tokenizer_flag_that_would_be_ignored": Case(
        fit("--data.tokenizer={case}/tokenizer"),
        r"error: --data\.tokenizer cannot be set: the CLI sets it from --model\.model \(the model directory's own "
        r"tokenizer\), so a value given here would be ignored",
    ),
    "fit_chat_without_chat_template": Case(
        fit("--data.template.chat=true"),
        r"error: .*forget10\.jsonl, row 0 \(0-based\): tokenizer '.*' has no chat template, but "
        r"--data\.template\.chat asks for one",
    ),
    # fit: the evaluation callback's retain reference
    "fit_missing_reference": Case(
        with_reference(), r"error: retain reference .*ref\.json does not exist \(expected the eval\.json of the"
    ),
    "fit_truncated_reference": Case(
        with_reference(),
        r"error: .*ref\.json is not a JSON file \(.*\); re-run the evaluation that wrote it",
        reference(text=lambda body: body[: len(body) // 2]),
    ),
    "fit_reference_of_another_split": Case(
        with_reference(),
        r"error: retain reference .*ref\.json was made on forget split 'forget05', but this evaluation uses 'forget10'",
        reference(_other_split),
    ),
    "fit_reference_with_null_truth_ratios": Case(
        with_reference(),
        r"error: retain reference .*ref\.json holds null \(or non-finite\) forget truth ratios for 2 rows \(indices "
        r"0\.\.1\) of its 4, so forget quality would be undefined",
        reference(_null_truth_ratios),
    ),
    "fit_reference_of_other_questions": Case(
        with_reference(),
        r"error: retain reference .*ref\.json scored other questions of forget10_perturbed than this evaluation \(it "
        r"read '/data/another_benchmark', this evaluation reads '.*'\)",
        reference(_other_questions),
    ),
    "fit_reference_with_other_rows": Case(
        with_reference("--trainer.callbacks.settings.limit=2"),
        r"error: retain reference .*ref\.json holds forget truth ratios for 4 rows \(indices 0\.\.3\) but this "
        r"evaluation of forget10 has 2 rows \(indices 0\.\.1\) \(a different settings\.limit or split\)",
        reference(),
    ),
    # evaluate: its own flags in every message
    "evaluate_missing_required_flag": Case(
        ("evaluate", "--benchmark", "{bench}", "--out", "{out}/e.json"),
        r"error: missing --model; see `python -m baldro_lightning evaluate --help`$",
    ),
    "evaluate_choice_not_allowed": Case(
        evaluate("--forget_split", "forget20"),
        r"error: argument --forget_split: invalid choice: 'forget20' \(choose from 'forget01', 'forget05', "
        r"'forget10'\); see `python -m baldro_lightning evaluate --help`$",
    ),
    "evaluate_metric_group_unknown": Case(
        evaluate("--metric_groups", "[forget,fluency]"), r"error: --metric_groups: .*fluency"
    ),
    "evaluate_batch_size_zero": Case(
        evaluate("--batch_size", "0"), r"error: TofuSettings are invalid: --batch_size must be >= 1, got 0$"
    ),
    "evaluate_out_is_a_directory": Case(
        evaluate("--out", "{out}"), r"error: --out '.*out' is a directory, not a file; pass a file path"
    ),
    "evaluate_out_under_a_file": Case(
        evaluate("--out", "{a_file}/eval.json"), r"error: --out '.*a_file/eval\.json' cannot be created", a_file
    ),
    "evaluate_missing_benchmark": Case(
        evaluate("--benchmark", "{case}/no_benchmark"),
        r"error: --benchmark '.*no_benchmark' does not exist; pass the directory that holds forget10_perturbed\.jsonl",
    ),
    "evaluate_max_length_shorter_than_a_prompt": Case(
        evaluate("--max_length", "12"),
        r"error: .*forget10_perturbed\.jsonl, row 0 \(0-based\): question 'Where was AuthorG born\?' alone is \d+ "
        r"tokens, which leaves no room for its answer within --max_length=12; raise --max_length$",
    ),
    "evaluate_missing_model": Case(
        evaluate("--model", "{case}/no_model"), r"error: --model '.*no_model' does not exist; pass a directory"
    ),
    "evaluate_truncated_weights": Case(
        evaluate("--model", "{case}/model"),
        r"error: --model: .*model\.safetensors is not a complete safetensors file",
        garbage_weights,
    ),
    "evaluate_system_prompt_without_chat": Case(
        evaluate("--system_prompt", "Be brief."),
        r"error: --system_prompt='Be brief\.' / --date_string=None are only used by chat templates; turn on --chat",
    ),
    "evaluate_perturbed_rows_in_another_order": Case(
        evaluate(),
        r"error: .*forget10_perturbed\.jsonl and .*forget10\.jsonl differ at row 0",
        perturbed_in_other_order,
    ),
    "evaluate_perturbed_answer_not_a_list": Case(
        evaluate(),
        r"error: .*forget10_perturbed\.jsonl, line 2: field 'perturbed_answer' must be a list of 5 strings, got str",
        perturbed_answer_not_a_list,
    ),
    "evaluate_missing_reference": Case(
        evaluate("--retain_reference", "{case}/ref.json"),
        r"error: retain reference .*ref\.json does not exist .*: `python -m baldro_lightning evaluate --model <retain",
    ),
    "evaluate_reference_with_null_truth_ratios": Case(
        evaluate("--retain_reference", "{case}/ref.json"),
        r"error: retain reference .*ref\.json holds null \(or non-finite\) forget truth ratios",
        reference(_null_truth_ratios),
    ),
    "evaluate_reference_of_other_questions": Case(
        evaluate("--retain_reference", "{case}/ref.json"),
        r"error: retain reference .*ref\.json scored other questions of forget10_perturbed than this evaluation",
        reference(_other_questions),
    ),
    # export
    "export_missing_checkpoint": Case(
        ("export", "--checkpoint", "{case}/missing.ckpt", "--out", "{out}/model"),
        r"error: --checkpoint='.*missing\.ckpt' does not exist; pass a \.ckpt file or checkpoint directory",
    ),
    "export_truncated_checkpoint": Case(
        ("export", "--checkpoint", "{case}/cut.ckpt", "--out", "{out}/model"),
        r"error: --checkpoint='.*cut\.ckpt' is not a readable checkpoint",
        truncated_checkpoint,
    ),
    "export_checkpoint_without_policy": Case(
        ("export", "--checkpoint", "{case}/other.ckpt", "--out", "{out}/model"),
        r"error: --checkpoint='.*other\.ckpt' holds no policy\.\* weights",
        checkpoint_of({"state_dict": {"layer.weight": torch.zeros(2)}}),
    ),
    "export_onto_another_base_model": Case(
        (*EXPORT, "--model", "{other_model}"),
        r"error: --checkpoint '.*' does not fit --model '.*': model\.embed_tokens\.weight is \(\d+, 32\) in the "
        r"checkpoint but \(\d+, 64\) in the model --model describes; .* Pass the base model it was trained from as "
        r"--model$",
    ),
    "export_out_is_a_file": Case(
        ("export", "--checkpoint", "{ckpt}", "--out", "{a_file}"),
        r"error: --out '.*a_file' is a file, not a directory",
        a_file,
    ),
    "export_missing_config": Case(
        (*EXPORT, "--config", "{case}/config.yaml"), r"error: --config '.*config\.yaml' does not exist"
    ),
    "export_missing_required_flag": Case(
        ("export", "--checkpoint", "{ckpt}"),
        r"error: the following arguments are required: --out; see `python -m baldro_lightning export --help`$",
    ),
    # sweep
    "sweep_missing_grid": Case(("sweep", "{case}/grid.yaml"), r"error: grid file .*grid\.yaml does not exist"),
    "sweep_option_not_accepted": Case(
        ("sweep", "{case}/grid.yaml"),
        r"error: run npo: --model\.gama: UnlearningModule has no option 'gama'",
        grid({"set": {"model.init_args.gama": 0.5}}),
    ),
    "sweep_malformed_set": Case(
        ("sweep", "{case}/grid.yaml", "--set", "trainer.max_epochs"),
        r"error: --set 'trainer\.max_epochs' must look like key=value",
        grid({}),
    ),
    # report
    "report_missing_run_directory": Case(
        ("report", "{case}/no_run", "--out", "{out}/report"), r"error: run directory .*no_run does not exist"
    ),
    "report_no_evaluation": Case(
        ("report", "{case}/runs", "--out", "{out}/report"), r"error: .*runs holds no evaluation", empty_directory
    ),
    "report_out_under_a_file": Case(
        ("report", "{case}/runs", "--out", "{a_file}/report"),
        r"error: --out '.*a_file/report' cannot be created",
        lambda paths: (a_file(paths), empty_directory(paths)),
    ),
    "report_bad_ratio": Case(
        ("report", "{case}/runs", "--out", "{out}/report", "--mu_ratio", "0"),
        r"error: --mu_ratio must be a positive ratio such as 0\.9, got 0\.0",
        empty_directory,
    ),
}


# --------------------------------------------------------------------------------------------------------------
# Running a case


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model, tiny_benchmark) -> World:
    root = tmp_path_factory.mktemp("cli_errors_world")
    corpus = [json.loads(line)["question"] for line in (tiny_benchmark / "full.jsonl").read_text().splitlines()]
    other = build_tiny_model(root / "other_model", corpus, hidden=64)
    # The other model must read the same token ids: give it the tiny model's tokenizer.
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(other)
    state = load_causal_lm(str(tiny_model), "float32").state_dict()
    checkpoint = root / "policy.ckpt"
    torch.save({"state_dict": {f"policy.{k}": v for k, v in state.items()}}, checkpoint)
    settings = TofuSettings(metric_groups=("forget",), max_new_tokens=2)
    evaluator = TofuEvaluator(str(tiny_benchmark), load_tokenizer(str(tiny_model)), max_length=64, settings=settings)
    reference = root / "retain" / "eval.json"
    evaluator.run(load_causal_lm(str(tiny_model), "float32"), reference)
    return World(tiny_model, other, tiny_benchmark, checkpoint, reference)


def _prepare(kind: str, world: World, root: Path) -> tuple[list[str], Paths]:
    """The case's directory with its inputs and earlier outputs, and its command line."""
    paths = Paths(world, root / kind)
    (paths.out / "earlier").mkdir(parents=True)
    (paths.out / "earlier" / "eval.json").write_text('{"meta": {}, "metrics": {}}\n')
    (paths.out / "eval.json").write_text('{"meta": {"earlier": true}, "metrics": {}}\n')
    (paths.out / "model").mkdir()
    (paths.out / "model" / "config.json").write_text('{"earlier": true}\n')
    case = CASES[kind]
    if case.prepare is not None:
        case.prepare(paths)
    values = paths.values()
    return [arg.format(**values) for arg in case.args], paths


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root``, with a digest of each file's bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        out[name] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _check(kind: str, status: int, stderr_lines: list[str], before: dict[str, str], paths: Paths) -> None:
    shown = "\n".join(stderr_lines[:20])
    assert status == 2, f"{kind}: exit status {status}, stderr:\n{shown}"
    assert stderr_lines, f"{kind}: nothing on stderr"
    assert re.match(CASES[kind].first_line, stderr_lines[0]), (
        f"{kind}: first line\n{stderr_lines[0]}\n!~ {CASES[kind].first_line}"
    )
    assert not any("Traceback" in line for line in stderr_lines), f"{kind}: a traceback:\n{shown}"
    after = _snapshot(paths.case)
    added = sorted(set(after) - set(before))
    changed = sorted(name for name in before if after.get(name) != before[name])
    assert not added and not changed, f"{kind}: files added {added}, changed or removed {changed}"


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input_in_process(kind, world, tmp_path, capsys):
    argv, paths = _prepare(kind, world, tmp_path)
    before = _snapshot(paths.case)
    capsys.readouterr()
    status = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    _check(kind, status, lines, before, paths)


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def import_noise() -> set[str]:
    """Lines the environment prints while ``baldro_lightning.__main__`` is imported, digits blanked (times, pids)."""
    done = subprocess.run(
        [sys.executable, "-c", "import baldro_lightning.__main__"],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        cwd=REPO,
        timeout=300,
    )
    return {_blank_digits(line) for line in done.stderr.splitlines() if line.strip()}


def _blank_digits(line: str) -> str:
    return re.sub(r"\d+", "#", line.strip())


@dataclass(frozen=True)
class Outcome:
    """A finished subprocess run of one case."""

    status: int
    lines: list[str]
    before: dict[str, str]
    paths: Paths


@pytest.fixture(scope="module")
def subprocess_outcomes(request, world, import_noise, tmp_path_factory) -> dict[str, Outcome]:
    """Every selected case run as ``python -m baldro_lightning ...``, a few at a time (each start-up takes seconds)."""
    kinds = sorted(
        {
            item.callspec.params["kind"]
            for item in request.session.items
            if getattr(item, "originalname", None) == "test_bad_input_in_subprocess"
        }
    )
    root = tmp_path_factory.mktemp("cli_errors_subprocess")
    prepared = {kind: _prepare(kind, world, root) for kind in kinds}
    before = {kind: _snapshot(paths.case) for kind, (_, paths) in prepared.items()}

    def run(kind: str) -> Outcome:
        argv, paths = prepared[kind]
        done = subprocess.run(
            [sys.executable, "-m", "baldro_lightning", *argv],
            capture_output=True,
            text=True,
            env=_subprocess_env(),
            cwd=paths.case,
            timeout=900,
        )
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        while lines and _blank_digits(lines[0]) in import_noise:
            lines.pop(0)
        return Outcome(done.returncode, lines, before[kind], paths)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(kinds, pool.map(run, kinds), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input_in_subprocess(kind, subprocess_outcomes):
    outcome = subprocess_outcomes[kind]
    _check(kind, outcome.status, outcome.lines, outcome.before, outcome.paths)


def test_the_corpus_covers_every_command_and_at_least_40_kinds():
    commands = {case.args[0] for case in CASES.values()}
    assert commands == {"fit", "evaluate", "export", "sweep", "report"}
    assert len(CASES) >= 40


def test_debug_shows_the_traceback(world, tmp_path):
    """``--debug`` re-raises a user error, so Python prints its traceback; without it, one line."""
    argv, _ = _prepare("export_missing_checkpoint", world, tmp_path)
    with pytest.raises(UserInputError, match=r"--checkpoint='.*missing\.ckpt' does not exist"):
        main([*argv, "--debug"])


def test_a_programming_error_keeps_its_traceback(monkeypatch, tmp_path):
    """Only user errors become one line: anything else propagates (and Python prints its traceback)."""

    def broken(argv):
        raise KeyError("a bug, not a bad input")

    monkeypatch.setitem(entry_point.COMMANDS, "export", entry_point.COMMANDS["export"]._replace(main=broken))
    with pytest.raises(KeyError, match="a bug"):
        main(["export", "--checkpoint", "x", "--out", str(tmp_path / "y")])


class BuggyModule(L.LightningModule):
    """A module with a bug in its constructor (a ValueError that is not a check of an argument)."""

    def __init__(self, size: int = 1) -> None:
        """A bug.

        Args:
            size: Unused.
        """
        super().__init__()
        int("not a number")


def test_a_constructor_bug_is_not_taken_for_a_bad_value(world, tmp_path):
    """A ValueError a constructor raises with its own ``raise`` is a rejected value; one from a call inside it (here
    ``int``) is a bug, and keeps its traceback."""
    args = [arg.format(bench=world.benchmark, model=world.model, out=tmp_path) for arg in FIT]
    args[1] = f"--model={__name__}.BuggyModule"
    args = [arg for arg in args if not arg.startswith(("--model.", "--data.tokenizer"))]
    with pytest.raises(ValueError, match=r"invalid literal for int\(\)"):
        main(args)
