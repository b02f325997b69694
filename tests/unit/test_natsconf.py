"""The generated nats-server config: least privilege per role, as the isolation invariants need.

These read the config the server would load; tests/integration checks the server enforces it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ratchet.messaging import EVENTS_STREAM, PROMPTS_BUCKET
from ratchet.natsconf import ROLES, generate_passwords, render_config

PROMPT_WRITE = f"$KV.{PROMPTS_BUCKET}.>"


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    return generate_passwords()


@pytest.fixture(scope="module")
def config(passwords: dict[str, str]) -> dict[str, Any]:
    text = render_config(passwords, port=4333, store_dir=Path("/tmp/ratchet-js"))
    parsed: dict[str, Any] = json.loads(text)  # JSON is valid nats-server config syntax
    return parsed


@pytest.fixture(scope="module")
def users(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {user["user"]: user for user in config["authorization"]["users"]}


def publish_allow(users: dict[str, dict[str, Any]], role: str) -> list[str]:
    allow: list[str] = users[role]["permissions"]["publish"]["allow"]
    return allow


def roles_that_publish(users: dict[str, dict[str, Any]], subject: str) -> set[str]:
    return {role for role in ROLES if subject in publish_allow(users, role)}


def test_config_carries_listen_address_and_jetstream_dir(config: dict[str, Any]) -> None:
    assert config["port"] == 4333
    assert config["host"] == "127.0.0.1"
    assert config["jetstream"]["store_dir"] == "/tmp/ratchet-js"


def test_every_role_and_the_admin_is_a_user_with_its_password(
    users: dict[str, dict[str, Any]], passwords: dict[str, str]
) -> None:
    assert set(users) == {"admin", *ROLES}
    assert {name: user["password"] for name, user in users.items()} == passwords


def test_only_the_evaluator_may_publish_scores(users: dict[str, dict[str, Any]]) -> None:
    assert roles_that_publish(users, "run.scored") == {"evaluator"}


def test_the_executor_may_not_publish_scores_or_write_prompts(
    users: dict[str, dict[str, Any]],
) -> None:
    allow = publish_allow(users, "executor")
    assert "run.scored" not in allow
    assert not any(subject.startswith("$KV.") for subject in allow)
    assert not any(subject in (">", "*", "run.>") for subject in allow)


def test_only_the_gatekeeper_may_write_the_prompt_store(users: dict[str, dict[str, Any]]) -> None:
    assert roles_that_publish(users, PROMPT_WRITE) == {"gatekeeper"}
    for role in ROLES:
        if role != "gatekeeper":
            assert not any(s.startswith("$KV.") for s in publish_allow(users, role)), role


def test_only_the_approver_may_publish_decisions(users: dict[str, dict[str, Any]]) -> None:
    assert roles_that_publish(users, "change.approved") == {"approver"}
    assert roles_that_publish(users, "change.rejected") == {"approver"}


def test_no_role_has_a_wildcard_over_event_subjects(users: dict[str, dict[str, Any]]) -> None:
    for role in ROLES:
        for subject in publish_allow(users, role):
            assert subject not in (">", "run.>", "change.>", "failure.>"), (role, subject)


def test_evaluator_may_create_only_its_durable_filtered_on_run_completed(
    users: dict[str, dict[str, Any]],
) -> None:
    creates = [s for s in publish_allow(users, "evaluator") if ".CONSUMER.CREATE." in s]

    assert creates == [f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.evaluator.run.completed"]


def test_each_consumer_permission_names_its_own_durable_and_filter(
    users: dict[str, dict[str, Any]],
) -> None:
    for role, spec in ROLES.items():
        allow = publish_allow(users, role)
        for durable, subject in spec.consumers:
            assert f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.{durable}.{subject}" in allow
            assert f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{durable}" in allow
        events_creates = [s for s in allow if f".CONSUMER.CREATE.{EVENTS_STREAM}." in s]
        assert len(events_creates) == len(spec.consumers), role


def test_stream_management_is_not_granted_to_any_role(users: dict[str, dict[str, Any]]) -> None:
    for role in ROLES:
        for subject in publish_allow(users, role):
            for verb in ("STREAM.CREATE", "STREAM.UPDATE", "STREAM.DELETE", "STREAM.PURGE"):
                assert verb not in subject, (role, subject)


def test_admin_has_full_access(users: dict[str, dict[str, Any]]) -> None:
    assert "permissions" not in users["admin"]


def test_generate_passwords_gives_distinct_random_passwords() -> None:
    first, second = generate_passwords(), generate_passwords()

    assert set(first) == {"admin", *ROLES}
    assert len(set(first.values())) == len(first)
    assert all(len(p) >= 20 for p in first.values())
    assert all(first[name] != second[name] for name in first)


def subscribe_allow(users: dict[str, dict[str, Any]], role: str) -> list[str]:
    allow: list[str] = users[role]["permissions"]["subscribe"]["allow"]
    return allow


def roles_that_answer(users: dict[str, dict[str, Any]], subject: str) -> set[str]:
    return {role for role in ROLES if subject in subscribe_allow(users, role)}


def test_each_table_is_asked_of_its_owner_only(users: dict[str, dict[str, Any]]) -> None:
    """One owner per table: the failure store answers for failures, the gatekeeper for the
    audit trail; nobody else can take those questions."""
    for subject in ("query.failures", "query.groups", "query.count"):
        assert roles_that_answer(users, subject) == {"failure-store"}, subject
    for subject in ("query.changes", "query.change", "query.audit"):
        assert roles_that_answer(users, subject) == {"gatekeeper"}, subject


def test_the_proposer_asks_the_failure_store_and_nothing_else(
    users: dict[str, dict[str, Any]],
) -> None:
    queries = {s for s in publish_allow(users, "proposer") if s.startswith("query.")}
    assert queries == {"query.failures", "query.groups", "query.count"}


def test_people_and_approvers_may_read_the_audit_trail(users: dict[str, dict[str, Any]]) -> None:
    for role in ("client", "approver"):
        assert "query.>" in publish_allow(users, role), role
        assert "change.>" in subscribe_allow(users, role), role


def test_only_the_gatekeeper_announces_audit_records(users: dict[str, dict[str, Any]]) -> None:
    assert roles_that_publish(users, "change.recorded") == {"gatekeeper"}
