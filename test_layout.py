"""The layout a reader relies on: the README names every file, and the files import one another one way
(no cycles), so each can be read knowing only the ones it imports; the README's and RESULTS.md's links reach a
heading (a ratio or percentage given beside one stands in the section it reaches), and the commands they show use
flags, sections and run names that exist.

    python -m pytest -q test_layout.py
"""
import ast
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from conftest import readme_names, repository_files

REPO = Path(__file__).resolve().parent
MODULES = [p.stem for p in repository_files("*.py") if not p.stem.startswith("test_") and p.stem != "conftest"]


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


def test_a_users_own_files_beside_the_repositorys_are_not_taken_for_its_own(tmp_path):
    """The layout tests read the repository's files: a config of a user's own in the root or in config/, or a copy of
    train.py to try things in, failed six of them ("the README names every file", the recipes' lines). In a git
    checkout they are git's tracked files; with no .git, every file there, as before."""
    if shutil.which("git") is None:  # subprocess.run would raise FileNotFoundError, not skip
        pytest.skip("no git")
    (tmp_path / "config").mkdir()
    for name in ("train.py", "config/cme.py", "my_config.py", "my_train.py", "config/mine.py"):
        (tmp_path / name).write_text("x = 1\n")
    assert subprocess.run(["git", "init", "-q"], cwd=tmp_path).returncode == 0
    assert subprocess.run(["git", "add", "train.py", "config/cme.py"], cwd=tmp_path).returncode == 0
    assert repository_files("*.py", tmp_path) == [tmp_path / "train.py"]
    assert repository_files("config/*.py", tmp_path) == [tmp_path / "config" / "cme.py"]
    shutil.rmtree(tmp_path / ".git")
    assert repository_files("*.py", tmp_path) == [tmp_path / n for n in ("my_config.py", "my_train.py", "train.py")]
    assert repository_files("config/*.py", tmp_path) == [tmp_path / "config" / n for n in ("cme.py", "mine.py")]


