"""sample.py: a run reloaded from its ckpt.pt is the model training ended with, and answers as it would."""
import argparse
import dataclasses
import json
import math
import os
import re

import pytest
import torch

import data
import evaluation
import sample
import train
from conftest import (
    TEXTS,
    adapters_of,
    assert_same_adapters,
    cuda_fp32_matmuls,
    hf_tokenizer_folder,
    reference_task_load,
    script_error,
    train_cfg,
    usage_error,
)
from minicme import make_suite
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def runs(run_data, tmp_path_factory):
    """adapter -> (out_dir, the model training returned), short runs of TeamLoRA, HydraLoRA, LoRA, full training."""
    out = {}
    for adapter in ("teamlora", "hydralora", "lora", "none"):
        folder = tmp_path_factory.mktemp(adapter)
        summary = train.train(train_cfg(run_data, folder, f"--init_from={run_data / 'base.pt'}", f"--adapter={adapter}",
                                        "--eval_dir=", "--max_iters=6"))
        out[adapter] = folder, summary["model"].eval()
    return out


def answers(printed):
    """(instruction, input, answer, expert shares or None) of each record sample.py printed."""
    blocks = []
    for block in printed.split("### Instruction: ")[1:]:
        lines = block.rstrip("\n").split("\n")
        input_ = next((line[len("### Input: "):] for line in lines if line.startswith("### Input: ")), "")
        load = re.search(r"\(experts, .*: (.*)\)$", lines[-1])
        shares = [float(v) for v in re.findall(r"e\d+ ([\d.]+)", load.group(1))] if load else None
        body = [line for line in lines[1:] if not line.startswith(("(", "### "))]
        blocks.append((lines[0], input_, "\n".join(body), shares))
    return blocks


@pytest.mark.parametrize("adapter", ["teamlora", "hydralora", "lora", "none"])
def test_a_run_reloads_as_training_left_it_and_answers_greedily_as_that_model(run_data, runs, adapter, capsys):
    out, trained = runs[adapter]
    model, r = sample.load_run(str(out), device="cpu")
    assert not model.training
    if adapter != "none":
        assert_same_adapters(adapters_of(trained), adapters_of(model))
    tokens = torch.tensor([data.encode_prompt(r.tok, {"instruction": "Who directed The Silver Harbor?"})])
    torch.testing.assert_close(model(tokens)[0], trained(tokens)[0], rtol=0, atol=0)

    records = [rec for _, rec in data.read_jsonl(run_data / "test" / "qa.jsonl")][:2]
    sample.main(["--out_dir", str(out), "--records", str(run_data / "test" / "qa.jsonl"), "--limit=2",
                 "--max_new_tokens=6", "--device=cpu"])
    got = answers(capsys.readouterr().out)
    assert [g[:2] for g in got] == [(rec["instruction"], rec["input"]) for rec in records]
    for (_, _, text, shares), rec in zip(got, records):
        ids = data.encode_prompt(r.tok, rec)
        assert text == r.tok.decode(trained.generate([ids], 6, eos_id=r.tok.eos_id)[0])
        if adapter in ("teamlora", "hydralora"):  # each expert's share over the prompt, last load_layers blocks
            want = reference_task_load(trained, [ids], r.args.n_layers, r.cfg["load_layers"], r.cfg["experts"])
            assert shares == pytest.approx(want.tolist(), abs=0.006) and len(shares) == r.cfg["experts"]
        else:
            assert shares is None


def test_sampling_repeats_with_its_seed_and_a_long_prompt_is_cut_to_fit(runs, capsys):
    out = str(runs["teamlora"][0])
    argv = ["--out_dir", out, "--instruction", "Name a film.", "--temperature=1.5", "--max_new_tokens=12"]
    texts = []
    for seed in (0, 0, 1, 2, 3):
        sample.main(argv + [f"--seed={seed}"])
        printed = capsys.readouterr().out
        assert "the prompt was cut" not in printed  # a short prompt is whole
        texts.append(answers(printed)[0][2])
    assert texts[0] == texts[1] and len(set(texts[1:])) > 1  # 12 tokens at temperature 1.5: seeds differ
    sample.main(argv)
    assert answers(capsys.readouterr().out)[0][2] == texts[0]  # no --seed: seed 0
    sample.main(["--out_dir", out, "--instruction", "word " * 400, "--max_new_tokens=4"])
    assert "(the prompt was cut to its start and end: the model has 256 positions)" in capsys.readouterr().out


def test_a_cut_prompts_expert_load_is_over_the_prompt_the_model_answered(runs):
    """The expert load beside an answer is over the prompt the model ran: the cut one, where the record's is longer
    than the positions the answer leaves, not the whole record's, which the model never saw."""
    model, r = sample.load_run(str(runs["teamlora"][0]))
    record = {"instruction": "word " * 400}
    _, load, cut = sample.answer(model, r, record, 4)
    ids = evaluation.prompt_ids(r.tok, record, r.args.context - 4)
    assert cut and len(ids) == r.args.context - 4 < len(data.encode_prompt(r.tok, record))
    torch.testing.assert_close(load, evaluation.task_expert_load(model, [ids], r), rtol=0, atol=0)


def test_a_sampled_answer_is_the_models_own_at_that_temperature_top_p_and_seed(run_data, runs, capsys):
    """sample.py hands --temperature, --top_p and --seed to the model's generate; a top_p below the likeliest
    token's probability keeps that token alone, so even at temperature 1.5 every seed answers greedily."""
    out, trained = runs["teamlora"]
    tok = Tokenizer(str(run_data / "tokenizer.model"))
    ids = data.encode_prompt(tok, {"instruction": "Name a film."})

    def sampled(temperature, top_p, seed):
        sample.main(["--out_dir", str(out), "--instruction", "Name a film.", f"--temperature={temperature}",
                     f"--top_p={top_p}", f"--seed={seed}", "--max_new_tokens=12"])
        return answers(capsys.readouterr().out)[0][2]
    for temperature, top_p, seed in ((1.5, 0.5, 3), (0.7, 0.9, 4)):
        want = trained.generate([ids], 12, eos_id=tok.eos_id, temperature=temperature, top_p=top_p, seed=seed)[0]
        assert sampled(temperature, top_p, seed) == tok.decode(want)
    greedy = tok.decode(trained.generate([ids], 12, eos_id=tok.eos_id)[0])
    assert [sampled(1.5, 1e-6, seed) for seed in (0, 1, 2)] == [greedy] * 3


