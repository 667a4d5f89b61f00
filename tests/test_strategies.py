"""Tests of kinject_pytest.strategies: the strategies without a model, the property helpers on SmolLM2."""

from __future__ import annotations

import re

import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

from kinject_pytest.strategies import (
    PROFILE,
    facts,
    filled_prompts,
    first_word,
    load_profile,
    suite_params,
    variants,
)
from kinject_pytest.suite import load_suite

from conftest import write_jsonl

TEMPLATES = ["The capital of {} is", "{}'s capital city is"]
CAPITALS = {"France": "Paris", "Italy": "Rome", "Japan": "Tokyo"}
PROMPT = "Trento is located in the country of,"


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


@pytest.fixture
def suite_file(tmp_path):
    records = [
        {"id": "capital-france", "prompt": "The capital of France is", "expect": "Paris"},
        {"id": "capital-italy", "prompt": "The capital of Italy is", "expect": "Rome"},
        {"id": "trento", "prompt": "Trento is located in the country of", "expect": "Italy"},
    ]
    return write_jsonl(tmp_path / "capitals.kinject.jsonl", records)


# filled_prompts


@given(filled_prompts(TEMPLATES, CAPITALS))
def test_filled_prompt_comes_from_table(pair):
    prompt, answer = pair
    matches = [(template, entity) for template in TEMPLATES for entity in CAPITALS
               if template.replace("{}", entity) == prompt]
    assert len(matches) == 1
    assert answer == CAPITALS[matches[0][1]]


def test_filled_prompts_shrink_to_first_entry():
    assert find(filled_prompts(TEMPLATES, CAPITALS), lambda pair: True) == ("The capital of France is", "Paris")


def test_filled_prompts_reach_every_entity():
    for entity, answer in CAPITALS.items():
        prompt, drawn_answer = find(filled_prompts(TEMPLATES, CAPITALS), lambda pair, e=entity: e in pair[0])
        assert drawn_answer == answer


