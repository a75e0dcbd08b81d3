"""Report: paper-style tables from hand-made run directories, the selection rule, Fluency, MUSE and figures."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import yaml

from baldro_lightning.analysis import report
from baldro_lightning.analysis.figures import _attack_panel
from baldro_lightning.analysis.runs import AttackRow
from baldro_lightning.evaluation.run_record import write_attack_record

LOSSES = {"NPO": "NPO", "GradAscent": "GradAscent", "SimNPO": "SimNPO"}
SYNC = {
    "forget_step_median": 4.0,
    "forget_step_iqr": 2.0,
    "forget_step_std": 1.5,
    "fraction_never_forgotten": 0.25,
    "fraction_over_forgotten": 0.0,
    "criterion": "truth_ratio",
    "forget_step_by_index": {"0": 2.0, "1": 4.0, "2": None, "3": 6.0},
}


def tofu_metrics(fq: float | None, mu: float, base: float = 0.1) -> dict[str, float]:
    """Every Table 1/3 metric; the others are ``base`` + a fixed offset so each column is recognisable."""
    values = {"model_utility": mu}
    if fq is not None:
        values["forget_quality"] = fq
    keys = [key for _, key in report.TABLE1[3:] + report.TABLE3]
    values.update({key: round(base + 0.01 * k, 4) for k, key in enumerate(keys)})
    return values


def make_run(
    root: Path,
    name: str,
    evals: dict[int, dict[str, float]],
    loss: str = "NPO",
    objective: str = "Mean",
    split: str = "forget01",
    lr: float = 1e-3,
    tau: float | None = None,
    alpha: float = 1.0,
    retain_reference: Path | None = None,
    per_sample: bool = False,
) -> Path:
    run = root / name
    logdir = run / "tensorboard"
    logdir.mkdir(parents=True)
    objective_args = {"tau": tau, "sign": "paper"} if objective == "DV" else {}
    config = {
        "trainer": {"max_epochs": 3, "accumulate_grad_batches": 1},
        "model": {
            "class_path": "baldro_lightning.train.module.UnlearningModule",
            "init_args": {
                "forget_loss": {"class_path": f"baldro_lightning.train.losses.{loss}"},
                "retain_loss": None if alpha == 0 else {"class_path": "baldro_lightning.train.losses.NLL"},
                "forget_objective": {
                    "class_path": f"baldro_lightning.train.objectives.{objective}",
                    "init_args": objective_args,
                },
                "alpha": alpha,
                "gamma": 1.0,
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}},
            },
        },
        "data": {"init_args": {"batch_size": 8, "forget_split": split}},
    }
    (logdir / "config.yaml").write_text(yaml.safe_dump(config))
    for step, metrics in evals.items():
        meta = {
            "global_step": step,
            "forget_split": split,
            "retain_reference": retain_reference and str(retain_reference),
        }
        data = {"meta": meta, "metrics": {k: {"agg_value": v, "value_by_index": {}} for k, v in metrics.items()}}
        data["metrics"]["forget_Q_A_ROUGE"] = {
            "agg_value": 0.5,
            "value_by_index": {"0": {"generation": "born in a city"}, "1": {"generation": "zz qq xx"}},
        }
        data["synchrony"] = SYNC
        out = logdir / "eval" / f"step_{step:06d}" / "eval.json"
        out.parent.mkdir(parents=True)
        out.write_text(json.dumps(data))
    if per_sample:
        lines = ["step,index,log_ppl_ratio,truth_ratio,rougeL_recall,dro_weight,forget_step"]
        for step in evals:
            lines += [f"{step},{i},{0.1 * step * (i + 1)},{0.1 + 0.05 * step},0.5,0.25,{2 * i}" for i in range(4)]
        (logdir / "eval" / "per_sample.csv").write_text("\n".join(lines) + "\n")
    return run


def write_eval(path: Path, metrics: dict[str, float], **meta) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "metrics": {k: {"agg_value": v} for k, v in metrics.items()}}))
    return path


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["Method"]: row for row in csv.DictReader(handle)}


@pytest.fixture
def sweep_root(tmp_path) -> Path:
    """forget01: two NPO runs (one above, one below the MU threshold 0.9 x 0.60), NPO + DV, and GA below it."""
    root = tmp_path / "sweep"
    retain = write_eval(
        tmp_path / "retain99" / "eval.json", tofu_metrics(None, 0.62, base=0.3), forget_split="forget01"
    )
    original = tofu_metrics(0.001, 0.60, base=0.9)
    make_run(root, "npo__lr-a", {0: original, 6: tofu_metrics(0.5, 0.56, 0.2)}, retain_reference=retain)
    make_run(root, "npo__lr-b", {0: original, 6: tofu_metrics(0.9, 0.40, 0.4)}, lr=1e-2, retain_reference=retain)
    make_run(root, "npo_dv", {0: original, 6: tofu_metrics(0.99, 0.58, 0.5)}, objective="DV", tau=2.0)
    make_run(root, "ga", {0: original, 6: tofu_metrics(0.8, 0.1, 0.6)}, loss="GradAscent", alpha=0.0)
    make_run(root, "npo__lr-c", {0: original})  # stopped before its first update
    return root


def test_table1_layout_values_and_default_rule(sweep_root, tmp_path):
    out = tmp_path / "report"
    rule = report.SelectionRule()
    md = report.write_report(report.load_runs([sweep_root]), out, rule, figures=False).read_text()
    table = read_csv(out / "table1_forget01.csv")
    assert list(next(iter(table.values())))[:10] == [
        "Method",
        "FQ",
        "MU",
        "EM",
        "ES",
        "F-TR",
        "Ra-TR",
        "R-TR",
        "Rw-TR",
        "run",
    ]
    assert list(table) == ["Original", "Retain", "GradAscent", "NPO", "NPO + BalDRO-DV"]
    # NPO: lr-b has the higher FQ but MU 0.40 < 0.9 x 0.60, so lr-a is selected; its EM is base 0.2.
    assert float(table["NPO"]["FQ"]) == 0.5 and float(table["NPO"]["EM"]) == 0.2
    assert table["NPO"]["run"].endswith("npo__lr-a")
    assert float(table["NPO + BalDRO-DV"]["FQ"]) == 0.99
    assert float(table["Original"]["MU"]) == 0.6 and float(table["Original"]["FQ"]) == 0.001
    assert float(table["Retain"]["FQ"]) == 1.0 and float(table["Retain"]["MU"]) == 0.62
    assert "| GradAscent † |" in md  # no GA run reaches the threshold
    assert "MU ≥ 0.9 × MU of Original" in md and "MU threshold: 0.5400" in md
    assert "Left out (no evaluation after step 0): `npo__lr-c`." in md
    assert "Fluency is omitted" in md and "Fluency" not in (out / "table1_forget01.csv").read_text()
    # Table 3 columns are the four MIA AUCs of the same selected runs (EM..Rw-TR take offsets 0..5).
    table3 = read_csv(out / "table3_forget01.csv")
    assert float(table3["NPO"]["LOSS"]) == pytest.approx(0.2 + 0.06)
    assert float(table3["NPO"]["MinK++"]) == pytest.approx(0.2 + 0.09)
    sync = read_csv(out / "synchrony_forget01.csv")
    assert float(sync["NPO"]["forget_step_iqr"]) == 2.0
    assert "| NPO + BalDRO-DV | `npo_dv` | 0.001 | 8 | 1 | 2 | 1 | 1 | 3 |" in md


def test_table3_shows_gradnorm_and_reference_when_an_evaluation_has_them(sweep_root, tmp_path):
    """The paper's four attacks always; GradNorm and Reference (open-unlearning's other two) as soon as one row has
    them, blank where a row lacks them."""
    rule = report.SelectionRule()
    report.write_report(report.load_runs([sweep_root]), tmp_path / "plain", rule, figures=False)
    header = list(next(iter(read_csv(tmp_path / "plain" / "table3_forget01.csv").values())))
    assert header == ["Method", "LOSS", "ZLib", "MinK", "MinK++", "run"]
    extra = {**tofu_metrics(0.7, 0.59, 0.25), "mia_gradnorm": 0.61, "mia_reference": 0.47}
    make_run(sweep_root, "simnpo", {0: tofu_metrics(0.001, 0.60, base=0.9), 6: extra}, loss="SimNPO")
    md = report.write_report(report.load_runs([sweep_root]), tmp_path / "extra", rule, figures=False).read_text()
    table3 = read_csv(tmp_path / "extra" / "table3_forget01.csv")
    assert list(next(iter(table3.values()))) == [
        "Method",
        "LOSS",
        "ZLib",
        "MinK",
        "MinK++",
        "GradNorm",
        "Reference",
        "run",
    ]
    assert float(table3["SimNPO"]["GradNorm"]) == 0.61 and float(table3["SimNPO"]["Reference"]) == 0.47
    assert table3["NPO"]["GradNorm"] == ""
    assert "| Method | LOSS | ZLib | MinK | MinK++ | GradNorm | Reference |" in md


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (report.SelectionRule(rule="fq"), "npo__lr-b"),
        (report.SelectionRule(mu_min=0.3), "npo__lr-b"),
        (report.SelectionRule(rule="mu"), "npo__lr-a"),  # npo__lr-c has the higher MU, but only at step 0
    ],
)
def test_other_rules_pick_other_runs(sweep_root, tmp_path, rule, expected):
    report.write_report(report.load_runs([sweep_root]), tmp_path / "r", rule, figures=False)
    assert read_csv(tmp_path / "r" / "table1_forget01.csv")["NPO"]["run"].endswith(expected)


def test_fq_at_mu_without_original_names_the_fix(tmp_path):
    make_run(tmp_path / "s", "npo", {6: tofu_metrics(0.5, 0.5)})
    with pytest.raises(report.ReportError, match="--target_eval PATH or --mu_min VALUE"):
        report.write_report(report.load_runs([tmp_path / "s"]), tmp_path / "r", report.SelectionRule(), figures=False)


def test_missing_run_directory_is_named(tmp_path):
    with pytest.raises(report.ReportError, match="nowhere does not exist"):
        report.load_runs([tmp_path / "nowhere"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(report.ReportError, match="holds no evaluation"):
        report.load_runs([tmp_path / "empty"])


def test_fluency_column_with_a_classifier(sweep_root, tmp_path, tiny_model):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "noise", 1: "clean"},
        label2id={"noise": 0, "clean": 1},
    )
    classifier = tmp_path / "classifier"
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(classifier)
    tokenizer.save_pretrained(classifier)
    with torch.no_grad():
        batch = tokenizer(["born in a city", "zz qq xx"], padding=True, return_tensors="pt")
        expected = torch.softmax(model(**batch).logits, -1)[:, 1].mean().item()  # the "clean" label, not index 0

    out = tmp_path / "report"
    runs = report.load_runs([sweep_root])
    report.write_report(runs, out, report.SelectionRule(), fluency_classifier=str(classifier), figures=False)
    table = read_csv(out / "table1_forget01.csv")
    assert list(next(iter(table.values())))[3] == "Fluency"
    assert float(table["NPO"]["Fluency"]) == pytest.approx(expected, rel=1e-5)
    assert float(table["Original"]["Fluency"]) == pytest.approx(expected, rel=1e-5)


def test_muse_table2(tmp_path):
    root = tmp_path / "muse"
    muse = {"retain_knowmem_ROUGE": 0.45, "forget_knowmem_ROUGE": 0.5, "forget_verbmem_ROUGE": 0.3, "privleak": -60.0}
    for corpus in ("news", "books"):
        run = make_run(root, f"npo_{corpus}", {})
        write_eval(run / "eval.json", {**muse, "forget_verbmem_ROUGE": 0.3 if corpus == "news" else 0.2}, corpus=corpus)
        worse = make_run(root, f"npo_{corpus}_b", {})
        write_eval(worse / "eval.json", {**muse, "forget_verbmem_ROUGE": 0.9}, corpus=corpus)
    target = write_eval(tmp_path / "t.json", {**muse, "retain_knowmem_ROUGE": 0.5, "privleak": -99.0}, corpus="news")
    out = tmp_path / "report"
    targets = report._evals_by([str(target)], "corpus", "--muse_target_eval")
    md = report.write_report(
        report.load_runs([root]), out, report.SelectionRule(), muse_target_evals=targets
    ).read_text()
    table = read_csv(out / "table2_muse.csv")
    assert list(table) == ["Original", "NPO"]
    assert float(table["NPO"]["News VM-Df"]) == 0.3 and float(table["NPO"]["Books VM-Df"]) == 0.2
    assert float(table["Original"]["News PL"]) == -99.0 and table["Original"]["Books PL"] == ""
    assert "### Table 2" in md


def test_muse_method_below_the_utility_bound_is_marked(tmp_path):
    """Every run of a method losing more than 10% of the target's KM-Dr: the table still shows one, marked †."""
    root = tmp_path / "muse"
    muse = {"retain_knowmem_ROUGE": 0.2, "forget_knowmem_ROUGE": 0.5, "forget_verbmem_ROUGE": 0.3, "privleak": -60.0}
    for name, verbmem in (("npo", 0.3), ("npo_b", 0.1)):
        write_eval(make_run(root, name, {}) / "eval.json", {**muse, "forget_verbmem_ROUGE": verbmem}, corpus="news")
    target = write_eval(tmp_path / "t.json", {**muse, "retain_knowmem_ROUGE": 0.5}, corpus="news")
    out = tmp_path / "report"
    targets = report._evals_by([str(target)], "corpus", "--muse_target_eval")
    report.write_report(report.load_runs([root]), out, report.SelectionRule(), muse_target_evals=targets)
    table = read_csv(out / "table2_muse.csv")
    assert list(table) == ["Original", "NPO †"]
    assert float(table["NPO †"]["News VM-Df"]) == 0.1


