"""The prompt-cache engine: shared-prefix scoring and verified-draft greedy decoding equal the per-example path.

Values are compared on the tiny model with its matrices redrawn 10x wider (so that greedy answers differ from row to
row): per-item likelihoods within 1e-5, token statistics within 1e-5, argmax predictions and every generation
identical. The planning functions are checked on hand-made inputs.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from baldro_lightning.data.tokenization import PromptTemplate, encode_example, encode_prompt, load_tokenizer
from baldro_lightning.evaluation import greedy, model_calls, prefix_scoring
from baldro_lightning.evaluation.engine import (
    AnswerExample,
    ExampleScore,
    collector_paused,
    generate_answers,
    score_examples,
)
from baldro_lightning.evaluation.greedy import Draft, draft_of, greedy_generate, verified_tokens
from baldro_lightning.evaluation.model_calls import ModelCalls, prompt_cache_problem
from baldro_lightning.evaluation.prefix_scoring import batch_bounds, plan_chunk, prefix_cut, score_groups
from baldro_lightning.evaluation.tofu import TofuEvaluator, TofuSettings
from baldro_lightning.train.models import load_causal_lm

TOLERANCE = 1e-5
NEW_TOKENS = 8


def example(ids: list[int], first_label: int, token_stats: bool = False, draft: bool = False) -> AnswerExample:
    labels = [-100] * first_label + ids[first_label:]
    return AnswerExample(ids, labels, token_stats=token_stats, draft=draft)


# -- planning ---------------------------------------------------------------------------------------------------
def test_prefix_cut_stops_at_the_first_target_or_divergence():
    """[1,5,6,7,2] and [1,5,6,9,9,2], labels from 3: shared 3 tokens, first target 3 -> cut min(3, 3) = 3."""
    assert prefix_cut([example([1, 5, 6, 7, 2], 3), example([1, 5, 6, 9, 9, 2], 3)]) == 3
    # The ids part at position 2 (a token merged across the prompt border): cut 2.
    assert prefix_cut([example([1, 5, 6, 7, 2], 3), example([1, 5, 8, 9, 2], 3)]) == 2
    # The first target comes before the ids part: cut at it.
    assert prefix_cut([example([1, 5, 6], 1), example([1, 5, 7], 1)]) == 1
    # One example shares nothing.
    assert prefix_cut([example([1, 5, 6, 7, 2], 3)]) == 0


def test_plan_computes_each_shared_stretch_once_and_parents_first():
    """Labels from 3, so the prompt segment is [1, 5, 6] (cut 3). From position 3 the first two share
    [7, 8, 9, 10] (4 tokens: one segment), then end in [11, 2] and [12, 2]; the third is [13, 2]. Nodes:
    3 + 4 + 2 + 2 + 2 = 13 instead of 9 + 9 + 5 = 23."""
    group = [
        example([1, 5, 6, 7, 8, 9, 10, 11, 2], 3),
        example([1, 5, 6, 7, 8, 9, 10, 12, 2], 3),
        example([1, 5, 6, 13, 2], 3),
    ]
    plan = plan_chunk([group], [0], batch_size=2, min_shared=4)
    assert sorted(seg.tokens for seg in plan.segments) == [[1, 5, 6], [7, 8, 9, 10], [11, 2], [12, 2], [13, 2]]
    assert plan.node_count - 1 == 13
    assert [seg.logits for seg in plan.segments] == [False, True, True, True, True]
    token_of = {int(n): t for seg in plan.segments for n, t in zip(seg.nodes, seg.tokens, strict=True)}
    assert sorted(token_of) == list(range(1, plan.node_count))  # every node computed exactly once
    for k, ex in enumerate(group):
        assert [token_of[int(n)] for n in plan.paths[(0, k)]] == ex.input_ids
    # A leaf answer's last token is not run; the prompt and the shared stretch run whole.
    run = {tuple(seg.tokens): seg.run_length for seg in plan.segments}
    assert run == {(1, 5, 6): 3, (7, 8, 9, 10): 4, (11, 2): 1, (12, 2): 1, (13, 2): 1}
    done: set[int] = set()
    for batch in plan.batches:
        assert all(set(plan.segments[s].past.tolist()) <= done for s in batch)  # its past ran in an earlier forward
        done |= {int(n) for s in batch for n in plan.segments[s].nodes[: plan.segments[s].run_length]}
    # With no sharing below the prompt (min_shared beyond every answer) each answer is its own segment.
    alone = plan_chunk([group], [0], batch_size=2, min_shared=100)
    assert alone.node_count - 1 == 3 + 6 + 6 + 2


def test_one_token_leaves_run_in_no_forward():
    """Two answers share [7, 8, 9, 10] after the prompt [1, 5, 6] and differ only in their last token: each ends in
    a one-token leaf, which runs nothing (its log-probability is read after the shared stretch)."""
    group = [example([1, 5, 6, 7, 8, 9, 10, 2], 3), example([1, 5, 6, 7, 8, 9, 10, 3], 3)]
    plan = plan_chunk([group], [0], batch_size=2, min_shared=4)
    assert sorted(seg.tokens for seg in plan.segments) == [[1, 5, 6], [2], [3], [7, 8, 9, 10]]
    assert sorted(plan.segments[s].tokens for batch in plan.batches for s in batch) == [[1, 5, 6], [7, 8, 9, 10]]


def test_batch_bounds_weigh_padding_against_a_forward():
    """The docstring's cases: [10, 9, 2, 2] make one forward (40 + 32 < 20 + 4 + 64); [100, 2, 2, 2] two."""
    big = 10**6
    assert batch_bounds([10, 9, 2, 2], [10, 9, 2, 2], big) == [(0, 4)]
    assert batch_bounds([100, 2, 2, 2], [100, 2, 2, 2], big) == [(0, 1), (1, 4)]
    # The budget of key/value slots caps a forward's rows: 3 rows spanning 10 need 30 > 25.
    bounds = batch_bounds([10, 10, 10], [10, 10, 10], 25)
    assert len(bounds) == 2 and all(j - i <= 2 for i, j in bounds)
    assert batch_bounds([5], [50], 10) == [(0, 1)]  # a row wider than the budget still runs, alone


