"""pytest hooks: options, suite collection, one scoring pass per session, and the summary.

Nothing here imports torch: the heavy modules load only when ``--kinject`` is given and facts
were selected, so ``pytest --co`` in a project that has the plugin installed stays fast.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from .fixture import kinject  # noqa: F401  (pytest registers fixtures defined in plugin modules)
from .suite import Fact, SuiteError, Tolerance, is_suite_file, load_suite, tolerance_problem

DTYPES = ("float32", "bfloat16", "float16")

outcome_key = pytest.StashKey["Any"]()
# Number of facts in each collected suite file, to tell a whole-suite run from a selection.
fact_counts_key = pytest.StashKey[dict[Path, int]]()
# Every tag of every collected fact, selected or not, so a tag threshold for a misspelled tag can be rejected.
suite_tags_key = pytest.StashKey[set[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kinject", "kinject: knowledge regression tests for language models")
    group.addoption("--kinject", action="store_true", default=False,
                    help="Collect fact suites (*.kinject.jsonl, *.kinject.yaml) and check the candidate model against "
                         "the base snapshot.")
    group.addoption("--kinject-update", action="store_true", default=False,
                    help="Record the base model's results for the selected facts into the snapshot files.")
    group.addoption("--kinject-model", metavar="REF", default=None,
                    help="Base model: a local model folder, a hub id, a .gguf file, or 'smollm2' (the default; "
                         "ini: kinject_model).")
    group.addoption("--kinject-adapter", metavar="DIR", action="append", default=[],
                    help="PEFT adapter folder applied to the base to form the candidate; repeat to apply several "
                         "together, or to judge each on its own with --kinject-each-adapter.")
    group.addoption("--kinject-each-adapter", action="store_true", default=None,
                    help="Judge every --kinject-adapter on its own against the base, one after another, instead of "
                         "applying them together; each fact gets one test item per adapter, with the adapter's "
                         "folder name in brackets (ini: kinject_each_adapter).")
    group.addoption("--kinject-live-base", action="store_true", default=None,
                    help="Score the base model in this run and compare against those results instead of the "
                         "snapshot's, without writing the snapshot (ini: kinject_live_base).")
    group.addoption("--kinject-candidate", metavar="REF", default=None,
                    help="A full or merged fine-tuned checkpoint to check instead of the base (folder, hub id, .gguf).")
    group.addoption("--kinject-device", metavar="DEVICE", default=None,
                    help="Device to score on: auto (CUDA when available), cpu, cuda, cuda:N, mps (ini: kinject_device).")
    group.addoption("--kinject-dtype", metavar="DTYPE", default=None, choices=DTYPES,
                    help="Dtype of the model weights: float32 (default), bfloat16, float16 (ini: kinject_dtype).")
    group.addoption("--kinject-batch-size", metavar="N", type=int, default=None,
                    help="Facts per batched pass, default 64 (ini: kinject_batch_size).")
    group.addoption("--kinject-top-k", metavar="K", type=int, default=None,
                    help="Size of the recorded next-token distribution, default 20 (ini: kinject_top_k).")
    group.addoption("--kinject-max-kl", metavar="NATS", type=float, default=None,
                    help="Tolerance on KL(base || candidate) over the base's top-k, in nats; default 0.5 "
                         "(ini: kinject_max_kl). Suite, tag and fact tolerances win over it.")
    group.addoption("--kinject-max-logprob-drop", metavar="NATS", type=float, default=None,
                    help="Tolerance on the drop of the expected answer's log-probability, in nats; default 1.0 "
                         "(ini: kinject_max_logprob_drop). Suite, tag and fact tolerances win over it.")
    group.addoption("--kinject-min-top-k-overlap", metavar="FRACTION", type=float, default=None,
                    help="Tolerance on the fraction of the base's top-k next tokens that must stay in the "
                         "candidate's top-k, 0 to 1; default 0.3 (ini: kinject_min_top_k_overlap). Suite, tag and "
                         "fact tolerances win over it.")
    group.addoption("--kinject-max-rank-change", metavar="N", type=int, default=None,
                    help="Tolerance on how many places the expected answer may fall among the answers and "
                         "choices, for facts with choices; default 1 (ini: kinject_max_rank_change). Suite, tag "
                         "and fact tolerances win over it.")
    group.addoption("--kinject-report", metavar="PATH", action="append", default=[],
                    help="Write a report of every fact's verdict to PATH: .json (all numbers), .md (summary for "
                         "a pull request) or .html (one page with plots); repeat for several. The Markdown summary is "
                         "also appended to $GITHUB_STEP_SUMMARY when that variable is set.")
    group.addoption("--kinject-snapshot-dir", metavar="DIR", default=None,
                    help="Folder for snapshot files instead of __kinject__/ beside each suite (ini: kinject_snapshot_dir).")

    gate = parser.getgroup("kinject-gate", "kinject: aggregate release gate")
    gate.addoption("--kinject-gate", metavar="MODE", default=None, choices=("strict", "aggregate"),
                   help="strict (default): every regressed fact fails its own item. aggregate: regressed facts are "
                        "reported as expected failures, and one kinject-gate item fails when a threshold below is "
                        "breached (ini: kinject_gate).")
    gate.addoption("--kinject-min-retention", metavar="FRACTION", type=float, default=None,
                   help="Minimum retention rate of facts the base knows, e.g. 0.95 (ini: kinject_min_retention).")
    gate.addoption("--kinject-retention-not-below", metavar="FRACTION", type=float, default=None,
                   help="Fail only when retention is significantly below FRACTION: the upper end of its Wilson 95%% "
                        "interval is below it (ini: kinject_retention_not_below).")
    gate.addoption("--kinject-max-regressed", metavar="N", type=int, default=None,
                   help="Maximum number of regressed facts (ini: kinject_max_regressed).")
    gate.addoption("--kinject-max-mean-kl", metavar="NATS", type=float, default=None,
                   help="Maximum mean KL(base || candidate) over facts the base knows, in nats "
                        "(ini: kinject_max_mean_kl).")
    gate.addoption("--kinject-tag-threshold", metavar="TAG:NAME=VALUE", action="append", default=[],
                   help="A threshold above for the facts of one tag, e.g. P36:min_retention=0.9 or "
                        "P36:max_regressed=0,max_mean_kl=0.2; NAME is min_retention, retention_not_below, "
                        "max_regressed or max_mean_kl. Repeatable; wins over the ini key kinject_tag_thresholds "
                        "(one entry a line).")

    parser.addini("kinject_gate", "Gate mode: strict or aggregate (default: strict).", default=None)
    parser.addini("kinject_min_retention", "Minimum retention rate, as a fraction.", default=None)
    parser.addini("kinject_retention_not_below", "Retention must not be significantly below this fraction.",
                  default=None)
    parser.addini("kinject_max_regressed", "Maximum number of regressed facts.", default=None)
    parser.addini("kinject_max_mean_kl", "Maximum mean KL over facts the base knows, in nats.", default=None)
    parser.addini("kinject_each_adapter", "Judge each adapter on its own (default: false).", type="bool",
                  default=False)
    parser.addini("kinject_live_base", "Score the base in this run instead of reading the snapshot (default: false).",
                  type="bool", default=False)
    parser.addini("kinject_tag_thresholds", "Gate thresholds per tag, one TAG:NAME=VALUE[,NAME=VALUE...] a line.",
                  type="linelist", default=[])
    parser.addini("kinject_model", "Base model reference for kinject (default: smollm2).", default=None)
    parser.addini("kinject_device", "Device kinject scores on (default: auto).", default=None)
    parser.addini("kinject_dtype", "Dtype of the model weights (default: float32).", default=None)
    parser.addini("kinject_batch_size", "Facts per batched pass (default: 64).", default=None)
    parser.addini("kinject_top_k", "Size of the recorded next-token distribution (default: 20).", default=None)
    parser.addini("kinject_max_kl", "Tolerance on KL(base || candidate) in nats (default: 0.5).", default=None)
    parser.addini("kinject_max_logprob_drop", "Tolerance on the expected answer's log-probability drop in nats "
                  "(default: 1.0).", default=None)
    parser.addini("kinject_min_top_k_overlap", "Tolerance on the fraction of the base's top-k tokens kept in the "
                  "candidate's top-k (default: 0.3).", default=None)
    parser.addini("kinject_max_rank_change", "Tolerance on the places the expected answer may fall among answers "
                  "and choices (default: 1).", default=None)
    parser.addini("kinject_snapshot_dir", "Folder for snapshot files (default: __kinject__/ beside each suite).",
                  default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kinject: a fact from a kinject suite")
    if config.getoption("kinject"):
        config.pluginmanager.register(KinjectPlugin(config), "kinject-session")
        from .strategies import load_profile

        load_profile(config)
        return
    for flag in ("update", "adapter", "candidate", "report", "each_adapter", "live_base"):
        if config.getoption(f"kinject_{flag}"):
            raise pytest.UsageError(f"--kinject-{flag.replace('_', '-')} has no effect without --kinject; add --kinject "
                                    "to run the knowledge gate")


def _setting(config: pytest.Config, name: str, convert: Any = str) -> Any:
    value = config.getoption(f"kinject_{name}")
    if value is None:
        value = config.getini(f"kinject_{name}")
    if value in (None, ""):
        return None
    try:
        return convert(value)
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(convert, "text")
        raise pytest.UsageError(f"ini key kinject_{name} = {value!r} is invalid; expected {kind}") from None


def _ini_flag(config: pytest.Config, name: str) -> bool:
    # pytest 9.2 turns an invalid boolean into a UsageError that does not name the key.
    try:
        return bool(config.getini(name))
    except (ValueError, pytest.UsageError) as error:
        raise pytest.UsageError(f"ini key {name}: {error}; write true or false") from None


def _options(config: pytest.Config) -> Any:
    from .engine import DEFAULT_BATCH_SIZE
    from .session import Options

    # An unset shell variable (--kinject-candidate=$CANDIDATE) gives an empty value, which would
    # otherwise judge the base against itself or load the current folder.
    for flag, values, expected in (
        ("--kinject-model", [config.getoption("kinject_model")], "a model folder, a .gguf file, a hub id or smollm2"),
        ("--kinject-candidate", [config.getoption("kinject_candidate")], "a model folder, a .gguf file or a hub id"),
        ("--kinject-adapter", config.getoption("kinject_adapter"), "the folder written by PeftModel.save_pretrained()"),
    ):
        if any(value is not None and not value.strip() for value in values):
            raise pytest.UsageError(f"{flag} is empty; pass {expected}")

    snapshot_dir = _setting(config, "snapshot_dir")
    options = Options(
        model=_setting(config, "model") or "smollm2",
        adapters=tuple(config.getoption("kinject_adapter")),
        candidate=config.getoption("kinject_candidate"),
        update=config.getoption("kinject_update"),
        device=_setting(config, "device") or "auto",
        dtype=_setting(config, "dtype") or "float32",
        batch_size=_default(_setting(config, "batch_size", int), DEFAULT_BATCH_SIZE),
        top_k=_default(_setting(config, "top_k", int), 20),
        snapshot_dir=Path(snapshot_dir) if snapshot_dir else None,
        tolerance=Tolerance(kl=_setting(config, "max_kl", float),
                            logprob_drop=_setting(config, "max_logprob_drop", float),
                            top_k_overlap=_setting(config, "min_top_k_overlap", float),
                            rank_change=_setting(config, "max_rank_change", int)),
        each_adapter=bool(config.getoption("kinject_each_adapter") or _ini_flag(config, "kinject_each_adapter")),
        live_base=bool(config.getoption("kinject_live_base") or _ini_flag(config, "kinject_live_base")),
    )
    # The flag's choices are checked by argparse; a value from the ini key is not.
    if options.dtype not in DTYPES:
        raise pytest.UsageError(f"ini key kinject_dtype = {options.dtype!r} is invalid; use "
                                f"{', '.join(DTYPES[:-1])} or {DTYPES[-1]}")
    if options.candidate and options.adapters:
        raise pytest.UsageError("--kinject-candidate and --kinject-adapter cannot be combined; an adapter applies "
                                "to the base model, so pass the base with --kinject-model")
    if options.each_adapter and not options.adapters:
        raise pytest.UsageError("--kinject-each-adapter (ini kinject_each_adapter) needs adapters to judge; pass "
                                "each one with --kinject-adapter DIR, or drop the option")
    for name, value in (("--kinject-batch-size", options.batch_size), ("--kinject-top-k", options.top_k)):
        if value < 1:
            raise pytest.UsageError(f"{name}={value} is invalid; pass a positive integer")
    for name, field in (("--kinject-max-kl", "kl"), ("--kinject-max-logprob-drop", "logprob_drop"),
                        ("--kinject-min-top-k-overlap", "top_k_overlap"), ("--kinject-max-rank-change", "rank_change")):
        value = getattr(options.tolerance, field)
        problem = None if value is None else tolerance_problem(field, value)
        if problem is not None:
            raise pytest.UsageError(f"{name}={value} is invalid; pass {problem} (it is also read from the ini key "
                                    f"kinject_{name[len('--kinject-'):].replace('-', '_')})")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", options.device):
        raise pytest.UsageError(f"--kinject-device={options.device} is invalid; use auto, cpu, cuda, cuda:N or mps")
    from .export import SUPPORTED_SUFFIXES

    for report in config.getoption("kinject_report"):
        if Path(report).suffix.lower() not in SUPPORTED_SUFFIXES:
            raise pytest.UsageError(f"--kinject-report={report} has an unsupported suffix; use a file name ending "
                                    "in " + " or ".join(SUPPORTED_SUFFIXES))
        problem = _report_path_problem(Path(report))
        if problem is not None:
            raise pytest.UsageError(f"--kinject-report={report} cannot be written: {problem}; pass a file path in a "
                                    "folder that exists or can be created")
    return options


def _report_path_problem(path: Path) -> str | None:
    """Say why ``path`` cannot become a report file, or return None.

    Reports are written after every fact has been scored, so a path that can never be written is
    rejected before the models load.
    """
    if path.is_dir():
        return f"{path} is a folder"
    for parent in path.parents:
        if parent.is_dir():
            return None
        if parent.exists():
            return f"{parent} is a file, not a folder"
    return None


def _gate(config: pytest.Config) -> tuple[str, Any, dict[str, Any]]:
    from .gate import GATE_MODES, Thresholds

    mode = _setting(config, "gate") or "strict"
    if mode not in GATE_MODES:
        raise pytest.UsageError(f"ini key kinject_gate = {mode!r} is invalid; use strict or aggregate")
    thresholds = Thresholds(
        min_retention=_setting(config, "min_retention", float),
        retention_not_below=_setting(config, "retention_not_below", float),
        max_regressed=_setting(config, "max_regressed", int),
        max_mean_kl=_setting(config, "max_mean_kl", float),
    )
    for name in ("min_retention", "retention_not_below"):
        value = getattr(thresholds, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise pytest.UsageError(f"--kinject-{name.replace('_', '-')}={value} is invalid; pass a fraction "
                                    "between 0 and 1, e.g. 0.95")
    tag_thresholds = _tag_thresholds(config)
    if mode == "aggregate" and not thresholds.any_set and not tag_thresholds:
        raise pytest.UsageError("--kinject-gate=aggregate needs a threshold; add --kinject-min-retention, "
                                "--kinject-retention-not-below, --kinject-max-regressed, --kinject-max-mean-kl "
                                "or --kinject-tag-threshold")
    return mode, thresholds, tag_thresholds


def _tag_thresholds(config: pytest.Config) -> dict[str, Any]:
    """Merge the ini key's thresholds per tag with the flag's, the flag winning for the same tag and name."""
    from dataclasses import replace

    from .gate import parse_tag_thresholds

    merged: dict[str, Any] = {}
    sources = (("ini key kinject_tag_thresholds", config.getini("kinject_tag_thresholds")),
               ("--kinject-tag-threshold", config.getoption("kinject_tag_threshold")))
    for source, entries in sources:
        try:
            parsed = parse_tag_thresholds(entries)
        except ValueError as error:
            raise pytest.UsageError(f"{source}: {error}") from None
        for tag, thresholds in parsed.items():
            set_values = {name: value for name, value in vars(thresholds).items() if value is not None}
            merged[tag] = replace(merged[tag], **set_values) if tag in merged else thresholds
    return merged


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


class KinjectPlugin:
    """Registered only under ``--kinject``: collects suites and runs the session once."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.options = _options(config)
        self.gate_mode, self.thresholds, self.tag_thresholds = _gate(config)
        self.session: Any = None

    def pytest_collect_file(self, file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
        if is_suite_file(file_path):
            return SuiteFile.from_parent(parent, path=file_path)
        return None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        items = [item for item in session.items if isinstance(item, FactItem)]
        if not items or self.config.getoption("collectonly"):
            return
        self._check_threshold_tags()

        from .session import KinjectSession, KinjectUsageError

        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        progress = reporter.write_line if reporter is not None else print
        self.session = KinjectSession(self.options, progress=progress)
        facts = list({item.fact_key: item.fact for item in items}.values())
        selected = {item.outcome_key for item in items}
        try:
            outcomes = self.session.run(facts, whole_suites=_whole_suites(session, facts), selected=selected)
        except KinjectUsageError as error:
            raise pytest.UsageError(str(error)) from None
        except Warning as error:
            # Scoring runs in a collection hook, where a warning that -W error or the ini key
            # filterwarnings turns into an exception would end as an INTERNALERROR traceback.
            raise pytest.UsageError(f"{error} (a {type(error).__name__}, made an error by -W or filterwarnings)") from None
        for item in items:
            item.stash[outcome_key] = outcomes.get(item.outcome_key)
        # Added after -k/-m deselection, so the gate judges exactly the selected facts, once per candidate.
        if self.thresholds.any_set or self.tag_thresholds:
            for run in self.session.runs:
                name = f"kinject-gate[{run.spec.name}]" if run.spec.name else "kinject-gate"
                session.items.append(GateItem.from_parent(session, name=name, nodeid=name, candidate=run.spec.name))

    def _check_threshold_tags(self) -> None:
        """Reject a tag threshold whose tag no collected fact carries, because the tag is most likely misspelled."""
        import difflib

        collected = self.config.stash.get(suite_tags_key, set())
        for tag in self.tag_thresholds:
            if tag not in collected:
                close = difflib.get_close_matches(tag, sorted(collected), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise pytest.UsageError(f"--kinject-tag-threshold names the tag {tag!r}, which no collected fact "
                                        f"carries; {hint}fix the tag name (also read from kinject_tag_thresholds)")

    def gate_result(self, run: Any) -> dict[str, Any] | None:
        """Return the gate's outcome for one candidate's report, or None when no threshold is set."""
        from .gate import gate_result

        if not (self.thresholds.any_set or self.tag_thresholds):
            return None
        return gate_result(run.outcomes.values(), self.gate_mode, self.thresholds, self.tag_thresholds)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.session is None or not self.session.outcomes:
            return
        from .report import summary_lines
        from .session import BASE_RESULTS_TEXT, BASE_WEIGHTS_TEXT

        terminalreporter.section("kinject")
        terminalreporter.write_line("base results: " + BASE_RESULTS_TEXT[self.session.summary.base_results])
        several = len(self.session.runs) > 1
        for run in self.session.runs:
            if several:
                terminalreporter.write_line("")
            terminalreporter.write_line(f"candidate: {run.label}" + (f" [{run.spec.name}]" if run.spec.name else ""))
            if run.base_weights is not None:
                terminalreporter.write_line("base weights: " + BASE_WEIGHTS_TEXT[run.base_weights])
            if run.error is not None:
                terminalreporter.write_line(f"not judged: {run.error}", red=True)
                continue
            for line in summary_lines(run.outcomes.values()):
                terminalreporter.write_line(line)
        for path in self.session.summary.snapshots_written:
            terminalreporter.write_line(f"snapshot written: {path}")
        self._write_reports(terminalreporter)

    def _write_reports(self, terminalreporter: Any) -> None:
        from .export import append_step_summary, markdown_report, session_report_data, write_reports

        paths = self.config.getoption("kinject_report")
        data = session_report_data(self.session.runs, self.options, self.session.summary, gate=self.gate_result)
        try:
            write_reports(paths, data)
        except OSError as error:
            # The tests have run by now; a report that cannot be written must not hide their outcome.
            terminalreporter.write_line(f"kinject: could not write the reports ({error}); check the --kinject-report "
                                        "paths", red=True)
            return
        for path in paths:
            terminalreporter.write_line(f"report written: {path}")
        summary = append_step_summary(markdown_report(data))
        if summary is not None:
            terminalreporter.write_line(f"report appended to the GitHub step summary {summary}")


def _whole_suites(session: pytest.Session, facts: list[Fact]) -> set[Path]:
    selected: dict[Path, int] = {}
    for fact in facts:
        selected[Path(fact.path)] = selected.get(Path(fact.path), 0) + 1
    totals = session.config.stash.get(fact_counts_key, {})
    return {path for path, count in selected.items() if totals.get(path) == count}


class SuiteFile(pytest.File):
    """A fact suite file; each fact becomes one test item."""

    def collect(self) -> Any:
        suite = load_suite(self.path)
        self.config.stash.setdefault(fact_counts_key, {})[Path(self.path)] = len(suite.facts)
        plugin = self.config.pluginmanager.get_plugin("kinject-session")
        self.config.stash.setdefault(suite_tags_key, set()).update(tag for fact in suite.facts for tag in fact.tags)
        for fact in suite.facts:
            # With --kinject-each-adapter, one item per adapter: "fact-id[adapter-name]".
            for spec in plugin.options.candidates:
                name = f"{fact.id}[{spec.name}]" if spec.name else fact.id
                item = FactItem.from_parent(self, name=name, fact=fact, candidate=spec.name)
                item.add_marker("kinject")
                for tag in fact.tags:
                    self.config.addinivalue_line("markers", f"{tag}: facts tagged {tag} in kinject suites")
                    item.add_marker(tag)
                yield item

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, SuiteError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


class FactRegressed(Exception):
    """Raised by a fact item whose candidate regressed; carries the report text."""


class FactItem(pytest.Item):
    """One fact: passes when retained or gained, fails when regressed, skips when unknown.

    A taught fact passes when the candidate learned its new answer and fails when it did not.
    """

    def __init__(self, *, fact: Fact, candidate: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fact = fact
        self.candidate = candidate  # the CandidateSpec name; "" when the run has one candidate

    @property
    def fact_key(self) -> str:
        return f"{self.fact.path}::{self.fact.id}"

    @property
    def outcome_key(self) -> str:
        from . import session

        return session.outcome_key(self.fact, self.candidate)

    def runtest(self) -> None:
        from .report import failure_report, skip_reason
        from .verdict import REGRESSED, UNKNOWN

        outcome = self.stash.get(outcome_key, None)
        if outcome is None:
            raise FactRegressed(f"fact {self.fact.id} ({self.fact.location}) was not scored; this is a kinject bug")
        if outcome.error is not None:
            raise FactRegressed(outcome.error)
        if outcome.edit is not None:
            self._check_taught(outcome)
            return

        if self.candidate:
            self.user_properties.append(("kinject_candidate", self.candidate))
        verdict = outcome.verdict
        self.user_properties.append(("kinject_verdict", verdict.status))
        if verdict.kl is not None:
            self.user_properties.append(("kinject_kl_nats", f"{verdict.kl:.6f}"))
        if verdict.logprob_drop is not None:
            self.user_properties.append(("kinject_logprob_drop_nats", f"{verdict.logprob_drop:.6f}"))
        if verdict.top_k_overlap is not None:
            self.user_properties.append(("kinject_top_k_overlap", f"{verdict.top_k_overlap:.4f}"))
        if verdict.rank_change is not None:
            self.user_properties.append(("kinject_rank_change", str(verdict.rank_change)))
        if verdict.status == REGRESSED:
            plugin = self.config.pluginmanager.get_plugin("kinject-session")
            if plugin.gate_mode == "aggregate":
                pytest.xfail(f"regressed ({', '.join(verdict.failed_checks)}); the aggregate gate decides")
            raise FactRegressed(failure_report(outcome, plugin.session.options_for(self.candidate)))
        if verdict.status == UNKNOWN:
            # Reported at the fact's line in the suite file rather than at this line of the plugin.
            raise pytest.skip.Exception(skip_reason(verdict), _use_item_location=True)

    def _check_taught(self, outcome: Any) -> None:
        """Pass a taught fact the candidate learned, fail one it did not, skip it when there is no fine-tune."""
        from .edits import NOT_LEARNED, UNTRAINED
        from .report import taught_report, untrained_reason

        self.user_properties.append(("kinject_verdict", outcome.edit.status))
        if outcome.edit.status == NOT_LEARNED:
            # Failed in both gate modes: the aggregate thresholds measure retention, not learning.
            plugin = self.config.pluginmanager.get_plugin("kinject-session")
            raise FactRegressed(taught_report(outcome, plugin.options))
        if outcome.edit.status == UNTRAINED:
            raise pytest.skip.Exception(untrained_reason(outcome), _use_item_location=True)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, FactRegressed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        line = self.fact.line - 1 if self.fact.line else None
        return self.path, line, f"fact {self.fact.id}" + (f" [{self.candidate}]" if self.candidate else "")


class GateItem(pytest.Item):
    """The aggregate gate of one candidate: fails when its selected facts as a whole breach a threshold."""

    def __init__(self, *, candidate: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.candidate = candidate

    def runtest(self) -> None:
        import warnings

        from .gate import breaches, tag_breaches, unmatched_tags
        from .session import KinjectWarning

        plugin = self.config.pluginmanager.get_plugin("kinject-session")
        run = next(run for run in plugin.session.runs if run.spec.name == self.candidate)
        outcomes = list(run.outcomes.values())
        found = breaches([outcome.verdict for outcome in outcomes if outcome.verdict is not None], plugin.thresholds)
        found += tag_breaches(outcomes, plugin.tag_thresholds)
        taught_tags = {tag for outcome in outcomes if outcome.edit is not None for tag in outcome.fact.tags}
        for tag in unmatched_tags(outcomes, plugin.tag_thresholds):
            reason = "no selected fact with a snapshot entry carries it"
            if tag in taught_tags:
                reason = "only taught facts carry it, and thresholds leave taught facts out"
            warnings.warn(f"the thresholds of tag {tag} were not checked: {reason}", KinjectWarning, stacklevel=1)
        if run.error is not None:
            found = [f"the candidate was not judged: {run.error}"]
        self.user_properties.append(("kinject_gate", "failed" if found else "passed"))
        if self.candidate:
            self.user_properties.append(("kinject_candidate", self.candidate))
        if found:
            raise FactRegressed("kinject gate failed for " + run.label + ":\n  " + "\n  ".join(found))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, FactRegressed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[str, int | None, str]:
        return self.name, None, f"kinject aggregate gate of {self.candidate}" if self.candidate else "kinject aggregate gate"
