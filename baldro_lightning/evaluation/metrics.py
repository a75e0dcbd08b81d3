"""Evaluation metrics of TOFU and MUSE as pure functions of per-item statistics (spec §3).

Every function here takes per-item values that an evaluator has already computed (mean answer NLLs,
token log-probs, argmax predictions, generated texts) and returns per-item numpy arrays or python floats. No
model, tokenizer or file is touched, so the same functions serve the offline evaluator, the Lightning
callbacks, and sharded evaluation (gather the per-item values across ranks, then call these once).

Conventions, shared by all functions:

- "NLL mean" of an answer is the mean token negative log-likelihood over its labelled tokens **including the
  final EOS** (spec §3.1a).
- Token-level inputs (memorisation, MinK, MinK++) cover the answer positions **excluding the last labelled
  token**, which the reference assumes is EOS (spec §3.1b, P-18). The caller cuts that position off; nothing
  here drops it again.
- The truth ratio is the reference code's *wrong over correct* (spec §3.2, P-21): a model that knows an answer
  has TR ≪ 1, forgetting raises it.
- MIA scores are loss-like: higher score = less likely a member (spec §3.6).
- Inputs may be lists, numpy arrays or CPU/GPU torch tensors; aggregates are computed in fp64 numpy.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence, Sized
from typing import Literal, NamedTuple, TypeAlias

import numpy as np
import scipy.stats
import sklearn.metrics
import torch
from numpy.typing import ArrayLike
from rouge_score import rouge_scorer
from torch import Tensor

ArrayOrTensor: TypeAlias = ArrayLike | Tensor
"""Anything :func:`numpy.asarray` accepts, or a torch tensor on any device."""

TR_EPS = 1e-10
"""Additive constant of the reference code in truth-ratio, normalised-probability and privleak denominators."""

MINKPP_VAR_FLOOR = 1e-6
"""Lower clamp of the MinK++ per-position variance (spec §3.6)."""

MODEL_UTILITY_KEYS: tuple[str, ...] = (
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "ra_Q_A_Prob_normalised",
    "ra_Q_A_ROUGE",
    "ra_Truth_Ratio",
    "wf_Q_A_Prob_normalised",
    "wf_Q_A_ROUGE",
    "wf_Truth_Ratio",
)
"""The nine TOFU aggregates whose harmonic mean is Model Utility (spec §3.3)."""


class MetricInputError(ValueError):
    """Inputs of a metric have the wrong shape, length or range."""


# --------------------------------------------------------------------------------------------------------------
# Input handling


def _to_numpy(values: ArrayOrTensor, name: str, dtype: type = np.float64) -> np.ndarray:
    """``values`` as a numpy array of ``dtype``; torch tensors are detached and moved to the CPU first."""
    if isinstance(values, Tensor):
        values = values.detach().cpu()
        if values.dtype == torch.bfloat16:  # numpy has no bf16
            values = values.float()
        values = values.numpy()
    try:
        return np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise MetricInputError(
            f"`{name}` could not be read as a {np.dtype(dtype).name} array ({err}); pass a list, numpy array or "
            "tensor of numbers (ragged per-item inputs go to the functions that take a list of 1-D arrays)"
        ) from err


def _vector(values: ArrayOrTensor, name: str) -> np.ndarray:
    """``values`` as a 1-D fp64 array; a 0-d input becomes length 1."""
    arr = np.atleast_1d(_to_numpy(values, name))
    if arr.ndim != 1:
        raise MetricInputError(f"`{name}` must be 1-D (one value per item), got shape {arr.shape}")
    return arr


def _ragged(items: Sequence[ArrayOrTensor], name: str, dtype: type = np.float64) -> list[np.ndarray]:
    """A list of per-item 1-D arrays (lengths may differ)."""
    out = []
    for i, item in enumerate(items):
        arr = np.atleast_1d(_to_numpy(item, f"{name}[{i}]", dtype))
        if arr.ndim != 1:
            raise MetricInputError(f"`{name}[{i}]` must be a 1-D array of per-token values, got shape {arr.shape}")
        out.append(arr)
    return out


def _same_length(**named: Sized) -> int:
    """The common length of the named inputs, or an error that lists every length."""
    lengths = {name: len(v) for name, v in named.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"`{k}`: {v}" for k, v in lengths.items())
        raise MetricInputError(f"inputs must hold one entry per item and have the same length; got {listed}")
    return next(iter(lengths.values()))


# --------------------------------------------------------------------------------------------------------------
# Likelihood-based TOFU metrics (spec §3.1a, §3.2)


def probability(nll_mean: ArrayOrTensor) -> np.ndarray:
    """Length-normalised answer probability ``P̄ = exp(-L̄)`` per item (spec §3.1a; ``*_Q_A_Prob``).

    Args:
        nll_mean: (N,) mean answer NLL ``L̄`` per item (answer tokens incl. EOS).

    Returns:
        (N,) geometric-mean token probability; the TOFU aggregate is its mean.
    """
    return np.exp(-_vector(nll_mean, "nll_mean"))


def _per_item_options(values: ArrayOrTensor, n_items: int, name: str) -> np.ndarray:
    """(N, K) view of per-item option values; a 1-D input is one option per item (K = 1)."""
    arr = _to_numpy(values, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != n_items:
        raise MetricInputError(
            f"`{name}` must have shape (N, K) with N = {n_items} items (one row of K perturbed answers per item), "
            f"got shape {arr.shape}"
        )
    return arr


def normalised_probability(correct_nll_mean: ArrayOrTensor, wrong_nll_mean: ArrayOrTensor) -> np.ndarray:
    """Probability of the correct answer normalised against the perturbed ones (spec §3.2; ra/wf sets).

    ``P̄(a) / (P̄(a) + Σ_j P̄(ã_j) + 1e-10)`` with ``P̄ = exp(-L̄)``.

    Args:
        correct_nll_mean: (N,) mean NLL of the correct answer ``a``.
        wrong_nll_mean: (N, K) mean NLL of each perturbed answer ``ã_j``.

    Returns:
        (N,) values in [0, 1]; ``*_Q_A_Prob_normalised`` is their mean.
    """
    correct = _vector(correct_nll_mean, "correct_nll_mean")
    wrong = _per_item_options(wrong_nll_mean, len(correct), "wrong_nll_mean")
    p_correct = np.exp(-correct)
    return p_correct / (p_correct + np.exp(-wrong).sum(axis=1) + TR_EPS)


def truth_ratio(para_nll_mean: ArrayOrTensor, pert_nll_mean: ArrayOrTensor) -> np.ndarray:
    """Per-item truth ratio as the reference code defines it: wrong over correct (spec §3.2, P-21).

    ``TR_i = exp(-(1/K) Σ_j L̄(ã_ij)) / (exp(-L̄(â_i)) + 1e-10)``: the geometric mean of the perturbed answers'
    length-normalised probabilities over the correct (paraphrased) answer's. A model that knows the answer has
    ``TR ≪ 1``; one that cannot tell correct from perturbed has ``TR ≈ 1``.

    Args:
        para_nll_mean: (N,) mean NLL of the correct answer ``â`` (``paraphrased_answer`` for forget/retain,
            ``answer`` for ra/wf).
        pert_nll_mean: (N, K) mean NLL of the K perturbed answers.

    Returns:
        (N,) raw truth ratios; these (not an aggregate) are what Forget Quality compares.
    """
    correct = _vector(para_nll_mean, "para_nll_mean")
    wrong = _per_item_options(pert_nll_mean, len(correct), "pert_nll_mean")
    # The reference averages the losses first, then exponentiates (a geometric mean of probabilities).
    return np.exp(-wrong.mean(axis=1)) / (np.exp(-correct) + TR_EPS)


def truth_ratio_forget_aggregate(tr: ArrayOrTensor) -> float:
    """``forget_truth_ratio``: mean of ``min(TR, 1/(TR + 1e-10))``, "closer_to_1_better" (spec §3.2).

    Args:
        tr: (N,) per-item truth ratios from :func:`truth_ratio`.

    Returns:
        A value in [0, 1]; 1 when correct and perturbed answers are equally likely for every item.
    """
    arr = _vector(tr, "tr")
    return float(np.mean(np.minimum(arr, 1.0 / (arr + TR_EPS))))


def truth_ratio_true_aggregate(tr: ArrayOrTensor) -> float:
    """``*_Truth_Ratio`` on retain/ra/wf: mean of ``max(0, 1 - TR)``, "true_better" (spec §3.2).

    Args:
        tr: (N,) per-item truth ratios from :func:`truth_ratio`.

    Returns:
        A value in [0, 1]; higher when the model prefers the correct answers.
    """
    arr = _vector(tr, "tr")
    return float(np.mean(np.maximum(0.0, 1.0 - arr)))


# --------------------------------------------------------------------------------------------------------------
# Generation and ROUGE (spec §3.1c)


def clean_generation(text: str, stop_strings: Sequence[str] = ()) -> str:
    """Cut a decoded generation at the first occurrence of each stop string, in order, then strip (spec §3.1c).

    Args:
        text: the decoded new tokens (special tokens already skipped).
        stop_strings: applied one after another; each keeps only the text before its first occurrence.

    Returns:
        The cleaned text.
    """
    for stop in stop_strings:
        if not stop:
            raise MetricInputError("`stop_strings` contains an empty string, which would cut every text; remove it")
        text = text.split(stop, 1)[0]
    return text.strip()


@functools.lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool) -> rouge_scorer.RougeScorer:
    # Building the scorer loads the Porter stemmer; reuse one per setting instead of one per item.
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=use_stemmer)


def rouge_scores(
    predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True
) -> dict[str, np.ndarray]:
    """ROUGE-1 recall, ROUGE-L recall and ROUGE-L F1 per item (spec §3.1c, P-22).

    Tokenisation is rouge_score's default (lower-case, non-alphanumerics to spaces, Porter stemming of tokens
    longer than 3 characters when ``use_stemmer``). ROUGE-L recall = LCS / |reference tokens|, F1 = harmonic mean
    of LCS/|prediction| and LCS/|reference|.

    Args:
        predictions: N generated texts, already cleaned with :func:`clean_generation`.
        references: N ground-truth texts.
        use_stemmer: True for open-unlearning (TOFU and MUSE); False reproduces the original MUSE code.

    Returns:
        ``{"rouge1_recall", "rougeL_recall", "rougeL_f1"}``, each (N,). TOFU reports the mean of
        ``rougeL_recall``, MUSE the mean of ``rougeL_f1``.
    """
    n = _same_length(predictions=predictions, references=references)
    scorer = _rouge_scorer(bool(use_stemmer))
    out = {key: np.empty(n, dtype=np.float64) for key in ("rouge1_recall", "rougeL_recall", "rougeL_f1")}
    for i, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        scores = scorer.score(target=reference, prediction=prediction)
        out["rouge1_recall"][i] = scores["rouge1"].recall
        out["rougeL_recall"][i] = scores["rougeL"].recall
        out["rougeL_f1"][i] = scores["rougeL"].fmeasure
    return out


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> np.ndarray:
    """ROUGE-L recall per item (TOFU ``*_Q_A_ROUGE``); see :func:`rouge_scores`.

    Args:
        predictions: N generated texts.
        references: N ground-truth texts.
        use_stemmer: Porter stemming as in open-unlearning.

    Returns:
        (N,) LCS / |reference tokens|.
    """
    return rouge_scores(predictions, references, use_stemmer)["rougeL_recall"]


# --------------------------------------------------------------------------------------------------------------
# Forget Quality and Model Utility (spec §3.3, §3.4)


def forget_quality(tr_model: ArrayOrTensor, tr_retain: ArrayOrTensor) -> float:
    """Forget Quality: two-sided two-sample Kolmogorov–Smirnov p-value (spec §3.4, P-20).

    ``scipy.stats.ks_2samp(tr_model, tr_retain).pvalue`` with the default ``method="auto"`` (exact for TOFU's
    sample sizes). Compare raw per-item truth ratios, not aggregates. KS is invariant to monotone transforms, so
    TOFU-legacy's test on ``1/TR`` gives the same value.

    Args:
        tr_model: (N,) per-item forget truth ratios of the evaluated model.
        tr_retain: (M,) the same of the retain model, produced by the same evaluation code path.

    Returns:
        The p-value in [0, 1]; 1.0 for a sample compared with itself.
    """
    a = _vector(tr_model, "tr_model")
    b = _vector(tr_retain, "tr_retain")
    for name, arr in (("tr_model", a), ("tr_retain", b)):
        if arr.size == 0:
            raise MetricInputError(
                f"forget_quality needs per-item truth ratios of both models, but `{name}` is empty; pass the "
                "forget-set truth ratios (the retain model's come from its eval log)"
            )
    return float(scipy.stats.ks_2samp(a, b).pvalue)


def model_utility(values: Mapping[str, float]) -> float:
    """Model Utility: harmonic mean of the nine TOFU utility aggregates (spec §3.3).

    ``MU = HM(values[k] for k in MODEL_UTILITY_KEYS)`` via ``scipy.stats.hmean``; any zero gives 0. Extra keys in
    ``values`` are ignored, so a full metrics dict can be passed.

    Args:
        values: maps each name of :data:`MODEL_UTILITY_KEYS` to its aggregate.

    Returns:
        The harmonic mean.
    """
    missing = [key for key in MODEL_UTILITY_KEYS if key not in values]
    if missing:
        raise MetricInputError(
            f"model_utility is missing {len(missing)} of its nine inputs: {', '.join(missing)}; evaluate them on "
            "retain_perturbed, real_authors_perturbed and world_facts_perturbed first"
        )
    picked = np.array([float(values[key]) for key in MODEL_UTILITY_KEYS], dtype=np.float64)
    negative = [f"{key}={v}" for key, v in zip(MODEL_UTILITY_KEYS, picked, strict=True) if v < 0]
    if negative:
        raise MetricInputError(f"model_utility inputs must be >= 0, got {', '.join(negative)}")
    if np.any(picked == 0):
        return 0.0
    return float(scipy.stats.hmean(picked))


# --------------------------------------------------------------------------------------------------------------
# Memorisation (spec §3.5)


def _pairs(pred_ids: Sequence[ArrayOrTensor], target_ids: Sequence[ArrayOrTensor]) -> list[tuple[np.ndarray, ...]]:
    _same_length(pred_ids=pred_ids, target_ids=target_ids)
    preds = _ragged(pred_ids, "pred_ids", np.int64)
    targets = _ragged(target_ids, "target_ids", np.int64)
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        if p.shape != t.shape:
            raise MetricInputError(
                f"item {i}: `pred_ids` has {p.size} tokens but `target_ids` has {t.size}; both must cover the same "
                "answer positions"
            )
    return list(zip(preds, targets, strict=True))


def exact_memorization(pred_ids: Sequence[ArrayOrTensor], target_ids: Sequence[ArrayOrTensor]) -> np.ndarray:
    """Exact Memorisation per item: fraction of positions whose teacher-forced argmax equals the target (§3.5).

    ``EM = (1/n) Σ_t 1[ŷ_t = y_t]`` over the answer positions excluding the last labelled token (the caller
    passes them already cut).

    Args:
        pred_ids: N 1-D arrays of argmax predictions, one per item (lengths may differ).
        target_ids: N 1-D arrays of target token ids, same lengths as ``pred_ids``.

    Returns:
        (N,) values in [0, 1]; NaN for an item with no position (the reference stores None and leaves the row
        out of the mean, P-16), so aggregate with ``np.nanmean``.
    """
    return np.array(
        [float(np.mean(p == t)) if p.size else math.nan for p, t in _pairs(pred_ids, target_ids)], dtype=np.float64
    )


def extraction_strength(pred_ids: Sequence[ArrayOrTensor], target_ids: Sequence[ArrayOrTensor]) -> np.ndarray:
    """Extraction Strength per item, teacher-forced, with the reference's floor (spec §3.5, P-18).

    ``ES = 1 - k*/n`` where ``k*`` is the smallest ``k ∈ {0, …, n-1}`` such that the suffix ``ŷ[k:]`` equals
    ``y[k:]``. As in the reference loop, when no suffix matches (the last position is wrong) ``k* = n-1`` and
    ``ES = 1/n``, not 0. An item with no position gives 0.

    Args:
        pred_ids: N 1-D arrays of argmax predictions over the answer positions excluding the last labelled token.
        target_ids: N 1-D arrays of target ids, same lengths.

    Returns:
        (N,) values in [0, 1]; the aggregate is their plain mean.
    """
    out = np.empty(len(pred_ids), dtype=np.float64)
    for i, (p, t) in enumerate(_pairs(pred_ids, target_ids)):
        n = p.size
        if n == 0:
            out[i] = 0.0
            continue
        mismatches = np.flatnonzero(p != t)
        # The longest matching suffix starts right after the last mismatch; the reference loop stops at n-1.
        k = 0 if mismatches.size == 0 else min(int(mismatches[-1]) + 1, n - 1)
        out[i] = 1.0 - k / n
    return out


# --------------------------------------------------------------------------------------------------------------
# Membership-inference attacks (spec §3.6)


def mia_loss(nll_mean: ArrayOrTensor) -> np.ndarray:
    """LOSS attack score per item: the mean answer NLL ``L̄`` (incl. EOS); higher = less likely a member (§3.6).

    Args:
        nll_mean: (N,) mean NLL per item.

    Returns:
        (N,) scores.
    """
    return _vector(nll_mean, "nll_mean").copy()


def mia_zlib(nll_mean: ArrayOrTensor, texts: Sequence[str]) -> np.ndarray:
    """ZLib attack score per item: ``L̄ / len(zlib.compress(text.encode("utf-8")))`` (spec §3.6).

    Args:
        nll_mean: (N,) mean NLL per item.
        texts: N answer texts (decode of the labelled tokens, special tokens skipped).

    Returns:
        (N,) scores; the length is in compressed bytes at zlib's default level.
    """
    nll = _vector(nll_mean, "nll_mean")
    _same_length(nll_mean=nll, texts=texts)
    sizes = np.array([len(zlib.compress(text.encode("utf-8"))) for text in texts], dtype=np.float64)
    return nll / sizes


def _check_k(k: float) -> None:
    if not 0.0 < k <= 1.0:
        raise MetricInputError(f"MinK fraction `k` must be in (0, 1], got {k}; the reference uses k=0.4")


def _bottom_k_score(values: np.ndarray, k: float) -> float:
    """``-mean`` of the ``max(1, floor(k·n))`` smallest values; 0 for an empty item (reference behaviour)."""
    n = values.size
    if n == 0:
        return 0.0
    # int(n * k), not math.floor, to round exactly as the reference does for products like 0.4 * 5.
    num_k = max(1, int(n * k))
    return float(-np.mean(np.sort(values)[:num_k]))


def mia_min_k(token_logps_list: Sequence[ArrayOrTensor], k: float = 0.4) -> np.ndarray:
    """Min-K% Prob attack score per item (spec §3.6).

    ``-mean`` of the ``max(1, floor(k·n))`` smallest token log-probs ``ℓ_t``; 0 when ``n = 0``.

    Args:
        token_logps_list: N 1-D arrays of ``log p(y_t | x_<t)`` over the answer positions excluding the last
            labelled token.
        k: fraction of lowest-probability tokens kept.

    Returns:
        (N,) scores; PrivLeak is computed from this attack's AUC.
    """
    _check_k(k)
    return np.array([_bottom_k_score(lp, k) for lp in _ragged(token_logps_list, "token_logps_list")])


def mia_min_k_plus_plus(
    token_logps_list: Sequence[ArrayOrTensor],
    mu_list: Sequence[ArrayOrTensor],
    sigma2_list: Sequence[ArrayOrTensor],
    k: float = 0.4,
) -> np.ndarray:
    """Min-K%++ attack score per item (spec §3.6).

    ``z_t = (ℓ_t - μ_t) / sqrt(max(σ²_t, 1e-6))`` and score ``= -mean`` of the ``max(1, floor(k·n))`` smallest
    ``z_t``; 0 when ``n = 0``. ``μ_t, σ²_t`` are the mean and variance of ``log p`` under the model's own
    next-token distribution at position t (see :func:`min_k_plus_plus_stats`).

    Args:
        token_logps_list: N 1-D arrays of target-token log-probs ``ℓ_t``.
        mu_list: N 1-D arrays ``μ_t``, same lengths.
        sigma2_list: N 1-D arrays ``σ²_t``, same lengths.
        k: fraction of lowest z-scores kept.

    Returns:
        (N,) scores.
    """
    _check_k(k)
    _same_length(token_logps_list=token_logps_list, mu_list=mu_list, sigma2_list=sigma2_list)
    logps = _ragged(token_logps_list, "token_logps_list")
    mus = _ragged(mu_list, "mu_list")
    sigma2s = _ragged(sigma2_list, "sigma2_list")
    out = np.empty(len(logps), dtype=np.float64)
    for i, (lp, mu, s2) in enumerate(zip(logps, mus, sigma2s, strict=True)):
        if not lp.shape == mu.shape == s2.shape:
            raise MetricInputError(
                f"item {i}: token_logps ({lp.size}), mu ({mu.size}) and sigma2 ({s2.size}) must cover the same "
                "positions"
            )
        z = (lp - mu) / np.sqrt(np.maximum(s2, MINKPP_VAR_FLOOR))
        out[i] = _bottom_k_score(z, k)
    return out


def min_k_plus_plus_stats(
    vocab_logps: Tensor, from_logits: bool = False, chunk_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``log p`` under the next-token distribution, per position, in fp32 (spec §3.6).

    ``μ_t = Σ_v p_v log p_v`` and ``σ²_t = max(Σ_v p_v (log p_v - μ_t)², 1e-6)``. The centred form equals the
    reference's ``Σ_v p_v (log p_v)² - μ_t²`` in exact arithmetic and avoids its cancellation. Positions are
    processed ``chunk_size`` rows at a time, so a caller can pass logits straight from the model and never hold
    a second full-size fp32 (…, V) tensor.

    Args:
        vocab_logps: (..., V) log-softmax rows, or raw logits when ``from_logits``; any float dtype, any device.
        from_logits: normalise with ``log_softmax`` first.
        chunk_size: rows per chunk.

    Returns:
        ``(mu, sigma2)``, each (...) fp32 on the input's device.
    """
    if chunk_size < 1:
        raise MetricInputError(f"`chunk_size` must be >= 1, got {chunk_size}")
    lead_shape = vocab_logps.shape[:-1]
    rows = vocab_logps.reshape(-1, vocab_logps.shape[-1])
    mus, sigma2s = [], []
    with torch.no_grad():
        for chunk in rows.split(chunk_size):
            logp = chunk.float()
            if from_logits:
                logp = torch.log_softmax(logp, dim=-1)
            p = logp.exp()
            # A -inf log-prob (masked vocabulary entry) has p = 0 and must contribute 0, not 0 * inf = NaN.
            finite = torch.isfinite(logp)
            safe_logp = torch.where(finite, logp, torch.zeros_like(logp))
            mu = (p * safe_logp).sum(-1)
            centred = torch.where(finite, safe_logp - mu.unsqueeze(-1), torch.zeros_like(logp))
            sigma2 = (p * centred.square()).sum(-1).clamp_min(MINKPP_VAR_FLOOR)
            mus.append(mu)
            sigma2s.append(sigma2)
    if not mus:  # zero positions
        empty = torch.zeros(lead_shape, dtype=torch.float32, device=vocab_logps.device)
        return empty, empty.clone()
    return torch.cat(mus).reshape(lead_shape), torch.cat(sigma2s).reshape(lead_shape)


