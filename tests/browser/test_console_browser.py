"""The review console against a real stack: nats-server and every service with scripted models,
and no policy approver, so a person decides. The stack starts once for this module, with two
console accounts made by `ratchet console user add` and `ratchet console` serving them, as an
operator starts them.

The browser tests drive Debian's Chromium (scripts/install.sh installs it) through Playwright,
launched with ``executable_path``, so Playwright downloads no browser of its own; without Chromium
they are skipped, with that reason. They sign in, read a measured change (each case fixed or
broken with what both prompts answered, as the failure store keeps the gate runs), approve it
(which resumes the waiting gatekeeper: the trail names the reviewer and the reason), reject one,
roll a prompt back (a proposal through the gate, approved with the keyboard alone by a second
reviewer, after which the old prompt is served again), filter the changes, and check that no page
scrolls sideways on a 360 px phone. With ``RATCHET_SCREENSHOTS=docs/screenshots`` they also save
full-page screenshots of the main pages there. The access tests speak plain HTTP and always run: a
decision or a rollback without a reviewer's session and CSRF token reaches nothing on NATS.

The tests share one stack, so a test that needs something (a kept change, a version to roll back
to) makes it itself or asks a fixture that does: none relies on what another test left behind.
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
from nats.aio.client import Client
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
from ratchet.prompts import PromptVersion, read_current, read_history
from ratchet.queries import ChangesQuery, ChangeSummary, GateCase, RunsQuery
from ratchet.settings import GateSettings, ModelSettings, Settings, to_env
from ratchet.store import AuditRecord
from ratchet.suites import load_suite

REPO = Path(__file__).resolve().parents[2]
TASK = load_suite(REPO / "config" / "suites" / "demo.json").name
SMOKE = load_suite(REPO / "config" / "suites" / "smoke.json").name  # a second task
REVIEWER, REVIEWER_PASSWORD = "alice", "alice's long passphrase"
# a second reviewer: the proposer of a change (a rollback too) may not approve it
SECOND, SECOND_PASSWORD = "dana", "dana's long passphrase"
VIEWER, VIEWER_PASSWORD = "bob", "bob's long passphrase"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = os.environ.get("RATCHET_SCREENSHOTS")  # a folder: docs/screenshots
HOSTILE = "<script>alert('pwned')</script> <b style=color:red>loud</b> \u202egnp.exe"
# Decisions, proposals and queries: whatever the console could send about a change
DECISION_SUBJECTS = ("change.approved.>", "change.rejected.>", "change.proposed.>")
CONSOLE_SUBJECTS = (*DECISION_SUBJECTS, "query.>")

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
        # the checks after a keep on fewer cases than a deployment's: they run in the background
        # while later tests run, and these tests follow the steps, not the statistics
        gate=GateSettings(run_timeout_s=60, verify_cases=20, holdout_cases=20),
    )
    running = start_stack(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def console(stack: Stack) -> Iterator[Console]:
    """`ratchet console` on a free port, with two reviewers and a viewer made by `ratchet console
    user add`, the way an operator makes them."""
    env = {**os.environ, **to_env(stack.settings)}
    user_add = [sys.executable, "-m", "ratchet.cli", "console", "user", "add"]
    adding = {
        (name, role): subprocess.Popen(
            [*user_add, name, "--role", role, "--password-stdin"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for name, role in ((REVIEWER, "reviewer"), (SECOND, "reviewer"), (VIEWER, "viewer"))
    }  # at once: the accounts file has a lock
    passwords = {REVIEWER: REVIEWER_PASSWORD, SECOND: SECOND_PASSWORD, VIEWER: VIEWER_PASSWORD}
    for (name, role), adder in adding.items():
        out, err = adder.communicate(passwords[name] + "\n", timeout=60)
        assert adder.returncode == 0, err
        assert out.startswith(f"{name}: {role}"), out
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


@pytest.fixture(scope="module")
def kept_change(console: Console) -> str:
    """A change that alice approved in the console and that the gate kept after checking it,
    made here for whichever test asks first, so that test does not depend on what ran before.
    Its prompt asks for only the final answer, the best the scripted model knows: no current
    prompt is better, so the check after applying keeps it whatever the current one is."""
    return asyncio.run(approved_in_console(console, "State only the final answer.", "kept"))


# --- helpers ------------------------------------------------------------------------------------


def propose(
    stack: Stack, prompt: str, *, because: str = "by hand", margin: float = 0.0, task: str = TASK
) -> str:
    """A person's own change, proposed with the CLI; its id."""
    extra = ["--margin", str(margin)] if margin else []
    proposed = cli(stack, "propose", task, "--prompt", prompt, "--because", because, *extra)
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


