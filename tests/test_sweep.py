"""Sweeps: grid expansion, per-run paths, LightningCLI parsing, skip/failure handling, cluster scripts."""

from __future__ import annotations

import functools
import io
import json
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
import yaml
from shipped_configs import COMBINATIONS

from baldro_lightning.analysis import sweep
from baldro_lightning.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
NPO = ["experiments/embedded/defaults.yaml", "experiments/methods/npo.yaml"]
NPO_DV = [*NPO, "experiments/objectives/dv.yaml"]
GRIDS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    # Grid files name configs relative to the repository root, as the commands in their headers are run from there.
    monkeypatch.chdir(REPO)


@functools.cache
def _expanded(grid_path: Path) -> list[sweep.Run]:
    # The paper grid has thousands of runs; expand each shipped grid once per session.
    return sweep.expand(sweep.load_grid(grid_path))


def _printed_config(fit_args) -> dict:
    out = io.StringIO()
    # pytest's own arguments would otherwise make LightningCLI warn about mixing `args` with sys.argv.
    with mock.patch.object(sys, "argv", sys.argv[:1]), redirect_stdout(out), redirect_stderr(io.StringIO()):
        with pytest.raises(SystemExit) as exit_:
            cli_main(["fit", *fit_args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def _paths(config: dict) -> list[str]:
    """Every output path a resolved config names: the trainer root (which the logger follows) and callback dirpaths."""
    trainer = config["trainer"]
    paths = [trainer["default_root_dir"]]
    paths += [cb["init_args"]["dirpath"] for cb in trainer["callbacks"] if cb["init_args"].get("dirpath")]
    return paths


def test_shipped_grids_exist():
    assert {p.name for p in GRIDS} >= {"embedded_grid.yaml", "tofu_paper.yaml"}


@pytest.mark.parametrize("grid_path", GRIDS, ids=lambda p: p.name)
def test_shipped_grids_run_shipped_combinations(grid_path):
    """Each grid's base configs are a run of experiments/combinations.yaml, under the same name."""
    for name, paths in sweep.load_grid(grid_path).configs.items():
        matches = [run for run, files in COMBINATIONS.items() if files == tuple(str(p) for p in paths)]
        assert [run.split("/")[1] for run in matches] == [name], (name, paths)


@pytest.mark.parametrize("grid_path", GRIDS, ids=lambda p: p.name)
def test_shipped_grid_expands_to_distinct_run_directories(grid_path):
    grid = sweep.load_grid(grid_path)
    runs = _expanded(grid_path)
    assert len({run.directory for run in runs}) == len(runs)
    base = {
        name: sweep._base_section([yaml.safe_load(p.read_text()) for p in paths], "callbacks")
        for name, paths in grid.configs.items()
    }
    for run in runs:
        assert run.directory.parent == grid.root
        # The one output path of a run: everything else follows it.
        assert run.overrides["trainer.default_root_dir"] == str(run.directory)
        callbacks = run.overrides.get("trainer.callbacks", base[run.config])
        assert not any((cb.get("init_args") or {}).get("dirpath") for cb in callbacks)
        evaluation = next(cb for cb in callbacks if cb["class_path"].endswith(("TofuEvaluation", "MuseEvaluation")))
        if evaluation["class_path"].endswith("TofuEvaluation"):
            # Every TOFU grid names its split, so the retain reference cannot silently stay forget10's.
            assert f"/{RETAIN_OF[run.labels['split']]}/" in evaluation["init_args"]["settings"]["retain_reference"]
        else:
            assert evaluation["init_args"]["settings"]["retain_reference"].endswith("/retain/eval.json")


def test_embedded_grid_is_the_issue_grid():
    runs = _expanded(REPO / "experiments/sweeps/embedded_grid.yaml")
    assert len(runs) == 3 * 5 * 4
    assert {run.config for run in runs} == {
        f"{b}{v}" for b in ("ga", "gd", "npo", "simnpo", "satimp") for v in ("", "_g", "_dv", "_dv_released")
    }


def test_tofu_paper_grid_axes_follow_section_5_1_4():
    runs = _expanded(REPO / "experiments/sweeps/tofu_paper.yaml")
    npo_dv = [r for r in runs if r.config == "npo_dv"]
    assert len(npo_dv) == 3 * 4 * 3 * 4 * 4  # split x lr x batch x beta x lambda
    assert {r.overrides["model.init_args.optimizer.init_args.lr"] for r in npo_dv} == {1e-5, 2e-5, 5e-5, 1e-4}
    assert {r.overrides["data.init_args.batch_size"] for r in npo_dv} == {8, 16, 32}
    assert {r.overrides["model.init_args.forget_objective.init_args.tau"] for r in npo_dv} == {1.0, 2.0, 5.0, 10.0}
    assert {r.overrides["model.init_args.alpha"] for r in npo_dv} == {0.25, 0.5, 1.0, 2.0}
    # beta is the DV temperature: absent from non-DV configs; GA has no retain term, so no lambda axis.
    assert all("beta" not in r.labels for r in runs if r.config in ("npo", "npo_g"))
    assert all("lambda" not in r.labels for r in runs if r.config.startswith("ga"))


def _one_per_axis_set(runs):
    """The last run of each distinct set of axes: together they use every override key of the grid."""
    picked = {}
    for run in runs:
        picked[tuple(run.labels)] = run
    return list(picked.values())


@pytest.mark.parametrize("grid_path", GRIDS, ids=lambda p: p.name)
def test_shipped_grid_runs_parse_through_lightningcli(grid_path):
    """Runs using every key of the grid resolve through LightningCLI's parser to the values the grid gives.

    The base configs themselves are parsed by tests/test_configs.py; what is new here is each override key and
    the per-run logger and callback lists.
    """
    for run in _one_per_axis_set(_expanded(grid_path)):
        config = _printed_config(run.fit_args)
        assert all(p.startswith(str(run.directory)) for p in _paths(config)), run.name
        for key, value in run.overrides.items():
            if key == "trainer.callbacks":
                continue
            node = config
            for part in key.split("."):
                node = node[part]
            assert node == value, (run.name, key)


def _write_grid(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"root": str(tmp_path / "runs"), **body}))
    return path


