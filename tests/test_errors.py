"""Every user mistake ends in one line that names the file, fact or option and the fix."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from conftest import write_jsonl

MINIMAL = [{"id": "capital-france", "prompt": "The capital of France is", "expect": "Paris"}]


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.lines if line.startswith("ERROR:")]


def test_malformed_suite_is_one_line_collection_error(pytester):
    (pytester.path / "bad.kinject.jsonl").write_text('{"id": "a", "prompt": "p", "expect": "x"}\n{"id": "b", "prompt": \n')

    result = pytester.runpytest("--kinject")

    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*bad.kinject.jsonl:2: invalid JSON*"])
    assert "Traceback" not in result.stdout.str()


def test_suite_files_are_ignored_without_kinject(pytester):
    (pytester.path / "bad.kinject.jsonl").write_text("not json\n")

    result = pytester.runpytest()

    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED


def test_missing_model_folder_is_usage_error(pytester):
    write_jsonl(pytester.path / "f.kinject.jsonl", MINIMAL)
    (pytester.path / "__kinject__").mkdir()

    result = pytester.runpytest("--kinject", "--kinject-update", "--kinject-model=./no/such/model")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert error_lines(result) == [
        "ERROR: model ./no/such/model not found: it is not a folder, a .gguf file or a hub id; "
        "check the path given to --kinject-model / --kinject-candidate"
    ]
    assert not list((pytester.path / "__kinject__").iterdir())


def test_folder_without_config_is_usage_error(pytester):
    write_jsonl(pytester.path / "f.kinject.jsonl", MINIMAL)
    (pytester.path / "empty").mkdir()

    result = pytester.runpytest("--kinject", "--kinject-update", "--kinject-model=empty")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert error_lines(result)[0].startswith("ERROR: model folder empty has no config.json; pass a folder written by")


def test_missing_gguf_file_is_usage_error(pytester):
    write_jsonl(pytester.path / "f.kinject.jsonl", MINIMAL)

    result = pytester.runpytest("--kinject", "--kinject-update", "--kinject-model=weights.gguf")

    assert error_lines(result) == ["ERROR: model file weights.gguf not found; pass an existing .gguf file"]


def test_candidate_with_adapter_is_usage_error(pytester):
    write_jsonl(pytester.path / "f.kinject.jsonl", MINIMAL)

    result = pytester.runpytest("--kinject", "--kinject-candidate=a", "--kinject-adapter=b")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--kinject-candidate and --kinject-adapter cannot be combined" in error_lines(result)[0]


def test_invalid_ini_value_is_usage_error(pytester):
    write_jsonl(pytester.path / "f.kinject.jsonl", MINIMAL)
    pytester.makeini("[pytest]\nkinject_batch_size = many\n")

    result = pytester.runpytest("--kinject")

    assert error_lines(result) == ["ERROR: ini key kinject_batch_size = 'many' is invalid; expected an integer"]


def test_corrupt_snapshot_is_usage_error(pytester, tiny_llama):
    write_jsonl(pytester.path / "f.kinject.jsonl", MINIMAL)
    snapshot = pytester.path / "__kinject__" / f"f.{tiny_llama.name}.json"
    snapshot.parent.mkdir()
    snapshot.write_text("{")

    result = pytester.runpytest("--kinject", f"--kinject-model={tiny_llama}")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert error_lines(result)[0].startswith(f"ERROR: {snapshot}: invalid JSON")
    assert error_lines(result)[0].endswith("re-record it with --kinject-update")


@pytest.fixture
def tiny_snapshot(pytester, tiny_llama):
    write_jsonl(pytester.path / "f.kinject.jsonl", MINIMAL)
    pytester.runpytest("--kinject", "--kinject-update", f"--kinject-model={tiny_llama}")
    return pytester.path / "__kinject__" / f"f.{tiny_llama.name}.json"


def test_missing_adapter_folder_is_usage_error(pytester, tiny_llama, tiny_snapshot):
    result = pytester.runpytest("--kinject", f"--kinject-model={tiny_llama}", "--kinject-adapter=nowhere")

    assert error_lines(result) == [
        "ERROR: adapter folder nowhere not found; pass the folder written by PeftModel.save_pretrained()"
    ]


def test_folder_without_adapter_config_is_usage_error(pytester, tiny_llama, tiny_snapshot):
    result = pytester.runpytest("--kinject", f"--kinject-model={tiny_llama}", f"--kinject-adapter={tiny_llama}")

    assert error_lines(result)[0].startswith(f"ERROR: adapter folder {tiny_llama} has no adapter_config.json")


def test_tiny_adapter_changes_tiny_model(pytester, tiny_llama, tiny_lora, tiny_snapshot):
    result = pytester.runpytest("--kinject", f"--kinject-model={tiny_llama}", f"--kinject-adapter={tiny_lora}",
                                "--kinject-max-kl=0", "-rs")

    # The random model completes no fact correctly, so the fact is unknown to both and skipped.
    result.assert_outcomes(skipped=1)
    assert json.loads(tiny_snapshot.read_text())["model"]["fingerprint"]["source_format"] == "safetensors"


@pytest.mark.smollm2
def test_adapter_for_other_base_is_usage_error(pytester, smollm2_dir, tiny_lora, tmp_path):
    write_jsonl(pytester.path / "f.kinject.jsonl", MINIMAL)
    pytester.runpytest("--kinject", "--kinject-update")
    # Without a recorded base model name, only the weight shapes show the mismatch.
    adapter = shutil.copytree(tiny_lora, tmp_path / "unnamed-base")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    result = pytester.runpytest("--kinject", f"--kinject-adapter={adapter}")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    lines = error_lines(result)
    assert len(lines) == 1
    assert lines[0].startswith(f"ERROR: adapter {adapter} does not fit base model smollm2 (")
    assert lines[0].endswith("pass the base it was trained on with --kinject-model")


@pytest.mark.smollm2
def test_candidate_with_other_tokenizer_is_usage_error(pytester, smollm2_dir, tiny_llama, tmp_path):
    write_jsonl(pytester.path / "f.kinject.jsonl", MINIMAL)
    pytester.runpytest("--kinject", "--kinject-update")
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_llama, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<kinject-extra>"]})
    tokenizer.save_pretrained(other)

    result = pytester.runpytest("--kinject", f"--kinject-candidate={other}")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "uses another tokenizer than the base" in error_lines(result)[0]


def test_collect_only_does_not_import_torch(pytester):
    write_jsonl(pytester.path / "f.kinject.jsonl", MINIMAL)
    pytester.makeconftest(
        "import sys\n"
        "def pytest_collection_finish(session):\n"
        "    print('torch imported:', 'torch' in sys.modules)\n"
    )

    result = pytester.runpytest_subprocess("--kinject", "--co", "-s")

    result.stdout.fnmatch_lines(["*<FactItem capital-france>*", "torch imported: False"])


def test_adapter_without_weight_file_is_usage_error(pytester, tiny_llama, tiny_lora, tiny_snapshot, tmp_path):
    adapter = shutil.copytree(tiny_lora, tmp_path / "no-weights")
    for weights in adapter.glob("adapter_model.*"):
        weights.unlink()

    result = pytester.runpytest("--kinject", f"--kinject-model={tiny_llama}", f"--kinject-adapter={adapter}")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert error_lines(result) == [
        f"ERROR: adapter folder {adapter} has no adapter_model.safetensors or adapter_model.bin; pass the folder "
        "written by PeftModel.save_pretrained(), with its weight file"
    ]


def test_adapter_config_not_an_object_is_usage_error(pytester, tiny_llama, tiny_lora, tiny_snapshot, tmp_path):
    adapter = shutil.copytree(tiny_lora, tmp_path / "list-config")
    (adapter / "adapter_config.json").write_text("[1]\n")

    result = pytester.runpytest("--kinject", f"--kinject-model={tiny_llama}", f"--kinject-adapter={adapter}")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert error_lines(result) == [
        f"ERROR: {adapter / 'adapter_config.json'} is not a JSON object (got list); re-save the adapter with "
        "PeftModel.save_pretrained()"
    ]
