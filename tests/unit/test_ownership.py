"""Who may touch which table, read from the source (no service needs to run).

Every table has one owning service (docs/architecture.md, "Who owns what"); ``TABLE_OWNERS`` is
that table, and the first test checks the document still says the same. These tests parse the
code with ``ast`` and fail when a service touches, by reading as much as by writing, a table it
does not own:

- only the store's two owners open the shared store at all (``open_store``, the backends, the
  store's URL);
- every method of ``Store`` touches one table (``STORE_METHODS``; ``close`` none); a service may
  call a method only on a table it owns, and nothing of a store but its methods. Which
  expressions hold a store is worked out from the code: what ``open_store`` and the backends
  return, and every name, attribute, parameter and function annotated with a store type,
  followed through assignments (``StoreHolders``). Methods no other class defines count wherever
  they are called;
- SQL in the code names only its module's own tables, and no table without an owner;
- a database driver (``DRIVERS``) is imported only where ``DRIVER_USERS`` allows it: an owner's
  module that opens that owner's own files, and the store's backends;
- no operator tool (the ``ratchet.cli`` package: the commands, ``demo``, ``client``, ``up``; the
  review console, ``ratchet.console``; and everything they import from this project) can reach a
  database: they ask the owners over NATS;
- the library and the services never import the operator tools.

``tests/integration/test_change_cycle.py::test_services_on_separate_hosts_own_their_tables``
checks the same at run time: each service in a home of its own, and which tables got rows where.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STORE_PACKAGE = "ratchet.store"  # where the backends are defined; not a user of them
FAILURE_STORE = "ratchet_failure_store"
GATEKEEPER = "ratchet_gatekeeper"
PROPOSER = "ratchet_proposer"
# the owners as docs/architecture.md names them
SERVICE_NAMES = {"failure store": FAILURE_STORE, "gatekeeper": GATEKEEPER, "proposer": PROPOSER}
TABLE_OWNERS = {
    "runs": FAILURE_STORE,  # the store
    "failures": FAILURE_STORE,  # the store
    "audit": GATEKEEPER,  # the store
    "gate_runs": GATEKEEPER,  # gatekeeper-runs.db, or PostgreSQL
    "pool_uses": GATEKEEPER,
    "canaries": GATEKEEPER,
    "canary_runs": GATEKEEPER,
    "last_proposals": PROPOSER,  # proposer.db
}
STORE_TABLES = {"runs", "failures", "audit"}
STORE_OWNERS = {TABLE_OWNERS[table] for table in STORE_TABLES}
# every public method of ratchet.store.base.Store and the table it reads or writes (None: none)
STORE_METHODS: dict[str, str | None] = {
    "save_completed": "runs",
    "save_scored": "runs",
    "get_run": "runs",
    "gate_runs": "runs",
    "add_failure": "failures",
    "failures": "failures",
    "count_failures": "failures",
    "append_audit": "audit",
    "audit": "audit",
    "audit_head": "audit",
    "audit_at": "audit",
    "close": None,
}


def store_backends() -> dict[str, str]:
    """{class: module} of every backend: each class of the store package built on ``Store``."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "shared" / "ratchet" / "store").glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and any(
                isinstance(base, ast.Name) and base.id == "Store" for base in node.bases
            ):
                found[node.name] = f"{STORE_PACKAGE}.{path.stem}"
    return found


