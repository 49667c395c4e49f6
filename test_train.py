"""train.py: configuration, the loop (losses, accumulation, resume, interruptions, torchrun), evaluation.

    python -m pytest -q
"""
import collections
import difflib
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import textwrap
import weakref
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import conftest
import data
import evaluation
import files
import machine
import minicme
import model
import teamlora
import train
from baselines import HydraLoRALinear
from conftest import (
    LLAMA2,
    TEXTS,
    adapters_of,
    assert_same_adapters,
    cuda_fp32_matmuls,
    folders_named,
    hf_tokenizer_folder,
    needs_fixtures,
    repository_files,
    train_cfg,
    with_vocabulary,
)
from data import UserError
from minicme import SYNTHETIC_TASKS
from model import Transformer
from teamlora import TeamLoRALinear

REPO = Path(__file__).resolve().parent


def test_config_file_then_flags_override_the_defaults(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("r = 16\nexperts = 8\nlearning_rate = 1  # an int where a float is expected is fine\n"
                        "adapter = 'lora'\n")
    cfg = train.parse_config([str(cfg_file), "--experts=2", "--targets=w1,w3"])
    assert (cfg["r"], cfg["experts"], cfg["learning_rate"], cfg["adapter"], cfg["targets"]) == (
        16, 2, 1.0, "lora", "w1,w3")
    assert cfg["alpha"] == train.DEFAULTS["alpha"]
    assert train.parse_config([])["adapter"] == "teamlora"


def test_by_default_train_py_adapts_the_papers_ffn_with_the_authors_dropout():
    """The paper adapts the FFN only (Meta's w1, w2, w3) for every method, with the authors' dropout: the layer's own
    default (0.05, which test_layout.py holds to the README's signature), so a run without flags is the paper's."""
    import inspect
    assert sorted(train.DEFAULTS["targets"].split(",")) == ["w1", "w2", "w3"]
    assert train.DEFAULTS["dropout"] == inspect.signature(TeamLoRALinear).parameters["dropout"].default
    assert train.DEFAULTS["dropout"] == inspect.signature(teamlora.inject).parameters["dropout"].default


def test_a_recipe_named_as_the_readme_names_it_from_another_folder_is_named_with_its_path(tmp_path, monkeypatch):
    """`python ~/teamlora/train.py config/cme_llama2_7b.py` in one's data folder: it was "config file
    'config/cme_llama2_7b.py' does not exist; the configs are in config/.", though config/ was what the user named. A
    config/ of the user's own in that folder is theirs to run."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(train.UserError, match=rf"^config file 'config/cme_llama2_7b\.py' does not exist in the current "
                       rf"folder; the project's is {re.escape(str(REPO / 'config' / 'cme_llama2_7b.py'))}: pass that "
                       r"path\.$"):
        train.parse_config(["config/cme_llama2_7b.py", "--dry_run=True"])
    with pytest.raises(train.UserError, match=r"^config file 'config/nothing\.py' does not exist; the configs are in"):
        train.parse_config(["config/nothing.py"])  # a name the project has not either
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "cme_llama2_7b.py").write_text("r = 8\nexperts = 2\n")
    assert train.parse_config(["config/cme_llama2_7b.py"])["experts"] == 2
    (tmp_path / "config" / "cme_llama3_8b.py").mkdir()  # the user's own, a folder: named as one, not as missing
    with pytest.raises(train.UserError, match=r"^config file 'config/cme_llama3_8b\.py' is a folder, not a file"):
        train.parse_config(["config/cme_llama3_8b.py"])


def test_a_path_in_a_config_file_written_with_a_tilde_is_the_home_folder_as_in_a_flag(tmp_path, monkeypatch):
    """out_dir = "~/runs/lora" in a recipe trained into a folder named "~" in the current one (whose removal, rm -rf ~,
    is the home folder's); a flag's ~ was the home folder already. A ~ inside a path stays as written."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = tmp_path / "c.py"
    config.write_text('out_dir = "~/runs/lora"\ntokenizer = "~"\ndata_dir = "data/~/x"\n')
    cfg = train.parse_config([str(config)])
    assert (cfg["out_dir"], cfg["tokenizer"], cfg["data_dir"]) == (str(tmp_path / "home" / "runs" / "lora"),
                                                                   str(tmp_path / "home"), "data/~/x")
    assert train.parse_config([str(config), "--out_dir=~/b"])["out_dir"] == str(tmp_path / "home" / "b")


def test_a_data_file_given_as_the_config_is_refused_unrun(tmp_path):
    """`python train.py cme/train.jsonl`: each record ran as Python (a dict expression), which for the CME's gigabytes
    took tens of GB before "sets no key"; a config is a few kB of key = value lines, comments and all."""
    data = tmp_path / "train.jsonl"
    data.write_text("r = 16\n" + '{"instruction": "q", "input": "", "output": "a"}\n' * 25_000)
    size = data.stat().st_size
    assert size > train.configurator.CONFIG_BYTES
    with pytest.raises(train.UserError, match=rf"^config file '{re.escape(str(data))}' holds {size:,} bytes, too many "
                       r"for a config of key = value lines; give the run its data as --data_dir, a folder that python "
                       r"data\.py prepare wrote\.$"):
        train.parse_config([str(data)])
    config = tmp_path / "c.py"
    config.write_text("# a comment of a recipe\n" * 2000 + "r = 16\n")
    assert train.parse_config([str(config)])["r"] == 16


def test_a_text_setting_takes_a_flags_text_as_written_and_a_config_file_stays_python(tmp_path):
    """--out_dir=5 or --out_dir=2024.12 name folders: a text key keeps the flag's text, which would otherwise read
    as a number and be refused as one (a quoted text still reads as Python does). A config file is Python: there
    `out_dir = 5` is an int, refused with the key named, and an int for a float key still becomes a float."""
    cfg = train.parse_config(["--out_dir=5", "--tokenizer=2024.12", "--dtype='float32'", "--r=8", "--alpha=2"])
    assert (cfg["out_dir"], cfg["tokenizer"], cfg["dtype"], cfg["r"], cfg["alpha"]) == ("5", "2024.12", "float32", 8,
                                                                                          2.0)
    assert type(cfg["alpha"]) is float
    (tmp_path / "c.py").write_text("out_dir = 5\n")
    with pytest.raises(train.UserError, match=r"config key 'out_dir' in config file .*c.py must be of type str, got 5"):
        train.parse_config([str(tmp_path / "c.py")])


@pytest.mark.parametrize("argv,message", [
    (["--lerning_rate=1e-3"],
     r"unknown config key 'lerning_rate' in flag --lerning_rate=1e-3; did you mean 'learning_rate'\?"),
    (["--r=abc"], r"config key 'r' in flag --r=abc must be of type int, got 'abc'"),
    (["--competition=maybe"],
     r"config key 'competition' must be True, False or None \(the method's own\), got 'maybe'"),
    # a number is not a switch: adapter_kwargs reads 0 and 0.0 (equal to False, not False) as competition on
    (["--competition=0"], r"config key 'competition' must be True, False or None \(the method's own\), got 0\."),
    (["--competition=1.0"], r"config key 'competition' must be True, False or None \(the method's own\), got 1.0\."),
    (["--max_iters=2.5"], r"'max_iters' .* must be of type int, got 2.5"),
    (["config/nope.py"], r"config file 'config/nope.py' does not exist"),
    (["--adapter=dora"], r"'adapter' must be one of teamlora, moelora, hydralora, lora, none, got 'dora'"),
    (["--r=10", "--experts=4"], r"r=10 is not a multiple of experts=4"),
    (["--adapter=moelora", "--r=10", "--experts=4"], r"r=10 is not a multiple of experts=4"),
    (["--batch_size=10", "--grad_accum=4"], r"batch_size=10 must be a multiple of grad_accum=4"),
    (["--eval_only"], r"flag '--eval_only' needs a value: write --eval_only=True\.$"),  # a switch: its value named
    (["--dry_run", "--r=8"], r"^flag '--dry_run' needs a value: write --dry_run=True\.$"),
    # a misspelt key without a value is named as misspelt, not sent back for a value only to be refused again
    (["--lerning_rate"], r"unknown config key 'lerning_rate' in flag --lerning_rate; did you mean 'learning_rate'\?"),
    (["--adapter", "lora"], r"flag '--adapter' needs a value: write --adapter=VALUE\.$"),  # not "config file 'lora'"
    (["config/cme_llama2_7b.py", "--adapter", "lora"], r"flag '--adapter' needs a value"),  # before any file runs
    (["--dtype=float16"], r"'dtype' must be one of float32, bfloat16"),
    # a misspelt preset: ignored without a word where init_from was not "scratch" (the demo's base.pt, a folder)
    (["--model=llama9"], r"'model' must be one of llama2-7b, .*, tiny, small, got 'llama9'\."),
    (["--experts=0"], r"config key 'experts' must be positive, got 0"),
    (["--log_interval=0"], r"config key 'log_interval' must be positive, got 0"),
    (["--eval_batch_size=0"], r"config key 'eval_batch_size' must be positive, got 0"),
    (["--lr_decay_iters=abc"], r"config key 'lr_decay_iters' must be None or a positive integer, got 'abc'"),
    (["--r=True"], r"config key 'r' in flag --r=True must be of type int, got True"),
    (["--device=tpu"], r"config key 'device' must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--device=cuda:0,1"], r"config key 'device' must be auto, cpu, cuda or cuda:N, got 'cuda:0,1'"),  # one GPU each
    (["--adapter=none", "--competition=True"], r"competition=True mixes .* which adapter=none does not have; "
                                               r"use adapter=teamlora or moelora,"),
    (["--adapter=hydralora", "--competition=True"], r"which adapter=hydralora does not have"),  # before its build
    # an empty or blank path would name the current folder: its files read as the base, the shards or the tokenizer
    (["--init_from="], r"config key 'init_from' is empty; give it a path"),
    (["--data_dir= "], r"config key 'data_dir' is empty; give it a path"),
    (["--dropout=2.0"], r"config key 'dropout' must be in \[0, 1\), got 2.0"),
    (["--learning_rate=-1"], r"config key 'learning_rate' must be in \[0, 1\] \(an AdamW step moves each weight by "
                             r"about that much\), got -1.0"),
    (["--min_lr_ratio=1.5"], r"config key 'min_lr_ratio' must be in \[0, 1\], got 1.5"),
    (["--eval_iters=-1"], r"config key 'eval_iters' must be 0 or more, got -1"),
    (["--learning_rate=True"],
     r"config key 'learning_rate' in flag --learning_rate=True must be of type float, got True"),
    (["--dropout=1.0"], r"config key 'dropout' must be in \[0, 1\), got 1.0"),
    (["--beta2=1"], r"config key 'beta2' must be in \[0, 1\), got 1.0"),
    (["--compile=yes"], r"config key 'compile' in flag --compile=yes must be of type bool, got 'yes'"),
    (["--eval_only=false"], r"config key 'eval_only' in flag --eval_only=false must be of type bool, got 'false'"),
    (["--fsdp=1"], r"config key 'fsdp' in flag --fsdp=1 must be of type bool, got 1\."),
    (["--=5"], r"argument '--=5' is not of the form --key=value\."),
    # one hyphen, or a dash a web page typeset: it was "config file '-r=16' does not exist; the configs are in config/."
    (["-r=16"], r"^argument '-r=16' is not of the form --key=value \(two hyphens\)\.$"),
    (["\u2014max_iters=2"], r"^argument '\u2014max_iters=2' is not of the form --key=value \(two hyphens\)\.$"),
    # thousands of operators in a row: ast.literal_eval's RecursionError or MemoryError was a traceback
    (["--max_iters=1" + "+1" * 3000], r"config key 'max_iters' in flag --max_iters=1\+1\+1.* must be of type int"),
    (["--max_iters=" + "-" * 20_000 + "1"], r"config key 'max_iters' in flag --max_iters=---.* must be of type int"),
    # past int64: r crashed the dry run ("Storage size calculation overflowed"), max_len met model.py's wording
    ([f"--r={4 * 10**22}"], r"^config key 'r' must be below 2\*\*63, got 40000000000000000000000\.$"),
    ([f"--max_len={10**20}"], r"^config key 'max_len' must be below 2\*\*63, got 100000000000000000000\.$"),
    # numpy's "Maximum allowed size exceeded" at step 1, after log.jsonl was written
    ([f"--batch_size={10**18}"], r"^batch_size=1000000000000000000 streams more examples than numpy indexes; lower "
                                 r"--batch_size\.$"),
    ([f"--batch_size={2**30}", f"--eval_iters={2**30}"], r"^batch_size=1073741824 streams more examples"),  # validation
])
def test_configuration_errors_name_the_key_in_one_sentence(argv, message, capsys):
    with pytest.raises(train.UserError, match=message):
        train.parse_config(argv)
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("typo, meant", [("iter", "max_iters"), ("exp", "experts"), ("dro", "dropout"),
                                         ("size", None), ("evl", None)])
def test_a_key_at_least_60_percent_like_a_misspelt_one_is_suggested_and_a_less_like_one_is_not(typo, meant):
    """difflib's similarity (twice the characters in common over both lengths): iter is 0.615 like max_iters, exp and
    dro 0.6 like experts and dropout; size (0.571 like batch_size) and evl (0.545 like eval_dir) are too far to be
    what was meant, and naming a key for them would mislead."""
    similarity = max(difflib.SequenceMatcher(None, typo, key).ratio() for key in train.DEFAULTS)
    assert (similarity >= 0.6) == (meant is not None)  # what the cases were chosen for
    with pytest.raises(train.UserError) as error:
        train.parse_config([f"--{typo}=1"])
    hint = f"; did you mean '{meant}'?" if meant else "."
    assert str(error.value) == f"unknown config key '{typo}' in flag --{typo}=1{hint}"


@pytest.mark.parametrize("typo, meant", [("R", "r"), ("LEARNING_RATE", "learning_rate"), ("Out_Dir", "out_dir"),
                                         ("DRY_RUN", "dry_run")])
def test_a_key_given_in_another_case_is_suggested_as_its_key(typo, meant):
    """difflib's similarity counts R and r as unlike: --R=16, or a key written as an environment variable's name
    (--LEARNING_RATE=1e-3), was named with no key, or with a wrong one."""
    with pytest.raises(train.UserError) as error:
        train.parse_config([f"--{typo}=1"])
    assert str(error.value) == f"unknown config key '{typo}' in flag --{typo}=1; did you mean '{meant}'?"


def test_a_refusal_of_train_py_starts_with_its_name_as_every_scripts_does(monkeypatch, capsys):
    """data.py, tasks.py, sample.py and study.py begin their refusals with their name (errors.exit_with); train.py
    printed a bare "error: ...", which in a log of several scripts (a shell script, a study) did not say whose it was.
    Its user errors and its out-of-memory sentence, as the command line prints them."""
    done = subprocess.run([sys.executable, "train.py", "--max_iters=soon"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr == "train.py: error: config key 'max_iters' in flag --max_iters=soon must be of type int, got " \
        "'soon'.\n"
    monkeypatch.setattr(train, "train", lambda cfg: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(SystemExit) as exit_:
        train.main([])
    assert exit_.value.code == 3 and capsys.readouterr().err.startswith("train.py: error: out of memory: ")


POSITIVE_KEYS = ("batch_size", "grad_accum", "max_iters", "max_len", "r", "experts", "eval_interval", "log_interval",
                 "eval_batch_size", "alpha", "grad_clip", "dry_run_world_size", "load_layers")
NON_NEGATIVE_KEYS = ("warmup_iters", "eval_iters", "eval_limit", "balance_coef", "weight_decay")
# threads: 100,000 OpenMP threads crash the process; seed: numpy takes no negative one, torch none of 2**64 or more
BOUNDED_KEYS = {"threads": (0, 1024, "[0, 1024]"), "seed": (0, 2**63 - 1, "[0, 2**63)")}


def test_every_numeric_key_refuses_values_out_of_its_range_and_takes_its_boundary():
    """The keys written out here, not read from train.RANGES: a check dropped from RANGES (grad_clip=0 zeroes
    every update, a negative weight_decay or balance_coef rewards growth) must fail this test."""
    for key in POSITIVE_KEYS:
        with pytest.raises(UserError, match=rf"config key '{key}' must be positive, got 0"):
            train.parse_config([f"--{key}=0"])
    for key in NON_NEGATIVE_KEYS:
        with pytest.raises(UserError, match=rf"config key '{key}' must be 0 or more, got -1"):
            train.parse_config([f"--{key}=-1"])
        assert train.parse_config([f"--{key}=0"])[key] == 0
    for bad in (-1e-9, 1.5, 2e4, 1e300):  # 2e4 for 2e-4 diverges; past float32's range AdamW's step raised
        shown = re.escape(str(bad))
        with pytest.raises(UserError, match=rf"config key 'learning_rate' must be in \[0, 1\] .*, got {shown}"):
            train.parse_config([f"--learning_rate={bad}"])
    assert [train.parse_config([f"--learning_rate={v}"])["learning_rate"] for v in (0, 1)] == [0, 1]
    for key, (low, high, shown) in BOUNDED_KEYS.items():
        for bad in (low - 1, high + 1):
            with pytest.raises(UserError, match=rf"config key '{key}' must be in {re.escape(shown)}, got {bad}"):
                train.parse_config([f"--{key}={bad}"])
        assert [train.parse_config([f"--{key}={v}"])[key] for v in (low, high)] == [low, high]
    for key in [k for k, v in train.DEFAULTS.items() if isinstance(v, float)]:  # 1e309 reads as inf
        for bad in ("1e309", "-1e309"):
            with pytest.raises(UserError, match=rf"config key '{key}' must be a finite number, got -?inf"):
                train.parse_config([f"--{key}={bad}"])
    with pytest.raises(UserError, match=r"config key 'alpha' in flag --alpha=1\d+ is too large for a float"):
        train.parse_config([f"--alpha={10**400}"])
    for key in ("dropout", "beta1", "beta2"):
        for bad in (-0.1, 1.0):
            with pytest.raises(UserError, match=rf"config key '{key}' must be in \[0, 1\), got {bad}"):
                train.parse_config([f"--{key}={bad}"])
        assert train.parse_config([f"--{key}=0.0"])[key] == 0.0
    with pytest.raises(UserError, match=r"config key 'min_lr_ratio' must be in \[0, 1\], got -0.1"):
        train.parse_config(["--min_lr_ratio=-0.1"])
    assert [train.parse_config([f"--min_lr_ratio={v}"])["min_lr_ratio"] for v in (0.0, 1.0)] == [0.0, 1.0]
    with pytest.raises(UserError, match=r"config key 'lr_decay_iters' must be None or a positive integer, got 0"):
        train.parse_config(["--lr_decay_iters=0"])
    assert train.parse_config(["--lr_decay_iters=5"])["lr_decay_iters"] == 5


def test_adamw_weight_decay_of_one_over_the_learning_rate_or_more_is_refused_before_training(run_data, tmp_path):
    """AdamW's decay is decoupled, each weight times 1 - learning_rate * weight_decay every step: from a product of 1 on
    it zeroes every weight or flips its sign whatever the data. weight_decay=1e300 trained into a nan loss told to lower
    the learning rate; it is refused by the config's check, so by the dry run too, and by a resume raising the rate."""
    for wd, want in ((2.0, [0.0, 0.0]), (3.0, [-1.0, 1.5])):  # lr 0.5, no gradient: the decay alone (Adam's step is 0)
        p = nn.Parameter(torch.tensor([2.0, -3.0]))
        p.grad = torch.zeros(2)
        torch.optim.AdamW([p], lr=0.5, weight_decay=wd).step()
        assert p.tolist() == want
    refused = r"learning_rate=.* with weight_decay=.* zeroes every weight or flips its sign .* product is below 1\.$"
    for flags in (["--weight_decay=1000"], ["--weight_decay=1e300"], ["--learning_rate=1", "--weight_decay=1"],
                  ["--learning_rate=0.5", "--weight_decay=2", "--dry_run=True"]):
        with pytest.raises(UserError, match=refused):
            train.parse_config(["--learning_rate=1e-3", *flags])
    for lr, wd in ((1e-3, 999.0), (0.0, 1e300), (1.0, 0.5)):  # a product below 1 (none at a rate of 0) is no error
        assert train.parse_config([f"--learning_rate={lr}", f"--weight_decay={wd}"])["weight_decay"] == wd
    out = tmp_path / "run"
    train.train(train_cfg(run_data, out, "--max_iters=1", "--eval_dir=", "--weight_decay=2.0"))
    for more in ([], ["--dry_run=True"]):
        with pytest.raises(UserError, match=refused):
            train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume", "--max_iters=2",
                                            "--learning_rate=0.5", *more]))


@pytest.mark.parametrize("adapter", ["teamlora", "moelora", "hydralora", "lora"])
def test_an_alpha_whose_scaling_is_past_float32_is_refused_as_the_layers_compute_it(adapter):
    """Each adapter layer multiplies its float32 update by its scaling (alpha / r_B; MoELoRA's alpha / k over r_B,
    HydraLoRA's alpha / k over heads of width r): past float32's largest number that is inf and every output nan from
    the first step (alpha=1e39 was told to lower the learning rate). Refused exactly where the layers train.py builds
    overflow, for each method's own scaling; full training has no alpha."""
    x, seen = torch.randn(3, 16), set()
    for alpha in (1e36, 1e38, 1e39, 1e40, 1e41, 1e300):
        flags = [f"--adapter={adapter}", "--r=8", "--experts=4", f"--alpha={alpha}"]
        kw = train.adapter_kwargs(dict(train.DEFAULTS, adapter=adapter, r=8, experts=4, alpha=alpha))
        layer = kw.pop("cls", TeamLoRALinear)(nn.Linear(16, 16), dropout=0.0, **kw)
        overflows = bool(torch.tensor(layer.scaling, dtype=torch.float32).isinf())
        seen.add(overflows)
        if overflows:
            assert not torch.isfinite(layer(x)).all()  # B is zero at the start: inf times 0
            said = re.escape(f"alpha={alpha:g} makes the adapters' scaling ")
            with pytest.raises(UserError, match=f"^{said}.* past float32's largest number, so the first step would be "
                                                "nan; lower --alpha"):
                train.parse_config(flags)
        else:
            assert train.parse_config(flags)["alpha"] == alpha
        assert train.parse_config([*flags, "--adapter=none"])["alpha"] == alpha
    assert seen == {True, False}  # each method's threshold lies among the alphas tried


def test_a_balance_coef_past_float32_is_refused_where_a_balance_loss_is_computed():
    """The loss adds balance_coef times the balance loss in float32: past float32's largest number the first step's
    gradient is inf or nan, even where the experts are balanced (inf * 0). Refused where a router's balance loss is
    computed; LoRA, one expert and full training have none."""
    assert (torch.tensor(0.0) * 1e39).isnan() and (torch.tensor(0.1) * 1e39).isinf()
    for flags, computed in ((["--adapter=teamlora"], True), (["--adapter=moelora"], True),
                            (["--adapter=hydralora"], True), (["--adapter=lora"], False),
                            (["--adapter=teamlora", "--experts=1", "--r=8"], False), (["--adapter=none"], False)):
        for coef in (1e38, 1e39, 1e300):
            if coef > 1e38 and computed:
                said = re.escape(f"balance_coef={coef:g} makes the balance loss's weight ")
                with pytest.raises(UserError, match=f"^{said}.* past float32's largest number.*; lower --balance_coef"):
                    train.parse_config([*flags, f"--balance_coef={coef}"])
            else:
                assert train.parse_config([*flags, f"--balance_coef={coef}"])["balance_coef"] == coef


def test_every_count_past_int64_is_refused_by_its_key():
    """numpy and torch count sizes, positions and steps in int64: past it, a count failed deep inside them."""
    for key in [k for k, v in train.DEFAULTS.items() if type(v) is int or k == "lr_decay_iters"]:
        with pytest.raises(UserError, match=rf"^config key '{key}' must be (below 2\*\*63|in .*), got {2**63}\.$"):
            train.parse_config([f"--{key}={2**63}"])


@pytest.mark.parametrize("key,value,flags", [("r", 4 * 10**18, []), ("r", 260, ["--experts=4"]),
                                             ("experts", 10**18, ["--adapter=hydralora"])])
@pytest.mark.usefixtures("at_a_fresh_root")
def test_a_rank_or_experts_past_a_target_width_is_refused_before_anything_is_allocated(key, value, flags, capsys):
    """A (r x d_in), B (d_out x r) or the router (k x d_in) larger than the weight it adapts: the dry run built them
    on the meta device and crashed ("Storage size calculation overflowed") or ran out of memory (exit 3)."""
    argv = ["--dry_run=True", "--model=small", "--init_from=scratch", "--targets=w1,wq"]  # w1 and wq: 256 wide
    assert conftest.script_error(train.main, [*argv, f"--{key}={value}", *flags], capsys) == (
        f"train.py: error: {key}={value} is more than target w1's width of 256 features, where A, B or the router "
        f"alone would outgrow the weight it adapts; set --{key}=256 or less.")
    for adapter in ("teamlora", "moelora", "hydralora", "lora"):  # the width itself is taken
        train.train(train.parse_config([*argv, f"--adapter={adapter}", "--r=256"]))
    assert conftest.script_error(train.main, [*argv, f"--{key}={value}", *flags, "--targets=w2"], capsys) == (
        f"train.py: error: {key}={value} is more than target w2's width of 256 features, where A, B or the router "
        f"alone would outgrow the weight it adapts; set --{key}=256 or less.")  # w2: wider in (the FFN) than out


def test_a_run_refuses_huge_settings_before_out_dir_is_touched(run_data, tmp_path, capsys):
    """batch_size=10**18 wrote log.jsonl, then failed in numpy at step 1, leaving a run that cannot be resumed."""
    out = tmp_path / "run"
    for flag, fix in (("--r=4000000000000000000", "set --r=64 or less."), (f"--batch_size={10**18}", "--batch_size.")):
        assert conftest.script_error(train.main, conftest.train_flags(run_data, out, flag), capsys).endswith(fix)
        assert not out.exists()


def test_bad_config_file_and_missing_paths_give_one_sentence(tmp_path, run_data):
    bad = tmp_path / "bad.py"
    bad.write_text("r = = 3\n")
    with pytest.raises(train.UserError, match="config file .*bad.py' failed to run"):
        train.parse_config([str(bad)])
    unknown = tmp_path / "unknown.py"
    unknown.write_text("experst = 8\n")
    with pytest.raises(train.UserError, match="unknown config key 'experst' in config file .*; did you mean 'experts'"):
        train.parse_config([str(unknown)])
    for name, text in (("c.json", '{"r": 16}\n'), ("c.yaml", "r: 16\nmax_iters: 2\n"), ("empty.py", "# r = 16\n")):
        (tmp_path / name).write_text(text)  # run as Python, each set nothing: the defaults trained without a word
        with pytest.raises(train.UserError, match=rf"^config file '.*{name}' sets no key; write it as plain Python, "
                           r"key = value lines \(run as Python, a JSON or YAML file sets nothing\)\.$"):
            train.parse_config([str(tmp_path / name)])
    with pytest.raises(train.UserError, match="base checkpoint 'nope.pt' does not exist"):
        train.train(train_cfg(run_data, tmp_path / "o", "--init_from=nope.pt"))
    with pytest.raises(train.UserError, match="eval_only: .*adapter.pt does not exist"):
        train.train(train_cfg(run_data, tmp_path / "never", "--eval_only=True"))
    with pytest.raises(train.UserError, match="nothing to resume"):
        train.train(train_cfg(run_data, tmp_path / "empty", "--init_from=resume"))
    with pytest.raises(UserError, match="has no summary.json"):
        train.train(train_cfg(run_data, tmp_path / "o", f"--data_dir={tmp_path}"))


def test_a_run_from_a_hugging_face_folder_fine_tunes_that_folders_weights(run_data, tmp_path):
    """init_from a Hugging Face folder, as a published base comes: the run's frozen base is the folder's weights (here
    run_data's base.pt written as one), which only adapters are trained beside."""
    from test_weights import hf_config, hf_state_dict
    saved = torch.load(run_data / "base.pt", weights_only=True)
    base = model.Transformer(model.ModelArgs(**saved["model_args"]))
    base.load_state_dict(saved["model"])
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(hf_state_dict(base), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(hf_config(base)))
    out = train.train(train_cfg(run_data, tmp_path / "run", f"--init_from={folder}", "--max_iters=1", "--eval_dir="))
    trained = out["model"].state_dict()
    for name, weight in base.state_dict().items():
        assert torch.equal(trained[name], weight), name
    assert all(".lora_" in n or "router" in n for n, p in out["model"].named_parameters() if p.requires_grad)


def test_loss_falls_and_only_adapters_change(run_data, tmp_path, capsys, monkeypatch):
    base = run_data / "base.pt"
    cfg = train_cfg(run_data, tmp_path / "out", f"--init_from={base}", "--max_iters=30",
                    "--eval_interval=30", "--eval_limit=2")
    real, validations = evaluation.val_loss, []
    monkeypatch.setattr(evaluation, "val_loss", lambda *a: validations.append(real(*a)) or validations[-1])
    summary = train.train(cfg)
    losses = summary["train_losses"]
    assert len(losses) == 30 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    state = torch.load(base, weights_only=True)["model"]
    for n, p in summary["model"].named_parameters():
        if teamlora.is_adapter(n):
            assert p.requires_grad
        else:
            assert not p.requires_grad and torch.equal(p.cpu(), state[n]), f"base parameter {n} changed"
    saved = torch.load(tmp_path / "out" / "adapter.pt", weights_only=True)
    assert_same_adapters(saved, adapters_of(summary["model"]))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["scores"]) == set(SYNTHETIC_TASKS) and set(results["expert_load"]) == set(SYNTHETIC_TASKS)
    model, args, tok = summary["model"], summary["model"].args, data.Tokenizer(cfg["tokenizer"])
    for name, (task, records) in evaluation.load_eval_sets(cfg).items():  # each task's load from its own prompts
        prompts = [evaluation.prompt_ids(tok, rec, args.max_seq_len - task.max_new_tokens) for rec in records]
        want = conftest.reference_task_load(model, prompts, args.n_layers, cfg["load_layers"], cfg["experts"])
        torch.testing.assert_close(torch.tensor(results["expert_load"][name]), want, rtol=1e-4, atol=1e-5, msg=name)
        if task.metric == "accuracy":  # chance: the share of the most frequent gold label in these records
            golds = [rec["output"] for rec in records]
            assert results["chance"][name] == pytest.approx(100 * max(map(golds.count, golds)) / len(golds))
    assert set(results["chance"]) == set(results["scores"]) and results["chance"]["qa"] == 0.0
    printed = capsys.readouterr().out
    assert "chance   lift" in printed
    lines = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert any("val_loss" in line for line in lines) and all(math.isfinite(line.get("loss", 0)) for line in lines)
    assert results["step"] == summary["step"] == 30  # the step it ended at, as a stopped run's says its own
    assert len(validations) == 1 and results["val_loss"] == validations[0]  # step 30's, not validated again to score


