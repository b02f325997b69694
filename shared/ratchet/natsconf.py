"""The nats-server configuration: one user per service, each allowed only what its role needs.

This is where the isolation invariants are enforced by the server itself:

- only the evaluator may publish ``run.scored``;
- only the gatekeeper may request gate runs (``run.gate.requested``);
- only the gatekeeper may write the prompt store (publish to ``$KV.prompts.>``);
- only approvers may publish ``change.approved`` / ``change.rejected``;
- only the owner of a table answers the queries about it: the failure store ``query.failures`` /
  ``query.groups``, the gatekeeper (the audit trail's owner) ``query.changes`` / ``query.change``
  / ``query.audit``;
- each service may only create and read its own durable consumers, on its own subjects.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from ratchet.messaging import DLQ_PREFIX, EVENTS_STREAM, PROMPTS_BUCKET, QUERY_PREFIX

KV_STREAM = f"KV_{PROMPTS_BUCKET}"
JS_API = "$JS.API"


@dataclass(frozen=True)
class Role:
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    consumers: tuple[tuple[str, str], ...] = ()  # (durable name, filter subject)
    reads_prompts: bool = False


ROLES: dict[str, Role] = {
    "executor": Role(
        publish=("run.completed",),
        consumers=(("executor", "run.requested"), ("executor-gate", "run.gate.requested")),
        reads_prompts=True,
    ),
    "evaluator": Role(publish=("run.scored",), consumers=(("evaluator", "run.completed"),)),
    "failure-store": Role(
        publish=("failure.logged",),
        subscribe=(f"{QUERY_PREFIX}.failures", f"{QUERY_PREFIX}.groups", f"{QUERY_PREFIX}.count"),
        consumers=(
            ("failure-store-completed", "run.completed"),
            ("failure-store-scored", "run.scored"),
        ),
    ),
    "proposer": Role(  # asks the failure store; owns no shared table
        publish=(
            "change.proposed",
            f"{QUERY_PREFIX}.failures",
            f"{QUERY_PREFIX}.groups",
            f"{QUERY_PREFIX}.count",
        ),
        subscribe=(f"{QUERY_PREFIX}.propose",),
        consumers=(("proposer", "failure.logged"),),
        reads_prompts=True,
    ),
    "gatekeeper": Role(
        publish=(
            "run.gate.requested",
            "change.awaiting_approval",
            "change.applied",
            "change.kept",
            "change.rolled_back",
            "change.recorded",
            f"$KV.{PROMPTS_BUCKET}.>",
        ),
        # the audit trail's owner answers every question about it
        subscribe=(f"{QUERY_PREFIX}.changes", f"{QUERY_PREFIX}.change", f"{QUERY_PREFIX}.audit"),
        consumers=(
            ("gatekeeper-proposed", "change.proposed"),
            ("gatekeeper-scored", "run.scored"),
            ("gatekeeper-approved", "change.approved"),
            ("gatekeeper-rejected", "change.rejected"),
        ),
        reads_prompts=True,
    ),
    "approver": Role(
        publish=("change.approved", "change.rejected", f"{QUERY_PREFIX}.>"),
        subscribe=("change.>",),
        consumers=(("policy-approver", "change.awaiting_approval"),),
        reads_prompts=True,
    ),
    "client": Role(
        publish=("run.requested", "change.proposed", f"{QUERY_PREFIX}.>"),
        subscribe=("run.completed", "run.scored", "failure.logged", "change.>", f"{DLQ_PREFIX}.>"),
        reads_prompts=True,
    ),
}


def _permissions(role: Role) -> dict[str, object]:
    js_api = [f"{JS_API}.INFO", f"{JS_API}.STREAM.INFO.*", f"{JS_API}.STREAM.NAMES"]
    for durable, subject in role.consumers:
        js_api += [
            f"{JS_API}.CONSUMER.CREATE.{EVENTS_STREAM}.{durable}.{subject}",
            f"{JS_API}.CONSUMER.INFO.{EVENTS_STREAM}.{durable}",
            f"{JS_API}.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{durable}",
        ]
    if role.reads_prompts:  # KV get, history and watch (ordered, ephemeral consumers)
        js_api += [
            f"{JS_API}.STREAM.INFO.{KV_STREAM}",
            f"{JS_API}.DIRECT.GET.{KV_STREAM}.>",
            f"{JS_API}.STREAM.MSG.GET.{KV_STREAM}",
            f"{JS_API}.CONSUMER.CREATE.{KV_STREAM}",
            f"{JS_API}.CONSUMER.CREATE.{KV_STREAM}.>",
            f"{JS_API}.CONSUMER.INFO.{KV_STREAM}.*",
            f"{JS_API}.CONSUMER.DELETE.{KV_STREAM}.*",
        ]
    return {
        "publish": {
            "allow": [*role.publish, f"{DLQ_PREFIX}.>", *js_api, "$JS.ACK.>", "$JS.FC.>"],
        },
        "subscribe": {"allow": ["_INBOX.>", *role.subscribe]},
        "allow_responses": True,
    }


def generate_passwords() -> dict[str, str]:
    """A fresh random password for the admin and for every role."""
    return {name: secrets.token_urlsafe(18) for name in ["admin", *ROLES]}


def render_config(
    passwords: dict[str, str], *, port: int, store_dir: Path, host: str = "127.0.0.1"
) -> str:
    """A nats-server config (JSON is valid nats-server config syntax)."""
    accounts_users: list[dict[str, object]] = [{"user": "admin", "password": passwords["admin"]}]
    for name, role in ROLES.items():
        accounts_users.append(
            {"user": name, "password": passwords[name], "permissions": _permissions(role)}
        )
    config = {
        "host": host,
        "port": port,
        "jetstream": {"store_dir": str(store_dir)},
        "authorization": {"users": accounts_users},
    }
    return json.dumps(config, indent=2)
