"""``ratchet run``, ``failures`` and ``groups``: running a task and looking at what failed."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from nats.aio.client import Client
from pydantic import TypeAdapter
from rich.text import Text

from ratchet.cli.client import (
    ClientError,
    client_settings,
    open_client,
    query,
    request,
    submit_and_wait,
)
from ratchet.cli.render import console, groups_table, labelled, shown, trace_table
from ratchet.contracts import Check, FailureGroup, RunRequested
from ratchet.messaging import QUERY_PREFIX
from ratchet.queries import FailuresPage, FailuresQuery
from ratchet.store import FailureQuery, FailureRecord


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
                raise ClientError(
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
        Text.assemble(
            ("run", "bold"),
            " ",
            shown(
                f"{run.run_id}  task={run.task}  prompt v{run.prompt_version}  model={run.model}"
            ),
        )
    )
    if run.error:
        console.print(labelled("crashed:", run.error, "red"))
    console.print(labelled("output:", run.output or "(empty)"))
    if score.score is None:
        console.print(labelled("unscored:", score.unscored_reason or "", "yellow"))
    else:
        colour = "green" if score.score >= settings.failure_threshold else "red"
        console.print(
            Text.assemble(
                ("score:", "bold"), " ", (f"{score.score:.2f}", colour), " by ", shown(score.scorer)
            )
        )
    for problem in score.problems:
        console.print(shown(f"  - {problem}"))
    if logged:
        console.print("[red]stored as a failure[/] (see `ratchet failures`)")
    console.print(
        f"[dim]{run.latency_ms:.0f} ms, {run.usage.input_tokens}+{run.usage.output_tokens} "
        f"tokens, {len(run.trace)} steps[/]"
    )
    return 0


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise ClientError(f"not an ISO date/time: {value!r}") from exc


async def fetch_failures(nc: Client, first: FailuresQuery) -> list[FailureRecord]:
    """The ``first.limit`` newest failures ``first`` matches, whole, a page at a time: as
    many replies as it takes, each within what NATS carries."""
    failures: list[FailureRecord] = []
    asking: FailuresQuery | None = first.model_copy(update={"paged": True})
    while asking is not None:
        page = await request(
            nc,
            f"{QUERY_PREFIX}.failures",
            asking,
            TypeAdapter(FailuresPage),
            service="failure store",
        )
        failures += page.failures
        asking = page.next_query(asking, first.limit - len(failures))
    return failures


async def cmd_failures(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise ClientError(f"--limit must be at least 1, got {args.limit}")
    wanted = FailuresQuery(
        task=args.task,
        problem=args.problem,
        since=_parse_time(args.since),
        until=_parse_time(args.until),
        origin=args.origin,
        limit=args.limit,
    )
    nc = await open_client(client_settings())
    try:
        failures = await fetch_failures(nc, wanted)
    finally:
        await nc.close()
    if args.json:
        print(json.dumps([f.model_dump(mode="json") for f in failures], indent=2))
        return 0
    if not failures:
        console.print(
            shown(
                "no failures stored"
                + (f" for task {args.task!r}" if args.task else "")
                + (f" from {args.origin}" if args.origin else "")
            )
        )
        return 0
    for f in failures:
        console.rule(
            Text.assemble(
                shown(f.task, "bold"),
                shown(
                    f" run {f.run_id} · score {f.score:.2f} · from {f.origin} · "
                    f"{f.logged_at:%Y-%m-%d %H:%M:%S}"
                ),
            )
        )
        console.print(labelled("input:", f.input))
        console.print(labelled("output:", f.output or "(empty)"))
        for problem in f.problems:
            console.print(Text.assemble("  ", ("-", "red"), " ", shown(problem)))
        console.print(trace_table(f))
    return 0


async def cmd_groups(args: argparse.Namespace) -> int:
    groups = await query(
        f"{QUERY_PREFIX}.groups",
        FailureQuery(task=args.task, origin=args.origin, limit=args.limit),
        TypeAdapter(list[FailureGroup]),
        service="failure store",
    )
    if args.json:
        print(json.dumps([g.model_dump(mode="json") for g in groups], indent=2))
        return 0
    total = sum(g.size for g in groups)
    origin = f" from {args.origin}" if args.origin else ""
    console.print(
        shown(f"{total} failures of {args.task!r}{origin} in {len(groups)} recurring patterns")
    )
    console.print(groups_table(groups))
    return 0


ORIGIN_HELP = 'only failures of runs from here: "executor", or "app:NAME" (an instrumented app)'


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    failures.add_argument("--origin", help=ORIGIN_HELP)
    failures.add_argument(
        "--limit",
        type=int,
        default=20,
        help="newest failures to show, whole (read a reply at a time; default 20)",
    )
    failures.add_argument("--json", action="store_true")
    failures.set_defaults(handler=cmd_failures, is_async=True)

    groups = sub.add_parser("groups", help="a task's failures grouped into recurring patterns")
    groups.add_argument("--task", required=True)
    groups.add_argument("--limit", type=int, default=200, help="newest failures to group")
    groups.add_argument("--origin", help=ORIGIN_HELP)
    groups.add_argument("--json", action="store_true")
    groups.set_defaults(handler=cmd_groups, is_async=True)
