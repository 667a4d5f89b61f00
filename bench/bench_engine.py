"""Measure how fast kinject scores a suite, against a one-fact-at-a-time baseline.

Usage: python bench/bench_engine.py [--facts N] [--batch-sizes 1,16,64] [--out bench/results.json]

Scores the first N facts of suites/known_facts.kinject.jsonl with SmolLM2-135M-Instruct on the
CPU, once per batch size, and once with the baseline that per-fact tools use: ``generate()`` for
the greedy completion plus one full forward pass per answer and choice. Prints a Markdown table
and writes the numbers with the machine's description to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SUITE = REPO / "suites" / "known_facts.kinject.jsonl"


def machine() -> dict[str, str | int]:
    import torch

    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count() or 0, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}


def queries(count: int) -> list:
    from kinject_pytest.engine import Query
    from kinject_pytest.suite import load_suite

    facts = load_suite(SUITE).facts[:count]
    return [Query(fact.id, fact.prompt, fact.expect, fact.choices) for fact in facts]


def time_kinject(loaded, batch: list, batch_size: int) -> float:
    from kinject_pytest.engine import Scorer, ScoringSettings

    started = time.perf_counter()
    Scorer(loaded.model, loaded.tokenizer, ScoringSettings(batch_size=batch_size)).score(batch)
    return time.perf_counter() - started


def time_baseline(loaded, batch: list) -> float:
    """One fact at a time: generate() for the completion, one forward pass per answer and choice."""
    import torch
    from transformers import GenerationConfig

    model, tokenizer = loaded.model, loaded.tokenizer
    config = GenerationConfig(do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.eos_token_id)
    started = time.perf_counter()
    with torch.inference_mode():
        for query in batch:
            prompt_ids = tokenizer(query.prompt, return_tensors="pt").input_ids
            model.generate(prompt_ids, generation_config=config)
            for text in query.answers + query.choices:
                ids = tokenizer(query.prompt + " " + text, return_tensors="pt").input_ids
                logits = model(ids).logits
                torch.log_softmax(logits[0, prompt_ids.shape[1] - 1 : -1].float(), dim=-1)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=256)
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    arguments = parser.parse_args()

    from kinject_pytest.models import load_model

    loaded = load_model("smollm2", device="cpu", dtype="float32")
    batch = queries(arguments.facts)
    time_kinject(loaded, batch[:8], 8)  # warm-up: first calls allocate and pick kernels

    rows = [{"method": "baseline: one fact at a time", "batch_size": 1, "seconds": time_baseline(loaded, batch)}]
    for size in (int(value) for value in arguments.batch_sizes.split(",")):
        rows.append({"method": "kinject Scorer", "batch_size": size, "seconds": time_kinject(loaded, batch, size)})
    for row in rows:
        row["facts_per_second"] = round(len(batch) / row["seconds"], 2)
        row["seconds"] = round(row["seconds"], 2)

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)", "suite": SUITE.name,
              "facts": len(batch), "device": "cpu", "peak_rss_mib": round(peak_mib), "machine": machine(),
              "rows": rows}
    arguments.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"{len(batch)} facts of {SUITE.name}, {report['model']}, CPU: {report['machine']['cpu']} "
          f"({report['machine']['cores']} cores), peak RSS {report['peak_rss_mib']} MiB")
    print("| method | batch size | seconds | facts/s |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['batch_size']} | {row['seconds']} | {row['facts_per_second']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