async def approved_with_the_cli(stack: Stack, prompt: str) -> tuple[str, int]:
    """A change proposed and approved with the CLI, once the gatekeeper applied it: its id and
    the prompt version it made."""
    change_id = await waiting_change(stack, prompt)
    approved = await asyncio.to_thread(cli, stack, "approve", change_id, "--reason", "a version")
    assert approved.returncode == 0, approved.stderr
    await trail_reaching(stack, change_id, "applied", timeout=60)
    return change_id, int(one(await trail(stack, change_id), "applied").payload["version"])


async def approved_in_console(console: Console, prompt: str, until: str) -> str:
    """A change proposed with the CLI and approved by alice in the console (over HTTP, as the
    page's form posts it), once its trail reaches ``until``; its id."""
    stack = console.stack
    change_id = await waiting_change(stack, prompt, because="Bare answers pass the checks.")
    async with httpx.AsyncClient(base_url=console.url) as reviewer:
        await sign_in(reviewer, REVIEWER, REVIEWER_PASSWORD)
        shown = (await reviewer.get(f"/changes/{change_id}")).text
        decided = await reviewer.post(
            f"/changes/{change_id}/decision",
            data={
                "decision": "approve",
                "reason": "Bare answers pass the exact checks.",
                "evidence": field(shown, "evidence"),
                "csrf": field(shown, "csrf"),
            },
        )
        assert decided.status_code == 303, decided.text
    await trail_reaching(stack, change_id, until, timeout=120)
    return change_id


async def prompt_history(stack: Stack, task: str = TASK) -> list[PromptVersion]:
    """Every stored version of ``task``'s prompt, oldest first, as the CLI's user reads them."""
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("client"), name="test-history")
    try:
        return await read_history(nc.jetstream(), task)
    finally:
        await nc.close()


async def served_now(stack: Stack, task: str = TASK) -> PromptVersion | None:
    """The version the executors serve: the current one in the prompt store."""
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("client"), name="test-current")
    try:
        return await read_current(nc.jetstream(), task)
    finally:
        await nc.close()


