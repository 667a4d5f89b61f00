"""Fact suites: files of prompts and expected answers, parsed into `Fact` records.

Two formats are read. A ``*.kinject.jsonl`` file has one JSON object per line, and its first
non-blank line may be a header record ``{"suite": {...}}`` with suite-level settings. A
``*.kinject.yaml`` (or ``.yml``) file is a mapping with the same settings at the top level and the
records under ``facts:``.

Every problem with a suite file raises `SuiteError` with a one-line message of the form
``FILE:LINE: what is wrong; how to fix it``, so pytest can show it without a traceback. This
module imports only the standard library and PyYAML, because pytest imports it while collecting.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import keyword
import math
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "MATCH_RULES",
    "SUITE_SUFFIXES",
    "Fact",
    "Suite",
    "SuiteError",
    "Teach",
    "Tolerance",
    "derive_fact_id",
    "is_suite_file",
    "strictest",
    "load_suite",
    "suite_name",
    "tolerance_problem",
]

MATCH_RULES = ("prefix", "exact", "contains", "regex")
SUITE_SUFFIXES = (".kinject.jsonl", ".kinject.yaml", ".kinject.yml")

# Fact ids become pytest node ids ("FILE::ID"), so they exclude spaces, slashes, colons and brackets.
FACT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

FACT_KEYS = ("id", "prompt", "expect", "choices", "tags", "match", "tolerance", "teach")
HEADER_KEYS = ("description", "source", "license", "defaults", "tag_tolerances")
YAML_TOP_KEYS = (*HEADER_KEYS, "facts")
DEFAULTS_KEYS = ("match", "tags", "tolerance")
TOLERANCE_KEYS = ("kl", "logprob_drop", "top_k_overlap", "rank_change")
TEACH_KEYS = ("answer", "paraphrases")

# Derived ids keep this many words of the prompt, and at most this many characters of them.
SLUG_MAX_WORDS = 6
SLUG_MAX_CHARS = 40

MINIMAL_RECORD = '{"id": "capital-france", "prompt": "The capital of France is", "expect": "Paris"}'


class SuiteError(ValueError):
    """Invalid or unreadable suite file, reported as ``FILE:LINE: problem; fix``."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, message: str) -> None:
        self.path = Path(path)
        self.line = line
        self.problem = message
        where = f"{os.fspath(path)}:{line}" if line is not None else os.fspath(path)
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Tolerance:
    """Allowed change between base and candidate. `None` leaves the limit to the fallback."""

    kl: float | None = None  # maximum KL(base || candidate) over the base's top-k, nats
    logprob_drop: float | None = None  # maximum drop of the best accepted answer's log-probability, nats
    top_k_overlap: float | None = None  # minimum fraction of the base's top-k tokens in the candidate's top-k
    rank_change: int | None = None  # maximum places the best accepted answer may fall among answers and choices

    def over(self, fallback: Tolerance) -> Tolerance:
        """Lay this tolerance over `fallback`: limits set here win, unset ones come from `fallback`."""
        return Tolerance(
            kl=self.kl if self.kl is not None else fallback.kl,
            logprob_drop=self.logprob_drop if self.logprob_drop is not None else fallback.logprob_drop,
            top_k_overlap=self.top_k_overlap if self.top_k_overlap is not None else fallback.top_k_overlap,
            rank_change=self.rank_change if self.rank_change is not None else fallback.rank_change,
        )


def strictest(tolerances: Iterable[Tolerance]) -> Tolerance:
    """Combine tolerances field by field, keeping the strictest limit each sets.

    The strictest limit is the smallest for `kl`, `logprob_drop` and `rank_change`, and the largest
    for `top_k_overlap`, which is a minimum. A field none of them sets stays `None`.
    """
    tolerances = list(tolerances)

    def pick(name: str, choose: Callable[[list[Any]], Any]) -> Any:
        values = [getattr(tolerance, name) for tolerance in tolerances if getattr(tolerance, name) is not None]
        return choose(values) if values else None

    return Tolerance(
        kl=pick("kl", min),
        logprob_drop=pick("logprob_drop", min),
        top_k_overlap=pick("top_k_overlap", max),
        rank_change=pick("rank_change", min),
    )


