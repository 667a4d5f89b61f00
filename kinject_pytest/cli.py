"""The ``kinject`` command. ``kinject diff OLD NEW`` lists what changed between two reports or two snapshots.

Both files are read as JSON and compared with DeepDiff, one fact at a time. Report facts are a
list, so they are keyed by fact id first (``file::id`` when an id occurs in more than one suite),
which makes the comparison independent of their order. Numbers are compared with an absolute
tolerance, so float noise from another machine or library build is not listed. This module must
not import torch, so the command starts quickly; a test checks that it does not.

A report of several candidates (``--kinject-each-adapter``) is compared one candidate at a time:
``--candidate NAME`` picks the candidate of every such report, ``--old-candidate`` and
``--new-candidate`` pick it per side, so two candidates of one report can be compared too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from deepdiff import DeepDiff

from .export import REPORT_VERSION
from .html import candidate_reports
from .snapshot import SNAPSHOT_VERSION

REPORT = "report"
SNAPSHOT = "snapshot"
VERSION_KEYS = {REPORT: "kinject_report_version", SNAPSHOT: "kinject_snapshot_version"}
DEFAULT_ABS_TOL = 1e-4

EXIT_UNCHANGED = 0
EXIT_CHANGED = 1
EXIT_ERROR = 2  # the status argparse also uses for usage errors

# Report fields that differ on every run and carry no information about the model: timings.
IGNORED_REPORT_PATHS = [r"^root\['run'\]\['seconds_(loading|scoring)'\]$"]

# How to make each kind of file, for error messages.
HOW_TO_MAKE = "a JSON report (pytest --kinject --kinject-report FILE.json) or a snapshot (suites/__kinject__/*.json)"

# Fields listed first for a changed fact: the verdict, then the completions, then everything else.
FIELD_ORDER = {"verdict": 0, "base_completion": 1, "candidate_completion": 1, "result.completion": 1}


class InputError(Exception):
    """An input file that cannot be compared. The message is one line that names the file and the fix."""


class _Absent:
    """Marker for a value that one of the two files does not have."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


@dataclass(frozen=True)
class FieldChange:
    """One changed value: its dotted path inside the fact or the header, and both values."""

    field: str
    old: Any
    new: Any

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"field": self.field}
        if self.old is not ABSENT:
            entry["old"] = _json_safe(self.old)
        if self.new is not ABSENT:
            entry["new"] = _json_safe(self.new)
        return entry


@dataclass
class Comparison:
    """Everything that differs between two files of the same kind, beyond the tolerance."""

    kind: str
    old_path: str
    new_path: str
    abs_tol: float
    header: list[FieldChange] = field(default_factory=list)
    facts: dict[str, list[FieldChange]] = field(default_factory=dict)
    added: dict[str, dict[str, Any]] = field(default_factory=dict)
    removed: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.header or self.facts or self.added or self.removed)


# Reading the inputs


def load_document(path: Path) -> tuple[str, dict[str, Any]]:
    """Read ``path`` and return its kind (report or snapshot) and its data.

    Raises :class:`InputError` for a file that is missing, unreadable, not JSON, of an unknown kind,
    of another format version, or whose facts have the wrong shape.
    """
    if path.suffix.lower() == ".md":
        raise InputError(f"{path}: a Markdown report cannot be compared; pass the JSON report written with "
                         "--kinject-report FILE.json in the same run")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}; pass {HOW_TO_MAKE}") from error
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error.reason}); pass {HOW_TO_MAKE}") from error

    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: invalid JSON ({error.msg}, line {error.lineno} column {error.colno}); "
                         f"pass {HOW_TO_MAKE}") from error

    kind = _document_kind(path, data)
    expected_version = REPORT_VERSION if kind == REPORT else SNAPSHOT_VERSION
    version = data[VERSION_KEYS[kind]]
    if version != expected_version:
        raise InputError(f"{path}: {kind} format version {version!r} is not {expected_version}, the one this kinject "
                         f"reads; write the {kind} again with this version of kinject")
    if kind == REPORT and "candidates" in data:
        _check_candidates(path, data["candidates"])
        return kind, data
    if "facts" not in data:
        raise InputError(f"{path}: missing key 'facts'; write the {kind} again with kinject")
    if kind == REPORT:
        report_fact_keys(path, data["facts"])
    elif not isinstance(data["facts"], dict):
        raise InputError(f"{path}: 'facts' is not an object keyed by fact id, as a snapshot's is; "
                         "re-record it with pytest --kinject --kinject-update")
    return kind, data


