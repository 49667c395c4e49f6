"""data.py and tokenizer.py: the tokenizer, the authors' record format token for token, prepare, batches.

    python -m pytest -q
"""
import base64
import errno
import hashlib
import inspect
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import data
import tokenizer
from conftest import (
    FIXTURES,
    LLAMA2,
    OFFICIAL,
    TEXTS,
    hf_tokenizer_folder,
    named_pipe,
    needs_fixtures,
    script_error,
    usage_error,
)
from data import TokenDataset, Tokenizer, UserError, encode_example, get_batch, global_batch, prepare

EDGE_CASES = [
    {"instruction": "Trailing whitespace", "input": "inp  \n\n", "output": "out \n"},
    {"instruction": "Leading space in the answer", "input": "", "output": " starts with a space"},
    {"instruction": "has </s> inside and <s> too", "input": " x </s>y", "output": "a</s> b <s>c <unk> d"},
    {"instruction": "empty output", "input": "", "output": ""},
    {"instruction": "中文指令：请回答。", "input": "输入 文本\n", "output": "曹操。他说过这句话。"},
    {"instruction": "", "input": "only input", "output": "x"},
    {"instruction": "  spaces  ", "input": "\t", "output": "\n\n"},
    {"instruction": "</s>", "input": "", "output": "</s>"},
    {"instruction": "braces {instruction} {0}", "input": None, "output": "emoji 🙂 and é"},
    {"instruction": "no input key", "output": "ok"},
]


# ---------------------------------------------------------------------------------------------
# An independent reconstruction of what the authors' build_dataset.py produced with
# transformers 4.30's slow LlamaTokenizer.from_pretrained (checked against 4.30.2 itself):
# the text is cut at every special token (<s>, </s>, <unk>) and each piece in between goes
# through SentencePiece on its own, dummy prefix included. Whitespace next to a special token is
# kept: the LLaMA-2 / Chinese-LLaMA-2 tokenizer files declare them AddedToken(lstrip=False,
# rstrip=False).

def reference_llama_tokenizer_430(sp, text, add_bos):
    specials = {"<s>": sp.bos_id(), "</s>": sp.eos_id(), "<unk>": sp.unk_id()}
    ids = [sp.bos_id()] if add_bos else []
    while text:
        hits = [(text.find(s), s) for s in specials if s in text]
        if not hits:
            ids += sp.encode(text)
            break
        at, special = min(hits)
        if at:
            ids += sp.encode(text[:at])
        ids.append(specials[special])
        text = text[at + len(special):]
    return ids


def reference_build_dataset(sp, example, max_len):
    instruction = example["instruction"]
    if example.get("input") is not None and example.get("input") != "":
        instruction = instruction + "\n" + example["input"]
    s = reference_llama_tokenizer_430(sp, "{instruction}</s>".format_map({"instruction": instruction}), True)
    t = reference_llama_tokenizer_430(sp, example["output"] + "</s>", False)
    return (s + t)[:max_len], ([-100] * len(s) + t)[:max_len]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(LLAMA2)


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(LLAMA2))


@pytest.fixture(scope="module")
def official():
    with open(OFFICIAL, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Tokenizer

@needs_fixtures
def test_sentencepiece_tokenizer_ids_follow_the_model(tok, sp):
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id) == ("sentencepiece", sp.get_piece_size(),
                                                                  sp.bos_id(), sp.eos_id())
    assert 0 <= tok.pad_id < tok.vocab_size and tok.pad_id not in (tok.bos_id, tok.eos_id)
    text = "Hello world\n  中文 🙂"
    assert tok.encode(text) == sp.encode(text)
    assert tok.encode(text, bos=True, eos=True) == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert tok.decode(torch.tensor(tok.encode(text))) == text  # a model's output tensor decodes as its list does


@needs_fixtures
def test_raw_encode_keeps_special_text_as_text_and_special_encode_does_not(tok):
    assert tok.eos_id not in tok.encode("a</s>b")
    assert tok.encode("a</s>b", special=True) == tok.encode("a") + [tok.eos_id] + tok.encode("b")
    assert tok.decode(tok.encode("a</s>b")) == "a</s>b"
    unk = tok.sp.unk_id()  # transformers' slow LlamaTokenizer never splits any of its special tokens, <unk> too
    assert tok.encode("a<unk>b", special=True) == tok.encode("a") + [unk] + tok.encode("b") and unk not in tok.encode(
        "a<unk>b")


def test_tokenizer_reports_missing_and_unreadable_files(tmp_path):
    with pytest.raises(UserError, match=rf"^tokenizer file {re.escape(str(tmp_path / 'nope.model'))} not found; pass "
                                        "the tokenizer.model of your checkpoint$"):  # the fix too, not the fault alone
        Tokenizer(tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(UserError, match="neither a SentencePiece model .* nor a tiktoken"):
        Tokenizer(junk)
    # like "<base64 token> <rank>", but not that: not tiktoken ("==" is padding, no token)
    for first in ("aGk= 5 extra", "aGk= five", "aGk=! 5", "== 5"):
        junk.write_text(first + "\n")
        with pytest.raises(UserError, match="neither a SentencePiece model .* nor a tiktoken"):
            Tokenizer(junk)


def write_tiktoken_file(path, extra_tokens=()):
    """A tiny LLaMA-3-format tokenizer.model: the 256 bytes, a few merges, then extra tokens."""
    tokens = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor",
                                                 b"ld", b" world"] + list(extra_tokens)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return len(tokens)


def test_tiktoken_file_is_detected_and_encodes_with_llama3_specials(tmp_path):
    pytest.importorskip("tiktoken")
    n = write_tiktoken_file(tmp_path / "tokenizer.model")
    tok = Tokenizer(tmp_path / "tokenizer.model")
    assert tok.kind == "tiktoken" and tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id) == (n, n + 1)  # <|begin_of_text|>, <|end_of_text|> follow the ranks
    assert tok.encode("hello world") == [n - 6, n - 1]
    assert tok.eos_id not in tok.encode("<|end_of_text|>")  # plain text stays text
    assert tok.encode("hi<|end_of_text|>", special=True) == tok.encode("hi") + [tok.eos_id]
    text = "héllo wörld 🙂\n\t</s>"
    assert tok.decode(tok.encode(text, bos=True)) == "<|begin_of_text|>" + text
    ids, labels = encode_example(tok, {"instruction": "hello", "input": "", "output": "world"})
    prompt = ids[:labels.count(-100)]
    # the record format's "</s>" ends the prompt as the EOS id, as with a tokenizer.json of the same model
    assert prompt == [tok.bos_id] + tok.encode("hello") + [tok.eos_id] and ids[-1] == tok.eos_id
    assert tok.encode("a</s>b", special=True) == tok.encode("a") + [tok.eos_id] + tok.encode("b")
    assert tok.eos_id not in tok.encode("a</s>b")  # plain text stays text


def test_tiktoken_specials_are_numbered_as_in_metas_llama3_tokenizer(tmp_path):
    """Meta's tokenizer.py numbers its 256 specials after the ranks in this order: a chat template's header and
    end-of-turn tokens must get the ids the base was trained on."""
    pytest.importorskip("tiktoken")
    n = write_tiktoken_file(tmp_path / "tokenizer.model")
    tok = Tokenizer(tmp_path / "tokenizer.model")
    metas = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    metas += [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
    assert len(metas) == 256
    for i, special in enumerate(metas):
        assert tok.encode(special, special=True) == [n + i], special
        assert tok.decode([n + i]) == special


def test_decode_gives_ids_past_the_vocabulary_no_text_with_every_tokenizer_kind(tmp_path, tiny_spm):
    """A base may pad its embedding past its tokenizer's vocabulary, and generation draw those ids: SentencePiece and
    tiktoken raised on them (IndexError, KeyError); they have no text, as Hugging Face tokenizers' decode gives."""
    pytest.importorskip("tiktoken")
    write_tiktoken_file(tmp_path / "tokenizer.model")
    folder = hf_tokenizer_folder(tmp_path / "hf")
    for tok in (Tokenizer(tmp_path / "tokenizer.model"), Tokenizer(tiny_spm), Tokenizer(folder)):
        ids = tok.encode("hello world")
        assert tok.decode([tok.vocab_size + 3] + ids + [tok.vocab_size, tok.vocab_size + 1000]) == tok.decode(ids)


def test_a_base_vocabulary_is_taken_from_the_tokenizers_own_size_up_to_its_padding(tiny_spm):
    """A base trained with this tokenizer has as many embedding rows as it has tokens, or up to VOCAB_PADDING - 1 more
    (rounded up); fewer rows, or VOCAB_PADDING more, is another tokenizer's base, refused in one sentence."""
    tok = Tokenizer(tiny_spm)
    n, pad = tok.vocab_size, tokenizer.VOCAB_PADDING
    for rows in (n - 1, n, n + 1, n + pad - 1, n + pad, n + 5 * pad):
        if n <= rows < n + pad:  # the bound, written out
            tok.check_base_vocabulary(rows)
        else:
            with pytest.raises(UserError, match=rf"^the tokenizer has {n:,} tokens but the base model {rows:,}, so "
                                                r"it is not the tokenizer the base model was trained with: pass that"):
                tok.check_base_vocabulary(rows)


def test_decode_gives_negative_ids_no_text_with_every_tokenizer_kind(tmp_path, tiny_spm):
    """An id below 0 (the -100 of ignored labels, a padding -1) has no text either, with every kind alike: the
    tokenizers package raised OverflowError on it, where SentencePiece's and tiktoken's ids were filtered."""
    pytest.importorskip("tiktoken")
    write_tiktoken_file(tmp_path / "tokenizer.model")
    folder = hf_tokenizer_folder(tmp_path / "hf")
    for tok in (Tokenizer(tmp_path / "tokenizer.model"), Tokenizer(tiny_spm), Tokenizer(folder)):
        ids = tok.encode("hello world")
        assert tok.decode([-1] + ids + [-100, -tok.vocab_size, tok.vocab_size]) == tok.decode(ids), tok.kind
        assert tok.decode(torch.tensor([-1, *ids])) == tok.decode(ids), tok.kind


def test_a_sentencepiece_vocab_text_file_is_not_taken_for_a_tiktoken_file(tmp_path):
    """SentencePiece's tokenizer.vocab, beside its tokenizer.model, has lines of two fields and a number too ("<unk>",
    a tab, "0"): only a base64 first field makes a tiktoken line."""
    (tmp_path / "tokenizer.vocab").write_text("<unk>\t0\n<s>\t0\n</s>\t0\n\u2581the\t-3.1\n", encoding="utf-8")
    write_tiktoken_file(tmp_path / "tokenizer.model")
    assert not tokenizer._looks_like_tiktoken(str(tmp_path / "tokenizer.vocab"))
    assert tokenizer._looks_like_tiktoken(str(tmp_path / "tokenizer.model"))


def test_tiktoken_file_without_the_package_names_pip_install(tmp_path, monkeypatch):
    write_tiktoken_file(tmp_path / "tokenizer.model")
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes `import tiktoken` fail
    with pytest.raises(UserError, match="pip install tiktoken"):
        Tokenizer(tmp_path / "tokenizer.model")


# ---------------------------------------------------------------------------------------------
# The authors' record format

@needs_fixtures
def test_official_records_match_the_reconstruction_of_transformers_430(tok, sp, official):
    assert len(official) == 132
    for i, example in enumerate(official + EDGE_CASES):
        for max_len in (1024, 10**6):
            assert encode_example(tok, example, max_len) == reference_build_dataset(sp, example, max_len), i


@needs_fixtures
def test_prompt_is_masked_and_truncation_is_a_prefix(tok, official):
    for example in official[:40] + EDGE_CASES:
        full_ids, full_labels = encode_example(tok, example, 10**6)
        n_prompt = full_labels.count(-100)
        assert full_ids[0] == tok.bos_id and full_ids[n_prompt - 1] == tok.eos_id and full_ids[-1] == tok.eos_id
        assert full_labels[:n_prompt] == [-100] * n_prompt and full_labels[n_prompt:] == full_ids[n_prompt:]
        for max_len in (1, 7, n_prompt, n_prompt + 1, len(full_ids) - 1):
            ids, labels = encode_example(tok, example, max_len)
            assert ids == full_ids[:max_len] and labels == full_labels[:max_len]


@needs_fixtures
def test_a_record_is_cut_at_the_authors_max_seq_length_of_1024_by_default_in_encode_example_and_prepare(tok):
    """build_dataset.py's max_seq_length defaults to 1024: a longer record is cut there unless max_len says otherwise,
    by encode_example and by prepare (whose command line takes prepare's default: tested below)."""
    example = {"instruction": "Repeat the word.", "input": "", "output": " ".join(["word"] * 1500)}
    full_ids, full_labels = encode_example(tok, example, 10**6)
    assert len(full_ids) > 1024
    assert encode_example(tok, example) == (full_ids[:1024], full_labels[:1024])
    assert inspect.signature(prepare).parameters["max_len"].default == 1024


@needs_fixtures
def test_encode_prompt_is_the_masked_part_of_the_training_example(tok, official):
    for example in official[:20] + EDGE_CASES:
        ids, labels = encode_example(tok, example, 10**6)
        assert data.encode_prompt(tok, example) == ids[:labels.count(-100)]
    assert data.encode_prompt(tok, {"instruction": "q", "input": "x"}) == tok.encode("q\nx</s>", bos=True, special=True)


@needs_fixtures
def test_text_record_is_a_document_trained_on_after_bos_with_special_strings_as_ids(tok):
    first, second = "A plain document.", "\n\nIts second piece."
    ids, labels = encode_example(tok, {"text": first + "</s>" + second})
    # as in a pretraining stream: BOS, the pieces, the literal </s> turned into EOS, a closing EOS
    expected = [tok.bos_id] + tok.encode(first) + [tok.eos_id] + tok.encode(second) + [tok.eos_id]
    assert ids == expected and labels == [-100] + ids[1:]
    plain, _ = encode_example(tok, {"text": first})
    assert plain == tok.encode(first, bos=True, eos=True)


@needs_fixtures
@pytest.mark.parametrize("example, message", [
    ({"instruction": "x", "input": ""}, 'record has no "output"'),
    ({"input": "", "output": "y"}, 'record has no "instruction"'),
    ({"instruction": 5, "input": "", "output": "y"}, '"instruction" is a number, not a string'),
    ({"instruction": "x", "input": ["a"], "output": "y"}, '"input" is a list, not a string'),
    ({"instruction": "x", "input": "", "output": None}, '"output" is null, not a string'),
    (["x", "", "y"], "record is a list, not an object"),
    ({"text": "x", "output": "y"}, 'record has no "instruction"'),  # an answer given: not a plain document
])
def test_bad_records_are_named_with_the_fix(tok, example, message):
    with pytest.raises(UserError, match=message + ".*each record must be an object"):
        encode_example(tok, example)


# ---------------------------------------------------------------------------------------------
# prepare

def shard_records(out, split="train"):
    ds = TokenDataset(out, split)
    return [(ds[i][0].tolist(), ds[i][1]) for i in range(len(ds))]


@needs_fixtures
def test_prepare_round_trip_decodes_back_to_the_records(tmp_path, tok, official):
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n\n" for e in EDGE_CASES), encoding="utf-8")
    summary = prepare([OFFICIAL, jsonl], LLAMA2, tmp_path / "out", max_len=10**6, workers=1)
    records = official + EDGE_CASES
    got = shard_records(tmp_path / "out")
    assert len(got) == len(records) and summary["dtype"] == "uint16"
    assert TokenDataset(tmp_path / "out").tokens.dtype == np.uint16
    assert [f["records"] for f in summary["files"]] == [132, len(EDGE_CASES)]
    # summary.json holds what a reader needs to use the shards: the tokenizer's ids, and its hash that train.py
    # compares with the tokenizer it is given
    assert TokenDataset(tmp_path / "out").summary == json.loads(json.dumps(summary))
    assert (summary["vocab_size"], summary["bos_id"], summary["eos_id"], summary["pad_id"]) == (
        tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
    assert summary["tokenizer"]["sha256"] == hashlib.sha256(Path(LLAMA2).read_bytes()).hexdigest()
    assert summary["splits"]["val"]["records"] == 0 and summary["truncated"] == summary["dropped_no_answer"] == 0
    assert summary["splits"]["train"]["tokens"] == sum(f["tokens"] for f in summary["files"]) \
        == sum(len(ids) for ids, _ in got)
    for example, (ids, prompt_len) in zip(records, got):
        want_ids, want_labels = encode_example(tok, example, 10**6)
        assert ids == want_ids and prompt_len == want_labels.count(-100)
        if not any(s in json.dumps(example) for s in ("<s>", "</s>", "<unk>")):
            prompt = example["instruction"] + ("\n" + example["input"] if example.get("input") else "")
            assert tok.decode(ids[:prompt_len]) == prompt and tok.decode(ids[prompt_len:]) == example["output"]


@needs_fixtures
def test_prepare_counts_truncated_records_and_drops_those_without_answer(tmp_path, tok, official):
    max_len = 96
    summary = prepare([OFFICIAL], LLAMA2, tmp_path / "out", max_len=max_len, workers=1)
    full = [encode_example(tok, e, 10**6) for e in official]
    truncated = sum(len(ids) > max_len for ids, _ in full)
    no_answer = [labels.count(-100) >= max_len for _, labels in full]
    assert 0 < sum(no_answer) < truncated  # the fixture exercises both cases
    assert (summary["truncated"], summary["dropped_no_answer"]) == (truncated, sum(no_answer))
    assert summary["files"][0]["kept"] == summary["splits"]["train"]["records"] == 132 - sum(no_answer)
    kept = [encode_example(tok, e, max_len) for e, lost in zip(official, no_answer) if not lost]
    assert shard_records(tmp_path / "out") == [(ids, labels.count(-100)) for ids, labels in kept]


@needs_fixtures
def test_prepare_is_byte_identical_across_runs_and_worker_counts(tmp_path):
    args = dict(max_len=128, val_fraction=0.25, seed=3)
    prepare([OFFICIAL], LLAMA2, tmp_path / "a", workers=1, **args)
    prepare([OFFICIAL], LLAMA2, tmp_path / "b", workers=2, **args)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and "val.tokens.bin" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@needs_fixtures
def test_val_split_partitions_the_kept_records_by_seed(tmp_path):
    prepare([OFFICIAL], LLAMA2, tmp_path / "all", workers=1)
    kept = shard_records(tmp_path / "all")
    splits = {}
    for seed in (0, 1):
        summary = prepare([OFFICIAL], LLAMA2, tmp_path / f"s{seed}", val_fraction=0.3, seed=seed, workers=1)
        train, val = shard_records(tmp_path / f"s{seed}"), shard_records(tmp_path / f"s{seed}", "val")
        assert 0 < len(val) < len(kept) and summary["splits"]["val"]["records"] == len(val)
        merged = iter(sorted([(kept.index(r), r) for r in train + val]))
        assert [r for _, r in merged] == kept  # disjoint, complete, in input order within each split
        splits[seed] = val
    assert splits[0] != splits[1]


def test_streamed_json_list_parser_agrees_with_json_load(tmp_path, monkeypatch):
    records = [{"instruction": f"q{i} " + "x" * (i % 7), "input": "\n" * (i % 3), "output": "é" * i}
               for i in range(50)] + [{"instruction": "[1, 2] } { \"", "input": "", "output": "]"}]
    path = tmp_path / "list.json"
    path.write_text("\ufeff \n" + json.dumps(records, ensure_ascii=False, indent=2) + "\n\n", encoding="utf-8")
    for read in (1, 5, 64, 1 << 20):  # tiny reads put record boundaries everywhere
        monkeypatch.setattr(data, "_READ", read)
        assert [r for _, r in data._iter_json_list(path)] == records
    path.write_text("[]")
    assert list(data._iter_json_list(path)) == []


@pytest.mark.parametrize("number", ["-{digits}.5e3", "{digits}e-3", "{digits}E+2", "{digits}.0", "{digits}",
                                    "-{digits}", "{digits}.", "1.{digits}"])
def test_a_number_of_thousands_of_digits_reads_as_json_reads_the_file_wherever_the_reads_cut_it(tmp_path, monkeypatch,
                                                                                                  number):
    """A float literal of more digits than Python converts to an integer is a float to json (inf): cut by the end of a
    read after those digits, it was an integer too long to read, refused; whole, it read as inf."""
    limit = sys.get_int_max_str_digits()
    literal = number.format(digits="7" * (limit + 3))
    text = '[{"x": ' + literal + ', "y": "z"},\n{"x": ' + literal + "}]"
    path = tmp_path / "numbers.json"
    path.write_text(text)
    try:
        expected = json.loads(text)
    except ValueError:  # an integer too long: refused in one sentence, whatever the reads
        expected = None
    start = text.index(literal)
    for read in [*range(start + limit - 3, start + len(literal) + 3), 2 * start + limit, 1 << 20]:
        monkeypatch.setattr(data, "_READ", read)  # the first read ends at `read`, in, or after, the first number
        if expected is None:
            with pytest.raises(UserError, match=f"numbers.json line 1: record 0 holds a number of more than {limit:,}"):
                list(data._iter_json_list(path))
        else:
            assert [r for _, r in data._iter_json_list(path)] == expected, read


def test_an_integer_too_long_to_read_in_a_json_list_is_named_without_reading_the_rest_of_the_file(tmp_path):
    """A whole integer too long to read cannot be made readable by the text after it: the file's first fault is named,
    and not a later one in text read on for nothing (the rest of a file of millions of records)."""
    limit = sys.get_int_max_str_digits()
    path = tmp_path / "numbers.json"
    path.write_bytes(b'[{"x": ' + b"7" * (limit + 1) + b"},\n" + (GOOD.encode() + b",\n") * 40_000 + b'"\xff"]')
    with pytest.raises(UserError, match=f"numbers.json line 1: record 0 holds a number of more than {limit:,}"):
        list(data._iter_json_list(path))


@pytest.fixture(scope="module")
def tiny_spm(tmp_path_factory):
    """A SentencePiece model trained in a second, so the error tests need no fixtures."""
    return train_spm(tmp_path_factory.mktemp("tiny"), "tiny")


def train_spm(folder, name, **options):
    """folder/name.model: a 300-piece SentencePiece model of a small corpus, LLaMA-2's special ids (unk 0, bos 1,
    eos 2) unless options say otherwise (other piece names, a pad piece)."""
    corpus = folder / f"{name}.txt"
    corpus.write_text("".join(f"the quick brown fox {i} jumps over the lazy dog\n" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / name), vocab_size=300,
                                   **{"unk_id": 0, "bos_id": 1, "eos_id": 2, **options}, byte_fallback=True,
                                   minloglevel=2)
    return folder / f"{name}.model"


GOOD = '{"instruction": "a", "input": "", "output": "b"}'
DEEP = '{"instruction": "a", "output": ' + "[" * 100_000 + "]" * 100_000 + "}"  # deeper than JSON parsers recurse
HUGE = '{"instruction": "a", "output": "b", "id": ' + "9" * 5000 + "}"  # more digits than Python turns into an int


def test_prepare_runs_with_stderr_closed(tmp_path, tiny_spm, monkeypatch):
    """`python data.py prepare ... 2>&-` (a cron job, a daemon's child) starts with sys.stderr None, and the progress
    bar, left to tqdm to show or not, wrote to it: prepare ended in an AttributeError (exit code 1, no message)."""
    (tmp_path / "r.jsonl").write_text(GOOD + "\n")
    monkeypatch.setattr(sys, "stderr", None)
    summary = prepare([tmp_path / "r.jsonl"], tiny_spm, tmp_path / "out", workers=1)
    assert summary["splits"]["train"]["records"] == 1 and (tmp_path / "out" / "summary.json").is_file()


@pytest.mark.parametrize("name, content, message", [
    ("missing.json", None, "input file .*missing.json not found"),
    ("bad.jsonl", f"{GOOD}\n\n{{\"instruction\": \"a\",\n", r"bad.jsonl line 3: not valid JSON"),
    ("bad.json", f"[\n{GOOD},\n{GOOD},\n{{\"instruction\" \"a\"}}\n]", r"bad.json line 4: record 2 is not valid JSON"),
    ("comma.json", f"[{GOOD} {GOOD}]", r"expected ',' or '\]' after record 0"),
    ("tail.json", f"[{GOOD}] [", r"unexpected text after the closing"),
    ("lists.jsonl", f"[{GOOD}]\n[{GOOD}]\n",  # was called "a .json data file"
     r"lists.jsonl line 2: unexpected text after the closing '\]'; a data file that starts with '\[' must be a valid "
     r"JSON list of records \(or use JSONL, one record per line\)"),
    ("cut.json", f"[{GOOD}, {GOOD[:20]}", r"cut.json line 1: record 1 is not valid JSON"),
    ("nooutput.jsonl", f'{GOOD}\n{{"instruction": "a", "input": ""}}\n', r'nooutput.jsonl line 2 has no "output"'),
    ("nooutput.json", f'[{GOOD}, {{"instruction": "a", "input": ""}}]', r'nooutput.json record 1 has no "output"'),
    ("number.jsonl", '{"instruction": 1, "input": "", "output": "b"}\n', r'line 1: "instruction" is a number'),
    ("string.json", '"hello"', r"string.json starts with .*JSON list of records or JSONL"),
    ("empty.json", "  \n", r"empty.json is empty"),
    ("list.jsonl", f'{GOOD}\n["a", "b"]\n', r"list.jsonl line 2 is a list, not an object"),
    ("strings.json", '["a", "b"]', r"strings.json record 0 is a string, not an object"),
    ("latin1.jsonl", b'{"instruction": "caf\xe9", "input": "", "output": "b"}\n', r"latin1.jsonl line 1: not UTF-8"),
    ("latin1.json", b'[{"instruction": "caf\xe9", "input": "", "output": "b"}]', r"latin1.json is not UTF-8"),
    ("surrogate.jsonl", b'{"instruction": "\\ud800", "output": "b"}\n',
     r'line 1: "instruction" holds a lone surrogate'),
    ("deep.jsonl", f"{GOOD}\n{DEEP}\n", r"deep.jsonl line 2 is nested too deeply"),
    ("deep.json", f"[{GOOD},\n{DEEP}]", r"deep.json line 2: record 1 is nested too deeply"),
    ("utf16.jsonl", f"{GOOD}\n".encode("utf-16"), r"utf16.jsonl is UTF-16 text, not UTF-8; save it as UTF-8"),
    ("utf16le.jsonl", f"{GOOD}\n".encode("utf-16-le"), r"utf16le.jsonl is UTF-16 text"),
    ("utf16be.jsonl", f"{GOOD}\n".encode("utf-16-be"), r"utf16be.jsonl is UTF-16 text"),
    ("object.json", f'{{"data": [{GOOD}]}}',
     r'object.json line 1 is one JSON object holding a list of records \(under "data"\)'),
    ("pretty.json", f'{{\n "data": [{GOOD}]\n}}\n', r"pretty.json holds one JSON object spread over lines, not a list"),
    ("fields.jsonl", '{"instruction": "a", "tags": ["x"], "history": [], "meta": {"k": 1}, "n": 3}\n',  # lists,
     r'fields.jsonl line 1 has no "output"'),  # but none of records: a record lacking a field, not a wrapper of records
    ("huge.jsonl", f'{GOOD}\n{HUGE}\n', r"huge.jsonl line 2 holds a number of more than [\d,]+ digits, too long"),
    ("huge.json", f"[{GOOD},\n{HUGE}]", r"huge.json line 2: record 1 holds a number of more than [\d,]+ digits"),
])
def test_malformed_input_stops_with_file_place_and_fix_and_leaves_nothing(tmp_path, tiny_spm, name, content, message):
    tokenizer = tiny_spm
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        prepare([path], tokenizer, out, workers=1)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_error_deep_in_a_file_with_workers_leaves_no_output(tmp_path, tiny_spm):
    tokenizer = tiny_spm
    path = tmp_path / "long.jsonl"
    path.write_text(f"{GOOD}\n" * 3000 + '{"instruction": "a"}\n' + f"{GOOD}\n" * 10)
    with pytest.raises(UserError, match=r'long.jsonl line 3001 has no "output"'):
        prepare([path], tokenizer, tmp_path / "out", workers=2)
    assert os.listdir(tmp_path) == ["long.jsonl"]


def test_command_line_error_is_one_sentence_without_traceback(tmp_path, tiny_spm):
    tokenizer = tiny_spm
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "data.py"),
                             "prepare", "--input", str(tmp_path / "x.json"),
                             "--tokenizer", str(tokenizer), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "x.json not found" in result.stderr


def test_prepare_replaces_its_own_output_but_not_a_foreign_directory(tmp_path, tiny_spm):
    tokenizer = tiny_spm
    path = tmp_path / "d.jsonl"
    path.write_text(f"{GOOD}\n" * 3)
    prepare([path], tokenizer, tmp_path / "out", workers=1)
    path.write_text(f"{GOOD}\n" * 5)
    assert prepare([path], tokenizer, tmp_path / "out", workers=1)["records"] == 5
    assert len(TokenDataset(tmp_path / "out")) == 5
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not the output of a previous prepare"):
        prepare([path], tokenizer, tmp_path / "mine", workers=1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


HERE = Path(__file__).resolve().parent
LONG = json.dumps({"instruction": "the quick brown fox jumps over the lazy dog " * 3, "input": "", "output": "b"})


def write_records(path, n, long=0):
    path.write_text(f"{GOOD}\n" * n + f"{LONG}\n" * long)
    return path


def dead_pid():
    """The id of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def leftovers(folder):
    return sorted(p for p in os.listdir(folder) if ".tmp" in p)


@pytest.mark.parametrize("case", ["other file", "other folder", "input inside", "input deeper", "tokenizer inside",
                                  "out is a file"])
def test_prepare_refuses_an_out_holding_what_it_did_not_write_and_loses_nothing(tmp_path, tiny_spm, case):
    out = tmp_path / "out"
    source = write_records(tmp_path / "d.jsonl", 3)
    prepare([source], tiny_spm, out, workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    inputs, tokenizer, named = [source], tiny_spm, None
    if case == "other file":
        named = out / "notes.txt"
    elif case == "other folder":
        named = out / "runs" / "log.txt"
    elif case in ("input inside", "input deeper"):
        named = out / ("d.jsonl" if case == "input inside" else "raw/d.jsonl")
        inputs = [named]
    elif case == "tokenizer inside":
        named = tokenizer = out / "tokenizer.model"
    if named:
        named.parent.mkdir(exist_ok=True)
        named.write_bytes(tiny_spm.read_bytes() if case == "tokenizer inside" else source.read_bytes())
    else:
        out = tmp_path / "out.file"
        out.write_text("keep me")
        named = out
    content = named.read_bytes()
    with pytest.raises(UserError) as failure:
        prepare(inputs, tokenizer, out, workers=1)
    message = str(failure.value)
    want = {"other file": "notes.txt", "other folder": "runs", "out is a file": "is a file"}.get(case, str(named))
    assert want in message and str(out) in message and "\n" not in message
    if case in ("other file", "other folder"):  # the output is prepare's: the fix is to move the user's files out
        assert "beside a previous prepare's output; move them out" in message, message
    assert named.read_bytes() == content  # the user's file is untouched
    if case != "out is a file":
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
        assert len(TokenDataset(out)) == 3  # the previous output is intact
    assert leftovers(tmp_path) == []


def test_prepare_refuses_an_out_where_a_link_has_the_name_of_one_of_its_files_and_keeps_the_link(tmp_path, tiny_spm):
    """A link named like prepare's files is the user's, not prepare's: refused, not replaced by a shard."""
    out, mine = tmp_path / "out", tmp_path / "mine.bin"
    prepare([write_records(tmp_path / "d.jsonl", 3)], tiny_spm, out, workers=1)
    mine.write_text("keep me")
    (out / "train.tokens.bin").unlink()
    (out / "train.tokens.bin").symlink_to(mine)
    with pytest.raises(UserError, match=r"holds files that prepare did not write \(train.tokens.bin\)"):
        prepare([tmp_path / "d.jsonl"], tiny_spm, out, workers=1)
    assert (out / "train.tokens.bin").is_symlink() and mine.read_text() == "keep me" and leftovers(tmp_path) == []


def test_prepare_stopped_by_ctrl_c_leaves_no_temporary_folder(tmp_path, tiny_spm, monkeypatch):
    """A Ctrl-C once the shards are written (minutes into the CME's records) removes them like any failure does:
    no out folder, and no OUT.tmp-PID of half-written gigabytes left for the user to find."""
    real = data._write_shards

    def written_then_interrupted(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "_write_shards", written_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([write_records(tmp_path / "d.jsonl", 3)], tiny_spm, tmp_path / "out", workers=1)
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ['{"my": 1}', "notes", '{"format": "mine"}'])
def test_prepare_refuses_an_out_whose_summary_json_is_a_users_and_keeps_it(tmp_path, tiny_spm, content):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.json").write_text(content)
    with pytest.raises(UserError, match=f"{out} exists and is not the output of a previous prepare .*summary.json"):
        prepare([write_records(tmp_path / "d.jsonl", 3)], tiny_spm, out, workers=1)
    assert os.listdir(out) == ["summary.json"] and (out / "summary.json").read_text() == content
    assert leftovers(tmp_path) == []


def test_prepare_replaces_only_its_files_and_a_half_replaced_output_never_looks_complete(tmp_path, tiny_spm,
                                                                                        monkeypatch):
    out = tmp_path / "out"
    source = write_records(tmp_path / "d.jsonl", 3)
    prepare([source], tiny_spm, out, workers=1)
    inode = out.stat().st_ino
    write_records(source, 5)
    replace, moved = os.replace, []

    def fail_on_the_third(src, dst):
        moved.append(os.path.basename(dst))
        if len(moved) == 3:
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_the_third)
    with pytest.raises(OSError, match="No space left"):
        prepare([source], tiny_spm, out, workers=1)
    monkeypatch.setattr(os, "replace", replace)
    assert not (out / "summary.json").exists() and leftovers(tmp_path) == []
    with pytest.raises(UserError, match="has no summary.json"):
        TokenDataset(out)
    assert prepare([source], tiny_spm, out, workers=1)["records"] == 5  # a half-replaced output is prepare's own
    assert sorted(os.listdir(out)) == sorted(data.PREPARE_FILES) and out.stat().st_ino == inode
    assert len(TokenDataset(out)) == 5 and leftovers(tmp_path) == []
    write_records(source, 4)
    assert prepare([source], tiny_spm, out, workers=1)["records"] == 4 and len(TokenDataset(out)) == 4


def test_prepare_puts_summary_json_in_place_only_once_the_shards_are_on_disk(tmp_path, tiny_spm, monkeypatch):
    """summary.json says an output is complete (to TokenDataset, and to a later prepare, which replaces it): a power
    cut must not leave it beside shards whose bytes or names never reached the disk. Each file's bytes and their
    folder's names are flushed (fsync) before summary.json comes into --out, a new one or an earlier prepare's
    (whose old summary.json is gone for good before any shard is replaced), and --out's new names after it."""
    out, source = tmp_path / "out", write_records(tmp_path / "d.jsonl", 3)
    fsync, moves = os.fsync, {"rename": os.rename, "replace": os.replace, "remove": os.remove}
    events = []  # ("fsync", inode) | ("rename" / "replace", inode, its folder's inode, destination) | ("remove", path)

    def record_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return fsync(fd)

    def recorder(op):
        def move(src, dst=None):
            if dst is None:
                events.append((op, str(src)))
                return moves[op](src)
            events.append((op, os.stat(src).st_ino, os.stat(os.path.dirname(src)).st_ino, str(dst)))
            return moves[op](src, dst)
        return move
    monkeypatch.setattr(os, "fsync", record_fsync)
    for op in moves:
        monkeypatch.setattr(os, op, recorder(op))
    for earlier in (False, True):
        events.clear()
        prepare([source], tiny_spm, out, workers=1)
        files = {name: (out / name).stat().st_ino for name in data.PREPARE_FILES}
        synced = [n for n, e in enumerate(events) if e[0] == "fsync"]
        targets = {str(out)} | {str(out / name) for name in data.PREPARE_FILES}
        into = [n for n, e in enumerate(events) if e[0] in ("rename", "replace") and e[3] in targets]
        shown = next(n for n in into if events[n][3] in (str(out), str(out / "summary.json")))
        tmp = events[shown][2] if earlier else events[shown][1]  # OUT.tmp-PID, where the files were written
        assert {events[n][1] for n in synced if n < shown} >= set(files.values()) | {tmp}, earlier
        assert (events[shown][0] == "replace") == earlier  # an earlier output: its files replaced one by one
        if earlier:
            gone = events.index(("remove", str(out / "summary.json")))
            assert gone < min(into) and any(gone < n < min(into) and events[n][1] == out.stat().st_ino
                                            for n in synced)
            assert any(max(n for n in into if n != shown) < n < shown and events[n][1] == out.stat().st_ino
                       for n in synced)
        folder = (out if earlier else tmp_path).stat().st_ino  # the folder that holds summary.json's new name
        assert any(n > shown and events[n][1] == folder for n in synced), earlier
    assert len(TokenDataset(out)) == 3 and leftovers(tmp_path) == []


def another_filesystem(monkeypatch, disk):
    """disk (a folder) behaves as the root of a filesystem of its own: a rename into or out of it fails as it does
    across filesystems, and it is a mount point."""
    inside = lambda p: data.inside(p, disk)
    real = {name: getattr(os, name) for name in ("rename", "replace")}
    ismount = os.path.ismount

    def rename(name, src, dst):
        if inside(src) != inside(dst):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src)
        return real[name](src, dst)
    for name in real:
        monkeypatch.setattr(os, name, lambda src, dst, name=name: rename(name, src, dst))
    monkeypatch.setattr(os.path, "ismount", lambda p: os.path.realpath(p) == os.path.realpath(disk) or ismount(p))


