"""DRO objectives: reduce a per-sample loss vector to a scalar and report the weight each sample received.

Every objective returns ``(value, weights)`` where ``weights`` (detached, summing to 1) is the gradient of
``value`` with respect to each per-sample loss. That identity is what makes distributed training exact: each rank
computes the objective on the *gathered* loss vector in which only its own entries carry autograd, so its local
gradient is ``sum_i w_i grad l_i`` over its rows, with ``w`` taken over the global batch (see
:mod:`baldro_lightning.train.distributed`).

What the DRO "batch" is: the distribution the inner sup ranges over is the set of forget samples of one optimizer
micro-step across all ranks (the global micro-batch). Under gradient accumulation each micro-batch is reweighted on
its own and the accumulated gradient is the mean of the micro-batch objectives, as in the released code (methods P-4);
only :class:`Mean` is invariant to how a batch is split into micro-batches.

Granularity: an objective reduces per-sample losses unless its ``granularity`` is ``"token"``; then the module feeds
it every labelled token's loss of the global micro-batch, flattened, and a row's weight is the sum of its tokens'
(the released DrSatImp's DV over tokens, methods P-3). Rows the sampler repeated only to fill the last global batch
(ranks that do not divide the forget set) never reach an objective: the module reduces the real rows and gives the
repeats weight 0.

Selecting objectives (:class:`Group`) put weight on a subset of the rows only. They say which through the
:meth:`Objective.select` hook every objective has (the others keep every row), so the training module can score
the batch first and back-propagate through the kept rows alone, without knowing which objective it runs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

Granularity = Literal["sample", "token"]
"""What one entry of the vector an objective reduces is: a sample's loss or a labelled token's loss."""


class Objective(ABC):
    """Reduction of per-sample losses ``(B,)`` to ``(scalar, detached weights (B,))``, optionally over a subset.

    An objective that keeps only some rows (``selects_rows``) says which through :meth:`select`; the training module
    then scores the rows first, runs the gradient pass on the kept ones only and calls the objective as any other.
    """

    selects_rows: ClassVar[bool] = False
    """Whether :meth:`select` can drop rows; if so the module scores the batch before the gradient pass."""
    granularity: Granularity = "sample"
    """What one entry of the loss vector is: a sample (the default) or, for :class:`DV`, optionally a token."""

    def kept_count(self, batch_size: int) -> int:
        """How many rows of a batch of ``batch_size`` :meth:`select` keeps; all of them unless it selects."""
        return batch_size

    def select(self, scores: Tensor, row_ids: Tensor | None = None) -> Tensor:
        """Positions of the rows the objective puts weight on, ascending; every row unless it selects.

        Args:
            scores: (B,) hardness of each row (higher = harder), without autograd.
            row_ids: (B,) dataset row index of each row, for tie-breaks that do not depend on the batch layout;
                ``None`` = position.
        """
        return torch.arange(scores.numel(), device=scores.device)

    @abstractmethod
    def __call__(
        self, losses: Tensor, scores: Tensor | None = None, row_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Reduce ``losses`` (B,) to a scalar; also return the detached per-sample weights (B,).

        ``scores`` and ``row_ids`` (B,) are what :meth:`select` ranks by (``scores=None``: the losses); objectives
        that keep every row ignore them. A row outside the selection gets weight 0, and its entry of ``losses``
        may carry no autograd.
        """


def _as_fp32(losses: Tensor) -> Tensor:
    if losses.dim() != 1:
        raise ValueError(f"objectives take a per-sample loss vector of shape (B,), got shape {tuple(losses.shape)}")
    if losses.numel() == 0:
        raise ValueError("objective got an empty loss vector; the forget batch has no rows")
    return losses.float()


