"""What the SDK costs the app it instruments: CPU per reported run, time per cached prompt read.

Against a real nats-server (started here, with the app's own NATS user), in this one process:

- ``prompt()``: the mean wall time (and CPU time) of a cached read, over ``--reads`` reads, for
  a task with no canary and for one in canary (with a rollout key, and without one: a fresh
  draw per read). Target: at most 10 microseconds.
- ``report()``: the process CPU time (``time.process_time``, every thread of the process) of
  ``--reports`` reports of a typical run (a few hundred characters of input and output, three
  trace steps, token usage, an exact check) until JetStream has acknowledged the last one
  (``flush``): the call itself, validation, the queue, serialisation, the publishes and their
  acks. Nothing the app pays for is left out; the server's CPU is its own process's. Also the
  share of it spent inside the ``report()`` calls. Target: at most 1 ms per run.
  ``--rate`` paces the reports (reports per second) instead of sending them at once; the CPU of
  the same pacing loop without reports is measured too and subtracted.

    .venv/bin/python benchmarks/sdk.py --reports 20000 --reads 1000000

``--mode tracer``: what the LangChain callback (``Ratchet.tracer``) adds to one invocation of a
small LangGraph app (the model node and the calculator tool of ``examples/langgraph_app.py``,
with the FAKE model ``scripted:tool-user``: model, tool, model; no network). Four arms, each
invoked ``--invocations`` times with ``ainvoke``, the process CPU of each measured: no
callbacks; a no-op ``BaseCallbackHandler`` (LangChain's own dispatch of the callbacks, inline
like the tracer); the tracer with a client that builds and validates its report and sends
nothing ("unsent"); the SDK's tracer, its report published and acknowledged by JetStream (each
batch ends with ``flush``, inside its measurement). The arms alternate in ``--rounds`` rounds,
in a rotating order, so a change in the machine's load hits them alike; the differences are
paired per round, and their mean is given with two standard errors over the rounds. Apart, and
free of the graph's noise: the tracer's own work (the callbacks of one invocation, recorded,
replayed ``--replays`` times on fresh tracers whose report is built but not published; the
best of five repeats).

    .venv/bin/python benchmarks/sdk.py --mode tracer --invocations 3000 --rounds 30
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage, SystemMessage

from ratchet.contracts import Check, RunReported, TraceStep
from ratchet.jetstream import EVENTS_STREAM, app_user
from ratchet.messaging import connect
from ratchet.models import make_chat_model, model_label
from ratchet.natsproc import LocalNats, free_port, start_nats
from ratchet.prompts import Canary, PromptRecord, PromptWriter
from ratchet.rules import load_rules
from ratchet.sdk import Prompt, PromptCache, Ratchet, build_report
from ratchet.sdk.langchain import RatchetTracer
from ratchet.settings import ModelSettings, Settings

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


def time_reads(read: Callable[[int], Any], reads: int) -> tuple[float, float]:
    """Mean wall and CPU microseconds of one ``read(i)``, the loop included (so upper bounds).
    On a busy machine the wall time also counts the moments the process waited for a core."""
    for i in range(min(reads, 10_000)):  # warm up
        read(i)
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(reads):
        read(i)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - started
    return wall / reads * 1e6, cpu / reads * 1e6


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
        timed = {
            "plain, with key": time_reads(
                lambda i: ratchet.prompt(PLAIN, keys[i & 1023]), args.reads
            ),
            "plain, no key": time_reads(lambda i: ratchet.prompt(PLAIN), args.reads),
            "canary, with key": time_reads(
                lambda i: ratchet.prompt(CANARY, keys[i & 1023]), args.reads
            ),
            "canary, no key": time_reads(lambda i: ratchet.prompt(CANARY), args.reads),
        }
        reads = {case: wall for case, (wall, _) in timed.items()}
        reads_cpu = {case: cpu for case, (_, cpu) in timed.items()}
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
        "prompt_read_cpu_us": reads_cpu,
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


# --- the LangChain callback (--mode tracer) ------------------------------------------------------

MODEL = "scripted:tool-user"  # a FAKE model: asks the calculator, then answers with its result
UNSENT = "tracer, unsent"  # the tracer with a client that builds its report and sends nothing
ARMS = ("plain", "no-op handler", UNSENT, "tracer")
TRACER_ADDS = "tracer - plain (what the SDK adds, all in)"


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "langgraph_app.py"


def build_graph() -> Any:
    """The example app's graph itself (``examples/langgraph_app.py``: a model node, and the
    calculator while the model asks for it), on the FAKE model."""
    spec = importlib.util.spec_from_file_location("langgraph_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # LangGraph resolves the state's annotations through it
    spec.loader.exec_module(example)
    return example.build_graph(make_chat_model(ModelSettings(spec=MODEL)))


class NoOp(BaseCallbackHandler):
    """A handler that does nothing, called inline like the tracer: what LangChain's dispatch of
    the callbacks costs by itself. It takes ``on_chat_model_start`` as the tracer does (a
    handler without it has the messages turned into text for ``on_llm_start`` instead)."""

    run_inline = True

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        return None


CALLBACKS = (
    "on_chain_start", "on_chain_end", "on_chain_error", "on_chat_model_start", "on_llm_start",
    "on_llm_end", "on_llm_error", "on_tool_start", "on_tool_end", "on_tool_error",
)  # fmt: skip


class Recorder(BaseCallbackHandler):
    """Keeps every callback of an invocation, with its arguments, to replay them."""

    run_inline = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []


def _recording(name: str) -> Callable[..., None]:
    def record(self: Recorder, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))

    return record


for _name in CALLBACKS:
    setattr(Recorder, _name, _recording(_name))


class BuildsOnly:
    """A client whose ``report`` builds and validates the event, and publishes nothing."""

    def report(self, **fields: Any) -> RunReported:
        return build_report(APP, **fields)


def replay_tracer(calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]], times: int) -> float:
    """CPU microseconds of the tracer's own work for one invocation: its callbacks replayed
    (as LangChain made them in one invocation) on a fresh tracer, and its report built, but
    not published; the best of five repeats of ``times``."""
    client = cast(Ratchet, BuildsOnly())
    served = PromptCache(load_rules(Settings().rules_path)).prompt(PLAIN)
    check = Check(kind="exact", expected="1")

    def once() -> None:
        tracer = RatchetTracer(client, task=PLAIN, prompt=served, check=check, model=MODEL)
        for name, args, kwargs in calls:
            getattr(tracer, name)(*args, **kwargs)
        assert tracer.reported is not None

    for _ in range(min(times, 1000)):
        once()
    best = float("inf")
    for _ in range(5):
        cpu = time.process_time()
        for _ in range(times):
            once()
        best = min(best, (time.process_time() - cpu) / times * 1e6)
    return best


def arithmetic(i: int) -> tuple[str, str]:
    """Input ``i`` and its answer."""
    a, b, c = 3 + i % 97, 7 + i % 89, i % 13
    return f"What is {a} * {b} + {c}? Answer with the number only.", str(a * b + c)


async def measure_tracer(args: argparse.Namespace, server: LocalNats) -> dict[str, Any]:
    user = app_user(APP)
    ratchet = await Ratchet.connect(server.url, app=APP, user=user, password=server.passwords[user])
    graph = build_graph()
    label = model_label(ModelSettings(spec=MODEL))
    noop = NoOp()
    unsent = cast(Ratchet, BuildsOnly())
    batch = max(1, args.invocations // args.rounds)
    counter = 0

    async def invoke(arm: str) -> None:
        nonlocal counter
        question, answer = arithmetic(counter)
        served = ratchet.prompt(PLAIN, f"user-{counter % 1024}")
        counter += 1
        config: dict[str, Any] = {"recursion_limit": 12}
        if arm == "tracer":
            check = Check(kind="exact", expected=answer)
            config["callbacks"] = [
                ratchet.tracer(task=PLAIN, prompt=served, check=check, model=label)
            ]
        elif arm == UNSENT:
            check = Check(kind="exact", expected=answer)
            config["callbacks"] = [
                RatchetTracer(unsent, task=PLAIN, prompt=served, check=check, model=label)
            ]
        elif arm == "no-op handler":
            config["callbacks"] = [noop]
        inputs = {"messages": [SystemMessage(served.system), HumanMessage(question)]}
        result = await graph.ainvoke(inputs, config=config)
        if result["messages"][-1].content != answer:
            raise AssertionError(f"{question!r}: {result['messages'][-1].content!r}")

    async def run_batch(arm: str) -> float:
        """Process CPU seconds of ``batch`` invocations of ``arm``, their reports acknowledged."""
        cpu = time.process_time()
        for _ in range(batch):
            await invoke(arm)
        if await ratchet.flush(timeout=args.timeout):
            raise AssertionError(f"reports not acknowledged in {args.timeout} s: {ratchet.stats}")
        return time.process_time() - cpu

    try:
        for arm in ARMS:  # warm-up: imports, pydantic's and nats-py's first-use work
            for _ in range(max(20, batch // 5)):
                await invoke(arm)
        await ratchet.flush(timeout=args.timeout)
        warmed = ratchet.stats.reported
        recorder = Recorder()
        question, _ = arithmetic(0)
        inputs = {"messages": [SystemMessage(PLAIN), HumanMessage(question)]}
        await graph.ainvoke(inputs, config={"callbacks": [recorder]})
        replayed = replay_tracer(recorder.calls, args.replays)
        per_round: dict[str, list[float]] = {arm: [] for arm in ARMS}  # CPU us per invocation
        for r in range(args.rounds):
            turn = r % len(ARMS)
            order = ARMS[turn:] + ARMS[:turn]  # each arm in each place alike
            for arm in order:
                per_round[arm].append(await run_batch(arm) / batch * 1e6)
        stats = ratchet.stats
    finally:
        await ratchet.close()
    assert stats.dropped == 0 and stats.pending == 0, f"{stats}"
    stored = await stored_reports(server)
    measured = args.rounds * batch
    assert stored == warmed + measured, f"the stream holds {stored} reports"
    return {
        "invocations_per_arm": measured,
        "rounds": args.rounds,
        "batch": batch,
        "cpu_us_per_invocation": {arm: statistics.mean(v) for arm, v in per_round.items()},
        "cpu_us_per_round": per_round,
        "differences_us": {
            name: paired(per_round[a], per_round[b])
            for name, a, b in (
                (TRACER_ADDS, "tracer", "plain"),
                ("no-op handler - plain (LangChain's dispatch)", "no-op handler", "plain"),
                ("unsent - no-op handler (the tracer, its report)", UNSENT, "no-op handler"),
                ("tracer - unsent (publishing the report, its ack)", "tracer", UNSENT),
            )
        },
        "reports_stored": stored,
        "callbacks_per_invocation": len(recorder.calls),
        "tracer_own_cpu_us": replayed,
    }


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean, two standard errors and median of the per-round differences ``a - b``."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    spread = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return {
        "mean": statistics.mean(diffs),
        "two_se": 2 * spread,
        "median": statistics.median(diffs),
    }


def print_tracer(results: dict[str, Any]) -> None:
    print(
        f"LangGraph app, {MODEL} (model, tool, model): {results['invocations_per_arm']} "
        f"invocations per arm in {results['rounds']} rounds of {results['batch']}"
    )
    for arm, micros in results["cpu_us_per_invocation"].items():
        print(f"  {arm:<14} {micros:8.1f} us CPU per invocation")
    for name, d in results["differences_us"].items():
        print(
            f"  {name:<48} {d['mean']:7.1f} us +- {d['two_se']:5.1f} (2 SE), "
            f"median {d['median']:7.1f} us"
        )
    print(
        f"  the tracer's own work, its {results['callbacks_per_invocation']} callbacks replayed "
        f"and the report built (not published): {results['tracer_own_cpu_us']:.1f} us"
    )
    adds = results["differences_us"][TRACER_ADDS]["mean"]
    print(f"what the SDK adds per reported run: {adds:.1f} us CPU   (target <= 1000 us)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--mode", choices=("report", "tracer"), default="report",
        help="report: prompt() and report(); tracer: the LangChain callback in a LangGraph app",
    )  # fmt: skip
    parser.add_argument("--reports", type=int, default=20_000, help="reported runs measured")
    parser.add_argument("--reads", type=int, default=1_000_000, help="prompt reads per case")
    parser.add_argument("--rate", type=float, default=0.0, help="reports per second (0: burst)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for acks")
    parser.add_argument("--invocations", type=int, default=3000, help="graph runs per arm")
    parser.add_argument("--rounds", type=int, default=30, help="rounds the arms alternate in")
    parser.add_argument("--replays", type=int, default=5000, help="tracer replays, 5 repeats")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "tracer":
        if args.rounds < 2 or args.invocations < args.rounds:
            raise SystemExit("--rounds must be >= 2 and --invocations >= --rounds")
        settings: dict[str, Any] = {
            "mode": "tracer",
            "invocations": args.invocations,
            "rounds": args.rounds,
            "replays": args.replays,
            "model": MODEL,
            "langchain-core": version("langchain-core"),
            "langgraph": version("langgraph"),
        }
    else:
        settings = {"mode": "report", "reports": args.reports, "reads": args.reads}
        settings["rate"] = args.rate
    settings |= {
        "python": platform.python_version(),
        "nats-py": version("nats-py"),
        "pydantic": version("pydantic"),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    print("settings:", json.dumps(settings))
    measurement = measure_tracer if args.mode == "tracer" else measure
    with tempfile.TemporaryDirectory() as folder:
        server = start_nats(Path(folder) / "home", free_port(), apps=[APP])
        try:
            asyncio.run(seed_prompts(server))
            results = asyncio.run(measurement(args, server))
        finally:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, **results}, indent=2))
    if args.mode == "tracer":
        print_tracer(results)
        return 0
    for case, micros in results["prompt_read_us"].items():
        cpu = results["prompt_read_cpu_us"][case]
        print(
            f"prompt() cached read, {case:<17} {micros:8.3f} us, CPU {cpu:7.3f} us   "
            "(target <= 10 us)"
        )
    report = results["report"]
    print(
        f"report(): {report['cpu_ms_per_run'] * 1000:8.1f} us CPU per run, all in   "
        f"(target <= 1000 us); {report['runs']} runs, {report['rate']}, "
        f"{report['runs_per_s']:.0f} runs/s acknowledged, {report['bytes_per_run']} bytes each"
    )
    if report["in_report_call_ms_per_run"] is not None:
        inside = report["in_report_call_ms_per_run"] * 1000
        print(f"  of which inside the report() calls: {inside:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
