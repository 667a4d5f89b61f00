"""The aggregate gate's thresholds, on hand-made verdicts."""

from __future__ import annotations

import pytest

from kinject_pytest.gate import Thresholds, breaches
from kinject_pytest.suite import Tolerance
from kinject_pytest.verdict import GAINED, REGRESSED, RETAINED, UNKNOWN, Verdict


def verdict(status: str, kl: float = 0.0) -> Verdict:
    knows_base = status in (RETAINED, REGRESSED)
    knows_candidate = status in (RETAINED, GAINED)
    return Verdict(
        fact_id="f", status=status, failed_checks=("generation",) if status == REGRESSED else (),
        base_checks={"generation": knows_base}, candidate_checks={"generation": knows_candidate},
        base_completion=" a", candidate_completion=" b", base_logprob=-1.0, candidate_logprob=-2.0,
        kl=kl, tolerance=Tolerance(kl=0.5, logprob_drop=1.0),
    )


# 8 of 10 known facts retained, one gained, one unknown.
RUN = [verdict(RETAINED, 0.1)] * 8 + [verdict(REGRESSED, 2.1)] * 2 + [verdict(GAINED), verdict(UNKNOWN)]


def test_no_thresholds_pass():
    assert breaches(RUN, Thresholds()) == []


@pytest.mark.parametrize(("minimum", "breached"), [(0.79, False), (0.8, False), (0.81, True)])
def test_min_retention(minimum, breached):
    found = breaches(RUN, Thresholds(min_retention=minimum))

    assert bool(found) is breached


def test_min_retention_message_has_numbers():
    found = breaches(RUN, Thresholds(min_retention=0.9))

    assert found == ["retention 8/10 = 80.0% is below the minimum 90.0% (--kinject-min-retention)"]


def test_retention_not_below_uses_wilson_upper_end():
    # Wilson 95% interval of 8/10 is about 49.0% to 94.3%.
    assert breaches(RUN, Thresholds(retention_not_below=0.9)) == []
    assert breaches(RUN, Thresholds(retention_not_below=0.95)) != []


def test_max_regressed():
    assert breaches(RUN, Thresholds(max_regressed=2)) == []
    assert breaches(RUN, Thresholds(max_regressed=1)) == [
        "2 facts regressed, more than the maximum 1 (--kinject-max-regressed)"]


def test_max_mean_kl():
    # Mean over the 10 known facts: (8 * 0.1 + 2 * 2.1) / 10 = 0.5 nats.
    assert breaches(RUN, Thresholds(max_mean_kl=0.5)) == []
    assert len(breaches(RUN, Thresholds(max_mean_kl=0.4))) == 1


def test_retention_without_known_facts_breaches():
    found = breaches([verdict(UNKNOWN)], Thresholds(min_retention=0.5))

    assert found == ["the base knows none of the selected facts, so retention cannot be measured"]
