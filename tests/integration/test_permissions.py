"""The NATS server itself enforces who may do what (invariants 1 and 2, issue 9's side doors).

The permission matrix walks every user of the table that generates the config against every
subject family and compares the server's answers with what the table says; the other tests
replay issue 9's attacks, each as the role that tried it, on a real server.
"""

from __future__ import annotations

import asyncio
import json
import re
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import KeyWrongLastSequenceError

from ratchet.contracts import (
    Attributed,
    ChangeApproved,
    ChangeProposed,
    ChangeRejected,
    Event,
    GateRunRequested,
    RunReported,
    RunScored,
)
from ratchet.jetstream import PROMPT_NOTICE_PREFIX, app_user
from ratchet.messaging import EVENTS_STREAM, LEASE_BUCKET, PROMPTS_BUCKET, connect
from ratchet.natsconf import (
    CONSOLE,
    EVERY_QUERY,
    KV_STREAM,
    LEASE_STREAM,
    POLICY_APPROVER,
    Role,
    approver_user,
    console_sender,
    users,
)
from ratchet.natsproc import LocalNats, free_port, start_nats
from ratchet.prompts import PromptReader

T = TypeVar("T")
POLICY = approver_user(POLICY_APPROVER)
OPERATOR = approver_user("operator")


async def _round_trip(nc: Client) -> None:
    """Return once the server has handled everything this connection sent before, so every
    refusal of it has arrived: a request queued behind it is answered after them (nats-py's
    ``flush()`` writes its PING ahead of messages still queued, so it cannot tell)."""
    await nc.request("$JS.API.INFO", b"", timeout=10)


async def _as(
    server: LocalNats, role: str, act: Callable[[Client], Awaitable[T]], timeout: float = 10
) -> tuple[T | None, list[str]]:
    """Do ``act`` as ``role``: its result (None if the server refused it first) and the errors the
    server reported. A refused publish is never answered, so this waits for whichever comes
    first, the answer or the refusal, then for a round trip: the server handles a connection's
    messages in order, so any refusal of what ``act`` sent has arrived by then."""
    errors: list[str] = []
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))
        if "permissions violation" in str(exc).lower():
            refused.set()

    nc = await connect(server.settings_for(role), name=f"test-{role}", on_error=on_error)
    acting = asyncio.ensure_future(act(nc))
    refusal = asyncio.ensure_future(refused.wait())
    try:
        either: list[asyncio.Future[Any]] = [acting, refusal]
        done, _ = await asyncio.wait(either, timeout=timeout, return_when=FIRST_COMPLETED)
        assert done, f"{role}: neither an answer nor a refusal in {timeout}s"
        result = acting.result() if acting in done else None
        await _round_trip(nc)
    finally:
        acting.cancel()
        refusal.cancel()
        await nc.close()
    return result, errors


async def _publish_as(server: LocalNats, role: str, subject: str) -> list[str]:
    """Publish through JetStream as ``role``; returns the errors (violations) the server sent."""
    _, errors = await _as(
        server, role, lambda nc: nc.jetstream().publish(subject, b"{}", timeout=5)
    )
    return errors


def _refused(errors: list[str], subject: str) -> bool:
    return any(f'permissions violation for publish to "{subject.lower()}"' in e for e in errors)


async def _api_as(server: LocalNats, role: str, subject: str, body: dict[str, object]) -> bool:
    """Ask the JetStream API as ``role``: True if it did it, False if the server refused."""
    reply, errors = await _as(
        server, role, lambda nc: nc.request(subject, json.dumps(body).encode(), timeout=5)
    )
    refused = any("permissions violation" in e.lower() for e in errors)
    assert refused == (reply is None), errors
    if reply is not None and reply.data:  # a pull with nothing to deliver answers with headers
        assert "error" not in json.loads(reply.data), reply.data
    return reply is not None


def _create_consumer(durable: str, subject: str) -> tuple[str, dict[str, object]]:
    """The request a service sends to create (or bind to) its durable pull consumer."""
    config = {"name": durable, "durable_name": durable, "filter_subject": subject}
    return (
        f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.{durable}.{subject}",
        {"stream_name": EVENTS_STREAM, "config": {**config, "ack_policy": "explicit"}},
    )


