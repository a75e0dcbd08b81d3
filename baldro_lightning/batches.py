"""Row operations on collated batches (dicts of ``input_ids``, ``attention_mask``, ``labels``, ``index``)."""

from __future__ import annotations

import torch
from torch import Tensor

from baldro_lightning.logprobs import IGNORE_INDEX

Batch = dict[str, Tensor]
_PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0}


def batch_size(batch: Batch) -> int:
    return int(batch["input_ids"].shape[0])


def select_rows(batch: Batch, rows: Tensor) -> Batch:
    """The sub-batch of ``rows`` (a 1-D index tensor), every field indexed alike."""
    return {key: value.index_select(0, rows.to(value.device)) for key, value in batch.items()}


def concat_rows(batches: list[Batch], pad_token_id: int) -> Batch:
    """Stack right-padded batches of different lengths into one, padding on the right.

    Lets the policy see its forget and retain rows in one forward pass.
    """
    longest = max(int(b["input_ids"].shape[1]) for b in batches)
    out: Batch = {}
    for key in batches[0]:
        parts = []
        for b in batches:
            value = b[key]
            if value.dim() == 2 and value.shape[1] < longest:
                fill = pad_token_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
                pad = value.new_full((value.shape[0], longest - value.shape[1]), fill)
                value = torch.cat([value, pad], dim=1)
            parts.append(value)
        out[key] = torch.cat(parts, dim=0)
    return out
