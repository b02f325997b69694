"""JetStream layout and the one way services talk over it.

Streams, the prompt-store bucket, the durable consumers and the dead-letter path are declared here
and nowhere else. Streams are created once by :func:`ensure_streams` (run by ``ratchet up`` with
admin rights); services only bind to them, which their NATS users allow.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import nats
from faststream import AckPolicy, BaseMiddleware
from faststream.exceptions import AckMessage, NackMessage
from faststream.message import StreamMessage
from faststream.nats import ConsumerConfig, JStream, NatsBroker, NatsUserPassword, PullSub
from faststream.nats.publisher.usecase import LogicPublisher
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RePublish, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError
from pydantic import ValidationError

from ratchet.contracts import DeadLetter, Event, RunCompleted, RunReported
from ratchet.jetstream import EVENTS_STREAM as EVENTS_STREAM
from ratchet.jetstream import INBOX_ROOT as INBOX_ROOT
from ratchet.jetstream import (
    PROMPT_HISTORY,
    PROMPT_NOTICES,
    PROMPT_SUBJECTS,
    until_answered,
)
from ratchet.jetstream import PROMPTS_BUCKET as PROMPTS_BUCKET
from ratchet.jetstream import PUBLISH_RETRY_S as PUBLISH_RETRY_S
from ratchet.jetstream import dedup_headers as dedup_headers
from ratchet.jetstream import inbox_prefix as inbox_prefix
from ratchet.jetstream import publish_js as publish_js
from ratchet.settings import Settings

log = logging.getLogger("ratchet.messaging")

EVENTS_SUBJECTS = ["run.>", "failure.>", "change.>"]
DLQ_STREAM = "RATCHET_DLQ"
DLQ_PREFIX = "dlq"
DUPLICATE_WINDOW_S = 600.0
EVENTS_MAX_AGE_S = 30 * 24 * 3600
# Storage is bounded too: whoever may publish could otherwise fill the disk. A full events
# stream refuses new events (publishers get an error) rather than drop the oldest: those hold
# unfinished work and the audit trail's anchors. Dead letters beyond their limit drop the oldest.
EVENTS_MAX_BYTES = 8 * 1024**3
DLQ_MAX_BYTES = 1024**3
# The prompt bucket's consumers: readers follow it without one (ratchet.prompts.PromptFollower)
# and may not create any; the cap stays as a second line.
PROMPTS_MAX_CONSUMERS = 256
# Every stored write to the prompt bucket, republished headers-only for the readers to follow.
PROMPT_REPUBLISH = RePublish(src=PROMPT_SUBJECTS, dest=PROMPT_NOTICES, headers_only=True)
QUERY_PREFIX = "query"  # request/reply subjects, outside every stream
# The gatekeepers' leases (KV): one gatekeeper works a change at a time; a lease not renewed
# for LEASE_TTL_S (its holder died) expires on the server. Shorter than ack_wait_s (30 s), so a
# message redelivered after its gatekeeper died finds the lease free.
LEASE_BUCKET = "gate_leases"
LEASE_TTL_S = 10.0
MAX_REPLICAS = 3  # copies of each stream and of the prompt bucket on a cluster of 3 or more


# Services bind to the stream; they never create or change it.
events_stream = JStream(name=EVENTS_STREAM, declare=False)

# Redelivery backoff for a handler that raised: attempt n waits BACKOFF_S[n-1] seconds.
BACKOFF_S = (0.2, 1.0, 3.0, 10.0, 30.0)


async def ensure_streams(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Create (or update) the streams and the prompt bucket. Idempotent; needs admin rights.

    ``replicas``: copies of each, on as many servers of a cluster (at most :data:`MAX_REPLICAS`;
    1 on a single server). An existing stream or bucket is brought to that number.

    The events stream holds the audit trail's anchors (``change.recorded``), so no message may
    be deleted from it nor the stream purged: once set, the server refuses to lift either, even
    for the admin. Messages still age out after ``EVENTS_MAX_AGE_S`` (the gatekeeper anchors its
    head again daily). ``allow_direct`` lets a reader fetch the newest anchor with one direct get.
    """
    for config in (
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=EVENTS_SUBJECTS,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_age=EVENTS_MAX_AGE_S,
            max_bytes=EVENTS_MAX_BYTES,
            discard=DiscardPolicy.NEW,  # full: refuse new events, never drop anchors or work
            deny_delete=True,
            deny_purge=True,
            allow_direct=True,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=DLQ_STREAM,
            subjects=[f"{DLQ_PREFIX}.>"],
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_age=EVENTS_MAX_AGE_S,
            max_bytes=DLQ_MAX_BYTES,
            num_replicas=replicas,
        ),
    ):
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)
    await _ensure_bucket(
        js,
        KeyValueConfig(
            bucket=PROMPTS_BUCKET,
            history=PROMPT_HISTORY,
            direct=True,  # readers get entries directly (PromptFollower), from any replica
            storage=StorageType.FILE,
            replicas=replicas,
            republish=PROMPT_REPUBLISH,
        ),
        max_consumers=PROMPTS_MAX_CONSUMERS,
        allow_direct=True,  # and a bucket made before that learns them
        republish=PROMPT_REPUBLISH,
    )
    await _ensure_lease_bucket(js, replicas)


