"""The SDK's client: the served task prompts and the reported runs of one instrumented app.

Everything an app calls on a request's path is cheap and never waits on the network:
:meth:`Ratchet.prompt` reads a version composed ahead of time (microseconds), and
:meth:`Ratchet.report` validates the run, cuts it to the limits and puts it on a bounded queue.
Background tasks do the rest: a prompt follower (:class:`ratchet.prompts.PromptFollower`) keeps
the prompts current, and senders publish the queued runs to JetStream and wait for each ack,
retrying with bounded backoff while NATS is away. The connection reconnects forever. Nothing
queued is lost while the process lives; a full queue refuses new reports, and says how many
(:attr:`Stats.dropped`, and a log line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from pydantic_settings import BaseSettings, SettingsConfigDict

from ratchet.contracts import Check, RunReported, TokenUsage, TraceStep, new_id
from ratchet.jetstream import app_user, inbox_prefix, publish_js
from ratchet.prompts import PromptFollower, PromptVersion
from ratchet.rules import load_rules
from ratchet.sdk.report import Expected, ReportError, Trace, build_report
from ratchet.sdk.served import Prompt, PromptCache
from ratchet.settings import Settings

if TYPE_CHECKING:
    from ratchet.sdk.langchain import RatchetTracer

log = logging.getLogger("ratchet.sdk")

MAX_QUEUE = 10_000  # reports waiting for NATS, at most ~100 KB each at every limit
SENDERS = 16  # publishes in flight at once
ACK_TIMEOUT_S = 5.0
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 5.0
RECONNECT_WAIT_S = 1.0
LOG_EVERY_S = 30.0  # a repeated warning (a full queue, a refused publish) is logged this often


class RatchetUnavailable(ConnectionError):
    """NATS did not serve the prompts in time and no cache file held any: the app has no
    prompt to serve yet."""


@dataclass(frozen=True)
class Stats:
    """What became of the runs reported so far."""

    reported: int  # accepted by report()
    published: int  # acknowledged by JetStream (a retried duplicate is stored once)
    dropped: int  # refused because the queue was full
    pending: int  # queued or being published
    retries: int  # publishes retried (no ack in time, NATS away)


class AppSettings(BaseSettings):
    """How :meth:`Ratchet.from_env` finds the app: ``RATCHET_APP_NAME``,
    ``RATCHET_APP_PASSWORD`` (else the one ``ratchet up`` wrote for ``app-<name>`` in
    ``<RATCHET_HOME>/nats/credentials.json``) and ``RATCHET_APP_CACHE`` (a prompt cache file).
    The server list (``RATCHET_NATS_URL``, comma-separated for a cluster), the home and the
    rules file are Ratchet's own settings."""

    model_config = SettingsConfigDict(env_prefix="RATCHET_APP_", env_file=".env", extra="ignore")

    name: str | None = None
    password: str | None = None
    cache: Path | None = None


