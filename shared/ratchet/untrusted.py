"""Untrusted text (a user's input, an agent's output, failure text, a model's proposal, anything
from the wire): data wherever it goes, never instructions, never formatting.

Two places show it, each with one rule:

- a model's prompt (:func:`as_data`): the text goes inside a block that the system prompt declares
  to be data, and every ``<`` in it is escaped, so nothing inside can close the block early or
  open a block of its own;
- a terminal (:func:`for_terminal`): every control character is replaced by its visible escape,
  so no escape sequence, carriage return or bidirectional override can move the cursor, recolour
  or reorder what a reviewer reads. The result is still plain text: the CLI prints it as a Rich
  ``Text`` (``ratchet.cli.render.shown``), which is never parsed as markup, so ``[/]`` or
  ``[red]`` are shown as written.
"""

from __future__ import annotations

import re

# C0 and C1 controls and DEL, plus the characters that reorder or break lines of text without
# being controls (bidirectional overrides and isolates, marks, line and paragraph separators).
_CONTROLS = "\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[{_CONTROLS}]")


def as_data(text: str) -> str:
    """``text`` made safe to place inside a ``<block>...</block>`` of a prompt."""
    return text.replace("<", "&lt;")


def _visible(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def for_terminal(text: str, *, multiline: bool = False) -> str:
    """``text`` with every control character shown as its escape (ESC as ``\\x1b``, a carriage
    return as ``\\r``), safe to print. ``multiline`` keeps ``\\n`` as a line break, for a block
    that is meant to span lines (a prompt, an output); anywhere else a newline is shown as
    ``\\n`` too, so one field cannot print lines that look like others."""
    if multiline:
        return "\n".join(_UNSAFE.sub(_visible, line) for line in text.split("\n"))
    return _UNSAFE.sub(_visible, text)
