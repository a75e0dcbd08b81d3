"""FSDP2 sharding of a Hugging Face causal LM: one ``fully_shard`` unit per decoder layer, then the root.

Lightning's ``ModelParallelStrategy`` hands the module a device mesh and leaves the parallelisation to
``configure_model``; :func:`shard_model` is what that hook calls for the policy and for the frozen reference. The
reference is sharded on its own (it is a separate model), so no FSDP unit mixes frozen and trainable parameters
and the reference costs ``1 / world_size`` of its weights per rank instead of a full copy.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import PreTrainedModel


class NoDecoderLayersError(ValueError):
    """The model has no ``nn.ModuleList`` of decoder layers to shard one by one."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the largest ``nn.ModuleList`` whose entries share one class.

    Llama, Mistral, Qwen and Gemma keep it at ``model.model.layers``, GPT-2 at ``transformer.h``; searching for it
    instead of naming the attribute covers them all.

    Raises:
        NoDecoderLayersError: if the model holds no such list.
    """
    best: nn.ModuleList | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(layer) for layer in module}) != 1:
            continue
        if best is None or len(module) > len(best):
            best = module
    if best is None:
        raise NoDecoderLayersError(
            f"{type(model).__name__} has no nn.ModuleList of identical decoder layers, so it cannot be sharded layer "
            "by layer; shard_model supports decoder-only transformers (Llama, Mistral, Qwen, GPT-2 and the like)."
        )
    return best


def data_parallel_mesh(device_mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D data-parallel part of ``ModelParallelStrategy``'s 2-D mesh, once it is known to be the whole world.

    Only data parallelism is implemented: the DRO objective gathers losses over every rank and scales by the world
    size, which assumes each rank holds different rows and every gradient is averaged over all of them.
    ``ModelParallelStrategy()`` with its defaults puts all devices of a node on the tensor-parallel axis instead;
    then nothing would average the gradients and the ranks would drift apart silently.

    Raises:
        ValueError: if the tensor-parallel axis is larger than 1.
    """
    tensor_parallel = (
        device_mesh["tensor_parallel"].size() if "tensor_parallel" in (device_mesh.mesh_dim_names or ()) else 1
    )
    if tensor_parallel != 1:
        data_parallel = device_mesh["data_parallel"].size()
        raise ValueError(
            f"--trainer.strategy=ModelParallelStrategy has tensor_parallel_size={tensor_parallel} (data_parallel_size="
            f"{data_parallel}); only FSDP2 data parallelism is supported. Set "
            f"ModelParallelStrategy(data_parallel_size={tensor_parallel * data_parallel}, tensor_parallel_size=1)."
        )
    return device_mesh["data_parallel"]


def mixed_precision_policy(precision: str | None) -> MixedPrecisionPolicy | None:
    """The FSDP2 policy for a Lightning ``precision`` string.

    ``bf16-mixed``: all-gathered parameters and the forward in bf16, gradients reduced in fp32 (the sharded master
    weights and the optimizer stay fp32). Anything else: ``None``, i.e. compute in the parameters' own dtype;
    ``bf16-true`` weights are already bf16 when loaded.

    Raises:
        ValueError: for ``16-mixed``: fp16 needs loss scaling, which FSDP2 under Lightning does not provide.
    """
    if precision is None:
        return None
    precision = str(precision)
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "16-mixed":
        raise ValueError(
            "--trainer.precision=16-mixed is not supported with FSDP2 sharding (fp16 needs a gradient scaler); use "
            "bf16-mixed or 32-true."
        )
    return None


def shard_model(
    model: PreTrainedModel,
    mesh: DeviceMesh,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> PreTrainedModel:
    """Shard ``model`` in place with FSDP2 over the data-parallel ``mesh`` (1-D) and return it.

    Each decoder layer becomes its own unit (all-gathered just before its forward, freed after), then the root
    takes what is left: embeddings, final norm and the (possibly tied) output head. Works the same for a frozen
    model whose parameters all have ``requires_grad=False``: FSDP2 then never reduces gradients for it.

    Args:
        model: A loaded Hugging Face causal LM, not yet sharded.
        mesh: The data-parallel device mesh (``LightningModule.device_mesh["data_parallel"]``).
        reshard_after_forward: Free the gathered parameters after each forward (ZeRO-3); ``False`` keeps them until
            backward (ZeRO-2 style: faster, more memory).
        mp_policy: From :func:`mixed_precision_policy`; ``None`` keeps the parameters' dtype.

    Raises:
        NoDecoderLayersError: if no decoder-layer list is found.
    """
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model
