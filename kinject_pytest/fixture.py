"""The ``kinject`` fixture: knowledge assertions in ordinary Python tests.

Under ``pytest --kinject`` the session-scoped fixture gives a test the base model and the
candidate (base + ``--kinject-adapter``, a ``--kinject-candidate`` checkpoint, or the base
itself), each loaded at most once per session. Its assertion helpers fail with text laid out
like a regressed suite fact's report. Without ``--kinject`` every test that requests the fixture is skipped
and no model is loaded.

Nothing here imports torch at import time: models and the scoring engine load on the first call
that needs them, so ``pytest --co`` stays fast.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, ContextManager, Iterable, Sequence

import pytest

from .engine import FactResult, Query, ScoringSettings, kl_divergence
from .verdict import DEFAULT_TOLERANCE, completion_matches

logger = logging.getLogger(__name__)

SKIP_REASON = "kinject fixture needs --kinject (pass it to run knowledge tests)"

# One answer, or several accepted answers of which any one will do.
Answers = str | Sequence[str]


@pytest.fixture(scope="session")
def kinject(request: pytest.FixtureRequest) -> Kinject:
    """Base model, candidate and knowledge assertions; skips the test without ``--kinject``."""
    plugin = request.config.pluginmanager.get_plugin("kinject-session")
    if plugin is None:
        pytest.skip(SKIP_REASON)
    # plugin.session is set when suite facts were selected; it scored them in pytest_collection_finish.
    return Kinject(plugin.options, session=plugin.session)


class ModelProbe:
    """One model (the base or the candidate) with batched scoring and cached results.

    Every call goes through :class:`kinject_pytest.engine.Scorer`, so a prompt is scored exactly as a
    suite fact with the same answers would be. Log-probabilities are natural logs (nats).
    """

    def __init__(self, label: Callable[[], str], load: Callable[[], tuple[Any, Callable[[], ContextManager[Any]]]],
                 *, batch_size: int, top_k: int) -> None:
        self._label = label
        self._load = load
        self.batch_size = batch_size
        self.default_top_k = top_k
        self._results: dict[tuple[Any, ...], FactResult] = {}

    @property
    def label(self) -> str:
        """The model reference, with its adapters, as the summary prints it."""
        return self._label()

    def score(self, prompt: str, answers: Answers = (), *, top_k: int | None = None,
              probe_token_ids: Sequence[int] = ()) -> FactResult:
        """Score one prompt: greedy completion, each answer's log-probability, top-k next tokens."""
        return self.score_many([(prompt, answers)], top_k=top_k, probe_token_ids=probe_token_ids)[0]

    def score_many(self, requests: Iterable[str | tuple[str, Answers]], *, top_k: int | None = None,
                   probe_token_ids: Sequence[int] = ()) -> list[FactResult]:
        """Score prompts in batched passes; each request is a prompt or a ``(prompt, answers)`` pair.

        Results are returned in request order and cached, so the helpers that score the same prompt
        and answers afterwards do not run the model again.
        """
        keys = [self._key(request, top_k, probe_token_ids) for request in requests]
        missing = list(dict.fromkeys(key for key in keys if key not in self._results))
        if missing:
            self._run(missing)
        return [self._results[key] for key in keys]

    def complete(self, prompt: str) -> str:
        """Return the greedy completion of ``prompt``, at most ``ScoringSettings.free_new_tokens`` tokens."""
        return self.score(prompt).completion

    def logprob(self, prompt: str, answer: str) -> float:
        """Return log p(answer | prompt) in nats, summed over the answer's tokens."""
        return self.score(prompt, answer).answer_logprobs[0]

    def top_k(self, prompt: str, k: int = 20) -> list[tuple[str, float]]:
        """Return the ``k`` most likely next tokens after ``prompt`` with their log-probabilities, most likely first."""
        result = self.score(prompt, top_k=k)
        return list(zip(result.top_tokens, result.top_logprobs))

    def knows(self, prompt: str, answer: Answers, match: str = "prefix") -> bool:
        """Return whether the greedy completion gives an accepted answer under the match rule.

        The completion is as long as a suite fact's: the longest answer plus a few tokens, so
        ``prefix`` can see where the word ends. ``match`` is one of prefix, exact, contains, regex.
        """
        answers = _answer_tuple(answer)
        # A regex is a pattern, not text to score, as in suites.
        result = self.score(prompt, () if match == "regex" else answers)
        return any(completion_matches(result.completion, expected, match) for expected in answers)

    def _key(self, request: str | tuple[str, Answers], top_k: int | None,
             probe_token_ids: Sequence[int]) -> tuple[Any, ...]:
        prompt, answers = (request, ()) if isinstance(request, str) else request
        if not isinstance(prompt, str):
            raise TypeError(f"a kinject scoring request is a prompt or a (prompt, answers) pair, got {request!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k={top_k!r} is invalid; pass a positive number of tokens, such as 20")
        return (prompt, _answer_tuple(answers), top_k or self.default_top_k, tuple(probe_token_ids))

    def _run(self, keys: list[tuple[Any, ...]]) -> None:
        from .engine import Scorer

        loaded, scoring_context = self._load()
        by_settings: dict[int, list[tuple[Any, ...]]] = {}
        for key in keys:
            by_settings.setdefault(key[2], []).append(key)
        vocabulary = getattr(loaded.model.config, "vocab_size", None)
        if vocabulary is not None and max(by_settings) > vocabulary:
            raise ValueError(f"top_k={max(by_settings)} is larger than the vocabulary of {vocabulary} tokens of "
                             f"{self.label}; pass a smaller k")
        for top_k, group in by_settings.items():
            queries = [Query(key=str(index), prompt=prompt, answers=answers, probe_token_ids=probes)
                       for index, (prompt, answers, _, probes) in enumerate(group)]
            scorer = Scorer(loaded.model, loaded.tokenizer, ScoringSettings(batch_size=self.batch_size, top_k=top_k))
            with scoring_context():
                results = scorer.score(queries)
            for index, key in enumerate(group):
                self._results[key] = results[str(index)]


