"""TofuEvaluator end to end on the tiny fixtures: layout, agreement with a naive per-example loop, references."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from baldro_lightning.__main__ import main as entry_point
from baldro_lightning.data.tokenization import (
    PromptTemplate,
    encode_example,
    encode_for_scoring,
    encode_prompt,
    load_tokenizer,
)
from baldro_lightning.evaluation import tofu
from baldro_lightning.evaluation.command import main as evaluate_main
from baldro_lightning.evaluation.command import muse_main as evaluate_muse_main
from baldro_lightning.evaluation.engine import (
    AnswerExample,
    RowScores,
    generate_answers,
    position_budget_problem,
    reporting_progress,
    score_examples,
    shard_rows,
)
from baldro_lightning.evaluation.muse import MuseSettings
from baldro_lightning.evaluation.run_record import EvalLogError, load_eval_json
from baldro_lightning.evaluation.tofu import TofuEvaluator, TofuSettings

EXPECTED_KEYS = {
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "forget_Q_A_PARA_Prob",
    "forget_Q_A_PERT_Prob",
    "forget_truth_ratio",
    "extraction_strength",
    "exact_memorization",
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "ra_Q_A_Prob_normalised",
    "ra_Q_A_ROUGE",
    "ra_Truth_Ratio",
    "wf_Q_A_Prob_normalised",
    "wf_Q_A_ROUGE",
    "wf_Truth_Ratio",
    "model_utility",
    "mia_loss",
    "mia_zlib",
    "mia_min_k",
    "mia_min_k_plus_plus",
    "privleak",
}
AGGREGATE_ONLY = {"model_utility", "privleak", "forget_quality"}
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


def make_evaluator(benchmark, tokenizer, **overrides) -> TofuEvaluator:
    # batch_size 5 mixes rows of different splits and answer kinds in one padded forward.
    settings = {"batch_size": 5, "generation_batch_size": 3, "max_new_tokens": NEW_TOKENS} | overrides
    return TofuEvaluator(str(benchmark), tokenizer, forget_split="forget10", settings=TofuSettings(**settings))


@pytest.fixture(scope="module")
def evaluated(tiny_benchmark, tokenizer, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "target" / "eval.json"
    evaluator = make_evaluator(tiny_benchmark, tokenizer)
    evaluator.run(model, out, model_name="tiny")
    return out


# --------------------------------------------------------------------------------------------------------------
# Naive reference: one example per forward, plain cross-entropy and log-softmax in fp64


def naive_answer(model, tokenizer, question: str, answer: str) -> dict:
    example = encode_example(tokenizer, PromptTemplate(), question, answer, 512)
    ids = torch.tensor([example.input_ids])
    labels = torch.tensor(example.labels)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    nll = F.cross_entropy(logits, labels[1:], ignore_index=-100).item()
    targets = labels[1:]
    positions = torch.nonzero(targets != -100).flatten()[:-1]  # drop the EOS target
    logp = torch.log_softmax(logits[positions], dim=-1)
    token_logps = logp.gather(-1, targets[positions].unsqueeze(-1)).squeeze(-1)
    probs = logp.exp()
    mu = (probs * logp).sum(-1)
    var = ((probs * logp.square()).sum(-1) - mu.square()).clamp_min(1e-6)  # the reference's uncentred form
    z = (token_logps - mu) / var.sqrt()
    k = max(1, int(0.4 * len(positions)))
    preds = logp.argmax(-1)
    return {
        "nll": nll,
        "min_k": -token_logps.sort().values[:k].mean().item(),
        "min_k_plus_plus": -z.sort().values[:k].mean().item(),
        "em": (preds == targets[positions]).double().mean().item(),
    }


def naive_truth_ratio(correct_nll: float, wrong_nlls: list[float]) -> float:
    return math.exp(-np.mean(wrong_nlls)) / (math.exp(-correct_nll) + 1e-10)


def rows_of(benchmark: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (benchmark / f"{split}.jsonl").read_text().splitlines()]


def test_eval_json_layout_and_every_metric(evaluated, tiny_benchmark):
    out = evaluated
    data = json.loads(out.read_text())  # strict JSON: no NaN literals
    assert set(data) == {"meta", "metrics"}
    metrics = data["metrics"]
    assert set(metrics) == EXPECTED_KEYS  # no forget_quality without a reference...
    assert any("forget_quality" in note for note in data["meta"]["notes"])  # ...and the meta says why
    meta = data["meta"]
    assert meta["forget_split"] == "forget10" and meta["retain_split"] == "retain90"
    assert meta["holdout_split"] == "holdout10" and meta["max_new_tokens"] == NEW_TOKENS
    assert meta["rows"] == {
        "forget10_perturbed": 4,
        "retain_perturbed": 4,
        "real_authors_perturbed": 4,
        "world_facts_perturbed": 4,
        "holdout10": 4,
    }
    assert not list(out.parent.glob(".*tmp"))
    for name, entry in metrics.items():
        assert isinstance(entry["agg_value"], float), name
        if name in AGGREGATE_ONLY:
            assert entry["value_by_index"] == {}
            continue
        assert set(entry["value_by_index"]) == {"0", "1", "2", "3"}, name
    assert all(len(v) == 5 for v in metrics["forget_Q_A_PERT_Prob"]["value_by_index"].values())
    assert set(metrics["mia_min_k"]["holdout_value_by_index"]) == {"0", "1", "2", "3"}
    rouge_row = metrics["retain_Q_A_ROUGE"]["value_by_index"]["2"]
    assert isinstance(rouge_row["generation"], str) and 0.0 <= rouge_row["rougeL_recall"] <= 1.0
    assert metrics["privleak"]["agg_value"] == pytest.approx(
        ((1 - metrics["mia_min_k"]["agg_value"]) - 0.5) / (0.5 + 1e-10) * 100
    )


def test_batched_values_equal_naive_per_example_loop(evaluated, tiny_benchmark, model, tokenizer):
    out = evaluated
    metrics = load_eval_json(out)["metrics"]
    tol = {"rtol": 1e-5, "atol": 1e-8}
    forget = rows_of(tiny_benchmark, "forget10_perturbed")
    for i, row in enumerate(forget):
        answer = naive_answer(model, tokenizer, row["question"], row["answer"])
        para = naive_answer(model, tokenizer, row["question"], row["paraphrased_answer"])["nll"]
        pert = [naive_answer(model, tokenizer, row["question"], a)["nll"] for a in row["perturbed_answer"]]
        key = str(i)
        np.testing.assert_allclose(metrics["forget_Q_A_Prob"]["value_by_index"][key], math.exp(-answer["nll"]), **tol)
        np.testing.assert_allclose(metrics["forget_Q_A_PARA_Prob"]["value_by_index"][key], math.exp(-para), **tol)
        np.testing.assert_allclose(
            metrics["forget_Q_A_PERT_Prob"]["value_by_index"][key], np.exp(-np.array(pert)), **tol
        )
        np.testing.assert_allclose(
            metrics["forget_truth_ratio"]["value_by_index"][key], naive_truth_ratio(para, pert), **tol
        )
        np.testing.assert_allclose(metrics["mia_loss"]["value_by_index"][key], answer["nll"], **tol)
        np.testing.assert_allclose(metrics["mia_min_k"]["value_by_index"][key], answer["min_k"], **tol)
        np.testing.assert_allclose(
            metrics["mia_min_k_plus_plus"]["value_by_index"][key], answer["min_k_plus_plus"], rtol=1e-5, atol=1e-5
        )
        assert metrics["exact_memorization"]["value_by_index"][key] == pytest.approx(answer["em"], abs=1e-12)
    for i, row in enumerate(rows_of(tiny_benchmark, "holdout10")):
        answer = naive_answer(model, tokenizer, row["question"], row["answer"])
        np.testing.assert_allclose(metrics["mia_min_k"]["holdout_value_by_index"][str(i)], answer["min_k"], **tol)
    for i, row in enumerate(rows_of(tiny_benchmark, "real_authors_perturbed")):
        correct = naive_answer(model, tokenizer, row["question"], row["answer"])["nll"]
        wrong = [naive_answer(model, tokenizer, row["question"], a)["nll"] for a in row["perturbed_answer"]]
        normalised = math.exp(-correct) / (math.exp(-correct) + np.exp(-np.array(wrong)).sum() + 1e-10)
        np.testing.assert_allclose(metrics["ra_Q_A_Prob_normalised"]["value_by_index"][str(i)], normalised, **tol)
        np.testing.assert_allclose(
            metrics["ra_Truth_Ratio"]["value_by_index"][str(i)], naive_truth_ratio(correct, wrong), **tol
        )
    row = rows_of(tiny_benchmark, "retain_perturbed")[1]
    para = naive_answer(model, tokenizer, row["question"], row["paraphrased_answer"])["nll"]
    pert = [naive_answer(model, tokenizer, row["question"], a)["nll"] for a in row["perturbed_answer"]]
    np.testing.assert_allclose(
        metrics["retain_Truth_Ratio"]["value_by_index"]["1"], naive_truth_ratio(para, pert), **tol
    )


def test_generation_matches_one_prompt_at_a_time(evaluated, tiny_benchmark, model, tokenizer):
    out = evaluated
    by_index = load_eval_json(out)["metrics"]["forget_Q_A_ROUGE"]["value_by_index"]
    row = rows_of(tiny_benchmark, "forget10_perturbed")[3]
    prompt = encode_prompt(tokenizer, PromptTemplate(), row["question"])
    with torch.no_grad():
        ids = model.generate(
            input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0
        )
    assert by_index["3"]["generation"] == tokenizer.decode(ids[0, len(prompt) :], skip_special_tokens=True).strip()


def test_forget_quality_against_own_eval_json_is_one(evaluated, tiny_benchmark, tokenizer, model):
    out = evaluated
    result = make_evaluator(tiny_benchmark, tokenizer, retain_reference=str(out), metric_groups=("forget", "mia"))
    metrics = result.evaluate(model)["metrics"]
    assert metrics["forget_quality"]["agg_value"] == 1.0
    assert metrics["privleak"]["agg_value"] == pytest.approx(0.0, abs=1e-6)  # own AUC as the reference
    assert "retain_Q_A_Prob" not in metrics and "model_utility" not in metrics


def test_missing_reference_names_file_and_fix(tiny_benchmark, tokenizer, tmp_path):
    missing = tmp_path / "retain" / "eval.json"
    with pytest.raises(
        EvalLogError, match=r"retain reference .*retain/eval.json does not exist.*--forget_split forget10"
    ):
        make_evaluator(tiny_benchmark, tokenizer, retain_reference=str(missing))


def test_reference_from_another_split_is_rejected(evaluated, tiny_benchmark, tokenizer, tmp_path):
    out = evaluated
    data = json.loads(out.read_text())
    data["meta"]["forget_split"] = "forget05"
    other = tmp_path / "eval.json"
    other.write_text(json.dumps(data))
    with pytest.raises(EvalLogError, match=r"made on forget split 'forget05'.*uses 'forget10'.*evaluating the retain"):
        make_evaluator(tiny_benchmark, tokenizer, retain_reference=str(other))


def test_reference_with_other_rows_is_rejected(evaluated, tiny_benchmark, tokenizer):
    out = evaluated
    with pytest.raises(EvalLogError, match=r"for 4 rows \(indices 0\.\.3\) .* has 2 rows \(indices 0\.\.1\)"):
        make_evaluator(tiny_benchmark, tokenizer, retain_reference=str(out), limit=2)


def test_privleak_reference_with_other_rows_is_rejected(evaluated, tiny_benchmark, tokenizer):
    out = evaluated
    with pytest.raises(EvalLogError, match=r"scored 4 rows of forget10_perturbed but this evaluation scores 3"):
        make_evaluator(tiny_benchmark, tokenizer, retain_reference=str(out), limit=3, metric_groups=("mia",))


def test_modes_restored_and_eval_mode_inside(tiny_benchmark, tokenizer, model):
    model.train()
    model.model.layers[0].eval()  # a submodule in its own mode must come back in that mode
    before = {name: m.training for name, m in model.named_modules()}
    seen = []
    hook = model.model.layers[1].register_forward_pre_hook(
        lambda module, args: seen.append(module.training or torch.is_grad_enabled())
    )
    try:
        make_evaluator(tiny_benchmark, tokenizer, metric_groups=("ra",)).score(model)
    finally:
        hook.remove()
    assert seen and not any(seen)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert torch.is_grad_enabled()
    model.eval()


def test_failure_midway_leaves_no_file(tiny_benchmark, tokenizer, model, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("generation failed")

    # Both engines' generation (prompt_cache: greedy_generate; per_example: generate_answers).
    monkeypatch.setattr(tofu, "generate_answers", broken)
    monkeypatch.setattr(tofu, "greedy_generate", broken)
    out = tmp_path / "eval.json"
    with pytest.raises(RuntimeError, match="generation failed"):
        make_evaluator(tiny_benchmark, tokenizer, metric_groups=("wf",)).run(model, out)
    assert list(tmp_path.iterdir()) == []


def test_sharded_scores_aggregate_to_the_same_metrics(evaluated, tiny_benchmark, tokenizer, model):
    out = evaluated
    # One generated row per shard keeps the test fast; the comparison is about the likelihood rows.
    evaluator = make_evaluator(tiny_benchmark, tokenizer, rouge_rows_limit=1)
    parts = [
        evaluator.score(model, rows={role: shard_rows(rows, rank, 2) for role, rows in evaluator.rows.items()})
        for rank in range(2)
    ]
    merged = {role: RowScores.concat([part[role] for part in parts]) for role in parts[0]}
    assert merged["forget"].indices == [0, 1, 2, 3]
    sharded = evaluator.aggregate(merged)
    whole = load_eval_json(out)["metrics"]
    for name in ("forget_truth_ratio", "retain_Q_A_Prob", "wf_Truth_Ratio", "mia_min_k_plus_plus", "mia_zlib"):
        np.testing.assert_allclose(sharded[name]["agg_value"], whole[name]["agg_value"], rtol=1e-5)
        for key, value in whole[name]["value_by_index"].items():
            np.testing.assert_allclose(sharded[name]["value_by_index"][key], value, rtol=1e-5)


def test_cli_writes_eval_json(tiny_benchmark, tiny_model, tmp_path, capsys):
    out = tmp_path / "cli" / "eval.json"
    args = ["--model", str(tiny_model), "--benchmark", str(tiny_benchmark), "--out", str(out), "--limit", "2"]
    evaluate_main(
        [*args, "--max_new_tokens", "2", "--batch_size", "8", "--device", "cpu", "--metric_groups", "[ra,mia]"]
    )
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["meta"]["limit"] == 2 and data["meta"]["model"] == str(tiny_model)
    assert set(data["metrics"]) == {
        "ra_Q_A_Prob_normalised",
        "ra_Q_A_ROUGE",
        "ra_Truth_Ratio",
        "mia_loss",
        "mia_zlib",
        "mia_min_k",
        "mia_min_k_plus_plus",
        "privleak",
    }
    assert f"wrote {out}" in printed and "ra_Truth_Ratio" in printed


def test_real_tofu_rows_run_and_are_finite(shared_tofu, tokenizer, model):
    settings = TofuSettings(limit=8, batch_size=16, max_new_tokens=4)
    evaluator = TofuEvaluator(str(shared_tofu), tokenizer, "forget10", settings=settings)
    result = evaluator.evaluate(model)
    assert result["meta"]["rows"]["forget10_perturbed"] == 8 and result["meta"]["rows"]["holdout10"] == 8
    assert set(result["metrics"]) == EXPECTED_KEYS
    for name, entry in result["metrics"].items():
        assert math.isfinite(entry["agg_value"]), name
        if name not in AGGREGATE_ONLY:
            assert len(entry["value_by_index"]) == 8, name


def test_cli_reports_a_bad_reference_without_traceback(tiny_benchmark, tiny_model, tmp_path, capsys):
    args = ["--model", str(tiny_model), "--benchmark", str(tiny_benchmark), "--out", str(tmp_path / "eval.json")]
    assert entry_point(["evaluate", *args, "--retain_reference", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: retain reference ") and "missing.json does not exist" in err
    assert "Traceback" not in err
    assert not (tmp_path / "eval.json").exists()


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass, read from its source: the string literal under each annotated field."""
    tree = ast.parse(Path(inspect.getsourcefile(cls)).read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    docs = {}
    for field, doc in zip(node.body, node.body[1:], strict=False):
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
            docs[field.target.id] = doc.value.value
    return docs


@pytest.mark.parametrize(
    ("command", "settings"), [(evaluate_main, TofuSettings), (evaluate_muse_main, MuseSettings)], ids=["tofu", "muse"]
)
def test_help_shows_every_setting_with_its_docstring(command, settings, capsys):
    with pytest.raises(SystemExit) as exit_info:
        command(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    docs = _attribute_docstrings(settings)
    assert set(docs) == {field.name for field in dataclasses.fields(settings)}, "every field needs a docstring"
    flat = re.sub(r"\s+", "", printed)  # help text is re-wrapped (and may break at hyphens)
    for name, doc in docs.items():
        assert f"--{name} " in printed, name
        assert re.sub(r"\s+", "", doc) in flat, f"--help does not show the docstring of {name}"
    # What is evaluated and where: the command's own flags.
    flags = ("--model", "--tokenizer", "--benchmark", "--out", "--max_length", "--chat", "--dtype", "--device")
    flags += ("--prompt_template", "--question_prefix", "--answer_prefix", "--answer_separator", "--attention_from")
    for flag in flags:
        # "--chat, --no_chat": a yes/no flag is listed with its negation.
        assert re.search(rf"{flag}[ ,]", printed), flag
    assert "--no_chat" in printed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch_size", "0"], r"TofuSettings are invalid: --batch_size must be >= 1, got 0"),
        (["--max_new_tokens", "0", "--limit", "0"], r"--max_new_tokens must be >= 1, got 0; --limit must be >= 1 or"),
        (["--metric_groups", "[]"], r"--metric_groups \[\]: choose from forget, retain, ra, wf, mia"),
    ],
)
def test_cli_rejects_bad_settings_before_loading_weights(tiny_benchmark, tmp_path, capsys, flags, message):
    args = [
        "--model",
        str(tmp_path / "no_model"),
        "--benchmark",
        str(tiny_benchmark),
        "--out",
        str(tmp_path / "e.json"),
    ]
    assert entry_point(["evaluate", *args, *flags]) == 2
    assert re.search(r"^error: .*" + message, capsys.readouterr().err)
    assert not (tmp_path / "e.json").exists()


