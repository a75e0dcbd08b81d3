"""TOFU evaluation of a causal LM: the splits of one forget split, their per-row values and metrics (methods §3).

The evaluator works in two steps so that rows can be split across ranks:

1. :meth:`TofuEvaluator.score` runs the model on a list of rows per split and returns
   :class:`~baldro_lightning.evaluation.engine.RowScores`: plain per-row numbers and strings (mean NLLs, MIA
   scores, ES/EM, generations, ROUGE), nothing model-sized.
2. :meth:`TofuEvaluator.aggregate` turns the per-row values of all rows into the metrics of methods §3.2-§3.6, in
   open-unlearning's layout ``{metric: {"agg_value", "value_by_index"}}`` keyed by the dataset row index.

Every likelihood needed by a split (the answer, the paraphrased answer and the K perturbed answers of every
row, and the holdout answers) is one example in a single pool, scored by
:func:`~baldro_lightning.evaluation.engine.score_examples`; generation for ROUGE is
:func:`~baldro_lightning.evaluation.engine.generate_answers`. How an evaluation runs (metric groups, retain
reference, batch sizes, generation length, row limits) is one :class:`TofuSettings`, shared by the evaluator, the
in-training callback and ``python -m baldro_lightning evaluate``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from baldro_lightning.data.tofu import load_split, split_pairing
from baldro_lightning.data.tokenization import (
    IGNORE_INDEX,
    AttentionFrom,
    EncodedExample,
    PromptTemplate,
    encode_examples,
    encode_prompts,
)
from baldro_lightning.evaluation import metrics
from baldro_lightning.evaluation.engine import (
    GENERATION_NOTE,
    MIA_ATTACKS,
    MINK_FRACTION,
    AnswerExample,
    BenchmarkEvaluator,
    Engine,
    ExampleScore,
    RowScores,
    collector_paused,
    extra_attack_problems,
    generate_answers,
    mia_entries,
    nan_mean,
    score_examples,
    settings_problems,
    tokenizer_problems,
    values_by_index,
)
from baldro_lightning.evaluation.gradient_norms import GRADNORM_P, gradient_norms
from baldro_lightning.evaluation.greedy import choose_engines, draft_of, greedy_generate
from baldro_lightning.evaluation.model_calls import PROMPT_CACHE_BYTES, PromptCaches
from baldro_lightning.evaluation.prefix_scoring import score_groups
from baldro_lightning.evaluation.run_record import (
    EvalLogError,
    describe_indices,
    question_digest,
    reference_min_k_auc,
    reference_row_losses,
    reference_truth_ratios,
)
from baldro_lightning.train.models import eval_mode

log = logging.getLogger(__name__)

MetricGroup = Literal["forget", "retain", "ra", "wf", "mia", "mia_gradnorm", "mia_reference"]
"""Groups of metrics: forget-set metrics, retain_perturbed, real authors, world facts, membership inference (LOSS,
ZLib, MinK, MinK++, PrivLeak); and two more attacks on top of ``mia``, asked for by name: ``mia_gradnorm`` (one
backward pass per row) and ``mia_reference`` (against the retain reference's per-row losses)."""

Role = Literal["forget", "retain", "ra", "wf", "holdout"]
"""What a split is used for in one evaluation."""

ALL_GROUPS: tuple[MetricGroup, ...] = get_args(MetricGroup)
DEFAULT_GROUPS: tuple[MetricGroup, ...] = ("forget", "retain", "ra", "wf", "mia")
"""What an evaluation computes unless told otherwise: every group but the two extra attacks."""


@dataclass(frozen=True)
class TofuSettings:
    """How a TOFU evaluation runs: every option but the data (benchmark, forget split, prompt template, max_length)."""

    metric_groups: tuple[MetricGroup, ...] = DEFAULT_GROUPS
    """Which groups of metrics to compute: forget, retain, ra (real authors), wf (world facts), mia; and, with mia,
    mia_gradnorm (per-row gradient norms, one backward pass per row) and mia_reference (needs retain_reference)."""
    retain_reference: str | None = None
    """eval.json of the retain model on the same forget split and rows: enables forget_quality, the privleak
    reference AUC and the truth-ratio forgetting criterion."""
    batch_size: int = 32
    """Examples per likelihood forward (answers, paraphrases and perturbed answers are all examples)."""
    generation_batch_size: int | None = None
    """Prompts per generate call; batch_size when unset. The prompt_cache engine decodes more rows at once when their
    key/value cache fits in 256 MiB (:data:`~baldro_lightning.evaluation.greedy.DECODE_BYTES`)."""
    max_new_tokens: int = 200
    """Greedy generation length for ROUGE (methods §3.2)."""
    rouge_rows_limit: int | None = None
    """Generate for only the first N rows of each split (null: all); ROUGE then covers those rows, the same ones
    however the rows are sharded across ranks."""
    limit: int | None = None
    """Evaluate only the first N rows of each split (smoke runs); a retain reference must use the same limit."""
    engine: Engine = "prompt_cache"
    """prompt_cache: each question's prompt (and any stretch its answers share) runs once for all its answers, and
    greedy tokens that the scored answers already prove are not decoded again; per_example: whole examples and
    model.generate, the evaluator before issue 18, kept as the reference. Values agree within float rounding."""

    def __post_init__(self) -> None:
        # One order-preserving copy of each group: a tuple whatever sequence was given (YAML gives lists).
        object.__setattr__(self, "metric_groups", tuple(dict.fromkeys(self.metric_groups)))
        problems = settings_problems(
            self, ALL_GROUPS, ("batch_size", "max_new_tokens"), ("generation_batch_size", "rouge_rows_limit", "limit")
        )
        problems += extra_attack_problems(self.metric_groups, "mia", self.retain_reference)
        if problems:
            raise ValueError("TofuSettings are invalid: " + "; ".join(problems))


@dataclass(frozen=True)
class RolePlan:
    """What is computed for every row of one split."""

    role: Role
    """The split's use in this evaluation."""
    split: str
    """TOFU config name, e.g. ``forget10_perturbed``."""
    paraphrased: bool = False
    """Score ``paraphrased_answer`` (the correct answer of the forget/retain truth ratio)."""
    perturbed: bool = False
    """Score every ``perturbed_answer``."""
    token_stats: bool = False
    """MinK, MinK++, ZLib, ES and EM from the answer."""
    generate: bool = False
    """Greedy generation and ROUGE against the answer."""


@dataclass
class TofuEvaluator(BenchmarkEvaluator):
    """Evaluates a causal LM on the TOFU splits that go with ``forget_split`` (methods §3.2-§3.6)."""

    benchmark: str
    """Directory of ``{split}.jsonl`` files, or a Hub dataset id (``locuslab/TOFU``)."""
    tokenizer: PreTrainedTokenizerBase
    """The model's tokenizer, with a pad token (``load_tokenizer`` sets one)."""
    forget_split: str = "forget10"
    """``forget01``, ``forget05`` or ``forget10``; fixes the paired retain/holdout splits."""
    template: PromptTemplate = field(default_factory=PromptTemplate)
    """Prompt rendering; must be the one the model was trained with."""
    max_length: int = 512
    """Most tokens per likelihood example (methods §1.2)."""
    settings: TofuSettings = field(default_factory=TofuSettings)
    """How the evaluation runs: metric groups, retain reference, batch sizes, generation length, row limits."""
    attention_from: AttentionFrom = "lengths"
    """The attention mask, as in training: ``lengths`` or the reference's ``pad_ids`` (methods P-14)."""
    forget_indices: tuple[int, ...] | None = None
    """Score only these forget rows (row indices, within ``settings.limit``), e.g. the rows a relearning attack held
    out; forget quality compares them with the retain reference's same rows. None: every forget row."""

    def __post_init__(self) -> None:
        problems = tokenizer_problems(self.tokenizer)
        if self.forget_indices is not None and "mia" in self.settings.metric_groups:
            problems.append(
                "forget_indices scores a subset of the forget rows, but the mia group compares all forget rows with "
                "the holdout (and the retain reference's AUC); drop mia from metric_groups"
            )
        if problems:
            raise ValueError("TofuEvaluator inputs are invalid: " + "; ".join(problems))
        self.retain_split, self.holdout_split, self.perturbed_split = split_pairing(self.forget_split)
        self.rows = {plan.role: self._load(plan.split) for plan in self.plans()}
        if self.forget_indices is not None and "forget" in self.rows:
            self.rows["forget"] = self._only_rows(self.rows["forget"], self.forget_indices)
        self.notes: list[str] = []
        self.row_notes: list[str] = []
        self._encoded: dict[tuple[str, str], EncodedExample] = {}
        self._prompts: dict[str, list[int]] = {}
        self._reference_tr: np.ndarray | None = None
        self._reference_auc: float | None = None
        self._reference_losses: tuple[dict[int, float], dict[int, float]] | None = None
        self._check_reference()

    # -- set-up -------------------------------------------------------------------------------------------------

    def plans(self) -> list[RolePlan]:
        """The splits this evaluation reads and what is computed on each."""
        groups = set(self.settings.metric_groups)
        plans = []
        if groups & {"forget", "mia"}:
            forget = "forget" in groups
            plans.append(RolePlan("forget", self.perturbed_split, forget, forget, token_stats=True, generate=forget))
        if "retain" in groups:
            plans.append(RolePlan("retain", "retain_perturbed", paraphrased=True, perturbed=True, generate=True))
        if "ra" in groups:
            plans.append(RolePlan("ra", "real_authors_perturbed", perturbed=True, generate=True))
        if "wf" in groups:
            plans.append(RolePlan("wf", "world_facts_perturbed", perturbed=True, generate=True))
        if "mia" in groups:
            plans.append(RolePlan("holdout", self.holdout_split, token_stats=True))
        return plans

    def _load(self, split: str) -> list[dict[str, Any]]:
        rows = load_split(self.benchmark, split)
        return rows if self.settings.limit is None else rows[: self.settings.limit]

    def _only_rows(self, rows: list[dict[str, Any]], indices: Sequence[int]) -> list[dict[str, Any]]:
        """The rows of ``rows`` whose index is in ``indices``, in row order; every index must be there."""
        wanted = {int(i) for i in indices}
        missing = wanted - {int(row["index"]) for row in rows}
        if missing:
            raise ValueError(
                f"forget_indices {sorted(missing)[:6]} are not rows of {self.perturbed_split} (limit "
                f"{self.settings.limit}); choose indices among its {len(rows)} rows"
            )
        return [row for row in rows if int(row["index"]) in wanted]

    def _check_reference(self) -> None:
        """Validate the retain reference now, before any model time is spent."""
        reference, groups = self.settings.retain_reference, self.settings.metric_groups
        if reference is None:
            if "forget" in groups:
                self.notes.append("forget_quality not computed: no retain reference (--retain_reference) was given")
            if "mia" in groups:
                self.notes.append("privleak uses the default reference AUC 0.5 (no retain reference, methods P-23)")
            return
        if "forget" in groups:
            forget_rows = self.rows["forget"]
            self._reference_tr = reference_truth_ratios(
                reference,
                self.forget_split,
                len(forget_rows),
                [row["index"] for row in forget_rows],
                # A digest covers the reference's whole split: a subset's questions cannot be checked against it.
                None if self.forget_indices is not None else [row["question"] for row in forget_rows],
                str(self.benchmark),
                subset=self.forget_indices is not None,
            )
        if "mia" in groups:
            counts = {
                split: len(self.rows[role])
                for role, split in (("forget", self.perturbed_split), ("holdout", self.holdout_split))
            }
            self._reference_auc = reference_min_k_auc(reference, self.forget_split, counts)
            if self._reference_auc is None:
                self.notes.append(f"privleak uses the default reference AUC 0.5: {reference} has no mia_min_k")
                log.warning("%s has no mia_min_k AUC; privleak falls back to the reference AUC 0.5", reference)
        if "mia_reference" in groups:
            members, nonmembers = ([int(r["index"]) for r in self.rows[role]] for role in ("forget", "holdout"))
            losses = reference_row_losses(reference, members, nonmembers, forget_split=self.forget_split)
            self._reference_losses = (
                dict(zip(members, losses[0], strict=True)),
                dict(zip(nonmembers, losses[1], strict=True)),
            )

    # -- step 1: per-row values ---------------------------------------------------------------------------------

    def score(
        self,
        model: nn.Module,
        rows: Mapping[Role, Sequence[Mapping[str, Any]]] | None = None,
        synced_gpus: bool = False,
    ) -> dict[Role, RowScores]:
        """Per-row values of ``rows`` (default: all loaded rows); the model's train/eval modes are restored.

        Args:
            model: A causal LM (may be FSDP2-sharded; then every rank calls this with its share of rows, e.g. from
                :func:`~baldro_lightning.evaluation.engine.shard_rows`, and ``synced_gpus=True``).
            rows: Rows per role; roles missing here are skipped.
            synced_gpus: Keep ranks in lockstep for sharded models.

        Returns:
            :class:`RowScores` per role.
        """
        rows = self.rows if rows is None else rows
        plans = [plan for plan in self.plans() if plan.role in rows]
        with torch.no_grad(), eval_mode(model), collector_paused():
            scores = self._score(model, [(plan, list(rows[plan.role])) for plan in plans], synced_gpus)
            if "mia_gradnorm" in self.settings.metric_groups:
                self._gradnorm_columns(model, scores, rows, synced_gpus)
        return scores

    def _gradnorm_columns(
        self, model: nn.Module, scores: dict[Role, RowScores], rows: Mapping[Role, Sequence], synced_gpus: bool
    ) -> None:
        """``mia_gradnorm`` of the member (forget) and non-member (holdout) rows: one backward pass per row."""
        if synced_gpus:
            raise ValueError(
                "mia_gradnorm needs each parameter's whole gradient and cannot run on a sharded (FSDP2) model; drop it "
                "from metric_groups of the in-training evaluation and evaluate the exported model instead"
            )
        for role in ("forget", "holdout"):
            if role in scores:
                pairs = [(row["question"], row["answer"]) for row in rows[role]]
                examples = encode_examples(self.tokenizer, self.template, pairs, self.max_length, for_scoring=True)
                norms = gradient_norms(
                    model, [(e.input_ids, e.labels) for e in examples], self.tokenizer.pad_token_id, self.attention_from
                )
                scores[role].columns["mia_gradnorm"] = metrics.mia_gradnorm(norms).tolist()

    def _generated_indices(self, role: Role) -> set[int] | None:
        """Row indices that get a generation (``None``: all), decided on the whole split rather than on a shard.

        Taking the first ``rouge_rows_limit`` rows of a shard instead would generate for N rows per rank, and for
        other rows than a single process does.
        """
        if self.settings.rouge_rows_limit is None:
            return None
        return {int(row["index"]) for row in self.rows[role][: self.settings.rouge_rows_limit]}

    @staticmethod
    def _answers(plan: RolePlan, row: Mapping[str, Any]) -> list[tuple[str, bool]]:
        """A row's scored answers, each with whether it needs token statistics: the answer, the paraphrase, then
        the perturbed answers."""
        answers = [(row["answer"], plan.token_stats)]
        if plan.paraphrased:
            answers.append((row["paraphrased_answer"], False))
        if plan.perturbed:
            answers += [(wrong, False) for wrong in row["perturbed_answer"]]
        return answers

    def _encode(self, tasks: Sequence[tuple[RolePlan, Sequence[Mapping[str, Any]]]]) -> None:
        """Tokenise what ``tasks`` score and prompt that is not cached yet, in one tokenizer call per kind.

        The cache lives as long as the evaluator: an in-training evaluation scores the same rows every time.
        """
        pairs = [
            (row["question"], text) for plan, rows in tasks for row in rows for text, _ in self._answers(plan, row)
        ]
        missing = list(dict.fromkeys(pair for pair in pairs if pair not in self._encoded))
        # A question that leaves no answer token is scored as NaN and left out, not refused (encode_for_scoring).
        encoded = encode_examples(self.tokenizer, self.template, missing, self.max_length, for_scoring=True)
        self._encoded.update(zip(missing, encoded, strict=True))
        questions = list(dict.fromkeys(question for question, _ in pairs if question not in self._prompts))
        self._prompts.update(zip(questions, encode_prompts(self.tokenizer, self.template, questions), strict=True))

    def _examples(self, plan: RolePlan, row: Mapping[str, Any], draft: bool) -> list[AnswerExample]:
        """A row's scored examples (see :meth:`_answers`), all on its question."""
        encoded = [(self._encoded[(row["question"], text)], stats) for text, stats in self._answers(plan, row)]
        # An example without a labelled token proves no greedy token: it asks for no draft.
        return [
            AnswerExample(
                e.input_ids, e.labels, token_stats=stats, draft=draft and any(t != IGNORE_INDEX for t in e.labels)
            )
            for e, stats in encoded
        ]

    def _score(
        self, model: nn.Module, tasks: Sequence[tuple[RolePlan, list[Mapping[str, Any]]]], synced_gpus: bool
    ) -> dict[Role, RowScores]:
        started = time.perf_counter()
        cached_scoring, cached_generation, note = choose_engines(self.settings.engine, model, self.attention_from)
        self._note(note)
        generating: list[list[int]] = []  # per task, the row positions that get a generation
        for plan, rows in tasks:
            chosen = self._generated_indices(plan.role) if plan.generate else set()
            generating.append([p for p, row in enumerate(rows) if chosen is None or int(row["index"]) in chosen])
        self._encode(tasks)
        groups: list[list[AnswerExample]] = []
        first_group = []  # per task, its first row's group number
        for task, (plan, rows) in enumerate(tasks):
            first_group.append(len(groups))
            drafts = set(generating[task]) if cached_generation else set()
            groups += [self._examples(plan, row, p in drafts) for p, row in enumerate(rows)]
        examples = sum(len(group) for group in groups)
        log.info("scoring %d answers of %d rows", examples, len(groups))
        size, pad = self.settings.batch_size, self.tokenizer.pad_token_id
        caches = None  # the prompts of the rows that generate, kept by scoring for their generation
        if cached_scoring:
            if cached_generation:
                wanted = [first_group[task] + p for task in range(len(tasks)) for p in generating[task]]
                caches = PromptCaches(wanted, PROMPT_CACHE_BYTES)
            scored = score_groups(model, groups, size, pad, synced_gpus, caches)
        else:
            flat = [e for group in groups for e in group]
            flat = iter(score_examples(model, flat, size, pad, synced_gpus, self.attention_from))
            scored = [[next(flat) for _ in group] for group in groups]

        prompts, prompt_slots, drafts, prompt_caches = [], [], [], []
        for task, (_, rows) in enumerate(tasks):
            for position in generating[task]:
                prompt = self._prompts[rows[position]["question"]]
                group = first_group[task] + position
                prompts.append(prompt)
                prompt_caches.append(caches.kept.get(group) if caches is not None else None)
                prompt_slots.append((task, position))
                pairs = zip(groups[group], scored[group], strict=True)
                drafts.append([d for e, score in pairs if (d := draft_of(prompt, e, score)) is not None])
        if prompts:
            log.info(
                "generating answers for %d prompts (max_new_tokens=%d)", len(prompts), self.settings.max_new_tokens
            )
        generate = greedy_generate if cached_generation else generate_answers
        options = (
            {"drafts": drafts, "prompt_caches": prompt_caches}
            if cached_generation
            else {"attention_from": self.attention_from}
        )
        texts = generate(
            model,
            self.tokenizer,
            prompts,
            self.settings.generation_batch_size or self.settings.batch_size,
            self.settings.max_new_tokens,
            synced_gpus,
            **options,
        )
        generations: list[dict[int, str]] = [{} for _ in tasks]
        for (task, position), text in zip(prompt_slots, texts, strict=True):
            generations[task][position] = text

        out: dict[Role, RowScores] = {}
        for task, (plan, rows) in enumerate(tasks):
            scores = RowScores(plan.role, plan.split, [int(row["index"]) for row in rows])
            row_scores = scored[first_group[task] : first_group[task] + len(rows)]
            answers = [row[0] for row in row_scores]
            scores.columns["answer_nll"] = [a.nll_mean for a in answers]
            if plan.paraphrased:
                scores.columns["para_nll"] = [row[1].nll_mean for row in row_scores]
            if plan.perturbed:
                skip = 2 if plan.paraphrased else 1
                scores.columns["pert_nll"] = [[s.nll_mean for s in row[skip:]] for row in row_scores]
            if plan.token_stats:
                labels = [groups[first_group[task] + p][0].labels for p in range(len(rows))]
                self._token_columns(scores, answers, labels)
            if plan.generate:
                self._rouge_columns(scores, rows, generations[task])
            out[plan.role] = scores
        log.info("scored %d examples in %.1f s", examples, time.perf_counter() - started)
        return out

    def _token_columns(
        self, scores: RowScores, answers: Sequence[ExampleScore], labels: Sequence[Sequence[int]]
    ) -> None:
        token_logps = [a.token_logps for a in answers]
        nll = scores.columns["answer_nll"]
        # ZLib compresses the answer as decoded from its labelled tokens, specials skipped (methods §3.6).
        texts = [
            self.tokenizer.decode([t for t in lab if t != IGNORE_INDEX], skip_special_tokens=True) for lab in labels
        ]
        scores.columns["mia_loss"] = metrics.mia_loss(nll).tolist()
        scores.columns["mia_zlib"] = metrics.mia_zlib(nll, texts).tolist()
        scores.columns["mia_min_k"] = metrics.mia_min_k(token_logps, MINK_FRACTION).tolist()
        scores.columns["mia_min_k_plus_plus"] = metrics.mia_min_k_plus_plus(
            token_logps, [a.mu for a in answers], [a.sigma2 for a in answers], MINK_FRACTION
        ).tolist()
        preds = [a.pred_ids for a in answers]
        targets = [a.target_ids for a in answers]
        scores.columns["extraction_strength"] = metrics.extraction_strength(preds, targets).tolist()
        scores.columns["exact_memorization"] = metrics.exact_memorization(preds, targets).tolist()

    def _rouge_columns(self, scores: RowScores, rows: Sequence[Mapping[str, Any]], generated: dict[int, str]) -> None:
        positions = sorted(generated)
        rouge = metrics.rouge_scores([generated[p] for p in positions], [rows[p]["answer"].strip() for p in positions])
        names = ("generation", "rouge1_recall", "rougeL_recall", "rougeL_f1")
        columns: dict[str, list[Any]] = {name: [None] * len(rows) for name in names}
        for k, position in enumerate(positions):
            columns["generation"][position] = generated[position]
            for name in names[1:]:
                columns[name][position] = float(rouge[name][k])
        scores.columns.update(columns)

    # -- step 2: metrics over all rows --------------------------------------------------------------------------

    def aggregate(self, scores: Mapping[Role, RowScores]) -> dict[str, dict[str, Any]]:
        """Metrics in open-unlearning's layout from the per-row values of every row (methods §3.2-§3.6).

        Args:
            scores: :class:`RowScores` per role, covering all rows (join ranks' parts with
                :meth:`RowScores.concat` first).

        Returns:
            ``{metric: {"agg_value": float | None, "value_by_index": {str(index): value}}}``; MIA entries also hold
            ``holdout_value_by_index`` (non-member scores), aggregate-only metrics an empty ``value_by_index``.
        """
        out: dict[str, dict[str, Any]] = {}
        groups = set(self.settings.metric_groups)
        scores, self.row_notes, self.unscorable_rows = _without_answerless_rows(scores)
        if "forget" in groups:
            self._forget_metrics(scores["forget"], out)
        for role in ("retain", "ra", "wf"):
            if role in groups:
                self._utility_metrics(scores[role], out)
        if {"retain", "ra", "wf"} <= groups:
            values = {key: out[key]["agg_value"] for key in metrics.MODEL_UTILITY_KEYS}
            out["model_utility"] = {"agg_value": metrics.model_utility(values), "value_by_index": {}}
        if "mia" in groups:
            self._mia_metrics(scores["forget"], scores["holdout"], out)
        return out

    def _rouge_entry(self, scores: RowScores) -> dict[str, Any]:
        keep = [k for k, text in enumerate(scores.columns["generation"]) if text is not None]
        by_index = {
            str(scores.indices[k]): {
                name: scores.columns[name][k] for name in ("generation", "rougeL_recall", "rouge1_recall", "rougeL_f1")
            }
            for k in keep
        }
        agg = nan_mean([scores.columns["rougeL_recall"][k] for k in keep])
        return {"agg_value": agg, "value_by_index": by_index}

    def _forget_metrics(self, scores: RowScores, out: dict[str, dict[str, Any]]) -> None:
        c, idx = scores.columns, scores.indices
        prob = metrics.probability(c["answer_nll"])
        para = metrics.probability(c["para_nll"])
        pert = np.exp(-np.asarray(c["pert_nll"], dtype=np.float64))  # (N, K)
        tr = metrics.truth_ratio(c["para_nll"], c["pert_nll"])
        out["forget_Q_A_Prob"] = {"agg_value": nan_mean(prob), "value_by_index": values_by_index(idx, prob.tolist())}
        out["forget_Q_A_ROUGE"] = self._rouge_entry(scores)
        out["forget_Q_A_PARA_Prob"] = {
            "agg_value": nan_mean(para),
            "value_by_index": values_by_index(idx, para.tolist()),
        }
        out["forget_Q_A_PERT_Prob"] = {
            "agg_value": nan_mean(pert.mean(axis=1)),
            "value_by_index": values_by_index(idx, pert.tolist()),
        }
        out["forget_truth_ratio"] = {
            "agg_value": metrics.truth_ratio_forget_aggregate(tr),
            "value_by_index": values_by_index(idx, tr.tolist()),
        }
        if self._reference_tr is not None:
            if sorted(idx) != sorted(int(row["index"]) for row in self.rows["forget"]):
                raise EvalLogError(
                    f"forget rows scored ({describe_indices(idx)}) differ from the rows the retain reference "
                    f"{self.settings.retain_reference} was checked against; aggregate all rows (RowScores.concat) first"
                )
            out["forget_quality"] = {
                "agg_value": metrics.forget_quality(tr, self._reference_tr),
                "value_by_index": {},
            }
        for name in ("extraction_strength", "exact_memorization"):
            out[name] = {"agg_value": nan_mean(c[name]), "value_by_index": values_by_index(idx, c[name])}

    def _utility_metrics(self, scores: RowScores, out: dict[str, dict[str, Any]]) -> None:
        c, idx, prefix = scores.columns, scores.indices, scores.role
        if scores.role == "retain":
            prob = metrics.probability(c["answer_nll"])
            out["retain_Q_A_Prob"] = {
                "agg_value": nan_mean(prob),
                "value_by_index": values_by_index(idx, prob.tolist()),
            }
            tr = metrics.truth_ratio(c["para_nll"], c["pert_nll"])
        else:
            # Real authors / world facts have no paraphrase: the answer itself is the correct option.
            normalised = metrics.normalised_probability(c["answer_nll"], c["pert_nll"])
            out[f"{prefix}_Q_A_Prob_normalised"] = {
                "agg_value": nan_mean(normalised),
                "value_by_index": values_by_index(idx, normalised.tolist()),
            }
            tr = metrics.truth_ratio(c["answer_nll"], c["pert_nll"])
        out[f"{prefix}_Q_A_ROUGE"] = self._rouge_entry(scores)
        out[f"{prefix}_Truth_Ratio"] = {
            "agg_value": metrics.truth_ratio_true_aggregate(tr),
            "value_by_index": values_by_index(idx, tr.tolist()),
        }

    def _mia_metrics(self, forget: RowScores, holdout: RowScores, out: dict[str, dict[str, Any]]) -> None:
        names = [*MIA_ATTACKS, *(name for name in ("mia_gradnorm",) if name in forget.columns)]
        members = {name: forget.columns[name] for name in names}
        nonmembers = {name: holdout.columns[name] for name in names}
        if self._reference_losses is not None:
            sides = zip((members, nonmembers), (forget, holdout), self._reference_losses, strict=True)
            for side, part, by_index in sides:
                reference = [by_index[int(i)] for i in part.indices]
                side["mia_reference"] = metrics.mia_reference(part.columns["mia_loss"], reference).tolist()
        out.update(mia_entries(members, nonmembers, forget.indices, holdout.indices, self._reference_auc))

    # -- whole runs ---------------------------------------------------------------------------------------------

    def recorded_settings(self) -> dict[str, Any]:
        """The options ``meta`` records."""
        return {
            "forget_split": self.forget_split,
            "retain_split": self.retain_split,
            "holdout_split": self.holdout_split,
            "rows": {plan.split: len(self.rows[plan.role]) for plan in self.plans()},
            "question_digests": {
                plan.split: question_digest([row["question"] for row in self.rows[plan.role]]) for plan in self.plans()
            },
            "limit": self.settings.limit,
            "forget_indices": None if self.forget_indices is None else sorted(self.forget_indices),
            "rouge_rows_limit": self.settings.rouge_rows_limit,
            "metric_groups": list(self.settings.metric_groups),
            "max_length": self.max_length,
            "max_new_tokens": self.settings.max_new_tokens,
            "generation": GENERATION_NOTE,
            "rouge": "rougeL_recall with Porter stemming (rouge_score)",
            "mink_fraction": MINK_FRACTION,
            "batch_size": self.settings.batch_size,
            "attention_from": self.attention_from,
            **({"gradnorm_p": GRADNORM_P} if "mia_gradnorm" in self.settings.metric_groups else {}),
            "engine": self.settings.engine,
        }


LIKELIHOOD_COLUMNS = ("answer_nll", "para_nll", "pert_nll")
"""The per-row likelihood columns; NaN in one of them means an answer with no token left to score."""


def _without_answerless_rows(
    scores: Mapping[Role, RowScores],
) -> tuple[dict[Role, RowScores], list[str], dict[str, list[int]]]:
    """The scores with every numeric value of a row whose answers left no token to score set to NaN, one note per
    split saying how many rows that was, and those rows' indices per split (``meta.unscorable_rows``).

    Such a row (its question fills ``max_length``, or its answer merges into the prompt) has a NaN mean NLL; its
    MinK/ES/EM values would be the reference's empty-row defaults (0), not measurements. open-unlearning drops these
    rows; NaN keeps them in ``value_by_index`` (as null) and every aggregate leaves them out. Generations and ROUGE
    do not need answer tokens and are kept.
    """
    out: dict[Role, RowScores] = {}
    notes = []
    unscorable: dict[str, list[int]] = {}
    for role, part in scores.items():
        bad = np.zeros(len(part.indices), dtype=bool)
        for name in LIKELIHOOD_COLUMNS:
            if name in part.columns:
                values = np.asarray(part.columns[name], dtype=np.float64).reshape(len(part.indices), -1)
                bad |= ~np.isfinite(values).all(axis=1)
        if not bad.any():
            out[role] = part
            continue
        keep_text = {"generation", "rouge1_recall", "rougeL_recall", "rougeL_f1"}
        columns = {
            name: values if name in keep_text else [_nan_like(v) if b else v for v, b in zip(values, bad, strict=True)]
            for name, values in part.columns.items()
        }
        out[role] = RowScores(part.role, part.split, list(part.indices), columns)
        unscorable[part.split] = sorted(int(i) for i, b in zip(part.indices, bad, strict=True) if b)
        notes.append(
            f"{part.split}: {int(bad.sum())} of {len(bad)} rows have an answer with no token left to score (a question "
            "that fills max_length, or an answer merged into the prompt); they are left out of every aggregate, as "
            "open-unlearning leaves them out, and their per-row values are null"
        )
    return out, notes, unscorable


def _nan_like(value: Any) -> Any:
    """NaN in the shape of a per-row value (a list of K values stays a list)."""
    return [math.nan] * len(value) if isinstance(value, list) else math.nan
