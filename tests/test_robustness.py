"""Attacks as evaluations (issue 20): the relearning split never scores a trained row, quantized weights sit on a
``2^bits``-value grid per channel, recovery is the plain before/after difference, and the attack command and the
end-of-fit callback run on the tiny model, deterministically under a seed."""

from __future__ import annotations

import ast
import copy
import csv
import dataclasses
import inspect
import json
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM

from baldro_lightning.__main__ import main as dispatch
from baldro_lightning.cli import cli_main
from baldro_lightning.data.tokenization import load_tokenizer
from baldro_lightning.evaluation import command as evaluate
from baldro_lightning.evaluation.run_record import (
    ATTACK_PER_SAMPLE_COLUMNS,
    EvalLogError,
    attack_paths,
    load_eval_json,
    read_attack_record,
    reference_truth_ratios,
    run_attack_records,
)
from baldro_lightning.evaluation.tofu import TofuEvaluator, TofuSettings
from baldro_lightning.robustness import command
from baldro_lightning.robustness.attacks import AttackMaterial, Quantize, Relearn
from baldro_lightning.robustness.callbacks import AttackEvaluation
from baldro_lightning.robustness.quantization import (
    dequantized_weight,
    quantizable_linears,
    quantize_linear_weights,
    round_per_channel,
)
from baldro_lightning.robustness.recovery import RecoveredMetric, recovery
from baldro_lightning.robustness.splits import fact_key, leaked_questions, split_forget_rows
from baldro_lightning.robustness.suite import tofu_plan
from baldro_lightning.user_errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
FORGET_ONLY = TofuSettings(metric_groups=("forget",), max_new_tokens=4)


# --------------------------------------------------------------------------------------------------------------
# The relearning split


def test_split_deals_disjoint_rows_of_the_asked_size_the_same_way_per_seed():
    """10 rows at fraction 0.3: round(3.0) = 3 trained and 7 held out, together every row once."""
    indices = list(range(10, 20))
    trained, held = split_forget_rows(indices, 0.3, seed=0)
    assert (len(trained), len(held)) == (3, 7)
    assert sorted(trained + held) == indices and not set(trained) & set(held)
    assert split_forget_rows(indices, 0.3, seed=0) == (trained, held)
    assert any(split_forget_rows(indices, 0.3, seed=s)[0] != trained for s in range(1, 4))
    # At least one row on each side, however small the fraction: 0.01 * 4 rounds to 0, 0.99 * 4 to 4.
    assert [len(part) for part in split_forget_rows([0, 1, 2, 3], 0.01, 0)] == [1, 3]
    assert [len(part) for part in split_forget_rows([0, 1, 2, 3], 0.99, 0)] == [3, 1]


def test_split_keeps_the_rows_of_one_fact_on_one_side():
    """6 rows asking 3 facts twice (facts a, b, c): round(0.5 * 3) = 2 facts trained, 1 held out, never one fact on
    both sides; without keys the same rows split row by row, as before."""
    indices = [0, 1, 2, 3, 4, 5]
    facts = ["a", "b", "c", "a", "b", "c"]
    for seed in range(8):
        trained, held = split_forget_rows(indices, 0.5, seed, facts)
        assert (len(trained), len(held)) == (4, 2) and sorted(trained + held) == indices
        assert not {facts[i] for i in trained} & {facts[i] for i in held}
    assert split_forget_rows(indices, 0.5, 0, list(range(6))) == split_forget_rows(indices, 0.5, 0)
    with pytest.raises(ValueError, match="at least 2"):
        split_forget_rows([0, 1], 0.5, 0, ["a", "a"])
    with pytest.raises(ValueError, match="one per row"):
        split_forget_rows([0, 1, 2], 0.5, 0, ["a", "b"])


