"""Per-token and per-sample log-probabilities of the labelled tokens: the one place that knows the causal shift.

Every loss and every likelihood metric is a reduction of what this module returns, so the shift, the
``-100`` ignore index and the fp32 up-cast are written once (methods §0.2, §2.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from baldro_lightning.data.tokenization import IGNORE_INDEX


@dataclass(frozen=True)
class SequenceLogProbs:
    """Log-probabilities of the labelled tokens of a batch, in fp32.

    Token-level fields are ``None`` where only per-sample sums are known (a cached reference).
    """

    logp_sum: Tensor
    """(B,) sum over labelled positions of log p(y_t | x_<t): log pi(y | x)."""
    count: Tensor
    """(B,) number of labelled positions (the label count of methods §0.2)."""
    token_logps: Tensor | None = None
    """(B, T-1) log-prob of each next token, 0 where masked."""
    mask: Tensor | None = None
    """(B, T-1) bool, True where position t predicts a labelled token."""
    vocab_logps: Tensor | None = None
    """(B, T-1, V) full log-softmax rows; only kept when a loss needs the whole distribution (KL)."""
    global_batch_size: int | None = None
    """Rows of the batch across all ranks; ``None`` = this batch alone (single process)."""
    global_token_count: Tensor | None = None
    """Labelled positions of the batch across all ranks; ``None`` = ``count.sum()``."""

    def pooled_scale(self) -> Tensor:
        """``B / N``: turns sequence sums into entries whose batch mean is the pooled token mean.

        Across ranks both counts are global, so a 2-rank run pools over the same tokens as one process.
        """
        rows = self.count.numel() if self.global_batch_size is None else self.global_batch_size
        tokens = self.count.sum() if self.global_token_count is None else self.global_token_count
        return rows / tokens.clamp_min(1).float()

    @property
    def nll_sum(self) -> Tensor:
        """(B,) sequence-sum negative log-likelihood ``s_i``."""
        return -self.logp_sum

    @property
    def nll_mean(self) -> Tensor:
        """(B,) per-sample mean NLL ``m_i = s_i / n_i``; a row with no labelled token gives 0, not NaN
        (methods P-16)."""
        return -self.logp_sum / self.count.clamp_min(1)

    def rows(self, start: int, count: int, positions: int) -> SequenceLogProbs:
        """Rows ``start .. start+count-1`` with their first ``positions`` token positions (a part of joined batches).

        The dropped positions must be masked (right padding), so the per-sample sums and counts are unchanged.
        """
        token_logps = self.token_logps[start : start + count, :positions]
        mask = self.mask[start : start + count, :positions]
        return SequenceLogProbs(logp_sum=token_logps.sum(-1), count=mask.sum(-1), token_logps=token_logps, mask=mask)

    def select(self, rows: Tensor) -> SequenceLogProbs:
        """The same statistics restricted to ``rows`` (a 1-D index tensor)."""

        def pick(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.index_select(0, rows)

        return SequenceLogProbs(
            logp_sum=self.logp_sum.index_select(0, rows),
            count=self.count.index_select(0, rows),
            token_logps=pick(self.token_logps),
            mask=pick(self.mask),
            vocab_logps=pick(self.vocab_logps),
            global_batch_size=self.global_batch_size,
            global_token_count=self.global_token_count,
        )


def shifted_labels(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Targets for positions ``0..T-2`` and their mask: position t predicts token t+1."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return targets.masked_fill(~mask, 0), mask


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability of every labelled next token, computed in fp32.

    ``log_softmax`` is avoided on purpose: ``logit[y] - logsumexp(logits)`` gathers one value per position and
    never materialises a (B, T, V) fp32 tensor, which for a 128k vocabulary is the largest buffer of a step.

    Args:
        logits: (B, T, V) model outputs, any dtype.
        labels: (B, T) token ids with ``-100`` where no loss is taken.

    Returns:
        ``(logps, mask)``, both (B, T-1); ``logps`` is 0 where ``mask`` is False.
    """
    targets, mask = shifted_labels(labels)
    # Score every position and drop the last one from the (B, T) result: slicing the (B, T, V) logits instead would
    # make the backward pass allocate, zero-fill and copy a second tensor of that size.
    every_position = torch.nn.functional.pad(targets, (0, 1))
    picked = logits.gather(-1, every_position.unsqueeze(-1)).squeeze(-1).float()
    logps = (picked - torch.logsumexp(logits.float(), dim=-1))[:, :-1]
    return logps.masked_fill(~mask, 0.0), mask


def sequence_logprobs(logits: Tensor, labels: Tensor, keep_vocab: bool = False) -> SequenceLogProbs:
    """Per-sample statistics of one forward pass.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) with ``-100`` on prompt and padding.
        keep_vocab: also keep the (B, T-1, V) fp32 log-softmax, for losses that compare whole distributions.

    Returns:
        A :class:`SequenceLogProbs` whose ``count`` counts the shifted labels; it equals the reference code's
        unshifted count whenever the first label is masked, which holds for every prompt-masked example.
    """
    if keep_vocab:
        vocab = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
        targets, mask = shifted_labels(labels)
        logps = vocab.gather(-1, targets.unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    else:
        vocab = None
        logps, mask = token_logprobs(logits, labels)
    return SequenceLogProbs(
        logp_sum=logps.sum(-1),
        count=mask.sum(-1),
        token_logps=logps,
        mask=mask,
        vocab_logps=vocab,
    )
