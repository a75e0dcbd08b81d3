r"""Likelihood scoring of examples that share prefixes: every distinct prefix is run through the model once.

A TOFU row is scored on up to seven answers to one question (answer, paraphrase, five perturbed answers), and
:func:`~baldro_lightning.evaluation.engine.score_examples` runs the prompt seven times, and again every stretch the
answers share ("The author's father was a ..."). :func:`score_groups` takes the examples grouped by question and
builds the token tree (trie) of each group: one node per distinct prefix. Each node is computed once; the keys and
values of the nodes that other segments continue go into a pool, from which every later forward gathers the ones
it attends to (its "past"). Chains of nodes without a branch are one *segment*, the unit of a forward; a segment
runs once its parent segment has. A stretch shared by several answers gets a segment of its own only when it is at
least :data:`MIN_SHARED` tokens long.

- The prompt before the first target (``input_ids[:cut]``, :func:`prefix_cut`) is a segment of its own whose
  logits are computed at its last position only, where the answers' first tokens follow (the language-model head
  is skipped on the rest of it).
- Every other node that a token follows has its logits computed and reduced in the same forward to what the
  metrics read (:class:`_HeadReads`): the argmax, each child token's log-probability (fp32, as
  :func:`~baldro_lightning.train.logprobs.token_logprobs` computes it) and the MinK++ moments where an example asks
  for token statistics. The output head runs on a few hundred such positions at a time
  (:meth:`~baldro_lightning.evaluation.model_calls.ModelCalls.run_reduced`), so no (T, V) tensor is ever held;
  padding never reaches it.
- A leaf's last token (an answer's last, usually its EOS) is not run at all (:attr:`Segment.run_length`): no
  position follows it and nothing attends to it; its log-probability comes from the position before it.

Per example this gives what :func:`~baldro_lightning.evaluation.engine.score_examples` gives, equal within float
rounding (other matmul shapes, padded key slots that are masked), plus on request the teacher-forced argmax at every
labelled position, which :mod:`~baldro_lightning.evaluation.greedy` uses as a verified draft of the greedy
generation.

Batching: groups are ordered by their longest example and cut into chunks whose key/value pool fits in
:data:`POOL_BYTES`; inside a chunk, segments run level by level (a segment's
level is one more than its parent's), each level sorted by length and cut into forwards by :func:`batch_bounds`,
none attending to more key/value slots than ``batch_size`` whole examples would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from baldro_lightning.data.tokenization import IGNORE_INDEX, common_prefix_length
from baldro_lightning.evaluation import metrics
from baldro_lightning.evaluation.engine import AnswerExample, ExampleScore, _input_device, _report, _synced_count
from baldro_lightning.evaluation.model_calls import ModelCalls, PromptCaches, reducible_head

POOL_BYTES = 2**28
"""Memory for a chunk's key/value pool (every token that later forwards attend to, once): the larger the chunk,
the better its segments' lengths match in forwards."""

HEAD_FALLBACK_ROWS = 1024
"""Positions reduced at once when a model's logits come whole from its forward (no :func:`reducible_head`)."""


def prefix_cut(examples: Sequence[AnswerExample]) -> int:
    """Length of the prompt part a group shares before any target: its segment's logits are computed at its last
    position only (they predict the first target of every answer).

    The cut is the shortest of: the common prefix of all ``input_ids`` and each example's first target position
    (the first ``t >= 1`` with a label; position 0 is never a target).

    Example: ``[1, 5, 6, 7, 2]`` and ``[1, 5, 6, 9, 9, 2]`` with labels from position 3 share ``[1, 5, 6]``
    (3 tokens) and first target 3, so the cut is ``min(3, 3) = 3``: the prompt segment is ``[1, 5, 6]``.
    """
    if len(examples) < 2:
        return 0
    shared = len(examples[0].input_ids)
    for example in examples[1:]:
        shared = min(shared, common_prefix_length(examples[0].input_ids, example.input_ids))
    for example in examples:
        first_target = next((t for t in range(1, len(example.labels)) if example.labels[t] != IGNORE_INDEX), None)
        if first_target is not None:
            shared = min(shared, first_target)
    return shared