def test_prepare_into_a_link_to_another_filesystem_builds_beside_the_target_and_a_mount_point_is_refused(
        tmp_path, tiny_spm, monkeypatch):
    """Prepare builds its output beside --out and renames it in, and a rename can not cross filesystems: through a
    link (data/cme -> a larger disk) it builds beside the link's target, where it once failed each time, after
    removing the previous output's summary.json; an --out that is a mount point itself is refused before any work."""
    disk, link = tmp_path / "disk", tmp_path / "cme"
    disk.mkdir()
    link.symlink_to(disk / "cme")
    another_filesystem(monkeypatch, disk)
    source = write_records(tmp_path / "d.jsonl", 3)
    assert prepare([source], tiny_spm, link, workers=1)["records"] == 3 and len(TokenDataset(link)) == 3
    write_records(source, 5)
    assert prepare([source], tiny_spm, link, workers=1)["records"] == 5 and len(TokenDataset(link)) == 5
    assert link.is_symlink() and leftovers(tmp_path) == leftovers(disk) == []
    before = {p.name: p.read_bytes() for p in (disk / "cme").iterdir()}
    another_filesystem(monkeypatch, disk / "cme")  # a disk mounted at the folder itself: the link's target
    for out in (disk / "cme", link):
        with pytest.raises(UserError, match=f"^--out {out} is a mount point, and prepare builds its output beside "
                                            f"it, on another filesystem; give a folder inside it, e.g. --out "
                                            f"{out / 'shards'}$"):
            prepare([source], tiny_spm, out, workers=1)
    assert {p.name: p.read_bytes() for p in (disk / "cme").iterdir()} == before


DAMAGE = [
    ("cut half", "train.offsets.bin", r"train.offsets.bin holds 160 bytes where summary.json's 40 train records need "
                                      r"328 \(41 int64 values\); the file is truncated"),
    ("cut 1", "train.tokens.bin", "train.tokens.bin holds"),
    ("cut 1", "train.prompt_lens.bin", "train.prompt_lens.bin holds 156 bytes .* need 160 \\(40 int32 values\\)"),
    ("grow 8", "train.offsets.bin", "train.offsets.bin holds 336 bytes"),
    ("delete", "train.tokens.bin", "train.tokens.bin is missing"),
    ("offsets from 1", "train.offsets.bin", "train.offsets.bin does not hold offsets from 0"),
    ("offsets fall", "train.offsets.bin", "train.offsets.bin does not hold offsets from 0 rising"),
    ("last offset short", "train.offsets.bin", "train.offsets.bin does not hold offsets from 0 rising to the"),
    ("prompt too long", "train.prompt_lens.bin", "train.prompt_lens.bin holds prompt lengths that leave"),
    ("prompt fills a record", "train.prompt_lens.bin", "train.prompt_lens.bin holds prompt lengths that leave"),
    ("not json", "summary.json", "summary.json line 3 is not valid JSON"),
    ("huge number", "summary.json", "summary.json holds a number of more than [\\d,]+ digits, too long to read"),
    ("a list", "summary.json", "summary.json holds a list"),
    ("no splits", "summary.json", 'summary.json has no "splits"'),
    ("no dtype", "summary.json", 'summary.json has no "dtype"'),
    ("bad dtype", "summary.json", 'summary.json has "dtype": \'float32\''),
    ("bad max_len", "summary.json", 'summary.json has "max_len": 1 where an integer >= 2 belongs'),
    ("bad pad_id", "summary.json", 'summary.json has "pad_id": -1 where a token id belongs'),
    ("no counts", "summary.json", 'summary.json gives no record and token counts for the split "train"'),
    ("deep", "summary.json", "summary.json is nested too deeply to read"),
    ("latin-1", "summary.json", "summary.json is not UTF-8 text"),
    ("splits a list", "summary.json", 'summary.json has "splits": \\[\\] where an object belongs'),
    ("pad_id true", "summary.json", 'summary.json has "pad_id": True where a token id belongs'),
    ("records a string", "summary.json", 'summary.json gives no record and token counts for the split "train"'),
    ("records negative", "summary.json", 'summary.json gives no record and token counts for the split "train"'),
]


@pytest.mark.parametrize("damage, file, expected", DAMAGE, ids=[f"{f} {d}" for d, f, _ in DAMAGE])
def test_dataset_checks_every_shard_against_the_summary(tmp_path, tiny_spm, damage, file, expected):
    out = tmp_path / "out"
    prepare([write_records(tmp_path / "d.jsonl", 40)], tiny_spm, out, workers=1)
    path = out / file
    raw = path.read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    if damage == "cut half":  # the issue's case: half the offsets, which used to train half the records
        path.write_bytes(raw[:20 * 8])
    elif damage == "cut 1":
        path.write_bytes(raw[:-4])
    elif damage == "grow 8":
        path.write_bytes(raw + raw[-8:])
    elif damage == "delete":
        path.unlink()
    elif damage == "last offset short":  # the tokens file's size, but records that stop short of its end
        offsets = np.frombuffer(raw, np.int64).copy()
        offsets[-1] -= 1
        path.write_bytes(offsets.tobytes())
    elif damage.startswith("offsets"):
        offsets = np.frombuffer(raw, np.int64).copy()
        offsets[0 if damage == "offsets from 1" else 5] += 1 if damage == "offsets from 1" else 10**4
        path.write_bytes(offsets.tobytes())
    elif damage == "prompt too long":
        lens = np.frombuffer(raw, np.int32).copy()
        lens[7] = 10**4
        path.write_bytes(lens.tobytes())
    elif damage == "prompt fills a record":  # the prompt as long as the record: no answer token left
        lens = np.frombuffer(raw, np.int32).copy()
        lens[7] = np.diff(np.fromfile(out / "train.offsets.bin", np.int64))[7]
        path.write_bytes(lens.tobytes())
    elif damage == "not json":
        path.write_text(raw.decode()[:50])
    elif damage == "huge number":  # json's ValueError, not a JSONDecodeError: it named no file
        path.write_text(HUGE)
    elif damage == "a list":
        path.write_text("[]")
    elif damage.startswith("no ") and damage != "no counts":
        del summary[damage[3:]]
        path.write_text(json.dumps(summary))
    elif damage.startswith("bad "):
        key = damage[4:]
        path.write_text(json.dumps(summary | {key: {"dtype": "float32", "max_len": 1, "pad_id": -1}[key]}))
    elif damage == "no counts":
        path.write_text(json.dumps(summary | {"splits": {"train": {"records": 40}}}))
    elif damage == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif damage == "latin-1":
        path.write_bytes(b'{"note": "caf\xe9"}')
    elif damage in ("splits a list", "pad_id true"):
        path.write_text(json.dumps(summary | ({"splits": []} if damage == "splits a list" else {"pad_id": True})))
    elif damage.startswith("records "):
        counts = summary["splits"]["train"] | {"records": "40" if damage == "records a string" else -1}
        path.write_text(json.dumps(summary | {"splits": summary["splits"] | {"train": counts}}))
    with pytest.raises(UserError, match=expected) as failure:
        TokenDataset(out)
    message = str(failure.value)
    assert str(path) in message and "run prepare again" in message and "\n" not in message
    if file == "summary.json":  # the advice works: prepare keeps a summary.json not its own, a user's for all it knows
        assert f"delete it and run prepare again (python data.py prepare --out {out} ...)" in message
        path.unlink()
        assert prepare([tmp_path / "d.jsonl"], tiny_spm, out, workers=1)["records"] == 40
        TokenDataset(out)


