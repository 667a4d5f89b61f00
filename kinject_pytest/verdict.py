"""Compare a candidate's result for a fact with the base's recorded result.

Plain numbers in, a :class:`Verdict` out; nothing here imports torch.

Whether a model "knows" a fact is decided by one or two checks:

* ``generation``: its greedy completion matches an accepted answer under the fact's match rule;
* ``choice`` (facts with ``choices`` only): an accepted answer has a higher total log-probability
  than every distractor.

The model knows the fact when any check passes. A candidate has ``regressed`` on a fact the base knew
when it fails a check the base passed, or when it moved past one of the fact's tolerances:

* ``kl``: KL(base || candidate) over the base's recorded top-k next tokens plus the rest, nats;
* ``logprob_drop``: how much the best accepted answer's log-probability fell, nats;
* ``top_k_overlap``: the fraction of the base's top-k next tokens still among the candidate's
  own top-k, which must stay at or above the limit;
* ``rank_change`` (facts with ``choices``): how many places the best accepted answer fell in the
  ranking of answers and choices by total log-probability.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from .engine import FactResult, kl_divergence
from .suite import Fact, Tolerance

RETAINED = "retained"
REGRESSED = "regressed"
GAINED = "gained"
UNKNOWN = "unknown"
STATUSES = (RETAINED, REGRESSED, GAINED, UNKNOWN)

# A KL of 0.5 nats is about what turning a 50/50 split into 90/10 costs (0.51 nats); a
# log-probability drop of 1 nat makes the expected answer e (about 2.7) times less likely.
#
# top_k_overlap is a fraction of the base's top-k tokens (top-20 by default) and rank_change a
# number of places. bench/measure_tolerances.py sized both on the shipped suite's 740 facts that
# SmolLM2 knows, against the committed float32 snapshot. The base re-scored in float32 keeps every
# top-20 token and every rank (overlap 1.0, change 0 on all 740 facts). In bfloat16 its lowest
# overlap is 0.85 and its largest fall 1 place (2 facts), so neither default flags it there.
# The fixture full fine-tune (12 steps at 3e-5) keeps a median of 0.65 of the top-20, with a
# minimum of 0.05. At 0.3 the check flags facts whose top-20 was mostly replaced: 16 facts on the
# fixture LoRA adapter and 1 on the full fine-tune that no other check flags. A fall of 1 place
# is let through, since near-ties swap neighbours. On both fixtures every larger fall also fails
# the choice check, so rank_change adds no regressed fact there.
DEFAULT_TOLERANCE = Tolerance(kl=0.5, logprob_drop=1.0, top_k_overlap=0.3, rank_change=1)

_TRAILING_PUNCTUATION = ".,;:!?\"')]"


@dataclass(frozen=True)
class Verdict:
    """The outcome for one fact, with every number a failure report needs."""

    fact_id: str
    status: str
    failed_checks: tuple[str, ...]
    base_checks: dict[str, bool]
    candidate_checks: dict[str, bool]
    base_completion: str
    candidate_completion: str
    base_logprob: float | None  # best accepted answer, nats; None for regex facts
    candidate_logprob: float | None
    kl: float | None  # KL(base || candidate) over the base's top-k plus the rest, nats
    tolerance: Tolerance
    top_k_overlap: float | None = None  # fraction of the base's top-k tokens in the candidate's top-k
    base_rank: int | None = None  # 1-based rank of the best accepted answer among answers and choices
    candidate_rank: int | None = None

    @property
    def passed(self) -> bool:
        return self.status != REGRESSED

    @property
    def logprob_drop(self) -> float | None:
        if self.base_logprob is None or self.candidate_logprob is None:
            return None
        return self.base_logprob - self.candidate_logprob

    @property
    def rank_change(self) -> int | None:
        """Places the best accepted answer fell (negative when it rose); None for facts without choices."""
        if self.base_rank is None or self.candidate_rank is None:
            return None
        return self.candidate_rank - self.base_rank


def top_k_overlap(base_ids: Sequence[int], candidate_ids: Sequence[int]) -> float | None:
    """Return the fraction of ``base_ids`` that are also in ``candidate_ids``; None without base tokens.

    Both are top-k token ids after the same prompt. With lists of equal length the value is
    symmetric in its arguments.
    """
    base = set(base_ids)
    if not base:
        return None
    return len(base & set(candidate_ids)) / len(base)


def answer_rank(answer_logprobs: Sequence[float], choice_logprobs: Sequence[float]) -> int | None:
    """Return the 1-based rank of the best accepted answer among answers and choices by total log-probability.

    A choice that ties the best answer ranks above it, as in the ``choice`` check, so rank 1 means
    that check passes. Returns None without choices or without answer log-probabilities (regex facts).
    """
    if not choice_logprobs or not answer_logprobs:
        return None
    best = max(answer_logprobs)
    return 1 + sum(1 for logprob in choice_logprobs if logprob >= best)


def completion_matches(completion: str, answer: str, rule: str) -> bool:
    """Return whether a greedy completion gives ``answer`` under a match rule.

    Leading whitespace of the completion is ignored. ``prefix``, ``exact`` and ``contains`` compare
    case-insensitively (``str.casefold``) and need the answer to end at a word boundary, so
    "Paris." matches "Paris" but "Parisian" does not. ``exact`` compares the completion's first line
    with trailing punctuation removed from both. ``regex`` runs ``re.search`` on the completion
    with leading whitespace removed, and is case-sensitive unless the pattern says otherwise.
    """
    text = completion.lstrip()
    if rule == "regex":
        return re.search(answer, text) is not None
    if rule == "exact":
        first_line = text.split("\n", 1)[0].rstrip().rstrip(_TRAILING_PUNCTUATION).rstrip()
        expected = answer.strip().rstrip(_TRAILING_PUNCTUATION).rstrip()
        return first_line.casefold() == expected.casefold()

    pattern = re.escape(answer.strip().casefold()) + r"(?!\w)"
    if rule == "prefix":
        return re.match(pattern, text.casefold()) is not None
    if rule == "contains":
        return re.search(r"(?<!\w)" + pattern, text.casefold()) is not None
    raise ValueError(f"unknown match rule {rule!r}")


def knowledge_checks(fact: Fact, result: FactResult) -> dict[str, bool]:
    """Run the fact's checks on one model's result; see the module docstring."""
    checks = {
        "generation": any(completion_matches(result.completion, answer, fact.match) for answer in fact.expect),
    }
    # A regex fact's answers are patterns, not text the model could be scored on.
    if fact.choices and result.answer_logprobs:
        checks["choice"] = max(result.answer_logprobs) > max(result.choice_logprobs)
    return checks


def judge(fact: Fact, base: FactResult, candidate: FactResult, tolerance: Tolerance) -> Verdict:
    """Return the verdict for ``fact``; ``tolerance`` is the effective one, every field set."""
    base_checks = knowledge_checks(fact, base)
    candidate_checks = knowledge_checks(fact, candidate)
    base_knows = any(base_checks.values())
    candidate_knows = any(candidate_checks.values())

    kl = None
    if len(candidate.probe_logprobs) == len(base.top_logprobs):
        kl = kl_divergence(base.top_logprobs, candidate.probe_logprobs)
    base_logprob = max(base.answer_logprobs, default=None)
    candidate_logprob = max(candidate.answer_logprobs, default=None)
    drop = None if base_logprob is None or candidate_logprob is None else base_logprob - candidate_logprob
    overlap = top_k_overlap(base.top_token_ids, candidate.top_token_ids) if candidate.top_token_ids else None
    base_rank = answer_rank(base.answer_logprobs, base.choice_logprobs)
    candidate_rank = answer_rank(candidate.answer_logprobs, candidate.choice_logprobs)
    fell = None if base_rank is None or candidate_rank is None else candidate_rank - base_rank

    failed: list[str] = []
    if base_knows:
        failed += [name for name, passed in base_checks.items() if passed and not candidate_checks[name]]
        if kl is not None and tolerance.kl is not None and kl > tolerance.kl:
            failed.append("kl")
        if drop is not None and tolerance.logprob_drop is not None and drop > tolerance.logprob_drop:
            failed.append("logprob_drop")
        if overlap is not None and tolerance.top_k_overlap is not None and overlap < tolerance.top_k_overlap:
            failed.append("top_k_overlap")
        if fell is not None and tolerance.rank_change is not None and fell > tolerance.rank_change:
            failed.append("rank_change")

    if base_knows:
        status = REGRESSED if failed else RETAINED
    else:
        status = GAINED if candidate_knows else UNKNOWN

    return Verdict(
        fact_id=fact.id,
        status=status,
        failed_checks=tuple(failed),
        base_checks=base_checks,
        candidate_checks=candidate_checks,
        base_completion=base.completion,
        candidate_completion=candidate.completion,
        base_logprob=base_logprob,
        candidate_logprob=candidate_logprob,
        kl=kl,
        tolerance=tolerance,
        top_k_overlap=overlap,
        base_rank=base_rank,
        candidate_rank=candidate_rank,
    )


def count_statuses(verdicts: Iterable[Verdict]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for verdict in verdicts:
        counts[verdict.status] += 1
    return counts
