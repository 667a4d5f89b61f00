"""The HTML report, from hand-built report dicts: content, escaping, plots, empty cases, rendering."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kinject_pytest import export
from kinject_pytest.export import report_data, write_reports
from kinject_pytest.html import ERROR_STATUS, GAINED, REGRESSED, RETAINED, UNKNOWN, _nice_ticks, html_report
from kinject_pytest.session import Options, Outcome, RunSummary
from kinject_pytest.stats import wilson_interval
from kinject_pytest.suite import Fact, Tolerance
from kinject_pytest.verdict import STATUSES, Verdict

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="Debian's chromium is not installed (apt-get install chromium)")

# HTML elements that have no end tag.
VOID_ELEMENTS = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "embed", "source", "track", "wbr"}


def fact_entry(fact_id: str, verdict: str, **fields) -> dict:
    """Build one fact of a report dict with the keys that report_data writes, overridden by ``fields``."""
    known = verdict in (RETAINED, REGRESSED)
    entry = {
        "id": fact_id,
        "file": "suites/geo.kinject.jsonl",
        "line": 1,
        "prompt": f"Prompt of {fact_id} is",
        "expect": ["Paris"],
        "choices": [],
        "match": "prefix",
        "tags": ["capital"],
        "recorded": False,
        "error": None,
        "verdict": verdict,
        "failed_checks": ["generation", "kl", "logprob_drop"] if verdict == REGRESSED else [],
        "base_completion": " Paris." if known else " Lyon.",
        "candidate_completion": " Munich" if verdict == REGRESSED else " Paris.",
        "base_logprob": -0.25,
        "candidate_logprob": -4.25 if verdict == REGRESSED else -0.5,
        "logprob_drop": 4.0 if verdict == REGRESSED else 0.25,
        "kl": 1.5 if known else None,
        "top_k_overlap": 0.75 if known else None,
        "base_rank": None,
        "candidate_rank": None,
        "rank_change": None,
        "tolerance": {"kl": 0.5, "logprob_drop": 1.0, "top_k_overlap": 0.5, "rank_change": 1},
    }
    entry.update(fields)
    return entry


def tag_stats(retained: int, regressed: int, *, mean_kl: float | None = 0.75) -> dict:
    known = retained + regressed
    low, high = wilson_interval(retained, known)
    return {
        "known": known, "retained": retained, "regressed": regressed, "gained": 0, "unknown": 0, "lost": regressed,
        "retention_rate": retained / known if known else None, "wilson_low": low, "wilson_high": high,
        "mcnemar_p": 1.0, "mean_kl": mean_kl if known else None, "max_kl": 2 * mean_kl if known and mean_kl else None,
    }


def make_report(facts: list[dict], tags: dict | None = None, **stats) -> dict:
    """Build a report dict around ``facts``, with ``stats`` overriding the default run statistics."""
    low, high = wilson_interval(1, 3)
    run_stats = {
        "known": 3, "retained": 1, "regressed": 2, "gained": 1, "unknown": 1, "lost": 2, "retention_rate": 1 / 3,
        "wilson_low": low, "wilson_high": high, "mcnemar_p": 0.5, "mean_kl": 1.125, "max_kl": 1.5,
    }
    run_stats.update(stats)
    return {
        "kinject_report_version": 1,
        "candidate": "smollm2 + adapters/lora",
        "base": "smollm2",
        "settings": {"device": "cpu", "dtype": "float32", "batch_size": 64, "top_k": 20, "adapters": ["adapters/lora"]},
        "run": {"scored_facts": len(facts), "seconds_loading": 1.0, "seconds_scoring": 2.0, "snapshots_written": []},
        "stats": run_stats,
        "tags": {"capital": tag_stats(1, 2), "river": tag_stats(0, 0)} if tags is None else tags,
        "facts": facts,
    }


@pytest.fixture
def report() -> dict:
    return make_report([
        fact_entry("paris", RETAINED, line=3),
        fact_entry("rome", REGRESSED, line=4, logprob_drop=2.0, candidate_logprob=-2.25),
        fact_entry("tokyo", REGRESSED, line=5, prompt="<script>alert('tokyo')</script> is", tags=["capital", "asia"]),
        fact_entry("oslo", GAINED, line=6),
        fact_entry("quito", UNKNOWN, line=7, tags=[]),
        fact_entry("lima", ERROR_STATUS, line=8, error="no snapshot entry for fact 'lima'", base_completion=None,
                   candidate_completion=None, base_logprob=None, candidate_logprob=None, logprob_drop=None, kl=None),
    ])


class CellParser(HTMLParser):
    """Collect the text of each table row's cells, the tags that stay open, and every src/href value."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self.open_tags: list[str] = []
        self.links: list[str] = []
        self.in_cell = False

    def handle_starttag(self, tag, attrs):
        self.links += [value or "" for name, value in attrs if name in ("src", "href", "xlink:href")]
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self.rows[-1].append("")
            self.in_cell = True
        if tag not in VOID_ELEMENTS:
            self.open_tags.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.links += [value or "" for name, value in attrs if name in ("src", "href", "xlink:href")]

    def handle_endtag(self, tag):
        assert self.open_tags and self.open_tags[-1] == tag, f"</{tag}> closes <{self.open_tags[-1:]}>"
        self.open_tags.pop()
        if tag in ("td", "th"):
            self.in_cell = False

    def handle_data(self, data):
        if self.in_cell:
            self.rows[-1][-1] += data


