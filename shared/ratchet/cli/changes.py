"""The change cycle: ``ratchet propose``, ``changes``, ``show``, ``approve``, ``reject``,
``audit``."""

from __future__ import annotations

import argparse
import getpass
import json

from nats.aio.client import Client
from pydantic import TypeAdapter

from ratchet.audit import verify_chain
from ratchet.cli.client import (
    ClientError,
    client_settings,
    fetch_trail,
    open_client,
    query,
    request,
    send_decision,
)
from ratchet.cli.render import (
    audit_table,
    changes_table,
    console,
    plain,
    print_evidence,
    trail_table,
)
from ratchet.contracts import ChangeProposed
from ratchet.messaging import QUERY_PREFIX, publish_js
from ratchet.prompts import read_current
from ratchet.queries import (
    AuditPage,
    AuditQuery,
    ChangesQuery,
    ChangeSummary,
    ProposeReply,
    ProposeRequest,
)
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
    plain(f"prompt: {change.proposed_prompt}")
    plain(f"why: {change.rationale}")
    console.print("the gatekeeper now measures it; see `ratchet changes`")
    return 0


async def propose_own(args: argparse.Namespace) -> int:
    """A person's own proposal: it goes through the same gate. With ``--margin`` it is a change
    made for another reason than being better (shorter, cheaper), kept if shown no worse."""
    if args.margin is not None and not 0 < args.margin <= 0.2:
        raise ClientError(f"--margin must be above 0 and at most 0.2, got {args.margin}")
    nc = await open_client(client_settings())
    try:
        current = await read_current(nc.jetstream(), args.task)
        if current is None:
            raise ClientError(f"no prompt stored for task {args.task!r}")
        change = ChangeProposed(
            task=args.task,
            base_version=current.version,
            proposed_prompt=args.prompt,
            rationale=args.because,
            proposer=f"cli:{getpass.getuser()}",
            margin=args.margin or 0.0,
        )
        await publish_change(nc, change)
    finally:
        await nc.close()
    test = f"non-inferiority, margin {change.margin:.0%}" if change.margin else "superiority"
    console.print(
        f"proposed change {change.change_id} ({test} test); the gatekeeper now measures it"
    )
    return 0


async def publish_change(nc: Client, change: ChangeProposed) -> None:
    await publish_js(nc.jetstream(), change, timeout=5)


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
    console.print(f"[bold]change {args.change}[/]: {trail[-1].kind}")
    print_evidence(trail)
    console.print(trail_table(trail))
    return 0


async def cmd_decide(args: argparse.Namespace) -> int:
    approve = args.command == "approve"
    await send_decision(
        args.change, approve=approve, reason=args.reason, approver=f"cli:{getpass.getuser()}"
    )
    console.print(
        f"{'approved' if approve else 'rejected'} {args.change}; see `ratchet show {args.change}`"
    )
    return 0


async def fetch_audit(nc: Client) -> list[AuditRecord]:
    """The whole audit trail from its owner, the gatekeeper, a page at a time."""
    records: list[AuditRecord] = []
    while True:
        page = await request(
            nc,
            f"{QUERY_PREFIX}.audit",
            AuditQuery(after_seq=records[-1].seq if records else 0),
            TypeAdapter(AuditPage),
            service="gatekeeper",
        )
        records += page.records
        if not (page.more and page.records):
            return records


async def cmd_audit(args: argparse.Namespace) -> int:
    """The trail as the gatekeeper sends it, its hash chain checked here on what arrived. Without
    keys that is a consistency check (an edited or removed record, a broken link), not protection
    against the gatekeeper itself, which could rewrite the whole chain."""
    nc = await open_client(client_settings())
    try:
        records = await fetch_audit(nc)
    finally:
        await nc.close()
    problems = verify_chain(records)
    if args.verify:
        if problems:
            for problem in problems:
                print(f"TAMPERED {problem}")
            return 2
        console.print(f"audit trail intact: {len(records)} records, hash chain verified")
        return 0
    console.print(audit_table([r for r in records if args.change in (None, r.change_id)]))
    if problems:
        console.print(f"[red]{len(problems)} integrity problem(s); run with --verify[/]")
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
        decide.set_defaults(handler=cmd_decide, is_async=True)

    audit = sub.add_parser("audit", help="the audit trail of every change")
    audit.add_argument("--change")
    audit.add_argument(
        "--verify", action="store_true", help="check the hash chain; exit 2 if broken"
    )
    audit.set_defaults(handler=cmd_audit, is_async=True)
