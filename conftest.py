"""What the test files share: where the fixtures are (the authors' records, the LLaMA-2 tokenizer and
the CME samples: the first of $TEAMLORA_FIXTURES, shared/fixtures and ../shared/fixtures that holds
official/; tests that need them skip without them), and a small mini-CME suite with a tiny base that
train.py pretrained, built once per session for the train and study tests."""
import ast
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import machine
import teamlora
import train
from data import prepare
from minicme import make_suite

# torch.compile's C++ compiled in this process, not in a pool of worker processes that each import torch first: for the
# tests' few small graphs the pool costs more than it saves (the same code is generated either way). Read when inductor
# is first imported (not by `import torch`); one set outside wins.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
HERE = Path(__file__).resolve().parent
FIXTURE_PLACES = ("TEAMLORA_FIXTURES", "shared/fixtures", "../shared/fixtures")  # a variable, then paths from HERE
_candidates = [os.environ.get(FIXTURE_PLACES[0], ""), *(os.path.normpath(HERE / p) for p in FIXTURE_PLACES[1:])]
FIXTURES = next((Path(p) for p in _candidates if p and (Path(p) / "official").is_dir()), None)
needs_fixtures = pytest.mark.skipif(FIXTURES is None, reason="shared/fixtures not found (set TEAMLORA_FIXTURES)")
LLAMA2 = FIXTURES / "tokenizer" / "llama2_tokenizer.model" if FIXTURES else None
OFFICIAL = FIXTURES / "official" / "train_example.json" if FIXTURES else None
CME_DIR = str(FIXTURES / "cme") if FIXTURES else "/nonexistent"
needs_cme_fixtures = pytest.mark.skipif(not os.path.isdir(CME_DIR), reason="shared/fixtures not found next to the repo")
needs_distributed_torch = pytest.mark.skipif(  # machine.setup_distributed refuses older releases; FSDP2 fails there
    machine.release(torch.__version__) < machine.release(machine.DISTRIBUTED_TORCH),
    reason=f"torch {torch.__version__}: torchrun and FSDP2 on the CPU need torch >= {machine.DISTRIBUTED_TORCH}")


def _git_files(root, *options):
    """The files git lists in root with these `git ls-files` options (paths from root), or None: not a git checkout
    of its own (an unpacked archive, or a copy inside another repository: git knows none of it), or no git."""
    if not (root / ".git").exists():
        return None
    try:
        listed = subprocess.run(["git", "ls-files", "-z", *options], cwd=root, capture_output=True, text=True)
    except OSError:  # no git
        return None
    return set(listed.stdout.split("\0")) - {""} if listed.returncode == 0 else None


def imported_modules(path, names):
    """Which of names the Python file at path imports (in functions too; none if it does not parse)."""
    try:  # a tracked file deleted and not yet committed is not there
        text = path.read_text(encoding="utf-8", errors="replace")
        tree = ast.parse(text) if any(n in text for n in names) else None  # most files: no need to parse them
    except (OSError, SyntaxError, ValueError):
        return set()
    if tree is None:
        return set()
    return names & ({a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} |
                    {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module})


def readme_names(root):
    """The .py files that root's README.md names as the repository's: each `name.py` of its file table (before "## Quick
    start"; the prose names others', the authors' `build_dataset.py`) and each recipe `config/....py` it names, a brace
    list as the shell expands it (`config/cme_{a,b}.py`)."""
    try:
        readme = (root / "README.md").read_text(encoding="utf-8")
    except OSError:
        return set()
    named = set(re.findall(r"`(\w+\.py)`", readme.split("## Quick start")[0]))
    for stem in re.findall(r"config/([\w.{},-]+?)\.py", readme):
        head, _, rest = stem.partition("{")
        choices, _, tail = rest.partition("}")
        named |= {f"config/{head}{c}{tail}.py" for c in choices.split(",")} if rest else {f"config/{stem}.py"}
    return named