BACKENDS = store_backends()  # SqliteStore, MongoStore, ...
STORE_TYPES = {"Store", *BACKENDS}
# what gives a store, and what only its owners may name: where it is and how to open it
STORE_ENTRIES = {"open_store", "resolved_store_url", *BACKENDS}
WRAPPERS = {"enter_async_context", "enter_context", "cast"}  # they return what they are given
# database drivers (an import of the module or anything in it), the store's backends among them
DRIVERS = (
    "sqlite3",
    "aiosqlite",
    "pymongo",
    "motor",
    "psycopg",
    "psycopg2",
    "psycopg_pool",
    "asyncpg",
    "sqlalchemy",
    "langgraph.checkpoint.sqlite",
    "langgraph.checkpoint.postgres",
    *sorted(set(BACKENDS.values())),
)
# The modules outside the store package that import a driver, and which: each opens its own
# service's files and nothing else (the SQL test checks which tables they name).
DRIVER_USERS = {
    # the gatekeeper's ledger and checkpoints in PostgreSQL, its ledger file (open_own_db)
    f"{GATEKEEPER}.sql": {
        "aiosqlite",
        "langgraph.checkpoint.postgres",
        "psycopg",
        "psycopg_pool",
        "ratchet.store.sqlite",
    },
    # the change threads' checkpoints, gatekeeper-checkpoints.db in the gatekeeper's home
    f"{GATEKEEPER}.app": {"langgraph.checkpoint.sqlite"},
    # the proposer's marks, proposer.db in its home (open_own_db)
    f"{PROPOSER}.marks": {"aiosqlite", "ratchet.store.sqlite"},
}
TOOLS_PACKAGE = "ratchet.cli"  # the operator tools: the CLI's commands, client, demo, up, render
CONSOLE_PACKAGE = "ratchet.console"  # and the review console, a client of the services like them
# a statement, not prose that happens to say "update" or "create"
SQL_STATEMENT = re.compile(
    r"\b(?:select\b.*\bfrom|(?:insert|replace)(?:\s+or\s+\w+)?\s+into|update\s+\S+\s+set"
    r"|delete\s+from|create\s+(?:unique\s+)?(?:table|index|view|trigger)|alter\s+table"
    r"|drop\s+(?:table|index|view)|pragma)\b",
    re.IGNORECASE | re.DOTALL,
)
# the names a statement reads or writes (not every one: a comma join's second is a plain word;
# not a function's rows, FROM jsonb_array_elements_text(...))
SQL_TABLE = re.compile(
    r"\b(?:from|join)\s+[\"'`\[]?([a-z_]\w*)\b(?!\s*\()"
    r"|\b(?:into|(?<!do )update|table(?:\s+if\s+not\s+exists)?"
    r"|index\s+(?:if\s+not\s+exists\s+)?\w+\s+on)\s+[\"'`\[]?([a-z_]\w*)",
    re.IGNORECASE,
)
NOT_TABLES = {"sqlite_master", "excluded"}  # SQLite's catalogue, an upsert's proposed row
WORD = re.compile(r"[a-z_]\w*", re.IGNORECASE)


@cache
def project_modules() -> tuple[tuple[str, ast.Module], ...]:
    """(module name, syntax tree) of every module of the library and the services."""
    roots = [REPO / "shared", *(p for p in (REPO / "services").iterdir() if p.is_dir())]
    found = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found.append((name, ast.parse(path.read_text(encoding="utf-8"))))
    return tuple(found)


def users_of_the_store() -> Iterator[tuple[str, ast.Module]]:
    """The modules, other than the store's own, that might use it."""
    return ((n, t) for n, t in project_modules() if not in_package(n, STORE_PACKAGE))


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


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


