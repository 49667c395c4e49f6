"""
The mini-CME study: the paper's comparisons and its ablation, in miniature, on a CPU, with seeds,
each method at the learning rate it does best with on validation data.

    python study.py                  # learning-rate selection, then 5 seeds of every run
    python study.py --quick          # a smoke version of the same protocol, in out/study_quick (about 10 minutes)
    python study.py --seeds=11,12,13 # other seeds (a count, 5, means 1..5)
    python study.py --runs=lora32,teamlora  # some of the runs (default: all)
    python study.py --report         # print the tables again from the finished runs

The protocol, fixed before any final run:
1. Selection. Each method (the first run of each METHODS entry, at matched parameters) trains once,
   with seed 0 (never a final seed), at every learning rate of GRID, and is scored on the
   validation sets (val_dir: 100 records a task, disjoint from the test sets). Its learning rate
   is the one with the best mean validation score; a run that diverges scores nothing. The
   method's other runs (ablations, k, the balance loss) reuse it: the budget cannot hold the grid
   for all 12 runs.
2. Final runs. Every run, every seed, at its method's learning rate, scored on the test sets
   (eval_dir). Tables show mean±std over seeds, each run's learning rate and each task's chance
   level; differences against TeamLoRA are paired by seed (a seed fixes the data order) with a 95%
   interval (Student's t), each for its own comparison (no correction for their number). Every run is
   scored on the same tasks, equally weighted in its average.

Each run is train.py with one configuration (the code path of a real run), fine-tuning the base
that `python train.py` pretrains on the synthetic mini-CME suite. Runs land in out/study/, each run's train.py output
in its stdout.txt (every attempt's, after a line of its own); a finished or diverged run is not run again, a stopped
one resumes and one killed before its first checkpoint starts again, so an interrupted study continues where it
stopped (its runs stop with it, each with its checkpoint, even when it is killed, and a study run again at once waits
for them; a finished, stopped or diverged run made with other --steps or flags is refused, before anything trains:
give such a study its own --out).
The tables, charts and comparisons are printed and written to out/study/report.md (PNG charts too
when matplotlib is installed). Any other --key=value goes to every run (e.g. --device=cuda), except the
keys the study sets itself (seed, learning_rate, max_iters, out_dir, the runs' settings): those are refused, as
are --init_from=resume (the study resumes its runs when its command is run again) and --overwrite=True.
"""
if __name__ == "__main__":  # before the imports: see errors.start_script (closed streams, Ctrl-C while importing)
    import errors
    errors.start_script()

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import configurator
import data
import evaluation
import files
import machine
import train
from errors import docstring, exit_with, run_script

OPTIONS = dict(seeds=5, steps=500, workers=2, out="out/study", report=False, runs="all", quick=False,
               val_dir="data/mini_cme/val")
GRID = (2.5e-4, 6.3e-4, 1.6e-3, 4e-3)  # one grid for every method: x2.5 apart, 16x in all
SELECTION_SEED = 0
MAX_SEEDS = 1000  # a typo guard: each seed is a run of every configuration
QUICK = dict(steps=60, seeds=(1, 2), grid=(6.3e-4, 4e-3), eval_limit=30)  # --quick: the protocol, smaller
COMMON = dict(eval_limit=0, log_interval=10, targets="w1,w2,w3", r=32, experts=4, alpha=32.0,
              dry_run=False, eval_only=False)  # each run trains: a --dry_run=True "finished" every run with no score

# run name -> (label, train.py settings). One base, one data order per seed, the paper's FFN
# targets; r_A = 32 split into k = 4 experts. The learning rate is the run's method's (METHODS).
RUNS = {
    "full": ("Full fine-tuning", dict(adapter="none")),
    "lora8": ("LoRA r=8", dict(adapter="lora", r=8)),
    "lora32": ("LoRA r=32", dict(adapter="lora")),
    "moelora": ("MoELoRA 4x8", dict(adapter="moelora")),
    "moelora_comp": ("MoELoRA 4x8 + competition", dict(adapter="moelora", competition=True)),
    "hydralora": ("HydraLoRA A12, 4 heads", dict(adapter="hydralora", r=12)),  # r=12: about TeamLoRA's count
    "teamlora_nocomp": ("TeamLoRA w/o competition", dict(adapter="teamlora", competition=False)),
    "teamlora": ("TeamLoRA 4x8", dict(adapter="teamlora")),
    "teamlora_k2": ("TeamLoRA k=2 (2x16)", dict(adapter="teamlora", experts=2)),
    "teamlora_k8": ("TeamLoRA k=8 (8x4)", dict(adapter="teamlora", experts=8)),
    "teamlora_bal0": ("balance_coef=0", dict(adapter="teamlora", balance_coef=0.0)),
    "teamlora_balsum": ("official: sum, weight 1", dict(adapter="teamlora", balance_coef=1.0, balance_reduction="sum")),
}
# method -> its runs; the first is the matched-parameter run on which its learning rate is chosen
METHODS = {"full": ["full"], "lora": ["lora32", "lora8"], "moelora": ["moelora", "moelora_comp"],
           "hydralora": ["hydralora"],
           "teamlora": ["teamlora", "teamlora_nocomp", "teamlora_k2", "teamlora_k8", "teamlora_bal0",
                        "teamlora_balsum"]}
METHOD_OF = {run: method for method, runs in METHODS.items() for run in runs}
# the tables: title -> [(row label, run name)]
TABLES = {
    "Methods at matched parameters (the paper's Table 2)": [
        ("Full fine-tuning (reference)", "full"), ("LoRA r=8", "lora8"), ("LoRA r=32", "lora32"),
        ("MoELoRA 4x8", "moelora"), ("HydraLoRA A12, 4 heads", "hydralora"), ("TeamLoRA 4x8", "teamlora")],
    "Ablation (the paper's Table 4)": [
        ("neither (= MoELoRA)", "moelora"), ("competition only", "moelora_comp"),
        ("collaboration only", "teamlora_nocomp"), ("both (= TeamLoRA)", "teamlora")],
    "Number of experts at r_A = 32 (the paper's Figure 3a)": [
        ("k=1 (= LoRA r=32)", "lora32"), ("k=2", "teamlora_k2"), ("k=4", "teamlora"), ("k=8", "teamlora_k8")],
    "Load-balancing loss": [
        ("off (balance_coef=0)", "teamlora_bal0"), ("default (0.01, mean over layers)", "teamlora"),
        ("official (1.0, sum over layers)", "teamlora_balsum")],
}
INSTEAD = dict(seed="seeds", max_iters="steps", eval_interval="steps", out_dir="out")  # a run's key -> the study's
NOT_A_CHANGE = ("device", "threads", "fsdp", "activation_checkpointing", "compile", "tf32", "eval_batch_size",
                "log_interval", "out_dir", "overwrite", "eval_only")  # no change to a run (eval_only: re-scored)
