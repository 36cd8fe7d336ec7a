"""The shape of the code: the core knows no built-in plugin, plugins use
only the public API, and no module imports itself back.

These read the source (with :mod:`ast`), so they hold for code paths no
other test happens to run.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "gateway"
PLUGINS = ROOT / "plugins"
#: what the built-in providers are called, and how their credentials begin
BUILTIN_NAMES = ("gateway_plugins", "gwk_", "apikey", "api_key", "wechat")
#: the one place allowed to name a built-in provider's legacy storage: the
#: one-off copy of API keys from the table older versions kept them in
LEGACY = {CORE / "profiles" / "legacy.py",
          # a fake of WeChat's public API (for tests and the demo's sandbox): naming WeChat is its job
          CORE / "testing" / "wechat.py"}


def module_name(path: Path) -> str:
    if path.is_relative_to(PLUGINS):
        return "gateway_plugins." + path.relative_to(PLUGINS).with_suffix("").as_posix().replace("/", ".")
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any level (functions and
    ``TYPE_CHECKING`` blocks included), resolved to full names."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def project_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in sources(CORE, PLUGINS)}
    return {name: {m for m in imports(path) if m in files and m != name} for name, path in files.items()}


def code_words(path: Path) -> list[tuple[int, str]]:
    """Identifiers and string constants of ``path`` that are not docstrings."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append((node.lineno, node.name))
        elif isinstance(node, ast.alias):
            out.append((node.lineno, node.name))
    return out


@pytest.mark.parametrize("path", [p for p in sources(CORE) if p not in LEGACY], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_names_no_builtin_provider(path):
    """Nothing outside plugins/ imports a built-in plugin or names one (its
    provider, or its credential prefix): a built-in is registered and used
    exactly as a third-party plugin is."""
    assert not any(m.startswith("gateway_plugins") for m in imports(path))
    text = path.read_text().replace('"apiKey"', "").lower()  # OpenAPI's security scheme type, not the plugin
    named = sorted({w for w in BUILTIN_NAMES if w in text})
    assert not named, f"{path.relative_to(ROOT)} names {named}"


def test_the_launcher_and_config_samples_name_no_builtin_plugin_module():
    for path in [ROOT / "bin" / "gateway"]:
        assert "gateway_plugins" not in path.read_text() and "gwk_" not in path.read_text()


@pytest.mark.parametrize("path", sources(PLUGINS) + [ROOT / "tests" / "plugins" / "gateway_example_provider"
                                                      / "gateway_example_provider.py"],
                         ids=lambda p: p.name)
def test_plugins_use_only_the_public_api(path):
    """A built-in (or the example third-party) provider imports from the
    gateway only ``gateway`` (for ``hookimpl``) and ``gateway.api``."""
    used = {m for m in imports(path) if m == "gateway" or m.startswith("gateway.")}
    allowed = {"gateway", "gateway.api", "gateway.hookimpl"} | {m for m in used if m.startswith("gateway.api.")}
    assert used <= allowed, f"{path.name} imports {sorted(used - allowed)}"


def test_every_name_plugins_import_from_the_api_is_exported():
    import gateway.api

    for path in sources(PLUGINS):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "gateway.api":
                for alias in node.names:
                    assert alias.name in gateway.api.__all__, f"{path.name}: {alias.name} is not in gateway.api.__all__"


def test_the_public_api_is_a_leaf():
    """gateway.api imports only the standard library, Tornado and the two
    other public leaves, which import nothing of the gateway."""
    for name, allowed in (("api", {"gateway.errors", "gateway.options"}), ("errors", set()), ("options", set())):
        path = CORE / f"{name}.py"
        ours = {m for m in imports(path) if m == "gateway" or m.startswith("gateway.")}
        ours = {m for m in ours if not any(m.startswith(a + ".") for a in allowed)}
        assert ours <= allowed, f"gateway/{name}.py imports {sorted(ours - allowed)}"
        third_party = {m.split(".")[0] for m in imports(path)} - {"gateway", "tornado", "__future__"}
        assert all(m in sys.stdlib_module_names for m in third_party), f"gateway/{name}.py imports {third_party}"


def test_no_type_checking_import_of_the_app():
    for path in sources(CORE, PLUGINS):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                names = {m for stmt in node.body for m in imports_of(stmt)}
                assert "gateway.app" not in names, f"{path.relative_to(ROOT)} imports gateway.app for types only"


def imports_of(stmt: ast.stmt) -> set[str]:
    if isinstance(stmt, ast.Import):
        return {a.name for a in stmt.names}
    if isinstance(stmt, ast.ImportFrom):
        return {stmt.module or ""}
    return set()


def test_no_import_cycle_at_any_level():
    """Counting every import (inside functions and TYPE_CHECKING blocks
    too), no module of gateway/ or plugins/ reaches itself again."""
    graph = project_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"