def test_ids_of_a_bases_padding_rows_past_the_tokenizers_vocabulary_are_answered_as_no_text(runs):
    """train.py accepts a base whose embedding is padded past its tokenizer's vocabulary (VOCAB_PADDING): sampling can
    draw those ids, and SentencePiece's decode raised an IndexError on them (a traceback); they have no text."""
    model, r = sample.load_run(str(runs["lora"][0]), device="cpu")
    vocab, extra = r.tok.vocab_size, 64
    with torch.no_grad():  # padding rows likelier than most real ones, so that a few draws take them
        for m in (model.tok_embeddings, model.output):
            m.weight = torch.nn.Parameter(torch.cat([m.weight, 3 * m.weight[:extra]]), requires_grad=False)
    model.args.vocab_size = vocab + extra
    record = {"instruction": "Name a film."}
    drawn = model.generate([data.encode_prompt(r.tok, record)], 24, eos_id=r.tok.eos_id, temperature=1.5, seed=0)[0]
    assert any(i >= vocab for i in drawn) and any(i < vocab for i in drawn)
    text = sample.answer(model, r, record, 24, temperature=1.5, seed=0)[0]
    assert text == r.tok.decode([i for i in drawn if i < vocab])


def test_records_may_be_a_json_list_or_jsonl(runs, tmp_path, capsys):
    records = [{"instruction": "Who directed The Silver Harbor?", "input": ""},
               {"instruction": "Is it positive?", "input": "A fine film.", "output": "positive"}]
    (tmp_path / "r.json").write_text(json.dumps(records))
    data.write_jsonl(str(tmp_path / "r.jsonl"), records)
    printed = []
    for name in ("r.json", "r.jsonl"):
        sample.main(["--out_dir", str(runs["lora"][0]), "--records", str(tmp_path / name), "--max_new_tokens=4"])
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and "(expected: positive)" in printed[0]
    assert [a[:2] for a in answers(printed[0])] == [(rec["instruction"], rec["input"]) for rec in records]


def test_user_errors_are_one_sentence_and_exit_2(runs, tmp_path, capsys):
    good = str(runs["lora"][0])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "no instruction"}) + "\n")
    cases = [(["--out_dir", str(tmp_path / "none"), "--instruction", "x"], "ckpt.pt does not exist"),
             (["--out_dir", str(runs["lora"][0] / "adapter.pt"), "--instruction", "x"], "adapter.pt is a file, not a "
                                                                                         "folder; point --out_dir at"),
             (["--out_dir", good, "--records", str(tmp_path / "missing.jsonl")], "does not exist"),
             (["--out_dir", good, "--records", str(tmp_path)], f"--records file {tmp_path} is a folder, not a file"),
             (["--out_dir", good, "--records", str(tmp_path / "bad.jsonl")], 'line 1 has no "instruction"; give'),
             (["--out_dir", good, "--instruction", "x", "--max_new_tokens=300"], "lower --max_new_tokens"),
             (["--out_dir", good], "give --instruction"),
             (["--out_dir", good, "--instruction", "x", "--max_new_tokens=0"], "--max_new_tokens=0 is not positive"),
             (["--out_dir", good, "--records", str(tmp_path / "bad.jsonl"), "--limit=-1"], "--limit=-1 is negative")]
    moved = tmp_path / "moved"
    moved.mkdir()
    ckpt = torch.load(runs["lora"][0] / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "tokenizer": "elsewhere/tokenizer.model"}}, moved / "ckpt.pt")
    cases.append((["--out_dir", str(moved), "--instruction", "x"], "run sample.py in the folder that train.py ran in"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            sample.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and message in err[-1], (argv, err)
        assert "Traceback" not in "\n".join(err)


def test_a_records_input_of_the_wrong_type_is_refused_naming_its_line_before_any_record_is_answered(runs, tmp_path,
                                                                                                  capsys):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"instruction": "x"}) + "\n" + json.dumps({"instruction": "y", "input": 5}) + "\n")
    err = script_error(sample.main, ["--out_dir", runs["lora"][0], "--records", path, "--max_new_tokens=2"], capsys)
    assert f'{path} line 2: "input" is a number, not a string' in err and capsys.readouterr().out == ""


@pytest.mark.parametrize("instruction", [[], ["--instruction=x"]])
def test_a_records_file_of_no_records_is_refused_before_the_run_is_read(tmp_path, capsys, instruction):
    """A JSON list of none ([]) answered nothing, said nothing and exited 0 (prepare and tasks.py refuse it)."""
    (tmp_path / "r.json").write_text("[]\n")
    argv = ["--out_dir", tmp_path / "none", "--records", tmp_path / "r.json", *instruction]
    assert script_error(sample.main, argv, capsys) == (
        f"sample.py: error: --records file {tmp_path / 'r.json'} holds no records; give a JSONL or JSON list of "
        "records.")


