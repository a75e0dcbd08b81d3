"""MUSE evaluation of a causal LM: KnowMem, VerbMem, PrivLeak, memorisation and MIA, written as ``eval.json``.

Metrics (spec §3.7), in open-unlearning's layout ``{metric: {"agg_value", "value_by_index"}}``:

- ``forget_knowmem_ROUGE`` / ``retain_knowmem_ROUGE``: greedy answers (``max_new_tokens`` 32) to the
  ``knowmem/{forget,retain}_qa`` questions after the ``*_qa_icl`` shots, cut at the stop strings
  :data:`KNOWMEM_STOP_STRINGS`; mean ROUGE-L **F1** against the answer.
- ``forget_verbmem_ROUGE``: greedy continuation (``max_new_tokens`` 128) of each ``verbmem/forget`` prompt; mean
  ROUGE-L F1 against ``gt``.
- ``extraction_strength``, ``exact_memorization``: teacher-forced on ``prompt + " " + gt`` (targets = ``gt``).
- ``mia_loss``, ``mia_zlib``, ``mia_min_k``, ``mia_min_k_plus_plus``: AUC of each attack on ``privleak/forget``
  (members) vs ``privleak/holdout`` (non-members), texts with only BOS masked.
- ``privleak``: from the ``mia_min_k`` AUC relative to the retain model's (its ``eval.json``), 0.5 without one.

Generation, ROUGE, likelihoods and the metric formulas are the TOFU evaluator's (:mod:`baldro_lightning.evaluation`,
:mod:`baldro_lightning.metrics`); this module only wires the MUSE splits to them.

Command line::

    python -m baldro_lightning.muse_evaluation --model M --benchmark DIR_OR_HUB --corpus news --out eval.json \\
        [--retain_reference retain/eval.json] [--limit N]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

import baldro_lightning
from baldro_lightning import metrics
from baldro_lightning.evaluation import (
    MINK_FRACTION,
    AnswerExample,
    EvalLogError,
    ExampleScore,
    _by_index,
    _mean,
    evaluation_mode,
    generate_answers,
    load_eval_json,
    score_examples,
    write_eval_json,
)
from baldro_lightning.logprobs import IGNORE_INDEX
from baldro_lightning.muse import (
    MUSE_HUB_DATASETS,
    MuseCorpus,
    encode_completion,
    encode_knowmem_prompt,
    encode_prefix,
    load_muse_split,
)
from baldro_lightning.tokenization import PromptTemplate

log = logging.getLogger(__name__)

MuseMetricGroup = Literal["knowmem", "verbmem", "privleak"]
"""KnowMem (forget and retain QA), VerbMem (+ ES/EM), PrivLeak (+ the MIA AUCs)."""

ALL_MUSE_GROUPS: tuple[MuseMetricGroup, ...] = get_args(MuseMetricGroup)

KNOWMEM_STOP_STRINGS: tuple[str, ...] = ("\n\n", "\nQuestion", "Question:")
"""Where a KnowMem answer is cut (spec §3.7): the end of the answer line or the start of a next question."""

MIA_ATTACKS: tuple[str, ...] = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus")
"""Attacks scored on privleak forget vs holdout; PrivLeak uses ``mia_min_k``."""

PRIVLEAK_SPLITS: tuple[str, str] = ("privleak/forget", "privleak/holdout")
"""Members and non-members of the MIA and PrivLeak metrics."""


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
        use_stemmer: Porter stemming (open-unlearning); False as in the original MUSE code (P-22).

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
    return {"agg_value": _mean(scores["rougeL_f1"]), "value_by_index": by_index}


def memorization_entries(
    indices: Sequence[int], pred_ids: Sequence[np.ndarray], target_ids: Sequence[np.ndarray]
) -> dict[str, dict[str, Any]]:
    """``extraction_strength`` and ``exact_memorization`` entries from teacher-forced predictions (spec §3.5).

    Args:
        indices: Row index of each item.
        pred_ids: Per item, (n,) argmax predictions over the target positions minus the last (P-18).
        target_ids: Per item, (n,) the targets at those positions.

    Returns:
        Both entries; each row value is a float (NaN for an item without positions).
    """
    es = metrics.extraction_strength(pred_ids, target_ids).tolist()
    em = metrics.exact_memorization(pred_ids, target_ids).tolist()
    return {
        "extraction_strength": {"agg_value": _mean(es), "value_by_index": _by_index(indices, es)},
        "exact_memorization": {"agg_value": _mean(em), "value_by_index": _by_index(indices, em)},
    }


def mia_entries(
    members: Mapping[str, Sequence[float]],
    nonmembers: Mapping[str, Sequence[float]],
    member_indices: Sequence[int],
    nonmember_indices: Sequence[int],
    reference_auc: float | None,
) -> dict[str, dict[str, Any]]:
    """MIA AUC entries and PrivLeak from per-row attack scores (spec §3.6).

    Args:
        members: Attack name -> (N_f,) scores of the ``privleak/forget`` rows (loss-like: higher = less likely
            a member).
        nonmembers: Attack name -> (N_h,) scores of the ``privleak/holdout`` rows.
        member_indices: Row indices of the members.
        nonmember_indices: Row indices of the non-members.
        reference_auc: The retain model's ``mia_min_k`` AUC; None gives the default 0.5 (P-23).

    Returns:
        One entry per attack (``agg_value`` = AUC, members in ``value_by_index``, non-members in
        ``holdout_value_by_index``) and ``privleak`` (needs ``mia_min_k``).
    """
    out: dict[str, dict[str, Any]] = {}
    for name in members:
        out[name] = {
            "agg_value": metrics.mia_auc(members[name], nonmembers[name]),
            "value_by_index": _by_index(member_indices, list(members[name])),
            "holdout_value_by_index": _by_index(nonmember_indices, list(nonmembers[name])),
        }
    out["privleak"] = {
        "agg_value": metrics.privleak(out["mia_min_k"]["agg_value"], reference_auc),
        "value_by_index": {},
    }
    return out


def _remake_hint(path: Path, corpus: str) -> str:
    return (
        "make it by evaluating the retain model on the same data: python -m baldro_lightning.muse_evaluation "
        f"--model <retain model> --benchmark <benchmark> --corpus {corpus} --out {path}"
    )


def reference_privleak_auc(
    path: str | os.PathLike[str], corpus: MuseCorpus, rows: Mapping[str, int] | None = None
) -> float | None:
    """The retain model's ``mia_min_k`` AUC from its MUSE ``eval.json`` (or open-unlearning ``MUSE_EVAL.json``).

    Args:
        path: The retain model's evaluation file.
        corpus: This evaluation's corpus; must equal the reference's when it records one.
        rows: Row counts of this evaluation's privleak splits, checked against the reference's ``meta.rows``.

    Returns:
        The AUC, or None when the file holds no ``mia_min_k``.

    Raises:
        EvalLogError: the file is missing or unreadable, is a TOFU evaluation, was made on the other corpus, or
            scored other row counts.
    """
    file = Path(path)
    if not file.is_file():
        raise EvalLogError(f"retain reference {file} does not exist; {_remake_hint(file, corpus)}")
    data = load_eval_json(file)
    meta = data["meta"]
    found = meta.get("corpus")
    if found is None and meta.get("forget_split") is not None:
        raise EvalLogError(
            f"retain reference {file} is a TOFU evaluation (forget split {meta['forget_split']!r}), not a MUSE one; "
            f"{_remake_hint(file, corpus)}"
        )
    if found is not None and found != corpus:
        raise EvalLogError(
            f"retain reference {file} was made on MUSE corpus {found!r}, but this evaluation uses {corpus!r}; "
            f"{_remake_hint(file, corpus)}"
        )
    recorded = meta.get("rows") or {}
    for split, count in (rows or {}).items():
        if split in recorded and recorded[split] != count:
            raise EvalLogError(
                f"retain reference {file} scored {recorded[split]} rows of {split} but this evaluation scores {count} "
                f"(a different --limit), so their MinK AUCs are not comparable; {_remake_hint(file, corpus)}"
            )
    entry = data["metrics"].get("mia_min_k")
    if not isinstance(entry, Mapping) or entry.get("agg_value") is None:
        return None
    return float(entry["agg_value"])


# --------------------------------------------------------------------------------------------------------------
# The evaluator


@dataclass
class MuseEvaluator:
    """Evaluates a causal LM on one MUSE corpus (spec §3.7)."""

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
    """Most target tokens of a teacher-forced example (VerbMem ``gt``, a privleak text); spec §1.5."""
    batch_size: int = 8
    """Examples per likelihood forward."""
    knowmem_batch_size: int = 16
    """Prompts per ``generate`` call for KnowMem."""
    verbmem_batch_size: int = 8
    """Prompts per ``generate`` call for VerbMem."""
    knowmem_max_new_tokens: int = 32
    """Greedy answer length for KnowMem."""
    verbmem_max_new_tokens: int = 128
    """Greedy continuation length for VerbMem."""
    metric_groups: tuple[MuseMetricGroup, ...] = ALL_MUSE_GROUPS
    """Which metrics to compute."""
    retain_reference: str | None = None
    """``eval.json`` of the retain model on the same corpus: its ``mia_min_k`` AUC is the privleak reference."""
    use_stemmer: bool = True
    """Porter stemming in ROUGE (open-unlearning); False as in the original MUSE code (P-22)."""
    limit: int | None = None
    """Evaluate only the first N rows of each split (the in-context shots are always all used)."""

    def __post_init__(self) -> None:
        problems = []
        unknown = [g for g in self.metric_groups if g not in ALL_MUSE_GROUPS]
        if unknown or not self.metric_groups:
            problems.append(f"--metrics {list(self.metric_groups)}: choose from {', '.join(ALL_MUSE_GROUPS)}")
        if self.corpus not in MUSE_HUB_DATASETS:
            problems.append(f"--corpus {self.corpus!r}: choose from {', '.join(MUSE_HUB_DATASETS)}")
        for flag in (
            "max_length",
            "batch_size",
            "knowmem_batch_size",
            "verbmem_batch_size",
            "knowmem_max_new_tokens",
            "verbmem_max_new_tokens",
        ):
            if getattr(self, flag) < 1:
                problems.append(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit must be >= 1 or unset, got {self.limit}")
        if self.tokenizer.pad_token_id is None:
            problems.append("the tokenizer has no pad token; load it with baldro_lightning.tokenization.load_tokenizer")
        if problems:
            raise ValueError("MuseEvaluator settings are invalid: " + "; ".join(problems))
        self.metric_groups = tuple(dict.fromkeys(self.metric_groups))
        self.rows = {name: self._load(name) for name in self.splits()}
        self.notes: list[str] = []
        self._reference_auc: float | None = None
        self._check_reference()

    def splits(self) -> list[str]:
        """The MUSE splits this evaluation reads."""
        names = []
        if "knowmem" in self.metric_groups:
            names += ["knowmem/forget_qa", "knowmem/forget_qa_icl", "knowmem/retain_qa", "knowmem/retain_qa_icl"]
        if "verbmem" in self.metric_groups:
            names.append("verbmem/forget")
        if "privleak" in self.metric_groups:
            names += list(PRIVLEAK_SPLITS)
        return names

    def _load(self, name: str) -> list[dict[str, Any]]:
        rows = load_muse_split(self.benchmark, self.corpus, name)
        return rows if self.limit is None or name.endswith("_icl") else rows[: self.limit]

    def _check_reference(self) -> None:
        """Read the retain reference now, before any model time is spent."""
        if "privleak" not in self.metric_groups:
            return
        if self.retain_reference is None:
            self.notes.append("privleak uses the default reference AUC 0.5 (no retain reference, spec P-23)")
            return
        counts = {name: len(self.rows[name]) for name in PRIVLEAK_SPLITS}
        self._reference_auc = reference_privleak_auc(self.retain_reference, self.corpus, counts)
        if self._reference_auc is None:
            self.notes.append(f"privleak uses the default reference AUC 0.5: {self.retain_reference} has no mia_min_k")
            log.warning("%s has no mia_min_k AUC; privleak falls back to the reference AUC 0.5", self.retain_reference)

    # -- model passes -------------------------------------------------------------------------------------------

    def _likelihood_examples(self) -> list[tuple[str, dict[str, Any], AnswerExample]]:
        examples = []
        if "verbmem" in self.metric_groups:
            for row in self.rows["verbmem/forget"]:
                encoded = encode_completion(
                    self.tokenizer, row["prompt"], row["gt"], self.max_length, insert_space=True
                )
                examples.append(("verbmem/forget", row, AnswerExample(encoded.input_ids, encoded.labels, True)))
        if "privleak" in self.metric_groups:
            for name in PRIVLEAK_SPLITS:
                for row in self.rows[name]:
                    encoded = encode_completion(self.tokenizer, "", row["text"], self.max_length)
                    examples.append((name, row, AnswerExample(encoded.input_ids, encoded.labels, True)))
        return examples

    def _knowmem_generations(self, model: nn.Module, side: Literal["forget", "retain"]) -> list[str]:
        shots = self.rows[f"knowmem/{side}_qa_icl"]
        prompts = [
            encode_knowmem_prompt(self.tokenizer, self.template, shots, row["question"])
            for row in self.rows[f"knowmem/{side}_qa"]
        ]
        log.info("KnowMem %s: generating %d answers after %d shots", side, len(prompts), len(shots))
        return generate_answers(
            model,
            self.tokenizer,
            prompts,
            self.knowmem_batch_size,
            self.knowmem_max_new_tokens,
            stop_strings=KNOWMEM_STOP_STRINGS,
        )

    def _verbmem_generations(self, model: nn.Module) -> list[str]:
        prompts = [encode_prefix(self.tokenizer, row["prompt"]) for row in self.rows["verbmem/forget"]]
        log.info("VerbMem: generating %d continuations of %d tokens", len(prompts), self.verbmem_max_new_tokens)
        return generate_answers(model, self.tokenizer, prompts, self.verbmem_batch_size, self.verbmem_max_new_tokens)

    def compute_metrics(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """Run the model on every loaded row and return the metric entries; submodule train/eval modes are kept."""
        out: dict[str, dict[str, Any]] = {}
        with evaluation_mode(model):
            examples = self._likelihood_examples()
            if examples:
                log.info("scoring %d texts (max_length=%d)", len(examples), self.max_length)
            scored = score_examples(model, [e for _, _, e in examples], self.batch_size, self.tokenizer.pad_token_id)
            if "knowmem" in self.metric_groups:
                for side in ("forget", "retain"):
                    rows = self.rows[f"knowmem/{side}_qa"]
                    generations = self._knowmem_generations(model, side)
                    out[f"{side}_knowmem_ROUGE"] = rouge_entry(
                        [row["index"] for row in rows], generations, [row["answer"] for row in rows], self.use_stemmer
                    )
            if "verbmem" in self.metric_groups:
                rows = self.rows["verbmem/forget"]
                out["forget_verbmem_ROUGE"] = rouge_entry(
                    [row["index"] for row in rows],
                    self._verbmem_generations(model),
                    [row["gt"] for row in rows],
                    self.use_stemmer,
                )
        by_split: dict[str, list[tuple[dict[str, Any], AnswerExample, ExampleScore]]] = {}
        for (name, row, example), score in zip(examples, scored, strict=True):
            by_split.setdefault(name, []).append((row, example, score))
        if "verbmem" in self.metric_groups:
            items = by_split["verbmem/forget"]
            out.update(
                memorization_entries(
                    [row["index"] for row, _, _ in items],
                    [score.pred_ids for _, _, score in items],
                    [score.target_ids for _, _, score in items],
                )
            )
        if "privleak" in self.metric_groups:
            members, nonmembers = (self._attack_scores(by_split[name]) for name in PRIVLEAK_SPLITS)
            out.update(
                mia_entries(
                    members,
                    nonmembers,
                    [row["index"] for row, _, _ in by_split[PRIVLEAK_SPLITS[0]]],
                    [row["index"] for row, _, _ in by_split[PRIVLEAK_SPLITS[1]]],
                    self._reference_auc,
                )
            )
        return out

    def _attack_scores(self, items: Sequence[tuple[dict[str, Any], AnswerExample, ExampleScore]]) -> dict[str, list]:
        nll = [score.nll_mean for _, _, score in items]
        token_logps = [score.token_logps for _, _, score in items]
        # ZLib compresses the scored text as decoded from its labelled tokens, specials skipped (spec §3.6).
        texts = [
            self.tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=True)
            for _, example, _ in items
        ]
        return {
            "mia_loss": metrics.mia_loss(nll).tolist(),
            "mia_zlib": metrics.mia_zlib(nll, texts).tolist(),
            "mia_min_k": metrics.mia_min_k(token_logps, MINK_FRACTION).tolist(),
            "mia_min_k_plus_plus": metrics.mia_min_k_plus_plus(
                token_logps, [s.mu for _, _, s in items], [s.sigma2 for _, _, s in items], MINK_FRACTION
            ).tolist(),
        }

    # -- whole runs ---------------------------------------------------------------------------------------------

    def meta(self, model: nn.Module, model_name: str | None = None) -> dict[str, Any]:
        """Provenance of an evaluation: model, data, settings, versions, time."""
        import transformers

        parameter = next(model.parameters(), None)
        config = getattr(model, "config", None)
        name = model_name or getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
        return {
            "model": name,
            "model_dtype": None if parameter is None else str(parameter.dtype).removeprefix("torch."),
            "benchmark": str(self.benchmark),
            "corpus": self.corpus,
            "rows": {split: len(rows) for split, rows in self.rows.items()},
            "limit": self.limit,
            "metric_groups": list(self.metric_groups),
            "max_length": self.max_length,
            "knowmem_max_new_tokens": self.knowmem_max_new_tokens,
            "verbmem_max_new_tokens": self.verbmem_max_new_tokens,
            "knowmem_stop_strings": list(KNOWMEM_STOP_STRINGS),
            "generation": "greedy, left-padded prompts, new tokens decoded without special tokens, stripped",
            "rouge": f"rougeL_f1 ({'with' if self.use_stemmer else 'without'} Porter stemming, rouge_score)",
            "mink_fraction": MINK_FRACTION,
            "batch_size": self.batch_size,
            "template": dataclasses.asdict(self.template),
            "retain_reference": None if self.retain_reference is None else str(self.retain_reference),
            "privleak_reference_auc": 0.5 if self._reference_auc is None else self._reference_auc,
            "notes": list(self.notes),
            "versions": {
                "baldro_lightning": baldro_lightning.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    def evaluate(self, model: nn.Module, model_name: str | None = None) -> dict[str, Any]:
        """Score every loaded row and aggregate: ``{"meta": ..., "metrics": ...}``."""
        started = time.perf_counter()
        result = {"meta": self.meta(model, model_name), "metrics": self.compute_metrics(model)}
        result["meta"]["elapsed_s"] = round(time.perf_counter() - started, 3)
        return result

    def run(self, model: nn.Module, out: str | os.PathLike[str], model_name: str | None = None) -> dict[str, Any]:
        """:meth:`evaluate`, then write the result to ``out`` atomically (nothing is written if anything fails)."""
        result = self.evaluate(model, model_name)
        write_eval_json(result, out)
        return result


# --------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m baldro_lightning.muse_evaluation",
        description="Evaluate a causal LM on one MUSE corpus and write eval.json (spec §3.7).",
    )
    parser.add_argument("--model", required=True, help="model directory (save_pretrained) or Hub id in the cache")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or id; defaults to --model")
    parser.add_argument(
        "--benchmark",
        required=True,
        help="directory of MUSE jsonl files ({corpus}_{config}_{split}.jsonl or {config}/{split}.jsonl), or a Hub id",
    )
    parser.add_argument("--corpus", default="news", choices=list(MUSE_HUB_DATASETS), help="MUSE corpus")
    parser.add_argument("--out", required=True, help="path of the eval.json to write")
    parser.add_argument(
        "--retain_reference", default=None, help="eval.json of the retain model on the same corpus (privleak reference)"
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each split")
    parser.add_argument(
        "--metrics", nargs="+", default=list(ALL_MUSE_GROUPS), choices=ALL_MUSE_GROUPS, help="metric groups"
    )
    parser.add_argument("--max_length", type=int, default=2048, help="most target tokens per teacher-forced text")
    parser.add_argument("--batch_size", type=int, default=8, help="texts per likelihood forward")
    parser.add_argument("--knowmem_batch_size", type=int, default=16, help="KnowMem prompts per generate call")
    parser.add_argument("--verbmem_batch_size", type=int, default=8, help="VerbMem prompts per generate call")
    parser.add_argument("--knowmem_max_new_tokens", type=int, default=32, help="KnowMem answer length")
    parser.add_argument("--verbmem_max_new_tokens", type=int, default=128, help="VerbMem continuation length")
    parser.add_argument(
        "--stemmer", action=argparse.BooleanOptionalAction, default=True, help="Porter stemming in ROUGE (P-22)"
    )
    parser.add_argument("--chat", action="store_true", help="render KnowMem prompts with the tokenizer's chat template")
    parser.add_argument("--system_prompt", default=None, help="system message (with --chat)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    return parser


def _build_evaluator(args: argparse.Namespace) -> MuseEvaluator:
    """Tokenizer, splits and retain reference, all checked before any model weight is loaded."""
    from baldro_lightning.tokenization import load_tokenizer

    return MuseEvaluator(
        benchmark=args.benchmark,
        tokenizer=load_tokenizer(args.tokenizer or args.model),
        corpus=args.corpus,
        template=PromptTemplate(chat=args.chat, system_prompt=args.system_prompt),
        max_length=args.max_length,
        batch_size=args.batch_size,
        knowmem_batch_size=args.knowmem_batch_size,
        verbmem_batch_size=args.verbmem_batch_size,
        knowmem_max_new_tokens=args.knowmem_max_new_tokens,
        verbmem_max_new_tokens=args.verbmem_max_new_tokens,
        metric_groups=tuple(args.metrics),
        retain_reference=args.retain_reference,
        use_stemmer=args.stemmer,
        limit=args.limit,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse arguments, evaluate, write ``--out``, print the aggregates; returns the written result."""
    from baldro_lightning.evaluate import format_table
    from baldro_lightning.module import load_causal_lm

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score logs every scorer it builds
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        evaluator = _build_evaluator(args)
    except ValueError as err:  # bad flags, data or reference: a message, not a traceback
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    model = load_causal_lm(args.model, args.dtype).to(device)
    result = evaluator.run(model, args.out, model_name=args.model)
    print(format_table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
