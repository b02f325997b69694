"""Untrusted text on a terminal: shown literally, never as markup, never as control sequences.

Each table and block the CLI prints is rendered by a real Rich console; the old tables parsed
their cells as markup, so a ``[/]`` in a task name raised ``MarkupError`` and ``[red]`` restyled.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from conftest import measurement
from rich.console import Console, RenderableType

from ratchet.cli.demo import print_summary
from ratchet.cli.render import (
    audit_table,
    block,
    changes_table,
    groups_table,
    history_table,
    labelled,
    print_evidence,
    shown,
    trace_table,
    trail_table,
)
from ratchet.contracts import FailureGroup, TokenUsage, TraceStep
from ratchet.prompts import PromptRecord, PromptVersion
from ratchet.queries import ChangeSummary
from ratchet.store import AuditRecord, FailureRecord
from ratchet.untrusted import for_terminal

MARKUP = "[/] [bold red]x[/] [link=http://x]y[/link] :warning:"
ESCAPE = "\x1b[31mred\x1b[0m"
HOSTILE = f"{MARKUP} {ESCAPE}"
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


# --- for_terminal --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "visible"),
    [
        ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),  # clear the screen, cursor home
        ("ok\rFORGED", "ok\\rFORGED"),  # back to the line's start, overwrite
        ("a\x08\x08b", "a\\x08\\x08b"),  # backspaces
        ("\x07\x00\x7f", "\\x07\\x00\\x7f"),  # bell, NUL, DEL
        ("\x9b31m", "\\x9b31m"),  # C1 CSI: an escape sequence in one byte
        (
            "\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\",
            "\\x1b]8;;http://x\\x1b\\link\\x1b]8;;\\x1b\\",
        ),
        ("abc\u202edcba", "abc\\u202edcba"),  # right-to-left override reorders what follows
        ("tab\there", "tab\\there"),
        ("one\ntwo", "one\\ntwo"),  # one field cannot print a second line
    ],
)
def test_control_characters_are_shown_as_escapes(text: str, visible: str) -> None:
    assert for_terminal(text) == visible


def test_a_multi_line_block_keeps_its_line_breaks_only() -> None:
    assert for_terminal("one\n\x1b[31mtwo\r\n", multiline=True) == "one\n\\x1b[31mtwo\\r\n"


@pytest.mark.parametrize("text", [MARKUP, "naïve 漢字 😀 ü", "quote ' \" \\ back", ""])
def test_printable_text_is_unchanged(text: str) -> None:
    assert for_terminal(text) == text == for_terminal(text, multiline=True)


# --- what the CLI prints -------------------------------------------------------------------------


def printed(*renderables: RenderableType, terminal: bool = False) -> str:
    """What a console prints; as a colour terminal with ``terminal`` (styles as ANSI codes)."""
    console = Console(file=io.StringIO(), width=400, force_terminal=terminal, color_system=None)
    for renderable in renderables:
        console.print(renderable)
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(output, str)
    return output


def failure_record() -> FailureRecord:
    return FailureRecord(
        run_id="run-1",
        task=MARKUP,
        input=HOSTILE,
        output=f"{HOSTILE}\nsecond line",
        score=0.0,
        problems=[HOSTILE],
        trace=[TraceStep(kind="tool", name=MARKUP, input=HOSTILE, ms=3)],
        prompt_version=1,
        rules_sha256="r" * 64,
        model="m",
    )


def record(kind: str, payload: dict[str, object], seq: int = 1) -> AuditRecord:
    return AuditRecord(
        seq=seq,
        change_id=MARKUP,
        kind=kind,
        actor=HOSTILE,
        payload=payload,
        at=NOW,
        prev_hash="0" * 64,
        hash="1" * 64,
    )


TRAIL = [
    record(
        "received",
        {"task": MARKUP, "base_version": 1, "model": HOSTILE, "rationale": HOSTILE},
    ),
    record("measured", measurement(fixed=[MARKUP]).model_dump(mode="json"), seq=2),
    record("awaiting_approval", {"prompt_diff": f"-old\n+{HOSTILE}"}, seq=3),
    record("invalid", {"problems": [HOSTILE]}, seq=4),
    record("decision_refused", {"why": HOSTILE}, seq=5),
]

TABLES: dict[str, Callable[[], RenderableType]] = {
    "trace": lambda: trace_table(failure_record()),
    "groups": lambda: groups_table([FailureGroup(label=HOSTILE, size=2, run_ids=[MARKUP])]),
    "changes": lambda: changes_table(
        [
            ChangeSummary(
                change_id=MARKUP, task=HOSTILE, status=MARKUP, updated_at=NOW, proposer=HOSTILE
            )
        ]
    ),
    "trail": lambda: trail_table(TRAIL),
    "audit": lambda: audit_table(TRAIL),
    "history": lambda: history_table(
        [PromptVersion(task=MARKUP, version=1, record=PromptRecord(text=f"{HOSTILE}\nline 2"))]
    ),
    "labelled": lambda: labelled("output:", HOSTILE),
    "block": lambda: block(HOSTILE),
    "shown": lambda: shown(HOSTILE, "bold"),
}


@pytest.mark.parametrize("name", TABLES)
def test_untrusted_text_is_printed_literally(name: str) -> None:
    output = printed(TABLES[name]())

    assert "[/]" in output and "[bold red]x[/]" in output and "[link=http://x]y" in output
    assert ":warning:" in output  # not an emoji
    assert "\x1b" not in output and "\\x1b[31mred" in output


@pytest.mark.parametrize("name", TABLES)
def test_untrusted_text_restyles_nothing(name: str) -> None:
    """On a colour terminal, the only escape sequences are the command's own styles: no red."""
    output = printed(TABLES[name](), terminal=True)

    assert "\x1b[31m" not in output  # the text's own ANSI red
    assert "\x1b[1;31m" not in output and "\x1b]8;" not in output  # [bold red], [link]


def test_the_evidence_is_printed_literally_and_each_line_is_its_own() -> None:
    console = Console(file=io.StringIO(), width=400)

    print_evidence(TRAIL, console)

    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b" not in output
    assert f"rationale: {MARKUP} \\x1b[31mred\\x1b[0m" in output
    assert f"  +{MARKUP}" in output  # the diff's lines are indented
    assert f"invalid: {MARKUP}" in output and f"refused decision by {MARKUP}" in output


def test_a_multi_line_output_cannot_pass_for_a_line_of_the_command() -> None:
    output = printed(labelled("output:", "fine\nscore: 1.00 (forged)"))

    assert output.splitlines() == ["output: fine", "        score: 1.00 (forged)"]


def test_the_demo_summary_prints_its_task_and_approver_literally() -> None:
    from ratchet.cli.demo import DemoReport

    report = DemoReport(
        task=MARKUP,
        model=HOSTILE,
        learn_cases=4,
        learn_success_rate=0.25,
        failures=3,
        groups=[],
        decision={"approved": True, "approver": HOSTILE, "reason": HOSTILE},
        outcome="kept",
        runs=16,
        tokens=TokenUsage(),
        seconds=1.0,
    )
    console = Console(file=io.StringIO(), width=400)

    print_summary(report, console)

    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b" not in output
    assert f"{MARKUP} / {MARKUP} \\x1b[31mred" in output and f"approved by {MARKUP}" in output
