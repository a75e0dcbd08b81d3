"""Hugging Face export of the trained policy: the end-of-fit callback and ``python -m baldro_lightning export``.

One short fit per case (with and without LoRA) writes both a checkpoint and the callback's export; the
command-line export of that checkpoint must then equal the callback's, and either must load with
``AutoModelForCausalLM.from_pretrained`` as a plain model that computes what the trained policy computes.
The FSDP2 (distributed checkpoint) path is exercised by tests/test_distributed_resume.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

from baldro_lightning.data.datamodule import ForgetRetainDataModule
from baldro_lightning.data.tokenization import load_tokenizer
from baldro_lightning.train.export import ExportPretrained, main, save_pretrained_atomic
from baldro_lightning.train.lora import LoRA
from baldro_lightning.train.losses import NLL, NPO
from baldro_lightning.train.module import UnlearningModule
from baldro_lightning.user_errors import UserInputError

ADAPTERS = LoRA(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))


def data_module(model: Path, benchmark: Path) -> ForgetRetainDataModule:
    return ForgetRetainDataModule(str(model), str(benchmark), batch_size=2, max_length=64)


@pytest.fixture(scope="module")
def base_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with sampling defaults of its own, which an export must carry over."""
    path = Path(shutil.copytree(tiny_model, tmp_path_factory.mktemp("base") / "model"))
    generation = GenerationConfig.from_pretrained(str(path))
    generation.max_new_tokens = 77
    generation.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def runs(base_model, tiny_benchmark, tmp_path_factory):
    """``runs("full" | "lora")``: a 2-step NPO fit that saves ``last.ckpt`` and exports at fit end, trained once.

    The LoRA run also uses activation checkpointing, which turns the policy's KV cache off. Returns (module, run
    directory).
    """
    cache = {}

    def get(name: str) -> tuple[UnlearningModule, Path]:
        if name not in cache:
            run = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            module = UnlearningModule(
                str(base_model),
                NPO(),
                retain_loss=NLL(),
                lr_schedule="constant",
                optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
                lora={"full": None, "lora": ADAPTERS}[name],
                gradient_checkpointing=name == "lora",
            )
            trainer = L.Trainer(
                accelerator="cpu",
                devices=1,
                max_steps=2,
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[ModelCheckpoint(dirpath=run / "ckpt", save_last=True), ExportPretrained(str(run / "model"))],
            )
            trainer.fit(module, data_module(base_model, tiny_benchmark))
            cache[name] = module, run
        return cache[name]

    return get


def policy_logits(module: UnlearningModule, input_ids: torch.Tensor) -> torch.Tensor:
    module.policy.eval()
    try:
        with torch.no_grad():
            return module.policy(input_ids=input_ids).logits
    finally:
        module.policy.train()


