"""The nats-server configuration: one user per service, per approver, per instrumented app and
for the CLI, each allowed only what its role needs. The config is generated from :data:`ROLES`
(and :func:`approver_role` for each approver, :func:`app_role` for each app); the permission
matrix test walks the same table against a real server.

This is where the isolation invariants are enforced by the server itself:

- only the evaluator may publish ``run.scored``;
- only the gatekeeper may request gate runs (``run.gate.requested``);
- only the gatekeeper may write the prompt store (publish to ``$KV.prompts.>``);
- each instrumented app (``app-<name>``) may read the prompts and publish its own runs,
  ``run.reported.<name>``, and nothing else: no score, decision, proposal or prompt write;
- each approver may publish only its own decisions, ``change.approved.<name>`` /
  ``change.rejected.<name>``, and each proposing user only its own proposals,
  ``change.proposed.<user>`` (the proposer service and the CLI's client), so the name a decision
  or a proposal records is the one the server authenticated;
- the review console (``approver-console``) decides and proposes only for its reviewers, on
  ``<kind>.console.<reviewer>``: it authenticates the reviewer, the server authenticates it;
- only the owner of a table answers the queries about it: the failure store ``query.failures`` /
  ``query.groups`` / ``query.count`` / ``query.runs``, the gatekeeper (the audit trail's owner)
  ``query.changes`` / ``query.change`` / ``query.audit``, the proposer ``query.propose``;
- the proposer may ask about failures only, never ``query.runs`` (a change's gate runs: the
  gate's cases, which it must not see);
- each service may create, read, pull, acknowledge and dead-letter only its own durable
  consumers, on their own subjects (``$JS.ACK.RATCHET.<durable>.>``, ``dlq.<filter>``); nobody
  may delete a consumer;
- each user hears only its own inbox, ``_INBOX_<user>.>`` (replies, pull deliveries, watches).

The admin user (stream management, ``ratchet up``'s checks) is unrestricted; its password, like
every other, is stored only as a bcrypt hash in the config.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from ratchet.contracts import (
    APPROVER_NAME,
    Attributed,
    ChangeApplied,
    ChangeApproved,
    ChangeAwaitingApproval,
    ChangeCanaryRolledBack,
    ChangeCanaryStarted,
    ChangeKept,
    ChangePromoted,
    ChangeProposed,
    ChangeRecorded,
    ChangeRejected,
    ChangeRolledBack,
    FailureLogged,
    GateRunRequested,
    RunCompleted,
    RunReported,
    RunRequested,
    RunScored,
)
from ratchet.jetstream import PROMPT_NOTICES, PROMPTS_STREAM, app_user
from ratchet.messaging import (
    DLQ_PREFIX,
    EVENTS_STREAM,
    LEASE_BUCKET,
    PROMPTS_BUCKET,
    QUERY_PREFIX,
    dead_letter_subject,
    inbox_prefix,
)

KV_STREAM = PROMPTS_STREAM
JS_API = "$JS.API"
ADMIN = "admin"
POLICY_APPROVER = "policy"  # the policy approver service decides under this name
# The users that propose changes, each on its own subject: the proposer service (a model's
# proposals) and the CLI (a person's own change, a rollback). Approvers decide, never propose.
PROPOSER = "proposer"
CLIENT = "client"
# The review console (ratchet.console) decides and proposes for the reviewer logged in to it, on
# <kind>.console.<reviewer>: the server authenticated the console, the console its reviewer.
CONSOLE = "console"

# Passwords are 144-bit random tokens, so guessing one is out of reach at any bcrypt cost; the
# hash only keeps the config from handing them out. Cost 6 costs the server ~5 ms per connect
# (cost 11, nats' default, ~150 ms), which keeps CLI commands and service restarts fast.
BCRYPT_COST = 6


def _query(name: str) -> str:
    return f"{QUERY_PREFIX}.{name}"


FAILURE_QUERIES = (_query("failures"), _query("groups"), _query("count"))
# A change's gate runs, from the failure store (which owns the runs table), for people only: the
# proposer asks FAILURE_QUERIES and must never see the gate's cases.
RUNS_QUERY = _query("runs")
FAILURE_STORE_QUERIES = (*FAILURE_QUERIES, RUNS_QUERY)
AUDIT_QUERIES = (_query("changes"), _query("change"), _query("audit"))
PROPOSE_QUERY = _query("propose")
# People (the CLI, approvers, the console) may ask every question; each one is named, so a new
# query subject is refused to everyone until someone decides who may ask it.
EVERY_QUERY = (*FAILURE_STORE_QUERIES, *AUDIT_QUERIES, PROPOSE_QUERY)
# The audit trail's anchor: one direct get of the newest change.recorded in the events stream
READ_AUDIT_ANCHOR = f"{JS_API}.DIRECT.GET.{EVENTS_STREAM}.{ChangeRecorded.subject}"
# Any message of the events stream by sequence: the gatekeeper walks back past change.recorded
# messages that are not valid anchors to the newest that is (ratchet.audit.read_anchor).
READ_EVENTS_BY_SEQ = f"{JS_API}.DIRECT.GET.{EVENTS_STREAM}"
# The gatekeepers' leases (KV gate_leases): take, renew and release (writes), and read one back
# (nats-py's create reads a key to tell a released lease from a held one)
LEASE_STREAM = f"KV_{LEASE_BUCKET}"
USE_LEASES = (
    f"$KV.{LEASE_BUCKET}.>",
    f"{JS_API}.DIRECT.GET.{LEASE_STREAM}.>",
    f"{JS_API}.STREAM.MSG.GET.{LEASE_STREAM}",
)


@dataclass(frozen=True)
class Role:
    """What one NATS user may do; the server refuses everything else."""

    publish: tuple[str, ...] = ()  # events it emits, queries it asks, prompt-store writes
    subscribe: tuple[str, ...] = ()  # core subjects: queries it answers, events it watches
    consumers: tuple[tuple[str, str], ...] = ()  # its durables on RATCHET: (name, filter subject)
    reads_prompts: bool = False  # reads and watches the prompt store

    @property
    def answers_queries(self) -> bool:
        """Whether it serves requests, and so may reply to whoever asked (``allow_responses``)."""
        return any(subject.startswith(f"{QUERY_PREFIX}.") for subject in self.subscribe)


APPROVER_USER_PREFIX = "approver-"


def approver_user(name: str) -> str:
    """The NATS user of the approver ``name``."""
    if not re.fullmatch(APPROVER_NAME, name):
        raise ValueError(
            f"{name!r} is not an approver name: lowercase letters, digits, - and _, at most 32"
        )
    return f"{APPROVER_USER_PREFIX}{name}"


def approver_name(user: str) -> str | None:
    """The approver a NATS user decides for, if it is an approver's user."""
    return (
        user.removeprefix(APPROVER_USER_PREFIX) if user.startswith(APPROVER_USER_PREFIX) else None
    )