def _run_with_a_trained_looking_adapter(run_data, tmp_path, *flags):
    """A Run and its model (the pretrained tiny base + TeamLoRA), lora_B random so the adapters act."""
    cfg = train_cfg(run_data, tmp_path / "o", f"--init_from={run_data / 'base.pt'}", *flags)
    tok = data.Tokenizer(cfg["tokenizer"])
    model, args, _ = train.build_model(cfg, torch.device("cpu"), tok.vocab_size, 1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return train.Run(cfg, 0, 1, torch.device("cpu"), tok, args), model


@pytest.mark.parametrize("adapter", ["teamlora", "none", "teamlora on output"])
def test_adapters_train_and_validate_with_the_output_layer_on_answer_positions_only(run_data, tmp_path, adapter):
    """An instruction's prompt is most of its tokens and adds nothing to the loss: with adapters, train_step and
    val_loss run the output layer (at 128k words, most of a 7B run's logits memory) on the labelled positions only.
    Full training runs it on every position, so that the demo's pretrained base rounds as it always has, and so
    does an adapted output layer: its omega covers every real token, as the balance loss's mask does (on answer
    positions only, every training step failed on the mask's shape)."""
    flags = ["--adapter=none"] if adapter == "none" else ["--targets=w1,output"] if "output" in adapter else []
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--grad_accum=2", "--batch_size=8",
                                                   "--eval_iters=2", "--balance_coef=0.01", *flags)
    rows, labelled, everything = [], 0, 0
    model.output.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    train_ds, val_ds = (data.TokenDataset(r.cfg["data_dir"], split) for split in ("train", "val"))
    for ds, step, seed in ((train_ds, 3, r.cfg["seed"]), (val_ds, 0, 0), (val_ds, 1, 0)):
        for part in (0, 1):
            b = data.get_batch(ds, step, 8, seed, part, 2, r.cfg["batch_mode"], r.cfg["max_len"])
            labelled, everything = labelled + int((b["labels"] != -100).sum()), everything + b["tokens"].numel()
    train.train_step(r, model, model, torch.optim.AdamW(train.trainable(model), lr=0.0), train_ds, 3)
    evaluation.val_loss(model, val_ds, r)
    assert len(rows) == 6 and 0 < labelled < everything / 4
    assert sum(rows) == (labelled if adapter == "teamlora" else everything)
    assert ("output" in adapter) == isinstance(model.output, teamlora.TeamLoRALinear)


@pytest.mark.parametrize("flags", [["--adapter=none"], ["--adapter=none", "--dtype=bfloat16"], ["--targets=w1,output"]])
def test_train_step_keeps_no_logits_through_backward(run_data, tmp_path, flags):
    """Where the output layer runs on every position (full training, an adapted output layer) the model returns its
    float32 logits beside the loss; train_step must not hold them while backward runs (4 bytes per position and
    word more at the peak: 2 GiB at LLaMA-3's 128k words and 4 x 1024 tokens), as memory.py's logits term assumes."""
    r, net = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--batch_size=4", *flags)
    returned, alive = [], []
    net.register_forward_hook(lambda m, args, out: returned.append(weakref.ref(out[0])) if out[0] is not None else None)
    net.output.register_full_backward_hook(lambda *a: alive.append([ref() is not None for ref in returned]))
    train.train_step(r, net, net, torch.optim.AdamW(train.trainable(net), lr=0.0),
                     data.TokenDataset(r.cfg["data_dir"], "train"), 0)
    assert len(returned) == 1 and alive == [[False]]


@pytest.mark.parametrize("targets", ["w1,w2,w3", "w1,output", "w1, output", " output ,w2", "wq,output,", "w1,wo"])
def test_the_output_layer_runs_on_answer_positions_only_exactly_when_the_targets_leave_it_unadapted(targets):
    """loss_only reads the targets as inject_targets does (spaces around a name and empty names ignored): an output
    layer that inject_targets adapts must see every position, whatever the spelling of the list."""
    for adapter in ("teamlora", "moelora", "hydralora", "lora", "none"):  # every adapter, not TeamLoRA's alone
        cfg = dict(train.DEFAULTS, adapter=adapter, targets=targets)
        m = Transformer(model.ModelArgs.from_name("tiny", n_layers=1))
        if adapter != "none":
            train.inject_targets(m, cfg)
        assert evaluation.loss_only(cfg) == (adapter != "none" and not isinstance(m.output, TeamLoRALinear))


def test_val_loss_runs_every_forward_without_autograd(run_data, tmp_path):
    """Validation keeps no graph: a forward with gradients on would hold every micro-batch's activations for a
    backward that never comes."""
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--eval_iters=2", "--grad_accum=2")
    grad_on = []
    model.layers[0].register_forward_hook(lambda m, args, out: grad_on.append(torch.is_grad_enabled()))
    evaluation.val_loss(model, data.TokenDataset(r.cfg["data_dir"], "val"), r)
    assert grad_on == [False] * 4 and torch.is_grad_enabled()


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_val_loss_is_cross_entropy_over_answer_tokens_only(run_data, tmp_path, mode):
    """val_loss against each validation example run alone: the summed cross-entropy over positions
    with a label (labels != -100: the answer, not the prompt or padding) over their count."""
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--eval_iters=3", "--batch_size=4",
                                                   f"--batch_mode={mode}")
    cfg, val = r.cfg, data.TokenDataset(r.cfg["data_dir"], "val")
    model.eval()
    total, labelled, positions = 0.0, 0, 0
    with torch.no_grad():
        for i in range(cfg["eval_iters"]):
            b = data.get_batch(val, i, cfg["batch_size"], 0, mode=mode, max_len=cfg["max_len"])  # seed 0
            seq_ids = b.get("seq_ids", torch.where(b["valid"], 0, -1))
            for row in range(len(b["tokens"])):
                for j in seq_ids[row].unique().tolist():
                    if j < 0:
                        continue
                    at = seq_ids[row] == j
                    logits = model(b["tokens"][row, at][None])[0][0]
                    labels = b["labels"][row, at]
                    keep = labels != -100
                    total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
                    labelled += int(keep.sum())
            positions += b["labels"].numel()
    assert 0 < labelled < positions / 2  # most positions are prompt or padding: the two means differ a lot
    assert evaluation.val_loss(model, val, r) == pytest.approx(total / labelled, rel=1e-4)
    assert model.training  # val_loss hands the model back in training mode


def test_val_loss_cuts_each_validation_example_to_the_runs_max_len_as_training_does(run_data, tmp_path):
    """A run with a max_len below the one its data was prepared with trains on examples cut to max_len, and validates
    on them cut the same way: the answer tokens within each example's first max_len tokens, each example run alone."""
    max_len, batch_size = 54, 4  # the mini suite's answers are 2 or 3 tokens after prompts of 8 to 63
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--eval_iters=8", f"--batch_size={batch_size}",
                                                   f"--max_len={max_len}")
    val = data.TokenDataset(r.cfg["data_dir"], "val")
    model.eval()
    examples = [e for i in range(r.cfg["eval_iters"]) for e in data.global_batch(val, i, batch_size, 0, "pad")]
    total, labelled, cut = _answer_loss_of_each_alone(model, val, examples, max_len)  # batches of seed 0
    assert cut and labelled
    assert evaluation.val_loss(model, val, r) == pytest.approx(total / labelled, rel=1e-4)


def _answer_loss_of_each_alone(model, ds, examples, max_len):
    """(summed cross-entropy over the answer tokens, their count, how many examples were cut) of ds's examples, each
    cut to max_len and run alone through model: a reference for the batched losses."""
    total, labelled, cut = 0.0, 0, 0
    with torch.no_grad():
        for example in examples:
            ids, prompt_len = ds[example]
            cut += len(ids) > max_len
            ids = torch.from_numpy(ids[:max_len].astype(np.int64))
            if len(ids) > prompt_len:  # else the cut left no answer token
                logits = model(ids[None])[0][0]
                total += F.cross_entropy(logits[prompt_len - 1:-1], ids[prompt_len:], reduction="sum").item()
                labelled += len(ids) - prompt_len
    return total, labelled, cut


def test_training_cuts_each_example_to_the_runs_max_len_and_its_loss_is_over_the_answer_tokens_left(run_data, tmp_path):
    """A run with a max_len below the one its data was prepared with trains on each example's first max_len tokens:
    the loss train_step reports is the cross-entropy over the answer tokens within them, each example run alone."""
    max_len, batch_size = 54, 8  # the mini suite's answers are 2 or 3 tokens after prompts of 8 to 63
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, f"--batch_size={batch_size}",
                                                   f"--max_len={max_len}", "--dropout=0.0", "--learning_rate=0.0")
    ds, opt = data.TokenDataset(r.cfg["data_dir"], "train"), _RecordingAdamW(train.trainable(model), lr=0.0)
    cut = answered = 0
    for step in range(6):
        total, labelled, cuts = _answer_loss_of_each_alone(
            model, ds, data.global_batch(ds, step, batch_size, r.cfg["seed"], "pad"), max_len)
        cut += cuts
        assert train.train_step(r, model, model, opt, ds, step)[0] == pytest.approx(total / max(labelled, 1),
                                                                                   rel=1e-4), step
        answered += labelled > 0
    assert cut and answered


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_validation_runs_in_the_training_micro_batches_with_the_same_loss(run_data, tmp_path, mode):
    """A 7B run on one GPU validates batch_size = 128 sequences of 1024 tokens: in one forward that alone would
    hold 16 GiB of float32 logits. Each validation batch is cut as training cuts its batch (processes x
    grad_accum slices): never more sequences at once than a training micro-batch, the same examples and loss."""
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--eval_iters=3", "--batch_size=8",
                                                   f"--batch_mode={mode}")
    val, widest, forward = data.TokenDataset(r.cfg["data_dir"], "val"), [], model.forward

    def spy(tokens, *a, **kw):
        widest.append(len(tokens))
        return forward(tokens, *a, **kw)
    model.forward = spy
    losses = {}
    for accum in (1, 2, 4):
        r.cfg["grad_accum"], widest[:] = accum, []
        losses[accum] = evaluation.val_loss(model, val, r)
        assert max(widest) <= 8 // accum if mode == "pad" else len(widest) == 3 * accum
    assert losses[2] == pytest.approx(losses[1], rel=1e-5) and losses[4] == pytest.approx(losses[1], rel=1e-5)


def test_each_process_validates_its_own_slices_which_sum_to_one_processs_totals(run_data, tmp_path, monkeypatch):
    """Under torchrun each rank validates its own processes x grad_accum slices of every validation batch, never the
    whole batch: no more sequences at once than its training micro-batch, and the ranks' (cross-entropy sum, answer
    tokens), which val_loss all-reduces, add up to one process's."""
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--eval_iters=2", "--batch_size=8",
                                                   "--grad_accum=2")
    val, sums, widest, forward = data.TokenDataset(r.cfg["data_dir"], "val"), [], [], model.forward

    def spy(tokens, *a, **kw):
        widest.append(len(tokens))
        return forward(tokens, *a, **kw)
    model.forward = spy
    monkeypatch.setattr(evaluation, "all_reduce_sum", lambda t, world: sums.append(t.clone()) or t)
    evaluation.val_loss(model, val, r)
    widest[:] = []
    for rank in (0, 1):
        evaluation.val_loss(model, val, train.Run(r.cfg, rank, 2, r.device, r.tok, r.args))
    whole, rank0, rank1 = sums
    assert max(widest) <= 8 // (2 * 2) and not torch.equal(rank0, rank1)
    torch.testing.assert_close(rank0 + rank1, whole, rtol=1e-5, atol=0)
    # with the all-reduce's sum in hand, each rank's val loss is one process's
    monkeypatch.setattr(evaluation, "all_reduce_sum", lambda t, world: rank0 + rank1)
    for rank in (0, 1):
        assert evaluation.val_loss(model, val, train.Run(r.cfg, rank, 2, r.device, r.tok, r.args)) == pytest.approx(
            (whole[0] / whole[1]).item(), rel=1e-5)


def test_all_reduce_sum_sums_over_the_processes_of_any_number_above_one(monkeypatch):
    reduced = []
    monkeypatch.setattr(evaluation.dist, "all_reduce", lambda t: reduced.append(t) or t.mul_(3))  # 3 equal ranks
    t = torch.tensor([1.0, 2.0])
    assert evaluation.all_reduce_sum(t, 1) is t and not reduced and t.tolist() == [1.0, 2.0]  # one process: as it is
    for world in (2, 3):
        t = torch.tensor([1.0, 2.0])
        assert evaluation.all_reduce_sum(t, world) is t and reduced[-1] is t and t.tolist() == [3.0, 6.0]


def test_train_step_counts_the_real_tokens_of_its_micro_batches_for_the_tokens_per_second(run_data, tmp_path):
    """The throughput train_step reports counts every real token it ran (prompt and answer), not the padding and not
    only the answer tokens the loss is over."""
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--grad_accum=2", "--batch_size=8")
    ds, step = data.TokenDataset(r.cfg["data_dir"], "train"), 2
    batches = [data.get_batch(ds, step, 8, r.cfg["seed"], part, 2, r.cfg["batch_mode"], r.cfg["max_len"])
               for part in (0, 1)]
    _, _, n_tokens = train.train_step(r, model, model, torch.optim.AdamW(train.trainable(model), lr=0.0), ds, step)
    real = sum(int(b["valid"].sum()) for b in batches)
    assert n_tokens == real
    assert sum(int((b["labels"] != -100).sum()) for b in batches) < real < sum(b["tokens"].numel() for b in batches)


def test_logged_tokens_per_second_average_the_steps_since_the_line_before_and_leave_validation_out(
        run_data, tmp_path, monkeypatch):
    """One step's rate swings with its batch (20x on a GPU in pad mode); a line averages its steps. The time a
    validation and checkpoint take is not training time. A fake clock: 1 s a step, 100 s a validation."""
    clock, per_step = [1000.0], []
    monkeypatch.setattr(train.time, "time", lambda: clock[0])
    real_step, real_val = train.train_step, evaluation.val_loss

    def step(*a):
        out = real_step(*a)
        clock[0] += 1.0
        per_step.append(out[2])
        return out

    def val(*a):
        clock[0] += 100.0
        return real_val(*a)
    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(evaluation, "val_loss", val)
    train.train(train_cfg(run_data, tmp_path / "t", "--max_iters=6", "--log_interval=2", "--eval_interval=3",
                          "--eval_dir="))
    lines = [json.loads(line) for line in open(tmp_path / "t" / "log.jsonl") if "tokens_per_s" in line]
    t = per_step
    assert len(set(t)) > 1  # steps differ, so an average differs from a step's rate
    # lines at steps 2, 4, 6; validations after steps 3 and 6: step 4's line covers step 4 alone
    assert [line["tokens_per_s"] for line in lines] == pytest.approx([(t[0] + t[1]) / 2, t[3], (t[4] + t[5]) / 2])


def test_task_expert_load_averages_omega_over_real_prompt_tokens_of_the_last_layers(run_data, tmp_path):
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--load_layers=2", "--eval_batch_size=4")
    g = torch.Generator().manual_seed(1)
    lengths = (3, 40, 9, 25, 17)  # very different lengths: the short ones get a lot of padding in a batch
    prompts = [torch.randint(1, r.tok.vocab_size, (n,), generator=g).tolist() for n in lengths]
    heads, head = [], model.head
    model.head = lambda h: heads.append(h.shape) or head(h)
    got = evaluation.task_expert_load(model, prompts, r)
    # eval_batch_size=4: two batches, one position's logits each (at 128k words a batch's would take tens of GiB)
    assert heads == [(4, 1, r.args.dim), (1, 1, r.args.dim)]
    del model.head
    want = conftest.reference_task_load(model, prompts, r.args.n_layers, 2, r.cfg["experts"])  # every prompt
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.shape == (r.cfg["experts"],) and model.training  # the caller's mode, kept: training here,
    model.eval()
    torch.testing.assert_close(evaluation.task_expert_load(model, prompts, r), got, rtol=0, atol=0)
    assert not model.training  # eval mode (sample.py's) here
    # the first layers are left out: their load differs from the last two layers'
    everything = conftest.reference_task_load(model, prompts, r.args.n_layers, r.args.n_layers, r.cfg["experts"])
    assert not torch.allclose(everything, want, rtol=0, atol=1e-4)


def test_the_expert_load_counts_every_prompt_of_a_task_whatever_the_eval_batch_size(run_data, tmp_path):
    """eval_batch_size bounds scoring's memory (the README lowers it for smaller GPUs; study.py and a resume take it as
    no change to a run): the load printed over "each task's prompt tokens" counted only the first eval_batch_size
    prompts, so a smaller batch printed another load."""
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--load_layers=2")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, r.tok.vocab_size, (n,), generator=g).tolist() for n in (30, 4, 17, 9, 26, 2, 12)]
    want = conftest.reference_task_load(model, prompts, r.args.n_layers, 2, r.cfg["experts"])
    for batch in (1, 3, 7, 64):
        cfg = dict(r.cfg, eval_batch_size=batch)
        got = evaluation.task_expert_load(model, prompts, train.Run(cfg, 0, 1, r.device, r.tok, r.args))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("warmup,decay,min_ratio", [(6, None, 0.0), (10, 60, 0.1), (1, None, 0.25), (0, 40, 0.0)])
def test_learning_rate_warms_up_linearly_from_step_0_then_decays_by_cosine(warmup, decay, min_ratio):
    lr, max_iters = 2e-3, 50
    cfg = dict(train.DEFAULTS, learning_rate=lr, warmup_iters=warmup, lr_decay_iters=decay, max_iters=max_iters,
               min_lr_ratio=min_ratio)
    total = decay or max_iters
    low = lr * min_ratio

    def want(step):  # the schedule, written out
        if step < warmup:
            return lr * (step + 1) / warmup  # step 0 already trains, at lr / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return low + (lr - low) * (1 + math.cos(math.pi * progress)) / 2

    for step in range(total + 10):
        assert train.get_lr(step, cfg) == pytest.approx(want(step), rel=1e-12, abs=1e-15), step
    assert train.get_lr(0, cfg) > 0
    assert train.get_lr(0, cfg) == pytest.approx(lr / warmup if warmup else lr)
    assert train.get_lr(max(warmup - 1, 0), cfg) == pytest.approx(lr)  # the peak, at the last warmup step
    assert train.get_lr(warmup, cfg) == pytest.approx(lr)  # cosine starts at the peak
    mid = warmup + (total - warmup) / 2
    if mid == int(mid):
        assert train.get_lr(int(mid), cfg) == pytest.approx((lr + low) / 2)  # half way down
    assert train.get_lr(total, cfg) == pytest.approx(low, abs=1e-15)  # the end of the decay: lr * min_lr_ratio
    assert train.get_lr(total + 100, cfg) == pytest.approx(low, abs=1e-15)  # and it stays there
    lrs = [train.get_lr(s, cfg) for s in range(total + 5)]
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))  # rising through warmup
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # never rising after it


@pytest.mark.parametrize("decay", [10, 4])
def test_a_decay_ending_by_the_end_of_warmup_leaves_the_learning_rate_at_its_floor_after_warmup(decay):
    """lr_decay_iters <= warmup_iters: the warmup rises to the peak, then the schedule is over (it once went back to
    the peak for one step, at step warmup_iters)."""
    cfg = dict(train.DEFAULTS, learning_rate=1.0, warmup_iters=10, lr_decay_iters=decay, max_iters=20, min_lr_ratio=0.1)
    assert [train.get_lr(s, cfg) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert [train.get_lr(s, cfg) for s in range(10, 30)] == pytest.approx([0.1] * 20)


def test_gradient_accumulation_equals_one_large_batch(run_data, tmp_path, monkeypatch):
    """The gradients handed to the optimizer, step by step (AdamW is blind to a wrong loss scale,
    so this compares what it is given, not what it makes of it)."""
    real_clip = torch.nn.utils.clip_grad_norm_

    def run(out, *more):
        grads = []

        def capture(params, *a, **k):
            params = list(params)
            grads.append([p.grad.clone() for p in params])
            return real_clip(params, *a, **k)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture)
        train.train(train_cfg(run_data, out, "--dropout=0.0", "--balance_coef=0.0", "--eval_dir=",
                              "--max_iters=3", "--threads=1", *more))  # one count: the final adapters compare bits
        return grads

    one, acc = run(tmp_path / "a"), run(tmp_path / "b", "--grad_accum=4")
    assert len(one) == len(acc) == 3
    for a, b in zip(one[0], acc[0]):  # the same weights, so the same gradient up to float rounding
        assert (b - a).abs().max() <= 1e-5 * a.abs().max()
    assert sum(g.abs().sum() > 0 for g in one[0]) >= 12  # every lora_B (A and the router wait for B != 0)
    # later steps start from weights that AdamW's first step (g / |g|) made differ in the last bits
    final = [torch.load(tmp_path / d / "adapter.pt", weights_only=True) for d in ("a", "b")]
    assert_same_adapters(final[0], final[1], atol=3e-5)  # one AdamW step moves a weight by ~lr = 3e-3


def test_the_balance_loss_gets_each_batchs_padding_mask_and_the_configured_reduction(run_data, tmp_path,
                                                                                    monkeypatch):
    batches, calls = [], []
    real_batch, real_balance = data.get_batch, teamlora.balance_loss

    def get_batch(*a, **k):
        batches.append(real_batch(*a, **k))
        return batches[-1]

    def balance_loss(model, mask=None, reduction="mean"):
        calls.append((mask, reduction, batches[-1]["valid"]))  # the micro-batch just drawn
        return real_balance(model, mask, reduction)
    monkeypatch.setattr(data, "get_batch", get_batch)
    monkeypatch.setattr(teamlora, "balance_loss", balance_loss)
    train.train(train_cfg(run_data, tmp_path / "out", "--balance_reduction=sum", "--balance_coef=0.5", "--eval_dir=",
                          "--max_iters=2", "--grad_accum=2"))
    assert len(calls) == 4  # 2 steps x 2 micro-batches
    for mask, reduction, valid in calls:
        assert reduction == "sum" and mask is valid
    assert any(not mask.all() for mask, _, _ in calls)  # padding there to leave out


def test_resume_continues_exactly_as_an_uninterrupted_run(run_data, tmp_path, capsys):
    # threads pinned: the default follows the machine's load, and another thread count rounds differently
    flags = ("--dropout=0.1", "--eval_dir=", "--max_iters=6", "--eval_interval=3", "--threads=1")
    whole = train.train(train_cfg(run_data, tmp_path / "whole", *flags))
    train.train(train_cfg(run_data, tmp_path / "part", *flags, "--max_iters=3", "--lr_decay_iters=6"))
    capsys.readouterr()
    resumed = train.train(train.parse_config([f"--out_dir={tmp_path / 'part'}", "--init_from=resume", "--max_iters=6"]))
    assert resumed["step"] == 6
    # the run's last step was 3, the resume's max_iters raises it to 6: steps are left to train, none is said not to be
    assert f"resumed from {tmp_path / 'part'}/ckpt.pt at step 3\n" in capsys.readouterr().out
    assert_same_adapters(adapters_of(whole["model"]), adapters_of(resumed["model"]))
    (tmp_path / "r16.py").write_text("r = 16\n")  # a config file's keys are set by the user as much as flags
    with pytest.raises(train.UserError,
                       match=r"dropout, r cannot change when resuming or re-scoring \(the run was dropout=0.1, r=8\)"):
        train.train(train.parse_config([str(tmp_path / "r16.py"), f"--out_dir={tmp_path / 'part'}",
                                        "--init_from=resume", "--dropout=0.2"]))
    # the batches and the schedule of the steps left: another batch_size or warmup would not end as the whole run
    with pytest.raises(train.UserError, match=r"^batch_size, warmup_iters cannot change when resuming or re-scoring"):
        train.train(train.parse_config([f"--out_dir={tmp_path / 'part'}", "--init_from=resume", "--batch_size=4",
                                        "--warmup_iters=2"]))


def test_a_resumed_run_ends_with_the_uninterrupted_runs_optimizer_state_and_logs_its_losses(run_data, tmp_path):
    """Beyond the adapters: AdamW's moments and step counts, the torch generator and every logged loss and learning
    rate after the resume, here for packed rows, accumulation, the balance loss, weight decay and a floor on the
    cosine, on MoELoRA with competition (the stop at step 3 validates there; the whole run does not)."""
    flags = ("--adapter=moelora", "--competition=True", "--batch_mode=pack", "--grad_accum=2", "--balance_coef=0.5",
             "--weight_decay=0.01", "--min_lr_ratio=0.1", "--warmup_iters=2", "--dropout=0.1", "--eval_dir=",
             "--max_iters=5", "--eval_interval=2", "--log_interval=1", "--threads=1")
    train.train(train_cfg(run_data, tmp_path / "whole", *flags))
    train.train(train_cfg(run_data, tmp_path / "part", *flags, "--max_iters=3", "--lr_decay_iters=5"))
    train.train(train.parse_config([f"--out_dir={tmp_path / 'part'}", "--init_from=resume", "--max_iters=5"]))
    whole, part = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("whole", "part"))
    assert whole["iter"] == part["iter"] == 5 and whole["optimizer"]["state"]
    assert_same_adapters(whole["state"], part["state"])
    leaves = [torch.utils._pytree.tree_leaves([c["optimizer"], c["rng"][0]["torch"]]) for c in (whole, part)]
    assert len(leaves[0]) == len(leaves[1])
    for a, b in zip(*leaves):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    def logged(run):  # every line but its clock's: (step, loss and lr, or val_loss)
        return [{k: v for k, v in json.loads(line).items() if k not in ("time", "tokens_per_s")}
                for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
    extra = [e for e in logged("part") if e["step"] == 3 and "val_loss" in e]  # the part run's last step validated
    assert len(extra) == 1 and logged("whole") == [e for e in logged("part") if e not in extra]


def test_a_resume_on_another_number_of_processes_keeps_each_batchs_slices_and_dropout_masks(run_data, tmp_path,
                                                                                             capsys):
    """2 processes or 1 with grad_accum=2 cut each batch into the same 2 slices: a 2-process run resumed by one
    process takes grad_accum=2 and ends as the uninterrupted run; a count that cannot keep the slices says so."""
    flags = ("--dropout=0.1", "--eval_dir=", "--max_iters=4", "--eval_interval=2", "--threads=1", "--grad_accum=2")
    whole = train.train(train_cfg(run_data, tmp_path / "whole", *flags))
    train.train(train_cfg(run_data, tmp_path / "part", *flags, "--max_iters=2", "--lr_decay_iters=4"))
    path = tmp_path / "part" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)  # as 2 processes without accumulation save it: an RNG state a rank
    ckpt["config"]["grad_accum"], ckpt["rng"] = 1, ckpt["rng"] * 2
    torch.save(ckpt, path)
    capsys.readouterr()
    resumed = train.train(train.parse_config([f"--out_dir={path.parent}", "--init_from=resume", "--max_iters=4"]))
    assert "grad_accum 1 -> 2" in capsys.readouterr().out
    assert_same_adapters(adapters_of(whole["model"]), adapters_of(resumed["model"]))
    cfg = {**resumed["config"], "grad_accum": 1, "eval_only": False}
    assert machine.keep_slices(cfg, {"rng": [None] * 2}, 4, True) == cfg  # 2 slices over 4 processes: kept as it is
    assert "resume on a number of processes that divides 2" in capsys.readouterr().err
    with pytest.raises(train.UserError, match=r"^the run cut each batch into 2 slices \(2 process\(es\) x grad_accum "
                       r"1\), which 4 processes cannot split; resume it on a number of processes that divides 2\.$"):
        machine.keep_slices({**cfg, "batch_size": 6}, {"rng": [None] * 2}, 4, True)  # batch_size and grad_accum stay
    assert not capsys.readouterr().err  # no word of going on


