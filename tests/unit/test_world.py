"""The FAKE ground-truth world: its closed form, exact effects, determinism, and its two scripts."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_core.messages import HumanMessage, SystemMessage

from ratchet import scripted
from ratchet.contracts import Check
from ratchet.rules import Rules, compose_system_prompt
from ratchet.sequential import design_for_pool
from ratchet.suites import Suite
from ratchet.world import (
    BASE_PROMPT,
    FakeProposer,
    World,
    WorldSettings,
    case_answer,
    case_index,
    format_prompt,
    level_for,
    parse_prompt,
    population_success,
    strip_tag,
    world_suite,
)
from ratchet_evaluator.checks import run_check
from ratchet_proposer.proposer import parse_proposal, proposal_messages

CASES = np.arange(100_000)
REPO = Path(__file__).resolve().parents[2]


def world(**settings: float) -> World:
    return World(WorldSettings(**settings))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("share", "unevenness"), [(0.5, 0.25), (0.0, 0.25), (1.0, 0.25), (0.3, 1.0)]
)
@pytest.mark.parametrize("success", [0.1, 0.5, 0.85])
def test_closed_form_matches_a_big_sample(share: float, unevenness: float, success: float) -> None:
    w = world(seed=11, deterministic_share=share, unevenness=unevenness)
    prompt = format_prompt(BASE_PROMPT, 7, success)
    p = w.pass_probability(CASES, prompt)
    assert w.true_success(prompt) == success
    assert abs(p.mean() - success) < 0.006  # 100,000 cases: the standard error is below 0.0016
    runs = w.sample(CASES, prompt, np.random.default_rng(1))
    assert abs(runs.mean() - success) < 0.008


def test_level_inverts_the_closed_form() -> None:
    targets = np.array([0.001, 0.02, 0.3, 0.5, 0.77, 0.98, 0.999])
    mu = level_for(targets, 0.5, 0.25)
    np.testing.assert_allclose(population_success(mu, 0.5, 0.25), targets, atol=1e-12)
    assert abs(float(level_for(0.5, 0.5, 0.25))) < 1e-12


def test_effects_are_exact_and_clipped() -> None:
    w = world(seed=2, base_success=0.6)
    proposer = FakeProposer(w)
    text, effect = proposer.candidate(BASE_PROMPT, 0.10)
    assert effect == pytest.approx(0.10, abs=1e-12)
    assert w.true_success(text) == pytest.approx(0.70, abs=1e-12)
    assert w.parse(text)[0] == 1
    worse, effect = proposer.candidate(text, -0.05)
    assert effect == pytest.approx(-0.05, abs=1e-12)
    assert w.parse(worse)[0] == 2
    assert w.parse(worse)[1] == pytest.approx(0.65)
    top, effect = proposer.candidate(text, 0.5)
    assert w.true_success(top) == 0.98
    assert effect == pytest.approx(0.28)
    bottom, _ = proposer.candidate(text, -0.9)
    assert w.true_success(bottom) == 0.02
    # and the population really moves by the stated effect
    p_before, p_after = w.pass_probability(CASES, BASE_PROMPT), w.pass_probability(CASES, text)
    assert abs((p_after.mean() - p_before.mean()) - 0.10) < 0.006


def test_proposals_follow_the_stated_distribution() -> None:
    w = world(seed=3)
    proposer = FakeProposer(w, seed=5)
    current = BASE_PROMPT
    ids, effects = [], []
    for _ in range(2000):
        text, effect = proposer.propose(current)
        ids.append(w.parse(text)[0])
        effects.append(effect)
        assert w.true_success(text) - w.true_success(current) == pytest.approx(effect, abs=1e-12)
    assert len(set(ids)) == 2000
    assert abs(np.mean(effects) + 0.01) < 0.005
    assert abs(np.std(effects) - 0.06) < 0.005


def test_determinism_per_seed_and_one_case_equals_many() -> None:
    prompt = format_prompt(BASE_PROMPT, 4, 0.55)
    a = world(seed=9).pass_probability(np.arange(500), prompt)
    b = world(seed=9).pass_probability(np.arange(500), prompt)
    c = world(seed=10).pass_probability(np.arange(500), prompt)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for i in (0, 17, 499):
        assert world(seed=9).pass_probability([i], prompt)[0] == a[i]
    first = world(seed=9).sample(np.arange(500), prompt, np.random.default_rng(4), 3)
    second = world(seed=9).sample(np.arange(500), prompt, np.random.default_rng(4), 3)
    np.testing.assert_array_equal(first, second)
    assert first.min() >= 0 and first.max() <= 3


def test_flaky_and_deterministic_cases_behave_as_named() -> None:
    w = world(seed=5, deterministic_share=0.5)
    cases = np.arange(20_000)
    deterministic = w.deterministic(cases)
    assert abs(deterministic.mean() - 0.5) < 0.02
    p = w.pass_probability(cases, BASE_PROMPT)
    assert set(np.unique(p[deterministic])) == {0.0, 1.0}
    assert ((p[~deterministic] > 0) & (p[~deterministic] < 1)).all()
    runs = w.sample(cases, BASE_PROMPT, np.random.default_rng(0), repeats=5)
    assert set(np.unique(runs[deterministic])) == {0, 5}  # all or nothing
    flaky_runs = runs[~deterministic]
    assert ((flaky_runs > 0) & (flaky_runs < 5)).mean() > 0.4  # many flaky cases go both ways
    assert set(np.unique(world(deterministic_share=1.0).pass_probability(cases, "x"))) == {0, 1}
    assert world(deterministic_share=0.0).deterministic(cases).sum() == 0


def test_a_plus_ten_change_still_breaks_some_cases() -> None:
    w = world(seed=6)
    cases = np.arange(20_000)
    better, effect = FakeProposer(w).candidate(BASE_PROMPT, 0.10)
    before = w.pass_probability(cases, BASE_PROMPT)
    after = w.pass_probability(cases, better)
    deterministic = w.deterministic(cases)
    broken = deterministic & (before == 1) & (after == 0)
    fixed = deterministic & (before == 0) & (after == 1)
    assert broken.sum() > 0.005 * len(cases)  # some cases get worse...
    assert fixed.sum() > 3 * broken.sum()  # ...far fewer than get better
    assert (after - before).mean() == pytest.approx(effect, abs=0.01)
    # without unevenness a change acts the same way on every case: nothing breaks
    even = world(seed=6, unevenness=0.0)
    assert not (
        (even.pass_probability(cases, BASE_PROMPT) == 1)
        & (even.pass_probability(cases, better) == 0)
    ).any()


@pytest.mark.parametrize(
    ("text", "base", "expected"),
    [
        ("Answer the question. [world prompt 17: success 0.5312]", 0.5, (17, 0.5312)),
        ("Answer the question.", 0.4, (0, 0.4)),
        ("RULES: x\n\nTASK:\nDo it. [world prompt 3: success 0.9] and more", 0.5, (3, 0.9)),
    ],
)
def test_tag_parse(text: str, base: float, expected: tuple[int, float]) -> None:
    assert parse_prompt(text, base) == expected


def test_tag_format_round_trip() -> None:
    for prompt_id, success in [(0, 0.5), (1, 0.02), (123456789, 0.987654), (42, 0.123456)]:
        text = format_prompt("Answer the question.", prompt_id, success)
        assert parse_prompt(text, 0.5) == (prompt_id, success)
        assert strip_tag(text) == "Answer the question."
        again = format_prompt(text, prompt_id + 1, 0.3)  # retagging replaces, never stacks
        assert again.count("[world prompt") == 1
        assert parse_prompt(again, 0.5) == (prompt_id + 1, 0.3)
    assert format_prompt(BASE_PROMPT, 17, 0.5312) == (
        "Answer the question. [world prompt 17: success 0.5312]"
    )
    with pytest.raises(ValueError):
        format_prompt(BASE_PROMPT, 1, 1.0)


def test_world_suite() -> None:
    data = world_suite(n_learn=5, n_gate=30, n_holdout=10, seed=1)
    assert (len(data["learn"]), len(data["gate"]), len(data["holdout"])) == (5, 30, 10)
    cases = data["learn"] + data["gate"] + data["holdout"]
    assert len({c["input"] for c in cases}) == 45
    for case in cases:
        index = case_index(case["input"])
        assert index is not None
        assert case["check"] == {"kind": "exact", "expected": case_answer(index)}
    assert data["prompt"] == BASE_PROMPT
    assert world_suite(5, 30, 10, seed=1) == data
    if "holdout" not in Suite.model_fields:  # the holdout split is not in the suite format yet
        data = {k: v for k, v in data.items() if k != "holdout"}
    Suite.model_validate(json.loads(json.dumps(data)))


def test_the_world_model_answers_right_at_about_the_true_rate() -> None:
    scripted._WORLD_RNG.seed(0)
    w = scripted._world()
    task = format_prompt(BASE_PROMPT, 99, 0.7)
    system = compose_system_prompt(Rules(rules=("Be honest.",), sha256="0"), task)
    model = scripted.scripted_model("world")
    right = 0
    n = 3000
    for index in range(n):
        reply = model.respond([SystemMessage(content=system), HumanMessage(f"World case {index}")])
        check = Check(kind="exact", expected=case_answer(index))
        score, _ = run_check(check, str(reply.content))
        right += int(score == 1.0)
    assert abs(right / n - w.true_success(task)) < 0.04
    expected = w.pass_probability(np.arange(n), system).mean()  # the cases actually asked
    assert abs(right / n - expected) < 0.03
    unknown = model.respond([SystemMessage(content=system), HumanMessage("What is 2 + 2?")])
    assert unknown.content == scripted.WORLD_WRONG_ANSWER


def test_the_world_model_sleeps_its_latency() -> None:
    model = scripted.ScriptedChatModel(script="world", respond=scripted.world_agent, latency_s=0.05)
    started = time.perf_counter()
    asyncio.run(model.ainvoke([HumanMessage("World case 1")]))
    assert time.perf_counter() - started >= 0.05


def test_the_world_proposer_proposes_a_new_world_prompt() -> None:
    w = scripted._world()
    current = format_prompt("Answer <carefully>.", 5, 0.6)
    model = scripted.scripted_model("world-proposer")
    reply = model.invoke(proposal_messages("world", current, [], []))
    prompt, rationale = parse_proposal(str(reply.content))
    prompt_id, success = w.parse(prompt)
    assert prompt_id not in (0, 5)
    assert strip_tag(prompt) == "Answer <carefully>."
    assert 0.02 <= success <= 0.98
    assert "true effect" in rationale
    second, _ = parse_proposal(
        str(model.invoke(proposal_messages("world", current, [], [])).content)
    )
    assert w.parse(second)[0] == prompt_id + 1


@pytest.fixture
def drift(monkeypatch: pytest.MonkeyPatch) -> Any:
    """benchmarks/drift.py as a module."""
    spec = importlib.util.spec_from_file_location("drift", REPO / "benchmarks" / "drift.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "drift", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_drift_benchmark_runs_small(
    drift: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """benchmarks/drift.py end to end at a toy size, in process (keeps the script working).

    It builds one design, the library's default for its pool; boundaries are cached per design,
    so the cost is paid once per process."""
    out = tmp_path / "drift.json"
    args = "--proposals 20 --histories 4 --steps 4 --bases 0.8 --effects=-5,20 --history-bases 0.5"
    assert drift.main([*args.split(), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    default = design_for_pool(report["settings"]["pool"])
    assert report["settings"]["design"]["looks"] == list(default.looks)
    assert report["settings"]["design"]["futility_cp"] == default.futility_cp
    rows = report["effect_sizes"]
    assert {r["rule"] for r in rows} == set(drift.RULES)
    assert all(r["decisions"] == 20 for r in rows)
    assert {(r["effect"], r["effect_used"]) for r in rows} == {(-5, -5), (20, 18), (None, None)}
    assert len(report["histories"]) == len(drift.RULES)
    gate = next(r for r in report["histories"] if r["rule"] == drift.GATE)
    verify = gate["verify"]
    assert verify["checks"] == sum(verify["approved_by_sign"].values())
    assert verify["runs"] == 2 * verify["cases"]
    assert all(r["verify"] is None for r in report["histories"] if r["rule"] != drift.GATE)
    text = capsys.readouterr().out
    assert "Done-when targets" in text
    assert "effect +18 (asked +20, capped): kept >= 99%" in text


def test_the_benchmark_gate_matches_analyse_look_by_look(drift: Any) -> None:
    """The benchmark memoises ``analyse`` on counts; its verdicts are those of plain analyse."""
    design = design_for_pool(220)
    rng = np.random.default_rng(3)
    p = rng.uniform(0.2, 0.8, (300, 1))
    lift = rng.choice([-0.05, 0.0, 0.05, 0.1], (300, 1))
    diffs = rng.binomial(1, np.clip(p + lift, 0, 1), (300, 200)) - rng.binomial(1, p, (300, 200))
    fast = drift.Gate(design).decide(diffs)
    for row, result in zip(diffs.tolist(), fast, strict=True):
        plain = drift.gate_decide(row, design)
        assert (result.verdict, result.n, result.z) == (plain.verdict, plain.n, plain.z)
    assert {r.verdict for r in fast} == {"superior", "futile", "not_shown"}
