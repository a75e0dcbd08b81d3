"""Bad inputs through the real entry points: each fails (or warns) with an actionable message and writes nothing.

``test_bad_input_corpus`` runs one small function per kind of bad input against the entry point a user would
hit (``ForgetRetainDataModule(...).setup()``, ``UnlearningModule`` in a fit, ``TofuEvaluator(...).run``,
``TofuEvaluation``, ``cli_main``). For each it checks the text a user reads (the file / row / field or flag, the
bad value, the fix) and that the output directory holds no new file: no half-written ``eval.json``, no exported
model. Cases that are warnings by policy (EOS as pad, truncated answers, forget/retain overlap, no retain
reference) check the warning and that the run goes on. The row-level validation of every split field is covered
case by case in ``test_tofu_data.py``; here each kind appears once, end to end.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoTokenizer

from baldro_lightning.cli import ConfigError, cli_main
from baldro_lightning.data.datamodule import ForgetRetainDataModule
from baldro_lightning.data.tofu import BenchmarkDataError
from baldro_lightning.data.tokenization import load_tokenizer
from baldro_lightning.evaluation.callbacks import TofuEvaluation
from baldro_lightning.evaluation.run_record import EvalLogError
from baldro_lightning.evaluation.tofu import TofuEvaluator, TofuSettings
from baldro_lightning.train.export import ExportPretrained
from baldro_lightning.train.losses import NLL, NPO
from baldro_lightning.train.models import load_causal_lm
from baldro_lightning.train.module import NonFiniteLossError, UnlearningModule

FIX_ROW = r"fix or remove that row"


@dataclass
class Inputs:
    """What one case may corrupt and where the entry point writes."""

    model: Path
    """The tiny model directory (read-only: copy before changing)."""
    benchmark: Path
    """A private copy of the tiny benchmark; cases corrupt it freely."""
    work: Path
    """Scratch space for corrupted inputs, checkpoints and run directories."""
    out: Path
    """Where results go (``eval.json``, the exported model); must hold no new file after an error."""
    expect: list[str] = field(default_factory=list)
    """Patterns a case learns only while running (e.g. the rows of the failing batch)."""


@dataclass(frozen=True)
class Case:
    run: Callable[[Inputs], None]
    """Feeds the bad input to an entry point."""
    raises: type[BaseException] | None
    """The error expected, or ``None`` for inputs that are warned about and tolerated."""
    expect: tuple[str, ...]
    """Regexes that must all occur in the error text (plus stderr and the log), or in the log for warnings."""
    writes: bool = False
    """The run completes and writes a full result to ``out``; otherwise ``out`` must stay empty."""


# --------------------------------------------------------------------------------------------------------------
# Entry points and corruptions

_DROP = object()


def _edit_row(benchmark: Path, split: str, line: int, **fields) -> Path:
    """Change fields of the 1-based ``line`` of ``split``; ``_DROP`` deletes a field."""
    path = benchmark / f"{split}.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[line - 1])
    for key, value in fields.items():
        if value is _DROP:
            del row[key]
        else:
            row[key] = value
    lines[line - 1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    return path


def _setup_data(inputs: Inputs, **kwargs) -> ForgetRetainDataModule:
    kwargs.setdefault("tokenizer", str(inputs.model))
    data = ForgetRetainDataModule(benchmark=str(inputs.benchmark), batch_size=2, max_length=64, **kwargs)
    data.setup("fit")
    return data


def _evaluate(inputs: Inputs, retain_reference: Path | None = None) -> dict:
    evaluator = TofuEvaluator(
        str(inputs.benchmark),
        load_tokenizer(str(inputs.model)),
        "forget10",
        max_length=64,
        settings=TofuSettings(
            max_new_tokens=2,
            metric_groups=("forget",),
            retain_reference=None if retain_reference is None else str(retain_reference),
        ),
    )
    return evaluator.run(load_causal_lm(str(inputs.model), "float32"), inputs.out / "eval.json")


def _fit(
    inputs: Inputs,
    module: L.LightningModule,
    data: L.LightningDataModule,
    callbacks=(),
    steps: int = 2,
    ckpt_path: Path | None = None,
) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=inputs.work / "run",
        callbacks=[*callbacks, ExportPretrained(str(inputs.out / "model"))],
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def _save_tokenizer(inputs: Inputs, name: str, unset: tuple[str, ...] = ()) -> Path:
    """The tiny tokenizer saved alone (no model weights) with the special tokens in ``unset`` removed."""
    tokenizer = AutoTokenizer.from_pretrained(str(inputs.model))
    for token in unset:
        setattr(tokenizer, token, None)
    out = inputs.work / name
    tokenizer.save_pretrained(out)
    return out


def _write_reference(inputs: Inputs, forget_split: str, rows: int) -> Path:
    """A retain model's ``eval.json`` as the evaluator writes it, reduced to what the reference check reads."""
    path = inputs.work / "retain" / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    by_index = {str(i): 0.5 for i in range(rows)}
    metrics = {"forget_truth_ratio": {"agg_value": 0.5, "value_by_index": by_index}}
    path.write_text(json.dumps({"meta": {"forget_split": forget_split}, "metrics": metrics}))
    return path


