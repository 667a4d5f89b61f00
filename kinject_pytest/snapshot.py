"""The snapshot file: a base model's recorded results for one suite, and its safe writing.

A snapshot lives beside its suite, at ``<suite dir>/__kinject__/<suite name>.<model>.json``: JSON
with sorted keys, one entry per fact id. Its header records what made it (the model reference and
fingerprint, the scoring settings, library versions), so a later run can tell whether the entries
still describe the model it loads. Writes go to a temporary file in the same folder, then
``os.replace``, so a crash never leaves a half-written snapshot.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .edits import EditScores
from .engine import FactResult
from .files import write_text_atomically
from .suite import Fact, suite_name

SNAPSHOT_VERSION = 1
SNAPSHOT_FOLDER = "__kinject__"


class SnapshotError(Exception):
    """A snapshot that cannot be read or updated; the message is one line with the fix."""


@dataclass
class Snapshot:
    """Header plus entries; ``facts`` maps a fact id to its recorded fact fields and result."""

    path: Path
    model: dict[str, Any]
    settings: dict[str, Any]
    versions: dict[str, str]
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def result(self, fact_id: str) -> FactResult | None:
        entry = self.facts.get(fact_id)
        return FactResult.from_dict(entry["result"]) if entry else None

    def edit_scores(self, fact_id: str) -> EditScores | None:
        """Return the base's recorded scores of a taught fact, or None when its entry has none."""
        entry = self.facts.get(fact_id)
        return EditScores.from_dict(entry["teach"]) if entry and "teach" in entry else None

    def stale_fields(self, fact: Fact) -> list[str]:
        """Return the fact fields that changed since its entry was recorded."""
        recorded = self.facts[fact.id]["fact"]
        current = fact_fields(fact)
        return [name for name in current if recorded.get(name) != current[name]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kinject_snapshot_version": SNAPSHOT_VERSION,
            "model": self.model,
            "settings": self.settings,
            "versions": self.versions,
            "facts": self.facts,
        }


def fact_fields(fact: Fact) -> dict[str, Any]:
    """Return the fields of a fact that its recorded result depends on."""
    fields: dict[str, Any] = {"prompt": fact.prompt, "expect": list(fact.expect), "choices": list(fact.choices)}
    # Only taught facts get the key, so entries of other facts recorded before it existed stay current.
    if fact.teach is not None:
        fields["teach"] = {"answer": fact.teach.answer, "paraphrases": list(fact.teach.paraphrases)}
    return fields


