"""Aggregate thresholds over a whole run: the release gate.

In ``strict`` mode every regressed fact fails its own test item, and the thresholds here, when set,
add one more item that fails when the run as a whole breaches one. In ``aggregate`` mode regressed
facts are reported as expected failures and only this gate decides the exit status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .stats import retention_stats
from .verdict import Verdict

GATE_MODES = ("strict", "aggregate")


@dataclass(frozen=True)
class Thresholds:
    """Limits over all judged facts; None leaves a limit unchecked."""

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


def breaches(verdicts: Iterable[Verdict], thresholds: Thresholds) -> list[str]:
    """Return one sentence per breached threshold; an empty list means the gate passes."""
    stats = retention_stats(verdicts)
    found = []
    needs_known = thresholds.min_retention is not None or thresholds.retention_not_below is not None
    if needs_known and stats.known == 0:
        found.append("the base knows none of the selected facts, so retention cannot be measured")
    if thresholds.min_retention is not None and stats.retention_rate is not None \
            and stats.retention_rate < thresholds.min_retention:
        found.append(f"retention {stats.retained}/{stats.known} = {stats.retention_rate:.1%} is below the minimum "
                     f"{thresholds.min_retention:.1%} (--kinject-min-retention)")
    if thresholds.retention_not_below is not None and stats.known and stats.wilson_high < thresholds.retention_not_below:
        found.append(f"retention {stats.retention_rate:.1%} is significantly below {thresholds.retention_not_below:.1%}: "
                     f"its Wilson 95% interval ends at {stats.wilson_high:.1%} (--kinject-retention-not-below)")
    if thresholds.max_regressed is not None and stats.regressed > thresholds.max_regressed:
        found.append(f"{stats.regressed} facts regressed, more than the maximum {thresholds.max_regressed} "
                     "(--kinject-max-regressed)")
    if thresholds.max_mean_kl is not None and stats.mean_kl is not None and stats.mean_kl > thresholds.max_mean_kl:
        found.append(f"mean KL(base || candidate) {stats.mean_kl:.4f} nats is above the maximum "
                     f"{thresholds.max_mean_kl} nats (--kinject-max-mean-kl)")
    return found
