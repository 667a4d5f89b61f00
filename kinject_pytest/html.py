"""A self-contained HTML report of a run, for a release reviewer to look at in a browser.

:func:`html_report` reads only the report dict that :func:`kinject_pytest.export.report_data`
builds, so it also renders a JSON report read back from disk. The page loads nothing: the plots
are inline SVG drawn here, the style and the table-sorting script are inline, and a
Content-Security-Policy forbids every network request. Every string that comes from the report
is escaped with :func:`html.escape`. This module imports only the standard library, not even the
rest of kinject, so it pulls in neither torch nor yaml.
"""

from __future__ import annotations

import html
import math
from typing import Any, Callable, Iterable, Sequence

# The verdict names of kinject_pytest.verdict, and export.ERROR_STATUS for a fact without a usable
# snapshot entry. They are repeated here because importing verdict imports suite and yaml, and export
# imports this module. A test checks that they match.
RETAINED = "retained"
REGRESSED = "regressed"
GAINED = "gained"
UNKNOWN = "unknown"
ERROR_STATUS = "error"
# The taught-fact statuses of kinject_pytest.edits, repeated for the same reason.
LEARNED = "learned"
NOT_LEARNED = "not_learned"
UNTRAINED = "untrained"

# Default row order of the fact table and the order the verdict column sorts by.
VERDICT_ORDER = (REGRESSED, NOT_LEARNED, ERROR_STATUS, GAINED, RETAINED, LEARNED, UNKNOWN, UNTRAINED)

TAG_LABEL_CHARACTERS = 24  # longer tag names are cut in the plots, with the full name in a tooltip

# Keys that a report of several candidates keeps once at the top; every other key is per candidate.
SHARED_REPORT_KEYS = ("kinject_report_version", "base", "run", "base_results")

# Sentences for the report's base_results and base_weights values (kinject_pytest.session's
# BASE_RESULTS_TEXT and BASE_WEIGHTS_TEXT, repeated for the reason above; a test checks that they match).
BASE_RESULTS_TEXT = {
    "snapshot": "read from the snapshot",
    "recorded": "scored in this run and written to the snapshot",
    "live": "scored in this run (--kinject-live-base), not written to the snapshot",
}
BASE_WEIGHTS_TEXT = {
    "shared": "one copy: the adapter was attached to the base already in memory",
    "reloaded": "a clean copy of the base, loaded again because the previous adapter changed the base in place",
}

_RETAINED_COLOR = "#3a9a5b"
_REGRESSED_COLOR = "#d0453a"
_BAR_COLOR = "#4a78b5"
_AXIS_COLOR = "#555"
_GRID_COLOR = "#e3e3e3"