def _document_kind(path: Path, data: Any) -> str:
    kinds = [kind for kind, key in VERSION_KEYS.items() if isinstance(data, dict) and key in data]
    if len(kinds) != 1:
        raise InputError(f"{path}: not a kinject report or snapshot (expected exactly one of the keys "
                         f"{' or '.join(VERSION_KEYS.values())}); pass {HOW_TO_MAKE}")
    return kinds[0]


def _check_candidates(path: Path, candidates: Any) -> None:
    if not isinstance(candidates, list) or not all(isinstance(entry, dict) and isinstance(entry.get("name"), str)
                                                   and "facts" in entry for entry in candidates):
        raise InputError(f"{path}: 'candidates' is not a list of candidate reports with a 'name' and 'facts'; "
                         "write the report again with kinject")
    for entry in candidates:
        report_fact_keys(path, entry["facts"])


def select_candidate(path: Path, data: dict[str, Any], name: str | None, *, common: str | None = None,
                     option: str) -> tuple[str, dict[str, Any]]:
    """Return the label and the single-candidate report of candidate ``name`` (else ``common``) in a report.

    A single-candidate report is returned whole, labelled with its path: ``common`` does not apply to
    it and ``name`` must be None. Raises :class:`InputError` when a report of several candidates
    gets no name or an unknown one.
    """
    if "candidates" not in data:
        if name is not None:
            raise InputError(f"{path} is a report of one candidate; drop {option}, which picks a candidate of a "
                             "report written with --kinject-each-adapter")
        return str(path), data
    reports = dict(candidate_reports(data))
    names = ", ".join(reports) or "none"
    if name is None:
        name, option = common, "--candidate"
    if name is None:
        raise InputError(f"{path} is a report of several candidates ({names}); pick one with --candidate NAME, "
                         "or with --old-candidate / --new-candidate")
    if name not in reports:
        raise InputError(f"{path} has no candidate {name!r} (it has {names}); pass one of those to {option}")
    return f"{path}[{name}]", reports[name]


def report_fact_keys(path: Path, facts: Any) -> list[tuple[str, str]]:
    """Return the ``(id, file::id)`` pair of every fact in a report's fact list, checking its shape."""
    if not isinstance(facts, list):
        raise InputError(f"{path}: 'facts' is not a list, as a report's is; write the report again with kinject")

    keys = []
    for index, fact in enumerate(facts):
        if not isinstance(fact, dict) or not isinstance(fact.get("id"), str):
            raise InputError(f"{path}: fact {index} has no string 'id'; write the report again with kinject")
        file = fact.get("file")
        keys.append((fact["id"], fact["id"] if file is None else f"{file}::{fact['id']}"))
    return keys


def keyed_report(path: Path, data: dict[str, Any], by_file: bool) -> dict[str, Any]:
    """Return the report with its fact list turned into a dict keyed by fact id, or by ``file::id``."""
    facts: dict[str, Any] = {}
    for fact, (fact_id, file_key) in zip(data["facts"], report_fact_keys(path, data["facts"])):
        key = file_key if by_file else fact_id
        if key in facts:
            raise InputError(f"{path}: fact {key!r} occurs twice; write the report again with kinject")
        facts[key] = fact
    return {**data, "facts": facts}


def _ids_are_unique(path: Path, data: dict[str, Any]) -> bool:
    ids = [fact_id for fact_id, _ in report_fact_keys(path, data["facts"])]
    return len(ids) == len(set(ids))


# Comparing


