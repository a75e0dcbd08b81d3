"""Hand-computed checks of ``train.logprobs`` and the per-sample losses of ``train.losses``.

Expected numbers are worked out in each docstring and recomputed with :mod:`math` in float64, never with the
function under test. Notation follows methods §0.2: ``s`` sequence-sum NLL, ``n`` label count, ``m = s / n``,
``r`` the sequence-sum log-ratio to the reference, ``N`` the labelled tokens of the batch, ``B`` its rows.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from baldro_lightning.train.logprobs import IGNORE_INDEX, SequenceLogProbs, sequence_logprobs, token_logprobs
from baldro_lightning.train.losses import KL, NLL, NPO, WGA, GradAscent, PerSampleLoss, SatImp, SimNPO


def softplus(x: float) -> float:
    """Float64 reference ``log(1 + e^x)``, stable for large |x|."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def sums(logp_sum: list[float], count: list[int], requires_grad: bool = False) -> SequenceLogProbs:
    """Per-sample statistics only (what a cached reference provides)."""
    return SequenceLogProbs(
        logp_sum=torch.tensor(logp_sum, requires_grad=requires_grad), count=torch.tensor(count, dtype=torch.long)
    )


def tokens(token_logps: list[list[float]], mask: list[list[bool]], requires_grad: bool = False) -> SequenceLogProbs:
    """Token-level statistics whose sums and counts are consistent with ``token_logps`` and ``mask``."""
    logps = torch.tensor(token_logps, requires_grad=requires_grad)
    keep = torch.tensor(mask)
    return SequenceLogProbs(
        logp_sum=(logps * keep).sum(-1), count=keep.sum(-1), token_logps=logps, mask=keep, vocab_logps=None
    )


# --------------------------------------------------------------------------------------------------------------
# logprobs.py: the causal shift, the ignore index and the counts


