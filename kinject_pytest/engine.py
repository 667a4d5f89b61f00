"""Score prompts against a causal language model in batched passes.

For every query the engine returns the greedy completion, the teacher-forced log-probability of
each accepted answer and each choice, and the top-k next-token distribution after the prompt.
Results do not depend on which other queries share a batch. Prompts are left-padded with position
ids counted from each row's first real token, and padding is masked out of attention.
Continuations are right-padded after their prompt, and each completion is cut to its own length
budget. A fact's numbers are therefore the same alone or in any batch up to float rounding (the
test suite checks 1e-4 nats in fp32).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

logger = logging.getLogger(__name__)


# Facts per batched pass. On two CPU cores, SmolLM2-135M scores 256 facts at 17.6 facts/s with 16
# and 25.7 facts/s with 64, using 1.2 GiB (bench/bench_engine.py, docs/benchmarks.md).
DEFAULT_BATCH_SIZE = 64


class ScoringError(ValueError):
    """A query the model cannot score; the message names the query's key and the fix."""


@dataclass(frozen=True)
class ScoringSettings:
    """Settings that change what is measured; a snapshot records them and a candidate reuses them."""

    batch_size: int = DEFAULT_BATCH_SIZE
    top_k: int = 20
    # Generated beyond the longest accepted answer, so a prefix match can see where the word ends.
    extra_new_tokens: int = 3
    # Generated for a query with no literal answer to measure (regex facts).
    free_new_tokens: int = 12

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Query:
    """One prompt to score, with the continuations whose log-probabilities are wanted."""

    key: str
    prompt: str
    answers: tuple[str, ...]
    choices: tuple[str, ...] = ()
    # Token ids whose log-probabilities after the prompt are also returned. The candidate is
    # probed at the base's top-k tokens, so the two distributions share one support.
    probe_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class FactResult:
    """One model's scores for one query. Log-probabilities are natural logs (nats)."""

    completion: str
    completion_token_ids: tuple[int, ...]
    answer_logprobs: tuple[float, ...]
    answer_token_counts: tuple[int, ...]
    choice_logprobs: tuple[float, ...]
    choice_token_counts: tuple[int, ...]
    top_token_ids: tuple[int, ...]
    top_tokens: tuple[str, ...]
    top_logprobs: tuple[float, ...]
    probe_logprobs: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FactResult:
        fields = {name: tuple(value) if isinstance(value, list) else value for name, value in data.items()}
        return cls(**fields)


@dataclass
class _Encoded:
    """A query's prompt tokens and the tokens of each answer and choice, in that order."""

    prompt_ids: list[int]
    continuations: list[list[int]]
    budget: int  # new tokens to generate greedily


