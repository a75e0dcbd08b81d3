"""Hand-computed checks of the evaluation metrics in ``baldro_lightning.evaluation.metrics`` (spec §3).

Each test writes its arithmetic in the docstring or a comment; a second, independent computation (brute force)
backs the cases that are awkward by hand (KS p-value, ES loop, MinK++ statistics).
"""

from __future__ import annotations

import itertools
import math
import zlib

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from baldro_lightning.evaluation import metrics as M

# --------------------------------------------------------------------------------------------------------------
# Likelihood metrics


def test_probability_is_exp_of_minus_mean_nll():
    """exp(-0) = 1, exp(-ln 2) = 0.5, exp(-ln 4) = 0.25."""
    assert_allclose(M.probability([0.0, math.log(2), math.log(4)]), [1.0, 0.5, 0.25])


def test_normalised_probability_by_hand():
    """Row 0: P(a)=0.5, wrong 0.25+0.25 → 0.5/1.0 = 0.5. Row 1: 0.8/(0.8+0.1+0.1) = 0.8."""
    correct = -np.log([0.5, 0.8])
    wrong = -np.log([[0.25, 0.25], [0.1, 0.1]])
    assert_allclose(M.normalised_probability(correct, wrong), [0.5, 0.8], rtol=1e-9)


def test_normalised_probability_rejects_row_mismatch():
    with pytest.raises(ValueError, match=r"wrong_nll_mean.*N = 2"):
        M.normalised_probability([0.1, 0.2], [[0.1, 0.2]])


def test_truth_ratio_by_hand():
    """TR = exp(-mean_j L(pert)) / (exp(-L(para)) + 1e-10).

    Row 0: para 0.5, pert [1, 2] → mean 1.5 → exp(-1.5)/exp(-0.5) = e^-1 = 0.367879.
    Row 1: para 2.0, pert [1, 1] → exp(-1)/exp(-2) = e = 2.718282.
    Row 2: para 1.0, pert [0.5, 1.5] → mean 1.0 → 1 (the losses are averaged before exp, so not
           (e^-0.5 + e^-1.5)/2 / e^-1 = 1.1752).
    """
    tr = M.truth_ratio([0.5, 2.0, 1.0], [[1.0, 2.0], [1.0, 1.0], [0.5, 1.5]])
    assert_allclose(tr, [math.exp(-1), math.e, 1.0], rtol=1e-8)


def test_truth_ratio_accepts_torch_and_one_option():
    """A 1-D perturbed input is K=1: exp(-1)/exp(-0.5) = e^-0.5 = 0.606531."""
    tr = M.truth_ratio(torch.tensor([0.5]), torch.tensor([1.0]))
    assert_allclose(tr, [math.exp(-0.5)], rtol=1e-6)


def test_truth_ratio_aggregates_by_hand():
    """TR = [e^-1, e, 1].

    closer_to_1_better: min(TR, 1/TR) = [0.367879, 0.367879, 1] → mean 0.578586.
    true_better: max(0, 1-TR) = [0.632121, 0, 0] → mean 0.210707.
    """
    tr = np.array([math.exp(-1), math.e, 1.0])
    assert M.truth_ratio_forget_aggregate(tr) == pytest.approx((2 * math.exp(-1) + 1) / 3, rel=1e-8)
    assert M.truth_ratio_true_aggregate(tr) == pytest.approx((1 - math.exp(-1)) / 3, rel=1e-8)


# --------------------------------------------------------------------------------------------------------------
# Generation and ROUGE


def test_clean_generation_cuts_in_order_and_strips():
    """'\\n\\n' cuts first → '  Paris.\\nQuestion: x', then '\\nQuestion' → '  Paris.' → strip."""
    text = "  Paris.\nQuestion: x\n\nAnswer: y"
    assert M.clean_generation(text, ["\n\n", "\nQuestion", "Question:"]) == "Paris."
    assert M.clean_generation("  no stop  ") == "no stop"
    with pytest.raises(ValueError, match="empty string"):
        M.clean_generation("x", [""])


