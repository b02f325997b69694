"""The review console's parts that need no stack: its accounts file, what its pages show, how
they show untrusted text, and how it reads forms. The console against a real stack, in a
browser, is tests/browser/test_console_browser.py."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import re
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bcrypt
import httpx
import pytest
from conftest import measurement
from nats.aio.msg import Msg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ratchet.cli import main
from ratchet.console import accounts as accounts_module
from ratchet.console import app as app_module
from ratchet.console import views
from ratchet.console.accounts import AccountError, Accounts, ConsoleState
from ratchet.console.app import (
    HERE,
    LOGIN_CHECKS,
    LOGIN_COOKIE,
    LOGIN_FAILURES,
    LOGIN_NAMES_KEPT,
    SESSION_COOKIE,
    ConsoleConfig,
    LoginThrottle,
    _local,
    build_console,
    form_of,
    templates,
)
from ratchet.console.backend import relayed
from ratchet.contracts import Check, utcnow
from ratchet.natsconf import write_secret
from ratchet.queries import GateCase, GateRun
from ratchet.settings import get_settings
from ratchet.store import AuditRecord
from ratchet.suites import Case, Suite

HOSTILE = "<script>alert(1)</script><b style='color:red'>x</b>\u202eevil\x1b[31m"
PASSWORD = "a long enough passphrase"


@pytest.fixture
def accounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Accounts:
    monkeypatch.setattr(accounts_module, "PASSWORD_COST", 4)  # fast hashes for the tests
    return Accounts.in_home(tmp_path / "home")


# --- accounts and sessions ----------------------------------------------------------------------


def test_an_account_signs_in_with_its_password_only(accounts: Accounts) -> None:
    accounts.add("alice", "reviewer", PASSWORD)
    assert accounts.authenticate("alice", PASSWORD) is not None
    assert accounts.authenticate("alice", PASSWORD + "!") is None
    assert accounts.authenticate("mallory", PASSWORD) is None
    # the file is the owner's alone and holds a salted hash, never the password
    assert accounts.path.stat().st_mode & 0o777 == 0o600
    text = accounts.path.read_text()
    assert PASSWORD not in text and "$2b$04$" in text


def test_names_and_passwords_are_checked(accounts: Accounts) -> None:
    for name in ("Alice", "al.ice", "console.alice", "-x", "a" * 33, ""):
        with pytest.raises(AccountError, match="not a console name"):
            accounts.add(name, "viewer", PASSWORD)
    with pytest.raises(AccountError, match="at least 10 characters"):
        accounts.add("alice", "viewer", "short")
    with pytest.raises(AccountError, match="at most 72 bytes"):
        accounts.add("alice", "viewer", "é" * 40)
    with pytest.raises(AccountError, match="choose one of reviewer, viewer"):
        accounts.add("alice", "admin", PASSWORD)  # type: ignore[arg-type]
    accounts.add("alice", "viewer", PASSWORD)
    with pytest.raises(AccountError, match="exists"):
        accounts.add("alice", "reviewer", PASSWORD)
    assert [(a.name, a.role) for a in accounts.every()] == [("alice", "viewer")]


def test_a_session_lasts_until_it_expires_or_its_account_changes(accounts: Accounts) -> None:
    accounts.add("alice", "viewer", PASSWORD)
    token, session = accounts.open_session("alice", timedelta(hours=1))
    assert token not in accounts.path.read_text()  # only its hash is kept
    assert accounts.session(token) == (session, "viewer")
    assert accounts.session(token, now=utcnow() + timedelta(hours=2)) is None
    assert accounts.session("not a token") is None
    # a changed account signs in again; a removed one is gone with its sessions
    accounts.add("alice", "reviewer", PASSWORD, replace=True)
    assert accounts.session(token) is None
    token, _ = accounts.open_session("alice", timedelta(hours=1))
    assert accounts.session(token) is not None and accounts.session(token)[1] == "reviewer"  # type: ignore[index]
    accounts.remove("alice")
    assert accounts.session(token) is None
    with pytest.raises(AccountError, match="no account"):
        accounts.remove("alice")


def test_signing_out_ends_the_session(accounts: Accounts) -> None:
    accounts.add("alice", "reviewer", PASSWORD)
    token, _ = accounts.open_session("alice", timedelta(hours=1))
    accounts.close_session(token)
    assert accounts.session(token) is None


def test_a_proxied_name_without_an_account_has_the_proxy_role(accounts: Accounts) -> None:
    token, _ = accounts.open_session("carol", timedelta(hours=1), proxy_role="viewer")
    assert accounts.session(token) is not None and accounts.session(token)[1] == "viewer"  # type: ignore[index]
    # a password session for a name without an account is nobody's
    orphan, _ = accounts.open_session("dave", timedelta(hours=1))
    assert accounts.session(orphan) is None
    assert accounts.every() == []  # no account was made


def test_sessions_are_bounded(accounts: Accounts, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounts_module, "MAX_SESSIONS", 3)
    accounts.add("alice", "viewer", PASSWORD)
    tokens = [accounts.open_session("alice", timedelta(hours=1 + i))[0] for i in range(5)]
    alive = [t for t in tokens if accounts.session(t)]
    assert alive == tokens[2:]  # the ones ending soonest made room


def test_a_name_makes_room_among_its_own_sessions_first(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accounts_module, "MAX_SESSIONS", 4)
    for name in ("alice", "bob", "carol"):
        accounts.add(name, "viewer", None)
    bob, _ = accounts.open_session("bob", timedelta(minutes=1))  # ends soonest of all
    alice = [accounts.open_session("alice", timedelta(hours=1 + i))[0] for i in range(6)]
    assert accounts.session(bob) is not None  # alice's own sessions made the room
    assert [t for t in alice if accounts.session(t)] == alice[3:]
    carol, _ = accounts.open_session("carol", timedelta(hours=9))  # none of her own: the soonest
    assert accounts.session(carol) is not None and accounts.session(bob) is None


def test_wrong_passwords_are_throttled_per_name() -> None:
    throttle = LoginThrottle()
    for _ in range(5):
        assert not throttle.blocked("alice")
        throttle.failed("alice")
    assert throttle.blocked("alice") and not throttle.blocked("bob")
    throttle.succeeded("alice")
    assert not throttle.blocked("alice")
    assert not throttle.blocked("never-seen") and "never-seen" not in throttle.failures


def test_the_throttle_is_bounded_by_construction() -> None:
    """Console names only, a few times each, and a fixed number of names: a flood of sign-ins
    with ever new names cannot grow it."""
    throttle = LoginThrottle()
    with pytest.raises(AccountError, match="not a console name"):
        throttle.failed("x" * 16_000)
    for i in range(LOGIN_NAMES_KEPT + 2_000):
        throttle.failed(f"n{i}")
    for _ in range(LOGIN_FAILURES * 4):
        throttle.failed("alice")
    assert len(throttle.failures) == LOGIN_NAMES_KEPT
    assert "n0" not in throttle.failures and throttle.blocked("alice")
    assert max(len(k) for k in throttle.failures) <= 32
    assert max(len(t) for t in throttle.failures.values()) == LOGIN_FAILURES


# --- what the pages show ------------------------------------------------------------------------


def record(seq: int, kind: str, payload: dict[str, Any], actor: str = "gatekeeper") -> AuditRecord:
    return AuditRecord(
        seq=seq,
        change_id="c1",
        kind=kind,
        actor=actor,
        payload=payload,
        at=utcnow(),
        prev_hash="0" * 64,
        hash="1" * 64,
    )


def a_trail(*more: AuditRecord, rationale: str = "fewer words") -> list[AuditRecord]:
    m = measurement(fixed=["case-1"], broken=["case-2"], flaky=["case-2", "case-3"], repeats=2)
    return [
        record(
            1,
            "received",
            {
                "task": "t",
                "base_version": 3,
                "proposed_prompt": "Be brief.",
                "rationale": rationale,
                "margin": 0.05,
                "groups": [
                    {"label": "too long", "size": 2, "run_ids": ["r1", "r2"], "examples": ["p"]}
                ],
            },
            actor="console.alice",
        ),
        record(2, "measured", m.model_dump(mode="json")),
        record(
            3,
            "awaiting_approval",
            {"prompt_diff": "--- current\n+++ proposed\n-Be.\n+Be brief.", "evidence_sha256": "e"},
        ),
        *more,
    ]


def test_a_change_page_from_its_trail() -> None:
    canary = {"stats": {"canary_runs": 40, "lift": -0.01}, "reason": "not worse", "version": 5}
    trail = a_trail(
        record(4, "approved", {"approver": "console.alice", "reason": "ok"}, "console.alice"),
        record(5, "applied", {"version": 5}),
        record(6, "canary", {"share": 0.1}),
        record(7, "promoted", canary),
        record(8, "holdout", {"lift": 0.1, "ci95": [0.0, 0.2], "cases": 80, "gate_lift": 0.2,
                              "pool_overfit_warning": False}),
    )  # fmt: skip
    view = views.change_view(trail)
    assert view.status == "promoted"  # the holdout reports, it is no step
    assert (view.task, view.proposer, view.base_version) == ("t", "console.alice", 3)
    assert view.test == "non-inferiority, margin 5%"
    assert not view.waiting and view.decision is not None and view.decision.actor == "console.alice"
    assert [r.kind for r in view.canary] == ["canary", "promoted"]  # shown whatever they hold
    assert [d.kind for d in view.diff] == ["file", "file", "remove", "add"]
    assert any(line.startswith("holdout: lift +10.0%") for line in view.after)
    assert views.change_view(a_trail()).waiting


def test_the_evidence_shows_cases_only_from_the_pool_it_measured() -> None:
    m = views.measurement_of(a_trail())
    assert m is not None
    cases = [
        Case(id=f"case-{i}", input=f"question {i}", check=Check(kind="exact", expected=str(i)))
        for i in range(1, 4)
    ]
    suite = Suite(name="t", description="", prompt="Be.", learn=[], gate=cases)
    other = views.evidence(m, suite)  # its hash is not the measurement's pool
    assert all(c.input is None for c in other.cases) and "not the pool" in other.cases_note
    same = views.evidence(m.model_copy(update={"pool_sha256": suite.gate_pool_sha256()}), suite)
    assert [(c.id, c.outcome, c.flaky, c.input) for c in same.cases] == [
        ("case-1", "fixed", False, "question 1"),
        ("case-2", "broken", True, "question 2"),
        ("case-3", "flaky", True, "question 3"),
    ]
    assert same.cases_note == "" and same.lines[0].startswith("verdict: shown better")
    assert "no suite" in views.evidence(m, None).cases_note


def runs_of(case: str, repeats: int, *, current: str = "The answer is 12.") -> GateCase:
    """What the failure store answers for one case: both arms, ``repeats`` runs each."""
    runs = [
        GateRun(arm=arm, repeat=r, output=out, score=score, scorer="check:exact", prompt_version=v)
        for arm, out, score, v in (("current", current, 0.0, 3), ("candidate", "12", 1.0, 0))
        for r in range(repeats)
    ]
    return GateCase(
        case_id=case, input=f"input of {case}", check=Check(kind="exact", expected="12"), runs=runs
    )


def test_the_evidence_shows_the_first_cases_of_each_outcome_with_both_prompts_answers() -> None:
    m = measurement(
        fixed=[f"f{i}" for i in range(25)],
        broken=["b1", "b2"],
        flaky=["b2", *(f"x{i}" for i in range(12))],
        repeats=5,
    )
    shown = views.evidence(m, None)
    outcomes = [c.outcome for c in shown.cases]
    assert outcomes == ["fixed"] * 20 + ["broken"] * 2 + ["flaky"] * 10
    assert shown.more == {"fixed": 5, "flaky": 2} and shown.repeats_shown == 3
    assert "no suite" in shown.cases_note

    found = [runs_of(c.id, 3) for c in shown.cases if c.id != "f3"]
    views.with_runs(shown, found)
    f0 = shown.cases[0]
    assert (f0.input, f0.check) == ("input of f0", Check(kind="exact", expected="12"))
    assert [(r.repeat, r.output) for r in f0.arm("current")] == [
        (i, "The answer is 12.") for i in range(3)
    ]
    assert [r.output for r in f0.arm("candidate")] == ["12"] * 3
    assert shown.cases[3].runs == [] and shown.cases[3].input is None
    assert "no suite" in shown.cases_note  # f3's input is known nowhere
    assert shown.runs_note.startswith("The failure store holds no runs of 1 of these cases")
    assert "did not answer" in views.with_runs(views.evidence(m, None), None).runs_note


def test_a_measured_change_shows_what_both_prompts_answered() -> None:
    """One line per case shown, and for each case both arms' runs with their outputs and scores,
    as text: an output is data however it reads."""
    m = measurement(fixed=["case-1", "case-2"], broken=["case-3"], flaky=["case-3"], repeats=2)
    trail = [
        *a_trail()[:1],
        record(2, "measured", m.model_dump(mode="json")),
        record(3, "awaiting_approval", {"prompt_diff": "+Be brief.", "evidence_sha256": "e"}),
    ]
    view = views.change_view(trail)
    found = [runs_of("case-1", 2), runs_of("case-3", 2, current=HOSTILE)]
    view.evidence = views.with_runs(views.evidence(m, None), found)
    html = render("change.html", change=view, notice=None, error=None, reason="", live_canary=None)

    assert html.count('<details class="case"') == 3
    assert html.count('<div class="run run-current">') == 4
    assert html.count('<div class="run run-candidate">') == 4
    assert html.count(">The answer is 12.</pre>") == 2 and html.count(">12</pre>") == 4
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert html.count("no stored run") == 2  # case-2: neither arm
    assert "input of case-3" in html and "exact: <code>&#34;12&#34;</code>" in html
    assert "holds no runs of 1 of these cases" in html


def test_the_targeted_failures_come_with_their_groups() -> None:
    trail = a_trail()
    assert views.targeted_runs(trail) == {"r1", "r2"}
    failure = SimpleNamespace(run_id="r2")
    [group] = views.groups(trail, [failure])  # type: ignore[list-item]
    assert (group.label, group.size, group.failures) == ("too long", 2, [failure])


def render(template: str, **context: Any) -> str:
    visitor = SimpleNamespace(name="alice", role="reviewer", csrf="tok", reviewer=True)
    env = templates()
    return env.get_template(template).render(
        visitor=visitor, path="/changes/c1", max_reason=2000, **context
    )


def test_untrusted_text_is_data_on_every_page() -> None:
    """Rationale, prompt diff, decisions, failure text and any record's fields are escaped, and
    their control and bidirectional characters shown, never obeyed."""
    diff = f"+{HOSTILE}"
    trail = [
        *a_trail(rationale=HOSTILE)[:2],
        record(3, "awaiting_approval", {"prompt_diff": diff, "evidence_sha256": "e"}),
        record(4, "rejected", {"reason": HOSTILE}, f"console.{HOSTILE}"),
        record(5, "canary", {HOSTILE: {"nested": [HOSTILE]}}),
    ]
    view = views.change_view(trail)
    html = render(
        "change.html",
        change=view,
        notice=None,
        error=HOSTILE,
        reason=HOSTILE,
        live_canary={"canary_runs": 40, HOSTILE: HOSTILE},
    )
    assert "<script>" not in html and "<b " not in html and "\u202e" not in html
    assert "\x1b" not in html
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 6
    assert "\\u202eevil\\x1b[31m" in html  # shown, so a reader sees something is there


def test_the_templates_run_no_inline_code_and_trust_no_text() -> None:
    """The Content-Security-Policy allows only the console's own files; the templates match it:
    no inline script or style, no event handler attributes, and nothing marked safe."""
    for path in sorted((HERE / "templates").glob("*.html")):
        text = path.read_text()
        assert "|safe" not in text.replace(" ", ""), path.name
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), path.name
        assert not re.search(r"<style|\sstyle=|\son[a-z]+=", text), path.name
        assert "autoescape false" not in text, path.name


def test_a_change_event_is_relayed_as_its_subject_and_change_only() -> None:
    def msg(subject: str, body: object) -> Msg:
        return SimpleNamespace(subject=subject, data=json.dumps(body).encode())  # type: ignore[return-value]

    recorded = msg("change.recorded", {"change_id": "c1", "kind": "approved", "secret": "x"})
    assert json.loads(relayed(recorded) or "") == {
        "subject": "change.recorded",
        "change_id": "c1",
        "kind": "approved",
    }
    proposed = msg("change.proposed.client", {"change_id": "c2", "rationale": HOSTILE})
    assert json.loads(relayed(proposed) or "")["kind"] is None
    assert relayed(msg("change.x", ["no", "object"])) is None
    broken = SimpleNamespace(subject="change.x", data=b"{not json")
    assert relayed(broken) is None  # type: ignore[arg-type]


# --- requests -----------------------------------------------------------------------------------


def test_after_signing_in_only_a_local_path() -> None:
    assert _local("/changes/c1") == "/changes/c1"
    for target in (None, "", "//evil.example/", "https://evil.example/", "/\\evil", "changes"):
        assert _local(target) == "/changes"


def test_forms_are_read_within_bounds() -> None:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse(await form_of(request))

    client = TestClient(Starlette(routes=[Route("/", echo, methods=["POST"])]))
    assert client.post("/", data={"a": "1", "b": "é"}).json() == {"a": "1", "b": "é"}
    assert client.post("/", json={"a": "1"}).status_code == 415
    assert client.post("/", data={"a": "x" * 20_000}).status_code == 413
    assert client.post("/", data={f"f{i}": "1" for i in range(20)}).status_code == 400
    bad = client.post(
        "/", content=b"a=%ff", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert bad.status_code == 200  # invalid UTF-8 in an escape is replaced, not a crash


# --- `ratchet console user` ---------------------------------------------------------------------


def test_accounts_are_made_from_the_command_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(accounts_module, "PASSWORD_COST", 4)
    monkeypatch.setenv("RATCHET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    fresh_settings()

    def ratchet(*args: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = main(["console", "user", *args])
        out, err = capsys.readouterr()
        return code, out, err

    add = ("add", "alice", "--role", "reviewer", "--password-stdin")
    assert ratchet(*add, stdin=PASSWORD + "\n") == (
        0,
        "alice: reviewer, signs in with a password\n",
        "",
    )
    assert Accounts.in_home(tmp_path / "home").authenticate("alice", PASSWORD) is not None
    assert ratchet(*add, stdin=PASSWORD) == (
        1,
        "",
        "ratchet: error: account 'alice' exists (--replace to change it)\n",
    )
    short = ratchet("add", "bob", "--role", "viewer", "--password-stdin", stdin="short\n")
    assert short[0] == 1 and short[2].endswith("at least 10 characters\n")
    no_tty = ratchet("add", "bob", "--role", "viewer")
    assert (
        no_tty[2] == "ratchet: error: no terminal to ask for the password: use --password-stdin\n"
    )
    assert ratchet("add", "carol", "--role", "viewer", "--no-password")[1] == (
        "carol: viewer, signs in through the trusted proxy only\n"
    )
    listed = ratchet("list")[1]
    assert re.search(r"alice\W+reviewer\W+password", listed)
    assert re.search(r"carol\W+viewer\W+trusted proxy only", listed)
    assert ratchet("remove", "alice")[1] == "removed alice (and ended their sessions)\n"
    assert ratchet("remove", "alice")[2] == "ratchet: error: no account 'alice'\n"
    monkeypatch.undo()
    fresh_settings()  # the next test reads its own environment


def fresh_settings() -> None:
    """Settings read from the environment as it is now (get_settings may keep the first)."""
    getattr(get_settings, "cache_clear", lambda: None)()


def test_the_proxy_options_go_together(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["console", "--identity-header", "X-Forwarded-User"]) == 1
    assert capsys.readouterr().err == (
        "ratchet: error: --identity-header and --trusted-proxy go together\n"
    )


# --- the console app, unauthenticated requests ---------------------------------------------------


class FakeBackend:
    """A fake of the console's NATS side, enough for the prompts page: connected, no tasks."""

    connected = True

    async def tasks(self) -> list[str]:
        return []


