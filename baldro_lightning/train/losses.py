"""Per-sample base losses: statistics of one forward pass in, one value per sample out, never reduced.

A forget loss is *minimised* to forget; a retain loss is minimised to keep utility. Reduction to a scalar is the
job of an :mod:`baldro_lightning.train.objectives` objective, so any base loss composes with any DRO objective.

Token-pooled losses (the HF batch loss, SatImp, WGA) are written per sample as ``x_i · B / N`` with ``N`` the
number of labelled tokens of the batch: the plain mean of that vector equals the pooled token mean the
reference code optimises (methods §0.2), while each entry still belongs to one sample.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from baldro_lightning.train.logprobs import SequenceLogProbs

Normalization = Literal["token_mean", "sample_mean", "seq_sum"]


class PerSampleLoss(ABC):
    """A loss that maps per-sample statistics to a ``(B,)`` vector."""

    requires_reference: ClassVar[bool] = False
    """Whether ``reference`` must be given (its per-sample ``logp_sum`` at least)."""
    requires_vocab: ClassVar[bool] = False
    """Whether the full next-token distributions (``vocab_logps``) of policy and reference are needed."""
    token_level: ClassVar[bool] = False
    """Whether :meth:`token_losses` gives each labelled token's loss (for an objective over tokens)."""

    @abstractmethod
    def __call__(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> Tensor:
        """Return one loss value per sample, shape (B,), fp32."""

    def token_losses(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> Tensor:
        """(B, T-1) loss of every labelled token (0 at the other positions), for losses with ``token_level``.

        Their mean over the batch's labelled tokens is the mean of :meth:`__call__`'s vector (the pooled token mean).
        """
        raise NotImplementedError(f"{type(self).__name__} is a per-sequence loss; it has no per-token losses")


def _normalized_nll(stats: SequenceLogProbs, normalization: Normalization) -> Tensor:
    if normalization == "seq_sum":
        return stats.nll_sum
    if normalization == "sample_mean":
        return stats.nll_mean
    if normalization == "token_mean":
        return stats.nll_sum * stats.pooled_scale()
    raise ValueError(f"normalization={normalization!r} is not one of 'token_mean', 'sample_mean', 'seq_sum'")


def _require_reference(name: str, reference: SequenceLogProbs | None) -> SequenceLogProbs:
    if reference is None:
        raise ValueError(f"{name} needs the reference model's log-probabilities; got reference=None")
    return reference


@dataclass(frozen=True)
class NLL(PerSampleLoss):
    """Negative log-likelihood: the retain loss of GradDiff, NPO, SimNPO and SatImp, and the fine-tuning loss."""

    normalization: Normalization = "token_mean"
    """``token_mean``: mean over the batch = the pooled token mean of the reference code (default);
    ``sample_mean``: each sample's mean NLL; ``seq_sum``: sequence sums (the released DrNPO/DrSatImp retain,
    methods P-2)."""

    def __call__(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> Tensor:
        return _normalized_nll(policy, self.normalization)


def _token_logps(policy: SequenceLogProbs, name: str) -> Tensor:
    if policy.token_logps is None or policy.mask is None:
        raise ValueError(f"{name} needs token-level log-probs; got per-sample sums only")
    return policy.token_logps


@dataclass(frozen=True)
class GradAscent(PerSampleLoss):
    """Gradient ascent on the forget set: ``-NLL`` (methods §2.2); per token, ``log p`` of the target."""

    token_level: ClassVar[bool] = True
    normalization: Normalization = "token_mean"
    """As :class:`NLL`; ``token_mean`` reproduces the reference's ``-L_HF``."""

    def __call__(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> Tensor:
        return -_normalized_nll(policy, self.normalization)

    def token_losses(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> Tensor:
        return _token_logps(policy, "GradAscent").masked_fill(~policy.mask, 0.0)


@dataclass(frozen=True)
class NPO(PerSampleLoss):
    """Negative preference optimisation (methods §2.4, paper Eq. 3).

    ``l_i = -(2/beta) * logsigmoid(-beta * r_i)`` with the sequence-sum log-ratio
    ``r_i = log pi(y_i|x_i) - log pi_ref(y_i|x_i)``. At ``r_i = 0``: ``(2/beta) log 2`` (13.863 for beta 0.1).
    """

    requires_reference: ClassVar[bool] = True
    beta: float = 0.1
    """Inverse temperature of the log-sigmoid."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"NPO beta must be > 0, got beta={self.beta}")

    def __call__(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> Tensor:
        ref = _require_reference("NPO", reference)
        log_ratio = policy.logp_sum - ref.logp_sum.to(policy.logp_sum)
        return -(2.0 / self.beta) * F.logsigmoid(-self.beta * log_ratio)


@dataclass(frozen=True)
class SimNPO(PerSampleLoss):
    """Reference-free, length-normalised NPO (methods §2.5).

    ``l_i = -(2/beta) * logsigmoid(beta * (m_i - delta))`` with ``m_i`` the sample's mean NLL.
    """

    beta: float = 4.5
    """Inverse temperature."""
    delta: float = 0.0
    """Margin on the mean NLL (the SimNPO repository's ``gamma``)."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"SimNPO beta must be > 0, got beta={self.beta}")

    def __call__(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> Tensor:
        return -(2.0 / self.beta) * F.logsigmoid(self.beta * (policy.nll_mean - self.delta))


def _weighted_token_ascent(policy: SequenceLogProbs, token_weights: Tensor) -> Tensor:
    """``-w_t c_t`` per labelled token (B, T-1), with ``c_t`` the token NLL and ``w_t`` detached; 0 elsewhere."""
    # c_t = -logp_t and the loss is -w c, so each token contributes +w logp.
    return (token_weights.detach() * policy.token_logps).masked_fill(~policy.mask, 0.0)


def _pooled(token_losses: Tensor, policy: SequenceLogProbs) -> Tensor:
    """``(B/N) * sum_t l_t`` per sample: its batch mean is the pooled mean over the batch's N labelled tokens."""
    return token_losses.sum(-1) * policy.pooled_scale()


@dataclass(frozen=True)
class SatImp(PerSampleLoss):
    """Saturation-importance reweighted ascent (methods §2.7): token weights ``p^beta1 (1-p)^beta2``, detached.

    Per token ``l_t = -w_t c_t``; per sample the pooled form ``(B/N) sum_t l_t``.
    """

    token_level: ClassVar[bool] = True
    beta1: float = 5.0
    """Exponent of the importance factor ``p``."""
    beta2: float = 1.0
    """Exponent of the saturation factor ``1 - p``."""

    def token_losses(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> Tensor:
        p = _token_logps(policy, "SatImp").exp()
        return _weighted_token_ascent(policy, p.pow(self.beta1) * (1.0 - p).pow(self.beta2))

    def __call__(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> Tensor:
        return _pooled(self.token_losses(policy), policy)


@dataclass(frozen=True)
class WGA(PerSampleLoss):
    """Weighted gradient ascent (methods §2.6): token weights ``p^beta``, detached."""

    token_level: ClassVar[bool] = True
    beta: float = 1.0
    """Exponent of the token probability."""

    def token_losses(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> Tensor:
        return _weighted_token_ascent(policy, _token_logps(policy, "WGA").exp().pow(self.beta))

    def __call__(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> Tensor:
        return _pooled(self.token_losses(policy), policy)


@dataclass(frozen=True)
class KL(PerSampleLoss):
    """KL(reference || policy) of the next-token distributions, a retain loss (methods §2.1).

    ``positions="answer"`` averages over each sample's labelled positions; ``positions="all"`` averages over every
    predicting position of the padded row, prompt and padding included, close to the reference code's
    unmasked average (methods P-12; the reference also counts each row's final position, which predicts nothing).
    Needs the live reference: a cached reference holds no distributions.
    """

    requires_reference: ClassVar[bool] = True
    requires_vocab: ClassVar[bool] = True
    positions: Literal["answer", "all"] = "answer"
    """Which positions the KL is averaged over."""

    def __call__(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None = None) -> Tensor:
        ref = _require_reference("KL", reference)
        if policy.vocab_logps is None or ref.vocab_logps is None or policy.mask is None:
            raise ValueError("KL needs full next-token distributions of both models (a live reference)")
        ref_logps = ref.vocab_logps.to(policy.vocab_logps)
        per_position = (ref_logps.exp() * (ref_logps - policy.vocab_logps)).sum(-1)
        if self.positions == "answer":
            return per_position.masked_fill(~policy.mask, 0.0).sum(-1) / policy.count.clamp_min(1)
        # methods P-12: reference averages over B*T rows including prompt and padding positions.
        return per_position.mean(-1)


# Losses are saved in checkpoint hyper-parameters; torch.load(weights_only=True) must accept them on resume.
torch.serialization.add_safe_globals([NLL, GradAscent, NPO, SimNPO, SatImp, WGA, KL])
