"""QA tokenisation, label masking, truncation and padding on a hand-made word-level tokenizer (no downloads).

The tokenizer splits on whitespace and maps each word to a fixed id, so every expected id list below can be read
off the vocabulary.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from baldro_lightning.data.tokenization import (
    EncodedExample,
    PaddingCollator,
    PromptTemplate,
    QADataset,
    collate,
    encode_example,
    encode_prompt,
    encode_rows,
    load_tokenizer,
    save_tokenizer,
)
from baldro_lightning.user_errors import UserInputError

WORDS = [
    "<pad>", "<s>", "</s>", "<unk>", "Question:", "Answer:", "Answer:Paris", "Where", "is", "Paris?",
    "Paris", "in", "France.", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "Be", "brief.", "very",
    "Today:", "1-Jan",
]  # fmt: skip
V = {word: i for i, word in enumerate(WORDS)}
PAD, BOS, EOS = V["<pad>"], V["<s>"], V["</s>"]
M = -100
QUESTION = "Where is Paris?"
# BOS, "Question:", "Where", "is", "Paris?", "Answer:"
PROMPT_IDS = [BOS, V["Question:"], V["Where"], V["is"], V["Paris?"], V["Answer:"]]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if date_string is defined %}Today: {{ date_string }} {% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _build(pad: str | None = "<pad>", eos: str | None = "</s>") -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(vocab=V, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    specials = {"bos_token": "<s>", "unk_token": "<unk>", "pad_token": pad, "eos_token": eos}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in specials.items() if v is not None})


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return _build()


@pytest.fixture
def chat_tokenizer() -> PreTrainedTokenizerFast:
    tok = _build()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_plain_prompt_is_masked_and_answer_plus_eos_are_targets(tokenizer: PreTrainedTokenizerBase) -> None:
    ex = encode_example(tokenizer, PromptTemplate(), QUESTION, "Paris is in France.", max_length=64)
    answer = [V["Paris"], V["is"], V["in"], V["France."], EOS]
    assert ex.input_ids == PROMPT_IDS + answer
    assert ex.labels == [M] * 6 + answer
    assert ex.prompt_length == 6
    assert not ex.truncated
    assert encode_prompt(tokenizer, PromptTemplate(), QUESTION) == PROMPT_IDS


def test_border_merge_masks_only_the_common_prefix(tokenizer: PreTrainedTokenizerBase) -> None:
    """With no separator "Answer:" and "Paris" merge into the single word "Answer:Paris".

    Prompt ids end in "Answer:" (id 5) but the full ids hold "Answer:Paris" (id 6) there, so only the first five
    ids are shared; masking six positions would hide the merged answer token.
    """
    template = PromptTemplate(answer_separator="")
    ex = encode_example(tokenizer, template, QUESTION, "Paris", max_length=64)
    assert ex.input_ids == PROMPT_IDS[:5] + [V["Answer:Paris"], EOS]
    assert ex.prompt_length == 5
    assert ex.labels == [M] * 5 + [V["Answer:Paris"], EOS]


def test_truncation_keeps_eos_and_marks_the_example(tokenizer: PreTrainedTokenizerBase) -> None:
    ex = encode_example(tokenizer, PromptTemplate(), QUESTION, "Paris is very very very very in France.", 9)
    assert ex.input_ids == PROMPT_IDS + [V["Paris"], V["is"], EOS]
    assert ex.labels == [M] * 6 + [V["Paris"], V["is"], EOS]
    assert ex.truncated
    exact = encode_example(tokenizer, PromptTemplate(), QUESTION, "Paris is very", 10)
    assert len(exact.input_ids) == 10 and not exact.truncated


def test_prompt_that_fills_max_length_is_an_error(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match=r"alone is 6 tokens, .* within --data.max_length=7; raise --data.max_length"):
        encode_example(tokenizer, PromptTemplate(), QUESTION, "Paris is in France.", 7)


def test_dataset_warns_once_with_the_truncated_count(
    tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [
        {"question": QUESTION, "answer": "Paris is very very very very in France.", "index": 7},
        {"question": QUESTION, "answer": "Paris", "index": 8},
        {"question": QUESTION, "answer": "Paris is very very in France.", "index": 9},
    ]
    with caplog.at_level(logging.WARNING, logger="baldro_lightning.data.tokenization"):
        dataset = QADataset(rows, tokenizer, PromptTemplate(), max_length=9)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["2 of 3 rows longer than max_length=9; their answers were truncated; raise --data.max_length"]
    assert len(dataset) == 3
    item = dataset[1]
    assert item["index"] == 8
    assert item["input_ids"].dtype == torch.long
    assert item["input_ids"].tolist() == PROMPT_IDS + [V["Paris"], EOS]
    assert item["labels"].tolist() == [M] * 6 + [V["Paris"], EOS]
    assert all(dataset[i]["input_ids"][-1].item() == EOS for i in range(3))


def test_dataset_without_overlong_rows_does_not_warn(
    tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="baldro_lightning.data.tokenization"):
        dataset = QADataset([{"question": QUESTION, "answer": "Paris"}], tokenizer, PromptTemplate(), max_length=64)
    assert not caplog.records
    assert dataset[0]["index"] == 0  # rows without an index field are numbered by position


def test_encode_rows_uses_the_given_keys_and_rejects_non_strings(tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [{"question": "ignored", "paraphrased_question": QUESTION, "answer": "Paris", "perturbed_answer": ["x"]}]
    (ex,) = encode_rows(rows, tokenizer, PromptTemplate(), 64, question_key="paraphrased_question")
    assert isinstance(ex, EncodedExample) and ex.input_ids[:6] == PROMPT_IDS
    with pytest.raises(ValueError, match=r"row 0 \(0-based\): field 'perturbed_answer' must be a string, got list"):
        encode_rows(rows, tokenizer, PromptTemplate(), 64, answer_key="perturbed_answer")
    with pytest.raises(ValueError, match=r"field 'paraphrased_answer' must be a string, got no such field"):
        encode_rows(rows, tokenizer, PromptTemplate(), 64, answer_key="paraphrased_answer")


def test_chat_template_masks_everything_before_the_answer(chat_tokenizer: PreTrainedTokenizerBase) -> None:
    template = PromptTemplate(chat=True, system_prompt="Be brief.", date_string="1-Jan")
    prompt = [
        BOS, V["Today:"], V["1-Jan"], V["<|system|>"], V["Be"], V["brief."], V["<|end|>"],
        V["<|user|>"], V["Where"], V["is"], V["Paris?"], V["<|end|>"], V["<|assistant|>"],
    ]  # fmt: skip
    assert encode_prompt(chat_tokenizer, template, QUESTION) == prompt
    ex = encode_example(chat_tokenizer, template, QUESTION, "Paris", max_length=64)
    # The template closes the turn with <|end|>, not EOS, so EOS is appended; both are targets.
    assert ex.input_ids == prompt + [V["Paris"], V["<|end|>"], EOS]
    assert ex.labels == [M] * len(prompt) + [V["Paris"], V["<|end|>"], EOS]
    assert ex.prompt_length == len(prompt)


def test_chat_template_ending_in_eos_gets_no_second_eos(chat_tokenizer: PreTrainedTokenizerBase) -> None:
    chat_tokenizer.chat_template = CHAT_TEMPLATE.replace("<|end|>", "{{ eos_token }}")
    ex = encode_example(chat_tokenizer, PromptTemplate(chat=True), QUESTION, "Paris", max_length=64)
    prompt = [BOS, V["<|user|>"], V["Where"], V["is"], V["Paris?"], EOS, V["<|assistant|>"]]
    assert ex.input_ids == prompt + [V["Paris"], EOS]
    assert ex.labels == [M] * 7 + [V["Paris"], EOS]


def test_chat_template_obeys_max_length(chat_tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = [BOS, V["<|user|>"], V["Where"], V["is"], V["Paris?"], V["<|end|>"], V["<|assistant|>"]]
    ex = encode_example(chat_tokenizer, PromptTemplate(chat=True), QUESTION, "Paris is very very in France.", 9)
    assert ex.input_ids == prompt + [V["Paris"], EOS]
    assert ex.labels == [M] * 7 + [V["Paris"], EOS]
    assert ex.truncated
    # A prompt that leaves room for EOS but for no answer token is refused rather than trained on an empty answer.
    with pytest.raises(ValueError, match=r"alone is 7 tokens"):
        encode_example(chat_tokenizer, PromptTemplate(chat=True), QUESTION, "Paris is very.", 8)


def test_chat_without_a_chat_template_is_an_error(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(
        UserInputError, match=r"has no chat template, but --data\.template\.chat asks for one; turn off"
    ):
        encode_prompt(tokenizer, PromptTemplate(chat=True), QUESTION)


def test_system_prompt_needs_chat() -> None:
    with pytest.raises(
        UserInputError,
        match=r"system_prompt='Be brief.' .* only used by chat templates; turn on --data\.template\.chat",
    ):
        PromptTemplate(system_prompt="Be brief.")


def test_right_padding_positions() -> None:
    items = [
        {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([M, 6, 2]), "index": 4},
        {"input_ids": torch.tensor([1, 5, 6, 7, 2]), "labels": torch.tensor([M, M, 6, 7, 2]), "index": 9},
    ]
    batch = collate(items, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 0, 0], [1, 5, 6, 7, 2]]
    assert batch["labels"].tolist() == [[M, 6, 2, M, M], [M, M, 6, 7, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["index"].tolist() == [4, 9]
    assert batch["index"].dtype == batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long


def test_left_padding_for_generation_prompts_without_labels() -> None:
    items = [{"input_ids": [1, 5], "index": 0}, {"input_ids": [1, 5, 6, 7], "index": 1}]
    batch = collate(items, pad_token_id=0, padding_side="left")
    assert set(batch) == {"input_ids", "attention_mask", "index"}
    assert batch["input_ids"].tolist() == [[0, 0, 1, 5], [1, 5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    labelled = collate(
        [{"input_ids": [1, 5], "labels": [M, 5]}, {"input_ids": [1, 5, 6], "labels": [M, 5, 6]}], 0, "left"
    )
    assert labelled["labels"].tolist() == [[M, M, 5], [M, 5, 6]]


def test_pad_equal_to_eos_keeps_real_eos_attended(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _build(pad=None).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="baldro_lightning.data.tokenization"):
        tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token_id == tok.eos_token_id == EOS
    assert "no pad token; using its EOS token '</s>' as pad" in caplog.text
    assert "not recomputed from pad ids" in caplog.text
    short = encode_example(tok, PromptTemplate(), QUESTION, "Paris", 64)
    long = encode_example(tok, PromptTemplate(), QUESTION, "Paris is in France.", 64)
    items = [{"input_ids": e.input_ids, "labels": e.labels} for e in (short, long)]
    batch = PaddingCollator(pad_token_id=tok.pad_token_id)(items)
    # Row 0: 6 prompt ids, "Paris", its real EOS (id 2 == pad), then three pads (also id 2).
    assert batch["input_ids"][0].tolist() == PROMPT_IDS + [V["Paris"], EOS, EOS, EOS, EOS]
    assert batch["attention_mask"][0].tolist() == [1] * 8 + [0] * 3
    assert batch["labels"][0].tolist() == [M] * 6 + [V["Paris"], EOS, M, M, M]
    assert batch["attention_mask"][1].tolist() == [1] * 11
    # The reference mask (ids != pad) hides the real EOS too (methods P-14); kept only as a parity switch.
    parity = collate(items, tok.pad_token_id, attention_from="pad_ids")
    assert parity["attention_mask"][0].tolist() == [1] * 7 + [0] * 4
    assert parity["attention_mask"][1].tolist() == [1] * 10 + [0]


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(ValueError, match=r"could not load a tokenizer from '.*no_such_model'"):
        load_tokenizer(str(missing))
    _build(pad=None, eos=None).save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match=r"has no EOS token nor a pad token; every answer must end with EOS"):
        load_tokenizer(str(tmp_path / "bare"))


def test_loaded_tokenizer_keeps_its_own_pad(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _build().save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="baldro_lightning.data.tokenization"):
        tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token_id == PAD
    assert not caplog.records


def test_saved_tokenizer_names_a_class_every_supported_transformers_loads(tmp_path: Path) -> None:
    save_tokenizer(_build(), tmp_path)
    # transformers 5 writes "TokenizersBackend" here, a class 4.x does not have.
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = load_tokenizer(str(tmp_path))
    assert tok("Where is Paris?").input_ids == [BOS, V["Where"], V["is"], V["Paris?"]]
    assert (tok.pad_token_id, tok.eos_token_id) == (PAD, EOS)


OLD_TRANSFORMERS = os.environ.get("BALDRO_TRANSFORMERS4_PYTHON")
"""A Python interpreter with transformers 4.x installed (pyproject's floor is 4.45), for the cross-version check."""


@pytest.mark.skipif(not OLD_TRANSFORMERS, reason="set BALDRO_TRANSFORMERS4_PYTHON to a Python with transformers 4.x")
def test_saved_tokenizer_loads_with_transformers_4(tmp_path: Path) -> None:
    save_tokenizer(_build(), tmp_path)
    script = (
        "import sys, transformers; from transformers import AutoTokenizer; "
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "print(transformers.__version__, t('Where is Paris?').input_ids, t.pad_token_id)"
    )
    out = subprocess.run([OLD_TRANSFORMERS, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    version, _, rest = out.stdout.strip().partition(" ")
    assert version.startswith("4.")
    assert rest == f"{[BOS, V['Where'], V['is'], V['Paris?']]} {PAD}"


def test_nested_items_collate_key_by_key() -> None:
    items = [
        {"forget": {"input_ids": [1, 2], "labels": [M, 2]}, "retain": {"input_ids": [1, 5, 2], "labels": [M, 5, 2]}},
        {"forget": {"input_ids": [1, 6, 2], "labels": [M, 6, 2]}, "retain": {"input_ids": [1, 2], "labels": [M, 2]}},
    ]
    batch = collate(items, pad_token_id=0)
    assert batch["forget"]["input_ids"].tolist() == [[1, 2, 0], [1, 6, 2]]
    assert batch["retain"]["labels"].tolist() == [[M, 5, 2], [M, 2, M]]


def test_collate_errors() -> None:
    with pytest.raises(ValueError, match=r"2 labels for 3 input_ids"):
        collate([{"input_ids": [1, 2, 3], "labels": [M, 2]}], 0)
    with pytest.raises(ValueError, match=r"items with different keys"):
        collate([{"input_ids": [1]}, {"input_ids": [1], "labels": [M]}], 0)
    with pytest.raises(ValueError, match=r"padding_side='middle'; use 'right'"):
        collate([{"input_ids": [1]}], 0, padding_side="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got item keys \['input_ids', 'mask'\]"):
        collate([{"input_ids": [1], "mask": [1]}], 0)


def test_padding_collator_is_picklable_and_works_in_a_dataloader(tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [{"question": QUESTION, "answer": a} for a in ("Paris", "Paris is in France.")]
    dataset = QADataset(rows, tokenizer, PromptTemplate(), max_length=64)
    collator = pickle.loads(pickle.dumps(PaddingCollator(pad_token_id=PAD, padding_side="right")))
    (batch,) = DataLoader(dataset, batch_size=2, collate_fn=collator)
    assert batch["input_ids"].shape == (2, 11)
    assert batch["attention_mask"].sum(dim=1).tolist() == [8, 11]
    assert batch["index"].tolist() == [0, 1]
