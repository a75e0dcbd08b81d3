"""Per-channel weight quantization of a causal LM's linear layers: the quantization attack (issue 20).

The library is **torchao** (PyTorch's own quantization library; 0.18). Its ``IntxWeightOnlyConfig`` with
``granularity=PerAxis(0)`` quantizes each output channel (row) of a ``Linear`` weight to ``bits``-bit integers with
one scale per channel, for 1 to 8 bits, on CPU and GPU alike, and keeps the integer codes
(``IntxUnpackedToInt8Tensor``: int8 storage, values in the ``bits``-bit range) plus the fp scales. Its linear
**dequantizes the codes and runs a float matmul**: the model's outputs are those of a model whose weights were
rounded to the per-channel grid, which is exactly what the attack asks (does rounding bring answers back?), but no
integer kernel runs; every record says so (:func:`quantize_linear_weights`'s metadata). optimum-quanto 0.2.7 was
the other candidate: its ``qint4`` weights are quantized in groups of 128 inputs, not per channel, and its last
release is of 2025-03.

The ``rounding`` backend is the same symmetric per-channel rounding in plain torch (:func:`round_per_channel`), with
the weights written back as floats: a check on torchao's codes, and the attack where torchao is absent. Its
records say it is simulated.

The output embedding (``lm_head``) and the input embeddings keep full precision, as the bitsandbytes integration of
transformers leaves the output head unquantized.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

Backend = Literal["torchao", "rounding"]
"""``torchao``: integer codes with per-channel scales (torchao); ``rounding``: the same grid, simulated in floats."""


def code_range(bits: int) -> tuple[int, int]:
    """The signed ``bits``-bit integer range: ``(-2^(bits-1), 2^(bits-1) - 1)``, e.g. ``(-8, 7)`` for 4 bits."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_per_channel(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric round-to-nearest quantization of each row (output channel), as torchao's ``SYMMETRIC`` mapping.

    ``scale = max|w_row| / ((q_max - q_min) / 2)`` and ``code = clamp(round(w * (1 / scale)), q_min, q_max)``; for
    4 bits the grid is ``{-8, ..., 7} * scale`` with ``scale = max|w_row| / 7.5``. Example: the row ``[7.5, -2, 0.4,
    3]`` at 4 bits has scale 1 and codes ``[7, -2, 0, 3]`` (7.5 rounds to 8, which clamps to 7).

    Args:
        weight: (out, in) weight.
        bits: Bits per code.

    Returns:
        ``(codes, scale)``: (out, in) int8 codes and (out, 1) fp32 scales; ``codes * scale`` is the quantized weight.
    """
    low, high = code_range(bits)
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True)
    # torchao clamps the scale to the smallest normal float, so an all-zero row gets codes 0.
    scale = torch.clamp(amax / ((high - low) / 2), min=torch.finfo(torch.float32).smallest_normal)
    codes = torch.clamp(torch.round(w * (1.0 / scale)), low, high).to(torch.int8)
    return codes, scale


def quantizable_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """``(name, module)`` of every ``nn.Linear`` except the output embedding (the head stays in full precision)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            yield name, module


def dequantized_weight(weight: Tensor) -> Tensor:
    """A weight as the matmul sees it: torchao's quantized tensors dequantized, plain tensors as they are."""
    return weight.dequantize() if hasattr(weight, "qdata") else weight.detach()


def _torchao_quantize(model: nn.Module, bits: int) -> str:
    # torchao tries to load its CUDA kernel libraries at import and logs a warning for each one that a CPU build
    # cannot load; weight-only intx quantization uses none of them.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torchao
    from torchao.quantization import IntxWeightOnlyConfig, PerAxis, quantize_

    names = {id(module) for _, module in quantizable_linears(model)}
    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerAxis(0))
    quantize_(model, config, filter_fn=lambda module, _: id(module) in names)
    return torchao.__version__


def _round_in_place(model: nn.Module, bits: int) -> None:
    with torch.no_grad():
        for _, module in quantizable_linears(model):
            codes, scale = round_per_channel(module.weight, bits)
            module.weight.copy_((codes.float() * scale).to(module.weight.dtype))


def quantize_linear_weights(model: nn.Module, bits: int, backend: Backend = "torchao") -> dict[str, Any]:
    """Quantize ``model``'s linear weights per output channel, in place (pass a copy to keep the original).

    Args:
        model: A causal LM.
        bits: 8 or 4 (any of 2..8 works).
        backend: ``torchao`` (integer codes + scales) or ``rounding`` (simulated: rounded floats).

    Returns:
        What was done, for the attack's record: library and version, bits, granularity, mapping, which layers,
        how the matmul runs and whether the quantization is simulated.
    """
    code_range(bits)
    layers = [name for name, _ in quantizable_linears(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize")
    meta: dict[str, Any] = {
        "bits": bits,
        "backend": backend,
        "granularity": "per output channel (one scale per row of each Linear weight)",
        "mapping": "symmetric, round to nearest: scale = max|w| / ((q_max - q_min) / 2), zero point 0",
        "layers": len(layers),
        "kept_full_precision": "output head (lm_head) and embeddings",
    }
    if backend == "torchao":
        meta["library"] = f"torchao {_torchao_quantize(model, bits)} (IntxWeightOnlyConfig, PerAxis(0))"
        meta["storage"] = f"int{bits} codes (int8 storage, IntxUnpackedToInt8Tensor) and per-channel scales"
        meta["compute"] = "codes dequantized to the model dtype inside each linear, then a float matmul"
        meta["simulated"] = False
    elif backend == "rounding":
        _round_in_place(model, bits)
        meta["library"] = "none (plain torch rounding, baldro_lightning.robustness.quantization.round_per_channel)"
        meta["storage"] = "float weights rounded to the per-channel grid"
        meta["compute"] = "float matmul"
        meta["simulated"] = True
    else:
        raise ValueError(f"quantization backend {backend!r}: choose torchao or rounding")
    return meta
