"""Programmatic checks of a run's output: a score of 0 or 1 and problems a person can act on.

Formats matter in this project: a right answer wrapped in extra words fails ``exact`` and
``any_of``, and the problems say whether the answer was wrapped or missing, because that is the
difference the proposer has to learn from. Semantics per kind, beyond :class:`Check`'s docstring:

- ``exact``/``any_of``: both sides trimmed; a trailing period is extra text, not forgiven.
- ``regex``: :func:`re.search` on the raw output, pattern as written (put ``(?i)`` in it to ignore
  case; ``case_sensitive`` does not apply).
- ``number``: the last number in the output, read with thousands separators (``1,234``), a sign
  (``-5``, also a Unicode minus) and decimals (``3.14``). Words around it are fine.
- ``json_shape``: the whole trimmed output must be a JSON object, or one fenced code block
  (```json ... ```) holding it, the way chat models conventionally mark code; any other text
  around the object fails. Extra keys are allowed. ``"float"`` accepts any JSON number (``40``),
  ``"int"`` does not accept ``40.0``; ``true`` is a bool, never a number.

A check that cannot be applied (an invalid regex, an ``expected`` of the wrong type) scores 0 with
a problem saying the check itself is broken, so the fault is visible rather than silently passed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from ratchet.contracts import Check

EXCERPT_CHARS = 120
BROKEN_CHECK = "the check itself is broken"

# Last-number search: thousands groups only when complete ("1,234"), otherwise plain digits, so a
# list "1,2,3" reads as three numbers; a minus glued to a word ("x-5") is a hyphen, not a sign.
_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_FENCED = re.compile(r"^```[\w+-]*[ \t]*\n(.*?)\n?[ \t]*```$", re.DOTALL)
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
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise _BrokenCheck(f"invalid regex {pattern!r}: {exc}") from exc
    if compiled.search(output):
        return []
    if not output.strip():
        return [f"output is empty, expected a match for /{pattern}/"]
    return [f"output does not match /{pattern}/, got {_quote(output)}"]


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
    text = output.strip()
    fenced = _FENCED.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if first_json_object(text) is not None:
            return ["output has extra text around the JSON object"]
        return [f"output is not a JSON object: {exc}"]
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


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object found at some ``{`` in ``text``, whatever surrounds it."""
    decoder = json.JSONDecoder()
    for start in (i for i, char in enumerate(text) if char == "{"):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
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
