"""The prompt template and attention mask travel with the model: an export writes them (``prompt_template.json``),
``python -m baldro_lightning evaluate`` reads them and explicit flags override single fields; and the reference's
pad-id attention mask (methods P-14) is an option of training and evaluation alike."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from baldro_lightning.data.datamodule import ForgetRetainDataModule, PairCollator
from baldro_lightning.data.tokenization import (
    INPUT_FORMAT_FILE,
    InputFormat,
    PromptTemplate,
    encode_example,
    load_tokenizer,
    read_input_format,
    write_input_format,
)
from baldro_lightning.evaluation.command import main as evaluate_main
from baldro_lightning.evaluation.command import resolve_input_format
from baldro_lightning.evaluation.engine import AnswerExample, score_examples
from baldro_lightning.train.export import datamodule_input_format, export_checkpoint, save_pretrained_atomic

# The TOFU configs' Llama-2-chat template (experiments/tofu/defaults.yaml).
INST = PromptTemplate(question_prefix="[INST] ", answer_prefix=" [/INST]", answer_separator="")


def test_input_format_round_trip(tmp_path):
    written = write_input_format(tmp_path, InputFormat(INST, "pad_ids"))
    assert written == tmp_path / INPUT_FORMAT_FILE
    assert read_input_format(tmp_path) == (InputFormat(INST, "pad_ids"), written)
    assert read_input_format(written) == (InputFormat(INST, "pad_ids"), written)  # the file itself
    assert read_input_format(tmp_path / "elsewhere") is None  # a directory without one (or a Hub id)
    written.write_text(json.dumps({"template": {"prefix": "Q"}}))
    with pytest.raises(ValueError, match=r"prompt_template\.json is not a prompt template file"):
        read_input_format(tmp_path)
    with pytest.raises(ValueError, match=r"--prompt_template='.*missing\.json' does not exist"):
        read_input_format(tmp_path / "missing.json")


def test_flags_override_single_fields():
    """No flag: the saved format as it is. --question_prefix: that field only. --no_chat over a saved chat template
    also drops its system prompt and date (chat-only fields). Nothing saved: the plain default with the flags."""
    chat = InputFormat(PromptTemplate(chat=True, system_prompt="Be brief.", date_string="10 Apr 2025"), "pad_ids")
    none = dict.fromkeys(("chat", "system_prompt", "question_prefix", "attention_from"))
    assert resolve_input_format(InputFormat(INST), none) == InputFormat(INST)
    changed = resolve_input_format(InputFormat(INST), {**none, "question_prefix": "Q: "})
    assert changed == InputFormat(PromptTemplate(question_prefix="Q: ", answer_prefix=" [/INST]", answer_separator=""))
    assert resolve_input_format(chat, {**none, "chat": False}) == InputFormat(PromptTemplate(), "pad_ids")
    assert resolve_input_format(chat, {**none, "attention_from": "lengths"}).attention_from == "lengths"
    assert resolve_input_format(None, {**none, "chat": True}) == InputFormat(PromptTemplate(chat=True))


def test_the_export_writes_what_the_data_module_renders_with(tiny_model, tiny_benchmark, tmp_path):
    data = ForgetRetainDataModule(str(tiny_model), str(tiny_benchmark), template=INST, attention_from="pad_ids")
    inputs = datamodule_input_format(data)
    assert inputs == InputFormat(INST, "pad_ids")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    out = save_pretrained_atomic(model, load_tokenizer(str(tiny_model)), tmp_path / "model", inputs)
    assert read_input_format(out)[0] == InputFormat(INST, "pad_ids")
    assert datamodule_input_format(None) is None


def test_checkpoint_export_takes_the_format_from_the_run_config(tiny_model, tmp_path):
    """``export --config <run>/config.yaml`` records the config's data template and mask; the checkpoint here is the
    untrained policy (the export copies whatever weights it holds)."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    torch.save(
        {"state_dict": {f"policy.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": {}},
        tmp_path / "last.ckpt",
    )
    template = {"chat": False, "question_prefix": "[INST] ", "answer_prefix": " [/INST]", "answer_separator": ""}
    config = {"model": {"init_args": {"model": str(tiny_model)}}, "data": {"init_args": {"template": template}}}
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    out = export_checkpoint(tmp_path / "last.ckpt", tmp_path / "model", config=str(tmp_path / "config.yaml"))
    assert read_input_format(out)[0] == InputFormat(INST, "lengths")


