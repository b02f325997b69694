"""Untrusted text (a user's input, an agent's output, failure text, anything from the wire) shown
to a model as data, never as instructions.

One rule, used everywhere a prompt quotes such text: it goes inside a block that the system prompt
declares to be data, and every ``<`` in it is escaped, so nothing inside can close the block early
or open a block of its own.
"""

from __future__ import annotations


def as_data(text: str) -> str:
    """``text`` made safe to place inside a ``<block>...</block>`` of a prompt."""
    return text.replace("<", "&lt;")
