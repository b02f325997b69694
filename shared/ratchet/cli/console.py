"""``ratchet console``: the review console's web server, and ``ratchet console user``: its
accounts. The web parts (Starlette, Jinja2, uvicorn: the ``console`` extra) are imported only
when the server starts."""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import sys
from datetime import timedelta
from typing import TYPE_CHECKING

from ratchet.cli.changes import pinned_key
from ratchet.cli.client import ClientError
from ratchet.cli.render import console as out
from ratchet.cli.render import plain
from ratchet.natsproc import port_in_use
from ratchet.settings import get_settings

if TYPE_CHECKING:
    from ratchet.console.accounts import Accounts

CONSOLE_EXTRA = "the review console needs the console extra: pip install 'ratchet[console]'"
DEFAULT_PORT = 8080


def accounts() -> Accounts:
    from ratchet.console.accounts import Accounts

    return Accounts.in_home(get_settings().home)


async def cmd_console(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ratchet.console.app import ConsoleConfig, build_console
        from ratchet.console.backend import Backend
    except ModuleNotFoundError as missing:
        raise ClientError(f"{CONSOLE_EXTRA} (no module {missing.name})") from None
    if bool(args.identity_header) != bool(args.trusted_proxy):
        raise ClientError("--identity-header and --trusted-proxy go together")
    try:
        proxies = [ipaddress.ip_network(a, strict=False) for a in args.trusted_proxy]
    except ValueError as exc:
        raise ClientError(f"--trusted-proxy: {exc}") from exc
    if port_in_use(args.port, args.host):
        raise ClientError(f"port {args.port} on {args.host} is in use: choose another (--port)")
    config = ConsoleConfig(
        session_lifetime=timedelta(hours=args.session_hours),
        identity_header=args.identity_header,
        trusted_proxies=proxies,
        proxy_role=None if args.proxy_role == "none" else args.proxy_role,
        secure_cookies=args.secure_cookies,
    )
    backend = Backend.from_environment(pinned_key(args.public_key) if args.public_key else None)
    await backend.start()  # NATS first: a console that cannot reach it says so and exits
    try:
        known = accounts()
        if not known.every() and not args.identity_header:
            plain("no accounts yet: ratchet console user add NAME --role reviewer")
        user = backend.settings.nats_user
        plain(f"review console on http://{args.host}:{args.port}/ (NATS user {user})")
        server = uvicorn.Server(
            uvicorn.Config(
                build_console(backend, known, config),
                host=args.host,
                port=args.port,
                proxy_headers=False,  # the trusted proxy is checked by its own address
                timeout_graceful_shutdown=3,  # pages following the events let go
                log_level="info",
            )
        )
        await server.serve()
    finally:
        await backend.stop()
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    from ratchet.console.accounts import AccountError

    password = None if args.no_password else read_password(args.password_stdin)
    try:
        account = accounts().add(args.name, args.role, password, replace=args.replace)
    except AccountError as exc:
        raise ClientError(str(exc)) from exc
    how = "through the trusted proxy only" if password is None else "with a password"
    plain(f"{account.name}: {account.role}, signs in {how}")
    return 0


def read_password(from_stdin: bool) -> str:
    """The new password: the first line of stdin, or asked twice at the terminal."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise ClientError("no terminal to ask for the password: use --password-stdin")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ClientError("the two passwords differ")
    return first


def cmd_user_remove(args: argparse.Namespace) -> int:
    from ratchet.console.accounts import AccountError

    try:
        accounts().remove(args.name)
    except AccountError as exc:
        raise ClientError(str(exc)) from exc
    plain(f"removed {args.name} (and ended their sessions)")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ratchet.cli.render import shown

    table = Table("name", "role", "signs in", "since")
    for account in accounts().every():
        how = "password" if account.password_hash else "trusted proxy only"
        table.add_row(
            shown(account.name), account.role, how, f"{account.created_at:%Y-%m-%d %H:%M}"
        )
    out.print(table)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    console = sub.add_parser(
        "console",
        help="the review console: web pages to approve changes and read the evidence and history",
    )
    console.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1)")
    console.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"({DEFAULT_PORT})")
    console.add_argument(
        "--session-hours", type=float, default=8.0, help="how long a sign-in lasts (8)"
    )
    console.add_argument(
        "--identity-header",
        metavar="HEADER",
        help="take the person's name from this header (say X-Forwarded-User), set by a single "
        "sign-on proxy; honoured only on requests from a --trusted-proxy address",
    )
    console.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="the proxy's address or network (repeatable)",
    )
    console.add_argument(
        "--proxy-role",
        choices=("viewer", "reviewer", "none"),
        default="viewer",
        help="the role of a name the proxy vouches for that has no console account (viewer; "
        "none: refused)",
    )
    console.add_argument(
        "--secure-cookies",
        action="store_true",
        help="mark cookies Secure (HTTPS only): set it when a TLS proxy serves the console",
    )
    console.add_argument(
        "--public-key",
        metavar="KEY_OR_FILE",
        help="verify the audit trail with this key instead of the one the gatekeeper sends "
        "(as `ratchet audit --public-key`)",
    )
    console.set_defaults(handler=cmd_console, is_async=True)

    console_sub = console.add_subparsers(dest="console_command", metavar="{user}")
    user = console_sub.add_parser("user", help="the console's accounts")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    add = user_sub.add_parser("add", help="add an account (asks for its password)")
    add.add_argument("name", help="lowercase letters, digits, - and _ (it names decisions)")
    add.add_argument("--role", choices=("reviewer", "viewer"), required=True)
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    add.add_argument(
        "--no-password",
        action="store_true",
        help="no password: this person signs in only through the trusted proxy",
    )
    add.add_argument("--replace", action="store_true", help="change an existing account")
    add.set_defaults(handler=cmd_user_add, is_async=False)
    remove = user_sub.add_parser("remove", help="remove an account and end its sessions")
    remove.add_argument("name")
    remove.set_defaults(handler=cmd_user_remove, is_async=False)
    listing = user_sub.add_parser("list", help="the accounts")
    listing.set_defaults(handler=cmd_user_list, is_async=False)
