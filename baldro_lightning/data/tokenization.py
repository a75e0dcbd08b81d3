"""QA pairs to ``input_ids``/``labels`` with the prompt masked, and padding them into batches.

Methods §1.2 (prompt rendering and label masking) and methods §1.3 (collation), with three deliberate departures from
the reference code, each a pitfall of methods §6:

- methods P-14: the attention mask is built from each sequence's true length, never as ``input_ids != pad_token_id``, so
  a genuine EOS token is still attended when the tokenizer pads with EOS (``collate(attention_from="pad_ids")``
  keeps the reference behaviour for parity runs).
- methods P-15: ``max_length`` applies to both the plain and the chat-template branch, and truncation cuts the answer
  but keeps the final EOS.
- methods P-16: when tokenising the prompt and the answer together merges tokens across their border, only the common
  prefix is masked, so the answer keeps at least its merged token and its EOS as targets.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from baldro_lightning.user_errors import UserInputError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a position that is not a target (the prompt, padding): what every loss and metric skips."""

AttentionFrom = Literal["lengths", "pad_ids"]
"""How a batch's attention mask is made: ``lengths`` marks each row's own tokens; ``pad_ids`` is the reference's
``input_ids != pad_token_id``, which also hides genuine EOS tokens when pad is EOS (methods P-14; parity runs only)."""

INPUT_FORMAT_FILE = "prompt_template.json"
"""The file in an exported model directory that says how its inputs were rendered (:func:`write_input_format`)."""


class NoAnswerTokenError(UserInputError):
    """A QA pair leaves no answer token: the question fills ``max_length`` or the answer merges into the prompt."""


@dataclass(frozen=True)
class PromptTemplate:
    """How a question and its answer are rendered as text before tokenisation (methods §1.2).

    The plain form is ``{question_prefix}{q}{answer_prefix}{answer_separator}{a}`` followed by EOS, with BOS if the
    tokenizer adds one. Its defaults give ``Question: {q}\\nAnswer: {a}``, the template of the Llama-2-hf and
    phi-1.5 models. The prompt stops before the separator, so the prompt used for generation does not end in a
    dangling space and the first answer token (which carries the space) is a target.
    """

    chat: bool = False
    """Render with the tokenizer's own chat template (Branch B of methods §1.2) instead of the plain form."""
    system_prompt: str | None = None
    """System message placed before the question; chat templates only."""
    question_prefix: str = "Question: "
    """Text before the question (plain form)."""
    answer_prefix: str = "\nAnswer:"
    """Text between the question and the answer separator; the end of the prompt (plain form)."""
    answer_separator: str = " "
    """Text between the answer prefix and the answer; part of the answer's first token, not of the prompt."""
    date_string: str | None = None
    """Passed to the chat template as ``date_string`` (Llama-3 Instruct prints it in its system block)."""

    def __post_init__(self) -> None:
        if not self.chat and (self.system_prompt is not None or self.date_string is not None):
            raise UserInputError(
                f"--data.template.system_prompt={self.system_prompt!r} / --data.template.date_string="
                f"{self.date_string!r} are only used by chat templates; turn on --data.template.chat or leave them "
                "unset"
            )