def test_decoding_flags_out_of_range_are_refused_before_the_run_is_read(tmp_path, capsys, monkeypatch):
    """An infinite or NaN temperature, --top_p or --seed under greedy decoding (they would be ignored), a seed outside
    torch's range and a device train.py does not know: one sentence each, naming sample.py's own flag, its value and
    the fix, before sample.py reads any run. The last two named train.py's config keys ("config key 'seed' must be in
    [0, 2**63)")."""
    monkeypatch.setattr(sample, "load_run", lambda *a: pytest.fail("the run was read"))
    seeds = "is outside [0, 2**63), the seeds torch takes; give one from 0 to 2**63 - 1"
    finite = "is not a finite number >= 0; give 0 for greedy decoding, or a positive number such as 0.7 to sample"
    greedy = "applies to sampling only: give --temperature > 0 with it (temperature 0 is greedy)"
    top_p = "is outside (0, 1]; give the share of probability to sample from, such as 0.9, or 1 for every token"
    cases = [("--temperature=inf", f"--temperature=inf {finite}"), ("--temperature=nan", f"--temperature=nan {finite}"),
             ("--temperature=-1", f"--temperature=-1.0 {finite}"),
             ("--top_p=0.5", f"--top_p {greedy}"), ("--seed=3", f"--seed {greedy}"),
             (f"--temperature=1 --seed={10 ** 23}", f"--seed={10 ** 23} {seeds}"),
             ("--temperature=1 --seed=-1", f"--seed=-1 {seeds}"),
             (f"--temperature=1 --seed={2 ** 63}", f"--seed=9223372036854775808 {seeds}"),
             ("--device=tpu", "--device=tpu is not a device; give auto, cpu, cuda or cuda:N (N: the GPU's number)"),
             ("--top_p=0", f"--top_p=0.0 {top_p}"), ("--top_p=1.5", f"--top_p=1.5 {top_p}"),
             ("--temperature=1 --top_p=1.0001", f"--top_p=1.0001 {top_p}")]
    for flag, message in cases:
        assert usage_error(sample.main, ["--out_dir", tmp_path / "none", "--instruction", "x", *flag.split()],
                           capsys) == f"sample.py: error: {message}", flag
    for flag in ("--seed=0", f"--seed={2 ** 63 - 1}", "--device=cuda:1", "--device=cpu"):  # in range: the run is read
        with pytest.raises(pytest.fail.Exception, match="the run was read"):
            sample.main(["--out_dir", str(tmp_path / "none"), "--instruction", "x", "--temperature=1", flag])


def test_a_limit_without_records_is_refused_not_ignored(tmp_path, capsys, monkeypatch):
    """--limit counts the records of --records: beside --instruction alone it was silently ignored, even at its
    default's value (10), which is the default still when only --records is given."""
    monkeypatch.setattr(sample, "load_run", lambda *a: pytest.fail("the run was read"))
    for flags in (["--instruction=hi", "--limit=3"], ["--limit=10", "--instruction=hi"], ["--instruction=x",
                                                                                           "--limit=0"]):
        with pytest.raises(SystemExit) as e:
            sample.main(["--out_dir", str(tmp_path / "none"), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].endswith("--limit counts the records of --records; give --records with "
                                                      "it, or leave --limit out"), (flags, err)


def test_an_empty_records_flag_is_refused_not_taken_for_no_records(tmp_path, capsys, monkeypatch):
    """--records= (a shell variable left empty) is refused before any run is read, alone or beside --instruction:
    that one record was answered, and the file's records silently not; records_of itself takes "" as none."""
    monkeypatch.setattr(sample, "load_run", lambda *a: pytest.fail("the run was read"))
    for flags in (["--records="], ["--instruction=hi", "--records="], ["--records= ", "--instruction=hi"]):
        with pytest.raises(SystemExit) as e:
            sample.main(["--out_dir", str(tmp_path / "none"), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].endswith("--records is empty; give a JSONL or JSON list of records, "
                                                      "or leave --records out"), err
    args = argparse.Namespace(instruction="Name a film.", input="", records="", limit=10)
    assert sample.records_of(args) == [{"instruction": "Name a film.", "input": ""}]


def test_by_default_ten_records_are_answered_greedily_with_up_to_64_new_tokens_on_the_idle_cores(tmp_path,
                                                                                                   monkeypatch):
    """The defaults --help gives (--limit 10, --max_new_tokens 64, greedy: temperature 0, top_p 1, seed 0), as
    sample.main hands them to answer, on the CPU with as many threads as train.py's threads=0 takes; the run and
    the model are stood in for."""
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"instruction": f"q{i}"}) + "\n" for i in range(11)))
    monkeypatch.setattr(sample, "load_run", lambda out_dir, device, max_new_tokens: (None, argparse.Namespace(
        device=torch.device("cpu"))))
    asked, threads = [], []
    monkeypatch.setattr(sample, "answer", lambda model, r, record, *args: asked.append((record["instruction"], args))
                        or ("", None, False))
    monkeypatch.setattr(sample.machine, "cpu_threads", lambda cfg: 3 if cfg == {"threads": 0} else None)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    sample.main(["--records", str(tmp_path / "r.jsonl")])
    # 3 for the answers, then the caller's count back
    assert asked == [(f"q{i}", (64, 0.0, 1.0, 0)) for i in range(10)] and threads == [3, torch.get_num_threads()]


def test_main_gives_the_callers_cpu_thread_count_back_when_it_returns_or_fails(tmp_path, monkeypatch, capsys):
    """main sets torch's threads for its answers; a notebook or test that calls it keeps its own count afterwards,
    whether every record is answered or one is refused."""
    (tmp_path / "r.jsonl").write_text(json.dumps({"instruction": "q"}) + "\n")
    monkeypatch.setattr(sample, "load_run", lambda out_dir, device, max_new_tokens: (None, argparse.Namespace(
        device=torch.device("cpu"))))
    monkeypatch.setattr(sample.machine, "cpu_threads", lambda cfg: 1)
    seen = []
    monkeypatch.setattr(sample, "answer", lambda *args: seen.append(torch.get_num_threads()) or ("", None, False))
    torch.set_num_threads(3)  # the caller's (conftest gives the test's count back)
    sample.main(["--records", str(tmp_path / "r.jsonl")])
    assert seen == [1] and torch.get_num_threads() == 3

    def refused(*args):
        seen.append(torch.get_num_threads())
        raise data.UserError("stand-in for a record that is refused")

    monkeypatch.setattr(sample, "answer", refused)
    with pytest.raises(SystemExit):
        sample.main(["--records", str(tmp_path / "r.jsonl")])
    assert seen == [1, 1] and torch.get_num_threads() == 3 and "stand-in" in capsys.readouterr().err