def test_prepare_warns_on_stderr_when_max_len_drops_records_even_when_quiet(tmp_path, tiny_spm, capsys):
    source = write_records(tmp_path / "d.jsonl", 3, long=5)
    summary = prepare([source], tiny_spm, tmp_path / "out", max_len=12, workers=1, quiet=True)
    err = capsys.readouterr().err
    assert summary["dropped_no_answer"] == 5 and len(TokenDataset(tmp_path / "out")) == 3
    assert err.count("\n") == 1 and err.startswith("warning: 5 of 8 records were dropped because max_len 12 cut "
                                                   "their answer away") and "--max_len" in err
    prepare([source], tiny_spm, tmp_path / "all", max_len=1024, workers=1, quiet=True)
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(UserError, match="max_len 3 cut away the answer of all 8 records; raise --max_len"):
        prepare([source], tiny_spm, tmp_path / "none", max_len=3, workers=1)
    assert sorted(os.listdir(tmp_path)) == ["all", "d.jsonl", "out"]
    result = subprocess.run([sys.executable, str(HERE / "data.py"), "prepare", "--input", str(source),
                             "--tokenizer", str(tiny_spm), "--out", str(tmp_path / "cli"), "--max_len", "12"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "warning: 5 of 8 records were dropped" in result.stderr
    one = write_records(tmp_path / "one.jsonl", 3, long=1)  # a single record dropped is warned about too
    prepare([one], tiny_spm, tmp_path / "one", max_len=12, workers=1, quiet=True)
    assert capsys.readouterr().err.startswith("warning: 1 of 4 records was dropped")


@pytest.mark.parametrize("workers", [1, 2])
def test_broken_jsonl_line_is_named_by_file_and_line(tmp_path, tiny_spm, workers):
    path = tmp_path / "broken.jsonl"
    path.write_text(f"{GOOD}\n{GOOD}\n{GOOD[:-5]}\n{GOOD}\n")
    with pytest.raises(UserError, match=f"{path} line 3: not valid JSON"):
        prepare([path], tiny_spm, tmp_path / "out", workers=workers)
    assert os.listdir(tmp_path) == ["broken.jsonl"]


@pytest.mark.parametrize("kind", ["jsonl", "list"])
def test_a_record_giving_a_key_twice_is_named_by_prepare_and_by_read_records_not_read_as_its_last_value(tmp_path,
                                                                                                       tiny_spm, kind):
    """json.loads keeps the last of two values of a key and drops the other unseen: a record that gives
    "instruction" twice is refused, naming the file, the line and the key, by the workers and by every reader."""
    twice = '{"instruction": "a", "input": "", "instruction": "b", "output": "c"}'
    path = tmp_path / f"twice.{'json' if kind == 'list' else 'jsonl'}"
    path.write_text(f"{GOOD}\n{twice}\n" if kind == "jsonl" else f"[{GOOD},\n{twice}]\n")
    where = f"{path} line 2" if kind == "jsonl" else f"{path} line 2: record 1"
    says = f"{where} gives the key 'instruction' twice \\(JSON would keep only the last value\\)"
    for workers in (1, 2):
        with pytest.raises(UserError, match=says):
            prepare([path], tiny_spm, tmp_path / "out", workers=workers)
    with pytest.raises(UserError, match=says):
        list(data.read_records(path))
    if kind == "jsonl":  # evaluation sets are read by read_jsonl
        with pytest.raises(UserError, match=says):
            list(data.read_jsonl(path))
    assert sorted(os.listdir(tmp_path)) == [path.name]


def test_deep_nesting_is_one_sentence_from_worker_processes_and_read_jsonl(tmp_path, tiny_spm):
    path = tmp_path / "deep.jsonl"
    path.write_text(f"{GOOD}\n{GOOD}\n{DEEP}\n")
    with pytest.raises(UserError, match=f"{path} line 3 is nested too deeply"):
        prepare([path], tiny_spm, tmp_path / "out", workers=2)
    with pytest.raises(UserError, match=f"{path} line 3 is nested too deeply"):
        list(data.read_jsonl(path))
    assert os.listdir(tmp_path) == ["deep.jsonl"]


def test_a_tokenizer_that_is_a_named_pipe_is_named_as_one_not_as_missing(tmp_path, tiny_spm):
    with named_pipe(tmp_path / "tokenizer.model", tiny_spm.read_bytes()):
        with pytest.raises(UserError, match=f"tokenizer {tmp_path / 'tokenizer.model'} is a named pipe or a device, "
                                            "not a file; pass the tokenizer.model"):
            Tokenizer(tmp_path / "tokenizer.model")


def test_an_input_folder_is_named_as_a_folder_not_as_missing(tmp_path, tiny_spm):
    (tmp_path / "records").mkdir()
    with pytest.raises(UserError, match=f"input {tmp_path / 'records'} is a folder, not a file; pass the data files"):
        prepare([tmp_path / "records"], tiny_spm, tmp_path / "out", workers=1)


@pytest.mark.parametrize("inside", [True, False])
def test_tokenizer_folder_is_named_with_the_file_to_pass(tmp_path, tiny_spm, inside):
    folder = tmp_path / "llama"
    folder.mkdir()
    if inside:
        (folder / "tokenizer.model").write_bytes(tiny_spm.read_bytes())
    with pytest.raises(UserError, match=f"tokenizer {folder} is a folder, not a file") as failure:
        Tokenizer(folder)
    assert (str(folder / "tokenizer.model") in str(failure.value)) == inside
    result = subprocess.run([sys.executable, str(HERE / "data.py"), "prepare", "--input",
                             str(write_records(tmp_path / "d.jsonl", 2)), "--tokenizer", str(folder),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "is a folder" in result.stderr and not (tmp_path / "out").exists()


KILLED_PREPARE = """import os, signal, sys
import data

data.move_into = lambda tmp, out, names: os.kill(os.getpid(), signal.SIGKILL)  # killed when the shards are written
data.prepare([sys.argv[1]], sys.argv[2], sys.argv[3], workers=1, quiet=True)
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_prepare_removes_what_killed_prepares_left_and_nothing_else(tmp_path, tiny_spm, capsys):
    out = tmp_path / "out"
    source = write_records(tmp_path / "d.jsonl", 3)
    prepare([source], tiny_spm, out, workers=1)
    write_records(source, 6)
    for kill in range(2):
        before = leftovers(tmp_path)
        killed = subprocess.run([sys.executable, "-c", KILLED_PREPARE, str(source), str(tiny_spm), str(out)],
                                cwd=HERE, capture_output=True, text=True)
        assert killed.returncode == -9
        if kill:  # the second prepare removed what the first left
            assert f"removed a leftover temporary folder {tmp_path / before[0]} of a prepare" in killed.stderr
        stale = leftovers(tmp_path)
        assert len(stale) == 1 and stale != before and stale[0].startswith("out.tmp-")
    assert len(TokenDataset(out)) == 3  # the kills came before the move: the old output is whole
    old = tmp_path / f"out.tmp-{dead_pid()}.old"  # an older version's name for the output it swapped out
    old.mkdir()
    (old / "summary.json").write_text(json.dumps({"format": data.FORMAT}))
    kept = {tmp_path / f"out.tmp-{dead_pid()}": "notes.txt",  # not prepare's files: the user's folder
            tmp_path / f"out.tmp-{dead_pid()}": "summary.json",  # not prepare's summary.json ("keep me")
            tmp_path / f"out.tmp-{os.getppid()}": "summary.json",  # a process that runs
            tmp_path / f"out.tmp-{os.getppid()}.old": "train.tokens.bin",  # prepare's own file, of a process that runs
            tmp_path / f"other.tmp-{dead_pid()}": "summary.json"}  # another output's
    for folder, name in kept.items():
        folder.mkdir()
        (folder / name).write_text("keep me")
    capsys.readouterr()
    assert prepare([source], tiny_spm, out, workers=1)["records"] == 6
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 2 and all("removed a leftover temporary folder" in line and "no longer runs" in line
                                 for line in err)
    assert sorted(line.split()[7] for line in err) == sorted(str(tmp_path / n) for n in stale + [old.name])
    assert leftovers(tmp_path) == sorted(f.name for f in kept) and len(TokenDataset(out)) == 6
    assert all((folder / name).read_text() == "keep me" for folder, name in kept.items())


def test_a_file_or_link_named_as_a_killed_prepares_folder_is_left_as_it_is(tmp_path, tiny_spm, capsys):
    """Only a folder of a prepare that no longer runs is removed: a file of that name is not looked into (it has no
    names to list) and a link to a folder of prepare's files is not followed; prepare runs beside both."""
    out, source = tmp_path / "out", write_records(tmp_path / "d.jsonl", 3)
    prepare([source], tiny_spm, out, workers=1)
    file, link = tmp_path / f"out.tmp-{dead_pid()}", tmp_path / f"out.tmp-{dead_pid()}.old"
    file.write_text("keep me")
    if os.name != "nt":
        link.symlink_to(out)  # prepare's own files, through a link
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert prepare([source], tiny_spm, out, workers=1)["records"] == 3
    assert "removed a leftover" not in capsys.readouterr().err
    assert file.read_text() == "keep me" and (os.name == "nt" or link.resolve() == out.resolve())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


KILLED_WRITING_THE_SUMMARY = """import json, os, signal, sys
import data

if sys.argv[4] == "before its bytes":  # killed as the summary becomes text, the shards written
    dumps = json.dumps

    def killed(obj, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == data.FORMAT:
            os.kill(os.getpid(), signal.SIGKILL)
        return dumps(obj, *args, **kwargs)
    json.dumps = killed
else:  # killed halfway through the write of its bytes, under write_atomic's temporary name

    def killed(path, text):
        with open(f"{path}.tmp{os.getpid()}", "w", encoding="utf-8") as f:
            f.write(text[:len(text) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    data.write_atomic = killed
data.prepare([sys.argv[1]], sys.argv[2], sys.argv[3], workers=1, quiet=True)
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
@pytest.mark.parametrize("when", ["before its bytes", "halfway"])
def test_a_prepare_killed_while_it_writes_its_summary_leaves_a_folder_the_next_prepare_removes(tmp_path, tiny_spm,
                                                                                              capsys, when):
    """A kill as summary.json is written (all the shards in OUT.tmp-PID) left that folder for good: its summary.json,
    empty or cut short, is no summary of prepare's and might be a user's, so no later prepare removed the folder, and
    the user was left a copy of every shard (gigabytes for CME) that nothing named. Written under a temporary name
    (files.write_atomic), it is prepare's own to remove."""
    out, source = tmp_path / "out", write_records(tmp_path / "d.jsonl", 3)
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITING_THE_SUMMARY, str(source), str(tiny_spm), str(out),
                             when], cwd=HERE, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith("out.tmp-") and not out.exists()
    assert prepare([source], tiny_spm, out, workers=1)["records"] == 3
    assert f"removed a leftover temporary folder {tmp_path / stale[0]} of a prepare" in capsys.readouterr().err
    assert leftovers(tmp_path) == [] and len(TokenDataset(out)) == 3


def test_a_vocabulary_of_exactly_65536_ids_is_stored_as_uint16(tmp_path):
    """Its ids, 0 to 65535, all fit 16 bits: the shards take half the space of uint32's."""
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(65536)}, unk_token="w0"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    (tmp_path / "t").mkdir()
    hf.save(str(tmp_path / "t" / "tokenizer.json"))
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w65535"}))
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "w7 w65534", "output": "w65533"}) + "\n")
    summary = prepare([tmp_path / "d.jsonl"], tmp_path / "t", tmp_path / "out", workers=1, quiet=True)
    assert summary["vocab_size"] == 65536 and summary["dtype"] == "uint16"
    assert TokenDataset(tmp_path / "out").tokens.tolist()[-2:] == [65533, 65535]


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    pytest.importorskip("tiktoken")
    extra = [i.to_bytes(3, "big") for i in range(1 << 16, (1 << 16) + 70000)]
    write_tiktoken_file(tmp_path / "big.model", extra)
    tok = Tokenizer(tmp_path / "big.model")
    assert tok.vocab_size > 65536 and tok.bos_id > 65535
    path = tmp_path / "d.jsonl"
    examples = [{"instruction": "hello", "input": "world", "output": "hello world"}, {"instruction": "é", "output": ""}]
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    summary = prepare([path], tmp_path / "big.model", tmp_path / "out", workers=1)
    assert summary["dtype"] == "uint32" and TokenDataset(tmp_path / "out").tokens.dtype == np.uint32
    assert shard_records(tmp_path / "out") == [(ids, labels.count(-100)) for ids, labels in
                                               (encode_example(tok, e) for e in examples)]


def test_shards_refuse_a_tokenizer_other_than_theirs_even_without_its_sha256(tmp_path, tiny_spm):
    """An output whose summary.json lacks the tokenizer's SHA-256 (or its size) with a smaller tokenizer would
    end in an IndexError in the embedding: check_tokenizer stops it before step 1."""
    spm.SentencePieceTrainer.train(input=str(write_records(tmp_path / "corpus.txt", 50)), vocab_size=280,
                                   model_prefix=str(tmp_path / "small"), byte_fallback=True, minloglevel=2)
    prepare([write_records(tmp_path / "d.jsonl", 3, long=2)], tiny_spm, tmp_path / "out", workers=1)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    mine, small = Tokenizer(tiny_spm), Tokenizer(tmp_path / "small.model")
    for drop in ((), ("sha256",), ("sha256", "vocab_size")):
        cut = {k: v for k, v in summary.items() if k not in drop}
        cut["tokenizer"] = {k: v for k, v in summary["tokenizer"].items() if k not in drop}
        (tmp_path / "out" / "summary.json").write_text(json.dumps(cut))
        ds = TokenDataset(tmp_path / "out")
        ds.check_tokenizer(mine)
        with pytest.raises(UserError, match=f"tokenizer {small.path} \\(280 tokens\\) is not the one {ds.path} was"):
            ds.check_tokenizer(small)
        if drop == ("sha256",):  # by its size: a larger tokenizer is another one too
            with pytest.raises(UserError, match=f"{summary['vocab_size']:,} tokens\\)"):
                ds.check_tokenizer(types.SimpleNamespace(path="t.model", vocab_size=summary["vocab_size"] + 1))
    top = int(ds.tokens.max())  # without either, the largest id in the shards decides
    ds.check_tokenizer(types.SimpleNamespace(path="t.model", vocab_size=top + 1))
    with pytest.raises(UserError, match=f"the shards hold the id {top:,}"):
        ds.check_tokenizer(types.SimpleNamespace(path="t.model", vocab_size=top))
    # the dry run reads no shard (tokens: none): such a summary.json refuses no tokenizer there, the run decides
    data.check_made_with(ds.path, ds.summary, types.SimpleNamespace(path="t.model", vocab_size=1))


def test_shards_refuse_the_same_tokenizer_json_beside_a_config_that_changed_its_eos(tmp_path):
    """A tokenizer.json's SHA-256 does not cover the tokenizer_config.json beside it, which sets BOS and EOS: shards
    made with one EOS, trained on with another, would end answers with a token the run's generation never stops at."""
    folder = hf_tokenizer_folder(tmp_path / "tok")
    (tmp_path / "d.jsonl").write_text(GOOD + "\n")
    prepare([tmp_path / "d.jsonl"], folder, tmp_path / "out", workers=1, quiet=True)
    ds = TokenDataset(tmp_path / "out")
    ds.check_tokenizer(Tokenizer(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>"}))
    tok = Tokenizer(folder)
    with pytest.raises(UserError, match=f"{ds.path} was made with the EOS id {ds.summary['eos_id']}, but tokenizer "
                                        f"{re.escape(tok.path)} gives {tok.eos_id} "):
        ds.check_tokenizer(tok)


def test_shards_refuse_the_same_tokenizer_json_beside_a_config_that_changed_its_bos(tmp_path):
    """As for the EOS: shards made without a BOS, trained on with one (or the other way), would give the model
    prompts that start otherwise than the ones it is scored on."""
    folder = hf_tokenizer_folder(tmp_path / "tok")
    (tmp_path / "d.jsonl").write_text(GOOD + "\n")
    prepare([tmp_path / "d.jsonl"], folder, tmp_path / "out", workers=1, quiet=True)
    ds = TokenDataset(tmp_path / "out")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>",
                                                              "eos_token": "<|endoftext|>"}))
    tok = Tokenizer(folder)
    assert tok.eos_id == ds.summary["eos_id"] and tok.bos_id is not None
    with pytest.raises(UserError, match=f"{ds.path} was made with the BOS id None, but tokenizer "
                                        f"{re.escape(tok.path)} gives {tok.bos_id} "):
        ds.check_tokenizer(tok)


# ---------------------------------------------------------------------------------------------
# Batches

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    if FIXTURES is None:
        pytest.skip("shared/fixtures not found")
    out = tmp_path_factory.mktemp("batches") / "out"
    prepare([OFFICIAL], LLAMA2, out, max_len=200, workers=1)
    return TokenDataset(out)


def segments(batch):
    """The examples in a batch: (tokens, labels) of each row (pad) or each seq_id run (pack)."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        seq = batch["seq_ids"][r] if "seq_ids" in batch else batch["valid"][r].long() - 1  # pad: a row, an example
        for j in seq[seq >= 0].unique().tolist():
            out.append((tuple(batch["tokens"][r][seq == j].tolist()), tuple(batch["labels"][r][seq == j].tolist())))
    return out


def expected(dataset, i, max_len=None):
    ids, prompt_len = dataset[i]
    ids = ids[:max_len].tolist() if max_len else ids.tolist()
    labels = [ids[t + 1] if t + 1 >= max(prompt_len, 1) and t + 1 < len(ids) else -100 for t in range(len(ids))]
    return tuple(ids), tuple(labels)


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_batches_are_a_function_of_seed_and_step(dataset, mode):
    a = get_batch(dataset, 5, 8, seed=1, mode=mode)
    b = get_batch(dataset, 5, 8, seed=1, mode=mode)
    assert all(torch.equal(a[k], b[k]) for k in a if k != "n_answer_global")
    assert not torch.equal(a["tokens"], get_batch(dataset, 5, 8, seed=2, mode=mode)["tokens"])


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_rank_slices_together_are_the_single_process_batch(dataset, mode):
    for step in (0, 3, 40):
        whole = get_batch(dataset, step, 8, seed=0, mode=mode, max_len=150)
        for world_size in (2, 4, 8):
            parts = [get_batch(dataset, step, 8, 0, rank, world_size, mode, max_len=150) for rank in range(world_size)]
            assert Counter(s for p in parts for s in segments(p)) == Counter(segments(whole))
            assert {p["n_answer_global"] for p in parts} == {whole["n_answer_global"]}
            assert sum(int((p["labels"] != -100).sum()) for p in parts) == whole["n_answer_global"]


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_batch_holds_the_global_batch_examples_with_shifted_answer_labels(dataset, mode):
    for step, max_len in ((0, None), (7, 40)):
        batch = get_batch(dataset, step, 6, seed=4, mode=mode, max_len=max_len, pad_id=dataset.pad_id)
        cap = max_len or (dataset.max_len if mode == "pack" else None)
        want = [expected(dataset, i, cap) for i in global_batch(dataset, step, 6, 4, mode)]
        assert Counter(segments(batch)) == Counter(want)
        assert batch["tokens"].dtype == batch["labels"].dtype == torch.long and batch["valid"].dtype == torch.bool
        assert (batch["labels"][~batch["valid"]] == -100).all()
        assert batch["n_answer_global"] == sum(sum(l != -100 for l in labels) for _, labels in want)


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_only_a_pack_batch_carries_seq_ids(dataset, mode):
    """seq_ids tell the examples of a packed row apart; a pad row holds one example, and the model is given none."""
    assert ("seq_ids" in get_batch(dataset, 0, 6, seed=4, mode=mode)) == (mode == "pack")


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_each_rank_gets_its_own_consecutive_slice_of_the_global_batch(dataset, mode):
    """Part r of w holds examples [r * B / w, (r + 1) * B / w) of the global batch, not every w-th: a pad-mode batch
    comes sorted by length, so consecutive slices give each rank (and each accumulation step) rows of similar
    lengths to pad, where an interleaved share would pad every part out to the batch's longest example."""
    for step in (0, 3, 40):
        examples = global_batch(dataset, step, 8, 0, mode)
        for world_size in (2, 4):
            share = 8 // world_size
            for rank in range(world_size):
                part = get_batch(dataset, step, 8, 0, rank, world_size, mode, max_len=150)
                want = [expected(dataset, i, 150) for i in examples[rank * share:(rank + 1) * share]]
                assert Counter(segments(part)) == Counter(want), (step, world_size, rank)


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_a_batch_is_as_wide_as_its_longest_row_not_max_len(dataset, mode):
    """Rows are padded to the batch's longest row (pad: its longest example, cut at max_len; pack: its fullest row),
    never out to max_len: a short batch costs its own length."""
    for step in range(4):
        batch = get_batch(dataset, step, 4, seed=0, mode=mode, max_len=1000)  # 4 records of at most 200 tokens
        assert batch["tokens"].shape[1] == int(batch["valid"].sum(1).max()) < 1000, step


def test_pack_rows_keep_examples_whole_and_apart(dataset):
    max_len = 160
    for step in range(4):
        batch = get_batch(dataset, step, 16, seed=0, mode="pack", max_len=max_len)
        tokens, labels, valid, seq = batch["tokens"], batch["labels"], batch["valid"], batch["seq_ids"]
        assert tokens.shape[1] <= max_len and torch.equal(valid, seq >= 0)
        for r in range(tokens.shape[0]):
            n = int(valid[r].sum())
            assert valid[r, :n].all() and not valid[r, n:].any()  # examples first, padding after
            runs = seq[r, :n]
            assert runs[0] == 0 and ((runs[1:] - runs[:-1]) >= 0).all() and ((runs[1:] - runs[:-1]) <= 1).all()
            ends = torch.nonzero(torch.diff(runs, append=torch.tensor([-2]))).flatten()
            assert (labels[r, ends] == -100).all()  # no example predicts the next one's first token
            starts = torch.cat([torch.tensor([0]), ends[:-1] + 1])
            assert (tokens[r, starts] == dataset.summary["bos_id"]).all()
            positions = torch.arange(n) - starts[runs]  # what the model computes from seq_ids
            assert (positions >= 0).all() and (positions[starts] == 0).all()


def dog_records(tmp_path, tiny_spm, n, lengths):
    """A prepare output of n records whose answers are 1 to `lengths` words long, in turn."""
    lines = [json.dumps({"instruction": "fox", "input": "", "output": "dog " * (i % lengths + 1)}) + "\n"
             for i in range(n)]
    (tmp_path / "d.jsonl").write_text("".join(lines))
    prepare([tmp_path / "d.jsonl"], tiny_spm, tmp_path / "out", workers=1, quiet=True)
    return TokenDataset(tmp_path / "out")


def test_pad_mode_groups_similar_lengths_in_shuffled_batches(tmp_path, tiny_spm):
    dataset = dog_records(tmp_path, tiny_spm, 300, 60)  # more records than a window holds: one epoch's
    ranges = []
    for step in range(data.GROUP_BATCHES):  # one window
        lengths = get_batch(dataset, step, 4, seed=0)["valid"].sum(1)
        ranges.append((int(lengths.min()), int(lengths.max())))
    # the window's batches come shuffled, not as a sweep from short to long (about half the steps go down)
    assert sum(b < a for a, b in zip(ranges, ranges[1:])) >= len(ranges) // 4
    ranges.sort()
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(ranges, ranges[1:]))
    assert ranges[0][1] < ranges[-1][0]


def test_a_pad_mode_batch_does_not_hold_an_example_twice_when_a_window_spans_epochs(tmp_path, tiny_spm):
    """A window of GROUP_BATCHES batches longer than an epoch holds each example several times: sorted by length
    all together, the copies of an example of its own length lay side by side and filled a batch with it."""
    dataset = dog_records(tmp_path, tiny_spm, 48, 48)  # 48 lengths; epochs end on batch boundaries
    assert len(set(dataset.lengths.tolist())) == len(dataset) == 48
    rank, grouped = np.argsort(np.argsort(dataset.lengths)), 0  # rank: of each example's length among the 48
    for step in range(2 * data.GROUP_BATCHES):  # 512 examples a window, over 10 epochs and parts of others
        examples = global_batch(dataset, step, 8, 0, "pad")
        assert len(set(examples.tolist())) == 8, (step, examples)
        grouped += np.ptp(rank[examples]) == 7  # 8 lengths next to each other
    assert grouped >= 2 * 60  # every batch of a whole epoch's part of its window (10 epochs x 6 batches a window)


