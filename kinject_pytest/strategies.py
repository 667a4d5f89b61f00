"""Hypothesis strategies and property helpers for knowledge tests.

The strategies draw prompts (facts of a suite file, templates filled from an entity table,
metamorphic variants of one prompt), and the helpers check one drawn example against the
``kinject`` fixture inside a ``@given`` test. The ``kinject`` settings profile registered here
suits model calls: few examples and no deadline.

Nothing here imports torch: the models load on the first helper call that scores a prompt.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from .suite import Fact, load_suite
from .verdict import _TRAILING_PUNCTUATION

__all__ = [
    "PROFILE",
    "assert_answer_invariant",
    "assert_not_less_likely",
    "facts",
    "filled_prompts",
    "first_word",
    "load_profile",
    "suite_params",
    "variants",
]

PROFILE = "kinject"

# Each example costs one or two forward passes per model, so a property runs few of them. CI sets
# the CI environment variable, and there the examples are derived from the test instead of a seed
# so that every CI run checks the same prompts.
settings.register_profile(
    PROFILE,
    max_examples=10,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

_WHITESPACE = ("", " ", "  ", "\n", "\t")
_WORD = re.compile(r"\w+(?:['’-]\w+)*")


def load_profile(config: Any) -> None:
    """Load the ``kinject`` profile unless the run chose one with ``--hypothesis-profile``."""
    chosen = config.getoption("hypothesis_profile", default=None)
    if not chosen:
        settings.load_profile(PROFILE)


# Strategies


def facts(suite_path: str | os.PathLike[str]) -> SearchStrategy[Fact]:
    """Draw facts of a suite file. Shrinking moves toward the file's first fact.

    The file is read when this is called, so a `SuiteError` surfaces at collection.
    """
    return st.sampled_from(load_suite(suite_path).facts)


def filled_prompts(templates: Sequence[str], entities: Mapping[str, str]) -> SearchStrategy[tuple[str, str]]:
    """Draw ``(prompt, expected answer)`` pairs: a template filled with an entity, and that entity's answer.

    Each template contains one ``{}`` for the entity, e.g. ``"The capital of {} is"`` with
    ``{"France": "Paris"}`` gives ``("The capital of France is", "Paris")``. Shrinking moves
    toward the first template and the first entity.
    """
    templates = list(templates)
    if not templates:
        raise ValueError("`templates` is empty; pass at least one template such as 'The capital of {} is'")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain '{{}}' exactly once, where the entity goes")
    table = list(entities.items())
    if not table:
        raise ValueError("`entities` is empty; pass a mapping of entities to answers such as {'France': 'Paris'}")

    def fill(drawn: tuple[str, tuple[str, str]]) -> tuple[str, str]:
        template, (entity, answer) = drawn
        return template.replace("{}", entity), answer

    return st.tuples(st.sampled_from(templates), st.sampled_from(table)).map(fill)


def variants(prompt: str, *, paraphrases: Sequence[str] = (), case: bool = True, whitespace: bool = True,
             punctuation: bool = True) -> SearchStrategy[str]:
    """Draw metamorphic variants of ``prompt``, which should get the same answer.

    A variant starts from the prompt or one of ``paraphrases``, then may change the case of its
    first letter, lose its trailing punctuation, and gain whitespace before and after. Each
    change can be turned off with its flag. The unchanged prompt is the simplest example, so a
    failing property shrinks toward it and reports the fewest changes that break the answer.
    """
    texts = [prompt, *paraphrases]
    first_letter = st.sampled_from(("keep", "swap") if case else ("keep",))
    drop_punctuation = st.booleans() if punctuation else st.just(False)
    padding = st.sampled_from(_WHITESPACE if whitespace else ("",))

    def build(drawn: tuple[str, str, bool, str, str]) -> str:
        text, letter, drop, before, after = drawn
        if letter == "swap":
            text = _swap_first_letter(text)
        if drop:
            text = text.rstrip(_TRAILING_PUNCTUATION)
        return before + text + after

    return st.tuples(st.sampled_from(texts), first_letter, drop_punctuation, padding, padding).map(build)


def _swap_first_letter(text: str) -> str:
    for index, character in enumerate(text):
        if character.isalpha():
            return text[:index] + character.swapcase() + text[index + 1:]
    return text


def suite_params(suite_path: str | os.PathLike[str]) -> list[Any]:
    """Return a ``pytest.param(fact, id=fact.id)`` per fact, for ``@pytest.mark.parametrize("fact", ...)``."""
    import pytest

    return [pytest.param(fact, id=fact.id) for fact in load_suite(suite_path).facts]


# Property helpers. Like the fixture's helpers they raise AssertionError with __tracebackhide__ set,
# so a failure points at the line of the test, and hypothesis prints the falsifying example above it.


def first_word(completion: str) -> str:
    """Return the first word of a completion, casefolded, or "" when it has no word characters."""
    found = _WORD.search(completion)
    return found.group(0).casefold() if found else ""


def assert_answer_invariant(kinject: Any, prompt: str, variant: str, *,
                            model: Literal["base", "candidate"] = "candidate") -> None:
    """Fail when the greedy answer to ``variant`` differs from the answer to ``prompt``.

    The answers are the first words of the two greedy completions, compared case-insensitively,
    because a variant may change what follows the answer ("Paris." against "Paris, the").
    """
    __tracebackhide__ = True
    if model not in ("base", "candidate"):
        raise ValueError(f"`model` must be 'base' or 'candidate', got {model!r}")
    probe = kinject.base if model == "base" else kinject.candidate
    original, changed = probe.score_many([prompt, variant])
    expected = first_word(original.completion)
    received = first_word(changed.completion)
    if expected == received:
        return

    lines = [
        f"answer changed under a prompt variant: {model} answers {expected!r} to the prompt and {received!r} "
        "to the variant",
        f"  prompt:     {prompt!r}  completion {original.completion!r}",
        f"  variant:    {variant!r}  completion {changed.completion!r}",
        f"  {model}: {probe.label}",
    ]
    raise AssertionError("\n".join(lines))


def assert_not_less_likely(kinject: Any, prompt: str, answer: str | Sequence[str], *,
                           max_drop: float | None = None) -> None:
    """Fail when log p(answer) under the candidate is below the base's by more than ``max_drop`` nats.

    Unlike ``assert_retained`` this checks every example, also those whose answer the base does
    not give. With several accepted answers the best one counts on each side. ``max_drop``
    defaults to ``--kinject-max-logprob-drop``, else 1.0.
    """
    __tracebackhide__ = True
    tolerance = kinject.tolerance.logprob_drop if max_drop is None else max_drop
    answers = (answer,) if isinstance(answer, str) else tuple(answer)
    if not answers:
        raise ValueError("`answer` is empty; pass the expected answer or a list of accepted answers")

    base, candidate = kinject.base.score(prompt, answers), kinject.candidate.score(prompt, answers)
    drop = max(base.answer_logprobs) - max(candidate.answer_logprobs)
    if drop <= tolerance:
        return

    lines = [
        f"expected answer became less likely: log p dropped by {drop:.3f} nats (tolerance {tolerance:.3f})",
        f"  prompt:     {prompt!r}",
        f"  expected:   {' | '.join(answers)}",
        f"  base:       {base.completion!r}  log p(expected) = {max(base.answer_logprobs):.3f} nats",
        f"  candidate:  {candidate.completion!r}  log p(expected) = {max(candidate.answer_logprobs):.3f} nats",
        f"  candidate: {kinject.options.candidate_label}",
    ]
    raise AssertionError("\n".join(lines))
