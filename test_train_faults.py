"""train.py under hostile files, broken inputs and interruptions: every fault is one sentence naming the
file or key (exit code 2, no traceback), found before step 1, and nothing a user wrote or trained is lost.

    python -m pytest -q
"""
import codecs
import contextlib
import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import evaluation
import files
import machine
import minicme
import model
import sample
import tokenizer
import train
from conftest import (
    LLAMA2,
    OFFICIAL,
    FullDisk,
    adapters_of,
    assert_same_adapters,
    held_by_another_process,
    hf_tokenizer_folder,
    named_pipe,
    needs_distributed_torch,
    needs_fixtures,
    non_ascii_names,
    repository_files,
    script_error,
    train_flags,
    with_vocabulary,
)
from data import prepare
from test_weights import saved_tiny_model

REPO = Path(__file__).resolve().parent


def fails(argv, capsys, *needles):
    """train.main(argv) exits with code 2 and one line on stderr holding every needle; returns the line."""
    with pytest.raises(SystemExit) as exit_:
        train.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("train.py: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


def finished_run(run_data, out, *more):
    """A finished tiny run (4 steps, a checkpoint every 2, no scoring) in out."""
    summary = train.main(train_flags(run_data, out, "--max_iters=4", "--eval_interval=2", "--eval_dir=", *more))
    assert summary is None and (out / "ckpt.pt").is_file()
    return out


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def every_file(folder):
    """What folder holds, all the way down: each path under it, and a file's bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_cannot_run_code_on_resume(run_data, tmp_path, capsys):
    out = finished_run(run_data, tmp_path / "run")
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "optimizer": RunsCode(marker), "iter": 2, "config": {}, "rng": [], "model_args": {}},
               out / "ckpt.pt")
    fails(train_flags(run_data, out, "--init_from=resume"), capsys, out / "ckpt.pt", "could run code")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "adapter"])
def test_a_damaged_or_wrong_checkpoint_names_itself(run_data, tmp_path, capsys, damage):
    out = finished_run(run_data, tmp_path / "run")
    ckpt = out / "ckpt.pt"
    good = ckpt.read_bytes()
    new = {"truncated": good[:len(good) // 2], "garbage": os.urandom(4096), "empty": b"",
           "adapter": (out / "adapter.pt").read_bytes()}[damage]
    ckpt.write_bytes(new)
    err = fails(train_flags(run_data, out, "--init_from=resume"), capsys, ckpt)
    if damage == "adapter":  # what reads it is named: a resume here, a re-scoring with --eval_only=True
        assert "is an adapter (adapter.pt), not the ckpt.pt" in err and "; a resume needs that ckpt.pt" in err
        fails(train_flags(run_data, out, "--eval_only=True"), capsys, ckpt,
              "; a re-scoring (--eval_only=True) needs that ckpt.pt; to score it alone")
    assert ckpt.read_bytes() == new  # left as it was, for the user to look at


def test_a_rescoring_with_ckpt_pt_names_an_adapter_pt_beside_it_that_differs_and_leaves_it_as_it_was(
        run_data, tmp_path, capsys):
    """A re-scoring of a run with a ckpt.pt scores ckpt.pt's adapter; an adapter.pt beside it from another run (copied
    in, perhaps of another base) was passed over without a word, as if it had been scored. It is named, and kept."""
    out, other = finished_run(run_data, tmp_path / "run"), finished_run(run_data, tmp_path / "other", "--seed=7")
    rescore = train_flags(run_data, out, "--max_iters=4", "--eval_interval=2", "--eval_only=True", "--eval_limit=1")
    capsys.readouterr()
    for how in ([], ["--dry_run=True"]):  # its own adapter.pt: nothing to say, by the run or its dry run
        train.main(rescore + how)
        assert "adapter.pt" not in capsys.readouterr().err
    shutil.copy(other / "adapter.pt", out / "adapter.pt")
    copied = (out / "adapter.pt").read_bytes()
    train.main(rescore)
    err = capsys.readouterr().err
    assert f"scoring the adapter in {out}/ckpt.pt (step 4), not the {out}/adapter.pt beside it" in err, err
    assert "move ckpt.pt out of" in err and (out / "adapter.pt").read_bytes() == copied
    note = next(line for line in err.splitlines() if line.startswith("note: scoring the adapter"))
    train.main(rescore + ["--dry_run=True"])  # the dry run says what the re-scoring will
    assert note in capsys.readouterr().err.splitlines() and (out / "adapter.pt").read_bytes() == copied


def test_a_rescorings_dry_run_gives_its_note_of_another_adapter_pt_through_rank_0s_say_alone(run_data, tmp_path,
                                                                                            capsys, monkeypatch):
    """The dry run runs on every rank of a torchrun and says things through rank 0's say alone: the note of a differing
    adapter.pt beside ckpt.pt goes that way too (a plain print would repeat it once per process)."""
    out, other = finished_run(run_data, tmp_path / "run"), finished_run(run_data, tmp_path / "other", "--seed=7")
    shutil.copy(other / "adapter.pt", out / "adapter.pt")
    said = []
    monkeypatch.setattr(train.Run, "say", lambda self, *a, **kw: said.append((self.rank, " ".join(map(str, a)))))
    capsys.readouterr()
    train.main(train_flags(run_data, out, "--max_iters=4", "--eval_interval=2", "--eval_only=True", "--dry_run=True"))
    notes = [(rank, line) for rank, line in said if line.startswith("note: scoring the adapter")]
    assert notes == [(0, f"note: scoring the adapter in {out}/ckpt.pt (step 4), not the {out}/adapter.pt beside it, "
                         "which differs (left behind by a stopped save, or copied in from another run); to score "
                         f"that adapter.pt alone, move ckpt.pt out of {out}")], said
    assert "adapter.pt" not in capsys.readouterr().err


def test_the_note_of_another_adapter_pt_is_a_rescorings_alone_not_a_resumes_nor_a_full_runs(run_data, tmp_path,
                                                                                          capsys):
    """A resume writes ckpt.pt's adapter over the adapter.pt beside it (restore), and a full run (adapter=none) scores
    no adapter: neither, nor its dry run, says "scoring the adapter in ckpt.pt, not the adapter.pt beside it"."""
    out, other = finished_run(run_data, tmp_path / "run"), finished_run(run_data, tmp_path / "other", "--seed=7")
    full = finished_run(run_data, tmp_path / "full", "--adapter=none")
    for folder in (out, full):
        shutil.copy(other / "adapter.pt", folder / "adapter.pt")
    capsys.readouterr()
    train.main(train_flags(run_data, out, "--init_from=resume", "--max_iters=6", "--eval_interval=2", "--dry_run=True"))
    assert "note: scoring the adapter" not in capsys.readouterr().err
    for how in (["--dry_run=True"], []):
        train.main(train_flags(run_data, full, "--adapter=none", "--max_iters=4", "--eval_interval=2",
                               "--eval_only=True", "--eval_limit=1", *how))
        assert "note: scoring the adapter" not in capsys.readouterr().err
    assert (full / "adapter.pt").read_bytes() == (other / "adapter.pt").read_bytes()


def test_a_rescoring_with_ckpt_pt_notes_an_unreadable_adapter_pt_beside_it_and_nothing_where_there_is_none(
        run_data, tmp_path, capsys):
    """The adapter.pt beside a re-scored ckpt.pt that cannot be compared with it (not a torch file, or its names not
    holding tensors) differs as well: named, and kept as it is. Where there is no adapter.pt, nothing is said."""
    out = finished_run(run_data, tmp_path / "run")
    state = torch.load(out / "adapter.pt", weights_only=True)
    rescore = train_flags(run_data, out, "--max_iters=4", "--eval_interval=2", "--eval_only=True", "--eval_limit=1")
    (out / "adapter.pt").unlink()
    capsys.readouterr()
    train.main(rescore)
    assert "adapter.pt" not in capsys.readouterr().err and not (out / "adapter.pt").exists()
    lists = tmp_path / "lists.pt"
    torch.save({n: t.tolist() for n, t in state.items()}, lists)  # ckpt.pt's names, each a list, not a tensor
    for other in (b"not a torch file", lists.read_bytes()):
        (out / "adapter.pt").write_bytes(other)
        train.main(rescore)
        err = capsys.readouterr().err
        assert f"scoring the adapter in {out}/ckpt.pt (step 4), not the {out}/adapter.pt beside it" in err, err
        assert (out / "adapter.pt").read_bytes() == other


@pytest.mark.parametrize("beside", [False, True])
def test_the_way_to_score_an_adapter_saved_as_ckpt_pt_that_the_refusal_gives_scores_it(run_data, tmp_path, capsys,
                                                                                       beside):
    """An adapter saved as ckpt.pt was refused with "an adapter alone can be evaluated with --eval_only=True": which,
    in that folder, read the same ckpt.pt and refused again. The way given, followed, scores it, and never by
    replacing an adapter.pt already there (beside: one is)."""
    out = finished_run(run_data, tmp_path / "my run")  # a space: the folder is quoted for the shell
    adapter = (out / "adapter.pt").read_bytes()
    os.replace(out / "adapter.pt", out / "ckpt.pt")
    if beside:  # another file that the way given must leave alone
        (out / "adapter.pt").write_bytes(b"another adapter")
    flags = train_flags(run_data, out, "--eval_only=True", "--eval_limit=1")
    err = fails(flags, capsys, out / "ckpt.pt", "is an adapter (adapter.pt)", "--eval_only=True --out_dir=")
    if beside:
        assert "move it to a folder of its own as adapter.pt" in err and "--out_dir=<that folder> with" in err, err
        given = tmp_path / "own"
        given.mkdir()
        os.replace(out / "ckpt.pt", given / "adapter.pt")
    else:
        given = shlex.split(err.split("--out_dir=")[1])[0]
        assert "rename it to adapter.pt" in err and os.path.samefile(given, out), err
        os.replace(out / "ckpt.pt", out / "adapter.pt")
    train.main([f for f in flags if not f.startswith("--out_dir=")] + [f"--out_dir={given}"])
    assert (Path(given) / "adapter.pt").read_bytes() == adapter and (Path(given) / "results.json").is_file()
    assert (out / "adapter.pt").read_bytes() == (b"another adapter" if beside else adapter)


def test_a_base_folder_without_its_weight_files_is_one_sentence_not_a_traceback(run_data, tmp_path, capsys):
    """A Meta or Hugging Face folder whose download stopped before its weights: weights.py says so in a
    FileNotFoundError of its own, which train.py must print as one sentence with exit code 2."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4,
                                                                "vocab_size": 8}))
    fails(train_flags(run_data, tmp_path / "o", f"--init_from={tmp_path / 'base'}"), capsys,
          "has params.json but no consolidated.*.pth weight files")
    assert not (tmp_path / "o" / "ckpt.pt").exists()


@pytest.mark.parametrize("what", ["garbage", "truncated", "adapter", "checkpoint", "not_pt"])
def test_a_bad_init_from_names_itself(run_data, tmp_path, capsys, what):
    """checkpoint: a run's ckpt.pt holds model_args but not the base's weights (model)."""
    base = (run_data / "base.pt").read_bytes()
    path = tmp_path / ("base.txt" if what == "not_pt" else "base.pt")
    if what in ("adapter", "checkpoint"):
        finished_run(run_data, tmp_path / "run")
        path.write_bytes((tmp_path / "run" / ("adapter.pt" if what == "adapter" else "ckpt.pt")).read_bytes())
    else:
        path.write_bytes({"garbage": os.urandom(2048), "truncated": base[:len(base) // 3], "not_pt": b"hello"}[what])
    needle = {"garbage": "is not a readable base model", "truncated": "is not a readable base model",
              "adapter": "is an adapter, not a base model; give the base it was trained on",
              "checkpoint": "is a run's training checkpoint (ckpt.pt), not a base model; continue that run with "
                            "--init_from=resume --out_dir=<a folder holding it as ckpt.pt>",  # named base.pt here
              "not_pt": "is a file; give a model.pt written by train.py"}[what]
    fails(train_flags(run_data, tmp_path / "o", f"--init_from={path}"), capsys, path, needle)
    assert not (tmp_path / "o" / "ckpt.pt").exists()


@pytest.mark.parametrize("name", ["ckpt.pt", "adapter.pt"])
def test_a_runs_own_ckpt_or_adapter_given_as_init_from_says_how_to_go_on_with_that_run(run_data, tmp_path, capsys,
                                                                                      name):
    """A ckpt.pt has model_args: it was called "not a base model written by train.py (it has no model_args and
    model)". The sentence names it as the run's, and the --out_dir it gives, as the shell reads it, is its folder."""
    run = finished_run(run_data, tmp_path / "my run")  # a space: the folder is quoted for the shell
    before = every_file(run)
    err = fails(train_flags(run_data, tmp_path / "o", f"--init_from={run / name}"), capsys,
                *(["is a run's training checkpoint (ckpt.pt), not a base model", "--init_from=resume --out_dir="]
                  if name == "ckpt.pt" else ["is an adapter, not a base model"]), "--eval_only=True --out_dir=")
    given = [shlex.split(rest)[0].rstrip(",.") for rest in err.split("--out_dir=")[1:]]
    assert given and all(os.path.samefile(os.path.join(folder, name), run / name) for folder in given), given
    assert every_file(run) == before and not (tmp_path / "o" / "ckpt.pt").exists()


def test_a_full_training_runs_ckpt_given_as_init_from_also_names_the_model_pt_beside_it_as_a_base(run_data, tmp_path,
                                                                                                    capsys):
    """A full training run (adapter=none) writes model.pt beside its ckpt.pt: a base, which the sentence for the
    ckpt.pt names too, as the shell reads it, while it is there; the flag it gives trains."""
    run = finished_run(run_data, tmp_path / "my run", "--adapter=none")  # a space: the path is quoted for the shell
    flags = train_flags(run_data, tmp_path / "o", f"--init_from={run / 'ckpt.pt'}")
    err = fails(flags, capsys, "continue that run with --init_from=resume", "or train on its weights with --init_from=")
    given = shlex.split(err.split("or train on its weights with --init_from=")[1])[0].rstrip(".")
    assert os.path.samefile(given, run / "model.pt"), err
    before = every_file(run)
    assert train.main(train_flags(run_data, tmp_path / "on", f"--init_from={given}", "--max_iters=1", "--eval_dir=",
                                  "--eval_interval=1")) is None and (tmp_path / "on" / "adapter.pt").is_file()
    assert every_file(run) == before
    os.remove(run / "model.pt")  # gone: only the run itself is left to go on with
    assert "train on its weights" not in fails(flags, capsys, "--eval_only=True --out_dir=")


@pytest.mark.parametrize("name", ["base", "base.pt", os.devnull])
def test_an_init_from_that_is_a_named_pipe_or_a_device_is_refused_unread_by_the_run_and_the_dry_run(
        run_data, tmp_path, capsys, name):
    """A named pipe or /dev/null was taken for a Hugging Face folder (a NotADirectoryError's traceback), and the dry
    run let a preset stand in for it; one named .pt was said not to exist."""
    path = tmp_path / name
    needle = f"'{path}' is a named pipe, not a .pt file" if name.endswith(".pt") else \
        f"init_from '{path}' is {'a device' if name == os.devnull else 'a named pipe'}; give a model.pt"
    with named_pipe(path, (run_data / "base.pt").read_bytes()) if name != os.devnull else contextlib.nullcontext():
        for dry_run in ("False", "True"):
            fails(train_flags(run_data, tmp_path / "o", f"--init_from={path}", f"--dry_run={dry_run}"), capsys, needle)


def test_an_init_from_with_a_line_break_in_its_name_is_refused_in_one_line(run_data, tmp_path, capsys):
    """train.py prints its errors through machine.fail, not errors.exit_with: it too keeps them to one line."""
    fails(train_flags(run_data, tmp_path / "o", f"--init_from={tmp_path}/no\nsuch"), capsys,
          f"init_from '{tmp_path}/no\\nsuch' does not exist")


def test_an_out_dir_whose_name_is_too_long_is_refused_before_the_run(run_data, tmp_path, capsys):
    """os.makedirs raised ENAMETOOLONG in files.hold: a traceback (after the demo's pretraining, for the demo)."""
    out = tmp_path / ("o" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1))
    fails(train_flags(run_data, out), capsys, f"out_dir {out} can not be written", "is too long", "--out_dir")
    assert os.listdir(tmp_path) == []


def test_a_new_run_never_replaces_another_unless_asked(run_data, tmp_path, capsys):
    out = finished_run(run_data, tmp_path / "run")
    train.main(train_flags(run_data, out, "--max_iters=4", "--eval_interval=2", "--eval_only=True"))
    before = contents(out)
    assert {"ckpt.pt", "adapter.pt", "results.json", "log.jsonl"} <= before.keys()
    fails(train_flags(run_data, out, "--r=4"), capsys, out, "--init_from=resume", "--overwrite=True")
    assert contents(out) == before  # not a byte changed
    train.main(train_flags(run_data, out, "--r=4", "--max_iters=2", "--eval_interval=2", "--eval_dir=",
                           "--log_interval=1", "--overwrite=True"))
    assert not (out / "results.json").exists()  # the old scores do not stay beside the new weights
    assert torch.load(out / "adapter.pt", weights_only=True)["layers.0.feed_forward.w1.lora_A"].shape[0] == 4
    steps = [line for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 2  # the log starts anew: steps 1 and 2 of the new run only


def test_resume_below_the_checkpoints_step_and_a_stale_adapter(run_data, tmp_path, capsys):
    out = finished_run(run_data, tmp_path / "run")
    fails(train_flags(run_data, out, "--init_from=resume", "--eval_dir=", "--max_iters=2"), capsys, "at step 4",
          "max_iters=2", "--eval_only=True")
    # a kill between the two writes of a checkpoint leaves adapter.pt behind ckpt.pt: a resume mends the pair
    state = torch.load(out / "adapter.pt", weights_only=True)
    torch.save({n: torch.zeros_like(t) for n, t in state.items()}, out / "adapter.pt")
    (out / "ckpt.pt.tmp999999").write_bytes(b"half a checkpoint of a process that was killed")
    train.main(train_flags(run_data, out, "--init_from=resume", "--eval_dir=", "--max_iters=4"))
    captured = capsys.readouterr()
    assert "removed" in captured.out + captured.err
    assert "scoring the adapter" not in captured.err  # a resume rewrites it: nothing to note
    assert not (out / "ckpt.pt.tmp999999").exists()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    for n, t in torch.load(out / "adapter.pt", weights_only=True).items():
        assert torch.equal(t, ckpt["state"][n])
    # full training's model.pt too, even with nothing left to train (the demo's pretraining takes it as its base)
    full = finished_run(run_data, tmp_path / "full", "--adapter=none")
    (full / "model.pt").unlink()
    train.main(train_flags(run_data, full, "--init_from=resume", "--eval_dir=", "--max_iters=4"))
    ckpt = torch.load(full / "ckpt.pt", weights_only=True)
    for n, t in torch.load(full / "model.pt", weights_only=True)["model"].items():
        assert torch.equal(t, ckpt["state"][n])


def test_faults_of_evaluation_and_data_are_found_before_step_1(run_data, tmp_path, capsys):
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "qa.jsonl").write_text('{"instruction": "q", "output": "a"}\n\n{"instruction": "q", oops}\n')
    fails(train_flags(run_data, tmp_path / "a", f"--eval_dir={evals}"), capsys, evals / "qa.jsonl", "line 3")
    (evals / "qa.jsonl").write_text('{"instruction": "q"}\n')
    fails(train_flags(run_data, tmp_path / "b", f"--eval_dir={evals}"), capsys, "line 1", "\"output\"")
    (evals / "qa.jsonl").write_bytes(b'{"instruction": "q", "output": "a"}\n{"instruction": "\xff"}\n')
    fails(train_flags(run_data, tmp_path / "b", f"--eval_dir={evals}"), capsys, evals / "qa.jsonl", "not UTF-8")
    fails(train_flags(run_data, tmp_path / "c", f"--eval_dir={tmp_path / 'nope'}"), capsys, "nope", "does not exist")
    fails(train_flags(run_data, tmp_path / "d", "--max_len=3"), capsys, "max_len=3", "every training record")
    occupied = tmp_path / "file"
    occupied.write_text("a file where out_dir should be")
    fails(train_flags(run_data, occupied, "--eval_dir="), capsys, occupied, "is a file, not a folder")
    assert not any((tmp_path / d / "ckpt.pt").exists() for d in "abcd")  # nothing trained


def test_an_out_dir_that_cannot_be_written_is_refused_before_step_1(run_data, tmp_path, capsys, monkeypatch):
    """Under a file, or in a folder the user may not write (this machine runs as root, so the refusal a read-only
    folder gives is simulated where train.py tries it): one sentence naming out_dir, and nothing made."""
    (tmp_path / "notes").write_text("a file")
    fails(train_flags(run_data, tmp_path / "notes" / "run", "--eval_dir="), capsys, tmp_path / "notes" / "run",
          "can not be written", f"{tmp_path / 'notes'} is a file, not a folder", "choose another --out_dir")
    assert (tmp_path / "notes").read_text() == "a file"

    def refused(*args, dir=None, **kw):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    fails(train_flags(run_data, tmp_path / "locked" / "run", "--eval_dir="), capsys, tmp_path / "locked" / "run",
          f"can not be written: {tmp_path} is not writable (Permission denied)")
    assert not (tmp_path / "locked").exists()


def test_an_out_dir_that_is_the_data_or_the_evaluation_folder_is_refused_before_step_1(run_data, tmp_path, capsys):
    """The run's log.jsonl and results.json among the evaluation sets would stop every later run ("holds
    results.json"), and among the shards a later prepare: refused, and neither folder gets a file."""
    evals, shards = tmp_path / "eval", run_data / "tokens"
    shutil.copytree(run_data / "test", evals)
    before = sorted(os.listdir(evals)), sorted(os.listdir(shards))
    fails(train_flags(run_data, evals, f"--eval_dir={evals}"), capsys, f"out_dir {evals} is the eval_dir",
          "choose another --out_dir")
    fails(train_flags(run_data, f"{shards}/", "--eval_dir="), capsys, "is the data_dir", "choose another --out_dir")
    (tmp_path / "link").symlink_to(evals)  # the same folder by another name
    fails(train_flags(run_data, tmp_path / "link", f"--eval_dir={evals}"), capsys, "link is the eval_dir")
    assert (sorted(os.listdir(evals)), sorted(os.listdir(shards))) == before


@pytest.mark.parametrize("flags", [["--eval_only=True"], ["--init_from=resume", "--max_iters=8"]])
def test_eval_only_on_an_out_dir_that_cannot_be_written_is_refused_before_scoring(run_data, tmp_path, capsys,
                                                                                  monkeypatch, flags):
    """Scoring writes results.json into the run's folder: a read-only one (simulated, as root can write anywhere)
    is one sentence before the scoring, not a traceback after it. A resume of it is told the same fix (it was told to
    'choose another --out_dir', which holds no run to resume)."""
    out = finished_run(run_data, tmp_path / "run")

    def refused(*args, dir=None, **kw):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    monkeypatch.setattr(evaluation, "evaluate", lambda *a: pytest.fail("scored before the refusal"))
    monkeypatch.setattr(train, "train_step", lambda *a: pytest.fail("trained before the refusal"))
    fails(train_flags(run_data, out, *flags), capsys,
          f"out_dir {out} can not be written: {out} is not writable (Permission denied)",
          "copy the run to a folder you can write")


def test_a_full_disk_at_a_checkpoint_or_results_json_is_one_sentence_and_keeps_what_was_written(run_data, tmp_path,
                                                                                                 capsys, monkeypatch):
    out, save, saves = tmp_path / "run", torch.save, []

    def disk_full_after_step_2(obj, f, *args, **kwargs):  # ckpt.pt and adapter.pt of step 2 fit, then nothing
        saves.append(f)
        return save(obj, f if len(saves) <= 2 else FullDisk(f), *args, **kwargs)
    monkeypatch.setattr(torch, "save", disk_full_after_step_2)
    fails(train_flags(run_data, out, "--max_iters=4", "--eval_interval=2", "--eval_dir="), capsys,
          f"could not write the checkpoint of step 4 to {out} (No space left on device)",
          "continue from the last checkpoint written with --init_from=resume")
    monkeypatch.undo()
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 2
    assert sorted(os.listdir(out)) == [files.LOCK, "adapter.pt", "ckpt.pt", "log.jsonl"]

    write = files.write_atomic
    monkeypatch.setattr(files, "write_atomic", lambda path, content: write(path, content) if "results" not in path
                        else write(path, lambda f: FullDisk(f).write(content.encode())))
    fails(train_flags(run_data, out, "--init_from=resume", "--max_iters=6", "--eval_interval=2"), capsys,
          f"could not write {out / 'results.json'} (No space left on device)", f"adapters are saved in {out}",
          "score them again with the same command plus --eval_only=True")
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 6 and not (out / "results.json").exists()
    fails(train_flags(run_data, out, "--eval_only=True", "--eval_limit=1"), capsys,  # scoring again: as it was
          f"could not write {out / 'results.json'}", "score them again with the same command.")
    full = tmp_path / "full"  # full training saves its weights (model.pt), not adapters
    fails(train_flags(run_data, full, "--adapter=none", "--max_iters=1", "--eval_limit=1"), capsys,
          f"the trained weights are saved in {full}")


@needs_fixtures
def test_a_tokenizer_other_than_the_shards_or_the_bases_is_refused_before_step_1(run_data, tmp_path, capsys):
    fails(train_flags(run_data, tmp_path / "a", f"--tokenizer={LLAMA2}"), capsys, LLAMA2, "is not the one",
          run_data / "tokens")
    prepare([OFFICIAL], LLAMA2, tmp_path / "llama2_tokens", max_len=1024, quiet=True)  # 32,000 tokens
    capsys.readouterr()  # prepare's warning about a record too long for max_len
    fails(train_flags(run_data, tmp_path / "b", f"--tokenizer={LLAMA2}", f"--data_dir={tmp_path / 'llama2_tokens'}",
                      f"--init_from={run_data / 'base.pt'}"), capsys, "32,000 tokens", "not the tokenizer the base")
    assert not (tmp_path / "b" / "ckpt.pt").exists()


def test_no_validation_without_validation_batches(run_data, tmp_path, capsys):
    summary = train.train(train.parse_config(train_flags(run_data, tmp_path / "o", "--eval_iters=0", "--eval_dir=")))
    assert "val_loss" not in summary and "val loss" not in capsys.readouterr().out


def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(run_data, tmp_path):
    out = tmp_path / "run"
    flags = train_flags(run_data, out, "--max_iters=2000", "--eval_interval=1000", "--log_interval=1", "--eval_dir=",
                        "--device=cpu")
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and (not (out / "log.jsonl").exists() or
                                      (out / "log.jsonl").read_text().count('"loss"') < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == machine.INTERRUPTED == 130, stderr[-2000:]  # not 0: `train.py && next` stops here
    step = torch.load(out / "ckpt.pt", weights_only=True)["iter"]
    assert 2 <= step < 2000 and "--init_from=resume" in stdout
    # without a terminal: one plain line per log interval, no progress-bar frames
    assert "\r" not in stderr and "step 1/2000: loss" in stdout and "step 2/2000: loss" in stdout


def test_a_missing_optional_package_is_one_sentence_naming_it(run_data, tmp_path, capsys, monkeypatch):
    """weights.py raises ImportError naming the extra (its own test reads real safetensors files without the
    package); train.py passes that sentence on instead of a traceback."""
    folder = tmp_path / "hf"
    folder.mkdir()

    def needs_safetensors(src, **kw):
        raise ImportError(f"reading {src}/model.safetensors needs the safetensors package: pip install safetensors")

    monkeypatch.setattr(train.Transformer, "from_pretrained", needs_safetensors)
    fails(train_flags(run_data, tmp_path / "o", f"--init_from={folder}"), capsys, "pip install safetensors", folder)


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """A full disk or a kill during torch.save: the file written before is still there and loads."""
    import checkpoint
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_atomic({"iter": 1, "w": torch.arange(100.0)}, path)
    before = (tmp_path / "ckpt.pt").read_bytes()

    def dies_midway(obj, f, *args, **kwargs):
        f = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        f.write(b"the first bytes of a checkpoint")
        f.flush()
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_atomic({"iter": 2, "w": torch.zeros(100)}, path)
    monkeypatch.undo()
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert checkpoint.load_pt(path, "training checkpoint")["iter"] == 1


def base_with(run_data, path, **args):
    """run_data's base model with some of its ModelArgs changed (e.g. a shorter context)."""
    base = torch.load(run_data / "base.pt", weights_only=True)
    torch.save({**base, "model_args": {**base["model_args"], **args}}, path)
    return path


def test_rows_or_answers_longer_than_the_base_models_context_are_refused_before_step_1(run_data, tmp_path, capsys):
    short = base_with(run_data, tmp_path / "short.pt", max_seq_len=40)
    fails(train_flags(run_data, tmp_path / "a", f"--init_from={short}", "--eval_dir="), capsys, "max_len=128",
          "longer than the 40 tokens", "--max_len=40")
    fails(train_flags(run_data, tmp_path / "b", f"--init_from={short}", "--eval_dir=", "--max_len=64",
                      "--batch_mode=pack"), capsys, "max_len=64", "--max_len=40")
    windowed = base_with(run_data, tmp_path / "window.pt", sliding_window=32)
    fails(train_flags(run_data, tmp_path / "c", f"--init_from={windowed}", "--eval_dir="), capsys, "the 32 tokens")
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "summary.jsonl").write_text('{"instruction": "Summarise: a b c", "output": "a"}\n')  # 48 new tokens
    fails(train_flags(run_data, tmp_path / "d", f"--init_from={short}", "--max_len=40", f"--eval_dir={evals}"),
          capsys, "summary generates up to 48 tokens", "40 tokens")
    exact = base_with(run_data, tmp_path / "exact.pt", max_seq_len=48)  # 48 new tokens in 48: no room either
    fails(train_flags(run_data, tmp_path / "e", f"--init_from={exact}", "--max_len=40", f"--eval_dir={evals}"),
          capsys, "summary generates up to 48 tokens", "leaves no room")
    one = base_with(run_data, tmp_path / "one.pt", max_seq_len=49)  # room for 1: BOS alone, no instruction, no "</s>"
    fails(train_flags(run_data, tmp_path / "g", f"--init_from={one}", "--max_len=40", f"--eval_dir={evals}"),
          capsys, "summary generates up to 48 tokens", "leaves no room", "BOS and \"</s>\"")
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abcdeg")  # nothing trained
    # rows within the context train, whatever max_len says: pad mode cuts rows at the longest record (128 here)
    long_enough = base_with(run_data, tmp_path / "long.pt", max_seq_len=128)
    train.train(train.parse_config(train_flags(run_data, tmp_path / "f", f"--init_from={long_enough}", "--eval_dir=",
                                               "--max_len=4096", "--max_iters=1")))


def test_an_evaluation_set_leaving_room_for_exactly_bos_and_its_end_of_prompt_is_taken(run_data, tmp_path, capsys):
    """The fewest tokens a prompt keeps is 2 (BOS and "</s>"): a set generating up to context - 2 tokens fits, one
    token more is refused, by the run's check_fits (here in its dry run, which reads a base of ours' context)."""
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "summary.jsonl").write_text('{"instruction": "Summarise: a b c", "output": "a"}\n')
    new = evaluation.task_of("summary").max_new_tokens
    for context, refused in ((new + 2, False), (new + 1, True)):
        base = base_with(run_data, tmp_path / f"{context}.pt", max_seq_len=context)
        flags = train_flags(run_data, tmp_path / "out", f"--init_from={base}", "--max_len=40", f"--eval_dir={evals}",
                            "--dry_run=True")
        if refused:
            fails(flags, capsys, f"summary generates up to {new} tokens", "leaves no room")
        else:
            assert train.train(train.parse_config(flags))["trainable_params"] > 0


def test_padded_rows_are_sized_by_the_longest_record_of_either_split(run_data, tmp_path, capsys):
    """pad mode cuts each split's rows at its longest record: a base whose context holds one split's longest record
    but not the other's is refused before step 1, whichever split holds the longer one."""
    records = [{"instruction": f"Say {w}.", "output": w} for w in "abcdefghijklmnop"]
    records.append({"instruction": "Repeat: " + " ".join(["word"] * 60), "output": "word"})
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shards = tmp_path / "tokens"
    data.prepare([str(tmp_path / "records.jsonl")], str(run_data / "tokenizer.model"), str(shards), max_len=256,
                 val_fraction=0.5, quiet=True)
    longest = sorted(int(data.TokenDataset(shards, split).lengths.max()) for split in ("train", "val"))
    assert longest[0] < longest[1]  # the long record in one split, short ones in both
    base = base_with(run_data, tmp_path / "base.pt", max_seq_len=longest[0])
    fails(train_flags(run_data, tmp_path / "a", f"--init_from={base}", f"--data_dir={shards}", "--eval_dir=",
                      "--batch_mode=pad", "--max_len=256"), capsys, f"longer than the {longest[0]} tokens")
    assert not (tmp_path / "a").exists()


def test_pack_rows_past_the_context_are_refused_even_when_every_record_fits_it(run_data, tmp_path, capsys):
    """pack mode fills each row up to max_len with several records: a max_len past the base's context is refused
    before step 1 even where every record alone fits in it (pad mode's rows end at the longest record instead)."""
    longest = max(int(data.TokenDataset(run_data / "tokens", s).lengths.max()) for s in ("train", "val"))
    context = longest + 8
    base = base_with(run_data, tmp_path / "base.pt", max_seq_len=context)
    fails(train_flags(run_data, tmp_path / "a", f"--init_from={base}", "--eval_dir=", "--batch_mode=pack",
                      f"--max_len={4 * context}"), capsys, f"max_len={4 * context}",
          f"longer than the {context} tokens", f"--max_len={context}")
    assert not (tmp_path / "a").exists()


def test_load_layers_may_name_every_layer_of_the_model(run_data, tmp_path):
    """load_layers is refused past the model's layers only: all of them (4 in the tiny model) is the whole model. A
    run without a router (one expert) shows no expert load, so its load_layers is not checked at all."""
    summary = train.train(train.parse_config(train_flags(run_data, tmp_path / "o", "--load_layers=4", "--max_iters=1",
                                                         "--eval_dir=")))
    assert summary["step"] == 1 and summary["config"]["load_layers"] == 4
    one = train.train(train.parse_config(train_flags(run_data, tmp_path / "one", "--experts=1", "--load_layers=5",
                                                     "--max_iters=1", "--eval_dir=")))
    assert one["step"] == 1 and not any(n.endswith("lora_router") for n, _ in one["model"].named_parameters())


def test_a_shorter_max_len_than_the_data_was_prepared_with_warns_how_many_answers_it_cuts(run_data, tmp_path, capsys):
    ds = train.data.TokenDataset(str(run_data / "tokens"), "train")
    max_len = int(np.median(ds.lengths))
    cut = int((np.minimum(ds.lengths, max_len) <= np.maximum(ds.prompt_lens, 1)).sum())
    assert 0 < cut < len(ds)
    train.train(train.parse_config(train_flags(run_data, tmp_path / "a", f"--max_len={max_len}", "--eval_dir=",
                                               "--max_iters=1")))
    err = capsys.readouterr().err
    assert f"cuts away the whole answer of {cut:,} of {len(ds):,} training records" in err, err
    train.train(train.parse_config(train_flags(run_data, tmp_path / "b", "--eval_dir=", "--max_iters=1")))
    assert "cuts away" not in capsys.readouterr().err


def test_a_max_len_that_cuts_every_validation_answer_is_refused_not_scored_0(run_data, tmp_path, capsys):
    train_ds, val_ds = (train.data.TokenDataset(str(run_data / "tokens"), s) for s in ("train", "val"))
    max_len = int(val_ds.prompt_lens.min())
    assert (train_ds.prompt_lens < max_len).any()  # training answers survive it: only the validation set is cut
    fails(train_flags(run_data, tmp_path / "a", f"--max_len={max_len}", "--eval_dir="), capsys,
          "every validation record", "--eval_iters=0")
    assert not (tmp_path / "a").exists()
    train.train(train.parse_config(train_flags(run_data, tmp_path / "a", f"--max_len={max_len}", "--eval_dir=",
                                               "--eval_iters=0", "--max_iters=1")))  # the fix it names runs


def test_a_users_log_jsonl_in_out_dir_is_not_overwritten(run_data, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "log.jsonl").write_text("my notes\n")
    fails(train_flags(run_data, out, "--eval_dir="), capsys, "log.jsonl", "--overwrite=True")
    assert (out / "log.jsonl").read_text() == "my notes\n"


def test_nan_at_the_first_step_says_nothing_was_saved_rather_than_offering_a_resume(run_data, tmp_path, capsys,
                                                                                      monkeypatch):
    real_forward = train.Transformer.forward

    def nan_loss(self, tokens, targets=None, **k):
        logits, loss = real_forward(self, tokens, targets, **k)
        return logits, None if loss is None else loss * float("nan")
    monkeypatch.setattr(train.Transformer, "forward", nan_loss)
    err = fails(train_flags(run_data, tmp_path / "a", "--eval_dir="), capsys, "loss became nan at step 0",
                "nothing was saved yet")
    assert "resume" not in err and not (tmp_path / "a" / "ckpt.pt").exists()


@pytest.mark.parametrize("edit, needles", [
    (lambda c: {**c, "config": ["not", "a", "dict"]}, ("is damaged",)),
    (lambda c: {**c, "iter": "3"}, ("is damaged",)),
    (lambda c: {**c, "iter": -1}, ("is damaged",)),
    (lambda c: {**c, "rng": []}, ("is damaged",)),
    (lambda c: {**c, "base": 5}, ("is damaged", "base fingerprint")),
    (lambda c: {**c, "train_seconds": "1.5"}, ("is damaged", "training time")),  # results.json would hold it
    (lambda c: {**c, "state": {n: 0 for n in c["state"]}}, ("is damaged", "its weights")),  # was AttributeError
    (lambda c: {**c, "rng": [{**c["rng"][0], "torch": c["rng"][0]["torch"][:8]}]}, ("is damaged", "random state")),
    (lambda c: {**c, "rng": [{**c["rng"][0], "numpy": [c["rng"][0]["numpy"][0], 5, *c["rng"][0]["numpy"][2:]]}]},
     ("is damaged", "random state")),  # were RuntimeError and AttributeError tracebacks
    (lambda c: {**c, "config": {**c["config"], "learning_rate": "fast"}}, ("learning_rate", "must be of type float")),
    (lambda c: {**c, "config": {**c["config"], "r": -8}}, ("'r' must be positive",)),
])
def test_a_checkpoint_edited_by_hand_is_refused_on_resume_in_one_sentence(run_data, tmp_path, capsys, edit, needles):
    out = finished_run(run_data, tmp_path / "run", "--max_iters=2")
    torch.save(edit(torch.load(out / "ckpt.pt", weights_only=True)), out / "ckpt.pt")
    fails(train_flags(run_data, out, "--init_from=resume", "--max_iters=4"), capsys, *needles)


def test_a_tokenizer_far_smaller_than_the_base_models_vocabulary_is_refused_before_step_1(run_data, tmp_path, capsys):
    """LLaMA-2's tokenizer with Chinese-LLaMA-2 (55,296 rows) would train on the wrong ids without a word."""
    saved = torch.load(run_data / "base.pt", weights_only=True)["model_args"]
    args = train.ModelArgs(**{**saved, "vocab_size": saved["vocab_size"] + tokenizer.VOCAB_PADDING})
    torch.save({"model_args": saved | {"vocab_size": args.vocab_size}, "model": train.Transformer(args).state_dict()},
               tmp_path / "wide.pt")
    fails(train_flags(run_data, tmp_path / "a", f"--init_from={tmp_path / 'wide.pt'}", "--eval_dir="), capsys,
          f"{saved['vocab_size']:,} tokens", f"the base model {args.vocab_size:,}", "not the tokenizer")


def test_a_sliding_window_models_evaluation_cuts_prompts_to_its_window_not_to_max_seq_len(run_data, tmp_path):
    windowed = base_with(run_data, tmp_path / "window.pt", sliding_window=128)  # max_seq_len stays 256
    evals = tmp_path / "eval"
    evals.mkdir()
    long_question = "Who directed The Silver Harbor? " * 20  # about 200 tokens: past the window, within 256
    (evals / "qa.jsonl").write_text(f'{{"instruction": "{long_question}", "output": "Kimo Res"}}\n')
    summary = train.train(train.parse_config(train_flags(run_data, tmp_path / "a", f"--init_from={windowed}",
                                                         f"--eval_dir={evals}", "--max_iters=1")))
    assert set(summary["scores"]) == {"qa"}


def test_overwrite_replaces_the_old_run_only_once_the_new_one_is_sure_to_start(run_data, tmp_path, capsys):
    out = finished_run(run_data, tmp_path / "run")
    before = contents(out)
    fails(train_flags(run_data, out, "--overwrite=True", "--targets=w1,nope", "--eval_dir="), capsys, "nope")
    fails(train_flags(run_data, out, "--overwrite=True", "--max_len=3", "--eval_dir="), capsys, "every training record")
    assert contents(out) == before  # a refused setting leaves the old run whole
    full = finished_run(run_data, tmp_path / "full", "--adapter=none")
    fails(train_flags(run_data, full, "--overwrite=True", f"--init_from={full / 'model.pt'}", "--eval_dir="), capsys,
          "model.pt is the run in", "would replace")
    assert (full / "model.pt").is_file()
    train.main(train_flags(run_data, out, "--overwrite=True", "--max_iters=1", "--eval_dir="))
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 1


def test_a_run_on_an_out_dir_that_another_live_run_writes_is_refused_and_leaves_it_whole(run_data, tmp_path, capsys):
    """Two runs on one out_dir interleave their log.jsonl and checkpoints: a resume of the live run, an overwrite=True
    and a new run started with it (out_dir still empty) are each refused in one sentence naming its process, and
    touch nothing there, not even the temporary file it is writing (its process id, on another host, runs nowhere
    here). Once that process ends (kill -9 too), the run resumes."""
    out, starting = tmp_path / "live", tmp_path / "starting"
    shutil.copytree(finished_run(run_data, tmp_path / "run"), out, ignore=shutil.ignore_patterns(files.LOCK))
    ended = held_by_another_process(tmp_path / "run")  # the run above, of this process, let go when it ended
    ended.kill()
    ended.wait()
    others = {out: held_by_another_process(out), starting: held_by_another_process(starting)}
    try:
        (out / f"adapter.pt.tmp{2**22 + 1}").write_bytes(b"half an adapter")  # above Linux's largest process id
        before = contents(out)
        for folder, flags in ((out, ["--init_from=resume", "--max_iters=6"]), (out, ["--overwrite=True"]),
                              (starting, [])):
            fails(train_flags(run_data, folder, "--max_iters=4", "--eval_interval=2", "--eval_dir=", *flags), capsys,
                  f"out_dir {folder} is in use by process {others[folder].pid}; wait for that run to end, or choose "
                  "another --out_dir.")
        assert contents(out) == before and os.listdir(starting) == [files.LOCK]
    finally:
        for other in others.values():
            other.kill()
            other.wait()
    train.main(train_flags(run_data, out, "--init_from=resume", "--max_iters=6", "--eval_interval=2", "--eval_dir="))
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 6


def test_eval_only_of_a_live_run_is_refused_before_its_results_json_could_replace_the_runs(run_data, tmp_path, capsys):
    """A re-scoring writes results.json: beside a run still training there (a resume of it, say) it would replace the
    final scores with an earlier checkpoint's, or the run's would replace it. So it holds out_dir as a run does: one
    sentence naming the live process (with no advice to pick another out_dir: the run to score is this one), nothing
    touched; once that process is gone, the re-scoring runs and lets go of the folder."""
    out = finished_run(run_data, tmp_path / "o")
    before = contents(out)
    other = held_by_another_process(out)
    try:
        fails(train_flags(run_data, out, "--eval_only=True"), capsys,
              f"out_dir {out} is in use by process {other.pid}; wait for that run to end.")
        assert contents(out) == before
    finally:
        other.kill()
        other.wait()
    train.main(train_flags(run_data, out, "--eval_only=True"))
    assert (out / "results.json").is_file() and files.hold(str(out)) is None  # let go: held again here, at once
    files.let_go(str(out))


def test_eval_only_scores_a_run_by_its_own_config_not_the_command_lines(run_data, tmp_path):
    first = train.train(train.parse_config(train_flags(run_data, tmp_path / "o", "--alpha=4.0", "--dropout=0.2",
                                                       "--max_iters=4", "--eval_interval=4")))
    again = train.train(train.parse_config(train_flags(run_data, tmp_path / "o", "--eval_only=True")))
    assert again["config"]["alpha"] == 4.0 and again["scores"] == first["scores"]
    with pytest.raises(train.UserError, match=r"alpha cannot change when resuming or re-scoring"):
        train.train(train.parse_config(train_flags(run_data, tmp_path / "o", "--eval_only=True", "--alpha=8.0")))


def test_eval_only_writes_nothing_of_the_run_but_its_results_json(run_data, tmp_path):
    out = finished_run(run_data, tmp_path / "o")
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    train.main(train_flags(run_data, out, "--eval_only=True"))
    assert (out / "results.json").is_file()
    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in out.iterdir() if p.name != "results.json"} == before