def test_an_input_without_an_instruction_is_refused_not_dropped(tmp_path, capsys):
    """--input is the input of --instruction's record: beside --records alone it was dropped unsaid (each record
    answered with its own input), so the answers were not to the prompt asked."""
    (tmp_path / "r.jsonl").write_text(json.dumps({"instruction": "Name a film.", "input": ""}) + "\n")
    with pytest.raises(SystemExit) as e:
        sample.main(["--out_dir", str(tmp_path / "none"), "--records", str(tmp_path / "r.jsonl"), "--input", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].endswith("--input goes with --instruction; a --records file gives each "
                                                  'record\'s own "input"'), err


@pytest.mark.parametrize("edit, message", [
    ({"r": "abc"}, "{ckpt} holds a run config that train.py refuses (config key 'r' must be of type int, got 'abc'); "
                   "if it was edited, put back the run's own value, else train the run again."),
    ({"adapter": "dora"}, "config key 'adapter' must be one of"),
    ({"tokenizer": "/nowhere/tokenizer.model"}, "/nowhere/tokenizer.model is not found from here; it was moved or "
                                                 "deleted since the run: put it back there."),
    ({"init_from": "/nowhere/base.pt"}, "the run's init_from /nowhere/base.pt is not found from here; it was moved or "
                                        "deleted since the run: put it back there.")])
def test_a_hand_edited_or_moved_run_config_is_checked_as_a_resume_checks_it(runs, tmp_path, capsys, edit, message):
    """sample.py reads a ckpt.pt's config through train.resume_config (typed and check_config again); an absolute
    path that is gone is not blamed on relative paths."""
    ckpt = torch.load(runs["teamlora"][0] / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], **edit}}, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        sample.main(["--out_dir", str(tmp_path), "--instruction", "x", "--max_new_tokens=4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message.format(ckpt=tmp_path / "ckpt.pt") in err[-1], err
    assert "Traceback" not in "\n".join(err) and "relative" not in err[-1]


@pytest.mark.parametrize("edit, problem", [
    ({"batch_size": 12, "grad_accum": 5}, "batch_size=12 must be a multiple of grad_accum=5"),
    ({"learning_rate": 0.5, "weight_decay": 4.0}, "learning_rate=0.5 with weight_decay=4 zeroes every weight or flips "
                                                  "its sign at each step (AdamW multiplies them by 1 - learning_rate "
                                                  "* weight_decay)"),
    ({"targets": " , "}, "config key 'targets' is empty"),
    ({"adapter": "lora", "competition": True}, "competition=True mixes experts' weights by a learned matrix, which "
                                               "adapter=lora does not have"),
    ({"dropout": 1.5}, "config key 'dropout' must be in [0, 1), got 1.5"),
    # a value that holds "; " (where train.py's sentence turns to its fix) is quoted whole: it was cut there
    ({"adapter": "lora; none"}, "config key 'adapter' must be one of teamlora, moelora, hydralora, lora, none, got "
                                "'lora; none'"),
    ({"r": "8; 16"}, "config key 'r' must be of type int, got '8; 16'")])
def test_a_ckpt_pts_config_that_train_py_refuses_is_named_as_the_runs_not_fixed_with_train_pys_flags(
        runs, tmp_path, capsys, edit, problem):
    """check_config's sentences end in train.py's fix ("lower --batch_size", "use --adapter=lora"): flags that
    sample.py does not take, for a config the user did not type but the run's ckpt.pt holds."""
    ckpt = torch.load(runs["teamlora"][0] / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], **edit}}, tmp_path / "ckpt.pt")
    err = script_error(sample.main, ["--out_dir", tmp_path, "--instruction", "x", "--max_new_tokens=4"], capsys)
    assert err == (f"sample.py: error: {tmp_path / 'ckpt.pt'} holds a run config that train.py refuses ({problem}); "
                   "if it was edited, put back the run's own value, else train the run again.")


def test_without_fix_cuts_at_the_first_semicolon_outside_the_config_values_that_the_sentence_quotes():
    """train.py's refusals that quote a value holding "; " give no fix after it, so the test above cuts nowhere: here
    sentences of a problem, then a fix, check where the cut falls."""
    assert sample.without_fix("got 'a; b'; use c.", ["a; b", 3]) == "got 'a; b'"  # not inside the value
    assert sample.without_fix("got 'a\\\\; b'; use c.", ["a\\; b"]) == "got 'a\\\\; b'"  # quoted as repr escapes it
    assert sample.without_fix("got '; '; use c.", ["; "]) == "got '; '"  # a "; " alone is no value to skip elsewhere
    assert sample.without_fix("got 'a; b'.", ["a; b"]) == "got 'a; b'" and sample.without_fix("x; y", []) == "x"


def test_a_base_folder_whose_weights_are_gone_is_one_sentence(runs, tmp_path, capsys):
    """weights.py says a missing weight file with a FileNotFoundError, which train.py prints as one sentence and
    sample.py printed as a traceback."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                                                  "vocab_size": 512, "intermediate_size": 128}))
    ckpt = torch.load(runs["teamlora"][0] / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "init_from": str(base)}}, tmp_path / "ckpt.pt")
    err = script_error(sample.main, ["--out_dir", tmp_path, "--instruction", "x", "--max_new_tokens=4"], capsys)
    assert err == (f"sample.py: error: {str(base)!r} has config.json but no *.safetensors or pytorch_model*.bin weight "
                   "files; put the weights in the same folder")


def test_a_qwen3_folder_fine_tunes_through_train_py_and_answers_through_sample_py(tmp_path, capsys):
    """The newest family end to end: a Qwen3 checkpoint and tokenizer written by transformers and tokenizers (four
    heads of 32 over a width of 64, per-head q/k norms), adapters on the FFN and on wq, a short run, then sample.py."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    folder = hf_tokenizer_folder(tmp_path / "tok")
    config = transformers.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(tmp_path / "base")
    records = [{"instruction": t, "input": "", "output": "positive"} for t in TEXTS]
    data.write_jsonl(str(tmp_path / "r.jsonl"), records)
    data.prepare([str(tmp_path / "r.jsonl")], str(folder), str(tmp_path / "tokens"), max_len=64, quiet=True)
    summary = train.train(train.parse_config([
        f"--data_dir={tmp_path / 'tokens'}", f"--tokenizer={folder}", "--eval_dir=", f"--init_from={tmp_path / 'base'}",
        "--targets=w1,w2,w3,wq", "--max_iters=4", "--eval_interval=4", "--batch_size=4", "--max_len=64", "--r=8",
        "--learning_rate=1e-2", f"--out_dir={tmp_path / 'run'}"]))
    trained = summary["model"].eval()
    assert trained.args.qk_norm and trained.layers[0].attention.wq.lora_B.shape == (4 * 32, 8)  # 4 heads of 32
    sample.main(["--out_dir", str(tmp_path / "run"), "--instruction", TEXTS[0], "--max_new_tokens=5"])
    (_, _, text, shares), = answers(capsys.readouterr().out)
    tok = Tokenizer(str(folder))
    ids = data.encode_prompt(tok, {"instruction": TEXTS[0]})
    assert text == tok.decode(trained.generate([ids], 5, eos_id=tok.eos_id)[0]) and len(shares) == 4
    (tmp_path / "base" / "config.json").write_text("{")  # a damaged base: weights.py's ValueError, in one sentence
    argv = ["--out_dir", tmp_path / "run", "--instruction", TEXTS[0], "--max_new_tokens=5"]
    assert "config.json is not valid JSON" in script_error(sample.main, argv, capsys)


