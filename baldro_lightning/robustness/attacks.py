"""The attacks on a finished model, chosen in config by ``class_path`` (a list under the attack callback or command).

- :class:`Relearn`: a short fine-tune (``max_steps`` at ``lr``) on the forget rows the attack may see
  (``data: forget``) or on retain rows only (``data: retain``, benign relearning); scored on the held-out forget rows.
- :class:`Quantize`: per-channel weight quantization to ``bits`` bits (:mod:`.quantization`); scored on every
  forget row.

Each attack changes a copy of the model in place (:meth:`Attack.apply`) and returns what it did, for its record.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from baldro_lightning.robustness.quantization import Backend, code_range, quantize_linear_weights
from baldro_lightning.robustness.relearning import AttackDataModule, relearn

Scope = Literal["held_out", "all"]
"""Which forget rows an attack is scored on: those no relearning attack trained on, or every one."""


@dataclass(frozen=True)
class AttackMaterial:
    """What an attack may train on, built once per model and benchmark (:mod:`.suite`)."""

    model_name: str
    """The attacked model's path or name (for records)."""
    pad_token_id: int
    """Id of padded positions."""
    forget_rows: Dataset
    """Encoded forget rows the relearning attack may train on (never a held-out row)."""
    retain_rows: Dataset
    """Encoded retain rows (benign relearning)."""


class Attack(ABC):
    """An attack: changes a model copy in place and says what it did."""

    scored_on: ClassVar[Scope] = "all"

    @property
    @abstractmethod
    def name(self) -> str:
        """The attack's entry in the attack directory and its column in the report."""

    @abstractmethod
    def apply(self, model: nn.Module, material: AttackMaterial) -> dict[str, Any]:
        """Attack ``model`` (a copy) in place; returns what was done, for the record."""

    def smoke_sized(self) -> Attack:
        """The attack at the size of a ``fast_dev_run`` (the same attack where it has no size)."""
        return self


@dataclass(frozen=True)
class Relearn(Attack):
    """Fine-tune the unlearned model for a small budget and see whether forgotten answers come back."""

    data: Literal["forget", "retain"] = "forget"
    """``forget``: the share of forget rows the split gives the attack (``forget_fraction``); ``retain``: retain rows
    only (benign relearning). Both are scored on the same held-out forget rows."""
    max_steps: int = 10
    """Optimizer steps (the budget); epochs repeat over the rows as needed."""
    lr: float = 1.0e-5
    """Constant AdamW learning rate, no weight decay."""
    batch_size: int = 4
    """Rows per step."""
    retain_rows: int | None = None
    """``data: retain``: how many retain rows (a seeded draw); as many as the forget rows the split gives when null."""
    seed: int = 0
    """Seeds the batch order, the retain draw and Lightning's RNGs."""
    label: str | None = None
    """The attack's name; ``relearn_<data>`` when null. Give one to run two budgets side by side."""

    scored_on: ClassVar[Scope] = "held_out"

    def __post_init__(self) -> None:
        problems = []
        if self.data not in ("forget", "retain"):
            problems.append(f"data={self.data!r}: choose forget or retain")
        for flag in ("max_steps", "batch_size"):
            if getattr(self, flag) < 1:
                problems.append(f"{flag} must be >= 1, got {getattr(self, flag)}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.retain_rows is not None and self.retain_rows < 1:
            problems.append(f"retain_rows must be >= 1 or null, got {self.retain_rows}")
        if problems:
            raise ValueError("Relearn attack: " + "; ".join(problems))

    @property
    def name(self) -> str:
        return self.label or f"relearn_{self.data}"

    def smoke_sized(self) -> Relearn:
        return dataclasses.replace(self, max_steps=1)

    def training_rows(self, material: AttackMaterial) -> Dataset:
        """The rows this attack trains on: the forget rows the split allows, or a seeded draw of retain rows."""
        if self.data == "forget":
            return material.forget_rows
        count = min(self.retain_rows or len(material.forget_rows), len(material.retain_rows))
        generator = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(len(material.retain_rows), generator=generator)[:count].sort().values.tolist()
        return Subset(material.retain_rows, chosen)

    def apply(self, model: nn.Module, material: AttackMaterial) -> dict[str, Any]:
        rows = self.training_rows(material)
        data = AttackDataModule(rows, self.batch_size, self.seed, material.pad_token_id)
        relearn(model, material.model_name, data, self.max_steps, self.lr, self.seed)
        indices = sorted(int(rows[k]["index"]) for k in range(len(rows)))
        return {"trained_split": self.data, "trained_rows": len(indices), "trained_indices": indices}


@dataclass(frozen=True)
class Quantize(Attack):
    """Quantize the linear weights per output channel and see whether rounding brings answers back."""

    bits: int = 8
    """Bits per weight code: 8 or 4 (2..8 accepted)."""
    backend: Backend = "torchao"
    """``torchao``: integer codes and per-channel scales; ``rounding``: the same grid simulated in floats."""
    label: str | None = None
    """The attack's name; ``quantize_int<bits>`` (``_rounding`` appended for that backend) when null."""

    def __post_init__(self) -> None:
        code_range(self.bits)
        if self.backend not in ("torchao", "rounding"):
            raise ValueError(f"Quantize attack: backend={self.backend!r}: choose torchao or rounding")

    @property
    def name(self) -> str:
        return self.label or f"quantize_int{self.bits}" + ("_rounding" if self.backend == "rounding" else "")

    def apply(self, model: nn.Module, material: AttackMaterial) -> dict[str, Any]:
        return {"quantization": quantize_linear_weights(model, self.bits, self.backend)}


def default_attacks() -> list[Attack]:
    """The four attacks of issue 20: relearning on forget rows and on retain rows, 8- and 4-bit quantization."""
    return [Relearn(data="forget"), Relearn(data="retain"), Quantize(bits=8), Quantize(bits=4)]
