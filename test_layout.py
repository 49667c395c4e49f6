"""The layout a reader relies on: the README names every file, and the files import one another one way
(no cycles), so each can be read knowing only the ones it imports.

    python -m pytest -q test_layout.py
"""
import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
MODULES = sorted(p.stem for p in REPO.glob("*.py") if not p.stem.startswith("test_") and p.stem != "conftest")


def first_party_imports(name):
    tree = ast.parse((REPO / f"{name}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):  # function-level imports count too: a cycle through one is still a cycle
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {name}


def test_the_readme_names_every_file():
    table = (REPO / "README.md").read_text(encoding="utf-8").split("## Quick start")[0]
    assert [m for m in MODULES if f"`{m}.py`" not in table] == []


def test_the_files_import_one_another_one_way():
    graph = {m: first_party_imports(m) for m in MODULES}
    done, path = set(), []

    def visit(m):
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in MODULES:
        visit(m)
    assert graph["teamlora"] == set()  # the layer is copied alone into other projects


def test_the_readmes_import_list_is_each_files_own_imports():
    """The README's "Imports flow one way" line lists, for every file, exactly the files it imports."""
    line = next(l for l in (REPO / "README.md").read_text(encoding="utf-8").splitlines()
                if l.startswith("Imports flow one way"))
    listed = {}
    for clause in line.split("checks this list): ", 1)[1].rstrip(".").split("; "):
        left, right = clause.split(" -> ")
        names = set(re.findall(r"`(\w+)`", right))
        for m in re.findall(r"`(\w+)`", left):
            assert m not in listed, f"{m} is listed twice"
            listed[m] = (set(MODULES) - names - {m}) if right.startswith("every other file but") else names
    assert listed == {m: first_party_imports(m) for m in MODULES}


def test_the_layer_is_under_200_lines_and_it_and_model_py_need_only_torch():
    """The README: "the layer in under 200 lines"; teamlora.py and model.py (for keep_last_omega) can be copied
    into a project that has torch and nothing else of ours (model.py's safetensors import is inside a function)."""
    assert len((REPO / "teamlora.py").read_text(encoding="utf-8").splitlines()) < 200
    for name in ("teamlora", "model"):
        tree = ast.parse((REPO / f"{name}.py").read_text(encoding="utf-8"))
        top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names} | \
              {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
        assert top - set(sys.stdlib_module_names) == {"torch"}, name
