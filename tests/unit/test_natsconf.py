"""The generated nats-server config: least privilege per user, as the isolation invariants need.

These read the config the server would load; tests/integration/test_permissions.py checks that
the server enforces it, subject by subject.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from ratchet.contracts import (
    ChangeApproved,
    ChangeProposed,
    ChangeRejected,
    Event,
    RunReported,
)
from ratchet.jetstream import app_user
from ratchet.messaging import EVENTS_STREAM, PROMPTS_BUCKET, QUERY_PREFIX
from ratchet.natsconf import (
    ADMIN,
    CLIENT,
    CONSOLE,
    CONSOLE_SENDERS,
    EVERY_QUERY,
    POLICY_APPROVER,
    PROPOSER,
    ROLES,
    approver_name,
    approver_user,
    generate_passwords,
    render_config,
    users,
    write_secret,
)
from ratchet.services import SERVICES

PROMPT_WRITE = f"$KV.{PROMPTS_BUCKET}.>"
APPROVERS = ("alice", "bob")
INSTRUMENTED = ("app", "shop")  # instrumented apps, one NATS user each
APP_USERS = {f"app-{name}" for name in INSTRUMENTED}
TABLE = users(APPROVERS, INSTRUMENTED)


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    return generate_passwords(TABLE)


@pytest.fixture(scope="module")
def text(passwords: dict[str, str]) -> str:
    return render_config(TABLE, passwords, port=4333, store_dir=Path("/tmp/ratchet-js"))


@pytest.fixture(scope="module")
def config(text: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(text)  # JSON is valid nats-server config syntax
    return parsed


@pytest.fixture(scope="module")
def users_(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {user["user"]: user for user in config["authorization"]["users"]}


def publish_allow(users: dict[str, dict[str, Any]], user: str) -> list[str]:
    allow: list[str] = users[user]["permissions"]["publish"]["allow"]
    return allow


def subscribe_allow(users: dict[str, dict[str, Any]], user: str) -> list[str]:
    allow: list[str] = users[user]["permissions"]["subscribe"]["allow"]
    return allow


def publishers(users: dict[str, dict[str, Any]], subject: str) -> set[str]:
    return {user for user in TABLE if subject in publish_allow(users, user)}


def subscribers(users: dict[str, dict[str, Any]], subject: str) -> set[str]:
    return {user for user in TABLE if subject in subscribe_allow(users, user)}


def test_config_carries_listen_address_and_jetstream_dir(config: dict[str, Any]) -> None:
    assert config["port"] == 4333
    assert config["host"] == "127.0.0.1"
    assert config["jetstream"]["store_dir"] == "/tmp/ratchet-js"


def test_every_user_has_a_bcrypt_hash_of_its_password_and_no_password_is_in_the_config(
    users_: dict[str, dict[str, Any]], passwords: dict[str, str], text: str
) -> None:
    assert set(users_) == {ADMIN, *ROLES, "approver-alice", "approver-bob", *APP_USERS}
    for name, user in users_.items():
        stored = user["password"]
        assert stored.startswith("$2b$") and stored != passwords[name]
        assert bcrypt.checkpw(passwords[name].encode(), stored.encode()), name
    assert not any(password in text for password in passwords.values())


def test_only_the_evaluator_may_publish_scores(users_: dict[str, dict[str, Any]]) -> None:
    assert publishers(users_, "run.scored") == {"evaluator"}


def test_the_executor_may_not_publish_scores_or_write_prompts(
    users_: dict[str, dict[str, Any]],
) -> None:
    allow = publish_allow(users_, "executor")
    assert "run.scored" not in allow
    assert not any(subject.startswith("$KV.") for subject in allow)
    assert not any(subject in (">", "*", "run.>") for subject in allow)


def test_only_the_gatekeeper_may_write_the_prompt_store(
    users_: dict[str, dict[str, Any]],
) -> None:
    assert publishers(users_, PROMPT_WRITE) == {"gatekeeper"}
    for user in TABLE:
        if user != "gatekeeper":
            assert not any(s.startswith("$KV.") for s in publish_allow(users_, user)), user


def test_each_approver_may_publish_only_its_own_decisions(
    users_: dict[str, dict[str, Any]],
) -> None:
    for name in (POLICY_APPROVER, *APPROVERS):
        for kind in (ChangeApproved, ChangeRejected):
            assert publishers(users_, kind.subject_of(name)) == {approver_user(name)}
    for user in TABLE:
        decisions = [
            s
            for s in publish_allow(users_, user)
            if s.startswith(("change.approved", "change.rejected"))
        ]
        name = approver_name(user)
        if name == CONSOLE:  # the console decides only for its reviewers (console.<reviewer>)
            name = CONSOLE_SENDERS
        expected = [] if name is None else [f"change.approved.{name}", f"change.rejected.{name}"]
        assert decisions == expected, user


def test_each_proposing_user_may_publish_only_its_own_proposals(
    users_: dict[str, dict[str, Any]],
) -> None:
    """Issue 9: the client could publish a proposal naming the proposer service (or anyone) as
    its author. Each proposal's subject names its sender, and only that user may publish it;
    approvers decide and never propose."""
    for user in (PROPOSER, CLIENT):
        assert publishers(users_, ChangeProposed.subject_of(user)) == {user}
    for user in TABLE:
        proposals = [s for s in publish_allow(users_, user) if s.startswith("change.proposed")]
        expected = [ChangeProposed.subject_of(user)] if user in (PROPOSER, CLIENT) else []
        if user == approver_user(CONSOLE):  # a reviewer's rollback: the one thing it proposes
            expected = [ChangeProposed.subject_of(CONSOLE_SENDERS)]
        assert proposals == expected, user


def test_the_gatekeeper_hears_every_proposer_on_a_durable_of_its_own(
    users_: dict[str, dict[str, Any]],
) -> None:
    """A new filter needs a new durable: JetStream keeps an existing durable's filter, so the
    old ``gatekeeper-proposed`` on ``change.proposed`` would never see ``change.proposed.*``."""
    consumers = dict(TABLE["gatekeeper"].consumers)
    assert consumers["gatekeeper-proposals"] == "change.proposed.*"
    assert "gatekeeper-proposed" not in consumers
    allow = publish_allow(users_, "gatekeeper")
    assert "dlq.change.proposed.*" in allow  # a malformed proposal is dead-lettered with its reason


def test_no_user_has_a_wildcard_over_event_subjects(users_: dict[str, dict[str, Any]]) -> None:
    """But the console's one token for its reviewers, under its own name (console.*)."""
    for user in TABLE:
        for subject in publish_allow(users_, user):
            if subject.split(".")[0] in ("run", "failure", "change"):
                own_reviewers = user == approver_user(CONSOLE) and subject.endswith(
                    f".{CONSOLE_SENDERS}"
                )
                if not own_reviewers:
                    assert "*" not in subject and ">" not in subject, (user, subject)