@dataclass(frozen=True)
class EncodedExample:
    """One tokenised QA example."""

    input_ids: list[int]
    """(T,) prompt tokens, then answer tokens, then EOS."""
    labels: list[int]
    """(T,) ``-100`` on the prompt (BOS, system, question, answer prefix); the answer tokens and EOS elsewhere."""
    prompt_length: int
    """Number of masked leading positions."""
    truncated: bool
    """Whether the answer was cut to fit ``max_length``."""


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad and end answers.

    Args:
        path: A local directory or a Hub model id understood by ``AutoTokenizer.from_pretrained``.

    Returns:
        The tokenizer; when it had no pad token its EOS token now doubles as pad (methods §1.2, true of every
        Llama-2/3 tokenizer).

    Raises:
        UserInputError: the tokenizer cannot be found or loaded, or it has no EOS token.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    # OSError: not a directory and not reachable on the Hub; ValueError: a directory without usable tokenizer files.
    except (OSError, ValueError) as err:
        raise UserInputError(
            f"could not load a tokenizer from {path!r} ({err.__class__.__name__}: {str(err)[:200]}); pass a local "
            "model directory that holds the tokenizer files (tokenizer.json or tokenizer.model with its configs) as "
            "--model.model (evaluate and export also take a separate --tokenizer)"
        ) from err
    if tokenizer.eos_token_id is None:
        pad = "nor a pad token" if tokenizer.pad_token_id is None else "(it has a pad token)"
        raise UserInputError(
            f"tokenizer at {path!r} has no EOS token {pad}; every answer must end with EOS. Add one, e.g. "
            "tokenizer.add_special_tokens({'eos_token': '<|endoftext|>'}), save it and pass that directory"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.warning(
            "tokenizer at %r has no pad token; using its EOS token %r as pad. The attention mask is carried from "
            "tokenisation (true lengths), not recomputed from pad ids, so real EOS tokens stay attended (methods P-14)",
            path,
            tokenizer.eos_token,
        )
    return tokenizer


PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}
"""``tokenizer_class`` names that only transformers 5 knows -> the name every version since 4.x loads.

transformers 5 saves a tokenizer built on a bare ``tokenizers`` object as ``TokenizersBackend``; 4.x has no such
class and refuses the directory. ``PreTrainedTokenizerFast`` is the same tokenizer in both (5 keeps the name).
"""


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike[str]) -> None:
    """``save_pretrained`` the tokenizer so that every transformers version the package supports loads it.

    The files are the ones ``save_pretrained`` writes; only a ``tokenizer_class`` of
    :data:`PORTABLE_TOKENIZER_CLASS` in ``tokenizer_config.json`` is renamed.
    """
    tokenizer.save_pretrained(out_dir)
    config_file = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    portable = PORTABLE_TOKENIZER_CLASS.get(config.get("tokenizer_class"))
    if portable is not None:
        config["tokenizer_class"] = portable
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _texts_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    # One call for many texts: a fast tokenizer's per-call overhead is most of the cost of a short text.
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]


def _chat_text(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, question: str, answer: str | None) -> str:
    if tokenizer.chat_template is None:
        raise UserInputError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template, but --data.template.chat asks for one; "
            "turn off --data.template.chat to use the plain 'Question: ... Answer: ...' form, or pass a chat "
            "model's tokenizer"
        )
    messages = [] if template.system_prompt is None else [{"role": "system", "content": template.system_prompt}]
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    extra = {} if template.date_string is None else {"date_string": template.date_string}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None, **extra)


def _rendered_ids(
    tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, pairs: Sequence[tuple[str, str | None]]
) -> list[list[int]]:
    """Ids of each (question, answer) rendered by ``template``; an answer of ``None`` renders the prompt only."""
    if template.chat:
        # Chat templates write their own BOS, so the rendered text is encoded without adding special tokens; this
        # is what apply_chat_template(tokenize=True) does internally.
        texts = [_chat_text(tokenizer, template, question, answer) for question, answer in pairs]
        return _texts_ids(tokenizer, texts, add_special_tokens=False)
    texts = [
        template.question_prefix
        + question
        + template.answer_prefix
        + ("" if answer is None else template.answer_separator + answer)
        for question, answer in pairs
    ]
    return _texts_ids(tokenizer, texts, add_special_tokens=True)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, questions: Sequence[str]
) -> list[list[int]]:
    """:func:`encode_prompt` of many questions, tokenised in one call."""
    out = _rendered_ids(tokenizer, template, [(question, None) for question in questions])
    if not template.chat:
        # Tokenizers configured to append EOS (add_eos_token) would end the prompt with EOS; a prompt must stay open.
        out = [ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids for ids in out]
    return out