def test_rouge_by_hand_with_and_without_stemming():
    """Reference 'The cat was running home!' → tokens [the, cat, was, run, home] (stemmed; 'was' has 3 letters and
    is never stemmed); prediction 'a cat runs home' → [a, cat, run, home].

    Stemmed: LCS = cat run home = 3 → rougeL recall 3/5 = 0.6, precision 3/4, F1 = 2·0.6·0.75/1.35 = 2/3;
    rouge1 recall = 3/5.
    Unstemmed: 'running' ≠ 'runs', LCS = cat home = 2 → recall 2/5 = 0.4, F1 = 2·0.4·0.5/0.9 = 4/9.
    Second pair: 'run fast' vs reference 'running fast' → stemmed 2/2 = 1.0, unstemmed 1/2.
    """
    preds = ["a cat runs home", "run fast"]
    refs = ["The cat was running home!", "running fast"]
    stemmed = M.rouge_scores(preds, refs)
    assert_allclose(stemmed["rougeL_recall"], [0.6, 1.0])
    assert_allclose(stemmed["rouge1_recall"], [0.6, 1.0])
    assert_allclose(stemmed["rougeL_f1"], [2 / 3, 1.0])
    assert_allclose(M.rouge_l_recall(preds, refs), [0.6, 1.0])
    plain = M.rouge_scores(preds, refs, use_stemmer=False)
    assert_allclose(plain["rougeL_recall"], [0.4, 0.5])
    assert_allclose(plain["rougeL_f1"], [4 / 9, 0.5])


def test_rouge_l_is_lcs_not_bag_of_words():
    """Reference 'a b c d', prediction 'd c b a': every unigram matches (rouge1 recall 1) but the LCS is 1 → 1/4."""
    scores = M.rouge_scores(["d c b a"], ["a b c d"])
    assert scores["rouge1_recall"][0] == pytest.approx(1.0)
    assert scores["rougeL_recall"][0] == pytest.approx(0.25)


def test_rouge_length_mismatch():
    with pytest.raises(ValueError, match=r"`predictions`: 1, `references`: 2"):
        M.rouge_scores(["a"], ["a", "b"])


# --------------------------------------------------------------------------------------------------------------
# Forget Quality and Model Utility


def _ks_pvalue_by_enumeration(a: list[float], b: list[float]) -> float:
    """Exact two-sided KS p-value as a permutation test: the fraction of all C(n+m, n) ways to split the pooled
    sample into groups of sizes n and m whose KS statistic is at least the observed one (valid without ties)."""
    pooled = np.array(a + b)
    grid = np.sort(pooled)

    def stat(x: np.ndarray, y: np.ndarray) -> float:
        cdf_x = np.searchsorted(np.sort(x), grid, side="right") / x.size
        cdf_y = np.searchsorted(np.sort(y), grid, side="right") / y.size
        return float(np.max(np.abs(cdf_x - cdf_y)))

    observed = stat(np.array(a), np.array(b))
    hits = total = 0
    for idx in itertools.combinations(range(pooled.size), len(a)):
        mask = np.zeros(pooled.size, dtype=bool)
        mask[list(idx)] = True
        hits += stat(pooled[mask], pooled[~mask]) >= observed - 1e-12
        total += 1
    return hits / total


def test_forget_quality_of_sample_with_itself_is_one():
    tr = [0.3, 0.5, 0.7, 0.9]
    assert M.forget_quality(tr, tr) == pytest.approx(1.0)


def test_forget_quality_fully_separated_small_samples():
    """A = [1,2,3] < B = [4,5,6]: D = 1, reached only by the 2 extreme splits out of C(6,3) = 20 → p = 0.1."""
    assert M.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("a", "b"),
    [([0.1, 0.35, 0.4, 0.8], [0.3, 0.5, 0.6, 0.7, 0.9]), ([1.0, 2.0, 3.0, 4.5], [4.0, 5.0, 6.0, 7.0, 8.0])],
    ids=["interleaved-p0.43", "nearly-separated-p0.079"],
)
def test_forget_quality_matches_permutation_enumeration(a: list[float], b: list[float]):
    """n=4, m=5 (C(9,4) = 126 splits), checked against an independent brute force of the exact distribution."""
    assert M.forget_quality(a, b) == pytest.approx(_ks_pvalue_by_enumeration(a, b), rel=1e-9)


def test_forget_quality_empty_input():
    with pytest.raises(ValueError, match="`tr_retain` is empty"):
        M.forget_quality([0.5], [])


