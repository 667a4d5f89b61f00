"""Adapters as candidates: refusals and stacking, on the tiny random model."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import write_jsonl

FACTS = [
    {"id": "capital-france", "prompt": "The capital of France is", "expect": "Paris"},
    {"id": "capital-japan", "prompt": "The capital of Japan is", "expect": "Tokyo", "choices": ["Kyoto"]},
]


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.lines if line.startswith("ERROR:")]


@pytest.fixture
def recorded(pytester, tiny_llama):
    write_jsonl(pytester.path / "f.kinject.jsonl", FACTS)
    pytester.runpytest("--kinject", "--kinject-update", f"--kinject-model={tiny_llama}")
    return f"--kinject-model={tiny_llama}"


def untrained_lora(tiny_llama, folder):
    from peft import LoraConfig, get_peft_model

    from kinject_pytest.models import load_model

    base = load_model(str(tiny_llama), device="cpu").model
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(folder)
    return folder


def test_adapter_that_changes_nothing_is_rejected(pytester, tiny_llama, recorded, tmp_path):
    # PEFT initialises LoRA's B matrices to zero, so an untrained adapter is the identity.
    adapter = untrained_lora(tiny_llama, tmp_path / "untrained")

    result = pytester.runpytest("--kinject", recorded, f"--kinject-adapter={adapter}")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    lines = error_lines(result)
    assert len(lines) == 1
    assert lines[0].startswith(f"ERROR: the adapter {tiny_llama} + {adapter} gives the base's log-probabilities on "
                               "every selected fact (largest difference ")
    assert lines[0].endswith("check that it was trained and that its target_modules exist in the base model")


def test_adapter_with_missing_weights_is_rejected(pytester, tiny_lora, recorded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_lora, broken)
    weights = load_file(broken / "adapter_model.safetensors")
    kept = {name: tensor for index, (name, tensor) in enumerate(sorted(weights.items())) if index % 2}
    save_file(kept, broken / "adapter_model.safetensors")

    result = pytester.runpytest("--kinject", recorded, f"--kinject-adapter={broken}")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    lines = error_lines(result)
    assert len(lines) == 1
    assert lines[0].startswith(f"ERROR: adapter {broken} is missing weights that its adapter_config.json declares (")
    assert lines[0].endswith("re-save the adapter with PeftModel.save_pretrained()")


def test_trained_adapter_is_judged(pytester, tiny_lora, recorded):
    result = pytester.runpytest("--kinject", recorded, f"--kinject-adapter={tiny_lora}")

    # The random model completes neither fact, with or without the adapter.
    result.assert_outcomes(skipped=2)


def test_two_adapters_apply_together(tiny_llama, tiny_lora):
    from kinject_pytest.engine import Query, Scorer
    from kinject_pytest.models import attach_adapters, load_model

    query = [Query("f", "The capital of France is", ("Paris",))]
    one = attach_adapters(load_model(str(tiny_llama), device="cpu"), [str(tiny_lora)])
    two = attach_adapters(load_model(str(tiny_llama), device="cpu"), [str(tiny_lora), str(tiny_lora)])

    single = Scorer(one.model, one.tokenizer).score(query)["f"]
    double = Scorer(two.model, two.tokenizer).score(query)["f"]

    assert two.model.active_adapters == ["adapter_0", "adapter_1"]
    assert two.fingerprint.adapters == (one.fingerprint.adapters[0],) * 2
    assert single.answer_logprobs[0] != pytest.approx(double.answer_logprobs[0], abs=1e-4)