DIVERGED = "diverged.json"  # launch's record of a run whose loss diverged: its settings and train.py's error
PATHS = ("data_dir", "eval_dir", "tokenizer", "init_from")  # compared as the files they name
REDO = "delete {} and run the study again to redo the run."  # the fix of a damaged run in that folder
KEPT_FIX = "rename it, then run the study again with --report to write the report and charts"  # files.kept's
ONE_RUN = {("init_from", "resume"): "a study resumes its own: to continue a stopped study, run its command again "
           "without --init_from (each stopped run resumes from its checkpoint)",  # train.py's, not for a study's runs
           ("overwrite", True): "a study keeps its finished and diverged runs: to redo one, delete its folder"}
CHARTS = ("loss.png", "expert_load.png")  # pngs': the training loss, TeamLoRA's expert load
CURVES = {"lora32": "L", "moelora": "M", "hydralora": "H", "teamlora": "T", "full": "F"}  # Figure 4b: run -> mark


def parse(argv):
    """(study options, train.py flags, run names) from --key=value arguments, read as train.py reads them."""
    cores = data.cores()
    opts = dict(OPTIONS, workers=min(OPTIONS["workers"], cores), seeds=tuple(range(1, OPTIONS["seeds"] + 1)))
    extra, given = [], set()
    for arg in argv:
        flag = f"{arg}=True" if arg in ("--report", "--quick") else arg
        key, value = configurator.parse_flag(flag, {**train.DEFAULTS, **OPTIONS})  # all known: a misspelt one is named
        given.add(key)
        if key == "seeds":  # a count (5: seeds 1..5) or a list (11,12,13)
            n = value if type(value) is int else len(value) if isinstance(value, tuple) else 0
            if n > MAX_SEEDS:  # checked before a count becomes a tuple: --seeds=10**9 would fill the memory
                raise data.UserError(f"--seeds asks for {n} seeds, more than {MAX_SEEDS}, and each seed is a run of "
                                     "every configuration; give fewer seeds.")
            if type(value) is int and value > 0:
                value = tuple(range(1, value + 1))
            elif not (isinstance(value, tuple) and value and all(type(v) is int and v > 0 for v in value)):
                raise data.UserError(f"--seeds must be a count or a comma-separated list of positive seeds, "
                                     f"got {arg.partition('=')[2]!r}.")
            # the same seed is the same run: it would count twice in the means and the t intervals
            if repeated := sorted({s for s in value if value.count(s) > 1}):
                raise data.UserError(f"--seeds repeats {'seeds' if len(repeated) > 1 else 'seed'} "
                                     f"{', '.join(map(str, repeated))}; give each seed once.")
            opts[key] = value
        elif key in OPTIONS:
            opts[key] = configurator.typed(key, value, OPTIONS, f"flag {arg}")
        else:
            extra.append(arg)  # a train.py key: checked below (not one a run sets) and by train.parse_config
    if not opts["out"].strip():  # "": every run's folder, select/ and report.md would land in the current folder
        raise data.UserError("--out is empty; give the study a folder of its own, e.g. --out=out/study.")
    opts["grid"] = GRID
    if opts["quick"]:
        # the user's --steps or --seeds beside --quick win over its own (e.g. --quick --steps=2: the smallest study)
        opts.update({k: v for k, v in QUICK.items() if k not in given | {"eval_limit"}})
        if "out" not in given:  # the full study's default folder is left to it; a user's own --out is taken as given
            opts["out"] += "_quick"
    names = list(RUNS) if opts["runs"] == "all" else list(dict.fromkeys(re.findall(r"[^,\s]+", opts["runs"])))
    if not names:
        raise data.UserError(f"--runs={opts['runs']} names no run; give run names separated by commas, or leave "
                             "--runs out for all of them.")
    if unknown := [n for n in names if n not in RUNS]:
        raise data.UserError(f"unknown run(s) {', '.join(unknown)}; runs are: {', '.join(RUNS)}.")
    for arg in extra:  # train.py would suggest only its own keys: --step=3 is a near miss of --steps
        key = configurator.parse_flag(arg)[0]
        if key not in train.DEFAULTS:
            configurator.typed(key, None, {**OPTIONS, **train.DEFAULTS}, f"flag {arg}")  # raises, naming the closest
    own = {configurator.parse_flag(f)[0] for n in RUNS for f in run_flags(n, 1, GRID[0], opts, [])}  # each run sets
    for key in (configurator.parse_flag(arg)[0] for arg in extra):
        if key in own:
            fix = (f"use --{INSTEAD[key]} instead" if key in INSTEAD else
                   "remove it (study.py's RUNS, COMMON and GRID fix it)")
            raise data.UserError(f"--{key} is set by the study for each of its runs; {fix}.")
    if not 1 <= opts["workers"] <= cores:  # more runs at a time than cores only share them
        raise data.UserError(f"--workers={opts['workers']} is not a number of runs at a time for this machine's "
                             f"{cores} cores; give one from 1 to {cores}.")
    if opts["steps"] < 1:  # (the final seeds are positive, checked above: seed 0 stays the selection runs' own)
        raise data.UserError(f"--steps must be a positive number of training steps per run, got {opts['steps']}.")
    return opts, extra, names


def run_dir(opts, name, lr, seed=None):
    """The folder of a run: a selection run's (seed None: it is SELECTION_SEED's), else a final run's."""
    return os.path.join(opts["out"], f"select/{name}-lr{lr:g}" if seed is None else f"{name}-lr{lr:g}-seed{seed}")