def scored_run(run_data, out, other):
    """A finished tiny run scored on run_data/test, and `other`: a folder holding one of those sets (sentiment)."""
    other.mkdir()
    shutil.copy(run_data / "test" / "sentiment.jsonl", other)
    train.main(train_flags(run_data, out, "--max_iters=2", "--eval_interval=2"))
    return out


def test_a_re_scoring_on_other_evaluation_sets_keeps_the_runs_results_json_bit_for_bit(run_data, tmp_path, capsys):
    """results.json holds the run's scores on its own evaluation sets (study.py reads them, and eval_only of an
    adapter.pt alone its settings): a re-scoring on other sets replaced it, and the run's scores were lost. It writes
    results_<the folder's name, made safe>.json instead and says so; a later one on those sets replaces that file."""
    out = scored_run(run_data, tmp_path / "o", tmp_path / "held out")
    own = (out / "results.json").read_bytes()
    capsys.readouterr()
    train.main(train_flags(run_data, out, "--eval_only=True", f"--eval_dir={tmp_path / 'held out'}"))
    theirs = out / "results_held_out.json"
    assert f"scores on {tmp_path / 'held out'} go to {theirs}; {out / 'results.json'} keeps those on " \
        f"{run_data / 'test'}\n" in capsys.readouterr().out
    assert (out / "results.json").read_bytes() == own
    scored = json.loads(theirs.read_text())
    assert scored["config"]["eval_dir"] == str(tmp_path / "held out") and set(scored["scores"]) == {"sentiment"}
    assert scored["scores"] == {"sentiment": json.loads(own)["scores"]["sentiment"]}  # the same records and adapter
    train.main(train_flags(run_data, out, "--eval_only=True", f"--eval_dir={tmp_path / 'held out'}", "--eval_limit=1"))
    assert json.loads(theirs.read_text())["config"]["eval_limit"] == 1 and (out / "results.json").read_bytes() == own
    assert sorted(p.name for p in out.glob("results*.json")) == ["results.json", "results_held_out.json"]


def test_a_re_scoring_on_the_runs_own_evaluation_sets_by_any_name_replaces_its_results_json(run_data, tmp_path):
    """A re-scoring on the sets results.json was scored on is how a run whose scoring ran out of memory is finished:
    it replaces results.json, the folders compared as folders (here a link to the run's), and leaves the file of a
    re-scoring on other sets as it was."""
    out = scored_run(run_data, tmp_path / "o", tmp_path / "other")
    train.main(train_flags(run_data, out, "--eval_only=True", f"--eval_dir={tmp_path / 'other'}", "--eval_limit=1"))
    theirs = (out / "results_other.json").read_bytes()
    (tmp_path / "link").symlink_to(run_data / "test")
    train.main(train_flags(run_data, out, "--eval_only=True", f"--eval_dir={tmp_path / 'link'}", "--eval_limit=1"))
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["eval_dir"] == str(tmp_path / "link") and results["config"]["eval_limit"] == 1
    assert set(results["scores"]) == set(minicme.SYNTHETIC_TASKS)
    assert (out / "results_other.json").read_bytes() == theirs and not (out / "results_link.json").exists()


def test_a_damaged_results_json_is_replaced_by_a_re_scoring_which_is_then_the_one_kept(run_data, tmp_path):
    """A results.json that can not be read names no sets to keep: a re-scoring on any sets replaces it (as before),
    and later re-scorings on other sets keep that one."""
    out = scored_run(run_data, tmp_path / "o", tmp_path / "other")
    (out / "results.json").write_text('{"config": {"eval_dir": ')  # a disk that failed mid-write (not train.py's)
    train.main(train_flags(run_data, out, "--eval_only=True", f"--eval_dir={tmp_path / 'other'}", "--eval_limit=1"))
    results = (out / "results.json").read_bytes()
    assert json.loads(results)["config"]["eval_dir"] == str(tmp_path / "other")
    assert not (out / "results_other.json").exists()
    train.main(train_flags(run_data, out, "--eval_only=True", "--eval_limit=1"))  # the run's own sets: now "other"
    assert (out / "results.json").read_bytes() == results
    assert json.loads((out / "results_test.json").read_text())["config"]["eval_dir"] == str(run_data / "test")


@pytest.mark.parametrize("damage", ["", "[1, 2]", '{"scores": {}}', '{"config": {}}', '{"config": {"eval_dir": 3}}',
                                    '{"config": {"eval_dir": ""}}', '{"config": {"eval_dir": "a\\u0000b"}}',
                                    '{"config": ["sets"]}', '{"config": "sets"}'])
def test_a_results_json_that_names_no_evaluation_sets_is_replaced(tmp_path, damage):
    """Only a results.json that names the folder it was scored on is kept from a re-scoring on another one."""
    (tmp_path / "results.json").write_text(damage)
    cfg = {"out_dir": str(tmp_path), "eval_only": True, "eval_dir": str(tmp_path / "sets")}
    assert evaluation.results_path(cfg) == str(tmp_path / "results.json")


def test_re_scored_sets_are_told_apart_by_folder_and_else_by_normalised_path(tmp_path, monkeypatch):
    """The folder results.json was scored on may be named otherwise (relative, a trailing slash, a link) or be gone
    (moved since): the same folder, or the same path where one is gone, is the run's own; anything else is not, and
    gets a file named after its folder, in characters any filesystem takes."""
    monkeypatch.chdir(tmp_path)
    for folder in ("sets", "other", "out", "née 2"):
        (tmp_path / folder).mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "sets")
    (tmp_path / "out" / "results.json").write_text(json.dumps({"config": {"eval_dir": "sets"}}))
    expected = {"sets": "results.json", f"{tmp_path}/sets/": "results.json", "link": "results.json",
                "gone/../sets": "results.json", "./other": "results_other.json", "née 2": "results_n_e_2.json",
                ".": f"results_{tmp_path.name}.json", "/": "results_eval.json"}
    for eval_dir, name in expected.items():
        assert evaluation.results_path({"out_dir": "out", "eval_only": True, "eval_dir": eval_dir}) == \
            os.path.join("out", name), eval_dir
        assert evaluation.results_path({"out_dir": "out", "eval_only": False, "eval_dir": eval_dir}) == \
            os.path.join("out", "results.json")  # a run (or a resume) scored on its sets: its own file
    (tmp_path / "out" / "results.json").write_text(json.dumps({"config": {"eval_dir": str(tmp_path / "moved")}}))
    assert evaluation.results_path({"out_dir": "out", "eval_only": True, "eval_dir": "moved/"}) == "out/results.json"
    assert evaluation.results_path({"out_dir": "out", "eval_only": True, "eval_dir": "sets"}) == "out/results_sets.json"


def test_a_re_scorings_file_name_neither_starts_nor_ends_its_folders_part_with_a_dot_or_an_underscore(tmp_path):
    """The folder's name, its odd characters made underscores, is cut of the dots and underscores at its ends: a
    hidden folder (.sets) or one named "sets." gives no "results_.sets.json" or "results_sets..json"."""
    (tmp_path / "results.json").write_text(json.dumps({"config": {"eval_dir": str(tmp_path / "sets")}}))
    for folder in (".sets", "sets.", "_sets_", "sets é", "é sets", "..sets.."):
        path = evaluation.results_path({"out_dir": str(tmp_path), "eval_only": True, "eval_dir": folder})
        name = os.path.basename(path)
        assert name.startswith("results_") and name.endswith(".json"), folder
        part = name[len("results_"):-len(".json")]
        assert part and "sets" in part and part[0] not in "._" and part[-1] not in "._", (folder, name)


def test_overwrite_replaces_a_runs_re_scorings_with_it_and_without_it_they_hold_the_folder(run_data, tmp_path, capsys):
    """The files of re-scorings on other sets are the run's: a new run with overwrite=True removes them with the rest
    of the old run (they would score another adapter beside it), and without it they alone keep the folder. A file so
    named that no re-scoring wrote (no eval_only config: the user's notes) is neither: it stays, in nobody's way."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "results_other.json").write_text(json.dumps({"config": {"eval_only": True, "eval_dir": "other"}}))
    notes = ["{}", json.dumps({"config": {"eval_only": False}}), "my notes", json.dumps([1])]
    for i, text in enumerate(notes):
        (out / f"results_notes{i}.json").write_text(text)
    fails(train_flags(run_data, out, "--max_iters=1"), capsys, f"{out} already holds a run (results_other.json)")
    train.main(train_flags(run_data, out, "--max_iters=1", "--eval_interval=1", "--eval_limit=1", "--overwrite=True"))
    assert (out / "results.json").is_file() and not (out / "results_other.json").exists()
    assert [(out / f"results_notes{i}.json").read_text() for i in range(len(notes))] == notes
    for f in out.iterdir():  # the user's notes alone hold no run
        if not f.name.startswith("results_notes"):
            f.unlink()
    train.main(train_flags(run_data, out, "--max_iters=1", "--eval_interval=1", "--eval_limit=1"))


def test_the_temporaries_of_killed_re_scorings_are_removed_and_a_users_files_so_named_are_kept(run_data, tmp_path):
    """A re-scoring killed while it wrote results_<name>.json left results_<name>.json.tmpPID in the run's folder for
    good: the next run or re-scoring there removes it, as the temporaries of ckpt.pt and the rest, when it holds a
    re-scoring's config or nothing (killed before its bytes were written, or a power cut lost them); a user's file
    so named, which holds anything else, stays byte for byte."""
    out = scored_run(run_data, tmp_path / "o", tmp_path / "other")
    train.main(train_flags(run_data, out, "--eval_only=True", f"--eval_dir={tmp_path / 'other'}", "--eval_limit=1"))
    killed = {"results_other.json.tmp999999": (out / "results_other.json").read_bytes(),  # killed before its rename
              "results_held_out.json.tmp999998": b""}  # killed before its write
    users = {"results_notes.json.tmp999999": b"my notes", "results_mine.json.tmp999997": b"{}",
             "results_old.json.tmp999996": json.dumps({"config": {"eval_only": False}}).encode()}
    for name, content in {**killed, **users}.items():
        (out / name).write_bytes(content)
    train.main(train_flags(run_data, out, "--eval_only=True", f"--eval_dir={tmp_path / 'other'}", "--eval_limit=1"))
    assert not any((out / name).exists() for name in killed)
    assert {name: (out / name).read_bytes() for name in users} == users
    assert json.loads((out / "results_other.json").read_text())["config"]["eval_dir"] == str(tmp_path / "other")


def test_rescorings_counts_a_re_scorings_file_or_its_temporary_and_nothing_of_the_users_in_name_order(tmp_path,
                                                                                                     monkeypatch):
    """A re-scoring's file is told by its config (eval_only exactly True), its write_atomic temporary (NAME.tmpPID, a
    process id: no 0 in front) by that config or by holding nothing; a user's file so named holds anything else, an
    empty one too unless it is such a temporary (and not beside a user's file of its name), and is not the run's to
    replace. One gone between the listing and
    its reading (removed by the run that holds the folder) is no error. The names come sorted, each once."""
    rescoring = json.dumps({"config": {"eval_only": True}})
    named = {"results_b.json": rescoring, "results_a.json.tmp12": rescoring, "results_c.json.tmp7": "",
             "results_b.json.tmp5": "", "results_notes.json": "", "results_1.json": json.dumps({"config": {
                 "eval_only": 1}}), "results_x.json.tmp": "", "results_y.json.tmp0": "", "results_z.json.tmp012": "",
             "results_w.json.tmp3x": "", "xresults_v.json": rescoring, "results_u.json.tmp4": "my notes",
             "results_n.json": "mine", "results_n.json.tmp8": ""}  # an empty temporary beside a user's file: theirs
    for name, text in named.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "results_d.json.tmp9").mkdir()  # a folder is no temporary, though btrfs gives an empty one size 0
    size = os.path.getsize
    monkeypatch.setattr(evaluation.os.path, "getsize", lambda path: 0 if os.path.isdir(path) else size(path))
    assert evaluation.rescorings(tmp_path) == ("results_a.json", "results_b.json", "results_c.json")
    monkeypatch.setattr(evaluation.os.path, "getsize", lambda path: (_ for _ in ()).throw(FileNotFoundError(path)))
    assert evaluation.rescorings(tmp_path) == ("results_a.json", "results_b.json")


def test_eval_only_of_an_adapter_pt_that_holds_another_kind_of_file_says_so_not_that_the_adapter_does_not_fit(
        run_data, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    torch.save({"model_args": {}, "model": {}}, out / "adapter.pt")  # a full run's model.pt, renamed
    fails(train_flags(run_data, out, "--eval_only=True"), capsys, f"{out / 'adapter.pt'} is not an adapter written by "
          "train.py; point --out_dir at a finished run.")


def test_eval_only_of_an_adapter_alone_is_refused_with_settings_its_results_json_says_it_was_not_trained_with(
        run_data, tmp_path):
    """adapter.pt records tensors, not the alpha or method that scale them: without ckpt.pt, eval_only builds the
    adapters from the flags, and another --alpha scored the same adapter as another function without a word. The
    results.json beside it names the run's settings; a change that computes the same (competition None or True for
    TeamLoRA) is fine, and a run's adapter with no results.json beside it is scored by the flags, as before."""
    out = tmp_path / "o"
    first = train.train(train.parse_config(train_flags(run_data, out, "--alpha=4.0", "--max_iters=4",
                                                       "--eval_interval=4")))
    os.remove(out / "ckpt.pt")
    for flags, named in ((["--alpha=8.0"], "--alpha=4.0"), (["--alpha=4.0", "--adapter=moelora", "--competition=True"],
                                                           "--adapter=teamlora --competition=None"),
                          (["--alpha=4.0", "--targets=w1,w2"], "--targets=w1,w2,w3")):  # named, not "does not fit"
        with pytest.raises(train.UserError, match=f"adapter.pt was trained with {named} .*results.json"):
            train.train(train.parse_config(train_flags(run_data, out, "--eval_only=True", *flags)))
    again = train.train(train.parse_config(train_flags(run_data, out, "--eval_only=True", "--alpha=4.0",
                                                       "--competition=True")))
    assert again["scores"] == first["scores"]
    os.remove(out / "results.json")
    train.train(train.parse_config(train_flags(run_data, out, "--eval_only=True", "--alpha=8.0")))  # the flags'