def _utility_values(*numbers: float) -> dict[str, float]:
    return dict(zip(M.MODEL_UTILITY_KEYS, numbers, strict=True))


def test_model_utility_harmonic_mean_by_hand():
    """Seven 1s, 0.5 and 0.25: HM = 9 / (7·1 + 2 + 4) = 9/13 = 0.692308; extra keys are ignored."""
    values = _utility_values(1, 1, 1, 1, 1, 1, 1, 0.5, 0.25)
    values["forget_quality"] = 1e-20
    assert M.model_utility(values) == pytest.approx(9 / 13)


def test_model_utility_zero_gives_zero():
    assert M.model_utility(_utility_values(0.5, 0.5, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5)) == 0.0


def test_model_utility_missing_keys_are_listed():
    values = _utility_values(*([0.5] * 9))
    del values["ra_Truth_Ratio"], values["wf_Q_A_ROUGE"]
    with pytest.raises(ValueError, match=r"missing 2 .*ra_Truth_Ratio, wf_Q_A_ROUGE"):
        M.model_utility(values)


# --------------------------------------------------------------------------------------------------------------
# Memorisation


def _es_reference_loop(pred: list[int], target: list[int]) -> float:
    """The reference's loop, transcribed literally: the loop variable stays at n-1 when nothing matches."""
    n = len(target)
    k = 0
    for k in range(n):  # noqa: B007 - k is read after the loop on purpose
        if pred[k:] == target[k:]:
            break
    return 0.0 if n == 0 else 1 - k / n


def test_extraction_strength_by_hand():
    """n = 4, target [5,6,7,8].

    full match → k*=0 → 1.0; first token wrong → suffix from 1 matches → 1 - 1/4 = 0.75;
    position 1 wrong → 1 - 2/4 = 0.5; last token wrong (no suffix matches) → floor 1/n = 0.25;
    everything wrong → also 0.25; empty answer → 0.
    """
    target = [5, 6, 7, 8]
    preds = [[5, 6, 7, 8], [9, 6, 7, 8], [5, 0, 7, 8], [5, 6, 7, 0], [1, 2, 3, 4], []]
    targets = [target] * 5 + [[]]
    assert_allclose(M.extraction_strength(preds, targets), [1.0, 0.75, 0.5, 0.25, 0.25, 0.0])


def test_extraction_strength_matches_reference_loop_on_random_items():
    rng = np.random.default_rng(0)
    preds, targets = [], []
    for _ in range(200):
        n = int(rng.integers(0, 8))
        t = rng.integers(0, 3, n)
        preds.append(rng.integers(0, 3, n))
        targets.append(t)
    expected = [_es_reference_loop(p.tolist(), t.tolist()) for p, t in zip(preds, targets, strict=True)]
    assert_allclose(M.extraction_strength(preds, targets), expected)


def test_exact_memorization_by_hand():
    """[5,0,7,8] vs [5,6,7,8] → 3/4; [1,2] vs [1,2] → 1; empty → NaN (reference: None, left out of the mean)."""
    em = M.exact_memorization([np.array([5, 0, 7, 8]), torch.tensor([1, 2]), []], [[5, 6, 7, 8], [1, 2], []])
    assert_allclose(em[:2], [0.75, 1.0])
    assert math.isnan(em[2])


def test_memorisation_length_mismatch_names_item():
    with pytest.raises(ValueError, match="item 1: `pred_ids` has 2 tokens but `target_ids` has 3"):
        M.extraction_strength([[1], [1, 2]], [[1], [1, 2, 3]])


# --------------------------------------------------------------------------------------------------------------
# MIA


def test_mia_loss_and_zlib():
    """ZLib = L̄ / compressed UTF-8 byte length. 'é' is 2 bytes in UTF-8, so its size is that of b'\\xc3\\xa9'."""
    nll = np.array([2.0, 3.0])
    texts = ["aaaaaaaaaaaaaaaaaaaa", "é"]
    sizes = [len(zlib.compress(b"a" * 20)), len(zlib.compress(b"\xc3\xa9"))]
    assert_allclose(M.mia_loss(nll), nll)
    assert_allclose(M.mia_zlib(nll, texts), [2.0 / sizes[0], 3.0 / sizes[1]])


