"""MUSE: split loading (shared files, both layouts, bad rows, Hub path), tokenisation, metric glue with hand-computed
values, the embedded corpus generator and its tokenizer, unlearning/fine-tuning on MUSE chunks, the MUSE evaluator
(whole and rank-sharded), and the shipped embedded MUSE config end to end with its in-training evaluation."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from shipped_configs import fit_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from baldro_lightning.cli import cli_main
from baldro_lightning.data.datamodule import ForgetRetainDataModule
from baldro_lightning.data.muse import (
    MUSE_SPLITS,
    MuseDataModule,
    MuseTextDataModule,
    chunk_token_ids,
    encode_completion,
    encode_knowmem_prompt,
    encode_pretraining_chunks,
    load_muse_split,
    render_knowmem_prompt,
)
from baldro_lightning.data.rows import BenchmarkDataError
from baldro_lightning.data.tokenization import IGNORE_INDEX, PromptTemplate, load_tokenizer
from baldro_lightning.embedded import muse_world as mw
from baldro_lightning.embedded.models import corpus_texts, init_tiny_llama, train_tokenizer
from baldro_lightning.evaluation import metrics
from baldro_lightning.evaluation.callbacks import MuseEvaluation
from baldro_lightning.evaluation.command import muse_main as main
from baldro_lightning.evaluation.engine import RowScores, mia_entries, shard_rows
from baldro_lightning.evaluation.muse import (
    KNOWMEM_STOP_STRINGS,
    MuseEvaluator,
    MuseSettings,
    memorization_entries,
    rouge_entry,
)
from baldro_lightning.evaluation.run_record import EvalLogError
from baldro_lightning.train.losses import NLL, NPO
from baldro_lightning.train.models import load_causal_lm
from baldro_lightning.train.module import FinetuneModule, UnlearningModule

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "data" / "muse_embedded"
SHARED_MUSE = REPO.parent / "shared" / "data" / "muse"

EVERY_METRIC = {
    "forget_knowmem_ROUGE",
    "retain_knowmem_ROUGE",
    "forget_verbmem_ROUGE",
    "extraction_strength",
    "exact_memorization",
    "mia_loss",
    "mia_zlib",
    "mia_min_k",
    "mia_min_k_plus_plus",
    "privleak",
}


@pytest.fixture(scope="module")
def shared_muse() -> Path:
    if not SHARED_MUSE.is_dir():
        pytest.skip(f"{SHARED_MUSE} is absent: the shared MUSE data exists only in the development workplace")
    return SHARED_MUSE


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.fixture(scope="module")
def muse_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama whose tokenizer is fitted on the embedded MUSE corpus, as the MUSE configs expect."""
    root = tmp_path_factory.mktemp("muse_model")
    train_tokenizer(EMBEDDED, root / "tokenizer", vocab_size=512, model_max_length=256)
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    init_tiny_llama(root / "tokenizer", root / "init", seed=0, **shape)
    return root / "init"


