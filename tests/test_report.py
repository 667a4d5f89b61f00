"""The failure text of a regressed fact, on hand-made verdicts."""

from __future__ import annotations

from pathlib import Path

from kinject_pytest.report import failure_report, summary_lines
from kinject_pytest.session import Options, Outcome
from kinject_pytest.suite import Fact, Tolerance
from kinject_pytest.verdict import REGRESSED, Verdict

FACT = Fact(id="largest-planet", prompt="The largest planet is", expect=("Jupiter",), choices=("Saturn", "Mars", "Venus"),
            path=Path("suites/examples.kinject.yaml"), line=24)


def regressed(failed: tuple[str, ...], **fields) -> Outcome:
    verdict = Verdict(
        fact_id=FACT.id, status=REGRESSED, failed_checks=failed,
        base_checks={"generation": True, "choice": True}, candidate_checks={"generation": True, "choice": False},
        base_completion=" Jupiter.", candidate_completion=" Jupiter, the", base_logprob=-0.5, candidate_logprob=-0.75,
        kl=0.25, tolerance=Tolerance(kl=0.5, logprob_drop=1.0, top_k_overlap=0.6, rank_change=1),
        top_k_overlap=0.45, base_rank=1, candidate_rank=3, **fields,
    )
    return Outcome(FACT, verdict=verdict)


def test_failure_names_each_failed_check():
    text = failure_report(regressed(("choice", "top_k_overlap", "rank_change")), Options())

    first = text.splitlines()[0]
    assert first == ("fact largest-planet (suites/examples.kinject.yaml:24) regressed: expected answer no longer beats "
                     "the choices (choice); base's top-k next tokens left the candidate's top-k (top_k_overlap); "
                     "expected answer fell among the choices (rank_change)")


def test_failure_prints_new_metrics_and_tolerance():
    lines = failure_report(regressed(("top_k_overlap",)), Options()).splitlines()

    assert "  top-k overlap: 0.45 of the base's top-k tokens in the candidate's (tolerance 0.60)" in lines
    assert "  rank of the expected answer against 3 choices: base 1, candidate 3, change +2 places (tolerance 1)" in lines
    assert ("  effective tolerance: kl <= 0.500 nats, logprob_drop <= 1.000 nats, top_k_overlap >= 0.60, "
            "rank_change <= 1 places") in lines


def test_failure_without_choices_has_no_rank_line():
    fact = Fact(id="capital-france", prompt="The capital of France is", expect=("Paris",), path=Path("a.kinject.jsonl"),
                line=1)
    verdict = Verdict(
        fact_id=fact.id, status=REGRESSED, failed_checks=("kl",), base_checks={"generation": True},
        candidate_checks={"generation": True}, base_completion=" Paris", candidate_completion=" Paris",
        base_logprob=-0.5, candidate_logprob=-0.5, kl=0.75, tolerance=Tolerance(kl=0.5),
    )

    text = failure_report(Outcome(fact, verdict=verdict), Options())

    assert "rank of the expected answer" not in text
    assert "effective tolerance: kl <= 0.500 nats, logprob_drop <= n/a nats, top_k_overlap >= n/a, " \
           "rank_change <= n/a places" in text


def test_summary_counts_new_checks():
    lines = summary_lines([regressed(("top_k_overlap", "rank_change")), regressed(("rank_change",))])

    assert "failed checks among regressed facts: top_k_overlap 1, rank_change 2" in lines
