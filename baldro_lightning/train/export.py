"""Writing a trained policy as a Hugging Face model directory that ``from_pretrained`` loads.

Two ways in: the :class:`ExportPretrained` callback at the end of ``fit`` (any strategy, FSDP2 included), and the
command line for a saved checkpoint, a single ``.ckpt`` file or a distributed (FSDP2) checkpoint directory::

    python -m baldro_lightning export --checkpoint runs/x/checkpoints/last.ckpt --out runs/x/model

Either way the weights are gathered unsharded on CPU, LoRA adapters are merged into the base weights (the
directory is a plain model of the base architecture), and the tokenizer is saved next to them. Only the policy is
written: checkpoints never hold the frozen reference, and neither does the export.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from baldro_lightning.data.tokenization import load_tokenizer, save_tokenizer
from baldro_lightning.train.lora import LoRA, merged_model

log = logging.getLogger(__name__)

POLICY_PREFIX = "policy."


def save_pretrained_atomic(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` model and tokenizer into a temporary sibling, then rename it into place.

    A run killed while writing leaves the previous directory (or none), never a half-written model.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            save_tokenizer(tokenizer, staging)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _storages(tensors: Iterable[Tensor]) -> set[int]:
    # A sharded (DTensor) parameter's storage is its local shard's.
    return {(t.to_local() if hasattr(t, "to_local") else t).untyped_storage().data_ptr() for t in tensors}


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded weights of ``model`` on CPU, for rank 0 (other ranks may get an empty dict).

    A collective when ``model`` is FSDP2-sharded: every rank must call it. The result never shares storage with
    ``model`` (a plain model's state dict would), so merging adapters into it leaves the live model untouched.
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    live = _storages([*model.parameters(), *model.buffers()])
    return {k: v.detach().clone() if v.untyped_storage().data_ptr() in live else v.detach() for k, v in state.items()}


def consolidated_policy(policy: nn.Module, state: Mapping[str, Tensor]) -> PreTrainedModel:
    """A plain Hugging Face model with ``state`` (from :func:`full_state_dict`) and the adapters merged."""
    from peft import PeftModel

    if isinstance(policy, PeftModel):
        return merged_model(policy.get_base_model(), dict(state), policy.peft_config[policy.active_adapter])
    return merged_model(policy, dict(state), None)


class ExportPretrained(Callback):
    """At the end of ``fit``, save the policy (and the data module's tokenizer) to ``dirpath``.

    ``dirpath=None`` (the default) writes ``model/`` in the run directory, ``--trainer.default_root_dir``, so that a
    run named on the command line exports next to its logs (``<root>/tensorboard``) without naming it twice.

    Works under every strategy: the weights are gathered to rank 0 (a collective under FSDP2, so all ranks take
    part), rank 0 merges any LoRA adapters and writes, and the other ranks wait until the directory is in place.
    """

    needs_fsdp2 = True
    """FSDP1 wraps the policy, which this callback expects unwrapped (see ``sharding.fsdp1_callback_problems``)."""

    def __init__(self, dirpath: str | None = None) -> None:
        """Remember where to export.

        Args:
            dirpath: The model directory to write; ``<trainer.default_root_dir>/model`` when null.
        """
        self.dirpath = dirpath

    def directory(self, trainer: L.Trainer) -> Path:
        """Where the model is written: ``dirpath``, else ``<trainer.default_root_dir>/model``."""
        return Path(self.dirpath) if self.dirpath is not None else Path(trainer.default_root_dir) / "model"

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = full_state_dict(pl_module.policy)
        if trainer.is_global_zero:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
            policy = consolidated_policy(pl_module.policy, state)
            out = save_pretrained_atomic(policy, tokenizer, self.directory(trainer))
            # Lightning's own channel for run news (info level, rank zero): the path is news, not a warning.
            rank_zero_info(f"exported the trained model to {out}")
        del state
        trainer.strategy.barrier("ExportPretrained")


# -- from a checkpoint --------------------------------------------------------------------------------------------
def _distributed_policy_state(path: Path) -> dict[str, Tensor]:
    """The ``policy.*`` tensors of a distributed checkpoint directory (``.distcp`` shards), read in one process."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = "state_dict." + POLICY_PREFIX
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    wanted = {
        key[len("state_dict.") :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if wanted:
        # Only the policy's tensors are read; the optimizer states in the same shards are skipped.
        load({"state_dict": wanted}, checkpoint_id=str(path))
    return wanted


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The policy's weights (keys without ``policy.``) and the module's hyperparameters from a checkpoint.

    Args:
        path: A ``.ckpt`` file, or the directory a ``ModelParallelStrategy`` (FSDP2) run saves per checkpoint.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it holds no policy weights.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint={str(path)!r} does not exist; pass a .ckpt file or checkpoint directory")
    if path.is_dir():
        meta = path / "meta.pt"
        if not meta.is_file():
            raise ValueError(
                f"--checkpoint={str(path)!r} is a directory without meta.pt, so not a Lightning distributed "
                "checkpoint; pass a .ckpt file or a directory that ModelCheckpoint wrote under ModelParallelStrategy"
            )
        # weights_only=False: the hyperparameters hold the loss and objective objects from the YAML.
        checkpoint = torch.load(meta, map_location="cpu", weights_only=False)
        flat = _distributed_policy_state(path)
    else:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        flat = checkpoint.get("state_dict", {})
    policy = {k[len(POLICY_PREFIX) :]: v for k, v in flat.items() if k.startswith(POLICY_PREFIX)}
    if not policy:
        raise ValueError(
            f"--checkpoint={str(path)!r} holds no policy.* weights; it was not written by a baldro_lightning module"
        )
    return policy, dict(checkpoint.get("hyper_parameters") or {})


def _from_config_file(config: str | None) -> tuple[str | None, Any, str | None]:
    """(model path, lora section, tokenizer path) of a run's saved LightningCLI ``config.yaml``."""
    if config is None:
        return None, None, None
    with open(config, encoding="utf-8") as handle:
        parsed = yaml.safe_load(handle) or {}
    model = (parsed.get("model") or {}).get("init_args") or {}
    data = (parsed.get("data") or {}).get("init_args") or {}
    return model.get("model"), model.get("lora"), data.get("tokenizer")


def _as_lora(value: Any) -> LoRA | None:
    if value is None or isinstance(value, LoRA):
        return value
    if isinstance(value, Mapping):
        return LoRA(**{k: tuple(v) if k == "target_modules" else v for k, v in value.items()})
    raise ValueError(f"model.init_args.lora must be a mapping of LoRA options or null, got {value!r}")


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    config: str | None = None,
    model: str | None = None,
    tokenizer: str | None = None,
) -> Path:
    """Export the policy of ``checkpoint`` as a Hugging Face model directory ``out`` (merged, with tokenizer).

    The base model path and the LoRA options come from ``model``/``config`` when given, else from the
    hyperparameters stored in the checkpoint; the tokenizer from ``tokenizer``, else the config's data section,
    else the model path. The base model's weights are not read: the checkpoint holds all of the policy's.

    Raises:
        ValueError: if no model path can be found or the weights do not fit the model.
    """
    state, hparams = read_checkpoint(checkpoint)
    config_model, config_lora, config_tokenizer = _from_config_file(config)
    model_path = model or config_model or hparams.get("model")
    if model_path is None:
        raise ValueError(
            f"--checkpoint={str(checkpoint)!r} stores no model path (modules that do not save hyperparameters); "
            "pass --config <run>/config.yaml or --model <base model directory or Hub id>"
        )
    lora = _as_lora(config_lora if config is not None else hparams.get("lora"))
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    try:
        base.generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:
        pass  # the base model has no generation_config.json: keep the defaults derived from its config
    policy = merged_model(base, state, None if lora is None else lora.peft_config())
    written = save_pretrained_atomic(policy, load_tokenizer(tokenizer or config_tokenizer or model_path), out)
    print(f"exported {checkpoint} (base {model_path}, LoRA {lora}) to {written}")
    return written


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m baldro_lightning export",
        description="Write a checkpoint's unlearned policy as a Hugging Face model directory (weights + tokenizer).",
    )
    parser.add_argument("--checkpoint", required=True, help="a .ckpt file, or a checkpoint directory from an FSDP2 run")
    parser.add_argument("--out", required=True, help="output directory; replaced atomically if it exists")
    parser.add_argument(
        "--config", help="the run's saved config.yaml; default: the hyperparameters stored in the checkpoint"
    )
    parser.add_argument("--model", help="base model directory or Hub id (overrides the config and checkpoint)")
    parser.add_argument("--tokenizer", help="tokenizer directory or Hub id; default: the run's tokenizer")
    args = parser.parse_args(argv)
    return export_checkpoint(args.checkpoint, args.out, args.config, args.model, args.tokenizer)
