"""Running attacks on one model: what they train on and are scored on (:class:`AttackPlan`), and their records.

:func:`tofu_plan` splits the forget rows the TOFU evaluator scores into the rows relearning attacks may train on
and the held-out rows they are scored on (:mod:`.splits`), and refuses any overlap. :func:`muse_plan` gives MUSE's
relearning attacks a share of the raw forget chunks; MUSE's questions and passages cannot be held out from raw text,
so there every attack is scored on every row, and the plan's notes say so. :func:`run_attacks` evaluates the model
once unattacked, then each attack on a copy, and writes the attack directory of
:mod:`~baldro_lightning.evaluation.run_record`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Subset
from transformers import PreTrainedTokenizerBase

from baldro_lightning.data.muse import MuseCorpus, raw_chunk_dataset
from baldro_lightning.data.tofu import load_split, split_pairing
from baldro_lightning.data.tokenization import AttentionFrom, PromptTemplate, QADataset
from baldro_lightning.evaluation.engine import BenchmarkEvaluator, RowScores
from baldro_lightning.evaluation.muse import MuseEvaluator, MuseSettings
from baldro_lightning.evaluation.run_record import (
    UNATTACKED,
    UNATTACKED_HELD_OUT,
    attack_paths,
    write_attack_record,
    write_eval_json,
)
from baldro_lightning.evaluation.tofu import TofuEvaluator, TofuSettings
from baldro_lightning.robustness.attacks import Attack, AttackMaterial, Scope
from baldro_lightning.robustness.recovery import MUSE_RECOVERED, TOFU_RECOVERED, RecoveredMetric, recovery
from baldro_lightning.robustness.splits import (
    fact_key,
    held_out_scores,
    leaked_questions,
    rows_with_indices,
    split_forget_rows,
)

log = logging.getLogger(__name__)


@dataclass
class AttackPlan:
    """Everything the attacks on one model share: evaluators, training material, the split and what is compared."""

    evaluator: BenchmarkEvaluator
    """Scores every row (the scope of quantization)."""
    held_out_evaluator: BenchmarkEvaluator
    """Scores the rows relearning attacks are scored on (TOFU: the held-out forget rows)."""
    material: AttackMaterial
    """What relearning attacks train on."""
    recovered: tuple[RecoveredMetric, ...]
    """The metrics whose recovery is recorded."""
    split: dict[str, Any]
    """The forget split of the relearning attacks: fraction, seed, trained and held-out indices."""
    held_out_role: str | None = None
    """The scored role restricted to the held-out rows (TOFU ``forget``); None when nothing is held out."""
    notes: list[str] = field(default_factory=list)
    """Caveats every attack record repeats."""

    def held_out(self, scores: dict[str, RowScores]) -> dict[str, RowScores]:
        """The unattacked scores of every row, restricted to what :attr:`held_out_evaluator` scores."""
        if self.held_out_role is None:
            return scores
        rows = set(self.split["held_out_indices"])
        return {
            role: held_out_scores(part, rows) if role == self.held_out_role else part
            for role, part in scores.items()
            if role in self.held_out_evaluator.rows
        }


def _held_out_settings(settings: TofuSettings) -> TofuSettings:
    # MIA AUCs and privleak compare every forget row with the holdout, so the held-out evaluation drops them.
    groups = tuple(g for g in settings.metric_groups if g != "mia") or ("forget",)
    return dataclasses.replace(settings, metric_groups=groups)


def tofu_plan(
    benchmark: str,
    tokenizer: PreTrainedTokenizerBase,
    forget_split: str,
    settings: TofuSettings,
    forget_fraction: float,
    split_seed: int,
    model_name: str,
    template: PromptTemplate | None = None,
    max_length: int = 512,
    retain_split: str | None = None,
    attention_from: AttentionFrom = "lengths",
) -> AttackPlan:
    """The attacks' plan on TOFU: evaluators for every forget row and for the held-out ones, and the training rows.

    Args:
        benchmark: TOFU directory or Hub id.
        tokenizer: The model's tokenizer (with a pad token).
        forget_split: ``forget01``, ``forget05`` or ``forget10``.
        settings: How each evaluation runs (with the retain reference for forget quality).
        forget_fraction: Share of the scored forget facts (:func:`fact_key`) relearning attacks may train on.
        split_seed: Seeds that split.
        model_name: The attacked model's path or name.
        template: Prompt rendering (the model's training template).
        max_length: Tokens per example, for training and scoring.
        retain_split: Benign relearning's rows; the complement of the forget split when null.
        attention_from: The attention mask the model was trained with, for scoring.

    Raises:
        ValueError: a held-out row's question occurs among the rows an attack trains on.
    """
    template = template or PromptTemplate()
    evaluator = TofuEvaluator(
        benchmark, tokenizer, forget_split, template, max_length, settings, attention_from=attention_from
    )
    if "forget" not in evaluator.rows:
        raise ValueError("attacks compare forget metrics: add forget to --metric_groups")
    forget_rows = evaluator.rows["forget"]
    indices = [int(row["index"]) for row in forget_rows]
    trained, held = split_forget_rows(indices, forget_fraction, split_seed, [fact_key(row) for row in forget_rows])
    held_out = TofuEvaluator(
        benchmark,
        tokenizer,
        forget_split,
        template,
        max_length,
        _held_out_settings(settings),
        attention_from=attention_from,
        forget_indices=tuple(held),
    )
    trained_rows = rows_with_indices(forget_rows, trained)
    retain_rows = load_split(benchmark, retain_split or split_pairing(forget_split)[0])
    for name, rows in (("forget", trained_rows), (retain_split or "retain", retain_rows)):
        leaked = leaked_questions(rows, held_out.rows["forget"])
        if leaked:
            raise ValueError(
                f"{len(leaked)} held-out forget question(s) also occur in the relearning rows of {name} (e.g. "
                f"{leaked[0]!r}); the attack would be scored on rows it trained on. Deduplicate the benchmark."
            )
    material = AttackMaterial(
        model_name=model_name,
        pad_token_id=int(tokenizer.pad_token_id),
        forget_rows=QADataset(trained_rows, tokenizer, template, max_length),
        retain_rows=QADataset(retain_rows, tokenizer, template, max_length),
    )
    split = {
        "forget_fraction": forget_fraction,
        "split_seed": split_seed,
        "trained_indices": trained,
        "held_out_indices": held,
        "unit": "facts: rows with the same paraphrased question and answer are on one side",
        "checked": "no held-out question occurs among the relearning rows (forget share and retain rows)",
    }
    return AttackPlan(evaluator, held_out, material, TOFU_RECOVERED, split, held_out_role="forget")


def muse_plan(
    benchmark: str,
    tokenizer: PreTrainedTokenizerBase,
    corpus: MuseCorpus,
    settings: MuseSettings,
    forget_fraction: float,
    split_seed: int,
    model_name: str,
    chunk_length: int = 2048,
    forget_split: str = "raw/forget",
    retain_split: str = "raw/retain1",
    template: PromptTemplate | None = None,
    max_length: int = 2048,
    attention_from: AttentionFrom = "lengths",
) -> AttackPlan:
    """The attacks' plan on MUSE: relearning trains on a seeded share of the raw forget chunks; every row is scored.

    Args:
        benchmark: MUSE directory or Hub id.
        tokenizer: The model's tokenizer.
        corpus: ``news`` or ``books``.
        settings: How each evaluation runs.
        forget_fraction: Share of the forget chunks relearning attacks train on.
        split_seed: Seeds that share.
        model_name: The attacked model's path or name.
        chunk_length: Tokens per training chunk after BOS.
        forget_split: Raw forget text.
        retain_split: Raw retain text (benign relearning).
        template: KnowMem prompt rendering.
        max_length: Most target tokens of a teacher-forced evaluation text.
        attention_from: The attention mask the model was trained with, for scoring.
    """
    evaluator = MuseEvaluator(
        benchmark, tokenizer, corpus, template or PromptTemplate(), max_length, settings, attention_from=attention_from
    )
    forget = raw_chunk_dataset(benchmark, corpus, forget_split, tokenizer, chunk_length)
    retain = raw_chunk_dataset(benchmark, corpus, retain_split, tokenizer, chunk_length)
    trained, unused = split_forget_rows(list(range(len(forget))), forget_fraction, split_seed)
    material = AttackMaterial(model_name, int(tokenizer.pad_token_id), Subset(forget, trained), retain)
    split = {
        "forget_fraction": forget_fraction,
        "split_seed": split_seed,
        "trained_indices": trained,
        "held_out_indices": unused,
        "unit": f"chunks of {forget_split}",
    }
    notes = [
        f"MUSE: relearning trains on {len(trained)} of {len(forget)} {forget_split} chunks; KnowMem, VerbMem and "
        "PrivLeak rows cannot be held out from raw text, so every attack is scored on every row"
    ]
    return AttackPlan(evaluator, evaluator, material, MUSE_RECOVERED, split, held_out_role=None, notes=notes)


def _result(evaluator: BenchmarkEvaluator, model: nn.Module, model_name: str, scores: dict[str, RowScores]) -> dict:
    return {"meta": evaluator.meta(model, model_name), "metrics": evaluator.aggregate(scores)}


def check_names(attacks: Sequence[Attack]) -> None:
    """Every attack needs its own name (its directory); raises ValueError naming the repeated ones."""
    names = [attack.name for attack in attacks]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if not attacks:
        raise ValueError("no attacks given; list at least one (Relearn or Quantize)")
    if repeated or any(name in (UNATTACKED, UNATTACKED_HELD_OUT) for name in names):
        raise ValueError(f"attack names {repeated or names} repeat or are reserved; give each a distinct `label`")


def run_attacks(
    model: nn.Module, attacks: Sequence[Attack], plan: AttackPlan, out_dir: str | Path, model_name: str | None = None
) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` unattacked, then after each attack (on its own copy); write the attack directory.

    Args:
        model: The unlearned model; it is not changed.
        attacks: The attacks, each with a distinct name.
        plan: Evaluators, training material and split (:func:`tofu_plan`, :func:`muse_plan`).
        out_dir: The attack directory (:func:`~baldro_lightning.evaluation.run_record.attack_paths`).
        model_name: Recorded as the model; the plan's ``model_name`` when null.

    Returns:
        Each attack's record (``{"meta", "recovery"}``), by name.
    """
    check_names(attacks)
    name = model_name or plan.material.model_name
    out = Path(out_dir)
    scores = plan.evaluator.score(model)
    before: dict[Scope, dict[str, Any]] = {"all": _result(plan.evaluator, model, name, scores)}
    write_eval_json(before["all"], attack_paths(out, UNATTACKED)["eval"])
    if any(attack.scored_on == "held_out" for attack in attacks):
        before["held_out"] = _result(plan.held_out_evaluator, model, name, plan.held_out(scores))
        write_eval_json(before["held_out"], attack_paths(out, UNATTACKED_HELD_OUT)["eval"])
    records = {}
    for attack in attacks:
        started = time.perf_counter()
        attacked = copy.deepcopy(model)
        details = attack.apply(attacked, plan.material)
        evaluator = plan.held_out_evaluator if attack.scored_on == "held_out" else plan.evaluator
        after = evaluator.evaluate(attacked, name)
        del attacked
        after["meta"]["attack"] = {"name": attack.name, "kind": type(attack).__name__, **details}
        paths = attack_paths(out, attack.name)
        write_eval_json(after, paths["eval"])
        aggregate, per_sample = recovery(before[attack.scored_on], after, plan.recovered)
        unattacked = UNATTACKED_HELD_OUT if attack.scored_on == "held_out" else UNATTACKED
        meta = {
            "attack": attack.name,
            "kind": type(attack).__name__,
            "settings": dataclasses.asdict(attack),
            "model": name,
            "benchmark": str(getattr(plan.evaluator, "benchmark", "")),
            "scored_on": attack.scored_on,
            "scored_rows": after["meta"].get("rows"),
            "details": details,
            "relearning_split": plan.split if attack.scored_on == "held_out" else None,
            "before": str(Path("..") / unattacked / attack_paths(out, unattacked)["eval"].name),
            "after": paths["eval"].name,
            "notes": list(plan.notes),
            "elapsed_s": round(time.perf_counter() - started, 3),
            **{key: before["all"]["meta"].get(key) for key in ("forget_split", "corpus", "retain_reference")},
        }
        record = {"meta": meta, "recovery": aggregate}
        write_attack_record(out, attack.name, record, per_sample)
        records[attack.name] = record
        log.info("attack %s: %s", attack.name, {k: round(v["delta"], 4) for k, v in aggregate.items()})
    return records