# --------------------------------------------------------------------------------------------------------------
# Issue 17: the GradNorm and Reference attacks, rows without answer tokens, the encoding that allows them


def test_gradnorm_and_reference_attacks(tiny_benchmark, tokenizer, model, tmp_path):
    """The retain reference here is the same model's evaluation of the same rows, so every Reference score is
    L_model - L_reference = 0 and the AUC (all ties) is 1/2. GradNorm scores are positive gradient norms; both are
    AUC entries with members and non-members like the other attacks."""
    reference = tmp_path / "reference.json"
    make_evaluator(tiny_benchmark, tokenizer, metric_groups=("mia",), limit=3).run(model, reference)
    groups = ("mia", "mia_gradnorm", "mia_reference")
    evaluator = make_evaluator(
        tiny_benchmark, tokenizer, metric_groups=groups, limit=3, retain_reference=str(reference)
    )
    result = evaluator.evaluate(model)
    entries = result["metrics"]
    assert entries["mia_reference"]["agg_value"] == 0.5
    assert set(entries["mia_reference"]["value_by_index"].values()) == {0.0}
    assert set(entries["mia_reference"]["holdout_value_by_index"].values()) == {0.0}
    entry = entries["mia_gradnorm"]
    gradnorm = [*entry["value_by_index"].values(), *entry["holdout_value_by_index"].values()]
    assert len(gradnorm) == 6 and all(value > 0 and math.isfinite(value) for value in gradnorm)
    assert 0.0 <= entries["mia_gradnorm"]["agg_value"] <= 1.0
    assert result["meta"]["gradnorm_p"] == 2.0
    # The model's own gradients are untouched (autograd.grad writes no .grad).
    assert all(p.grad is None for p in model.parameters())


