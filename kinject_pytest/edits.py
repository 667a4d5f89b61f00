"""Taught facts: did the fine-tune learn the new answer it was trained on?

The metrics follow CounterFact (Meng et al., "Locating and Editing Factual Associations in GPT",
NeurIPS 2022). A model prefers the new answer on a prompt when the new answer's per-token mean
negative log-likelihood (NLL, in nats) is lower than the old answer's. Mean NLL per token, not total
log-probability, so that an answer of three tokens is not penalised against one of one token.

* efficacy: the candidate prefers the new answer on the fact's own prompt;
* paraphrase success: the fraction of the fact's paraphrase prompts on which it prefers the new answer;
* neighbourhood: every fact that is not taught, judged as usual (retention of what the base knew).

The old answer is the fact's first ``expect`` entry. Plain numbers in, records out; the queries are
built here, but scoring them is the engine's job.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .engine import FactResult, Query
from .suite import Fact

LEARNED = "learned"
NOT_LEARNED = "not_learned"
# The candidate is the base model itself, so there is no fine-tune to judge.
UNTRAINED = "untrained"
EDIT_STATUSES = (LEARNED, NOT_LEARNED, UNTRAINED)


@dataclass(frozen=True)
class PromptScores:
    """Total log-probabilities (nats) and token counts of the old and the new answer after one prompt."""

    prompt: str
    old_logprob: float
    old_token_count: int
    new_logprob: float
    new_token_count: int

    @property
    def old_nll(self) -> float:
        """Per-token mean NLL of the old answer, in nats."""
        return -self.old_logprob / self.old_token_count

    @property
    def new_nll(self) -> float:
        """Per-token mean NLL of the new answer, in nats."""
        return -self.new_logprob / self.new_token_count

    @property
    def prefers_new(self) -> bool:
        return self.new_nll < self.old_nll


@dataclass(frozen=True)
class EditScores:
    """One model's scores for a taught fact: on its prompt and on each of its paraphrases."""

    rewrite: PromptScores
    paraphrases: tuple[PromptScores, ...] = ()

    @property
    def efficacy(self) -> bool:
        return self.rewrite.prefers_new

    @property
    def paraphrase_success(self) -> float | None:
        """Fraction of paraphrase prompts on which the new answer is preferred, or None without paraphrases."""
        if not self.paraphrases:
            return None
        return sum(scores.prefers_new for scores in self.paraphrases) / len(self.paraphrases)

    def to_dict(self) -> dict[str, Any]:
        return {"rewrite": _prompt_dict(self.rewrite), "paraphrases": [_prompt_dict(item) for item in self.paraphrases]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditScores:
        """Rebuild scores written by `to_dict`; raises ``ValueError`` for a malformed record."""
        try:
            rewrite = _prompt_scores(data["rewrite"])
            paraphrases = tuple(_prompt_scores(item) for item in data["paraphrases"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"malformed taught-fact scores ({error!r})") from None
        return cls(rewrite, paraphrases)


@dataclass(frozen=True)
class EditVerdict:
    """The outcome for one taught fact: the base's and the candidate's scores, and the status."""

    fact_id: str
    status: str  # one of EDIT_STATUSES
    base: EditScores
    candidate: EditScores

    @property
    def passed(self) -> bool:
        return self.status != NOT_LEARNED


@dataclass(frozen=True)
class EditStats:
    """Efficacy and paraphrase success over the taught facts that were judged."""

    taught: int  # taught facts with scores, judged or not
    judged: int  # taught facts scored on a candidate other than the base
    learned: int
    efficacy: float | None  # learned / judged, or None when nothing was judged
    paraphrase_facts: int  # judged facts that have paraphrases
    paraphrase_success: float | None  # mean over those facts of their paraphrase success


def teach_queries(fact: Fact, key: str) -> list[Query]:
    """Return one query per prompt of a taught fact (its own prompt, then each paraphrase).

    Each query scores the old answer and then the new one; their keys are ``KEY::teach:INDEX``.
    """
    if fact.teach is None:
        return []
    answers = (fact.expect[0], fact.teach.answer)
    prompts = (fact.prompt, *fact.teach.paraphrases)
    return [Query(key=_teach_key(key, index), prompt=prompt, answers=answers) for index, prompt in enumerate(prompts)]


def edit_scores(fact: Fact, key: str, results: Mapping[str, FactResult]) -> EditScores:
    """Collect the results of `teach_queries` into `EditScores`."""
    assert fact.teach is not None
    prompts = (fact.prompt, *fact.teach.paraphrases)
    scores = []
    for index, prompt in enumerate(prompts):
        result = results[_teach_key(key, index)]
        scores.append(PromptScores(
            prompt=prompt,
            old_logprob=result.answer_logprobs[0],
            old_token_count=result.answer_token_counts[0],
            new_logprob=result.answer_logprobs[1],
            new_token_count=result.answer_token_counts[1],
        ))
    return EditScores(scores[0], tuple(scores[1:]))


def judge_edit(fact: Fact, base: EditScores, candidate: EditScores, *, candidate_is_base: bool) -> EditVerdict:
    """Return the verdict for a taught fact: learned when the candidate prefers the new answer on its prompt."""
    if candidate_is_base:
        status = UNTRAINED
    else:
        status = LEARNED if candidate.efficacy else NOT_LEARNED
    return EditVerdict(fact_id=fact.id, status=status, base=base, candidate=candidate)


def edit_stats(verdicts: Iterable[EditVerdict]) -> EditStats:
    """Count learned facts and average paraphrase success over the judged taught facts."""
    verdicts = list(verdicts)
    judged = [verdict for verdict in verdicts if verdict.status != UNTRAINED]
    learned = sum(verdict.status == LEARNED for verdict in judged)
    rates = [verdict.candidate.paraphrase_success for verdict in judged
             if verdict.candidate.paraphrase_success is not None]
    return EditStats(
        taught=len(verdicts),
        judged=len(judged),
        learned=learned,
        efficacy=learned / len(judged) if judged else None,
        paraphrase_facts=len(rates),
        paraphrase_success=statistics.fmean(rates) if rates else None,
    )


def _teach_key(key: str, index: int) -> str:
    return f"{key}::teach:{index}"


def _prompt_dict(scores: PromptScores) -> dict[str, Any]:
    return {
        "prompt": scores.prompt,
        "old_logprob": scores.old_logprob,
        "old_token_count": scores.old_token_count,
        "new_logprob": scores.new_logprob,
        "new_token_count": scores.new_token_count,
    }


def _prompt_scores(data: Mapping[str, Any]) -> PromptScores:
    scores = PromptScores(
        prompt=str(data["prompt"]),
        old_logprob=float(data["old_logprob"]),
        old_token_count=int(data["old_token_count"]),
        new_logprob=float(data["new_logprob"]),
        new_token_count=int(data["new_token_count"]),
    )
    if scores.old_token_count < 1 or scores.new_token_count < 1:
        raise ValueError("token counts must be 1 or more")
    if not (math.isfinite(scores.old_logprob) and math.isfinite(scores.new_logprob)):
        raise ValueError("log-probabilities must be finite")
    return scores