def test_a_diverged_run_stops_before_its_step_or_checkpoint_and_resumes_at_a_lower_rate(run_data, tmp_path, capsys,
                                                                                         monkeypatch):
    out = finished_run(run_data, tmp_path / "run", "--max_iters=2")
    good = contents(out)
    monkeypatch.setattr(train.evaluation, "val_loss", lambda *a: float("nan"))
    fails(train_flags(run_data, out, "--init_from=resume", "--max_iters=4"), capsys,
          "validation loss became nan at step 3", "--learning_rate")
    assert contents(out)["ckpt.pt"] == good["ckpt.pt"]  # the NaN model was not saved over the good one
    monkeypatch.undo()
    monkeypatch.setattr(train.torch.nn.utils, "clip_grad_norm_", lambda *a: torch.tensor(float("inf")))
    fails(train_flags(run_data, tmp_path / "b", "--eval_dir="), capsys, "gradient norm became inf at step 0",
          "nothing was saved yet")
    monkeypatch.undo()
    resumed = train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume", "--max_iters=4",
                                              "--learning_rate=1e-4"]))
    assert resumed["step"] == 4 and resumed["config"]["learning_rate"] == 1e-4


@pytest.mark.parametrize("flag, named, innocent", [
    ("--alpha=1e30", "--alpha (the adapters' scaling is 5e+29, usually 1 to 8)", "--balance_coef"),
    ("--balance_coef=1e30", "--balance_coef (the balance loss's weight is 1e+30, usually 0.01 to 1)", "--alpha")])
def test_a_run_diverged_by_a_setting_far_past_its_usual_values_names_it_beside_the_learning_rate(
        run_data, tmp_path, capsys, flag, named, innocent):
    """alpha=1e30 or balance_coef=1e30 (within float32, so not refused before training) made the first step's gradient
    norm inf, and the run said only to lower the learning rate: the sentence names the setting too, not a usual one."""
    err = fails(train_flags(run_data, tmp_path / "a", "--eval_dir=", flag), capsys, "became inf at step 0",
                f"nothing was saved yet: start again with a lower --learning_rate or {named}.")
    assert innocent not in err and not (tmp_path / "a" / "ckpt.pt").exists()


def test_a_diverged_run_names_what_a_resume_keeps_apart_and_never_a_usual_setting(run_data, tmp_path, capsys,
                                                                                 monkeypatch):
    """A resume may lower learning_rate, not alpha: a run far past alpha's usual values that diverged after its
    checkpoint says to start again for that. The demo's, the recipes' and every study run's settings are usual: their
    divergence names the learning rate alone."""
    out = finished_run(run_data, tmp_path / "run", "--max_iters=2", "--alpha=400.0")  # scaling 200, trained finite
    monkeypatch.setattr(train.evaluation, "val_loss", lambda *a: float("nan"))
    fails(train_flags(run_data, out, "--init_from=resume", "--max_iters=4"), capsys, "validation loss became nan at "
          f"step 3; the last good checkpoint in {out} is kept: resume it with --init_from=resume and a lower "
          "--learning_rate, or start again in another --out_dir with a lower --alpha (the adapters' scaling is 200, "
          "usually 1 to 8).\n")
    import study
    recipes = repository_files("config/*.py")
    assert recipes
    usual = [train.parse_config([]), *[train.parse_config([str(p)]) for p in recipes],
             *[{**train.DEFAULTS, **study.COMMON, **settings} for _, settings in study.RUNS.values()]]
    alone = r"nothing was saved yet: start again with a lower --learning_rate\.$"
    for cfg in usual:
        with pytest.raises(train.UserError, match=alone):
            train.check_finite("loss", float("nan"), 0, {**cfg, "out_dir": str(tmp_path / "none")})


def test_an_evaluation_set_that_is_a_named_pipe_is_refused_before_step_1(run_data, tmp_path, capsys):
    """A <task>.jsonl in eval_dir that is a named pipe was opened and waited on forever, for a writer that never
    came; a folder of that name was an IsADirectoryError's traceback."""
    eval_dir = tmp_path / "eval"
    shutil.copytree(run_data / "test", eval_dir)
    content = (eval_dir / "qa.jsonl").read_bytes()
    os.remove(eval_dir / "qa.jsonl")
    with named_pipe(eval_dir / "qa.jsonl", content):
        fails(train_flags(run_data, tmp_path / "out", f"--eval_dir={eval_dir}"), capsys,
              f"{eval_dir / 'qa.jsonl'} is a named pipe, not a file; give a JSONL file")
    os.remove(eval_dir / "qa.jsonl")
    (eval_dir / "qa.jsonl").mkdir()
    fails(train_flags(run_data, tmp_path / "out", f"--eval_dir={eval_dir}"), capsys,
          f"{eval_dir / 'qa.jsonl'} is a folder, not a file; give a JSONL file")
    assert not (tmp_path / "out").exists()


def test_a_model_pt_that_lacks_a_weight_is_refused_before_step_1(run_data, tmp_path, capsys):
    """init_from=model.pt took its weights on trust: one missing left its parameter as to_empty's memory, and the run
    trained on it (a NaN loss there, with advice to lower the learning rate)."""
    vocab = data.Tokenizer(run_data / "tokenizer.model").vocab_size
    base = model.Transformer(model.ModelArgs.from_name("tiny", vocab_size=vocab, max_seq_len=256))
    state = {n: t for n, t in base.state_dict().items() if n != "layers.1.feed_forward.w2.weight"}
    torch.save({"model_args": asdict(base.args), "model": state}, tmp_path / "model.pt")
    fails(train_flags(run_data, tmp_path / "out", f"--init_from={tmp_path / 'model.pt'}"), capsys,
          "lacks weights the model needs: layers.1.feed_forward.w2.weight")
    assert not (tmp_path / "out").exists()


def test_run_files_that_are_folders_and_settings_that_would_be_ignored_are_refused_before_step_1(run_data, tmp_path,
                                                                                                 capsys):
    (tmp_path / "a" / "ckpt.pt").mkdir(parents=True)
    fails(train_flags(run_data, tmp_path / "a", "--eval_dir="), capsys, "ckpt.pt is not a file")
    fails(train_flags(run_data, tmp_path / "b", "--load_layers=5"), capsys, "load_layers=5", "has 4 layers")
    fails(train_flags(run_data, tmp_path / "c", "--adapter=lora", "--competition=True"), capsys, "competition=True")
    fails(train_flags(run_data, tmp_path / "d", "--targets= ,"), capsys, "'targets' is empty")
    fails(train_flags(run_data, tmp_path / "e", "--eval_only=True", "--eval_dir="), capsys, "set --eval_dir")
    fails([tmp_path, *train_flags(run_data, tmp_path / "f")], capsys, "is a folder, not a file")
    assert not any((tmp_path / d).exists() for d in "bcdef") and os.listdir(tmp_path / "a") == ["ckpt.pt"]


@pytest.mark.parametrize("how", [[], ["--init_from=resume"], ["--dry_run=True"]])
def test_re_scoring_a_run_trained_without_eval_dir_asks_for_one_rather_than_scoring_nothing(run_data, tmp_path, capsys,
                                                                                            how):
    """A re-scoring takes the run's eval_dir, empty for a run trained with --eval_dir=: it then exited 0 having printed
    and written nothing (no score, no validation loss, no results.json). Refused like --eval_dir= typed with it."""
    out = finished_run(run_data, tmp_path / "run")
    before = contents(out)
    fails([f"--out_dir={out}", "--eval_only=True", *how], capsys, "eval_only=True", "set --eval_dir")
    assert contents(out) == before
    train.main([f"--out_dir={out}", "--eval_only=True", f"--eval_dir={run_data / 'test'}", "--eval_limit=1", *how])
    assert "per GPU" in capsys.readouterr().out if how == ["--dry_run=True"] else (out / "results.json").is_file()


def test_flags_override_config_files_wherever_they_stand(tmp_path):
    (tmp_path / "c.py").write_text("max_iters = 5\nr = 16\n")
    cfg = train.parse_config(["--max_iters=7", str(tmp_path / "c.py")])
    assert (cfg["max_iters"], cfg["r"]) == (7, 16)


@pytest.mark.parametrize("call, named", [("sys.exit(3)", "exit(3)"), ("exit()", "exit()"), ("sys.exit(0)", "exit(0)"),
                                         ("raise SystemExit('stop here')", "exit('stop here')")])
def test_a_config_file_that_exits_is_one_sentence_naming_it_not_a_silent_end(tmp_path, capsys, call, named):
    """sys.exit(0) would end train.py as a run that succeeded ends; exit() was named as 'failed to run (SystemExit:
    None)'."""
    (tmp_path / "c.py").write_text(f"import sys\nr = 16\n{call}\n")
    fails([tmp_path / "c.py", "--dry_run=True"], capsys, f"config file '{tmp_path / 'c.py'}' calls {named}, which "
          "would end the script before it trains; remove the call")


@pytest.mark.parametrize("raised, named", [("GeneratorExit", "(GeneratorExit)"), ("Stop('here')", "(Stop: here)")])
def test_a_config_file_that_raises_a_base_exception_is_one_sentence_not_a_traceback(tmp_path, capsys, raised, named):
    """Only Exception and SystemExit were named: any other BaseException a config raised ended train.py with its
    traceback."""
    (tmp_path / "c.py").write_text(f"class Stop(BaseException):\n    pass\n\n\nr = 16\nraise {raised}\n")
    fails([tmp_path / "c.py", "--dry_run=True"], capsys, f"config file '{tmp_path / 'c.py'}' failed to run {named}; "
          "it should hold plain key = value lines.")


def test_ctrl_c_while_a_config_file_runs_stops_the_script_as_ctrl_c_not_as_a_failed_config(tmp_path):
    """A config's exit() is named as its failure, but Ctrl-C is the user's: it must end the script as Ctrl-C does."""
    (tmp_path / "c.py").write_text("raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        train.parse_config([str(tmp_path / "c.py")])


def test_a_damaged_optimizer_state_in_ckpt_pt_is_one_sentence_on_resume(run_data, tmp_path, capsys):
    out = finished_run(run_data, tmp_path / "run", "--max_iters=2")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "optimizer": {"state": {}}}, out / "ckpt.pt")  # no param_groups
    fails(train_flags(run_data, out, "--init_from=resume", "--max_iters=4"), capsys, "ckpt.pt is damaged",
          "optimizer or random state")