def parse(page: str) -> CellParser:
    parser = CellParser()
    parser.feed(page)
    parser.close()
    return parser


def fact_rows(page: str) -> list[list[str]]:
    """Return the cells of the fact table's body rows, in page order."""
    rows = parse(page).rows
    header = rows.index(next(row for row in rows if row and row[0] == "fact"))
    return rows[header + 1:]


# Content


def test_page_is_one_balanced_document(report):
    page = html_report(report)
    assert page.startswith("<!DOCTYPE html>\n")
    assert page.endswith("</html>\n")
    parser = parse(page)
    assert parser.open_tags == []


def test_every_fact_id_and_location(report):
    rows = fact_rows(html_report(report))
    assert sorted(row[0] for row in rows) == ["lima", "oslo", "paris", "quito", "rome", "tokyo"]
    locations = {row[0]: row[1] for row in rows}
    assert locations["paris"] == "suites/geo.kinject.jsonl:3"
    assert locations["lima"] == "suites/geo.kinject.jsonl:8"


def test_fact_row_cells(report):
    rows = {row[0]: row for row in fact_rows(html_report(report))}
    assert rows["rome"] == ["rome", "suites/geo.kinject.jsonl:4", "regressed", "Prompt of rome is", "Paris", "Paris.",
                            "Munich", "-0.250", "-2.250", "2.000", "1.500", "0.75", "n/a",
                            "generation, kl, logprob_drop"]
    # A fact without a verdict shows n/a for every number and its error in place of failed checks.
    assert rows["lima"][5:] == ["n/a"] * 8 + ["no snapshot entry for fact 'lima'"]


def test_header_counts_and_statistics(report):
    page = html_report(report)
    assert "<title>kinject: smollm2 + adapters/lora</title>" in page
    assert "against base <b>smollm2</b>" in page
    header = page[:page.index("<section")]
    fragments = [
        '<div class="value">33.3%</div>',
        "1/3, 95% Wilson interval 6.1% to 79.2%",
        '<div class="value">0.5</div>',
        "2 facts lost against 1 gained",
        '<div class="value">1.125 nats</div>',
        "max 1.500 nats",
        "Facts that fail the gate: 2 regressed, 1 without a snapshot entry.",
        '<div class="value">1</div>',  # the one gained fact
    ]
    for fragment in fragments:
        assert fragment in header


def test_passing_run_banner():
    page = html_report(make_report([fact_entry("paris", RETAINED)], known=1, retained=1, regressed=0, lost=0))
    assert "No fact regressed and every fact has a snapshot entry." in page
    assert "fail the gate" not in page


def test_mcnemar_p_that_underflowed(report):
    report["stats"]["mcnemar_p"] = 0.0
    assert "&lt; 1e-300" in html_report(report)


# Escaping and self-containment


def test_script_in_prompt_is_escaped(report):
    page = html_report(report)
    assert "&lt;script&gt;alert(&#x27;tokyo&#x27;)&lt;/script&gt; is" in page
    assert page.count("<script") == 1  # only the page's own sorting script
    rows = {row[0]: row for row in fact_rows(page)}
    assert rows["tokyo"][3] == "<script>alert('tokyo')</script> is"


