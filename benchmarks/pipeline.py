"""What the service layer costs: runs through executor, evaluator and failure store, timed.

Two sides run in one invocation on one nats-server, one after the other:

- ``services``: the real executor, evaluator and failure-store processes (``ratchet.cli.up``), as
  deployed: FastStream apps, per-service NATS users, the dead-letter middleware.
- ``raw``: the same three hops hand-written with nats-py, one process each, doing the same work
  per run (``Executor.execute`` with the default LangGraph agent, ``score_run``,
  ``FailureRecorder`` on a SQLite store) on a separate stream (``bench.>`` subjects).

Each side gets warm-up runs, then ``--runs`` runs with at most ``--window`` in flight (throughput
and latency under load), then ``--serial`` runs one at a time (latency without queueing). A run
counts as stored when its row in the store's SQLite file holds both the completed run and its
score; the driver polls the file (WAL readers never block the writer), so the measured path does
no extra work. Latency is first-seen-stored minus publish time, rounded up by at most one poll.

    .venv/bin/python benchmarks/pipeline.py --runs 2000 [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, StorageType, StreamConfig

from ratchet.cli.up import Stack, start_stack
from ratchet.contracts import Event, FailureLogged, RunCompleted, RunRequested, RunScored
from ratchet.messaging import DUPLICATE_WINDOW_S, EVENTS_STREAM, connect, publish_js
from ratchet.models import make_chat_model, model_label
from ratchet.natsproc import LocalNats, free_port
from ratchet.prompts import PromptReader
from ratchet.rules import load_rules
from ratchet.services import SERVICES
from ratchet.settings import ModelSettings, Settings, to_env
from ratchet.store import open_store
from ratchet.suites import load_suites
from ratchet.tools import get_tools
from ratchet_evaluator.judge import Judge
from ratchet_evaluator.scoring import score_run
from ratchet_executor.agent import Executor, load_agent_factory
from ratchet_failure_store.recorder import FailureRecorder

log = logging.getLogger("ratchet.benchmark")

PIPELINE = tuple(s for s in SERVICES if s.name in ("executor", "evaluator", "failure-store"))
RAW_STREAM = "BENCH_RAW"
RAW_PREFIX = "bench"
RAW_HOPS = ("executor", "evaluator", "store")
RAW_DURABLES = ("raw-executor", "raw-evaluator", "raw-store-completed", "raw-store-scored")
POLL_S = 0.002
SUITE = "answer-only"


def raw_subject(event: type[Event]) -> str:
    return f"{RAW_PREFIX}.{event.subject}"


# --- the raw side: three hand-written hops ------------------------------------------------------


async def raw_publish(js: JetStreamContext, event: Event) -> None:
    """Same guarantees as ``ratchet.messaging.publish``: acked by the stream, deduplicated."""
    await publish_js(js, event, subject=raw_subject(type(event)), stream=RAW_STREAM)


async def raw_serve(
    js: JetStreamContext,
    event: type[Event],
    durable: str,
    settings: Settings,
    handle: Callable[[Msg], Awaitable[None]],
) -> None:
    """A durable pull consumer handling ``settings.workers`` messages at once, acked after the
    handler returns and nacked with a delay if it raised, like the services' subscribers."""
    sub = await js.pull_subscribe(
        raw_subject(event),
        durable=durable,
        stream=RAW_STREAM,
        config=ConsumerConfig(
            ack_wait=settings.ack_wait_s,
            max_deliver=settings.max_deliver,
            max_ack_pending=max(64, settings.workers * 8),
        ),
    )
    slots = asyncio.Semaphore(settings.workers)
    running: set[asyncio.Task[None]] = set()

    async def one(msg: Msg) -> None:
        try:
            await handle(msg)
        except Exception:
            log.exception("raw %s failed", durable)
            await msg.nak(delay=1.0)
        else:
            await msg.ack()
        finally:
            slots.release()

    while True:
        try:
            batch = await sub.fetch(batch=settings.workers, timeout=1.0)
        except TimeoutError:  # nats-py raises both its own and the bare asyncio one
            continue
        for msg in batch:
            await slots.acquire()
            task = asyncio.create_task(one(msg))
            running.add(task)
            task.add_done_callback(running.discard)