class Scorer:
    """Scorer of queries with one model and tokenizer, keeping no state between calls.

    Each batch of queries costs one pass over the prompts (which also gives the next-token
    distribution and the first greedy token), one pass over all answers and choices on top of the
    prompts' key/value cache, and one step per generated token. The prompt is never encoded twice.
    """

    def __init__(self, model: Any, tokenizer: Any, settings: ScoringSettings = ScoringSettings()) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.pad_id = _pad_token_id(tokenizer)
        eos = tokenizer.eos_token_id
        if eos is None:
            self.eos_ids: set[int] = set()
        else:
            self.eos_ids = set(eos) if isinstance(eos, list) else {eos}
        self.cache_keyword = _cache_keyword(model)

    def score(self, queries: Sequence[Query]) -> dict[str, FactResult]:
        """Score every query; the result maps each query's key to its FactResult."""
        import torch

        encoded = [self._encode(query) for query in queries]
        # Longest prompts first, so each batch gets prompts of similar length and little padding.
        order = sorted(range(len(queries)), key=lambda index: len(encoded[index].prompt_ids), reverse=True)
        results: dict[str, FactResult] = {}
        with torch.inference_mode():
            for batch in _batches(order, self.settings.batch_size):
                for index, result in zip(batch, self._score_batch([queries[i] for i in batch], [encoded[i] for i in batch])):
                    results[queries[index].key] = result
        return results

    def _encode(self, query: Query) -> _Encoded:
        prompt, separator = split_prompt(query.prompt)
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        if not prompt_ids:
            raise ScoringError(f"{query.key}: the prompt encodes to no tokens; write a non-empty prompt")

        continuations = [self._continuation_ids(prompt, prompt_ids, separator + text.lstrip())
                         for text in query.answers + query.choices]
        if query.answers:
            budget = max(len(ids) for ids in continuations[: len(query.answers)]) + self.settings.extra_new_tokens
        else:
            budget = self.settings.free_new_tokens
        longest = len(prompt_ids) + max([budget, *(len(ids) for ids in continuations)])
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context is not None and longest > context:
            raise ScoringError(f"{query.key}: the prompt with its answer or completion takes {longest} tokens, more "
                               f"than the model's context of {context}; shorten the prompt")
        return _Encoded(list(prompt_ids), continuations, budget)

    def _continuation_ids(self, prompt: str, prompt_ids: list[int], continuation: str) -> list[int]:
        # Encoding prompt and continuation together gives the tokens the model would see in running
        # text. When that changes the prompt's own tokens (a merge across the boundary), the
        # continuation is encoded alone instead, as lm-evaluation-harness does.
        joint = self.tokenizer(prompt + continuation)["input_ids"]
        if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            return joint[len(prompt_ids):]
        return self.tokenizer(continuation, add_special_tokens=False)["input_ids"]

    def _score_batch(self, queries: list[Query], encoded: list[_Encoded]) -> list[FactResult]:
        import torch

        next_logprobs, cache, mask, positions = self._prefill([item.prompt_ids for item in encoded])
        continuation_logprobs = self._continuations(encoded, next_logprobs, copy.deepcopy(cache), mask, positions)
        completions = self._greedy(encoded, next_logprobs, cache, mask, positions)

        vocabulary = next_logprobs.shape[-1]
        results = []
        for row, (query, item) in enumerate(zip(queries, encoded)):
            if any(not 0 <= token < vocabulary for token in query.probe_token_ids):
                raise ScoringError(f"{query.key}: the snapshot's top-k token ids do not fit the candidate's "
                                   f"vocabulary of {vocabulary} tokens; re-record the snapshot with --kinject-update")
            top = next_logprobs[row].topk(self.settings.top_k)
            probes = torch.tensor(query.probe_token_ids, dtype=torch.long, device=next_logprobs.device)
            top_ids = top.indices.tolist()
            counts = [len(ids) for ids in item.continuations]
            n_answers = len(query.answers)
            results.append(FactResult(
                completion=self.tokenizer.decode(completions[row], skip_special_tokens=True),
                completion_token_ids=tuple(completions[row]),
                answer_logprobs=tuple(continuation_logprobs[row][:n_answers]),
                answer_token_counts=tuple(counts[:n_answers]),
                choice_logprobs=tuple(continuation_logprobs[row][n_answers:]),
                choice_token_counts=tuple(counts[n_answers:]),
                top_token_ids=tuple(top_ids),
                top_tokens=tuple(self.tokenizer.decode([token]) for token in top_ids),
                top_logprobs=tuple(top.values.tolist()),
                probe_logprobs=tuple(next_logprobs[row].index_select(0, probes).tolist()),
            ))
        return results

    def _prefill(self, prompts: list[list[int]]) -> tuple[Any, Any, Any, Any]:
        """Run the left-padded prompts once; return next-token log-probs, cache, mask and next positions."""
        import torch

        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        # Positions count from each row's first real token, so left padding does not shift them.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)

        device = _model_device(self.model)
        output = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                            position_ids=position_ids.to(device), use_cache=True, logits_to_keep=1)
        cache = getattr(output, "cache", None) or output.past_key_values
        # log_softmax in fp32 even when the model runs in bf16/fp16: the checks compare differences
        # of log-probabilities, which half precision rounds.
        next_logprobs = torch.log_softmax(output.logits[:, -1].float(), dim=-1)
        next_positions = torch.tensor([len(ids) for ids in prompts], device=device)
        return next_logprobs, cache, mask.to(device), next_positions

    def _continuations(self, encoded: list[_Encoded], next_logprobs: Any, cache: Any, mask: Any,
                       positions: Any) -> list[list[float]]:
        """Return the total log-probability of every answer and choice, given its prompt."""
        import torch

        # The first token of each continuation is scored from the prompt pass. The others need a
        # pass over the continuation minus its last token, on top of the prompt's cache.
        totals = [[next_logprobs[row, ids[0]].item() for ids in item.continuations] for row, item in enumerate(encoded)]
        rows = [(row, slot, ids) for row, item in enumerate(encoded) for slot, ids in enumerate(item.continuations)
                if len(ids) > 1]
        if not rows:
            return totals

        device = mask.device
        width = max(len(ids) - 1 for _, _, ids in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        continuation_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, (_, _, ids) in enumerate(rows):
            input_ids[index, : len(ids) - 1] = torch.tensor(ids[:-1])
            continuation_mask[index, : len(ids) - 1] = 1
        prompt_rows = torch.tensor([row for row, _, _ in rows], device=device)
        cache.reorder_cache(prompt_rows)
        attention_mask = torch.cat([mask.index_select(0, prompt_rows), continuation_mask.to(device)], dim=1)
        position_ids = positions.index_select(0, prompt_rows)[:, None] + torch.arange(width, device=device)

        logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, **{self.cache_keyword: cache}).logits
        for index, (row, slot, ids) in enumerate(rows):
            steps = torch.log_softmax(logits[index, : len(ids) - 1].float(), dim=-1)
            targets = torch.tensor(ids[1:], device=device)
            totals[row][slot] += steps.gather(1, targets[:, None]).sum().item()
        return totals

    def _greedy(self, encoded: list[_Encoded], next_logprobs: Any, cache: Any, mask: Any, positions: Any) -> list[list[int]]:
        """Decode greedily from the prompt cache; each row stops at EOS or its own budget."""
        import torch

        budgets = [item.budget for item in encoded]
        tokens = next_logprobs.argmax(-1)
        generated = [[token] for token in tokens.tolist()]
        for _ in range(max(budgets) - 1):
            if all(self._finished(ids, budget) for ids, budget in zip(generated, budgets)):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            output = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                                use_cache=True, **{self.cache_keyword: cache})
            positions = positions + 1
            tokens = output.logits[:, -1].float().argmax(-1)
            for ids, token in zip(generated, tokens.tolist()):
                ids.append(token)
        return [_until_eos(ids[:budget], self.eos_ids) for ids, budget in zip(generated, budgets)]

    def _finished(self, ids: list[int], budget: int) -> bool:
        return len(ids) >= budget or any(token in self.eos_ids for token in ids)