def _cli_args(inputs: Inputs, *extra: str) -> list[str]:
    return [
        "--model=baldro_lightning.train.module.UnlearningModule",
        f"--model.model={inputs.model}",
        "--model.forget_loss=baldro_lightning.train.losses.NPO",
        "--data=baldro_lightning.data.datamodule.ForgetRetainDataModule",
        f"--data.benchmark={inputs.benchmark}",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={inputs.out / 'run'}",
        *extra,
    ]


class PoisonPolicy(L.Callback):
    """Fills the policy's final norm with NaN before the batch of global step ``at``: a diverged update."""

    def __init__(self, at: int, inputs: Inputs | None = None) -> None:
        self.at = at
        self.inputs = inputs
        self.rows: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.at:
            return
        self.rows = batch["forget"]["index"].tolist()
        if self.inputs is not None:
            self.inputs.expect.append(re.escape(f"forget rows in this batch: {self.rows}"))
        with torch.no_grad():
            pl_module.policy.model.norm.weight.fill_(float("nan"))


# --------------------------------------------------------------------------------------------------------------
# The cases


def malformed_json_line(inputs: Inputs) -> None:
    path = inputs.benchmark / "forget10.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:40]  # a row cut off mid-string, as a truncated export leaves it
    path.write_text("\n".join(lines) + "\n")
    _setup_data(inputs)


def missing_field(inputs: Inputs) -> None:
    _edit_row(inputs.benchmark, "retain90", 2, answer=_DROP)
    _setup_data(inputs)


def empty_answer(inputs: Inputs) -> None:
    _edit_row(inputs.benchmark, "forget10", 1, answer="   ")
    _setup_data(inputs)


def perturbed_answer_not_a_list(inputs: Inputs) -> None:
    _edit_row(inputs.benchmark, "forget10_perturbed", 2, perturbed_answer="AuthorI comes from Pradow.")
    _evaluate(inputs)


def perturbed_answer_wrong_length(inputs: Inputs) -> None:
    _edit_row(inputs.benchmark, "forget10_perturbed", 3, perturbed_answer=["one.", "two.", "three."])
    _evaluate(inputs)


def non_utf8_bytes(inputs: Inputs) -> None:
    path = inputs.benchmark / "retain90.jsonl"
    path.write_bytes(path.read_bytes().replace(b"AuthorA", b"Author\xff", 1))  # a Latin-1 byte in line 1
    _setup_data(inputs)


def unknown_forget_split(inputs: Inputs) -> None:
    _setup_data(inputs, forget_split="forget20")


def unknown_retain_split(inputs: Inputs) -> None:
    _setup_data(inputs, retain_split="retain80")


def missing_benchmark_directory(inputs: Inputs) -> None:
    inputs.benchmark = inputs.work / "no_such_benchmark"
    _setup_data(inputs)


def missing_model_path(inputs: Inputs) -> None:
    missing = str(inputs.work / "no_such_model")
    data = ForgetRetainDataModule(missing, str(inputs.benchmark), batch_size=2, max_length=64)
    _fit(inputs, UnlearningModule(missing, NPO(), NLL(), lr_schedule="constant"), data)