def test_extra_attacks_are_opt_in_and_checked(tiny_benchmark, tokenizer, model, monkeypatch):
    """The default evaluation never back-propagates: the gradient pass is not even called."""

    def refuse(*args, **kwargs):
        raise AssertionError("gradient_norms ran in an evaluation that did not ask for mia_gradnorm")

    monkeypatch.setattr(tofu, "gradient_norms", refuse)
    entries = make_evaluator(tiny_benchmark, tokenizer, metric_groups=("mia",), limit=2).evaluate(model)["metrics"]
    assert "mia_gradnorm" not in entries and "mia_reference" not in entries
    assert "mia_gradnorm" not in TofuSettings().metric_groups
    with pytest.raises(ValueError, match=r"mia_gradnorm extend mia; add mia"):
        TofuSettings(metric_groups=("forget", "mia_gradnorm"))
    with pytest.raises(ValueError, match=r"mia_reference scores against the retain model's per-row losses"):
        TofuSettings(metric_groups=("mia", "mia_reference"))


@pytest.fixture
def long_question_benchmark(tiny_benchmark, tmp_path) -> Path:
    """The tiny benchmark whose first forget row has a question longer than max_length 40 allows."""
    root = Path(shutil.copytree(tiny_benchmark, tmp_path / "benchmark"))
    path = root / "forget10_perturbed.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["question"] = " ".join([rows[0]["question"]] * 12)
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return root


