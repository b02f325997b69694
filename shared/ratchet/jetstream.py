"""The names of Ratchet's JetStream layout and the plain nats-py publish, with nothing heavier
than nats-py and pydantic behind them.

:mod:`ratchet.messaging` (FastStream, the services' side) takes these from here, so the SDK
(:mod:`ratchet.sdk`), which an application imports, gets the same stream, bucket, inbox rule
and deduplication rule without importing FastStream.
"""

from __future__ import annotations

import re

from nats.js import JetStreamContext

from ratchet.contracts import APP_NAME, Event

EVENTS_STREAM = "RATCHET"
PROMPTS_BUCKET = "prompts"
INBOX_ROOT = "_INBOX"
APP_USER_PREFIX = "app-"


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


async def publish_js(
    js: JetStreamContext,
    event: Event,
    *,
    subject: str | None = None,
    stream: str = EVENTS_STREAM,
    timeout: float = 10.0,
) -> None:
    """Publish to JetStream with a plain nats-py client (the CLI, tools, the SDK) and wait for
    the ack, on the event's own subject unless told otherwise; ``Nats-Msg-Id`` makes a retry
    harmless."""
    await js.publish(
        subject or event.subject,
        event.model_dump_json().encode(),
        stream=stream,
        headers=dedup_headers(event),
        timeout=timeout,
    )
