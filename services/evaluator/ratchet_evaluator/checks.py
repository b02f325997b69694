"""Programmatic checks of a run's output: a score of 0 or 1 and problems a person can act on.

Formats matter in this project: a right answer wrapped in extra words fails ``exact`` and
``any_of``, and the problems say whether the answer was wrapped or missing, because that is the
difference the proposer has to learn from. Semantics per kind, beyond :class:`Check`'s docstring:

- ``exact``/``any_of``: both sides trimmed; a trailing period is extra text, not forgiven.
- ``regex``: a search on the raw output, pattern as written in :mod:`re` syntax (put ``(?i)`` in it
  to ignore case; ``case_sensitive`` does not apply), run by the ``regex`` package with a time
  limit: a pattern that backtracks catastrophically, such as ``(?:.|.|.|.|.)*\\d``, scores 0 with
  a problem saying the check timed out, instead of holding the evaluator. A pattern too large to
  compile cheaply (counted repeats that unroll past ``REGEX_UNROLLED_MAX`` items) is a broken check.
- ``number``: the last number in the output, read with thousands separators (``1,234``), a sign
  (``-5``, also a Unicode minus) and decimals (``3.14``). Words around it are fine.
- ``json_shape``: the whole trimmed output must be a JSON object, or one fenced code block
  (```json ... ```) holding it, the way chat models conventionally mark code; any other text
  around the object fails. Extra keys are allowed. ``"float"`` accepts any JSON number (``40``),
  ``"int"`` does not accept ``40.0``; ``true`` is a bool, never a number.

A check that cannot be applied (an invalid regex, an ``expected`` of the wrong type) scores 0 with
a problem saying the check itself is broken, so the fault is visible rather than silently passed.

Every check's work is bounded: the output and ``expected`` have limits (:mod:`ratchet.contracts`),
the regex search has a time limit and releases the GIL while it runs (so the evaluator runs checks
in a worker thread and its event loop stays free), and the other checks do at most a small
multiple of linear work in the output's length (no backtracking regex over it, JSON parsing that
gives up on deep nesting and tries at most ``JSON_STARTS`` places).
"""

from __future__ import annotations

import json
import re
import re._constants as re_constants
import re._parser as re_parser
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import regex

from ratchet.contracts import Check

EXCERPT_CHARS = 120
BROKEN_CHECK = "the check itself is broken"
TIMED_OUT = "the check timed out"
REGEX_TIMEOUT_S = 0.2  # legitimate patterns take well under a millisecond on an output's limit
REGEX_UNROLLED_MAX = 100_000  # compiles in about 0.2 s
JSON_STARTS = 64  # "{" positions tried when looking for a JSON object inside other text

# Last-number search: thousands groups only when complete ("1,234"), otherwise plain digits, so a
# list "1,2,3" reads as three numbers; a minus glued to a word ("x-5") is a hyphen, not a sign.
_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_FENCE_OPENING = re.compile(r"```[\w+-]*[ \t]*")
_REPEATS = (re_constants.MAX_REPEAT, re_constants.MIN_REPEAT, re_constants.POSSESSIVE_REPEAT)
_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
}


class _BrokenCheck(ValueError):
    """The check cannot be applied to any output; says why."""


def run_check(check: Check, output: str) -> tuple[float, list[str]]:
    """Score ``output`` 1.0 when it passes ``check``, else 0.0 with the problems found."""
    try:
        problems = _CHECKERS[check.kind](check, output)
    except _BrokenCheck as exc:
        problems = [f"{BROKEN_CHECK}: {exc}"]
    return (0.0 if problems else 1.0), problems


def _exact(check: Check, output: str) -> list[str]:
    if not isinstance(check.expected, str):
        raise _BrokenCheck(f"an exact check needs a string expected, got {_type(check.expected)}")
    return _equals_one_of([check.expected], output, case_sensitive=check.case_sensitive)


def _any_of(check: Check, output: str) -> list[str]:
    expected = check.expected
    if not (isinstance(expected, list) and expected and all(isinstance(a, str) for a in expected)):
        raise _BrokenCheck("an any_of check needs a non-empty list of strings as expected")
    return _equals_one_of(expected, output, case_sensitive=check.case_sensitive)


