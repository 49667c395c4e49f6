"""minicme.py: the synthetic mini-CME suite.

    python -m pytest -q
"""
import inspect
import json
import os
import random
import re
import subprocess
import sys

import pytest
import sentencepiece as spm

import files
import minicme
from conftest import held_by_another_process, script_error
from errors import UserError
from minicme import SYNTHETIC_TASKS, make_suite
from tasks import CME_TASKS, chance_level, evaluate

# -----------------------------------------------------------------------------------------------
# the synthetic suite

SUITE_SIZES = dict(n_train_per_task=60, n_test_per_task=40, n_val_per_task=6, corpus_docs=600, vocab_size=800)


def _tree_bytes(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def mini_cme(tmp_path_factory):
    """The built-in demo's suite (default sizes, seed 0) and a small one with another seed."""
    root = tmp_path_factory.mktemp("suite")
    return root, {"default": make_suite(str(root / "default"), seed=0),
                  "small": make_suite(str(root / "small"), seed=1, **SUITE_SIZES)}


BOTH = pytest.mark.parametrize("which", ["default", "small"])


def test_suite_is_byte_identical_for_one_seed_and_different_for_another(tmp_path):
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        make_suite(str(tmp_path / name), seed=seed, **SUITE_SIZES)
    a, b, c = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b"), _tree_bytes(tmp_path / "c")
    assert set(a) == {"train.jsonl", "corpus.txt", "tokenizer.model", "suite.json", files.LOCK} | {
        os.path.join(split, f"{t}.jsonl") for t in SYNTHETIC_TASKS for split in ("val", "test")}
    assert a == b
    assert all(a[name] != c[name] for name in a if name not in ("tokenizer.model", files.LOCK))


def test_suite_is_byte_identical_under_any_hash_seed(tmp_path):
    """Sets of strings iterate in an order that PYTHONHASHSEED draws anew in every process: none may reach a file."""
    code = "import sys, minicme; minicme.make_suite(sys.argv[1], seed=0, **eval(sys.argv[2]))"
    here = os.path.dirname(os.path.abspath(minicme.__file__))
    for hash_seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / hash_seed), repr(SUITE_SIZES)], cwd=here,
                       env=dict(os.environ, PYTHONHASHSEED=hash_seed), check=True)
    assert _tree_bytes(tmp_path / "1") == _tree_bytes(tmp_path / "2")


@BOTH
def test_suite_has_every_task_in_every_split_with_string_fields(mini_cme, which):
    root, summaries = mini_cme
    folder, summary = root / which, summaries[which]
    assert len(SYNTHETIC_TASKS) >= 6 and not set(SYNTHETIC_TASKS) & set(CME_TASKS)  # train.py finds tasks by file name
    train = _read_jsonl(folder / "train.jsonl")
    val = [dict(r, task=t) for t in SYNTHETIC_TASKS for r in _read_jsonl(folder / "val" / f"{t}.jsonl")]
    switches = sum(a["task"] != b["task"] for a, b in zip(train, train[1:]))
    assert switches > len(train) / 2  # shuffled: the task changes from most records to the next
    for split, records in [("train", train), ("val", val)]:
        assert {t: sum(r["task"] == t for r in records) for t in SYNTHETIC_TASKS} == {
            t: summary["tasks"][t][split] for t in SYNTHETIC_TASKS}, split
        assert all(summary["tasks"][t][split] > 0 for t in SYNTHETIC_TASKS)
    for name, task in SYNTHETIC_TASKS.items():
        test = _read_jsonl(folder / "test" / f"{name}.jsonl")
        assert len(test) == summary["tasks"][name]["test"] > 0
        evaluation = test + [r for r in val if r["task"] == name]
        for r in evaluation + [r for r in train if r["task"] == name]:
            assert all(isinstance(r[k], str) for k in ("instruction", "input", "output")) and r["output"]
        if task.metric == "exact_match":  # evaluation records carry every alias
            assert all(r["answers"][0] == r["output"] and all(isinstance(a, str) for a in r["answers"])
                       for r in evaluation)
    with open(folder / "suite.json", encoding="utf-8") as f:
        assert json.load(f) == summary
    assert summary["train"] == len(train) and summary["val"] == len(val)


@BOTH
def test_suite_labels_are_the_task_labels_and_balanced(mini_cme, which):
    root, _ = mini_cme
    train = _read_jsonl(root / which / "train.jsonl")
    for name, task in SYNTHETIC_TASKS.items():
        if task.labels is None:
            continue
        for records in ([r for r in train if r["task"] == name], *(_read_jsonl(root / which / split / f"{name}.jsonl")
                                                                   for split in ("val", "test"))):
            counts = [sum(r["output"] == label for r in records) for label in task.labels]
            assert sum(counts) == len(records), name
            assert max(counts) - min(counts) <= 1, (name, counts)
            # the chance column of train.py's table: the majority label's share, 100 / labels up to one record
            assert chance_level(task, records) == pytest.approx(100 * max(counts) / len(records)), name
            assert chance_level(task, records) - 100 / len(task.labels) < 100 / len(records), name


def test_the_readmes_demo_table_shows_the_chance_levels_of_the_sets_the_demo_scores(mini_cme):
    """The chance column of the README's demo table (test_layout.py holds the lifts and averages to it) is what
    train.py prints for the default suite's test sets, cut to train.py's eval_limit as the demo scores them."""
    import evaluation
    import train
    root, _ = mini_cme
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"), encoding="utf-8") as f:
        readme = f.read()
    rows = [line.split() for line in readme[readme.index("```\ntask ") + 4:].split("\naverage")[0].splitlines()[1:]]
    sets = evaluation.load_eval_sets(dict(train.DEFAULTS, eval_dir=str(root / "default" / "test")))
    assert {row[0]: row[3] for row in rows} == {name: f"{chance_level(task, records):.1f}"
                                               for name, (task, records) in sets.items()}


def test_each_tasks_training_share_is_its_train_weight_and_every_eval_set_its_asked_size(mini_cme):
    """train.jsonl holds n_train_per_task times each task's TRAIN_WEIGHT of its records (the summaries fewer, the
    tasks decided by a word or two more); val and test hold exactly the sizes asked, whatever the task."""
    root, _ = mini_cme
    train = _read_jsonl(root / "small" / "train.jsonl")
    for name in SYNTHETIC_TASKS:
        want = round(SUITE_SIZES["n_train_per_task"] * minicme.TRAIN_WEIGHT[name])
        assert sum(r["task"] == name for r in train) == want, name
        for split, size in (("val", "n_val_per_task"), ("test", "n_test_per_task")):
            assert len(_read_jsonl(root / "small" / split / f"{name}.jsonl")) == SUITE_SIZES[size], (name, split)


def test_suite_gold_outputs_score_100_under_each_task_metric(mini_cme):
    root, _ = mini_cme
    for name, task in SYNTHETIC_TASKS.items():
        records = _read_jsonl(root / "default" / "test" / f"{name}.jsonl")
        assert evaluate(task, [r["output"] for r in records], records) == 100.0


@BOTH
def test_suite_qa_facts_are_taught_by_the_corpus_in_other_words_and_by_no_task(mini_cme, which):
    root, _ = mini_cme
    corpus = (root / which / "corpus.txt").read_text(encoding="utf-8")
    docs = corpus.split("\n\n")
    train = _read_jsonl(root / which / "train.jsonl")
    sentences = [s for r in train for s in re.split(r"(?<=[.?!])\s+|\n", r["input"] + "\n" + r["output"])]
    for r in _read_jsonl(root / which / "test" / "qa.jsonl"):
        # the entity is the longest run of capitalised words after the question word
        entity = max((m.group() for m in re.finditer(r"[A-Z]\w+(?: [A-Z]\w+)*", r["instruction"])
                      if m.start() > 0), key=len)
        e, a = re.escape(entity), re.escape(r["output"])
        states = re.compile(rf"\b{e}\b.*\b{a}\b|\b{a}\b.*\b{e}\b")
        assert any(states.search(d) for d in docs), r  # the corpus states the fact ...
        assert r["instruction"] not in corpus  # ... never in the question's words ...
        assert not any(states.search(s) for s in sentences if entity in s and r["output"] in s), r  # ... nor a task


def _item(record):
    """A record's item as a reader of our own sees it: the texts of its input (the question, for QA), labels ("Text 1:",
    "Option A:") and order aside, case and spacing aside. The instruction is one of the task's phrasings: the same
    two questions under another phrasing, or asked the other way round, are the same paraphrase item."""
    fields = re.split(r"(?:^|\n)(?:Text \d|Sentence \d?|Option [AB]|Question|Choices): ", record["input"]) \
        if record["input"] else [record["instruction"]]
    return frozenset(re.sub(r"\s+", " ", f).strip().lower() for f in fields if f)


def test_make_suites_item_sets_labels_order_case_and_spacing_aside():
    """What make_suite keeps val and test records apart by: two questions relabelled, swapped, in other case and
    spacing are one item (a reader would call them the same), another question is another item."""
    item = minicme._item
    asked = {"instruction": "Are these two questions duplicates?",
             "input": "Text 1: Is Bo a painter?\nText 2: What does Bo do?"}
    again = {"instruction": "Do both ask the same?",
             "input": "Question 2:  what does  BO do?\nQuestion 1: IS BO A PAINTER?"}
    other = {"instruction": asked["instruction"], "input": "Text 1: Is Bo a painter?\nText 2: Where does Bo live?"}
    assert item(asked) == item(again) == _item(asked) and item(other) != item(asked)
    qa = {"instruction": "Where does Bo live?", "input": ""}  # QA's question is its instruction
    assert item(qa) == item({"instruction": "WHERE does bo live?", "input": ""}) != item(other)


