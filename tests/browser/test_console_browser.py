"""The review console against a real stack: nats-server and every service with scripted models,
and no policy approver, so a person decides. The stack starts once for this module, with two
console accounts made by `ratchet console user add` and `ratchet console` serving them, as an
operator starts them.

The browser tests drive Debian's Chromium (scripts/install.sh installs it) through Playwright,
launched with ``executable_path``, so Playwright downloads no browser of its own; without Chromium
they are skipped, with that reason. They sign in, read a measured change (each case fixed or
broken with what both prompts answered, as the failure store keeps the gate runs), approve it
(which resumes the waiting gatekeeper: the trail names the reviewer and the reason), reject one,
and roll a prompt back (a proposal through the gate). With ``RATCHET_SCREENSHOTS=docs/screenshots``
they also save screenshots of the main pages there. The access tests speak plain HTTP and always
run: a decision without a reviewer's session and CSRF token reaches nothing on NATS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import cli, trail_reaching
from nats.aio.msg import Msg
from pydantic import TypeAdapter

from ratchet.cli.client import fetch_trail, request
from ratchet.cli.up import Stack, start_stack
from ratchet.console import views
from ratchet.console.accounts import Accounts
from ratchet.console.app import ConsoleConfig, build_console
from ratchet.console.backend import CONSOLE_USER, Backend
from ratchet.contracts import ChangeApproved, DeadLetter, Measurement
from ratchet.messaging import EVENTS_STREAM, connect, publish_js
from ratchet.natsproc import free_port, wait_for_port
from ratchet.queries import GateCase, RunsQuery
from ratchet.settings import GateSettings, ModelSettings, Settings, to_env
from ratchet.store import AuditRecord
from ratchet.suites import load_suite

REPO = Path(__file__).resolve().parents[2]
TASK = load_suite(REPO / "config" / "suites" / "demo.json").name
REVIEWER, REVIEWER_PASSWORD = "alice", "alice's long passphrase"
VIEWER, VIEWER_PASSWORD = "bob", "bob's long passphrase"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = os.environ.get("RATCHET_SCREENSHOTS")  # a folder: docs/screenshots
HOSTILE = "<script>alert('pwned')</script> <b style=color:red>loud</b> \u202egnp.exe"
# Decisions, proposals and queries: whatever the console could send about a change
CONSOLE_SUBJECTS = ("change.approved.>", "change.rejected.>", "change.proposed.>", "query.>")

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium: scripts/install.sh installs Debian's package when run as root",
)


@dataclass
class Console:
    """A running `ratchet console` and the stack it serves."""

    stack: Stack
    url: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = Settings(
        home=tmp_path_factory.mktemp("console") / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        agent=ModelSettings(spec="scripted:prompt-sensitive"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:proposer-fix"),
        gate=GateSettings(run_timeout_s=60),
    )
    running = start_stack(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def console(stack: Stack) -> Iterator[Console]:
    """`ratchet console` on a free port, with a reviewer and a viewer made by `ratchet console
    user add`, the way an operator makes them."""
    env = {**os.environ, **to_env(stack.settings)}
    for name, role, password in (
        (REVIEWER, "reviewer", REVIEWER_PASSWORD),
        (VIEWER, "viewer", VIEWER_PASSWORD),
    ):
        added = subprocess.run(
            [sys.executable, "-m", "ratchet.cli", "console", "user", "add", name, "--role", role,
             "--password-stdin"],
            input=password + "\n", env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert added.stdout.startswith(f"{name}: {role}"), added.stdout
    port = free_port()
    with open(stack.logs / "console.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "ratchet.cli", "console", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, timeout=30)
        yield Console(stack=stack, url=f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(timeout=15)


# --- helpers ------------------------------------------------------------------------------------


def propose(stack: Stack, prompt: str, *, because: str = "by hand", margin: float = 0.0) -> str:
    """A person's own change, proposed with the CLI; its id."""
    extra = ["--margin", str(margin)] if margin else []
    proposed = cli(stack, "propose", TASK, "--prompt", prompt, "--because", because, *extra)
    assert proposed.returncode == 0, proposed.stderr
    found = re.search(r"proposed change (\w+)", proposed.stdout)
    assert found, proposed.stdout
    return found.group(1)