def approver_role(name: str, *, durable: str | None = None) -> Role:
    """A person, a bot or the policy approver: reads everything about changes, asks any query,
    and decides under its own name only. ``durable``: the policy approver's consumer."""
    return Role(
        publish=(
            ChangeApproved.subject_of(name),
            ChangeRejected.subject_of(name),
            *EVERY_QUERY,
            READ_AUDIT_ANCHOR,
        ),
        subscribe=("change.>",),
        consumers=((durable, ChangeAwaitingApproval.subject),) if durable else (),
        reads_prompts=True,
    )


def app_role(name: str) -> Role:
    """An instrumented app (the SDK in a user's own service): reads and watches the prompts it
    serves and reports its runs on its own subject, ``run.reported.<name>``, which the evaluator
    and the failure store attribute to it. Nothing else: it cannot score, decide, propose, write
    a prompt, request runs or ask a query."""
    return Role(publish=(RunReported.subject_of(name),), reads_prompts=True)


def console_sender(reviewer: str) -> str:
    """The sender a decision or proposal made in the review console for ``reviewer`` is
    published and recorded as (``console.<reviewer>``); reviewers follow the approver name
    rule."""
    if not re.fullmatch(APPROVER_NAME, reviewer):
        raise ValueError(
            f"{reviewer!r} is not a reviewer name: lowercase letters, digits, - and _, at most 32"
        )
    return f"{CONSOLE}.{reviewer}"


CONSOLE_SENDERS = f"{CONSOLE}.*"  # every reviewer of the console: one more subject token


def console_role() -> Role:
    """The review console's user, ``approver-console``: an approver that decides only as one of
    its reviewers (``change.approved.console.<reviewer>``, never as ``console`` itself), plus
    one right approvers lack: proposing, on ``change.proposed.console.<reviewer>``, so that a
    reviewer can ask for a rollback, which goes through the gate like any change."""
    approver = approver_role(CONSOLE)
    own = (ChangeApproved.subject_of(CONSOLE), ChangeRejected.subject_of(CONSOLE))
    return Role(
        publish=(
            ChangeApproved.subject_of(CONSOLE_SENDERS),
            ChangeRejected.subject_of(CONSOLE_SENDERS),
            ChangeProposed.subject_of(CONSOLE_SENDERS),
            *(subject for subject in approver.publish if subject not in own),
        ),
        subscribe=approver.subscribe,
        reads_prompts=approver.reads_prompts,
    )