class Ratchet:
    """One app's connection to Ratchet. Make it with :meth:`connect` or :meth:`from_env`, in
    the event loop the app runs in; :meth:`report` may also be called from other threads."""

    def __init__(
        self,
        *,
        app: str,
        servers: Sequence[str],
        user: str,
        password: str | None,
        cache: PromptCache,
        cache_path: Path | None = None,
        max_queue: int = MAX_QUEUE,
        senders: int = SENDERS,
        ack_timeout: float = ACK_TIMEOUT_S,
    ) -> None:
        app_user(app)  # a name that is no app name fails here, in one line
        self.app = app
        self.subject = RunReported.subject_of(app)
        self._servers = list(servers)
        self._user = user
        self._password = password
        self._cache = cache
        self._cache_path = cache_path
        self._max_queue = max_queue
        self._senders = senders
        self._ack_timeout = ack_timeout
        self._queue: asyncio.Queue[RunReported] = asyncio.Queue()
        self._pending = self._reported = self._published = self._dropped = self._retries = 0
        self._count = threading.Lock()  # report() may run on other threads (sync LangChain)
        self._connected = asyncio.Event()
        self._prompts_ready = asyncio.Event()
        self._prompt_arrived = asyncio.Event()  # replaced by a fresh one at each arrival
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._follower: PromptFollower | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._closed = False
        self._last_error = ""
        self._logged: dict[str, float] = {}

    # --- making one -----------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        servers: str | Sequence[str] = ("nats://127.0.0.1:4222",),
        *,
        app: str,
        user: str | None = None,
        password: str | None = None,
        rules_path: Path | str | None = None,
        cache_path: Path | str | None = None,
        timeout: float = 10.0,
        max_queue: int = MAX_QUEUE,
        senders: int = SENDERS,
    ) -> Ratchet:
        """Connect as ``user`` (default ``app-<app>``, the user ``ratchet up`` makes for each
        name in ``RATCHET_APPS``) to every server given (a cluster), and wait up to ``timeout``
        seconds for the prompts. ``rules_path``: the pinned rules to compose with (default:
        Ratchet's setting, ``RATCHET_RULES_PATH``). ``cache_path``: a file that keeps the last
        prompts seen, so that a restarted app starts while NATS is down; without one, an
        unreachable NATS is :class:`RatchetUnavailable`."""
        rules = load_rules(Path(rules_path) if rules_path else Settings().rules_path)
        client = cls(
            app=app,
            servers=[servers] if isinstance(servers, str) else servers,
            user=user or app_user(app),
            password=password,
            cache=PromptCache(rules),
            cache_path=Path(cache_path) if cache_path else None,
            max_queue=max_queue,
            senders=senders,
        )
        await client._start(timeout)
        return client

    @classmethod
    async def from_env(cls, app: str | None = None, **options: Any) -> Ratchet:
        """:meth:`connect` configured by the environment (see :class:`AppSettings`), as a
        process next to ``ratchet up`` finds it."""
        settings, own = Settings(), AppSettings()
        name = app or own.name or (settings.apps[0] if len(settings.apps) == 1 else None)
        if name is None:
            raise ValueError("name the app: RATCHET_APP_NAME, or Ratchet.from_env(app=...)")
        user = app_user(name)
        password = own.password or _password_from(settings.home, user)
        servers = [url.strip() for url in settings.nats_url.split(",") if url.strip()]
        options.setdefault("rules_path", settings.rules_path)
        options.setdefault("cache_path", own.cache)
        return await cls.connect(servers, app=name, user=user, password=password, **options)

    async def _start(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        cached = self._cache_path is not None and self._cache_path.exists()
        if cached and self._cache_path is not None:
            self._cache.load(self._cache_path)
        self._tasks = [asyncio.create_task(self._connection())]
        self._tasks += [asyncio.create_task(self._send()) for _ in range(self._senders)]
        try:
            await asyncio.wait_for(self._prompts_ready.wait(), timeout)
        except TimeoutError:
            why = self._last_error or "no answer"
            if not cached:
                await self.close(timeout=0)
                raise RatchetUnavailable(
                    f"NATS at {', '.join(self._servers)} served no prompts within {timeout:g}s "
                    f"({why}): is Ratchet up? A cache_path lets an app start without it"
                ) from None
            log.warning(
                "NATS unreachable (%s): serving the prompts of %s until it answers",
                why,
                self._cache_path,
            )

    # --- prompts --------------------------------------------------------------------------------

    def prompt(self, task: str, key: str | None = None) -> Prompt:
        """The prompt a live run of ``task`` gets now, composed with the pinned rules. ``key``
        (a user, a conversation): while a change is in canary, one key always gets the same
        version, exactly as in the executor. Never waits: while NATS is unreachable this is
        the last version seen."""
        return self._cache.prompt(task, key)

    async def wait_for_version(self, task: str, version: int, timeout: float = 10.0) -> Prompt:
        """Wait until ``task``'s stored version is ``version`` or later (a rollout step, a
        test); :class:`TimeoutError` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while self._cache.stored_version(task) < version:
                await self._prompt_arrived.wait()
        return self._cache.prompt(task)

    async def _connection(self) -> None:
        """Connect (forever, whatever the server says), then follow the prompt bucket."""
        nc = await nats.connect(
            servers=self._servers,
            name=f"ratchet-sdk-{self.app}",
            user=self._user,
            password=self._password,
            inbox_prefix=inbox_prefix(self._user),
            connect_timeout=2,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT_S,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        self._nc, self._js = nc, nc.jetstream()
        self._connected.set()
        await self._follow_prompts(nc)

    async def _follow_prompts(self, nc: Client) -> None:
        """Follow the prompt bucket (:class:`PromptFollower`); until the first snapshot is read
        (not connected yet, no bucket yet), keep trying. Once it runs, it reads whatever
        changed while the connection was down as soon as it is back."""
        delay = RETRY_FIRST_S
        while True:
            follower = PromptFollower(nc, self._apply)
            try:
                await follower.start()
            except Exception as exc:  # not connected yet, no bucket yet, a timeout
                self._last_error = f"cannot read the prompts: {exc!r}"
                self._note("watch", self._last_error)
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)
                continue
            self._follower = follower
            self._prompts_ready.set()
            self._save()
            return

    def _apply(self, task: str, stored: PromptVersion | None) -> None:
        if stored is None:
            self._cache.remove(task)
        else:
            try:
                self._cache.update(stored)
            except ValueError as exc:  # keep serving the last good one
                log.error("prompt %s version %s is malformed: %s", task, stored.version, exc)
                return
        arrived, self._prompt_arrived = self._prompt_arrived, asyncio.Event()
        arrived.set()
        if self._prompts_ready.is_set():
            self._save()

    def _save(self) -> None:
        if self._cache_path is None:
            return
        try:
            self._cache.save(self._cache_path)
        except OSError as exc:
            self._note("cache", f"cannot write the prompt cache {self._cache_path}: {exc}")

    # --- reports --------------------------------------------------------------------------------

    def report(
        self,
        *,
        task: str,
        input: str,
        output: str,
        prompt: Prompt | None = None,
        trace: Trace | Iterable[TraceStep | Mapping[str, Any]] = (),
        usage: TokenUsage | Mapping[str, int] | None = None,
        latency_ms: float = 0.0,
        check: Check | Mapping[str, Any] | None = None,
        expected: Expected | None = None,
        run_id: str | None = None,
        rollout_key: str | None = None,
        model: str = "unknown",
        error: str | None = None,
    ) -> RunReported | None:
        """Report one finished run; returns its event, or None if the queue was full (counted
        in :attr:`Stats.dropped`). Never waits on NATS.

        ``prompt``: what the run was served (:meth:`prompt`); without it, what ``rollout_key``
        (else the run id) is served now, which while the task is in canary needs the key the
        run was served with (without either, a :class:`ratchet.sdk.report.ReportError`).
        ``check`` or ``expected`` (a shorthand, see :func:`ratchet.sdk.report.as_check`) score
        the run exactly; without either the judge may. ``run_id`` (default: a new one) names
        the run: reporting it again is harmless, JetStream keeps one. Texts over their limits
        are cut and named in ``truncated``; anything else invalid is a
        :class:`ratchet.sdk.report.ReportError`.
        """
        if self._closed:
            raise RuntimeError("this Ratchet client is closed")
        self._served_known(task, prompt, rollout_key)
        run_id = run_id or new_id()
        event = build_report(
            self.app,
            task=task,
            input=input,
            output=output,
            prompt=self._cache.prompt(task, rollout_key or run_id) if prompt is None else prompt,
            trace=trace,
            usage=usage,
            latency_ms=latency_ms,
            check=check,
            expected=expected,
            run_id=run_id,
            model=model,
            error=error,
        )
        with self._count:
            full = self._pending >= self._max_queue
            if full:
                self._dropped += 1
            else:
                self._pending += 1
                self._reported += 1
        if full:
            self._note(
                "dropped",
                f"dropped {self._dropped} reports so far: {self._max_queue} are waiting for "
                f"NATS ({self._last_error or 'no ack yet'})",
            )
            return None
        if threading.get_ident() == self._thread or self._loop is None:
            self._queue.put_nowait(event)
        else:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        return event

    async def _send(self) -> None:
        """One sender: takes a queued report and publishes it until JetStream acknowledges."""
        while True:
            event = await self._queue.get()
            try:
                await self._deliver(event)
            finally:
                with self._count:
                    self._pending -= 1
                self._queue.task_done()

    async def _deliver(self, event: RunReported) -> None:
        delay = RETRY_FIRST_S
        while True:
            await self._connected.wait()
            assert self._js is not None
            try:
                await publish_js(self._js, event, subject=self.subject, timeout=self._ack_timeout)
            except Exception as exc:  # no ack in time, disconnected, a stream that refuses
                self._retries += 1
                self._last_error = f"publish failed: {exc!r}"
                self._note("publish", f"report of run {event.run_id} not acknowledged: {exc!r}")
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)
                continue
            self._published += 1
            return

    @property
    def stats(self) -> Stats:
        return Stats(
            reported=self._reported,
            published=self._published,
            dropped=self._dropped,
            pending=self._pending,
            retries=self._retries,
        )

    async def flush(self, timeout: float = 10.0) -> int:
        """Wait until every queued report is acknowledged, at most ``timeout`` seconds; returns
        how many are still pending."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)
        return self._pending

    async def close(self, timeout: float = 10.0) -> int:
        """Deliver what is queued (at most ``timeout`` seconds), then disconnect. Returns how
        many reports were not delivered: those are lost, and the log says how many."""
        if self._closed:
            return self._pending
        self._closed = True
        left = await self.flush(timeout) if timeout > 0 else self._pending
        await asyncio.gather(*(_stop(task) for task in self._tasks))
        if self._follower is not None:
            await self._follower.stop()
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):  # a connection already lost has nothing to say
                await self._nc.close()
        self._save()
        if left:
            log.error("%d reports were not delivered within %gs and are lost", left, timeout)
        return left

    async def __aenter__(self) -> Ratchet:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- LangChain ------------------------------------------------------------------------------

    def tracer(
        self,
        *,
        task: str,
        prompt: Prompt | None = None,
        key: str | None = None,
        check: Check | Mapping[str, Any] | None = None,
        expected: Expected | None = None,
        input: str | None = None,
        run_id: str | None = None,
        model: str | None = None,
    ) -> RatchetTracer:
        """A LangChain callback handler that reports one invocation (a LangGraph graph, any
        runnable) when it ends: ``graph.ainvoke(inputs, config={"callbacks": [tracer]})``.
        Needs ``langchain-core`` (``pip install 'ratchet[langchain]'``); see
        :class:`ratchet.sdk.langchain.RatchetTracer`."""
        from ratchet.sdk.langchain import RatchetTracer

        self._served_known(task, prompt, key)
        return RatchetTracer(
            self,
            task=task,
            prompt=self.prompt(task, key) if prompt is None else prompt,
            check=check,
            expected=expected,
            input=input,
            run_id=run_id,
            model=model,
        )

    def _served_known(self, task: str, prompt: Prompt | None, key: str | None) -> None:
        """While ``task`` is in canary a report must say what its run was served: a fresh draw
        here could name the other version, and the canary would count the run for the wrong
        arm."""
        if prompt is None and key is None and self._cache.in_canary(task):
            raise ReportError(
                f"task {task!r} is in canary: pass prompt= (what the run was served) or the "
                "rollout key it was served with"
            )

    # --- connection events ----------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = f"nats: {exc}"
        self._note(f"error:{exc}", self._last_error)

    async def _on_disconnected(self) -> None:
        if not self._closed:
            log.warning("disconnected from NATS: serving the last prompts seen, queueing reports")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS")  # the prompt follower reads what changed meanwhile

    def _note(self, kind: str, message: str) -> None:
        """A warning, at most once per ``LOG_EVERY_S`` of each kind (a server down for an hour
        is a few lines, not one per retry)."""
        now = time.monotonic()
        if now - self._logged.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S:
            if len(self._logged) > 64:
                self._logged.clear()
            self._logged[kind] = now
            log.warning("%s", message)


async def _stop(task: asyncio.Task[None], tries: int = 50) -> None:
    """Cancel ``task`` and wait for it to end. nats-py's connect loop can swallow a cancellation
    (it waits on its own tasks with ``except CancelledError: pass``), so cancel again until the
    task ends, at most ``tries`` times 0.1 s."""
    for _ in range(tries):
        task.cancel()
        done, _pending = await asyncio.wait({task}, timeout=0.1)
        if done:
            return
    log.error("a background task did not stop: %r", task)


def _password_from(home: Path, user: str) -> str:
    """The password ``ratchet up`` wrote for ``user`` in ``<home>/nats/credentials.json``."""
    path = home / "nats" / "credentials.json"
    try:
        passwords = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"no password for NATS user {user}: set RATCHET_APP_PASSWORD, or RATCHET_HOME to "
            f"where `ratchet up` runs ({path}: {exc})"
        ) from None
    password = passwords.get(user) if isinstance(passwords, dict) else None
    if not isinstance(password, str):
        raise ValueError(
            f"{path} has no password for {user}: add the app to RATCHET_APPS and restart "
            "`ratchet up`"
        )
    return password
