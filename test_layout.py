"""The layout a reader relies on: the README names every file, and the files import one another one way
(no cycles), so each can be read knowing only the ones it imports.

    python -m pytest -q test_layout.py
"""
import ast
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