async def every_change(stack: Stack) -> list[ChangeSummary]:
    """The changes as the gatekeeper lists them to the CLI's user (``query.changes``)."""
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("client"), name="test-changes")
    try:
        answer = TypeAdapter(list[ChangeSummary])
        return await request(nc, "query.changes", ChangesQuery(), answer, service="gatekeeper")
    finally:
        await nc.close()


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

    async def follow(self, nc: Client, subjects: tuple[str, ...]) -> None:
        for subject in subjects:
            await nc.subscribe(subject, cb=self.on_message)
        await nc.flush()

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
    decision or a rollback is refused and nothing reaches NATS; the reviewer's own decision is
    published once."""
    stack = console.stack
    change_id = await waiting_change(stack, "Help the user, please.")  # no better, no worse
    oldest = (await prompt_history(stack))[0].version  # a version a reviewer may roll back to
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
            rollback = f"/prompts/{TASK}/rollback"
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
            back = {"version": str(oldest), "csrf": form["csrf"]}  # the history page's form
            # from here on, count what the console sends
            await counter.follow(admin, CONSOLE_SUBJECTS)
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
                "rollback, no session": (await nobody.post(rollback, data=back)).status_code,
                "rollback, a viewer's session": (
                    await viewer.post(rollback, data={**back, "csrf": viewer_csrf})
                ).status_code,
                "rollback, no csrf token": (
                    await reviewer.post(rollback, data={"version": back["version"]})
                ).status_code,
                "rollback, a wrong csrf token": (
                    await reviewer.post(rollback, data={**back, "csrf": viewer_csrf})
                ).status_code,
                "rollback, not a form": (await reviewer.post(rollback, json=back)).status_code,
            }
            assert refusals == {
                "no session": 401,
                "a viewer's session": 403,
                "no csrf token": 403,
                "a wrong csrf token": 403,
                "not a form": 415,
                "rollback, no session": 401,
                "rollback, a viewer's session": 403,
                "rollback, no csrf token": 403,
                "rollback, a wrong csrf token": 403,
                "rollback, not a form": 415,
            }
            # the reviewer's own decision: read the trail once, publish once
            accepted = await reviewer.post(decision, data=form)
            assert accepted.status_code == 303, accepted.text
            assert accepted.headers["location"] == f"{page}?done=approved"
        await counter.until(2)
        # the console answered each post after sending whatever it sent (the decision once its
        # stream stored it), so one round trip to the server later every message has arrived
        await admin.flush()
        # ten refusals sent nothing; the one decision: the trail read once, the decision once
        assert counter.subjects == ["query.change", f"change.approved.console.{REVIEWER}"]
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
    made = [a.name for a in Accounts.in_home(console.stack.settings.home).every()]
    assert made == sorted([REVIEWER, SECOND, VIEWER])


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
    """A screenshot of the whole page (not only what the window shows: a change's evidence is
    below the fold), into RATCHET_SCREENSHOTS, when asked for."""
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


async def tab_to(page: Any, selector: str, limit: int = 40) -> int:
    """Press Tab until the element ``selector`` names has the focus, as a keyboard user moves
    through a page; how many presses it took (at most ``limit``)."""
    for presses in range(1, limit + 1):
        await page.keyboard.press("Tab")
        if await page.evaluate(
            "s => document.activeElement === document.querySelector(s)", selector
        ):
            return presses
    raise AssertionError(f"{limit} presses of Tab did not reach {selector}")


async def shown_changes(page: Any) -> set[str]:
    """The change ids the changes list shows, read at once (the rows follow live events)."""
    hrefs = await page.locator("table.changes tbody a").evaluate_all(
        "links => links.map(a => a.getAttribute('href'))"
    )
    return {str(href).removeprefix("/changes/") for href in hrefs}


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
async def test_rolling_back_goes_through_the_gate_and_serves_the_old_prompt_again(
    console: Console,
) -> None:
    """Roll back from the prompt history: a proposal by the reviewer, measured by the gate like
    any change, waiting for a person; a viewer reads it and cannot decide; a second reviewer (its
    proposer may not approve it) approves it with the keyboard alone, and the gatekeeper serves
    the old prompt again, as a new version that names the rollback."""
    stack = console.stack
    # two versions as good as each other (both ask for only the final answer), made here: going
    # back from the newer to the older is no worse, so the check after applying keeps it
    older_text = "Answer with only the final answer."
    older_id, older = await approved_with_the_cli(stack, older_text)
    _, newer = await approved_with_the_cli(stack, "Give only the final answer, nothing more.")
    before = await prompt_history(stack)
    assert before[-1].version == newer
    assert stack.nats is not None
    admin = await connect(stack.nats.settings_for("admin"), name="test-counter")
    counter = Counter()  # every decision and proposal from here on
    await counter.follow(admin, DECISION_SUBJECTS)
    try:
        async with browser() as page:
            await browser_sign_in(page, console, REVIEWER, REVIEWER_PASSWORD)
            await page.goto(f"{console.url}/prompts/{TASK}")
            await page.locator("tr.current").get_by_text("(current)").wait_for()
            await snap(page, "prompts")
            row = page.locator("tr", has=page.locator(f"a[href='/changes/{older_id}']"))
            await row.get_by_role("button", name=f"Roll back to v{older}").click()
            await page.wait_for_url(re.compile(r".*/changes/\w+\?done=rollback$"))
            rollback_id = page.url.split("/changes/")[1].split("?")[0]
            await page.get_by_role("status").filter(has_text="Rollback proposed").wait_for()
        steps = await trail_reaching(stack, rollback_id, "awaiting_approval", timeout=120)
        assert steps[:3] == ["received", "measured", "awaiting_approval"]
        received = one(await trail(stack, rollback_id), "received")
        assert received.actor == f"console.{REVIEWER}"
        assert received.payload["rationale"] == f"roll back to version {older}"
        assert received.payload["base_version"] == newer
        assert received.payload["proposed_prompt"] == older_text
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
        async with browser() as page:
            await browser_sign_in(page, console, SECOND, SECOND_PASSWORD)
            await page.goto(f"{console.url}/changes/{rollback_id}")
            # the keyboard alone: Tab to the reason, type it, Tab to Approve, Enter
            await tab_to(page, "#reason")
            await page.keyboard.type("No worse than the current prompt; we trusted it before.")
            await page.keyboard.press("Tab")
            focused = await page.evaluate("document.activeElement.textContent.trim()")
            assert focused == "Approve"
            await page.keyboard.press("Enter")
            await page.wait_for_url(f"{console.url}/changes/{rollback_id}?done=approved")
            await page.get_by_role("status").filter(has_text="Approved:").wait_for()
            # the page follows the gatekeeper, which resumed: it applies and checks the rollback
            await page.locator(".trail .state-applied").wait_for(timeout=60_000)
            kinds = await trail_reaching(stack, rollback_id, "kept", timeout=120)
            # one version more (numbered by the prompt store across tasks): the older prompt
            after = await prompt_history(stack)
            assert [v.version for v in after[:-1]] == [v.version for v in before]
            made = after[-1]
            assert made.version > newer
            # the history page shows it as the current version, made by the rollback
            await page.goto(f"{console.url}/prompts/{TASK}")
            current = page.locator("tr.current")
            assert (await current.locator("td.num").inner_text()).startswith(f"v{made.version}")
            await current.locator(f"a[href='/changes/{rollback_id}']").wait_for()
            await current.locator(".state-kept").wait_for()
            assert await current.locator("pre.prompt").inner_text() == older_text
        await admin.flush()
        # the proposal and the decision, once each and from the console only
        assert counter.subjects == [
            f"change.proposed.console.{REVIEWER}",
            f"change.approved.console.{SECOND}",
        ]
    finally:
        await admin.close()
    assert kinds[:7] == [
        "received",
        "measured",
        "awaiting_approval",
        "approved",
        "applied",
        "verified",
        "kept",
    ]
    records = await trail(stack, rollback_id)
    approved = one(records, "approved")
    assert approved.actor == f"console.{SECOND}"
    assert approved.payload["reason"] == "No worse than the current prompt; we trusted it before."
    assert "decision_refused" not in [r.kind for r in records]
    assert one(records, "verified").payload["served"] is True  # the executors served it
    # the new version: the older prompt, made by the rollback change, served now
    assert (made.record.text, made.record.change_id) == (older_text, rollback_id)
    assert made.record.note == f"roll back to version {older}"
    # the gatekeeper writes an applied change as kind "change", a rollback proposed by a person
    # included; kind "rollback" marks only its own undoing of a change that failed its check
    assert made.record.kind == "change"
    served = await served_now(stack)
    assert served is not None and served.version == made.version


@needs_chromium
async def test_the_audit_page_verifies_the_trail(console: Console, kept_change: str) -> None:
    async with browser() as page:
        await browser_sign_in(page, console, REVIEWER, REVIEWER_PASSWORD)
        row = page.locator("tr", has=page.locator(f"a[href='/changes/{kept_change}']"))
        await row.locator(".state-kept").wait_for()
        await snap(page, "changes")  # in the file's order: kept, rejected and waiting changes
        await page.get_by_role("link", name="Audit trail").click()
        await page.get_by_text("Intact", exact=True).wait_for()
        summary = await page.locator(".banner.ok").inner_text()
        assert "the hash chain, every signature and the anchor in the events stream verified" in (
            summary
        )
        # the kept change's steps, each once; its approval names the reviewer
        records = page.locator(
            ".trail tbody tr", has=page.locator(f"a[href='/changes/{kept_change}']")
        )
        steps = await records.locator(".state").all_inner_texts()
        for step in ("received", "measured", "awaiting approval", "approved", "applied", "kept"):
            assert steps.count(step) == 1, (step, steps)
        approval = records.filter(has=page.locator(".state-approved"))
        assert await approval.locator(".actor").inner_text() == f"console.{REVIEWER}"
        await snap(page, "audit")


@needs_chromium
async def test_filtering_the_changes_shows_exactly_the_matching_ones(console: Console) -> None:
    """By task, by state, and both, with the form and with the address; what a query string
    holds is never echoed as markup."""
    stack = console.stack
    refused = await waiting_change(stack, "Answer the question in one word.", task=SMOKE)
    waiting = await waiting_change(stack, "Answer the question in one line.", task=SMOKE)
    rejected = await asyncio.to_thread(cli, stack, "reject", refused, "--reason", "too terse")
    assert rejected.returncode == 0, rejected.stderr
    await trail_reaching(stack, refused, "rejected", timeout=30)
    # every filter below matches only changes no step moves any more (rejected, waiting), or
    # asks by task alone, so changes other tests left moving cannot change what matches
    every = await every_change(stack)

    def matching(task: str | None, state: str | None) -> set[str]:
        return {c.change_id for c in every if task in (None, c.task) and state in (None, c.status)}

    assert matching(SMOKE, None) == {refused, waiting}
    async with browser() as page:
        await browser_sign_in(page, console, REVIEWER, REVIEWER_PASSWORD)
        assert await shown_changes(page) == matching(None, None)
        await page.get_by_label("Task").select_option(SMOKE)
        await page.get_by_label("State").select_option("awaiting_approval")
        await page.get_by_role("button", name="Filter").click()
        await page.wait_for_url(f"{console.url}/changes?task={SMOKE}&state=awaiting_approval")
        assert await shown_changes(page) == {waiting}
        for task, state in (
            (SMOKE, None),
            (TASK, None),
            (None, "rejected"),
            (SMOKE, "rejected"),
            (SMOKE, "kept"),
        ):
            query = httpx.QueryParams({"task": task or "", "state": state or ""})
            await page.goto(f"{console.url}/changes?{query}")
            assert await shown_changes(page) == matching(task, state), (task, state)
        assert await page.get_by_text("No change matches these filters.").count() == 1
        # markup in the query string: never echoed as markup (the page has its one script only,
        # and browser() fails the test if any dialog opened)
        hostile = "<script>alert('pwned')</script><img src=x onerror=alert(1)>"
        for path in ("/changes", "/audit"):
            key = "change" if path == "/audit" else "task"
            query = httpx.QueryParams({key: hostile, "state": hostile})
            response = await page.goto(f"{console.url}{path}?{query}")
            assert response is not None and response.status == 200
            html = await response.text()
            assert "<script>alert" not in html and "<img" not in html, path
            assert await page.locator("script").count() == 1, path
            assert await page.locator("main img").count() == 0, path
        # the audit page shows what it was asked for, as text
        assert await page.get_by_label("Change").input_value() == hostile
        assert await shown_changes(page) == set()


@needs_chromium
async def test_no_page_scrolls_sideways_on_a_360_px_phone(
    console: Console, kept_change: str
) -> None:
    """The document is never wider than a 360 px window: wide tables and long lines scroll
    inside their own boxes, the page itself does not (every details element opened)."""
    wide: dict[str, tuple[int, int]] = {}

    async def check(page: Any, name: str) -> None:
        await page.evaluate("document.querySelectorAll('details').forEach(d => { d.open = true; })")
        scroll, window = await page.evaluate(
            "[document.scrollingElement.scrollWidth, window.innerWidth]"
        )
        if scroll > window:
            wide[name] = (scroll, window)

    async with browser(width=360, height=740) as page:
        await page.goto(f"{console.url}/login")
        await check(page, "login")
        await browser_sign_in(page, console, REVIEWER, REVIEWER_PASSWORD)
        pages = {
            "changes": "/changes",
            "one change": f"/changes/{kept_change}",
            "prompts": "/prompts",
            "prompt history": f"/prompts/{TASK}",
            "audit": "/audit",
        }
        for name, path in pages.items():
            await page.goto(f"{console.url}{path}")
            await check(page, name)
    assert wide == {}, f"wider than the window (scroll width, window width): {wide}"
