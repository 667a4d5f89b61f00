"""The ``kinject`` fixture: skipping without --kinject, the probes' numbers, and the assertion helpers."""

from __future__ import annotations

import pytest

from conftest import write_jsonl
from kinject_pytest.fixture import SKIP_REASON, Kinject
from kinject_pytest.session import Options

# Until plugin.py imports the fixture, the runs made here register its module themselves.
CONFTEST = 'pytest_plugins = ["kinject_pytest.fixture"]\n'

EDITED_PROMPT = "Trento is located in the country of"  # the edit LoRA moved it from Italy to Brazil

HELPER_TESTS = f"""
PROMPT = {EDITED_PROMPT!r}

def test_knows(kinject):
    kinject.assert_knows(PROMPT, "Italy")

def test_retained(kinject):
    kinject.assert_retained(PROMPT, "Italy")

def test_distribution_close(kinject):
    kinject.assert_distribution_close(PROMPT)
"""


@pytest.fixture(scope="module")
def base_itself(smollm2_dir) -> Kinject:
    return Kinject(Options(device="cpu"))


def test_fixture_skips_without_kinject(pytester):
    pytester.makeconftest(CONFTEST + (
        "import sys\n\n"
        "def pytest_unconfigure(config):\n"
        "    print('torch imported:', 'torch' in sys.modules)\n"
    ))
    pytester.makepyfile(HELPER_TESTS + "\ndef test_plain():\n    pass\n")

    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider")

    result.assert_outcomes(passed=1, skipped=3)
    skips = [line for line in result.stdout.lines if line.startswith("SKIPPED [1] ")]
    assert len(skips) == 3
    assert all(line.endswith(f": {SKIP_REASON}") for line in skips)
    result.stdout.fnmatch_lines(["torch imported: False"])


def test_helpers_pass_on_base_itself(pytester, smollm2_dir):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(HELPER_TESTS)

    result = pytester.runpytest("--kinject", "--kinject-device=cpu")

    result.assert_outcomes(passed=3)


def test_helpers_fail_under_edit_adapter(pytester, smollm2_lora):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(HELPER_TESTS)

    result = pytester.runpytest("--kinject", "--kinject-device=cpu", f"--kinject-adapter={smollm2_lora}")

    result.assert_outcomes(failed=3)
    output = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*AssertionError: candidate does not know the answer: greedy completion does not match",
        f"*  prompt:     {EDITED_PROMPT!r}",
        "*  expected:   Italy  (match: prefix)",
        "*  base:       ' Italy, and it'  log p(expected) = -0.15* nats",
        "*  candidate:  ' Brazil*'  log p(expected) = -* nats",
        f"*  candidate: smollm2 + {smollm2_lora}",
    ])
    result.stdout.fnmatch_lines([
        "*AssertionError: knowledge regressed: greedy completion does not match; expected answer became less likely",
        "*  logprob drop: * nats (tolerance 1.000)",
    ])
    result.stdout.fnmatch_lines([
        "*AssertionError: next-token distribution moved: KL(base || candidate) = * nats over the base's top-20 "
        "(tolerance 0.500)",
        "*  base:       *Italy*top tokens ' Italy' -0.15, *",
        "*  candidate:  ' Brazil*top tokens ' Brazil' *",
    ])
    # Each traceback ends at the test's own call, not inside the fixture module.
    for call in ('kinject.assert_knows(PROMPT, "Italy")', 'kinject.assert_retained(PROMPT, "Italy")',
                 "kinject.assert_distribution_close(PROMPT)"):
        result.stdout.fnmatch_lines([f">       {call}", "E       AssertionError: *"])
    assert "fixture.py" not in output


def test_tolerance_options_reach_helpers(pytester, smollm2_lora):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(f"""
        PROMPT = {EDITED_PROMPT!r}

        def test_distribution_close(kinject):
            kinject.assert_distribution_close(PROMPT)

        def test_explicit_tolerance_wins(kinject):
            kinject.assert_distribution_close(PROMPT, max_kl=0.1)
    """)

    result = pytester.runpytest("--kinject", "--kinject-device=cpu", f"--kinject-adapter={smollm2_lora}",
                                "--kinject-max-kl=1000")

    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*(tolerance 0.100)"])


def test_fixture_beside_suite_under_adapter(pytester, smollm2_lora):
    # Judging the suite attaches the adapter to the session's base in place; the fixture's base
    # must still compute the base function.
    pytester.makeconftest(CONFTEST)
    write_jsonl(pytester.path / "f.kinject.jsonl", [{"id": "trento", "prompt": EDITED_PROMPT, "expect": "Italy"}])
    pytester.makepyfile(test_probes=f"""
        PROMPT = {EDITED_PROMPT!r}

        def test_base_and_candidate_differ(kinject):
            assert kinject.base.knows(PROMPT, "Italy")
            assert not kinject.candidate.knows(PROMPT, "Italy")
            assert kinject.candidate.knows(PROMPT, "Brazil")
    """)
    pytester.runpytest("--kinject", "--kinject-device=cpu", "--kinject-update", "f.kinject.jsonl")

    result = pytester.runpytest("--kinject", "--kinject-device=cpu", f"--kinject-adapter={smollm2_lora}")

    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*fact trento * regressed*"])


