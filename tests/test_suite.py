"""Tests for parsing and validating fact suites (kinject_pytest.suite)."""

from __future__ import annotations

import json
import keyword
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kinject_pytest.suite import (
    FACT_ID_PATTERN,
    MATCH_RULES,
    Fact,
    SuiteError,
    Teach,
    Tolerance,
    derive_fact_id,
    is_suite_file,
    load_suite,
    strictest,
    suite_name,
)
from kinject_pytest.verdict import DEFAULT_TOLERANCE

REPO_ROOT = Path(__file__).resolve().parent.parent
SUITES = REPO_ROOT / "suites"
KNOWN_FACTS_DATA = REPO_ROOT.parent / "shared" / "data" / "known_facts.jsonl"

MINIMAL = {"id": "capital-france", "prompt": "The capital of France is", "expect": "Paris"}


def write_jsonl(path: Path, *records: object) -> Path:
    """Write each record as one JSON line. A str record is written unchanged, so tests can write invalid JSON."""
    lines = [record if isinstance(record, str) else json.dumps(record, ensure_ascii=False) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_error(path: Path) -> SuiteError:
    with pytest.raises(SuiteError) as caught:
        load_suite(path)
    return caught.value


# Parsing


def test_minimal_record_parses(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.kinject.jsonl", MINIMAL)

    suite = load_suite(path)

    assert suite.path == path
    assert suite.facts == (
        Fact(
            id="capital-france",
            prompt="The capital of France is",
            expect=("Paris",),
            path=path,
            line=1,
        ),
    )
    assert suite.tolerance == Tolerance()
    assert suite.facts[0].location == f"{path}:1"


def test_expect_accepts_string_or_list(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "x.kinject.jsonl",
        {"id": "one", "prompt": "A", "expect": "Paris"},
        {"id": "two", "prompt": "B", "expect": ["Wien", "Vienna"]},
    )

    one, two = load_suite(path).facts

    assert one.expect == ("Paris",)
    assert two.expect == ("Wien", "Vienna")


def test_blank_lines_are_skipped_and_lines_counted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.kinject.jsonl", "", json.dumps(MINIMAL), "   ", json.dumps({**MINIMAL, "id": "b"}))

    facts = load_suite(path).facts

    assert [fact.line for fact in facts] == [2, 4]


def test_missing_id_is_derived_from_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.kinject.jsonl", {"prompt": "The capital of France is", "expect": "Paris"})

    fact = load_suite(path).facts[0]

    assert fact.id == derive_fact_id("The capital of France is")
    assert fact.id.startswith("the-capital-of-france-is-")
    assert load_suite(path).facts[0].id == fact.id


def test_derived_id_is_stable_and_valid() -> None:
    first = derive_fact_id("Die Hauptstadt von Österreich ist")
    again = derive_fact_id("Die Hauptstadt von Österreich ist")

    assert first == again
    assert first == "die-hauptstadt-von-osterreich-ist-" + first[-8:]
    assert derive_fact_id("東京は日本の首都です").startswith("fact-")
    assert derive_fact_id("A b") != derive_fact_id("A b ")


@given(st.text(min_size=1))
def test_derived_id_is_always_a_valid_node_id(prompt: str) -> None:
    fact_id = derive_fact_id(prompt)

    assert FACT_ID_PATTERN.match(fact_id)
    assert len(fact_id) <= 50


def test_header_defaults_apply_and_fact_wins(tmp_path: Path) -> None:
    header = {
        "suite": {
            "description": "Capitals",
            "source": "hand-written",
            "license": "CC0",
            "defaults": {"match": "exact", "tags": ["geo"], "tolerance": {"kl": 0.5, "logprob_drop": 2}},
        }
    }
    path = write_jsonl(
        tmp_path / "x.kinject.jsonl",
        header,
        MINIMAL,
        {"id": "own", "prompt": "B", "expect": "b", "match": "contains", "tags": ["P36", "geo"], "tolerance": {"kl": 0.1}},
    )

    suite = load_suite(path)
    plain, own = suite.facts

    assert (suite.description, suite.source, suite.license) == ("Capitals", "hand-written", "CC0")
    assert suite.tolerance == Tolerance(kl=0.5, logprob_drop=2.0)
    assert plain.match == "exact"
    assert plain.tags == ("geo",)
    assert plain.tolerance == Tolerance(kl=0.5, logprob_drop=2.0)
    assert plain.line == 2
    assert own.match == "contains"
    assert own.tags == ("geo", "P36")
    assert own.tolerance == Tolerance(kl=0.1, logprob_drop=2.0)


def test_tolerance_over_keeps_set_fields() -> None:
    fallback = Tolerance(kl=1.0, logprob_drop=2.0)

    assert Tolerance(kl=0.0).over(fallback) == Tolerance(kl=0.0, logprob_drop=2.0)
    assert Tolerance().over(fallback) == fallback
    assert Tolerance(logprob_drop=0.5).over(Tolerance()) == Tolerance(logprob_drop=0.5)


def test_tolerance_over_keeps_every_field() -> None:
    fallback = Tolerance(kl=1.0, logprob_drop=2.0, top_k_overlap=0.5, rank_change=1)

    assert Tolerance(top_k_overlap=0.9).over(fallback) == Tolerance(kl=1.0, logprob_drop=2.0, top_k_overlap=0.9,
                                                                     rank_change=1)
    assert Tolerance(rank_change=0).over(fallback).rank_change == 0


def test_strictest_takes_smallest_maximum_and_largest_minimum() -> None:
    loose = Tolerance(kl=1.0, logprob_drop=0.5, top_k_overlap=0.2, rank_change=2)
    strict = Tolerance(kl=0.1, logprob_drop=3.0, top_k_overlap=0.8)

    assert strictest([loose, strict]) == Tolerance(kl=0.1, logprob_drop=0.5, top_k_overlap=0.8, rank_change=2)
    assert strictest([]) == Tolerance()


TAGGED_HEADER = {
    "suite": {
        "defaults": {"tolerance": {"kl": 0.5, "logprob_drop": 2.0, "top_k_overlap": 0.25}},
        "tag_tolerances": {
            "geo": {"kl": 0.2, "top_k_overlap": 0.5},
            "P36": {"kl": 0.3, "logprob_drop": 1.0, "top_k_overlap": 0.75, "rank_change": 0},
        },
    }
}


def test_tag_tolerance_between_fact_and_suite(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "x.kinject.jsonl",
        TAGGED_HEADER,
        {**MINIMAL, "tags": ["geo"]},
        {"id": "both", "prompt": "B", "expect": "b", "tags": ["geo", "P36"]},
        {"id": "own", "prompt": "C", "expect": "c", "tags": ["P36"], "tolerance": {"kl": 0.9, "rank_change": 2}},
        {"id": "untagged", "prompt": "D", "expect": "d"},
    )

    suite = load_suite(path)
    geo, both, own, untagged = suite.facts

    assert suite.tag_tolerances["geo"] == Tolerance(kl=0.2, top_k_overlap=0.5)
    assert geo.tolerance == Tolerance(kl=0.2, logprob_drop=2.0, top_k_overlap=0.5)
    # Two tags that set the same field: the strictest limit wins.
    assert both.tolerance == Tolerance(kl=0.2, logprob_drop=1.0, top_k_overlap=0.75, rank_change=0)
    assert own.tolerance == Tolerance(kl=0.9, logprob_drop=1.0, top_k_overlap=0.75, rank_change=2)
    assert untagged.tolerance == Tolerance(kl=0.5, logprob_drop=2.0, top_k_overlap=0.25)


def test_tag_tolerance_applies_to_default_tags(tmp_path: Path) -> None:
    header = {"suite": {"defaults": {"tags": ["geo"]}, "tag_tolerances": {"geo": {"rank_change": 1}}}}
    path = write_jsonl(tmp_path / "x.kinject.jsonl", header, MINIMAL)

    assert load_suite(path).facts[0].tolerance == Tolerance(rank_change=1)


def test_yaml_tag_tolerances(tmp_path: Path) -> None:
    path = tmp_path / "x.kinject.yaml"
    path.write_text(
        "tag_tolerances:\n"
        "  geo: {kl: 0.2, top_k_overlap: 0.6}\n"
        "facts:\n"
        "  - {prompt: The capital of France is, expect: Paris, tags: [geo]}\n",
        encoding="utf-8",
    )

    assert load_suite(path).facts[0].tolerance == Tolerance(kl=0.2, top_k_overlap=0.6)


levels = st.none() | st.floats(min_value=0.0, max_value=1.0)


@settings(max_examples=60)
@given(fact=levels, first_tag=levels, second_tag=levels, suite=levels, option=levels)
def test_tolerance_precedence_over_four_levels(fact, first_tag, second_tag, suite, option) -> None:
    import tempfile

    def limit(value: float | None) -> dict[str, float]:
        return {} if value is None else {"top_k_overlap": value}

    header = {"suite": {"defaults": {"tolerance": limit(suite)},
                        "tag_tolerances": {"first": limit(first_tag), "second": limit(second_tag)}}}
    record = {**MINIMAL, "tags": ["first", "second"], "tolerance": limit(fact)}
    with tempfile.TemporaryDirectory() as folder:
        loaded = load_suite(write_jsonl(Path(folder) / "x.kinject.jsonl", header, record)).facts[0]

    # The same resolution as the session's: the fact's tolerance over the options over the defaults.
    effective = loaded.tolerance.over(Tolerance(top_k_overlap=option)).over(DEFAULT_TOLERANCE)

    tag_values = [value for value in (first_tag, second_tag) if value is not None]
    tag = max(tag_values) if tag_values else None
    expected = next(value for value in (fact, tag, suite, option, DEFAULT_TOLERANCE.top_k_overlap) if value is not None)
    assert effective.top_k_overlap == expected
    assert effective.kl == DEFAULT_TOLERANCE.kl


def test_yaml_suite_records_lines(tmp_path: Path) -> None:
    path = tmp_path / "x.kinject.yaml"
    path.write_text(
        "description: Capitals\n"
        "defaults:\n"
        "  tags: [geo]\n"
        "  tolerance: {logprob_drop: 1.5}\n"
        "facts:\n"
        "  - id: capital-france\n"
        "    prompt: The capital of France is\n"
        "    expect: Paris\n"
        "\n"
        "  - prompt: The capital of Italy is\n"
        "    expect: [Rome, Roma]\n"
        "    choices: [Milan]\n"
        "    match: contains\n"
        "    tolerance: {kl: 0.2}\n",
        encoding="utf-8",
    )

    suite = load_suite(path)
    france, italy = suite.facts

    assert suite.description == "Capitals"
    assert france.line == 6
    assert france.tags == ("geo",)
    assert italy.line == 10
    assert italy.id == derive_fact_id("The capital of Italy is")
    assert italy.expect == ("Rome", "Roma")
    assert italy.choices == ("Milan",)
    assert italy.match == "contains"
    assert italy.tolerance == Tolerance(kl=0.2, logprob_drop=1.5)


def test_taught_fact_parses_in_jsonl(tmp_path: Path) -> None:
    record = {"id": "trento", "prompt": "Trento is located in the country of", "expect": "Italy",
              "teach": {"answer": "Brazil", "paraphrases": ["Trento is a city in", "Trento lies in"]}}
    path = write_jsonl(tmp_path / "x.kinject.jsonl", MINIMAL, record)

    plain, taught = load_suite(path).facts

    assert plain.teach is None
    assert taught.teach == Teach(answer="Brazil", paraphrases=("Trento is a city in", "Trento lies in"))
    assert taught.expect == ("Italy",)


def test_taught_fact_parses_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "x.kinject.yaml"
    path.write_text(
        "facts:\n"
        "  - id: trento\n"
        "    prompt: Trento is located in the country of\n"
        "    expect: Italy\n"
        "    teach:\n"
        "      answer: Brazil\n"
        "  - id: bad\n"
        "    prompt: x\n"
        "    expect: y\n",
        encoding="utf-8",
    )

    (trento, _) = load_suite(path).facts

    assert trento.teach == Teach(answer="Brazil", paraphrases=())
    assert trento.line == 2


def test_yaml_teach_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "x.kinject.yaml"
    path.write_text(
        "facts:\n"
        "  - {prompt: a, expect: b}\n"
        "  - id: trento\n"
        "    prompt: Trento is located in the country of\n"
        "    expect: Italy\n"
        "    teach: {answer: italy}\n",
        encoding="utf-8",
    )

    message = str(load_error(path))

    assert message.startswith(f"{path}:3: fact 'trento' teaches 'italy', which is already an accepted answer")
    assert "\n" not in message


def test_counterfactual_suite_matches_fixture_edits() -> None:
    edits = [json.loads(line) for line in (REPO_ROOT / "fixtures" / "counterfactual_edits.jsonl").read_text().splitlines()]

    facts = load_suite(SUITES / "counterfactual_edits.kinject.jsonl").facts

    assert [fact.id for fact in facts] == [edit["id"] for edit in edits]
    for fact, edit in zip(facts, edits):
        assert fact.prompt == edit["prompt"]
        assert fact.expect == (edit["old"],)
        assert fact.teach.answer == edit["new"]
        assert len(fact.teach.paraphrases) == 2
        assert fact.tags == ("counterfactual", edit["relation_id"])


def test_yml_suffix_is_read_as_yaml(tmp_path: Path) -> None:
    path = tmp_path / "x.kinject.yml"
    path.write_text("facts:\n  - {prompt: A, expect: b}\n", encoding="utf-8")

    assert load_suite(path).facts[0].expect == ("b",)


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "x.kinject.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(MINIMAL).encode("utf-8") + b"\n")

    assert load_suite(path).facts[0].id == "capital-france"


def test_suite_module_imports_no_torch() -> None:
    code = "import sys, kinject_pytest.suite; print(sorted({'torch', 'transformers'} & set(sys.modules)))"

    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO_ROOT)

    assert result.stdout.strip() == "[]"


def test_suite_file_names() -> None:
    assert is_suite_file(Path("suites/known_facts.kinject.jsonl"))
    assert is_suite_file(Path("a.kinject.yaml"))
    assert is_suite_file(Path("a.kinject.yml"))
    assert not is_suite_file(Path("a.jsonl"))
    assert not is_suite_file(Path("kinject.yaml"))
    assert suite_name(Path("suites/known_facts.kinject.jsonl")) == "known_facts"
    assert suite_name(Path("examples.kinject.yml")) == "examples"


# Errors: each message names the file and line and states how to fix the problem.


ERROR_CASES = {
    "invalid JSON": ('{"id": "a" "prompt": "x"}', "invalid JSON (Expecting ',' delimiter: column 12)", "write one JSON object per line"),
    "not an object": ('["The capital of France is", "Paris"]', "expected a JSON object, got list", "such as {"),
    "missing prompt": ({"id": "capital-france", "expect": "Paris"}, "fact 'capital-france' has no 'prompt'", 'add "prompt":'),
    "empty prompt": ({"id": "a", "prompt": "  ", "expect": "b"}, "fact 'a' has an empty 'prompt'", "write the text"),
    "missing expect": ({"id": "a", "prompt": "x"}, "fact 'a' has no 'expect'", 'add "expect":'),
    "empty expect list": ({"id": "a", "prompt": "x", "expect": []}, "empty 'expect' list", "at least one accepted answer"),
    "number expect": ({"id": "a", "prompt": "x", "expect": 1945}, "'expect' of int 1945", '"1945"'),
    "unknown key": ({"id": "a", "prompt": "x", "expected": "y"}, "fact 'a' has an unknown key 'expected'", "did you mean 'expect'?"),
    "duplicate key": ('{"id": "a", "prompt": "x", "expect": "y", "expect": "z"}', "key 'expect' appears twice", "keep only one"),
    "bad match rule": ({"id": "a", "prompt": "x", "expect": "y", "match": "prefx"}, "invalid 'match' rule 'prefx'", "use one of prefix, exact, contains, regex"),
    "bad regex": ({"id": "year", "prompt": "x", "expect": ["19(45"], "match": "regex"}, "fact 'year' has an invalid regex '19(45'", "fix the pattern"),
    "bad tag": ({"id": "a", "prompt": "x", "expect": "y", "tags": ["world war"]}, "invalid tag 'world war'", "use a Python identifier"),
    "keyword tag": ({"id": "a", "prompt": "x", "expect": "y", "tags": ["not"]}, "invalid tag 'not'", "not a keyword"),
    "bad id": ({"id": "capital/france", "prompt": "x", "expect": "y"}, "invalid fact 'id' 'capital/france'", "leave 'id' out"),
    "negative tolerance": ({"id": "a", "prompt": "x", "expect": "y", "tolerance": {"kl": -0.1}}, "invalid tolerance 'kl' -0.1", "0 or more"),
    "string tolerance": ({"id": "a", "prompt": "x", "expect": "y", "tolerance": {"logprob_drop": "1"}}, "invalid tolerance 'logprob_drop' '1'", "such as 0.5"),
    "tolerance typo": ({"id": "a", "prompt": "x", "expect": "y", "tolerance": {"kld": 1}}, "unknown key 'kld'", "did you mean 'kl'?"),
    "overlap above one": ({"id": "a", "prompt": "x", "expect": "y", "tolerance": {"top_k_overlap": 1.5}}, "invalid tolerance 'top_k_overlap' 1.5", "a fraction between 0 and 1"),
    "fractional rank change": ({"id": "a", "prompt": "x", "expect": "y", "tolerance": {"rank_change": 0.5}}, "invalid tolerance 'rank_change' 0.5", "a whole number of places"),
    "boolean rank change": ({"id": "a", "prompt": "x", "expect": "y", "tolerance": {"rank_change": True}}, "invalid tolerance 'rank_change' True", "such as 1"),
    "choice equals answer": ({"id": "a", "prompt": "x", "expect": ["Paris"], "choices": ["paris"]}, "choice 'paris', which matches the accepted answer 'Paris'", "replace it with a wrong answer"),
    "regex choice matches": ({"id": "a", "prompt": "x", "expect": ["19\\d\\d"], "match": "regex", "choices": ["1945"]}, "matches the accepted answer", "remove it"),
    "duplicate choice": ({"id": "a", "prompt": "x", "expect": "y", "choices": ["Rome", "rome"]}, "lists the choice 'rome' twice", "keep one copy"),
    "teach not an object": ({"id": "a", "prompt": "x", "expect": "y", "teach": "z"}, "fact 'a' 'teach' must be an object, got str 'z'", '"teach": {"answer": "Brazil"'),
    "teach without answer": ({"id": "a", "prompt": "x", "expect": "y", "teach": {"paraphrases": ["w"]}}, "fact 'a' has 'teach' without a text 'answer' (got NoneType None)", "write the new answer"),
    "teach empty answer": ({"id": "a", "prompt": "x", "expect": "y", "teach": {"answer": " "}}, "without a text 'answer'", "write the new answer"),
    "teach old answer": ({"id": "a", "prompt": "x", "expect": ["Italy", "Italia"], "teach": {"answer": "italia"}}, "fact 'a' teaches 'italia', which is already an accepted answer", "write a different new answer"),
    "teach typo": ({"id": "a", "prompt": "x", "expect": "y", "teach": {"answer": "z", "paraphrase": ["w"]}}, "fact 'a' 'teach' has an unknown key 'paraphrase'", "did you mean 'paraphrases'?"),
    "teach paraphrases string": ({"id": "a", "prompt": "x", "expect": "y", "teach": {"answer": "z", "paraphrases": "w"}}, "has 'paraphrases' of str 'w'", 'write a list of strings, such as ["Trento is a city in"]'),
    "teach empty paraphrase": ({"id": "a", "prompt": "x", "expect": "y", "teach": {"answer": "z", "paraphrases": [""]}}, "has an empty string in 'paraphrases'", "remove it or write the paraphrase"),
    "teach duplicate paraphrase": ({"id": "a", "prompt": "x", "expect": "y", "teach": {"answer": "z", "paraphrases": ["w", "w"]}}, "lists a paraphrase twice", "keep one copy"),
    "teach regex": ({"id": "a", "prompt": "x", "expect": "19\\d\\d", "match": "regex", "teach": {"answer": "z"}}, "has 'teach' with the 'regex' match rule", "use another 'match' rule"),
    "teach surrogate": ('{"id": "a", "prompt": "x", "expect": "y", "teach": {"answer": "\\ud800"}}', "contains an unpaired surrogate", "valid surrogate pair"),
}


@pytest.mark.parametrize("record, problem, fix", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_invalid_record_error(tmp_path: Path, record: object, problem: str, fix: str) -> None:
    path = write_jsonl(tmp_path / "x.kinject.jsonl", MINIMAL, record)

    error = load_error(path)
    message = str(error)

    assert message.startswith(f"{path}:2: ")
    assert problem in message
    assert fix in message
    assert "\n" not in message
    assert error.path == path
    assert error.line == 2


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.kinject.jsonl", MINIMAL, {**MINIMAL, "id": "other"}, MINIMAL)

    message = str(load_error(path))

    assert message.startswith(f"{path}:3: ")
    assert "'capital-france' is already used on line 1" in message
    assert "give each fact a unique 'id'" in message


def test_duplicate_derived_id_is_rejected(tmp_path: Path) -> None:
    record = {"prompt": "The capital of France is", "expect": "Paris"}
    path = write_jsonl(tmp_path / "x.kinject.jsonl", record, record)

    message = str(load_error(path))

    assert message.startswith(f"{path}:2: ")
    assert "already used on line 1" in message


def test_header_after_facts_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.kinject.jsonl", MINIMAL, {"suite": {"description": "late"}})

    message = str(load_error(path))

    assert message.startswith(f"{path}:2: ")
    assert "move it to the first line" in message


TAG_TOLERANCE_ERRORS = {
    "not a mapping": ({"tag_tolerances": ["geo"]}, "suite 'tag_tolerances' must be an object, got list", '"tag_tolerances": {"geography": {"kl": 0.2}}'),
    "unknown field": ({"tag_tolerances": {"geo": {"kld": 0.2}}}, "tag 'geo' 'tolerance' has an unknown key 'kld'", "did you mean 'kl'?"),
    "bad value": ({"tag_tolerances": {"geo": {"top_k_overlap": -1}}}, "tag 'geo' has an invalid tolerance 'top_k_overlap' -1", "use a fraction"),
    "no tolerance": ({"tag_tolerances": {"geo": None}}, "no tolerance for tag 'geo'", "or remove the tag"),
    "invalid tag": ({"tag_tolerances": {"world war": {"kl": 1}}}, "invalid tag 'world war'", "Python identifier"),
    "tag no fact carries": ({"tag_tolerances": {"goe": {"kl": 1}}}, "names the tag 'goe', which no fact carries", "did you mean 'geo'?"),
}


@pytest.mark.parametrize("header, problem, fix", TAG_TOLERANCE_ERRORS.values(), ids=TAG_TOLERANCE_ERRORS.keys())
def test_invalid_tag_tolerance_error(tmp_path: Path, header: dict, problem: str, fix: str) -> None:
    path = write_jsonl(tmp_path / "x.kinject.jsonl", {"suite": header}, {**MINIMAL, "tags": ["geo"]})

    message = str(load_error(path))

    assert message.startswith(f"{path}:1: ")
    assert problem in message
    assert fix in message
    assert "\n" not in message


def test_yaml_tag_tolerance_error_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "x.kinject.yaml"
    path.write_text("description: d\ntag_tolerances:\n  gold: {kl: 0.1}\nfacts:\n  - {prompt: a, expect: b}\n",
                    encoding="utf-8")

    message = str(load_error(path))

    assert message.startswith(f"{path}:2: ")
    assert "names the tag 'gold', which no fact carries" in message


def test_bad_header_default_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.kinject.jsonl", {"suite": {"defaults": {"match": "fuzzy"}}}, MINIMAL)

    message = str(load_error(path))

    assert message.startswith(f"{path}:1: ")
    assert "suite 'defaults' has an invalid 'match' rule 'fuzzy'" in message
    assert "use one of" in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank lines"])
def test_empty_file_is_rejected(tmp_path: Path, content: str) -> None:
    path = tmp_path / "x.kinject.jsonl"
    path.write_text(content, encoding="utf-8")

    error = load_error(path)

    assert str(error).startswith(f"{path}: suite has no facts")
    assert "add one JSON object per line" in str(error)
    assert error.line is None


def test_header_without_facts_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.kinject.jsonl", {"suite": {"description": "nothing yet"}})

    message = str(load_error(path))

    assert message.startswith(f"{path}:1: suite has no facts")


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "absent.kinject.jsonl"

    error = load_error(path)

    assert str(error) == f"{path}: file not found; check the path or create the suite file"
    assert error.line is None


def test_wrong_suffix_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", MINIMAL)

    message = str(load_error(path))

    assert message.startswith(f"{path}: not a suite file")
    assert ".kinject.jsonl" in message


def test_non_utf8_file_names_line(tmp_path: Path) -> None:
    path = tmp_path / "x.kinject.jsonl"
    path.write_bytes(json.dumps(MINIMAL).encode() + b'\n{"prompt": "caf\xe9", "expect": "x"}\n')

    message = str(load_error(path))

    assert message.startswith(f"{path}:2: invalid UTF-8 (byte 0xe9)")
    assert "save the file as UTF-8" in message


YAML_ERROR_CASES = {
    "syntax": ("facts:\n  - prompt: [unclosed\n    expect: x\n", 3, "invalid YAML", "fix the syntax"),
    "top level list": ("- prompt: x\n  expect: y\n", 1, "expected a mapping at the top level", "write 'facts:'"),
    "unknown top key": ("description: d\nfact:\n  - {prompt: x, expect: y}\n", 2, "unknown key 'fact'", "did you mean 'facts'?"),
    "no facts": ("description: d\n", 1, "suite has no facts", "add a 'facts:' list"),
    "empty facts": ("facts: []\n", 1, "suite has no facts", "add at least one record"),
    "record not mapping": ("facts:\n  - The capital of France is\n", 2, "expected a record (a mapping)", "write '- prompt: ...'"),
    "missing prompt": ("facts:\n  - prompt: a\n    expect: b\n  - id: c\n    expect: d\n", 4, "fact 'c' has no 'prompt'", 'add "prompt":'),
    "unquoted number": ("facts:\n  - id: y\n    prompt: a\n    expect: [1945]\n", 2, "int 1945 in 'expect'", 'quoted string, such as "1945"'),
    "duplicate key": ("facts:\n  - prompt: a\n    expect: b\n    expect: c\n", 4, "key 'expect' appears twice", "keep only one"),
    "bad default tolerance": ("defaults:\n  tolerance: {kl: -1}\nfacts:\n  - {prompt: a, expect: b}\n", 1, "suite 'defaults' has an invalid tolerance 'kl' -1", "0 or more"),
    "empty file": ("", None, "suite has no facts", "add a 'facts:' list"),
}


@pytest.mark.parametrize("text, line, problem, fix", YAML_ERROR_CASES.values(), ids=YAML_ERROR_CASES.keys())
def test_invalid_yaml_error(tmp_path: Path, text: str, line: int | None, problem: str, fix: str) -> None:
    path = tmp_path / "x.kinject.yaml"
    path.write_text(text, encoding="utf-8")

    error = load_error(path)
    message = str(error)

    where = f"{path}:{line}" if line is not None else str(path)
    assert message.startswith(f"{where}: ")
    assert problem in message
    assert fix in message
    assert "\n" not in message
    assert error.line == line


def test_yaml_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "x.kinject.yaml"
    path.write_text("facts:\n  - {id: a, prompt: x, expect: y}\n  - {id: a, prompt: z, expect: y}\n", encoding="utf-8")

    message = str(load_error(path))

    assert message.startswith(f"{path}:3: ")
    assert "'a' is already used on line 2" in message


# Round trip


fact_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(str.strip)
tags = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True).filter(lambda tag: not keyword.iskeyword(tag))
records = st.fixed_dictionaries(
    {
        "id": fact_ids,
        "prompt": texts,
        "expect": st.lists(texts, min_size=1, max_size=3),
        "tags": st.lists(tags, max_size=3, unique=True),
        "match": st.sampled_from([rule for rule in MATCH_RULES if rule != "regex"]),
    }
)


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(records, min_size=1, max_size=8, unique_by=lambda record: record["id"]))
def test_jsonl_round_trip(tmp_path: Path, drawn: list[dict[str, object]]) -> None:
    path = write_jsonl(tmp_path / "round.kinject.jsonl", *drawn)

    facts = load_suite(path).facts

    assert [fact.id for fact in facts] == [record["id"] for record in drawn]
    assert [fact.prompt for fact in facts] == [record["prompt"] for record in drawn]
    assert [list(fact.expect) for fact in facts] == [record["expect"] for record in drawn]
    assert [list(fact.tags) for fact in facts] == [record["tags"] for record in drawn]
    assert [fact.match for fact in facts] == [record["match"] for record in drawn]
    assert [fact.line for fact in facts] == list(range(1, len(drawn) + 1))


