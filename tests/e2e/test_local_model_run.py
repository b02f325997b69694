"""A real run through the real local model (SmolLM2-135M served by llama.cpp), scored by the
evaluator and, when it failed, stored and logged by the failure store."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import TypeAdapter

from ratchet.cli.client import submit_and_wait
from ratchet.cli.up import Stack, start_stack
from ratchet.contracts import Check, RunRequested
from ratchet.messaging import QUERY_PREFIX, connect
from ratchet.models import LOCAL_MODEL_NAME
from ratchet.natsproc import free_port
from ratchet.services import SERVICES
from ratchet.settings import Settings
from ratchet.store import FailureQuery, FailureRecord

pytestmark = pytest.mark.local_model

PIPELINE = tuple(s for s in SERVICES if s.name in ("executor", "evaluator", "failure-store"))


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("local")
    settings = Settings(
        home=home, nats_url=f"nats://127.0.0.1:{free_port()}", local_model_port=free_port()
    )  # every model on its default: the embedded local model
    stack = start_stack(settings, services=PIPELINE)
    yield stack
    stack.stop()


@pytest.mark.parametrize(
    ("task_input", "check"),
    [
        ("What is 2 + 2? Reply with just the number.", Check(kind="number", expected=4)),
        # no model of this size answers with exactly this token: the failure path, for real
        (
            "Say the word 'zyxwvut' backwards, twice.",
            Check(kind="exact", expected="tuvwxyz tuvwxyz"),
        ),
    ],
)
async def test_a_local_model_run_is_scored_and_failures_are_stored(
    local_stack: Stack, task_input: str, check: Check
) -> None:
    assert local_stack.nats is not None
    nc = await connect(local_stack.nats.settings_for("client"), name="test")
    try:
        request = RunRequested(task="local-e2e", input=task_input, check=check)
        run, score, logged = await submit_and_wait(nc, request, timeout=300, threshold=0.7)
        assert run.model == LOCAL_MODEL_NAME and run.error is None and run.output
        assert run.usage.output_tokens > 0 and run.trace[0].kind == "model"
        assert score.score in (0.0, 1.0) and score.scorer == f"check:{check.kind}"
        reply = await nc.request(
            f"{QUERY_PREFIX}.failures",
            FailureQuery(task="local-e2e", limit=50).model_dump_json().encode(),
            timeout=10,
        )
        stored = {f.run_id for f in TypeAdapter(list[FailureRecord]).validate_json(reply.data)}
        assert logged == (score.score == 0.0) == (run.run_id in stored)
    finally:
        await nc.close()


async def test_the_local_judge_scores_or_records_why_not(local_stack: Stack) -> None:
    """Without a check the local model judges; its reply is validated, and garbage after the
    retries is recorded as unscored with the reason, never as a made-up score."""
    assert local_stack.nats is not None
    nc = await connect(local_stack.nats.settings_for("client"), name="test")
    try:
        request = RunRequested(task="local-e2e", input="Name one colour of the rainbow.")
        _, score, _ = await submit_and_wait(nc, request, timeout=300, threshold=0.7)
        assert score.scorer == f"judge:{LOCAL_MODEL_NAME}"
        assert (score.score is None) == (score.unscored_reason is not None)
    finally:
        await nc.close()


async def test_the_local_model_keeps_to_its_token_limit(local_stack: Stack) -> None:
    """llama.cpp's server reads ``max_tokens``; sent as ``max_completion_tokens`` the limit was
    ignored and a 5-token request came back with hundreds of tokens."""
    from langchain_core.messages import HumanMessage

    from ratchet.models import make_chat_model
    from ratchet.settings import ModelSettings

    model = make_chat_model(
        ModelSettings(spec="local", max_tokens=5), local_port=local_stack.settings.local_model_port
    )
    reply = await model.ainvoke([HumanMessage("Write a long story about a dragon, in detail.")])
    assert reply.usage_metadata is not None
    assert 0 < reply.usage_metadata["output_tokens"] <= 5