def split_prompt(prompt: str) -> tuple[str, str]:
    """Return the prompt to encode and the separator that goes before an answer.

    A trailing space moves from the prompt into the answer (" Paris"), because BPE vocabularies
    attach a space to the word after it. A prompt ending in a newline takes the answer directly.
    """
    stripped = prompt.rstrip(" ")
    if stripped and stripped[-1] in "\n\t":
        return stripped, ""
    return stripped, " "


def kl_divergence(base_logprobs: Iterable[float], candidate_logprobs: Iterable[float]) -> float:
    """Return KL(base || candidate) in nats over the given tokens plus one bucket for the rest.

    Both lists hold log-probabilities of the same tokens (the base's top-k). Merging all other
    tokens into one bucket gives a lower bound of the full-vocabulary KL, which is exact when the
    top-k contains all of the base's probability mass.
    """
    base = [math.exp(value) for value in base_logprobs]
    candidate = [math.exp(value) for value in candidate_logprobs]
    base.append(max(0.0, 1.0 - sum(base)))
    candidate.append(max(0.0, 1.0 - sum(candidate)))

    total = 0.0
    for p, q in zip(base, candidate):
        if p <= 0.0:
            continue
        total += p * (math.log(p) - math.log(max(q, 1e-30)))
    return max(0.0, total)


def _until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:position]
    return tokens


def _pad_token_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate[0] if isinstance(candidate, list) else candidate
    return 0


def _cache_keyword(model: Any) -> str:
    """Return the forward() keyword for a key/value cache: ``cache`` from transformers 5.2x on,
    ``past_key_values`` before (and still accepted, with a deprecation warning, until 5.40)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _model_device(model: Any) -> Any:
    return next(model.parameters()).device


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