def test_verified_tokens_follow_the_argmax_until_the_draft_departs_or_stops():
    """The docstring's cases: argmax [7, 9, 4] on draft [7, 8, 2] proves [7, 9]; argmax [7, 8, 2] proves all."""
    departs = Draft([7, 8, 2], np.array([7, 9, 4]))
    agrees = Draft([7, 8, 2], np.array([7, 8, 2]))
    assert verified_tokens([departs], {2}, 10) == ([7, 9], False)
    assert verified_tokens([agrees], {2}, 10) == ([7, 8, 2], True)
    assert verified_tokens([departs, agrees], {2}, 10) == ([7, 8, 2], True)  # the longest proof wins
    assert verified_tokens([agrees], {2}, 2) == ([7, 8], True)  # max_new_tokens ends the generation
    assert verified_tokens([Draft([7, 8], np.array([7, 8]))], {2}, 10) == ([7, 8], False)  # no stop yet
    assert verified_tokens([], {2}, 10) == ([], False)


def test_a_draft_needs_the_prompt_and_labels_on_everything_after_it():
    ex = example([1, 5, 6, 7, 2], 3, draft=True)
    score = ExampleScore(nll_mean=0.0, greedy_ids=np.array([7, 2]))
    assert draft_of([1, 5, 6], ex, score) == Draft([7, 2], score.greedy_ids)
    assert draft_of([1, 5, 9], ex, score) is None  # another prompt
    assert draft_of([1, 5], ex, score) is None  # position 2 is unlabelled: its argmax is unknown
    assert draft_of([1, 5, 6], ex, ExampleScore(nll_mean=0.0)) is None  # no draft asked