async def waiting_change(stack: Stack, prompt: str, **how: Any) -> str:
    """A change the gate has measured and that now waits for a person."""
    change_id = await asyncio.to_thread(propose, stack, prompt, **how)
    await trail_reaching(stack, change_id, "awaiting_approval", timeout=120)
    return change_id


async def trail(stack: Stack, change_id: str) -> list[AuditRecord]:
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("client"), name="test-trail")
    try:
        return await fetch_trail(nc, change_id)
    finally:
        await nc.close()


def one(records: list[AuditRecord], kind: str) -> AuditRecord:
    [record] = [r for r in records if r.kind == kind]
    return record


async def runs_stored(stack: Stack, timeout: float = 30) -> None:
    """Until the failure store has handled every run event in the stream (its consumers have
    nothing pending or unacknowledged): the gate's runs of a measured change are all stored."""
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("admin"), name="test-runs-stored")
    js = nc.jetstream()

    async def drained() -> None:
        while True:
            infos = [
                await js.consumer_info(EVENTS_STREAM, durable)
                for durable in ("failure-store-completed", "failure-store-scored")
            ]
            if all((i.num_pending, i.num_ack_pending) == (0, 0) for i in infos):
                return
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(drained(), timeout)
    finally:
        await nc.close()


async def gate_runs(stack: Stack, change_id: str, case_ids: list[str]) -> list[GateCase]:
    """What the failure store answers the CLI's user on ``query.runs``."""
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("client"), name="test-gate-runs")
    try:
        asked = RunsQuery(change_id=change_id, case_ids=case_ids, repeats=views.SHOWN_REPEATS)
        return await request(
            nc, "query.runs", asked, TypeAdapter(list[GateCase]), service="failure store"
        )
    finally:
        await nc.close()


async def sign_in(client: httpx.AsyncClient, name: str, password: str) -> None:
    """Sign in as a browser does: the form (and its cookie) first, then the post."""
    form = await client.get("/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
    assert nonce, form.text
    done = await client.post(
        "/login", data={"nonce": nonce.group(1), "name": name, "password": password}
    )
    assert done.status_code == 303 and done.headers["location"] == "/changes", done.text


def field(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]+)"', html)
    assert found, f"no {name} field on the page"
    return found.group(1)


@asynccontextmanager
async def in_process(
    stack: Stack, config: ConsoleConfig | None = None, *, client: str = "127.0.0.1"
) -> AsyncIterator[httpx.AsyncClient]:
    """The console app in this process, on the stack's NATS as ``approver-console`` and its
    accounts, asked over HTTP as if from ``client``'s address."""
    assert stack.nats is not None
    backend = Backend(stack.nats.settings_for(CONSOLE_USER, stack.settings))
    app = build_console(backend, Accounts.in_home(stack.settings.home), config)
    await backend.start()
    transport = httpx.ASGITransport(app=app, client=(client, 40000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as http:
            yield http
    finally:
        await backend.stop()


class Counter:
    """Every message on the subjects the console could publish to, as the admin sees them."""

    def __init__(self) -> None:
        self.subjects: list[str] = []
        self.arrived = asyncio.Event()

    async def on_message(self, msg: Msg) -> None:
        self.subjects.append(msg.subject)
        self.arrived.set()

    async def until(self, count: int, timeout: float = 30) -> list[str]:
        while len(self.subjects) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), timeout)
        return self.subjects


# --- access, over plain HTTP --------------------------------------------------------------------