def naive_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop version: position t of the logits scores label t+1, via a full log_softmax."""
    batch, length, _ = logits.shape
    logps = torch.zeros(batch, length - 1)
    mask = torch.zeros(batch, length - 1, dtype=torch.bool)
    full = torch.log_softmax(logits.double(), dim=-1)
    for b in range(batch):
        for t in range(length - 1):
            target = int(labels[b, t + 1])
            if target != IGNORE_INDEX:
                logps[b, t] = float(full[b, t, target])
                mask[b, t] = True
    return logps, mask


@pytest.fixture()
def random_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 5, 7) logits; row 0 masks its prompt (labels 0..1), row 1 masks the first label and its padding."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator) * 3
    labels = torch.tensor([[-100, -100, 3, 6, 0], [-100, 2, 5, -100, -100]])
    return logits, labels


def test_token_logprobs_match_naive_log_softmax_gather(random_batch):
    """Row 0 labels at t=2,3,4 are predicted by positions 1,2,3; row 1 labels at t=1,2 by positions 0,1."""
    logits, labels = random_batch
    logps, mask = token_logprobs(logits, labels)
    expected, expected_mask = naive_token_logps(logits, labels)
    assert logps.dtype == torch.float32
    assert mask.tolist() == [[False, True, True, True], [True, True, False, False]]
    assert torch.equal(mask, expected_mask)
    assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(logps[~mask] == 0)


def test_sequence_logprobs_sum_count_and_keep_vocab(random_batch):
    """count = labelled shifted positions (3, 2); logp_sum = row sums; keep_vocab changes no log-prob."""
    logits, labels = random_batch
    expected, _ = naive_token_logps(logits, labels)
    stats = sequence_logprobs(logits, labels)
    assert stats.count.tolist() == [3, 2]
    assert_close(stats.logp_sum, expected.sum(-1), rtol=1e-5, atol=1e-5)
    assert_close(stats.nll_sum, -expected.sum(-1), rtol=1e-5, atol=1e-5)
    assert_close(stats.nll_mean, -expected.sum(-1) / torch.tensor([3.0, 2.0]), rtol=1e-5, atol=1e-5)
    assert stats.vocab_logps is None

    full = sequence_logprobs(logits, labels, keep_vocab=True)
    assert_close(full.token_logps, stats.token_logps, rtol=1e-6, atol=1e-6)
    assert_close(full.logp_sum, stats.logp_sum, rtol=1e-6, atol=1e-6)
    assert torch.equal(full.count, stats.count)
    assert full.vocab_logps.shape == (2, 4, 7)
    assert_close(full.vocab_logps, torch.log_softmax(logits[:, :-1], dim=-1))


def test_shift_by_hand_on_two_token_vocab():
    """Logits (0, ln 3) give p = (1/4, 3/4). Labels [-100, 1, 0]: position 0 scores token 1 -> ln(3/4);
    position 1 scores token 0 -> ln(1/4); position 2 (the last) scores nothing. Sum ln(3/16) = -1.673976."""
    logits = torch.tensor([[[0.0, math.log(3)]] * 3])
    labels = torch.tensor([[-100, 1, 0]])
    stats = sequence_logprobs(logits, labels)
    assert_close(stats.token_logps, torch.tensor([[math.log(0.75), math.log(0.25)]]))
    assert_close(stats.logp_sum, torch.tensor([math.log(3 / 16)]))
    assert stats.count.tolist() == [2]


def test_nll_mean_of_a_row_without_labels_is_zero_not_nan():
    """methods P-16: a row whose answer was truncated away has n = 0, s = 0 -> m = 0 / max(0, 1) = 0."""
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, -100, -100, -100], [-100, 1, 2, 3]])
    stats = sequence_logprobs(logits, labels)
    assert stats.count.tolist() == [0, 3]
    assert stats.nll_mean[0].item() == 0.0
    assert torch.isfinite(stats.nll_mean).all()


def test_select_and_pooled_scale():
    """count (1, 3, 1): B / N = 3 / 5; after selecting rows (2, 0) the sub-batch gives 2 / 2 = 1."""
    stats = sums([-2.0, -6.0, -1.0], [1, 3, 1])
    assert_close(stats.pooled_scale(), torch.tensor(0.6))
    picked = stats.select(torch.tensor([2, 0]))
    assert picked.logp_sum.tolist() == [-1.0, -2.0]
    assert_close(picked.pooled_scale(), torch.tensor(1.0))


# --------------------------------------------------------------------------------------------------------------
# NLL and gradient ascent


def test_nll_normalizations_by_hand():
    """s = (2, 6, 1), n = (1, 3, 1), B = 3, N = 5.

    token_mean: s · B/N = (1.2, 3.6, 0.6); its mean 5.4/3 = 1.8 = Σs/Σn = 9/5 (the pooled HF loss).
    sample_mean: s/n = (2, 2, 1). seq_sum: (2, 6, 1).
    """
    stats = sums([-2.0, -6.0, -1.0], [1, 3, 1])
    token_mean = NLL("token_mean")(stats)
    assert_close(token_mean, torch.tensor([1.2, 3.6, 0.6]))
    assert_close(token_mean.mean(), torch.tensor(9 / 5))
    assert_close(NLL("sample_mean")(stats), torch.tensor([2.0, 2.0, 1.0]))
    assert_close(NLL("seq_sum")(stats), torch.tensor([2.0, 6.0, 1.0]))
    assert NLL().normalization == "token_mean"


@pytest.mark.parametrize("normalization", ["token_mean", "sample_mean", "seq_sum"])
def test_grad_ascent_is_minus_nll(normalization):
    """GradAscent = -NLL entry by entry, e.g. token_mean (-1.2, -3.6, -0.6)."""
    stats = sums([-2.0, -6.0, -1.0], [1, 3, 1])
    assert_close(GradAscent(normalization)(stats), -NLL(normalization)(stats))


def test_unknown_normalization_is_rejected():
    with pytest.raises(ValueError, match="normalization='mean'"):
        NLL("mean")(sums([-1.0], [1]))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# NPO and SimNPO


def test_npo_values_by_hand():
    """beta = 0.1, so 2/beta = 20 and l = 20 · softplus(0.1 r).

    r = 0:   20 ln 2              = 13.862944 (the step-0 sanity value of methods §2.4)
    r = -10: 20 ln(1 + e^-1)      = 20 · 0.3132617 = 6.265234
    r = -20: 20 ln(1 + e^-2)      = 20 · 0.1269280 = 2.538560
    r = +5:  20 ln(1 + e^0.5)     = 20 · 0.9740770 = 19.481541
    """
    policy = sums([-5.0, -15.0, -25.0, 0.0], [4, 4, 4, 4])
    reference = sums([-5.0, -5.0, -5.0, -5.0], [4, 4, 4, 4])
    expected = torch.tensor([20 * softplus(0.1 * r) for r in (0.0, -10.0, -20.0, 5.0)])
    assert_close(expected[:3], torch.tensor([13.862944, 6.265234, 2.538560]))
    assert_close(NPO(beta=0.1)(policy, reference), expected)


def test_npo_gradient_is_twice_sigmoid_of_beta_r():
    """dl/dr = 20 · 0.1 · sigmoid(0.1 r) = 2 sigmoid(beta r): 1, 2σ(-1) = 0.537883, 2σ(-2) = 0.238406."""
    policy = sums([-5.0, -15.0, -25.0], [4, 4, 4], requires_grad=True)
    reference = sums([-5.0, -5.0, -5.0], [4, 4, 4])
    NPO(beta=0.1)(policy, reference).sum().backward()
    expected = torch.tensor([2 * sigmoid(0.1 * r) for r in (0.0, -10.0, -20.0)])
    assert_close(policy.logp_sum.grad, expected)
    assert_close(expected, torch.tensor([1.0, 0.537883, 0.238406]))


def test_npo_ignores_reference_count():
    """A cached reference carries count = 1 per row; only its logp_sum enters r."""
    policy = sums([-15.0], [7])
    assert_close(NPO(0.1)(policy, sums([-5.0], [1])), NPO(0.1)(policy, sums([-5.0], [7])))


def test_npo_without_reference_raises():
    with pytest.raises(ValueError, match="NPO.*reference"):
        NPO()(sums([-1.0], [1]))


def test_npo_rejects_non_positive_beta():
    with pytest.raises(ValueError, match="beta=0"):
        NPO(beta=0)


def test_simnpo_values_by_hand():
    """beta = 4.5, 2/beta = 0.444444; l = (2/beta) softplus(-beta (m - delta)).

    delta = 0: m = 0.01 -> 0.444444 · ln(1 + e^-0.045) = 0.444444 · 0.670897 = 0.298177
               m = 0.1  -> 0.444444 · ln(1 + e^-0.45)  = 0.444444 · 0.493250 = 0.219222
    delta = 1: m = 0.01 -> 0.444444 · softplus(4.455)   = 0.444444 · 4.466541 = 1.985129
               m = 0.1  -> 0.444444 · softplus(4.05)    = 0.444444 · 4.067270 = 1.807676
    m is taken as s/n: s = (0.04, 0.3) with n = (4, 3).
    """
    stats = sums([-0.04, -0.3], [4, 3])
    for delta, by_hand in ((0.0, [0.298177, 0.219222]), (1.0, [1.985129, 1.807676])):
        expected = torch.tensor([(2 / 4.5) * softplus(-4.5 * (m - delta)) for m in (0.01, 0.1)])
        assert_close(expected, torch.tensor(by_hand), rtol=1e-5, atol=1e-6)
        assert_close(SimNPO(beta=4.5, delta=delta)(stats), expected)


def test_simnpo_gradient_wrt_mean_nll():
    """dl/dm = -2 sigmoid(-beta (m - delta)); m = s/n so dl/d(logp_sum) = +2 sigmoid(-beta m) / n.

    m = 0.1, n = 3, beta = 4.5, delta = 0: 2 σ(-0.45) / 3 = 2 · 0.389361 / 3 = 0.259574.
    """
    stats = sums([-0.3], [3], requires_grad=True)
    SimNPO(beta=4.5)(stats).sum().backward()
    assert_close(stats.logp_sum.grad, torch.tensor([2 * sigmoid(-0.45) / 3]))


# --------------------------------------------------------------------------------------------------------------
# Token-weighted ascent: WGA and SatImp (pooled over the batch's tokens, weights detached)

# Row 0: p = (1/2, 1/4); row 1: p = (4/5) and one masked slot. B = 2, N = 3, B/N = 2/3. The masked slot holds
# -1.0 rather than 0 so that a loss forgetting the mask would be caught.
TOKEN_LOGPS = [[math.log(0.5), math.log(0.25)], [math.log(0.8), -1.0]]
TOKEN_MASK = [[True, True], [True, False]]


def test_wga_pooled_values_by_hand():
    """beta = 1: w = p. Row value = (B/N) Σ w logp.

    row 0: (2/3)(0.5 ln 0.5 + 0.25 ln 0.25) = (2/3)(-0.346574 - 0.346574) = -0.462098
    row 1: (2/3)(0.8 ln 0.8)                = (2/3)(-0.178515)            = -0.119010
    batch mean = -(1/N) Σ_t w_t c_t = -(0.693147 + 0.178515) / 3 = -0.290554 (the pooled reference loss).
    """
    stats = tokens(TOKEN_LOGPS, TOKEN_MASK)
    row0 = (2 / 3) * (0.5 * math.log(0.5) + 0.25 * math.log(0.25))
    row1 = (2 / 3) * (0.8 * math.log(0.8))
    losses = WGA(beta=1.0)(stats)
    assert_close(losses, torch.tensor([row0, row1]))
    assert_close(losses, torch.tensor([-0.462098, -0.119010]))
    assert_close(losses.mean(), torch.tensor(-(0.693147 + 0.178515) / 3))


def test_wga_beta_two_by_hand():
    """beta = 2: w = p². row 0: (2/3)(0.25 ln 0.5 + 0.0625 ln 0.25) = (2/3)(-0.173287 - 0.086643) = -0.173287."""
    losses = WGA(beta=2.0)(tokens(TOKEN_LOGPS, TOKEN_MASK))
    assert_close(losses[0], torch.tensor((2 / 3) * (0.25 * math.log(0.5) + 0.0625 * math.log(0.25))))


def test_satimp_pooled_values_by_hand():
    """beta1 = 5, beta2 = 1: w = p^5 (1 - p).

    w(1/2) = 0.03125 · 0.5 = 0.015625; w(1/4) = 0.0009765625 · 0.75 = 0.000732421875; w(4/5) = 0.32768 · 0.2
    = 0.065536.  row 0: (2/3)(0.015625 ln 0.5 + 0.000732422 ln 0.25) = (2/3)(-0.010830 - 0.001015) = -0.007897
    row 1: (2/3)(0.065536 ln 0.8) = (2/3)(-0.014624) = -0.009749.
    """
    losses = SatImp(beta1=5.0, beta2=1.0)(tokens(TOKEN_LOGPS, TOKEN_MASK))
    row0 = (2 / 3) * (0.015625 * math.log(0.5) + 0.000732421875 * math.log(0.25))
    row1 = (2 / 3) * (0.065536 * math.log(0.8))
    assert_close(losses, torch.tensor([row0, row1]))
    assert_close(losses, torch.tensor([-0.007897, -0.009749]), rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    ("loss", "weight"),
    [(WGA(beta=1.0), lambda p: p), (SatImp(beta1=5.0, beta2=1.0), lambda p: p**5 * (1 - p))],
    ids=["WGA", "SatImp"],
)
def test_token_weights_are_detached(loss, weight):
    """Weights are constants: d(row value)/d(logp_t) = w_t · B/N, e.g. WGA (0.5, 0.25, 0.8) · 2/3; masked slot 0.

    Were the weights differentiated too, WGA would give (p + p logp) · B/N instead, e.g. 0.5 (1 + ln 0.5) · 2/3.
    """
    stats = tokens(TOKEN_LOGPS, TOKEN_MASK, requires_grad=True)
    loss(stats).sum().backward()
    p = [[0.5, 0.25], [0.8, None]]
    expected = torch.tensor([[weight(x) * 2 / 3 if x is not None else 0.0 for x in row] for row in p])
    assert_close(stats.token_logps.grad, expected)


def test_satimp_token_losses_by_hand():
    """Per token ``l_t = -w_t c_t = w_t ln p_t`` (no pooling), 0 at the masked slot: with the weights of
    test_satimp_pooled_values_by_hand, row 0: 0.015625 ln 0.5 = -0.010830 and 0.000732422 ln 0.25 = -0.001015;
    row 1: 0.065536 ln 0.8 = -0.014624. Their mean over the N = 3 tokens is the mean of the pooled per-sample
    values (-0.007897 - 0.009749) / 2 = -0.008823: a DV over tokens at large tau tends to plain SatImp."""
    stats = tokens(TOKEN_LOGPS, TOKEN_MASK)
    per_token = SatImp(beta1=5.0, beta2=1.0).token_losses(stats)
    expected = [
        [0.015625 * math.log(0.5), 0.000732421875 * math.log(0.25)],
        [0.065536 * math.log(0.8), 0.0],
    ]
    assert_close(per_token, torch.tensor(expected))
    assert_close(per_token[stats.mask].mean(), SatImp()(stats).mean())
    # GradAscent per token is log p itself; NPO is per sequence and has none.
    assert_close(GradAscent().token_losses(stats), torch.tensor(TOKEN_LOGPS).masked_fill(~stats.mask, 0.0))
    assert SatImp.token_level and WGA.token_level and GradAscent.token_level and not NPO.token_level
    with pytest.raises(NotImplementedError, match="NPO is a per-sequence loss"):
        NPO().token_losses(stats)


def test_token_losses_need_token_level_stats():
    with pytest.raises(ValueError, match="token-level"):
        WGA()(sums([-1.0], [1]))
    with pytest.raises(ValueError, match="token-level"):
        SatImp()(sums([-1.0], [1]))


# --------------------------------------------------------------------------------------------------------------
# KL(reference || policy) on the retain set


def kl_stats(probs: list[list[list[float]]], mask: list[list[bool]]) -> SequenceLogProbs:
    vocab = torch.tensor(probs).log()
    keep = torch.tensor(mask)
    return SequenceLogProbs(
        logp_sum=torch.zeros(len(probs)), count=keep.sum(-1), token_logps=None, mask=keep, vocab_logps=vocab
    )


def test_kl_answer_vs_all_by_hand():
    """Two rows, two positions, V = 2; reference uniform (1/2, 1/2) everywhere.

    KL((1/2,1/2) || (1/4,3/4)) = 0.5 ln 2 + 0.5 ln(2/3) = 0.5 ln(4/3) = 0.143841
    KL((1/2,1/2) || (1/5,4/5)) = 0.5 ln 2.5 + 0.5 ln(0.625) = 0.5 ln(25/16) = 0.223144
    KL of identical distributions = 0.
    Row 0: positions (0.143841, 0), mask (T, F): answer 0.143841 / 1, all 0.143841 / 2 = 0.071921.
    Row 1: positions (0.223144, 0), mask (F, T): answer 0 / 1 = 0,     all 0.223144 / 2 = 0.111572.
    """
    policy = kl_stats([[[0.25, 0.75], [0.5, 0.5]], [[0.2, 0.8], [0.5, 0.5]]], [[True, False], [False, True]])
    reference = kl_stats([[[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]], [[True, False], [False, True]])
    a, b = 0.5 * math.log(4 / 3), 0.5 * math.log(25 / 16)
    assert_close(KL("answer")(policy, reference), torch.tensor([a, 0.0]))
    assert_close(KL("all")(policy, reference), torch.tensor([a / 2, b / 2]))
    assert_close(torch.tensor([a, b]), torch.tensor([0.143841, 0.223144]))


def test_kl_direction_is_reference_to_policy():
    """KL(ref || pol) with ref (1/4, 3/4), pol (1/2, 1/2): 0.25 ln 0.5 + 0.75 ln 1.5 = 0.130812;
    the other direction would give 0.5 ln 2 + 0.5 ln(2/3) = 0.143841."""
    policy = kl_stats([[[0.5, 0.5]]], [[True]])
    reference = kl_stats([[[0.25, 0.75]]], [[True]])
    assert_close(KL("answer")(policy, reference), torch.tensor([0.25 * math.log(0.5) + 0.75 * math.log(1.5)]))


def test_kl_all_averages_every_predicting_position():
    """F.kl_div(log p_pol, log p_ref, 'batchmean', log_target=True) over the (B·(T-1), V) predicting rows: the
    reference's unmasked average (methods P-12) less each row's final position, which predicts no token."""
    generator = torch.Generator().manual_seed(3)
    policy_logits = torch.randn(2, 4, 5, generator=generator)
    reference_logits = torch.randn(2, 4, 5, generator=generator)
    labels = torch.tensor([[-100, -100, 1, 2], [-100, 3, -100, -100]])
    policy = sequence_logprobs(policy_logits, labels, keep_vocab=True)
    reference = sequence_logprobs(reference_logits, labels, keep_vocab=True)
    expected = F.kl_div(
        torch.log_softmax(policy_logits[:, :-1], -1).reshape(-1, 5),
        torch.log_softmax(reference_logits[:, :-1], -1).reshape(-1, 5),
        reduction="batchmean",
        log_target=True,
    )
    assert_close(KL("all")(policy, reference).mean(), expected)


def test_kl_needs_a_live_reference():
    policy = kl_stats([[[0.5, 0.5]]], [[True]])
    with pytest.raises(ValueError, match="KL.*reference"):
        KL()(policy, None)
    with pytest.raises(ValueError, match="live reference"):
        KL()(policy, sums([-1.0], [1]))


# --------------------------------------------------------------------------------------------------------------
# Shared contract: one value per sample, fp32, finite on extreme inputs


ALL_LOSSES: list[PerSampleLoss] = [
    NLL("token_mean"),
    NLL("sample_mean"),
    NLL("seq_sum"),
    GradAscent(),
    NPO(beta=0.1),
    SimNPO(beta=4.5, delta=1.0),
    WGA(),
    SatImp(),
]


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=lambda x: repr(x))
def test_losses_return_one_finite_value_per_sample_down_to_minus_1e4(loss):
    """Rows with logp_sum 0, -1, -1e2, -1e4 (one token each, the -1e4 token has p = e^-1e4 = 0 in fp32), against
    a reference at -1e4 (r up to +1e4) and at 0 (r down to -1e4): every loss and its gradient stay finite."""
    logps = torch.tensor([[0.0], [-1.0], [-1e2], [-1e4]], requires_grad=True)
    mask = torch.ones(4, 1, dtype=torch.bool)
    policy = SequenceLogProbs(logp_sum=logps.sum(-1), count=mask.sum(-1), token_logps=logps, mask=mask)
    for ref_value in (0.0, -1e4):
        reference = sums([ref_value] * 4, [1] * 4)
        losses = loss(policy, reference)
        assert losses.shape == (4,)
        assert losses.dtype == torch.float32
        assert torch.isfinite(losses).all(), losses
        (grad,) = torch.autograd.grad(losses.sum(), logps)
        assert torch.isfinite(grad).all(), grad


def test_kl_returns_one_value_per_sample():
    policy = kl_stats([[[0.25, 0.75], [0.5, 0.5]]] * 3, [[True, False]] * 3)
    assert KL("answer")(policy, policy).shape == (3,)
    assert KL("all")(policy, policy).shape == (3,)
    assert_close(KL("all")(policy, policy), torch.zeros(3))