def test_re_scoring_may_show_the_expert_load_of_other_blocks(run_data, tmp_path, capsys):
    """load_layers only chooses the blocks whose expert load is printed (the paper's Figure 5): re-scoring a run to
    see more of them is not a change of the run."""
    out = tmp_path / "o"
    train.train(train_cfg(run_data, out, "--max_iters=1", "--eval_interval=1", "--eval_limit=1"))
    capsys.readouterr()
    summary = train.train(train.parse_config([f"--out_dir={out}", "--eval_only=True", "--load_layers=1"]))
    assert "expert load over each task's prompt tokens (last 1 layers" in capsys.readouterr().out
    assert summary["expert_load"]
    assert torch.load(out / "ckpt.pt", weights_only=True)["config"]["load_layers"] == 2  # the run's own is kept


def test_a_resume_refuses_another_seed_which_would_draw_other_batches_and_dropout_masks(run_data, tmp_path):
    """Batches and dropout masks are functions of (seed, step): a resume with another seed would continue a run
    that never was, so the seed is one of the keys a resume keeps."""
    cfg = train_cfg(run_data, tmp_path / "p", "--eval_dir=", "--max_iters=1", "--eval_interval=1")
    train.train(cfg)
    with pytest.raises(train.UserError, match=rf"^seed cannot change when resuming .*the run was seed={cfg['seed']}\)"):
        train.train(train.parse_config([f"--out_dir={tmp_path / 'p'}", "--init_from=resume", "--max_iters=2",
                                        f"--seed={cfg['seed'] + 1}"]))
    assert torch.load(tmp_path / "p" / "ckpt.pt", weights_only=True)["iter"] == 1


def test_a_resume_keeps_the_thread_count_the_run_chose(run_data, tmp_path, monkeypatch):
    """threads=0 picks the cores no other job is running on; a resume on a busier machine must not pick
    fewer, or it would round differently from the run it continues (--threads=N still changes it)."""
    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    used, real = [], train.run
    monkeypatch.setattr(train, "run", lambda r, ckpt: (used.append(torch.get_num_threads()), real(r, ckpt))[1])
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(machine, "others_running", lambda: 0)
        train.train(train_cfg(run_data, tmp_path / "p", "--eval_dir=", "--max_iters=2", "--eval_interval=1"))
        monkeypatch.setattr(machine, "others_running", lambda: 2)  # busier now: a fresh run would take 1
        for extra in ((), ("--threads=2",)):
            train.train(train.parse_config([f"--out_dir={tmp_path / 'p'}", "--init_from=resume", "--max_iters=3",
                                            *extra]))
    finally:
        torch.set_num_threads(before)
    assert used == [3, 3, 2]


def test_validation_uses_the_same_records_for_every_seed(run_data, tmp_path):
    """With lr 0 the adapters stay at B = 0 (the base's function), so only the records could differ."""
    runs = [train.train(train_cfg(run_data, tmp_path / f"s{seed}", "--eval_dir=", "--max_iters=1", "--eval_interval=1",
                                  "--learning_rate=0.0", f"--seed={seed}", f"--init_from={run_data / 'base.pt'}"))
            for seed in (1, 2)]
    assert runs[0]["val_loss"] == pytest.approx(runs[1]["val_loss"], rel=1e-6)
    # and they are the validation split's (never the training split's) loss of that unchanged model
    cfg, model = runs[0]["config"], runs[0]["model"]
    loss = {split: evaluation.val_loss(model, data.TokenDataset(cfg["data_dir"], split), train.Run(cfg))
            for split in ("val", "train")}
    assert runs[0]["val_loss"] == pytest.approx(loss["val"], rel=1e-5)
    assert loss["train"] != pytest.approx(loss["val"], rel=1e-3)  # the splits' losses tell them apart


def test_validation_draws_its_batches_with_seed_0_where_they_cover_only_part_of_the_split(run_data, tmp_path):
    """The test above validates over every record, whose mean no order changes; here one small batch is a sample of
    the split, so a validation drawn with the run's seed would give each seed its own loss."""
    out = train.train(train_cfg(run_data, tmp_path / "o", "--eval_dir=", "--max_iters=1", "--learning_rate=0.0",
                                f"--init_from={run_data / 'base.pt'}"))
    val = data.TokenDataset(out["config"]["data_dir"], "val")
    cfg = {**out["config"], "eval_iters": 1, "batch_size": 2, "grad_accum": 1}
    batches = [data.get_batch(val, 0, 2, seed, mode=cfg["batch_mode"], max_len=cfg["max_len"])["tokens"]
               for seed in (0, 1, 2)]
    assert not torch.equal(batches[0], batches[1]) or not torch.equal(batches[0], batches[2])  # seeds draw apart
    losses = [evaluation.val_loss(out["model"], val, train.Run({**cfg, "seed": seed})) for seed in (0, 1, 2)]
    assert losses[1] == losses[0] and losses[2] == losses[0]


def test_the_seed_draws_the_adapters_initial_values_whatever_the_processs_random_state(run_data, tmp_path):
    """Runs that differ only in --seed (study.py's repeats) start from adapters of their own on the same base, and
    one seed draws the same adapters whatever random state the process is in: lora_A, the router and M."""
    def adapters(seed, state):
        cfg = train_cfg(run_data, tmp_path / "o", f"--init_from={run_data / 'base.pt'}", f"--seed={seed}")
        torch.manual_seed(state)
        model, _, _ = train.build_model(cfg, torch.device("cpu"), data.Tokenizer(cfg["tokenizer"]).vocab_size, 1)
        return adapters_of(model)
    one, two = adapters(1, 0), adapters(2, 0)
    assert_same_adapters(one, adapters(1, 5))
    drawn = [n for n in one if not n.endswith("lora_B")]  # B starts at zero
    assert drawn and not any(torch.equal(one[n], two[n]) for n in drawn)
    # nor do they replay the draws that began a base made from scratch with the same seed
    cfg = train_cfg(run_data, tmp_path / "o", "--seed=1")
    model, _, _ = train.build_model(cfg, torch.device("cpu"), data.Tokenizer(cfg["tokenizer"]).vocab_size, 1)
    first = next(m for m in model.modules() if isinstance(m, teamlora.TeamLoRALinear))
    torch.manual_seed(cfg["seed"])
    assert not torch.equal(first.lora_A, first.initial_lora_state()["lora_A"])


def test_resume_runs_on_the_runs_own_device_unless_told_otherwise(run_data, tmp_path, monkeypatch):
    """Found on a GPU machine: a CPU run resumed with the default device='auto' moved to the GPU."""
    train.train(train_cfg(run_data, tmp_path / "p", "--eval_dir=", "--max_iters=2", "--eval_interval=2",
                          "--device=cpu"))
    seen, real = [], machine.setup_distributed
    monkeypatch.setattr(machine, "setup_distributed", lambda cfg: (seen.append(cfg["device"]), real(cfg))[1])
    train.train(train.parse_config([f"--out_dir={tmp_path / 'p'}", "--init_from=resume", "--max_iters=3"]))
    train.train(train.parse_config([f"--out_dir={tmp_path / 'p'}", "--init_from=resume", "--max_iters=4",
                                    "--device=auto"]))
    assert seen == ["cpu", "auto"]


def test_ctrl_c_writes_a_checkpoint_and_nan_stops_keeping_the_last_good_one(run_data, tmp_path, monkeypatch):
    real_get_batch = data.get_batch

    def interrupt_at_step_4(dataset, step, *a, **k):
        if step == 4:
            raise KeyboardInterrupt
        return real_get_batch(dataset, step, *a, **k)

    monkeypatch.setattr(data, "get_batch", interrupt_at_step_4)
    out = train.train(train_cfg(run_data, tmp_path / "int", "--eval_dir=", "--eval_interval=100"))
    assert out["interrupted"] and torch.load(tmp_path / "int" / "ckpt.pt", weights_only=True)["iter"] == 4
    monkeypatch.setattr(data, "get_batch", real_get_batch)

    real_forward = Transformer.forward

    def nan_from_step_4(self, tokens, targets=None, **k):
        logits, loss = real_forward(self, tokens, targets, **k)
        nan_from_step_4.calls += 1
        return logits, (loss * float("nan") if nan_from_step_4.calls > 3 and loss is not None else loss)
    nan_from_step_4.calls = 0
    monkeypatch.setattr(Transformer, "forward", nan_from_step_4)
    with pytest.raises(train.UserError, match="the loss became nan at step 3; the last good checkpoint .* is kept"):
        train.train(train_cfg(run_data, tmp_path / "nan", "--eval_dir=", "--eval_interval=2", "--eval_iters=0"))
    assert torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)["iter"] == 2


def test_eval_only_reloads_the_adapter_and_reproduces_the_scores(run_data, tmp_path):
    first = train.train(train_cfg(run_data, tmp_path / "o", "--max_iters=8", "--eval_interval=8"))
    again = train.train(train_cfg(run_data, tmp_path / "o", "--eval_only=True"))
    assert again["scores"] == first["scores"]
    assert_same_adapters(adapters_of(first["model"]), adapters_of(again["model"]))


def test_eval_only_of_an_adapter_pt_alone_reloads_it_and_reproduces_the_scores(run_data, tmp_path):
    """A run kept as its adapter.pt and results.json alone (its ckpt.pt deleted, as one keeps or shares a run) is
    re-scored with the adapter it trained: the same adapters, so the same scores, as the run's own."""
    first = train.train(train_cfg(run_data, tmp_path / "o", "--max_iters=8", "--eval_interval=8"))
    (tmp_path / "o" / "ckpt.pt").unlink()
    again = train.train(train_cfg(run_data, tmp_path / "o", "--eval_only=True"))
    assert_same_adapters(adapters_of(first["model"]), adapters_of(again["model"]))
    assert again["scores"] == first["scores"]


def test_moelora_hydralora_and_lora_configurations_build_the_right_layers():
    cfg = dict(train.DEFAULTS, r=12, experts=3, alpha=24.0)
    moe = TeamLoRALinear(nn.Linear(6, 5), dropout=0.0, **train.adapter_kwargs({**cfg, "adapter": "moelora"}))
    assert moe.lora_M is None and moe.experts == 3 and moe.scaling == (24.0 / 3) / 4  # alpha/k over r_B
    x = torch.randn(4, 6)
    moe(x)
    # MoELoRA: sum_i w_i alpha/r_B
    torch.testing.assert_close(moe.last_omega.sum(-1) * moe.scaling, torch.full((4,), 24.0 / 4))
    kw = train.adapter_kwargs({**cfg, "adapter": "hydralora"})
    hydra = kw.pop("cls")(nn.Linear(6, 5), dropout=0.0, **kw)
    assert isinstance(hydra, HydraLoRALinear) and hydra.r == 12 and hydra.experts == 3 and hydra.lora_M is None
    hydra(x)  # HydraLoRA: sum_i phi_i alpha / r, every head seeing all r of the shared A
    torch.testing.assert_close(hydra.last_omega.sum(-1) * hydra.scaling, torch.full((4,), 24.0 / 12))
    lora = TeamLoRALinear(nn.Linear(6, 5), **train.adapter_kwargs({**cfg, "adapter": "lora"}))
    assert lora.experts == 1 and lora.lora_router is None and lora.scaling == 24.0 / 12


def test_hydralora_matches_its_equation_in_float64_and_trains_through_train_py(run_data, tmp_path):
    """HydraLoRA: h = x W0^T + b + (alpha / r) sum_i softmax(x Wr^T)_i B_i A x, with one A (r x d_in)
    and k heads B_i (d_out x r) side by side; rebuilt here from the equation."""
    torch.manual_seed(0)
    base = nn.Linear(10, 7).double()
    layer = HydraLoRALinear(base, r=3, experts=4, alpha=6.0, dropout=0.0, adapter_dtype=torch.float64)
    assert layer.lora_A.shape == (3, 10) and layer.lora_B.shape == (7, 12) and layer.lora_M is None
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 10, dtype=torch.float64)
    phi = torch.softmax(x @ layer.lora_router.T, -1)
    Ax = x @ layer.lora_A.T
    heads = [Ax @ layer.lora_B[:, 3 * i:3 * (i + 1)].T for i in range(4)]
    want = base(x) + 6.0 / 3 * sum(phi[..., i:i + 1] * heads[i] for i in range(4))
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.last_omega.sum(-1), torch.full((2, 5), 4.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="HydraLoRA has no interaction matrix"):
        HydraLoRALinear(nn.Linear(4, 4), r=2, experts=2, competition=True)
    out = train.train(train_cfg(run_data, tmp_path / "h", "--adapter=hydralora", "--r=4"))
    hydra = [m for m in out["model"].modules() if isinstance(m, HydraLoRALinear)]
    assert hydra and all(m.lora_A.shape[0] == 4 and m.lora_B.shape[1] == 16 for m in hydra)
    assert any(m.lora_B.abs().sum() > 0 for m in hydra)  # the heads trained
    assert np.mean(out["train_losses"][-2:]) < out["train_losses"][0]
    assert set(out["scores"]) == set(SYNTHETIC_TASKS)


@pytest.mark.parametrize("adapter,competition,has_m", [
    ("teamlora", None, True), ("teamlora", False, False), ("moelora", None, False), ("moelora", True, True),
    ("hydralora", None, False), ("lora", True, False)])
def test_competition_none_means_each_methods_own_choice(adapter, competition, has_m):
    cfg = dict(train.DEFAULTS, adapter=adapter, competition=competition, r=8, experts=4)
    kw = train.adapter_kwargs(cfg)
    layer = (kw.pop("cls", None) or TeamLoRALinear)(nn.Linear(6, 5), **kw)
    assert (layer.lora_M is not None) == has_m


@pytest.mark.parametrize("adapter,r,pct", [("lora", 32, "0.67"), ("lora", 128, "2.68"), ("teamlora", 128, "2.71")])
@pytest.mark.usefixtures("at_a_fresh_root")
def test_dry_run_reproduces_the_papers_params_percentages(adapter, r, pct, capsys):
    """Table 2 of the paper, Chinese-LLaMA-2-7B with FFN adapters, counted on the meta device."""
    out = train.train(train.parse_config(["config/cme_llama2_7b.py", "--dry_run=True", "--model=chinese-llama2-7b",
                                          "--init_from=nowhere", f"--adapter={adapter}", f"--r={r}"]))
    assert f"{out['params_pct']:.2f}" == pct
    assert f"= {pct}% of the base" in capsys.readouterr().out


@needs_fixtures
@pytest.mark.usefixtures("at_a_fresh_root")
def test_the_dry_run_of_a_preset_leaves_its_vocabulary_to_the_base_the_run_will_read(capsys):
    """The README's step 3 sizes the paper's base, Chinese-LLaMA-2-7B (55,296 tokens), by its preset beside the
    recipe's LLaMA-2 tokenizer (32,000) while that base is not on disk: a run never reads the preset (the base's own
    files size it), so the dry run describes it and leaves the pair alone; a base on disk is checked (test_train_faults:
    the run's own sentence)."""
    flags = ["config/cme_llama2_7b.py", "--dry_run=True", "--model=chinese-llama2-7b", "--init_from=nowhere"]
    train.train(train.parse_config([*flags, f"--tokenizer={LLAMA2}"]))
    assert "model chinese-llama2-7b: " in capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["config/cme_qwen2.5_7b.py", "config/cme_llama3_8b.py", "config/cme_qwen3_8b.py",
                                    "config/cme_llama3.1_8b.py"])
def test_other_families_recipes_dry_run_with_params_and_memory(recipe, capsys, tmp_path, monkeypatch):
    recipe = str(REPO / recipe)  # run from elsewhere: the recipe finds the LLaMA-2 one beside it
    monkeypatch.chdir(tmp_path)
    train.train(train.parse_config([recipe, "--dry_run=True"]))
    printed = capsys.readouterr().out
    args = model.ModelArgs.from_name(train.parse_config([recipe])["model"])
    assert "% of the base (the paper's Params%)" in printed and "GiB" in printed
    # FFN adapters, r=128 and 4 experts: A, B, the router and M on w1, w3 (dim -> FFN) and w2 (FFN -> dim)
    per_layer = 2 * (128 * args.dim + args.ffn_hidden_dim * 128 + 4 * args.dim) \
        + (128 * args.ffn_hidden_dim + args.dim * 128 + 4 * args.ffn_hidden_dim) + 3 * 16
    assert f"{args.n_layers * per_layer:,} trainable parameters" in printed, printed


@pytest.mark.usefixtures("at_a_fresh_root")
def test_the_readmes_dry_run_output_is_what_the_dry_run_prints(monkeypatch, capsys):
    readme = (Path(train.__file__).parent / "README.md").read_text(encoding="utf-8")
    command = "$ python train.py config/cme_llama2_7b.py --dry_run=True\n"
    shown = readme[readme.index(command) + len(command):].split("```")[0]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train.train(train.parse_config(["config/cme_llama2_7b.py", "--dry_run=True"]))
    assert capsys.readouterr().out == shown


@pytest.mark.usefixtures("at_a_fresh_root")
def test_a_dry_run_of_an_out_dir_a_live_run_holds_plans_it_and_adds_that_the_run_itself_would_be_refused(
        tmp_path, monkeypatch, capsys):
    """The dry run holds no folder (it writes nothing), so it planned a live run's out_dir as if it were free, though
    the run itself is refused there: it prints the same plan and one line more naming the live process, which keeps
    the folder. A free out_dir gets no such line and is not made."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe, free, out = ["config/cme_llama2_7b.py", "--dry_run=True"], tmp_path / "free", tmp_path / "live"
    train.train(train.parse_config([*recipe, f"--out_dir={free}"]))
    plan = capsys.readouterr().out
    assert "in use" not in plan and not free.exists()
    other = conftest.held_by_another_process(out)
    try:
        train.train(train.parse_config([*recipe, f"--out_dir={out}"]))
        assert capsys.readouterr().out == plan + f"note: out_dir {out} is in use by process {other.pid}: the run " \
            "itself is refused until that one ends\n"
        assert files.held_by(str(out)) == f"process {other.pid}"
    finally:
        other.kill()
        other.wait()


@pytest.mark.usefixtures("at_a_fresh_root")
def test_the_dry_run_estimates_results_md_sets_beside_the_h200_measurement_are_what_it_prints(monkeypatch, capsys):
    """RESULTS.md's GPU section compares the measured 7B peak with the dry run's estimate, giving the command: that
    command, run today (and with --adapter=lora), prints the GiB the text quotes."""
    text = " ".join((Path(train.__file__).parent / "RESULTS.md").read_text(encoding="utf-8").split())
    quoted = re.search(r"\(`python train\.py ([^`]+)`, with `(--adapter=lora)` for LoRA\) is ([\d.]+) GiB for TeamLoRA "
                       r"and ([\d.]+) for LoRA", text)
    assert quoted, "RESULTS.md no longer gives the dry run's command and estimates beside the H200's 7B measurement"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for extra, gib in (([], quoted.group(3)), ([quoted.group(2)], quoted.group(4))):
        train.train(train.parse_config(quoted.group(1).split() + extra))
        assert f"one process, activation checkpointing on: about {gib} GiB (" in capsys.readouterr().out, extra


@pytest.mark.parametrize("world", [4, 8])
@pytest.mark.usefixtures("at_a_fresh_root")
def test_dry_run_estimates_per_gpu_with_the_micro_batch_of_dry_run_world_size(world, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = train.parse_config(["config/cme_llama2_7b.py", "--dry_run=True", f"--dry_run_world_size={world}"])
    train.train(cfg)
    micro = cfg["batch_size"] // (world * cfg["grad_accum"])  # 128 sequences over world GPUs x 4 accumulations
    out = capsys.readouterr().out
    assert f"per GPU with {world} GPUs, micro-batch {micro} x {cfg['max_len']} tokens, FSDP" in out
    assert f"scoring, eval_batch_size {cfg['eval_batch_size']} x up to {cfg['max_len']} tokens: about" in out


@pytest.mark.usefixtures("at_a_fresh_root")
def test_a_dry_run_under_torchrun_plans_for_its_processes_not_for_dry_run_world_size(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = train.parse_config(["config/cme_llama2_7b.py", "--dry_run=True", "--dry_run_world_size=8"])
    train.check_full_config(cfg)
    micro = cfg["batch_size"] // (4 * cfg["grad_accum"])
    assert f"per GPU with 4 GPUs, micro-batch {micro} x {cfg['max_len']} tokens" in capsys.readouterr().out
    with pytest.raises(train.UserError, match=r"batch_size=8 must be a multiple of processes x grad_accum = 16\."):
        train.check_full_config({**cfg, "batch_size": 8})  # as the run on those processes refuses it


@pytest.mark.usefixtures("at_a_fresh_root")
def test_a_dry_run_under_torchrun_checks_on_every_rank_and_rank_0_alone_prints_it(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = train.parse_config(["config/cme_llama2_7b.py", "--dry_run=True"])
    said = []
    for rank in (0, 1):
        monkeypatch.setattr(train.machine, "setup_distributed", lambda cfg: (rank, 4, torch.device("cpu")))
        summary = train.train(cfg)
        assert summary["trainable_params"] > 0  # checked and estimated on rank 1 too
        said.append(capsys.readouterr().out)
    assert "per GPU with 4 GPUs" in said[0] and said[1] == ""


@pytest.mark.usefixtures("at_a_fresh_root")
def test_the_dry_run_refuses_packed_rows_past_a_presets_context_and_describes_one_gpu_and_full_training(
        monkeypatch, capsys):
    """A preset stands in for the base (LLaMA-2: 4,096 tokens), so packed rows of 8,192 are refused as a real run
    refuses them; padded rows depend on the records (not read), and a base from scratch is built for max_len. One
    GPU is "1 GPU" and one process (no DDP); full training is not described by adapter settings it has none of."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = ["config/cme_llama2_7b.py", "--dry_run=True", "--max_len=8192"]
    with pytest.raises(UserError, match="max_len=8192 makes rows longer than the 4096 tokens .*--max_len=4096"):
        train.train(train.parse_config(recipe + ["--batch_mode=pack"]))
    train.train(train.parse_config(recipe + ["--batch_mode=pad"]))
    train.train(train.parse_config(recipe + ["--batch_mode=pack", "--init_from=scratch"]))
    capsys.readouterr()
    full = train.train(train.parse_config(["config/cme_llama2_7b.py", "--dry_run=True", "--dry_run_world_size=1",
                                           "--fsdp=False", "--adapter=none"]))
    out, n = capsys.readouterr().out, full["base_params"]
    assert "per GPU with 1 GPU, micro-batch 32 x 1024 tokens, one process," in out
    assert full["trainable_params"] == n and "r=" not in out
    assert f"adapter none (full training): {n:,} trainable parameters = 100.00% of the base" in out


# The config.json of each recipe's base (init_from), as published on Hugging Face, read from public copies: Llama-2-7b
# (params.json {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05}, 4096 positions:
# microsoft/Olive examples/llm/config.py), Meta-Llama-3-8B (meta-llama/llama-models models/sku_list.py, 8192
# positions), Llama-3.1-8B (citsjtu2020/LLM-Prof sglang/Model_Config.md; AI-Hypercomputer/maxtext
# hf_model_configs.py), Qwen2.5-7B (AI-Hypercomputer/kithara tests/model/hf_compatibility/testdata/
# qwen2.5-7b_config.json; LLM-Prof) and Qwen3-8B-Base (Chen-Oliver/qwen3-8b-base config.json; the post-trained
# Qwen3-8B's says 40960 positions: LLM-Prof, maxtext)
def _hf(type_, dim, layers, heads, kv, ffn, vocab, eps, theta, positions, head_dim=None, scaling=None):
    return dict(model_type=type_, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab, rms_norm_eps=eps, rope_theta=theta,
                max_position_embeddings=positions, head_dim=head_dim, rope_scaling=scaling, tie_word_embeddings=False)


RECIPE_BASES = {
    "config/cme_llama2_7b.py": _hf("llama", 4096, 32, 32, 32, 11008, 32000, 1e-5, 1e4, 4096),
    "config/cme_llama3_8b.py": _hf("llama", 4096, 32, 32, 8, 14336, 128256, 1e-5, 5e5, 8192),
    "config/cme_llama3.1_8b.py": _hf("llama", 4096, 32, 32, 8, 14336, 128256, 1e-5, 5e5, 131072, scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192)),
    "config/cme_qwen2.5_7b.py": _hf("qwen2", 3584, 28, 28, 4, 18944, 152064, 1e-6, 1e6, 131072),
    "config/cme_qwen3_8b.py": _hf("qwen3", 4096, 36, 32, 8, 12288, 151936, 1e-6, 1e6, 32768, head_dim=128),
}


