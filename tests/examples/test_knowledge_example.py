"""Knowledge tests written with the kinject fixture: copy this file into your project and edit the table.

Run them against a LoRA adapter, or against a full fine-tuned checkpoint:

    pytest --kinject --kinject-adapter path/to/adapter tests/examples/
    pytest --kinject --kinject-candidate path/to/checkpoint tests/examples/

Without --kinject every test here is skipped and no model is loaded.
"""

import pytest

# Prompts the default base model (SmolLM2-135M-Instruct) completes correctly; a table for
# another base model should hold only facts that model knows, which the first test checks.
CAPITALS = [
    ("The capital of France is", "Paris"),
    ("The capital of Japan is", "Tokyo"),
    ("The capital of Italy is", "Rome"),
    ("The capital of Germany is", "Berlin"),
    ("The capital of Spain is", "Madrid"),
]


@pytest.fixture(scope="module")
def scored_capitals(kinject):
    """Score the whole table in one batched pass per model; the helpers below reuse those results."""
    kinject.base.score_many(CAPITALS)
    kinject.candidate.score_many(CAPITALS)


def test_base_knows_every_capital(kinject, scored_capitals):
    unknown = [prompt for prompt, answer in CAPITALS if not kinject.base.knows(prompt, answer)]
    assert unknown == []


@pytest.mark.parametrize("prompt, answer", CAPITALS)
def test_capital_is_retained(kinject, scored_capitals, prompt, answer):
    kinject.assert_retained(prompt, answer)


def test_next_token_distribution_stays_close(kinject):
    kinject.assert_distribution_close("The capital of France is", max_kl=0.5)
