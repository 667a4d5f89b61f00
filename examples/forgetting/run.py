"""Train a LoRA adapter and a full fine-tune of SmolLM2 on the same edits, gate both, and compare.

Usage: python examples/forgetting/run.py [--out DIR] [-k EXPRESSION]

1. Build (or reuse from the cache) the two fixture fine-tunes of fixtures/build.py. Both train on
   the same 40 examples (20 counterfactual edits, 20 true control facts) as one batch for 12 AdamW
   steps. Only the learning rate differs: 1e-3 for LoRA, 3e-5 for the full fine-tune.
2. Gate each with kinject in its own pytest process: suites/known_facts.kinject.jsonl without the 40
   facts the fine-tunes trained on (a copy in the output folder), and
   suites/counterfactual_edits.kinject.jsonl, whose facts declare the taught answers. Each run
   writes a JSON report.
3. Read both reports and print, and write as Markdown, one row per fine-tune: learned (efficacy),
   paraphrase success, retention of the known facts, mean KL, and regressed facts.

A LoRA or full fine-tune that is already cached is reused as is, so only the first run trains.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# This checkout's kinject and fixtures, even where another copy of kinject is installed.
sys.path.insert(0, str(REPO))

from kinject_pytest.files import write_text_atomically  # noqa: E402

KNOWN_FACTS = REPO / "suites" / "known_facts.kinject.jsonl"
TAUGHT = REPO / "suites" / "counterfactual_edits.kinject.jsonl"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

# pytest exits with 1 when a fact failed; that is a result here, not an error.
ACCEPTED_EXIT_CODES = (0, 1)


@dataclass(frozen=True)
class Row:
    """One fine-tune's line of the table; rates are fractions in [0, 1], KL is in nats."""

    name: str
    trained_parameters: int
    learned: int
    taught: int
    paraphrase_success: float | None
    retained: int
    known: int
    mean_kl: float | None
    regressed: int
    lost: int  # regressed facts the candidate no longer knows, as opposed to ones that only moved past a tolerance

    @property
    def efficacy(self) -> float | None:
        return self.learned / self.taught if self.taught else None

    @property
    def retention(self) -> float | None:
        return self.retained / self.known if self.known else None


def load_builders() -> ModuleType:
    """Import fixtures/build.py, a script rather than a package module."""
    spec = importlib.util.spec_from_file_location("kinject_fixtures_build", REPO / "fixtures" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def trained_fact_ids(builders: ModuleType) -> list[str]:
    """Return the ids of the known facts the fine-tunes trained on: the edits and the train controls."""
    edits = [edit["id"] for edit in builders.counterfactual_edits()]
    controls = [control["id"] for control in builders.control_facts(split="train")]
    return edits + controls


def untrained_known_facts(out: Path, trained: list[str]) -> Path:
    """Write the known-facts suite without the facts in ``trained`` to ``out/suites/``, under its own name.

    Its name stays ``known_facts.kinject.jsonl``, so with ``--kinject-snapshot-dir`` the run reads the
    shipped snapshot. pytest's ``--deselect`` matches node id prefixes, so it cannot remove
    ``known-6`` without also removing ``known-60`` to ``known-699``.
    """
    kept = []
    for line in KNOWN_FACTS.read_text(encoding="utf-8").splitlines(keepends=True):
        record = json.loads(line) if line.strip() else {}
        if record.get("id") not in trained:
            kept.append(line)
    path = out / "suites" / KNOWN_FACTS.name
    write_text_atomically(path, "".join(kept))
    return path


def gate(name: str, candidate_flag: str, out: Path, known_facts: Path, select: str | None) -> dict[str, Any]:
    """Run kinject on both suites in a pytest subprocess and return its JSON report."""
    report = out / f"{name}.json"
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO),
        "--kinject", candidate_flag, f"--kinject-report={report}",
        f"--kinject-snapshot-dir={KNOWN_FACTS.parent / '__kinject__'}", str(known_facts), str(TAUGHT),
    ]
    if select:
        command += ["-k", select]

    # The subprocess imports kinject from this checkout, even where another copy is installed.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    print(f"gating {name} ...", flush=True)
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if completed.returncode not in ACCEPTED_EXIT_CODES or not report.is_file():
        tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-20:])
        raise SystemExit(f"pytest for {name} failed with exit status {completed.returncode}:\n{tail}")
    return json.loads(report.read_text(encoding="utf-8"))


