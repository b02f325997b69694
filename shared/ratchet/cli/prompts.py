"""``ratchet prompts``: every version of a task prompt, and proposing a rollback."""

from __future__ import annotations

import argparse

from nats.aio.client import Client

from ratchet.cli.changes import proposer_of, publish_change
from ratchet.cli.client import ClientError, client_settings, open_client
from ratchet.cli.render import console, history_table, plain
from ratchet.contracts import ChangeProposed
from ratchet.prompts import PromptVersion, read_history
from ratchet.settings import Settings


async def cmd_prompts(args: argparse.Namespace) -> int:
    settings = client_settings()
    if args.rollback_to is not None:
        return await propose_rollback(settings, args.task, args.rollback_to)
    nc = await open_client(settings)
    try:
        history = await stored_history(nc, args.task)
    finally:
        await nc.close()
    console.print(history_table(history))
    return 0


async def stored_history(nc: Client, task: str) -> list[PromptVersion]:
    history = await read_history(nc.jetstream(), task)
    if not history:
        raise ClientError(f"no prompt stored for task {task!r}")
    return history


async def propose_rollback(settings: Settings, task: str, version: int) -> int:
    """Propose the prompt of ``version`` again: a change like any other, through the gate."""

    async def rollback(nc: Client) -> ChangeProposed:
        return await rollback_change(nc, task, version, settings)

    change = await publish_change(settings, rollback)
    plain(
        f"proposed rollback as change {change.change_id} by {proposer_of(settings)}: it goes "
        f"through the gate (a non-inferiority test, margin {change.margin:.0%}) and needs a "
        "person's approval"
    )
    return 0


async def rollback_change(
    nc: Client, task: str, version: int, settings: Settings
) -> ChangeProposed:
    """The change that proposes ``version``'s prompt again, against the current version (the
    CLI's ``--rollback-to`` and the review console's rollback button)."""
    history = await stored_history(nc, task)
    target = next((v for v in history if v.version == version), None)
    if target is None:
        raise ClientError(f"task {task!r} has no version {version}")
    return ChangeProposed(
        task=task,
        base_version=history[-1].version,
        proposed_prompt=target.record.text,
        rationale=f"roll back to version {target.version}",
        margin=settings.gate.rollback_margin,  # kept if shown no worse: needs a person
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    prompts = sub.add_parser("prompts", help="every version of a task prompt")
    prompts.add_argument("task")
    prompts.add_argument(
        "--rollback-to", type=int, metavar="VERSION", help="propose going back to VERSION"
    )
    prompts.set_defaults(handler=cmd_prompts, is_async=True)