def encode_prompt(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, question: str) -> list[int]:
    """Token ids of the prompt a model continues to answer ``question`` (generation input).

    Args:
        tokenizer: The model's tokenizer.
        template: How the prompt is rendered.
        question: The question text.

    Returns:
        (P,) ids: BOS (if the tokenizer adds one), question and answer prefix; for chat templates, everything up
        to and including the assistant header.
    """
    return encode_prompts(tokenizer, template, [question])[0]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading positions at which ``a`` and ``b`` hold the same id."""
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def encode_example(
    tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, question: str, answer: str, max_length: int
) -> EncodedExample:
    """Tokenise one QA pair for training or likelihood scoring, with the prompt masked out of the labels.

    The prompt and the full text are tokenised separately. Normally the full ids start with the prompt ids and
    the first ``P = len(prompt ids)`` labels are masked. When a token merges across the prompt/answer border the
    full ids diverge from the prompt ids before ``P``; masking ``P`` positions would then hide the merged token
    (which carries answer text) and can leave no target at all (methods P-16), so only the longest common prefix is
    masked. Over-long examples keep their prompt and lose the end of the answer; the final EOS is kept (methods P-15).

    Args:
        tokenizer: The model's tokenizer (must have an EOS token).
        template: How the question and answer are rendered.
        question: The question text.
        answer: The answer text.
        max_length: Most tokens in ``input_ids``, EOS included.

    Returns:
        The encoded example; ``input_ids`` and ``labels`` both have length ``T <= max_length``.

    Raises:
        ValueError: no EOS token (a tokenizer not loaded with :func:`load_tokenizer`).
        UserInputError: ``max_length < 2``.
        NoAnswerTokenError: the prompt leaves no room within ``max_length`` for one answer token and EOS, or the
            template renders no answer token.
    """
    return encode_examples(tokenizer, template, [(question, answer)], max_length)[0]


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    pairs: Sequence[tuple[str, str]],
    max_length: int,
    for_scoring: bool = False,
) -> list[EncodedExample]:
    """:func:`encode_example` of many (question, answer) pairs: each distinct prompt and every full text tokenised
    in one call each.

    Args:
        tokenizer: The model's tokenizer (must have an EOS token).
        template: How the questions and answers are rendered.
        pairs: ``(question, answer)`` texts.
        max_length: Most tokens per example, EOS included.
        for_scoring: Encode a pair that leaves no answer token as :func:`encode_for_scoring` does instead of
            raising :class:`NoAnswerTokenError`.

    Raises:
        ValueError, UserInputError, NoAnswerTokenError: as :func:`encode_example`, for the first pair that fails.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; load it with load_tokenizer()")
    if max_length < 2:
        raise UserInputError(f"--data.max_length={max_length} leaves no room for a prompt and EOS; use at least 2")
    questions = list(dict.fromkeys(question for question, _ in pairs))
    prompts = dict(zip(questions, encode_prompts(tokenizer, template, questions), strict=True))
    fulls = _rendered_ids(tokenizer, template, pairs)
    out = []
    for (question, answer), full_ids in zip(pairs, fulls, strict=True):
        try:
            out.append(_masked_example(prompts[question], full_ids, eos, question, answer, max_length))
        except NoAnswerTokenError:
            if not for_scoring:
                raise
            # Scored, not refused: the prompt (cut to max_length) with every label -100 (encode_for_scoring).
            prompt = prompts[question][:max_length]
            out.append(EncodedExample(prompt, [IGNORE_INDEX] * len(prompt), prompt_length=len(prompt), truncated=True))
    return out


