"""Terminal output shared by the commands and the demo: one console, untrusted text printed
plainly, the gate's evidence and the tables."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ratchet.contracts import FailureGroup, Measurement
from ratchet.evidence import describe, describe_after
from ratchet.prompts import PromptVersion
from ratchet.queries import ChangeSummary
from ratchet.store import AuditRecord, FailureRecord

console = Console()


def plain(text: str) -> None:
    console.print(text, markup=False, highlight=False)


def print_evidence(trail: list[AuditRecord]) -> None:
    """What a person needs to decide: the proposal, the gate's evidence and the diff.

    Everything here may hold untrusted text (a rationale, a prompt), so none of it is markup."""
    by_kind = {r.kind: r.payload for r in trail}
    if received := by_kind.get("received"):
        plain(
            f"task: {received['task']}  base version: v{received['base_version']}  "
            f"by: {received['proposer']}"
        )
        plain(f"rationale: {received['rationale']}")
    if diff := by_kind.get("awaiting_approval"):
        plain("prompt diff:")
        plain(diff["prompt_diff"])
    if measured := by_kind.get("measured"):
        for line in describe(Measurement.model_validate(measured)):
            plain(line)
    for line in describe_after(by_kind):
        plain(line)
    if invalid := by_kind.get("invalid"):
        for problem in invalid["problems"]:
            plain(f"  invalid: {problem}")
    for refused in (r for r in trail if r.kind == "decision_refused"):
        plain(f"  refused decision by {refused.actor}: {refused.payload['why']}")


def trace_table(failure: FailureRecord) -> Table:
    table = Table("step", "kind", "name", "detail", "ms", box=None, show_header=True)
    for i, step in enumerate(failure.trace, 1):
        detail = step.input or step.output
        table.add_row(str(i), step.kind, step.name, detail[:80], f"{step.ms:.0f}")
    return table


def groups_table(groups: list[FailureGroup]) -> Table:
    table = Table("#", "failures", "problem", "example run")
    for i, group in enumerate(groups, 1):
        table.add_row(str(i), str(group.size), group.label, group.run_ids[0])
    return table


def changes_table(changes: list[ChangeSummary]) -> Table:
    table = Table("change", "task", "status", "updated")
    for c in changes:
        table.add_row(c.change_id, c.task, c.status, f"{c.updated_at:%Y-%m-%d %H:%M:%S}")
    return table


def trail_table(trail: list[AuditRecord]) -> Table:
    """One change's trail, as ``ratchet show`` prints it."""
    table = Table("seq", "when", "step", "by")
    for r in trail:
        table.add_row(str(r.seq), f"{r.at:%H:%M:%S}", r.kind, r.actor)
    return table


def audit_table(records: list[AuditRecord]) -> Table:
    """Every change's trail, as ``ratchet audit`` prints it."""
    table = Table("seq", "when", "change", "step", "by")
    for r in records:
        table.add_row(str(r.seq), f"{r.at:%Y-%m-%d %H:%M:%S}", r.change_id, r.kind, r.actor)
    return table


def history_table(history: list[PromptVersion]) -> Table:
    table = Table("version", "when", "kind", "change", "prompt")
    for v in history:
        when = f"{v.created:%Y-%m-%d %H:%M:%S}" if v.created else ""
        table.add_row(f"v{v.version}", when, v.record.kind, v.record.change_id or "", v.record.text)
    return table