@dataclass(frozen=True)
class Mean(Objective):
    """Plain average: the base method with no reweighting."""

    def __call__(
        self, losses: Tensor, scores: Tensor | None = None, row_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        losses = _as_fp32(losses)
        weights = torch.full_like(losses, 1.0 / losses.numel())
        return losses.mean(), weights.detach()


@dataclass(frozen=True)
class DV(Objective):
    """BalDRO-DV: the Donsker-Varadhan dual of the KL-ball DRO (paper Eq. 12).

    ``sign="paper"`` (default): ``tau * logsumexp(l / tau) - tau * log B``; weights ``softmax(l / tau)``, so a
    larger loss gets a larger weight (the worst case). Tends to the mean as ``tau -> inf`` and to ``max l``
    as ``tau -> 0``.

    ``sign="released"``: the authors' released code, ``-tau * logsumexp(-l / tau) + tau * log B``; weights
    ``softmax(-l / tau)`` (a soft minimum that favours already-forgotten samples; methods §2.12.2, P-1). Tends to
    ``min l`` as ``tau -> 0``.

    The paper calls the temperature beta; it is ``tau`` here because NPO already owns ``beta``.

    ``granularity="token"`` applies the same transform to every labelled token's loss of the micro-batch instead of
    each sample's (the released DrSatImp, methods §2.12.2, P-3); only token-level forget losses (SatImp, WGA,
    GradAscent) offer per-token values. Example, ``sign="released"``, ``tau=1``, rows with token losses
    ``[0, ln 2]`` and ``[ln 4]``: ``exp(-l) = 1, 1/2, 1/4`` sum to 7/4, the value is ``-ln(7/12) = 0.5390``, the
    token weights are ``4/7, 2/7, 1/7`` and the row weights ``6/7, 1/7``.
    """

    tau: float = 1.0
    """Temperature (paper's beta). Grid in the paper: 1, 2, 5, 10."""
    sign: Literal["paper", "released"] = "paper"
    """Which side of the KL ball: the paper's worst case or the released code's best case."""
    granularity: Granularity = "sample"
    """``sample``: one entry per forget row; ``token``: one per labelled token (released DrSatImp)."""

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"DV tau must be > 0 (try 1.0 to 10.0), got tau={self.tau}")
        if self.sign not in ("paper", "released"):
            raise ValueError(f"DV sign must be 'paper' or 'released', got sign={self.sign!r}")
        if self.granularity not in get_args(Granularity):
            raise ValueError(f"DV granularity must be 'sample' or 'token', got granularity={self.granularity!r}")

    def __call__(
        self, losses: Tensor, scores: Tensor | None = None, row_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        losses = _as_fp32(losses)
        direction = 1.0 if self.sign == "paper" else -1.0
        # fp64 on B scalars: at large tau, tau * (logsumexp - log B) cancels catastrophically in fp32.
        scaled = direction * losses.double() / self.tau
        value = direction * self.tau * (torch.logsumexp(scaled, dim=0) - math.log(losses.numel()))
        return value.to(losses.dtype), torch.softmax(scaled, dim=0).to(losses.dtype).detach()


@dataclass(frozen=True)
class Group(Objective):
    """BalDRO-G: the mean loss of the hardest fraction of the batch (paper Eq. 8, top-50%).

    The rows are ranked by a selection score (higher = harder; by default the loss itself); ties go to the smaller
    row id, so the choice is deterministic and does not depend on how the batch is split across ranks. Kept rows
    share the weight equally, dropped rows get 0. How the rows are scored (the forget loss or the released code's
    mean-NLL proxy), how many forward passes that takes, and whether the retain batch is cut too, are options of
    the training module (``selection_score``, ``selection_passes``, ``subsample_retain``).
    """

    selects_rows: ClassVar[bool] = True
    ratio: float = 0.5
    """Fraction of the forget batch kept: ``k = max(1, floor(ratio * B))``."""

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"Group ratio must be in (0, 1], got ratio={self.ratio}")

    def kept_count(self, batch_size: int) -> int:
        return max(1, math.floor(self.ratio * batch_size))

    def select(self, scores: Tensor, row_ids: Tensor | None = None) -> Tensor:
        """Positions of the ``k`` largest ``scores``, in ascending position order; ties go to the smaller row id."""
        with torch.no_grad():
            scores = scores.detach().float()
            ties = torch.arange(scores.numel(), device=scores.device) if row_ids is None else row_ids.to(scores.device)
            by_id = torch.sort(ties, stable=True).indices
            by_score = torch.sort(scores[by_id], descending=True, stable=True).indices
            return by_id[by_score][: self.kept_count(scores.numel())].sort().values

    def __call__(
        self, losses: Tensor, scores: Tensor | None = None, row_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        losses = _as_fp32(losses)
        kept = self.select(losses if scores is None else scores, row_ids)
        weights = torch.zeros_like(losses)
        weights[kept] = 1.0 / kept.numel()
        # Only the kept entries enter the value: the module fills the dropped ones from its scoring pass.
        return losses[kept].sum() / kept.numel(), weights.detach()


# Objectives are saved in checkpoint hyper-parameters; torch.load(weights_only=True) must accept them on resume.
torch.serialization.add_safe_globals([Mean, DV, Group])