def test_evaluator_may_create_only_its_durables_on_finished_runs(
    users_: dict[str, dict[str, Any]],
) -> None:
    creates = [s for s in publish_allow(users_, "evaluator") if ".CONSUMER.CREATE." in s]

    assert creates == [
        f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.evaluator.run.completed",
        f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.evaluator-reported.run.reported.*",
    ]


def test_consumers_acks_and_dead_letters_are_each_users_own(
    users_: dict[str, dict[str, Any]],
) -> None:
    """Create, pull, acknowledge (and +NXT, nak, in progress) and dead-letter: each only on the
    user's own durables and their own subjects."""
    for user, role in TABLE.items():
        allow = publish_allow(users_, user)
        own = {durable for durable, _ in role.consumers}
        for durable, subject in role.consumers:
            assert f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.{durable}.{subject}" in allow
            assert f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{durable}" in allow
        acks = {s for s in allow if s.startswith("$JS.ACK.")}
        assert acks == {f"$JS.ACK.{EVENTS_STREAM}.{durable}.>" for durable in own}, user
        letters = {s for s in allow if s.startswith("dlq.")}
        assert letters == {f"dlq.{subject}" for _, subject in role.consumers}, user
        creates = [s for s in allow if f".CONSUMER.CREATE.{EVENTS_STREAM}." in s]
        assert len(creates) == len(role.consumers), user


def test_the_cli_and_people_write_no_dead_letters(users_: dict[str, dict[str, Any]]) -> None:
    for user in ("client", "approver-alice", "approver-bob", *APP_USERS):
        assert not [s for s in publish_allow(users_, user) if s.startswith("dlq.")], user


def test_no_blanket_rights(users_: dict[str, dict[str, Any]]) -> None:
    """The side doors of issue 9: everyone's inbox, every consumer's acks, flow control of any
    stream, any dead letter, deleting consumers."""
    for user in TABLE:
        publish, subscribe = publish_allow(users_, user), subscribe_allow(users_, user)
        for blanket in ("$JS.ACK.>", "$JS.FC.>", "dlq.>", "_INBOX.>", "$JS.API.>", ">"):
            assert blanket not in publish, (user, blanket)
        assert "_INBOX.>" not in subscribe and ">" not in subscribe, user
        assert not any(".CONSUMER.DELETE." in s for s in publish), user