def test_running_out_of_memory_while_scoring_keeps_the_run_and_prints_a_command_that_scores_it(
        run_data, tmp_path, monkeypatch, capsys):
    """At 7B, scoring needs far more memory than a training step (generate's KV cache grows with eval_batch_size):
    a run that trained and then ran out of memory while scoring says so, not the training's fix, and the command
    it prints scores the saved adapters."""
    out = tmp_path / "run"
    flags = train_flags(run_data, out, "--max_iters=2", "--eval_interval=2", "--eval_batch_size=8")
    real = evaluation.evaluate

    def oom(*a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB")
    monkeypatch.setattr(evaluation, "evaluate", oom)
    with pytest.raises(SystemExit) as exit_:
        train.main(flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 3 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "out of memory while scoring with eval_batch_size=8" in err and str(out) in err
    assert (out / "adapter.pt").is_file() and not (out / "results.json").exists()
    fix = re.search(r"the same command plus (.*)\.$", err.strip()).group(1).split()
    assert fix == ["--eval_only=True", "--eval_batch_size=2"]
    with pytest.raises(SystemExit):  # out of memory again, now re-scoring: only the batch to lower
        train.main(flags + fix)
    assert capsys.readouterr().err.strip().endswith("the same command plus --eval_batch_size=1.")

    def cpu_oom(*a):  # the CPU allocator's RuntimeError: scoring's too
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 34359738368 bytes.")
    monkeypatch.setattr(evaluation, "evaluate", cpu_oom)
    with pytest.raises(SystemExit):
        train.main(flags + fix)
    assert capsys.readouterr().err.strip().endswith("the same command plus --eval_batch_size=1.")
    monkeypatch.setattr(evaluation, "evaluate", real)
    train.main(flags + fix)
    assert json.loads((out / "results.json").read_text())["scores"]


def test_running_out_of_memory_while_scoring_a_full_training_names_the_saved_weights(run_data, tmp_path, monkeypatch,
                                                                                      capsys):
    """Full training saves model.pt, not adapters: the message says what is saved."""
    out = tmp_path / "full"

    def oom(*a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB")
    monkeypatch.setattr(evaluation, "evaluate", oom)
    with pytest.raises(SystemExit):
        train.main(train_flags(run_data, out, "--adapter=none", "--max_iters=1", "--eval_interval=1"))
    err = capsys.readouterr().err
    assert "the trained weights are saved in" in err and "adapters" not in err, err
    assert (out / "model.pt").is_file()


def test_an_error_while_scoring_that_is_not_out_of_memory_surfaces_as_itself(run_data, tmp_path, monkeypatch):
    """Only an allocation that failed gets the lower eval_batch_size advice; a CUDA fault or a bug while scoring is
    its own traceback."""
    def fault(*a):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(evaluation, "evaluate", fault)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        train.train(train.parse_config(train_flags(run_data, tmp_path / "run", "--max_iters=1", "--eval_interval=1")))


def test_running_out_of_cpu_memory_is_the_out_of_memory_sentence(capsys, monkeypatch):
    for error in (MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                                              "allocate memory: you tried to allocate 800000000000 bytes.")):
        def fail(cfg, error=error):
            raise error
        monkeypatch.setattr(train, "train", fail)
        with pytest.raises(SystemExit) as exit_:
            train.main([])
        err = capsys.readouterr().err
        assert exit_.value.code == 3 and err.startswith("train.py: error: out of memory") and "Traceback" not in err
    monkeypatch.setattr(train, "train", lambda cfg: (_ for _ in ()).throw(RuntimeError("another failure")))
    with pytest.raises(RuntimeError, match="another failure"):  # only the allocator's words mean memory
        train.main([])


def test_a_resume_or_re_scoring_whose_tokenizer_or_base_moved_says_to_put_it_back(run_data, tmp_path, capsys):
    """A resume and eval_only take the tokenizer and base from the run's config and refuse another: a file that is
    gone is one sentence saying to put it back, not the advice to pass another tokenizer or base folder."""
    for key, name in (("tokenizer", "tokenizer.model"), ("init_from", "base.pt")):
        moved = tmp_path / key / name
        moved.parent.mkdir()
        shutil.copy(run_data / name, moved)
        out = finished_run(run_data, tmp_path / f"run_{key}", f"--{key}={moved}")
        moved.unlink()
        before = contents(out)
        for flag in ("--init_from=resume", "--eval_only=True"):
            err = fails([f"--out_dir={out}", flag, "--max_iters=6"], capsys, f"the run's {key} {moved} is not found "
                        "from here; it was moved or deleted since the run: put it back there.")
            assert "pass" not in err and "point to" not in err
        assert contents(out) == before


def test_out_of_memory_in_a_resume_advises_only_what_a_resume_may_change(capsys, monkeypatch):
    """A resume refuses another batch_size or grad_accum: its out-of-memory sentence must not send the user there."""
    monkeypatch.setattr(train, "train", lambda cfg: (_ for _ in ()).throw(MemoryError()))
    for flags, batch in (([], True), (["--init_from=resume"], False), (["--eval_only=True"], False)):
        with pytest.raises(SystemExit) as exit_:
            train.main(flags)
        err = capsys.readouterr().err
        assert exit_.value.code == 3 and err.count("\n") == 1 and "activation_checkpointing=True" in err
        assert ("grad_accum" in err) == ("batch_size" in err) == batch, err
        if not batch:  # what it advises, a resume takes
            assert {"activation_checkpointing", "fsdp"} <= set(train.RESUME_MAY_CHANGE)


def test_paths_of_the_wrong_kind_are_named_for_what_they_are(run_data, tmp_path, capsys):
    (tmp_path / "base.pt").mkdir()
    fails(train_flags(run_data, tmp_path / "a", f"--init_from={tmp_path / 'base.pt'}"), capsys, "is a folder")
    fails(train_flags(run_data, tmp_path / "b", f"--eval_dir={REPO / 'README.md'}"), capsys, "is a file, not a folder")
    (tmp_path / "empty.pt").write_bytes(b"")
    fails(train_flags(run_data, tmp_path / "c", f"--init_from={tmp_path / 'empty.pt'}"), capsys, "empty.pt is empty")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # a link to itself was called a file
    fails(train_flags(run_data, tmp_path / "loop"), capsys, "out_dir", "loop is a loop of links, not a folder")
    fails([REPO / "config/cme_llama2_7b.py", "--dry_run=True", "--batch_size=4"], capsys,
          "batch_size=4 must be a multiple of processes x grad_accum")


@pytest.mark.parametrize("env", [dict(RANK="0"), dict(RANK="0", LOCAL_RANK="0"), dict(RANK="abc", LOCAL_RANK="0",
                                 WORLD_SIZE="2"), dict(RANK="3", LOCAL_RANK="0", WORLD_SIZE="2"),
                                 dict(RANK="0", LOCAL_RANK="2", WORLD_SIZE="2"),
                                 dict(RANK="0", LOCAL_RANK="-1", WORLD_SIZE="2"),
                                 dict(RANK="2", LOCAL_RANK="0", WORLD_SIZE="2")])
def test_torchrun_variables_set_partly_or_wrongly_are_one_sentence_not_a_hang(run_data, tmp_path, capsys, monkeypatch,
                                                                              env):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(train.UserError, match=r"run under torchrun, or unset RANK"):
        train.train(train.parse_config(train_flags(run_data, tmp_path / "a", "--eval_dir=")))


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_a_process_count_in_the_environment_that_counts_none_is_one_sentence(capsys, monkeypatch, value):
    """WORLD_SIZE or LOCAL_WORLD_SIZE set without torchrun (a shell's export, a launcher of one's own): 0 was a
    ZeroDivisionError's traceback, -1 a dry run's plan for -1 GPUs with a micro-batch of -16, text a bare int()'s."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", value)
    fails([REPO / "config/cme_llama2_7b.py", "--dry_run=True"], capsys, f"WORLD_SIZE='{value}', not a number of "
          "processes", "unset WORLD_SIZE")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", value)  # the CPU threads a run takes, shared by a node's processes
    with pytest.raises(train.UserError, match=f"LOCAL_WORLD_SIZE='{value}', not a number of processes"):
        machine.cpu_threads({"threads": 0})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "")  # empty, as unset: the machine's own cores
    assert machine.cpu_threads({"threads": 0}) >= 1


def test_data_without_training_records_is_refused_before_step_1(run_data, tmp_path, capsys):
    records = tmp_path / "r.jsonl"
    records.write_text("".join('{"instruction": "q %d", "input": "", "output": "a"}\n' % i for i in range(3)))
    folder = tmp_path / "tokens"
    prepare([str(records)], str(run_data / "tokenizer.model"), str(folder), max_len=64, quiet=True)
    summary = json.loads((folder / "summary.json").read_text())
    summary["splits"]["train"].update(records=0, tokens=0)  # what a prepare with --val_fraction near 1 left
    for part in ("tokens", "prompt_lens"):
        (folder / f"train.{part}.bin").write_bytes(b"")
    (folder / "train.offsets.bin").write_bytes(bytes(8))  # one offset: 0
    (folder / "summary.json").write_text(json.dumps(summary))
    fails(train_flags(run_data, tmp_path / "a", f"--data_dir={folder}", "--eval_dir="), capsys, "no training records")
    assert not (tmp_path / "a").exists()


@pytest.mark.usefixtures("at_a_fresh_root")
def test_the_dry_run_refuses_an_init_from_that_is_a_file_but_not_a_checkpoint_as_the_run_does(tmp_path, capsys):
    """A preset stood in for it, as for a base not on disk, and the dry run passed a configuration that the run
    then refused (on 8 GPUs, after the launch)."""
    (tmp_path / "tokenizer.model").write_text("not a base\n")
    fails([f"--init_from={tmp_path / 'tokenizer.model'}", "--dry_run=True"], capsys,
          f"init_from '{tmp_path / 'tokenizer.model'}' is a file; give a model.pt written by train.py")


@pytest.mark.parametrize("typo, meant", [("scrach", "scratch"), ("resum", "resume")])
def test_the_dry_run_refuses_a_misspelt_init_from_keyword_as_the_run_does(typo, meant, tmp_path, monkeypatch, capsys):
    """A path not on disk is described by its preset (a recipe may be dry-run before its base is downloaded), so a
    misspelt 'scratch' or 'resume' passed the dry run that the run refused with "did you mean"."""
    monkeypatch.chdir(tmp_path)
    flags = [f"--init_from={typo}", f"--out_dir={tmp_path / 'out'}", "--eval_dir="]
    said = fails(flags, capsys, f"did you mean '{meant}'?")
    assert fails(flags + ["--dry_run=True"], capsys) == said
    assert not (tmp_path / "out").exists()


def test_the_dry_run_takes_init_from_scratch_as_the_keyword_beside_a_folder_named_scratch(tmp_path, monkeypatch,
                                                                                              capsys):
    """The dry run looked for a folder before the keyword: one named scratch in the working directory was read as a
    base, where the run itself builds a random one from scratch."""
    recipe = [str(Path(train.__file__).parent / "config/cme_llama2_7b.py"), "--dry_run=True", "--init_from=scratch"]
    monkeypatch.chdir(tmp_path)
    alone = train.train(train.parse_config(recipe))
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "config.json").write_text("{}")  # read as a Hugging Face folder, it is refused
    assert train.train(train.parse_config(recipe)) == alone
    assert capsys.readouterr().out.count("model llama2-7b: ") == 2


def test_a_dry_run_from_scratch_sizes_the_embedding_by_the_tokenizer_as_the_run_does_and_says_so(run_data, tmp_path,
                                                                                                   capsys):
    """A run from scratch sizes its embedding by its tokenizer's vocabulary; the dry run took the preset's (tiny: 512,
    the suite's tokenizer: 2,000) and counted other parameters than the run then trained. Until the tokenizer file
    is made the preset's stands in, and the dry run says which one it used."""
    flags = train_flags(run_data, tmp_path / "run", "--max_iters=1", "--eval_dir=")
    vocab, preset = train.Tokenizer(run_data / "tokenizer.model").vocab_size, model.ModelArgs.from_name("tiny")
    assert vocab != preset.vocab_size
    dry = train.train(train.parse_config([*flags, "--dry_run=True"]))
    assert f"FFN {preset.ffn_hidden_dim}, vocabulary {vocab:,} (that of {run_data / 'tokenizer.model'})\n" in \
        capsys.readouterr().out
    run = train.train(train.parse_config(flags))
    assert (dry["base_params"], dry["trainable_params"]) == (run["base_params"], run["trainable_params"])
    missing = tmp_path / "new" / "tokenizer.model"
    alone = train.train(train.parse_config([*flags, "--dry_run=True", f"--tokenizer={missing}",
                                            f"--out_dir={tmp_path / 'dry'}"]))  # the run's is refused, as by a run
    with torch.device("meta"):
        assert alone["base_params"] == model.Transformer(preset).num_params()
    assert f"vocabulary {preset.vocab_size} (the preset's, until the tokenizer {missing} is there)" in \
        capsys.readouterr().out


@non_ascii_names
def test_a_non_ascii_out_dir_under_the_c_locale_is_refused_at_once_naming_the_locale(run_data, tmp_path):
    """Under LC_ALL=C (PYTHONUTF8=0, no locale coercion) Python gives the bytes of --out_dir=out/é as lone surrogates,
    which torch takes as UTF-8 text and cannot: the run trained, then could not read its own ckpt.pt to resume or
    re-score it ("'utf-8' codec can't encode characters"). A config file's "out/é" no file name there could hold
    (the run ended on "'ascii' codec can't encode character"). Each is refused before anything is written, with the
    fix; a name that is not UTF-8 under a UTF-8 locale too."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "OMP_NUM_THREADS": "1"}
    encoding = subprocess.run([sys.executable, "-c", "import sys; print(sys.getfilesystemencoding())"], env=env,
                              capture_output=True, text=True).stdout.strip()
    if codecs.lookup(encoding).name == "utf-8":
        pytest.skip("this Python reads file names as UTF-8 under the C locale too (macOS)")
    out = tmp_path / "\u00e9"
    (tmp_path / "c.py").write_text(f"out_dir = {str(out)!r}\n", encoding="utf-8")
    flags = [f for f in train_flags(run_data, out, "--eval_dir=") if not f.startswith("--out_dir=")]
    for given in (f"--out_dir={out}", str(tmp_path / "c.py")):
        bad = subprocess.run([sys.executable, "train.py", given, *flags], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr[-2000:]
        assert bad.stderr.startswith("train.py: error: out_dir ") and "holds non-ASCII characters" in bad.stderr
        assert bad.stderr.endswith("run it under a UTF-8 locale (LC_ALL=C.UTF-8, or PYTHONUTF8=1), or give "
                                   "--out_dir an ASCII path.\n"), bad.stderr
        assert not out.exists()
    for key in ("data_dir", "eval_dir"):  # read by Python, but a config file's "data/é" was one that "does not exist"
        folder = tmp_path / f"{key}-\u00e9"
        folder.mkdir()
        (tmp_path / "c.py").write_text(f"{key} = {str(folder)!r}\n", encoding="utf-8")
        rest = [f for f in train_flags(run_data, tmp_path / "o") if not f.startswith(f"--{key}=")]  # the file's
        bad = subprocess.run([sys.executable, "train.py", str(tmp_path / "c.py"), *rest], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr[-2000:]
        assert bad.stderr.startswith(f"train.py: error: {key} ") and "holds non-ASCII characters" in bad.stderr
        assert bad.stderr.endswith(f"run it under a UTF-8 locale (LC_ALL=C.UTF-8, or PYTHONUTF8=1), or give --{key} "
                                   "an ASCII path.\n"), bad.stderr
        assert not (tmp_path / "o").exists()
    for key in ("init_from", "tokenizer", "out_dir"):  # Latin-1's é, as Python gives it under UTF-8
        with pytest.raises(train.UserError, match=f"{key} .* holds bytes that are not UTF-8 text, and torch"):
            train.parse_config([f"--{key}={tmp_path}/\udce9"])
    for key in ("data_dir", "eval_dir"):  # which Python opens by such a name: not refused
        assert train.parse_config([f"--{key}={tmp_path}/\udce9"])[key] == f"{tmp_path}/\udce9"


@pytest.mark.usefixtures("at_a_fresh_root")
def test_the_dry_run_reads_the_shape_of_a_base_pt_of_ours(run_data, capsys):
    base = torch.load(run_data / "base.pt", weights_only=True)
    summary = train.train(train.parse_config([f"--init_from={run_data / 'base.pt'}", "--dry_run=True"]))
    n_base = sum(t.numel() for t in base["model"].values())
    out = capsys.readouterr().out
    assert summary["base_params"] == n_base and f"model {run_data / 'base.pt'}: {n_base:,} base parameters" in out


@pytest.mark.parametrize("how", ["--init_from=resume --max_iters=6", "--eval_only=True",
                                 "--init_from=resume --max_iters=6 --dry_run_world_size=2"])
def test_a_resume_or_a_rescoring_can_be_dry_run(run_data, tmp_path, capsys, how):
    """dry_run and dry_run_world_size are no settings of the run: a resume or a re-scoring takes them as it takes
    max_iters, where it refused them as changes of the run's settings ("dry_run cannot change when resuming"), so
    that no resume could be dry-run. The dry run describes the run's model and leaves its files as they were."""
    out = finished_run(run_data, tmp_path / "run")
    before = every_file(out)
    summary = train.train(train.parse_config(train_flags(run_data, out, *how.split(), "--dry_run=True")))
    assert summary["trainable_params"] > 0 and "adapter teamlora (r=8, experts=4" in capsys.readouterr().out
    assert every_file(out) == before


@pytest.mark.parametrize("how", ["--init_from=resume --max_iters=6", "--eval_only=True"])
def test_the_dry_run_of_a_run_saved_before_dry_run_world_size_was_1_plans_for_one_process(run_data, tmp_path, capsys,
                                                                                         how):
    """A train.py before 5 Dec saved its default dry_run_world_size=8 in ckpt.pt's config. The dry run of a resume or
    a re-scoring of such a run planned for 8 GPUs unasked (and refused a batch that 8 cannot split); the processes a
    dry run plans for are the command's, never the run's: 1 by default, as for any other dry run."""
    out = finished_run(run_data, tmp_path / "run")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["config"]["dry_run_world_size"] = 8  # as that version wrote it
    torch.save(ckpt, out / "ckpt.pt")
    before = every_file(out)
    capsys.readouterr()
    summary = train.train(train.parse_config(train_flags(run_data, out, *how.split(), "--dry_run=True")))
    assert summary["trainable_params"] > 0
    out_text = capsys.readouterr().out
    assert "per GPU with 1 GPU," in out_text and "8 GPUs" not in out_text
    assert every_file(out) == before


def test_a_resume_of_a_run_saved_before_masks_were_seeded_by_step_says_its_dropout_masks_differ(run_data, tmp_path,
                                                                                                 capsys):
    """A train.py older than 4 December (its config has no tf32) drew a resumed run's dropout masks on from the saved
    random state; this one seeds them from (seed, step), so such a run goes on unlike that version's: said, once, on
    stderr, where a run of this version's resumes with no such word. Its ckpt.pt is kept until the next save."""
    for name, old in (("now", False), ("old", True)):
        out = finished_run(run_data, tmp_path / name)
        if old:  # as that version wrote it
            ckpt = torch.load(out / "ckpt.pt", weights_only=True)
            del ckpt["config"]["tf32"]
            torch.save(ckpt, out / "ckpt.pt")
        capsys.readouterr()
        train.main(train_flags(run_data, out, "--init_from=resume", "--max_iters=6", "--eval_dir="))
        err = capsys.readouterr().err
        assert ("train.py older than 4 December" in err) == old, err
        assert not old or err.count("warning:") == 1 and f"{out / 'ckpt.pt'} was written by" in err


@pytest.mark.parametrize("processes", [4, 3])
def test_the_dry_run_of_a_resume_on_other_processes_keeps_the_runs_slices_as_the_run_does(run_data, tmp_path, capsys,
                                                                                          processes):
    """A run of one process with grad_accum=4, resumed on 4 processes, goes on with grad_accum=1 (keep_slices), and on
    3 is refused in keep_slices' sentence. Its dry run for those processes (dry_run_world_size) split the batch with
    the run's grad_accum instead: it refused the first (8 is no multiple of 4 x 4) and named another fault in the
    second. It now keeps the slices as the run on that many processes does."""
    out = finished_run(run_data, tmp_path / "run", "--grad_accum=4")
    flags = train_flags(run_data, out, "--init_from=resume", "--max_iters=6", "--eval_dir=",
                        f"--dry_run_world_size={processes}", "--dry_run=True")
    if processes == 4:
        assert train.train(train.parse_config(flags))["trainable_params"] > 0
        assert "per GPU with 4 GPUs, micro-batch 2 x" in capsys.readouterr().out
    else:  # the run's refusal on 3 processes (train.train under torchrun), from the function it calls
        cfg, ckpt = train.resume_config(train.parse_config(flags))
        with pytest.raises(train.UserError) as run:
            machine.keep_slices(cfg, ckpt, processes, True)
        assert fails(flags, capsys) == f"train.py: error: {run.value}\n"


@pytest.mark.parametrize("adapter_pt", ["missing", "stale"])
def test_the_dry_run_of_a_rescoring_from_a_checkpoint_leaves_adapter_pt_unread_as_the_run_does(run_data, tmp_path,
                                                                                               capsys, adapter_pt):
    """eval_only on a run with its ckpt.pt scores the checkpoint's adapter (restore): an adapter.pt beside it that a
    kill left unwritten, or one of other settings, is not read by the run, so not by its dry run either."""
    out = finished_run(run_data, tmp_path / "run")
    if adapter_pt == "missing":
        os.remove(out / "adapter.pt")
    else:  # not an adapter at all: read, it would be refused
        (out / "adapter.pt").write_bytes(os.urandom(4096))
    before = every_file(out)
    flags = train_flags(run_data, out, "--eval_only=True", "--eval_limit=1", "--dry_run=True")
    assert train.train(train.parse_config(flags))["trainable_params"] > 0
    assert every_file(out) == before


def test_the_dry_run_of_a_rescoring_whose_base_is_not_on_disk_fits_no_adapter_to_the_preset_standing_in_for_it(
        run_data, tmp_path, capsys):
    """A base not on disk (not downloaded yet) is described by the `model` preset, which is not its shape: the
    re-scoring's dry run leaves adapter.pt unfitted to it, where fitting refused an adapter that fits its own base."""
    saved = torch.load(run_data / "base.pt", weights_only=True)["model_args"]
    args = train.ModelArgs(**{**saved, "dim": saved["dim"] // 2, "ffn_dim_multiplier": None, "hidden_dim": None})
    base = tmp_path / "narrow.pt"
    torch.save({"model_args": asdict(args), "model": train.Transformer(args).state_dict()}, base)
    out = finished_run(run_data, tmp_path / "run", f"--init_from={base}")
    os.remove(out / "ckpt.pt")
    os.remove(base)
    assert train.ModelArgs.from_name("tiny").dim != args.dim  # the preset's adapter shapes are not the run's
    flags = train_flags(run_data, out, f"--init_from={base}", "--eval_only=True", "--eval_limit=1", "--dry_run=True")
    assert train.train(train.parse_config(flags))["trainable_params"] > 0
    assert "model tiny" in capsys.readouterr().out


def test_a_resume_given_dry_run_world_size_but_not_dry_run_trains_as_one_without_it(run_data, tmp_path, capsys):
    """dry_run_world_size is what a dry run plans for, no setting of the run: a real resume given it keeps the slices
    for the processes it runs on (here one, as the run had), its grad_accum and so its training those of a resume
    without it."""
    first = finished_run(run_data, tmp_path / "a", "--grad_accum=2")
    shutil.copytree(first, tmp_path / "b")
    capsys.readouterr()
    for out, more in ((tmp_path / "a", []), (tmp_path / "b", ["--dry_run_world_size=2"])):
        train.main(train_flags(run_data, out, "--grad_accum=2", "--init_from=resume", "--max_iters=6", "--eval_dir=",
                               *more))
    assert "resuming a run of" not in capsys.readouterr().out
    configs = [torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["config"] for d in "ab"]
    assert [c["grad_accum"] for c in configs] == [2, 2]
    a, b = (torch.load(tmp_path / d / "adapter.pt", weights_only=True) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


@pytest.mark.parametrize("fault", ["--r=16", "--adapter=lora", "damaged", "a ckpt.pt", None])
def test_the_dry_run_of_a_rescoring_refuses_an_adapter_the_run_cannot_load_in_the_runs_sentence(run_data, tmp_path,
                                                                                               capsys, fault):
    """eval_only on a run without its ckpt.pt scores its adapter.pt: the run refused one that is damaged, not an
    adapter, or made with other settings than the flags, where the dry run, which never read it, passed. The dry run
    now reads it into its meta model as the run does, refusing it in the run's own sentence, and passes one that
    fits; it changes no file."""
    out = finished_run(run_data, tmp_path / "run")
    ckpt = (out / "ckpt.pt").read_bytes()
    os.remove(out / "ckpt.pt")
    flags = train_flags(run_data, out, "--eval_only=True", "--eval_limit=1")
    if fault in ("damaged", "a ckpt.pt"):
        (out / "adapter.pt").write_bytes(os.urandom(4096) if fault == "damaged" else ckpt)
    elif fault:
        flags.append(fault)
    before = every_file(out)
    if fault is None:
        assert train.train(train.parse_config([*flags, "--dry_run=True"]))["trainable_params"] > 0
        assert every_file(out) == before
    else:
        dry = fails([*flags, "--dry_run=True"], capsys)
        assert every_file(out) == before
        assert dry == fails(flags, capsys)


@pytest.mark.parametrize("replaced, how", [("base", "--init_from=resume --max_iters=4"), ("base", "--eval_only=True"),
                                           ("tokenizer", "--eval_only=True")])
def test_the_dry_run_of_a_resume_refuses_a_base_or_tokenizer_replaced_since_in_the_runs_sentence(run_data, tmp_path,
                                                                                                capsys, replaced, how):
    """A resume or a re-scoring is refused when the base, or the tokenizer, at the run's path is no longer the one its
    ckpt.pt records (restore), where its dry run passed. It now checks both as restore does (the base of ours it
    reads; a Meta or Hugging Face folder's weights it does not), in the run's sentence, changing no file."""
    base, tok, out, shards = tmp_path / "base.pt", tmp_path / "tok.model", tmp_path / "run", tmp_path / "tokens"
    shutil.copy(run_data / "base.pt", base)
    shutil.copy(run_data / "tokenizer.model", tok)
    data.prepare([str(run_data / "train.jsonl")], str(tok), str(shards), max_len=128, val_fraction=0.1, quiet=True)
    train.train(train.parse_config(train_flags(run_data, out, f"--init_from={base}", f"--tokenizer={tok}",
                                               f"--data_dir={shards}", "--eval_dir=", "--max_iters=2")))
    if replaced == "base":
        original = torch.load(base, weights_only=True)
        torch.save({**original, "model": {n: t + 1e-4 for n, t in original["model"].items()}}, base)
    else:  # another world's text: another tokenizer of the same vocab_size, the shards prepared again with it
        minicme.make_suite(str(tmp_path / "other"), seed=1, n_train_per_task=4, n_test_per_task=2, n_val_per_task=2,
                           corpus_docs=400)
        shutil.copy(tmp_path / "other" / "tokenizer.model", tok)
        shutil.rmtree(shards)
        data.prepare([str(run_data / "train.jsonl")], str(tok), str(shards), max_len=128, val_fraction=0.1,
                     quiet=True)
    flags = [f"--out_dir={out}", f"--eval_dir={run_data / 'test'}", *how.split()]
    before = every_file(tmp_path)
    dry = fails([*flags, "--dry_run=True"], capsys, f"the {replaced}", "is not the one this run")
    assert every_file(tmp_path) == before
    assert dry == fails(flags, capsys)


@pytest.mark.parametrize("layout", ["pt", "hf", "meta"])
def test_the_dry_run_refuses_a_tokenizer_the_base_was_not_trained_with_in_the_runs_own_sentence(run_data, tmp_path,
                                                                                                capsys, layout):
    """A base of ours (model.pt), a Hugging Face or a Meta folder whose embedding does not fit the tokenizer (here
    tiny's 512 rows, the suite's 2,000 tokens): the dry run described it and passed, and the run was then refused
    before step 1 (preflight). The dry run now refuses it in the run's own sentence, from the vocabulary it reads."""
    base = tmp_path / ("model.pt" if layout == "pt" else layout)
    if layout == "pt":
        tiny = model.Transformer(model.ModelArgs.from_name("tiny"))
        torch.save({"model_args": asdict(tiny.args), "model": tiny.state_dict()}, base)
    else:
        base.mkdir()
        tiny = saved_tiny_model(base, layout)
    vocab = train.Tokenizer(run_data / "tokenizer.model").vocab_size
    assert not tiny.args.vocab_size - tokenizer.VOCAB_PADDING < vocab <= tiny.args.vocab_size  # what it was chosen for
    flags = train_flags(run_data, tmp_path / "run", f"--init_from={base}", "--eval_dir=")
    run = fails(flags, capsys, f"the tokenizer has {vocab:,} tokens but the base model {tiny.args.vocab_size:,}")
    assert fails([*flags, "--dry_run=True"], capsys) == run
    assert not (tmp_path / "run").exists()


def test_the_dry_run_refuses_a_tokenizer_other_than_the_shards_in_the_runs_own_sentence(run_data, tmp_path, capsys):
    """A tokenizer of the shards' size (so one the base's embedding fits) that is not the one they were made with: the
    run refuses it before step 1 (preflight: summary.json's SHA-256), where the dry run, which read nothing of data_dir,
    passed. It now reads their summary.json (never the shards) and refuses it as the run does, first, in the run's own
    sentence, making nothing; whatever the base: from scratch, ours, or a preset standing in for one not on disk."""
    vocab = train.Tokenizer(run_data / "tokenizer.model").vocab_size
    other = with_vocabulary(hf_tokenizer_folder(tmp_path / "other"), vocab)
    before = contents(run_data / "tokens")
    flags = train_flags(run_data, tmp_path / "run", f"--tokenizer={other}", "--eval_dir=")
    run = fails(flags, capsys, f"tokenizer {other / 'tokenizer.json'} ({vocab:,} tokens) is not the one",
                f"({run_data / 'tokenizer.model'}, {vocab:,} tokens)")
    assert fails([*flags, f"--init_from={run_data / 'base.pt'}"], capsys) == run  # the shards' first, as in preflight
    for base in ("scratch", run_data / "base.pt", tmp_path / "Llama-2-7b"):  # the last: a preset's (tiny), not there
        assert fails([*flags, f"--init_from={base}", "--dry_run=True"], capsys) == run
    assert not (tmp_path / "run").exists() and contents(run_data / "tokens") == before
    assert train.main([*flags, f"--tokenizer={run_data / 'tokenizer.model'}", "--dry_run=True"]) is None  # theirs


def test_the_demos_shards_refuse_a_tokenizer_of_ones_own_in_the_dry_run_as_in_the_run(run_data, tmp_path,
                                                                                      monkeypatch):
    """The demo's shards (data/mini_cme/tokens) are prepared with the demo's own tokenizer, so a first run with a
    tokenizer of one's own was refused before step 1 (preflight) once it had built them, where its dry run passed. The
    dry run and the run now refuse it in preflight's sentence before building anything: by the demo tokenizer's SHA-256
    once the suite is built, before that by its size. A copy of the demo's tokenizer (the same seed builds the same
    bytes) passes."""
    monkeypatch.chdir(tmp_path)  # no data/mini_cme
    mine = hf_tokenizer_folder(tmp_path / "mine")
    copy = tmp_path / "copy.model"
    shutil.copy(run_data / "tokenizer.model", copy)
    flags = ["--init_from=scratch", "--model=tiny", "--eval_dir=", "--max_iters=1", "--batch_size=8"]

    def refusal(*more):
        with pytest.raises(train.UserError) as refused:
            train.train(train.parse_config([*flags, f"--tokenizer={mine}", *more]))
        return str(refused.value)

    unbuilt = refusal("--dry_run=True")
    train.train(train.parse_config([*flags, f"--tokenizer={copy}", "--dry_run=True"]))
    assert sorted(os.listdir(tmp_path)) == ["copy.model", "mine"]
    assert refusal() == unbuilt and sorted(os.listdir(tmp_path)) == ["copy.model", "mine"]  # no suite built for it
    os.makedirs(minicme.ROOT)  # the demo's suite built (here the session's small one), its shards not yet
    for name in ("suite.json", "train.jsonl", "tokenizer.model"):
        shutil.copy(run_data / name, minicme.ROOT)
    built = refusal("--dry_run=True")
    train.train(train.parse_config([*flags, f"--tokenizer={copy}", "--dry_run=True"]))
    assert not os.path.exists(minicme.DEMO["data_dir"]) and not os.path.exists("out")
    ran = refusal()  # the run: before it prepares the demo's shards with the demo's tokenizer
    assert not os.path.exists(minicme.DEMO["data_dir"]) and not os.path.exists("out")
    assert unbuilt == built == ran == (
        f"tokenizer {mine / 'tokenizer.json'} ({train.Tokenizer(mine).vocab_size:,} tokens) is not the one "
        f"{minicme.DEMO['data_dir']} was made with ({minicme.DEMO['tokenizer']}, {minicme.VOCAB_SIZE:,} tokens); pass "
        "that one, or run data.py prepare again with this one.")
    data.prepare([f"{minicme.ROOT}/train.jsonl"], minicme.DEMO["tokenizer"], minicme.DEMO["data_dir"], max_len=256,
                 val_fraction=0.03, quiet=True)  # the shards, as the demo's first run makes them
    assert refusal("--dry_run=True") == refusal() == ran  # now from the shards' summary.json


def test_the_dry_run_refuses_shards_the_run_refuses_from_their_summary_json_in_the_runs_own_sentence(
        run_data, tmp_path, capsys):
    """The run refuses a data_dir from its summary.json alone, before step 1: no such folder of shards (a file, no
    summary.json), no split "train", no training records; the dry run, which read summary.json only for the tokenizer,
    passed all four. It now refuses each in the run's own sentence, reading no shard and making nothing. A data_dir not
    there at all still passes it: the README's recipe may be dry-run before its step 1 prepares the data."""
    shards = tmp_path / "tokens"
    shutil.copytree(run_data / "tokens", shards)
    summary = json.loads((shards / "summary.json").read_text())
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "file").write_text("not shards")
    for part in ("tokens", "prompt_lens", "offsets"):  # the dry run reads none of them: gone, it never saw them
        os.remove(shards / f"train.{part}.bin")
    for data_dir, splits, needle in [
            (tmp_path / "file", None, "is a file, not a folder of token shards"),
            (empty, None, "has no summary.json"),
            (shards, {"val": summary["splits"]["val"]}, "has no split 'train'; the splits are ['val']"),
            (shards, {**summary["splits"], "train": {"records": 0, "tokens": 0}}, "has no training records")]:
        if splits is not None:
            (shards / "summary.json").write_text(json.dumps({**summary, "splits": splits}))
        if needle == "has no training records":  # the split's shards as prepare leaves them (neither reads them)
            for part in ("tokens", "prompt_lens"):
                (shards / f"train.{part}.bin").write_bytes(b"")
            (shards / "train.offsets.bin").write_bytes(bytes(8))  # one offset: 0
        before = every_file(tmp_path)
        flags = train_flags(run_data, tmp_path / "out", f"--data_dir={data_dir}", "--eval_dir=")
        run = fails(flags, capsys, f"{data_dir} {needle}")
        for base in ("scratch", run_data / "base.pt", tmp_path / "Llama-2-7b"):  # the last: a preset's, not there
            assert fails([*flags, f"--init_from={base}", "--dry_run=True"], capsys) == run
        assert every_file(tmp_path) == before and not (tmp_path / "out").exists()
    flags = train_flags(run_data, tmp_path / "out", f"--data_dir={tmp_path / 'absent'}", "--eval_dir=")
    fails(flags, capsys, f"{tmp_path / 'absent'} does not exist")
    assert train.main([*flags, "--dry_run=True"]) is None


def demo_built_in(tmp_path, monkeypatch, run_data, built, suite_files):
    """The current folder tmp_path, holding the demo's suite (`suite_files` of the session's small one) and, as
    `built` says, its shards and corpus shards ("all but the base") and base ("all")."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(minicme.PRETRAIN, "model", "tiny")
    os.makedirs(minicme.ROOT)
    for name in suite_files:
        shutil.copy(run_data / name, minicme.ROOT)
    if built != "suite":
        shutil.copytree(run_data / "tokens", minicme.DEMO["data_dir"])
        shutil.copytree(run_data / "corpus", minicme.PRETRAIN["data_dir"])
    if built == "all":
        shutil.copy(run_data / "base.pt", minicme.DEMO["init_from"])


def run_and_dry_run_refuse_alike(tmp_path, capsys, *needles):
    """The demo's run is refused in a sentence holding every needle and telling to delete the demo's files, its dry
    run in the same sentence; neither changes a file in tmp_path or makes out/."""
    before = every_file(tmp_path)
    flags = ["--model=tiny", "--eval_dir=", "--max_iters=1", "--batch_size=8"]
    run = fails(flags, capsys, *needles, f"delete {minicme.ROOT} and run again")
    assert every_file(tmp_path) == before and not os.path.exists("out")
    assert fails([*flags, "--dry_run=True"], capsys) == run
    assert every_file(tmp_path) == before


@pytest.mark.parametrize("built", ["suite", "all but the base", "all"])
def test_a_damaged_demo_tokenizer_is_refused_by_the_dry_run_in_the_runs_sentence(run_data, tmp_path, monkeypatch,
                                                                                 capsys, built):
    """The run refused the demo's damaged tokenizer.model as the demo's incomplete files (delete them, run again)
    where it prepared the demo's shards with it, and in the tokenizer's own words (pass the checkpoint's
    tokenizer.model) where they were prepared; the dry run always in the tokenizer's words. Both now say the demo's
    sentence, first, whatever of the demo is built; the dry run making nothing."""
    demo_built_in(tmp_path, monkeypatch, run_data, built, ("suite.json", "train.jsonl", "tokenizer.model"))
    tokenizer = tmp_path / minicme.DEMO["tokenizer"]
    tokenizer.write_bytes(tokenizer.read_bytes()[:100])  # truncated
    run_and_dry_run_refuse_alike(tmp_path, capsys, f"the demo's files in {minicme.ROOT} are incomplete "
                                 f"({minicme.DEMO['tokenizer']} is neither a SentencePiece model")


def test_a_batch_that_does_not_split_is_said_before_the_demos_damaged_files_by_the_dry_run_as_by_the_run(
        run_data, tmp_path, monkeypatch, capsys):
    """The run checks the batch's split for its processes (check_batch_split) before it builds or reads anything of
    the demo's: with both faults, the dry run for that many processes names the split too, in the run's sentence."""
    demo_built_in(tmp_path, monkeypatch, run_data, "suite", ("suite.json", "train.jsonl", "tokenizer.model"))
    tokenizer = tmp_path / minicme.DEMO["tokenizer"]
    tokenizer.write_bytes(tokenizer.read_bytes()[:100])  # truncated
    flags = ["--model=tiny", "--eval_dir=", "--max_iters=1", "--batch_size=6", "--grad_accum=2"]
    with pytest.raises(train.UserError) as run:  # the run's check, on 2 processes under torchrun
        machine.check_batch_split(train.parse_config(flags), 2)
    assert fails([*flags, "--dry_run=True", "--dry_run_world_size=2"], capsys) == f"train.py: error: {run.value}\n"
    assert "the demo's files" in fails(flags, capsys)  # the other fault, which one process meets


def test_a_damaged_demo_tokenizer_is_named_as_the_demos_damage_before_a_tokenizer_of_ones_own_is_compared_with_it(
        run_data, tmp_path, monkeypatch, capsys):
    """With a tokenizer of one's own on the demo's shards still to be prepared, the demo's own tokenizer.model is what
    those shards will be made with: check_own_tokenizer reads it to compare. Damaged, it is the demo's damage (delete
    the demo's files, run again), said before the comparison could say it in the tokenizer's words, by the run and its
    dry run alike."""
    demo_built_in(tmp_path, monkeypatch, run_data, "suite", ("suite.json", "train.jsonl", "tokenizer.model"))
    tokenizer = tmp_path / minicme.DEMO["tokenizer"]
    tokenizer.write_bytes(tokenizer.read_bytes()[:100])  # truncated
    mine = tmp_path / "mine.model"
    shutil.copy(run_data / "tokenizer.model", mine)
    before = every_file(tmp_path)
    flags = ["--model=tiny", "--eval_dir=", "--max_iters=1", "--batch_size=8", f"--tokenizer={mine}"]
    run = fails(flags, capsys, f"the demo's files in {minicme.ROOT} are incomplete", f"delete {minicme.ROOT}")
    assert fails([*flags, "--dry_run=True"], capsys) == run
    assert every_file(tmp_path) == before and not os.path.exists("out")


@pytest.mark.parametrize("built", ["suite", "all but the base", "all"])
def test_a_missing_demo_tokenizer_is_refused_by_the_dry_run_in_the_runs_sentence(run_data, tmp_path, monkeypatch,
                                                                                  capsys, built):
    """The demo's suite built but its tokenizer.model deleted: the run refused it as the demo's incomplete files
    (delete them, run again); the dry run passed, sizing the base by the size the demo's tokenizer will have. Both
    now refuse it in the run's sentence, whatever of the demo is built; the dry run making nothing."""
    demo_built_in(tmp_path, monkeypatch, run_data, built, ("suite.json", "train.jsonl"))  # less its tokenizer.model
    run_and_dry_run_refuse_alike(tmp_path, capsys, f"the demo's files in {minicme.ROOT} are incomplete (",
                                 minicme.DEMO["tokenizer"])


@pytest.mark.parametrize("folder", ["data_dir", "the base's corpus"])
def test_a_demo_shard_folder_that_is_a_file_is_refused_by_the_dry_run_in_the_runs_sentence(run_data, tmp_path,
                                                                                           monkeypatch, capsys, folder):
    """The demo's data_dir (data/mini_cme/tokens) a file, or its base's corpus shards' folder where the base is still
    to be pretrained: the run refused the first as a current folder that can not be written (run elsewhere: no fix),
    the second in prepare's words (choose another --out: no flag of train.py's); the dry run passed both. Now both
    refuse them as the demo's incomplete files, in one sentence, the dry run making nothing and the file kept."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(minicme.PRETRAIN, "model", "tiny")
    os.makedirs(minicme.ROOT)  # the demo's suite built (here the session's small one)
    for name in ("suite.json", "train.jsonl", "tokenizer.model", "corpus.txt"):
        shutil.copy(run_data / name, minicme.ROOT)
    if folder == "data_dir":
        shutil.copy(run_data / "base.pt", minicme.DEMO["init_from"])
        path = minicme.DEMO["data_dir"]
    else:  # the base pretrained first, on the corpus prepared there
        shutil.copytree(run_data / "tokens", minicme.DEMO["data_dir"])
        path = minicme.PRETRAIN["data_dir"]
    (tmp_path / path).write_text("not the shards")
    before = every_file(tmp_path)
    flags = ["--model=tiny", "--eval_dir=", "--max_iters=1", "--batch_size=8"]
    run = fails(flags, capsys, f"the demo's files in {minicme.ROOT} are incomplete ({path} is not a folder); "
                f"delete {minicme.ROOT} and run again")
    assert every_file(tmp_path) == before and not os.path.exists("out")
    assert fails([*flags, "--dry_run=True"], capsys) == run
    assert every_file(tmp_path) == before


def a_fault(name, run_data, tmp_path):
    """One of a user's realistic faults, made in tmp_path: (its flags, what the run's refusal of it alone says)."""
    if name.startswith("out_dir"):  # the flags' --out_dir, tmp_path / "out"
        if name == "out_dir holds a run":
            (tmp_path / "out").mkdir()
            (tmp_path / "out" / "results.json").write_text("{}")
            return [], "already holds a run"
        (tmp_path / "out").write_text("not a folder")
        return [], "is a file, not a folder; choose another --out_dir"
    if name.startswith("data_dir"):
        if name == "data_dir is a file":
            (tmp_path / "shards").write_text("not shards")
        else:
            (tmp_path / "shards").mkdir()
        return [f"--data_dir={tmp_path / 'shards'}"], "not a folder of token shards" if "file" in name else \
            "has no summary.json"
    if name == "tokenizer not the shards'":  # of their size: the base's embedding fits it
        vocab = train.Tokenizer(run_data / "tokenizer.model").vocab_size
        return [f"--tokenizer={with_vocabulary(hf_tokenizer_folder(tmp_path / 'other'), vocab)}"], "is not the one"
    if name == "tokenizer damaged":
        (tmp_path / "cut.model").write_bytes((run_data / "tokenizer.model").read_bytes()[:100])
        return [f"--tokenizer={tmp_path / 'cut.model'}"], "is neither a SentencePiece model"
    if name == "init_from a folder without weights":
        (tmp_path / "Llama-2-7b").mkdir()
        return [f"--init_from={tmp_path / 'Llama-2-7b'}"], "holds neither params.json"
    if name == "init_from not a checkpoint":
        (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
        return [f"--init_from={tmp_path / 'model.pt'}"], "is not a readable base model"
    if name == "a base of another vocabulary":
        saved = torch.load(run_data / "base.pt", weights_only=True)["model_args"]
        args = train.ModelArgs(**{**saved, "vocab_size": saved["vocab_size"] + tokenizer.VOCAB_PADDING})
        torch.save({"model_args": asdict(args), "model": train.Transformer(args).state_dict()}, tmp_path / "wide.pt")
        return [f"--init_from={tmp_path / 'wide.pt'}"], "not the tokenizer the base model was trained with"
    if name.startswith("eval_dir"):
        (tmp_path / "eval").mkdir()
        (tmp_path / "eval" / "qa.json").write_text("[]")  # tasks.py's JSON list, not JSONL
        (tmp_path / "eval.jsonl").write_text("")
        folder = tmp_path / ("eval.jsonl" if name == "eval_dir a file" else "eval")
        return [f"--eval_dir={folder}"], "is a file, not a folder of <task>.jsonl" if folder.is_file() else \
            "evaluation sets are JSONL"
    return {"targets not linear": (["--targets=layers.1"], "not a linear layer"),
            "r wider than a target": (["--r=4096"], "is more than target"),
            "rows past the base's context": (["--batch_mode=pack", "--max_len=300"], "makes rows longer than"),
            "load_layers past the layers": (["--load_layers=99"], "load_layers=99 but the model has")}[name]


TWO_FAULTS = [("mini-CME", first, second) for first, second in [
    ("out_dir holds a run", "data_dir without summary.json"),
    ("out_dir a file", "tokenizer not the shards'"),
    ("data_dir without summary.json", "init_from a folder without weights"),
    ("data_dir is a file", "init_from not a checkpoint"),
    ("tokenizer damaged", "init_from a folder without weights"),
    ("tokenizer not the shards'", "targets not linear"),
    ("tokenizer not the shards'", "eval_dir holding a JSON list"),
    ("a base of another vocabulary", "r wider than a target"),
    ("a base of another vocabulary", "rows past the base's context"),
    ("init_from not a checkpoint", "eval_dir a file"),
    ("targets not linear", "rows past the base's context"),
    ("eval_dir a file", "load_layers past the layers"),
    ("out_dir holds a run", "load_layers past the layers")]] + [
    ("the demo's", "tokenizer not the shards'", "init_from a folder without weights"),
    ("the demo's without its base", "data_dir without summary.json", "targets not linear"),
    pytest.param("the official records'", "out_dir a file", "targets not linear", marks=needs_fixtures)]


@pytest.mark.parametrize("shards, first, second", TWO_FAULTS)
def test_a_configuration_with_two_faults_is_refused_by_the_dry_run_in_the_sentence_the_run_says_first(
        run_data, tmp_path, monkeypatch, capsys, shards, first, second):
    """The dry run met the run's checks in another order: out_dir, the evaluation sets and load_layers not at all, the
    base before the tokenizer and the shards, the base's vocabulary and its context before the targets; and the run
    checked the tokenizer against the shards only once it had read the base, the demo's pretraining its targets before
    the shards. So with two faults the dry run named one and the run the other. Now the run meets them in one order
    (out_dir, tokenizer, shards, evaluation sets, base, targets, the base's vocabulary and context), and the dry run in
    the same: its first sentence is the run's, naming one of the two faults."""
    out = tmp_path / "out"
    if shards == "mini-CME":  # a base of ours, on the shards of the small suite
        flags = train_flags(run_data, out, f"--init_from={run_data / 'base.pt'}", "--max_iters=1")
    elif shards == "the official records'":  # prepared with LLaMA-2's tokenizer, trained from scratch
        prepare([OFFICIAL], LLAMA2, tmp_path / "llama2_tokens", max_len=1024, quiet=True)
        capsys.readouterr()  # prepare's warning about a record too long for max_len
        flags = train_flags(run_data, out, f"--tokenizer={LLAMA2}", f"--data_dir={tmp_path / 'llama2_tokens'}",
                            "--eval_dir=", "--max_len=512", "--batch_size=2", "--max_iters=1")
    else:  # the demo's suite and shards, its base built or still to be pretrained
        demo_built_in(tmp_path, monkeypatch, run_data, "all" if shards == "the demo's" else "all but the base",
                      ("suite.json", "train.jsonl", "tokenizer.model"))
        flags = ["--model=tiny", "--eval_dir=", "--max_iters=1", "--batch_size=8", f"--out_dir={out}"]
    (more, said), (more_2, said_2) = a_fault(first, run_data, tmp_path), a_fault(second, run_data, tmp_path)
    flags = [*flags, *more, *more_2]
    run = fails(flags, capsys)
    assert said in run or said_2 in run, run
    assert fails([*flags, "--dry_run=True"], capsys) == run


def test_a_mistake_in_a_first_runs_settings_is_found_before_the_demo_pretrains_its_base(tmp_path, monkeypatch, capsys):
    """The first `python train.py` pretrains the demo's base (minutes) before it fine-tunes: the run's own
    checks come first, on a meta model of that base's shape."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(minicme.PRETRAIN, "model", "tiny")
    (tmp_path / "taken").write_text("a file")
    for flag, needle in [("--targets=w1,nope", "nope"), ("--batch_mode=pack --max_len=300", "attends over"),
                         ("--load_layers=5", "load_layers=5"), ("--out_dir=taken", "is a file")]:
        fails(["--model=tiny", *flag.split()], capsys, needle)
        assert not (tmp_path / "data/mini_cme/pretrain").exists() and not (tmp_path / "out").exists()
    assert (tmp_path / "taken").read_text() == "a file"


def test_the_demos_dry_run_before_its_base_is_built_describes_the_base_the_run_pretrains_first(tmp_path, monkeypatch,
                                                                                                capsys):
    """Before its base was built, the demo's dry run described the `model` preset as it stands (small: a vocabulary
    of 2,048, 512 positions), not the base the run pretrains first (minicme.PRETRAIN, sized by the tokenizer the demo
    builds: 2,000 pieces, 256 positions): it counted other parameters than the run trained, and passed a max_len that
    the run refused. It now describes that base, before its tokenizer is built and after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(minicme.PRETRAIN, "model", "tiny")  # a quick pretraining: the dry run reads PRETRAIN too
    monkeypatch.setitem(minicme.PRETRAIN, "max_iters", 2)
    monkeypatch.setitem(minicme.PRETRAIN, "eval_interval", 2)
    flags = ["--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--eval_dir=", "--batch_size=8"]
    dry = train.train(train.parse_config([*flags, "--dry_run=True"]))
    out = capsys.readouterr().out  # PRETRAIN's preset, not --model's (small)
    assert f"model tiny (the demo's base, pretrained first): {dry['base_params']:,} base parameters" in out
    assert f"vocabulary {minicme.VOCAB_SIZE:,} (that of the tokenizer the demo builds first)" in out
    fails([*flags, "--dry_run=True", "--batch_mode=pack", "--max_len=300"], capsys, "the 256 tokens the base model")
    assert not os.path.exists("data")  # a dry run builds nothing
    run = train.train(train.parse_config(flags))
    assert (dry["base_params"], dry["trainable_params"]) == (run["base_params"], run["trainable_params"])
    capsys.readouterr()
    flags.append("--out_dir=out/dry")  # not the run's, which holds it: the dry run refuses that out_dir, as a run
    built = train.train(train.parse_config([*flags, "--dry_run=True"]))  # the base is there: described as it is
    out = capsys.readouterr().out
    assert f"model {minicme.DEMO['init_from']}: " in out and "pretrained first" not in out and "vocabulary" not in out
    assert (built["base_params"], built["trainable_params"]) == (run["base_params"], run["trainable_params"])
    os.remove(minicme.DEMO["init_from"])  # the tokenizer is there, the base is not (yet)
    again = train.train(train.parse_config([*flags, "--dry_run=True"]))
    assert f"vocabulary {minicme.VOCAB_SIZE:,} (that of {minicme.DEMO['tokenizer']})" in capsys.readouterr().out
    assert (again["base_params"], again["trainable_params"]) == (run["base_params"], run["trainable_params"])


@pytest.mark.parametrize("flag, what", [(f"--max_len={2**63 - 1}", "a micro-batch of 8 rows of up to max_len="),
                                        (f"--eval_batch_size={2**62}", f"scoring {2**62} prompts of up to max_len=")])
def test_the_dry_run_refuses_sizes_no_64_bit_machine_can_address_instead_of_estimating_them(run_data, tmp_path,
                                                                                           capsys, flag, what):
    """A model from scratch attends over max_len tokens, so check_config lets max_len reach 2**63 - 1: the dry run
    printed 'about 13985787905310720.0 GiB' per GPU as an estimate. Past what a 64-bit machine can address it is
    one sentence naming the flags to lower."""
    fails(train_flags(run_data, tmp_path / "run", flag, "--dry_run=True"), capsys, what,
          "bytes per GPU, more than a 64-bit machine can address; lower --")


@pytest.mark.parametrize("target, module", [("1", "layers.1, a TransformerBlock"),
                                            ("w2,feed_forward", "layers.0.feed_forward, a FeedForward")])
def test_a_target_naming_a_module_that_is_not_a_linear_layer_is_refused_naming_the_linear_layers(
        run_data, tmp_path, capsys, target, module):
    """--targets=1 (a number where layer names belong) matched layers.1, a whole block, and teamlora.inject's advice
    was to dequantise it; the run and the dry run say that targets are linear layers' names, and list this model's."""
    wrong = target.split(",")[-1]
    for more in (["--dry_run=True"], []):
        fails(train_flags(run_data, tmp_path / "run", f"--targets={target}", "--eval_dir=", *more), capsys,
              f"target '{wrong}' names {module}, not a linear layer; ", "this model's: wq,wk,wv,wo,w1,w2,w3,output")
    assert not (tmp_path / "run").exists()


def test_a_resume_on_token_shards_prepared_again_otherwise_is_refused_and_on_its_own_goes_on(run_data, tmp_path,
                                                                                           capsys):
    """data_dir cannot change on a resume, but what it holds can (`data.py prepare` again into the same --out): a run
    would go on with other batches under its old step count. One token other in the shards is refused; re-scoring,
    which reads only the evaluation sets, is not."""
    shards, out = tmp_path / "tokens", tmp_path / "run"
    shutil.copytree(run_data / "tokens", shards)
    train.train(train.parse_config(train_flags(run_data, out, f"--data_dir={shards}", "--eval_dir=", "--max_iters=2",
                                               "--eval_interval=2")))
    tokens = shards / "train.tokens.bin"
    original = tokens.read_bytes()
    tokens.write_bytes(original[:-2] + bytes([original[-2] ^ 1]) + original[-1:])
    fails([f"--out_dir={out}", "--init_from=resume", "--max_iters=4"], capsys, f"the token shards in {shards} are "
          "not those this run trained on", "prepared again since?")
    train.train(train.parse_config([f"--out_dir={out}", "--eval_only=True", f"--eval_dir={run_data / 'test'}"]))
    tokens.write_bytes(original)
    assert train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume", "--max_iters=4"]))["step"] == 4


def test_a_run_resumed_or_sampled_on_another_base_is_refused_and_on_its_own_goes_on(run_data, tmp_path, capsys):
    """An adapter is only right on the base it trained on: a base replaced at the same path (re-pretrained on
    another CPU, another revision of the checkpoint) would resume or answer wrong without a word."""
    import sample
    base = tmp_path / "base.pt"
    base.write_bytes((run_data / "base.pt").read_bytes())
    out = tmp_path / "run"
    train.train(train.parse_config(train_flags(run_data, out, f"--init_from={base}", "--eval_dir=", "--max_iters=2")))
    original = torch.load(base, weights_only=True)
    other = {**original, "model": {n: t + 1e-4 if n.startswith("layers.0.") else t
                                   for n, t in original["model"].items()}}
    torch.save(other, base)
    fails([f"--out_dir={out}", "--init_from=resume", "--max_iters=4"], capsys, f"base model at {base}",
          "not the one this run trained on")
    with pytest.raises(train.UserError, match="not the one this run trained on"):
        sample.load_run(str(out))
    torch.save(original, base)  # put back: the run goes on, and answers
    train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume", "--max_iters=4"]))
    assert "resumed from" in capsys.readouterr().out
    sample.load_run(str(out))


def scored_run_on_a_base_of_its_own(run_data, tmp_path):
    """(out, base, the base's weights, the same shape's other weights): a finished, scored run on a copy of the
    session's base, its ckpt.pt deleted (its adapter.pt and results.json kept, as one keeps or shares a run)."""
    base, out = tmp_path / "base.pt", tmp_path / "run"
    shutil.copy(run_data / "base.pt", base)
    train.train(train.parse_config(train_flags(run_data, out, f"--init_from={base}", "--max_iters=2",
                                               "--eval_interval=2", "--eval_limit=1")))
    results = json.loads((out / "results.json").read_text())
    assert results["base"] == torch.load(out / "ckpt.pt", weights_only=True)["base"]  # the string ckpt.pt records
    (out / "ckpt.pt").unlink()
    original = torch.load(base, weights_only=True)
    other = {**original, "model": {n: t + 1e-4 if n.startswith("layers.0.") else t
                                   for n, t in original["model"].items()}}
    return out, base, original, other


def test_an_adapter_alone_rescored_on_another_base_is_refused_and_on_its_own_is_scored_keeping_its_base(
        run_data, tmp_path, capsys):
    """A run kept as its adapter.pt and results.json alone was re-scored on any base of the same shape without a word
    (only ckpt.pt recorded the base): noise scores. results.json records the base's fingerprint, and keeps it."""
    out, base, original, other = scored_run_on_a_base_of_its_own(run_data, tmp_path)
    rescore = train_flags(run_data, out, f"--init_from={base}", "--eval_only=True", "--eval_limit=1")
    recorded = json.loads((out / "results.json").read_text())["base"]
    torch.save(other, base)
    before = every_file(tmp_path)
    fails(rescore, capsys, f"the base model at {base} is not the one {out}/adapter.pt was trained on (its weights "
          "differ from those the results.json beside it records); point --init_from at that base.")
    assert every_file(tmp_path) == before  # nothing written
    torch.save(original, base)  # its own: scored, and the rewritten results.json still records it
    train.train(train.parse_config(rescore))
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["eval_only"] is True and results["base"] == recorded


def test_the_dry_run_refuses_an_adapter_alone_on_another_base_in_the_sentence_of_the_run(run_data, tmp_path, capsys):
    """A dry run of an adapter.pt's re-scoring on a base other than its own passed, which the run then refused: the
    dry run reads a base model.pt of ours anyway, so it checks it too, in the same sentence, writing nothing."""
    out, base, original, other = scored_run_on_a_base_of_its_own(run_data, tmp_path)
    rescore = train_flags(run_data, out, f"--init_from={base}", "--eval_only=True", "--eval_limit=1")
    train.main([*rescore, "--dry_run=True"])  # its own base: passes
    capsys.readouterr()
    torch.save(other, base)
    before = every_file(tmp_path)
    run = fails(rescore, capsys, f"the base model at {base} is not the one {out}/adapter.pt was trained on")
    assert fails([*rescore, "--dry_run=True"], capsys) == run
    assert every_file(tmp_path) == before


def test_an_adapter_alone_whose_results_json_of_an_older_train_py_records_no_base_is_scored_and_records_it(
        run_data, tmp_path, capsys):
    """A results.json written before it recorded the base: the adapter is scored on the base given, as before, and
    the results.json rewritten records that base from then on (the run's own is then the other one)."""
    out, base, original, other = scored_run_on_a_base_of_its_own(run_data, tmp_path)
    rescore = train_flags(run_data, out, f"--init_from={base}", "--eval_only=True", "--eval_limit=1")
    results = json.loads((out / "results.json").read_text())
    own = results.pop("base")
    (out / "results.json").write_text(json.dumps(results))
    torch.save(other, base)
    train.train(train.parse_config(rescore))
    rescored = json.loads((out / "results.json").read_text())
    assert rescored["config"]["eval_only"] is True and isinstance(rescored["base"], str) and rescored["base"] != own
    torch.save(original, base)
    fails(rescore, capsys, f"the base model at {base} is not the one {out}/adapter.pt was trained on")


def test_a_checkpoint_or_adapter_holding_nan_or_inf_is_refused_by_resume_eval_only_and_sample(run_data, tmp_path,
                                                                                               capsys):
    """train.py never saves a diverged step, so a NaN or an infinity in ckpt.pt or adapter.pt is damage: it was
    loaded without a word, and a resume trained on NaN while eval_only and sample.py answered noise."""
    import sample
    out = finished_run(run_data, tmp_path / "run")
    ckpt, adapter = torch.load(out / "ckpt.pt", weights_only=True), torch.load(out / "adapter.pt", weights_only=True)
    name = sorted(n for n in adapter if n.endswith("lora_B"))[1]
    for bad in (float("nan"), float("inf")):
        torch.save({**ckpt, "state": {**ckpt["state"], name: ckpt["state"][name].index_fill(0, torch.tensor([3]),
                                                                                           bad)}}, out / "ckpt.pt")
        fails([f"--out_dir={out}", "--init_from=resume", "--max_iters=6"], capsys, f"{out}/ckpt.pt holds NaN or "
              f"infinite values ({name}), which train.py never saves")
        with pytest.raises(train.UserError, match=f"ckpt.pt holds NaN or infinite values \\({name}\\)"):
            sample.load_run(str(out))
    (out / "ckpt.pt").unlink()  # eval_only scores adapter.pt alone
    torch.save({**adapter, name: adapter[name] * float("nan")}, out / "adapter.pt")
    fails(train_flags(run_data, out, "--eval_only=True"), capsys, f"{out}/adapter.pt holds NaN or infinite values")
    torch.save(adapter, out / "adapter.pt")  # the run's own: scored
    train.main(train_flags(run_data, out, "--eval_only=True", "--eval_limit=1"))


@pytest.mark.parametrize("adapter", ["teamlora", "lora"])
def test_a_checkpoint_whose_finite_weights_overflow_is_refused_by_sample_and_eval_only_not_answered_in_nan(
        run_data, tmp_path, capsys, adapter):
    """Weights too large to multiply (finite, so loading passes them) made NaN logits: sample.py answered " ⁇ " with
    expert shares of nan greedily and a traceback from torch.multinomial when sampling; eval_only scored every task
    0 and then failed on the NaN load. Each is one sentence now, before anything is answered, and the run unchanged."""
    import sample
    out = finished_run(run_data, tmp_path / "run", f"--adapter={adapter}")
    ckpt, adapter = torch.load(out / "ckpt.pt", weights_only=True), torch.load(out / "adapter.pt", weights_only=True)
    big = {n: torch.full_like(t, 3e38) if n.endswith(("lora_A", "lora_B")) else t for n, t in ckpt["state"].items()}
    assert all(torch.isfinite(t).all() for t in big.values() if t.is_floating_point())
    torch.save({**ckpt, "state": big}, out / "ckpt.pt")
    torch.save({n: big[n] for n in adapter}, out / "adapter.pt")  # the same weights: scored without a note
    before = contents(out)
    sentence = f"the run in {out} gives NaN or infinite outputs, though its weights are finite"
    for flags in ([], ["--temperature=1"]):
        err = script_error(sample.main, ["--out_dir", out, "--instruction", "hi", "--max_new_tokens=3", *flags],
                           capsys)
        assert sentence in err and "nan" not in err.replace("NaN", ""), err
    fails(train_flags(run_data, out, "--eval_only=True"), capsys, sentence)
    assert contents(out) == before  # no results.json of scores on NaN


def test_outputs_with_one_nan_or_infinite_value_among_finite_ones_are_refused_as_wholly_nan_ones_are():
    """One overflowing logit (a single weight large enough) damages the answers of its prompt as all of them would:
    refused too, and finite outputs pass."""
    r, tokens = train.Run({"out_dir": "run"}), torch.zeros(2, 3, dtype=torch.long)
    for bad in (float("nan"), float("inf"), float("-inf")):
        logits = torch.zeros(2, 1, 5)
        logits[1, 0, 3] = bad
        with pytest.raises(train.UserError, match="^the run in run gives NaN or infinite outputs, though its weights"):
            evaluation.run_checked(lambda t, logits_to_keep, out=logits: (out, None), tokens, r)
    evaluation.run_checked(lambda t, logits_to_keep: (torch.zeros(2, 1, 5), None), tokens, r)


def test_a_checkpoint_holding_nan_or_inf_in_several_tensors_names_the_first_three_of_them():
    """The message shows how far the damage goes (a few names, in the checkpoint's order), and only damaged tensors:
    a finite one, or an integer one, is not named."""
    import checkpoint
    values = [float("nan"), 1.0, float("-inf"), float("nan"), float("inf")]
    state = {f"layers.{i}.attn.wq.lora_B": torch.full((2, 3), v) for i, v in enumerate(values)}
    state["layers.9.steps"] = torch.arange(3)
    with pytest.raises(train.UserError) as error:
        checkpoint.load_state(torch.nn.Linear(3, 2), state, {"adapter": "teamlora"}, "run/ckpt.pt")
    assert str(error.value).startswith("run/ckpt.pt holds NaN or infinite values (layers.0.attn.wq.lora_B, "
                                       "layers.2.attn.wq.lora_B, layers.3.attn.wq.lora_B), which train.py never saves")


def test_a_run_scored_or_sampled_before_its_last_step_says_so_and_a_resume_at_its_last_says_nothing_is_left(
        run_data, tmp_path, capsys):
    """Scores and answers of a run stopped by Ctrl-C (or still training) are not its last: sample.py and
    --eval_only=True say so; a resume of a finished run only scores it again, and says so too. A resume that trains
    on, or a scoring of a finished run, has nothing to add."""
    import sample
    out = tmp_path / "run"
    train.train(train.parse_config(train_flags(run_data, out, "--eval_dir=", "--max_iters=2")))
    capsys.readouterr()
    sample.load_run(str(out))
    train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume"]))
    captured = capsys.readouterr()
    assert "note:" not in captured.err and f"resumed from {out}/ckpt.pt at step 2, its last: nothing to train, " \
        "scoring it (raise --max_iters to train on)" in captured.out
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "max_iters": 4}}, out / "ckpt.pt")  # as if stopped at 2 of 4
    sample.load_run(str(out))
    assert f"note: the run in {out} is at step 2 of its 4 (it stopped, or is still training)" in capsys.readouterr().err
    train.train(train.parse_config([f"--out_dir={out}", "--eval_only=True", f"--eval_dir={run_data / 'test'}",
                                    "--eval_limit=1"]))
    assert f"resumed from {out}/ckpt.pt at step 2, before its last (4): the run stopped" in capsys.readouterr().out
    train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume"]))  # trains on: no note
    assert f"resumed from {out}/ckpt.pt at step 2\n" in capsys.readouterr().out
    train.train(train.parse_config([f"--out_dir={out}", "--eval_only=True", f"--eval_dir={run_data / 'test'}",
                                    "--eval_limit=1"]))
    assert f"resumed from {out}/ckpt.pt at step 4\n" in capsys.readouterr().out  # its last: no note either


def test_demo_files_deleted_by_hand_are_named_with_the_demos_own_fix(tmp_path, monkeypatch, capsys):
    """data.py's messages name its own flags (--input): the demo's files are train.py's to build again."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(minicme.PRETRAIN, "model", "tiny")
    minicme.build_demo_data(train.DEFAULTS)  # the suite and its shards, as a first run leaves them
    root = tmp_path / minicme.ROOT
    for gone, made_of_it in [("tokenizer.model", ()), ("test", ()), ("corpus.txt", ("corpus_tokens",)),
                             ("train.jsonl", ("tokens",))]:
        path = root / gone
        os.replace(path, tmp_path / gone)
        for folder in made_of_it:  # gone too, or the file would not be read
            os.replace(root / folder, tmp_path / folder)
        err = fails(["--model=tiny"], capsys, f"the demo's files in {minicme.ROOT} are incomplete",
                    f"{minicme.ROOT}/{gone}", f"delete {minicme.ROOT} and run again")
        assert "--input" not in err and "of your checkpoint" not in err
        if gone != "train.jsonl":
            os.replace(tmp_path / gone, path)


def test_a_demo_run_while_another_builds_the_demos_files_is_told_to_wait_not_to_delete_them(tmp_path, monkeypatch,
                                                                                           capsys):
    """Two first runs at once: the second found the suite's folder held by the first's build, and was told that the
    demo's files are incomplete and to delete them, under the live build."""
    monkeypatch.chdir(tmp_path)
    live = held_by_another_process(tmp_path / minicme.ROOT)
    try:
        err = fails(["--model=tiny"], capsys, f"{minicme.ROOT} is being built by process {live.pid}; wait")
        assert "delete" not in err and not (tmp_path / minicme.ROOT / "suite.json").exists()
    finally:
        live.kill()
        live.wait()


def test_a_demo_run_while_another_pretrains_the_demos_base_is_told_to_wait_not_to_choose_another_out_dir(
        run_data, tmp_path, monkeypatch, capsys):
    """Two first runs minutes apart: the second found the pretraining's folder held by the first, and was told to
    choose another --out_dir, where its own out_dir was not in the way."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / minicme.ROOT
    for made in ("tokens", "corpus_tokens"):  # what the first run made before its pretraining
        (root / made).mkdir(parents=True)
        (root / made / "summary.json").write_text("{}")
    (root / "suite.json").write_text(json.dumps({"version": minicme.VERSION}))
    shutil.copy(run_data / "tokenizer.model", root)  # made with the suite (missing: its files are incomplete)
    live = held_by_another_process(tmp_path / minicme.PRETRAIN["out_dir"])
    try:
        err = fails(["--model=tiny", "--out_dir=out/second"], capsys,
                    f"the demo's base is being pretrained by process {live.pid} (in {minicme.PRETRAIN['out_dir']}); "
                    "wait for it to end, then run again.")
        assert "--out_dir" not in err and not (tmp_path / "out" / "second").exists()
    finally:
        live.kill()
        live.wait()


def test_the_first_demo_run_warns_of_cut_answers_once_not_before_and_after_its_pretraining(tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(minicme.PRETRAIN, "model", "tiny")
    monkeypatch.setitem(minicme.PRETRAIN, "max_iters", 2)
    minicme.build_demo_data(train.DEFAULTS)
    max_len = int(np.median(train.data.TokenDataset(minicme.DEMO["data_dir"], "train").lengths))
    train.train(train.parse_config(["--model=tiny", f"--max_len={max_len}", "--max_iters=1", "--eval_dir="]))
    assert capsys.readouterr().err.count("cuts away the whole answer") == 1


def demo_run_without_its_base(tmp_path, monkeypatch):
    """A tiny demo run of one step in tmp_path, made the current folder, and the path of its base, deleted: what the
    next run there pretrains again, for minutes, unless a check stops it first."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(minicme.PRETRAIN, "model", "tiny")
    monkeypatch.setitem(minicme.PRETRAIN, "max_iters", 2)
    train.main(["--model=tiny", "--max_len=128", "--batch_size=4", "--eval_dir=", "--max_iters=1"])
    base = tmp_path / minicme.DEMO["init_from"]
    base.unlink()
    return base


def test_a_resume_or_eval_only_on_a_deleted_demo_base_is_checked_as_such_before_the_base_is_pretrained_again(
        tmp_path, monkeypatch, capsys):
    """A resume's out_dir is its own (not "already holds a run; continue it with --init_from=resume"), and eval_only
    of an out_dir without adapter.pt is refused before the minutes of pretraining the demo's base, not after."""
    base = demo_run_without_its_base(tmp_path, monkeypatch)
    fails(["--eval_only=True", "--out_dir=elsewhere"], capsys, "elsewhere/adapter.pt does not exist")
    assert not base.exists()
    train.main(["--init_from=resume", "--max_iters=2"])  # the base is built again, as the run's own
    assert "resumed from out/demo/ckpt.pt at step 1" in capsys.readouterr().out and base.is_file()
    # a finished run kept as its adapter.pt alone is scored, not refused as a run that eval_only would replace
    base.unlink()
    (tmp_path / "out/demo/ckpt.pt").unlink()
    train.main(["--eval_only=True", "--model=tiny", "--max_len=128", "--batch_size=4", "--max_iters=2",
                f"--eval_dir={minicme.DEMO['eval_dir']}", "--eval_limit=1"])
    assert base.is_file() and (tmp_path / "out/demo/results.json").is_file()


def test_eval_only_of_a_run_whose_ckpt_pt_outlived_its_adapter_pt_scores_the_checkpoint_on_a_demo_base_made_again(
        tmp_path, monkeypatch, capsys):
    """A kill between the writes of ckpt.pt and adapter.pt leaves ckpt.pt alone: re-scoring reads the adapter from
    it, so the checks before the demo's base is pretrained again do not ask for an adapter.pt."""
    demo_run_without_its_base(tmp_path, monkeypatch)
    (tmp_path / "out/demo/adapter.pt").unlink()
    train.main(["--eval_only=True", f"--eval_dir={minicme.DEMO['eval_dir']}", "--eval_limit=1"])
    assert "resumed from out/demo/ckpt.pt at step 1" in capsys.readouterr().out
    assert (tmp_path / "out/demo/results.json").is_file()


def test_a_run_stopped_before_its_first_step_resumes_from_its_checkpoint_of_step_0(run_data, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM while the first batch is read writes a checkpoint of step 0 (and says to resume it): a
    resume takes that file as the run's own, not as a damaged one."""
    real = train.data.get_batch

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train.data, "get_batch", interrupted)
    out = tmp_path / "run"
    stopped = train.train(train.parse_config(train_flags(run_data, out, "--eval_dir=", "--max_iters=2")))
    assert stopped["interrupted"] and stopped["step"] == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 0 and ckpt["validated"] is True  # no validation of step 0 was cut short: none runs
    monkeypatch.setattr(train.data, "get_batch", real)
    resumed = train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume", "--max_iters=2"]))
    assert resumed["step"] == 2 and not resumed.get("interrupted")


KILLED_IN_A_WRITE = """import os, signal, sys, files
real = files.write_atomic

def killed(path, content):  # kill -9 in the middle of the write of this file: its temporary stays
    if os.path.basename(path) == sys.argv[1]:
        with open(f"{path}.tmp{os.getpid()}", "wb") as f:
            f.write(b"the first bytes")
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, content)

files.write_atomic = killed
import train
train.main(sys.argv[2:])
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_a_resume_killed_while_it_rewrites_the_log_leaves_no_temporary_once_resumed_again(run_data, tmp_path):
    """A resume first rewrites log.jsonl without the steps a kill logged past the checkpoint (checkpoint.open_log,
    through files.write_atomic). Killed in that write, it leaves log.jsonl.tmpPID beside the old log: the next run
    in out_dir removes it, as it does a killed checkpoint's, rather than leave it there for good."""
    out = finished_run(run_data, tmp_path / "run", "--log_interval=1")
    log = out / "log.jsonl"
    log.write_text(log.read_text() + json.dumps({"step": 5, "loss": -1.0}) + "\n")  # past the checkpoint of step 4
    logged = log.read_bytes()
    resume = [f"--out_dir={out}", "--init_from=resume", "--max_iters=6"]
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_A_WRITE, "log.jsonl", *resume], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list(out.glob("log.jsonl.tmp*"))) == 1 and log.read_bytes() == logged  # the old log, whole
    assert train.main(resume) is None
    assert not list(out.glob("*.tmp*"))
    trained = [(e["step"], e["loss"]) for e in map(json.loads, log.read_text().splitlines()) if "loss" in e]
    assert [step for step, _ in trained] == list(range(1, 7)) and trained[4][1] > 0  # the killed session's step 5 went


