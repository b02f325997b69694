"""Hostile load: do poisoned requests slow down everyone else's runs?

A real stack (executor, evaluator and failure store as real processes on a real nats-server)
with a fake agent: the scripted ``world`` model of :mod:`ratchet.world`, which answers
``World case N`` after a fixed sleep (``--latency-ms``). The driver publishes run requests at a
fixed rate (an open loop, so queueing shows in the latency instead of slowing the arrivals) and
times each from just before its publish to the moment its ``run.scored`` reaches the driver.

Each round has two phases of ``--runs`` requests each, one after the other:

- ``clean``: every request is an ordinary run with an exact check;
- ``poisoned``: the same, but ``--poison`` of the requests (1 %) are hostile, in turn: a regex
  check that backtracks catastrophically (``(?:.|.|.|.|.)*\\d`` on a digit-free answer), an input
  of 900,000 characters (over its limit, a 900 KB message), ``schema_version`` 999, and
  ``min_prompt_version`` 10^9 (a version that does not exist).

Only the ordinary runs are timed; the report gives their p50/p99 in both phases, the ratio of
the p99s (the claim: within 2x), and what became of the poisoned requests (scored with a problem,
or dead-lettered with a reason).

    .venv/bin/python benchmarks/hostile.py --runs 2000 [--rounds 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from pipeline import PIPELINE, cpu_seconds, machine  # benchmarks/pipeline.py, beside this

from ratchet.cli.up import Stack, start_stack
from ratchet.contracts import Check, RunRequested, RunScored
from ratchet.messaging import DLQ_PREFIX, connect
from ratchet.natsproc import free_port
from ratchet.settings import ModelSettings, Settings
from ratchet.world import case_answer, case_input
from ratchet_evaluator.checks import REGEX_TIMEOUT_S

TASK = "world"
CATASTROPHIC = r"(?:.|.|.|.|.)*\d"
POISONS = ("regex", "huge", "schema", "prompt-version")
RUN_ID = re.compile(r'"run_id":\s*"([^"]+)"')


def clean_request(i: int) -> RunRequested:
    return RunRequested(
        task=TASK, input=case_input(i % 200), check=Check(kind="exact", expected=case_answer(i))
    )


def poisoned_request(i: int, kind: str) -> tuple[str, bytes]:
    """A hostile request as the raw bytes a client could send: (run id, body)."""
    body = RunRequested(task=TASK, input=f"Poison {i}").model_dump(mode="json")  # "I am not sure."
    if kind == "regex":
        body["check"] = {"kind": "regex", "expected": CATASTROPHIC}
    elif kind == "huge":
        body["input"] = "x" * 900_000
    elif kind == "schema":
        body["schema_version"] = 999
    elif kind == "prompt-version":
        body["min_prompt_version"] = 10**9
    return str(body["run_id"]), json.dumps(body).encode()


@dataclass
class Phase:
    name: str
    requests: int
    poisoned: int
    timed: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    other_load_cores: float  # CPU other processes on the machine used meanwhile
    poison_outcomes: dict[str, int] = field(default_factory=dict)


class Watcher:
    """Hears every ``run.scored`` and dead letter of ``run.requested``, by run id."""

    def __init__(self) -> None:
        self.scored: dict[str, tuple[float, RunScored]] = {}
        self.dead: dict[str, str] = {}  # run id -> reason
        self.changed = asyncio.Event()

    async def on_scored(self, msg: Msg) -> None:
        score = RunScored.model_validate_json(msg.data)
        self.scored.setdefault(score.run_id, (time.perf_counter(), score))
        self.changed.set()

    async def on_dead(self, msg: Msg) -> None:
        letter = json.loads(msg.data)
        found = RUN_ID.search(str(letter["payload"]))  # a cut payload is no longer JSON
        if found:
            self.dead[found.group(1)] = str(letter["reason"])
        self.changed.set()

    async def until_done(self, run_ids: set[str], timeout: float) -> None:
        def missing() -> set[str]:
            return run_ids - self.scored.keys() - self.dead.keys()

        async def done() -> None:
            while missing():
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(done(), timeout)
        except TimeoutError:
            raise RuntimeError(f"{len(missing())} runs neither scored nor dead-lettered") from None


async def phase(
    name: str,
    nc: Client,
    watcher: Watcher,
    args: argparse.Namespace,
    first: int,
    poison: float,
    ours: dict[str, int],
) -> Phase:
    """``args.runs`` requests at ``args.rate`` a second; every ``1/poison``-th one hostile.
    ``ours``: the processes of the benchmark (their CPU is not "other load")."""
    js = nc.jetstream()
    cpu_before = cpu_seconds(ours)
    every = round(1 / poison) if poison else 0
    sent: dict[str, float] = {}
    poisoned: dict[str, str] = {}  # run id -> kind
    acks: list[asyncio.Task[Any]] = []
    began = time.perf_counter()
    for n in range(args.runs):
        await asyncio.sleep(max(0.0, began + n / args.rate - time.perf_counter()))
        if every and n % every == every // 2:
            kind = POISONS[len(poisoned) % len(POISONS)]
            run_id, body = poisoned_request(first + n, kind)
            poisoned[run_id] = kind
        else:
            request = clean_request(first + n)
            run_id, body = request.run_id, request.model_dump_json().encode()
            sent[run_id] = time.perf_counter()
        headers = {"Nats-Msg-Id": f"bench:{run_id}"}
        acks.append(asyncio.create_task(js.publish(RunRequested.subject, body, headers=headers)))
    await asyncio.gather(*acks)
    await watcher.until_done(set(sent) | set(poisoned), args.timeout)
    seconds = time.perf_counter() - began
    cpu_after = cpu_seconds(ours)
    spent = {label: cpu_after[label] - cpu_before[label] for label in cpu_before}
    other = spent.pop("machine", float("nan")) - sum(spent.values())
    latencies = sorted(watcher.scored[run_id][0] - at for run_id, at in sent.items())
    outcomes: Counter[str] = Counter()
    for run_id, kind in poisoned.items():
        if run_id in watcher.dead:
            outcomes[f"{kind}: dead-lettered ({watcher.dead[run_id][:60]})"] += 1
        else:
            problem = (watcher.scored[run_id][1].problems or ["no problem"])[0]
            outcomes[f"{kind}: scored ({problem[:60]})"] += 1
    return Phase(
        name=name,
        requests=args.runs,
        poisoned=len(poisoned),
        timed=len(latencies),
        seconds=seconds,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        max_ms=latencies[-1] * 1000,
        other_load_cores=max(0.0, other) / seconds,
        poison_outcomes=dict(outcomes),
    )


async def benchmark(args: argparse.Namespace, stack: Stack) -> list[dict[str, Any]]:
    assert stack.nats is not None
    client = await connect(stack.nats.settings_for("client"), name="bench-client")
    admin = await connect(stack.nats.settings_for("admin"), name="bench-admin")
    watcher = Watcher()
    await client.subscribe(RunScored.subject, cb=watcher.on_scored)
    await admin.subscribe(f"{DLQ_PREFIX}.{RunRequested.subject}", cb=watcher.on_dead)
    await client.flush()
    await admin.flush()
    ours = {
        **{name: process.pid for name, process in stack.processes},
        "nats-server": stack.nats.process.pid,
        "driver": os.getpid(),
    }
    rounds: list[dict[str, Any]] = []
    first = 0
    try:
        warm = argparse.Namespace(**{**vars(args), "runs": args.warmup})
        await phase("warm-up", client, watcher, warm, first, 0.0, ours)
        first += args.warmup
        for _ in range(args.rounds):
            clean = await phase("clean", client, watcher, args, first, 0.0, ours)
            first += args.runs
            poisoned = await phase("poisoned", client, watcher, args, first, args.poison, ours)
            first += args.runs
            rounds.append({"clean": asdict(clean), "poisoned": asdict(poisoned)})
            print_round(clean, poisoned)
    finally:
        await client.close()
        await admin.close()
    return rounds


def print_round(clean: Phase, poisoned: Phase) -> None:
    for p in (clean, poisoned):
        print(
            f"{p.name:<9} {p.requests:>6} requests ({p.poisoned:>3} poisoned, {p.timed} timed) "
            f"in {p.seconds:6.1f}s   p50 {p.p50_ms:7.1f} ms   p99 {p.p99_ms:7.1f} ms   "
            f"max {p.max_ms:7.1f} ms   other load {p.other_load_cores:.2f} cores"
        )
    print(f"  p99 poisoned / clean: {poisoned.p99_ms / clean.p99_ms:.2f}")
    for outcome, count in sorted(poisoned.poison_outcomes.items()):
        print(f"  {count:>4} x {outcome}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=2000, help="requests per phase")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests first")
    parser.add_argument("--rate", type=float, default=40.0, help="requests a second")
    parser.add_argument("--poison", type=float, default=0.01, help="share of hostile requests")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="the fake model's sleep")
    parser.add_argument("--workers", type=int, default=Settings().workers, help="per service")
    parser.add_argument("--rounds", type=int, default=1, help="clean + poisoned, this often")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per phase")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (logs, db)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = {
        **{k: v for k, v in vars(args).items() if k not in ("json", "keep")},
        "agent": "scripted:world",
        "poisons": list(POISONS),
        "regex_timeout_s": REGEX_TIMEOUT_S,
    }
    print("settings: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    os.environ["RATCHET_WORLD__LATENCY_S"] = str(args.latency_ms / 1000)  # the services inherit it
    with contextlib.ExitStack() as cleanup:
        home = args.keep or Path(cleanup.enter_context(tempfile.TemporaryDirectory()))
        settings = Settings(
            home=home.resolve(),
            nats_url=f"nats://127.0.0.1:{free_port()}",
            agent=ModelSettings(spec="scripted:world"),
            judge=ModelSettings(spec="scripted:judge-yes"),
            proposer=ModelSettings(spec="scripted:proposer-fix"),
            workers=args.workers,
        )
        stack = start_stack(settings, services=PIPELINE)
        cleanup.callback(stack.stop)
        rounds = asyncio.run(benchmark(args, stack))
    ratios = [r["poisoned"]["p99_ms"] / r["clean"]["p99_ms"] for r in rounds]
    summary = {
        "clean_p50_ms": statistics.median(r["clean"]["p50_ms"] for r in rounds),
        "clean_p99_ms": statistics.median(r["clean"]["p99_ms"] for r in rounds),
        "poisoned_p50_ms": statistics.median(r["poisoned"]["p50_ms"] for r in rounds),
        "poisoned_p99_ms": statistics.median(r["poisoned"]["p99_ms"] for r in rounds),
        "p99_ratio": statistics.median(ratios),
        "p99_ratio_max": max(ratios),
    }
    print(
        f"\nmedians over {len(rounds)} round(s): clean p50 {summary['clean_p50_ms']:.1f} ms, "
        f"p99 {summary['clean_p99_ms']:.1f} ms; poisoned p50 {summary['poisoned_p50_ms']:.1f} ms, "
        f"p99 {summary['poisoned_p99_ms']:.1f} ms; p99 ratio {summary['p99_ratio']:.2f} "
        f"(worst round {summary['p99_ratio_max']:.2f})"
    )
    if args.json:
        report = {"machine": machine(), "config": config, "summary": summary, "rounds": rounds}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
