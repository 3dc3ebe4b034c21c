"""The layering of docs/architecture.md holds: no import cycle between trioproxy's modules,
no package importing one above it, and the protocol package free of I/O.

Every import counts: top-level, inside functions, and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "trioproxy"

#: bottom to top; a module may import from its own layer or one below it
LAYERS: list[set[str]] = [
    {"trioproxy", "trioproxy.protocol"},
    {"trioproxy.logs", "trioproxy.config", "trioproxy.streams"},
    {"trioproxy.admission", "trioproxy.metrics"},
    {"trioproxy.store"},
    {"trioproxy.accounts"},
    {"trioproxy.reqlog"},
    {"trioproxy.keys"},
    {"trioproxy.upstream"},
    {"trioproxy.web"},
    {"trioproxy.sessions"},
    {"trioproxy.app", "trioproxy.dashboard"},
    {"trioproxy.server", "trioproxy.serving_hypercorn"},
    {
        "trioproxy.harness",
        "trioproxy.demo",
        "trioproxy.cli",
        "trioproxy.cli_admin",
        "trioproxy.cli_dashboard",
        "trioproxy.cli_keys",
        "trioproxy.cli_usage",
        "trioproxy.cli_options",
    },
]
#: what sans-IO code may not import
IO_MODULES = ("trio", "httpx", "httptools", "socket", "ssl", "wsproto", "trio_websocket")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> Iterator[str]:
    """Every module ``path`` imports (absolute names), wherever the import statement is.
    ``from package import module`` is an import of that module (Python runs the package's
    ``__init__`` first whoever imports anything in it, so that is no edge of its own)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names = [f"{module}.{alias.name}" for alias in node.names]
            submodules = [n for n in names if n in known]
            yield from submodules
            if len(submodules) < len(names):
                yield module


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(modules)
    return {
        name: {i for i in imports(path, known) if i in modules and i != name}
        for name, path in modules.items()
    }


def layer_of(module: str) -> int:
    best = -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or module.startswith(prefix + ".")
            if inside and (prefix != "trioproxy" or module == "trioproxy"):
                best = index
    assert best >= 0, f"{module} is in no layer of docs/architecture.md"
    return best


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def breaches(edges: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} imports {target}"
        for module, targets in edges.items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]


def test_no_module_imports_itself_back_through_others() -> None:
    assert find_cycles(graph()) == []


def test_no_package_imports_one_above_it() -> None:
    assert breaches(graph()) == []


def test_protocol_code_does_no_io() -> None:
    wrong = [
        f"{module_name(path)} imports {name}"
        for path in (ROOT / "protocol").rglob("*.py")
        for name in imports(path, set())
        if name.split(".")[0] in IO_MODULES
    ]
    assert wrong == []


def test_the_checks_find_what_they_look_for() -> None:
    sessions, protocol, web = (
        "trioproxy.sessions.failover",
        "trioproxy.protocol.errors",
        "trioproxy.web.http1",
    )
    assert find_cycles({sessions: {protocol}, protocol: {web}, web: {sessions}}) == [
        sorted([sessions, protocol, web])
    ]
    assert breaches({protocol: {sessions}}) == [f"{protocol} imports {sessions}"]
    assert protocol in graph()[sessions]  # real imports are seen