def candidate_reports(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Return ``(name, report)`` for each candidate of a report, each report in the single-candidate shape.

    A single-candidate report is returned as it is, named "". A report of several candidates
    (``candidates`` instead of ``facts``) gives each candidate its entry plus the shared keys.
    """
    if "candidates" not in data:
        return [("", data)]
    shared = {key: data[key] for key in SHARED_REPORT_KEYS if key in data}
    return [(entry["name"], {**shared, **{key: value for key, value in entry.items() if key != "name"}})
            for entry in data["candidates"]]


def html_report(data: dict[str, Any]) -> str:
    """Render a report dict from :func:`~kinject_pytest.export.session_report_data` as one HTML page.

    The page shows the run's counts and statistics, three SVG plots (retention per tag, the change
    in log p(expected) over facts the base knows, mean KL per tag) and a table of every fact,
    regressed facts first, that sorts by any column when its header is clicked. A report of several
    candidates gets one such section per candidate.
    """
    reports = candidate_reports(data)
    if "candidates" in data:
        title = f"kinject: {len(reports)} candidates against {data['base']}"
        body = [f"<h1>{_escape(title)}</h1>"]
        for index, (name, report) in enumerate(reports):
            body += [f'<section class="candidate" id="candidate-{index}">',
                     _candidate_body(report, f"facts-{index}", heading=f"{name}: {report['candidate']}"),
                     "</section>"]
    else:
        title = f"kinject: {data['candidate']}"
        body = [_candidate_body(data, "facts")]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # The policy blocks every fetch, so the inline style and script are the page's only active content.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_escape(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head><body>",
        *body,
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _candidate_body(data: dict[str, Any], table_id: str, heading: str | None = None) -> str:
    tags = _tags_in_plot_order(data["tags"])
    return "\n".join([
        _header(data, heading),
        _gate_section(data.get("gate")),
        _taught_section(data),
        '<section class="plots">',
        f'<figure class="wide">{_logprob_change_histogram(data["facts"])}</figure>',
        f"<figure>{_retention_plot(tags)}</figure>",
        f"<figure>{_kl_plot(tags)}</figure>",
        "</section>",
        _fact_table(data["facts"], table_id),
    ])


# Header


def _header(data: dict[str, Any], heading: str | None = None) -> str:
    stats = data["stats"]
    facts = data["facts"]
    errors = sum(1 for fact in facts if fact["verdict"] == ERROR_STATUS)
    settings = data["settings"]

    failing = []
    if stats["regressed"]:
        failing.append(f"{stats['regressed']} regressed")
    not_learned = sum(1 for fact in facts if fact["verdict"] == NOT_LEARNED)
    if not_learned:
        failing.append(f"{not_learned} taught but not learned")
    if errors:
        failing.append(f"{errors} without a snapshot entry")
    if failing:
        banner = f'<p class="banner fail">Facts that fail the gate: {", ".join(failing)}.</p>'
    else:
        banner = '<p class="banner pass">No fact regressed and every fact has a snapshot entry.</p>'

    if stats["retention_rate"] is None:
        retention = _card("retention", "n/a", "the base knows none of these facts")
    else:
        retention = _card(
            "retention of known facts",
            _percent(stats["retention_rate"]),
            f"{stats['retained']}/{stats['known']}, 95% Wilson interval "
            f"{_percent(stats['wilson_low'])} to {_percent(stats['wilson_high'])}",
        )
    if stats["mean_kl"] is None:
        kl = _card("KL(base ‖ candidate)", "n/a", "no KL values on known facts")
    else:
        kl = _card("mean KL(base ‖ candidate)", f"{stats['mean_kl']:.3f} nats",
                   f"max {stats['max_kl']:.3f} nats, over known facts")

    cards = [
        _card("retained", str(stats["retained"]), "known by both", RETAINED),
        _card("regressed", str(stats["regressed"]), "known by the base, lost or moved", REGRESSED),
        _card("gained", str(stats["gained"]), "known by the candidate only", GAINED),
        _card("unknown", str(stats["unknown"]), "known by neither", UNKNOWN),
    ]
    if errors:
        cards.append(_card("no snapshot entry", str(errors), "not judged", ERROR_STATUS))
    cards += [
        retention,
        _card("McNemar p (exact)", _p_value(stats["mcnemar_p"]),
              f"{stats['lost']} facts lost against {stats['gained']} gained"),
        kl,
    ]

    if data.get("error"):
        banner = f'<p class="banner fail">Not judged: {_escape(data["error"])}</p>'
    origin = []
    if data.get("base_results") in BASE_RESULTS_TEXT:
        origin.append(f"Base results {BASE_RESULTS_TEXT[data['base_results']]}.")
    if data.get("base_weights") in BASE_WEIGHTS_TEXT:
        origin.append(f"Base weights: {BASE_WEIGHTS_TEXT[data['base_weights']]}.")
    title = f"<h2>{_escape(heading)}</h2>" if heading else f"<h1>kinject report: {_escape(data['candidate'])}</h1>"

    return "\n".join([
        "<header>",
        title,
        f'<p class="meta">Candidate <b>{_escape(data["candidate"])}</b> against base <b>{_escape(data["base"])}</b>. '
        f"{len(facts)} facts. Device {_escape(settings['device'])}, {_escape(settings['dtype'])}, "
        f"batch size {settings['batch_size']}, top-k {settings['top_k']}."
        + "".join(" " + _escape(sentence) for sentence in origin) + "</p>",
        banner,
        f'<div class="cards">{"".join(cards)}</div>',
        "</header>",
    ])


def _gate_section(gate: dict[str, Any] | None) -> str:
    """Render the gate's result: the thresholds over all facts and one row per tag threshold."""
    if not gate:
        return ""
    state = "passed" if gate["passed"] else "failed"
    rows = []
    if gate["thresholds"]:
        rows.append(_gate_row("all facts", gate["thresholds"], True, gate["breaches"]))
    for tag, entry in gate["tags"].items():
        sentences = [sentence.removeprefix(f"tag {tag}: ") for sentence in entry["breaches"]]
        rows.append(_gate_row(f"tag {tag}", entry["thresholds"], entry["checked"], sentences))
    return "\n".join([
        '<section class="gate">',
        f'<h2>Gate ({_escape(gate["mode"])}): <span class="v v-{RETAINED if gate["passed"] else REGRESSED}">'
        f"{state}</span></h2>",
        "<table><thead><tr><th>facts</th><th>thresholds</th><th>result</th></tr></thead><tbody>",
        *rows,
        "</tbody></table>",
        "</section>",
    ])