def _masked_example(
    prompt_ids: list[int], full_ids: list[int], eos: int, question: str, answer: str, max_length: int
) -> EncodedExample:
    if not full_ids or full_ids[-1] != eos:
        full_ids.append(eos)
    prompt_length = common_prefix_length(prompt_ids, full_ids)
    if prompt_length >= len(full_ids):
        raise NoAnswerTokenError(
            f"question {question[:60]!r} with answer {answer[:60]!r} renders no answer token (full text is a prefix "
            "of the prompt); check the prompt template's answer_prefix/answer_separator or the chat template"
        )
    truncated = len(full_ids) > max_length
    if truncated:
        if prompt_length >= max_length - 1:
            raise NoAnswerTokenError(
                f"question {question[:60]!r} alone is {prompt_length} tokens, which leaves no room for its answer "
                f"within --data.max_length={max_length}; raise --data.max_length"
            )
        full_ids = full_ids[: max_length - 1] + [eos]
    labels = [IGNORE_INDEX] * prompt_length + full_ids[prompt_length:]
    return EncodedExample(input_ids=full_ids, labels=labels, prompt_length=prompt_length, truncated=truncated)


def encode_for_scoring(
    tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, question: str, answer: str, max_length: int
) -> EncodedExample:
    """:func:`encode_example` for evaluation: a pair that leaves no answer token is scored, not refused.

    Training must refuse such a pair (it would train on nothing); an evaluation keeps going, as open-unlearning's
    does: the pair becomes its prompt (cut to ``max_length``) with every label ``-100``, whose mean NLL is NaN,
    and the evaluators leave the row out of their aggregates and say how many they left out (``meta.notes``).

    Returns:
        The example; ``labels`` are all ``-100`` when :func:`encode_example` raises :class:`NoAnswerTokenError`.
    """
    return encode_examples(tokenizer, template, [(question, answer)], max_length, for_scoring=True)[0]


def encode_rows(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    max_length: int,
    answer_key: str = "answer",
    question_key: str = "question",
) -> list[EncodedExample]:
    """Encode every row's (question, answer) pair; log one warning counting the truncated rows.

    Args:
        rows: Rows as returned by :func:`baldro_lightning.data.tofu.load_split`.
        tokenizer: The model's tokenizer.
        template: How the prompt is rendered.
        max_length: Most tokens per example.
        answer_key: Field holding the answer string. List fields (``perturbed_answer``) are encoded entry by
            entry with :func:`encode_example` by the caller.
        question_key: Field holding the question (``paraphrased_question`` for the paraphrased evaluation).

    Returns:
        One encoded example per row, in order.

    Raises:
        ValueError: a row lacks ``question_key``/``answer_key`` or holds a non-string there.
    """
    encoded = []
    for position, row in enumerate(rows):
        for key in (question_key, answer_key):
            if not isinstance(row.get(key), str):
                got = "no such field" if key not in row else f"{type(row[key]).__name__} {str(row[key])[:60]!r}"
                raise ValueError(
                    f"row {row.get('index', position)} (0-based): field {key!r} must be a string, got {got}; pick "
                    f"a string field with --data.question_key/--data.answer_key (row fields: {', '.join(row)})"
                )
        try:
            encoded.append(encode_example(tokenizer, template, row[question_key], row[answer_key], max_length))
        except UserInputError as err:
            raise UserInputError(f"row {row.get('index', position)} (0-based): {err}") from err
    n_truncated = sum(example.truncated for example in encoded)
    if n_truncated:
        log.warning(
            "%d of %d rows longer than max_length=%d; their answers were truncated; raise --data.max_length",
            n_truncated,
            len(encoded),
            max_length,
        )
    return encoded