def test_markup_in_every_text_field_is_escaped():
    markup = '<img src="x" onerror="alert(1)">&amp;'
    fact = fact_entry(markup, REGRESSED, file=markup, prompt=markup, expect=[markup], base_completion=markup,
                      candidate_completion=markup, error=None, failed_checks=[markup], tags=[markup])
    report = make_report([fact], tags={markup: tag_stats(0, 1)})
    report["candidate"] = report["base"] = markup
    report["settings"]["device"] = report["settings"]["dtype"] = markup

    page = html_report(report)
    assert "<img" not in page
    assert page.count("&lt;img src=&quot;x&quot; onerror=&quot;alert(1)&quot;&gt;&amp;amp;") >= 10


@settings(max_examples=60, deadline=None)
@given(prompt=st.text(max_size=40))
def test_any_prompt_round_trips_through_the_page(prompt):
    page = html_report(make_report([fact_entry("only", RETAINED, prompt=prompt)]))
    rows = fact_rows(page)
    assert rows[0][3] == prompt


def test_no_network_references(report):
    page = html_report(report)
    parser = parse(page)
    assert parser.links == []
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.IGNORECASE)
    assert "http://" not in page
    assert "https://" not in page
    assert "Content-Security-Policy" in page
    assert "default-src 'none'" in page


