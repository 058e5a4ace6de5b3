"""The package structure: the runtime (``import diffboost``) loads no command line, demo, bench or
reference-model code, and no module imports itself back through others (no import cycles)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: package -> the folder holding it (the reference package is its own distribution in reference/)
PACKAGES = {"diffboost": ROOT, "diffboost_reference": ROOT / "reference"}
#: what sits on top of the runtime: never imported by it
TOP = ("diffboost.cli", "diffboost.batch", "diffboost.generation", "diffboost.limits", "diffboost.app",
       "diffboost.bench", "diffboost.distill", "diffboost_reference")
RUNTIME = ("diffboost.plugins", "diffboost.caches", "diffboost.samplers", "diffboost.tokens", "diffboost.kernels",
           "diffboost.files")


def _modules() -> dict[str, Path]:
    found = {}
    for top, base in PACKAGES.items():
        for path in (base / top).rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports anywhere (functions too), except under TYPE_CHECKING."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        out.add(sub)
                    elif target in modules:
                        out.add(target)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    modules = _modules()
    assert "diffboost.generation" in _imports("diffboost.cli", modules["diffboost.cli"], modules)


def test_the_runtime_never_imports_the_layers_above_it():
    graph = _graph()
    runtime = [m for m in graph if m == "diffboost" or m.startswith(RUNTIME)]
    assert len(runtime) > 15
    bad = {m: sorted(d for d in graph[m] if d.startswith(TOP)) for m in runtime}
    assert {m: d for m, d in bad.items() if d} == {}


def test_import_diffboost_loads_only_the_runtime():
    code = ("import sys, diffboost; d = diffboost.TaylorSeer(); "
            f"print(sorted(m for m in sys.modules if m.startswith({TOP!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