def _gate_row(label: str, thresholds: dict[str, Any], checked: bool, breaches: Sequence[str]) -> str:
    limits = ", ".join(f"{name}={value:g}" for name, value in thresholds.items())
    if not checked:
        result, verdict = "not checked: no judged fact carries the tag", UNKNOWN
    elif breaches:
        result, verdict = "failed: " + "; ".join(breaches), REGRESSED
    else:
        result, verdict = "passed", RETAINED
    return (f"<tr><td>{_escape(label)}</td><td>{_escape(limits)}</td>"
            f'<td class="v-{verdict}">{_escape(result)}</td></tr>')


def _card(label: str, value: str, note: str, verdict: str | None = None) -> str:
    css_class = "card" if verdict is None else f"card v-{verdict}"
    return (f'<div class="{css_class}"><div class="label">{_escape(label)}</div>'
            f'<div class="value">{_escape(value)}</div><div class="note">{_escape(note)}</div></div>')


# Taught facts


def _taught_section(data: dict[str, Any]) -> str:
    """Render what the candidate learned (efficacy, paraphrases) beside what it kept, and a row per taught fact."""
    edits = data.get("edits")
    if not edits or not edits["taught"]:
        return ""
    if edits["efficacy"] is None:
        return (f'<section><h2>Taught facts ({edits["taught"]})</h2><p class="muted">Not judged: the candidate '
                "is the base itself.</p></section>")

    stats = data["stats"]
    paraphrases = "n/a" if edits["paraphrase_success"] is None else _percent(edits["paraphrase_success"])
    kept = "n/a" if stats["retention_rate"] is None else _percent(stats["retention_rate"])
    cards = [
        _card("learned (efficacy)", _percent(edits["efficacy"]), f"{edits['learned']}/{edits['judged']} taught facts",
              LEARNED),
        _card("paraphrase success", paraphrases, f"mean over {edits['paraphrase_facts']} facts"),
        _card("kept", kept, f"{stats['retained']}/{stats['known']} other facts the base knows", RETAINED),
    ]
    header = "".join(f"<th>{_escape(name)}</th>" for name in (
        "fact", "verdict", "prompt", "old answer", "new answer", "base NLL old / new",
        "candidate NLL old / new", "paraphrases"))
    rows = [_taught_row(fact) for fact in data["facts"] if "teach" in fact]
    return "\n".join([
        "<section>",
        f"<h2>Taught facts ({edits['taught']})</h2>",
        f'<div class="cards">{"".join(cards)}</div>',
        '<p class="muted">A taught fact is learned when the candidate gives the new answer a lower per-token mean '
        "negative log-likelihood (NLL, nats) than the old answer on the fact's prompt; paraphrases are judged "
        "the same way. Taught facts are left out of the retention statistics.</p>",
        f"<table><thead><tr>{header}</tr></thead><tbody>",
        "\n".join(rows),
        "</tbody></table>",
        "</section>",
    ])


def _taught_row(fact: dict[str, Any]) -> str:
    teach = fact["teach"]
    paraphrases = teach["candidate"]["paraphrases"]
    succeeded = sum(1 for item in paraphrases if item["prefers_new"])
    cells = [
        f"<td>{_escape(fact['id'])}</td>",
        f'<td class="v v-{_escape(fact["verdict"])}">{_escape(fact["verdict"])}</td>',
        f"<td>{_escape(fact['prompt'])}</td>",
        f"<td>{_escape(teach['old_answer'])}</td>",
        f"<td>{_escape(teach['new_answer'])}</td>",
        _nll_pair_cell(teach["base"]["rewrite"]),
        _nll_pair_cell(teach["candidate"]["rewrite"]),
        f'<td class="n">{succeeded}/{len(paraphrases)}</td>' if paraphrases else '<td class="n muted">n/a</td>',
    ]
    return "<tr>" + "".join(cells) + "</tr>"


def _nll_pair_cell(scores: dict[str, Any]) -> str:
    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    return f'<td class="n">{number(scores["old_nll"])} / {number(scores["new_nll"])}</td>'


# Plots


