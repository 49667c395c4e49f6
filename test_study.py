"""study.py: the protocol (selection on validation, paired differences) and the pipeline end to end on the
small suite.

    python -m pytest -q
"""
import json
import math

import numpy as np
import pytest

import study
import train


def small_study_flags(run_data, out, *more):
    return [f"--data_dir={run_data / 'tokens'}", f"--eval_dir={run_data / 'test'}", f"--val_dir={run_data / 'val'}",
            f"--tokenizer={run_data / 'tokenizer.model'}", f"--init_from={run_data / 'base.pt'}",
            "--max_len=128", "--batch_size=8", "--eval_limit=4", "--r=8", "--eval_batch_size=32", f"--out={out}",
            "--seeds=2", "--steps=3", *more]


def test_study_runs_end_to_end_and_its_tables_are_the_runs_means(run_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(study, "GRID", (1e-3, 4e-3))
    out = tmp_path / "study"
    flags = small_study_flags(run_data, out, "--runs=lora32,hydralora,teamlora")
    results = study.main(flags)
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
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
    assert "resumed from" in (stopped / "stdout.txt").read_text()
    assert json.loads((stopped / "results.json").read_text())["scores"] == first["scores"]


def fake_run(folder, lr, scores, seed=0):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"scores": scores, "config": {"learning_rate": lr, "seed": seed}}))
    (folder / "log.jsonl").write_text("")


def test_selection_reads_the_validation_runs_and_never_the_test_runs(tmp_path):
    opts, extra, names = study.parse([f"--out={tmp_path}", "--runs=teamlora,teamlora_k8", "--report"])
    # validation prefers 6.3e-4 (a tie with 1.6e-3 goes to the smaller rate); the test runs would prefer 4e-3
    for lr, score in zip(study.GRID, (40.0, 70.0, 70.0, 50.0)):
        fake_run(tmp_path / "select" / f"teamlora-lr{lr:g}", lr, {"a": score, "b": score})
    for seed in (1, 2):
        fake_run(tmp_path / f"teamlora-lr4e-03-seed{seed}", 4e-3, {"a": 99.0, "b": 99.0}, seed)
    chosen = study.selection(opts, extra, names)
    assert chosen == {"teamlora": (6.3e-4, {2.5e-4: 40.0, 6.3e-4: 70.0, 1.6e-3: 70.0, 4e-3: 50.0})}
    assert study.load(opts, names, chosen) == {}  # the 4e-3 test runs are not the chosen rate's
    # a selection run is told to score the validation sets, whatever eval_dir the user gave
    flags = study.run_flags("teamlora", 0, 6.3e-4, opts, ["--eval_dir=TEST"], eval_dir="VAL")
    assert train.parse_config(flags)["eval_dir"] == "VAL" and train.parse_config(flags)["seed"] == 0
    assert study.choose_lr({1e-3: None, 2e-3: {"scores": {"a": 1.0}}}) == 2e-3  # a diverged run scores nothing
    with pytest.raises(study.data.UserError, match="every selection run diverged"):
        study.choose_lr({1e-3: None})


def test_paired_difference_has_a_students_t_interval():
    m, h = study.paired_difference([3.0, 4.0, 5.0], [2.0, 2.0, 2.0])  # differences 1, 2, 3: mean 2, sd 1
    assert m == pytest.approx(2.0) and h == pytest.approx(4.303 * 1 / math.sqrt(3))


def test_seeds_are_a_count_or_a_list_and_the_selection_seed_is_not_one_of_them():
    assert study.parse(["--seeds=3"])[0]["seeds"] == (1, 2, 3)
    assert study.parse(["--seeds=11,12,13"])[0]["seeds"] == (11, 12, 13)
    quick = study.parse(["--quick"])[0]
    assert quick["steps"] < study.OPTIONS["steps"] and quick["out"].endswith("_quick")
    for bad in ("--seeds=three", "--seeds=0", "--seeds=0,1"):
        with pytest.raises(study.data.UserError):
            study.parse([bad])


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


def test_report_without_a_study_says_so_in_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--report", f"--out={tmp_path}/none"])
    err = capsys.readouterr().err
    assert f"--report found no study in {tmp_path}/none/" in err and "diverged" not in err
