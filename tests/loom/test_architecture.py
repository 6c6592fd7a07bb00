"""The architecture's rules, checked on the source: no import cycles among Loom's modules, the
layering (lang speaks to the runtime only through runtime/protocol.py; nothing imports upward
into the entry points), no library file over the size one reader can hold, and a runtime/ folder
that stays grouped."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Where each part of the `loom` namespace lives (pyproject.toml's package-dir).
PACKAGE_DIRS = {"loom": "loom", "loom.lang": "lang", "loom.runtime": "runtime", "loom.radix_cache": "radix_cache",
                "loom.kernels": "kernels"}  # fmt: skip
MAX_LINES = 600
MAX_FLAT_RUNTIME_MODULES = 12


def source_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if name.split(".")[:2] == ["loom", "loom"] or (package == "loom" and parts and parts[0] in
                                                            {"lang", "runtime", "radix_cache", "kernels"}):
                continue  # fmt: skip
            modules[name] = path
    return modules


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The Loom modules `name` imports, anywhere in the file (lazy imports inside functions count:
    they hide a cycle, they do not remove it), except under `if TYPE_CHECKING:`."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(here[: len(here) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    found.add(f"{base}.{alias.name}")
            if base in modules:  # `from package import module` reads the package's namespace too
                found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_lang_reaches_the_runtime_only_through_the_protocol():
    for name, deps in import_graph().items():
        if name.startswith("loom.lang"):
            runtime = {d for d in deps if d.startswith("loom.runtime")}
            assert runtime <= {"loom.runtime.protocol"}, f"{name} imports {sorted(runtime)}"


def test_nothing_below_imports_the_entry_points():
    for name, deps in import_graph().items():
        if name.startswith(("loom.runtime.scheduler", "loom.runtime.model_executor", "loom.runtime.detokenizer",
                            "loom.runtime.constrained", "loom.radix_cache", "loom.kernels")):  # fmt: skip
            upward = {d for d in deps if d.startswith(("loom.runtime.entrypoints", "loom.runtime.front", "loom.lang"))}
            assert not upward, f"{name} imports {sorted(upward)}"


def test_no_library_file_is_too_long_to_read():
    too_long = {str(path.relative_to(ROOT)): n for path in source_modules().values()
                if (n := len(path.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert too_long == {}


def test_runtime_stays_grouped():
    flat = sorted(p.name for p in (ROOT / "runtime").glob("*.py") if p.name != "__init__.py")
    assert len(flat) <= MAX_FLAT_RUNTIME_MODULES, flat


def test_the_version_is_written_in_one_place():
    import loom

    quoted = (f'"{loom.__version__}"', f"'{loom.__version__}'")
    written = [str(path.relative_to(ROOT)) for path in source_modules().values() if any(q in path.read_text() for q in quoted)]
    assert written == ["loom/__init__.py"]
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()
