"""Options and ini keys, on the tiny random model so each run takes a second or two."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl

TWO_FACTS = [
    {"id": "capital-france", "prompt": "The capital of France is", "expect": "Paris"},
    {"id": "capital-japan", "prompt": "The capital of Japan is", "expect": "Tokyo"},
]


def test_ini_model_names_the_snapshot(pytester, tiny_llama):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)
    pytester.makeini(f"[pytest]\nkinject_model = {tiny_llama}\n")

    result = pytester.runpytest("--kinject", "--kinject-update")

    result.assert_outcomes(skipped=2)
    snapshot = json.loads((pytester.path / "__kinject__" / f"f.{tiny_llama.name}.json").read_text())
    assert snapshot["model"]["reference"] == str(tiny_llama)


def test_command_line_wins_over_ini(pytester, tiny_llama):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)
    pytester.makeini("[pytest]\nkinject_model = ./no/such/model\nkinject_top_k = 5\n")

    result = pytester.runpytest("--kinject", "--kinject-update", f"--kinject-model={tiny_llama}")

    result.assert_outcomes(skipped=2)
    snapshot = json.loads((pytester.path / "__kinject__" / f"f.{tiny_llama.name}.json").read_text())
    assert snapshot["settings"]["top_k"] == 5
    assert len(snapshot["facts"]["capital-france"]["result"]["top_logprobs"]) == 5


def test_snapshot_dir_option_moves_snapshot(pytester, tiny_llama):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)

    pytester.runpytest("--kinject", "--kinject-update", f"--kinject-model={tiny_llama}", "--kinject-snapshot-dir=snaps")

    assert (pytester.path / "snaps" / f"f.{tiny_llama.name}.json").is_file()
    assert not (pytester.path / "__kinject__").exists()


def test_last_failed_reruns_only_missing_entry(pytester, tiny_llama):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)
    model = f"--kinject-model={tiny_llama}"
    pytester.runpytest("--kinject", "--kinject-update", model, "-k", "france")
    pytester.runpytest("--kinject", model).assert_outcomes(skipped=1, failed=1)

    result = pytester.runpytest("--kinject", model, "--lf")

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*no snapshot entry for fact 'capital-japan'*--kinject-model=*"])


def test_exitfirst_stops_after_first_failure(pytester, tiny_llama):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)

    result = pytester.runpytest("--kinject", f"--kinject-model={tiny_llama}", "-x")

    result.assert_outcomes(failed=1)


def test_other_dtype_than_snapshot_warns(pytester, tiny_llama):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)
    pytester.runpytest("--kinject", "--kinject-update", f"--kinject-model={tiny_llama}")

    result = pytester.runpytest("--kinject", f"--kinject-model={tiny_llama}", "--kinject-dtype=bfloat16",
                                "-W", "error::kinject_pytest.session.KinjectWarning")

    # The warning, turned into an error, stops the run as a usage error rather than an INTERNALERROR.
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines(["ERROR: *was recorded with dtype float32, the candidate runs in bfloat16; each fact's "
                                 "tolerance is widened by 0.05 nats of KL*(a KinjectWarning, made an error by -W or "
                                 "filterwarnings)"])


def test_filterwarnings_error_stops_widened_run(pytester, tiny_llama):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)
    pytester.runpytest("--kinject", "--kinject-update", f"--kinject-model={tiny_llama}")
    # In-process pytester runs meet kinject_pytest already imported, which pytest warns about; a
    # user's own run does not.
    pytester.makeini("[pytest]\nfilterwarnings =\n    error\n    ignore::pytest.PytestAssertRewriteWarning\n")

    result = pytester.runpytest("--kinject", f"--kinject-model={tiny_llama}", "--kinject-dtype=bfloat16")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines(["ERROR: *the candidate runs in bfloat16*"])


def test_bfloat16_scores_close_to_float32(tiny_llama):
    from kinject_pytest.engine import Query, Scorer
    from kinject_pytest.models import load_model

    query = [Query("f", "The capital of France is", ("Paris",), ("Lyon",))]
    full = load_model(str(tiny_llama), device="cpu", dtype="float32")
    half = load_model(str(tiny_llama), device="cpu", dtype="bfloat16")

    exact = Scorer(full.model, full.tokenizer).score(query)["f"]
    rounded = Scorer(half.model, half.tokenizer).score(query)["f"]

    assert half.dtype == "bfloat16"
    assert next(half.model.parameters()).dtype.is_floating_point
    assert rounded.answer_logprobs[0] == pytest.approx(exact.answer_logprobs[0], abs=0.1)
    assert half.fingerprint.weights == full.fingerprint.weights


def test_device_cuda_without_gpu_is_usage_error(pytester, tiny_llama):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)

    result = pytester.runpytest("--kinject", "--kinject-update", f"--kinject-model={tiny_llama}",
                                "--kinject-device=cuda")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --kinject-device=cuda was requested but torch sees no CUDA device; "
                                 "use --kinject-device=cpu or auto"])


def test_reports_written_and_step_summary_appended(pytester, tiny_llama, monkeypatch):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)
    step_summary = pytester.path / "step-summary.md"
    step_summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    model = f"--kinject-model={tiny_llama}"
    pytester.runpytest("--kinject", "--kinject-update", model)

    result = pytester.runpytest("--kinject", model, "--kinject-report=out/report.json", "--kinject-report=report.md")

    result.stdout.fnmatch_lines(["*report written: out/report.json*", "*report written: report.md*"])
    report = json.loads((pytester.path / "out" / "report.json").read_text())
    assert sorted(fact["id"] for fact in report["facts"]) == ["capital-france", "capital-japan"]
    assert {fact["verdict"] for fact in report["facts"]} == {"unknown"}
    assert (pytester.path / "report.md").read_text().startswith("## kinject: ")
    assert step_summary.read_text().startswith("earlier step\n## kinject: ")


def test_report_with_unknown_suffix_is_usage_error(pytester):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)

    result = pytester.runpytest("--kinject", "--kinject-report=report.txt")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --kinject-report=report.txt has an unsupported suffix; use a file name "
                                 "ending in .json or .md or .html"])


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--kinject-max-kl=-1", "ERROR: --kinject-max-kl=-1.0 is invalid; pass a finite number of nats that is 0 or more*"),
        ("--kinject-max-logprob-drop=inf", "ERROR: --kinject-max-logprob-drop=inf is invalid; pass a finite number*"),
        ("--kinject-batch-size=0", "ERROR: --kinject-batch-size=0 is invalid; pass a positive integer"),
        ("--kinject-top-k=0", "ERROR: --kinject-top-k=0 is invalid; pass a positive integer"),
        ("--kinject-device=tpu", "ERROR: --kinject-device=tpu is invalid; use auto, cpu, cuda, cuda:N or mps"),
        ("--kinject-min-retention=95", "ERROR: --kinject-min-retention=95.0 is invalid; pass a fraction between 0 and 1*"),
        ("--kinject-gate=aggregate", "ERROR: --kinject-gate=aggregate needs a threshold; add --kinject-min-retention*"),
        ("--kinject-min-top-k-overlap=1.5", "ERROR: --kinject-min-top-k-overlap=1.5 is invalid; pass a fraction "
                                            "between 0 and 1, such as 0.5 (it is also read from the ini key "
                                            "kinject_min_top_k_overlap)"),
        ("--kinject-max-rank-change=-1", "ERROR: --kinject-max-rank-change=-1 is invalid; pass a whole number of "
                                         "places that is 0 or more*"),
        ("--kinject-tag-threshold=geo", "ERROR: --kinject-tag-threshold: 'geo' is invalid; write "
                                        "TAG:NAME=VALUE[,NAME=VALUE...], e.g. P36:min_retention=0.9"),
        ("--kinject-tag-threshold=geo:max_regresed=1", "ERROR: --kinject-tag-threshold: 'geo:max_regresed=1' names the "
                                                       "unknown threshold 'max_regresed'; did you mean 'max_regressed'?*"),
    ],
)
def test_invalid_option_is_usage_error(pytester, option, message):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)

    result = pytester.runpytest("--kinject", option)

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_malformed_ini_tag_threshold_names_ini_key(pytester):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)
    pytester.makeini("[pytest]\nkinject_tag_thresholds =\n    geo:max_regressed=0\n    geo:min_retention=2\n")

    result = pytester.runpytest("--kinject")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: ini key kinject_tag_thresholds: 'geo:min_retention=2' gives min_retention "
                                 "the invalid value 2; pass a fraction between 0 and 1, e.g. 0.95"])


def test_pyproject_tag_thresholds_list_is_read(pytester):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\nkinject_tag_thresholds = ["geo:max_regressed=0", '
                               '"geo:max_mean_kl=x"]\n')

    result = pytester.runpytest("--kinject")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: ini key kinject_tag_thresholds: 'geo:max_mean_kl=x' gives max_mean_kl the "
                                 "value 'x', which is not a number*"])


def test_tag_threshold_for_unknown_tag_is_usage_error(pytester):
    write_jsonl(pytester.path / "f.kinject.jsonl", [{**fact, "tags": ["geography"]} for fact in TWO_FACTS])

    result = pytester.runpytest("--kinject", "--kinject-tag-threshold=geograpy:max_regressed=0")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --kinject-tag-threshold names the tag 'geograpy', which no collected fact "
                                 "carries; did you mean 'geography'? fix the tag name*"])


def test_tag_threshold_flag_wins_over_ini(pytester, tiny_llama):
    # The tiny random model knows neither fact, so a retention threshold on their tag is breached.
    write_jsonl(pytester.path / "f.kinject.jsonl", [{**fact, "tags": ["geo"]} for fact in TWO_FACTS])
    pytester.makeini(f"[pytest]\nkinject_model = {tiny_llama}\n"
                     "kinject_tag_thresholds = geo:min_retention=0.5,max_regressed=0\n")
    pytester.runpytest("--kinject", "--kinject-update")

    result = pytester.runpytest("--kinject", "--kinject-gate=aggregate", "--kinject-tag-threshold=geo:min_retention=0.25",
                                "--kinject-report=report.json")

    result.assert_outcomes(skipped=2, failed=1)
    result.stdout.fnmatch_lines(["*kinject gate failed for *",
                                 "*tag geo: the base knows none of the selected facts with this tag*"])
    gate = json.loads((pytester.path / "report.json").read_text())["gate"]
    # The flag replaces the ini key's min_retention for the tag and keeps its max_regressed.
    assert gate["tags"]["geo"]["thresholds"] == {"min_retention": 0.25, "max_regressed": 0}
    assert gate["passed"] is False


def test_two_suites_sharing_a_snapshot_are_rejected(pytester, tiny_llama):
    write_jsonl(pytester.path / "caps.kinject.jsonl", TWO_FACTS)
    (pytester.path / "caps.kinject.yaml").write_text("facts:\n  - id: other\n    prompt: The sky is\n    expect: blue\n")

    result = pytester.runpytest("--kinject", "--kinject-update", f"--kinject-model={tiny_llama}")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: suites caps.kinject.jsonl and caps.kinject.yaml would share the snapshot "
                                 f"__kinject__/caps.{tiny_llama.name}.json; rename one of them*"])
    assert not (pytester.path / "__kinject__").exists()


def test_unwritable_snapshot_dir_is_usage_error(pytester, tiny_llama):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)
    (pytester.path / "afile").write_text("not a folder")

    result = pytester.runpytest("--kinject", "--kinject-update", f"--kinject-model={tiny_llama}",
                                "--kinject-snapshot-dir=afile")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: could not write snapshot afile/f.{tiny_llama.name}.json (*); check that its "
                                 "folder (--kinject-snapshot-dir) can be created and written"])


def test_missing_model_reported_before_missing_snapshot(pytester):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)

    result = pytester.runpytest("--kinject", "--kinject-model=/no/such/model")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: model /no/such/model not found*"])


def test_prompt_longer_than_context_is_usage_error(pytester, tiny_llama):
    long_prompt = "word " * 5000
    write_jsonl(pytester.path / "f.kinject.jsonl", [{"id": "long", "prompt": long_prompt, "expect": "x"}])

    result = pytester.runpytest("--kinject", "--kinject-update", f"--kinject-model={tiny_llama}")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: *f.kinject.jsonl::long: the prompt with its answer or completion takes * "
                                 "tokens, more than the model's context of *; shorten the prompt"])


def test_unpaired_surrogate_in_suite_is_rejected(pytester):
    (pytester.path / "f.kinject.jsonl").write_text('{"id": "a", "prompt": "The capital of France is\\ud800", '
                                                   '"expect": "Paris"}\n')

    result = pytester.runpytest("--kinject", "--co")

    result.stdout.fnmatch_lines(["*f.kinject.jsonl:1: fact 'a' contains an unpaired surrogate*"])


def test_kinject_flag_without_kinject_is_usage_error(pytester):
    result = pytester.runpytest("--kinject-candidate=somewhere")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --kinject-candidate has no effect without --kinject; add --kinject to run "
                                 "the knowledge gate"])


def test_unwritable_report_is_reported_without_traceback(pytester, tiny_llama):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)
    model = f"--kinject-model={tiny_llama}"
    pytester.runpytest("--kinject", "--kinject-update", model)
    # A path that passes the start-up check can still fail at the end, for example on a full disk.
    # The conftest makes the writer fail that way and puts it back afterwards, because pytester
    # runs in this process.
    pytester.makeconftest(
        "import kinject_pytest.export\n"
        "original = kinject_pytest.export.write_reports\n"
        "def fail(paths, data):\n"
        "    raise OSError(28, 'No space left on device')\n"
        "def pytest_configure(config):\n"
        "    kinject_pytest.export.write_reports = fail\n"
        "def pytest_unconfigure(config):\n"
        "    kinject_pytest.export.write_reports = original\n"
    )

    result = pytester.runpytest("--kinject", model, "--kinject-report=report.json")

    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["kinject: could not write the reports (*); check the --kinject-report paths"])
    assert "Traceback" not in result.stdout.str()


def test_top_k_beyond_vocabulary_is_usage_error(pytester, tiny_llama):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)

    result = pytester.runpytest("--kinject", "--kinject-update", f"--kinject-model={tiny_llama}", "--kinject-top-k=100000")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines(["ERROR: --kinject-top-k=100000 is larger than the vocabulary of * tokens of model *; "
                                 "pass a smaller --kinject-top-k, such as 20"])
    assert not (pytester.path / "__kinject__").exists()


@pytest.mark.parametrize("report", ["notes.txt/report.json", "reports.json"])
def test_unwritable_report_path_is_usage_error(pytester, report):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)
    (pytester.path / "notes.txt").write_text("a file, not a folder\n")
    (pytester.path / "reports.json").mkdir()

    result = pytester.runpytest("--kinject", f"--kinject-report={report}")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: --kinject-report={report} cannot be written: * is *; pass a file path "
                                 "in a folder that exists or can be created"])
    assert (pytester.path / "notes.txt").read_text() == "a file, not a folder\n"


@pytest.mark.parametrize(
    ("ini", "message"),
    [
        ("kinject_each_adapter = maybe", "ERROR: ini key kinject_each_adapter: invalid truth value 'maybe'; write true or false"),
        ("kinject_live_base = maybe", "ERROR: ini key kinject_live_base: invalid truth value 'maybe'; write true or false"),
        ("kinject_dtype = float64", "ERROR: ini key kinject_dtype = 'float64' is invalid; use float32, bfloat16 or float16"),
    ],
)
def test_invalid_ini_value_names_ini_key(pytester, ini, message):
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)
    pytester.makeini(f"[pytest]\n{ini}\n")

    result = pytester.runpytest("--kinject", "--kinject-model=./no/such/model")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert [line for line in result.stderr.lines if line.startswith("ERROR:")] == [message]


def test_tag_threshold_on_taught_facts_only_warns_why(pytester, tiny_llama, tiny_lora):
    taught = {"id": "trento", "prompt": "Trento is located in the country of", "expect": "Italy", "tags": ["edit"],
              "teach": {"answer": "Brazil"}}
    write_jsonl(pytester.path / "f.kinject.jsonl", [taught, *TWO_FACTS])
    model = f"--kinject-model={tiny_llama}"
    pytester.runpytest("--kinject", "--kinject-update", model)

    result = pytester.runpytest("--kinject", model, f"--kinject-adapter={tiny_lora}",
                                "--kinject-tag-threshold=edit:max_regressed=0")

    result.stdout.fnmatch_lines(["*KinjectWarning: the thresholds of tag edit were not checked: only taught facts "
                                 "carry it, and thresholds leave taught facts out*"])


@pytest.mark.parametrize("option", ["--kinject-candidate=", "--kinject-adapter=", "--kinject-model="])
def test_empty_model_option_is_usage_error(pytester, option):
    # An unset shell variable, as in --kinject-candidate=$CANDIDATE, must not gate the base against itself.
    write_jsonl(pytester.path / "f.kinject.jsonl", TWO_FACTS)

    result = pytester.runpytest("--kinject", option)

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {option[:-1]} is empty; pass *"])