def _write(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# --------------------------------------------------------------------------------------------------------------
# Loading the shared MUSE export


SHARED_ROWS = {
    "knowmem/forget_qa": 100,
    "knowmem/retain_qa": 100,
    "knowmem/forget_qa_icl": 10,
    "knowmem/retain_qa_icl": 10,
    "verbmem/forget": 100,
    "privleak/forget": 100,
    "privleak/retain": 100,
    "privleak/holdout": 100,
}


@pytest.mark.parametrize("corpus", ["news", "books"])
@pytest.mark.parametrize("name", sorted(SHARED_ROWS))
def test_shared_split_row_counts(shared_muse: Path, corpus: str, name: str) -> None:
    rows = load_muse_split(shared_muse, corpus, name)
    assert len(rows) == SHARED_ROWS[name]
    assert [row["index"] for row in rows] == list(range(len(rows))) == [row["idx"] for row in rows]
    assert all(isinstance(row[field], str) for row in rows for field in MUSE_SPLITS[name].fields)


def test_shared_raw_splits_and_the_empty_news_document(shared_muse: Path) -> None:
    news = load_muse_split(shared_muse, "news", "raw/forget")
    assert len(news) == 889
    # The published News forget corpus holds one empty document (file line 822); raw text may be empty.
    assert [row["index"] for row in news if not row["text"]] == [821]
    assert [len(load_muse_split(shared_muse, "books", f"raw/{s}")) for s in ("retain1", "retain2", "holdout")] == [
        12,
        13,
        3,
    ]


def test_shared_news_chunks_have_the_window_length(shared_muse: Path, tokenizer) -> None:
    texts = [row["text"] for row in load_muse_split(shared_muse, "news", "raw/forget")[:3]]
    chunks = encode_pretraining_chunks(texts, tokenizer, max_length=512)
    joined = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    assert [len(c.input_ids) for c in chunks[:-1]] == [513] * (len(chunks) - 1)
    assert len(chunks) == -(-len(joined) // 512)
    assert [t for c in chunks for t in c.input_ids[1:]] == joined


def test_shared_verbmem_rows_have_prompt_and_gt(shared_muse: Path) -> None:
    row = load_muse_split(shared_muse, "books", "verbmem/forget")[0]
    assert set(row) == {"idx", "prompt", "gt", "index"}


# --------------------------------------------------------------------------------------------------------------
# Layouts and bad rows


def test_nested_layout_loads_and_flat_layout_wins(tmp_path: Path) -> None:
    _write(tmp_path / "knowmem" / "forget_qa.jsonl", [{"question": "Q?", "answer": "nested"}])
    assert load_muse_split(tmp_path, "news", "knowmem/forget_qa") == [
        {"question": "Q?", "answer": "nested", "index": 0}
    ]
    _write(tmp_path / "news_knowmem_forget_qa.jsonl", [{"question": "Q?", "answer": "flat"}])
    assert load_muse_split(tmp_path, "news", "knowmem/forget_qa")[0]["answer"] == "flat"
    # The corpus only names flat files: books falls back to the nested file.
    assert load_muse_split(tmp_path, "books", "knowmem/forget_qa")[0]["answer"] == "nested"


def test_missing_file_lists_both_layouts_and_contents(tmp_path: Path) -> None:
    _write(tmp_path / "news_raw_forget.jsonl", [{"text": "x"}])
    with pytest.raises(
        BenchmarkDataError,
        match=r"has neither news_verbmem_forget\.jsonl nor verbmem/forget\.jsonl \(it holds: news_raw_forget\.jsonl\)",
    ):
        load_muse_split(tmp_path, "news", "verbmem/forget")


def test_unknown_split_and_corpus(tmp_path: Path) -> None:
    with pytest.raises(
        BenchmarkDataError, match=r"unknown MUSE split 'knowmem/forget'; valid names .*knowmem/forget_qa"
    ):
        load_muse_split(tmp_path, "news", "knowmem/forget")
    with pytest.raises(BenchmarkDataError, match=r"--corpus 'wiki' is not a MUSE corpus; use one of news, books"):
        load_muse_split(tmp_path, "wiki", "raw/forget")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "line", "pattern"),
    [
        ("knowmem/forget_qa", '{"question": "Q?"}', r"line 2: missing field 'answer' \(row has question\)"),
        (
            "knowmem/forget_qa",
            '{"question": "Q?", "answer": 1472}',
            r"line 2: field 'answer' must be a string, got int",
        ),
        ("verbmem/forget", '{"prompt": "p", "gt": "  "}', r"line 2: field 'gt' is empty or whitespace \('  '\)"),
        ("privleak/holdout", '["text"]', r"line 2: expected a JSON object with fields text, got list"),
        ("privleak/forget", '{"text": "a"', r"line 2: malformed JSON \(Expecting"),
    ],
)
def test_bad_row_names_file_line_field_and_fix(tmp_path: Path, name: str, line: str, pattern: str) -> None:
    config, split = name.split("/")
    good = {
        "knowmem": {"question": "Q?", "answer": "A"},
        "verbmem": {"prompt": "p", "gt": "g"},
        "privleak": {"text": "t"},
    }
    file = tmp_path / f"books_{config}_{split}.jsonl"
    file.write_text(json.dumps(good[config]) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match=rf"books_{config}_{split}\.jsonl, {pattern}") as info:
        load_muse_split(tmp_path, "books", name)
    if "malformed" not in pattern:
        fix = f"re-export config '{config}' split '{split}' from the `muse-bench/MUSE-Books` dataset"
        assert fix in str(info.value)


