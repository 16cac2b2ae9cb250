"""The package's import structure (docs/layout.md): no module imports another that imports it
back, directly or through others, counting imports inside functions too (a lazy import still
ties two modules together), and the engines are where the docs say."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "dlf_rs"


def module_name(path: Path) -> str:
    parts = ["dlf_rs", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules ``path`` imports (``from . import x`` resolved to a submodule when
    x is one; ``from .a import b`` to ``a``, or ``a.b`` when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [f"{root}.{a.name}" if f"{root}.{a.name}" in modules else root
                       for a in node.names]  # fmt: skip
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def graph() -> dict[str, set[str]]:
    files = [p for p in PACKAGE.rglob("*.py") if "checkpoints" not in p.parts]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def without_package_init(g: dict[str, set[str]]) -> dict[str, set[str]]:
    """Importing ``dlf_rs.x`` runs ``dlf_rs/__init__`` first; that is not a dependency of x on
    the package's own re-exports, so edges into package ``__init__`` files are left out."""
    inits = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    return {m: {t for t in deps if t not in inits} for m, deps in g.items()}


def test_no_import_cycles() -> None:
    assert cycles(without_package_init(graph())) == []


def test_cycle_finder_sees_a_cycle() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]


def test_engines_share_the_row_fusion() -> None:
    g = graph()
    assert "dlf_rs.engines.fusion" in g["dlf_rs.engines.vllm.logits"]
    assert not any(m.startswith("dlf_rs.engines.vllm") for m in g["dlf_rs.engines.fusion"])
    assert "dlf_rs.cli" not in g["dlf_rs.engines.vllm.serve"]