@pytest.mark.parametrize("recipe", list(RECIPE_BASES))
@pytest.mark.usefixtures("at_a_fresh_root")
def test_each_recipes_dry_run_describes_the_published_config_of_its_base(recipe, monkeypatch, capsys):
    """The preset a recipe's dry run stands in for its base with is that base's config.json, field by field (the
    Qwen2.5-7B preset had 32768 positions, and the Qwen3 recipe the post-trained Qwen3-8B's 40960: a dry run then
    refused or passed packed rows that the real base accepts or refuses), and the parameters it prints are those
    of the published shapes, counted here by hand."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    c, cfg = RECIPE_BASES[recipe], train.parse_config([recipe, "--dry_run=True"])
    a = model.ModelArgs.from_name(cfg["model"])
    hd = c["head_dim"] or c["hidden_size"] // c["num_attention_heads"]
    rope = c["rope_scaling"] and tuple(c["rope_scaling"][k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                                        "original_max_position_embeddings"))
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_hidden_dim, a.vocab_size) == (
        c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"], hd,
        c["intermediate_size"], c["vocab_size"])
    assert (a.norm_eps, a.rope_theta, a.rope_scaling, a.context, a.tie_embeddings, a.qkv_bias, a.qk_norm) == (
        c["rms_norm_eps"], c["rope_theta"], rope, c["max_position_embeddings"], False, c["model_type"] == "qwen2",
        c["model_type"] == "qwen3")
    d, f, heads, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    block = 2 * d * heads * hd + 2 * d * kv * hd + 3 * d * f + 2 * d  # q and o, k and v, the FFN, two norms
    block += (heads + 2 * kv) * hd if c["model_type"] == "qwen2" else 2 * hd if c["model_type"] == "qwen3" else 0
    n_base = 2 * c["vocab_size"] * d + c["num_hidden_layers"] * block + d
    adapters = c["num_hidden_layers"] * (2 * (128 * d + f * 128 + 4 * d + 16) + 128 * f + d * 128 + 4 * f + 16)
    out = train.train(cfg)
    printed = capsys.readouterr().out
    assert (out["base_params"], out["trainable_params"]) == (n_base, adapters)
    assert f"{n_base:,} base parameters" in printed and f"{adapters:,} trainable parameters" in printed
    assert "per GPU with 8 GPUs, micro-batch 4 x 1024 tokens, FSDP" in printed  # 8 x 4 x 4 accumulation = 128


@pytest.mark.usefixtures("at_a_fresh_root")
def test_no_test_runs_in_the_folders_that_a_users_runs_fill(users_folders):
    """conftest's guard: a test whose run or dry run has its out_dir, or a path it reads, in the repository's out/,
    data/ or checkpoints/ fails as it claims out_dir, whatever those folders hold (a fresh clone's hold nothing),
    so a recipe's or the demo's dry run that forgets at_a_fresh_root or a tmp_path fails in CI too, not only in a
    clone where the user has run it. The same run from a fresh root is the test's own."""
    ours = folders_named([train.DEFAULTS, *[train.parse_config([str(p)]) for p in repository_files("config/*.py")]])
    assert {f.relative_to(REPO).as_posix() for f in ours} == {"out", "data", "checkpoints"}
    assert ours <= users_folders  # and the folders that a user's own recipe in config/ names, if any
    train.claim_out_dir(train.Run(train.parse_config(["config/cme_llama2_7b.py"])), resuming=False)
    train.claim_out_dir(train.Run(train.parse_config([])), resuming=False)  # the demo's
    for key, path in (("out_dir", "out/cme_llama2_7b"), ("out_dir", "out/demo"), ("data_dir", "data/cme"),
                      ("tokenizer", "checkpoints/Llama-2-7b/tokenizer.model"), ("init_from", "checkpoints/Llama-2-7b")):
        r = train.Run(train.parse_config(["config/cme_llama2_7b.py", f"--{key}={REPO / path}"]))
        with pytest.raises(pytest.fail.Exception, match=rf"with {key}=.* in the repository's {path.split('/')[0]}/"):
            train.claim_out_dir(r, resuming=False)


def test_no_train_py_that_a_test_starts_as_a_process_runs_in_the_folders_that_a_users_runs_fill(at_a_fresh_root):
    """conftest's guard reaches a train.py that a test starts as a process of its own, as study.py starts its runs,
    where the patched train.claim_out_dir is not: one whose out_dir, or a path it reads, is in the repository's out/,
    data/ or checkpoints/, taken from the folder it starts in, fails as it starts (a resume or a re-scoring reads its
    other paths from its checkpoint: its out_dir alone is checked). Here the process is `python -c pass`
    given train.py and its flags, so nothing runs even where the guard let it through."""
    train_py, own = [sys.executable, "-c", "pass", str(REPO / "train.py")], f"--out_dir={at_a_fresh_root / 'out'}"
    for flags, cwd, key in (([f"--out_dir={REPO / 'out' / 'demo'}"], None, "out_dir"), ([], REPO, "out_dir"),
                            (["config/cme_llama2_7b.py", own], REPO, "data_dir")):
        with pytest.raises(pytest.fail.Exception, match=f"with {key}=.*, in the repository's (out|data)/ that a user"):
            subprocess.run(train_py + flags, cwd=cwd, timeout=60)
    with pytest.raises(pytest.fail.Exception, match="with data_dir=data/cme, in the repository's data/"):
        subprocess.Popen(train_py + ["--data_dir=data/cme", own], cwd=REPO)
    for flags in (["--data_dir=data/cme"], ["config/cme_llama2_7b.py"], ["--no_such_flag=1"]):  # the fresh root's
        assert subprocess.run(train_py + flags, timeout=60).returncode == 0  # a flag it refuses is its to name
    for flags in (["--init_from=resume"], ["--eval_only=True", "--eval_dir=x"]):  # the paths its ckpt.pt saved
        assert subprocess.run(train_py + [own, *flags], cwd=REPO, timeout=60).returncode == 0
        with pytest.raises(pytest.fail.Exception, match="with out_dir=out/demo, in the repository's out/"):
            subprocess.run(train_py + flags, cwd=REPO, timeout=60)


def test_no_run_that_a_python_c_child_starts_runs_in_the_folders_that_a_users_runs_fill(at_a_fresh_root):
    """conftest's guard reaches a `python -c` child whose code runs train.main(sys.argv[K:]) (a run killed in a write,
    say) or study.launch(sys.argv[K:], ...), which starts train.py with those flags as a grandchild the guard never
    sees: the child's arguments from K on are checked as train.py's as it starts. Each child here leaves before its
    run, so nothing runs even where the guard let it through."""
    own = f"--out_dir={at_a_fresh_root / 'out'}"
    for run, before in (("train.main(sys.argv[1:])", []), ("train.main(sys.argv[2:])", ["log.jsonl"]),
                        ("study.launch(sys.argv[1:], 1)", [])):
        child = [sys.executable, "-c", f"import sys\nsys.exit()\n{run}\n", *before]
        with pytest.raises(pytest.fail.Exception, match="with out_dir=out/demo, in the repository's out/"):
            subprocess.run(child, cwd=REPO, timeout=60)  # the demo's
        with pytest.raises(pytest.fail.Exception, match="with data_dir=data/cme, in the repository's data/"):
            subprocess.Popen(child + ["--data_dir=data/cme", own], cwd=REPO)
        assert subprocess.run(child + ["--data_dir=data/cme", own], timeout=60).returncode == 0  # the fresh root's
        assert subprocess.run(child + [own, "--init_from=resume"], cwd=REPO, timeout=60).returncode == 0


@pytest.mark.parametrize("batch_size, grad_accum", [(12, 1), (15, 3), (16, 1), (12, 3)])
@pytest.mark.usefixtures("at_a_fresh_root")
def test_the_demos_dry_run_plans_for_the_one_process_that_python_train_py_runs(batch_size, grad_accum, monkeypatch,
                                                                                capsys):
    """`python train.py --dry_run=True` plans the demo's own run, one process: it accepts every batch that run accepts
    and prints that run's micro-batch. It planned for 8 GPUs under DDP (micro-batch 2 of the demo's 16) and refused
    --batch_size=12, which `python train.py` trains, as not a multiple of "processes x grad_accum = 8"."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = train.parse_config(["--dry_run=True", f"--batch_size={batch_size}", f"--grad_accum={grad_accum}"])
    machine.check_batch_split(cfg, 1)  # the real run, one process, takes this batch
    train.train(cfg)
    out = capsys.readouterr().out
    assert f"per GPU with 1 GPU, micro-batch {batch_size // grad_accum} x {cfg['max_len']} tokens, one process" in out


def test_the_demos_dry_run_under_a_tokenizer_of_ones_own_describes_the_base_the_demo_pretrains_with_its_own(
        tmp_path, monkeypatch, capsys):
    """Before the demo's base is built, the run pretrains it with the demo's own tokenizer (minicme.PRETRAIN), whatever
    --tokenizer says: the dry run describes that base, of the demo tokenizer's vocabulary, never one sized by the
    user's tokenizer (which sizes a base from scratch alone), and names the file that sized it. A tokenizer that base
    can not have been trained with (5,000 tokens) is refused in the run's sentence (preflight's), where the dry run
    described the base and passed. The user's tokenizer comes with shards of one's own: the demo's are made with its
    tokenizer, which refuses any other (test_train_faults)."""
    monkeypatch.chdir(tmp_path)  # no data/mini_cme: the demo's files are not built
    folder = with_vocabulary(hf_tokenizer_folder(tmp_path / "mine"), 1500)  # within VOCAB_PADDING below its 2,000
    far = with_vocabulary(hf_tokenizer_folder(tmp_path / "far"), 5000)
    demo = train.train(train.parse_config(["--dry_run=True"]))
    capsys.readouterr()
    own = f"--data_dir={tmp_path / 'shards'}"  # made with one's tokenizer (the demo's are made with its own), not yet
    mine = train.train(train.parse_config(["--dry_run=True", f"--tokenizer={folder}", own]))
    assert f", vocabulary {minicme.VOCAB_SIZE:,} (that of the tokenizer the demo builds first)\n" in \
        capsys.readouterr().out
    assert (mine["base_params"], mine["trainable_params"]) == (demo["base_params"], demo["trainable_params"])
    sentence = "the tokenizer has 5,000 tokens but the base model {:,}, so it is not the tokenizer the base model " \
        "was trained with: pass that one."
    with pytest.raises(train.UserError) as refused:
        train.train(train.parse_config(["--dry_run=True", f"--tokenizer={far}", own]))
    assert str(refused.value) == sentence.format(minicme.VOCAB_SIZE)
    # the demo's tokenizer built (here another tokenizer.json in its place), its base not yet: that tokenizer sizes it
    (tmp_path / "data").mkdir()
    built = with_vocabulary(hf_tokenizer_folder(tmp_path / "data" / "mini_cme"), 1800)
    os.replace(built / "tokenizer.json", minicme.DEMO["tokenizer"])
    train.train(train.parse_config(["--dry_run=True", f"--tokenizer={folder}", own]))
    assert f", vocabulary 1,800 (that of {minicme.DEMO['tokenizer']})\n" in capsys.readouterr().out
    with pytest.raises(train.UserError) as refused:
        train.train(train.parse_config(["--dry_run=True", f"--tokenizer={far}", own]))
    assert str(refused.value) == sentence.format(1800)
    scratch = ["--dry_run=True", f"--tokenizer={far}", own, "--init_from=scratch"]  # from scratch: the user's sizes it
    train.train(train.parse_config(scratch))
    assert f", vocabulary 5,000 (that of {far})\n" in capsys.readouterr().out
    assert not os.path.exists(minicme.DEMO["init_from"]) and not os.path.exists("out")  # a dry run builds nothing


def test_a_hugging_face_tokenizer_folder_prepares_trains_and_evaluates(tmp_path):
    folder = hf_tokenizer_folder(tmp_path / "qwen")  # no BOS, EOS <|endoftext|>, as Qwen2.5's
    records = [{"instruction": t, "input": "", "output": "positive", "task": "sentiment"} for t in TEXTS]
    data.write_jsonl(str(tmp_path / "r.jsonl"), records)
    data.write_jsonl(str(tmp_path / "eval" / "sentiment.jsonl"), records[:3])
    data.prepare([str(tmp_path / "r.jsonl")], str(folder), str(tmp_path / "tokens"), max_len=64, quiet=True)
    out = train.train(train.parse_config([
        f"--data_dir={tmp_path / 'tokens'}", f"--tokenizer={folder}", f"--eval_dir={tmp_path / 'eval'}",
        "--init_from=scratch", "--model=tiny", "--max_iters=4", "--eval_interval=4", "--batch_size=4", "--max_len=64",
        "--r=8", "--learning_rate=1e-2", f"--out_dir={tmp_path / 'run'}"]))
    assert "sentiment" in out["scores"] and (tmp_path / "run" / "adapter.pt").is_file()


def test_a_base_from_scratch_attends_past_short_rows_so_longer_answers_are_scored(run_data, tmp_path):
    """A base from scratch is built for at least 256 positions whatever max_len: an evaluation set that generates as
    many tokens as a training row holds (the summary's 48) has room for its prompts: scored, not refused."""
    answer = minicme.SYNTHETIC_TASKS["summary"].max_new_tokens
    out = train.train(train_cfg(run_data, tmp_path / "o", f"--max_len={answer}", "--max_iters=1", "--eval_iters=0",
                                "--eval_limit=1"))
    assert out["model"].args.context > answer + 2 and "summary" in out["scores"]
    # eval_iters=0: no validation batch, so no validation loss (not the 0 of an empty sum), here or in results.json
    assert "val_loss" not in out and "val_loss" not in json.loads((tmp_path / "o" / "results.json").read_text())


def _run(cmd, **kw):
    with tempfile.TemporaryDirectory() as tmp:  # torchrun leaves a log folder (torchelastic_*) in TMPDIR at every run
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": tmp}
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kw)


def _flags(run_data, out, *more):
    return [f"--data_dir={run_data / 'tokens'}", "--eval_dir=", f"--tokenizer={run_data / 'tokenizer.model'}",
            "--init_from=scratch", "--model=tiny", "--max_len=128", "--batch_size=8", "--max_iters=4",
            "--eval_interval=2", "--eval_iters=1", "--r=8", "--dropout=0.0", "--device=cpu", f"--out_dir={out}", *more]


@pytest.fixture(scope="module")
def one_process_run(run_data, tmp_path_factory):
    """The adapters of one process with 2 accumulation steps: the reference every torchrun run below must equal (the
    same run for each, made once; read only)."""
    out = tmp_path_factory.mktemp("one") / "one"
    one = _run([sys.executable, "train.py", *_flags(run_data, out, "--grad_accum=2", "--dropout=0.1")])
    assert one.returncode == 0, one.stderr[-2000:]
    return torch.load(out / "adapter.pt", weights_only=True)


@conftest.needs_distributed_torch
@pytest.mark.parametrize("mode, nproc", [("ddp", 2), ("fsdp", 2), ("fsdp", 1)])
def test_torchrun_equals_one_process(run_data, one_process_run, tmp_path, mode, nproc):
    """The global batch is cut the same way for 2 processes as for 1 process with 2 accumulation
    steps, dropout masks too, so the adapters must agree to float rounding (gloo on CPU). FSDP2 also shards under
    torchrun with one process (what a one-GPU machine can check of it), there with activation checkpointing, as the
    7B recipes run: each block recomputed in backward, its dropout masks and the balance loss's gradient too."""
    # "--": torchrun would eat --r=8
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
                "--", *_flags(run_data, tmp_path / "two", f"--fsdp={mode == 'fsdp'}", f"--grad_accum={3 - nproc}",
                              "--dropout=0.1", f"--activation_checkpointing={nproc == 1}")])
    assert two.returncode == 0, two.stdout[-1000:] + two.stderr[-3000:]
    assert "step 4/4: loss" in two.stdout  # printed before the processes leave with os._exit
    b = torch.load(tmp_path / "two" / "adapter.pt", weights_only=True)
    assert_same_adapters(one_process_run, b, atol=1e-6)
    assert any(t.abs().sum() > 0 for n, t in b.items() if n.endswith("lora_B"))  # it trained
    keys = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["optimizer"]["state"].keys()
    assert keys and (all(isinstance(k, str) for k in keys) == (mode == "fsdp"))  # FSDP2 keys by name: it sharded
    if mode == "fsdp" and nproc == 2:  # re-scored sharded: its first forward (generate's blocks) is not the root's
        again = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                      "--", f"--out_dir={tmp_path / 'two'}", "--eval_only=True", f"--eval_dir={run_data / 'test'}",
                      "--eval_limit=2"])
        assert again.returncode == 0 and "expert load" in again.stdout, again.stderr[-3000:]


# each process of torchrun run by this script, which writes down the process's exit code (negative: a signal's)
EXIT_CODE_OF_EACH_RANK = """import os, signal, subprocess, sys
for s in (signal.SIGTERM, signal.SIGINT):  # torchrun signals the whole process group: the process below gets them
    signal.signal(s, lambda signum, frame: None)
code = subprocess.call([sys.executable, *sys.argv[1:]])
with open(os.path.join(os.path.dirname(__file__), "exits"), "a") as f:
    f.write(f"{os.environ['RANK']} {code}\\n")
sys.exit(code if code >= 0 else 128 - code)
"""


def _torchrun_fails_with(sentence, *cmd, code=2):
    """torchrun (2 processes) of cmd fails: the sentence is printed once, every process leaves without a traceback
    (torchrun's own report of the failed processes follows, with one traceback of its own) and with `code`, the
    others too: torchrun stops them once one has failed, and 130 or a SIGTERM beside its code in torchrun's summary
    read as a Ctrl-C or a kill (and a process that left first with 0 as a success)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "each_rank.py").write_text(EXIT_CODE_OF_EACH_RANK)
        bad = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(Path(tmp) / "each_rank.py"), *cmd])
        exits = sorted((Path(tmp) / "exits").read_text().split("\n")[:-1])
    assert bad.returncode != 0 and bad.stderr.count(sentence) == 1, bad.stderr[-3000:]
    assert bad.stderr.count("Traceback") <= 1 and "KeyboardInterrupt" not in bad.stderr, bad.stderr[-3000:]
    assert re.search(rf"exitcode\s*:\s*{code}\b", bad.stderr), bad.stderr[-3000:]
    assert exits == [f"0 {code}", f"1 {code}"], bad.stderr[-3000:]


@conftest.needs_distributed_torch
@pytest.mark.parametrize("dry_run", [False, True])
def test_torchrun_user_error_is_one_sentence_and_a_failed_exit(run_data, tmp_path, dry_run):
    """The dry run's too: rank 1 left at once with 0, and only rank 0 checked the configuration."""
    _torchrun_fails_with("train.py: error: batch_size=6 must be a multiple of processes x grad_accum = 4.",
                         "train.py", "--", *_flags(run_data, tmp_path / "bad", "--batch_size=6", "--grad_accum=2",
                                                   f"--dry_run={dry_run}"))
    assert not (tmp_path / "bad").exists()  # found before anything was written


@conftest.needs_distributed_torch
def test_torchrun_a_mistake_of_one_rank_is_its_sentence_and_the_others_leave_quietly_not_hang(run_data, tmp_path):
    """Only rank 0 checks that out_dir can be written: the others, torn down by torchrun, say nothing. A mistake of a
    rank other than 0 alone (its node's files, say) is printed by that rank, and rank 0, which waited for it in a
    collective, says nothing either."""
    (tmp_path / "file").write_text("")
    _torchrun_fails_with(f"train.py: error: out_dir {tmp_path / 'file' / 'run'} can not be written",
                         "train.py", "--", *_flags(run_data, tmp_path / "file" / "run"))
    script = tmp_path / "rank_1_alone.py"
    script.write_text("import os\nimport train\n\n\ndef refuse(*args):\n"
                      "    raise train.UserError('rank 1 lacks a file.')\n\n\n"
                      "if os.environ['RANK'] == '1':\n    train.preflight = refuse\ntrain.main()\n")
    _torchrun_fails_with("train.py: error: rank 1 lacks a file.", str(script), "--",
                         *_flags(run_data, tmp_path / "run"))


def test_torchrun_out_of_memory_on_one_rank_is_its_sentence_and_every_rank_leaves_with_3(run_data, tmp_path):
    """Rank 0 runs out of memory in a step: rank 1, in the step's collective, took torchrun's SIGTERM there, then
    waited in vain for another and printed the collective's traceback (exit code 1), or left with 143."""
    script = tmp_path / "rank_0_out_of_memory.py"
    script.write_text("import os\nimport torch\nimport train\n\n\ndef out_of_memory(*args):\n"
                      "    raise torch.OutOfMemoryError('CUDA out of memory.')\n\n\n"
                      "if os.environ['RANK'] == '0':\n    train.train_step = out_of_memory\ntrain.main()\n")
    _torchrun_fails_with("train.py: error: out of memory: lower batch_size per process", str(script), "--",
                         *_flags(run_data, tmp_path / "run"), code=3)


def test_kill_9_mid_run_keeps_a_good_checkpoint_and_resume_matches(run_data, tmp_path):
    import signal
    import time as _time
    flags = _flags(run_data, tmp_path / "killed", "--max_iters=40", "--eval_interval=1", "--dropout=0.1")
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpt = tmp_path / "killed" / "ckpt.pt"
    deadline = _time.time() + 120
    while _time.time() < deadline and not (ckpt.exists() and torch.load(ckpt, weights_only=True)["iter"] >= 3):
        _time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # at any moment: checkpoints are written every step
    proc.wait()
    state = torch.load(ckpt, weights_only=True)  # the last good checkpoint loads
    assert 3 <= state["iter"] < 40
    resumed = _run([sys.executable, "train.py", f"--out_dir={tmp_path / 'killed'}", "--init_from=resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = _run([sys.executable, "train.py",
                  *_flags(run_data, tmp_path / "whole", "--max_iters=40", "--eval_interval=40", "--dropout=0.1")])
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert_same_adapters(torch.load(tmp_path / "killed" / "adapter.pt", weights_only=True),
                         torch.load(tmp_path / "whole" / "adapter.pt", weights_only=True))


def test_a_run_with_stderr_closed_trains_scores_and_writes_its_files(run_data, tmp_path, monkeypatch, capsys):
    """`python train.py ... 2>&-` (a cron job, a daemon's child) starts with sys.stderr None: the run asked it whether
    it was a terminal (for its progress bar) and ended in an AttributeError at its first step, its files unwritten."""
    monkeypatch.setattr(sys, "stderr", None)
    train.train(train_cfg(run_data, tmp_path / "run", "--max_iters=2", "--eval_interval=2"))
    assert {"adapter.pt", "ckpt.pt", "results.json"} <= set(os.listdir(tmp_path / "run"))
    assert "step 2" in capsys.readouterr().out


def test_the_demo_paths_are_train_pys_defaults():
    """minicme.build_demo_data builds only what a config uses of its DEMO paths: a default of train.py that
    drifted from them would make `python train.py` skip building its data."""
    assert {k: train.DEFAULTS[k] for k in minicme.DEMO} == minicme.DEMO


def test_an_interrupted_demo_pretraining_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(minicme.PRETRAIN, "max_iters", 4)
    monkeypatch.setitem(minicme.PRETRAIN, "model", "tiny")
    real_get_batch, threads = data.get_batch, []

    def interrupt_pretraining_at_step_2(dataset, step, *a, **k):
        if step == 2 and "pack" in a:  # the pretraining packs its batches, the fine-tuning pads them
            threads.append(torch.get_num_threads())
            raise KeyboardInterrupt
        return real_get_batch(dataset, step, *a, **k)

    monkeypatch.setattr(data, "get_batch", interrupt_pretraining_at_step_2)
    cfg = train.parse_config(["--max_iters=1", "--eval_limit=1", "--model=tiny"])
    stopped = train.train(cfg)  # as an interrupted run: main exits with machine.INTERRUPTED
    assert stopped["interrupted"] and stopped["step"] == 2
    out = capsys.readouterr().out
    assert "interrupted: checkpoint of step 2 written to data/mini_cme/pretrain" in out
    assert "continue with the same command" in out and "--init_from=resume" not in out  # one instruction, not two
    assert not (tmp_path / "data/mini_cme/base.pt").exists()  # a half-trained base never passes for the base
    saved = torch.load(tmp_path / "data/mini_cme/pretrain/ckpt.pt", weights_only=True)["config"]
    assert saved["threads"] == threads[0]  # recorded, so the resume rounds as the run did
    monkeypatch.setattr(data, "get_batch", real_get_batch)
    train.train(cfg)
    assert "resumed from data/mini_cme/pretrain/ckpt.pt at step 2" in capsys.readouterr().out
    assert (tmp_path / "data/mini_cme/base.pt").is_file()
    (tmp_path / "data/mini_cme/base.pt").unlink()  # a user deletes the base: the next run builds it again
    train.train(train.parse_config(["--max_iters=1", "--eval_limit=1", "--model=tiny", "--overwrite=True"]))
    assert (tmp_path / "data/mini_cme/base.pt").is_file()


def test_the_demo_builds_its_data_and_base_from_nothing(tmp_path, monkeypatch, capsys):
    """`python train.py` with no arguments, in an empty folder, with the pretraining shrunk."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(minicme.PRETRAIN, "max_iters", 3)
    monkeypatch.setitem(minicme.PRETRAIN, "model", "tiny")
    cfg = train.parse_config(["--max_iters=2", "--eval_limit=2", "--model=tiny"])
    summary = train.train(cfg)
    out = capsys.readouterr().out
    assert "building the synthetic mini-CME suite" in out and "pretraining a tiny LLaMA" in out
    assert (tmp_path / "data/mini_cme/base.pt").is_file() and (tmp_path / "out/demo/adapter.pt").is_file()
    assert set(summary["scores"]) == set(SYNTHETIC_TASKS) and "expert load" in out
    assert torch.load(tmp_path / "data/mini_cme/base.pt", weights_only=True)["model_args"]["dim"] == 64
    with pytest.raises(train.UserError, match=r"out/demo already holds a run \(.*\); continue it with "
                                              r"--init_from=resume, choose another --out_dir, or pass --overwrite"):
        train.train(cfg)  # a run never replaces another by accident
    train.train({**cfg, "overwrite": True})  # a second run reuses everything
    assert "building" not in capsys.readouterr().out


@pytest.mark.parametrize("built", [(), ("suite.json",), ("suite.json", "tokens/summary.json")])
def test_a_demo_that_can_not_write_its_files_says_so_and_to_run_elsewhere_not_to_delete_them(tmp_path, monkeypatch,
                                                                                             capsys, read_only, built):
    """`python train.py` in a folder it can not write (a read-only checkout, a shared folder) said its files in
    data/mini_cme were 'incomplete' and to delete them, where there were none or nothing was wrong with them: each
    step of the build (suite, shards, base) names the folder it can not write, and that it should run elsewhere."""
    monkeypatch.chdir(tmp_path)
    for name in built:  # what an earlier build (or a copy) left
        (tmp_path / minicme.ROOT / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / minicme.ROOT / name).write_text(json.dumps({"version": minicme.VERSION}))
    locked = tmp_path / minicme.ROOT if built else tmp_path
    read_only(locked)
    monkeypatch.setattr(minicme, "make_suite", lambda *a, **k: pytest.fail("the suite was built"))
    monkeypatch.setattr(minicme, "prepare", lambda *a, **k: pytest.fail("the shards were prepared"))
    err = conftest.script_error(train.main, ["--model=tiny"], capsys)
    assert err == (f"train.py: error: the demo builds its files in {minicme.ROOT} under the current folder, which can "
                   f"not be written: {locked} is not writable (Permission denied); run train.py from a folder you can "
                   "write to.")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == \
        [f"{minicme.ROOT}/{name}" for name in built]  # nothing written


def test_the_demos_pretraining_runs_on_its_own_threads_leaves_only_the_base_and_gives_the_run_its_threads_back(
        tmp_path, monkeypatch):
    """A pretraining (a resumed one keeps the count it saved) sets torch's threads for itself: the run after it
    gets its own count back, which its config records and its resume keeps. The finished pretraining's ckpt.pt goes:
    a base deleted later is pretrained anew, not resumed from it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(minicme.PRETRAIN, "max_iters", 1)
    monkeypatch.setitem(minicme.PRETRAIN, "model", "tiny")
    monkeypatch.setitem(minicme.PRETRAIN, "threads", 1)
    seen, real_run, before = [], train.run, torch.get_num_threads()
    monkeypatch.setattr(train, "run", lambda r, ckpt: seen.append((r.cfg["out_dir"], torch.get_num_threads()))
                        or real_run(r, ckpt))
    try:
        train.train(train.parse_config(["--max_iters=1", "--eval_limit=1", "--model=tiny", "--threads=2"]))
    finally:
        torch.set_num_threads(before)
    assert seen == [(minicme.PRETRAIN["out_dir"], 1), ("out/demo", 2)]
    assert os.path.isfile(minicme.DEMO["init_from"]) and not os.path.exists(f"{minicme.PRETRAIN['out_dir']}/ckpt.pt")


def test_cuda_float32_matmuls_are_tf32_for_the_run_only_and_the_cpu_untouched(run_data, tmp_path, monkeypatch):
    """With a bf16 base the adapters' GEMMs are float32: IEEE float32 (torch's default on CUDA) would run them
    at a CUDA-core fraction of the tensor cores' speed. A CUDA run switches them to TF32 (tf32=False keeps
    IEEE) and leaves the setting as it found it; a CPU run never touches it."""
    seen, real_setup = [], machine.setup_distributed
    monkeypatch.setattr(train, "build_demo", lambda cfg, resuming=False: None)
    monkeypatch.setattr(train, "run", lambda r, ckpt: seen.append((r.device.type, cuda_fp32_matmuls())) or {})
    before = cuda_fp32_matmuls()
    monkeypatch.setattr(machine, "setup_distributed", lambda cfg: (0, 1, torch.device("cuda")))
    train.train(train_cfg(run_data, tmp_path / "a"))
    assert cuda_fp32_matmuls() == before
    train.train(train_cfg(run_data, tmp_path / "b", "--tf32=False"))
    assert cuda_fp32_matmuls() == before
    monkeypatch.setattr(machine, "setup_distributed", real_setup)
    with machine.cuda_matmul_precision(True):  # a CPU run inside a TF32 setting leaves it so
        train.train(train_cfg(run_data, tmp_path / "c", "--device=cpu"))
    assert seen == [("cuda", "tf32"), ("cuda", "ieee"), ("cpu", "tf32")] and cuda_fp32_matmuls() == before


def test_a_run_saved_before_a_key_existed_resumes_with_its_default(run_data, tmp_path):
    train.train(train_cfg(run_data, tmp_path / "p", "--eval_dir=", "--max_iters=2", "--eval_interval=2"))
    path = tmp_path / "p" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["tf32"]  # as written by a version without it
    torch.save(ckpt, path)
    out = train.train(train.parse_config([f"--out_dir={tmp_path / 'p'}", "--init_from=resume", "--max_iters=3",
                                          "--tf32=False"]))
    assert out["step"] == 3 and out["config"]["tf32"] is False


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_bfloat16_training_learns_and_scores(run_data, tmp_path):
    out = train.train(train_cfg(run_data, tmp_path / "c", "--device=cuda", "--dtype=bfloat16", "--max_iters=12",
                                "--adapter=teamlora"))
    params = dict(out["model"].named_parameters())
    w1 = params["layers.0.feed_forward.w1.weight"]
    assert w1.dtype == torch.bfloat16 and w1.is_cuda
    assert params["layers.0.feed_forward.w1.lora_A"].dtype == torch.float32
    assert np.mean(out["train_losses"][-3:]) < np.mean(out["train_losses"][:3])
    assert set(out["scores"]) == set(SYNTHETIC_TASKS)


@pytest.mark.parametrize("threads, cores, others, want", [(3, 2, 5, 3), (1, 16, 0, 1), (0, 2, 0, 2), (0, 2, 1, 1),
                                                          (0, 2, 7, 1), (0, 16, 3, 13)])
def test_cpu_threads_leave_the_cores_other_jobs_run_on(threads, cores, others, want, monkeypatch):
    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(machine, "others_running", lambda: others)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert machine.cpu_threads({"threads": threads}) == want
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # an explicit choice is left alone
    assert machine.cpu_threads({"threads": threads}) == (threads or torch.get_num_threads())


def test_others_running_reads_a_count_that_excludes_this_process():
    n = machine.others_running()
    assert isinstance(n, int) and n >= 0


def test_others_running_is_the_median_of_five_samples_of_the_running_tasks_less_this_one(monkeypatch):
    """/proc/loadavg's fourth field is running/total tasks, this process among the running: the median of five
    samples (a burst of one sample does not count), less one; where it cannot be read, 0."""
    import io
    counts = iter([3, 9, 1, 5, 2])  # median 3, this process included

    def loadavg(path, **kwargs):  # kwargs: the encoding
        assert path == "/proc/loadavg"
        return io.StringIO(f"0.50 0.40 0.30 {next(counts)}/812 4242\n")
    monkeypatch.setattr(machine, "open", loadavg, raising=False)
    monkeypatch.setattr(machine.time, "sleep", lambda seconds: None)
    assert machine.others_running() == 2
    monkeypatch.setattr(machine, "open", lambda path, **k: (_ for _ in ()).throw(FileNotFoundError(path)),
                        raising=False)
    assert machine.others_running() == 0  # not Linux
    monkeypatch.setattr(machine, "open", lambda path, **k: io.StringIO("0.00 0.01 0.05\n"), raising=False)
    assert machine.others_running() == 0  # a /proc/loadavg of fewer fields (a sandbox's): no count, not a crash