def test_figures_are_written(tmp_path):
    root = tmp_path / "grid"
    original = tofu_metrics(0.001, 0.6)
    for split in ("forget01", "forget05"):
        make_run(root, f"npo_{split}", {0: original, 3: tofu_metrics(0.2, 0.58)}, split=split, per_sample=True)
        for tau in (1.0, 2.0):
            for alpha in (0.5, 1.0):
                metrics = tofu_metrics(0.1 * tau * alpha, 0.55 + 0.01 * alpha)
                name = f"npo_dv_{split}_{tau}_{alpha}"
                make_run(
                    root, name, {0: original, 3: metrics}, "NPO", "DV", split, tau=tau, alpha=alpha, per_sample=True
                )
    out = tmp_path / "report"
    md = report.write_report(report.load_runs([root]), out, report.SelectionRule()).read_text()
    expected = {
        "fig_fq_vs_mu.png",
        "fig4_beta_lambda_forget01_NPO_BalDRO-DV.png",
        "fig4_beta_lambda_forget05_NPO_BalDRO-DV.png",
        "fig1a_curves_forget01_NPO.png",
        "fig1b_forget_steps_forget05.png",
        "fig3_forget_ratio.png",
    }
    written = {p.name for p in out.glob("*.png")}
    assert expected <= written
    for name in expected:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in md
    # The best DV cell: highest FQ (0.1 x 2 x 1) with MU 0.56 >= 0.54.
    assert read_csv(out / "table1_forget01.csv")["NPO + BalDRO-DV"]["run"].endswith("npo_dv_forget01_2.0_1.0")


