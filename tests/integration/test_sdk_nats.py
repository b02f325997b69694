"""The SDK against a real nats-server, connected as an instrumented app's own NATS user
(``app-shop``): served prompts (watched, composed and split like the executor's, still served
while the server is down), reports (published once however often retried, delivered after an
outage), and the LangChain callback on a real compiled LangGraph graph."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.messages import AnyMessage, SystemMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition
from nats.aio.client import Client

from ratchet.contracts import RunReported, RunRequested
from ratchet.jetstream import EVENTS_STREAM, app_user
from ratchet.messaging import connect
from ratchet.natsproc import LocalNats, free_port, start_nats
from ratchet.prompts import Canary, PromptReader, PromptRecord, PromptWriter, sha256_text
from ratchet.rules import compose_system_prompt, load_rules
from ratchet.scripted import scripted_model
from ratchet.sdk import Ratchet, RatchetUnavailable
from ratchet.settings import Settings
from ratchet.tools import get_tools
from ratchet_executor.agent import Executor

REPO = Path(__file__).resolve().parents[2]
APP = "shop"
TASK = "qa"
RULES = Settings().rules_path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalNats]:
    local = start_nats(tmp_path / "home", free_port(), log_path=tmp_path / "nats.log", apps=[APP])
    yield local
    local.stop()


async def sdk(server: LocalNats, **options: Any) -> Ratchet:
    """The SDK as the app's own user, with the password `ratchet up` wrote for it."""
    user = app_user(APP)
    return await Ratchet.connect(
        server.url, app=APP, user=user, password=server.passwords[user], **options
    )


@pytest.fixture
async def admin(server: LocalNats) -> AsyncIterator[Client]:
    nc = await connect(server.settings_for("admin"), name="test-admin")
    yield nc
    await nc.close()


async def write_prompt(server: LocalNats, text: str, **fields: Any) -> int:
    """A new version of the task's prompt, written as the gatekeeper (the only writer)."""
    nc = await connect(server.settings_for("gatekeeper"), name="test-gatekeeper")
    try:
        writer = await PromptWriter.connect(nc.jetstream())
        record = PromptRecord(text=text, **fields)
        if await writer.seed(TASK, record):
            return 1
        kv = await nc.jetstream().key_value("prompts")
        latest = (await kv.get(TASK)).revision
        assert latest is not None
        return await writer.write(TASK, record, base_version=latest)
    finally:
        await nc.close()


async def reported(admin: Client) -> list[RunReported]:
    """Every report the app's subject holds in the events stream."""
    js = admin.jetstream()
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=RunReported.subject_of(APP))
    count = (info.state.subjects or {}).get(RunReported.subject_of(APP), 0)
    if not count:
        return []
    sub = await js.subscribe(RunReported.subject_of(APP), ordered_consumer=True)
    try:
        messages = [await sub.next_msg(timeout=5) for _ in range(count)]
    finally:
        await sub.unsubscribe()
    return [RunReported.model_validate_json(m.data) for m in messages]


async def test_prompt_is_composed_like_the_executor_and_follows_new_versions(
    server: LocalNats,
) -> None:
    first = await write_prompt(server, "Answer briefly.")
    ratchet = await sdk(server)
    try:
        rules = load_rules(RULES)
        served = ratchet.prompt(TASK)
        assert served.version == first
        assert served.text == "Answer briefly."
        assert served.system == compose_system_prompt(rules, "Answer briefly.")
        assert (served.sha256, served.rules_sha256) == (
            sha256_text("Answer briefly."),
            rules.sha256,
        )
        assert ratchet.prompt("no-such-task").version == 0  # the default, as in the executor

        second = await write_prompt(server, "Answer with one word.")
        now = await ratchet.wait_for_version(TASK, second)
        assert (now.version, now.text) == (second, "Answer with one word.")
        assert ratchet.prompt(TASK) == now  # a new version is served without a restart
    finally:
        await ratchet.close()


async def test_canary_split_is_the_executors(server: LocalNats) -> None:
    """While a change is in canary, every key gets from the SDK the version and the system
    prompt the executor would run a request with that rollout key on."""
    stable = await write_prompt(server, "Answer briefly.")
    canary = Canary(share=0.5, stable_version=stable, stable_text="Answer briefly.")
    version = await write_prompt(server, "Answer in one word.", change_id="c1", canary=canary)
    rules = load_rules(RULES)
    ratchet = await sdk(server)
    nc = await connect(server.settings_for("executor"), name="test-executor")
    reader = PromptReader(nc)
    try:
        await reader.start()
        await reader.wait_for_version(TASK, version)
        executor = Executor(None, model_label="unused", rules=rules, prompts=reader)  # type: ignore[arg-type]
        keys = [f"user-{i}" for i in range(200)]
        served = [ratchet.prompt(TASK, key=key) for key in keys]
        runs = [
            executor.task_prompt(RunRequested(task=TASK, input="x", rollout_key=k)) for k in keys
        ]
        assert [(s.text, s.version) for s in served] == [tuple(run) for run in runs]
        assert [s.system for s in served] == [compose_system_prompt(rules, t) for t, _ in runs]
        arms = {s.version for s in served}
        assert arms == {stable, version}, "200 keys at a 50% share see both versions"
        assert all(ratchet.prompt(TASK, key=k) == s for k, s in zip(keys, served, strict=True))
    finally:
        await reader.stop()
        await nc.close()
        await ratchet.close()