class Kinject:
    """The ``kinject`` fixture's value: ``base``, ``candidate`` and the assertion helpers.

    ``options`` is the plugin's :class:`kinject_pytest.session.Options`. ``session`` is the plugin's
    KinjectSession when suites were scored in this run; its base model is reused when possible.
    """

    def __init__(self, options: Any, session: Any = None) -> None:
        self.options = options
        self._session = _UsageErrorsFail(session) if session is not None else None
        self._base: Any = None
        self._clean_base: Any = None  # the base probe's own copy when an adapter trains biases
        self._candidate: Any = None
        self.tolerance = options.tolerance.over(DEFAULT_TOLERANCE)
        self.base = ModelProbe(lambda: options.model, self._base_target,
                               batch_size=options.batch_size, top_k=options.top_k)
        self.candidate = ModelProbe(lambda: options.candidate_label, lambda: (self._candidate_model(), contextlib.nullcontext),
                                    batch_size=options.batch_size, top_k=options.top_k)
        if not options.adapters and not options.candidate:
            # The candidate is the base itself, so both probes share one cache of results.
            self.candidate._results = self.base._results

    # Assertion helpers. Each raises AssertionError in its own frame, and __tracebackhide__ keeps that
    # frame out of the traceback, so a failure points at the line of the test that called it.

    def assert_knows(self, prompt: str, answer: Answers, *, match: str = "prefix") -> None:
        """Fail unless the candidate's greedy completion gives an accepted answer."""
        __tracebackhide__ = True
        _require_answers("kinject.assert_knows", answer)
        if self.candidate.knows(prompt, answer, match):
            return
        message = self._report(f"candidate does not know the answer: {_CHECK_TEXT['generation']}",
                               prompt, answer, match)
        raise AssertionError(message)

    def assert_retained(self, prompt: str, answer: Answers, *, max_logprob_drop: float | None = None,
                        match: str = "prefix") -> None:
        """Fail when the base knows the answer and the candidate forgot it or finds it much less likely.

        Passes when the base does not know the answer either, as a suite marks such a fact unknown.
        ``max_logprob_drop`` (nats) defaults to ``--kinject-max-logprob-drop``, else 1.0.
        """
        __tracebackhide__ = True
        _require_answers("kinject.assert_retained", answer)
        tolerance = self.tolerance.logprob_drop if max_logprob_drop is None else _checked("max_logprob_drop",
                                                                                          max_logprob_drop)
        if not self.base.knows(prompt, answer, match):
            return
        failed = []
        if not self.candidate.knows(prompt, answer, match):
            failed.append("generation")
        drop = self._logprob_drop(prompt, answer, match)
        if drop is not None and drop > tolerance:
            failed.append("logprob_drop")
        if not failed:
            return
        reasons = "; ".join(_CHECK_TEXT[name] for name in failed)
        message = self._report(f"knowledge regressed: {reasons}", prompt, answer, match,
                               extra=[f"  logprob drop: {_nats(drop)} nats (tolerance {_nats(tolerance)})"])
        raise AssertionError(message)

    def assert_distribution_close(self, prompt: str, *, max_kl: float | None = None) -> None:
        """Fail when KL(base || candidate) of the next token after ``prompt`` exceeds ``max_kl`` nats.

        The KL is taken over the base's top-k tokens (``--kinject-top-k``) plus one bucket for the
        rest, as for suite facts. ``max_kl`` defaults to ``--kinject-max-kl``, else 0.5.
        """
        __tracebackhide__ = True
        tolerance = self.tolerance.kl if max_kl is None else _checked("max_kl", max_kl)
        kl, base, candidate = self._kl(prompt)
        if kl <= tolerance:
            return
        lines = [
            f"next-token distribution moved: KL(base || candidate) = {kl:.3f} nats over the base's "
            f"top-{len(base.top_token_ids)} (tolerance {_nats(tolerance)})",
            f"  prompt:     {prompt!r}",
            f"  base:       {base.completion!r}  top tokens {_top_tokens(base)}",
            f"  candidate:  {candidate.completion!r}  top tokens {_top_tokens(candidate)}",
            f"  candidate: {self.options.candidate_label}",
        ]
        raise AssertionError("\n".join(lines))

    def kl(self, prompt: str) -> float:
        """Return KL(base || candidate) in nats over the base's top-k next tokens plus the rest."""
        return self._kl(prompt)[0]

    def _kl(self, prompt: str) -> tuple[float, FactResult, FactResult]:
        base = self.base.score(prompt)
        candidate = self.candidate.score(prompt, probe_token_ids=base.top_token_ids)
        return kl_divergence(base.top_logprobs, candidate.probe_logprobs), base, candidate

    def _logprob_drop(self, prompt: str, answer: Answers, match: str) -> float | None:
        if match == "regex":
            return None
        answers = _answer_tuple(answer)
        # The best accepted answer on each side, as for a suite fact with several answers.
        base = max(self.base.score(prompt, answers).answer_logprobs)
        candidate = max(self.candidate.score(prompt, answers).answer_logprobs)
        return base - candidate

    def _report(self, headline: str, prompt: str, answer: Answers, match: str, *, extra: Sequence[str] = ()) -> str:
        """Return a failure text laid out like a regressed suite fact's report."""
        answers = _answer_tuple(answer)
        scored = () if match == "regex" else answers
        base = self.base.score(prompt, scored)
        candidate = self.candidate.score(prompt, scored)
        lines = [
            headline,
            f"  prompt:     {prompt!r}",
            f"  expected:   {' | '.join(answers)}  (match: {match})",
            f"  base:       {base.completion!r}  log p(expected) = {_nats(max(base.answer_logprobs, default=None))} nats",
            f"  candidate:  {candidate.completion!r}  log p(expected) = "
            f"{_nats(max(candidate.answer_logprobs, default=None))} nats",
            *extra,
            f"  candidate: {self.options.candidate_label}",
        ]
        return "\n".join(lines)

    # Loading. PEFT injects adapter layers into the base model in place, so with adapters both
    # probes score the same PeftModel, and the base probe scores it inside disable_adapter().

    def _base_target(self) -> tuple[Any, Callable[[], ContextManager[Any]]]:
        from .models import trained_bias

        if self.options.adapters and any(trained_bias(adapter) for adapter in self.options.adapters):
            # PEFT loads trained biases into the base's own parameters, so disable_adapter() does
            # not give the base: the base probe gets a clean copy of its own.
            if self._clean_base is None:
                logger.info("kinject: loading a clean copy of %s for kinject.base, because an adapter trains "
                            "biases", self.options.model)
                self._clean_base = self._fresh_session()._base_model()
            return self._clean_base, contextlib.nullcontext
        if self.options.adapters:
            candidate = self._candidate_model()
            # NOTE: disable_adapter() gives the base function exactly for LoRA adapters, with or
            # without modules_to_save (peft 0.4 and later), and the tests check both. Other PEFT
            # methods are not checked.
            return candidate, candidate.model.disable_adapter
        return self._base_model(), contextlib.nullcontext

    def _base_model(self) -> Any:
        if self._base is None:
            base = self._load_session()._base_model()
            if self.options.adapters and _has_adapter_layers(base.model):
                # Suite scoring already attached the adapters to the session's base in place, and
                # the session keeps no handle to detach them, so the fixture loads its own copy.
                logger.info("kinject: loading a second copy of %s for the kinject fixture", self.options.model)
                base = self._fresh_session()._base_model()
            else:
                # The session's base scored the suites before any test ran, and a hook or an earlier
                # test may have changed it in place since. NOTE: checked once, when the fixture first
                # uses the base, because the hash costs about 1 s on SmolLM2; a test that edits
                # the model after that goes unnoticed.
                _fail_if_modified(base)
            self._base = base
        return self._base

    def _candidate_model(self) -> Any:
        if self._candidate is not None:
            return self._candidate
        from .models import ModelError, attach_adapters

        if self.options.candidate:
            self._candidate = self._load_session()._candidate()
        elif self.options.adapters:
            try:
                self._candidate = attach_adapters(self._base_model(), list(self.options.adapters))
            except ModelError as error:
                pytest.fail(str(error), pytrace=False)
        else:
            self._candidate = self._base_model()
        return self._candidate

    def _load_session(self) -> Any:
        if self._session is None:
            self._session = self._fresh_session()
        return self._session

    def _fresh_session(self) -> Any:
        from .session import KinjectSession

        return _UsageErrorsFail(KinjectSession(self.options))