def test_module_imports_standard_library_only():
    code = (
        "import sys; before = set(sys.modules); import kinject_pytest.html; "
        "print(sorted(name for name in set(sys.modules) - before if not name.startswith('_') "
        "and name.split('.')[0] not in sys.stdlib_module_names))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "['kinject_pytest', 'kinject_pytest.html']"


# Plots


def test_three_svg_plots(report):
    page = html_report(report)
    assert page.count("<svg") == 3
    assert "Retention of known facts per tag, with 95% Wilson intervals" in page
    assert "Change in log p(expected), candidate − base, over 3 facts the base knows" in page
    assert "Mean KL(base ‖ candidate) over known facts per tag" in page


def test_histogram_counts_every_known_fact(report):
    page = html_report(report)
    retained = sum(int(count) for count in re.findall(r"<title>(\d+) retained, ", page))
    regressed = sum(int(count) for count in re.findall(r"<title>(\d+) regressed, ", page))
    assert (retained, regressed) == (1, 2)


def test_histogram_skips_facts_without_logprobs(report):
    report["facts"][1]["candidate_logprob"] = None
    page = html_report(report)
    assert "over 2 facts the base knows (1 without both values left out)" in page
    regressed = sum(int(count) for count in re.findall(r"<title>(\d+) regressed, ", page))
    assert regressed == 1


def test_histogram_marks_shared_tolerance(report):
    assert "tolerance −1</text>" in html_report(report)
    report["facts"][0]["tolerance"] = {"kl": 0.5, "logprob_drop": 2.0}
    assert "tolerance −" not in html_report(report)  # no single tolerance to mark


def test_histogram_value_on_top_edge():
    # Changes of exactly 0 and of a whole bin width put a value on a bin edge, the top one included.
    facts = [fact_entry(f"f{index}", RETAINED, base_logprob=0.0, candidate_logprob=float(index)) for index in range(3)]
    page = html_report(make_report(facts))
    retained = sum(int(count) for count in re.findall(r"<title>(\d+) retained, ", page))
    assert retained == 3


def test_retention_plot_per_tag(report):
    page = html_report(report)
    assert "capital: 1/3 retained, 33.3% (95% interval 6.1% to 79.2%)" in page
    assert ">1/3</text>" in page
    assert ">base knows none</text>" in page  # river has no known facts
    assert "capital: mean KL 0.750 nats, max 1.500 nats over 3 known facts" in page


def test_kl_plot_tag_without_values():
    tags = {"capital": tag_stats(1, 0, mean_kl=None), "river": tag_stats(0, 0)}
    page = html_report(make_report([fact_entry("paris", RETAINED, kl=None)], tags=tags))
    assert ">no KL values</text>" in page  # capital: known facts, but none with a KL value
    assert ">no known facts</text>" in page  # river


def test_long_tag_cut_in_plot():
    tag = "a-very-long-tag-name-that-goes-on-and-on"
    page = html_report(make_report([fact_entry("paris", RETAINED, tags=[tag])], tags={tag: tag_stats(1, 0)}))
    assert f"<title>{tag}</title>a-very-long-tag-name-th…</text>" in page


def test_nice_ticks():
    assert _nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert _nice_ticks(0.0, 4.34) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert _nice_ticks(-16.7, 6.2) == [-20.0, -15.0, -10.0, -5.0, 0.0, 5.0, 10.0]
    assert _nice_ticks(0, 2, integer=True) == [0.0, 1.0, 2.0]
    assert _nice_ticks(0.0, 0.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


# Fact table


def test_regressed_rows_first_by_largest_drop(report):
    rows = fact_rows(html_report(report))
    assert [(row[0], row[2]) for row in rows] == [
        ("tokyo", REGRESSED),  # drop 4.0
        ("rome", REGRESSED),  # drop 2.0
        ("lima", ERROR_STATUS),
        ("oslo", GAINED),
        ("paris", RETAINED),
        ("quito", UNKNOWN),
    ]


def test_verdict_cells_are_colour_coded(report):
    page = html_report(report)
    for verdict in (RETAINED, REGRESSED, GAINED, UNKNOWN, ERROR_STATUS):
        assert re.search(rf'<td class="v v-{verdict}" data-sort="\d">{verdict}</td>', page)
        assert f".v-{verdict}{{background:" in page


def test_numeric_columns_marked_for_sorting(report):
    page = html_report(report)
    numeric = re.findall(r'<th tabindex="0" data-type="number">([^<]+)</th>', page)
    assert numeric == ["verdict", "log p base", "log p candidate", "drop", "KL", "top-k overlap", "rank change"]


def test_completion_whitespace_shown(report):
    report["facts"][0]["candidate_completion"] = " Paris.\n\nIt is"
    report["facts"][3]["candidate_completion"] = "   "
    rows = {row[0]: row for row in fact_rows(html_report(report))}
    assert rows["paris"][6] == "Paris. ↵  ↵ It is"
    assert rows["oslo"][6] == "(empty)"


# Empty and large reports


def test_report_without_facts():
    page = html_report(make_report([], tags={}, known=0, retained=0, regressed=0, gained=0, unknown=0, lost=0,
                                   retention_rate=None, wilson_low=0.0, wilson_high=1.0, mcnemar_p=1.0,
                                   mean_kl=None, max_kl=None))
    assert page.count("<svg") == 3
    assert "The report has no facts." in page
    assert "the base knows none of these facts" in page
    assert "no KL values on known facts" in page
    assert "No fact has a tag." in page
    assert parse(page).open_tags == []


def test_report_where_base_knows_nothing():
    facts = [fact_entry("quito", UNKNOWN), fact_entry("oslo", GAINED)]
    page = html_report(make_report(facts, tags={"capital": tag_stats(0, 0)}, known=0, retained=0, regressed=0,
                                   retention_rate=None, mean_kl=None, max_kl=None))
    assert page.count("<svg") == 3
    assert "No fact the base knows has a log-probability under both models." in page
    assert ">base knows none</text>" in page
    assert ">no known facts</text>" in page
    assert sorted(row[0] for row in fact_rows(page)) == ["oslo", "quito"]


def test_fact_with_null_numbers():
    fact = fact_entry("inf", REGRESSED, candidate_logprob=None, logprob_drop=None, kl=None,
                      failed_checks=["logprob_drop"])
    page = html_report(make_report([fact, fact_entry("paris", RETAINED)]))
    rows = {row[0]: row for row in fact_rows(page)}
    assert rows["inf"][7:11] == ["-0.250", "n/a", "n/a", "n/a"]
    # A regressed fact without a drop sorts after every regressed fact with one.
    assert [row[0] for row in fact_rows(page)] == ["inf", "paris"]


def test_all_changes_zero():
    facts = [fact_entry(f"f{index}", RETAINED, candidate_logprob=-0.25) for index in range(4)]
    page = html_report(make_report(facts))
    assert "<title>4 retained, " in page


def test_thousands_of_facts_stay_small():
    facts = [
        fact_entry(f"known-{index}", REGRESSED if index % 3 else RETAINED, line=index + 1,
                   prompt=f"The fact number {index} of a long suite is about the capital of", tags=[f"P{index % 32}"],
                   candidate_logprob=-0.25 - (index % 97) / 7, logprob_drop=(index % 97) / 7)
        for index in range(3000)
    ]
    tags = {f"P{number}": tag_stats(30, 64) for number in range(32)}
    page = html_report(make_report(facts, tags=tags))

    assert len(page.encode("utf-8")) < 1_500_000  # under 500 bytes a fact
    assert len(fact_rows(page)) == 3000
    assert "<title>P31</title>P31</text>" in page


# Writing files


def test_write_reports_html(tmp_path, report):
    path = tmp_path / "kinject.HTML"
    write_reports([path], report)
    assert path.read_text(encoding="utf-8") == html_report(report)
    assert ".html" in export.SUPPORTED_SUFFIXES


def test_status_names_match_other_modules():
    assert ERROR_STATUS == export.ERROR_STATUS
    assert (RETAINED, REGRESSED, GAINED, UNKNOWN) == STATUSES


def test_report_data_output_renders():
    """A dict from report_data itself renders, so the keys read here match the keys written there."""
    fact = Fact(id="tokyo", prompt="<b>Tokyo</b> is in", expect=("Japan",), tags=("asia",),
                path=Path("suites/a.kinject.jsonl"), line=2)
    verdict = Verdict(fact_id="tokyo", status=REGRESSED, failed_checks=("generation",),
                      base_checks={"generation": True}, candidate_checks={"generation": False},
                      base_completion=" Japan", candidate_completion=" China", base_logprob=-0.5,
                      candidate_logprob=-3.0, kl=0.875, tolerance=Tolerance(kl=0.5, logprob_drop=1.0))
    missing = Fact(id="lima", prompt="Lima is in", expect=("Peru",), path=Path("suites/a.kinject.jsonl"), line=3)
    outcomes = [Outcome(fact, verdict=verdict), Outcome(missing, error="no snapshot entry for fact 'lima'")]
    data = report_data(outcomes, Options(model="smollm2"), RunSummary(scored_facts=1))

    page = html_report(data)
    rows = {row[0]: row for row in fact_rows(page)}
    assert rows["tokyo"][2:4] == [REGRESSED, "<b>Tokyo</b> is in"]
    assert rows["tokyo"][9] == "2.500"
    assert rows["lima"][2] == ERROR_STATUS
    assert "asia: 0/1 retained" in page


# Rendering in a browser


def run_chromium(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", *arguments,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def screenshot(tmp_path: Path, page: Path, name: str) -> Path:
    png = tmp_path / name
    run_chromium(tmp_path, "--window-size=1280,2000", f"--screenshot={png}", page.as_uri())
    return png


@needs_chromium
def test_chromium_renders_report(tmp_path, report):
    page = tmp_path / "report.html"
    page.write_text(html_report(report), encoding="utf-8")
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>", encoding="utf-8")

    png = screenshot(tmp_path, page, "report.png")
    blank_png = screenshot(tmp_path, blank, "blank.png")

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A blank page compresses to a few kB, and text, plots and coloured cells make it many times larger.
    assert png.stat().st_size > 5 * blank_png.stat().st_size


def click_headers(tmp_path: Path, report: dict, columns: list[int]) -> list[list[str]]:
    """Click the fact table's headers in ``columns`` order in Chromium and return the fact ids after each click.

    The clicks run from a script appended to a copy of the page, which stores the orders in the
    document title, and ``--dump-dom`` prints the page after its scripts ran.
    """
    script = (
        "<script>var orders = [];"
        f"{columns!r}.forEach(function (column) {{"
        "document.querySelectorAll('#facts th')[column].click();"
        "orders.push(Array.from(document.querySelectorAll('#facts tbody tr'), r => r.cells[0].textContent).join(','));"
        "}); document.title = orders.join(';');</script>"
    )
    page = tmp_path / "sorted.html"
    page.write_text(html_report(report).replace("</body>", script + "</body>"), encoding="utf-8")

    dom = run_chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    title = html.unescape(re.search(r"<title>(.*?)</title>", dom).group(1))
    return [order.split(",") for order in title.split(";")]


@needs_chromium
def test_chromium_sorts_numeric_column(tmp_path, report):
    for fact, kl in zip(report["facts"][:3], (0.25, 1.0, 0.125)):
        fact["kl"] = kl  # paris, rome, tokyo
    kl_column = 10

    # Sorting by fact id first puts the rows without KL (lima, oslo, quito) among the others.
    by_id, ascending, descending = click_headers(tmp_path, report, [0, kl_column, kl_column])

    # n/a sorts last in both directions, and the sort is stable, so those rows keep their order.
    assert by_id == ["lima", "oslo", "paris", "quito", "rome", "tokyo"]
    assert ascending == ["tokyo", "paris", "rome", "lima", "oslo", "quito"]
    assert descending == ["rome", "paris", "tokyo", "lima", "oslo", "quito"]


@needs_chromium
def test_chromium_sorts_text_then_verdict(tmp_path, report):
    by_id, by_verdict = click_headers(tmp_path, report, [0, 2])

    assert by_id == ["lima", "oslo", "paris", "quito", "rome", "tokyo"]
    # The verdict column sorts by its rank (regressed first), not alphabetically.
    assert by_verdict == ["rome", "tokyo", "lima", "oslo", "paris", "quito"]


def test_taught_section_and_banner():
    from test_export import taught_outcome

    from kinject_pytest.edits import EDIT_STATUSES
    from kinject_pytest.html import LEARNED, NOT_LEARNED, UNTRAINED

    data = export.report_data([taught_outcome("trento", True), taught_outcome("trento-again", False, line=10)],
                              Options(adapters=("lora",)), RunSummary())

    page = html_report(data)

    assert (LEARNED, NOT_LEARNED, UNTRAINED) == EDIT_STATUSES
    assert "Facts that fail the gate: 1 taught but not learned." in page
    assert "<h2>Taught facts (2)</h2>" in page
    assert '<div class="label">learned (efficacy)</div><div class="value">50.0%</div>' in page
    assert '<td class="v v-not_learned">not_learned</td>' in page
    assert '<td class="n">0.500 / 3.000</td><td class="n">3.000 / 1.000</td><td class="n">1/2</td>' in page


def test_gate_section_per_tag():
    gate = {
        "mode": "strict", "passed": False, "thresholds": {}, "breaches": [],
        "tags": {
            "capital": {"thresholds": {"max_regressed": 0}, "checked": True, "passed": False,
                        "breaches": ["tag capital: 2 facts regressed, more than the maximum 0 "
                                     "(--kinject-tag-threshold capital:max_regressed=0)"]},
            "river": {"thresholds": {"min_retention": 0.5}, "checked": True, "passed": True, "breaches": []},
        },
    }
    page = html_report({**make_report([fact_entry("paris", RETAINED)]), "gate": gate})

    assert '<h2>Gate (strict): <span class="v v-regressed">failed</span></h2>' in page
    assert ('<tr><td>tag capital</td><td>max_regressed=0</td><td class="v-regressed">failed: 2 facts regressed, '
            "more than the maximum 0 (--kinject-tag-threshold capital:max_regressed=0)</td></tr>") in page
    assert '<tr><td>tag river</td><td>min_retention=0.5</td><td class="v-retained">passed</td></tr>' in page
    assert "all facts" not in page


def test_no_gate_section_without_thresholds(report):
    assert "Gate (" not in html_report(report)


def test_differing_tolerance_in_tooltip():
    strict = {"kl": 0.1, "logprob_drop": 1.0, "top_k_overlap": 0.9, "rank_change": 0}
    page = html_report(make_report([fact_entry("paris", RETAINED), fact_entry("oslo", RETAINED),
                                    fact_entry("rome", REGRESSED, tolerance=strict)]))

    assert "Most facts were judged with the effective tolerance: kl ≤ 0.5 nats, logprob_drop ≤ 1 nats, " \
           "top_k_overlap ≥ 0.5, rank_change ≤ 1 places" in page
    assert page.count('<td title="') == 1
    assert ('<td title="effective tolerance: kl ≤ 0.1 nats, logprob_drop ≤ 1 nats, top_k_overlap ≥ 0.9, '
            'rank_change ≤ 0 places">generation, kl, logprob_drop</td>') in page