def mia_auc(member_scores: ArrayOrTensor, nonmember_scores: ArrayOrTensor) -> float:
    """ROC AUC of an attack, open-unlearning convention (spec §3.6).

    ``roc_auc_score`` with label 0 = member (forget) and 1 = non-member (holdout), i.e.
    ``P(score_nonmember > score_member)`` with ties counted ½. AUC ≈ 1: forget data far more likely than holdout
    (memorised); ≈ 0.5: indistinguishable.

    Args:
        member_scores: (N_f,) attack scores of the forget items.
        nonmember_scores: (N_h,) attack scores of the holdout items.

    Returns:
        The AUC in [0, 1].
    """
    members = _vector(member_scores, "member_scores")
    nonmembers = _vector(nonmember_scores, "nonmember_scores")
    for name, arr in (("member_scores", members), ("nonmember_scores", nonmembers)):
        if arr.size == 0:
            raise MetricInputError(f"mia_auc needs at least one score on each side, but `{name}` is empty")
        if not np.all(np.isfinite(arr)):
            raise MetricInputError(f"`{name}` contains NaN or inf at items {np.flatnonzero(~np.isfinite(arr))}")
    labels = np.concatenate([np.zeros(members.size), np.ones(nonmembers.size)])
    return float(sklearn.metrics.roc_auc_score(labels, np.concatenate([members, nonmembers])))