def run_flags(name, seed, lr, opts, extra, eval_dir=None):
    """train.py flags of one run: a final run (scored on the test sets) or, with eval_dir, a selection run."""
    settings = {**COMMON, **RUNS[name][1], "seed": seed, "learning_rate": lr, "max_iters": opts["steps"],
                "eval_interval": opts["steps"], "out_dir": run_dir(opts, name, lr, None if eval_dir else seed)}
    if opts["quick"]:
        settings["eval_limit"] = QUICK["eval_limit"]
    flags = [f"--{k}={v}" for k, v in settings.items()] + extra
    return flags + [f"--eval_dir={eval_dir}"] if eval_dir else flags


def check_out(out):
    """Refuse, before anything runs, an --out the study can not write or would share with other files: its
    report.md and charts would replace a user's. A study's folder always holds select/ (its first runs')."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise data.UserError(f"--out {out} is a file, not a folder; choose another --out.")
    names = sorted(n for n in os.listdir(out) if n != files.LOCK) if os.path.isdir(out) else []
    if names and "select" not in names:
        raise data.UserError(f"--out {out} holds files that are not a study's ({', '.join(names[:3])}); choose a new "
                             "or empty folder, or the --out of an earlier study to continue it.")
    report_md = os.path.join(out, "report.md")
    if blocker := files.blocked_parent(report_md):
        raise data.UserError(f"--out {out} can not be written: {blocker}; choose another --out.")
    # a user's report.md, or a folder of its name or a chart's (which failed the study at its end): said again there
    charts = [os.path.join(out, name) for name in CHARTS] if pyplot() else []  # drawn only with matplotlib
    for kept in [files.kept(report_md)] + [f"{p} is {w}, not a file" for p in charts if (w := files.special_file(p))]:
        if kept:
            print(f"note: {kept}, and is kept; {KEPT_FIX}.", file=sys.stderr)


def check_settings(flags, report=False):
    """The run folder of `flags`; a finished, stopped or diverged run there made with other settings is refused (a
    study rerun with other --steps or flags in the same --out would report that run as its own; a --report compares
    only the settings its flags give), and so is a stdout.txt there that is no file (launch opened a named pipe there
    for the run's output, and waited for a reader forever), or a run folder still to write that can not be written."""
    train.parse_config(flags)  # train.py's refusals of what goes with the run's own (weight_decay at its rate): now
    out = next(f.partition("=")[2] for f in reversed(flags) if f.startswith("--out_dir="))
    log = os.path.join(out, "stdout.txt")
    if what := files.special_file(log):  # launch appends to it: a named pipe waits for a reader forever
        raise data.UserError(f"{log} is {what}, not a file, and the run's output is written there; remove it and run "
                             "the study again.")
    finished = os.path.isfile(os.path.join(out, "results.json"))  # then its ckpt.pt is the same run's: not read
    done = report or finished or os.path.isfile(os.path.join(out, DIVERGED))  # (a file where the folder belongs
    if not done and (blocker := files.blocked_parent(log)):  # failed at the run, hours later: "File exists")
        raise data.UserError(f"the run folder {out} can not be written: {blocker}; choose another --out.")
    for name, state in (("results.json", "finished"), ("ckpt.pt", "stopped"), (DIVERGED, "diverged")):
        changed = "" if finished and name == "ckpt.pt" else changed_settings(flags, os.path.join(out, name), report)
        if changed:
            fix = "give --report the --steps, --quick and flags of its study" if report else \
                "pass another --out for a study with these settings"
            raise data.UserError(f"the {state} run in {out} was made with {changed}; {fix}, or delete that folder to "
                                 "redo the run.")
    return out


def check_runs(opts, extra, names):
    """Before anything trains: every folder the study would take as done, diverged or to continue holds a readable
    run of these settings (a damaged or foreign one was named only after all the other runs had trained)."""
    methods = dict.fromkeys(METHOD_OF[n] for n in names)
    for name, seed, eval_dir in [(METHODS[m][0], SELECTION_SEED, opts["val_dir"]) for m in methods] + \
            [(n, s, None) for n in names for s in opts["seeds"]]:
        for lr in opts["grid"]:  # a final run's rate is chosen later: each rate's folder
            folder = check_settings(run_flags(name, seed, lr, opts, extra, eval_dir), opts["report"])
            path = os.path.join(folder, DIVERGED)  # taken as diverged, not run again: one not JSON too, before
            if read_results(folder, opts["steps"]) is None and os.path.lexists(path) and not isinstance(
                    files.read_json(path, REDO.format(folder), records=True).get("config"), dict):
                raise data.UserError(f"{path} is no diverged run's record (no \"config\"); {REDO.format(folder)}")


RUNNING, STOPPING = set(), threading.Event()  # the train.py processes under way; set once the study is stopped
# Python 3.11's AST builder keeps its recursion depth in state its threads share: two runs' threads parsing flags at
# once (ast.literal_eval, in train.parse_config) failed with "AST constructor recursion depth mismatch" (gh-106905)
PARSING = threading.Lock()
HOLD_WAIT = 60  # seconds a run folder's holder, a run of a killed study that is stopping, is given to let it go
ATTEMPT = "==== study.py "  # starts the line that launch writes before each attempt's output in a run's stdout.txt


def run_child(cmd, log, env):
    """cmd's exit code, its output written to log; a SIGTERM to the study reaches it (stop_runs), even one that
    started just after the signal."""
    with subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env) as p:
        RUNNING.add(p)
        if STOPPING.is_set():
            p.terminate()
        try:
            return p.wait()
        finally:
            RUNNING.discard(p)


def stop_runs(signum, frame):
    """SIGTERM to the study: pass it on to the runs under way (each writes its checkpoint, as for Ctrl-C, which the
    terminal sends them itself), then stop as Ctrl-C does. Before, the runs went on training with no study."""
    STOPPING.set()
    for p in list(RUNNING):
        p.terminate()
    raise KeyboardInterrupt


def stop_on_ctrl_c(signum, frame):
    """Ctrl-C: the terminal sends it to the runs under way too (each writes its checkpoint), but in the study only the
    main thread takes it. Its workers stop with it (STOPPING): a wait for a run folder ends (it went on, up to
    HOLD_WAIT), and a run started just after is stopped (it trained to its end, the stopped study waiting for it)."""
    STOPPING.set()
    raise KeyboardInterrupt


