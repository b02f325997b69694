"""``ratchet prompts``: every version of a task prompt, and proposing a rollback."""

from __future__ import annotations

import argparse
import getpass

from ratchet.cli.changes import publish_change
from ratchet.cli.client import ClientError, client_settings, open_client
from ratchet.cli.render import console, history_table
from ratchet.contracts import ChangeProposed
from ratchet.prompts import read_history


async def cmd_prompts(args: argparse.Namespace) -> int:
    settings = client_settings()
    nc = await open_client(settings)
    try:
        history = await read_history(nc.jetstream(), args.task)
        if not history:
            raise ClientError(f"no prompt stored for task {args.task!r}")
        if args.rollback_to is not None:
            target = next((v for v in history if v.version == args.rollback_to), None)
            if target is None:
                raise ClientError(f"task {args.task!r} has no version {args.rollback_to}")
            change = ChangeProposed(
                task=args.task,
                base_version=history[-1].version,
                proposed_prompt=target.record.text,
                rationale=f"roll back to version {target.version}",
                proposer=f"cli:{getpass.getuser()}",
                margin=settings.gate.rollback_margin,  # kept if shown no worse: needs a person
            )
            await publish_change(nc, change)
            console.print(
                f"proposed rollback as change {change.change_id}: it goes through the gate "
                f"(a non-inferiority test, margin {change.margin:.0%}) and needs a person's "
                "approval"
            )
            return 0
    finally:
        await nc.close()
    console.print(history_table(history))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    prompts = sub.add_parser("prompts", help="every version of a task prompt")
    prompts.add_argument("task")
    prompts.add_argument(
        "--rollback-to", type=int, metavar="VERSION", help="propose going back to VERSION"
    )
    prompts.set_defaults(handler=cmd_prompts, is_async=True)
