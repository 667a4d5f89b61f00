"""`kinject diff` on hand-made reports and snapshots: what it lists, its exit statuses and its errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kinject_pytest.cli import main
from kinject_pytest.export import report_data, write_json
from kinject_pytest.session import Options, Outcome, RunSummary
from kinject_pytest.suite import Fact, Tolerance
from kinject_pytest.verdict import REGRESSED, RETAINED, Verdict

REPO = Path(__file__).resolve().parent.parent
EXAMPLES_SNAPSHOT = REPO / "suites" / "__kinject__" / "examples.smollm2.json"


def report_fact(fact_id: str, *, verdict: str = RETAINED, file: str | None = "suites/a.kinject.jsonl",
                completion: str = " Paris.", kl: float | None = 0.0012, candidate_logprob: float = -0.25) -> dict:
    return {
        "id": fact_id,
        "file": file,
        "line": 1,
        "prompt": "The capital of France is",
        "expect": ["Paris"],
        "choices": [],
        "match": "prefix",
        "tags": [],
        "recorded": False,
        "error": None,
        "verdict": verdict,
        "failed_checks": [] if verdict == RETAINED else ["generation"],
        "base_completion": " Paris.",
        "candidate_completion": completion,
        "base_logprob": -0.25,
        "candidate_logprob": candidate_logprob,
        "logprob_drop": max(-0.25 - candidate_logprob, 0.0),
        "kl": kl,
        "tolerance": {"kl": 0.5, "logprob_drop": 1.0},
    }


def report(facts: list[dict], *, candidate: str = "smollm2 + adapters/v1", seconds_scoring: float = 12.5) -> dict:
    return {
        "kinject_report_version": 1,
        "candidate": candidate,
        "base": "smollm2",
        "settings": {"device": "cpu", "dtype": "float32", "batch_size": 64, "top_k": 20, "adapters": ["adapters/v1"]},
        "run": {"scored_facts": len(facts), "seconds_loading": 1.5, "seconds_scoring": seconds_scoring,
                "snapshots_written": []},
        "stats": {"known": len(facts), "retained": len(facts), "regressed": 0},
        "tags": {},
        "facts": facts,
    }


def snapshot_entry(completion: str = " Paris.\n\n", top_logprobs: tuple[float, ...] = (-0.258, -2.741, -4.384)) -> dict:
    return {
        "fact": {"prompt": "The capital of France is", "expect": ["Paris"], "choices": []},
        "result": {
            "completion": completion,
            "completion_token_ids": [7042, 30, 198, 198],
            "answer_logprobs": [top_logprobs[0]],
            "top_logprobs": list(top_logprobs),
            "top_tokens": [" Paris", " the", " London"],
        },
    }


def snapshot(facts: dict[str, dict], *, torch_version: str = "2.13.0+cpu") -> dict:
    return {
        "kinject_snapshot_version": 1,
        "model": {"reference": "smollm2", "fingerprint": {"weights_sha256": "ab12", "tokenizer_sha256": "cd34"}},
        "settings": {"dtype": "float32", "device": "cpu", "top_k": 20},
        "versions": {"python": "3.11.7", "torch": torch_version, "transformers": "4.57.0", "peft": "0.17.0"},
        "facts": facts,
    }


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def run_diff(capsys, *arguments: object) -> tuple[int, str, str]:
    status = main(["diff", *(str(argument) for argument in arguments)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# Nothing changed


def test_report_against_itself_is_unchanged(tmp_path, capsys):
    path = write(tmp_path / "a.json", report([report_fact("known-6"), report_fact("known-7")]))

    status, out, err = run_diff(capsys, path, path)

    assert status == 0
    assert out.startswith("no changes between reports")
    assert err == ""


def test_committed_snapshot_is_unchanged(capsys):
    status, out, _ = run_diff(capsys, EXAMPLES_SNAPSHOT, EXAMPLES_SNAPSHOT)

    assert status == 0
    assert out.startswith("no changes between snapshots")


def test_noise_below_tolerance_is_unchanged(tmp_path, capsys):
    old = write(tmp_path / "old.json", report([report_fact("known-6", kl=0.0012, candidate_logprob=-0.25)]))
    # 5e-5 nats apart, below the default tolerance of 1e-4. Run times always differ, and are ignored.
    new = write(tmp_path / "new.json", report([report_fact("known-6", kl=0.00125, candidate_logprob=-0.25005)],
                                              seconds_scoring=99.0))

    status, out, _ = run_diff(capsys, old, new)

    assert status == 0
    assert "known-6" not in out


def test_integer_equals_same_float(tmp_path, capsys):
    old = write(tmp_path / "old.json", report([report_fact("known-6", kl=0.0)]))
    new_data = report([report_fact("known-6")])
    new_data["facts"][0]["kl"] = 0
    new = write(tmp_path / "new.json", new_data)

    status, _, _ = run_diff(capsys, old, new)

    assert status == 0


def test_fact_order_does_not_matter(tmp_path, capsys):
    facts = [report_fact("known-6"), report_fact("known-7"), report_fact("known-8")]
    old = write(tmp_path / "old.json", report(facts))
    new = write(tmp_path / "new.json", report(list(reversed(facts))))

    status, out, _ = run_diff(capsys, old, new)

    assert status == 0
    assert out.startswith("no changes")


# Changes


def test_abs_tol_below_noise_lists_change(tmp_path, capsys):
    old = write(tmp_path / "old.json", report([report_fact("known-6", kl=0.0012)]))
    new = write(tmp_path / "new.json", report([report_fact("known-6", kl=0.00125)]))

    status, out, _ = run_diff(capsys, old, new, "--abs-tol", "1e-6")

    assert status == 1
    assert "known-6: kl 0.0012 -> 0.00125 nats" in out.splitlines()


def test_verdict_and_completion_changes_listed(tmp_path, capsys):
    old = write(tmp_path / "old.json", report([report_fact("known-6"), report_fact("known-7")]))
    new = write(tmp_path / "new.json", report([
        report_fact("known-6", verdict=REGRESSED, completion=" Brazil.", kl=3.41, candidate_logprob=-9.5),
        report_fact("known-7"),
    ]))

    status, out, _ = run_diff(capsys, old, new)

    lines = out.splitlines()
    fact_lines = [line for line in lines if line.startswith("known-6: ")]
    assert status == 1
    assert fact_lines[0] == "known-6: verdict retained -> regressed"
    assert fact_lines[1] == "known-6: candidate_completion ' Paris.' -> ' Brazil.'"
    assert "known-6: kl 0.0012 -> 3.41 nats" in fact_lines
    assert "known-6: candidate_logprob -0.25 -> -9.5 nats" in fact_lines
    assert "known-6: logprob_drop 0 -> 9.25 nats" in fact_lines
    assert "known-6: failed_checks [] -> [\"generation\"]" in fact_lines
    assert not any(line.startswith("known-7") for line in lines)
    assert lines[-1].startswith("1 fact changed, 0 added, 0 removed, 0 header fields changed")


def test_tolerance_units_in_changes(tmp_path, capsys):
    old_fact = {**report_fact("known-6"), "top_k_overlap": 1.0,
                "tolerance": {"kl": 0.5, "logprob_drop": 1.0, "top_k_overlap": 0.5, "rank_change": 1}}
    new_fact = {**old_fact, "top_k_overlap": 0.6,
                "tolerance": {"kl": 0.2, "logprob_drop": 1.0, "top_k_overlap": 0.8, "rank_change": 0}}

    status, out, _ = run_diff(capsys, write(tmp_path / "old.json", report([old_fact])),
                              write(tmp_path / "new.json", report([new_fact])))

    lines = out.splitlines()
    assert status == 1
    assert "known-6: tolerance.kl 0.5 -> 0.2 nats" in lines
    assert "known-6: tolerance.top_k_overlap 0.5 -> 0.8" in lines
    assert "known-6: tolerance.rank_change 1 -> 0" in lines
    assert "known-6: top_k_overlap 1 -> 0.6" in lines


def test_added_and_removed_facts_are_listed(tmp_path, capsys):
    old = write(tmp_path / "old.json", report([report_fact("known-6"), report_fact("known-7")]))
    new = write(tmp_path / "new.json", report([report_fact("known-7"), report_fact("known-9", verdict=REGRESSED)]))

    status, out, _ = run_diff(capsys, old, new)

    lines = out.splitlines()
    assert status == 1
    assert "known-6: removed (verdict retained)" in lines
    assert "known-9: added (verdict regressed)" in lines
    assert not any(line.startswith("known-7") for line in lines)
    assert lines[-1].startswith("0 facts changed, 1 added, 1 removed")


def test_header_change_is_listed(tmp_path, capsys):
    old = write(tmp_path / "old.json", report([report_fact("known-6")], candidate="smollm2 + adapters/v1"))
    new = write(tmp_path / "new.json", report([report_fact("known-6")], candidate="smollm2 + adapters/v2"))

    status, out, _ = run_diff(capsys, old, new)

    assert status == 1
    assert "header: candidate 'smollm2 + adapters/v1' -> 'smollm2 + adapters/v2'" in out.splitlines()


def test_same_id_in_two_suites_keyed_by_file(tmp_path, capsys):
    old = write(tmp_path / "old.json", report([report_fact("paris", file="suites/a.kinject.jsonl"),
                                               report_fact("paris", file="suites/b.kinject.jsonl")]))
    new = write(tmp_path / "new.json", report([
        report_fact("paris", file="suites/a.kinject.jsonl"),
        report_fact("paris", file="suites/b.kinject.jsonl", verdict=REGRESSED),
    ]))

    status, out, _ = run_diff(capsys, old, new)

    lines = out.splitlines()
    assert status == 1
    assert "suites/b.kinject.jsonl::paris: verdict retained -> regressed" in lines
    assert not any(line.startswith("suites/a.kinject.jsonl::paris") for line in lines)


def test_moved_suite_keeps_fact_keys(tmp_path, capsys):
    old = write(tmp_path / "old.json", report([report_fact("known-6", file="suites/a.kinject.jsonl")]))
    new = write(tmp_path / "new.json", report([report_fact("known-6", file="gate/a.kinject.jsonl")]))

    status, out, _ = run_diff(capsys, old, new)

    assert status == 1
    assert out.splitlines()[0] == "known-6: file 'suites/a.kinject.jsonl' -> 'gate/a.kinject.jsonl'"
    assert out.splitlines()[-1].startswith("1 fact changed, 0 added, 0 removed")


def test_snapshot_changes_are_listed(tmp_path, capsys):
    old = write(tmp_path / "old.json", snapshot({"capital-france": snapshot_entry(), "days": snapshot_entry()}))
    new = write(tmp_path / "new.json", snapshot({
        "capital-france": snapshot_entry(completion=" Lyon.", top_logprobs=(-0.258, -2.741, -3.9)),
        "days": snapshot_entry(top_logprobs=(-0.25805, -2.741, -4.384)),  # noise only
    }))

    status, out, _ = run_diff(capsys, old, new)

    lines = out.splitlines()
    assert status == 1
    assert lines[0] == "capital-france: result.completion ' Paris.\\n\\n' -> ' Lyon.'"
    assert "capital-france: result.top_logprobs[2] -4.384 -> -3.9 nats" in lines
    assert not any(line.startswith("days") for line in lines)


def test_snapshot_versions_are_one_header_line(tmp_path, capsys):
    old_data = snapshot({"capital-france": snapshot_entry()}, torch_version="2.12.0+cpu")
    new_data = snapshot({"capital-france": snapshot_entry()}, torch_version="2.13.0+cpu")
    new_data["versions"]["transformers"] = "4.58.0"
    old = write(tmp_path / "old.json", old_data)
    new = write(tmp_path / "new.json", new_data)

    status, out, _ = run_diff(capsys, old, new)

    header_lines = [line for line in out.splitlines() if line.startswith("header: ")]
    assert status == 1
    assert header_lines == ["header: versions torch '2.12.0+cpu' -> '2.13.0+cpu', transformers '4.57.0' -> '4.58.0'"]


def test_json_output(tmp_path, capsys):
    old = write(tmp_path / "old.json", report([report_fact("known-6"), report_fact("known-7")]))
    new = write(tmp_path / "new.json", report([report_fact("known-6", verdict=REGRESSED),
                                               report_fact("known-8")]))

    status, out, _ = run_diff(capsys, old, new, "--json")

    result = json.loads(out)
    assert status == 1
    assert result["kind"] == "report"
    assert result["changed"] is True
    assert result["abs_tol"] == 1e-4
    assert result["facts"]["known-6"][0] == {"field": "verdict", "old": RETAINED, "new": REGRESSED}
    assert result["added"] == [{"fact": "known-8", "verdict": RETAINED}]
    assert result["removed"] == [{"fact": "known-7", "verdict": RETAINED}]
    assert result["header"] == []


def test_json_output_unchanged(tmp_path, capsys):
    path = write(tmp_path / "a.json", report([report_fact("known-6")]))

    status, out, _ = run_diff(capsys, path, path, "--json")

    assert status == 0
    assert json.loads(out)["changed"] is False


def test_non_finite_numbers_in_json_output(tmp_path, capsys):
    old = write(tmp_path / "old.json", snapshot({"capital-france": snapshot_entry(top_logprobs=(-0.258, -2.741, -4.384))}))
    new = tmp_path / "new.json"
    # Python's json module writes float("-inf") as -Infinity, which a snapshot may contain.
    new.write_text(json.dumps(snapshot({"capital-france": snapshot_entry(top_logprobs=(-0.258, -2.741, float("-inf")))})))

    status, out, _ = run_diff(capsys, old, new, "--json")

    change = json.loads(out)["facts"]["capital-france"]
    assert status == 1
    assert {"field": "result.top_logprobs[2]", "old": -4.384, "new": "-inf"} in change


def test_reports_from_exporter(tmp_path, capsys):
    fact = Fact(id="capital-france", prompt="The capital of France is", expect=("Paris",),
                path=Path("suites/a.kinject.jsonl"), line=1)
    options = Options(model="smollm2", adapters=("adapters/v1",), device="cpu")

    def exported(name: str, status: str, candidate: str) -> Path:
        verdict = Verdict(fact_id=fact.id, status=status, failed_checks=() if status == RETAINED else ("generation",),
                          base_checks={"generation": True}, candidate_checks={"generation": status == RETAINED},
                          base_completion=" Paris.", candidate_completion=candidate, base_logprob=-0.25,
                          candidate_logprob=-0.5, kl=0.125, tolerance=Tolerance(kl=0.5, logprob_drop=1.0))
        summary = RunSummary(candidate_label=options.candidate_label, base_label="smollm2", scored_facts=1)
        path = tmp_path / name
        write_json(path, report_data([Outcome(fact, verdict=verdict)], options, summary))
        return path

    old = exported("old.json", RETAINED, " Paris.")
    new = exported("new.json", REGRESSED, " Lyon.")

    status, out, _ = run_diff(capsys, old, new)

    lines = out.splitlines()
    assert status == 1
    assert lines[0] == "header: stats.lost 0 -> 1"
    assert "capital-france: verdict retained -> regressed" in lines
    assert "capital-france: candidate_completion ' Paris.' -> ' Lyon.'" in lines


# Errors


def test_mixed_inputs_are_error(tmp_path, capsys):
    old = write(tmp_path / "report.json", report([report_fact("known-6")]))
    new = write(tmp_path / "snapshot.json", snapshot({"capital-france": snapshot_entry()}))

    status, out, err = run_diff(capsys, old, new)

    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert f"{old} is a report but {new} is a snapshot" in err
    assert "compare two reports" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"kinject_report_version": 1, "facts": [', "invalid JSON"),
        ('{"facts": {}}', "not a kinject report or snapshot"),
        ('[1, 2]', "not a kinject report or snapshot"),
        ('{"kinject_report_version": 7, "facts": []}', "report format version 7 is not 1"),
        ('{"kinject_report_version": 1}', "missing key 'facts'"),
        ('{"kinject_report_version": 1, "facts": {"a": {}}}', "'facts' is not a list"),
        ('{"kinject_report_version": 1, "facts": [{"file": "a"}]}', "fact 0 has no string 'id'"),
        ('{"kinject_snapshot_version": 1, "facts": []}', "'facts' is not an object keyed by fact id"),
    ],
)
def test_invalid_file_is_one_line_error(tmp_path, capsys, text, message):
    bad = tmp_path / "bad.json"
    bad.write_text(text, encoding="utf-8")
    good = write(tmp_path / "good.json", report([report_fact("known-6")]))

    status, out, err = run_diff(capsys, good, bad)

    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"kinject diff: error: {bad}")
    assert message in err


def test_duplicate_fact_is_error(tmp_path, capsys):
    duplicated = write(tmp_path / "a.json", report([report_fact("known-6"), report_fact("known-6")]))

    status, _, err = run_diff(capsys, duplicated, duplicated)

    assert status == 2
    assert "fact 'suites/a.kinject.jsonl::known-6' occurs twice" in err


def test_missing_file_is_error(tmp_path, capsys):
    good = write(tmp_path / "good.json", report([report_fact("known-6")]))

    status, _, err = run_diff(capsys, tmp_path / "missing.json", good)

    assert status == 2
    assert f"cannot read {tmp_path / 'missing.json'}: No such file or directory" in err


def test_markdown_report_is_error(tmp_path, capsys):
    markdown = tmp_path / "kinject-report.md"
    markdown.write_text("## kinject: smollm2\n", encoding="utf-8")

    status, _, err = run_diff(capsys, markdown, markdown)

    assert status == 2
    assert "a Markdown report cannot be compared" in err
    assert "--kinject-report FILE.json" in err


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "tiny"])
def test_invalid_abs_tol_is_usage_error(tmp_path, capsys, value):
    path = write(tmp_path / "a.json", report([report_fact("known-6")]))

    with pytest.raises(SystemExit) as exit_info:
        main(["diff", str(path), str(path), "--abs-tol", value])

    assert exit_info.value.code == 2
    assert f"invalid tolerance '{value}'" in capsys.readouterr().err


# Command line


def test_help_lists_diff(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])

    assert exit_info.value.code == 0
    assert "diff" in capsys.readouterr().out


def test_diff_help_lists_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["diff", "--help"])

    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "--abs-tol NATS" in out
    assert "--json" in out
    assert "Exit status" in out


def test_no_command_prints_help(capsys):
    status = main([])

    assert status == 2
    assert "usage: kinject" in capsys.readouterr().err


def test_console_script_runs_diff(tmp_path):
    script = Path(sys.executable).parent / "kinject"
    if not script.is_file():
        pytest.skip(f"no console script at {script}; install the project with pip install -e .")
    old = write(tmp_path / "old.json", report([report_fact("known-6")]))
    new = write(tmp_path / "new.json", report([report_fact("known-6", verdict=REGRESSED)]))

    result = subprocess.run([str(script), "diff", str(old), str(new)], capture_output=True, text=True, timeout=120)

    assert result.returncode == 1
    assert "known-6: verdict retained -> regressed" in result.stdout.splitlines()


def test_diff_does_not_import_torch(tmp_path):
    old = write(tmp_path / "old.json", report([report_fact("known-6")]))
    new = write(tmp_path / "new.json", report([report_fact("known-6", verdict=REGRESSED)]))
    code = (
        "import sys\n"
        "from kinject_pytest.cli import main\n"
        f"status = main(['diff', {str(old)!r}, {str(new)!r}])\n"
        "print('status', status)\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
    )

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "status 1" in result.stdout
    assert "torch not imported" in result.stdout
