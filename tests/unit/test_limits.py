"""The message limits of ratchet.contracts: every event at every limit still fits in one NATS
message, whatever its characters; anything over a limit, or of an unknown schema version, is
refused with a reason a person can read; dead letters always fit."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import pytest
from pydantic import BaseModel, ValidationError

from ratchet.contracts import (
    CASE_ID_CHARS,
    CASES,
    CHANGE_ID_CHARS,
    DEAD_LETTER_PAYLOAD_CHARS,
    DIFF_CHARS,
    ERROR_CHARS,
    EXAMPLE_CHARS,
    EXPECTED_JSON_CHARS,
    FAILURE_RUN_IDS,
    GATE_RUN_PREFIX,
    GROUP_EXAMPLES,
    GROUPS,
    ID_CHARS,
    INPUT_CHARS,
    LOOKS,
    MAX_MESSAGE_BYTES,
    NAME_CHARS,
    OUTPUT_CHARS,
    PROBLEM_CHARS,
    PROBLEMS,
    PROMPT_CHARS,
    RATIONALE_CHARS,
    REASON_CHARS,
    RUN_ID_CHARS,
    SHA256_CHARS,
    TRACE_STEPS,
    TRACE_TEXT_CHARS,
    ChangeApplied,
    ChangeApproved,
    ChangeAwaitingApproval,
    ChangeKept,
    ChangeProposed,
    Check,
    DeadLetter,
    FailureGroup,
    FailureLogged,
    GateRunRequested,
    Look,
    Measurement,
    RunCompleted,
    RunContext,
    RunRequested,
    RunScored,
    TraceStep,
    clip,
)

NUL = "\x00"  # six bytes in JSON (\u0000): the worst character for size
WIDE = "~"  # ids are printable ASCII: one byte each


def text(limit: int) -> str:
    return NUL * limit


def ident(limit: int, prefix: str = "") -> str:
    return prefix + WIDE * (limit - len(prefix))


def problems() -> list[str]:
    return [text(PROBLEM_CHARS)] * PROBLEMS


def biggest_check() -> Check:
    # json.dumps of a NUL string: 6 characters each, plus the quotes
    return Check(kind="exact", expected=text((EXPECTED_JSON_CHARS - 2) // 6))


def gate_context() -> RunContext:
    return RunContext(
        purpose="gate",
        change_id=ident(CHANGE_ID_CHARS),
        case_id=ident(CASE_ID_CHARS),
        stage="measure",
        arm="candidate",
        repeat=99,
    )


def biggest_measurement() -> Measurement:
    cases = [ident(CASE_ID_CHARS, f"{i}-") for i in range(CASES)]
    return Measurement(
        test="superiority",
        margin=0.0,
        alpha=0.05,
        looks=list(range(LOOKS)),
        repeats=3,
        verdict="superior",
        stopped_at=1,
        history=[Look(n=i, z=1.5, efficacy_bound=2.5, conditional_power=0.5) for i in range(LOOKS)],
        cases=CASES,
        current_passes=1,
        candidate_passes=2,
        lift=0.1,
        ci95=(0.0, 0.2),
        lower_bound=0.01,
        runs=2 * CASES,
        fixed=cases,
        broken=cases,
        flaky=cases,
        unscored=0,
        pool_sha256=ident(SHA256_CHARS),
        pool_size=CASES,
        proposals_on_pool=1,
        pool_budget=50,
    )


BIGGEST: dict[str, Callable[[], BaseModel]] = {
    "run.requested": lambda: RunRequested(
        id=ident(ID_CHARS),
        run_id=ident(RUN_ID_CHARS),
        task="t" * NAME_CHARS,
        input=text(INPUT_CHARS),
        check=biggest_check(),
        candidate_prompt=text(PROMPT_CHARS),
        min_prompt_version=2**63 - 1,
    ),
    "run.gate.requested": lambda: GateRunRequested(
        id=ident(ID_CHARS),
        run_id=ident(RUN_ID_CHARS, GATE_RUN_PREFIX),
        task="t" * NAME_CHARS,
        input=text(INPUT_CHARS),
        check=biggest_check(),
        candidate_prompt=text(PROMPT_CHARS),
        context=gate_context(),
    ),
    "run.completed": lambda: RunCompleted(
        id=ident(ID_CHARS),
        run_id=ident(RUN_ID_CHARS),
        task="t" * NAME_CHARS,
        input=text(INPUT_CHARS),
        check=biggest_check(),
        context=gate_context(),
        output=text(OUTPUT_CHARS),
        trace=[
            TraceStep(
                kind="model",
                name=text(NAME_CHARS),
                input=text(TRACE_TEXT_CHARS),
                output=text(TRACE_TEXT_CHARS),
                ms=1.0,
            )
        ]
        * TRACE_STEPS,
        prompt_version=2**63 - 1,
        prompt_sha256=text(SHA256_CHARS),
        rules_sha256=text(SHA256_CHARS),
        model=text(NAME_CHARS),
        latency_ms=1.0,
        error=text(ERROR_CHARS),
        truncated=[text(NAME_CHARS)] * 8,
    ),
    "run.scored": lambda: RunScored(
        id=ident(ID_CHARS),
        run_id=ident(RUN_ID_CHARS),
        task="t" * NAME_CHARS,
        context=gate_context(),
        score=0.0,
        problems=problems(),
        scorer=text(NAME_CHARS),
        unscored_reason=text(REASON_CHARS),
        prompt_version=1,
    ),
    "failure.logged": lambda: FailureLogged(
        id=ident(ID_CHARS),
        run_id=ident(RUN_ID_CHARS),
        task="t" * NAME_CHARS,
        score=0.0,
        problems=problems(),
    ),
    "change.proposed": lambda: ChangeProposed(
        id=ident(ID_CHARS),
        change_id=ident(CHANGE_ID_CHARS),
        task="t" * NAME_CHARS,
        base_version=1,
        proposed_prompt=text(PROMPT_CHARS),
        rationale=text(RATIONALE_CHARS),
        groups=[
            FailureGroup(
                label=text(PROBLEM_CHARS),
                size=FAILURE_RUN_IDS // GROUPS,
                run_ids=[ident(RUN_ID_CHARS)] * (FAILURE_RUN_IDS // GROUPS),
                examples=[text(EXAMPLE_CHARS)] * GROUP_EXAMPLES,
            )
        ]
        * GROUPS,
        failure_run_ids=[ident(RUN_ID_CHARS)] * FAILURE_RUN_IDS,
        model=text(NAME_CHARS),
    ),
    "change.awaiting_approval": lambda: ChangeAwaitingApproval(
        id=ident(ID_CHARS),
        change_id=ident(CHANGE_ID_CHARS),
        task="t" * NAME_CHARS,
        base_version=1,
        prompt_diff=text(DIFF_CHARS),
        rationale=text(RATIONALE_CHARS),
        measurement=biggest_measurement(),
        evidence_sha256=text(SHA256_CHARS),
    ),
    "change.approved": lambda: ChangeApproved(
        id=ident(ID_CHARS),
        change_id=ident(CHANGE_ID_CHARS),
        reason=text(REASON_CHARS),
        evidence_sha256=text(SHA256_CHARS),
    ),
    "change.applied": lambda: ChangeApplied(
        id=ident(ID_CHARS),
        change_id=ident(CHANGE_ID_CHARS),
        task="t" * NAME_CHARS,
        previous_version=1,
        version=2,
        prompt_sha256=text(SHA256_CHARS),
    ),
    "change.kept": lambda: ChangeKept(
        id=ident(ID_CHARS),
        change_id=ident(CHANGE_ID_CHARS),
        task="t" * NAME_CHARS,
        version=2,
        cases=CASES,
        repeats=1,
        control_passes=1,
        applied_passes=1,
        served=True,
        upper_bound=0.1,
        reason=text(REASON_CHARS),
    ),
}


@pytest.mark.parametrize("subject", BIGGEST)
def test_an_event_at_every_limit_fits_in_one_message(subject: str) -> None:
    """Filled with control characters, which JSON writes six bytes each: the worst case."""
    size = len(BIGGEST[subject]().model_dump_json().encode())
    assert size <= MAX_MESSAGE_BYTES, f"{subject}: {size} bytes"


@pytest.mark.parametrize(
    ("build", "where"),
    [
        (lambda: RunRequested(task="t", input="x" * (INPUT_CHARS + 1)), "input"),
        (lambda: RunRequested(task="t" * (NAME_CHARS + 1), input="x"), "task"),
        (lambda: RunRequested(task="t", input="x", candidate_prompt="p" * 8_001), "candidate"),
        (lambda: RunScored(run_id="r", task="t", score=0, scorer="s", problems=["p"] * 17), "prob"),
        (
            lambda: ChangeProposed(
                task="t", base_version=1, proposed_prompt="p", rationale="r" * 4_001
            ),
            "rationale",
        ),
    ],
)
def test_a_field_over_its_limit_is_refused_naming_the_field(
    build: Callable[[], BaseModel], where: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        build()
    error = caught.value.errors()[0]
    assert where in ".".join(map(str, error["loc"]))
    assert "at most" in error["msg"]


def test_a_check_whose_expected_value_is_too_large_is_refused() -> None:
    with pytest.raises(ValidationError, match=f"over the limit of {EXPECTED_JSON_CHARS}"):
        Check(kind="any_of", expected=["x" * 1000] * 5)


@pytest.mark.parametrize(
    "fields",
    [
        {"min_prompt_version": 0},
        {"min_prompt_version": -3},
        {"context": {"repeat": -1}},
        {"context": {"repeat": 10_000}},
        {"check": {"kind": "number", "expected": 3, "tolerance": -1}},
        {"run_id": ""},
    ],
)
def test_request_fields_outside_sane_ranges_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RunRequested.model_validate({"task": "t", "input": "x", **fields})


@pytest.mark.parametrize("run_id", ["a\r\nNats-Rollup: all", "tab\there", 'quote"d', "é"])
def test_ids_are_printable_ascii_so_they_cannot_forge_a_header(run_id: str) -> None:
    with pytest.raises(ValidationError):
        RunRequested(run_id=run_id, task="t", input="x")


def test_an_unknown_schema_version_is_refused_with_the_versions_known() -> None:
    body = {"task": "t", "input": "x", "schema_version": 999}
    with pytest.raises(ValidationError, match=r"schema_version 999 not supported \(knows 1\)"):
        RunRequested.model_validate(body)
    assert RunRequested.model_validate({**body, "schema_version": 1}).schema_version == 1


def test_a_dead_letter_of_300_kb_of_nul_characters_is_cut_to_fit_with_length_and_hash() -> None:
    original = json.dumps({"task": "t", "input": NUL * 300_000}).encode()  # 1.8 MB as JSON
    letter = DeadLetter.of("run.requested", original, reason="r" * 10_000, deliveries=1)

    assert len(letter.model_dump_json().encode()) <= MAX_MESSAGE_BYTES
    assert letter.payload_truncated and len(letter.payload) == DEAD_LETTER_PAYLOAD_CHARS
    assert letter.payload_bytes == len(original)
    assert letter.payload_sha256 == hashlib.sha256(original).hexdigest()
    assert original.decode().startswith(letter.payload)
    assert len(letter.reason) == REASON_CHARS


def test_a_dead_letter_that_fits_keeps_the_whole_payload() -> None:
    original = b'{"task": "t", "input": "\xff not utf-8"}'
    letter = DeadLetter.of("run.requested", original, reason="bad", deliveries=5)
    assert not letter.payload_truncated
    assert letter.payload == original.decode("utf-8", errors="replace")
    assert letter.payload_bytes == len(original)


def test_clip_keeps_short_text_and_marks_a_cut() -> None:
    assert clip("short", 10) == "short"
    assert clip("x" * 11, 10) == "x" * 9 + "…"
    assert len(clip("y" * 10_000, 10)) == 10