def _repositorys_own(root):
    """git's tracked files in root, the test files not yet `git add`-ed (nor ignored; pytest runs them all the same),
    the files not yet added that the README names as the repository's (readme_names), and the top-level modules not
    yet added that these import, directly or through one another: a developer's new module, script or recipe is
    checked before its commit as CI checks it after (a script once the README's table names it, as CI demands; a
    recipe once the README names it), a user's own script or recipe beside them is not (a developer's the README does
    not name yet looks the same: CI's run sees it); or None where git does not know root."""
    tracked = _git_files(root)
    if tracked is None:
        return None
    # the untracked .py files of the root and config/; --directory: an untracked folder (a venv of the user's own,
    # say) is not walked
    new = _git_files(root, "--others", "--exclude-standard", "--directory", ":(glob)*.py",
                     ":(glob)config/*.py") or set()
    added = {n for n in new if n.startswith("test_") or n == "conftest.py"} | (new & readme_names(root))
    waiting = {Path(n).stem: n for n in new - added if "/" not in n}  # config/'s are no modules
    ours, reading = tracked | added, [n for n in tracked | added if "/" not in n and n.endswith(".py")]
    while reading and waiting:
        for name in imported_modules(root / reading.pop(), set(waiting)):
            ours.add(waiting[name])
            reading.append(waiting.pop(name))
    return ours


def repository_files(pattern, root=HERE):
    """The repository's files that match pattern (a glob from its root, as "*.py" or "config/*.py"): in a git checkout
    those git tracks and the new modules they import (_repositorys_own), so that a user's own files beside them (a
    config of their own in the root or in config/, a copy of train.py to try things in) are not taken for the
    repository's; elsewhere (no .git, no git) every file that matches."""
    found, ours = sorted(root.glob(pattern)), _repositorys_own(root)
    return found if ours is None else [p for p in found if p.relative_to(root).as_posix() in ours]


def _file_names_hold(text):
    try:
        text.encode(sys.getfilesystemencoding())
    except UnicodeEncodeError:
        return False
    return True


# under a C locale (LC_ALL=C, PYTHONUTF8=0) Python cannot encode such a name at all, whatever the filesystem
non_ascii_names = pytest.mark.skipif(not _file_names_hold("\u00e9\u0660"), reason="the filesystem encoding "
                                     f"{sys.getfilesystemencoding()} cannot hold non-ASCII file names")


@pytest.fixture(scope="session")
def run_data(tmp_path_factory):
    """A small mini-CME suite, its training shards, and a tiny base pretrained on its corpus by
    train.py itself (adapter='none', packed batches): made once per session."""
    root = tmp_path_factory.mktemp("mini")
    make_suite(str(root), seed=0, n_train_per_task=40, n_test_per_task=6, n_val_per_task=4, corpus_docs=400)
    prepare([str(root / "train.jsonl")], str(root / "tokenizer.model"), str(root / "tokens"), max_len=128,
            val_fraction=0.1, quiet=True)
    docs = [d for d in (root / "corpus.txt").read_text().split("\n\n") if d.strip()]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare([str(root / "corpus.jsonl")], str(root / "tokenizer.model"), str(root / "corpus"), max_len=128, quiet=True)
    pre = train.train(train_cfg(root, root / "pre", "--adapter=none", f"--data_dir={root / 'corpus'}",
                                "--batch_mode=pack", "--batch_size=32", "--eval_dir=", "--max_iters=40",
                                "--eval_interval=40", "--learning_rate=1e-2", "--warmup_iters=4"))
    assert all(p.requires_grad for p in pre["model"].parameters())  # full training trains everything
    assert np.mean(pre["train_losses"][-3:]) < 0.7 * np.mean(pre["train_losses"][:3])
    os.replace(root / "pre" / "model.pt", root / "base.pt")
    return root


