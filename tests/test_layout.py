"""The package's layering (docs/architecture.md), enforced on the source.

Every module of td_kernels belongs to one layer of LAYERS; ALLOWED says which layers a layer may
import. Imports are read from the syntax tree, those inside functions included (a lazy import is
still a dependency), relative ones resolved. On top of that, the modules' import graph has no
cycle, and ``import td_kernels`` loads the library only: none of the programs behind
``td-kernels`` and none of the trainer integrations.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "td_kernels"

# layer -> module prefixes: a prefix names the module and everything below it, except
# "td_kernels", which names the package's own __init__ only
LAYERS = {
    "base": ("td_kernels.reference", "td_kernels._registry", "td_kernels._measured", "td_kernels._params",
             "td_kernels._C"),
    "backends": ("td_kernels.backends",),
    "core": ("td_kernels.ops", "td_kernels.distributed", "td_kernels.api"),
    "training": ("td_kernels.training",),
    "sparsity": ("td_kernels.sparsity",),
    "analysis": ("td_kernels.analysis",),
    "package": ("td_kernels",),
    "integrations": ("td_kernels.integrations",),
    "tools": ("td_kernels.tools", "td_kernels.__main__"),
}
_LIBRARY = {"base", "core", "training", "sparsity", "analysis"}
ALLOWED = {
    "base": {"base"},
    "backends": {"base", "backends"},           # the kernels know the spec and the registry, no op
    "core": {"base", "core"},                   # ops reach kernels through the registry only
    "training": {"base", "core", "training"},
    "sparsity": {"base", "core", "training", "sparsity"},
    "analysis": _LIBRARY,
    "package": _LIBRARY | {"backends", "package"},
    "integrations": _LIBRARY | {"package", "integrations"},
    "tools": _LIBRARY | {"package", "backends", "tools"},
}
PROGRAMS = ("td_kernels.tools", "td_kernels.integrations", "td_kernels.__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict:
    """{module name: path} of every Python module in the package."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str | None:
    best = None  # the longest matching prefix wins: td_kernels.tools.cli is a tool, not "package"
    for layer, prefixes in LAYERS.items():
        for p in prefixes:
            below = module.startswith(p + ".") and p != "td_kernels"
            if (module == p or below) and (best is None or len(p) > len(best[1])):
                best = (layer, p)
    return best and best[0]


def imports(module: str, path: Path, known: dict) -> set:
    """The td_kernels modules ``module`` imports, anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:  # "from pkg import submodule" depends on the submodule
                sub = f"{target}.{a.name}"
                found.add(sub if sub in known or sub == "td_kernels._C" else target)
    return {m for m in found if m == "td_kernels" or m.startswith("td_kernels.")} - {module}


def graph() -> dict:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def cycles(g: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
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


def test_every_module_has_a_layer():
    assert not [m for m in modules() if layer_of(m) is None], "add new modules to LAYERS (and docs/architecture.md)"


def test_layers_import_only_what_they_may():
    bad = []
    for m, deps in graph().items():
        for d in deps:
            if layer_of(d) not in ALLOWED[layer_of(m)]:
                bad.append(f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_checker_sees_lazy_imports_and_cycles():
    """The checks above could pass by seeing nothing: they must see a function-level import and
    a cycle through one."""
    assert "td_kernels.distributed" in graph()["td_kernels.api"]  # api imports it inside _sharded
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("td_kernels.tools.cli") == "tools" and layer_of("td_kernels") == "package"
    assert layer_of("td_kernels.backends.triton.weight_dropout") == "backends"
    assert layer_of("td_kernels.somewhere_new") is None


def test_import_td_kernels_loads_no_program():
    code = ("import sys, td_kernels\n"
            f"print(sorted(m for m in sys.modules if m.startswith({PROGRAMS!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("argv", [["-m", "td_kernels", "--help"], ["-m", "td_kernels.tools.cli", "--help"]])
def test_the_command_still_starts(argv):
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "bench" in out.stdout, out.stderr
