"""Reports of a run with several candidates: JSON shape, Markdown, HTML and kinject diff, on hand-made outcomes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kinject_pytest import html, session
from kinject_pytest.cli import main
from kinject_pytest.export import markdown_report, session_report_data, write_json
from kinject_pytest.html import candidate_reports, html_report
from kinject_pytest.session import CandidateRun, CandidateSpec, Options, Outcome, RunSummary, candidate_names
from kinject_pytest.suite import Fact, Tolerance
from kinject_pytest.verdict import REGRESSED, RETAINED, Verdict

FACT = Fact(id="capital-france", prompt="The capital of France is", expect=("Paris",),
            path=Path("suites/a.kinject.jsonl"), line=1)
OPTIONS = Options(model="smollm2", adapters=("adapters/lora-a", "adapters/lora-b"), device="cpu", each_adapter=True)


def outcome(status: str, completion: str, candidate: str) -> Outcome:
    verdict = Verdict(fact_id=FACT.id, status=status, failed_checks=() if status == RETAINED else ("generation",),
                      base_checks={"generation": True}, candidate_checks={"generation": status == RETAINED},
                      base_completion=" Paris.", candidate_completion=completion, base_logprob=-0.25,
                      candidate_logprob=-0.5 if status == RETAINED else -3.0, kl=0.125,
                      tolerance=Tolerance(kl=0.5, logprob_drop=1.0))
    return Outcome(FACT, verdict=verdict, candidate=candidate)


def run(name: str, status: str, completion: str, *, error: str | None = None) -> CandidateRun:
    spec = CandidateSpec(name, (f"adapters/{name}",))
    result = CandidateRun(spec, OPTIONS.for_candidate(spec).candidate_label, base_weights="shared", error=error)
    key = session.outcome_key(FACT, name)
    result.outcomes[key] = Outcome(FACT, error=error, candidate=name) if error else outcome(status, completion, name)
    return result


@pytest.fixture
def data() -> dict:
    runs = [run("lora-a", RETAINED, " Paris."), run("lora-b", REGRESSED, " Lyon.")]
    summary = RunSummary(candidate_label=OPTIONS.candidate_label, base_label="smollm2", scored_facts=3,
                         base_results="live")
    return session_report_data(runs, OPTIONS, summary)


def test_candidate_names_unique_and_safe():
    names = candidate_names(("runs/lora", "other/lora", "x/lora", "runs/v1 (final)", "y/ä+ü"))

    assert names == ["lora", "lora-2", "lora-3", "v1-final", "adapter"]


def test_json_has_one_entry_per_candidate(data):
    assert data["base"] == "smollm2"
    assert data["base_results"] == "live"
    assert data["settings"]["adapters"] == ["adapters/lora-a", "adapters/lora-b"]
    assert data["settings"]["each_adapter"] is True
    assert "facts" not in data
    first, second = data["candidates"]
    assert first["name"] == "lora-a"
    assert first["candidate"] == "smollm2 + adapters/lora-a"
    assert first["adapters"] == ["adapters/lora-a"]
    assert first["base_weights"] == "shared"
    assert first["stats"]["retained"] == 1
    assert second["stats"]["regressed"] == 1
    assert second["facts"][0]["candidate_completion"] == " Lyon."


def test_single_candidate_json_keeps_flat_shape():
    spec = CandidateSpec("", ("adapters/lora-a",))
    single = CandidateRun(spec, "smollm2 + adapters/lora-a", base_weights="shared")
    single.outcomes["a"] = outcome(RETAINED, " Paris.", "")
    options = Options(model="smollm2", adapters=("adapters/lora-a",), device="cpu")

    data = session_report_data([single], options, RunSummary())

    assert "candidates" not in data
    assert [fact["id"] for fact in data["facts"]] == ["capital-france"]
    assert data["candidate"] == "smollm2 + adapters/lora-a"
    assert data["base_results"] == "snapshot"
    assert data["base_weights"] == "shared"


def test_candidate_reports_restore_single_shape(data):
    reports = candidate_reports(data)

    assert [name for name, _ in reports] == ["lora-a", "lora-b"]
    _, second = reports[1]
    assert second["kinject_report_version"] == 1
    assert second["base_results"] == "live"
    assert second["settings"]["adapters"] == ["adapters/lora-b"]
    assert second["facts"][0]["verdict"] == REGRESSED


def test_markdown_has_section_per_candidate(data):
    text = markdown_report(data)

    assert text.startswith("## kinject: 2 candidates against smollm2\n")
    assert "| lora-a | 1 | 0 | 0 | 0 | 100.0% |" in text
    assert "| lora-b | 0 | 1 | 0 | 0 | 0.0% |" in text
    assert "### lora-a: smollm2 + adapters/lora-a" in text
    assert "### lora-b: smollm2 + adapters/lora-b" in text
    assert text.count("Base results scored in this run (--kinject-live-base), not written to the snapshot.") == 2
    assert "Base weights: one copy: the adapter was attached to the base already in memory." in text


def test_markdown_names_candidate_not_judged():
    runs = [run("lora-a", RETAINED, " Paris."), run("lora-b", RETAINED, "", error="the adapter changed nothing")]

    text = markdown_report(session_report_data(runs, OPTIONS, RunSummary()))

    assert "| lora-b | 0 | 0 | 0 | 0 | not judged |" in text
    assert "Not judged: the adapter changed nothing" in text


def test_html_has_section_and_table_per_candidate(data):
    page = html_report(data)

    assert "<title>kinject: 2 candidates against smollm2</title>" in page
    assert page.count('<section class="candidate"') == 2
    assert '<table id="facts-0" class="facts">' in page
    assert '<table id="facts-1" class="facts">' in page
    assert page.count("<svg") == 6
    assert "<h2>lora-b: smollm2 + adapters/lora-b</h2>" in page
    assert "Base results scored in this run (--kinject-live-base), not written to the snapshot." in page


def test_html_texts_match_session():
    assert html.BASE_RESULTS_TEXT == session.BASE_RESULTS_TEXT
    assert html.BASE_WEIGHTS_TEXT == session.BASE_WEIGHTS_TEXT


# kinject diff


def run_diff(capsys, *arguments: object) -> tuple[int, str, str]:
    status = main(["diff", *map(str, arguments)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def multi_path(tmp_path, data) -> Path:
    path = tmp_path / "multi.json"
    write_json(path, data)
    return path


def test_diff_several_candidates_needs_name(multi_path, capsys):
    status, out, err = run_diff(capsys, multi_path, multi_path)

    assert status == 2
    assert out == ""
    assert err.strip() == (f"kinject diff: error: {multi_path} is a report of several candidates (lora-a, lora-b); "
                           "pick one with --candidate NAME, or with --old-candidate / --new-candidate")


def test_diff_two_candidates_of_one_report(multi_path, capsys):
    status, out, _ = run_diff(capsys, multi_path, multi_path, "--old-candidate=lora-a", "--new-candidate=lora-b")

    lines = out.splitlines()
    assert status == 1
    assert "capital-france: verdict retained -> regressed" in lines
    assert "header: candidate 'smollm2 + adapters/lora-a' -> 'smollm2 + adapters/lora-b'" in lines
    assert lines[-1].endswith("(numbers compared to an absolute tolerance of 0.0001)")


def test_diff_candidate_against_single_report(multi_path, tmp_path, data, capsys):
    single = tmp_path / "single.json"
    write_json(single, candidate_reports(data)[1][1])

    status, out, _ = run_diff(capsys, multi_path, single, "--candidate=lora-b")

    assert status == 0
    assert out.strip() == (f"no changes between reports {multi_path}[lora-b] and {single} "
                           "(numbers compared to an absolute tolerance of 0.0001)")


def test_diff_unknown_candidate_is_error(multi_path, capsys):
    status, _, err = run_diff(capsys, multi_path, multi_path, "--candidate=lora-c")

    assert status == 2
    assert err.strip() == (f"kinject diff: error: {multi_path} has no candidate 'lora-c' (it has lora-a, lora-b); "
                           "pass one of those to --candidate")


def test_diff_candidate_option_on_single_report_is_error(tmp_path, data, capsys):
    single = tmp_path / "single.json"
    write_json(single, candidate_reports(data)[0][1])

    status, _, err = run_diff(capsys, single, single, "--old-candidate=lora-a")

    assert status == 2
    assert err.strip().startswith(f"kinject diff: error: {single} is a report of one candidate; drop --old-candidate")


def test_diff_reads_json_written_twice(multi_path, capsys):
    data = json.loads(multi_path.read_text())
    data["candidates"][0]["facts"][0]["kl"] = 0.25
    other = multi_path.with_name("changed.json")
    other.write_text(json.dumps(data))

    status, out, _ = run_diff(capsys, multi_path, other, "--candidate=lora-a")

    assert status == 1
    assert "capital-france: kl 0.125 -> 0.25 nats" in out.splitlines()