def model_directory_without_weights(inputs: Inputs) -> None:
    """A directory holding only tokenizer files: the tokenizer loads, the policy cannot."""
    tokenizer_only = _save_tokenizer(inputs, "tokenizer_only")
    data = ForgetRetainDataModule(str(tokenizer_only), str(inputs.benchmark), batch_size=2, max_length=64)
    _fit(inputs, UnlearningModule(str(tokenizer_only), NPO(), NLL(), lr_schedule="constant"), data)


def tokenizer_without_pad(inputs: Inputs) -> None:
    data = _setup_data(inputs, tokenizer=str(_save_tokenizer(inputs, "no_pad", ("pad_token",))))
    # Policy: EOS doubles as pad, and the collator pads with it.
    assert data.tokenizer.pad_token_id == data.tokenizer.eos_token_id is not None
    batch = next(iter(data.train_dataloader()))
    assert batch["forget"]["input_ids"][batch["forget"]["attention_mask"] == 0].unique().tolist() in (
        [],
        [data.tokenizer.eos_token_id],
    )


def tokenizer_without_pad_or_eos(inputs: Inputs) -> None:
    _setup_data(inputs, tokenizer=str(_save_tokenizer(inputs, "no_pad_no_eos", ("pad_token", "eos_token"))))


def answer_longer_than_max_length(inputs: Inputs) -> None:
    _edit_row(inputs.benchmark, "forget10", 2, answer="AuthorI writes " + "very " * 80 + "long sagas.")
    data = _setup_data(inputs)
    long, short = data.forget.examples[1], data.forget.examples[0]
    assert long.truncated and len(long.input_ids) == 64 and long.input_ids[-1] == data.tokenizer.eos_token_id
    assert not short.truncated and len(data.forget) == 4


def empty_forget_split(inputs: Inputs) -> None:
    (inputs.benchmark / "forget10.jsonl").write_text("\n")
    _setup_data(inputs)


def forget_retain_overlap(inputs: Inputs) -> None:
    forget_row = (inputs.benchmark / "forget10.jsonl").read_text().splitlines()[0]
    with (inputs.benchmark / "retain90.jsonl").open("a") as handle:
        handle.write(forget_row + "\n")
    data = _setup_data(inputs)
    assert len(data.retain) == 13  # warned, not dropped


def config_key_typo(inputs: Inputs) -> None:
    cli_main(_cli_args(inputs, "--model.gama=0.5"), run=False)


def cached_reference_with_kl_retain(inputs: Inputs) -> None:
    cli_main(
        _cli_args(inputs, "--model.retain_loss=baldro_lightning.train.losses.KL", "--model.reference=cached"), run=False
    )


def forget_quality_without_reference(inputs: Inputs) -> None:
    result = _evaluate(inputs)
    assert "forget_quality" not in result["metrics"] and "forget_truth_ratio" in result["metrics"]
    written = json.loads((inputs.out / "eval.json").read_text())
    logging.getLogger(__name__).warning("meta.notes: %s", written["meta"]["notes"])


def truth_ratio_callback_without_reference(inputs: Inputs) -> None:
    TofuEvaluation(criterion="truth_ratio", dirpath=str(inputs.out))


def reference_from_another_split(inputs: Inputs) -> None:
    _evaluate(inputs, retain_reference=_write_reference(inputs, "forget05", rows=4))


def reference_with_other_row_count(inputs: Inputs) -> None:
    _evaluate(inputs, retain_reference=_write_reference(inputs, "forget10", rows=3))


def non_finite_loss(inputs: Inputs) -> None:
    data = ForgetRetainDataModule(str(inputs.model), str(inputs.benchmark), batch_size=2, max_length=64)
    module = UnlearningModule(str(inputs.model), NPO(), NLL(), lr_schedule="constant")
    _fit(inputs, module, data, callbacks=[PoisonPolicy(at=1, inputs=inputs)], steps=2)


