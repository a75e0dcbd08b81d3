"""Writing a trained policy as a Hugging Face model directory that ``from_pretrained`` loads.

Two ways in: the :class:`ExportPretrained` callback at the end of ``fit`` (any strategy, FSDP2 included), and the
command line for a saved checkpoint, a single ``.ckpt`` file or a distributed (FSDP2) checkpoint directory::

    python -m baldro_lightning export --checkpoint runs/x/checkpoints/last.ckpt --out runs/x/model

Either way the weights are gathered unsharded on CPU, LoRA adapters are merged into the base weights (the
directory is a plain model of the base architecture), and the tokenizer is saved next to them. Only the policy is
written: checkpoints never hold the frozen reference, and neither does the export.

The prompt template and attention mask the model was trained with travel with it, as ``prompt_template.json``
(:func:`~baldro_lightning.data.tokenization.write_input_format`): ``python -m baldro_lightning evaluate`` reads them,
so an exported TOFU model is scored with the ``[INST] … [/INST]`` prompt it learned, not the plain default.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
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
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from baldro_lightning.atomic_files import check_writable, replace_path, staging_directory
from baldro_lightning.data.tokenization import (
    InputFormat,
    PromptTemplate,
    load_tokenizer,
    save_tokenizer,
    write_input_format,
)
from baldro_lightning.train.lora import LoRA, merged_model
from baldro_lightning.train.models import Shapes, check_model_files, read_model_config, shape_mismatch
from baldro_lightning.user_errors import CommandParser, UserInputError

log = logging.getLogger(__name__)

POLICY_PREFIX = "policy."

VOCABULARY = {"--model.model": "--model", "--model.init_args.model": "--model", "--data.tokenizer": "--tokenizer"}
"""The training flags that messages name, as this command's flags (``user_errors.in_vocabulary``)."""


def save_pretrained_atomic(
    model, tokenizer, out_dir: str | os.PathLike, input_format: InputFormat | None = None
) -> Path:
    """``save_pretrained`` model and tokenizer (and the ``input_format`` it was trained with) into a staging
    sibling, then swap it into place.

    ``out_dir`` always holds a whole model, the previous or the new one, whenever the process is killed
    (:func:`~baldro_lightning.atomic_files.replace_path`); a staging copy a kill leaves behind is removed by the
    next export to the same directory. The directory gets the permissions the umask gives.
    """
    out = Path(out_dir)
    staging = staging_directory(out)
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            save_tokenizer(tokenizer, staging)
        if input_format is not None:
            write_input_format(staging, input_format)
        replace_path(staging, out)
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
            inputs = datamodule_input_format(trainer.datamodule)
            out = save_pretrained_atomic(policy, tokenizer, self.directory(trainer), inputs)
            # Lightning's own channel for run news (info level, rank zero): the path is news, not a warning.
            rank_zero_info(f"exported the trained model to {out}")
        del state
        trainer.strategy.barrier("ExportPretrained")


def datamodule_input_format(datamodule: L.LightningDataModule | None) -> InputFormat | None:
    """The prompt template and attention mask a data module of this package renders with; ``None`` for others."""
    template = getattr(datamodule, "template", None)
    if not isinstance(template, PromptTemplate):
        return None
    return InputFormat(template, getattr(datamodule, "attention_from", "lengths"))


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


def _checkpoint_path(path: str | os.PathLike, flag: str) -> Path:
    """``path`` once it exists, and (a directory) holds ``meta.pt`` as Lightning's distributed checkpoints do."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{flag}={str(path)!r} does not exist; pass a .ckpt file or checkpoint directory")
    if path.is_dir() and not (path / "meta.pt").is_file():
        raise UserInputError(
            f"{flag}={str(path)!r} is a directory without meta.pt, so not a Lightning distributed checkpoint; pass a "
            ".ckpt file or a directory that ModelCheckpoint wrote under ModelParallelStrategy"
        )
    return path


def _torch_load(file: Path, flag: str, mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` of a checkpoint file the user named; a file that cannot be unpickled is a user error."""
    try:
        # weights_only=False: the hyperparameters hold the loss and objective objects from the YAML.
        loaded = torch.load(file, map_location="cpu", mmap=mmap, weights_only=False)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, ImportError, AttributeError) as err:
        raise UserInputError(
            f"{flag}={str(file)!r} is not a readable checkpoint ({type(err).__name__}: {_first_sentence(err)}); a "
            f"file cut short ({file.stat().st_size} bytes) or another kind of file. Pass an intact checkpoint written "
            "by ModelCheckpoint"
        ) from err
    if not isinstance(loaded, dict) or not isinstance(loaded.get("state_dict", {}), Mapping):
        raise UserInputError(
            f"{flag}={str(file)!r} holds a {type(loaded).__name__}, not a Lightning checkpoint (a dict with "
            "'state_dict'); pass a checkpoint written by ModelCheckpoint"
        )
    return loaded