def wait_for_folder(out):
    """Wait, up to HOLD_WAIT seconds, for the process that holds the run folder out to let it go; whether it waited.
    A run of a study killed just before (kill -9, the out-of-memory killer) stops on its own (machine.end_with_study),
    but its step and its checkpoint take a while, and train.py refuses a held folder. Only looked at, not kept: the
    run takes it."""
    if not os.path.isdir(out):  # nothing can hold it
        return False
    deadline = time.time() + HOLD_WAIT
    # the study removes its own temporaries (a DIVERGED a kill cut short); the run's are its own, once it holds it
    busy = waited = files.hold(out, (DIVERGED,))
    if busy:
        print(f"waiting up to {HOLD_WAIT:g} s for {busy} to let go of {out}: a run of an earlier study, which stops "
              "after its step and its checkpoint", flush=True)
    while busy and time.time() < deadline and not STOPPING.wait(0.2):  # Ctrl-C or SIGTERM ends the wait too
        busy = files.hold(out, ())
    files.let_go(out)
    if busy:
        raise data.UserError(f"the run folder {out} is still in use by {busy} after {HOLD_WAIT:g} s; wait for that "
                             "process to end, or stop it (kill sends SIGTERM: it writes its checkpoint), then run the "
                             "study again.")
    return bool(waited)


def launch(flags, threads):
    """One run in its own process (one thread budget each): (status, seconds). A finished run is not
    rerun, a stopped one resumes; a run whose loss diverged is "diverged" (and not rerun), any other failure raises."""
    with PARSING:
        out, settings = check_settings(flags), flags
    if wait_for_folder(out):  # before anything there is read again or emptied
        with PARSING:  # the checkpoint that run wrote meanwhile
            check_settings(flags)
    for name, status in (("results.json", "done before"), (DIVERGED, "diverged before")):  # not run again
        if os.path.isfile(os.path.join(out, name)):
            return status, 0.0
    how = "train.py starts the run"
    if os.path.isfile(os.path.join(out, "ckpt.pt")):  # stopped by Ctrl-C: continue it exactly
        flags, how = flags + ["--init_from=resume"], "train.py resumes the run from its checkpoint"
    elif any(os.path.lexists(os.path.join(out, f)) for f in train.RUN_FILES + ("log.jsonl",)):
        flags = flags + ["--overwrite=True"]  # killed (kill -9) before its first checkpoint: nothing to continue
        how = "train.py starts the run again (the last start was killed before its first checkpoint)"
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", machine.STUDY: str(os.getpid()),
           "PYTHONIOENCODING": "utf-8:backslashreplace",  # stdout.txt in UTF-8 whatever the locale (ASCII escaped bars)
           # stdout.txt follows the run as it prints, and a stopping run of a killed study has written its last lines
           # when it lets its folder go (buffered, they came as it exited, after the next attempt's first line)
           "PYTHONUNBUFFERED": "1"}
    t = time.time()
    # appended to, after a line that starts this attempt: an earlier attempt's output (why it failed) is kept
    with open(os.path.join(out, "stdout.txt"), "a", encoding="utf-8") as log:
        log.write(("\n" if log.tell() else "") + f"{ATTEMPT}{time.strftime('%Y-%m-%d %H:%M:%S')}: {how} ====\n")
        log.flush()
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
        code = run_child([sys.executable, script] + flags, log, env)
    if code == machine.INTERRUPTED:
        raise data.UserError(f"the run in {out} was stopped (Ctrl-C or SIGTERM) after writing its checkpoint; run the "
                             "study again to continue it.")
    if code:
        said = [line.strip() for line in last_attempt(os.path.join(out, "stdout.txt")) if line.strip()]
        tail = said[-1] if said else f"it ended with exit code {code} and printed nothing"
        if code < 0:  # killed by a signal (9: kill -9, the out-of-memory killer): its last line is no error of its own
            tail = f"it was killed by signal {-code} ({signal.strsignal(-code)})"
        if re.search(r"error: the (loss|gradient norm|validation loss) became", tail):  # train.check_finite's
            config = {k: v for k, v in train.parse_config(settings).items() if not k.startswith("_")}
            files.write_atomic(os.path.join(out, DIVERGED), json.dumps({"config": config, "error": tail}, indent=1))
            return "diverged", time.time() - t
        raise data.UserError(f"the run in {out} failed: {tail.rstrip('.')}; its log is {out}/stdout.txt, and the study "
                             "continues from it when rerun.")
    return "done", time.time() - t


