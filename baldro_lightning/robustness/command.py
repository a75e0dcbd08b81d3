"""``python -m baldro_lightning attack`` and ``attack-muse``: attack a saved model and write its attack directory.

Example (the embedded NPO model; the retain reference gives forget quality)::

    python -m baldro_lightning attack --model runs/embedded/npo/model --benchmark data/tofu_embedded \\
        --forget_split forget10 --max_length 128 --max_new_tokens 48 \\
        --retain_reference runs/embedded/eval/retain90/eval.json --out runs/embedded/npo/attacks

Without ``--attacks`` the four attacks of issue 20 run: relearning on half the forget rows (scored on the other
half), relearning on as many retain rows, and 8- and 4-bit quantization. Choose others in a YAML file given with
``--config`` (an ``attacks:`` list as under ``AttackEvaluation`` in ``experiments/attacks/embedded.yaml``, which sets
the embedded budgets for ``fit``), as JSON (``--attacks '[{"class_path": "Relearn", "init_args": {"max_steps":
20}}]'``) or flag by flag (``--attacks+=Relearn --attacks.max_steps=20``). The evaluation flags are the fields of
:class:`~baldro_lightning.evaluation.tofu.TofuSettings` (:class:`~baldro_lightning.evaluation.muse.MuseSettings`),
as for ``evaluate``.
"""

from __future__ import annotations

import math
from argparse import ArgumentError
from collections.abc import Sequence
from typing import Any, get_args

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from baldro_lightning.atomic_files import check_writable
from baldro_lightning.data.muse import MUSE_HUB_DATASETS
from baldro_lightning.data.tokenization import load_tokenizer
from baldro_lightning.evaluation.command import add_input_format_arguments, input_format_from, settings_from
from baldro_lightning.evaluation.muse import MuseSettings
from baldro_lightning.evaluation.tofu import TofuSettings
from baldro_lightning.robustness.attacks import Attack, Quantize, Relearn, default_attacks  # noqa: F401 (short names)
from baldro_lightning.robustness.suite import AttackPlan, check_names, muse_plan, run_attacks, tofu_plan
from baldro_lightning.train.models import TorchDtype, check_model_files, load_causal_lm
from baldro_lightning.user_errors import UserInputError, describe_argument_error


def _parser(prog: str, description: str, settings: type, max_length: int) -> ArgumentParser:
    # exit_on_error=False: a parse error is raised, and _attack_main makes it one line (no usage dump).
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of any of these flags (e.g. --attacks)")
    parser.add_argument("--model", required=True, help="the unlearned model directory (save_pretrained) or Hub id")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or id; defaults to --model")
    parser.add_argument("--benchmark", required=True, help="benchmark directory or Hub id")
    parser.add_argument("--out", required=True, help="the attack directory to write (eval.json and attack.json files)")
    parser.add_argument(
        "--attacks",
        type=list[Attack] | None,
        default=None,
        help="Relearn / Quantize attacks by class_path; relearn on forget and on retain rows, int8, int4 when unset",
    )
    parser.add_argument("--forget_fraction", type=float, default=0.5, help="share of forget rows relearning trains on")
    parser.add_argument("--split_seed", type=int, default=0, help="seeds the relearning split of the forget rows")
    parser.add_argument("--max_length", type=int, default=max_length, help="most tokens per example")
    add_input_format_arguments(parser)
    parser.add_argument("--dtype", default="float32", choices=get_args(TorchDtype), help="weights dtype")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_class_arguments(settings, nested_key=None, as_group=True)
    return parser


def build_parser() -> ArgumentParser:
    parser = _parser(
        "python -m baldro_lightning attack",
        "Relearning and quantization attacks on an unlearned model, scored with the TOFU evaluator before and after.",
        TofuSettings,
        512,
    )
    parser.add_argument("--forget_split", default="forget10", choices=["forget01", "forget05", "forget10"])
    parser.add_argument("--retain_split", default=None, help="benign relearning rows; the forget split's complement")
    return parser


def build_muse_parser() -> ArgumentParser:
    parser = _parser(
        "python -m baldro_lightning attack-muse",
        "Relearning and quantization attacks on an unlearned model, scored with the MUSE evaluator before and after.",
        MuseSettings,
        2048,
    )
    parser.add_argument("--corpus", default="news", choices=list(MUSE_HUB_DATASETS), help="MUSE corpus")
    parser.add_argument("--chunk_length", type=int, default=2048, help="tokens per relearning chunk after BOS")
    parser.add_argument("--forget_split", default="raw/forget", help="raw text relearning on the forget set reads")
    parser.add_argument("--retain_split", default="raw/retain1", help="raw text benign relearning reads")
    return parser


def _tofu(args: Namespace) -> AttackPlan:
    inputs, where = input_format_from(args)
    plan = tofu_plan(
        args.benchmark,
        load_tokenizer(args.tokenizer or args.model),
        args.forget_split,
        settings_from(args, TofuSettings),
        args.forget_fraction,
        args.split_seed,
        args.model,
        template=inputs.template,
        max_length=args.max_length,
        retain_split=args.retain_split,
        attention_from=inputs.attention_from,
    )
    plan.notes.append(where)
    return plan


def _muse(args: Namespace) -> AttackPlan:
    inputs, where = input_format_from(args)
    plan = muse_plan(
        args.benchmark,
        load_tokenizer(args.tokenizer or args.model),
        args.corpus,
        settings_from(args, MuseSettings),
        args.forget_fraction,
        args.split_seed,
        args.model,
        chunk_length=args.chunk_length,
        forget_split=args.forget_split,
        retain_split=args.retain_split,
        template=inputs.template,
        max_length=args.max_length,
        attention_from=inputs.attention_from,
    )
    plan.notes.append(where)
    return plan


def format_records(records: dict[str, dict[str, Any]]) -> str:
    """One line per (attack, metric): the unattacked value, the attacked value and their difference."""

    def cell(value: float | None, sign: str = "") -> str:
        return f"{value:>{sign}10.4g}" if value is not None and math.isfinite(value) else f"{'n/a':>10}"

    lines = [f"{'attack':<22} {'metric':<22} {'before':>10} {'after':>10} {'delta':>10}"]
    for name, record in records.items():
        for key, entry in record["recovery"].items():
            values = cell(entry["before"]), cell(entry["after"]), cell(entry["delta"], "+")
            lines.append(f"{name:<22} {key:<22} {' '.join(values)}")
    return "\n".join(lines)


def _attack_main(parser: ArgumentParser, build_plan, argv: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    try:
        args = parser.parse_args(argv)
    except ArgumentError as err:
        raise UserInputError(describe_argument_error(err, parser.prog)) from err
    attacks = parser.instantiate(args).attacks if args.attacks is not None else default_attacks()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    check_writable(args.out, "--out", "directory")
    check_model_files(args.model, "--model")
    try:
        check_names(attacks)
        plan = build_plan(args)  # data, split and retain reference checked before any weight loads
    except UserInputError:
        raise
    except ValueError as err:  # the attacks' and the plan's own checks: a rejected input
        raise UserInputError(str(err)) from err
    model = load_causal_lm(args.model, args.dtype).to(device)
    records = run_attacks(model, attacks, plan, args.out, args.model)
    print(format_records(records))
    print(f"wrote {args.out}")
    return records


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """``attack``: parse, attack, write ``--out``, print the recovery table; returns the records."""
    return _attack_main(build_parser(), _tofu, argv)


def muse_main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """``attack-muse``: the same on one MUSE corpus."""
    return _attack_main(build_muse_parser(), _muse, argv)
