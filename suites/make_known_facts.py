"""Build suites/known_facts.kinject.jsonl from the known-facts data set.

Usage: python suites/make_known_facts.py [INPUT] [--output PATH]

INPUT defaults to ../shared/data/known_facts.jsonl next to the repository root. Each input record
becomes one fact: id ``known-{known_id}``, the record's prompt, its attribute as the answer, its
Wikidata relation id as the tag, and up to three distractors drawn from the other attributes of the
same relation. The output is the same on every run, because the distractors come from a
`random.Random` seeded with the record's known_id.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = REPO_ROOT.parent / "shared" / "data" / "known_facts.jsonl"
DEFAULT_OUTPUT = REPO_ROOT / "suites" / "known_facts.kinject.jsonl"

DISTRACTOR_COUNT = 3
REQUIRED_KEYS = ("known_id", "prompt", "attribute", "relation_id")

HEADER = {
    "suite": {
        "description": (
            "Factual prompts completed by an attribute of a Wikidata relation, such as a city's country "
            "or a company's owner. Tags are the relation ids (P36 capital, P30 continent, and so on). "
            "Choices are other attributes of the same relation."
        ),
        "source": (
            'The "known facts" set released with "Locating and Editing Factual Associations in GPT" '
            "by Kevin Meng, David Bau, Alex Andonian and Yonatan Belinkov (NeurIPS 2022): "
            "a subset of its records, with prompts and answers unchanged."
        ),
        "license": "MIT License, as released by the authors of the source data set",
    }
}


def read_records(path: Path) -> list[dict[str, Any]]:
    """Read the input JSONL and check that every record has the keys this script uses."""
    records = []
    with path.open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: invalid JSON ({error.msg})") from None
            missing = [key for key in REQUIRED_KEYS if key not in record]
            if missing:
                raise ValueError(f"{path}:{line_number}: record is missing the keys {', '.join(missing)}")
            records.append(record)
    return sorted(records, key=lambda record: record["known_id"])


def attributes_by_relation(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Collect each relation's attributes, one spelling per case-insensitive value, in sorted order."""
    spellings: dict[str, dict[str, str]] = defaultdict(dict)
    for record in sorted(records, key=lambda record: record["attribute"]):
        spellings[record["relation_id"]].setdefault(record["attribute"].casefold(), record["attribute"])
    return {relation: sorted(by_key.values()) for relation, by_key in spellings.items()}


def pick_distractors(record: dict[str, Any], attributes: list[str]) -> list[str]:
    """Pick up to DISTRACTOR_COUNT attributes of the record's relation that differ from its answer."""
    answer = record["attribute"].casefold()
    candidates = [attribute for attribute in attributes if attribute.casefold() != answer]
    rng = random.Random(record["known_id"])
    return rng.sample(candidates, min(DISTRACTOR_COUNT, len(candidates)))


def build_lines(records: list[dict[str, Any]]) -> list[str]:
    """Render the header and one fact per record as JSONL lines."""
    attributes = attributes_by_relation(records)
    lines = [json.dumps(HEADER, ensure_ascii=False)]
    for record in records:
        fact = {
            "id": f"known-{record['known_id']}",
            "prompt": record["prompt"],
            "expect": record["attribute"],
            "choices": pick_distractors(record, attributes[record["relation_id"]]),
            "tags": [record["relation_id"]],
        }
        lines.append(json.dumps(fact, ensure_ascii=False))
    return lines


def write_atomically(path: Path, lines: list[str]) -> None:
    """Write the lines through a temporary file in the same folder, so readers never see half a suite."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="\n") as file:
            file.write("\n".join(lines) + "\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the known-facts suite from the known-facts JSONL data.")
    parser.add_argument("input", nargs="?", type=Path, default=DEFAULT_INPUT, help=f"input JSONL (default: {DEFAULT_INPUT})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"suite file to write (default: {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)

    try:
        records = read_records(args.input)
    except FileNotFoundError:
        print(f"error: input not found: {args.input}; pass the path of known_facts.jsonl", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    write_atomically(args.output, build_lines(records))
    print(f"wrote {len(records)} facts to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