def test_device_auto_is_a_visible_gpu_else_the_cpu_and_cuda_without_one_is_one_sentence(monkeypatch):
    cfg = {"device": "auto", "compile": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [machine.resolve_device({**cfg, "device": d}) for d in ("auto", "cpu", "cuda:1")] == ["cuda", "cpu",
                                                                                                "cuda:1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert machine.resolve_device(cfg) == "cpu"
    for dev in ("cuda", "cuda:1"):  # the device as the user wrote it (cuda:1 was named "cuda")
        with pytest.raises(UserError, match=rf"^device='{dev}' but no CUDA GPU is visible; use --device=cpu\.$"):
            machine.resolve_device({**cfg, "device": dev})


@pytest.mark.parametrize("count", [1, 2])
def test_a_gpu_number_past_the_visible_gpus_is_one_sentence_naming_the_count(run_data, tmp_path, monkeypatch, count):
    """--device=cuda:5 on a machine of fewer GPUs was taken, and failed later inside torch; now train.py refuses it
    before it writes anything."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    cfg = {"device": "cuda", "compile": False}
    assert [machine.resolve_device({**cfg, "device": f"cuda:{n}"}) for n in range(count)] == \
        [f"cuda:{n}" for n in range(count)]
    visible = "1 CUDA GPU is visible (cuda:0)" if count == 1 else "2 CUDA GPUs are visible (cuda:0 to cuda:1)"
    for n in (count, 5):
        with pytest.raises(UserError) as error:
            machine.resolve_device({**cfg, "device": f"cuda:{n}"})
        assert str(error.value) == (f"device='cuda:{n}' but only {visible}; use --device=cuda:N with N below {count}, "
                                    "or --device=cuda for the first.")
    with pytest.raises(UserError, match=re.escape(f"device='cuda:{count}' but only {visible};")):
        train.train(train_cfg(run_data, tmp_path / "c", f"--device=cuda:{count}"))
    assert not (tmp_path / "c").exists()


def test_torchrun_on_a_torch_older_than_2_7_is_refused_in_one_sentence_before_joining(monkeypatch):
    """torch 2.6 passes the one-process tests but not torchrun's: FSDP2 fails on the CPU and a mistake showed gloo's
    traceback. Under torchrun such a release is named with the minimum before any process group is joined."""
    joined = []
    monkeypatch.setattr(machine.dist, "init_process_group", lambda backend: joined.append(backend))
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    cfg = {"device": "cpu", "compile": False}
    for old in ("2.6.0", "2.6.0+cu124", "1.13.1"):
        monkeypatch.setattr(machine.torch, "__version__", old)
        refused = rf"^torchrun's processes \(DDP, FSDP2\) need torch >= 2\.7, this is {re.escape(old)}; upgrade torch, "
        with pytest.raises(UserError, match=refused + r"or run one process without torchrun\.$"):
            machine.setup_distributed(cfg)
    assert joined == []
    for new in ("2.7.0", "2.10.0+cpu", "3.0.0"):
        monkeypatch.setattr(machine.torch, "__version__", new)
        assert machine.setup_distributed(cfg) == (0, 2, torch.device("cpu"))
    assert joined == ["gloo"] * 3
    monkeypatch.delenv("RANK")  # one process: every release runs it
    monkeypatch.setattr(machine.torch, "__version__", "2.6.0")
    assert machine.setup_distributed(cfg) == (0, 1, torch.device("cpu"))


@conftest.needs_distributed_torch
def test_torchrun_processes_take_their_nodes_own_gpu_over_nccl_and_join_over_gloo_on_the_cpu(monkeypatch):
    """On the second of two 2-GPU nodes, RANK=3 has LOCAL_RANK=1: its GPU is cuda:1 (that node has no cuda:3), and
    GPUs join over NCCL, CPU processes over gloo. Nothing is started: CUDA and the process group are stood in for."""
    devices, backends = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(machine.dist, "init_process_group", lambda backend: backends.append(backend))
    for name, value in dict(RANK="3", LOCAL_RANK="1", WORLD_SIZE="4").items():
        monkeypatch.setenv(name, value)
    cfg = {"device": "auto", "compile": False}
    assert machine.setup_distributed(cfg) == (3, 4, torch.device("cuda", 1))
    assert machine.setup_distributed({**cfg, "device": "cpu"}) == (3, 4, torch.device("cpu"))
    assert devices == [1] and backends == ["nccl", "gloo"]


@conftest.needs_distributed_torch
@pytest.mark.parametrize("visible", [1, 2])
def test_a_local_rank_past_the_visible_gpus_is_one_sentence_before_a_gpu_is_taken(monkeypatch, visible):
    """torchrun --nproc_per_node=4 on a node that shows fewer GPUs (or CUDA_VISIBLE_DEVICES too short): the process
    with LOCAL_RANK past them got torch's "invalid device ordinal" from set_device. Now one sentence names LOCAL_RANK,
    the count and both fixes, before any GPU is chosen, any group joined or any model built; CPU processes need none."""
    devices, backends = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(machine.dist, "init_process_group", lambda backend: backends.append(backend))
    for name, value in dict(RANK="2", LOCAL_RANK="2", WORLD_SIZE="4").items():
        monkeypatch.setenv(name, value)
    gpus, processes = ("1 CUDA GPU", "1 process") if visible == 1 else (f"{visible} CUDA GPUs", f"{visible} processes")
    for device in ("auto", "cuda"):
        with pytest.raises(UserError) as error:
            machine.setup_distributed({"device": device, "compile": False})
        assert str(error.value) == (f"LOCAL_RANK=2 but this node shows {gpus}; run at most {processes} a node "
                                    f"(torchrun --nproc_per_node={visible}), or make more GPUs visible "
                                    "(CUDA_VISIBLE_DEVICES).")
    assert devices == [] and backends == []
    assert machine.setup_distributed({"device": "cpu", "compile": False}) == (2, 4, torch.device("cpu"))
    monkeypatch.setenv("LOCAL_RANK", str(visible - 1))  # the node's last GPU is its own
    assert machine.setup_distributed({"device": "auto", "compile": False}) == (2, 4, torch.device("cuda", visible - 1))
    assert devices == [visible - 1] and backends == ["gloo", "nccl"]


def test_keep_slices_changes_and_says_nothing_unless_a_resume_runs_on_another_number_of_processes(capsys):
    """A new run, a resume on as many processes as the run had, and re-scoring (no batches to cut) keep grad_accum
    and print nothing; a resume on other processes changes it, and rank 0 alone says so."""
    cfg, two = {"grad_accum": 1, "batch_size": 8, "eval_only": False}, {"rng": [None] * 2}
    assert machine.keep_slices(cfg, None, 1, True) == cfg
    for world, accum in ((2, 2), (4, 1)):  # a new run under torchrun: its own processes, whatever their count
        assert machine.keep_slices({**cfg, "grad_accum": accum}, None, world, True) == {**cfg, "grad_accum": accum}
    assert machine.keep_slices(cfg, two, 2, True) == cfg
    assert machine.keep_slices({**cfg, "eval_only": True}, two, 1, True) == {**cfg, "eval_only": True}
    assert machine.keep_slices(cfg, two, 1, False) == {**cfg, "grad_accum": 2}
    assert capsys.readouterr() == ("", "")
    assert machine.keep_slices(cfg, two, 1, True) == {**cfg, "grad_accum": 2}
    assert "resuming a run of 2 process(es) on 1: grad_accum 1 -> 2" in capsys.readouterr().out
    assert machine.keep_slices(cfg, {"rng": [None] * 4}, 2, True) == {**cfg, "grad_accum": 2}  # 4 slices on 2
    assert "resuming a run of 4 process(es) on 2: grad_accum 1 -> 2," in capsys.readouterr().out


def test_keep_slices_refuses_a_resume_whose_batch_the_new_processes_cannot_cut_with_the_runs_grad_accum():
    """A resume keeps batch_size and grad_accum: where processes x grad_accum does not divide batch_size (though the
    processes alone do) the resume cannot start, and keep_slices says which process counts can."""
    cfg = {"grad_accum": 2, "batch_size": 12, "eval_only": False}
    with pytest.raises(UserError, match=r"cut each batch into 2 slices .* which 4 processes cannot split; resume it "
                                        r"on a number of processes that divides 2\.$"):
        machine.keep_slices(cfg, {"rng": [None]}, 4, True)
    with pytest.raises(UserError, match=r"cut each batch into 1 slice \(1 process"):  # not "1 slices"
        machine.keep_slices({**cfg, "grad_accum": 1, "batch_size": 3}, {"rng": [None]}, 2, True)


@pytest.mark.parametrize("eval_only", [False, True])
def test_a_resume_or_re_scoring_on_any_number_of_processes_splits_its_batches_or_names_counts_that_do(eval_only):
    """Neither may change batch_size or grad_accum: on any process count keep_slices gives a config whose batches
    split (check_batch_split; re-scoring validates in them), or refuses it, naming counts it takes."""
    for batch_size, grad_accum, saved in [(3, 1, 1), (6, 2, 1), (8, 1, 2), (12, 3, 2), (8, 2, 1)]:
        cfg, ckpt = {"grad_accum": grad_accum, "batch_size": batch_size, "eval_only": eval_only}, {"rng": [0] * saved}
        for world in range(1, 9):
            try:
                machine.check_batch_split(machine.keep_slices(cfg, ckpt, world, False), world)
            except UserError as e:
                named = int(re.search(r"on a number of processes that divides (\d+)", str(e)).group(1))
                assert named % world and named % saved == 0, e
                for fits in (w for w in range(1, 9) if named % w == 0):
                    machine.check_batch_split(machine.keep_slices(cfg, ckpt, fits, False), fits)


def saved_run(out_dir, **settings):
    """A ckpt.pt in out_dir whose run had these settings (no weights: resume_config reads only its config)."""
    cfg = train.parse_config([f"--out_dir={out_dir}", *(f"--{k}={v}" for k, v in settings.items())])
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"state": {}, "optimizer": {}, "iter": 1, "config": cfg, "rng": [0], "model_args": {}, "base": None},
               os.path.join(out_dir, "ckpt.pt"))


@pytest.mark.parametrize("settings, flags", [
    (dict(batch_size=12, grad_accum=3), ["--grad_accum=3"]),  # 16 (the default) is no multiple of 3; 12 is
    (dict(r=9, experts=3), ["--r=9"]),  # 9 is no multiple of the default 4 experts
    (dict(batch_size=1), [f"--max_iters={2**57}"]),  # 16 x 2**57 examples pass 2**60; 1 x 2**57 do not
])
def test_a_resume_checks_its_settings_together_with_its_runs_not_with_the_defaults(tmp_path, settings, flags):
    """A resume's unset keys are its run's: a setting the user repeats (or raises) is judged beside the run's others.
    batch_size=16, experts=4 (the defaults) were checked against them, and a valid resume refused."""
    saved_run(tmp_path, **settings)
    cfg, _ = train.resume_config(train.parse_config([f"--out_dir={tmp_path}", "--init_from=resume", *flags]))
    assert {k: cfg[k] for k in settings} == settings


@pytest.mark.parametrize("settings, flags, message", [
    (dict(batch_size=64), [f"--max_iters={2**55}"],  # 16 (the default) x 2**55 is below 2**60; 64 x 2**55 is not
     r"^batch_size=64 streams more examples than numpy indexes; lower --max_iters \(a resume keeps its run's "),
])
def test_a_resume_that_does_not_go_with_its_runs_settings_is_refused_naming_what_to_change(tmp_path, settings, flags,
                                                                                           message):
    """Checked on the command line's config (its defaults), these resumes passed, with the run's settings that fail."""
    saved_run(tmp_path, **settings)
    cfg = train.parse_config([f"--out_dir={tmp_path}", "--init_from=resume", *flags])
    with pytest.raises(UserError, match=message):
        train.resume_config(cfg)


def test_train_gives_the_callers_cpu_thread_count_back_when_it_returns_or_fails(run_data, tmp_path, monkeypatch):
    """A run sets torch's threads for itself (machine.use_cpu_threads); a notebook or test that calls train.train
    keeps its own count afterwards, whether the run ends or fails."""
    torch.set_num_threads(3)  # the caller's (conftest gives the test's count back)
    seen, real_run = [], train.run
    monkeypatch.setattr(train, "run", lambda r, ckpt: seen.append(torch.get_num_threads()) or real_run(r, ckpt))
    train.train(train_cfg(run_data, tmp_path / "a", "--threads=1", "--eval_dir=", "--max_iters=1"))
    assert seen == [1] and torch.get_num_threads() == 3

    def failing_run(r, ckpt):
        seen.append(torch.get_num_threads())
        raise UserError("stand-in for a run that fails")

    monkeypatch.setattr(train, "run", failing_run)
    with pytest.raises(UserError, match="stand-in"):
        train.train(train_cfg(run_data, tmp_path / "b", "--threads=2", "--eval_dir=", "--max_iters=1"))
    assert seen == [1, 2] and torch.get_num_threads() == 3


def test_compile_without_a_cpu_compiler_is_one_sentence_before_anything_runs(run_data, tmp_path, monkeypatch):
    monkeypatch.setattr(machine.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="compile=True on the CPU needs a C\\+\\+ compiler and none was found"):
        train.train(train_cfg(run_data, tmp_path / "c", "--compile=True"))
    assert not (tmp_path / "c").exists()
    assert machine.resolve_device({"device": "cpu", "compile": False}) == "cpu"  # eager needs no compiler
    # the compiler CXX names counts as one; on a GPU, torch.compile writes Triton kernels, not C++ for the CPU
    monkeypatch.setattr(machine.shutil, "which", lambda name: "/opt/bin/c++" if name == "my-c++" else None)
    monkeypatch.setenv("CXX", "my-c++")
    assert machine.resolve_device({"device": "cpu", "compile": True}) == "cpu"
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(machine.torch.cuda, "is_available", lambda: True)
    assert machine.resolve_device({"device": "cuda", "compile": True}) == "cuda"


class _GradRecorder(torch.optim.SGD):
    """An optimizer for train_step that changes nothing and keeps the gradients it was handed."""
    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads = None

    def step(self, closure=None):
        self.grads = [p.grad.clone() for p in self.param_groups[0]["params"]]


@pytest.mark.skipif(not any(__import__("shutil").which(c) for c in ("g++", "clang++")), reason="needs a C++ compiler")
def test_compile_compiles_each_block_and_trains_like_eager(run_data, tmp_path):
    """Compiled blocks give eager's losses over a run and eager's gradients in a step (every adapter tensor to 1e-4
    of its largest gradient). The adapters after AdamW steps are not compared element by element: AdamW's first
    steps move each element by about lr whatever its gradient's size, so an element whose gradient is within
    rounding of 0 steps either way in two correct runs (one of 30,000 here moved by 2 lr)."""
    eager = train.train(train_cfg(run_data, tmp_path / "e", "--max_iters=3", "--eval_interval=3", "--eval_limit=0",
                                  "--dropout=0.0", "--eval_dir="))
    compiled = train.train(train_cfg(run_data, tmp_path / "c", "--max_iters=3", "--eval_interval=3", "--eval_limit=0",
                                     "--dropout=0.0", "--eval_dir=", "--compile=True"))
    blocks = compiled["model"].layers
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)  # every block, in place
    assert compiled["model"].state_dict().keys() == eager["model"].state_dict().keys()  # names stay
    np.testing.assert_allclose(compiled["train_losses"], eager["train_losses"], rtol=1e-4)
    # what a 7B recipe runs with compile=True: compiled blocks recomputed in backward, the balance loss through them
    ckpt = train.train(train_cfg(run_data, tmp_path / "k", "--max_iters=3", "--eval_interval=3", "--eval_limit=0",
                                 "--dropout=0.0", "--eval_dir=", "--compile=True", "--activation_checkpointing=True"))
    np.testing.assert_allclose(ckpt["train_losses"], eager["train_losses"], rtol=1e-4)
    grads = []
    for flags in (["--compile=False"], ["--compile=True"], ["--compile=True", "--activation_checkpointing=True"]):
        r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path / str(len(grads)), *flags, "--dropout=0.0")
        recorder = _GradRecorder(train.trainable(model))
        train.train_step(r, model, model, recorder, data.TokenDataset(r.cfg["data_dir"], "train"), 2)
        grads.append(recorder.grads)
    assert len(grads[0]) == 4 * 3 * 4  # 4 blocks x w1, w2, w3 x A, B, router, M
    for other in grads[1:]:
        for a, b in zip(other, grads[0], strict=True):
            assert b.abs().max() > 0
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(b.abs().max()))


def test_compile_hands_each_block_and_nothing_else_to_torch_compile_with_dynamic_shapes(monkeypatch):
    """compile=True compiles every transformer block, each once, with dynamic=True: torch's default (dynamic=None)
    compiles each block twice, for the first sequence length and again at the second. Only the call is checked
    (torch.compile recorded, nothing compiled): no C++ compiler needed. The default is off: the demo runs where no
    C++ compiler is, and draws the dropout masks of the README's table."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, *args, **kwargs: calls.append((fn, args, kwargs)) or fn)
    for flag in (False, True):
        cfg = train.parse_config(["--init_from=scratch", "--model=tiny", f"--compile={flag}"])
        model, _, _ = train.build_model(cfg, torch.device("cpu"), 512, 1)
        assert calls == ([(block._call_impl, (), {"dynamic": True}) for block in model.layers] if flag else [])
    assert train.DEFAULTS["compile"] is False


# ---------------------------------------------------------------------------------------------------
# checkpoint.py on its own (added from mutation testing)

@pytest.mark.parametrize("text", ["[]", '{"scores": {}}', '{"config": {"adapter": "moelora", "experts": 0}}', "{",
                                  '{"config": ["r"]}'])
def test_an_adapter_whose_results_json_is_unreadable_is_scored_by_the_flags(tmp_path, text):
    """check_adapter_settings compares with the results.json beside adapter.pt only where it reads one: a damaged one
    (a list, no config or one of the wrong kind, settings that compute nothing, not JSON) leaves the flags alone."""
    import checkpoint
    cfg, computes = dict(train.DEFAULTS), lambda c: (train.adapter_kwargs(c), c["targets"])
    (tmp_path / "results.json").write_text(json.dumps({"config": {**cfg, "alpha": 8.0}}))
    with pytest.raises(UserError, match="was trained with --alpha=8.0"):
        checkpoint.check_adapter_settings(str(tmp_path / "adapter.pt"), cfg, computes)
    (tmp_path / "results.json").write_text(text)
    assert checkpoint.check_adapter_settings(str(tmp_path / "adapter.pt"), cfg, computes) is None


def test_rng_state_survives_a_weights_only_save_and_restores_every_generator(tmp_path):
    """torch's, numpy's (its cached Gaussian included) and Python's generators draw the same numbers
    after set_rng_state as they did when rng_state was taken, through a weights_only save and load."""
    import random

    import checkpoint
    dev = torch.device("cpu")
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves the second Gaussian of a pair cached (has_gauss = 1)
    checkpoint.save_atomic({"rng": checkpoint.rng_state(dev)}, str(tmp_path / "rng.pt"))

    def draws():
        return (torch.rand(5).tolist(), np.random.standard_normal(3).tolist(), np.random.randint(0, 10**6, 3).tolist(),
                [random.random() for _ in range(3)])
    want = draws()
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.set_rng_state(checkpoint.load_pt(str(tmp_path / "rng.pt"), "test file")["rng"], dev)
    assert draws() == want


def test_copy_into_copies_values_into_the_parameters_in_their_own_dtype():
    """A bfloat16 base filled from float32 tensors stays bfloat16, in the same Parameter objects, and
    shares no storage with the source (the optimizer and the loaded file stay apart)."""
    import checkpoint
    m = Transformer(model.ModelArgs.from_name("tiny", n_layers=1)).to(torch.bfloat16)
    params = dict(m.named_parameters())
    src = {n: torch.randn(p.shape) + 3.0 for n, p in params.items()}  # float32, far from 0
    checkpoint.copy_into(m, src)
    for n, p in m.named_parameters():
        assert p is params[n] and p.dtype == torch.bfloat16, n
        assert torch.equal(p, src[n].to(torch.bfloat16)), n
    src["norm.weight"].zero_()
    assert (m.norm.weight != 0).all()


def test_load_checkpoint_refuses_a_dict_without_every_key_in_one_sentence(tmp_path):
    import checkpoint
    full = {"state": {}, "optimizer": {}, "iter": 2, "config": {}, "rng": [{}], "model_args": {}}
    path = tmp_path / "ckpt.pt"
    torch.save(full, path)
    assert checkpoint.load_checkpoint(str(path))["iter"] == 2
    for broken in ({k: v for k, v in full.items() if k != "rng"}, {}):  # an older writer's file; an empty dict
        torch.save(broken, path)
        with pytest.raises(UserError, match=r"ckpt\.pt is not a training checkpoint, not the ckpt\.pt"):
            checkpoint.load_checkpoint(str(path))
    torch.save({**full, "iter": True}, path)  # a bool is an int to isinstance: the step is an int and nothing else
    with pytest.raises(UserError, match=r"ckpt\.pt is damaged: its weights, config, step"):
        checkpoint.load_checkpoint(str(path))
    for state in ([torch.zeros(1)], {"w": torch.zeros(1), "b": 0}):  # weights not by name; one weight not a tensor
        torch.save({**full, "state": state}, path)
        with pytest.raises(UserError, match=r"ckpt\.pt is damaged: its weights"):
            checkpoint.load_checkpoint(str(path))


def test_load_pt_names_an_empty_file_as_empty_and_another_fault_by_its_first_line(tmp_path, monkeypatch):
    """An empty ckpt.pt (a copy or a save that never wrote) is said to be empty, not a vague 'not readable'; a file
    torch cannot read is named with the first line of torch's reason (its later lines are a traceback's detail)."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))} is empty \(a copy or a save that did not finish\), "
                                        "not a training checkpoint; restore it"):
        checkpoint.load_checkpoint(str(path))

    def fails(*args, **kwargs):
        raise RuntimeError("  the first line says why\nthe second line is detail\nand so is the third")
    monkeypatch.setattr(torch, "load", fails)
    path.write_bytes(b"PK")
    with pytest.raises(UserError) as error:
        checkpoint.load_pt(str(path), "adapter")
    assert "not a readable adapter (truncated, corrupt, or not written by train.py: the first line says why)" in \
        str(error.value) and "detail" not in str(error.value)


def _flip_a_bit_of(path, record):
    """One bit of a record's bytes in a torch.save zip flipped in place, as a bad disk or copy does it."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(record))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10  # the local header's extra
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("record, what", [("/data/0", "training checkpoint"), ("/data.pkl", "adapter")])
def test_load_pt_refuses_a_checkpoint_whose_bytes_differ_from_their_saved_checksum_naming_it(tmp_path, record, what):
    """torch.load never checks the CRC-32 that torch.save writes beside each record: a bit flipped in a tensor loaded
    silently as other weights (a resume went on from them), and one in the pickle was said to be a file of Python
    objects that could run code. Either is one sentence naming the file and the damaged record; the file is kept."""
    path = tmp_path / "ckpt.pt"
    torch.save({"iter": 3, "w": torch.arange(256, dtype=torch.float32)}, path)
    assert checkpoint.load_pt(str(path), what)["w"].equal(torch.arange(256, dtype=torch.float32))  # whole: loaded
    _flip_a_bit_of(path, record)
    damaged = path.read_bytes()
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))} is damaged: its record \S+{re.escape(record)} "
                                        rf"does not match the checksum saved with it .*, so this {what} is not loaded; "
                                        r"restore it from a good copy or start from another checkpoint\.$"):
        checkpoint.load_pt(str(path), what)
    assert path.read_bytes() == damaged


def test_load_pt_takes_a_checkpoint_saved_without_checksums_as_torch_load_does(tmp_path):
    """torch can save without CRC-32s (config.save.compute_crc32 = False, for faster saves): each record's is 0
    then, which checks nothing, so such a file is loaded as torch.load loads it, not named damaged."""
    from torch.utils.serialization import config
    path, saved = tmp_path / "model.pt", {"iter": 3, "w": torch.arange(256, dtype=torch.float32)}
    before, config.save.compute_crc32 = config.save.compute_crc32, False  # (monkeypatch's undo broke this object)
    try:
        torch.save(saved, path)
    finally:
        config.save.compute_crc32 = before
    with zipfile.ZipFile(path) as z:
        assert not any(info.CRC for info in z.infolist())  # saved without a checksum, as asked
    loaded = checkpoint.load_pt(str(path), "base model")
    assert loaded["iter"] == 3 and loaded["w"].equal(saved["w"])


def test_load_pt_seeded_damage_fuzz_either_loads_what_was_saved_or_names_the_file(tmp_path):
    """Seeded damage to a saved checkpoint (bits flipped, a block zeroed, cut at any length, bytes appended): a load
    either gives back exactly what was saved (damage to bytes nothing reads) or is one UserError naming the file;
    never other values (before the checksum check, 86 of these 400 loaded silently as other tensors or config)."""
    path, rng = tmp_path / "ckpt.pt", random.Random(0)
    saved = {"iter": 3, "config": {"learning_rate": 1e-3}, "w": torch.arange(300.0), "b": torch.ones(7).bfloat16()}
    torch.save(saved, path)
    whole, outcomes = path.read_bytes(), collections.Counter()
    for _ in range(400):
        data, kind = bytearray(whole), rng.choice(["flip", "zeros", "cut", "append"])
        if kind == "flip":
            for _ in range(rng.choice([1, 3])):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == "zeros":
            at = rng.randrange(len(data))
            data[at:at + 16] = bytes(len(data[at:at + 16]))
        data = data[:rng.randrange(len(data))] if kind == "cut" else data + (
            rng.randbytes(rng.randrange(1, 50)) if kind == "append" else b"")
        path.write_bytes(bytes(data))
        try:
            got = checkpoint.load_pt(str(path), "training checkpoint")
        except UserError as e:
            assert str(e).startswith(f"{path} ") and "\n" not in str(e)
            outcomes["named"] += 1
            continue
        assert got.keys() == saved.keys() and got["iter"] == 3 and got["config"] == saved["config"], kind
        assert got["w"].equal(saved["w"]) and got["b"].equal(saved["b"]), kind
        outcomes["same"] += 1
    assert outcomes["named"] > 200 and outcomes["same"] > 20  # both kinds of damage were met


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="the process's mappings are read from Linux's /proc")
def test_load_pt_leaves_a_checkpoints_tensors_in_the_files_memory_map_not_copied_into_memory(tmp_path):
    """A full training's model.pt holds a 7B model's weights: they are paged in from disk as they are copied to
    their place, not first read whole into memory beside the model being filled."""
    path = tmp_path / "model.pt"
    torch.save({"model_args": {}, "model": {f"w{i}": torch.randn(64, 64) for i in range(3)}}, path)
    loaded = checkpoint.load_pt(str(path), "base model")["model"]
    spans = [[int(a, 16) for a in line.split()[0].split("-")] for line in open("/proc/self/maps")
             if line.split()[-1] == str(path)]
    assert spans and all(any(lo <= t.data_ptr() < hi for lo, hi in spans) for t in loaded.values())


def test_load_checkpoint_refuses_a_checkpoint_without_any_one_key_a_resume_reads_before_it_builds_the_model(tmp_path):
    """Each key (weights, AdamW's state, step, config, random states, model shape) is checked on loading: one missing
    is the one sentence then, not a KeyError after the model is built."""
    full = {"state": {}, "optimizer": {}, "iter": 2, "config": {}, "rng": [{}], "model_args": {}}
    path = tmp_path / "ckpt.pt"
    for key in full:
        torch.save({k: v for k, v in full.items() if k != key}, path)
        with pytest.raises(UserError, match=r"ckpt\.pt is not a training checkpoint, not the ckpt\.pt"):
            checkpoint.load_checkpoint(str(path))


def _tiny_adapter_model(seed):
    torch.manual_seed(0)  # the same base
    m = Transformer(model.ModelArgs.from_name("tiny", n_layers=2))
    torch.manual_seed(seed)  # adapters of their own
    teamlora.inject(m, ("wq", "w1"), r=8, experts=4, alpha=16, dropout=0.2)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if teamlora.is_adapter(n):
                p.copy_(torch.randn_like(p) * 0.1)
    return m.train()


@pytest.mark.parametrize("name, what", [("ckpt.pt", "training checkpoint"), ("adapter.pt", "adapter")])
def test_an_empty_checkpoint_file_is_named_as_empty_not_as_corrupt(tmp_path, name, what):
    """A copy or a save that did not finish leaves 0 bytes: the one sentence says so, not torch's zip complaint."""
    import checkpoint
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path / name))} is empty \(a copy or a save that did "
                                        rf"not finish\), not a {what}; restore it"):
        checkpoint.load_pt(str(tmp_path / name), what)


def test_an_adapter_state_naming_a_base_weight_in_place_of_an_adapter_tensor_is_refused_and_nothing_copied():
    """A checkpoint's adapter must hold the model's adapter tensors by name, not only as many: one that holds a base
    weight in place of one of them (a damaged or foreign file) would overwrite the frozen base and leave that
    adapter tensor at its start, unsaid."""
    import checkpoint
    m = _tiny_adapter_model(seed=1)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    state = {n: p.detach().clone() + 1 for n, p in m.named_parameters() if teamlora.is_adapter(n)}
    state.pop(next(iter(state)))
    state["norm.weight"] = torch.zeros_like(before["norm.weight"])
    with pytest.raises(UserError, match="does not fit this model"):
        checkpoint.load_state(m, state, {"adapter": "teamlora"}, "ckpt.pt")
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_an_adapter_state_missing_one_of_the_models_adapter_tensors_is_refused_and_nothing_copied():
    """A checkpoint's adapter must hold every adapter tensor of the model: one without one of them (a damaged file, or
    one of a run with fewer targets) would resume with that tensor at its start, unsaid."""
    import checkpoint
    m = _tiny_adapter_model(seed=1)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    state = {n: p.detach().clone() + 1 for n, p in m.named_parameters() if teamlora.is_adapter(n)}
    state.pop(next(iter(state)))
    with pytest.raises(UserError, match="does not fit this model"):
        checkpoint.load_state(m, state, {"adapter": "teamlora"}, "ckpt.pt")
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_a_checkpoint_recording_no_shards_resumes_on_any_and_one_recording_others_is_refused():
    """A ckpt.pt of a train.py that recorded no fingerprint of its shards (older ones) resumes on the shards there;
    one that records them resumes on those alone."""
    import checkpoint
    cfg = {"data_dir": "data/x"}
    checkpoint.check_data({}, "f1", cfg, "ckpt.pt")
    checkpoint.check_data({"data": "f1"}, "f1", cfg, "ckpt.pt")
    with pytest.raises(UserError, match="are not those this run trained on"):
        checkpoint.check_data({"data": "f0"}, "f1", cfg, "ckpt.pt")


