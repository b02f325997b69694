"""The ``ratchet`` command line. Every error a user can cause is one line and a non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from pydantic import TypeAdapter
from rich.console import Console
from rich.table import Table

from ratchet.audit import verify_chain
from ratchet.client import (
    ClientError,
    client_settings,
    fetch_trail,
    open_client,
    query,
    request,
    send_decision,
    submit_and_wait,
)
from ratchet.contracts import (
    ChangeProposed,
    Check,
    FailureGroup,
    Measurement,
    RunRequested,
)
from ratchet.evidence import describe, describe_after
from ratchet.messaging import QUERY_PREFIX, publish_js
from ratchet.prompts import read_current, read_history
from ratchet.queries import (
    AuditPage,
    AuditQuery,
    ChangesQuery,
    ChangeSummary,
    ProposeReply,
    ProposeRequest,
)
from ratchet.settings import get_settings
from ratchet.store import AuditRecord, FailureQuery, FailureRecord
from ratchet_approver.policy import DEFAULT_RULE

console = Console()


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
        f"[bold]run[/] {run.run_id}  task={run.task}  prompt v{run.prompt_version}  "
        f"model={run.model}"
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
        f"[dim]{run.latency_ms:.0f} ms, {run.usage.input_tokens}+{run.usage.output_tokens} "
        f"tokens, {len(run.trace)} steps[/]"
    )
    return 0


# --- ratchet failures ---------------------------------------------------------------------------


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise ClientError(f"not an ISO date/time: {value!r}") from exc


async def cmd_failures(args: argparse.Namespace) -> int:
    wanted = FailureQuery(
        task=args.task,
        problem=args.problem,
        since=_parse_time(args.since),
        until=_parse_time(args.until),
        limit=args.limit,
    )
    failures = await query(
        f"{QUERY_PREFIX}.failures",
        wanted,
        TypeAdapter(list[FailureRecord]),
        service="failure store",
    )
    if args.json:
        print(json.dumps([f.model_dump(mode="json") for f in failures], indent=2))
        return 0
    if not failures:
        console.print("no failures stored" + (f" for task {args.task!r}" if args.task else ""))
        return 0
    for f in failures:
        console.rule(
            f"[bold]{f.task}[/] run {f.run_id} · score {f.score:.2f} · "
            f"{f.logged_at:%Y-%m-%d %H:%M:%S}"
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


# --- the change cycle ---------------------------------------------------------------------------


async def cmd_groups(args: argparse.Namespace) -> int:
    groups = await query(
        f"{QUERY_PREFIX}.groups",
        FailureQuery(task=args.task, limit=args.limit),
        TypeAdapter(list[FailureGroup]),
        service="failure store",
    )
    if args.json:
        print(json.dumps([g.model_dump(mode="json") for g in groups], indent=2))
        return 0
    total = sum(g.size for g in groups)
    console.print(f"{total} failures of {args.task!r} in {len(groups)} recurring patterns")
    table = Table("#", "failures", "problem", "example run")
    for i, group in enumerate(groups, 1):
        table.add_row(str(i), str(group.size), group.label, group.run_ids[0])
    console.print(table)
    return 0


async def cmd_propose(args: argparse.Namespace) -> int:
    if args.prompt is not None:
        return await propose_own(args)
    if args.margin is not None:
        raise ClientError("--margin goes with --prompt (a change of your own)")
    reply = await query(
        f"{QUERY_PREFIX}.propose",
        ProposeRequest(task=args.task),
        TypeAdapter(ProposeReply),
        service="proposer",
    )
    if reply.change is None:
        raise ClientError(reply.error or "the proposer made no proposal")
    change = reply.change
    plain(f"proposed change {change.change_id} for {change.task} (from v{change.base_version})")
    plain(f"prompt: {change.proposed_prompt}")
    plain(f"why: {change.rationale}")
    console.print("the gatekeeper now measures it; see `ratchet changes`")
    return 0


async def propose_own(args: argparse.Namespace) -> int:
    """A person's own proposal: it goes through the same gate. With ``--margin`` it is a change
    made for another reason than being better (shorter, cheaper), kept if shown no worse."""
    if args.margin is not None and not 0 < args.margin <= 0.2:
        raise ClientError(f"--margin must be above 0 and at most 0.2, got {args.margin}")
    nc = await open_client(client_settings())
    try:
        current = await read_current(nc.jetstream(), args.task)
        if current is None:
            raise ClientError(f"no prompt stored for task {args.task!r}")
        change = ChangeProposed(
            task=args.task,
            base_version=current.version,
            proposed_prompt=args.prompt,
            rationale=args.because,
            proposer=f"cli:{getpass.getuser()}",
            margin=args.margin or 0.0,
        )
        await publish_change(nc, change)
    finally:
        await nc.close()
    test = f"non-inferiority, margin {change.margin:.0%}" if change.margin else "superiority"
    console.print(
        f"proposed change {change.change_id} ({test} test); the gatekeeper now measures it"
    )
    return 0


async def publish_change(nc: Client, change: ChangeProposed) -> None:
    await publish_js(nc.jetstream(), change, timeout=5)


async def cmd_changes(args: argparse.Namespace) -> int:
    changes = await query(
        f"{QUERY_PREFIX}.changes",
        ChangesQuery(task=args.task),
        TypeAdapter(list[ChangeSummary]),
        service="gatekeeper",
    )
    if args.json:
        print(json.dumps([c.model_dump(mode="json") for c in changes], indent=2))
        return 0
    if not changes:
        console.print("no changes yet")
        return 0
    table = Table("change", "task", "status", "updated")
    for c in changes:
        table.add_row(c.change_id, c.task, c.status, f"{c.updated_at:%Y-%m-%d %H:%M:%S}")
    console.print(table)
    return 0


def print_evidence(trail: list[AuditRecord]) -> None:
    """What a person needs to decide: the proposal, the gate's evidence and the diff.

    Everything here may hold untrusted text (a rationale, a prompt), so none of it is markup."""
    by_kind = {r.kind: r.payload for r in trail}
    if received := by_kind.get("received"):
        plain(
            f"task: {received['task']}  base version: v{received['base_version']}  "
            f"by: {received['proposer']}"
        )
        plain(f"rationale: {received['rationale']}")
    if diff := by_kind.get("awaiting_approval"):
        plain("prompt diff:")
        plain(diff["prompt_diff"])
    if measured := by_kind.get("measured"):
        for line in describe(Measurement.model_validate(measured)):
            plain(line)
    for line in describe_after(by_kind):
        plain(line)
    if invalid := by_kind.get("invalid"):
        for problem in invalid["problems"]:
            plain(f"  invalid: {problem}")
    for refused in (r for r in trail if r.kind == "decision_refused"):
        plain(f"  refused decision by {refused.actor}: {refused.payload['why']}")


def plain(text: str) -> None:
    console.print(text, markup=False, highlight=False)


async def cmd_show(args: argparse.Namespace) -> int:
    nc = await open_client(client_settings())
    try:
        trail = await fetch_trail(nc, args.change)
    finally:
        await nc.close()
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in trail], indent=2))
        return 0
    console.print(f"[bold]change {args.change}[/]: {trail[-1].kind}")
    print_evidence(trail)
    table = Table("seq", "when", "step", "by")
    for r in trail:
        table.add_row(str(r.seq), f"{r.at:%H:%M:%S}", r.kind, r.actor)
    console.print(table)
    return 0


async def cmd_decide(args: argparse.Namespace) -> int:
    approve = args.command == "approve"
    await send_decision(
        args.change, approve=approve, reason=args.reason, approver=f"cli:{getpass.getuser()}"
    )
    console.print(
        f"{'approved' if approve else 'rejected'} {args.change}; see `ratchet show {args.change}`"
    )
    return 0


def cmd_approver(args: argparse.Namespace) -> int:
    from ratchet_approver.app import build_app

    settings = client_settings(role="approver")
    if args.rule is not None:
        settings = settings.model_copy(update={"approver_rule": args.rule})
    try:
        app = build_app(settings)
    except ValueError as exc:
        raise ClientError(str(exc)) from exc
    console.print(f"policy approver running with rule {settings.approver_rule!r}; Ctrl-C stops")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(app.run())
    return 0


async def cmd_prompts(args: argparse.Namespace) -> int:
    settings = client_settings()
    nc = await open_client(settings)
    try:
        history = await read_history(nc.jetstream(), args.task)
        if not history:
            raise ClientError(f"no prompt stored for task {args.task!r}")
        if args.rollback_to is not None:
            target = next((v for v in history if v.version == args.rollback_to), None)
            if target is None:
                raise ClientError(f"task {args.task!r} has no version {args.rollback_to}")
            change = ChangeProposed(
                task=args.task,
                base_version=history[-1].version,
                proposed_prompt=target.record.text,
                rationale=f"roll back to version {target.version}",
                proposer=f"cli:{getpass.getuser()}",
                margin=settings.gate.rollback_margin,  # kept if shown no worse: needs a person
            )
            await publish_change(nc, change)
            console.print(
                f"proposed rollback as change {change.change_id}: it goes through the gate "
                f"(a non-inferiority test, margin {change.margin:.0%}) and needs a person's "
                "approval"
            )
            return 0
    finally:
        await nc.close()
    table = Table("version", "when", "kind", "change", "prompt")
    for v in history:
        when = f"{v.created:%Y-%m-%d %H:%M:%S}" if v.created else ""
        table.add_row(f"v{v.version}", when, v.record.kind, v.record.change_id or "", v.record.text)
    console.print(table)
    return 0


async def fetch_audit(nc: Client) -> list[AuditRecord]:
    """The whole audit trail from its owner, the gatekeeper, a page at a time."""
    records: list[AuditRecord] = []
    while True:
        page = await request(
            nc,
            f"{QUERY_PREFIX}.audit",
            AuditQuery(after_seq=records[-1].seq if records else 0),
            TypeAdapter(AuditPage),
            service="gatekeeper",
        )
        records += page.records
        if not (page.more and page.records):
            return records


async def cmd_audit(args: argparse.Namespace) -> int:
    """The trail as the gatekeeper sends it, its hash chain checked here on what arrived. Without
    keys that is a consistency check (an edited or removed record, a broken link), not protection
    against the gatekeeper itself, which could rewrite the whole chain."""
    nc = await open_client(client_settings())
    try:
        records = await fetch_audit(nc)
    finally:
        await nc.close()
    problems = verify_chain(records)
    if args.verify:
        if problems:
            for problem in problems:
                print(f"TAMPERED {problem}")
            return 2
        console.print(f"audit trail intact: {len(records)} records, hash chain verified")
        return 0
    shown = [r for r in records if args.change in (None, r.change_id)]
    table = Table("seq", "when", "change", "step", "by")
    for r in shown:
        table.add_row(str(r.seq), f"{r.at:%Y-%m-%d %H:%M:%S}", r.change_id, r.kind, r.actor)
    console.print(table)
    if problems:
        console.print(f"[red]{len(problems)} integrity problem(s); run with --verify[/]")
    return 0


# --- suites and deployment ----------------------------------------------------------------------


def cmd_suite_import(args: argparse.Namespace) -> int:
    from ratchet.suites import import_bigbench, save_suite

    settings = get_settings()
    try:
        suite = import_bigbench(
            Path(args.path),
            name=args.name,
            gate_size=args.gate_size,
            holdout_size=args.holdout_size,
            learn_size=args.learn_size,
            seed=args.seed,
        )
    except (ValueError, OSError) as exc:
        raise ClientError(str(exc)) from exc
    target = settings.suites_dir / f"{suite.name}.json"
    save_suite(suite, target)
    console.print(
        f"imported task {suite.name!r}: {len(suite.learn)} learn + {len(suite.gate)} gate + "
        f"{len(suite.holdout)} holdout cases (seed {args.seed}) -> {target}"
    )
    return 0


def cmd_natsconf(args: argparse.Namespace) -> int:
    """Write a nats-server config with fresh per-service passwords, and an env file for them."""
    from ratchet.natsconf import generate_passwords, render_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    passwords = generate_passwords()
    (out / "nats-server.conf").write_text(
        render_config(passwords, port=4222, store_dir=Path("/data/jetstream"), host="0.0.0.0")
    )
    env = out / "passwords.env"
    env.touch(mode=0o600)
    env.write_text(
        "".join(
            f"RATCHET_PW_{name.upper().replace('-', '_')}={pw}\n" for name, pw in passwords.items()
        )
    )
    console.print(f"wrote {out / 'nats-server.conf'} and {env} (keep it secret)")
    return 0


async def cmd_init_streams(args: argparse.Namespace) -> int:
    """Create the streams and the prompt bucket (needs the admin user)."""
    from ratchet.messaging import ensure_streams

    settings = get_settings()
    nc = await open_client(settings)
    try:
        await ensure_streams(nc.jetstream())
    finally:
        await nc.close()
    console.print("streams ready")
    return 0


# --- ratchet demo -------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    import shutil

    from ratchet.demo import print_summary, run_demo, write_report
    from ratchet.models import model_label
    from ratchet.suites import load_suite
    from ratchet.up import start_stack

    settings = get_settings()
    suite_path = settings.suites_dir / f"{args.suite}.json"
    try:
        suite = load_suite(suite_path)
    except (OSError, ValueError) as exc:
        raise ClientError(f"cannot load suite {args.suite!r} from {suite_path}: {exc}") from exc
    if not args.yes and not sys.stdin.isatty():
        raise ClientError(
            "no terminal to ask for approval: pass --yes to let the policy approver decide"
        )

    stack = None
    if not _stack_running():
        if args.fresh and settings.home.exists():
            shutil.rmtree(settings.home)
        # the demo asks for its proposal itself, so the proposer's automatic trigger is off
        own = settings.model_copy(update={"min_failures_to_propose": 10**9})
        console.print(
            f"[bold]starting Ratchet[/] (agent: {model_label(settings.agent)}) in {settings.home}"
        )
        stack = start_stack(
            own, on_ready=lambda name, s: console.print(f"  [green]ready[/] {name} ({s:.1f}s)")
        )

    async def demo() -> int:
        nc = await open_client(client_settings())
        try:
            report = await run_demo(
                nc,
                suite,
                model=model_label(settings.agent),
                threshold=settings.failure_threshold,
                auto_approve_rule=args.rule if args.yes else None,
                console=console,
            )
        finally:
            await nc.close()
        print_summary(report, console)
        if args.report:
            write_report(report, Path(args.report))
            console.print(f"report written to {args.report}")
        return 0

    try:
        return asyncio.run(demo())
    finally:
        if stack is not None:
            stack.stop()


def _stack_running() -> bool:
    """Whether a `ratchet up` already answers at the configured address."""

    async def probe() -> bool:
        try:
            nc = await open_client(client_settings())
        except ClientError:
            return False
        await nc.close()
        return True

    return asyncio.run(probe())


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

    groups = sub.add_parser("groups", help="a task's failures grouped into recurring patterns")
    groups.add_argument("--task", required=True)
    groups.add_argument("--limit", type=int, default=200, help="newest failures to group")
    groups.add_argument("--json", action="store_true")
    groups.set_defaults(handler=cmd_groups, is_async=True)

    propose = sub.add_parser(
        "propose", help="ask the proposer for a change to a task prompt now, or propose your own"
    )
    propose.add_argument("task")
    propose.add_argument("--prompt", help="your own task prompt (it goes through the same gate)")
    propose.add_argument("--because", default="proposed by hand", help="why, for the audit")
    propose.add_argument(
        "--margin",
        type=float,
        help="a change made for another reason (shorter, cheaper): kept if shown no worse than "
        "this share (e.g. 0.05); it always needs a person's approval",
    )
    propose.set_defaults(handler=cmd_propose, is_async=True)

    changes = sub.add_parser("changes", help="list changes and their status")
    changes.add_argument("--task")
    changes.add_argument("--json", action="store_true")
    changes.set_defaults(handler=cmd_changes, is_async=True)

    show = sub.add_parser("show", help="a change's evidence, diff and audit trail")
    show.add_argument("change")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_show, is_async=True)

    for verb in ("approve", "reject"):
        decide = sub.add_parser(verb, help=f"{verb} a change waiting at the gate")
        decide.add_argument("change")
        decide.add_argument("--reason", required=True)
        decide.set_defaults(handler=cmd_decide, is_async=True)

    approver = sub.add_parser("approver", help="run the policy approver")
    approver.add_argument(
        "--rule", help=f"superior | min-lift:X (default: RATCHET_APPROVER_RULE or {DEFAULT_RULE})"
    )
    approver.set_defaults(handler=cmd_approver, is_async=False)

    prompts = sub.add_parser("prompts", help="every version of a task prompt")
    prompts.add_argument("task")
    prompts.add_argument(
        "--rollback-to", type=int, metavar="VERSION", help="propose going back to VERSION"
    )
    prompts.set_defaults(handler=cmd_prompts, is_async=True)

    audit = sub.add_parser("audit", help="the audit trail of every change")
    audit.add_argument("--change")
    audit.add_argument(
        "--verify", action="store_true", help="check the hash chain; exit 2 if broken"
    )
    audit.set_defaults(handler=cmd_audit, is_async=True)

    suite = sub.add_parser("suite", help="task suites")
    suite_sub = suite.add_subparsers(dest="suite_command", required=True)
    suite_import = suite_sub.add_parser("import", help="import a BIG-bench task.json as a suite")
    suite_import.add_argument("path")
    suite_import.add_argument("--name")
    suite_import.add_argument(
        "--gate-size", type=int, default=200, help="gate pool cases (default 200)"
    )
    suite_import.add_argument(
        "--holdout-size", type=int, default=100, help="sealed holdout cases (default 100)"
    )
    suite_import.add_argument(
        "--learn-size", type=int, default=60, help="learn cases, fewer if the file runs out"
    )
    suite_import.add_argument(
        "--seed", type=int, default=0, help="shuffle seed; another seed rotates the pools"
    )
    suite_import.set_defaults(handler=cmd_suite_import, is_async=False)

    natsconf = sub.add_parser("natsconf", help="write a nats-server config for a deployment")
    natsconf.add_argument("--out", default="deploy")
    natsconf.set_defaults(handler=cmd_natsconf, is_async=False)

    demo = sub.add_parser("demo", help="the whole improvement loop, start to finish")
    demo.add_argument("--suite", default="demo", help="suite name in config/suites (default demo)")
    demo.add_argument("--yes", action="store_true", help="let the policy approver decide")
    demo.add_argument("--rule", default=DEFAULT_RULE, help="the policy approver's rule")
    demo.add_argument("--report", help="write a JSON report here")
    demo.add_argument("--fresh", action="store_true", help="start from an empty state directory")
    demo.set_defaults(handler=cmd_demo, is_async=False)

    init = sub.add_parser("init-streams", help="create the streams (as the NATS admin user)")
    init.set_defaults(handler=cmd_init_streams, is_async=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], Any] = args.handler
    try:
        return int(asyncio.run(handler(args)) if args.is_async else handler(args))
    except ClientError as exc:
        print(f"ratchet: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
