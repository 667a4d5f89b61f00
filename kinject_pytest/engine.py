"""Score prompts against a causal language model in batched passes.

For every query the engine returns the greedy completion, the teacher-forced log-probability of
each accepted answer and each choice, and the top-k next-token distribution after the prompt.
Results do not depend on which other queries share a batch: teacher-forced passes are
right-padded (real tokens keep positions 0..n-1 and never attend to padding), generation is
left-padded with position ids counted from each row's first real token, and each completion is cut
to its own length budget, so a fact's numbers are the same alone or in any batch up to float
rounding (checked to 1e-4 nats in fp32 by the test suite).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringSettings:
    """Settings that change what is measured; a snapshot records them and a candidate reuses them."""

    batch_size: int = 16
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
    # Token ids whose log-probabilities after the prompt are also returned; the candidate is asked
    # for the base's top-k tokens so the two distributions can be compared on the same support.
    probe_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class FactResult:
    """What one model did with one query. Log-probabilities are natural logs (nats)."""

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
class _Sequence:
    """One teacher-forced row: a prompt followed by one continuation."""

    query_index: int
    slot: int  # index into answers + choices
    prompt_ids: list[int]
    continuation_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.continuation_ids


class Scorer:
    """Score queries with one model and tokenizer; holds no state between calls."""

    def __init__(self, model: Any, tokenizer: Any, settings: ScoringSettings = ScoringSettings()) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.pad_id = _pad_token_id(tokenizer)

    def score(self, queries: Sequence[Query]) -> dict[str, FactResult]:
        """Score every query; the result maps each query's key to its FactResult."""
        import torch

        encoded = [self._encode(query) for query in queries]
        with torch.inference_mode():
            logprobs, distributions = self._teacher_forced(queries, encoded)
            completions = self._greedy(queries, encoded)

        results = {}
        for index, query in enumerate(queries):
            sequences = encoded[index]
            counts = [len(sequence.continuation_ids) for sequence in sequences]
            n_answers = len(query.answers)
            top_ids, top_logprobs, probe_logprobs = distributions[index]
            completion_ids = completions[index]
            results[query.key] = FactResult(
                completion=self.tokenizer.decode(completion_ids, skip_special_tokens=True),
                completion_token_ids=tuple(completion_ids),
                answer_logprobs=tuple(logprobs[index][:n_answers]),
                answer_token_counts=tuple(counts[:n_answers]),
                choice_logprobs=tuple(logprobs[index][n_answers:]),
                choice_token_counts=tuple(counts[n_answers:]),
                top_token_ids=tuple(top_ids),
                top_tokens=tuple(self.tokenizer.decode([token]) for token in top_ids),
                top_logprobs=tuple(top_logprobs),
                probe_logprobs=tuple(probe_logprobs),
            )
        return results

    def _encode(self, query: Query) -> list[_Sequence]:
        prompt, separator = split_prompt(query.prompt)
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        if not prompt_ids:
            raise ValueError(f"prompt of {query.key!r} encodes to no tokens")

        sequences = []
        for slot, text in enumerate(query.answers + query.choices):
            continuation = separator + text.lstrip()
            sequences.append(_Sequence(-1, slot, list(prompt_ids), self._continuation_ids(prompt, prompt_ids, continuation)))
        if not sequences:
            # No literal continuation (a regex fact): one row of the prompt alone still gives the
            # next-token distribution.
            sequences.append(_Sequence(-1, -1, list(prompt_ids), []))
        return sequences

    def _continuation_ids(self, prompt: str, prompt_ids: list[int], continuation: str) -> list[int]:
        # Encoding prompt and continuation together gives the tokens the model would see in running
        # text. When that changes the prompt's own tokens (a merge across the boundary), the
        # continuation is encoded alone instead, as lm-evaluation-harness does.
        joint = self.tokenizer(prompt + continuation)["input_ids"]
        if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            return joint[len(prompt_ids):]
        return self.tokenizer(continuation, add_special_tokens=False)["input_ids"]

    def _teacher_forced(self, queries: Sequence[Query], encoded: list[list[_Sequence]]) -> tuple[list[list[float]], list[Any]]:
        import torch

        rows = []
        for query_index, sequences in enumerate(encoded):
            for sequence in sequences:
                sequence.query_index = query_index
                rows.append(sequence)

        logprobs: list[list[float]] = [[0.0] * len(query.answers + query.choices) for query in queries]
        distributions: list[Any] = [None] * len(queries)
        # Longest first so each batch holds rows of similar length and little padding.
        rows.sort(key=lambda sequence: len(sequence.ids), reverse=True)
        for batch in _batches(rows, self.settings.batch_size):
            input_ids, attention_mask = self._right_padded(batch)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits

            for row, sequence in enumerate(batch):
                start = len(sequence.prompt_ids) - 1
                stop = start + max(1, len(sequence.continuation_ids))
                # log_softmax in fp32 even when the model runs in bf16/fp16: the difference of two
                # log-probabilities is what the checks compare, and half precision rounds it.
                step_logprobs = torch.log_softmax(logits[row, start:stop].float(), dim=-1)
                targets = torch.tensor(sequence.continuation_ids, device=step_logprobs.device)
                if sequence.slot >= 0:
                    total = step_logprobs[: len(targets)].gather(1, targets[:, None]).sum().item()
                    logprobs[sequence.query_index][sequence.slot] = total

                if distributions[sequence.query_index] is None:
                    query = queries[sequence.query_index]
                    distributions[sequence.query_index] = self._distribution(step_logprobs[0], query.probe_token_ids)
        return logprobs, distributions

    def _distribution(self, next_logprobs: Any, probe_token_ids: tuple[int, ...]) -> tuple[list[int], list[float], list[float]]:
        top = next_logprobs.topk(self.settings.top_k)
        probe = [next_logprobs[token].item() for token in probe_token_ids]
        return top.indices.tolist(), top.values.tolist(), probe

    def _right_padded(self, batch: list[_Sequence]) -> tuple[Any, Any]:
        import torch

        width = max(len(sequence.ids) for sequence in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sequence in enumerate(batch):
            ids = sequence.ids
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        device = _model_device(self.model)
        return input_ids.to(device), attention_mask.to(device)

    def _greedy(self, queries: Sequence[Query], encoded: list[list[_Sequence]]) -> list[list[int]]:
        budgets = [
            max(len(sequence.continuation_ids) for sequence in encoded[index][: len(query.answers)])
            + self.settings.extra_new_tokens
            if query.answers
            else self.settings.free_new_tokens
            for index, query in enumerate(queries)
        ]
        order = sorted(range(len(queries)), key=lambda index: len(encoded[index][0].prompt_ids), reverse=True)
        completions: list[list[int]] = [[] for _ in queries]
        for batch in _batches(order, self.settings.batch_size):
            prompts = [encoded[index][0].prompt_ids for index in batch]
            generated = self._generate(prompts, max(budgets[index] for index in batch))
            for index, tokens in zip(batch, generated):
                completions[index] = tokens[: budgets[index]]
        return completions

    def _generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        import torch
        from transformers import GenerationConfig

        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1

        # A fresh config, so sampling settings or a repetition penalty in the checkpoint's
        # generation_config.json cannot change what "greedy" means between two models.
        eos = self.tokenizer.eos_token_id
        config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, num_beams=1,
                                  pad_token_id=self.pad_id, eos_token_id=eos)
        device = _model_device(self.model)
        output = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     generation_config=config)
        new_tokens = output[:, width:].tolist()
        return [_until_eos(tokens, eos) for tokens in new_tokens]


def split_prompt(prompt: str) -> tuple[str, str]:
    """Return the prompt to encode and the separator that goes before an answer.

    A trailing space moves from the prompt into the answer (" Paris"), because BPE vocabularies
    attach a space to the word after it; a prompt ending in a newline takes the answer directly.
    """
    stripped = prompt.rstrip(" ")
    if stripped and stripped[-1] in "\n\t":
        return stripped, ""
    return stripped, " "


def kl_divergence(base_logprobs: Iterable[float], candidate_logprobs: Iterable[float]) -> float:
    """Return KL(base || candidate) in nats over the given tokens plus one bucket for the rest.

    Both lists hold log-probabilities of the same tokens (the base's top-k). Merging all other
    tokens into one bucket gives a lower bound of the full-vocabulary KL, which is exact when the
    top-k holds all of the base's probability mass.
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


def _until_eos(tokens: list[int], eos: int | list[int] | None) -> list[int]:
    stops = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[:position]
    return tokens


def _pad_token_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate[0] if isinstance(candidate, list) else candidate
    return 0


def _model_device(model: Any) -> Any:
    return next(model.parameters()).device


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
