"""Terminal output shared by the commands and the demo: one console, the gate's evidence and the
tables.

Untrusted text (task names, inputs, outputs, problems, rationales, prompts, approvers' names and
reasons: anything that came from the wire or a model) reaches the console only as a Rich ``Text``
made by :func:`shown`: its control characters are made visible (:func:`ratchet.untrusted.
for_terminal`) and a ``Text`` is never parsed for markup, emoji codes or highlighting, so ``[/]``
is printed as written instead of crashing, and ``[red]`` or an ANSI escape restyles nothing.
Strings with markup are for the commands' own words only.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ratchet.canary import describe_steps as describe_canary
from ratchet.contracts import CanaryStats, FailureGroup, Measurement
from ratchet.evidence import describe, describe_after
from ratchet.prompts import PromptVersion
from ratchet.queries import ChangeSummary
from ratchet.store import AuditRecord, FailureRecord
from ratchet.untrusted import for_terminal

console = Console()


def shown(text: str, style: str = "", *, multiline: bool = False) -> Text:
    """Untrusted ``text`` as it may be printed: literally, styled only by ``style``.
    ``multiline`` keeps its line breaks (a prompt, an output); elsewhere they show as ``\\n``."""
    return Text(for_terminal(text, multiline=multiline), style=style)


def block(text: str, indent: int = 2) -> Text:
    """Untrusted text of several lines (a prompt, a diff), every line indented by ``indent``, so
    none of them can pass for a line of the command's own."""
    pad = " " * indent
    return Text(pad + for_terminal(text, multiline=True).replace("\n", "\n" + pad))


def labelled(label: str, text: str, style: str = "bold") -> Text:
    """``label`` then untrusted ``text``, its further lines indented under its first."""
    pad = " " * (len(label) + 1)
    body = for_terminal(text, multiline=True).replace("\n", "\n" + pad)
    return Text.assemble((label, style), " ", body)


def plain(text: str) -> None:
    """One line holding untrusted text, printed literally."""
    console.print(shown(text))


def print_evidence(
    trail: list[AuditRecord], out: Console | None = None, *, live: CanaryStats | None = None
) -> None:
    """What a person needs to decide: the proposal, the gate's evidence and the diff; then what
    happened after applying, the canary (``live``: its counts while it runs) and the judge's
    tokens.

    Everything here may hold untrusted text (a task, a rationale, a prompt, a decision's reason),
    so every line is :func:`shown`."""
    out = out or console
    by_kind = {r.kind: r.payload for r in trail}
    lines: list[Text] = []
    if proposal := next((r for r in trail if r.kind == "received"), None):
        received = proposal.payload
        # who proposed is the record's actor (the name the server authenticated); the model is
        # only what the proposal says wrote it
        model = f" (model {received['model']})" if received.get("model") else ""
        lines.append(
            shown(
                f"task: {received['task']}  base version: v{received['base_version']}  "
                f"by: {proposal.actor}{model}"
            )
        )
        lines.append(shown(f"rationale: {received['rationale']}"))
    if diff := by_kind.get("awaiting_approval"):
        lines.append(Text("prompt diff:"))
        lines.append(block(diff["prompt_diff"]))
    if measured := by_kind.get("measured"):
        lines += [shown(line) for line in describe(Measurement.model_validate(measured))]
    lines += [shown(line) for line in describe_after(by_kind)]
    lines += [shown(line) for line in describe_canary(by_kind, live)]
    if tokens := judge_tokens(by_kind):
        lines.append(shown(tokens))
    if invalid := by_kind.get("invalid"):
        lines += [shown(f"  invalid: {problem}") for problem in invalid["problems"]]
    for refused in (r for r in trail if r.kind == "decision_refused"):
        lines.append(shown(f"  refused decision by {refused.actor}: {refused.payload['why']}"))
    for line in lines:
        out.print(line)


JUDGED_STEPS = {  # audit kind -> the runs whose judge tokens its record holds
    "awaiting_approval": "measure",
    "verified": "verify",
    "holdout": "holdout",
}


def judge_tokens(by_kind: dict[str, dict[str, Any]]) -> str:
    """What judging the change's runs cost, by step ("" where no record says)."""
    parts = [
        (label, int(by_kind[kind]["judge_tokens"]))
        for kind, label in JUDGED_STEPS.items()
        if "judge_tokens" in by_kind.get(kind, {})
    ]
    if outcome := by_kind.get("promoted") or by_kind.get("canary_rolled_back"):
        parts.append(("canary (live runs)", int(outcome["stats"]["judge_tokens"])))
    if not parts:
        return ""
    each = ", ".join(f"{label} {tokens}" for label, tokens in parts)
    return f"judge tokens: {sum(t for _, t in parts)} ({each})"


def trace_table(failure: FailureRecord) -> Table:
    table = Table("step", "kind", "name", "detail", "ms", box=None, show_header=True)
    for i, step in enumerate(failure.trace, 1):
        detail = step.input or step.output
        table.add_row(
            str(i), shown(step.kind), shown(step.name), shown(detail[:80]), f"{step.ms:.0f}"
        )
    return table


def groups_table(groups: list[FailureGroup]) -> Table:
    table = Table("#", "failures", "problem", "example run")
    for i, group in enumerate(groups, 1):
        table.add_row(str(i), str(group.size), shown(group.label), shown(group.run_ids[0]))
    return table


STATUS_LABELS = {"canary": "in canary", "canary_rolled_back": "rolled back by canary"}


def changes_table(changes: list[ChangeSummary]) -> Table:
    table = Table("change", "task", "by", "status", "canary", "updated")
    for c in changes:
        table.add_row(
            shown(c.change_id),
            shown(c.task),
            shown(c.proposer),
            shown(STATUS_LABELS.get(c.status, c.status)),
            canary_cell(c.canary),
            f"{c.updated_at:%Y-%m-%d %H:%M:%S}",
        )
    return table


def canary_cell(stats: CanaryStats | None) -> str:
    """A canary's counts and bounds in a few words ("" for a change without one)."""
    if stats is None:
        return ""
    verdict = "" if stats.verdict == "running" else f"{stats.verdict}: "
    return (
        f"{verdict}{stats.canary_runs} canary (v{stats.canary_version}) / {stats.stable_runs} "
        f"stable runs, lift {stats.lift:+.1%} ({stats.lower:+.1%} to {stats.upper:+.1%})"
    )


def trail_table(trail: list[AuditRecord]) -> Table:
    """One change's trail, as ``ratchet show`` prints it."""
    table = Table("seq", "when", "step", "by")
    for r in trail:
        table.add_row(str(r.seq), f"{r.at:%H:%M:%S}", shown(r.kind), shown(r.actor))
    return table


def audit_table(records: list[AuditRecord]) -> Table:
    """Every change's trail, as ``ratchet audit`` prints it."""
    table = Table("seq", "when", "change", "step", "by")
    for r in records:
        table.add_row(
            str(r.seq),
            f"{r.at:%Y-%m-%d %H:%M:%S}",
            shown(r.change_id),
            shown(r.kind),
            shown(r.actor),
        )
    return table


def history_table(history: list[PromptVersion]) -> Table:
    table = Table("version", "when", "kind", "change", "prompt")
    for v in history:
        when = f"{v.created:%Y-%m-%d %H:%M:%S}" if v.created else ""
        table.add_row(
            f"v{v.version}",
            when,
            shown(v.record.kind),
            shown(v.record.change_id or ""),
            shown(v.record.text, multiline=True),
        )
    return table