def _first_sentence(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(". ")[0][:200]


def _no_policy(path: Path, flag: str) -> UserInputError:
    return UserInputError(
        f"{flag}={str(path)!r} holds no policy.* weights; it was not written by a baldro_lightning module"
    )


def read_checkpoint(path: str | os.PathLike, flag: str = "--checkpoint") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The policy's weights (keys without ``policy.``) and the module's hyperparameters from a checkpoint.

    Args:
        path: A ``.ckpt`` file, or the directory a ``ModelParallelStrategy`` (FSDP2) run saves per checkpoint.
        flag: The flag that named ``path``, for the messages.

    Raises:
        UserInputError: ``path`` does not exist, cannot be read as a checkpoint, or holds no policy weights.
    """
    path = _checkpoint_path(path, flag)
    if path.is_dir():
        checkpoint = _torch_load(path / "meta.pt", flag)
        flat = _distributed_policy_state(path)
    else:
        checkpoint = _torch_load(path, flag, mmap=True)
        flat = checkpoint.get("state_dict", {})
    policy = {k[len(POLICY_PREFIX) :]: v for k, v in flat.items() if k.startswith(POLICY_PREFIX)}
    if not policy:
        raise _no_policy(path, flag)
    return policy, dict(checkpoint.get("hyper_parameters") or {})


def checkpoint_policy_shapes(path: str | os.PathLike, flag: str) -> Shapes:
    """The shapes of a checkpoint's policy tensors, without reading them (memory-mapped, or from the metadata of a
    distributed checkpoint): what the pre-flight check of ``--ckpt_path`` compares with the model.

    Raises:
        UserInputError: as :func:`read_checkpoint`.
    """
    path = _checkpoint_path(path, flag)
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        _torch_load(path / "meta.pt", flag)
        prefix = "state_dict." + POLICY_PREFIX
        try:
            metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
            raise UserInputError(f"{flag}={str(path)!r} has unreadable metadata ({type(err).__name__}: {err})") from err
        shapes = {
            key[len(prefix) :]: tuple(meta.size)
            for key, meta in metadata.items()
            if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
        }
    else:
        state = _torch_load(path, flag, mmap=True).get("state_dict", {})
        shapes = {k[len(POLICY_PREFIX) :]: tuple(v.shape) for k, v in state.items() if k.startswith(POLICY_PREFIX)}
    if not shapes:
        raise _no_policy(path, flag)
    return shapes


def plain_parameter_name(name: str) -> str:
    """A policy parameter's name in the plain base model, without peft's ``base_model.model.`` and ``.base_layer``:
    ``base_model.model.model.layers.0.mlp.up_proj.base_layer.weight`` -> ``model.layers.0.mlp.up_proj.weight``."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def check_checkpoint_fits(
    shapes: Mapping[str, tuple[int, ...]], expected: Shapes | None, checkpoint: str, model: str, flags: tuple[str, str]
) -> None:
    """The policy tensors of a checkpoint have the shapes of the base model they are loaded into.

    Args:
        shapes: The checkpoint's policy tensor shapes (:func:`checkpoint_policy_shapes`).
        expected: The base model's parameter shapes (:func:`~baldro_lightning.train.models.config_shapes`); None
            skips the check.
        checkpoint: The checkpoint path, for the message.
        model: The base model path, for the message.
        flags: The flags that named them, e.g. ``("--ckpt_path", "--model.model")``.

    Raises:
        UserInputError: a tensor of both has another shape in the checkpoint.
    """
    if expected is None:
        return
    found = {plain_parameter_name(k): v for k, v in shapes.items()}
    mismatch = shape_mismatch(found, expected, ("the checkpoint", f"the model {flags[1]} describes"))
    if mismatch is not None:
        raise UserInputError(
            f"{flags[0]} {checkpoint!r} does not fit {flags[1]} {model!r}: {mismatch}; the checkpoint was trained "
            f"from another base model. Pass the base model it was trained from as {flags[1]}"
        )


