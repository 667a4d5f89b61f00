"""Report files of a run: a JSON document for machines, a Markdown summary for pull requests and an
HTML page with plots for reviewers (rendered by :mod:`kinject_pytest.html`).

:func:`report_data` gathers everything into one JSON-ready dict. :func:`markdown_report` reads
only that dict, so the Markdown can also be rendered from a JSON report read back from disk.
Every file is written atomically (a temporary file in the same folder, then ``os.replace``), so a
reader never sees half a report. Nothing here imports torch or pytest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .edits import EditScores, edit_stats
from .files import write_text_atomically
from .html import SHARED_REPORT_KEYS, candidate_reports, html_report
from .session import BASE_RESULTS_TEXT, BASE_WEIGHTS_TEXT, CandidateRun, Options, Outcome, RunSummary, display_path
from .stats import per_tag_stats, retention_stats
from .verdict import DEFAULT_TOLERANCE, REGRESSED

REPORT_VERSION = 1
ERROR_STATUS = "error"  # the "verdict" of a fact without a usable snapshot entry
SUPPORTED_SUFFIXES = (".json", ".md", ".html")
WORST_REGRESSIONS = 10

# Characters that Markdown or a GitHub table would read as syntax when they appear in a cell.
_MARKDOWN_SPECIAL = set("\\`*_[]<>|~&#")


def report_data(outcomes: Iterable[Outcome], options: Options, summary: RunSummary,
                gate: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the JSON-ready report of a run: settings, statistics, per-tag statistics and every fact.

    Facts are sorted by fact id, then by file. Log-probabilities, drops and KL are in nats, top-k
    overlap is a fraction and ranks are places. JSON has no infinity or NaN, so a non-finite number
    is stored as ``null``. ``gate`` is :func:`kinject_pytest.gate.gate_result`, or None when no
    threshold was set.
    """
    outcomes = list(outcomes)
    verdicts = [outcome.verdict for outcome in outcomes if outcome.verdict is not None]
    facts = [_fact_entry(outcome, options) for outcome in outcomes]
    facts.sort(key=lambda entry: (entry["id"], entry["file"] or ""))

    return {
        "kinject_report_version": REPORT_VERSION,
        "candidate": options.candidate_label,
        "base": options.model,
        "settings": {
            "device": options.device,
            "dtype": options.dtype,
            "batch_size": options.batch_size,
            "top_k": options.top_k,
            "adapters": list(options.adapters),
        },
        "run": {
            "scored_facts": summary.scored_facts,
            "seconds_loading": summary.seconds_loading,
            "seconds_scoring": summary.seconds_scoring,
            "snapshots_written": [display_path(path) for path in summary.snapshots_written],
        },
        "stats": _json_numbers(dataclasses.asdict(retention_stats(verdicts))),
        "tags": {tag: _json_numbers(dataclasses.asdict(stats)) for tag, stats in per_tag_stats(outcomes).items()},
        "edits": _json_numbers(dataclasses.asdict(edit_stats(outcome.edit for outcome in outcomes if outcome.edit is not None))),
        "gate": gate,
        "facts": facts,
    }