def drivers(tree: ast.Module) -> set[str]:
    """The drivers the module imports, or names in a string (``importlib.import_module``)."""
    named = imports(tree) | {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    return {d for d in DRIVERS if any(in_package(name, d) for name in named)}


def is_tool(module: str) -> bool:
    return in_package(module, TOOLS_PACKAGE) or in_package(module, CONSOLE_PACKAGE)


def package_of(module: str) -> str:
    return module.split(".")[0]


def test_the_owners_are_the_ones_the_architecture_names() -> None:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Who owns what", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not line.startswith("|"):
            continue
        tables = re.findall(r"`(\w+)`", cells[0].split("(", 1)[0])
        owner = next((p for n, p in SERVICE_NAMES.items() if cells[1].startswith(n)), cells[1])
        documented.update(dict.fromkeys(tables, owner))

    assert documented == TABLE_OWNERS


def test_every_store_method_has_a_table() -> None:
    base = ast.parse((REPO / "shared/ratchet/store/base.py").read_text(encoding="utf-8"))
    store = next(n for n in base.body if isinstance(n, ast.ClassDef) and n.name == "Store")
    methods = {
        node.name
        for node in store.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and not node.name.startswith("_")
    }

    assert {"SqliteStore", "MongoStore"} <= BACKENDS.keys()
    assert methods == STORE_METHODS.keys()
    assert {t for t in STORE_METHODS.values() if t} == STORE_TABLES


def test_only_the_owners_open_the_shared_store() -> None:
    openers = {
        (entry, package_of(name))
        for name, tree in users_of_the_store()
        if name != "ratchet.settings"  # where the store's URL is configured
        for entry in STORE_ENTRIES & names_used(tree)
    }

    assert openers == {("open_store", owner) for owner in STORE_OWNERS} | {
        ("resolved_store_url", owner) for owner in STORE_OWNERS
    }


def annotated_store(annotation: ast.expr | None) -> bool:
    """Whether an annotation mentions a store type (``Store``, ``Store | None``, ``"Store"``)."""
    for node in ast.walk(annotation) if annotation else ():
        if isinstance(node, ast.Name) and node.id in STORE_TYPES:
            return True
        if isinstance(node, ast.Attribute) and node.attr in STORE_TYPES:
            return True
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                quoted = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                continue
            if annotated_store(quoted):
                return True
    return False


def last_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


class StoreHolders:
    """Which names, attributes and functions hold or give a store, anywhere in the project
    (a name that holds one in one place is taken to hold one everywhere: the check errs towards
    finding a store, never towards missing one)."""

    def __init__(self) -> None:
        self.names: set[str] = set()  # variables, parameters and attributes
        self.makers: set[str] = set(STORE_ENTRIES - {"resolved_store_url"})  # calls that give one
        trees = [tree for _, tree in users_of_the_store()]
        while True:
            before = len(self.names) + len(self.makers)
            for tree in trees:
                self.learn(tree)
            if len(self.names) + len(self.makers) == before:
                return

    def holds(self, node: ast.expr) -> bool:
        if isinstance(node, ast.Await | ast.NamedExpr):
            return self.holds(node.value)
        if isinstance(node, ast.IfExp):
            return self.holds(node.body) or self.holds(node.orelse)
        if isinstance(node, ast.BoolOp):
            return any(self.holds(value) for value in node.values)
        if isinstance(node, ast.Call):
            called = last_name(node.func)
            return called in self.makers or (
                called in WRAPPERS and any(self.holds(a) or annotated_store(a) for a in node.args)
            )
        return last_name(node) in self.names

    def bind(self, target: ast.expr) -> None:
        if isinstance(target, ast.Tuple | ast.List):
            for element in target.elts:
                self.bind(element)
        elif isinstance(target, ast.Starred):
            self.bind(target.value)
        elif name := last_name(target):
            self.names.add(name)

    def learn(self, tree: ast.Module) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if annotated_store(node.returns):
                    self.makers.add(node.name)
                arguments = node.args
                every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
                every += [a for a in (arguments.vararg, arguments.kwarg) if a]
                self.names.update(a.arg for a in every if annotated_store(a.annotation))
            elif isinstance(node, ast.AnnAssign):
                if annotated_store(node.annotation) or (node.value and self.holds(node.value)):
                    self.bind(node.target)
            elif isinstance(node, ast.Assign | ast.NamedExpr) and self.holds(node.value):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    self.bind(target)
            elif (
                isinstance(node, ast.withitem)
                and node.optional_vars
                and self.holds(node.context_expr)
            ):
                self.bind(node.optional_vars)


def defined_elsewhere() -> set[str]:
    """Names that something besides the store defines: a method, a function, an attribute."""
    found: set[str] = set()
    for module, tree in users_of_the_store():
        found.add(module.rsplit(".", 1)[-1])
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                found.add(node.attr)
            elif isinstance(node, ast.AnnAssign) and (target := last_name(node.target)):
                found.add(target)
    return found


def store_uses() -> set[tuple[str, str, int, str]]:
    """(package, module, line, the store method or attribute) of every use of a store outside
    the store package: an attribute of something that holds a store, by ``.name`` or
    ``getattr``, and any use of a store method that nothing else defines, whatever it is called
    on."""
    holders = StoreHolders()
    only_the_stores = STORE_METHODS.keys() - defined_elsewhere() - {"close"}
    uses: set[tuple[str, str, int, str]] = set()
    for name, tree in users_of_the_store():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and (
                holders.holds(node.value) or node.attr in only_the_stores
            ):
                uses.add((package_of(name), name, node.lineno, node.attr))
            elif (
                isinstance(node, ast.Call)
                and last_name(node.func) == "getattr"
                and node.args
                and holders.holds(node.args[0])
            ):
                attr = node.args[1] if len(node.args) > 1 else None
                method = attr.value if isinstance(attr, ast.Constant) else "<computed>"
                uses.add((package_of(name), name, node.lineno, str(method)))
    return uses


def test_services_call_the_store_only_on_their_own_tables() -> None:
    uses = store_uses()
    outside_the_interface = {use for use in uses if use[3] not in STORE_METHODS}
    not_their_own = {
        (module, line, method, table, TABLE_OWNERS[table])
        for package, module, line, method in uses
        if (table := STORE_METHODS.get(method)) and TABLE_OWNERS[table] != package
    }
    touched: dict[str, set[str]] = {}
    for package, _, _, method in uses:
        if table := STORE_METHODS.get(method):
            touched.setdefault(package, set()).add(table)

    assert outside_the_interface == set()  # a backend's insides are the backend's own
    assert not_their_own == set()  # (module, line, method, its table, that table's owner)
    # and the scan sees each owner's own calls, so an empty answer above means something
    assert touched == {FAILURE_STORE: {"runs", "failures"}, GATEKEEPER: {"audit"}}


def strings(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, text) of the module's strings but its docstrings; an f-string's fixed parts."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    in_fstrings = {
        id(part)
        for node in ast.walk(tree)
        if isinstance(node, ast.JoinedStr)
        for part in node.values
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = (p.value if isinstance(p, ast.Constant) else " ? " for p in node.values)
            yield node.lineno, "".join(str(part) for part in parts)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings | in_fstrings
        ):
            yield node.lineno, node.value


