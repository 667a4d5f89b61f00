"""`pytest --kinject` end to end, through pytester, on SmolLM2-135M-Instruct and its fine-tunes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_jsonl

pytestmark = pytest.mark.smollm2

# SmolLM2-135M-Instruct answers the first two and gets the third wrong (" Europe").
GEOGRAPHY = [
    {"id": "capital-france", "prompt": "The capital of France is", "expect": "Paris"},
    {"id": "capital-japan", "prompt": "The capital of Japan is", "expect": "Tokyo", "choices": ["Osaka", "Kyoto"],
     "tags": ["capitals"]},
    {"id": "vinson-massif", "prompt": "Vinson Massif is located in the continent of", "expect": "Antarctica"},
]
SNAPSHOT = Path("__kinject__/geo.smollm2.json")


@pytest.fixture
def geo_suite(pytester, smollm2_dir) -> Path:
    return write_jsonl(pytester.path / "geo.kinject.jsonl", GEOGRAPHY)


def test_update_then_check_passes(pytester, geo_suite):
    recorded = pytester.runpytest("--kinject", "--kinject-update", "-rs")

    recorded.assert_outcomes(passed=2, skipped=1)
    assert (pytester.path / SNAPSHOT).is_file()

    checked = pytester.runpytest("--kinject", "-rs")

    checked.assert_outcomes(passed=2, skipped=1)
    checked.stdout.fnmatch_lines([
        "*2 retained, 0 regressed, 0 gained, 1 unknown*",
        "*retention of facts the base knows: 2/2 = 100.0%*",
        "*geo.kinject.jsonl:3: unknown: neither the base nor the candidate knows it*",
    ])


def test_snapshot_records_model_and_settings(pytester, geo_suite):
    pytester.runpytest("--kinject", "--kinject-update")

    snapshot = json.loads((pytester.path / SNAPSHOT).read_text())

    assert snapshot["model"]["reference"] == "smollm2"
    assert snapshot["model"]["fingerprint"]["quantization"] == "Q4_1"
    assert len(snapshot["model"]["fingerprint"]["weights_sha256"]) == 64
    assert snapshot["settings"] == {"batch_size": 64, "device": "cpu", "dtype": "float32", "extra_new_tokens": 3,
                                    "free_new_tokens": 12, "top_k": 20}
    assert sorted(snapshot["facts"]) == ["capital-france", "capital-japan", "vinson-massif"]
    assert snapshot["facts"]["capital-france"]["result"]["completion"].startswith(" Paris")


def test_missing_snapshot_fails_with_update_command(pytester, geo_suite):
    result = pytester.runpytest("--kinject")

    assert result.ret == 1
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines([
        "*no snapshot __kinject__/geo.smollm2.json for model smollm2; record the suite with: "
        "pytest --kinject --kinject-update geo.kinject.jsonl*",
    ])


def test_missing_entry_names_fact_and_command(pytester, geo_suite):
    pytester.runpytest("--kinject", "--kinject-update")
    write_jsonl(geo_suite, GEOGRAPHY + [{"id": "capital-italy", "prompt": "The capital of Italy is", "expect": "Rome"}])

    result = pytester.runpytest("--kinject")

    result.assert_outcomes(passed=2, skipped=1, failed=1)
    result.stdout.fnmatch_lines([
        "*no snapshot entry for fact 'capital-italy' in __kinject__/geo.smollm2.json; record it with: "
        "pytest --kinject --kinject-update geo.kinject.jsonl::capital-italy*",
    ])


def test_update_with_k_keeps_other_entries(pytester, geo_suite):
    pytester.runpytest("--kinject", "--kinject-update")
    path = pytester.path / SNAPSHOT
    before = json.loads(path.read_text())
    before["facts"]["capital-japan"]["result"]["completion"] = " edited by the test"
    before["facts"]["vinson-massif"]["result"]["completion"] = " edited by the test"
    path.write_text(json.dumps(before))

    result = pytester.runpytest("--kinject", "--kinject-update", "-k", "france")

    result.assert_outcomes(passed=1)
    after = json.loads(path.read_text())
    assert after["facts"]["capital-japan"]["result"]["completion"] == " edited by the test"
    assert after["facts"]["vinson-massif"]["result"]["completion"] == " edited by the test"
    assert after["facts"]["capital-france"]["result"]["completion"].startswith(" Paris")


def test_changed_prompt_makes_entry_stale(pytester, geo_suite):
    pytester.runpytest("--kinject", "--kinject-update")
    changed = [dict(GEOGRAPHY[0], prompt="France's capital city is"), *GEOGRAPHY[1:]]
    write_jsonl(geo_suite, changed)

    result = pytester.runpytest("--kinject")

    result.assert_outcomes(passed=1, skipped=1, failed=1)
    result.stdout.fnmatch_lines(["*snapshot entry for fact 'capital-france' in __kinject__/geo.smollm2.json was "
                                 "recorded for another prompt; re-record it with: pytest --kinject --kinject-update "
                                 "geo.kinject.jsonl::capital-france*"])


def test_tags_select_with_m(pytester, geo_suite):
    pytester.runpytest("--kinject", "--kinject-update")

    result = pytester.runpytest("--kinject", "-m", "capitals")

    result.assert_outcomes(passed=1)


def test_junit_xml_carries_verdict(pytester, geo_suite):
    pytester.runpytest("--kinject", "--kinject-update")

    pytester.runpytest("--kinject", "--junitxml=report.xml")

    xml = (pytester.path / "report.xml").read_text()
    assert 'name="capital-france"' in xml
    assert '<property name="kinject_verdict" value="retained" />' in xml
    assert '<property name="kinject_kl_nats" value="0.000000" />' in xml
    assert '<property name="kinject_top_k_overlap" value="1.0000" />' in xml
    # Only capital-japan has choices, so only its item carries a rank change.
    assert xml.count('<property name="kinject_rank_change" value="0" />') == 1


def test_suite_outside_rootdir_in_minimal_form(pytester, smollm2_dir, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere")
    suite = write_jsonl(outside / "mine.kinject.jsonl",
                        [{"id": "capital-france", "prompt": "The capital of France is", "expect": "Paris"}])

    recorded = pytester.runpytest("--kinject", "--kinject-update", str(suite))
    checked = pytester.runpytest("--kinject", str(suite))

    recorded.assert_outcomes(passed=1)
    checked.assert_outcomes(passed=1)
    assert (outside / "__kinject__" / "mine.smollm2.json").is_file()


def test_lora_adapter_regresses_edited_facts(pytester, smollm2_lora, counterfactual_edits):
    edits = counterfactual_edits[:6]
    controls = GEOGRAPHY[:2]
    records = [{"id": edit["id"], "prompt": edit["prompt"], "expect": edit["old"]} for edit in edits] + controls
    write_jsonl(pytester.path / "edits.kinject.jsonl", records)
    pytester.runpytest("--kinject", "--kinject-update").assert_outcomes(passed=len(records))

    result = pytester.runpytest("--kinject", f"--kinject-adapter={smollm2_lora}")

    assert result.ret == 1
    failed = {report.nodeid.split("::")[1] for report in result.reprec.getfailedcollections()} | {
        report.nodeid.split("::")[1] for report in result.reprec.getreports("pytest_runtest_logreport")
        if report.failed
    }
    assert len(failed & {edit["id"] for edit in edits}) >= 5
    first = edits[0]
    result.stdout.fnmatch_lines([
        f"*fact {first['id']} (*edits.kinject.jsonl:1) regressed:*",
        f"*prompt:     {first['prompt']!r}*",
        f"*expected:   {first['old']}  (match: prefix)*",
        f"*base:       ' {first['old']}*",
        "*candidate:  *",
        f"*candidate: smollm2 + {smollm2_lora}*",
    ])
    result.stdout.fnmatch_lines([
        "*retention of facts the base knows: *",
        "*Wilson 95% interval of the retention rate: *; exact McNemar test of * lost vs * gained facts: p = *",
        "*worst regressions*",
    ])


def test_full_finetune_candidate_regresses(pytester, smollm2_full, counterfactual_edits):
    edits = counterfactual_edits[:6]
    records = [{"id": edit["id"], "prompt": edit["prompt"], "expect": edit["old"]} for edit in edits]
    write_jsonl(pytester.path / "edits.kinject.jsonl", records)
    pytester.runpytest("--kinject", "--kinject-update").assert_outcomes(passed=len(records))

    result = pytester.runpytest("--kinject", f"--kinject-candidate={smollm2_full}")

    assert result.ret == 1
    assert result.parseoutcomes()["failed"] >= 5


def test_base_changed_since_snapshot_is_rejected(pytester, geo_suite):
    pytester.runpytest("--kinject", "--kinject-update")
    path = pytester.path / SNAPSHOT
    snapshot = json.loads(path.read_text())
    snapshot["model"]["fingerprint"]["weights_sha256"] = "0" * 64
    path.write_text(json.dumps(snapshot))

    result = pytester.runpytest("--kinject")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: *geo.smollm2.json: recorded from other weights of smollm2 *the snapshot is "
                                 "stale, re-record it with: pytest --kinject --kinject-update geo.kinject.jsonl"])


def test_aggregate_gate_on_lora(pytester, smollm2_lora, counterfactual_edits):
    # Six edited facts the adapter overwrites and two capitals: retention is at most 2/8.
    records = [{"id": edit["id"], "prompt": edit["prompt"], "expect": edit["old"]}
               for edit in counterfactual_edits[:6]] + GEOGRAPHY[:2]
    write_jsonl(pytester.path / "edits.kinject.jsonl", records)
    pytester.runpytest("--kinject", "--kinject-update")
    adapter = f"--kinject-adapter={smollm2_lora}"

    below = pytester.runpytest("--kinject", adapter, "--kinject-gate=aggregate", "--kinject-min-retention=0")
    above = pytester.runpytest("--kinject", adapter, "--kinject-gate=aggregate", "--kinject-min-retention=0.9")

    assert below.ret == pytest.ExitCode.OK
    assert below.parseoutcomes()["xfailed"] >= 6
    assert above.ret == pytest.ExitCode.TESTS_FAILED
    above.assert_outcomes(failed=1, xfailed=below.parseoutcomes()["xfailed"],
                          passed=below.parseoutcomes().get("passed", 0) - 1)
    above.stdout.fnmatch_lines(["*kinject gate failed for smollm2 + *",
                                "*is below the minimum 90.0% (--kinject-min-retention)*"])


def test_tag_tolerance_and_tag_threshold_on_lora(pytester, smollm2_lora, counterfactual_edits):
    edits = [{"id": edit["id"], "prompt": edit["prompt"], "expect": edit["old"], "tags": ["edited"]}
             for edit in counterfactual_edits[:6]]
    controls = [{**fact, "tags": ["controls"]} for fact in GEOGRAPHY[:2]]
    suite = write_jsonl(pytester.path / "edits.kinject.jsonl", edits + controls)
    pytester.runpytest("--kinject", "--kinject-update")
    adapter = f"--kinject-adapter={smollm2_lora}"

    # The adapter still completes " Tokyo" but moves the next-token distribution past the default KL
    # tolerance, and the edited facts regress, which the tag threshold allows none of.
    strict = pytester.runpytest("--kinject", adapter, "--kinject-tag-threshold=edited:max_regressed=0",
                                "--kinject-report=strict.json")
    japan = next(fact for fact in json.loads((pytester.path / "strict.json").read_text())["facts"]
                 if fact["id"] == "capital-japan")

    assert strict.ret == pytest.ExitCode.TESTS_FAILED
    assert japan["verdict"] == "regressed"
    assert "generation" not in japan["failed_checks"]
    assert "kl" in japan["failed_checks"]
    strict.stdout.fnmatch_lines(["*fact capital-japan (*edits.kinject.jsonl:8) regressed: *next-token distribution "
                                 "moved (kl)*",
                                 "*effective tolerance: kl <= 0.500 nats, logprob_drop <= 1.000 nats, top_k_overlap "
                                 ">= *, rank_change <= * places"])
    strict.stdout.fnmatch_lines(["*kinject gate failed for smollm2 + *",
                                 "*tag edited: * facts regressed, more than the maximum 0 "
                                 "(--kinject-tag-threshold edited:max_regressed=0)"])

    # A tag tolerance loose enough for any movement turns capital-japan into a retained fact.
    loose_limits = {"kl": 100.0, "logprob_drop": 100.0, "top_k_overlap": 0.0, "rank_change": 2}
    write_jsonl(suite, [{"suite": {"tag_tolerances": {"controls": loose_limits}}}] + edits + controls)
    loose = pytester.runpytest("--kinject", adapter, "--kinject-gate=aggregate",
                               "--kinject-tag-threshold=controls:min_retention=0.5", "--kinject-report=loose.json")
    japan = next(fact for fact in json.loads((pytester.path / "loose.json").read_text())["facts"]
                 if fact["id"] == "capital-japan")

    assert japan["verdict"] == "retained"
    assert japan["tolerance"] == loose_limits
    assert loose.ret == pytest.ExitCode.OK


EXAMPLE = Path(__file__).resolve().parent / "examples" / "test_knowledge_example.py"


def test_example_file_on_base_and_lora(pytester, smollm2_lora):
    # Another module name, because the outer run has already imported tests/examples/ under the original one.
    pytester.makepyfile(test_copied_example=EXAMPLE.read_text())

    on_base = pytester.runpytest("--kinject")
    on_lora = pytester.runpytest("--kinject", f"--kinject-adapter={smollm2_lora}")

    assert on_base.ret == pytest.ExitCode.OK
    assert on_base.parseoutcomes()["passed"] >= 5
    assert on_lora.ret == pytest.ExitCode.TESTS_FAILED
    on_lora.stdout.fnmatch_lines(["*prompt:*", "*expected:*", "*base:*", "*candidate:*"])
