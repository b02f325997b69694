"""The prompt store: task prompts in a JetStream key-value bucket, one key per task.

The bucket keeps history, so every version stays readable and the KV revision is the version
number. Everyone reads (:class:`PromptFollower` follows the bucket, without a consumer, so a new
version takes effect without a restart); only the gatekeeper writes (:class:`PromptWriter`), and
the NATS server refuses a write from any other user.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Literal, NamedTuple, Protocol

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ratchet.jetstream import (
    KEY_PREFIX,
    PROMPT_HISTORY,
    PROMPT_NOTICE_PREFIX,
    PROMPT_NOTICES,
    PROMPT_SUBJECTS,
    PROMPTS_BUCKET,
    PROMPTS_STREAM,
)

log = logging.getLogger("ratchet.prompts")

DEFAULT_PROMPT = "Complete the user's task."
RESYNC_S = 15.0  # how often a follower checks that it missed no write
RECONNECT_CHECK_S = 0.5  # how soon after a reconnect it reads everything again
NOTICE_TRIES = 20  # reads of a key after a notice, NOTICE_WAIT_S apart, until a replica has it
NOTICE_WAIT_S = 0.05


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Canary(BaseModel):
    """A version in canary serves ``share`` of live traffic; the rest gets the stable version,
    whose text it carries so that every reader can serve either from this one record."""

    model_config = ConfigDict(extra="forbid")

    share: float = Field(gt=0.0, lt=1.0)
    stable_version: int = Field(ge=0)
    stable_text: str


class PromptRecord(BaseModel):
    """What one version holds: the text and the change that made it."""

    model_config = ConfigDict(extra="forbid")

    text: str
    kind: Literal["initial", "change", "rollback", "promotion"] = "change"
    change_id: str | None = None
    note: str = ""
    canary: Canary | None = None

    @property
    def sha256(self) -> str:
        return sha256_text(self.text)


class Served(NamedTuple):
    """The task prompt one run gets, and the version to report with it."""

    text: str
    version: int


def in_canary(change_id: str, key: str, share: float) -> bool:
    """Whether the run or user ``key`` gets the canary of ``change_id``: a hash, so the same
    key always gets the same version of one change (one conversation sees one version), and
    every reader (the executor, the SDK) decides alike without asking anyone."""
    digest = hashlib.sha256(f"{change_id}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


def serve(stored: PromptVersion | None, key: str) -> Served:
    """The prompt a live run with rollout key ``key`` gets (the default prompt, version 0, for a
    task without one). Gate runs do not come here: they run the stored text itself."""
    if stored is None:
        return Served(DEFAULT_PROMPT, 0)
    record = stored.record
    canary = record.canary
    if canary is not None and not in_canary(record.change_id or "", key, canary.share):
        return Served(canary.stable_text, canary.stable_version)
    return Served(record.text, stored.version)


class PromptVersion(BaseModel):
    task: str
    version: int
    record: PromptRecord
    created: datetime | None = None


class PromptSource(Protocol):
    """The read side every service uses (:class:`PromptReader`; fakes in tests)."""

    def current(self, task: str) -> PromptVersion | None: ...


class StaleVersionError(RuntimeError):
    """The prompt changed since the version a write was based on (compare-and-set failed)."""


class PromptFollower:
    """Follows every task's current prompt without a JetStream consumer.

    Readers may not create consumers on the bucket: the server cannot check what a consumer
    request asks for (its delivery subject, how long it lives), so one reader could fill the
    bucket's consumer limit or have prompts delivered onto subjects it may not publish. Instead
    the bucket republishes each stored write, headers only, on ``prompts.written.<task>`` (its new
    version in ``Nats-Sequence``), and a reader reads that key again with a direct get. The notice
    is only a hint; the stored entry is the truth. A snapshot at start (the bucket's keys from
    stream info), a new one after every reconnect (what was written meanwhile was not noticed),
    and a cheap check every ``resync_s`` (has the stream's last sequence moved?) catch what a
    notice missed. Versions only move forward, so a read from a lagging replica cannot take one
    back.
    """

    def __init__(
        self,
        nc: Client,
        on_version: Callable[[str, PromptVersion | None], None],
        *,
        resync_s: float = RESYNC_S,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._on_version = on_version  # (task, its newest version; None once deleted)
        self._resync_s = resync_s
        self._versions: dict[str, int] = {}
        self._last_seq = -1
        self._reconnects = 0
        self._sub: Subscription | None = None
        self._sync_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe first (so no write slips between the snapshot and the subscription), then
        read every task's current prompt."""
        self._sub = await self._nc.subscribe(PROMPT_NOTICES, cb=self._notice)
        try:
            self._reconnects = self._nc.stats["reconnects"]
            await self.resync()
        except BaseException:
            await self.stop()
            raise
        self._sync_task = asyncio.create_task(self._keep_in_sync())

    async def stop(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
            self._sync_task = None
        if self._sub is not None:
            with contextlib.suppress(Exception):  # a closed connection has no subscription left
                await self._sub.unsubscribe()
            self._sub = None

    async def resync(self) -> None:
        """Read every task's current prompt again."""
        info = await self._js.stream_info(PROMPTS_STREAM, subjects_filter=PROMPT_SUBJECTS)
        tasks = [subject.removeprefix(KEY_PREFIX) for subject in info.state.subjects or {}]
        for task in tasks:
            await self.refresh(task)
        for gone in set(self._versions) - set(tasks):  # purged with its history
            self._apply(gone, None)
        self._last_seq = info.state.last_seq

    async def refresh(self, task: str, *, at_least: int | None = None) -> None:
        """Read ``task``'s current prompt. ``at_least``: the version a notice announced, so a
        read from a replica that has not stored it yet is repeated (a moment apart,
        ``NOTICE_TRIES`` times); then the last read stands and the next check catches up."""
        for attempt in range(NOTICE_TRIES):
            try:
                stored = await read_current(self._js, task)
            except ValidationError as exc:  # keep serving the last good version
                log.error("prompt %s: the stored version is malformed: %s", task, exc)
                return
            if at_least is None or stored is None or stored.version >= at_least:
                break
            if attempt < NOTICE_TRIES - 1:
                await asyncio.sleep(NOTICE_WAIT_S)
        self._apply(task, stored)

    def _apply(self, task: str, stored: PromptVersion | None) -> None:
        known = self._versions.get(task)
        if stored is None:
            if known is not None:
                del self._versions[task]
                self._on_version(task, None)
            return
        if known is not None and stored.version <= known:
            return
        self._versions[task] = stored.version
        log.info("prompt %s is now version %s", task, stored.version)
        self._on_version(task, stored)

    async def _notice(self, msg: Msg) -> None:
        """A write was stored: read the key again (the notice itself is only a hint)."""
        task = msg.subject.removeprefix(PROMPT_NOTICE_PREFIX)
        sequence = (msg.headers or {}).get("Nats-Sequence", "")
        try:
            await self.refresh(task, at_least=int(sequence) if sequence.isdigit() else None)
        except Exception as exc:  # the next check reads it again
            log.warning("prompt %s changed but could not be read: %r", task, exc)

    async def _keep_in_sync(self) -> None:
        """After a reconnect, read everything again at once; otherwise every ``resync_s``, read
        again if the stream's last sequence moved (a notice was missed)."""
        loop = asyncio.get_running_loop()
        checked = loop.time()
        while True:
            await asyncio.sleep(RECONNECT_CHECK_S)
            reconnects = self._nc.stats["reconnects"]
            due = loop.time() - checked >= self._resync_s
            if reconnects == self._reconnects and not due:
                continue
            try:
                if reconnects != self._reconnects:
                    await self.resync()
                else:
                    info = await self._js.stream_info(PROMPTS_STREAM)
                    if info.state.last_seq != self._last_seq:
                        await self.resync()
                self._reconnects = reconnects
                checked = loop.time()
            except Exception as exc:  # disconnected: serve what we have, try again later
                log.warning("cannot check the prompt store: %r", exc)
                checked = loop.time()


class PromptReader:
    """A live, read-only view of the current prompt of every task (:class:`PromptFollower`)."""

    def __init__(self, nc: Client) -> None:
        self._current: dict[str, PromptVersion] = {}
        self._follower = PromptFollower(nc, self._on_version)

    def _on_version(self, task: str, stored: PromptVersion | None) -> None:
        if stored is None:
            self._current.pop(task, None)
        else:
            self._current[task] = stored

    async def start(self) -> None:
        await asyncio.wait_for(self._follower.start(), timeout=10)

    async def stop(self) -> None:
        await self._follower.stop()

    def current(self, task: str) -> PromptVersion | None:
        return self._current.get(task)

    async def wait_for_version(self, task: str, version: int, timeout: float = 10.0) -> None:
        """Block until ``version`` (or a later one) is seen; reads the store while waiting."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (seen := self._current.get(task)) is None or seen.version < version:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"prompt {task!r} version {version} not seen after {timeout}s")
            await self._follower.refresh(task)
            await asyncio.sleep(0.02)


class PromptWriter:
    """The write side. Only the gatekeeper's NATS user may publish to the bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def connect(cls, js: JetStreamContext) -> PromptWriter:
        return cls(await js.key_value(PROMPTS_BUCKET))

    async def seed(self, task: str, record: PromptRecord) -> bool:
        """Write the first version of a task's prompt; False if the task already has one."""
        try:
            await self._kv.create(task, record.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def write(self, task: str, record: PromptRecord, *, base_version: int) -> int:
        """Write a new version only if ``base_version`` is still current; returns the new one."""
        try:
            return await self._kv.update(task, record.model_dump_json().encode(), last=base_version)
        except KeyWrongLastSequenceError as exc:
            raise StaleVersionError(
                f"prompt for {task!r} is no longer version {base_version}"
            ) from exc


async def read_current(js: JetStreamContext, task: str) -> PromptVersion | None:
    """One read of a task's current prompt (a direct get: no consumer); None if it has none."""
    subject = KEY_PREFIX + task
    try:
        msg = await js.get_msg(PROMPTS_STREAM, subject=subject, direct=True)
    except NotFoundError:
        return None
    if msg.subject != subject:  # a task name is never a wildcard; refuse one that acts as such
        return None
    return _stored_version(task, msg)


async def read_history(js: JetStreamContext, task: str) -> list[PromptVersion]:
    """Every stored version of a task's prompt, oldest first (one message get per version: the
    bucket keeps at most ``PROMPT_HISTORY`` of them)."""
    subject = KEY_PREFIX + task
    versions: list[PromptVersion] = []
    seq = 1
    for _ in range(PROMPT_HISTORY + 1):
        try:
            msg = await js.get_msg(PROMPTS_STREAM, seq=seq, subject=subject, next=True)
        except NotFoundError:
            break
        if msg.subject != subject or msg.seq is None:
            break
        stored = _stored_version(task, msg)
        if stored is not None:
            versions.append(stored)
        seq = msg.seq + 1
    return versions


async def list_tasks(js: JetStreamContext) -> list[str]:
    """The tasks that have a prompt (from the bucket's stream info: no consumer)."""
    info = await js.stream_info(PROMPTS_STREAM, subjects_filter=PROMPT_SUBJECTS)
    tasks = [subject.removeprefix(KEY_PREFIX) for subject in info.state.subjects or {}]
    return sorted([task for task in tasks if await read_current(js, task) is not None])


def _stored_version(task: str, msg: RawStreamMsg) -> PromptVersion | None:
    """The version a stored message holds; None for a deletion marker."""
    headers = msg.headers or {}
    if headers.get("KV-Operation") in (KV_DEL, KV_PURGE) or not msg.data or msg.seq is None:
        return None
    return PromptVersion(
        task=task,
        version=msg.seq,
        record=PromptRecord.model_validate_json(msg.data),
        created=msg.time,
    )