@dataclass(frozen=True)
class Teach:
    """The new answer a fine-tune was meant to teach for a fact, and other prompts that ask for it.

    The fact's first ``expect`` answer is the old answer that the new one replaces.
    """

    answer: str
    paraphrases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fact:
    """One prompt with its accepted answers, as read from a suite file."""

    id: str
    prompt: str
    expect: tuple[str, ...]
    choices: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    match: str = "prefix"
    tolerance: Tolerance = Tolerance()
    path: Path | None = None
    line: int | None = None
    teach: Teach | None = None

    @property
    def location(self) -> str:
        """Position of the record as ``path:line``, or the fact id when the fact has no file."""
        if self.path is None:
            return self.id
        if self.line is None:
            return str(self.path)
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Suite:
    """A parsed suite file: its facts and the suite-level settings from its header."""

    path: Path
    facts: tuple[Fact, ...]
    tolerance: Tolerance
    description: str = ""
    source: str = ""
    license: str = ""
    # Tolerance of each tag named in the header's `tag_tolerances`; already applied to the facts.
    tag_tolerances: Mapping[str, Tolerance] = field(default_factory=dict)


@dataclass(frozen=True)
class _Defaults:
    """Suite-level `defaults`: applied to every fact that does not set its own value."""

    match: str = "prefix"
    tags: tuple[str, ...] = ()
    tolerance: Tolerance = Tolerance()


def is_suite_file(path: str | os.PathLike[str]) -> bool:
    """Return whether the file name ends with one of `SUITE_SUFFIXES`."""
    return Path(path).name.endswith(SUITE_SUFFIXES)


def suite_name(path: str | os.PathLike[str]) -> str:
    """Return the file name without its kinject suffix, e.g. ``known_facts``.

    A name without a kinject suffix loses only its last extension.
    """
    name = Path(path).name
    for suffix in SUITE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def derive_fact_id(prompt: str) -> str:
    """Build a stable fact id from a prompt: a slug of its first words and 8 hex digits of its SHA-256.

    The slug keeps ASCII letters and digits only, so ids stay valid pytest node ids for any prompt.
    The hash keeps the ids of prompts that share their first words distinct.
    """
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8]

    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())[:SLUG_MAX_WORDS]
    slug = "-".join(words)[:SLUG_MAX_CHARS].rstrip("-")

    return f"{slug}-{digest}" if slug else f"fact-{digest}"


def load_suite(path: str | os.PathLike[str]) -> Suite:
    """Read and validate a suite file in the format its suffix names.

    Raises `SuiteError` for a missing or unreadable file, a file that is not UTF-8, invalid JSON
    or YAML, an invalid record, a duplicate fact id, and a suite without facts.
    """
    path = Path(path)
    if not is_suite_file(path):
        raise SuiteError(
            path, None, f"not a suite file; name it with one of the suffixes {', '.join(SUITE_SUFFIXES)}"
        )

    text = _read_text(path)
    if path.name.endswith(".kinject.jsonl"):
        return _load_jsonl(path, text)
    return _load_yaml(path, text)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SuiteError(path, None, "file not found; check the path or create the suite file") from None
    except IsADirectoryError:
        raise SuiteError(path, None, "is a directory, not a suite file; pass the path of a suite file") from None
    except OSError as error:
        raise SuiteError(path, None, f"could not be read ({error.strerror}); check the file's permissions") from None

    # utf-8-sig drops the byte order mark that some Windows editors write.
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise SuiteError(
            path, line, f"invalid UTF-8 (byte 0x{data[error.start]:02x}); save the file as UTF-8"
        ) from None


# JSONL


