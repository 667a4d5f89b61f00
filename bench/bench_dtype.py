"""Measure how far SmolLM2 in another dtype or on another device drifts from its own float32 snapshot.

Usage: python bench/bench_dtype.py [--dtypes bfloat16,float16] [--device cpu] [--facts N] [--out bench/dtype_drift.json]

Loads the default model (SmolLM2-135M-Instruct) in each dtype, scores every fact of
suites/known_facts.kinject.jsonl probed at the snapshot's top-k tokens, and compares with the
committed float32 CPU snapshot using the default tolerances (no widening). Prints, per dtype, the
largest KL(base || candidate) and log-probability drop over the facts the base knows, the 99th
percentiles, and how many facts change status (regressed or gained). The widening that
kinject adds to tolerances when the dtype differs from the snapshot's was chosen from these numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SUITE = REPO / "suites" / "known_facts.kinject.jsonl"
SNAPSHOT = REPO / "suites" / "__kinject__" / "known_facts.smollm2.json"


def measure(dtype: str, device: str, limit: int | None) -> dict[str, object]:
    from kinject_pytest.engine import Query, Scorer, ScoringSettings
    from kinject_pytest.models import load_model
    from kinject_pytest.snapshot import read_snapshot
    from kinject_pytest.suite import load_suite
    from kinject_pytest.verdict import DEFAULT_TOLERANCE, REGRESSED, RETAINED, judge

    facts = load_suite(SUITE).facts[:limit]
    snapshot = read_snapshot(SNAPSHOT)
    loaded = load_model("smollm2", device=device, dtype=dtype)
    queries = [Query(key=fact.id, prompt=fact.prompt, answers=fact.expect, choices=fact.choices,
                     probe_token_ids=snapshot.result(fact.id).top_token_ids) for fact in facts]
    started = time.perf_counter()
    results = Scorer(loaded.model, loaded.tokenizer, ScoringSettings(batch_size=64)).score(queries)
    seconds = time.perf_counter() - started

    kls, drops, changed = [], [], 0
    for fact in facts:
        verdict = judge(fact, snapshot.result(fact.id), results[fact.id], DEFAULT_TOLERANCE)
        if verdict.status not in (RETAINED, "unknown"):
            changed += 1
        if verdict.status in (RETAINED, REGRESSED):
            kls.append(verdict.kl)
            drops.append(verdict.logprob_drop)
    kls.sort()
    drops.sort()
    return {
        "dtype": dtype,
        "device": loaded.device,
        "facts": len(facts),
        "facts_base_knows": len(kls),
        "max_kl": kls[-1],
        "p99_kl": kls[int(0.99 * (len(kls) - 1))],
        "max_logprob_drop": drops[-1],
        "p99_logprob_drop": drops[int(0.99 * (len(drops) - 1))],
        "status_changed": changed,
        "seconds_scoring": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--facts", type=int, default=None, help="score only the first N facts (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "dtype_drift.json")
    arguments = parser.parse_args()

    rows = []
    for dtype in arguments.dtypes.split(","):
        rows.append(measure(dtype, arguments.device, arguments.facts))
        print(json.dumps(rows[-1]), flush=True)
    print("| dtype | device | max KL | p99 KL | max logprob drop | p99 drop | status changed |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['dtype']} | {row['device']} | {row['max_kl']:.4f} | {row['p99_kl']:.4f} | "
              f"{row['max_logprob_drop']:.4f} | {row['p99_logprob_drop']:.4f} | {row['status_changed']} |")
    arguments.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