async def _ensure_bucket(js: JetStreamContext, config: KeyValueConfig, **stream: Any) -> None:
    """A KV bucket as ``config`` says, made if missing; an existing one is brought to its
    replicas and to the ``stream`` settings of its stream (``KV_<bucket>``) that KV creation
    does not set or that changed since it was made."""
    try:
        await js.key_value(config.bucket)
    except BucketNotFoundError:
        await js.create_key_value(config)
    current = (await js.stream_info(f"KV_{config.bucket}")).config
    wanted = {"num_replicas": config.replicas, **stream}
    if any(getattr(current, name) != value for name, value in wanted.items()):
        for name, value in wanted.items():
            setattr(current, name, value)
        await js.update_stream(current)


async def _ensure_lease_bucket(js: JetStreamContext, replicas: int) -> None:
    """The gatekeepers' leases, one key per change being worked (the gatekeeper's ``lease``
    module). Every entry ages out ``LEASE_TTL_S`` after its last write, so a lease its holder
    stops renewing (it died) is gone without anyone's clock; history 1, a renewal replaces it."""
    config = KeyValueConfig(
        bucket=LEASE_BUCKET,
        history=1,
        ttl=LEASE_TTL_S,
        direct=True,
        storage=StorageType.FILE,
        replicas=replicas,
    )
    await _ensure_bucket(js, config, max_age=LEASE_TTL_S)


async def connect(
    settings: Settings,
    *,
    name: str,
    reconnect: bool = True,
    on_error: Callable[[Exception], Awaitable[None]] | None = None,
) -> Client:
    """A plain nats-py connection as this process's NATS user (CLI, prompt store, admin), given
    every server of ``settings.nats_url``: it connects to one and moves to another if that one
    goes.

    A one-shot client (the CLI) passes ``reconnect=False``: an unreachable server then fails
    within a few seconds instead of being retried (nats-py retries the first connect regardless).
    ``on_error`` hears the errors the server reports (say a refused publish) instead of the log.
    """
    attempt = nats.connect(
        settings.nats_servers,
        name=name,
        user=settings.nats_user,
        password=settings.nats_password,
        connect_timeout=2,
        inbox_prefix=inbox_prefix(settings.nats_user),
        allow_reconnect=reconnect,
        max_reconnect_attempts=-1 if reconnect else 0,
        error_cb=on_error or (_log_error if reconnect else _ignore_error),
    )
    client: Client = await (attempt if reconnect else asyncio.wait_for(attempt, timeout=5))
    return client


async def _log_error(exc: Exception) -> None:
    log.error("nats: %s", exc)


async def _ignore_error(exc: Exception) -> None:
    log.debug("nats: %s", exc)


def make_broker(settings: Settings, *, name: str) -> NatsBroker:
    """A broker for one service, authenticated as that service's NATS user, given every server
    of ``settings.nats_url`` (a cluster's nodes), like :func:`connect`."""
    broker = NatsBroker(
        settings.nats_servers,
        name=name,
        security=(
            NatsUserPassword(settings.nats_user, settings.nats_password or "")
            if settings.nats_user
            else None
        ),
        connect_timeout=5,
        inbox_prefix=inbox_prefix(settings.nats_user),
        max_reconnect_attempts=-1,
        logger=logging.getLogger(f"ratchet.{name}"),
    )
    broker.add_middleware(
        partial(
            DeadLetterMiddleware, max_deliver=settings.max_deliver, ack_wait_s=settings.ack_wait_s
        )
    )
    return broker


