"""The benchmark scripts under ``experiments/benchmarks`` run end to end and account memory correctly.

No timing is asserted (timings belong in the scripts' output, not in pass/fail tests); what is checked is that a
one-round run produces every field, and that the state each variant holds is what its reference mode implies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_step_time_reports_ratios_and_reference_memory(tiny_model, tiny_benchmark, tmp_path):
    out = tmp_path / "step_time.json"
    command = [
        sys.executable,
        "experiments/benchmarks/step_time.py",
        *("--model", str(tiny_model), "--benchmark", str(tiny_benchmark)),
        *("--batch-size", "2", "--steps", "2", "--warmup", "0", "--rounds", "2"),
        *("--variants", "npo", "npo_cached", "npo_dv", "--out", str(out)),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["results"]}

    assert rows["npo"]["ratio_vs_npo"] == 1.0
    assert 0 < rows["npo"]["reference_share"] < 1 and rows["npo_cached"]["reference_share"] == 0
    for row in rows.values():
        assert row["median_step_s"] > 0 and row["peak_rss_mib"] > 0
        assert row["round_ratio_min"] <= row["round_ratio_median"] <= row["round_ratio_max"]
    live, cached = rows["npo"]["state_bytes"], rows["npo_cached"]["state_bytes"]
    # A live reference is a second copy of the weights; the cache is one fp32 number per forget row.
    assert live["reference"] == live["policy"] and live["reference_cache"] == 0
    assert cached["reference"] == 0 and cached["reference_cache"] == 4 * 4  # the tiny benchmark's 4 forget rows
    assert live["grads"] == live["policy"] and live["optimizer"] >= 2 * live["policy"]  # AdamW's two moments
    assert rows["npo_dv"]["state_bytes"] == live


@pytest.mark.slow
def test_eval_throughput_compares_new_current_and_naive_at_equal_values(tiny_model, tiny_benchmark, tmp_path):
    out = tmp_path / "eval.json"
    command = [
        sys.executable,
        "experiments/benchmarks/eval_throughput.py",
        *("--model", str(tiny_model), "--benchmark", str(tiny_benchmark)),
        *("--repeats", "2", "--max_new_tokens", "4", "--batch_size", "5", "--out", str(out)),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["wall"]) == set(report["cpu"]) == {"new", "current", "naive"}
    assert report["wall"]["new"]["ratio_of_medians"] == 1.0
    for path in ("current", "naive"):
        assert len(report["wall_s"][path]) == len(report["cpu_s"][path]) == 2
        ratios = report["cpu"][path]
        assert ratios["pass_ratio_min"] <= ratios["pass_ratio_median"] <= ratios["pass_ratio_max"]
        check = report["checks"][path]
        # Every scored answer of the tiny benchmark: 4 forget and 4 retain rows x 7, 2 x 4 x 4 general, 4 holdout.
        assert check["items_compared"] == 4 * 7 + 4 * 7 + 2 * 4 * 4 + 4
        assert check["max_abs_nll_diff"] <= 1e-5 and check["metric_disagreements"] == 0
        assert check["identical_generations"] == "16/16"
