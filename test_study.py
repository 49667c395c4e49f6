"""study.py: the protocol (selection on validation, paired differences) and the pipeline end to end on the
small suite.

    python -m pytest -q
"""
import ast
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import checkpoint
import study
import train
from conftest import held_by_another_process, named_pipe, non_ascii_names, script_error, train_flags
from model import Transformer


def small_study_flags(monkeypatch, run_data, out, *more):
    """The study's flags on the small suite; its runs' own settings (refused as flags) shrunk in COMMON."""
    monkeypatch.setitem(study.COMMON, "eval_limit", 4)
    monkeypatch.setitem(study.COMMON, "r", 8)
    return [f"--data_dir={run_data / 'tokens'}", f"--eval_dir={run_data / 'test'}", f"--val_dir={run_data / 'val'}",
            f"--tokenizer={run_data / 'tokenizer.model'}", f"--init_from={run_data / 'base.pt'}",
            "--max_len=128", "--batch_size=8", "--eval_batch_size=32", f"--out={out}", "--seeds=2", "--steps=3", *more]


def sets_in(*folders):
    """Each folder made, holding a one-record evaluation set: what the study reads before its first run."""
    for folder in folders:
        folder.mkdir()
        (folder / "qa.jsonl").write_text(json.dumps({"instruction": "q", "input": "", "output": "a"}) + "\n")


def test_study_runs_end_to_end_and_its_tables_are_the_runs_means(run_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(study, "GRID", (1e-3, 4e-3))
    out = tmp_path / "study"
    flags = small_study_flags(monkeypatch, run_data, out, "--runs=lora32,hydralora,teamlora")
    results = study.main(flags)
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.strip() in printed and "about" in printed and "min left" in printed  # progress with an ETA
    for name in ("lora32", "hydralora", "teamlora"):
        assert len(results[name]) == 2 and all(len(r["curve"]) > 0 for r in results[name])
    # selection runs were scored on the validation sets, final runs on the test sets
    select = json.loads(next((out / "select").glob("teamlora-lr*/results.json")).read_text())
    assert select["config"]["eval_dir"] == str(run_data / "val") and select["config"]["seed"] == 0
    lr = results["teamlora"][0]["config"]["learning_rate"]
    finals = [json.loads((out / f"teamlora-lr{lr:g}-seed{s}" / "results.json").read_text()) for s in (1, 2)]
    assert all(f["config"]["eval_dir"] == str(run_data / "test") for f in finals)
    # a cell of the report is the mean and standard deviation of the runs' own results.json
    task = sorted(finals[0]["scores"])[0]
    m, sd = np.mean([f["scores"][task] for f in finals]), np.std([f["scores"][task] for f in finals], ddof=1)
    table2 = report[report.index("### Methods at matched parameters"):]
    row = next(line for line in table2.splitlines() if line.startswith("| TeamLoRA 4x8 |"))
    assert row.split(" | ")[1] == f"{lr:g}" and row.split(" | ")[3] == f"{m:.1f}±{sd:.1f}"
    assert "| chance |" in report and "| MoELoRA 4x8 | (not run) |" in report  # rows not run are marked
    assert "| LoRA r=32 | 2 |" in report and "95% interval" in report
    assert "T = TeamLoRA 4x8" in report and "expert load of TeamLoRA 4x8" in report
    # rerunning finds every run finished and only reprints the tables
    study.main(flags)
    assert capsys.readouterr().out.count("done before") == 6 + 6
    # a run stopped after its checkpoint (Ctrl-C) but before its scores is resumed, not redone
    lora_lr = results["lora32"][0]["config"]["learning_rate"]
    stopped = out / f"lora32-lr{lora_lr:g}-seed1"
    first = json.loads((stopped / "results.json").read_text())
    (stopped / "results.json").unlink()
    study.main(flags)
    assert capsys.readouterr().out.count("done before") == 11
    assert "resumed from" in (stopped / "stdout.txt").read_text(encoding="utf-8")
    assert json.loads((stopped / "results.json").read_text())["scores"] == first["scores"]
    study.main(flags + ["--report"])  # reads the runs, runs none: says so
    printed = capsys.readouterr().out
    assert printed.startswith("a report on 6 selection runs, then 6 final runs (3 configurations x 2 seeds) in ")
    assert "at a time" not in printed  # 3 methods x 2 rates, 3 runs x 2 seeds


def fake_run(folder, lr, scores, seed=0):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"scores": scores, "config": {"learning_rate": lr, "seed": seed},
                                                     "trainable_params": 8, "base_params": 800, "train_seconds": 1.0}))
    (folder / "log.jsonl").write_text("")


def test_selection_reads_the_validation_runs_and_never_the_test_runs(tmp_path):
    opts, extra, names = study.parse([f"--out={tmp_path}", "--runs=teamlora,teamlora_k8", "--report"])
    # validation prefers 6.3e-4 (a tie with 1.6e-3 goes to the smaller rate); the test runs would prefer 4e-3,
    # and so would the best single task: the choice is on the mean over tasks
    for lr, score, spread in zip(study.GRID, (40.0, 70.0, 70.0, 50.0), (0.0, 10.0, 5.0, 40.0)):
        fake_run(tmp_path / "select" / f"teamlora-lr{lr:g}", lr, {"a": score + spread, "b": score - spread})
    for seed in (1, 2):
        fake_run(tmp_path / f"teamlora-lr4e-03-seed{seed}", 4e-3, {"a": 99.0, "b": 99.0}, seed)
    chosen = study.selection(opts, extra, names)
    assert chosen == {"teamlora": (6.3e-4, {2.5e-4: 40.0, 6.3e-4: 70.0, 1.6e-3: 70.0, 4e-3: 50.0})}
    assert study.load(opts, names, chosen) == {}  # the 4e-3 test runs are not the chosen rate's
    # a selection run is told to score the validation sets, whatever eval_dir the user gave
    flags = study.run_flags("teamlora", 0, 6.3e-4, opts, ["--eval_dir=TEST"], eval_dir="VAL")
    assert train.parse_config(flags)["eval_dir"] == "VAL" and train.parse_config(flags)["seed"] == 0
    assert study.choose_lr({1e-3: None, 2e-3: {"scores": {"a": 1.0}}}) == 2e-3  # a diverged run scores nothing
    # a tie goes to the smaller rate whatever order the runs are read in, not to the first read
    assert study.choose_lr({2e-3: {"scores": {"a": 5.0}}, 1e-3: {"scores": {"a": 5.0}}}) == 1e-3
    with pytest.raises(study.data.UserError, match="every selection run diverged"):
        study.choose_lr({1e-3: None})


def test_a_tie_in_the_mean_validation_score_goes_to_the_smaller_rate_whatever_order_it_was_summed_in():
    """Equal means (the same scores on other tasks: 100/30 steps with --quick's 30 records a task) summed in another
    order differ in their last bit, and the larger rate won a third of such ties; a real difference still wins."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        scores = (rng.integers(0, 31, 7) * 100 / 30).tolist()
        other = rng.permutation(scores).tolist()
        assert sum(map(Fraction, scores)) == sum(map(Fraction, other))  # the same mean, exactly
        for small, large in ((scores, other), (other, scores)):
            runs = {4e-3: {"scores": dict(zip("abcdefg", large))}, 6.3e-4: {"scores": dict(zip("abcdefg", small))}}
            assert study.choose_lr(runs) == 6.3e-4
            large = [v + 0.1 * (i == 0) for i, v in enumerate(large)]  # one record more right of 1000 on one task
            runs[4e-3] = {"scores": dict(zip("abcdefg", large))}
            assert study.choose_lr(runs) == 4e-3


def test_paired_difference_has_a_students_t_interval():
    m, h = study.paired_difference([3.0, 4.0, 5.0], [2.0, 2.0, 2.0])  # differences 1, 2, 3: mean 2, sd 1
    assert m == pytest.approx(2.0) and h == pytest.approx(4.303 * 1 / math.sqrt(3))


def test_without_flags_the_study_runs_and_only_report_writes_the_report_alone():
    """`python study.py` (README: 1 to 2 hours) trains the study's runs; --report only reads the runs there are."""
    opts, _, names = study.parse([])
    assert opts["report"] is False and opts["quick"] is False and names == list(study.RUNS)
    assert study.parse(["--report"])[0]["report"] is True


def test_seeds_are_a_count_or_a_list_and_the_selection_seed_is_not_one_of_them():
    assert study.parse(["--seeds=3"])[0]["seeds"] == (1, 2, 3)
    assert study.parse(["--seeds=11,12,13"])[0]["seeds"] == (11, 12, 13)
    quick = study.parse(["--quick"])[0]
    assert quick["steps"] < study.OPTIONS["steps"] and quick["out"] == study.OPTIONS["out"] + "_quick"
    assert study.parse(["--quick", "--out=out/mine"])[0]["out"] == "out/mine"  # a user's own folder, as given
    smallest = study.parse(["--steps=2", "--quick", "--seeds=3"])[0]  # the user's own win over --quick's, in any order
    assert (smallest["steps"], smallest["seeds"], smallest["grid"]) == (2, (1, 2, 3), study.QUICK["grid"])
    for accepted in ([], ["--seeds=3"], ["--seeds=11,12,13"], ["--quick"]):  # the selection runs' seed is none of them
        assert study.SELECTION_SEED not in study.parse(accepted)[0]["seeds"]
    for bad in ("--seeds=three", "--seeds=0", "--seeds=0,1", "--seeds=1.5,2", "--seeds=True,2"):
        with pytest.raises(study.data.UserError, match="--seeds must be a count or a comma-separated list"):
            study.parse([bad])
    with pytest.raises(study.data.UserError, match=r"config key 'steps' in flag --steps=abc must be of type int"):
        study.parse(["--steps=abc"])  # an option of the wrong type is named, as train.py names a key
    with pytest.raises(study.data.UserError, match=r"flag '--max_iters' needs a value"):
        study.parse(["--max_iters"])  # a train.py key is known: only its value is missing


def test_an_unknown_flag_names_the_closest_study_option_or_train_key():
    """A near miss of a study option is named as train.py names one of its keys: --step=3 is not train.py's key."""
    for flag, meant in (("--step=3", "steps"), ("--seeeds=3", "seeds"), ("--worker=1", "workers"),
                        ("--lerning_rate=1", "learning_rate"), ("--rep", "report"), ("--seeeds", "seeds"),
                        ("--lerning_rate", "learning_rate")):  # without a value too: not "needs a value" first
        with pytest.raises(study.data.UserError, match=rf"unknown config key .* {flag}; did you mean '{meant}'\?$"):
            study.parse([flag])


def test_runs_started_side_by_side_parse_their_flags_one_at_a_time(monkeypatch):
    """The study's threads each check a run's settings with train.parse_config, whose ast.literal_eval is not safe in
    two threads at once on Python 3.11 (a CI run of the end-to-end test failed so, with a SystemError)."""
    held = []

    def check_settings(flags):
        held.append(study.PARSING.locked())
        raise StopIteration  # enough: no run is started
    monkeypatch.setattr(study, "check_settings", check_settings)
    with pytest.raises(StopIteration):
        study.launch(["--seed=1"], 1)
    assert held == [True] and not study.PARSING.locked()


def test_a_text_option_takes_the_flags_text_as_written():
    """--out=2024 names a folder, as train.py's --out_dir=2024 does; it would otherwise read as a number."""
    opts = study.parse(["--out=2024", "--val_dir=12.5"])[0]
    assert (opts["out"], opts["val_dir"]) == ("2024", "12.5")


def test_a_paired_interval_needs_two_pairs_of_the_same_count():
    """One pair has no spread: its interval was of width 0 (any difference \"resolved\"); none divided by zero."""
    for a, b in (([3.0], [1.0]), ([], []), ([3.0, 4.0], [1.0])):
        with pytest.raises(ValueError):
            study.paired_difference(a, b)


@pytest.mark.parametrize("extra", ["a", "b"])
def test_a_paired_interval_refuses_a_value_without_its_pair_rather_than_dropping_it(extra):
    """zip would pair the first n values and drop the rest: with 2 pairs left, an interval over fewer runs than were
    given, without a word. Either side longer is refused, naming both counts."""
    a, b = [3.0, 4.0, 5.0], [2.0, 2.0]
    if extra == "b":
        a, b = b, a
    with pytest.raises(ValueError, match=rf"as many of each, got {len(a)} and {len(b)}"):
        study.paired_difference(a, b)


def test_runs_scored_on_other_tasks_are_refused_not_averaged_over_fewer(tmp_path):
    """A seed missing a task was averaged over the tasks it had (and paired with TeamLoRA's average over all), or
    the table stopped with a KeyError; selection compared means over other tasks than the test runs'."""
    def study_with(select_tasks, seed3_tasks):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}"
        opts, extra, names = study.parse([f"--out={out}", "--runs=teamlora,lora32", "--report", "--seeds=3"])
        for m in ("teamlora", "lora32"):
            for lr in study.GRID:
                fake_run(out / "select" / f"{m}-lr{lr:g}", lr, {t: 50.0 + 10 * (lr == 6.3e-4) for t in select_tasks})
        for s in (1, 2, 3):
            fake_run(out / f"teamlora-lr{6.3e-4:g}-seed{s}", 6.3e-4, {"a": 70.0 + s, "b": 30.0}, s)
            fake_run(out / f"lora32-lr{6.3e-4:g}-seed{s}", 6.3e-4,
                     {t: 65.0 + s if t == "a" else 30.0 for t in ("ab" if s < 3 else seed3_tasks)}, s)
        return opts, extra, names, out

    opts, extra, names, out = study_with("ab", "ab")
    assert len(study.load(opts, names, study.selection(opts, extra, names))["lora32"]) == 3  # the same tasks: read
    opts, extra, names, out = study_with("ab", "a")  # seed 3 of lora32 lacks task b
    chosen = study.selection(opts, extra, names)
    seed3 = re.escape(str(out / f"lora32-lr{6.3e-4:g}-seed3"))
    with pytest.raises(study.data.UserError, match=f"the run in {seed3} was scored on the tasks a, the run .* on a, b"):
        study.load(opts, names, chosen)
    opts, extra, names, out = study_with("ab", "abc")  # one with an extra task
    with pytest.raises(study.data.UserError, match=f"lora32-lr{6.3e-4:g}-seed3 was scored on the tasks a, b, c"):
        study.load(opts, names, study.selection(opts, extra, names))
    opts, extra, names, out = study_with("a", "ab")  # the rate chosen on other tasks than the test runs'
    with pytest.raises(study.data.UserError, match="scored on the tasks a, b, the run in .*select.* on a;"):
        study.load(opts, names, study.selection(opts, extra, names))
    (out / "select" / f"lora32-lr{study.GRID[2]:g}" / "results.json").write_text(json.dumps(
        {"scores": {"a": 90.0, "b": 90.0}, "config": {"seed": 0}, "trainable_params": 8, "base_params": 800,
         "train_seconds": 1.0}))  # a selection run over other tasks: not compared with the others' means
    with pytest.raises(study.data.UserError, match=f"select/lora32-lr{study.GRID[2]:g} was scored on the tasks a, b"):
        study.selection(opts, extra, names)
    opts, extra, names, out = study_with("ab", "ab")  # one method's every selection run on other tasks than another's:
    for lr in study.GRID:  # refused at the selection, before the final runs train, not at the report after them
        (out / "select" / f"lora32-lr{lr:g}" / "results.json").write_text(json.dumps(
            {"scores": {"a": 50.0}, "config": {"learning_rate": lr, "seed": 0}, "trainable_params": 8,
             "base_params": 800, "train_seconds": 1.0}))
    with pytest.raises(study.data.UserError, match="select/teamlora-lr.* was scored on the tasks a, b, the run in "
                                                   ".*select/lora32-lr.* on a;"):
        study.selection(opts, extra, names)


def test_study_rejects_unknown_runs_and_train_keys(capsys):
    with pytest.raises(SystemExit):
        study.main(["--runs=lora32,dora"])
    assert "unknown run(s) dora" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--seeds=three"])
    assert "--seeds must be a count or a comma-separated list" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--learning_rat=1e-3", "--report"])
    assert "unknown config key 'learning_rat'" in capsys.readouterr().err


def test_train_keys_that_the_study_sets_for_its_runs_and_an_empty_selection_are_refused(tmp_path):
    """A train.py key that run_flags sets would override the protocol (one out_dir for every run, another rate, seed
    or length): refused, naming the study's option where it has one; other keys still reach every run."""
    for flag, fix in (("--out_dir=x", "use --out instead"), ("--seed=3", "use --seeds instead"),
                      ("--max_iters=7", "use --steps instead"), ("--learning_rate=0.5", "remove it"),
                      ("--adapter=lora", "remove it"), ("--r=8", "remove it"), ("--eval_limit=4", "remove it")):
        with pytest.raises(study.data.UserError, match=f"^{flag.partition('=')[0]} is set by the study .*; {fix}"):
            study.parse([flag])
    for runs in ("--runs=,", "--runs="):
        with pytest.raises(study.data.UserError, match="names no run"):
            study.parse([runs])
    assert study.parse(["--runs=lora8,lora8"])[2] == ["lora8"]  # a run listed twice is run (and averaged) once
    assert study.parse(["--runs=lora32, teamlora ,"])[2] == ["lora32", "teamlora"]  # spaces were a run's name
    for runs in ("--runs= ", "--runs= , "):
        with pytest.raises(study.data.UserError, match="names no run"):
            study.parse([runs])
    opts, extra, names = study.parse([f"--out={tmp_path}", "--eval_dir=TEST", "--device=cpu"])
    assert names == list(study.RUNS) and extra == ["--eval_dir=TEST", "--device=cpu"]
    folders = set()
    for name in names:
        for eval_dir in (None, "VAL"):
            cfg = train.parse_config(study.run_flags(name, 1, 1e-3, opts, extra, eval_dir=eval_dir))
            assert cfg["eval_dir"] == (eval_dir or "TEST") and cfg["device"] == "cpu" and cfg["seed"] == 1
            folders.add(cfg["out_dir"])
    assert len(folders) == 2 * len(names)  # every run its own folder