def durable_subscriber(
    broker: NatsBroker,
    subject: str,
    *,
    durable: str,
    settings: Settings,
    description: str | None = None,
) -> Callable[[Callable[..., Awaitable[Any]]], Any]:
    """A durable pull consumer on the events stream with Ratchet's delivery guarantees.

    Replicas of a service share ``durable`` and so split the work. A handler that raises is
    nacked and redelivered with backoff, up to ``settings.max_deliver`` deliveries; then, or at
    once for a message that does not parse, the message goes to ``dlq.<subject>``.
    Note that JetStream ignores a changed ``ack_wait``/``max_deliver`` on an existing consumer.
    """
    return broker.subscriber(
        subject,
        stream=events_stream,
        durable=durable,
        # fetch returns as soon as a message arrives; a long window means fewer empty polls
        pull_sub=PullSub(batch_size=settings.workers, timeout=5.0),
        config=ConsumerConfig(
            ack_wait=settings.ack_wait_s,
            max_deliver=settings.max_deliver,
            max_ack_pending=max(64, settings.workers * 8),
        ),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        max_workers=settings.workers,
        # FastStream would deliver pulls to the shared "_INBOX." prefix, which no role may hear
        inbox_prefix=f"{inbox_prefix(settings.nats_user)}.".encode(),
        # an event is never answered: FastStream would otherwise publish the handler's result to
        # a `reply_to` header that whoever published the event chose (say $KV.prompts.x)
        no_reply=True,
        description=description,
    )


def event_publisher(
    broker: NatsBroker, event_type: type[Event], *, subject: str | None = None
) -> LogicPublisher:
    """A documented publisher of one event type (it appears in the service's AsyncAPI), on its
    own subject unless told otherwise (a proposal or a decision goes to its sender's own
    subject, :meth:`ratchet.contracts.Attributed.subject_of`)."""
    return broker.publisher(
        subject or event_type.subject,
        stream=events_stream,
        schema=event_type,
        description=(event_type.__doc__ or "").strip() or None,
    )


async def publish(publisher: LogicPublisher, event: Event) -> None:
    """Publish to JetStream and wait for the ack; ``Nats-Msg-Id`` makes a retry harmless.

    A stream that does not answer (on a cluster, while it elects a new leader after losing a
    node, which takes a few seconds) is asked again, with the same id, for up to
    :data:`PUBLISH_RETRY_S`: a handler rides out the election instead of spending deliveries.
    """
    await until_answered(
        lambda: publisher.publish(
            event, headers=dedup_headers(event), stream=EVENTS_STREAM, timeout=5.0
        ),
        what=event.subject,
        within=PUBLISH_RETRY_S,
    )


def dead_letter_subject(subject: str) -> str:
    return f"{DLQ_PREFIX}.{subject}"


def reported_run(settings: Settings, report: RunReported, app: str) -> RunCompleted:
    """The run an app reported, as the evaluator and the failure store handle it; a task the
    app may not report (``Settings.app_tasks``) is :class:`Unprocessable`, so it is
    dead-lettered with that reason and swayed nothing."""
    if not settings.app_may_report(app, report.task):
        raise Unprocessable(f"app {app!r} may not report task {report.task!r} (app_tasks)")
    return report.completed(app)


class Unprocessable(Exception):
    """Raised by a handler for a message that can never be handled, whatever the retries (a run
    asking for a prompt version that does not exist): dead-lettered at once with this reason."""