def session_report_data(runs: Sequence[CandidateRun], options: Options, summary: RunSummary,
                        gate: Callable[[CandidateRun], dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """Build the report of a whole run: :func:`report_data`'s shape for one candidate, else one entry per candidate.

    Every report records where the base results came from (``base_results``: snapshot, recorded or
    live). An adapter candidate also records which copy of the base weights it was attached to
    (``base_weights``: shared or reloaded; None for other candidates). With several candidates
    (``--kinject-each-adapter``) the report keeps the version, base, run and base results at the top
    and lists each candidate's report, without those keys, under ``candidates`` with its ``name``,
    ``adapters`` and ``error``. :func:`kinject_pytest.html.candidate_reports` turns it back into
    single-candidate reports. ``gate`` gives each candidate's gate result, see :func:`report_data`.
    """
    parts = []
    for run in runs:
        data = report_data(run.outcomes.values(), options.for_candidate(run.spec), summary,
                           gate=gate(run) if gate else None)
        data.update(base_results=summary.base_results, base_weights=run.base_weights)
        parts.append((run, data))
    if len(parts) == 1 and not parts[0][0].spec.name:
        return parts[0][1]

    first = parts[0][1] if parts else report_data([], options, summary)
    combined = {key: first[key] for key in SHARED_REPORT_KEYS if key in first}
    combined["base_results"] = summary.base_results
    combined["settings"] = {**first["settings"], "adapters": list(options.adapters), "each_adapter": True}
    combined["candidates"] = [
        {"name": run.spec.name, "adapters": list(run.spec.adapters), "error": run.error,
         **{key: value for key, value in data.items() if key not in SHARED_REPORT_KEYS}}
        for run, data in parts
    ]
    return combined


def _fact_entry(outcome: Outcome, options: Options) -> dict[str, Any]:
    fact, verdict = outcome.fact, outcome.verdict
    entry: dict[str, Any] = {
        "id": fact.id,
        "file": None if fact.path is None else display_path(fact.path),
        "line": fact.line,
        "prompt": fact.prompt,
        "expect": list(fact.expect),
        "choices": list(fact.choices),
        "match": fact.match,
        "tags": list(fact.tags),
        "recorded": outcome.recorded,
        "error": outcome.error,
    }
    if outcome.edit is not None:
        tolerance = fact.tolerance.over(options.tolerance).over(DEFAULT_TOLERANCE)
        entry.update(verdict=outcome.edit.status, failed_checks=[], base_completion=None, candidate_completion=None,
                     base_logprob=None, candidate_logprob=None, logprob_drop=None, kl=None,
                     teach=_teach_entry(outcome))
    elif verdict is None:
        # Same precedence as the session uses when judging: fact, then options, then defaults.
        tolerance = fact.tolerance.over(options.tolerance).over(DEFAULT_TOLERANCE)
        entry.update(verdict=ERROR_STATUS, failed_checks=[], base_completion=None, candidate_completion=None,
                     base_logprob=None, candidate_logprob=None, logprob_drop=None, kl=None, top_k_overlap=None,
                     base_rank=None, candidate_rank=None, rank_change=None)
    else:
        tolerance = verdict.tolerance
        entry.update(
            verdict=verdict.status,
            failed_checks=list(verdict.failed_checks),
            base_completion=verdict.base_completion,
            candidate_completion=verdict.candidate_completion,
            base_logprob=verdict.base_logprob,
            candidate_logprob=verdict.candidate_logprob,
            logprob_drop=verdict.logprob_drop,
            kl=verdict.kl,
            top_k_overlap=verdict.top_k_overlap,
            base_rank=verdict.base_rank,
            candidate_rank=verdict.candidate_rank,
            rank_change=verdict.rank_change,
        )
    entry["tolerance"] = dataclasses.asdict(tolerance)
    return _json_numbers(entry)


def _teach_entry(outcome: Outcome) -> dict[str, Any]:
    """Return a taught fact's answers and both models' scores; NLLs are per-token means in nats."""
    fact, edit = outcome.fact, outcome.edit
    assert edit is not None and fact.teach is not None
    return {
        "old_answer": fact.expect[0],
        "new_answer": fact.teach.answer,
        "paraphrases": list(fact.teach.paraphrases),
        "base": _scores_entry(edit.base),
        "candidate": _scores_entry(edit.candidate),
    }


def _scores_entry(scores: EditScores) -> dict[str, Any]:
    entry = scores.to_dict()
    for item, prompt_scores in zip([entry["rewrite"], *entry["paraphrases"]], [scores.rewrite, *scores.paraphrases]):
        item["old_nll"] = prompt_scores.old_nll
        item["new_nll"] = prompt_scores.new_nll
        item["prefers_new"] = prompt_scores.prefers_new
    entry["efficacy"] = scores.efficacy
    entry["paraphrase_success"] = scores.paraphrase_success
    for item in [entry["rewrite"], *entry["paraphrases"]]:
        item.update(_json_numbers(item))  # an answer with probability 0 has an infinite NLL
    return entry


def _json_numbers(values: dict[str, Any]) -> dict[str, Any]:
    """Replace infinite and NaN floats at the top level and one mapping below it by ``None``."""
    cleaned: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _json_numbers(value)
        elif isinstance(value, float) and not math.isfinite(value):
            value = None
        cleaned[key] = value
    return cleaned


# Writing files


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write ``data`` as UTF-8 JSON with sorted keys and an indent of 2, atomically."""
    text = json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    write_text_atomically(Path(path), text)


def write_reports(paths: Sequence[str | os.PathLike[str]], data: dict[str, Any]) -> None:
    """Write the report to each path: JSON for ``.json``, Markdown for ``.md``, HTML for ``.html``, each atomically.

    Every suffix is checked before anything is written, so an unsupported one (``ValueError``)
    leaves no partial set of reports behind.
    """
    resolved = [Path(path) for path in paths]
    for path in resolved:
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise ValueError(f"unsupported report file {path}: the name must end in "
                             + " or ".join(SUPPORTED_SUFFIXES))

    for path in resolved:
        suffix = path.suffix.lower()
        if suffix == ".json":
            write_json(path, data)
        elif suffix == ".html":
            write_text_atomically(path, html_report(data))
        else:
            write_text_atomically(path, markdown_report(data))


def step_summary_path() -> Path | None:
    """Return the GitHub Actions job summary file from ``$GITHUB_STEP_SUMMARY``, or None when unset or empty."""
    value = os.environ.get("GITHUB_STEP_SUMMARY", "")
    return Path(value) if value else None


def append_step_summary(markdown: str) -> Path | None:
    """Append ``markdown`` to the GitHub Actions job summary and return its path, or None outside Actions.

    GitHub collects that file from every step of a job, so it is appended to, never replaced.
    """
    path = step_summary_path()
    if path is None:
        return None
    text = markdown if markdown.endswith("\n") else markdown + "\n"
    with path.open("a", encoding="utf-8", newline="\n") as stream:
        stream.write(text)
    return path


# Markdown


def markdown_report(data: dict[str, Any]) -> str:
    """Render a report dict from :func:`session_report_data` as a short Markdown document for a pull request.

    A report of several candidates starts with one table row per candidate, then has one section per candidate.
    """
    if "candidates" not in data:
        return _candidate_markdown(data)
    lines = [
        f"## kinject: {len(data['candidates'])} candidates against {_inline(data['base'])}",
        "",
        "| candidate | retained | regressed | gained | unknown | retention |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    sections = []
    for name, report in candidate_reports(data):
        stats = report["stats"]
        retention = "not judged" if report.get("error") else (
            "n/a" if stats["retention_rate"] is None else _percent(stats["retention_rate"]))
        lines.append(f"| {_cell(name)} | {stats['retained']} | {stats['regressed']} | {stats['gained']} | "
                     f"{stats['unknown']} | {retention} |")
        sections.append(_candidate_markdown(report, heading=f"### {_cell(name)}: {_inline(report['candidate'])}"))
    return "\n".join(lines + [""] + sections)


def _candidate_markdown(data: dict[str, Any], heading: str | None = None) -> str:
    stats = data["stats"]
    errors = sum(1 for fact in data["facts"] if fact["verdict"] == ERROR_STATUS)
    lines = [
        heading or f"## kinject: {_inline(data['candidate'])}",
        "",
        " ".join(filter(None, [f"Base model: {_inline(data['base'])}. {len(data['facts'])} facts.", _base_sentence(data)])),
        "",
        "| retained | regressed | gained | unknown | without snapshot entry |",
        "|---:|---:|---:|---:|---:|",
        f"| {stats['retained']} | {stats['regressed']} | {stats['gained']} | {stats['unknown']} | {errors} |",
        "",
    ]
    if data.get("error"):
        lines += [f"Not judged: {_inline(data['error'])}", ""]
    lines += _statistics_lines(stats)
    lines += _taught_lines(data)
    lines += _gate_lines(data.get("gate"))
    lines += _tag_table(data["tags"])
    lines += _worst_regressions_table(data["facts"])
    return "\n".join(lines)


def _base_sentence(data: dict[str, Any]) -> str:
    """Return where the base results came from and, for an adapter, which copy of the base weights it used."""
    sentences = []
    if data.get("base_results") in BASE_RESULTS_TEXT:
        sentences.append(f"Base results {BASE_RESULTS_TEXT[data['base_results']]}.")
    if data.get("base_weights") in BASE_WEIGHTS_TEXT:
        sentences.append(f"Base weights: {BASE_WEIGHTS_TEXT[data['base_weights']]}.")
    return " ".join(sentences)


def _statistics_lines(stats: dict[str, Any]) -> list[str]:
    if stats["retention_rate"] is None:
        lines = ["- Retention: the base knows none of these facts."]
    else:
        lines = [
            f"- Retention of facts the base knows: {stats['retained']}/{stats['known']} = "
            f"{_percent(stats['retention_rate'])} "
            f"(95% Wilson interval {_percent(stats['wilson_low'])} to {_percent(stats['wilson_high'])})"
        ]
    lines.append(
        f"- Exact McNemar test, facts lost ({stats['lost']}) against facts gained ({stats['gained']}): "
        f"p {_p_value(stats['mcnemar_p'])}"
    )
    if stats["mean_kl"] is not None:
        lines.append(f"- KL(base ‖ candidate) on known facts: mean {stats['mean_kl']:.4f} nats, "
                     f"max {stats['max_kl']:.4f} nats")
    return lines + [""]


def _taught_lines(data: dict[str, Any]) -> list[str]:
    """Return the "learned" section: efficacy and paraphrase success, then one row per taught fact."""
    edits = data.get("edits")
    if not edits or not edits["taught"]:
        return []
    lines = ["### Taught facts", ""]
    if edits["efficacy"] is None:
        return lines + [f"- {edits['taught']} taught facts, not judged: the candidate is the base itself.", ""]

    lines.append(f"- Learned (efficacy): {edits['learned']}/{edits['judged']} = {_percent(edits['efficacy'])}")
    if edits["paraphrase_success"] is not None:
        lines.append(f"- Paraphrase success: {_percent(edits['paraphrase_success'])} "
                     f"(mean over {edits['paraphrase_facts']} facts)")
    stats = data["stats"]
    if stats["retention_rate"] is not None:
        lines.append(f"- Kept: {stats['retained']}/{stats['known']} = {_percent(stats['retention_rate'])} of the "
                     "other facts the base knows")
    lines += [
        "",
        "Per-token mean NLL in nats (old / new answer), base → candidate:",
        "",
        "| fact | prompt | old | new | base | candidate | paraphrases | verdict |",
        "|---|---|---|---|---|---|---:|---|",
    ]
    for fact in data["facts"]:
        if "teach" in fact:
            lines.append(_taught_row(fact))
    return lines + [""]


def _taught_row(fact: dict[str, Any]) -> str:
    teach = fact["teach"]
    base, candidate = teach["base"]["rewrite"], teach["candidate"]["rewrite"]
    paraphrases = teach["candidate"]["paraphrases"]
    succeeded = sum(item["prefers_new"] for item in paraphrases)
    cells = [
        _cell(fact["id"]),
        _cell(fact["prompt"]),
        _cell(teach["old_answer"]),
        _cell(teach["new_answer"]),
        f"{_number(base['old_nll'])} / {_number(base['new_nll'])}",
        f"{_number(candidate['old_nll'])} / {_number(candidate['new_nll'])}",
        f"{succeeded}/{len(paraphrases)}" if paraphrases else "n/a",
        fact["verdict"],
    ]
    return "| " + " | ".join(cells) + " |"


def _tag_table(tags: dict[str, dict[str, Any]]) -> list[str]:
    if not tags:
        return []

    # Lowest retention first; tags whose facts the base does not know at all go last.
    def order(item: tuple[str, dict[str, Any]]) -> tuple[bool, float, str]:
        tag, stats = item
        rate = stats["retention_rate"]
        return rate is None, rate if rate is not None else 0.0, tag

    lines = ["### Retention by tag", "", "| tag | known | retained | regressed | retention |", "|---|---:|---:|---:|---:|"]
    for tag, stats in sorted(tags.items(), key=order):
        retention = "n/a" if stats["retention_rate"] is None else _percent(stats["retention_rate"])
        lines.append(f"| {_cell(tag)} | {stats['known']} | {stats['retained']} | {stats['regressed']} | {retention} |")
    return lines + [""]


def _worst_regressions_table(facts: list[dict[str, Any]]) -> list[str]:
    regressed = [fact for fact in facts if fact["verdict"] == REGRESSED]
    if not regressed:
        return []

    # Largest drop first; facts without a drop (regex facts) after every fact with one.
    regressed.sort(key=lambda fact: (fact["logprob_drop"] is None, -(fact["logprob_drop"] or 0.0), fact["id"]))
    worst = regressed[:WORST_REGRESSIONS]
    lines = [
        f"### Worst regressions ({len(worst)} of {len(regressed)}, largest drop in log p(expected) first)",
        "",
        "| fact | prompt | expected | base | candidate | failed checks | drop (nats) | KL (nats) | top-k overlap "
        "| rank change |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for fact in worst:
        cells = [
            _cell(fact["id"]),
            _cell(fact["prompt"]),
            _cell(" / ".join(fact["expect"])),
            _cell(fact["base_completion"].strip()),
            _cell(fact["candidate_completion"].strip()),
            _cell(", ".join(fact["failed_checks"])),
            _number(fact["logprob_drop"]),
            _number(fact["kl"]),
            _number(fact.get("top_k_overlap"), digits=2),
            _places(fact.get("rank_change")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += _tolerance_lines(worst)
    return lines


def _tolerance_lines(facts: list[dict[str, Any]]) -> list[str]:
    """State the effective tolerance of the listed facts: once when they share it, else per fact."""
    tolerances = {json.dumps(fact["tolerance"], sort_keys=True): fact["tolerance"] for fact in facts}
    if len(tolerances) == 1:
        return [f"Effective tolerance: {_tolerance_text(next(iter(tolerances.values())))}.", ""]
    lines = ["Effective tolerances:", ""]
    lines += [f"- {_inline(fact['id'])}: {_tolerance_text(fact['tolerance'])}" for fact in facts]
    return lines + [""]


def _tolerance_text(tolerance: dict[str, Any]) -> str:
    def value(name: str) -> str:
        return "n/a" if tolerance.get(name) is None else f"{tolerance[name]:g}"

    return (f"kl ≤ {value('kl')} nats, logprob_drop ≤ {value('logprob_drop')} nats, "
            f"top_k_overlap ≥ {value('top_k_overlap')}, rank_change ≤ {value('rank_change')} places")


def _gate_lines(gate: dict[str, Any] | None) -> list[str]:
    """Render the gate's result: one line for the thresholds over all facts, a table row per tag."""
    if not gate:
        return []
    lines = [f"### Gate ({gate['mode']}): {'passed' if gate['passed'] else 'failed'}", ""]
    if gate["thresholds"]:
        verdict = "passed" if not gate["breaches"] else "failed: " + "; ".join(gate["breaches"])
        lines.append(f"- All facts ({_thresholds_text(gate['thresholds'])}): {_inline(verdict)}")
        lines.append("")
    if gate["tags"]:
        lines += ["| tag | thresholds | result |", "|---|---|---|"]
        for tag, entry in gate["tags"].items():
            if not entry["checked"]:
                result = "not checked: no judged fact carries the tag"
            else:
                sentences = [sentence.removeprefix(f"tag {tag}: ") for sentence in entry["breaches"]]
                result = "passed" if entry["passed"] else "failed: " + "; ".join(sentences)
            lines.append(f"| {_cell(tag)} | {_cell(_thresholds_text(entry['thresholds']))} | {_cell(result)} |")
        lines.append("")
    return lines


def _thresholds_text(thresholds: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value:g}" for name, value in thresholds.items())


def _places(value: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:+d}" if value else "0"


def _cell(text: str) -> str:
    """Escape ``text`` for one cell of a GitHub table: Markdown syntax, ``|`` and line breaks."""
    if not text:
        return "(empty)"
    escaped = "".join("\\" + character if character in _MARKDOWN_SPECIAL else character for character in text)
    return escaped.replace("\r\n", "<br>").replace("\n", "<br>").replace("\r", "<br>")


def _inline(text: str) -> str:
    """Escape ``text`` for a heading or a sentence: the same as a cell, with line breaks as spaces."""
    return _cell(" ".join(text.split()))


def _percent(value: float) -> str:
    return f"{value:.1%}"


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _p_value(value: float) -> str:
    if value == 0.0:
        return "< 1e-300"  # the exact value underflowed a float
    return f"= {value:.3g}"
