"""Batched sampling: logits [B, V] for B requests, each with its own parameters -> next token ids.

The scheduler builds a `SamplingBatchInfo` each step from the batch's `SamplingParams` and what
each request has generated so far, then calls `sample`:

    penalties (repetition, frequency, presence) -> bans (min_new_tokens) -> greedy rows: argmax
    other rows: / temperature -> softmax -> top-k -> top-p -> min-p -> draw

Everything is vectorised over the batch; the only Python loop is over rows that carry their own
`torch.Generator` (a per-request seed), so such a row's draws depend on its seed alone, never on
what else shares the batch. Work nobody in the batch asked for is skipped (no penalty tensors
without penalties, no sort without top-k / top-p, a topk instead of a sort when every row
caps top-k).

Logprobs returned to users come from `compute_logprobs` on the raw logits (the model's own
distribution, as SGLang reports it), computed before `sample` modifies the logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from loom.runtime.constrained.bitmask import apply_token_bitmask_
from loom.runtime.sampling_params import SamplingParams


@dataclass
class SamplingBatchInfo:
    """Per-step sampling state of a batch; rows follow the order of the requests.

    Rows that are greedy carry neutral values (temperature 1, no top-k / top-p / min-p), so the
    `need_*` flags say whether any *sampled* row needs that filter.
    """

    temperatures: torch.Tensor  # [B, 1] fp32
    top_ps: torch.Tensor  # [B] fp32
    top_ks: torch.Tensor  # [B] int64; vocab_size where disabled
    min_ps: torch.Tensor  # [B] fp32
    is_all_greedy: bool
    greedy_rows: torch.Tensor | None  # [B] bool; None when no row is greedy
    need_top_p: bool
    need_top_k: bool
    need_min_p: bool
    max_top_k: int  # the largest top-k of any sampled row (vocab_size when some row has none)
    # Penalties: None when no row in the batch uses them.
    frequency_penalties: torch.Tensor | None  # [B, 1] fp32
    presence_penalties: torch.Tensor | None  # [B, 1] fp32
    output_counts: torch.Tensor | None  # [B, V] fp32: occurrences of each token in the output so far
    repetition_penalties: torch.Tensor | None  # [B, 1] fp32
    seen_tokens: torch.Tensor | None  # [B, V] bool: token occurs in the prompt or the output
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) forced to -inf
    generators: list[torch.Generator | None]  # one per row; None: the global RNG
    vocab_size: int
    # Grammar masks: (packed bitmask [G, ceil(V / 32)] int32, the G rows it applies to); None: no grammar.
    vocab_mask: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        output_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
        generators: Sequence[torch.Generator | None] | None = None,
        prompt_ids: Sequence[Sequence[int]] | None = None,
        banned_ids: Sequence[Sequence[int]] | None = None,
    ) -> SamplingBatchInfo:
        """Build the batch's sampling state.

        output_ids: each request's generated tokens so far (frequency / presence / repetition).
        prompt_ids: each request's prompt (repetition penalty counts prompt tokens too); None
            means prompt tokens are not penalised.
        banned_ids: per request, token ids that must not be drawn this step (the scheduler passes
            EOS and stop_token_ids while a request has fewer than min_new_tokens outputs).
        generators: per request, the seeded generator its random draws come from, or None.
        """
        B, V = len(params), vocab_size
        assert len(output_ids) == B, f"{len(output_ids)} output id lists for {B} requests"
        generators = list(generators) if generators is not None else [None] * B
        assert len(generators) == B, f"{len(generators)} generators for {B} requests"

        greedy = [p.is_greedy for p in params]
        # One host -> device copy for the four per-row knobs; greedy rows get neutral values.
        knobs = [
            (1.0, 1.0, 0.0, V) if g else (p.temperature, p.top_p, p.min_p, min(p.top_k, V) if p.top_k > 0 else V)
            for p, g in zip(params, greedy)
        ]
        packed = torch.tensor(knobs, dtype=torch.float32).reshape(B, 4).to(device)  # [B, 4]
        top_ks_list = [k[3] for k in knobs]

        freq = [p.frequency_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        rep = [p.repetition_penalty for p in params]
        count_rows = [i for i in range(B) if freq[i] != 0 or pres[i] != 0]
        rep_rows = [i for i in range(B) if rep[i] != 1]

        output_counts = None
        if count_rows:
            rows, cols = _flat_index([output_ids[i] for i in count_rows], count_rows, device)
            output_counts = torch.zeros(B, V, dtype=torch.float32, device=device)
            output_counts.index_put_((rows, cols), torch.ones_like(cols, dtype=torch.float32), accumulate=True)
        seen_tokens = None
        if rep_rows:
            seqs = [chain(prompt_ids[i] if prompt_ids is not None else (), output_ids[i]) for i in rep_rows]
            rows, cols = _flat_index([list(s) for s in seqs], rep_rows, device)
            seen_tokens = torch.zeros(B, V, dtype=torch.bool, device=device)
            seen_tokens[rows, cols] = True
        banned = None
        if banned_ids is not None and any(banned_ids):
            assert len(banned_ids) == B, f"{len(banned_ids)} banned id lists for {B} requests"
            ban_rows = [i for i in range(B) if banned_ids[i]]
            banned = _flat_index([banned_ids[i] for i in ban_rows], ban_rows, device)

        sampled = [not g for g in greedy]
        return cls(
            temperatures=packed[:, 0:1].contiguous(),
            top_ps=packed[:, 1].contiguous(),
            top_ks=packed[:, 3].to(torch.int64),
            min_ps=packed[:, 2].contiguous(),
            is_all_greedy=all(greedy),
            greedy_rows=torch.tensor(greedy, dtype=torch.bool, device=device) if any(greedy) else None,
            need_top_p=any(s and p.top_p < 1 for s, p in zip(sampled, params)),
            need_top_k=any(s and k < V for s, k in zip(sampled, top_ks_list)),
            need_min_p=any(s and p.min_p > 0 for s, p in zip(sampled, params)),
            max_top_k=max((k for s, k in zip(sampled, top_ks_list) if s), default=V),
            frequency_penalties=_column(freq, device) if any(freq) else None,
            presence_penalties=_column(pres, device) if any(pres) else None,
            output_counts=output_counts,
            repetition_penalties=_column(rep, device) if rep_rows else None,
            seen_tokens=seen_tokens,
            banned=banned,
            # A greedy row never draws, so its generator is left untouched.
            generators=[None if g else gen for g, gen in zip(greedy, generators)],
            vocab_size=V,
        )


def plain_argmax(params: Sequence[SamplingParams]) -> bool:
    """Whether every row's next token is the argmax of its raw logits: greedy, no penalty. `sample`
    then gives `logits.argmax(-1)` (when nothing is banned and no grammar masks), so the caller may
    skip `SamplingBatchInfo`: building it (four small tensors) cost about as much as a batch-1 decode
    step's attention on the CPU."""
    return all(p.is_greedy and p.frequency_penalty == 0 and p.presence_penalty == 0 and p.repetition_penalty == 1
               for p in params)  # fmt: skip