def test_each_user_hears_only_its_own_inbox(users_: dict[str, dict[str, Any]]) -> None:
    for user in TABLE:
        inboxes = [s for s in subscribe_allow(users_, user) if s.startswith("_INBOX")]
        assert inboxes == [f"_INBOX_{user}.>"], user


def test_stream_management_is_not_granted_to_any_user(users_: dict[str, dict[str, Any]]) -> None:
    for user in TABLE:
        for subject in publish_allow(users_, user):
            for verb in ("STREAM.CREATE", "STREAM.UPDATE", "STREAM.DELETE", "STREAM.PURGE"):
                assert verb not in subject, (user, subject)


def test_admin_has_full_access(users_: dict[str, dict[str, Any]]) -> None:
    assert "permissions" not in users_[ADMIN]


def test_generate_passwords_gives_distinct_random_passwords() -> None:
    first, second = generate_passwords(TABLE), generate_passwords(TABLE)

    assert set(first) == {ADMIN, *TABLE}
    assert len(set(first.values())) == len(first)
    assert all(len(p) >= 20 for p in first.values())
    assert all(first[name] != second[name] for name in first)


def test_each_table_is_asked_of_its_owner_only(users_: dict[str, dict[str, Any]]) -> None:
    """One owner per table: the failure store answers for failures, the gatekeeper for the
    audit trail; nobody else can take those questions."""
    for subject in ("query.failures", "query.groups", "query.count", "query.runs"):
        assert subscribers(users_, subject) == {"failure-store"}, subject
    for subject in ("query.changes", "query.change", "query.audit"):
        assert subscribers(users_, subject) == {"gatekeeper"}, subject
    assert subscribers(users_, "query.propose") == {"proposer"}


def test_only_users_that_answer_queries_may_reply(users_: dict[str, dict[str, Any]]) -> None:
    """Replying to whoever asked (``allow_responses``) is for the query owners only: any other
    user would be allowed to answer a publish ack it overheard."""
    answering = {user for user in TABLE if users_[user]["permissions"].get("allow_responses")}
    assert answering == {"failure-store", "proposer", "gatekeeper"}


def test_the_proposer_asks_the_failure_store_and_nothing_else(
    users_: dict[str, dict[str, Any]],
) -> None:
    queries = {s for s in publish_allow(users_, "proposer") if s.startswith("query.")}
    assert queries == {"query.failures", "query.groups", "query.count"}


def test_only_people_may_ask_for_a_changes_gate_runs(users_: dict[str, dict[str, Any]]) -> None:
    """``query.runs`` shows the gate's cases: people (the CLI, approvers, the console) may ask
    the failure store for it; the proposer, the services and the apps may not."""
    askers = {user for user in TABLE if "query.runs" in publish_allow(users_, user)}
    assert askers == {
        "client",
        approver_user(CONSOLE),
        approver_user(POLICY_APPROVER),
        *(approver_user(name) for name in APPROVERS),
    }


def test_people_and_approvers_may_read_the_audit_trail(
    users_: dict[str, dict[str, Any]],
) -> None:
    for user in ("client", "approver-alice", approver_user(POLICY_APPROVER)):
        assert set(EVERY_QUERY) <= set(publish_allow(users_, user)), user
        assert "change.>" in subscribe_allow(users_, user), user


def test_only_the_gatekeeper_announces_audit_records(users_: dict[str, dict[str, Any]]) -> None:
    assert publishers(users_, "change.recorded") == {"gatekeeper"}


@pytest.mark.parametrize("name", ["", "Alice", "a.b", "a*", "a>", "a b", "x" * 33])
def test_an_approver_name_must_be_one_plain_subject_token(name: str) -> None:
    with pytest.raises(ValueError, match="not an approver name"):
        users([name])


# --- instrumented apps (issue 10) ----------------------------------------------------------------