# -- equality with the per-example path on a model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def varied(tmp_path_factory, tiny_model):
    """The tiny model with matrices redrawn 10x wider (std 0.2): greedy answers differ from row to row."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    out = tmp_path_factory.mktemp("varied")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(varied):
    return load_tokenizer(str(varied))


@pytest.fixture(scope="module")
def model(varied):
    return load_causal_lm(str(varied), "float32").eval()


def groups_of(tokenizer, tiny_benchmark) -> list[list[AnswerExample]]:
    """Per forget/retain row: answer (token statistics), paraphrase, 5 perturbed answers; holdout rows alone."""
    import json

    groups = []
    for split in ("forget10_perturbed", "retain_perturbed", "holdout10"):
        for line in (tiny_benchmark / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            answers = [row["answer"]] if split == "holdout10" else [row["answer"], row["paraphrased_answer"]]
            answers += [] if split == "holdout10" else row["perturbed_answer"]
            encoded = [encode_example(tokenizer, PromptTemplate(), row["question"], a, 64) for a in answers]
            groups.append(
                [AnswerExample(e.input_ids, e.labels, token_stats=k == 0, draft=True) for k, e in enumerate(encoded)]
            )
    return groups


@pytest.mark.parametrize("batch_size", [3, 32])
def test_shared_prefix_scores_equal_whole_examples(model, tokenizer, tiny_benchmark, nan_buffers, batch_size):
    groups = groups_of(tokenizer, tiny_benchmark)
    flat = [e for group in groups for e in group]
    with torch.no_grad():
        want = score_examples(model, flat, batch_size, tokenizer.pad_token_id)
        got = [s for group in score_groups(model, groups, batch_size, tokenizer.pad_token_id) for s in group]
        logits = [model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1] for e in flat]
    assert sum(prefix_cut(group) > 0 for group in groups) == 8  # forget and retain rows share their prompt
    nodes = sum(p.node_count - 1 for p in prefix_scoring.plan_chunks(groups, batch_size, 10**6))
    assert nodes < 0.6 * len([t for e in flat for t in e.input_ids])  # each distinct prefix is computed once
    for e, a, b, row_logits in zip(flat, got, want, logits, strict=True):
        assert a.nll_mean == pytest.approx(b.nll_mean, abs=TOLERANCE)
        if e.token_stats:
            for name in ("token_logps", "mu", "sigma2"):
                np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=TOLERANCE, rtol=TOLERANCE)
            np.testing.assert_array_equal(a.pred_ids, b.pred_ids)
            np.testing.assert_array_equal(a.target_ids, b.target_ids)
        labelled = torch.tensor(e.labels[1:]) != -100
        np.testing.assert_array_equal(a.greedy_ids, row_logits[labelled].argmax(-1).numpy())


def test_answers_that_differ_in_their_last_token_score_as_whole_examples(model, tokenizer):
    """Answers sharing all but their last token (one-token leaves, run in no forward) and an answer that is a prefix
    of another (its last token is an inner node, run): every likelihood and token statistic as whole examples'."""
    prompt = encode_prompt(tokenizer, PromptTemplate(), "Who wrote it?")
    cut = len(prompt)
    shared = [11, 12, 13, 14, 15]
    ids = [prompt + shared + [16], prompt + shared + [17], prompt + shared, prompt + [18, 19]]
    group = [example(list(i), cut, token_stats=True, draft=True) for i in ids]
    with torch.no_grad():
        want = score_examples(model, group, 4, tokenizer.pad_token_id)
        got = score_groups(model, [group], 4, tokenizer.pad_token_id)[0]
        argmax = [model(input_ids=torch.tensor([i])).logits[0, cut - 1 : -1].argmax(-1).numpy() for i in ids]
    plan = plan_chunk([group], [0], batch_size=4)
    assert sum(seg.run_length == 0 for seg in plan.segments) == 2
    for a, b, greedy_ids in zip(got, want, argmax, strict=True):
        assert a.nll_mean == pytest.approx(b.nll_mean, abs=TOLERANCE)
        np.testing.assert_allclose(a.token_logps, b.token_logps, atol=TOLERANCE, rtol=TOLERANCE)
        np.testing.assert_array_equal(a.pred_ids, b.pred_ids)
        np.testing.assert_array_equal(a.greedy_ids, greedy_ids)


