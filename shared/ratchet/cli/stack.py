"""Running and deploying Ratchet: ``ratchet up``, ``init-streams``, ``natsconf``, ``approver``
and ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text

from ratchet.cli.client import ClientError, client_settings, open_client
from ratchet.cli.render import block, console, plain
from ratchet.settings import get_settings
from ratchet_approver.policy import DEFAULT_RULE

if TYPE_CHECKING:
    from ratchet.cli.up import Stack
    from ratchet.settings import Settings


def cmd_up(args: argparse.Namespace) -> int:
    """Start the stack and supervise it until a stop signal (exit 0 once everything stopped in
    order, as a daemon does: systemd and Docker count it a clean stop) or a part that cannot be
    kept running (exit 1, with the end of its log, after stopping the rest)."""
    from ratchet.cli.up import (
        RestartPolicy,
        StartFailed,
        StopRequested,
        start_stack,
        stop_on_signals,
    )

    settings = get_settings()
    policy = RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window)
    console.print(f"[bold]Ratchet[/] starting in {settings.home.resolve()}")

    def ready(name: str, seconds: float) -> None:
        console.print(f"  [green]ready[/] {name:<16} {seconds:5.1f}s")

    with stop_on_signals() as signals:
        stack: Stack | None = None
        try:  # a failure or a stop signal during start-up: start_stack stops what had started
            try:
                stack = start_stack(
                    settings,
                    evaluators=args.evaluators,
                    executors=args.executors,
                    cluster=args.cluster,
                    on_ready=ready,
                )
            except StartFailed as exc:
                failed = exc.failed
            else:
                signals.check()
                assert stack.nats is not None
                console.print(
                    f"All up. NATS at {stack.nats.url}. Logs in {settings.home}/logs. Ctrl-C stops."
                )
                if stack.nats.url != settings.nats_url:  # clients elsewhere need every node
                    console.print(f"  set RATCHET_NATS_URL={stack.nats.url} for other clients")
                failed = stack.supervise(report=_say, policy=policy, check_stop=signals.check)
            console.print(Text.assemble((failed.reason, "red"), "; the end of its log:"))
            console.print(block(failed.log_tail))
            _say("stopping everything", settings)
            return 1
        except StopRequested as stop:
            _say(f"{stop.signal.name} received: stopping everything", settings)
            return 0
        finally:
            signals.ignore()
            if stack is not None:
                stack.stop()
            _say("stopped", settings)


def _say(line: str, settings: Settings | None = None) -> None:
    """A line of the supervisor's, also in ``logs/supervisor.log`` with ``settings`` (the
    stack's own events are there already). A terminal that hung up (SIGHUP) cannot show it,
    which must not keep the supervisor from restarting or stopping its children."""
    from ratchet.cli.up import note

    with contextlib.suppress(OSError):
        if settings is not None:
            note(settings, line)
        plain(line)


def cmd_approver(args: argparse.Namespace) -> int:
    from ratchet.natsconf import POLICY_APPROVER, approver_user
    from ratchet_approver.app import build_app

    settings = client_settings(role=approver_user(POLICY_APPROVER))
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


def cmd_natsconf(args: argparse.Namespace) -> int:
    """Write a nats-server config with fresh per-user passwords (only their bcrypt hashes are in
    it), and an env file with the passwords; both readable by their owner only."""
    import secrets

    from ratchet.natsconf import (
        cluster_block,
        generate_passwords,
        render_config,
        render_node_config,
        users,
        write_secret,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = get_settings()
    roles = users(settings.approvers, settings.apps)
    passwords = generate_passwords(roles)
    config = out / "nats-server.conf"
    text = render_config(
        roles, passwords, port=4222, store_dir=Path("/data/jetstream"), host="0.0.0.0"
    )
    if args.cluster_routes:  # one config for every node of a cluster
        routes = [route.strip() for route in args.cluster_routes.split(",") if route.strip()]
        cluster = cluster_block(
            listen="0.0.0.0:6222", routes=routes, secret=secrets.token_urlsafe(18)
        )
        text = render_node_config(text, cluster=cluster)
    write_secret(config, text)
    env = out / "passwords.env"
    write_secret(
        env,
        "".join(
            f"RATCHET_PW_{name.upper().replace('-', '_')}={pw}\n" for name, pw in passwords.items()
        ),
    )
    console.print(f"wrote {config} and {env} (keep it secret)")
    return 0


async def cmd_init_streams(args: argparse.Namespace) -> int:
    """Create the streams and the prompt bucket (needs the admin user), with as many replicas
    as asked, else one per server in ``RATCHET_NATS_URL`` (at most three)."""
    from ratchet.messaging import MAX_REPLICAS, ensure_streams

    settings = get_settings()
    replicas = args.replicas or min(len(settings.nats_servers), MAX_REPLICAS)
    nc = await open_client(settings)
    try:
        await ensure_streams(nc.jetstream(), replicas=replicas)
    finally:
        await nc.close()
    console.print(f"streams ready ({replicas} {'replica' if replicas == 1 else 'replicas'})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import shutil

    from ratchet.cli.demo import print_summary, run_demo, write_report
    from ratchet.cli.up import start_stack
    from ratchet.models import model_label
    from ratchet.suites import load_suite

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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser("up", help="start nats-server, the local model and every service")
    up.add_argument("--evaluators", type=int, default=1, help="evaluator replicas (default 1)")
    up.add_argument("--executors", type=int, default=1, help="executor replicas (default 1)")
    up.add_argument(
        "--cluster",
        type=int,
        default=1,
        choices=(1, 3),
        help="nats-server nodes: 1, or a cluster of 3 on loopback with every stream replicated "
        "three times (ports: RATCHET_NATS_URL's and the two after it)",
    )
    up.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        metavar="N",
        help="restarts of one part within --restart-window before giving up (default 5)",
    )
    up.add_argument(
        "--restart-window", type=float, default=60.0, help="seconds (default 60)", metavar="S"
    )
    up.set_defaults(handler=cmd_up, is_async=False)

    init = sub.add_parser("init-streams", help="create the streams (as the NATS admin user)")
    init.add_argument(
        "--replicas",
        type=int,
        choices=(1, 2, 3),
        help="copies of each stream (default: one per server in RATCHET_NATS_URL, at most 3)",
    )
    init.set_defaults(handler=cmd_init_streams, is_async=True)

    natsconf = sub.add_parser("natsconf", help="write a nats-server config for a deployment")
    natsconf.add_argument("--out", default="deploy")
    natsconf.add_argument(
        "--cluster-routes",
        metavar="HOST:PORT,...",
        help="a cluster: every node's route address (e.g. nats-1:6222,nats-2:6222,nats-3:6222); "
        "one config serves every node, named by its SERVER_NAME variable",
    )
    natsconf.set_defaults(handler=cmd_natsconf, is_async=False)

    approver = sub.add_parser("approver", help="run the policy approver")
    approver.add_argument(
        "--rule", help=f"superior | min-lift:X (default: RATCHET_APPROVER_RULE or {DEFAULT_RULE})"
    )
    approver.set_defaults(handler=cmd_approver, is_async=False)

    demo = sub.add_parser("demo", help="the whole improvement loop, start to finish")
    demo.add_argument("--suite", default="demo", help="suite name in config/suites (default demo)")
    demo.add_argument("--yes", action="store_true", help="let the policy approver decide")
    demo.add_argument("--rule", default=DEFAULT_RULE, help="the policy approver's rule")
    demo.add_argument("--report", help="write a JSON report here")
    demo.add_argument("--fresh", action="store_true", help="start from an empty state directory")
    demo.set_defaults(handler=cmd_demo, is_async=False)
