"""Evaluation speed: the TOFU evaluator against the evaluator before issue 18 and a one-item loop, at equal values.

Every path computes every metric group (forget, retain_perturbed, real authors, world facts, MIA with the holdout
split) on the same rows, then :meth:`TofuEvaluator.aggregate` turns its per-row values into metrics:

- ``new``: :meth:`TofuEvaluator.score` with its default engine (``prompt_cache``: each distinct prefix of a
  question's answers, the prompt first, runs once; greedy tokens that the scored answers prove are taken, the rest
  decoded from the prompt's keys and values that scoring kept, finished rows leaving the batch). This is what
  ``python -m baldro_lightning evaluate`` and the in-training callbacks run.
- ``current``: :func:`pinned_current_scores`, the evaluator's scoring as of commit f56ffc7 (before issue 18), pinned
  here as the baseline: one padded forward per batch of whole examples, one ``model.generate`` per batch of prompts,
  each example tokenised on its own, ROUGE with rouge_score's own stemmer.
- ``naive``: one forward per answer and one ``generate`` per prompt (:func:`naive_scores`).

Passes are interleaved: each pass runs every path once, in an order rotated from pass to pass, so load changes hit
all paths alike; each pass builds a fresh evaluator, so tokenisation counts as in a standalone evaluation. Every pass
records wall and CPU seconds (CPU: this process's, all threads; on several ranks, summed over ranks): on a shared
machine CPU time is the steadier measure. Reported per path: the median, the ratio of medians against ``new``, the
median and range of the per-pass ratios, and the load average before and after.

Values (checked after the timed passes, on the last pass's results): every per-item NLL (answer, paraphrase, each
perturbed answer) of ``new`` within ``--atol`` of ``current``'s and ``naive``'s; every per-row and aggregate
likelihood metric within ``--atol + --rtol * |value|``; every generation identical. The script exits with status 1
when a value differs, naming the first ones.

On 2 ranks (in-training evaluation shards rows over ranks; FSDP2 generates with ``synced_gpus``)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 experiments/benchmarks/eval_throughput.py \\
        --model models/embedded/target --benchmark data/tofu_embedded --paths new current --sharding fsdp2

each rank scores its share of every split (``shard_rows``), the shares are gathered and every rank aggregates, as
:class:`~baldro_lightning.evaluation.callbacks.TofuEvaluation` does; ``naive`` runs in one process only. One process::

    OMP_NUM_THREADS=1 python experiments/benchmarks/eval_throughput.py --model models/embedded/target \\
        --benchmark data/tofu_embedded --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rouge_score import rouge_scorer

from baldro_lightning.data.tokenization import (
    IGNORE_INDEX,
    PromptTemplate,
    encode_example,
    encode_prompt,
    load_tokenizer,
)
from baldro_lightning.evaluation import metrics
from baldro_lightning.evaluation.engine import (
    MINK_FRACTION,
    AnswerExample,
    ExampleScore,
    RowScores,
    generate_answers,
    score_examples,
    shard_rows,
)
from baldro_lightning.evaluation.tofu import Role, TofuEvaluator, TofuSettings
from baldro_lightning.train.models import TorchDtype, eval_mode, load_causal_lm

LIKELIHOOD_METRICS = (
    "forget_Q_A_Prob",
    "forget_Q_A_PARA_Prob",
    "forget_Q_A_PERT_Prob",
    "forget_truth_ratio",
    "extraction_strength",
    "exact_memorization",
    "retain_Q_A_Prob",
    "retain_Truth_Ratio",
    "ra_Q_A_Prob_normalised",
    "ra_Truth_Ratio",
    "wf_Q_A_Prob_normalised",
    "wf_Truth_Ratio",
    "mia_loss",
    "mia_zlib",
    "mia_min_k",
    "mia_min_k_plus_plus",
)
NLL_COLUMNS = ("answer_nll", "para_nll", "pert_nll")
PATHS = ("new", "current", "naive")


def pinned_current_scores(
    evaluator: TofuEvaluator,
    model: torch.nn.Module,
    rows: Mapping[Role, Sequence[Mapping[str, Any]]] | None = None,
    synced_gpus: bool = False,
) -> dict[Role, RowScores]:
    """:meth:`TofuEvaluator.score` as of commit f56ffc7, before issue 18: the baseline of the ``current`` path.

    Every answer is a whole example (prompt included) in one pool scored by
    :func:`~baldro_lightning.evaluation.engine.score_examples`, each tokenised on its own; generation is
    :func:`~baldro_lightning.evaluation.engine.generate_answers` (``model.generate`` per batch of prompts).
    """
    rows = evaluator.rows if rows is None else rows
    tasks = [(plan, list(rows[plan.role])) for plan in evaluator.plans() if plan.role in rows]
    tokenizer, template = evaluator.tokenizer, evaluator.template

    def encode(row: Mapping[str, Any], answer: str, token_stats: bool) -> AnswerExample:
        example = encode_example(tokenizer, template, row["question"], answer, evaluator.max_length)
        return AnswerExample(example.input_ids, example.labels, token_stats)

    with torch.no_grad(), eval_mode(model):
        examples: list[AnswerExample] = []
        slots: list[tuple[int, int, str]] = []  # (task, row position, variant)
        for task, (plan, task_rows) in enumerate(tasks):
            for position, row in enumerate(task_rows):
                examples.append(encode(row, row["answer"], plan.token_stats))
                slots.append((task, position, "answer"))
                if plan.paraphrased:
                    examples.append(encode(row, row["paraphrased_answer"], False))
                    slots.append((task, position, "para"))
                if plan.perturbed:
                    for wrong in row["perturbed_answer"]:
                        examples.append(encode(row, wrong, False))
                        slots.append((task, position, "pert"))
        settings = evaluator.settings
        scored = score_examples(model, examples, settings.batch_size, tokenizer.pad_token_id, synced_gpus)
        answers: list[list[ExampleScore | None]] = [[None] * len(r) for _, r in tasks]
        labels: list[list[list[int]]] = [[[] for _ in r] for _, r in tasks]
        para: list[list[float]] = [[math.nan] * len(r) for _, r in tasks]
        pert: list[list[list[float]]] = [[[] for _ in r] for _, r in tasks]
        for (task, position, variant), example, result in zip(slots, examples, scored, strict=True):
            if variant == "answer":
                answers[task][position] = result
                labels[task][position] = example.labels
            elif variant == "para":
                para[task][position] = result.nll_mean
            else:
                pert[task][position].append(result.nll_mean)
        prompts, prompt_slots = [], []
        for task, (plan, task_rows) in enumerate(tasks):
            if plan.generate:
                chosen = evaluator._generated_indices(plan.role)
                for position, row in enumerate(task_rows):
                    if chosen is None or int(row["index"]) in chosen:
                        prompts.append(encode_prompt(tokenizer, template, row["question"]))
                        prompt_slots.append((task, position))
        texts = generate_answers(
            model,
            tokenizer,
            prompts,
            settings.generation_batch_size or settings.batch_size,
            settings.max_new_tokens,
            synced_gpus,
        )
        generations: list[dict[int, str]] = [{} for _ in tasks]
        for (task, position), text in zip(prompt_slots, texts, strict=True):
            generations[task][position] = text
        out: dict[Role, RowScores] = {}
        for task, (plan, task_rows) in enumerate(tasks):
            scores = RowScores(plan.role, plan.split, [int(row["index"]) for row in task_rows])
            row_answers = cast(list[ExampleScore], answers[task])
            scores.columns["answer_nll"] = [a.nll_mean for a in row_answers]
            if plan.paraphrased:
                scores.columns["para_nll"] = para[task]
            if plan.perturbed:
                scores.columns["pert_nll"] = pert[task]
            if plan.token_stats:
                evaluator._token_columns(scores, row_answers, labels[task])
            if plan.generate:
                _pinned_rouge_columns(scores, task_rows, generations[task])
            out[plan.role] = scores
    return out


@functools.lru_cache(maxsize=1)
def _pinned_rouge_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def _pinned_rouge_columns(scores: RowScores, rows: Sequence[Mapping[str, Any]], generated: dict[int, str]) -> None:
    """``TofuEvaluator._rouge_columns`` as of commit f56ffc7: rouge_score's scorer, its stemmer without memory."""
    positions = sorted(generated)
    names = ("generation", "rouge1_recall", "rougeL_recall", "rougeL_f1")
    columns: dict[str, list[Any]] = {name: [None] * len(rows) for name in names}
    for position in positions:
        result = _pinned_rouge_scorer().score(target=rows[position]["answer"].strip(), prediction=generated[position])
        columns["generation"][position] = generated[position]
        columns["rouge1_recall"][position] = float(result["rouge1"].recall)
        columns["rougeL_recall"][position] = float(result["rougeL"].recall)
        columns["rougeL_f1"][position] = float(result["rougeL"].fmeasure)
    scores.columns.update(columns)


