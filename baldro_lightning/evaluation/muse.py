"""MUSE evaluation of a causal LM: KnowMem, VerbMem, PrivLeak, memorisation and MIA, written as ``eval.json``.

Metrics (methods §3.7), in open-unlearning's layout ``{metric: {"agg_value", "value_by_index"}}``:

- ``forget_knowmem_ROUGE`` / ``retain_knowmem_ROUGE``: greedy answers (``max_new_tokens`` 32) to the
  ``knowmem/{forget,retain}_qa`` questions after the ``*_qa_icl`` shots, cut at the stop strings
  :data:`KNOWMEM_STOP_STRINGS`; mean ROUGE-L **F1** against the answer.
- ``forget_verbmem_ROUGE``: greedy continuation (``max_new_tokens`` 128) of each ``verbmem/forget`` prompt; mean
  ROUGE-L F1 against ``gt``.
- ``extraction_strength``, ``exact_memorization``: teacher-forced on ``prompt + " " + gt`` (targets = ``gt``).
- ``mia_loss``, ``mia_zlib``, ``mia_min_k``, ``mia_min_k_plus_plus``: AUC of each attack on ``privleak/forget``
  (members) vs ``privleak/holdout`` (non-members), texts with only BOS masked.
- ``privleak``: from the ``mia_min_k`` AUC relative to the retain model's (its ``eval.json``), 0.5 without one.
- ``mia_gradnorm``, ``mia_reference``: two more attacks on the same rows, each its own metric group on top of
  ``privleak`` (GradNorm back-propagates every row; Reference reads the retain model's per-row losses).

Generation, likelihoods and per-row values are the shared engine's (:mod:`~baldro_lightning.evaluation.engine`),
ROUGE and the metric formulas are :mod:`baldro_lightning.evaluation.metrics`, and the retain reference is read by
:mod:`~baldro_lightning.evaluation.run_record`; this module only wires the MUSE splits to them. How an evaluation runs
is one :class:`MuseSettings`, shared by the evaluator, the in-training callback and ``evaluate-muse``.

Command line::

    python -m baldro_lightning evaluate-muse --model M --benchmark DIR_OR_HUB --corpus news --out eval.json \\
        [--retain_reference retain/eval.json] [--limit N]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from baldro_lightning.data.muse import (
    MUSE_HUB_DATASETS,
    MuseCorpus,
    encode_completion,
    encode_knowmem_prompt,
    encode_prefix,
    load_muse_split,
)
from baldro_lightning.data.tokenization import IGNORE_INDEX, AttentionFrom, PromptTemplate
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
from baldro_lightning.evaluation.greedy import Draft, choose_engines, draft_of, greedy_generate
from baldro_lightning.evaluation.prefix_scoring import score_groups
from baldro_lightning.evaluation.run_record import EvalLogError, reference_privleak_auc, reference_row_losses
from baldro_lightning.train.models import eval_mode

log = logging.getLogger(__name__)

MuseMetricGroup = Literal["knowmem", "verbmem", "privleak", "mia_gradnorm", "mia_reference"]
"""KnowMem (forget and retain QA), VerbMem (+ ES/EM), PrivLeak (+ the MIA AUCs); and, on top of privleak, the
GradNorm and Reference attacks, asked for by name."""

ALL_MUSE_GROUPS: tuple[MuseMetricGroup, ...] = get_args(MuseMetricGroup)
DEFAULT_MUSE_GROUPS: tuple[MuseMetricGroup, ...] = ("knowmem", "verbmem", "privleak")
"""What an evaluation computes unless told otherwise: every group but the two extra attacks."""

KNOWMEM_STOP_STRINGS: tuple[str, ...] = ("\n\n", "\nQuestion", "Question:")
"""Where a KnowMem answer is cut (methods §3.7): the end of the answer line or the start of a next question."""

KNOWMEM_SIDES: tuple[str, str] = ("forget", "retain")
"""KnowMem asks about the forget corpus and the retain corpus, each after its own in-context shots."""

PRIVLEAK_SPLITS: tuple[str, str] = ("privleak/forget", "privleak/holdout")
"""Members and non-members of the MIA and PrivLeak metrics."""

VERBMEM_SPLIT = "verbmem/forget"
"""Prefixes whose continuation VerbMem, ES and EM score."""


@dataclass(frozen=True)
class MuseSettings:
    """How a MUSE evaluation runs: every option but the data (benchmark, corpus, prompt template, max_length)."""

    metric_groups: tuple[MuseMetricGroup, ...] = DEFAULT_MUSE_GROUPS
    """Which groups of metrics to compute: knowmem, verbmem (with ES and EM), privleak (with the MIA AUCs); and, with
    privleak, mia_gradnorm (one backward pass per text) and mia_reference (needs retain_reference)."""
    retain_reference: str | None = None
    """eval.json of the retain model on the same corpus and rows: its mia_min_k AUC is the privleak reference (0.5
    without one)."""
    batch_size: int = 8
    """Texts per likelihood forward."""
    knowmem_batch_size: int = 16
    """KnowMem prompts per generate call (at least, with the prompt_cache engine: see ``TofuSettings``)."""
    verbmem_batch_size: int = 8
    """VerbMem prompts per generate call (at least, with the prompt_cache engine: see ``TofuSettings``)."""
    knowmem_max_new_tokens: int = 32
    """Greedy KnowMem answer length (methods §3.7: 32)."""
    verbmem_max_new_tokens: int = 128
    """Greedy VerbMem continuation length (methods §3.7: 128)."""
    use_stemmer: bool = True
    """Porter stemming in ROUGE (open-unlearning); false as in the original MUSE code (methods P-22)."""
    limit: int | None = None
    """Evaluate only the first N rows of each split (smoke runs; the KnowMem in-context shots are always all
    used); a retain reference must use the same limit."""
    engine: Engine = "prompt_cache"
    """prompt_cache: greedy tokens that the scored VerbMem continuation already proves are not decoded again, and
    the decode loop drops finished rows; per_example: model.generate per batch, the evaluator before issue 18, kept
    as the reference. Values agree within float rounding."""

    def __post_init__(self) -> None:
        # One order-preserving copy of each group: a tuple whatever sequence was given (YAML gives lists).
        object.__setattr__(self, "metric_groups", tuple(dict.fromkeys(self.metric_groups)))
        counts = (
            "batch_size",
            "knowmem_batch_size",
            "verbmem_batch_size",
            "knowmem_max_new_tokens",
            "verbmem_max_new_tokens",
        )
        problems = settings_problems(self, ALL_MUSE_GROUPS, counts, ("limit",))
        problems += extra_attack_problems(self.metric_groups, "privleak", self.retain_reference)
        if problems:
            raise ValueError("MuseSettings are invalid: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------------------
# Metric glue: per-row values -> eval.json entries


def rouge_entry(
    indices: Sequence[int], generations: Sequence[str], references: Sequence[str], use_stemmer: bool = True
) -> dict[str, Any]:
    """A ROUGE metric entry of MUSE: mean ROUGE-L F1, with every row's generation and scores.

    Args:
        indices: Row index of each item.
        generations: Cleaned generations (:func:`metrics.clean_generation`).
        references: Ground truths (KnowMem ``answer``, VerbMem ``gt``); stripped here.
        use_stemmer: Porter stemming (open-unlearning); False as in the original MUSE code (methods P-22).

    Returns:
        ``{"agg_value": mean rougeL_f1, "value_by_index": {str(index): {"generation", "rougeL_f1",
        "rougeL_recall", "rouge1_recall"}}}``.
    """
    scores = metrics.rouge_scores(list(generations), [ref.strip() for ref in references], use_stemmer)
    by_index = {
        str(index): {
            "generation": generation,
            "rougeL_f1": float(scores["rougeL_f1"][k]),
            "rougeL_recall": float(scores["rougeL_recall"][k]),
            "rouge1_recall": float(scores["rouge1_recall"][k]),
        }
        for k, (index, generation) in enumerate(zip(indices, generations, strict=True))
    }
    return {"agg_value": nan_mean(scores["rougeL_f1"]), "value_by_index": by_index}


def memorization_entries(
    indices: Sequence[int], pred_ids: Sequence[np.ndarray], target_ids: Sequence[np.ndarray]
) -> dict[str, dict[str, Any]]:
    """``extraction_strength`` and ``exact_memorization`` entries from teacher-forced predictions (methods §3.5).

    Args:
        indices: Row index of each item.
        pred_ids: Per item, (n,) argmax predictions over the target positions minus the last (methods P-18).
        target_ids: Per item, (n,) the targets at those positions.

    Returns:
        Both entries; each row value is a float (NaN for an item without positions).
    """
    es = metrics.extraction_strength(pred_ids, target_ids).tolist()
    em = metrics.exact_memorization(pred_ids, target_ids).tolist()
    return {
        "extraction_strength": {"agg_value": nan_mean(es), "value_by_index": values_by_index(indices, es)},
        "exact_memorization": {"agg_value": nan_mean(em), "value_by_index": values_by_index(indices, em)},
    }


# --------------------------------------------------------------------------------------------------------------
# The evaluator


@dataclass
class MuseEvaluator(BenchmarkEvaluator):
    """Evaluates a causal LM on one MUSE corpus (methods §3.7).

    As :class:`baldro_lightning.evaluation.tofu.TofuEvaluator`, in two steps so that ranks can split the rows:
    :meth:`score` gives per-row values of the rows of each scored split (``rows``: generations, teacher-forced
    predictions, attack scores), :meth:`aggregate` turns those of all rows into the metrics. The KnowMem
    in-context shots (``shots``) are not scored; every rank uses all of them.
    """

    benchmark: str
    """Directory of MUSE jsonl files (flat ``{corpus}_{config}_{split}.jsonl`` or ``{config}/{split}.jsonl``), or a
    Hub dataset id (``muse-bench/MUSE-News``)."""
    tokenizer: PreTrainedTokenizerBase
    """The model's tokenizer, with a pad token (``load_tokenizer`` sets one)."""
    corpus: MuseCorpus = "news"
    """``news`` or ``books``."""
    template: PromptTemplate = field(default_factory=PromptTemplate)
    """KnowMem prompt rendering (MUSE's Llama-2 models: the plain ``Question: …\\nAnswer:`` form)."""
    max_length: int = 2048
    """Most target tokens of a teacher-forced example (VerbMem ``gt``, a privleak text); methods §1.5."""
    settings: MuseSettings = field(default_factory=MuseSettings)
    """How the evaluation runs: metric groups, retain reference, batch sizes, generation lengths, stemming, row
    limit."""
    attention_from: AttentionFrom = "lengths"
    """The attention mask, as in training: ``lengths`` or the reference's ``pad_ids`` (methods P-14)."""

    def __post_init__(self) -> None:
        problems = tokenizer_problems(self.tokenizer)
        if self.max_length < 1:
            problems.append(f"--max_length must be >= 1, got {self.max_length}")
        if self.corpus not in MUSE_HUB_DATASETS:
            problems.append(f"--corpus {self.corpus!r}: choose from {', '.join(MUSE_HUB_DATASETS)}")
        if problems:
            raise ValueError("MuseEvaluator inputs are invalid: " + "; ".join(problems))
        self.rows = {name: self._load(name)[: self.settings.limit] for name in self.splits()}
        self.shots = {side: self._load(f"knowmem/{side}_qa_icl") for side in KNOWMEM_SIDES if self._has("knowmem")}
        self.notes: list[str] = []
        self._reference_auc: float | None = None
        self._reference_losses: tuple[dict[int, float], dict[int, float]] | None = None
        self._cached = (False, False)  # (scoring, generation) on the prompt-cache engine; set by each score()
        self._check_reference()

    def _has(self, group: MuseMetricGroup) -> bool:
        return group in self.settings.metric_groups

    def splits(self) -> list[str]:
        """The MUSE splits whose rows this evaluation scores (the KnowMem shots are read besides)."""
        names = []
        if self._has("knowmem"):
            names += [f"knowmem/{side}_qa" for side in KNOWMEM_SIDES]
        if self._has("verbmem"):
            names.append(VERBMEM_SPLIT)
        if self._has("privleak"):
            names += list(PRIVLEAK_SPLITS)
        return names

    def _load(self, name: str) -> list[dict[str, Any]]:
        return load_muse_split(self.benchmark, self.corpus, name)

    def _check_reference(self) -> None:
        """Read the retain reference now, before any model time is spent."""
        reference = self.settings.retain_reference
        if not self._has("privleak"):
            return
        if reference is None:
            self.notes.append("privleak uses the default reference AUC 0.5 (no retain reference, methods P-23)")
            return
        counts = {name: len(self.rows[name]) for name in PRIVLEAK_SPLITS}
        self._reference_auc = reference_privleak_auc(reference, self.corpus, counts)
        if self._reference_auc is None:
            self.notes.append(f"privleak uses the default reference AUC 0.5: {reference} has no mia_min_k")
            log.warning("%s has no mia_min_k AUC; privleak falls back to the reference AUC 0.5", reference)
        if self._has("mia_reference"):
            members, nonmembers = ([int(r["index"]) for r in self.rows[name]] for name in PRIVLEAK_SPLITS)
            losses = reference_row_losses(reference, members, nonmembers, corpus=self.corpus)
            self._reference_losses = (
                dict(zip(members, losses[0], strict=True)),
                dict(zip(nonmembers, losses[1], strict=True)),
            )

    # -- step 1: per-row values ---------------------------------------------------------------------------------

    def score(
        self, model: nn.Module, rows: Mapping[str, Sequence[Mapping[str, Any]]] | None = None, synced_gpus: bool = False
    ) -> dict[str, RowScores]:
        """Per-row values of ``rows`` (default: all loaded rows); the model's train/eval modes are restored.

        Args:
            model: A causal LM (may be FSDP2-sharded; then every rank calls this with its share of the rows of
                every split in :meth:`splits`, e.g. from :func:`shard_rows`, and ``synced_gpus=True``).
            rows: Rows per split of :meth:`splits`; a rank's share may be empty.
            synced_gpus: Keep ranks in lockstep for sharded models.

        Returns:
            :class:`RowScores` per split: ``generation`` (KnowMem, VerbMem), ``pred_ids`` and ``target_ids``
            (VerbMem), the :data:`MIA_ATTACKS` scores (privleak).
        """
        rows = self.rows if rows is None else rows
        with torch.no_grad(), eval_mode(model), collector_paused():
            scores = self._score(model, {name: list(rows[name]) for name in self.splits()}, synced_gpus)
            if self._has("mia_gradnorm"):
                if synced_gpus:
                    raise ValueError(
                        "mia_gradnorm needs each parameter's whole gradient and cannot run on a sharded (FSDP2) "
                        "model; drop it from metric_groups of the in-training evaluation and evaluate the export"
                    )
                for name in PRIVLEAK_SPLITS:
                    examples = [self._likelihood_example(name, row) for row in rows[name]]
                    pairs = [(e.input_ids, e.labels) for e in examples]
                    norms = gradient_norms(model, pairs, self.tokenizer.pad_token_id, self.attention_from)
                    scores[name].columns["mia_gradnorm"] = metrics.mia_gradnorm(norms).tolist()
        return scores

    def _score(
        self, model: nn.Module, rows: dict[str, list[Mapping[str, Any]]], synced_gpus: bool
    ) -> dict[str, RowScores]:
        scoring, generation, note = choose_engines(self.settings.engine, model, self.attention_from)
        self._cached = (scoring, generation)
        self._note(note)
        teacher_forced = [name for name in (VERBMEM_SPLIT, *PRIVLEAK_SPLITS) if name in rows]
        examples = [(name, self._likelihood_example(name, row)) for name in teacher_forced for row in rows[name]]
        if examples:
            log.info("scoring %d texts (max_length=%d)", len(examples), self.max_length)
        size, pad = self.settings.batch_size, self.tokenizer.pad_token_id
        if self._cached[0]:
            scored = [group[0] for group in score_groups(model, [[e] for _, e in examples], size, pad, synced_gpus)]
        else:
            scored = score_examples(model, [e for _, e in examples], size, pad, synced_gpus, self.attention_from)
        by_split: dict[str, list[tuple[AnswerExample, ExampleScore]]] = {name: [] for name in teacher_forced}
        for (name, example), score in zip(examples, scored, strict=True):
            by_split[name].append((example, score))

        def row_scores(name: str, columns: dict[str, list[Any]]) -> RowScores:
            return RowScores(name, name, [int(row["index"]) for row in rows[name]], columns)

        out: dict[str, RowScores] = {}
        # Every rank generates for every group, even with no rows of its own, so sharded ranks stay in step.
        if self._has("knowmem"):
            for side in KNOWMEM_SIDES:
                name = f"knowmem/{side}_qa"
                out[name] = row_scores(
                    name, {"generation": self._knowmem_generations(model, side, rows[name], synced_gpus)}
                )
        if self._has("verbmem"):
            items = by_split[VERBMEM_SPLIT]
            out[VERBMEM_SPLIT] = row_scores(
                VERBMEM_SPLIT,
                {
                    "generation": self._verbmem_generations(model, rows[VERBMEM_SPLIT], items, synced_gpus),
                    "pred_ids": [score.pred_ids for _, score in items],
                    "target_ids": [score.target_ids for _, score in items],
                },
            )
        if self._has("privleak"):
            for name in PRIVLEAK_SPLITS:
                out[name] = row_scores(name, self._attack_scores(by_split[name]))
        return out

    def _likelihood_example(self, name: str, row: Mapping[str, Any]) -> AnswerExample:
        if name == VERBMEM_SPLIT:
            encoded = encode_completion(self.tokenizer, row["prompt"], row["gt"], self.max_length, insert_space=True)
        else:
            encoded = encode_completion(self.tokenizer, "", row["text"], self.max_length)
        # VerbMem's scored continuation is also a draft of its greedy generation (see greedy.draft_of).
        draft = name == VERBMEM_SPLIT and self._cached[1]
        return AnswerExample(encoded.input_ids, encoded.labels, token_stats=True, draft=draft)

    def _generate(
        self,
        model: nn.Module,
        prompts: Sequence[Sequence[int]],
        batch_size: int,
        max_new_tokens: int,
        synced_gpus: bool,
        stop_strings: Sequence[str] = (),
        drafts: Sequence[Sequence[Draft]] | None = None,
    ) -> list[str]:
        if self._cached[1]:
            return greedy_generate(
                model, self.tokenizer, prompts, batch_size, max_new_tokens, synced_gpus, stop_strings, drafts
            )
        return generate_answers(
            model,
            self.tokenizer,
            prompts,
            batch_size,
            max_new_tokens,
            synced_gpus,
            stop_strings,
            attention_from=self.attention_from,
        )

    def _knowmem_generations(
        self, model: nn.Module, side: str, rows: Sequence[Mapping[str, Any]], synced_gpus: bool
    ) -> list[str]:
        shots = self.shots[side]
        prompts = [encode_knowmem_prompt(self.tokenizer, self.template, shots, row["question"]) for row in rows]
        log.info("KnowMem %s: generating %d answers after %d shots", side, len(prompts), len(shots))
        return self._generate(
            model,
            prompts,
            self.settings.knowmem_batch_size,
            self.settings.knowmem_max_new_tokens,
            synced_gpus,
            stop_strings=KNOWMEM_STOP_STRINGS,
        )

    def _verbmem_generations(
        self,
        model: nn.Module,
        rows: Sequence[Mapping[str, Any]],
        scored: Sequence[tuple[AnswerExample, ExampleScore]],
        synced_gpus: bool,
    ) -> list[str]:
        prompts = [encode_prefix(self.tokenizer, row["prompt"]) for row in rows]
        drafts = [
            [d] if (d := draft_of(prompt, example, score)) is not None else []
            for prompt, (example, score) in zip(prompts, scored, strict=True)
        ]
        log.info(
            "VerbMem: generating %d continuations of %d tokens", len(prompts), self.settings.verbmem_max_new_tokens
        )
        return self._generate(
            model,
            prompts,
            self.settings.verbmem_batch_size,
            self.settings.verbmem_max_new_tokens,
            synced_gpus,
            drafts=drafts,
        )

    def _attack_scores(self, items: Sequence[tuple[AnswerExample, ExampleScore]]) -> dict[str, list[float]]:
        nll = [score.nll_mean for _, score in items]
        token_logps = [score.token_logps for _, score in items]
        # ZLib compresses the scored text as decoded from its labelled tokens, specials skipped (methods §3.6).
        texts = [
            self.tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=True)
            for example, _ in items
        ]
        return {
            "mia_loss": metrics.mia_loss(nll).tolist(),
            "mia_zlib": metrics.mia_zlib(nll, texts).tolist(),
            "mia_min_k": metrics.mia_min_k(token_logps, MINK_FRACTION).tolist(),
            "mia_min_k_plus_plus": metrics.mia_min_k_plus_plus(
                token_logps, [s.mu for _, s in items], [s.sigma2 for _, s in items], MINK_FRACTION
            ).tolist(),
        }

    # -- step 2: metrics over all rows --------------------------------------------------------------------------

    def aggregate(self, scores: Mapping[str, RowScores]) -> dict[str, dict[str, Any]]:
        """Metrics in open-unlearning's layout from the per-row values of every row (methods §3.7).

        Args:
            scores: :class:`RowScores` per split of :meth:`splits`, covering all rows (join ranks' parts with
                :meth:`RowScores.concat` first).

        Raises:
            EvalLogError: a split's scores do not cover exactly its loaded rows.
        """
        for name in self.splits():
            expected = sorted(int(row["index"]) for row in self.rows[name])
            if sorted(scores[name].indices) != expected:
                raise EvalLogError(
                    f"{name}: scores cover {len(scores[name].indices)} rows but {len(expected)} were loaded; "
                    "aggregate the scores of all rows (RowScores.concat of every rank's part) first"
                )
        out: dict[str, dict[str, Any]] = {}
        if self._has("knowmem"):
            for side in KNOWMEM_SIDES:
                part = scores[f"knowmem/{side}_qa"]
                answers = self._field(f"knowmem/{side}_qa", "answer", part.indices)
                out[f"{side}_knowmem_ROUGE"] = rouge_entry(
                    part.indices, part.columns["generation"], answers, self.settings.use_stemmer
                )
        if self._has("verbmem"):
            part = scores[VERBMEM_SPLIT]
            gts = self._field(VERBMEM_SPLIT, "gt", part.indices)
            out["forget_verbmem_ROUGE"] = rouge_entry(
                part.indices, part.columns["generation"], gts, self.settings.use_stemmer
            )
            out.update(memorization_entries(part.indices, part.columns["pred_ids"], part.columns["target_ids"]))
        if self._has("privleak"):
            members, nonmembers = (scores[name] for name in PRIVLEAK_SPLITS)
            attacks = [*MIA_ATTACKS, *(name for name in ("mia_gradnorm",) if name in members.columns)]
            member_scores = {attack: members.columns[attack] for attack in attacks}
            nonmember_scores = {attack: nonmembers.columns[attack] for attack in attacks}
            if self._reference_losses is not None:
                sides = zip(
                    (member_scores, nonmember_scores), (members, nonmembers), self._reference_losses, strict=True
                )
                for side, part, by_index in sides:
                    reference = [by_index[int(i)] for i in part.indices]
                    side["mia_reference"] = metrics.mia_reference(part.columns["mia_loss"], reference).tolist()
            out.update(
                mia_entries(member_scores, nonmember_scores, members.indices, nonmembers.indices, self._reference_auc)
            )
        return out

    def _field(self, name: str, key: str, indices: Sequence[int]) -> list[str]:
        rows = {int(row["index"]): row for row in self.rows[name]}
        return [rows[index][key] for index in indices]

    # -- whole runs ---------------------------------------------------------------------------------------------

    def recorded_settings(self) -> dict[str, Any]:
        """The options ``meta`` records."""
        shots = {f"knowmem/{side}_qa_icl": len(rows) for side, rows in self.shots.items()}
        return {
            "corpus": self.corpus,
            "rows": {**{name: len(rows) for name, rows in self.rows.items()}, **shots},
            "limit": self.settings.limit,
            "metric_groups": list(self.settings.metric_groups),
            "max_length": self.max_length,
            "knowmem_max_new_tokens": self.settings.knowmem_max_new_tokens,
            "verbmem_max_new_tokens": self.settings.verbmem_max_new_tokens,
            "knowmem_stop_strings": list(KNOWMEM_STOP_STRINGS),
            "generation": GENERATION_NOTE,
            "rouge": f"rougeL_f1 ({'with' if self.settings.use_stemmer else 'without'} Porter stemming, rouge_score)",
            "mink_fraction": MINK_FRACTION,
            "batch_size": self.settings.batch_size,
            "attention_from": self.attention_from,
            **({"gradnorm_p": GRADNORM_P} if self._has("mia_gradnorm") else {}),
            "engine": self.settings.engine,
        }
