"""Refusals from fingerprints: a base changed in memory, and an adapter trained on another base."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from kinject_pytest.models import ModelError, attach_adapters, check_unmodified, hash_state_dict, load_model
from kinject_pytest.session import KinjectSession, KinjectUsageError, Options
from kinject_pytest.suite import load_suite

FACTS = [
    {"id": "capital-france", "prompt": "The capital of France is", "expect": "Paris"},
    {"id": "capital-japan", "prompt": "The capital of Japan is", "expect": "Tokyo", "choices": ["Kyoto"]},
]


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.lines if line.startswith("ERROR:")]


def nudge_first_weight(model) -> None:
    """Change one weight of a transformers model in place by one float32 ulp or more."""
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(float("inf"), dtype=weight.dtype))


def recorded_session(tmp_path: Path, model: str) -> tuple[Options, list]:
    """Record FACTS for ``model`` into tmp_path and return the options and facts to judge them again."""
    suite = write_jsonl(tmp_path / "f.kinject.jsonl", FACTS)
    facts = list(load_suite(suite).facts)
    options = Options(model=model, device="cpu", snapshot_dir=tmp_path / "snapshots")
    KinjectSession(dataclasses.replace(options, update=True)).run(facts)
    return options, facts


def with_adapter_base(adapter: Path, folder: Path, named: str | None) -> Path:
    """Copy ``adapter`` to ``folder`` with ``base_model_name_or_path`` set to ``named``."""
    shutil.copytree(adapter, folder)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = named
    config_path.write_text(json.dumps(config))
    return folder


# In-memory hash


def test_state_hash_is_stable_across_loads(tiny_llama):
    first = load_model(str(tiny_llama), device="cpu")
    second = load_model(str(tiny_llama), device="cpu")

    assert first.fingerprint.state == second.fingerprint.state
    assert hash_state_dict(first.model) == first.fingerprint.state


def test_state_hash_sees_one_ulp(tiny_llama):
    loaded = load_model(str(tiny_llama), device="cpu")

    nudge_first_weight(loaded.model)

    assert hash_state_dict(loaded.model) != loaded.fingerprint.state
    with pytest.raises(ModelError, match=rf"^base model {tiny_llama} was changed in memory after loading \("):
        check_unmodified(loaded)


def test_state_hash_depends_on_dtype(tiny_llama):
    float32 = load_model(str(tiny_llama), device="cpu")
    bfloat16 = load_model(str(tiny_llama), device="cpu", dtype="bfloat16")

    assert float32.fingerprint.weights == bfloat16.fingerprint.weights
    assert float32.fingerprint.state != bfloat16.fingerprint.state


def test_state_hash_is_recorded_in_snapshot(tmp_path, tiny_llama):
    recorded_session(tmp_path, str(tiny_llama))

    header = json.loads((tmp_path / "snapshots" / f"f.{tiny_llama.name}.json").read_text())["model"]
    loaded = load_model(str(tiny_llama), device="cpu")
    assert header["fingerprint"]["state_sha256"] == loaded.fingerprint.state


def test_base_changed_after_loading_is_rejected(tmp_path, tiny_llama):
    options, facts = recorded_session(tmp_path, str(tiny_llama))
    session = KinjectSession(options)
    nudge_first_weight(session._base_model().model)

    with pytest.raises(KinjectUsageError) as caught:
        session.run(facts)

    message = str(caught.value)
    snapshot = tmp_path / "snapshots" / f"f.{tiny_llama.name}.json"
    assert message.startswith(f"{snapshot}: base model {tiny_llama} was changed in memory after loading (")
    assert message.endswith("edit or merge a copy (copy.deepcopy) or load the base again")
    assert "\n" not in message


def test_base_differing_from_recorded_state_is_rejected(tmp_path, tiny_llama):
    options, facts = recorded_session(tmp_path, str(tiny_llama))
    snapshot = tmp_path / "snapshots" / f"f.{tiny_llama.name}.json"
    data = json.loads(snapshot.read_text())
    data["model"]["fingerprint"]["state_sha256"] = "0" * 64
    snapshot.write_text(json.dumps(data))

    with pytest.raises(KinjectUsageError) as caught:
        KinjectSession(options).run(facts)

    message = str(caught.value)
    assert message.startswith(f"{snapshot}: the base {tiny_llama} in memory differs from the one the snapshot "
                              "was recorded from although its weight files hash the same (tensor sha256 000000000000 ")
    assert message.endswith(f"re-record the snapshot with: pytest --kinject --kinject-update --kinject-model={tiny_llama} "
                            f"--kinject-snapshot-dir={tmp_path / 'snapshots'} {tmp_path / 'f.kinject.jsonl'}")


def test_snapshot_without_state_hash_is_judged(tmp_path, tiny_llama):
    options, facts = recorded_session(tmp_path, str(tiny_llama))
    snapshot = tmp_path / "snapshots" / f"f.{tiny_llama.name}.json"
    data = json.loads(snapshot.read_text())
    del data["model"]["fingerprint"]["state_sha256"]
    snapshot.write_text(json.dumps(data))

    outcomes = KinjectSession(options).run(facts)

    assert [outcome.error for outcome in outcomes.values()] == [None, None]
    assert all(outcome.verdict is not None for outcome in outcomes.values())


def test_recorded_state_is_ignored_in_other_dtype(tmp_path, tiny_llama):
    options, facts = recorded_session(tmp_path, str(tiny_llama))

    with pytest.warns(UserWarning, match="recorded with dtype float32, the candidate runs in bfloat16"):
        outcomes = KinjectSession(dataclasses.replace(options, dtype="bfloat16")).run(facts)

    assert all(outcome.verdict is not None for outcome in outcomes.values())


def test_adapter_on_changed_base_is_rejected(tiny_llama, tiny_lora):
    base = load_model(str(tiny_llama), device="cpu")
    nudge_first_weight(base.model)

    with pytest.raises(ModelError, match=rf"^base model {tiny_llama} was changed in memory after loading"):
        attach_adapters(base, [str(tiny_lora)])


def test_adapter_on_base_with_adapter_is_rejected(tiny_llama, tiny_lora):
    # PEFT injects its layers into the base in place, so the same base cannot host a second attach.
    base = load_model(str(tiny_llama), device="cpu")
    attach_adapters(base, [str(tiny_lora)])

    with pytest.raises(ModelError, match="was changed in memory after loading"):
        attach_adapters(base, [str(tiny_lora)])


FIXTURE_AFTER_EDIT = """
import torch