def test_fact_keys_pair_the_two_phrasings_of_each_embedded_fact():
    """On the committed embedded forget10 each fact is asked twice (rows i and i + 10 of an author's 20), and the
    split by fact_key keeps the two together; a row without paraphrase fields is its own fact."""
    path = REPO / "data" / "tofu_embedded" / "forget10_perturbed.jsonl"
    rows = [{**json.loads(line), "index": i} for i, line in enumerate(path.read_text().splitlines())]
    keys = [fact_key(row) for row in rows]
    assert len(set(keys)) == len(rows) // 2
    assert all(keys[i] == keys[i + 10] for i in range(len(rows)) if i % 20 < 10)
    trained, held = split_forget_rows([row["index"] for row in rows], 0.5, 0, keys)
    assert not {keys[i] for i in trained} & {keys[i] for i in held}
    assert fact_key({"index": 7, "question": "q"}) == ("row", 7)


@pytest.mark.parametrize(("indices", "fraction", "match"), [([0, 1], 1.0, "in \\(0, 1\\)"), ([0], 0.5, "at least 2")])
def test_split_rejects_bad_inputs(indices, fraction, match):
    with pytest.raises(ValueError, match=match):
        split_forget_rows(indices, fraction, 0)


def test_plan_scores_only_rows_no_attack_trained_on(tiny_model: Path, tiny_benchmark: Path):
    """Checked on the text: decode every row a relearning attack trains on (the forget share and the benign retain
    rows) and look for each held-out question in it."""
    tokenizer = load_tokenizer(str(tiny_model))
    plan = tofu_plan(str(tiny_benchmark), tokenizer, "forget10", FORGET_ONLY, 0.5, 0, str(tiny_model))
    trained, held = plan.split["trained_indices"], plan.split["held_out_indices"]
    assert (len(trained), len(held)) == (2, 2) and not set(trained) & set(held)
    assert sorted(int(row["index"]) for row in plan.held_out_evaluator.rows["forget"]) == held
    assert sorted(int(row["index"]) for row in plan.evaluator.rows["forget"]) == [0, 1, 2, 3]
    questions = [row["question"] for row in plan.held_out_evaluator.rows["forget"]]
    for rows in (plan.material.forget_rows, plan.material.retain_rows):
        texts = [tokenizer.decode(rows[k]["input_ids"]) for k in range(len(rows))]
        assert not [q for q in questions for text in texts if q in text]
    # ... and the forget share is exactly the trained rows: each one's question is in its training text.
    assert sorted(plan.material.forget_rows[k]["index"] for k in range(2)) == trained
    for row in plan.evaluator.rows["forget"]:
        text = (
            tokenizer.decode(plan.material.forget_rows[trained.index(row["index"])]["input_ids"])
            if (row["index"] in trained)
            else None
        )
        assert text is None or row["question"] in text


def test_a_question_on_both_sides_of_the_split_is_refused(tiny_model: Path, tiny_benchmark: Path, tmp_path: Path):
    """Benign relearning's retain rows that ask the forget questions: whichever rows are held out, one leaks."""
    benchmark = Path(shutil.copytree(tiny_benchmark, tmp_path / "dup"))
    forget = [json.loads(line) for line in (benchmark / "forget10_perturbed.jsonl").read_text().splitlines()]
    file = benchmark / "retain90.jsonl"
    retain = [json.loads(line) for line in file.read_text().splitlines()]
    assert len(retain) >= len(forget)
    asked = [{**row, "question": forget[i]["question"]} if i < len(forget) else row for i, row in enumerate(retain)]
    file.write_text("".join(json.dumps(row) + "\n" for row in asked))
    assert leaked_questions(forget[:1], forget[:1]) == [forget[0]["question"]]
    with pytest.raises(ValueError, match="held-out forget question"):
        tofu_plan(str(benchmark), load_tokenizer(str(tiny_model)), "forget10", FORGET_ONLY, 0.5, 0, "m")


