"""Loading a Hugging Face causal LM and switching its modes: what training, export and evaluation share.

:func:`check_model_files` reads only a local model directory's ``config.json`` and the headers of its weight files,
so a missing, truncated or mis-sized model fails in a second, before a run loads weights or writes anything.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from baldro_lightning.user_errors import UserInputError

TorchDtype = Literal["float32", "bfloat16", "float16"]


class ModelLoadError(UserInputError, OSError):
    """A model path that ``from_pretrained`` cannot load (an OSError for callers that expect one)."""


def load_causal_lm(path: str, torch_dtype: TorchDtype) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` for a Hub id or a local directory, with an error that helps."""
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, torch_dtype))
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"--model.model={path!r}: could not load a causal LM ({type(err).__name__}: {str(err)[:300]}). "
            "Pass a local directory written by save_pretrained (config.json and the weights; for the embedded "
            "default run `python -m baldro_lightning quickstart` first) or a Hub id in the local Hugging Face cache."
        ) from err


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""What ``save_pretrained`` writes as weights: one file, or an index of shards."""
_HEADER_LIMIT = 100_000_000
"""Largest safetensors header read (bytes); a larger length prefix means the file is not safetensors."""

Shapes = dict[str, tuple[int, ...]]
"""Tensor name -> shape."""


def looks_like_path(value: str) -> bool:
    """Whether a model argument is meant as a local path (``./m``, ``/m``, ``~/m``, ``a/b/c``) rather than a Hub id."""
    return value.startswith((".", "~", os.sep)) or value.count("/") > 1


def safetensors_shapes(file: Path, flag: str) -> Shapes:
    """The tensor shapes a ``.safetensors`` file's header declares, once the file is whole.

    The format is an 8-byte little-endian header length, the JSON header (``{name: {"dtype", "shape",
    "data_offsets": [begin, end]}}``, offsets counted from the end of the header), then the tensor bytes; a whole
    file is exactly ``8 + header length + the largest end offset`` bytes long.

    Raises:
        ModelLoadError: the file is shorter or longer than its header says, or the header is not JSON.
    """
    size = file.stat().st_size
    fix = "re-save the model (save_pretrained) or copy it again"
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, _HEADER_LIMIT):
            raise ModelLoadError(f"{flag}: {file} is not a complete safetensors file ({size} bytes); {fix}")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelLoadError(f"{flag}: {file} has a corrupt safetensors header ({err}); {fix}") from err
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    try:
        end = max((int(entry["data_offsets"][1]) for entry in tensors.values()), default=0)
        shapes = {name: tuple(int(n) for n in entry["shape"]) for name, entry in tensors.items()}
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ModelLoadError(f"{flag}: {file} has a corrupt safetensors header ({err!r}); {fix}") from err
    if 8 + length + end != size:
        state = "truncated" if size < 8 + length + end else "longer than its header says"
        raise ModelLoadError(
            f"{flag}: {file} is {state}: its header describes {8 + length + end} bytes, the file has {size}; {fix}"
        )
    return shapes


def config_shapes(config) -> Shapes | None:
    """The parameter shapes of the causal LM ``config`` describes (built on the meta device: no memory, no
    weights), or None when ``transformers`` cannot build it from the config alone."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, ImportError, OSError):
        return None
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def model_shapes(path: str) -> Shapes | None:
    """The parameter shapes of the model at ``path`` from its config alone (:func:`config_shapes`); None when the
    config cannot be read here (a Hub id not in the cache: ``from_pretrained`` reports that)."""
    try:
        return config_shapes(AutoConfig.from_pretrained(path))
    except (OSError, ValueError):
        return None


def shape_mismatch(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], where: tuple[str, str]
) -> str | None:
    """``"<name> is (a, b) in <where[0]> but (c, d) in <where[1]>"`` for the first tensor of both whose shapes
    differ, or None."""
    for name, shape in found.items():
        if name in expected and tuple(shape) != tuple(expected[name]):
            return f"{name} is {tuple(shape)} in {where[0]} but {tuple(expected[name])} in {where[1]}"
    return None


