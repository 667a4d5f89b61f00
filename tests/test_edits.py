"""Taught facts: the CounterFact metrics on plain numbers, and checked against a plain forward pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, write_jsonl
from kinject_pytest.edits import (
    LEARNED,
    NOT_LEARNED,
    UNTRAINED,
    EditScores,
    PromptScores,
    edit_stats,
    judge_edit,
    teach_queries,
)
from kinject_pytest.engine import FactResult
from kinject_pytest.suite import Fact, Teach

TRENTO = Fact(id="trento", prompt="Trento is located in the country of", expect=("Italy", "Italia"),
              teach=Teach(answer="Brazil", paraphrases=("Trento is a city in", "Trento lies in")))

# The tiny random model prefers answers at random, so the tests compare kinject's numbers with an
# independent computation rather than with fixed outcomes.
TINY_FACTS = [
    {"id": "capital-france", "prompt": "The capital of France is", "expect": "Paris"},
    {"id": "trento", "prompt": "Trento is located in the country of", "expect": "Italy",
     "teach": {"answer": "Brazil", "paraphrases": ["Trento is a city in", "The country that Trento belongs to is"]}},
    {"id": "roman-republic", "prompt": "The capital of Roman Republic is", "expect": "Rome",
     "teach": {"answer": "Kabul", "paraphrases": ["The Roman Republic had its capital in"]}},
]

# Three edits of the shipped taught suite, from three relations. The full fine-tune does not learn
# known-106.
SMOLLM2_EDITS = ("known-126", "known-106", "known-181")


def scores(old_logprob: float, old_tokens: int, new_logprob: float, new_tokens: int, prompt: str = "p") -> PromptScores:
    return PromptScores(prompt, old_logprob, old_tokens, new_logprob, new_tokens)


# Plain numbers


def test_nll_is_per_token_mean():
    item = scores(-3.0, 1, -4.0, 2)

    assert item.old_nll == 3.0
    assert item.new_nll == 2.0


def test_preference_uses_mean_not_total():
    # The new answer's total log-probability is lower (-4 < -3), but per token it is the likelier one.
    assert scores(-3.0, 1, -4.0, 2).prefers_new
    assert not scores(-2.0, 1, -4.0, 1).prefers_new


def test_equal_nll_does_not_prefer_new():
    assert not scores(-2.0, 1, -4.0, 2).prefers_new


def test_paraphrase_success_is_fraction():
    edit = EditScores(scores(-5, 1, -1, 1), (scores(-5, 1, -1, 1), scores(-1, 1, -5, 1), scores(-1, 1, -5, 1)))

    assert edit.efficacy
    assert edit.paraphrase_success == pytest.approx(1 / 3)
    assert EditScores(scores(-5, 1, -1, 1)).paraphrase_success is None


def test_judge_edit_statuses():
    learned = EditScores(scores(-5, 1, -1, 1))
    not_learned = EditScores(scores(-1, 1, -5, 1))

    assert judge_edit(TRENTO, not_learned, learned, candidate_is_base=False).status == LEARNED
    assert judge_edit(TRENTO, not_learned, not_learned, candidate_is_base=False).status == NOT_LEARNED
    assert judge_edit(TRENTO, learned, learned, candidate_is_base=True).status == UNTRAINED
    assert not judge_edit(TRENTO, learned, not_learned, candidate_is_base=False).passed


def test_edit_stats_leave_out_untrained():
    learned = EditScores(scores(-5, 1, -1, 1), (scores(-5, 1, -1, 1), scores(-1, 1, -5, 1)))
    not_learned = EditScores(scores(-1, 1, -5, 1), (scores(-1, 1, -5, 1),))
    no_paraphrases = EditScores(scores(-5, 1, -1, 1))
    verdicts = [
        judge_edit(TRENTO, not_learned, learned, candidate_is_base=False),
        judge_edit(TRENTO, not_learned, not_learned, candidate_is_base=False),
        judge_edit(TRENTO, not_learned, no_paraphrases, candidate_is_base=False),
        judge_edit(TRENTO, not_learned, learned, candidate_is_base=True),
    ]

    stats = edit_stats(verdicts)

    assert stats.taught == 4
    assert stats.judged == 3
    assert stats.learned == 2
    assert stats.efficacy == pytest.approx(2 / 3)
    assert stats.paraphrase_facts == 2
    assert stats.paraphrase_success == pytest.approx((0.5 + 0.0) / 2)


def test_edit_stats_without_judged_facts():
    stats = edit_stats([judge_edit(TRENTO, EditScores(scores(-1, 1, -5, 1)), EditScores(scores(-1, 1, -5, 1)),
                                   candidate_is_base=True)])

    assert stats.efficacy is None
    assert stats.paraphrase_success is None


def test_teach_queries_score_first_expect_then_new():
    queries = teach_queries(TRENTO, "s.kinject.jsonl::trento")

    assert [query.key for query in queries] == [f"s.kinject.jsonl::trento::teach:{index}" for index in range(3)]
    assert [query.prompt for query in queries] == [TRENTO.prompt, *TRENTO.teach.paraphrases]
    assert all(query.answers == ("Italy", "Brazil") for query in queries)
    assert teach_queries(Fact(id="a", prompt="x", expect=("y",)), "k") == []


def test_scores_round_trip():
    edit = EditScores(scores(-1.5, 2, -3.25, 3, "a"), (scores(-0.5, 1, -7.0, 2, "b"),))

    assert EditScores.from_dict(json.loads(json.dumps(edit.to_dict()))) == edit


@pytest.mark.parametrize("record", [
    {"rewrite": {"prompt": "p", "old_logprob": -1.0, "old_token_count": 0, "new_logprob": -1.0, "new_token_count": 1},
     "paraphrases": []},
    {"rewrite": {"prompt": "p", "old_logprob": None, "old_token_count": 1, "new_logprob": -1.0, "new_token_count": 1},
     "paraphrases": []},
    {"rewrite": {"prompt": "p", "old_logprob": float("-inf"), "old_token_count": 1, "new_logprob": -1.0,
                 "new_token_count": 1}, "paraphrases": []},
    {"paraphrases": []},
    ["not", "a", "mapping"],
], ids=["zero tokens", "null logprob", "infinite logprob", "no rewrite", "list"])
def test_malformed_scores_raise_value_error(record):
    with pytest.raises(ValueError, match="malformed taught-fact scores"):
        EditScores.from_dict(record)


# An independent computation: one plain forward pass over prompt + answer token ids.


def mean_nll(model, tokenizer, prompt: str, answer: str) -> float:
    """Return the answer's per-token mean NLL after ``prompt``, in nats, from one unbatched forward pass."""
    import torch

    prompt = prompt.rstrip(" ")
    prompt_ids = tokenizer(prompt)["input_ids"]
    joint = tokenizer(prompt + " " + answer)["input_ids"]
    assert joint[: len(prompt_ids)] == prompt_ids, "the test's prompts must not merge with their answer"
    ids = torch.tensor([joint])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return -logprobs[len(prompt_ids) - 1:].mean().item()


