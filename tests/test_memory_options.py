"""The memory options chosen in YAML: bf16 precision and activation checkpointing, on CPU with a tiny Llama.

``--trainer.precision=bf16-true`` keeps the weights in bf16; ``bf16-mixed`` keeps fp32 weights and computes the
forward in bf16 (CPU autocast). ``--model.init_args.gradient_checkpointing=true`` recomputes each decoder layer in
backward, which must not change the gradients.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from baldro_lightning.cli import cli_main
from baldro_lightning.data.datamodule import ForgetRetainDataModule
from baldro_lightning.train.export import ExportPretrained
from baldro_lightning.train.losses import NLL, NPO
from baldro_lightning.train.module import UnlearningModule


class ComputeDtype(L.Callback):
    """Records the dtype of the policy's logits and of its weights in each training step."""

    def __init__(self) -> None:
        self.logits: list[torch.dtype] = []
        self.loss: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        head = pl_module.policy.get_output_embeddings()
        head.register_forward_hook(lambda module, args, output: self.logits.append(output.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss.append(float(trainer.callback_metrics["train/loss"]))


@pytest.mark.parametrize(
    ("precision", "weights"), [("bf16-true", torch.bfloat16), ("bf16-mixed", torch.float32)], ids=lambda v: str(v)
)
def test_bf16_fast_dev_run_from_the_command_line(tiny_model, tiny_benchmark, tmp_path, precision, weights):
    cli = cli_main(
        [
            "--model=baldro_lightning.train.module.UnlearningModule",
            f"--model.model={tiny_model}",
            "--model.forget_loss=baldro_lightning.train.losses.NPO",
            "--model.retain_loss=baldro_lightning.train.losses.NLL",
            "--model.lr_schedule=constant",
            "--model.optimizer=torch.optim.AdamW",
            "--model.optimizer.lr=0.01",
            "--data=baldro_lightning.data.datamodule.ForgetRetainDataModule",
            f"--data.benchmark={tiny_benchmark}",
            "--data.batch_size=2",
            "--trainer.accelerator=cpu",
            f"--trainer.precision={precision}",
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    record = ComputeDtype()
    cli.trainer.callbacks += [record, ExportPretrained(str(tmp_path / "model"))]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    # One step; the policy forward runs once per step and the reference's head is another module.
    assert record.logits == [torch.bfloat16]
    assert len(record.loss) == 1 and math.isfinite(record.loss[0])
    policy, reference = cli.model.policy, cli.model.reference
    assert {p.dtype for p in policy.parameters()} == {weights}
    assert {p.dtype for p in reference.parameters()} == {weights}
    pristine = AutoModelForCausalLM.from_pretrained(str(tiny_model)).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(policy.state_dict()[name].float(), pristine[name])
    assert torch.equal(reference.state_dict()[name].float(), pristine[name].to(weights).float())
    # The export keeps the trained weights' dtype.
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), dtype="auto")
    assert {p.dtype for p in exported.parameters()} == {weights}
    assert torch.equal(exported.state_dict()[name], policy.state_dict()[name])


class Gradients(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({n: p.grad.clone() for n, p in pl_module.policy.named_parameters()})


def _gradients(model: Path, benchmark: Path, checkpointing: bool) -> tuple[UnlearningModule, list[dict]]:
    module = UnlearningModule(
        str(model), NPO(), retain_loss=NLL(), lr_schedule="constant", gradient_checkpointing=checkpointing
    )
    grads = Gradients()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[grads],
    )
    trainer.fit(module, ForgetRetainDataModule(str(model), str(benchmark), batch_size=2, max_length=64))
    return module, grads.steps


def test_gradient_checkpointing_recomputes_layers_without_changing_gradients(tiny_model, tiny_benchmark):
    plain, expected = _gradients(tiny_model, tiny_benchmark, checkpointing=False)
    checkpointed, actual = _gradients(tiny_model, tiny_benchmark, checkpointing=True)
    assert all(layer.gradient_checkpointing for layer in checkpointed.policy.model.layers)
    assert not any(layer.gradient_checkpointing for layer in plain.policy.model.layers)
    assert len(actual) == len(expected) == 2
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert got.keys() == want.keys()
        for name, grad in want.items():
            assert grad.abs().sum() > 0, f"{name} has no gradient"
            assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=f"step {step} {name}")


def test_gradient_checkpointing_from_yaml(tiny_model, tiny_benchmark, tmp_path):
    config = tmp_path / "memory.yaml"
    config.write_text(
        "model:\n"
        "  class_path: baldro_lightning.train.module.UnlearningModule\n"
        "  init_args:\n"
        f"    model: {tiny_model}\n"
        "    forget_loss: baldro_lightning.train.losses.NPO\n"
        "    gradient_checkpointing: true\n"
        "    torch_dtype: bfloat16\n"
        "data:\n"
        "  class_path: baldro_lightning.data.datamodule.ForgetRetainDataModule\n"
        f"  init_args: {{benchmark: {tiny_benchmark}}}\n"
    )
    cli = cli_main(["--config", str(config), f"--trainer.default_root_dir={tmp_path}"], run=False)
    cli.model.configure_model()
    assert all(layer.gradient_checkpointing for layer in cli.model.policy.model.layers)
    assert cli.model.policy.config.use_cache is False
    assert {p.dtype for p in cli.model.policy.parameters()} == {torch.bfloat16}