def _single_answer(model, evaluator: TofuEvaluator, question: str, answer: str, token_stats: bool) -> dict[str, Any]:
    """One forward of one example; NLL by plain cross-entropy, token statistics from that example's logits."""
    example = encode_example(evaluator.tokenizer, evaluator.template, question, answer, evaluator.max_length)
    device = next(model.parameters()).device
    ids = torch.tensor([example.input_ids], device=device)
    labels = torch.tensor(example.labels, device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1]  # (T-1, V)
    targets = labels[1:]
    out: dict[str, Any] = {
        "nll": F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX).item(),
        "labels": example.labels,
    }
    if token_stats:
        positions = torch.nonzero(targets != IGNORE_INDEX).flatten()[:-1]  # the last target is EOS (methods §3.1b)
        logp = torch.log_softmax(logits[positions].float(), dim=-1)
        picked = targets[positions]
        mu, sigma2 = metrics.min_k_plus_plus_stats(logits[positions], from_logits=True)
        out |= {
            "token_logps": logp.gather(-1, picked.unsqueeze(-1)).squeeze(-1).cpu().numpy(),
            "pred_ids": logp.argmax(-1).cpu().numpy(),
            "target_ids": picked.cpu().numpy(),
            "mu": mu.cpu().numpy(),
            "sigma2": sigma2.cpu().numpy(),
        }
    return out