def test_rows_without_answer_tokens_are_left_out(long_question_benchmark, tokenizer, model, tmp_path):
    """Row 0's question fills max_length, so none of its answers has a token to score. Its values are null, every
    aggregate is finite and over the 3 other rows (forget_truth_ratio = mean of min(TR, 1/TR) over them), forget
    quality against its own eval.json is 1, and meta.notes counts the row."""
    settings = {"metric_groups": ("forget", "mia"), "max_new_tokens": 2}
    evaluator = TofuEvaluator(
        str(long_question_benchmark), tokenizer, "forget10", max_length=40, settings=TofuSettings(**settings)
    )
    out = tmp_path / "eval.json"
    result = evaluator.run(model, out)
    entries = result["metrics"]
    for name in ("forget_Q_A_Prob", "forget_truth_ratio", "mia_loss", "mia_min_k", "extraction_strength"):
        assert math.isfinite(entries[name]["agg_value"]), name
        assert math.isnan(entries[name]["value_by_index"]["0"]), name
    tr = [entries["forget_truth_ratio"]["value_by_index"][str(i)] for i in (1, 2, 3)]
    expected = sum(min(t, 1 / (t + 1e-10)) for t in tr) / 3
    assert entries["forget_truth_ratio"]["agg_value"] == pytest.approx(expected)
    assert json.loads(out.read_text())["metrics"]["forget_Q_A_Prob"]["value_by_index"]["0"] is None
    assert result["meta"]["unscorable_rows"] == {"forget10_perturbed": [0]}
    notes = [note for note in result["meta"]["notes"] if "no token left to score" in note]
    assert len(notes) == 1 and notes[0].startswith("forget10_perturbed: 1 of 4 rows")
    again = TofuEvaluator(
        str(long_question_benchmark),
        tokenizer,
        "forget10",
        max_length=40,
        settings=TofuSettings(**settings, retain_reference=str(out)),
    ).evaluate(model)
    assert again["metrics"]["forget_quality"]["agg_value"] == 1.0


