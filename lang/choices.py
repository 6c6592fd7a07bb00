"""How `select` picks among its choices, given each choice's token log-probabilities.

For every choice the backend finds the tokens that spell it after the prompt, and the
log-probability of each given everything before it (`ChoiceScores.token_logprobs[i]`). When the
prompt's last token merges with the start of a choice (a prompt ending in a space before a word,
say), that merged token is counted as part of the choice: it is the token the model would have to
emit to continue the prompt with the choice.

- `token_length_normalized` (the default): the mean log-probability of the choice's tokens.
  Long choices are not punished for their length.
- `greedy_token_selection`: compare the choices token by token, as greedy decoding would: keep
  the choices whose first token is most likely, then among those the second, and so on. A choice
  that runs out of tokens is padded with its own mean log-probability.
- `unconditional_likelihood_normalized`: the mean over the choice's tokens of
  logp(token | prompt, earlier choice tokens) - logp(token | earlier choice tokens only), the first
  unconditional term counted as 0 (nothing precedes it). Favours choices the prompt makes more
  likely than they are on their own; needs one more request for the unconditional terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ChoiceScores:
    """What a backend measured for one `select`; `token_logprobs[i][j]` is choice i's token j."""

    choices: list[str]
    token_logprobs: list[list[float]]
    token_ids: list[list[int]]
    unconditional_logprobs: list[list[float | None]] | None = None
    meta_info: dict[str, Any] = field(default_factory=dict)

    @property
    def normalized_logprobs(self) -> list[float]:
        return [sum(lps) / len(lps) for lps in self.token_logprobs]


@dataclass(frozen=True, slots=True)
class Decision:
    choice: str
    scores: list[float]  # what was compared (one number per choice, higher is better)
    meta_info: dict[str, Any]


class ChoicesMethod:
    """Base of the choice methods: `decide(scores) -> Decision`."""

    name = "base"
    requires_unconditional_logprobs = False

    def decide(self, scores: ChoiceScores) -> Decision:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name

    def _decision(self, scores: ChoiceScores, values: list[float], **extra: Any) -> Decision:
        best = max(range(len(values)), key=values.__getitem__)  # ties: the first choice
        meta = {
            **scores.meta_info,
            "choices_method": self.name,
            "normalized_prompt_logprobs": scores.normalized_logprobs,
            "choice_token_logprobs": scores.token_logprobs,
            "choice_token_ids": scores.token_ids,
            **extra,
        }
        return Decision(scores.choices[best], values, meta)


class TokenLengthNormalized(ChoicesMethod):
    name = "token_length_normalized"

    def decide(self, scores: ChoiceScores) -> Decision:
        return self._decision(scores, scores.normalized_logprobs)


class GreedyTokenSelection(ChoicesMethod):
    name = "greedy_token_selection"

    def decide(self, scores: ChoiceScores) -> Decision:
        width = max(len(lps) for lps in scores.token_logprobs)
        rows = [lps + [sum(lps) / len(lps)] * (width - len(lps)) for lps in scores.token_logprobs]
        remaining = list(range(len(rows)))
        for j in range(width):
            top = max(rows[i][j] for i in remaining)
            remaining = [i for i in remaining if rows[i][j] == top]
            if len(remaining) == 1:
                break
        values = [1.0 if i == remaining[0] else 0.0 for i in range(len(rows))]
        return self._decision(scores, values, greedy_logprob_matrix=rows)


class UnconditionalLikelihoodNormalized(ChoicesMethod):
    name = "unconditional_likelihood_normalized"
    requires_unconditional_logprobs = True

    def decide(self, scores: ChoiceScores) -> Decision:
        assert scores.unconditional_logprobs is not None, "the backend did not measure unconditional log-probabilities"
        values = []
        for cond, uncond in zip(scores.token_logprobs, scores.unconditional_logprobs):
            diffs = [c - (u or 0.0) for c, u in zip(cond, uncond)]
            values.append(sum(diffs) / len(diffs))
        return self._decision(scores, values, unconditional_token_logprobs=scores.unconditional_logprobs,
                              normalized_unconditional_prompt_logprobs=values)  # fmt: skip


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
METHODS = {m.name: m for m in (token_length_normalized, greedy_token_selection, unconditional_likelihood_normalized)}


def resolve(method: Any) -> ChoicesMethod:
    """A method object, or its name."""
    if isinstance(method, ChoicesMethod):
        return method
    if isinstance(method, str) and method in METHODS:
        return METHODS[method]
    raise ValueError(f"choices_method must be one of {sorted(METHODS)} (or a ChoicesMethod), got {method!r}")