def train_flags(run_data, out, *flags):
    """The flags of a tiny, fast configuration on the small suite; later flags override earlier ones."""
    return [f"--data_dir={run_data / 'tokens'}", f"--eval_dir={run_data / 'test'}",
            f"--tokenizer={run_data / 'tokenizer.model'}", "--init_from=scratch", "--model=tiny", "--max_len=128",
            "--batch_size=8", "--max_iters=6", "--eval_interval=3", "--eval_iters=1", "--eval_limit=4", "--r=8",
            "--experts=4", "--learning_rate=3e-3", "--warmup_iters=1", f"--out_dir={out}", *flags]


def train_cfg(run_data, out, *flags):
    return train.parse_config(train_flags(run_data, out, *flags))


@pytest.fixture
def step_clock(monkeypatch):
    """The training clock (checkpoint.Clock) turned by hand: each training step takes 100 s, and nothing else any time,
    so that every train_seconds is known exactly."""
    now, real = [0.0], train.train_step
    monkeypatch.setattr(checkpoint.Clock, "now", staticmethod(lambda: now[0]))

    def step(*args):
        now[0] += 100.0
        return real(*args)
    monkeypatch.setattr(train, "train_step", step)


@pytest.fixture(autouse=True)
def same_cpu_threads():
    """train.train and sample.main give their caller's CPU thread count back, but a test may set its own: each test
    gets back the count it started with, so how many threads a test runs on does not depend on the tests before it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def ctrl_c_as_at_a_terminal():
    """pytest started in the background (`pytest &` in a script) begins with SIGINT ignored, which a run leaves
    ignored, as it should: the tests that press Ctrl-C run as from a terminal, and each gets SIGINT as it found it."""
    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if before is not None:  # None: a handler set outside Python, which cannot be put back
        signal.signal(signal.SIGINT, before)


RUN_PATHS = ("out_dir", "data_dir", "eval_dir", "tokenizer", "init_from")  # a run's folders and the files it reads
CHILD_RUN = re.compile(r"\b(?:train\.main|study\.launch)\(sys\.argv\[(\d+):\]")  # a `python -c` child's run, its flags


def folders_named(configs):
    """The first folder of each relative path that the configs (train.py config dicts) name for a run (RUN_PATHS)."""
    return {HERE / Path(cfg[key]).parts[0] for cfg in configs for key in RUN_PATHS
            if cfg[key] and not os.path.isabs(cfg[key]) and cfg[key] not in ("scratch", "resume")}


@pytest.fixture(scope="session")
def users_folders():
    """The repository's folders that a user's own runs fill: the first folder of each relative path that the demo
    (train.py's defaults) and the recipes name: out/ (each run's out_dir), data/ (shards, evaluation sets) and
    checkpoints/ (the bases a recipe trains). A recipe naming another folder adds it, a user's own in config/ too;
    one of theirs that train.py refuses (unfinished, say) runs nothing, and ended every test in an error here."""
    ours, recipes = repository_files("config/*.py"), []
    for path in sorted((HERE / "config").glob("*.py")):
        try:
            recipes.append(train.parse_config([str(path)]))
        except Exception:
            if path in ours:
                raise
    return folders_named([train.DEFAULTS, *recipes])


@pytest.fixture(autouse=True)
def no_run_in_the_users_folders(users_folders, tmp_path_factory, monkeypatch):
    """A test's run or dry run (each claims its out_dir first: train.claim_out_dir) uses folders of its own, never
    the repository's out/, data/ or checkpoints/: in a clone where the user has run the demo or a recipe, out/demo or
    out/cme_llama2_7b holds a run, which the run and the dry run refuse, and a dry run reads the base, the tokenizer,
    the shards and the evaluation sets it finds in place of the preset. Run from the repository's root, as CI runs
    the tests, a test that forgets fails here whatever those folders hold. A train.py that a test starts as a process
    of its own (study.py's runs, say), which this guard does not reach, is checked as it starts, from its flags: the
    arguments after train.py given to Python or torchrun, or those from K on given to a `python -c` child whose code
    runs `train.main(sys.argv[K:])` or `study.launch(sys.argv[K:], ...)` (which starts train.py with them). A child
    that runs train otherwise (the flags spelt in its code, read from a file) is not reached: start it so."""
    real, basetemp = train.claim_out_dir, tmp_path_factory.getbasetemp().resolve()  # --basetemp may be in the repo

    def refuse(cfg, cwd, keys=RUN_PATHS):
        for key in keys:
            if cfg.get(key) in (None, "", "scratch", "resume"):  # none, or init_from's keywords
                continue
            path = Path(os.path.realpath(os.path.join(cwd, cfg[key])))
            mine = path == basetemp or basetemp in path.parents
            if not mine and (folder := next((f for f in users_folders if f == path or f in path.parents), None)):
                pytest.fail(f"the test runs with {key}={cfg[key]}, in the repository's {folder.name}/ that a "
                            "user's runs fill; give it a path under tmp_path, or use the at_a_fresh_root fixture.")

    def claim_out_dir(r, *args, **kwargs):
        refuse(r.cfg, os.getcwd())
        return real(r, *args, **kwargs)
    monkeypatch.setattr(train, "claim_out_dir", claim_out_dir)

    class Popen(subprocess.Popen):
        def __init__(self, args, *more, **kwargs):
            argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else []  # str, not shell=True
            if argv and not os.path.basename(argv[0]).startswith(("python", "torchrun")) and argv[0] != sys.executable:
                argv = []  # a shell's train.py may run elsewhere, with other flags: `cd "$1" && exec python train.py`
            if len(argv) > 2 and argv[1] == "-c" and (run := CHILD_RUN.search(argv[2])):  # sys.argv[K] is argv[K + 2]
                argv = ["train.py", *argv[int(run.group(1)) + 2:]]
            if (at := next((i for i, a in enumerate(argv) if os.path.basename(a) == "train.py"), None)) is not None:
                try:  # its flags as the process reads them; ones it refuses are its to name
                    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                        cfg = train.parse_config(argv[at + 1:])
                except (Exception, SystemExit):
                    cfg = None
                if cfg is not None:  # a resume or a re-scoring reads the paths its ckpt.pt saved, not these flags
                    refuse(cfg, os.fspath(kwargs.get("cwd") or os.getcwd()),
                           ("out_dir",) if cfg["init_from"] == "resume" or cfg["eval_only"] else RUN_PATHS)
            super().__init__(args, *more, **kwargs)
    monkeypatch.setattr(subprocess, "Popen", Popen)


@pytest.fixture
def at_a_fresh_root(tmp_path, monkeypatch):
    """A run's relative paths taken as in a fresh clone: the working directory is a folder of the test's own that
    holds a copy of the repository's config/, so the recipes are named as the README names them (config/...) and
    their paths and the demo's (out/, data/, checkpoints/) are the test's. Not the repository's root, where out/demo
    or out/cme_llama2_7b holds a run once the user has run the demo or the recipe (the run and its dry run refuse
    it), and data/ and checkpoints/ the shards, evaluation sets, tokenizer and base that a dry run would read in
    place of the preset. pytest may be started in another folder too, where config/cme_llama2_7b.py is not."""
    root = tmp_path / "root"
    shutil.copytree(HERE / "config", root / "config", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def read_only(monkeypatch):
    """read_only(folder): the folder refuses new files as a read-only one refuses them to a user (this machine runs
    as root, which writes anywhere), where the scripts try: files.blocked_parent's trial file."""
    locked, real = set(), tempfile.TemporaryFile

    def trial_file(*args, dir=None, **kwargs):
        if dir is not None and os.path.realpath(dir) in locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "TemporaryFile", trial_file)
    return lambda folder: locked.add(os.path.realpath(folder))