def naive_scores(evaluator: TofuEvaluator, model) -> dict[Role, RowScores]:
    """The evaluator's per-row columns, computed one answer and one prompt at a time."""
    tokenizer = evaluator.tokenizer
    out: dict[Role, RowScores] = {}
    with torch.no_grad(), eval_mode(model):
        for plan in evaluator.plans():
            rows = evaluator.rows[plan.role]
            columns: dict[str, list[Any]] = defaultdict(list)
            answers = []
            for row in rows:
                answer = _single_answer(model, evaluator, row["question"], row["answer"], plan.token_stats)
                answers.append(answer)
                columns["answer_nll"].append(answer["nll"])
                if plan.paraphrased:
                    para = _single_answer(model, evaluator, row["question"], row["paraphrased_answer"], False)
                    columns["para_nll"].append(para["nll"])
                if plan.perturbed:
                    wrong = [
                        _single_answer(model, evaluator, row["question"], a, False) for a in row["perturbed_answer"]
                    ]
                    columns["pert_nll"].append([w["nll"] for w in wrong])
            if plan.token_stats:
                nll = columns["answer_nll"]
                texts = [
                    tokenizer.decode([t for t in a["labels"] if t != IGNORE_INDEX], skip_special_tokens=True)
                    for a in answers
                ]
                logps = [a["token_logps"] for a in answers]
                preds, targets = [a["pred_ids"] for a in answers], [a["target_ids"] for a in answers]
                columns["mia_loss"] = metrics.mia_loss(nll).tolist()
                columns["mia_zlib"] = metrics.mia_zlib(nll, texts).tolist()
                columns["mia_min_k"] = metrics.mia_min_k(logps, MINK_FRACTION).tolist()
                columns["mia_min_k_plus_plus"] = metrics.mia_min_k_plus_plus(
                    logps, [a["mu"] for a in answers], [a["sigma2"] for a in answers], MINK_FRACTION
                ).tolist()
                columns["extraction_strength"] = metrics.extraction_strength(preds, targets).tolist()
                columns["exact_memorization"] = metrics.exact_memorization(preds, targets).tolist()
            if plan.generate:
                generated = rows[: evaluator.settings.rouge_rows_limit]
                texts = []
                for row in generated:
                    prompt = encode_prompt(tokenizer, evaluator.template, row["question"])
                    ids = torch.tensor([prompt], device=next(model.parameters()).device)
                    output = model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        do_sample=False,
                        max_new_tokens=evaluator.settings.max_new_tokens,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                    texts.append(tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True).strip())
                rouge = metrics.rouge_scores(texts, [row["answer"].strip() for row in generated])
                missing = [None] * (len(rows) - len(generated))
                columns["generation"] = texts + missing
                for name, values in rouge.items():
                    columns[name] = values.tolist() + missing
            out[plan.role] = RowScores(plan.role, plan.split, [int(row["index"]) for row in rows], dict(columns))
    return out