def test_each_epoch_visits_every_example_once(dataset):
    n, batch_size = len(dataset), 4
    steps = n * 3 // batch_size
    pack = np.concatenate([global_batch(dataset, s, batch_size, 9, "pack") for s in range(steps)])
    for epoch in range(2):
        assert sorted(pack[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert not np.array_equal(pack[:n], pack[n:2 * n])  # a new order each epoch
    group = data.GROUP_BATCHES
    pad = np.concatenate([global_batch(dataset, s, batch_size, 9, "pad") for s in range(group)])
    pack = np.concatenate([global_batch(dataset, s, batch_size, 9, "pack") for s in range(group)])
    assert sorted(pad) == sorted(pack)  # pad mode only reorders within a window


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_the_batch_order_is_a_function_of_the_seed_alone_across_processes(tmp_path, tiny_spm, mode):
    """A resumed run (a new process, so empty caches) must see the batches the first run would have: the epochs'
    shuffles come from the seed, not from fresh entropy, and another seed gives another order."""
    dataset = dog_records(tmp_path, tiny_spm, 40, 8)
    order = lambda seed: np.concatenate([global_batch(dataset, s, 4, seed, mode) for s in range(25)])  # 2.5 epochs
    first = order(7)
    data._epoch_permutation.cache_clear(), data._sorted_window.cache_clear()  # what a new process starts with
    assert np.array_equal(order(7), first)
    assert not np.array_equal(order(8), first)


def test_batch_size_must_divide_over_ranks_and_rank_and_mode_must_exist(dataset):
    with pytest.raises(UserError, match="batch_size 6 is not divisible by world_size 4"):
        get_batch(dataset, 0, 6, seed=0, rank=0, world_size=4)
    for rank in (4, -1):  # rank 4 of 4 would get an empty slice of the global batch
        with pytest.raises(UserError, match=rf"rank {rank} is outside 0..3"):
            get_batch(dataset, 0, 8, seed=0, rank=rank, world_size=4)
    with pytest.raises(UserError, match="mode must be 'pad' or 'pack', got 'packed'"):
        get_batch(dataset, 0, 8, seed=0, mode="packed")


def test_a_split_without_records_is_a_clear_error_not_a_crash(tmp_path, tiny_spm):
    prepare([write_records(tmp_path / "d.jsonl", 3)], tiny_spm, tmp_path / "out", workers=1, quiet=True)
    empty = TokenDataset(tmp_path / "out", "val")  # val_fraction 0: the split exists and holds nothing
    assert len(empty) == 0
    for mode in ("pad", "pack"):
        with pytest.raises(UserError, match="the dataset split has no records"):
            get_batch(empty, 0, 4, seed=0, mode=mode)


def test_a_summary_without_training_records_is_refused_for_training_when_read(tmp_path, tiny_spm):
    """read_summary refuses a train split of no records (train.py's dry run reads no shard, so it is the one check
    there), naming the fix, where another split of none is read as it is."""
    prepare([write_records(tmp_path / "d.jsonl", 3)], tiny_spm, tmp_path / "out", workers=1, quiet=True)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    summary["splits"]["train"] = {"records": 0, "tokens": 0}
    (tmp_path / "out" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(UserError, match="has no training records; prepare it with a smaller --val_fraction"):
        data.read_summary(str(tmp_path / "out"), "train")
    assert data.read_summary(str(tmp_path / "out"), "val")["splits"]["val"]["records"] == 0


class _DropoutLM(torch.nn.Module):
    """The model interface val_loss uses, with dropout: in training mode two passes give two losses."""

    def __init__(self, vocab_size):
        super().__init__()
        self.emb, self.drop = torch.nn.Embedding(vocab_size, 16), torch.nn.Dropout(0.5)
        self.out = torch.nn.Linear(16, vocab_size)

    def forward(self, tokens, targets, seq_ids=None, reduction="mean", loss_only=False):  # the same loss either way
        logits = self.out(self.drop(self.emb(tokens)))
        return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)


def test_val_loss_is_measured_without_dropout_or_autograd_and_hands_the_model_back_in_training_mode(
        tmp_path, tiny_spm):
    """The training loop calls val_loss on a model in training mode: the loss must be the eval-mode one (no dropout
    noise between two evaluations), measured without an autograd graph (whose memory, and the omega each adapter
    keeps, would outlive it), and training must go on with dropout."""
    from types import SimpleNamespace

    import evaluation
    prepare([write_records(tmp_path / "d.jsonl", 8, long=4)], tiny_spm, tmp_path / "out", workers=1, quiet=True)
    r = SimpleNamespace(cfg=dict(eval_iters=2, batch_size=4, grad_accum=1, batch_mode="pad", max_len=None,
                                 adapter="teamlora", targets="w1,w2,w3"), rank=0, world=1, device="cpu")
    model, val = _DropoutLM(Tokenizer(tiny_spm).vocab_size), TokenDataset(tmp_path / "out")
    graphs = []
    model.register_forward_hook(lambda m, args, out: graphs.append(out[1].requires_grad))
    model.eval()
    want = evaluation.val_loss(model, val, r)
    for _ in range(2):
        model.train()
        assert evaluation.val_loss(model, val, r) == want and model.training
    assert graphs == [False] * 6


def test_val_loss_over_batches_without_an_answer_token_is_0_not_a_division_by_zero(tmp_path, tiny_spm):
    """preflight refuses a validation split none of whose answers fits max_len; one where some do can still give
    eval_iters batches with no answer token among them: their loss is 0 over 0 tokens, not a ZeroDivisionError."""
    from types import SimpleNamespace

    import evaluation
    prepare([write_records(tmp_path / "d.jsonl", 8, long=4)], tiny_spm, tmp_path / "out", workers=1, quiet=True)
    r = SimpleNamespace(cfg=dict(eval_iters=2, batch_size=4, grad_accum=1, batch_mode="pad", max_len=2,
                                 adapter="teamlora", targets="w1,w2,w3"), rank=0, world=1, device="cpu")
    assert evaluation.val_loss(_DropoutLM(Tokenizer(tiny_spm).vocab_size), TokenDataset(tmp_path / "out"), r) == 0.0


def test_documents_are_trained_on_from_their_first_token_after_bos(tmp_path, tiny_spm):
    """A {"text"} record's prompt is its BOS alone (prompt_len 1): position 0 already predicts the first token,
    so every token of the document but the BOS is a target, in both batch modes."""
    lines = [json.dumps({"text": "the quick brown fox " * (i % 3 + 1)}) + "\n" for i in range(12)]
    (tmp_path / "d.jsonl").write_text("".join(lines))
    prepare([tmp_path / "d.jsonl"], tiny_spm, tmp_path / "out", workers=1, quiet=True)
    ds = TokenDataset(tmp_path / "out")
    assert set(ds.prompt_lens.tolist()) == {1}
    for mode in ("pad", "pack"):
        batch = get_batch(ds, 0, 4, seed=0, mode=mode)
        docs = segments(batch)
        assert len(docs) == 4 and all(labels == ids[1:] + (-100,) for ids, labels in docs), mode
        assert batch["n_answer_global"] == sum(len(ids) - 1 for ids, _ in docs)


@pytest.mark.parametrize("arg, value, message", [
    ("val_fraction", 1.0, r"val_fraction must be in \[0, 1\), got 1.0"),  # 1.0 would leave nothing to train on
    ("val_fraction", -0.1, r"val_fraction must be in \[0, 1\), got -0.1"),
    ("max_len", 1, "max_len must be an integer >= 2, got 1"),  # BOS alone: no record could keep an answer
])
def test_prepare_refuses_a_val_fraction_or_max_len_out_of_range_and_writes_nothing(tmp_path, tiny_spm, arg, value,
                                                                                   message):
    with pytest.raises(UserError, match=message):
        prepare([write_records(tmp_path / "d.jsonl", 3)], tiny_spm, tmp_path / "out", workers=1, **{arg: value})
    assert os.listdir(tmp_path) == ["d.jsonl"]


def test_a_val_fraction_that_leaves_nothing_to_train_on_is_refused_and_writes_nothing(tmp_path, tiny_spm):
    source = write_records(tmp_path / "d.jsonl", 3)  # seed 0 and 0.9 put all three in val
    with pytest.raises(UserError, match=r"^--val_fraction 0.9 put all 3 records in val, leaving none to train on; "
                                        r"lower --val_fraction"):
        prepare([source], tiny_spm, tmp_path / "out", val_fraction=0.9, workers=1, quiet=True)
    for fraction in (float("nan"), 1.5):
        with pytest.raises(UserError, match=r"^--val_fraction must be in \[0, 1\), got .*; give the share"):
            prepare([source], tiny_spm, tmp_path / "out", val_fraction=fraction, workers=1)
    assert os.listdir(tmp_path) == ["d.jsonl"]


def run_prepare(capsys, *args):
    """data.py prepare's command line in this process, refused: its one line on stderr (exit code 2)."""
    return script_error(data.main, ["prepare", *args], capsys)


@pytest.mark.skipif(sys.platform != "linux", reason="a file name of bytes that are not UTF-8, which Linux takes")
def test_a_file_name_that_is_not_utf8_is_an_input_prepare_records_and_a_tokenizer_named_in_one_sentence(tmp_path,
                                                                                                        tiny_spm):
    """A Latin-1 é in a name reaches Python as a lone surrogate: an --input so named was encoded whole, then the write
    of summary.json (UTF-8) was a UnicodeEncodeError's traceback; a --tokenizer so named, which SentencePiece cannot
    open, was "neither a SentencePiece model (LLaMA-2) nor a tiktoken BPE file", as train.py refuses it."""
    source = write_records(tmp_path / os.fsdecode(b"caf\xe9.jsonl"), 3)
    summary = prepare([str(source)], str(tiny_spm), str(tmp_path / "out"), max_len=64, workers=1, quiet=True)
    assert summary["records"] == 3 and summary["files"][0]["path"] == str(tmp_path / "caf\\xe9.jsonl")
    assert json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8")) == summary
    tok = tmp_path / os.fsdecode(b"tok\xe9.model")
    shutil.copy(tiny_spm, tok)
    with pytest.raises(UserError, match=rf"^tokenizer {re.escape(str(tok))} holds bytes that are not UTF-8 text, and "
                       r"torch and the tokenizers cannot open such a path; name it in UTF-8, or give --tokenizer an "
                       r"ASCII path\.$"):
        prepare([str(source)], str(tok), str(tmp_path / "out2"), max_len=64, workers=1, quiet=True)
    assert not (tmp_path / "out2").exists()


def test_prepare_on_the_command_line_defaults_to_the_settings_of_the_prepare_function(tmp_path, tiny_spm, capsys):
    source, out = write_records(tmp_path / "d.jsonl", 3), tmp_path / "out"
    data.main(["prepare", "--input", str(source), "--tokenizer", str(tiny_spm), "--out", str(out), "--workers", "1"])
    summary, defaults = json.loads((out / "summary.json").read_text()), inspect.signature(prepare).parameters
    assert {k: summary[k] for k in ("max_len", "val_fraction", "seed")} == {
        k: defaults[k].default for k in ("max_len", "val_fraction", "seed")}


def test_a_full_disk_while_prepare_writes_is_one_sentence_and_leaves_no_temporary_folder(tmp_path, tiny_spm, capsys,
                                                                                          monkeypatch):
    """It was "[Errno 28] No space left on device: '...tmp-PID/...'", with no word of what was left or what to do."""
    source, out = write_records(tmp_path / "d.jsonl", 3), tmp_path / "shards"

    def full(tmp, *args):
        with open(os.path.join(tmp, "train.bin"), "wb") as f:
            f.write(b"half a shard")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(tmp, "train.bin"))
    monkeypatch.setattr(data, "_write_shards", full)
    line = run_prepare(capsys, "--input", source, "--tokenizer", tiny_spm, "--out", out)
    assert line.startswith(f"data.py prepare: error: No space left on device ({out}.tmp-") and line.endswith(
        "; prepare removed what it had written: free space there (or make it writable) and run it again"), line
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


@pytest.mark.parametrize("case", ["workers 0", "workers -3", "out empty", "out root", "out is an input",
                                  "out is the tokenizer", "parent is a file", "parent is a dead link", "input twice",
                                  "input twice by another path", "out is an input by another path", "input empty",
                                  "out is a loop of links", "parent is a loop of links"])
def test_prepare_refuses_settings_that_cannot_work_in_one_sentence_and_writes_nothing(tmp_path, tiny_spm, capsys,
                                                                                     case):
    source = write_records(tmp_path / "d.jsonl", 3)
    (tmp_path / "notes").write_text("keep me")
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "gone", tmp_path / "link")
    os.symlink(tmp_path / "loop", tmp_path / "loop")  # a link to itself: it was refused by the move into it, at the end
    again = tmp_path / "sub" / ".." / "d.jsonl"
    out, inputs, flags, message = {  # case -> --out, --input, more flags, the start of the sentence
        "workers 0": (tmp_path / "out", [source], ["--workers", "0"],
                      "--workers must be a number of processes >= 1, got 0; leave it out"),
        "workers -3": (tmp_path / "out", [source], ["--workers", "-3"], "--workers must be a number of processes"),
        "out empty": ("", [source], [], "--out '' is empty; give a folder of its own"),
        "out root": ("//", [source], [], "--out '//' is the root folder; give a folder of its own"),
        "out is an input": (source, [source], [], f"--out {source} is the input file {source}; choose another --out"),
        "out is the tokenizer": (tiny_spm, [source], [], f"--out {tiny_spm} is the tokenizer file {tiny_spm}; choose"),
        "parent is a file": (tmp_path / "notes" / "shards", [source], [],
                             f"--out {tmp_path}/notes/shards can not be made: {tmp_path}/notes is a file, not a"),
        "parent is a dead link": (tmp_path / "link" / "shards", [source], [],
                                  f"--out {tmp_path}/link/shards can not be made: {tmp_path}/link is a link to no"),
        "input twice": (tmp_path / "out", [source, tmp_path / "notes", source], [],
                        f"the input {source} is given twice (as {source} and {source}); pass each --input file once"),
        "input twice by another path": (tmp_path / "out", [source, again], [],
                                        f"the input {again} is given twice (as {source} and {again})"),
        "out is an input by another path": (again, [source], [], f"--out {again} is the input file {source}; choose"),
        "input empty": (tmp_path / "out", [source, ""], [], "an --input path is empty; give the records' file, e.g. "
                        "--input data/train.jsonl"),  # --input= was "input file  not found"
        "out is a loop of links": (tmp_path / "loop", [source], [], f"--out {tmp_path}/loop is a loop of links, not a "
                                   "folder; choose another --out"),  # was "Not a directory (...tmp-PID)", at the end
        "parent is a loop of links": (tmp_path / "loop" / "shards", [source], [], f"--out {tmp_path}/loop/shards can "
                                      f"not be made: {tmp_path}/loop is a loop of links, not a folder"),
    }[case]
    before = {str(p): p.read_bytes() if p.is_file() else None for p in [*tmp_path.rglob("*"), tiny_spm]}
    error = run_prepare(capsys, "--input", *inputs, "--tokenizer", tiny_spm, "--out", out, *flags)
    assert error.startswith(f"data.py prepare: error: {message}") and "\n" not in error
    assert {str(p): p.read_bytes() if p.is_file() else None for p in [*tmp_path.rglob("*"), tiny_spm]} == before


@pytest.mark.parametrize("case", ["out is read-only", "new out in a read-only folder", "out in a read-only folder"])
def test_an_out_that_cannot_be_written_is_refused_before_any_record_is_encoded(tmp_path, tiny_spm, capsys,
                                                                              monkeypatch, read_only, case):
    """Shards go to OUT.tmp-PID beside --out, then into it: a folder that refuses either was found only at that
    move, after every record was encoded, as a bare "[Errno 13] Permission denied"."""
    source, locked = write_records(tmp_path / "d.jsonl", 3), tmp_path / "locked"
    (locked / "cme").mkdir(parents=True)
    out, how = {"out is read-only": (locked / "cme", "written:"), "new out in a read-only folder": (
        locked / "new", "made:"), "out in a read-only folder": (locked / "cme", "written: prepare builds its output "
                                                                               "beside it, and")}[case]
    where = locked / "cme" if case == "out is read-only" else locked
    read_only(where)
    monkeypatch.setattr(data, "_write_shards", lambda *a: pytest.fail("encoded before the refusal"))
    assert run_prepare(capsys, "--input", source, "--tokenizer", tiny_spm, "--out", out) == (
        f"data.py prepare: error: --out {out} can not be {how} {where} is not writable (Permission denied); choose "
        "another --out")
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "locked"] and sorted(os.listdir(locked)) == ["cme"]


def test_an_out_that_links_into_a_read_only_folder_is_refused_before_any_record_is_encoded(tmp_path, tiny_spm, capsys,
                                                                                        monkeypatch, read_only):
    """prepare builds OUT.tmp-PID beside the link's target, not beside the link: the target's folder must take it."""
    source, locked, out = write_records(tmp_path / "d.jsonl", 3), tmp_path / "locked", tmp_path / "out"
    (locked / "cme").mkdir(parents=True)
    out.symlink_to(locked / "cme")
    read_only(locked)
    monkeypatch.setattr(data, "_write_shards", lambda *a: pytest.fail("encoded before the refusal"))
    assert run_prepare(capsys, "--input", source, "--tokenizer", tiny_spm, "--out", out) == (
        f"data.py prepare: error: --out {out} can not be written: prepare builds its output beside it, and {locked} "
        "is not writable (Permission denied); choose another --out")
    assert sorted(os.listdir(locked)) == ["cme"]


DYING_WORKERS = """import os, sys
import data

data.cores = lambda: 2
data._encode_chunk, data._chunks = os._exit, lambda *args: iter([0] * 8)  # a worker ends at its job, as a killed one
data.main(["prepare", "--input", sys.argv[1], "--tokenizer", sys.argv[2], "--out", sys.argv[3], "--workers", "2"])
"""


def test_a_worker_process_that_dies_stops_prepare_in_one_sentence_instead_of_waiting_for_it_forever(tmp_path,
                                                                                                   tiny_spm):
    """A worker killed (by the system for want of memory, say) took its chunk with it, and multiprocessing.Pool
    waited for that chunk's result forever."""
    source = write_records(tmp_path / "d.jsonl", 3)
    result = subprocess.run([sys.executable, "-c", DYING_WORKERS, str(source), str(tiny_spm), str(tmp_path / "out")],
                            cwd=HERE, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("data.py prepare: error: a worker process of prepare ended before its records "
                                    "were encoded (killed, or by the system for want of memory); run prepare again")
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


NO_MAIN_GUARD = """import sys
import data

try:  # at the top level, with no `if __name__ == "__main__":`: each spawned worker runs this file again as it starts
    data.prepare(sys.argv[1], sys.argv[2], sys.argv[3], workers=2, quiet=True)
except data.UserError as e:
    sys.exit(str(e))
"""


def test_a_script_without_a_main_guard_is_told_to_add_one_not_that_a_worker_was_killed(tmp_path, tiny_spm):
    """Python's spawn imports the calling script again in each worker of prepare; where the script calls prepare at
    its top level the workers ended in their start-up, and prepare blamed a killed worker or a want of memory."""
    source, script = write_records(tmp_path / "d.jsonl", 3), tmp_path / "unguarded.py"
    script.write_text(NO_MAIN_GUARD)
    result = subprocess.run([sys.executable, str(script), str(source), str(tiny_spm), str(tmp_path / "out")],
                            cwd=HERE, env={**os.environ, "PYTHONPATH": HERE}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and result.stderr == (
        f"{script} runs data.prepare again in each worker process of prepare as the worker starts (Python's spawn "
        "imports the script anew); put the script's work under `if __name__ == \"__main__\":`\n"), result.stderr
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "unguarded.py"]


@pytest.mark.skipif(os.name != "posix", reason="a worker ended by SIGTERM")
@pytest.mark.parametrize("code, sentence", [(data.NO_MAIN_GUARD, "runs data.prepare again in each worker process"),
                                            (1, "a worker process of prepare ended before its records were encoded")])
def test_one_worker_ended_by_a_missing_main_guard_names_the_guard_whatever_the_other_workers_exit_codes(
        code, sentence, tiny_spm, monkeypatch):
    """One worker's exit code NO_MAIN_GUARD names the main guard though the pool ended the others itself (SIGTERM, as
    it does once one has died): prepare reads the workers' codes as a mix. A mix without NO_MAIN_GUARD is a killed
    worker. The jobs (eval's): one sleeps, the other leaves with `code`, and the pool ends the worker left (its death
    may go unseen until the sleep ends: the pool watches a worker it started after its last wake-up only from then)."""
    import concurrent.futures
    codes, real = [], concurrent.futures.ProcessPoolExecutor

    class Pool(real):  # the real pool, its workers' exit codes written down as prepare's shutdown reaps them
        def shutdown(self, *args, **kwargs):
            workers = dict(self._processes or {})
            super().shutdown(*args, **kwargs)
            codes.extend(p.exitcode for p in workers.values())
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Pool)
    jobs = iter(["__import__('time').sleep(2)", f"__import__('os')._exit({code})"])
    with pytest.raises(UserError, match=sentence):
        list(data._map_ordered(eval, jobs, 2, str(tiny_spm)))
    assert sorted(codes) == sorted([-signal.SIGTERM, code])  # the mix: one code of its own, one ended by the pool


ORPHANS = """import multiprocessing, sys, threading, time
import data

work = data._map_ordered(time.sleep, iter([60] * 4), 2, sys.argv[1])  # two workers, each on a job of a minute
threading.Thread(target=lambda: list(work), daemon=True).start()
while len(multiprocessing.active_children()) < 2:
    time.sleep(0.05)
print(*[p.pid for p in multiprocessing.active_children()], flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_worker_processes_end_when_their_prepare_is_killed(tiny_spm):
    """kill -9 of prepare ends its workers too, rather than leaving them to wait for work forever."""
    def running(pid):  # a zombie that nobody reaps has ended
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    parent = subprocess.Popen([sys.executable, "-c", ORPHANS, str(tiny_spm)], cwd=HERE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in workers if running(pid)]
    for pid in alive:  # nothing left behind when the test fails
        os.kill(pid, signal.SIGKILL)
    assert len(workers) == 2 and alive == []


def test_worker_processes_leave_ctrl_c_to_prepare(tiny_spm):
    """A terminal's Ctrl-C reaches every process of the job: each worker printed its own KeyboardInterrupt traceback
    under prepare's, which alone stops the work (its pool cancels what is left) and ends quietly (errors.run_script)."""
    handlers = list(data._map_ordered(signal.getsignal, iter([signal.SIGINT] * 4), 2, str(tiny_spm)))
    assert handlers == [signal.SIG_IGN] * 4 and signal.getsignal(signal.SIGINT) is signal.default_int_handler