def test_report_without_a_study_says_so_in_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--report", f"--out={tmp_path}/none"])
    out, err = capsys.readouterr()
    assert f"--report found no study in {tmp_path}/none/" in err and "diverged" not in err
    assert out == "" and err.count("\n") == 1  # refused before the report's headline ("a report on 20 ...")


COMPLETE = {"scores": {"a": 50.0}, "config": {"seed": 0}, "trainable_params": 8, "base_params": 800, "train_seconds": 1}
DAMAGED_RESULTS = {"cut results": '{"scores": {"a": 5', "no scores": '{"scores": {}}', "a list": "[]",
                   "nested too deeply": "[" * 100_000 + "]" * 100_000,  # was a RecursionError's traceback
                   "no log": '{"scores": {"a": 50.0}}',
                   "no parameter count": json.dumps({k: v for k, v in COMPLETE.items() if not k.endswith("params")}),
                   # each value the tables read, on its own: absent, or text where a number belongs
                   **{f"no {key}": json.dumps({k: v for k, v in COMPLETE.items() if k != key})
                      for key in ("trainable_params", "base_params", "train_seconds")},
                   "no seed": json.dumps(COMPLETE | {"config": {}}),
                   "a count as text": json.dumps(COMPLETE | {"trainable_params": "8"}),  # float("8") would pass
                   "a time as text": json.dumps(COMPLETE | {"train_seconds": "1.5"}),
                   # a score that is no finite number: a nan won choose_lr's max and made every interval nan
                   **{f"a score of {v}": json.dumps(COMPLETE | {"scores": {"a": v, "b": 50.0}})
                      for v in (math.nan, math.inf, True)},
                   # a score no percentage: 1e308 and 10**400 overflowed the means in a traceback, -1 was averaged
                   **{f"a score of {name}": json.dumps(COMPLETE | {"scores": {"a": v, "b": 50.0}})
                      for name, v in (("1e308", 1e308), ("10**400", 10**400), ("-1", -1))},
                   "a base of 0 parameters": json.dumps(COMPLETE | {"base_params": 0}),  # the tables divide by it
                   # the chance row of the tables: a traceback for each
                   "chance levels as a list": json.dumps(COMPLETE | {"chance": [25.0]}),
                   "a chance level missing": json.dumps(COMPLETE | {"chance": {"b": 25.0}}),
                   "a chance level as text": json.dumps(COMPLETE | {"chance": {"a": "25"}}),
                   "an expert load as text": json.dumps(COMPLETE | {"expert_load": {"a": "0.5"}}),
                   "a parameter count of 10**400": json.dumps(COMPLETE | {"trainable_params": 10**400})}


def test_a_run_of_the_study_re_scored_by_hand_is_read_as_the_whole_run_it_is(run_data, tmp_path, monkeypatch,
                                                                            step_clock):
    """A user may score one of the study's runs again by hand (train.py --out_dir=RUN --eval_only=True: on the run's
    own sets its results.json is replaced). That results.json held neither step nor train_seconds, and the report
    called the run damaged; it holds the run's own, as the run's first scoring did."""
    train_in_this_process(monkeypatch)
    opts, extra, _ = study.parse(small_study_flags(monkeypatch, run_data, tmp_path, "--runs=lora32"))
    out = study.run_dir(opts, "lora32", 1e-3, 1)
    assert study.launch(study.run_flags("lora32", 1, 1e-3, opts, extra), 1)[0] == "done"
    first = study.read_results(out, opts["steps"])
    train.train(train.parse_config([f"--out_dir={out}", "--eval_only=True"]))
    again = study.read_results(out, opts["steps"])
    assert again["config"]["eval_only"] and again["scores"] == first["scores"]
    assert (again["step"], again["train_seconds"]) == (first["step"], first["train_seconds"]) == (3, 300.0)


@pytest.mark.parametrize("results", [COMPLETE | {"train_seconds": None},  # a re-scoring that could not know it
                                     # an older train.py's re-scoring, which wrote none
                                     {**{k: v for k, v in COMPLETE.items() if k != "train_seconds"},
                                      "config": {"seed": 0, "eval_only": True}}])
def test_a_training_time_that_is_not_known_is_said_so_in_the_table_not_called_damage(tmp_path, results):
    """A run re-scored by hand from its adapter.pt alone, or from a ckpt.pt of an older train.py with no results.json
    of its step beside it, has a training time that is not known (None): the report reads the run, and its table says
    so of that time, averaging the runs that know theirs."""
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    res = study.read_results(tmp_path)
    assert res["train_seconds"] is None and res["scores"] == COMPLETE["scores"]
    known = {**COMPLETE, "chance": {}}
    for runs, cell in (([res], "not known"), ([known, res, {**known, "train_seconds": 3}],
                                              f"{study.fmt([1, 3])} (2 of 3 runs known)"), ([known], "1.0")):
        line = study.table("T", [("LoRA r=32", "lora32")], {"lora32": runs}, ["a"], {"lora": (1e-3, {})})[-1]
        assert line.strip("| ").split(" | ")[-1] == cell


def test_a_training_time_of_0_seconds_is_known():
    """Only None is not known: a run that trained for 0 seconds (no step left to train, a clock too coarse) knows it."""
    assert study.seconds_cell([0.0, 2.0]) == study.fmt([0.0, 2.0])
    assert study.seconds_cell([0, None]) == f"{study.fmt([0])} (1 of 2 runs known)"