def _column(values: list[float], device: torch.device | str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1).to(device)  # [B, 1]


def _flat_index(
    seqs: Sequence[Sequence[int]], rows: Sequence[int], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs for every token of seqs[j], which belongs to batch row rows[j]."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    row_idx = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), lengths)
    col_idx = torch.tensor(list(chain.from_iterable(seqs)), dtype=torch.int64)
    return row_idx.to(device), col_idx.to(device)


def apply_penalties_and_bans(logits: torch.Tensor, info: SamplingBatchInfo) -> None:
    """Penalise and ban in place (vLLM's order): repetition, then frequency and presence, then bans.

    repetition: for tokens seen in the prompt or output, logit / r if logit > 0 else logit * r
    frequency:  logit -= f * count(token in output)
    presence:   logit -= p * (count(token in output) > 0)
    bans:       logit = -inf
    grammar:    logit = -inf for tokens the row's grammar does not allow here
    """
    # logits: [B, V] fp32
    if info.repetition_penalties is not None:
        r = torch.where(info.seen_tokens, info.repetition_penalties, 1.0)  # [B, V]
        torch.where(logits > 0, logits / r, logits * r, out=logits)
    if info.frequency_penalties is not None:
        logits.sub_(info.frequency_penalties * info.output_counts)
    if info.presence_penalties is not None:
        logits.sub_(info.presence_penalties * (info.output_counts > 0))
    if info.banned is not None:
        logits[info.banned] = float("-inf")
    if info.vocab_mask is not None:
        apply_token_bitmask_(logits, info.vocab_mask[0], info.vocab_mask[1])


def sample(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Next token id per row -> [B] int64. Applies penalties and bans to `logits` in place (when
    they are fp32; other dtypes are copied to fp32 first).

    Greedy rows (temperature 0 or top_k 1) take exactly `torch.argmax` of the penalised logits.
    A token whose probability is 0 after top-k / top-p / min-p is never drawn.
    """
    # logits: [B, V]
    if logits.dtype != torch.float32:
        logits = logits.float()
    apply_penalties_and_bans(logits, info)
    if info.is_all_greedy:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits / info.temperatures, dim=-1)  # [B, V]
    weights, ids = _candidates(probs, info)  # [B, N] each (ids None: N == V in vocab order)
    pick = _draw(weights, info.generators)  # [B]
    next_ids = pick if ids is None else ids.gather(1, pick.view(-1, 1)).view(-1)
    if info.greedy_rows is not None:
        next_ids = torch.where(info.greedy_rows, torch.argmax(logits, dim=-1), next_ids)
    return next_ids


def _candidates(probs: torch.Tensor, info: SamplingBatchInfo) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply top-k, then top-p, then min-p by zeroing weights (no renormalisation: the draw only
    needs them proportional); top-p measures mass within what top-k kept, as Transformers does.

    -> (weights [B, N], token ids [B, N]) best first, or (weights [B, V], None) in vocab order
    when no filter needs an order. When every sampled row caps top-k, only the best
    `max_top_k` are looked at (a topk instead of a sort of the whole vocabulary).
    """
    # probs: [B, V]
    if not (info.need_top_k or info.need_top_p):
        if info.need_min_p:
            threshold = probs.amax(dim=-1, keepdim=True) * info.min_ps.view(-1, 1)  # [B, 1]
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs, None
    if info.max_top_k < probs.shape[-1]:
        weights, ids = probs.topk(info.max_top_k, dim=-1)  # [B, K] each, sorted
    else:
        weights, ids = probs.sort(dim=-1, descending=True, stable=True)  # [B, V] each
    if info.need_top_k:
        ranks = torch.arange(weights.shape[-1], device=probs.device).view(1, -1)  # [1, N]
        weights = weights.masked_fill(ranks >= info.top_ks.view(-1, 1), 0.0)
    if info.need_top_p:
        cumulative = weights.cumsum(dim=-1)  # [B, N]
        kept_mass = cumulative[:, -1:]  # [B, 1]
        # Keep a token while the mass ranked strictly above it is within top_p; the top token
        # always stays (its exclusive sum is 0).
        beyond = (cumulative - weights) > info.top_ps.view(-1, 1) * kept_mass
        weights = weights.masked_fill(beyond, 0.0)
    if info.need_min_p:
        threshold = weights[:, :1] * info.min_ps.view(-1, 1)  # [B, 1]: top prob * min_p
        weights = weights.masked_fill(weights < threshold, 0.0)
    return weights, ids


def _draw(weights: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One draw per row from unnormalised, non-negative weights -> column index [B].

    Inverse CDF: one uniform per row, so a seeded row consumes exactly one number of its own
    generator per step, whatever else is in the batch; no host sync.
    """
    # weights: [B, N]
    B = weights.shape[0]
    u = torch.rand(B, 1, device=weights.device)  # [B, 1], global RNG
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if seeded:
        own = [torch.rand(1, generator=generators[i], device=generators[i].device) for i in seeded]
        u[seeded] = torch.cat([x.to(weights.device) for x in own]).view(-1, 1)
    cdf = weights.cumsum(dim=-1)  # [B, N]
    total = cdf[:, -1:]  # [B, 1], > 0: every filter keeps the best token
    # x < total, so some cdf entry exceeds it; the first one rose above its predecessor, so its
    # token has weight > 0.
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    pick = torch.searchsorted(cdf, x, right=True).view(-1).clamp_(max=weights.shape[-1] - 1)
    # A parallel scan (GPU cumsum) need not be monotone to the last bit: never return a zero.
    return torch.where(weights.gather(1, pick.view(-1, 1)).view(-1) > 0, pick, weights.argmax(dim=-1))


def compute_logprobs(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """log_softmax in fp32 of the raw logits (before penalties and temperature) -> [B, V]: the
    model's own distribution, which is what users receive as token logprobs. `out` (fp32
    [B, V], from a `ScratchRows`) receives them instead of a fresh tensor."""
    # logits: [B, V]
    if out is not None and logits.dtype == torch.float32:
        return torch._log_softmax(logits, -1, False, out=out)
    return torch.log_softmax(logits.float(), dim=-1)


class ScratchRows:
    """An fp32 [rows, cols] block on the CPU kept from one call to the next, for the scheduler's
    per-step logits and logprobs. A prefill step that scores many prompt tokens (a batch of
    `select` choices: 2000 rows over a 49k vocabulary, 390 MB) would otherwise get a fresh block
    each time, and the page faults of touching it cost more than the log_softmax written into it.
    Fewer than `min_rows` rows, or another device, get None (a fresh tensor is cheap there). The
    view handed out is valid until the next `get`: one owner, one step at a time. Bounded: one
    block, as large as the largest step asked for (a new vocabulary width replaces it); the
    scheduler drops it on /flush_cache."""

    ROUND = 256  # rows are allocated in multiples of this, so the block is not regrown each step

    def __init__(self, min_rows: int = 64) -> None:
        self.min_rows = min_rows
        self._block: torch.Tensor | None = None

    def get(self, rows: int, cols: int, device: torch.device) -> torch.Tensor | None:
        if device.type != "cpu" or rows < self.min_rows:
            return None
        block = self._block
        if block is None or block.shape[0] < rows or block.shape[1] != cols:
            self._block = block = None  # let the old block go before the new one is allocated
            self._block = block = torch.empty(-(-rows // self.ROUND) * self.ROUND, cols, dtype=torch.float32)
        return block[:rows]


def gather_top_logprobs(logprobs: torch.Tensor, k: Sequence[int]) -> list[list[tuple[float, int]]]:
    """Per row the k[row] most likely tokens as (logprob, token id), best first; k[row] == 0
    gives []. One topk and one device -> host copy for the whole batch."""
    # logprobs: [B, V]
    assert len(k) == logprobs.shape[0], f"{len(k)} k values for {logprobs.shape[0]} rows"
    k_max = min(max(k, default=0), logprobs.shape[-1])
    if k_max <= 0:
        return [[] for _ in k]
    values, ids = logprobs.topk(k_max, dim=-1)  # [B, k_max] each
    values_l, ids_l = values.tolist(), ids.tolist()
    return [list(zip(values_l[row][:n], ids_l[row][:n])) for row, n in enumerate(k)]