def compare_files(old_path: Path, new_path: Path, abs_tol: float = DEFAULT_ABS_TOL, *, candidate: str | None = None,
                  old_candidate: str | None = None, new_candidate: str | None = None) -> Comparison:
    """Compare two reports or two snapshots, counting numbers closer than ``abs_tol`` as equal.

    In a report of several candidates, ``old_candidate`` or ``new_candidate`` picks the candidate
    compared, and ``candidate`` picks it for the sides without their own.
    Raises :class:`InputError` when a file cannot be read, the two are not of the same kind, or a
    report of several candidates gets no candidate name or an unknown one.
    """
    old_kind, old_data = load_document(old_path)
    new_kind, new_data = load_document(new_path)
    if old_kind != new_kind:
        raise InputError(f"{old_path} is a {old_kind} but {new_path} is a {new_kind}; compare two reports "
                         "(--kinject-report FILE.json) or two snapshots (__kinject__/*.json)")

    old_label, new_label = str(old_path), str(new_path)
    if old_kind == REPORT:
        old_label, old_data = select_candidate(old_path, old_data, old_candidate, common=candidate,
                                               option="--old-candidate")
        new_label, new_data = select_candidate(new_path, new_data, new_candidate, common=candidate,
                                               option="--new-candidate")
    elif candidate is not None or old_candidate is not None or new_candidate is not None:
        raise InputError(f"{old_path} and {new_path} are snapshots, which hold no candidates; drop --candidate, "
                         "--old-candidate and --new-candidate")

    if old_kind == REPORT:
        # Key by id alone when ids are unique, so a suite moved to another folder still lines up
        # (its new `file` shows as a changed field). Facts of two suites may share an id, though.
        by_file = not (_ids_are_unique(old_path, old_data) and _ids_are_unique(new_path, new_data))
        old_data = keyed_report(old_path, old_data, by_file)
        new_data = keyed_report(new_path, new_data, by_file)

    comparison = Comparison(old_kind, old_label, new_label, abs_tol)
    _collect_changes(comparison, old_data, new_data)
    return comparison


def _collect_changes(comparison: Comparison, old: dict[str, Any], new: dict[str, Any]) -> None:
    # math_epsilon makes DeepDiff compare numbers with math.isclose(a, b, abs_tol=math_epsilon). Its
    # default relative tolerance of 1e-9 wins only for numbers above abs_tol / 1e-9 (1e5 at the default).
    diff = DeepDiff(
        old,
        new,
        math_epsilon=comparison.abs_tol,
        ignore_numeric_type_changes=True,
        ignore_nan_inequality=True,
        exclude_regex_paths=IGNORED_REPORT_PATHS if comparison.kind == REPORT else None,
        view="tree",
    )

    version_changes: list[FieldChange] = []
    for path, old_value, new_value in _changed_values(diff):
        if path[0] == "facts" and len(path) == 2:
            _add_whole_fact(comparison, path[1], old_value, new_value)
        elif path[0] == "facts" and len(path) > 2:
            comparison.facts.setdefault(path[1], []).append(FieldChange(_dotted(path[2:]), old_value, new_value))
        elif path[0] == "versions" and len(path) > 1 and comparison.kind == SNAPSHOT:
            version_changes.append(FieldChange(_dotted(path[1:]), old_value, new_value))
        else:
            comparison.header.append(FieldChange(_dotted(path), old_value, new_value))

    if version_changes:
        # Library versions change with every upgrade, so they are listed as one header change,
        # holding only the packages whose version differs.
        comparison.header.append(_merged_versions(version_changes))
    comparison.header.sort(key=lambda change: change.field)
    for changes in comparison.facts.values():
        changes.sort(key=lambda change: (FIELD_ORDER.get(change.field, 2), change.field))
    comparison.facts = dict(sorted(comparison.facts.items()))
    comparison.added = dict(sorted(comparison.added.items()))
    comparison.removed = dict(sorted(comparison.removed.items()))