MIN_SHARED = 4
"""Fewest tokens a stretch of answers must share to be computed once in a segment of its own; a shorter shared
stretch is recomputed in each branch (one more forward row for a few tokens does not pay)."""


@dataclass
class Segment:
    """A run of tokens computed in one row of one forward; its nodes are consecutive ids from ``first_node``."""

    tokens: list[int]
    """Its token ids."""
    first_node: int
    """Node id of its first token."""
    start: int
    """Position of its first token in the sequence."""
    past: np.ndarray
    """Node ids of positions ``0 .. start-1`` (its ancestors), whose keys and values it attends to."""
    logits: bool
    """Whether its logits are read at every position (False for a group's prompt, read at its last position only,
    where the answers' first tokens follow)."""
    level: int
    """0 for a prompt segment, then one more than the parent segment's."""
    kids: list[tuple[int, int]] = field(default_factory=list)
    """(first node, token) of each segment that continues after this one's last token."""
    prompt_of: int | None = None
    """The group whose prompt (before its first target) this segment is; ``None`` for answer segments."""

    @property
    def nodes(self) -> np.ndarray:
        return np.arange(self.first_node, self.first_node + len(self.tokens))

    @property
    def run_length(self) -> int:
        """Tokens it runs through the model: all, but a leaf answer's last token (nothing reads its logits or
        attends to its keys and values; its own log-probability comes from the position before it). Known once the
        plan is complete (``kids``)."""
        return len(self.tokens) - (1 if self.logits and not self.kids else 0)


@dataclass
class ChunkPlan:
    """The token tree of a chunk of groups and the forwards that compute it."""

    groups: list[int]
    """Group numbers in this chunk."""
    node_count: int = 1
    """Nodes so far; node 0 is a dummy (zero keys and values, always masked) that pads pasts."""
    paths: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    """(group, example position) -> node id of each of its positions."""
    segments: list[Segment] = field(default_factory=list)
    batches: list[list[int]] = field(default_factory=list)
    """Segment numbers per forward, in running order (level by level, longest first)."""
    pool_row: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    """Each node's row in the key/value pool: only nodes that other segments attend to (those of segments with
    kids) have one; 0 (the dummy row) for the rest."""

    def add(self, tokens: Sequence[int], start: int, past: np.ndarray, logits: bool, parent: Segment | None) -> Segment:
        level = 0 if not logits else (1 if parent is None or not parent.logits else parent.level + 1)
        segment = Segment(list(tokens), self.node_count, start, past, logits, level)
        self.node_count += len(tokens)
        self.segments.append(segment)
        if parent is not None:
            parent.kids.append((segment.first_node, segment.tokens[0]))
        return segment


