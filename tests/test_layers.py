"""The package's import layers (docs/ARCHITECTURE.md), checked by walking every module's imports with `ast`.

A module may import modules of its own layer or lower ones; the packages of an *independent* layer must not
import each other; click is imported only in files named ``cli.py`` and in the command-line package
``opd_dynamics/cli/``; at most eight modules sit directly in
``opd_dynamics/``; and the imports (at import time, in functions or under TYPE_CHECKING) form no cycle. The layer
table below is the rule; ``docs/ARCHITECTURE.md`` must list the same layers (a test compares them), so the document
cannot drift.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "opd_dynamics"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
MAX_TOP_LEVEL_MODULES = 8


@dataclass(frozen=True)
class Layer:
    number: int
    members: tuple[str, ...]  # modules or packages (a package stands for everything under it)
    independent: bool = False  # True: the members are siblings that must not import each other


#: the rule, bottom to top (docs/ARCHITECTURE.md's layer table must say the same)
LAYERS: tuple[Layer, ...] = (
    Layer(0, ("opd_dynamics._version", "opd_dynamics.errors", "opd_dynamics.fields", "opd_dynamics.schema",
              "opd_dynamics.numerics")),
    Layer(1, ("opd_dynamics.io", "opd_dynamics.cli.kit")),
    Layer(2, ("opd_dynamics.analysis",)),
    Layer(3, ("opd_dynamics.interventions", "opd_dynamics.effopd", "opd_dynamics.record"), independent=True),
    Layer(4, ("opd_dynamics.extrapolate", "opd_dynamics.plotting"), independent=True),
    Layer(5, ("opd_dynamics.lab",)),
    Layer(6, ("opd_dynamics.cli", "opd_dynamics")),
)
ROOT_MODULE = "opd_dynamics"
#: imports the layers would allow but the design forbids (importer, imported; each a package or module and everything
#: under it): the recorder and the extrapolators decompose with `numerics.decomposition` and read rows with
#: `io.rows`, so they never depend on the analysis (docs/ARCHITECTURE.md lists these too)
FORBIDDEN: tuple[tuple[str, str], ...] = (
    ("opd_dynamics.record", "opd_dynamics.analysis"),
    ("opd_dynamics.extrapolate", "opd_dynamics.analysis"),
)


def _entry(module: str) -> tuple[str, Layer]:
    """The table entry (longest matching dotted prefix) a module belongs to, and its layer."""
    best: tuple[str, Layer] | None = None
    for layer in LAYERS:
        for member in layer.members:
            if (module == member or module.startswith(member + ".")) and (best is None or len(member) > len(best[0])):
                best = (member, layer)
    if best is None:
        raise AssertionError(f"{module} is not under {ROOT_MODULE}")
    return best


# --------------------------------------------------------------------------------------------- the module tree


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


FILES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a submodule when `from package import submodule`)
    path: Path
    line: int
    at_import_time: bool  # executed when the importing module is imported (not in a function or TYPE_CHECKING)
    top: str  # the top-level name imported ("click", "opd_dynamics", "torch" ...)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def add(target: str, node: ast.stmt, at_import_time: bool) -> None:
        found.append(Import(module, target, path, node.lineno, at_import_time, target.split(".")[0]))

    def visit(node: ast.AST, at_import_time: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, at_import_time)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, is_package, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in FILES else base, node, at_import_time)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            at_import_time = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, at_import_time)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, at_import_time)

    visit(tree, True)
    return found


IMPORTS: list[Import] = [imp for module, path in FILES.items() for imp in _imports(module, path)]
PACKAGE_IMPORTS = [imp for imp in IMPORTS if imp.top == ROOT_MODULE]


def _where(imp: Import) -> str:
    return f"{imp.path.relative_to(ROOT)}:{imp.line}"


# ------------------------------------------------------------------------------------------------------ tests


def test_the_walk_sees_the_package():
    assert "opd_dynamics.io.reader" in FILES and "opd_dynamics.analysis.metrics" in FILES
    assert any(imp.target == "opd_dynamics.io.reader" for imp in PACKAGE_IMPORTS)
    assert any(not imp.at_import_time for imp in PACKAGE_IMPORTS), "function-local imports are walked too"


def test_relative_imports_resolve():
    def resolve(module: str, is_package: bool, stmt: str) -> str:
        return _resolve_from(module, is_package, ast.parse(stmt).body[0])

    assert resolve("opd_dynamics.io.lora", False, "from . import reader") == "opd_dynamics.io"
    assert resolve("opd_dynamics.io.lora", False, "from ..numerics import fro2") == "opd_dynamics.numerics"
    assert resolve("opd_dynamics.io", True, "from .reader import open_model") == "opd_dynamics.io.reader"
    assert resolve("opd_dynamics.io", True, "from opd_dynamics import errors") == "opd_dynamics"


def test_every_module_is_in_a_named_layer():
    """A new module directly under opd_dynamics/ gets a row in the table (and in docs/ARCHITECTURE.md)."""
    unplaced = [str(path.relative_to(ROOT)) for module, path in FILES.items()
                if module != ROOT_MODULE and _entry(module)[0] == ROOT_MODULE]
    assert not unplaced, f"modules in no layer of tests/test_layers.py (add them to LAYERS and the doc): {unplaced}"


def test_no_import_runs_up_or_across():
    problems = []
    for imp in PACKAGE_IMPORTS:
        src_entry, src = _entry(imp.source)
        dst_entry, dst = _entry(imp.target)
        if dst.number > src.number:
            problems.append(f"{_where(imp)}: {imp.source} (layer {src.number}) imports {imp.target} "
                            f"(layer {dst.number}, above it)")
        elif dst.number == src.number and src.independent and src_entry != dst_entry:
            problems.append(f"{_where(imp)}: {imp.source} (layer {src.number}) imports {imp.target} "
                            f"(layer {dst.number}, a sibling it must not import)")
    assert not problems, "imports against the layers of docs/ARCHITECTURE.md:\n" + "\n".join(problems)


def _under(module: str, member: str) -> bool:
    return module == member or module.startswith(member + ".")


def forbidden_imports(imports: list[Import]) -> list[str]:
    return [f"{_where(imp)}: {imp.source} imports {imp.target} ({src} must not depend on {dst})"
            for imp in imports for src, dst in FORBIDDEN if _under(imp.source, src) and _under(imp.target, dst)]


def test_forbidden_imports_are_found():
    bad = Import("opd_dynamics.record.steps", "opd_dynamics.analysis.metrics.trajectory", PACKAGE / "record/steps.py",
                 1, False, ROOT_MODULE)
    fine = Import("opd_dynamics.record.steps", "opd_dynamics.numerics", PACKAGE / "record/steps.py", 1, True,
                  ROOT_MODULE)
    assert len(forbidden_imports([bad, fine])) == 1


def test_no_forbidden_imports():
    problems = forbidden_imports(PACKAGE_IMPORTS)
    assert not problems, "imports docs/ARCHITECTURE.md forbids:\n" + "\n".join(problems)


def test_architecture_doc_lists_the_forbidden_imports():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    for src, dst in FORBIDDEN:
        assert re.search(rf"`{re.escape(src)}`[^\n]*must not import[^\n]*`{re.escape(dst)}`", text), (
            f"docs/ARCHITECTURE.md does not say that `{src}` must not import `{dst}`")


CLI_PACKAGE = PACKAGE / "cli"


def test_click_only_in_cli_modules():
    offenders = sorted({_where(imp) for imp in IMPORTS if imp.top == "click" and imp.path.name != "cli.py"
                        and CLI_PACKAGE not in imp.path.parents})
    assert not offenders, f"click imported outside a cli.py and opd_dynamics/cli/: {offenders}"


def test_at_most_eight_top_level_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules directly in opd_dynamics/: {top}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge a depth-first search meets, each as [a, b, …, a]."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(node: str) -> None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour.get(nxt, BLACK) == GREY:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif colour.get(nxt) == WHITE:
                dfs(nxt)
        stack.pop()
        colour[node] = BLACK

    for node in sorted(graph):
        if colour[node] == WHITE:
            dfs(node)
    return cycles


def test_cycles_are_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    """Between modules, over every import: at import time, inside functions and under TYPE_CHECKING alike (a
    function-local import hides a cycle from the interpreter, not from the design)."""
    graph: dict[str, set[str]] = {module: set() for module in FILES}
    for imp in PACKAGE_IMPORTS:
        if imp.target in FILES and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


# ------------------------------------------------------------------------------------- docs/ARCHITECTURE.md


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _doc_layers() -> dict[int, tuple[set[str], bool]]:
    """The layer table of docs/ARCHITECTURE.md: the first table whose header starts with 'Layer'."""
    lines = ARCHITECTURE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and _cells(line)[0].lower() == "layer":
            header = [c.lower() for c in _cells(line)]
            modules_col = header.index("modules")
            siblings_col = next(k for k, c in enumerate(header) if "independent" in c)
            rows: dict[int, tuple[set[str], bool]] = {}
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = _cells(row)
                members = set(re.findall(r"`(opd_dynamics[\w.]*)`", cells[modules_col]))
                rows[int(cells[0])] = (members, cells[siblings_col].lower().startswith("yes"))
            return rows
    raise AssertionError(f"{ARCHITECTURE.relative_to(ROOT)} has no table whose header starts with 'Layer'")


def test_architecture_doc_lists_the_same_layers():
    doc = _doc_layers()
    rule = {layer.number: (set(layer.members), layer.independent) for layer in LAYERS}
    assert doc == rule, f"docs/ARCHITECTURE.md's layer table {doc} differs from tests/test_layers.py's {rule}"


def _modules_section() -> str:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    match = re.search(r"^## Modules\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert match, "docs/ARCHITECTURE.md has no '## Modules' section"
    return match.group(1)


@pytest.mark.parametrize("direction", ["every module is described", "every described module exists"])
def test_architecture_doc_describes_the_tree(direction):
    described = set(re.findall(r"`([\w/]+\.py)`", _modules_section()))
    tree = {str(p.relative_to(PACKAGE)) for p in FILES.values()}
    if direction == "every module is described":
        missing = sorted(tree - described)
        assert not missing, f"modules docs/ARCHITECTURE.md's '## Modules' does not describe: {missing}"
    else:
        stale = sorted(described - tree)
        assert not stale, f"docs/ARCHITECTURE.md's '## Modules' describes modules that do not exist: {stale}"


def test_architecture_doc_recipes_name_files_that_exist():
    """Every file a '## How to add' recipe names (repository-relative, or relative to opd_dynamics/) exists; a
    `<name>` placeholder stands for a file the recipe creates."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    match = re.search(r"^## How to add[^\n]*\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert match, "docs/ARCHITECTURE.md has no '## How to add' section"
    named = {p for p in re.findall(r"`([\w./<>-]+/[\w.<>-]*)`", match.group(1)) if "<" not in p}
    assert any(p.endswith(".py") for p in named), "the recipes name no files"
    missing = sorted(p for p in named if not (ROOT / p).exists() and not (PACKAGE / p).exists())
    assert not missing, f"docs/ARCHITECTURE.md's recipes name files that do not exist: {missing}"


def test_the_lab_package_exports_what_it_lazily_resolves():
    import opd_dynamics.lab as lab

    assert lab.__all__ == list(lab._WHERE)
    for name in lab.__all__:
        assert getattr(lab, name) is not None