async def raw_executor(settings: Settings, nc: Client) -> None:
    js = nc.jetstream()
    prompts = PromptReader(nc)
    await prompts.start()
    model = make_chat_model(settings.agent, local_port=settings.local_model_port)
    factory = load_agent_factory(settings.agent_factory)
    agent = factory(model, get_tools(settings.agent_tools), settings.agent_max_steps)
    executor = Executor(
        agent,
        model_label=model_label(settings.agent),
        rules=load_rules(settings.rules_path),
        prompts=prompts,
    )

    async def handle(msg: Msg) -> None:
        await raw_publish(js, await executor.execute(RunRequested.model_validate_json(msg.data)))

    await raw_serve(js, RunRequested, "raw-executor", settings, handle)


async def raw_evaluator(settings: Settings, nc: Client) -> None:
    js = nc.jetstream()
    judge = Judge(
        make_chat_model(settings.judge, local_port=settings.local_model_port),
        label=model_label(settings.judge),
        attempts=settings.judge_attempts,
    )

    async def handle(msg: Msg) -> None:
        await raw_publish(js, await score_run(RunCompleted.model_validate_json(msg.data), judge))

    await raw_serve(js, RunCompleted, "raw-evaluator", settings, handle)


async def raw_store(settings: Settings, nc: Client) -> None:
    js = nc.jetstream()
    recorder = FailureRecorder(
        open_store(settings.resolved_store_url()), threshold=settings.failure_threshold
    )

    async def publish_if_failure(event: FailureLogged | None) -> None:
        if event is not None:
            await raw_publish(js, event)

    async def on_completed(msg: Msg) -> None:
        await publish_if_failure(
            await recorder.on_completed(RunCompleted.model_validate_json(msg.data))
        )

    async def on_scored(msg: Msg) -> None:
        await publish_if_failure(await recorder.on_scored(RunScored.model_validate_json(msg.data)))

    await asyncio.gather(
        raw_serve(js, RunCompleted, "raw-store-completed", settings, on_completed),
        raw_serve(js, RunScored, "raw-store-scored", settings, on_scored),
    )


async def run_raw_hop(hop: str) -> None:
    """Entry point of one raw hop process; settings come from the environment, as for services."""
    settings = Settings()
    nc = await connect(settings, name=f"raw-{hop}")
    hops = {"executor": raw_executor, "evaluator": raw_evaluator, "store": raw_store}
    await hops[hop](settings, nc)


# --- the driver ---------------------------------------------------------------------------------


