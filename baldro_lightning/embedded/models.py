"""Tokenizer and tiny Llama for the embedded benchmark: everything needed to train models offline on a CPU.

``train_tokenizer`` fits a byte-level BPE on every text of the benchmark files (training and evaluation text, so
paraphrases and perturbed answers tokenise as well as training answers); ``init_tiny_llama`` saves a randomly
initialised ``LlamaForCausalLM`` next to that tokenizer, loadable with ``AutoModelForCausalLM.from_pretrained``.
The target and retain models are then fine-tuned from it by the ``fit`` command.

Run ``python -m baldro_lightning embedded-models --data data/tofu_embedded --out models/embedded/init``. The MUSE
models start from a larger model with the same tokenizer (``--hidden-size 256 --num-hidden-layers 6``; the MUSE
section of the top-level README has the command).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from baldro_lightning.data.tokenization import save_tokenizer

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
"""Ids 0..3, in Llama's order for unk/bos/eos; pad is its own token, never EOS (methods P-14)."""
TEXT_FIELDS = ("paraphrased_question", "paraphrased_answer")
"""Row fields fed to the tokenizer besides the question/answer pair and the ``perturbed_answer`` list."""


def _row_texts(row: object, where: str) -> list[str]:
    """The texts of one benchmark row: a TOFU QA row, a MUSE raw/privleak row (``text``) or a VerbMem row."""
    if isinstance(row, dict) and {"question", "answer"} <= row.keys():
        texts = [f"Question: {row['question']}\nAnswer: {row['answer']}"]
        texts += [row[field] for field in TEXT_FIELDS if field in row]
        return texts + list(row.get("perturbed_answer", []))
    if isinstance(row, dict) and "text" in row:
        return [row["text"]] if row["text"] else []  # MUSE raw splits may hold an empty document
    if isinstance(row, dict) and {"prompt", "gt"} <= row.keys():
        return [f"{row['prompt']} {row['gt']}"]  # how VerbMem scores it: prompt, one space, continuation
    raise ValueError(
        f"{where}: expected a JSON object with 'question' and 'answer' (TOFU, MUSE knowmem), 'text' (MUSE raw, "
        "privleak) or 'prompt' and 'gt' (MUSE verbmem)"
    )


def corpus_texts(data_dir: Path) -> Iterator[str]:
    """Every distinct text of the ``*.jsonl`` files of ``data_dir``, in a fixed order (sorted files, row order).

    A question/answer pair is yielded in the ``Question: {q}\\nAnswer: {a}`` layout the QA template uses, so the
    template's words and line break are learned as tokens; evaluation-only fields are yielded on their own. MUSE
    files (``data/muse_embedded``) give their articles and VerbMem passages as they are.

    Raises:
        ValueError: ``data_dir`` holds no ``*.jsonl`` file, or a row is none of the row kinds above.
    """
    files = sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise ValueError(f"no *.jsonl file in {data_dir}; generate the benchmark first (embedded_world --out ...)")
    seen: dict[str, None] = {}
    for path in files:
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                for text in _row_texts(json.loads(line), f"{path}:{line_no}"):
                    if text not in seen:
                        seen[text] = None
                        yield text


def train_tokenizer(
    data_dir: Path,
    out_dir: Path,
    vocab_size: int = 2048,
    model_max_length: int = 256,
    max_token_length: int | None = 7,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the benchmark and save it with ``save_pretrained``.

    The result prepends ``<s>`` to every encoded text (as Llama's tokenizer does), has a dedicated ``<pad>``,
    and decodes back to the exact input text. Same files give a byte-identical ``tokenizer.json``.

    Args:
        data_dir: folder of benchmark ``*.jsonl`` files (all of them are read).
        out_dir: where ``tokenizer.json`` and ``tokenizer_config.json`` are written.
        vocab_size: size of the vocabulary, special tokens and the 256 byte symbols included.
        model_max_length: the tokenizer's maximum sequence length (the model's context size).
        max_token_length: longest token, in UTF-8 bytes of its byte-level form (the space marker ``Ġ`` takes
            two). Without a cap, every invented author name (seen in ten questions) becomes a single token at
            2048 entries; with 7 a name word takes about two tokens, as invented names do in a real LLM's
            vocabulary. ``None`` removes the cap.

    Returns:
        The trained tokenizer, also loadable with ``AutoTokenizer.from_pretrained(out_dir)``.

    Raises:
        ValueError: ``vocab_size`` cannot hold the byte alphabet and the special tokens.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the {len(alphabet)} byte symbols plus "
            f"{len(SPECIAL_TOKENS)} special tokens; use at least {len(alphabet) + len(SPECIAL_TOKENS)}"
        )
    texts = list(corpus_texts(data_dir))
    backend = Tokenizer(models.BPE())
    # No prefix space: "Answer: X" and a bare "X" at the start of a generation must not tokenise differently.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        max_token_length=max_token_length,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=sorted(alphabet),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        # The default clean-up rewrites " ," as ",", so decode(encode(text)) would not give text back.
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, out_dir)
    return tokenizer