class _UsageErrorsFail:
    """A KinjectSession whose loading errors fail the test with their one-line message."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def _base_model(self) -> Any:
        return self._call(self._session._base_model)

    def _candidate(self) -> Any:
        return self._call(self._session._candidate)

    @staticmethod
    def _call(load: Callable[[], Any]) -> Any:
        from .session import KinjectUsageError

        try:
            return load()
        except KinjectUsageError as error:
            pytest.fail(str(error), pytrace=False)


_CHECK_TEXT = {
    "generation": "greedy completion does not match",
    "logprob_drop": "expected answer became less likely",
}


def _answer_tuple(answer: Answers) -> tuple[str, ...]:
    if isinstance(answer, str):
        return (answer,) if answer else ()
    if not isinstance(answer, Iterable):
        raise TypeError(f"an answer must be a string, got {type(answer).__name__} {answer!r}")
    for entry in answer:
        if not isinstance(entry, str):
            raise TypeError(f"an answer must be a string, got {type(entry).__name__} {entry!r}")
    return tuple(answer)


def _require_answers(helper: str, answer: Answers) -> None:
    # With no answer, knows() returns False for every model, so the helper would fail whatever the model does.
    if not _answer_tuple(answer):
        raise ValueError(f"{helper} needs at least one accepted answer, got {answer!r}")


def _checked(name: str, value: float) -> float:
    from .suite import tolerance_problem

    problem = tolerance_problem("kl", value)
    if problem is not None:
        raise ValueError(f"{name}={value!r} is invalid; pass {problem}")
    return value


def _fail_if_modified(loaded: Any) -> None:
    from .models import ModelError, check_unmodified

    try:
        check_unmodified(loaded)
    except ModelError as error:
        pytest.fail(f"kinject fixture: {error}", pytrace=False)


def _has_adapter_layers(model: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def _nats(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _top_tokens(result: FactResult, count: int = 5) -> str:
    return ", ".join(f"{token!r} {logprob:.2f}" for token, logprob in zip(result.top_tokens[:count],
                                                                           result.top_logprobs[:count]))
