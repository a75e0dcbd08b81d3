"""Sharding a Hugging Face causal LM per decoder layer: FSDP2 (``fully_shard``) and FSDP1 auto-wrap policies.

Lightning's ``ModelParallelStrategy`` hands the module a device mesh and leaves the parallelisation to
``configure_model``; :func:`shard_model` is what that hook calls for the policy and for the frozen reference. The
reference is sharded on its own (it is a separate model), so no FSDP unit mixes frozen and trainable parameters
and the reference costs ``1 / world_size`` of its weights per rank instead of a full copy.

Lightning's ``FSDPStrategy`` (FSDP1, GPUs only) wraps the module itself after ``configure_model``; it takes
:class:`DecoderLayerWrapPolicy` as its ``auto_wrap_policy`` and :class:`DecoderLayerPolicy` as its
``activation_checkpointing_policy`` (``experiments/tofu/fsdp1.yaml``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import PreTrainedModel

from baldro_lightning.user_errors import UserInputError


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
        raise UserInputError(
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
        raise UserInputError(
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


# -- FSDP1: Lightning's FSDPStrategy ------------------------------------------------------------------------------
# FSDPStrategy wraps the whole LightningModule in FullyShardedDataParallel after configure_model, splitting it into
# units with an auto-wrap policy given in YAML (--trainer.strategy.init_args.auto_wrap_policy). Lightning 2.6 sets
# use_orig_params=True itself, which FSDP1 needs for units that mix frozen and trainable parameters (LoRA).


def _layer_names_in(model: nn.Module) -> set[str]:
    """Class names listed in ``_no_split_modules`` by the Hugging Face models inside ``model``."""
    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            names.update(module._no_split_modules or ())
    return names


def _outermost_models(root: nn.Module) -> list[PreTrainedModel]:
    """The Hugging Face models held by ``root`` (the policy, the reference), not the ones nested inside them."""
    if isinstance(root, PreTrainedModel):
        return []  # root is the model itself: it becomes the root unit anyway
    found = []
    for child in root.children():
        found += [child] if isinstance(child, PreTrainedModel) else _outermost_models(child)
    return found


class DecoderLayerPolicy(ModuleWrapPolicy):
    """Selects every decoder layer, e.g. for ``FSDPStrategy(activation_checkpointing_policy=...)``.

    A decoder layer is a module whose class name is in ``layer_classes`` or, by default, in the
    ``_no_split_modules`` of a Hugging Face model containing it (``LlamaDecoderLayer`` for Llama, ``GPT2Block`` for
    GPT-2). The classes are looked up on the model when the policy is applied, so one YAML serves every architecture.

    Args:
        layer_classes: Class names to select instead of the models' ``_no_split_modules``.
    """

    def __init__(self, layer_classes: list[str] | None = None) -> None:
        # The class set of ModuleWrapPolicy stays empty: the classes are only known once the model is loaded.
        super().__init__(())
        if layer_classes is not None and not layer_classes:
            raise ValueError(f"{type(self).__name__}(layer_classes=[]) selects nothing; pass null or class names")
        self.layer_classes = layer_classes
        self._seen_names: set[str] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer_classes={self.layer_classes})"

    def layers(self, root: nn.Module) -> list[nn.Module]:
        """The decoder layers inside ``root``.

        Raises:
            ValueError: if none is found, naming the layer lists the model does have.
        """
        names = set(self.layer_classes) if self.layer_classes else _layer_names_in(root)
        found = [module for module in root.modules() if type(module).__name__ in names]
        if not found:
            try:
                candidate = type(decoder_layers(root)[0]).__name__
            except NoDecoderLayersError:
                candidate = "the class of its repeated blocks"
            raise UserInputError(
                f"{self!r} selects no module of {type(root).__name__} (looked for {sorted(names) or 'nothing'}: "
                f"{'layer_classes' if self.layer_classes else '_no_split_modules of its Hugging Face models'}). "
                f"Set layer_classes under --trainer.strategy.init_args.auto_wrap_policy (and activation_checkpointing_"
                f"policy) to the decoder layer class, here {candidate!r}."
            )
        return found

    def targets(self, root: nn.Module) -> list[nn.Module]:
        """The modules this policy makes units of (FSDP) or checkpoints (activation checkpointing)."""
        return self.layers(root)

    def _run_policy(
        self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict
    ) -> dict[nn.Module, dict]:
        # How FSDP1 applies a policy object: it sees the whole root at once. Same contract as ModuleWrapPolicy's.
        return {m: dict(root_kwargs) for m in self.targets(root_module) if m not in ignored_modules}

    def __call__(self, module: nn.Module, recurse: bool, *args, **kwargs) -> bool:
        # How apply_activation_checkpointing applies a callable policy: module by module, depth first from the root
        # (recurse=True on the way down, recurse=False to decide). A model is met before its layers, so the names
        # in its _no_split_modules are known by the time its layers are decided.
        if recurse:
            if self.layer_classes is None and isinstance(module, PreTrainedModel):
                self._seen_names.update(module._no_split_modules or ())
            return True
        return type(module).__name__ in (set(self.layer_classes) if self.layer_classes else self._seen_names)


class DecoderLayerWrapPolicy(DecoderLayerPolicy):
    """FSDP1 auto-wrap policy: one unit per decoder layer and one per model (the policy and the frozen reference).

    The per-model units keep the reference's embeddings, final norm and output head out of the root unit, where
    they would share a flat parameter with the policy's trainable ones (gradient memory for frozen weights). They
    also make checkpoints work: :class:`~baldro_lightning.train.module.UnlearningModule` drops the ``reference.*`` keys
    from its state dict, and FSDP's root unit requires every parameter it holds to be in it.

    Use as ``--trainer.strategy.init_args.auto_wrap_policy``; for activation checkpointing use
    :class:`DecoderLayerPolicy`, which selects the layers only.
    """

    def targets(self, root: nn.Module) -> list[nn.Module]:
        return self.layers(root) + _outermost_models(root)

    def __call__(self, module: nn.Module, recurse: bool, *args, **kwargs) -> bool:
        # FSDP1 applies a policy object through _run_policy; the module-by-module form cannot tell the outermost
        # models apart, and would checkpoint whole models if this were given as the checkpointing policy.
        raise TypeError(
            f"{type(self).__name__} is an auto_wrap_policy; for --trainer.strategy.init_args."
            "activation_checkpointing_policy use baldro_lightning.train.sharding.DecoderLayerPolicy"
        )


def fsdp1_callback_problems(callbacks: list) -> list[str]:
    """Why the given callbacks cannot run under FSDP1 (``FSDPStrategy``); empty when they all can.

    A callback declares that it cannot by a true class attribute ``needs_fsdp2``: the evaluation callbacks generate
    and score with the policy outside the wrapped forward, in lockstep across ranks only when the module has an FSDP2
    device mesh; :class:`~baldro_lightning.train.export.ExportPretrained` expects an unwrapped policy. Both would
    fail at their first use, possibly after hours of training. (An attribute rather than a type check keeps this
    module below the callbacks in the import order.)
    """
    unsupported = [type(c).__name__ for c in callbacks if getattr(c, "needs_fsdp2", False)]
    if not unsupported:
        return []
    return [
        f"the callbacks {unsupported} need an FSDP2-sharded policy: remove them from --trainer.callbacks and export "
        "the last checkpoint with `python -m baldro_lightning export --checkpoint <ckpt>`, or use --trainer.strategy="
        "lightning.pytorch.strategies.ModelParallelStrategy (FSDP2), which supports both"
    ]