def test_mia_min_k_by_hand():
    """n=5, k=0.4 → floor(2.0) = 2 smallest of [-0.1,-2,-0.5,-3,-1] are -3,-2 → score 2.5.
    n=1 → max(1, floor(0.4)) = 1 → 0.7. n=0 → 0."""
    scores = M.mia_min_k([[-0.1, -2.0, -0.5, -3.0, -1.0], [-0.7], []], k=0.4)
    assert_allclose(scores, [2.5, 0.7, 0.0])
    with pytest.raises(ValueError, match="k=0.4"):
        M.mia_min_k([[-1.0]], k=0.0)


def test_mia_min_k_plus_plus_by_hand():
    """ℓ = [-1, -2, -0.5], μ = [-0.5, -1, -0.5], σ² = [0.25, 4, 1e-8 → clamped 1e-6].

    z = [(-0.5)/0.5, (-1)/2, 0/1e-3] = [-1, -0.5, 0]. k=0.4: floor(1.2)=1 → -(-1) = 1.
    k=0.7: floor(2.1)=2 → -mean(-1,-0.5) = 0.75.
    """
    args = ([[-1.0, -2.0, -0.5]], [[-0.5, -1.0, -0.5]], [[0.25, 4.0, 1e-8]])
    assert_allclose(M.mia_min_k_plus_plus(*args, k=0.4), [1.0])
    assert_allclose(M.mia_min_k_plus_plus(*args, k=0.7), [0.75])
    assert_allclose(M.mia_min_k_plus_plus([[]], [[]], [[]]), [0.0])


def test_min_k_plus_plus_stats_vs_numpy():
    """μ = Σ p log p, σ² = Σ p (log p)² − μ² (the reference's form, in fp64 numpy) on random logits (2, 3, 11)."""
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0)) * 3
    logp = torch.log_softmax(logits.double(), -1).numpy()
    p = np.exp(logp)
    mu_ref = (p * logp).sum(-1)
    sigma2_ref = np.maximum((p * logp**2).sum(-1) - mu_ref**2, 1e-6)
    for kwargs in ({"vocab_logps": torch.log_softmax(logits, -1)}, {"vocab_logps": logits, "from_logits": True}):
        mu, sigma2 = M.min_k_plus_plus_stats(**kwargs, chunk_size=4)
        assert mu.shape == (2, 3) and mu.dtype == torch.float32
        assert_allclose(mu.numpy(), mu_ref, rtol=1e-5, atol=1e-6)
        assert_allclose(sigma2.numpy(), sigma2_ref, rtol=1e-5, atol=1e-6)


def test_min_k_plus_plus_stats_degenerate_rows():
    """Uniform over 4 → μ = -ln 4, variance 0 → clamp 1e-6. Logits [0, 0, -inf] → μ = -ln 2, not NaN; bf16 in."""
    mu, sigma2 = M.min_k_plus_plus_stats(torch.zeros(1, 4, dtype=torch.bfloat16), from_logits=True)
    assert mu.item() == pytest.approx(-math.log(4), rel=1e-6)
    assert sigma2.item() == pytest.approx(1e-6)
    mu, sigma2 = M.min_k_plus_plus_stats(torch.tensor([[0.0, 0.0, -math.inf]]), from_logits=True)
    assert mu.item() == pytest.approx(-math.log(2), rel=1e-6)
    assert sigma2.item() == pytest.approx(1e-6)


def test_mia_auc_by_hand_with_a_tie():
    """Members [0.1, 0.5], non-members [0.5, 0.9]: pairs (nm > m) = (0.5>0.1) 1, (0.5=0.5) ½, (0.9>0.1) 1,
    (0.9>0.5) 1 → 3.5/4 = 0.875. Swapping the roles gives 1 − 0.875."""
    assert M.mia_auc([0.1, 0.5], [0.5, 0.9]) == pytest.approx(0.875)
    assert M.mia_auc([0.5, 0.9], [0.1, 0.5]) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="`member_scores` is empty"):
        M.mia_auc([], [0.1])


