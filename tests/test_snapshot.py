"""Snapshot files: round trip, partial updates, refusals, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kinject_pytest.engine import FactResult
from kinject_pytest.snapshot import (
    Snapshot,
    SnapshotError,
    read_snapshot,
    snapshot_path,
    updated_snapshot,
    write_snapshot,
)

MODEL = {"reference": "smollm2", "fingerprint": {"weights_sha256": "aa", "tokenizer_sha256": "bb"}}
SETTINGS = {"batch_size": 16, "top_k": 20, "extra_new_tokens": 3, "dtype": "float32", "device": "cpu"}


def entry(prompt: str, completion: str = " Paris.") -> dict:
    result = FactResult(completion, (1,), (-0.25,), (1,), (), (), (5, 6), ("x", "y"), (-0.25, -2.0))
    return {"fact": {"prompt": prompt, "expect": ["Paris"], "choices": []}, "result": result.to_dict()}


def test_snapshot_path_sits_beside_suite():
    path = snapshot_path(Path("suites/known_facts.kinject.jsonl"), "smollm2")

    assert path == Path("suites/__kinject__/known_facts.smollm2.json")


def test_round_trip_keeps_results(tmp_path):
    path = tmp_path / "s.json"
    write_snapshot(updated_snapshot(None, path, model=MODEL, settings=SETTINGS, entries={"a": entry("p")},
                                    suite_fact_ids=None))

    loaded = read_snapshot(path)

    assert loaded.model == MODEL
    assert loaded.settings == SETTINGS
    assert loaded.result("a").completion == " Paris."
    assert loaded.result("a").top_logprobs == (-0.25, -2.0)
    assert "torch" in loaded.versions


def test_update_keeps_entries_of_other_facts(tmp_path):
    path = tmp_path / "s.json"
    first = updated_snapshot(None, path, model=MODEL, settings=SETTINGS,
                             entries={"a": entry("pa"), "b": entry("pb")}, suite_fact_ids=None)
    write_snapshot(first)

    second = updated_snapshot(read_snapshot(path), path, model=MODEL, settings=SETTINGS,
                              entries={"a": entry("pa", " Lyon.")}, suite_fact_ids=None)

    assert second.result("a").completion == " Lyon."
    assert second.facts["b"] == first.facts["b"]


def test_whole_suite_update_drops_removed_facts(tmp_path):
    path = tmp_path / "s.json"
    first = updated_snapshot(None, path, model=MODEL, settings=SETTINGS,
                             entries={"a": entry("pa"), "gone": entry("pg")}, suite_fact_ids=None)

    second = updated_snapshot(first, path, model=MODEL, settings=SETTINGS, entries={"a": entry("pa")},
                              suite_fact_ids={"a"})

    assert sorted(second.facts) == ["a"]


def test_partial_update_from_other_model_is_rejected(tmp_path):
    path = tmp_path / "s.json"
    first = updated_snapshot(None, path, model=MODEL, settings=SETTINGS,
                             entries={"a": entry("pa"), "b": entry("pb")}, suite_fact_ids=None)
    other = {"reference": "smollm2", "fingerprint": {"weights_sha256": "cc", "tokenizer_sha256": "bb"}}

    with pytest.raises(SnapshotError, match=r"s\.json: recorded with another model .* without -k/-m/--lf"):
        updated_snapshot(first, path, model=other, settings=SETTINGS, entries={"a": entry("pa")}, suite_fact_ids=None)


def test_partial_update_with_other_tensor_hash_is_rejected(tmp_path):
    path = tmp_path / "s.json"
    hashed = {"reference": "smollm2", "fingerprint": {**MODEL["fingerprint"], "state_sha256": "dd"}}
    first = updated_snapshot(None, path, model=hashed, settings=SETTINGS,
                             entries={"a": entry("pa"), "b": entry("pb")}, suite_fact_ids=None)
    other = {"reference": "smollm2", "fingerprint": {**MODEL["fingerprint"], "state_sha256": "ee"}}

    with pytest.raises(SnapshotError, match=r"s\.json: recorded with another model"):
        updated_snapshot(first, path, model=other, settings=SETTINGS, entries={"a": entry("pa")}, suite_fact_ids=None)


def test_partial_update_adds_tensor_hash_to_old_snapshot(tmp_path):
    path = tmp_path / "s.json"
    first = updated_snapshot(None, path, model=MODEL, settings=SETTINGS,
                             entries={"a": entry("pa"), "b": entry("pb")}, suite_fact_ids=None)
    hashed = {"reference": "smollm2", "fingerprint": {**MODEL["fingerprint"], "state_sha256": "dd"}}

    second = updated_snapshot(first, path, model=hashed, settings=SETTINGS, entries={"a": entry("pa")},
                              suite_fact_ids=None)

    assert sorted(second.facts) == ["a", "b"]
    assert second.model["fingerprint"]["state_sha256"] == "dd"


def test_batch_size_change_allows_partial_update(tmp_path):
    path = tmp_path / "s.json"
    first = updated_snapshot(None, path, model=MODEL, settings=SETTINGS,
                             entries={"a": entry("pa"), "b": entry("pb")}, suite_fact_ids=None)

    second = updated_snapshot(first, path, model=MODEL, settings={**SETTINGS, "batch_size": 1},
                              entries={"a": entry("pa")}, suite_fact_ids=None)

    assert sorted(second.facts) == ["a", "b"]


def test_missing_file_reads_as_none(tmp_path):
    assert read_snapshot(tmp_path / "absent.json") is None


def test_corrupt_file_names_path_and_fix(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"facts": ')

    with pytest.raises(SnapshotError) as error:
        read_snapshot(path)

    message = str(error.value)
    assert str(path) in message
    assert "invalid JSON" in message
    assert "--kinject-update" in message
    assert "\n" not in message


def test_other_format_version_is_rejected(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"kinject_snapshot_version": 99, "facts": {}}))

    with pytest.raises(SnapshotError, match="format version 99"):
        read_snapshot(path)


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    snapshot = updated_snapshot(None, path, model=MODEL, settings=SETTINGS, entries={"a": entry("pa")},
                                suite_fact_ids=None)
    write_snapshot(snapshot)
    before = path.read_text()

    def broken_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    snapshot.facts["b"] = entry("pb")
    with pytest.raises(OSError):
        write_snapshot(snapshot)

    assert path.read_text() == before
    assert [child.name for child in tmp_path.iterdir()] == ["s.json"]


def test_file_has_sorted_keys_and_one_line_lists(tmp_path):
    path = tmp_path / "s.json"
    write_snapshot(updated_snapshot(None, path, model=MODEL, settings=SETTINGS,
                                    entries={"b": entry("pb"), "a": entry("pa")}, suite_fact_ids=None))
    text = path.read_text()

    assert text.index('"a"') < text.index('"b"')
    assert '"top_logprobs": [-0.25, -2.0]' in text


floats = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=50, deadline=None)
@given(
    completion=st.text(),
    logprobs=st.lists(floats, min_size=1, max_size=5),
    tokens=st.lists(st.text(), min_size=1, max_size=5),
)
def test_serialisation_round_trip_with_floats_and_unicode(tmp_path_factory, completion, logprobs, tokens):
    path = tmp_path_factory.mktemp("snap") / "s.json"
    result = FactResult(completion, (1,), tuple(logprobs), (1,) * len(logprobs), (), (),
                        tuple(range(len(tokens))), tuple(tokens), tuple(logprobs[:1] * len(tokens)))
    snapshot = Snapshot(path, MODEL, SETTINGS, {"python": "3"},
                        {"f": {"fact": {"prompt": completion, "expect": ["x"], "choices": []}, "result": result.to_dict()}})

    write_snapshot(snapshot)

    assert read_snapshot(path).result("f") == result


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda result: result.update(answer_logprobs=["x"]), "answer_logprobs must be a list of finite numbers"),
        (lambda result: result.update(answer_logprobs=[float("nan")]), "answer_logprobs must be a list of finite"),
        (lambda result: result.pop("top_logprobs"), "missing top_logprobs"),
        (lambda result: result.update(top_token_ids=None), "top_token_ids must be a list of integers"),
        (lambda result: result.update(top_logprobs=[-0.25]), "top_token_ids, top_tokens and top_logprobs differ"),
        (lambda result: result.update(completion=3), "completion and top_tokens must be text"),
    ],
)
def test_hand_edited_entry_is_rejected(tmp_path, edit, problem):
    path = tmp_path / "s.json"
    write_snapshot(updated_snapshot(None, path, model=MODEL, settings=SETTINGS, entries={"a": entry("pa")},
                                    suite_fact_ids=None))
    data = json.loads(path.read_text())
    edit(data["facts"]["a"]["result"])
    path.write_text(json.dumps(data))

    with pytest.raises(SnapshotError) as error:
        read_snapshot(path)

    message = str(error.value)
    assert message.startswith(f"{path}: entry 'a' is invalid (")
    assert problem in message
    assert message.endswith("delete the file and re-record it with --kinject-update")


def test_entry_without_result_is_rejected(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"kinject_snapshot_version": 1, "model": {}, "settings": {}, "versions": {},
                                "facts": {"a": {"fact": {}}}}))

    with pytest.raises(SnapshotError, match="entry 'a' is invalid \\(it needs a 'fact' and a 'result' object\\)"):
        read_snapshot(path)


def test_binary_file_is_rejected(tmp_path):
    path = tmp_path / "s.json"
    path.write_bytes(bytes(range(128, 256)))

    with pytest.raises(SnapshotError, match="not UTF-8 text"):
        read_snapshot(path)
