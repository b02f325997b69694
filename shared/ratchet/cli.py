"""The ``ratchet`` command line. Every error a user can cause is one line and a non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from pydantic import BaseModel, TypeAdapter, ValidationError
from rich.console import Console
from rich.table import Table

from ratchet.contracts import Check, FailureLogged, RunCompleted, RunRequested, RunScored
from ratchet.messaging import QUERY_PREFIX, connect
from ratchet.natsproc import load_credentials
from ratchet.settings import Settings, get_settings
from ratchet.store import FailureQuery, FailureRecord

console = Console()
T = TypeVar("T")


class CliError(Exception):
    """A problem to report to the user in one line (exit status 1)."""


# --- plumbing -----------------------------------------------------------------------------------


def client_settings(role: str = "client") -> Settings:
    """The CLI's NATS identity: from the environment, else from ``ratchet up``'s credentials."""
    settings = get_settings()
    if settings.nats_user:
        return settings
    try:
        passwords = load_credentials(settings.home)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from exc
    return settings.model_copy(update={"nats_user": role, "nats_password": passwords[role]})


async def open_client(settings: Settings) -> Client:
    try:
        return await connect(settings, name="ratchet-cli", reconnect=False)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise CliError(
            f"cannot reach NATS at {settings.nats_url} ({type(exc).__name__}): is `ratchet up` running?"
        ) from exc


async def request(
    nc: Client, subject: str, body: BaseModel, answer: TypeAdapter[T], *, service: str
) -> T:
    try:
        reply = await nc.request(subject, body.model_dump_json().encode(), timeout=10)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise CliError(f"the {service} did not answer on {subject}: is it running?") from exc
    try:
        return answer.validate_json(reply.data)
    except ValidationError as exc:
        raise CliError(f"the {service} sent an unexpected reply: {reply.data[:200]!r}") from exc


# --- ratchet up ---------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from ratchet.up import start_stack

    settings = get_settings()
    console.print(f"[bold]Ratchet[/] starting in {settings.home.resolve()}")

    def ready(name: str, seconds: float) -> None:
        console.print(f"  [green]ready[/] {name:<16} {seconds:5.1f}s")

    stack = start_stack(settings, evaluators=args.evaluators, on_ready=ready)
    console.print(
        f"All up. NATS at {settings.nats_url}. Logs in {settings.home}/logs. Ctrl-C stops."
    )
    try:
        while not (dead := stack.dead()):
            time.sleep(0.5)
        console.print(f"[red]{', '.join(dead)} exited[/]; stopping everything")
        return 1
    except KeyboardInterrupt:
        console.print("stopping…")
        return 0
    finally:
        stack.stop()
        console.print("stopped")


# --- ratchet run --------------------------------------------------------------------------------


async def submit_and_wait(
    nc: Client, request_: RunRequested, *, timeout: float, threshold: float
) -> tuple[RunCompleted, RunScored, bool]:
    """Publish one run and wait for its completion, its score and, if it failed, its logging."""
    got: dict[str, Any] = {}
    done = asyncio.Event()

    def expecting_failure() -> bool:
        scored = got.get(RunScored.subject)
        return bool(scored and scored.score is not None and scored.score < threshold)

    async def on_message(msg: Any) -> None:
        model = {
            RunCompleted.subject: RunCompleted,
            RunScored.subject: RunScored,
            FailureLogged.subject: FailureLogged,
        }[msg.subject]
        event = model.model_validate_json(msg.data)
        if event.run_id != request_.run_id:
            return
        got[msg.subject] = event
        complete = RunCompleted.subject in got and RunScored.subject in got
        if complete and (not expecting_failure() or FailureLogged.subject in got):
            done.set()

    subs = [
        await nc.subscribe(s, cb=on_message)
        for s in (RunCompleted.subject, RunScored.subject, FailureLogged.subject)
    ]
    try:
        ack = nc.jetstream().publish(
            request_.subject,
            request_.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"{request_.subject}:{request_.id}"},
            timeout=5,
        )
        try:
            await ack
        except nats.errors.TimeoutError as exc:
            raise CliError("NATS did not accept the run (no stream? permissions?)") from exc
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError as exc:
            seen = ", ".join(sorted(got)) or "nothing"
            raise CliError(
                f"run {request_.run_id} not finished after {timeout:.0f}s (saw {seen})"
            ) from exc
    finally:
        for sub in subs:
            await sub.unsubscribe()
    return got[RunCompleted.subject], got[RunScored.subject], FailureLogged.subject in got


async def cmd_run(args: argparse.Namespace) -> int:
    settings = client_settings()
    check = None
    if args.expect is not None:
        expected: Any = args.expect
        if args.check == "any_of":
            expected = [part.strip() for part in args.expect.split("|")]
        elif args.check == "number":
            try:
                expected = float(args.expect)
            except ValueError as exc:
                raise CliError(
                    f"--expect must be a number with --check number, got {args.expect!r}"
                ) from exc
        check = Check(kind=args.check, expected=expected)
    req = RunRequested(task=args.task, input=args.input, check=check)
    nc = await open_client(settings)
    try:
        run, score, logged = await submit_and_wait(
            nc, req, timeout=args.timeout, threshold=settings.failure_threshold
        )
    finally:
        await nc.close()
    if args.json:
        print(
            json.dumps(
                {
                    "completed": run.model_dump(mode="json"),
                    "scored": score.model_dump(mode="json"),
                    "failure_logged": logged,
                },
                indent=2,
            )
        )
        return 0
    console.print(
        f"[bold]run[/] {run.run_id}  task={run.task}  prompt v{run.prompt_version}  model={run.model}"
    )
    if run.error:
        console.print(f"[red]crashed:[/] {run.error}")
    console.print(f"[bold]output:[/] {run.output or '(empty)'}")
    if score.score is None:
        console.print(f"[yellow]unscored:[/] {score.unscored_reason}")
    else:
        colour = "green" if score.score >= settings.failure_threshold else "red"
        console.print(f"[bold]score:[/] [{colour}]{score.score:.2f}[/] by {score.scorer}")
    for problem in score.problems:
        console.print(f"  - {problem}")
    if logged:
        console.print("[red]stored as a failure[/] (see `ratchet failures`)")
    console.print(
        f"[dim]{run.latency_ms:.0f} ms, {run.usage.input_tokens}+{run.usage.output_tokens} tokens, {len(run.trace)} steps[/]"
    )
    return 0


# --- ratchet failures ---------------------------------------------------------------------------


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise CliError(f"not an ISO date/time: {value!r}") from exc


async def cmd_failures(args: argparse.Namespace) -> int:
    query = FailureQuery(
        task=args.task,
        problem=args.problem,
        since=_parse_time(args.since),
        until=_parse_time(args.until),
        limit=args.limit,
    )
    nc = await open_client(client_settings())
    try:
        failures = await request(
            nc,
            f"{QUERY_PREFIX}.failures",
            query,
            TypeAdapter(list[FailureRecord]),
            service="failure store",
        )
    finally:
        await nc.close()
    if args.json:
        print(json.dumps([f.model_dump(mode="json") for f in failures], indent=2))
        return 0
    if not failures:
        console.print("no failures stored" + (f" for task {args.task!r}" if args.task else ""))
        return 0
    for f in failures:
        console.rule(
            f"[bold]{f.task}[/] run {f.run_id} · score {f.score:.2f} · {f.logged_at:%Y-%m-%d %H:%M:%S}"
        )
        console.print(f"[bold]input:[/] {f.input}")
        console.print(f"[bold]output:[/] {f.output or '(empty)'}")
        for problem in f.problems:
            console.print(f"  [red]-[/] {problem}")
        table = Table("step", "kind", "name", "detail", "ms", box=None, show_header=True)
        for i, step in enumerate(f.trace, 1):
            detail = step.input or step.output
            table.add_row(str(i), step.kind, step.name, detail[:80], f"{step.ms:.0f}")
        console.print(table)
    return 0


# --- entry point --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratchet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start nats-server, the local model and every service")
    up.add_argument("--evaluators", type=int, default=1, help="evaluator replicas (default 1)")
    up.set_defaults(handler=cmd_up, is_async=False)

    run = sub.add_parser("run", help="run a task once and show its output and score")
    run.add_argument("task")
    run.add_argument("input")
    run.add_argument("--expect", help="expected answer (else the LLM judge scores the run)")
    run.add_argument(
        "--check",
        default="exact",
        choices=["exact", "any_of", "regex", "number"],
        help="how --expect is compared (any_of takes a|b|c)",
    )
    run.add_argument("--timeout", type=float, default=180.0)
    run.add_argument("--json", action="store_true")
    run.set_defaults(handler=cmd_run, is_async=True)

    failures = sub.add_parser("failures", help="list stored failures, newest first")
    failures.add_argument("--task")
    failures.add_argument("--problem", help="only failures with a problem containing this text")
    failures.add_argument("--since", help="ISO date/time")
    failures.add_argument("--until", help="ISO date/time")
    failures.add_argument("--limit", type=int, default=20)
    failures.add_argument("--json", action="store_true")
    failures.set_defaults(handler=cmd_failures, is_async=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], Any] = args.handler
    try:
        return int(asyncio.run(handler(args)) if args.is_async else handler(args))
    except CliError as exc:
        print(f"ratchet: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