def last_attempt(path):
    """The lines of a run's stdout.txt after its last ATTEMPT line (launch's): the output of its latest attempt, which
    alone says how that attempt ended (all of a log written before study.py marked its attempts)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(ATTEMPT)]
    return lines[starts[-1] + 1:] if starts else lines


def changed_settings(flags, path, given_only=False):
    """'key=saved (now value)' for each setting that `flags` make (given_only: that they give) and that the run saved
    at `path` (its results.json or ckpt.pt) had otherwise, "" if none or no such file. Settings that move only rounding
    or speed are no change, nor paths to the same file; a damaged file is the report's or the resume's to name."""
    try:
        if files.special_file(path):  # a named pipe would wait for a writer forever
            return ""
        if path.endswith(".pt"):
            saved = train.saved_config(path)[0]
        else:
            saved = dict(files.read_json(path, "", records=True)["config"])  # no object: damage, not a traceback
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # UserError is a ValueError
        return ""
    cfg, real = train.parse_config(flags), lambda v: os.path.realpath(v) if isinstance(v, str) and v else v
    same = lambda k: real(saved[k]) == real(cfg[k]) if k in PATHS else saved[k] == cfg[k]
    return ", ".join(f"{k}={saved[k]!r} (now {cfg[k]!r})" for k in (cfg["_explicit"] if given_only else cfg)
                     if not k.startswith("_") and k in saved and k not in NOT_A_CHANGE and not same(k))


def run_all(jobs, opts, later=0):
    """Run (label, flags) jobs, `workers` at a time, with progress and an estimate of the time left
    (counting `later` runs still to come after these)."""
    threads = max(1, data.cores() // opts["workers"])
    start, ran, statuses = time.time(), 0, []
    pool, failures, under_way = ThreadPoolExecutor(opts["workers"]), [], set()
    try:
        try:
            for i, ((label, _), (status, secs)) in enumerate(zip(jobs, pool.map(
                    lambda job: launch_noting_failure(*job, threads, failures, under_way, opts["out"]),
                    enumerate(jobs)))):
                ran += not status.endswith(" before")
                minutes = (time.time() - start) / 60
                left = minutes / max(ran, 1) * (len(jobs) - i - 1 + later)
                print(f"[{i + 1}/{len(jobs)}] {label}: {status}" + (f" in {secs:.0f} s" if secs else "") +
                      f" ({minutes:.1f} min so far, about {left:.0f} min left)", flush=True)
                statuses.append(status)
        finally:
            pool.shutdown(cancel_futures=True)  # after a failure or Ctrl-C, start nothing new
    except (KeyboardInterrupt, data.UserError, OSError) as stop:  # a Ctrl-C after a failure: main names the failure
        stop.failed = failures[0][1] if failures else None
        runs_left(jobs, {j for j, _ in failures}, later, opts)
        raise
    return statuses


def runs_left(jobs, failed, later, opts):
    """After a stop or a failure (whose sentence main says): each run not finished, as its progress line names it,
    in the state it is left in (failed: the indexes of jobs that did), and the command that continues the study."""
    lines = []
    for i, (label, flags) in enumerate(jobs):
        out = next((f.partition("=")[2] for f in reversed(flags) if f.startswith("--out_dir=")), "")
        there = set(os.listdir(out)) if out and os.path.isdir(out) else set()
        if not there & {"results.json", DIVERGED}:  # finished, or diverged: not run again
            state = "failed" if i in failed else "stopped, resumes from its checkpoint" if "ckpt.pt" in there else \
                "stopped before its first checkpoint, starts again" if "stdout.txt" in there else "not started"
            lines.append(f"[{i + 1}/{len(jobs)}] {label}: {state}")
    if later:
        lines.append(f"and the {later} final run{'s' * (later > 1)}, after the selection: not started")
    if lines and opts.get("command"):
        print("\n".join(lines + [f"continue the study with: {opts['command']}"]), flush=True)


FAILING = threading.Lock()  # run_all's workers note a failure and the runs under way under it


def launch_noting_failure(i, job, threads, failures, under_way, out):
    """launch run_all's i-th (label, flags) job, unless a job before it has failed: then it does not start. A failure
    is added to `failures`, as (i, error), unless it came after a Ctrl-C or SIGTERM (a run stopped, a wait for a folder
    cut short: the stop's errors), and said at once with the runs under way, which the study waits for to report it."""
    label, flags = job
    with FAILING:
        if any(i > j for j, _ in failures):  # never reported: run_all reaches the earlier job's failure first
            raise data.UserError(f"{label} was not started, as a run had failed.")
        under_way.add(i)
    try:
        if files.lost(out):  # a second study may hold --out now, and launch the same runs
            raise data.UserError(f"--out {out} lost its lock file {files.LOCK} while the study ran (deleted, with the "
                                 "folder perhaps), so a second study could run there beside this one; make sure none "
                                 "does, then run this one again to continue.")
        return launch(flags, threads)
    except (data.UserError, OSError) as e:
        if not STOPPING.is_set():
            with FAILING:
                failures.append((i, e))
                under_way.discard(i)
                others = len(under_way)
            if others:  # the study says it once they end: hours, perhaps, of nothing said
                print(f"{label}: {str(e).rstrip('.')}; the study waits for the {others} other run"
                      f"{'s' * (others > 1)} under way to end, then stops (Ctrl-C stops them with their checkpoints, "
                      "to resume when it is run again)", flush=True)
        raise
    finally:
        with FAILING:
            under_way.discard(i)


def read_results(folder, steps=None):
    """results.json of a finished run with its loss curve, or None; one of other than `steps` steps is refused (a
    --report with another --steps, or a folder left by another study, would be reported as this study's)."""
    path = os.path.join(folder, "results.json")
    if not os.path.exists(path):  # a folder or a named pipe of that name is read_json's to name
        return None
    # train.py writes both atomically: a damaged one was edited, or its disk failed
    res = files.read_json(path, REDO.format(folder), records=True)  # records: a key given twice is refused
    try:
        if what := files.special_file(os.path.join(folder, "log.jsonl")):  # opening a named pipe waits forever
            raise OSError(f"log.jsonl is {what}")
        with open(os.path.join(folder, "log.jsonl"), encoding="utf-8") as f:
            res["curve"] = [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]
        if res["config"].get("eval_only") is True:  # a re-scoring by hand: an older train.py wrote no training time
            res.setdefault("train_seconds", None)  # None: not known (seconds_cell)
        # what the tables and charts read: a nan score won choose_lr's max, a 1e308 overflowed the means
        if problem := evaluation.results_problem(res, [v for point in res["curve"] for v in point]):
            raise ValueError(problem)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError, RecursionError) as e:
        raise data.UserError(f"the run in {folder} is damaged ({type(e).__name__}: {str(e)[:80]}); delete that folder "
                             "and run the study again to redo the run.") from None
    if steps is not None and res.get("config", {}).get("max_iters", steps) != steps:
        raise data.UserError(f"the run in {folder} trained {res['config']['max_iters']} steps, not this study's "
                             f"{steps}: pass the --steps (and --quick) of its study, or give this study its own --out.")
    return res


def average(res):
    return sum(res["scores"].values()) / len(res["scores"])


def check_tasks(runs):
    """Refuse runs ({folder: results or None}) not all scored on the same tasks: an average over other tasks is
    no score of the same thing (a task file added to or removed from eval_dir or val_dir while a study resumed)."""
    scored = [(folder, sorted(res["scores"])) for folder, res in runs.items() if res is not None]
    for folder, tasks in scored[1:]:
        if tasks != (first := scored[0])[1]:
            raise data.UserError(f"the run in {folder} was scored on the tasks {', '.join(tasks)}, the run in "
                                 f"{first[0]} on {', '.join(first[1])}; a study averages and compares the same tasks "
                                 "in every run: delete the run(s) scored on other tasks and run the study again with "
                                 "the same task files in val_dir and eval_dir.")