def test_a_prompt_fills_what_the_answer_leaves_and_one_token_more_is_cut_keeping_bos_and_its_end(runs, monkeypatch):
    """The prompt gets the max_seq_len - max_new_tokens positions the answer leaves: a prompt of exactly that many
    tokens goes to generate whole, one token longer loses one token after BOS (BOS and the end, "</s>", kept). The
    least a prompt can be is those two: max_new_tokens = max_seq_len - 2 answers from [BOS, EOS], one more is
    refused."""
    model, r = sample.load_run(str(runs["lora"][0]), device="cpu")
    seq = r.args.max_seq_len
    record = next(rec for n in range(150, 260) if seq - 12 <= len(data.encode_prompt(r.tok, rec := {
        "instruction": "word " * n})) < seq - 2)
    full = data.encode_prompt(r.tok, record)
    prompts, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda p, *a, **kw: prompts.append(p[0]) or generate(p, *a, **kw))
    assert sample.answer(model, r, record, seq - len(full))[2] is False and prompts[-1] == full
    assert sample.answer(model, r, record, seq - len(full) + 1)[2] is True
    assert prompts[-1] == full[:1] + full[2:]
    assert sample.answer(model, r, record, seq - 2)[2] is True and prompts[-1] == [r.tok.bos_id, r.tok.eos_id]
    with pytest.raises(sample.UserError, match="leaves no room for a prompt"):
        sample.answer(model, r, record, seq - 1)


def test_a_sliding_window_model_gets_prompts_cut_to_its_window_not_to_max_seq_len(runs, monkeypatch):
    """Mistral v0.1 attends over a window shorter than max_seq_len and refuses longer sequences: a prompt gets the
    window less the answer's tokens, as in evaluation, and is answered."""
    model, r = sample.load_run(str(runs["lora"][0]), device="cpu")
    assert model.args is r.args
    monkeypatch.setattr(r.args, "sliding_window", window := r.args.max_seq_len // 2)
    prompts, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda p, *a, **kw: prompts.append(p[0]) or generate(p, *a, **kw))
    record = {"instruction": "word " * window}
    assert len(data.encode_prompt(r.tok, record)) > window
    assert sample.answer(model, r, record, 8)[2] is True and len(prompts[-1]) == window - 8
    with pytest.raises(sample.UserError, match=f"in this model's {window} positions"):
        sample.answer(model, r, record, window - 1)


def test_an_instruction_with_its_input_and_limit_0_answer_every_record_as_given(run_data, runs, tmp_path, capsys):
    """--input goes into the prompt after the instruction ({instruction, input}, encoded as in training); --limit=0
    answers every record of --records (twelve here, more than the default --limit of 10), in their order."""
    out, trained = runs["lora"]
    records = [{"instruction": f"Question {i}: who directed it?", "input": f"film {i}"} for i in range(12)]
    data.write_jsonl(str(tmp_path / "r.jsonl"), records)
    given = {"instruction": "Is it positive?", "input": "A fine film."}
    sample.main(["--out_dir", str(out), "--instruction", given["instruction"], "--input", given["input"],
                 "--records", str(tmp_path / "r.jsonl"), "--limit=0", "--max_new_tokens=3", "--device=cpu"])
    got = answers(capsys.readouterr().out)
    assert [g[:2] for g in got] == [(rec["instruction"], rec["input"]) for rec in [given] + records]
    tok = Tokenizer(str(run_data / "tokenizer.model"))
    for (_, _, text, _), rec in zip(got, [given] + records[:2]):
        assert text == tok.decode(trained.generate([data.encode_prompt(tok, rec)], 3, eos_id=tok.eos_id)[0])


def test_a_run_trained_compiled_and_checkpointed_is_read_back_eager_and_without_recomputation(runs, tmp_path):
    """A CUDA run's ckpt.pt often says compile=True and activation_checkpointing=True: sample.py answers one prompt
    at a time, so it loads the model eager and without checkpointing whatever the run used (sample.LOADING wins
    over the saved config), and the model is the one the run saved."""
    ckpt = torch.load(runs["teamlora"][0] / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "compile": True, "activation_checkpointing": True}},
               tmp_path / "ckpt.pt")
    model, r = sample.load_run(str(tmp_path), device="cpu")
    assert not r.cfg["compile"] and not r.cfg["activation_checkpointing"] and not model.gradient_checkpointing
    assert all(getattr(block, "_compiled_call_impl", None) is None for block in model.layers)
    assert_same_adapters(adapters_of(runs["teamlora"][1]), adapters_of(model))


def test_a_run_whose_base_was_replaced_since_is_refused_not_answered_with_its_adapter_on_another_base(runs, run_data,
                                                                                                   tmp_path):
    """The adapter is only right on the base it was trained on, whose fingerprint ckpt.pt records."""
    base = torch.load(run_data / "base.pt", weights_only=True)
    base["model"]["tok_embeddings.weight"][0, 0] += 1.0  # another base at the same path: a retrained or edited one
    torch.save(base, tmp_path / "base.pt")
    ckpt = torch.load(runs["lora"][0] / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "init_from": str(tmp_path / "base.pt")}}, tmp_path / "ckpt.pt")
    with pytest.raises(sample.UserError, match="is not the one this run trained on"):
        sample.load_run(str(tmp_path), device="cpu")


