"""``python -m baldro_lightning evaluate`` and ``evaluate-muse``: evaluate a saved model on TOFU or MUSE and write its
``eval.json``.

Example (the retain model first, so the target's forget quality and privleak have a reference)::

    python -m baldro_lightning evaluate --model models/embedded/retain --benchmark data/tofu_embedded \\
        --forget_split forget10 --out runs/eval/retain/eval.json
    python -m baldro_lightning evaluate --model models/embedded/target --benchmark data/tofu_embedded \\
        --forget_split forget10 --out runs/eval/target/eval.json --retain_reference runs/eval/retain/eval.json

Before any weight loads, the command checks the settings, that ``--out`` can be written and the model's config and
weight headers, then builds the evaluator (data, retain reference) and checks that every prompt fits
``--max_length`` and that the forget split and its perturbed split list the same questions. A bad input stops it
there with one message (:mod:`baldro_lightning.user_errors`), in this command's vocabulary (:data:`VOCABULARY`).

The flags of how an evaluation runs (``--metric_groups``, ``--retain_reference``, ``--batch_size``,
``--max_new_tokens``, ``--limit``, ...) are the fields of :class:`~baldro_lightning.evaluation.tofu.TofuSettings` and
:class:`~baldro_lightning.evaluation.muse.MuseSettings`, read by jsonargparse with their attribute docstrings as help
text, so each is defined once for the evaluator, the in-training callback and this command. The flags defined here
say what is evaluated and where: model, data, output, prompt form, dtype, device.

The prompt form comes with the model: a directory written by ``ExportPretrained`` or ``python -m baldro_lightning
export`` holds ``prompt_template.json`` (the template and attention mask of training), which is used unless a flag
(``--chat``/``--no_chat``, ``--question_prefix``, ``--answer_prefix``, ``--answer_separator``, ``--system_prompt``,
``--date_string``, ``--attention_from``) overrides a field of it; ``--prompt_template FILE`` reads another file.
Without such a file the flags alone decide (the plain ``Question: …\nAnswer:`` form by default). ``meta.notes``
says which it was.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args

import torch
from jsonargparse import ActionYesNo, ArgumentParser, Namespace, set_parsing_settings

from baldro_lightning.atomic_files import check_writable
from baldro_lightning.data.muse import MUSE_HUB_DATASETS
from baldro_lightning.data.tofu import check_perturbed_alignment, load_split, split_location
from baldro_lightning.data.tokenization import (
    AttentionFrom,
    InputFormat,
    PromptTemplate,
    encode_example,
    load_tokenizer,
    read_input_format,
)
from baldro_lightning.evaluation.engine import BenchmarkEvaluator
from baldro_lightning.evaluation.muse import MuseEvaluator, MuseSettings
from baldro_lightning.evaluation.tofu import TofuEvaluator, TofuSettings
from baldro_lightning.train.models import TorchDtype, check_model_files, load_causal_lm
from baldro_lightning.user_errors import UserInputError, describe_argument_error

log = logging.getLogger(__name__)

# The settings dataclasses document their fields in attribute docstrings; without this, --help shows no
# description for those flags.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

Settings = TypeVar("Settings", TofuSettings, MuseSettings)

VOCABULARY: dict[str, str] = {
    "--model.model": "--model",
    "--model.init_args.model": "--model",
    "--data.tokenizer": "--tokenizer",
    "--data.benchmark": "--benchmark",
    "--data.forget_split": "--forget_split",
    "--data.corpus": "--corpus",
    "--data.max_length": "--max_length",
    "--data.template.chat": "--chat",
    "--data.template.system_prompt": "--system_prompt",
    "--data.template.date_string": "--date_string",
    "--data.template.question_prefix": "--question_prefix",
    "--data.template.answer_prefix": "--answer_prefix",
    "--data.template.answer_separator": "--answer_separator",
    "--data.attention_from": "--attention_from",
}
"""The training flags that data and model messages name, as the evaluate commands' flags."""