@pytest.fixture
def exported(tiny_model, tmp_path) -> Path:
    """The tiny model as an export of a run trained with the [INST] template and the pad-id mask."""
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    write_input_format(model, InputFormat(INST, "pad_ids"))
    return model


def test_evaluate_scores_with_the_template_the_model_was_trained_with(exported, tiny_benchmark, tmp_path):
    args = ["--benchmark", str(tiny_benchmark), "--limit", "2", "--metric_groups", "[forget]", "--device", "cpu"]
    args += ["--max_new_tokens", "2"]
    result = evaluate_main(["--model", str(exported), "--out", str(tmp_path / "a.json"), *args])
    meta = result["meta"]
    assert PromptTemplate(**meta["template"]) == INST and meta["attention_from"] == "pad_ids"
    assert any(f"read from {exported / INPUT_FORMAT_FILE}" in note for note in meta["notes"])
    # An explicit flag replaces one field; the others stay the saved ones.
    flags = ["--question_prefix", "Q: ", "--attention_from", "lengths"]
    result = evaluate_main(["--model", str(exported), "--out", str(tmp_path / "b.json"), *args, *flags])
    meta = result["meta"]
    assert meta["template"]["question_prefix"] == "Q: " and meta["template"]["answer_prefix"] == " [/INST]"
    assert meta["attention_from"] == "lengths"
    assert any("overridden by --question_prefix, --attention_from" in note for note in meta["notes"])
    # The prompt changes the scores: the saved template's forget probabilities are not the override's.
    first = json.loads((tmp_path / "a.json").read_text())["metrics"]["forget_Q_A_Prob"]["agg_value"]
    assert first != result["metrics"]["forget_Q_A_Prob"]["agg_value"]


def test_pad_id_mask_is_a_data_and_evaluation_option(tiny_model, tiny_benchmark):
    """With the EOS id as pad (Llama's case) the reference mask ``ids != pad`` also hides a real EOS inside a row;
    the default mask (from lengths) keeps it. The data module hands its option to its collator, and scoring with
    it equals a forward with that mask."""
    tokenizer = load_tokenizer(str(tiny_model))
    eos = tokenizer.eos_token_id
    items = [{"forget": {"input_ids": [1, eos, 7], "index": 0}, "retain": {"input_ids": [1, 5], "index": 0}}]
    items[0]["padded"] = False
    assert PairCollator(eos, "pad_ids")(items)["forget"]["attention_mask"].tolist() == [[1, 0, 1]]
    assert PairCollator(eos)(items)["forget"]["attention_mask"].tolist() == [[1, 1, 1]]

    data = ForgetRetainDataModule(str(tiny_model), str(tiny_benchmark), attention_from="pad_ids")
    assert data.train_dataloader().collate_fn.pad.attention_from == "pad_ids"

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    example = encode_example(tokenizer, PromptTemplate(), "Where was AuthorI born?", "AuthorI was born in Pradow.", 64)
    ids = list(example.input_ids)
    ids[2] = eos  # a real EOS inside the prompt, as Llama-3's <|eot_id|> delimiters are
    item = AnswerExample(ids, list(example.labels))
    with torch.no_grad():
        by_ids, by_lengths = (
            score_examples(model, [item], 1, eos, attention_from=mode)[0].nll_mean for mode in ("pad_ids", "lengths")
        )
        input_ids = torch.tensor([ids])
        logits = model(input_ids=input_ids, attention_mask=(input_ids != eos).long()).logits
    labels = torch.tensor([example.labels])
    logps = torch.log_softmax(logits[0, :-1].float(), -1)
    targets = labels[0, 1:]
    keep = targets != -100
    expected = -logps[keep].gather(-1, targets[keep].unsqueeze(-1)).mean()
    assert by_ids == pytest.approx(float(expected), rel=1e-5)
    assert by_ids != pytest.approx(by_lengths, rel=1e-6)