class EncodedDataset(Dataset):
    """Encoded examples as training/scoring items ``{"input_ids": (T,), "labels": (T,), "index": int}``."""

    def __init__(self, examples: Sequence[EncodedExample], indices: Sequence[int] | None = None) -> None:
        """A dataset of already-encoded examples, each returned with its dataset row index.

        Args:
            examples: The encoded examples.
            indices: Each example's row index (the key of per-sample records); ``0..N-1`` by default.
        """
        self.examples = list(examples)
        self.indices = list(range(len(self.examples))) if indices is None else [int(i) for i in indices]
        if len(self.indices) != len(self.examples):
            raise ValueError(f"{len(self.indices)} indices for {len(self.examples)} examples; give one per example")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        example = self.examples[i]
        return {
            "input_ids": torch.tensor(example.input_ids, dtype=torch.long),
            "labels": torch.tensor(example.labels, dtype=torch.long),
            "index": self.indices[i],
        }


class QADataset(EncodedDataset):
    """QA rows tokenised once, up front, for training or likelihood evaluation.

    Each item is ``{"input_ids": LongTensor (T,), "labels": LongTensor (T,), "index": int}``, where ``index`` is
    the row's ``index`` field (its position in the split) or, for rows without one, its position in ``rows``.
    """

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        template: PromptTemplate,
        max_length: int,
        question_key: str = "question",
        answer_key: str = "answer",
    ) -> None:
        """Tokenise every row.

        Args:
            rows: Rows as returned by :func:`baldro_lightning.data.tofu.load_split`.
            tokenizer: The model's tokenizer.
            template: How the prompt is rendered.
            max_length: Most tokens per example; longer answers are truncated (one warning counts them).
            question_key: Field holding the question.
            answer_key: Field holding the answer string.
        """
        examples = encode_rows(rows, tokenizer, template, max_length, answer_key, question_key)
        super().__init__(examples, [int(row.get("index", position)) for position, row in enumerate(rows)])


def _pad(sequences: list[Tensor], value: int, length: int, side: Literal["right", "left"]) -> Tensor:
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if side == "right":
            out[row, : len(seq)] = seq
        else:
            out[row, length - len(seq) :] = seq
    return out


def collate(
    items: list[dict[str, Any]],
    pad_token_id: int,
    padding_side: Literal["right", "left"] = "right",
    attention_from: AttentionFrom = "lengths",
) -> dict[str, Any]:
    """Pad a list of examples into a batch.

    Args:
        items: Dicts with ``input_ids`` (T_i,), optional ``labels`` (T_i,) and optional ``index``; all items must
            have the same keys. Items whose values are all dicts (``{"forget": ex, "retain": ex}``) are collated
            key by key into a dict of batches.
        pad_token_id: Id written into padded ``input_ids`` positions.
        padding_side: ``"right"`` for training and likelihoods, ``"left"`` for generation prompts.
        attention_from: ``"lengths"`` marks exactly each item's own tokens; ``"pad_ids"`` reproduces the reference
            mask ``input_ids != pad_token_id``, which also hides genuine EOS tokens when pad is EOS (methods P-14;
            parity only).

    Returns:
        ``input_ids`` (B, T) padded with ``pad_token_id``, ``attention_mask`` (B, T) long, ``labels`` (B, T)
        padded with ``-100`` when the items have labels, and ``index`` (B,) long when they have one.

    Raises:
        ValueError: no items, mixed keys, an unknown padding side, or labels whose length differs from the ids.
    """
    if not items:
        raise ValueError("collate() got an empty list of items")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r}; use 'right' (training/likelihoods) or 'left' (generation)")
    if attention_from not in ("lengths", "pad_ids"):
        raise ValueError(f"attention_from={attention_from!r}; use 'lengths' or 'pad_ids' (parity with methods P-14)")
    keys = set(items[0])
    if any(set(item) != keys for item in items):
        raise ValueError(f"collate() got items with different keys: {sorted({tuple(sorted(i)) for i in items})}")
    if "input_ids" not in keys and all(isinstance(value, Mapping) for value in items[0].values()):
        return {key: collate([item[key] for item in items], pad_token_id, padding_side, attention_from) for key in keys}
    unknown = keys - {"input_ids", "labels", "index"}
    if unknown or "input_ids" not in keys:
        raise ValueError(
            f"collate() got item keys {sorted(keys)}; items hold input_ids (required), labels and index, or are "
            "dicts of such items"
        )
    ids = [torch.as_tensor(item["input_ids"], dtype=torch.long) for item in items]
    length = max(len(seq) for seq in ids)
    batch: dict[str, Any] = {"input_ids": _pad(ids, pad_token_id, length, padding_side)}
    if attention_from == "lengths":
        ones = [torch.ones(len(seq), dtype=torch.long) for seq in ids]
        batch["attention_mask"] = _pad(ones, 0, length, padding_side)
    else:
        batch["attention_mask"] = (batch["input_ids"] != pad_token_id).long()
    if "labels" in keys:
        labels = [torch.as_tensor(item["labels"], dtype=torch.long) for item in items]
        for position, (seq, lab) in enumerate(zip(ids, labels, strict=True)):
            if len(seq) != len(lab):
                raise ValueError(f"item {position}: {len(lab)} labels for {len(seq)} input_ids; they must match")
        batch["labels"] = _pad(labels, IGNORE_INDEX, length, padding_side)
    if "index" in keys:
        batch["index"] = torch.tensor([int(item["index"]) for item in items], dtype=torch.long)
    return batch