def test_privleak_and_rel_diff():
    """AUC_m = 1, AUC_r = 0.3867: (0 − 0.6133)/0.6133·100 = −100.
    Retain model scored against the default 0.5: (0.6133 − 0.5)/0.5·100 = 22.66.
    rel_diff(3, 2) = (3−2)/2·100 = 50."""
    assert M.privleak(1.0, 0.3867) == pytest.approx(-100.0, rel=1e-8)
    assert M.privleak(0.3867) == pytest.approx(22.66, rel=1e-8)
    assert M.privleak(0.3867, None) == M.privleak(0.3867, 0.5)
    assert M.rel_diff(3.0, 2.0) == pytest.approx(50.0)


# --------------------------------------------------------------------------------------------------------------
# Synchrony


def test_forgotten_by_truth_ratio_thresholds():
    """Retain TRs [0.2, 0.4, 0.6, 0.8, 1.0], quantiles (0.25, 0.75) → q_lo = 0.4, q_hi = 0.8 (linear, positions
    1 and 3). Forgotten = TR ≥ 0.4; over-forgotten = TR > 0.8."""
    tr = np.array([[0.1, 0.4, 0.8, 0.9], [np.nan, 0.39, 0.81, 2.0]])
    forgotten, over = M.forgotten_by_truth_ratio(tr, [0.2, 0.4, 0.6, 0.8, 1.0], quantiles=(0.25, 0.75))
    np.testing.assert_array_equal(forgotten, [[False, True, True, True], [False, False, True, True]])
    np.testing.assert_array_equal(over, [[False, False, False, True], [False, False, True, True]])
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        M.forgotten_by_truth_ratio(tr, [0.5], quantiles=(0.9, 0.1))


def test_forget_steps_and_synchrony_summary_by_hand():
    """3 evaluations at steps [0, 10, 20] × 4 samples, forgotten when TR ≥ 0.5:

    sample 0: TR 0.1, 0.6, 0.7 → 10;   sample 1: 0.1, 0.2, 0.9 → 20;
    sample 2: 0.1, 0.1, 0.1 → never;   sample 3: 0.5, 0.6, 0.7 → 0.
    Forgotten steps [10, 20, 0]: median 10; population std sqrt(((0)²+10²+10²)/3) = sqrt(200/3) = 8.164966;
    percentiles 25/75 of [0, 10, 20] = 5 and 15 → IQR 10; never forgotten 1/4; over-forgotten [F,T,F,F] → 1/4.
    """
    tr = np.array([[0.1, 0.1, 0.1, 0.5], [0.6, 0.2, 0.1, 0.6], [0.7, 0.9, 0.1, 0.7]])
    steps = np.array([0, 10, 20])
    by_callable = M.forget_steps(tr, steps, lambda v: v >= 0.5)
    by_matrix = M.forget_steps(tr, steps, tr >= 0.5)
    assert_allclose(by_callable, [10, 20, np.nan, 0])
    assert_allclose(by_matrix, by_callable)
    summary = M.synchrony_summary(by_callable, np.array([False, True, False, False]))
    assert summary == pytest.approx(
        {
            "forget_step_iqr": 10.0,
            "forget_step_std": math.sqrt(200 / 3),
            "forget_step_median": 10.0,
            "fraction_never_forgotten": 0.25,
            "fraction_over_forgotten": 0.25,
        }
    )


def test_forget_steps_persistent():
    """Sample 0 forgotten at eval 1, recovers at eval 2, forgotten again at eval 3: first crossing step 10,
    persistent step 30. Sample 1 forgotten then recovers for good: first 0, persistent never."""
    mask = np.array([[False, True], [True, False], [False, False], [True, False]])
    steps = [0, 10, 20, 30]
    assert_allclose(M.forget_steps(np.zeros((4, 2)), steps, mask), [10, 0])
    assert_allclose(M.forget_steps(np.zeros((4, 2)), steps, mask, persistent=True), [30, np.nan])


def test_synchrony_summary_nobody_forgotten_and_shape_errors():
    summary = M.synchrony_summary([np.nan, np.nan], [False, False])
    assert math.isnan(summary["forget_step_iqr"]) and summary["fraction_never_forgotten"] == 1.0
    with pytest.raises(ValueError, match=r"over\[-1\]"):
        M.synchrony_summary([1.0, 2.0], np.zeros((3, 2), dtype=bool))
    with pytest.raises(ValueError, match="E = 2 evaluations"):
        M.forget_steps(np.zeros((3, 2)), [0, 1], np.zeros((3, 2), dtype=bool))
    with pytest.raises(ValueError, match="non-decreasing"):
        M.forget_steps(np.zeros((2, 2)), [5, 1], np.zeros((2, 2), dtype=bool))


