"""Rows per second of the batched TOFU evaluator vs a naive one-example-at-a-time loop on the same rows.

Both paths compute every metric group (forget, retain_perturbed, real authors, world facts, MIA with the
holdout split). The naive loop runs one forward per answer (answer, paraphrase, each perturbed answer) and one
``generate`` per prompt, then feeds the same per-row columns to :meth:`TofuEvaluator.aggregate`; the script
asserts that every likelihood metric (per row and aggregate) agrees within ``--atol``/``--rtol`` and reports how
many generations are identical (greedy decoding may flip on near-ties when batch shapes change numerics).

Timings are medians over ``--repeats`` after one warm-up evaluation of two rows per split. The naive loop is slow
by design: at ``--max_new_tokens 200`` it runs one ``generate`` per prompt, and a model that never emits EOS (a
randomly initialised one) generates all 200 tokens every time, about 1 s per prompt for the embedded model on one
CPU thread, so a full pass over the 296 generated rows takes minutes. Each phase is printed as it ends, so a long
run shows where it is and a stopped one keeps what it measured. Example::

    OMP_NUM_THREADS=1 python experiments/benchmarks/eval_throughput.py --model models/embedded/target \
        --benchmark data/tofu_embedded
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
import torch.nn.functional as F

from baldro_lightning.data.tokenization import (
    IGNORE_INDEX,
    PromptTemplate,
    encode_example,
    encode_prompt,
    load_tokenizer,
)
from baldro_lightning.evaluation import metrics
from baldro_lightning.evaluation.engine import MINK_FRACTION, RowScores
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


def _say(text: str) -> None:
    # Flushed at once: stdout to a pipe or file is block-buffered, and a run stopped before its end would show nothing.
    print(text, flush=True)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--benchmark", required=True)
    parser.add_argument("--forget_split", default="forget10", choices=["forget01", "forget05", "forget10"])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each split (both paths)")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes of each path (median reported)")
    parser.add_argument("--dtype", default="float32", choices=get_args(TorchDtype))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--chat", action="store_true")
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1 (timed passes of each path), got {args.repeats}")

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, args.dtype).to(device)

    def evaluator(limit: int | None) -> TofuEvaluator:
        return TofuEvaluator(
            args.benchmark,
            tokenizer,
            args.forget_split,
            template=PromptTemplate(chat=args.chat),
            settings=TofuSettings(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=limit),
        )

    bench = evaluator(args.limit)
    items = sum(len(rows) for rows in bench.rows.values())
    prompts = sum(len(bench.rows[p.role][: bench.settings.rouge_rows_limit]) for p in bench.plans() if p.generate)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = bench.meta(model)["rows"]
    _say(f"{items} items (rows: {', '.join(f'{k} {v}' for k, v in rows.items())}) on {device_name}, {args.dtype}")
    _say(
        f"batch_size {args.batch_size}, max_new_tokens {args.max_new_tokens}, {prompts} generated answers per pass, "
        f"{args.repeats} timed pass(es) of each path"
    )

    warmup = evaluator(2)
    seconds, _ = _timed(lambda: (warmup.evaluate(model), naive_scores(warmup, model)), device)
    _say(f"warm-up (2 rows per split, both paths): {seconds:.1f} s")

    batched_times, naive_times = [], []
    batched = naive = None
    for repeat in range(1, args.repeats + 1):
        seconds, batched = _timed(lambda: bench.evaluate(model)["metrics"], device)
        batched_times.append(seconds)
        _say(f"pass {repeat}: batched {seconds:.2f} s ({items / seconds:.2f} items/s)")
        seconds, naive = _timed(lambda: bench.aggregate(naive_scores(bench, model)), device)
        naive_times.append(seconds)
        _say(f"pass {repeat}: naive   {seconds:.2f} s ({items / seconds:.2f} items/s)")
    worst, failures = compare(batched, naive, args.atol, args.rtol)
    same_generation = total_generation = 0
    for name, entry in batched.items():
        if name.endswith("_ROUGE"):
            for key, row in entry["value_by_index"].items():
                total_generation += 1
                same_generation += row["generation"] == naive[name]["value_by_index"][key]["generation"]

    batched_s, naive_s = statistics.median(batched_times), statistics.median(naive_times)
    largest = max(worst.values(), default=0.0)
    report = {
        "model": args.model,
        "device": device_name,
        "dtype": args.dtype,
        "rows": rows,
        "items": items,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "batched_s": batched_times,
        "naive_s": naive_times,
        "batched_items_per_s": items / batched_s,
        "naive_items_per_s": items / naive_s,
        "speedup": naive_s / batched_s,
        "max_abs_diff": worst,
        "largest_abs_diff": largest,
        "disagreements": len(failures),
        "identical_generations": f"{same_generation}/{total_generation}",
    }
    _say(f"batched: {report['batched_items_per_s']:.2f} items/s (median {batched_s:.2f} s)")
    _say(f"naive:   {report['naive_items_per_s']:.2f} items/s (median {naive_s:.2f} s, one answer/prompt per call)")
    _say(f"speedup: {report['speedup']:.1f}x")
    _say(
        f"max abs difference of the likelihood values (per row and aggregate): {largest:.2e} "
        f"({'within' if not failures else 'NOT within'} atol={args.atol}, rtol={args.rtol}); "
        f"identical generations {report['identical_generations']}"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    if failures:
        raise SystemExit(
            f"{len(failures)} likelihood values of the batched evaluator differ from the naive loop beyond "
            f"--atol={args.atol} --rtol={args.rtol}, e.g. " + "; ".join(failures[:5])
        )
    return report


if __name__ == "__main__":
    main()
