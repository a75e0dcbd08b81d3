"""Row operations on collated batches (dicts of ``input_ids``, ``attention_mask``, ``labels``, ``index``)."""

from __future__ import annotations

import torch
from torch import Tensor

from baldro_lightning.data.tokenization import IGNORE_INDEX

Batch = dict[str, Tensor]
_PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0}


def batch_size(batch: Batch) -> int:
    return int(batch["input_ids"].shape[0])


def select_rows(batch: Batch, rows: Tensor) -> Batch:
    """The sub-batch of ``rows`` (a 1-D index tensor), every field indexed alike."""
    return {key: value.index_select(0, rows.to(value.device)) for key, value in batch.items()}


def pad_rows_to(batch: Batch, length: int, pad_token_id: int) -> Batch:
    """Right-pad every (B, T) field of ``batch`` to ``length`` columns."""
    out: Batch = {}
    for key, value in batch.items():
        if value.dim() == 2 and value.shape[1] < length:
            fill = pad_token_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
            value = torch.cat([value, value.new_full((value.shape[0], length - value.shape[1]), fill)], dim=1)
        out[key] = value
    return out


def concat_rows(batches: list[Batch], pad_token_id: int) -> Batch:
    """Stack right-padded batches of different lengths into one, padding on the right.

    Lets the policy see its forget and retain rows in one forward pass. Only the fields every batch holds are
    joined (a forget batch's ``padded`` flags have no retain counterpart).
    """
    longest = max(int(b["input_ids"].shape[1]) for b in batches)
    padded = [pad_rows_to(b, longest, pad_token_id) for b in batches]
    shared = [key for key in batches[0] if all(key in b for b in batches)]
    return {key: torch.cat([b[key] for b in padded], dim=0) for key in shared}