def plan_chunk(
    groups: Sequence[Sequence[AnswerExample]], members: list[int], batch_size: int, min_shared: int = MIN_SHARED
) -> ChunkPlan:
    """The token tree of ``members`` (group numbers) and the forwards that compute it.

    Each group's prompt before its first target (:func:`prefix_cut`) is one segment with logits at its last
    position only; below it, a stretch shared by several answers becomes a segment of its own when it is at least
    ``min_shared`` tokens long (:func:`_branch`). Segments run level by level, each level longest first; a forward
    attends to no more key/value slots than ``batch_size`` of the chunk's longest examples would
    (:func:`batch_bounds` places the cuts), so it needs no more memory than a batch of whole examples.
    """
    plan = ChunkPlan(groups=list(members))
    longest = 1
    for g in members:
        ids = [list(example.input_ids) for example in groups[g]]
        longest = max([longest, *map(len, ids)])
        cut = prefix_cut(groups[g])
        paths: list[list[np.ndarray]] = [[] for _ in ids]
        past, parent = np.zeros(0, dtype=np.int64), None
        if cut > 0:
            parent = plan.add(ids[0][:cut], 0, past, logits=False, parent=None)
            parent.prompt_of = g
            past = parent.nodes
            for path in paths:
                path.append(past)
        _branch(plan, ids, list(range(len(ids))), cut, past, parent, paths, min_shared)
        for k, path in enumerate(paths):
            plan.paths[(g, k)] = np.concatenate(path) if path else np.zeros(0, dtype=np.int64)
    plan.pool_row = np.zeros(plan.node_count, dtype=np.int64)
    pooled = np.concatenate([seg.nodes for seg in plan.segments if seg.kids] or [np.zeros(0, dtype=np.int64)])
    plan.pool_row[pooled] = np.arange(1, len(pooled) + 1)
    budget = batch_size * longest
    levels: dict[int, list[int]] = {}
    for number, segment in enumerate(plan.segments):
        levels.setdefault(segment.level, []).append(number)
    for level in sorted(levels):
        # A one-token leaf runs nothing: its token's log-probability is read in its parent's forward.
        runs = [s for s in levels[level] if plan.segments[s].run_length]
        order = sorted(runs, key=lambda s: plan.segments[s].run_length, reverse=True)
        lengths = [plan.segments[s].run_length for s in order]
        spans = [len(plan.segments[s].past) + plan.segments[s].run_length for s in order]
        plan.batches += [order[i:j] for i, j in batch_bounds(lengths, spans, budget)]
    return plan


FORWARD_COST = 32
"""What one more forward costs, in padded token positions (its fixed overhead: Python, kernel launches); the
batching of :func:`batch_bounds` weighs padding against it."""


