"""Measure the top-k overlap and rank change of candidates on the shipped suite, to size their default tolerances.

Usage: python bench/measure_tolerances.py [--scores DIR] [--out bench/tolerances.json]

Scores suites/known_facts.kinject.jsonl on the CPU with four candidates and judges each against the
committed snapshot suites/__kinject__/known_facts.smollm2.json (recorded from SmolLM2-135M-Instruct
in float32):

* ``base-float32``: the base itself, as the snapshot was recorded; nothing may be flagged;
* ``base-bfloat16``: the base in bfloat16, which moves every log-probability a little;
* ``lora`` and ``full``: the fixture LoRA adapter and full fine-tune (fixtures/build.py).

For the facts the base knows, it prints the distribution of each metric and how many facts each
candidate limit would flag, in total and beyond the facts the other checks already flag. Each
candidate's results are kept in ``--scores`` (default: the kinject cache), so a second run only
judges. The fixtures must be built first (``python fixtures/build.py all``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SUITE = REPO / "suites" / "known_facts.kinject.jsonl"
SNAPSHOT = REPO / "suites" / "__kinject__" / "known_facts.smollm2.json"
CANDIDATES = ("base-float32", "base-bfloat16", "lora", "full")
OVERLAP_LIMITS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
RANK_LIMITS = (0, 1, 2)


def load_candidate(name: str):
    from kinject_pytest.models import attach_adapters, cache_dir, load_model

    fixtures = cache_dir() / "fixtures"
    if name == "base-float32":
        return load_model("smollm2", device="cpu", dtype="float32")
    if name == "base-bfloat16":
        return load_model("smollm2", device="cpu", dtype="bfloat16")
    if name == "lora":
        return attach_adapters(load_model("smollm2", device="cpu", dtype="float32"), [str(fixtures / "smollm2-edits-lora")])
    return load_model(str(fixtures / "smollm2-edits-full"), device="cpu", dtype="float32")


def candidate_results(name: str, facts, snapshot, scores: Path) -> dict:
    """Return the candidate's FactResult per fact id, scoring it only when ``scores`` has no file for it."""
    from kinject_pytest.engine import FactResult, Scorer, ScoringSettings
    from kinject_pytest.session import _query

    path = scores / f"{name}.json"
    if not path.is_file():
        loaded = load_candidate(name)
        settings = ScoringSettings(top_k=int(snapshot.settings["top_k"]))
        queries = [_query(fact, snapshot.result(fact.id)) for fact in facts]
        results = Scorer(loaded.model, loaded.tokenizer, settings).score(queries)
        stored = {fact.id: results[query.key].to_dict() for fact, query in zip(facts, queries)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stored), encoding="utf-8")
    return {fact_id: FactResult.from_dict(entry) for fact_id, entry in json.loads(path.read_text()).items()}


def measure(name: str, facts, snapshot, scores: Path) -> dict:
    from kinject_pytest.suite import Tolerance
    from kinject_pytest.verdict import DEFAULT_TOLERANCE, REGRESSED, RETAINED, judge

    results = candidate_results(name, facts, snapshot, scores)
    # The other checks alone: generation, choice, kl and logprob_drop at their defaults.
    others = Tolerance(kl=DEFAULT_TOLERANCE.kl, logprob_drop=DEFAULT_TOLERANCE.logprob_drop)

    overlaps: list[tuple[float, str]] = []
    rank_changes: Counter[int] = Counter()
    flagged_by_others: set[str] = set()
    regressed_by_defaults = 0
    verdicts = {}
    for fact in facts:
        verdict = judge(fact, snapshot.result(fact.id), results[fact.id], others)
        verdicts[fact.id] = verdict
        if verdict.status not in (RETAINED, REGRESSED):
            continue
        if verdict.status == REGRESSED:
            flagged_by_others.add(fact.id)
        overlaps.append((verdict.top_k_overlap, fact.id))
        if verdict.rank_change is not None:
            rank_changes[verdict.rank_change] += 1
        if judge(fact, snapshot.result(fact.id), results[fact.id], DEFAULT_TOLERANCE).status == REGRESSED:
            regressed_by_defaults += 1

    overlap_flags = {}
    for limit in OVERLAP_LIMITS:
        flagged = {fact_id for overlap, fact_id in overlaps if overlap < limit}
        overlap_flags[str(limit)] = {"flagged": len(flagged), "only_by_this_check": len(flagged - flagged_by_others)}
    rank_flags = {}
    for limit in RANK_LIMITS:
        flagged = {fact.id for fact in facts if verdicts[fact.id].status in (RETAINED, REGRESSED)
                   and verdicts[fact.id].rank_change is not None and verdicts[fact.id].rank_change > limit}
        rank_flags[str(limit)] = {"flagged": len(flagged), "only_by_this_check": len(flagged - flagged_by_others)}

    values = sorted(overlap for overlap, _ in overlaps)
    return {
        "known": len(overlaps),
        "regressed_by_other_checks": len(flagged_by_others),
        "regressed_by_defaults": regressed_by_defaults,
        "top_k_overlap_min": values[0] if values else None,
        "top_k_overlap_histogram": {f"{value:.2f}": count for value, count in sorted(Counter(values).items())},
        "top_k_overlap_limits": overlap_flags,
        "rank_change_histogram": {str(change): count for change, count in sorted(rank_changes.items())},
        "rank_change_limits": rank_flags,
    }


def main() -> None:
    from kinject_pytest.models import cache_dir
    from kinject_pytest.snapshot import read_snapshot
    from kinject_pytest.suite import load_suite

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", type=Path, default=None, help="folder for each candidate's results")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "tolerances.json")
    arguments = parser.parse_args()
    scores = arguments.scores or cache_dir() / "tolerance-scores"

    facts = list(load_suite(SUITE).facts)
    snapshot = read_snapshot(SNAPSHOT)
    measured = {name: measure(name, facts, snapshot, scores) for name in CANDIDATES}

    for name, numbers in measured.items():
        print(f"{name}: {numbers['known']} known facts, {numbers['regressed_by_other_checks']} regressed by the "
              f"other checks, {numbers['regressed_by_defaults']} by the defaults")
        print(f"  top-k overlap: min {numbers['top_k_overlap_min']}, flagged per limit "
              + ", ".join(f"<{limit}: {entry['flagged']} ({entry['only_by_this_check']} only by it)"
                          for limit, entry in numbers["top_k_overlap_limits"].items()))
        print(f"  rank change: histogram {numbers['rank_change_histogram']}, flagged per limit "
              + ", ".join(f">{limit}: {entry['flagged']} ({entry['only_by_this_check']} only by it)"
                          for limit, entry in numbers["rank_change_limits"].items()))
    arguments.out.write_text(json.dumps(measured, indent=2, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