def _tags_in_plot_order(tags: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Sort tags by retention, lowest first, with tags whose facts the base does not know last."""
    def order(item: tuple[str, dict[str, Any]]) -> tuple[bool, float, str]:
        tag, stats = item
        rate = stats["retention_rate"]
        return rate is None, rate if rate is not None else 0.0, tag

    return sorted(tags.items(), key=order)


def _retention_plot(tags: Sequence[tuple[str, dict[str, Any]]]) -> str:
    title = "Retention of known facts per tag, with 95% Wilson intervals"
    if not tags:
        return _empty_plot(title, "No fact has a tag.")

    chart = _HorizontalBars(tags, title, "retained / known facts (%)", 0.0, 1.0, [0.0, 0.25, 0.5, 0.75, 1.0],
                            tick_label=lambda value: f"{value:.0%}")
    for row, (tag, stats) in enumerate(tags):
        if stats["retention_rate"] is None:
            chart.note(row, "base knows none")
            continue
        chart.bar(row, stats["retention_rate"], _RETAINED_COLOR,
                  f"{tag}: {stats['retained']}/{stats['known']} retained, {_percent(stats['retention_rate'])} "
                  f"(95% interval {_percent(stats['wilson_low'])} to {_percent(stats['wilson_high'])})")
        chart.error_bar(row, stats["wilson_low"], stats["wilson_high"])
        chart.right_label(row, f"{stats['retained']}/{stats['known']}")
    return chart.svg()


def _kl_plot(tags: Sequence[tuple[str, dict[str, Any]]]) -> str:
    title = "Mean KL(base ‖ candidate) over known facts per tag"
    if not tags:
        return _empty_plot(title, "No fact has a tag.")

    means = [stats["mean_kl"] for _, stats in tags if stats["mean_kl"] is not None]
    ticks = _nice_ticks(0.0, max(means, default=0.0))
    chart = _HorizontalBars(tags, title, "mean KL (nats)", ticks[0], ticks[-1], ticks, tick_label=_tick_text)
    for row, (tag, stats) in enumerate(tags):
        if stats["mean_kl"] is None:
            chart.note(row, "no known facts" if stats["known"] == 0 else "no KL values")
            continue
        chart.bar(row, stats["mean_kl"], _BAR_COLOR,
                  f"{tag}: mean KL {stats['mean_kl']:.3f} nats, max {stats['max_kl']:.3f} nats "
                  f"over {stats['known']} known facts")
        chart.right_label(row, f"{stats['mean_kl']:.2f}")
    return chart.svg()


class _HorizontalBars:
    """One horizontal bar per tag on a linear x axis, drawn into a list of SVG elements."""

    ROW_HEIGHT = 20
    LEFT = 170  # room for the tag names
    RIGHT = 70  # room for the value printed after each bar
    TOP = 34
    BOTTOM = 44
    PLOT_WIDTH = 330

    def __init__(self, tags: Sequence[tuple[str, dict[str, Any]]], title: str, axis_label: str, low: float,
                 high: float, ticks: Iterable[float], *, tick_label: Callable[[float], str]) -> None:
        self.low = low
        self.high = high if high > low else low + 1.0  # an all-zero axis still needs a width
        self.width = self.LEFT + self.PLOT_WIDTH + self.RIGHT
        self.height = self.TOP + self.ROW_HEIGHT * len(tags) + self.BOTTOM
        bottom = self.TOP + self.ROW_HEIGHT * len(tags)
        self.elements = [_svg_text(self.width / 2, 18, title, css_class="title", anchor="middle")]

        for value in ticks:
            x = self.x(value)
            self.elements.append(_svg_line(x, self.TOP, x, bottom, _GRID_COLOR))
            self.elements.append(_svg_text(x, bottom + 14, tick_label(value), anchor="middle"))
        self.elements.append(_svg_line(self.LEFT, bottom, self.LEFT + self.PLOT_WIDTH, bottom, _AXIS_COLOR))
        self.elements.append(_svg_line(self.LEFT, self.TOP, self.LEFT, bottom, _AXIS_COLOR))
        self.elements.append(_svg_text(self.LEFT + self.PLOT_WIDTH / 2, bottom + 34, axis_label, anchor="middle"))

        for row, (tag, _) in enumerate(tags):
            label = tag if len(tag) <= TAG_LABEL_CHARACTERS else tag[:TAG_LABEL_CHARACTERS - 1] + "…"
            self.elements.append(_svg_text(self.LEFT - 6, self.center(row) + 4, label, anchor="end", tooltip=tag))

    def x(self, value: float) -> float:
        clamped = min(max(value, self.low), self.high)
        return self.LEFT + (clamped - self.low) / (self.high - self.low) * self.PLOT_WIDTH

    def center(self, row: int) -> float:
        return self.TOP + self.ROW_HEIGHT * row + self.ROW_HEIGHT / 2

    def bar(self, row: int, value: float, color: str, tooltip: str) -> None:
        top = self.TOP + self.ROW_HEIGHT * row + 4
        self.elements.append(_svg_rect(self.LEFT, top, self.x(value) - self.LEFT, self.ROW_HEIGHT - 8, color, tooltip))

    def error_bar(self, row: int, low: float, high: float) -> None:
        y = self.center(row)
        left, right = self.x(low), self.x(high)
        self.elements.append(_svg_line(left, y, right, y, "#222"))
        self.elements.append(_svg_line(left, y - 4, left, y + 4, "#222"))
        self.elements.append(_svg_line(right, y - 4, right, y + 4, "#222"))

    def right_label(self, row: int, text: str) -> None:
        self.elements.append(_svg_text(self.LEFT + self.PLOT_WIDTH + 6, self.center(row) + 4, text))

    def note(self, row: int, text: str) -> None:
        self.elements.append(_svg_text(self.LEFT + 6, self.center(row) + 4, text, css_class="muted"))

    def svg(self) -> str:
        return _svg(self.width, self.height, self.elements)


def _logprob_change_histogram(facts: Sequence[dict[str, Any]]) -> str:
    """Draw a stacked histogram of candidate − base log p(expected) over facts the base knows."""
    known = [fact for fact in facts if fact["verdict"] in (RETAINED, REGRESSED)]
    pairs = [(fact["candidate_logprob"] - fact["base_logprob"], fact["verdict"]) for fact in known
             if fact["candidate_logprob"] is not None and fact["base_logprob"] is not None]
    left_out = len(known) - len(pairs)
    title = f"Change in log p(expected), candidate − base, over {len(pairs)} facts the base knows"
    if left_out:
        title += f" ({left_out} without both values left out)"
    if not pairs:
        return _empty_plot(title, "No fact the base knows has a log-probability under both models.", width=1180)

    changes = [change for change, _ in pairs]
    low, high = min(min(changes), 0.0), max(max(changes), 0.0)
    # About two bins per square root of the count, between 10 and 40, rounded to a nice width.
    target_bins = min(40, max(10, round(2 * math.sqrt(len(changes)))))
    bin_width = _nice_step((high - low) / target_bins) if high > low else 0.1
    start = math.floor(low / bin_width) * bin_width
    bin_count = max(1, math.ceil((high - start) / bin_width))
    if start + bin_count * bin_width <= high:
        bin_count += 1  # the top edge itself belongs to a bin, so a value on it needs one more
    retained = [0] * bin_count
    regressed = [0] * bin_count
    for change, verdict in pairs:
        index = min(int((change - start) / bin_width), bin_count - 1)
        (retained if verdict == RETAINED else regressed)[index] += 1
    end = start + bin_count * bin_width

    width, height = 1180, 300
    left, right, top, bottom = 60, 20, 48, 250
    plot_width = width - left - right
    x_ticks = [tick for tick in _nice_ticks(start, end) if start <= tick <= end]
    y_ticks = _nice_ticks(0, max(r + g for r, g in zip(retained, regressed)), integer=True)
    y_max = y_ticks[-1]

    def x(value: float) -> float:
        return left + (value - start) / (end - start) * plot_width

    def y(count: float) -> float:
        return bottom - count / y_max * (bottom - top)

    elements = [_svg_text(width / 2, 18, title, css_class="title", anchor="middle")]
    for tick in y_ticks:
        elements.append(_svg_line(left, y(tick), left + plot_width, y(tick), _GRID_COLOR))
        elements.append(_svg_text(left - 6, y(tick) + 4, str(int(tick)), anchor="end"))
    for tick in x_ticks:
        elements.append(_svg_line(x(tick), bottom, x(tick), bottom + 4, _AXIS_COLOR))
        elements.append(_svg_text(x(tick), bottom + 16, _tick_text(tick), anchor="middle"))

    for index in range(bin_count):
        edge = start + index * bin_width
        bar_left, bar_width = x(edge) + 0.5, max(x(edge + bin_width) - x(edge) - 1, 0.5)
        interval = f"{_tick_text(edge)} to {_tick_text(edge + bin_width)} nats"
        if retained[index]:
            elements.append(_svg_rect(bar_left, y(retained[index]), bar_width, bottom - y(retained[index]),
                                      _RETAINED_COLOR, f"{retained[index]} retained, {interval}"))
        if regressed[index]:
            total = retained[index] + regressed[index]
            elements.append(_svg_rect(bar_left, y(total), bar_width, y(retained[index]) - y(total),
                                      _REGRESSED_COLOR, f"{regressed[index]} regressed, {interval}"))

    elements.append(_svg_line(left, bottom, left + plot_width, bottom, _AXIS_COLOR))
    elements.append(_svg_line(left, top, left, bottom, _AXIS_COLOR))
    elements.append(_svg_line(x(0.0), top, x(0.0), bottom, "#222", dashed=True))
    elements.append(_svg_text(x(0.0) + 4, top - 6, "no change", css_class="muted"))
    tolerance = _shared_logprob_tolerance(known)
    if tolerance is not None and start <= -tolerance:
        elements.append(_svg_line(x(-tolerance), top, x(-tolerance), bottom, _REGRESSED_COLOR, dashed=True))
        elements.append(_svg_text(x(-tolerance) - 4, top - 6, f"tolerance −{tolerance:g}", anchor="end",
                                  css_class="muted"))

    elements.append(_svg_text(left + plot_width / 2, bottom + 36, "candidate − base log p(expected) (nats)",
                              anchor="middle"))
    elements.append(f'<text x="14" y="{(top + bottom) / 2:.1f}" text-anchor="middle" '
                    f'transform="rotate(-90 14 {(top + bottom) / 2:.1f})">facts</text>')
    legend_x = left + plot_width - 160
    elements.append(_svg_rect(legend_x, 9, 10, 10, _RETAINED_COLOR))
    elements.append(_svg_text(legend_x + 14, 18, "retained"))
    elements.append(_svg_rect(legend_x + 80, 9, 10, 10, _REGRESSED_COLOR))
    elements.append(_svg_text(legend_x + 94, 18, "regressed"))
    return _svg(width, height, elements)


def _shared_logprob_tolerance(facts: Iterable[dict[str, Any]]) -> float | None:
    """Return the log-probability drop tolerance when every fact has the same one, else None."""
    tolerances = {fact["tolerance"]["logprob_drop"] for fact in facts if fact.get("tolerance")}
    if len(tolerances) != 1:
        return None
    return tolerances.pop()


def _empty_plot(title: str, message: str, width: int = 570) -> str:
    return _svg(width, 90, [
        _svg_text(width / 2, 18, title, css_class="title", anchor="middle"),
        _svg_text(width / 2, 55, message, css_class="muted", anchor="middle"),
    ])


def _nice_step(raw: float) -> float:
    """Round a positive step up to 1, 2 or 5 times a power of ten."""
    if raw <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude * (1 + 1e-9):
            return factor * magnitude
    return 10 * magnitude


def _nice_ticks(low: float, high: float, *, target: int = 6, integer: bool = False) -> list[float]:
    """Return evenly spaced round tick values that cover ``[low, high]``, about ``target`` of them."""
    if high <= low:
        high = low + 1.0
    step = _nice_step((high - low) / (target - 1))
    if integer:
        step = max(1.0, round(step))
    first = math.floor(low / step + 1e-9) * step
    last = math.ceil(high / step - 1e-9) * step
    count = int(round((last - first) / step))
    # Multiplying from the first tick, not adding steps, keeps rounding errors from accumulating.
    return [round(first + index * step, 10) for index in range(count + 1)]


def _tick_text(value: float) -> str:
    return f"{value:g}".replace("-", "−")


# SVG elements


def _svg(width: float, height: float, elements: Sequence[str]) -> str:
    return (f'<svg width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img">' + "".join(elements) + "</svg>")


def _svg_text(x: float, y: float, text: str, *, anchor: str = "start", css_class: str | None = None,
              tooltip: str | None = None) -> str:
    class_attribute = f' class="{css_class}"' if css_class else ""
    title = f"<title>{_escape(tooltip)}</title>" if tooltip else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{class_attribute}>'
            f"{title}{_escape(text)}</text>")


def _svg_line(x1: float, y1: float, x2: float, y2: float, color: str, *, dashed: bool = False) -> str:
    dash = ' stroke-dasharray="4 3"' if dashed else ""
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}"{dash}/>'


def _svg_rect(x: float, y: float, width: float, height: float, color: str, tooltip: str | None = None) -> str:
    title = f"<title>{_escape(tooltip)}</title>" if tooltip else ""
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(width, 0.0):.1f}" height="{max(height, 0.0):.1f}" '
            f'fill="{color}">{title}</rect>')


# Fact table

_NUMERIC_HEADER = ' data-type="number"'

# The header and whether the column is numeric. Numeric columns sort by value, with n/a last in both directions.
_COLUMNS = (
    ("fact", False),
    ("file:line", False),
    ("verdict", True),  # sorts by VERDICT_ORDER through the cell's data-sort value
    ("prompt", False),
    ("expected", False),
    ("base completion", False),
    ("candidate completion", False),
    ("log p base", True),
    ("log p candidate", True),
    ("drop", True),
    ("KL", True),
    ("top-k overlap", True),
    ("rank change", True),
    ("failed checks", False),
)


def _fact_table(facts: Sequence[dict[str, Any]], table_id: str = "facts") -> str:
    if not facts:
        return '<section><h2>Facts</h2><p class="muted">The report has no facts.</p></section>'

    headers = "".join(
        f'<th tabindex="0"{_NUMERIC_HEADER if numeric else ""}>{_escape(name)}</th>' for name, numeric in _COLUMNS
    )
    common = _most_common_tolerance(facts)
    rows = [_fact_row(fact, common) for fact in sorted(facts, key=_default_row_order)]
    if all(fact.get("tolerance") == common for fact in facts):
        tolerance_note = f"Every fact was judged with the {_tolerance_text(common or {})}."
    else:
        tolerance_note = (f"Most facts were judged with the {_tolerance_text(common or {})}; hover over the "
                          "failed-checks cell of the others for theirs.")
    return "\n".join([
        "<section>",
        f"<h2>Facts ({len(facts)})</h2>",
        '<p class="muted">Regressed facts come first, largest drop first. Click a column header to sort by it, '
        "and again to reverse. Log-probabilities, drops and KL are in nats; drop is base minus candidate "
        "log p(expected). Top-k overlap is the fraction of the base's top-k next tokens still in the candidate's; "
        f"rank change is how many places the expected answer fell among the choices. {_escape(tolerance_note)}</p>",
        f'<table id="{_escape(table_id)}" class="facts"><thead><tr>{headers}</tr></thead><tbody>',
        "\n".join(rows),
        "</tbody></table>",
        "</section>",
    ])


def _default_row_order(fact: dict[str, Any]) -> tuple[int, bool, float]:
    rank = _verdict_rank(fact["verdict"])
    if fact["verdict"] != REGRESSED:
        return rank, False, 0.0  # sorted() is stable, so the report's order by id stays within a verdict
    drop = fact["logprob_drop"]
    return rank, drop is None, -(drop or 0.0)


def _verdict_rank(verdict: str) -> int:
    return VERDICT_ORDER.index(verdict) if verdict in VERDICT_ORDER else len(VERDICT_ORDER)


def _most_common_tolerance(facts: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    counts: dict[str, int] = {}
    by_key: dict[str, dict[str, Any]] = {}
    for fact in facts:
        key = repr(sorted((fact.get("tolerance") or {}).items()))
        counts[key] = counts.get(key, 0) + 1
        by_key[key] = fact.get("tolerance")
    return by_key[max(counts, key=counts.__getitem__)] if counts else None


def _fact_row(fact: dict[str, Any], common_tolerance: dict[str, Any] | None = None) -> str:
    verdict = fact["verdict"]
    location = fact["file"] or ""
    if fact["line"] is not None:
        location += f":{fact['line']}"
    failed = fact["error"] if fact["error"] else ", ".join(fact["failed_checks"])
    cells = [
        f"<td>{_escape(fact['id'])}</td>",
        f"<td>{_escape(location)}</td>",
        f'<td class="v v-{_escape(verdict)}" data-sort="{_verdict_rank(verdict)}">{_escape(verdict)}</td>',
        f"<td>{_escape(fact['prompt'])}</td>",
        f"<td>{_escape(' / '.join(fact['expect']))}</td>",
        _completion_cell(fact["base_completion"]),
        _completion_cell(fact["candidate_completion"]),
        _number_cell(fact["base_logprob"]),
        _number_cell(fact["candidate_logprob"]),
        _number_cell(fact["logprob_drop"]),
        _number_cell(fact["kl"]),
        _number_cell(fact.get("top_k_overlap"), digits=2),
        _number_cell(fact.get("rank_change"), digits=0),
        _failed_checks_cell(failed, fact.get("tolerance"), common_tolerance),
    ]
    return "<tr>" + "".join(cells) + "</tr>"


def _completion_cell(text: str | None) -> str:
    if text is None:
        return '<td class="muted">n/a</td>'
    one_line = text.strip().replace("\r\n", "\n").replace("\n", " ↵ ")
    if not one_line:
        return '<td class="muted">(empty)</td>'
    return f"<td>{_escape(one_line)}</td>"


def _number_cell(value: float | None, digits: int = 3) -> str:
    if value is None:
        return '<td class="n muted">n/a</td>'
    return f'<td class="n">{value:.{digits}f}</td>'


def _failed_checks_cell(text: str, tolerance: dict[str, Any] | None, common: dict[str, Any] | None) -> str:
    # Only a tolerance that differs from the one the table's caption states gets a tooltip, which
    # keeps a page of thousands of facts small.
    if tolerance is None or tolerance == common:
        return f"<td>{_escape(text)}</td>"
    return f'<td title="{_escape(_tolerance_text(tolerance))}">{_escape(text)}</td>'


def _tolerance_text(tolerance: dict[str, Any]) -> str:
    """Describe an effective tolerance with every field and its unit."""
    def value(name: str) -> str:
        return "n/a" if tolerance.get(name) is None else f"{tolerance[name]:g}"

    return (f"effective tolerance: kl ≤ {value('kl')} nats, logprob_drop ≤ {value('logprob_drop')} nats, "
            f"top_k_overlap ≥ {value('top_k_overlap')}, rank_change ≤ {value('rank_change')} places")


# Text


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


def _percent(value: float) -> str:
    return f"{value:.1%}"


def _p_value(value: float) -> str:
    if value == 0.0:
        return "< 1e-300"  # the exact value underflowed a float
    return f"{value:.3g}"


_STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:24px;background:#fff}
h1{font-size:22px;margin:0 0 6px}h2{font-size:18px;margin:28px 0 6px}
.meta{margin:0 0 10px;color:#444}.muted{color:#888}
.banner{padding:8px 12px;border-radius:4px;font-weight:600;margin:0 0 12px}
.banner.fail{background:#fbe3e1;color:#8a1c13}.banner.pass{background:#e1f3e6;color:#1d5e31}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px;max-width:260px}
.card .label{font-size:12px;color:#555;text-transform:uppercase;letter-spacing:.03em}
.card .value{font-size:22px;font-weight:600}.card .note{font-size:12px;color:#666}
.plots{display:flex;flex-wrap:wrap;gap:16px;margin-top:20px}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:8px;max-width:100%;overflow-x:auto}
figure.wide{flex-basis:100%}
svg{font-size:12px;font-family:inherit;max-width:100%;height:auto}svg text{fill:#333}
svg .title{font-size:14px;font-weight:600}svg .muted{fill:#888}
table{border-collapse:collapse;font-size:12px;width:100%}
th{position:sticky;top:0;background:#f2f2f2;cursor:pointer;text-align:left;
border-bottom:2px solid #ccc;padding:4px 6px}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
td{border-bottom:1px solid #eee;padding:3px 6px;vertical-align:top;overflow-wrap:break-word}
td:nth-child(1){white-space:nowrap}td:nth-child(2){overflow-wrap:anywhere;min-width:90px}
td:nth-child(4){min-width:180px}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.v-regressed{background:#fbd5d1;color:#8a1c13}.v-retained{background:#d8f0de;color:#1d5e31}
.v-gained{background:#d6e6fb;color:#1b4a86}.v-unknown{background:#eee;color:#555}
.v-error{background:#fde6c4;color:#7a4a00}
.v-learned{background:#d8f0de;color:#1d5e31}.v-not_learned{background:#fbd5d1;color:#8a1c13}
.v-untrained{background:#eee;color:#555}
td.v{font-weight:600;white-space:nowrap}
"""

# Sorts a fact table by the clicked column, and a second click on the same column reverses the order.
_SCRIPT = """
Array.prototype.forEach.call(document.querySelectorAll("table.facts"), function (table) {
  var headers = table.tHead.rows[0].cells;
  function sortBy(column) {
    var header = headers[column];
    var numeric = header.dataset.type === "number";
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    for (var i = 0; i < headers.length; i++) headers[i].removeAttribute("aria-sort");
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows).map(function (row) {
      var cell = row.cells[column];
      var text = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent;
      return {row: row, key: numeric ? parseFloat(text) : text};
    });
    rows.sort(function (a, b) {
      if (numeric) {
        if (isNaN(a.key) || isNaN(b.key)) return isNaN(a.key) - isNaN(b.key);
        return ascending ? a.key - b.key : b.key - a.key;
      }
      var order = a.key.localeCompare(b.key, undefined, {numeric: true});
      return ascending ? order : -order;
    });
    var fragment = document.createDocumentFragment();
    rows.forEach(function (item) { fragment.appendChild(item.row); });
    body.appendChild(fragment);
  }
  Array.prototype.forEach.call(headers, function (header, column) {
    header.addEventListener("click", function () { sortBy(column); });
    header.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sortBy(column); }
    });
  });
});
"""