def test_probe_numbers_on_base(base_itself):
    prompt = "The capital of France is"

    assert base_itself.base.complete(prompt).startswith(" Paris")
    assert base_itself.base.knows(prompt, "Paris")
    assert not base_itself.base.knows(prompt, "London")
    assert base_itself.base.knows(prompt, ["London", "Paris"])
    assert base_itself.base.knows(prompt, r"P\w+s", match="regex")
    assert -1.0 < base_itself.base.logprob(prompt, "Paris") < 0.0
    assert base_itself.base.logprob(prompt, "London") < base_itself.base.logprob(prompt, "Paris") - 2.0


def test_top_k_is_sorted_and_sized(base_itself):
    top = base_itself.base.top_k("The capital of France is", k=5)

    assert len(top) == 5
    assert top[0][0] == " Paris"
    logprobs = [logprob for _, logprob in top]
    assert logprobs == sorted(logprobs, reverse=True)
    assert all(logprob < 0.0 for logprob in logprobs)


def test_score_many_keeps_request_order(base_itself):
    requests = [("The capital of Japan is", "Tokyo"), "The capital of France is", ("The capital of Italy is", "Rome")]

    results = base_itself.base.score_many(requests)

    assert [result.completion.split(".")[0] for result in results] == [" Tokyo", " Paris", " Rome"]
    assert len(results[0].answer_logprobs) == 1
    assert results[1].answer_logprobs == ()
    # A second request for the same prompt and answers comes from the cache.
    assert base_itself.base.score("The capital of Japan is", "Tokyo") is results[0]


def test_base_itself_has_zero_kl(base_itself):
    assert base_itself.kl("The capital of France is") == pytest.approx(0.0, abs=1e-6)
    assert base_itself.candidate.label == "smollm2 (the base itself)"


def test_retained_passes_when_base_does_not_know(base_itself):
    # SmolLM2-135M completes "the capital of the", so there is nothing to retain.
    base_itself.assert_retained("The capital of Egypt is", "Cairo")

    with pytest.raises(AssertionError, match="candidate does not know the answer"):
        base_itself.assert_knows("The capital of Egypt is", "Cairo")


def test_full_candidate_loads_separately(smollm2_dir, smollm2_full):
    kinject = Kinject(Options(device="cpu", candidate=str(smollm2_full)))

    assert kinject.base.knows(EDITED_PROMPT, "Italy")
    assert kinject.candidate.knows(EDITED_PROMPT, "Brazil")
    with pytest.raises(AssertionError, match="knowledge regressed: greedy completion does not match"):
        kinject.assert_retained(EDITED_PROMPT, "Italy")


MISUSE_TESTS = """
import pytest

PROMPT = "The capital of France is"

def test_top_k_zero(kinject):
    with pytest.raises(ValueError, match=r"^top_k=0 is invalid; pass a positive number of tokens, such as 20$"):
        kinject.base.top_k(PROMPT, k=0)

def test_top_k_beyond_vocabulary(kinject):
    with pytest.raises(ValueError, match=r"^top_k=1000000 is larger than the vocabulary of \\d+ tokens of "):
        kinject.base.top_k(PROMPT, k=10**6)

def test_answer_not_text(kinject):
    with pytest.raises(TypeError, match=r"^an answer must be a string, got int 5$"):
        kinject.base.logprob(PROMPT, 5)

def test_no_answers(kinject):
    with pytest.raises(ValueError, match=r"^kinject.assert_knows needs at least one accepted answer, got \\[\\]$"):
        kinject.assert_knows(PROMPT, [])

def test_negative_max_kl(kinject):
    with pytest.raises(ValueError, match=r"^max_kl=-1 is invalid; pass a finite number of nats that is 0 or more"):
        kinject.assert_distribution_close(PROMPT, max_kl=-1)

def test_nan_max_logprob_drop(kinject):
    with pytest.raises(ValueError, match=r"^max_logprob_drop=nan is invalid; pass a finite number of nats"):
        kinject.assert_retained(PROMPT, "Paris", max_logprob_drop=float("nan"))
"""


def test_fixture_misuse_raises_clear_errors(pytester, tiny_llama):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(MISUSE_TESTS)

    result = pytester.runpytest("--kinject", f"--kinject-model={tiny_llama}", "--kinject-device=cpu")

    result.assert_outcomes(passed=6)