def trained_parameters(folder: Path) -> int:
    """Count the parameters stored in a fixture folder's safetensors files (the adapter, or the whole model)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():
                shape = weights.get_slice(key).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


def table_row(name: str, report: dict[str, Any], parameters: int) -> Row:
    """Read one fine-tune's row from its kinject JSON report."""
    stats, edits = report["stats"], report["edits"]
    return Row(
        name=name,
        trained_parameters=parameters,
        learned=edits["learned"],
        taught=edits["judged"],
        paraphrase_success=edits["paraphrase_success"],
        retained=stats["retained"],
        known=stats["known"],
        mean_kl=stats["mean_kl"],
        regressed=stats["regressed"],
        lost=stats["lost"],
    )


def markdown_table(rows: list[Row]) -> str:
    """Render the rows as a Markdown table; percentages have one decimal, KL three."""
    lines = [
        "| fine-tune | trained parameters | learned (efficacy) | paraphrase success | retained known facts "
        "| mean KL (nats) | regressed facts | of which lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            row.name,
            f"{row.trained_parameters:,}",
            f"{_percent(row.efficacy)} ({row.learned}/{row.taught})",
            _percent(row.paraphrase_success),
            f"{_percent(row.retention)} ({row.retained}/{row.known})",
            "n/a" if row.mean_kl is None else f"{row.mean_kl:.3f}",
            str(row.regressed),
            str(row.lost),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def budget_text(builders: ModuleType) -> str:
    """Describe the shared training budget from the fixture recipes."""
    lora, full = builders.LORA_RECIPE, builders.FULL_RECIPE
    examples = len(builders.counterfactual_edits()) + len(builders.control_facts(split="train"))
    return (f"Budget: {examples} examples in one batch, {lora['steps']} AdamW steps for LoRA (r {lora['r']}, "
            f"learning rate {lora['learning_rate']:g}) and {full['steps']} for the full fine-tune "
            f"(learning rate {full['learning_rate']:g}), seed {lora['seed']}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare what a LoRA adapter and a full fine-tune of SmolLM2 "
                                                 "learn and forget on the same counterfactual edits.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for the JSON reports and forgetting.md (default: {DEFAULT_OUT})")
    parser.add_argument("-k", dest="select", default=None,
                        help="pytest -k expression that limits the gated facts, for a quick partial run")
    args = parser.parse_args(argv)
    out = args.out.resolve()  # the pytest subprocesses run in the repository root
    # Checked before the fine-tunes are built, which can take minutes.
    taken = next((path for path in (out, *out.parents) if path.exists() and not path.is_dir()), None)
    if taken is not None:
        parser.error(f"--out {args.out}: {taken} is a file, not a folder; pass a folder for the reports")

    builders = load_builders()
    print("building or reusing the fine-tunes (the first build trains for a few minutes on CPU) ...", flush=True)
    fine_tunes = {"LoRA": builders.build_lora(), "full fine-tune": builders.build_full_finetune()}
    out.mkdir(parents=True, exist_ok=True)

    known_facts = untrained_known_facts(out, trained_fact_ids(builders))
    flags = {"LoRA": f"--kinject-adapter={fine_tunes['LoRA']}",
             "full fine-tune": f"--kinject-candidate={fine_tunes['full fine-tune']}"}
    rows = []
    for name, folder in fine_tunes.items():
        report = gate(name.replace(" ", "-").lower(), flags[name], out, known_facts, args.select)
        rows.append(table_row(name, report, trained_parameters(folder)))

    text = budget_text(builders) + "\n\n" + markdown_table(rows)
    write_text_atomically(out / "forgetting.md", text)
    print(text, end="")
    print(f"written: {out / 'forgetting.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
