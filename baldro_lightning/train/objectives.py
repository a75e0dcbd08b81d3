"""DRO objectives: reduce a per-sample loss vector to a scalar and report the weight each sample received.

Every objective returns ``(value, weights)`` where ``weights`` (detached, summing to 1) is the gradient of
``value`` with respect to each per-sample loss. That identity is what makes distributed training exact: each rank
computes the objective on the *gathered* loss vector in which only its own entries carry autograd, so its local
gradient is ``sum_i w_i grad l_i`` over its rows, with ``w`` taken over the global batch (see
:mod:`baldro_lightning.train.distributed`).

What the DRO "batch" is: the distribution the inner sup ranges over is the set of forget samples of one optimizer
micro-step across all ranks (the global micro-batch). Under gradient accumulation each micro-batch is reweighted on
its own and the accumulated gradient is the mean of the micro-batch objectives, as in the released code (P-4); only
:class:`Mean` is invariant to how a batch is split into micro-batches.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


class Objective(ABC):
    """Reduction of per-sample losses ``(B,)`` to ``(scalar, detached weights (B,))``."""

    @abstractmethod
    def __call__(self, losses: Tensor, scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Reduce ``losses`` (B,) to a scalar; also return the detached per-sample weights (B,).

        ``scores`` (B,) is an optional hardness for objectives that select rows (higher = harder); the others
        ignore it.
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

    def __call__(self, losses: Tensor, scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
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
    ``softmax(-l / tau)`` (a soft minimum that favours already-forgotten samples; spec §2.12.2, P-1). Tends to
    ``min l`` as ``tau -> 0``.

    The paper calls the temperature beta; it is ``tau`` here because NPO already owns ``beta``.
    """

    tau: float = 1.0
    """Temperature (paper's beta). Grid in the paper: 1, 2, 5, 10."""
    sign: Literal["paper", "released"] = "paper"
    """Which side of the KL ball: the paper's worst case or the released code's best case."""

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"DV tau must be > 0 (try 1.0 to 10.0), got tau={self.tau}")
        if self.sign not in ("paper", "released"):
            raise ValueError(f"DV sign must be 'paper' or 'released', got sign={self.sign!r}")

    def __call__(self, losses: Tensor, scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
        losses = _as_fp32(losses)
        direction = 1.0 if self.sign == "paper" else -1.0
        # fp64 on B scalars: at large tau, tau * (logsumexp - log B) cancels catastrophically in fp32.
        scaled = direction * losses.double() / self.tau
        value = direction * self.tau * (torch.logsumexp(scaled, dim=0) - math.log(losses.numel()))
        return value.to(losses.dtype), torch.softmax(scaled, dim=0).to(losses.dtype).detach()


@dataclass(frozen=True)
class Group(Objective):
    """BalDRO-G: the mean loss of the hardest fraction of the batch (paper Eq. 8, top-50%).

    The rows are ranked by a selection score without building an autograd graph; ties are broken by row order
    (stable sort) so the choice is deterministic. Kept rows share the weight equally, dropped rows get 0.
    """

    ratio: float = 0.5
    """Fraction of the forget batch kept: ``k = max(1, floor(ratio * B))``."""
    score: Literal["loss", "mean_nll"] = "loss"
    """``loss``: rank by the per-sample forget loss (the paper); ``mean_nll``: by lowest current mean NLL, the
    released code's hardness proxy (P-6)."""
    passes: Literal["two", "one", "released"] = "two"
    """``two``: a no-grad scoring pass over the forget batch, then the gradient pass on the kept rows only;
    ``one``: a single gradient pass over every row with dropped rows weighted 0 (back-propagates through all);
    ``released``: as ``two`` but the scoring pass builds an autograd graph, as the released code does (P-6)."""
    subsample_retain: bool = False
    """Also cut the retain batch to a random ``k`` rows, as the released code does (halves the retain signal)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"Group ratio must be in (0, 1], got ratio={self.ratio}")
        if self.score not in ("loss", "mean_nll"):
            raise ValueError(f"Group score must be 'loss' or 'mean_nll', got score={self.score!r}")
        if self.passes not in ("two", "one", "released"):
            raise ValueError(f"Group passes must be 'two', 'one' or 'released', got passes={self.passes!r}")

    def kept_count(self, batch_size: int) -> int:
        return max(1, math.floor(self.ratio * batch_size))

    def keep(self, scores: Tensor, row_ids: Tensor | None = None) -> Tensor:
        """Positions of the ``k`` largest ``scores`` (higher = harder), in ascending position order.

        Ties go to the smaller ``row_ids`` (dataset row index; default: position), so the same rows are kept
        however the batch is laid out across ranks.
        """
        with torch.no_grad():
            scores = scores.detach().float()
            ties = torch.arange(scores.numel(), device=scores.device) if row_ids is None else row_ids.to(scores.device)
            by_id = torch.sort(ties, stable=True).indices
            by_score = torch.sort(scores[by_id], descending=True, stable=True).indices
            return by_id[by_score][: self.kept_count(scores.numel())].sort().values

    def __call__(self, losses: Tensor, scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
        losses = _as_fp32(losses)
        kept = self.keep(losses if scores is None else scores)
        mask = torch.zeros_like(losses, dtype=torch.bool)
        mask[kept] = True
        weights = mask.float() / kept.numel()
        return (losses * weights).sum(), weights.detach()


# Objectives are saved in checkpoint hyper-parameters; torch.load(weights_only=True) must accept them on resume.
torch.serialization.add_safe_globals([Mean, DV, Group])