def test_evaluator_scores_a_subset_against_the_same_reference_rows(tiny_model: Path, tiny_benchmark: Path, tmp_path):
    reference = tmp_path / "ref.json"
    evaluate.main(
        ["--model", str(tiny_model), "--benchmark", str(tiny_benchmark), "--metric_groups", "[forget]"]
        + ["--max_new_tokens", "2", "--out", str(reference)]
    )
    # Rows 1 and 3 of the reference's 0..3, in row order; a row it lacks is an error.
    assert reference_truth_ratios(reference, "forget10", 2, [3, 1], subset=True).shape == (2,)
    with pytest.raises(EvalLogError, match="holds forget truth ratios"):
        reference_truth_ratios(reference, "forget10", 2, [3, 1])
    with pytest.raises(EvalLogError):
        reference_truth_ratios(reference, "forget10", 1, [7], subset=True)
    settings = TofuSettings(metric_groups=("forget",), max_new_tokens=2, retain_reference=str(reference))
    evaluator = TofuEvaluator(
        str(tiny_benchmark), load_tokenizer(str(tiny_model)), settings=settings, forget_indices=(3, 1)
    )
    assert [row["index"] for row in evaluator.rows["forget"]] == [1, 3]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    result = evaluator.evaluate(model)
    assert sorted(result["metrics"]["forget_Q_A_Prob"]["value_by_index"]) == ["1", "3"]
    assert result["metrics"]["forget_quality"]["agg_value"] is not None
    assert result["meta"]["forget_indices"] == [1, 3]
    with pytest.raises(ValueError, match="drop mia"):
        TofuEvaluator(str(tiny_benchmark), load_tokenizer(str(tiny_model)), forget_indices=(1,))


# --------------------------------------------------------------------------------------------------------------
# Quantization


def test_round_per_channel_by_hand():
    """4 bits: row [7.5, -2, 0.4, 3] has scale 7.5 / 7.5 = 1 and codes [7 (8 clamped), -2, 0, 3]; row
    [-15, 1, 2.2, 0] has scale 15 / 7.5 = 2 and codes [-8 (-7.5 to even), 0 (0.5 to even), 1 (1.1), 0].
    8 bits: [127.5, -1, 0.6] has scale 127.5 / 127.5 = 1 and codes [127 (128 clamped), -1, 1]."""
    codes, scale = round_per_channel(torch.tensor([[7.5, -2.0, 0.4, 3.0], [-15.0, 1.0, 2.2, 0.0]]), bits=4)
    assert codes.tolist() == [[7, -2, 0, 3], [-8, 0, 1, 0]]
    torch.testing.assert_close(scale, torch.tensor([[1.0], [2.0]]))
    codes, scale = round_per_channel(torch.tensor([[127.5, -1.0, 0.6]]), bits=8)
    assert codes.tolist() == [[127, -1, 1]] and scale.item() == 1.0