@pytest.mark.parametrize("damage", DAMAGED_RESULTS)
def test_a_damaged_run_folder_is_named_with_its_fix_not_a_traceback(tmp_path, capsys, damage):
    """--report reads every run's results.json and log.jsonl: one edited by hand, or cut by a full disk, is one
    sentence naming the folder."""
    folder = tmp_path / "select" / f"{study.METHODS['teamlora'][0]}-lr{study.GRID[0]:g}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(DAMAGED_RESULTS[damage])
    if damage != "no log":
        (folder / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(SystemExit) as stop:
        study.main(["--report", f"--out={tmp_path}", "--runs=teamlora"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    if damage in ("cut results", "nested too deeply", "a list"):  # no JSON object: named as read_json names it
        assert err.startswith(f"study.py: error: {folder}/results.json ")
        assert f"delete {folder} and run the study again" in err
    else:
        assert err.startswith(f"study.py: error: the run in {folder} is damaged")
        assert "delete that folder and run the study again" in err


@pytest.mark.parametrize("line", ['{"step": 1, "loss": NaN}', '{"step": 1, "loss": "2.0"}',
                                  '{"step": "1", "loss": 2.0}', '{"step": 1, "loss": 1e400}'])
def test_a_log_whose_loss_curve_is_no_numbers_is_a_damaged_run_not_a_traceback_in_the_chart(tmp_path, line):
    """The loss chart reads each logged step and loss: a nan, or a number as text, in a log edited by hand failed it
    with a traceback after every run had been read."""
    (tmp_path / "results.json").write_text(json.dumps(COMPLETE))
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n' + line + "\n")
    with pytest.raises(study.data.UserError, match=f"^the run in {tmp_path} is damaged .*delete that folder"):
        study.read_results(str(tmp_path))


def test_the_loss_curve_is_the_logged_training_losses_alone_not_the_validation_lines_between_them(tmp_path):
    """train.py's log.jsonl holds training lines (step, loss, lr, ...) and validation lines (step, val_loss) of the
    same steps: the curve, which the chart and its mean over seeds read step by step, is the training losses alone."""
    (tmp_path / "results.json").write_text(json.dumps(COMPLETE))
    lines = [{"step": 10, "loss": 3.0, "lr": 1e-3}, {"step": 20, "loss": 2.0, "lr": 1e-3},
             {"step": 20, "val_loss": 9.0}, {"step": 30, "loss": 1.0, "lr": 1e-3}, {"step": 30, "val_loss": 8.0}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert study.read_results(str(tmp_path))["curve"] == [(10, 3.0), (20, 2.0), (30, 1.0)]


def test_a_loss_chart_of_runs_that_logged_only_step_0_is_drawn():
    """The chart's x axis runs to the last logged step: one of 0 divided by zero."""
    chart = "\n".join(study.loss_chart({"lora32": [{"curve": [(0, 2.0)]}], "teamlora": [{"curve": [(0, 1.0)]}]}))
    assert "|L " in chart and "|T " in chart  # each at step 0, the left edge
    assert "L = LoRA r=32: 2.00 at the end" in chart and "T = TeamLoRA 4x8: 1.00 at the end" in chart


def test_a_saved_config_that_is_no_json_object_is_left_to_the_report_to_name(tmp_path):
    """changed_settings took a results.json whose config is null for a config and failed with a traceback, before
    anything trained; the report names it damaged."""
    flags = ["--seed=1", f"--out_dir={tmp_path}", "--max_iters=2"]
    for config in (None, 3, "text", [1, 2]):
        (tmp_path / "results.json").write_text(json.dumps({**COMPLETE, "config": config}))
        assert study.changed_settings(flags, str(tmp_path / "results.json")) == ""
        with pytest.raises(study.data.UserError, match="is damaged"):
            study.read_results(str(tmp_path))


@pytest.mark.parametrize("damage", ["a folder", "a named pipe"])
def test_a_results_json_that_is_a_folder_or_a_named_pipe_is_a_damaged_run_not_a_run_to_do(tmp_path, damage):
    """read_results took a results.json that is no regular file for none, a run not finished: --report called it so,
    and the study started train.py there again (which refuses the folder) instead of naming the file."""
    folder = tmp_path / "run"
    folder.mkdir()
    if damage == "a folder":
        (folder / "results.json").mkdir()
    with named_pipe(folder / "results.json", json.dumps(COMPLETE).encode()) if damage == "a named pipe" \
            else contextlib.nullcontext():
        with pytest.raises(study.data.UserError, match=f"^{folder}/results.json is {damage}, not a file; delete "
                                                       f"{folder} and run the study again to redo the run.$"):
            study.read_results(folder)
    assert study.read_results(tmp_path / "none") is None  # no results.json at all: a run still to do


@pytest.mark.parametrize("damage", ["named pipe", "nested too deeply"])
def test_a_log_that_is_a_named_pipe_or_nested_too_deeply_is_a_damaged_run_not_a_hang_or_a_traceback(tmp_path, capsys,
                                                                                                  damage):
    """read_results opened a log.jsonl that is a named pipe and waited forever for a writer; a line nested too deeply
    was a RecursionError's traceback."""
    folder = tmp_path / "select" / f"{study.METHODS['teamlora'][0]}-lr{study.GRID[0]:g}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(COMPLETE))
    line = '{"step": 1, "loss": 2.0}\n' if damage == "named pipe" else "[" * 100_000 + "]" * 100_000 + "\n"
    if damage != "named pipe":
        (folder / "log.jsonl").write_text(line)
    with named_pipe(folder / "log.jsonl", line.encode()) if damage == "named pipe" else contextlib.nullcontext():
        with pytest.raises(SystemExit) as stop:
            study.main(["--report", f"--out={tmp_path}", "--runs=teamlora"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"study.py: error: the run in {folder} is damaged")


def test_a_saved_config_that_is_a_named_pipe_or_nested_too_deeply_is_left_to_the_report_to_name(tmp_path):
    """changed_settings compares a run's saved settings with the study's (a damaged file is the report's or the
    resume's to name): a results.json or diverged.json that is a named pipe was opened and waited on forever, one
    nested too deeply was a RecursionError's traceback, before anything trained."""
    flags = ["--seed=1", f"--out_dir={tmp_path}", "--max_iters=2"]
    other = json.dumps({"config": {**train.parse_config(flags), "max_iters": 60}})
    assert study.changed_settings(flags, str(tmp_path / "ok.json")) == ""
    (tmp_path / "ok.json").write_text(other)
    assert study.changed_settings(flags, str(tmp_path / "ok.json")) == "max_iters=60 (now 2)"  # a readable one
    with named_pipe(tmp_path / "results.json", other.encode()):
        assert study.changed_settings(flags, str(tmp_path / "results.json")) == ""
    (tmp_path / study.DIVERGED).write_text("[" * 100_000 + "]" * 100_000)
    assert study.changed_settings(flags, str(tmp_path / study.DIVERGED)) == ""


def test_a_ckpt_pt_that_is_a_named_pipe_with_no_writer_is_not_opened_and_waited_on(tmp_path):
    """changed_settings reads a stopped run's ckpt.pt with torch.load, which (unlike read_json) does not ask what the
    path is: a named pipe there must be passed over, not opened to wait for a writer that never comes."""
    flags = ["--seed=1", f"--out_dir={tmp_path}", "--max_iters=2"]
    pipe = tmp_path / "ckpt.pt"
    os.mkfifo(pipe)
    answer = []
    reader = threading.Thread(target=lambda: answer.append(study.changed_settings(flags, str(pipe))), daemon=True)
    reader.start()
    reader.join(timeout=10)
    waited = reader.is_alive()
    if waited:  # let the stuck reader go: a writer that closes at once gives it an end of file
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=10)
    assert not waited and answer == [""]


@pytest.mark.parametrize("what", ["a named pipe", "a folder"])
def test_a_runs_stdout_txt_that_is_no_file_is_refused_before_anything_runs_and_never_opened(tmp_path, capsys,
                                                                                            monkeypatch, what):
    """launch appends each attempt's output to its run's stdout.txt: a named pipe there was opened to write and the
    study waited for a reader forever; a folder there failed at that run, after hours of other runs. Each is one
    sentence naming it, before anything runs, and launch refuses one made later without opening it."""
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: pytest.fail("the demo was built before the refusal"))
    monkeypatch.setattr(study, "run_all", lambda *a, **k: pytest.fail("a run started before the refusal"))
    monkeypatch.setattr(study, "run_child", lambda *a, **k: pytest.fail("a run started before the refusal"))
    folder = tmp_path / "select" / f"lora32-lr{study.GRID[1]:g}"
    folder.mkdir(parents=True)
    log = folder / "stdout.txt"
    if what == "a named pipe":
        os.mkfifo(log)
    else:
        log.mkdir()
    message = f"{log} is {what}, not a file, and the run's output is written there; remove it and run the study again."
    assert script_error(study.main, [f"--out={tmp_path}", "--runs=lora32"], capsys) == f"study.py: error: {message}"
    monkeypatch.setattr(study, "check_runs", lambda *a: None)  # one made after the study's checks
    answer = []

    def launch():
        try:
            study.launch([f"--out_dir={folder}"], 1)
        except Exception as e:
            answer.append(str(e))
    thread = threading.Thread(target=launch, daemon=True)
    thread.start()
    thread.join(timeout=10)
    waited = thread.is_alive()
    if waited:  # let the stuck writer go: a reader that closes at once
        os.close(os.open(log, os.O_RDONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
    assert not waited and answer == [message]


def t_quantile_975(df):
    """The two-sided 95% quantile of Student's t, from its density (Simpson's rule) and bisection:
    a reference computed here, independent of study.T95."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x, n=2000):
        f = [c * (1 + (x * i / n) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + x / n / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    low, high = 0.0, 20.0
    while high - low > 1e-6:
        low, high = ((low + high) / 2, high) if cdf((low + high) / 2) < 0.975 else (low, (low + high) / 2)
    return (low + high) / 2


def test_the_t_quantiles_are_students_and_more_than_30_pairs_use_the_30_degrees_quantile():
    assert len(study.T95) == 30
    for df, q in enumerate(study.T95, 1):
        assert q == pytest.approx(t_quantile_975(df), abs=6e-4), df
    rng = np.random.default_rng(0)
    for n in (2, 5, 30, 31, 32, 45):
        a, b = rng.normal(60, 5, n).tolist(), rng.normal(55, 5, n).tolist()
        d = np.subtract(a, b)
        m, h = study.paired_difference(a, b)
        assert m == pytest.approx(d.mean())
        # 30 pairs: 29 degrees of freedom; from 31 pairs on, 30's (slightly wider than the exact interval)
        assert h / (d.std(ddof=1) / math.sqrt(n)) == pytest.approx(t_quantile_975(min(n - 1, 30)), abs=6e-4), n


def fake_results(seed_scores, lr=1e-3, **more):
    """results dicts as read_results returns them, one per (seed, average score) pair."""
    return [{"scores": {"a": s - 1.0, "b": s + 1.0}, "config": {"seed": seed, "learning_rate": lr}, "curve": [],
             **more} for seed, s in seed_scores]


def test_comparisons_pair_runs_by_seed_and_call_a_difference_only_when_its_interval_excludes_0():
    team = {1: 50.0, 2: 60.0, 3: 55.0, 4: 70.0}
    results = {
        "teamlora": fake_results(team.items()),
        # seed 1 missing and the seeds out of order: pairing is by seed, not by position
        "lora32": fake_results([(4, 60.0), (2, 51.0), (3, 44.0)]),  # 10, 9, 11 lower: resolved
        "moelora": fake_results([(1, 52.0), (2, 61.0), (3, 56.0), (4, 71.5)]),  # 2, 1, 1, 1.5 higher
        "hydralora": fake_results([(1, 60.0), (2, 50.0), (3, 58.0)]),  # +10, -10, +3: mean above 0, unresolved
        "full": fake_results([(2, 90.0), (9, 10.0)]),  # one pair only: no interval
    }
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in study.comparisons(results)[2:]}
    assert set(rows) == {study.RUNS[n][0] for n in ("lora32", "moelora", "hydralora")}
    for name, other in (("lora32", {4: 60.0, 2: 51.0, 3: 44.0}), ("moelora", {1: 52.0, 2: 61.0, 3: 56.0, 4: 71.5}),
                        ("hydralora", {1: 60.0, 2: 50.0, 3: 58.0})):
        d = np.array([other[s] - team[s] for s in sorted(other)])
        half = t_quantile_975(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        row = rows[study.RUNS[name][0]]
        assert row[1] == str(len(d)) and row[2] == f"{d.mean():+.1f}"
        assert row[3] == f"{d.mean() - half:+.1f} .. {d.mean() + half:+.1f}"
        want = "higher" if d.mean() - half > 0 else "lower" if d.mean() + half < 0 else "cannot tell"
        assert row[4] == f"{want} |", name
    assert [rows[study.RUNS[n][0]][4] for n in ("lora32", "moelora", "hydralora")] == \
        ["lower |", "higher |", "cannot tell |"]
    assert study.comparisons({"teamlora": results["teamlora"], "full": results["full"]}) == \
        ["(comparisons need at least 2 seeds of TeamLoRA and of another run)"]


def test_comparisons_do_not_depend_on_the_order_teamloras_runs_are_read_in_nor_on_which_seeds_they_are():
    """--seeds=11,12,13 pairs as --seeds=3 does, and TeamLoRA's runs read in any order pair by their own seeds."""
    team, other = [(1, 50.0), (2, 60.0), (3, 55.0), (4, 70.0)], [(4, 60.0), (2, 51.0), (3, 44.0)]
    want = study.comparisons({"teamlora": fake_results(team), "lora32": fake_results(other)})
    shifted = lambda runs: [(seed + 10, score) for seed, score in runs]
    assert len(want) == 3 and want[2].startswith(f"| {study.RUNS['lora32'][0]} | 3 |")
    assert study.comparisons({"teamlora": fake_results(shifted(team)[::-1]),
                              "lora32": fake_results(shifted(other))}) == want


def test_a_difference_whose_interval_holds_0_cannot_be_told_on_either_side_of_0():
    """The verdict is symmetric: mirrored differences (the run above TeamLoRA, then below it by as much) that the
    interval does not resolve are "cannot tell" both times, not "lower" for a mean that is merely below 0."""
    team = {1: 50.0, 2: 60.0, 3: 55.0}
    verdicts = []
    for sign in (1, -1):
        run = fake_results((s, team[s] + sign * d) for s, d in ((1, 10.0), (2, -10.0), (3, 3.0)))
        row = study.comparisons({"teamlora": fake_results(team.items()), "lora32": run})[2]
        m, h = study.paired_difference([sign * d for d in (10.0, -10.0, 3.0)], [0.0] * 3)
        assert (m > 0) == (sign > 0) and m - h < 0 < m + h  # the premise: unresolved, mean on the sign's side
        verdicts.append(row.split(" | ")[-1])
    assert verdicts == ["cannot tell |", "cannot tell |"]


def test_a_table_row_is_each_runs_mean_and_std_over_seeds_at_its_methods_rate():
    chance = {"a": 50.0, "b": 25.0}
    runs = {"lora32": [(1, 61.0, 30.5, 100.0), (2, 65.0, 31.5, 110.0), (3, 70.0, 27.0, 90.0)],
            "teamlora": [(1, 80.0, 40.0, 200.0), (2, 74.0, 44.0, 230.0)]}
    results = {name: [{"scores": {"a": a, "b": b}, "train_seconds": secs, "chance": chance,
                       "trainable_params": 3 if name == "lora32" else 7, "base_params": 400, "config": {"seed": s}}
                      for s, a, b, secs in seeds] for name, seeds in runs.items()}
    chosen = {"lora": (6.3e-4, {}), "teamlora": (1.6e-3, {})}
    lines = study.table("T", [("LoRA r=32", "lora32"), ("TeamLoRA 4x8", "teamlora"), ("MoELoRA 4x8", "moelora")],
                        results, ["a", "b"], chosen)
    cells = {row[0]: row[1:] for row in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}

    def mean_sd(values):
        return f"{np.mean(values):.1f}±{np.std(values, ddof=1):.1f}"
    assert cells["chance"][2:5] == ["50.0", "25.0", f"{(50 + 25) / 2:.1f}"]
    for name, label, lr in (("lora32", "LoRA r=32", 6.3e-4), ("teamlora", "TeamLoRA 4x8", 1.6e-3)):
        row, seeds = cells[label], runs[name]
        assert row[0] == f"{lr:g}" and row[1] == f"{100 * results[name][0]['trainable_params'] / 400:.2f}"
        assert row[2:4] == [mean_sd([s[1] for s in seeds]), mean_sd([s[2] for s in seeds])]
        assert row[4] == f"**{mean_sd([(s[1] + s[2]) / 2 for s in seeds])}**"  # the mean and std of seed averages
        assert row[5] == mean_sd([s[3] for s in seeds])
    assert cells["MoELoRA 4x8"][0] == "(not run)"


def test_a_run_scores_every_test_record_and_a_quick_run_its_quick_limit():
    for argv, limit in (([], 0), (["--quick"], study.QUICK["eval_limit"])):
        opts, extra, _ = study.parse(argv)
        for eval_dir in (None, "VAL"):  # a final run and a selection run
            cfg = train.parse_config(study.run_flags("lora32", 1, 1e-3, opts, extra, eval_dir=eval_dir))
            assert cfg["eval_limit"] == limit and cfg["max_iters"] == cfg["eval_interval"] == opts["steps"], argv


def test_a_quick_study_chooses_among_its_own_grid_and_tells_a_diverged_run_from_one_not_run(tmp_path):
    opts, extra, names = study.parse([f"--out={tmp_path}", "--runs=lora8", "--quick", "--report"])
    assert opts["grid"] == study.QUICK["grid"] != study.GRID
    low, high = opts["grid"]
    fake_run(tmp_path / "select" / f"lora32-lr{high:g}", high, {"a": 30.0})  # the run at the lower rate: none yet
    chosen = study.selection(opts, extra, names)
    assert chosen == {"lora": (high, {low: None, high: 30.0})}
    header, _, row = study.selection_table(chosen, opts)
    assert header.split(" | ")[1:-1] == [f"lr {low:g}", f"lr {high:g}"]
    assert row == f"| LoRA r=32 | not run | 30.0 | {high:g} |"  # a --report while the study runs: not "diverged"
    (tmp_path / "select" / f"lora32-lr{low:g}").mkdir()
    (tmp_path / "select" / f"lora32-lr{low:g}" / study.DIVERGED).write_text("{}")  # what launch leaves
    row = study.selection_table(study.selection(opts, extra, names), opts)[2]
    assert row == f"| LoRA r=32 | diverged | 30.0 | {high:g} |"


def test_the_loss_curve_averages_the_seeds_step_by_step_up_to_the_shortest_log():
    runs = [{"curve": [(10, 4.0), (20, 3.0), (30, 2.0)]}, {"curve": [(10, 2.0), (20, 1.0)]},
            {"curve": []}]  # a seed without a log
    assert study.mean_curve({"lora32": runs}, "lora32") == ([10, 20], [3.0, 2.0])
    assert study.mean_curve({"lora32": runs[2:]}, "lora32") is None


def train_in_this_process(monkeypatch):
    """study.launch's train.py runs in this process (its own messages are read, in the run's stdout.txt); returns the
    list of the flags of each run launched."""
    ran = []

    def in_process(cmd, log, env):
        assert env["OMP_NUM_THREADS"] == "1"
        ran.append(cmd[2:])
        code = 0
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                train.main(cmd[2:])
            except SystemExit as e:
                code = e.code
        return code
    monkeypatch.setattr(study, "run_child", in_process)
    return ran


CHILD = """import signal, sys, time
def stop(signum, frame):
    print("checkpoint written", flush=True)
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
print("training", flush=True)
time.sleep(60)
"""


def test_a_sigterm_to_the_study_reaches_its_runs_even_one_started_after_it(tmp_path):
    """SIGTERM to study.py alone (kill PID, a job scheduler) left its train.py runs training on with no study, and a
    relaunch found their folders held. It now reaches each run (which writes its checkpoint and exits as for Ctrl-C),
    and the study stops as for Ctrl-C."""
    import threading
    import time
    log, codes = tmp_path / "run.txt", []
    with open(log, "w") as f:
        runner = threading.Thread(target=lambda: codes.append(study.run_child([sys.executable, "-c", CHILD], f, {})))
        runner.start()
        deadline = time.time() + 30
        while "training" not in log.read_text() and time.time() < deadline:
            time.sleep(0.05)
        assert study.RUNNING
        with pytest.raises(KeyboardInterrupt):
            study.stop_runs(study.signal.SIGTERM, None)
        runner.join(30)
        assert codes == [130] and log.read_text() == "training\ncheckpoint written\n" and not study.RUNNING
        start = time.time()  # a run that starts after the signal (a worker between its checks and Popen) stops too
        assert study.run_child([sys.executable, "-c", "import time; time.sleep(60)"], f, {}) != 0
        assert time.time() - start < 30
    study.STOPPING.clear()


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_run_of_a_killed_study_stops_with_a_checkpoint_and_lets_its_folder_go(run_data, tmp_path):
    """kill -9 of study.py (kill -9 PID, the out-of-memory killer) tells its runs nothing: a run trained on alone,
    holding its folder, and the study run again to continue was refused there (the run "failed"). The run now stops
    as on SIGTERM: its step ends, its checkpoint is written and its folder let go, for the study run again to resume."""
    out = tmp_path / "run"
    flags = train_flags(run_data, out, "--eval_dir=", "--max_iters=100000", "--eval_interval=1", "--warmup_iters=1")
    killed = subprocess.Popen([sys.executable, "-c", "import sys, study; study.launch(sys.argv[1:], 1)", *flags],
                              cwd=os.path.dirname(study.__file__))
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline:  # training
        time.sleep(0.05)
    runner = study.files.lock_holder(os.stat(out / study.files.LOCK))
    killed.kill()
    killed.wait()
    deadline = time.time() + 30
    while (busy := study.files.hold(out)) and time.time() < deadline:
        time.sleep(0.1)
    study.files.let_go(out)
    if busy and runner:  # nothing left behind when the test fails
        os.kill(runner, signal.SIGKILL)
    assert busy is None, f"the run goes on, {busy} holds {out}"
    step = torch.load(out / "ckpt.pt", weights_only=True)["iter"]
    assert 0 < step < 100000 and f"checkpoint of step {step} written" in (out / "stdout.txt").read_text()


def test_a_diverged_json_a_killed_study_left_half_written_is_removed_and_the_runs_temporaries_left_to_it(tmp_path,
                                                                                                         capsys):
    """A study killed while it wrote a run's diverged.json left diverged.json.tmpPID there for good: train.py does
    not know that name, and the study held the folder with no names. It removes its own now, when it first holds
    the folder; a temporary of the run's own files stays for train.py, which cleans those once it holds it."""
    from test_data import dead_pid
    out = tmp_path / "run"
    out.mkdir()
    ours, runs = out / f"{study.DIVERGED}.tmp{dead_pid()}", out / f"ckpt.pt.tmp{dead_pid()}"
    ours.write_text('{"config": {')
    runs.write_bytes(b"half a checkpoint")
    assert study.wait_for_folder(str(out)) is False  # nobody held it: no wait
    assert not ours.exists() and runs.exists()
    assert f"removed a leftover temporary file {ours}" in capsys.readouterr().err


def test_wait_for_folder_says_it_waited_where_another_process_held_the_folder_for_a_while(tmp_path, capsys):
    """launch checks a run's settings again after a wait (the stopping run wrote its checkpoint meanwhile): so
    wait_for_folder is True where it waited for a holder to let go, False where nobody held the folder."""
    out = tmp_path / "run"
    out.mkdir()
    assert study.wait_for_folder(str(out)) is False
    holder = held_by_another_process(out)
    letting_go = threading.Timer(0.5, holder.stdin.close)
    letting_go.start()
    try:
        assert study.wait_for_folder(str(out)) is True
    finally:
        letting_go.join()
        holder.wait()
    assert study.wait_for_folder(str(out)) is False  # let go: no wait


def test_a_run_folder_still_held_by_a_stopping_run_is_waited_for_and_its_log_kept_meanwhile(run_data, tmp_path,
                                                                                           monkeypatch, capsys):
    """A study run again at once after a kill -9 met its runs still stopping (their step, their checkpoint): launch
    emptied the run's stdout.txt, train.py refused the held folder, and the study ended with a garbled last line of
    the old run's log as the run's error. It now waits for the folder, leaving the log alone, then runs."""
    train_in_this_process(monkeypatch)
    opts, extra, _ = study.parse(small_study_flags(monkeypatch, run_data, tmp_path, "--eval_dir="))  # no scoring: fast
    monkeypatch.setattr(study, "HOLD_WAIT", 120)  # far longer than the test holds it
    folder = tmp_path / "lora32-lr0.001-seed1"
    folder.mkdir()
    (folder / "stdout.txt").write_text("step 2: loss 1.50\n")  # what the stopping run writes on into
    holder, ended = held_by_another_process(folder), []
    flags = study.run_flags("lora32", 1, 1e-3, opts, extra)
    launcher = threading.Thread(target=lambda: ended.append(study.launch(flags, 1)))
    try:
        launcher.start()
        deadline, said = time.time() + 60, ""
        while launcher.is_alive() and "waiting" not in said and time.time() < deadline:
            time.sleep(0.05)
            said += capsys.readouterr().out
        assert launcher.is_alive(), f"launch ended while the folder was held: {ended}"
        assert said.startswith(f"waiting up to 120 s for process {holder.pid} to let go of {folder}")
        time.sleep(0.5)  # held on for a while: launch goes on waiting, and reads and empties nothing
        assert launcher.is_alive() and (folder / "stdout.txt").read_text() == "step 2: loss 1.50\n"
    finally:
        holder.stdin.close()  # the old run has stopped: it lets its folder go
        holder.wait()
        launcher.join(120)
    assert [status for status, _ in ended] == ["done"] and (folder / "ckpt.pt").exists()
    log = (folder / "stdout.txt").read_text()  # the old run's, then the new run's
    assert log.startswith("step 2: loss 1.50\n") and "step 3/3" in log


def test_a_run_folder_held_beyond_the_wait_is_one_sentence_naming_its_holder_and_its_log_is_kept(run_data, tmp_path,
                                                                                                 monkeypatch, capsys):
    """A folder still held after HOLD_WAIT (a run that does not stop, or a train.py of the user's own there) ends the
    study with exit code 2 and a sentence that names the process, not the last line of its log; nothing is emptied."""
    ran = []

    def refused(cmd, log, env):  # train.py, on a folder held by another process
        ran.append(cmd)
        log.write(f"train.py: error: out_dir {folder} is in use by process {holder.pid}; wait for that run to end.\n")
        return 2
    monkeypatch.setattr(study, "run_child", refused)
    monkeypatch.setattr(study, "HOLD_WAIT", 0.5)
    argv = small_study_flags(monkeypatch, run_data, tmp_path, "--runs=lora32", "--seeds=1", "--workers=1")
    folder = tmp_path / "select" / f"lora32-lr{study.GRID[0]:g}"  # the study's first run
    folder.mkdir(parents=True)
    (folder / "stdout.txt").write_text("step 2: loss 1.5")  # a line cut short by the run writing on
    holder = held_by_another_process(folder)
    try:
        start = time.time()
        err = script_error(study.main, argv, capsys)
        waited = time.time() - start
    finally:
        holder.stdin.close()
        holder.wait()
    assert err == (f"study.py: error: the run folder {folder} is still in use by process {holder.pid} after 0.5 s; "
                   "wait for that process to end, or stop it (kill sends SIGTERM: it writes its checkpoint), then run "
                   "the study again.")
    assert waited >= 0.5 and f"--out_dir={folder}" not in sum(ran, [])  # (the next run may start meanwhile)
    assert (folder / "stdout.txt").read_text() == "step 2: loss 1.5"


def study_stopped(argv):
    """The exit code of study.main(argv), which must stop (SystemExit). Then joins the worker threads the study started
    and resets STOPPING for the next test: a Ctrl-C that lands while the pool starts a thread
    (ThreadPoolExecutor._adjust_thread_count) leaves that thread out of its shutdown's joins, to the interpreter's exit
    in a real study, and a test's main returns before it ends."""
    before = set(threading.enumerate())
    try:
        with pytest.raises(SystemExit) as stop:
            study.main([str(a) for a in argv])
    finally:
        for thread in set(threading.enumerate()) - before:
            if thread.name.startswith("ThreadPoolExecutor"):
                thread.join(60)
        study.STOPPING.clear()
    return stop.value.code


def test_ctrl_c_while_a_run_waits_for_its_folder_stops_the_study_at_once_with_one_line(run_data, tmp_path,
                                                                                      monkeypatch, capsys):
    """A study run again at once after a kill waits for the killed study's runs to let their folders go, in a worker
    thread, which Ctrl-C does not reach: the study went on waiting, up to HOLD_WAIT, then started the run. Ctrl-C now
    ends the wait and the study, as it does elsewhere: one line, train.py's exit code for a stopped run, no run."""
    ran, polls_after_ctrl_c, real_hold = [], [], study.files.hold
    monkeypatch.setattr(study, "run_child", lambda cmd, log, env: ran.append(cmd) or 0)
    monkeypatch.setattr(study, "HOLD_WAIT", 600)  # only the Ctrl-C, or the holder letting go, ends the wait
    argv = small_study_flags(monkeypatch, run_data, tmp_path, "--runs=lora32", "--seeds=1", "--workers=1")
    folder = tmp_path / "select" / f"lora32-lr{study.GRID[0]:g}"  # the study's first run
    folder.mkdir(parents=True)

    def held(path, names=None):  # the folder is held by a stopping run of a killed study
        if os.path.realpath(path) != os.path.realpath(folder):
            return real_hold(path, names)
        if not polls_after_ctrl_c:  # the wait begins: the user presses Ctrl-C
            polls_after_ctrl_c.append(0)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            return "process 4242"
        polls_after_ctrl_c[0] += 1
        return "process 4242" if study.STOPPING.wait(10) else None  # a study still waiting: let go, to end the test
    monkeypatch.setattr(study.files, "hold", held)
    before = signal.getsignal(signal.SIGINT)
    code = study_stopped(argv)
    out, err = capsys.readouterr()
    assert out.count(f"waiting up to 600 s for process 4242 to let go of {folder}") == 1
    assert code == study.machine.INTERRUPTED and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("study.py stopped; run the same command again to continue where it stopped")
    assert polls_after_ctrl_c[0] <= 1 and ran == []  # the wait ended at the Ctrl-C, and no run started
    assert signal.getsignal(signal.SIGINT) is before  # given back, as SIGTERM's


@pytest.mark.parametrize("failing", [0, 1])
def test_a_ctrl_c_while_the_runs_under_way_finish_after_a_failure_still_names_the_failure(run_data, tmp_path,
                                                                                          monkeypatch, capsys, failing):
    """After a run fails the study waits for the others under way (for the first's result, or in its pool's shutdown
    once it has the failure): a Ctrl-C then said only "study.py stopped; run the same command again", and the user,
    who ran it again, never learnt why the run had failed. It now ends as on that failure, saying how to continue."""
    monkeypatch.setattr(study, "GRID", (1e-3, 4e-3))
    failing_dir = f"lora32-lr{study.GRID[failing]:g}"
    started, failed, stopped = threading.Event(), threading.Event(), []

    def waits_in():  # the functions of concurrent.futures in which the study's main thread is
        frames = traceback.extract_stack(sys._current_frames()[threading.main_thread().ident])
        return {f.name for f in frames if os.path.join("concurrent", "futures") in f.filename}

    def run(cmd, log, env):
        if any(a.endswith(failing_dir) for a in cmd):
            started.wait(30)  # the other run is under way (a run not started when one fails no longer starts)
            log.write("step 1: loss 2.00\nerror: the data is bad; fix it\n")
            return 2
        started.set()
        failed.wait(30)  # the other run, still under way when the first fails: the user presses Ctrl-C while the
        deadline = time.time() + 30  # study waits for this run's result (the later run failed) or in its shutdown
        while ("shutdown" if failing == 0 else "result") not in waits_in() and time.time() < deadline:
            time.sleep(0.01)
        if not stopped:
            stopped.append(("shutdown" if failing == 0 else "result") in waits_in())
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        study.STOPPING.wait(10)
        return study.machine.INTERRUPTED  # the terminal's Ctrl-C reached it: its checkpoint is written
    real_noting = study.launch_noting_failure

    def noting(i, job, *rest):  # failed: once the study has noted the failure (the Ctrl-C must come after it)
        try:
            return real_noting(i, job, *rest)
        finally:
            if any(a.endswith(failing_dir) for a in job[1]):
                failed.set()
    monkeypatch.setattr(study, "run_child", run)
    monkeypatch.setattr(study, "launch_noting_failure", noting)
    argv = small_study_flags(monkeypatch, run_data, tmp_path, "--runs=lora32", "--seeds=1", "--workers=2")
    code = study_stopped(argv)
    err = capsys.readouterr().err
    folder = tmp_path / "select" / failing_dir
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err == (f"study.py: error: the run in {folder} failed: error: the data is bad; fix it; its log is "
                   f"{folder}/stdout.txt, and the study continues from it when rerun; study.py was then stopped "
                   "(Ctrl-C or SIGTERM), and the runs under way resume from their checkpoints when it is run again.\n")
    assert stopped == [True]  # the Ctrl-C came where the study waited after the failure


def test_a_failed_run_is_said_at_once_while_the_runs_under_way_end_and_no_further_run_starts(tmp_path, capsys,
                                                                                               monkeypatch):
    """A run that failed was reported once every job before it had ended (pool.map's order), and the study said nothing
    meanwhile, hours perhaps, starting further runs. The failure is said at once, with the runs under way it waits for;
    no other run starts; it is then reported as before."""
    monkeypatch.setattr(study, "GRID", (1e-3, 2e-3, 4e-3))
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: None)
    sets_in(tmp_path / "val", tmp_path / "test")
    out, started, failed, said, ran = tmp_path / "study", threading.Event(), threading.Event(), [], []

    def run(cmd, log, env):
        folder = next(a for a in reversed(cmd) if a.startswith("--out_dir=")).partition("=")[2]
        ran.append(os.path.basename(folder))
        if folder.endswith("-lr0.002"):
            started.wait(30)  # once the earlier run is under way
            log.write("step 1: loss 2.00\nerror: the data is bad; fix it\n")
            failed.set()
            return 2
        started.set()
        failed.wait(30)  # the earlier run, under way when the later one fails: it ends once the failure is said
        deadline = time.time() + 10
        while "the data is bad" not in "".join(said) and time.time() < deadline:
            said.append(capsys.readouterr().out)
            time.sleep(0.01)
        return 0
    monkeypatch.setattr(study, "run_child", run)
    argv = [f"--out={out}", "--runs=lora32", "--seeds=1", "--workers=2", f"--val_dir={tmp_path / 'val'}",
            f"--eval_dir={tmp_path / 'test'}"]
    code = study_stopped(argv)
    later = capsys.readouterr()
    folder = out / "select" / "lora32-lr0.002"
    failure = (f"the run in {folder} failed: error: the data is bad; fix it; its log is {folder}/stdout.txt, and the "
               "study continues from it when rerun")
    assert f"select lora32 lr 0.002: {failure}; the study waits for the 1 other run under way to end, then stops " \
           "(Ctrl-C stops them with their checkpoints, to resume when it is run again)\n" in "".join(said)
    assert "[1/3] select lora32 lr 0.001: done" in later.out  # the run under way ended after that line
    assert code == 2 and later.err == f"study.py: error: {failure}.\n"
    assert sorted(ran) == ["lora32-lr0.001", "lora32-lr0.002"]  # lr 0.004 was not started
    monkeypatch.setattr(study, "launch", lambda flags, threads: ("done", 1.0))
    failures = [(1, study.data.UserError("the run in x failed"))]  # job 1's: a job taken up before it still runs,
    assert study.launch_noting_failure(0, ("a", []), 1, failures, set(), str(out)) == ("done", 1.0)  # however late
    with pytest.raises(study.data.UserError, match="^b was not started, as a run had failed.$"):
        study.launch_noting_failure(2, ("b", []), 1, failures, set(), str(out))


@pytest.mark.parametrize("how", ["stopped", "failed"])
def test_a_study_stopped_or_failed_part_way_lists_its_runs_left_and_the_command_that_continues_it(tmp_path, capsys,
                                                                                               monkeypatch, how):
    """A study stopped (Ctrl-C) or failed part-way said one line: which runs were left undone, and in what state, was
    for the user to piece together from its folders. It lists each run not finished, as its progress line names it,
    and the command that continues it, which, run, does."""
    monkeypatch.setattr(study, "GRID", (1e-3, 4e-3))
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: None)
    sets_in(tmp_path / "val", tmp_path / "test")
    first = ["select lora32 lr 0.001"]  # the run that is stopped or fails, the first time only

    def run(cmd, log, env):
        cfg = train.parse_config(cmd[2:])
        if first and cfg["out_dir"].endswith("lora32-lr0.001"):
            first.clear()
            if how == "failed":
                log.write("error: the data is bad; fix it\n")
                return 2
            open(os.path.join(cfg["out_dir"], "ckpt.pt"), "wb").close()  # its checkpoint, then the Ctrl-C
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            study.STOPPING.wait(10)
            return study.machine.INTERRUPTED
        with open(os.path.join(cfg["out_dir"], "results.json"), "w") as f:
            json.dump({"scores": {"a": 50.0}, "config": {"seed": cfg["seed"], "learning_rate": cfg["learning_rate"]},
                       "trainable_params": 1, "base_params": 100, "train_seconds": 1.0}, f)
        open(os.path.join(cfg["out_dir"], "log.jsonl"), "w").close()
        return 0
    monkeypatch.setattr(study, "run_child", run)
    argv = [f"--out={tmp_path / 'my study'}", "--runs=lora32", "--seeds=1", "--workers=1",  # a space: quoted
            f"--val_dir={tmp_path / 'val'}", f"--eval_dir={tmp_path / 'test'}"]
    assert study_stopped(argv) == (2 if how == "failed" else study.machine.INTERRUPTED)
    out = capsys.readouterr().out
    state = "failed" if how == "failed" else "stopped, resumes from its checkpoint"
    assert f"[1/2] select lora32 lr 0.001: {state}\n[2/2] select lora32 lr 0.004: not started\n" \
           "and the 1 final run, after the selection: not started\n" in out, out
    command = shlex.split(out.split("continue the study with: ")[1].splitlines()[0])
    assert command[0] == "python" and os.path.samefile(command[1], study.__file__) and command[2:] == argv
    results = study.main(command[2:])
    assert [r["config"]["seed"] for r in results["lora32"]] == [1] and first == []


def test_a_study_whose_out_was_deleted_while_it_ran_starts_no_further_run_beside_a_second_study(tmp_path, capsys,
                                                                                              monkeypatch):
    """The lock on --out is its .lock file's: once the folder was deleted, a second study took a new .lock there and
    both launched the same runs. The first finds its lock file gone or another before each run and stops, in one
    sentence, starting none."""
    monkeypatch.setattr(study, "GRID", (1e-3, 4e-3))
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: None)
    sets_in(tmp_path / "val", tmp_path / "test")
    out, ran, second = tmp_path / "study", [], []

    def run(cmd, log, env):  # the user deletes --out while the first run trains, and starts a second study there
        ran.append(cmd)
        subprocess.run(["rm", "-rf", str(out)], check=True)
        second.append(held_by_another_process(out))
        return 0
    monkeypatch.setattr(study, "run_child", run)
    argv = [f"--out={out}", "--runs=lora32", "--seeds=1", "--workers=1", f"--val_dir={tmp_path / 'val'}",
            f"--eval_dir={tmp_path / 'test'}"]
    try:
        err = script_error(study.main, argv, capsys)
    finally:
        for other in second:
            other.kill()
            other.wait()
    assert err == (f"study.py: error: --out {out} lost its lock file .lock while the study ran (deleted, with the "
                   "folder perhaps), so a second study could run there beside this one; make sure none does, then "
                   "run this one again to continue.")
    assert len(ran) == 1 and len(second) == 1  # the second run was not started
    assert not study.files.lost(tmp_path / "val")  # a folder this process never held has lost nothing


def test_a_failure_names_the_runs_still_under_way_by_their_number_and_a_ctrl_c_after_several_names_the_first(
        tmp_path, capsys, monkeypatch):
    """A failure is said at once only where other runs are still under way (the study waits for them), counting those
    and not the failed run itself, with the run's sentence whole but its full stop; with none under way run_all
    reports it at once. A Ctrl-C after several failures names the first, the one said first."""
    monkeypatch.setattr(study, "launch", lambda flags, threads: ("done", 1.0))
    under_way = {7}
    assert study.launch_noting_failure(3, ("c", ["x"]), 1, [], under_way, str(tmp_path)) == ("done", 1.0)
    assert under_way == {7}  # a run that ended is no longer under way

    def fail(flags, threads):
        raise study.data.UserError(f"the run {flags[0]} failed.")
    monkeypatch.setattr(study, "launch", fail)
    for others, said in ((set(), ""), ({7}, "the 1 other run under way"), ({7, 8}, "the 2 other runs under way")):
        failures, under_way = [], set(others)
        with pytest.raises(study.data.UserError):
            study.launch_noting_failure(3, ("c", ["x"]), 1, failures, under_way, str(tmp_path))
        out = capsys.readouterr().out
        assert failures[0][0] == 3 and under_way == others  # the failed run is no longer under way
        assert out == (f"c: the run x failed; the study waits for {said} to end, then stops (Ctrl-C stops them with "
                       "their checkpoints, to resume when it is run again)\n" if others else "")
    real, noted = study.launch_noting_failure, []

    def launch_noting_failure(i, job, threads, failures, under_way, out):
        noted.append(failures)  # run_all's list, to wait on
        return real(i, job, threads, failures, under_way, out)

    def until(n):
        deadline = time.time() + 30
        while len(noted[0]) < n and time.time() < deadline:
            time.sleep(0.01)

    def launch(flags, threads):  # all started; job 0 is under way while jobs 2, then 1, fail; then a Ctrl-C
        until({"0": 2, "1": 1, "2": 0}[flags[0]])
        if flags == ["0"]:
            raise KeyboardInterrupt
        raise study.data.UserError(f"the run {flags[0]} failed.")
    monkeypatch.setattr(study, "launch_noting_failure", launch_noting_failure)
    monkeypatch.setattr(study, "launch", launch)
    monkeypatch.setattr(study.data, "cores", lambda: 3)
    with pytest.raises(KeyboardInterrupt) as stop:
        study.run_all([(str(i), [str(i)]) for i in range(3)], {"workers": 3, "out": str(tmp_path)})
    assert str(stop.value.failed) == "the run 2 failed."  # said first, with job 1 under way


def test_the_studys_ctrl_c_leaves_its_runs_to_the_terminals_own_and_its_sigterm_is_passed_on_to_them(monkeypatch):
    """The terminal sends Ctrl-C to the runs under way itself: the study's SIGINT handler stops the study alone (a
    SIGTERM from it too would reach each run beside its Ctrl-C); a SIGTERM reaches the study alone, which passes it
    on. Both stop the study's workers (STOPPING)."""
    class Stop(Exception):
        pass
    handlers = {}

    def parse(argv):
        handlers.update({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})
        raise Stop
    monkeypatch.setattr(study, "parse", parse)
    with pytest.raises(Stop):
        study.main([])

    class Run:
        terminated = False

        def terminate(self):
            self.terminated = True
    for signum, passed_on in ((signal.SIGINT, False), (signal.SIGTERM, True)):
        run = Run()
        study.RUNNING.add(run)
        try:
            with pytest.raises(KeyboardInterrupt):
                handlers[signum](signum, None)
            assert run.terminated == passed_on and study.STOPPING.is_set()
        finally:
            study.RUNNING.discard(run)
            study.STOPPING.clear()


def test_a_run_started_just_after_a_ctrl_c_is_stopped_not_trained_to_its_end(run_data, tmp_path, monkeypatch,
                                                                              capsys):
    """The terminal's Ctrl-C reaches the runs under way, and a worker that was between its checks and Popen started its
    run after it: a run no Ctrl-C reached, which the stopped study waited for while it trained to its end."""
    real = study.run_child

    def started_late(cmd, log, env):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # Ctrl-C, just before this run starts
        study.STOPPING.wait(10)  # the study has taken it (an old study never does: it goes on after 10 s)
        child = "import time; time.sleep(3); print('trained to its end', flush=True)"
        return real([sys.executable, "-c", child], log, env)
    monkeypatch.setattr(study, "run_child", started_late)
    argv = small_study_flags(monkeypatch, run_data, tmp_path, "--runs=lora32", "--seeds=1", "--workers=1")
    assert study_stopped(argv) == study.machine.INTERRUPTED and "study.py stopped;" in capsys.readouterr().err
    log = tmp_path / "select" / f"lora32-lr{study.GRID[0]:g}" / "stdout.txt"
    assert "trained to its end" not in log.read_text(encoding="utf-8")
    assert study.last_attempt(log) == []  # stopped as it started


@pytest.mark.parametrize("started_with", ["default", "ignored"])
def test_while_the_study_runs_a_sigterm_is_its_own_to_pass_on_unless_whoever_started_it_ignored_it(
        tmp_path, capsys, monkeypatch, started_with):
    """A scheduler's SIGTERM to the study must reach stop_runs, which passes it on: left to its default, it killed the
    study alone and its runs trained on with no study. Ignored by whoever started the study, on purpose: the study
    leaves it so (and gives back nothing)."""
    first = {"default": study.signal.SIG_DFL, "ignored": study.signal.SIG_IGN}[started_with]
    seen, real = [], study.parse
    monkeypatch.setattr(study, "parse", lambda argv: seen.append(study.signal.getsignal(study.signal.SIGTERM))
                        or real(argv))
    before = study.signal.signal(study.signal.SIGTERM, first)
    try:
        script_error(study.main, [f"--out={tmp_path}", "--report"], capsys)  # no study there: one sentence
        assert seen == [study.stop_runs if started_with == "default" else study.signal.SIG_IGN]
        assert study.signal.getsignal(study.signal.SIGTERM) is first
    finally:
        study.signal.signal(study.signal.SIGTERM, before)


def test_a_study_run_outside_the_main_thread_takes_no_signal_and_runs(tmp_path, capsys):
    """Python refuses a signal handler set from another thread: study.main called from a worker thread (a notebook's,
    a scheduler's) failed with a ValueError before it did anything."""
    import threading
    ended = []

    def worker():
        try:
            study.main([f"--out={tmp_path}", "--report"])  # no study there: one sentence, exit code 2
        except BaseException as e:
            ended.append(e)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert [type(e) for e in ended] == [SystemExit] and ended[0].code == 2, ended
    assert "--report found no study" in capsys.readouterr().err


def test_the_study_gives_back_the_sigterm_handler_it_found(tmp_path, capsys):
    """A handler of the caller's own (a notebook's), not whatever an earlier study left; and a study started after one
    that SIGTERM stopped in the same process starts its runs instead of stopping each at once."""
    def mine(signum, frame):
        pass
    before = study.signal.signal(study.signal.SIGTERM, mine)
    study.STOPPING.set()
    try:
        script_error(study.main, [f"--out={tmp_path}", "--report"], capsys)  # no study there: one sentence
        assert study.signal.getsignal(study.signal.SIGTERM) is mine and not study.STOPPING.is_set()
    finally:
        study.signal.signal(study.signal.SIGTERM, before)
        study.STOPPING.clear()


def test_launch_tells_a_diverged_run_from_a_failed_one(run_data, tmp_path, monkeypatch):
    """A selection run whose loss became nan scores nothing ("diverged", which choose_lr skips); any other
    failure stops the study with the run's error. train.py runs in this process, so its own message is read."""
    train_in_this_process(monkeypatch)
    opts, extra, _ = study.parse(small_study_flags(monkeypatch, run_data, tmp_path, "--eval_dir="))  # no scoring: fast
    real_forward = Transformer.forward

    def nan_loss(self, *a, **k):
        logits, loss = real_forward(self, *a, **k)
        return logits, loss * float("nan")
    monkeypatch.setattr(Transformer, "forward", nan_loss)
    assert study.launch(study.run_flags("lora32", 1, 1e-3, opts, extra), 1)[0] == "diverged"
    monkeypatch.setattr(Transformer, "forward", real_forward)
    for lr, (where, what) in enumerate(((train.torch.nn.utils, "clip_grad_norm_"), (train.evaluation, "val_loss"))):
        with monkeypatch.context() as m:  # a finite loss, then a nan gradient norm or validation loss: diverged too
            m.setattr(where, what, lambda *a, **k: float("nan"))
            assert study.launch(study.run_flags("lora32", 1, (lr + 2) * 1e-3, opts, extra), 1)[0] == "diverged", what
    with pytest.raises(study.data.UserError,
                       match=r"lora8-lr0.001-seed1 failed: train\.py: error: .* has no summary\.json"):
        study.launch(study.run_flags("lora8", 1, 1e-3, opts, extra + [f"--data_dir={tmp_path}"]), 1)
    assert study.launch(study.run_flags("lora8", 1, 1e-3, opts, extra), 1)[0] == "done"


def test_the_expert_load_chart_averages_the_seeds_that_recorded_a_load():
    runs = [{"expert_load": {"nli": [0.1, 0.9], "qa": [0.5, 0.5]}},
            {"expert_load": {"nli": [0.3, 0.7], "qa": [0.7, 0.3]}},
            {"expert_load": {}}]  # a seed whose results.json holds no load
    seeds, loads = study.mean_loads({"teamlora": runs}, "teamlora")
    assert seeds == 2 and loads.keys() == {"nli", "qa"}
    assert loads["nli"] == pytest.approx([0.2, 0.8]) and loads["qa"] == pytest.approx([0.6, 0.4])
    assert study.mean_loads({"teamlora": runs[2:]}, "teamlora") is None
    for r in runs:  # the chart names the layers the runs measured (--load_layers passes through to every run)
        r["config"] = {"load_layers": 3}
    assert "over each task's prompt tokens (last 3 layers, mean of 2 seed(s); even = 0.50)" in \
        study.load_chart({"teamlora": runs})[0]


def test_repeated_seeds_too_many_seeds_and_workers_beyond_the_cores_are_refused_before_anything_runs(
        tmp_path, capsys, monkeypatch):
    """A seed given twice would count one run twice in the means and intervals, --seeds=100000 is a typo that would
    queue a run for ever, and more runs at a time than cores only share them: one sentence each, and no study."""
    monkeypatch.setattr(study.data, "cores", lambda: 4)
    for flag, message in (("--seeds=3,5,3", "--seeds repeats seed 3; give each seed once."),
                          ("--seeds=1,2,1,2", "--seeds repeats seeds 1, 2; give each seed once."),
                          ("--seeds=1001", "--seeds asks for 1001 seeds, more than 1000"),
                          ("--seeds=" + ",".join(map(str, range(1, 1002))), "--seeds asks for 1001 seeds"),
                          ("--seeds=10000000000", "--seeds asks for 10000000000 seeds"),
                          ("--workers=5", "--workers=5 is not a number of runs at a time for this machine's 4 cores; "
                                          "give one from 1 to 4."),
                          ("--workers=0", "--workers=0 is not a number of runs"),
                          ("--workers=-2", "--workers=-2 is not a number of runs")):
        with pytest.raises(study.data.UserError) as error:
            study.parse([flag])
        assert str(error.value).startswith(message), flag
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as stop:  # --report: were the seeds taken, it would only read, never train
        study.main(["--seeds=3,5,3", f"--out={out}", "--report"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err == "study.py: error: --seeds repeats seed 3; give each seed once.\n"
    assert not out.exists()
    assert study.parse(["--seeds=1000", "--workers=4"])[0]["seeds"] == tuple(range(1, 1001))
    monkeypatch.setattr(study.data, "cores", lambda: 1)
    assert study.parse([])[0]["workers"] == 1  # the default of 2 at a time fits a one-core machine


def test_an_os_error_while_the_study_prepares_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    def full_disk(cfg):
        raise OSError(28, "No space left on device", "data/mini_cme/tokens")
    monkeypatch.setattr(study.train, "build_demo", full_disk)
    with pytest.raises(SystemExit) as stop:
        study.main([f"--out={tmp_path / 'study'}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err


@pytest.mark.parametrize("step, kept", [(3, "its checkpoint of step 3 is kept"), (0, "before its first checkpoint")])
def test_an_interrupted_pretraining_of_the_demos_base_stops_the_study_in_one_sentence(tmp_path, capsys, monkeypatch,
                                                                                       step, kept):
    """What run() returns after a stop: the step of the checkpoint it kept, 0 where it had written none yet."""
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: {"interrupted": True, "step": step})
    with pytest.raises(SystemExit) as stop:
        study.main([f"--out={tmp_path / 'study'}"])
    assert stop.value.code == 2 and f"pretraining the demo's base was interrupted ({kept}); run the study again to " \
        "continue it." in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


def test_the_protocol_selects_with_seed_0_on_validation_then_runs_and_reads_every_seed_at_the_chosen_rate(
        tmp_path, monkeypatch, capsys):
    """The whole protocol with the training runs stubbed: the selection runs are seed 0 scored on val_dir, the final
    runs are the study's seeds scored on the test sets, each at its method's chosen rate (not the grid's first), and
    the report reads exactly those final runs. The stub writes each run's results from its own flags."""
    jobs = []

    def stub(batch, opts, later=0):
        for _, flags in batch:
            cfg = train.parse_config(flags)
            jobs.append(cfg)
            lr, seed = cfg["learning_rate"], cfg["seed"]
            best = study.GRID[1] if cfg["adapter"] == "teamlora" else study.GRID[2]
            score = 90.0 - abs(math.log(lr / best)) + seed  # the best validation score at `best`
            folder = tmp_path / cfg["out_dir"]  # an absolute path under tmp_path / "study"
            folder.mkdir(parents=True)
            (folder / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
            (folder / "results.json").write_text(json.dumps(
                {"scores": {"a": score, "b": score}, "config": {"seed": seed, "learning_rate": lr},
                 "trainable_params": 1, "base_params": 100, "train_seconds": 1.0}))
        return ["done"] * len(batch)
    monkeypatch.setattr(study, "run_all", stub)
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: None)
    monkeypatch.chdir(tmp_path)  # the study reads both sets before its first run: --eval_dir=TEST is relative
    sets_in(tmp_path / "val", tmp_path / "TEST")
    results = study.main([f"--out={tmp_path / 'study'}", f"--val_dir={tmp_path / 'val'}", "--eval_dir=TEST",
                          "--runs=lora32,lora8,teamlora", "--seeds=3"])
    capsys.readouterr()
    select, final = jobs[:2 * len(study.GRID)], jobs[2 * len(study.GRID):]
    assert all(c["seed"] == study.SELECTION_SEED and c["eval_dir"] == str(tmp_path / "val") for c in select)
    assert not {c["seed"] for c in select} & {c["seed"] for c in final}  # no final run shares its seed with a selection
    assert sorted(c["learning_rate"] for c in select) == sorted(2 * study.GRID)
    chosen = {"lora32": study.GRID[2], "lora8": study.GRID[2], "teamlora": study.GRID[1]}  # not GRID[0]
    assert sorted((c["out_dir"].rpartition("/")[2], c["learning_rate"], c["seed"], c["eval_dir"]) for c in final) == \
        sorted((f"{n}-lr{lr:g}-seed{s}", lr, s, "TEST") for n, lr in chosen.items() for s in (1, 2, 3))
    assert {n: sorted((r["config"]["seed"], r["config"]["learning_rate"]) for r in runs)
            for n, runs in results.items()} == {n: [(s, lr) for s in (1, 2, 3)] for n, lr in chosen.items()}


def test_launch_skips_a_finished_run_resumes_a_stopped_one_and_starts_a_new_one(tmp_path, monkeypatch):
    """A folder with results.json is finished (not run again); one with only ckpt.pt was stopped and continues
    with --init_from=resume, last so that no --init_from given to every run overrides it; an empty one starts."""
    calls, threads = [], []

    def run(cmd, log, env):
        calls.append(cmd[2:])
        threads.append(env["OMP_NUM_THREADS"])
        return 0
    monkeypatch.setattr(study, "run_child", run)
    flags = ["--init_from=base.pt", "--seed=1"]
    for name, files in (("finished", ("results.json", "ckpt.pt")), ("stopped", ("ckpt.pt",)), ("new", ())):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("{}")
    assert study.launch(flags + [f"--out_dir={tmp_path / 'finished'}"], 1) == ("done before", 0.0) and not calls
    assert study.launch(flags + [f"--out_dir={tmp_path / 'stopped'}"], 1)[0] == "done"
    assert [f for f in calls[-1] if f.startswith("--init_from=")][-1] == "--init_from=resume"
    assert study.launch(flags + [f"--out_dir={tmp_path / 'new'}"], 3)[0] == "done"
    assert calls[-1] == flags + [f"--out_dir={tmp_path / 'new'}"] and threads[-1] == "3"  # its share of the cores
    monkeypatch.setattr(study, "run_child", lambda cmd, log, env: 130)
    with pytest.raises(study.data.UserError, match="stopped .*after writing its checkpoint; run the study again"):
        study.launch(flags + [f"--out_dir={tmp_path / 'stopped'}"], 1)  # interrupted: not done, and not "failed"


def test_a_finished_run_made_with_other_settings_is_refused_not_reported_as_this_studys(tmp_path, monkeypatch):
    """A study rerun in the same --out with other --steps (or another --quick --steps) or other train.py flags would
    find every run "done before" and report runs it never made: that is refused in one sentence naming the setting
    (the device and other settings that move only rounding or speed are not a change), as is a --report of them
    under another --steps."""
    monkeypatch.setattr(study, "run_child", lambda *a, **k: pytest.fail("a finished run must not run again"))
    folder = tmp_path / "lora8-lr0.004-seed1"
    folder.mkdir()
    counts = {"trainable_params": 8, "base_params": 800, "train_seconds": 1.0}
    (folder / "results.json").write_text(json.dumps({"scores": {"a": 50.0}, **counts, "config": {
        "max_iters": 60, "seed": 1, "learning_rate": 4e-3, "device": "cpu", "out_dir": str(folder)}}))
    (folder / "log.jsonl").write_text('{"step": 60, "loss": 2.0}\n')
    flags = ["--seed=1", "--learning_rate=0.004", f"--out_dir={folder}"]
    assert study.launch(flags + ["--max_iters=60"], 1) == ("done before", 0.0)
    assert study.launch(flags + ["--max_iters=60", "--device=auto"], 1) == ("done before", 0.0)
    with pytest.raises(study.data.UserError, match=rf"the finished run in {folder} was made with max_iters=60 "
                                                   r"\(now 2\); pass another --out .*or delete that folder"):
        study.launch(flags + ["--max_iters=2"], 1)
    assert study.read_results(folder, 60)["scores"] == {"a": 50.0}  # a --report reads it only for its own --steps
    spelled = os.path.join(str(folder.parent), ".", folder.name)  # the same folder (--out=./out/study)
    assert study.launch(["--seed=1", "--learning_rate=0.004", f"--out_dir={spelled}", "--max_iters=60"], 1) == \
        ("done before", 0.0)
    config = json.loads((folder / "results.json").read_text())["config"]
    (folder / "results.json").write_text(json.dumps({"scores": {"a": 50.0}, **counts,
                                                     "config": {**config, "dropout": 0.2}}))
    with pytest.raises(study.data.UserError, match=r"made with dropout=0.2 \(now 0.05\)"):  # a flag left out
        study.launch(flags + ["--max_iters=60"], 1)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "ckpt.pt").write_bytes(b"")  # read through train.saved_config, stubbed: a run stopped at 60 steps
    monkeypatch.setattr(study.train, "saved_config", lambda path: ({**config, "out_dir": str(stopped)}, None))
    with pytest.raises(study.data.UserError, match=rf"the stopped run in {stopped} was made with max_iters=60 "
                                                   r"\(now 2\)"):
        study.launch(["--seed=1", "--learning_rate=0.004", f"--out_dir={stopped}", "--max_iters=2"], 1)
    with pytest.raises(study.data.UserError, match=rf"the run in {folder} trained 60 steps, not this study's 2: "
                                                   r"pass the --steps \(and --quick\) of its study"):
        study.read_results(folder, 2)


def test_a_report_refuses_a_run_that_trained_fewer_steps_than_the_studys_as_one_that_trained_more(tmp_path):
    """A --quick study's runs (fewer steps) are not this study's either: read_results refuses both directions."""
    folder = tmp_path / "lora8-lr0.004-seed1"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"scores": {"a": 50.0}, "trainable_params": 8, "base_params": 800,
                                                     "train_seconds": 1.0, "config": {"max_iters": 60, "seed": 1}}))
    (folder / "log.jsonl").write_text('{"step": 60, "loss": 2.0}\n')
    assert study.read_results(folder, 60)["scores"] == {"a": 50.0}
    for steps in (2, 600):
        with pytest.raises(study.data.UserError, match=rf"the run in {folder} trained 60 steps, not this study's "
                                                       rf"{steps}: pass the --steps"):
            study.read_results(folder, steps)


def test_a_stopped_run_is_unfinished_not_damaged_for_the_report(tmp_path):
    """A run stopped after its checkpoint has a folder but no results.json: the report reads it as not (yet) run,
    a stopped selection run as a missing one, and neither stops the report as a damaged folder."""
    opts, extra, names = study.parse([f"--out={tmp_path}", "--runs=teamlora", "--report", "--seeds=2"])
    for folder in [f"select/teamlora-lr{study.GRID[0]:g}", f"teamlora-lr{study.GRID[1]:g}-seed2"]:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "ckpt.pt").write_bytes(b"")
        (tmp_path / folder / "stdout.txt").write_text("step 1\n")
    fake_run(tmp_path / "select" / f"teamlora-lr{study.GRID[1]:g}", study.GRID[1], {"a": 50.0})
    fake_run(tmp_path / f"teamlora-lr{study.GRID[1]:g}-seed1", study.GRID[1], {"a": 60.0}, seed=1)
    assert study.read_results(tmp_path / f"teamlora-lr{study.GRID[1]:g}-seed2") is None
    chosen = study.selection(opts, extra, names)
    assert chosen["teamlora"] == (study.GRID[1], {study.GRID[0]: None, study.GRID[1]: 50.0, study.GRID[2]: None,
                                                  study.GRID[3]: None})
    assert [r["config"]["seed"] for r in study.load(opts, names, chosen)["teamlora"]] == [1]