def _changed_values(diff: DeepDiff) -> list[tuple[list[Any], Any, Any]]:
    """Return ``(path, old, new)`` for every change in a tree-view diff, with ABSENT for a missing side.

    A list that gained or lost items is returned once, whole, in place of its per-index changes:
    ``failed_checks [] -> ["generation"]`` reads better than ``failed_checks[0] (absent) -> 'generation'``.
    """
    resized: dict[tuple[Any, ...], tuple[Any, Any]] = {}
    for report_type in ("iterable_item_added", "iterable_item_removed"):
        for level in diff.get(report_type, []):
            resized[tuple(level.up.path(output_format="list"))] = (level.up.t1, level.up.t2)

    changes = [(list(path), old, new) for path, (old, new) in resized.items()]
    for report_type, levels in diff.items():
        if report_type in ("iterable_item_added", "iterable_item_removed"):
            continue
        for level in levels:
            path = level.path(output_format="list")
            if any(tuple(path[:length]) in resized for length in range(1, len(path))):
                continue  # inside a list that is shown whole
            old = ABSENT if report_type.endswith("_added") else level.t1
            new = ABSENT if report_type.endswith("_removed") else level.t2
            changes.append((path, old, new))
    return changes


def _add_whole_fact(comparison: Comparison, key: str, old_entry: Any, new_entry: Any) -> None:
    """Record a fact present in one file only. An entry that changed type entirely counts as changed."""
    if old_entry is ABSENT:
        comparison.added[key] = _fact_summary(comparison.kind, new_entry)
    elif new_entry is ABSENT:
        comparison.removed[key] = _fact_summary(comparison.kind, old_entry)
    else:
        comparison.facts.setdefault(key, []).append(FieldChange("(entry)", old_entry, new_entry))


def _fact_summary(kind: str, entry: Any) -> dict[str, Any]:
    if kind == REPORT and isinstance(entry, dict) and "verdict" in entry:
        return {"verdict": entry["verdict"]}
    return {}


def _merged_versions(changes: list[FieldChange]) -> FieldChange:
    old = {change.field: change.old for change in changes}
    new = {change.field: change.new for change in changes}
    return FieldChange("versions", old, new)