def _from_config_file(config: str | None) -> tuple[str | None, Any, str | None, InputFormat | None]:
    """(model path, lora section, tokenizer path, input format) of a run's saved LightningCLI ``config.yaml``."""
    if config is None:
        return None, None, None, None
    if not Path(config).is_file():
        raise UserInputError(f"--config {config!r} does not exist; pass the run's saved <run>/tensorboard/config.yaml")
    try:
        with open(config, encoding="utf-8") as handle:
            parsed = yaml.safe_load(handle) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserInputError(
            f"--config {config!r} is not a readable YAML file ({err}); pass the run's config.yaml"
        ) from err
    if not isinstance(parsed, dict):
        raise UserInputError(f"--config {config!r} holds a {type(parsed).__name__}, not a LightningCLI config")
    model = (parsed.get("model") or {}).get("init_args") or {}
    data = (parsed.get("data") or {}).get("init_args") or {}
    return model.get("model"), model.get("lora"), data.get("tokenizer"), _config_input_format(config, data)


def _config_input_format(config: str, data: Mapping[str, Any]) -> InputFormat:
    """The data section's ``template`` (the plain default when null) and ``attention_from``."""
    template = data.get("template") or {}
    try:
        return InputFormat(PromptTemplate(**template), data.get("attention_from") or "lengths")
    except TypeError as err:
        raise UserInputError(f"--config {config!r}: data.init_args.template is not a prompt template ({err})") from err


def _as_lora(value: Any) -> LoRA | None:
    if value is None or isinstance(value, LoRA):
        return value
    if isinstance(value, Mapping):
        try:
            return LoRA(**{k: tuple(v) if k == "target_modules" else v for k, v in value.items()})
        except (TypeError, ValueError) as err:
            raise UserInputError(f"model.init_args.lora of the run's config is not a valid LoRA: {err}") from err
    raise UserInputError(f"model.init_args.lora must be a mapping of LoRA options or null, got {value!r}")


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
    else the model path; the prompt template and attention mask (``prompt_template.json``) from the config's data
    section, none without a config. The base model's weights are not read: the checkpoint holds all of the policy's.

    Raises:
        UserInputError: ``out`` cannot be written, the checkpoint cannot be read, no model path can be found, or
            the weights do not fit the model.
    """
    check_writable(out, "--out", "directory")
    state, hparams = read_checkpoint(checkpoint)
    config_model, config_lora, config_tokenizer, inputs = _from_config_file(config)
    model_path = model or config_model or hparams.get("model")
    if model_path is None:
        raise UserInputError(
            f"--checkpoint={str(checkpoint)!r} stores no model path (modules that do not save hyperparameters); "
            "pass --config <run>/config.yaml or --model <base model directory or Hub id>"
        )
    lora = _as_lora(config_lora if config is not None else hparams.get("lora"))
    check_model_files(model_path, "--model.model")
    base_config = read_model_config(model_path, "--model.model")
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(base_config)
    expected = {name: tuple(tensor.shape) for name, tensor in base.state_dict().items()}
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    check_checkpoint_fits(shapes, expected, str(checkpoint), model_path, ("--checkpoint", "--model.model"))
    try:
        base.generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:
        pass  # the base model has no generation_config.json: keep the defaults derived from its config
    policy = merged_model(base, state, None if lora is None else lora.peft_config())
    if inputs is None:
        log.warning(
            "no --config given: the export records no prompt template, and `evaluate` will need the template flags "
            "(--chat, --question_prefix, ...) of the run; pass --config <run>/config.yaml to record them"
        )
    tokenizer_path = tokenizer or config_tokenizer or model_path
    written = save_pretrained_atomic(policy, load_tokenizer(tokenizer_path), out, inputs)
    print(f"exported {checkpoint} (base {model_path}, LoRA {lora}) to {written}")
    return written


def main(argv: list[str] | None = None) -> Path:
    parser = CommandParser(
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
