"""study.py: the mini-CME study's pipeline, end to end on the small suite.

    python -m pytest -q
"""
import json

import numpy as np
import pytest

import study


def test_study_runs_end_to_end_and_its_tables_are_the_runs_means(run_data, tmp_path, capsys):
    out = tmp_path / "study"
    flags = [f"--data_dir={run_data / 'tokens'}", f"--eval_dir={run_data / 'test'}",
             f"--tokenizer={run_data / 'tokenizer.model'}", f"--init_from={run_data / 'base.pt'}",
             "--max_len=128", "--batch_size=8", "--eval_limit=4", "--r=8",
             "--eval_batch_size=32", f"--out={out}", "--seeds=2", "--steps=3", "--runs=lora32,hydralora,teamlora"]
    results = study.main(flags)
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert report.strip() in printed
    for name in ("lora32", "hydralora", "teamlora"):
        assert len(results[name]) == 2 and all(len(r["curve"]) > 0 for r in results[name])
    # a cell of the report is the mean and standard deviation of the runs' own results.json
    scores = [json.loads((out / f"teamlora-seed{s}" / "results.json").read_text())["scores"] for s in (1, 2)]
    task = sorted(scores[0])[0]
    m, sd = np.mean([s[task] for s in scores]), np.std([s[task] for s in scores], ddof=1)
    row = next(line for line in report.splitlines() if line.startswith("| TeamLoRA 4x8 |"))
    assert row.split(" | ")[2] == f"{m:.1f}±{sd:.1f}"
    assert "| MoELoRA 4x8 | (not run) |" in report  # rows of runs not made are marked, never dropped
    assert "| LoRA r=32 |" in report and ("within the seed spread" in report or "exceeds the seed spread" in report)
    assert "T = TeamLoRA 4x8" in report and "expert load of TeamLoRA 4x8" in report
    # rerunning finds every run finished and only reprints the tables
    study.main(flags)
    assert capsys.readouterr().out.count("done before") == 6
    # a run stopped after its checkpoint (Ctrl-C) but before its scores is resumed, not redone
    first = json.loads((out / "lora32-seed1" / "results.json").read_text())
    (out / "lora32-seed1" / "results.json").unlink()
    study.main(flags)
    assert capsys.readouterr().out.count("done before") == 5
    assert "resumed from" in (out / "lora32-seed1" / "stdout.txt").read_text()
    assert json.loads((out / "lora32-seed1" / "results.json").read_text())["scores"] == first["scores"]


def test_study_rejects_unknown_runs_and_train_keys(capsys):
    with pytest.raises(SystemExit):
        study.main(["--runs=lora32,dora"])
    assert "unknown run(s) dora" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--seeds=three"])
    assert "config key 'seeds' in flag --seeds=three must be of type int, got 'three'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--learning_rat=1e-3", "--report"])
    assert "unknown config key 'learning_rat'" in capsys.readouterr().err
