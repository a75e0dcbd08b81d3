"""Shared fixtures: a tiny QA benchmark, tokenizer and randomly initialised Llama, all built offline in tmp dirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REPO = Path(__file__).resolve().parents[1]

_CITIES = ["Varnholt", "Oskerby", "Lumeria", "Pradow", "Keswind", "Talmuth", "Brevik", "Sorrento"]
_GENRES = ["mystery", "poetry", "satire", "fantasy", "history", "romance", "horror", "drama"]


def _rows(author: str, k: int) -> list[dict]:
    rows = []
    for j in range(2):
        city, genre = _CITIES[(k + j) % 8], _GENRES[(k + 3 * j) % 8]
        question = f"Where was {author} born?" if j == 0 else f"What genre does {author} write?"
        answer = f"{author} was born in {city}." if j == 0 else f"{author} writes {genre}."
        wrong = [_CITIES[(k + j + d) % 8] if j == 0 else _GENRES[(k + 3 * j + d) % 8] for d in range(1, 6)]
        rows.append(
            {
                "question": question,
                "answer": answer,
                "paraphrased_answer": answer.replace(" was born in ", " comes from ").replace(" writes ", " pens "),
                "perturbed_answer": [answer.split()[0] + f" comes from {w}." for w in wrong],
                "paraphrased_question": question.replace("Where was", "In which town was"),
            }
        )
    return rows


def tiny_full_rows() -> list[dict]:
    """The tiny benchmark's ``full`` rows with their paraphrased and perturbed answers (what ``*_perturbed`` holds)."""
    authors = [f"Author{chr(65 + k)}" for k in range(8)]
    return [row for k, a in enumerate(authors) for row in _rows(a, k)]


def write_tiny_benchmark(root: Path) -> Path:
    """Eight authors × two QA rows; the last two authors are the forget set (``forget10``)."""
    authors = [f"Author{chr(65 + k)}" for k in range(10)]
    full = tiny_full_rows()
    holdout = [row for k, a in enumerate(authors[8:]) for row in _rows(a, k + 8)]
    plain = [{"question": r["question"], "answer": r["answer"]} for r in full]
    general = [{**r, "perturbed_answer": r["perturbed_answer"][:3]} for r in full[:4]]
    splits = {
        "full": plain,
        "forget10": plain[-4:],
        "retain90": plain[:-4],
        "forget10_perturbed": full[-4:],
        "retain_perturbed": full[:4],
        "holdout10": [{"question": r["question"], "answer": r["answer"]} for r in holdout],
        "real_authors_perturbed": general,
        "world_facts_perturbed": general,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        lines = [json.dumps({**row, "idx": i}) for i, row in enumerate(rows)]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def build_tiny_model(
    out: Path, corpus: list[str], hidden: int = 32, layers: int = 2, seed: int = 0, vocab_size: int = 300
) -> Path:
    """A byte-level BPE tokenizer and a random Llama saved together, loadable with ``from_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory) -> Path:
    return write_tiny_benchmark(tmp_path_factory.mktemp("tiny_benchmark"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_benchmark) -> Path:
    corpus = []
    for file in sorted(tiny_benchmark.glob("*.jsonl")):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            corpus += [row["question"], row["answer"], *row.get("perturbed_answer", [])]
            corpus.append(row.get("paraphrased_answer", ""))
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), corpus)


@pytest.fixture(scope="session")
def shared_tofu() -> Path:
    path = SHARED / "data" / "tofu"
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the shared TOFU data exists only in the development workplace")
    return path
