"""The change cycle: ``ratchet propose``, ``changes``, ``show``, ``approve``, ``reject``,
``audit``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from nats.aio.client import Client
from pydantic import TypeAdapter
from rich.text import Text

from ratchet.audit import AuditKey, AuditKeyError, TrailReport, verify_trail
from ratchet.cli.client import (
    ClientError,
    client_settings,
    fetch_anchor,
    fetch_audit,
    fetch_trail,
    open_client,
    publish_as,
    query,
    send_decision,
)
from ratchet.cli.render import (
    audit_table,
    changes_table,
    console,
    labelled,
    plain,
    print_evidence,
    shown,
    trail_table,
)
from ratchet.contracts import CanaryStats, ChangeProposed, ChangeRecorded
from ratchet.messaging import QUERY_PREFIX
from ratchet.natsconf import CLIENT
from ratchet.prompts import read_current
from ratchet.queries import (
    CANARY_OUTCOMES,
    ChangesQuery,
    ChangeSummary,
    ProposeReply,
    ProposeRequest,
)
from ratchet.settings import Settings
from ratchet.store import AuditRecord


async def cmd_propose(args: argparse.Namespace) -> int:
    if args.prompt is not None:
        return await propose_own(args)
    if args.margin is not None:
        raise ClientError("--margin goes with --prompt (a change of your own)")
    reply = await query(
        f"{QUERY_PREFIX}.propose",
        ProposeRequest(task=args.task),
        TypeAdapter(ProposeReply),
        service="proposer",
    )
    if reply.change is None:
        raise ClientError(reply.error or "the proposer made no proposal")
    change = reply.change
    plain(f"proposed change {change.change_id} for {change.task} (from v{change.base_version})")
    console.print(labelled("prompt:", change.proposed_prompt, style=""))
    plain(f"why: {change.rationale}")
    console.print("the gatekeeper now measures it; see `ratchet changes`")
    return 0


async def propose_own(args: argparse.Namespace) -> int:
    """A person's own proposal: it goes through the same gate. With ``--margin`` it is a change
    made for another reason than being better (shorter, cheaper), kept if shown no worse."""
    if args.margin is not None and not 0 < args.margin <= 0.2:
        raise ClientError(f"--margin must be above 0 and at most 0.2, got {args.margin}")

    async def own_change(nc: Client) -> ChangeProposed:
        current = await read_current(nc.jetstream(), args.task)
        if current is None:
            raise ClientError(f"no prompt stored for task {args.task!r}")
        return ChangeProposed(
            task=args.task,
            base_version=current.version,
            proposed_prompt=args.prompt,
            rationale=args.because,
            margin=args.margin or 0.0,
        )

    settings = client_settings()
    change = await publish_change(settings, own_change)
    test = f"non-inferiority, margin {change.margin:.0%}" if change.margin else "superiority"
    plain(
        f"proposed change {change.change_id} as {proposer_of(settings)} ({test} test); "
        "the gatekeeper now measures it"
    )
    return 0


def proposer_of(settings: Settings) -> str:
    """Who a change the CLI proposes is recorded as: the NATS user it logs in as."""
    return settings.nats_user or CLIENT


async def publish_change(
    settings: Settings, make: Callable[[Client], Awaitable[ChangeProposed]]
) -> ChangeProposed:
    """Publish the change ``make`` builds (reading the prompt store first) on the proposals
    subject of the user the CLI logs in as, the only one that user may publish: the gatekeeper
    records that user, ``client`` unless the environment names another, as the proposer."""
    user = proposer_of(settings)

    def may_not_propose(why: str) -> ClientError:
        return ClientError(
            f"NATS user {user!r} may not propose changes ({why}): people propose as the "
            f"{CLIENT!r} user (leave RATCHET_NATS_USER unset)"
        )

    subject = ChangeProposed.subject_of(user)
    return await publish_as(settings, make, subject=subject, refused=may_not_propose)


async def cmd_changes(args: argparse.Namespace) -> int:
    changes = await query(
        f"{QUERY_PREFIX}.changes",
        ChangesQuery(task=args.task),
        TypeAdapter(list[ChangeSummary]),
        service="gatekeeper",
    )
    if args.json:
        print(json.dumps([c.model_dump(mode="json") for c in changes], indent=2))
        return 0
    if not changes:
        console.print("no changes yet")
        return 0
    console.print(changes_table(changes))
    return 0


async def cmd_show(args: argparse.Namespace) -> int:
    nc = await open_client(client_settings())
    try:
        trail = await fetch_trail(nc, args.change)
    finally:
        await nc.close()
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in trail], indent=2))
        return 0
    console.print(
        Text.assemble(shown(f"change {args.change}", "bold"), ": ", shown(trail[-1].kind))
    )
    print_evidence(trail, live=await live_canary(trail))
    console.print(trail_table(trail))
    return 0


async def live_canary(trail: list[AuditRecord]) -> CanaryStats | None:
    """A running canary's counts so far (the gatekeeper's ledger holds them, not the trail)."""
    kinds = {r.kind for r in trail}
    if "canary" not in kinds or kinds & CANARY_OUTCOMES:
        return None
    task = next((str(r.payload["task"]) for r in trail if r.kind == "canary"), None)
    changes = await query(
        f"{QUERY_PREFIX}.changes",
        ChangesQuery(task=task),
        TypeAdapter(list[ChangeSummary]),
        service="gatekeeper",
    )
    return next((c.canary for c in changes if c.change_id == trail[0].change_id), None)


async def cmd_decide(args: argparse.Namespace) -> int:
    approve = args.command == "approve"
    name = await send_decision(args.change, approve=approve, reason=args.reason, approver=args.as_)
    verb = "approved" if approve else "rejected"
    plain(f"{verb} {args.change} as {name}; see `ratchet show {args.change}`")
    return 0


def pinned_key(value: str) -> AuditKey:
    """``--public-key``: the key itself (``ed25519:...``) or a file holding it, such as the
    gatekeeper's ``gatekeeper-audit-key.pub`` that the operator saved."""
    try:
        if value.strip().startswith("ed25519:"):
            return AuditKey.parse(value)
        try:
            text = Path(value).read_text(encoding="utf-8")
        except OSError as exc:
            raise ClientError(f"--public-key: cannot read {value!r} ({exc.strerror})") from exc
        return AuditKey.parse(text)
    except AuditKeyError as exc:
        raise ClientError(f"--public-key: {exc}") from exc


