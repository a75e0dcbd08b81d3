"""Launch the multi-process tests' programs on CPU gloo processes with ``torch.distributed.run``.

Used by tests/test_distributed.py, tests/test_sharded_evaluation.py and tests/test_distributed_resume.py (which also
starts a launch without waiting, to kill it). Every process runs with ``OMP_NUM_THREADS=1`` and ``tests/`` on
``PYTHONPATH`` (so a config can name a test callback by ``class_path``). The launch gets a session of its own, so
that on a timeout the whole process group is killed, the workers too and not only the launcher; the test then fails
with the end of what they wrote to stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, read from ``/proc`` (children first found, then theirs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # Field 4 of /proc/<pid>/stat is the parent; the command name before it may hold spaces.
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def kill_launch(process: subprocess.Popen) -> None:
    """SIGKILL a launch and every worker it started, and reap the launcher.

    torchrun's workers may run in sessions of their own, which a kill of the launch's process group misses; they
    would sleep on (a paused run) after the test. They are found through ``/proc`` before anything is killed.
    """
    workers = _descendants(process.pid)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def start_torchrun(
    program: list[str], processes: int = 2, cwd: Path | None = None, log: Path | None = None
) -> subprocess.Popen:
    """Start ``python -m torch.distributed.run --standalone`` on ``program`` in a session of its own, without waiting.

    Stop it with :func:`kill_launch` (the workers too). Its stdout and stderr go to ``log``,
    or to pipes (text) when there is none: read those, or a chatty run blocks on a full pipe.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free rendezvous port on localhost, so parallel test sessions do not collide
        f"--nproc_per_node={processes}",
        *program,
    ]
    pythonpath = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if log is not None:
        with log.open("w") as out:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(
                command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
    return subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def torchrun(program: list[str], what: str, timeout: int, processes: int = 2, cwd: Path | None = None) -> None:
    """Run ``python -m torch.distributed.run --standalone`` on ``program``; fail the test if it fails or hangs.

    Args:
        program: what follows the launcher's own flags: a script and its arguments, or ``-m module ...``.
        what: names the launch in the failure message, e.g. ``"the 2-process run"``.
        timeout: seconds before the process group is killed and the test fails.
        processes: ``--nproc_per_node``.
        cwd: the processes' working directory (default: this one).
    """
    process = start_torchrun(program, processes, cwd)
    command = process.args
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_launch(process)
        _, stderr = process.communicate()
        pytest.fail(f"{what} did not finish in {timeout} s (a deadlock?): {' '.join(command)}\n{stderr[-6000:]}")
    if process.returncode != 0:
        pytest.fail(f"{what} failed (exit {process.returncode}): {' '.join(command)}\n{stderr[-6000:]}")


def run_worker(
    worker: Path, runs: list[str], model: Path, benchmark: Path, out: Path, timeout: int, what: str, **options: int
) -> Path:
    """Run a worker script built on ``worker_setup.worker_parser`` on 2 processes; returns ``out``.

    Args:
        worker: the script, e.g. ``tests/distributed_worker.py``.
        runs: the worker's ``--runs`` values.
        model: ``--model``, a save_pretrained causal LM and tokenizer.
        benchmark: ``--benchmark``, a directory of ``{split}.jsonl`` files.
        out: ``--out``, where the worker writes its records.
        timeout: seconds before the launch is killed (see :func:`torchrun`).
        what: names the launch in the failure message.
        **options: further flags, ``batch_size=2`` becoming ``--batch-size=2``.
    """
    flags = [f"--model={model}", f"--benchmark={benchmark}", f"--out={out}"]
    flags += [f"--{name.replace('_', '-')}={value}" for name, value in options.items()]
    torchrun([str(worker), *flags, "--runs", *runs], what, timeout)
    return out