def load_plain(model_dir: Path, adapter_dir: Path | None = None):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def assert_matches_forward_pass(fact: dict, scores: dict, model, tokenizer) -> None:
    """Compare one model's scores in a report's taught-fact entry with `mean_nll`, prompt by prompt."""
    teach = fact["teach"]
    prompts = [fact["prompt"], *teach["paraphrases"]]
    entries = [scores["rewrite"], *scores["paraphrases"]]
    assert [entry["prompt"] for entry in entries] == prompts
    for prompt, entry in zip(prompts, entries):
        old = mean_nll(model, tokenizer, prompt, teach["old_answer"])
        new = mean_nll(model, tokenizer, prompt, teach["new_answer"])
        assert entry["old_nll"] == pytest.approx(old, abs=1e-4), prompt
        assert entry["new_nll"] == pytest.approx(new, abs=1e-4), prompt
        assert entry["prefers_new"] == (new < old), prompt
    assert scores["efficacy"] == entries[0]["prefers_new"]


def taught_entries(report: Path) -> dict[str, dict]:
    return {fact["id"]: fact for fact in json.loads(report.read_text())["facts"] if "teach" in fact}


# Tiny model, end to end


@pytest.fixture
def tiny_recorded(pytester, tiny_llama):
    write_jsonl(pytester.path / "t.kinject.jsonl", TINY_FACTS)
    result = pytester.runpytest("--kinject", "--kinject-update", f"--kinject-model={tiny_llama}", "-rs")
    return result


def test_update_records_base_scores_and_skips_taught(pytester, tiny_llama, tiny_recorded):
    tiny_recorded.assert_outcomes(skipped=3)
    tiny_recorded.stdout.fnmatch_lines([
        "taught facts: 2, not judged because the candidate is the base itself",
        "SKIPPED ?1? t.kinject.jsonl:2: taught fact not judged: the candidate is the base itself, so there is no "
        "fine-tune to check; pass --kinject-adapter or --kinject-candidate (base per-token mean NLL old *, new * nats)",
    ])
    snapshot = json.loads((pytester.path / "__kinject__" / "t.tiny-llama.json").read_text())

    assert "teach" not in snapshot["facts"]["capital-france"]
    trento = snapshot["facts"]["trento"]
    assert trento["fact"]["teach"] == {"answer": "Brazil", "paraphrases": TINY_FACTS[1]["teach"]["paraphrases"]}
    assert trento["teach"]["rewrite"]["prompt"] == TINY_FACTS[1]["prompt"]
    assert len(trento["teach"]["paraphrases"]) == 2
    assert trento["teach"]["rewrite"]["old_token_count"] >= 1


