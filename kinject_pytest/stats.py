"""Statistics over a run's verdicts: retention with its confidence interval and a test for change.

Two questions get a number each:

* How much of what the base knows does the candidate keep? The retention rate is a binomial
  proportion (retained facts out of the facts the base knows), reported with its Wilson score
  interval, which stays inside [0, 1] and keeps a useful width at rates of 0% and 100%.
* Does the candidate know more or fewer facts than the base? Base and candidate answer the same
  facts, so the answers are paired, and the exact McNemar test compares the two kinds of
  disagreement: facts the base knows and the candidate does not ("lost"), and facts the candidate
  knows and the base does not ("gained").

Nothing here imports torch; the inputs are :class:`~kinject_pytest.verdict.Verdict` objects.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable

from .session import Outcome
from .verdict import GAINED, REGRESSED, RETAINED, UNKNOWN, Verdict


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Return the Wilson score interval ``(low, high)`` for a binomial proportion ``successes / trials``.

    ``confidence`` is the two-sided coverage, 0.95 for a 95% interval. With no trials the
    proportion is undetermined, so the interval is the whole range ``(0.0, 1.0)``. Raises
    ``ValueError`` for negative counts, more successes than trials, or a confidence outside (0, 1).
    """
    if trials < 0 or successes < 0 or successes > trials:
        raise ValueError(f"invalid binomial counts: {successes} successes out of {trials} trials")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"invalid confidence {confidence!r}: expected a value between 0 and 1, such as 0.95")
    if trials == 0:
        return 0.0, 1.0

    z = statistics.NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    proportion = successes / trials
    z_squared_over_n = z * z / trials
    center = (proportion + z_squared_over_n / 2.0) / (1.0 + z_squared_over_n)
    half_width = (z / (1.0 + z_squared_over_n)) * math.sqrt(
        proportion * (1.0 - proportion) / trials + z_squared_over_n / (4.0 * trials)
    )

    # At 0 and at 100% the interval ends exactly at the bound, but the subtraction above leaves a
    # rounding error there (2.8e-17 for 0 out of 10), so those ends are set exactly.
    low = 0.0 if successes == 0 else max(0.0, center - half_width)
    high = 1.0 if successes == trials else min(1.0, center + half_width)
    return low, high


def mcnemar_exact(lost: int, gained: int) -> float:
    """Return the two-sided p-value of the exact McNemar test on the two discordant counts.

    Under the null hypothesis that base and candidate know the same share of facts, each
    discordant fact is lost or gained with probability 1/2, so the smaller count follows
    Binomial(lost + gained, 1/2). The p-value is twice that count's lower tail, capped at 1. With
    no discordant facts there is no evidence of a change and the p-value is 1.0.

    The tail is summed in exact integers, so counts in the thousands do not overflow. A p-value
    below the smallest positive float (about 5e-324) comes back as 0.0.
    """
    if lost < 0 or gained < 0:
        raise ValueError(f"invalid discordant counts lost={lost}, gained={gained}: both must be 0 or more")
    trials = lost + gained
    if trials == 0:
        return 1.0

    # Each binomial coefficient comes from the one before, C(n, k + 1) = C(n, k) * (n - k) / (k + 1),
    # which is exact in integers and much faster than calling math.comb for every k.
    smaller = min(lost, gained)
    coefficient = 1
    lower_tail = 1
    for k in range(smaller):
        coefficient = coefficient * (trials - k) // (k + 1)
        lower_tail += coefficient
    # Python divides two integers with correct rounding, without converting 2**trials to a float.
    return min(1.0, 2 * lower_tail / 2**trials)


@dataclass(frozen=True)
class RetentionStats:
    """Counts and statistics of one group of verdicts: a whole run or the facts of one tag."""

    known: int  # facts the base knows: retained + regressed
    retained: int
    regressed: int
    gained: int
    unknown: int
    lost: int  # facts the base knows and the candidate does not, so a tolerance failure alone is not lost
    retention_rate: float | None  # retained / known as a proportion in [0, 1], or None when known is 0
    wilson_low: float  # 95% Wilson score interval of retention_rate, or (0.0, 1.0) when known is 0
    wilson_high: float
    mcnemar_p: float  # exact McNemar p-value of lost against gained, or 1.0 when both are 0
    mean_kl: float | None  # KL(base || candidate) in nats over facts the base knows, or None without values
    max_kl: float | None


def retention_stats(verdicts: Iterable[Verdict]) -> RetentionStats:
    """Compute the counts, the retention rate with its 95% Wilson interval, McNemar's p and KL.

    A fact that regressed only on a tolerance (``kl`` or ``logprob_drop``) still counts as known by
    the candidate, so it lowers the retention rate but is not a discordant pair for McNemar.
    """
    counts = dict.fromkeys((RETAINED, REGRESSED, GAINED, UNKNOWN), 0)
    lost = 0
    kls: list[float] = []
    for verdict in verdicts:
        counts[verdict.status] += 1
        base_knows = verdict.status in (RETAINED, REGRESSED)
        if base_knows and not any(verdict.candidate_checks.values()):
            lost += 1
        if base_knows and verdict.kl is not None:
            kls.append(verdict.kl)

    known = counts[RETAINED] + counts[REGRESSED]
    low, high = wilson_interval(counts[RETAINED], known)
    return RetentionStats(
        known=known,
        retained=counts[RETAINED],
        regressed=counts[REGRESSED],
        gained=counts[GAINED],
        unknown=counts[UNKNOWN],
        lost=lost,
        retention_rate=counts[RETAINED] / known if known else None,
        wilson_low=low,
        wilson_high=high,
        mcnemar_p=mcnemar_exact(lost, counts[GAINED]),
        mean_kl=statistics.fmean(kls) if kls else None,
        max_kl=max(kls) if kls else None,
    )


def per_tag_stats(outcomes: Iterable[Outcome]) -> dict[str, RetentionStats]:
    """Compute :func:`retention_stats` for each tag, keyed by tag name in sorted order.

    A fact with several tags counts in each of them. Outcomes without a verdict (facts that have no
    usable snapshot entry) and facts without tags are left out.
    """
    by_tag: dict[str, list[Verdict]] = {}
    for outcome in outcomes:
        if outcome.verdict is None:
            continue
        for tag in dict.fromkeys(outcome.fact.tags):  # a tag listed twice counts once
            by_tag.setdefault(tag, []).append(outcome.verdict)
    return {tag: retention_stats(by_tag[tag]) for tag in sorted(by_tag)}
