"""Talking to a running Ratchet as a person would: the CLI and the demo both go through here."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from pydantic import BaseModel, TypeAdapter, ValidationError

from ratchet.contracts import (
    ChangeApproved,
    ChangeRejected,
    FailureLogged,
    RunCompleted,
    RunRequested,
    RunScored,
)
from ratchet.messaging import QUERY_PREFIX, connect
from ratchet.natsproc import load_credentials
from ratchet.queries import ChangeQuery
from ratchet.settings import Settings, get_settings
from ratchet.store import AuditRecord

T = TypeVar("T")


class ClientError(Exception):
    """Something a user can fix, said in one line: no server, no answer, a refused message."""


def client_settings(role: str = "client") -> Settings:
    """The CLI's NATS identity: from the environment, else from ``ratchet up``'s credentials."""
    settings = get_settings()
    if settings.nats_user:
        return settings
    try:
        passwords = load_credentials(settings.home)
    except FileNotFoundError as exc:
        raise ClientError(str(exc)) from exc
    return settings.model_copy(update={"nats_user": role, "nats_password": passwords[role]})


async def open_client(settings: Settings) -> Client:
    try:
        return await connect(settings, name="ratchet-cli", reconnect=False)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise ClientError(
            f"cannot reach NATS at {settings.nats_url} ({type(exc).__name__}): is `ratchet "
            "up` running?"
        ) from exc


async def request(
    nc: Client,
    subject: str,
    body: BaseModel,
    answer: TypeAdapter[T],
    *,
    service: str,
    timeout: float = 10,
) -> T:
    try:
        reply = await nc.request(subject, body.model_dump_json().encode(), timeout=timeout)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise ClientError(f"the {service} did not answer on {subject}: is it running?") from exc
    try:
        return answer.validate_json(reply.data)
    except ValidationError as exc:
        raise ClientError(f"the {service} sent an unexpected reply: {reply.data[:200]!r}") from exc


async def query(subject: str, body: BaseModel, answer: TypeAdapter[T], *, service: str) -> T:
    """One request/reply as the CLI's client user."""
    nc = await open_client(client_settings())
    try:
        return await request(nc, subject, body, answer, service=service)
    finally:
        await nc.close()


EXPECTED: dict[str, type[RunCompleted | RunScored | FailureLogged]] = {
    RunCompleted.subject: RunCompleted,
    RunScored.subject: RunScored,
    FailureLogged.subject: FailureLogged,
}


async def submit_and_wait(
    nc: Client, request_: RunRequested, *, timeout: float, threshold: float
) -> tuple[RunCompleted, RunScored, bool]:
    """Publish one run and wait for its completion, its score and, if it failed, its logging."""
    got: dict[str, Any] = {}
    done = asyncio.Event()

    def expecting_failure() -> bool:
        scored = got.get(RunScored.subject)
        return bool(scored and scored.score is not None and scored.score < threshold)

    async def on_message(msg: Any) -> None:
        event = EXPECTED[msg.subject].model_validate_json(msg.data)
        if event.run_id != request_.run_id:
            return
        got[msg.subject] = event
        complete = RunCompleted.subject in got and RunScored.subject in got
        if complete and (not expecting_failure() or FailureLogged.subject in got):
            done.set()

    subs = [await nc.subscribe(s, cb=on_message) for s in EXPECTED]
    try:
        ack = nc.jetstream().publish(
            request_.subject,
            request_.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"{request_.subject}:{request_.id}"},
            timeout=5,
        )
        try:
            await ack
        except nats.errors.TimeoutError as exc:
            raise ClientError("NATS did not accept the run (no stream? permissions?)") from exc
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError as exc:
            seen = ", ".join(sorted(got)) or "nothing"
            raise ClientError(
                f"run {request_.run_id} not finished after {timeout:.0f}s (saw {seen})"
            ) from exc
    finally:
        for sub in subs:
            await sub.unsubscribe()
    return got[RunCompleted.subject], got[RunScored.subject], FailureLogged.subject in got


async def fetch_trail(nc: Client, change_id: str) -> list[AuditRecord]:
    trail = await request(
        nc,
        f"{QUERY_PREFIX}.change",
        ChangeQuery(change_id=change_id),
        TypeAdapter(list[AuditRecord]),
        service="gatekeeper",
    )
    if not trail:
        raise ClientError(f"no change {change_id!r}")
    return trail


def evidence_of(trail: list[AuditRecord]) -> str:
    """The evidence hash a decision on this change must name; an error if it is not waiting."""
    waiting = next((r for r in trail if r.kind == "awaiting_approval"), None)
    if waiting is None:
        raise ClientError(f"change {trail[0].change_id} is not waiting for a decision yet")
    return str(waiting.payload["evidence_sha256"])


async def send_decision(change_id: str, *, approve: bool, reason: str, approver: str) -> None:
    """Decide on the evidence the gatekeeper published for this change (and only on that)."""
    settings = client_settings(role="approver")
    decision_type = ChangeApproved if approve else ChangeRejected
    nc = await open_client(settings)
    try:
        evidence = evidence_of(await fetch_trail(nc, change_id))
        decision = decision_type(
            change_id=change_id, approver=approver, reason=reason, evidence_sha256=evidence
        )
        await nc.jetstream().publish(
            decision.subject,
            decision.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"{decision.subject}:{decision.id}"},
            timeout=5,
        )
    except nats.errors.TimeoutError as exc:
        raise ClientError(
            f"NATS refused the decision ({settings.nats_user} may not decide?)"
        ) from exc
    finally:
        await nc.close()