# Forget steps from each sample's own start. Retain TRs [1, 2, 3, 4, 5]: median 3.0, 5th percentile
# 1 + 0.05 * 4 = 1.2 (linear, position 0.2), 95th 4.8. Evaluations at steps [0, 10, 20, 30], 10 samples; 8 of them
# (all but 7 and 9) start past the 5th percentile, so the old criterion calls them forgotten before any update.
RETAIN_TR = [1.0, 2.0, 3.0, 4.0, 5.0]
STEPS = [0, 10, 20, 30]
TRAJECTORIES = np.array(
    [
        # s0   s1   s2   s3   s4   s5   s6   s7   s8   s9
        [1.5, 2.0, 2.5, 2.9, 1.5, 2.0, 1.8, 1.0, 3.5, 0.5],
        [3.0, 3.1, 3.5, 3.0, 2.0, 2.5, 2.0, 1.1, 3.6, 0.8],
        [3.2, 3.0, 4.0, 3.1, 3.0, 3.2, 2.2, 1.1, 3.7, 1.5],
        [3.4, 3.3, 4.5, 3.2, 3.5, 3.3, 3.6, 1.1, 3.8, 3.1],
    ]
)


def test_forget_steps_from_start_when_most_samples_start_past_the_retain_5th_percentile():
    """Level = retain median 3.0, truth ratio rises. s0-s3 reach it at step 10, s4-s5 at 20, s6 and s9 at 30; s7
    never does; s8 starts at 3.5, already past it (flagged, no step).

    Moved: [10, 10, 10, 10, 20, 20, 30, 30]: median 15; 25th percentile at position 1.75 → 10, 75th at 5.25 →
    20 + 0.25 * 10 = 22.5, IQR 12.5; mean 17.5, population variance (4 * 7.5² + 2 * 2.5² + 2 * 12.5²) / 8 = 68.75.
    The old criterion (TR ≥ 5th percentile 1.2) puts 8 of the 10 samples at step 0: median and IQR 0.
    """
    level = M.retain_level(RETAIN_TR)
    assert level == 3.0
    result = M.forget_steps_from_start(TRAJECTORIES, STEPS, level, direction="up")
    assert_allclose(result.step, [10, 10, 10, 10, 20, 20, 30, np.nan, np.nan, 30])
    np.testing.assert_array_equal(result.forgotten_at_start, [False] * 8 + [True, False])
    _, over = M.forgotten_by_truth_ratio(TRAJECTORIES, RETAIN_TR)
    summary = M.synchrony_summary_from_start(result.step, result.forgotten_at_start, over[-1])
    assert summary == pytest.approx(
        {
            "forget_step_iqr": 12.5,
            "forget_step_std": math.sqrt(68.75),
            "forget_step_median": 15.0,
            "fraction_forgotten_at_start": 0.1,
            "fraction_forgotten_later": 0.8,
            "fraction_never_forgotten": 0.1,
            "fraction_over_forgotten": 0.0,  # the 95th percentile is 4.8; s2 ends at 4.5
        }
    )

    old_forgotten, _ = M.forgotten_by_truth_ratio(TRAJECTORIES, RETAIN_TR)
    assert old_forgotten[0].mean() == pytest.approx(0.8)
    old = M.synchrony_summary(M.forget_steps(TRAJECTORIES, STEPS, old_forgotten), over[-1])
    assert (old["forget_step_median"], old["forget_step_iqr"]) == (0.0, 0.0)