@dataclass
class PaddingCollator:
    """A picklable :func:`collate` with fixed settings, for ``DataLoader(collate_fn=...)`` with worker processes."""

    pad_token_id: int
    """Id written into padded ``input_ids`` positions."""
    padding_side: Literal["right", "left"] = "right"
    """``"right"`` for training and likelihoods, ``"left"`` for generation prompts."""
    attention_from: AttentionFrom = "lengths"
    """``"lengths"`` (true mask) or ``"pad_ids"`` (the reference's ``ids != pad`` mask, methods P-14 parity)."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(items, self.pad_token_id, self.padding_side, self.attention_from)


# --------------------------------------------------------------------------------------------------------------
# The input format that travels with an exported model


@dataclass(frozen=True)
class InputFormat:
    """How a model's inputs were rendered in training: its prompt template and attention mask."""

    template: PromptTemplate
    """The prompt template the model was trained with."""
    attention_from: AttentionFrom = "lengths"
    """The attention mask it was trained with."""


def write_input_format(directory: str | os.PathLike[str], input_format: InputFormat) -> Path:
    """Write ``input_format`` as ``<directory>/prompt_template.json`` (:data:`INPUT_FORMAT_FILE`).

    Returns:
        The path written.
    """
    path = Path(directory) / INPUT_FORMAT_FILE
    payload = {"template": dataclasses.asdict(input_format.template), "attention_from": input_format.attention_from}
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return path


def read_input_format(source: str | os.PathLike[str]) -> tuple[InputFormat, Path] | None:
    """The :class:`InputFormat` saved in a model directory (or in a ``prompt_template.json`` file given directly).

    Returns:
        ``(input format, the file read)``, or ``None`` when a directory holds no ``prompt_template.json`` (a model
        not exported by this package, or a Hub id).

    Raises:
        ValueError: a file given directly does not exist, or the file is not JSON or holds unknown template fields;
            the message names the file.
    """
    given = Path(source)
    path = given / INPUT_FORMAT_FILE if given.is_dir() or given.suffix != ".json" else given
    if not path.is_file():
        if given.suffix == ".json":
            raise ValueError(f"--prompt_template={str(given)!r} does not exist; pass a prompt_template.json file")
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        template = PromptTemplate(**payload["template"])
        attention_from = payload.get("attention_from", "lengths")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a prompt template file ({err.__class__.__name__}: {err}); re-export the model or delete "
            "the file and pass the template flags (--chat, --question_prefix, ...)"
        ) from err
    if attention_from not in get_args(AttentionFrom):
        raise ValueError(f"{path}: attention_from must be 'lengths' or 'pad_ids', got {attention_from!r}")
    return InputFormat(template, attention_from), path