def snapshot_path(suite_path: Path, model_slug: str, snapshot_dir: Path | None = None) -> Path:
    folder = snapshot_dir if snapshot_dir is not None else suite_path.parent / SNAPSHOT_FOLDER
    return folder / f"{suite_name(suite_path)}.{model_slug}.json"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("kinject-pytest", "torch", "transformers", "peft"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def read_snapshot(path: Path) -> Snapshot | None:
    """Return the snapshot at ``path``, or None when there is no file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise SnapshotError(f"{path}: cannot be read ({error.strerror or error}); check the snapshot folder "
                            "(--kinject-snapshot-dir)") from error
    except UnicodeDecodeError as error:
        raise SnapshotError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); delete the file and "
                            "re-record it with --kinject-update") from error

    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SnapshotError(
            f"{path}: invalid JSON ({error.msg}, line {error.lineno}); delete the file and re-record it "
            "with --kinject-update"
        ) from error

    version = data.get("kinject_snapshot_version") if isinstance(data, dict) else None
    if version != SNAPSHOT_VERSION:
        raise SnapshotError(
            f"{path}: snapshot format version {version!r} is not {SNAPSHOT_VERSION}, the one this kinject "
            "reads; re-record it with --kinject-update"
        )
    try:
        snapshot = Snapshot(path, data["model"], data["settings"], data["versions"], data["facts"])
    except KeyError as error:
        raise SnapshotError(f"{path}: missing key {error}; re-record it with --kinject-update") from error
    if not isinstance(snapshot.facts, dict) or not isinstance(snapshot.model, dict) \
            or not isinstance(snapshot.settings, dict):
        raise SnapshotError(f"{path}: 'facts', 'model' and 'settings' must be JSON objects; delete the file and "
                            "re-record it with --kinject-update")
    for fact_id, entry in snapshot.facts.items():
        problem = _entry_problem(entry)
        if problem:
            raise SnapshotError(f"{path}: entry {fact_id!r} is invalid ({problem}); delete the file and re-record "
                                "it with --kinject-update")
    return snapshot


_INTEGER_LISTS = ("completion_token_ids", "answer_token_counts", "choice_token_counts", "top_token_ids")
_NUMBER_LISTS = ("answer_logprobs", "choice_logprobs", "top_logprobs", "probe_logprobs")


def _entry_problem(entry: Any) -> str | None:
    """Return what is wrong with one snapshot entry, or None; hand-edited files end up here."""
    if not isinstance(entry, dict) or not isinstance(entry.get("fact"), dict) or not isinstance(entry.get("result"), dict):
        return "it needs a 'fact' and a 'result' object"
    result = entry["result"]
    missing = [name for name in (*_INTEGER_LISTS, *_NUMBER_LISTS[:3], "completion", "top_tokens") if name not in result]
    if missing:
        return "missing " + ", ".join(missing)
    for name in _INTEGER_LISTS:
        if not _list_of(result[name], int):
            return f"{name} must be a list of integers"
    for name in _NUMBER_LISTS:
        if not _list_of(result.get(name, []), (int, float)) or not all(math.isfinite(value) for value in result.get(name, [])):
            return f"{name} must be a list of finite numbers"
    if not isinstance(result["completion"], str) or not _list_of(result["top_tokens"], str):
        return "completion and top_tokens must be text"
    if not len(result["top_token_ids"]) == len(result["top_logprobs"]) == len(result["top_tokens"]):
        return "top_token_ids, top_tokens and top_logprobs differ in length"
    if len(result["answer_logprobs"]) != len(result["answer_token_counts"]) \
            or len(result["choice_logprobs"]) != len(result["choice_token_counts"]):
        return "log-probabilities and token counts differ in length"
    if "teach" in entry:
        try:
            EditScores.from_dict(entry["teach"])
        except ValueError as error:
            return str(error)
    return None


def _list_of(value: Any, kinds: type | tuple[type, ...]) -> bool:
    return isinstance(value, list) and all(isinstance(item, kinds) and not isinstance(item, bool) for item in value)


def write_snapshot(snapshot: Snapshot) -> None:
    """Write ``snapshot`` atomically, with sorted keys so diffs of the file stay small."""
    write_text_atomically(snapshot.path, dumps_readable(snapshot.to_dict()) + "\n")


def dumps_readable(value: Any, indent: str = "") -> str:
    """Return JSON with sorted keys, one key a line, and lists of numbers or strings on one line.

    Plain ``json.dumps(indent=2)`` puts every number of a top-k list on its own line, which makes
    a snapshot of a thousand facts about 80,000 lines long and its diffs hard to read.
    """
    if isinstance(value, dict):
        if not value:
            return "{}"
        inner = indent + "  "
        items = [f"{inner}{json.dumps(key, ensure_ascii=False)}: {dumps_readable(value[key], inner)}" for key in sorted(value)]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, (list, tuple)) and any(isinstance(element, (dict, list, tuple)) for element in value):
        inner = indent + "  "
        items = [inner + dumps_readable(element, inner) for element in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return json.dumps(value, ensure_ascii=False)


def updated_snapshot(
    existing: Snapshot | None,
    path: Path,
    *,
    model: dict[str, Any],
    settings: dict[str, Any],
    entries: dict[str, dict[str, Any]],
    suite_fact_ids: set[str] | None,
) -> Snapshot:
    """Return ``existing`` with ``entries`` replaced, keeping every other fact's entry.

    Entries made with another model fingerprint or other settings cannot sit in one file, so an
    update that would mix them must rewrite every entry. ``suite_fact_ids``, given when the whole
    suite was selected, drops entries of facts that are no longer in the suite.
    """
    if existing is None:
        return Snapshot(path, model, settings, library_versions(), dict(entries))

    kept = {fact_id: entry for fact_id, entry in existing.facts.items() if fact_id not in entries}
    if suite_fact_ids is not None:
        kept = {fact_id: entry for fact_id, entry in kept.items() if fact_id in suite_fact_ids}
    header_changed = _header_key(existing.model, existing.settings) != _header_key(model, settings) \
        or _state_changed(existing.model, model)
    if kept and header_changed:
        raise SnapshotError(
            f"{path}: recorded with another model or other settings, and {len(kept)} of its entries "
            "(e.g. " + ", ".join(sorted(kept)[:3]) + ") would not be re-recorded; run --kinject-update "
            "on the whole suite, without -k/-m/--lf, to record it afresh"
        )
    return Snapshot(path, model, settings, library_versions(), {**kept, **entries})


def _header_key(model: dict[str, Any], settings: dict[str, Any]) -> tuple[str, str]:
    fingerprint = model.get("fingerprint", {})
    identity = {name: fingerprint.get(name) for name in ("weights_sha256", "tokenizer_sha256")}
    # Batch size is left out: results do not depend on it (see the engine), the rest of the settings do.
    measured = {name: value for name, value in settings.items() if name != "batch_size"}
    return json.dumps(identity, sort_keys=True), json.dumps(measured, sort_keys=True)


def _state_changed(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    # Snapshots recorded before the in-memory hash existed have no state_sha256, and their entries
    # can be kept next to new ones when the weight files hash the same.
    before = recorded.get("fingerprint", {}).get("state_sha256")
    after = current.get("fingerprint", {}).get("state_sha256")
    return before is not None and after is not None and before != after