async def test_a_decision_needs_a_reviewers_session_and_its_csrf_token(console: Console) -> None:
    """Without a session, with a viewer's session, or without (or with a wrong) CSRF token, a
    decision is refused and nothing reaches NATS; the reviewer's own is published once."""
    stack = console.stack
    change_id = await waiting_change(stack, "Help the user, please.")  # no better, no worse
    assert stack.nats is not None
    admin = await connect(stack.nats.settings_for("admin"), name="test-counter")
    counter = Counter()
    try:
        async with (
            httpx.AsyncClient(base_url=console.url) as nobody,
            httpx.AsyncClient(base_url=console.url) as viewer,
            httpx.AsyncClient(base_url=console.url) as reviewer,
        ):
            page = f"/changes/{change_id}"
            decision = f"{page}/decision"
            await sign_in(viewer, VIEWER, VIEWER_PASSWORD)
            await sign_in(reviewer, REVIEWER, REVIEWER_PASSWORD)
            shown = (await reviewer.get(page)).text
            form = {
                "decision": "approve",
                "reason": "looks right",
                "evidence": field(shown, "evidence"),
                "csrf": field(shown, "csrf"),
            }
            viewer_csrf = field((await viewer.get(page)).text, "csrf")
            # from here on, count what the console sends
            for subject in CONSOLE_SUBJECTS:
                await admin.subscribe(subject, cb=counter.on_message)
            await admin.flush()
            refusals = {
                "no session": (await nobody.post(decision, data=form)).status_code,
                "a viewer's session": (
                    await viewer.post(decision, data={**form, "csrf": viewer_csrf})
                ).status_code,
                "no csrf token": (
                    await reviewer.post(
                        decision, data={k: v for k, v in form.items() if k != "csrf"}
                    )
                ).status_code,
                "a wrong csrf token": (
                    await reviewer.post(decision, data={**form, "csrf": viewer_csrf})
                ).status_code,
                "not a form": (await reviewer.post(decision, json=form)).status_code,
            }
            assert refusals == {
                "no session": 401,
                "a viewer's session": 403,
                "no csrf token": 403,
                "a wrong csrf token": 403,
                "not a form": 415,
            }
            # the reviewer's own decision: read the trail once, publish once
            accepted = await reviewer.post(decision, data=form)
            assert accepted.status_code == 303, accepted.text
            assert accepted.headers["location"] == f"{page}?done=approved"
        subjects = await counter.until(2)
        assert subjects == ["query.change", f"change.approved.console.{REVIEWER}"]
    finally:
        await admin.close()
    await trail_reaching(stack, change_id, "approved", timeout=30)
    approved = one(await trail(stack, change_id), "approved")
    assert approved.actor == f"console.{REVIEWER}"
    assert approved.payload["reason"] == "looks right"
    # deciding again is refused by the console itself, with the reason on the page
    async with httpx.AsyncClient(base_url=console.url) as reviewer:
        await sign_in(reviewer, REVIEWER, REVIEWER_PASSWORD)
        again = await reviewer.post(
            f"/changes/{change_id}/decision",
            data={**form, "csrf": field((await reviewer.get(page)).text, "csrf")},
        )
        assert again.status_code == 409 and "is already approved" in again.text


async def test_pages_need_a_session_and_sign_in_is_checked(console: Console) -> None:
    async with httpx.AsyncClient(base_url=console.url) as http:
        for path in ("/changes", "/prompts", "/audit", f"/prompts/{TASK}"):
            response = await http.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"] == f"/login?next={path}"
        assert (await http.get("/events")).status_code == 303
        form = await http.get("/login")
        assert form.headers["content-security-policy"].startswith("default-src 'none'")
        nonce = field(form.text, "nonce")
        wrong = await http.post(
            "/login", data={"nonce": nonce, "name": REVIEWER, "password": "not the passphrase"}
        )
        assert wrong.status_code == 401 and "Wrong name or password." in wrong.text
        unknown = await http.post(
            "/login", data={"nonce": nonce, "name": "mallory", "password": "anything at all"}
        )
        assert unknown.status_code == 401 and "Wrong name or password." in unknown.text
        # the login form's own token: a post from elsewhere carries none
        forged = await http.post(
            "/login",
            data={"nonce": "forged", "name": REVIEWER, "password": REVIEWER_PASSWORD},
        )
        assert forged.status_code == 403
        # an open redirect is not one
        signed = await http.post(
            "/login",
            data={
                "nonce": nonce,
                "name": REVIEWER,
                "password": REVIEWER_PASSWORD,
                "next": "//evil.example/",
            },
        )
        assert signed.status_code == 303 and signed.headers["location"] == "/changes"
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=28800" in cookie
        assert (await http.get("/changes")).status_code == 200
        # signing out ends the session on the server, not only in the browser
        token = http.cookies["ratchet_console_session"]
        out = await http.post(
            "/logout", data={"csrf": field((await http.get("/changes")).text, "csrf")}
        )
        assert out.status_code == 303
        http.cookies.set("ratchet_console_session", token)
        assert (await http.get("/changes")).status_code == 303


