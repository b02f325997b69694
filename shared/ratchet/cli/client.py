"""Talking to a running Ratchet as a person would: the CLI and the demo both go through here."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.js.errors import APIError, NoStreamResponseError
from pydantic import BaseModel, TypeAdapter, ValidationError

from ratchet.audit import AnchorReading, AuditKey, read_anchor
from ratchet.contracts import (
    ChangeApproved,
    ChangeDecision,
    ChangeRejected,
    Event,
    FailureLogged,
    RunCompleted,
    RunRequested,
    RunScored,
)
from ratchet.messaging import PUBLISH_RETRY_S, QUERY_PREFIX, connect, publish_js
from ratchet.natsconf import POLICY_APPROVER, approver_name, approver_user
from ratchet.queries import TRIMMED_HEADER, AuditPage, AuditQuery, ChangeQuery
from ratchet.settings import Settings, get_settings
from ratchet.store import AuditRecord
from ratchet.untrusted import for_terminal

T = TypeVar("T")
E = TypeVar("E", bound=Event)


class ClientError(Exception):
    """Something a user can fix, said in one line: no server, no answer, a refused message."""


def client_settings(role: str = "client") -> Settings:
    """The CLI's NATS identity, for a command that acts as ``role``.

    A user named in the environment (``RATCHET_NATS_USER``) wins: the server then decides what it
    may do, and a command that acts as another role says which user it used. Its password is
    ``RATCHET_NATS_PASSWORD``, else the one ``ratchet up`` keeps for that user. With no user named,
    the command logs in as ``role`` with ``ratchet up``'s credentials.
    """
    from ratchet.natsproc import load_credentials  # natsproc's errors are ClientErrors

    settings = get_settings()
    if settings.nats_user and settings.nats_password is not None:
        return settings
    user = settings.nats_user or role
    try:
        passwords = load_credentials(settings.home)
    except FileNotFoundError as exc:
        if settings.nats_user:
            raise ClientError(
                f"RATCHET_NATS_USER is {user!r} but RATCHET_NATS_PASSWORD is not set, and {exc}"
            ) from exc
        raise ClientError(str(exc)) from exc
    if user not in passwords:
        unset = f"RATCHET_NATS_USER is {user!r} but RATCHET_NATS_PASSWORD is not set, and "
        raise ClientError(
            f"{unset if settings.nats_user else ''}`ratchet up` has no password for {user!r} "
            f"(its users: {', '.join(sorted(passwords))})"
        )
    return settings.model_copy(update={"nats_user": user, "nats_password": passwords[user]})


ErrorCallback = Callable[[Exception], Awaitable[None]]


async def open_client(settings: Settings, *, on_error: ErrorCallback | None = None) -> Client:
    """One connection as ``settings``' user, to Ratchet's server and no other.

    ``on_error`` hears what the server reports later on the connection (a refused publish).
    """
    try:
        nc = await connect(settings, name="ratchet-cli", reconnect=False, on_error=on_error)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        if _is_authorization_error(exc):
            raise ClientError(
                f"NATS at {settings.nats_url} refused user {settings.nats_user!r}: wrong "
                f"password? (RATCHET_NATS_PASSWORD must be the password of RATCHET_NATS_USER)"
            ) from exc
        raise ClientError(
            f"cannot reach NATS at {settings.nats_url} ({type(exc).__name__}): is `ratchet "
            "up` running?"
        ) from exc
    # Ratchet's server always asks for a password: one that does not is someone else's (say a
    # nats-server started by hand on the same port), where requests would wait for nobody.
    if settings.nats_user and not nc._server_info.get("auth_required", False):
        answered = nc.connected_url
        await nc.close()
        where = f"{answered.hostname}:{answered.port or 4222}" if answered else settings.nats_url
        raise ClientError(
            f"the NATS server at {where} is not Ratchet's (it asks for no password): another "
            f"server is using port {where.rpartition(':')[2]}"
        )
    return nc


def retry_s(nc: Client) -> float:
    """How long a publish asks again a stream that does not answer: on a cluster (its servers
    name it), a stream whose leader's node was lost answers again under a new leader within
    seconds; a single server that does not answer has no such stream, which is said at once."""
    return PUBLISH_RETRY_S if nc._server_info.get("cluster") else 0.0


def _is_authorization_error(exc: BaseException) -> bool:
    return isinstance(exc, nats.errors.AuthorizationError) or (
        "authorization violation" in str(exc).lower()
    )


async def request(
    nc: Client,
    subject: str,
    body: BaseModel,
    answer: TypeAdapter[T],
    *,
    service: str,
    timeout: float = 10,
) -> T:
    """Ask ``service`` on ``subject``. A reply the service had to cut to fit in one message
    is used as it is, and what was left out is said on stderr."""
    data = body.model_dump_json().encode()
    if len(data) > nc.max_payload:
        raise ClientError(
            f"the request to the {service} is {len(data)} bytes, over the {nc.max_payload} bytes "
            "the NATS server accepts in one message"
        )
    try:
        reply = await nc.request(subject, data, timeout=timeout)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise ClientError(f"the {service} did not answer on {subject}: is it running?") from exc
    if trimmed := (reply.headers or {}).get(TRIMMED_HEADER):
        print(
            f"ratchet: the {service} cut its reply to fit: {for_terminal(trimmed)}", file=sys.stderr
        )
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
        ack = publish_js(nc.jetstream(), request_, timeout=5, retry_s=retry_s(nc))
        try:
            await ack
        except NoStreamResponseError as exc:
            raise ClientError(
                f"NATS has no stream for {request_.subject}: is this Ratchet's server?"
            ) from exc
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


async def fetch_audit(nc: Client) -> tuple[list[AuditRecord], str | None]:
    """The whole audit trail from its owner, the gatekeeper, a page at a time, and the public key
    it says it signs with."""
    records: list[AuditRecord] = []
    public_key: str | None = None
    while True:
        page = await request(
            nc,
            f"{QUERY_PREFIX}.audit",
            AuditQuery(after_seq=records[-1].seq if records else 0),
            TypeAdapter(AuditPage),
            service="gatekeeper",
        )
        records += page.records
        public_key = public_key or page.public_key
        if not (page.more and page.records):
            return records, public_key


async def fetch_anchor(nc: Client, key: AuditKey | None) -> AnchorReading:
    """The audit trail's anchor, read from the events stream itself, not asked of the gatekeeper
    (whose database it checks): the newest ``change.recorded``, if it is an anchor signed with
    ``key``; if not, the reading says why, and the trail's end goes unchecked, a problem.

    Only the newest: reading older ones needs a direct get by sequence, which would let this
    user read every message of the stream (the gate's checks, the sealed holdout). The
    gatekeeper, which wrote those, walks back past such a message to the newest valid anchor,
    and its next anchor (with its next record, or at most a day later) ends the problem."""
    try:
        return await read_anchor(nc, key, limit=1)
    except nats.errors.NoRespondersError as exc:
        raise ClientError(
            "the RATCHET stream serves no direct gets, so the audit anchor cannot be read: "
            "update the streams with `ratchet init-streams`"
        ) from exc
    except nats.errors.TimeoutError as exc:
        raise ClientError(
            "NATS did not answer the read of the audit anchor (the newest change.recorded in "
            "the RATCHET stream): may this NATS user read it?"
        ) from exc
    except APIError as exc:
        raise ClientError(f"NATS refused the read of the audit anchor: {exc}") from exc


async def publish_as(
    settings: Settings,
    make: Callable[[Client], Awaitable[E]],
    *,
    subject: str,
    refused: Callable[[str], ClientError],
) -> E:
    """Publish the event ``make`` builds (it may ask first, on the same connection) on
    ``subject``, as ``settings``' user: a decision or a proposal on its sender's own subject.

    The server never acknowledges a publish it refuses, it reports it: the refusal ends this at
    once as ``refused(why)``, a one-line error, instead of a timeout."""
    refusal: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower() and not refusal.done():
            refusal.set_result(str(exc).removeprefix("nats: "))

    async def act(nc: Client) -> E:
        event = await make(nc)
        await publish_js(nc.jetstream(), event, subject=subject, timeout=5, retry_s=retry_s(nc))
        return event

    nc = await open_client(settings, on_error=on_error)
    acting = asyncio.ensure_future(act(nc))
    try:
        either: list[asyncio.Future[Any]] = [acting, refusal]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if refusal.done():
            raise refused(refusal.result())
        return await acting
    except nats.errors.TimeoutError as exc:
        raise refused(f"NATS did not accept the publish to {subject}") from exc
    finally:
        acting.cancel()
        await nc.close()


def evidence_of(trail: list[AuditRecord]) -> str:
    """The evidence hash a decision on this change must name; an error if it is not waiting."""
    waiting = next((r for r in trail if r.kind == "awaiting_approval"), None)
    if waiting is None:
        raise ClientError(f"change {trail[0].change_id} is not waiting for a decision yet")
    return str(waiting.payload["evidence_sha256"])


def decider(chosen: str | None, settings: Settings) -> str:
    """Who decides: ``--as NAME``, else the approver whose NATS user the environment names, else
    the one person approver configured (``operator`` by default)."""
    named = approver_name(settings.nats_user or "")
    people = [name for name in settings.approvers if name != POLICY_APPROVER]
    name = chosen or named or (people[0] if len(people) == 1 else None)
    if name is None:
        known = ", ".join(sorted({*people, POLICY_APPROVER}))
        raise ClientError(f"say which approver decides: --as NAME (approvers: {known})")
    try:
        approver_user(name)
    except ValueError as exc:
        raise ClientError(str(exc)) from exc
    return name


async def send_decision(
    change_id: str, *, approve: bool, reason: str, approver: str | None = None
) -> str:
    """Decide on the evidence the gatekeeper published for this change (and only on that), as
    the approver ``approver`` (see :func:`decider`).

    The decision goes to that approver's own subject, which only its NATS user may publish: the
    name the gatekeeper records is the one the server authenticated. Logs in as that approver's
    user, or as the user the environment names (said on stderr when that is another user).
    Returns the approver's name. A user the server does not let decide as that approver is a
    :class:`ClientError` at once, naming both.
    """
    name = decider(approver, get_settings())
    own_user = approver_user(name)
    settings = client_settings(role=own_user)
    user = settings.nats_user
    decision_type = ChangeApproved if approve else ChangeRejected

    def may_not_decide(why: str) -> ClientError:
        return ClientError(
            f"NATS user {user!r} may not decide as {name!r} ({why}): run `ratchet "
            f"{'approve' if approve else 'reject'}` with RATCHET_NATS_USER={own_user} and "
            "RATCHET_NATS_PASSWORD set to that approver's password"
        )

    async def decision(nc: Client) -> ChangeDecision:
        evidence = evidence_of(await fetch_trail(nc, change_id))
        return decision_type(change_id=change_id, reason=reason, evidence_sha256=evidence)

    subject = decision_type.subject_of(name)
    await publish_as(settings, decision, subject=subject, refused=may_not_decide)
    if user != own_user:
        print(f"ratchet: decided as NATS user {user!r} (RATCHET_NATS_USER)", file=sys.stderr)
    return name