def _equals_one_of(answers: list[str], output: str, *, case_sensitive: bool) -> list[str]:
    """Pass on a whole-output match; otherwise say what was expected and why it did not match."""
    got = output.strip()
    wanted = [answer.strip() for answer in answers]

    def fold(text: str) -> str:
        return text if case_sensitive else text.casefold()

    if fold(got) in {fold(answer) for answer in wanted}:
        return []
    want = _quote(wanted[0]) if len(wanted) == 1 else "one of " + ", ".join(map(_quote, wanted))
    if not got:
        return [f"output is empty, expected {want}"]
    problems = [f"expected {want}, got {_quote(got)}"]
    flags = 0 if case_sensitive else re.IGNORECASE
    if got.casefold() in {answer.casefold() for answer in wanted}:
        problems.append("output differs from the expected answer only in letter case")
    elif any(
        re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", got, flags) for answer in wanted if answer
    ):
        problems.append("the expected answer is present but wrapped in extra text")
    else:
        problems.append("the expected answer is missing from the output")
    return problems


def _regex(check: Check, output: str) -> list[str]:
    pattern = check.expected
    if not isinstance(pattern, str):
        raise _BrokenCheck(f"a regex check needs a string expected, got {_type(pattern)}")
    compiled = _compiled(pattern)
    try:
        found = compiled.search(output, timeout=REGEX_TIMEOUT_S, concurrent=True)
    except TimeoutError:
        return [
            f"{TIMED_OUT}: /{_short(pattern)}/ took over {REGEX_TIMEOUT_S:g} s on an output of "
            f"{len(output)} characters (a pattern that backtracks catastrophically?)"
        ]
    if found:
        return []
    if not output.strip():
        return [f"output is empty, expected a match for /{_short(pattern)}/"]
    return [f"output does not match /{_short(pattern)}/, got {_quote(output)}"]


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> regex.Pattern[str]:
    """``pattern`` compiled, once it is known to be valid :mod:`re` syntax (what suites are
    checked against) and small enough to compile: the ``regex`` package unrolls counted
    repeats, so ``((a{1000}){1000}){1000}`` would take gigabytes before any time limit applies."""
    try:
        size = _unrolled_size(re_parser.parse(pattern))
    except re.error as exc:
        raise _BrokenCheck(f"invalid regex {_short(pattern)!r}: {exc}") from exc
    except RecursionError as exc:
        raise _BrokenCheck(f"regex {_short(pattern)!r} is nested too deeply") from exc
    if size > REGEX_UNROLLED_MAX:
        raise _BrokenCheck(
            f"regex {_short(pattern)!r} is too large: its repeats unroll to {size} items, over "
            f"{REGEX_UNROLLED_MAX}"
        )
    try:
        return regex.compile(pattern)
    except (regex.error, RecursionError) as exc:
        raise _BrokenCheck(f"invalid regex {_short(pattern)!r}: {exc}") from exc


def _unrolled_size(parsed: Any) -> int:
    """How many items ``parsed`` (a :mod:`re` parse tree) has with every counted repeat unrolled;
    an open-ended repeat counts its minimum (at least once)."""
    size = 0
    for op, arg in parsed:
        if op in _REPEATS:
            low, high, inner = arg
            size += (high if high != re_constants.MAXREPEAT else max(low, 1)) * _unrolled_size(
                inner
            )
        elif op is re_constants.SUBPATTERN:
            size += 1 + _unrolled_size(arg[-1])
        elif op is re_constants.BRANCH:
            size += 1 + sum(_unrolled_size(branch) for branch in arg[1])
        elif op in (re_constants.ASSERT, re_constants.ASSERT_NOT):
            size += 1 + _unrolled_size(arg[1])
        elif op is re_constants.ATOMIC_GROUP:
            size += 1 + _unrolled_size(arg)
        elif op is re_constants.GROUPREF_EXISTS:
            size += 1 + _unrolled_size(arg[1]) + (_unrolled_size(arg[2]) if arg[2] else 0)
        else:
            size += 1
    return size