def held_by_another_process(folder):
    """A process of its own that holds folder (files.hold, as a run's rank 0 does) until it is killed or its stdin
    closes; returned once it holds it."""
    code = "import sys, files; print(files.hold(sys.argv[1]), flush=True); sys.stdin.read()"
    other = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=HERE, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline() == "None\n"
    return other


@contextmanager
def named_pipe(path, content=b""):
    """A named pipe at path (as bash's <(...) or /dev/stdin under a shell pipe gives one) that hands `content` to each
    reader that opens it until the block ends: code that reads one where it should refuse it fails its test instead of
    waiting forever for a writer."""
    os.mkfifo(path)
    stop = threading.Event()

    def feed():
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader has it open
            except OSError:
                time.sleep(0.01)
                continue
            try:
                os.set_blocking(fd, True)
                os.write(fd, content)
            except OSError:  # the reader closed it first
                pass
            finally:
                os.close(fd)
            time.sleep(0.05)
    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join()


def script_error(main, argv, capsys):
    """A script's main(argv) ends on a user's mistake with exit code 2 and one line on stderr: that line."""
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


def usage_error(main, argv, capsys):
    """A script's main(argv) ends on argparse's usage error (its usage lines, then the error) with exit code 2 and no
    traceback: the error's line, the last."""
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