def test_empty_raw_text_is_allowed_but_privleak_text_is_not(tmp_path: Path) -> None:
    _write(tmp_path / "news_raw_forget.jsonl", [{"text": "a"}, {"text": ""}])
    assert [row["text"] for row in load_muse_split(tmp_path, "news", "raw/forget")] == ["a", ""]
    _write(tmp_path / "news_privleak_forget.jsonl", [{"text": ""}])
    with pytest.raises(BenchmarkDataError, match=r"line 1: field 'text' is empty"):
        load_muse_split(tmp_path, "news", "privleak/forget")


def test_empty_split(tmp_path: Path) -> None:
    (tmp_path / "news_privleak_holdout.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match=r"holds no rows; MUSE-News privleak/holdout has 100"):
        load_muse_split(tmp_path, "news", "privleak/holdout")


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset: Callable[..., object]) -> None:
    """Stand in for the `datasets` package, so no test can reach the network."""
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_hub_rows_are_loaded_by_config_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load(source: str, config: str, split: str) -> list[dict[str, object]]:
        calls.append((source, config, split))
        return [{"prompt": "p", "gt": "g"}, {"prompt": "p", "gt": 3}]

    _fake_datasets(monkeypatch, fake_load)
    with pytest.raises(BenchmarkDataError, match=r"config 'verbmem', split 'forget'\), row 2: field 'gt' must be a"):
        load_muse_split("muse-bench/MUSE-News", "news", "verbmem/forget")
    assert calls == [("muse-bench/MUSE-News", "verbmem", "forget")]


def test_hub_id_of_the_other_corpus_and_offline_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_muse_split must not call datasets.load_dataset here")

    _fake_datasets(monkeypatch, no_network)
    with pytest.raises(
        BenchmarkDataError, match=r"is the MUSE-Books dataset but --corpus is 'news'; use --corpus books"
    ):
        load_muse_split("muse-bench/MUSE-Books", "news", "raw/forget")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BenchmarkDataError, match=r"\(HF_HUB_OFFLINE is set\); pass a local directory holding "):
        load_muse_split("muse-bench/MUSE-News", "news", "raw/forget")


# --------------------------------------------------------------------------------------------------------------
# Tokenisation


