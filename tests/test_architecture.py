"""The layout's rules (docs/architecture.md): every import arrow points down, the parts stay apart."""

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

from conftest import REPO

PACKAGES = ("emerdiff", "ovseg")


def modules() -> Dict[str, Path]:
    """Dotted name -> file of every module of the packages and every tool (tools/NAME.py as tools.NAME)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((REPO / "tools").glob("*.py")):
        found[f"tools.{path.stem}"] = path
    return found


def imported(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The project modules `name` imports (relative imports resolved; lazy imports inside functions count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            elif name.startswith("tools.") and base in {p.stem for p in (REPO / "tools").glob("*.py")}:
                base = f"tools.{base}"  # tools/ is on the path of `python tools/NAME.py`: bare names are tools
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
            candidates = submodules or [base]  # `from pkg import module` is an arrow to the module alone
        elif isinstance(node, ast.Import):
            candidates = [f"tools.{alias.name}" if name.startswith("tools.") and f"tools.{alias.name}" in known
                          else alias.name for alias in node.names]
        else:
            continue
        out |= {c for c in candidates if c in known}
    return out - {name}


def graph() -> Dict[str, Set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def cycle(edges: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as a list of modules, or [] when the graph has none."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back_through_others():
    assert cycle(graph()) == []


APPLICATION = ("emerdiff.cli", "emerdiff.app")  # the commands and what they serve (the demo): above ovseg


def is_core(name: str) -> bool:
    """The segmentor and everything it is made of: emerdiff less its application layer (commands, demo)."""
    return name.startswith("emerdiff") and not name.startswith(APPLICATION)


def test_the_core_never_imports_ovseg_the_application_layer_or_the_tools():
    for name, deps in graph().items():
        if is_core(name):
            assert not [d for d in deps if d.startswith(("ovseg", *APPLICATION, "tools"))], name


def test_ovseg_never_imports_the_application_layer():
    for name, deps in graph().items():
        if name.startswith("ovseg"):
            assert not [d for d in deps if d.startswith((*APPLICATION, "tools"))], name


def test_the_applications_never_import_a_command():
    for name, deps in graph().items():
        if name.startswith("emerdiff.app"):
            assert not [d for d in deps if d.startswith(("emerdiff.cli", "tools"))], name


def is_shared_plumbing(name: str) -> bool:
    """emerdiff/cli/common/: the commands' shared plumbing, no entry point of its own."""
    return name.startswith("emerdiff.cli.common")


def test_no_command_imports_another_command():
    """Commands import the shared plumbing (emerdiff/cli/common/) and the applications, never other commands."""
    for name, deps in graph().items():
        if name.startswith("emerdiff.cli.") and not is_shared_plumbing(name):
            assert not [d for d in deps if d.startswith("emerdiff.cli") and not is_shared_plumbing(d)], name


def test_every_tool_is_a_shim_over_its_command():
    """tools/NAME.py imports the checkout helper and emerdiff.cli.NAME, nothing else: the code lives in the package."""
    for name, deps in graph().items():
        if name.startswith("tools.") and name != "tools._checkout":
            command = f"emerdiff.cli.{name.removeprefix('tools.')}"
            assert deps == {"tools._checkout", command}, name


def private_methods() -> Set[str]:
    names = set()
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names |= {f.name for f in node.body if isinstance(f, ast.FunctionDef)
                          and f.name.startswith("_") and not f.name.startswith("__")}
    return names


def private_calls(path: Path, names: Set[str]) -> Iterator[Tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names:
            receiver = node.func.value
            if not (isinstance(receiver, ast.Name) and receiver.id in ("self", "cls")) \
                    and not (isinstance(receiver, ast.Call) and getattr(receiver.func, "id", "") == "super"):
                yield node.lineno, node.func.attr


@pytest.mark.parametrize("package", ["emerdiff", "ovseg", "tools"])
def test_no_private_method_is_called_from_outside_its_object(package):
    names = private_methods()
    found = [(str(p.relative_to(REPO)), line, attr) for p in modules().values() if p.relative_to(REPO).parts[0] == package
             for line, attr in private_calls(p, names)]
    assert found == []