def _flat(value: Any) -> np.ndarray:
    return np.atleast_1d(np.asarray(value, dtype=np.float64))


def compare(
    batched: Mapping[str, Any], naive: Mapping[str, Any], atol: float, rtol: float
) -> tuple[dict[str, float], list[str]]:
    """Largest absolute difference per likelihood metric, and every value beyond ``atol + rtol·|naive|``."""
    worst: dict[str, float] = {}
    failures: list[str] = []
    for name in LIKELIHOOD_METRICS:
        if name not in batched:
            continue
        pairs = [(batched[name]["agg_value"], naive[name]["agg_value"])]
        for field in ("value_by_index", "holdout_value_by_index"):
            by_index = batched[name].get(field, {})
            pairs += [(value, naive[name][field][key]) for key, value in by_index.items()]
        diffs = []
        for got, want in pairs:
            got_arr, want_arr = _flat(got), _flat(want)
            diff = np.abs(got_arr - want_arr)
            diffs.append(float(np.nanmax(diff)) if diff.size and not np.all(np.isnan(diff)) else 0.0)
            if np.any(diff > atol + rtol * np.abs(want_arr)) or np.any(np.isnan(got_arr) != np.isnan(want_arr)):
                failures.append(f"{name}: batched {got} vs naive {want}")
        worst[name] = max(diffs)
    return worst, failures


def nll_difference(got: Mapping[str, RowScores], want: Mapping[str, RowScores]) -> tuple[float, float, int]:
    """Largest |difference| of the per-item NLL and of the per-item probability ``exp(-NLL)`` over every scored
    answer (answer, paraphrase, each perturbed answer) of every split, and the number of items compared."""
    nll = prob = 0.0
    items = 0
    for role, scores in want.items():
        for name in NLL_COLUMNS:
            if name not in scores.columns:
                continue
            a = np.asarray(got[role].columns[name], dtype=np.float64).ravel()
            b = np.asarray(scores.columns[name], dtype=np.float64).ravel()
            items += b.size
            nll = max(nll, float(np.max(np.abs(a - b), initial=0.0)))
            prob = max(prob, float(np.max(np.abs(np.exp(-a) - np.exp(-b)), initial=0.0)))
    return nll, prob, items


def generation_differences(got: Mapping[str, Any], want: Mapping[str, Any]) -> tuple[int, list[str]]:
    """Number of generations compared, and a line for each that differs."""
    total, differing = 0, []
    for name, entry in want.items():
        if not name.endswith("_ROUGE"):
            continue
        for key, row in entry["value_by_index"].items():
            total += 1
            mine = got[name]["value_by_index"][key]["generation"]
            if mine != row["generation"]:
                differing.append(f"{name}[{key}]: {mine!r} != {row['generation']!r}")
    return total, differing