def test_chunk_token_ids_windows() -> None:
    assert chunk_token_ids(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # N a multiple of the length: no empty last window (the reference would make one, methods P-17).
    assert chunk_token_ids(list(range(8)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match=r"max_length must be >= 1"):
        chunk_token_ids([1], 0)


def test_pretraining_chunks_join_documents_and_mask_only_bos(tokenizer) -> None:
    texts = ["Alpha beta gamma delta.", "Epsilon zeta eta theta iota."]
    chunks = encode_pretraining_chunks(texts, tokenizer, max_length=8)
    joined = tokenizer("Alpha beta gamma delta.\n\nEpsilon zeta eta theta iota.", add_special_tokens=False)
    windows = chunk_token_ids(joined["input_ids"], 8)
    assert len(chunks) == len(windows) > 2
    for chunk, window in zip(chunks, windows, strict=True):
        assert chunk.input_ids == [tokenizer.bos_token_id, *window]
        assert chunk.labels == [IGNORE_INDEX, *window]
        assert tokenizer.eos_token_id not in chunk.input_ids
    assert {len(c.input_ids) for c in chunks[:-1]} == {9}


def test_completion_masks_the_prefix_and_truncates_the_continuation(tokenizer) -> None:
    example = encode_completion(tokenizer, "Where was he", "born in Lumeria today", max_length=64, insert_space=True)
    full = tokenizer("Where was he born in Lumeria today")["input_ids"]
    prefix = tokenizer("Where was he")["input_ids"]
    assert example.input_ids == full
    assert example.labels == [IGNORE_INDEX] * len(prefix) + full[len(prefix) :]
    short = encode_completion(tokenizer, "Where was he", "born in Lumeria today", max_length=2, insert_space=True)
    assert short.truncated and short.input_ids == full[: len(prefix) + 2]
    # PrivLeak texts: an empty prefix masks only the BOS.
    text = encode_completion(tokenizer, "", "born in Lumeria", max_length=64)
    assert text.labels[0] == IGNORE_INDEX and IGNORE_INDEX not in text.labels[1:]


def test_knowmem_prompt_text_is_exact(tokenizer) -> None:
    shots = [{"question": "Who wrote it?", "answer": "Ana Ruiz"}, {"question": "When?", "answer": "1999"}]
    text = render_knowmem_prompt(PromptTemplate(), shots, "Where?")
    assert (
        text
        == "Question: Who wrote it?\nAnswer: Ana Ruiz\n\nQuestion: When?\nAnswer: 1999\n\nQuestion: Where?\nAnswer:"
    )
    inst = PromptTemplate(question_prefix="[INST] ", answer_prefix=" [/INST]", answer_separator="")
    assert (
        render_knowmem_prompt(inst, shots[:1], "Where?")
        == "[INST] Who wrote it? [/INST]Ana Ruiz\n\n[INST] Where? [/INST]"
    )
    assert encode_knowmem_prompt(tokenizer, PromptTemplate(), shots, "Where?") == tokenizer(text)["input_ids"]


# --------------------------------------------------------------------------------------------------------------
# Metric glue, hand-computed


def test_knowmem_rouge_l_f1_on_tiny_strings() -> None:
    """Generations are cut at the KnowMem stop strings, then scored by ROUGE-L F1 against the answer.

    Row 0: "the golden snitch ball" vs "the Golden Snitch": LCS 3, precision 3/4, recall 3/3, F1 = 2·(3/4)/(7/4)
    = 6/7. Row 1: "Transfiguration" (cut before "\\nQuestion") vs itself: 1. Row 2: "1995" vs "in 1472": 0.
    Mean = (6/7 + 1 + 0) / 3 = 13/21.
    """
    raw = [" the golden snitch ball\n\nQuestion: Who", "Transfiguration\nQuestion: x", " 1995 Question: y"]
    cleaned = [metrics.clean_generation(text, KNOWMEM_STOP_STRINGS) for text in raw]
    assert cleaned == ["the golden snitch ball", "Transfiguration", "1995"]
    entry = rouge_entry([4, 7, 9], cleaned, ["the Golden Snitch", "Transfiguration ", "in 1472"])
    assert entry["agg_value"] == pytest.approx(13 / 21)
    assert entry["value_by_index"]["4"]["rougeL_f1"] == pytest.approx(6 / 7)
    assert entry["value_by_index"]["4"]["rougeL_recall"] == pytest.approx(1.0)
    assert entry["value_by_index"]["9"] == {
        "generation": "1995",
        "rougeL_f1": 0.0,
        "rougeL_recall": 0.0,
        "rouge1_recall": 0.0,
    }


def test_privleak_from_min_k_auc() -> None:
    """MinK of member texts [1, 2], non-member texts [3, 1.5]: AUC = P(non-member > member) = 3/4 pairs = 0.75.

    PrivLeak = ((1 - 0.75) - (1 - r)) / (1 - r) × 100: -50 for the default r = 0.5, -37.5 for r = 0.6.
    """
    members = {"mia_min_k": [1.0, 2.0], "mia_loss": [5.0, 6.0]}
    nonmembers = {"mia_min_k": [3.0, 1.5], "mia_loss": [1.0, 2.0]}
    out = mia_entries(members, nonmembers, [0, 1], [0, 1], None)
    assert out["mia_min_k"]["agg_value"] == pytest.approx(0.75)
    assert out["mia_loss"]["agg_value"] == pytest.approx(0.0)
    assert out["privleak"]["agg_value"] == pytest.approx(-50.0)
    assert out["mia_min_k"]["holdout_value_by_index"] == {"0": 3.0, "1": 1.5}
    assert mia_entries(members, nonmembers, [0, 1], [0, 1], 0.6)["privleak"]["agg_value"] == pytest.approx(-37.5)


def test_min_k_score_of_token_logprobs() -> None:
    """k = 0.4 of 5 positions keeps int(2.0) = 2 lowest log-probs: -5 and -4, score -mean = 4.5."""
    assert metrics.mia_min_k([np.array([-1.0, -3.0, -2.0, -5.0, -4.0])], 0.4).tolist() == [4.5]


def test_memorization_entries() -> None:
    """Predictions [1, 2, 3] vs targets [1, 9, 3]: EM = 2/3; the shortest matching suffix starts at k = 2,
    so ES = 1 - 2/3 = 1/3."""
    out = memorization_entries([5], [np.array([1, 2, 3])], [np.array([1, 9, 3])])
    assert out["exact_memorization"]["value_by_index"] == {"5": pytest.approx(2 / 3)}
    assert out["extraction_strength"]["agg_value"] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------------------------------
# The embedded corpus


def test_embedded_regeneration_is_byte_identical(tmp_path: Path) -> None:
    written = mw.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in EMBEDDED.glob("*.jsonl"))
    for path in written:
        assert path.read_bytes() == (EMBEDDED / path.name).read_bytes(), (
            f"data/muse_embedded/{path.name} is stale: rerun python -m baldro_lightning embedded-muse"
        )


def test_embedded_corpus_structure() -> None:
    # The articles; raw/forget also holds the forget authors' QA documents (test_embedded_qa_documents_*).
    raw = {
        s: [r for r in _read(EMBEDDED / f"news_raw_{s}.jsonl") if r["kind"] != "qa"]
        for s in ("forget", "retain1", "holdout")
    }
    authors = {s: {row["author_idx"] for row in rows} for s, rows in raw.items()}
    assert [len(raw[s]) for s in raw] == [40, 80, 40]
    assert not authors["forget"] & authors["retain1"]
    assert not authors["holdout"] & (authors["forget"] | authors["retain1"])
    forget_text = "\n\n".join(row["text"] for row in raw["forget"])
    retain_text = "\n\n".join(row["text"] for row in raw["retain1"])
    for row in _read(EMBEDDED / "news_verbmem_forget.jsonl"):
        assert row["prompt"] + " " + row["gt"] in forget_text
    names = {a.index: a.facts["name"] for a in mw.build_world().authors}
    boxes = {}  # author -> the "Question: ...\nAnswer: ..." pairs of the fact boxes of its articles
    for row in raw["forget"] + raw["retain1"]:
        boxes.setdefault(row["author_idx"], []).extend(row["text"].split("\n\nQuestion: ")[1:])
    box_questions = {pair.split("\nAnswer: ")[0] for pairs in boxes.values() for pair in pairs}
    for side in ("forget", "retain"):
        for row in _read(EMBEDDED / f"news_knowmem_{side}_qa.jsonl"):
            # Each fact is in two fact boxes of its author's articles, in two phrasings; the question is in a third
            # phrasing, one the corpus uses for other authors but never for this fact.
            answers = [pair.split("\nAnswer: ")[1].lower() for pair in boxes[row["author_idx"]]]
            assert sum(row["answer"].lower() in answer for answer in answers) == 2, row
            assert row["question"] not in box_questions
            phrasing = row["question"].replace(names[row["author_idx"]], "{name}")
            assert any(phrasing.format(name=names[a]) in box_questions for a in boxes if a != row["author_idx"]), row
    for side, text in (("forget", forget_text), ("retain", retain_text)):
        asked = {row["question"] for row in _read(EMBEDDED / f"news_knowmem_{side}_qa.jsonl")}
        for row in _read(EMBEDDED / f"news_knowmem_{side}_qa_icl.jsonl"):
            # Shots are fact-box pairs of the same side's articles, never an evaluation question.
            assert f"Question: {row['question']}\nAnswer: {row['answer']}" in text
            assert row["question"] not in asked
    for side in ("forget", "holdout"):
        texts = [row["text"] for row in _read(EMBEDDED / f"news_privleak_{side}.jsonl")]
        assert texts == [row["text"] for row in raw[side]]
    words = [len(row["text"].split()) for rows in raw.values() for row in rows]
    assert 100 <= min(words) and max(words) <= 200


def test_generator_refuses_a_fact_box_its_article_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    # The book review names the books in its prose, so a box asking for them could be answered by copying.
    monkeypatch.setitem(mw.ARTICLE_KINDS, "books", {**mw.ARTICLE_KINDS["books"], "box": ("books",)})
    monkeypatch.setattr(mw, "_check_boxes", lambda: None)  # one box about books is not two: skip that check
    with pytest.raises(ValueError, match=r"books article of author 90 states .* but its fact box asks about 'books'"):
        mw.build_corpus(mw.build_world())


def test_generator_refuses_a_fact_in_one_box_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(mw.ARTICLE_KINDS, "books", {**mw.ARTICLE_KINDS["books"], "box": ("birthplace",)})
    with pytest.raises(ValueError, match="exactly PHRASINGS_PER_FACT=2 boxes"):
        mw.build_corpus(mw.build_world())


@pytest.mark.parametrize("split", ["forget", "retain2"])
def test_embedded_qa_documents_hold_every_pair_of_their_authors_shuffled(split: str) -> None:
    """The QA documents (raw/forget after its articles, all of raw/retain2): every TOFU pair of the forget10 authors
    (forget) or of the others (retain2), each QA_COPIES times, at most six to a document in the fact-box layout, the
    documents mixing authors; none is a KnowMem question (those ask in a phrasing the corpus never uses for a fact)."""
    world = mw.build_world()
    every = _read(EMBEDDED / f"news_raw_{split}.jsonl")
    assert [row["idx"] for row in every] == list(range(len(every)))
    rows = [row for row in every if row["kind"] == "qa"]
    pairs = [pair for row in rows for pair in row["text"].split("\n\n")]
    authors = set(range(90, 100)) if split == "forget" else set(range(90))
    want = [
        f"Question: {item.question}\nAnswer: {item.answer}" for author in sorted(authors) for item in world.qa[author]
    ]
    assert sorted(pairs) == sorted(want * mw.QA_COPIES) and len(want) == len(authors) * 20
    assert all(len(row["text"].split("\n\n")) <= mw.QA_PAIRS_PER_DOCUMENT for row in rows)
    assert all(set(row["author_idx"]) <= authors for row in rows)
    assert sum(len(set(row["author_idx"])) > 1 for row in rows) >= 0.95 * len(rows)  # shuffled, not per author
    questions = {pair.split("\nAnswer: ")[0][len("Question: ") :] for pair in pairs}
    for side in ("forget", "retain"):
        assert not questions & {row["question"] for row in _read(EMBEDDED / f"news_knowmem_{side}_qa.jsonl")}


def test_embedded_corpus_loads_through_the_loader() -> None:
    counts = {name: len(load_muse_split(EMBEDDED, "news", name)) for name in MUSE_SPLITS}
    assert counts["raw/retain2"] == 300 * mw.QA_COPIES
    assert counts["knowmem/forget_qa"] == counts["knowmem/retain_qa"] == 70
    assert counts["knowmem/forget_qa_icl"] == counts["knowmem/retain_qa_icl"] == mw.N_ICL
    assert counts["privleak/forget"] == counts["privleak/retain"] == counts["privleak/holdout"] == 40


# --------------------------------------------------------------------------------------------------------------
# Training on MUSE chunks and evaluating


def _trainer() -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        fast_dev_run=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_unlearning_fast_dev_run_on_embedded_muse(tiny_model: Path) -> None:
    data = MuseDataModule(str(tiny_model), str(EMBEDDED), corpus="news", batch_size=2, max_length=32)
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"forget", "retain"}
    assert batch["forget"]["input_ids"].shape == (2, 33) and (batch["forget"]["labels"][:, 0] == IGNORE_INDEX).all()
    module = UnlearningModule(str(tiny_model), NPO(), retain_loss=NLL(), lr_schedule="constant")
    before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(str(tiny_model)).state_dict().items()}
    _trainer().fit(module, datamodule=data)
    after = module.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "one NPO step on MUSE chunks changed nothing"
    assert all(torch.equal(before[k], v) for k, v in module.reference.state_dict().items())
    assert torch.isfinite(module.forget_losses[~module.forget_losses.isnan()]).all()
    assert module.forget_losses.numel() == data.forget_size


