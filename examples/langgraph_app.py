"""A small LangGraph app (a model node and a calculator tool) instrumented with Ratchet's SDK.

It serves Ratchet's task prompt for each run (``ratchet.prompt(task, key=user)``: followed,
cached, composed with the pinned rules, one version per user while a change is in canary) and
reports every run with one line, the callback in ``graph.ainvoke(..., config={"callbacks":
[ratchet.tracer(...)]})``. Ratchet then scores the runs, learns from the failures and rolls
better prompts out to this app, with no change to the app.

It simulates traffic: ``--runs`` runs (or ``--duration`` seconds of them, at most ``--rate`` per
second, ``--concurrency`` at a time; SIGTERM or Ctrl-C ends it early, after the runs under way)
of users ``user-0`` .. ``user-<users-1>``, on inputs with a
check. With ``--model scripted:world`` (a FAKE model from :mod:`ratchet.world`, whose true pass
rate under any prompt is known) the inputs are world cases ``World case N`` with their exact
answer; with a real model they are the learn cases of a suite. It ends with one line of JSON:
runs, reports, drops, and the prompt versions served.

    ratchet up                                              # in one terminal
    python examples/langgraph_app.py --model local --runs 20   # in another; see README.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Annotated, Any, TypedDict

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AnyMessage, HumanMessage, SystemMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition

from ratchet.contracts import Check
from ratchet.models import make_chat_model, model_label
from ratchet.sdk import Ratchet
from ratchet.settings import Settings
from ratchet.suites import load_suites
from ratchet.tools import get_tools
from ratchet.world import case_answer, case_input

WORLD = "world"
Case = tuple[str, Check]  # an input and the check of its answer


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def build_graph(model: BaseChatModel) -> Any:
    """The app's agent: the model, and the calculator while the model asks for it."""
    tools = get_tools(["calculator"])
    bound = model.bind_tools(tools)

    async def call_model(state: State) -> dict[str, list[AnyMessage]]:
        return {"messages": [await bound.ainvoke(state["messages"])]}

    graph = StateGraph(State)
    graph.add_node("model", call_model)
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition, ["tools", END])
    graph.add_edge("tools", "model")
    return graph.compile()


def case_source(inputs: str, rng: random.Random, case_range: tuple[int, int]) -> Callable[[], Case]:
    """Where each run's input comes from: ``world`` cases drawn from ``case_range``, or the
    learn cases of ``suite:NAME``, drawn at random."""
    if inputs == WORLD:
        low, high = case_range

        def world_case() -> Case:
            index = rng.randrange(low, high)
            return case_input(index), Check(kind="exact", expected=case_answer(index))

        return world_case
    name = inputs.removeprefix("suite:")
    suites = load_suites(Settings().suites_dir)
    if name not in suites:
        raise SystemExit(f"no suite {name!r} in {Settings().suites_dir}: {sorted(suites)}")
    cases = [(case.input, case.check) for case in suites[name].learn]
    return lambda: rng.choice(cases)


def passed(check: Check, output: str) -> bool | None:
    """The app's own view of an exact check (Ratchet's evaluator is the one that scores)."""
    if check.kind != "exact" or not isinstance(check.expected, str):
        return None
    expected: str = check.expected.strip()
    answer = output.strip()
    return answer == expected if check.case_sensitive else answer.lower() == expected.lower()


async def simulate(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings()
    spec = settings.agent.model_copy(update={"spec": args.model})
    graph = build_graph(make_chat_model(spec, local_port=settings.local_model_port))
    label = model_label(spec)
    rng = random.Random(args.seed)
    next_case = case_source(args.inputs, rng, args.case_range)
    ratchet = await Ratchet.from_env(app=args.app, cache_path=args.cache)
    served_versions: Counter[int] = Counter()
    passes: Counter[int] = Counter()
    runs = errors = 0
    started = time.monotonic()

    duration: float | None = args.duration
    limit: int = args.runs
    stopping = asyncio.Event()  # SIGTERM or Ctrl-C: finish the runs under way, report, exit
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)

    def more() -> bool:
        if stopping.is_set():
            return False
        return time.monotonic() - started < duration if duration is not None else runs < limit

    async def one_run() -> None:
        nonlocal errors
        user = f"user-{rng.randrange(args.users)}"
        text, check = next_case()
        served = ratchet.prompt(args.task, key=user)
        tracer = ratchet.tracer(task=args.task, prompt=served, check=check, model=label)
        try:
            result = await graph.ainvoke(
                {"messages": [SystemMessage(served.system), HumanMessage(text)]},
                config={"callbacks": [tracer], "recursion_limit": 12},  # the one line
            )
        except Exception:  # reported with its error by the tracer; the app carries on
            errors += 1
            return
        served_versions[served.version] += 1
        if passed(check, str(result["messages"][-1].content)):
            passes[served.version] += 1

    async def worker() -> None:
        nonlocal runs
        while more():
            index = runs
            runs += 1
            if args.rate:
                await asyncio.sleep(max(0.0, started + index / args.rate - time.monotonic()))
            await one_run()

    try:
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    finally:
        undelivered = await ratchet.close(timeout=args.flush_timeout)
    stats = ratchet.stats
    return {
        "app": ratchet.app,
        "task": args.task,
        "model": label,
        "runs": runs,
        "errors": errors,
        "reported": stats.reported,
        "published": stats.published,
        "dropped": stats.dropped,
        "undelivered": undelivered,
        "versions": {str(v): n for v, n in sorted(served_versions.items())},
        "exact_passes": {str(v): n for v, n in sorted(passes.items())},
        "seconds": round(time.monotonic() - started, 3),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--model", default="local", help="a model spec (ratchet.models): local, openai:..., "
        "scripted:world (a FAKE model with known pass rates)",
    )  # fmt: skip
    parser.add_argument("--app", help="the app's name (RATCHET_APP_NAME; one NATS user each)")
    parser.add_argument("--task", help="the task whose prompt to serve (default: the inputs')")
    parser.add_argument(
        "--inputs", help="'world' (world cases), or 'suite:NAME' (a suite's learn cases); "
        "default: world for scripted:world, else suite:answer-only",
    )  # fmt: skip
    parser.add_argument("--case-range", default="0:1000000", help="world cases drawn: LOW:HIGH")
    parser.add_argument("--runs", type=int, default=100, help="how many runs")
    parser.add_argument("--duration", type=float, help="run for this many seconds instead")
    parser.add_argument("--rate", type=float, default=0.0, help="runs per second (0: no limit)")
    parser.add_argument("--concurrency", type=int, default=4, help="runs at a time")
    parser.add_argument("--users", type=int, default=100, help="simulated users (rollout keys)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the users and inputs drawn")
    parser.add_argument("--cache", help="a prompt cache file (start while NATS is down)")
    parser.add_argument("--flush-timeout", type=float, default=30.0, help="seconds to deliver")
    args = parser.parse_args(argv)
    if args.inputs is None:
        args.inputs = WORLD if args.model == "scripted:world" else "suite:answer-only"
    if args.task is None:
        args.task = args.inputs.removeprefix("suite:")
    low, _, high = args.case_range.partition(":")
    args.case_range = (int(low), int(high))
    if args.users < 1 or args.concurrency < 1 or not args.case_range[0] < args.case_range[1]:
        parser.error("--users and --concurrency must be >= 1, --case-range LOW < HIGH")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    summary = asyncio.run(simulate(parse_args(argv)))
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