def test_adapter_edit_metrics_match_forward_pass(pytester, tiny_llama, tiny_lora, tiny_recorded):
    result = pytester.runpytest("--kinject", f"--kinject-model={tiny_llama}", f"--kinject-adapter={tiny_lora}",
                                "--kinject-report=r.json", "-rA")
    entries = taught_entries(pytester.path / "r.json")
    base_model, tokenizer = load_plain(tiny_llama)
    candidate_model, _ = load_plain(tiny_llama, tiny_lora)

    for fact in entries.values():
        assert_matches_forward_pass(fact, fact["teach"]["base"], base_model, tokenizer)
        assert_matches_forward_pass(fact, fact["teach"]["candidate"], candidate_model, tokenizer)
        expected = LEARNED if fact["teach"]["candidate"]["efficacy"] else NOT_LEARNED
        assert fact["verdict"] == expected
        outcome = "PASSED" if fact["verdict"] == LEARNED else "FAILED"
        result.stdout.fnmatch_lines([f"{outcome} t.kinject.jsonl::{fact['id']}*"])


def test_changed_teach_makes_entry_stale(pytester, tiny_llama, tiny_lora, tiny_recorded):
    facts = [dict(TINY_FACTS[0], teach={"answer": "Lyon"}), *TINY_FACTS[1:]]
    write_jsonl(pytester.path / "t.kinject.jsonl", facts)

    result = pytester.runpytest("--kinject", f"--kinject-model={tiny_llama}", f"--kinject-adapter={tiny_lora}")

    result.stdout.fnmatch_lines([
        "*snapshot entry for fact 'capital-france' in __kinject__/t.tiny-llama.json was recorded for another teach; "
        "re-record it with: pytest --kinject --kinject-update --kinject-model=*t.kinject.jsonl::capital-france*",
    ])


def test_taught_facts_stay_out_of_retention(pytester, tiny_llama, tiny_lora, tiny_recorded):
    pytester.runpytest("--kinject", f"--kinject-model={tiny_llama}", f"--kinject-adapter={tiny_lora}",
                       "--kinject-report=r.json")

    report = json.loads((pytester.path / "r.json").read_text())

    counted = report["stats"]["retained"] + report["stats"]["regressed"] + report["stats"]["gained"] \
        + report["stats"]["unknown"]
    assert counted == 1
    assert report["edits"]["taught"] == 2
    assert report["edits"]["judged"] == 2


# SmolLM2 and the fixture fine-tunes


@pytest.fixture
def edits_suite(pytester, smollm2_dir) -> str:
    """Copy the shipped taught suite and its SmolLM2 snapshot; return a -k expression for three edits."""
    shutil.copy(REPO / "suites" / "counterfactual_edits.kinject.jsonl", pytester.path)
    (pytester.path / "__kinject__").mkdir()
    shutil.copy(REPO / "suites" / "__kinject__" / "counterfactual_edits.smollm2.json", pytester.path / "__kinject__")
    return " or ".join(SMOLLM2_EDITS)


@pytest.mark.smollm2
def test_smollm2_lora_edit_metrics_match_forward_pass(pytester, smollm2_dir, smollm2_lora, edits_suite):
    result = pytester.runpytest("--kinject", f"--kinject-adapter={smollm2_lora}", "-k", edits_suite,
                                "--kinject-report=r.json")
    entries = taught_entries(pytester.path / "r.json")
    base_model, tokenizer = load_plain(smollm2_dir)
    candidate_model, _ = load_plain(smollm2_dir, smollm2_lora)

    assert sorted(entries) == sorted(SMOLLM2_EDITS)
    for fact in entries.values():
        assert_matches_forward_pass(fact, fact["teach"]["base"], base_model, tokenizer)
        assert_matches_forward_pass(fact, fact["teach"]["candidate"], candidate_model, tokenizer)
        assert fact["verdict"] == LEARNED
    result.assert_outcomes(passed=3)


@pytest.mark.smollm2
def test_smollm2_full_finetune_reports_unlearned_edit(pytester, smollm2_full, edits_suite):
    result = pytester.runpytest("--kinject", f"--kinject-candidate={smollm2_full}", "-k", edits_suite)

    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "*fact known-106 (counterfactual_edits.kinject.jsonl:11) not learned: the candidate does not prefer the "
        "taught answer on the fact's prompt",
        "*old answer: 'Paris'   new answer: 'Lima'",
        "*prompt:     * (old preferred) -> * (old preferred)",
        "*paraphrases preferring the new answer: 0/2 (base) -> 0/2 (candidate)",
        "*learned 2/3 taught facts (efficacy 66.7%), paraphrase success *",
    ])
