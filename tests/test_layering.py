"""The package's layers point down, and no module imports itself back in a circle.

Low to high (a module may import its own layer and any layer below it, never one above):
    kernels (fastnlg.kernels: the Triton sources of kernels/)
    backend, _checks, _native, _C, _C_cuda (the backend choice, argument checks, native-dtype helpers)
    quant (the NF4 format)
    ops
    losses (the preference / RL losses on log-probabilities)
    nn
    patching
    loading
    train
    demo, cli, aot, benchmarks (the commands) and fastnlg itself (the package's __init__: the public facade)
Every import counts, those inside functions too (a lazy import is still an arrow). The test reads the
sources with ast; it imports nothing.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = [
    ("fastnlg.kernels",),
    ("fastnlg.backend", "fastnlg._checks", "fastnlg._native", "fastnlg._quiet", "fastnlg._C", "fastnlg._C_cuda"),
    ("fastnlg.quant",),
    ("fastnlg.ops",),
    ("fastnlg.losses",),
    ("fastnlg.nn",),
    ("fastnlg.patching",),
    ("fastnlg.loading",),
    ("fastnlg.train",),
    ("fastnlg.demo", "fastnlg.demo_ner", "fastnlg.demo_t5", "fastnlg.ner_data", "fastnlg.cli", "fastnlg.aot", "fastnlg.benchmarks"),
]
EXTENSIONS = ("fastnlg._C", "fastnlg._C_cuda")  # built from csrc/, no Python source


def _modules() -> dict:
    """{module name: source path} for fastnlg/ and kernels/ (as fastnlg.kernels)."""
    found = {}
    for folder, prefix in (("fastnlg", "fastnlg"), ("kernels", "fastnlg.kernels")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))[:-3]
                    parts = [p for p in rel.split(os.sep) if p != "__init__"]
                    found[".".join([prefix, *parts])] = os.path.join(dirpath, f)
    return found


def _imports(name: str, path: str, modules: dict) -> list:
    """[(line, imported module)] of one source file; `from pkg import sub` counts as an import of pkg.sub."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if sub in modules or sub in EXTENSIONS else target))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, t) for line, t in out if t == "fastnlg" or t.startswith("fastnlg.")]


def _layer(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in layer):
            return i
    if name == "fastnlg":
        return len(LAYERS) - 1
    raise AssertionError(f"{name}: in no layer of tests/test_layering.py; add it to LAYERS")


def _graph():
    modules = _modules()
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_import_points_down_or_sideways():
    modules, graph = _graph()
    up = [f"{modules[m]}:{line}: {m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
          for m, edges in graph.items() for line, t in edges if _layer(t) > _layer(m)]
    assert not up, "imports from a lower layer to a higher one:\n" + "\n".join(up)


def _cycles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for _, w in graph.get(v, ()):
            if w not in graph:
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
            if len(comp) > 1 or any(t == v for _, t in graph[v]):
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _package_edges(graph: dict) -> dict:
    """The graph without the arrows from a package's __init__ into its own submodules (a package re-exporting
    its parts is not a circle)."""
    return {m: [(line, t) for line, t in edges if not t.startswith(m + ".")] for m, edges in graph.items()}


def test_no_import_circle():
    _, graph = _graph()
    circles = _cycles(_package_edges(graph))
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_checker_sees_an_upward_import_and_a_circle():
    """The checks can fail: a fake upward import and a fake circle are found."""
    assert _layer("fastnlg.kernels.nf4") < _layer("fastnlg.quant.nf4")
    assert _cycles({"a": [(1, "b")], "b": [(1, "a")]}) == [["a", "b"]]
    assert _cycles({"a": [(1, "b")], "b": []}) == []


def test_kernel_sources_import_only_kernels():
    """A kernel file holds kernels and their launch helpers (DESIGN §2): it imports nothing else of fastnlg."""
    modules, graph = _graph()
    bad = [f"{modules[m]}:{line}: imports {t}" for m, edges in graph.items() if m.startswith("fastnlg.kernels")
           for line, t in edges if not t.startswith("fastnlg.kernels")]
    assert not bad, "\n".join(bad)
