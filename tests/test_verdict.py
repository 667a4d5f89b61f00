"""The verdict table, the match rules and the KL metric, on hand-made results."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kinject_pytest.engine import FactResult, kl_divergence
from kinject_pytest.suite import Fact, Tolerance
from kinject_pytest.verdict import (
    DEFAULT_TOLERANCE,
    GAINED,
    REGRESSED,
    RETAINED,
    UNKNOWN,
    answer_rank,
    completion_matches,
    judge,
    top_k_overlap,
)

TOP_IDS = (11, 12, 13)
BASE_TOP = (math.log(0.6), math.log(0.3), math.log(0.05))


def result(completion: str, answer_logprob: float = -0.5, choice_logprobs: tuple[float, ...] = (),
           probe: tuple[float, ...] = BASE_TOP, top_ids: tuple[int, ...] = TOP_IDS) -> FactResult:
    return FactResult(
        completion=completion,
        completion_token_ids=(1, 2),
        answer_logprobs=(answer_logprob,),
        answer_token_counts=(1,),
        choice_logprobs=choice_logprobs,
        choice_token_counts=tuple(1 for _ in choice_logprobs),
        top_token_ids=top_ids,
        top_tokens=("a", "b", "c"),
        top_logprobs=BASE_TOP,
        probe_logprobs=probe,
    )


FACT = Fact(id="capital-france", prompt="The capital of France is", expect=("Paris",))


@pytest.mark.parametrize(
    ("base_completion", "candidate_completion", "status"),
    [
        (" Paris.", " Paris, the", RETAINED),
        (" Paris.", " Lyon.", REGRESSED),
        (" Lyon.", " Paris.", GAINED),
        (" Lyon.", " Marseille.", UNKNOWN),
    ],
)
def test_verdict_table(base_completion, candidate_completion, status):
    verdict = judge(FACT, result(base_completion), result(candidate_completion), DEFAULT_TOLERANCE)

    assert verdict.status == status
    assert verdict.passed == (status != REGRESSED)


def test_regressed_names_generation_check():
    verdict = judge(FACT, result(" Paris."), result(" Lyon."), DEFAULT_TOLERANCE)

    assert verdict.failed_checks == ("generation",)


def test_kl_past_tolerance_fails_retained_fact():
    moved = (math.log(0.05), math.log(0.3), math.log(0.6))
    verdict = judge(FACT, result(" Paris."), result(" Paris.", probe=moved), Tolerance(kl=0.5, logprob_drop=1.0))

    assert verdict.status == REGRESSED
    assert verdict.failed_checks == ("kl",)
    assert verdict.kl > 0.5


def test_logprob_drop_past_tolerance_fails_retained_fact():
    verdict = judge(FACT, result(" Paris.", -0.2), result(" Paris.", -1.7), Tolerance(kl=0.5, logprob_drop=1.0))

    assert verdict.failed_checks == ("logprob_drop",)
    assert verdict.logprob_drop == pytest.approx(1.5)


def test_distribution_checks_skip_facts_base_did_not_know():
    moved = (math.log(0.05), math.log(0.3), math.log(0.6))
    verdict = judge(FACT, result(" Lyon.", -0.2), result(" Lyon.", -5.0, probe=moved), DEFAULT_TOLERANCE)

    assert verdict.status == UNKNOWN
    assert verdict.failed_checks == ()


def test_choice_check_counts_as_knowing():
    fact = Fact(id="f", prompt="p", expect=("Paris",), choices=("Lyon", "Nice"))
    base = result(" the city", -1.0, choice_logprobs=(-3.0, -4.0))
    candidate = result(" the city", -5.0, choice_logprobs=(-3.0, -4.0))

    verdict = judge(fact, base, candidate, Tolerance(kl=10.0, logprob_drop=10.0))

    assert verdict.base_checks == {"generation": False, "choice": True}
    assert verdict.status == REGRESSED
    assert verdict.failed_checks == ("choice",)


def test_regex_fact_has_no_logprob():
    fact = Fact(id="f", prompt="p", expect=(r"19\d\d\b",), match="regex")
    empty = FactResult(" 1945 was", (1,), (), (), (), (), TOP_IDS, ("a", "b", "c"), BASE_TOP, BASE_TOP)

    verdict = judge(fact, empty, empty, DEFAULT_TOLERANCE)

    assert verdict.status == RETAINED
    assert verdict.logprob_drop is None
    assert verdict.rank_change is None


LOOSE = Tolerance(kl=10.0, logprob_drop=10.0, top_k_overlap=0.0, rank_change=3)
CHOICES_FACT = Fact(id="f", prompt="p", expect=("Paris",), choices=("Lyon", "Nice", "Lille"))


@pytest.mark.parametrize(("candidate_ids", "overlap", "failed"), [
    ((11, 12, 13), 1.0, ()),
    ((13, 11, 99), 2 / 3, ()),  # order within the top-k does not matter
    ((11, 98, 99), 1 / 3, ("top_k_overlap",)),
    ((97, 98, 99), 0.0, ("top_k_overlap",)),
])
def test_top_k_overlap_against_tolerance(candidate_ids, overlap, failed):
    tolerance = Tolerance(kl=10.0, logprob_drop=10.0, top_k_overlap=0.5, rank_change=3)

    verdict = judge(FACT, result(" Paris."), result(" Paris.", top_ids=candidate_ids), tolerance)

    assert verdict.top_k_overlap == pytest.approx(overlap)
    assert verdict.failed_checks == failed
    assert verdict.status == (REGRESSED if failed else RETAINED)


def test_top_k_overlap_ignored_for_unknown_fact():
    verdict = judge(FACT, result(" Lyon."), result(" Lyon.", top_ids=(97, 98, 99)), DEFAULT_TOLERANCE)

    assert verdict.top_k_overlap == 0.0
    assert verdict.status == UNKNOWN


@pytest.mark.parametrize(("base_choices", "candidate_choices", "base_rank", "candidate_rank"), [
    ((-3.0, -4.0, -5.0), (-3.0, -4.0, -5.0), 1, 1),
    ((-3.0, -4.0, -5.0), (-0.1, -4.0, -5.0), 1, 2),
    ((-0.4, -4.0, -5.0), (-0.1, -0.2, -0.3), 2, 4),
    ((-0.5, -4.0, -5.0), (-3.0, -4.0, -5.0), 2, 1),  # a tie ranks the choice first, as the choice check does
])
def test_answer_rank_among_choices(base_choices, candidate_choices, base_rank, candidate_rank):
    verdict = judge(CHOICES_FACT, result(" Paris.", -0.5, base_choices), result(" Paris.", -0.5, candidate_choices),
                    LOOSE)

    assert verdict.base_rank == base_rank
    assert verdict.candidate_rank == candidate_rank
    assert verdict.rank_change == candidate_rank - base_rank


@pytest.mark.parametrize(("limit", "failed"), [(1, ("rank_change",)), (2, ())])
def test_rank_change_against_tolerance(limit, failed):
    # The base knows the fact by generation but ranks one choice above the answer; the candidate ranks
    # two more above it, so the answer falls from place 2 to place 4.
    base = result(" Paris.", -0.5, (-0.4, -4.0, -5.0))
    candidate = result(" Paris.", -0.5, (-0.1, -0.2, -0.3))

    verdict = judge(CHOICES_FACT, base, candidate, Tolerance(kl=10.0, logprob_drop=10.0, rank_change=limit))

    assert verdict.failed_checks == failed


def test_rank_change_reported_beside_choice_check():
    base = result(" Paris.", -0.5, (-3.0, -4.0, -5.0))
    candidate = result(" Paris.", -0.5, (-0.1, -0.2, -4.0))

    verdict = judge(CHOICES_FACT, base, candidate, Tolerance(kl=10.0, logprob_drop=10.0, rank_change=1))

    assert verdict.failed_checks == ("choice", "rank_change")


def test_facts_without_choices_have_no_rank():
    verdict = judge(FACT, result(" Paris."), result(" Paris."), DEFAULT_TOLERANCE)

    assert verdict.base_rank is None
    assert verdict.rank_change is None


def test_answer_rank_without_choices_or_answers():
    assert answer_rank((-1.0,), ()) is None
    assert answer_rank((), (-1.0,)) is None
    assert answer_rank((-2.0, -0.5), (-1.0,)) == 1  # the best accepted answer is ranked


token_ids = st.lists(st.integers(min_value=0, max_value=60), max_size=25, unique=True)


@given(first=token_ids, second=token_ids)
def test_top_k_overlap_is_a_fraction(first, second):
    overlap = top_k_overlap(first, second)

    if not first:
        assert overlap is None
    else:
        assert 0.0 <= overlap <= 1.0


@given(ids=token_ids.filter(bool))
def test_top_k_overlap_of_identical_lists_is_one(ids):
    assert top_k_overlap(ids, ids) == 1.0
    assert top_k_overlap(ids, list(reversed(ids))) == 1.0


@given(data=st.data(), size=st.integers(min_value=1, max_value=25))
def test_top_k_overlap_is_symmetric_for_equal_lengths(data, size):
    first = data.draw(st.lists(st.integers(0, 60), min_size=size, max_size=size, unique=True))
    second = data.draw(st.lists(st.integers(0, 60), min_size=size, max_size=size, unique=True))

    assert top_k_overlap(first, second) == top_k_overlap(second, first)


@pytest.mark.parametrize(
    ("completion", "answer", "rule", "expected"),
    [
        (" Paris.", "Paris", "prefix", True),
        (" paris, France", "Paris", "prefix", True),
        (" Parisian food", "Paris", "prefix", False),
        ("\n Paris", "Paris", "prefix", True),
        (" the city of Paris", "Paris", "prefix", False),
        (" the city of Paris", "Paris", "contains", True),
        (" the city of Parisian", "Paris", "contains", False),
        (" 7.\nNext", "7", "exact", True),
        (" 7 days", "7", "exact", False),
        (" Paris.\n", "Paris.", "exact", True),
        (" Paris.\nThe", "^Paris", "regex", True),
        (" U.S.A", "U.S.", "prefix", False),
        (" U.S. of", "U.S.", "prefix", True),
        (" 1945 and", r"19\d\d\b", "regex", True),
        (" 19450", r"19\d\d\b", "regex", False),
    ],
)
def test_completion_matches(completion, answer, rule, expected):
    assert completion_matches(completion, answer, rule) is expected


probabilities = st.lists(st.floats(min_value=1e-6, max_value=1.0), min_size=1, max_size=8)


@given(probabilities, probabilities)
def test_kl_is_non_negative(first, second):
    size = min(len(first), len(second))
    base = [math.log(value / (sum(first) + 1e-3)) for value in first[:size]]
    candidate = [math.log(value / (sum(second) + 1e-3)) for value in second[:size]]

    assert kl_divergence(base, candidate) >= 0.0


@given(probabilities)
def test_kl_of_identical_distributions_is_zero(values):
    logprobs = [math.log(value / (sum(values) + 1e-3)) for value in values]

    assert kl_divergence(logprobs, logprobs) == pytest.approx(0.0, abs=1e-9)


def test_kl_matches_hand_computation():
    # Base (0.6, 0.3, rest 0.1) against candidate (0.3, 0.3, rest 0.4).
    expected = 0.6 * math.log(0.6 / 0.3) + 0.3 * math.log(1.0) + 0.1 * math.log(0.1 / 0.4)

    assert kl_divergence([math.log(0.6), math.log(0.3)], [math.log(0.3), math.log(0.3)]) == pytest.approx(expected)


nats = st.none() | st.floats(min_value=0.0, max_value=50.0)


@given(fact_kl=nats, suite_kl=nats, option_kl=nats)
def test_tolerance_precedence_is_fact_suite_option_default(fact_kl, suite_kl, option_kl):
    effective = Tolerance(kl=fact_kl).over(Tolerance(kl=suite_kl)).over(Tolerance(kl=option_kl)).over(DEFAULT_TOLERANCE)

    expected = next(value for value in (fact_kl, suite_kl, option_kl, DEFAULT_TOLERANCE.kl) if value is not None)
    assert effective.kl == expected
    assert effective.logprob_drop == DEFAULT_TOLERANCE.logprob_drop