def test_a_users_files_named_like_temporaries_in_out_dir_are_kept_byte_for_byte(run_data, tmp_path):
    """A run removes what its own killed writes left (ckpt.pt.tmpPID of a process that no longer runs), never a
    user's file in out_dir that only looks like one: another name, or one of ours with more after the PID."""
    out = tmp_path / "mine"
    out.mkdir()
    users = {"notes.tmp999999": b"my notes", "ckpt.pt.tmp999999.bak": b"my backup", "results.json.tmp999999x": b"x"}
    for name, content in users.items():
        (out / name).write_bytes(content)
    (out / "adapter.pt.tmp999999").write_bytes(b"half an adapter of a process that was killed")
    train.main(train_flags(run_data, out, "--eval_dir=", "--max_iters=1"))
    assert not (out / "adapter.pt.tmp999999").exists()
    assert {name: (out / name).read_bytes() for name in users} == users


def test_train_gives_the_callers_sigterm_handler_back(run_data, tmp_path):
    """study.py calls train.train run after run in one process: once a run is over, a SIGTERM must reach the caller's
    own handler again, not raise a KeyboardInterrupt that no run is there to turn into a checkpoint."""
    def callers(signum, frame):
        pass
    before = signal.signal(signal.SIGTERM, callers)
    try:
        train.train(train.parse_config(train_flags(run_data, tmp_path / "a", "--eval_dir=", "--max_iters=1")))
        assert signal.getsignal(signal.SIGTERM) is callers
        with pytest.raises(train.UserError):  # a refused run gives it back too
            train.train(train.parse_config(train_flags(run_data, tmp_path / "a", "--eval_dir=", "--max_iters=1")))
        assert signal.getsignal(signal.SIGTERM) is callers
    finally:
        signal.signal(signal.SIGTERM, before)


def _signals_at(monkeypatch, at_step, *signums):
    """Send this process `signums` while global batch `at_step` is read: in the middle of that optimizer step."""
    real = train.data.get_batch

    def get_batch(dataset, step, *a, **k):
        if step == at_step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return real(dataset, step, *a, **k)
    monkeypatch.setattr(train.data, "get_batch", get_batch)