def test_a_report_leaves_out_the_charts_that_no_run_of_the_study_draws(tmp_path, capsys, monkeypatch):
    """LoRA r=8 draws no loss curve and no expert load: its report has neither heading nor an empty block, and no
    loss.png (matplotlib or not), and ends in one newline."""
    opts, extra, names = study.parse([f"--out={tmp_path}", "--runs=lora8", "--report", "--seeds=1"])
    lr = study.GRID[1]
    fake_run(tmp_path / "select" / f"lora32-lr{lr:g}", lr, {"a": 50.0})
    final = tmp_path / f"lora8-lr{lr:g}-seed1"
    fake_run(final, lr, {"a": 60.0}, seed=1)
    (final / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')  # a curve
    results = study.report(opts, names, study.selection(opts, extra, names))
    assert list(results) == ["lora8"] and results["lora8"][0]["curve"] == [(1, 2.0)]
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "### Training loss" not in text and "### Expert load" not in text and "```" not in text
    assert text.endswith("\n") and not text.endswith("\n\n") and not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("case", ["holds a user's files", "is a file", "is read-only"])
def test_an_out_the_study_would_share_or_cannot_write_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch,
                                                                                      read_only, case):
    """Its report.md and charts would have replaced a user's two hours later, and a folder it can not write failed
    at its first run (after the demo's base was pretrained) as a bare "[Errno 20] Not a directory"."""
    out = tmp_path / "mine"
    if case == "is a file":
        out.write_text("my notes\n")
    else:
        out.mkdir()
    if case == "holds a user's files":
        (out / "report.md").write_text("my report\n")
    elif case == "is read-only":
        read_only(out)
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: pytest.fail("the demo was built before the refusal"))
    monkeypatch.setattr(study, "run_all", lambda *a, **k: pytest.fail("a run started before the refusal"))
    message = {"holds a user's files": f"--out {out} holds files that are not a study's (report.md); choose a new "
                                       "or empty folder, or the --out of an earlier study to continue it.",
               "is a file": f"--out {out} is a file, not a folder; choose another --out.",
               "is read-only": f"--out {out} can not be written: {out} is not writable (Permission denied); choose "
                               "another --out."}[case]
    assert script_error(study.main, [f"--out={out}"], capsys) == f"study.py: error: {message}"
    assert sorted(p.name for p in tmp_path.rglob("*")) == (
        ["mine", "report.md"] if case == "holds a user's files" else ["mine"])
    (tmp_path / "study" / "select").mkdir(parents=True)  # an earlier study's folder is continued
    (tmp_path / "study" / "report.md").write_text("its report\n")
    study.check_out(str(tmp_path / "study"))
    (tmp_path / "held").mkdir()  # a study stopped after it held its --out, before its first run: continued too
    (tmp_path / "held" / study.files.LOCK).write_text("")
    study.check_out(str(tmp_path / "held"))


