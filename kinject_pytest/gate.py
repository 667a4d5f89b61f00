"""Aggregate thresholds over a whole run and over each tag: the release gate.

In ``strict`` mode every regressed fact fails its own test item, and the thresholds here, when set,
add one more item that fails when the run as a whole, or the facts of one tag, breach one. In
``aggregate`` mode regressed facts are reported as expected failures and only this gate decides the
exit status.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterable, Mapping

from .session import Outcome
from .stats import RetentionStats, per_tag_stats, retention_stats
from .verdict import Verdict

GATE_MODES = ("strict", "aggregate")
TAG_THRESHOLD_SYNTAX = "TAG:NAME=VALUE[,NAME=VALUE...]"


@dataclass(frozen=True)
class Thresholds:
    """Limits over a group of judged facts; None leaves a limit unchecked."""

    min_retention: float | None = None  # retained / known, as a fraction
    # Fails only when retention is significantly below this fraction: the upper end of the Wilson
    # 95% interval is below it.
    retention_not_below: float | None = None
    max_regressed: int | None = None
    max_mean_kl: float | None = None  # nats, over facts the base knows

    @property
    def any_set(self) -> bool:
        return any(value is not None for value in (self.min_retention, self.retention_not_below,
                                                     self.max_regressed, self.max_mean_kl))


THRESHOLD_NAMES = tuple(field.name for field in fields(Thresholds))


def breaches(verdicts: Iterable[Verdict], thresholds: Thresholds) -> list[str]:
    """Return one sentence per breached threshold; an empty list means the gate passes."""
    return _breaches(retention_stats(verdicts), thresholds, subject="", flag=_global_flag)


def tag_breaches(outcomes: Iterable[Outcome], tag_thresholds: Mapping[str, Thresholds]) -> list[str]:
    """Return one sentence per breached threshold of each tag, each naming the tag.

    A tag that no judged fact carries is left out: `unmatched_tags` names those.
    """
    stats_by_tag = per_tag_stats(outcomes)
    found = []
    for tag, thresholds in sorted(tag_thresholds.items()):
        if tag in stats_by_tag:
            found += _breaches(stats_by_tag[tag], thresholds, subject=f"tag {tag}: ",
                               flag=lambda name, value, tag=tag: f"--kinject-tag-threshold {tag}:{name}={value:g}")
    return found


def unmatched_tags(outcomes: Iterable[Outcome], tag_thresholds: Mapping[str, Thresholds]) -> list[str]:
    """Return the tags with thresholds that no judged fact carries, in sorted order."""
    judged = per_tag_stats(outcomes)
    return sorted(tag for tag in tag_thresholds if tag not in judged)


def _global_flag(name: str, value: float) -> str:
    return "--kinject-" + name.replace("_", "-")


def _breaches(stats: RetentionStats, thresholds: Thresholds, *, subject: str,
              flag: Callable[[str, float], str]) -> list[str]:
    found = []
    needs_known = thresholds.min_retention is not None or thresholds.retention_not_below is not None
    if needs_known and stats.known == 0:
        where = "the selected facts" if not subject else "the selected facts with this tag"
        found.append(f"{subject}the base knows none of {where}, so retention cannot be measured")
    if thresholds.min_retention is not None and stats.retention_rate is not None \
            and stats.retention_rate < thresholds.min_retention:
        found.append(f"{subject}retention {stats.retained}/{stats.known} = {stats.retention_rate:.1%} is below the "
                     f"minimum {thresholds.min_retention:.1%} ({flag('min_retention', thresholds.min_retention)})")
    if thresholds.retention_not_below is not None and stats.known and stats.wilson_high < thresholds.retention_not_below:
        found.append(f"{subject}retention {stats.retention_rate:.1%} is significantly below "
                     f"{thresholds.retention_not_below:.1%}: its Wilson 95% interval ends at {stats.wilson_high:.1%} "
                     f"({flag('retention_not_below', thresholds.retention_not_below)})")
    if thresholds.max_regressed is not None and stats.regressed > thresholds.max_regressed:
        found.append(f"{subject}{stats.regressed} facts regressed, more than the maximum {thresholds.max_regressed} "
                     f"({flag('max_regressed', thresholds.max_regressed)})")
    if thresholds.max_mean_kl is not None and stats.mean_kl is not None and stats.mean_kl > thresholds.max_mean_kl:
        found.append(f"{subject}mean KL(base || candidate) {stats.mean_kl:.4f} nats is above the maximum "
                     f"{thresholds.max_mean_kl} nats ({flag('max_mean_kl', thresholds.max_mean_kl)})")
    return found


def threshold_problem(name: str, value: float) -> str | None:
    """Return how to fix an invalid value of the threshold `name`, or None when it is valid."""
    if name in ("min_retention", "retention_not_below") and not 0.0 <= value <= 1.0:
        return "pass a fraction between 0 and 1, e.g. 0.95"
    if name == "max_regressed" and (value < 0 or not float(value).is_integer()):
        return "pass a whole number of facts that is 0 or more, e.g. 2"
    if name == "max_mean_kl" and not (math.isfinite(value) and value >= 0):
        return "pass a finite number of nats that is 0 or more, e.g. 0.1"
    return None


def parse_tag_thresholds(entries: Iterable[str]) -> dict[str, Thresholds]:
    """Parse entries of the form ``TAG:NAME=VALUE[,NAME=VALUE...]`` into thresholds per tag.

    A later entry wins over an earlier one for the same tag and threshold. Raises ``ValueError``
    with what is wrong and how to write it, for the caller to prefix with the option's name.
    """
    parsed: dict[str, Thresholds] = {}
    for entry in entries:
        tag, separator, assignments = entry.strip().partition(":")
        tag = tag.strip()
        if not separator or not tag.isidentifier() or not assignments.strip():
            raise ValueError(f"{entry!r} is invalid; write {TAG_THRESHOLD_SYNTAX}, e.g. P36:min_retention=0.9")
        thresholds = parsed.get(tag, Thresholds())
        for assignment in assignments.split(","):
            name, value = _parse_assignment(entry, assignment)
            thresholds = replace(thresholds, **{name: value})
        parsed[tag] = thresholds
    return parsed


def _parse_assignment(entry: str, assignment: str) -> tuple[str, float | int]:
    name, separator, text = assignment.partition("=")
    name = name.strip()
    if not separator:
        raise ValueError(f"{entry!r} is invalid: {assignment.strip()!r} has no '='; write {TAG_THRESHOLD_SYNTAX}, "
                         "e.g. P36:min_retention=0.9")
    if name not in THRESHOLD_NAMES:
        close = difflib.get_close_matches(name, THRESHOLD_NAMES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"{entry!r} names the unknown threshold {name!r}; {hint}use one of "
                         + ", ".join(THRESHOLD_NAMES))
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{entry!r} gives {name} the value {text.strip()!r}, which is not a number; "
                         "write a number, e.g. P36:min_retention=0.9") from None
    problem = threshold_problem(name, value)
    if problem is not None:
        raise ValueError(f"{entry!r} gives {name} the invalid value {text.strip()}; {problem}")
    return name, int(value) if name == "max_regressed" else value


def gate_result(outcomes: Iterable[Outcome], mode: str, thresholds: Thresholds,
                tag_thresholds: Mapping[str, Thresholds]) -> dict[str, Any]:
    """Return the gate's outcome as a JSON-ready dict for the reports: thresholds, breaches, per tag."""
    outcomes = list(outcomes)
    verdicts = [outcome.verdict for outcome in outcomes if outcome.verdict is not None]
    overall = breaches(verdicts, thresholds)
    tags = {}
    for tag, limits in sorted(tag_thresholds.items()):
        found = tag_breaches(outcomes, {tag: limits})
        checked = tag not in unmatched_tags(outcomes, {tag: limits})
        tags[tag] = {"thresholds": _set_fields(limits), "checked": checked, "breaches": found, "passed": not found}
    every_breach = overall + [sentence for entry in tags.values() for sentence in entry["breaches"]]
    return {
        "mode": mode,
        "passed": not every_breach,
        "thresholds": _set_fields(thresholds),
        "breaches": overall,
        "tags": tags,
    }


def _set_fields(thresholds: Thresholds) -> dict[str, float | int]:
    return {name: value for name, value in vars(thresholds).items() if value is not None}
