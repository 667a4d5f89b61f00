"""Another dtype or device than the snapshot's: a warning and wider tolerances; merged against unmerged LoRA."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest

from conftest import REPO, write_jsonl
from kinject_pytest.engine import Query, Scorer
from kinject_pytest.models import attach_adapters, load_model
from kinject_pytest.session import (
    DEVICE_WIDENING,
    DTYPE_WIDENING,
    NO_WIDENING,
    KinjectSession,
    KinjectWarning,
    Options,
    dtype_widening,
    widen,
)
from kinject_pytest.suite import Tolerance, load_suite
from kinject_pytest.verdict import DEFAULT_TOLERANCE

FACTS = [
    {"id": "capital-france", "prompt": "The capital of France is", "expect": "Paris"},
    {"id": "capital-japan", "prompt": "The capital of Japan is", "expect": "Tokyo", "choices": ["Kyoto"],
     "tolerance": {"kl": 0.2}},
]

# The smallest amount any dtype or device change adds, in nats. Merging a LoRA adapter into the
# weights must move log-probabilities by far less, or a merged checkpoint would not pass where
# its adapter does.
SMALLEST_WIDENING = min(min(amount.kl, amount.logprob_drop) for amount in (*DTYPE_WIDENING.values(), DEVICE_WIDENING))


def merge_adapter(base_reference: str, adapter: Path, target: Path) -> Path:
    """Merge ``adapter`` into a fresh copy of the base and save it as a full checkpoint."""
    from peft import PeftModel

    base = load_model(base_reference, device="cpu")
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 method that is deprecated.
        warnings.simplefilter("ignore", FutureWarning)
        merged = PeftModel.from_pretrained(base.model, str(adapter)).merge_and_unload()
    merged.save_pretrained(target)
    base.tokenizer.save_pretrained(target)
    return target


def largest_logprob_difference(first, second) -> float:
    pairs = []
    for key, result in first.items():
        other = second[key]
        pairs += zip(result.answer_logprobs + result.choice_logprobs + result.top_logprobs,
                     other.answer_logprobs + other.choice_logprobs + other.top_logprobs)
    return max(abs(a - b) for a, b in pairs)


def test_dtype_widening_takes_lower_precision():
    assert dtype_widening("float32", "float32") == NO_WIDENING
    assert dtype_widening("float32", "bfloat16") == DTYPE_WIDENING["bfloat16"]
    assert dtype_widening("bfloat16", "float32") == DTYPE_WIDENING["bfloat16"]
    assert dtype_widening("float16", "bfloat16") == Tolerance(
        kl=max(DTYPE_WIDENING["float16"].kl, DTYPE_WIDENING["bfloat16"].kl),
        logprob_drop=max(DTYPE_WIDENING["float16"].logprob_drop, DTYPE_WIDENING["bfloat16"].logprob_drop),
    )


def test_widen_adds_to_set_limits_only():
    widened = widen(Tolerance(kl=0.2, logprob_drop=None), Tolerance(kl=0.05, logprob_drop=0.3))

    assert widened.kl == pytest.approx(0.25)
    assert widened.logprob_drop is None


def test_other_dtype_warns_and_widens_each_fact(tmp_path, tiny_llama):
    suite = write_jsonl(tmp_path / "f.kinject.jsonl", FACTS)
    facts = list(load_suite(suite).facts)
    options = Options(model=str(tiny_llama), device="cpu", snapshot_dir=tmp_path / "snapshots")
    KinjectSession(dataclasses.replace(options, update=True)).run(facts)
    amount = DTYPE_WIDENING["bfloat16"]

    with pytest.warns(KinjectWarning) as caught:
        outcomes = KinjectSession(dataclasses.replace(options, dtype="bfloat16")).run(facts)

    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1
    assert "recorded with dtype float32, the candidate runs in bfloat16; each fact's tolerance is widened by " \
           f"{amount.kl:g} nats of KL and {amount.logprob_drop:g} nats of log-probability drop" in messages[0]
    france, japan = (outcomes[f"{suite}::{fact.id}"].verdict.tolerance for fact in facts)
    assert france.kl == pytest.approx(DEFAULT_TOLERANCE.kl + amount.kl)
    assert france.logprob_drop == pytest.approx(DEFAULT_TOLERANCE.logprob_drop + amount.logprob_drop)
    assert japan.kl == pytest.approx(0.2 + amount.kl)


def test_same_dtype_and_device_keeps_tolerance(tmp_path, tiny_llama, recwarn):
    suite = write_jsonl(tmp_path / "f.kinject.jsonl", FACTS)
    facts = list(load_suite(suite).facts)
    options = Options(model=str(tiny_llama), device="cpu", snapshot_dir=tmp_path / "snapshots")
    KinjectSession(dataclasses.replace(options, update=True)).run(facts)

    outcomes = KinjectSession(options).run(facts)

    assert outcomes[f"{suite}::capital-france"].verdict.tolerance == DEFAULT_TOLERANCE
    assert not [warning for warning in recwarn if issubclass(warning.category, KinjectWarning)]


def test_widened_tolerance_reaches_json_report(pytester, tiny_llama):
    write_jsonl(pytester.path / "f.kinject.jsonl", FACTS)
    model = f"--kinject-model={tiny_llama}"
    pytester.runpytest("--kinject", "--kinject-update", model)

    pytester.runpytest("--kinject", model, "--kinject-dtype=bfloat16", "--kinject-report=report.json")

    facts = {entry["id"]: entry for entry in json.loads((pytester.path / "report.json").read_text())["facts"]}
    amount = DTYPE_WIDENING["bfloat16"]
    assert facts["capital-japan"]["tolerance"]["kl"] == pytest.approx(0.2 + amount.kl)
    assert facts["capital-france"]["tolerance"]["logprob_drop"] == pytest.approx(DEFAULT_TOLERANCE.logprob_drop
                                                                                 + amount.logprob_drop)


def test_tiny_merged_lora_matches_unmerged(tmp_path, tiny_llama, tiny_lora):
    merged = load_model(str(merge_adapter(str(tiny_llama), tiny_lora, tmp_path / "merged")), device="cpu")
    unmerged = attach_adapters(load_model(str(tiny_llama), device="cpu"), [str(tiny_lora)])
    queries = [Query(fact["id"], fact["prompt"], (fact["expect"],), tuple(fact.get("choices", ()))) for fact in FACTS]

    merged_results = Scorer(merged.model, merged.tokenizer).score(queries)
    unmerged_results = Scorer(unmerged.model, unmerged.tokenizer).score(queries)

    assert largest_logprob_difference(merged_results, unmerged_results) < SMALLEST_WIDENING / 100
    assert [merged_results[query.key].completion for query in queries] == \
           [unmerged_results[query.key].completion for query in queries]


@pytest.mark.smollm2
def test_smollm2_merged_lora_gives_same_verdicts(pytester, tmp_path, smollm2_lora):
    # The first 64 facts of the shipped suite, and the counterfactual edits the adapter was trained on,
    # so the slice has retained, regressed and unknown facts.
    lines = (REPO / "suites" / "known_facts.kinject.jsonl").read_text().splitlines()
    records = [record for record in map(json.loads, lines) if "id" in record][:64]
    edits = [json.loads(line) for line in (REPO / "fixtures" / "counterfactual_edits.jsonl").read_text().splitlines()[:16]]
    write_jsonl(pytester.path / "slice.kinject.jsonl", records + [
        {"id": f"edit-{index}", "prompt": edit["prompt"], "expect": edit["old"]} for index, edit in enumerate(edits)])
    merged = merge_adapter("smollm2", smollm2_lora, tmp_path / "merged")
    common = ["--kinject", "--kinject-device=cpu", "-p", "no:cacheprovider"]
    pytester.runpytest(*common, "--kinject-update")

    pytester.runpytest(*common, f"--kinject-adapter={smollm2_lora}", "--kinject-report=adapter.json")
    pytester.runpytest(*common, f"--kinject-candidate={merged}", "--kinject-report=merged.json")

    adapter_facts = {entry["id"]: entry for entry in json.loads((pytester.path / "adapter.json").read_text())["facts"]}
    merged_facts = {entry["id"]: entry for entry in json.loads((pytester.path / "merged.json").read_text())["facts"]}
    assert len(adapter_facts) == 64 + len(edits)
    assert {key: entry["verdict"] for key, entry in merged_facts.items()} == \
           {key: entry["verdict"] for key, entry in adapter_facts.items()}
    assert "regressed" in {entry["verdict"] for entry in adapter_facts.values()}
    logprob_difference = max(abs(merged_facts[key]["candidate_logprob"] - entry["candidate_logprob"])
                             for key, entry in adapter_facts.items())
    kl_difference = max(abs(merged_facts[key]["kl"] - entry["kl"]) for key, entry in adapter_facts.items())
    # Measured on 2026-12-04 (CPU, float32): 4.3e-5 nats of log-probability and 1.9e-5 nats of KL.
    assert logprob_difference < SMALLEST_WIDENING / 10
    assert kl_difference < SMALLEST_WIDENING / 10
