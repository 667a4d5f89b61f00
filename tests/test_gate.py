"""The aggregate gate's thresholds over all facts and per tag, on hand-made verdicts."""

from __future__ import annotations

import pytest

from kinject_pytest.gate import Thresholds, breaches, gate_result, parse_tag_thresholds, tag_breaches, unmatched_tags
from kinject_pytest.session import Outcome
from kinject_pytest.suite import Fact, Tolerance
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


# Thresholds per tag


def tagged(status: str, tags: tuple[str, ...], kl: float = 0.0) -> Outcome:
    return Outcome(Fact(id="f", prompt="p", expect=("a",), tags=tags), verdict=verdict(status, kl))


# Tag "geo": 3 of 4 known facts retained. Tag "P36": 1 of 1 retained. One error outcome has no verdict.
TAGGED = [tagged(RETAINED, ("geo",), 0.1)] * 2 + [tagged(RETAINED, ("geo", "P36"), 0.1),
                                                   tagged(REGRESSED, ("geo",), 1.3),
                                                   tagged(UNKNOWN, ("history",))] \
    + [Outcome(Fact(id="e", prompt="p", expect=("a",), tags=("geo",)), error="no snapshot entry")]


def test_tag_breach_names_tag_and_flag():
    found = tag_breaches(TAGGED, {"geo": Thresholds(min_retention=0.8), "P36": Thresholds(min_retention=0.8)})

    assert found == ["tag geo: retention 3/4 = 75.0% is below the minimum 80.0% "
                     "(--kinject-tag-threshold geo:min_retention=0.8)"]


def test_tag_breaches_one_sentence_each():
    found = tag_breaches(TAGGED, {"geo": Thresholds(max_regressed=0, max_mean_kl=0.3, retention_not_below=0.99)})

    # Mean KL of the four known geo facts: (3 * 0.1 + 1.3) / 4 = 0.4 nats.
    assert found == [
        "tag geo: retention 75.0% is significantly below 99.0%: its Wilson 95% interval ends at 95.4% "
        "(--kinject-tag-threshold geo:retention_not_below=0.99)",
        "tag geo: 1 facts regressed, more than the maximum 0 (--kinject-tag-threshold geo:max_regressed=0)",
        "tag geo: mean KL(base || candidate) 0.4000 nats is above the maximum 0.3 nats "
        "(--kinject-tag-threshold geo:max_mean_kl=0.3)",
    ]


def test_tag_without_known_facts_breaches_retention():
    found = tag_breaches(TAGGED, {"history": Thresholds(min_retention=0.5)})

    assert found == ["tag history: the base knows none of the selected facts with this tag, so retention cannot be "
                     "measured"]


def test_tag_without_judged_facts_is_unmatched():
    thresholds = {"geo": Thresholds(max_regressed=5), "chemistry": Thresholds(max_regressed=0)}

    assert tag_breaches(TAGGED, thresholds) == []
    assert unmatched_tags(TAGGED, thresholds) == ["chemistry"]


def test_gate_result_for_reports():
    result = gate_result(TAGGED, "aggregate", Thresholds(max_regressed=1),
                         {"geo": Thresholds(max_regressed=0), "P36": Thresholds(min_retention=0.5),
                          "chemistry": Thresholds(max_mean_kl=0.1)})

    assert result["mode"] == "aggregate"
    assert result["passed"] is False
    assert result["thresholds"] == {"max_regressed": 1}
    assert result["breaches"] == []
    assert result["tags"]["geo"] == {
        "thresholds": {"max_regressed": 0}, "checked": True, "passed": False,
        "breaches": ["tag geo: 1 facts regressed, more than the maximum 0 (--kinject-tag-threshold geo:max_regressed=0)"],
    }
    assert result["tags"]["P36"]["passed"] is True
    assert result["tags"]["chemistry"]["checked"] is False


def test_parse_tag_thresholds_merges_entries():
    parsed = parse_tag_thresholds(["geo:min_retention=0.9,max_regressed=2", "P36:max_mean_kl=0.25",
                                   "geo:max_regressed=0"])

    assert parsed == {"geo": Thresholds(min_retention=0.9, max_regressed=0), "P36": Thresholds(max_mean_kl=0.25)}
    assert isinstance(parsed["geo"].max_regressed, int)


@pytest.mark.parametrize(("entry", "message"), [
    ("geo", "'geo' is invalid; write TAG:NAME=VALUE[,NAME=VALUE...], e.g. P36:min_retention=0.9"),
    ("geo:", "'geo:' is invalid; write TAG:NAME=VALUE"),
    ("two words:max_regressed=1", "'two words:max_regressed=1' is invalid; write TAG:NAME=VALUE"),
    ("geo:max_regressed", "'geo:max_regressed' is invalid: 'max_regressed' has no '='"),
    ("geo:min_retenton=0.9", "names the unknown threshold 'min_retenton'; did you mean 'min_retention'?"),
    ("geo:min_retention=high", "gives min_retention the value 'high', which is not a number"),
    ("geo:min_retention=95", "gives min_retention the invalid value 95; pass a fraction between 0 and 1"),
    ("geo:max_regressed=1.5", "gives max_regressed the invalid value 1.5; pass a whole number of facts"),
    ("geo:max_mean_kl=-1", "gives max_mean_kl the invalid value -1; pass a finite number of nats"),
    ("geo:max_mean_kl=nan", "gives max_mean_kl the invalid value nan"),
])
def test_parse_tag_thresholds_rejects(entry, message):
    with pytest.raises(ValueError) as caught:
        parse_tag_thresholds([entry])

    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