async def test_report_retried_is_stored_once(server: LocalNats, admin: Client) -> None:
    await write_prompt(server, "Answer briefly.")
    ratchet = await sdk(server)
    try:
        served = ratchet.prompt(TASK)
        for _ in range(3):  # an app that retries a report it is unsure of
            ratchet.report(task=TASK, input="2+2", output="4", prompt=served, run_id="run-1")
        assert await ratchet.flush(timeout=10) == 0
        ratchet.report(task=TASK, input="2+2", output="4", prompt=served, run_id="run-1")
        ratchet.report(task=TASK, input="3+3", output="6", prompt=served, expected="6")
        assert await ratchet.flush(timeout=10) == 0
        stats = ratchet.stats
        assert (stats.reported, stats.published, stats.dropped, stats.pending) == (5, 5, 0, 0)
    finally:
        await ratchet.close()
    runs = await reported(admin)
    assert sorted(run.input for run in runs) == ["2+2", "3+3"]
    [first] = [run for run in runs if run.run_id == "run-1"]
    assert (first.prompt_version, first.prompt_sha256) == (served.version, served.sha256)
    assert first.completed(APP).run_id == f"app:{APP}/run-1"


async def test_outage_serves_last_known_good_and_delivers_reports_after(
    tmp_path: Path, server: LocalNats
) -> None:
    version = await write_prompt(server, "Answer briefly.")
    ratchet = await sdk(server, cache_path=tmp_path / "prompts.json")
    restarted: LocalNats | None = None
    try:
        before = ratchet.prompt(TASK)
        server.stop()
        assert ratchet.prompt(TASK) == before and before.version == version
        event = ratchet.report(task=TASK, input="while down", output="ok", prompt=before)
        assert event is not None
        assert await ratchet.flush(timeout=1) == 1, "no server: the report waits in the queue"

        # a second process of the app starts while NATS is down: from the cache file
        again = await sdk(server, cache_path=tmp_path / "prompts.json", timeout=1)
        assert again.prompt(TASK) == before
        await again.close(timeout=0)
        with pytest.raises(RatchetUnavailable, match="served no prompts within 1s"):
            await sdk(server, timeout=1)

        restarted = await asyncio.to_thread(start_nats, tmp_path / "home", server.port, apps=[APP])
        assert await ratchet.flush(timeout=30) == 0, "delivered once NATS is back"
        later = await write_prompt(restarted, "Answer with one word.")
        assert (await ratchet.wait_for_version(TASK, later, timeout=60)).version == later
        nc = await connect(restarted.settings_for("admin"), name="test-admin")
        try:
            runs = await reported(nc)
        finally:
            await nc.close()
        assert [run.id for run in runs] == [event.id]
    finally:
        await ratchet.close(timeout=1)
        if restarted is not None:
            restarted.stop()


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def fake_app_graph() -> Any:
    """An app's own LangGraph graph: a model node and a tool node, driven by a FAKE model
    (ratchet.scripted's "tool-user": it calls the calculator, then answers its result)."""
    fake_model = scripted_model("tool-user")
    tools = get_tools(["calculator"])

    async def model(state: State) -> dict[str, list[AnyMessage]]:
        return {"messages": [await fake_model.ainvoke(state["messages"])]}

    graph = StateGraph(State)
    graph.add_node("model", model)
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition, ["tools", END])
    graph.add_edge("tools", "model")
    return graph.compile()


async def test_tracer_reports_a_langgraph_run(server: LocalNats, admin: Client) -> None:
    await write_prompt(server, "Use the calculator.")
    ratchet = await sdk(server)
    graph = fake_app_graph()
    try:
        served = ratchet.prompt(TASK, key="user-1")
        tracer = ratchet.tracer(task=TASK, prompt=served, expected="12")
        inputs = {"messages": [SystemMessage(served.system), ("user", "What is 7 + 5?")]}
        result = await graph.ainvoke(inputs, config={"callbacks": [tracer]})
        assert result["messages"][-1].content == "12"
        assert await ratchet.flush(timeout=10) == 0
    finally:
        await ratchet.close()
    [run] = await reported(admin)
    assert run.run_id == tracer.run_id and run == tracer.reported
    assert (run.input, run.output, run.error) == ("What is 7 + 5?", "12", None)
    assert [(s.kind, s.name) for s in run.trace] == [
        ("model", "model"),
        ("tool", "calculator"),
        ("model", "model"),
    ]
    assert "calculator" in run.trace[0].input and run.trace[1].output == "12"
    assert all(step.ms >= 0 for step in run.trace) and run.latency_ms > 0
    assert run.usage.input_tokens > 0 and run.usage.output_tokens > 0
    assert run.check is not None and (run.check.kind, run.check.expected) == ("exact", "12")
    assert (run.prompt_version, run.prompt_sha256) == (served.version, served.sha256)
    assert run.model == "ScriptedChatModel"
    assert json.loads(run.model_dump_json())["truncated"] == []


def test_benchmark_runs() -> None:
    """benchmarks/sdk.py keeps working (its figures are not asserted: not a timed test)."""
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "sdk.py"),
            "--reports",
            "300",
            "--reads",
            "1000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("prompt() cached read") == 4 and "us CPU per run" in done.stdout