def test_a_second_study_on_the_out_of_a_live_one_is_refused_before_it_touches_anything(tmp_path, capsys,
                                                                                     monkeypatch):
    """A second study on a live one's --out would relaunch its runs, truncating their stdout.txt logs before train.py
    refused them: it is refused at once, naming the live study's process, and leaves the folder as it was; once that
    study has ended, its --out is taken again."""
    out = tmp_path / "study"
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: None)  # the demo's data and base: not needed here
    monkeypatch.setattr(study, "selection", lambda *a, **kw: pytest.fail("the second study went on"))
    live = held_by_another_process(out)
    try:
        (out / "select").mkdir()
        (out / "select" / "stdout.txt").write_text("the live run's log\n")
        sets_in(tmp_path / "val", tmp_path / "test")  # read before the hold
        argv = [f"--out={out}", "--runs=lora8", f"--val_dir={tmp_path / 'val'}", f"--eval_dir={tmp_path / 'test'}"]
        assert script_error(study.main, argv, capsys) == (
            f"study.py: error: --out {out} is in use by process {live.pid}, a study still running; wait for it to end, "
            "or choose another --out.")
        assert (out / "select" / "stdout.txt").read_text() == "the live run's log\n"
        assert sorted(p.name for p in out.iterdir()) == [".lock", "select"]
    finally:
        live.kill()
        live.wait()
    study.check_out(str(out))  # the lock file left behind is not a user's file
    assert study.files.hold(str(out)) is None


