"""Scaling: runs per second with 1, 2 and 4 executor or evaluator replicas, and the wall time of
a gate measurement, against their ideals; the resident memory of every service.

Every model is a FAKE of fixed latency (:mod:`ratchet.world`'s ``world`` agent and the
``judge-yes`` judge sleep ``--latency-ms`` per call), so a replica's capacity is known exactly:
``workers / latency`` runs a second (``workers``: the messages one service process handles at
once, ``RATCHET_WORKERS``). Each configuration gets a fresh stack (real nats-server, each service
a real process, as ``ratchet up`` starts them):

- ``executor xN``: N executor replicas, runs with an exact check (so the evaluator never calls
  the judge and is not the bottleneck); the agent sleeps ``--latency-ms`` per run.
- ``evaluator xN``: N evaluator replicas, runs without a check (the judge scores each one and
  sleeps ``--latency-ms``); the agent answers at once, and 4 executors make sure it keeps up.

The driver keeps ``window`` runs in flight (twice the tier's ideal concurrency, so the tier never
waits for work) and counts runs from publish to their ``run.scored``: throughput is measured runs
over the time they took, after ``--warmup`` runs. Ideal: ``replicas * workers / latency``.

``gate``: one change measured by the gatekeeper on a 200-case pool, both arms (400 runs), with a
single look (so the test never stops early) and ``--gate-latency-ms`` per agent call; timed from
the proposal to ``change.awaiting_approval``. Ideal: ``runs * latency / (executors * workers)``.

Memory: every process's resident set at the end of its configuration (``VmRSS``) and the most it
held at any time since it started (``VmHWM``, the peak), both from ``/proc/<pid>/status``.

    .venv/bin/python benchmarks/scaling.py [--runs 800] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from pipeline import PIPELINE, cpu_seconds, machine  # benchmarks/pipeline.py, beside this

from ratchet.cli.up import Stack, start_stack
from ratchet.contracts import (
    ChangeAwaitingApproval,
    ChangeProposed,
    Check,
    RunRequested,
    RunScored,
)
from ratchet.messaging import connect, publish_js
from ratchet.natsproc import free_port
from ratchet.prompts import read_current
from ratchet.services import CORE_SERVICES
from ratchet.settings import GateSettings, ModelSettings, Settings
from ratchet.suites import Suite, save_suite
from ratchet.world import BASE_PROMPT, case_answer, case_input, format_prompt, world_suite

TASK = "world"
GATE_CASES = 200


@dataclass
class Tier:
    name: str
    replicas: int
    runs: int
    seconds: float
    runs_per_s: float
    ideal_runs_per_s: float
    busy_cores: float  # the whole machine's CPU use while the runs were measured
    rss_mb: dict[str, float]  # VmRSS at the end of the configuration
    peak_rss_mb: dict[str, float]  # VmHWM: the most each process was resident at any time

    @property
    def efficiency(self) -> float:
        return self.runs_per_s / self.ideal_runs_per_s


@dataclass
class Gate:
    executors: int
    runs: int
    seconds: float
    ideal_s: float
    rss_mb: dict[str, float]
    peak_rss_mb: dict[str, float]


def resident_mb(stack: Stack) -> tuple[dict[str, float], dict[str, float]]:
    """Resident memory of every process of the stack, in MB: now (VmRSS, read at the end of a
    configuration) and at its peak since the process started (VmHWM, the high-water mark)."""
    now: dict[str, float] = {}
    peak: dict[str, float] = {}
    assert stack.nats is not None
    for label, pid in [("nats-server", stack.nats.process.pid)] + [
        (label, process.pid) for label, process in stack.processes
    ]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    now[label] = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    peak[label] = int(line.split()[1]) / 1024
    return now, peak


def settings_for(home: Path, workers: int, gate: GateSettings | None = None) -> Settings:
    suites = home / "suites"
    suite = Suite.model_validate(world_suite(n_learn=10, n_gate=GATE_CASES + 20, n_holdout=1))
    save_suite(suite, suites / f"{TASK}.json")
    return Settings(
        home=home / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        suites_dir=suites,
        agent=ModelSettings(spec="scripted:world"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:proposer-fix"),
        workers=workers,
        min_failures_to_propose=10**6,  # nothing proposes on its own here
        gate=gate or GateSettings(),
    )


@contextlib.contextmanager
def stack_with(settings: Settings, env: dict[str, str], **counts: Any) -> Iterator[Stack]:
    """A stack whose services live with ``env`` (the fake models' latencies)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        stack = start_stack(settings, **counts)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        yield stack
    finally:
        stack.stop()


async def drive(stack: Stack, runs: int, window: int, checked: bool) -> float:
    """Seconds ``runs`` runs took from publish to ``run.scored``, ``window`` in flight."""
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("client"), name="bench-scaling")
    js = nc.jetstream()
    slots = asyncio.Semaphore(window)
    pending: set[str] = set()
    all_scored = asyncio.Event()

    async def on_scored(msg: Msg) -> None:
        run_id = RunScored.model_validate_json(msg.data).run_id
        if run_id in pending:
            pending.discard(run_id)
            slots.release()
            if not pending and sent == runs:
                all_scored.set()

    await nc.subscribe(RunScored.subject, cb=on_scored)
    await nc.flush()
    sent = 0
    try:
        began = time.perf_counter()
        for i in range(runs):
            await asyncio.wait_for(slots.acquire(), timeout=120)
            check = Check(kind="exact", expected=case_answer(i)) if checked else None
            request = RunRequested(task=TASK, input=case_input(i % GATE_CASES), check=check)
            pending.add(request.run_id)
            await publish_js(js, request)
            sent += 1
        if pending:
            await asyncio.wait_for(all_scored.wait(), timeout=120)
        return time.perf_counter() - began
    finally:
        await nc.close()


