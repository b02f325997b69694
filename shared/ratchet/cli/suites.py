"""``ratchet suite import``: task suites as data."""

from __future__ import annotations

import argparse
from pathlib import Path

from ratchet.cli.client import ClientError
from ratchet.cli.render import plain
from ratchet.settings import get_settings


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
    plain(
        f"imported task {suite.name!r}: {len(suite.learn)} learn + {len(suite.gate)} gate + "
        f"{len(suite.holdout)} holdout cases (seed {args.seed}) -> {target}"
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    suite = sub.add_parser("suite", help="task suites")
    suite_sub = suite.add_subparsers(dest="suite_command", required=True)
    suite_import = suite_sub.add_parser("import", help="import a BIG-bench task.json as a suite")
    suite_import.add_argument("path")
    suite_import.add_argument("--name")
    suite_import.add_argument(
        "--gate-size",
        type=int,
        default=220,
        help="gate pool cases (default 220: the gate measures up to 200, and 20 are kept for the "
        "check after applying)",
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