def _from_anyone(kind: type[Attributed]) -> str:
    """The gatekeeper's filter for one kind of proposal or decision, whoever sent it."""
    return kind.subject_of("*")


# The runs every instrumented app reports, each on its own subject (the last token names it)
REPORTED_BY_ANY_APP = RunReported.subject_of("*")

ROLES: dict[str, Role] = {
    "executor": Role(
        publish=(RunCompleted.subject,),
        consumers=(
            ("executor", RunRequested.subject),
            ("executor-gate", GateRunRequested.subject),
        ),
        reads_prompts=True,
    ),
    "evaluator": Role(
        publish=(RunScored.subject,),
        consumers=(
            ("evaluator", RunCompleted.subject),
            ("evaluator-reported", REPORTED_BY_ANY_APP),
        ),
    ),
    "failure-store": Role(
        publish=(FailureLogged.subject,),
        subscribe=FAILURE_STORE_QUERIES,
        consumers=(
            ("failure-store-completed", RunCompleted.subject),
            ("failure-store-reported", REPORTED_BY_ANY_APP),
            ("failure-store-scored", RunScored.subject),
        ),
    ),
    PROPOSER: Role(  # asks the failure store; owns no shared table
        publish=(ChangeProposed.subject_of(PROPOSER), *FAILURE_QUERIES),
        subscribe=(PROPOSE_QUERY,),
        consumers=(("proposer", FailureLogged.subject),),
        reads_prompts=True,
    ),
    "gatekeeper": Role(
        publish=(
            GateRunRequested.subject,
            ChangeAwaitingApproval.subject,
            ChangeApplied.subject,
            ChangeKept.subject,
            ChangeRolledBack.subject,
            ChangeCanaryStarted.subject,
            ChangePromoted.subject,
            ChangeCanaryRolledBack.subject,
            ChangeRecorded.subject,
            f"$KV.{PROMPTS_BUCKET}.>",
            READ_AUDIT_ANCHOR,
            READ_EVENTS_BY_SEQ,
            *USE_LEASES,
        ),
        # the audit trail's owner answers every question about it
        subscribe=AUDIT_QUERIES,
        consumers=(
            ("gatekeeper-proposals", _from_anyone(ChangeProposed)),
            ("gatekeeper-scored", RunScored.subject),
            ("gatekeeper-approvals", _from_anyone(ChangeApproved)),
            ("gatekeeper-rejections", _from_anyone(ChangeRejected)),
            # the console's, one token longer (console.<reviewer>): durables of their own, so an
            # existing deployment's durables keep their filters and nothing is replayed
            ("gatekeeper-console-proposals", ChangeProposed.subject_of(CONSOLE_SENDERS)),
            ("gatekeeper-console-approvals", ChangeApproved.subject_of(CONSOLE_SENDERS)),
            ("gatekeeper-console-rejections", ChangeRejected.subject_of(CONSOLE_SENDERS)),
        ),
        reads_prompts=True,
    ),
    approver_user(POLICY_APPROVER): approver_role(POLICY_APPROVER, durable="policy-approver"),
    approver_user(CONSOLE): console_role(),
    CLIENT: Role(  # the CLI: runs, queries, a person's own proposals; deciding is an approver's
        publish=(
            RunRequested.subject,
            ChangeProposed.subject_of(CLIENT),
            *EVERY_QUERY,
            READ_AUDIT_ANCHOR,
        ),
        subscribe=(
            RunCompleted.subject,
            RunScored.subject,
            FailureLogged.subject,
            "change.>",
            f"{DLQ_PREFIX}.>",
        ),
        reads_prompts=True,
    ),
}


def users(approvers: Iterable[str] = (), apps: Iterable[str] = ()) -> dict[str, Role]:
    """Every NATS user but the admin: the services, the CLI, one user per approver and one per
    instrumented app."""
    table = dict(ROLES)
    for name in approvers:
        table.setdefault(approver_user(name), approver_role(name))
    for name in apps:
        table.setdefault(app_user(name), app_role(name))
    return table