def test_answerless_examples_score_nan_not_zero(tokenizer, model):
    """encode_for_scoring turns a question that fills max_length into a prompt without targets; its mean NLL is
    NaN (0/0, as open-unlearning computes it), never the 0 a loss would take for it."""
    question = " ".join(["Where was AuthorI born?"] * 12)
    with pytest.raises(ValueError, match="leaves no room for its answer"):
        encode_example(tokenizer, PromptTemplate(), question, "In Pradow.", 40)
    example = encode_for_scoring(tokenizer, PromptTemplate(), question, "In Pradow.", 40)
    assert len(example.input_ids) == 40 and set(example.labels) == {-100}
    normal = encode_example(tokenizer, PromptTemplate(), "Where was AuthorI born?", "In Pradow.", 40)
    items = [AnswerExample(example.input_ids, example.labels), AnswerExample(normal.input_ids, normal.labels)]
    with torch.no_grad():
        scores = score_examples(model, items, 2, tokenizer.pad_token_id)
    assert math.isnan(scores[0].nll_mean) and math.isfinite(scores[1].nll_mean)


def test_engine_reports_every_batch_to_the_progress_context(tiny_benchmark, tokenizer, model):
    calls: list[tuple[str, int, int]] = []
    evaluator = make_evaluator(tiny_benchmark, tokenizer, metric_groups=["forget"], engine="per_example")
    with reporting_progress(lambda phase, done, total: calls.append((phase, done, total))):
        evaluator.score(model)
    evaluator.score(model)  # outside the context nothing is reported
    scoring = [c for c in calls if c[0] == "scoring"]
    generating = [c for c in calls if c[0] == "generating"]
    # forget10 of the tiny benchmark: each row's answer, paraphrase and 5 perturbed answers, in batches of 5;
    # one generation per row, in batches of 3.
    rows = len(evaluator.rows["forget"])
    assert [c[1] for c in scoring] == [min(5 * k, 7 * rows) for k in range(1, math.ceil(7 * rows / 5) + 1)]
    assert [c[1] for c in generating] == [min(3 * k, rows) for k in range(1, math.ceil(rows / 3) + 1)]
    assert {c[2] for c in scoring} == {7 * rows} and {c[2] for c in generating} == {rows}