async def test_the_proxys_identity_counts_only_from_the_trusted_proxy(console: Console) -> None:
    """Behind single sign-on: the header names the person, but only on requests from the
    configured proxy; a name with an account has its role, others the proxy role."""
    config = ConsoleConfig(
        identity_header="X-Remote-User",
        trusted_proxies=[ipaddress.ip_network("10.0.0.7/32")],
        proxy_role="viewer",
    )
    as_alice = {"X-Remote-User": REVIEWER}
    async with in_process(console.stack, config, client="10.0.0.8") as stranger:
        assert (await stranger.get("/changes", headers=as_alice)).status_code == 303
    async with in_process(console.stack, config, client="10.0.0.7") as proxy:
        page = await proxy.get("/changes", headers=as_alice)
        assert page.status_code == 200
        assert 'role-reviewer">reviewer' in page.text
        carol = await proxy.get("/changes", headers={"X-Remote-User": "carol"})
        assert carol.status_code == 200 and 'role-viewer">viewer' in carol.text
        bad = await proxy.get("/changes", headers={"X-Remote-User": "Carol@Example.com"})
        assert bad.status_code == 403 and "is not a console name" in bad.text
    strict = ConsoleConfig(**{**config.__dict__, "proxy_role": None})
    async with in_process(console.stack, strict, client="10.0.0.7") as proxy:
        assert (await proxy.get("/changes", headers={"X-Remote-User": "carol"})).status_code == 403
    # the proxy's sessions made no accounts
    assert [a.name for a in Accounts.in_home(console.stack.settings.home).every()] == [
        REVIEWER,
        VIEWER,
    ]


async def test_a_decision_for_a_name_no_reviewer_can_have_is_dead_lettered(
    console: Console,
) -> None:
    """The server lets the console's user publish any one token after ``console.``; the
    gatekeeper records only reviewer names and dead-letters the rest with the reason."""
    stack = console.stack
    change_id = await waiting_change(stack, "Help the user, briefly.")
    evidence = str(
        one(await trail(stack, change_id), "awaiting_approval").payload["evidence_sha256"]
    )
    assert stack.nats is not None
    subject = "change.approved.console.Mallory"
    watcher = await connect(stack.nats.settings_for("admin"), name="test-dlq")
    sender = await connect(stack.nats.settings_for(CONSOLE_USER), name="test-console")
    letters: asyncio.Queue[DeadLetter] = asyncio.Queue()

    async def on_letter(msg: Msg) -> None:
        await letters.put(DeadLetter.model_validate_json(msg.data))

    try:
        await watcher.subscribe(f"dlq.{subject}", cb=on_letter)
        await watcher.flush()
        decision = ChangeApproved(change_id=change_id, reason="x", evidence_sha256=evidence)
        await publish_js(sender.jetstream(), decision, subject=subject)
        letter = await asyncio.wait_for(letters.get(), timeout=30)
    finally:
        await sender.close()
        await watcher.close()
    assert letter.reason == "unprocessable: 'Mallory' is not a reviewer name: lowercase " + (
        "letters, digits, - and _, at most 32"
    )
    assert "approved" not in [r.kind for r in await trail(stack, change_id)]


# --- in the browser -----------------------------------------------------------------------------


@asynccontextmanager
async def browser(width: int = 1280, height: int = 860) -> AsyncIterator[Any]:
    """A page in headless Chromium (Debian's, through Playwright)."""
    from playwright.async_api import async_playwright

    assert CHROMIUM is not None
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            context = await chromium.new_context(viewport={"width": width, "height": height})
            page = await context.new_page()
            page.set_default_timeout(20_000)
            dialogs: list[str] = []
            page.on("dialog", lambda dialog: dialogs.append(dialog.message))
            yield page
            assert dialogs == [], "a page ran a script it was given as text"
        finally:
            await chromium.close()


async def snap(page: Any, name: str) -> None:
    """A screenshot of what the window shows, into RATCHET_SCREENSHOTS, when asked for."""
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"))


async def browser_sign_in(page: Any, console: Console, name: str, password: str) -> None:
    await page.goto(f"{console.url}/changes")
    assert page.url.startswith(f"{console.url}/login")
    await page.get_by_label("Name").fill(name)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{console.url}/changes")


