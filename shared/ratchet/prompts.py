"""The prompt store: task prompts in a JetStream key-value bucket, one key per task.

The bucket keeps history, so every version stays readable and the KV revision is the version
number. Everyone reads (:class:`PromptReader` watches the bucket so a new version takes effect
without a restart); only the gatekeeper writes (:class:`PromptWriter`), and the NATS server
refuses a write from any other user.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from datetime import UTC, datetime
from typing import Literal, NamedTuple, Protocol

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import BaseModel, ConfigDict, Field

from ratchet.jetstream import PROMPTS_BUCKET

log = logging.getLogger("ratchet.prompts")

DEFAULT_PROMPT = "Complete the user's task."


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


class PromptReader:
    """A live, read-only view of the current prompt of every task."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._current: dict[str, PromptVersion] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        kv = await self._js.key_value(PROMPTS_BUCKET)
        watcher = await kv.watchall()
        self._watch_task = asyncio.create_task(self._follow(watcher))
        await asyncio.wait_for(self._ready.wait(), timeout=10)

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is None:  # the initial values have all arrived
                    self._ready.set()
                    continue
                if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                    self._current.pop(entry.key, None)
                    continue
                self._current[entry.key] = entry_version(entry)
                log.info("prompt %s is now version %s", entry.key, entry.revision)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    def current(self, task: str) -> PromptVersion | None:
        return self._current.get(task)

    async def wait_for_version(self, task: str, version: int, timeout: float = 10.0) -> None:
        """Block until the watch has delivered ``version`` (a write is seen a moment later)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (seen := self._current.get(task)) is None or seen.version < version:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"prompt {task!r} version {version} not seen after {timeout}s")
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
    """One-off read of a task's current prompt (no watch)."""
    kv = await js.key_value(PROMPTS_BUCKET)
    try:
        entry = await kv.get(task)
    except KeyNotFoundError:
        return None
    return entry_version(entry)


async def read_history(js: JetStreamContext, task: str) -> list[PromptVersion]:
    """Every stored version of a task's prompt, oldest first."""
    kv = await js.key_value(PROMPTS_BUCKET)
    try:
        entries = await kv.history(task)
    except (NoKeysError, NatsTimeoutError):
        return []
    return [entry_version(e) for e in entries if e.value and e.operation not in (KV_DEL, KV_PURGE)]


def entry_version(entry: KeyValue.Entry) -> PromptVersion:
    """The version a prompt-store entry holds (every reader parses entries this way)."""
    assert entry.value is not None and entry.revision is not None
    created = (
        datetime.fromtimestamp(entry.created / 1e9, UTC) if isinstance(entry.created, int) else None
    )
    return PromptVersion(
        task=entry.key,
        version=entry.revision,
        record=PromptRecord.model_validate_json(entry.value),
        created=created,
    )