def test_bad_override_key_is_reported_with_its_run(tmp_path):
    grid = _write_grid(
        tmp_path,
        {
            "configs": {"npo": NPO},
            "axes": {"g": {"key": "model.init_args.gama", "values": [0.5]}},
        },
    )
    runs = sweep.expand(sweep.load_grid(grid))
    with pytest.raises(sweep.GridError, match=r"npo__g-0.5(.|\n)*gama"):
        sweep.check_runs(runs)


def test_grid_problems_are_reported_together(tmp_path):
    grid = _write_grid(
        tmp_path,
        {
            "configs": {"npo": [*NPO, "experiments/objectives/nope.yaml"]},
            "axes": {"lr": {"values": [1, 2]}, "b": {"key": "x", "values": [1], "configs": ["simnpo*"]}},
            "sets": {},
        },
    )
    with pytest.raises(sweep.GridError) as err:
        sweep.load_grid(grid)
    message = str(err.value)
    for part in ("nope.yaml", "axis 'lr' lists values, so it needs `key:", "['simnpo*'] match none", "'sets'"):
        assert part in message


def test_colliding_labels_and_unknown_callback_are_rejected(tmp_path):
    grid = _write_grid(
        tmp_path,
        {"configs": {"npo": NPO}, "axes": {"lr": {"key": "k", "values": [1, 1.0]}}},
    )
    with pytest.raises(sweep.GridError, match="label '1' twice"):
        sweep.load_grid(grid)
    grid = _write_grid(
        tmp_path,
        {
            "configs": {"npo": NPO},
            "set": {"trainer.callbacks.EarlyStopping.init_args.patience": 3},
        },
    )
    with pytest.raises(sweep.GridError, match="names callback 'EarlyStopping', but the composed config has only"):
        sweep.expand(sweep.load_grid(grid))


# --------------------------------------------------------------------------------------------------------------
# Running: a stand-in command so the behaviour is tested without training

FAKE_FIT = """
import json, pathlib, sys
args = sys.argv[1:]
root = pathlib.Path(next(a.split("=", 1)[1] for a in args if a.startswith("--trainer.default_root_dir=")))
calls = root.parent / "calls.txt"
calls.write_text(calls.read_text() + root.name + "\\n" if calls.exists() else root.name + "\\n")
if any(a == "--model.init_args.optimizer.init_args.lr=0.5" for a in args):
    print("diverged on purpose"); sys.exit(3)
out = root / "tensorboard" / "eval" / "step_000004" / "eval.json"
out.parent.mkdir(parents=True)
metrics = {"forget_quality": {"agg_value": 0.25}, "model_utility": {"agg_value": 0.5}}
out.write_text(json.dumps({"meta": {"global_step": 4}, "metrics": metrics}))
"""


