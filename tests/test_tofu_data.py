"""TOFU split loading: real files through the local-directory path, every bad-row kind, the offline Hub path."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from baldro_lightning.data.tofu import TOFU_SPLITS, BenchmarkDataError, load_split, split_pairing

SHARED_TOFU = Path("/work/shared/data/tofu")
EXPECTED_ROWS = {
    "full": 4000,
    "forget01": 40,
    "forget05": 200,
    "forget10": 400,
    "retain99": 3960,
    "retain95": 3800,
    "retain90": 3600,
    "holdout01": 40,
    "holdout05": 200,
    "holdout10": 400,
    "forget01_perturbed": 40,
    "forget05_perturbed": 200,
    "forget10_perturbed": 400,
    "retain_perturbed": 400,
    "real_authors_perturbed": 100,
    "world_facts_perturbed": 117,
}


def _write_jsonl(directory: Path, name: str, rows: list[object]) -> Path:
    path = directory / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _qa(i: int) -> dict[str, object]:
    return {"question": f"Who wrote book {i}?", "answer": f"Author {i} wrote it."}


def _perturbed(i: int, n: int = 5) -> dict[str, object]:
    row = _qa(i)
    row["paraphrased_answer"] = f"It was written by author {i}."
    row["perturbed_answer"] = [f"Someone else ({k}) wrote it." for k in range(n)]
    return row


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_shared_split_loads_with_expected_rows(name: str) -> None:
    if not (SHARED_TOFU / f"{name}.jsonl").is_file():
        pytest.skip(f"{SHARED_TOFU}/{name}.jsonl is absent (shared TOFU data not mounted)")
    rows = load_split(SHARED_TOFU, name)
    assert len(rows) == EXPECTED_ROWS[name] == TOFU_SPLITS[name].rows
    assert [row["index"] for row in rows] == list(range(len(rows)))
    assert "idx" in rows[0]
    expected_perturbed = TOFU_SPLITS[name].perturbed_answers
    if expected_perturbed is not None:
        assert all(len(row["perturbed_answer"]) == expected_perturbed for row in rows)


def test_shared_forget10_perturbed_has_five_perturbed_answers_and_same_answers_as_forget10() -> None:
    if not (SHARED_TOFU / "forget10_perturbed.jsonl").is_file():
        pytest.skip(f"{SHARED_TOFU} is absent (shared TOFU data not mounted)")
    perturbed = load_split(SHARED_TOFU, "forget10_perturbed")
    plain = load_split(SHARED_TOFU, "forget10")
    assert {len(row["perturbed_answer"]) for row in perturbed} == {5}
    assert [row["answer"] for row in perturbed] == [row["answer"] for row in plain]
    assert all(isinstance(row["paraphrased_question"], str) for row in perturbed)


def test_every_split_name_has_a_schema() -> None:
    assert set(EXPECTED_ROWS) | {"real_authors", "world_facts"} == set(TOFU_SPLITS)
    assert TOFU_SPLITS["retain_perturbed"].perturbed_answers == 5
    assert TOFU_SPLITS["world_facts_perturbed"].perturbed_answers == 3
    assert TOFU_SPLITS["forget05"].perturbed_answers is None
    assert "paraphrased_answer" in TOFU_SPLITS["forget01_perturbed"].string_fields
    assert "paraphrased_answer" not in TOFU_SPLITS["real_authors_perturbed"].string_fields


def test_local_jsonl_rows_keep_fields_and_get_index(tmp_path: Path) -> None:
    rows = [dict(_qa(i), idx=10 + i, full_idx=100 + i) for i in range(3)]
    _write_jsonl(tmp_path, "forget01", rows)
    loaded = load_split(str(tmp_path), "forget01")
    assert [row["index"] for row in loaded] == [0, 1, 2]
    assert [row["idx"] for row in loaded] == [10, 11, 12]
    assert loaded[2]["full_idx"] == 102
    assert loaded[1]["answer"] == "Author 1 wrote it."


def test_local_json_list_and_json_lines_in_a_json_file(tmp_path: Path) -> None:
    (tmp_path / "holdout01.json").write_text(json.dumps([_qa(0), _qa(1)]), encoding="utf-8")
    assert [row["question"] for row in load_split(tmp_path, "holdout01")] == ["Who wrote book 0?", "Who wrote book 1?"]
    (tmp_path / "holdout05.json").write_text(json.dumps(_qa(0)) + "\n\n" + json.dumps(_qa(1)) + "\n")
    assert len(load_split(tmp_path, "holdout05")) == 2


def test_jsonl_is_preferred_over_json(tmp_path: Path) -> None:
    _write_jsonl(tmp_path, "forget01", [_qa(0)])
    (tmp_path / "forget01.json").write_text(json.dumps([_qa(0), _qa(1)]), encoding="utf-8")
    assert len(load_split(tmp_path, "forget01")) == 1


def test_unknown_split_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkDataError, match=r"unknown TOFU split 'forget20'; valid names: full, forget01"):
        load_split(tmp_path, "forget20")


def test_missing_file_lists_directory_and_flag(tmp_path: Path) -> None:
    _write_jsonl(tmp_path, "forget01", [_qa(0)])
    with pytest.raises(
        BenchmarkDataError,
        match=r"has no retain99\.jsonl or retain99\.json \(it holds: forget01\.jsonl\); point --data",
    ):
        load_split(tmp_path, "retain99")


def test_missing_directory_that_looks_like_a_path(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkDataError, match=r"--data.benchmark '.*/nowhere' does not exist"):
        load_split(tmp_path / "nowhere", "forget01")


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "forget01.jsonl"
    path.write_text(json.dumps(_qa(0)) + '\n{"question": "Q?", "answer": \n', encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match=r"forget01\.jsonl, line 2: malformed JSON \(Expecting value"):
        load_split(tmp_path, "forget01")


def test_malformed_json_list_names_line(tmp_path: Path) -> None:
    (tmp_path / "forget01.json").write_text('[\n{"question": "Q?",\n "answer": }\n]', encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match=r"forget01\.json, line 3: malformed JSON"):
        load_split(tmp_path, "forget01")


def test_row_not_an_object(tmp_path: Path) -> None:
    _write_jsonl(tmp_path, "forget01", [_qa(0), ["Q?", "A."]])
    with pytest.raises(BenchmarkDataError, match=r"forget01\.jsonl, line 2: expected a JSON object .* got list"):
        load_split(tmp_path, "forget01")


def test_row_number_in_json_list_is_the_row(tmp_path: Path) -> None:
    (tmp_path / "forget01.json").write_text(json.dumps([_qa(0), _qa(1), 7]), encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match=r"forget01\.json, row 3: expected a JSON object"):
        load_split(tmp_path, "forget01")


def test_missing_answer(tmp_path: Path) -> None:
    _write_jsonl(tmp_path, "forget01", [_qa(0), {"question": "Q?"}])
    with pytest.raises(BenchmarkDataError, match=r"line 2: missing field 'answer' \(row has question\); fix or remove"):
        load_split(tmp_path, "forget01")


def test_non_string_question(tmp_path: Path) -> None:
    _write_jsonl(tmp_path, "forget01", [{"question": 42, "answer": "A."}])
    with pytest.raises(BenchmarkDataError, match=r"line 1: field 'question' must be a string, got int 42"):
        load_split(tmp_path, "forget01")


def test_whitespace_answer(tmp_path: Path) -> None:
    _write_jsonl(tmp_path, "retain99", [_qa(0), _qa(1), {"question": "Q?", "answer": "  \n"}])
    with pytest.raises(BenchmarkDataError, match=r"retain99\.jsonl, line 3: field 'answer' is empty or whitespace"):
        load_split(tmp_path, "retain99")


def test_missing_paraphrased_answer_on_perturbed_split(tmp_path: Path) -> None:
    row = _perturbed(0)
    del row["paraphrased_answer"]
    _write_jsonl(tmp_path, "forget01_perturbed", [row])
    with pytest.raises(BenchmarkDataError, match=r"line 1: missing field 'paraphrased_answer'"):
        load_split(tmp_path, "forget01_perturbed")


def test_empty_paraphrased_question_when_present(tmp_path: Path) -> None:
    _write_jsonl(tmp_path, "forget01_perturbed", [dict(_perturbed(0), paraphrased_question="")])
    with pytest.raises(BenchmarkDataError, match=r"optional field 'paraphrased_question' is empty"):
        load_split(tmp_path, "forget01_perturbed")


def test_perturbed_answer_not_a_list(tmp_path: Path) -> None:
    _write_jsonl(tmp_path, "retain_perturbed", [dict(_perturbed(0), perturbed_answer="wrong")])
    with pytest.raises(BenchmarkDataError, match=r"'perturbed_answer' must be a list of 5 strings, got str 'wrong'"):
        load_split(tmp_path, "retain_perturbed")


def test_perturbed_answer_wrong_length(tmp_path: Path) -> None:
    _write_jsonl(tmp_path, "forget05_perturbed", [_perturbed(0), _perturbed(1, n=4)])
    with pytest.raises(BenchmarkDataError, match=r"line 2: field 'perturbed_answer' must hold 5 answers, got 4"):
        load_split(tmp_path, "forget05_perturbed")


def test_perturbed_answer_length_three_for_world_facts(tmp_path: Path) -> None:
    row = dict(_qa(0), perturbed_answer=["a", "b", "c"])
    _write_jsonl(tmp_path, "world_facts_perturbed", [row])
    assert load_split(tmp_path, "world_facts_perturbed")[0]["perturbed_answer"] == ["a", "b", "c"]
    _write_jsonl(tmp_path, "real_authors_perturbed", [dict(row, perturbed_answer=["a"] * 5)])
    with pytest.raises(BenchmarkDataError, match=r"must hold 3 answers, got 5"):
        load_split(tmp_path, "real_authors_perturbed")


def test_perturbed_answer_bad_entry(tmp_path: Path) -> None:
    _write_jsonl(tmp_path, "world_facts_perturbed", [dict(_qa(0), perturbed_answer=["a", None, "c"])])
    with pytest.raises(BenchmarkDataError, match=r"field 'perturbed_answer'\[1\] must be a string, got NoneType"):
        load_split(tmp_path, "world_facts_perturbed")
    _write_jsonl(tmp_path, "world_facts_perturbed", [dict(_qa(0), perturbed_answer=["a", "b", " "])])
    with pytest.raises(BenchmarkDataError, match=r"field 'perturbed_answer'\[2\] is empty or whitespace"):
        load_split(tmp_path, "world_facts_perturbed")


def test_long_bad_value_is_shortened(tmp_path: Path) -> None:
    _write_jsonl(tmp_path, "forget01", [{"question": ["x" * 500], "answer": "A."}])
    with pytest.raises(BenchmarkDataError, match=r"got list \['xxx[x]*\.\.\.;") as info:
        load_split(tmp_path, "forget01")
    assert len(str(info.value)) < 400


def test_non_utf8_bytes_name_line_and_offset(tmp_path: Path) -> None:
    good = (json.dumps(_qa(0)) + "\n").encode()
    (tmp_path / "forget01.jsonl").write_bytes(good + b'{"question": "Caf\xe9?", "answer": "A."}\n')
    # b'{"question": "Caf' is 17 bytes, so the bad byte sits at 0-based offset 17 of line 2.
    with pytest.raises(
        BenchmarkDataError,
        match=r"forget01\.jsonl, line 2, byte offset 17 \(offset 83 in the file\): bytes b'\\xe9' are",
    ):
        load_split(tmp_path, "forget01")


def test_empty_split(tmp_path: Path) -> None:
    (tmp_path / "forget01.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match=r"forget01\.jsonl holds no rows; split 'forget01' should have 40"):
        load_split(tmp_path, "forget01")


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset: Callable[..., object]) -> None:
    """Stand in for the `datasets` package, so no test can reach the network (or pay its import time)."""
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)


@pytest.mark.parametrize("flag", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_hub_gives_local_directory_hint(monkeypatch: pytest.MonkeyPatch, flag: str) -> None:
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(flag, "1")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_split must not call datasets.load_dataset when offline")

    _fake_datasets(monkeypatch, no_network)
    with pytest.raises(
        BenchmarkDataError,
        match=rf"could not fetch TOFU split 'forget10' from the Hub dataset 'locuslab/TOFU' \({flag} is set\); "
        r"pass a local directory instead, e\.g\. --data\.benchmark /path/to/tofu_jsonl holding forget10\.jsonl",
    ):
        load_split("locuslab/TOFU", "forget10")


def test_hub_connection_error_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no route to host")

    _fake_datasets(monkeypatch, unreachable)
    with pytest.raises(BenchmarkDataError, match=r"\(ConnectionError: no route to host\); pass a local directory"):
        load_split("locuslab/TOFU", "forget01")


def test_hub_rows_are_validated_and_indexed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def fake_load(source: str, name: str, split: str) -> list[dict[str, object]]:
        calls.append((source, name, split))
        return [_qa(0), {"question": "Q?", "answer": ""}] if name == "forget05" else [_qa(0), _qa(1)]

    _fake_datasets(monkeypatch, fake_load)
    assert [row["index"] for row in load_split("locuslab/TOFU", "forget01")] == [0, 1]
    assert calls == [("locuslab/TOFU", "forget01", "train")]
    with pytest.raises(BenchmarkDataError, match=r"Hub dataset 'locuslab/TOFU' \(config 'forget05'\), row 2: field"):
        load_split("locuslab/TOFU", "forget05")


@pytest.mark.parametrize(
    ("forget", "expected"),
    [
        ("forget01", ("retain99", "holdout01", "forget01_perturbed")),
        ("forget05", ("retain95", "holdout05", "forget05_perturbed")),
        ("forget10", ("retain90", "holdout10", "forget10_perturbed")),
    ],
)
def test_split_pairing(forget: str, expected: tuple[str, str, str]) -> None:
    assert split_pairing(forget) == expected
    assert all(name in TOFU_SPLITS for name in expected)


@pytest.mark.parametrize("bad", ["retain90", "forget20", "forget10_perturbed"])
def test_split_pairing_rejects_non_forget_names(bad: str) -> None:
    with pytest.raises(BenchmarkDataError, match=rf"forget split '{bad}' has no retain/holdout pairing; use one of"):
        split_pairing(bad)
