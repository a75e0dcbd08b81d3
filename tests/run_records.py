"""Reading back a run's record, for the kill-and-resume tests: its evaluations, ``per_sample.csv`` and TensorBoard.

Used by tests/test_resume.py (one process) and tests/test_distributed_resume.py (two FSDP2 ranks) to check that a
run killed and resumed from its ``last.ckpt`` leaves the record an uninterrupted run leaves, timestamps aside.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from baldro_lightning.evaluation.run_record import PER_SAMPLE_CSV, load_eval_json

TIMESTAMPS = ("created", "elapsed_s")
"""``meta`` entries of an ``eval.json`` that differ between any two runs."""


def evaluations(eval_dir: Path) -> dict[str, dict[str, Any]]:
    """``{step directory: eval.json without its timestamps}`` of an evaluation directory."""
    found = {}
    for path in sorted(eval_dir.glob("step_*/eval.json")):
        data = load_eval_json(path)
        data["meta"] = {k: v for k, v in data["meta"].items() if k not in TIMESTAMPS}
        found[path.parent.name] = data
    return found


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard log directory as ``[(step, value), ...]``, as TensorBoard shows it.

    All event files of the directory are read in order, with TensorBoard's purging of events that a restarted
    session wrote over (``purge_orphaned_data``, its default); nothing is subsampled.
    """
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}, purge_orphaned_data=True)
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def stray_files(run: Path) -> list[str]:
    """Staging files and directories that a write left (``.<name>.*.tmp``) anywhere under ``run``."""
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*.tmp"))


def assert_same_record(uninterrupted: Path, resumed: Path, log_dir: str = "tensorboard") -> None:
    """The resumed run's evaluations, per-sample table, synchrony and TensorBoard scalars equal the uninterrupted
    run's (timestamps aside); ``log_dir`` is the logger's directory under each run directory."""
    want_dir, got_dir = uninterrupted / log_dir / "eval", resumed / log_dir / "eval"
    want, got = evaluations(want_dir), evaluations(got_dir)
    assert list(got) == list(want), f"evaluated at other steps: {list(got)} vs {list(want)}"
    for step, expected in want.items():
        assert got[step]["synchrony"] == expected["synchrony"], f"{step}: synchrony differs"
        assert json.dumps(got[step], sort_keys=True) == json.dumps(expected, sort_keys=True), f"{step}/eval.json"
    assert (got_dir / PER_SAMPLE_CSV).read_text() == (want_dir / PER_SAMPLE_CSV).read_text(), "per_sample.csv"

    want_tb, got_tb = tensorboard_scalars(uninterrupted / log_dir), tensorboard_scalars(resumed / log_dir)
    assert sorted(got_tb) == sorted(want_tb), set(got_tb) ^ set(want_tb)
    for tag, expected in want_tb.items():
        assert got_tb[tag] == expected, f"TensorBoard {tag}: {got_tb[tag]} vs {expected}"
