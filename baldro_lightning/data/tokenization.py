"""QA pairs to ``input_ids``/``labels`` with the prompt masked, and padding them into batches.

Spec §1.2 (prompt rendering and label masking) and §1.3 (collation), with three deliberate departures from the
reference code, each a pitfall of spec §6:

- P-14: the attention mask is built from each sequence's true length, never as ``input_ids != pad_token_id``, so
  a genuine EOS token is still attended when the tokenizer pads with EOS (``collate(attention_from="pad_ids")``
  keeps the reference behaviour for parity runs).
- P-15: ``max_length`` applies to both the plain and the chat-template branch, and truncation cuts the answer
  but keeps the final EOS.
- P-16: when tokenising the prompt and the answer together merges tokens across their border, only the common
  prefix is masked, so the answer keeps at least its merged token and its EOS as targets.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a position that is not a target (the prompt, padding): what every loss and metric skips."""


@dataclass(frozen=True)
class PromptTemplate:
    """How a question and its answer are rendered as text before tokenisation (spec §1.2).

    The plain form is ``{question_prefix}{q}{answer_prefix}{answer_separator}{a}`` followed by EOS, with BOS if the
    tokenizer adds one. Its defaults give ``Question: {q}\\nAnswer: {a}``, the template of the Llama-2-hf and
    phi-1.5 models. The prompt stops before the separator, so the prompt used for generation does not end in a
    dangling space and the first answer token (which carries the space) is a target.
    """

    chat: bool = False
    """Render with the tokenizer's own chat template (Branch B of spec §1.2) instead of the plain form."""
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
            raise ValueError(
                f"template system_prompt={self.system_prompt!r} / date_string={self.date_string!r} are only used "
                "by chat templates; set chat=True or leave them unset"
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
        The tokenizer; when it had no pad token its EOS token now doubles as pad (spec §1.2, true of every
        Llama-2/3 tokenizer).

    Raises:
        ValueError: the tokenizer cannot be found or loaded, or it has no EOS token.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    # OSError: not a directory and not reachable on the Hub; ValueError: a directory without usable tokenizer files.
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load a tokenizer from {path!r} ({err.__class__.__name__}: {str(err)[:200]}); pass a local "
            "model directory that holds the tokenizer files (tokenizer.json or tokenizer.model with its configs) as "
            "--model.model (the data module's --data.tokenizer follows it unless set)"
        ) from err
    if tokenizer.eos_token_id is None:
        pad = "nor a pad token" if tokenizer.pad_token_id is None else "(it has a pad token)"
        raise ValueError(
            f"tokenizer at {path!r} has no EOS token {pad}; every answer must end with EOS. Add one, e.g. "
            "tokenizer.add_special_tokens({'eos_token': '<|endoftext|>'}), save it and pass that directory"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.warning(
            "tokenizer at %r has no pad token; using its EOS token %r as pad. The attention mask is carried from "
            "tokenisation (true lengths), not recomputed from pad ids, so real EOS tokens stay attended (spec P-14)",
            path,
            tokenizer.eos_token,
        )
    return tokenizer


def _texts_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    # One call for many texts: a fast tokenizer's per-call overhead is most of the cost of a short text.
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]


def _chat_text(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, question: str, answer: str | None) -> str:
    if tokenizer.chat_template is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template but the prompt template has chat=True; "
            "set chat=False to use the plain 'Question: ... Answer: ...' form"
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
    (which carries answer text) and can leave no target at all (P-16), so only the longest common prefix is
    masked. Over-long examples keep their prompt and lose the end of the answer; the final EOS is kept (P-15).

    Args:
        tokenizer: The model's tokenizer (must have an EOS token).
        template: How the question and answer are rendered.
        question: The question text.
        answer: The answer text.
        max_length: Most tokens in ``input_ids``, EOS included.

    Returns:
        The encoded example; ``input_ids`` and ``labels`` both have length ``T <= max_length``.

    Raises:
        ValueError: no EOS token, ``max_length < 2``, the prompt leaves no room within ``max_length`` for one
            answer token and EOS, or the template renders no answer token.
    """
    return encode_examples(tokenizer, template, [(question, answer)], max_length)[0]


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    pairs: Sequence[tuple[str, str]],
    max_length: int,
) -> list[EncodedExample]:
    """:func:`encode_example` of many (question, answer) pairs: each distinct prompt and every full text tokenised
    in one call each.

    Raises:
        ValueError: as :func:`encode_example`, for the first pair that fails.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; load it with load_tokenizer()")
    if max_length < 2:
        raise ValueError(f"--data.max_length={max_length} leaves no room for a prompt and EOS; use at least 2")
    questions = list(dict.fromkeys(question for question, _ in pairs))
    prompts = dict(zip(questions, encode_prompts(tokenizer, template, questions), strict=True))
    fulls = _rendered_ids(tokenizer, template, pairs)
    return [
        _masked_example(prompts[question], full_ids, eos, question, answer, max_length)
        for (question, answer), full_ids in zip(pairs, fulls, strict=True)
    ]


def _masked_example(
    prompt_ids: list[int], full_ids: list[int], eos: int, question: str, answer: str, max_length: int
) -> EncodedExample:
    if not full_ids or full_ids[-1] != eos:
        full_ids.append(eos)
    prompt_length = common_prefix_length(prompt_ids, full_ids)
    if prompt_length >= len(full_ids):
        raise ValueError(
            f"question {question[:60]!r} with answer {answer[:60]!r} renders no answer token (full text is a prefix "
            "of the prompt); check the prompt template's answer_prefix/answer_separator or the chat template"
        )
    truncated = len(full_ids) > max_length
    if truncated:
        if prompt_length >= max_length - 1:
            raise ValueError(
                f"question {question[:60]!r} alone is {prompt_length} tokens, which leaves no room for its answer "
                f"within --data.max_length={max_length}; raise --data.max_length"
            )
        full_ids = full_ids[: max_length - 1] + [eos]
    labels = [IGNORE_INDEX] * prompt_length + full_ids[prompt_length:]
    return EncodedExample(input_ids=full_ids, labels=labels, prompt_length=prompt_length, truncated=truncated)


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
        encoded.append(encode_example(tokenizer, template, row[question_key], row[answer_key], max_length))
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
    attention_from: Literal["lengths", "pad_ids"] = "lengths",
) -> dict[str, Any]:
    """Pad a list of examples into a batch.

    Args:
        items: Dicts with ``input_ids`` (T_i,), optional ``labels`` (T_i,) and optional ``index``; all items must
            have the same keys. Items whose values are all dicts (``{"forget": ex, "retain": ex}``) are collated
            key by key into a dict of batches.
        pad_token_id: Id written into padded ``input_ids`` positions.
        padding_side: ``"right"`` for training and likelihoods, ``"left"`` for generation prompts.
        attention_from: ``"lengths"`` marks exactly each item's own tokens; ``"pad_ids"`` reproduces the reference
            mask ``input_ids != pad_token_id``, which also hides genuine EOS tokens when pad is EOS (P-14; parity
            only).

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
        raise ValueError(f"attention_from={attention_from!r}; use 'lengths' or 'pad_ids' (parity with P-14)")
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
    attention_from: Literal["lengths", "pad_ids"] = "lengths"
    """``"lengths"`` (true mask) or ``"pad_ids"`` (the reference's ``ids != pad`` mask, P-14 parity)."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(items, self.pad_token_id, self.padding_side, self.attention_from)