def test_only_read_positions_reach_the_output_head_in_blocks(model, tokenizer, tiny_benchmark, monkeypatch):
    """The head runs on every position a token follows (each answer segment's positions but the last, the last
    where segments continue it, and a prompt's last position only), never on padding, in blocks of at most
    head_rows; the scores equal those of batches of 32 with the usual block size."""
    groups = groups_of(tokenizer, tiny_benchmark)
    vocab = model.config.vocab_size
    blocks: list[int] = []
    linear = torch.nn.Linear.forward

    def counted(self, x):
        if self.out_features == vocab:
            blocks.append(x.shape[0] if x.dim() == 2 else -x.shape[:-1].numel())  # negative: a whole forward
        return linear(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counted)
    monkeypatch.setattr(model_calls, "HEAD_BYTES", 4 * vocab * 20)  # 20 rows per block
    with torch.no_grad():
        got = score_groups(model, groups, 3, tokenizer.pad_token_id)
    plans = prefix_scoring.plan_chunks(groups, 3, 10**6)
    answers = sum(len(seg.tokens) - (0 if seg.kids else 1) for p in plans for seg in p.segments if seg.logits)
    prompts = sum(1 for p in plans for seg in p.segments if not seg.logits and seg.kids)  # their last position
    read = answers + prompts
    assert blocks[0] == -2  # the reducible-head probe: one 2-token forward, its logits whole
    assert sum(blocks[1:]) == read and max(blocks[1:]) == 20 and min(blocks[1:]) > 0
    monkeypatch.setattr(torch.nn.Linear, "forward", linear)
    with torch.no_grad():
        want = [s for group in score_groups(model, groups, 32, tokenizer.pad_token_id) for s in group]
    for a, b in zip([s for group in got for s in group], want, strict=True):
        assert a.nll_mean == pytest.approx(b.nll_mean, abs=TOLERANCE)


class _ScaledLogits(torch.nn.Module):
    """A causal LM that changes its head's output before returning it (as soft-capping or a logit scale does)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config, self.generation_config = inner.config, inner.generation_config

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits * 0.5
        return out


def test_a_head_whose_output_is_changed_after_it_is_not_bypassed(model, tokenizer, tiny_benchmark):
    """Scaled logits: the probe finds the head's output is not the model's logits, so every position's logits come
    from the forward; the scores are the per-example path's on the scaled model."""
    scaled = _ScaledLogits(model)
    device = torch.device("cpu")
    with torch.no_grad():
        assert model_calls.reducible_head(model, tokenizer.pad_token_id, device) is model.lm_head
        assert model_calls.reducible_head(scaled, tokenizer.pad_token_id, device) is None
        groups = groups_of(tokenizer, tiny_benchmark)[:6]
        flat = [e for group in groups for e in group]
        want = score_examples(scaled, flat, 4, tokenizer.pad_token_id)
        got = [s for group in score_groups(scaled, groups, 4, tokenizer.pad_token_id) for s in group]
        plain = score_examples(model, flat, 4, tokenizer.pad_token_id)
    for a, b, c in zip(got, want, plain, strict=True):
        assert a.nll_mean == pytest.approx(b.nll_mean, abs=TOLERANCE)
        assert abs(b.nll_mean - c.nll_mean) > 1e-3  # the scale matters, so bypassing it would be caught


def test_an_instance_level_head_forward_is_used_and_kept(model, tokenizer, tiny_benchmark):
    """A forward set on the head instance (as device-placement hooks do) computes every block and stays after."""
    calls = []
    own = model.lm_head.forward

    def placed(x):
        calls.append(x.shape[0])
        return own(x)

    model.lm_head.forward = placed
    try:
        with torch.no_grad():
            score_groups(model, groups_of(tokenizer, tiny_benchmark)[:2], 4, tokenizer.pad_token_id)
        assert model.lm_head.forward is placed and len(calls) >= 2
    finally:
        del model.lm_head.forward


def test_decode_rows_fill_the_cache_budget_but_never_fewer_than_batch_size(monkeypatch):
    """8 KiB per token; the longest open row is a 50-token prompt with 6 verified tokens, plus 200 new: 256 slots,
    2 MiB per row, so 256 MiB hold 128 rows; a larger batch_size wins, and no budget leaves batch_size."""
    prompts, generated = [[0] * 50, [0] * 10, [0] * 70], [[0] * 6, [], []]
    assert greedy.decode_rows(8192, 32, [0, 1], prompts, generated, 200) == 128
    assert greedy.decode_rows(8192, 200, [0, 1], prompts, generated, 200) == 200
    monkeypatch.setattr(greedy, "DECODE_BYTES", 0)
    assert greedy.decode_rows(8192, 32, [0, 1], prompts, generated, 200) == 32


@pytest.fixture
def nan_buffers(monkeypatch):
    """Fresh key/value buffers full of NaN: they hold whatever memory held, and a masked slot must still be written
    (attention scores it before the mask applies, and NaN times zero is NaN)."""
    empty = model_calls.ModelCalls.buffers

    def poisoned(self, model, batch, capacity):
        return [(k.fill_(float("nan")), v.fill_(float("nan"))) for k, v in empty(self, model, batch, capacity)]

    monkeypatch.setattr(model_calls.ModelCalls, "buffers", poisoned)


