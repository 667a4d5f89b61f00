"""The JSON and Markdown report files and the GitHub Actions job summary, on hand-made outcomes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kinject_pytest.export import (
    append_step_summary,
    markdown_report,
    report_data,
    step_summary_path,
    write_json,
    write_reports,
)
from kinject_pytest.session import Options, Outcome, RunSummary
from kinject_pytest.stats import mcnemar_exact, wilson_interval
from kinject_pytest.suite import Fact, Tolerance
from kinject_pytest.verdict import DEFAULT_TOLERANCE, GAINED, REGRESSED, RETAINED, UNKNOWN, Verdict

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = Tolerance(kl=0.5, logprob_drop=1.0, top_k_overlap=0.5, rank_change=1)


def make_fact(fact_id: str, prompt: str, expect: str, *, tags: tuple[str, ...] = (), path: str = "suites/a.kinject.jsonl",
              line: int = 1) -> Fact:
    return Fact(id=fact_id, prompt=prompt, expect=(expect,), tags=tags, path=Path(path), line=line)


def make_outcome(fact: Fact, status: str, *, base: str = " Paris", candidate: str = " Paris", base_logprob: float = -0.25,
                 candidate_logprob: float = -0.5, kl: float | None = 0.125, failed: tuple[str, ...] = ()) -> Outcome:
    base_knows = status in (RETAINED, REGRESSED)
    candidate_knows = status in (RETAINED, GAINED) or (status == REGRESSED and "generation" not in failed)
    verdict = Verdict(
        fact_id=fact.id,
        status=status,
        failed_checks=failed,
        base_checks={"generation": base_knows},
        candidate_checks={"generation": candidate_knows},
        base_completion=base,
        candidate_completion=candidate,
        base_logprob=base_logprob,
        candidate_logprob=candidate_logprob,
        kl=kl,
        tolerance=TOLERANCE,
        top_k_overlap=0.85 if kl is not None else None,
        base_rank=1,
        candidate_rank=3 if "rank_change" in failed else 1,
    )
    return Outcome(fact, verdict=verdict)


@pytest.fixture
def outcomes() -> list[Outcome]:
    return [
        make_outcome(make_fact("paris", "La capitale de la France est", "Paris", tags=("capital",), line=3), RETAINED),
        make_outcome(make_fact("tokyo", "東京は日本の首都です。首都は", "東京", tags=("capital", "asia"), line=1),
                     REGRESSED, candidate=" 大阪", candidate_logprob=-4.75, kl=1.5, failed=("generation", "kl", "logprob_drop")),
        make_outcome(make_fact("pipe", "a | b\nis", "c|d", tags=("syntax",), line=2), REGRESSED,
                     base=" c|d", candidate=" e\nf", candidate_logprob=-2.0, kl=0.75, failed=("generation", "kl", "logprob_drop")),
        make_outcome(make_fact("moved", "Rome is in", "Italy", tags=("capital",), line=4), REGRESSED,
                     candidate_logprob=-1.5, kl=0.25, failed=("logprob_drop",)),
        make_outcome(make_fact("gain", "Oslo is in", "Norway", line=5), GAINED, kl=None),
        make_outcome(make_fact("unknown", "Quito is in", "Ecuador", line=6), UNKNOWN, candidate=" Peru", kl=None),
        Outcome(make_fact("missing", "Lima is in", "Peru", line=7), error="no snapshot entry for fact 'missing'"),
        # The same fact id in a second suite file sorts after the first file.
        make_outcome(make_fact("paris", "Paris is the capital of", "France", path="suites/b.kinject.jsonl"), RETAINED),
    ]


@pytest.fixture
def data(outcomes) -> dict:
    options = Options(model="smollm2", adapters=("adapters/lora",), device="cpu", batch_size=32, top_k=20,
                      tolerance=Tolerance(kl=0.75))
    summary = RunSummary(candidate_label=options.candidate_label, base_label="smollm2", scored_facts=7)
    return report_data(outcomes, options, summary)


# report_data


def test_report_data_header_and_settings(data):
    assert data["kinject_report_version"] == 1
    assert data["candidate"] == "smollm2 + adapters/lora"
    assert data["base"] == "smollm2"
    assert data["settings"] == {"device": "cpu", "dtype": "float32", "batch_size": 32, "top_k": 20,
                                "adapters": ["adapters/lora"]}
    assert data["run"]["scored_facts"] == 7


def test_report_data_every_fact_with_verdict(data):
    entries = [(fact["id"], fact["file"], fact["verdict"]) for fact in data["facts"]]
    assert entries == [
        ("gain", "suites/a.kinject.jsonl", GAINED),
        ("missing", "suites/a.kinject.jsonl", "error"),
        ("moved", "suites/a.kinject.jsonl", REGRESSED),
        ("paris", "suites/a.kinject.jsonl", RETAINED),
        ("paris", "suites/b.kinject.jsonl", RETAINED),
        ("pipe", "suites/a.kinject.jsonl", REGRESSED),
        ("tokyo", "suites/a.kinject.jsonl", REGRESSED),
        ("unknown", "suites/a.kinject.jsonl", UNKNOWN),
    ]


def test_report_data_fact_fields(data):
    tokyo = next(fact for fact in data["facts"] if fact["id"] == "tokyo")
    assert tokyo["line"] == 1
    assert tokyo["prompt"] == "東京は日本の首都です。首都は"
    assert tokyo["expect"] == ["東京"]
    assert tokyo["tags"] == ["capital", "asia"]
    assert tokyo["failed_checks"] == ["generation", "kl", "logprob_drop"]
    assert tokyo["base_completion"] == " Paris"
    assert tokyo["candidate_completion"] == " 大阪"
    assert tokyo["base_logprob"] == -0.25
    assert tokyo["candidate_logprob"] == -4.75
    assert tokyo["logprob_drop"] == 4.5
    assert tokyo["kl"] == 1.5
    assert tokyo["top_k_overlap"] == 0.85
    assert tokyo["base_rank"] == 1
    assert tokyo["candidate_rank"] == 1
    assert tokyo["rank_change"] == 0
    assert tokyo["tolerance"] == {"kl": 0.5, "logprob_drop": 1.0, "top_k_overlap": 0.5, "rank_change": 1}
    assert tokyo["error"] is None


def test_error_fact_effective_tolerance(data):
    missing = next(fact for fact in data["facts"] if fact["id"] == "missing")
    assert missing["error"] == "no snapshot entry for fact 'missing'"
    assert missing["candidate_completion"] is None
    assert missing["kl"] is None
    # kl comes from the options, logprob_drop from the default tolerance.
    assert missing["top_k_overlap"] is None
    assert missing["rank_change"] is None
    assert missing["tolerance"] == {"kl": 0.75, "logprob_drop": 1.0, "top_k_overlap": DEFAULT_TOLERANCE.top_k_overlap,
                                    "rank_change": DEFAULT_TOLERANCE.rank_change}


def test_report_data_stats(data):
    stats = data["stats"]
    assert (stats["known"], stats["retained"], stats["regressed"], stats["gained"], stats["unknown"]) == (5, 2, 3, 1, 1)
    assert stats["lost"] == 2  # "moved" regressed on a tolerance only
    assert stats["retention_rate"] == pytest.approx(0.4)
    assert (stats["wilson_low"], stats["wilson_high"]) == wilson_interval(2, 5)
    assert stats["mcnemar_p"] == mcnemar_exact(2, 1)
    assert stats["mean_kl"] == pytest.approx((0.125 + 1.5 + 0.75 + 0.25 + 0.125) / 5)
    assert stats["max_kl"] == 1.5
    assert sorted(data["tags"]) == ["asia", "capital", "syntax"]
    assert data["tags"]["capital"]["known"] == 3
    assert data["tags"]["capital"]["retained"] == 1


def test_report_data_non_finite_numbers_become_null():
    fact = make_fact("inf", "Bern is in", "Switzerland")
    outcome = make_outcome(fact, REGRESSED, candidate_logprob=-math.inf, kl=math.nan, failed=("logprob_drop",))
    data = report_data([outcome], Options(), RunSummary())
    entry = data["facts"][0]
    assert entry["candidate_logprob"] is None
    assert entry["logprob_drop"] is None
    assert entry["kl"] is None
    assert data["stats"]["mean_kl"] is None
    json.dumps(data, allow_nan=False)


# JSON files


def test_json_round_trip(tmp_path, data):
    path = tmp_path / "report.json"
    write_json(path, data)

    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == data
    assert "東京は日本の首都です" in text  # written as UTF-8, not as \u escapes
    assert text.startswith('{\n  "base": "smollm2",')  # sorted keys, indent 2
    assert text.endswith("}\n")


def test_json_rejects_nan(tmp_path):
    path = tmp_path / "report.json"
    with pytest.raises(ValueError):
        write_json(path, {"kl": math.nan})
    assert list(tmp_path.iterdir()) == []


def test_json_creates_parent_folder(tmp_path, data):
    path = tmp_path / "reports" / "nested" / "report.json"
    write_json(path, data)
    assert json.loads(path.read_text(encoding="utf-8"))["candidate"] == "smollm2 + adapters/lora"


def test_failed_write_keeps_old_file(tmp_path, monkeypatch, data):
    path = tmp_path / "report.json"
    path.write_text("previous report\n", encoding="utf-8")

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, data)

    assert [entry.name for entry in tmp_path.iterdir()] == ["report.json"]
    assert path.read_text(encoding="utf-8") == "previous report\n"


def test_written_report_is_not_owner_only(tmp_path, data):
    path = tmp_path / "report.json"
    write_json(path, data)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# write_reports


def test_write_reports_by_suffix(tmp_path, data):
    json_path = tmp_path / "kinject.json"
    markdown_path = tmp_path / "kinject.MD"
    write_reports([json_path, str(markdown_path)], data)

    assert json.loads(json_path.read_text(encoding="utf-8")) == data
    assert markdown_path.read_text(encoding="utf-8") == markdown_report(data)


def test_write_reports_unsupported_suffix(tmp_path, data):
    json_path = tmp_path / "kinject.json"
    with pytest.raises(ValueError) as raised:
        write_reports([json_path, tmp_path / "kinject.txt"], data)

    message = str(raised.value)
    assert message == (f"unsupported report file {tmp_path / 'kinject.txt'}: "
                       "the name must end in .json or .md or .html")
    assert "\n" not in message
    assert not json_path.exists()  # nothing is written when any path is invalid


# Markdown


def test_markdown_heading_and_counts(data):
    markdown = markdown_report(data)
    lines = markdown.splitlines()
    assert lines[0] == "## kinject: smollm2 + adapters/lora"
    assert "| retained | regressed | gained | unknown | without snapshot entry |" in lines
    assert "| 2 | 3 | 1 | 1 | 1 |" in lines


def test_markdown_statistics(data):
    markdown = markdown_report(data)
    low, high = wilson_interval(2, 5)
    assert (f"- Retention of facts the base knows: 2/5 = 40.0% (95% Wilson interval {low:.1%} to {high:.1%})"
            in markdown.splitlines())
    assert f"- Exact McNemar test, facts lost (2) against facts gained (1): p = {mcnemar_exact(2, 1):.3g}" in markdown
    assert "- KL(base ‖ candidate) on known facts: mean 0.5500 nats, max 1.5000 nats" in markdown


def test_markdown_tag_table_lowest_retention_first(data):
    lines = markdown_report(data).splitlines()
    start = lines.index("| tag | known | retained | regressed | retention |")
    rows = lines[start + 2:start + 5]
    assert rows == [
        "| asia | 1 | 0 | 1 | 0.0% |",
        "| syntax | 1 | 0 | 1 | 0.0% |",
        "| capital | 3 | 1 | 2 | 33.3% |",
    ]


def test_markdown_worst_regressions(data):
    lines = markdown_report(data).splitlines()
    start = lines.index("| fact | prompt | expected | base | candidate | failed checks | drop (nats) | KL (nats) "
                        "| top-k overlap | rank change |")
    rows = lines[start + 2:start + 5]
    assert rows[0] == ("| tokyo | 東京は日本の首都です。首都は | 東京 | Paris | 大阪 | generation, kl, logprob\\_drop "
                       "| 4.500 | 1.500 | 0.85 | 0 |")
    # Pipes are escaped and line breaks become <br>, so each row stays one table row.
    assert rows[1] == ("| pipe | a \\| b<br>is | c\\|d | c\\|d | e<br>f | generation, kl, logprob\\_drop | 1.750 | 0.750 "
                       "| 0.85 | 0 |")
    assert rows[2] == "| moved | Rome is in | Italy | Paris | Paris | logprob\\_drop | 1.250 | 0.250 | 0.85 | 0 |"
    assert lines[start + 5:] == [
        "",
        "Effective tolerance: kl ≤ 0.5 nats, logprob_drop ≤ 1 nats, top_k_overlap ≥ 0.5, rank_change ≤ 1 places.",
    ]


def test_markdown_ends_with_one_newline(data):
    markdown = markdown_report(data)
    assert markdown.endswith(".\n")
    assert not markdown.endswith("\n\n")


def test_markdown_shows_ten_worst_regressions():
    outcomes = [
        make_outcome(make_fact(f"fact-{index:02d}", "Some prompt", "answer"), REGRESSED,
                     candidate_logprob=-1.0 - index, failed=("logprob_drop",))
        for index in range(12)
    ]
    markdown = markdown_report(report_data(outcomes, Options(), RunSummary()))
    assert "### Worst regressions (10 of 12, largest drop in log p(expected) first)" in markdown
    assert "| fact-11 |" in markdown
    assert "| fact-02 |" in markdown
    assert "| fact-01 |" not in markdown
    assert markdown.index("| fact-11 |") < markdown.index("| fact-10 |")


def test_markdown_escapes_markup_in_candidate_name():
    options = Options(candidate="models/my_model|v2\nrun")
    markdown = markdown_report(report_data([], options, RunSummary()))
    assert markdown.splitlines()[0] == "## kinject: models/my\\_model\\|v2 run"
    assert "- Retention: the base knows none of these facts." in markdown
    assert "Worst regressions" not in markdown


def test_markdown_from_json_read_back(tmp_path, data):
    path = tmp_path / "report.json"
    write_json(path, data)
    assert markdown_report(json.loads(path.read_text(encoding="utf-8"))) == markdown_report(data)


# GitHub Actions job summary


def test_step_summary_appended_when_set(tmp_path, monkeypatch):
    summary = tmp_path / "step_summary.md"
    summary.write_text("# earlier step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))

    assert step_summary_path() == summary
    assert append_step_summary("## kinject: run 1") == summary
    assert append_step_summary("## kinject: run 2\n") == summary
    assert summary.read_text(encoding="utf-8") == "# earlier step\n## kinject: run 1\n## kinject: run 2\n"


@pytest.mark.parametrize("value", [None, ""])
def test_step_summary_unset_does_nothing(tmp_path, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    else:
        monkeypatch.setenv("GITHUB_STEP_SUMMARY", value)
    monkeypatch.chdir(tmp_path)

    assert step_summary_path() is None
    assert append_step_summary("## kinject") is None
    assert list(tmp_path.iterdir()) == []


# Imports


def test_report_modules_skip_torch_import():
    code = ("import sys, kinject_pytest.export, kinject_pytest.stats; "
            "print(sorted(name for name in ('torch', 'pytest', '_pytest') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"


# Taught facts


def taught_outcome(fact_id: str, learned: bool, *, line: int = 9) -> Outcome:
    from kinject_pytest.edits import EditScores, PromptScores, judge_edit
    from kinject_pytest.suite import Teach

    fact = Fact(id=fact_id, prompt="Trento is located in the country of", expect=("Italy",), path=Path("t.kinject.jsonl"),
                line=line, teach=Teach(answer="Brazil", paraphrases=("Trento is a city in", "Trento lies in")))
    before = PromptScores(fact.prompt, -0.5, 1, -6.0, 2)
    after = PromptScores(fact.prompt, -3.0, 1, -2.0, 2) if learned else before
    base = EditScores(before, (PromptScores("Trento is a city in", -1.0, 1, -8.0, 2),
                               PromptScores("Trento lies in", -1.0, 1, -8.0, 2)))
    candidate = EditScores(after, (PromptScores("Trento is a city in", -4.0, 1, -2.0, 2),
                                   PromptScores("Trento lies in", -1.0, 1, -math.inf, 2)))
    return Outcome(fact, edit=judge_edit(fact, base, candidate, candidate_is_base=False))


@pytest.fixture
def taught_data(outcomes) -> dict:
    taught = [taught_outcome("trento", True), taught_outcome("trento-again", False, line=10)]
    options = Options(model="smollm2", adapters=("adapters/lora",))
    return report_data(outcomes + taught, options, RunSummary())


def test_taught_facts_stay_out_of_stats(taught_data, data):
    assert taught_data["stats"] == data["stats"]
    assert taught_data["edits"] == {"taught": 2, "judged": 2, "learned": 1, "efficacy": 0.5, "paraphrase_facts": 2,
                                    "paraphrase_success": 0.5}


def test_taught_fact_entry(taught_data):
    trento = next(fact for fact in taught_data["facts"] if fact["id"] == "trento")

    assert trento["verdict"] == "learned"
    assert trento["teach"]["old_answer"] == "Italy"
    assert trento["teach"]["new_answer"] == "Brazil"
    assert trento["teach"]["base"]["rewrite"]["old_nll"] == 0.5
    assert trento["teach"]["base"]["rewrite"]["new_nll"] == 3.0
    assert trento["teach"]["candidate"]["rewrite"]["prefers_new"] is True
    assert trento["teach"]["candidate"]["efficacy"] is True
    assert trento["teach"]["candidate"]["paraphrase_success"] == 0.5
    # An infinite NLL has no JSON number, so it is written as null.
    assert trento["teach"]["candidate"]["paraphrases"][1]["new_nll"] is None


def test_taught_report_writes_as_json(tmp_path, taught_data):
    path = tmp_path / "r.json"

    write_json(path, taught_data)

    assert json.loads(path.read_text(encoding="utf-8")) == taught_data


def test_markdown_taught_section(taught_data):
    text = markdown_report(taught_data)

    assert "### Taught facts" in text
    assert "- Learned (efficacy): 1/2 = 50.0%" in text
    assert "- Paraphrase success: 50.0% (mean over 2 facts)" in text
    assert "- Kept: 2/5 = 40.0% of the other facts the base knows" in text
    assert "| trento | Trento is located in the country of | Italy | Brazil | 0.500 / 3.000 | 3.000 / 1.000 | 1/2 | " \
           "learned |" in text
    assert "| trento-again | Trento is located in the country of | Italy | Brazil | 0.500 / 3.000 | 0.500 / 3.000 | " \
           "1/2 | not_learned |" in text


def test_markdown_without_taught_facts_has_no_section(data):
    assert "Taught facts" not in markdown_report(data)


def test_summary_lines_say_learned_and_kept(outcomes):
    from kinject_pytest.report import summary_lines

    lines = summary_lines(outcomes + [taught_outcome("trento", True), taught_outcome("trento-again", False)])

    assert lines[1] == ("learned 1/2 taught facts (efficacy 50.0%), paraphrase success 50.0% over 2 facts; "
                        "kept 2/5 of the other facts the base knows (40.0%)")


def test_taught_failure_report(outcomes):
    from kinject_pytest.report import taught_report

    text = taught_report(taught_outcome("trento-again", False, line=10), Options(adapters=("lora",)))

    assert text.splitlines() == [
        "fact trento-again (t.kinject.jsonl:10) not learned: the candidate does not prefer the taught answer on the "
        "fact's prompt",
        "  prompt:     'Trento is located in the country of'",
        "  old answer: 'Italy'   new answer: 'Brazil'",
        "  per-token mean NLL in nats, old / new answer (lower is more likely), base -> candidate:",
        "  prompt:     0.500 / 3.000 (old preferred) -> 0.500 / 3.000 (old preferred)",
        "  paraphrase: 1.000 / 4.000 (old preferred) -> 4.000 / 1.000 (new preferred)  'Trento is a city in'",
        "  paraphrase: 1.000 / 4.000 (old preferred) -> 1.000 / inf (old preferred)  'Trento lies in'",
        "  paraphrases preferring the new answer: 0/2 (base) -> 1/2 (candidate)",
        "  candidate: smollm2 + lora",
    ]


GATE = {
    "mode": "aggregate",
    "passed": False,
    "thresholds": {"min_retention": 0.5},
    "breaches": [],
    "tags": {
        "capital": {"thresholds": {"max_regressed": 1}, "checked": True, "passed": False,
                    "breaches": ["tag capital: 2 facts regressed, more than the maximum 1 "
                                 "(--kinject-tag-threshold capital:max_regressed=1)"]},
        "asia": {"thresholds": {"min_retention": 0.0, "max_mean_kl": 2.0}, "checked": True, "passed": True,
                 "breaches": []},
        "chemistry": {"thresholds": {"max_mean_kl": 0.1}, "checked": False, "passed": True, "breaches": []},
    },
}


def test_report_data_carries_gate(outcomes):
    data = report_data(outcomes, Options(), RunSummary(), gate=GATE)

    assert data["gate"] == GATE
    assert report_data(outcomes, Options(), RunSummary())["gate"] is None


def test_markdown_gate_per_tag(outcomes):
    lines = markdown_report(report_data(outcomes, Options(), RunSummary(), gate=GATE)).splitlines()

    start = lines.index("### Gate (aggregate): failed")
    assert lines[start + 2] == "- All facts (min_retention=0.5): passed"
    assert lines[start + 4:start + 9] == [
        "| tag | thresholds | result |",
        "|---|---|---|",
        "| capital | max\\_regressed=1 | failed: 2 facts regressed, more than the maximum 1 "
        "(--kinject-tag-threshold capital:max\\_regressed=1) |",
        "| asia | min\\_retention=0, max\\_mean\\_kl=2 | passed |",
        "| chemistry | max\\_mean\\_kl=0.1 | not checked: no judged fact carries the tag |",
    ]


def test_markdown_without_gate_has_no_gate_section(data):
    assert "### Gate" not in markdown_report(data)