def _fake(run):
    return [sys.executable, "-c", FAKE_FIT, *run.fit_args]


@pytest.fixture
def small_grid(tmp_path):
    return _write_grid(
        tmp_path,
        {
            "configs": {"npo": NPO, "npo_dv": NPO_DV},
            "axes": {"lr": {"key": "model.init_args.optimizer.init_args.lr", "values": [0.001, 0.5]}},
        },
    )


def test_failure_does_not_stop_the_rest_and_finished_runs_are_skipped(small_grid, tmp_path):
    grid = sweep.load_grid(small_grid)
    runs = sweep.expand(grid)
    rows = sweep.run_all(runs, command=_fake)
    status = {r["name"]: r["status"] for r in rows}
    assert status == {
        "npo__lr-0.001": "done",
        "npo__lr-0.5": "failed",
        "npo_dv__lr-0.001": "done",
        "npo_dv__lr-0.5": "failed",
    }
    done = json.loads((grid.root / "npo__lr-0.001" / sweep.DONE).read_text())
    assert done["final_eval"]["forget_quality"] == 0.25 and done["final_eval"]["global_step"] == 4
    failed = grid.root / "npo__lr-0.5"
    assert json.loads((failed / sweep.FAILED).read_text())["returncode"] == 3
    assert "diverged on purpose" in (failed / sweep.LOG).read_text()
    assert not (failed / sweep.DONE).exists()

    # Second pass: finished runs are skipped; failed ones run again, their first attempt kept aside.
    (grid.root / "calls.txt").unlink()
    rows = sweep.run_all(runs, command=_fake)
    assert [r["status"] for r in rows] == ["skipped", "failed", "skipped", "failed"]
    assert (grid.root / "calls.txt").read_text().split() == ["npo__lr-0.5", "npo_dv__lr-0.5"]
    assert (grid.root / ".attempts" / "npo__lr-0.5.1" / sweep.LOG).is_file()
    assert "failed" in sweep.summary_table(rows) and "0.25" in sweep.summary_table(rows)


def test_changed_settings_of_a_finished_run_stop_the_sweep(small_grid, capsys):
    runs = sweep.expand(sweep.load_grid(small_grid))
    sweep.run_all(runs[:1], command=_fake)
    changed = sweep.expand(sweep.load_grid(small_grid), {"trainer.max_epochs": 2})
    assert sweep.status_of(changed[0]) == "stale"
    with pytest.raises(sweep.GridError, match="delete their DONE.json"):
        sweep.main([str(small_grid), "--set", "trainer.max_epochs=2", "--only", "npo__lr-0.001"])