def tiny_llama_config(
    vocab_size: int,
    *,
    hidden_size: int = 256,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int = 688,
    max_position_embeddings: int = 256,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    pad_token_id: int = 3,
    tie_word_embeddings: bool = True,
) -> LlamaConfig:
    """A small Llama architecture (about 3.7M parameters at the defaults with a 2048-token vocabulary).

    Args:
        vocab_size: number of token embeddings (``len(tokenizer)``).
        hidden_size: model width; must be divisible by ``num_attention_heads``.
        num_hidden_layers: decoder blocks.
        num_attention_heads: attention heads (no grouped-query sharing: as many key/value heads).
        intermediate_size: width of the SwiGLU feed-forward layer.
        max_position_embeddings: longest sequence the rotary embedding is set up for.
        bos_token_id: the tokenizer's ``<s>`` id.
        eos_token_id: the tokenizer's ``</s>`` id.
        pad_token_id: the tokenizer's ``<pad>`` id.
        tie_word_embeddings: share the input embedding and the output projection.

    Raises:
        ValueError: ``hidden_size`` is not a multiple of ``num_attention_heads``.
    """
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}; "
            "choose sizes with hidden_size % num_attention_heads == 0"
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )


def init_tiny_llama(
    tokenizer_dir: Path, out_dir: Path, seed: int = 0, **config_overrides: int | bool
) -> LlamaForCausalLM:
    """Save a seeded, randomly initialised tiny Llama and its tokenizer into ``out_dir``.

    Both ``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer.from_pretrained(out_dir)`` load
    the result. The caller's global torch RNG state is left unchanged.

    Args:
        tokenizer_dir: folder of a tokenizer saved by :func:`train_tokenizer`.
        out_dir: output folder (created).
        seed: seed of the weight initialisation.
        **config_overrides: keyword arguments of :func:`tiny_llama_config` other than the vocabulary size and
            the special-token ids, which come from the tokenizer.

    Returns:
        The fp32 model that was saved.

    Raises:
        ValueError: an override names a setting :func:`tiny_llama_config` does not have, or the tokenizer lacks
            a BOS, EOS or pad token.
    """
    allowed = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "tie_word_embeddings",
    )
    unknown = sorted(set(config_overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown tiny-Llama settings {unknown}; choose from {list(allowed)}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"tokenizer in {tokenizer_dir} has no {missing} token; train it with train_tokenizer")
    config = tiny_llama_config(
        len(tokenizer),
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        **config_overrides,  # type: ignore[arg-type]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
    model.generation_config.bos_token_id = ids["bos"]
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.pad_token_id = ids["pad"]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)
    return model


def average_example_tokens(tokenizer: PreTrainedTokenizerBase, data_file: Path) -> float:
    """Mean token count of ``Question: {q}\\nAnswer: {a}</s>`` over the rows of ``data_file`` (BOS and EOS counted)."""
    with open(data_file, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    if not rows:
        raise ValueError(f"{data_file} has no rows; point to a non-empty split such as full.jsonl")
    counts = [len(tokenizer(f"Question: {r['question']}\nAnswer: {r['answer']}")["input_ids"]) + 1 for r in rows]
    return statistics.fmean(counts)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: train the tokenizer (unless ``--tokenizer`` is given) and save the initial tiny Llama."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/tofu_embedded"), help="benchmark folder")
    parser.add_argument("--out", type=Path, default=Path("models/embedded/init"), help="output model folder")
    parser.add_argument("--tokenizer", type=Path, default=None, help="existing tokenizer folder (skips training)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size")
    parser.add_argument("--max-token-length", type=int, default=7, help="longest BPE token, in bytes")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-hidden-layers", type=int, default=4)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=688)
    parser.add_argument("--max-position-embeddings", type=int, default=256)
    parser.add_argument(
        "--untied-embeddings", action="store_true", help="separate input embedding and output projection"
    )
    args = parser.parse_args(argv)

    if args.tokenizer is not None:
        if not (args.tokenizer / "tokenizer.json").is_file():
            raise ValueError(f"--tokenizer {args.tokenizer} holds no tokenizer.json; drop the flag to train one")
        tokenizer_dir = args.tokenizer
    else:
        train_tokenizer(
            args.data,
            args.out,
            args.vocab_size,
            model_max_length=args.max_position_embeddings,
            max_token_length=args.max_token_length,
        )
        tokenizer_dir = args.out
    model = init_tiny_llama(
        tokenizer_dir,
        args.out,
        seed=args.seed,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=not args.untied_embeddings,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    print(f"saved {args.out}: {sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(tokenizer)}")
    full = args.data / "full.jsonl"
    if full.is_file():
        print(
            f"mean tokens per 'Question: q\\nAnswer: a</s>' example of {full}: "
            f"{average_example_tokens(tokenizer, full):.1f}"
        )