GATEKEEPER_DURABLES = [
    ("gatekeeper-proposals", "change.proposed.*"),
    ("gatekeeper-scored", "run.scored"),
    ("gatekeeper-approvals", "change.approved.*"),
    ("gatekeeper-rejections", "change.rejected.*"),
    ("gatekeeper-console-proposals", "change.proposed.console.*"),
    ("gatekeeper-console-approvals", "change.approved.console.*"),
    ("gatekeeper-console-rejections", "change.rejected.console.*"),
]


# --- the permission matrix --------------------------------------------------------------------


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` the rest."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or token not in ("*", tokens[i]):
            return False
    return len(wanted) == len(tokens)


def _any(patterns: Iterator[str] | tuple[str, ...], subject: str) -> bool:
    return any(_matches(pattern, subject) for pattern in patterns)


@dataclass(frozen=True)
class Act:
    """One thing a user might try, and whether the table says it may: a publish or a core
    subscription to one subject."""

    verb: Literal["publish", "subscription"]
    subject: str
    allowed: Callable[[str, Role], bool]


def _event_subjects(senders: list[str]) -> list[str]:
    """Every event subject of ratchet.contracts; proposals, decisions and reported runs once per
    user, approver and app name (``senders``), once for a name nobody has, and bare."""

    def walk(base: type[Event]) -> Iterator[type[Event]]:
        for cls in base.__subclasses__():
            yield cls
            yield from walk(cls)

    subjects = []
    for event_type in walk(Event):
        subject = getattr(event_type, "subject", None)
        if subject is None:
            continue
        if issubclass(event_type, (Attributed, RunReported)):
            subjects += [event_type.subject_of(name) for name in [*senders, "mallory"]]
        subjects.append(subject)
    return sorted(set(subjects))


def _matrix(table: dict[str, Role]) -> list[Act]:
    """Every subject family against what the table grants, stated from the table's meaning
    (a user publishes what it names, acknowledges and dead-letters its own consumers, reads the
    prompts if it is a reader, hears its own inbox), not from the generated allow-lists."""
    approvers = [user.removeprefix("approver-") for user in table if user.startswith("approver-")]
    apps = [user.removeprefix("app-") for user in table if user.startswith("app-")]
    # the console's reviewers, one token further: a reviewer, and a name with a token too many
    reviewers = [console_sender("alice"), f"{console_sender('alice')}.extra"]
    events = _event_subjects([*table, *approvers, *apps, *reviewers])
    durables = sorted({consumer for role in table.values() for consumer in role.consumers})

    def own(durable: str) -> Callable[[str, Role], bool]:
        return lambda _user, role: durable in {d for d, _ in role.consumers}

    def names(subject: str) -> Callable[[str, Role], bool]:
        return lambda _user, role: _any(role.publish, subject)

    def hears(subject: str) -> Callable[[str, Role], bool]:
        return lambda _user, role: _any(role.subscribe, subject)

    def reader(_user: str, role: Role) -> bool:
        return role.reads_prompts

    def nobody(_user: str, _role: Role) -> bool:
        return False

    def gatekeeper(user: str, _role: Role) -> bool:
        return user == "gatekeeper"

    acts = []
    for subject in [*events, *EVERY_QUERY]:
        acts += [
            Act("publish", subject, names(subject)),
            Act("subscription", subject, hears(subject)),
        ]
    # the writes themselves carry the gatekeeper's reply subject: nobody hears them; readers
    # follow the server's headers-only notices of stored writes, which nobody may publish
    prompt_key = f"$KV.{PROMPTS_BUCKET}.answer-only"
    notice = f"{PROMPT_NOTICE_PREFIX}answer-only"
    acts += [
        Act("publish", prompt_key, names(prompt_key)),
        Act("subscription", prompt_key, nobody),
        Act("publish", notice, nobody),
        Act("subscription", notice, reader),
    ]
    for subject in events:
        letter = f"dlq.{subject}"

        def writes_letter(_user: str, role: Role, subject: str = subject) -> bool:
            return _any((f for _, f in role.consumers), subject)

        acts += [Act("publish", letter, writes_letter), Act("subscription", letter, hears(letter))]
    api = f"$JS.API.CONSUMER.{{}}.{EVENTS_STREAM}"
    for durable, subject in durables:

        def creates(_user: str, role: Role, consumer: tuple[str, str] = (durable, subject)) -> bool:
            return consumer in role.consumers

        acts += [
            Act("publish", f"{api.format('CREATE')}.{durable}.{subject}", creates),
            Act("publish", f"{api.format('INFO')}.{durable}", own(durable)),
            Act("publish", f"{api.format('MSG.NEXT')}.{durable}", own(durable)),
            Act("publish", f"{api.format('DELETE')}.{durable}", nobody),
            Act("publish", f"$JS.ACK.{EVENTS_STREAM}.{durable}.1.7.7.1700000000.0", own(durable)),
        ]
    acts += [
        # readers follow the prompts with gets and the writes passing by, never a consumer
        Act("publish", f"$JS.API.CONSUMER.CREATE.{KV_STREAM}", nobody),
        Act("publish", f"$JS.API.CONSUMER.CREATE.{KV_STREAM}.w.$KV.{PROMPTS_BUCKET}.>", nobody),
        Act("publish", f"$JS.API.CONSUMER.DELETE.{KV_STREAM}.watch", nobody),
        Act("publish", f"$JS.API.DIRECT.GET.{KV_STREAM}.$KV.{PROMPTS_BUCKET}.answer-only", reader),
        Act("publish", f"$JS.API.STREAM.MSG.GET.{KV_STREAM}", reader),
        Act("publish", f"$JS.FC.{KV_STREAM}.watch.1", nobody),
        Act("publish", f"$JS.FC.{EVENTS_STREAM}.evaluator.1", nobody),
        Act("publish", f"$JS.API.STREAM.DELETE.{EVENTS_STREAM}", nobody),
        Act("publish", f"$JS.API.STREAM.PURGE.{EVENTS_STREAM}", nobody),
        Act("publish", f"$JS.API.DIRECT.GET.{EVENTS_STREAM}.run.scored", nobody),
        Act("subscription", "_INBOX.anything", nobody),
        # the gatekeepers' leases: taken, renewed, released and read back by gatekeepers only
        Act("publish", f"$KV.{LEASE_BUCKET}.c0", gatekeeper),
        Act("publish", f"$JS.API.DIRECT.GET.{LEASE_STREAM}.$KV.{LEASE_BUCKET}.c0", gatekeeper),
        Act("subscription", f"$KV.{LEASE_BUCKET}.c0", nobody),
    ]
    for user in table:
        inbox = f"_INBOX_{user}.reply"
        acts.append(Act("subscription", inbox, lambda me, _role, owner=user: me == owner))
    return acts


APPS = ["shop"]  # an instrumented app


@pytest.fixture
def server_with_a_person(tmp_path: Path) -> Iterator[LocalNats]:
    """Ratchet's server with its services' users, the policy approver, a person approver and
    an instrumented app."""
    server = start_nats(
        tmp_path / "home",
        free_port(),
        log_path=tmp_path / "nats.log",
        approvers=["operator"],
        apps=APPS,
    )
    yield server
    server.stop()


async def _answers(server: LocalNats, user: str, acts: list[Act]) -> dict[str, bool]:
    """What the server allows ``user`` of ``acts``: everything in one go on one connection,
    then one round trip, after which every refusal has arrived (in order)."""
    refused: set[str] = set()
    said = re.compile(r'permissions violation for (publish|subscription) to "(.*)"')

    async def on_error(exc: Exception) -> None:
        if found := said.search(str(exc)):
            refused.add(f"{found.group(1)} {found.group(2)}")

    nc = await connect(server.settings_for(user), name=f"matrix-{user}", on_error=on_error)
    try:
        for act in acts:
            if act.verb == "publish":
                await nc.publish(act.subject, b"")
            else:
                await nc.subscribe(act.subject)
        await _round_trip(nc)
    finally:
        await nc.close()
    return {f"{a.verb} {a.subject}": f"{a.verb} {a.subject}".lower() not in refused for a in acts}


async def test_the_server_answers_every_user_as_the_table_says(
    server_with_a_person: LocalNats,
) -> None:
    """The role-by-subject matrix: each event subject (proposals and decisions per sender),
    each query, dead letters, the prompt bucket, the JetStream API and acknowledgements of every
    durable, flow control, and every user's inbox, for every user."""
    table = users(["operator"], APPS)
    acts = _matrix(table)
    assert len({f"{a.verb} {a.subject}".lower() for a in acts}) == len(acts)
    mismatches = []
    for user, role in table.items():
        answers = await _answers(server_with_a_person, user, acts)
        for act in acts:
            expected, got = act.allowed(user, role), answers[f"{act.verb} {act.subject}"]
            if expected != got:
                mismatches.append(
                    f"{user} {act.verb} {act.subject}: table {expected}, server {got}"
                )
    assert not mismatches, "\n".join(mismatches)
    # the table is not trivially all-or-nothing: every user is refused something, allowed something
    for user, role in table.items():
        allowed = [act.allowed(user, role) for act in acts]
        assert any(allowed) and not all(allowed), user


# --- issue 9's attacks, replayed --------------------------------------------------------------


async def _steal_with_next(server: LocalNats, thief: str, durable: str) -> int:
    """``thief`` asks ``durable`` for its next 20 messages by publishing "+NXT" to one of its ack
    subjects, with its own inbox as the reply; returns how many it received."""
    received: list[Msg] = []
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            refused.set()

    async def take(msg: Msg) -> None:
        received.append(msg)

    nc = await connect(server.settings_for(thief), name="thief", on_error=on_error)
    try:
        inbox = f"_INBOX_{thief}.loot"
        await nc.subscribe(inbox, cb=take)
        ack = f"$JS.ACK.{EVENTS_STREAM}.{durable}.1.1.1.1700000000.0"
        await nc.publish(ack, b'+NXT {"batch": 20}', reply=inbox)
        await asyncio.wait_for(refused.wait(), timeout=5)
        await _round_trip(nc)
    finally:
        await nc.close()
    return len(received)


async def _consumer_with_runs(server: LocalNats, owner: str, durable: str, subject: str) -> None:
    """``owner`` creates its durable, as its service does at start, and 20 messages wait on it."""
    assert await _api_as(server, owner, *_create_consumer(durable, subject))
    admin = await connect(server.settings_for("admin"), name="producer")
    try:
        for i in range(20):
            await admin.jetstream().publish(subject, json.dumps({"n": i}).encode())
    finally:
        await admin.close()


async def _waiting(server: LocalNats, durable: str) -> tuple[int, int]:
    """(messages still pending, messages delivered and not yet acknowledged) on ``durable``."""
    admin = await connect(server.settings_for("admin"), name="inspector")
    try:
        info = await admin.jetstream().consumer_info(EVENTS_STREAM, durable)
    finally:
        await admin.close()
    return info.num_pending or 0, info.num_ack_pending or 0


async def test_a_client_cannot_take_the_evaluators_runs_with_next(nats_server: LocalNats) -> None:
    """Issue 9: a client sent "+NXT" to the evaluator's consumer and took 136 of 200 runs."""
    await _consumer_with_runs(nats_server, "evaluator", "evaluator", "run.completed")

    assert await _steal_with_next(nats_server, "client", "evaluator") == 0
    assert await _waiting(nats_server, "evaluator") == (20, 0)


async def test_the_evaluator_cannot_take_the_executors_runs(nats_server: LocalNats) -> None:
    """Issue 9: the evaluator took 173 of 200 of the executor's run requests."""
    await _consumer_with_runs(nats_server, "executor", "executor", "run.requested")

    assert await _steal_with_next(nats_server, "evaluator", "executor") == 0
    assert await _waiting(nats_server, "executor") == (20, 0)


async def test_dead_letters_are_written_by_services_for_their_own_subjects_only(
    nats_server: LocalNats,
) -> None:
    for role in ("client", POLICY):  # a person's tools and the approvers write none
        assert _refused(await _publish_as(nats_server, role, "dlq.x"), "dlq.x")
        assert _refused(
            await _publish_as(nats_server, role, "dlq.run.completed"), "dlq.run.completed"
        )
    # the evaluator dead-letters what it consumes, and nothing else
    assert await _publish_as(nats_server, "evaluator", "dlq.run.completed") == []
    assert _refused(await _publish_as(nats_server, "evaluator", "dlq.run.scored"), "dlq.run.scored")


async def test_no_reader_can_make_consumers_on_the_prompt_bucket(
    server_with_a_person: LocalNats,
) -> None:
    """Found in review: any prompt reader (an app too) could create consumers on the bucket with
    whatever settings it chose: 254 long-lived ones filled the bucket's limit, so no executor
    could start its watch, and one with ``deliver_subject: run.scored`` had the server publish
    prompt records where the reader may not. Readers now follow the bucket without a consumer
    (direct gets, and the writes passing by in core NATS), and may create none."""
    server = server_with_a_person
    push = {
        "stream_name": KV_STREAM,
        "config": {"deliver_subject": "run.scored", "ack_policy": "none", "inactive_threshold": 0},
    }
    named = f"$JS.API.CONSUMER.CREATE.{KV_STREAM}.spy.$KV.{PROMPTS_BUCKET}.>"
    for role in ("client", "proposer", "executor", "gatekeeper", POLICY, app_user(APPS[0])):
        assert not await _api_as(server, role, f"$JS.API.CONSUMER.CREATE.{KV_STREAM}", push)
        assert not await _api_as(server, role, named, push), role
    admin = await connect(server.settings_for("admin"), name="admin")
    executor = await connect(server.settings_for("executor"), name="executor")
    gatekeeper = await connect(server.settings_for("gatekeeper"), name="gatekeeper")
    reader = PromptReader(executor)
    try:
        kv = await gatekeeper.jetstream().key_value(PROMPTS_BUCKET)
        first = await kv.put("answer-only", json.dumps({"text": "Answer."}).encode())
        await reader.start()  # the snapshot: a direct get per task
        assert reader.current("answer-only").version == first  # type: ignore[union-attr]
        second = await kv.update(
            "answer-only", json.dumps({"text": "Answer in one word."}).encode(), last=first
        )
        await reader.wait_for_version("answer-only", second)
        assert reader.current("answer-only").record.text == "Answer in one word."  # type: ignore[union-attr]
        # a write the stream refuses (a stale compare-and-set) passes by too, and changes nothing
        with pytest.raises(KeyWrongLastSequenceError):
            await kv.update("answer-only", json.dumps({"text": "Stale."}).encode(), last=first)
        await reader.wait_for_version("answer-only", second)
        assert reader.current("answer-only").record.text == "Answer in one word."  # type: ignore[union-attr]
        assert await admin.jetstream().consumers_info(KV_STREAM) == []
    finally:
        await reader.stop()
        for nc in (executor, gatekeeper, admin):
            await nc.close()


async def test_no_user_hears_another_users_inbox(nats_server: LocalNats) -> None:
    """Issue 9: every role could subscribe to ``_INBOX.>`` and see every consumer's deliveries
    and every query's reply."""
    for spy, victim in [("client", "evaluator"), ("evaluator", "executor"), ("proposer", "client")]:
        for inbox in (f"_INBOX_{victim}.>", "_INBOX.>"):
            _, errors = await _as(nats_server, spy, lambda nc, s=inbox: nc.subscribe(s))
            refusal = f'permissions violation for subscription to "{inbox.lower()}"'
            assert any(refusal in e for e in errors), (spy, inbox, errors)


def test_the_config_and_credentials_are_owner_only_and_the_config_holds_no_password(
    nats_server: LocalNats, tmp_path: Path
) -> None:
    """Issue 9: nats-server.conf held every password, the admin's too, in plain text, 0644."""
    folder = tmp_path / "home" / "nats"
    config, credentials = folder / "nats-server.conf", folder / "credentials.json"
    assert config.stat().st_mode & 0o777 == 0o600
    assert credentials.stat().st_mode & 0o777 == 0o600
    text = config.read_text()
    assert not any(password in text for password in nats_server.passwords.values())
    hashes = [user["password"] for user in json.loads(text)["authorization"]["users"]]
    assert len(hashes) == len(nats_server.passwords) and all(h.startswith("$2b$") for h in hashes)
    assert json.loads(credentials.read_text()) == nats_server.passwords


async def test_every_user_connects_with_the_password_only_credentials_json_holds(
    nats_server: LocalNats,
) -> None:
    for user in nats_server.passwords:
        nc = await connect(nats_server.settings_for(user), name=f"login-{user}", reconnect=False)
        await nc.close()


# --- the isolation invariants, one by one ------------------------------------------------------


@pytest.mark.parametrize("role", ["executor", "failure-store", "proposer", "gatekeeper", "client"])
async def test_only_the_evaluator_may_publish_scores(nats_server: LocalNats, role: str) -> None:
    violations = await _publish_as(nats_server, role, RunScored.subject)
    assert _refused(violations, RunScored.subject)


async def test_evaluator_publishes_scores(nats_server: LocalNats) -> None:
    assert await _publish_as(nats_server, "evaluator", RunScored.subject) == []


@pytest.mark.parametrize(
    "role", ["client", "executor", "evaluator", "failure-store", "proposer", POLICY]
)
async def test_only_the_gatekeeper_may_request_gate_runs(nats_server: LocalNats, role: str) -> None:
    violations = await _publish_as(nats_server, role, GateRunRequested.subject)
    assert _refused(violations, GateRunRequested.subject)


async def test_gatekeeper_requests_gate_runs(nats_server: LocalNats) -> None:
    assert await _publish_as(nats_server, "gatekeeper", GateRunRequested.subject) == []


@pytest.mark.parametrize(("durable", "subject"), GATEKEEPER_DURABLES)
async def test_the_executor_may_not_consume_as_the_gatekeeper(
    nats_server: LocalNats, durable: str, subject: str
) -> None:
    # the gatekeeper's own consumer exists (the gatekeeper may create it) ...
    assert await _api_as(nats_server, "gatekeeper", *_create_consumer(durable, subject))
    # ... and the executor may neither bind to it nor pull from it
    assert not await _api_as(nats_server, "executor", *_create_consumer(durable, subject))
    pull = f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{durable}"
    assert not await _api_as(nats_server, "executor", pull, {"batch": 1, "expires": 10**8})
    # nor point one of its own durable names at the gatekeeper's subject
    assert not await _api_as(nats_server, "executor", *_create_consumer("executor-gate", subject))


async def test_the_executor_consumes_gate_runs(nats_server: LocalNats) -> None:
    create = _create_consumer("executor-gate", GateRunRequested.subject)
    assert await _api_as(nats_server, "executor", *create)


@pytest.mark.parametrize("role", ["executor", "evaluator", "failure-store", "proposer", POLICY])
async def test_only_the_gatekeeper_may_write_prompts(nats_server: LocalNats, role: str) -> None:
    subject = f"$KV.{PROMPTS_BUCKET}.answer-only"
    assert _refused(await _publish_as(nats_server, role, subject), subject)


async def test_gatekeeper_writes_prompts(nats_server: LocalNats) -> None:
    assert await _publish_as(nats_server, "gatekeeper", f"$KV.{PROMPTS_BUCKET}.answer-only") == []


@pytest.mark.parametrize("role", ["executor", "evaluator", "proposer", "gatekeeper", "client"])
async def test_only_approvers_may_decide(nats_server: LocalNats, role: str) -> None:
    for kind in (ChangeApproved, ChangeRejected):
        subject = kind.subject_of(POLICY_APPROVER)
        assert _refused(await _publish_as(nats_server, role, subject), subject)


async def test_an_approver_decides_under_its_own_name_only(
    server_with_a_person: LocalNats,
) -> None:
    """Issue 9: any holder of the approver role could sign a decision with someone else's name."""
    for kind in (ChangeApproved, ChangeRejected):
        own, other = kind.subject_of("operator"), kind.subject_of(POLICY_APPROVER)
        assert await _publish_as(server_with_a_person, OPERATOR, own) == []
        assert _refused(await _publish_as(server_with_a_person, OPERATOR, other), other)
        assert _refused(await _publish_as(server_with_a_person, POLICY, own), own)
        assert _refused(
            await _publish_as(server_with_a_person, OPERATOR, kind.subject), kind.subject
        )


async def test_a_proposal_is_published_by_the_user_its_subject_names_only(
    server_with_a_person: LocalNats,
) -> None:
    """Issue 9, item 7: the client role could publish a proposal claiming to be the proposer
    service, or anyone. Now each proposal's subject names its sender and the server lets only
    that user publish it; approvers decide and never propose."""
    server = server_with_a_person
    proposer, client = ChangeProposed.subject_of("proposer"), ChangeProposed.subject_of("client")
    assert await _publish_as(server, "client", client) == []
    assert await _publish_as(server, "proposer", proposer) == []
    assert _refused(await _publish_as(server, "client", proposer), proposer)
    assert _refused(await _publish_as(server, "proposer", client), client)
    for user in (OPERATOR, POLICY, "gatekeeper", "executor"):
        for subject in (client, proposer, ChangeProposed.subject_of(user)):
            assert _refused(await _publish_as(server, user, subject), subject), (user, subject)
    for user in ("client", "proposer"):  # the bare subject, as before, names nobody
        bare = ChangeProposed.subject
        assert _refused(await _publish_as(server, user, bare), bare), user


async def test_the_console_decides_and_proposes_only_for_a_reviewer(
    server_with_a_person: LocalNats,
) -> None:
    """The review console's user decides and proposes one token further than an approver, as
    ``console.<reviewer>``, and never as itself or anyone else; nobody else may use its
    subjects."""
    server = server_with_a_person
    console = approver_user(CONSOLE)
    for kind in (ChangeApproved, ChangeRejected, ChangeProposed):
        reviewers = kind.subject_of(console_sender("alice"))
        assert await _publish_as(server, console, reviewers) == [], kind
        for other in (
            kind.subject_of(CONSOLE),  # the console in its own name
            kind.subject_of("operator"),
            kind.subject_of("client"),
            f"{reviewers}.extra",
            kind.subject,
        ):
            assert _refused(await _publish_as(server, console, other), other), other
        for user in (OPERATOR, POLICY, "client", "proposer", "gatekeeper"):
            assert _refused(await _publish_as(server, user, reviewers), reviewers), user


async def test_wrong_password_is_refused(nats_server: LocalNats) -> None:
    settings = nats_server.settings_for("executor").model_copy(update={"nats_password": "wrong"})
    with pytest.raises(Exception, match=r"[Aa]uthorization"):
        await connect(settings, name="intruder", reconnect=False)


async def test_only_the_gatekeeper_may_answer_audit_queries(nats_server: LocalNats) -> None:
    """The audit trail has one owner: a client's ``query.audit`` reaches the gatekeeper, and the
    server refuses every other role that tries to take the question."""

    async def refusal_to(role: str) -> list[str]:
        """The violations the server sends ``role`` for subscribing to ``query.audit``."""
        violations: list[str] = []
        refused = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            violations.append(str(exc))
            refused.set()

        nc = await connect(nats_server.settings_for(role), name=role, on_error=on_error)
        try:
            await nc.subscribe("query.audit")
            await asyncio.wait_for(refused.wait(), timeout=2)
        finally:
            await nc.close()
        return violations

    gatekeeper = await connect(nats_server.settings_for("gatekeeper"), name="gatekeeper")
    client = await connect(nats_server.settings_for("client"), name="client")
    try:

        async def answer(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(b"from the gatekeeper")

        await gatekeeper.subscribe("query.audit", cb=answer)
        await _round_trip(gatekeeper)
        reply = await client.request("query.audit", b"{}", timeout=2)
        assert reply.data == b"from the gatekeeper"
    finally:
        await client.close()
        await gatekeeper.close()
    for role in ("executor", "evaluator", "failure-store", "proposer", POLICY, "client"):
        violations = await refusal_to(role)
        assert any("permissions violation" in v.lower() for v in violations), (role, violations)


async def test_people_may_ask_for_a_changes_gate_runs_and_the_proposer_may_not(
    nats_server: LocalNats,
) -> None:
    """``query.runs`` shows the gate's cases: the failure store answers it for the CLI and the
    console; the server refuses the proposer's request before it reaches anyone."""
    store = await connect(nats_server.settings_for("failure-store"), name="failure-store")
    asked: list[str] = []
    try:

        async def answer(msg: nats.aio.msg.Msg) -> None:
            asked.append(msg.data.decode())
            await msg.respond(b"[]")

        await store.subscribe("query.runs", cb=answer)
        await _round_trip(store)
        for role in ("client", approver_user(CONSOLE)):
            reply, errors = await _as(
                nats_server, role, lambda nc, who=role: nc.request("query.runs", who.encode(), 5)
            )
            assert reply is not None and reply.data == b"[]" and errors == [], role
        reply, errors = await _as(
            nats_server, "proposer", lambda nc: nc.request("query.runs", b"proposer", 5)
        )
        assert reply is None and _refused(errors, "query.runs"), errors
    finally:
        await store.close()
    assert asked == ["client", approver_user(CONSOLE)]
