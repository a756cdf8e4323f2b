"""The layout the README's map promises, read off the source: the imports between the
repository's files form no circle, the readable path imports no machinery, no test
imports bench.py, and the files stay the size a reader can take in."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN = {path.stem for path in ROOT.glob("*.py")}
# The paper's files, and the networks they stand on: none of them may reach the machinery.
READABLE = {"lipar", "model", "vae", "tiny_vae"}
NETWORKS = {"model", "vae", "tiny_vae", "text_encoder"}


def imports(path):
    """The repository's modules that `path` imports, anywhere in the file (a lazy import
    inside a function closes a circle as surely as one at the top)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OWN


def graph():
    return {path.stem: imports(path) for path in ROOT.glob("*.py")}


def cycle(edges):
    """One import circle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_imports_form_no_circle():
    assert cycle(graph()) is None, " -> ".join(cycle(graph()))


def test_the_readable_path_and_the_networks_import_no_machinery():
    edges = graph()
    for name in READABLE:
        assert edges[name] <= READABLE, (name, edges[name] - READABLE)
    for name in NETWORKS:  # the networks know nothing of files, flags or streams
        assert edges[name] <= NETWORKS, (name, edges[name] - NETWORKS)


def test_no_test_imports_the_bench():
    for path in [ROOT / "test_lipar.py", *(ROOT / "tests").glob("*.py")]:
        assert "bench" not in imports(path), path.name


def test_files_stay_readable_in_size():
    lines = {path.name: len(path.read_text().splitlines()) for path in ROOT.glob("*.py")}
    assert lines["sample.py"] <= 400 and lines["model.py"] <= 700, lines
    assert all(n <= 600 for name, n in lines.items() if name != "bench.py"), lines


def module_attributes(path):
    """(line, module, attribute) for every `alias.attr` in `path` whose alias names one of
    the repository's modules (`import model as M`, `import graphs`)."""
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in OWN:
                    aliases[alias.asname or alias.name] = alias.name
    # a name the file also binds to something else (a local `video = ...`) is not the module there
    bound = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    bound |= {node.arg for node in ast.walk(tree) if isinstance(node, ast.arg)}
    aliases = {name: module for name, module in aliases.items() if name not in bound}
    return [(node.lineno, aliases[node.value.id], node.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases]


def test_module_attributes_finds_what_a_file_names():
    names = {(module, attr) for _, module, attr in module_attributes(ROOT / "sample.py")}
    assert {("model", "KVCache"), ("graphs", "warm_up"), ("lipar", "recovery_plan")} <= names


def test_every_function_a_file_calls_on_another_exists():
    """Lines that run only on CUDA (sample.edit_video's warm-up, the graph runner's
    replays) are never executed by this CPU suite; a name renamed in one file and not in
    another would fail only on a GPU. Checked here by name, for every file and test, by
    importing the module named; bench.py is only read, never imported (no test imports
    it, and no other file names its attributes)."""
    import importlib
    missing = []
    for path in [*ROOT.glob("*.py"), *(ROOT / "tests").glob("*.py")]:
        for line, module, attr in module_attributes(path):
            if module != "bench" and not hasattr(importlib.import_module(module), attr):
                missing.append(f"{path.name}:{line}: {module}.{attr}")
    assert not missing, missing