def verifying_key(pinned: AuditKey | None, sent: str | None) -> tuple[AuditKey | None, str, str]:
    """The key to check signatures with, a line saying which it is, and a problem when the
    gatekeeper's key is not the pinned one (empty if none)."""
    try:
        gatekeepers = AuditKey.parse(sent) if sent else None
    except AuditKeyError as exc:
        raise ClientError(f"the gatekeeper sent an unusable public key: {exc}") from exc
    if pinned is not None:
        mismatch = (
            f"the gatekeeper signs with key {gatekeepers.id}, not the pinned key {pinned.id}"
            if gatekeepers is not None and gatekeepers != pinned
            else ""
        )
        return pinned, f"key: {pinned.id}, pinned (--public-key)", mismatch
    if gatekeepers is not None:
        return (
            gatekeepers,
            f"key: {gatekeepers.id}, as the gatekeeper sent it (to check against your own copy, "
            f"save it and pass --public-key {gatekeepers.text})",
            "",
        )
    return None, "key: none (the gatekeeper sent no public key and none was pinned)", ""


async def cmd_audit(args: argparse.Namespace) -> int:
    """The trail as the gatekeeper sends it, checked here: its hash chain, every record's
    signature (with the gatekeeper's key, or one pinned with ``--public-key``), and its end
    against the newest anchor in the events stream signed with that key, read from the stream
    itself (newer messages on ``change.recorded`` that are no such anchor are problems too).
    Exit 2 when anything shows tampering."""
    pinned = pinned_key(args.public_key) if args.public_key else None
    nc = await open_client(client_settings())
    try:
        records, key_line, anchor, report = await checked_trail(nc, pinned)
    finally:
        await nc.close()
    if not args.verify:
        console.print(audit_table([r for r in records if args.change in (None, r.change_id)]))
        if report.problems:
            plain(f"{len(report.problems)} integrity problem(s); run with --verify")
        return 0
    plain(key_line)
    plain(
        f"anchor: seq {anchor.head.seq}, published {anchor.created_at:%Y-%m-%d %H:%M:%S} UTC"
        if anchor
        else "anchor: no valid one in the RATCHET stream"
    )
    return print_verdict(report, len(records))


