"""The scoring engine: batched results equal unbatched ones, and each number is the quantity its name gives."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kinject_pytest.engine import Query, Scorer, ScoringSettings, split_prompt
from kinject_pytest.models import load_model

SHIPPED_SUITE = Path(__file__).resolve().parents[1] / "suites" / "known_facts.kinject.jsonl"

# Checked in fp32: a fact alone and in a padded batch agree to this many nats.
BATCH_TOLERANCE = 1e-4


def shipped_queries(count: int) -> list[Query]:
    lines = SHIPPED_SUITE.read_text().splitlines()[1 : count + 1]
    records = [json.loads(line) for line in lines]
    return [Query(record["id"], record["prompt"], (record["expect"],), tuple(record.get("choices", ())))
            for record in records]


def assert_same_results(alone, batched):
    assert alone.completion == batched.completion
    assert alone.completion_token_ids == batched.completion_token_ids
    assert alone.top_token_ids[:5] == batched.top_token_ids[:5]
    for first, second in zip(alone.answer_logprobs + alone.choice_logprobs,
                             batched.answer_logprobs + batched.choice_logprobs):
        assert first == pytest.approx(second, abs=BATCH_TOLERANCE)
    for first, second in zip(alone.top_logprobs, batched.top_logprobs):
        assert first == pytest.approx(second, abs=BATCH_TOLERANCE)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model("smollm2", device="cpu")


@pytest.mark.smollm2
def test_fact_alone_equals_fact_in_padded_batch(smollm2):
    # The short prompt sits in a batch with the longest prompts of the suite, so it is padded on
    # both the teacher-forced (right) and the generation (left) side.
    queries = shipped_queries(48)
    short = Query("short", "Paris is the capital of", ("France",), ("Spain", "Italy"))
    batch = sorted(queries, key=lambda query: -len(query.prompt))[:15] + [short]

    batched = Scorer(smollm2.model, smollm2.tokenizer, ScoringSettings(batch_size=16)).score(batch)
    alone = Scorer(smollm2.model, smollm2.tokenizer, ScoringSettings(batch_size=1)).score([short, batch[0]])

    assert_same_results(alone["short"], batched["short"])
    assert_same_results(alone[batch[0].key], batched[batch[0].key])


@pytest.mark.smollm2
def test_smollm2_knows_capital_of_france(smollm2):
    result = Scorer(smollm2.model, smollm2.tokenizer).score([Query("f", "The capital of France is", ("Paris",))])["f"]

    assert result.completion.startswith(" Paris")
    assert result.top_tokens[0] == " Paris"
    assert result.answer_logprobs[0] == pytest.approx(result.top_logprobs[0], abs=1e-6)
    assert math.exp(result.answer_logprobs[0]) > 0.5


@pytest.mark.smollm2
def test_probe_returns_logprobs_of_given_tokens(smollm2):
    scorer = Scorer(smollm2.model, smollm2.tokenizer)
    first = scorer.score([Query("f", "The capital of France is", ("Paris",))])["f"]

    probed = scorer.score([Query("f", "The capital of France is", ("Paris",), probe_token_ids=first.top_token_ids)])["f"]

    assert probed.probe_logprobs == pytest.approx(first.top_logprobs, abs=1e-6)


@pytest.mark.smollm2
def test_multi_token_answer_sums_token_logprobs(smollm2):
    scorer = Scorer(smollm2.model, smollm2.tokenizer)
    whole = scorer.score([Query("f", "The Eiffel Tower is in", ("Paris, France",))])["f"]
    first_word = scorer.score([Query("f", "The Eiffel Tower is in", ("Paris",))])["f"]
    rest = scorer.score([Query("f", "The Eiffel Tower is in Paris", (", France",))])["f"]

    assert whole.answer_token_counts[0] == 3
    # ", France" after the prompt gets no separating space, so score its tokens directly.
    assert whole.answer_logprobs[0] < first_word.answer_logprobs[0]
    assert rest.answer_token_counts[0] >= 2


def test_tiny_model_alone_equals_batch(tiny_llama):
    loaded = load_model(str(tiny_llama), device="cpu")
    queries = [Query(str(index), "word " * (index + 1), ("alpha",), ("beta gamma",)) for index in range(7)]

    batched = Scorer(loaded.model, loaded.tokenizer, ScoringSettings(batch_size=7)).score(queries)
    alone = Scorer(loaded.model, loaded.tokenizer, ScoringSettings(batch_size=1)).score(queries[:1])

    assert_same_results(alone["0"], batched["0"])


def test_regex_query_has_distribution_but_no_answers(tiny_llama):
    loaded = load_model(str(tiny_llama), device="cpu")

    result = Scorer(loaded.model, loaded.tokenizer, ScoringSettings(top_k=5)).score([Query("r", "The year", ())])["r"]

    assert result.answer_logprobs == ()
    assert len(result.top_logprobs) == 5
    assert len(result.completion_token_ids) <= ScoringSettings.free_new_tokens


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("The capital of France is", ("The capital of France is", " ")),
        ("The capital of France is ", ("The capital of France is", " ")),
        ("Q: capital of France?\nA:", ("Q: capital of France?\nA:", " ")),
        ("Q: capital of France?\n", ("Q: capital of France?\n", "")),
    ],
)
def test_split_prompt_moves_trailing_space_to_answer(prompt, expected):
    assert split_prompt(prompt) == expected