def test_prompt_cache_engine_reports_progress_to_the_end(tiny_benchmark, tokenizer, model):
    """The prompt cache counts scoring in forwards (each serves parts of many examples) and generation in prompts,
    those its drafts finish at once included; each phase ends at its total."""
    calls: list[tuple[str, int, int]] = []
    evaluator = make_evaluator(tiny_benchmark, tokenizer, metric_groups=["forget"])
    with reporting_progress(lambda phase, done, total: calls.append((phase, done, total))):
        evaluator.score(model)
    for phase in ("scoring", "generating"):
        done = [c[1] for c in calls if c[0] == phase]
        totals = {c[2] for c in calls if c[0] == phase}
        assert done and done == sorted(done) and len(totals) == 1 and done[-1] == totals.pop(), phase
    assert [c[2] for c in calls if c[0] == "generating"][0] == len(evaluator.rows["forget"])


def test_position_budget_problem_names_the_numbers():
    # 71 + 200 = 271 > 256: generation would run 15 positions past the model's.
    problem = position_budget_problem(71, 200, 256)
    assert "71 tokens) + 200 new tokens = 271 positions" in problem
    assert "max_position_embeddings=256" in problem and "to at most 185" in problem
    assert position_budget_problem(56, 200, 256) is None
    assert position_budget_problem(10_000, 200, None) is None


def test_generation_past_the_model_positions_warns(tokenizer, model):
    prompt = encode_prompt(tokenizer, PromptTemplate(), "Where was AuthorA born?")
    budget = model.config.max_position_embeddings - len(prompt)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # exactly fits: no warning
            generate_answers(model, tokenizer, [prompt], 1, budget)
        with pytest.warns(UserWarning, match="more than the model's max_position_embeddings"):
            generate_answers(model, tokenizer, [prompt], 1, budget + 1)