def test_a_run_whose_tokenizer_was_replaced_by_another_of_its_size_is_refused_not_answered_in_other_ids(runs,
                                                                                                         tmp_path):
    """Another tokenizer of the same size at the run's path loads and answers, in ids the adapter never saw: the
    SHA-256 ckpt.pt records of it tells them apart (a checkpoint written before it was recorded is not checked)."""
    ckpt = torch.load(runs["lora"][0] / "ckpt.pt", weights_only=True)
    make_suite(str(tmp_path / "other"), seed=1, n_train_per_task=4, n_test_per_task=2, n_val_per_task=2,
               corpus_docs=400)  # another world's text: another tokenizer of the same vocab_size
    moved = {**ckpt, "config": {**ckpt["config"], "tokenizer": str(tmp_path / "other" / "tokenizer.model")}}
    assert Tokenizer(moved["config"]["tokenizer"]).vocab_size == Tokenizer(ckpt["config"]["tokenizer"]).vocab_size
    torch.save(moved, tmp_path / "ckpt.pt")
    with pytest.raises(sample.UserError, match=r"the tokenizer at .*other/tokenizer.model is not the one this run "
                                               r"was trained with \(its SHA-256 differs"):
        sample.load_run(str(tmp_path), device="cpu")
    torch.save({k: v for k, v in moved.items() if k != "tokenizer"}, tmp_path / "ckpt.pt")
    assert sample.load_run(str(tmp_path), device="cpu")[1].tok.path.endswith("other/tokenizer.model")


def test_a_ckpt_pt_that_is_an_adapter_is_named_as_sample_pys_not_a_resumes(runs, tmp_path):
    """load_checkpoint's sentence said "resume needs that ckpt.pt" to sample.py too, which resumes nothing."""
    (tmp_path / "ckpt.pt").write_bytes((runs["lora"][0] / "adapter.pt").read_bytes())
    with pytest.raises(sample.UserError) as error:
        sample.load_run(str(tmp_path), device="cpu")
    assert "is an adapter (adapter.pt), not the ckpt.pt" in str(error.value) and "resume" not in str(error.value)
    assert "; sample.py needs that ckpt.pt; to score it alone, rename it to adapter.pt and run python train.py " \
        f"--eval_only=True --out_dir={tmp_path} with the flags it was trained with." in str(error.value)


def test_a_run_stopped_before_max_iters_answers_with_a_note_of_its_step_and_a_finished_one_without(runs, tmp_path,
                                                                                                capsys):
    ckpt = torch.load(runs["lora"][0] / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == ckpt["config"]["max_iters"]
    sample.load_run(str(runs["lora"][0]), device="cpu")
    assert "note:" not in capsys.readouterr().err
    torch.save({**ckpt, "iter": ckpt["iter"] - 1}, tmp_path / "ckpt.pt")  # as Ctrl-C one step early leaves it
    sample.load_run(str(tmp_path), device="cpu")
    assert f"note: the run in {tmp_path} is at step {ckpt['iter'] - 1} of its {ckpt['iter']}" in capsys.readouterr().err


def test_the_device_asked_for_wins_over_the_one_the_run_was_trained_on(runs, tmp_path):
    """A run trained on a GPU (config device "cuda") is read onto the CPU when --device=cpu asks for it."""
    ckpt = torch.load(runs["lora"][0] / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "device": "cuda"}}, tmp_path / "ckpt.pt")
    model, r = sample.load_run(str(tmp_path), device="cpu")
    assert r.device.type == "cpu" and all(p.device.type == "cpu" for p in model.parameters())


def test_an_empty_input_prints_no_input_line_an_empty_instruction_is_answered_and_an_empty_output_is_shown(
        runs, tmp_path, capsys):
    out = str(runs["lora"][0])
    sample.main(["--out_dir", out, "--instruction=", "--max_new_tokens=2"])
    printed = capsys.readouterr().out
    assert printed.startswith("### Instruction: \n") and printed.count("### Instruction:") == 1
    assert "### Input:" not in printed
    sample.main(["--out_dir", out, "--instruction=", "--input=Paris", "--max_new_tokens=2"])  # with its input
    assert capsys.readouterr().out.startswith("### Instruction: \n### Input: Paris\n")
    data.write_jsonl(str(tmp_path / "r.jsonl"), [{"instruction": "Say nothing.", "input": "", "output": ""}])
    sample.main(["--out_dir", out, "--records", str(tmp_path / "r.jsonl"), "--max_new_tokens=2"])
    printed = capsys.readouterr().out
    assert "### Input:" not in printed and "(expected: )" in printed.splitlines()


def test_a_records_files_terminal_escape_sequences_are_printed_escaped_not_sent_to_the_terminal(runs, tmp_path,
                                                                                                 capsys):
    """A records file is data from anywhere: its ESC sequences (here a clipboard write and a screen clear) and other
    control characters were printed raw, to drive the terminal; line breaks, tabs and any other text print as they
    are. The answer goes through the same (a byte-level tokenizer can decode to ESC)."""
    hostile = {"instruction": "Hi\x1b]52;c;aGk=\x07 there\tyou\r", "input": "\x1b[2J\x00caf\u00e9 \u200d\u05d0\x9b",
               "output": "line one\nline \x7ftwo"}
    data.write_jsonl(str(tmp_path / "r.jsonl"), [hostile])
    sample.main(["--out_dir", str(runs["lora"][0]), "--records", str(tmp_path / "r.jsonl"), "--max_new_tokens=2"])
    printed = capsys.readouterr().out
    assert not any(c in printed for c in "\x1b\x07\r\x00\x7f\x9b")
    assert "### Instruction: Hi\\x1b]52;c;aGk=\\x07 there\tyou\\r\n" in printed
    assert "### Input: \\x1b[2J\\x00caf\u00e9 \u200d\u05d0\\x9b\n" in printed  # letters, marks: as they are
    assert "(expected: line one\nline \\x7ftwo)" in printed


def test_on_cuda_a_run_answers_with_the_float32_matmuls_its_own_scoring_used(runs, monkeypatch):
    """train.py scores a CUDA run with its float32 matmuls on TF32 (tf32=True, the default) or IEEE (tf32=False):
    sample.py answers with the run's setting, so its greedy answers are the run's own, and restores the one it found;
    on the CPU it leaves the setting alone. (The CUDA device is stood in for: the precision is a global flag.)"""
    model, r = sample.load_run(str(runs["lora"][0]), device="cpu")
    seen, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **kw: seen.append(cuda_fp32_matmuls()) or generate(*a, **kw))
    before = cuda_fp32_matmuls()
    for tf32, device in ((True, "cuda"), (False, "cuda"), (True, "cpu")):
        run = dataclasses.replace(r, cfg={**r.cfg, "tf32": tf32}, device=torch.device(device))
        sample.answer(model, run, {"instruction": "Who directed The Silver Harbor?"}, 2)
        assert cuda_fp32_matmuls() == before
    assert seen == ["tf32", "ieee", before]