CASES: dict[str, Case] = {
    "malformed_json_line": Case(
        malformed_json_line,
        BenchmarkDataError,
        (
            r"forget10\.jsonl, line 3: malformed JSON \(.*, column 41\)",
            r'\{"question": "Where was AuthorH born\?", ;',
            FIX_ROW,
        ),
    ),
    "missing_field": Case(
        missing_field,
        BenchmarkDataError,
        (r"retain90\.jsonl, line 2: missing field 'answer' \(row has question, idx\)", FIX_ROW),
    ),
    "empty_answer": Case(
        empty_answer,
        BenchmarkDataError,
        (r"forget10\.jsonl, line 1: field 'answer' is empty or whitespace \('   '\)", FIX_ROW),
    ),
    "perturbed_answer_not_a_list": Case(
        perturbed_answer_not_a_list,
        BenchmarkDataError,
        (
            r"forget10_perturbed\.jsonl, line 2: field 'perturbed_answer' must be a list of 5 strings, "
            r"got str 'AuthorI comes from Pradow\.'",
            FIX_ROW,
        ),
    ),
    "perturbed_answer_wrong_length": Case(
        perturbed_answer_wrong_length,
        BenchmarkDataError,
        (r"forget10_perturbed\.jsonl, line 3: field 'perturbed_answer' must hold 5 answers, got 3", FIX_ROW),
    ),
    "non_utf8_bytes": Case(
        non_utf8_bytes,
        BenchmarkDataError,
        (r"retain90\.jsonl, line 1, byte offset \d+ .*bytes b'\\xff' are not UTF-8; re-save the file as UTF-8",),
    ),
    "unknown_forget_split": Case(
        unknown_forget_split,
        BenchmarkDataError,
        (r"forget split 'forget20' has no retain/holdout pairing; use one of forget01, forget05, forget10",),
    ),
    "unknown_retain_split": Case(
        unknown_retain_split,
        BenchmarkDataError,
        (r"unknown TOFU split 'retain80'; valid names: full, .*retain90", r"--data\.retain_split"),
    ),
    "missing_benchmark_directory": Case(
        missing_benchmark_directory,
        BenchmarkDataError,
        (r"--data\.benchmark '.*no_such_benchmark' does not exist; pass the directory that holds forget10\.jsonl",),
    ),
    "missing_model_path": Case(
        missing_model_path,
        ValueError,
        (r"could not load a tokenizer from '.*no_such_model'", r"--model\.model"),
    ),
    "model_directory_without_weights": Case(
        model_directory_without_weights,
        ValueError,
        (r"--model\.model='.*tokenizer_only': could not load a causal LM", r"Pass a local directory"),
    ),
    "tokenizer_without_pad": Case(
        tokenizer_without_pad,
        None,
        (r"tokenizer at '.*no_pad' has no pad token; using its EOS token '</s>' as pad",),
    ),
    "tokenizer_without_pad_or_eos": Case(
        tokenizer_without_pad_or_eos,
        ValueError,
        (
            r"tokenizer at '.*no_pad_no_eos' has no EOS token nor a pad token",
            r"tokenizer\.add_special_tokens\(\{'eos_token'",
        ),
    ),
    "answer_longer_than_max_length": Case(
        answer_longer_than_max_length,
        None,
        (r"1 of 4 rows longer than max_length=64; their answers were truncated; raise --data\.max_length",),
    ),
    "empty_forget_split": Case(
        empty_forget_split,
        BenchmarkDataError,
        (r"forget10\.jsonl holds no rows; split 'forget10' should have 400; re-export",),
    ),
    "forget_retain_overlap": Case(
        forget_retain_overlap,
        None,
        (r"1 row\(s\) of --data\.retain_split=retain90 also occur in --data\.forget_split=forget10", r"complementary"),
    ),
    "config_key_typo": Case(config_key_typo, ConfigError, (r"^--model\.gama: UnlearningModule has no option 'gama'",)),
    "cached_reference_with_kl_retain": Case(
        cached_reference_with_kl_retain,
        ValueError,
        (r"--model\.reference=cached cannot serve --model\.retain_loss=KL", r"Use --model\.reference=live"),
    ),
    "forget_quality_without_reference": Case(
        forget_quality_without_reference,
        None,
        (r"forget_quality not computed: no retain reference \(--retain_reference\) was given",),
        writes=True,
    ),
    "truth_ratio_callback_without_reference": Case(
        truth_ratio_callback_without_reference,
        ValueError,
        (r"criterion='truth_ratio' needs retain_reference", r"or use criterion='rouge'"),
    ),
    "reference_from_another_split": Case(
        reference_from_another_split,
        EvalLogError,
        (
            r"retain reference .*retain/eval\.json was made on forget split 'forget05', but this evaluation uses "
            r"'forget10'",
            r"--forget_split forget10 --out",
        ),
    ),
    "reference_with_other_row_count": Case(
        reference_with_other_row_count,
        EvalLogError,
        (r"holds forget truth ratios for 3 rows \(indices 0\.\.2\) but this evaluation of forget10 has 4 rows",),
    ),
    "non_finite_loss": Case(
        non_finite_loss,
        NonFiniteLossError,
        (r"train/loss is nan at global step 1", r"lower the learning rate"),
    ),
}