def test_save_checkpoint_writes_ckpt_pt_first_and_restores_to_the_same_next_step(tmp_path, monkeypatch):
    """ckpt.pt is written before adapter.pt (a kill between them leaves the adapter behind, never ahead), after
    log.jsonl's lines are on disk (after a power cut a resume would log from the checkpoint on, leaving a gap), and
    loading it into another model and optimizer (adapter, AdamW moments, dropout RNG) makes the next step equal to
    the uninterrupted one, bit for bit."""
    import types

    import checkpoint
    cfg = {"adapter": "teamlora", "out_dir": str(tmp_path), "fsdp": False}
    tokens, targets = torch.randint(0, 512, (2, 10)), torch.randint(0, 512, (2, 10))

    def step(m, opt):
        opt.zero_grad()
        m(tokens, targets)[1].backward()
        opt.step()

    a = _tiny_adapter_model(seed=1)
    opt_a = torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        step(a, opt_a)
    order, real_save, real_fsync = [], checkpoint.save_atomic, os.fsync
    monkeypatch.setattr(checkpoint, "save_atomic", lambda obj, path: (order.append(os.path.basename(path)),
                                                                      real_save(obj, path))[1])
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    log = os.stat(tmp_path / "log.jsonl")

    def fsync(fd):
        if os.path.samestat(os.fstat(fd), log):
            order.append("fsync log.jsonl")
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    r = types.SimpleNamespace(cfg=cfg, world=1, device=torch.device("cpu"), master=True, args=a.args, base=None,
                              data=None, tok=None, clock=None)
    checkpoint.save_checkpoint(r, a, opt_a, 2)
    assert order == ["fsync log.jsonl", "ckpt.pt", "adapter.pt"]
    step(a, opt_a)  # the uninterrupted run's step 3

    b = _tiny_adapter_model(seed=2)
    opt_b = torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=1e-2)
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))
    with pytest.raises(UserError, match="does not fit this model"):  # one adapter tensor short
        checkpoint.load_state(b, dict(list(ckpt["state"].items())[1:]), cfg, "ckpt.pt")
    checkpoint.load_state(b, ckpt["state"], cfg, "ckpt.pt")
    checkpoint.set_optimizer_state(b, opt_b, ckpt["optimizer"], False)
    checkpoint.set_rng_state(ckpt["rng"][0], torch.device("cpu"))
    step(b, opt_b)  # the resumed run's step 3
    assert_same_adapters(adapters_of(a), adapters_of(b))


def test_by_name_keys_an_unsharded_optimizer_state_by_name_even_before_its_first_step():
    """An optimizer without moments yet still names its parameters by position, in its param_groups; FSDP2's own
    state, keyed by name, stays as it is."""
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    m[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
    fresh = checkpoint.by_name(m, opt, opt.state_dict())
    assert fresh["state"] == {} and fresh["param_groups"][0]["params"] == ["1.weight", "1.bias"]
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    named = checkpoint.by_name(m, opt, opt.state_dict())
    assert set(named["state"]) == {"1.weight", "1.bias"} and checkpoint.by_name(m, opt, named) is named
    # a position is the optimizer's, not the model's: parameters given in another order keep their own moments
    params = dict(m.named_parameters())
    backwards = torch.optim.AdamW([params["1.bias"], params["1.weight"]])
    m(torch.ones(1, 2)).sum().backward()
    backwards.step()
    named = checkpoint.by_name(m, backwards, backwards.state_dict())
    assert named["param_groups"][0]["params"] == ["1.bias", "1.weight"]
    assert all(named["state"][n]["exp_avg"].shape == params[n].shape for n in ("1.weight", "1.bias"))


def test_an_unsharded_runs_optimizer_state_loads_sharded_and_back_with_its_moments(tmp_path):
    """fsdp may change on resume: AdamW's moments and step of a one-process or DDP run (keyed by position) load into
    an FSDP2 model (keyed by name; it refused them, as a damaged ckpt.pt), and FSDP2's load back without it. As in a
    run, the optimizer holds the trained parameters only (frozen ones between them), and its settings come back."""
    script = tmp_path / "cross.py"
    script.write_text(textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from torch.distributed.fsdp import fully_shard
        import checkpoint
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        def model():
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
            m[1].requires_grad_(False)  # frozen between trained layers, as a base's weights between adapters
            return m
        def trained(m):  # train.trainable
            return [p for p in m.parameters() if p.requires_grad]
        def settings(opt):
            return [{{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}}
                    for g in opt.param_groups]
        a = model()
        opt_a = torch.optim.AdamW(trained(a), lr=0.1, betas=(0.8, 0.95), weight_decay=0.3)
        for _ in range(2):
            a(torch.randn(3, 4)).pow(2).sum().backward()
            opt_a.step()
            opt_a.zero_grad()
        plain = checkpoint.optimizer_state(a, opt_a, False)
        b = model()
        fully_shard(b[0])
        fully_shard(b)
        opt_b = torch.optim.AdamW(trained(b), lr=0.5)  # other settings: the checkpoint's replace them
        checkpoint.set_optimizer_state(b, opt_b, plain, True)
        sharded = checkpoint.optimizer_state(b, opt_b, True)
        c = model()
        opt_c = torch.optim.AdamW(trained(c), lr=0.5)
        checkpoint.set_optimizer_state(c, opt_c, sharded, False)
        names = [n for n, p in a.named_parameters() if p.requires_grad]
        assert len(plain["state"]) == len(names) == 4
        for i, n in enumerate(names):
            for k in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(sharded["state"][n][k], plain["state"][i][k]), (n, k)
                assert torch.equal(opt_c.state_dict()["state"][i][k], plain["state"][i][k]), (n, k)
        assert settings(opt_b) == settings(opt_c) == settings(opt_a), (settings(opt_a), settings(opt_b))
        dist.destroy_process_group()
        print("same moments")
    """))
    out = _run([sys.executable, str(script)])
    assert out.returncode == 0 and "same moments" in out.stdout, out.stderr[-2000:]


@conftest.needs_distributed_torch
def test_a_sharded_checkpoint_after_validation_holds_the_optimizers_state_of_the_roots_parameters(tmp_path):
    """FSDP2 leaves the root's parameters (embedding, norm, output layer) unsharded after a forward without backward,
    as validation runs one before each checkpoint: where they train (full training, an adapted output layer) the
    checkpoint crashed (KeyError) looking up the optimizer's parameters among the model's."""
    script = tmp_path / "root.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch, torch.distributed as dist
        import checkpoint, train
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        for adapter, targets in (("none", "w1"), ("teamlora", "w1,output")):
            out = os.path.join("{tmp_path}", adapter)
            cfg = train.parse_config(["--init_from=scratch", "--model=tiny", "--adapter=" + adapter,
                                      "--targets=" + targets, "--fsdp=True", "--out_dir=" + out])
            raw, args, _ = train.build_model(cfg, torch.device("cpu"), 512, 1)
            opt = torch.optim.AdamW(train.trainable(raw), lr=1e-2)
            tokens = torch.randint(0, 512, (2, 16))
            raw(tokens, tokens)[1].backward()
            opt.step()
            with torch.no_grad():
                raw.eval()(tokens, tokens)  # validation
            raw.train()
            os.makedirs(out)
            checkpoint.save_checkpoint(train.Run(cfg, args=args), raw, opt, 1)
            saved = checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))
            trained = {{n: p for n, p in raw.named_parameters() if p.requires_grad}}
            assert sorted(saved["optimizer"]["state"]) == sorted(trained) and any("output." in n for n in trained)
            for n, p in trained.items():
                assert torch.equal(saved["optimizer"]["state"][n]["exp_avg"], opt.state[p]["exp_avg"].full_tensor())
                assert torch.equal(saved["state"][n], p.full_tensor()), n
        dist.destroy_process_group()
        print("saved")
    """))
    out = _run([sys.executable, str(script)])
    assert out.returncode == 0 and "saved" in out.stdout, out.stderr[-2000:]


@conftest.needs_distributed_torch
def test_a_sharded_runs_checkpoint_gives_a_sharded_resume_its_optimizers_moments_and_step(tmp_path):
    """A resume under FSDP2 (torchrun, fsdp=True) loads the optimizer state its ckpt.pt holds (keyed by name, as a
    sharded run saves it) into its sharded optimizer: every trained parameter's moments and step come back, and the
    next step is the uninterrupted run's."""
    script = tmp_path / "resume.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch, torch.distributed as dist
        import checkpoint, train
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        out = os.path.join("{tmp_path}", "run")
        cfg = train.parse_config(["--init_from=scratch", "--model=tiny", "--fsdp=True", "--out_dir=" + out])
        def built():
            torch.manual_seed(0)
            raw, args, _ = train.build_model(cfg, torch.device("cpu"), 512, 1)
            return raw, args, torch.optim.AdamW(train.trainable(raw), lr=1e-2)
        raw, args, opt = built()
        tokens = torch.randint(0, 512, (2, 16))
        for _ in range(2):
            raw(tokens, tokens)[1].backward()
            opt.step()
            opt.zero_grad()
        os.makedirs(out)
        r = train.Run(cfg, args=args)
        checkpoint.save_checkpoint(r, raw, opt, 2)
        ckpt = checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))
        raw2, _, opt2 = built()
        checkpoint.load_state(raw2, ckpt["state"], cfg, os.path.join(out, "ckpt.pt"))
        checkpoint.set_training_state(raw2, opt2, ckpt, r, os.path.join(out, "ckpt.pt"))
        trained = [(n, p) for n, p in raw.named_parameters() if p.requires_grad]
        resumed = dict(raw2.named_parameters())
        assert trained
        for n, p in trained:
            for k in ("step", "exp_avg", "exp_avg_sq"):
                want, got = opt.state[p][k], opt2.state[resumed[n]][k]
                want, got = (t.full_tensor() if hasattr(t, "full_tensor") else t for t in (want, got))
                assert torch.equal(want, got), (n, k)
        for m, o in ((raw, opt), (raw2, opt2)):  # and the next step is the uninterrupted run's
            torch.manual_seed(1)  # the same dropout masks
            m(tokens, tokens)[1].backward()
            o.step()
        for n, p in trained:
            assert torch.equal(p.full_tensor(), resumed[n].full_tensor()), n
        dist.destroy_process_group()
        print("resumed")
    """))
    out = _run([sys.executable, str(script)])
    assert out.returncode == 0 and "resumed" in out.stdout, out.stderr[-2000:]


def test_a_checkpoint_the_disk_cannot_take_says_what_to_run_and_keeps_the_last_one(tmp_path, monkeypatch):
    """A full disk at the first checkpoint leaves nothing to continue from: start again. At a later one, at ckpt.pt or
    at adapter.pt (a resume writes the adapter of its ckpt.pt again), continue from the last ckpt.pt written, with the
    run's own command (the demo's pretraining: the same command)."""
    import types

    import checkpoint
    m = _tiny_adapter_model(seed=1)
    opt = torch.optim.AdamW(train.trainable(m), lr=1e-2)
    r = types.SimpleNamespace(cfg={"adapter": "teamlora", "out_dir": str(tmp_path), "fsdp": False}, world=1,
                              device=torch.device("cpu"), master=True, args=m.args, base=None, data=None, tok=None,
                              clock=None, resume_with="the same command")
    save, full = torch.save, set()  # full: the files the disk has no room for

    def save_unless_full(obj, f, *args, **kwargs):
        return save(obj, conftest.FullDisk(f) if os.path.basename(f.name).partition(".tmp")[0] in full else f,
                    *args, **kwargs)
    monkeypatch.setattr(torch, "save", save_unless_full)
    full.add("ckpt.pt")
    with pytest.raises(UserError, match=rf"checkpoint of step 2 to {re.escape(str(tmp_path))} \(No space left on "
                       r"device\); .* then start the run again with --overwrite=True\.$"):
        checkpoint.save_checkpoint(r, m, opt, 2)
    assert os.listdir(tmp_path) == []
    full.clear()
    checkpoint.save_checkpoint(r, m, opt, 2)
    for name, kept in (("ckpt.pt", 2), ("adapter.pt", 4)):
        full = {name}
        with pytest.raises(UserError, match=r"checkpoint of step 4 .* then continue from the last checkpoint written "
                           r"with the same command\.$"):
            checkpoint.save_checkpoint(r, m, opt, 4)
        assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter"] == kept
        assert sorted(os.listdir(tmp_path)) == ["adapter.pt", "ckpt.pt"]


def test_a_checkpoint_tensor_of_another_shape_or_name_is_refused_not_broadcast():
    """copy_ would broadcast a (1, d) tensor into an (r, d) parameter: load_state must refuse it, and
    a tensor the model does not have, in one sentence, before copying anything."""
    import checkpoint
    m = _tiny_adapter_model(seed=1)
    state = {n: p.detach().clone() for n, p in m.named_parameters() if teamlora.is_adapter(n)}
    name = next(n for n in state if n.endswith("lora_A"))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(UserError, match=r"does not fit this model \(shape"):
        checkpoint.load_state(m, dict(state, **{name: state[name][:1] + 1}), {"adapter": "teamlora"}, "ckpt.pt")
    # a transposed tensor (lora_A saved as (d, r)) holds as many values: refused by its shape, not its size
    assert state[name].shape[0] != state[name].shape[1]
    with pytest.raises(UserError, match=rf"{re.escape(str(tuple(state[name].T.shape)))} does not fit this model"):
        checkpoint.load_state(m, dict(state, **{name: state[name].T.contiguous()}), {"adapter": "teamlora"}, "ckpt.pt")
    with pytest.raises(UserError, match=r"\(no such tensor\)"):
        checkpoint.copy_into(m, {"layers.0.attention.wq.lora_Z": torch.zeros(2)})
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())  # nothing copied


def test_only_an_empty_log_jsonl_of_its_own_is_a_log_that_holds_nothing_and_why_none_advises_by_it(tmp_path):
    """A log.jsonl of a single byte is not empty (it is kept, and a resume's advice is the one for a run's log); a
    link to an empty file is the user's file; a finished run's file that is a dangling link still marks the run as
    one the advice to start again with --overwrite=True must not name."""
    out = tmp_path / "run"
    out.mkdir()
    ckpt, log = str(out / "ckpt.pt"), out / "log.jsonl"
    files_of_a_run = train.RUN_FILES
    assert not checkpoint.logged_nothing(out)  # no log at all
    log.write_bytes(b"")
    assert checkpoint.logged_nothing(out)
    assert checkpoint.why_none(ckpt, files_of_a_run) == f"{ckpt} does not exist; start a run with another init_from"
    for one_byte in (b"\n", b"{"):
        log.write_bytes(one_byte)
        assert not checkpoint.logged_nothing(out)
        assert "start it again with its own init_from and --overwrite=True" in checkpoint.why_none(ckpt, files_of_a_run)
    (out / "results.json").symlink_to(tmp_path / "gone.json")  # a run's result, as a link whose file is gone
    assert checkpoint.why_none(ckpt, files_of_a_run) == f"{ckpt} does not exist; start a run with another init_from"
    (out / "results.json").unlink()
    log.unlink()
    (tmp_path / "mine.txt").write_bytes(b"")
    log.symlink_to(tmp_path / "mine.txt")
    assert not checkpoint.logged_nothing(out)


def test_data_fingerprint_sees_both_ends_and_the_size_of_every_shard(tmp_path):
    for name in ("train.tokens.bin", "train.offsets.bin"):
        (tmp_path / name).write_bytes(bytes(range(256)) * 40)  # 10 KiB: the middle is not read
    fp = train.checkpoint.data_fingerprint(tmp_path)
    (tmp_path / "summary.json").write_text("{}")  # not a shard
    assert train.checkpoint.data_fingerprint(tmp_path) == fp
    for name in ("train.tokens.bin", "train.offsets.bin"):
        original = (tmp_path / name).read_bytes()
        for changed in (b"x" + original[1:], original[:-1] + b"x", original + b"\0",
                        original[:4095] + b"x" + original[4096:],  # the last byte of the first 4 KiB
                        original[:-4096] + b"x" + original[-4095:]):  # the first byte of the last 4 KiB
            assert changed != original and len(changed) >= len(original)
            (tmp_path / name).write_bytes(changed)
            assert train.checkpoint.data_fingerprint(tmp_path) != fp, name
        (tmp_path / name).write_bytes(original)
    assert train.checkpoint.data_fingerprint(tmp_path) == fp
    (tmp_path / "train.tokens.bin").write_bytes(bytes(10240))  # zeros: a longer shard has the same first and last 4 KiB
    zeros = train.checkpoint.data_fingerprint(tmp_path)
    (tmp_path / "train.tokens.bin").write_bytes(bytes(12288))
    assert train.checkpoint.data_fingerprint(tmp_path) != zeros  # its size tells them apart


def test_data_fingerprint_leaves_out_a_named_pipe_or_a_folder_that_ends_in_bin(tmp_path):
    """Not prepare's shards: a named pipe was opened and waited on for a writer, then failed to seek; a folder was an
    IsADirectoryError's traceback, at every start and resume of a run on that data_dir."""
    (tmp_path / "train.tokens.bin").write_bytes(bytes(range(256)) * 4)
    fp = checkpoint.data_fingerprint(tmp_path)
    (tmp_path / "folder.bin").mkdir()
    with conftest.named_pipe(tmp_path / "pipe.bin", b"x" * 100):
        assert checkpoint.data_fingerprint(tmp_path) == fp


def test_an_adapter_alone_is_scored_by_the_flags_beside_a_results_json_that_is_a_named_pipe_or_nested_too_deeply(
        tmp_path):
    """check_adapter_settings reads the results.json beside an adapter.pt, where one that can not be read means the
    flags alone: a named pipe was opened and waited on for a writer, a deep nesting was a RecursionError's traceback."""
    cfg, computes = dict(train.DEFAULTS), lambda c: c["alpha"]
    other = json.dumps({"config": cfg | {"alpha": cfg["alpha"] * 2}}).encode()  # a readable one is refused
    with conftest.named_pipe(tmp_path / "results.json", other):
        assert checkpoint.check_adapter_settings(str(tmp_path / "adapter.pt"), cfg, computes) is None
    os.remove(tmp_path / "results.json")
    (tmp_path / "results.json").write_text("[" * 100_000 + "]" * 100_000)
    assert checkpoint.check_adapter_settings(str(tmp_path / "adapter.pt"), cfg, computes) is None
    (tmp_path / "results.json").write_bytes(other)
    with pytest.raises(UserError, match="was trained with --alpha="):
        checkpoint.check_adapter_settings(str(tmp_path / "adapter.pt"), cfg, computes)


def test_fingerprint_sees_both_ends_of_every_tensor_and_not_the_dicts_order():
    """A base's fingerprint must change when any tensor changes at either end of its sampled values (the last
    name in sorted order and the last value included), or its shape; a copy in another order is the same base."""
    import checkpoint
    torch.manual_seed(0)
    w = {n: torch.randn(300) for n in ("layers.0.w1.weight", "norm.weight", "tok_embeddings.weight")}  # > 2 x 64
    fp = checkpoint.fingerprint(w)
    assert checkpoint.fingerprint({n: w[n].clone() for n in reversed(list(w))}) == fp
    for name in w:
        for i in (0, 63, -64, -1):  # the first and last of both ends' 64 values
            changed = {n: t.clone() for n, t in w.items()}
            changed[name][i] += 1e-3
            assert checkpoint.fingerprint(changed) != fp, (name, i)
    assert checkpoint.fingerprint({**w, "norm.weight": w["norm.weight"].reshape(3, 100)}) != fp
    renamed = {("norm.bias" if n == "norm.weight" else n): t for n, t in w.items()}  # the same sorted order
    assert checkpoint.fingerprint(renamed) != fp
    # the same values in another dtype (a float64 copy of a float32 base: equal once made float) are another base
    assert checkpoint.fingerprint({**w, "norm.weight": w["norm.weight"].double()}) != fp


def test_only_a_dict_of_adapter_tensors_alone_is_an_adapter_file():
    """An injected model's full state dict (base and lora_ tensors) or a base's is not an adapter.pt: the
    messages that tell a user which file they passed depend on it."""
    import checkpoint
    t = torch.zeros(2)
    assert checkpoint.is_adapter_file({"layers.0.w1.lora_A": t, "layers.0.w1.lora_B": t})
    for other in ({}, {"layers.0.w1.weight": t}, {"layers.0.w1.lora_A": t, "layers.0.w1.weight": t}, [t]):
        assert not checkpoint.is_adapter_file(other), other


def test_a_one_process_cuda_runs_checkpoint_keeps_its_cuda_generator(tmp_path, monkeypatch):
    """save_checkpoint asks the run's own device for its generators: a one-process CUDA run's ckpt.pt holds
    the CUDA state (dropout on the GPU resumes exactly). CUDA is stood in for, so this runs anywhere."""
    import types

    import checkpoint
    cuda_state, asked = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda dev: (asked.append(dev), cuda_state.clone())[1])
    a = _tiny_adapter_model(seed=1)
    dev = torch.device("cuda", 0)
    r = types.SimpleNamespace(cfg={"adapter": "teamlora", "out_dir": str(tmp_path), "fsdp": False}, world=1,
                              device=dev, master=True, args=a.args, base=None, data=None, tok=None, clock=None)
    checkpoint.save_checkpoint(r, a, torch.optim.AdamW(train.trainable(a), lr=1e-2), 3)
    rng = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))["rng"]
    assert asked == [dev] and len(rng) == 1 and torch.equal(rng[0]["cuda"], cuda_state)
    restored = []  # and a resume on CUDA gives that device its generator back; on the CPU there is none to set
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, dev: restored.append((state, dev)))
    checkpoint.set_rng_state(rng[0], dev)
    checkpoint.set_rng_state(rng[0], torch.device("cpu"))
    checkpoint.set_rng_state({**rng[0], "cuda": None}, dev)  # a CPU run's checkpoint resumed on a GPU
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_state) and restored[0][1] == dev


def test_gather_state_is_a_snapshot_that_later_steps_leave_alone():
    """gather_state copies: what it returns is the adapter at that step, not a view of the parameters that the
    next optimizer step rewrites (on the CPU, .to("cpu") without copy=True would return the parameters' storage)."""
    import checkpoint
    a = _tiny_adapter_model(seed=1)
    state = checkpoint.gather_state(a, {"adapter": "teamlora"})
    before = adapters_of(a)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    assert_same_adapters(state, before)


def test_a_changed_base_is_refused_for_an_adapter_but_not_for_full_training_whose_checkpoint_holds_every_weight():
    """check_base: an adapter is only right on the base it trained on; a full-training resume loads every weight from
    ckpt.pt, so the base at init_from does not matter to it. A checkpoint without a fingerprint (older) passes."""
    import checkpoint
    adapter, full = {"adapter": "teamlora", "init_from": "b.pt"}, {"adapter": "none", "init_from": "b.pt"}
    checkpoint.check_base({"base": "aaaa"}, "aaaa", adapter, "ckpt.pt")
    checkpoint.check_base({"base": None}, "bbbb", adapter, "ckpt.pt")
    checkpoint.check_base({}, "bbbb", adapter, "ckpt.pt")
    checkpoint.check_base({"base": "aaaa"}, "bbbb", full, "ckpt.pt")
    with pytest.raises(UserError, match=r"the base model at b\.pt is not the one this run trained on .*ckpt\.pt"):
        checkpoint.check_base({"base": "aaaa"}, "bbbb", adapter, "ckpt.pt")


@pytest.mark.parametrize("text", ['{"base": "aaaa"}', '{"config": {}}', '{"base": null}', "[]", None])
def test_an_adapter_alone_is_refused_only_on_a_base_other_than_the_one_its_results_json_records(tmp_path, text):
    """check_adapter_base: an adapter.pt alone meets the base whose fingerprint the results.json beside it records;
    one of an older train.py (no key), none, a damaged one, or a base not known (the dry run's None) pass."""
    import checkpoint
    path, cfg = str(tmp_path / "adapter.pt"), {"init_from": "b.pt"}
    if text is not None:
        (tmp_path / "results.json").write_text(text)
    for base in ("aaaa", None):
        assert checkpoint.check_adapter_base(path, base, cfg) is None
    if text != '{"base": "aaaa"}':
        assert checkpoint.check_adapter_base(path, "bbbb", cfg) is None
        return
    with pytest.raises(UserError, match=r"^the base model at b\.pt is not the one .*adapter\.pt was trained on .*; "
                                        r"point --init_from at that base\.$"):
        checkpoint.check_adapter_base(path, "bbbb", cfg)


def test_only_rank_0_writes_the_checkpoint_and_every_rank_waits_until_it_is_written(tmp_path, monkeypatch):
    """Under torchrun every rank gathers the state (a collective), rank 0 alone writes the files (two writers of one
    file would race), and all of them wait at a barrier until it has: no rank goes on, or exits, before it is whole."""
    import types

    import checkpoint
    a = _tiny_adapter_model(seed=1)
    opt = torch.optim.AdamW(train.trainable(a), lr=1e-2)
    at_barrier = []
    monkeypatch.setattr(checkpoint.dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None),
                                                                                               [mine, mine]))
    for rank in (1, 0):
        out = tmp_path / f"rank{rank}"
        out.mkdir()
        monkeypatch.setattr(checkpoint.dist, "barrier", lambda out=out: at_barrier.append(sorted(os.listdir(out))))
        r = types.SimpleNamespace(cfg={"adapter": "teamlora", "out_dir": str(out), "fsdp": False}, world=2,
                                  device=torch.device("cpu"), master=rank == 0, args=a.args, base=None, data=None,
                                  tok=None, clock=None)
        checkpoint.save_checkpoint(r, a, opt, 3)
    assert at_barrier == [[], ["adapter.pt", "ckpt.pt"]]  # rank 1 wrote nothing; rank 0 waited with both written
    assert len(checkpoint.load_checkpoint(str(tmp_path / "rank0" / "ckpt.pt"))["rng"]) == 2


def test_fsdp_true_outside_torchrun_is_one_processs_run(run_data, tmp_path, capsys):
    """The recipes set fsdp=True for torchrun; run without it (one process, no process group) nothing is sharded:
    the run trains and saves as with fsdp=False, to the same adapters, and says so once (before: not a word)."""
    flags = ("--eval_dir=", "--max_iters=2", "--eval_interval=2", "--threads=1")
    plain = train.train(train_cfg(run_data, tmp_path / "plain", *flags))
    assert "fsdp" not in capsys.readouterr().err
    fsdp = train.train(train_cfg(run_data, tmp_path / "fsdp", *flags, "--fsdp=True"))
    assert capsys.readouterr().err.count("note: fsdp=True shards only under torchrun; this one process holds") == 1
    assert fsdp["step"] == 2 and (tmp_path / "fsdp" / "adapter.pt").is_file()
    assert_same_adapters(adapters_of(plain["model"]), adapters_of(fsdp["model"]))


# -------------------------------------------------------------------------------------------------
# Gaps found by mutation testing