def permissions(user: str, role: Role) -> dict[str, object]:
    """The server's allow-lists for one user; whatever they do not name is refused."""
    publish = [
        f"{JS_API}.INFO",
        f"{JS_API}.STREAM.INFO.*",
        f"{JS_API}.STREAM.NAMES",
        *role.publish,
    ]
    for durable, subject in role.consumers:
        publish += [
            f"{JS_API}.CONSUMER.CREATE.{EVENTS_STREAM}.{durable}.{subject}",
            f"{JS_API}.CONSUMER.INFO.{EVENTS_STREAM}.{durable}",
            f"{JS_API}.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{durable}",
            # ack, nak, in progress, term and +NXT, on this consumer's deliveries only
            f"$JS.ACK.{EVENTS_STREAM}.{durable}.>",
            dead_letter_subject(subject),
        ]
    subscribe = [f"{inbox_prefix(user)}.>", *role.subscribe]
    if role.reads_prompts:  # direct gets and message gets, and the server's notices of writes
        # No consumer on the bucket for a reader: the server cannot check what a consumer
        # request asks for (its delivery subject, how long it lives), so readers follow the
        # prompts without one (ratchet.prompts.PromptFollower). Nor the writes themselves
        # ($KV.prompts.>): they carry the gatekeeper's reply subject, which a reader that may
        # answer requests (allow_responses) could answer in the server's place.
        publish += [
            f"{JS_API}.DIRECT.GET.{KV_STREAM}.>",
            f"{JS_API}.STREAM.MSG.GET.{KV_STREAM}",
        ]
        subscribe.append(PROMPT_NOTICES)
    rules: dict[str, object] = {
        "publish": {"allow": publish},
        "subscribe": {"allow": subscribe},
    }
    if role.answers_queries:
        rules["allow_responses"] = True
    return rules


def generate_passwords(names: Iterable[str]) -> dict[str, str]:
    """A fresh random password for the admin and for each of ``names``."""
    return {name: secrets.token_urlsafe(18) for name in [ADMIN, *names]}


def password_hash(password: str) -> str:
    """What the server stores: a bcrypt hash, which nats-server checks a password against."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_COST)).decode()


def render_config(
    roles: Mapping[str, Role],
    passwords: Mapping[str, str],
    *,
    port: int,
    store_dir: Path,
    host: str = "127.0.0.1",
) -> str:
    """A nats-server config (JSON is valid nats-server config syntax) with the admin and one user
    per entry of ``roles``, each with its password's bcrypt hash (never the password)."""
    accounts: list[dict[str, object]] = [
        {"user": ADMIN, "password": password_hash(passwords[ADMIN])}
    ]
    for user, role in roles.items():
        accounts.append(
            {
                "user": user,
                "password": password_hash(passwords[user]),
                "permissions": permissions(user, role),
            }
        )
    config = {
        "host": host,
        "port": port,
        "jetstream": {"store_dir": str(store_dir)},
        "authorization": {"users": accounts},
    }
    return json.dumps(config, indent=2)


CLUSTER_NAME = "ratchet"
ROUTE_USER = "route"  # how the nodes of a cluster authenticate to each other
SERVER_NAME_FROM_ENV = "$SERVER_NAME"  # a deployment's node takes its name from the environment


def cluster_block(*, listen: str, routes: Iterable[str], secret: str) -> dict[str, object]:
    """The ``cluster`` section of a node's config: it listens for routes on ``listen`` and routes
    to every ``host:port`` of ``routes`` (a node recognises and skips a route to itself), each
    authenticated with ``secret``, which only the node configs hold."""
    return {
        "name": CLUSTER_NAME,
        "listen": listen,
        "authorization": {"user": ROUTE_USER, "password": secret},
        "routes": [f"nats-route://{ROUTE_USER}:{secret}@{route}" for route in routes],
    }


def render_node_config(text: str, *, cluster: dict[str, object]) -> str:
    """A deployment's one config for every node of a cluster (``render_config``'s ``text`` with
    ``cluster``): each node's ``server_name`` comes from its ``SERVER_NAME`` variable (a pod's
    name), which nats-server reads only from an unquoted reference."""
    config = {**json.loads(text), "server_name": SERVER_NAME_FROM_ENV, "cluster": cluster}
    rendered = json.dumps(config, indent=2)
    return rendered.replace(f'"{SERVER_NAME_FROM_ENV}"', SERVER_NAME_FROM_ENV)


def write_secret(path: Path, text: str) -> None:
    """Write a file only its owner can read: created 0600 (never readable in between, whatever
    the umask or an older file's mode), then moved into place."""
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.unlink(missing_ok=True)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(scratch, path)