def test_a_report_on_a_read_only_study_prints_its_tables_and_says_report_md_is_not_written(tmp_path, capsys,
                                                                                           read_only):
    """A finished study kept read-only still reports (the tables were printed, then a bare "[Errno 13] Permission
    denied: 'report.md.tmp123'" and exit code 2)."""
    lr = study.GRID[1]
    fake_run(tmp_path / "select" / f"lora32-lr{lr:g}", lr, {"a": 50.0})
    fake_run(tmp_path / f"lora8-lr{lr:g}-seed1", lr, {"a": 60.0}, seed=1)
    read_only(tmp_path)
    assert list(study.main(["--report", f"--out={tmp_path}", "--runs=lora8", "--seeds=1"])) == ["lora8"]
    out, err = capsys.readouterr()
    assert "## mini-CME study" in out and err == (f"note: report.md and the charts are not written, as "
                                                           f"{tmp_path} is not writable (Permission denied).\n")
    assert not list(tmp_path.glob("*.md")) and not list(tmp_path.glob("*.png"))


def test_a_report_puts_each_chart_fenced_under_its_own_heading(tmp_path):
    """TeamLoRA draws both charts: the loss curve under the Figure 4b heading, the expert load under Figure 5's, each
    in its own code block."""
    opts, extra, names = study.parse([f"--out={tmp_path}", "--runs=teamlora", "--report", "--seeds=1"])
    lr = study.GRID[1]
    fake_run(tmp_path / "select" / f"teamlora-lr{lr:g}", lr, {"a": 50.0})
    final = tmp_path / f"teamlora-lr{lr:g}-seed1"
    fake_run(final, lr, {"a": 60.0}, seed=1)
    (final / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    results = json.loads((final / "results.json").read_text())
    (final / "results.json").write_text(json.dumps(results | {"expert_load": {"a": [0.3, 0.7]}}))
    results = study.report(opts, names, study.selection(opts, extra, names))
    loss, load = study.loss_chart(results), study.load_chart(results)
    assert loss and load
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "### Training loss (the paper's Figure 4b)\n\n```\n" + "\n".join(loss) + "\n```\n" in text
    assert "### Expert load (the paper's Figure 5)\n\n```\n" + "\n".join(load) + "\n```\n" in text


def stand_in_matplotlib(monkeypatch):
    """matplotlib is optional (and absent here): a stand-in in its place, which records the format of each figure
    saved (into the list returned) and writes b"PNG" for it."""
    saved = []

    class Drawing:  # a figure or its axes: any call is taken, savefig recorded
        def __getattr__(self, name):
            return lambda *a, **k: None

        def savefig(self, f, format=None, **k):  # the PNG's bytes, into the file it is given
            saved.append(format)
            f.write(b"PNG")
    pyplot = SimpleNamespace(subplots=lambda **k: (Drawing(), Drawing()))
    monkeypatch.setitem(sys.modules, "matplotlib", SimpleNamespace(use=lambda backend: None, pyplot=pyplot))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    return saved


def test_loss_png_is_drawn_only_where_a_run_of_the_study_has_a_loss_curve(tmp_path, monkeypatch):
    """As the report's text chart: no loss.png of empty axes for a study whose runs draw no curve (LoRA r=8).
    matplotlib is optional (and absent here): a stand-in records what would be saved."""
    saved = stand_in_matplotlib(monkeypatch)
    run = {"curve": [(1, 2.0), (2, 1.5)], "config": {"seed": 1}}
    assert study.pngs({"lora8": [run]}, str(tmp_path)) == [] and saved == []
    assert study.pngs({"lora8": [run], "lora32": [run]}, str(tmp_path)) == [str(tmp_path / "loss.png")]
    assert saved == ["png"] and os.listdir(tmp_path) == ["loss.png"]


def test_expert_load_png_draws_each_tasks_load_averaged_over_the_seeds_as_the_row_its_task_labels(tmp_path,
                                                                                                 monkeypatch):
    """The heatmap of expert_load.png holds the text chart's numbers: one row per task, in the order of the row
    labels, each the task's expert shares averaged over the seeds. A stand-in for matplotlib records what is drawn."""
    drawn = {}

    class Drawing:  # a figure or its axes: any call is taken, the heatmap and the labels recorded
        def __getattr__(self, name):
            return lambda *a, **k: None

        def imshow(self, rows, **k):
            drawn["rows"] = rows

        def set(self, **k):
            drawn.update(k)

        def savefig(self, f, format=None, **k):
            f.write(b"PNG")
    pyplot = SimpleNamespace(subplots=lambda **k: (Drawing(), Drawing()))
    monkeypatch.setitem(sys.modules, "matplotlib", SimpleNamespace(use=lambda backend: None, pyplot=pyplot))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    runs = [{"curve": [], "config": {"seed": 1}, "expert_load": {"qa": [0.5, 0.2, 0.3], "nli": [0.1, 0.9, 0.0]}},
            {"curve": [], "config": {"seed": 2}, "expert_load": {"qa": [0.7, 0.1, 0.2], "nli": [0.3, 0.5, 0.2]}}]
    assert study.pngs({"teamlora": runs}, str(tmp_path)) == [str(tmp_path / "expert_load.png")]
    labels = list(drawn["yticklabels"])
    assert sorted(labels) == ["nli", "qa"] and list(drawn["yticks"]) == [0, 1] and len(drawn["rows"]) == 2
    for task, row in zip(labels, drawn["rows"]):
        assert list(row) == pytest.approx([(runs[0]["expert_load"][task][e] + runs[1]["expert_load"][task][e]) / 2
                                           for e in range(3)])


def test_a_study_of_zero_steps_is_refused_and_one_step_is_taken():
    """The sentence names the steps alone (it spoke of seed 0 too, which --seeds already refuses)."""
    with pytest.raises(study.data.UserError, match=r"^--steps must be a positive number of training steps per run, "
                       r"got 0\.$"):
        study.parse(["--steps=0"])
    assert study.parse(["--steps=1"])[0]["steps"] == 1


@pytest.mark.parametrize("argv", [["--out="], ["--out= "], ["--quick", "--out="]])
def test_an_empty_out_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch, argv):
    """--out= ran the whole study in the current folder: 80 run folders, select/ and report.md among the user's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: pytest.fail("the demo was built before the refusal"))
    monkeypatch.setattr(study, "run_all", lambda *a, **k: pytest.fail("a run started before the refusal"))
    assert script_error(study.main, argv, capsys) == (
        "study.py: error: --out is empty; give the study a folder of its own, e.g. --out=out/study.")
    assert os.listdir(tmp_path) == []


def test_a_run_equal_to_teamlora_in_every_seed_is_not_called_higher_or_lower():
    """Identical averages: the difference is 0 with an interval of width 0, which does not exclude 0."""
    scores = [(1, 50.0), (2, 60.0), (3, 55.0)]
    rows = study.comparisons({"teamlora": fake_results(scores), "lora32": fake_results(scores)})[2:]
    assert rows == [f"| {study.RUNS['lora32'][0]} | 3 | +0.0 | +0.0 .. +0.0 | cannot tell |"]


def test_the_loss_chart_smooths_each_curve_over_its_last_five_logged_points():
    losses = [10.0, 8.0, 6.0, 4.0, 2.0, 1.0, 0.5]
    results = {"lora32": [{"curve": [(10 * (i + 1), v) for i, v in enumerate(losses)]}]}
    end = sum(losses[-5:]) / 5
    assert f"  L = {study.RUNS['lora32'][0]}: {end:.2f} at the end" in study.loss_chart(results)


def test_run_all_gives_each_run_its_share_of_the_cores_and_counts_only_the_runs_it_ran_in_the_time_left(
        monkeypatch, capsys):
    """workers runs at a time share the cores (cores // workers threads each); the estimate of the time left is
    the minutes per run actually run (a run finished before costs nothing) times the runs still to come,
    `later` ones included; the minutes so far are those since run_all started. A fake clock (each run that runs
    takes one minute), at a time since 1970 as time.time's, and a pool that runs each job when run_all reaches it."""
    clock, threads = [1.7e9], []

    def launch(flags, n_threads):
        threads.append(n_threads)
        if flags == "before":
            return "done before", 0.0
        clock[0] += 60.0
        return "done", 60.0
    monkeypatch.setattr(study, "launch", launch)
    monkeypatch.setattr(study, "time", type("Clock", (), {"time": staticmethod(lambda: clock[0])}))
    monkeypatch.setattr(study.data, "cores", lambda: 8)
    monkeypatch.setattr(study, "ThreadPoolExecutor", lambda workers: SimpleNamespace(
        map=lambda fn, jobs: map(fn, jobs), shutdown=lambda cancel_futures: None))
    jobs = [("a", "before"), ("b", "run"), ("c", "run")]
    assert study.run_all(jobs, {"workers": 2, "out": "out/study"}, later=2) == ["done before", "done", "done"]
    assert threads == [4, 4, 4]
    lines = capsys.readouterr().out.splitlines()
    # after b: 1 minute for 1 run, 1 + 2 runs to come; after c: 2 minutes for 2 runs, 0 + 2 to come
    assert [re.search(r"about (\d+) min left", line).group(1) for line in lines] == ["0", "3", "2"]
    assert [re.search(r"\(([\d.]+) min so far", line).group(1) for line in lines] == ["0.0", "1.0", "2.0"]


def test_short_help_prints_the_protocol_as_long_help_does(capsys):
    for flag in ("-h", "--help"):
        assert study.main([flag]) is None
        assert capsys.readouterr().out.strip() == study.__doc__.strip()


def test_a_finished_runs_paths_are_compared_as_the_files_they_name_not_as_spelled(tmp_path, monkeypatch):
    """A study continued with --data_dir (or the tokenizer, eval_dir, init_from) spelled otherwise, absolute where the
    run had it relative, finds its finished run its own; a path to another folder is a change, named."""
    monkeypatch.setattr(study, "run_child", lambda *a, **k: pytest.fail("a finished run must not run again"))
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "run"
    folder.mkdir()
    config = {"max_iters": 60, "seed": 1, "data_dir": "data/tokens", "tokenizer": "data/tokenizer.model"}
    (folder / "results.json").write_text(json.dumps({"scores": {"a": 50.0}, "config": config}))
    flags = ["--seed=1", "--max_iters=60", f"--out_dir={folder}"]
    same = [f"--data_dir={tmp_path / 'data' / 'tokens'}", f"--tokenizer={tmp_path / 'data' / '.' / 'tokenizer.model'}"]
    assert study.changed_settings(flags + same, str(folder / "results.json")) == ""
    assert study.launch(flags + same, 1) == ("done before", 0.0)
    other = f"--data_dir={tmp_path / 'other' / 'tokens'}"
    assert study.changed_settings(flags + [other, same[1]], str(folder / "results.json")) == (
        f"data_dir='data/tokens' (now {str(tmp_path / 'other' / 'tokens')!r})")


def test_ctrl_c_stops_the_study_with_one_line_and_the_interrupted_exit_code(run_data, tmp_path, monkeypatch, capsys):
    """A Ctrl-C reaches the study and its runs: each run writes its checkpoint and exits with 130, and the study said so
    with a traceback; now one line that says how to continue, and train.py's exit code for a stopped run."""
    def stopped(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(study, "selection", stopped)
    with pytest.raises(SystemExit) as e:
        study.main(small_study_flags(monkeypatch, run_data, tmp_path / "s", "--runs=lora32"))
    err = capsys.readouterr().err
    assert e.value.code == study.machine.INTERRUPTED and "Traceback" not in err and err.count("\n") == 1
    assert "study.py stopped; run the same command again to continue" in err


def test_a_chart_stopped_while_it_is_written_leaves_the_old_one_whole(tmp_path, monkeypatch):
    """loss.png was saved in place: a Ctrl-C while matplotlib wrote it left half a PNG where the last study's was.
    A stand-in matplotlib writes half its bytes, then is stopped."""
    class Drawing:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def savefig(self, target, **k):
            f = open(target, "wb") if isinstance(target, str) else target  # a path is written in place
            f.write(b"\x89PNG half")
            f.flush()
            raise KeyboardInterrupt
    pyplot = SimpleNamespace(subplots=lambda **k: (Drawing(), Drawing()))
    monkeypatch.setitem(sys.modules, "matplotlib", SimpleNamespace(use=lambda backend: None, pyplot=pyplot))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    (tmp_path / "loss.png").write_bytes(b"\x89PNG the last study's whole chart")
    with pytest.raises(KeyboardInterrupt):
        study.pngs({"lora32": [{"curve": [(1, 2.0)], "config": {"seed": 1}}]}, str(tmp_path))
    assert (tmp_path / "loss.png").read_bytes() == b"\x89PNG the last study's whole chart"


def test_a_study_continues_past_a_diverged_run_and_one_killed_before_its_first_checkpoint(run_data, tmp_path,
                                                                                         monkeypatch):
    """Both leave a log.jsonl and no ckpt.pt (the study checkpoints at its last step only), and train.py refuses a
    folder that holds a run: a study with one diverged run, or killed (kill -9) while a run trained, stopped at that
    run on every relaunch ("failed: ... already holds a run"), telling the user to rerun it. A diverged run is now
    not rerun (its settings are kept, and checked as a finished run's), a killed one starts again; train.py runs in
    this process, as in test_launch_tells_a_diverged_run_from_a_failed_one."""
    ran = train_in_this_process(monkeypatch)
    opts, extra, _ = study.parse(small_study_flags(monkeypatch, run_data, tmp_path, "--eval_dir="))  # no scoring: fast
    flags = study.run_flags("lora32", 1, 1e-3, opts, extra)
    real_forward = Transformer.forward
    with monkeypatch.context() as m:
        m.setattr(Transformer, "forward", lambda self, *a, **k: (real_forward(self, *a, **k)[0], train.torch.tensor(
            math.nan, requires_grad=True)))
        assert study.launch(flags, 1)[0] == "diverged"
    folder = tmp_path / "lora32-lr0.001-seed1"
    assert (folder / "log.jsonl").exists() and not (folder / "ckpt.pt").exists()
    assert study.launch(flags, 1) == ("diverged before", 0.0) and len(ran) == 1  # not rerun, not "failed"
    assert study.read_results(folder) is None  # nor read as a finished run
    other = study.run_flags("lora32", 1, 1e-3, opts | {"steps": 4}, extra)
    with pytest.raises(study.data.UserError, match=r"the diverged run in .* was made with max_iters=3 \(now 4\)"):
        study.launch(other, 1)
    killed = study.run_flags("lora8", 1, 1e-3, opts, extra)  # what a run killed at its first steps leaves
    (tmp_path / "lora8-lr0.001-seed1").mkdir()
    (tmp_path / "lora8-lr0.001-seed1" / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    assert study.launch(killed, 1)[0] == "done" and (tmp_path / "lora8-lr0.001-seed1" / "ckpt.pt").exists()
    assert study.launch(killed, 1)[0] == "done"  # a later launch finds it its own (started again with overwrite=True)
    assert ran[-1][-1] == "--init_from=resume"


@pytest.mark.parametrize("case", ["a cut results.json", "a run of other steps", "a run of other data",
                                  "a diverged run of other steps"])
def test_a_damaged_or_foreign_run_folder_is_refused_before_anything_trains(tmp_path, capsys, monkeypatch, case):
    """A run folder the study takes as done was read only when it reached that run, a final run's only in the report:
    a truncated results.json, or a folder left by a study of other settings, stopped the study after hours of other
    runs. Every folder it would reuse (each rate's: a final run's rate is chosen later) is checked first."""
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: pytest.fail("the demo was built before the refusal"))
    monkeypatch.setattr(study, "run_all", lambda *a, **k: pytest.fail("a run started before the refusal"))
    out = tmp_path / "study"
    argv = [f"--out={out}", "--runs=lora8,teamlora", "--seeds=2", "--steps=60"]
    opts, extra, _ = study.parse(argv)
    folder = out / f"teamlora-lr{study.GRID[3]:g}-seed2"  # a final run, at the rate least likely to be chosen
    config = train.parse_config(study.run_flags("teamlora", 2, study.GRID[3], opts, extra))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    fake_run(folder, study.GRID[3], {"a": 50.0}, seed=2)
    (out / "select").mkdir()
    results = json.loads((folder / "results.json").read_text()) | {"config": config}
    text, message = {
        "a cut results.json": ('{"scores": {"a": 5', f"{folder}/results.json line 1 is not valid JSON"),
        "a run of other steps": (json.dumps(results | {"config": config | {"max_iters": 500}}),
                                 f"the finished run in {folder} was made with max_iters=500 (now 60)"),
        "a run of other data": (json.dumps(results | {"config": config | {"data_dir": "elsewhere"}}),
                                f"the finished run in {folder} was made with data_dir='elsewhere'"),
        "a diverged run of other steps": (None, f"the diverged run in {folder} was made with max_iters=500 (now 60)"),
    }[case]
    if text is None:
        (folder / "results.json").unlink()
        (folder / study.DIVERGED).write_text(json.dumps({"config": config | {"max_iters": 500}}))
    else:
        (folder / "results.json").write_text(text)
    assert script_error(study.main, argv, capsys).startswith(f"study.py: error: {message}")
    if case == "a run of other steps":  # the same run of this study's settings is taken as done
        (folder / "results.json").write_text(json.dumps(results))
        study.check_runs(opts, extra, ["lora8", "teamlora"])


@non_ascii_names
def test_an_out_whose_runs_torch_cannot_open_under_the_locale_is_refused_before_anything_runs(tmp_path, capsys,
                                                                                            monkeypatch):
    """Every run's out_dir is below --out: under LC_ALL=C (PYTHONUTF8=0) a non-ASCII one was taken, the demo's base
    built, and each run then refused by train.py, whose fix (give --out_dir an ASCII path) the study refuses as a
    flag. It is refused at once as train.py refuses its out_dir, naming the locale's fix; under any locale a name that
    is not UTF-8 (Python's lone surrogates) too."""
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: pytest.fail("the demo was built before the refusal"))
    monkeypatch.setattr(study, "run_all", lambda *a, **k: pytest.fail("a run started before the refusal"))
    sets_in(tmp_path / "val", tmp_path / "test")
    sets = [f"--val_dir={tmp_path / 'val'}", f"--eval_dir={tmp_path / 'test'}"] + [  # not the demo's: none is built
        f"--{key}={tmp_path / 'none'}" for key in ("data_dir", "tokenizer", "init_from")]
    sys.stderr.reconfigure(errors="backslashreplace")  # as Python's own stderr writes a lone surrogate
    err = script_error(study.main, [f"--out={tmp_path}/\udce9", *sets], capsys)
    assert err.startswith(f"study.py: error: out {tmp_path}/\\udce9 holds ") and err.endswith(
        ", and torch and the tokenizers cannot open such a path; name it in UTF-8, or give --out an ASCII path."
        if sys.getfilesystemencoding().lower().replace("-", "") == "utf8" else "give --out an ASCII path."), err
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "OMP_NUM_THREADS": "1"}
    encoding = subprocess.run([sys.executable, "-c", "import sys; print(sys.getfilesystemencoding())"], env=env,
                              capture_output=True, text=True).stdout.strip()
    if encoding.lower().replace("-", "") != "utf8":  # macOS reads names as UTF-8 under the C locale too
        out = tmp_path / "\u00e9"
        bad = subprocess.run([sys.executable, "study.py", f"--out={out}", *sets], cwd=os.path.dirname(study.__file__),
                             env=env, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr[-2000:]
        assert bad.stderr.startswith("study.py: error: out ") and "holds non-ASCII characters" in bad.stderr
        assert bad.stderr.endswith("run it under a UTF-8 locale (LC_ALL=C.UTF-8, or PYTHONUTF8=1), or give --out an "
                                   "ASCII path.\n"), bad.stderr
        # a val_dir of Python's own text (a notebook's; argv's bytes it would read back): no file can have that name
        argv = [f"--out={tmp_path / 'study'}", f"--val_dir={out}", *sets[1:]]
        code = f"import errors, study; errors.run_script(lambda: study.main({ascii(argv)}))"
        bad = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(study.__file__), env=env,
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and bad.stderr.startswith("study.py: error: val_dir "), bad.stderr[-2000:]
        assert bad.stderr.endswith("no file or folder can have such a path; run it under a UTF-8 locale (LC_ALL="
                                   "C.UTF-8, or PYTHONUTF8=1), or give --val_dir an ASCII path.\n"), bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test", "val"]  # nothing made


@pytest.mark.parametrize("eval_dir", ["", "VAL", "./VAL/"])
def test_final_runs_scored_on_nothing_or_on_the_validation_sets_are_refused_before_anything_trains(
        tmp_path, capsys, monkeypatch, eval_dir):
    """--eval_dir= trained every final run to write no scores, then reported "no finished runs ... run python
    study.py first" (a rerun did the same); --eval_dir equal to --val_dir chose the rates on the test sets."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "VAL").mkdir()
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: pytest.fail("the demo was built before the refusal"))
    monkeypatch.setattr(study, "run_all", lambda *a, **k: pytest.fail("a run started before the refusal"))
    err = script_error(study.main, ["--out=study", "--val_dir=VAL", f"--eval_dir={eval_dir}"], capsys)
    assert err == ("study.py: error: --eval_dir is empty, and the study scores its final runs on it; give the folder "
                   "of the test sets (<task>.jsonl)." if not eval_dir else
                   "study.py: error: --val_dir and --eval_dir are the same folder (VAL), so the learning rates would "
                   "be chosen on the test sets; give the validation sets a folder of their own.")


@pytest.mark.parametrize("key", ["val_dir", "eval_dir"])
@pytest.mark.parametrize("fault", ["missing", "a file", "no sets", "a JSON list"])
def test_validation_or_test_sets_that_cannot_be_scored_are_refused_before_anything_trains(tmp_path, capsys,
                                                                                        monkeypatch, key, fault):
    """An eval_dir that held no sets was found by the first final run, after every selection run had trained (hours
    of the full study); a val_dir that was a file was said not to exist."""
    monkeypatch.chdir(tmp_path)
    sets_in(tmp_path / "VAL", tmp_path / "TEST")
    bad = {"missing": "gone", "a file": "notes.txt", "no sets": "empty", "a JSON list": "lists"}[fault]
    (tmp_path / "notes.txt").write_text("not a set\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "qa.json").write_text("[]")
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: None)
    monkeypatch.setattr(study, "run_all", lambda *a, **k: pytest.fail("a run started before the refusal"))
    sets = {"val_dir": "VAL", "eval_dir": "TEST", key: bad}
    err = script_error(study.main, ["--out=study", f"--val_dir={sets['val_dir']}", f"--eval_dir={sets['eval_dir']}"],
                       capsys)
    what = {"missing": "does not exist", "a file": "is a file, not a folder of <task>.jsonl files"}
    assert err == (f"study.py: error: {key} '{bad}' {what[fault]}; write one with python tasks.py, or set --{key}."
                   if fault in what else
                   f"study.py: error: {key} '{bad}' holds no <task>.jsonl files." if fault == "no sets" else
                   f"study.py: error: {key} '{bad}' holds qa.json: evaluation sets are JSONL, one record per line; "
                   f"write them with python tasks.py --out {os.path.join(bad, '<task>.jsonl')}.")
    assert not (tmp_path / "study" / "select").exists()


def test_sets_of_ones_own_that_cannot_be_scored_are_refused_before_the_demo_is_built(tmp_path, capsys, monkeypatch):
    """--val_dir=typo in a fresh checkout built the mini-CME suite and pretrained its base (minutes) before its
    refusal; the demo's own folders, which build_demo makes, are still read after it."""
    monkeypatch.chdir(tmp_path)
    sets_in(tmp_path / "VAL", tmp_path / "TEST")
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: pytest.fail("the demo was built before the refusal"))
    monkeypatch.setattr(study, "run_all", lambda *a, **k: pytest.fail("a run started before the refusal"))
    for key, sets in (("val_dir", ["--val_dir=gone", "--eval_dir=TEST"]), ("eval_dir", ["--val_dir=VAL",
                                                                                        "--eval_dir=gone"])):
        assert script_error(study.main, ["--out=study", *sets], capsys) == (
            f"study.py: error: {key} 'gone' does not exist; write one with python tasks.py, or set --{key}.")
    built = []
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: built.append(cfg["eval_dir"]) or {"interrupted": True})
    assert "pretraining the demo's base was interrupted" in script_error(study.main, ["--out=study"], capsys)
    assert built == [study.train.DEFAULTS["eval_dir"]]  # the demo's sets, not there yet: built first