def test_muse_datamodule_resumes_mid_epoch(tiny_model: Path) -> None:
    def data() -> MuseDataModule:
        return MuseDataModule(str(tiny_model), str(EMBEDDED), batch_size=2, max_length=32)

    fresh = [batch["forget"]["index"].tolist() for batch in itertools.islice(data().train_dataloader(), 3)]
    resumed = data()
    resumed.load_state_dict({"epoch": 0, "batches_done": 2})
    assert next(iter(resumed.train_dataloader()))["forget"]["index"].tolist() == fresh[2]


def test_finetune_fast_dev_run_on_raw_text(tiny_model: Path) -> None:
    data = MuseTextDataModule(str(tiny_model), str(EMBEDDED), splits=["raw/retain1"], batch_size=2, max_length=16)
    module = FinetuneModule(str(tiny_model), lr_schedule="constant")
    _trainer().fit(module, datamodule=data)
    assert data.steps_per_epoch() == -(-len(data.train_set) // 2)
    with pytest.raises(BenchmarkDataError, match=r"split 'privleak/forget' is not raw text"):
        MuseTextDataModule(str(tiny_model), str(EMBEDDED), splits=["privleak/forget"]).setup()


def test_evaluator_cli_writes_every_metric(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "retain" / "eval.json"
    args = ["--model", str(tiny_model), "--benchmark", str(EMBEDDED), "--corpus", "news", "--limit", "4"]
    main([*args, "--out", str(out), "--verbmem_max_new_tokens", "16"])
    result = json.loads(out.read_text())
    assert set(result["metrics"]) == EVERY_METRIC
    for name, entry in result["metrics"].items():
        assert entry["agg_value"] is not None, name
        assert len(entry["value_by_index"]) == (0 if name == "privleak" else 4), name
    assert result["meta"]["corpus"] == "news" and result["meta"]["rows"]["knowmem/forget_qa_icl"] == mw.N_ICL
    assert result["meta"]["privleak_reference_auc"] == 0.5
    # The same model as its own retain reference: equal AUCs, so PrivLeak is exactly 0.
    again = main(
        [*args, "--out", str(tmp_path / "self.json"), "--metric_groups", "[privleak]", "--retain_reference", str(out)]
    )
    assert set(again["metrics"]) == {"mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "privleak"}
    assert again["metrics"]["privleak"]["agg_value"] == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------------------------------------------
# The embedded MUSE models' tokenizer, sharded evaluation and the shipped config end to end


def test_muse_tokenizer_is_fitted_on_articles_and_passages(muse_model: Path, tmp_path: Path) -> None:
    texts = list(corpus_texts(EMBEDDED))
    articles = [row["text"] for row in _read(EMBEDDED / "news_raw_forget.jsonl")]
    assert set(articles) <= set(texts)
    row = _read(EMBEDDED / "news_verbmem_forget.jsonl")[0]
    assert f"{row['prompt']} {row['gt']}" in texts
    tokenizer = AutoTokenizer.from_pretrained(str(muse_model))
    for text in articles[:5]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    _write(tmp_path / "odd.jsonl", [{"title": "no text field"}])
    with pytest.raises(ValueError, match=r"odd\.jsonl:1: expected a JSON object with 'question' and 'answer'"):
        list(corpus_texts(tmp_path))


def test_sharded_muse_scores_aggregate_to_the_single_process_metrics(muse_model: Path) -> None:
    """Two ranks' shares of 5 rows per split (3 + 2), joined with RowScores.concat, give exactly the metrics of one
    process. Batches of one example keep every row's forward identical in both runs (no padding differs)."""
    unpadded = {"batch_size": 1, "knowmem_batch_size": 1, "verbmem_batch_size": 1}
    short = {"knowmem_max_new_tokens": 6, "verbmem_max_new_tokens": 6}
    settings = MuseSettings(limit=5, **unpadded, **short)
    evaluator = MuseEvaluator(str(EMBEDDED), load_tokenizer(str(muse_model)), max_length=255, settings=settings)
    model = load_causal_lm(str(muse_model), "float32")
    whole = evaluator.evaluate(model)["metrics"]
    parts = [evaluator.score(model, {n: shard_rows(r, rank, 2) for n, r in evaluator.rows.items()}) for rank in (0, 1)]
    assert [part["verbmem/forget"].indices for part in parts] == [[0, 2, 4], [1, 3]]
    joined = {name: RowScores.concat([part[name] for part in parts]) for name in parts[0]}
    assert evaluator.aggregate(joined) == whole
    with pytest.raises(EvalLogError, match=r"knowmem/forget_qa: scores cover 3 rows but 5 were loaded"):
        evaluator.aggregate(parts[0])


def test_muse_evaluation_needs_a_muse_data_module(tiny_model: Path, tiny_benchmark: Path) -> None:
    data = ForgetRetainDataModule(str(tiny_model), str(tiny_benchmark))
    with pytest.raises(ValueError, match=r"MuseEvaluation needs a MUSE data module .* got ForgetRetainDataModule"):
        MuseEvaluation().build_evaluator(data)


class _PolicyModes(Callback):
    """Records whether the policy is in train mode at every training batch."""

    def __init__(self) -> None:
        self.training: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.training.append(pl_module.policy.training)


def test_embedded_muse_config_fast_dev_run(muse_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped run muse_embedded/npo_dv (NPO + BalDRO-DV on MuseDataModule, MuseEvaluation with the
    retain reference it names), on a tiny model: one step, evaluations before and after it.

    The retain reference is the same model, evaluated by the CLI on the same rows, so at step 0 the policy's MinK
    AUC equals the reference's and PrivLeak is exactly 0.
    """
    monkeypatch.chdir(tmp_path)  # the config's relative run and reference paths land here
    reference = Path("runs/muse_embedded/eval/retain/eval.json")
    flags = ["--limit", "4", "--max_length", "255", "--batch_size", "1", "--metric_groups", "[privleak]"]
    retain = main(["--model", str(muse_model), "--benchmark", str(EMBEDDED), *flags, "--out", str(reference)])
    overrides = [f"--model.init_args.model={muse_model}", f"--data.init_args.benchmark={EMBEDDED}"]
    cli = cli_main([*fit_args("muse_embedded/npo_dv"), *overrides, "--trainer.fast_dev_run=true"], run=False)
    evaluation = next(c for c in cli.trainer.callbacks if isinstance(c, MuseEvaluation))
    assert evaluation.settings.retain_reference == str(reference) and evaluation.every_epoch and evaluation.on_start
    # Smoke-sized evaluation: 4 rows per split, short continuations, unpadded likelihood batches.
    evaluation.settings = dataclasses.replace(evaluation.settings, limit=4, verbmem_max_new_tokens=8, batch_size=1)
    evaluation.dirpath = str(tmp_path / "eval")
    modes = _PolicyModes()
    cli.trainer.callbacks.append(modes)
    before = {k: v.clone() for k, v in load_causal_lm(str(muse_model), "float32").state_dict().items()}

    cli.trainer.fit(cli.model, cli.datamodule)

    assert sorted(p.name for p in (tmp_path / "eval").glob("step_*")) == ["step_000000", "step_000001"]
    start, end = (json.loads((tmp_path / "eval" / s / "eval.json").read_text()) for s in ("step_000000", "step_000001"))
    assert set(start["metrics"]) == set(end["metrics"]) == EVERY_METRIC
    assert (start["meta"]["global_step"], end["meta"]["global_step"]) == (0, 1)
    assert start["meta"]["privleak_reference_auc"] == retain["metrics"]["mia_min_k"]["agg_value"]
    assert start["metrics"]["privleak"]["agg_value"] == pytest.approx(0.0, abs=1e-9)
    assert all(len(start["metrics"][m]["value_by_index"]) == 4 for m in EVERY_METRIC - {"privleak"})
    for key in ("forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_verbmem_ROUGE", "privleak", "mia_min_k"):
        assert f"val/{key}" in cli.trainer.callback_metrics, key
    assert modes.training == [True], "the evaluation before the step left the policy in eval mode"
    exported = load_causal_lm("runs/muse_embedded/npo_dv/model", "float32").state_dict()
    assert any(not torch.equal(before[k], exported[k]) for k in before), "one NPO + DV step changed nothing"


def test_gradnorm_and_reference_attacks_on_privleak_rows(tiny_model: Path, tmp_path: Path) -> None:
    """The MUSE evaluator's extra attacks score the privleak rows: against the same model's evaluation as
    reference every Reference score is 0 (AUC 1/2); GradNorm gives one positive score per row."""
    args = ["--model", str(tiny_model), "--benchmark", str(EMBEDDED), "--corpus", "news", "--limit", "3"]
    reference = tmp_path / "reference.json"
    main([*args, "--out", str(reference), "--metric_groups", "[privleak]"])
    groups = "[privleak,mia_gradnorm,mia_reference]"
    result = main(
        [*args, "--out", str(tmp_path / "e.json"), "--metric_groups", groups, "--retain_reference", str(reference)]
    )
    entries = result["metrics"]
    assert entries["mia_reference"]["agg_value"] == 0.5
    assert set(entries["mia_reference"]["value_by_index"].values()) == {0.0}
    scores = [
        *entries["mia_gradnorm"]["value_by_index"].values(),
        *entries["mia_gradnorm"]["holdout_value_by_index"].values(),
    ]
    assert len(scores) == 6 and all(score > 0 for score in scores)
    with pytest.raises(ValueError, match=r"mia_gradnorm extend privleak; add privleak"):
        MuseSettings(metric_groups=("knowmem", "mia_gradnorm"))