def test_command_line(sweep_root, tmp_path, capsys):
    assert report.main([str(sweep_root / "npo__lr-a"), str(sweep_root / "npo_dv"), "--out", str(tmp_path / "o")]) == 0
    assert "wrote" in capsys.readouterr().out
    runs = list(csv.DictReader(open(tmp_path / "o" / "runs.csv")))
    assert [r["run"] for r in runs] == ["npo__lr-a", "npo_dv"]
    assert runs[1]["beta"] == "2.0" and runs[1]["variant"] == "BalDRO-DV"


def test_forgetting_balance_table_and_figure(tmp_path):
    """NPO forgets its four rows unevenly (0.3, 0.6, 0.9, 1.2 at step 3), NPO + DV evenly (0.5 each)."""
    root = tmp_path / "grid"
    original = tofu_metrics(0.001, 0.6)
    make_run(root, "npo", {0: original, 3: tofu_metrics(0.2, 0.58)}, per_sample=True)
    dv = make_run(root, "npo_dv", {0: original, 3: tofu_metrics(0.2, 0.58)}, objective="DV", tau=2.0, per_sample=True)
    # The former layout (log_likelihood_ratio = -log_ppl_ratio) still reads: DV's rows as such a file.
    lines = ["step,index,log_likelihood_ratio,truth_ratio,rougeL_recall,dro_weight,forget_step"]
    lines += [f"{step},{i},{-0.5 * step / 3},0.1,0.5,0.25," for step in (0, 3) for i in range(4)]
    (dv / "tensorboard" / "eval" / "per_sample.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"

    md = report.write_report(report.load_runs([root]), out, report.SelectionRule()).read_text()

    assert "### Forgetting balance (forget01)" in md
    rows = read_csv(out / "balance_forget01.csv")
    npo, npo_dv = rows["NPO"], rows["NPO + BalDRO-DV"]
    std = math.sqrt(((0.45**2) + (0.15**2)) * 2 / 4)  # deviations from the mean 0.75: ±0.45, ±0.15
    assert float(npo["mean"]) == pytest.approx(0.75) and float(npo["std"]) == pytest.approx(std, abs=1e-4)
    assert float(npo["CV"]) == pytest.approx(std / 0.75, abs=1e-4)
    assert float(npo["bottom-10% share"]) == pytest.approx(0.3 / 0.75, abs=1e-4)
    assert (float(npo_dv["std"]), float(npo_dv["bottom-10% share"])) == (0.0, 1.0)
    # Matched at the smaller final mean, 0.5: NPO's mean passes it two thirds of the way from step 0 to step 3.
    assert float(npo["matched mean"]) == float(npo_dv["matched mean"]) == 0.5
    assert float(npo["std at matched mean"]) == pytest.approx(std * 2 / 3, abs=1e-4)
    assert float(npo_dv["std at matched mean"]) == 0.0
    assert (out / "fig1c_balance_forget01.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(fig1c_balance_forget01.png)" in md
    every_run = {row["run"]: row for row in csv.DictReader(open(out / "runs.csv"))}
    assert float(every_run["npo"]["forgetting_cv"]) == pytest.approx(std / 0.75, abs=1e-4)
    assert float(every_run["npo_dv"]["forgetting_std"]) == 0.0


def test_utility_at_matched_forgetting(tmp_path):
    """NPO reaches EM 0.8 at MU 0.5, NPO + DV stops at EM 0.9 with MU 0.66; both are read at EM 0.9."""
    root = tmp_path / "grid"
    start = {**tofu_metrics(0.001, 0.7), "exact_memorization": 1.0}
    make_run(root, "npo", {0: start, 3: {**tofu_metrics(0.2, 0.5), "exact_memorization": 0.8}}, per_sample=True)
    dv_end = {**tofu_metrics(0.2, 0.66), "exact_memorization": 0.9}
    make_run(root, "npo_dv", {0: start, 3: dv_end}, objective="DV", tau=2.0, per_sample=True)
    out = tmp_path / "report"

    md = report.write_report(report.load_runs([root]), out, report.SelectionRule()).read_text()

    assert "### Utility at matched forgetting (forget01)" in md
    rows = read_csv(out / "tradeoff_forget01.csv")
    assert float(rows["NPO"]["matched EM"]) == float(rows["NPO + BalDRO-DV"]["matched EM"]) == 0.9
    # NPO's EM passes 0.9 halfway between its evaluations at steps 0 and 3.
    assert float(rows["NPO"]["MU at matched EM"]) == pytest.approx(0.6)
    assert float(rows["NPO"]["step at matched EM"]) == pytest.approx(1.5)
    dv = rows["NPO + BalDRO-DV"]
    assert (float(dv["MU at matched EM"]), float(dv["step at matched EM"])) == (0.66, 3.0)
    assert (out / "fig_tradeoff_forget01.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_robustness_table_and_figure_from_attack_records(tmp_path):
    """Two NPO runs (seeds) whose relearn_forget records give forget probability 0.1 -> 0.3 and 0.2 -> 0.6: the
    row shows the means 0.15 -> 0.45 and the sd of the change, sqrt(((0.2 - 0.3)^2 + (0.4 - 0.3)^2) / 1) = 0.1414;
    an NPO + BalDRO-DV run attacked once has no sd. A run without attacks adds no row."""

    def attacked(name: str, objective: str, records: dict[str, tuple[float, float]]) -> None:
        run = make_run(
            tmp_path / "runs",
            name,
            {0: tofu_metrics(0.01, 0.6), 5: tofu_metrics(0.5, 0.55)},
            objective=objective,
            tau=2.0,
        )
        for attack, (before, after) in records.items():
            recovery = {
                "forget_Q_A_Prob": {"before": before, "after": after, "delta": after - before},
                "forget_quality": {"before": 0.5, "after": None, "delta": None},
            }
            write_attack_record(run / "tensorboard" / "attacks", attack, {"meta": {}, "recovery": recovery}, [])

    attacked("npo_s0", "Mean", {"relearn_forget": (0.1, 0.3), "quantize_int4": (0.1, 0.1)})
    attacked("npo_s1", "Mean", {"relearn_forget": (0.2, 0.6), "quantize_int4": (0.2, 0.25)})
    attacked("npo_dv", "DV", {"relearn_forget": (0.05, 0.07)})
    make_run(tmp_path / "runs", "gd", {0: tofu_metrics(0.01, 0.6), 5: tofu_metrics(0.4, 0.5)}, loss="GradAscent")
    out = tmp_path / "out"
    report.write_report(report.load_runs([tmp_path / "runs"]), out, report.SelectionRule(rule="fq"))
    with open(out / "robustness_forget01.csv") as handle:
        rows = {(r["Method"], r["Attack"]): r for r in csv.DictReader(handle)}
    assert set(rows) == {("NPO", "relearn_forget"), ("NPO", "quantize_int4"), ("NPO + BalDRO-DV", "relearn_forget")}
    npo = rows[("NPO", "relearn_forget")]
    assert npo["runs"] == "2"
    assert float(npo["forget_Q_A_Prob_before_mean"]) == pytest.approx(0.15)
    assert float(npo["forget_Q_A_Prob_after_mean"]) == pytest.approx(0.45)
    assert float(npo["forget_Q_A_Prob_delta_sd"]) == pytest.approx(math.sqrt(0.02))
    assert rows[("NPO + BalDRO-DV", "relearn_forget")]["forget_Q_A_Prob_delta_sd"] == "nan"
    text = (out / "report.md").read_text()
    assert "### Robustness: attacks on the unlearned model (TOFU forget01)" in text
    assert "| NPO | `relearn_forget` | 2 |" in text and "0.1500 → 0.4500 (±0.1414)" in text
    assert (out / "fig_robustness_forget01.png").is_file()


def test_a_zero_utility_input_is_named_with_the_nine_inputs(tmp_path):
    """A tiny model on real TOFU answers no real-authors question: Ra-ROUGE 0 makes every MU 0."""
    root = tmp_path / "grid"
    zero = {**tofu_metrics(0.001, 0.0), "ra_Q_A_ROUGE": 0.0}
    make_run(root, "npo", {0: zero, 3: {**tofu_metrics(0.2, 0.0), "ra_Q_A_ROUGE": 0.0}})
    make_run(root, "npo_dv", {0: zero, 3: {**tofu_metrics(0.3, 0.0), "ra_Q_A_ROUGE": 0.0}}, objective="DV", tau=2.0)
    out = tmp_path / "report"
    md = report.write_report(report.load_runs([root]), out, report.SelectionRule(), figures=False).read_text()
    assert "### Model utility's inputs (forget01)" in md
    assert "Zero here: Ra-ROUGE;" in md
    section = md.split("### Model utility's inputs (forget01)")[1].split("###")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][2:]  # after the header and the rule
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == ["Original", "NPO", "NPO + BalDRO-DV"]
    assert all(row.split(" | ")[5] == "**0.0000**" for row in rows)  # the Ra-ROUGE column, flagged
    assert set(read_csv(out / "utility_inputs_forget01.csv")) == {"Original", "NPO", "NPO + BalDRO-DV"}


def test_no_utility_inputs_table_without_a_zero_input(tmp_path):
    root = tmp_path / "grid"
    make_run(root, "npo", {0: tofu_metrics(0.001, 0.6), 3: tofu_metrics(0.2, 0.58)})
    md = report.write_report(report.load_runs([root]), tmp_path / "report", report.SelectionRule(), figures=False)
    assert "Model utility's inputs" not in md.read_text()


def test_robustness_panels_are_labelled_by_their_metric():
    """Each panel's y axis names the metric it shows; the bars' legend says unattacked/attacked."""
    row = AttackRow(
        ("NPO", ""), "relearn_forget", 2, {"forget_Q_A_Prob": {"before": (0.1, 0.01), "after": (0.3, 0.02)}}
    )
    fig, ax = plt.subplots()
    _attack_panel(ax, [row], "forget_Q_A_Prob", "forget probability", log=False)
    assert ax.get_ylabel() == "forget probability"
    assert ax.get_legend_handles_labels()[1] == ["unattacked", "attacked"]
    plt.close(fig)