def test_an_app_may_read_prompts_and_publish_its_own_runs_and_nothing_else(
    users_: dict[str, dict[str, Any]],
) -> None:
    """What the SDK in a user's service needs: the prompts (gets, and the writes passing by) and
    its own ``run.reported.<app>``. No score, decision, proposal, prompt write, run request,
    query, dead letter or consumer on the prompts; no core subscription but its inbox and the
    prompts' writes."""
    for name in INSTRUMENTED:
        user = app_user(name)
        role = TABLE[user]
        assert role.publish == (RunReported.subject_of(name),)
        assert role.reads_prompts and not role.consumers and not role.subscribe
        allow = publish_allow(users_, user)
        events = [s for s in allow if s.split(".")[0] in ("run", "failure", "change", "dlq")]
        assert events == [f"run.reported.{name}"], user
        assert not [s for s in allow if s.startswith((f"{QUERY_PREFIX}.", "$KV."))], user
        assert not [s for s in allow if ".CONSUMER." in s], user
        assert subscribe_allow(users_, user) == [f"_INBOX_{user}.>", "prompts.written.>"]
        assert "allow_responses" not in users_[user]["permissions"]


def test_each_apps_reports_are_published_by_that_app_only(
    users_: dict[str, dict[str, Any]],
) -> None:
    """The origin the evaluator and the failure store record is the subject's last token, so no
    app, and no service, may report as another app."""
    for name in INSTRUMENTED:
        assert publishers(users_, RunReported.subject_of(name)) == {app_user(name)}
    assert publishers(users_, RunReported.subject) == set()
    for user in TABLE:
        reports = [s for s in publish_allow(users_, user) if s.startswith(RunReported.subject)]
        assert len(reports) == (user in APP_USERS), user


def test_reported_runs_are_consumed_by_the_evaluator_and_the_failure_store() -> None:
    """On durables of their own (JetStream keeps an existing durable's filter); a malformed
    report is dead-lettered on ``dlq.run.reported.<app>``, which ``dlq.run.reported.*`` allows."""
    readers = {
        (user, durable)
        for user, role in TABLE.items()
        for durable, subject in role.consumers
        if subject == "run.reported.*"
    }
    assert readers == {
        ("evaluator", "evaluator-reported"),
        ("failure-store", "failure-store-reported"),
    }


@pytest.mark.parametrize("name", ["", "App", "a.b", "a*", "a>", "a b", "-a", "x" * 33])
def test_an_app_name_must_be_one_plain_subject_token(name: str) -> None:
    with pytest.raises(ValueError, match="not an app name"):
        users(apps=[name])


def test_secrets_are_written_owner_only_even_over_a_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "nats-server.conf"
    path.write_text("old")
    path.chmod(0o644)

    write_secret(path, "new")

    assert path.read_text() == "new"
    assert path.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["nats-server.conf"]


# --- every subject has an owner in the table --------------------------------------------------


def _event_types(base: type[Event] = Event) -> Iterator[type[Event]]:
    for cls in base.__subclasses__():
        yield cls
        yield from _event_types(cls)


def _apps() -> Iterator[tuple[str, Any]]:
    """(NATS user, broker) of every declared service, built as it is deployed."""
    for service in SERVICES:
        module, _, factory = service.factory.partition(":")
        yield service.role, getattr(importlib.import_module(module), factory)().broker


APPS = list(_apps())


def test_every_event_subject_has_a_publisher_in_the_table() -> None:
    """A new event cannot be added without deciding who may publish it (proposals and
    decisions: each sender, on its own subject)."""
    for event_type in _event_types():
        subject = getattr(event_type, "subject", None)
        if subject is None:  # a base class (a decision, an outcome)
            continue
        named = {
            user
            for user, role in TABLE.items()
            for allowed in role.publish
            if allowed == subject
            # proposals, decisions and reported runs: each sender on its own subject
            or (hasattr(event_type, "subject_of") and allowed.startswith(f"{subject}."))
        }
        assert named, f"{event_type.__name__} ({subject}): no user may publish it"


def test_every_subject_an_app_uses_is_in_its_users_table() -> None:
    """What each service subscribes to, consumes and publishes, read from the app itself."""
    for user, broker in APPS:
        role = TABLE[user]
        for subscriber in broker.subscribers:
            subject = subscriber.subject.broker_address
            if getattr(subscriber, "stream", None) is None:
                assert subject in role.subscribe, (user, subject)
            else:
                assert (subscriber.config.durable_name, subject) in role.consumers, (user, subject)
        for publisher in broker.publishers:
            assert publisher.subject.broker_address in role.publish, (user, publisher.subject)


def test_every_query_an_app_serves_is_named_and_people_may_ask_it() -> None:
    served = {
        subscriber.subject.broker_address
        for _, broker in APPS
        for subscriber in broker.subscribers
        if getattr(subscriber, "stream", None) is None
    }
    assert served and all(subject.startswith(f"{QUERY_PREFIX}.") for subject in served)
    assert served == set(EVERY_QUERY)
    assert served <= set(ROLES["client"].publish)