def test_a_new_module_is_the_repositorys_before_it_is_added(tmp_path):
    """A module a developer adds, and runs the tests on before `git add`, is checked as CI checks it once committed:
    the untracked top-level modules that the tracked files or a new test file import, directly or through one
    another, are the repository's; a user's own script that imports them is not, nor what git ignores, nor the
    modules in a folder git does not track."""
    if shutil.which("git") is None:
        pytest.skip("no git")
    (tmp_path / "venv").mkdir()
    files = {"train.py": "import files\nimport scratch\n", "files.py": "def f():\n    from helper import x\n",
             "helper.py": "x = 1\n", "test_new.py": "import new\n", "new.py": "", "my_train.py": "import train\n",
             "scratch.py": "import mine\n", "mine.py": "", ".gitignore": "scratch.py\n", "venv/site.py": "import new\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert subprocess.run(["git", "init", "-q"], cwd=tmp_path).returncode == 0
    assert subprocess.run(["git", "add", "train.py", ".gitignore"], cwd=tmp_path).returncode == 0
    assert repository_files("*.py", tmp_path) == [tmp_path / n for n in
                                                  ("files.py", "helper.py", "new.py", "test_new.py", "train.py")]
    assert repository_files("*/*.py", tmp_path) == []


def test_a_new_script_or_recipe_is_the_repositorys_before_it_is_added_once_the_readme_names_it(tmp_path):
    """A stand-alone script (a new bench.py) or a recipe that nothing imports, not yet `git add`-ed, is checked before
    its commit once the README names it: a script in the file table (which CI demands of every module), a recipe
    anywhere (a brace list as the shell expands it); the modules such a script imports are the repository's too. A
    user's own script or recipe, which the README does not name, is not, nor a file it names outside its table (the
    authors' build_dataset.py, fetched beside ours)."""
    if shutil.which("git") is None:
        pytest.skip("no git")
    (tmp_path / "config").mkdir()
    readme = ("| `train.py` | the loop |\n| `profile.py` | a new script |\n\n## Quick start\n\nThe authors' "
              "`build_dataset.py`; the recipes `config/cme.py`, `config/cme_{a,b.1}.py` (`config/*.py`).\n")
    files = {"README.md": readme, "train.py": "", "profile.py": "import timer\n", "timer.py": "", "mine.py": "",
             "my_script.py": "import train\nimport mine\n", "build_dataset.py": "", "config/cme.py": "",
             "config/cme_a.py": "", "config/cme_b.1.py": "", "config/mine.py": ""}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert subprocess.run(["git", "init", "-q"], cwd=tmp_path).returncode == 0
    assert subprocess.run(["git", "add", "README.md", "train.py", "config/cme.py"], cwd=tmp_path).returncode == 0
    assert repository_files("*.py", tmp_path) == [tmp_path / n for n in ("profile.py", "timer.py", "train.py")]
    assert repository_files("config/*.py", tmp_path) == [tmp_path / "config" / n for n in
                                                         ("cme.py", "cme_a.py", "cme_b.1.py")]


def test_the_readme_names_every_place_the_tests_look_for_the_fixtures():
    """The README's "Tests skip without ..." names the places conftest looks for the fixtures, in its order: it named
    `../shared/fixtures` and TEAMLORA_FIXTURES, not the repository's own shared/fixtures, where conftest looks too."""
    import conftest
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    said = re.search(r"Tests skip without [^.]*? the fixtures \(the first of (.*?), from the repository's root, that "
                     r"holds `official/`\)", readme)
    assert said, "the README does not say where the tests look for the fixtures"
    assert tuple(re.findall(r"`([^`]+)`", said.group(1))) == conftest.FIXTURE_PLACES


def test_the_readme_names_every_file_that_is_not_python():
    """The recipes, the requirements, CI's script and the GPU checks are files a reader meets too."""
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: which files are the repository's is not known")
    table = (REPO / "README.md").read_text(encoding="utf-8").split("## Quick start")[0]
    named = {p if "/" not in p or p.startswith(".ci/") else p.split("/")[0] + "/" for p in listed.stdout.split()}
    others = {p for p in named if not p.endswith(".py") and p not in (".gitignore", "README.md", "RESULTS.md")}
    assert others and [p for p in sorted(others) if f"`{p}`" not in table] == []


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


def test_no_function_of_the_training_loop_calls_the_loop_again():
    """train.py's loop is run(), called by train() once the demo's data and base are built (build_demo, whose
    pretraining is a run() of its own, before the loop): nothing run() calls in train.py, however indirectly, calls
    run(), train() or build_demo() again."""
    tree = ast.parse((REPO / "train.py").read_text(encoding="utf-8"))
    calls = {f.name: {c.func.id for c in ast.walk(f) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
             for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert {"run", "train", "build_demo"} <= calls.keys() and "run" in calls["train"]
    reached, todo = set(), set(calls["run"])
    while todo:
        name = todo.pop()
        if name in calls and name not in reached:
            reached.add(name)
            todo |= calls[name]
    assert not reached & {"run", "train", "build_demo"}, sorted(reached & {"run", "train", "build_demo"})


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
    """The README: "the layer in under 200 lines"; teamlora.py, and model.py with the checkpoint readers it imports
    (weights.py), can be copied into a project that has torch and nothing else of ours (weights.py's safetensors
    import is inside a function)."""
    assert len((REPO / "teamlora.py").read_text(encoding="utf-8").splitlines()) < 200
    for name, ours in (("teamlora", set()), ("weights", set()), ("model", {"weights"})):
        tree = ast.parse((REPO / f"{name}.py").read_text(encoding="utf-8"))
        top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names} | \
              {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
        assert top - set(sys.stdlib_module_names) == {"torch"} | ours, name


DOCS = ("README.md", "RESULTS.md")


def headings(text):
    """[(anchor, level, line number)] of a Markdown file's headings, the anchors as GitHub gives them: lowercase,
    punctuation but hyphens and underscores dropped, spaces to hyphens, a repeated one suffixed -1, -2, ...; a line
    in a code block is no heading."""
    found, fenced = [], False
    for number, line in enumerate(text.splitlines()):
        fenced ^= line.startswith("```")
        heading = None if fenced else re.match(r"(#{1,6}) (.+)", line)
        if heading:
            found.append((re.sub(r"[^\w\- ]", "", heading.group(2).strip().lower()).replace(" ", "-"),
                          len(heading.group(1)), number))
    slugs = [s for s, _, _ in found]
    return [(s if not slugs[:i].count(s) else f"{s}-{slugs[:i].count(s)}", level, number)
            for i, (s, level, number) in enumerate(found)]


def heading_anchors(text):
    return {anchor for anchor, _, _ in headings(text)}


def section(text, anchor):
    """The text under the heading `anchor` (its subsections included), up to the next heading of its level or above."""
    lines, found = text.splitlines(), headings(text)
    i = next(i for i, (a, _, _) in enumerate(found) if a == anchor)
    end = next((n for _, level, n in found[i + 1:] if level <= found[i][1]), len(lines))
    return "\n".join(lines[found[i][2]:end])


def test_every_link_between_the_readme_and_results_reaches_a_heading():
    """A heading renamed in RESULTS.md leaves the README's links to it pointing nowhere (GitHub shows the top)."""
    anchors = {name: heading_anchors((REPO / name).read_text(encoding="utf-8")) for name in DOCS}
    dangling = []
    for name in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", (REPO / name).read_text(encoding="utf-8")):
            path, _, anchor = target.partition("#")
            if "://" in target or not (path or anchor):
                continue
            path = path or name
            if not (REPO / path).exists() or anchor and anchor not in anchors.get(path, ()):
                dangling.append(f"{name}: ({target})")
    assert dangling == []


FIGURE = r"(?<![\w.])\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?[x%](?!\w)"  # 0.73x, 0.47-0.63x, 5%, 6-18%


def test_each_figure_given_beside_a_link_is_in_the_section_it_links_to():
    """A ratio or percentage the README or RESULTS.md gives in the words before a link into the other file (from the
    sentence's start or the link before) stands in the section linked: "1.37x faster on one H200, CPU steps 6-18%
    ([measured](RESULTS.md#efficiency-python-benchpy))" sent the reader to a section without the 1.37x (the H200's
    step time is in "GPU measurements", as 0.73x eager's)."""
    texts = {name: (REPO / name).read_text(encoding="utf-8") for name in DOCS}
    missing = []
    for name, text in texts.items():
        prose, done = " ".join(re.sub(r"^```[^\n]*\n.*?^```", ". ", text, flags=re.M | re.S).split()), 0  # no code
        for link in re.finditer(r"\[([^\]]*)\]\(((README|RESULTS)\.md)#([^)\s]+)\)", prose):
            before = prose[done:link.start()]
            words, done = before[before.rfind(". ") + 1:], link.end()
            if link.group(2) == name:
                continue
            linked = " ".join(section(texts[link.group(2)], link.group(4)).split())
            missing += [f"{name}: {f} before ({link.group(2)}#{link.group(4)})" for f in re.findall(FIGURE, words)
                        if f not in linked]
    assert missing == []


def test_each_figure_a_file_gives_beside_results_md_is_in_it():
    """The same for the product's own lines that send a reader to RESULTS.md: a ratio or percentage on such a line
    stands in RESULTS.md. config/cme_llama2_7b.py said "True: 1.37x faster steps on one H200 at this shape
    (RESULTS.md)", a figure RESULTS.md never gives (it gives 0.73x the eager step time)."""
    results = " ".join((REPO / "RESULTS.md").read_text(encoding="utf-8").split())
    missing = []
    for path in PRODUCT_FILES + ["gpu_check.sh"]:
        for number, line in enumerate((REPO / path).read_text(encoding="utf-8").splitlines(), 1):
            if "RESULTS.md" in line:
                missing += [f"{path}:{number}: {f}" for f in re.findall(FIGURE, line) if f not in results]
    assert missing == []


FILE_ENDINGS = ("py", "pt", "json", "jsonl", "model", "sh", "md", "txt")  # `model.pt` names a file, not a name


def defined_names(module):
    """The names module.py defines at its top level (functions, classes, assignments), and its classes' methods as
    Class.method, read without importing it."""
    names = set()
    for node in ast.parse((REPO / f"{module}.py").read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_every_name_the_readme_and_results_give_is_defined_where_they_say():
    """A function or class renamed or moved leaves the docs naming nothing: each name the README's table of files
    gives beside a file (`inject`, `write_atomic`) is defined in that row's files, a `Class.method` (the table's
    `Transformer.from_pretrained`) in one of ours, and each `module.name` of the README and RESULTS.md in module.py."""
    defined = {m: defined_names(m) for m in MODULES}
    everywhere = set().union(*defined.values())
    wrong = []
    for row in (REPO / "README.md").read_text(encoding="utf-8").split("## Quick start")[0].splitlines():
        cells = re.match(r"\| (.+?) \| (.*) \|$", row)
        row_files = re.findall(r"`(\w+)\.py`", cells.group(1)) if cells else []
        for name in re.findall(r"`([A-Za-z_][\w.]*)`", cells.group(2)) if row_files else []:
            head, _, tail = name.partition(".")
            if tail in FILE_ENDINGS:
                continue
            if name not in (everywhere if tail else set().union(*(defined[f] for f in row_files))):
                wrong.append(f"README.md: `{name}` beside {', '.join(row_files)}")
    for doc in DOCS:
        text = re.sub(r"^```[^\n]*\n.*?^```", "", (REPO / doc).read_text(encoding="utf-8"), flags=re.M | re.S)
        for head, tail in re.findall(r"`(\w+)\.(\w+)`", text):
            if head in MODULES and tail not in FILE_ENDINGS and tail not in defined[head]:
                wrong.append(f"{doc}: `{head}.{tail}`")
    assert wrong == []


def module_docstring(module):
    return ast.get_docstring(ast.parse((REPO / f"{module}.py").read_text(encoding="utf-8"))) or ""


def test_every_name_a_files_docstring_gives_is_defined_where_it_says():
    """A file's docstring is what a reader reads first: a function it names (`make_suite()`, "(write_atomic)", the
    "Reading order: main -> train -> ..." of train.py) that was renamed or moved leaves it naming nothing. A name of
    ours given alone is the file's own (defined or imported there), `module.name` that module's; every step of a
    reading order is a function of the file."""
    defined = {m: defined_names(m) for m in MODULES}
    trees = {m: ast.parse((REPO / f"{m}.py").read_text(encoding="utf-8")) for m in MODULES}
    ours = {n.name for tree in trees.values() for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    wrong = []
    for m, tree in trees.items():
        text = module_docstring(m)
        imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        named = set(re.findall(r"\b([A-Za-z_][\w.]*)\(\)", text)) | set(re.findall(r"`([A-Za-z_][\w.]*)`", text)) | \
            set(re.findall(r"\(([A-Za-z_][\w.]*)[;:,)]", text))
        for name in named:
            head, _, tail = name.partition(".")
            if head in MODULES and tail not in FILE_ENDINGS and tail not in defined[head]:
                wrong.append(f"{m}.py: {name}")
            elif head not in MODULES and name in ours and name not in defined[m] | imported:
                wrong.append(f"{m}.py: {name}, defined elsewhere")
        order = text.partition("Reading order:")[2].split(".\n")[0]
        steps = [re.match(r"\s*(\w+)", step).group(1) for step in order.split("->")] if order else []
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        wrong += [f"{m}.py: reading order's {step}" for step in steps if step not in functions]
    assert wrong == []


def class_members():
    """Class -> the names its instances answer to, for every class of ours: methods, class-level names and dataclass
    fields, and what its methods assign to self."""
    members = {}
    for m in MODULES:
        for node in ast.parse((REPO / f"{m}.py").read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                names = members.setdefault(node.name, set())
                for n in ast.walk(node):
                    if isinstance(n, (ast.FunctionDef, ast.ClassDef)) or \
                            (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)):
                        names.add(getattr(n, "name", None) or n.id)
                    elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and \
                            getattr(n.value, "id", "") == "self":
                        names.add(n.attr)
    return members


def test_every_module_or_class_member_a_docstring_or_comment_names_exists():
    """The test above reads the files' own docstrings; the docstrings of their functions and classes and the comments
    send a reader on too: a `module.name` there (sample.py's "as in model.generate", a method of model.Transformer,
    not of the module) or `Class.member` renamed, moved or never there leaves the reader looking for nothing."""
    import io
    import tokenize
    defined, members, wrong = {m: defined_names(m) for m in MODULES}, class_members(), []
    for m in MODULES:
        source = (REPO / f"{m}.py").read_text(encoding="utf-8")
        texts = [(n.lineno, ast.get_docstring(n)) for n in ast.walk(ast.parse(source))
                 if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(n)]
        texts += [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                  if tok.type == tokenize.COMMENT]
        for line, text in texts:
            for head, tail in re.findall(r"\b(\w+)\.(\w+)\b", text):
                if (head in MODULES and tail not in FILE_ENDINGS and tail not in defined[head]) or \
                        (head in members and tail not in members[head]):
                    wrong.append(f"{m}.py:{line}: {head}.{tail}")
    assert wrong == []


def test_checkpoint_pys_docstring_lists_the_keys_each_file_is_saved_with():
    """checkpoint.py's docstring shows what ckpt.pt and model.pt hold: the keys of the dicts save_checkpoint and
    save_weights write (a key added to one, "validated", was missing from it)."""
    tree = ast.parse((REPO / "checkpoint.py").read_text(encoding="utf-8"))
    shown = {f: set(re.findall(r'"(\w+)"', re.search(rf"out_dir/{f}\s+[^{{]*\{{([^}}]*)\}}", module_docstring(
        "checkpoint"), flags=re.S).group(1))) for f in ("ckpt.pt", "model.pt")}
    written = {}
    for f, function in (("ckpt.pt", "save_checkpoint"), ("model.pt", "save_weights")):
        body = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
        dicts = [{k.value for k in n.keys} for n in ast.walk(body) if isinstance(n, ast.Dict) and n.keys
                 and all(isinstance(k, ast.Constant) for k in n.keys)]
        written[f] = next(d for d in dicts if {"state", "model"} & d)
    assert shown == written


def names_in(name, module):
    """The names a module-level `name = (...)`, `{...}` or `dict(...)` of module.py holds, read without importing it."""
    node = next(n.value for n in ast.parse((REPO / f"{module}.py").read_text(encoding="utf-8")).body
                if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in n.targets))
    if isinstance(node, ast.Call):  # dict(key=value, ...)
        return {k.arg for k in node.keywords}
    return {ast.literal_eval(e) for e in (node.keys if isinstance(node, ast.Dict) else node.elts)}


def train_keys():
    """train.py's configuration keys: its module-level assignments before DEFAULTS gathers them."""
    body = ast.parse((REPO / "train.py").read_text(encoding="utf-8")).body
    end = next(n.lineno for n in body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "DEFAULTS")
    names = [t for n in body if isinstance(n, ast.Assign) and n.lineno < end for t in n.targets]
    return {e.id for t in names for e in (t.elts if isinstance(t, ast.Tuple) else [t]) if isinstance(e, ast.Name)}


ARGPARSE_SCRIPTS = ("bench", "sample", "data", "tasks", "minicme")


def script_options(module):
    """(the argparse options of module.py, --no-X too where X is a BooleanOptionalAction; its subcommands), read
    without importing it."""
    options, commands = {"help"}, set()
    for node in ast.walk(ast.parse((REPO / f"{module}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_parser":
            commands.add(node.args[0].value)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            name = node.args[0].value.removeprefix("--")
            boolean = any(k.arg == "action" and getattr(k.value, "attr", "") == "BooleanOptionalAction"
                          for k in node.keywords)
            options |= {name, f"no-{name}"} if boolean else {name}
    return options, commands


def code_snippets(text):
    """A Markdown text's code: each line of its code blocks, then each inline `code` outside them."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    return [line for b in blocks for line in b.splitlines()] + \
        re.findall(r"`([^`]+)`", re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S))


def documented_commands():
    """(file, script, its first word, the flags after it as (name, "=value" or "")) for each command of a script of
    ours (train.py, study.py and the argparse ones) in the README and RESULTS.md: code blocks' lines and inline code,
    without shell comments."""
    for name in DOCS:
        for snippet in code_snippets((REPO / name).read_text(encoding="utf-8")):
            scripts = "|".join(("train", "study") + ARGPARSE_SCRIPTS)
            command = re.search(rf"(?<![\w/.])({scripts})\.py\b(.*)", snippet.split("#")[0], flags=re.S)
            if command:
                words = command.group(2).split()
                yield name, command.group(1), words[0] if words else "", \
                    re.findall(r"(?<!\S)--([a-z][\w-]*)(=\S*)?", command.group(2))


SWITCHES = {"train": {"help"}, "study": {"help", "report", "quick"}}  # their only flags without =value


def accepted_flags():
    """{script: the flags it accepts}: train.py's keys, study.py's options and train.py's keys (passed through), each
    argparse script's options."""
    keys = train_keys() | {"help"}
    return {"train": keys, "study": names_in("OPTIONS", "study") | keys,
            **{m: script_options(m)[0] for m in ARGPARSE_SCRIPTS}}


def test_every_command_in_the_readme_and_results_uses_flags_and_names_that_exist():
    """A flag, bench.py section or study run renamed in the code leaves the command printed beside a number stale:
    train.py keys, study.py's options (train.py keys pass through) and --runs names, bench.py's --section names, and
    the options and subcommands (data.py prepare) of every argparse script. train.py and study.py read --key=value
    only (configurator.py): `--compile` or `--out_dir out/x` would be refused, so a flag of theirs shows its value."""
    sections, runs = names_in("SECTIONS", "bench"), names_in("RUNS", "study") | {"all"}
    parsed, allowed = {m: script_options(m) for m in ARGPARSE_SCRIPTS}, accepted_flags()
    stale = []
    for name, script, first, flags in documented_commands():
        commands = parsed[script][1] if script in parsed else set()
        if commands and first and first not in commands | {"--help", "-h"}:  # "`data.py`" alone names the file
            stale.append(f"{name}: {script}.py {first}")
        for flag, given in flags:
            value = given.removeprefix("=")
            values = set(value.split(",")) if value else set()
            bare = script in SWITCHES and not given and flag not in SWITCHES[script]
            if bare or flag not in allowed[script] or (script, flag) == ("bench", "section") and values - sections or \
                    (script, flag) == ("study", "runs") and values - runs:
                stale.append(f"{name}: {script}.py --{flag}{given}")
    assert stale == []


def shell_lines(path):
    """A shell script's lines but its comments, each continued line (ending in a backslash) joined to the next: the
    commands `bash gpu_check.sh` runs."""
    text = re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8"))
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def script_commands(scripts):
    """(where, script, its words) for each command of one of scripts that the README, RESULTS.md, the script's own
    docstring or gpu_check.sh shows with a flag: the words up to a shell operator, quotes undone as the shell does.
    A mention without a flag (`data.py`) or with a placeholder (`--task ...`) or --help runs nothing."""
    sources = {name: code_snippets((REPO / name).read_text(encoding="utf-8")) for name in DOCS}
    sources |= {f"{m}.py": module_docstring(m).splitlines() for m in scripts}
    sources["gpu_check.sh"] = shell_lines(REPO / "gpu_check.sh")
    for where, snippets in sources.items():
        for snippet in snippets:
            command = re.search(rf"(?<![\w/.])({'|'.join(scripts)})\.py\b(.*)", snippet.split("#")[0], flags=re.S)
            words = shlex.split(command.group(2)) if command else []
            words = words[:next((i for i, w in enumerate(words) if re.match(r"[&|;>]", w)), len(words))]
            if any(w.startswith("--") for w in words) and not {"...", "--help", "-h"} & set(words):
                yield where, command.group(1), words


WORKERS = {"data": "prepare", "tasks": "write_eval_set", "minicme": "make_suite", "sample": "records_of",
           "bench": "run_sections"}  # what each script's main hands the work to, once its checks have passed


def test_every_argparse_command_shown_passes_its_scripts_own_checks(tmp_path, monkeypatch, capsys):
    """The test above holds the flags' names; this one runs each command shown through its script's main, up to
    where the work would start (a stub stands in for it). RESULTS.md showed `bench.py --full7b --no-checkpointing`
    beside a number: every flag exists, yet bench.py refuses it (--full7b needs --device=cuda --section=cuda7b)."""
    import importlib

    import torch

    def work(*args, **kwargs):
        raise _Called

    monkeypatch.chdir(tmp_path)  # relative paths land here, though the stub writes nothing
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # bench.py's --threads, before its sections
    refused, shown = [], []
    for where, script, words in script_commands(ARGPARSE_SCRIPTS):
        module = importlib.import_module(script)
        monkeypatch.setattr(module, WORKERS[script], work)
        shown.append(script)
        try:
            module.main(words)  # returns without the stub only where bench.py --device=cuda finds no GPU
        except _Called:
            pass
        except SystemExit:
            refused.append(f"{where}: {script}.py {' '.join(words)}: {capsys.readouterr().err.splitlines()[-1:]}")
    assert refused == [] and set(shown) == set(WORKERS)


def test_every_study_py_command_shown_is_one_study_py_accepts():
    """As the test above, for study.py's options and values (--seeds=0, --runs=lora32,, --steps=1e3 are refused):
    each study.py command shown passes study.parse, which reads them before any run starts."""
    import study
    from errors import UserError
    refused, shown = [], []
    for where, _, words in script_commands(("study",)):
        shown.append(words)
        try:
            study.parse(words)
        except UserError as e:
            refused.append(f"{where}: study.py {' '.join(words)}: {e}")
    assert refused == [] and shown


def recipe_comments(path):
    """A recipe's comment lines, without their "#" and indent (its prepare and torchrun lines among them)."""
    return [line.lstrip("#").strip() for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]


RECIPES = [f"config/{p.name}" for p in repository_files("config/*.py")]


def train_commands():
    """(where, the words after train.py, up to a shell operator) for each train.py command that the README,
    RESULTS.md, train.py's docstring, the recipes' comments and gpu_check.sh show."""
    sources = {name: code_snippets((REPO / name).read_text(encoding="utf-8")) for name in DOCS}
    sources["train.py"] = module_docstring("train").splitlines()
    sources["gpu_check.sh"] = shell_lines(REPO / "gpu_check.sh")
    sources |= {recipe: recipe_comments(REPO / recipe) for recipe in RECIPES}
    for where, snippets in sources.items():
        for snippet in snippets:
            command = re.search(r"(?<![\w/.])train\.py\b(.*)", snippet.split("#")[0], flags=re.S)
            if command:
                words = command.group(1).split()
                yield where, words[:next((i for i, w in enumerate(words) if re.match(r"[&|;>]", w)), len(words))]


def test_every_train_py_command_shown_is_a_configuration_train_py_accepts(monkeypatch):
    """The test above holds the flags' names; this one their values and the config files they name. Each train.py
    command of the README, RESULTS.md, train.py's docstring and the recipes' comments, read from the repository's
    root as train.py reads it (configurator.py, then train.py's checks of every key), is accepted: `--dtype=bf16`,
    `--adapter=moelora --competition=True` once moelora refused competition, or a recipe renamed would be refused."""
    import train
    from errors import UserError
    monkeypatch.chdir(REPO)
    shown, refused = [], []
    for where, words in train_commands():
        if {"--help", "-h"} & set(words):
            continue
        shown.append(words)
        try:
            train.parse_config(words)
        except UserError as e:
            refused.append(f"{where}: train.py {' '.join(words)}: {e}")
    assert refused == []
    assert {w[0] for w in shown if w and w[0].startswith("config/")} == set(RECIPES)  # each recipe, as it is run


def other_commands():
    """(where, words) for each code line and inline code of the README and RESULTS.md, and each line gpu_check.sh runs,
    that is no command of a script of ours: flags given alone (`--eval_batch_size=16`, bench.py's `--no-tf32`, the
    prose names the script), torchrun's and pytest's command lines, `bash gpu_check.sh`."""
    sources = {name: code_snippets((REPO / name).read_text(encoding="utf-8")) for name in DOCS}
    sources["gpu_check.sh"] = shell_lines(REPO / "gpu_check.sh")
    for where, snippets in sources.items():
        for snippet in snippets:
            words = snippet.split("#")[0].split()
            if words and (words[0].startswith("--") or {"torchrun", "pytest", "bash"} & set(words)):
                yield where, words


PLACEHOLDER = r"[A-Z]+|value|\.\.\."  # `--threads=N`, `--key=value`: a flag's form, not a value


def pytest_options(tmp_path):
    """pytest's options, with its installed plugins' (`--lf` is the cache plugin's), read from its --help."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}  # a `-p no:cacheprovider` there drops --lf
    run = subprocess.run([sys.executable, "-m", "pytest", "--help", "--noconftest"], cwd=tmp_path, timeout=120,
                         capture_output=True, text=True, env=env)
    return set(re.findall(r"(?<![\w-])--([a-z][\w-]*)", run.stdout))


def test_every_flag_given_alone_or_to_torchrun_or_pytest_exists_and_every_file_run_is_there(tmp_path, monkeypatch):
    """The tests above read our scripts' commands; the docs give flags alone too, the prose naming their script
    (`--eval_batch_size=16`, `--no-tf32`): each is a flag one of our scripts accepts (train.py's, with their values,
    as train.py reads them), else pytest's (`--lf`); the prose is not parsed for its script, so a name two scripts
    share (`--workers`, data.py's and study.py's) holds while either has it. torchrun's flags before the script are
    ones torchrun accepts, with their values, and every script, recipe or test file a command runs (`pytest ...
    test_bench.py`) is there: a flag renamed or a file moved leaves the reader with a command that is refused."""
    from torch.distributed.run import get_args_parser

    import train
    from errors import UserError
    monkeypatch.chdir(REPO)
    ours, keys, wrong, seen = set().union(*accepted_flags().values()), train_keys(), [], set()
    pytests = pytest_options(tmp_path)
    assert "lf" in pytests
    for where, words in other_commands():
        if words[0].startswith("--"):  # flags alone
            seen.add("alone")
            flags = [re.fullmatch(r"--([a-z][\w-]*)(?:=(.*))?", w) for w in words]
            for word, flag in zip(words, flags):
                if not flag:
                    wrong.append(f"{where}: `{' '.join(words)}`: {word} is no flag")
                elif flag.group(1) not in ours | pytests and word != "--key=value":  # the README's form of a flag
                    wrong.append(f"{where}: {word}, a flag of none of our scripts")
            if all(f and f.group(1) in keys and f.group(2) and not re.fullmatch(PLACEHOLDER, f.group(2))
                   for f in flags):
                try:
                    train.parse_config(words)
                except UserError as e:
                    wrong.append(f"{where}: `{' '.join(words)}`: {e}")
        after = words[words.index("torchrun") + 1:] if "torchrun" in words else []
        script = next((i for i, w in enumerate(after) if w.endswith(".py")), None)  # `torchrun` alone runs nothing
        if script is not None:
            seen.add("torchrun")
            try:
                get_args_parser().parse_args(after[:script + 1])
            except SystemExit:
                wrong.append(f"{where}: torchrun {' '.join(after[:script])}, refused by torchrun")
        if "pytest" in words:
            seen.add("pytest")
            wrong += [f"{where}: pytest {w}, no option of pytest" for w in words[words.index("pytest") + 1:]
                      if w.startswith("--") and w[2:].partition("=")[0] not in pytests]
        run = [w for w in words if re.fullmatch(r"[\w./-]+\.(py|sh)", w) and not w.startswith("/")]
        wrong += [f"{where}: `{' '.join(words)}` runs {w}, which is not there" for w in run if not (REPO / w).is_file()]
    assert wrong == [] and seen == {"alone", "torchrun", "pytest"}


def test_every_recipe_the_readme_names_exists():
    """The README names recipes in prose too (`config/cme_{qwen2.5_7b,qwen3_8b,llama3.1_8b}.py`, as the shell
    expands it), where no command runs them: each is a file of config/."""
    named = {n for n in readme_names(REPO) if n.startswith("config/")}
    assert named and sorted(named - set(RECIPES)) == []


def recipe_blocks():
    """(where, recipe, lines): the lines that go with a recipe, each recipe's own comments and each README code
    block that runs one under torchrun (the 7B block: prepare, tasks.py, the dry runs, torchrun)."""
    for recipe in RECIPES:
        yield recipe, recipe, recipe_comments(REPO / recipe)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"^```bash\n(.*?)^```", readme, flags=re.M | re.S):
        for recipe in sorted(set(re.findall(r"^torchrun .*?train\.py (config/\S+\.py)", block, flags=re.M))):
            yield "README.md", recipe, block.splitlines()


def flag_words(line, script):
    """{flag: the words after it} of the argparse-style command of script in line (`--raw a b --out c`)."""
    found, key = {}, None
    for word in line.split("#")[0].split(script, 1)[1].split():
        if word.startswith("--"):
            key, eq, value = word[2:].partition("=")
            found[key] = [value] if eq else []
            key = None if eq else key  # --key=value takes no more words after it
        elif key:
            found[key].append(word)
    return found


def test_each_recipes_lines_prepare_and_score_what_it_trains_on(monkeypatch):
    """A recipe's `data.py prepare` line (in its comments, and in the README's 7B block) writes the data_dir it trains
    on, with its tokenizer and max_len; the README's tasks.py lines write <task>.jsonl into its eval_dir; its torchrun
    line starts the processes its dry run plans for (dry_run_world_size). A path changed on one side only leaves
    a user who copies the lines with shards or sets the run does not find, or shards of another tokenizer."""
    import train
    monkeypatch.chdir(REPO)
    wrong, prepared = [], set()
    for where, recipe, lines in recipe_blocks():
        cfg = train.parse_config([recipe])
        for line in lines:
            if "data.py prepare" in line:
                prepared.add(recipe)
                f = flag_words(line, "data.py prepare")
                got = [f.get(k) for k in ("tokenizer", "out", "max_len")]
                if got != [[cfg["tokenizer"]], [cfg["data_dir"]], [str(cfg["max_len"])]]:
                    wrong.append(f"{where}: prepare's --tokenizer, --out, --max_len {got} for {recipe}")
            if "tasks.py --task" in line:
                f = flag_words(line, "tasks.py")
                if f["out"] != [f"{cfg['eval_dir']}/{f['task'][0]}.jsonl"]:
                    wrong.append(f"{where}: tasks.py --out {f['out']}, not in {recipe}'s eval_dir {cfg['eval_dir']}")
            if re.match(rf"torchrun .*train\.py {re.escape(recipe)}", line):
                if flag_words(line, "torchrun")["nproc_per_node"] != [str(cfg["dry_run_world_size"])]:
                    wrong.append(f"{where}: {line} against dry_run_world_size={cfg['dry_run_world_size']}")
    assert wrong == [] and prepared == set(RECIPES)


def test_what_the_readme_and_the_llama2_recipe_say_of_its_setting_is_its_values(monkeypatch):
    """The README's paragraph on config/cme_llama2_7b.py and the recipe's own header give its setting in words
    (4 experts of rank 32, lr 2e-4, alpha 32, dropout 0.05, one epoch, 3% warmup, bf16, 1024 tokens, global batch
    128 over 8 GPUs x 4 x 4): a value changed in the recipe leaves them stale."""
    import train
    monkeypatch.chdir(REPO)
    cfg = train.parse_config(["config/cme_llama2_7b.py"])
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    records = float(re.search(r"\(([\d.]+)M records from", readme).group(1)) * 1e6  # the mixture, one epoch of it
    said = readme[readme.index("`config/cme_llama2_7b.py` is the paper's setting"):].split(";")[0]
    comments = recipe_comments(REPO / "config/cme_llama2_7b.py")
    header = " ".join(comments[:comments.index("")])
    for text in (said, header):
        experts, rank = map(int, re.search(r"(\d+) experts of rank (\d+)", text).groups())
        assert (experts, rank) == (cfg["experts"], cfg["r"] // cfg["experts"]), text
        assert float(re.search(r"\blr ([\d.e-]+)", text).group(1)) == cfg["learning_rate"], text
        assert float(re.search(r"\balpha ([\d.]+)", text).group(1)) == cfg["alpha"], text
        assert float(re.search(r"\bdropout ([\d.]+)", text).group(1)) == cfg["dropout"], text
        assert int(int(re.search(r"(\d+)% warmup", text).group(1)) / 100 * cfg["max_iters"]) == cfg["warmup_iters"]
        assert int(re.search(r"(?:max length|at most) (\d+)", text).group(1)) == cfg["max_len"], text
        assert "one epoch" in text and cfg["max_iters"] == records // cfg["batch_size"], text
        assert "bf16" in text and cfg["dtype"] == "bfloat16" and cfg["targets"] == "w1,w2,w3", text
    assert re.search(rf"global batch {cfg['batch_size']}, FSDP with activation checkpointing", said)
    assert cfg["fsdp"] and cfg["activation_checkpointing"]
    gpus, micro, accum = map(int, re.search(rf"global batch {cfg['batch_size']} \((\d+) GPUs x (\d+) per micro-batch "
                                            r"x (\d+) accumulation steps\)", " ".join(comments)).groups())
    assert (gpus * micro * accum, gpus, accum) == (cfg["batch_size"], cfg["dry_run_world_size"], cfg["grad_accum"])


def test_the_other_recipes_are_the_llama2_one_with_another_base(monkeypatch):
    """The README: config/cme_llama3_8b.py "is the same on LLaMA-3-8B", the others are "run as the LLaMA-2 one", and
    each says it is "the LLaMA-2 recipe with" its base's model and tokenizer: none sets the training otherwise."""
    import train
    monkeypatch.chdir(REPO)
    llama2 = train.parse_config(["config/cme_llama2_7b.py"])
    base = {"out_dir", "init_from", "model", "tokenizer", "data_dir", "eval_dir", "_explicit"}
    for recipe in set(RECIPES) - {"config/cme_llama2_7b.py"}:
        assert "the LLaMA-2 recipe with" in " ".join(recipe_comments(REPO / recipe)), recipe
        cfg = train.parse_config([recipe])
        assert sorted(k for k in cfg if cfg[k] != llama2[k] and k not in base) == [], recipe


def test_the_llama2_recipes_word_on_activation_checkpointing_is_what_its_dry_runs_print(at_a_fresh_root, monkeypatch):
    """config/cme_llama2_7b.py says what activation_checkpointing=False would cost a GPU against the dry run's
    estimate with it on (the README prints that one): both are the dry run's numbers today."""
    import train
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # the dry run would plan for torchrun's processes
    line = next(l for l in (REPO / "config/cme_llama2_7b.py").read_text(encoding="utf-8").splitlines()
                if l.startswith("activation_checkpointing"))
    off, on = re.search(r"False: .*?about ([\d.]+) GiB a GPU, not ([\d.]+)", line).groups()
    for checkpointing, gib in ((False, off), (True, on)):
        printed = []
        cfg = train.parse_config(["config/cme_llama2_7b.py", f"--activation_checkpointing={checkpointing}"])
        train.check_full_config(cfg, say=printed.append)
        assert f"activation checkpointing {'on' if checkpointing else 'off'}: about {gib} GiB (" in printed[2]


def test_the_readmes_dry_run_of_the_llama2_recipe_is_what_it_prints_and_its_96_adapted_layers_are_the_recipes(
        at_a_fresh_root, monkeypatch):
    """The README shows `python train.py config/cme_llama2_7b.py --dry_run=True`'s lines (base and adapter parameters,
    the training and scoring memory estimates) and counts "96" adapted layers "in a 7B model with FFN adapters": a
    change to the recipe, the model's presets, the adapter or memory.py's arithmetic leaves them stale."""
    import model
    import train
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # the dry run would plan for torchrun's processes
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("$ python train.py config/cme_llama2_7b.py --dry_run=True\n", 1)[1].split("```")[0]
    printed, cfg = [], train.parse_config(["config/cme_llama2_7b.py", "--dry_run=True"])
    train.check_full_config(cfg, say=printed.append)
    assert printed == block.rstrip("\n").splitlines()
    layers = re.search(r"\((\d+) in a 7B model with FFN adapters\)", " ".join(readme.split())).group(1)
    targets = [t for t in cfg["targets"].split(",") if t.strip()]
    assert int(layers) == model.ModelArgs.from_name(cfg["model"]).n_layers * len(targets) and set(targets) == \
        {"w1", "w2", "w3"}  # the FFN: gate, down and up in Meta's names


def test_the_readmes_count_of_the_studys_seeds_is_its_default():
    """The README's study.py row: "each method's learning rate chosen on validation data, then 5 seeds"."""
    import study
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert int(re.search(r"chosen on validation data, then (\d+) seeds", readme).group(1)) == study.OPTIONS["seeds"]


def test_ci_runs_the_readmes_tests_on_the_torch_it_pins_with_optional_packages_the_readme_names():
    """The README's `.ci/run` row: "a fresh venv, torch 2.13, the extras the tests cover, then the tests": the torch
    the Quick start pins (and says it is tested on), only extras its "Optional packages" name, and its test line."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = [line.split("#")[0].split() for line in (REPO / ".ci/run").read_text(encoding="utf-8").splitlines()]
    pinned = re.search(r"^pip install (torch==[\d.]+) && pip install -r requirements.txt", readme, re.M).group(1)
    assert re.search(rf"torch {pinned.split('==')[1].rsplit('.', 1)[0]}, the extras the tests cover", readme)
    installs = [words[words.index("install") + 1:] for words in ci if words[:4] == ["python", "-m", "pip", "install"]]
    assert [w for w in installs[0] if not w.startswith("-")] == [pinned]  # torch first, on its own
    extras = {w.split("==")[0] for w in installs[1] if not w.startswith("-")} - {"requirements.txt", "pytest"}
    optional = " ".join(readme.split("Optional packages: ", 1)[1].split("Tests skip")[0].split())
    assert extras and all(f"`{name}`" in optional for name in extras), extras
    test_line = re.search(r"^pip install pytest && (python -m pytest[^#]*?)\s*#", readme, re.M).group(1).split()
    assert ci[-1] == test_line


def test_requirements_txt_holds_the_runtime_packages_and_every_other_import_is_an_optional_one_the_readme_names():
    """The README: `pip install -r requirements.txt` installs "the runtime packages" (from the oldest torch it names),
    and its "Optional packages" are the others: a package imported at a module's top is a requirement (else a fresh
    install fails at import), one imported inside a function a requirement or an optional one, and each requirement is
    imported somewhere."""
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    lines = [l.split("#")[0].strip() for l in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    required = {re.split(r"[<>=!~\[; ]", l, maxsplit=1)[0].lower().replace("-", "_"): l for l in lines if l}
    oldest = re.search(r"Python [\d.]+ or newer, as torch ([\d.]+) needs", readme).group(1)
    assert required["torch"] == f"torch>={oldest}"
    optional = readme.split("Optional packages: ", 1)[1].split("Tests skip")[0]
    optional = {name.replace("-", "_") for name in re.findall(r"`([\w-]+)` \(", optional)}
    top, anywhere = set(), set()
    for name in MODULES:
        tree = ast.parse((REPO / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            names = {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - set(MODULES)
            anywhere |= names
            top |= names if node in tree.body else set()
    assert top <= set(required) and anywhere <= set(required) | optional and set(required) <= anywhere, \
        (sorted(top - set(required)), sorted(anywhere - set(required) - optional), sorted(set(required) - anywhere))
    assert optional & anywhere and not optional & set(required)


def test_every_torch_load_of_the_scripts_reads_weights_only_as_the_readme_says_every_pt_is_loaded():
    """The README: "every `.pt` is loaded with `weights_only=True`" (no file can run code): each torch.load call in
    our modules passes weights_only=True itself (torch's default has changed between releases)."""
    calls = []
    for name in MODULES:
        for node in ast.walk(ast.parse((REPO / f"{name}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((f"{name}.py:{node.lineno}", safe))
    assert calls and all(safe for _, safe in calls), [where for where, safe in calls if not safe]


def test_the_readmes_word_on_train_pys_defaults_is_theirs():
    """The README gives defaults of train.py in words, the demo's "600 steps at lr 1e-3" and the balance loss's
    "`balance_coef` (0.01)": a default changed in train.py leaves them stale."""
    import train
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    steps, lr = re.search(r"\((\d+) steps at lr ([\d.e-]+)", readme).groups()
    assert (int(steps), float(lr)) == (train.DEFAULTS["max_iters"], train.DEFAULTS["learning_rate"])
    assert float(re.search(r"`balance_coef` \(([\d.]+)\)", readme).group(1)) == train.DEFAULTS["balance_coef"]


def test_the_readmes_other_words_on_train_pys_defaults_are_theirs():
    """More defaults the README gives in words, each beside the flag that changes it: the demo's files and adapter,
    the folder its commands continue, re-score and sample, HydraLoRA's head count (the default experts), the balance
    loss's reduction, threads, compile, tf32 and DDP. A default changed in train.py leaves them stale."""
    import minicme
    import train
    readme, d = " ".join((REPO / "README.md").read_text(encoding="utf-8").split()), train.DEFAULTS
    root = re.search(r"The demo builds the synthetic .*? in `([^`]+)`, pretrains", readme).group(1)
    assert all(d[k] == v and v.startswith(root) for k, v in minicme.DEMO.items())
    assert re.search(r"fine-tunes (\w+) on the task mixture", readme).group(1).lower() == d["adapter"]
    said = re.findall(r"# (?:continue|re-score) (out/\w+)|# (out/\w+)'s answers|# ask (out/\w+)", readme)
    assert len(said) == 4 and all("".join(s) == d["out_dir"] for s in said), said
    assert int(re.search(r"HydraLoRA: one A of rank 12, (\d+) heads", readme).group(1)) == d["experts"]
    assert re.search(r"`balance_coef` \([\d.]+\) times its \*\*(\w+)\*\*", readme).group(1) == d["balance_reduction"]
    assert int(re.search(r"\(`threads=(\d+)`: threads that share a core", readme).group(1)) == d["threads"]
    assert "`--compile=True` compiles each block" in readme and "so it is off by default" in readme and not d["compile"]
    assert "on TF32 (`--tf32=False`: IEEE)" in readme and d["tf32"] is True
    assert "Under `torchrun` the default is DDP" in readme and d["fsdp"] is False


def test_the_readmes_demo_table_is_what_the_demo_prints_for_the_scores_it_shows(capsys):
    """evaluation.print_results, given the README table's scores and chance levels and train.py's defaults, prints the
    table again: the same tasks and metrics, footers (eval_limit, load_layers, experts) and lifts and averages (to the
    table's 0.1). A default, task or metric changed in the code, or a number edited by hand, leaves it stale."""
    import torch

    import evaluation
    import train
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    shown = readme[readme.index("```\ntask ") + 4:].split("```")[0].rstrip("\n").splitlines()  # the code block
    rows = [line.split() for line in shown[1:shown.index(next(l for l in shown if l.startswith("average")))]]
    cfg = train.DEFAULTS
    evaluation.print_results({r[0]: float(r[2]) for r in rows}, {r[0]: float(r[3]) for r in rows},
                             {r[0]: torch.full((cfg["experts"],), 1 / cfg["experts"]) for r in rows}, cfg)
    printed = capsys.readouterr().out.strip("\n").splitlines()
    printed = printed[:next(i for i, line in enumerate(printed) if line.startswith("expert load")) + 1]
    assert shown[-1].endswith(" ...") and len(shown) == len(printed)
    for want, got in zip(shown[:-1] + [shown[-1].removesuffix(" ...")], printed):
        assert len(want.split()) == len(got.split()), (want, got)
        for a, b in zip(want.split(), got.split()):
            try:
                assert abs(float(a) - float(b)) <= 0.1 + 1e-9, (want, got)
            except ValueError:
                assert a == b, (want, got)


def test_the_readmes_demo_scores_are_results_mds_column_marked_readme():
    """The README's demo table was printed by "a 2-core Intel Xeon (2 threads)"; RESULTS.md's table of the demo on
    other CPUs records that run in its column marked (README): each task's score and the average are the same
    numbers there, under the machine and thread count the README names, or one of the two was edited alone."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    shown = readme[readme.index("```\ntask ") + 4:].split("```")[0].splitlines()[1:]
    shown = shown[:next(i for i, row in enumerate(shown) if row.startswith("average")) + 1]
    scores = {row.split()[0]: float(row.split()[-3]) for row in shown}  # task, [metric,] score, chance, lift
    machine, threads = re.search(r"A \d+-core (.+?) printed this \((\d+) threads\)", " ".join(readme.split())).groups()
    table = section((REPO / "RESULTS.md").read_text(encoding="utf-8"), "the-demo-on-other-cpus")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    header = next(row for row in rows if row[0] == "task")
    column = next(i for i, h in enumerate(header) if h.endswith(" (README)"))
    assert machine.split()[-1] in header[column] and f"{threads} threads" in header[column], header[column]
    body = [row for row in rows[rows.index(header) + 1:] if set(row[0]) - {"-"}]  # not the |---| line
    assert {row[0]: float(row[column]) for row in body} == scores


class _Called(Exception):
    pass


SCRIPT_PATHS = [  # module, the function main hands the paths to, argv written --key=~/... (a ~ the shell leaves)
    ("data", "prepare", ["prepare", "--input=~/a.jsonl", "--tokenizer=~/t.model", "--out=~/tokens"]),
    ("tasks", "write_eval_set", ["--task=anli", "--raw=~/r1.jsonl", "--out=~/anli.jsonl"]),
    ("minicme", "make_suite", ["--out=~/suite"]),
    ("sample", "records_of", ["--out_dir=~/run", "--records=~/r.jsonl"]),  # before the run is read
]


@pytest.mark.parametrize("module, worker, argv", SCRIPT_PATHS, ids=[m for m, _, _ in SCRIPT_PATHS])
def test_a_path_flag_written_with_a_tilde_is_the_home_folder_in_every_script(module, worker, argv, tmp_path,
                                                                            monkeypatch):
    """--out=~/x made a folder named ~ in the current one (which `rm -rf ~` would then not clean up but wipe the home
    folder): the shell expands ~ only in --out ~/x. train.py's and study.py's flags: test_train.py, test_study.py."""
    import importlib

    script, handed = importlib.import_module(module), []

    def worker_called(*args):
        for a in args:
            values = vars(a).values() if hasattr(a, "__dict__") else [a]
            handed.extend(p for v in values for p in (v if isinstance(v, list) else [v]) if "~" in str(p)
                          or str(p).startswith(str(tmp_path)))
        raise _Called

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(script, worker, worker_called)
    with pytest.raises(_Called):
        script.main(argv)
    expected = sorted(str(tmp_path / a.split("=~/")[1]) for a in argv if "=~/" in a)
    assert sorted(map(str, handed)) == expected


def test_every_text_file_the_scripts_open_names_its_encoding():
    """A text file opened without an encoding is read in the locale's (not UTF-8 under LC_ALL=C with PYTHONUTF8=0),
    and `python -X warn_default_encoding -W error::EncodingWarning train.py` (a CI's strict mode) ended in a traceback
    at machine.py's open("/proc/loadavg"), which every run with threads=0 reads. Binary files and os.open aside."""
    unnamed = []
    for name in MODULES:
        for node in ast.walk(ast.parse((REPO / f"{name}.py").read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            f, keys = node.func, {k.arg for k in node.keywords}
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), "")
            opens = (isinstance(f, ast.Name) and f.id == "open" and "b" not in getattr(mode, "value", "")) or \
                (isinstance(f, ast.Attribute) and f.attr in ("read_text", "write_text"))
            if opens and "encoding" not in keys:
                unnamed.append(f"{name}.py:{node.lineno}")
    assert unnamed == []


def test_the_readmes_signature_of_the_layer_is_the_codes():
    """The README spells out TeamLoRALinear's parameters and defaults: a default changed in teamlora.py leaves it
    stale, and a reader copying the layer trusts it."""
    import inspect

    import teamlora
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())  # its line breaks undone
    shown = re.search(r"`TeamLoRALinear\((.*?)\)`", readme).group(1)
    params = inspect.signature(teamlora.TeamLoRALinear.__init__).parameters.values()
    code = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}"
                     for p in params if p.name != "self")
    assert shown == code


OLDEST_PYTHON = (3, 9)  # the README's "Python 3.9 or newer", torch 2.6's oldest; errors.py refuses an older one
PRODUCT_FILES = [f"{m}.py" for m in MODULES] + RECIPES  # the tests may use newer Python: CI runs them on its own
NEWER_NAMES = {  # the standard library's names newer than OLDEST_PYTHON, used as module.name or from module import
    "sys.get_int_max_str_digits": "3.9.14", "sys.set_int_max_str_digits": "3.9.14", "sys.stdlib_module_names": "3.10",
    "sys.orig_argv": "3.10", "itertools.pairwise": "3.10", "contextlib.aclosing": "3.10", "dataclasses.KW_ONLY": "3.10",
    "inspect.get_annotations": "3.10", "typing.TypeAlias": "3.10", "typing.ParamSpec": "3.10", "datetime.UTC": "3.11",
    "contextlib.chdir": "3.11", "hashlib.file_digest": "3.11", "enum.StrEnum": "3.11", "typing.Self": "3.11",
    "sys.exception": "3.11", "operator.call": "3.11", "math.cbrt": "3.11", "math.exp2": "3.11",
    "asyncio.TaskGroup": "3.11", "itertools.batched": "3.12", "math.sumprod": "3.12", "typing.override": "3.12",
    "os.path.splitroot": "3.12", "os.process_cpu_count": "3.13", "copy.replace": "3.13", "warnings.deprecated": "3.13"}
NEWER_MODULES = {"tomllib": "3.11"}
NEWER_BUILTINS = {"anext": "3.10", "aiter": "3.10", "EncodingWarning": "3.10", "ExceptionGroup": "3.11",
                  "BaseExceptionGroup": "3.11", "PythonFinalizationError": "3.13"}
NEWER_METHODS = {"bit_count": "3.10", "add_note": "3.11"}  # of int and of an exception
NEWER_KEYWORDS = {  # (the function's name, a keyword it takes only from that Python on)
    ("zip", "strict"): "3.10", ("dataclass", "kw_only"): "3.10", ("dataclass", "slots"): "3.10",
    ("field", "kw_only"): "3.10", ("glob", "root_dir"): "3.10", ("realpath", "strict"): "3.10",
    ("Popen", "pipesize"): "3.10", ("glob", "include_hidden"): "3.11", ("Popen", "process_group"): "3.11",
    ("rmtree", "onexc"): "3.12", ("TemporaryDirectory", "delete"): "3.12", ("NamedTemporaryFile", "delete_on_close"):
    "3.12"}


def dotted(node):
    return f"{dotted(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", "?")


def newer_python_uses(tree):
    """The uses in tree of what OLDEST_PYTHON lacks at run time, as "line: what (version)": ast.parse's
    feature_version sees syntax alone."""
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body)
    found = []
    for node in ast.walk(tree):
        uses = []
        if isinstance(node, ast.Attribute):
            uses += [(dotted(node), NEWER_NAMES.get(dotted(node))), (f".{node.attr}", NEWER_METHODS.get(node.attr))]
        elif isinstance(node, ast.ImportFrom):
            uses += [(f"{node.module}.{a.name}", NEWER_NAMES.get(f"{node.module}.{a.name}")) for a in node.names]
            uses.append((node.module, NEWER_MODULES.get(node.module)))
        elif isinstance(node, ast.Import):
            uses += [(a.name, NEWER_MODULES.get(a.name)) for a in node.names]
        elif isinstance(node, ast.Name):
            uses.append((node.id, NEWER_BUILTINS.get(node.id)))
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            uses += [(f"{name}({k.arg}=)", NEWER_KEYWORDS.get((name, k.arg))) for k in node.keywords]
            uses += [('encoding="locale"', "3.10") for k in node.keywords
                     if k.arg == "encoding" and getattr(k.value, "value", None) == "locale"]
            if name in ("isinstance", "issubclass") and len(node.args) == 2:
                uses.append(("X | Y as a type", "3.10" if isinstance(node.args[1], ast.BinOp) else None))
        elif isinstance(node, (ast.arg, ast.FunctionDef, ast.AnnAssign)) and not future:
            hint = node.returns if isinstance(node, ast.FunctionDef) else node.annotation  # run as the def runs
            union = hint is not None and any(isinstance(n, ast.BinOp) for n in ast.walk(hint))
            uses.append(("X | Y in an annotation", "3.10" if union else None))
        found += [f"{node.lineno}: {what} ({version})" for what, version in uses if version]
    return found


def fstring_fields_older_pythons_refuse(src):
    """Python 3.12's f-strings (PEP 701) take in a {} field a string in the f-string's own quotes, a backslash or a
    comment; older ones refuse them (ast.parse of the Python the tests run on, where that is 3.11 or older)."""
    if not hasattr(tokenize, "FSTRING_START"):
        return []
    quotes, found = [], []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        inner = tok.string.lstrip("rRbBfFuU")[:3] if tok.type in (tokenize.STRING, tokenize.FSTRING_START) else ""
        clash = inner and any(inner.startswith(q) if len(q) == 1 else q in tok.string for q in quotes)
        nested = quotes and (tok.type != tokenize.FSTRING_MIDDLE or len(quotes) > 1)
        if nested and (clash or tok.type == tokenize.COMMENT or "\\" in tok.string):
            found.append(f"{tok.start[0]}: {tok.string}")
        if tok.type == tokenize.FSTRING_START:
            quotes.append(inner if inner in ('"""', "'''") else inner[:1])
        elif tok.type == tokenize.FSTRING_END:
            quotes.pop()
    return found


def test_every_product_file_runs_on_the_oldest_python_the_readme_names():
    """torch 2.6 runs on Python 3.9, and so must the product: study.py's zip(strict=True) (3.10) ended --report in a
    TypeError there, and files.py's sys.get_int_max_str_digits (3.9.14) a number too long to read in an
    AttributeError on 3.9.0 to 3.9.13. Each name on the lists above fails this test where a product file uses it."""
    readme = (REPO / "README.md").read_text(encoding="utf-8").split("## Quick start")[1]
    assert f"Python {OLDEST_PYTHON[0]}.{OLDEST_PYTHON[1]} or newer" in readme
    newer = []
    for path in PRODUCT_FILES:
        src = (REPO / path).read_text(encoding="utf-8")
        try:
            tree = ast.parse(src, path, feature_version=OLDEST_PYTHON)
        except SyntaxError as e:
            newer.append(f"{path}:{e.lineno}: {e.msg}")
            continue
        newer += [f"{path}:{use}" for use in newer_python_uses(tree) + fstring_fields_older_pythons_refuse(src)]
    assert newer == []


SCRIPTS = sorted(m for m in MODULES if "__main__" in (REPO / f"{m}.py").read_text(encoding="utf-8"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_python_older_than_the_oldest_is_told_so_in_one_line(script):
    """Each script imports errors.py first, whose check says what to do where an older Python would fail later in a
    traceback (an AttributeError of functools.cache on 3.8; torch>=2.6 does not install there)."""
    major, minor = OLDEST_PYTHON[0], OLDEST_PYTHON[1] - 1
    old = f"{major}.{minor}.18"
    code = (f"import runpy, sys\nsys.version_info, sys.version = ({major}, {minor}, 18, 'final', 0), '{old} (main)'\n"
            f"sys.argv = ['{script}.py', '--help']\nrunpy.run_path('{script}.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and done.stdout == "" and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and f"{OLDEST_PYTHON[0]}.{OLDEST_PYTHON[1]} or newer" in lines[0]
    assert f"not {old};" in lines[0]


def test_the_readmes_method_screen_says_which_tensor_of_the_layer_is_which_symbol_and_its_shape():
    """The README's "method in one screen" maps the equations onto the layer (A is `lora_A`, B = [B_1 ... B_k] is
    `lora_B`, ..., alpha / r_B is `scaling`) and gives each matrix's shape (A: r x d_in, B_i: d_out x r_B, ...), as
    teamlora.py's docstring does: a reader checks the code against the paper by them, so each must be the layer's."""
    import torch

    import teamlora
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    screen = readme[readme.index("## The method in one screen"):readme.index("**Why it is fast.**")]
    said = " ".join(screen[screen.index("In `teamlora.py`: "):].split()).split(";")[0]
    names = dict(re.findall(r"((?:\w+ / )?\S+)(?: = \[[^\]]*\]| \([^)]*\))? is `(\w+)`", said))
    d_in, d_out, r, k, alpha = 12, 10, 6, 3, 5.0  # all sizes apart, so that no two shapes can be confused
    layer = teamlora.TeamLoRALinear(torch.nn.Linear(d_in, d_out), r=r, experts=k, alpha=alpha)
    size = {"r": r, "d_in": d_in, "d_out": d_out, "k": k, "r_B": r // k}
    assert (getattr(layer, names["k"]), getattr(layer, names["r"])) == (k, r), said
    assert getattr(layer, names["alpha / r_B"]) == alpha / (r // k), said
    tensor = {"A": names["A"], "B_i": names["B"], "W_r": names["W_r"], "M": names["M"]}  # B: [B_1 ... B_k]
    code = re.search(r"```\n(.*?)```", screen, flags=re.S).group(1)
    for where, text in (("README.md", code), ("teamlora.py", module_docstring("teamlora"))):
        shapes = re.findall(r"\b(A|B_i|W_r|M):? \(?(\w+) x (\w+)\b", text)
        assert where != "README.md" or {s for s, _, _ in shapes} == set(tensor), shapes
        for symbol, rows, cols in shapes:
            shape = tuple(getattr(layer, tensor[symbol]).shape)
            if symbol == "B_i":  # B_1 ... B_k side by side in lora_B
                shape = (shape[0], shape[1] // k)
            assert shape == (size[rows], size[cols]), f"{where}: {symbol}: {rows} x {cols}"


def test_the_readmes_guard_on_the_row_sum_is_the_layers():
    """DESIGN.md asks the README to say how a near-zero row sum of phi (I + M) cannot divide by zero: the magnitude it
    gives is teamlora.EPS, the one the layer keeps."""
    import teamlora
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    said = re.search(r"the row sum of `phi \(I \+ M\)` keeps a magnitude of at least ([\d.e-]+)", readme).group(1)
    assert float(said) == teamlora.EPS