@BOTH
def test_suite_validation_and_test_items_never_repeat_a_training_item_or_each_other(mini_cme, which):
    """By item, not by prompt: the demo's suite had 42 of its 150 paraphrase test records' inputs in train.jsonl under
    another instruction (and 17 more with the two questions swapped); on test and val together the demo's adapter
    got 99% of the first kind right and 93% of the second, against 80% of the rest."""
    root, summaries = mini_cme
    train = _read_jsonl(root / which / "train.jsonl")
    for name in SYNTHETIC_TASKS:
        seen = {_item(r) for r in train if r["task"] == name}
        val, test = ([_item(r) for r in _read_jsonl(root / which / split / f"{name}.jsonl")]
                     for split in ("val", "test"))
        for items in (val, test):
            assert len(set(items)) == len(items) and not seen & set(items), name
        assert not set(val) & set(test), name
    if which == "default":  # enough validation records per task to choose a learning rate on
        assert all(summaries[which]["tasks"][t]["val"] >= 100 for t in SYNTHETIC_TASKS)


@pytest.mark.parametrize("name", list(SYNTHETIC_TASKS))
def test_each_task_generator_is_deterministic_by_seed(name):
    world = minicme.build_world(0)
    draw = lambda seed: [minicme._GENERATORS[name](world, random.Random(seed), i, "train") for i in range(20)]
    assert draw(5) == draw(5) and draw(5) != draw(6)


