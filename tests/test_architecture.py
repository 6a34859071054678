"""
DESIGN.md's import rules, checked over the source with the ast module: the
receive and send sides meet only at the spool; pipeline modules never import
ops; only tap and cli import the global reactor; each third-party library has
one home; pure layers import no Twisted runtime.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "relaygw"

RECEIVE = ("relaygw.listen", "relaygw.connectors", "relaygw.session", "relaygw.auth", "relaygw.accept")
SEND = ("relaygw.route", "relaygw.deliver")
PIPELINE = RECEIVE + SEND + ("relaygw.spool", "relaygw.config")
PURE = (
    "relaygw.config._units",
    "relaygw.connectors",
    "relaygw.session.rights",
    "relaygw.session.policy",
    "relaygw.session.address",
    "relaygw.route.router",
    "relaygw.deliver.outcome",
    "relaygw.deliver.dsn",
    "relaygw.spool.ids",
    "relaygw.quoting",
)
# Interfaces and exception types are values, not runtime: pure code may name them.
_PURE_TWISTED_OK = (
    "twisted.internet.interfaces",
    "twisted.internet.error",
    "twisted.names.error",
    "twisted.python.failure",
)
HOMES = {
    "ldap3": ("relaygw.auth.directory",),
    "tomllib": ("relaygw.config._load",),
    "treq": ("relaygw.deliver.mtasts", "relaygw.deliver.oauth"),
}


def _modules() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        imports: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imports.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:
                    pkg = name.split(".")[: -node.level if path.stem != "__init__" else len(parts)]
                    base = ".".join([*pkg, node.module])
                imports.update(f"{base}.{alias.name}" for alias in node.names)
        found[name] = imports
    return found


MODULES = _modules()


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(sources: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{mod} imports {imp}"
        for mod, imports in MODULES.items()
        if _under(mod, sources)
        for imp in imports
        if _under(imp, forbidden)
    )


def test_modules_found() -> None:
    """The scan sees the package (a guard against a vacuous pass)."""
    assert "relaygw.session.protocol" in MODULES
    assert "relaygw.deliver.scheduler" in MODULES


def test_receive_side_never_imports_send_side() -> None:
    """The receive side and the send side meet only at ISpool and Envelope."""
    assert _violations(RECEIVE, SEND) == []
    assert _violations(SEND, RECEIVE) == []


def test_pipeline_never_imports_ops() -> None:
    """Pipeline modules emit events; ops observers subscribe."""
    assert _violations(PIPELINE, ("relaygw.ops",)) == []


def test_only_tap_and_cli_import_the_global_reactor() -> None:
    """Habit 1: everything else gets the reactor injected."""
    offenders = [
        mod
        for mod, imports in MODULES.items()
        if "twisted.internet.reactor" in imports and not _under(mod, ("relaygw.tap", "relaygw.cli"))
    ]
    assert offenders == []


@pytest.mark.parametrize("library", sorted(HOMES))
def test_third_party_library_has_one_home(library: str) -> None:
    """Each third-party library is imported by its one home module only."""
    offenders = [
        mod
        for mod, imports in MODULES.items()
        if any(_under(i, (library,)) for i in imports) and mod not in HOMES[library]
    ]
    assert offenders == []


def test_pure_layer_has_no_twisted_runtime() -> None:
    """L1 decisions import no Deferred, no reactor, no I/O: Twisted interfaces at most."""
    offenders = [
        f"{mod} imports {imp}"
        for mod, imports in MODULES.items()
        if _under(mod, PURE)
        for imp in imports
        if imp.startswith("twisted") and not imp.startswith(_PURE_TWISTED_OK)
    ]
    assert offenders == []


def _package_graph(package: str) -> dict[str, set[str]]:
    """The import graph among the modules directly in C{package} (TYPE_CHECKING imports too)."""
    members = {m for m in MODULES if m.rpartition(".")[0] == package}
    graph: dict[str, set[str]] = {}
    for mod in members:
        targets = set()
        for imp in MODULES[mod]:
            # "relaygw.session.factory.SessionFactory" names the module relaygw.session.factory.
            while imp and imp not in members:
                imp = imp.rpartition(".")[0]
            if imp and imp != mod:
                targets.add(imp)
        graph[mod] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of C{graph} (its modules in order, the first repeated), or []."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


PACKAGES = sorted({m.rpartition(".")[0] for m in MODULES if m.count(".") >= 1})


def test_cycle_finder_sees_a_circle() -> None:
    """The cycle rule can fail (a guard against a vacuous pass)."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []
    assert "relaygw.session" in PACKAGES and "relaygw.spool" in PACKAGES


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_run_one_way(package: str) -> None:
    """Within each package, no module imports (even for type checking) lead back to itself."""
    assert _cycle(_package_graph(package)) == []