def test_editing_a_base_config_makes_its_finished_runs_stale(tmp_path):
    """The "done" check reads the config files' contents after the overrides, not only the arguments: an edit of a
    base config makes the finished runs stale (naming the key), unless every run overrides the edited key."""
    defaults, method = tmp_path / "defaults.yaml", tmp_path / "npo.yaml"
    shutil.copy(REPO / NPO[0], defaults)
    shutil.copy(REPO / NPO[1], method)
    body = {
        "configs": {"npo": [str(defaults), str(method)]},
        "axes": {"lr": {"key": "model.init_args.optimizer.init_args.lr", "values": [0.001]}},
    }
    grid = _write_grid(tmp_path, body)
    runs = sweep.expand(sweep.load_grid(grid))
    sweep.run_all(runs, command=_fake)
    assert sweep.status_of(runs[0]) == "done"

    # A key the axis overrides: the effective config is unchanged, the run stays done.
    edited = yaml.safe_load(defaults.read_text())
    edited["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 0.5
    defaults.write_text(yaml.safe_dump(edited))
    assert sweep.status_of(sweep.expand(sweep.load_grid(grid))[0]) == "done"

    # A key no run overrides: the same arguments now mean another run.
    edited["model"]["init_args"]["weight_decay"] = 0.1
    defaults.write_text(yaml.safe_dump(edited))
    again = sweep.expand(sweep.load_grid(grid))
    assert again[0].fit_args == runs[0].fit_args
    assert sweep.status_of(again[0]) == "stale"
    assert sweep.stale_keys(again[0]) == ["model.init_args.weight_decay"]
    with pytest.raises(sweep.GridError, match=r"npo__lr-0.001: model.init_args.weight_decay"):
        sweep.main([str(grid)])

    # A DONE.json of an older sweep records no effective config: it cannot vouch for the run.
    done = runs[0].directory / sweep.DONE
    record = json.loads(done.read_text())
    del record["effective_config"]
    done.write_text(json.dumps(record))
    assert sweep.status_of(runs[0]) == "stale"


def test_effective_config_composes_files_then_overrides():
    """Mappings merge key by key, lists are replaced whole, and overrides set dotted paths last."""
    base = {"trainer": {"max_epochs": 5, "callbacks": [{"class_path": "A"}, {"class_path": "B"}]}, "seed": 0}
    diff = {"trainer": {"callbacks": [{"class_path": "C"}]}, "model": {"init_args": {"gamma": 1.0}}}
    overrides = {"trainer.max_epochs": 2, "model.init_args.optimizer.init_args.lr": 1e-3}
    assert sweep.effective_config([base, diff], overrides) == {
        "trainer": {"max_epochs": 2, "callbacks": [{"class_path": "C"}]},
        "seed": 0,
        "model": {"init_args": {"gamma": 1.0, "optimizer": {"init_args": {"lr": 1e-3}}}},
    }
    assert base["trainer"]["max_epochs"] == 5, "the loaded configs are not changed in place"


def test_dry_run_prints_one_command_per_run_and_writes_nothing(small_grid, capsys):
    assert sweep.main([str(small_grid), "--dry-run", "--only", "npo_dv__*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if not line.startswith("#")]
    assert len(commands) == 2 and all(" -m baldro_lightning fit --config " in c for c in commands)
    assert "# [1] npo_dv__lr-0.5 (pending)" in lines
    assert not (small_grid.parent / "runs").exists()


def test_slurm_and_torchrun_scripts(small_grid, tmp_path):
    slurm, launcher = tmp_path / "sweep.sbatch", tmp_path / "sweep.sh"
    sweep.main([str(small_grid), "--slurm", str(slurm), "--slurm-option=--gpus=1", "--set", "trainer.max_epochs=2"])
    text = slurm.read_text()
    assert "#SBATCH --array=0-3" in text and "#SBATCH --gpus=1" in text
    assert '--task "$SLURM_ARRAY_TASK_ID"' in text and "--set trainer.max_epochs=2" in text
    sweep.main([str(small_grid), "--torchrun", str(launcher), "--nproc-per-node", "2"])
    lines = [line for line in launcher.read_text().splitlines() if "--task" in line]
    assert [line.split("--task ")[1].split()[0] for line in lines] == ["0", "1", "2", "3"]
    assert all("--nproc-per-node 2" in line for line in lines)
    run = sweep.expand(sweep.load_grid(small_grid))[0]
    command = run.command(nproc_per_node=2)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[-1] == "--trainer.devices=2"


def test_task_out_of_range_names_the_count(small_grid):
    with pytest.raises(sweep.GridError, match="has 4 runs"):
        sweep.main([str(small_grid), "--task", "4"])


@pytest.mark.slow
def test_real_sweep_on_the_tiny_model(tiny_model, tiny_benchmark, tmp_path):
    """Two real fits of a composed run; every file they write lands in their own run directory."""
    tiny = tmp_path / "tiny.yaml"  # one more diff file: the tiny model and benchmark
    tiny.write_text(
        yaml.safe_dump(
            {
                "model": {"init_args": {"model": str(tiny_model)}},
                "data": {"init_args": {"benchmark": str(tiny_benchmark), "batch_size": 2, "max_length": 64}},
            }
        )
    )
    evaluation = "trainer.callbacks.TofuEvaluation.init_args."
    grid = _write_grid(
        tmp_path,
        {
            "configs": {"tiny": [*NPO_DV, str(tiny)]},
            "axes": {"tau": {"key": "model.init_args.forget_objective.init_args.tau", "values": [1.0, 5.0]}},
            "set": {
                "trainer.max_epochs": 1,
                "trainer.accelerator": "cpu",
                f"{evaluation}criterion": "rouge",
                f"{evaluation}settings.retain_reference": None,
                f"{evaluation}settings.max_new_tokens": 4,
                # Without a retain reference there is no forget quality to monitor.
                "trainer.callbacks.ModelCheckpoint.init_args.monitor": None,
            },
        },
    )
    assert sweep.main([str(grid)]) == 0
    root = tmp_path / "runs"
    for name, tau in (("tiny__tau-1", 1.0), ("tiny__tau-5", 5.0)):
        run = root / name
        assert json.loads((run / sweep.DONE).read_text())["final_eval"]["global_step"] == 2
        assert (run / "model" / "config.json").is_file()
        logs = run / "tensorboard"
        assert (logs / "checkpoints" / "last.ckpt").is_file() and (logs / "eval" / "per_sample.csv").is_file()
        # The saved config records the composed run: its method, its objective with this run's tau, its directory.
        saved = yaml.safe_load((logs / "config.yaml").read_text())
        assert saved["model"]["init_args"]["forget_loss"]["class_path"].endswith(".NPO")
        objective = saved["model"]["init_args"]["forget_objective"]["init_args"]
        assert objective == {"tau": tau, "sign": "paper", "granularity": "sample"}
        assert saved["trainer"]["default_root_dir"] == str(run)
    assert {p.name for p in root.iterdir()} == {"tiny__tau-1", "tiny__tau-5", "sweep_summary.json"}


def test_output_path_shared_by_every_run_is_rejected(tmp_path):
    pinned = tmp_path / "export.yaml"
    pinned.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {"class_path": "baldro_lightning.train.export.ExportPretrained", "init_args": {"dirpath": "m"}}
                    ]
                }
            }
        )
    )
    grid = _write_grid(tmp_path, {"configs": {"npo": [*NPO, str(pinned)]}})
    with pytest.raises(sweep.GridError, match=r"run npo would write where every run .* ExportPretrained"):
        sweep.expand(sweep.load_grid(grid))


