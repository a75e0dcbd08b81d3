"""MUSE benchmark data: split schemas, loading, tokenisation and the Lightning data modules (methods §1.5).

Every MUSE split is named ``{config}/{split}`` (``raw/forget``, ``knowmem/forget_qa``, ``verbmem/forget``,
``privleak/holdout``...; see :data:`MUSE_SPLITS`). :func:`load_muse_split` reads one from

- the Hub: ``datasets.load_dataset("muse-bench/MUSE-News", config, split=split)`` (``MUSE-Books`` for books);
- a local directory in either layout: flat ``{corpus}_{config}_{split}.jsonl`` (e.g. ``news_knowmem_forget_qa.jsonl``,
  as exported in the shared data folder and written by :mod:`baldro_lightning.embedded.muse_world`) or nested
  ``{config}/{split}.jsonl`` (e.g. ``knowmem/forget_qa.jsonl``); the flat name wins when both exist.

Rows are read and checked by the same code as TOFU rows (:mod:`baldro_lightning.data.rows`): a broken file
fails with its path, line, field and the fix. Tokenisation follows the reference with two departures, both stated
where they happen:

- methods P-17: raw text is tokenised once and cut into windows of token ids; the reference decodes each window to text
  and re-encodes it, which can change its length. Each chunk is BOS + exactly ``max_length`` tokens (the last one
  shorter) and no window is empty.
- methods P-16: completion examples mask the common prefix of the prefix ids and the full ids (at least one position),
  so a token merged across the prefix/continuation border stays a target, as in :func:`tokenization.encode_example`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from baldro_lightning.data import rows as benchmark_rows
from baldro_lightning.data.accumulation import UpdateAccounting
from baldro_lightning.data.datamodule import PairedDataModule, SplitsDataModule
from baldro_lightning.data.rows import BenchmarkDataError, NumberedRows
from baldro_lightning.data.tokenization import (
    IGNORE_INDEX,
    EncodedDataset,
    EncodedExample,
    PromptTemplate,
    common_prefix_length,
)
from baldro_lightning.user_errors import UserInputError

log = logging.getLogger(__name__)

MuseCorpus = Literal["news", "books"]
"""The two MUSE corpora."""

MUSE_HUB_DATASETS: dict[str, str] = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}
"""Hub dataset id of each corpus."""

DOCUMENT_SEPARATOR = "\n\n"
"""Joins the documents of a raw split before chunking (methods §1.5)."""

SHOT_SEPARATOR = "\n\n"
"""Ends every in-context shot of the KnowMem prompt (methods §1.2, Llama-2-hf template: ``asst_end``)."""


@dataclass(frozen=True)
class MuseSplitSchema:
    """What every row of one MUSE split must hold."""

    fields: tuple[str, ...]
    """Fields that must be strings."""
    rows: tuple[int, int]
    """Published rows (News, Books), methods §1.5; informative, not enforced, so small files load."""
    allow_empty: bool = False
    """Whether the string fields may be empty (the published News ``raw/forget`` has one empty document)."""


_RAW = ("text",)
_QA = ("question", "answer")

MUSE_SPLITS: dict[str, MuseSplitSchema] = {
    "raw/forget": MuseSplitSchema(_RAW, (889, 4), allow_empty=True),
    "raw/retain1": MuseSplitSchema(_RAW, (1777, 12), allow_empty=True),
    "raw/retain2": MuseSplitSchema(_RAW, (1778, 13), allow_empty=True),
    "raw/holdout": MuseSplitSchema(_RAW, (3043, 3), allow_empty=True),
    "knowmem/forget_qa": MuseSplitSchema(_QA, (100, 100)),
    "knowmem/retain_qa": MuseSplitSchema(_QA, (100, 100)),
    "knowmem/forget_qa_icl": MuseSplitSchema(_QA, (10, 10)),
    "knowmem/retain_qa_icl": MuseSplitSchema(_QA, (10, 10)),
    "verbmem/forget": MuseSplitSchema(("prompt", "gt"), (100, 100)),
    "privleak/forget": MuseSplitSchema(_RAW, (100, 100)),
    "privleak/retain": MuseSplitSchema(_RAW, (100, 100)),
    "privleak/holdout": MuseSplitSchema(_RAW, (100, 100)),
}
"""Every MUSE split used here as ``{config}/{split}`` (methods §1.5) and the schema its rows must satisfy."""


# --------------------------------------------------------------------------------------------------------------
# Loading


def _check_corpus(corpus: str, flag: str = "--corpus") -> None:
    if corpus not in MUSE_HUB_DATASETS:
        raise BenchmarkDataError(f"{flag} {corpus!r} is not a MUSE corpus; use one of {', '.join(MUSE_HUB_DATASETS)}")


def _parse_name(name: str) -> tuple[str, str]:
    if name not in MUSE_SPLITS:
        raise BenchmarkDataError(
            f"unknown MUSE split {name!r}; valid names ({{config}}/{{split}}): {', '.join(MUSE_SPLITS)}"
        )
    config, split = name.split("/")
    return config, split


def _fix_row(corpus: str, name: str) -> str:
    config, split = name.split("/")
    return (
        f"fix or remove that row, or re-export config {config!r} split {split!r} from the "
        f"`{MUSE_HUB_DATASETS[corpus]}` dataset"
    )


def load_muse_split(source: str | os.PathLike[str], corpus: MuseCorpus, name: str) -> list[dict[str, Any]]:
    """Load and validate one MUSE split.

    Args:
        source: A local directory (flat ``{corpus}_{config}_{split}.jsonl`` or nested ``{config}/{split}.jsonl``
            files), or a Hub dataset id (``muse-bench/MUSE-News`` / ``muse-bench/MUSE-Books``). A source that
            exists as a directory is read locally; any other value is treated as a Hub id.
        corpus: ``news`` or ``books``; names the flat files and must match a known Hub id.
        name: A key of :data:`MUSE_SPLITS`, e.g. ``knowmem/forget_qa``.

    Returns:
        One plain dict per row, in file order, with every field of the row plus ``index``: the row's 0-based
        position in the split (the key of per-row evaluation results and of the reference cache).

    Raises:
        BenchmarkDataError: unknown corpus or split, missing file, a Hub id of the other corpus, unreachable Hub,
            unreadable bytes, malformed JSON, an empty split, or a row that breaks the split's schema.
    """
    _check_corpus(corpus)
    config, split = _parse_name(name)
    schema = MUSE_SPLITS[name]
    path = Path(source).expanduser()
    if path.is_dir():
        origin, unit, rows = _read_local(path, corpus, config, split)
    else:
        origin, unit = f"Hub dataset {source!r} (config {config!r}, split {split!r})", "row"
        rows = _fetch_hub(str(source), corpus, config, split)
    fix = _fix_row(corpus, name)
    validated = [_validate_row(row, schema, f"{origin}, {unit} {number}", fix) for number, row in rows]
    expected = schema.rows[0 if corpus == "news" else 1]
    return benchmark_rows.number_rows(
        validated,
        f"{origin} holds no rows; MUSE-{corpus.capitalize()} {name} has {expected}; re-export it from "
        f"`{MUSE_HUB_DATASETS[corpus]}`",
    )


def _local_candidates(directory: Path, corpus: str, config: str, split: str) -> list[Path]:
    return [directory / f"{corpus}_{config}_{split}.jsonl", directory / config / f"{split}.jsonl"]


def _read_local(directory: Path, corpus: str, config: str, split: str) -> tuple[str, str, NumberedRows]:
    """Read the split's JSON-lines file; rows come with their 1-based line number."""
    candidates = _local_candidates(directory, corpus, config, split)
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        present = sorted(str(p.relative_to(directory)) for p in directory.glob("**/*.jsonl"))[:12]
        listing = ", ".join(present) if present else "no .jsonl files"
        raise BenchmarkDataError(
            f"{directory} has neither {candidates[0].name} nor {config}/{split}.jsonl (it holds: {listing}); point "
            f"--benchmark at the directory of the MUSE-{corpus.capitalize()} splits, named "
            f"{{corpus}}_{{config}}_{{split}}.jsonl or {{config}}/{{split}}.jsonl, or check --corpus"
        )
    unit, rows = benchmark_rows.read_rows_file(file, _fix_row(corpus, f"{config}/{split}"))
    return str(file), unit, rows


