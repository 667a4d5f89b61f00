"""Wilson intervals, the exact McNemar test and the per-run and per-tag statistics, on hand-made verdicts."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kinject_pytest.session import Outcome
from kinject_pytest.stats import RetentionStats, mcnemar_exact, per_tag_stats, retention_stats, wilson_interval
from kinject_pytest.suite import Fact, Tolerance
from kinject_pytest.verdict import GAINED, REGRESSED, RETAINED, UNKNOWN, Verdict

# The 0.975 quantile of the standard normal distribution, written out so that the expected values
# below do not depend on the same NormalDist call as the code under test.
Z_95 = 1.959963984540054


def closed_form_wilson(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The textbook form: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = successes / trials
    denominator = 1 + z**2 / trials
    center = p + z**2 / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z**2 / (4 * trials**2))
    return (center - spread) / denominator, (center + spread) / denominator


def make_verdict(fact_id: str, status: str, *, candidate_knows: bool, kl: float | None = None) -> Verdict:
    base_knows = status in (RETAINED, REGRESSED)
    return Verdict(
        fact_id=fact_id,
        status=status,
        failed_checks=("generation",) if status == REGRESSED and not candidate_knows else (),
        base_checks={"generation": base_knows},
        candidate_checks={"generation": candidate_knows},
        base_completion=" Paris",
        candidate_completion=" Paris" if candidate_knows else " Lyon",
        base_logprob=-0.2,
        candidate_logprob=-0.4,
        kl=kl,
        tolerance=Tolerance(kl=0.5, logprob_drop=1.0),
    )


def make_outcome(fact_id: str, tags: tuple[str, ...], verdict: Verdict | None) -> Outcome:
    fact = Fact(id=fact_id, prompt="The capital of France is", expect=("Paris",), tags=tags)
    if verdict is None:
        return Outcome(fact, error="no snapshot entry")
    return Outcome(fact, verdict=verdict)


# Wilson score interval


@pytest.mark.parametrize(("successes", "trials"), [(740, 740), (138, 740), (5, 10), (0, 10), (1, 1)])
def test_wilson_matches_closed_form(successes, trials):
    low, high = wilson_interval(successes, trials)
    expected_low, expected_high = closed_form_wilson(successes, trials)
    assert low == pytest.approx(max(0.0, expected_low), abs=1e-9)
    assert high == pytest.approx(min(1.0, expected_high), abs=1e-9)


def test_wilson_all_successes_reaches_one():
    low, high = wilson_interval(740, 740)
    # With p = 1 the lower bound simplifies to n / (n + z²).
    assert low == pytest.approx(740 / (740 + Z_95**2), abs=1e-9)
    assert high == 1.0


def test_wilson_no_successes_starts_at_zero():
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(Z_95**2 / (10 + Z_95**2), abs=1e-9)


def test_wilson_half_is_symmetric():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2365931, abs=1e-7)
    assert high == pytest.approx(1 - low, abs=1e-12)


def test_wilson_no_trials_is_whole_range():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_higher_confidence_is_wider():
    low_95, high_95 = wilson_interval(138, 740, 0.95)
    low_99, high_99 = wilson_interval(138, 740, 0.99)
    assert low_99 < low_95
    assert high_99 > high_95
    expected_low, expected_high = closed_form_wilson(138, 740, z=2.5758293035489004)
    assert low_99 == pytest.approx(expected_low, abs=1e-9)
    assert high_99 == pytest.approx(expected_high, abs=1e-9)


@pytest.mark.parametrize(("successes", "trials", "confidence"), [(-1, 5, 0.95), (6, 5, 0.95), (0, -1, 0.95),
                                                                  (1, 2, 0.0), (1, 2, 1.0), (1, 2, 95)])
def test_wilson_rejects_invalid_input(successes, trials, confidence):
    with pytest.raises(ValueError, match="invalid"):
        wilson_interval(successes, trials, confidence)


@pytest.mark.parametrize(("successes", "trials"), [(740, 740), (138, 740), (5, 10), (0, 10), (447, 740), (1, 3)])
def test_wilson_agrees_with_scipy(successes, trials):
    scipy_stats = pytest.importorskip("scipy.stats")
    interval = scipy_stats.binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(successes, trials)
    assert low == pytest.approx(float(interval.low), abs=1e-9)
    assert high == pytest.approx(float(interval.high), abs=1e-9)


@given(trials=st.integers(min_value=1, max_value=100_000), data=st.data(),
       confidence=st.floats(min_value=0.5, max_value=0.999))
def test_wilson_contains_point_estimate(trials, data, confidence):
    successes = data.draw(st.integers(min_value=0, max_value=trials))
    low, high = wilson_interval(successes, trials, confidence)
    assert 0.0 <= low <= successes / trials <= high <= 1.0


# Exact McNemar test


def test_mcnemar_no_discordant_pairs_is_one():
    assert mcnemar_exact(0, 0) == 1.0


def test_mcnemar_five_lost_none_gained():
    # Both tails of Binomial(5, 1/2) at the extremes: 2 * (1/2)**5.
    assert mcnemar_exact(5, 0) == 0.0625


def test_mcnemar_twenty_lost_five_gained():
    lower_tail = sum(math.comb(25, k) for k in range(6))
    assert lower_tail == 68406
    assert mcnemar_exact(20, 5) == pytest.approx(float(Fraction(2 * 68406, 2**25)), rel=1e-12)
    assert mcnemar_exact(20, 5) == pytest.approx(0.004077315330505371, rel=1e-12)


def test_mcnemar_equal_counts_is_one():
    assert mcnemar_exact(7, 7) == 1.0


def test_mcnemar_thousands_of_pairs():
    p = mcnemar_exact(3000, 2900)
    assert 0.0 < p < 1.0
    assert mcnemar_exact(5000, 0) == 0.0  # 2**-4999 is below the smallest positive float


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError, match="lost=-1"):
        mcnemar_exact(-1, 3)


@pytest.mark.parametrize(("lost", "gained"), [(5, 0), (20, 5), (1, 1), (602, 65), (293, 46), (3000, 2900), (0, 9)])
def test_mcnemar_agrees_with_scipy(lost, gained):
    scipy_stats = pytest.importorskip("scipy.stats")
    expected = scipy_stats.binomtest(min(lost, gained), lost + gained, p=0.5).pvalue
    assert mcnemar_exact(lost, gained) == pytest.approx(float(expected), rel=1e-9, abs=1e-300)


@given(lost=st.integers(min_value=0, max_value=2000), gained=st.integers(min_value=0, max_value=2000))
def test_mcnemar_is_probability_and_symmetric(lost, gained):
    p = mcnemar_exact(lost, gained)
    assert 0.0 <= p <= 1.0
    assert mcnemar_exact(gained, lost) == p


# RetentionStats over verdicts


def test_retention_stats_counts_and_rates():
    verdicts = [
        make_verdict("r1", RETAINED, candidate_knows=True, kl=0.1),
        make_verdict("r2", RETAINED, candidate_knows=True, kl=0.3),
        make_verdict("r3", RETAINED, candidate_knows=True, kl=None),
        make_verdict("forgot", REGRESSED, candidate_knows=False, kl=2.0),
        make_verdict("moved", REGRESSED, candidate_knows=True, kl=0.8),
        make_verdict("g1", GAINED, candidate_knows=True, kl=5.0),
        make_verdict("u1", UNKNOWN, candidate_knows=False, kl=7.0),
    ]
    stats = retention_stats(verdicts)

    assert stats.known == 5
    assert stats.retained == 3
    assert stats.regressed == 2
    assert stats.gained == 1
    assert stats.unknown == 1
    assert stats.lost == 1  # "moved" regressed on a tolerance only, so the candidate still knows it
    assert stats.retention_rate == pytest.approx(0.6)
    assert (stats.wilson_low, stats.wilson_high) == wilson_interval(3, 5)
    assert stats.mcnemar_p == mcnemar_exact(1, 1)
    # KL of facts the base does not know (g1, u1) is left out, and so is a missing value (r3).
    assert stats.mean_kl == pytest.approx((0.1 + 0.3 + 2.0 + 0.8) / 4)
    assert stats.max_kl == 2.0


def test_retention_stats_mcnemar_uses_lost_facts():
    verdicts = [make_verdict(f"lost-{i}", REGRESSED, candidate_knows=False) for i in range(5)]
    stats = retention_stats(verdicts)
    assert stats.lost == 5
    assert stats.mcnemar_p == 0.0625


def test_retention_stats_without_known_facts():
    stats = retention_stats([make_verdict("g1", GAINED, candidate_knows=True, kl=1.0),
                             make_verdict("u1", UNKNOWN, candidate_knows=False)])
    assert stats.known == 0
    assert stats.retention_rate is None
    assert (stats.wilson_low, stats.wilson_high) == (0.0, 1.0)
    assert stats.mean_kl is None
    assert stats.max_kl is None
    assert stats.mcnemar_p == 1.0  # one gained fact against none lost: 2 * (1/2) capped at 1


def test_retention_stats_empty():
    assert retention_stats([]) == RetentionStats(
        known=0, retained=0, regressed=0, gained=0, unknown=0, lost=0, retention_rate=None,
        wilson_low=0.0, wilson_high=1.0, mcnemar_p=1.0, mean_kl=None, max_kl=None,
    )


def test_per_tag_stats_groups_by_tag():
    outcomes = [
        make_outcome("a", ("geography", "capital"), make_verdict("a", RETAINED, candidate_knows=True, kl=0.1)),
        make_outcome("b", ("geography",), make_verdict("b", REGRESSED, candidate_knows=False, kl=3.0)),
        make_outcome("c", ("capital", "capital"), make_verdict("c", GAINED, candidate_knows=True)),
        make_outcome("d", (), make_verdict("d", RETAINED, candidate_knows=True)),
        make_outcome("e", ("geography",), None),
    ]
    by_tag = per_tag_stats(outcomes)

    assert list(by_tag) == ["capital", "geography"]
    assert by_tag["geography"].known == 2
    assert by_tag["geography"].retained == 1
    assert by_tag["geography"].regressed == 1
    assert by_tag["geography"].retention_rate == 0.5
    assert by_tag["geography"].max_kl == 3.0
    assert by_tag["capital"].retained == 1
    assert by_tag["capital"].gained == 1  # listed twice on fact c, counted once
    assert by_tag["capital"].known == 1


def test_per_tag_stats_skips_outcomes_without_verdict():
    assert per_tag_stats([make_outcome("e", ("geography",), None)]) == {}