def add_input_format_arguments(parser: ArgumentParser) -> None:
    """The prompt-form flags (``--prompt_template``, ``--chat``, the plain-form texts, ``--attention_from``) that
    :func:`input_format_from` reads: every command that scores a saved model has them."""
    parser.add_argument(
        "--prompt_template",
        default=None,
        help="prompt_template.json giving the prompt template and attention mask; default: the one in --model, if "
        "any (an export writes it); the flags below override single fields",
    )
    parser.add_argument(
        "--chat",
        action=ActionYesNo,
        default=None,
        help="render prompts with the tokenizer's chat template (--no_chat: the plain form); default: the model's "
        "saved template, else plain",
    )
    parser.add_argument("--system_prompt", default=None, help="system message (chat templates)")
    parser.add_argument("--date_string", default=None, help="date_string passed to the chat template")
    parser.add_argument("--question_prefix", default=None, help="text before the question (plain form)")
    parser.add_argument("--answer_prefix", default=None, help="text after the question, ending the prompt (plain form)")
    parser.add_argument("--answer_separator", default=None, help="text between the prompt and the answer (plain form)")
    parser.add_argument(
        "--attention_from",
        default=None,
        choices=get_args(AttentionFrom),
        help="attention mask: 'lengths' (each row's tokens) or 'pad_ids' (the reference's ids != pad, methods P-14); "
        "default: the model's saved one, else lengths",
    )


def _parser(
    prog: str, description: str, benchmark_help: str, max_length: int, max_length_help: str, settings: type
) -> ArgumentParser:
    """The flags every evaluation command has (model, data, output, prompt form, dtype, device), then the fields
    of the benchmark's ``settings`` dataclass as top-level flags (``--batch_size``, not ``--settings.batch_size``)."""
    # exit_on_error=False: a parse error is raised, and evaluation_main makes it one line (no usage dump).
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--model", required=True, help="model directory (save_pretrained) or Hub id in the cache")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or id; defaults to --model")
    parser.add_argument("--benchmark", required=True, help=benchmark_help)
    parser.add_argument("--out", required=True, help="path of the eval.json to write")
    parser.add_argument("--max_length", type=int, default=max_length, help=max_length_help)
    add_input_format_arguments(parser)
    parser.add_argument("--dtype", default="float32", choices=get_args(TorchDtype), help="weights dtype")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_class_arguments(settings, nested_key=None, as_group=True)
    return parser


def settings_from(args: Namespace, settings: type[Settings]) -> Settings:
    """The settings dataclass from its flags.

    Raises:
        UserInputError: a value the settings reject (their message names the flag).
    """
    try:
        return settings(**{option.name: getattr(args, option.name) for option in dataclasses.fields(settings)})
    except ValueError as err:  # the settings' own checks: a rejected flag value
        raise UserInputError(str(err)) from err


def build_parser() -> ArgumentParser:
    parser = _parser(
        prog="python -m baldro_lightning evaluate",
        description="Evaluate a causal LM on the TOFU splits of one forget split and write eval.json (methods §3).",
        benchmark_help="directory of TOFU {split}.jsonl files, or a Hub id",
        max_length=512,
        max_length_help="most tokens per likelihood example",
        settings=TofuSettings,
    )
    parser.add_argument("--forget_split", default="forget10", choices=["forget01", "forget05", "forget10"])
    return parser


TEMPLATE_FLAGS = ("chat", "system_prompt", "date_string", "question_prefix", "answer_prefix", "answer_separator")
"""The flags that override one field of the saved prompt template each."""


def resolve_input_format(saved: InputFormat | None, overrides: dict[str, Any]) -> InputFormat:
    """The saved input format (the plain default without one) with each given flag replacing its field.

    Args:
        saved: What ``prompt_template.json`` holds, or ``None``.
        overrides: :data:`TEMPLATE_FLAGS` and ``attention_from``; ``None`` = not given.

    Returns:
        The input format to evaluate with. ``--no_chat`` over a saved chat template also drops the saved system
        prompt and date, which only chat templates use.
    """
    base = saved or InputFormat(PromptTemplate())
    fields = dataclasses.asdict(base.template)
    given = {key: overrides[key] for key in TEMPLATE_FLAGS if overrides.get(key) is not None}
    if given.get("chat") is False:
        fields.update(system_prompt=None, date_string=None)
    fields.update(given)
    return InputFormat(PromptTemplate(**fields), overrides.get("attention_from") or base.attention_from)


