"""The names of Ratchet's JetStream layout and the plain nats-py publish, with nothing heavier
than nats-py and pydantic behind them.

:mod:`ratchet.messaging` (FastStream, the services' side) takes these from here, so the SDK
(:mod:`ratchet.sdk`), which an application imports, gets the same stream, bucket, inbox rule
and deduplication rule without importing FastStream.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from ratchet.contracts import APP_NAME, Event

log = logging.getLogger("ratchet.jetstream")
T = TypeVar("T")

EVENTS_STREAM = "RATCHET"
PROMPTS_BUCKET = "prompts"
PROMPTS_STREAM = f"KV_{PROMPTS_BUCKET}"  # the stream behind the bucket
KEY_PREFIX = f"$KV.{PROMPTS_BUCKET}."  # + a task: where its versions are written
PROMPT_SUBJECTS = f"{KEY_PREFIX}>"
# Each stored write to the bucket, republished by the server with its headers only (the task in
# the subject, its new version in Nats-Sequence): what prompt readers follow. A republished
# message carries no reply subject, so no reader can answer the gatekeeper's write for the server.
PROMPT_NOTICE_PREFIX = "prompts.written."
PROMPT_NOTICES = f"{PROMPT_NOTICE_PREFIX}>"
PROMPT_HISTORY = 64  # versions kept per task
INBOX_ROOT = "_INBOX"
APP_USER_PREFIX = "app-"
# How long a publish asks a stream that does not answer: on a cluster that lost the node leading
# the stream, the others elect a new leader within seconds (nats-server's election timeout is
# 4 to 9 s), and a client whose server went reconnects to another within a few more.
PUBLISH_RETRY_S = 30.0
NOT_ANSWERED = (TimeoutError, NoRespondersError, NoStreamResponseError, ServiceUnavailableError)


def inbox_prefix(user: str | None) -> str:
    """Where replies to this NATS user go: ``_INBOX_<user>``, a prefix of its own, so the server
    can let each role subscribe to its own replies (and deliveries) and nobody else's."""
    return f"{INBOX_ROOT}_{user}" if user else INBOX_ROOT


def app_user(app: str) -> str:
    """The NATS user an instrumented app connects as (one per name in ``Settings.apps``)."""
    if not re.fullmatch(APP_NAME, app):
        raise ValueError(
            f"{app!r} is not an app name: lowercase letters, digits, - and _, at most 32, "
            "starting with a letter or digit"
        )
    return f"{APP_USER_PREFIX}{app}"


def dedup_headers(event: Event) -> dict[str, str]:
    """``Nats-Msg-Id`` from the event's id: JetStream drops a second publish of the same event."""
    return {"Nats-Msg-Id": f"{event.subject}:{event.id}"}


async def until_answered(attempt: Callable[[], Awaitable[T]], *, what: str, within: float) -> T:
    """``attempt`` (a publish to a stream), made again while the stream does not answer, for up
    to ``within`` seconds; then its error. Only for a publish whose ``Nats-Msg-Id`` makes a
    repeat harmless: an attempt that timed out may have been stored after all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    delay = 0.25
    while True:
        try:
            return await attempt()
        except NOT_ANSWERED:
            if loop.time() + delay > deadline:
                raise
            log.warning("no ack for %s yet; publishing it again in %.2gs", what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def publish_js(
    js: JetStreamContext,
    event: Event,
    *,
    subject: str | None = None,
    stream: str = EVENTS_STREAM,
    timeout: float = 10.0,
    retry_s: float = 0.0,
) -> None:
    """Publish to JetStream with a plain nats-py client (the CLI, tools, the SDK) and wait for
    the ack, on the event's own subject unless told otherwise; ``Nats-Msg-Id`` makes a retry
    harmless. ``retry_s``: how long to ask again a stream that does not answer (a cluster
    electing a leader, see :func:`until_answered`); 0 reports it at once."""
    subject = subject or event.subject
    await until_answered(
        lambda: js.publish(
            subject,
            event.model_dump_json().encode(),
            stream=stream,
            headers=dedup_headers(event),
            timeout=timeout,
        ),
        what=subject,
        within=retry_s,
    )
