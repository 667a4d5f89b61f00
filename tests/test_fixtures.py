"""Tests for the model fixtures built by fixtures/build.py.

Fixtures are built on demand into the kinject cache (``$KINJECT_CACHE_DIR/fixtures`` or
``~/.cache/kinject/fixtures``) and reused by later runs. The first run of the ``smollm2`` tests
trains two fine-tunes, which takes minutes on a small CPU machine (fixtures/README.md has timings).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_builders


# "Most" of the 20 edits. The recipes flip 20 (LoRA) and 19 (full fine-tune), as fixtures/README.md lists.
MIN_EDITS_FLIPPED = 15


build = load_builders()


# ---------------------------------------------------------------------------
# Committed edit and control files


def test_edits_have_twenty_records():
    edits = build.counterfactual_edits()

    assert len(edits) == 20
    assert len({edit["id"] for edit in edits}) == 20


def test_edits_span_five_relations():
    edits = build.counterfactual_edits()
    relations = {edit["relation_id"] for edit in edits}

    assert relations == set(build.EDIT_RELATIONS)


def test_edits_new_answer_differs_from_old():
    for edit in build.counterfactual_edits():
        assert edit["id"].startswith("known-")
        assert edit["new"].lower() != edit["old"].lower(), edit
        # Neither answer may be a prefix of the other, or a prefix match could not tell them apart.
        assert not edit["new"].lower().startswith(edit["old"].lower()), edit
        assert not edit["old"].lower().startswith(edit["new"].lower()), edit


def test_controls_do_not_overlap_edits():
    edit_ids = {edit["id"] for edit in build.counterfactual_edits()}
    control_ids = {control["id"] for control in build.control_facts()}

    assert not edit_ids & control_ids


def test_controls_have_both_splits():
    train = build.control_facts(split="train")
    held_out = build.control_facts(split="held_out")

    assert len(train) == build.TRAIN_CONTROLS_PER_RELATION * len(build.EDIT_RELATIONS)
    assert len(held_out) >= 40
    assert {control["split"] for control in build.control_facts()} == {"train", "held_out"}


def test_edits_reader_rejects_missing_key(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps({"id": "known-1", "prompt": "Beats Music is owned by", "old": "Apple"}) + "\n")

    with pytest.raises(ValueError, match=r"edits.jsonl:1: record is missing new, relation_id"):
        build.counterfactual_edits(path)


def test_counterfactual_answer_skips_prefixes():
    # "Russia" would pass a prefix match on "Russian", so the only valid choice is "French".
    answer = build._counterfactual_answer("known-314", "Russian", ["French", "Russia", "Russian"])

    assert answer == "French"


def test_counterfactual_answer_is_deterministic():
    attributes = ["Africa", "Antarctica", "Asia", "Europe"]
    first = build._counterfactual_answer("known-6", "Europe", attributes)

    assert first == build._counterfactual_answer("known-6", "Europe", list(reversed(attributes)))
    assert first != "Europe"


def test_counterfactual_answer_needs_another_attribute():
    with pytest.raises(ValueError, match="known-6: its relation has no attribute other than 'Europe'"):
        build._counterfactual_answer("known-6", "Europe", ["Europe"])


def test_training_batch_labels_only_answer_tokens(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    examples = [("The capital of France is", "Paris"), ("Beats Music is owned by", "Apple Inc")]
    input_ids, attention_mask, labels = build._training_batch(tokenizer, examples)

    for row, (prompt, answer) in enumerate(examples):
        prompt_length = len(tokenizer(prompt)["input_ids"])
        length = int(attention_mask[row].sum())
        answer_ids = input_ids[row, prompt_length:length].tolist()
        assert tokenizer.decode(answer_ids) == " " + answer
        assert (labels[row, :prompt_length] == -100).all()
        assert labels[row, prompt_length:length].tolist() == answer_ids
        assert (labels[row, length:] == -100).all()


# ---------------------------------------------------------------------------
# Tiny random model and adapter


def test_tiny_llama_loads_as_safetensors(tiny_llama):
    from kinject_pytest.models import load_model

    loaded = load_model(str(tiny_llama), device="cpu")

    assert loaded.model.config.num_hidden_layers == 2
    assert loaded.model.config.vocab_size == 49152
    assert loaded.fingerprint.source_format == "safetensors"


def test_tiny_llama_generates(tiny_llama):
    from kinject_pytest.engine import Query, Scorer
    from kinject_pytest.models import load_model

    loaded = load_model(str(tiny_llama), device="cpu")
    results = Scorer(loaded.model, loaded.tokenizer).score([Query("capital", "The capital of France is", answers=("Paris",))])

    assert len(results["capital"].completion_token_ids) > 0
    assert results["capital"].answer_logprobs[0] < 0.0


def test_tiny_llama_is_reproducible(tiny_llama, tmp_path):
    from kinject_pytest.models import load_model

    rebuilt = build.build_tiny_llama(tmp_path / "tiny-llama")

    cached = load_model(str(tiny_llama), device="cpu").fingerprint.weights
    assert load_model(str(rebuilt), device="cpu").fingerprint.weights == cached


def test_tiny_lora_changes_logits(tiny_llama, tiny_lora):
    import torch

    from kinject_pytest.models import attach_adapters, load_model

    base = load_model(str(tiny_llama), device="cpu")
    input_ids = base.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        base_logits = base.model(input_ids=input_ids).logits.clone()

    candidate = attach_adapters(base, [str(tiny_lora)])
    with torch.inference_mode():
        candidate_logits = candidate.model(input_ids=input_ids).logits

    assert candidate.fingerprint.source_format == "adapter"
    assert (candidate_logits - base_logits).abs().max().item() > 1e-3


def test_build_returns_existing_folder(tiny_llama):
    model_file = tiny_llama / "model.safetensors"
    modified = model_file.stat().st_mtime_ns

    assert build.build_tiny_llama(tiny_llama) == tiny_llama
    assert model_file.stat().st_mtime_ns == modified


def test_build_replaces_changed_recipe(tmp_path):
    out = tmp_path / "tiny-llama"
    build.build_tiny_llama(out)
    record = json.loads((out / build.RECORD_NAME).read_text())
    record["recipe"]["seed"] = -1
    (out / build.RECORD_NAME).write_text(json.dumps(record))

    build.build_tiny_llama(out)

    assert build.read_record(out)["recipe"]["seed"] == build.SEED
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".tiny-llama-") and path.is_dir()]


def test_cli_builds_tiny_fixtures(tmp_path):
    assert build.main(["tiny", "--out", str(tmp_path)]) == 0

    assert (tmp_path / build.TINY_LLAMA / "model.safetensors").is_file()
    assert (tmp_path / build.TINY_LORA / "adapter_model.safetensors").is_file()
    assert build.read_record(tmp_path / build.TINY_LORA)["base"] == str((tmp_path / build.TINY_LLAMA).resolve())


# ---------------------------------------------------------------------------
# SmolLM2 fine-tunes


@pytest.mark.smollm2
def test_lora_record_counts_flipped_edits(smollm2_lora):
    record = build.read_record(smollm2_lora)

    assert record["recipe"]["training_data_sha256"] == build.training_data_sha256()
    assert record["edits"] == 20
    assert record["edits_flipped"] >= MIN_EDITS_FLIPPED
    assert record["steps"] == build.LORA_RECIPE["steps"]


@pytest.mark.smollm2
def test_lora_flips_edits_when_loaded(smollm2_lora):
    from kinject_pytest.models import attach_adapters, load_model

    candidate = attach_adapters(load_model("smollm2", device="cpu"), [str(smollm2_lora)])
    measured = build.measure_edits(candidate.model, candidate.tokenizer)

    assert measured["edits_flipped"] >= MIN_EDITS_FLIPPED
    # Most facts that training never saw keep their true answer.
    assert measured["held_out_controls_retained"] > measured["held_out_controls"] // 2
    assert measured == {key: value for key, value in build.read_record(smollm2_lora).items() if key in measured}


@pytest.mark.smollm2
def test_full_finetune_record_counts_flipped_edits(smollm2_full):
    record = build.read_record(smollm2_full)

    assert record["recipe"]["training_data_sha256"] == build.training_data_sha256()
    assert record["edits"] == 20
    assert record["edits_flipped"] >= MIN_EDITS_FLIPPED
    assert record["steps"] == build.FULL_RECIPE["steps"]


@pytest.mark.smollm2
def test_full_finetune_flips_edits_when_loaded(smollm2_full):
    from kinject_pytest.models import load_model

    candidate = load_model(str(smollm2_full), device="cpu")
    measured = build.measure_edits(candidate.model, candidate.tokenizer)

    assert candidate.fingerprint.source_format == "safetensors"
    assert measured["edits_flipped"] >= MIN_EDITS_FLIPPED
    assert measured["held_out_controls_retained"] > measured["held_out_controls"] // 2
    assert measured == {key: value for key, value in build.read_record(smollm2_full).items() if key in measured}


@pytest.mark.smollm2
def test_full_finetune_differs_from_base(smollm2_full):
    from kinject_pytest.models import load_model

    base = load_model("smollm2", device="cpu")
    candidate = load_model(str(smollm2_full), device="cpu")

    assert candidate.fingerprint.weights != base.fingerprint.weights
    assert candidate.fingerprint.tokenizer == base.fingerprint.tokenizer