async def measure_gate(stack: Stack) -> float:
    """Seconds from a proposal to its evidence (``change.awaiting_approval``)."""
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("client"), name="bench-gate")
    try:
        asked = asyncio.Event()

        async def on_asked(_msg: Msg) -> None:
            asked.set()

        await nc.subscribe(ChangeAwaitingApproval.subject, cb=on_asked)
        await nc.flush()
        current = await read_current(nc.jetstream(), TASK)
        change = ChangeProposed(
            task=TASK,
            base_version=current.version if current else 0,
            proposed_prompt=format_prompt(BASE_PROMPT, 1, 0.5),  # neutral: both arms alike
            rationale="A FAKE neutral change, to time a gate measurement.",
        )
        began = time.perf_counter()
        await publish_js(nc.jetstream(), change, subject=change.subject_of("client"))
        await asyncio.wait_for(asked.wait(), timeout=600)
        return time.perf_counter() - began
    finally:
        await nc.close()


def tier(args: argparse.Namespace, name: str, replicas: int) -> Tier:
    latency = args.latency_ms / 1000
    checked = name == "executor"
    env = {  # the executor's agent sleeps when the executor is measured, the judge otherwise
        "RATCHET_WORLD__LATENCY_S": str(latency if checked else 0.0),
        "RATCHET_WORLD__JUDGE_LATENCY_S": str(0.0 if checked else latency),
    }
    counts = (
        {"executors": replicas, "evaluators": 4}
        if checked
        else {"executors": 4, "evaluators": replicas}
    )
    ideal = replicas * args.workers / latency
    window = max(8, int(2 * replicas * args.workers))
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(Path(tmp), args.workers)
        with stack_with(settings, env, services=PIPELINE, **counts) as stack:
            asyncio.run(drive(stack, args.warmup, window, checked))
            before = cpu_seconds({})["machine"]
            seconds = asyncio.run(drive(stack, args.runs, window, checked))
            busy = (cpu_seconds({})["machine"] - before) / seconds
            memory, peak = resident_mb(stack)
    result = Tier(
        name, replicas, args.runs, seconds, args.runs / seconds, ideal, busy, memory, peak
    )
    print(
        f"{name:<9} x{replicas}  {result.runs_per_s:7.1f} runs/s  ideal {ideal:6.1f}  "
        f"({result.efficiency:.0%})  machine busy {busy:.2f} of {os.cpu_count()} cores  "
        f"{memory_line(memory, peak)}",
        flush=True,
    )
    return result


def memory_line(memory: dict[str, float], peak: dict[str, float]) -> str:
    """Each process's resident MB at the end, and its peak where that was higher."""
    parts = []
    for label in sorted(memory):
        top = peak.get(label, memory[label])
        more = f" (peak {top:.0f})" if round(top) > round(memory[label]) else ""
        parts.append(f"{label} {memory[label]:.0f}{more}")
    return "RSS MB: " + ", ".join(parts)


def gate(args: argparse.Namespace) -> Gate:
    latency = args.gate_latency_ms / 1000
    env = {"RATCHET_WORLD__LATENCY_S": str(latency), "RATCHET_WORLD__JUDGE_LATENCY_S": "0"}
    gate_settings = GateSettings(max_cases=GATE_CASES, looks=1, verify_reserve=20)
    runs = 2 * GATE_CASES
    ideal = runs * latency / (args.gate_executors * args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(Path(tmp), args.workers, gate_settings)
        with stack_with(
            settings, env, services=CORE_SERVICES, executors=args.gate_executors
        ) as stack:
            seconds = asyncio.run(measure_gate(stack))
            memory, peak = resident_mb(stack)
    print(
        f"gate      {runs} runs, {args.gate_executors} executor(s): {seconds:.1f} s, ideal "
        f"{ideal:.1f} s ({seconds / ideal:.2f}x)  {memory_line(memory, peak)}",
        flush=True,
    )
    return Gate(args.gate_executors, runs, seconds, ideal, memory, peak)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=800, help="measured runs per configuration")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured runs first")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="per model call")
    parser.add_argument("--gate-latency-ms", type=float, default=200.0, help="per gate run")
    parser.add_argument("--gate-executors", type=int, default=1, help="for the gate")
    parser.add_argument("--workers", type=int, default=8, help="per service process")
    parser.add_argument("--replicas", default="1,2,4", help="replica counts to measure")
    parser.add_argument("--only", choices=["executor", "evaluator", "gate"], action="append")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only or ["executor", "evaluator", "gate"])
    config = {k: v for k, v in vars(args).items() if k != "json"}
    print("settings: " + ", ".join(f"{k}={v}" for k, v in config.items()), flush=True)
    tiers = [
        tier(args, name, int(n))
        for name in ("executor", "evaluator")
        if name in only
        for n in args.replicas.split(",")
    ]
    measured_gate = gate(args) if "gate" in only else None
    if args.json:
        report = {
            "machine": machine(),
            "config": config,
            "tiers": [{**asdict(t), "efficiency": t.efficiency} for t in tiers],
            "gate": asdict(measured_gate) if measured_gate else None,
        }
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