def read_model_config(path: str | os.PathLike[str], flag: str) -> PretrainedConfig:
    """The model config at ``path`` (a directory's ``config.json``, or a cached Hub id).

    Raises:
        ModelLoadError: it cannot be read; the message names ``flag``.
    """
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{flag} {str(path)!r}: its config.json cannot be read ({type(err).__name__}: {str(err)[:200]}); pass a "
            "model directory written by save_pretrained"
        ) from err


def check_model_files(path: str, flag: str) -> None:
    """Check a local model directory before its weights load: a readable ``config.json``, weight files that are
    whole, and tensors of the shapes that config gives. A Hub id (not a local path) is left to ``from_pretrained``.

    Args:
        path: The model argument (``--model.model`` of training; ``--model`` of evaluate and export).
        flag: Its flag, for the messages.

    Raises:
        ModelLoadError: a missing path, a file instead of a directory, no ``config.json`` or no weights, an
            unreadable config, a truncated or corrupt safetensors file, or weights of another size than the config.
    """
    directory = Path(path).expanduser()
    if not directory.exists():
        if looks_like_path(path):
            raise ModelLoadError(
                f"{flag} {path!r} does not exist; pass a directory written by save_pretrained (config.json and the "
                "weights), or a Hub id in the local Hugging Face cache"
            )
        return
    if not directory.is_dir():
        raise ModelLoadError(f"{flag} {path!r} is a file; pass the directory that holds config.json and the weights")
    present = sorted(p.name for p in directory.iterdir())
    listing = ", ".join(present[:8]) + (", ..." if len(present) > 8 else "") if present else "nothing"
    if not (directory / "config.json").is_file():
        raise ModelLoadError(
            f"{flag} {path!r} holds no config.json (it holds: {listing}), so it is not a saved model; pass a "
            "directory written by save_pretrained"
        )
    weights = [name for name in _WEIGHT_FILES if (directory / name).is_file()]
    if not weights:
        raise ModelLoadError(
            f"{flag} {path!r} holds no weights ({' or '.join(_WEIGHT_FILES[::2])}; it holds: {listing}); pass a "
            "directory written by save_pretrained"
        )
    config = read_model_config(directory, flag)
    if getattr(config, "quantization_config", None) is not None:
        return  # quantized weights are stored in other shapes than the model's parameters
    expected = config_shapes(config)
    for file in _safetensors_files(directory, weights[0], flag):
        where = (file.name, "the model its config.json describes")
        mismatch = None if expected is None else shape_mismatch(safetensors_shapes(file, flag), expected, where)
        if mismatch is not None:
            raise ModelLoadError(
                f"{flag}: the weights in {file} do not fit its config.json: {mismatch}; the weights and the config "
                "come from different models. Re-save the model, or pass the directory it was saved to"
            )


def _safetensors_files(directory: Path, weights: str, flag: str) -> list[Path]:
    """The safetensors files of a model directory: the single file, or every shard its index names."""
    if weights == "model.safetensors":
        return [directory / weights]
    if weights != "model.safetensors.index.json":
        return []
    index = directory / weights
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as err:
        raise ModelLoadError(f"{flag}: {index} is not a readable weight index ({err!r}); re-save the model") from err
    missing = [shard for shard in shards if not (directory / shard).is_file()]
    if missing:
        raise ModelLoadError(f"{flag}: {index} names shard(s) that are missing: {', '.join(missing[:4])}; copy them")
    return [directory / shard for shard in shards]


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them.

    Non-reentrant checkpointing back-propagates into LoRA adapters inside a layer whether or not the layer's input
    requires grad. The reentrant variant does only while a hook makes the frozen embedding's output require grad;
    without it the adapters get no gradient (open-unlearning#178). tests/test_lora.py checks the gradients.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed gradient_checkpointing_enable
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule of ``model`` in eval mode inside the block, each restored to its own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
