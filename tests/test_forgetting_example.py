"""The forgetting example's table, on hand-made reports and on real reports of the cached fine-tunes."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType

import pytest

from conftest import REPO


def load_example() -> ModuleType:
    name = "kinject_forgetting_example"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "examples" / "forgetting" / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def report(*, learned: int, judged: int, paraphrase: float | None, retained: int, known: int, mean_kl: float | None,
           regressed: int, lost: int = 0) -> dict:
    return {
        "stats": {"retained": retained, "known": known, "mean_kl": mean_kl, "regressed": regressed, "lost": lost},
        "edits": {"taught": judged, "judged": judged, "learned": learned, "paraphrase_success": paraphrase},
    }


def test_table_from_reports():
    example = load_example()
    rows = [
        example.table_row("LoRA", report(learned=20, judged=20, paraphrase=0.65, retained=100, known=400,
                                         mean_kl=2.25049, regressed=300, lost=120), 4_884_480),
        example.table_row("full fine-tune", report(learned=19, judged=20, paraphrase=0.35, retained=300, known=400,
                                                   mean_kl=0.6846, regressed=100, lost=7), 134_515_008),
    ]

    table = example.markdown_table(rows)

    assert table.splitlines()[2:] == [
        "| LoRA | 4,884,480 | 100.0% (20/20) | 65.0% | 25.0% (100/400) | 2.250 | 300 | 120 |",
        "| full fine-tune | 134,515,008 | 95.0% (19/20) | 35.0% | 75.0% (300/400) | 0.685 | 100 | 7 |",
    ]


def test_table_without_judged_facts():
    example = load_example()
    row = example.table_row("LoRA", report(learned=0, judged=0, paraphrase=None, retained=0, known=0, mean_kl=None,
                                           regressed=0), 10)

    assert example.markdown_table([row]).splitlines()[2] == "| LoRA | 10 | n/a (0/0) | n/a | n/a (0/0) | n/a | 0 | 0 |"


def test_trained_facts_are_edits_and_train_controls():
    example = load_example()

    ids = example.trained_fact_ids(example.load_builders())

    assert len(ids) == 40
    assert "known-126" in ids  # an edit
    assert "known-241" in ids  # a train control


@pytest.mark.smollm2
def test_example_runs_on_cached_fine_tunes(tmp_path, smollm2_lora, smollm2_full):
    # The fixtures above build the fine-tunes when they are missing, so the example only reuses them.
    example = load_example()
    # known-126 and known-106 select two taught facts (the full fine-tune does not learn known-106)
    # and the known facts whose ids start with those names or with known-1006, which the base knows.
    select = "known-126 or known-106 or known-1006"

    assert example.main(["--out", str(tmp_path), "-k", select]) == 0

    lines = (tmp_path / "forgetting.md").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("Budget: 40 examples in one batch, 12 AdamW steps for LoRA (r 8, learning rate 0.001)")
    lora, full = lines[4], lines[5]
    assert lora.startswith("| LoRA | ")
    assert "| 100.0% (2/2) |" in lora
    assert full.startswith("| full fine-tune | 134,515,008 | ")
    assert "| 50.0% (1/2) |" in full
    # known-126 and known-106 of the known-facts suite were trained on, so the example deselects them.
    report = json.loads((tmp_path / "lora.json").read_text(encoding="utf-8"))
    known_ids = {fact["id"] for fact in report["facts"] if fact["file"].endswith("known_facts.kinject.jsonl")}
    assert "known-1006" in known_ids
    assert not known_ids & {"known-126", "known-106"}
    assert (tmp_path / "lora.json").is_file()
    assert (tmp_path / "full-fine-tune.json").is_file()


def test_out_file_rejected_before_training(tmp_path, capsys):
    taken = tmp_path / "results"
    taken.write_text("not a folder\n")

    with pytest.raises(SystemExit) as exit_info:
        load_example().main(["--out", str(taken)])

    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f": error: --out {taken}: {taken} is a file, not a folder; pass a folder for the reports")
    assert taken.read_text() == "not a folder\n"