class StoredPoller:
    """Reports runs whose row holds both events, reading only rows above a done watermark.

    Rows get contiguous rowids in insertion order and are never deleted, so every row at or below
    the watermark is done and each poll only reads the few rows still in flight.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db: sqlite3.Connection | None = None
        self.watermark = 0
        self.done_above: set[int] = set()

    def poll(self) -> list[str]:
        if self.db is None:
            if not self.path.exists():
                return []
            self.db = sqlite3.connect(self.path, isolation_level=None)
        try:
            rows = self.db.execute(
                "SELECT rowid, run_id FROM runs WHERE rowid > ? "
                "AND completed IS NOT NULL AND scored IS NOT NULL",
                (self.watermark,),
            ).fetchall()
        except sqlite3.OperationalError:  # the table is not created yet
            return []
        fresh = [run_id for rowid, run_id in rows if rowid not in self.done_above]
        self.done_above.update(rowid for rowid, _ in rows)
        while self.watermark + 1 in self.done_above:
            self.watermark += 1
            self.done_above.discard(self.watermark)
        return fresh

    def count_scored(self) -> int:
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM runs WHERE completed IS NOT NULL AND scored IS NOT NULL"
            ).fetchone()
        return int(count)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


@dataclass
class Phase:
    runs: int
    window: int
    seconds: float
    runs_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float


async def drive(
    js: JetStreamContext,
    subject: str,
    stream: str,
    poller: StoredPoller,
    requests: list[RunRequested],
    window: int,
    timeout: float,
) -> Phase:
    """Publish ``requests`` keeping at most ``window`` unstored; time each until stored."""
    published: dict[str, float] = {}
    latencies: list[float] = []
    slots = asyncio.Semaphore(window)
    finished = asyncio.Event()
    acks: set[asyncio.Task[Any]] = set()

    async def watch() -> None:
        while len(latencies) < len(requests):
            await asyncio.sleep(POLL_S)
            now = time.perf_counter()
            for run_id in poller.poll():
                sent = published.pop(run_id, None)
                if sent is not None:
                    latencies.append(now - sent)
                    slots.release()
        finished.set()

    watcher = asyncio.create_task(watch())
    began = time.perf_counter()
    try:
        for request in requests:
            await asyncio.wait_for(slots.acquire(), timeout)
            published[request.run_id] = time.perf_counter()
            ack = asyncio.create_task(publish_js(js, request, subject=subject, stream=stream))
            acks.add(ack)
            ack.add_done_callback(acks.discard)
        await asyncio.wait_for(finished.wait(), timeout)
        await asyncio.gather(*acks)
    finally:
        watcher.cancel()
    seconds = time.perf_counter() - began
    ordered = sorted(latencies)
    return Phase(
        runs=len(requests),
        window=window,
        seconds=seconds,
        runs_per_s=len(requests) / seconds,
        p50_ms=statistics.median(ordered) * 1000,
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        max_ms=ordered[-1] * 1000,
    )


def demo_requests(settings: Settings) -> Iterator[RunRequested]:
    """The demo suite's cases, round and round: with the default prompt most fail and some pass,
    so both the failure path (record + ``failure.logged``) and the plain store path are taken."""
    suite = load_suites(settings.suites_dir)[SUITE]
    for case in itertools.cycle([*suite.learn, *suite.gate]):
        yield RunRequested(task=suite.name, input=case.input, check=case.check)


@dataclass
class Side:
    subject: str
    stream: str
    poller: StoredPoller
    processes: dict[str, int]  # label -> pid, whose CPU time is charged to this side
    published: int = 0


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) of each process, and of the whole machine as ``"machine"``."""
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for label, pid in pids.items():
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            used[label] = (int(fields[11]) + int(fields[12])) / tick
    with contextlib.suppress(OSError):
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
        )
        used["machine"] = (user + nice + system + irq + softirq + steal) / tick
    return used


async def measure(
    side: Side, nc: Client, args: argparse.Namespace, settings: Settings
) -> dict[str, Any]:
    """Warm up, then the loaded phase (with the CPU each process spent per run), then serial."""
    js = nc.jetstream()
    cases = demo_requests(settings)

    async def phase(runs: int, window: int) -> Phase:
        side.published += runs
        batch = [next(cases) for _ in range(runs)]
        return await drive(js, side.subject, side.stream, side.poller, batch, window, args.timeout)

    await phase(args.warmup, args.window)
    before = cpu_seconds(side.processes)
    loaded = await phase(args.runs, args.window)
    after = cpu_seconds(side.processes)
    spent = {label: after[label] - before[label] for label in after if label in before}
    machine_busy = spent.pop("machine", float("nan"))
    ours = sum(spent.values())
    serial = await phase(args.serial, 1)
    return {
        "loaded": asdict(loaded),
        "serial": asdict(serial),
        "cpu_ms_per_run": {label: s * 1000 / args.runs for label, s in spent.items()},
        "cpu_ms_per_run_total": ours * 1000 / args.runs,
        "other_load_cores": max(0.0, machine_busy - ours) / loaded.seconds,
    }