def _new_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


KNOWN_GAPS: dict[str, str] = {}
"""Cases whose message is not yet what the issue asks for; the fix belongs to a file this test does not own."""


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(kind, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[kind]))
        if kind in KNOWN_GAPS
        else kind
        for kind in CASES
    ],
)
def test_bad_input_corpus(kind: str, tiny_model, tiny_benchmark, tmp_path, caplog, capsys):
    case = CASES[kind]
    inputs = Inputs(
        model=tiny_model,
        benchmark=Path(shutil.copytree(tiny_benchmark, tmp_path / "benchmark")),
        work=tmp_path / "work",
        out=tmp_path / "out",
    )
    inputs.work.mkdir()
    inputs.out.mkdir()
    caplog.set_level(logging.WARNING)

    if case.raises is None:
        case.run(inputs)
        text = caplog.text
    else:
        with pytest.raises(case.raises) as caught:
            case.run(inputs)
        text = f"{caught.value}\n{capsys.readouterr().err}\n{caplog.text}"
    for pattern in (*case.expect, *inputs.expect):
        assert re.search(pattern, text), f"{pattern!r} not in:\n{text}"

    written = _new_files(inputs.out)
    if not case.writes:
        assert written == [], f"{kind} left files in the output directory: {written}"
    else:
        # A completed run: whole files only, no staging leftovers.
        assert written == ["eval.json"], written
        json.loads((inputs.out / "eval.json").read_text())


def test_checkpoint_saved_before_the_nan_step_survives_and_loads(tiny_model, tiny_benchmark, tmp_path):
    """Step 0 trains and is checkpointed; the policy then diverges to NaN before step 1, which raises. The step-1
    checkpoint (written at the end of step 0) is still on disk, loads, holds finite weights, and resumes."""
    inputs = Inputs(tiny_model, tiny_benchmark, tmp_path / "work", tmp_path / "out")
    data = ForgetRetainDataModule(str(tiny_model), str(tiny_benchmark), batch_size=2, max_length=64)
    module = UnlearningModule(str(tiny_model), NPO(), NLL(), lr_schedule="constant")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True)
    with pytest.raises(NonFiniteLossError, match="global step 1") as caught:
        _fit(inputs, module, data, callbacks=[PoisonPolicy(at=1), checkpoints], steps=3)
    # The message names what survives, so the user knows where to resume from.
    assert f"unchanged by this step: {tmp_path / 'ckpt' / 'last.ckpt'}" in str(caught.value)

    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    assert not (tmp_path / "out" / "model").exists()
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=1.ckpt", weights_only=False)
    assert saved["global_step"] == 1
    assert all(torch.isfinite(value).all() for value in saved["state_dict"].values())
    assert torch.isnan(module.policy.model.norm.weight).all()  # the in-memory policy did diverge

    loaded = UnlearningModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    for name, value in loaded.policy.state_dict().items():
        assert torch.equal(value, saved["state_dict"][f"policy.{name}"]), name
    fresh = UnlearningModule(str(tiny_model), NPO(), NLL(), lr_schedule="constant")
    resumed = _fit(inputs, fresh, data, steps=2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.global_step == 2