CTRL_C_AT_WORKER_START = """import sys
import errors
errors.start_script()
import data

data.cores = lambda: 2
flags = ["--input", sys.argv[1], "--tokenizer", sys.argv[2], "--out", sys.argv[3], "--workers", "2"]
errors.run_script(lambda: data.main(["prepare", *flags]))
"""
# numpy, ahead of the real one on the path: in a worker (not the leader of the process group that prepare leads), a
# terminal's Ctrl-C, to every process of the group, while the worker imports data.py, then the real numpy
CTRL_C_IN_A_WORKERS_IMPORT = """import importlib.machinery, importlib.util, os, signal, sys
if os.getpid() != os.getpgrp():
    os.killpg(os.getpgrp(), signal.SIGINT)
path = [p for p in sys.path if os.path.realpath(p) != os.path.dirname(os.path.realpath(__file__))]
spec = importlib.machinery.PathFinder.find_spec("numpy", path)
sys.modules["numpy"] = numpy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(numpy)
"""


def prepare_in_its_own_group(script, shims, source, tokenizer, tmp_path):
    """Run script (data.py prepare of source into tmp_path/out) in a process group of its own, as a terminal's job,
    with the modules shims (file name -> code) in tmp_path/shim first on its path: its workers import them too."""
    (tmp_path / "shim").mkdir()
    for name, code in shims.items():
        (tmp_path / "shim" / name).write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "shim"),
                                                                      os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", script, str(source), str(tokenizer), str(tmp_path / "out")],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="a process group's Ctrl-C, as a terminal sends it")
def test_ctrl_c_while_a_worker_starts_ends_prepare_by_sigint_without_the_workers_traceback(tmp_path, tiny_spm):
    """A worker's first second or more is its imports, before _init_worker has it ignore SIGINT: a Ctrl-C there,
    which reaches every process of the job, printed the worker's KeyboardInterrupt traceback under prepare's quiet
    end (errors.run_script)."""
    source = write_records(tmp_path / "d.jsonl", 3)
    done = prepare_in_its_own_group(CTRL_C_AT_WORKER_START, {"numpy.py": CTRL_C_IN_A_WORKERS_IMPORT}, source,
                                    tiny_spm, tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (-signal.SIGINT, "", "")
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "shim"]


# prepare with 2 workers whose chunk of 2 records is encoded by shim.encode (a worker imports it by name): the first
# chunk that a worker starts sends a terminal's Ctrl-C to the whole process group, mid-encoding; each chunk is noted
CTRL_C_WHILE_WORKERS_ENCODE = """import functools, sys
import errors
errors.start_script()
import data, shim

data.cores = lambda: 2
data._chunks = functools.partial(data._chunks, size=2)
data._encode_chunk = shim.encode
flags = ["--input", sys.argv[1], "--tokenizer", sys.argv[2], "--out", sys.argv[3], "--workers", "2"]
errors.run_script(lambda: data.main(["prepare", *flags]))
"""
ENCODE_THEN_CTRL_C = """import os, signal
import data

def encode(job):
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "chunks"), "a") as f:
        f.write("chunk\\n")
    try:
        os.close(os.open(os.path.join(here, "ctrl_c"), os.O_CREAT | os.O_EXCL))
        os.killpg(os.getpgrp(), signal.SIGINT)
    except FileExistsError:
        pass
    return data._encode_chunk(job)
"""


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="a process group's Ctrl-C, as a terminal sends it")
def test_ctrl_c_while_workers_encode_stops_prepare_at_once_quietly_leaving_no_shard(tmp_path, tiny_spm):
    """Ctrl-C while the workers encode (they ignore SIGINT: it is prepare's to take) stops prepare before the chunks it
    has not sent them, ends it as a Ctrl-C ends a script (by SIGINT, quietly), and leaves no shard behind, under its
    final name or a temporary one."""
    source = write_records(tmp_path / "d.jsonl", 400)
    done = prepare_in_its_own_group(CTRL_C_WHILE_WORKERS_ENCODE, {"shim.py": ENCODE_THEN_CTRL_C}, source, tiny_spm,
                                    tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (-signal.SIGINT, "", "")
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "shim"]  # no out, no OUT.tmp-PID
    encoded = (tmp_path / "shim" / "chunks").read_text().count("chunk")
    # of 200: those in flight (3-4 on a quiet machine), and any that finish while a busy machine keeps prepare from
    # taking its Ctrl-C; a prepare that went on would encode them all
    assert 1 <= encoded <= 200 // 4, encoded


def test_cores_are_the_ones_this_process_may_run_on_not_the_machines(monkeypatch):
    """Under SLURM or a container's cpuset a process may run on a few of a machine's cores: prepare's workers and
    study.py's runs count those, not os.cpu_count(), else a 128-core node's job of 8 would start 128 workers."""
    monkeypatch.setattr(data.os, "cpu_count", lambda: 128)
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {3, 5, 7}, raising=False)
    assert data.cores() == 3
    monkeypatch.delattr(data.os, "sched_getaffinity")  # macOS and Windows have none
    assert data.cores() == 128


def test_prepare_runs_no_more_worker_processes_than_cores(tmp_path, tiny_spm, monkeypatch, capsys):
    def stub(*args):  # prepare's arguments as the command line passes them, then a stop
        raise UserError(f"workers {args[-1]}")
    monkeypatch.setattr(data, "prepare", stub)
    monkeypatch.setattr(data, "cores", lambda: 2)
    for flags, want in ((["--workers", "64"], 2), (["--workers", "1"], 1), ([], None)):
        error = run_prepare(capsys, "--input", "d.jsonl", "--tokenizer", tiny_spm, "--out", tmp_path / "out",
                            *flags)
        assert error == f"data.py prepare: error: workers {want}"


# -----------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (Qwen2.5, Mistral, ...) through the tokenizers package

def test_hf_tokenizer_folder_gives_eos_from_its_config_no_bos_and_maps_the_prompts_end_to_eos(tmp_path):
    tok = Tokenizer(hf_tokenizer_folder(tmp_path / "qwen"))
    assert tok.kind == "tokenizers" and tok.bos_id is None
    assert tok.eos_id == tok.hf.token_to_id("<|endoftext|>") and tok.eos_text == "<|endoftext|>"
    record = {"instruction": TEXTS[0], "input": TEXTS[1], "output": "positive"}
    prompt, answer = data._encode_parts(tok, record)
    assert prompt == tok.hf.encode(TEXTS[0] + "\n" + TEXTS[1], add_special_tokens=False).ids + [tok.eos_id]
    assert answer == tok.hf.encode("positive", add_special_tokens=False).ids + [tok.eos_id]
    text = "x <|endoftext|> y"  # as plain text a special token's string stays text
    assert tok.eos_id not in tok.encode(text) and tok.eos_id in tok.encode(text, special=True)
    assert tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]
    assert tok.encode("hi", bos=True) == tok.encode("hi")  # nothing to put in front


def test_hf_tokenizer_with_a_bos_puts_it_in_front(tmp_path):
    tok = Tokenizer(hf_tokenizer_folder(tmp_path / "bos", bos="<|im_start|>", eos="<|im_end|>"))
    assert tok.encode("hi", bos=True)[0] == tok.bos_id == tok.hf.token_to_id("<|im_start|>")
    assert data._encode_parts(tok, {"instruction": "a", "output": "b"})[1][-1] == tok.hf.token_to_id("<|im_end|>")


def test_a_bos_numbered_0_starts_prompts_and_documents_as_any_other_bos(tmp_path):
    """Id 0 is a token like any other: a BOS numbered 0 (the first special token a tokenizer was trained with) goes in
    front of every prompt and starts every document, never taken for "no BOS" (and a document then for EOS)."""
    tok = Tokenizer(hf_tokenizer_folder(tmp_path / "t", bos="<|endoftext|>", eos="<|im_end|>"))
    assert tok.bos_id == 0 == tok.hf.token_to_id("<|endoftext|>") and tok.eos_id != 0
    assert tok.encode("hi", bos=True) == [0] + tok.encode("hi")
    assert data._encode_parts(tok, {"instruction": "a", "output": "b"})[0][0] == 0
    assert data._encode_parts(tok, {"text": "a document"})[0] == [0]


def test_hf_tokenizer_without_a_pad_token_pads_with_its_eos(tmp_path):
    """A tokenizer_config.json without a pad_token (Qwen, Mistral) pads with the EOS it names, a token of the model's
    own, never with whatever token has id 0 (in a real vocabulary, a piece of text)."""
    tok = Tokenizer(hf_tokenizer_folder(tmp_path / "t", eos="<|im_end|>"))
    assert tok.eos_id != 0 and tok.pad_id == tok.eos_id == tok.hf.token_to_id("<|im_end|>")


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "<|im_start|>"])
def test_hf_tokenizer_with_a_pad_token_of_its_own_pads_with_it_and_ends_answers_with_the_eos(tmp_path, pad_token):
    """Qwen2.5-Instruct's config names the pad <|endoftext|> and the EOS <|im_end|>: each id is the token its key
    names (whatever its number), so answers end with the EOS that generation stops at, never with the pad."""
    tokenizers = pytest.importorskip("tokenizers")  # an extra, as every Hugging Face tokenizer test's
    folder = hf_tokenizer_folder(tmp_path / "t", eos="<|im_end|>")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>",
                                                              "pad_token": pad_token}))
    package = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos, pad = package.token_to_id("<|im_end|>"), package.token_to_id(pad_token)
    tok = Tokenizer(folder)
    assert eos != pad and (tok.eos_id, tok.pad_id) == (eos, pad)
    ids, labels = encode_example(tok, {"instruction": "hello", "input": "", "output": "world"})
    assert ids[-1] == labels[-1] == eos and ids[labels.count(-100) - 1] == eos and pad not in ids


@pytest.mark.parametrize("damage", ["a folder", "a list", "a 5000-digit number", "not UTF-8"])
def test_a_damaged_hf_tokenizer_config_is_named_as_such(tmp_path, damage):
    """A tokenizer_config.json that is a folder or a list was passed over, and the error blamed a missing eos_token;
    a number too long to read advised sys.set_int_max_str_digits(), a byte not UTF-8 quoted the codec."""
    folder = hf_tokenizer_folder(tmp_path / "t")
    config = folder / "tokenizer_config.json"
    says = {"a folder": "is a folder, not a file", "a list": "holds a list, not a JSON object",
            "a 5000-digit number": f"holds a number of more than {sys.get_int_max_str_digits():,} digits, too long",
            "not UTF-8": "is not UTF-8 text (invalid start byte); save it as UTF-8 or"}[damage]
    if damage == "a folder":
        config.unlink()
        config.mkdir()
    else:
        config.write_bytes({"a list": b'[{"eos_token": "<|endoftext|>"}]', "not UTF-8": b'{"eos_token": "\xff"}',
                            "a 5000-digit number": b'{"eos_token": "<|endoftext|>", "x": ' + b"9" * 5000 + b"}",
                            }[damage])
    with pytest.raises(UserError) as error:
        Tokenizer(folder)
    fix = "put the checkpoint's unmodified tokenizer_config.json next to its tokenizer.json"
    assert str(error.value).startswith(f"{config} {says}") and str(error.value).endswith(f" {fix}")


def test_a_tokenizer_config_giving_a_key_twice_or_over_64_mib_is_refused_as_config_json_is(tmp_path, monkeypatch):
    """json keeps the last of a repeated key: an eos_token given twice set the EOS without a word (config.json and
    params.json refuse it); and a file of gigabytes (a wrong file saved under the name) was read whole into memory."""
    folder = hf_tokenizer_folder(tmp_path / "t")
    config = folder / "tokenizer_config.json"
    fix = "put the checkpoint's unmodified tokenizer_config.json next to its tokenizer.json"
    config.write_text('{"bos_token": null,\n "eos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}')
    with pytest.raises(UserError) as error:
        Tokenizer(folder)
    assert str(error.value) == (f"{config} line 1 gives the key 'eos_token' twice (JSON would keep only the last "
                                f"value); {fix}")
    config.write_text('{"bos_token": null, "eos_token": "<|im_end|>", "added": {"eos_token": "<|endoftext|>"}}')
    assert Tokenizer(folder).eos_id == Tokenizer(folder).specials["<|im_end|>"]  # one key in each of two objects
    read, load = [], json.loads
    monkeypatch.setattr(json, "loads", lambda text, **kw: (read.append(len(text)), load(text, **kw))[1])
    os.truncate(config, (64 << 20) + 1)  # sparse: nothing written
    with pytest.raises(UserError) as error:
        Tokenizer(folder)
    assert str(error.value) == f"{config} is over 64 MiB, far more than a configuration file holds; {fix}"
    assert all(n < 1 << 20 for n in read)  # tokenizer.json's text, not the config's 64 MiB
    config.write_text('{"bos_token": null, "eos_token": "<|im_end|>"}'.ljust(64 << 20))  # 64 MiB exactly: not over
    assert Tokenizer(folder).eos_id == Tokenizer(folder).specials["<|im_end|>"]


def test_an_unreadable_summary_json_is_named_not_a_traceback(tmp_path, tiny_spm):
    """TokenDataset opened summary.json without catching open's own error: PermissionError's traceback."""
    out = tmp_path / "out"
    prepare([write_records(tmp_path / "d.jsonl", 4)], tiny_spm, out, workers=1)
    (out / "summary.json").chmod(0)
    if os.access(out / "summary.json", os.R_OK):
        pytest.skip("this user (root) reads a file of mode 000")
    with pytest.raises(UserError, match=f"^{out}/summary.json can not be read \\(Permission denied\\); run prepare"):
        TokenDataset(out)


def test_hf_tokenizer_ids_equal_transformers_fast_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = hf_tokenizer_folder(tmp_path / "tok")
    ours = Tokenizer(folder / "tokenizer.json")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    for text in TEXTS[:4] + ["  spaces  and\nnew lines\t", "ünïcödé ☃"]:
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text


def test_hf_tokenizer_problems_are_one_sentence(tmp_path, monkeypatch):
    folder = hf_tokenizer_folder(tmp_path / "t")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None}))
    with pytest.raises(UserError, match="gives no eos_token"):
        Tokenizer(folder)
    (folder / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(UserError, match="tokenizer_config.json line 1 is not valid JSON"):
        Tokenizer(folder)
    (folder / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)  # was a RecursionError's traceback
    with pytest.raises(UserError, match="tokenizer_config.json is nested too deeply to read"):
        Tokenizer(folder)
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(UserError, match="is not a valid tokenizer.json"):
        Tokenizer(tmp_path / "bad.json")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(UserError, match="needs the tokenizers package: pip install tokenizers"):
        Tokenizer(folder)


def test_a_tokenizer_json_saved_as_tokenizer_model_is_read_as_the_tokenizer_json_it_is(tmp_path):
    """Told apart by content, as the tiktoken file is: a renamed tokenizer.json was called neither a SentencePiece
    model nor a tiktoken file, and its user told to pass a tokenizer.model."""
    folder = hf_tokenizer_folder(tmp_path / "qwen")
    os.replace(folder / "tokenizer.json", folder / "tokenizer.model")
    tok = Tokenizer(folder / "tokenizer.model")
    assert tok.kind == "tokenizers" and tok.eos_id == tok.hf.token_to_id("<|endoftext|>")
    assert tok.encode(TEXTS[0]) == Tokenizer(hf_tokenizer_folder(tmp_path / "json")).encode(TEXTS[0])
    text = (folder / "tokenizer.model").read_text(encoding="utf-8")
    (folder / "tokenizer.model").write_text("\n  " + text, encoding="utf-8")  # JSON may start with white space
    assert Tokenizer(folder / "tokenizer.model").kind == "tokenizers"
    # named .json, damaged: said to be a bad tokenizer.json
    (folder / "tokenizer.json").write_text("[" + text + "]", encoding="utf-8")
    with pytest.raises(UserError, match="tokenizer.json is not a valid tokenizer.json"):
        Tokenizer(folder / "tokenizer.json")


def test_hf_tokenizer_config_naming_a_token_its_tokenizer_lacks_is_refused_not_dropped(tmp_path):
    """A BOS the tokenizer.json does not have, dropped, would train without the BOS the base was trained with."""
    with pytest.raises(UserError, match=r"gives the bos_token '<s>', which .*tokenizer.json does not have"):
        Tokenizer(hf_tokenizer_folder(tmp_path / "bos", bos="<s>"))
    folder = hf_tokenizer_folder(tmp_path / "pad")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<pad>"}))
    with pytest.raises(UserError, match="gives the pad_token '<pad>'"):
        Tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                              "pad_token": "<|im_end|>"}))
    assert Tokenizer(folder).pad_id == Tokenizer(folder).hf.token_to_id("<|im_end|>")  # one it has: taken
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                              "pad_token": "<|endoftext|>"}))
    tok = Tokenizer(folder)
    assert tok.pad_id == tok.hf.token_to_id("<|endoftext|>") == 0 != tok.eos_id  # id 0 is a pad token too


# ---------------------------------------------------------------------------------------------
# A differential fuzz: each kind of tokenizer file against an independent reference, on seeded random text

FUZZ_PIECES = [" ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\u200b", "\ufeff", "\x00", "\x1b",
               "\x85", "\u2028", "e\u0301", "\u0301", "🙂", "👩\u200d💻", "🇺🇸", "\U00020000", "\U0010fffd", "\ue000",
               "ﬁ", "ｆｕｌｌ", "1234567", "3.14", "don't", "I'M", "we'LL", "中文", "한국어", "עברית", "Hello",
               " world", "▁", "▁▁x", "<0x41>", "{instruction}", "</s>", "<s>", "<unk>", "</s", "s>", "<|eot_id|>",
               "<|eot_id", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|endoftext|>",
               "<|reserved_special_token_7|>"]


def fuzz_texts(seed, n):
    """n seeded random strings: the pieces above (white space runs, "\\r\\n", combining marks, emoji, control
    characters, special tokens' strings and near misses) and Latin runs, code points from every plane, long words."""
    rng = random.Random(seed)

    def one():
        if rng.random() < 0.15:  # any code point but a lone surrogate (records refuse those)
            return "".join(chr(c) for c in (rng.randrange(0x110000) for _ in range(rng.randrange(25)))
                           if not 0xD800 <= c < 0xE000)
        if rng.random() < 0.06:
            return rng.choice(["", " ", "x" * 1500, "a" + "\u0301" * 30, "9" * 40, " " * 20 + "y" + " " * 20])
        return "".join(rng.choice(FUZZ_PIECES) if rng.random() < 0.7 else
                       chr(rng.randrange(0x20, 0x250)) * rng.randrange(1, 4) for _ in range(rng.randrange(1, 12)))
    return [one() for _ in range(n)]


def fuzz_records(seed, n):
    """n records of fuzz_texts, their "input" a text, empty, null or (one in 7) absent."""
    rng, texts = random.Random(seed), fuzz_texts(seed, 3 * n)
    records = [{"instruction": texts[i], "input": rng.choice([texts[i + 1], "", None]), "output": texts[i + 2]}
               for i in range(0, 3 * n, 3)]
    for record in records[::7]:
        del record["input"]
    return records


def llama2_tokenizer_json(sp, folder, legacy=True):
    """The folder of Llama-2-7b-hf's tokenizer.json and tokenizer_config.json, from its SentencePiece model as
    transformers' LlamaConverter writes them: the pieces as a byte-fallback BPE whose merges follow the merged piece's
    score, <unk> <s> </s> as special tokens; legacy: a "▁" before each stretch of text between special tokens and for
    each space (Llama-2-7b-hf's, Mistral-7B-v0.1's); else Metaspace's "▁" before the text's first stretch only."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = [i for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    merges = [(-sp.get_score(i), -k, k - len(piece), piece[:k], piece[k:]) for i in normal
              for piece in [sp.id_to_piece(i)] for k in range(1, len(piece)) if {piece[:k], piece[k:]} <= vocab.keys()]
    tok = tokenizers.Tokenizer(models.BPE(vocab, [m[3:] for m in sorted(merges)], unk_token="<unk>", fuse_unk=True,
                                          byte_fallback=True))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in ("<unk>", "<s>", "</s>")])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "unk_token": "<unk>", "legacy": legacy}))
    return folder


@needs_fixtures
def test_fuzz_llama2_sentencepiece_against_sentencepiece_and_the_reconstruction_of_transformers_430(tok, sp):
    """Seeded random text, as Meta's SentencePiece encodes and decodes it, and as the authors' transformers 4.30 split
    it on <s>, </s> and <unk> (DESIGN.md); random records, cut at random lengths, as their build_dataset.py encoded."""
    for text in fuzz_texts(0, 300):
        ids = tok.encode(text)
        assert ids == sp.encode(text) and tok.decode(ids) == sp.decode(ids), repr(text)
        assert tok.encode(text, special=True) == reference_llama_tokenizer_430(sp, text, False), repr(text)
    rng = random.Random(1)
    for example in fuzz_records(1, 150):
        max_len = rng.choice([1, 9, 64, 10**6])
        assert encode_example(tok, example, max_len) == reference_build_dataset(sp, example, max_len), example


@needs_fixtures
def test_fuzz_llama2s_tokenizer_json_gives_its_sentencepiece_models_ids_and_transformers_fast_ids(tmp_path, tok, sp):
    """Llama-2-7b-hf's folder (its tokenizer.json, legacy) encodes every record as the authors did with the
    tokenizer.model; a Metaspace tokenizer.json (Mistral-7B-v0.3's form) as transformers' fast tokenizer does, which
    puts no "▁" after a special token: the text between them is not encoded piece by piece."""
    legacy = Tokenizer(llama2_tokenizer_json(sp, tmp_path / "legacy"))
    texts = fuzz_texts(2, 200)
    for text in texts:
        for special in (False, True):
            assert legacy.encode(text, bos=True, special=special) == tok.encode(text, bos=True, special=special), text
    for example in fuzz_records(3, 100):
        assert encode_example(legacy, example, 10**6) == encode_example(tok, example, 10**6), example
    transformers = pytest.importorskip("transformers")
    for folder in (tmp_path / "legacy", llama2_tokenizer_json(sp, tmp_path / "first", legacy=False)):
        ours = Tokenizer(folder)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        for text in texts:
            assert ours.encode(text) == fast(text, add_special_tokens=False, split_special_tokens=True).input_ids, text
            ids = ours.encode(text, special=True)
            assert ids == fast(text, add_special_tokens=False).input_ids and ours.decode(ids) == fast.decode(ids), text


def llama3_files(folder, texts):
    """A LLaMA-3 tokenizer.model (tiktoken: base64 bytes, rank) of a byte-level BPE trained on texts, and beside it in
    folder/hf the tokenizer.json transformers' TikTokenConverter makes of it (merges from each token's splits into
    two tokens, by rank), with Meta's 256 specials numbered after the ranks and LLaMA-3's tokenizer_config.json."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(tokenizer.LLAMA3_PATTERN), "isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trained = tokenizers.Tokenizer(models.BPE())
    trained.pre_tokenizer = split
    trained.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    shown = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's bytes_to_unicode: those shown as themselves
    to_char = {b: chr(b) for b in shown} | {b: chr(256 + n) for n, b in enumerate(sorted(set(range(256)) - set(shown)))}
    to_byte = {c: b for b, c in to_char.items()}
    ranks = {bytes(to_byte[c] for c in token): i for token, i in trained.get_vocab().items()}
    assert sorted(ranks.values()) == list(range(len(ranks)))
    (folder / "hf").mkdir(parents=True)
    (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for t, i in ranks.items()))
    chars = lambda t: "".join(to_char[b] for b in t)  # noqa: E731
    merges = sorted((i, ranks[t[:k]], ranks[t[k:]], chars(t[:k]), chars(t[k:])) for t, i in ranks.items()
                    for k in range(1, len(t)) if t[:k] in ranks and t[k:] in ranks)
    hf = tokenizers.Tokenizer(models.BPE({chars(t): i for t, i in ranks.items()}, [m[3:] for m in merges],
                                         ignore_merges=True))
    hf.pre_tokenizer, hf.decoder = split, decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in tokenizer.LLAMA3_SPECIALS])
    hf.save(str(folder / "hf" / "tokenizer.json"))
    (folder / "hf" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                     "eos_token": "<|end_of_text|>"}))
    return folder / "tokenizer.model", folder / "hf"