@pytest.mark.parametrize("signums", [(signal.SIGINT,), (signal.SIGTERM,), (signal.SIGTERM, signal.SIGTERM),
                                     (signal.SIGINT, signal.SIGTERM)])
def test_ctrl_c_or_sigterm_mid_step_ends_that_step_then_checkpoints_it_as_an_uninterrupted_run_has_it(
        run_data, tmp_path, monkeypatch, capsys, signums):
    """A signal inside step 4 (0-based) lets the step finish: the checkpoint holds step 5 exactly as a run of 5 steps
    ends, not half an update. A second signal that is SIGTERM (torchrun passes the terminal's Ctrl-C on as one)
    does not cut the step short."""
    flags = ("--eval_dir=", "--eval_interval=3", "--dropout=0.1", "--lr_decay_iters=6", "--threads=1")  # rounding
    whole = train.train(train.parse_config(train_flags(run_data, tmp_path / "whole", *flags, "--max_iters=5")))
    _signals_at(monkeypatch, 4, *signums)
    stopped = train.train(train.parse_config(train_flags(run_data, tmp_path / "run", *flags)))
    assert stopped["interrupted"] and stopped["step"] == 5
    assert "stopping after this step" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 5 and ckpt["state"].keys() == adapters_of(whole["model"]).keys()
    assert_same_adapters(adapters_of(whole["model"]), ckpt["state"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back after the loop


@pytest.mark.parametrize("flags", [["--eval_only=True"], ["--init_from=resume", "--dry_run=True"]], ids=" ".join)
def test_a_re_scoring_or_a_dry_run_refuses_a_tokenizer_replaced_in_place_by_another_of_its_size(run_data, tmp_path,
                                                                                                  flags):
    """A re-scoring reads no shards, against which a resume checks the tokenizer: one replaced at the run's path by
    another of the same size (shards prepared again with it) scored the adapter in ids it never saw, without a word.
    ckpt.pt's SHA-256 of it is checked, as sample.py checks it; and by a resume's dry run, which loads no weights."""
    tok, out, shards = tmp_path / "tok.model", tmp_path / "run", tmp_path / "tokens"
    shutil.copy(run_data / "tokenizer.model", tok)
    data.prepare([str(run_data / "train.jsonl")], str(tok), str(shards), max_len=128, val_fraction=0.1, quiet=True)
    train.train(train.parse_config(train_flags(run_data, out, f"--tokenizer={tok}", f"--data_dir={shards}",
                                               "--max_iters=2")))
    minicme.make_suite(str(tmp_path / "other"), seed=1, n_train_per_task=4, n_test_per_task=2, n_val_per_task=2,
                       corpus_docs=400)  # another world's text: another tokenizer of the same vocab_size
    other = tmp_path / "other" / "tokenizer.model"
    assert data.Tokenizer(str(other)).vocab_size == data.Tokenizer(str(tok)).vocab_size
    shutil.copy(other, tok)
    shutil.rmtree(shards)
    data.prepare([str(run_data / "train.jsonl")], str(tok), str(shards), max_len=128, val_fraction=0.1, quiet=True)
    with pytest.raises(train.UserError, match=rf"^the tokenizer at {tok} is not the one this run was trained with "
                                              rf"\(its SHA-256 differs from the one {out}/ckpt.pt records\)"):
        train.train(train.parse_config([f"--out_dir={out}", *flags]))


def test_a_run_that_failed_before_it_logged_a_step_is_not_in_the_way_of_the_next(run_data, tmp_path, monkeypatch):
    """Out of memory at step 1 (a batch too large) left an empty log.jsonl, and the run again with a smaller batch
    was refused: "already holds a run (log.jsonl); ... pass --overwrite=True". An empty log holds nothing to lose;
    one with a step in it is a run's."""
    out = tmp_path / "run"

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "train_step", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        train.train(train.parse_config(train_flags(run_data, out, "--eval_dir=")))
    assert (out / "log.jsonl").read_bytes() == b"" and not (out / "ckpt.pt").exists()
    monkeypatch.undo()
    assert train.train(train.parse_config(train_flags(run_data, out, "--eval_dir=", "--log_interval=1")))["step"] == 6
    assert len((out / "log.jsonl").read_text().splitlines()) == 6 + 2  # six steps and two validations, once each
    (out / "ckpt.pt").unlink()
    (out / "adapter.pt").unlink()  # a log with steps in it and nothing else is still a run's
    with pytest.raises(train.UserError, match=r"already holds a run \(log\.jsonl\)"):
        train.train(train.parse_config(train_flags(run_data, out, "--eval_dir=")))
    (out / "log.jsonl").unlink()
    (tmp_path / "mine.txt").write_text("")
    (out / "log.jsonl").symlink_to(tmp_path / "mine.txt")  # empty, but a link: the run would write into the user's file
    with pytest.raises(train.UserError, match=r"already holds a run \(log\.jsonl\)"):
        train.train(train.parse_config(train_flags(run_data, out, "--eval_dir=")))
    assert (tmp_path / "mine.txt").read_text() == ""


def test_a_run_started_with_ctrl_c_ignored_leaves_it_ignored_and_still_stops_on_sigterm(run_data, tmp_path,
                                                                                       monkeypatch):
    """`python train.py &` in a script starts with SIGINT ignored: a Ctrl-C meant for the script in
    the foreground stopped the run too (it took SIGINT as its own). A SIGTERM still stops it after its step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # conftest's fixture puts back what it found
    _signals_at(monkeypatch, 4, signal.SIGINT)
    done = train.train(train.parse_config(train_flags(run_data, tmp_path / "a", "--eval_dir=")))
    assert not done.get("interrupted") and done["step"] == 6 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    _signals_at(monkeypatch, 4, signal.SIGINT, signal.SIGTERM)
    stopped = train.train(train.parse_config(train_flags(run_data, tmp_path / "b", "--eval_dir=")))
    assert stopped["interrupted"] and stopped["step"] == 5 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_handler_set_outside_python_is_left_in_place_as_it_could_not_be_put_back(monkeypatch):
    """Where a program embedding Python set a signal's handler, Python reports None and cannot restore it:
    StopAfterStep.restore failed with a TypeError at the end of the loop (signal.signal(s, None))."""
    monkeypatch.setattr(machine.signal, "getsignal", lambda signum: None)
    monkeypatch.setattr(machine.signal, "signal", lambda signum, handler: pytest.fail("a handler was replaced"))
    stop = machine.StopAfterStep(True).install()
    stop.restore()
    with machine.sigterm_as_ctrl_c():
        pass
    assert stop.old == {}


def test_a_run_started_with_sigterm_ignored_leaves_it_ignored_outside_its_loop_too(run_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build_demo", lambda cfg, resuming=False: os.kill(os.getpid(), signal.SIGTERM))
    _signals_at(monkeypatch, 4, signal.SIGTERM)
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        done = train.train(train.parse_config(train_flags(run_data, tmp_path / "a", "--eval_dir=")))
        assert not done.get("interrupted") and done["step"] == 6
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint_not_half_a_step(run_data, tmp_path,
                                                                                     monkeypatch, capsys):
    """Not under torchrun: it passes the terminal's Ctrl-C on to processes that got it already (two each)."""
    _signals_at(monkeypatch, 4, signal.SIGINT, signal.SIGINT)
    stopped = train.train(train.parse_config(train_flags(run_data, tmp_path / "run", "--eval_dir=")))
    assert stopped["interrupted"] and stopped["step"] == 3  # eval_interval=3: the checkpoint of step 3
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["iter"] == 3
    assert "stopped at once: the checkpoint of step 3 in" in capsys.readouterr().out
    # resumed, then stopped at once before its next checkpoint: the one it resumed from is kept, not "start again"
    resumed = train.train(train.parse_config([f"--out_dir={tmp_path / 'run'}", "--init_from=resume"]))
    assert resumed["interrupted"] and resumed["step"] == 3
    out = capsys.readouterr().out
    assert "stopped at once: the checkpoint of step 3 in" in out and "--overwrite" not in out
    real_init = machine.StopAfterStep.__init__
    monkeypatch.setattr(machine.StopAfterStep, "__init__", lambda self, *args, **kwargs: (
        real_init(self, *args, **kwargs), setattr(self, "forcible", False))[0])  # as torchrun's
    assert train.train(train.parse_config(train_flags(run_data, tmp_path / "tr", "--eval_dir=")))["step"] == 5


def test_a_second_ctrl_c_while_the_stops_checkpoint_is_written_keeps_the_last_one_without_a_traceback(
        run_data, tmp_path, monkeypatch, capsys):
    _signals_at(monkeypatch, 4, signal.SIGINT)
    real = train.checkpoint.save_checkpoint

    def save(r, raw, opt, step, **kw):
        if step == 5:  # the stop's checkpoint: Ctrl-C again while it is written
            os.kill(os.getpid(), signal.SIGINT)
        return real(r, raw, opt, step, **kw)
    monkeypatch.setattr(train.checkpoint, "save_checkpoint", save)
    stopped = train.train(train.parse_config(train_flags(run_data, tmp_path / "run", "--eval_dir=")))
    assert stopped["interrupted"] and stopped["step"] == 3
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["iter"] == 3
    assert "the checkpoint of step 3 in" in capsys.readouterr().out


def test_a_second_ctrl_c_while_ckpt_pt_itself_is_written_names_the_last_one_kept_not_that_step_as_written(
        run_data, tmp_path, monkeypatch, capsys):
    """The run's checkpoint is the step whose ckpt.pt was written (r.written), not the one whose write began: a second
    Ctrl-C inside the stop's ckpt.pt write keeps step 3's, and the stop says so, not that step 5's was written."""
    _signals_at(monkeypatch, 4, signal.SIGINT)
    real = train.checkpoint.save_atomic

    def save_atomic(obj, path):
        if os.path.basename(path) == "ckpt.pt" and obj["iter"] == 5:  # the stop's own ckpt.pt: Ctrl-C again
            os.kill(os.getpid(), signal.SIGINT)
        return real(obj, path)
    monkeypatch.setattr(train.checkpoint, "save_atomic", save_atomic)
    stopped = train.train(train.parse_config(train_flags(run_data, tmp_path / "run", "--eval_dir=")))
    assert stopped["interrupted"] and stopped["step"] == 3
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["iter"] == 3
    out = capsys.readouterr().out
    assert "the checkpoint of step 3 in" in out and "step 5 written" not in out, out


def test_a_second_ctrl_c_inside_torch_saves_own_write_is_a_stop_at_once_not_a_traceback(run_data, tmp_path,
                                                                                      monkeypatch, capsys):
    """Found by a fuzz of signals sent to train.py: a KeyboardInterrupt raised while torch.save's zip writer writes
    made its closing fail ("RuntimeError: [enforce fail at inline_container.cc] unexpected pos"), which hid the
    Ctrl-C: a traceback and exit code 1 instead of a stop at once keeping the last checkpoint."""
    _signals_at(monkeypatch, 4, signal.SIGINT)
    real, writes = train.checkpoint.files.write_atomic, []

    class CtrlCAgain:  # the file torch.save writes into: Ctrl-C again at its second write
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += 1
            if self.n == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def write_atomic(path, content):
        writes.append(os.path.basename(path))
        stops = writes.count("ckpt.pt") == 2 and writes[-1] == "ckpt.pt"  # step 5's, the stop's: step 3's was first
        return real(path, (lambda f: content(CtrlCAgain(f))) if stops else content)
    monkeypatch.setattr(train.checkpoint.files, "write_atomic", write_atomic)
    stopped = train.train(train.parse_config(train_flags(run_data, tmp_path / "run", "--eval_dir=")))
    assert stopped["interrupted"] and stopped["step"] == 3
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["iter"] == 3
    assert not [n for n in os.listdir(tmp_path / "run") if ".tmp" in n]  # the cut write left no temporary
    assert "the checkpoint of step 3 in" in capsys.readouterr().out


def test_a_second_ctrl_c_after_the_checkpoints_ckpt_pt_is_written_names_it_and_a_resume_goes_on_from_it(
        run_data, tmp_path, monkeypatch, capsys):
    """Cut short while adapter.pt is written, a new run's first checkpoint stands in ckpt.pt: the stop must offer to
    resume it, not say that nothing was saved and to start again with --overwrite=True (which would discard it)."""
    flags = ("--eval_dir=", "--dropout=0.1", "--threads=1")
    whole = train.train(train.parse_config(train_flags(run_data, tmp_path / "whole", *flags)))
    real = train.checkpoint.save_weights

    def save_weights(r, state):  # the first checkpoint's adapter.pt (step 3): Ctrl-C twice
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real(r, state)
    monkeypatch.setattr(train.checkpoint, "save_weights", save_weights)
    stopped = train.train(train.parse_config(train_flags(run_data, tmp_path / "run", *flags)))
    out = capsys.readouterr().out
    assert stopped["interrupted"] and stopped["step"] == 3 and not (tmp_path / "run" / "adapter.pt").exists()
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["iter"] == 3
    assert "checkpoint of step 3 written" in out and "--init_from=resume" in out and "--overwrite" not in out
    monkeypatch.undo()
    resumed = train.train(train.parse_config([f"--out_dir={tmp_path / 'run'}", "--init_from=resume"]))
    assert resumed["step"] == 6
    assert_same_adapters(adapters_of(whole["model"]), torch.load(tmp_path / "run" / "adapter.pt", weights_only=True))


def test_a_resume_after_a_stop_at_once_logs_each_step_once_as_the_uninterrupted_run_does(run_data, tmp_path,
                                                                                          monkeypatch):
    """A second Ctrl-C (or a kill) leaves log lines of steps past the checkpoint, which the resume trains and logs
    again: it drops them first, so that the log holds each step once (study.py averages curves line by line), and
    keeps the lines up to the checkpoint as they were."""
    flags = ("--eval_dir=", "--log_interval=1", "--dropout=0.1", "--threads=1")

    def logged(out):
        return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train.train(train.parse_config(train_flags(run_data, tmp_path / "whole", *flags)))
    _signals_at(monkeypatch, 4, signal.SIGINT, signal.SIGINT)  # in step 5: the checkpoint of step 3 stands
    assert train.train(train.parse_config(train_flags(run_data, tmp_path / "run", *flags)))["step"] == 3
    before = logged(tmp_path / "run")
    assert [line["step"] for line in before if "loss" in line] == [1, 2, 3, 4]
    monkeypatch.undo()
    train.train(train.parse_config([f"--out_dir={tmp_path / 'run'}", "--init_from=resume"]))
    after, whole = logged(tmp_path / "run"), logged(tmp_path / "whole")
    assert [(d["step"], d.get("loss"), d.get("val_loss")) for d in after] == \
        [(d["step"], d.get("loss"), d.get("val_loss")) for d in whole]
    assert after[:4] == before[:4]  # steps 1 to 3 (and step 3's validation) as first written, times and all


def _signals_in_validation(monkeypatch, at_step, *signums):
    """Send this process `signums` once, while batch 1 of the validation after step `at_step` is read (0: before the
    process's first step, a resume's); returns the validation batches read, as (step, batch)."""
    real, read, trained = train.data.get_batch, [], [0]

    def get_batch(dataset, i, *a, **k):
        if dataset.split_name == "training":
            trained[0] = i + 1  # global batch i is step i + 1
        else:
            read.append((trained[0], i))
            if read[-1] == (at_step, 1) and read.count(read[-1]) == 1:
                for signum in signums:
                    os.kill(os.getpid(), signum)
        return real(dataset, i, *a, **k)
    monkeypatch.setattr(train.data, "get_batch", get_batch)
    return read


def logged(out):
    return [(d["step"], d.get("loss"), d.get("val_loss")) for d in
            map(json.loads, (out / "log.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("signum, at_step", [(signal.SIGTERM, 3), (signal.SIGINT, 6)])
def test_a_stop_while_validating_ends_it_at_the_next_batch_and_a_resume_validates_that_step_as_the_whole_run_did(
        run_data, tmp_path, monkeypatch, capsys, signum, at_step):
    """A 7B run validates for tens of seconds before the checkpoint of its step, and a cluster kills a job 30 to 60 s
    after its SIGTERM: a stop there waited for the whole validation, and the run could die without that checkpoint.
    It ends the validation before its next batch and writes the checkpoint, which says its validation was cut short;
    a resume validates that step again (stopped there too, it keeps that checkpoint as it was), so that its log and
    results are the uninterrupted run's (step 6: the last)."""
    flags = ("--eval_iters=3", "--log_interval=1", "--dropout=0.1", "--threads=1")
    whole = train.train(train.parse_config(train_flags(run_data, tmp_path / "whole", *flags)))
    read, out = _signals_in_validation(monkeypatch, at_step, signum), tmp_path / "run"
    stopped = train.train(train.parse_config(train_flags(run_data, out, *flags)))
    assert stopped["interrupted"] and stopped["step"] == at_step
    assert [i for step, i in read if step == at_step] == [0, 1]  # not batch 2
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == at_step and ckpt["validated"] is False and not (out / "results.json").exists()
    step, loss, val_loss = logged(out)[-1]
    assert step == at_step and loss is not None and val_loss is None  # its loss, not its validation loss
    assert f"interrupted: checkpoint of step {at_step} written to {out}" in capsys.readouterr().out
    monkeypatch.undo()
    before, read = logged(out), _signals_in_validation(monkeypatch, 0, signum)  # the resume's validation, stopped too
    again = train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume"]))
    assert again["interrupted"] and again["step"] == at_step and read == [(0, 0), (0, 1)] and logged(out) == before
    assert torch.load(out / "ckpt.pt", weights_only=True)["validated"] is False
    monkeypatch.undo()
    read = _signals_in_validation(monkeypatch, None)  # no signal: the batches it reads
    resumed = train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume"]))
    assert not resumed.get("interrupted") and resumed["step"] == 6
    # each validation once: the resume's first gives the loss that the run is scored with when no step is left
    assert read == [(0, i) for i in range(3)] + ([(6, i) for i in range(3)] if at_step < 6 else [])
    assert logged(out) == logged(tmp_path / "whole")
    assert_same_adapters(adapters_of(whole["model"]), adapters_of(resumed["model"]))
    assert torch.load(out / "ckpt.pt", weights_only=True)["validated"] is True
    results, want = (json.loads((d / "results.json").read_text()) for d in (out, tmp_path / "whole"))
    assert results["val_loss"] == want["val_loss"] == whole["val_loss"]
    assert results["scores"] == want["scores"] and results["expert_load"] == want["expert_load"]


def test_a_stop_during_a_resumes_last_validation_batch_stops_it_after_that_validations_checkpoint(run_data, tmp_path,
                                                                                                   monkeypatch):
    """A resume runs its step's cut-short validation first; a stop that comes after that validation's last check (in
    its last batch, or in the checkpoint after it) stops the run there, as one after a step of the loop does, not
    after a step more."""
    flags = ("--eval_dir=", "--eval_iters=2", "--log_interval=1", "--threads=1")
    out = tmp_path / "run"
    _signals_in_validation(monkeypatch, 3, signal.SIGTERM)  # in the last batch: this validation ends
    assert train.train(train.parse_config(train_flags(run_data, out, *flags)))["step"] == 3
    monkeypatch.undo()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["validated"] is True
    torch.save({**ckpt, "validated": False}, out / "ckpt.pt")  # as if a stop had cut it short
    read = _signals_in_validation(monkeypatch, 0, signal.SIGTERM)
    again = train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume"]))
    assert again["interrupted"] and again["step"] == 3 and read == [(0, 0), (0, 1)]
    assert torch.load(out / "ckpt.pt", weights_only=True)["validated"] is True
    assert [line for line in logged(out) if line[0] > 3] == [] and logged(out)[-1][2] is not None


def test_a_resume_stopped_before_it_writes_a_checkpoint_says_the_one_it_resumed_from_is_kept_not_written(
        run_data, tmp_path, monkeypatch, capsys):
    """A resume stopped in its re-validation of a checkpoint whose validation was cut short, or stopped at once in
    its first step, writes nothing: it said "checkpoint of step 3 written", and the one it resumed from stands."""
    flags = ("--eval_dir=", "--eval_iters=3", "--threads=1")  # a stop in batch 1 of 3: the validation ends there
    out = tmp_path / "run"
    _signals_at(monkeypatch, 4, signal.SIGINT, signal.SIGINT)  # in step 5: the checkpoint of step 3 stands
    assert train.train(train.parse_config(train_flags(run_data, out, *flags)))["step"] == 3
    monkeypatch.undo()
    for validated, stop, said in ((True, lambda: _signals_at(monkeypatch, 3, signal.SIGINT, signal.SIGINT),
                                   "stopped at once"),  # in step 4, the resume's first
                                  (False, lambda: _signals_in_validation(monkeypatch, 0, signal.SIGTERM),
                                   "interrupted")):
        torch.save({**torch.load(out / "ckpt.pt", weights_only=True), "validated": validated}, out / "ckpt.pt")
        before = (out / "ckpt.pt").read_bytes()
        stop()
        capsys.readouterr()
        again = train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume"]))
        assert again["interrupted"] and again["step"] == 3 and (out / "ckpt.pt").read_bytes() == before
        printed = capsys.readouterr().out
        assert f"\n{said}: the checkpoint of step 3 in {out} is kept; continue with --init_from=resume" in printed
        assert "written" not in printed
        monkeypatch.undo()


def test_a_resume_of_a_checkpoint_that_does_not_say_whether_its_step_was_validated_takes_it_as_validated(
        run_data, tmp_path, monkeypatch):
    """A ckpt.pt of a train.py from before validations could be cut short has no "validated": its step's validation
    ran to its end, and a resume does not run it again (a second val_loss line for the step in the log)."""
    flags = ("--eval_dir=", "--log_interval=1", "--threads=1")
    _signals_at(monkeypatch, 4, signal.SIGINT, signal.SIGINT)  # in step 5: the checkpoint of step 3 stands
    out = tmp_path / "run"
    assert train.train(train.parse_config(train_flags(run_data, out, *flags)))["step"] == 3
    monkeypatch.undo()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt.pop("validated") is True
    torch.save(ckpt, out / "ckpt.pt")
    train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume"]))
    train.train(train.parse_config(train_flags(run_data, tmp_path / "whole", *flags)))
    assert logged(out) == logged(tmp_path / "whole")


def test_a_second_ctrl_c_while_validating_stops_at_once_keeping_the_last_checkpoint(run_data, tmp_path, monkeypatch,
                                                                                    capsys):
    """The first Ctrl-C ends the validation at its next batch; a second before then stops at once, as inside a step:
    the last checkpoint stands (step 3's, whose validation was done), and nothing of step 6 is written."""
    flags = ("--eval_dir=", "--eval_iters=3", "--log_interval=1", "--threads=1")
    _signals_in_validation(monkeypatch, 6, signal.SIGINT, signal.SIGINT)
    stopped = train.train(train.parse_config(train_flags(run_data, tmp_path / "run", *flags)))
    assert stopped["interrupted"] and stopped["step"] == 3
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 3 and ckpt["validated"] is True
    assert f"stopped at once: the checkpoint of step 3 in {tmp_path / 'run'} is kept" in capsys.readouterr().out


class _StopAsked:
    """A stop that every process agrees on from its `at`-th asking (1-based); it records each asking."""

    def __init__(self, at):
        self.at, self.askings = at, []

    def agreed(self, device, world):
        self.askings.append((device, world))
        return len(self.askings) >= self.at


def test_validation_asks_the_stop_once_a_batch_and_ends_on_it_on_every_process_alike(run_data, tmp_path,
                                                                                      monkeypatch):
    """Under torchrun each asking is an all-reduce (StopAfterStep.agreed), which every process must make at the same
    batch: once per validation batch, not per micro-batch. A stop ends validation before its next batch, with no
    loss, the model back in training mode; on a process that got no signal too, where another did."""
    cfg = train.parse_config(train_flags(run_data, tmp_path / "o", "--eval_iters=3", "--grad_accum=2"))
    tok = data.Tokenizer(cfg["tokenizer"])
    model, args, _ = train.build_model(cfg, torch.device("cpu"), tok.vocab_size, 1)
    r, val = train.Run(cfg, 0, 1, torch.device("cpu"), tok, args), data.TokenDataset(cfg["data_dir"], "val")
    real, read = data.get_batch, []
    monkeypatch.setattr(data, "get_batch", lambda ds, i, *a, **k: read.append(i) or real(ds, i, *a, **k))
    never = _StopAsked(at=4)
    assert evaluation.val_loss(model, val, r, never) == evaluation.val_loss(model, val, r)
    assert never.askings == [(r.device, 1)] * 3 and read == [0, 0, 1, 1, 2, 2] * 2
    read.clear()
    stop = _StopAsked(at=2)
    assert evaluation.val_loss(model, val, r, stop) is None and model.training
    assert read == [0, 0] and len(stop.askings) == 2
    read.clear()
    monkeypatch.setattr(machine.dist, "all_reduce", lambda t: t.add_(1))  # the other process was asked, not this one
    rank0 = train.Run(cfg, 0, 2, r.device, tok, args)
    assert evaluation.val_loss(model, val, rank0, machine.StopAfterStep(True)) is None and read == []


def test_a_resumes_trim_of_its_log_keeps_every_line_that_names_no_later_step_byte_for_byte(tmp_path):
    """A resume drops the log lines of steps past its checkpoint, and only those: a line that is not a JSON object,
    names no step, names one that is not an integer or nests too deeply (a hand edit, or damage) is no later step's,
    so it stays as it was, bytes that are not UTF-8 too, and reading it does not stop the resume. From step 0 every
    line goes: none can be of a step up to it."""
    import checkpoint
    kept = [b'{"step": 1, "loss": 2.0}\n', b"not json\n", b"[3, 4]\n", b"7\n", b'{"step": "9"}\n', b'{"step": 9.5}\n',
            b'{"note": "caf\xe9 \xff"}\n', b"[" * 100_000 + b"\n"]
    (tmp_path / "log.jsonl").write_bytes(b"".join(kept) + b'{"step": 3, "loss": 1.0}\n')
    with checkpoint.open_log(str(tmp_path), 2):
        pass
    assert (tmp_path / "log.jsonl").read_bytes() == b"".join(kept)
    with checkpoint.open_log(str(tmp_path), 0) as log:  # a resume from step 0 (stopped before step 1): no step stays
        log.write('{"step": 1, "loss": 1.5}\n')
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 1, "loss": 1.5}\n'


def test_a_resume_whose_log_was_deleted_logs_its_steps_in_a_new_one(tmp_path):
    """A log.jsonl deleted by hand (to tidy the folder) beside the checkpoint: the resume has no lines to trim, and
    logs its steps from the checkpoint's on in a new log.jsonl rather than failing."""
    import checkpoint
    with checkpoint.open_log(str(tmp_path), 2) as log:
        log.write('{"step": 3, "loss": 1.2}\n')
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [3]


def test_a_resumes_log_loses_a_last_line_cut_short_so_the_next_line_is_not_glued_to_it(tmp_path):
    """A kill mid-write leaves a last line without its newline, even one of a step up to the checkpoint's: the resume
    drops it (it logs that step again), else its first line would be glued to it and the log could not be read."""
    import checkpoint
    whole = b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    for cut in (b'{"step": 2, "val_loss": 1.4', b'{"step": 2, "val_loss": 1.4}', b"not json"):
        (tmp_path / "log.jsonl").write_bytes(whole + cut)
        with checkpoint.open_log(str(tmp_path), 2) as log:
            log.write('{"step": 3, "loss": 1.2}\n')
        lines = (tmp_path / "log.jsonl").read_bytes().splitlines(keepends=True)
        assert b"".join(lines) == whole + b'{"step": 3, "loss": 1.2}\n'
        assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_an_unvalidated_resumes_trim_drops_only_its_steps_validation_lines(tmp_path):
    """A resume of a step whose validation was cut short validates it first, so the validation of that step already
    logged goes, and nothing else: not the step's training line, not another step's validation, not a line that only
    mentions val_loss, not a line whose step is not an integer (true is no step 1)."""
    import checkpoint
    kept = [b'{"step": 1, "val_loss": 2.1}\n', b'{"step": 2, "loss": 2.0}\n', b'{"step": 2, "note": "val_loss"}\n',
            b'["val_loss", 2]\n', b'{"step": true, "val_loss": 1.9}\n']
    (tmp_path / "log.jsonl").write_bytes(b"".join(kept) + b'{"step": 2, "val_loss": 1.8}\n')
    with checkpoint.open_log(str(tmp_path), 2, unvalidated=True):
        pass
    assert (tmp_path / "log.jsonl").read_bytes() == b"".join(kept)
    (tmp_path / "log.jsonl").write_bytes(b"".join(kept))
    with checkpoint.open_log(str(tmp_path), 1, unvalidated=True):
        pass
    assert (tmp_path / "log.jsonl").read_bytes() == b"".join(kept[3:])  # step 1's validation and step 2's lines go


@pytest.mark.parametrize("at_step", [0, 1], ids=["in its first step", "in its second step"])
def test_a_new_run_stopped_at_once_before_its_first_checkpoint_says_to_start_it_again(run_data, tmp_path,
                                                                                     monkeypatch, capsys, at_step):
    """Nothing to resume: what it says must work. In its first step too, where no step is finished: the step of the
    last ckpt.pt written is none, not 0. Its log.jsonl holds the folder once a step is logged in it (log_interval=1:
    in the second step); an empty one does not, and the same command starts the run again."""
    _signals_at(monkeypatch, at_step, signal.SIGINT, signal.SIGINT)
    flags = train_flags(run_data, tmp_path / "run", "--eval_dir=", "--log_interval=1")
    stopped = train.train(train.parse_config(flags))
    assert stopped["interrupted"] and stopped["step"] == 0 and not (tmp_path / "run" / "ckpt.pt").exists()
    out = capsys.readouterr().out
    monkeypatch.undo()
    if at_step == 0:
        assert "before the run wrote a checkpoint: start the same command" in out
        assert train.train(train.parse_config(flags))["step"] == 6
        return
    assert "before the run wrote a checkpoint: start the run with --overwrite=True" in out
    with pytest.raises(train.UserError, match=r"holds a run \(log.jsonl\); choose another --out_dir, or pass "
                                              r"--overwrite=True"):  # no checkpoint: a resume is no way on
        train.train(train.parse_config(flags))
    assert train.train(train.parse_config(flags + ["--overwrite=True"]))["step"] == 6


KILLED_IN_ITS_FIRST_CHECKPOINT = """
import os, signal, sys, torch, train
def half_written(obj, f):  # kill -9 (the out-of-memory killer, a pre-empted job) with ckpt.pt's temporary half written
    f.write(b"PK\\x03\\x04")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_written
train.main(sys.argv[1:])
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_a_run_killed_before_its_first_checkpoint_is_told_a_start_that_works_and_ends_as_an_uninterrupted_run(
        run_data, tmp_path, capsys):
    """A new run killed while it wrote its first checkpoint leaves the log.jsonl of its first steps beside no ckpt.pt.
    The resume said "start a run with another init_from", and that start was refused in turn (out_dir holds a run:
    log.jsonl): two refusals and no way on named. It names the start that works, which ends as an uninterrupted run,
    the killed write's temporary gone."""
    out, whole = tmp_path / "run", tmp_path / "whole"
    flags = ["--eval_dir=", "--log_interval=1", "--dropout=0.1", "--threads=1"]
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_ITS_FIRST_CHECKPOINT, *train_flags(run_data, out, *flags)],
                            cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "ckpt.pt").exists() and (out / "log.jsonl").stat().st_size > 0
    assert len(list(out.glob("ckpt.pt.tmp*"))) == 1  # the killed write's temporary
    fails([f"--out_dir={out}", "--init_from=resume"], capsys, f"nothing to resume: {out / 'ckpt.pt'} does not exist",
          "start it again with its own init_from and --overwrite=True")
    again = train.train(train.parse_config(train_flags(run_data, out, *flags, "--overwrite=True")))
    uninterrupted = train.train(train.parse_config(train_flags(run_data, whole, *flags)))
    assert_same_adapters(adapters_of(uninterrupted["model"]), adapters_of(again["model"]))
    assert again["train_losses"] == uninterrupted["train_losses"]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == \
        [json.loads(line)["step"] for line in (whole / "log.jsonl").read_text().splitlines()]
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_a_ctrl_c_outside_the_loop_leaves_quietly_with_130_under_torchrun_and_is_python_s_own_outside_it(
        monkeypatch, capsys):
    """torchrun stops every process (SIGTERM, turned into a KeyboardInterrupt) once one fails: those leave with the
    stopped run's exit code and no traceback. Outside torchrun a Ctrl-C before the loop is Python's own."""
    def stopped(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train", stopped)
    left = []
    monkeypatch.setattr(machine, "leave", left.append)  # under RANK it would end the process (os._exit)
    monkeypatch.setenv("RANK", "1")
    try:
        train.main([])
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt's traceback under torchrun")
    assert left == [machine.INTERRUPTED] and capsys.readouterr().err == ""
    monkeypatch.delenv("RANK")
    with pytest.raises(KeyboardInterrupt):
        train.main([])
    assert left == [machine.INTERRUPTED]


def _torchrun_rank(monkeypatch, rank, stopped):
    """This process as torchrun's rank `rank` of 2; its wait for torchrun's SIGTERM gets one when `stopped`. What
    machine.leave was asked for is returned."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    handlers, left = {}, []
    monkeypatch.setattr(machine.signal, "signal", lambda s, h: handlers.__setitem__(s, h))
    monkeypatch.setattr(machine.time, "sleep", lambda s: stopped and handlers[signal.SIGTERM](signal.SIGTERM, None))

    def leave(code):
        left.append(code)
        raise SystemExit(code)
    monkeypatch.setattr(machine, "leave", leave)
    return left


def test_under_torchrun_rank_0_says_why_and_another_rank_only_when_torchrun_does_not_stop_it(monkeypatch, capsys):
    """Every rank hits the same mistake: rank 0 prints it at once; another waits for torchrun's SIGTERM and then leaves
    with the code, silent; one not stopped (a mistake of its own) prints it."""
    left = _torchrun_rank(monkeypatch, 0, stopped=True)
    assert machine.fail("error: x.", 2) == 2 and capsys.readouterr().err == "error: x.\n" and left == []
    left = _torchrun_rank(monkeypatch, 1, stopped=True)
    with pytest.raises(SystemExit):
        machine.fail("error: x.", 2)
    assert left == [2] and capsys.readouterr().err == ""
    left = _torchrun_rank(monkeypatch, 1, stopped=False)
    assert machine.fail("error: x.", 2) == 2 and capsys.readouterr().err == "error: x.\n" and left == []


def test_a_rank_but_0_says_its_mistake_after_the_seconds_the_readme_gives_torchrun_to_stop_it(monkeypatch, capsys):
    """The README: "A mistake is one sentence and exit code 2 (rank 0's, or after 10 s that of a process that alone
    hit it)": rank 0 prints at once, another rank waits that long for torchrun's SIGTERM first."""
    readme = " ".join((Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8").split())
    said = int(re.search(r"exit code 2 \(rank 0's, or after (\d+) s that of a process that alone hit it\)",
                         readme).group(1))
    for rank, wait in ((0, 0), (1, said)):
        waited = []
        _torchrun_rank(monkeypatch, rank, stopped=False)
        monkeypatch.setattr(machine.time, "sleep", waited.append)
        assert machine.fail("error: x.", 2) == 2 and capsys.readouterr().err == "error: x.\n" and sum(waited) == wait


def test_wait_to_be_stopped_leaves_with_the_signals_shell_code_and_does_not_wait_alone(monkeypatch):
    left = _torchrun_rank(monkeypatch, 1, stopped=True)
    with pytest.raises(SystemExit):
        machine.wait_to_be_stopped(2)
    assert left == [128 + signal.SIGTERM]
    for env in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE"):  # outside torchrun, or its only process: nothing to wait for
        left = _torchrun_rank(monkeypatch, 1, stopped=True)
        monkeypatch.delenv(env)
        machine.wait_to_be_stopped(2)
        assert left == []


def test_a_sigterm_while_a_rank_asks_torchruns_store_for_a_failure_leaves_with_that_failures_code(monkeypatch):
    """wait_to_be_stopped asked torchrun's store whether another process had failed before it took SIGTERM: torchrun's
    SIGTERM meanwhile, sent as that process (code 2) ended, ended this one with -15 beside it."""
    left, handlers, asked = _torchrun_rank(monkeypatch, 1, stopped=False), {}, []
    monkeypatch.setattr(machine.signal, "signal", lambda s, h: handlers.__setitem__(s, h))

    def first_failure():  # torchrun's SIGTERM comes while the first ask is under way
        asked.append(signal.SIGTERM in handlers)
        if len(asked) == 1 and asked[0]:
            handlers[signal.SIGTERM](signal.SIGTERM, None)
        return 2 if len(asked) > 1 else None
    monkeypatch.setattr(machine, "first_failure", first_failure)
    with contextlib.suppress(SystemExit):
        machine.wait_to_be_stopped(2)
    assert asked[0] and left == [2]


def test_another_rank_gives_torchrun_10_seconds_to_stop_it_before_it_says_why(monkeypatch, capsys):
    """torchrun needs a moment to stop the others once rank 0 has failed: without the wait every rank would print
    rank 0's mistake again."""
    for rank in (1, 3):
        _torchrun_rank(monkeypatch, rank, stopped=False)
        waits = []
        monkeypatch.setattr(machine.time, "sleep", waits.append)
        assert machine.fail("error: x.", 2) == 2 and waits == [10] and capsys.readouterr().err == "error: x.\n"


class _Left(Exception):
    """What os._exit raises in these tests instead of ending pytest."""


@pytest.fixture
def os_exits(monkeypatch):
    """Under torchrun (RANK set), with os._exit recording its code and raising _Left: the codes, in order."""
    exits = []

    def _exit(code):
        exits.append(code)
        raise _Left
    monkeypatch.setattr(machine.os, "_exit", _exit)
    monkeypatch.setenv("RANK", "0")
    return exits


def test_under_torchrun_a_process_leaves_without_the_interpreters_shutdown_and_outside_it_by_sys_exit(monkeypatch,
                                                                                                     os_exits):
    """Under torchrun gloo's worker threads outlive the process group: os._exit, with the code, after the output is
    flushed. Outside it an exit code of 0 returns (tests and callers go on) and another is SystemExit."""
    for code in (0, machine.INTERRUPTED):
        with pytest.raises(_Left):
            machine.leave(code)
    assert os_exits == [0, machine.INTERRUPTED]
    monkeypatch.delenv("RANK")
    assert machine.leave(0) is None
    with pytest.raises(SystemExit) as e:
        machine.leave(2)
    assert e.value.code == 2 and os_exits == [0, machine.INTERRUPTED]


def test_under_torchrun_a_failed_collective_waits_for_torchrun_to_stop_it_and_leaves_silently(monkeypatch, capsys):
    """A collective fails (a RuntimeError) on every rank once one process has failed: that one says why, and torchrun's
    SIGTERM ends the others during their wait, without a traceback of their own."""
    left = _torchrun_rank(monkeypatch, 1, stopped=True)
    monkeypatch.setattr(train, "train", lambda cfg: (_ for _ in ()).throw(RuntimeError("Connection closed by peer")))
    with pytest.raises(SystemExit):
        train.main([])
    assert left == [128 + signal.SIGTERM] and capsys.readouterr().err == ""


def test_a_process_whose_loop_stopped_after_another_failed_first_leaves_with_that_ones_code(monkeypatch, capsys):
    """A SIGTERM from torchrun that the loop takes (it writes its checkpoint and returns interrupted) stopped the
    process because another failed first: it leaves with that one's code, as a process stopped anywhere else does."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in (("TORCHELASTIC_USE_AGENT_STORE", "True"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(store.port)), ("TORCHELASTIC_RESTART_COUNT", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(train, "train", lambda cfg: {"interrupted": True})
    left = _torchrun_rank(monkeypatch, 1, stopped=False)
    with pytest.raises(SystemExit):
        train.main([])
    assert left == [machine.INTERRUPTED]  # a stop with no failure told: a Ctrl-C's 130
    _torchrun_rank(monkeypatch, 0, stopped=False)
    assert machine.fail("error: x.", 3) == 3 and capsys.readouterr().err == "error: x.\n"
    left = _torchrun_rank(monkeypatch, 1, stopped=False)
    with pytest.raises(SystemExit):
        train.main([])
    assert left == [3]


def test_a_process_torchrun_stops_leaves_with_the_code_of_the_first_failure_told_in_torchruns_store(monkeypatch,
                                                                                                     capsys):
    """torchrun's agent holds a key-value store that outlives the run's processes: the process that fails and says
    why leaves its code there, and another that torchrun then stops (its SIGTERM before or in a step, a collective
    that lost that process, the same mistake found) leaves with it at once, silent: torchrun's summary names one code,
    not 130, 143 or a traceback beside it. A Ctrl-C with no failure told is still 130, and torchrun's restart of
    the processes starts without the last attempt's failure."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in (("TORCHELASTIC_USE_AGENT_STORE", "True"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(store.port)), ("TORCHELASTIC_RESTART_COUNT", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(train, "train", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt()))  # torchrun's SIGTERM
    left = _torchrun_rank(monkeypatch, 1, stopped=False)
    with pytest.raises(SystemExit):
        train.main([])
    assert left == [machine.INTERRUPTED] and machine.first_failure() is None  # a Ctrl-C: nothing failed

    _torchrun_rank(monkeypatch, 0, stopped=False)
    assert machine.fail("error: x.", 3) == 3 and capsys.readouterr().err == "error: x.\n"
    left, waits = _torchrun_rank(monkeypatch, 1, stopped=False), []
    monkeypatch.setattr(machine.time, "sleep", waits.append)
    with pytest.raises(SystemExit):
        train.main([])  # torchrun's SIGTERM, before or in a step
    with pytest.raises(SystemExit):
        machine.wait_to_be_stopped(2)  # a collective that lost rank 0
    with pytest.raises(SystemExit):
        machine.fail("error: y.", 2)  # the same mistake, found a moment later
    assert left == [3, 3, 3] and waits == [] and capsys.readouterr().err == ""
    _torchrun_rank(monkeypatch, 0, stopped=False)
    assert machine.fail("error: z.", 2) == 2 and machine.first_failure() == 3  # the first one told stays

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    left = _torchrun_rank(monkeypatch, 1, stopped=False)
    with pytest.raises(SystemExit):
        train.main([])
    assert left == [machine.INTERRUPTED]


def test_a_failure_is_told_in_torchruns_agent_store_alone_and_a_store_that_breaks_or_holds_no_code_tells_none(
        monkeypatch, capsys):
    """Only the store of torchrun's agent (TORCHELASTIC_USE_AGENT_STORE) outlives the run's processes: without it,
    MASTER_PORT is rank 0's own store, gone with a failed rank 0, and one process alone has no one to tell. A store
    that breaks as a code is told (its agent gone) or that holds no code is no failure: the process says why and
    leaves with its own code."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(store.port)),
                        ("TORCHELASTIC_RESTART_COUNT", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    _torchrun_rank(monkeypatch, 0, stopped=False)
    assert machine.fail("error: x.", 3) == 3 and not store.check([machine._failure_key()])
    assert capsys.readouterr().err == "error: x.\n"
    store.set(machine._failure_key(), "3")
    assert machine.first_failure() is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert machine.first_failure() == 3
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert machine.first_failure() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    store.set(machine._failure_key(), "not a code")
    assert machine.first_failure() is None
    store.delete_key(machine._failure_key())
    left, handlers = _torchrun_rank(monkeypatch, 1, stopped=False), {}  # rank 0 fails while this one waits:
    monkeypatch.setattr(machine.signal, "signal", lambda s, h: handlers.__setitem__(s, h))
    monkeypatch.setattr(machine.time, "sleep", lambda s: store.set(machine._failure_key(), "3") or
                        handlers[signal.SIGTERM](signal.SIGTERM, None))  # it tells its code, torchrun stops this one
    with pytest.raises(SystemExit):
        machine.fail("error: y.", 2)
    assert left == [3] and capsys.readouterr().err == ""

    class Broken:
        def compare_set(self, *args):
            raise RuntimeError("Connection reset by peer")
        check = compare_set
    monkeypatch.setattr(machine, "_torchrun_store", Broken)
    _torchrun_rank(monkeypatch, 0, stopped=False)
    assert machine.fail("error: y.", 2) == 2 and machine.first_failure() is None
    assert capsys.readouterr().err == "error: y.\n"


def test_under_torchrun_a_ctrl_c_during_the_wait_ends_it_as_torchruns_sigterm_does(monkeypatch, capsys):
    """The terminal's Ctrl-C reaches torchrun's processes themselves (SIGINT), and torchrun passes it on: a process
    waiting to be stopped must leave silently then too, with 130 (the shell's 128 + SIGINT) or its failure's code,
    not print a KeyboardInterrupt's traceback or the error rank 0 has printed."""
    left, handlers = _torchrun_rank(monkeypatch, 1, stopped=False), {}
    monkeypatch.setattr(machine.signal, "signal", lambda s, h: handlers.__setitem__(s, h))
    monkeypatch.setattr(machine.time, "sleep", lambda s: handlers[signal.SIGINT](signal.SIGINT, None))
    with pytest.raises(SystemExit):
        machine.wait_to_be_stopped(2)
    with pytest.raises(SystemExit):
        machine.fail("error: x.", 2)
    assert left == [128 + signal.SIGINT, 2] and capsys.readouterr().err == ""


def test_under_torchrun_a_rank_outside_the_main_thread_says_why_without_a_wait_it_could_not_end(monkeypatch, capsys):
    """Python refuses a signal handler set from another thread: train.main called from a worker thread (a
    scheduler's) under torchrun failed there with a ValueError instead of its own one-line error."""
    import threading
    for name, value in (("TORCHELASTIC_RUN_ID", "x"), ("WORLD_SIZE", "2"), ("RANK", "1")):
        monkeypatch.setenv(name, value)
    waits, codes, errors = [], [], []
    monkeypatch.setattr(machine.time, "sleep", waits.append)

    def worker():
        try:
            codes.append(machine.fail("error: x.", 2))
        except Exception as e:
            errors.append(e)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert errors == [] and codes == [2] and waits == [] and capsys.readouterr().err == "error: x.\n"


def test_under_torchrun_what_a_process_wrote_before_it_leaves_reaches_its_log(tmp_path):
    """os._exit skips the interpreter's flush at exit: where a process's output is a file or a pipe (a SLURM log,
    torchrun's --redirects), its last lines, the stop's "checkpoint written" among them, would be lost."""
    code = "import sys, machine\nprint('checkpoint written')\nsys.stderr.write('no line end yet')\nmachine.leave(130)\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"RANK": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (130, "checkpoint written\n", "no line end yet")


class _Unwritable:
    """A stream whose flush raises `error`, as stdout's on a full disk or stderr's with its reader gone."""
    def __init__(self, error):
        self.error = error

    def flush(self):
        raise self.error


def test_under_torchrun_a_flush_that_fails_still_leaves_by_os_exit_with_run_scripts_code(monkeypatch, capsys,
                                                                                         os_exits):
    """machine.leave's flush raised before os._exit where stdout's disk was full: the process went on into the
    interpreter's shutdown that os._exit is there to avoid (gloo's threads), and ended with whatever caught the error.
    It leaves by os._exit now whatever the flushes met, with the code run_script gives a failed write to stdout
    outside torchrun: 2 with its sentence for a full disk, 1 and the traceback for a fault it does not know; a stderr
    that cannot be flushed, where nothing more can be said, keeps the code asked for."""
    exits, moved = os_exits, []

    def leave(code, stream, error):  # leave(code) with that stream's flush raising error
        kept = getattr(sys, stream)
        monkeypatch.setattr(sys, stream, _Unwritable(error))
        with pytest.raises(_Left):
            machine.leave(code)
        monkeypatch.setattr(sys, stream, kept)
        return capsys.readouterr().err
    monkeypatch.setattr(machine.os, "dup2", lambda fd, to: moved.append(to))  # stdout onto os.devnull: not pytest's
    full, broken = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), OSError(errno.EIO, os.strerror(errno.EIO))
    for code in (0, machine.INTERRUPTED):
        assert leave(code, "stdout", full) == (f"error: the output could not be written ({full.strerror}); free "
                                               "space where it goes, or send it elsewhere, then run it again\n")
    assert exits == [2, 2] and moved == [1, 1]
    assert leave(machine.INTERRUPTED, "stdout", broken).rstrip().endswith(f"OSError: [Errno {errno.EIO}] "
                                                                          f"{broken.strerror}")
    assert leave(machine.INTERRUPTED, "stderr", BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))) == ""
    assert exits[2:] == [1, machine.INTERRUPTED] and moved == [1, 1]


class _Gone(_Unwritable):
    """A stream that takes nothing: its write raises too, as stderr's with its reader gone."""
    def write(self, text):
        raise self.error


def test_under_torchrun_a_fault_whose_traceback_cannot_be_written_either_still_leaves_by_os_exit_with_1(monkeypatch,
                                                                                                      os_exits):
    """stdout's flush meets a fault leave does not know (EIO) and stderr, where its traceback goes, is gone too: nothing
    can be said, and the process still leaves by os._exit (never the interpreter's shutdown), with 1."""
    monkeypatch.setattr(sys, "stdout", _Unwritable(OSError(errno.EIO, os.strerror(errno.EIO))))
    monkeypatch.setattr(sys, "stderr", _Gone(BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))))
    with pytest.raises(_Left):
        machine.leave(machine.INTERRUPTED)
    assert os_exits == [1]


