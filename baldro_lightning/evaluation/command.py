"""``python -m baldro_lightning evaluate`` and ``evaluate-muse``: evaluate a saved model on TOFU or MUSE and write its
``eval.json``.

Example (the retain model first, so the target's forget quality and privleak have a reference)::

    python -m baldro_lightning evaluate --model models/embedded/retain --benchmark data/tofu_embedded \\
        --forget_split forget10 --out runs/eval/retain/eval.json
    python -m baldro_lightning evaluate --model models/embedded/target --benchmark data/tofu_embedded \\
        --forget_split forget10 --out runs/eval/target/eval.json --retain_reference runs/eval/retain/eval.json
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, get_args

import torch

from baldro_lightning.data.muse import MUSE_HUB_DATASETS
from baldro_lightning.data.tokenization import PromptTemplate, load_tokenizer
from baldro_lightning.evaluation.muse import ALL_MUSE_GROUPS, MuseEvaluator
from baldro_lightning.evaluation.tofu import ALL_GROUPS, BenchmarkEvaluator, TofuEvaluator
from baldro_lightning.train.models import TorchDtype, load_causal_lm

log = logging.getLogger(__name__)


def add_common_arguments(parser: argparse.ArgumentParser, benchmark_help: str, reference_help: str) -> None:
    """Flags every evaluation command has: model, data, output, retain reference, prompt form, dtype, device."""
    parser.add_argument("--model", required=True, help="model directory (save_pretrained) or Hub id in the cache")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or id; defaults to --model")
    parser.add_argument("--benchmark", required=True, help=benchmark_help)
    parser.add_argument("--out", required=True, help="path of the eval.json to write")
    parser.add_argument("--retain_reference", default=None, help=reference_help)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each split")
    parser.add_argument("--chat", action="store_true", help="render prompts with the tokenizer's chat template")
    parser.add_argument("--system_prompt", default=None, help="system message (with --chat)")
    parser.add_argument("--dtype", default="float32", choices=get_args(TorchDtype), help="weights dtype")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m baldro_lightning evaluate",
        description="Evaluate a causal LM on the TOFU splits of one forget split and write eval.json (spec §3).",
    )
    add_common_arguments(
        parser,
        benchmark_help="directory of TOFU {split}.jsonl files, or a Hub id",
        reference_help="eval.json of the retain model on the same forget split (enables forget_quality, privleak "
        "reference)",
    )
    parser.add_argument("--forget_split", default="forget10", choices=["forget01", "forget05", "forget10"])
    parser.add_argument("--batch_size", type=int, default=32, help="examples per likelihood forward")
    parser.add_argument("--generation_batch_size", type=int, default=None, help="prompts per generate call")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="greedy generation length for ROUGE")
    parser.add_argument("--max_length", type=int, default=512, help="most tokens per likelihood example")
    parser.add_argument(
        "--metrics", nargs="+", default=list(ALL_GROUPS), choices=ALL_GROUPS, help="metric groups to compute"
    )
    parser.add_argument("--date_string", default=None, help="date_string passed to the chat template (with --chat)")
    parser.add_argument("--rouge_rows_limit", type=int, default=None, help="generate for only the first N rows")
    return parser


def format_table(result: dict[str, Any]) -> str:
    """Aggregates as two aligned columns, then the notes of ``meta``."""
    entries = result["metrics"]
    width = max((len(name) for name in entries), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    for name, entry in entries.items():
        value = entry["agg_value"]
        shown = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"
        lines.append(f"{name:<{width}}  {shown}")
    lines += [f"note: {note}" for note in result["meta"].get("notes", [])]
    return "\n".join(lines)


def evaluation_main(
    parser: argparse.ArgumentParser,
    build_evaluator: Callable[[argparse.Namespace], BenchmarkEvaluator],
    argv: Sequence[str] | None,
) -> dict[str, Any]:
    """Parse arguments, build the evaluator (data and reference checked before any weight loads), evaluate,
    write ``--out`` and print the aggregates; returns the written result."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score logs every scorer it builds
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        evaluator = build_evaluator(args)
    except ValueError as err:  # bad flags, data or reference: a message, not a traceback
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    model = load_causal_lm(args.model, args.dtype).to(device)
    result = evaluator.run(model, args.out, model_name=args.model)
    print(format_table(result))
    print(f"wrote {args.out}")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse arguments, evaluate, write ``--out``, print the aggregates; returns the written result."""
    return evaluation_main(build_parser(), _build_evaluator, argv)


def _build_evaluator(args: argparse.Namespace) -> TofuEvaluator:
    """Tokenizer, splits and retain reference, all checked before any model weight is loaded."""
    template = PromptTemplate(chat=args.chat, system_prompt=args.system_prompt, date_string=args.date_string)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    return TofuEvaluator(
        benchmark=args.benchmark,
        tokenizer=tokenizer,
        forget_split=args.forget_split,
        template=template,
        max_length=args.max_length,
        batch_size=args.batch_size,
        generation_batch_size=args.generation_batch_size,
        max_new_tokens=args.max_new_tokens,
        metric_groups=tuple(args.metrics),
        retain_reference=args.retain_reference,
        rouge_rows_limit=args.rouge_rows_limit,
        limit=args.limit,
    )


# --------------------------------------------------------------------------------------------------------------
# MUSE


def build_muse_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m baldro_lightning evaluate-muse",
        description="Evaluate a causal LM on one MUSE corpus and write eval.json (spec §3.7).",
    )
    add_common_arguments(
        parser,
        benchmark_help="directory of MUSE jsonl files ({corpus}_{config}_{split}.jsonl or {config}/{split}.jsonl), "
        "or a Hub id",
        reference_help="eval.json of the retain model on the same corpus (privleak reference)",
    )
    parser.add_argument("--corpus", default="news", choices=list(MUSE_HUB_DATASETS), help="MUSE corpus")
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
    return parser


def _build_muse_evaluator(args: argparse.Namespace) -> MuseEvaluator:
    """Tokenizer, splits and retain reference, all checked before any model weight is loaded."""
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


def muse_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse arguments, evaluate, write ``--out``, print the aggregates; returns the written result."""
    return evaluation_main(build_muse_parser(), _build_muse_evaluator, argv)
