"""Per-example parameter-gradient norms: what the GradNorm membership-inference attack scores (methods §3.6).

open-unlearning's ``mia_gradnorm`` back-propagates each example on its own (batch 1) through the loss
``-(1/n) Σ_t log p(y_t | x_<t)`` over the answer positions excluding the last labelled token (MinK's positions)
and records the p-norm of every parameter tensor's gradient; :func:`~baldro_lightning.evaluation.metrics.mia_gradnorm`
averages them into the score. It costs one forward and one backward per example, so the evaluators run it only
when its metric group (``mia_gradnorm``) is asked for.

Two departures from the reference, neither changing a value of a dropout-free model (every model of this project):
the gradients come from ``torch.autograd.grad``, which writes no ``.grad``, so gradients accumulated by training are
left alone (the reference zeroes them, methods P-19); and the model stays in eval mode (the reference switches to train
mode, which only matters with dropout).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from baldro_lightning.data.tokenization import AttentionFrom, collate
from baldro_lightning.train.logprobs import sequence_logprobs

GRADNORM_P = 2.0
"""The norm of each gradient tensor (open-unlearning's ``mia_gradnorm`` config: p = 2)."""


def answer_positions_but_last(mask: Tensor) -> Tensor:
    """(B, T-1) bool: the labelled shifted positions without each row's last one (the EOS the reference drops).

    Args:
        mask: (B, T-1) labelled shifted positions (``SequenceLogProbs.mask``).
    """
    count = mask.sum(-1, keepdim=True)
    return mask & (mask.cumsum(-1) < count)


def gradient_norms(
    model: nn.Module,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int,
    attention_from: AttentionFrom = "lengths",
    p: float = GRADNORM_P,
) -> list[np.ndarray]:
    """The p-norm of each trainable parameter tensor's gradient of each example's mean answer NLL.

    Args:
        model: A causal LM returning ``.logits``; not sharded (every parameter's whole gradient is needed).
        examples: ``(input_ids, labels)`` of each example, labels ``-100`` outside the answer.
        pad_token_id: Id of padded positions (batches hold one example, so only the mask option matters).
        attention_from: The attention mask: ``lengths`` or the reference's ``pad_ids`` (methods P-14).
        p: The norm.

    Returns:
        One (P,) fp32 array per example, P = the parameters with ``requires_grad`` that the loss reaches; empty for
        an example without an answer position.

    Raises:
        ValueError: the model has no parameter that requires a gradient.
    """
    params = [param for param in model.parameters() if param.requires_grad]
    if not params:
        raise ValueError(
            "mia_gradnorm needs the model's parameters to require gradients (they are all frozen); load the model "
            "for evaluation without requires_grad_(False), or drop mia_gradnorm from --metric_groups"
        )
    device = params[0].device
    out = []
    with torch.enable_grad():
        for input_ids, labels in examples:
            batch = collate([{"input_ids": input_ids, "labels": labels}], pad_token_id, attention_from=attention_from)
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ).logits
            stats = sequence_logprobs(logits, batch["labels"].to(device))
            keep = answer_positions_but_last(stats.mask)
            if not bool(keep.any()):
                out.append(np.empty(0, dtype=np.float32))
                continue
            loss = -stats.token_logps[keep].mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            norms = [torch.linalg.vector_norm(g.float(), ord=p) for g in grads if g is not None]
            out.append(torch.stack(norms).detach().cpu().numpy())
    return out