def test_edit_session_base(request):
    plugin = request.config.pluginmanager.get_plugin("kinject-session")
    weight = plugin.session._base_model().model.get_input_embeddings().weight
    with torch.no_grad():
        weight[0, 0] += 1.0


def test_fixture_after_edit(kinject):
    kinject.base.complete("The capital of France is")
"""


def test_fixture_rejects_changed_session_base(pytester, tiny_llama):
    write_jsonl(pytester.path / "f.kinject.jsonl", FACTS)
    model = f"--kinject-model={tiny_llama}"
    pytester.runpytest("--kinject", "--kinject-update", model)
    pytester.makepyfile(test_after_edit=FIXTURE_AFTER_EDIT)

    result = pytester.runpytest("--kinject", model)

    result.assert_outcomes(passed=1, skipped=2, failed=1)
    result.stdout.fnmatch_lines([f"*kinject fixture: base model {tiny_llama} was changed in memory after loading (*"])


@pytest.mark.smollm2
@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft 0.21 on transformers 5
def test_smollm2_changed_after_loading_is_rejected(tmp_path, smollm2_dir):
    options, facts = recorded_session(tmp_path, "smollm2")
    session = KinjectSession(options)
    base = session._base_model()
    # What a user's code does when it merges an adapter into the base it got from kinject.
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(base.model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.merge_and_unload()

    with pytest.raises(KinjectUsageError, match=r"snapshots/f\.smollm2\.json: base model smollm2 was changed in memory"):
        session.run(facts)


@pytest.mark.smollm2
def test_smollm2_unchanged_base_is_judged(tmp_path, smollm2_dir):
    options, facts = recorded_session(tmp_path, "smollm2")

    outcomes = KinjectSession(options).run(facts)

    assert [outcome.verdict.status for outcome in outcomes.values()] == ["retained", "retained"]


# An adapter's base_model_name_or_path


def test_adapter_naming_other_hub_model_is_rejected(tmp_path, tiny_llama, tiny_lora):
    adapter = with_adapter_base(tiny_lora, tmp_path / "adapter", "HuggingFaceTB/SmolLM2-135M")

    with pytest.raises(ModelError) as caught:
        attach_adapters(load_model(str(tiny_llama), device="cpu"), [str(adapter)])

    message = str(caught.value)
    assert message.startswith(f"{adapter / 'adapter_config.json'}: base_model_name_or_path 'HuggingFaceTB/SmolLM2-135M' "
                              f"names another model than the base {tiny_llama} (known as tiny-llama); ")
    assert message.endswith(f"set base_model_name_or_path in {adapter / 'adapter_config.json'} to '{tiny_llama}' or null")


def test_adapter_naming_other_local_model_is_rejected(tmp_path, tiny_llama, tiny_lora):
    other = tmp_path / "other-model"
    loaded = load_model(str(tiny_llama), device="cpu")
    nudge_first_weight(loaded.model)
    loaded.model.save_pretrained(other)
    adapter = with_adapter_base(tiny_lora, tmp_path / "adapter", str(other))

    with pytest.raises(ModelError, match=rf"base_model_name_or_path {other} contains other weights than the base "):
        attach_adapters(load_model(str(tiny_llama), device="cpu"), [str(adapter)])


@pytest.mark.parametrize("named", ["someone/tiny-llama", "/data/elsewhere/tiny-llama/", "", None])
def test_adapter_naming_same_or_no_base_is_attached(tmp_path, tiny_llama, tiny_lora, named):
    adapter = with_adapter_base(tiny_lora, tmp_path / "adapter", named)

    attached = attach_adapters(load_model(str(tiny_llama), device="cpu"), [str(adapter)])

    assert attached.adapters == (str(adapter),)


def test_adapter_naming_local_copy_is_attached(tmp_path, tiny_llama, tiny_lora):
    # Trained on a copy of the base under another folder name: the weight files decide.
    copy = shutil.copytree(tiny_llama, tmp_path / "my-base")
    adapter = with_adapter_base(tiny_lora, tmp_path / "adapter", str(copy))

    attached = attach_adapters(load_model(str(tiny_llama), device="cpu"), [str(adapter)])

    assert attached.adapters == (str(adapter),)


def test_adapter_naming_other_base_is_usage_error(pytester, tiny_llama, tiny_lora, tmp_path):
    write_jsonl(pytester.path / "f.kinject.jsonl", FACTS)
    model = f"--kinject-model={tiny_llama}"
    pytester.runpytest("--kinject", "--kinject-update", model)
    adapter = with_adapter_base(tiny_lora, tmp_path / "adapter", "HuggingFaceTB/SmolLM2-135M")

    result = pytester.runpytest("--kinject", model, f"--kinject-adapter={adapter}")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    lines = error_lines(result)
    assert len(lines) == 1
    assert lines[0].startswith(f"ERROR: {adapter / 'adapter_config.json'}: base_model_name_or_path ")


@pytest.mark.smollm2
@pytest.mark.parametrize("named", ["HuggingFaceTB/SmolLM2-135M-Instruct", None])
def test_smollm2_adapter_naming_hub_id_is_attached(tmp_path, smollm2_lora, named):
    adapter = with_adapter_base(smollm2_lora, tmp_path / "adapter", named)

    attached = attach_adapters(load_model("smollm2", device="cpu"), [str(adapter)])

    assert attached.adapters == (str(adapter),)


@pytest.mark.smollm2
def test_smollm2_adapter_for_base_variant_is_rejected(tmp_path, smollm2_lora):
    # SmolLM2-135M and SmolLM2-135M-Instruct have the same shapes, so only the name tells them apart.
    adapter = with_adapter_base(smollm2_lora, tmp_path / "adapter", "HuggingFaceTB/SmolLM2-135M")

    with pytest.raises(ModelError, match=r"names another model than the base smollm2 \(known as smollm2, "
                                         r"smollm2-135m-instruct\)"):
        attach_adapters(load_model("smollm2", device="cpu"), [str(adapter)])