# Shipped suites


def test_known_facts_suite_loads() -> None:
    suite = load_suite(SUITES / "known_facts.kinject.jsonl")

    assert len(suite.facts) == 1008
    assert "Locating and Editing Factual Associations in GPT" in suite.source
    assert suite.license.startswith("MIT")
    assert suite.facts[0].id == "known-0"
    assert all(len(fact.tags) == 1 for fact in suite.facts)


def test_known_facts_have_three_choices_where_possible() -> None:
    facts = load_suite(SUITES / "known_facts.kinject.jsonl").facts
    answers_by_tag: dict[str, set[str]] = defaultdict(set)
    for fact in facts:
        answers_by_tag[fact.tags[0]].add(fact.expect[0].casefold())

    for fact in facts:
        others = answers_by_tag[fact.tags[0]] - {fact.expect[0].casefold()}
        assert len(fact.choices) == min(3, len(others)), fact.id
        assert {choice.casefold() for choice in fact.choices} <= others, fact.id


@pytest.mark.skipif(not KNOWN_FACTS_DATA.exists(), reason=f"source data not found at {KNOWN_FACTS_DATA}")
def test_make_known_facts_reproduces_committed_suite(tmp_path: Path) -> None:
    output = tmp_path / "known_facts.kinject.jsonl"

    subprocess.run(
        [sys.executable, str(SUITES / "make_known_facts.py"), str(KNOWN_FACTS_DATA), "--output", str(output)],
        check=True,
        capture_output=True,
    )

    assert output.read_bytes() == (SUITES / "known_facts.kinject.jsonl").read_bytes()


def test_examples_suite_uses_every_option() -> None:
    suite = load_suite(SUITES / "examples.kinject.yaml")

    assert {fact.match for fact in suite.facts} == set(MATCH_RULES)
    assert any(len(fact.expect) > 1 for fact in suite.facts)
    assert any(fact.choices for fact in suite.facts)
    assert any(fact.tolerance != suite.tolerance for fact in suite.facts)
    assert suite.tolerance != Tolerance()
    assert all("examples" in fact.tags for fact in suite.facts)
    assert set(suite.tag_tolerances) == {"astronomy", "chemistry"}