def test_fuzz_llama3s_tiktoken_file_and_its_tokenizer_json_give_the_same_ids_and_text(tmp_path):
    """LLaMA-3's two files (Meta's tiktoken tokenizer.model, Hugging Face's tokenizer.json) give every text and record
    the same ids, BOS and EOS included, and decode any ids (partial UTF-8 too) to the same text."""
    pytest.importorskip("tiktoken")
    tiktoken_file, folder = llama3_files(tmp_path, TEXTS + fuzz_texts(4, 200))
    meta, hf = Tokenizer(tiktoken_file), Tokenizer(folder)
    assert (meta.kind, hf.kind) == ("tiktoken", "tokenizers")
    assert (meta.vocab_size, meta.bos_id, meta.eos_id) == (hf.vocab_size, hf.bos_id, hf.eos_id)
    rng = random.Random(5)
    for text in fuzz_texts(5, 300):
        for special in (False, True):
            ids = meta.encode(text, bos=True, special=special)
            assert ids == hf.encode(text, bos=True, special=special), repr(text)
        assert meta.decode(meta.encode(text)) == text == hf.decode(meta.encode(text)), repr(text)  # no normalizer
        ids = [rng.randrange(meta.vocab_size) for _ in range(rng.randrange(8))]
        assert meta.decode(ids) == hf.decode(ids), ids
    for example in fuzz_records(6, 150):
        assert encode_example(meta, example, 10**6) == encode_example(hf, example, 10**6), example


def test_fuzz_hf_tokenizer_json_and_its_records_against_transformers_fast_tokenizer(tmp_path):
    """A Qwen-like tokenizer.json (a non-special added token too, as Qwen3's <think>) against transformers' fast
    tokenizer: plain text keeps special tokens' strings as text, special=True makes them ids, and a record is BOS
    (none here) + fast(instruction [\\n input] + EOS) then fast(output + EOS), the prompt's "</s>" being the EOS."""
    transformers = pytest.importorskip("transformers")
    folder = hf_tokenizer_folder(tmp_path / "qwen", eos="<|im_end|>")
    package = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    package["added_tokens"].append({"id": max(package["model"]["vocab"].values()) + 1, "content": "<think>",
                                    "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                                    "special": False})
    (folder / "tokenizer.json").write_text(json.dumps(package), encoding="utf-8")
    ours = Tokenizer(folder)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>")
    ids_of = lambda text: fast(text.replace("</s>", "<|im_end|>"), add_special_tokens=False).input_ids  # noqa: E731
    for text in fuzz_texts(7, 300) + ["a <think> b"]:
        assert ours.encode(text) == fast(text, add_special_tokens=False, split_special_tokens=True).input_ids, text
        ids = ours.encode(text, special=True)
        assert ids == ids_of(text) and ours.decode(ids) == fast.decode(ids), repr(text)
    for example in fuzz_records(8, 150):
        prompt = example["instruction"] + ("\n" + example["input"] if example.get("input") else "")
        source, target = ids_of(prompt + "</s>"), ids_of(example["output"] + "<|im_end|>")
        assert encode_example(ours, example, 10**6) == (source + target, [-100] * len(source) + target), example


# ---------------------------------------------------------------------------------------------
# Gaps found by mutation testing

def test_tiktoken_file_skips_blank_lines_and_names_a_corrupt_line(tmp_path):
    pytest.importorskip("tiktoken")
    write_tiktoken_file(tmp_path / "clean.model")
    lines = (tmp_path / "clean.model").read_text().splitlines(keepends=True)
    (tmp_path / "blank.model").write_text("".join(lines[:100]) + "\n  \n" + "".join(lines[100:]) + "\n")
    clean, blank = Tokenizer(tmp_path / "clean.model"), Tokenizer(tmp_path / "blank.model")
    assert (blank.vocab_size, blank.bos_id, blank.eos_id) == (clean.vocab_size, clean.bos_id, clean.eos_id)
    assert blank.encode("hello world héllo", bos=True) == clean.encode("hello world héllo", bos=True)
    token, rank = lines[9].split()  # line 10: a token with a character base64 does not have
    (tmp_path / "bad.model").write_text("".join(lines[:9]) + f"{token[:1]}*{token[1:]} {rank}\n" + "".join(lines[10:]))
    with pytest.raises(UserError, match="bad.model line 10: expected '<base64 token> <rank>'"):
        Tokenizer(tmp_path / "bad.model")


@pytest.mark.parametrize("before", [b"\n", b"\r\n \n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n"])
def test_a_tiktoken_file_with_a_bom_or_blank_lines_before_its_first_token_reads_as_the_clean_file(tmp_path, before):
    """As tiktoken's own reader takes them (and this one takes blank lines further on): the file was called neither a
    SentencePiece model nor a tiktoken file, its user told to pass the tokenizer.model they had passed."""
    pytest.importorskip("tiktoken")
    write_tiktoken_file(tmp_path / "clean.model")
    (tmp_path / "saved.model").write_bytes(before + (tmp_path / "clean.model").read_bytes())
    clean, saved = Tokenizer(tmp_path / "clean.model"), Tokenizer(tmp_path / "saved.model")
    assert (saved.kind, saved.vocab_size, saved.bos_id, saved.eos_id) == ("tiktoken", clean.vocab_size, clean.bos_id,
                                                                          clean.eos_id)
    assert saved.encode("hello world héllo", bos=True) == clean.encode("hello world héllo", bos=True)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model"])
def test_a_tokenizer_json_with_a_bom_reads_as_the_clean_file(tmp_path, name):
    """The tokenizers package refuses a UTF-8 byte-order mark (as an editor may save one) as "expected value at line 1
    column 1": the file was called not a valid tokenizer.json, and under another name not a tokenizer at all. Its
    tokenizer_config.json with one reads too (read_json's), as a tiktoken file with one does."""
    clean = Tokenizer(hf_tokenizer_folder(tmp_path / "clean", bos="<|im_start|>", eos="<|im_end|>"))
    folder = hf_tokenizer_folder(tmp_path / "bom", bos="<|im_start|>", eos="<|im_end|>")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (folder / file).write_bytes(b"\xef\xbb\xbf" + (folder / file).read_bytes())
    os.replace(folder / "tokenizer.json", folder / name)
    saved = Tokenizer(folder / name)
    assert (saved.kind, saved.vocab_size, saved.bos_id, saved.eos_id, saved.pad_id) == (
        "tokenizers", clean.vocab_size, clean.bos_id, clean.eos_id, clean.pad_id)
    text = TEXTS[1] + " ünïcödé <|im_end|> </s>"
    for special in (False, True):
        assert saved.encode(text, bos=True, special=special) == clean.encode(text, bos=True, special=special)
    assert saved.decode(clean.encode(text)) == clean.decode(clean.encode(text)) == text


def test_a_tokenizer_json_that_is_not_utf8_is_named_as_such(tmp_path):
    """Said in the codec's words or the package's ("stream did not contain valid UTF-8"), not as other files are."""
    folder = hf_tokenizer_folder(tmp_path / "t")
    (folder / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes().replace(b"<|im_end|>",
                                                                                             b"<|im_\xffend|>", 1))
    with pytest.raises(UserError) as error:
        Tokenizer(folder)
    assert str(error.value) == (f"{folder / 'tokenizer.json'} is not UTF-8 text (invalid start byte), so not a "
                                "tokenizer.json; pass the checkpoint's unmodified tokenizer.json")


def test_hf_tokenizer_config_may_give_its_tokens_as_added_token_objects(tmp_path):
    plain = Tokenizer(hf_tokenizer_folder(tmp_path / "plain", bos="<|im_start|>", eos="<|im_end|>"))
    folder = hf_tokenizer_folder(tmp_path / "objects")
    added = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "rstrip": False, "special": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": added("<|im_start|>"), "eos_token": added("<|im_end|>"), "pad_token": None}))
    tok = Tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_text) == (plain.bos_id, plain.eos_id, plain.pad_id,
                                                                  plain.eos_text)
    assert tok.eos_id == tok.hf.token_to_id("<|im_end|>") and tok.eos_text == "<|im_end|>"


def test_hf_tokenizer_decode_round_trips_special_tokens(tmp_path):
    tok = Tokenizer(hf_tokenizer_folder(tmp_path / "qwen"))
    for text in ("x <|endoftext|> y", TEXTS[0] + "<|im_start|>" + TEXTS[1] + "<|endoftext|>"):
        ids = tok.encode(text, special=True)
        assert tok.eos_id in ids or tok.hf.token_to_id("<|im_start|>") in ids
        assert tok.decode(ids) == text  # as tiktoken and transformers' decode: special tokens are kept


@pytest.mark.parametrize("name, content, message", [
    ("bad.json", f"[\n{GOOD},\n{GOOD},\n{{\"instruction\" \"a\"}}\n]", r"bad.json line 4: record 2 is not valid JSON"),
    ("comma.json", f"[\n{GOOD}\n\n{GOOD}]", r"comma.json line 4: expected ',' or '\]' after record 0"),
    ("tail.json", f"[{GOOD},\n{GOOD}\n]\n\n[", r"tail.json line 5: unexpected text after the closing"),
])
def test_json_list_errors_name_the_same_line_whatever_the_read_size(tmp_path, monkeypatch, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    for read in (1, 7, 40, 1 << 20):  # errors found after the buffer was refilled count the lines read before
        monkeypatch.setattr(data, "_READ", read)
        with pytest.raises(UserError, match=message):
            list(data._iter_json_list(path))


def test_json_list_errors_in_pretty_printed_records_name_the_line_json_names(tmp_path, monkeypatch):
    records = json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 3, indent=2)
    text = records[:-2] + ',\n  {"instruction" "a"}\n]'  # a broken fourth record after three of several lines
    with pytest.raises(json.JSONDecodeError) as e:
        json.loads(text)
    path = tmp_path / "pretty.json"
    path.write_text(text)
    for read in (1, 7, 40, 1 << 20):  # a record cut by the buffer's end carries its lines into the next buffer
        monkeypatch.setattr(data, "_READ", read)
        with pytest.raises(UserError, match=rf"pretty.json line {e.value.lineno}: record 3 is not valid JSON"):
            list(data._iter_json_list(path))


def test_json_list_with_a_trailing_comma_is_refused(tmp_path, tiny_spm):
    path = tmp_path / "trailing.json"
    path.write_text(f"[{GOOD}, {GOOD},\n]")
    with pytest.raises(UserError, match=r"trailing.json line 2: record 2 is not valid JSON"):
        prepare([path], tiny_spm, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()


def test_files_with_a_utf8_byte_order_mark_prepare_like_files_without(tmp_path, tiny_spm):
    records = [{"instruction": f"the quick fox {i}", "input": "", "output": f"dog {i}"} for i in range(5)]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    listed = json.dumps(records, indent=1)
    for name, text in (("plain.jsonl", lines), ("bom.jsonl", "\ufeff" + lines), ("plain.json", listed),
                       ("bom.json", "\ufeff\n" + listed)):
        (tmp_path / name).write_text(text, encoding="utf-8")
        prepare([tmp_path / name], tiny_spm, tmp_path / f"out_{name}", workers=1)
    want = shard_records(tmp_path / "out_plain.jsonl")
    assert len(want) == 5
    for name in ("bom.jsonl", "plain.json", "bom.json"):
        assert shard_records(tmp_path / f"out_{name}") == want, name


def test_a_file_that_starts_with_many_blank_lines_prepares_like_one_without_not_as_empty(tmp_path, tiny_spm):
    """Its kind was told from its first 4096 bytes, so more blank lines than that made a file of records "empty"."""
    lines = f"{GOOD}\n{GOOD}\n"
    for name, text in (("plain.jsonl", lines), ("blank.jsonl", "\ufeff" + "\r\n" * 3000 + lines),
                       ("blank.json", "\n" * 5000 + f"[{GOOD},\n{GOOD}]")):
        (tmp_path / name).write_text(text, encoding="utf-8", newline="")
        assert prepare([tmp_path / name], tiny_spm, tmp_path / f"out_{name}", workers=1)["records"] == 2
        assert shard_records(tmp_path / f"out_{name}") == shard_records(tmp_path / "out_plain.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n" * 5000)
    with pytest.raises(UserError, match="blank.jsonl is empty"):
        prepare([tmp_path / "blank.jsonl"], tiny_spm, tmp_path / "out", workers=1)


@pytest.mark.parametrize("workers", [1, 2])
def test_jsonl_with_old_mac_line_ends_prepares_as_read_jsonl_reads_it_and_names_lines_as_it_does(tmp_path, tiny_spm,
                                                                                                 workers):
    """A file whose lines end in a lone carriage return (old Macs) was one line to prepare, refused as 'line 1: not
    valid JSON (Extra data, ...)', while read_jsonl (evaluation sets, tasks.py) reads its records in text mode.
    prepare reads the lines text mode reads: the same shards as from \\n, a broken record named by its line."""
    records = [{"instruction": f"say {i}", "input": "in\r\nput" * i, "output": f"w{i}"} for i in range(5)]
    for name, end in (("lf.jsonl", "\n"), ("cr.jsonl", "\r"), ("mixed.jsonl", None)):
        ends = [end] * 5 if end else ["\r", "\r\n", "\n", "\r", "\r\n"]
        (tmp_path / name).write_bytes("".join(json.dumps(r) + e for r, e in zip(records, ends)).encode())
        assert [obj for _, obj in data.read_jsonl(tmp_path / name)] == records
        prepare([tmp_path / name], tiny_spm, tmp_path / f"out_{name}", workers=workers, quiet=True)
        assert shard_records(tmp_path / f"out_{name}") == shard_records(tmp_path / "out_lf.jsonl"), name
    (tmp_path / "broken.jsonl").write_bytes(f"{GOOD}\r{GOOD}\r\n{GOOD[:-5]}\r{GOOD}\r".encode())
    line = re.escape(f"{tmp_path / 'broken.jsonl'} line 3")
    with pytest.raises(UserError, match=f"^{line} is not valid JSON"):
        list(data.read_jsonl(tmp_path / "broken.jsonl"))
    with pytest.raises(UserError, match=f"^{line}: not valid JSON"):
        prepare([tmp_path / "broken.jsonl"], tiny_spm, tmp_path / "out", workers=workers)
    (tmp_path / "pretty.jsonl").write_bytes(json.dumps(records[0], indent=1).replace("\n", "\r").encode())
    with pytest.raises(UserError, match="holds one JSON object spread over lines, not a list of records"):
        prepare([tmp_path / "pretty.jsonl"], tiny_spm, tmp_path / "out", workers=workers)


def test_worker_processes_hold_a_bounded_number_of_chunks_in_flight_whatever_the_input_size(monkeypatch):
    """prepare's memory is bounded by the chunks in flight, not by the input: with a pool that answers at once, the
    most chunks handed out before their results are read is the same for 40 chunks as for 400, and the results
    come back in input order."""
    import concurrent.futures

    class Pool:
        def __init__(self, workers, context, initializer, initargs):
            self.in_flight = self.peak = 0
            pools.append(self)

        def shutdown(self, wait, cancel_futures):
            pass

        def submit(self, fn, *args):
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            value, pool = fn(*args), self

            class Result:
                def result(self):
                    pool.in_flight -= 1
                    return value
            return Result()

    pools = []
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Pool)
    for n in (40, 400):
        assert list(data._map_ordered(lambda job: 2 * job, iter(range(n)), 2, "unused.model")) == \
            [2 * j for j in range(n)]
    assert pools[0].peak == pools[1].peak < 40


def test_val_split_has_the_asked_share_and_does_not_depend_on_how_the_inputs_are_cut(tmp_path, tiny_spm):
    """Over 1100 records (more than one 512-record chunk): the same records go to val whether they
    come in one file or in two, and the val share is about val_fraction."""
    records = [json.dumps({"instruction": f"the quick fox {i}", "input": "", "output": f"lazy dog {i}"}) + "\n"
               for i in range(1100)]
    (tmp_path / "all.jsonl").write_text("".join(records))
    (tmp_path / "a.jsonl").write_text("".join(records[:600]))
    (tmp_path / "b.jsonl").write_text("".join(records[600:]))
    one = prepare([tmp_path / "all.jsonl"], tiny_spm, tmp_path / "one", val_fraction=0.3, seed=5, workers=1)
    two = prepare([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tiny_spm, tmp_path / "two", val_fraction=0.3,
                  seed=5, workers=1)
    assert one["splits"] == two["splits"]
    for name in data.PREPARE_FILES[:-1]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    n_val = one["splits"]["val"]["records"]
    assert abs(n_val - 0.3 * 1100) < 5 * (1100 * 0.3 * 0.7) ** 0.5  # binomial: within 5 standard deviations
    for fraction in (0.05, 0.5, 0.9):
        share = data._in_val(7, np.arange(50000), fraction).mean()
        assert abs(share - fraction) < 0.01, fraction


def test_dataset_refuses_a_zero_prompt_length(tmp_path, tiny_spm):
    out = tmp_path / "out"
    prepare([write_records(tmp_path / "d.jsonl", 10)], tiny_spm, out, workers=1)
    lens = np.fromfile(out / "train.prompt_lens.bin", np.int32)
    lens[3] = 0  # every record starts with BOS, so no prepare writes 0
    lens.tofile(out / "train.prompt_lens.bin")
    with pytest.raises(UserError, match="train.prompt_lens.bin holds prompt lengths"):
        TokenDataset(out)


def test_dataset_names_a_missing_split(tmp_path, tiny_spm):
    prepare([write_records(tmp_path / "d.jsonl", 3)], tiny_spm, tmp_path / "out", workers=1)
    with pytest.raises(UserError, match=r"has no split 'test'; the splits are \['train', 'val'\]"):
        TokenDataset(tmp_path / "out", "test")


def test_prepare_never_removes_a_folder_with_its_temporary_name_holding_other_files(tmp_path, tiny_spm):
    source = write_records(tmp_path / "d.jsonl", 3)
    squatter = tmp_path / f"out.tmp-{os.getpid()}"  # this process's own temporary name: it runs, so not stale
    squatter.mkdir()
    (squatter / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=f"{squatter} exists and is not a temporary folder of prepare"):
        prepare([source], tiny_spm, tmp_path / "out", workers=1)
    assert (squatter / "notes.txt").read_text() == "keep me" and not (tmp_path / "out").exists()


def test_a_file_with_prepares_temporary_name_is_named_and_kept(tmp_path, tiny_spm):
    """Not only a folder: a file there (or a link) would stop os.makedirs with an OSError that blames the disk."""
    squatter = tmp_path / f"out.tmp-{os.getpid()}"
    squatter.write_text("keep me")
    with pytest.raises(UserError, match=f"{squatter} exists and is not a temporary folder of prepare"):
        prepare([write_records(tmp_path / "d.jsonl", 3)], tiny_spm, tmp_path / "out", workers=1)
    assert squatter.read_text() == "keep me" and not (tmp_path / "out").exists()


def test_inputs_beside_out_whose_names_start_like_it_are_not_inside_it(tmp_path, tiny_spm):
    (tmp_path / "out_raw").mkdir()
    source = write_records(tmp_path / "out_raw" / "d.jsonl", 3)
    tokenizer = tmp_path / "out.model"
    tokenizer.write_bytes(tiny_spm.read_bytes())
    assert prepare([source], tokenizer, tmp_path / "out", workers=1)["records"] == 3
    assert prepare([source], tokenizer, str(tmp_path / "out") + "/", workers=1)["records"] == 3  # replaced


@pytest.mark.skipif(os.name == "nt", reason="symbolic links")
@pytest.mark.parametrize("made", [True, False])
def test_an_out_that_links_to_a_folder_on_another_disk_gets_the_shards(tmp_path, tiny_spm, monkeypatch, made):
    """--out data/cme -> /big/disk/cme: the output was built beside the link, and the renames into the disk failed
    once every record was encoded ("Invalid cross-device link"; "Not a directory" for a folder not made yet)."""
    disk, link, source = tmp_path / "disk", tmp_path / "shards", write_records(tmp_path / "d.jsonl", 3)
    (disk / "cme" if made else disk).mkdir(parents=True)
    link.symlink_to(disk / "cme")

    def across_disks(move):  # a rename into or out of the disk fails, as between two mounted file systems
        def moved(src, dst):
            if data.inside(src, disk) != data.inside(dst, disk):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src)
            return move(src, dst)
        return moved
    monkeypatch.setattr(os, "replace", across_disks(os.replace))
    monkeypatch.setattr(os, "rename", across_disks(os.rename))
    for records in (3, 5):  # a new output, then one replaced
        write_records(source, records)
        assert prepare([source], tiny_spm, link, workers=1)["records"] == records
        assert link.is_symlink() and len(TokenDataset(link)) == records
        assert sorted(os.listdir(disk / "cme")) == sorted(data.PREPARE_FILES)
        assert leftovers(tmp_path) == leftovers(disk) == []


def test_read_jsonl_names_a_line_holding_a_number_too_long_to_read(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(f"{GOOD}\n{HUGE}\n")
    with pytest.raises(UserError, match=f"{path} line 2 holds a number of more than [\\d,]+ digits, too long to read; "
                                        "fix or remove that line"):
        list(data.read_jsonl(path))


def test_read_jsonl_refuses_a_named_pipe_a_folder_or_a_loop_of_links_in_one_sentence(tmp_path):
    """An evaluation set or a task's raw file that is a named pipe was opened and waited on forever (no writer); a
    folder or a loop of links was an OSError's traceback."""
    os.symlink("loop.jsonl", tmp_path / "loop.jsonl")
    (tmp_path / "folder.jsonl").mkdir()
    with named_pipe(tmp_path / "pipe.jsonl", f"{GOOD}\n".encode()):
        for name, message in (("pipe", "is a named pipe, not a file"), ("folder", "is a folder, not a file"),
                              ("loop", "can not be read (Too many levels of symbolic links)")):
            with pytest.raises(UserError) as error:
                list(data.read_jsonl(tmp_path / f"{name}.jsonl"))
            assert str(error.value).startswith(f"{tmp_path / name}.jsonl {message}; give a JSONL file"), error.value


def test_prepare_names_an_input_that_is_a_named_pipe_as_one_not_as_missing(tmp_path, tiny_spm, capsys):
    """`--input /dev/stdin` under a shell pipe, or bash's <(...): it exists, so "not found" sent the user looking."""
    with named_pipe(tmp_path / "pipe.jsonl", f"{GOOD}\n".encode()):
        err = script_error(data.main, ["prepare", "--input", tmp_path / "pipe.jsonl", "--tokenizer", tiny_spm,
                                       "--out", tmp_path / "out", "--workers", "1"], capsys)
    assert f"input {tmp_path / 'pipe.jsonl'} is a named pipe, not a file; save the records to a file" in err
    assert not (tmp_path / "out").exists()


def test_read_jsonl_names_a_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(f'{GOOD}\n\n["a", "b"]\n{GOOD}\n')
    with pytest.raises(UserError, match=f"{path} line 3 is not a JSON object"):
        list(data.read_jsonl(path))
    path.write_text(f"{GOOD}\n\n{GOOD}\n")
    assert [where for where, _ in data.read_jsonl(path)] == [f"{path} line 1", f"{path} line 3"]


@pytest.mark.parametrize("value", ['"text"', "7", "null", "true"])
def test_read_jsonl_names_a_line_holding_any_json_value_but_an_object(tmp_path, value):
    path = tmp_path / "e.jsonl"
    path.write_text(f"{GOOD}\n{value}\n")
    with pytest.raises(UserError, match=f"{path} line 2 is not a JSON object"):
        list(data.read_jsonl(path))


def test_the_line_named_before_a_byte_that_is_not_utf8_was_read_whole_wherever_a_read_block_ends(tmp_path):
    """The named line comes before the bad one, also when the good lines end exactly where a block of the text's
    reads does (64-byte lines: some count of them fills the 8192-byte block)."""
    line = '{"instruction": "' + "a" * 29 + '", "output": "b"}\n'
    assert len(line) == 64
    for n in range(120, 140):
        path = tmp_path / f"{n}.jsonl"
        path.write_bytes(line.encode() * n + b'{"instruction": "caf\xe9"}\n')
        with pytest.raises(UserError) as error:
            list(data.read_jsonl(path))
        named = re.search(r"after line (\d+)", str(error.value))
        assert named is None or int(named[1]) <= n, str(error.value)


def test_a_summary_json_that_is_a_folder_or_a_named_pipe_is_named_not_read(tmp_path, tiny_spm):
    """Opening a named pipe waits for a writer forever, and a folder is IsADirectoryError's traceback; both were
    called missing ("has no summary.json"), beside the summary.json the user sees there."""
    out = tmp_path / "out"
    prepare([write_records(tmp_path / "d.jsonl", 4)], tiny_spm, out, workers=1)
    content = (out / "summary.json").read_bytes()
    (out / "summary.json").unlink()
    (out / "summary.json").mkdir()
    with pytest.raises(UserError, match=f"^{out}/summary.json is a folder, not a file; delete it and run prepare"):
        TokenDataset(out)
    (out / "summary.json").rmdir()
    with named_pipe(out / "summary.json", content):
        with pytest.raises(UserError, match=f"^{out}/summary.json is a named pipe, not a file; delete it and run "
                                            "prepare again"):
            TokenDataset(out)


def test_a_data_dir_that_is_a_file_or_missing_is_named_as_such_not_sent_to_prepare(tmp_path):
    """Both were "has no summary.json; make it with: python data.py prepare --out X", which prepare refuses for a
    file (a user's) and which misleads for a typo in the path."""
    (tmp_path / "notes.txt").write_text("not shards\n")
    with pytest.raises(UserError, match=f"^{tmp_path}/notes.txt is a file, not a folder of token shards; point at "
                                        "the --out folder of python data.py prepare$"):
        TokenDataset(tmp_path / "notes.txt")
    with pytest.raises(UserError, match=f"^{tmp_path}/tokns does not exist; point at the --out folder"):
        TokenDataset(tmp_path / "tokns")


@pytest.mark.parametrize("blank", [4094, 4095, 4096, 4097, 8191])
def test_a_jsonl_file_whose_first_record_starts_at_the_end_of_a_read_is_jsonl(tmp_path, blank):
    """The kind is told from the first non-blank byte and its line: a "{" that ends a 4096-byte read is the start of
    a record (the rest of its line read too), not a lone "{" of an object spread over lines."""
    path = tmp_path / "d.jsonl"
    path.write_text("\n" * blank + f"{GOOD}\n{GOOD}\n")
    assert data._file_kind(str(path)) == "jsonl"
    path.write_text("\n" * blank + f"[{GOOD},\n{GOOD}]")
    assert data._file_kind(str(path)) == "list"


def test_read_jsonl_names_a_line_at_or_before_a_byte_that_is_not_utf8_far_into_the_file(tmp_path):
    """Text is decoded a block of lines at a time: the line named is one read whole before the bad byte, not 0."""
    path = tmp_path / "e.jsonl"
    path.write_bytes(f"{GOOD}\n".encode() * 2000 + b'{"instruction": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"e\.jsonl is not UTF-8 text \(after line (\d+): ") as error:
        list(data.read_jsonl(path))
    assert 0 < int(re.search(r"after line (\d+)", str(error.value))[1]) <= 2000


@pytest.mark.parametrize("name, record, message", [
    ("qa", dict(output=5), '"output" is a number, not a string'),
    ("qa", dict(output=["a"]), '"output" is a list, not a string'),
    ("sentiment", dict(output=5), '"output" is a number, not a string'),
    ("qa", dict(answers=["b", 2]), '"answers" holds a number where only strings belong'),
    ("qa", dict(answers="b"), '"answers" is a string, not a list of strings'),
    ("qa", {"input": 5}, '"input" is a number, not a string'),
    ("qa", {"input": "\ud800"}, '"input" holds a lone surrogate'),
    ("qa", {"instruction": None}, '"instruction" is null, not a string'),
])
def test_evaluation_records_are_checked_when_loaded_with_file_and_line(tmp_path, name, record, message):
    """train.py loads eval_dir before step 1: every field the prompts and the scorers read is checked there, not
    after training."""
    import evaluation
    good = {"instruction": "q", "input": "", "output": "b", "answers": ["b", "bee"]}
    good["output"] = "negative" if name == "sentiment" else "b"  # one of sentiment's labels: the label check
    (tmp_path / f"{name}.jsonl").write_text(f"{json.dumps(good)}\n{json.dumps(dict(good, **record))}\n")
    with pytest.raises(UserError, match=f'{tmp_path / name}.jsonl line 2: {re.escape(message)}') as failure:
        evaluation.load_eval_sets({"eval_dir": str(tmp_path), "eval_limit": 0})
    assert "\n" not in str(failure.value)


@pytest.mark.parametrize("name, content, message", [
    ("qa.jsonl", "\n", "qa.jsonl holds no records; write it again with python tasks.py"),
    ("qa.json", "[]", "holds qa.json: evaluation sets are JSONL, one record per line; write them with python tasks.py"),
])
def test_an_empty_or_json_list_evaluation_set_is_refused_when_loaded(tmp_path, name, content, message):
    import evaluation
    (tmp_path / "nli.jsonl").write_text(json.dumps({"instruction": "q", "output": "neutral"}) + "\n")
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=re.escape(message)):
        evaluation.load_eval_sets({"eval_dir": str(tmp_path), "eval_limit": 0})


def test_an_eval_dir_without_any_task_file_is_refused_and_tasks_load_in_name_order(tmp_path, monkeypatch):
    """An eval_dir holding no <task>.jsonl would score nothing after training without a word: it is refused when
    loaded. The sets load in the order of their names, not the folder's listing order: every rank under torchrun
    then generates the same tasks' batches in the same order, and the results table is in a fixed order."""
    import evaluation
    (tmp_path / "notes.txt").write_text("not an evaluation set")
    with pytest.raises(UserError, match=f"eval_dir '{tmp_path}' holds no <task>.jsonl files"):
        evaluation.load_eval_sets({"eval_dir": str(tmp_path), "eval_limit": 0})
    names = ["nli", "qa", "sentiment", "summary"]
    for name, output in zip(names, ["neutral", "a", "positive", "a"]):  # nli and sentiment: one of their labels
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"instruction": "q", "output": output}) + "\n")
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path: sorted(listdir(path), reverse=True))
    assert list(evaluation.load_eval_sets({"eval_dir": str(tmp_path), "eval_limit": 0})) == names
    for hidden in ("._qa.jsonl", ".~lock.nli.json"):  # macOS's copy of a file's attributes, an editor's lock: no sets
        (tmp_path / hidden).write_bytes(b"\x00\x05\x16\x07 not text")
    assert list(evaluation.load_eval_sets({"eval_dir": str(tmp_path), "eval_limit": 0})) == names


