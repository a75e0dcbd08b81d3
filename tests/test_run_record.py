"""A run's evaluation record on disk: eval.json and per_sample.csv round trips, step layout, retain reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from baldro_lightning.evaluation import run_record
from baldro_lightning.evaluation.run_record import (
    CURVES,
    EvalLogError,
    SampleCurves,
    default_eval_dir,
    load_eval_json,
    per_sample_of,
    per_sample_path,
    read_per_sample,
    read_sample_curves,
    reference_privleak_auc,
    reference_row_losses,
    reference_truth_ratios,
    run_step_evals,
    step_eval_path,
    write_eval_json,
    write_per_sample,
)

# --------------------------------------------------------------------------------------------------------------
# eval.json


def test_eval_json_round_trip_is_strict_json_and_keeps_every_section(tmp_path):
    result = {
        "meta": {"forget_split": "forget10", "rows": {"forget10_perturbed": 2}, "template": ("a", "b")},
        "metrics": {
            "forget_truth_ratio": {"agg_value": np.float32(0.5), "value_by_index": {0: 1.25, 1: float("nan")}},
            "forget_Q_A_PERT_Prob": {"agg_value": np.float64(0.25), "value_by_index": {"0": np.array([0.5, 0.0])}},
            "privleak": {"agg_value": float("inf"), "value_by_index": {}},
        },
        "synchrony": {"criterion": "rouge", "forget_step_median": np.int64(3)},
    }
    path = write_eval_json(result, tmp_path / "step_000003" / "eval.json")
    assert path == tmp_path / "step_000003" / "eval.json"
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: non-finite numbers are null
    loaded = load_eval_json(path)
    assert loaded == {
        "meta": {"forget_split": "forget10", "rows": {"forget10_perturbed": 2}, "template": ["a", "b"]},
        "metrics": {
            "forget_truth_ratio": {"agg_value": 0.5, "value_by_index": {"0": 1.25, "1": None}},
            "forget_Q_A_PERT_Prob": {"agg_value": 0.25, "value_by_index": {"0": [0.5, 0.0]}},
            "privleak": {"agg_value": None, "value_by_index": {}},
        },
        "synchrony": {"criterion": "rouge", "forget_step_median": 3},
    }
    # Written again from what was read: the same bytes.
    again = write_eval_json(loaded, tmp_path / "again.json")
    assert again.read_text() == text


def test_load_reads_open_unlearning_layout_and_a_file_without_meta(tmp_path):
    legacy = tmp_path / "TOFU_EVAL.json"
    legacy.write_text(json.dumps({"forget_truth_ratio": {"agg_value": 0.5}}))
    assert load_eval_json(legacy) == {"meta": {}, "metrics": {"forget_truth_ratio": {"agg_value": 0.5}}}
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"metrics": {"x": {"agg_value": 1.0}}}))
    assert load_eval_json(bare) == {"meta": {}, "metrics": {"x": {"agg_value": 1.0}}}


def test_load_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(EvalLogError, match=r"missing\.json does not exist; write it with `python -m baldro_lightning"):
        load_eval_json(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"metrics": {')
    with pytest.raises(EvalLogError, match=r"broken\.json is not a JSON file .*re-run the evaluation"):
        load_eval_json(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(EvalLogError, match=r"list\.json holds a JSON list, not an object of metrics"):
        load_eval_json(listed)


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    out = tmp_path / "eval.json"
    out.write_text('{"old": true}')

    def dump_then_fail(obj, file, **kwargs):
        file.write('{"metrics": {')
        raise OSError("disk full")

    monkeypatch.setattr(run_record.json, "dump", dump_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_eval_json({"meta": {}, "metrics": {}}, out)
    assert out.read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


# --------------------------------------------------------------------------------------------------------------
# Where the files are


def test_step_paths_sort_by_step(tmp_path):
    eval_dir = default_eval_dir(tmp_path / "tensorboard")
    assert eval_dir == tmp_path / "tensorboard" / "eval"
    assert step_eval_path(eval_dir, 7) == eval_dir / "step_000007" / "eval.json"
    assert step_eval_path(eval_dir, 123456) == eval_dir / "step_123456" / "eval.json"
    assert per_sample_path(eval_dir) == eval_dir / "per_sample.csv"
    assert per_sample_of(step_eval_path(eval_dir, 7)) == eval_dir / "per_sample.csv"
    # Zero-padding: name order is step order (9 before 10).
    names = [step_eval_path(eval_dir, s).parent.name for s in (10, 9, 100)]
    assert sorted(names) == ["step_000009", "step_000010", "step_000100"]


@pytest.mark.parametrize("layout", ["eval", "tensorboard/eval", "lightning_logs/version_0/eval"])
def test_run_step_evals_finds_each_logger_layout_in_step_order(tmp_path, layout):
    run = tmp_path / "run"
    for step in (10, 0, 2):
        write_eval_json({"meta": {"global_step": step}, "metrics": {}}, step_eval_path(run / layout, step))
    found = run_step_evals(run)
    assert [load_eval_json(p)["meta"]["global_step"] for p in found] == [0, 2, 10]
    assert found[-1] == step_eval_path(run / layout, 10)


def test_run_step_evals_does_not_take_a_sweep_root_for_a_run(tmp_path):
    write_eval_json({"meta": {}, "metrics": {}}, step_eval_path(tmp_path / "sweep" / "npo" / "tensorboard" / "eval", 0))
    assert run_step_evals(tmp_path / "sweep") == []
    assert len(run_step_evals(tmp_path / "sweep" / "npo")) == 1


# --------------------------------------------------------------------------------------------------------------
# per_sample.csv


def _history() -> list[dict]:
    return [
        {
            "step": 0,
            "index": [3, 7],
            "log_ppl_ratio": np.array([0.0, 0.0]),
            "truth_ratio": np.array([0.123456789, 2.0]),
            "rougeL_recall": np.array([1.0, np.nan]),
            "dro_weight": np.array([np.nan, np.nan]),
        },
        {
            "step": 4,
            "index": [3, 7],
            "log_ppl_ratio": np.array([1.5, 0.25]),
            "truth_ratio": np.array([0.5, 3.0]),
            "rougeL_recall": np.array([0.2, 0.9]),
            "dro_weight": np.array([0.75, 0.25]),
        },
    ]


def test_per_sample_round_trip(tmp_path):
    path = write_per_sample(per_sample_path(tmp_path), _history(), {"3": 4.0, "7": None})
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(["step", "index", *CURVES, "forget_step"])
    assert lines[1] == "0,3,0,0.123457,1,nan,4.0"  # six significant digits, NaN written as nan
    assert lines[2] == "0,7,0,2,nan,nan,"  # never forgotten: an empty cell
    table = read_per_sample(path)
    assert list(table) == ["step", "index", *CURVES, "forget_step"]
    np.testing.assert_array_equal(table["step"], [0, 0, 4, 4])
    np.testing.assert_array_equal(table["index"], [3, 7, 3, 7])
    np.testing.assert_allclose(table["log_ppl_ratio"], [0.0, 0.0, 1.5, 0.25])
    np.testing.assert_allclose(table["truth_ratio"], [0.123457, 2.0, 0.5, 3.0])
    np.testing.assert_allclose(table["rougeL_recall"], [1.0, math.nan, 0.2, 0.9])
    np.testing.assert_allclose(table["dro_weight"], [math.nan, math.nan, 0.75, 0.25])
    np.testing.assert_allclose(table["forget_step"], [4.0, math.nan, 4.0, math.nan])


def test_empty_per_sample_reads_as_no_columns(tmp_path):
    path = tmp_path / "per_sample.csv"
    path.write_text("")
    assert read_per_sample(path) == {}


# --------------------------------------------------------------------------------------------------------------
# The retain reference


def test_reference_truth_ratios_read_open_unlearning_layout(tmp_path):
    log_file = tmp_path / "TOFU_EVAL.json"
    rows = {"0": {"score": 0.5}, "1": {"score": 2.0}}
    log_file.write_text(json.dumps({"forget_truth_ratio": {"agg_value": 0.5, "value_by_index": rows}}))
    np.testing.assert_array_equal(reference_truth_ratios(log_file, "forget01", 2), [0.5, 2.0])


def test_reference_truth_ratios_without_forget_metrics_say_how_to_remake(tmp_path):
    path = write_eval_json({"meta": {"forget_split": "forget10"}, "metrics": {}}, tmp_path / "retain.json")
    with pytest.raises(EvalLogError, match=r"has no per-row forget_truth_ratio .*--forget_split forget10 --out"):
        reference_truth_ratios(path, "forget10", 4)


def test_reference_auc_checks_corpus_rows_and_benchmark_kind(tmp_path: Path) -> None:
    good = {"meta": {"corpus": "news", "rows": {"privleak/forget": 4}}, "metrics": {"mia_min_k": {"agg_value": 0.3}}}
    path = write_eval_json(good, tmp_path / "retain.json")
    assert reference_privleak_auc(path, "news", {"privleak/forget": 4}) == pytest.approx(0.3)
    with pytest.raises(EvalLogError, match=r"made on MUSE corpus 'news', but this evaluation uses 'books'"):
        reference_privleak_auc(path, "books")
    with pytest.raises(EvalLogError, match=r"scored 4 rows of privleak/forget but this evaluation scores 100"):
        reference_privleak_auc(path, "news", {"privleak/forget": 100})
    tofu = write_eval_json({"meta": {"forget_split": "forget10"}, "metrics": {}}, tmp_path / "tofu.json")
    with pytest.raises(EvalLogError, match=r"is a TOFU evaluation \(forget split 'forget10'\), not a MUSE one"):
        reference_privleak_auc(tofu, "news")
    # open-unlearning's MUSE_EVAL.json keeps its metrics at the top level.
    legacy = write_eval_json({"mia_min_k": {"agg_value": 0.5236}}, tmp_path / "MUSE_EVAL.json")
    assert reference_privleak_auc(legacy, "news") == pytest.approx(0.5236)
    with pytest.raises(EvalLogError, match=r"does not exist; make it by evaluating the retain model"):
        reference_privleak_auc(tmp_path / "none.json", "news")


def test_reference_row_losses_read_both_layouts(tmp_path):
    """Our layout (``value_by_index`` / ``holdout_value_by_index``) and open-unlearning's (``forget`` / ``holdout``
    with ``{"score": x}``) give the same member and non-member losses, in the order asked for; a row the reference
    does not hold is an error naming it."""
    ours = {
        "meta": {"forget_split": "forget10"},
        "metrics": {"mia_loss": {"value_by_index": {"0": 1.5, "1": 2.5}, "holdout_value_by_index": {"7": 3.0}}},
    }
    theirs = {
        "mia_loss": {
            "forget": {"value_by_index": {"0": {"score": 1.5}, "1": {"score": 2.5}}},
            "holdout": {"value_by_index": {"7": {"score": 3.0}}},
        }
    }
    for name, data in (("ours.json", ours), ("TOFU_EVAL.json", theirs)):
        (tmp_path / name).write_text(json.dumps(data))
        members, nonmembers = reference_row_losses(tmp_path / name, [1, 0], [7], forget_split="forget10")
        assert members.tolist() == [2.5, 1.5] and nonmembers.tolist() == [3.0]
    with pytest.raises(EvalLogError, match=r"no mia_loss non-member score of 1 rows \(indices 8\.\.8\)"):
        reference_row_losses(tmp_path / "ours.json", [0], [8], forget_split="forget10")
    (tmp_path / "no_mia.json").write_text(json.dumps({"meta": {}, "metrics": {}}))
    with pytest.raises(EvalLogError, match="has no mia_loss, which the Reference attack needs"):
        reference_row_losses(tmp_path / "no_mia.json", [0], [7], forget_split="forget10")


def test_former_per_sample_layout_reads_with_the_current_sign(tmp_path):
    """Files written before the sign was unified held log_likelihood_ratio = NLL_before - NLL_now."""
    path = tmp_path / "per_sample.csv"
    header = "step,index,log_likelihood_ratio,truth_ratio,rougeL_recall,dro_weight,forget_step"
    path.write_text(f"{header}\n4,3,-1.5,0.5,0.2,0.75,4.0\n")
    table = read_per_sample(path)
    assert "log_likelihood_ratio" not in table
    np.testing.assert_allclose(table["log_ppl_ratio"], [1.5])


def test_sample_curves_from_the_table_and_from_the_history_agree(tmp_path):
    path = write_per_sample(per_sample_path(tmp_path), _history(), {"3": 4.0, "7": None})
    from_file = read_sample_curves(path)
    from_history = SampleCurves.from_history(_history(), {"3": 4.0, "7": None})
    for curves in (from_file, from_history):
        np.testing.assert_array_equal(curves.steps, [0, 4])
        np.testing.assert_array_equal(curves.indices, [3, 7])
        np.testing.assert_allclose(curves.values["log_ppl_ratio"], [[0.0, 0.0], [1.5, 0.25]])
        np.testing.assert_allclose(curves.forget_step, [4.0, math.nan])
    # Rows in any order land in their (evaluation, sample) cell: (step, index) = (4, 7) first here.
    shuffled = {key: column[::-1] for key, column in read_per_sample(path).items()}
    np.testing.assert_allclose(SampleCurves.from_table(shuffled).values["truth_ratio"], [[0.123457, 2.0], [0.5, 3.0]])


def test_reference_nulls_are_accepted_only_where_its_meta_records_unscorable_rows(tmp_path):
    """Row 1's truth ratio is null: fine when the reference's meta.unscorable_rows lists row 1 of the perturbed
    split (forget quality leaves it out), a damaged file otherwise."""
    by_index = {"0": 0.5, "1": None, "2": 2.0}
    data = {"meta": {"forget_split": "forget10"}, "metrics": {"forget_truth_ratio": {"value_by_index": by_index}}}
    path = tmp_path / "eval.json"
    for recorded, accepted in (({"forget10_perturbed": [1]}, True), ({"forget10_perturbed": [2]}, False), ({}, False)):
        data["meta"]["unscorable_rows"] = recorded
        path.write_text(json.dumps(data))
        if accepted:
            values = reference_truth_ratios(path, "forget10", 3)
            assert values[0] == 0.5 and math.isnan(values[1]) and values[2] == 2.0
        else:
            with pytest.raises(EvalLogError, match="holds null"):
                reference_truth_ratios(path, "forget10", 3)