def batch_bounds(lengths: Sequence[int], spans: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Cut length-sorted rows into forwards with the fewest padded positions plus :data:`FORWARD_COST` per forward.

    A forward of rows ``i .. j-1`` (sorted longest first) costs ``(j - i) * lengths[i] + FORWARD_COST``. It may hold
    ``budget`` key/value slots: ``rows * max(spans)`` (a row's span is its past plus its length) must stay within
    it, or the forward holds one row. Dynamic programming over the cut points.

    Example (large budget): lengths ``[10, 9, 2, 2]`` cost 40 + 32 in one forward and 20 + 4 + 64 in two, so they
    make one; ``[100, 2, 2, 2]`` cost 400 + 32 in one and 100 + 6 + 64 in two, so they make two.
    """
    n = len(lengths)
    best = [0.0] * (n + 1)
    cut = [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        best[i], cut[i] = lengths[i] + FORWARD_COST + best[i + 1], i + 1
        widest = spans[i]
        for j in range(i + 2, n + 1):
            widest = max(widest, spans[j - 1])
            if (j - i) * widest > budget:
                break
            cost = (j - i) * lengths[i] + FORWARD_COST + best[j]
            if cost < best[i]:
                best[i], cut[i] = cost, j
    bounds, i = [], 0
    while i < n:
        bounds.append((i, cut[i]))
        i = cut[i]
    return bounds


def _branch(
    plan: ChunkPlan,
    ids: list[list[int]],
    members: list[int],
    start: int,
    past: np.ndarray,
    parent: Segment | None,
    paths: list[list[np.ndarray]],
    min_shared: int,
) -> None:
    """Segments for ``members`` (examples that share ``ids[:start]``) from position ``start`` on.

    Members that share at least ``min_shared`` more tokens (or all that is left of them) get one segment for that
    stretch, and branch below it; otherwise they are split by their first differing token and each part branches
    from ``start`` again, recomputing the short shared stretch. A single member gets the rest of its ids.
    """
    members = [k for k in members if len(ids[k]) > start]
    if not members:
        return
    if len(members) == 1:
        k = members[0]
        paths[k].append(plan.add(ids[k][start:], start, past, logits=True, parent=parent).nodes)
        return
    head = ids[members[0]]
    shared = min(common_prefix_length(head[start:], ids[k][start:]) for k in members[1:])
    if shared >= min_shared or all(len(ids[k]) == start + shared for k in members):
        segment = plan.add(head[start : start + shared], start, past, logits=True, parent=parent)
        for k in members:
            paths[k].append(segment.nodes)
        _branch(plan, ids, members, start + shared, np.concatenate([past, segment.nodes]), segment, paths, min_shared)
        return
    parts: dict[int | None, list[int]] = {}
    for k in members:
        parts.setdefault(ids[k][start + shared] if len(ids[k]) > start + shared else None, []).append(k)
    for token, part in parts.items():
        if token is None:
            for k in part:  # ends within the short shared stretch: a segment of its own
                _branch(plan, ids, [k], start, past, parent, paths, min_shared)
        else:
            _branch(plan, ids, part, start, past, parent, paths, min_shared)


def plan_chunks(groups: Sequence[Sequence[AnswerExample]], batch_size: int, nodes: int) -> list[ChunkPlan]:
    """Chunks of whole groups, longest examples first (a batch that does not fit in memory fails at once).

    A chunk takes groups while the tokens other segments attend to (estimated by each group's longest example: its
    prompt and shared stretches) fit in ``nodes`` pool rows, and at least ``batch_size`` times its longest example.
    """
    order = sorted(range(len(groups)), key=lambda g: max((len(e.input_ids) for e in groups[g]), default=0))
    order.reverse()
    chunks, current, size = [], [], 0
    longest = max((len(e.input_ids) for group in groups for e in group), default=1)
    for g in order:
        tokens = max((len(e.input_ids) for e in groups[g]), default=0)
        if current and size + tokens > max(nodes, batch_size * longest):
            chunks.append(plan_chunk(groups, current, batch_size))
            current, size = [], 0
        current.append(g)
        size += tokens
    if current:
        chunks.append(plan_chunk(groups, current, batch_size))
    return chunks


def score_groups(
    model: nn.Module,
    groups: Sequence[Sequence[AnswerExample]],
    batch_size: int,
    pad_token_id: int,
    synced_gpus: bool = False,
    prompt_caches: PromptCaches | None = None,
) -> list[list[ExampleScore]]:
    """Likelihood statistics of grouped examples, each distinct prefix run once (see the module docstring).

    The caller puts the model in eval mode under ``torch.no_grad()``.

    Args:
        model: A causal LM whose layers all keep key/value caches (:func:`~baldro_lightning.evaluation.model_calls.
            prompt_cache_problem`); may be FSDP2-sharded, in which case every rank calls this with
            ``synced_gpus=True``.
        groups: Examples grouped by shared prompt (any grouping is correct; only shared prefixes save time).
        batch_size: Most segments (prompts or answer parts) per forward.
        pad_token_id: Id written into padded positions (masked by the attention mask).
        synced_gpus: Pad this rank's number of forwards to the largest over ranks with dummy forwards.
        prompt_caches: Where to keep the keys and values of the prompts (:func:`prefix_cut`) of the groups it asks
            for, so that generation from those prompts need not compute them again.

    Returns:
        Per group, one :class:`ExampleScore` per example, in the given order; ``greedy_ids`` is set for examples
        that asked for a draft.
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    calls = ModelCalls.of(model)
    device = _input_device(model)
    chunks = plan_chunks(groups, batch_size, POOL_BYTES // calls.kv_bytes_per_token(model))
    planned = sum(len(chunk.batches) for chunk in chunks)
    # Agreed before any forward: a rank asking later would meet the others' FSDP all-gathers and deadlock.
    forwards = _synced_count(planned, device, synced_gpus)
    head = reducible_head(model, pad_token_id, device)  # one forward, which every rank runs
    results: list[list[ExampleScore | None]] = [[None] * len(group) for group in groups]
    done = 0
    for chunk in chunks:
        values = _NodeValues(chunk, groups, device, prompt_caches)
        for batch in chunk.batches:
            values.run(calls, model, head, [chunk.segments[s] for s in batch], pad_token_id)
            done += 1
            _report("scoring", done, planned)  # in forwards: a forward serves parts of many examples
        values.scores(groups, results)
    for _ in range(forwards - planned):
        calls.dummy_forward(model, pad_token_id, device)
    return cast(list[list[ExampleScore]], results)


class _NodeValues:
    """A chunk's node pool (keys and values per layer) and what each node's logits were reduced to."""

    def __init__(
        self,
        chunk: ChunkPlan,
        groups: Sequence[Sequence[AnswerExample]],
        device: torch.device,
        prompt_caches: PromptCaches | None = None,
    ) -> None:
        self.chunk, self.device, self.prompt_caches = chunk, device, prompt_caches
        n = chunk.node_count
        self.pool_row = torch.as_tensor(chunk.pool_row, device=device)
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.logp = torch.full((n,), float("nan"), device=device)  # a node's token's log-prob after its parent
        self.argmax = torch.zeros(n, dtype=torch.long, device=device)
        self.mu = torch.full((n,), float("nan"), device=device)
        self.sigma2 = torch.full((n,), float("nan"), device=device)
        # Nodes whose next-token distribution feeds MinK++ (positions of token-statistics examples).
        self.needs_stats = np.zeros(n, dtype=bool)
        for (g, k), path in chunk.paths.items():
            if groups[g][k].token_stats:
                self.needs_stats[path] = True

    def run(
        self, calls: ModelCalls, model: nn.Module, head: nn.Module | None, segments: list[Segment], pad: int
    ) -> None:
        """One forward of ``segments``: pool the keys and values others attend to, reduce the logits that are read.

        ``head``: the output embedding when :meth:`ModelCalls.run_reduced` may run it on the read positions only
        (:func:`~baldro_lightning.evaluation.model_calls.reducible_head`); ``None``: every position's logits are
        computed and the read ones reduced after.
        """
        device = self.device
        length = max(s.run_length for s in segments)
        past_length = max(len(s.past) for s in segments)
        ids = torch.full((len(segments), length), pad, dtype=torch.long)
        node_ids = torch.zeros((len(segments), length), dtype=torch.long)
        past_ids = torch.zeros((len(segments), past_length), dtype=torch.long)
        for row, segment in enumerate(segments):
            run = segment.run_length
            ids[row, :run] = torch.as_tensor(segment.tokens[:run])
            node_ids[row, :run] = torch.as_tensor(segment.nodes[:run])
            past_ids[row, : len(segment.past)] = torch.as_tensor(segment.past)
        ids, node_ids, past_ids = ids.to(device), node_ids.to(device), past_ids.to(device)
        real = node_ids > 0
        starts = torch.as_tensor([s.start for s in segments], device=device).unsqueeze(1)
        positions = starts + torch.arange(length, device=device)
        mask = real.long()
        buffers = calls.buffers(model, len(segments), past_length + length)
        if past_length:
            mask = torch.cat([(past_ids > 0).long(), mask], dim=1)
            flat = self.pool_row[past_ids.flatten()]
            for (keys, values), pool_keys, pool_values in zip(buffers, self.keys, self.values, strict=True):
                # One gather per layer from the (nodes, H, D) pool into the buffer's first slots: (N, H, P, D).
                shape = (len(segments), past_length, *pool_keys.shape[1:])
                keys[:, :, :past_length] = pool_keys.index_select(0, flat).view(shape).transpose(1, 2)
                values[:, :, :past_length] = pool_values.index_select(0, flat).view(shape).transpose(1, 2)
        reads = _HeadReads.of(segments, length, self.needs_stats, device)
        if head is not None:
            layers = calls.run_reduced(
                model, head, ids, mask, positions, reads.rows, reads.reducer(self), buffers, past_length
            )
        else:
            logits, layers = calls.run(model, ids, mask, positions, buffers, past_length, keep_all=len(reads.rows) > 0)
            if len(reads.rows):
                logits = logits.reshape(-1, logits.shape[-1])
                reduce = reads.reducer(self)
                for first in range(0, len(reads.rows), HEAD_FALLBACK_ROWS):
                    reduce(logits.index_select(0, reads.rows[first : first + HEAD_FALLBACK_ROWS]), first)
        if not self.keys:
            n = int(self.chunk.pool_row.max()) + 1
            self.keys = [k.new_empty((n, k.shape[1], k.shape[3])) for k, _ in layers]
            self.values = [v.new_empty((n, v.shape[1], v.shape[3])) for _, v in layers]
            for pool in self.keys + self.values:
                pool[0] = 0  # the dummy node that pads pasts: finite, and always masked
        if self.prompt_caches is not None:
            for row, segment in enumerate(segments):
                if segment.prompt_of is not None:
                    # All but the prompt's last token: a generation's prefill runs that token for its logits.
                    end = len(segment.tokens) - 1  # a prompt segment has no past: past_length is 0
                    kv = [(k[row, :, :end], v[row, :, :end]) for k, v in layers]
                    self.prompt_caches.offer(segment.prompt_of, segment.tokens[:end], kv)
        # Only segments that others continue are attended to again; a leaf's keys and values are dropped.
        continued = [row for row, segment in enumerate(segments) if segment.kids]
        if continued:
            rows = torch.as_tensor(continued, device=device)
            keep = real[rows]
            where = self.pool_row[node_ids[rows][keep]]
            for layer, (k, v) in enumerate(layers):
                self.keys[layer].index_copy_(0, where, k[rows, :, past_length:].transpose(1, 2)[keep])
                self.values[layer].index_copy_(0, where, v[rows, :, past_length:].transpose(1, 2)[keep])

    def reduce(self, logits: Tensor, reads: _HeadReads, first: int) -> None:
        """Argmax, children's token log-probabilities and MinK++ moments of the read positions ``first ..``."""
        last = first + logits.shape[0]
        nodes = reads.nodes[first:last]
        values = logits.float()
        # In fp32, as token_logprobs computes them. On a CPU, log_softmax's fused kernel costs less than the
        # exponent and sum written out, and torch.max's indices less than argmax or a comparison with amax.
        logps = torch.log_softmax(values, dim=-1)
        self.argmax[nodes] = values.max(dim=-1).indices
        lo, hi = np.searchsorted(reads.pick_at_cpu, [first, last])
        if hi > lo:
            self.logp[reads.pick_node[lo:hi]] = logps[reads.pick_at[lo:hi] - first, reads.pick_token[lo:hi]]
        stats = reads.stats_cpu[first:last]
        if stats.any():
            where = torch.as_tensor(np.flatnonzero(stats), device=logits.device)
            mu, sigma2 = metrics.min_k_plus_plus_stats(logps[where])
            self.mu[nodes[where]] = mu
            self.sigma2[nodes[where]] = sigma2

    def scores(self, groups: Sequence[Sequence[AnswerExample]], results: list[list[ExampleScore | None]]) -> None:
        node_logp = self.logp.cpu().numpy()
        argmax, mu, sigma2 = self.argmax.cpu().numpy(), self.mu.cpu().numpy(), self.sigma2.cpu().numpy()
        for (g, k), path in self.chunk.paths.items():
            example = groups[g][k]
            path_ids = np.asarray(path)
            labelled = [t for t in range(1, len(path)) if example.labels[t] != IGNORE_INDEX]
            targets = np.asarray(labelled, dtype=np.int64)
            # log p(token t | prefix) is kept at token t's node.
            logps = node_logp[path_ids[targets]]
            # No target (a question that fills max_length): NaN, as score_examples gives it, left out of aggregates.
            nll = -float(logps.astype(np.float64).sum()) / len(targets) if len(targets) else math.nan
            extra = {}
            if example.token_stats:
                # The last labelled position (the EOS) is left out of the token statistics (methods §3.1b).
                keep = targets[:-1]
                before = path_ids[keep - 1]
                extra = {
                    "token_logps": logps[:-1],
                    "pred_ids": argmax[before],
                    "target_ids": np.asarray(example.input_ids, dtype=np.int64)[keep],
                    "mu": mu[before],
                    "sigma2": sigma2[before],
                }
            greedy_ids = argmax[path_ids[targets - 1]] if example.draft else None
            results[g][k] = ExampleScore(nll_mean=nll, greedy_ids=greedy_ids, **extra)


@dataclass(frozen=True)
class _HeadReads:
    """Which positions of a forward have their logits read, and what is read from each.

    A position is read when a token follows it in the tree: the next token of its segment, or the first token of
    each segment that continues it (a segment's last position may have several such children, or none: a leaf's
    last token is not run, and padding never reaches the output head). A group's prompt is read at its last
    position only: its other tokens are never targets. From each read position come its argmax, each
    child token's log-probability, and MinK++ moments where a token-statistics example passes through it.
    """

    rows: Tensor
    """(n,) the read positions, as ascending indices into the forward's flattened ``B x T`` positions."""
    nodes: Tensor
    """(n,) their node ids."""
    stats_cpu: np.ndarray
    """(n,) whether MinK++ moments are wanted there."""
    pick_at: Tensor
    """(m,) for each child token read, the index into ``rows`` of the position before it; ascending."""
    pick_at_cpu: np.ndarray
    """``pick_at`` in host memory, where a block finds its picks without a device sync."""
    pick_token: Tensor
    """(m,) the child's token id."""
    pick_node: Tensor
    """(m,) the child's node id, under which its token's log-probability is kept."""

    @staticmethod
    def of(segments: Sequence[Segment], length: int, needs_stats: np.ndarray, device: torch.device) -> _HeadReads:
        rows, nodes, pick_at, pick_token, pick_node = [], [], [], [], []
        count = 0
        for row, segment in enumerate(segments):
            size = len(segment.tokens)
            # Columns first .. read-1 are read: an answer segment's from its first, a prompt's only its last; the
            # last position is read only when a segment continues it.
            first = 0 if segment.logits else size - 1
            read = size if segment.kids else size - 1
            if read <= first:
                continue
            rows.append(row * length + np.arange(first, read))
            nodes.append(segment.nodes[first:read])
            if segment.logits:  # inside the segment the child of column c is column c + 1
                pick_at.append(count + np.arange(size - 1))
                pick_token.append(np.asarray(segment.tokens[1:], dtype=np.int64))
                pick_node.append(segment.nodes[1:])
            count += read - first
            if segment.kids:  # after its end come the kids' first tokens
                kids = np.asarray(segment.kids, dtype=np.int64)
                pick_at.append(np.full(len(kids), count - 1))
                pick_token.append(kids[:, 1])
                pick_node.append(kids[:, 0])

        def joined(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

        def tensor(array: np.ndarray) -> Tensor:
            return torch.as_tensor(array, device=device)

        read_nodes, at = joined(nodes), joined(pick_at)
        return _HeadReads(
            rows=tensor(joined(rows)),
            nodes=tensor(read_nodes),
            stats_cpu=needs_stats[read_nodes],
            pick_at=tensor(at),
            pick_at_cpu=at,
            pick_token=tensor(joined(pick_token)),
            pick_node=tensor(joined(pick_node)),
        )

    def reducer(self, values: _NodeValues) -> Callable[[Tensor, int], None]:
        """``reduce(logits, first)`` for :meth:`ModelCalls.run_reduced`: a block's logits into ``values``."""
        return lambda logits, first: values.reduce(logits, self, first)