def test_a_config_file_may_import_modules_to_compute_its_values(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("import math\nfrom os import path\n\n\ndef half(x):\n    return x / 2\n\n\n"
                        "learning_rate = math.sqrt(4e-6)\nalpha = half(64.0)\n")
    cfg = train.parse_config([str(cfg_file)])
    assert cfg["learning_rate"] == pytest.approx(2e-3) and cfg["alpha"] == 32.0
    assert "math" not in cfg and "path" not in cfg and "half" not in cfg


def test_a_config_file_is_read_as_python_reads_it_with_built_in_modules_a_bom_or_a_coding_line(tmp_path):
    """nanoGPT's own configs `import time` (built into python: a module without __file__); an editor's BOM or a
    coding line is read as python reads a script."""
    (tmp_path / "c.py").write_text("import sys\nimport time\nout_dir = 'out-' + str(time.time() > 0)\n")
    assert train.parse_config([str(tmp_path / "c.py")])["out_dir"] == "out-True"
    (tmp_path / "bom.py").write_bytes(b"\xef\xbb\xbfr = 16\n")
    (tmp_path / "latin.py").write_bytes(b"# -*- coding: latin-1 -*-\nout_dir = 'caf\xe9'\n")
    cfg = train.parse_config([str(tmp_path / "bom.py"), str(tmp_path / "latin.py")])
    assert (cfg["r"], cfg["out_dir"]) == (16, "caf\u00e9")


def test_the_keys_a_config_file_or_a_flag_sets_are_the_explicit_ones_a_resume_keeps(tmp_path):
    """parse_config's _explicit is every key a config file or a flag set, and nothing else (not a file's imports
    or _private names, not the defaults): a resume takes every other key from the run, so a key missing here would
    be silently replaced by the run's. A lone `--` (torchrun's separator) is skipped."""
    (tmp_path / "c.py").write_text("import math\n_scale = 2\nr = 8 * _scale\nexperts = 8\n")
    cfg = train.parse_config([str(tmp_path / "c.py"), "--experts=2", "--", "--alpha=8.0"])
    assert cfg["_explicit"] == ["alpha", "experts", "r"] and (cfg["r"], cfg["experts"], cfg["alpha"]) == (16, 2, 8.0)
    assert train.parse_config([])["_explicit"] == []


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.usefixtures("at_a_fresh_root")
def test_help_prints_the_docstring_and_every_default_with_its_comment_and_exits_0(capsys, flag):
    with pytest.raises(SystemExit) as stop:
        train.main(["config/cme_llama2_7b.py", flag, "--r=8"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith("Fine-tune a LLaMA with TeamLoRA")
    for key, value in train.DEFAULTS.items():  # each default as train.py states it
        assert re.search(rf"^{key}(, \w+)* = ", out, re.M) or re.search(rf"^\w+, {key} = ", out, re.M), key
    assert "learning_rate = 1e-3  # chosen for the demo" in out


def test_help_prints_the_defaults_line_for_line_from_their_heading_as_train_py_states_them(capsys):
    """After the docstring, --help shows train.py's own lines, from the "# defaults" heading on, none cut."""
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out, doc = capsys.readouterr().out, train.docstring(train.__file__)
    assert out.startswith(doc + "\n\n")
    shown = out[len(doc) + 2:].rstrip("\n").split("\n")
    lines = open(train.__file__, encoding="utf-8").read().split("\n")
    assert shown[0].startswith("# defaults") and shown[0] in lines
    start = lines.index(shown[0])
    assert shown == lines[start:start + len(shown)]


def test_a_huge_number_or_an_error_of_several_lines_in_a_config_file_is_one_sentence_naming_it(tmp_path, capsys):
    for text, needle in [("max_iters = 10**5000\n", "config key 'max_iters' in config file"),
                         ("seed = -10**5000\n", "config key 'seed' in config file"),
                         ("raise ValueError('one\\ntwo')\n", "(ValueError: one two)")]:
        (tmp_path / "c.py").write_text(text)
        assert needle in conftest.script_error(train.main, [tmp_path / "c.py"], capsys)


@pytest.mark.parametrize("local_world, cores, others, want", [(2, 16, 3, 5), (8, 16, 0, 2), (4, 2, 0, 1)])
def test_cpu_threads_share_the_cores_among_torchruns_local_processes(local_world, cores, others, want, monkeypatch):
    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(machine, "others_running", lambda: others)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert machine.cpu_threads({"threads": 0}) == want


def test_results_table_shows_lift_as_score_minus_chance_and_the_average_row(capsys):
    names = list(SYNTHETIC_TASKS)[:3]
    scores, chance = dict(zip(names, (80.5, 10.0, 33.3))), dict(zip(names, (50.0, 25.5, 0.0)))
    evaluation.print_results(scores, chance, {}, dict(train.DEFAULTS))
    rows = {line.split()[0]: [float(x) for x in line.split()[-3:]]
            for line in capsys.readouterr().out.splitlines() if line.split() and line.split()[0] in names + ["average"]}
    assert set(rows) == set(names) | {"average"}
    for name in names:
        assert rows[name] == pytest.approx([scores[name], chance[name], scores[name] - chance[name]], abs=0.051)
    mean_score, mean_chance = sum(scores.values()) / 3, sum(chance.values()) / 3
    assert rows["average"] == pytest.approx([mean_score, mean_chance, mean_score - mean_chance], abs=0.051)


def test_results_table_says_when_eval_limit_scored_only_part_of_each_task(capsys):
    """A score over the first 100 records is not a test set's score: the table says so, unless every record counted."""
    names = list(SYNTHETIC_TASKS)[:2]
    for limit in (100, 0):
        evaluation.print_results(dict.fromkeys(names, 50.0), dict.fromkeys(names, 10.0), {},
                                 dict(train.DEFAULTS, eval_limit=limit))
        printed = capsys.readouterr().out
        assert ("each task scored on its first 100 records at most: eval_limit=100" in printed) == (limit == 100)
        assert ("records at most" in printed) == (limit > 0)  # eval_limit=0: no note at all


def test_results_show_each_tasks_share_of_every_expert_and_the_even_share(capsys):
    """The paper's Figure 5 as text: one line per task with every expert's share, and the even share 1 / experts."""
    names = list(SYNTHETIC_TASKS)[:2]
    loads = {names[0]: torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25]), names[1]: torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])}
    cfg = dict(train.DEFAULTS, experts=5, r=10, load_layers=3)
    evaluation.print_results(dict.fromkeys(names, 50.0), dict.fromkeys(names, 10.0), loads, cfg)
    printed = capsys.readouterr().out
    assert "expert load over each task's prompt tokens (last 3 layers; even = 0.20)" in printed
    for name, load in loads.items():
        line = [line for line in printed.splitlines() if line.startswith(name) and " e0 " in line]
        assert len(line) == 1, printed
        shares = [(int(e), float(v)) for e, v in re.findall(r"e(\d+) █* *([\d.]+)", line[0])]
        assert shares == [(i, pytest.approx(v, abs=0.005)) for i, v in enumerate(load.tolist())], line[0]
        bars = [len(bar) for bar in re.findall(r"e\d+ (█*)", line[0])]  # 20 blocks the whole: half a block at most off
        assert all(abs(n / 20 - v) <= 0.025 for n, v in zip(bars, load.tolist(), strict=True)), line[0]


def test_results_json_holds_the_summary_but_the_model_and_the_loss_curve(run_data, tmp_path):
    summary = train.train(train_cfg(run_data, tmp_path / "o", "--max_iters=2", "--eval_interval=2", "--eval_limit=1"))
    assert "val_loss" in summary and "scores" in summary
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    want = {k: v for k, v in summary.items() if k not in ("model", "train_losses")}
    assert results == json.loads(json.dumps(want))


@pytest.mark.parametrize("again", ["--eval_only=True", "--init_from=resume"])
def test_a_re_scored_runs_results_json_keeps_its_validation_loss(run_data, tmp_path, again):
    """Scoring a run again (eval_only, or a resume of a run stopped while it was scored: nothing left to train) writes
    results.json anew: with the run's validation loss, as the uninterrupted run's has it, not without."""
    first = train.train(train_cfg(run_data, tmp_path / "o", "--max_iters=2", "--eval_interval=2", "--eval_limit=1"))
    train.train(train.parse_config([f"--out_dir={tmp_path / 'o'}", again]))
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)


def test_train_seconds_are_the_runs_over_its_resumes_and_a_re_scoring_or_resume_with_no_step_left_keeps_them(
        run_data, tmp_path, step_clock):
    """results.json's train_seconds is the run's training time: that of a resume counted the resume's steps alone,
    and a resume with nothing left to train (a run stopped while it was scored) its own few milliseconds; a
    re-scoring (eval_only) wrote neither train_seconds nor step, and study.py called the run damaged."""
    out = tmp_path / "o"
    train.train(train_cfg(run_data, out, "--max_iters=2", "--eval_interval=2", "--eval_limit=1"))
    for again, step, seconds in (("--eval_only=True", 2, 200.0), ("--init_from=resume", 2, 200.0),
                                 ("--max_iters=4", 4, 400.0), ("--eval_only=True", 4, 400.0)):
        more = ["--init_from=resume"] if again == "--max_iters=4" else []
        train.train(train.parse_config([f"--out_dir={out}", again, *more]))
        results = json.loads((out / "results.json").read_text())
        assert (results.get("step"), results.get("train_seconds")) == (step, seconds), again
    assert torch.load(out / "ckpt.pt", weights_only=True)["train_seconds"] == 400.0  # where a resume finds it


def test_a_re_scoring_of_a_checkpoint_that_records_no_training_time_keeps_its_results_or_says_it_is_not_known(
        run_data, tmp_path, step_clock):
    """A ckpt.pt of an older train.py records no training time: a re-scoring keeps the one of the results.json beside
    it where that is of the same step, and otherwise writes None (not known), never its own time."""
    out = tmp_path / "o"
    train.train(train_cfg(run_data, out, "--max_iters=2", "--eval_interval=2", "--eval_limit=1"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    del ckpt["train_seconds"]
    torch.save(ckpt, out / "ckpt.pt")
    train.train(train.parse_config([f"--out_dir={out}", "--eval_only=True"]))
    results = json.loads((out / "results.json").read_text())
    assert (results["step"], results["train_seconds"]) == (2, 200.0)
    (out / "results.json").write_text(json.dumps({**results, "step": 1}))  # another step's: not this checkpoint's
    train.train(train.parse_config([f"--out_dir={out}", "--eval_only=True"]))
    results = json.loads((out / "results.json").read_text())
    assert (results["step"], results["train_seconds"]) == (2, None)
    (out / "ckpt.pt").unlink()  # an adapter.pt alone (scored by the flags): neither is known
    train.train(train_cfg(run_data, out, "--eval_only=True", "--eval_limit=1"))
    results = json.loads((out / "results.json").read_text())
    assert (results["step"], results["train_seconds"]) == (None, None) and results["scores"]


def test_a_clock_counts_on_from_the_checkpoints_training_time_and_says_none_where_that_is_not_known(tmp_path,
                                                                                                    monkeypatch):
    """A new run's time starts at 0 and a resume's at its ckpt.pt's; a ckpt.pt of an older train.py, with no
    results.json of its step beside it, gives a resume None (not known), never this session's time alone."""
    ticks = iter([10.0, 17.5] * 3)
    monkeypatch.setattr(checkpoint.Clock, "now", staticmethod(lambda: next(ticks)))
    assert checkpoint.Clock(None, str(tmp_path)).seconds() == 7.5
    assert checkpoint.Clock({"iter": 3, "train_seconds": 40.0}, str(tmp_path)).seconds() == 47.5
    assert checkpoint.Clock({"iter": 3}, str(tmp_path)).seconds() is None


def test_a_wall_clock_set_back_during_a_session_takes_no_time_off_the_runs_training_time():
    """The Clock counts on a clock that setting the date (NTP, a user) does not move: here the wall clock goes back an
    hour at each reading, from before checkpoint.py is imported, and the session's time stays a few seconds."""
    code = ("import time\nwall = [2e9]\ndef back():\n    wall[0] -= 3600\n    return wall[0]\ntime.time = back\n"
            "import checkpoint\nprint(checkpoint.Clock(None, '.').seconds())")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 0 <= float(done.stdout) < 60


def test_a_checkpoint_of_step_0_is_a_known_step_and_training_time(tmp_path, monkeypatch):
    """A stop during step 1 writes ckpt.pt at step 0 (checkpoint.stop_run): its step and time are known, 0 and what it
    recorded (or its results.json of step 0 gave), as any other step's are."""
    assert checkpoint.trained({"iter": 0, "train_seconds": 2.5}, str(tmp_path)) == {"step": 0, "train_seconds": 2.5}
    (tmp_path / "results.json").write_text(json.dumps({"step": 0, "train_seconds": 1.5}))
    assert checkpoint.trained({"iter": 0}, str(tmp_path)) == {"step": 0, "train_seconds": 1.5}
    ticks = iter([10.0, 17.5])
    monkeypatch.setattr(checkpoint.Clock, "now", staticmethod(lambda: next(ticks)))
    assert checkpoint.Clock({"iter": 0, "train_seconds": 2.5}, str(tmp_path)).seconds() == 10.0


def test_long_prompts_are_cut_to_the_room_left_for_the_answer_keeping_bos_and_the_end(run_data, tmp_path):
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--eval_batch_size=2")
    long = {"instruction": " ".join(f"word{i}" for i in range(400)), "input": "tail", "output": "positive"}
    full = data.encode_prompt(r.tok, long)
    assert len(full) > r.args.max_seq_len
    for room in (2, 17, len(full) - 1, len(full), len(full) + 5):
        ids = evaluation.prompt_ids(r.tok, long, room)
        assert len(ids) == min(room, len(full)) and ids[0] == r.tok.bos_id
        assert ids[1:] == full[len(full) - len(ids) + 1:]  # the end of the prompt (its </s>) is kept
    task = SYNTHETIC_TASKS["sentiment"]
    r.eval_sets = {"sentiment": (task, [long, {"instruction": "short", "input": "", "output": "negative"}])}
    scores, _ = evaluation.evaluate(model, r)  # the longest prompt plus the answer fits max_seq_len
    assert set(scores) == {"sentiment"}


def test_eval_limit_0_scores_every_record_of_each_task(run_data, tmp_path):
    every = evaluation.load_eval_sets(train_cfg(run_data, tmp_path / "o", "--eval_limit=0"))
    two = evaluation.load_eval_sets(train_cfg(run_data, tmp_path / "o", "--eval_limit=2"))
    assert every.keys() == two.keys() == set(SYNTHETIC_TASKS)
    for name, (_, records) in every.items():
        on_file = [rec for _, rec in data.read_jsonl(run_data / "test" / f"{name}.jsonl")]
        assert records == on_file and len(on_file) > 2 and two[name][1] == on_file[:2]


def test_an_eval_dir_that_is_a_file_is_one_user_error(tmp_path):
    """eval_dir must be a folder of <task>.jsonl files: a file there (e.g. one evaluation set given by mistake) is
    a UserError saying so before training, not a NotADirectoryError from listing it."""
    file = tmp_path / "sentiment.jsonl"
    file.write_text('{"instruction": "x", "input": "", "output": "positive"}\n')
    with pytest.raises(UserError, match="is a file, not a folder of <task>.jsonl files"):
        evaluation.load_eval_sets({"eval_dir": str(file), "eval_limit": 0})
    with pytest.raises(UserError, match="does not exist"):
        evaluation.load_eval_sets({"eval_dir": str(tmp_path / "missing"), "eval_limit": 0})


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_runs_without_a_router_score_every_task_and_report_no_expert_load(run_data, tmp_path, adapter):
    """Plain LoRA and full training have no experts to weigh: their runs are scored like TeamLoRA's, with an empty
    expert load (no load of a router that is not there)."""
    summary = train.train(train_cfg(run_data, tmp_path / adapter, f"--adapter={adapter}", "--max_iters=1",
                                    "--eval_interval=1", "--eval_limit=1", f"--init_from={run_data / 'base.pt'}"))
    results = json.loads((tmp_path / adapter / "results.json").read_text())
    assert set(summary["scores"]) == set(results["scores"]) == set(SYNTHETIC_TASKS)
    assert summary["expert_load"] == results["expert_load"] == {}


def test_the_last_step_is_logged_and_checkpointed_and_a_resume_appends_to_the_log(run_data, tmp_path):
    out = tmp_path / "o"
    first = train.train(train_cfg(run_data, out, "--eval_dir=", "--max_iters=3", "--eval_interval=2",
                                  "--log_interval=2"))

    def logged(key):
        return [line["step"] for line in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if key in line]
    assert logged("loss") == [2, 3] and logged("val_loss") == [2, 3]  # step 3 is not a multiple, but the last
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 3
    assert_same_adapters(torch.load(out / "adapter.pt", weights_only=True), adapters_of(first["model"]))
    train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume", "--max_iters=5"]))
    assert logged("loss") == [2, 3, 4, 5] and logged("val_loss") == [2, 3, 4, 5]  # the curve of the whole run
    # a finished run can be scored again with a max_iters below its step: eval_only trains nothing (trained without
    # an eval_dir, it is given one: a re-scoring on none is refused, test_train_faults)
    assert not (out / "results.json").exists()
    train.train(train.parse_config([f"--out_dir={out}", "--init_from=resume", "--max_iters=2", "--eval_only=True",
                                    f"--eval_dir={run_data / 'test'}"]))
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 5 and logged("loss") == [2, 3, 4, 5]
    assert json.loads((out / "results.json").read_text())["scores"]  # it scored



def test_a_checkpoint_is_written_after_the_log_holds_its_steps_validation_loss(run_data, tmp_path, monkeypatch):
    """A kill -9 after a checkpoint loses no line of the log that a resume would then never write again: the val loss
    line of a step is in log.jsonl (not in a buffer) when that step's checkpoint is written."""
    out, real, seen = tmp_path / "o", checkpoint.save_checkpoint, []

    def save_checkpoint(r, raw, opt, step):
        seen.append((step, [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]))
        return real(r, raw, opt, step)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_checkpoint)
    train.train(train_cfg(run_data, out, "--eval_dir=", "--max_iters=4", "--eval_interval=2", "--log_interval=3"))
    assert [step for step, _ in seen] == [2, 4]
    for step, lines in seen:
        assert lines[-1] == {"step": step, "val_loss": lines[-1]["val_loss"]}


# -------------------------------------------------------------------------------------------------
# train_step against the objective written out (added from mutation testing: a step shifted
# schedule, an ignored balance_coef, a missing clip, a loss not scaled by the process count and
# gradient sync on the wrong micro-batch all left every other test passing)

class _RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps, at every step, the gradients and the learning rate it was handed."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []

    def step(self, closure=None):
        self.seen.append(([p.grad.clone() for p in self.param_groups[0]["params"]], self.param_groups[0]["lr"]))
        return super().step(closure)


def _reference_objective(model, b, accum, coef, reduction):
    """train_step's objective on global batch b, built from each example run alone (so no padding at all):
    summed answer-token cross-entropy over the batch's answer tokens, plus coef times the mean over the
    accum micro-batches (consecutive slices of the rows) of the balance loss, per layer
    mean_f (mean over the slice's tokens of omega_f - 1)^2, averaged or summed over layers."""
    layers = [m for m in model.modules() if isinstance(m, TeamLoRALinear)]
    ce, omegas = 0.0, []
    for row in range(len(b["tokens"])):
        real = b["valid"][row]
        assert (b["labels"][row, ~real] == -100).all()  # padding never has a label
        ce = ce + model(b["tokens"][row, real][None], b["labels"][row, real][None], reduction="sum")[1]
        omegas.append([m.last_omega[0] for m in layers])
    n_answer = int((b["labels"] != -100).sum())
    assert n_answer == b["n_answer_global"] > 0
    share, balance = len(omegas) // accum, 0.0
    for s in range(accum):
        rows = omegas[s * share:(s + 1) * share]
        per_layer = torch.stack([((torch.cat([o[i] for o in rows]).mean(0) - 1) ** 2).mean()
                                 for i in range(len(layers))])
        balance = balance + (per_layer.sum() if reduction == "sum" else per_layer.mean())
    return ce / n_answer, coef * balance / accum


def _reference_grads(model, loss):
    params = train.trainable(model)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("grad_clip", [1e6, 0.05])
def test_train_step_hands_adamw_the_clipped_gradient_of_the_loss_and_balance_terms(run_data, tmp_path, grad_clip):
    """Step 3 of a run with 2 accumulation steps: the loss it returns is the answer tokens' mean cross-entropy
    over the whole batch, the optimizer gets get_lr(3) and the gradient of cross-entropy + balance_coef x the
    balance loss (mean over micro-batches), clipped to norm grad_clip, and no gradient stays for the next step."""
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--dropout=0.0", "--grad_accum=2",
                                                   "--balance_coef=0.5", "--balance_reduction=sum",
                                                   "--warmup_iters=5", f"--grad_clip={grad_clip}")
    cfg, ds, step = r.cfg, data.TokenDataset(r.cfg["data_dir"], "train"), 3
    b = data.get_batch(ds, step, cfg["batch_size"], cfg["seed"], mode="pad", max_len=cfg["max_len"])
    ce, balance = _reference_objective(model, b, 2, 0.5, "sum")
    without_balance = _reference_grads(model, ce)
    want = [g + h for g, h in zip(without_balance, _reference_grads(model, balance))]
    norm = torch.cat([g.flatten() for g in want]).norm()
    assert norm > 2 * grad_clip or grad_clip > 1e3  # the small grad_clip does clip
    scale = min(1.0, grad_clip / (norm.item() + 1e-6))
    opt = _RecordingAdamW(train.trainable(model), lr=cfg["learning_rate"])
    loss, lr, _ = train.train_step(r, model, model, opt, ds, step)
    assert loss == pytest.approx(ce.item(), rel=1e-5)
    assert lr == train.get_lr(step, cfg) and lr < cfg["learning_rate"]  # still warming up
    (got, opt_lr), = opt.seen
    assert opt_lr == lr
    for g, w, w0 in zip(got, want, without_balance):
        top = w.abs().max()
        assert (g - w * scale).abs().max() <= 1e-4 * top * scale
    # the balance term moves the gradient far more than the tolerance (the check above sees it)
    assert max(((w - w0).abs().max() / w.abs().max()).item() for w, w0 in zip(want, without_balance)) > 0.01
    assert all(p.grad is None for p in train.trainable(model))  # nothing carried into the next step


class _SyncRecorder(nn.Module):
    """Stands for DistributedDataParallel: forwards to the model, and records the gradient-sync flag
    train_step set for each micro-batch."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.syncs = inner, []

    def forward(self, *a, **k):
        self.syncs.append(self.require_backward_grad_sync)
        return self.inner(*a, **k)


def test_two_processes_gradients_average_to_the_one_process_gradient(run_data, tmp_path, monkeypatch):
    """Each of 2 ranks with 2 accumulation steps computes its gradient (the reduction DDP would do,
    an average, done here by hand): the average is the gradient of the whole batch's objective, and
    gradients are synchronised on the last micro-batch only."""
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--dropout=0.0", "--grad_accum=2",
                                                   "--balance_coef=0.5", "--learning_rate=0.0", "--grad_clip=1e6")
    monkeypatch.setattr(evaluation, "all_reduce_sum", lambda t, world: t)  # each rank keeps its own sums
    cfg, ds = r.cfg, data.TokenDataset(r.cfg["data_dir"], "train")
    b = data.get_batch(ds, 0, cfg["batch_size"], cfg["seed"], mode="pad", max_len=cfg["max_len"])
    want = _reference_grads(model, sum(_reference_objective(model, b, 4, 0.5, cfg["balance_reduction"])))
    per_rank = []
    for rank in range(2):
        ddp, opt = _SyncRecorder(model), _RecordingAdamW(train.trainable(model), lr=0.0)
        train.train_step(train.Run(cfg, rank, 2, r.device, r.tok, r.args), ddp, model, opt, ds, 0)
        assert ddp.syncs == [False, True]
        per_rank.append(opt.seen[0][0])
    for g0, g1, w in zip(*per_rank, want):
        assert ((g0 + g1) / 2 - w).abs().max() <= 1e-4 * w.abs().max()


class _ShardSyncRecorder(_SyncRecorder):
    """Stands for an FSDP2 root: records the flag train_step passed to set_requires_gradient_sync per micro-batch."""

    def set_requires_gradient_sync(self, sync):
        self.require_backward_grad_sync = sync


def test_under_fsdp_gradients_are_reduced_on_the_last_micro_batch_only(run_data, tmp_path, monkeypatch):
    """As under DDP: FSDP2 reduce-scatters the accumulated gradients once, after the last micro-batch's backward."""
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--grad_accum=2", "--fsdp=True")
    monkeypatch.setattr(checkpoint, "sharded", lambda cfg: True)
    fsdp = _ShardSyncRecorder(model)
    train.train_step(r, fsdp, model, torch.optim.AdamW(train.trainable(model), lr=0.0),
                     data.TokenDataset(r.cfg["data_dir"], "train"), 0)
    assert fsdp.syncs == [False, True]


def test_the_loss_train_step_reports_is_the_whole_batchs_for_any_number_of_processes(run_data, tmp_path, monkeypatch):
    """The loss train_step returns (logged, checked for NaN) is the mean over the global batch's answer tokens: with 2
    processes the ranks' sums, all-reduced (added here by hand), give 1 process's loss and token count."""
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--dropout=0.0", "--learning_rate=0.0")
    ds = data.TokenDataset(r.cfg["data_dir"], "train")
    one = train.train_step(r, model, model, _RecordingAdamW(train.trainable(model), lr=0.0), ds, 0)
    monkeypatch.setattr(evaluation, "all_reduce_sum", lambda t, world: t)  # each rank keeps its own sums
    ranks = [train.train_step(train.Run(r.cfg, rank, 2, r.device, r.tok, r.args), _SyncRecorder(model), model,
                              _RecordingAdamW(train.trainable(model), lr=0.0), ds, 0) for rank in (0, 1)]
    assert ranks[0][0] + ranks[1][0] == pytest.approx(one[0], rel=1e-5)
    assert ranks[0][2] + ranks[1][2] == one[2] and 0 < ranks[0][0] < one[0]


def test_dropout_masks_are_the_slices_own_on_any_rank_or_accumulation_step(run_data, tmp_path, monkeypatch):
    """With dropout, 2 ranks (gradients averaged, as DDP does) hand the optimizer the gradient of 1 process with
    2 accumulation steps: each slice of the global batch seeds its masks from (seed, step, slice), whatever random
    state the process is in (every rank starts in the same one). Without dropout the gradient is another one."""
    monkeypatch.setattr(evaluation, "all_reduce_sum", lambda t, world: t)  # each rank keeps its own sums
    grads = {}
    for dropout in (0.3, 0.0):
        r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, f"--dropout={dropout}", "--grad_accum=2",
                                                       "--learning_rate=0.0", "--grad_clip=1e6")
        ds, runs = data.TokenDataset(r.cfg["data_dir"], "train"), []
        for rank, world, accum in ((0, 1, 2), (1, 2, 1), (0, 2, 1)):
            cfg = dict(r.cfg, grad_accum=accum)
            opt = _RecordingAdamW(train.trainable(model), lr=0.0)
            torch.manual_seed(123)  # the state a process is in: the same on every rank
            train.train_step(train.Run(cfg, rank, world, r.device, r.tok, r.args),
                             _SyncRecorder(model) if world > 1 else model, model, opt, ds, 1)
            runs.append(opt.seen[0][0])
        one, rank1, rank0 = runs
        grads[dropout] = one
        for g, g1, g0 in zip(one, rank1, rank0):
            assert ((g0 + g1) / 2 - g).abs().max() <= 1e-5 * g.abs().max(), dropout
    assert max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads[0.3], grads[0.0])) > 0.01

def test_each_slice_of_each_step_draws_dropout_masks_of_its_own():
    """slice_seed gives every (step, slice) its own seed: the slices of one global batch, on other ranks or in
    other accumulation steps, do not share a dropout mask (nor do two steps), and the run's seed changes them all."""
    seeds = {(step, part): train.slice_seed(7, step, part) for step in range(6) for part in range(8)}
    assert len(set(seeds.values())) == len(seeds)
    assert not set(seeds.values()) & {train.slice_seed(8, step, part) for step, part in seeds}
    masks = []
    for part in (0, 1):  # two slices of step 3, of the same shape
        torch.manual_seed(train.slice_seed(7, 3, part))
        masks.append(F.dropout(torch.ones(256), 0.5))
    assert not torch.equal(*masks)


def test_two_steps_of_the_same_rows_draw_dropout_masks_of_their_own(run_data, tmp_path, monkeypatch):
    """train_step seeds a slice's masks from its step as well as its slice: handed the same rows at steps 0 and 1, with
    the weights unchanged between them, dropout gives two gradients (one mask for every step would drop out the same
    features all run long); without dropout the two are one."""
    real = data.get_batch
    monkeypatch.setattr(data, "get_batch", lambda ds, step, *a, **k: real(ds, 0, *a, **k))  # batch 0's rows each step
    change = {}
    for dropout in (0.3, 0.0):
        r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, f"--dropout={dropout}", "--grad_accum=2",
                                                       "--learning_rate=0.0", "--grad_clip=1e6")
        ds, opt = data.TokenDataset(r.cfg["data_dir"], "train"), _RecordingAdamW(train.trainable(model), lr=0.0)
        for step in (0, 1):
            train.train_step(r, model, model, opt, ds, step)
        (first, _), (second, _) = opt.seen
        change[dropout] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(first, second))
    assert change[0.0] <= 1e-6 and change[0.3] > 0.01


def test_full_training_keeps_float32_weights_under_dtype_bfloat16_and_adapters_are_float32(run_data, tmp_path):
    """dtype=bfloat16 is the base's dtype under adapters; full training (adapter=none) runs in bfloat16 autocast over
    float32 weights instead, since AdamW's small updates would round away in bfloat16 weights."""
    def dtypes(*flags):
        cfg = train_cfg(run_data, tmp_path / "o", f"--init_from={run_data / 'base.pt'}", "--dtype=bfloat16", *flags)
        model, _, _ = train.build_model(cfg, torch.device("cpu"), data.Tokenizer(cfg["tokenizer"]).vocab_size, 1)
        found = {}
        for n, p in model.named_parameters():
            found.setdefault(teamlora.is_adapter(n), set()).add(p.dtype)
        return found
    assert dtypes("--adapter=none") == {False: {torch.float32}}
    assert dtypes("--adapter=teamlora") == {False: {torch.bfloat16}, True: {torch.float32}}