@pytest.mark.parametrize("backend", ["torchao", "rounding"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weights_take_at_most_2_to_the_bits_values_per_channel(tiny_model: Path, bits: int, backend: str):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    original = {name: module.weight.detach().clone() for name, module in quantizable_linears(model)}
    head = model.get_output_embeddings().weight.detach().clone()
    meta = quantize_linear_weights(model, bits, backend)
    assert meta["simulated"] is (backend == "rounding") and meta["layers"] == len(original) == 14
    most = 0
    for name, module in quantizable_linears(model):
        weight = dequantized_weight(module.weight)
        counts = [len(torch.unique(row)) for row in weight]
        assert max(counts) <= 2**bits, (name, max(counts))
        most = max(most, *counts)
        # The same grid as the rounding by hand: torchao's codes are round_per_channel's.
        codes, scale = round_per_channel(original[name], bits)
        torch.testing.assert_close(weight, codes.float() * scale)
        if backend == "torchao":
            assert torch.equal(module.weight.qdata, codes)
    # A 32-wide row has room for more than 2^(bits-1) values, so a (bits-1)-bit grid would fail this.
    assert most > 2 ** (bits - 1) if bits == 4 else most > 16
    assert torch.equal(model.get_output_embeddings().weight.detach(), head)


# --------------------------------------------------------------------------------------------------------------
# Recovery


def test_recovery_is_after_minus_before_per_row_and_overall():
    """Prob: 0.2 -> 0.5 overall (delta 0.3), row 1: 0.1 -> 0.4 (0.3), row 2: 0.3 -> 0.6 (0.3); ROUGE rows hold
    dicts: row 1 0.25 -> 1.0 (0.75); FQ has no rows; a row only one side holds (row 9) is left out."""
    before = {
        "metrics": {
            "forget_Q_A_Prob": {"agg_value": 0.2, "value_by_index": {"1": 0.1, "2": 0.3, "9": 0.5}},
            "forget_Q_A_ROUGE": {"agg_value": 0.25, "value_by_index": {"1": {"rougeL_recall": 0.25}}},
            "forget_quality": {"agg_value": 0.01, "value_by_index": {}},
        }
    }
    after = {
        "metrics": {
            "forget_Q_A_Prob": {"agg_value": 0.5, "value_by_index": {"1": 0.4, "2": 0.6}},
            "forget_Q_A_ROUGE": {"agg_value": 1.0, "value_by_index": {"1": {"rougeL_recall": 1.0}}},
            "forget_quality": {"agg_value": None, "value_by_index": {}},
        }
    }
    metrics = (
        RecoveredMetric("forget_Q_A_Prob", "p"),
        RecoveredMetric("forget_Q_A_ROUGE", "r", "rougeL_recall"),
        RecoveredMetric("forget_quality", "FQ", per_sample=False),
    )
    aggregate, rows = recovery(before, after, metrics)
    assert aggregate["forget_Q_A_Prob"] == pytest.approx({"before": 0.2, "after": 0.5, "delta": 0.3})
    assert aggregate["forget_quality"]["before"] == 0.01 and aggregate["forget_quality"]["after"] != 0.0
    assert [(r["index"], r["metric"]) for r in rows] == [
        (1, "forget_Q_A_Prob"),
        (2, "forget_Q_A_Prob"),
        (1, "forget_Q_A_ROUGE"),
    ]
    assert [r["delta"] for r in rows] == pytest.approx([0.3, 0.3, 0.75])


# --------------------------------------------------------------------------------------------------------------
# The command and the callback


ATTACKS = [
    {"class_path": "Relearn", "init_args": {"data": "forget", "max_steps": 2, "lr": 1.0e-3, "batch_size": 2}},
    {"class_path": "Relearn", "init_args": {"data": "retain", "max_steps": 2, "lr": 1.0e-3, "batch_size": 2}},
    {"class_path": "Quantize", "init_args": {"bits": 4}},
]


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tiny_benchmark: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "eval.json"
    evaluate.main(
        [
            "--model",
            str(tiny_model),
            "--benchmark",
            str(tiny_benchmark),
            "--max_new_tokens",
            "4",
            "--metric_groups",
            "[forget]",
            "--out",
            str(out),
        ]
    )
    return out


def _attack(tiny_model: Path, tiny_benchmark: Path, reference: Path, out: Path, seed: int) -> int:
    argv = [
        "attack",
        "--model",
        str(tiny_model),
        "--benchmark",
        str(tiny_benchmark),
        "--out",
        str(out),
        "--metric_groups",
        "[forget]",
        "--max_new_tokens",
        "4",
        "--retain_reference",
        str(reference),
        "--split_seed",
        str(seed),
        "--attacks",
        json.dumps(ATTACKS),
    ]
    return dispatch(argv)


def _files(out: Path) -> dict[str, str]:
    """Every attack record and per-sample table, without the fields that hold times."""
    found = {}
    for path in sorted(out.glob("*/*")):
        if path.name == "attack.json":
            data = read_attack_record(path)
            data["meta"].pop("elapsed_s")
            found[str(path.relative_to(out))] = json.dumps(data, sort_keys=True)
        elif path.name == "per_sample.csv":
            found[str(path.relative_to(out))] = path.read_text()
    return found


def test_attack_command_writes_the_records_and_repeats_under_a_seed(
    tiny_model: Path, tiny_benchmark: Path, reference: Path, tmp_path: Path
):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert _attack(tiny_model, tiny_benchmark, reference, first, seed=0) == 0
    names = {"relearn_forget", "relearn_retain", "quantize_int4"}
    assert {p.name for p in first.iterdir()} == names | {"unattacked", "unattacked_held_out"}
    for name in names:
        paths = attack_paths(first, name)
        record = read_attack_record(paths["record"])
        assert set(record["recovery"]) >= {
            "forget_Q_A_ROUGE",
            "forget_Q_A_Prob",
            "forget_truth_ratio",
            "forget_quality",
        }
        with open(paths["per_sample"]) as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == list(ATTACK_PER_SAMPLE_COLUMNS)
        scored = {int(r["index"]) for r in rows}
        if name.startswith("relearn"):
            split = record["meta"]["relearning_split"]
            assert scored == set(split["held_out_indices"])
            if name == "relearn_forget":  # relearn_retain's trained indices number retain rows
                assert record["meta"]["details"]["trained_indices"] == split["trained_indices"]
                assert not scored & set(split["trained_indices"])
            assert load_eval_json(paths["eval"])["meta"]["forget_indices"] == split["held_out_indices"]
        else:
            assert scored == {0, 1, 2, 3}
            assert record["meta"]["details"]["quantization"]["simulated"] is False
        assert record["recovery"]["forget_quality"]["after"] is not None
    # Relearning on the forget share moved the held-out rows' likelihood.
    assert read_attack_record(attack_paths(first, "relearn_forget")["record"])["recovery"]["forget_Q_A_Prob"]["delta"]

    assert _attack(tiny_model, tiny_benchmark, reference, second, seed=0) == 0
    assert _files(first) == _files(second)
    seed = next(
        s for s in range(1, 20) if split_forget_rows([0, 1, 2, 3], 0.5, s) != split_forget_rows([0, 1, 2, 3], 0.5, 0)
    )
    assert _attack(tiny_model, tiny_benchmark, reference, other, seed=seed) == 0
    assert _files(other) != _files(first)


def test_attack_command_rejects_repeated_names_before_loading(tiny_model: Path, tiny_benchmark: Path, tmp_path):
    argv = [
        "--model",
        str(tiny_model),
        "--benchmark",
        str(tiny_benchmark),
        "--out",
        str(tmp_path),
        "--attacks",
        json.dumps([ATTACKS[2], ATTACKS[2]]),
    ]
    with pytest.raises(UserInputError, match="give each a distinct `label`"):
        command.main(argv)
    # The same list from a --config file (YAML with an `attacks:` list) is read and refused the same way.
    config = tmp_path / "attacks.yaml"
    config.write_text(json.dumps({"attacks": [ATTACKS[2], ATTACKS[2]]}))
    with pytest.raises(UserInputError, match="give each a distinct `label`"):
        command.main([*argv[:6], "--config", str(config)])


class _PolicyAtTrainEnd(Callback):
    """The policy's weights when training ends, before any on_fit_end hook."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.state = copy.deepcopy(pl_module.policy.state_dict())


def test_callback_attacks_a_copy_at_the_end_of_a_fast_dev_run(
    tiny_model: Path, tiny_benchmark: Path, reference, tmp_path: Path
):
    callback = {
        "class_path": "baldro_lightning.robustness.callbacks.AttackEvaluation",
        "init_args": {
            "attacks": ATTACKS,
            "settings": {"metric_groups": ["forget"], "max_new_tokens": 4, "retain_reference": str(reference)},
        },
    }
    args = [
        "--model=UnlearningModule",
        f"--model.model={tiny_model}",
        "--model.forget_loss=NPO",
        "--model.retain_loss=NLL",
        "--data=ForgetRetainDataModule",
        f"--data.benchmark={tiny_benchmark}",
        "--data.batch_size=2",
        "--trainer.accelerator=cpu",
        "--trainer.fast_dev_run=true",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.callbacks={json.dumps([callback])}",
    ]
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = cli_main(args, run=False)
    probe = _PolicyAtTrainEnd()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, cli.datamodule)
    attack = next(c for c in cli.trainer.callbacks if isinstance(c, AttackEvaluation))
    assert [a.max_steps for a in attack.attacks if isinstance(a, Relearn)] == [2, 2]  # the config keeps its budget
    records = run_attack_records(tmp_path)
    assert sorted(p.parent.name for p in records) == ["quantize_int4", "relearn_forget", "relearn_retain"]
    assert all(p.is_relative_to(attack.directory(cli.trainer)) for p in records)
    # The attacks trained and quantized copies: the policy is the one training ended with.
    after = cli.model.policy.state_dict()
    assert all(torch.equal(after[key], value) for key, value in probe.state.items())
    # fast_dev_run-sized: one relearning step each, as the records say.
    relearned = [read_attack_record(p)["meta"]["settings"] for p in records if p.parent.name.startswith("relearn")]
    assert [settings["max_steps"] for settings in relearned] == [1, 1]
    assert set(attack.records) == {p.parent.name for p in records}


def test_attacks_are_configured_by_class_path_and_named_once():
    assert Relearn(data="retain").name == "relearn_retain" and Quantize(bits=4, backend="rounding").name == (
        "quantize_int4_rounding"
    )
    assert Relearn().smoke_sized().max_steps == 1 and Quantize().smoke_sized() == Quantize()
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        Relearn(max_steps=0)
    with pytest.raises(ValueError, match="distinct `label`"):
        AttackEvaluation(attacks=[Quantize(bits=8), Quantize(bits=8)])
    material = AttackMaterial("m", 0, forget_rows=list(range(3)), retain_rows=[{"index": i} for i in range(10)])
    retain = Relearn(data="retain", seed=1).training_rows(material)
    assert len(retain) == 3 and len({r["index"] for r in retain}) == 3


@pytest.mark.parametrize("main", [command.main, command.muse_main], ids=["tofu", "muse"])
def test_attack_help_describes_every_flag(main, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    flags = ["--model", "--benchmark", "--out", "--attacks", "--forget_fraction", "--split_seed", "--retain_reference"]
    assert all(f"{flag} " in printed for flag in flags)
    # The command's own flags carry their descriptions.
    assert "share of forget rows relearning trains on" in printed and "seeds the relearning split" in printed


def test_attack_fields_are_documented_for_the_config_help():
    """jsonargparse shows these attribute docstrings as the help of ``--attacks.<field>`` and in YAML comments."""
    for cls in (Relearn, Quantize):
        tree = ast.parse(Path(inspect.getsourcefile(cls)).read_text())
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
        documented = {
            field.target.id
            for field, doc in zip(node.body, node.body[1:], strict=False)
            if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
        }
        assert documented >= {f.name for f in dataclasses.fields(cls)}, cls.__name__


def test_attack_muse_scores_every_row_and_says_so(tiny_model: Path, tmp_path: Path):
    """MUSE: relearning trains on half the raw forget chunks; the evaluation rows cannot be held out from raw text."""
    out = tmp_path / "attacks"
    attacks = [ATTACKS[0], {"class_path": "Quantize", "init_args": {"bits": 8, "backend": "rounding"}}]
    argv = [
        "--model",
        str(tiny_model),
        "--benchmark",
        str(REPO / "data" / "muse_embedded"),
        "--corpus",
        "news",
        "--out",
        str(out),
        "--limit",
        "2",
        "--knowmem_max_new_tokens",
        "2",
        "--verbmem_max_new_tokens",
        "2",
        "--chunk_length",
        "32",
        "--attacks",
        json.dumps(attacks),
    ]
    records = command.muse_main(argv)
    assert set(records) == {"relearn_forget", "quantize_int8_rounding"}
    relearn = records["relearn_forget"]
    assert relearn["meta"]["notes"] and "cannot be held out" in relearn["meta"]["notes"][0]
    assert set(relearn["recovery"]) == {
        "forget_knowmem_ROUGE",
        "forget_verbmem_ROUGE",
        "retain_knowmem_ROUGE",
        "privleak",
    }
    assert records["quantize_int8_rounding"]["meta"]["details"]["quantization"]["simulated"] is True
    # Nothing is held out, so the relearning attack's "before" is the unattacked evaluation of every row.
    held, every = (
        load_eval_json(out / name / "eval.json")["metrics"] for name in ("unattacked_held_out", "unattacked")
    )
    assert held == every
