"""Hand-computed checks of the DRO objectives in ``baldro_lightning.train.objectives`` (methods §2.12, paper Eqs. 8-12).

Each objective returns ``(value, weights)``; the tests check the value by hand, that the weights are the
gradient of the value with respect to each per-sample loss, and the limits the paper states (Sec. 4.3.2).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from baldro_lightning.train.objectives import DV, Group, Mean

E = math.e


def per_sample_grads(theta: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """(B, P) matrix whose row i is d loss_i / d theta."""
    return torch.stack([torch.autograd.grad(x, theta, retain_graph=True)[0] for x in losses])


def quadratic_losses(theta: torch.Tensor) -> torch.Tensor:
    """Four per-sample losses l_i = (a_i · theta)^2 + b_i · theta with distinct gradients."""
    a = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 1.0, 1.0], [-1.0, 2.0, 0.5]])
    b = torch.tensor([[0.1, 0.2, 0.3], [-0.3, 0.0, 0.1], [0.0, 0.5, -0.5], [1.0, 1.0, 1.0]])
    return (a @ theta) ** 2 + b @ theta


# --------------------------------------------------------------------------------------------------------------
# Mean


def test_mean_value_and_uniform_weights():
    """(1 + 2 + 3 + 6) / 4 = 3; weights 1/4 each."""
    value, weights = Mean()(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert_close(value, torch.tensor(3.0))
    assert_close(weights, torch.full((4,), 0.25))
    assert not weights.requires_grad


# --------------------------------------------------------------------------------------------------------------
# DV: values, weights and the sign convention


def test_dv_paper_value_and_weights_by_hand():
    """tau = 1, l = (1, 2, 3): log((e + e² + e³)/3) = log((2.718282 + 7.389056 + 20.085537)/3) = log(10.064292)
    = 2.308994; weights softmax(l) = (e, e², e³)/30.192875 = (0.090031, 0.244728, 0.665241)."""
    value, weights = DV(tau=1.0)(torch.tensor([1.0, 2.0, 3.0]))
    expected = math.log((E + E**2 + E**3) / 3)
    assert_close(value, torch.tensor(expected))
    assert_close(value, torch.tensor(2.308994))
    total = E + E**2 + E**3
    assert_close(weights, torch.tensor([E / total, E**2 / total, E**3 / total]))
    assert_close(weights, torch.tensor([0.090031, 0.244728, 0.665241]))
    assert DV().sign == "paper"


def test_dv_released_value_and_weights_by_hand():
    """tau = 1, l = (1, 2, 3): -log((e^-1 + e^-2 + e^-3)/3) = -log((0.367879 + 0.135335 + 0.049787)/3)
    = -log(0.184334) = 1.691006; weights softmax(-l) = (0.665241, 0.244728, 0.090031)."""
    value, weights = DV(tau=1.0, sign="released")(torch.tensor([1.0, 2.0, 3.0]))
    assert_close(value, torch.tensor(-math.log((E**-1 + E**-2 + E**-3) / 3)))
    assert_close(value, torch.tensor(1.691006))
    assert_close(weights, torch.tensor([0.665241, 0.244728, 0.090031]))


def test_dv_sign_pinned_on_one_case():
    """The released code computes -tau log(mean(exp(-l/tau))). For l = (0, ln 3), tau = 1:
    released = -ln((1 + 1/3)/2) = -ln(2/3) = ln 1.5 = 0.405465 < mean 0.549306 < paper ln((1 + 3)/2) = ln 2."""
    losses = torch.tensor([0.0, math.log(3)])
    released, released_weights = DV(tau=1.0, sign="released")(losses)
    paper, paper_weights = DV(tau=1.0, sign="paper")(losses)
    assert_close(released, torch.tensor(math.log(1.5)))
    assert_close(paper, torch.tensor(math.log(2.0)))
    # Released up-weights the low loss (already forgotten): 3/4 on l = 0; the paper puts 3/4 on l = ln 3.
    assert_close(released_weights, torch.tensor([0.75, 0.25]))
    assert_close(paper_weights, torch.tensor([0.25, 0.75]))


def test_dv_temperature_scales_by_hand():
    """tau = 2, l = (0, 2 ln 3): 2 ln((1 + 3)/2) = 2 ln 2 = 1.386294; weights (1, 3)/4."""
    value, weights = DV(tau=2.0)(torch.tensor([0.0, 2 * math.log(3)]))
    assert_close(value, torch.tensor(2 * math.log(2)))
    assert_close(weights, torch.tensor([0.25, 0.75]))


def test_dv_of_equal_losses_is_their_value():
    """l = (5, 5, 5): tau (log(3 e^{5/tau}) - log 3) = 5 for either sign; uniform weights."""
    for sign in ("paper", "released"):
        value, weights = DV(tau=0.7, sign=sign)(torch.full((3,), 5.0))
        assert_close(value, torch.tensor(5.0))
        assert_close(weights, torch.full((3,), 1 / 3))


@pytest.mark.parametrize("sign", ["paper", "released"])
def test_dv_tends_to_mean_for_large_tau(sign):
    """tau = 100, l = (1, 2, 3): exact ±100 ln(mean e^{±l/100}) = 2 ± var/(2 tau) + ... = 2.003332 / 1.996665."""
    direction = 1.0 if sign == "paper" else -1.0
    exact = direction * 100 * math.log(sum(math.exp(direction * x / 100) for x in (1, 2, 3)) / 3)
    value, weights = DV(tau=100.0, sign=sign)(torch.tensor([1.0, 2.0, 3.0]))
    assert_close(value, torch.tensor(exact), rtol=1e-5, atol=1e-5)
    assert abs(value.item() - 2.0) < 5e-3
    assert_close(weights, torch.full((3,), 1 / 3), rtol=0, atol=5e-3)


@pytest.mark.parametrize("tau", [1e6, 1e8])
def test_dv_tends_to_mean_for_huge_tau(tau):
    """l = (1, 2, 3): the exact value is 2 + (2/3)/(2 tau) + O(tau^-2) = 2.0000003 at tau = 1e6."""
    for sign in ("paper", "released"):
        value, _ = DV(tau=tau, sign=sign)(torch.tensor([1.0, 2.0, 3.0]))
        assert_close(value, torch.tensor(2.0), rtol=0, atol=1e-4)


def test_dv_tends_to_max_paper_and_min_released_for_small_tau():
    """tau = 1e-3, l = (1, 2, 3): paper -> max 3 (exactly 3 - 1e-3 ln 3 = 2.998901), weights one-hot on row 2;
    released -> min 1 (1 + 1e-3 ln 3 = 1.001099), one-hot on row 0."""
    losses = torch.tensor([1.0, 2.0, 3.0])
    paper, paper_weights = DV(tau=1e-3)(losses)
    released, released_weights = DV(tau=1e-3, sign="released")(losses)
    assert_close(paper, torch.tensor(3 - 1e-3 * math.log(3)))
    assert_close(released, torch.tensor(1 + 1e-3 * math.log(3)))
    assert_close(paper_weights, torch.tensor([0.0, 0.0, 1.0]))
    assert_close(released_weights, torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("sign", ["paper", "released"])
@pytest.mark.parametrize("tau", [0.5, 1.0, 5.0])
def test_dv_gradient_is_softmax_weighted_per_sample_gradient(sign, tau):
    """d DV / d theta = Σ_i w_i d l_i / d theta with w = softmax(±l / tau), the returned weights."""
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    losses = quadratic_losses(theta)
    value, weights = DV(tau=tau, sign=sign)(losses)
    (grad,) = torch.autograd.grad(value, theta, retain_graph=True)
    direction = 1.0 if sign == "paper" else -1.0
    expected_weights = torch.softmax(direction * losses.detach() / tau, dim=0)
    assert_close(weights, expected_weights)
    assert_close(grad, expected_weights @ per_sample_grads(theta, losses))
    assert not weights.requires_grad


@pytest.mark.parametrize("sign", ["paper", "released"])
@pytest.mark.parametrize("tau", [0.01, 1.0, 10.0])
def test_dv_finite_for_large_losses_and_small_tau(sign, tau):
    """l up to 1e4 with tau = 0.01 means exponents of ±1e6: logsumexp keeps value, weights and gradient finite.
    Paper sign at tau = 0.01 is max l - 0.01 ln 3 = 9999.989; released is min l + 0.01 ln 3 = 0.010986."""
    losses = torch.tensor([1e4, 0.0, 5e3, 1e4 - 1], requires_grad=True)
    value, weights = DV(tau=tau, sign=sign)(losses)
    (grad,) = torch.autograd.grad(value, losses)
    assert torch.isfinite(value) and torch.isfinite(weights).all() and torch.isfinite(grad).all()
    assert_close(weights.sum(), torch.tensor(1.0))
    if tau == 0.01:
        expected = 1e4 - 0.01 * math.log(4) if sign == "paper" else 0.01 * math.log(4)
        assert_close(value, torch.tensor(expected), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": 0.0}, "tau=0.0"),
        ({"tau": -1.0}, "tau=-1.0"),
        ({"tau": float("nan")}, "tau=nan"),
        ({"sign": "code"}, "sign='code'"),
    ],
)
def test_dv_rejects_invalid_flags(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DV(**kwargs)


def test_objectives_reject_wrong_shapes():
    with pytest.raises(ValueError, match=r"shape \(B,\).*\(2, 2\)"):
        DV()(torch.ones(2, 2))
    with pytest.raises(ValueError, match="empty"):
        Mean()(torch.ones(0))


# --------------------------------------------------------------------------------------------------------------
# The selection hook: Mean and DV keep every row, Group the hardest floor(ratio · B)


@pytest.mark.parametrize("objective", [Mean(), DV(), DV(sign="released")], ids=["Mean", "DV", "DV-released"])
def test_mean_and_dv_select_every_row(objective):
    """Scores (3, 1, 2) and row ids (7, 5, 6) change nothing: positions 0, 1, 2 are kept, k(B) = B, no scoring pass.
    Given scores and row ids, the value and weights are those of the plain call."""
    scores, row_ids = torch.tensor([3.0, 1.0, 2.0]), torch.tensor([7, 5, 6])
    assert not objective.selects_rows
    assert objective.select(scores, row_ids).tolist() == [0, 1, 2]
    assert objective.select(scores).tolist() == [0, 1, 2]
    assert objective.kept_count(5) == 5
    losses = torch.tensor([1.0, 2.0, 3.0])
    value, weights = objective(losses, scores=scores, row_ids=row_ids)
    plain_value, plain_weights = objective(losses)
    assert torch.equal(value, plain_value) and torch.equal(weights, plain_weights)


def test_group_selects_top_k_ties_by_row_id():
    """scores (2, 5, 2, 2, 1, 0), ratio 0.5 -> k = 3: row 1 (5) first; the three 2s tie at positions 0, 2, 3 with
    row ids 12, 11, 10, so the smallest ids, positions 3 (id 10) and 2 (id 11), are kept: positions (1, 2, 3).
    Without row ids the tie goes to the first positions: (0, 1, 2)."""
    group = Group(ratio=0.5)
    scores = torch.tensor([2.0, 5.0, 2.0, 2.0, 1.0, 0.0])
    assert group.selects_rows
    assert group.select(scores, torch.tensor([12, 13, 11, 10, 14, 15])).tolist() == [1, 2, 3]
    assert group.select(scores).tolist() == [0, 1, 2]


def test_group_selection_does_not_depend_on_the_layout():
    """The same rows in another order (as two ranks would gather them) keep the same row ids: ids (10, 11, 13)."""
    group = Group(ratio=0.5)
    scores, row_ids = torch.tensor([2.0, 5.0, 2.0, 2.0, 1.0, 0.0]), torch.tensor([12, 13, 11, 10, 14, 15])
    order = torch.tensor([4, 0, 2, 5, 1, 3])
    kept = group.select(scores[order], row_ids[order])
    assert sorted(row_ids[order][kept].tolist()) == [10, 11, 13]


def test_group_keeps_top_k_losses_with_ties_in_row_order():
    """l = (2, 5, 2, 2, 1, 0), ratio 0.5 -> k = floor(3) = 3: row 1 (5), then the first two 2s (rows 0, 2);
    row 3 (also 2) is dropped by row order. Value (5 + 2 + 2)/3 = 3; weights 1/3 on rows 0, 1, 2."""
    group = Group(ratio=0.5)
    losses = torch.tensor([2.0, 5.0, 2.0, 2.0, 1.0, 0.0])
    value, weights = group(losses)
    assert group.select(losses).tolist() == [0, 1, 2]
    assert_close(value, torch.tensor(3.0))
    assert_close(weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0, 0.0, 0.0]))


def test_group_ties_by_row_ids_when_given():
    """l = (2, 5, 2, 2, 1, 0) with row ids (12, 13, 11, 10, 14, 15): rows 1, 2, 3 kept (ids 13, 11, 10).
    Value (5 + 2 + 2)/3 = 3; weights 1/3 on positions 1, 2, 3."""
    losses = torch.tensor([2.0, 5.0, 2.0, 2.0, 1.0, 0.0])
    value, weights = Group(ratio=0.5)(losses, row_ids=torch.tensor([12, 13, 11, 10, 14, 15]))
    assert_close(value, torch.tensor(3.0))
    assert_close(weights, torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3, 0.0, 0.0]))


@pytest.mark.parametrize(("ratio", "batch", "k"), [(0.5, 8, 4), (0.5, 5, 2), (0.3, 4, 1), (0.01, 4, 1), (1.0, 3, 3)])
def test_group_kept_count(ratio, batch, k):
    """k = max(1, floor(ratio B)): 4, floor(2.5) = 2, floor(1.2) = 1, max(1, 0) = 1, 3."""
    assert Group(ratio=ratio).kept_count(batch) == k
    assert Group(ratio=ratio).select(torch.arange(batch, dtype=torch.float32)).numel() == k
    _, weights = Group(ratio=ratio)(torch.arange(batch, dtype=torch.float32))
    assert int((weights > 0).sum()) == k


def test_group_ranks_by_scores_when_given():
    """scores (0, 0, 0, 0, 1, 1), k = 3: rows 4, 5 then row 0 (first of the tied zeros).
    Value = mean of l over rows 0, 4, 5 = (2 + 1 + 0)/3 = 1, although those are not the highest losses."""
    losses = torch.tensor([2.0, 5.0, 2.0, 2.0, 1.0, 0.0])
    scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    value, weights = Group(ratio=0.5)(losses, scores)
    assert_close(value, torch.tensor(1.0))
    assert_close(weights, torch.tensor([1 / 3, 0.0, 0.0, 0.0, 1 / 3, 1 / 3]))


def test_group_ignores_the_dropped_entries():
    """Only the kept rows enter the value: l = (2, nan, 7, inf) with scores (1, 0, 1, 0) -> (2 + 7)/2 = 4.5, as the
    module passes dropped rows it never back-propagated through."""
    losses = torch.tensor([2.0, float("nan"), 7.0, float("inf")])
    value, weights = Group(ratio=0.5)(losses, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert_close(value, torch.tensor(4.5))
    assert_close(weights, torch.tensor([0.5, 0.0, 0.5, 0.0]))


def test_group_gradient_is_mean_gradient_of_kept_rows():
    """d Group / d theta = (1/k) Σ_{i in kept} d l_i / d theta, the kept rows being the top-2 of the four losses."""
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    losses = quadratic_losses(theta)
    value, weights = Group(ratio=0.5)(losses)
    (grad,) = torch.autograd.grad(value, theta, retain_graph=True)
    kept = torch.topk(losses.detach(), 2).indices.sort().values
    assert weights.nonzero().flatten().tolist() == kept.tolist()
    assert_close(value, losses[kept].mean())
    assert_close(grad, per_sample_grads(theta, losses)[kept].mean(0))


def test_group_weights_are_gradient_wrt_losses():
    losses = torch.tensor([0.5, 3.0, 1.0, 2.0], requires_grad=True)
    value, weights = Group(ratio=0.5)(losses)
    (grad,) = torch.autograd.grad(value, losses)
    assert_close(grad, weights)
    assert_close(weights, torch.tensor([0.0, 0.5, 0.0, 0.5]))


def test_group_finite_for_large_losses():
    """l = (1e4, 0, 5e3, -1e4): k = 2 keeps 1e4 and 5e3 -> 7500."""
    value, weights = Group()(torch.tensor([1e4, 0.0, 5e3, -1e4]))
    assert_close(value, torch.tensor(7500.0))
    assert torch.isfinite(weights).all()


@pytest.mark.parametrize("ratio", [0.0, 1.5, -0.5])
def test_group_rejects_invalid_ratio(ratio):
    with pytest.raises(ValueError, match=f"ratio={ratio}"):
        Group(ratio=ratio)


def test_group_takes_only_its_ratio():
    """How rows are scored and how many passes that takes are options of the training module, not of Group."""
    for moved in ("score", "passes", "subsample_retain"):
        with pytest.raises(TypeError, match=moved):
            Group(**{moved: "loss"})
