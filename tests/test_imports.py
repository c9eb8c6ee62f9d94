"""Every import the package, its tools and its tests make is installed by `pip install .[test]` and declared.

A module that imports a package nobody declared works on a machine that happens to have it and fails for a user
(scipy did, in the lab's TurboQuant): the scan below reads every import statement, function-level ones included,
and checks each third-party name against the distributions pyproject.toml declares (and what an extra of theirs
that we ask for brings).
"""
from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# modules of our own that tests and tools import by file name (tests/, tools/ are put on sys.path)
LOCAL = {p.stem for d in ("tests", "tools") for p in (ROOT / d).glob("*.py")}
LOCAL |= {"qaq_gguf", "cachetypes", "quants"}  # scoring.py's fallback imports when run as a script


def _imports(files: list[Path]) -> dict[str, set[str]]:
    """top-level module name -> files importing it (absolute imports only, at any depth in the file)."""
    out: dict[str, set[str]] = {}
    for f in files:
        for n in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                names = [n.module]
            for name in names:
                out.setdefault(name.split(".")[0], set()).add(str(f.relative_to(ROOT)))
    return out


def _name(req: str) -> tuple[str, set[str], str]:
    """(normalized distribution name, extras, marker) of a requirement string."""
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?[^;]*(?:;(.*))?$", req)
    assert m, req
    extras = {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}
    return re.sub(r"[-_.]+", "-", m.group(1)).lower(), extras, (m.group(3) or "")


def _closure(reqs: list[str]) -> set[str]:
    """The declared distributions, and what they bring through an extra we ask for (llama-cpp-python[server] brings
    fastapi): a package used directly is declared directly, not left to another package's requirements."""
    allowed: set[str] = set()
    for r in reqs:
        dist, extras, _ = _name(r)
        allowed.add(dist)
        if not extras:
            continue
        try:
            requires = md.requires(dist) or []
        except md.PackageNotFoundError:
            continue  # reported by test_declared_distributions_are_installed
        for sub in requires:
            name, _, marker = _name(sub)
            if set(re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)) & extras:
                allowed.add(name)
    return allowed


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _providers() -> dict[str, set[str]]:
    """top-level import name -> normalized distributions installing it."""
    out: dict[str, set[str]] = {}
    for mod, dists in md.packages_distributions().items():
        out[mod] = {re.sub(r"[-_.]+", "-", d).lower() for d in dists}
    return out


def _undeclared(files: list[Path], reqs: list[str]) -> list[str]:
    allowed = _closure(reqs)
    providers = _providers()
    bad = []
    for mod, where in sorted(_imports(files).items()):
        if mod in sys.stdlib_module_names or mod in LOCAL:
            continue
        dists = providers.get(mod)
        if not dists:
            bad.append(f"{mod} (imported by {', '.join(sorted(where))}): not installed")
        elif not dists & allowed:
            bad.append(f"{mod} (imported by {', '.join(sorted(where))}): from {', '.join(sorted(dists))}, "
                       "which pyproject.toml does not declare")
    return bad


def test_declared_distributions_are_installed():
    p = _project()
    reqs = p["dependencies"] + p["optional-dependencies"]["test"]
    missing = []
    for r in reqs:
        try:
            md.version(_name(r)[0])
        except md.PackageNotFoundError:
            missing.append(r)
    assert not missing, f"declared but not installed: {missing}"


def test_package_imports_are_declared():
    """qaq_gguf's imports come from its dependencies or one of its extras (a feature that needs an extra says so)."""
    p = _project()
    reqs = p["dependencies"] + [r for extra in p["optional-dependencies"].values() for r in extra]
    bad = _undeclared(sorted((ROOT / "qaq_gguf").rglob("*.py")), reqs)
    assert not bad, "undeclared imports:\n" + "\n".join(bad)


def test_tool_and_test_imports_are_declared():
    """tools/ and tests/ run in the environment `pip install .[test]` makes."""
    p = _project()
    reqs = p["dependencies"] + p["optional-dependencies"]["test"]
    files = sorted((ROOT / "tools").glob("*.py")) + sorted((ROOT / "tests").glob("*.py"))
    bad = _undeclared(files, reqs)
    assert not bad, "undeclared imports:\n" + "\n".join(bad)


def test_undeclared_import_is_caught(tmp_path):
    """The scan itself: a module importing a distribution outside the declared set is reported."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import numpy\n    import pytest\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        bad = _undeclared([f], ["numpy"])
    finally:
        ROOT = saved
    assert len(bad) == 1 and bad[0].startswith("pytest ")


def _all_modules() -> list[str]:
    import qaq_gguf

    return sorted(m.name for m in pkgutil.walk_packages(qaq_gguf.__path__, "qaq_gguf."))


@pytest.mark.parametrize("name", _all_modules())
def test_module_imports(name):
    importlib.import_module(name)


def test_every_lab_method_makes_its_defaults():
    from qaq_gguf import methods

    for name in methods.REGISTRY:
        mod = importlib.import_module(f"qaq_gguf.methods.{name}")
        for setting in getattr(mod, "DEFAULTS", ()):
            assert mod.make(setting) is not None, (name, setting)


# --- the package's own import graph: no cycles, each module imports alone, no function over 80 lines -------------

PKG = ROOT / "qaq_gguf"
MAX_FUNCTION_LINES = 80


def _module_files() -> dict[str, Path]:
    """qaq_gguf's modules (dotted name -> file), packages as their __init__.py."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, relative imports resolved and function-level ones included. For
    `from X import name`, the edge goes to X.name when that is a module, else to X."""
    files = _module_files()
    graph: dict[str, set[str]] = {}
    for mod, f in files.items():
        package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        edges = graph.setdefault(mod, set())
        for n in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    up = package.split(".")
                    up = up[:len(up) - (n.level - 1)]
                    base = ".".join(up + ([n.module] if n.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in n.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_import_graph_has_no_cycle():
    graph = _import_graph()
    assert "qaq_gguf.llama" in graph["qaq_gguf.profile"] and "qaq_gguf.llama" in graph["qaq_gguf.runtime"]
    cycles = _cycles(graph)
    assert not cycles, "modules that import each other (directly or around a circle): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_cycle_is_caught():
    """The check itself: a circle through three modules, and one through a function-level import, are found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(_module_files()))
def test_module_imports_alone(name):
    """Each module imports in a fresh interpreter, first of the package's modules (no import order hides a circle
    or a missing import)."""
    r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"import {name} failed:\n{r.stderr[-3000:]}"


def _function_lengths() -> list[tuple[int, str]]:
    out = []
    for f in sorted(PKG.rglob("*.py")):
        for n in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((n.end_lineno - n.lineno + 1, f"{f.relative_to(ROOT)}:{n.lineno} {n.name}"))
    return sorted(out, reverse=True)


def test_no_function_over_80_lines():
    """Every function of the package (methods/ and nested functions included) fits in 80 lines: a longer one is
    several steps that want names."""
    long = [f"{where} ({n} lines)" for n, where in _function_lengths() if n > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