def test_a_failed_runs_sentence_is_quoted_into_the_studys_without_its_full_stop(tmp_path, monkeypatch):
    def fails(cmd, log, env):
        log.write("step 0\ntrain.py: error: max_len=8 cuts away the answer of every training record: raise "
                  "--max_len.\n")
        return 2
    monkeypatch.setattr(study, "run_child", fails)
    with pytest.raises(study.data.UserError) as e:
        study.launch([f"--out_dir={tmp_path / 'run'}"], 1)
    run = tmp_path / "run"
    assert str(e.value) == (f"the run in {run} failed: train.py: error: max_len=8 cuts away the answer of every "
                            f"training record: raise --max_len; its log is {run}/stdout.txt, and the study continues "
                            "from it when rerun.")


def test_a_run_killed_by_a_signal_is_named_so_not_by_its_last_line_of_progress(tmp_path, monkeypatch):
    """A run killed by a signal (kill -9, the out-of-memory killer) was said to have "failed: step 2 ...", its last
    line of progress, as if that line were its error."""
    def killed(cmd, log, env):
        log.write("training\nstep 2: loss 1.50\n")
        return -9  # Popen's code of a process that a signal ended
    monkeypatch.setattr(study, "run_child", killed)
    with pytest.raises(study.data.UserError) as e:
        study.launch([f"--out_dir={tmp_path / 'run'}"], 1)
    assert str(e.value).startswith(f"the run in {tmp_path / 'run'} failed: it was killed by signal 9 (")
    assert "step 2" not in str(e.value) and str(e.value).endswith("the study continues from it when rerun.")


def test_a_report_names_the_seeds_missing_from_each_mean(tmp_path):
    """A final run that diverged (or is not finished yet) was left out of its row's mean and spread without a word,
    under a heading naming every seed: the row now says over how many seeds, and a list names the missing ones."""
    opts, extra, names = study.parse([f"--out={tmp_path}", "--runs=lora8,lora32", "--report", "--seeds=4"])
    lr = study.GRID[1]
    fake_run(tmp_path / "select" / f"lora32-lr{lr:g}", lr, {"a": 50.0})
    for seed, score in ((1, 60.0), (2, 70.0), (4, 65.0)):
        fake_run(tmp_path / f"lora32-lr{lr:g}-seed{seed}", lr, {"a": score}, seed=seed)
    for seed, score in ((1, 40.0), (2, 46.0)):
        fake_run(tmp_path / f"lora8-lr{lr:g}-seed{seed}", lr, {"a": score}, seed=seed)
    (tmp_path / f"lora8-lr{lr:g}-seed3").mkdir()
    (tmp_path / f"lora8-lr{lr:g}-seed3" / study.DIVERGED).write_text("{}")
    results = study.report(opts, names, study.selection(opts, extra, names))
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| LoRA r=8 "))
    assert row.startswith(f"| LoRA r=8 (2 of 4 seeds) | {lr:g} | ") and f"| {np.mean([40, 46]):.1f}±" in row
    assert [r["config"]["seed"] for r in results["lora8"]] == [1, 2]
    heading = re.match(r"## mini-CME study: \d+ steps, seeds ([\d,]+), scores", text).group(1)  # names every seed
    assert [int(seed) for seed in heading.split(",")] == list(opts["seeds"]) == [1, 2, 3, 4]
    assert "| LoRA r=32 (3 of 4 seeds) |" in text
    assert "### Runs missing from the means above\n\n- LoRA r=8: seed 3 diverged, seed 4 not finished\n" \
           "- LoRA r=32: seed 3 not finished\n" in text


def test_a_damaged_selection_run_is_refused_before_anything_trains_and_a_missing_run_hides_no_other(tmp_path):
    """check_runs reads the selection runs' folders too, not only the final runs'; check_tasks compares every run
    that has results, whatever runs before it are missing."""
    opts, extra, names = study.parse([f"--out={tmp_path}", "--runs=teamlora", "--seeds=1"])
    folder = tmp_path / "select" / f"teamlora-lr{study.GRID[3]:g}"
    fake_run(folder, study.GRID[3], {"a": 5.0})
    (folder / "results.json").write_text('{"scores": {"a": 5')
    with pytest.raises(study.data.UserError, match=f"{re.escape(str(folder))}/results.json line 1 is not valid JSON"):
        study.check_runs(opts, extra, names)
    with pytest.raises(study.data.UserError, match="the run in c was scored on the tasks y, the run in b on x"):
        study.check_tasks({"a": None, "b": {"scores": {"x": 1.0}}, "c": {"scores": {"y": 1.0}}})


def test_run_child_passes_its_environment_and_logs_the_runs_stderr_with_its_stdout(tmp_path):
    """launch names a failed run by the last line of its stdout.txt, which is train.py's error on stderr; the run's
    environment (OMP_NUM_THREADS, its thread budget) is the one given."""
    code = "import os, sys; print(os.environ.get('BUDGET'), flush=True); sys.exit('error: the last line')"
    with open(tmp_path / "run.txt", "w") as log:
        assert study.run_child([sys.executable, "-c", code], log, {**os.environ, "BUDGET": "3"}) == 1
    assert (tmp_path / "run.txt").read_text() == "3\nerror: the last line\n"


def test_a_failed_runs_words_are_read_as_utf8_whatever_the_locale(tmp_path):
    """stdout.txt was written in the run's locale encoding and read in the study's: under LC_ALL=C a run's output
    beyond ASCII was escaped, or ended the run (print), and a stdout.txt in UTF-8 ended the study with a traceback."""
    child = "import sys; print('\\u2502 \\u00b1', flush=True); sys.exit('error: the run\\u2019s own words')"
    code = (f"import sys, study\nreal = study.run_child\nstudy.run_child = lambda cmd, log, env: real([sys.executable, "
            f"'-c', {child!r}], log, env)\ntry:\n    study.launch(['--init_from=base.pt', '--out_dir={tmp_path}'], 1)\n"
            "except study.data.UserError as e:\n    print(ascii(str(e)))\n")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.abspath(study.__file__)))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert ast.literal_eval(done.stdout) == (f"the run in {tmp_path} failed: error: the run\u2019s own words; its log "
                                             f"is {tmp_path}/stdout.txt, and the study continues from it when rerun.")
    assert study.last_attempt(tmp_path / "stdout.txt")[0] == "\u2502 \u00b1"  # the run's first line, as it printed it


def test_a_runs_log_keeps_every_attempt_and_the_study_reads_how_the_latest_one_ended(tmp_path, monkeypatch):
    """A run's stdout.txt keeps each attempt's output (an earlier one says why it failed), each after a line of its
    own; the study reads how a run ended from its latest attempt only: a later attempt that ended without a word was
    taken for the earlier one, here a diverged run (never run again), or named by the earlier one's error."""
    folder = tmp_path / "run"
    folder.mkdir()
    earlier = "step 40: loss nan\nerror: the loss became nan at step 40; lower --learning_rate"  # cut short: no \n
    (folder / "stdout.txt").write_text(earlier, encoding="utf-8")
    monkeypatch.setattr(study, "run_child", lambda cmd, log, env: 1)  # fails, printing nothing
    with pytest.raises(study.data.UserError) as e:
        study.launch([f"--out_dir={folder}"], 1)
    assert str(e.value) == (f"the run in {folder} failed: it ended with exit code 1 and printed nothing; its log is "
                            f"{folder}/stdout.txt, and the study continues from it when rerun.")
    assert not (folder / study.DIVERGED).exists()

    def fails(cmd, log, env):
        log.write("step 3: loss 2.00\nerror: out of memory: lower batch_size\n\n")
        return 3
    monkeypatch.setattr(study, "run_child", fails)
    (folder / "ckpt.pt").write_text("")  # the next attempt resumes
    with pytest.raises(study.data.UserError, match="failed: error: out of memory: lower batch_size; its log"):
        study.launch([f"--out_dir={folder}"], 1)
    lines = (folder / "stdout.txt").read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(study.ATTEMPT)]
    assert "\n".join(lines[:starts[0]]).strip() == earlier and starts[1] == starts[0] + 2  # nothing lost, one each
    assert lines[starts[1]].endswith(": train.py resumes the run from its checkpoint ====")
    assert study.last_attempt(folder / "stdout.txt") == lines[starts[1] + 1:] == [
        "step 3: loss 2.00", "error: out of memory: lower batch_size", ""]
    before = ["step 1: loss 2.50", f"a run's own line that holds {study.ATTEMPT} is no attempt's start"]
    (tmp_path / "old.txt").write_bytes(("\n".join(before) + "\n").encode() + b"caf\xe9\n")  # and a Latin-1 line
    assert study.last_attempt(tmp_path / "old.txt") == before + ["caf\ufffd"]  # a log from before attempts were marked


def test_a_runs_output_is_in_its_stdout_txt_as_it_prints_it(tmp_path, monkeypatch):
    """Block-buffered, a run's lines reached stdout.txt in chunks, and those of a run that a killed study left stopping
    came as it exited, after it had let its folder go: into the next attempt's part of the log, which the study reads
    to say how that attempt ended."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    child = ("import sys\nprint('interrupted: checkpoint of step 2 written')\nwritten = open(sys.argv[1]).read()\n"
             "sys.exit(0 if 'checkpoint of step 2 written' in written else 'error: not in stdout.txt as printed')")
    real = study.run_child
    monkeypatch.setattr(study, "run_child", lambda cmd, log, env: real([sys.executable, "-c", child,
                                                                       str(tmp_path / "stdout.txt")], log, env))
    assert study.launch([f"--out_dir={tmp_path}"], 1)[0] == "done"


def test_a_sigterm_reaches_every_run_under_way_and_one_started_after_it_is_terminated_not_killed(tmp_path):
    """The study runs several train.py at once: each gets the SIGTERM (not a kill: each writes its checkpoint)."""
    import threading
    import time
    logs, codes = [tmp_path / f"run{i}.txt" for i in range(3)], []
    outs = [open(log, "w") for log in logs]
    try:
        runners = [threading.Thread(target=lambda f=f: codes.append(study.run_child([sys.executable, "-c", CHILD], f,
                                                                                    None))) for f in outs[:2]]
        for runner in runners:
            runner.start()
        deadline = time.time() + 30
        while not all("training" in log.read_text() for log in logs[:2]) and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            study.stop_runs(study.signal.SIGTERM, None)
        for runner in runners:
            runner.join(30)
        assert codes == [130, 130] and all(log.read_text() == "training\ncheckpoint written\n" for log in logs[:2])
        # started after the signal: terminated too (before or after its handler is set), never killed
        assert study.run_child([sys.executable, "-c", CHILD], outs[2], None) in (130, -study.signal.SIGTERM)
    finally:
        study.STOPPING.clear()
        for f in outs:
            f.close()


def test_the_selection_table_shows_a_score_of_0_and_is_a_markdown_table_of_equal_rows(tmp_path):
    opts, extra, names = study.parse([f"--out={tmp_path}", "--runs=lora8", "--quick", "--report"])
    low, high = opts["grid"]
    lines = study.selection_table({"lora": (low, {high: 0.0, low: 12.5})}, opts)
    assert lines[2] == f"| LoRA r=32 | 12.5 | 0.0 | {low:g} |"
    assert len({line.count("|") for line in lines}) == 1 and set(lines[1]) == set("|-")


def test_an_out_that_starts_with_a_tilde_is_in_the_home_folder_as_the_shell_gives_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # --out=~/study made a folder named ~ in the current one
    opts = study.parse(["--out=~/study", "--val_dir=~/val"])[0]
    assert (opts["out"], opts["val_dir"]) == (str(tmp_path / "study"), str(tmp_path / "val"))


def test_a_resumed_run_whose_log_was_cut_mid_line_is_read_as_finished_not_damaged(tmp_path):
    """A kill (or a full disk) while a resumed run wrote a line of its log.jsonl leaves that line cut short, and the
    next resume kept it: the step's line written again was glued to it, and the study refused the finished run as
    damaged, telling the user to train it again. The resume drops the cut line, as it drops the later steps' lines."""
    folder = tmp_path / "lora32-lr0.001-seed1"
    lines = [json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in (1, 2, 3)]
    fake_run(folder, 1e-3, {"a": 50.0}, seed=1)
    (folder / "log.jsonl").write_text(lines[0] + lines[1] + lines[2][:9])  # step 3's line cut: ckpt.pt is of step 2
    with checkpoint.open_log(str(folder), 2) as log:  # what the resume does, then its step 3
        log.write(lines[2])
    assert (folder / "log.jsonl").read_text() == "".join(lines)
    assert study.read_results(folder)["curve"] == [(1, 3.0), (2, 1.5), (3, 1.0)]