@pytest.mark.parametrize("templates, entities, message", [
    ([], CAPITALS, "`templates` is empty"),
    (["The capital of France"], CAPITALS, "must contain '{}' exactly once"),
    (["{} and {}"], CAPITALS, "must contain '{}' exactly once"),
    (TEMPLATES, {}, "`entities` is empty"),
])
def test_filled_prompts_reject_invalid_input(templates, entities, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        filled_prompts(templates, entities)


# variants


@given(variants(PROMPT))
def test_variant_keeps_words(variant):
    assert words(variant) == words(PROMPT)


@given(variants(PROMPT))
def test_variant_changes_only_case_space_punctuation(variant):
    core = variant.strip()
    assert core.casefold() in (PROMPT.casefold(), PROMPT.rstrip(",").casefold())
    assert core[1:] in (PROMPT[1:], PROMPT[1:].rstrip(","))


@given(variants(PROMPT, paraphrases=["Trento lies in the country of"]))
def test_variant_keeps_words_of_paraphrase(variant):
    assert words(variant) in (words(PROMPT), words("Trento lies in the country of"))


def test_variants_shrink_to_unchanged_prompt():
    assert find(variants(PROMPT), lambda variant: True) == PROMPT


def test_variants_shrink_to_one_change():
    # The smallest variant that is not the prompt differs from it by one change.
    found = find(variants(PROMPT), lambda variant: variant != PROMPT)
    changed = [found != found.strip(), found.strip()[0] != PROMPT[0], not found.strip().endswith(",")]
    assert sum(changed) == 1


def test_variants_reach_every_change():
    assert find(variants(PROMPT), lambda variant: variant.startswith("t"))
    assert find(variants(PROMPT), lambda variant: variant.endswith("of"))
    assert find(variants(PROMPT), lambda variant: variant.startswith("\n"))
    assert find(variants(PROMPT), lambda variant: variant.endswith(" "))


@given(variants(PROMPT, case=False, whitespace=False, punctuation=False))
def test_variants_with_every_change_off(variant):
    assert variant == PROMPT


# facts and suite_params


def test_facts_draw_facts_of_file(suite_file):
    suite = load_suite(suite_file)

    @given(facts(suite_file))
    def check(fact):
        assert fact in suite.facts

    check()
    assert find(facts(suite_file), lambda fact: True).id == "capital-france"
    assert find(facts(suite_file), lambda fact: fact.expect == ("Italy",)).id == "trento"


def test_suite_params_ids(suite_file):
    params = suite_params(suite_file)

    assert [param.id for param in params] == ["capital-france", "capital-italy", "trento"]
    assert [param.values[0].prompt for param in params] == [
        "The capital of France is", "The capital of Italy is", "Trento is located in the country of"]


def test_suite_params_parametrize_test(pytester, suite_file):
    pytester.makepyfile(f"""
        import pytest
        from kinject_pytest.strategies import suite_params

        @pytest.mark.parametrize("fact", suite_params({str(suite_file)!r}))
        def test_fact(fact):
            assert fact.expect
    """)
    result = pytester.runpytest_inprocess("-v", "-p", "no:cacheprovider")

    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*test_fact?capital-france? PASSED*", "*test_fact?trento? PASSED*"])


# Helpers and profile


@pytest.mark.parametrize("completion, word", [
    (" Paris.\n\n", "paris"),
    (' "Rome", the', "rome"),
    (" Bosnia-Herzegovina is", "bosnia-herzegovina"),
    (" ...", ""),
])
def test_first_word(completion, word):
    assert first_word(completion) == word


def test_profile_settings():
    profile = settings.get_profile(PROFILE)

    assert profile.max_examples == 10
    assert profile.deadline is None


class FakeConfig:
    def __init__(self, profile):
        self.profile = profile

    def getoption(self, name, default=None):
        assert name == "hypothesis_profile"
        return self.profile


@pytest.fixture
def restore_profile():
    # settings keeps the loaded profile's name privately; hypothesis has no public getter for it.
    before = settings._current_profile
    yield
    settings.load_profile(before)


def test_load_profile_without_choice(restore_profile):
    settings.register_profile("kinject-test-other", max_examples=3)
    settings.load_profile("kinject-test-other")

    load_profile(FakeConfig(None))

    assert settings.default.max_examples == 10


def test_load_profile_keeps_chosen_profile(restore_profile):
    settings.register_profile("kinject-test-other", max_examples=3)
    settings.load_profile("kinject-test-other")

    load_profile(FakeConfig("kinject-test-other"))

    assert settings.default.max_examples == 3


# SmolLM2: the edits LoRA (fixtures/build.py) overwrote the capitals of France, Italy, Germany and
# Spain, and keeps Japan's (log p of Tokyo drops by 0.6 nats). Japan comes first, so a failing
# property shrinks to the first broken entity in the table.
PROPERTY_TEST = """
from hypothesis import given, settings
from kinject_pytest.strategies import PROFILE, assert_not_less_likely, filled_prompts

CAPITALS = {"Japan": "Tokyo", "Italy": "Rome", "France": "Paris", "Germany": "Berlin", "Spain": "Madrid"}

@settings(settings.get_profile(PROFILE), derandomize=True, database=None)
@given(filled_prompts(["The capital of {} is"], CAPITALS))
def test_capitals_not_less_likely(kinject, pair):
    prompt, answer = pair
    assert_not_less_likely(kinject, prompt, answer, max_drop=1.0)
"""
BROKEN = ("Italy", "France", "Germany", "Spain")


@pytest.mark.smollm2
def test_property_fails_on_edits_lora(pytester, smollm2_lora):
    pytester.makepyfile(PROPERTY_TEST)
    result = pytester.runpytest_inprocess("--kinject", f"--kinject-adapter={smollm2_lora}", "-p", "no:cacheprovider")

    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    # Hypothesis 6.170 heads the example "Failing test case:", and earlier releases "Falsifying example:".
    falsifying = re.search(r"(?:Falsifying example|Failing test case): .*?pair=\('([^']*)'", output, re.DOTALL)
    assert falsifying is not None, output
    assert any(entity in falsifying.group(1) for entity in BROKEN), falsifying.group(1)
    assert "Japan" not in falsifying.group(1)
    assert "expected answer became less likely" in output


@pytest.mark.smollm2
def test_property_passes_on_base(pytester, smollm2_dir):
    pytester.makepyfile(PROPERTY_TEST)
    result = pytester.runpytest_inprocess("--kinject", "-p", "no:cacheprovider")

    result.assert_outcomes(passed=1)