def start_raw_hops(settings: Settings, nats_server: LocalNats) -> list[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        **to_env(settings.model_copy(update={"store_url": raw_store_url(settings)})),
        **nats_server.env_for("admin"),
    }
    logs = settings.home / "logs"
    return [
        subprocess.Popen(
            [sys.executable, __file__, "--hop", hop],
            env=env,
            stdout=open(logs / f"raw-{hop}.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        for hop in RAW_HOPS
    ]


def raw_store_url(settings: Settings) -> str:
    return f"sqlite:///{settings.home / 'raw.db'}"


async def create_raw_stream(js: JetStreamContext) -> None:
    await js.add_stream(
        StreamConfig(
            name=RAW_STREAM,
            subjects=[f"{RAW_PREFIX}.>"],
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
        )
    )


async def wait_for_raw_consumers(
    js: JetStreamContext, hops: list[subprocess.Popen[bytes]], timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    for durable in RAW_DURABLES:
        while True:
            if any(hop.poll() is not None for hop in hops):
                raise RuntimeError("a raw hop exited during start-up; see its log")
            try:
                await js.consumer_info(RAW_STREAM, durable)
                break
            except nats.js.errors.NotFoundError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"raw consumer {durable} never appeared") from None
                await asyncio.sleep(0.1)


async def benchmark(
    args: argparse.Namespace, settings: Settings, stack: Stack, hops: list[subprocess.Popen[bytes]]
) -> dict[str, list[dict[str, Any]]]:
    """Every round runs each side in ``args.order``; returns each side's rounds."""
    assert stack.nats is not None
    admin = await connect(stack.nats.settings_for("admin", settings), name="bench-admin")
    client = await connect(stack.nats.settings_for("client", settings), name="bench-client")
    shared = {"nats-server": stack.nats.process.pid, "driver": os.getpid()}
    sides = {
        "services": Side(
            RunRequested.subject,
            EVENTS_STREAM,
            StoredPoller(sqlite_path(settings.resolved_store_url())),
            {**{name: p.pid for name, p in stack.processes}, **shared},
        ),
        "raw": Side(
            raw_subject(RunRequested),
            RAW_STREAM,
            StoredPoller(sqlite_path(raw_store_url(settings))),
            {**{f"raw-{hop}": p.pid for hop, p in zip(RAW_HOPS, hops, strict=True)}, **shared},
        ),
    }
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in args.order.split(",")}
    try:
        await wait_for_raw_consumers(admin.jetstream(), hops)
        for _ in range(args.rounds):
            for name in rounds:
                side = sides[name]
                connection = client if name == "services" else admin
                rounds[name].append(await measure(side, connection, args, settings))
        await asyncio.sleep(0.5)  # let the last acks settle before counting
        for name, results in rounds.items():
            results[-1]["stored"] = sides[name].poller.count_scored()
            results[-1]["published"] = sides[name].published
            sides[name].poller.close()
        return rounds
    finally:
        await client.close()
        await admin.close()


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def summarize(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over rounds; the ratio pairs each round's sides, which ran back to back."""
    summary: dict[str, Any] = {}
    for name, results in rounds.items():
        labels = results[0]["cpu_ms_per_run"]
        summary[name] = {
            "runs_per_s": statistics.median(r["loaded"]["runs_per_s"] for r in results),
            "p50_ms": statistics.median(r["loaded"]["p50_ms"] for r in results),
            "p99_ms": statistics.median(r["loaded"]["p99_ms"] for r in results),
            "serial_p50_ms": statistics.median(r["serial"]["p50_ms"] for r in results),
            "serial_p99_ms": statistics.median(r["serial"]["p99_ms"] for r in results),
            "cpu_ms_per_run": {
                label: statistics.median(r["cpu_ms_per_run"].get(label, 0.0) for r in results)
                for label in labels
            },
            "cpu_ms_per_run_total": statistics.median(r["cpu_ms_per_run_total"] for r in results),
            "other_load_cores": statistics.median(r["other_load_cores"] for r in results),
            "stored": results[-1]["stored"],
            "published": results[-1]["published"],
        }
    if "services" in rounds and "raw" in rounds:
        summary["ratio"] = statistics.median(
            s["loaded"]["runs_per_s"] / r["loaded"]["runs_per_s"]
            for s, r in zip(rounds["services"], rounds["raw"], strict=True)
        )
    return summary


def print_table(report: dict[str, Any]) -> None:
    config, summary = report["config"], report["summary"]
    print(
        f"\n{config['runs']} runs per side and round, {config['rounds']} round(s), "
        f"window {config['window']}, workers {config['workers']}, "
        f"{report['machine']['cores']} cores; medians over rounds"
    )
    print(
        f"{'side':<10}{'runs/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'serial p50':>12}{'serial p99':>12}"
        f"{'cpu ms/run':>12}{'other load':>12}{'stored':>15}"
    )
    for name in report["rounds"]:
        side = summary[name]
        print(
            f"{name:<10}{side['runs_per_s']:>8.0f}{side['p50_ms']:>9.1f}{side['p99_ms']:>9.1f}"
            f"{side['serial_p50_ms']:>12.1f}{side['serial_p99_ms']:>12.1f}"
            f"{side['cpu_ms_per_run_total']:>12.2f}{side['other_load_cores']:>12.2f}"
            f"{side['stored']:>8}/{side['published']:<6}"
        )
    if "ratio" in summary:
        print(f"services / raw throughput: {summary['ratio']:.2f}")
    print("\nCPU ms per run, by process (loaded phase)")
    for name in report["rounds"]:
        parts = summary[name]["cpu_ms_per_run"]
        print(f"  {name:<9}" + "  ".join(f"{label} {ms:.2f}" for label, ms in parts.items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=2000, help="measured runs per side")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured runs first")
    parser.add_argument("--serial", type=int, default=100, help="runs one at a time, after")
    parser.add_argument("--window", type=int, default=64, help="runs in flight under load")
    parser.add_argument(
        "--workers", type=int, default=Settings().workers, help="messages each hop handles at once"
    )
    parser.add_argument("--agent", default="scripted:prompt-sensitive", help="the agent's model")
    parser.add_argument("--order", default="services,raw", help="sides, in the order run")
    parser.add_argument("--rounds", type=int, default=1, help="repeat both sides this often")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per phase")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (logs, db)")
    parser.add_argument("--hop", choices=RAW_HOPS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hop:
        logging.basicConfig(level=logging.WARNING)
        asyncio.run(run_raw_hop(args.hop))
        return 0
    with contextlib.ExitStack() as cleanup:
        home = args.keep or Path(cleanup.enter_context(tempfile.TemporaryDirectory()))
        settings = Settings(
            home=home.resolve(),
            nats_url=f"nats://127.0.0.1:{free_port()}",
            agent=ModelSettings(spec=args.agent),
            judge=ModelSettings(spec="scripted:judge-yes"),
            proposer=ModelSettings(spec="scripted:proposer-fix"),
            workers=args.workers,
        )
        stack = start_stack(settings, services=PIPELINE)
        cleanup.callback(stack.stop)
        assert stack.nats is not None
        asyncio.run(_create_raw_stream(stack.nats, settings))
        hops = start_raw_hops(settings, stack.nats)
        cleanup.callback(_stop, hops)
        rounds = asyncio.run(benchmark(args, settings, stack, hops))
    report: dict[str, Any] = {
        "machine": machine(),
        "config": {
            "runs": args.runs,
            "warmup": args.warmup,
            "serial": args.serial,
            "window": args.window,
            "workers": args.workers,
            "agent": args.agent,
            "order": args.order,
            "rounds": args.rounds,
            "poll_ms": POLL_S * 1000,
        },
        "summary": summarize(rounds),
        "rounds": rounds,
    }
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


async def _create_raw_stream(nats_server: LocalNats, settings: Settings) -> None:
    admin = await connect(nats_server.settings_for("admin", settings), name="bench-setup")
    try:
        await create_raw_stream(admin.jetstream())
    finally:
        await admin.close()


def _stop(hops: list[subprocess.Popen[bytes]]) -> None:
    for hop in hops:
        hop.terminate()
    for hop in hops:
        try:
            hop.wait(timeout=10)
        except subprocess.TimeoutExpired:
            hop.kill()


if __name__ == "__main__":
    sys.exit(main())