def test_report_on_a_folder_without_a_study_says_so_too(tmp_path, capsys):
    """A --out that exists (a typo naming another folder, say) but holds no select/ is no study either."""
    with pytest.raises(SystemExit):
        study.main(["--report", f"--out={tmp_path}"])
    out, err = capsys.readouterr()
    assert f"--report found no study in {tmp_path}/" in err and out == ""


def stubbed_study(monkeypatch, tmp_path, *more):
    """The flags of a small study whose runs a stub trains at once (its results from each run's own flags, as
    train.py writes them), with its validation and test sets made; the stub's runs, flags each, are listed."""
    ran = []

    def run(cmd, log, env):
        cfg = train.parse_config(cmd[2:])
        ran.append(cmd[2:])
        config = {k: v for k, v in cfg.items() if not k.startswith("_")}
        folder = tmp_path / cfg["out_dir"]  # an absolute path under tmp_path / "study"
        (folder / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
        (folder / "results.json").write_text(json.dumps(
            {"scores": {"qa": 50.0 + 1000 * cfg["learning_rate"]}, "config": config, "trainable_params": 8,
             "base_params": 800, "train_seconds": 1.0, "chance": {"qa": 25.0}}))
        return 0
    monkeypatch.setattr(study, "run_child", run)
    monkeypatch.setattr(study, "GRID", (1e-3, 4e-3))
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: None)
    sets_in(tmp_path / "val", tmp_path / "test")
    return ran, [f"--val_dir={tmp_path / 'val'}", f"--eval_dir={tmp_path / 'test'}", f"--out={tmp_path / 'study'}",
                 "--runs=lora32", "--seeds=1", "--steps=3", "--workers=1", *more]


def test_a_report_md_the_user_wrote_or_edited_is_kept_and_the_tables_are_printed(tmp_path, capsys, monkeypatch):
    """The study wrote report.md again at each run and each --report: notes a user had added to it, or a report.md
    of the user's own in a study's folder, were replaced without a word. The study's own is replaced as before."""
    _, flags = stubbed_study(monkeypatch, tmp_path)
    report_md = tmp_path / "study" / "report.md"
    study.main(flags)
    first = report_md.read_text(encoding="utf-8")
    assert first in capsys.readouterr().out
    report_md.write_text(first.replace("LoRA r=32", "LoRA r=32 (our best)"), encoding="utf-8")  # the user's notes
    mine = report_md.read_text(encoding="utf-8")
    fix = "rename it, then run the study again with --report to write the report and charts."
    for argv, notes in ((flags + ["--report"], 1), (flags, 2)):  # the study says it before its runs too
        study.main(argv)
        out, err = capsys.readouterr()
        assert first in out and report_md.read_text(encoding="utf-8") == mine
        assert err.count(f"{report_md} is not the file this script wrote there (it was edited since, or is "
                         "another's)") == notes and err.count(fix) == notes and err.count("\n") == notes
    report_md.rename(tmp_path / "study" / "mine.md")  # renamed, as the note says: the report is written again
    study.main(flags + ["--report"])
    assert report_md.read_text(encoding="utf-8") == first and capsys.readouterr().err == ""
    report_md.unlink()
    report_md.mkdir()  # a folder: the study ended, after every run, on "Is a directory"
    study.main(flags + ["--report"])
    out, err = capsys.readouterr()
    assert first in out and err == f"note: report.md and the charts are not written, as {report_md} is a folder, " \
                                   f"not a file; {fix}\n"


@pytest.mark.parametrize("where", ["a run's folder", "select/"])
@pytest.mark.parametrize("what", ["a file", "a link to nothing"])
def test_a_file_where_a_run_folder_belongs_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch, where,
                                                                           what):
    """A file, or a link to nothing, where a run's folder is to be made failed at that run, after the demo's base and
    every run before it, as "File exists (...); ... free space there or make it writable"."""
    _, flags = stubbed_study(monkeypatch, tmp_path)
    monkeypatch.setattr(study, "run_all", lambda *a, **k: pytest.fail("a run started before the refusal"))
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: pytest.fail("the demo was built before the refusal"))
    (tmp_path / "study" / "select").mkdir(parents=True)  # a study stopped before its first run
    path = tmp_path / "study" / ("lora32-lr0.004-seed1" if where == "a run's folder" else "select")
    if where == "select/":
        path.rmdir()
    if what == "a file":
        path.write_text("mine\n")
    else:
        path.symlink_to(tmp_path / "nowhere")
    run = path if where == "a run's folder" else path / "lora32-lr0.001"
    assert script_error(study.main, flags, capsys) == (f"study.py: error: the run folder {run} can not be written: "
                                                       f"{path} is {what}, not a folder; choose another --out.")
    assert what == "a link to nothing" or path.read_text() == "mine\n"


@pytest.mark.parametrize("change", ["seed", "learning_rate", "adapter", "a link to another seed's folder"])
def test_a_report_refuses_a_run_of_another_seed_rate_or_configuration_in_a_runs_folder(tmp_path, capsys,
                                                                                      monkeypatch, change):
    """--report, given no train.py flags, compared only a run's steps: a run of another seed, rate or configuration in
    a run's folder (copied or linked there) was averaged and paired as this one's; the study itself refused it."""
    _, flags = stubbed_study(monkeypatch, tmp_path, "--seeds=2")
    study.main(flags)
    capsys.readouterr()
    lr = study.choose_lr({lr: study.read_results(study.run_dir(study.parse(flags)[0], "lora32", lr))
                          for lr in study.GRID})
    folder = tmp_path / "study" / f"lora32-lr{lr:g}-seed1"
    if change == "a link to another seed's folder":
        shutil.rmtree(folder)
        folder.symlink_to(tmp_path / "study" / f"lora32-lr{lr:g}-seed2")
        changed = "seed=2 (now 1)"
    else:
        res = json.loads((folder / "results.json").read_text())
        other, now = {"seed": (7, 1), "learning_rate": (0.5, lr), "adapter": ("teamlora", "lora")}[change]
        res["config"][change] = other
        (folder / "results.json").write_text(json.dumps(res))
        changed = f"{change}={other!r} (now {now!r})"
    for argv, fix in ((flags + ["--report"], "give --report the --steps, --quick and flags of its study"),
                      (flags, "pass another --out for a study with these settings")):
        assert script_error(study.main, argv, capsys) == \
            f"study.py: error: the finished run in {folder} was made with {changed}; {fix}, or delete that folder to " \
            "redo the run."


def test_settings_a_run_of_the_study_refuses_are_found_before_anything_runs(tmp_path, capsys, monkeypatch):
    """train.py refuses some settings only beside a run's own (weight_decay=300 at the grid's highest rate, 4e-3: every
    weight flips its sign; a seed past 2**63): each was found at the first run it failed, after the demo's base and
    the runs before it; and --dry_run=True "finished" every run with no score, then blamed the grid."""
    monkeypatch.setattr(study, "run_all", lambda *a, **k: pytest.fail("a run started before the refusal"))
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: pytest.fail("the demo was built before the refusal"))
    out = f"--out={tmp_path / 'study'}"
    assert script_error(study.main, [out, "--weight_decay=300"], capsys).startswith(
        f"study.py: error: learning_rate={max(study.GRID):g} with weight_decay=300 zeroes every weight")
    assert script_error(study.main, [out, f"--seeds=1,{2**70}"], capsys) == \
        f"study.py: error: config key 'seed' must be in [0, 2**63), got {2**70}."
    for flag in ("--dry_run=True", "--eval_only=True"):
        assert script_error(study.main, [out, flag], capsys) == \
            f"study.py: error: {flag.partition('=')[0]} is set by the study for each of its runs; remove it " \
            "(study.py's RUNS, COMMON and GRID fix it)."


def test_a_run_re_scored_by_hand_is_still_the_studys_when_it_is_run_again(tmp_path, capsys, monkeypatch):
    """A run re-scored by hand (train.py --out_dir=RUN --eval_only=True: its results.json's config says eval_only) was
    refused by the study run again as one "made with eval_only=True (now False)"."""
    ran, flags = stubbed_study(monkeypatch, tmp_path)
    study.main(flags)
    capsys.readouterr()
    folder = tmp_path / "study" / "select" / "lora32-lr0.001"
    res = json.loads((folder / "results.json").read_text())
    (folder / "results.json").write_text(json.dumps({**res, "config": {**res["config"], "eval_only": True}}))
    del ran[:]
    study.main(flags)
    assert ran == [] and capsys.readouterr().out.count("done before") == 3


@pytest.mark.parametrize("flag, fix", [
    ("--init_from=resume", "a study resumes its own: to continue a stopped study, run its command again without "
                           "--init_from (each stopped run resumes from its checkpoint)"),
    ("--overwrite=True", "a study keeps its finished and diverged runs: to redo one, delete its folder")])
def test_train_py_flags_for_the_one_run_in_its_out_dir_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch,
                                                                                      flag, fix):
    """--init_from=resume went to every run and failed the first ("nothing to resume"), after the demo's base was built:
    a study resumes its runs itself. --overwrite=True redid no finished run, unsaid."""
    monkeypatch.setattr(study, "run_all", lambda *a, **k: pytest.fail("a run started before the refusal"))
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: pytest.fail("the demo was built before the refusal"))
    out = tmp_path / "study"
    for more in ([], ["--report"]):
        assert script_error(study.main, [f"--out={out}", flag, *more], capsys) == \
            f"study.py: error: {flag} is train.py's, for the one run in its --out_dir, and {fix}."
    assert not out.exists()


def test_a_folder_named_as_a_chart_is_said_before_the_runs_and_kept_not_failed_on_after_the_report(tmp_path, capsys,
                                                                                                  monkeypatch):
    """With matplotlib, a folder named loss.png failed the study after every run, and after its report.md ("Is a
    directory"): it is said before the runs, as a report.md that is a folder is, and kept; without matplotlib no chart
    is drawn, and none is said."""
    saved = stand_in_matplotlib(monkeypatch)
    ran, flags = stubbed_study(monkeypatch, tmp_path)
    chart = tmp_path / "study" / "loss.png"
    chart.mkdir(parents=True)
    (tmp_path / "study" / "select").mkdir()  # a study's folder
    notes = []
    monkeypatch.setattr(study, "run_all", lambda *a, real=study.run_all, **k: notes.append(capsys.readouterr().err)
                        or real(*a, **k))
    fix = "rename it, then run the study again with --report to write the report and charts."
    results = study.main(flags)
    assert len(ran) == 3 and results["lora32"] and (tmp_path / "study" / "report.md").is_file()
    assert notes[0] == f"note: {chart} is a folder, not a file, and is kept; {fix}\n"  # before the first run
    assert capsys.readouterr().err == f"note: loss.png is not written, as {chart} is a folder, not a file; {fix}\n"
    assert chart.is_dir() and not any(chart.iterdir()) and saved == []
    chart.rmdir()  # renamed, as the note says: the chart is drawn
    study.main(flags + ["--report"])
    assert saved == ["png"] and chart.read_bytes() == b"PNG" and capsys.readouterr().err == ""
    chart.unlink()
    chart.mkdir()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: no chart, and nothing to say of one
    study.main(flags)
    assert capsys.readouterr().err == "" and saved == ["png"] and chart.is_dir()


def test_each_chart_of_a_folder_is_said_before_the_runs_and_a_chart_not_drawn_is_not_said_after(tmp_path, capsys,
                                                                                                 monkeypatch):
    """check_out names expert_load.png as it does loss.png; pngs says a folder of a chart's name only for a chart it
    would draw (no TeamLoRA run: no expert load), and has matplotlib draw into files (Agg), not onto a screen."""
    saved, backends = stand_in_matplotlib(monkeypatch), []
    monkeypatch.setattr(sys.modules["matplotlib"], "use", backends.append)
    fix = "rename it, then run the study again with --report to write the report and charts."
    out = tmp_path / "study"
    charts = [out / name for name in study.CHARTS]
    for chart in charts + [out / "select"]:  # select/: a study's folder
        chart.mkdir(parents=True)
    study.check_out(str(out))
    assert capsys.readouterr().err == "".join(f"note: {c} is a folder, not a file, and is kept; {fix}\n"
                                              for c in charts)
    charts[0].rmdir()
    run = {"curve": [(1, 2.0)], "config": {"seed": 1}}
    assert study.pngs({"lora32": [run]}, str(out)) == [str(charts[0])] and saved == ["png"]
    assert capsys.readouterr().err == "" and charts[1].is_dir() and backends and set(backends) == {"Agg"}


@pytest.mark.parametrize("case", ["a results.json giving a key twice", "a diverged.json giving a key twice",
                                  "an empty diverged.json", "a diverged.json of a list",
                                  "a diverged.json whose config is no object", "a diverged.json that is a folder",
                                  "a diverged.json whose link leads nowhere",
                                  "a results.json giving its config twice, the last of other settings"])
def test_a_key_given_twice_or_a_damaged_diverged_json_is_refused_before_anything_trains(tmp_path, capsys, monkeypatch,
                                                                                       case):
    """json keeps a repeated key's last value unsaid: a results.json giving "scores" twice was averaged on one of them
    (config.json and a task's records refuse it). A damaged diverged.json was taken as a diverged run: not run again,
    and named "diverged" in the report."""
    monkeypatch.setattr(study.train, "build_demo", lambda cfg: pytest.fail("the demo was built before the refusal"))
    monkeypatch.setattr(study, "run_all", lambda *a, **k: pytest.fail("a run started before the refusal"))
    out = tmp_path / "study"
    argv = [f"--out={out}", "--runs=teamlora", "--seeds=1", "--steps=60"]
    opts, extra, _ = study.parse(argv)
    folder = out / f"teamlora-lr{study.GRID[3]:g}-seed1"
    config = train.parse_config(study.run_flags("teamlora", 1, study.GRID[3], opts, extra))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    fake_run(folder, study.GRID[3], {"a": 50.0}, seed=1)
    (out / "select").mkdir()
    finished = json.dumps(json.loads((folder / "results.json").read_text()) | {"config": config})
    diverged = json.dumps({"config": config, "error": "train.py: error: the loss became nan at step 3"})
    name, text, problem = {
        "a results.json giving a key twice": ("results.json", '{"scores": {"a": 99.0}, ' + finished[1:],
                                              "line 1 gives the key 'scores' twice (JSON would keep only the last "
                                              "value)"),
        "a diverged.json giving a key twice": (study.DIVERGED, '{"config": {}, ' + diverged[1:],
                                               "line 1 gives the key 'config' twice (JSON would keep only the last "
                                               "value)"),
        "an empty diverged.json": (study.DIVERGED, "", "line 1 is not valid JSON (Expecting value)"),
        "a diverged.json of a list": (study.DIVERGED, "[]", "holds a list, not a JSON object"),
        "a diverged.json whose config is no object": (study.DIVERGED, '{"config": "teamlora"}',
                                                      'is no diverged run\'s record (no "config")'),
        "a diverged.json that is a folder": (study.DIVERGED, None, "is a folder, not a file"),
        "a diverged.json whose link leads nowhere": (study.DIVERGED, ..., "can not be read (No such file or "
                                                                          "directory)"),
        # not compared by its last config (json's): "was made with seed=7" would name a setting the run never had
        "a results.json giving its config twice, the last of other settings": (
            "results.json", finished[:-1] + ', "config": ' + json.dumps(config | {"seed": 7}) + "}",
            "line 1 gives the key 'config' twice (JSON would keep only the last value)"),
    }[case]
    if name == study.DIVERGED:  # a run of this study that diverged: taken as such
        (folder / "results.json").unlink()
        (folder / name).write_text(diverged)
    else:  # a run of this study that finished: taken as done
        (folder / name).write_text(finished)
    study.check_runs(opts, extra, ["teamlora"])
    if text is None:
        (folder / name).unlink()
        (folder / name).mkdir()
    elif text is ...:  # os.path.exists calls it missing: the run was trained again
        (folder / name).unlink()
        (folder / name).symlink_to(tmp_path / "gone")
    else:
        (folder / name).write_text(text)
    assert script_error(study.main, argv, capsys) == \
        f"study.py: error: {folder / name} {problem}; delete {folder} and run the study again to redo the run."