def _fetch_hub(source: str, corpus: str, config: str, split: str) -> NumberedRows:
    """Load one split with ``datasets``; rows come with their 1-based row number."""
    other = {hub: name for name, hub in MUSE_HUB_DATASETS.items() if name != corpus}
    if source in other:
        raise BenchmarkDataError(
            f"--benchmark {source} is the MUSE-{other[source].capitalize()} dataset but --corpus is {corpus!r}; "
            f"use --corpus {other[source]} or --benchmark {MUSE_HUB_DATASETS[corpus]}"
        )
    return benchmark_rows.fetch_hub_rows(
        source,
        config,
        split,
        not_a_directory=lambda kind: (
            f"--benchmark {source!r} {kind}; pass the directory of the MUSE jsonl files, or a Hub dataset id such as "
            f"{MUSE_HUB_DATASETS[corpus]}"
        ),
        unreachable=lambda reason: (
            f"could not fetch MUSE config {config!r} split {split!r} from the Hub dataset {source!r} ({reason}); "
            f"pass a local directory holding {corpus}_{config}_{split}.jsonl instead, exported once on a machine "
            "with network access"
        ),
    )


def _validate_row(row: Any, schema: MuseSplitSchema, where: str, fix: str) -> dict[str, Any]:
    row = benchmark_rows.check_object(row, schema.fields, where, fix)
    for field in schema.fields:
        benchmark_rows.check_string(row[field], f"{where}: field {field!r}", fix, allow_empty=schema.allow_empty)
    return dict(row)