def rel_diff(value_model: float, value_retain: float) -> float:
    """Relative difference in percent: ``(x_model - x_retain) / (x_retain + 1e-10) × 100`` (spec §3.6).

    Args:
        value_model: the evaluated model's value.
        value_retain: the retain model's value.

    Returns:
        The difference in percent of the retain value.
    """
    return (float(value_model) - float(value_retain)) / (float(value_retain) + TR_EPS) * 100.0


def privleak(auc_model: float, auc_retain: float | None = None) -> float:
    """PrivLeak from MinK AUCs, MUSE's complement convention (spec §3.6, P-23).

    ``((1 - AUC_m) - (1 - AUC_r)) / ((1 - AUC_r) + 1e-10) × 100``; ``AUC_r = 0.5`` when no retain log is given
    (how the reference scores the retain models themselves). Ideal 0; a fully memorising model (AUC 1) gives
    -100.

    Args:
        auc_model: :func:`mia_auc` of :func:`mia_min_k` scores for the evaluated model.
        auc_retain: the same for the retain model, or None.

    Returns:
        PrivLeak in percent.
    """
    reference = 0.5 if auc_retain is None else float(auc_retain)
    return rel_diff(1.0 - float(auc_model), 1.0 - reference)


# --------------------------------------------------------------------------------------------------------------
# Forgetting synchrony (new in this project; what BalDRO claims to improve)