LEAVES_AFTER_A_LINE = ("import atexit, os, errors, machine\n"
                       "atexit.register(lambda: os.write(2, b'the interpreter shut down'))\n"
                       "def main():\n    print('checkpoint written')\n    machine.leave(130)\n"
                       "errors.run_script(main)\n")


@pytest.mark.skipif(not os.path.exists("/dev/full") or not hasattr(__import__("select"), "poll"),
                    reason="no /dev/full (Linux has one) to stand for a full disk, or no poll (Windows)")
def test_under_torchrun_a_process_whose_output_cannot_be_written_still_leaves_without_the_interpreters_shutdown():
    """`torchrun ... train.py > log` on a full disk, or `| head -3`: leave's flush raised, and the process went
    through the interpreter's shutdown (its atexit here) before run_script ended it. It leaves by os._exit with
    run_script's code: 2 and one sentence for the full disk, 1 and silence for a reader gone."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "WORLD_SIZE")} | {"RANK": "0"}
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-c", LEAVES_AFTER_A_LINE], stdout=full, stderr=subprocess.PIPE,
                              text=True, cwd=REPO, env=env, timeout=120)
    assert (done.returncode, done.stderr) == (2, "error: the output could not be written (No space left on device); "
                                              "free space where it goes, or send it elsewhere, then run it again\n")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-c", LEAVES_AFTER_A_LINE], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, cwd=REPO, env=env, timeout=120)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (1, "")


@pytest.mark.skipif(os.name != "posix", reason="file descriptors closed before the program starts, as `>&-` does")
@pytest.mark.parametrize("closed", [1, 2])
def test_under_torchrun_a_process_started_with_stdout_or_stderr_closed_ends_with_its_own_code(closed):
    """`torchrun ... train.py >&-` (or `2>&-`): machine.leave flushed sys.stdout, which Python leaves None for a stream
    closed at its start: a refusal under torchrun ended in an AttributeError, exit code 1, not its sentence's 2."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID")} | {"RANK": "0"}
    done = subprocess.run([sys.executable, "train.py", "--max_iters=abc"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300, preexec_fn=lambda: os.close(closed))
    assert done.returncode == 2, done.stderr
    said = "train.py: error: config key 'max_iters' in flag --max_iters=abc must be of type int, got 'abc'.\n"
    assert (done.stdout, done.stderr) == ("", "" if closed == 2 else said)


def test_a_runtime_error_that_only_mentions_memory_is_not_called_out_of_memory(capsys, monkeypatch):
    """Exit code 3 and "lower batch_size" are for an allocation that failed; a CUDA fault that names memory (an
    illegal access, a bug) must surface as itself, not be hidden behind advice that cannot fix it."""
    for words in ("CUDA error: an illegal memory access was encountered", "memory format is not supported"):
        monkeypatch.setattr(train, "train", lambda cfg, words=words: (_ for _ in ()).throw(RuntimeError(words)))
        with pytest.raises(RuntimeError, match=words):
            train.main([])
        assert "out of memory" not in capsys.readouterr().err


def test_a_checkpoint_written_before_base_fingerprints_resumes_on_its_base(run_data, tmp_path):
    """A ckpt.pt of an older train.py records no base or data fingerprint (no "base" / "data", or None): it resumes on
    the base at init_from as it did then, rather than being refused as damaged or as another base's run."""
    out = finished_run(run_data, tmp_path / "run", "--max_iters=2")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    for old in ({k: v for k, v in ckpt.items() if k not in ("base", "data")}, {**ckpt, "base": None, "data": None}):
        torch.save(old, out / "ckpt.pt")
        resumed = train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume", "--max_iters=3"]))
        assert resumed["step"] == 3


def test_a_resume_refuses_settings_that_would_make_it_another_run_and_leaves_the_run_alone(run_data, tmp_path,
                                                                                          capsys):
    """A step's batch (data_dir, batch_size, grad_accum, batch_mode, max_len) and its rate (warmup_iters,
    min_lr_ratio) belong to the run: a resume with other ones would continue a run that never was. Each is one
    sentence naming the key and the run's value, before anything is written."""
    out = finished_run(run_data, tmp_path / "run", "--max_iters=2")
    before = contents(out)
    saved = torch.load(out / "ckpt.pt", weights_only=True)["config"]
    for key, value in [("batch_size", 4), ("grad_accum", 2), ("batch_mode", "pack"), ("max_len", 64),
                       ("data_dir", tmp_path), ("warmup_iters", 3), ("min_lr_ratio", 0.5)]:
        fails([f"--out_dir={out}", "--init_from=resume", "--max_iters=4", f"--{key}={value}"], capsys,
              f"{key} cannot change when resuming", f"{key}={saved[key]!r}")
    assert contents(out) == before


def test_resuming_a_finished_run_at_its_own_max_iters_trains_nothing_and_is_not_refused(run_data, tmp_path):
    """The command that started a run, run again with --init_from=resume once it finished (study.py's reruns, a
    job scheduler's retry), is not "past max_iters": it trains no step and leaves the checkpoint as it was."""
    out = finished_run(run_data, tmp_path / "run")
    before = contents(out)["ckpt.pt"]
    again = train.train(train.parse_config(train_flags(run_data, out, "--max_iters=4", "--eval_interval=2",
                                                       "--eval_dir=", "--init_from=resume")))
    assert again["step"] == 4 and again["train_losses"] == []
    assert contents(out)["ckpt.pt"] == before


def test_resuming_a_run_past_a_lower_max_iters_is_refused_in_one_sentence_and_leaves_its_files(run_data, tmp_path,
                                                                                                capsys):
    """A resume whose --max_iters is below the step its ckpt.pt is at has no step to train and would end where
    max_iters says it had not reached: it is refused before anything is written, naming both ways on."""
    out = finished_run(run_data, tmp_path / "run")
    before = contents(out)
    fails(train_flags(run_data, out, "--max_iters=2", "--eval_interval=2", "--eval_dir=", "--init_from=resume"),
          capsys, f"{out / 'ckpt.pt'} is at step 4, past max_iters=2: raise --max_iters to train on, or pass "
          "--eval_only=True to score it.")
    assert contents(out) == before


def test_an_init_from_that_does_not_exist_is_one_sentence_with_the_word_it_was_likely_meant_to_be(run_data, tmp_path,
                                                                                                     capsys):
    fails(train_flags(run_data, tmp_path / "a", "--init_from=resum"), capsys, "init_from 'resum' does not exist; did "
          "you mean 'resume'?")
    fails(train_flags(run_data, tmp_path / "b", f"--init_from={tmp_path / 'llama'}"), capsys,
          f"init_from '{tmp_path / 'llama'}' does not exist; give a model.pt written by train.py, a Meta or Hugging "
          "Face folder, 'scratch' or 'resume'.")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_eval_only_without_an_adapter_is_refused_before_the_model_is_built_or_the_data_read(run_data, tmp_path,
                                                                                              capsys, monkeypatch):
    """It was refused once the model was built and the shards read, after the line that counts its parameters."""
    for name in ("build_model", "datasets"):
        monkeypatch.setattr(train, name, lambda *a, name=name: pytest.fail(f"{name} ran before the refusal"))
    with pytest.raises(SystemExit) as e:
        train.main(train_flags(run_data, tmp_path / "no_run", "--eval_only=True"))
    out, err = capsys.readouterr()
    adapter = tmp_path / "no_run" / "adapter.pt"
    assert e.value.code == 2 and out == "" and err == (f"train.py: error: eval_only: {adapter} does not exist; train "
                                                       "first or point --out_dir at a finished run.\n")


def test_a_broken_evaluation_set_is_refused_before_the_base_is_built(run_data, tmp_path, capsys, monkeypatch):
    """A run (and a re-scoring) reads its evaluation sets before it builds the model, which for a 7B base takes
    minutes: a malformed record is named while nothing heavier than the shards has been read."""
    out, sets = finished_run(run_data, tmp_path / "o"), tmp_path / "sets"
    sets.mkdir()
    (sets / "qa.jsonl").write_text('{"instruction": "Who?", "output": "Ana"}\n{"instruction": "Who?"}\n')
    monkeypatch.setattr(train, "build_model", lambda *a: pytest.fail("the model was built before the refusal"))
    for flags in (["--eval_only=True"], ["--out_dir=" + str(tmp_path / "new")]):
        fails(train_flags(run_data, out, f"--eval_dir={sets}", *flags), capsys, f"{sets / 'qa.jsonl'} line 2 ")


def test_eval_only_pointed_at_no_run_is_refused_and_makes_no_out_dir(run_data, tmp_path, capsys):
    """eval_only reads a finished run and writes only its results.json: an out_dir with no run in it is one sentence
    naming the adapter.pt it lacks, and no empty folder is left where the user mistyped a path."""
    out = tmp_path / "no_such_run"
    fails(train_flags(run_data, out, "--eval_only=True"), capsys, out / "adapter.pt", "does not exist")
    assert not out.exists()


def test_an_adapter_pt_or_ckpt_pt_that_is_a_folder_is_named_as_one_not_called_missing(run_data, tmp_path, capsys):
    """eval_only of an out_dir whose adapter.pt is a folder, and a resume of one whose ckpt.pt is, were told the file
    "does not exist", which a look at the folder contradicts."""
    out = tmp_path / "run"
    (out / "adapter.pt").mkdir(parents=True)
    fails(train_flags(run_data, out, "--eval_only=True"), capsys,
          f"eval_only: {out / 'adapter.pt'} is a folder, not an adapter; train first")
    (out / "ckpt.pt").mkdir()
    fails(train_flags(run_data, out, "--init_from=resume"), capsys,
          f"nothing to resume: {out / 'ckpt.pt'} is a folder, not a checkpoint; start a run")


# -------------------------------------------------------------------------------------------------
# stopping, out_dir and a run's paths on their own (added from mutation testing)

def test_sigterm_outside_the_training_loop_is_ctrl_c_and_the_callers_handler_comes_back(run_data, tmp_path,
                                                                                        monkeypatch):
    """Before the loop (the demo's data, the model, the checks) or while scoring, no step is under way: a SIGTERM
    from SLURM or Kubernetes is a KeyboardInterrupt, as Ctrl-C, not the caller's handler or a SystemExit."""
    def callers(signum, frame):
        raise AssertionError("the caller's SIGTERM handler ran inside train()")
    monkeypatch.setattr(train, "build_demo", lambda cfg, resuming=False: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.signal(signal.SIGTERM, callers)
    try:
        with pytest.raises(KeyboardInterrupt):
            train.train(train.parse_config(train_flags(run_data, tmp_path / "a", "--eval_dir=")))
        assert signal.getsignal(signal.SIGTERM) is callers and not (tmp_path / "a").exists()
    finally:
        signal.signal(signal.SIGTERM, before)


def main_exit_code(argv):
    """train.main's exit code (0 for none); "KeyboardInterrupt" where one came out of it."""
    try:
        train.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    except KeyboardInterrupt:  # not out of the test: pytest would take it for the user's own Ctrl-C
        return "KeyboardInterrupt"
    return 0


def test_a_stop_while_scoring_exits_as_a_stop_in_training_saying_how_to_score_the_saved_adapters(run_data, tmp_path,
                                                                                                   monkeypatch, capsys):
    """Scoring a 7B run on the CME sets can take hours: a Ctrl-C or SIGTERM there says that the adapters are saved and
    how to score them, and exits with machine.INTERRUPTED as a stop in training does (it used to die by SIGINT, even
    on a SIGTERM), so that a study or a job queue takes the run as stopped, not failed. What it says works, and scores
    the run as the uninterrupted run did."""
    flags = train_flags(run_data, tmp_path / "run", "--max_iters=2", "--threads=1")
    whole = train.train(train.parse_config(train_flags(run_data, tmp_path / "whole", "--max_iters=2", "--threads=1")))
    real, out = evaluation.evaluate, tmp_path / "run"
    signum = [signal.SIGTERM]
    monkeypatch.setattr(evaluation, "evaluate", lambda model, r: os.kill(os.getpid(), signum[0]) or real(model, r))
    assert main_exit_code(flags) == machine.INTERRUPTED
    assert capsys.readouterr().out.endswith(f"\nstopped while scoring: the trained adapters are saved in {out}; score "
                                            "them with the same command plus --eval_only=True\n")
    assert (out / "adapter.pt").is_file() and not (out / "results.json").exists()
    signum[0] = signal.SIGINT
    assert main_exit_code(flags + ["--eval_only=True"]) == machine.INTERRUPTED  # a re-scoring: its own command again
    assert "score them with the same command\n" in capsys.readouterr().out
    monkeypatch.undo()
    assert main_exit_code(flags + ["--eval_only=True"]) == 0
    results, want = (json.loads((d / "results.json").read_text()) for d in (out, tmp_path / "whole"))
    assert set(results["scores"]) == set(evaluation.load_eval_sets({"eval_dir": str(run_data / "test"),
                                                                     "eval_limit": 0}))
    assert results["scores"] == want["scores"] and results["expert_load"] == want["expert_load"]
    assert results["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)


def _stop_after_the_loops_last_look(monkeypatch):
    """SIGTERM just after the loop's last look at a stop (its 2nd: --max_iters=2, --eval_iters=0): the loop ends."""
    real, looks = machine.StopAfterStep.agreed, []

    def agreed(self, device, world):
        looks.append(real(self, device, world))
        if len(looks) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return looks[-1]
    monkeypatch.setattr(machine.StopAfterStep, "agreed", agreed)


def _stop_as_the_loop_gives_the_signals_back(monkeypatch):
    """Ctrl-C the moment the loop's handlers are given back (once: a second giving back changes nothing)."""
    real, sent = machine.StopAfterStep.restore, []

    def restore(self):
        real(self)
        if not sent:
            sent.append(signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(machine.StopAfterStep, "restore", restore)


def _stop_once_the_table_is_printed(monkeypatch):
    """Ctrl-C after the table of scores, before results.json is written."""
    real = evaluation.print_results
    monkeypatch.setattr(evaluation, "print_results", lambda *a: real(*a) or os.kill(os.getpid(), signal.SIGINT))


@pytest.mark.parametrize("stop", [_stop_after_the_loops_last_look, _stop_as_the_loop_gives_the_signals_back,
                                  _stop_once_the_table_is_printed])
def test_a_stop_anywhere_between_the_last_step_and_results_json_says_how_to_score_and_exits_130(
        run_data, tmp_path, monkeypatch, capsys, stop):
    """Past the loop's last look at a stop and before the scoring's try, a stop was lost (the run scored on) or
    died by SIGINT without a word; after the table, before results.json, it died so too. Each now says, as a stop
    while scoring does, that the adapters are saved and how to score them, and exits with machine.INTERRUPTED; what
    it says works."""
    out = tmp_path / "run"
    flags = train_flags(run_data, out, "--max_iters=2", "--eval_iters=0", "--threads=1")
    stop(monkeypatch)
    assert main_exit_code(flags) == machine.INTERRUPTED
    printed = capsys.readouterr()
    assert printed.out.endswith(f"\nstopped while scoring: the trained adapters are saved in {out}; score them with "
                                "the same command plus --eval_only=True\n")
    assert "stopping after this step" not in printed.err  # the loop's notice, then the scoring's: two stories
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 2 and not (out / "results.json").exists()
    monkeypatch.undo()
    assert main_exit_code(flags + ["--eval_only=True"]) == 0
    assert json.loads((out / "results.json").read_text())["scores"].keys() == evaluation.load_eval_sets(
        {"eval_dir": str(run_data / "test"), "eval_limit": 0}).keys()


def test_a_stop_before_a_resume_with_no_step_left_scores_is_told_as_a_stop_while_scoring_alone(run_data, tmp_path,
                                                                                                monkeypatch, capsys):
    """A resume with no step left to train (a run stopped while it was scored) holds the loop's handlers until the
    scoring begins: a stop then printed the loop's "stopping after this step, with a checkpoint", though no step was
    under way, before the scoring's own line."""
    out = tmp_path / "run"
    flags = train_flags(run_data, out, "--max_iters=2", "--eval_iters=0", "--threads=1")
    _stop_once_the_table_is_printed(monkeypatch)
    assert main_exit_code(flags) == machine.INTERRUPTED
    monkeypatch.undo()
    capsys.readouterr()
    real = evaluation.score
    monkeypatch.setattr(evaluation, "score", lambda *a: os.kill(os.getpid(), signal.SIGTERM) or real(*a))
    assert main_exit_code([f"--out_dir={out}", "--init_from=resume"]) == machine.INTERRUPTED
    printed = capsys.readouterr()
    assert "at step 2, its last: nothing to train" in printed.out
    assert printed.out.endswith(f"\nstopped while scoring: the trained adapters are saved in {out}; score them with "
                                "the same command plus --eval_only=True\n")
    assert "stopping after this step" not in printed.err and not (out / "results.json").exists()


def test_a_stop_while_scoring_is_said_once_by_the_first_process_stopped_which_tells_the_others_to_leave_with_130(
        tmp_path, monkeypatch, capsys):
    """Under torchrun a SIGTERM may reach one process alone (a scheduler's, the kernel's) while it scores its share:
    that one says how to score the run, and tells the others in torchrun's store, so that rank 0, whose collective
    lost it, leaves with 130 too, silent (machine.wait_to_be_stopped). Where every process is stopped, the first says
    it; a restart of the processes says it again; with no store to ask, rank 0 alone."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in (("TORCHELASTIC_USE_AGENT_STORE", "True"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(store.port)), ("TORCHELASTIC_RESTART_COUNT", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(evaluation, "evaluate", lambda model, r: (_ for _ in ()).throw(KeyboardInterrupt()))
    said = []
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        r = train.Run({**train.DEFAULTS, "out_dir": str(tmp_path)}, rank=rank, world=2)
        assert evaluation.score(None, r, None, {"val_loss": 1.0}) is False
        said.append(capsys.readouterr().out)
    assert said == [f"\nstopped while scoring: the trained adapters are saved in {tmp_path}; score them with the "
                    "same command plus --eval_only=True\n", ""]
    assert machine.first_failure() == machine.INTERRUPTED
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert [machine.stopped_first(master) for master in (False, True)] == [True, False]
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    assert [machine.stopped_first(master) for master in (False, True)] == [False, True]


def test_a_process_stopped_while_scoring_after_another_failed_says_nothing_and_leaves_with_the_failures_code(
        tmp_path, monkeypatch, capsys):
    """torchrun stops every process (SIGTERM) once one has failed, say out of memory in its share of the scoring
    (exit code 3, said by that one): rank 0, stopped so in its own share, printed "stopped while scoring" and left with
    130, naming a stop nobody asked for, and torchrun's summary a code beside the failure's."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in (("TORCHELASTIC_USE_AGENT_STORE", "True"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(store.port)), ("TORCHELASTIC_RESTART_COUNT", "0"), ("WORLD_SIZE", "2"),
                        ("RANK", "0")):
        monkeypatch.setenv(name, value)
    machine.tell_failure(3)
    monkeypatch.setattr(evaluation, "evaluate", lambda model, r: (_ for _ in ()).throw(KeyboardInterrupt()))
    r = train.Run({**train.DEFAULTS, "out_dir": str(tmp_path)}, rank=0, world=2)
    assert evaluation.score(None, r, None, {"val_loss": 1.0}) is False
    assert capsys.readouterr().out == "" and machine.first_failure() == 3
    monkeypatch.setattr(train, "train", lambda cfg: {"interrupted": True})
    left = []
    monkeypatch.setattr(machine, "leave", left.append)
    train.main(["--max_iters=1"])
    assert left == [3]


# rank 1 is stopped alone (SIGTERM) while scoring, once rank 0 waits in a collective of the scoring for it
RANK_1_STOPPED_WHILE_RANK_0_WAITS = """import os, signal, time
import evaluation
import train

if os.environ["RANK"] == "0":
    gather = evaluation.dist.all_gather_object
    evaluation.dist.all_gather_object = lambda *a: open({flag!r}, "w").close() or gather(*a)
    if {slowed}:  # torchrun's SIGTERM, sent once rank 1 has left, then reaches rank 0 in its teardown
        destroy = train.dist.destroy_process_group
        train.dist.destroy_process_group = lambda: time.sleep(3) or destroy()
else:
    real = evaluation.evaluate

    def evaluate(model, r):
        while not os.path.exists({flag!r}):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        return real(model, r)
    evaluation.evaluate = evaluate
train.main()
"""


@needs_distributed_torch
@pytest.mark.parametrize("slowed", [False, True])
def test_under_torchrun_a_sigterm_to_another_rank_while_scoring_says_how_to_score_once_and_every_rank_exits_130(
        run_data, tmp_path, slowed):
    """A SIGTERM to rank 1 alone while rank 0 waits for it in a collective of the scoring: rank 1 left with 130, saying
    nothing (rank 0 said it), and rank 0, its collective broken, was ended by torchrun with 143, silent too: the run
    ended without the command that scores it. Or torchrun's SIGTERM reached rank 0 once it had left the scoring, in its
    teardown (slowed: always), and ended it with -15 (see below)."""
    out, script = tmp_path / "run", tmp_path / "rank_1_stopped.py"
    script.write_text(RANK_1_STOPPED_WHILE_RANK_0_WAITS.format(flag=str(tmp_path / "rank 0 waits"), slowed=slowed))
    flags = train_flags(run_data, out, "--max_iters=2", "--eval_interval=2", "--eval_iters=0", "--eval_limit=1",
                        "--device=cpu")
    with tempfile.TemporaryDirectory() as tmp:  # torchrun leaves a log folder (torchelastic_*) in TMPDIR at every run
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": tmp}
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(script), "--", *flags], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    assert done.stdout.count("stopped while scoring") == 1, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.endswith(f"\nstopped while scoring: the trained adapters are saved in {out}; score them with "
                                "the same command plus --eval_only=True\n"), done.stdout[-2000:]
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", done.stderr)) == {"130"}, done.stderr[-3000:]
    assert (out / "adapter.pt").is_file() and not (out / "results.json").exists()


def test_under_torchrun_a_sigterm_once_the_run_has_ended_leaves_with_the_first_failures_code(monkeypatch):
    """Once train's sigterm_as_ctrl_c ends, the process is on its way out (train's teardown, main's exit code): SIGTERM
    went back to its own action there, so torchrun's, sent once another rank stopped while scoring had left with 130,
    ended rank 0 with -15 (the test above, one run in 3 on a busy machine). Under torchrun it leaves with the first
    failure's code; a caller's own handler is given back, and outside torchrun SIGTERM's own action."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in (("TORCHELASTIC_USE_AGENT_STORE", "True"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(store.port)), ("TORCHELASTIC_RESTART_COUNT", "0"), ("WORLD_SIZE", "2"),
                        ("TORCHELASTIC_RUN_ID", "x"), ("RANK", "0")):
        monkeypatch.setenv(name, value)
    left, own = [], lambda signum, frame: None
    monkeypatch.setattr(machine, "leave", left.append)
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as torchrun starts its processes
    try:
        with machine.sigterm_as_ctrl_c():
            machine.tell_failure(machine.INTERRUPTED)  # the other rank, stopped while scoring
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL, "torchrun's SIGTERM now ends it with -15"
        signal.raise_signal(signal.SIGTERM)  # torchrun's
        assert left == [machine.INTERRUPTED]
        signal.signal(signal.SIGTERM, own)
        with machine.sigterm_as_ctrl_c():
            pass
        assert signal.getsignal(signal.SIGTERM) is own
        monkeypatch.delenv("TORCHELASTIC_RUN_ID")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with machine.sigterm_as_ctrl_c():
            pass
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_every_rank_keeps_the_scores_in_its_summary_and_rank_0_alone_prints_them_and_writes_results_json(
        tmp_path, monkeypatch, capsys):
    """Under torchrun each rank scores its share and gets every score (evaluation.evaluate gathers them); the table and
    results.json are rank 0's alone: another rank printing and writing them too would show the table twice."""
    task = evaluation.task_of("qa")
    monkeypatch.setattr(evaluation, "evaluate", lambda model, r: ({"qa": 50.0}, {"qa": torch.tensor([0.25, 0.75])}))
    for master in (False, True):
        cfg = {**train.DEFAULTS, "out_dir": str(tmp_path / str(master)), "eval_dir": str(tmp_path)}
        os.makedirs(cfg["out_dir"])
        r = train.Run(cfg, rank=1 - master, world=2, device=torch.device("cpu"))
        r.eval_sets = {"qa": (task, [{"instruction": "q", "input": "", "output": "a"}])}
        summary = {"val_loss": 1.0, "step": 2, "train_losses": [2.0, 1.0], "model": torch.nn.Linear(1, 1)}
        assert evaluation.score(None, r, None, summary) is True
        assert summary["scores"] == {"qa": 50.0} and summary["chance"] == {"qa": 0.0}
        assert summary["expert_load"] == {"qa": [0.25, 0.75]}
        written = os.listdir(cfg["out_dir"]) == ["results.json"]
        assert written == master and ("qa " in capsys.readouterr().out) == master
        if master:
            results = json.loads((tmp_path / "True" / "results.json").read_text())
            assert results == {k: v for k, v in summary.items() if k not in ("train_losses", "model")}


def test_a_stop_is_announced_by_rank_0_alone_and_a_request_on_any_rank_stops_every_rank(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    for master in (False, True):
        stop = machine.StopAfterStep(master)
        for _ in range(2):  # a second SIGTERM never stops at once
            stop(signal.SIGTERM, None)
        assert stop.asked and not stop.forced
        assert capsys.readouterr().err.count("stopping after this step, with a checkpoint") == (1 if master else 0)
    cpu = torch.device("cpu")
    monkeypatch.setattr(machine.dist, "all_reduce", lambda t: t.add_(1))  # the other rank was asked
    assert machine.StopAfterStep(True).agreed(cpu, 2)
    monkeypatch.setattr(machine.dist, "all_reduce", lambda t: t)  # no rank was
    assert not machine.StopAfterStep(True).agreed(cpu, 2)


def test_the_loop_stops_when_the_ranks_agree_though_its_own_process_was_not_asked(run_data, tmp_path, monkeypatch):
    """The loop asks agreed(), not its own process's flag: a rank that got no signal stops after the same step as
    the one that did, with its checkpoint, instead of training on into a collective that never comes."""
    monkeypatch.setattr(machine.StopAfterStep, "agreed", lambda self, device, world: True)  # another rank was asked
    stopped = train.train(train.parse_config(train_flags(run_data, tmp_path / "run", "--eval_dir=")))
    assert stopped["interrupted"] and stopped["step"] == 1
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["iter"] == 1


def test_under_torchrun_a_second_ctrl_c_neither_stops_at_once_nor_is_offered(monkeypatch, capsys):
    """torchrun passes the terminal's Ctrl-C on to processes that got it already (each gets two): under it (RANK set)
    a second SIGINT waits for the step's checkpoint too, and the notice offers a second Ctrl-C only outside it."""
    monkeypatch.setenv("RANK", "0")
    stop = machine.StopAfterStep(True)
    try:
        for _ in range(2):
            stop(signal.SIGINT, None)
    except KeyboardInterrupt:  # not out of the test: pytest would take it for the user's own Ctrl-C
        pytest.fail("a second Ctrl-C under torchrun stopped at once")
    assert stop.asked and not stop.forced
    err = capsys.readouterr().err
    assert "stopping after this step, with a checkpoint" in err and "Ctrl-C again" not in err
    monkeypatch.delenv("RANK")
    stop = machine.StopAfterStep(True)
    stop(signal.SIGINT, None)
    assert "(Ctrl-C again: at once, keeping the last one)" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        stop(signal.SIGINT, None)
    assert stop.forced


def test_outside_the_main_thread_the_signal_handlers_are_left_as_they_are():
    """Python delivers signals to its main thread only and refuses a handler set from another: train() called from
    a worker thread (a notebook's, a scheduler's) runs without taking SIGINT or SIGTERM."""
    import threading

    def handlers():
        return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    before, seen, errors = handlers(), [], []

    def worker():
        try:
            with machine.sigterm_as_ctrl_c():
                stop = machine.StopAfterStep(True).install()
                seen.append(handlers())
                stop.restore()
        except Exception as e:  # ValueError: signal only works in main thread
            errors.append(e)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert errors == [] and seen == [before] and handlers() == before


def test_a_stop_writes_only_the_checkpoint_it_lacks_and_names_the_one_a_stop_at_once_keeps(tmp_path, monkeypatch,
                                                                                           capsys):
    """Right after a step's checkpoint there is nothing to write again (at 7B, minutes of a SIGTERM's grace period);
    a stop at once keeps the last checkpoint, that of step 0 too (a run stopped before its first step, resumed)."""
    saves = []

    def save_checkpoint(r, raw, opt, step, **kw):  # as the real one: ckpt.pt written, the run's checkpoint now
        saves.append(step)
        r.written = step
    monkeypatch.setattr(train.checkpoint, "save_checkpoint", save_checkpoint)
    r, stop = train.Run({"out_dir": str(tmp_path)}, written=3), machine.StopAfterStep(True)  # the loop's, just now
    assert train.checkpoint.stop_run(r, None, None, stop, 3, 3) == 3 and saves == []
    assert f"checkpoint of step 3 written to {tmp_path}" in capsys.readouterr().out
    assert train.checkpoint.stop_run(r, None, None, stop, 4, 3) == 4 and saves == [4]
    stop.forced = True  # a second Ctrl-C, one step after the resume of a checkpoint of step 0
    assert train.checkpoint.stop_run(r, None, None, stop, 1, 0) == 0 and saves == [4]
    out = capsys.readouterr().out
    assert f"stopped at once: the checkpoint of step 0 in {tmp_path} is kept" in out and "--overwrite" not in out
    # the demo's pretraining, stopped before its first checkpoint: the same command starts it again by itself
    r = train.Run({"out_dir": str(tmp_path)}, resume_with="the same command")
    assert train.checkpoint.stop_run(r, None, None, stop, 1, None) == 0
    out = capsys.readouterr().out
    assert "before the run wrote a checkpoint: start the same command" in out and "--overwrite" not in out


def test_only_rank_0_checks_that_out_dir_can_be_written_and_removes_leftover_temporaries(tmp_path, monkeypatch):
    """Rank 0 writes every file of a run: the other ranks (on other nodes, perhaps without out_dir) only check that it
    holds no other run, and leave the temporaries of killed writes to rank 0 (two ranks removing one would race),
    which removes them only once it holds out_dir (take)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt.tmp999999").write_bytes(b"half a checkpoint of a process that was killed")
    cfg = {"out_dir": str(out), "init_from": "scratch", "overwrite": False, "data_dir": "", "eval_dir": "",
           "eval_only": False}

    def refused(*args, dir=None, **kw):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    train.claim_out_dir(train.Run(cfg, 1, 2), False)
    assert (out / "ckpt.pt.tmp999999").exists()
    with pytest.raises(train.UserError, match="is not writable"):
        train.claim_out_dir(train.Run(cfg, 0, 2), False)
    monkeypatch.undo()
    train.claim_out_dir(train.Run(cfg, 0, 2), False)
    assert (out / "ckpt.pt.tmp999999").exists()  # not held yet: it may be a live writer's on another host
    train.claim_out_dir(train.Run(cfg, 0, 2), False, take=True)
    assert not (out / "ckpt.pt.tmp999999").exists()


def test_a_runs_relative_path_that_is_not_found_says_to_run_in_the_folder_train_py_ran_in(tmp_path, monkeypatch):
    """A run's paths are as typed: a relative one that is not found from here is most likely the wrong folder."""
    monkeypatch.chdir(tmp_path)
    cfg = {"tokenizer": "data/tok.model", "init_from": "scratch"}
    with pytest.raises(train.UserError, match=r"^the run's tokenizer data/tok\.model is not found from here; run "
                                              r"sample\.py in the folder that train\.py ran in \(the run's paths are "
                                              r"relative to it\)\.$"):
        files.check_run_paths(cfg, ["tokenizer", "init_from"], "sample.py")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tok.model").write_text("found")
    files.check_run_paths(cfg, ["tokenizer", "init_from"])  # scratch is no path


def test_a_runs_relative_path_names_the_folder_train_py_ran_in_only_where_the_path_is_found_there(tmp_path,
                                                                                                  monkeypatch):
    """The folder ran_in is named where the path is there, so running the script in it finds the path; where it is not
    there either (moved since), naming it would send the user to a folder where the same sentence comes again."""
    monkeypatch.chdir(tmp_path)
    proj = tmp_path / "proj"
    proj.mkdir()
    cfg = {"tokenizer": "data/tok.model", "init_from": "scratch"}
    unnamed = "not found from here; run sample.py in the folder that train.py ran in "
    with pytest.raises(train.UserError, match=unnamed) as e:
        files.check_run_paths(cfg, ["tokenizer", "init_from"], "sample.py", ran_in=str(proj))
    assert str(proj) not in str(e.value)
    (proj / "data").mkdir()
    (proj / "data" / "tok.model").write_text("found")
    with pytest.raises(train.UserError, match=f"run sample.py in {re.escape(str(proj))}, the folder that train.py ran"):
        files.check_run_paths(cfg, ["tokenizer", "init_from"], "sample.py", ran_in=str(proj))


def test_folder_ran_in_may_be_the_root_folder():
    """A run given out_dir=out in / (a container's working folder) ran in /, not in the empty string."""
    assert files.folder_ran_in(os.sep + "out", "out") == os.sep
    assert files.folder_ran_in(os.sep + os.path.join("out", "x"), os.path.join("out", "x")) == os.sep


def test_a_run_resumed_or_sampled_from_another_folder_is_told_the_folder_it_ran_in(run_data, tmp_path, monkeypatch,
                                                                                   capsys):
    """The run's relative paths lead from the folder train.py ran in, which the sentence named only as "the folder
    that train.py ran in": it names it, found from where the run is now and the out_dir it was given there, and
    what it says works."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(run_data / "tokenizer.model", proj / "tok.model")
    monkeypatch.chdir(proj)
    train.train(train.parse_config(train_flags(run_data, "out/x", "--max_iters=2", "--eval_dir=",
                                               "--tokenizer=tok.model")))
    monkeypatch.chdir(tmp_path / "proj" / "out")
    for script, argv in (("train.py", ["--out_dir=x", "--init_from=resume", "--max_iters=3"]),
                         ("sample.py", ["--out_dir=x", "--instruction=q"])):
        module = train if script == "train.py" else sample
        err = script_error(module.main, argv, capsys)
        assert err == (f"{script}: error: the run's tokenizer tok.model is not found from here; run {script} in "
                       f"{proj}, the folder that train.py ran in (the run's paths are relative to it).")
    monkeypatch.chdir(proj)
    assert train.train(train.parse_config(["--out_dir=out/x", "--init_from=resume", "--max_iters=3"]))["step"] == 3


@pytest.mark.parametrize("found_at,given,ran_in", [
    ("proj/out/x", "out/x", "proj"), ("proj/out/x", "./out//x/", "proj"), ("proj/out/x", ".", "proj/out/x"),
    ("proj/out/x", "x", "proj/out"), ("out/x", "out/x", "."),
    ("proj/out/x", "other/x", None), ("proj/bout/x", "out/x", None), ("proj/out/x", "/abs/out/x", None),
    ("proj/out/x", "../out/x", None)])
def test_folder_ran_in_is_where_the_run_is_now_less_the_out_dir_it_was_given(tmp_path, monkeypatch, found_at, given,
                                                                               ran_in):
    monkeypatch.chdir(tmp_path)
    want = None if ran_in is None else os.path.normpath(tmp_path / ran_in)
    assert files.folder_ran_in(found_at, given) == want


def test_eval_only_of_a_demo_run_on_an_out_dir_that_cannot_be_written_is_refused_before_the_base_is_pretrained_again(
        tmp_path, monkeypatch, capsys):
    """A re-scoring writes results.json into out_dir: where it can not, that is said before the minutes of
    pretraining a deleted demo base again, not after (the base is left unmade)."""
    base = demo_run_without_its_base(tmp_path, monkeypatch)
    blocked_parent = files.blocked_parent

    def read_only_demo(path):  # out/demo alone is read-only: the pretraining's own folder is not
        if os.path.dirname(os.path.abspath(path)) == str(tmp_path / "out" / "demo"):
            return "out/demo is not writable (Permission denied)"
        return blocked_parent(path)
    monkeypatch.setattr(files, "blocked_parent", read_only_demo)
    fails(["--eval_only=True", f"--eval_dir={minicme.DEMO['eval_dir']}", "--eval_limit=1"], capsys,
          "out_dir out/demo can not be written", "copy the run to a folder you can write")
    assert not base.exists()


def test_a_run_on_an_out_dir_that_holds_another_run_is_refused_before_its_data_is_read(run_data, tmp_path, capsys,
                                                                                        monkeypatch):
    """out_dir is checked first in setup: a run it would replace is one sentence before the shards and evaluation
    sets are opened (on every rank: rank 0 alone checks again once it holds the folder)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter.pt").write_bytes(b"another run's")
    monkeypatch.setattr(train, "datasets", lambda cfg: pytest.fail("the data was read before the refusal"))
    fails(train_flags(run_data, out), capsys, f"{out} already holds a run (adapter.pt)")
    assert (out / "adapter.pt").read_bytes() == b"another run's"


@pytest.mark.usefixtures("at_a_fresh_root")  # the demo's data_dir, compared with out_dir: not the user's
def test_a_re_scoring_of_a_full_run_by_its_own_model_pt_is_not_refused_as_a_run_it_would_replace(tmp_path):
    """eval_only replaces nothing in out_dir: init_from naming the model.pt there (a full run kept without its
    ckpt.pt, scored as it is) is not "the run in out_dir that overwrite=True would replace"."""
    out = tmp_path / "full"
    out.mkdir()
    for f in ("model.pt", "results.json"):
        (out / f).write_bytes(b"")
    cfg = train.parse_config([f"--out_dir={out}", "--adapter=none", "--eval_only=True",
                              f"--init_from={out / 'model.pt'}"])
    train.claim_out_dir(train.Run(cfg), resuming=False)
    with pytest.raises(train.UserError, match=r"is the run in .* that overwrite=True would replace"):  # a new run would
        train.claim_out_dir(train.Run({**cfg, "eval_only": False, "overwrite": True}), resuming=False)


class _Killed(BaseException):
    """What SIGKILL does to a process, in one: nothing after it runs (no handler, no except clause takes it)."""


def test_a_kill_after_a_resumes_validation_of_a_stopped_step_leaves_that_step_validated_once_in_the_log(
        run_data, tmp_path, monkeypatch):
    """A resume validates the step whose validation a stop cut short, logs it, then rewrites the step's checkpoint as
    validated; killed (or stopped at once) in between, the checkpoint still says unvalidated, and the next resume
    validates the step again: its log held that validation twice, unlike the uninterrupted run's."""
    flags = ("--eval_dir=", "--eval_iters=3", "--log_interval=1", "--threads=1")
    train.train(train.parse_config(train_flags(run_data, tmp_path / "whole", *flags)))
    _signals_in_validation(monkeypatch, 3, signal.SIGTERM)
    out = tmp_path / "run"
    assert train.train(train.parse_config(train_flags(run_data, out, *flags)))["step"] == 3
    monkeypatch.undo()

    real = train.checkpoint.save_atomic

    def killed(obj, path):  # at the resume's ckpt.pt of step 3, once validated (its adapter.pt is written before)
        if path.endswith("ckpt.pt"):
            raise _Killed
        real(obj, path)
    monkeypatch.setattr(train.checkpoint, "save_atomic", killed)
    with pytest.raises(_Killed):
        train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume"]))
    assert logged(out)[-1][0] == 3 and logged(out)[-1][2] is not None  # step 3's validation, logged
    assert torch.load(out / "ckpt.pt", weights_only=True)["validated"] is False
    monkeypatch.undo()
    resumed = train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume"]))
    assert not resumed.get("interrupted") and logged(out) == logged(tmp_path / "whole")