def _dotted(path: Sequence[Any]) -> str:
    """Return a DeepDiff path list as ``result.top_logprobs[3]``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(root)"


# Output


def format_text(comparison: Comparison) -> str:
    """Render a comparison as lines for people: ``ID: FIELD OLD -> NEW``, then one summary line."""
    lines = [f"header: {_describe(change)}" for change in comparison.header]
    for key in sorted(comparison.facts.keys() | comparison.added.keys() | comparison.removed.keys()):
        if key in comparison.added:
            lines.append(f"{key}: added{_verdict_note(comparison.added[key])}")
        if key in comparison.removed:
            lines.append(f"{key}: removed{_verdict_note(comparison.removed[key])}")
        lines += [f"{key}: {_describe(change)}" for change in comparison.facts.get(key, [])]
    lines.append(_summary_line(comparison))
    return "\n".join(lines)


def _verdict_note(summary: dict[str, Any]) -> str:
    return f" (verdict {summary['verdict']})" if "verdict" in summary else ""


def _describe(change: FieldChange) -> str:
    if change.field == "versions" and isinstance(change.old, dict) and isinstance(change.new, dict):
        packages = [f"{name} {_show(change.old[name])} -> {_show(change.new[name])}" for name in sorted(change.old)]
        return "versions " + ", ".join(packages)
    if change.field == "verdict" and isinstance(change.old, str) and isinstance(change.new, str):
        return f"verdict {change.old} -> {change.new}"

    old, new = _show(change.old), _show(change.new)
    if old == new:
        # Two numbers that round to the same text but still differ by more than the tolerance.
        old, new = repr(change.old), repr(change.new)
    unit = " nats" if _is_in_nats(change.field) and _is_number(change.old, change.new) else ""
    return f"{change.field} {old} -> {new}{unit}"


def _is_in_nats(field_path: str) -> bool:
    """Tell whether a field contains log-probabilities or KL, which kinject stores in nats.

    Tolerances of those (``tolerance.kl``, ``tolerance.logprob_drop``) are in nats too, but
    ``tolerance.top_k_overlap`` is a fraction and ``tolerance.rank_change`` a number of places.
    """
    name = field_path.split(".")[-1].split("[")[0]
    return "logprob" in name or name == "kl" or name.endswith("_kl")


def _is_number(*values: Any) -> bool:
    return any(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values)


def _show(value: Any) -> str:
    if value is ABSENT:
        return "(absent)"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return repr(value)


def _summary_line(comparison: Comparison) -> str:
    tolerance = f"numbers compared to an absolute tolerance of {comparison.abs_tol:g}"
    if not comparison.changed:
        return f"no changes between {comparison.kind}s {comparison.old_path} and {comparison.new_path} ({tolerance})"
    counts = [
        f"{len(comparison.facts)} {_plural('fact', len(comparison.facts))} changed",
        f"{len(comparison.added)} added",
        f"{len(comparison.removed)} removed",
        f"{len(comparison.header)} header {_plural('field', len(comparison.header))} changed",
    ]
    return f"{', '.join(counts)} ({tolerance})"


def _plural(word: str, count: int) -> str:
    return word if count == 1 else word + "s"


def comparison_json(comparison: Comparison) -> dict[str, Any]:
    """Return a comparison as a JSON-ready dict. A value absent from one file has no ``old`` or ``new`` key.

    Infinite and NaN floats, which strict JSON lacks, are written as the strings ``"inf"``,
    ``"-inf"`` and ``"nan"``.
    """
    return {
        "kind": comparison.kind,
        "old": comparison.old_path,
        "new": comparison.new_path,
        "abs_tol": comparison.abs_tol,
        "changed": comparison.changed,
        "header": [change.to_json() for change in comparison.header],
        "facts": {key: [change.to_json() for change in changes] for key, changes in comparison.facts.items()},
        "added": [{"fact": key, **summary} for key, summary in comparison.added.items()],
        "removed": [{"fact": key, **summary} for key, summary in comparison.removed.items()],
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if value is ABSENT:
        return None  # a version entry that one snapshot lacks
    return value


# Command line


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid tolerance {text!r}: expected a number such as 1e-4") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"invalid tolerance {text!r}: expected a finite number of 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kinject",
        description="Tools for kinject report and snapshot files. Gating a model runs through pytest --kinject.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    diff = commands.add_parser(
        "diff",
        help="list what changed between two reports or two snapshots",
        description="List what changed between two JSON reports (--kinject-report FILE.json) or two snapshots "
                    "(__kinject__/*.json), fact by fact. Each line starts with the fact id, or with 'header:' "
                    "for fields outside the facts. Report run times are ignored.",
        epilog="Exit status: 0 when nothing changed beyond the tolerance, 1 when something changed, "
               "2 when a file cannot be read or the two files are not of the same kind.",
    )
    diff.add_argument("old", metavar="OLD", type=Path, help="the earlier report or snapshot")
    diff.add_argument("new", metavar="NEW", type=Path, help="the later report or snapshot, of the same kind")
    diff.add_argument("--abs-tol", metavar="NATS", type=_tolerance, default=DEFAULT_ABS_TOL,
                      help="absolute tolerance for every number; log-probabilities and KL are in nats, so this "
                           "is nats for them (default: %(default)g)")
    diff.add_argument("--json", action="store_true", help="print the changes as one JSON object instead of text")
    diff.add_argument("--candidate", metavar="NAME", default=None,
                      help="the candidate to compare in each report of several candidates (--kinject-each-adapter); "
                           "NAME is the bracketed name in its test ids")
    diff.add_argument("--old-candidate", metavar="NAME", default=None,
                      help="the candidate to compare in OLD when it is a report of several candidates; "
                           "overrides --candidate")
    diff.add_argument("--new-candidate", metavar="NAME", default=None,
                      help="the candidate to compare in NEW when it is a report of several candidates; "
                           "overrides --candidate")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kinject`` command and return its exit status."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR

    try:
        comparison = compare_files(arguments.old, arguments.new, arguments.abs_tol, candidate=arguments.candidate,
                                   old_candidate=arguments.old_candidate, new_candidate=arguments.new_candidate)
    except InputError as error:
        print(f"kinject diff: error: {error}", file=sys.stderr)
        return EXIT_ERROR

    if arguments.json:
        print(json.dumps(comparison_json(comparison), indent=2, ensure_ascii=False, allow_nan=False))
    else:
        print(format_text(comparison))
    return EXIT_CHANGED if comparison.changed else EXIT_UNCHANGED


if __name__ == "__main__":
    sys.exit(main())