def _number(check: Check, output: str) -> list[str]:
    expected = check.expected
    if isinstance(expected, bool) or not isinstance(expected, int | float):
        raise _BrokenCheck(f"a number check needs a numeric expected, got {_type(expected)}")
    found = _NUMBER.findall(output)
    if not found:
        return [f"no number in output, expected {_show(expected)}, got {_quote(output)}"]
    got = float(found[-1].replace(",", "").replace("\u2212", "-"))
    if abs(got - expected) <= check.tolerance:
        return []
    return [
        f"number {_show(got)} differs from expected {_show(expected)} "
        f"(tolerance {_show(check.tolerance)})"
    ]


def _json_shape(check: Check, output: str) -> list[str]:
    expected = check.expected
    if not (isinstance(expected, dict) and expected):
        raise _BrokenCheck("a json_shape check needs a non-empty object as expected")
    text = _unfenced(output.strip())
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if first_json_object(text) is not None:
            return ["output has extra text around the JSON object"]
        return [f"output is not a JSON object: {exc}"]
    except RecursionError:
        return ["output is not a JSON object: it is nested too deeply"]
    if not isinstance(value, dict):
        return [f"output is not a JSON object: it is a JSON {_type(value)}"]
    problems: list[str] = []
    for key, want in expected.items():
        if key not in value:
            problems.append(f"key '{key}' missing")
            continue
        got = value[key]
        if isinstance(want, str) and want in _JSON_TYPES:
            if not _JSON_TYPES[want](got):
                problems.append(f"key '{key}' should be {want}, got {_type(got)}")
        elif not _same(got, want):
            problems.append(f"key '{key}' should be {json.dumps(want)}, got {json.dumps(got)}")
    return problems


def _unfenced(text: str) -> str:
    """The inside of one fenced code block filling ``text`` (```json ... ```), else ``text``.

    String operations, not a regex: a lazy pattern over the whole output backtracks
    quadratically (0.3 s on 16,000 spaces)."""
    if len(text) < 6 or not (text.startswith("```") and text.endswith("```")):
        return text
    opening, newline, rest = text.partition("\n")
    if not newline or not _FENCE_OPENING.fullmatch(opening):
        return text
    return rest[:-3].strip()


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object found at one of the first ``JSON_STARTS`` ``{`` in ``text``,
    whatever surrounds it (bounded: an output of 16,000 ``{`` costs 64 failed parses)."""
    decoder = json.JSONDecoder()
    starts = (i for i, char in enumerate(text) if char == "{")
    for _, start in zip(range(JSON_STARTS), starts, strict=False):
        try:
            value, _ = decoder.raw_decode(text, start)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None


def _same(got: Any, want: Any) -> bool:
    """JSON equality: ``true`` is not ``1``, ``31`` equals ``31.0``, containers compare deeply."""
    if isinstance(got, bool) or isinstance(want, bool):
        return type(got) is type(want) and got == want
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and got.keys() == want.keys()
            and all(_same(got[k], want[k]) for k in want)
        )
    if isinstance(want, list):
        return (
            isinstance(got, list)
            and len(got) == len(want)
            and all(_same(g, w) for g, w in zip(got, want, strict=True))
        )
    return bool(got == want)


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _show(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def _short(pattern: str) -> str:
    """A pattern as problems show it: whole if short, else its start (problems have a limit)."""
    return pattern if len(pattern) <= EXCERPT_CHARS else pattern[: EXCERPT_CHARS - 1] + "…"


def _quote(text: str) -> str:
    """The text on one line, shortened, in single quotes (how problem texts quote values)."""
    flat = " ".join(text.split())
    if len(flat) > EXCERPT_CHARS:
        flat = flat[: EXCERPT_CHARS - 1].rstrip() + "…"
    return f"'{flat}'"


_CHECKERS: dict[str, Callable[[Check, str], list[str]]] = {
    "exact": _exact,
    "any_of": _any_of,
    "regex": _regex,
    "number": _number,
    "json_shape": _json_shape,
}