def test_an_evaluation_record_with_null_or_empty_answers_is_scored_by_its_output(tmp_path):
    """"answers": null or [] means no aliases (tasks.py's scorer falls back to the output): loaded as it is."""
    import evaluation
    import tasks
    records = [{"instruction": "q", "output": "a", "answers": None}, {"instruction": "q", "output": "a", "answers": []}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    task, loaded = evaluation.load_eval_sets({"eval_dir": str(tmp_path), "eval_limit": 0})["qa"]
    assert loaded == records
    assert tasks.evaluate(task, ["a", "a"], loaded) == 100.0


# ---------------------------------------------------------------------------------------------
# Gaps found by mutation testing: prepare's boundaries and order, batches, tokenizers, atomic writes

def test_a_record_is_dropped_exactly_when_max_len_leaves_no_answer_token_and_truncated_when_cut(tmp_path, tiny_spm):
    tok = Tokenizer(tiny_spm)
    record = {"instruction": "the quick brown fox", "input": "jumps", "output": "over the lazy dog"}
    source = tmp_path / "d.jsonl"
    source.write_text(json.dumps(record) + "\n" + GOOD + "\n")  # GOOD is short enough for every max_len below
    prompt, full = len(data.encode_prompt(tok, record)), len(encode_example(tok, record, 10**6)[0])
    assert len(encode_example(tok, json.loads(GOOD), 10**6)[0]) < prompt < full - 1
    for max_len in (prompt, prompt + 1, full - 1, full):
        summary = prepare([source], tiny_spm, tmp_path / f"out{max_len}", max_len=max_len, workers=1, quiet=True)
        dropped = max_len <= prompt  # the prompt fills the record: no answer token, no loss
        assert (summary["dropped_no_answer"], summary["truncated"]) == (int(dropped), int(max_len < full)), max_len
        want = [] if dropped else [encode_example(tok, record, max_len)]
        want.append(encode_example(tok, json.loads(GOOD), max_len))
        assert shard_records(tmp_path / f"out{max_len}") == [(ids, labels.count(-100)) for ids, labels in want]


def test_a_run_with_a_longer_max_len_than_prepare_cut_its_records_at_is_warned_they_stay_cut(tmp_path, tiny_spm):
    """Records prepare cut at its max_len stay cut whatever max_len a run asks for: a run asking for more is told
    how many and how to keep them whole; nothing is said where prepare cut nothing or the run asks no more."""
    tok = Tokenizer(tiny_spm)
    record = {"instruction": "the quick brown fox", "input": "jumps", "output": "over the lazy dog"}
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n" + GOOD + "\n")
    full, prompt = len(encode_example(tok, record, 10**6)[0]), len(data.encode_prompt(tok, record))
    prepare([tmp_path / "d.jsonl"], tiny_spm, tmp_path / "cut", max_len=full - 1, workers=1, quiet=True)
    prepare([tmp_path / "d.jsonl"], tiny_spm, tmp_path / "whole", max_len=full, workers=1, quiet=True)
    cut, whole = TokenDataset(tmp_path / "cut"), TokenDataset(tmp_path / "whole")
    warning = cut.cut_warning(full)
    assert f"prepare cut 1 of the records in {tmp_path / 'cut'} at max_len={full - 1}" in warning
    assert f"--max_len {full}" in warning
    assert cut.cut_warning(full - 1) is None and whole.cut_warning(4 * full) is None
    assert "cuts away the whole answer of 1 of 2 training records" in whole.cut_warning(prompt)


def test_which_records_go_to_val_does_not_depend_on_other_records_being_dropped(tmp_path, tiny_spm):
    """A record's split is a hash of its index over all inputs, dropped records counted: a smaller max_len
    drops the long records and leaves every other record in the split it had."""
    long = {"instruction": "the quick brown fox jumps over the lazy dog " * 3, "input": "", "output": "dog"}
    lines = [json.dumps({"instruction": "fox", "input": "", "output": f"dog {i}"} if i % 3 else long) + "\n"
             for i in range(1200)]  # more than two chunks of 512 records
    (tmp_path / "d.jsonl").write_text("".join(lines))
    args = dict(val_fraction=0.3, seed=4, workers=1, quiet=True)
    everything = prepare([tmp_path / "d.jsonl"], tiny_spm, tmp_path / "all", max_len=1024, **args)
    short = prepare([tmp_path / "d.jsonl"], tiny_spm, tmp_path / "short", max_len=24, **args)
    assert everything["dropped_no_answer"] == 0 and short["dropped_no_answer"] == 400
    for split in ("train", "val"):
        kept = [r for r in shard_records(tmp_path / "all", split) if len(r[0]) <= 24]
        assert 0 < len(kept) and shard_records(tmp_path / "short", split) == kept, split


def test_many_chunks_over_worker_processes_come_out_in_input_order(tmp_path, tiny_spm, monkeypatch):
    """Chunks of 5 records, a dozen in flight over 2 processes: the shards are those of one process."""
    import functools
    lines = [json.dumps({"instruction": f"fox {i}", "input": "", "output": "dog " * (i % 4 + 1)}) + "\n"
             for i in range(70)]
    (tmp_path / "d.jsonl").write_text("".join(lines))
    monkeypatch.setattr(data, "_chunks", functools.partial(data._chunks, size=5))
    for workers in (1, 2):
        prepare([tmp_path / "d.jsonl"], tiny_spm, tmp_path / f"w{workers}", val_fraction=0.2, workers=workers,
                quiet=True)
    for name in data.PREPARE_FILES[:-1]:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    records = shard_records(tmp_path / "w1") + shard_records(tmp_path / "w1", "val")
    assert len(records) == 70


def test_chunks_hold_size_records_each_but_a_files_last_and_keep_files_apart(tmp_path):
    """A worker's job is `size` records (the last of a file fewer), not one record a job: each job costs a round trip
    between processes. A file's records never share a job with the next file's."""
    for name, n in (("a.jsonl", 5), ("b.jsonl", 2)):
        (tmp_path / name).write_text("".join(json.dumps({"instruction": f"{name} {i}"}) + "\n" for i in range(n)))
    jobs = list(data._chunks([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], ["jsonl", "jsonl"], 64, size=2))
    assert [(i, len(items), max_len) for i, items, max_len in jobs] == [(0, 2, 64), (0, 2, 64), (0, 1, 64), (1, 2, 64)]
    assert [json.loads(payload)["instruction"] for _, items, _ in jobs for _, payload in items] == \
        [f"a.jsonl {i}" for i in range(5)] + [f"b.jsonl {i}" for i in range(2)]


@pytest.mark.parametrize("vocab_size, dtype", [(65536, "uint16"), (65537, "uint32")])
def test_the_token_dtype_holds_the_largest_id_and_no_more(tmp_path, vocab_size, dtype):
    """uint16 while every id fits (vocab_size <= 65536), uint32 from the first id that does not: the last
    special token (the largest id) survives the round trip."""
    pytest.importorskip("tiktoken")
    n_ranks = vocab_size - 256  # the 256 special tokens follow the ranks
    write_tiktoken_file(tmp_path / "t.model", [i.to_bytes(3, "big") for i in range(1 << 16, (1 << 16) + n_ranks - 265)])
    tok = Tokenizer(tmp_path / "t.model")
    assert tok.vocab_size == vocab_size
    last = "<|reserved_special_token_250|>"
    record = {"text": f"hello{last} world"}
    assert max(encode_example(tok, record)[0]) == vocab_size - 1
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    summary = prepare([tmp_path / "d.jsonl"], tmp_path / "t.model", tmp_path / "out", workers=1, quiet=True)
    assert summary["dtype"] == dtype and TokenDataset(tmp_path / "out").tokens.dtype == np.dtype(dtype)
    ids, labels = encode_example(tok, record)
    assert shard_records(tmp_path / "out") == [(ids, labels.count(-100))]


def test_pad_mode_windows_are_shuffled_each_in_their_own_order(dataset):
    """Within a window the length-sorted batches are shuffled; another window gets another shuffle, so the
    steps where short batches come do not repeat every GROUP_BATCHES steps."""
    group = data.GROUP_BATCHES
    longest = [[int(get_batch(dataset, s, 4, seed=0)["valid"].sum(1).max()) for s in range(w * group, (w + 1) * group)]
               for w in range(2)]
    assert len(set(longest[0])) > 10  # the window holds batches of many lengths
    assert abs(np.corrcoef(longest[0], longest[1])[0, 1]) < 0.5


def test_pad_mode_windows_of_the_same_examples_come_each_in_their_own_order(tmp_path, tiny_spm):
    """With a window of one whole epoch (GROUP_BATCHES records, batch_size 1) every window sorts the same examples
    the same way: only its own shuffle tells two windows' orders apart, and it must, or the steps where the short
    batches come would repeat every GROUP_BATCHES steps."""
    group = data.GROUP_BATCHES
    dataset = dog_records(tmp_path, tiny_spm, group, group)
    windows = [[int(global_batch(dataset, s, 1, 0, "pad")[0]) for s in range(w * group, (w + 1) * group)]
               for w in range(2)]
    assert sorted(windows[0]) == sorted(windows[1]) == list(range(group))
    assert windows[0] != windows[1]


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_padding_holds_the_pad_id_given(dataset, mode):
    for pad_id in (0, 7):
        batch = get_batch(dataset, 2, 8, seed=0, mode=mode, max_len=150, pad_id=pad_id)
        assert (~batch["valid"]).any()
        assert (batch["tokens"][~batch["valid"]] == pad_id).all()


def first_fit_decreasing(lengths, capacity):
    """Rows of example lengths: longest first, each into the first row with room, else a new row."""
    rows, room = [], []
    for n in sorted(lengths, reverse=True):
        for r in range(len(rows)):
            if room[r] >= n:
                break
        else:
            r = len(rows)
            rows.append([])
            room.append(capacity)
        rows[r].append(n)
        room[r] -= n
    return rows


def test_pack_rows_are_first_fit_longest_first(tmp_path, tiny_spm):
    """Pack rows against first fit decreasing written out here: an example that fills a row exactly goes in
    it, the longest example is placed first, and each goes to the first row with room."""
    lines = [json.dumps({"instruction": "fox", "input": "", "output": "dog " * (i % 7 + 1)}) + "\n" for i in range(90)]
    (tmp_path / "d.jsonl").write_text("".join(lines))
    prepare([tmp_path / "d.jsonl"], tiny_spm, tmp_path / "out", workers=1, quiet=True)
    ds = TokenDataset(tmp_path / "out")
    capacity = int(ds.lengths.min() + ds.lengths.max())  # the shortest and longest fill a row exactly
    exact = 0
    for step in range(6):
        batch = get_batch(ds, step, 16, seed=step, mode="pack", max_len=capacity)
        rows = [[int((seq == j).sum()) for j in range(int(seq.max()) + 1)] for seq in batch["seq_ids"]]
        want = first_fit_decreasing(ds.lengths[global_batch(ds, step, 16, step, "pack")].tolist(), capacity)
        assert rows == want, step
        exact += sum(sum(row) == capacity for row in want)
    assert exact  # the case of an exact fit is exercised


def test_a_text_record_without_bos_starts_with_eos_the_document_separator(tmp_path):
    tok = Tokenizer(hf_tokenizer_folder(tmp_path / "qwen", eos="<|im_end|>"))
    assert tok.bos_id is None and tok.eos_id != 0
    ids, labels = encode_example(tok, {"text": TEXTS[0]})
    assert ids == [tok.eos_id] + tok.encode(TEXTS[0]) + [tok.eos_id] and labels == [-100] + ids[1:]


def test_special_encode_splits_on_added_tokens_as_the_tokenizers_package_does(tmp_path):
    """With one special token the start of another ("<|im_start|>" and "<|im_start|>user"), encode(special=True)
    splits on the longest; a non-special added token is left to the package, which strips the spaces its
    lstrip / rstrip ask for."""
    tokenizers = pytest.importorskip("tokenizers")
    folder = hf_tokenizer_folder(tmp_path / "t")
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf.add_special_tokens(["<|im_start|>user"])
    hf.add_tokens([tokenizers.AddedToken("<tool>", special=False, lstrip=True, rstrip=True)])
    hf.save(str(folder / "tokenizer.json"))
    tok = Tokenizer(folder)
    for text, tokens in (("a<|im_start|>user b <|im_start|>c<|endoftext|>", ("<|im_start|>user", "<|im_start|>")),
                         ("The acting <tool> was wonderful", ("<tool>",))):
        want = hf.encode(text, add_special_tokens=False).ids  # the package's own split on added tokens
        assert all(hf.token_to_id(t) in want for t in tokens)
        assert tok.encode(text, special=True) == want, text


def test_special_encode_gives_the_package_s_ids_under_a_metaspace_that_prepends_to_the_first_piece_only(tmp_path):
    """Mistral's and LLaMA-2's tokenizer.json (Metaspace, prepend_scheme "first"): the text after a special token gets
    no "▁" of its own there, so encoding the pieces between special tokens one by one added a "▁" token the package
    (and transformers) never gives. The authors' "</s>" still becomes the EOS where the tokenizer has no "</s>"."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    for eos in ("</s>", "<e>"):  # "<e>": a tokenizer without a "</s>"
        hf = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        hf.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
        hf.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", eos]))
        folder = tmp_path / eos.strip("</>")
        folder.mkdir()
        hf.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": eos}))
        tok = Tokenizer(folder)
        for text in ("The acting" + eos + "was wonderful", "Who directed" + eos + "The Silver Harbor?<s>" + eos):
            want = hf.encode(text, add_special_tokens=False).ids
            assert tok.encode(text, special=True) == want, (eos, text)
            assert tok.encode(text.replace(eos, "</s>"), special=True) == want, (eos, text)


# ---------------------------------------------------------------------------------------------
# checkpoint.py (gaps found by mutation testing; more in test_train.py)

def test_a_failed_checkpoint_save_leaves_the_previous_file_loadable(tmp_path):
    import checkpoint
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_atomic({"iter": 3, "w": torch.arange(4.0)}, path)
    with pytest.raises(Exception):
        checkpoint.save_atomic({"iter": 4, "w": torch.zeros(4), "bad": lambda: 0}, path)  # a lambda cannot be pickled
    old = checkpoint.load_pt(path, "training checkpoint")
    assert old["iter"] == 3 and torch.equal(old["w"], torch.arange(4.0))


@pytest.mark.parametrize("master", [True, False])
def test_only_the_master_rank_writes_a_checkpoint_and_every_rank_waits_for_it(tmp_path, monkeypatch, master):
    """Under several processes the full state reaches rank 0 only (the others could write an empty optimizer
    state over it): rank 0 writes ckpt.pt and adapter.pt, the others nothing, and all meet at a barrier."""
    import types

    import checkpoint
    import model
    import teamlora
    m = model.Transformer(model.ModelArgs.from_name("tiny", n_layers=1))
    teamlora.inject(m, ("wq",), r=4, experts=2, alpha=8, dropout=0.0)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    barriers = []

    def all_gather_object(out, mine):
        out[:] = [mine] * 2
    monkeypatch.setattr(checkpoint.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(checkpoint.dist, "barrier", lambda: barriers.append(1))
    cfg = {"adapter": "teamlora", "out_dir": str(tmp_path), "fsdp": False}
    r = types.SimpleNamespace(cfg=cfg, world=2, device=torch.device("cpu"), master=master, args=m.args, base=None,
                              data=None, tok=None, clock=None)
    checkpoint.save_checkpoint(r, m, opt, 5)
    assert sorted(os.listdir(tmp_path)) == (["adapter.pt", "ckpt.pt"] if master else [])
    assert barriers == [1]


def test_tiktoken_pad_is_the_reserved_token_llama_3_1_names_its_pad_not_the_eos(tmp_path):
    """LLaMA-3.1's tokenizer_config.json pads with <|finetune_right_pad_id|>, id 128004: the fifth special token,
    LLaMA-3's <|reserved_special_token_2|>."""
    pytest.importorskip("tiktoken")
    n = write_tiktoken_file(tmp_path / "tokenizer.model")
    tok = Tokenizer(tmp_path / "tokenizer.model")
    assert tok.pad_id == n + 4 == tok.encode("<|reserved_special_token_2|>", special=True)[0] != tok.eos_id


def test_a_sentencepiece_model_whose_eos_is_not_written_slash_s_ends_each_answer_with_its_own_eos(tmp_path):
    """A SentencePiece model with other piece names (Gemma's <bos> / <eos>): the answer's end is the model's EOS
    piece, read from the model, and encodes to the EOS id, never to the text "</s>"."""
    tok = Tokenizer(train_spm(tmp_path, "g", bos_piece="<bos>", eos_piece="<eos>"))
    assert tok.eos_text == "<eos>" and tok.sp.id_to_piece(tok.eos_id) == "<eos>"
    ids, labels = encode_example(tok, {"instruction": "the fox", "input": "", "output": "the dog"})
    assert ids[-1] == tok.eos_id and labels[-1] == tok.eos_id
    assert ids[-(len(tok.encode("the dog")) + 1):] == tok.encode("the dog") + [tok.eos_id]


@pytest.mark.parametrize("options", [{}, {"control_symbols": ["</s>"]}], ids=["no </s> piece", "a </s> piece"])
def test_a_sentencepiece_model_whose_eos_is_not_written_slash_s_ends_the_prompt_with_its_eos(tmp_path, options):
    """The authors' "</s>" ends every prompt: under a model whose EOS is <eos> (Gemma's names) it stayed the text
    "</s>", in several pieces, where every other tokenizer gives the EOS id; a model with a "</s>" piece of its own
    gets that piece, as a tokenizer.json with a "</s>" token does."""
    tok = Tokenizer(train_spm(tmp_path, "g", bos_piece="<bos>", eos_piece="<eos>", **options))
    end = tok.sp.piece_to_id("</s>") if options else tok.eos_id
    assert not tok.sp.is_unknown(end) and end not in tok.encode("the fox</s>")
    ids, labels = encode_example(tok, {"instruction": "the fox", "input": "", "output": "the dog"})
    assert ids[:labels.count(-100)] == [tok.bos_id] + tok.encode("the fox") + [end]
    assert tok.encode("a</s>b", special=True) == tok.encode("a") + [end] + tok.encode("b")


def test_hf_plain_encode_adds_no_special_token_even_where_the_tokenizer_json_has_a_post_processor(tmp_path):
    """A tokenizer.json whose post-processor puts a BOS in front (LLaMA-3's and Mistral's do): encode() adds it only
    when asked (bos=True), once."""
    tokenizers = pytest.importorskip("tokenizers")
    folder = hf_tokenizer_folder(tmp_path / "t", bos="<|im_start|>", eos="<|im_end|>")
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = hf.token_to_id("<|im_start|>")
    hf.post_processor = tokenizers.processors.TemplateProcessing(single="<|im_start|> $A",
                                                                 special_tokens=[("<|im_start|>", bos)])
    hf.save(str(folder / "tokenizer.json"))
    assert hf.encode(TEXTS[0]).ids[0] == bos  # the package's default adds it
    tok = Tokenizer(folder)
    plain = hf.encode(TEXTS[0], add_special_tokens=False).ids
    assert tok.encode(TEXTS[0]) == plain and tok.encode(TEXTS[0], bos=True) == [bos] + plain


def test_hf_plain_encode_keeps_the_text_of_an_added_token_as_text_as_every_kind_does(tmp_path):
    """encode(text) treats all text as text, with a tokenizer.json as with the other kinds: its EOS written in a
    record's text is characters, not the EOS id, unless special=True."""
    pytest.importorskip("tokenizers")
    tok = Tokenizer(hf_tokenizer_folder(tmp_path / "t", eos="<|im_end|>"))
    plain, special = tok.encode("a<|im_end|>b"), tok.encode("a<|im_end|>b", special=True)
    assert tok.eos_id not in plain and special.count(tok.eos_id) == 1 and len(plain) > len(special)


@pytest.mark.parametrize("special", [True, False])
def test_hf_slash_s_that_is_a_token_of_its_own_encodes_as_that_token(tmp_path, special):
    """The authors' "</s>" becomes the EOS only where the tokenizer has no "</s>" token; where it has one (not its
    EOS), special encoding gives that token's id, as the tokenizers package (and transformers) do: they match an
    added token whole whether or not it is marked special (one not marked special became the EOS)."""
    tokenizers = pytest.importorskip("tokenizers")
    folder = hf_tokenizer_folder(tmp_path / "t", eos="<|im_end|>")
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    (hf.add_special_tokens if special else hf.add_tokens)(["</s>"])
    hf.save(str(folder / "tokenizer.json"))
    tok = Tokenizer(folder)
    slash_s = hf.token_to_id("</s>")
    assert slash_s != tok.eos_id
    assert tok.encode("a</s>b", special=True) == hf.encode("a</s>b", add_special_tokens=False).ids
    assert slash_s in tok.encode("a</s>b", special=True) and tok.eos_id not in tok.encode("a</s>b", special=True)


def test_a_special_token_whose_text_starts_with_another_ones_is_read_whole(tmp_path):
    """Special-token strings are matched longest first: where one starts with another ("<s>" and "<s>end"), the
    longer is its own token, not the shorter one followed by text (the slow LlamaTokenizer's no-split tokens)."""
    tok = Tokenizer(train_spm(tmp_path, "p", bos_piece="<s>", eos_piece="<s>end"))
    assert tok.eos_text == "<s>end" and tok.eos_text.startswith(tok.sp.id_to_piece(tok.bos_id))
    ids = tok.encode("the fox<s>end the dog<s>", special=True)
    assert ids == tok.encode("the fox") + [tok.eos_id] + tok.encode(" the dog") + [tok.bos_id]
    assert encode_example(tok, {"instruction": "fox", "output": "dog"})[0][-1] == tok.eos_id


def test_hf_config_tokens_that_the_tokenizer_json_does_not_list_as_added_are_never_split(tmp_path):
    """transformers adds the tokenizer_config.json's tokens as special tokens: an EOS that is a plain vocabulary entry
    of the tokenizer.json (not one of its added tokens) still encodes, under special=True, to its one id, as
    transformers' own PreTrainedTokenizerFast.from_pretrained gives it."""
    transformers = pytest.importorskip("transformers")
    folder = hf_tokenizer_folder(tmp_path / "t")
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_json["added_tokens"] = [t for t in tokenizer_json["added_tokens"] if t["content"] != "<|endoftext|>"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    tok = Tokenizer(folder)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    assert tok.eos_id == theirs.eos_token_id == tok.hf.token_to_id("<|endoftext|>")
    text = TEXTS[0] + "<|endoftext|>" + TEXTS[1] + "<|endoftext|>"
    assert tok.encode(text, special=True) == theirs(text, add_special_tokens=False)["input_ids"]
    assert tok.encode(text, special=True).count(tok.eos_id) == 2
    assert tok.encode(TEXTS[0] + "</s>", special=True) == tok.encode(TEXTS[0]) + [tok.eos_id]  # the prompt's end


def test_the_summary_totals_of_several_inputs_are_those_of_one_file_holding_all_their_records(tmp_path, tiny_spm):
    """summary.json's records, truncated and dropped_no_answer count every input file (the sums of its "files"), as
    one file with the same records gives them; cut_warning and the command line read these totals."""
    long_answer = json.dumps({"instruction": "a", "input": "", "output": "the quick brown fox jumps " * 4})
    parts = [[GOOD] * 3 + [LONG, long_answer], [GOOD] * 2 + [long_answer] * 2 + [LONG, LONG]]
    for i, lines in enumerate(parts):
        (tmp_path / f"{i}.jsonl").write_text("".join(line + "\n" for line in lines))
    (tmp_path / "all.jsonl").write_text("".join(line + "\n" for lines in parts for line in lines))
    several = prepare([tmp_path / "0.jsonl", tmp_path / "1.jsonl"], tiny_spm, tmp_path / "several", max_len=16,
                      workers=1, quiet=True)
    one = prepare([tmp_path / "all.jsonl"], tiny_spm, tmp_path / "one", max_len=16, workers=1, quiet=True)
    assert several["files"][1]["dropped_no_answer"] > 0 and several["files"][1]["truncated"] > 0
    for key in ("records", "truncated", "dropped_no_answer"):
        assert several[key] == sum(f[key] for f in several["files"]) == one[key], key
    assert several["splits"] == one["splits"]
    assert several["records"] == sum(s["records"] for s in several["splits"].values()) + several["dropped_no_answer"]


def test_a_sentencepiece_model_with_a_pad_piece_pads_with_it_and_one_without_with_unk(tmp_path, tiny_spm):
    tok = Tokenizer(train_spm(tmp_path, "pad", pad_id=3))
    assert tok.pad_id == tok.sp.pad_id() == tok.sp.piece_to_id("<pad>") == 3 != tok.sp.unk_id()
    first = Tokenizer(train_spm(tmp_path, "pad0", pad_id=0, unk_id=3))  # a pad piece numbered 0 is one too
    assert first.pad_id == first.sp.pad_id() == first.sp.piece_to_id("<pad>") == 0 != first.sp.unk_id()
    plain = Tokenizer(tiny_spm)
    assert plain.sp.pad_id() == -1 and plain.pad_id == plain.sp.unk_id()  # LLaMA-2's: no pad piece


def test_a_killed_prepares_folder_given_to_prepare_as_an_input_or_tokenizer_is_named_not_removed(tmp_path, tiny_spm):
    """prepare removes a dead prepare's OUT.tmp-PID folder, but never one it was given (a mistaken --input or
    --tokenizer): that is refused in one sentence naming it, and the folder stays."""
    source = write_records(tmp_path / "d.jsonl", 3)
    prepare([source], tiny_spm, tmp_path / "done", workers=1, quiet=True)
    stale = tmp_path / f"out.tmp-{dead_pid()}"  # a killed prepare's output, every file prepare's own
    shutil.copytree(tmp_path / "done", stale)
    with pytest.raises(UserError, match=f"input {stale} is a folder, not a file"):
        prepare([stale], tiny_spm, tmp_path / "out", workers=1, quiet=True)
    with pytest.raises(UserError, match=f"tokenizer {stale} is a folder, not a file"):
        prepare([source], stale, tmp_path / "out", workers=1, quiet=True)
    assert sorted(os.listdir(stale)) == sorted(os.listdir(tmp_path / "done"))
    prepare([source], tiny_spm, tmp_path / "out", workers=1, quiet=True)  # given nothing inside it: removed
    assert not stale.exists()


@pytest.mark.parametrize("pick", [max, min], ids=["the last id", "id 0"])
def test_a_tokenizer_json_giving_two_tokens_one_id_is_refused_not_read_at_random(tmp_path, pick):
    """The tokenizers package keeps one of two tokens with the same id at random: loading then failed with its own
    exception's traceback, or worked with a decode that gave the other token's text. Id 0 too (a number, not false)."""
    folder = hf_tokenizer_folder(tmp_path / "t")
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tokenizer_json["model"]["vocab"]
    word = pick(vocab, key=vocab.get)  # the last merge's result, or the first special token
    vocab["extra"] = vocab[word]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    for _ in range(8):  # which of the two the package kept changed from one load to the next
        with pytest.raises(UserError, match=f"tokenizer.json gives two tokens the same id {vocab[word]}; pass the "
                                            "checkpoint's unmodified tokenizer.json"):
            Tokenizer(folder)


def test_a_tokenizer_json_without_any_token_is_one_sentence_not_an_index_error(tmp_path):
    """An empty vocabulary (and no added tokens) was an IndexError's traceback, from its largest id taken as the
    vocabulary's size."""
    pytest.importorskip("tokenizers")
    folder = hf_tokenizer_folder(tmp_path / "t")
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_json.update(added_tokens=[], model=tokenizer_json["model"] | {"vocab": {}, "merges": []})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(UserError, match=f"^{re.escape(str(folder / 'tokenizer.json'))} has no tokens at all; pass the "
                                        "checkpoint's unmodified tokenizer.json$"):
        Tokenizer(folder)


def test_a_tokenizer_json_whose_ids_skip_numbers_has_a_vocab_size_past_its_largest_id(tmp_path):
    """vocab_size was the count of tokens: an id past it was dropped by decode, and past 65,535 prepare wrote it to
    uint16 shards, as another id."""
    tokenizers = pytest.importorskip("tokenizers")
    folder = hf_tokenizer_folder(tmp_path / "t")
    word = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXTS[0]).tokens[0]
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_json["model"]["vocab"][word] = 70_000
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    tok = Tokenizer(folder)
    ids = tok.encode(TEXTS[0])
    assert 70_000 in ids and max(ids) < tok.vocab_size and tok.decode(ids) == TEXTS[0]
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    prepare([tmp_path / "d.jsonl"], folder, tmp_path / "out", workers=1, quiet=True)
    assert TokenDataset(tmp_path / "out").tokens.tolist() == encode_example(tok, {"text": TEXTS[0]})[0]


def test_a_tokenizer_json_whose_added_tokens_follow_its_models_vocabulary_counts_them_in_its_vocab_size(tmp_path):
    """Qwen's tokenizer.json lists its special tokens, the EOS among them, as added tokens past the model's own
    vocabulary: the vocab_size covers them, so the EOS is a word of the model and decodes to its text."""
    tokenizers = pytest.importorskip("tokenizers")
    folder = hf_tokenizer_folder(tmp_path / "t", eos="<|extra|>")
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf.add_special_tokens(["<|extra|>"])
    hf.save(str(folder / "tokenizer.json"))
    tok = Tokenizer(folder)
    assert tok.eos_id == hf.token_to_id("<|extra|>") > max(hf.get_vocab(with_added_tokens=False).values())
    assert tok.vocab_size == tok.eos_id + 1 and tok.decode([tok.eos_id]) == "<|extra|>"


@pytest.mark.parametrize("kind", ["WordLevel", "WordPiece", "Unigram"])
def test_a_tokenizer_json_without_an_unknown_token_names_the_text_it_cannot_encode(tmp_path, kind):
    """These models raise the package's own exception on a character outside their vocabulary where they have no
    unknown token: prepare ended in its traceback."""
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(getattr(tokenizers.models, kind)())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = getattr(tokenizers.trainers, kind + "Trainer")(special_tokens=["<e>"])
    hf.train_from_iterator(TEXTS, trainer)
    folder = tmp_path / "t"
    folder.mkdir()
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<e>"}))
    tok = Tokenizer(folder)
    known = TEXTS[0] + "<e>"  # text in its vocabulary: encoded as the package does
    assert tok.encode(known, special=True) == hf.encode(known).ids and tok.eos_id == hf.encode(known).ids[-1]
    record = {"instruction": TEXTS[0], "output": "☃"}
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    says = (f"^tokenizer {re.escape(str(folder))}/tokenizer.json cannot encode the text '{{}}' \\(.+\\); remove that "
            "text from the records, or pass a tokenizer whose model has an unknown token$")
    with pytest.raises(UserError, match=says.format("☃")):
        tok.encode("☃")
    for encode in (lambda: encode_example(tok, record),  # the answer's text, with the EOS's
                   lambda: prepare([tmp_path / "d.jsonl"], folder, tmp_path / "out", workers=1, quiet=True)):
        with pytest.raises(UserError, match=says.format("☃<e>")):
            encode()


def test_a_bpe_tokenizer_json_with_its_own_unknown_token_encodes_unknown_text_to_it_as_the_package_does(tmp_path):
    """Only a BPE model without an unknown token is given one that no vocabulary holds: a model's own stays."""
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.train_from_iterator(TEXTS, tokenizers.trainers.BpeTrainer(special_tokens=["<e>", "<unk>"]))
    folder = tmp_path / "t"
    folder.mkdir()
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<e>"}))
    text = TEXTS[0] + " ☃"
    ids = Tokenizer(folder).encode(text)
    assert ids == hf.encode(text, add_special_tokens=False).ids and ids[-1] == hf.token_to_id("<unk>")


def bpe_without_an_unknown_token(folder):
    """(the package's tokenizer, folder): a BPE model trained on TEXTS, with no unknown token nor byte fallback."""
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.train_from_iterator(TEXTS, tokenizers.trainers.BpeTrainer(special_tokens=["<e>"]))
    folder.mkdir()
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<e>"}))
    return hf, folder


def test_a_bpe_tokenizer_json_without_an_unknown_token_names_the_text_it_would_drop(tmp_path):
    """A BPE model without an unknown token (or byte fallback) drops a character it has no token for without a word,
    where the other models raise: the records were trained on as other text than they hold. GPT-2's and Qwen's
    byte-level BPE have no unknown token either, and need none (a token for every byte): never refused."""
    hf, folder = bpe_without_an_unknown_token(tmp_path / "t")
    assert hf.encode("☃").ids == []  # the package's own silence
    tok = Tokenizer(folder)
    known = TEXTS[0] + "<e>"  # text in its vocabulary: encoded as the package does
    assert tok.encode(known, special=True) == hf.encode(known).ids and tok.decode(tok.encode(TEXTS[1])) == \
        hf.decode(hf.encode(TEXTS[1]).ids)
    record = {"instruction": TEXTS[0], "output": "a ☃"}
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    says = (f"^tokenizer {re.escape(str(folder))}/tokenizer.json cannot encode the text '{{}}' \\(it has no token for "
            "one of its characters\\); remove that text from the records, or pass a tokenizer whose model has an "
            "unknown token$")
    with pytest.raises(UserError, match=says.format("a ☃")):
        tok.encode("a ☃")
    for encode in (lambda: encode_example(tok, record),
                   lambda: prepare([tmp_path / "d.jsonl"], folder, tmp_path / "out", workers=1, quiet=True)):
        with pytest.raises(UserError, match=says.format("a ☃<e>")):
            encode()
    byte_level = Tokenizer(hf_tokenizer_folder(tmp_path / "b"))
    for text in ["☃ 中文 🙂", "\x00\x01 é", TEXTS[2]]:
        assert byte_level.decode(byte_level.encode(text)) == text


def test_a_long_text_a_tokenizer_json_cannot_encode_is_quoted_by_its_start_in_the_one_line_refusal(tmp_path):
    """A record's text may run to pages: the refusal quotes its first 40 characters, as repr shows them, not all."""
    hf, folder = bpe_without_an_unknown_token(tmp_path / "t")
    text = "\u2603 " + TEXTS[0] * 50
    with pytest.raises(UserError) as error:
        Tokenizer(folder).encode(text)
    assert f"cannot encode the text {text[:40]!r} (it has no token for one of its characters)" in str(error.value)


def test_a_tokenizer_json_numbering_a_token_past_any_real_vocabulary_is_refused_as_it_loads(tmp_path):
    """An id of 10**9 gave a vocab_size of 10**9 + 1: the dry run passed, and a run from scratch built its embedding
    and ended out of memory, with advice to lower batch_size. The bound is the one the message states: 64 times
    2**18 (262,144, about the largest real vocabulary), so 2**24 ids, 0 to 16,777,215."""
    tokenizers = pytest.importorskip("tokenizers")
    folder = hf_tokenizer_folder(tmp_path / "t")
    word = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXTS[0]).tokens[0]
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    bound = 64 * 2**18
    for largest in (2**18, bound - 1, bound, 10**9):
        tokenizer_json["model"]["vocab"][word] = largest
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
        if largest < bound:  # sparse ids, as a real tokenizer may have: kept
            assert Tokenizer(folder).vocab_size == largest + 1
            continue
        with pytest.raises(UserError) as error:
            Tokenizer(folder)
        assert str(error.value) == (
            f"{folder / 'tokenizer.json'} numbers a token {largest:,}, where this reads ids below 16,777,216 (64 times "
            f"the largest real vocabulary, of about 262,000 tokens), and a model would need {largest + 1:,} embedding "
            "rows; pass the checkpoint's unmodified tokenizer.json, or number its tokens from 0 without gaps")