class _AutocastSpy(nn.Module):
    """The loss interface train_step uses; records whether bfloat16 autocast was on when it ran."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.autocast = []

    def forward(self, tokens, targets, seq_ids=None, reduction="mean", loss_only=False):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return None, self.w * (targets != -100).sum()


@pytest.mark.parametrize("adapter, dtype, autocast", [("none", "bfloat16", True), ("teamlora", "bfloat16", False),
                                                      ("lora", "bfloat16", False), ("none", "float32", False)])
def test_only_full_bfloat16_training_runs_under_autocast_adapters_compute_in_float32(run_data, tmp_path, adapter,
                                                                                    dtype, autocast):
    """dtype=bfloat16 under adapters is the base's stored dtype and the adapters train in float32 (autocast would
    round their matmuls to bfloat16); full training keeps float32 weights and runs its matmuls in bfloat16 autocast."""
    cfg = train_cfg(run_data, tmp_path / "o", f"--adapter={adapter}", f"--dtype={dtype}", "--balance_coef=0")
    tok = data.Tokenizer(cfg["tokenizer"])
    spy = _AutocastSpy()
    train.train_step(train.Run(cfg, tok=tok), spy, spy, torch.optim.SGD(spy.parameters(), lr=0.0),
                     data.TokenDataset(cfg["data_dir"], "train"), 0)
    assert spy.autocast == [autocast]


def test_each_rank_resumes_its_own_rng_state(tmp_path, monkeypatch):
    """save_checkpoint keeps every rank's generator state (gathered) and restore gives rank i its own:
    with dropout, rank 1 resuming on rank 0's state would drop other units than the run it continues. A resume on
    more processes than the run had gives the new ranks rank 0's (not the last rank's, nor a failure)."""
    import types

    import checkpoint
    a = _tiny_adapter_model(seed=1)
    cfg = {"adapter": "teamlora", "out_dir": str(tmp_path), "fsdp": False, "eval_only": False, "max_iters": 10,
           "dropout": 0.0}
    dev = torch.device("cpu")
    states = []
    for seed in (10, 11):  # what rank 0 and rank 1 hold when the checkpoint is written
        torch.manual_seed(seed)
        states.append(checkpoint.rng_state(dev))

    def all_gather_object(out, mine):
        out[:] = states
    monkeypatch.setattr(checkpoint.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(checkpoint.dist, "barrier", lambda: None)
    opt = torch.optim.AdamW(train.trainable(a), lr=1e-2)
    r = types.SimpleNamespace(cfg=cfg, world=2, device=dev, master=True, args=a.args, base=None, data=None, tok=None,
                              clock=None)
    checkpoint.save_checkpoint(r, a, opt, 7)
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))
    for rank, world, seed in ((1, 2, 11), (0, 2, 10), (2, 3, 10)):
        torch.manual_seed(seed)
        want = torch.rand(4)
        torch.manual_seed(99)
        run = train.Run(cfg, rank, world, dev)
        assert checkpoint.restore(run, a, torch.optim.AdamW(train.trainable(a), lr=1e-2), ckpt) == 7
        assert torch.equal(torch.rand(4), want), rank


@pytest.mark.parametrize("damage", [{"rng": None}, {"rng": []}, {"rng": [{"torch": 5}]}, {"rng": [{}]},
                                    {"optimizer": None}, {"optimizer": {"state": {}}}])
def test_a_checkpoints_optimizer_or_random_state_that_does_not_load_is_one_sentence(damage):
    """Whatever a hand edit or another program left in ckpt.pt's optimizer or random state (not a list, an empty
    one, a value of another type, a key missing), its resume says the file is damaged, not a traceback."""
    import types
    a = _tiny_adapter_model(seed=1)
    opt = torch.optim.AdamW(train.trainable(a), lr=1e-2)
    dev = torch.device("cpu")
    ckpt = {"optimizer": opt.state_dict(), "rng": [checkpoint.rng_state(dev)]}
    r = types.SimpleNamespace(cfg={"fsdp": False}, rank=0, device=dev)
    checkpoint.set_training_state(a, opt, ckpt, r, "out/ckpt.pt")  # undamaged: it loads
    with pytest.raises(UserError, match=r"^out/ckpt\.pt is damaged: its optimizer or random state does not load \("):
        checkpoint.set_training_state(a, opt, ckpt | damage, r, "out/ckpt.pt")


def test_the_optimizer_gets_the_configured_betas_weight_decay_and_the_schedules_lr(run_data, tmp_path):
    cfg = train_cfg(run_data, tmp_path / "o", "--eval_dir=", "--eval_iters=0", "--max_iters=1", "--eval_interval=1",
                    "--beta1=0.8", "--beta2=0.95", "--weight_decay=0.1", "--warmup_iters=4")
    train.train(cfg)
    group, = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert tuple(group["betas"]) == (0.8, 0.95) and group["weight_decay"] == 0.1
    assert group["lr"] == train.get_lr(0, cfg) == cfg["learning_rate"] / 4  # step 0's, the only step


def test_the_expert_load_of_several_processes_is_the_load_each_computes(run_data, tmp_path, monkeypatch):
    """Every rank computes the load on the same prompts; the all-reduce sums world copies of it, and the
    reported load is that load again (shares summing to 1), as with one process."""
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--eval_limit=2")
    r.eval_sets = evaluation.load_eval_sets(r.cfg)
    monkeypatch.setattr(evaluation, "generate_all", lambda model, prompts, max_new, r: [""] * len(prompts))
    _, one = evaluation.evaluate(model, r)
    monkeypatch.setattr(evaluation, "all_reduce_sum", lambda t, world: t * world)  # world ranks, the same load each
    _, two = evaluation.evaluate(model, train.Run(r.cfg, 0, 2, r.device, r.tok, r.args, r.eval_sets))
    assert one.keys() == two.keys() == set(SYNTHETIC_TASKS)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-6, atol=1e-7)
        assert two[name].sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("targets", ["w1,output", "output"])
def test_an_adapted_output_layer_leaves_the_expert_load_to_the_last_blocks(run_data, tmp_path, monkeypatch, targets):
    """The expert load is the last blocks' layers' (the paper's Figure 5). An adapted output layer ran on one position
    per prompt there (no logits for the rest), so it is left out, not weighed over the prompt tokens (which failed on
    the mask's shape); with the output layer the only one adapted, the run reports no load, as one without a router."""
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, f"--targets={targets}", "--eval_limit=3",
                                                   "--load_layers=2")
    r.eval_sets = evaluation.load_eval_sets(r.cfg)
    monkeypatch.setattr(evaluation, "generate_all", lambda model, prompts, max_new, r: [""] * len(prompts))
    scores, loads = evaluation.evaluate(model, r)
    assert isinstance(model.output, TeamLoRALinear) and scores.keys() == set(SYNTHETIC_TASKS)
    if targets == "output":
        assert loads == {}
    else:
        assert loads.keys() == scores.keys()
        for name, (task, records) in r.eval_sets.items():
            prompts = [evaluation.prompt_ids(r.tok, rec, r.args.context - task.max_new_tokens) for rec in records]
            want = conftest.reference_task_load(model, prompts[:r.cfg["eval_batch_size"]], r.args.n_layers, 2,
                                                r.cfg["experts"])
            torch.testing.assert_close(loads[name], want, rtol=1e-5, atol=1e-6)
    evaluation.print_results(scores, dict.fromkeys(scores, 0.0), loads, r.cfg)


class _EchoModel:
    """A stand-in with Transformer.generate's contract (only the new tokens, each cut before the first
    eos_id when one is given) whose answer to a prompt is the prompt without its BOS, then EOS, then more:
    what a rank that generates max_new_tokens without stopping gets."""
    def __init__(self, eos_id):
        self.eos_id, self.calls = eos_id, []

    def __call__(self, *args, **kwargs):  # FSDP's first forward, and its unshard and reshard: nothing to do here
        pass

    unshard = reshard = __call__

    def generate(self, prompts, max_new_tokens, eos_id=None):
        self.calls.append((len(prompts), max_new_tokens, eos_id))
        out = [(p[1:] + [self.eos_id] + p[1:3])[:max_new_tokens] for p in prompts]
        return [g[:g.index(eos_id)] if eos_id in g else g for g in out]


class _Gathered(Exception):
    pass


@pytest.mark.parametrize("fsdp", [False, True])
def test_generate_all_answers_every_prompt_in_its_order_in_batches_and_over_ranks(run_data, tmp_path, monkeypatch,
                                                                                  fsdp):
    cfg = train_cfg(run_data, tmp_path / "o", "--eval_batch_size=2")
    tok = data.Tokenizer(cfg["tokenizer"])
    g = torch.Generator().manual_seed(0)
    lengths = (5, 3, 14, 11, 9)  # out of length order: generate_all batches them by length
    prompts = [[tok.bos_id] + torch.randint(3, tok.vocab_size, (n,), generator=g).tolist() for n in lengths]
    want = [tok.decode(p[1:]) for p in prompts]
    assert len(set(want)) == len(want)
    monkeypatch.setattr(evaluation.checkpoint, "sharded", lambda cfg: fsdp)  # one process: nothing to pair with
    one = _EchoModel(tok.eos_id)
    assert evaluation.generate_all(one, prompts, 20, train.Run(cfg, 0, 1, torch.device("cpu"), tok)) == want
    assert sum(n for n, _, _ in one.calls) == 5 and all(n <= 2 for n, _, _ in one.calls)
    assert {c[1:] for c in one.calls} == {(20, tok.eos_id)}
    # two ranks: each generates its share in the same number of batches, under FSDP to the full length (no early
    # stop: its collectives need every rank in every forward), and the gathered answers are one rank's
    shares, models = {}, {}

    def share(parts, obj):
        shares[rank] = obj
        raise _Gathered
    monkeypatch.setattr(train.dist, "all_gather_object", share)
    for rank in (0, 1):
        models[rank] = _EchoModel(tok.eos_id)
        with pytest.raises(_Gathered):
            evaluation.generate_all(models[rank], prompts, 20, train.Run(cfg, rank, 2, torch.device("cpu"), tok))
    assert set(shares[0]) | set(shares[1]) == set(range(5)) and not set(shares[0]) & set(shares[1])
    sizes = [[n for n, _, _ in models[rank].calls] for rank in (0, 1)]  # 3 prompts and 2: the second rank pads
    stop_at = None if fsdp else tok.eos_id
    assert sizes[0] == sizes[1] == [2, 1] and {c[2] for m in models.values() for c in m.calls} == {stop_at}
    monkeypatch.setattr(train.dist, "all_gather_object", lambda parts, obj: parts.__setitem__(slice(None),
                                                                                             [shares[0], shares[1]]))
    for rank in (0, 1):
        assert evaluation.generate_all(_EchoModel(tok.eos_id), prompts, 20,
                                       train.Run(cfg, rank, 2, torch.device("cpu"), tok)) == want


def test_an_answer_ends_before_the_eos_token_which_some_tokenizers_decode_to_text():
    """A Hugging Face or tiktoken tokenizer decodes its EOS id to text ("</s>", "<|end_of_text|>"), SentencePiece to
    nothing: an answer is what the model wrote before its EOS, nothing of it or after it (under FSDP on several ranks
    generation runs on to the full length), and all it wrote where it wrote none."""
    import types
    tok = types.SimpleNamespace(eos_id=2, decode=lambda ids: " ".join(f"t{i}" for i in ids))
    model = types.SimpleNamespace(generate=lambda prompts, max_new, eos_id: [[5, 6, 2, 7], [8, 9]][:len(prompts)])
    r = types.SimpleNamespace(tok=tok, cfg={"eval_batch_size": 4, "fsdp": False}, rank=0, world=1,
                              device=torch.device("cpu"))
    assert evaluation.generate_all(model, [[1, 3], [1, 4]], 4, r) == ["t5 t6", "t8 t9"]


def test_generate_all_runs_a_forward_on_every_rank_even_with_fewer_prompts_than_ranks(run_data, tmp_path,
                                                                                    monkeypatch):
    """A task of 1 record under 2 processes: the rank without a prompt of its own must still run every forward
    (under FSDP its blocks' all-gathers pair with the other rank's; without it the other rank waits for ever)."""
    cfg = train_cfg(run_data, tmp_path / "o", "--eval_batch_size=2")
    tok = data.Tokenizer(cfg["tokenizer"])
    prompts, models = [[tok.bos_id, 5, 6, 7]], {}
    monkeypatch.setattr(train.dist, "all_gather_object", lambda parts, obj: parts.__setitem__(slice(None), [obj] * 2))
    for rank in (0, 1):
        models[rank] = _EchoModel(tok.eos_id)
        answers = evaluation.generate_all(models[rank], prompts, 20, train.Run(cfg, rank, 2, torch.device("cpu"), tok))
        assert answers == [tok.decode([5, 6, 7])]
    assert [n for n, _, _ in models[0].calls] == [n for n, _, _ in models[1].calls] == [1]


def test_generate_all_under_fsdp_shards_the_model_again_after_generating_or_failing(run_data, tmp_path, monkeypatch):
    """Under FSDP generate_all gathers the root's parameters (unshard) for generate: it shards them again (reshard)
    once done, and where generation fails too, so that the full parameters do not stay gathered on every rank."""
    cfg = train_cfg(run_data, tmp_path / "o", "--eval_batch_size=2")
    tok = data.Tokenizer(cfg["tokenizer"])
    monkeypatch.setattr(evaluation.checkpoint, "sharded", lambda cfg: True)

    class Sharded(_EchoModel):
        def __init__(self, eos_id, fail):
            super().__init__(eos_id)
            self.gathered, self.fail = [], fail

        def unshard(self):
            self.gathered.append(True)

        def reshard(self):
            self.gathered.append(False)

        def generate(self, prompts, max_new_tokens, eos_id=None):
            if self.fail:
                raise RuntimeError("generation failed")
            return super().generate(prompts, max_new_tokens, eos_id)
    prompts = [[tok.bos_id, 5, 6], [tok.bos_id, 7, 8, 9]]
    model = Sharded(tok.eos_id, False)
    assert evaluation.generate_all(model, prompts, 4, train.Run(cfg, 0, 1, torch.device("cpu"), tok)) == \
        [tok.decode(p[1:]) for p in prompts]
    assert model.gathered == [True, False]
    model = Sharded(tok.eos_id, True)
    with pytest.raises(RuntimeError, match="generation failed"):
        evaluation.generate_all(model, prompts, 4, train.Run(cfg, 0, 1, torch.device("cpu"), tok))
    assert model.gathered == [True, False]


def test_generate_all_batches_prompts_of_similar_length_together(run_data, tmp_path):
    """A batch is left-padded to its longest prompt: generate_all sorts the prompts by length before batching, so
    each batch holds neighbours in length and pads little (a long prompt beside a short one pads the short). A
    DDP-wrapped model generates with the model it wraps."""
    cfg = train_cfg(run_data, tmp_path / "o", "--eval_batch_size=2")
    tok = data.Tokenizer(cfg["tokenizer"])
    prompts = [[tok.bos_id] + [5 + i] * n for i, n in enumerate((9, 2, 14, 3, 8, 1))]
    seen = []

    class Recorder(_EchoModel):
        def generate(self, prompts, max_new_tokens, eos_id=None):
            seen.append([len(p) for p in prompts])
            return super().generate(prompts, max_new_tokens, eos_id)
    answers = evaluation.generate_all(Recorder(tok.eos_id), prompts, 4, train.Run(cfg, 0, 1, torch.device("cpu"), tok))
    assert answers == [tok.decode(p[1:5]) for p in prompts]  # 4 new tokens, echoed; in the prompts' own order
    assert [n for batch in seen for n in batch] == sorted(len(p) for p in prompts) and len(seen) == 3
    wrapped = nn.Module()  # DDP's wrapper (torchrun, adapters): no generate of its own, the model in .module
    wrapped.module = Recorder(tok.eos_id)
    assert evaluation.generate_all(wrapped, prompts, 4, train.Run(cfg, 0, 1, torch.device("cpu"), tok)) == answers


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="torch.compiler.set_stance needs torch 2.6")
def test_generation_runs_compiled_blocks_eagerly_with_the_same_answers_and_compiles_nothing(run_data, tmp_path):
    """With --compile=True, decoding would recompile every block at each step (the KV cache's length) until
    Dynamo's recompile limit: generate_all runs the compiled blocks eagerly."""
    from torch._dynamo.utils import counters
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--eval_batch_size=2")
    g = torch.Generator().manual_seed(0)
    prompts = [[r.tok.bos_id] + torch.randint(3, r.tok.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 7)]
    want = evaluation.generate_all(model, prompts, 6, r)
    for block in model.layers:
        block.compile(dynamic=True)  # as train.py does
    torch._dynamo.reset()
    counters.clear()
    assert evaluation.generate_all(model, prompts, 6, r) == want
    assert not counters["stats"]["unique_graphs"] and not counters["stats"]["calls_captured"]
    torch._dynamo.reset()


def test_evaluate_answers_each_tasks_own_prompts_with_its_own_answer_length_and_scores_them(run_data, tmp_path,
                                                                                           monkeypatch):
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--eval_limit=3")
    r.eval_sets = evaluation.load_eval_sets(r.cfg)
    long = {"instruction": "Summarize: " + " ".join(f"word{i}" for i in range(400)), "input": "tail",
            "output": "a summary"}
    task, records = r.eval_sets["summary"]
    r.eval_sets["summary"] = (task, records + [long])
    gold, calls = {}, []
    for name, (task, records) in r.eval_sets.items():
        room = r.args.max_seq_len - task.max_new_tokens
        for rec in records:
            ids = data.encode_prompt(r.tok, rec)  # a prompt too long keeps its BOS and its last room - 1 ids
            gold[tuple(ids if len(ids) <= room else ids[:1] + ids[-(room - 1):])] = rec["output"]

    def answer_with_the_gold_output(model, prompts, max_new, r):
        calls.append((prompts, max_new))
        return [gold[tuple(p)] for p in prompts]
    monkeypatch.setattr(evaluation, "generate_all", answer_with_the_gold_output)
    scores, _ = evaluation.evaluate(model, r)
    assert scores == {name: 100.0 for name in SYNTHETIC_TASKS}
    assert len({task.max_new_tokens for task, _ in r.eval_sets.values()}) > 1
    for (prompts, max_new), (task, records) in zip(calls, r.eval_sets.values(), strict=True):
        assert max_new == task.max_new_tokens and len(prompts) == len(records)
        assert all(len(p) + max_new <= r.args.max_seq_len for p in prompts)
    monkeypatch.setattr(evaluation, "generate_all", lambda model, prompts, max_new, r: ["?"] * len(prompts))
    assert all(s == 0.0 for s in evaluation.evaluate(model, r)[0].values())  # the scores are the answers'


def test_a_float_setting_takes_an_integer_up_to_the_largest_float_and_refuses_one_past_it_in_one_sentence():
    """Integers float() cannot hold (2**1024 - 1 rounds up past the largest float) have 1024 bits: refused in one
    sentence, not an OverflowError; one bit fewer becomes a float (then out of the rate's range)."""
    import configurator
    with pytest.raises(UserError, match=r"config key 'learning_rate' in flag --learning_rate=\d+ is too large for a "
                                        r"float or any setting \(1024 bits\)"):
        train.parse_config([f"--learning_rate={2 ** 1024 - 1}"])
    value = configurator.typed("learning_rate", 2 ** 1023 - 1, train.DEFAULTS, "a test")
    assert type(value) is float and value == float(2 ** 1023 - 1)


def test_a_config_file_that_is_a_named_pipe_is_named_as_one_not_as_missing(tmp_path):
    """bash's <(echo r=16) exists, so "does not exist" sent the user looking for a file that is there."""
    with conftest.named_pipe(tmp_path / "config.py", b"r = 16\n"):
        with pytest.raises(UserError, match=f"config file '{tmp_path / 'config.py'}' is a named pipe or a device, not "
                                            "a file"):
            train.parse_config([str(tmp_path / "config.py")])


def test_an_argument_without_its_two_dashes_is_not_read_as_a_flag():
    """study.py reads every argument as a flag: 'steps=5' (or '-steps=5') is named, never read as a key 'eps'."""
    import configurator
    import study
    for arg in ("steps=5", "-steps=5", "xx--steps=5"):
        with pytest.raises(UserError, match=f"argument '{arg}' is not of the form --key=value"):
            configurator.parse_flag(arg)
        with pytest.raises(UserError, match="is not of the form --key=value"):
            study.parse([arg])


def test_a_run_validates_at_each_eval_interval_and_its_last_step_and_scores_with_that_loss_not_another_pass(
        run_data, tmp_path, monkeypatch):
    """Validation runs once per checkpoint (steps that are multiples of eval_interval, and the last): finish scores
    the run with the validation loss of its last step instead of running the validation batches again."""
    real, calls = evaluation.val_loss, []
    monkeypatch.setattr(evaluation, "val_loss", lambda *a: calls.append(a) or real(*a))
    summary = train.train(train_cfg(run_data, tmp_path / "o", "--max_iters=5", "--eval_interval=2", "--eval_limit=1"))
    logged = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    validated = [line["step"] for line in logged if "val_loss" in line]
    assert validated == [2, 4, 5] and len(calls) == len(validated) and "scores" in summary
    assert summary["val_loss"] == logged[-1]["val_loss"]


def test_a_config_file_named_with_a_leading_dash_is_read_and_its_wrong_type_is_refused_under_a_flag(tmp_path,
                                                                                                   monkeypatch):
    """A file whose name starts with '-' is not a mistyped flag when it exists; a value of the wrong type in a file
    is refused even where a flag overrides it."""
    import configurator
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-small.py").write_text("r = 4\n")
    assert configurator.read(["-small.py"], train.DEFAULTS)[0]["r"] == 4
    (tmp_path / "typo.py").write_text("r = '8'\n")
    with pytest.raises(UserError, match=r"config key 'r' in config file typo.py must be of type int, got '8'"):
        configurator.read(["typo.py", "--r=8"], train.DEFAULTS)


def test_an_unknown_key_like_no_known_one_suggests_none():
    with pytest.raises(UserError, match=r"^unknown config key 'zzzzzz' in flag --zzzzzz=1\.$"):
        train.parse_config(["--zzzzzz=1"])


def test_a_path_flag_that_starts_with_a_tilde_is_the_home_folder_as_the_shell_gives_it(tmp_path, monkeypatch):
    """The shell expands ~ in `--key ~/x` but not in --key=~/x, the one form train.py and study.py take: the run made
    a folder named ~ in the current one, which `rm -rf ~` would then not clean up but wipe the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = train.parse_config(["--out_dir=~/runs/a~b", "--eval_dir=~", "--tokenizer=a~b"])
    assert (cfg["out_dir"], cfg["eval_dir"], cfg["tokenizer"]) == (str(tmp_path / "runs" / "a~b"), str(tmp_path),
                                                                    "a~b")


def test_re_scoring_an_adapter_pt_alone_leaves_a_batch_that_does_not_split_to_check_batch_split():
    """Without a ckpt.pt nothing says how many processes the run trained on: keep_slices does not claim a count."""
    cfg = {"grad_accum": 2, "batch_size": 3, "eval_only": True}
    assert machine.keep_slices(cfg, None, 1, True) == cfg


def test_the_bound_on_streamed_examples_counts_the_longer_of_training_and_validation_and_the_last_window():
    """A batch_size is refused exactly where (max(max_iters, eval_iters) + GROUP_BATCHES) x batch_size reaches 2**60
    (the last case: reaches it exactly)."""
    for max_iters, eval_iters in ((1, 1), (2**40, 1), (1, 2**40), (2**20 - data.GROUP_BATCHES, 1)):  # the last: 2**60
        edge = -(-2**60 // (max(max_iters, eval_iters) + data.GROUP_BATCHES))  # the least batch_size refused
        argv = [f"--max_iters={max_iters}", f"--eval_iters={eval_iters}"]
        train.parse_config([*argv, f"--batch_size={edge - 1}"])
        with pytest.raises(UserError, match=rf"^batch_size={edge} streams more examples than numpy indexes"):
            train.parse_config([*argv, f"--batch_size={edge}"])


def test_full_training_takes_no_targets_and_any_adapter_needs_them():
    """adapter=none trains every weight and adapts no layer: an empty --targets is no error there, as it is for an
    adapter, which would adapt nothing."""
    assert train.parse_config(["--adapter=none", "--targets= ,"])["targets"] == " ,"
    for adapter in ("lora", "teamlora", "moelora", "hydralora"):
        with pytest.raises(UserError, match="^config key 'targets' is empty; name the linear layers to adapt"):
            train.parse_config([f"--adapter={adapter}", "--targets= ,"])


def test_re_scoring_without_an_adapter_scores_the_base_and_asks_for_no_adapter_pt(tmp_path):
    """adapter=none with eval_only and no ckpt.pt scores init_from's model as it is: there is no adapter.pt to want."""
    cfg = train.parse_config([f"--out_dir={tmp_path / 'base'}", "--adapter=none", "--eval_only=True"])
    assert train.resume_config(cfg) == (cfg, None)


@pytest.mark.parametrize("kept", [("ckpt.pt",), ("adapter.pt",), ("adapter.pt", "results.json")])
@pytest.mark.usefixtures("at_a_fresh_root")  # the demo's data_dir, compared with out_dir: not the user's
def test_a_run_in_out_dir_is_offered_a_resume_only_where_it_has_a_ckpt_pt(tmp_path, kept):
    """A run stopped before adapter.pt holds ckpt.pt alone and can go on; one kept as its adapter.pt cannot."""
    for f in kept:
        (tmp_path / f).write_bytes(b"")
    r = train.Run(train.parse_config([f"--out_dir={tmp_path}"]))
    with pytest.raises(UserError, match="already holds a run") as e:
        train.claim_out_dir(r, resuming=False)
    assert ("--init_from=resume" in str(e.value)) == ("ckpt.pt" in kept)


def test_ctrl_c_while_a_config_file_runs_stops_the_script_and_is_not_called_a_broken_config(tmp_path):
    """A config file may compute for a while (or wait on input()): a Ctrl-C then stops the script as it stops a run,
    not as a config file that "failed to run"."""
    import configurator
    slow = tmp_path / "slow.py"
    slow.write_text("r = 8\nraise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        configurator.read([str(slow)], train.DEFAULTS)


def test_out_of_memory_tells_a_new_run_to_lower_its_batch_and_a_resume_or_re_scoring_only_what_it_can_change():
    """A resume and a re-scoring keep the run's batch_size and grad_accum (keep_slices): their sentence offers
    activation checkpointing and FSDP alone, where a new run's offers a smaller batch first."""
    new, resume, rescore = ({"init_from": "base.pt", "eval_only": False}, {"init_from": "resume", "eval_only": False},
                            {"init_from": "base.pt", "eval_only": True})
    assert "lower batch_size" in machine.out_of_memory_fix(new)
    for cfg in (resume, rescore):
        fix = machine.out_of_memory_fix(cfg)
        assert "batch_size" not in fix and "activation_checkpointing=True" in fix and "fsdp=True" in fix


def test_every_file_a_run_writes_but_the_ones_the_readme_excepts_is_written_under_a_temporary_name(run_data, tmp_path,
                                                                                                  monkeypatch):
    """The README: "Nothing is lost: each file but the appended `log.jsonl` is written under a temporary name and
    renamed". Every file a run leaves in out_dir (but `.lock`, which holds nothing) went through files.write_atomic,
    except the ones named there. It said "each file", and the log is appended line by line."""
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    excepted = set(re.search(r"Nothing is lost: each file but the appended `([^`]+)` is written under a temporary "
                             r"name and renamed", readme).groups())
    atomic, write = [], files.write_atomic
    monkeypatch.setattr(files, "write_atomic", lambda path, *a, **kw: (atomic.append(os.path.basename(path)),
                                                                        write(path, *a, **kw))[1])
    train.train(train_cfg(run_data, tmp_path / "run", "--max_iters=2", "--eval_interval=1"))
    left = {f for f in os.listdir(tmp_path / "run") if not f.startswith(".")}
    assert {"ckpt.pt", "adapter.pt", "results.json"} <= set(atomic) and left - set(atomic) == excepted, (left, atomic)


def test_config_files_run_in_the_order_given_a_later_files_value_winning_and_flags_winning_over_all(tmp_path):
    first, second = tmp_path / "first.py", tmp_path / "second.py"
    first.write_text("r = 4\nexperts = 2\n")
    second.write_text("r = 16\n")
    for order, want in (([first, second], 16), ([second, first], 4)):  # each order: its last file's value
        cfg, explicit = train.configurator.read([str(f) for f in order], train.DEFAULTS)
        assert (cfg["r"], cfg["experts"], explicit) == (want, 2, {"r", "experts"})
    assert train.configurator.read(["--r=8", str(first), str(second)], train.DEFAULTS)[0]["r"] == 8  # wherever


@pytest.mark.usefixtures("at_a_fresh_root")
def test_dry_runs_fsdp_estimate_is_of_the_shards_of_its_world_size_fewer_gpus_holding_more_each(monkeypatch, capsys):
    """The estimate is computed for the processes the line names: FSDP's shards of the weights and of the adapter's
    float32 state are a 1/world each, so each of 4 GPUs holds more than each of 8 (it was estimated for 1 process)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    terms = {}
    for world in (4, 8):
        train.train(train.parse_config(["config/cme_llama2_7b.py", "--dry_run=True", f"--dry_run_world_size={world}"]))
        out = capsys.readouterr().out
        assert f"per GPU with {world} GPUs" in out
        terms[world] = [float(x) for x in re.search(r"\(weights ([\d.]+), adapter \+ AdamW ([\d.]+),", out).groups()]
    assert terms[4][0] > terms[8][0] and terms[4][1] >= terms[8][1], terms


def test_a_non_finite_gradient_norm_stops_train_step_before_adamw_steps_leaving_the_weights_as_they_were(
        run_data, tmp_path, monkeypatch):
    """A diverged gradient is caught before opt.step: stepped first, the weights a stop or a caller still holds are
    already NaN (the check after the step raised the same sentence)."""
    r, model = _run_with_a_trained_looking_adapter(run_data, tmp_path, "--dropout=0.0")
    before = [p.detach().clone() for p in train.trainable(model)]
    opt = _RecordingAdamW(train.trainable(model), lr=r.cfg["learning_rate"])
    monkeypatch.setattr(train.torch.nn.utils, "clip_grad_norm_", lambda *a: torch.tensor(float("inf")))
    with pytest.raises(train.UserError, match=r"^the gradient norm became inf at step 0;"):
        train.train_step(r, model, model, opt, data.TokenDataset(r.cfg["data_dir"], "train"), 0)
    assert opt.seen == [] and all(torch.equal(p, q) for p, q in zip(train.trainable(model), before))


def test_cuda_matmul_precision_gives_the_setting_back_when_its_block_fails():
    """A run that fails (a UserError, out of memory, a Ctrl-C) inside the setting leaves it as it found it: a notebook
    or the tests that go on in the same process run their float32 matmuls as before."""
    before = cuda_fp32_matmuls()
    for tf32 in (True, False):
        with pytest.raises(KeyboardInterrupt), machine.cuda_matmul_precision(tf32):
            assert cuda_fp32_matmuls() == ("tf32" if tf32 else "ieee")
            raise KeyboardInterrupt
        assert cuda_fp32_matmuls() == before