def _load_jsonl(path: Path, text: str) -> Suite:
    header: dict[str, Any] = {}
    header_line: int | None = None
    records: list[tuple[int, dict[str, Any]]] = []

    # Split on "\n" only: str.splitlines() also splits on U+0085 and U+2028, which JSON strings may contain.
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        record = _parse_json_line(path, line, raw)

        if "suite" in record:
            if header_line is not None or records:
                raise SuiteError(
                    path, line, 'header record {"suite": ...} found after other records; move it to the first line'
                )
            if len(record) != 1:
                extra = ", ".join(repr(key) for key in record if key != "suite")
                raise SuiteError(
                    path, line, f"header record has keys besides 'suite' ({extra}); move them into the 'suite' object"
                )
            header = _require_mapping(path, line, record["suite"], "'suite'", '{"suite": {"description": "..."}}')
            header_line = line
            continue

        records.append((line, record))

    settings = _parse_header(path, header, lambda key: header_line)
    if not records:
        raise SuiteError(
            path, header_line, f"suite has no facts; add one JSON object per line, such as {MINIMAL_RECORD}"
        )

    return _build_suite(path, settings, records)


def _parse_json_line(path: Path, line: int, raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as error:
        raise SuiteError(
            path, line, f"invalid JSON ({error.msg}: column {error.colno}); write one JSON object per line"
        ) from None
    except _DuplicateKeyError as error:
        raise SuiteError(path, line, f"key {error.key!r} appears twice in one record; keep only one") from None

    if not isinstance(value, dict):
        raise SuiteError(
            path,
            line,
            f"expected a JSON object, got {_describe(value)}; write one object per line, such as {MINIMAL_RECORD}",
        )
    return value


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


# YAML


def _load_yaml(path: Path, text: str) -> Suite:
    # compose() keeps the node tree, whose start marks give each fact's line number.
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        raise _yaml_syntax_error(path, error) from None

    if root is None:
        raise SuiteError(
            path, None, "suite has no facts; add a 'facts:' list with records such as 'prompt: ...' and 'expect: ...'"
        )
    if not isinstance(root, yaml.MappingNode):
        raise SuiteError(
            path, _node_line(root), "expected a mapping at the top level; write 'facts:' followed by a list of records"
        )

    top = _yaml_mapping(path, root, "the top-level mapping")
    key_lines = {key_node.value: _node_line(key_node) for key_node, _ in root.value}
    for key in top:
        if key not in YAML_TOP_KEYS:
            _raise_unknown_key(path, key_lines[key], "the top level", key, YAML_TOP_KEYS)

    header = {key: _construct(path, node) for key, node in top.items() if key != "facts"}
    settings = _parse_header(path, header, lambda key: key_lines.get(key, _node_line(root)))

    facts_node = top.get("facts")
    if facts_node is None or _construct(path, facts_node) is None:
        raise SuiteError(path, _node_line(root), "suite has no facts; add a 'facts:' list with at least one record")
    if not isinstance(facts_node, yaml.SequenceNode):
        raise SuiteError(
            path, _node_line(facts_node), "'facts' must be a list of records; start each record with '- prompt: ...'"
        )
    if not facts_node.value:
        raise SuiteError(
            path, _node_line(facts_node), "suite has no facts; add at least one record to the 'facts:' list"
        )

    records: list[tuple[int, dict[str, Any]]] = []
    for item in facts_node.value:
        line = _node_line(item)
        if not isinstance(item, yaml.MappingNode):
            received = _describe(_construct(path, item))
            raise SuiteError(
                path, line, f"expected a record (a mapping), got {received}; write '- prompt: ...' and 'expect: ...'"
            )
        _yaml_mapping(path, item, "one record")
        records.append((line, _construct(path, item)))

    return _build_suite(path, settings, records)


def _yaml_syntax_error(path: Path, error: yaml.YAMLError) -> SuiteError:
    mark = getattr(error, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return SuiteError(path, line, f"invalid YAML ({problem}); fix the syntax at this line")


def _yaml_mapping(path: Path, node: yaml.MappingNode, where: str) -> dict[str, yaml.Node]:
    """Map the string keys of a mapping node to their value nodes, rejecting duplicate and non-string keys."""
    result: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        key = _construct(path, key_node)
        if not isinstance(key, str):
            raise SuiteError(
                path,
                _node_line(key_node),
                f"{where} has a non-string key {key!r}; use one of the key names, such as 'prompt'",
            )
        if key in result:
            raise SuiteError(path, _node_line(key_node), f"key {key!r} appears twice in {where}; keep only one")
        result[key] = value_node
    return result


def _construct(path: Path, node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise _yaml_syntax_error(path, error) from None
    finally:
        loader.dispose()


def _node_line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


# Records shared by both formats


@dataclass(frozen=True)
class _Settings:
    description: str
    source: str
    license: str
    defaults: _Defaults
    tag_tolerances: Mapping[str, Tolerance]
    tag_tolerances_line: int | None


def _parse_header(path: Path, header: Mapping[str, Any], line_of: Callable[[str], int | None]) -> _Settings:
    """Parse suite-level settings. `line_of` gives the line to report for each header key."""
    for key in header:
        if key not in HEADER_KEYS:
            _raise_unknown_key(path, line_of(key), "the suite header", key, HEADER_KEYS)

    texts = {}
    for key in ("description", "source", "license"):
        value = header.get(key)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise SuiteError(
                path, line_of(key), f"suite '{key}' must be a string, got {_describe(value)}; quote the text"
            )
        texts[key] = value

    defaults = _parse_defaults(path, line_of("defaults"), header.get("defaults"))
    tag_line = line_of("tag_tolerances")
    tag_tolerances = _parse_tag_tolerances(path, tag_line, header.get("tag_tolerances"))
    return _Settings(texts["description"], texts["source"], texts["license"], defaults, tag_tolerances, tag_line)


def _parse_defaults(path: Path, line: int | None, value: Any) -> _Defaults:
    if value is None:
        return _Defaults()
    defaults = _require_mapping(path, line, value, "suite 'defaults'", '"defaults": {"match": "prefix"}')
    _reject_unknown_keys(path, line, "suite 'defaults'", defaults, DEFAULTS_KEYS)

    label = "suite 'defaults'"
    match = _parse_match(path, line, label, defaults.get("match", "prefix"))
    tags = _parse_tags(path, line, label, defaults.get("tags", []))
    tolerance = _parse_tolerance(path, line, label, defaults.get("tolerance"))
    return _Defaults(match=match, tags=tags, tolerance=tolerance)


def _parse_tag_tolerances(path: Path, line: int | None, value: Any) -> dict[str, Tolerance]:
    if value is None:
        return {}
    example = '"tag_tolerances": {"geography": {"kl": 0.2}}'
    mapping = _require_mapping(path, line, value, "suite 'tag_tolerances'", example)

    parsed = {}
    for tag, limits in mapping.items():
        _parse_tags(path, line, "suite 'tag_tolerances'", [tag])
        if limits is None:
            raise SuiteError(path, line, f"suite 'tag_tolerances' has no tolerance for tag {tag!r}; "
                                         f"write it as {example}, or remove the tag")
        parsed[tag] = _parse_tolerance(path, line, f"tag {tag!r}", limits)
    return parsed


def _check_tag_tolerances_used(path: Path, settings: _Settings, facts: list[Fact]) -> None:
    """Reject a tag tolerance for a tag that no fact carries.

    A misspelled tag would otherwise leave the facts it was meant for at a looser limit, silently.
    """
    carried = {tag for fact in facts for tag in fact.tags}
    for tag in settings.tag_tolerances:
        if tag not in carried:
            close = difflib.get_close_matches(tag, sorted(carried), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SuiteError(path, settings.tag_tolerances_line,
                             f"suite 'tag_tolerances' names the tag {tag!r}, which no fact carries; "
                             f"{hint}fix the tag name or remove its tolerance")


def _tag_tolerance(tags: tuple[str, ...], tag_tolerances: Mapping[str, Tolerance]) -> Tolerance:
    """Return the strictest tolerance among a fact's tags, field by field."""
    return strictest(tag_tolerances[tag] for tag in tags if tag in tag_tolerances)


def _build_suite(path: Path, settings: _Settings, records: list[tuple[int, dict[str, Any]]]) -> Suite:
    facts: list[Fact] = []
    first_line_of: dict[str, int] = {}

    for line, record in records:
        fact = _parse_fact(path, line, record, settings.defaults, settings.tag_tolerances)
        if fact.id in first_line_of:
            raise SuiteError(
                path,
                line,
                f"fact id {fact.id!r} is already used on line {first_line_of[fact.id]}; give each fact a unique 'id'",
            )
        first_line_of[fact.id] = line
        facts.append(fact)
    _check_tag_tolerances_used(path, settings, facts)

    return Suite(
        path=path,
        facts=tuple(facts),
        tolerance=settings.defaults.tolerance,
        description=settings.description,
        source=settings.source,
        license=settings.license,
        tag_tolerances=settings.tag_tolerances,
    )


def _parse_fact(
    path: Path, line: int, record: Mapping[str, Any], defaults: _Defaults, tag_tolerances: Mapping[str, Tolerance]
) -> Fact:
    given_id = record.get("id")
    label = f"fact {given_id!r}" if isinstance(given_id, str) and given_id else "fact"
    _reject_unknown_keys(path, line, label, record, FACT_KEYS)

    prompt = _parse_prompt(path, line, label, record)
    if "id" in record:
        fact_id = _parse_id(path, line, given_id, prompt)
        label = f"fact {fact_id!r}"
    else:
        # Name the fact by its prompt, because the derived id appears nowhere in the file.
        fact_id = derive_fact_id(prompt)
        label = f"fact {_shorten(prompt)}"

    match = _parse_match(path, line, label, record.get("match", defaults.match))
    expect = _parse_expect(path, line, label, record, match)
    choices = _parse_choices(path, line, label, record.get("choices", []), expect, match)
    own_tags = _parse_tags(path, line, label, record.get("tags", []))
    tolerance = _parse_tolerance(path, line, label, record.get("tolerance"))
    teach = _parse_teach(path, line, label, record.get("teach"), expect, match)

    # Suite-wide tags come first, and a tag listed in both places is kept once.
    tags = tuple(dict.fromkeys((*defaults.tags, *own_tags)))

    # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer can encode.
    taught = (teach.answer, *teach.paraphrases) if teach is not None else ()
    for text in (prompt, *expect, *choices, *taught):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise SuiteError(path, line, f"{label} contains an unpaired surrogate ({ascii(text)[:60]}); "
                                         "write the character itself or a valid surrogate pair") from None

    # Nearest wins: the fact's own limits, then its tags' (the strictest when several tags set one),
    # then the suite defaults. The session lays the command line, ini file and built-in defaults below.
    effective = tolerance.over(_tag_tolerance(tags, tag_tolerances)).over(defaults.tolerance)

    return Fact(
        id=fact_id,
        prompt=prompt,
        expect=expect,
        choices=choices,
        tags=tags,
        match=match,
        tolerance=effective,
        path=path,
        line=line,
        teach=teach,
    )


def _parse_prompt(path: Path, line: int, label: str, record: Mapping[str, Any]) -> str:
    if "prompt" not in record:
        raise SuiteError(path, line, f'{label} has no \'prompt\'; add "prompt": "<text the model completes>"')
    prompt = record["prompt"]
    if not isinstance(prompt, str):
        raise SuiteError(path, line, f"{label} has a 'prompt' of {_describe(prompt)}; write the prompt as a string")
    if not prompt.strip():
        raise SuiteError(path, line, f"{label} has an empty 'prompt'; write the text the model completes")
    return prompt


def _parse_id(path: Path, line: int, value: Any, prompt: str) -> str:
    if not isinstance(value, str) or not FACT_ID_PATTERN.match(value):
        raise SuiteError(
            path,
            line,
            f"invalid fact 'id' {value!r}; use letters, digits, '_', '.' and '-' only, "
            "starting with a letter or digit, "
            f"such as {derive_fact_id(prompt)!r}, or leave 'id' out to derive one from the prompt",
        )
    return value


def _parse_match(path: Path, line: int | None, label: str, value: Any) -> str:
    if not isinstance(value, str) or value not in MATCH_RULES:
        raise SuiteError(
            path, line, f"{label} has an invalid 'match' rule {value!r}; use one of {', '.join(MATCH_RULES)}"
        )
    return value


def _parse_expect(path: Path, line: int, label: str, record: Mapping[str, Any], match: str) -> tuple[str, ...]:
    if "expect" not in record:
        raise SuiteError(
            path, line, f'{label} has no \'expect\'; add "expect": "<answer>" or a list of accepted answers'
        )

    value = record["expect"]
    if not isinstance(value, (str, list)):
        raise SuiteError(
            path,
            line,
            f"{label} has an 'expect' of {_describe(value)}; write a string or a list of strings, such as \"{value}\"",
        )
    answers = _parse_strings(path, line, label, "expect", [value] if isinstance(value, str) else value)
    if not answers:
        raise SuiteError(path, line, f"{label} has an empty 'expect' list; list at least one accepted answer")

    if match == "regex":
        for pattern in answers:
            try:
                re.compile(pattern)
            except re.error as error:
                raise SuiteError(
                    path,
                    line,
                    f"{label} has an invalid regex {pattern!r} in 'expect' ({error}); "
                    "fix the pattern or use another 'match' rule",
                ) from None
    return answers


def _parse_choices(
    path: Path, line: int, label: str, value: Any, expect: tuple[str, ...], match: str
) -> tuple[str, ...]:
    choices = _parse_strings(path, line, label, "choices", value)

    seen: dict[str, str] = {}
    for choice in choices:
        key = choice.strip().casefold()
        if key in seen:
            raise SuiteError(
                path, line, f"{label} lists the choice {choice!r} twice (ignoring case); keep one copy"
            )
        seen[key] = choice

        accepted = _accepted_answer_for(choice, expect, match)
        if accepted is not None:
            raise SuiteError(
                path,
                line,
                f"{label} has the choice {choice!r}, which matches the accepted answer {accepted!r}; "
                "'choices' lists wrong answers only, so remove it or replace it with a wrong answer",
            )
    return choices


def _accepted_answer_for(choice: str, expect: tuple[str, ...], match: str) -> str | None:
    """Return the accepted answer that `choice` equals, ignoring case and outer spaces.

    With the `regex` rule, return the pattern that matches the whole choice instead.
    """
    for answer in expect:
        if match == "regex":
            if re.fullmatch(answer, choice.strip()):
                return answer
        elif answer.strip().casefold() == choice.strip().casefold():
            return answer
    return None


def _parse_strings(path: Path, line: int, label: str, key: str, value: Any, *, example: str = "Paris",
                   entry: str = "answer") -> tuple[str, ...]:
    if not isinstance(value, list):
        raise SuiteError(
            path, line, f"{label} has '{key}' of {_describe(value)}; write a list of strings, such as [\"{example}\"]"
        )
    for item in value:
        if not isinstance(item, str):
            raise SuiteError(
                path,
                line,
                f"{label} has {_describe(item)} in '{key}'; write every entry as a quoted string, such as \"{item}\"",
            )
        if not item.strip():
            raise SuiteError(path, line, f"{label} has an empty string in '{key}'; remove it or write the {entry}")
    return tuple(value)


def _parse_tags(path: Path, line: int | None, label: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise SuiteError(path, line, f"{label} has 'tags' of {_describe(value)}; write a list, such as [\"geography\"]")
    for tag in value:
        if not isinstance(tag, str) or not tag.isidentifier() or keyword.iskeyword(tag):
            raise SuiteError(
                path,
                line,
                f"{label} has an invalid tag {tag!r}; tags are selected with 'pytest -m TAG', "
                "so use a Python identifier that is not a keyword, such as 'geography' or 'P36'",
            )
    return tuple(dict.fromkeys(value))


def _parse_tolerance(path: Path, line: int | None, label: str, value: Any) -> Tolerance:
    if value is None:
        return Tolerance()
    example = '"tolerance": {"kl": 0.5, "logprob_drop": 1.0, "top_k_overlap": 0.5, "rank_change": 1}'
    limits = _require_mapping(path, line, value, f"{label} 'tolerance'", example)
    _reject_unknown_keys(path, line, f"{label} 'tolerance'", limits, TOLERANCE_KEYS)

    parsed: dict[str, Any] = {}
    for key in TOLERANCE_KEYS:
        limit = limits.get(key)
        if limit is None:
            parsed[key] = None
            continue
        problem = tolerance_problem(key, limit)
        if problem is not None:
            raise SuiteError(path, line, f"{label} has an invalid tolerance '{key}' {limit!r}; use {problem}")
        parsed[key] = int(limit) if key == "rank_change" else float(limit)
    return Tolerance(**parsed)


def _parse_teach(
    path: Path, line: int, label: str, value: Any, expect: tuple[str, ...], match: str
) -> Teach | None:
    if value is None:
        return None
    example = '"teach": {"answer": "Brazil", "paraphrases": ["Trento is a city in"]}'
    teach = _require_mapping(path, line, value, f"{label} 'teach'", example)
    _reject_unknown_keys(path, line, f"{label} 'teach'", teach, TEACH_KEYS)

    if match == "regex":
        raise SuiteError(
            path, line, f"{label} has 'teach' with the 'regex' match rule, but the old answer must be text "
                        "to be scored; write the old answer in 'expect' and use another 'match' rule"
        )
    answer = teach.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise SuiteError(
            path, line, f"{label} has 'teach' without a text 'answer' (got {_describe(answer)}); "
                        f"write the new answer, such as {example}"
        )
    if answer.strip().casefold() in {old.strip().casefold() for old in expect}:
        raise SuiteError(
            path, line, f"{label} teaches {answer!r}, which is already an accepted answer in 'expect'; "
                        "'expect' keeps the old answer, so write a different new answer"
        )

    paraphrases = _parse_strings(path, line, f"{label} 'teach'", "paraphrases", teach.get("paraphrases", []),
                                 example="Trento is a city in", entry="paraphrase")
    if len(set(paraphrases)) != len(paraphrases):
        raise SuiteError(path, line, f"{label} lists a paraphrase twice in 'teach'; keep one copy of each")
    return Teach(answer=answer, paraphrases=paraphrases)


def tolerance_problem(key: str, value: Any) -> str | None:
    """Describe the valid values of the tolerance field `key` when `value` is not one of them, else return None.

    The description is a noun phrase with an example, such as "a fraction between 0 and 1, such as 0.5".
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        valid = False
    elif key == "top_k_overlap":
        valid = 0 <= value <= 1
    elif key == "rank_change":
        valid = value >= 0 and float(value).is_integer()
    else:
        valid = value >= 0

    if valid:
        return None
    if key == "top_k_overlap":
        return "a fraction between 0 and 1, such as 0.5"
    if key == "rank_change":
        return "a whole number of places that is 0 or more, such as 1"
    return "a finite number of nats that is 0 or more, such as 0.5"


# Shared checks


def _require_mapping(path: Path, line: int | None, value: Any, what: str, example: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise SuiteError(path, line, f"{what} must be an object, got {_describe(value)}; write it as {example}")
    return value


def _reject_unknown_keys(
    path: Path, line: int | None, where: str, mapping: Mapping[Any, Any], allowed: tuple[str, ...]
) -> None:
    for key in mapping:
        if key not in allowed:
            _raise_unknown_key(path, line, where, key, allowed)


def _raise_unknown_key(path: Path, line: int | None, where: str, key: Any, allowed: tuple[str, ...]) -> None:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise SuiteError(path, line, f"{where} has an unknown key {key!r}; {hint}allowed keys are {', '.join(allowed)}")


def _describe(value: Any) -> str:
    """Describe a received value for an error message: its type and a shortened repr."""
    return f"{type(value).__name__} {_shorten(value)}"


def _shorten(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
