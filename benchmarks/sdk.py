"""What the SDK costs the app it instruments: CPU per reported run, time per cached prompt read.

Against a real nats-server (started here, with the app's own NATS user), in this one process:

- ``prompt()``: the mean wall time of a cached read, over ``--reads`` reads, for a task with no
  canary and for one in canary (with a rollout key, and without one: a fresh draw per read).
  Target: at most 10 microseconds.
- ``report()``: the process CPU time (``time.process_time``, every thread of the process) of
  ``--reports`` reports of a typical run (a few hundred characters of input and output, three
  trace steps, token usage, an exact check) until JetStream has acknowledged the last one
  (``flush``): the call itself, validation, the queue, serialisation, the publishes and their
  acks. Nothing the app pays for is left out; the server's CPU is its own process's. Also the
  share of it spent inside the ``report()`` calls. Target: at most 1 ms per run.
  ``--rate`` paces the reports (reports per second) instead of sending them at once; the CPU of
  the same pacing loop without reports is measured too and subtracted.

    .venv/bin/python benchmarks/sdk.py --reports 20000 --reads 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ratchet.contracts import RunReported, TraceStep
from ratchet.jetstream import EVENTS_STREAM, app_user
from ratchet.messaging import connect
from ratchet.natsproc import LocalNats, free_port, start_nats
from ratchet.prompts import Canary, PromptRecord, PromptWriter
from ratchet.sdk import Prompt, Ratchet, build_report

APP = "bench"
PLAIN, CANARY = "plain", "canaried"
QUESTION = "How many moons does Mars have? Answer with the number only, please. " * 3
ANSWER = "Mars has two moons, Phobos and Deimos, so the answer is 2. " * 3
TRACE = [
    TraceStep(kind="model", name="agent", input="lookup(mars moons)", output="", ms=120.0),
    TraceStep(kind="tool", name="lookup", input="mars moons", output="Phobos, Deimos", ms=3.0),
    TraceStep(kind="model", name="agent", output=ANSWER, ms=150.0),
]


async def seed_prompts(server: LocalNats) -> None:
    """A plain task and one whose newest version is in canary (half the keys)."""
    nc = await connect(server.settings_for("gatekeeper"), name="bench-gatekeeper")
    try:
        writer = await PromptWriter.connect(nc.jetstream())
        await writer.seed(PLAIN, PromptRecord(text="Answer with the number only."))
        await writer.seed(CANARY, PromptRecord(text="Answer briefly."))
        canary = Canary(share=0.5, stable_version=2, stable_text="Answer briefly.")
        record = PromptRecord(text="Answer in one word.", change_id="bench", canary=canary)
        await writer.write(CANARY, record, base_version=2)
    finally:
        await nc.close()


def time_reads(read: Callable[[int], Any], reads: int) -> float:
    """Mean wall microseconds of one ``read(i)``, the loop included (so an upper bound)."""
    for i in range(min(reads, 10_000)):  # warm up
        read(i)
    started = time.perf_counter()
    for i in range(reads):
        read(i)
    return (time.perf_counter() - started) / reads * 1e6


async def paced(count: int, rate: float, act: Callable[[int], Any]) -> None:
    """``act(i)`` ``count`` times at ``rate`` per second (in bursts of what is due)."""
    started = time.perf_counter()
    done = 0
    while done < count:
        due = min(count, int((time.perf_counter() - started) * rate) + 1)
        while done < due:
            act(done)
            done += 1
        await asyncio.sleep(max(0.0, started + done / rate - time.perf_counter()))


async def measure(args: argparse.Namespace, server: LocalNats) -> dict[str, Any]:
    user = app_user(APP)
    ratchet = await Ratchet.connect(
        server.url, app=APP, user=user, password=server.passwords[user], max_queue=args.reports
    )
    try:
        keys = [f"user-{i}" for i in range(1024)]
        reads = {
            "plain, with key": time_reads(
                lambda i: ratchet.prompt(PLAIN, keys[i & 1023]), args.reads
            ),
            "plain, no key": time_reads(lambda i: ratchet.prompt(PLAIN), args.reads),
            "canary, with key": time_reads(
                lambda i: ratchet.prompt(CANARY, keys[i & 1023]), args.reads
            ),
            "canary, no key": time_reads(lambda i: ratchet.prompt(CANARY), args.reads),
        }
        served = ratchet.prompt(PLAIN, "user-1")

        def report(i: int) -> None:
            ratchet.report(
                task=PLAIN,
                input=QUESTION,
                output=ANSWER,
                prompt=served,
                trace=TRACE,
                usage={"input_tokens": 180, "output_tokens": 40},
                latency_ms=273.0,
                expected="2",
                model="bench-model",
            )

        # warm-up: the first publishes set up nats-py's reply subscription and pydantic's caches
        for i in range(200):
            report(i)
        assert await ratchet.flush(timeout=60) == 0
        baseline = 0.0
        if args.rate:
            cpu = time.process_time()
            await paced(args.reports, args.rate, lambda i: None)
            baseline = time.process_time() - cpu
        in_calls = 0.0
        cpu, wall = time.process_time(), time.perf_counter()
        if args.rate:
            await paced(args.reports, args.rate, report)
        else:
            for i in range(args.reports):
                report(i)
            in_calls = time.process_time() - cpu
        left = await ratchet.flush(timeout=args.timeout)
        cpu, wall = time.process_time() - cpu - baseline, time.perf_counter() - wall
        stats = ratchet.stats
    finally:
        await ratchet.close()
    assert left == 0 and stats.dropped == 0, f"{left} reports not acknowledged, {stats}"
    stored = await stored_reports(server)
    assert stored == args.reports + 200, f"the stream holds {stored} reports"
    return {
        "prompt_read_us": reads,
        "report": {
            "runs": args.reports,
            "rate": args.rate or "all at once",
            "cpu_ms_per_run": cpu / args.reports * 1000,
            "in_report_call_ms_per_run": in_calls / args.reports * 1000 if in_calls else None,
            "pacing_baseline_cpu_s": baseline,
            "wall_s": wall,
            "runs_per_s": args.reports / wall,
            "bytes_per_run": len(sample(served).model_dump_json().encode()),
            "retries": stats.retries,
            "stored_in_stream": stored,
        },
    }


def sample(served: Prompt) -> RunReported:
    """One report as the benchmark sends it."""
    return build_report(
        APP, task=PLAIN, input=QUESTION, output=ANSWER, prompt=served, trace=TRACE, expected="2"
    )


async def stored_reports(server: LocalNats) -> int:
    nc = await connect(server.settings_for("admin"), name="bench-admin")
    try:
        subject = RunReported.subject_of(APP)
        info = await nc.jetstream().stream_info(EVENTS_STREAM, subjects_filter=subject)
        return int((info.state.subjects or {}).get(subject, 0))
    finally:
        await nc.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reports", type=int, default=20_000, help="reported runs measured")
    parser.add_argument("--reads", type=int, default=1_000_000, help="prompt reads per case")
    parser.add_argument("--rate", type=float, default=0.0, help="reports per second (0: burst)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for acks")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = {
        "reports": args.reports,
        "reads": args.reads,
        "rate": args.rate,
        "python": platform.python_version(),
        "nats-py": version("nats-py"),
        "pydantic": version("pydantic"),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    print("settings:", json.dumps(settings))
    with tempfile.TemporaryDirectory() as folder:
        server = start_nats(Path(folder) / "home", free_port(), apps=[APP])
        try:
            asyncio.run(seed_prompts(server))
            results = asyncio.run(measure(args, server))
        finally:
            server.stop()
    for case, micros in results["prompt_read_us"].items():
        print(f"prompt() cached read, {case:<17} {micros:8.3f} us   (target <= 10 us)")
    report = results["report"]
    print(
        f"report(): {report['cpu_ms_per_run'] * 1000:8.1f} us CPU per run, all in   "
        f"(target <= 1000 us); {report['runs']} runs, {report['rate']}, "
        f"{report['runs_per_s']:.0f} runs/s acknowledged, {report['bytes_per_run']} bytes each"
    )
    if report["in_report_call_ms_per_run"] is not None:
        inside = report["in_report_call_ms_per_run"] * 1000
        print(f"  of which inside the report() calls: {inside:.1f} us")
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
