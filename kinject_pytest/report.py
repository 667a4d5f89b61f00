"""Text for people: a failing fact's report and the end-of-run summary."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Iterable

from .edits import EditScores, PromptScores, edit_stats
from .session import Options, Outcome, display_path
from .stats import retention_stats
from .suite import Tolerance
from .verdict import REGRESSED, RETAINED, STATUSES, Verdict, count_statuses

_CHECK_NAMES = {
    "generation": "greedy completion no longer matches",
    "choice": "expected answer no longer beats the choices",
    "kl": "next-token distribution moved",
    "logprob_drop": "expected answer became less likely",
    "top_k_overlap": "base's top-k next tokens left the candidate's top-k",
    "rank_change": "expected answer fell among the choices",
}


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _places(value: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:+d}" if value else "0"


def tolerance_text(tolerance: Tolerance) -> str:
    """Return every field of an effective tolerance with its unit, e.g. for a failure report."""
    return (f"kl <= {_nats(tolerance.kl)} nats, logprob_drop <= {_nats(tolerance.logprob_drop)} nats, "
            f"top_k_overlap >= {_fraction(tolerance.top_k_overlap)}, "
            f"rank_change <= {'n/a' if tolerance.rank_change is None else tolerance.rank_change} places")


def _nats(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def failure_report(outcome: Outcome, options: Options) -> str:
    """Return the multi-line report of a regressed fact, as shown under its test item."""
    fact, verdict = outcome.fact, outcome.verdict
    assert verdict is not None
    tolerance = verdict.tolerance
    reasons = "; ".join(f"{_CHECK_NAMES[name]} ({name})" for name in verdict.failed_checks)
    lines = [
        f"fact {fact.id} ({display_path(fact.path)}:{fact.line}) regressed: {reasons}",
        f"  prompt:     {fact.prompt!r}",
        f"  expected:   {' | '.join(fact.expect)}  (match: {fact.match})",
        f"  base:       {verdict.base_completion!r}  log p(expected) = {_nats(verdict.base_logprob)} nats",
        f"  candidate:  {verdict.candidate_completion!r}  log p(expected) = {_nats(verdict.candidate_logprob)} nats",
        f"  checks:     base {_checks(verdict.base_checks)}; candidate {_checks(verdict.candidate_checks)}",
        f"  logprob drop: {_nats(verdict.logprob_drop)} nats (tolerance {_nats(tolerance.logprob_drop)})",
        f"  KL(base || candidate): {_nats(verdict.kl)} nats over the base's top-k (tolerance {_nats(tolerance.kl)})",
        f"  top-k overlap: {_fraction(verdict.top_k_overlap)} of the base's top-k tokens in the candidate's "
        f"(tolerance {_fraction(tolerance.top_k_overlap)})",
    ]
    if verdict.base_rank is not None:
        lines.append(f"  rank of the expected answer against {len(fact.choices)} choices: base {verdict.base_rank}, "
                     f"candidate {verdict.candidate_rank}, change {_places(verdict.rank_change)} places "
                     f"(tolerance {tolerance.rank_change})")
    lines += [
        f"  effective tolerance: {tolerance_text(tolerance)}",
        f"  candidate: {options.candidate_label}",
        "  if the change is intended, re-record the base snapshot with --kinject-update",
    ]
    return "\n".join(lines)


def _checks(checks: dict[str, bool]) -> str:
    return ", ".join(f"{name} {'passed' if passed else 'failed'}" for name, passed in checks.items())


def taught_report(outcome: Outcome, options: Options) -> str:
    """Return the multi-line report of a taught fact the candidate did not learn."""
    fact, edit = outcome.fact, outcome.edit
    assert edit is not None and fact.teach is not None
    lines = [
        f"fact {fact.id} ({display_path(fact.path)}:{fact.line}) not learned: the candidate does not prefer the "
        "taught answer on the fact's prompt",
        f"  prompt:     {fact.prompt!r}",
        f"  old answer: {fact.expect[0]!r}   new answer: {fact.teach.answer!r}",
        "  per-token mean NLL in nats, old / new answer (lower is more likely), base -> candidate:",
        f"  prompt:     {_nll_change(edit.base.rewrite, edit.candidate.rewrite)}",
    ]
    for base, candidate in zip(edit.base.paraphrases, edit.candidate.paraphrases):
        lines.append(f"  paraphrase: {_nll_change(base, candidate)}  {candidate.prompt!r}")
    if edit.candidate.paraphrases:
        lines.append(f"  paraphrases preferring the new answer: {_paraphrase_count(edit.base)} (base) -> "
                     f"{_paraphrase_count(edit.candidate)} (candidate)")
    lines.append(f"  candidate: {options.candidate_label}")
    return "\n".join(lines)


def _nll_change(base: PromptScores, candidate: PromptScores) -> str:
    def pair(scores: PromptScores) -> str:
        mark = "new preferred" if scores.prefers_new else "old preferred"
        return f"{scores.old_nll:.3f} / {scores.new_nll:.3f} ({mark})"

    return f"{pair(base)} -> {pair(candidate)}"


def _paraphrase_count(scores: EditScores) -> str:
    return f"{sum(item.prefers_new for item in scores.paraphrases)}/{len(scores.paraphrases)}"


def untrained_reason(outcome: Outcome) -> str:
    edit = outcome.edit
    assert edit is not None
    return ("taught fact not judged: the candidate is the base itself, so there is no fine-tune to check; pass "
            f"--kinject-adapter or --kinject-candidate (base per-token mean NLL old {edit.base.rewrite.old_nll:.3f}, "
            f"new {edit.base.rewrite.new_nll:.3f} nats)")


def skip_reason(verdict: Verdict) -> str:
    if verdict.base_completion == verdict.candidate_completion:
        completions = f"both completed {verdict.base_completion!r}"
    else:
        completions = f"base completed {verdict.base_completion!r}, candidate {verdict.candidate_completion!r}"
    return f"unknown: neither the base nor the candidate knows it ({completions})"


def _taught_lines(outcomes: list[Outcome], counts: dict[str, int]) -> list[str]:
    """Return the lines on taught facts: learned (efficacy, paraphrases) and kept (retention of the rest)."""
    stats = edit_stats(outcome.edit for outcome in outcomes if outcome.edit is not None)
    if not stats.taught:
        return []
    if stats.efficacy is None:
        return [f"taught facts: {stats.taught}, not judged because the candidate is the base itself"]

    learned = f"learned {stats.learned}/{stats.judged} taught facts (efficacy {stats.efficacy:.1%})"
    if stats.paraphrase_success is not None:
        noun = "fact" if stats.paraphrase_facts == 1 else "facts"
        learned += f", paraphrase success {stats.paraphrase_success:.1%} over {stats.paraphrase_facts} {noun}"
    known = counts[RETAINED] + counts[REGRESSED]
    if known:
        kept = f"kept {counts[RETAINED]}/{known} of the other facts the base knows ({counts[RETAINED] / known:.1%})"
    else:
        kept = "the base knows none of the other facts"
    return [f"{learned}; {kept}"]


def summary_lines(outcomes: Iterable[Outcome], *, worst: int = 5) -> list[str]:
    """Return the end-of-run summary: counts, retention of known facts, KL, worst regressions."""
    outcomes = list(outcomes)
    verdicts = [outcome.verdict for outcome in outcomes if outcome.verdict is not None]
    errors = [outcome for outcome in outcomes if outcome.error is not None]
    counts = count_statuses(verdicts)

    lines = [", ".join(f"{counts[status]} {status}" for status in STATUSES)
             + (f", {len(errors)} without a usable snapshot entry" if errors else "")]
    lines += _taught_lines(outcomes, counts)
    known = counts[RETAINED] + counts[REGRESSED]
    if known:
        lines.append(f"retention of facts the base knows: {counts[RETAINED]}/{known} = {counts[RETAINED] / known:.1%}")
    stats = retention_stats(verdicts)
    if known:
        lines.append(f"Wilson 95% interval of the retention rate: {stats.wilson_low:.1%} to {stats.wilson_high:.1%}; "
                     f"exact McNemar test of {stats.lost} lost vs {stats.gained} gained facts: p = {stats.mcnemar_p:.3g}")
    kls = [verdict.kl for verdict in verdicts if verdict.kl is not None and verdict.status in (RETAINED, REGRESSED)]
    if kls:
        lines.append(f"KL(base || candidate) on known facts: mean {statistics.fmean(kls):.4f}, max {max(kls):.4f} nats")

    regressed = [outcome for outcome in outcomes if outcome.verdict is not None and outcome.verdict.status == REGRESSED]
    by_check = Counter(name for outcome in regressed for name in outcome.verdict.failed_checks)  # type: ignore[union-attr]
    if by_check:
        lines.append("failed checks among regressed facts: "
                     + ", ".join(f"{name} {by_check[name]}" for name in _CHECK_NAMES if by_check[name]))
    regressed.sort(key=lambda outcome: -(outcome.verdict.logprob_drop or 0.0))  # type: ignore[union-attr]
    if regressed:
        lines.append("worst regressions (largest drop in log p(expected) first):")
    for outcome in regressed[:worst]:
        verdict = outcome.verdict
        assert verdict is not None
        lines.append(
            f"  {outcome.fact.id}: {outcome.fact.prompt!r} expected {outcome.fact.expect[0]!r}, "
            f"base {verdict.base_completion.strip()!r}, candidate {verdict.candidate_completion.strip()!r}, "
            f"drop {_nats(verdict.logprob_drop)} nats"
        )
    return lines