@needs_chromium
async def test_sign_in_in_the_browser(console: Console) -> None:
    async with browser() as page:
        await page.goto(f"{console.url}/")
        await page.wait_for_url(re.compile(r".*/login\?next=/changes$"))
        await page.get_by_label("Name").fill(REVIEWER)
        await page.get_by_label("Password").fill("a wrong password")
        await page.get_by_role("button", name="Sign in").click()
        await page.get_by_role("alert").filter(has_text="Wrong name or password.").wait_for()
        await snap(page, "login")
        await page.get_by_label("Password").fill(REVIEWER_PASSWORD)
        await page.get_by_role("button", name="Sign in").click()
        await page.wait_for_url(f"{console.url}/changes")
        assert await page.locator(".who-name").inner_text() == f"{REVIEWER} reviewer"
        # the keyboard reaches the content first
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.textContent") == "Skip to the content"


@needs_chromium
async def test_approving_in_the_page_resumes_the_gatekeeper(console: Console) -> None:
    """The changes list shows a new change as it arrives (server-sent events, no reload); the
    reviewer approves it with a reason; the gatekeeper applies it; the trail names them."""
    stack = console.stack
    async with browser() as page:
        await browser_sign_in(page, console, REVIEWER, REVIEWER_PASSWORD)
        await page.get_by_text("Live: this page follows new changes.").wait_for()
        change_id = await asyncio.to_thread(
            propose, stack, "Reply with only the final answer.", because="Bare answers pass."
        )
        row = page.locator("tr", has=page.locator(f"a[href='/changes/{change_id}']"))
        await row.wait_for()  # arrived live
        await row.locator(".state-awaiting_approval").wait_for(timeout=120_000)
        await runs_stored(stack)
        await row.get_by_role("link").click()
        await page.wait_for_url(f"{console.url}/changes/{change_id}")
        await page.get_by_role("heading", name="The gate's evidence").wait_for()
        assert "Shown better" in await page.locator(".verdict").inner_text()
        # each case fixed or broken, with what both prompts answered on it (the failure store's)
        m = Measurement.model_validate(one(await trail(stack, change_id), "measured").payload)
        expected = views.evidence(m, None)  # which cases the page shows, and how many it leaves
        shown = [case.id for case in expected.cases]
        per_arm = min(m.repeats, views.SHOWN_REPEATS)
        assert m.fixed and await page.locator("details.case").count() == len(shown)
        assert await page.locator(".more-cases").count() == len(expected.more)
        for arm in ("current", "candidate"):
            assert await page.locator(f".run-{arm}").count() == len(shown) * per_arm, arm
        [stored] = await gate_runs(stack, change_id, [m.fixed[0]])
        first = page.locator("details.case").first
        await first.locator("summary").click()
        for arm in ("current", "candidate"):
            outputs = first.locator(f".run-{arm} pre")
            assert await outputs.all_inner_texts() == [
                run.output for run in stored.runs if run.arm == arm
            ], arm
        assert "1.00" in await first.locator(".run-candidate").first.inner_text()
        await page.locator(
            "pre.diff .diff-add", has_text="+Reply with only the final answer."
        ).wait_for()
        await snap(page, "change")
        await page.get_by_label("Your reason").fill("Bare answers pass the exact checks.")
        await page.get_by_role("button", name="Approve").click()
        await page.wait_for_url(f"{console.url}/changes/{change_id}?done=approved")
        await page.get_by_role("status").filter(has_text="Approved:").wait_for()
        # the page follows the gatekeeper as it applies the change
        applied = page.locator(".trail .state-applied")
        await applied.wait_for(timeout=60_000)
    records = await trail(stack, change_id)
    approved = one(records, "approved")
    assert approved.actor == f"console.{REVIEWER}"
    assert approved.payload["reason"] == "Bare answers pass the exact checks."
    kinds = [r.kind for r in records]
    assert kinds.index("approved") < kinds.index("applied")