@BOTH
def test_suite_tokenizer_is_llama_like_and_every_record_fits_a_256_token_context(mini_cme, which):
    root, summaries = mini_cme
    sp = spm.SentencePieceProcessor(model_file=str(root / which / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.vocab_size() == summaries[which]["vocab_size"]
    text = "Zürich  2024 ☃\n\nnaïve "  # runs of spaces and a trailing one kept, as LLaMA's tokenizer keeps them
    assert sp.unk_id() not in sp.encode(text) and sp.decode(sp.encode(text)) == text  # byte fallback
    digits = [p for p in sp.encode("released in 1985, 2024 or 19999", out_type=str) if any(map(str.isdigit, p))]
    assert digits and all(sum(map(str.isdigit, p)) == 1 for p in digits), digits  # split digits, as LLaMA's
    records = _read_jsonl(root / which / "train.jsonl")
    for name in SYNTHETIC_TASKS:
        records += [dict(r, task=name) for split in ("val", "test")
                    for r in _read_jsonl(root / which / split / f"{name}.jsonl")]
    for r in records:
        prompt = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
        output = len(sp.encode(r["output"])) + 1  # + EOS
        assert 1 + len(sp.encode(prompt)) + 1 + output < 256, r  # BOS prompt EOS output EOS
        assert output <= SYNTHETIC_TASKS[r["task"]].max_new_tokens, r


def test_qa_accepts_a_directors_surname_a_rivers_name_with_river_and_a_genre_with_film(mini_cme):
    """The aliases exact match accepts, checked by scoring them: "Vitasis" for "Kelemis Vitasis",
    "Lomira river" for "Lomira", "western film" for "western"."""
    root, _ = mini_cme
    world, qa = minicme.build_world(0), SYNTHETIC_TASKS["qa"]
    records = _read_jsonl(root / "default" / "test" / "qa.jsonl")
    kinds = {"director": lambda v: v.split()[-1], "river": lambda v: f"{v} river", "genre": lambda v: f"{v} film"}
    for attr, alias in kinds.items():
        asked = [r for r in records if r["output"] in world["pools"][attr]]
        assert asked, attr
        assert evaluate(qa, [alias(r["output"]) for r in asked], asked) == 100.0, attr


_CUT_SHORT = """
import os, sys, data, minicme
real = data.write_atomic
def write(path, content):  # Ctrl-C half-way through writing test/qa.jsonl: val/ is written, test/ in part
    def half(f):
        f.write(content[:100].encode())
        raise KeyboardInterrupt
    real(path, half if path.endswith(os.path.join("test", "qa.jsonl")) else content)
data.write_atomic = write
minicme.make_suite(sys.argv[1], seed=0, **eval(sys.argv[2]))
"""


def test_an_interrupted_build_does_not_look_complete_and_the_next_build_finishes_it(tmp_path):
    """suite.json, written last, marks a complete suite: a build stopped by Ctrl-C half-way through its writes leaves
    none, and building into that folder again completes it, byte for byte as a build in a fresh folder, without the
    temporary file that the stopped write left (it stayed in test/, beside the evaluation sets)."""
    stopped = subprocess.run([sys.executable, "-c", _CUT_SHORT, str(tmp_path / "a"), repr(SUITE_SIZES)],
                             cwd=os.path.dirname(os.path.abspath(minicme.__file__)), capture_output=True, text=True)
    assert "KeyboardInterrupt" in stopped.stderr, stopped.stderr
    assert not (tmp_path / "a" / "suite.json").exists() and (tmp_path / "a" / minicme.BUILDING).exists()
    assert any(".tmp" in name for name in _tree(tmp_path / "a")), _tree(tmp_path / "a").keys()
    make_suite(str(tmp_path / "a"), seed=0, **SUITE_SIZES)
    make_suite(str(tmp_path / "b"), seed=0, **SUITE_SIZES)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b") and "suite.json" in _tree(tmp_path / "a")


def test_a_second_build_into_a_folder_being_built_is_refused_and_changes_nothing(tmp_path):
    """Two builds into one folder at once (two first runs of the demo, or two minicme.py) wrote over each other: the
    suite ended with one seed's files, or a mix, while the other build said it had written its own, and a late one
    failed on a bare "No such file or directory (.building)". The build that writes holds the folder (files.hold)."""
    folder = tmp_path / "suite"
    live = held_by_another_process(folder)  # a build of another process, writing now
    try:
        (folder / minicme.BUILDING).write_text("")
        with pytest.raises(UserError, match=rf"^{re.escape(str(folder))} is being built by process {live.pid}; wait"):
            make_suite(str(folder), seed=1, **SUITE_SIZES)
        assert sorted(p.name for p in folder.iterdir()) == sorted([files.LOCK, minicme.BUILDING])
    finally:
        live.kill()
        live.wait()
    make_suite(str(folder), seed=1, **SUITE_SIZES)  # that build is gone: its folder is taken up and finished
    assert (folder / "suite.json").exists() and not (folder / minicme.BUILDING).exists()


def test_a_build_that_a_finished_build_overtook_is_refused_and_keeps_that_suite(tmp_path, monkeypatch):
    """Both builds passed the first check of an empty folder; the one that ends first writes its suite, and the
    other, once it holds the folder, finds it there and is refused rather than writing its own over it."""
    real, folder = minicme._train_tokenizer, tmp_path / "suite"

    def overtaken(lines, vocab_size):  # while this build trains its tokenizer, another builds the whole suite
        monkeypatch.setattr(minicme, "_train_tokenizer", real)
        make_suite(str(folder), seed=0, **SUITE_SIZES)
        return real(lines, vocab_size)
    monkeypatch.setattr(minicme, "_train_tokenizer", overtaken)
    with pytest.raises(UserError, match="already holds a mini-CME suite"):
        make_suite(str(folder), seed=1, **SUITE_SIZES)
    make_suite(str(tmp_path / "fresh"), seed=0, **SUITE_SIZES)
    assert _tree(folder) == _tree(tmp_path / "fresh")


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_make_suite_overwrites_nothing(tmp_path):
    """Not a finished suite (nor what was built from it), not a user's files, not a file given as the folder."""
    make_suite(str(tmp_path / "suite"), seed=0, **SUITE_SIZES)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.jsonl").write_text("my own records\n")
    (tmp_path / "file").write_text("a file\n")
    before = {name: _tree(tmp_path / name) for name in ("suite", "mine")}
    for name, message in (("suite", "already holds a mini-CME suite; choose another folder"),
                          ("mine", "already holds files that are not a mini-CME suite \\(train.jsonl\\)"),
                          ("file", "is a file, not a folder")):
        with pytest.raises(UserError, match=message):
            make_suite(str(tmp_path / name), seed=1, **SUITE_SIZES)
    assert {name: _tree(tmp_path / name) for name in ("suite", "mine")} == before
    assert (tmp_path / "file").read_text() == "a file\n"


def test_a_building_mark_among_a_users_files_does_not_make_their_folder_a_build_to_finish(tmp_path):
    """A folder holding .building was taken up as a build cut short whatever else it held: the user's train.jsonl was
    written over and their .building removed. A build cut short holds only what make_suite writes."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, text in ((minicme.BUILDING, "my build tool's mark\n"), ("train.jsonl", "my records\n"),
                       ("notes.txt", "mine\n")):
        (folder / name).write_text(text)
    before = _tree(folder)
    with pytest.raises(UserError, match=r"mine already holds files that are not a mini-CME suite \(notes.txt\); "):
        make_suite(str(folder), seed=0, **SUITE_SIZES)
    assert _tree(folder) == before


def test_a_folder_that_cannot_be_written_is_one_sentence_before_the_suite_is_built(tmp_path, capsys, monkeypatch,
                                                                                 read_only):
    """A read-only folder, or a new one in a read-only folder, is named with its fix (it was a bare "[Errno 13]
    Permission denied: 'suite/.building.tmp123'")."""
    (tmp_path / "locked").mkdir()
    read_only(tmp_path / "locked")
    monkeypatch.setattr(minicme, "write_atomic", lambda *a: pytest.fail("written before the refusal"))
    for out in (tmp_path / "locked", tmp_path / "locked" / "suite"):
        assert script_error(minicme.main, ["--out", out], capsys) == (
            f"minicme.py: error: {out} can not be written: {tmp_path / 'locked'} is not writable (Permission denied); "
            "choose another folder for the suite.")
    assert not os.listdir(tmp_path / "locked")


@pytest.mark.parametrize("size", [dict(n_test_per_task=0), dict(n_val_per_task=-1), dict(n_train_per_task=1.5),
                                  dict(n_val_per_task=True), dict(vocab_size=0)])
def test_make_suite_refuses_sizes_that_are_not_positive_integers_before_writing_anything(tmp_path, size):
    """0 wrote empty val or test sets (and -1 too): train.py scored them as nothing, or refused them later."""
    key, value = next(iter(size.items()))
    with pytest.raises(UserError, match=rf"^{key}={value} is not a positive number; give each size as a positive"):
        make_suite(str(tmp_path / "suite"), **size)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("seed", [0.0, "0", True, None])
def test_make_suite_refuses_a_seed_that_is_not_an_integer_before_writing_anything(tmp_path, seed):
    """The world is drawn from the seed's text: seed=0.0 built another world than seed=0 without a word."""
    with pytest.raises(UserError, match=rf"^seed={re.escape(repr(seed))} is not an integer; give the suite's seed"):
        make_suite(str(tmp_path / "suite"), seed=seed)
    assert not os.listdir(tmp_path)


def test_make_suite_refuses_a_corpus_too_small_for_its_world(tmp_path):
    with pytest.raises(ValueError, match="corpus_docs=10 is too small; use at least"):
        make_suite(str(tmp_path), corpus_docs=10)
    assert not os.listdir(tmp_path)


def _no_tokenizer(monkeypatch):
    """Sizes and records are what these tests read: SentencePiece's minute is spared (its file holds no model)."""
    monkeypatch.setattr(minicme, "_train_tokenizer", lambda lines, vocab_size: b"")


@pytest.mark.parametrize("key", ["n_train_per_task", "n_test_per_task", "n_val_per_task", "corpus_docs", "vocab_size"])
def test_make_suite_refuses_a_huge_size_at_once_not_after_filling_the_memory(tmp_path, monkeypatch, key):
    """n_test_per_task=10**9 (a typo's extra zeros) drew records until the memory ran out, with no message."""
    monkeypatch.setattr(minicme, "_GENERATORS", {name: lambda *a: pytest.fail("drew records before the refusal")
                                                 for name in minicme._GENERATORS})
    with pytest.raises(UserError, match=rf"^{key}=1000000000 is more than mini-CME is made for; give at most \d+\.$"):
        make_suite(str(tmp_path / "suite"), **{key: 10**9})
    assert not os.listdir(tmp_path)


def test_make_suite_refuses_a_corpus_size_that_is_not_a_number_in_one_sentence(tmp_path):
    """corpus_docs="6000" was a TypeError traceback from comparing it with the world's size."""
    with pytest.raises(UserError, match=r"^corpus_docs='6000' is not a positive number; give each size as a positive"):
        make_suite(str(tmp_path / "suite"), corpus_docs="6000")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("seed, n", [(-1, 1), (2**70, 2), (7, 3)])
def test_every_task_has_training_records_and_balanced_sets_at_the_smallest_sizes(tmp_path, monkeypatch, seed, n):
    """n_train_per_task=1 gave the summaries round(0.3) = 0 training records: a task the suite names and never
    trains. Each task gets its TRAIN_WEIGHT share, rounded, and at least one record; the odd evaluation sizes are
    met exactly, their labels as balanced as the size allows, their items new (any seed, negative or huge)."""
    _no_tokenizer(monkeypatch)
    summary = make_suite(str(tmp_path / "suite"), seed=seed, n_train_per_task=n, n_test_per_task=2 * n + 1,
                         n_val_per_task=n + 2, corpus_docs=400)
    train = _read_jsonl(tmp_path / "suite" / "train.jsonl")
    for name, task in SYNTHETIC_TASKS.items():
        want = max(1, round(n * minicme.TRAIN_WEIGHT[name]))
        assert sum(r["task"] == name for r in train) == summary["tasks"][name]["train"] == want, name
        seen = {_item(r) for r in train if r["task"] == name}
        for split, size in (("test", 2 * n + 1), ("val", n + 2)):
            records = _read_jsonl(tmp_path / "suite" / split / f"{name}.jsonl")
            assert len({_item(r) for r in records} - seen) == len(records) == size, (name, split)
            seen |= {_item(r) for r in records}
            counts = [sum(r["output"] == label for r in records) for label in task.labels or ()]
            assert not counts or (sum(counts) == size and max(counts) - min(counts) <= 1), (name, split, counts)


def _held_questions(seed):
    """Every QA question that val and test may ask: the world's questions of its held-out facts."""
    w = minicme.build_world(seed)
    return {q for e in w["entities"] for a in minicme.ATTRS[e["kind"]] if (e["name"], a) in w["held"]
            for q in minicme._questions(e, a)}


@pytest.mark.parametrize("split", ["test", "val"])
def test_evaluation_sets_larger_than_the_world_allows_are_refused_not_filled_with_repeats(tmp_path, monkeypatch, split):
    """A QA evaluation item is a question on a held-out fact, and the world has only so many: asking for more, in test
    or in val and test together, put repeated items in the set (each scored as a new one) after 100 draws. Now it is
    one sentence before anything is written."""
    _no_tokenizer(monkeypatch)
    limit = len(_held_questions(2))
    sizes = dict(n_test_per_task=limit + 1, n_val_per_task=1) if split == "test" else \
        dict(n_test_per_task=limit // 2, n_val_per_task=limit - limit // 2 + 1)
    with pytest.raises(UserError, match=rf"^n_{split}_per_task={sizes[f'n_{split}_per_task']} asks for more qa items "
                                        r"than mini-CME's world has that no .* holds \(it ran out after \d+\); ask"):
        make_suite(str(tmp_path / "suite"), seed=2, n_train_per_task=1, corpus_docs=400, **sizes)
    assert not os.listdir(tmp_path)


def test_a_vocab_size_too_small_for_the_text_names_the_least_that_builds(tmp_path):
    """It said "lower vocab_size or raise corpus_docs" (the fix for too large a one) after SentencePiece's own
    multi-line message; the least it names builds, and one piece fewer is refused."""
    sizes = dict(n_train_per_task=1, n_test_per_task=1, n_val_per_task=1, corpus_docs=400)
    with pytest.raises(UserError, match=r"^vocab_size=300 is too small for the suite's text; use at least (\d+) ") as e:
        make_suite(str(tmp_path / "small"), vocab_size=300, **sizes)
    least = int(re.search(r"at least (\d+)", str(e.value)).group(1))
    with pytest.raises(UserError, match=rf"^vocab_size={least - 1} is too small for the suite's text; use at least "
                                        rf"{least} "):
        make_suite(str(tmp_path / "one_short"), vocab_size=least - 1, **sizes)
    assert not os.listdir(tmp_path)
    make_suite(str(tmp_path / "least"), vocab_size=least, **sizes)
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "least" / "tokenizer.model")).vocab_size() == least
    with pytest.raises(UserError, match=r"^vocab_size=90000 is more pieces than SentencePiece can find in the suite's "
                                        r"text \(at most \d+\); lower vocab_size or raise corpus_docs\.$"):
        make_suite(str(tmp_path / "large"), vocab_size=90000, **sizes)


# -----------------------------------------------------------------------------------------------
# the redesigned decisions: what each label rests on, checked item by item

def _draw(name, n=300, seed=7):
    world = minicme.build_world(0)
    rng = random.Random(seed)
    return world, [minicme._GENERATORS[name](world, rng, i, "train") for i in range(n)]


def test_every_task_draws_its_instruction_from_all_of_its_phrasings():
    """The synthetic suite samples each kind's phrasings (a CME evaluation set uses its first alone): over many
    records, every phrasing of each task's kind is an instruction, and no other text is."""
    for name in (n for n in minicme._GENERATORS if n != "qa"):  # qa's instruction is its question
        _, records = _draw(name)
        phrasings = set(minicme.TEMPLATES[name][0])
        assert {r["instruction"] for r in records} == phrasings, name


def test_a_summary_posts_city_is_never_the_one_its_film_was_shot_in():
    """The post's city gives no hint of where the film was shot (a fact a qa or blank item may ask)."""
    world, records = _draw("summary", n=400)
    shot = {f["name"]: f["city"] for f in world["films"]}
    seen = 0
    for r in records:
        if m := re.fullmatch(r"Saw (.+) with my \w+ in (.+) and (loved it|did not like it)\.", r["output"]):
            seen += 1
            assert m.group(1) in shot and m.group(2) != shot[m.group(1)], r
    assert seen > 100  # about half the posts are of a film


def test_blank_answer_is_the_person_the_consequence_points_to():
    rng = random.Random(0)
    for word, does_more, does_less in minicme.COMPARISONS:
        for _ in range(20):
            sentence, meant = minicme._compare(rng, "Ana", "Bo")
            if f"is {word} than" in sentence:
                assert meant == ("Ana" if does_more in sentence else "Bo"), sentence
                assert (does_more in sentence) != (does_less in sentence)
    _, records = _draw("blank")
    in_order = 0
    for r in records:
        sentence, a, b = re.match(r"Sentence: '(.*)'\nOption A: '(.*)'\nOption B: '(.*)'", r["input"]).groups()
        first, second = re.match(r"(\w+) is \w+ than (\w+), so _", sentence).groups()
        more = any(c[1] in sentence for c in minicme.COMPARISONS)
        assert {a, b} == {first, second}
        assert (a if r["output"] == "A" else b) == (first if more else second), r
        in_order += (a, b) == (first, second)
    assert 0.75 < in_order / len(records) < 0.95  # some items list the options out of order: headroom


def test_nli_shallow_cues_only_ever_mark_their_own_label():
    _, records = _draw("nli")
    labels = {}
    for r in records:
        hypothesis = r["input"].split("\nSentence 2: ")[1]
        negated = hypothesis.startswith("It is not true that")
        added = any(t.format(e="")[1:] in hypothesis for ts in minicme.EXTRAS.values() for t in ts)
        labels.setdefault((negated, added), set()).add(r["output"])
    assert labels[(True, False)] == {"contradiction"} and labels[(False, True)] == {"neutral"}
    assert labels[(False, False)] == {"entailment", "neutral", "contradiction"}  # the rest needs the premise
    assert (True, True) not in labels


def test_paraphrase_near_misses_are_never_duplicates_and_duplicates_ask_the_same_entity():
    world, records = _draw("paraphrase")
    near = {t.format(e=e["name"]) for e in world["entities"] for t in minicme.NEAR_MISSES[e["kind"]]}
    kinds = []
    for r in records:
        q1, q2 = re.match(r"Text 1: (.*)\nText 2: (.*)", r["input"]).groups()
        names = [e["name"] for e in world["entities"] if e["name"] in q1]
        is_near = q2 in near and any(n in q2 for n in names)
        if r["output"] == "duplicate":
            assert not is_near and any(n in q2 for n in names), r
        kinds.append((r["output"], is_near))
    assert set(kinds) == {("duplicate", False), ("not duplicate", True), ("not duplicate", False)}
    near_share = kinds.count(("not duplicate", True)) / (len(kinds) - kinds.count(("duplicate", False)))
    assert abs(near_share - minicme.NEAR_MISS_SHARE) < 0.1, near_share


def test_choice_type_distractors_never_name_a_fact_of_the_question_or_each_other():
    world, records = _draw("choice")
    for r in records:
        options = re.split(r", (?=[B-D]\.)", r["input"].split("\nChoices: ")[1])
        values = [o[2:] for o in options]
        assert len(set(values)) == 4 and "ABCD".index(r["output"]) in range(4)
        named = [e for e in world["entities"] if e["name"] in r["input"].split("\nChoices: ")[0]]
        for x in values:
            for y in values + [e["name"] for e in named]:
                if x != y and x != values["ABCD".index(r["output"])]:
                    assert x not in minicme._facts(world, y) and y not in minicme._facts(world, x), r


def _choice_parts(world, record):
    """(the question's attribute, each option's slot in minicme.SLOTS) of a choice record."""
    question, choices = re.match(r"Question: (.*)\nChoices: (.*)", record["input"]).groups()
    attrs = {a for kind in minicme.ATTRS.values() for a, (_, questions) in kind.items() for q in questions
             if re.fullmatch(re.escape(q).replace(re.escape("{e}"), ".+"), question)}
    assert len(attrs) == 1, question
    slot = {v: i for i, group in enumerate(minicme.SLOTS) for k in group for v in world["pools"][k]}
    return attrs.pop(), [slot[o[2:]] for o in re.split(r", (?=[B-D]\.)", choices)]


def test_choice_forms_let_the_question_decide_the_letter_and_the_rest_need_the_list():
    """In a form (one option per slot, in the slots' order) the letter is the slot of the
    question's kind; in the other items a reader of the question alone is right only by chance."""
    world, records = _draw("choice", n=1200)
    forms = hits = others = 0
    for r in records:
        attr, slots = _choice_parts(world, r)
        asked = next(i for i, group in enumerate(minicme.SLOTS) if attr in group)
        if slots == [0, 1, 2, 3]:
            forms += 1
            assert r["output"] == "ABCD"[asked], r
        else:
            others += 1
            hits += r["output"] == "ABCD"[asked]
    assert abs(forms / len(records) - 0.6) < 0.05, forms  # six in ten, as gen_choice says
    assert hits / others < 0.35, (hits, others)
    assert sorted({r["output"] for r in records}) == list("ABCD")


def test_corpus_uses_every_label_word_and_letter_in_plain_prose(mini_cme):
    """Without it the base never sees the answer tokens, and adapters cannot lift their logits."""
    root, _ = mini_cme
    corpus = (root / "default" / "corpus.txt").read_text(encoding="utf-8")
    for task in SYNTHETIC_TASKS.values():
        for label in task.labels or ():
            word = label.split()[-1]
            assert re.search(rf"(?<![\w.])\b{word}\b(?!\.\w)", corpus), (task.name, word)


def test_a_redesigned_task_rises_above_chance_after_a_few_dozen_full_fine_tuning_steps(run_data, tmp_path):
    """The blank task's decision is learnable: full fine-tuning of the tests' tiny base on blank
    records alone, through train.py, answers fresh validation items well above chance (50%)."""
    import train
    from conftest import train_cfg
    from data import prepare, write_jsonl

    world = minicme.build_world(0)
    rng = random.Random(1)
    write_jsonl(str(tmp_path / "blank.jsonl"), [minicme.gen_blank(world, rng, i, "train") for i in range(600)])
    rng = random.Random(2)
    write_jsonl(str(tmp_path / "val" / "blank.jsonl"), [minicme.gen_blank(world, rng, i, "val") for i in range(100)])
    prepare([str(tmp_path / "blank.jsonl")], str(run_data / "tokenizer.model"), str(tmp_path / "tokens"), max_len=128,
            val_fraction=0.05, quiet=True)
    out = train.train(train_cfg(run_data, tmp_path / "run", "--adapter=none", f"--init_from={run_data / 'base.pt'}",
                                f"--data_dir={tmp_path / 'tokens'}", f"--eval_dir={tmp_path / 'val'}",
                                "--batch_size=32", "--max_iters=60", "--eval_interval=60", "--eval_limit=100",
                                "--learning_rate=3e-3", "--warmup_iters=5"))
    assert out["scores"]["blank"] >= 65.0, out["scores"]


# -----------------------------------------------------------------------------------------------
# what the world holds out, and labels and answers recomputed from the world by a reader of our own


def test_world_splits_its_facts_into_held_out_and_training_ones_and_differs_by_seed():
    """Every fact is either held out (asked by val and test, stated only in the corpus) or a
    training fact, never both; every invented name is new: the blank task's story names are no world name (eight
    worlds: a name drawn without the others in view collides in about one world in two). The people whose job is
    film director are exactly those who direct the films."""
    for seed in range(8):
        w = minicme.build_world(seed)
        directors = {f["director"] for f in w["films"]}
        assert directors == set(w["pools"]["director"]) == {p["name"] for p in w["entities"]
                                                             if p.get("job") == "film director"}
        every = {(e["name"], a) for e in w["entities"] for a in minicme.ATTRS[e["kind"]]}
        train = w["facts"]["train"]
        assert len(set(train)) == len(train) and not set(train) & w["held"] and set(train) | w["held"] == every
        assert set(w["facts"]["val"]) == set(w["facts"]["test"]) == w["held"]
        assert abs(len(w["held"]) - minicme.HELD_OUT * len(every)) < 1
        names = [e["name"] for e in w["entities"]]
        assert len(set(names)) == len(names) == len(w["by_name"])
        invented = [part for e in w["entities"] if e["kind"] == "person" for part in e["name"].split()]
        invented += w["cities"] + w["pools"]["region"] + w["pools"]["river"] + w["story_names"]
        assert len(set(invented)) == len(invented)  # no two people share a first name, no story name is a world name
    assert minicme.build_world(0) == minicme.build_world(0)
    assert minicme.build_world(0)["entities"] != minicme.build_world(1)["entities"]
    assert minicme.build_world(0)["held"] != minicme.build_world(1)["held"]


def _asked(w):
    """question -> (entity name, attribute) for every question the world's templates can ask."""
    return {q: (e["name"], a) for e in w["entities"] for a in minicme.ATTRS[e["kind"]]
            for q in minicme._questions(e, a)}


@BOTH
def test_suite_qa_and_choice_evaluation_sets_ask_only_held_out_facts_and_answer_them_truly(mini_cme, which):
    """Validation as well as test: a learning rate chosen on facts the training records state would
    be chosen on memorisation. Training records ask only training facts."""
    root, summaries = mini_cme
    assert summaries[which]["seed"] == {"default": 0, "small": 1}[which]  # suite.json names the seed it was built from
    w = minicme.build_world(summaries[which]["seed"])
    asked = _asked(w)
    train = _read_jsonl(root / which / "train.jsonl")
    for split in ("train", "val", "test"):
        records = {t: [r for r in train if r["task"] == t] if split == "train" else
                   _read_jsonl(root / which / split / f"{t}.jsonl") for t in ("qa", "choice")}
        for r in records["qa"]:
            name, attr = asked[r["instruction"]]
            assert r["output"] == w["by_name"][name][attr] and ((name, attr) in w["held"]) == (split != "train"), r
        for r in records["choice"]:
            question, choices = re.match(r"Question: (.*)\nChoices: (.*)", r["input"]).groups()
            name, attr = asked[question]
            options = dict(o.split(".", 1) for o in re.split(r", (?=[B-D]\.)", choices))
            assert options[r["output"]] == w["by_name"][name][attr], r
            assert len({o.strip() for o in options.values()}) == 4, r  # no distractor repeats the answer or another
            assert ((name, attr) in w["held"]) == (split != "train"), r


def test_test_sets_do_not_depend_on_the_validation_size(mini_cme, tmp_path):
    """Growing the validation sets (to choose learning rates more finely) leaves the test sets and
    the training records as they were, so scores stay comparable."""
    root, _ = mini_cme
    make_suite(str(tmp_path / "more_val"), seed=1, **dict(SUITE_SIZES, n_val_per_task=25))
    for name in ["train.jsonl"] + [f"test/{t}.jsonl" for t in SYNTHETIC_TASKS]:
        assert (tmp_path / "more_val" / name).read_bytes() == (root / "small" / name).read_bytes(), name


def test_the_smallest_corpus_make_suite_accepts_states_every_fact_of_the_world(tmp_path):
    with pytest.raises(UserError, match=r"use at least (\d+)") as refused:
        make_suite(str(tmp_path / "tiny"), corpus_docs=10)
    least = int(re.search(r"at least (\d+)", str(refused.value)).group(1))
    with pytest.raises(UserError, match="too small"):
        make_suite(str(tmp_path / "one_short"), corpus_docs=least - 1)
    make_suite(str(tmp_path / "least"), seed=0, **dict(SUITE_SIZES, corpus_docs=least))
    corpus = (tmp_path / "least" / "corpus.txt").read_text(encoding="utf-8")
    w = minicme.build_world(0)
    for e in w["entities"]:
        for attr in minicme.ATTRS[e["kind"]]:
            assert any(s in corpus for s in minicme._statements(e, attr)), (e["name"], attr)


def _polarity(sentences):
    """+1 or -1: what most opinion sentences say ("The music was not dull at all." is +1), by our own reading."""
    votes = []
    for s in sentences:
        words = set(re.findall(r"\w+", s.lower()))
        good, bad = words & set(minicme.GOOD), words & set(minicme.BAD)
        if "loved" in words or "stand" in words:
            votes.append(1 if "loved" in words else -1)
        elif good or bad:
            votes.append((1 if good else -1) * (-1 if "not" in words else 1))
    assert len(votes) == 3, sentences
    return 1 if sum(votes) > 0 else -1


def _sentences(text):
    return re.split(r"(?<=[.?!])\s+|<br /><br />", text)


def _post_polarity(w, post):
    """A post's polarity, and that its film was not shot in the city it names (no hint at that fact)."""
    seen = re.search(r"went to see (.+?) with my \w+ \w+ in (\w+)\.", post)
    if seen:
        assert w["by_name"][seen.group(1)]["city"] != seen.group(2), post
        return _polarity(_sentences(post.split(f"in {seen.group(2)}. ", 1)[1]))
    feelings = [s for s in _sentences(post) if s in minicme.FEELINGS[0] + minicme.FEELINGS[1]]
    assert len(feelings) == 2, post
    return 1 if all(s in minicme.FEELINGS[0] for s in feelings) else -1


def _summary_polarity(summary):
    return -1 if re.search(r"did not like it|feel lonely", summary) else 1


def test_sentiment_labels_summaries_and_corpus_verdicts_follow_most_opinions():
    """A review's label, a post's summary, and the verdict or TL;DR line of the corpus's reviews and
    posts all agree with most of the opinions written before them."""
    w, reviews = _draw("sentiment")
    mixed = 0
    for r in reviews:
        opinions = _sentences(r["input"])[-3:]
        assert _polarity(opinions) == (1 if r["output"] == "positive" else -1), r
        mixed += len({_polarity([s] * 3) for s in opinions}) == 2
    assert 0 < mixed < len(reviews)  # some reviews need all three opinions weighed
    for r in _draw("summary")[1]:
        assert _post_polarity(w, r["input"]) == _summary_polarity(r["output"]), r
    verdicts = tldrs = 0
    for doc in minicme._corpus(w, random.Random(3), 2 * len(w["entities"])):
        if " TL;DR: " in doc:
            post, summary = doc.split(" TL;DR: ")
            assert _post_polarity(w, post) == _summary_polarity(summary), doc
            tldrs += 1
        elif any(doc.endswith(v) for v in minicme.VERDICTS[0] + minicme.VERDICTS[1]):
            *text, verdict = _sentences(doc)
            assert _polarity(text[-3:]) == (-1 if re.search(r"\bnot\b", verdict, re.I) else 1), doc
            verdicts += 1
    assert verdicts > 0 and tldrs > 0  # both kinds of ending reach the corpus


def _statement_parser(w):
    """sentence -> (entity, attribute, value) for every statement the world's templates can make."""
    patterns = [(kind, attr, re.compile(re.escape(t).replace(re.escape("{e}"), "(?P<e>.+)")
                                        .replace(re.escape("{v}"), "(?P<v>.+)")))
                for kind, attrs in minicme.ATTRS.items() for attr, (templates, _) in attrs.items() for t in templates]

    def parse(sentence):
        found = {(m["e"], attr, m["v"]) for kind, attr, p in patterns for m in [p.fullmatch(sentence)]
                 if m and m["e"] in w["by_name"] and w["by_name"][m["e"]]["kind"] == kind
                 and m["v"] in w["pools"][attr]}
        assert len(found) == 1, (sentence, found)
        return found.pop()
    return parse


def test_nli_labels_follow_from_what_the_premise_states():
    """Recomputed by a reader of our own: a hypothesis adding something the world never records, or
    speaking of a fact the premise does not state, is neutral; one about a stated fact is entailment
    when it holds (a negation flips it) and contradiction when it does not."""
    w, records = _draw("nli", n=1500)
    parse = _statement_parser(w)
    extras = [t for ts in minicme.EXTRAS.values() for t in ts]
    for r in records:
        premise, hypothesis = re.match(r"Sentence 1: (.*)\nSentence 2: (.*)", r["input"]).groups()
        stated = []
        for s in re.split(r"(?<=\.) ", premise):
            e, attr, v = parse(s)
            assert w["by_name"][e][attr] == v, s  # premises state true facts
            stated.append((e, attr))
        about = [e for e, _ in stated]  # two facts of one entity, and perhaps one of another (a distractor)
        assert len(set(stated)) == len(stated) and sorted(map(about.count, set(about))) in ([2], [1, 2]), r
        if any(re.fullmatch(re.escape(t).replace(re.escape("{e}"), ".+"), hypothesis) for t in extras):
            expected = "neutral"
        else:
            negated = hypothesis.startswith("It is not true that ")
            claim = hypothesis[len("It is not true that "):] if negated else hypothesis
            e, attr, v = parse(claim[0].upper() + claim[1:])
            holds = (w["by_name"][e][attr] == v) != negated
            expected = ("entailment" if holds else "contradiction") if (e, attr) in stated else "neutral"
        assert r["output"] == expected, r


def test_a_distractor_naming_a_director_never_decides_a_neutral_hypothesis_on_his_job():
    """ "The Frozen Island was directed by P" tells P's job: beside P's own facts it made "By trade, P is a lawyer."
    neutral where the premise contradicts it (once in 30 worlds of 6,400 training records; here a world of one
    director and his one film, whose only stated fact is its director, makes it common)."""
    w = minicme.build_world(0)
    person = next(p for p in w["entities"] if p.get("job") == "film director")
    film = next(f for f in w["films"] if f["director"] == person["name"])
    w = dict(w, entities=[person, film], held={(film["name"], a) for a in ("year", "genre", "city")})
    parse, rng = _statement_parser(w), random.Random(0)
    extras = [t.format(e=person["name"]) for t in minicme.EXTRAS["person"]]
    told = 0
    for i in range(600):
        r = minicme.gen_nli(w, rng, i, "train")
        premise, hypothesis = re.match(r"Sentence 1: (.*)\nSentence 2: (.*)", r["input"]).groups()
        tells_job = (film["name"], "director", person["name"]) in [parse(s) for s in re.split(r"(?<=\.) ", premise)]
        told += tells_job
        if tells_job and r["output"] == "neutral" and hypothesis not in extras:
            assert parse(hypothesis)[1] != "job", r
    assert told > 50  # the distractor still comes, where it decides nothing


def test_paraphrase_duplicates_are_exactly_the_pairs_asking_one_fact_in_other_words():
    w, records = _draw("paraphrase", n=1500)
    asked = _asked(w)
    for r in records:
        q1, q2 = re.match(r"Text 1: (.*)\nText 2: (.*)", r["input"]).groups()
        assert q1 in asked, r
        same = q1 != q2 and asked[q1] == asked.get(q2)
        assert r["output"] == ("duplicate" if same else "not duplicate"), r


def test_halves_cuts_a_document_once_between_its_middle_sentences_and_keeps_its_text():
    for n in range(1, 8):
        doc = ". ".join(f"Sentence {k} is here" for k in range(n)) + "."
        out = minicme.halves(doc)
        if n == 1:
            assert out == doc
            continue
        first, second = out.split("</s>")
        assert f"{first} {second}" == doc and first.endswith(".")
        assert abs(first.count(".") - second.count(".")) <= 1, out


@pytest.mark.parametrize("demo_keys, builds", [((), False), (("eval_dir",), True), (("tokenizer",), True),
                                               (("data_dir",), True)])
def test_demo_data_is_built_when_a_config_uses_any_of_the_demo_paths(tmp_path, monkeypatch, demo_keys, builds):
    """A config that points only its eval_dir (or tokenizer) at the demo still needs the suite."""
    monkeypatch.chdir(tmp_path)
    calls, options = [], []
    monkeypatch.setattr(minicme, "make_suite", lambda out, seed: calls.append(("suite", out, seed)))
    monkeypatch.setattr(minicme, "prepare", lambda paths, *a, **k: (calls.append(("prepare", paths[0])),
                                                                     options.append(k)))
    cfg = {k: (v if k in demo_keys else f"mine/{k}") for k, v in minicme.DEMO.items()}
    assert minicme.build_demo_data(cfg) is None  # the base is not the demo's: nothing to pretrain
    want = [("suite", minicme.ROOT, 0)] if builds else []
    want += [("prepare", f"{minicme.ROOT}/train.jsonl")] if "data_dir" in demo_keys else []
    assert calls == want
    if options:  # the demo's shards keep a validation split, or the demo reports no validation loss
        assert 0 < options[0].get("val_fraction", 0) < 1, options


@pytest.mark.parametrize("demo_keys, refused", [((), False), (("eval_dir",), False), (("tokenizer",), True),
                                                (("data_dir",), True), (("init_from",), True)])
def test_a_damaged_demo_tokenizer_is_refused_only_where_the_config_reads_it(tmp_path, monkeypatch, demo_keys,
                                                                            refused):
    """check_demo_files reads the demo's tokenizer.model where the run does (as its tokenizer, to prepare the demo's
    shards, to pretrain the demo's base not built yet): damaged, it is the demo's damage, in the demo's sentence. A
    config that reads none of it is not refused for it."""
    monkeypatch.chdir(tmp_path)
    os.makedirs(minicme.ROOT)
    with open(minicme.DEMO["tokenizer"], "wb") as f:
        f.write(b"not a SentencePiece model")
    cfg = {k: (v if k in demo_keys else f"mine/{k}") for k, v in minicme.DEMO.items()}
    if refused:
        with pytest.raises(UserError, match=f"the demo's files in {minicme.ROOT} are incomplete"):
            minicme.check_demo_files(cfg)
    else:
        assert minicme.check_demo_files(cfg) is None


def test_the_demo_base_is_pretrained_on_the_corpus_documents_each_cut_in_halves(tmp_path, monkeypatch):
    """A config using the demo base that is not there yet: the corpus documents become {"text"} records, each cut
    once by </s> (halves), prepared at the pretraining run's max_len, and the pretraining settings come back."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / minicme.ROOT
    root.mkdir(parents=True)
    (root / "suite.json").write_text("{}")  # a suite is there: only the base is missing
    docs = ["Ana is taller than Bo. So Ana reached the shelf. Bo did not.", "One sentence only.", "A b. C d."]
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    prepared = []
    monkeypatch.setattr(minicme, "prepare", lambda paths, tokenizer, out, **k: prepared.append((paths, out, k)))
    cfg = dict(minicme.DEMO, data_dir="mine/tokens", eval_dir="mine/eval")
    settings = minicme.build_demo_data(cfg)
    assert settings == minicme.PRETRAIN and settings is not minicme.PRETRAIN  # a caller may change its own copy
    [(paths, out, options)] = prepared
    assert out == minicme.PRETRAIN["data_dir"] and options["max_len"] == minicme.PRETRAIN["max_len"]
    assert _read_jsonl(tmp_path / paths[0]) == [{"text": minicme.halves(d)} for d in docs]
    assert sum("</s>" in minicme.halves(d) for d in docs) == 2  # the multi-sentence documents are cut


def test_a_demo_suite_built_by_an_older_minicme_is_named_as_such(tmp_path, monkeypatch, capsys):
    """A suite of version 1 (no version in suite.json) repeated training items in its val and test sets: a demo run
    on one is told so, and how to build it anew; a suite of this code's is not."""
    monkeypatch.chdir(tmp_path)
    make_suite(minicme.ROOT, seed=0, **SUITE_SIZES)
    cfg = dict(minicme.DEMO, data_dir="mine/tokens", init_from="mine/base.pt")
    minicme.build_demo_data(cfg)
    assert "older" not in capsys.readouterr().err
    path = tmp_path / minicme.ROOT / "suite.json"
    summary = json.loads(path.read_text())
    assert summary.pop("version") == minicme.VERSION
    path.write_text(json.dumps(summary))
    minicme.build_demo_data(cfg)
    err = capsys.readouterr().err
    assert f"{minicme.ROOT} was built by an older minicme.py" in err and f"delete {minicme.ROOT}" in err


@pytest.mark.parametrize("content", ["[]", '{"version": "2"}', '{"version": null}',
                                     "[" * 100_000 + "]" * 100_000])  # was a RecursionError's traceback
def test_a_demo_suite_json_of_another_shape_is_not_called_older_nor_a_traceback(tmp_path, monkeypatch, capsys, content):
    """The version check reads what it can: train.py names what is wrong with the files it reads."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / minicme.ROOT).mkdir(parents=True)
    (tmp_path / minicme.ROOT / "suite.json").write_text(content)
    assert minicme.build_demo_data(dict(minicme.DEMO, data_dir="mine/tokens", init_from="mine/base.pt")) is None
    assert "older" not in capsys.readouterr().err


def test_a_run_about_to_pretrain_the_demo_base_holds_its_folder_so_a_second_run_waits(tmp_path, monkeypatch):
    """From the check that no other run pretrains the base to its own pretraining, the run holds the pretraining's
    folder: a run started in between is told to wait, not let in to pretrain the same base beside it."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / minicme.ROOT
    for made in ("tokens", "corpus_tokens"):
        (root / made).mkdir(parents=True)
        (root / made / "summary.json").write_text("{}")
    (root / "suite.json").write_text(json.dumps({"version": minicme.VERSION}))
    (tmp_path / minicme.PRETRAIN["out_dir"]).mkdir()  # left by an earlier, stopped pretraining
    try:
        assert minicme.build_demo_data(dict(minicme.DEMO)) == minicme.PRETRAIN
        second = subprocess.run([sys.executable, "-c", "import sys, files; print(files.hold(sys.argv[1]))",
                                 str(tmp_path / minicme.PRETRAIN["out_dir"])], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(files.__file__)))
        assert second.stdout == f"process {os.getpid()}\n", second.stderr
    finally:
        files.let_go(str(tmp_path / minicme.PRETRAIN["out_dir"]))


def test_the_command_passes_its_seed_and_exits_with_one_line_on_a_bad_folder(tmp_path, monkeypatch, capsys):
    seeds = []

    def fake(out, seed):
        seeds.append(seed)
        return {"train": 1, "tasks": {}, "corpus_docs": 1, "vocab_size": 1}
    with monkeypatch.context() as m:
        m.setattr(minicme, "make_suite", fake)
        minicme.main(["--out", str(tmp_path / "suite"), "--seed", "3"])
    assert seeds == [3] and f"mini-CME in {tmp_path / 'suite'}" in capsys.readouterr().out
    (tmp_path / "file").write_text("x")
    assert re.match("minicme.py: error: .* is a file, not a folder", script_error(
        minicme.main, ["--out", tmp_path / "file"], capsys))
    assert script_error(minicme.main, ["--out", tmp_path / "file"], capsys) == (  # named once, as the folder given
        f"minicme.py: error: {tmp_path / 'file'} is a file, not a folder; choose another folder for the suite.")
    assert script_error(minicme.main, ["--out", tmp_path / "file" / "suite"], capsys) == (
        f"minicme.py: error: {tmp_path / 'file' / 'suite'} can not be written: {tmp_path / 'file'} is a file, not a "
        "folder; choose another folder for the suite.")
    assert (tmp_path / "file").read_text() == "x"
    monkeypatch.chdir(tmp_path)
    for empty in ("", " "):  # it was a bare "[Errno 2] No such file or directory: ''"
        assert script_error(minicme.main, [f"--out={empty}"], capsys) == (
            "minicme.py: error: --out is empty; give a folder for the suite, e.g. --out data/mini_cme.")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_the_tokenizer_learns_from_the_corpus_and_training_records_only(tmp_path, monkeypatch):
    """Validation and test text must not shape the vocabulary: a piece learned from a test answer would make that
    answer cheaper to produce. The tokenizer's lines are exactly the corpus documents and the training records'
    lines, and the vocabulary is still trained (the real trainer runs on what was captured)."""
    seen = []
    real = minicme._train_tokenizer
    monkeypatch.setattr(minicme, "_train_tokenizer", lambda lines, vocab_size: (seen.extend(lines),
                                                                                real(lines, vocab_size))[1])
    make_suite(str(tmp_path), seed=0, **SUITE_SIZES)
    docs = [d for d in (tmp_path / "corpus.txt").read_text(encoding="utf-8").split("\n\n") if d.strip()]
    train_lines = [line for r in _read_jsonl(tmp_path / "train.jsonl") for field in ("instruction", "input", "output")
                   for line in r[field].split("\n") if line]
    assert sorted(seen) == sorted([d.strip("\n") for d in docs] + train_lines)
    held = {line for split in ("val", "test") for t in SYNTHETIC_TASKS
            for r in _read_jsonl(tmp_path / split / f"{t}.jsonl") for line in r["output"].split("\n")}
    assert held - set(seen), "no val or test answer is new to the tokenizer: the check above could not fail"


@pytest.mark.parametrize("seed", [0, 1])
def test_the_corpus_stories_and_prose_name_world_people_never_the_blank_tasks_story_names(seed):
    """The blank task's names come from outside the world so that no blank item is written in the corpus: the
    corpus's comparison stories and its everyday prose name world people (their first names), never a story name
    (only the posts, as the summaries' do, borrow those)."""
    w = minicme.build_world(seed)
    rng = random.Random(seed)
    story_names = set(w["story_names"])
    people = {p["name"].split()[0] for p in w["entities"] if p["kind"] == "person"}
    consequences = {c: (word, more) for word, *does in minicme.COMPARISONS for c, more in zip(does, (True, False))}
    for _ in range(200):
        story = minicme._story(w, rng)
        a, word, b, meant, consequence = re.fullmatch(r"(\w+) is (\w+) than (\w+), so (\w+) ([^.]*)\.", story).groups()
        assert {a, b} <= people and a != b, story
        assert consequences[consequence][0] == word and meant == (a if consequences[consequence][1] else b), story
        usage = minicme._usage(w, rng)
        assert not set(re.findall(r"\w+", usage)) & story_names, usage
        sentences = re.split(r"(?<=\.) ", usage)  # three whole sentences, none empty
        assert len(sentences) == 3 and all(s[:1].isupper() and s.endswith(".") for s in sentences), usage


def test_the_corpus_restates_true_facts_and_calls_only_false_claims_wrong():
    """_reasoning's two forms, read back by our own parser: a fact in two phrasings (both true), or a claim that the
    world contradicts, called wrong, then the true fact: never a true claim called wrong."""
    w = minicme.build_world(0)
    parse, rng, forms = _statement_parser(w), random.Random(0), set()
    for _ in range(300):
        text = minicme._reasoning(w, rng)
        restated = re.fullmatch(r"(.*\.) In other words: (.*\.)", text)
        claim, truth = restated.groups() if restated else re.fullmatch(
            r"Some say that (.*\.) That is wrong\. (.*\.)", text).groups()
        (e, attr, v), (e2, attr2, v2) = parse(claim), parse(truth)
        assert (e, attr) == (e2, attr2) and w["by_name"][e][attr] == v2 and claim != truth, text
        assert (v == v2) == bool(restated), text
        forms.add(bool(restated))
    assert forms == {True, False}


def test_the_corpus_has_as_many_documents_as_asked():
    w = minicme.build_world(0)
    least = 2 * len(w["entities"])
    for n in range(least, least + 4):  # n // 2 entries and n // 4 reviews and posts: the prose makes up the rest
        docs = minicme._corpus(w, random.Random(n), n)
        assert len(docs) == n and all(d.strip() and "\n\n" not in d for d in docs), n


def test_opinions_speak_of_three_aspects_and_reviews_and_posts_come_in_each_of_their_forms():
    """Three opinions on three different aspects; reviews joined to their opinions by a space or by IMDB's
    <br /><br />, posts about a film or about a move: each form occurs."""
    rng = random.Random(0)
    for _ in range(200):
        opinions = minicme._opinions(rng, rng.random() < 0.5)
        aspects = [a for s in opinions for a in minicme.ASPECTS if re.search(rf"\bthe {a}\b", s, re.I)]
        assert len(opinions) == 3 and len(set(aspects)) == 3, opinions
    reviews, posts = _draw("sentiment")[1], _draw("summary")[1]
    assert 0 < sum("<br /><br />" in r["input"] for r in reviews) < len(reviews)
    assert 0 < sum(" went to see " in r["input"] for r in posts) < len(posts)


def test_an_existing_demo_base_is_used_as_it_is_and_not_pretrained_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / minicme.ROOT
    root.mkdir(parents=True)
    for name, text in (("suite.json", "{}"), ("corpus.txt", "A b. C d.\n"), ("base.pt", "a base")):
        (root / name).write_text(text)
    assert minicme.DEMO["init_from"] == f"{minicme.ROOT}/base.pt"
    monkeypatch.setattr(minicme, "prepare", lambda *a, **k: pytest.fail("the corpus was prepared for pretraining"))
    assert minicme.build_demo_data(dict(minicme.DEMO, data_dir="mine/tokens")) is None
    assert sorted(os.listdir(root)) == ["base.pt", "corpus.txt", "suite.json"]


def test_the_seed_reaches_every_split_generator_not_only_the_world(tmp_path, monkeypatch):
    """Another seed is another draw of the records, not the same draws made over another world: with the world held
    fixed, two seeds still give different training, validation and test records in every task."""
    world = minicme.build_world(0)
    monkeypatch.setattr(minicme, "build_world", lambda seed: world)
    for seed in (0, 1):
        make_suite(str(tmp_path / str(seed)), seed=seed, **SUITE_SIZES)
    a, b = _tree_bytes(tmp_path / "0"), _tree_bytes(tmp_path / "1")
    for name in [os.path.join(split, f"{t}.jsonl") for t in SYNTHETIC_TASKS for split in ("val", "test")]:
        assert a[name] != b[name], name
    train = [{t: [r for r in _read_jsonl(tmp_path / s / "train.jsonl") if r["task"] == t] for t in SYNTHETIC_TASKS}
             for s in ("0", "1")]
    assert all(train[0][t] != train[1][t] for t in SYNTHETIC_TASKS)
    # and the tasks' mix is the seed's too: a fixed shuffle put each task at the same lines under every seed
    order = [[r["task"] for r in _read_jsonl(tmp_path / s / "train.jsonl")] for s in ("0", "1")]
    assert order[0] != order[1] and sorted(order[0]) == sorted(order[1])


def test_nli_hypotheses_restate_or_deny_a_premise_fact_in_other_words_never_in_its_own():
    """A hypothesis that repeats a premise sentence word for word (or negates it verbatim) would be decided by
    string matching: every hypothesis, negation removed, is absent from its premise."""
    _, records = _draw("nli", n=600)
    for r in records:
        premise, hypothesis = re.match(r"Sentence 1: (.*)\nSentence 2: (.*)", r["input"]).groups()
        stated = hypothesis.removeprefix("It is not true that ")
        assert stated.lower() not in premise.lower(), r


def test_paraphrase_pairs_never_share_their_wording_with_only_the_names_changed():
    """Duplicates ask one fact in two phrasings; a non-duplicate about another entity uses another phrasing too,
    so that identical wording (names aside) is no cue to the label."""
    world, records = _draw("paraphrase", n=600)
    names = sorted((e["name"] for e in world["entities"]), key=len, reverse=True)

    def wording(question):
        for name in names:
            question = question.replace(name, "{e}")
        return question
    for r in records:
        q1, q2 = re.match(r"Text 1: (.*)\nText 2: (.*)", r["input"]).groups()
        assert wording(q1) != wording(q2), r


def test_an_abbreviated_flag_is_named_not_taken_as_its_flag(tmp_path, monkeypatch, capsys):
    """minicme.py reads its flags as the other scripts do (errors.Parser): --ou was taken as --out."""
    monkeypatch.setattr(minicme, "make_suite", lambda *a: pytest.fail("minicme.py ran with an abbreviated flag"))
    with pytest.raises(SystemExit) as e:
        minicme.main([f"--ou={tmp_path}"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith("did you mean --out?")


def test_the_nli_distractor_is_left_out_only_where_it_names_the_person_whose_job_a_neutral_hypothesis_asks():
    """A distractor is left out only where it would decide the hypothesis: one on the director's film stays beside
    a neutral hypothesis on another of his facts, one on somebody else beside a neutral hypothesis on his job; and a
    distractor stands before, between or after the premise's two facts, as ANLI's long contexts place theirs."""
    w = minicme.build_world(0)
    person = next(p for p in w["entities"] if p.get("job") == "film director")
    film = next(f for f in w["films"] if f["director"] == person["name"])
    stranger = next(p for p in w["entities"] if p["kind"] == "person" and p is not person)
    w = dict(w, entities=[person, film, stranger], held={(film["name"], a) for a in ("year", "genre", "city")})
    parse, rng = _statement_parser(w), random.Random(0)
    extras = {t.format(e=p["name"]) for p in (person, stranger) for t in minicme.EXTRAS["person"]}
    kept, places = set(), set()
    for i in range(1500):
        r = minicme.gen_nli(w, rng, i, "train")
        premise, hypothesis = re.match(r"Sentence 1: (.*)\nSentence 2: (.*)", r["input"]).groups()
        sentences = re.split(r"(?<=\.) ", premise)
        if len(sentences) < 3 or r["output"] != "neutral" or hypothesis in extras:
            continue
        e, attr, _ = parse(hypothesis)
        at = next(k for k, s in enumerate(sentences) if parse(s)[0] != e)  # the one on another entity
        places.add(at)
        kept.add((attr == "job", e in sentences[at]))
    assert {(False, True), (True, False)} <= kept and (True, True) not in kept and places == {0, 1, 2}


def test_a_build_cut_short_during_a_top_level_write_is_finished_not_refused(tmp_path):
    """A Ctrl-C while train.jsonl (or corpus.txt, ...) is written leaves its temporary NAME.tmpPID beside .building:
    the folder is still a build to finish, byte for byte as a build in a fresh folder, without that temporary."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its process id is one that no longer runs
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / minicme.BUILDING).write_text("")
    (tmp_path / "a" / f"train.jsonl.tmp{child.pid}").write_text('{"half": "a record')
    make_suite(str(tmp_path / "a"), seed=0, **SUITE_SIZES)
    make_suite(str(tmp_path / "b"), seed=0, **SUITE_SIZES)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b") and "suite.json" in _tree(tmp_path / "a")


@pytest.mark.parametrize("mine", ["train.jsonl.tmp", "corpus.txt.tmp12.bak", "tokenizer.model.tmp1x",
                                  "train.tmp2.jsonl"])
def test_a_users_file_named_almost_like_a_builds_temporary_keeps_their_folder_from_being_taken_up(tmp_path, mine):
    """Only NAME.tmpPID, as write_atomic names its temporaries, is a build's: a user's file of another such name
    beside a .building is named, and nothing in their folder is touched."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in (minicme.BUILDING, mine):
        (folder / name).write_text("my file\n")
    before = _tree(folder)
    with pytest.raises(UserError, match=rf"already holds files that are not a mini-CME suite \({re.escape(mine)}\)"):
        make_suite(str(folder), seed=0, **SUITE_SIZES)
    assert _tree(folder) == before


@pytest.mark.parametrize("key", ["n_train_per_task", "n_test_per_task", "n_val_per_task"])
def test_the_largest_size_make_suite_names_is_accepted_and_one_more_refused(tmp_path, monkeypatch, key):
    """"give at most N": N itself goes on to draw records (stopped here at the first draw), N + 1 is refused."""
    class Drew(Exception):
        pass

    def drew(*args):
        raise Drew
    monkeypatch.setattr(minicme, "_GENERATORS", {name: drew for name in minicme._GENERATORS})
    with pytest.raises(UserError, match=rf"^{key}={minicme.MAX_SIZE + 1} is more than mini-CME is made for; give at "
                                        rf"most {minicme.MAX_SIZE}\.$"):
        make_suite(str(tmp_path / "suite"), **{key: minicme.MAX_SIZE + 1})
    with pytest.raises(Drew):
        make_suite(str(tmp_path / "suite"), **{key: minicme.MAX_SIZE})


@pytest.mark.parametrize("split, taken", [("test", "training"), ("val", "training or test")])
def test_an_evaluation_set_the_world_runs_out_for_names_how_many_it_made_and_what_they_may_not_repeat(
        tmp_path, monkeypatch, split, taken):
    """The refusal names the records made before the items ran out (asking for that many builds) and what those
    items may not repeat: a training record's (test), a training or test record's (val). Here a split's sentiment
    records cycle through k items of their own."""
    _no_tokenizer(monkeypatch)
    real, k = minicme._GENERATORS["sentiment"], 5

    def build(folder, n):
        calls = iter(range(10**6))

        def few(w, rng, i, s):
            record = real(w, rng, i, s)
            return dict(record, input=f"item {next(calls) % k}") if s == split else record
        monkeypatch.setitem(minicme._GENERATORS, "sentiment", few)
        other = "val" if split == "test" else "test"
        return make_suite(str(tmp_path / folder), seed=0, n_train_per_task=1, corpus_docs=400,
                          **{f"n_{split}_per_task": n, f"n_{other}_per_task": 1})
    with pytest.raises(UserError, match=rf"^n_{split}_per_task={k + 1} asks for more sentiment items than mini-CME's "
                                        rf"world has that no {taken} record holds \(it ran out after {k}\); ask for "
                                        rf"fewer, or for fewer {taken} records\.$"):
        build("more", k + 1)
    build("as_many", k)
    assert len(_read_jsonl(tmp_path / "as_many" / split / "sentiment.jsonl")) == k


def test_the_demo_suite_is_the_one_results_md_describes(mini_cme):
    """The demo's table depends on the suite's make-up, which the module's constants set and RESULTS.md describes
    ("The mini-CME suite"): the tests above check the generators against those constants, so a changed constant
    changed the demo's data unnoticed. Here each described number is checked against the suite itself."""
    root, summaries = mini_cme
    summary, world = summaries["default"], minicme.build_world(0)
    assert summary["entities"] == 200 and summary["corpus_docs"] == 6000  # "a world of 200", "6,000 documents"
    facts = sum(len(minicme.ATTRS[e["kind"]]) for e in world["entities"])
    assert abs(summary["held_out_facts"] - 0.3 * facts) < 1  # "30% of the facts appear only in corpus.txt"
    train = {name: task["train"] for name, task in summary["tasks"].items()}
    assert train == dict(nli=2400, paraphrase=2400, choice=2400, blank=2400, qa=1500, sentiment=900, summary=450)
    assert all(task["val"] == 100 and task["test"] == 150 for task in summary["tasks"].values())
    world, records = _draw("paraphrase", n=2000)
    near = {t.format(e=e["name"]) for e in world["entities"] for t in minicme.NEAR_MISSES[e["kind"]]}
    others = [re.match(r"Text 1: .*\nText 2: (.*)", r["input"]).group(1) in near for r in records
              if r["output"] == "not duplicate"]
    assert abs(sum(others) / len(others) - 0.8) < 0.05  # "80% of non-duplicates are near-miss questions"
    world, records = _draw("choice", n=2000)
    slots = [_choice_parts(world, r)[1] for r in records]
    forms = sum(s == [0, 1, 2, 3] for s in slots) / len(slots)
    right_kind = sum(len(set(s)) == 1 for s in slots) / len(slots)  # options of the question's kind: one slot
    assert abs(forms - 0.6) < 0.04 and abs(right_kind - 0.3) < 0.04  # "60% are forms", "30% options of the right kind"


def test_every_value_the_world_gives_an_attribute_is_among_that_attributes_options():
    """Wrong options and changed values are drawn from an attribute's pool: a value missing from it (a film of the
    last year drawn) could never be a wrong option, so its presence among the options would give the answer away."""
    for seed in range(8):
        w = minicme.build_world(seed)
        for e in w["entities"]:
            for attr in minicme.ATTRS[e["kind"]]:
                assert e[attr] in w["pools"][attr], (seed, e["name"], attr)
        years = [int(y) for y in w["pools"]["year"]]
        assert years == list(range(min(years), max(years) + 1))  # every year between, once


def test_a_negated_statement_reads_as_one_sentence_lowering_only_a_leading_the():
    """NLI's shallow contradictions: "It is not true that" and the statement, whose leading "The" (of "The cameras
    for ...", "The favourite pastime of ...") goes lower case mid-sentence; a name that starts one is kept as it is."""
    w = minicme.build_world(0)
    # a film's title leads some statements ("The Silver Harbor came out in 1990."): its "The" is lowered too, which
    # is left as it is (the demo's data would change); those are not checked here
    statements = {s for e in w["entities"] for a in minicme.ATTRS[e["kind"]] for s in minicme._statements(e, a)
                  if not any(s.startswith(f["name"]) for f in w["films"])}
    assert any(s.startswith("The ") for s in statements) and any(not s.startswith("The ") for s in statements)
    for s in statements:
        lowered = "the " + s[len("The "):] if s.startswith("The ") else s
        assert minicme._not(s) == f"It is not true that {lowered}", s


def test_the_corpus_is_half_entries_a_quarter_reviews_and_posts_and_a_quarter_prose_of_three_kinds():
    """_corpus's mix, as its docstring gives it: n // 2 entries, n // 4 reviews (ending with a verdict) and posts
    (ending with a "TL;DR:" line), and the rest stories, facts restated or corrected, and label-word prose in turn."""
    w = minicme.build_world(0)
    verdicts = tuple(v for vs in minicme.VERDICTS for v in vs)
    for n in (400, 601, 1203):
        docs = minicme._corpus(w, random.Random(n), n)
        reviews = sum(d.endswith(verdicts) for d in docs)
        posts = sum(" TL;DR: " in d for d in docs)
        stories = sum(bool(re.fullmatch(r"\w+ is \w+ than \w+, so \w+ [^.]*\.", d)) for d in docs)
        restated = sum(" In other words: " in d or " That is wrong. " in d for d in docs)
        prose = n - n // 2 - n // 4
        assert reviews + posts == n // 4 and abs(reviews - posts) <= 1, n
        assert any(" TL;DR: " in d for d in docs[:n // 2]), n  # shuffled: not the entries first, as written
        assert stories in (prose // 3, prose // 3 + 1) and restated in (prose // 3, prose // 3 + 1), n
        usage = [re.escape(s).replace(r"\{p\}", ".+").replace(r"\{q\}", ".+").replace(r"\{f\}", ".+")
                 for s in minicme.USAGE]
        assert sum(bool(re.fullmatch(rf"(?:(?:{'|'.join(usage)}) ?){{3}}", d)) for d in docs) >= prose // 3, n


def test_blank_names_are_story_names_and_summaries_come_in_both_moods():
    """The blank task's people come from outside the world (a world name would tie it to the corpus's facts), and
    the summaries, unlabelled, still end liking and disliking alike."""
    world, records = _draw("blank")
    people = {part for e in world["entities"] if e["kind"] == "person" for part in e["name"].split()}
    for r in records:
        a, b = re.search(r"\nOption A: '(.*)'\nOption B: '(.*)'", r["input"]).groups()
        assert {a, b} <= set(world["story_names"]) and not {a, b} & people, r
    moods = [_summary_polarity(r["output"]) for r in _draw("summary")[1]]
    assert 0.4 < moods.count(1) / len(moods) < 0.6, moods


def test_the_demos_shards_not_yet_made_are_said_made_with_the_built_demo_tokenizer_by_its_sha256(tmp_path,
                                                                                                   monkeypatch):
    """Once the suite is built, what shards_made_with says of the demo's shards is what prepare will record: the demo
    tokenizer's SHA-256 (so one of its size but other tokens is refused) and its BOS and EOS; a data_dir of one's own
    not prepared yet is left to the run (nothing is known of it), with any tokenizer."""
    monkeypatch.chdir(tmp_path)
    os.makedirs(minicme.ROOT)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"the quick brown fox {i} jumps over the lazy dog\n" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tok"), vocab_size=300,
                                   byte_fallback=True, minloglevel=2)
    os.replace(tmp_path / "tok.model", minicme.DEMO["tokenizer"])
    made = minicme.shards_made_with(minicme.DEMO["data_dir"])
    tok = minicme.Tokenizer(minicme.DEMO["tokenizer"])
    assert made["tokenizer"]["sha256"] == files.file_sha256(minicme.DEMO["tokenizer"])
    assert (made["vocab_size"], made["bos_id"], made["eos_id"]) == (tok.vocab_size, tok.bos_id, tok.eos_id)
    assert minicme.shards_made_with("mine") is None
    (tmp_path / "mine.model").write_bytes((tmp_path / minicme.DEMO["tokenizer"]).read_bytes())  # one's own copy
    minicme.check_own_tokenizer({"tokenizer": "mine.model", "data_dir": "mine"})


def test_the_command_lines_default_seed_is_make_suites_the_demos_suite(tmp_path, monkeypatch):
    """`python minicme.py --out DIR` without --seed writes the suite of make_suite's default seed, the demo's."""
    asked = []
    monkeypatch.setattr(minicme, "make_suite", lambda out, seed: asked.append(seed) or
                        {"train": 0, "tasks": [], "corpus_docs": 0, "vocab_size": 0})
    minicme.main(["--out", str(tmp_path / "suite")])
    assert asked == [inspect.signature(make_suite).parameters["seed"].default]
