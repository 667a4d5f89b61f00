"""--kinject-each-adapter and --kinject-live-base: several candidates in one run, on the tiny random model
and, at the end, on SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import write_jsonl

FACTS = [
    {"id": "capital-france", "prompt": "The capital of France is", "expect": "Paris"},
    {"id": "capital-japan", "prompt": "The capital of Japan is", "expect": "Tokyo", "choices": ["Kyoto"]},
]


def build_biased_llama(tiny_llama: Path, out: Path) -> Path:
    """Save the tiny Llama with seeded random attention biases, so an adapter can train biases."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_llama)
    config.attention_bias = True
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, config=config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return out


def build_lora(base: Path, out: Path, *, seed: int, trained: bool = True, scale: float = 0.5, **options) -> Path:
    """Save a LoRA adapter for ``base`` whose trainable parameters (LoRA, biases, copies) got seeded noise."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
                                         **options}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if trained and parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    biased = build_biased_llama(tiny_llama, root / "biased-llama")
    return {
        "biased_base": biased,
        "untrained": build_lora(tiny_llama, root / "untrained", seed=0, trained=False),
        "modules_to_save": build_lora(tiny_llama, root / "lm-head", seed=1, modules_to_save=["lm_head"]),
        "bias_all": build_lora(biased, root / "bias-all", seed=2, bias="all"),
        "bias_lora_only": build_lora(biased, root / "bias-lora-only", seed=3, bias="lora_only"),
        "plain_on_biased": build_lora(biased, root / "plain", seed=4),
    }


@pytest.fixture
def suite(pytester) -> Path:
    return write_jsonl(pytester.path / "f.kinject.jsonl", FACTS)


def run_json(pytester, *arguments: str) -> tuple[pytest.RunResult, dict]:
    report = pytester.path / f"report-{len(list(pytester.path.glob('report-*.json')))}.json"
    result = pytester.runpytest("--kinject", f"--kinject-report={report}", *arguments)
    return result, json.loads(report.read_text())


def facts_by_id(report: dict) -> dict[str, dict]:
    return {fact["id"]: fact for fact in report["facts"]}


# Collection and options


def test_item_ids_name_each_adapter(pytester, suite, tiny_lora, tmp_path):
    other = tmp_path / "other" / tiny_lora.name
    shutil.copytree(tiny_lora, other)

    result = pytester.runpytest("--kinject", "--co", "-q", "--kinject-each-adapter",
                                f"--kinject-adapter={tiny_lora}", f"--kinject-adapter={other}")

    result.stdout.fnmatch_lines([
        "f.kinject.jsonl::capital-france[tiny-llama-lora]",
        "f.kinject.jsonl::capital-france[tiny-llama-lora-2]",
        "f.kinject.jsonl::capital-japan[tiny-llama-lora]",
        "f.kinject.jsonl::capital-japan[tiny-llama-lora-2]",
    ])


def test_item_ids_unchanged_without_option(pytester, suite, tiny_lora):
    result = pytester.runpytest("--kinject", "--co", "-q", f"--kinject-adapter={tiny_lora}")

    result.stdout.fnmatch_lines(["f.kinject.jsonl::capital-france", "f.kinject.jsonl::capital-japan"])


def test_each_adapter_without_adapter_is_usage_error(pytester, suite):
    result = pytester.runpytest("--kinject", "--kinject-each-adapter")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --kinject-each-adapter (ini kinject_each_adapter) needs adapters to judge; "
                                 "pass each one with --kinject-adapter DIR, or drop the option"])


def test_each_adapter_ini_key(pytester, suite, tiny_lora):
    pytester.makeini("[pytest]\nkinject_each_adapter = true\n")

    result = pytester.runpytest("--kinject", "--co", "-q", f"--kinject-adapter={tiny_lora}")

    result.stdout.fnmatch_lines(["f.kinject.jsonl::capital-france[tiny-llama-lora]"])


def test_new_flags_need_kinject(pytester, suite):
    for flag in ("--kinject-each-adapter", "--kinject-live-base"):
        result = pytester.runpytest(flag)

        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"ERROR: {flag} has no effect without --kinject; add --kinject *"])


# Judging adapters one after another


def test_adapter_without_effect_fails_only_its_facts(pytester, suite, tiny_llama, tiny_lora, adapters):
    model = f"--kinject-model={tiny_llama}"
    pytester.runpytest("--kinject", "--kinject-update", model)

    result, report = run_json(pytester, model, "--kinject-each-adapter", f"--kinject-adapter={adapters['untrained']}",
                              f"--kinject-adapter={tiny_lora}", "-rs")

    # The random model completes neither fact, so the trained adapter's facts are unknown (skipped).
    result.assert_outcomes(failed=2, skipped=2)
    result.stdout.fnmatch_lines([
        "*_ fact capital-france ?untrained? _*",
        "the adapter * gives the base's log-probabilities on every selected fact*",
        "candidate: * + *untrained ?untrained?",
        "not judged: the adapter *",
        "candidate: * + *tiny-llama-lora ?tiny-llama-lora?",
        "base weights: one copy: the adapter was attached to the base already in memory",
        "0 retained, 0 regressed, 0 gained, 2 unknown",
    ])
    names = [candidate["name"] for candidate in report["candidates"]]
    assert names == ["untrained", "tiny-llama-lora"]
    untrained, trained = report["candidates"]
    assert "changed nothing" in untrained["error"]
    assert {fact["verdict"] for fact in untrained["facts"]} == {"error"}
    assert trained["error"] is None
    assert trained["base_weights"] == "shared"
    assert trained["adapters"] == [str(tiny_lora)]
    assert [fact["verdict"] for fact in trained["facts"]] == ["unknown", "unknown"]
    assert report["base_results"] == "snapshot"


def test_keyword_selects_one_adapter(pytester, suite, tiny_llama, tiny_lora, adapters):
    model = f"--kinject-model={tiny_llama}"
    pytester.runpytest("--kinject", "--kinject-update", model)

    result, report = run_json(pytester, model, "--kinject-each-adapter", f"--kinject-adapter={adapters['untrained']}",
                              f"--kinject-adapter={tiny_lora}", "-k", "tiny-llama-lora and france")

    # The untrained adapter is not selected, so it is neither loaded nor reported.
    result.assert_outcomes(skipped=1, deselected=3)
    assert [candidate["name"] for candidate in report["candidates"]] == ["tiny-llama-lora"]
    assert [fact["id"] for fact in report["candidates"][0]["facts"]] == ["capital-france"]
    assert "untrained" not in result.stdout.str()


@pytest.mark.parametrize(("first", "base_key", "weights"), [
    ("modules_to_save", None, "shared"),
    ("bias_all", "biased_base", "reloaded"),
    ("bias_lora_only", "biased_base", "reloaded"),
])
def test_second_adapter_scores_as_alone(pytester, suite, tiny_llama, tiny_lora, adapters, first, base_key, weights):
    base = adapters[base_key] if base_key else tiny_llama
    second = adapters["plain_on_biased"] if base_key else tiny_lora
    model = f"--kinject-model={base}"
    pytester.runpytest("--kinject", "--kinject-update", model)

    _, alone = run_json(pytester, model, f"--kinject-adapter={second}")
    result, together = run_json(pytester, model, "--kinject-each-adapter", f"--kinject-adapter={adapters[first]}",
                                f"--kinject-adapter={second}")

    first_run, second_run = together["candidates"]
    assert first_run["base_weights"] == "shared"
    assert second_run["base_weights"] == weights
    if weights == "reloaded":
        result.stdout.fnmatch_lines([f"kinject: the base's logits changed after adapter {adapters[first]} (it trains "
                                     "biases, bias=*, which PEFT loads into the base's own parameters); loading a "
                                     "clean copy of the base for adapter *"])
    for fact_id, fact in facts_by_id(alone).items():
        paired = facts_by_id(second_run)[fact_id]
        assert paired["candidate_logprob"] == pytest.approx(fact["candidate_logprob"], abs=1e-6)
        assert paired["kl"] == pytest.approx(fact["kl"], abs=1e-6)
        assert paired["candidate_completion"] == fact["candidate_completion"]


def test_disable_adapter_gives_base_unless_bias_trained(tiny_llama, adapters):
    import torch

    from kinject_pytest.models import attach_adapters, base_logits, load_model

    prompt = "The capital of France is"
    cases = [(tiny_llama, "modules_to_save", True), (adapters["biased_base"], "bias_all", False),
             (adapters["biased_base"], "bias_lora_only", False)]
    for base_dir, name, exact in cases:
        base = load_model(str(base_dir), device="cpu")
        before = base_logits(base, prompt)
        adapted = attach_adapters(base, [str(adapters[name])])

        assert not torch.equal(adapted.model(base.tokenizer(prompt, return_tensors="pt").input_ids).logits, before)
        assert torch.equal(base_logits(adapted, prompt), before) is exact, name


def test_gate_item_per_adapter_names_candidate(pytester, suite, tiny_llama, tiny_lora, adapters):
    model = f"--kinject-model={tiny_llama}"
    pytester.runpytest("--kinject", "--kinject-update", model)

    result = pytester.runpytest("--kinject", model, "--kinject-each-adapter", f"--kinject-adapter={tiny_lora}",
                                f"--kinject-adapter={adapters['modules_to_save']}", "--kinject-gate=aggregate",
                                "--kinject-max-regressed=0", "--kinject-min-retention=0.5", "-v")

    # The random base knows neither fact, so retention cannot be measured for either adapter.
    assert result.parseoutcomes()["failed"] == 2
    result.stdout.fnmatch_lines(["kinject-gate?tiny-llama-lora? FAILED*", "kinject-gate?lm-head? FAILED*"])
    result.stdout.fnmatch_lines([f"kinject gate failed for * + {tiny_lora}:",
                                 "  the base knows none of the selected facts, so retention cannot be measured"])
    result.stdout.fnmatch_lines([f"kinject gate failed for * + {adapters['modules_to_save']}:"])


# Live base


def test_live_base_needs_no_snapshot(pytester, suite, tiny_llama, tiny_lora):
    result, report = run_json(pytester, f"--kinject-model={tiny_llama}", "--kinject-live-base",
                              f"--kinject-adapter={tiny_lora}")

    result.assert_outcomes(skipped=2)
    assert not (pytester.path / "__kinject__").exists()
    result.stdout.fnmatch_lines([
        "kinject: scoring 2 facts with the base *",
        "kinject: base results scored in this run (--kinject-live-base), not written to the snapshot",
        "base results: scored in this run (--kinject-live-base), not written to the snapshot",
        "base weights: one copy: the adapter was attached to the base already in memory",
    ])
    assert report["base_results"] == "live"
    assert report["base_weights"] == "shared"


def test_live_base_matches_snapshot(pytester, suite, tiny_llama, tiny_lora, adapters):
    model = f"--kinject-model={tiny_llama}"
    pytester.runpytest("--kinject", "--kinject-update", model)

    _, from_snapshot = run_json(pytester, model, f"--kinject-adapter={tiny_lora}")
    _, live = run_json(pytester, model, "--kinject-live-base", "--kinject-each-adapter",
                       f"--kinject-adapter={adapters['modules_to_save']}", f"--kinject-adapter={tiny_lora}")

    assert from_snapshot["base_results"] == "snapshot"
    live_lora = live["candidates"][1]
    for fact_id, fact in facts_by_id(from_snapshot).items():
        for name in ("base_logprob", "candidate_logprob", "kl"):
            assert facts_by_id(live_lora)[fact_id][name] == pytest.approx(fact[name], abs=1e-6), (fact_id, name)


def test_update_with_adapter_says_base_recorded(pytester, suite, tiny_llama, tiny_lora):
    result, report = run_json(pytester, f"--kinject-model={tiny_llama}", "--kinject-update",
                              f"--kinject-adapter={tiny_lora}")

    result.assert_outcomes(skipped=2)
    assert report["base_results"] == "recorded"
    assert report["base_weights"] == "shared"
    result.stdout.fnmatch_lines(["base results: scored in this run and written to the snapshot"])


# SmolLM2


# SmolLM2-135M-Instruct answers both capitals.
CAPITALS = [
    {"id": "capital-france", "prompt": "The capital of France is", "expect": "Paris"},
    {"id": "capital-japan", "prompt": "The capital of Japan is", "expect": "Tokyo", "choices": ["Osaka", "Kyoto"]},
]


@pytest.fixture
def edits_suite(pytester, counterfactual_edits) -> Path:
    # Six facts whose answers the fixture LoRA was trained to overwrite, and two it should keep.
    records = [{"id": edit["id"], "prompt": edit["prompt"], "expect": edit["old"]} for edit in counterfactual_edits[:6]]
    return write_jsonl(pytester.path / "edits.kinject.jsonl", records + CAPITALS)


@pytest.mark.smollm2
def test_two_smollm2_adapters_give_two_verdict_sets(pytester, edits_suite, smollm2_lora, tmp_path):
    from kinject_pytest.models import ensure_smollm2

    # Small seeded noise on a rank-2 LoRA: it changes the logits a little and no answer.
    noise = build_lora(ensure_smollm2(), tmp_path / "noise", seed=5, scale=0.01, r=2)
    pytester.runpytest("--kinject", "--kinject-update")
    junit = pytester.path / "junit.xml"

    result, report = run_json(pytester, "--kinject-each-adapter", f"--kinject-adapter={smollm2_lora}",
                              f"--kinject-adapter={noise}", f"--junitxml={junit}")

    lora, quiet = report["candidates"]
    assert [lora["name"], quiet["name"]] == ["smollm2-edits-lora", "noise"]
    assert lora["stats"]["regressed"] >= 5
    assert quiet["stats"]["regressed"] == 0
    assert quiet["stats"]["retained"] == lora["stats"]["known"] == 8
    assert lora["base_weights"] == quiet["base_weights"] == "shared"
    assert result.parseoutcomes()["failed"] == lora["stats"]["regressed"]
    testcases = junit.read_text()
    assert 'name="capital-france[smollm2-edits-lora]"' in testcases
    assert 'name="capital-france[noise]"' in testcases
    result.stdout.fnmatch_lines(["candidate: smollm2 + * ?smollm2-edits-lora?", "*regressed*",
                                 "candidate: smollm2 + * ?noise?", "8 retained, 0 regressed, 0 gained, 0 unknown"])


@pytest.mark.smollm2
def test_smollm2_live_base_equals_recorded_base(pytester, edits_suite, smollm2_lora):
    adapter = f"--kinject-adapter={smollm2_lora}"

    _, live = run_json(pytester, "--kinject-live-base", adapter)
    assert not (pytester.path / "__kinject__").exists()
    _, recorded = run_json(pytester, "--kinject-update", adapter)

    assert live["base_results"] == "live"
    assert recorded["base_results"] == "recorded"
    assert live["base_weights"] == recorded["base_weights"] == "shared"
    assert live["stats"] == recorded["stats"]
    for fact_id, fact in facts_by_id(recorded).items():
        for name in ("base_logprob", "candidate_logprob", "kl"):
            assert facts_by_id(live)[fact_id][name] == pytest.approx(fact[name], abs=1e-6), (fact_id, name)


@pytest.mark.parametrize(("adapter", "base_key"), [("modules_to_save", None), ("bias_all", "biased_base")])
def test_fixture_base_probe_is_base(tiny_llama, adapters, adapter, base_key):
    from kinject_pytest.fixture import Kinject
    from kinject_pytest.session import Options

    model = str(adapters[base_key] if base_key else tiny_llama)
    prompt, answer = "The capital of France is", "Paris"
    plain = Kinject(Options(model=model, device="cpu")).base.logprob(prompt, answer)
    probes = Kinject(Options(model=model, adapters=(str(adapters[adapter]),), device="cpu"))

    candidate = probes.candidate.logprob(prompt, answer)
    base = probes.base.logprob(prompt, answer)

    assert candidate != pytest.approx(plain, abs=1e-3)
    assert base == pytest.approx(plain, abs=1e-6)