def test_sql_names_only_its_modules_own_tables() -> None:
    named: dict[str, set[str]] = {}
    not_their_own = set()
    without_owner = set()
    for module, tree in project_modules():
        package = STORE_PACKAGE if in_package(module, STORE_PACKAGE) else package_of(module)
        for line, text in strings(tree):
            if not SQL_STATEMENT.search(text):
                continue
            tables = {w.lower() for w in WORD.findall(text)} & TABLE_OWNERS.keys()
            named.setdefault(package, set()).update(tables)
            own = STORE_TABLES if package == STORE_PACKAGE else set()
            not_their_own |= {
                (module, line, t) for t in tables if t not in own and TABLE_OWNERS[t] != package
            }
            without_owner |= {
                (module, line, t)
                for t in (("".join(m)).lower() for m in SQL_TABLE.findall(text))
                if t not in TABLE_OWNERS and t not in NOT_TABLES
            }

    assert not_their_own == set()  # (module, line, a table it does not own)
    assert without_owner == set()  # a new table: give it an owner in TABLE_OWNERS and the docs
    assert named == {
        STORE_PACKAGE: STORE_TABLES,
        GATEKEEPER: {"gate_runs", "pool_uses", "canaries", "canary_runs"},
        PROPOSER: {"last_proposals"},
    }


def test_only_an_owners_own_modules_import_a_database_driver() -> None:
    importers = {
        name: found
        for name, tree in project_modules()
        if not in_package(name, STORE_PACKAGE) and (found := drivers(tree))
    }
    # the store's own helper for a service's own file, outside the modules that open one
    own_db = {
        name
        for name, tree in users_of_the_store()
        if "open_own_db" in names_used(tree) and name not in DRIVER_USERS
    }

    assert importers == DRIVER_USERS
    assert own_db == set()


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
        if not in_package(name, STORE_PACKAGE):
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
        name: sorted(STORE_ENTRIES & names_used(tree) | drivers(tree))
        for name, tree in reached.items()
        if not in_package(name, STORE_PACKAGE) and name != "ratchet.settings"
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