def test_forget_steps_from_start_downwards_with_per_sample_levels():
    """ROUGE falls to the retain median 0.2: [0.9, 0.1] starts remembered → step 5; [0.15, 0.5] starts past it.
    Log-likelihood ratio nll_0 - nll with per-sample levels nll_0 - retain_nll = [-1, -3]: sample 0 reaches -1 at
    step 5; sample 1 gets to -2 only (never). Persistent: sample 0 of [[0.9], [0.1], [0.5], [0.1]] counts from 15."""
    rouge = M.forget_steps_from_start([[0.9, 0.15], [0.1, 0.5]], [0, 5], M.retain_level([0.1, 0.2, 0.3]), "down")
    assert_allclose(rouge.step, [5, np.nan])
    np.testing.assert_array_equal(rouge.forgotten_at_start, [False, True])
    llr = M.forget_steps_from_start([[0.0, 0.0], [-1.5, -2.0]], [0, 5], np.array([-1.0, -3.0]), "down")
    assert_allclose(llr.step, [5, np.nan])
    assert not llr.forgotten_at_start.any()
    late = M.forget_steps_from_start([[0.9], [0.1], [0.5], [0.1]], [0, 5, 10, 15], 0.2, "down", persistent=True)
    assert_allclose(late.step, [15])
    summary = M.synchrony_summary_from_start(llr.step, llr.forgotten_at_start)
    assert summary["fraction_never_forgotten"] == 0.5 and "fraction_over_forgotten" not in summary
    nobody = M.synchrony_summary_from_start(rouge.step * np.nan, [True, True])
    assert math.isnan(nobody["forget_step_median"]) and nobody["fraction_forgotten_at_start"] == 1.0


def test_forget_steps_from_start_rejects_bad_input():
    with pytest.raises(M.MetricInputError, match="'up' or 'down'"):
        M.forget_steps_from_start(TRAJECTORIES, STEPS, 3.0, direction="sideways")
    with pytest.raises(M.MetricInputError, match="one value per sample"):
        M.forget_steps_from_start(TRAJECTORIES, STEPS, [1.0, 2.0])
    with pytest.raises(M.MetricInputError, match=r"\(E, N\)"):
        M.forget_steps_from_start([1.0, 2.0], [0, 1], 1.0)
    with pytest.raises(M.MetricInputError, match="no finite value"):
        M.retain_level([np.nan])
    with pytest.raises(M.MetricInputError, match="like `forget_step`"):
        M.synchrony_summary_from_start([1.0, 2.0], [True])


def test_forgetting_balance_by_hand():
    out = M.forgetting_balance([1.0, 2.0, 3.0, 6.0])
    assert out["forgetting_mean"] == pytest.approx(3.0)
    assert out["forgetting_std"] == pytest.approx(math.sqrt(3.5))  # population std: (4 + 1 + 0 + 9) / 4
    assert out["forgetting_cv"] == pytest.approx(math.sqrt(3.5) / 3.0)
    assert out["forgetting_bottom_share"] == pytest.approx(1.0 / 3.0)  # 10% of 4 rows rounds down to 0: one row
    assert M.forgetting_balance([1.0, 2.0, 3.0, 6.0], bottom=0.5)["forgetting_bottom_share"] == pytest.approx(0.5)
    even = M.forgetting_balance([0.5, 0.5, 0.5])
    assert (even["forgetting_std"], even["forgetting_cv"], even["forgetting_bottom_share"]) == (0.0, 0.0, 1.0)
    before = M.forgetting_balance([0.0, 0.0])  # the step-0 evaluation: nothing forgotten yet
    assert before["forgetting_mean"] == 0.0 and math.isnan(before["forgetting_cv"])


def test_forgetting_balance_rejects_bad_input():
    with pytest.raises(M.MetricInputError, match="finite"):
        M.forgetting_balance([0.1, float("nan")])
    with pytest.raises(M.MetricInputError, match="bottom"):
        M.forgetting_balance([0.1, 0.2], bottom=0.0)


def test_at_first_crossing_interpolates_between_evaluations():
    means, stds = [0.0, 0.5, 1.5, 1.0], [0.0, 0.2, 0.6, 0.1]
    assert M.at_first_crossing(means, stds, 1.0) == pytest.approx(0.4)  # halfway from (0.5, 0.2) to (1.5, 0.6)
    assert M.at_first_crossing(means, stds, 0.5) == pytest.approx(0.2)
    assert M.at_first_crossing(means, stds, 0.0) == 0.0
    assert math.isnan(M.at_first_crossing(means, stds, 2.0))
    with pytest.raises(M.MetricInputError, match="same length"):
        M.at_first_crossing([0.0, 1.0], [0.0], 0.5)
