"""Per-example gradient norms of the GradNorm attack (``evaluation.gradient_norms``), checked by hand on a toy model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from baldro_lightning.evaluation import metrics
from baldro_lightning.evaluation.gradient_norms import answer_positions_but_last, gradient_norms


class BiasOnlyLM(nn.Module):
    """Every position predicts ``softmax(scale * bias)`` over a 2-token vocabulary, whatever the input."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=(self.scale * self.bias).expand(*input_ids.shape, 2))


def test_answer_positions_but_last():
    mask = torch.tensor([[False, True, True, True], [True, False, False, False], [False] * 4])
    expected = [[False, True, True, False], [False] * 4, [False] * 4]
    assert answer_positions_but_last(mask).tolist() == expected


def test_gradient_norms_by_hand():
    """ids (0, 1, 1, 0), labels (-100, 1, 1, 0): the labelled shifted positions target 1, 1, 0; dropping the last
    (the reference's EOS) leaves targets (1, 1). At bias 0, scale 1: p = (1/2, 1/2), loss = -mean log p = ln 2,
    d loss / d bias_v = scale (p_v - freq_v) = (1/2 - 0, 1/2 - 1) = (0.5, -0.5), norm sqrt(0.5) = 0.70711;
    d loss / d scale = -mean (bias_y - E_p bias) = 0. The score is the mean of the two norms, 0.35355, not the global
    norm 0.70711. A row with one labelled token has no position left: no norm, score NaN."""
    model = BiasOnlyLM()
    norms = gradient_norms(model, [([0, 1, 1, 0], [-100, 1, 1, 0]), ([0, 1], [-100, 1])], pad_token_id=0)
    torch.testing.assert_close(torch.tensor(norms[0]), torch.tensor([math.sqrt(0.5), 0.0]))
    assert norms[1].size == 0
    scores = metrics.mia_gradnorm(norms)
    assert scores[0] == pytest.approx(math.sqrt(0.5) / 2)
    assert math.isnan(scores[1])
    # autograd.grad writes no .grad: gradients a training step accumulated are left alone (unlike methods P-19's
    # reference).
    assert model.bias.grad is None and model.scale.grad is None


def test_gradient_norms_need_trainable_parameters():
    model = BiasOnlyLM().requires_grad_(False)
    with pytest.raises(ValueError, match="mia_gradnorm needs the model's parameters to require gradients"):
        gradient_norms(model, [([0, 1], [-100, 1])], pad_token_id=0)