def input_format_from(args: Namespace) -> tuple[InputFormat, str]:
    """The input format of ``args`` (``--prompt_template``, else the one saved in ``--model``, then the flags), and
    a note for ``meta.notes`` saying where it came from."""
    found = read_input_format(args.prompt_template or args.model)
    overrides = {key: getattr(args, key) for key in (*TEMPLATE_FLAGS, "attention_from")}
    flags = ", ".join(f"--{key}" for key, value in overrides.items() if value is not None)
    inputs = resolve_input_format(None if found is None else found[0], overrides)
    if found is None:
        where = f"{args.model} holds no prompt_template.json: the prompt template is the flags' ({flags or 'defaults'})"
    else:
        where = f"prompt template and attention mask read from {found[1]}" + (
            f", overridden by {flags}" if flags else ""
        )
    return inputs, where


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
    parser: ArgumentParser,
    settings_type: type[Settings],
    build_evaluator: Callable[[Namespace, Settings], BenchmarkEvaluator],
    argv: Sequence[str] | None,
) -> dict[str, Any]:
    """Parse arguments, check every input before any weight loads (the settings, ``--out``, the model's files, then
    data, reference and prompt lengths), evaluate, write ``--out`` and print the aggregates; returns the result.

    Raises:
        UserInputError: a bad argument or input, before the model is loaded.
    """
    try:
        args = parser.parse_args(argv)
    except ArgumentError as err:
        raise UserInputError(describe_argument_error(err, parser.prog)) from err
    settings = settings_from(args, settings_type)
    check_writable(args.out, "--out", "file")
    check_model_files(args.model, "--model")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score logs every scorer it builds
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    evaluator = build_evaluator(args, settings)
    model = load_causal_lm(args.model, args.dtype).to(device)
    result = evaluator.run(model, args.out, model_name=args.model)
    print(format_table(result))
    print(f"wrote {args.out}")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse arguments, evaluate, write ``--out``, print the aggregates; returns the written result."""
    return evaluation_main(build_parser(), TofuSettings, _build_evaluator, argv)


def _build_evaluator(args: Namespace, settings: TofuSettings) -> TofuEvaluator:
    """Input format, tokenizer, splits and retain reference, all checked before any model weight is loaded; then
    every prompt's length and the forget/perturbed row order (:func:`check_tofu_rows`)."""
    inputs, where = input_format_from(args)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    evaluator = TofuEvaluator(
        benchmark=args.benchmark,
        tokenizer=tokenizer,
        forget_split=args.forget_split,
        template=inputs.template,
        max_length=args.max_length,
        settings=settings,
        attention_from=inputs.attention_from,
    )
    evaluator.notes.append(where)
    check_tofu_rows(evaluator)
    return evaluator


def check_tofu_rows(evaluator: TofuEvaluator) -> None:
    """What scoring would otherwise find after the model has loaded: every row encodes within ``max_length`` (with
    room for an answer token and EOS; a chat template exists if asked for), and, when the forget split is a local
    file, the perturbed split lists its questions in its order.

    Raises:
        UserInputError: naming the question or the first row that differs (the data layer's message).
    """
    for role, rows in evaluator.rows.items():
        for row in rows:
            try:
                encode_example(
                    evaluator.tokenizer, evaluator.template, row["question"], row["answer"], evaluator.max_length
                )
            except UserInputError as err:
                split = next(plan.split for plan in evaluator.plans() if plan.role == role)
                where = split_location(evaluator.benchmark, split)
                raise UserInputError(f"{where}, row {row['index']} (0-based): {err}") from err
    forget_file = split_location(evaluator.benchmark, evaluator.forget_split)
    if "forget" in evaluator.rows and Path(forget_file).is_file():
        forget = load_split(evaluator.benchmark, evaluator.forget_split)
        check_perturbed_alignment(evaluator.benchmark, evaluator.forget_split, forget, evaluator.rows["forget"])


# --------------------------------------------------------------------------------------------------------------
# MUSE


def build_muse_parser() -> ArgumentParser:
    parser = _parser(
        prog="python -m baldro_lightning evaluate-muse",
        description="Evaluate a causal LM on one MUSE corpus and write eval.json (methods §3.7).",
        benchmark_help="directory of MUSE jsonl files ({corpus}_{config}_{split}.jsonl or {config}/{split}.jsonl), "
        "or a Hub id",
        max_length=2048,
        max_length_help="most target tokens per teacher-forced text",
        settings=MuseSettings,
    )
    parser.add_argument("--corpus", default="news", choices=list(MUSE_HUB_DATASETS), help="MUSE corpus")
    return parser


def _build_muse_evaluator(args: Namespace, settings: MuseSettings) -> MuseEvaluator:
    """Input format, tokenizer, splits and retain reference, all checked before any model weight is loaded."""
    inputs, where = input_format_from(args)
    evaluator = MuseEvaluator(
        benchmark=args.benchmark,
        tokenizer=load_tokenizer(args.tokenizer or args.model),
        corpus=args.corpus,
        template=inputs.template,
        max_length=args.max_length,
        settings=settings,
        attention_from=inputs.attention_from,
    )
    evaluator.notes.append(where)
    return evaluator


def muse_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse arguments, evaluate, write ``--out``, print the aggregates; returns the written result."""
    return evaluation_main(build_muse_parser(), MuseSettings, _build_muse_evaluator, argv)
