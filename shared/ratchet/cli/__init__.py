"""The ``ratchet`` command line. Every error a user can cause is one line and a non-zero exit.

The operator tools, apart from the library: each command group registers its own sub-commands
(``runs``, ``changes``, ``prompts``, ``suites``, ``stack``); ``client`` talks to a running Ratchet,
``render`` prints, ``demo`` and ``up`` are ``ratchet demo`` and ``ratchet up``. Nothing in the
library imports this package.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

SERVICES_EXTRA = "this command needs the services extra: pip install 'ratchet[services]'"

try:
    from ratchet.cli import changes, console, prompts, runs, stack, suites
    from ratchet.cli.client import ClientError
    from ratchet.natsproc import NatsStartError
    from ratchet.untrusted import for_terminal
except ModuleNotFoundError as missing:  # the base install (the SDK alone) has no CLI
    if (missing.name or "ratchet").partition(".")[0] == "ratchet":
        raise
    print(f"ratchet: error: {SERVICES_EXTRA} (no module {missing.name})", file=sys.stderr)
    raise SystemExit(1) from None

# the order `ratchet --help` lists them in
GROUPS = (stack, runs, changes, prompts, suites, console)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ratchet",
        description="Ratchet: improve LLM agents' task prompts without drifting. Start with "
        "`ratchet up`, or `ratchet demo` for one whole cycle.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], Any] = args.handler
    try:
        return int(asyncio.run(handler(args)) if args.is_async else handler(args))
    except (ClientError, NatsStartError) as exc:
        print(f"ratchet: error: {for_terminal(str(exc))}", file=sys.stderr)
        return 1
    except ValidationError as exc:  # a message built from the arguments is over a limit, say
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or exc.title
        print(f"ratchet: error: {where}: {first['msg']}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