def test_an_input_path_of_spaces_alone_is_named_as_empty_not_as_a_missing_file():
    """--input=" " (a quoted blank) is as empty as --input=: the "not found" of a file named by spaces would puzzle."""
    with pytest.raises(UserError, match=r"^an --input path is empty; give the records' file"):
        data._file_kind("  ")


def test_an_abbreviated_flag_is_named_before_any_file_is_read(tmp_path, monkeypatch, capsys):
    """data.py reads its flags as the other scripts do (errors.Parser): --tok was taken as --tokenizer."""
    monkeypatch.setattr(data, "prepare", lambda *a, **k: pytest.fail("data.py ran with an abbreviated flag"))
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", f"--input={tmp_path / 'a.jsonl'}", f"--tok={tmp_path / 't.model'}", f"--out={tmp_path}"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith("did you mean --tokenizer?")


@pytest.mark.parametrize("left_out", ["command", "--input", "--tokenizer", "--out"])
def test_a_command_or_required_flag_left_out_is_named_before_anything_is_read(tmp_path, monkeypatch, capsys,
                                                                                left_out):
    """data.py with no command, or prepare without one of its required flags, names what is missing in its usage
    error (exit code 2) and reads and writes nothing: prepare would meet the missing flag as None."""
    monkeypatch.setattr(data, "prepare", lambda *a, **k: pytest.fail("data.py ran without a required flag"))
    flags = {"--input": tmp_path / "a.jsonl", "--tokenizer": tmp_path / "t.model", "--out": tmp_path / "out"}
    argv = [] if left_out == "command" else ["prepare"] + [f"{k}={v}" for k, v in flags.items() if k != left_out]
    assert usage_error(data.main, argv, capsys).endswith(f"error: the following arguments are required: {left_out}")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("n", [1, 3, 4, 6])
def test_an_out_holding_other_files_names_the_first_three_and_counts_the_rest(tmp_path, tiny_spm, n):
    """errors.listed: up to three names in full; past three, the first three and how many more (n - 3), never "and 0
    more". The files are left as they were."""
    source, out = write_records(tmp_path / "d.jsonl", 3), tmp_path / "out"
    out.mkdir()
    names = [f"f{i}.txt" for i in range(n)]
    for name in names:
        (out / name).write_text(name)
    shown = ", ".join(names[:3]) + (f" and {n - 3} more" if n > 3 else "")
    with pytest.raises(UserError, match=rf"^{out} exists and is not the output of a previous prepare \(it holds "
                                        rf"{re.escape(shown)}\); choose another --out$"):
        prepare([source], tiny_spm, out, workers=1)
    assert sorted(os.listdir(out)) == names and all((out / name).read_text() == name for name in names)