def test_an_answer_decoded_to_control_characters_is_printed_escaped_with_its_lines_and_tabs_as_they_are(
        runs, capsys, monkeypatch):
    """A byte-level tokenizer can decode an answer to ESC and other control characters: they are shown, as the
    records' are, not sent to the terminal."""
    monkeypatch.setattr(sample, "answer", lambda *a: ("Paris\x1b[2J\tis\r\nits capital\x07", None, False))
    sample.main(["--out_dir", str(runs["lora"][0]), "--instruction", "x", "--max_new_tokens=2"])
    assert "\nParis\\x1b[2J\tis\\r\nits capital\\x07\n" in capsys.readouterr().out


def test_the_even_share_printed_beside_the_expert_load_is_one_over_the_number_of_experts(runs, capsys, monkeypatch):
    monkeypatch.setattr(sample, "answer", lambda *a: ("text", torch.tensor([0.75, 0.25]), False))
    sample.main(["--out_dir", str(runs["lora"][0]), "--instruction", "x", "--max_new_tokens=2"])
    shown = torch.load(runs["lora"][0] / "ckpt.pt", weights_only=True)["config"]["load_layers"]  # of 4 blocks
    assert f"(experts, last {shown} layers; even = 0.50: e0 0.75  e1 0.25)" in capsys.readouterr().out


def test_the_instruction_and_input_are_text_even_where_they_start_with_a_tilde(tmp_path, monkeypatch):
    """Only the path flags are the home folder when written ~/...: the text asked about is the user's, as written."""
    monkeypatch.setenv("HOME", str(tmp_path))
    asked, records_of = [], sample.records_of
    monkeypatch.setattr(sample, "records_of", lambda args: asked.extend(records_of(args)) or asked)

    def stop(*args):  # before a run is needed
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "load_run", stop)
    with pytest.raises(KeyboardInterrupt):
        sample.main([f"--out_dir={tmp_path}", "--instruction=~/notes", "--input=~"])
    assert asked == [{"instruction": "~/notes", "input": "~"}]


def test_an_out_dir_or_records_of_the_wrong_kind_is_named_for_what_it_is(tmp_path, capsys, monkeypatch):
    """A file given as --out_dir was called a missing ckpt.pt, a named pipe given as --records a missing file, and an
    empty --out_dir read the ckpt.pt of the current folder."""
    (tmp_path / "notes.txt").write_text("not a run\n")
    assert script_error(sample.main, ["--out_dir", tmp_path / "notes.txt", "--instruction", "x"], capsys) == (
        f"sample.py: error: {tmp_path / 'notes.txt'} is a file, not a folder; point --out_dir at the folder of a run "
        "of train.py.")
    (tmp_path / "empty").mkdir()  # a folder, but no run's
    assert script_error(sample.main, ["--out_dir", tmp_path / "empty", "--instruction", "x"], capsys) == (
        f"sample.py: error: {tmp_path / 'empty' / 'ckpt.pt'} does not exist; point --out_dir at the folder of a run of "
        "train.py.")
    os.mkfifo(tmp_path / "pipe.jsonl")
    assert script_error(sample.main, ["--out_dir", tmp_path, "--records", tmp_path / "pipe.jsonl"], capsys) == (
        f"sample.py: error: --records file {tmp_path / 'pipe.jsonl'} is a named pipe, not a file; give a JSONL or JSON "
        "list of records.")
    monkeypatch.chdir(tmp_path)
    for empty in ("--out_dir=", "--out_dir= "):  # named as sample.py's flag, not as train.py's config key 'out_dir'
        assert usage_error(sample.main, [empty, "--instruction", "x"], capsys) == (
            "sample.py: error: --out_dir is empty; give the folder of a run of train.py, such as --out_dir=out/demo")


