"""Hostile input against a real stack (every core service a real process, a real nats-server):
one message can neither stall a service nor outgrow NATS, and what cannot be handled is
dead-lettered with its reason, nothing lost. Each test is a reproduction from issue 9.

The agent is a scripted fake: ``prompt-sensitive`` answers a demo case with its answer and any
other input with "I don't know."; ``flood`` answers 700,000 characters.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from conftest import cli, trail_reaching
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import TypeAdapter

from ratchet.cli.client import submit_and_wait
from ratchet.cli.up import Stack, start_stack
from ratchet.contracts import OUTPUT_CHARS, Check, RunRequested, utcnow
from ratchet.messaging import DLQ_STREAM, QUERY_PREFIX, connect, dead_letter_subject, publish_js
from ratchet.natsproc import free_port
from ratchet.prompts import read_current
from ratchet.queries import REPLY_BYTES, TRIMMED_HEADER, FailureKey, FailuresPage, FailuresQuery
from ratchet.settings import GateSettings, ModelSettings, Settings
from ratchet.store import FailureQuery, FailureRecord

TASK = "answer-only"
QUESTION, ANSWER = "What is 7 + 5?", "12"  # a demo case: the agent answers "The answer is: 12."
UNKNOWN = "Tell me a secret."  # the agent answers "I don't know."
CATASTROPHIC = r"(?:.|.|.|.|.)*\d"  # backtracks catastrophically in the regex package too
ISSUE_PATTERN = r"(?:.|.|.|.|.)*Z"  # froze the evaluator for 19 s with the re module


def settings(tmp_path: Path, agent: str) -> Settings:
    return Settings(
        home=tmp_path / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        agent=ModelSettings(spec=f"scripted:{agent}"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:proposer-fix"),
        gate=GateSettings(max_cases=16, looks=2, run_timeout_s=60),
        min_failures_to_propose=1_000,  # only `ratchet propose` proposes
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(settings(tmp_path_factory.mktemp("hostile"), "prompt-sensitive"))
    yield running
    running.stop()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[Client]:
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("client"), name="test-client")
    yield nc
    await nc.close()


class DeadLetters:
    """Every dead letter of ``run.requested`` so far and from now on (read as the admin)."""

    def __init__(self) -> None:
        self.letters: list[dict[str, object]] = []
        self.arrived = asyncio.Event()

    async def on_letter(self, msg: Msg) -> None:
        self.letters.append(json.loads(msg.data))
        self.arrived.set()

    async def wait_for(
        self, wanted: Callable[[dict[str, object]], bool], count: int, timeout: float
    ) -> list[dict[str, object]]:
        async def enough() -> list[dict[str, object]]:
            while len(found := [x for x in self.letters if wanted(x)]) < count:
                self.arrived.clear()
                await self.arrived.wait()
            return found

        try:
            return await asyncio.wait_for(enough(), timeout)
        except TimeoutError:
            raise AssertionError(f"fewer than {count} dead letters within {timeout}s") from None


@pytest.fixture
async def dead_letters(stack: Stack) -> AsyncIterator[DeadLetters]:
    assert stack.nats is not None
    admin = await connect(stack.nats.settings_for("admin"), name="test-dlq")
    letters = DeadLetters()
    await admin.jetstream().subscribe(
        dead_letter_subject(RunRequested.subject),
        stream=DLQ_STREAM,
        cb=letters.on_letter,
        ordered_consumer=True,
    )
    yield letters
    await admin.close()


def payload_of(letter: dict[str, object]) -> dict[str, object]:
    try:
        parsed = json.loads(str(letter["payload"]))
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


async def timed_run(nc: Client, request: RunRequested) -> tuple[float, float | None, list[str]]:
    started = time.perf_counter()
    _, score, _ = await submit_and_wait(nc, request, timeout=60, threshold=0.7)
    return time.perf_counter() - started, score.score, score.problems


async def test_a_catastrophic_regex_does_not_delay_other_runs(client: Client) -> None:
    def clean() -> RunRequested:
        return RunRequested(task=TASK, input=QUESTION, check=Check(kind="regex", expected=ANSWER))

    baseline = [await timed_run(client, clean()) for _ in range(5)]
    poisoned = [
        RunRequested(task=TASK, input=UNKNOWN, check=Check(kind="regex", expected=pattern))
        for pattern in (CATASTROPHIC, CATASTROPHIC, CATASTROPHIC, ISSUE_PATTERN)
    ]
    others = [clean() for _ in range(12)]

    async def later(request: RunRequested, delay: float) -> tuple[float, float | None, list[str]]:
        await asyncio.sleep(delay)  # arrive while the poisoned checks are being run
        return await timed_run(client, request)

    results = await asyncio.gather(
        *(timed_run(client, r) for r in poisoned),
        *(later(r, 0.05 * i) for i, r in enumerate(others)),
    )
    bad, good = results[: len(poisoned)], results[len(poisoned) :]

    assert [score for _, score, _ in baseline + good] == [1.0] * (len(baseline) + len(good))
    assert all(problems[0].startswith("the check timed out") for _, _, problems in bad[:3])
    assert bad[3][1] == 0.0 and bad[3][2][0].startswith(f"output does not match /{ISSUE_PATTERN}/")
    slowest = max(latency for latency, _, _ in good)
    usual = max(latency for latency, _, _ in baseline)
    # before: every run behind the pattern waited for it (18 s in the issue); now they pass by
    assert slowest < 2.0, f"clean runs took up to {slowest:.2f}s (alone: {usual:.2f}s)"


async def test_16_runs_on_a_version_that_does_not_exist_are_dead_lettered_at_once(
    stack: Stack, client: Client, dead_letters: DeadLetters
) -> None:
    latest = await read_current(client.jetstream(), TASK)
    assert latest is not None
    requests = [
        RunRequested(task=TASK, input=QUESTION, min_prompt_version=10**9) for _ in range(16)
    ]
    started = time.perf_counter()
    for request in requests:
        await publish_js(client.jetstream(), request)
    ours = {r.run_id for r in requests}
    letters = await dead_letters.wait_for(lambda x: payload_of(x).get("run_id") in ours, 16, 20)
    took = time.perf_counter() - started

    assert len(letters) == 16 and {payload_of(x)["run_id"] for x in letters} == ours
    assert {x["reason"] for x in letters} == {
        f"unprocessable: prompt version 1000000000 of task {TASK!r} does not exist "
        f"(its latest is {latest.version})"
    }
    assert all(x["deliveries"] == 1 for x in letters)
    assert took < 10, f"took {took:.1f}s"  # was about two minutes of redeliveries
    # and the executor is not held up: a run right behind them is served as usual
    latency, score, _ = await timed_run(
        client, RunRequested(task=TASK, input=QUESTION, check=Check(kind="regex", expected="12"))
    )
    assert score == 1.0 and latency < 5


async def test_300_kb_of_nul_characters_become_a_dead_letter_with_length_and_hash(
    client: Client, dead_letters: DeadLetters
) -> None:
    # raw NULs inside a JSON string: not valid JSON; quoted in a letter they escape to 1.8 MB
    original = b'{"task": "answer-only", "input": "' + b"\x00" * 300_000 + b'"}'
    digest = hashlib.sha256(original).hexdigest()
    await client.jetstream().publish(
        RunRequested.subject, original, headers={"Nats-Msg-Id": digest}
    )

    [letter] = await dead_letters.wait_for(lambda x: x["payload_sha256"] == digest, 1, 20)
    assert letter["payload_bytes"] == len(original) and letter["payload_truncated"] is True
    assert str(letter["reason"]).startswith("malformed message")
    assert original.decode().startswith(str(letter["payload"]))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            {"task": TASK, "input": "x", "schema_version": 999},
            "unsupported message: schema_version 999 not supported (knows 1)",
        ),
        (
            {"task": TASK, "input": "x" * 20_000},
            "malformed message: 1 error(s), first at request.input: String should have at most "
            "16000 characters",
        ),
    ],
)
async def test_a_message_of_an_unknown_version_or_over_a_limit_is_dead_lettered_with_why(
    client: Client, dead_letters: DeadLetters, body: dict[str, object], reason: str
) -> None:
    run_id = f"hostile-{hashlib.sha256(json.dumps(body).encode()).hexdigest()[:12]}"
    await client.jetstream().publish(
        RunRequested.subject, json.dumps({**body, "run_id": run_id}).encode()
    )
    [letter] = await dead_letters.wait_for(lambda x: payload_of(x).get("run_id") == run_id, 1, 20)
    assert letter["reason"] == reason and letter["deliveries"] == 1


@pytest.fixture(scope="module")
def flood_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    flooding = settings(tmp_path_factory.mktemp("flood"), "flood")
    # an approved change is checked on a few cases only: each run floods
    gate = flooding.gate.model_copy(update={"verify_cases": 4, "holdout_cases": 4})
    running = start_stack(flooding.model_copy(update={"gate": gate}))
    yield running
    running.stop()


async def flood_failures(stack: Stack, count: int) -> set[str]:
    """``count`` runs of the flooding agent, all failures; their run ids."""
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("client"), name="test-flood")
    requests = [
        RunRequested(task=TASK, input=QUESTION, check=Check(kind="exact", expected=ANSWER))
        for _ in range(count)
    ]
    try:
        for start in range(0, count, 22):  # a batch at a time: each run is 700 KB of output
            done = await asyncio.gather(
                *(
                    submit_and_wait(nc, r, timeout=120, threshold=0.7)
                    for r in requests[start : start + 22]
                )
            )
            assert all(logged for _, _, logged in done)
    finally:
        await nc.close()
    return {r.run_id for r in requests}


async def test_a_700_kb_output_is_cut_recorded_and_show_approve_and_failures_still_work(
    flood_stack: Stack,
) -> None:
    assert flood_stack.nats is not None
    nc = await connect(flood_stack.nats.settings_for("client"), name="test-flood")
    try:
        request = RunRequested(task=TASK, input=QUESTION, check=Check(kind="exact", expected="12"))
        run, score, logged = await submit_and_wait(nc, request, timeout=60, threshold=0.7)
    finally:
        await nc.close()
    assert len(run.output) == OUTPUT_CHARS and run.truncated == ["output", "trace"]
    assert score.score == 0.0 and logged
    assert score.problems[-1].startswith("the output was cut to its limit")

    listed = cli(flood_stack, "failures", "--task", TASK, "--json")
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    [failure] = json.loads(listed.stdout)
    assert failure["run_id"] == run.run_id and len(failure["output"]) == OUTPUT_CHARS
    shown = cli(flood_stack, "failures", "--task", TASK)
    assert shown.returncode == 0 and run.run_id in shown.stdout, shown.stderr

    # the proposer reads the failure, the gate measures the change on 700 KB outputs, and a
    # person reads its trail and approves it
    proposed = cli(flood_stack, "propose", TASK)
    assert proposed.returncode == 0, proposed.stderr
    change_id = proposed.stdout.split("proposed change ", 1)[1].split()[0]
    await trail_reaching(flood_stack, change_id, "awaiting_approval", timeout=120)
    show = cli(flood_stack, "show", change_id)
    assert show.returncode == 0, show.stderr
    assert change_id in show.stdout and "awaiting_approval" in show.stdout
    approved = cli(flood_stack, "approve", change_id, "--reason", "read it all")
    assert approved.returncode == 0, approved.stderr
    kinds = await trail_reaching(flood_stack, change_id, "approved")
    assert kinds[:4] == ["received", "measured", "awaiting_approval", "approved"]


async def test_many_700_kb_failures_come_back_whole_a_page_at_a_time(flood_stack: Stack) -> None:
    assert flood_stack.nats is not None
    since = utcnow()
    ours = await flood_failures(flood_stack, 90)  # ~18 KB each whole: three replies' worth

    # `ratchet failures` reads as many replies as it takes: every failure whole, nothing cut
    listed = cli(
        flood_stack, "failures", "--task", TASK, "--since", since.isoformat(), "--limit", "100",
        "--json",
    )  # fmt: skip
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    got = [FailureRecord.model_validate(f) for f in json.loads(listed.stdout)]
    assert len(got) == 90 and {f.run_id for f in got} == ours
    assert {len(f.output) for f in got} == {OUTPUT_CHARS}
    assert [FailureKey.of(f) for f in got] == sorted(
        (FailureKey.of(f) for f in got),
        key=lambda k: (k.logged_at, k.run_id),
        reverse=True,
    )
    fewer = cli(
        flood_stack, "failures", "--task", TASK, "--since", since.isoformat(), "--limit", "30",
        "--json",
    )  # fmt: skip
    assert fewer.returncode == 0 and fewer.stderr == "", fewer.stderr
    assert [f["run_id"] for f in json.loads(fewer.stdout)] == [f.run_id for f in got[:30]]

    # page by page, as the CLI asks: more than one reply, none over the bound, each failure once
    nc = await connect(flood_stack.nats.settings_for("client"), name="test-pages")
    try:
        pages: list[FailuresPage] = []
        sizes: list[int] = []
        asking: FailuresQuery | None = FailuresQuery(task=TASK, since=since, limit=100, paged=True)
        while asking is not None:
            reply = await nc.request(
                f"{QUERY_PREFIX}.failures", asking.model_dump_json().encode(), timeout=10
            )
            assert TRIMMED_HEADER not in (reply.headers or {})
            pages.append(FailuresPage.model_validate_json(reply.data))
            sizes.append(len(reply.data))
            asking = pages[-1].next_query(asking, 100 - sum(len(p.failures) for p in pages))
        # the proposer's and the console's way still works: one reply, every failure, shortened
        one = await nc.request(
            f"{QUERY_PREFIX}.failures",
            FailureQuery(task=TASK, since=since, limit=100).model_dump_json().encode(),
            timeout=10,
        )
    finally:
        await nc.close()
    whole_bytes = sum(len(f.model_dump_json()) for f in got)
    assert whole_bytes > REPLY_BYTES  # what one reply could not carry whole
    assert len(pages) == 3 and all(0 < size <= REPLY_BYTES for size in sizes), sizes
    assert [p.more for p in pages] == [True] * (len(pages) - 1) + [False]
    assert [f for p in pages for f in p.failures] == got
    shortened = TypeAdapter(list[FailureRecord]).validate_json(one.data)
    assert [f.run_id for f in shortened] == [f.run_id for f in got]
    assert (one.headers or {})[TRIMMED_HEADER].startswith("inputs, outputs and trace texts cut to ")
    print(f"90 failures, {whole_bytes} bytes whole: {len(pages)} pages of {sizes} bytes")