def http(
    accounts: Accounts, config: ConsoleConfig | None = None, client: str = "127.0.0.1"
) -> httpx.AsyncClient:
    """The console app on ``accounts`` (with a fake backend), asked as if from ``client``."""
    app = build_console(FakeBackend(), accounts, config)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app, client=(client, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://console")


async def sign_in(client: httpx.AsyncClient, name: str, password: str) -> httpx.Response:
    """A sign-in post with the login form's double-submit token, as the form sends it."""
    return await client.post(
        "/login",
        data={"name": name, "password": password, "nonce": "n"},
        headers={"cookie": f"{LOGIN_COOKIE}=n"},
    )


async def test_a_name_no_account_can_have_is_refused_without_a_password_check(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    accounts.add("alice", "reviewer", PASSWORD)
    checked: list[bytes] = []
    checkpw = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        checked.append(password)
        return checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    async with http(accounts) as client:
        for name in ("x" * 15_000, "Alice", "al.ice", "a" * 33):
            refused = await sign_in(client, name, PASSWORD)
            assert refused.status_code == 401 and "Wrong name or password." in refused.text
        assert checked == []
        wrong = await sign_in(client, "mallory", PASSWORD)
        assert wrong.status_code == 401 and "Wrong name or password." in wrong.text
        assert len(checked) == 1  # a valid name costs a check, known or not
        right = await sign_in(client, "alice", PASSWORD)
        assert right.status_code == 303 and SESSION_COOKIE in right.headers["set-cookie"]
        assert len(checked) == 2


class SlowCheck:
    """A fake password check that takes ``seconds`` and counts how many run at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.running = 0
        self.most = 0
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, name: str, password: str) -> None:
        with self.lock:
            self.calls += 1
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1


async def test_password_checks_run_a_few_at_a_time(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowCheck(0.05)
    monkeypatch.setattr(accounts, "authenticate", slow)
    async with http(accounts) as client:
        answers = await asyncio.gather(*(sign_in(client, f"u{i}", "x") for i in range(8)))
    assert [a.status_code for a in answers] == [401] * 8
    assert slow.calls == 8 and slow.most == LOGIN_CHECKS == 2


async def test_a_sign_in_that_waits_too_long_for_its_turn_is_told_to_try_again(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowCheck(0.3)
    monkeypatch.setattr(accounts, "authenticate", slow)
    monkeypatch.setattr(app_module, "LOGIN_WAIT_S", 0.1)
    async with http(accounts) as client:
        answers = await asyncio.gather(*(sign_in(client, f"u{i}", "x") for i in range(5)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [401, 401, 503, 503, 503] and slow.calls == LOGIN_CHECKS
    assert all("try again in a moment" in a.text for a in answers if a.status_code == 503)


async def test_proxied_requests_without_a_cookie_share_one_session(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,500 requests the trusted proxy sends for one name without a cookie make one session
    for it, write the file once, and end nobody else's session."""
    monkeypatch.setattr(accounts_module, "MAX_SESSIONS", 20)
    accounts.add("alice", "reviewer", None)
    others = [
        accounts.open_session(f"p{i}", timedelta(hours=1), proxy_role="viewer")[0]
        for i in range(19)
    ]
    config = ConsoleConfig(
        identity_header="X-Remote-User",
        trusted_proxies=[ipaddress.ip_network("10.0.0.7/32")],
        proxy_role="viewer",
    )
    writes = 0

    def counting(path: Path, text: str) -> None:
        nonlocal writes
        writes += 1
        write_secret(path, text)

    monkeypatch.setattr("ratchet.console.accounts.write_secret", counting)
    csrf: set[str] = set()
    async with http(accounts, config, client="10.0.0.7") as proxy:
        for _ in range(1_500):
            proxy.cookies.clear()
            page = await proxy.get("/prompts", headers={"X-Remote-User": "alice"})
            assert page.status_code == 200 and 'role-reviewer">reviewer' in page.text
            csrf.add(re.findall(r'name="csrf" value="([^"]+)"', page.text)[0])
    assert writes == 1 and len(csrf) == 1  # one session, its CSRF token every time
    assert all(accounts.session(t) is not None for t in others)
    stored = ConsoleState.model_validate_json(accounts.path.read_text()).sessions.values()
    assert len(stored) == accounts_module.MAX_SESSIONS == 20
    assert [(s.name, s.via) for s in stored].count(("alice", "proxy")) == 1