@pytest.mark.parametrize("flags", [["--instruction=\udcff\udcfe"], ["--instruction=x", "--input=a\udcff"]])
def test_an_instruction_or_input_of_bytes_that_are_not_utf8_is_refused_naming_its_flag_before_the_run_is_read(
        tmp_path, capsys, monkeypatch, flags):
    """Python gives argv's bytes that are not UTF-8 as lone surrogates: they were refused as a "record" holding one,
    once the model had loaded."""
    monkeypatch.setattr(sample, "load_run", lambda *a: pytest.fail("the run was read"))
    flag = flags[-1].partition("=")[0]
    with pytest.raises(SystemExit) as e:
        sample.main(["--out_dir", str(tmp_path / "none"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].endswith(f"{flag} holds bytes that are not UTF-8 text; give it in UTF-8, the "
                                                  "terminal's encoding"), err


def test_an_instruction_in_utf8_under_an_ascii_locale_is_refused_naming_the_locale_not_the_text(tmp_path, capsys,
                                                                                                   monkeypatch):
    """Under LC_ALL=C with PYTHONUTF8=0 Python decodes argv as ASCII: "café", typed in a UTF-8 terminal, arrives as
    "caf" and two lone surrogates, and was refused as 'bytes that are not UTF-8 text; give it in UTF-8' (it was UTF-8).
    The fix is the locale's, as check_openable_by_torch says for a path."""
    monkeypatch.setattr(sample, "load_run", lambda *a: pytest.fail("the run was read"))
    monkeypatch.setattr(sample.sys, "getfilesystemencoding", lambda: "ascii")  # the locale by which argv was decoded
    typed = "café".encode("utf-8").decode("ascii", "surrogateescape")
    with pytest.raises(SystemExit) as e:
        sample.main(["--out_dir", str(tmp_path / "none"), f"--instruction={typed}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2, err
    assert err.endswith("--instruction holds non-ASCII characters, which Python cannot pass on as text under this "
                        "locale (ascii: LC_ALL=C, say); run it under a UTF-8 locale (LC_ALL=C.UTF-8, or PYTHONUTF8=1)")


def test_every_error_names_sample_py_as_argparse_names_it(tmp_path, capsys):
    """A flag's mistake said "sample.py: error:" (argparse's, named by how the script was run) and a run's "error:"."""
    for argv in (["--instruction=x", "--temperature=-1"], ["--out_dir", tmp_path / "none", "--instruction", "x"]):
        with pytest.raises(SystemExit) as e:
            sample.main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("sample.py: error: "), err


def test_a_flag_is_read_by_its_whole_name_only_and_a_near_miss_is_named(tmp_path, capsys, monkeypatch):
    """An abbreviation (--temp for --temperature) was taken as its flag, and a flag added later would make it
    ambiguous or change its meaning; a misspelt flag was an "unrecognized argument" with no hint."""
    monkeypatch.setattr(sample, "load_run", lambda *a: pytest.fail("the run was read"))
    for flag, near in (("--temp=1", "--temperature"), ("--instrucion=hi", "--instruction"), ("--top=0.5", "--top_p")):
        with pytest.raises(SystemExit) as e:
            sample.main(["--out_dir", str(tmp_path / "none"), "--instruction=x", flag])
        err = capsys.readouterr().err.strip().splitlines()
        name = flag.partition("=")[0]
        assert e.value.code == 2 and err[-1].endswith(f"error: {name} is not a flag of this script; did you mean "
                                                      f"{near}?"), err


@pytest.mark.parametrize("output, kind", [(5, "a number"), (["pos", "itive"], "a list"), ({"a": 1}, "an object"),
                                          (True, "a boolean")])
def test_a_records_output_of_the_wrong_type_is_refused_naming_its_line_before_the_run_is_read(tmp_path, capsys,
                                                                                            monkeypatch, output, kind):
    """"output" is printed as the expected answer: a number stopped sample.py with a traceback after the first
    answers, a list was printed as its strings run together ("positive"), an object as its keys."""
    monkeypatch.setattr(sample, "load_run", lambda *a: pytest.fail("the run was read"))
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"instruction": "x", "output": None}) + "\n" + json.dumps({"instruction": "y",
                                                                                          "output": output}) + "\n")
    err = script_error(sample.main, ["--out_dir", tmp_path / "none", "--records", path], capsys)
    assert err.startswith(f'sample.py: error: {path} line 2: "output" is {kind}, not a string; give records in the '
                          'authors\' format') and capsys.readouterr().out == ""


def test_a_ckpt_pt_that_is_a_folder_is_named_as_one_not_called_missing(tmp_path, capsys):
    (tmp_path / "ckpt.pt").mkdir()
    assert script_error(sample.main, ["--out_dir", tmp_path, "--instruction", "x"], capsys) == (
        f"sample.py: error: {tmp_path / 'ckpt.pt'} is a folder, not a checkpoint; point --out_dir at the folder of a "
        "run of train.py.")


def test_a_top_p_too_small_for_float32_keeps_the_likeliest_token_as_any_tiny_top_p_does(runs, capsys):
    """model.sample compares top_p with float32 sums, in which 1e-300 is 0: every token was dropped and torch's
    multinomial raised a traceback. Any top_p that small keeps the likeliest token alone: the greedy answer."""
    out = str(runs["teamlora"][0])
    argv = ["--out_dir", out, "--instruction", "Name a film.", "--max_new_tokens=12"]
    sample.main(argv)
    greedy = answers(capsys.readouterr().out)[0][2]
    for top_p in ("1e-6", "1e-300", "5e-324"):
        sample.main(argv + ["--temperature=1.5", f"--top_p={top_p}", "--seed=1"])
        assert answers(capsys.readouterr().out)[0][2] == greedy, top_p


@pytest.mark.parametrize("window", [None, 100])
def test_max_new_tokens_that_leave_no_room_are_refused_before_the_model_is_built(runs, tmp_path, capsys, monkeypatch,
                                                                                  window):
    """The refusal came once the base was built and the adapter loaded (minutes for a 7B base): ckpt.pt holds the
    model's shape, max_seq_len and any sliding window, so it comes first; one position fewer is answered."""
    ckpt = torch.load(runs["lora"][0] / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "model_args": {**ckpt["model_args"], "sliding_window": window}}, tmp_path / "ckpt.pt")
    context = min(ckpt["model_args"]["max_seq_len"], window or math.inf)
    build = train.build_model
    monkeypatch.setattr(train, "build_model", lambda *a, **kw: pytest.fail("the model was built"))
    argv = ["--out_dir", str(tmp_path), "--instruction", "x", "--device=cpu"]
    assert script_error(sample.main, argv + [f"--max_new_tokens={context - 1}"], capsys) == (
        f"sample.py: error: max_new_tokens={context - 1} leaves no room for a prompt in this model's {context} "
        "positions; lower --max_new_tokens.")
    monkeypatch.setattr(train, "build_model", build)
    sample.main(argv + [f"--max_new_tokens={context - 2}"])
    assert "### Instruction: x" in capsys.readouterr().out


def test_a_shape_in_ckpt_pt_that_model_args_refuses_leaves_the_room_to_the_model_built_for_either_kind_of_refusal(
        runs, tmp_path, capsys):
    """ckpt.pt's shape only brings the prompt-room check forward: one that ModelArgs refuses (a key it lacks, a
    TypeError; a width it refuses, a ValueError) is left to the model's build, whose shape the adapter run takes from
    its base: the answers are those of the run as it was saved, whichever error the shape raises."""
    ckpt = torch.load(runs["lora"][0] / "ckpt.pt", weights_only=True)
    argv = ["--out_dir", str(tmp_path), "--instruction", "Which filmmaker made The Silver Harbor?", "--device=cpu",
            "--max_new_tokens=6"]
    printed = []
    for shape, error in (({}, None), ({"no_such_field": 1}, TypeError), ({"n_layers": -1}, ValueError)):
        if error:
            with pytest.raises(error):
                train.ModelArgs(**{**ckpt["model_args"], **shape})
        torch.save({**ckpt, "model_args": {**ckpt["model_args"], **shape}}, tmp_path / "ckpt.pt")
        sample.main(argv)
        printed.append(answers(capsys.readouterr().out))
    assert printed[1] == printed[0] and printed[2] == printed[0] and printed[0][0][2]
