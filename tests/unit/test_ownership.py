"""Who may touch the shared store's tables, read from the source (no service needs to run).

Every table has one owning service (docs/architecture.md, "Who owns what"): ``runs`` and
``failures`` the failure store, ``audit`` the gatekeeper. These tests parse the code with ``ast``:

- only the two owners open the shared store at all (``open_store``);
- each write to a shared table (the store's write methods have names nothing else uses) is made
  from its owner's package only;
- no operator tool (the ``ratchet.cli`` package: the commands, ``demo``, ``client``, ``up``; the
  review console, ``ratchet.console``; and everything they import from this project) can reach a
  database: they ask the owners over NATS;
- the library and the services never import the operator tools.

Reads are not told apart here: ``Store.audit`` and ``Store.failures`` share their names with the
gatekeeper's ``Gate.audit`` and the proposer's ``FailureStoreClient.failures``. A service reading a
table it does not own is caught at run time instead, by
``tests/integration/test_change_cycle.py::test_services_on_separate_hosts_own_their_tables``,
where each service has its own files and a read of someone else's table finds nothing.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STORE_PACKAGE = "ratchet.store"  # where the backends are defined; not a user of them
OWNERS = {"ratchet_failure_store", "ratchet_gatekeeper"}
WRITES = {
    "save_completed": "ratchet_failure_store",  # runs
    "save_scored": "ratchet_failure_store",  # runs
    "add_failure": "ratchet_failure_store",  # failures
    "append_audit": "ratchet_gatekeeper",  # audit
}
DATABASE_NAMES = {"open_store", "SqliteStore", "MongoStore"}
DRIVERS = {"sqlite3", "aiosqlite", "pymongo"}
TOOLS_PACKAGE = "ratchet.cli"  # the operator tools: the CLI's commands, client, demo, up, render
CONSOLE_PACKAGE = "ratchet.console"  # and the review console, a client of the services like them


def project_modules() -> Iterator[tuple[str, ast.Module]]:
    """(module name, syntax tree) of every module of the library and the services."""
    roots = [REPO / "shared", *(p for p in (REPO / "services").iterdir() if p.is_dir())]
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, ast.parse(path.read_text(encoding="utf-8"))


def names_used(tree: ast.Module) -> set[str]:
    """Every name and attribute the module mentions, and every name it imports."""
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            used.update(alias.name for alias in node.names)
    return used


def imports(tree: ast.Module) -> set[str]:
    """The modules this one imports, anywhere in it (also inside functions)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def is_tool(module: str) -> bool:
    return any(module == p or module.startswith(f"{p}.") for p in (TOOLS_PACKAGE, CONSOLE_PACKAGE))


def package_of(module: str) -> str:
    return module.split(".")[0]


def test_only_the_owners_open_the_shared_store() -> None:
    openers = {
        package_of(name)
        for name, tree in project_modules()
        if not name.startswith(STORE_PACKAGE) and "open_store" in names_used(tree)
    }

    assert openers == OWNERS


def test_each_shared_table_is_written_by_its_owner_only() -> None:
    writers = {
        (method, package_of(name))
        for name, tree in project_modules()
        if not name.startswith(STORE_PACKAGE)
        for method in WRITES.keys() & names_used(tree)
    }

    assert writers == set(WRITES.items())


def reachable_from(roots: tuple[str, ...]) -> dict[str, ast.Module]:
    """The project's modules that ``roots`` import, directly or not (the store package is where
    the record types live; it is reached but not followed into its backends)."""
    trees = dict(project_modules())
    seen: dict[str, ast.Module] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in seen or name not in trees:
            continue
        seen[name] = trees[name]
        if not name.startswith(STORE_PACKAGE):
            pending.extend(imports(trees[name]))
    return seen


def test_no_operator_tool_can_reach_a_database() -> None:
    tools = tuple(name for name, _ in project_modules() if is_tool(name))
    assert {"ratchet.cli", "ratchet.cli.demo", "ratchet.cli.client", "ratchet.console.app"} <= set(
        tools
    )
    reached = reachable_from(tools)
    assert set(tools) <= reached.keys()
    assert all(importlib.util.find_spec(name) is not None for name in tools)

    offenders = {
        name: sorted(DATABASE_NAMES & names_used(tree) | {i for i in imports(tree) if i in DRIVERS})
        for name, tree in reached.items()
        if not name.startswith(STORE_PACKAGE)
    }

    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_library_and_the_services_do_not_import_the_operator_tools() -> None:
    modules = dict(project_modules())
    assert TOOLS_PACKAGE in modules  # the scan sees the tools, so an empty answer means something

    offenders = {
        name: sorted(i for i in imports(tree) if is_tool(i))
        for name, tree in modules.items()
        if not is_tool(name)
    }

    assert {name: found for name, found in offenders.items() if found} == {}