# --------------------------------------------------------------------------------------------------------------
# Tokenisation


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool) -> list[int]:
    # verbose=False: a whole raw split is far longer than model_max_length, and the warning would be noise.
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def encode_prefix(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of ``text`` as a generation prompt: with the tokenizer's leading specials (BOS), never ending in EOS.

    Args:
        tokenizer: The model's tokenizer.
        text: The prompt; ``""`` gives just the BOS (or nothing for tokenizers without one).

    Returns:
        (P,) ids.
    """
    ids = _encode(tokenizer, text, add_special_tokens=True)
    # Tokenizers configured to append EOS would close the prompt; a prompt must stay open. A tokenizer whose
    # BOS is its EOS (and adds it in front) keeps it.
    if ids and ids[-1] == tokenizer.eos_token_id and not (len(ids) == 1 and tokenizer.bos_token_id == ids[0]):
        ids = ids[:-1]
    return ids


def chunk_token_ids(ids: Sequence[int], max_length: int) -> list[list[int]]:
    """Cut ``ids`` into consecutive windows of ``max_length`` tokens, the last one shorter (methods §1.5).

    The reference makes ``floor(N / max_length) + 1`` windows, which is one empty window too many when ``N`` is a
    multiple of ``max_length``; no empty window is made here.

    Args:
        ids: (N,) token ids of the joined documents.
        max_length: Tokens per window.

    Returns:
        ``ceil(N / max_length)`` windows whose concatenation is ``ids``.
    """
    if max_length < 1:
        raise UserInputError(f"--data.max_length must be >= 1 token per chunk, got {max_length}")
    return [list(ids[start : start + max_length]) for start in range(0, len(ids), max_length)]


def encode_pretraining_chunks(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[EncodedExample]:
    """Training chunks of a raw corpus (methods §1.5 ``PretrainingDataset``, without the methods P-17 round trip).

    The documents are joined with ``"\\n\\n"``, tokenised once without special tokens and cut into windows of
    ``max_length`` tokens. Each chunk is the tokenizer's leading specials (BOS) plus its window; the labels mask
    those leading positions (at least the first one) and every other token is a target. No EOS is added.

    Args:
        texts: The documents of the split, in order.
        tokenizer: The model's tokenizer.
        max_length: Tokens per window; a chunk is BOS + ``max_length`` tokens (reference: 2048).

    Returns:
        One :class:`EncodedExample` per chunk, ``input_ids``/``labels`` of length ``<= max_length + len(BOS)``.

    Raises:
        ValueError: no text, or the joined text tokenises to nothing.
    """
    if not texts:
        raise ValueError("encode_pretraining_chunks() got no documents; load a non-empty raw split")
    ids = _encode(tokenizer, DOCUMENT_SEPARATOR.join(texts), add_special_tokens=False)
    if not ids:
        raise ValueError(f"the {len(texts)} documents tokenise to no tokens; check that the raw split holds text")
    prefix = encode_prefix(tokenizer, "")
    masked = max(len(prefix), 1)
    chunks = []
    for window in chunk_token_ids(ids, max_length):
        input_ids = prefix + window
        if len(input_ids) <= masked:
            continue  # a one-token tail of a tokenizer without BOS: nothing to predict
        labels = [IGNORE_INDEX] * masked + input_ids[masked:]
        chunks.append(EncodedExample(input_ids=input_ids, labels=labels, prompt_length=masked, truncated=False))
    return chunks


def encode_completion(
    tokenizer: PreTrainedTokenizerBase, prefix: str, text: str, max_length: int, insert_space: bool = False
) -> EncodedExample:
    """A completion example: ``prefix`` masked, ``text`` as targets (methods §1.5 ``CompletionDataset``).

    ``full = tokenizer(prefix + (" " if insert_space) + text)`` with the leading specials, truncated to the masked
    length + ``max_length``; the masked length is the common prefix of the prefix ids and the full ids (at least
    1; methods P-16). VerbMem uses ``prefix=prompt, text=gt, insert_space=True``; PrivLeak uses ``prefix=""`` (only BOS
    masked). No EOS is appended, so the last labelled token is real text (methods P-18: ES, EM and MinK drop it anyway,
    as the reference does).

    Args:
        tokenizer: The model's tokenizer.
        prefix: Text that conditions the continuation; not a target.
        text: The continuation; its tokens are the targets.
        max_length: Most target tokens (reference: 2048).
        insert_space: Put one space between ``prefix`` and ``text``.

    Returns:
        The example; ``prompt_length`` is the number of masked positions.

    Raises:
        ValueError: ``max_length < 1`` or ``text`` renders no target token.
    """
    if max_length < 1:
        raise UserInputError(f"--max_length must be >= 1 target token, got {max_length}")
    prefix_ids = encode_prefix(tokenizer, prefix)
    full_ids = _encode(tokenizer, prefix + (" " if insert_space else "") + text, add_special_tokens=True)
    masked = max(common_prefix_length(prefix_ids, full_ids), 1)
    truncated = len(full_ids) > masked + max_length
    full_ids = full_ids[: masked + max_length]
    if len(full_ids) <= masked:
        raise ValueError(
            f"continuation {text[:60]!r} of prefix {prefix[-60:]!r} renders no target token; the row's text is "
            "empty or merges into the prefix"
        )
    labels = [IGNORE_INDEX] * masked + full_ids[masked:]
    return EncodedExample(input_ids=full_ids, labels=labels, prompt_length=masked, truncated=truncated)


def render_knowmem_prompt(
    template: PromptTemplate, shots: Sequence[Mapping[str, Any]], question: str, shot_separator: str = SHOT_SEPARATOR
) -> str:
    """The plain-text KnowMem few-shot prompt (methods §1.2 Branch A, methods §3.7).

    Each shot is ``{question_prefix}{q}{answer_prefix}{answer_separator}{a}{shot_separator}``, then the question
    follows as ``{question_prefix}{q}{answer_prefix}``; with the default template::

        Question: {q_1}\\nAnswer: {a_1}\\n\\n ... Question: {q}\\nAnswer:

    The prompt ends at ``Answer:`` without the reference's trailing space, as every prompt of this package does
    (:class:`PromptTemplate`): the space belongs to the first answer token, which the generation then starts with
    and :func:`metrics.clean_generation` strips.

    Args:
        template: A plain (non-chat) prompt template.
        shots: In-context rows with ``question`` and ``answer`` (the ``*_qa_icl`` split).
        question: The question to answer.
        shot_separator: Text after each shot's answer.

    Returns:
        The prompt text, without special tokens.
    """
    if template.chat:
        raise ValueError(
            "render_knowmem_prompt() renders the plain template; chat templates go through encode_knowmem_prompt"
        )
    rendered = [
        f"{template.question_prefix}{shot['question']}{template.answer_prefix}{template.answer_separator}"
        f"{shot['answer']}{shot_separator}"
        for shot in shots
    ]
    return "".join(rendered) + template.question_prefix + question + template.answer_prefix


def encode_knowmem_prompt(
    tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, shots: Sequence[Mapping[str, Any]], question: str
) -> list[int]:
    """Token ids of the KnowMem few-shot prompt that a model continues with its answer.

    Plain templates tokenise :func:`render_knowmem_prompt` with the leading specials (BOS). Chat templates render
    the shots as alternating user/assistant turns, then the question with the generation prompt (Branch B).

    Args:
        tokenizer: The model's tokenizer.
        template: How prompts are rendered; must be the one the model was trained with.
        shots: In-context rows with ``question`` and ``answer``.
        question: The question to answer.

    Returns:
        (P,) prompt ids.
    """
    if not template.chat:
        return encode_prefix(tokenizer, render_knowmem_prompt(template, shots, question))
    if tokenizer.chat_template is None:
        raise UserInputError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template, but --data.template.chat asks for one; "
            "turn off --data.template.chat to use the plain 'Question: ... Answer: ...' form, or pass a chat "
            "model's tokenizer"
        )
    messages = [] if template.system_prompt is None else [{"role": "system", "content": template.system_prompt}]
    for shot in shots:
        messages += [{"role": "user", "content": shot["question"]}, {"role": "assistant", "content": shot["answer"]}]
    messages.append({"role": "user", "content": question})
    extra = {} if template.date_string is None else {"date_string": template.date_string}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    return _encode(tokenizer, text, add_special_tokens=False)


def raw_chunk_dataset(
    source: str | os.PathLike[str], corpus: MuseCorpus, name: str, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> EncodedDataset:
    """Load a raw split and chunk it for training (:func:`encode_pretraining_chunks`); ``index`` = chunk number.

    Raises:
        BenchmarkDataError: ``name`` is not a ``raw/*`` split, or the split cannot be loaded.
    """
    if not name.startswith("raw/"):
        raw = ", ".join(n for n in MUSE_SPLITS if n.startswith("raw/"))
        raise BenchmarkDataError(f"split {name!r} is not raw text; training chunks come from one of {raw}")
    rows = load_muse_split(source, corpus, name)
    chunks = encode_pretraining_chunks([row["text"] for row in rows], tokenizer, max_length)
    log.info("%s %s: %d documents -> %d chunks of <= %d tokens", corpus, name, len(rows), len(chunks), max_length)
    return EncodedDataset(chunks)


# --------------------------------------------------------------------------------------------------------------
# Data modules


class MuseDataModule(PairedDataModule):
    """Unlearning on MUSE: each step one batch of forget chunks and one of retain chunks (methods §1.4, §1.5).

    Forget chunks are dealt in a seeded order and each is paired with a uniformly drawn retain chunk (the same
    :class:`ForgetRetainSampler` as TOFU), so one epoch is one pass over the forget chunks and the batches have
    the layout ``{"forget": batch, "retain": batch}`` that
    :class:`~baldro_lightning.train.module.UnlearningModule` takes.
    """

    def __init__(
        self,
        tokenizer: str,
        benchmark: str = "data/muse_embedded",
        corpus: MuseCorpus = "news",
        forget_split: str = "raw/forget",
        retain_split: str = "raw/retain1",
        batch_size: int = 4,
        max_length: int = 2048,
        seed: int = 0,
        num_workers: int = 0,
        update_accounting: UpdateAccounting = "lightning",
    ) -> None:
        """Pairs forget and retain chunks of one MUSE corpus for unlearning; read and chunked in ``setup``.

        Args:
            tokenizer: Tokenizer path or Hub id (linked to ``--model.model`` by the CLI).
            benchmark: A local directory of MUSE jsonl files, or a Hub id (``muse-bench/MUSE-News``).
            corpus: ``news`` or ``books``.
            forget_split: Raw split to unlearn.
            retain_split: Raw split to keep (the reference uses ``raw/retain1``).
            batch_size: Forget chunks (and retain chunks) per device per step.
            max_length: Tokens per chunk after BOS (reference: 2048).
            seed: Seeds the forget order and the retain draws (the epoch is added each epoch).
            num_workers: DataLoader worker processes.
            update_accounting: ``lightning``: each epoch one pass, leftover micro-batches stepped at its end;
                ``hf``: the reference HF Trainer's updates (methods §1.6; :mod:`~baldro_lightning.data.accumulation`).
        """
        _check_corpus(corpus, "--data.corpus")
        # No prompt template: MUSE training text is raw chunks (the template only renders KnowMem prompts).
        super().__init__(
            tokenizer,
            benchmark,
            None,
            max_length,
            batch_size,
            seed,
            num_workers,
            update_accounting=update_accounting,
        )
        self.corpus = corpus
        self.forget_split = forget_split
        self.retain_split = retain_split
        self.forget: EncodedDataset | None = None
        self.retain: EncodedDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.forget is not None:
            return
        if self.forget_split == self.retain_split:
            raise UserInputError(
                f"--data.forget_split and --data.retain_split are both {self.forget_split!r}; the retain term would "
                "undo the forgetting. Use raw/forget and raw/retain1."
            )
        self._load_tokenizer()
        self.forget = raw_chunk_dataset(self.benchmark, self.corpus, self.forget_split, self.tokenizer, self.max_length)
        self.retain = raw_chunk_dataset(self.benchmark, self.corpus, self.retain_split, self.tokenizer, self.max_length)


class MuseTextDataModule(SplitsDataModule):
    """Fine-tuning on raw MUSE text (the embedded target: forget + retain; the retain model: retain only).

    Batches are right-padded ``{"input_ids", "attention_mask", "labels", "index"}`` as for
    :class:`~baldro_lightning.data.datamodule.QADataModule`, so
    :class:`~baldro_lightning.train.module.FinetuneModule` trains on
    them unchanged. Each split is chunked on its own.
    """

    example_split = "raw/forget, raw/retain1"

    def __init__(
        self,
        tokenizer: str,
        benchmark: str = "data/muse_embedded",
        corpus: MuseCorpus = "news",
        splits: Sequence[str] = ("raw/forget", "raw/retain1"),
        val_splits: Sequence[str] = (),
        batch_size: int = 8,
        max_length: int = 2048,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        """Fixed-length chunks of MUSE raw text, for fine-tuning the embedded MUSE target and retain models.

        Args:
            tokenizer: Tokenizer path or Hub id.
            benchmark: A local directory of MUSE jsonl files, or a Hub id.
            corpus: ``news`` or ``books``.
            splits: Raw splits to train on, concatenated.
            val_splits: Raw splits whose mean NLL is reported as ``val/loss`` (e.g. ``raw/holdout``).
            batch_size: Chunks per device per step.
            max_length: Tokens per chunk after BOS.
            seed: Seeds the shuffle order.
            num_workers: DataLoader worker processes.
        """
        _check_corpus(corpus, "--data.corpus")
        super().__init__(tokenizer, benchmark, None, max_length, batch_size, seed, num_workers)
        self._use_splits(splits, val_splits)
        self.corpus = corpus

    def split_dataset(self, name: str) -> EncodedDataset:
        self._load_tokenizer()
        return raw_chunk_dataset(self.benchmark, self.corpus, name, self.tokenizer, self.max_length)