@pytest.mark.parametrize(
    ("decode_bytes", "compact_at", "park_at", "park_bytes"),
    [
        (0, 0.5, 0.0, 2**28),
        (0, 0.0, 0.0, 2**28),
        (0, 1.0, 0.0, 2**28),
        (2**28, 0.5, 0.0, 2**28),
        (0, 0.5, 0.6, 2**28),
        (0, 0.0, 1.0, 2**28),
        (2**28, 0.5, 1.0, 2**28),
        (0, 0.0, 1.0, 2**16),
        (0, 0.0, 1.0, 0),
    ],
)
def test_decode_batches_equal_generate_however_finished_rows_leave(
    model, tokenizer, tiny_benchmark, monkeypatch, nan_buffers, decode_bytes, compact_at, park_at, park_bytes
):
    """Finished rows may ride along to the end (compact_at 0), leave at once (1) or when half have finished (0.5),
    in batches of batch_size rows (no cache budget) or all in one; a batch's last live rows may be parked and
    decoded with the other batches' at the end (park_at 0.6: at 3 of 5 rows; 1: every row, right after its
    prefill), not when there is one batch, and only as many as fit in park_bytes: every generation equals
    generate's."""
    import json

    questions = [
        json.loads(line)["question"]
        for split in ("forget10_perturbed", "retain_perturbed", "holdout10")
        for line in (tiny_benchmark / f"{split}.jsonl").read_text().splitlines()
    ]
    prompts = [encode_prompt(tokenizer, PromptTemplate(), q) for q in questions]
    monkeypatch.setattr(greedy, "DECODE_BYTES", decode_bytes)
    monkeypatch.setattr(greedy, "COMPACT_AT", compact_at)
    monkeypatch.setattr(greedy, "PARK_AT", park_at)
    monkeypatch.setattr(greedy, "PARK_BYTES", park_bytes)
    parked = []
    park = greedy._Batch.park

    def counted_park(self):
        stopped = park(self)
        parked.extend(len(cache.tokens) * self.kv_bytes for cache in stopped.values())
        return stopped

    monkeypatch.setattr(greedy._Batch, "park", counted_park)
    compactions = []
    select = model_calls._BufferLayer.batch_select_indices

    def counted(self, indices):
        compactions.append(len(indices))
        return select(self, indices)

    monkeypatch.setattr(model_calls._BufferLayer, "batch_select_indices", counted)
    budget = 3 * NEW_TOKENS
    with torch.no_grad():
        # The random model rarely says EOS; its two most frequent tokens as extra stop ids end rows at many steps.
        ids = [
            model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=budget, pad_token_id=0)[
                0, len(p) + 1 :
            ].tolist()
            for p in prompts
        ]
        frequent = [int(t) for t in np.bincount(np.concatenate(ids)).argsort()[-2:]]
        monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, *frequent])
        ends = {next((k for k, t in enumerate(row) if t in frequent), budget) for row in ids}
        assert len(ends) >= 4, f"rows end together: {ends}"  # so rows leave their batch at different steps
        want = generate_answers(model, tokenizer, prompts, 5, budget)
        assert greedy_generate(model, tokenizer, prompts, 5, budget) == want
        stops = {tokenizer.eos_token_id, *frequent}
        first = [int(model(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
    if compact_at == 0.0:
        assert compactions == []  # finished rows rode along to the end
    else:
        assert compactions  # some batch dropped finished rows mid-way
    assert sum(parked) <= park_bytes
    if park_at == 0.0 or decode_bytes or park_bytes == 0:
        assert parked == []  # one batch (decode_bytes) has no other batch to wait for
    elif park_bytes < 2**28:
        assert 0 < len(parked) < len(prompts)  # the first batches' rows fill the budget
    elif park_at == 1.0:
        assert len(parked) == sum(token not in stops for token in first)  # all but those the prefill finished
    else:
        assert 0 < len(parked) < len(prompts)


def test_prompt_caches_keep_only_wanted_groups_within_the_budget():
    """Each offer is 2 layers x (keys + values) x 3 x 4 x 2 fp32 = 384 bytes; a 900-byte budget holds two."""
    layers = [(torch.ones(3, 4, 2), torch.ones(3, 4, 2)) for _ in range(2)]
    caches = model_calls.PromptCaches([0, 1, 2], budget=900)
    for group in (5, 0, 1, 2, 0):
        caches.offer(group, [7, 8, 9, 10], layers)
    assert sorted(caches.kept) == [0, 1]  # 5 not wanted, 2 past the budget, 0 kept once
    assert caches.left == 900 - 2 * 384
    layers[0][0].zero_()
    assert caches.kept[0].layers[0][0].sum() == 24  # a copy, not a view of the forward's buffers


def test_generation_from_prompt_caches_equals_generate(model, tokenizer, tiny_benchmark, monkeypatch, nan_buffers):
    """Prompts whose keys and values scoring kept: the prefill runs only what follows them, and every generation
    still equals generate's, also when rows are parked; garbage in a cache changes them, so the caches are really
    read."""
    import json

    questions = [
        json.loads(line)["question"]
        for split in ("forget10_perturbed", "retain_perturbed", "holdout10")
        for line in (tiny_benchmark / f"{split}.jsonl").read_text().splitlines()
    ]
    groups = groups_of(tokenizer, tiny_benchmark)
    prompts = [encode_prompt(tokenizer, PromptTemplate(), q) for q in questions]
    monkeypatch.setattr(greedy, "DECODE_BYTES", 0)  # batches of 5 rows, so batches mix cached and uncached rows
    with torch.no_grad():
        caches = model_calls.PromptCaches(range(len(groups)), budget=2**30)
        score_groups(model, groups, 5, tokenizer.pad_token_id, prompt_caches=caches)
        kept = [caches.kept.get(g) for g in range(len(groups))]
        assert sum(c is not None for c in kept) == 8  # the forget and retain rows (holdout rows have one answer)
        for prompt, cache in zip(prompts, kept, strict=True):
            if cache is not None:
                assert list(cache.tokens) == prompt[: len(cache.tokens)] and len(cache.tokens) < len(prompt)
                fresh = model(input_ids=torch.tensor([list(cache.tokens)]), use_cache=True).past_key_values
                keys = fresh.layers[0].keys[0] if hasattr(fresh, "layers") else fresh.key_cache[0][0]
                torch.testing.assert_close(cache.layers[0][0], keys, atol=TOLERANCE, rtol=TOLERANCE)
        kept[0] = model_calls.PromptCache((99, 98), kept[1].layers)  # not a prefix of its prompt: not used
        want = generate_answers(model, tokenizer, prompts, 5, NEW_TOKENS)
        positions = []  # tokens each forward ran
        hook = model.register_forward_pre_hook(
            lambda module, args, kwargs: positions.append(kwargs["input_ids"].numel()), with_kwargs=True
        )
        try:
            assert greedy_generate(model, tokenizer, prompts, 5, NEW_TOKENS, prompt_caches=kept) == want
            with_caches, positions[:] = sum(positions), []
            assert greedy_generate(model, tokenizer, prompts, 5, NEW_TOKENS) == want
            without = sum(positions)
        finally:
            hook.remove()
        # The 7 usable caches hold all but the last prompt token of their rows: that much less is run.
        saved = sum(len(c.tokens) for c in kept[1:] if c is not None)
        assert without - with_caches >= saved > 0
        # Every row parked right after its prefill: a parked row's keys and values are its unmasked slots (cached
        # prompt, then its own tokens after the batch's padding), and it continues from them.
        monkeypatch.setattr(greedy, "PARK_AT", 1.0)
        assert greedy_generate(model, tokenizer, prompts, 5, NEW_TOKENS, prompt_caches=kept) == want
        garbage = [
            model_calls.PromptCache(c.tokens, [(k + 3.0, v - 3.0) for k, v in c.layers]) if c is not None else None
            for c in kept
        ]
        assert greedy_generate(model, tokenizer, prompts, 5, NEW_TOKENS, prompt_caches=garbage) != want


def test_greedy_generation_equals_generate_with_and_without_drafts(model, tokenizer, tiny_benchmark):
    import json

    questions = [
        json.loads(line)["question"]
        for split in ("forget10_perturbed", "retain_perturbed", "holdout10")
        for line in (tiny_benchmark / f"{split}.jsonl").read_text().splitlines()
    ]
    prompts = [encode_prompt(tokenizer, PromptTemplate(), q) for q in questions]
    with torch.no_grad():
        want = generate_answers(model, tokenizer, prompts, 5, NEW_TOKENS)
        assert len(set(want)) >= 4, f"rows generate alike: {want}"
        assert greedy_generate(model, tokenizer, prompts, 5, NEW_TOKENS) == want
        assert greedy_generate(model, tokenizer, prompts, 1, NEW_TOKENS) == want
        # Drafts from the model's own greedy tokens: right ones, and ones corrupted after their second token.
        drafts = []
        for prompt in prompts:
            ids = model.generate(
                input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0
            )[0, len(prompt) :].tolist()
            corrupt = ids[:2] + [(t + 1) % len(tokenizer) for t in ids[2:]]
            drafts.append([Draft(corrupt, np.array(ids[:3] + [0] * (len(ids) - 3))), Draft(ids, np.array(ids))])
        forwards = []
        hook = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
        try:
            assert greedy_generate(model, tokenizer, prompts, 5, NEW_TOKENS, drafts=drafts) == want
        finally:
            hook.remove()
    # Every draft proves NEW_TOKENS tokens (or a stop), so nothing is decoded.
    assert forwards == []


def evaluator(benchmark, tokenizer, **settings) -> TofuEvaluator:
    options = {"batch_size": 5, "generation_batch_size": 3, "max_new_tokens": NEW_TOKENS} | settings
    return TofuEvaluator(str(benchmark), tokenizer, "forget10", max_length=64, settings=TofuSettings(**options))


def assert_same_metrics(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, entry in want.items():
        for field in ("value_by_index", "holdout_value_by_index"):
            for key, value in entry.get(field, {}).items():
                if name.endswith("_ROUGE"):
                    assert got[name][field][key] == value, f"{name}[{key}]"
                else:
                    np.testing.assert_allclose(got[name][field][key], value, atol=TOLERANCE, rtol=TOLERANCE)
        if entry["agg_value"] is not None:
            np.testing.assert_allclose(got[name]["agg_value"], entry["agg_value"], atol=TOLERANCE, rtol=TOLERANCE)


def test_evaluator_engines_agree(model, tokenizer, tiny_benchmark):
    new = evaluator(tiny_benchmark, tokenizer).evaluate(model)
    old = evaluator(tiny_benchmark, tokenizer, engine="per_example").evaluate(model)
    assert new["meta"]["engine"] == "prompt_cache" and old["meta"]["engine"] == "per_example"
    assert_same_metrics(new["metrics"], old["metrics"])
    generations = {r["generation"] for r in new["metrics"]["forget_Q_A_ROUGE"]["value_by_index"].values()}
    assert len(generations) >= 2, "every row generates the same text; the comparison would prove little"


def test_collector_paused_restores_the_collector_as_it_was_even_on_error():
    was_enabled = gc.isenabled()
    try:
        gc.enable()
        with pytest.raises(RuntimeError, match="inside"), collector_paused():
            assert not gc.isenabled()
            raise RuntimeError("inside")
        assert gc.isenabled()
        gc.disable()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled(), "a collector the caller had turned off was turned on"
    finally:
        (gc.enable if was_enabled else gc.disable)()


@pytest.mark.parametrize("engine", ["prompt_cache", "per_example"])
def test_a_pass_runs_with_the_collector_paused_and_leaves_no_cycles(model, tokenizer, tiny_benchmark, engine):
    """Pausing the collector defers no garbage only while a pass makes no reference cycles: after a pass, a
    collection finds nothing unreachable (a cycle added to the pass would be kept until the next collection)."""
    run = evaluator(tiny_benchmark, tokenizer, engine=engine)
    seen: list[bool] = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(gc.isenabled()))
    gc.collect()
    try:
        run.score(model)
    finally:
        hook.remove()
    assert seen and not any(seen), "the model ran with the collector on"
    assert gc.isenabled()
    assert gc.collect() == 0


def test_argmax_changing_generation_settings_fall_back_to_generate(tiny_model, tiny_benchmark, tokenizer):
    model = load_causal_lm(str(tiny_model), "float32")
    model.generation_config.repetition_penalty = 1.3
    assert "repetition_penalty=1.3" in greedy.plain_greedy_problem(model)
    run = evaluator(tiny_benchmark, tokenizer, metric_groups=("ra",))
    new = run.evaluate(model)
    assert any(
        n.startswith("generation with model.generate: its generation config sets repetition_penalty=1.3")
        for n in new["meta"]["notes"]
    )
    old = evaluator(tiny_benchmark, tokenizer, metric_groups=("ra",), engine="per_example").evaluate(model)
    assert_same_metrics(new["metrics"], old["metrics"])


def test_models_without_plain_key_value_caches_are_refused_with_the_fix(tiny_model):
    model = load_causal_lm(str(tiny_model), "float32")
    assert prompt_cache_problem(model) is None
    model.config.layer_types = ["full_attention", "linear_attention"]
    assert "linear_attention layers" in prompt_cache_problem(model)
    with pytest.raises(ValueError, match=r"--engine per_example"):
        ModelCalls.of(model)


@pytest.mark.parametrize("phase", ["likelihood", "generation"])
def test_ranks_agree_on_the_number_of_forwards_before_the_first(model, tokenizer, tiny_benchmark, monkeypatch, phase):
    """As tests/test_sharded_evaluation.py checks for the per-example path: the count is agreed before any forward
    (a rank asking later meets another rank's FSDP all-gathers and both wait forever), then padded with dummies."""
    events: list[str] = []

    def synced_count(count: int, device, synced_gpus: bool) -> int:
        events.append("agree")
        return count + 1  # another rank has one batch more

    monkeypatch.setattr(prefix_scoring if phase == "likelihood" else greedy, "_synced_count", synced_count)
    hook = model.register_forward_pre_hook(lambda module, args: events.append("forward"))
    try:
        with torch.no_grad():
            if phase == "likelihood":
                groups = groups_of(tokenizer, tiny_benchmark)[:2]
                score_groups(model, groups, 32, tokenizer.pad_token_id)
                nodes = prefix_scoring.POOL_BYTES // ModelCalls.of(model).kv_bytes_per_token(model)
                planned = sum(len(p.batches) for p in prefix_scoring.plan_chunks(groups, 32, nodes))
                # The reducible-head probe, the plan's forwards, then the dummy.
                assert events == ["agree", "forward", *["forward"] * planned, "forward"]
            else:
                prompts = [encode_prompt(tokenizer, PromptTemplate(), "Where was AuthorA born?")]
                greedy_generate(model, tokenizer, prompts, 2, 2)
                # Agreed first; the batch's prefill and one step, then the missing batch's dummy forward; then
                # agreed on the batches of parked rows (none here, one on the other rank: a dummy forward).
                assert events == ["agree", "forward", "forward", "forward", "agree", "forward"]
    finally:
        hook.remove()


def test_muse_engines_agree(tmp_path):
    """MUSE: VerbMem's scored continuation is its generation's draft, KnowMem decodes with the loop; values equal
    the per-example path's and every generation is identical; the model runs with the collector paused."""
    from pathlib import Path

    from baldro_lightning.embedded.models import init_tiny_llama, train_tokenizer
    from baldro_lightning.evaluation.muse import MuseEvaluator, MuseSettings

    embedded = Path(__file__).resolve().parents[1] / "data" / "muse_embedded"
    train_tokenizer(embedded, tmp_path / "tokenizer", vocab_size=512, model_max_length=256)
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    init_tiny_llama(tmp_path / "tokenizer", tmp_path / "model", seed=0, **shape)
    model = load_causal_lm(str(tmp_path / "model"), "float32")
    with torch.no_grad():  # wider weights, so that rows generate different texts
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    tokenizer = load_tokenizer(str(tmp_path / "model"))
    sizes = {"batch_size": 3, "knowmem_batch_size": 2, "verbmem_batch_size": 2}
    collector_on: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: collector_on.append(gc.isenabled()))
    results = {
        engine: MuseEvaluator(
            str(embedded),
            tokenizer,
            max_length=64,
            settings=MuseSettings(limit=5, knowmem_max_new_tokens=6, verbmem_max_new_tokens=6, engine=engine, **sizes),
        ).evaluate(model)
        for engine in ("prompt_cache", "per_example")
    }
    assert_same_metrics(results["prompt_cache"]["metrics"], results["per_example"]["metrics"])
    assert collector_on and not any(collector_on), "MUSE's pass ran the model with the collector on"
    verbmem = results["prompt_cache"]["metrics"]["forget_verbmem_ROUGE"]["value_by_index"]
    assert len({row["generation"] for row in verbmem.values()}) >= 2