@needs_chromium
async def test_rejecting_in_the_page_with_hostile_text_shown_as_text(console: Console) -> None:
    stack = console.stack
    change_id = await waiting_change(
        stack, "Explain your reasoning in detail first.", because=HOSTILE
    )
    async with browser(width=390, height=844) as page:  # a phone
        await browser_sign_in(page, console, REVIEWER, REVIEWER_PASSWORD)
        await page.goto(f"{console.url}/changes/{change_id}")
        # the rationale is shown as the text it is: no script ran, no element was made
        why = page.locator("blockquote.untrusted").first
        assert "<script>alert('pwned')</script>" in await why.inner_text()
        assert "\\u202e" in await why.inner_text()
        assert await page.locator("main b").count() == 0
        await page.get_by_role("heading", name="The gate's evidence").wait_for()
        await snap(page, "change-phone")
        await page.get_by_label("Your reason").fill("Explanations bury the answer.")
        await page.get_by_role("button", name="Reject").click()
        await page.wait_for_url(f"{console.url}/changes/{change_id}?done=rejected")
        await page.locator("#decide").get_by_text("Rejected by").wait_for()
    await trail_reaching(stack, change_id, "rejected", timeout=30)
    rejected = one(await trail(stack, change_id), "rejected")
    assert rejected.actor == f"console.{REVIEWER}"
    assert rejected.payload["reason"] == "Explanations bury the answer."


@needs_chromium
async def test_rolling_back_proposes_the_old_prompt_through_the_gate(console: Console) -> None:
    """Roll back from the prompt history: a proposal by the reviewer, measured by the gate like
    any change, waiting for a person; a viewer reads it and cannot decide."""
    stack = console.stack
    change_id = await waiting_change(stack, "Answer with only the final answer.")
    await asyncio.to_thread(
        cli, stack, "approve", change_id, "--reason", "to have a version to roll back"
    )
    await trail_reaching(stack, change_id, "applied", timeout=60)
    async with browser() as page:
        await browser_sign_in(page, console, REVIEWER, REVIEWER_PASSWORD)
        await page.goto(f"{console.url}/prompts/{TASK}")
        first = page.locator("tr", has=page.get_by_text("the suite's first prompt"))
        await page.locator("tr.current").get_by_text("(current)").wait_for()
        await snap(page, "prompts")
        button = first.get_by_role("button", name=re.compile(r"Roll back to v\d+"))
        version = int((await button.inner_text()).rsplit("v", 1)[1])
        await button.click()
        await page.wait_for_url(re.compile(r".*/changes/\w+\?done=rollback$"))
        rollback_id = page.url.split("/changes/")[1].split("?")[0]
        await page.get_by_role("status").filter(has_text="Rollback proposed").wait_for()
    records = await trail_reaching(stack, rollback_id, "awaiting_approval", timeout=120)
    assert records[:3] == ["received", "measured", "awaiting_approval"]
    received = one(await trail(stack, rollback_id), "received")
    assert received.actor == f"console.{REVIEWER}"
    assert received.payload["rationale"] == f"roll back to version {version}"
    assert received.payload["margin"] == stack.settings.gate.rollback_margin
    measured = one(await trail(stack, rollback_id), "measured")
    assert measured.payload["test"] == "non-inferiority"
    async with browser() as page:
        await browser_sign_in(page, console, VIEWER, VIEWER_PASSWORD)
        await page.goto(f"{console.url}/changes/{rollback_id}")
        await page.get_by_text("You are signed in as a viewer").wait_for()
        assert await page.get_by_role("button", name="Approve").count() == 0
        await page.goto(f"{console.url}/prompts/{TASK}")
        assert await page.get_by_role("button", name=re.compile("Roll back")).count() == 0


@needs_chromium
async def test_the_audit_page_verifies_the_trail(console: Console) -> None:
    async with browser() as page:
        await browser_sign_in(page, console, REVIEWER, REVIEWER_PASSWORD)
        await page.locator(".changes .state-kept").first.wait_for()
        await snap(page, "changes")  # by now: kept, rejected and waiting changes
        await page.get_by_role("link", name="Audit trail").click()
        await page.get_by_text("Intact", exact=True).wait_for()
        summary = await page.locator(".banner.ok").inner_text()
        assert "the hash chain, every signature and the anchor in the events stream verified" in (
            summary
        )
        assert await page.locator(".trail .actor", has_text=f"console.{REVIEWER}").count() >= 2
        await snap(page, "audit")
