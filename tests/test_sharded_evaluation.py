"""Sharded evaluation: 2 gloo ranks score their share of the rows and aggregate what one process computes.

The benchmark has split sizes that 2 does not divide (41 forget rows, 7 retain, 5 real-author, 3 world-fact and 9
holdout rows), so rank 0 scores more rows, runs more likelihood batches and more ``generate`` calls than rank 1;
under FSDP2 rank 1 must pad with dummy forwards or the parameter all-gathers deadlock. The evaluation batch (4)
does not divide the splits either, so the ranks' batches differ from the single process's, which bounds the
agreement of likelihood values by float rounding (compared within 1e-5), while ROUGE and the generations must be
identical.

The 2-process runs go through ``tests/sharded_evaluation_worker.py`` under ``torch.distributed.run`` (one launch
for all runs, since starting the processes costs more than evaluating); the 1-process baselines run in this
process. That takes about a minute on 2 CPU cores, so those tests are marked slow
(``pytest -m slow tests/test_sharded_evaluation.py``); the in-process regression tests at the end run by default.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import _rows
from gloo_launch import run_worker

from baldro_lightning.data.tokenization import PromptTemplate, encode_example, encode_prompt, load_tokenizer
from baldro_lightning.evaluation import engine
from baldro_lightning.evaluation.engine import RowScores, shard_rows
from baldro_lightning.evaluation.run_record import load_eval_json
from baldro_lightning.evaluation.tofu import TofuEvaluator, TofuSettings
from baldro_lightning.train.models import load_causal_lm

WORKER = Path(__file__).with_name("sharded_evaluation_worker.py")
WORLD_SIZE = 2
PER_RANK_BATCH = 2
EVAL_BATCH = 4
NEW_TOKENS = 6
STEPS = 1
SPLIT_ROWS = {
    "forget10_perturbed": 41,
    "retain_perturbed": 7,
    "real_authors_perturbed": 5,
    "world_facts_perturbed": 3,
    "holdout10": 9,
}
ROLE_SPLITS = {
    "forget": "forget10_perturbed",
    "retain": "retain_perturbed",
    "ra": "real_authors_perturbed",
    "wf": "world_facts_perturbed",
    "holdout": "holdout10",
}
FIT_RUNS = ["fit:fsdp2", "fit:ddp"]
STANDALONE_RUNS = ["standalone:fsdp2", "standalone:replicated"]
TOLERANCE = 1e-5

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable"
)


def write_uneven_benchmark(root: Path) -> Path:
    """TOFU-shaped splits whose sizes are odd (``SPLIT_ROWS``), from the same QA generator as the tiny benchmark."""
    qa = [row for k in range(32) for row in _rows(f"Author{k:02d}", k)]
    forget, retain, holdout = qa[:41], qa[41:55], qa[55:64]
    general = [{**r, "perturbed_answer": r["perturbed_answer"][:3]} for r in retain]
    plain = [{"question": r["question"], "answer": r["answer"]} for r in qa]
    splits = {
        "forget10": plain[:41],
        "retain90": plain[41:55],
        "forget10_perturbed": forget,
        "retain_perturbed": retain[:7],
        "real_authors_perturbed": general[7:12],
        "world_facts_perturbed": general[:3],
        "holdout10": [{"question": r["question"], "answer": r["answer"]} for r in holdout],
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


@pytest.fixture(scope="module")
def uneven_benchmark(tmp_path_factory) -> Path:
    root = write_uneven_benchmark(tmp_path_factory.mktemp("uneven_benchmark"))
    for split, count in SPLIT_ROWS.items():
        assert len((root / f"{split}.jsonl").read_text().splitlines()) == count
    return root


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny model with its matrices redrawn 5x wider (std 0.1), so that greedy answers differ from row to row.

    At the default std 0.02 every prompt generates the same string, and comparing generations would prove nothing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    out = tmp_path_factory.mktemp("varied_model")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


# -- comparison helpers --------------------------------------------------------------------------------------------
def _assert_same_metrics(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    """Every aggregate and per-row value within ``TOLERANCE``; generations and ROUGE values identical."""
    assert got.keys() == want.keys(), where
    for name, entry in want.items():
        for field in ("agg_value", "value_by_index", "holdout_value_by_index"):
            if field not in entry:
                continue
            _assert_close(got[name][field], entry[field], f"{where}: {name}.{field}", rouge=name.endswith("_ROUGE"))


def _assert_close(got: Any, want: Any, where: str, rouge: bool) -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys(), f"{where}: rows {sorted(got)} != {sorted(want)}"
        for key in want:
            _assert_close(got[key], want[key], f"{where}[{key}]", rouge)
    elif isinstance(want, str) or rouge:
        assert got == want, f"{where}: {got!r} != {want!r} (ROUGE and generations must be identical)"
    elif want is None:
        assert got is None, f"{where}: {got!r} != None"
    else:
        np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE, err_msg=where)


def _read_table(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    table = {(row["step"], row["index"]): row for row in rows}
    assert len(table) == len(rows), f"{path} repeats a (step, index) pair"
    return table


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


# -- the 2-process launch ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_out(tmp_path_factory, varied_model, uneven_benchmark) -> Path:
    return run_worker(
        WORKER,
        STANDALONE_RUNS + FIT_RUNS,
        varied_model,
        uneven_benchmark,
        tmp_path_factory.mktemp("sharded"),
        timeout=300,
        what="the 2-process sharded evaluation",
        batch_size=PER_RANK_BATCH,
        eval_batch_size=EVAL_BATCH,
        max_new_tokens=NEW_TOKENS,
        steps=STEPS,
    )


@pytest.fixture(scope="module")
def single_out(tmp_path_factory, varied_model, uneven_benchmark) -> Path:
    """The same runs in this process, one rank, with the global batch of the 2-rank runs."""
    import sharded_evaluation_worker as worker

    out = tmp_path_factory.mktemp("single")
    with pytest.MonkeyPatch.context() as patch:
        # seed_everything exports PL_GLOBAL_SEED; keep it from leaking into later tests.
        patch.setenv("PL_GLOBAL_SEED", "0")
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            patch.delenv(name, raising=False)
        worker.run_standalone("single", str(varied_model), str(uneven_benchmark), out, EVAL_BATCH, NEW_TOKENS)
        worker.run_fit(
            "single",
            str(varied_model),
            str(uneven_benchmark),
            out,
            WORLD_SIZE * PER_RANK_BATCH,
            EVAL_BATCH,
            NEW_TOKENS,
            STEPS,
        )
    return out


def _records(out: Path, run: str) -> list[dict[str, Any]]:
    records = []
    for rank in range(WORLD_SIZE):
        path = out / "records" / f"{run}-rank{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no record {path.name}"
        records.append(json.loads(path.read_text()))
    return records


def _assert_each_row_scored_once(records: list[dict[str, Any]], evaluations: int) -> None:
    for record in records:
        assert record["world_size"] == WORLD_SIZE
        assert len(record["evaluations"]) == evaluations
    for k in range(evaluations):
        per_rank = [record["evaluations"][k] for record in records]
        for role, split in ROLE_SPLITS.items():
            shares = [e["scored"][role] for e in per_rank]
            # Rows are dealt round-robin: rank 0 holds one row more whenever the count is odd.
            assert [len(s) for s in shares] == [math.ceil(SPLIT_ROWS[split] / 2), SPLIT_ROWS[split] // 2], role
            everything = sorted(i for share in shares for i in share)
            assert everything == list(range(SPLIT_ROWS[split])), f"{role}: rows scored twice or not at all"
            # Every rank aggregates all rows, each once.
            assert all(e["gathered"][role] == list(range(SPLIT_ROWS[split])) for e in per_rank), role
        # Every rank computes the same aggregate from the gathered rows.
        assert per_rank[0]["metrics"] == per_rank[1]["metrics"]


# -- tests ---------------------------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_callback_on_two_ranks_equals_one_process(sharded_out, single_out, strategy):
    run = f"fit-{strategy}"
    records = _records(sharded_out, run)
    evaluations = STEPS + 1  # at the start, then after every step
    _assert_each_row_scored_once(records, evaluations)
    for record in records:
        for entry in record["evaluations"]:
            assert entry["sharded"] == (strategy == "fsdp2")
            assert entry["synced_gpus"] == (strategy == "fsdp2")
    if strategy == "fsdp2":
        # Lockstep: the rank with fewer rows padded with dummy forwards to the same number of sharded forwards.
        for k in range(evaluations):
            assert records[0]["evaluations"][k]["forwards"] == records[1]["evaluations"][k]["forwards"]

    # Only rank 0 writes: eval.json per evaluation, per_sample.csv and the TensorBoard events.
    assert _files_under(sharded_out / run / "rank1") == []
    eval_dir, single_dir = sharded_out / run / "rank0" / "eval", single_out / "fit-single" / "rank0" / "eval"
    steps = sorted(p.name for p in eval_dir.glob("step_*"))
    assert steps == sorted(p.name for p in single_dir.glob("step_*")) == ["step_000000", "step_000001"]
    for step in steps:
        got = load_eval_json(eval_dir / step / "eval.json")
        want = load_eval_json(single_dir / step / "eval.json")
        assert len(got["metrics"]["forget_Q_A_Prob"]["value_by_index"]) == SPLIT_ROWS["forget10_perturbed"]
        assert got["meta"]["rows"] == want["meta"]["rows"] == SPLIT_ROWS
        _assert_same_metrics(got["metrics"], want["metrics"], f"{run} {step}")
        generations = {row["generation"] for row in got["metrics"]["forget_Q_A_ROUGE"]["value_by_index"].values()}
        if step == "step_000000":
            # Identical generations prove something only when rows generate different strings (12 of 41 differ
            # before the update; one NPO step collapses them to 4).
            assert len(generations) >= 8, f"rows generate alike: {sorted(generations)}"
        synchrony = [json.loads((d / step / "eval.json").read_text())["synchrony"] for d in (eval_dir, single_dir)]
        assert synchrony[0] == synchrony[1]
        assert len(synchrony[0]["forget_step_by_index"]) == SPLIT_ROWS["forget10_perturbed"]
    assert list((sharded_out / run / "rank0" / "tb").glob("events.out.tfevents.*"))

    got_table = _read_table(eval_dir / "per_sample.csv")
    want_table = _read_table(single_dir / "per_sample.csv")
    assert len(got_table) == evaluations * SPLIT_ROWS["forget10_perturbed"]
    assert got_table.keys() == want_table.keys()
    for key, want in want_table.items():
        got = got_table[key]
        assert got["forget_step"] == want["forget_step"], key
        for column in ("log_ppl_ratio", "truth_ratio", "rougeL_recall", "dro_weight"):
            np.testing.assert_allclose(
                float(got[column]), float(want[column]), rtol=TOLERANCE, atol=TOLERANCE, err_msg=f"{key} {column}"
            )


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp2", "replicated"])
def test_standalone_evaluator_on_two_ranks_equals_one_process(sharded_out, single_out, layout):
    run = f"standalone-{layout}"
    records = _records(sharded_out, run)
    _assert_each_row_scored_once(records, 1)
    if layout == "fsdp2":
        assert all(r["evaluations"][0]["sharded"] and r["evaluations"][0]["synced_gpus"] for r in records)
        assert records[0]["evaluations"][0]["forwards"] == records[1]["evaluations"][0]["forwards"]
    got = load_eval_json(sharded_out / run / "eval.json")
    want = load_eval_json(single_out / "standalone-single" / "eval.json")
    _assert_same_metrics(got["metrics"], want["metrics"], run)


def test_rouge_rows_limit_picks_the_same_rows_on_every_shard(varied_model, uneven_benchmark):
    """``rouge_rows_limit`` means the first N rows of the split, whichever shard holds them (no process group)."""
    tokenizer = load_tokenizer(str(varied_model))
    evaluator = TofuEvaluator(
        str(uneven_benchmark),
        tokenizer,
        "forget10",
        max_length=64,
        settings=TofuSettings(
            batch_size=EVAL_BATCH, max_new_tokens=2, metric_groups=("forget", "ra"), rouge_rows_limit=3
        ),
    )
    model = load_causal_lm(str(varied_model), "float32")
    parts = [
        evaluator.score(model, {role: shard_rows(rows, rank, 2) for role, rows in evaluator.rows.items()})
        for rank in range(2)
    ]
    merged = {role: RowScores.concat([part[role] for part in parts]) for role in parts[0]}
    sharded, whole = evaluator.aggregate(merged), evaluator.evaluate(model)["metrics"]
    for name in ("forget_Q_A_ROUGE", "ra_Q_A_ROUGE"):
        assert sorted(sharded[name]["value_by_index"], key=int) == ["0", "1", "2"], name
        assert sharded[name] == whole[name], name


@pytest.mark.parametrize("phase", ["likelihood", "generation"])
def test_ranks_agree_on_the_number_of_forwards_before_the_first(tiny_model, monkeypatch, phase):
    """Regression: a rank that asked for the largest batch count only after its own forwards met the other
    rank's FSDP all-gathers with its all-reduce, and both waited forever (the 2-process tests above hung)."""
    events: list[str] = []
    # Pretend another rank has one batch more, so this rank must add one dummy call at the end.
    extra = 1 if phase == "likelihood" else 0  # a dummy generate needs a process group (synced_gpus)

    def synced_count(count: int, device, synced_gpus: bool) -> int:
        events.append("agree")
        return count + extra

    monkeypatch.setattr(engine, "_synced_count", synced_count)
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_causal_lm(str(tiny_model), "float32").eval()
    model.register_forward_pre_hook(lambda module, args: events.append("forward"))
    questions = ["Where was AuthorA born?", "What genre does AuthorB write?", "Where was AuthorC born?"]
    template = PromptTemplate()
    if phase == "likelihood":
        examples = []
        for question in questions:
            encoded = encode_example(tokenizer, template, question, "In Lumeria.", 64)
            examples.append(engine.AnswerExample(encoded.input_ids, encoded.labels))
        engine.score_examples(model, examples, batch_size=2, pad_token_id=tokenizer.pad_token_id)
        assert events == ["agree", "forward", "forward", "forward"]  # 2 batches, then the dummy
    else:
        prompts = [encode_prompt(tokenizer, template, question) for question in questions]
        engine.generate_answers(model, tokenizer, prompts, batch_size=2, max_new_tokens=2)
        assert events[0] == "agree" and events.count("agree") == 1 and "forward" in events