def _say(text: str) -> None:
    # Flushed at once: stdout to a pipe or file is block-buffered, and a run stopped before its end would show nothing.
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(text, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _gathered(local: dict[Role, RowScores]) -> dict[Role, RowScores]:
    """Every rank's per-row values joined on every rank, as the in-training callback gathers them."""
    if not (dist.is_available() and dist.is_initialized()):
        return local
    parts: list[dict[Role, RowScores]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, local)
    return {role: RowScores.concat([p[role] for p in parts if p[role].indices]) for role in local}


def timed_pass(
    path: str, evaluator: TofuEvaluator, model: torch.nn.Module, device: torch.device, synced: bool
) -> tuple[float, float, dict[Role, RowScores], dict[str, Any]]:
    """Wall and CPU seconds of one evaluation on ``path``, its per-row values and its metrics.

    On several ranks each scores its share of every split (round-robin, as the callback), the values are gathered
    and every rank aggregates; wall time spans the slowest rank, CPU time is summed over ranks.
    """
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    local = {role: shard_rows(rows, rank, world) for role, rows in evaluator.rows.items()}
    score: Callable[[], dict[Role, RowScores]] = {
        "new": lambda: evaluator.score(model, local, synced_gpus=synced),
        "current": lambda: pinned_current_scores(evaluator, model, local, synced_gpus=synced),
        "naive": lambda: naive_scores(evaluator, model),
    }[path]
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    scores = _gathered(score())
    result = evaluator.aggregate(scores)
    _sync(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if dist.is_initialized():
        total = torch.tensor([cpu], dtype=torch.float64)
        dist.all_reduce(total)
        cpu = float(total.item())
    return wall, cpu, scores, result


def _ratios(times: Mapping[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    """Per path: median, ratio of medians ``path / base`` and the per-pass ratios' median and range."""
    out = {}
    for path, values in times.items():
        per_pass = [t / b for t, b in zip(values, times[base], strict=True)]
        out[path] = {
            "median_s": statistics.median(values),
            "ratio_of_medians": statistics.median(values) / statistics.median(times[base]),
            "pass_ratio_median": statistics.median(per_pass),
            "pass_ratio_min": min(per_pass),
            "pass_ratio_max": max(per_pass),
        }
    return out


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--benchmark", required=True)
    parser.add_argument("--forget_split", default="forget10", choices=["forget01", "forget05", "forget10"])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--max_length", type=int, default=512, help="most tokens per likelihood example")
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each split (every path)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed passes (medians reported)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS, help="paths to time; new always")
    parser.add_argument("--sharding", default="replicated", choices=["replicated", "fsdp2"], help="with 2+ ranks")
    parser.add_argument("--dtype", default="float32", choices=get_args(TorchDtype))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--chat", action="store_true")
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1 (timed passes of each path), got {args.repeats}")
    paths = ["new", *[p for p in args.paths if p != "new"]]
    # The tokenizers library's batch calls use a thread pool whose idle threads spin; CPU time would count them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "naive" in paths:
        parser.error("--paths naive runs in one process only; drop it under torchrun")

    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo" if args.device in ("cpu", "auto") and not torch.cuda.is_available() else None)
    if args.device == "auto":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, args.dtype).to(device)
    synced = world > 1 and args.sharding == "fsdp2"
    if synced:
        from torch.distributed.device_mesh import init_device_mesh

        from baldro_lightning.train.sharding import shard_model

        shard_model(model, init_device_mesh(device.type, (world,)))

    def evaluator(limit: int | None) -> TofuEvaluator:
        return TofuEvaluator(
            args.benchmark,
            tokenizer,
            args.forget_split,
            template=PromptTemplate(chat=args.chat),
            max_length=args.max_length,
            settings=TofuSettings(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=limit),
        )

    bench = evaluator(args.limit)
    items = sum(len(rows) for rows in bench.rows.values())
    answers = sum(len(TofuEvaluator._answers(p, row)) for p in bench.plans() for row in bench.rows[p.role])
    prompts = sum(len(bench.rows[p.role][: bench.settings.rouge_rows_limit]) for p in bench.plans() if p.generate)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = bench.meta(model)["rows"]
    load_before = _load()
    _say(f"{items} items (rows: {', '.join(f'{k} {v}' for k, v in rows.items())}), {answers} scored answers")
    _say(
        f"{device_name}, {args.dtype}, {world} rank(s){f' ({args.sharding})' if world > 1 else ''}, threads "
        f"{torch.get_num_threads()}, batch_size {args.batch_size}, max_new_tokens {args.max_new_tokens}, {prompts} "
        f"generated answers per pass; paths {', '.join(paths)}, {args.repeats} interleaved pass(es); load {load_before}"
    )
    for path in paths:
        seconds, _, _, _ = timed_pass(path, evaluator(2), model, device, synced)
        _say(f"warm-up {path} (2 rows per split): {seconds:.1f} s")

    wall: dict[str, list[float]] = {path: [] for path in paths}
    cpu: dict[str, list[float]] = {path: [] for path in paths}
    last: dict[str, tuple[dict[Role, RowScores], dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        shift = repeat % len(paths)
        for path in paths[shift:] + paths[:shift]:
            seconds, cpu_seconds, scores, result = timed_pass(path, evaluator(args.limit), model, device, synced)
            wall[path].append(seconds)
            cpu[path].append(cpu_seconds)
            last[path] = (scores, result)
            _say(f"pass {repeat + 1}: {path:7s} wall {seconds:7.2f} s  cpu {cpu_seconds:7.2f} s")
    load_after = _load()

    wall_ratios, cpu_ratios = _ratios(wall, "new"), _ratios(cpu, "new")
    checks: dict[str, Any] = {}
    failures: list[str] = []
    new_scores, new_metrics = last["new"]
    for path in paths[1:]:
        scores, result = last[path]
        nll, prob, compared = nll_difference(new_scores, scores)
        worst, metric_failures = compare(new_metrics, result, args.atol, args.rtol)
        total, differing = generation_differences(new_metrics, result)
        checks[path] = {
            "items_compared": compared,
            "max_abs_nll_diff": nll,
            "max_abs_probability_diff": prob,
            "max_abs_metric_diff": worst,
            "metric_disagreements": len(metric_failures),
            "identical_generations": f"{total - len(differing)}/{total}",
        }
        if nll > args.atol:
            failures.append(f"new vs {path}: per-item NLL differs by {nll:.2e} > --atol {args.atol}")
        failures += [f"new vs {path}: {line}" for line in metric_failures[:5] + differing[:5]]

    header = ("path", "wall med s", "items/s", "x new", "per pass [min, max]", "cpu med s", "x new", "per pass")
    _say("{:8s} {:>10s} {:>8s} {:>6s} {:>20s} {:>10s} {:>6s} {:>20s}".format(*header))
    for path in paths:
        w, c = wall_ratios[path], cpu_ratios[path]
        spread = [
            f"{r['pass_ratio_median']:.2f} [{r['pass_ratio_min']:.2f}, {r['pass_ratio_max']:.2f}]" for r in (w, c)
        ]
        _say(
            f"{path:8s} {w['median_s']:10.2f} {items / w['median_s']:8.1f} {w['ratio_of_medians']:6.2f} "
            f"{spread[0]:>20s} {c['median_s']:10.2f} {c['ratio_of_medians']:6.2f} {spread[1]:>20s}"
        )
    _say("x new: how many times longer than the new evaluator (ratio of medians; per pass: median and range)")
    for path, check in checks.items():
        _say(
            f"new vs {path}: {check['items_compared']} per-item NLLs within {check['max_abs_nll_diff']:.2e} "
            f"(probabilities {check['max_abs_probability_diff']:.2e}); metrics "
            f"{'within' if not check['metric_disagreements'] else 'NOT within'} atol={args.atol} rtol={args.rtol} "
            f"(largest {max(check['max_abs_metric_diff'].values(), default=0.0):.2e}); identical generations "
            f"{check['identical_generations']}"
        )
    _say(f"load average (1, 5, 15 min): {load_before} before, {load_after} after")
    report = {
        "model": args.model,
        "device": device_name,
        "dtype": args.dtype,
        "world_size": world,
        "sharding": args.sharding if world > 1 else None,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "items": items,
        "scored_answers": answers,
        "generated_answers": prompts,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "wall_s": wall,
        "cpu_s": cpu,
        "wall": wall_ratios,
        "cpu": cpu_ratios,
        "items_per_s": {path: items / wall_ratios[path]["median_s"] for path in paths},
        "checks": checks,
        "load_before": load_before,
        "load_after": load_after,
    }
    if args.out and (not dist.is_initialized() or dist.get_rank() == 0):
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if failures:
        raise SystemExit("values differ: " + "; ".join(failures[:10]))
    return report


if __name__ == "__main__":
    main()
