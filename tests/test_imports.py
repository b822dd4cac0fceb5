"""The import rules of the code base (issue 17), read from the source with `ast`: no service imports
another service; `contracts/` imports nothing else of the project; `libs/` imports neither
`services/` nor `visionloop/`; `services/` does not import `visionloop/`; and no two modules
import each other, directly or around a longer loop. Every import counts, those inside functions
too; for cycles, not those under `if TYPE_CHECKING:` (never executed: the bus runtime's parts name
the runtime that owns them only for the type checker). And the sizes STYLE.md sets: no file over
600 lines, no function over 60."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"visionloop": ROOT / "visionloop", "visionloop.libs": ROOT / "libs", "visionloop.services": ROOT / "services",
            "visionloop.contracts": ROOT / "contracts"}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _type_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`."""
    return {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
            for statement in block.body for node in ast.walk(statement)}


def _imports(name: str, path: Path, *, typing: bool = True) -> set[str]:
    """The project modules `name` imports (a `from X import Y` names X.Y where that is a module);
    without `typing`, not those only the type checker runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set() if typing else _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in out if m in MODULES and m != name}


GRAPH = nx.DiGraph([(name, target) for name, path in MODULES.items() for target in _imports(name, path)])
RUN_TIME = nx.DiGraph([(name, target) for name, path in MODULES.items() for target in _imports(name, path, typing=False)])


def _area(module: str) -> str:
    for area in ("visionloop.libs", "visionloop.services", "visionloop.contracts"):
        if module == area or module.startswith(area + "."):
            return area
    return "visionloop"


def _service(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["visionloop", "services"] else None


def test_no_service_imports_another() -> None:
    bad = [(a, b) for a, b in GRAPH.edges if _service(a) and _service(b) and _service(a) != _service(b)]
    assert bad == []


@pytest.mark.parametrize(("area", "allowed"), [
    ("visionloop.contracts", {"visionloop.contracts"}),
    ("visionloop.libs", {"visionloop.libs", "visionloop.contracts"}),
    ("visionloop.services", {"visionloop.services", "visionloop.libs", "visionloop.contracts"}),
])
def test_layers_import_only_what_is_below_them(area: str, allowed: set[str]) -> None:
    bad = sorted((a, b) for a, b in GRAPH.edges if _area(a) == area and _area(b) not in allowed)
    assert bad == []


def test_no_import_cycles() -> None:
    cycles = [sorted(c) for c in nx.strongly_connected_components(RUN_TIME) if len(c) > 1]
    assert cycles == []


def test_the_check_sees_the_code() -> None:
    """Guards the test itself: it finds the modules and their imports."""
    assert len(MODULES) > 150
    assert ("visionloop.services.dedup.handlers", "visionloop.services.dedup.store") in GRAPH.edges
    assert ("visionloop.libs.bus.runtime", "visionloop.libs.kafka") in GRAPH.edges


def test_no_file_over_600_lines_and_no_function_over_60() -> None:
    """Counted as the style guide counts: a file's lines; a function from its `def` to its last line."""
    long_files = sorted(f"{path.relative_to(ROOT)}: {n}" for path in MODULES.values()
                        if (n := path.read_text(encoding="utf-8").count("\n")) > 600)
    long_functions = sorted(
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}"
        for path in MODULES.values() for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60
    )
    assert long_files == [] and long_functions == []


def test_every_service_s_decisions_have_their_own_unit_tests() -> None:
    """`services/<name>/decide.py` comes with `tests/<name>/test_decide.py` (no broker, no database)."""
    services = sorted(p.parent.name for p in (ROOT / "services").glob("*/decide.py"))
    assert len(services) >= 11
    assert [s for s in services if not (ROOT / "tests" / s / "test_decide.py").is_file()] == []


SQL = re.compile(r"^\s*(SELECT|INSERT\s+INTO|UPDATE\s+\S+\s+SET|DELETE\s+FROM|WITH\s+\w+\s+AS)\b", re.IGNORECASE)


def _sql_strings(path: Path) -> list[int]:
    """Lines of the string literals (f-strings' text included) that start as a SQL statement."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
            found.append(node.lineno)
        elif isinstance(node, ast.JoinedStr) and node.values:
            head = node.values[0]
            if isinstance(head, ast.Constant) and isinstance(head.value, str) and SQL.match(head.value):
                found.append(node.lineno)
    return sorted(set(found))


def test_a_service_s_sql_is_in_its_store_modules() -> None:
    """Every SQL statement of a service sits in `store.py` (or a `<part>_store.py` beside it, as the
    gateway's economy, dashboard and Label Studio queries do)."""
    outside = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted((ROOT / "services").rglob("*.py"))
        if not (path.name == "store.py" or path.name.endswith("_store.py"))
        for line in _sql_strings(path)
    ]
    assert outside == []
    assert _sql_strings(ROOT / "services" / "labeling_gateway" / "dashboard_store.py")  # the check sees SQL