class DeadLetterMiddleware(BaseMiddleware):
    """Routes messages that cannot be handled to ``dlq.<subject>`` with the reason.

    A message that fails validation (a field over its limit, an unknown ``schema_version``) or
    that its handler finds :class:`Unprocessable` goes there at once; one whose handler fails
    goes there after the last delivery.

    Sits inside FastStream's acknowledgement middleware: raising ``AckMessage`` acknowledges the
    original once the dead letter is stored, ``NackMessage`` asks for a delayed redelivery.
    """

    def __init__(self, msg: Any, /, *, context: Any, max_deliver: int, ack_wait_s: float) -> None:
        super().__init__(msg, context=context)
        self.max_deliver = max_deliver
        self.ack_wait_s = ack_wait_s

    async def consume_scope(
        self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]
    ) -> Any:
        raw = msg.raw_message
        try:
            deliveries = raw.metadata.num_delivered
        except NotJSMessageError:  # a core (request/reply) message: nothing to redeliver
            if raw.reply and not raw.reply.startswith(INBOX_ROOT):
                # The asker picks the reply subject, and the answer would go out with this
                # service's own rights: a reply aimed anywhere but an inbox (say at $KV.prompts.x
                # or change.recorded) is never sent, and the query not answered.
                log.warning("refused %s: its reply subject %r is no inbox", raw.subject, raw.reply)
                msg.reply_to = ""  # FastStream publishes no answer then
                return None
            return await call_next(msg)
        heartbeat = asyncio.create_task(_keep_alive(raw, self.ack_wait_s / 3))
        try:
            return await call_next(msg)
        except Unprocessable as exc:
            await _dead_letter(raw, f"unprocessable: {exc}", deliveries)
            raise AckMessage() from exc
        except Exception as exc:
            # the message itself does not parse; a model check inside the handler (say of a
            # stored record) is a failure like any other, retried
            if isinstance(exc, ValidationError) and _is_the_message(exc, self.context):
                await _dead_letter(raw, _summary(exc), deliveries)
                raise AckMessage() from exc
            if deliveries >= self.max_deliver:
                await _dead_letter(raw, f"handler failed {deliveries} times: {exc!r}", deliveries)
                raise AckMessage() from exc
            log.warning("handler failed on %s (delivery %d): %r", raw.subject, deliveries, exc)
            delay = BACKOFF_S[min(deliveries, len(BACKOFF_S)) - 1]
            raise NackMessage(delay=delay) from exc
        finally:
            heartbeat.cancel()


async def _keep_alive(raw: Msg, every_s: float) -> None:
    """Tell JetStream a long handler (an LLM call, a gate measurement) is still working, so the
    message is not redelivered to another replica while it runs."""
    while True:
        await asyncio.sleep(every_s)
        await raw.in_progress()


def _is_the_message(exc: ValidationError, context: Any) -> bool:
    """Whether ``exc`` is FastStream's parse of the message itself, which it titles after the
    handler, rather than a model check inside the handler (say of a stored record): only the
    former is malformed input; the latter may pass when retried."""
    subscriber = context.get_local("handler_")
    handlers = {
        getattr(getattr(call.handler, "_original_call", None), "__name__", None)
        for call in getattr(subscriber, "calls", ())
    }
    return exc.title in handlers or handlers <= {None}  # unknown: the message, as before


def _summary(exc: ValidationError) -> str:
    """The reason in one line. An unknown schema version comes first: it explains the rest."""
    errors = exc.errors()
    for error in errors:
        if "schema_version" in error.get("loc", ()):
            return f"unsupported message: {str(error.get('msg')).removeprefix('Value error, ')}"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return f"malformed message: {exc.error_count()} error(s), first at {where}: {first.get('msg')}"


async def _dead_letter(raw: Msg, reason: str, deliveries: int) -> None:
    """Store the message and why on ``dlq.<subject>``: the letter is cut to fit, with the
    original's length and hash (see :class:`DeadLetter`), so it can always be published."""
    letter = DeadLetter.of(raw.subject, raw.data, reason=reason, deliveries=deliveries)
    meta = raw.metadata
    msg_id = f"dlq:{meta.stream}:{meta.sequence.stream}"
    js = raw._client.jetstream()  # the connection the message arrived on
    await until_answered(  # the letter's id (the message's stream sequence) makes a repeat harmless
        lambda: js.publish(
            dead_letter_subject(raw.subject),
            letter.model_dump_json().encode(),
            stream=DLQ_STREAM,
            headers={"Nats-Msg-Id": msg_id},
            timeout=5.0,
        ),
        what=dead_letter_subject(raw.subject),
        within=PUBLISH_RETRY_S,
    )
    log.error("dead-lettered %s: %s", raw.subject, reason)