def forgotten_by_truth_ratio(
    tr: ArrayOrTensor, retain_tr: ArrayOrTensor, quantiles: tuple[float, float] = (0.05, 0.95)
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample "forgotten" and "over-forgotten" flags from truth ratios, relative to the retain model.

    Criterion: let ``[q_lo, q_hi]`` be the ``quantiles`` of the retain model's per-item truth ratios on the same
    forget set (a model that never saw these samples). Truth ratio here is wrong/correct (spec §3.2): a model
    that knows an answer has ``TR ≪ 1`` and forgetting raises it. A sample counts as

    - **forgotten** at an evaluation when ``TR ≥ q_lo``: it has risen into the retain model's range (or past it);
    - **over-forgotten** when ``TR > q_hi``: it now prefers the perturbed answers more than almost any sample does
      for the retain model, i.e. unlearning overshot what a never-trained model shows.

    Over-forgotten samples are also forgotten. A NaN truth ratio is neither. A sample whose truth ratio is
    already ``≥ q_lo`` before unlearning (the original model never knew it well) counts as forgotten from the
    first evaluation; evaluate at step 0 to see how many such samples there are.

    Args:
        tr: (E, N) per-item forget truth ratios of the model at E evaluations (a 1-D input is one evaluation).
        retain_tr: (M,) the retain model's per-item forget truth ratios.
        quantiles: ``(lo, hi)`` with ``0 ≤ lo < hi ≤ 1``; numpy's default linear interpolation.

    Returns:
        ``(forgotten, over_forgotten)``, boolean arrays shaped like ``tr``.
    """
    lo, hi = quantiles
    if not 0.0 <= lo < hi <= 1.0:
        raise MetricInputError(f"`quantiles` must satisfy 0 <= lo < hi <= 1, got {quantiles}")
    ref = _vector(retain_tr, "retain_tr")
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        raise MetricInputError("`retain_tr` holds no finite truth ratio; pass the retain model's per-item values")
    q_lo, q_hi = np.quantile(ref, [lo, hi])
    values = _to_numpy(tr, "tr")
    with np.errstate(invalid="ignore"):
        return values >= q_lo, values > q_hi


def forget_steps(
    values: ArrayOrTensor,
    steps: ArrayOrTensor,
    forgotten: Callable[[np.ndarray], np.ndarray] | ArrayOrTensor,
    persistent: bool = False,
) -> np.ndarray:
    """Per-sample training step at which the sample first counts as forgotten.

    Args:
        values: (E, N) a per-sample metric at each of E evaluations (e.g. truth ratios); only used when
            ``forgotten`` is a callable.
        steps: (E,) the training step of each evaluation, non-decreasing.
        forgotten: either a callable mapping ``values`` (E, N) to a boolean (E, N) matrix, or that boolean matrix
            (e.g. the first output of :func:`forgotten_by_truth_ratio`).
        persistent: if True, the step from which the sample stays forgotten through the last evaluation, so a
            sample that is forgotten and then recovers does not count from its first crossing.

    Returns:
        (N,) fp64 steps; NaN for a sample that is never forgotten (or, with ``persistent``, not forgotten at the
        last evaluation).
    """
    step_arr = _vector(steps, "steps")
    if np.any(np.diff(step_arr) < 0):
        raise MetricInputError(f"`steps` must be non-decreasing (one entry per evaluation, in order), got {step_arr}")
    mask = forgotten(_to_numpy(values, "values")) if callable(forgotten) else forgotten
    mask = _to_numpy(mask, "forgotten", bool)
    if mask.ndim != 2 or mask.shape[0] != step_arr.size:
        raise MetricInputError(
            f"the forgotten matrix must have shape (E, N) with E = {step_arr.size} evaluations (one per entry of "
            f"`steps`), got shape {mask.shape}"
        )
    if persistent:
        # Reverse cumulative AND: True where the sample is forgotten at this and every later evaluation.
        mask = np.flip(np.logical_and.accumulate(np.flip(mask, axis=0), axis=0), axis=0)
    first = mask.argmax(axis=0)
    return np.where(mask.any(axis=0), step_arr[first], np.nan)


def synchrony_summary(forget_step: ArrayOrTensor, over_forgotten_mask: ArrayOrTensor) -> dict[str, float]:
    """How synchronously samples are forgotten: spread of the per-sample forget steps.

    Spread statistics are over the samples that are forgotten at some evaluation (finite ``forget_step``); a
    lower spread means samples cross the threshold together (BalDRO's claim). ``forget_step_iqr`` is the 75th
    minus the 25th percentile (numpy linear interpolation), ``forget_step_std`` the population standard deviation
    (ddof 0). Each spread value is NaN when no sample is forgotten.

    Args:
        forget_step: (N,) from :func:`forget_steps`, NaN = never forgotten.
        over_forgotten_mask: (N,) boolean per sample, e.g. ``over_forgotten[-1]`` (over-forgotten at the final
            evaluation) or ``over_forgotten.any(0)`` from :func:`forgotten_by_truth_ratio`; the caller picks and
            reports which.

    Returns:
        ``forget_step_iqr``, ``forget_step_std``, ``forget_step_median``, ``fraction_never_forgotten``,
        ``fraction_over_forgotten``.
    """
    step = _vector(forget_step, "forget_step")
    over = np.atleast_1d(_to_numpy(over_forgotten_mask, "over_forgotten_mask", bool))
    if over.shape != step.shape:
        raise MetricInputError(
            f"`over_forgotten_mask` must be (N,) like `forget_step` {step.shape}, got {over.shape}; reduce an (E, N) "
            "matrix first, e.g. `over[-1]` for the final evaluation"
        )
    if step.size == 0:
        raise MetricInputError("synchrony_summary needs at least one sample; `forget_step` is empty")
    done = step[np.isfinite(step)]
    if done.size:
        q25, median, q75 = np.percentile(done, [25, 50, 75])
        iqr, std = float(q75 - q25), float(np.std(done))
    else:
        iqr = std = median = math.nan
    return {
        "forget_step_iqr": iqr,
        "forget_step_std": std,
        "forget_step_median": float(median),
        "fraction_never_forgotten": float(np.mean(~np.isfinite(step))),
        "fraction_over_forgotten": float(np.mean(over)),
    }


ForgetDirection: TypeAlias = Literal["up", "down"]
"""Which way a per-sample value moves as the sample is forgotten: truth ratio ``up``; ROUGE and the log-likelihood
ratio to the model before unlearning ``down``."""


def retain_level(retain_values: ArrayOrTensor, quantile: float = 0.5) -> float:
    """Where the retain model is: the ``quantile`` of its per-sample values on the same forget set (NaN ignored).

    The default, the median, is the typical value of a model that never saw the samples. Use it as the ``level`` of
    :func:`forget_steps_from_start` (a low quantile such as the 5th percentile counts a sample as forgotten when it
    is barely inside the retain model's range, which most samples of a real TOFU model are before any update).

    Raises:
        MetricInputError: ``quantile`` is outside [0, 1], or ``retain_values`` holds no finite value.
    """
    if not 0.0 <= quantile <= 1.0:
        raise MetricInputError(f"`quantile` must be in [0, 1], got {quantile}")
    ref = _vector(retain_values, "retain_values")
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        raise MetricInputError("`retain_values` holds no finite value; pass the retain model's per-sample values")
    return float(np.quantile(ref, quantile))


def past_level(values: ArrayOrTensor, level: ArrayOrTensor, direction: ForgetDirection) -> np.ndarray:
    """Boolean, shaped like ``values``: at or past ``level`` in the forgetting ``direction`` (NaN is never past).

    Args:
        values: (E, N) or (N,) per-sample values.
        level: a scalar, or (N,) per-sample levels (e.g. the retain model's own value of each sample).
        direction: ``up``: ``value >= level``; ``down``: ``value <= level``.
    """
    if direction not in ("up", "down"):
        raise MetricInputError(f"`direction` must be 'up' or 'down', got {direction!r}")
    arr, lvl = _to_numpy(values, "values"), _to_numpy(level, "level")
    if lvl.ndim > 1 or (lvl.ndim == 1 and lvl.shape[0] != arr.shape[-1]):
        raise MetricInputError(
            f"`level` must be a scalar or one value per sample ({arr.shape[-1]}), got shape {lvl.shape}"
        )
    with np.errstate(invalid="ignore"):
        return arr >= lvl if direction == "up" else arr <= lvl


class ForgetStepsFromStart(NamedTuple):
    """Per-sample forget steps counted from each sample's own start (:func:`forget_steps_from_start`)."""

    step: np.ndarray
    """(N,) fp64 training step at which the sample reached the level after starting short of it; NaN for a sample
    that never did and for one that was already past the level at the first evaluation."""
    forgotten_at_start: np.ndarray
    """(N,) bool: already at or past the level at the first evaluation (it cannot show when it was forgotten)."""


def forget_steps_from_start(
    values: ArrayOrTensor,
    steps: ArrayOrTensor,
    level: ArrayOrTensor,
    direction: ForgetDirection = "up",
    persistent: bool = False,
) -> ForgetStepsFromStart:
    """Each sample's forget step: the first evaluation at which it has moved from where it started to the retain level.

    A sample is forgotten once its value is at or past ``level`` in the forgetting ``direction``. A sample that is
    already past it at the first evaluation (step 0, before any update) looks forgotten without having moved: it
    gets no step and is flagged, so that spread statistics describe samples that were seen remembered and then
    forgotten. Examples: truth ratio, ``direction="up"``, ``level=retain_level(retain_tr)`` (it crosses the retain
    model's median after starting below it); ROUGE-L recall, ``"down"``, the retain model's median ROUGE; the
    log-likelihood ratio to step 0 (``nll_0 - nll``, 0 at the start), ``"down"``, with per-sample levels
    ``nll_0 - retain_nll`` (each sample's NLL has risen to the retain model's NLL on it).

    Args:
        values: (E, N) per-sample values at E evaluations; the first evaluation is the start.
        steps: (E,) the training step of each evaluation, non-decreasing.
        level: a scalar or (N,) per-sample levels.
        direction: which way forgetting moves the value.
        persistent: count the step from which the sample stays past the level through the last evaluation.

    Returns:
        :class:`ForgetStepsFromStart`.
    """
    arr = _to_numpy(values, "values")
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise MetricInputError(f"`values` must be (E, N) with at least one evaluation, got shape {arr.shape}")
    forgotten = past_level(arr, level, direction)
    at_start = forgotten[0].copy()
    step = forget_steps(arr, steps, forgotten, persistent=persistent)
    return ForgetStepsFromStart(step=np.where(at_start, np.nan, step), forgotten_at_start=at_start)


def synchrony_summary_from_start(
    forget_step: ArrayOrTensor, forgotten_at_start: ArrayOrTensor, over_forgotten_mask: ArrayOrTensor | None = None
) -> dict[str, float]:
    """How synchronously the samples that were remembered at the start are forgotten.

    Spread statistics are over the samples that started short of the level and reached it (finite ``forget_step``
    and not ``forgotten_at_start``); samples already past the level at the start are counted in
    ``fraction_forgotten_at_start`` and nowhere else. The three fractions ``fraction_forgotten_at_start``,
    ``fraction_forgotten_later`` and ``fraction_never_forgotten`` are of all samples and add up to 1. IQR and std as
    in :func:`synchrony_summary` (numpy linear percentiles, population std); NaN when no sample moved.

    Args:
        forget_step: (N,) from :func:`forget_steps_from_start` (NaN: never forgotten, or forgotten at the start).
        forgotten_at_start: (N,) bool from :func:`forget_steps_from_start`.
        over_forgotten_mask: optional (N,) bool (e.g. over-forgotten at the final evaluation); adds
            ``fraction_over_forgotten``.

    Returns:
        ``forget_step_iqr``, ``forget_step_std``, ``forget_step_median``, ``fraction_forgotten_at_start``,
        ``fraction_forgotten_later``, ``fraction_never_forgotten`` and, with a mask, ``fraction_over_forgotten``.
    """
    step = _vector(forget_step, "forget_step")
    at_start = np.atleast_1d(_to_numpy(forgotten_at_start, "forgotten_at_start", bool))
    if at_start.shape != step.shape:
        raise MetricInputError(
            f"`forgotten_at_start` must be (N,) like `forget_step` {step.shape}, got {at_start.shape}"
        )
    moved = np.isfinite(step) & ~at_start
    # synchrony_summary gives the spread of the finite steps; the at-start samples are taken out first.
    summary = synchrony_summary(np.where(moved, step, np.nan), np.zeros(step.shape, dtype=bool))
    summary.pop("fraction_over_forgotten")
    summary["fraction_forgotten_at_start"] = float(np.mean(at_start))
    summary["fraction_forgotten_later"] = float(np.mean(moved))
    summary["fraction_never_forgotten"] = float(np.mean(~moved & ~at_start))
    if over_forgotten_mask is not None:
        over = np.atleast_1d(_to_numpy(over_forgotten_mask, "over_forgotten_mask", bool))
        if over.shape != step.shape:
            raise MetricInputError(
                f"`over_forgotten_mask` must be (N,) like `forget_step` {step.shape}, got {over.shape}"
            )
        summary["fraction_over_forgotten"] = float(np.mean(over))
    return summary


def forgetting_balance(log_ppl_ratio: ArrayOrTensor, bottom: float = 0.1) -> dict[str, float]:
    """How evenly the forget samples have been forgotten at one evaluation (a continuous view of synchrony).

    A sample's forgetting is its log perplexity ratio to the model before unlearning, ``NLL_now - NLL_before``
    (mean NLL per answer token; the negated ``log_likelihood_ratio`` of the per-sample curves). Unlike the forget
    step, it needs no threshold, and samples the threshold never catches still count.

    Args:
        log_ppl_ratio: (N,) per-sample forgetting.
        bottom: the fraction of least-forgotten samples whose share is reported.

    Returns:
        ``forgetting_mean``, ``forgetting_std`` (population, ddof 0), ``forgetting_cv`` (std / mean; NaN unless
        the mean is positive) and ``forgetting_bottom_share``: the mean forgetting of the ``bottom`` fraction
        of least-forgotten samples (at least one) over the overall mean (1 = perfectly even; NaN unless the mean
        is positive). Smaller CV and a bottom share nearer 1 mean more balanced forgetting.
    """
    values = _vector(log_ppl_ratio, "log_ppl_ratio")
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise MetricInputError(f"forgetting_balance needs finite per-sample values, got {values.size} with NaN/inf")
    if not 0.0 < bottom <= 1.0:
        raise MetricInputError(f"`bottom` must be a fraction in (0, 1], got {bottom}")
    mean, std = float(values.mean()), float(values.std())
    lowest = np.sort(values)[: max(1, math.floor(bottom * values.size))]
    positive = mean > 0
    return {
        "forgetting_mean": mean,
        "forgetting_std": std,
        "forgetting_cv": std / mean if positive else math.nan,
        "forgetting_bottom_share": float(lowest.mean()) / mean if positive else math.nan,
    }


def at_first_crossing(progress: ArrayOrTensor, values: ArrayOrTensor, level: float) -> float:
    """``values`` at the point where ``progress`` first reaches ``level``, interpolated between evaluations.

    Compares runs that forget at different speeds at equal progress: along one run's evaluations (E,), e.g. the
    std of per-sample forgetting where the mean forgetting first reaches a level, or the model utility where the
    drop in forget-set memorisation does. The value is interpolated linearly between the two evaluations that
    bracket the first crossing.

    Returns:
        The interpolated value; NaN when ``progress`` never reaches ``level``.
    """
    progress_arr, value_arr = _vector(progress, "progress"), _vector(values, "values")
    _same_length(progress=progress_arr, values=value_arr)
    reached = np.flatnonzero(progress_arr >= level)
    if reached.size == 0:
        return math.nan
    e = int(reached[0])
    if e == 0:
        return float(value_arr[0])
    p0, p1 = progress_arr[e - 1], progress_arr[e]
    t = (level - p0) / (p1 - p0)
    return float(value_arr[e - 1] + t * (value_arr[e] - value_arr[e - 1]))
