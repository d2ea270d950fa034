"""The structure limits of docs/layout.md, checked on the package's source (AST only, < 1 s).

- No import cycles between modules of ``rkekernels``, counting imports inside functions
  (imports under ``if TYPE_CHECKING:`` are not arrows).
- An import inside a function reaches an internal module only where that module needs an
  optional dependency at import (Triton, numba): `LAZY_INTERNAL`.
- No module over `MAX_MODULE_LINES` lines; no function over `MAX_FUNCTION_LINES` lines of code
  (docstrings, comments and blank lines not counted; numba / Triton ``jit`` kernels exempt).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rkekernels"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100
#: internal modules that import an optional dependency at their top (Triton, numba, diffusers):
#: reached lazily, from a function
LAZY_INTERNAL = {
    "rkekernels.adapters.diffusers",
    "rkekernels.ops.guidance_numba",
    "rkekernels.ops.guidance_triton",
    "rkekernels.ops.scores_triton",
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


class _Imports(ast.NodeVisitor):
    """The internal modules a module imports: (target, inside a function)."""

    def __init__(self, name: str, is_pkg: bool, known: set[str]) -> None:
        self.name, self.is_pkg, self.known = name, is_pkg, known
        self.depth = 0
        self.found: list[tuple[str, bool]] = []

    def visit_FunctionDef(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for stmt in node.orelse:
                self.visit(stmt)
            return
        self.generic_visit(node)

    def _add(self, targets: list[str]) -> None:
        for t in targets:
            if t in self.known and t != self.name:
                self.found.append((t, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        self._add([a.name for a in node.names])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.name.split(".") if self.is_pkg else self.name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        # "from . import x" names a submodule; "from .m import f" names m only
        subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in self.known]
        self._add(subs or [mod])


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    inner: list[tuple[str, str]] = []
    for name, path in mods.items():
        v = _Imports(name, path.name == "__init__.py", set(mods))
        v.visit(ast.parse(path.read_text()))
        for target, in_function in v.found:
            edges[name].add(target)
            if in_function:
                inner.append((name, target))
    return edges, inner


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
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
        for w in edges[v]:
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

    for v in edges:
        if v not in index:
            visit(v)
    return out


def _code_lines(node: ast.AST, lines: list[str]) -> int:
    body = node.body
    doc: range = range(0)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            doc = range(body[0].lineno, body[0].end_lineno + 1)
    count = 0
    for i in range(node.lineno, node.end_lineno + 1):
        text = lines[i - 1].strip()
        if i not in doc and text and not text.startswith("#"):
            count += 1
    return count


def test_no_import_cycles():
    edges, _ = _graph()
    assert sum(map(len, edges.values())) > 100  # the graph was read (relative imports resolve)
    assert _cycles(edges) == []


def test_imports_inside_functions_only_for_optional_dependencies():
    _, inner = _graph()
    bad = [(a, b) for a, b in inner if b not in LAZY_INTERNAL and b != "rkekernels.ops"]
    assert bad == []
    assert {b for _, b in inner} - {"rkekernels.ops"} == LAZY_INTERNAL  # each one is used


def test_module_and_function_sizes():
    big, long = [], []
    for name, path in _modules().items():
        text = path.read_text()
        lines = text.splitlines()
        if len(lines) > MAX_MODULE_LINES:
            big.append((name, len(lines)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if any("jit" in ast.unparse(d) for d in node.decorator_list):
                    continue
                n = _code_lines(node, lines)
                if n > MAX_FUNCTION_LINES:
                    long.append((f"{name}.{node.name}", n))
    assert big == [] and long == []


def test_the_check_sees_a_cycle():
    """The cycle finder itself: a -> b -> a is found, a DAG is not."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