def choose_lr(by_lr):
    """The learning rate whose selection run has the best mean validation score; {lr: results or None}. A tie goes to
    the smaller rate, as do means 1e-9 apart: equal ones summed in another order differ in their last bits."""
    if not (scored := {lr: average(res) for lr, res in by_lr.items() if res is not None}):
        raise data.UserError("every selection run diverged or is missing; widen GRID towards smaller rates, or with "
                             "--report name only the runs the study ran (--runs).")
    return min(lr for lr, mean in scored.items() if mean >= max(scored.values()) - 1e-9)


def selection(opts, extra, names, later=0):
    """The selection runs of every method of `names` (run unless --report); {method: (its learning rate,
    {lr: mean validation score or None})}."""
    methods = sorted({METHOD_OF[n] for n in names}, key=list(METHODS).index)
    jobs = [(f"select {METHODS[m][0]} lr {lr:g}", run_flags(METHODS[m][0], SELECTION_SEED, lr, opts, extra,
                                                            opts["val_dir"])) for m in methods for lr in opts["grid"]]
    if not opts["report"]:
        run_all(jobs, opts, later)
    chosen, runs = {}, {}
    for m in methods:
        folders = {lr: run_dir(opts, METHODS[m][0], lr) for lr in opts["grid"]}
        by_lr = {lr: read_results(folder, opts["steps"]) for lr, folder in folders.items()}
        runs.update({folders[lr]: res for lr, res in by_lr.items()})
        check_tasks(runs)  # before choose_lr compares their means
        chosen[m] = choose_lr(by_lr), {lr: average(res) if res else None for lr, res in by_lr.items()}
    return chosen


def load(opts, names, chosen):
    """run name -> list of results dicts (one per finished seed, at the run's chosen learning rate); every run, and
    the selection run of each rate, scored on the same tasks."""
    out, runs = {}, {}
    for m in dict.fromkeys(METHOD_OF[n] for n in names):  # its rate's selection run: chosen on the same tasks
        folder = run_dir(opts, METHODS[m][0], chosen[m][0])
        runs[folder] = read_results(folder, opts["steps"])
    for name in names:
        lr = chosen[METHOD_OF[name]][0]
        for seed in opts["seeds"]:
            folder = run_dir(opts, name, lr, seed)
            res = runs[folder] = read_results(folder, opts["steps"])
            if res is not None:
                out.setdefault(name, []).append(res)
    check_tasks(runs)  # the tables' columns are the first run's tasks, and every average is over its run's own
    return out


def mean_std(values):
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def fmt(values):
    m, s = mean_std(values)
    return f"{m:.1f}±{s:.1f}" if len(values) > 1 else f"{m:.1f}"


def table(title, rows, results, tasks, chosen, seeds=()):
    """A table's lines; a row over fewer than the study's `seeds` says over how many (missing_runs names the rest)."""
    chance = next(iter(results.values()))[0].get("chance", {})
    lines = [f"### {title}", "", "| " + " | ".join(["method", "lr", "Params%"] + tasks + ["average", "train s"]) + " |",
             "|" + "---|" * (len(tasks) + 5)]
    if chance:
        lines.append("| chance | | | " + " | ".join(f"{chance[t]:.1f}" for t in tasks) +
                     f" | {sum(chance[t] for t in tasks) / len(tasks):.1f} | |")
    for label, name in rows:
        if not (runs := results.get(name)):
            lines.append(f"| {label} | (not run) |" + " |" * (len(tasks) + 3))
            continue
        pct = 100 * runs[0]["trainable_params"] / runs[0]["base_params"]
        cells = [fmt([r["scores"][t] for r in runs]) for t in tasks]
        secs = seconds_cell([r["train_seconds"] for r in runs])
        label += f" ({len(runs)} of {len(seeds)} seeds)" if len(runs) < len(seeds) else ""
        lines.append(f"| {label} | {chosen[METHOD_OF[name]][0]:g} | {pct:.2f} | " + " | ".join(cells) +
                     f" | **{fmt([average(r) for r in runs])}** | {secs} |")
    return lines


