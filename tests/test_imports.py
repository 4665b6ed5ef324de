"""The house's imports go one way: no module of the project imports, directly or through others, a
module that imports it. Imports inside functions count (a late import hides a circle from the
interpreter at load time, not from a reader)."""

import ast
import os

from conftest import ROOT


def project_modules():
    """{name: [source files]}: the top-level modules, and each package (a folder with __init__.py) as one."""
    modules = {}
    for entry in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, entry)
        if entry.endswith(".py"):
            modules[entry[:-3]] = [path]
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            modules[entry] = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".py")]
    return modules


def imports_of(files, names):
    """The project modules that the files import anywhere in their bodies."""
    found = set()
    for path in files:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found & names


def find_cycle(graph):
    """A list of modules [a, b, ..., a] forming a circle, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle():
    modules = project_modules()
    assert {"train", "toy", "model", "sampler", "degrpo"} <= set(modules)
    graph = {name: imports_of(files, set(modules)) - {name} for name, files in modules.items()}
    assert "toy" in graph["train"]  # the demo's entry point is train.py, which calls toy's driver
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