async def checked_trail(
    nc: Client, pinned: AuditKey | None
) -> tuple[list[AuditRecord], str, ChangeRecorded | None, TrailReport]:
    """The whole trail and what checking it found (``ratchet audit``, the review console): the
    records, a line saying which key checked the signatures, the anchor it was checked against,
    and the report, whose problems include a key that is not the pinned one and messages on
    ``change.recorded`` that are no valid anchor."""
    records, sent_key = await fetch_audit(nc)
    key, key_line, mismatch = verifying_key(pinned, sent_key)
    reading = await fetch_anchor(nc, key)
    report = verify_trail(records, key, reading.head)
    report.problems[:0] = [*([mismatch] if mismatch else []), *reading.problems]
    return records, key_line, reading.event, report


def print_verdict(report: TrailReport, count: int) -> int:
    """Notes, then each problem on a line of its own; 2 if there is any problem, else 0."""
    for note in report.notes:
        plain(f"note: {note}")
    for problem in report.problems:
        plain(f"TAMPERED {problem}")
    if report.problems:
        plain(f"audit trail NOT intact: {len(report.problems)} problem(s) in {count} records")
        return 2
    plain(f"audit trail intact: {count} records; hash chain, signatures and anchor verified")
    return 0


def cmd_audit_key(args: argparse.Namespace) -> int:
    """Make (or show) the signing key every gatekeeper of a deployment must share."""
    from ratchet.audit import PUBLIC_KEY_FILE, SIGNING_KEY_FILE, AuditSigner

    path = args.folder / SIGNING_KEY_FILE
    existed = path.exists()
    try:
        signer = AuditSigner.load_or_create(path)
    except (OSError, ValueError) as exc:
        raise ClientError(f"cannot make the audit key in {args.folder}: {exc}") from exc
    console.print(
        Text(
            f"{'kept the existing' if existed else 'made a new'} key {path} (0600) and its public "
            f"half {path.with_name(PUBLIC_KEY_FILE)}: {signer.key.text}"
        )
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    propose = sub.add_parser(
        "propose", help="ask the proposer for a change to a task prompt now, or propose your own"
    )
    propose.add_argument("task")
    propose.add_argument("--prompt", help="your own task prompt (it goes through the same gate)")
    propose.add_argument("--because", default="proposed by hand", help="why, for the audit")
    propose.add_argument(
        "--margin",
        type=float,
        help="a change made for another reason (shorter, cheaper): kept if shown no worse than "
        "this share (e.g. 0.05); it always needs a person's approval",
    )
    propose.set_defaults(handler=cmd_propose, is_async=True)

    changes = sub.add_parser("changes", help="list changes and their status")
    changes.add_argument("--task")
    changes.add_argument("--json", action="store_true")
    changes.set_defaults(handler=cmd_changes, is_async=True)

    show = sub.add_parser("show", help="a change's evidence, diff and audit trail")
    show.add_argument("change")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_show, is_async=True)

    for verb in ("approve", "reject"):
        decide = sub.add_parser(verb, help=f"{verb} a change waiting at the gate")
        decide.add_argument("change")
        decide.add_argument("--reason", required=True)
        decide.add_argument(
            "--as",
            dest="as_",
            metavar="NAME",
            help="the approver who decides (RATCHET_APPROVERS; default: the approver whose NATS "
            "user RATCHET_NATS_USER names, else the only one configured, operator by default)",
        )
        decide.set_defaults(handler=cmd_decide, is_async=True)

    audit = sub.add_parser("audit", help="the audit trail of every change")
    audit.add_argument("--change")
    audit.add_argument(
        "--verify",
        action="store_true",
        help="check the hash chain, the signatures and the anchor in the stream; exit 2 if "
        "anything was tampered with",
    )
    audit.add_argument(
        "--public-key",
        metavar="KEY_OR_FILE",
        help="check signatures with this key (ed25519:..., or a file holding it, such as a saved "
        "copy of the gatekeeper's gatekeeper-audit-key.pub) instead of the one the gatekeeper "
        "sends",
    )
    audit.set_defaults(handler=cmd_audit, is_async=True)

    key = sub.add_parser(
        "audit-key",
        help="make the gatekeepers' audit signing key in a folder (for several gatekeepers: "
        "copy it into each one's home, or into a Kubernetes secret)",
    )
    key.add_argument("folder", type=Path)
    key.set_defaults(handler=cmd_audit_key, is_async=False)