class FullDisk(io.RawIOBase):
    """A file f on a disk that fills up after `room` more bytes: a write past them raises ENOSPC, as the disk's
    does (torch.save(obj, FullDisk(f)) then raises its RuntimeError over that OSError, as on a full disk)."""

    def __init__(self, f, room=300):
        self.f, self.room = f, room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)


def cuda_fp32_matmuls():
    """How CUDA runs float32 matmuls now: "tf32", "ieee", or "none" (torch's default, IEEE)."""
    m = torch.backends.cuda.matmul
    return m.fp32_precision if hasattr(m, "fp32_precision") else ("tf32" if m.allow_tf32 else "ieee")


def adapters_of(model):
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if teamlora.is_adapter(n)}


def assert_same_adapters(a, b, atol=0.0):
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=n)


TEXTS = ["Determine whether the sentiment is positive or negative.", "The acting was wonderful, the story dull.",
         "Question: Who directed The Silver Harbor?", "Choices: A.drama, B.1987, C.Vobodan, D.Kimo Res"] * 4


def hf_tokenizer_folder(path, bos=None, eos="<|endoftext|>"):
    """A byte-level BPE tokenizer.json trained here, with Qwen's special tokens and a Qwen-like
    tokenizer_config.json (no BOS) beside it."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    path.mkdir(exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos, "pad_token": None}))
    return path


def with_vocabulary(folder, vocab):
    """The tokenizer.json in folder (hf_tokenizer_folder's), its vocabulary made `vocab` tokens: its first token's id
    moved to vocab - 1, as a tokenizer of that size reads (its ids may skip numbers)."""
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_json["model"]["vocab"][next(iter(tokenizer_json["model"]["vocab"]))] = vocab - 1
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    assert train.Tokenizer(folder).vocab_size == vocab
    return folder


def reference_task_load(model, prompts, n_layers, load_layers, k):
    """The experts' shares over a task's prompt tokens, from each prompt run alone (no padding at all):
    omega of every adapted layer in the last load_layers blocks, pooled over all prompt tokens, over k,
    then averaged over those layers."""
    last = [m for n, m in model.named_modules()
            if isinstance(m, teamlora.TeamLoRALinear) and n.startswith("layers.")
            and int(n.split(".")[1]) >= n_layers - load_layers]
    assert last
    omegas = {m: [] for m in last}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for p in prompts:
            model(torch.tensor([p]))
            for m in last:
                omegas[m].append(m.last_omega.reshape(-1, k))
    model.train(was_training)
    return torch.stack([torch.cat(o).mean(0) / k for o in omegas.values()]).mean(0)