def test_missing_required_files_stop_only_the_runs_that_use_them(tmp_path):
    reference, other = tmp_path / "reference.json", tmp_path / "other.json"
    grid = _write_grid(
        tmp_path,
        {
            "configs": {"npo": NPO},
            "set": {"trainer.callbacks.TofuEvaluation.init_args.settings.retain_reference": str(reference)},
            "requires": {str(reference): "make the reference", str(other): "make the other"},
        },
    )
    with pytest.raises(sweep.GridError, match="reference.json is missing; make it with: make the reference") as err:
        sweep.main([str(grid)])
    assert "other" not in str(err.value)


def test_attack_grid_keeps_the_appended_callback_and_edits_its_reference():
    """experiments/attacks/embedded.yaml appends AttackEvaluation with `callbacks+`; a grid that edits callbacks
    passes the whole list on the command line, so the appended one must be in it, with the split's reference."""
    runs = _expanded(REPO / "experiments/sweeps/embedded_attacks.yaml")
    assert len(runs) == 4 * 3
    assert {run.config for run in runs} == {f"npo{v}_attacks" for v in ("", "_g", "_dv", "_dv_released")}
    for run in runs:
        callbacks = run.overrides["trainer.callbacks"]
        names = [cb["class_path"].rsplit(".", 1)[-1] for cb in callbacks]
        assert names == [
            "TofuEvaluation",
            "ModelCheckpoint",
            "LatestCheckpoint",
            "ExportPretrained",
            "AttackEvaluation",
        ]
        attack = callbacks[-1]["init_args"]
        assert attack["settings"]["retain_reference"] == "runs/embedded/eval/retain90/eval.json"
        assert [a["class_path"].rsplit(".", 1)[-1] for a in attack["attacks"]] == ["Relearn"] * 2 + ["Quantize"] * 2
    base = [{"trainer": {"callbacks": [{"class_path": "a.A"}]}}, {"trainer": {"callbacks+": [{"class_path": "b.B"}]}}]
    assert [cb["class_path"] for cb in sweep._base_section(base, "callbacks")] == ["a.A", "b.B"]
    assert sweep._base_section([*base, {"trainer": {"callbacks": []}}], "callbacks") == []