def seconds_cell(seconds):
    """The training time of a table's row over the runs that know theirs. None is not known: a run re-scored by hand
    (train.py --eval_only=True) from its adapter.pt alone, or resumed or re-scored from a ckpt.pt of an older train.py
    (checkpoint.trained)."""
    if not (known := [s for s in seconds if s is not None]):
        return "not known"
    return fmt(known) + (f" ({len(known)} of {len(seconds)} runs known)" if len(known) < len(seconds) else "")


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_difference(a, b):
    """(mean of a - b, half-width of its 95% interval) over paired values: Student's t with n - 1 degrees of
    freedom on the n differences (from 31 pairs on, the 30 degrees' quantile: a little wider, 4% at 1000)."""
    if len(a) != len(b):  # zip(strict=True) says so only from Python 3.10
        raise ValueError(f"paired values need as many of each, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:  # one pair has no spread to estimate: an interval of width 0 would call any difference
        raise ValueError(f"a paired interval needs at least 2 pairs, got {len(d)}")
    m, s = mean_std(d)
    return m, T95[min(len(d) - 1, len(T95)) - 1] * s / math.sqrt(len(d))


def comparisons(results):
    """Every run against TeamLoRA, paired by seed: the mean difference of the average score and its
    95% interval. An interval that excludes 0 is a difference the study resolves."""
    base = {r["config"]["seed"]: average(r) for r in results.get("teamlora", [])}
    lines = ["| run minus TeamLoRA 4x8 | seeds | difference | 95% interval | verdict |", "|---|---|---|---|---|"]
    for name, runs in results.items():
        pairs = [(average(r), base[r["config"]["seed"]]) for r in runs if r["config"]["seed"] in base]
        if name == "teamlora" or len(pairs) < 2:
            continue
        m, h = paired_difference(*zip(*pairs))
        verdict = "higher" if m - h > 0 else "lower" if m + h < 0 else "cannot tell"
        lines.append(f"| {RUNS[name][0]} | {len(pairs)} | {m:+.1f} | {m - h:+.1f} .. {m + h:+.1f} | {verdict} |")
    return lines if len(lines) > 2 else ["(comparisons need at least 2 seeds of TeamLoRA and of another run)"]


def missing_runs(opts, names, chosen, results):
    """A line for each run with seeds missing from its means: which, and whether each diverged or is not finished."""
    lines = []
    for name in names:
        have = {r["config"]["seed"] for r in results.get(name, [])}
        lr = chosen[METHOD_OF[name]][0]
        gone = [f"seed {s} " + ("diverged" if os.path.isfile(os.path.join(run_dir(opts, name, lr, s), DIVERGED))
                                else "not finished")
                for s in opts["seeds"] if s not in have]
        lines += [f"- {RUNS[name][0]}: {', '.join(gone)}"] if gone else []
    return lines


def selection_table(chosen, opts):
    """A run with no score diverged (launch left its DIVERGED) or has not finished (a --report during the study)."""
    grid = sorted({lr for _, scores in chosen.values() for lr in scores})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen |", "|" + "---|" * (len(grid) + 2)]
    for m, (lr, scores) in chosen.items():
        diverged = {g for g in grid if os.path.isfile(os.path.join(run_dir(opts, METHODS[m][0], g), DIVERGED))}
        cells = [f"{scores[g]:.1f}" if scores.get(g) is not None else "diverged" if g in diverged else "not run"
                 for g in grid]
        lines.append(f"| {RUNS[METHODS[m][0]][0]} | " + " | ".join(cells) + f" | {lr:g} |")
    return lines


def mean_curve(results, name):
    """(steps, training loss averaged over the seeds) of a run, or None if it has no log."""
    if not (runs := [r["curve"] for r in results.get(name, []) if r["curve"]]):
        return None
    n = min(len(c) for c in runs)
    return [runs[0][i][0] for i in range(n)], [sum(c[i][1] for c in runs) / len(runs) for i in range(n)]


def mean_loads(results, name):
    """(number of seeds, task -> expert shares averaged over the seeds) of a run, or None."""
    if not (runs := [r for r in results.get(name, []) if r.get("expert_load")]):
        return None
    return len(runs), {t: [sum(r["expert_load"][t][i] for r in runs) / len(runs) for i in range(len(load))]
                       for t, load in sorted(runs[0]["expert_load"].items())}


def loss_chart(results, width=64, height=14):
    """Training loss (mean over seeds, smoothed over 5 logged points) against step, in text."""
    series = {}
    for name in CURVES:
        if curve := mean_curve(results, name):
            steps, mean = curve
            window = [mean[max(0, i - 4):i + 1] for i in range(len(mean))]
            series[name] = (steps, [sum(w) / len(w) for w in window])
    if not series:
        return []
    top = max(max(v) for _, v in series.values())
    low = min(min(v) for _, v in series.values())
    last = max(max(s[-1] for s, _ in series.values()), 1)  # runs that logged only step 0 (a hand-edited log)
    grid = [[" "] * width for _ in range(height)]
    for name, (steps, values) in series.items():
        for s, v in zip(steps, values):
            x = min(width - 1, int((s / last) * (width - 1)))
            y = min(height - 1, int((top - v) / max(top - low, 1e-9) * (height - 1)))
            grid[y][x] = CURVES[name]
    lines = [f"{top - (top - low) * i / (height - 1):6.2f} |" + "".join(row) for i, row in enumerate(grid)]
    lines.append(" " * 7 + "+" + "-" * width)
    lines.append(" " * 8 + f"step 0{' ' * (width - 12)}{last:>6}")
    lines += [f"  {CURVES[n]} = {RUNS[n][0]}: {v[-1]:.2f} at the end" for n, (_, v) in series.items()]
    lines.append("  (a later letter hides an earlier one where two curves share a cell; loss.png, written when "
                 "matplotlib is installed, shows every curve)")
    return lines


def load_chart(results, name="teamlora"):
    """Each task's mean expert share (last layers, mean over seeds): the paper's Figure 5."""
    if not (loads := mean_loads(results, name)):
        return []
    seeds, per_task = loads
    k, layers = len(next(iter(per_task.values()))), results[name][0]["config"].get("load_layers", 2)  # the study's
    lines = [f"expert load of {RUNS[name][0]} over each task's prompt tokens (last {layers} layers, mean of {seeds} "
             f"seed(s); even = {1 / k:.2f})"]
    for t, load in per_task.items():
        lines.append(f"{t:<11}" + "  ".join(f"e{i} {'█' * round(v * 40):<16}{v:.3f}" for i, v in enumerate(load)))
    return lines


def pyplot():
    """matplotlib's pyplot, drawing into files, or None where matplotlib is not installed (never required)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def pngs(results, out):
    """loss.png and expert_load.png, when matplotlib is installed; the paths written. A folder (or other non-file) of
    a chart's name is kept, and said so, as check_out said before the runs: the study failed on it after report.md."""
    plt, written = pyplot(), []
    curves, loads = {name: c for name in CURVES if (c := mean_curve(results, name))}, mean_loads(results, "teamlora")
    for name, drawn in zip(CHARTS, (curves, loads) if plt else ()):
        if what := drawn and files.special_file(path := os.path.join(out, name)):
            print(f"note: {name} is not written, as {path} is {what}, not a file; {KEPT_FIX}.", file=sys.stderr)
        elif drawn:
            fig, ax = plt.subplots(figsize=(7, 4) if drawn is curves else (5, 4))
            if drawn is curves:
                for run, curve in curves.items():
                    ax.plot(*curve, label=RUNS[run][0])
                ax.set(xlabel="step", ylabel="training loss (mean over seeds)", yscale="log")
                ax.legend()
            else:
                fig.colorbar(ax.imshow(list(loads[1].values()), cmap="viridis"))
                ax.set(yticks=range(len(loads[1])), yticklabels=list(loads[1]), xlabel="expert",
                       title="TeamLoRA expert load")
            fig.tight_layout()
            written.append(path)
            files.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))  # a Ctrl-C keeps the old one
    return written