@pytest.mark.parametrize("name", ["full", "lora"])
def test_callback_export_is_a_plain_model_computing_the_trained_policy(runs, base_model, name):
    module, run = runs(name)
    exported = AutoModelForCausalLM.from_pretrained(str(run / "model")).eval()
    assert type(exported) is LlamaForCausalLM
    assert exported.config.use_cache is True
    assert exported.generation_config.max_new_tokens == 77

    # LoRA is merged: the same tensor names and shapes as the base model, no adapter or reference weights.
    weights = load_file(run / "model" / "model.safetensors")
    base = load_file(Path(base_model) / "model.safetensors")
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in base.items()}

    input_ids = torch.tensor([[1, 5, 17, 42, 99, 7], [1, 12, 8, 3, 64, 250]])
    with torch.no_grad():
        assert_close(exported(input_ids=input_ids).logits, policy_logits(module, input_ids), rtol=1e-5, atol=1e-5)
        moved = (
            (
                exported(input_ids=input_ids).logits
                - AutoModelForCausalLM.from_pretrained(str(base_model))(input_ids=input_ids).logits
            )
            .abs()
            .max()
        )
    assert moved > 1e-3, "training did not move the policy, so the comparison above shows nothing"

    tokenizer = AutoTokenizer.from_pretrained(str(run / "model"))
    original = AutoTokenizer.from_pretrained(str(base_model))
    text = "Where was AuthorI born?"
    assert tokenizer(text).input_ids == original(text).input_ids
    assert tokenizer.pad_token_id == original.pad_token_id
    # transformers 4.x cannot load a directory whose tokenizer_class is 5's TokenizersBackend.
    saved = json.loads((run / "model" / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_lora_export_leaves_the_live_policy_unmerged(runs, base_model):
    """Merging works on a gathered copy: the base weights inside the live policy stay the pristine ones."""
    module, _ = runs("lora")
    pristine = AutoModelForCausalLM.from_pretrained(str(base_model)).state_dict()
    for name, param in module.policy.named_parameters():
        if not param.requires_grad:
            key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(param, pristine[key]), f"{name} was modified by the export"


@pytest.mark.parametrize("source", ["checkpoint", "config"])
@pytest.mark.parametrize("name", ["full", "lora"])
def test_command_line_export_of_the_checkpoint_equals_the_callback_export(runs, base_model, tmp_path, name, source):
    module, run = runs(name)
    args = ["--checkpoint", str(run / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "model")]
    if source == "config":
        # As LightningCLI saves it: the model path and LoRA options come from the YAML, not the checkpoint.
        lora = None if module.lora is None else vars(module.lora)
        config = {"model": {"init_args": {"model": str(base_model), "lora": lora}}, "data": {"init_args": {}}}
        (tmp_path / "config.yaml").write_text(json.dumps(config))
        args += ["--config", str(tmp_path / "config.yaml")]
    out = main(args)

    from_callback = load_file(run / "model" / "model.safetensors")
    from_checkpoint = load_file(out / "model.safetensors")
    assert from_checkpoint.keys() == from_callback.keys()
    for name, value in from_callback.items():
        assert torch.equal(from_checkpoint[name], value), name
    assert (
        AutoTokenizer.from_pretrained(str(out)).pad_token_id
        == AutoTokenizer.from_pretrained(str(base_model)).pad_token_id
    )
    assert (out / "config.json").read_text() == (run / "model" / "config.json").read_text()
    assert GenerationConfig.from_pretrained(str(out)).max_new_tokens == 77
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "staging directory left behind"


def test_command_line_errors_name_the_flag(tmp_path):
    with pytest.raises(UserInputError, match=r"--checkpoint='.*missing\.ckpt' does not exist"):
        main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "out")])
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(UserInputError, match=r"holds no policy\.\* weights"):
        main(["--checkpoint", str(tmp_path / "other.ckpt"), "--out", str(tmp_path / "out")])
    torch.save({"state_dict": {"policy.lm_head.weight": torch.zeros(2)}}, tmp_path / "finetune.ckpt")
    with pytest.raises(UserInputError, match=r"stores no model path .*pass --config <run>/config\.yaml or --model"):
        main(["--checkpoint", str(tmp_path / "finetune.ckpt"), "--out", str(tmp_path / "out")])
    (tmp_path / "not_a_checkpoint").mkdir()
    with pytest.raises(UserInputError, match=r"directory without meta\.pt"):
        main(["--checkpoint", str(tmp_path / "not_a_checkpoint"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


OLD_TRANSFORMERS = os.environ.get("BALDRO_TRANSFORMERS4_PYTHON")
"""A Python interpreter with transformers 4.x installed (pyproject's floor is 4.45), for the cross-version check."""


@pytest.mark.skipif(not OLD_TRANSFORMERS, reason="set BALDRO_TRANSFORMERS4_PYTHON to a Python with transformers 4.x")
def test_exported_directory_loads_with_transformers_4(tiny_model, tmp_path):
    out = save_pretrained_atomic(
        AutoModelForCausalLM.from_pretrained(str(tiny_model)), load_tokenizer(str(tiny_model)), tmp_path / "model"
    )
    text = "Where was AuthorI born?"
    ids = AutoTokenizer.from_pretrained(str(out))(text).input_ids
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(str(out))(input_ids=torch.tensor([ids])).logits
    script = (
        "import sys, json, torch, transformers; from transformers import AutoTokenizer, AutoModelForCausalLM; "
        "ids = AutoTokenizer.from_pretrained(sys.argv[1])(sys.argv[2]).input_ids; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
        "print(json.dumps([transformers.__version__, ids, m(input_ids=torch.tensor([ids])).logits.tolist()]))"
    )
    run = subprocess.run([OLD_TRANSFORMERS, "-c", script, str(out), text], capture_output=True, text=True, check=True)
    version, old_ids, old_logits = json.loads(run.stdout.strip().splitlines()[-1])
    assert version.startswith("4.")
    assert old_ids == ids
    assert_close(torch.tensor(old_logits), logits, rtol=1e-5, atol=1e-5)