def report(opts, names, chosen):
    if not (results := load(opts, names, chosen)):
        raise data.UserError(f"no finished runs in {opts['out']}; run python study.py first.")
    tasks = sorted(next(iter(results.values()))[0]["scores"])
    seeds = ",".join(map(str, opts["seeds"]))
    lines = [f"## mini-CME study: {opts['steps']} steps, seeds {seeds}, scores in % (mean±std over seeds)", "",
             f"### Learning-rate selection (mean validation score, seed {SELECTION_SEED}; the other runs of a "
             "method reuse its rate)", ""] + selection_table(chosen, opts) + [""]
    for title, rows in TABLES.items():
        lines += table(title, rows, results, tasks, chosen, opts["seeds"]) + [""]
    if missing := missing_runs(opts, names, chosen, results):  # never averaged over fewer seeds without a word
        lines += ["### Runs missing from the means above", ""] + missing + [""]
    lines += ["### Differences against TeamLoRA (average score, paired by seed)", ""] + comparisons(results) + [""]
    for title, chart in (("Training loss (the paper's Figure 4b)", loss_chart(results)),
                         ("Expert load (the paper's Figure 5)", load_chart(results))):
        if chart:  # none where no run of the study draws one
            lines += [f"### {title}", "", "```"] + chart + ["```", ""]
    text = "\n".join(lines).rstrip("\n") + "\n"
    print(text)
    report_md = os.path.join(opts["out"], "report.md")  # a user's is kept; a read-only study still reports
    if blocker := files.blocked_parent(report_md) or (f"{k}; {KEPT_FIX}" if (k := files.kept(report_md)) else None):
        print(f"note: report.md and the charts are not written, as {blocker}.", file=sys.stderr)
        return results
    files.write_own(report_md, text)  # with the record by which the next report knows it as the study's (files.kept)
    for p in pngs(results, opts["out"]):
        print(f"wrote {p}")
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(docstring(__file__))
        return None
    STOPPING.clear()
    previous = {s: signal.signal(s, stop) for s, stop in ((signal.SIGTERM, stop_runs), (signal.SIGINT, stop_on_ctrl_c))
                if machine.takes_signal(s)}
    try:
        opts, extra, names = parse(argv)
        opts["command"] = f"python {shlex.quote(os.path.relpath(__file__))} {shlex.join(argv)}"  # as given here
        cfg = train.parse_config(extra)  # checks the extra keys once, before anything runs
        for (key, value), fix in ONE_RUN.items():  # one failed the first run, after the demo's base; one did nothing
            if cfg[key] == value:
                raise data.UserError(f"--{key}={value} is train.py's, for the one run in its --out_dir, and {fix}.")
        if not opts["report"]:
            files.check_openable_by_torch(opts, ("out",), ("val_dir",))  # its runs' out_dir and eval_dir, as train.py
            check_out(opts["out"])
            if not cfg["eval_dir"]:  # the final runs would train and write no scores: "no finished runs", hours later
                raise data.UserError("--eval_dir is empty, and the study scores its final runs on it; give the folder "
                                     "of the test sets (<task>.jsonl).")
            if os.path.realpath(cfg["eval_dir"]) == os.path.realpath(opts["val_dir"]):
                raise data.UserError(f"--val_dir and --eval_dir are the same folder ({opts['val_dir']}), so the "
                                     "learning rates would be chosen on the test sets; give the validation sets a "
                                     "folder of their own.")
            check_runs(opts, extra, names)
            sets = (("val_dir", opts["val_dir"]), ("eval_dir", cfg["eval_dir"]))
            # sets of one's own are read before the demo's suite and base are built (minutes: a typo was found after
            # them); the demo's own sets are made by build_demo, and read below
            demo = {os.path.normpath(OPTIONS["val_dir"]), os.path.normpath(train.DEFAULTS["eval_dir"])}
            for key, folder in sets:
                if os.path.normpath(folder) not in demo:
                    evaluation.load_eval_sets({key: folder, "eval_limit": 0}, key)
            if stopped := train.build_demo(cfg):  # the suite, its shards and the base, when the demo defaults are used
                kept = f"its checkpoint of step {stopped['step']} is kept" if stopped.get("step") else "before its " \
                    "first checkpoint"
                raise data.UserError(f"pretraining the demo's base was interrupted ({kept}); run the study again to "
                                     "continue it.")
            # the sets the runs score, read now: a fault in eval_dir stopped the final runs, after hours of selection
            for key, folder in sets:
                evaluation.load_eval_sets({key: folder, "eval_limit": 0}, key)
            if busy := files.hold(opts["out"]):  # a second study there would truncate the live one's run logs
                raise data.UserError(f"--out {opts['out']} is in use by {busy}, a study still running; wait for it to "
                                     "end, or choose another --out.")
        elif not os.path.isdir(os.path.join(opts["out"], "select")):  # before the report's headline
            raise data.UserError(f"--report found no study in {opts['out']}/ (no select/ folder): run python study.py "
                                 "first, or pass the --out (and --quick) of the study to report on.")
        else:  # a run of another seed, rate or configuration there (a folder copied or linked in) was reported as one
            check_runs(opts, extra, names)
        n_final = len(names) * len(opts["seeds"])
        n_select = len({METHOD_OF[n] for n in names}) * len(opts["grid"])
        runs = f"{n_select} selection runs, then {n_final} final runs ({len(names)} configurations x " \
               f"{len(opts['seeds'])} seeds)"
        print(f"a report on {runs} in {opts['out']}/" if opts["report"] else
              f"{runs}, {opts['workers']} at a time; results in {opts['out']}/", flush=True)
        chosen = selection(opts, extra, names, later=n_final)
        if not opts["report"]:
            jobs = [(f"{name} seed {seed} lr {chosen[METHOD_OF[name]][0]:g}",
                     run_flags(name, seed, chosen[METHOD_OF[name]][0], opts, extra))
                    for seed in opts["seeds"] for name in names]
            run_all(jobs, opts)
        return report(opts, names, chosen)
    except (data.UserError, OSError) as e:  # a full disk or a folder in the way: one line, as data.py says it
        exit_with(e, "study.py: ")
    except KeyboardInterrupt as stop:  # Ctrl-C reached the runs under way too: each writes its checkpoint
        # (a traceback before). One while the study waited for them after a run failed: that failure, as it ends on it
        if failed := getattr(stop, "failed", None):
            exit_with(failed if isinstance(failed, OSError) else data.UserError(
                f"{str(failed).rstrip('.')}; study.py was then stopped (Ctrl-C or SIGTERM), and the runs under way "
                "resume from their checkpoints when it is run again."), "study.py: ")
        machine.leave(machine.fail("study.py stopped; run the same command again to continue where it stopped (a run "
                                   "under way resumes from its checkpoint).", machine.INTERRUPTED))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    run_script(main)
