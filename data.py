"""
Data for TeamLoRA: the tokenizer, the authors' record format, token shards, training batches,
the CME tasks with their metrics, and the synthetic mini-CME suite for CPU runs.

    python data.py prepare --input train.json more.jsonl --tokenizer tokenizer.model --out data/cme
    python data.py eval_set --task anli --raw R1/test.jsonl R2/test.jsonl R3/test.jsonl --out eval/anli.jsonl
    python data.py suite --out data/mini_cme --seed 0

A record is {"instruction", "input", "output"} ("input" may be empty, null or absent), or
{"text"} for a plain document; files are JSON lists or JSONL. The token ids of a record are
those of the authors' build_dataset.py run with transformers 4.30's slow LlamaTokenizer:
    prompt = BOS + tok(instruction ["\n" + input] + "</s>")    labels -100
    answer = tok(output + eos_text)                             labels = ids
where tok() splits the text on the special tokens' strings (so the literal "</s>" becomes the EOS
id, which raw SentencePiece would not do) and SentencePiece-encodes each piece on its own (each
gets its own dummy-prefix "▁"). Whitespace next to a special token is kept: in the tokenizer files
of LLaMA-2 and Chinese-LLaMA-2 the special tokens are AddedToken(lstrip=False, rstrip=False), and
4.30 strips only around special tokens given as plain strings in special_tokens_map.json.
eos_text is "</s>" for LLaMA-2; for LLaMA-3 it is "<|end_of_text|>", and the prompt's "</s>" is
plain text there (build_dataset.py's template hard-codes it).

Shards (one set per split, "train" and "val"), read back by TokenDataset:
    {split}.tokens.bin        all token ids back to back (uint16 if vocab_size <= 65536, else uint32)
    {split}.offsets.bin       int64, records + 1 entries: record i is tokens[offsets[i]:offsets[i+1]]
    {split}.prompt_lens.bin   int32: labels are -100 on the first prompt_len tokens of a record
    summary.json              counts per file, dtype, special ids, tokenizer hash, max_len

Tasks (the second half of this file):
- metrics of the CME benchmark: accuracy on a label word or option letter, exact match over answer
  aliases (SQuAD normalisation), ROUGE-L F1; Task and evaluate() score generated answers with them.
- CME_TASKS: the 11 evaluation tasks, each with a loader for its public file format that returns
  records in the authors' format {"instruction", "input", "output"} (+ "answers" for QA).
- make_suite(): "mini-CME", a seeded synthetic multi-task suite over a small invented world, with
  the corpus that teaches that world to a tiny base model and a SentencePiece model for it.
"""
import argparse
import base64
import binascii
import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
import string
import sys
import unicodedata
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import numpy as np
import sentencepiece as spm

IGNORE_INDEX = -100
PROMPT_EOS = "</s>"  # build_dataset.py's PROMPT_TEMPLATE is "{instruction}</s>", whatever the tokenizer


class DataError(ValueError):
    """Something wrong in the user's files or arguments; the message says what and how to fix it."""


# -----------------------------------------------------------------------------
# Tokenizer

# LLaMA-3's tokenizer.model is a tiktoken file (base64 token, rank); Meta's tokenizer.py adds this
# pre-tokenizer regex and 256 special tokens numbered after the 128000 ranks.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                   + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])
LLAMA3_PAD = "<|reserved_special_token_2|>"  # LLaMA-3.1 renamed it <|finetune_right_pad_id|>


def _looks_like_tiktoken(path):
    with open(path, "rb") as f:
        first = f.readline(4096).split()
    return len(first) == 2 and first[1].isdigit() and re.fullmatch(rb"[A-Za-z0-9+/]+=*", first[0])


class Tokenizer:
    """LLaMA-2 / Chinese-LLaMA-2 SentencePiece model, or LLaMA-3 tiktoken file (told apart by content).

    encode(text) treats all text as text, like Meta's tokenizers; encode(text, special=True) turns
    special-token strings ("</s>", "<|end_of_text|>", ...) into their ids, like Hugging Face's.
    LLaMA-2 has no pad token: pad_id is <unk> (0). Batches mark padding with a mask, never by id,
    so nothing is trained on it whatever it is."""

    def __init__(self, path):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise DataError(f"tokenizer file {self.path} not found; pass the tokenizer.model of your checkpoint")
        if _looks_like_tiktoken(self.path):
            self._load_tiktoken()
        else:
            self._load_sentencepiece()
        # split on special tokens, longest first, keeping them (HF's no-split tokens)
        alternatives = sorted(self.specials, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def _load_sentencepiece(self):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except Exception:  # sentencepiece raises RuntimeError / OSError with a C++ message
            raise DataError(f"{self.path} is neither a SentencePiece model (LLaMA-2) nor a tiktoken BPE file "
                            "(LLaMA-3); pass the checkpoint's tokenizer.model") from None
        self.kind, self.vocab_size = "sentencepiece", self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        # transformers' slow LlamaTokenizer never splits <unk>, <s>, </s> (its special tokens)
        self.specials = {self.sp.id_to_piece(i): i for i in (self.sp.unk_id(), self.bos_id, self.eos_id)}
        self.eos_text = self.sp.id_to_piece(self.eos_id)

    def _load_tiktoken(self):
        try:
            import tiktoken
        except ImportError:
            raise DataError(f"{self.path} is a tiktoken BPE file (LLaMA-3); reading it needs the tiktoken "
                            "package: pip install tiktoken") from None
        ranks = {}
        with open(self.path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except (ValueError, binascii.Error):
                    raise DataError(f"{self.path} line {n}: expected '<base64 token> <rank>' as in LLaMA-3's "
                                    "tokenizer.model; pass an unmodified tokenizer file") from None
        self.specials = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)}
        self.enc = tiktoken.Encoding(name=os.path.basename(self.path), pat_str=LLAMA3_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=self.specials)
        self.kind, self.vocab_size = "tiktoken", self.enc.n_vocab
        self.bos_id, self.eos_id = self.specials["<|begin_of_text|>"], self.specials["<|end_of_text|>"]
        self.pad_id, self.eos_text = self.specials[LLAMA3_PAD], "<|end_of_text|>"

    def _encode_plain(self, text):
        if self.kind == "tiktoken":
            return self.enc.encode(text, disallowed_special=())
        return self.sp.encode(text)

    def encode(self, text, bos=False, eos=False, special=False):
        if not special:
            ids = self._encode_plain(text)
        else:  # one SentencePiece call per piece between special tokens, as transformers does
            ids = []
            for piece in self._special_re.split(text):
                if piece in self.specials:
                    ids.append(self.specials[piece])
                elif piece:
                    ids.extend(self._encode_plain(piece))
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        ids = [int(i) for i in ids]
        return self.enc.decode(ids) if self.kind == "tiktoken" else self.sp.decode(ids)


# -----------------------------------------------------------------------------
# The authors' record format

def _json_kind(value):
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


_FIX = 'each record must be an object with "instruction", "input" and "output" strings (or just a "text" string)'


def _field(example, key, where, required=True):
    """example[key] as a string, or a DataError naming `where`, the problem and the fix. An optional
    field ("input") may be absent or null: build_dataset.py treats None as empty."""
    if not isinstance(example, dict):
        raise DataError(f"{where} is {_json_kind(example)}, not an object; {_FIX}")
    if required and key not in example:
        raise DataError(f'{where} has no "{key}"; {_FIX}')
    value = example.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" is {_json_kind(value)}, not a string; {_FIX}')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\ud800" alone; tokenizers do not
        raise DataError(f'{where}: "{key}" holds a lone surrogate (like "\\ud800"), not valid Unicode; '
                        "fix the text") from None
    return value


def _prompt_ids(tokenizer, example, where):
    instruction, input_ = _field(example, "instruction", where), _field(example, "input", where, required=False)
    prompt = instruction + "\n" + input_ if input_ else instruction
    return tokenizer.encode(prompt + PROMPT_EOS, bos=True, special=True)


def _encode_parts(tokenizer, example, where="record"):
    """(prompt ids, answer ids) of a record. A record with just "text" is a plain document (to
    pretrain a base model): BOS is its prompt and every later token is trained on; special-token
    strings in it ("</s>" between two pieces, as in a pretraining stream) become their ids."""
    if isinstance(example, dict) and "text" in example and not {"instruction", "output"} & example.keys():
        return [tokenizer.bos_id], tokenizer.encode(_field(example, "text", where) + tokenizer.eos_text, special=True)
    source = _prompt_ids(tokenizer, example, where)
    target = tokenizer.encode(_field(example, "output", where) + tokenizer.eos_text, special=True)
    return source, target


def encode_prompt(tokenizer, example):
    """The prompt ids of a record exactly as in training (BOS ... </s>): what generation starts from."""
    return _prompt_ids(tokenizer, example, "record")


def encode_example(tokenizer, example, max_len=1024):
    """(input_ids, labels) of one record, token for token as the authors' build_dataset.py:
    labels are -100 on the prompt, and both lists are cut at max_len."""
    source, target = _encode_parts(tokenizer, example)
    return (source + target)[:max_len], ([IGNORE_INDEX] * len(source) + target)[:max_len]


# -----------------------------------------------------------------------------
# Reading JSON lists and JSONL, streamed

_BLANK = re.compile(r"[ \t\r\n]*")
_READ = 1 << 20  # characters read at a time from a JSON list


def _iter_json_list(path):
    """Yield (index, record) from a file holding one JSON list, a piece at a time: memory is
    bounded by the largest record, not by the file (the CME's 2.5M records would not fit)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f:
        buf, pos, line0 = "", 0, 1  # line0: line number of buf[0]

        def fill():  # drop what was read, append the next piece; False at the end of the file
            nonlocal buf, pos, line0
            try:
                piece = f.read(max(_READ, len(buf) - pos))
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8") from None
            if piece:
                line0 += buf.count("\n", 0, pos)
                buf, pos = buf[pos:] + piece, 0
            return bool(piece)

        def peek():  # next non-blank character ("" at the end of the file)
            nonlocal pos
            while True:
                pos = _BLANK.match(buf, pos).end()
                if pos < len(buf) or not fill():
                    return buf[pos:pos + 1]

        def fail(at, what):
            line = line0 + buf.count("\n", 0, at)
            raise DataError(f"{path} line {line}: {what}; a .json data file must be a valid JSON list "
                            "of records (or use JSONL, one record per line)")

        fill()
        peek()
        pos += 1  # the "[" (checked by _file_kind)
        index = 0
        while True:
            if peek() == "]" and index == 0:
                pos += 1
                break
            while True:  # a record that fails, or ends, at the buffer's end may go on past it
                try:
                    record, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or not fill():
                        break
                except json.JSONDecodeError as e:
                    # an error well before the buffer's end is a real one (save for long strings)
                    real = len(buf) - e.pos > _READ // 2 and not e.msg.startswith("Unterminated string")
                    if real or not fill():
                        fail(e.pos, f"record {index} is not valid JSON ({e.msg})")
            yield index, record
            index, pos = index + 1, end
            char = peek()
            pos += 1
            if char == "]":
                break
            if char != ",":
                fail(pos - 1, f"expected ',' or ']' after record {index - 1}, found {char or 'the end of the file'}")
        if peek():
            fail(pos, "unexpected text after the closing ']'")


def _file_kind(path):
    """'list' for a JSON list, 'jsonl' for one object per line; a DataError for anything else."""
    if not os.path.isfile(path):
        raise DataError(f"input file {path} not found; check the --input path")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:1] == b"[":
        return "list"
    if head[:1] == b"{":
        return "jsonl"
    what = "is empty" if not head else f"starts with {head[:20]!r}"
    raise DataError(f"{path} {what}; a data file must be a JSON list of records or JSONL (one JSON object per line)")


def _records(path, kind):
    """(where, payload) for each record of a file; JSONL lines stay bytes, parsed by the workers."""
    if kind == "list":
        for i, record in _iter_json_list(path):
            yield f"{path} record {i}", record
        return
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                line = line[3:]
            if line.strip():
                yield f"{path} line {n}", line


def _chunks(paths, kinds, max_len, size=512):
    """Jobs for the workers: (file index, up to `size` records, max_len), in input order."""
    for i, (path, kind) in enumerate(zip(paths, kinds)):
        items = []
        for item in _records(path, kind):
            items.append(item)
            if len(items) == size:
                yield i, items, max_len
                items = []
        if items:
            yield i, items, max_len


# -----------------------------------------------------------------------------
# prepare: records -> token shards

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_path):
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(tokenizer_path)


def _encode_chunk(job):
    """Encode a chunk of records; returns arrays of the kept records, or ("error", message)."""
    file_index, items, max_len = job
    tokens, lens, prompt_lens, kept, truncated = [], [], [], [], 0
    for where, payload in items:
        try:
            if isinstance(payload, bytes):
                try:
                    payload = json.loads(payload)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); each line of a "
                                    "JSONL file must be one whole JSON object") from None
            source, target = _encode_parts(_WORKER_TOKENIZER, payload, where)
        except DataError as e:
            return ("error", str(e))
        except UnicodeDecodeError as e:
            return ("error", f"{where}: not UTF-8 text ({e.reason}); save the file as UTF-8")
        n = min(len(source) + len(target), max_len)
        truncated += len(source) + len(target) > max_len
        kept.append(len(source) < n)  # no answer token left: no loss, so the record is dropped
        if kept[-1]:
            tokens.extend((source + target)[:n])
            lens.append(n)
            prompt_lens.append(len(source))
    return dict(file=file_index, tokens=np.array(tokens, np.uint32), lens=np.array(lens, np.int64),
                prompt_lens=np.array(prompt_lens, np.int32), kept=np.array(kept, bool), truncated=truncated)


def _map_ordered(fn, jobs, workers, tokenizer_path):
    """map(fn, jobs) over a process pool, in order, with a bounded number of chunks in flight."""
    if workers <= 1:
        _init_worker(tokenizer_path)
        yield from map(fn, jobs)
        return
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_path,)) as pool:
        pending = deque()
        for job in jobs:
            pending.append(pool.apply_async(fn, (job,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _in_val(seed, index, fraction):
    """Whether each record (by its index over all inputs) goes to val: a hash of (seed, index), so
    the split does not depend on chunking or the number of workers."""
    x = index.astype(np.uint64) + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):  # splitmix64 finaliser
        x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


def _write_shards(tmp, inputs, kinds, tok, max_len, val_fraction, seed, workers, quiet):
    """Tokenise every record into tmp/{train,val}.*.bin, appending chunk by chunk; returns the counts."""
    from tqdm import tqdm
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    files = [dict(path=p, format=k, records=0, kept=0, tokens=0, truncated=0, dropped_no_answer=0)
             for p, k in zip(inputs, kinds)]
    splits = {s: dict(records=0, tokens=0) for s in ("train", "val")}
    with ExitStack() as stack:
        out = {(s, part): stack.enter_context(open(os.path.join(tmp, f"{s}.{part}.bin"), "wb"))
               for s in splits for part in ("tokens", "offsets", "prompt_lens")}
        for s in splits:
            np.zeros(1, np.int64).tofile(out[s, "offsets"])
        bar = stack.enter_context(tqdm(desc="prepare", unit=" records", disable=True if quiet else None))
        index = 0  # of the record over all inputs
        for result in _map_ordered(_encode_chunk, _chunks(inputs, kinds, max_len), workers, tok.path):
            if isinstance(result, tuple):
                raise DataError(result[1])
            stats, kept, lens = files[result["file"]], result["kept"], result["lens"]
            val = _in_val(seed, np.arange(index, index + len(kept))[kept], val_fraction)
            index += len(kept)
            for key, n in (("records", len(kept)), ("kept", kept.sum()), ("tokens", lens.sum()),
                           ("truncated", result["truncated"]), ("dropped_no_answer", len(kept) - kept.sum())):
                stats[key] += int(n)
            token_in_val = np.repeat(val, lens)
            for s, mask, token_mask in (("train", ~val, ~token_in_val), ("val", val, token_in_val)):
                result["tokens"][token_mask].astype(dtype).tofile(out[s, "tokens"])
                (splits[s]["tokens"] + np.cumsum(lens[mask])).tofile(out[s, "offsets"])
                result["prompt_lens"][mask].tofile(out[s, "prompt_lens"])
                splits[s]["records"] += int(mask.sum())
                splits[s]["tokens"] += int(lens[mask].sum())
            bar.update(len(kept))
    return files, splits, np.dtype(dtype).name


def prepare(inputs, tokenizer_path, out_dir, max_len=1024, val_fraction=0.0, seed=0, workers=None, quiet=False):
    """Tokenise JSON / JSONL record files into token shards in out_dir; returns the summary dict.
    Records go to "val" with probability val_fraction (by a hash of seed and record index). Records
    whose answer is cut away entirely by max_len are dropped (they give no loss) and counted. The
    output is written to a temporary directory next to out_dir and renamed at the end, so a
    failure leaves nothing that looks complete. workers: processes (default: all cores);
    quiet: no progress bar."""
    inputs = [str(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    out_dir = str(out_dir).rstrip("/\\") or "."
    if not inputs:
        raise DataError("no input files; pass at least one --input FILE")
    if not (isinstance(max_len, int) and max_len >= 2):
        raise DataError(f"max_len must be an integer >= 2, got {max_len!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if os.path.exists(out_dir) and not os.path.isfile(os.path.join(out_dir, "summary.json")) \
            and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise DataError(f"{out_dir} exists and is not the output of a previous prepare; choose another --out")
    kinds = [_file_kind(p) for p in inputs]  # a missing or odd file fails before any work
    tok = Tokenizer(tokenizer_path)
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))

    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        files, splits, dtype = _write_shards(tmp, inputs, kinds, tok, max_len, val_fraction, seed, workers, quiet)
        if splits["train"]["records"] + splits["val"]["records"] == 0:
            raise DataError(f"no records left to train on (max_len {max_len} cut away every answer, or the "
                            "inputs are empty); raise --max_len or check the inputs")
        with open(tok.path, "rb") as f:
            sha256 = hashlib.sha256(f.read()).hexdigest()
        summary = dict(
            format="teamlora-shards-1", max_len=max_len, val_fraction=val_fraction, seed=seed, dtype=dtype,
            vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
            tokenizer=dict(path=tok.path, kind=tok.kind, sha256=sha256), splits=splits, files=files,
            **{k: sum(f[k] for f in files) for k in ("records", "truncated", "dropped_no_answer")})
        with open(os.path.join(tmp, "summary.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
        if os.path.exists(out_dir):  # a previous prepare's output: swap it out, then delete it
            os.rename(out_dir, f"{tmp}.old")
            os.rename(tmp, out_dir)
            shutil.rmtree(f"{tmp}.old")
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


# -----------------------------------------------------------------------------
# Batches

class TokenDataset:
    """The records of one split of a prepare output: ds[i] -> (ids, prompt_len), ids a uint array view."""

    def __init__(self, path, split="train"):
        summary_path = os.path.join(path, "summary.json")
        if not os.path.isfile(summary_path):
            raise DataError(f"{path} has no summary.json; make it with: python data.py prepare --out {path} ...")
        with open(summary_path, encoding="utf-8") as f:
            self.summary = json.load(f)
        if split not in self.summary["splits"]:
            raise DataError(f"{path} has no split {split!r}; the splits are {list(self.summary['splits'])}")
        self.max_len, self.pad_id = self.summary["max_len"], self.summary["pad_id"]
        name = lambda part: os.path.join(path, f"{split}.{part}.bin")
        self.offsets = np.fromfile(name("offsets"), np.int64)  # small: 8 bytes a record, kept in memory
        self.prompt_lens = np.fromfile(name("prompt_lens"), np.int32)
        dtype = np.dtype(self.summary["dtype"])
        self.tokens = np.memmap(name("tokens"), dtype, mode="r") if self.offsets[-1] else np.zeros(0, dtype)
        self.lengths = np.diff(self.offsets)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return self.tokens[self.offsets[i]:self.offsets[i + 1]], int(self.prompt_lens[i])


GROUP_BATCHES = 64  # pad mode sorts by length within windows of this many global batches


@lru_cache(maxsize=4)
def _epoch_permutation(n, seed, epoch):
    return np.random.default_rng([seed, epoch, 0]).permutation(n)


def _stream(n, seed, start, stop):
    """Example indices at positions [start, stop) of the endless stream: epoch permutations back to back."""
    pos = np.arange(start, stop)
    out = np.empty(len(pos), np.int64)
    for epoch in np.unique(pos // n):
        here = pos // n == epoch
        out[here] = _epoch_permutation(n, seed, int(epoch))[pos[here] % n]
    return out


@lru_cache(maxsize=2)
def _sorted_window(dataset, seed, window, batch_size):
    """The stream's window of GROUP_BATCHES batches, sorted by length (so a batch holds similar
    lengths), then its batches shuffled (so the loss does not see short-to-long sweeps)."""
    size = batch_size * GROUP_BATCHES
    ex = _stream(len(dataset), seed, window * size, (window + 1) * size)
    ex = ex[np.argsort(dataset.lengths[ex], kind="stable")].reshape(GROUP_BATCHES, batch_size)
    return ex[np.random.default_rng([seed, window, 1]).permutation(GROUP_BATCHES)]


def global_batch(dataset, step, batch_size, seed, mode="pad"):
    """Indices of the examples of global batch `step`: a function of (seed, step) only."""
    if len(dataset) == 0:
        raise DataError("the dataset split has no records; run prepare with more data or another split")
    if mode == "pad":
        return _sorted_window(dataset, seed, step // GROUP_BATCHES, batch_size)[step % GROUP_BATCHES]
    return _stream(len(dataset), seed, step * batch_size, (step + 1) * batch_size)


def epoch_of(dataset, step, batch_size):
    """How many epochs the first `step` steps consumed (fractional)."""
    return step * batch_size / len(dataset)


def _answer_tokens(dataset, examples, max_len):
    """Label positions that are not -100: predictions of answer tokens within the first max_len."""
    lengths = np.minimum(dataset.lengths[examples], max_len or np.iinfo(np.int64).max)
    return int(np.maximum(lengths - np.maximum(dataset.prompt_lens[examples], 1), 0).sum())


def global_answer_tokens(dataset, step, batch_size, seed, mode="pad", max_len=None):
    """Answer tokens in the whole global batch (every rank), to normalise the loss the same everywhere."""
    max_len = max_len or (dataset.max_len if mode == "pack" else None)
    return _answer_tokens(dataset, global_batch(dataset, step, batch_size, seed, mode), max_len)


def _place(tokens, labels, valid, row, start, ids, prompt_len):
    """Write one example at tokens[row, start:]; labels[t] = ids[t+1] where ids[t+1] is an answer token."""
    n = len(ids)
    tokens[row, start:start + n] = ids
    valid[row, start:start + n] = True
    first = max(prompt_len, 1)  # first answer position; labels are shifted one to the left
    labels[row, start + first - 1:start + n - 1] = ids[first:]


def get_batch(dataset, step, batch_size, seed, rank=0, world_size=1, mode="pad", max_len=None,
              pad_id=0, device="cpu"):
    """This rank's share of global batch `step` (batch_size examples over all ranks), as tensors:
    tokens (B, T), labels (B, T) shifted (-100 on prompt and padding), valid (B, T) True on real
    tokens, and in mode "pack" seq_ids (B, T): the example's index within its row, -1 on padding.
    n_answer_global: answer tokens of the whole global batch. Examples longer than max_len are cut;
    pack rows hold whole examples, at most max_len (default: the prepare max_len) tokens a row."""
    import torch
    if mode not in ("pad", "pack"):
        raise DataError(f"mode must be 'pad' or 'pack', got {mode!r}")
    if batch_size % world_size:
        raise DataError(f"batch_size {batch_size} is not divisible by world_size {world_size}; "
                        "the global batch is split evenly over ranks, so choose a multiple")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside 0..{world_size - 1}")
    if mode == "pack":
        max_len = max_len or dataset.max_len
    examples = global_batch(dataset, step, batch_size, seed, mode)
    share = batch_size // world_size
    mine = [dataset[i] for i in examples[rank * share:(rank + 1) * share]]
    mine = [(ids[:max_len] if max_len else ids, p) for ids, p in mine]

    if mode == "pad":
        rows = [[m] for m in mine]
    else:  # first fit, longest first: whole examples into rows of at most max_len tokens
        rows, room = [], []
        for ids, p in sorted(mine, key=lambda m: -len(m[0])):
            r = next((r for r, free in enumerate(room) if free >= len(ids)), len(rows))
            if r == len(rows):
                rows.append([])
                room.append(max_len)
            rows[r].append((ids, p))
            room[r] -= len(ids)
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    tokens = np.full((len(rows), width), pad_id, np.int64)  # (B, T)
    labels = np.full((len(rows), width), IGNORE_INDEX, np.int64)
    valid = np.zeros((len(rows), width), bool)
    seq_ids = np.full((len(rows), width), -1, np.int64)
    for r, row in enumerate(rows):
        start = 0
        for j, (ids, prompt_len) in enumerate(row):
            _place(tokens, labels, valid, r, start, ids, prompt_len)
            seq_ids[r, start:start + len(ids)] = j
            start += len(ids)

    batch = dict(tokens=tokens, labels=labels, valid=valid) | (dict(seq_ids=seq_ids) if mode == "pack" else {})
    batch = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
    batch["n_answer_global"] = _answer_tokens(dataset, examples, max_len)
    return batch


# -----------------------------------------------------------------------------
# Metrics


def normalize_answer(s):
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces. Unicode
    punctuation ("。") goes too; SQuAD's ASCII list would keep it."""
    s = "".join(c for c in s.lower() if c not in string.punctuation and not unicodedata.category(c).startswith("P"))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def exact_match(prediction, answers):
    """1.0 if the prediction equals any answer alias after normalisation, else 0.0."""
    answers = [answers] if isinstance(answers, str) else answers
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


# "Answer: B", "The correct option is B", "label: entailment" -> what follows the prefix
_ANSWER_PREFIX = re.compile(r"^\s*(?:the\s+)?(?:correct\s+|right\s+|final\s+)?(?:answer|option|choice|label)\b"
                            r"\s*(?:is\b)?\s*[:\-]?\s*", re.I)


def _option_letter(text):
    """The option letter a prediction starts with ("B", "(b)", "B.", "B) Paris", "A.cellular
    telephone"), or None; None too when it names a second option ("A or B", "A, B", "A B")."""
    m = re.match(r"([(\[])?([A-Za-z])(?![A-Za-z0-9])([)\]])?", text)
    if not m:
        return None
    letter, rest = m.group(2), text[m.end():]
    if letter.islower() and rest.strip() and not (m.group(1) or m.group(3) or rest[0] in ".:"):
        return None  # "a dog" starts with an article, not with option (a)
    if (re.match(r"\s*(?:,|/|&|\bor\b|\band\b)\s*[(\[]?[A-Za-z](?![A-Za-z0-9])", rest, re.I)
            or re.fullmatch(r"\s+[(\[]?[A-Z][)\]]?\.?\s*", rest)):
        return None
    return letter.upper()


def _words(s):
    return re.sub(r"[\W_]+", " ", s.lower()).split()  # "Not_entailment." -> ["not", "entailment"]


def _labels_named(words, labels):
    """The labels that occur in a word list; one inside a longer label that occurs there
    ("duplicate" inside "not duplicate") does not count on its own."""
    spans = []
    for lw in map(_words, labels):
        spans += [(i, i + len(lw), tuple(lw)) for i in range(len(words) - len(lw) + 1) if words[i:i + len(lw)] == lw]
    return {lw for s, e, lw in spans if not any(s2 <= s and e <= e2 and e2 - s2 > e - s for s2, e2, _ in spans)}


def accuracy(prediction, label, labels=None):
    """1.0 if the prediction gives the label: an option letter ("B", "(B)", "B. Paris", "Answer: B")
    or a label word, whatever the case and punctuation ("Entailment." for "entailment"). Given the
    task's label set, a longer answer counts when it names exactly one label, the right one. An
    answer naming two labels ("A or B", "entailment or neutral") is always wrong."""
    text = _ANSWER_PREFIX.sub("", prediction, count=1).strip()
    if re.fullmatch(r"[A-Za-z]", label.strip()):
        return float(_option_letter(text) == label.strip().upper())
    words, gold = _words(text), _words(label)
    return float(words == gold or (labels is not None and _labels_named(words, labels) == {tuple(gold)}))


def _lcs_length(a, b):
    """Length of the longest common subsequence of two token lists, one DP row at a time."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] before this pass
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction, reference):
    """ROUGE-L F1 as rouge-score computes it by default: lower case, every run of characters
    outside [a-z0-9] splits tokens, no stemming."""
    p, r = (re.sub(r"[^a-z0-9]+", " ", s.lower()).split() for s in (prediction, reference))
    lcs = _lcs_length(p, r) if p and r else 0
    return 0.0 if lcs == 0 else 2 * lcs / (len(p) + len(r))  # F1 of precision lcs/|p| and recall lcs/|r|


@dataclass
class Task:
    """An evaluation task: how many tokens to generate and how to score them against a record."""
    name: str
    metric: str  # "accuracy" | "exact_match" | "rouge_l"
    max_new_tokens: int
    labels: Optional[tuple] = None  # the allowed outputs of a classification task

    def __post_init__(self):
        if self.metric not in ("accuracy", "exact_match", "rouge_l"):
            raise DataError(f"task {self.name!r} has metric {self.metric!r}; use accuracy, exact_match or rouge_l.")

    def score(self, prediction, record):
        reference = record.get("output")
        if reference is None:
            raise DataError(f"a {self.name} record has no reference output; evaluate on a labelled split.")
        if self.metric == "accuracy":
            return accuracy(prediction, reference, self.labels)
        if self.metric == "exact_match":
            # the authors' Chinese QA records answer "<short answer>。<explanation>": score the answer
            return exact_match(prediction.split("。", 1)[0], record.get("answers") or [reference])
        return rouge_l(prediction, reference)


def evaluate(task, predictions, records):
    """The task's score over a set of records, as a percentage (mean x 100)."""
    if len(predictions) != len(records) or not records:
        raise DataError(f"{task.name}: {len(predictions)} predictions for {len(records)} records; "
                         "give one prediction per record.")
    return 100.0 * sum(task.score(p, r) for p, r in zip(predictions, records)) / len(records)


# -----------------------------------------------------------------------------
# Record templates in the style of the authors' 132 records (shared/fixtures/official). Every
# instruction is copied from them except RTE's: they hold no two-way NLI item, so it follows the
# NLI ones. CME evaluation sets use a kind's first phrasing; the synthetic suite samples them all.

TEMPLATES = {
    "nli": ([
        "What kind of relationship exists between the two given sentences: neutral, contradiction, or entailment?",
        "Can you identify the relationship between these two sentences as neutral, contradiction, or entailment?",
        "Identify the connection between the given sentences as either neutral, contradiction, or entailment.",
        "Analyze the connection between the following sentences: neutral, contradiction, or entailment.",
        "Decide the relationship between these sentences: neutral, contradiction, or entailment.",
        "Evaluate the relationship between these two sentences: neutral, contradiction, or entailment.",
        "Decide whether the following statements are neutral, contradiction, or entailment."],
        "Sentence 1: {premise}\nSentence 2: {hypothesis}"),
    "rte": (["Identify the connection between the given sentences as either entailment or not entailment."],
            "Sentence 1: {premise}\nSentence 2: {hypothesis}"),
    "paraphrase": ([
        "Determine if the following two sentences are semantically identical or different. Choose 'duplicate' or 'not duplicate'.",
        "Determine the relationship between the following sentences: are they duplicates or not? Select 'duplicate' or 'not duplicate'.",
        "Check if the following questions are semantically equivalent. Choose 'duplicate' if they are equivalent, otherwise select 'not duplicate'.",
        "Analyze the pair of questions to determine if they are asking the same thing. Choose 'duplicate' or 'not duplicate'.",
        "Evaluate the semantic similarity of the following sentences. If they are the same, choose 'duplicate'; if different, choose 'not duplicate'.",
        "Based on the content of these sentences, determine if they are duplicates of each other. Select 'duplicate' or 'not duplicate'.",
        "Judge whether these two sentences have the same meaning. Select 'duplicate' if they do and 'not duplicate' if they do not."],
        "Text 1: {text1}\nText 2: {text2}"),
    "sentiment": ([
        "Read the following review and determine if the sentiment is positive or negative.",
        "Determine whether the sentiment in the following passage is positive or negative.",
        "Classify the sentiment of the following review: is it positive or negative?",
        "Based on the content of the following passage, is the sentiment positive or negative?"], "{text}"),
    "summary": ([
        "Write a summary that captures the main ideas of the text:", "Provide a concise summary for the given passage:",
        "Write a concise summary for the provided text:", "Summarize the following text:",
        "Summarize the essential points of the following text:",
        "Condense the following information into a brief summary:"], "{text}"),
    "blank": ([
        "Decide the word represented by the blank in the provided sentence.",
        "Determine the proper word that the blank is substituting in the sentence.",
        "Determine the correct word to fill in the blank in the given sentence."],
        "Sentence: '{sentence}'\nOption A: '{option1}'\nOption B: '{option2}'"),
    "choice": (["Among the options given, choose the correct one."], "Question: {question}\nChoices: {choices}"),
}
LETTERS = "ABCDEFGH"


def make_record(kind, output, instruction=None, **fields):
    """A record of one kind; options=[...] become "A.x, B.y, ..." as in the official records."""
    phrasings, layout = TEMPLATES[kind]
    if "options" in fields:
        fields["choices"] = ", ".join(f"{LETTERS[i]}.{o}" for i, o in enumerate(fields.pop("options")))
    return {"instruction": instruction or phrasings[0], "input": layout.format(**fields), "output": output}


def qa_record(question, answers):
    """Open-domain QA as in the official records: the question is the instruction, no input.
    "answers" holds every alias (duplicates dropped); the first is the output."""
    answers = list(dict.fromkeys(a for a in answers if a))
    return {"instruction": question, "input": "", "output": answers[0] if answers else None, "answers": answers}


# -----------------------------------------------------------------------------
# CME loaders, one per public format. A row without a label (GLUE test files, WinoGrande's test
# split) loads with output None, so the file can still be turned into prompts; write_eval_set
# refuses it. A malformed file stops with its name, the line and what to do. Files are read as
# UTF-8, with or without a byte-order mark.

def _check_exists(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; check the path to the task's raw file.")


def _get(obj, key, where):
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where} has no {key!r} field; check that the file is in this task's format.")
    return obj[key]


def _label(value, mapping, where):
    if value is None or value == "":
        return None
    if value not in mapping:
        raise DataError(f"{where} has the label {value!r}; expected one of {list(mapping)}.")
    return mapping[value]


def _jsonl(path):
    """(where, object) for each non-empty line of a JSON-lines file."""
    _check_exists(path)
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n} is not valid JSON ({e.msg}); fix or remove that line.") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {n} is not a JSON object; each line must hold one record.")
            yield f"{path} line {n}", obj


def _json(path):
    _check_exists(path)
    with open(path, encoding="utf-8-sig") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno} is not valid JSON ({e.msg}); fix the file.") from None


def _tsv(path, need):
    """(where, row dict) for each row of a GLUE TSV; text mode turns QQP's CRLF into LF."""
    _check_exists(path)
    with open(path, encoding="utf-8-sig") as f:
        header = f.readline().rstrip("\n").split("\t")
        if not set(need) <= set(header):
            raise DataError(f"{path} has the columns {header}; this task needs {list(need)} in a header line.")
        for n, line in enumerate(f, 2):
            if not line.strip():
                continue
            cells = line.rstrip("\n").split("\t")
            if len(cells) != len(header):
                raise DataError(f"{path} line {n} has {len(cells)} tab-separated fields where the header has "
                                 f"{len(header)}; fix or remove that row.")
            yield f"{path} line {n}", dict(zip(header, cells))


def load_anli(path):
    """ANLI jsonl of any round (R1/R2/R3, dev or test): context, hypothesis, label e/n/c."""
    labels = {"e": "entailment", "n": "neutral", "c": "contradiction"}
    return [make_record("nli", _label(row.get("label"), labels, where), premise=_get(row, "context", where),
                        hypothesis=_get(row, "hypothesis", where)) for where, row in _jsonl(path)]


def load_rte(path):
    """GLUE RTE TSV: index, sentence1, sentence2, label entailment/not_entailment (none in test)."""
    labels = {"entailment": "entailment", "not_entailment": "not entailment"}
    return [make_record("rte", _label(row.get("label"), labels, where), premise=row["sentence1"],
                        hypothesis=row["sentence2"]) for where, row in _tsv(path, ("sentence1", "sentence2"))]


def load_qqp(path):
    """GLUE QQP TSV: id, qid1, qid2, question1, question2, is_duplicate (test: id, question1, question2)."""
    labels = {"1": "duplicate", "0": "not duplicate"}
    return [make_record("paraphrase", _label(row.get("is_duplicate"), labels, where), text1=row["question1"],
                        text2=row["question2"]) for where, row in _tsv(path, ("question1", "question2"))]


def load_winogrande(path):
    """WinoGrande jsonl: sentence with "_" for the blank, option1, option2, answer "1"/"2" -> A/B."""
    return [make_record("blank", _label(row.get("answer"), {"1": "A", "2": "B"}, where),
                        sentence=_get(row, "sentence", where), option1=_get(row, "option1", where),
                        option2=_get(row, "option2", where)) for where, row in _jsonl(path)]


def load_arc(path):
    """ARC jsonl: question {stem, choices [{text, label}]}, answerKey. Some rows label their choices
    "1".."4" instead of "A".."D"; the letters follow the choices' order either way."""
    records = []
    for where, row in _jsonl(path):
        choices = _get(_get(row, "question", where), "choices", where)
        keys = {str(_get(c, "label", where)): LETTERS[i] for i, c in enumerate(choices)}
        records.append(make_record("choice", _label(row.get("answerKey"), keys, where),
                                   question=_get(row["question"], "stem", where),
                                   options=[_get(c, "text", where) for c in choices]))
    return records


def load_mmlu(path):
    """MMLU CSV of one subject (data/{dev,test}/<subject>_<split>.csv): no header; question, A, B,
    C, D, answer, with quoted fields that may span lines."""
    _check_exists(path)
    records, start = [], 1
    with open(path, encoding="utf-8-sig", newline="") as f:  # newline="": csv sees the quoted newlines
        reader = csv.reader(f)
        for row in reader:
            where, start = f"{path} line {start}", reader.line_num + 1  # the line the record starts on
            if len(row) != 6:
                raise DataError(f"{where} has {len(row)} fields; an MMLU row is question, A, B, C, D, answer.")
            records.append(make_record("choice", _label(row[5].strip(), {c: c for c in "ABCD"}, where),
                                       question=row[0].strip(), options=[o.strip() for o in row[1:5]]))
    return records


_DESCRIPTION = re.compile(r'\(description\s+(?:"((?:[^"\\]|\\.)*)"|([^\s()"]+))\)')  # quoted or bare value


def load_webqa(path):
    """Baidu's Chinese WebQA, {qid: {"question", "evidences": {eid: {"answer": [...], "evidence"}}}}
    (every evidence's answers but "no_answer"), or English WebQuestions, a JSON list of
    {"utterance", "targetValue": '(list (description X) (description "Y Z"))'}."""
    data, records = _json(path), []
    if isinstance(data, dict):
        for qid, item in data.items():
            where = f"{path} question {qid}"
            evidences = _get(item, "evidences", where).values()
            answers = [a for ev in evidences for a in _get(ev, "answer", where) if a != "no_answer"]
            records.append(qa_record(_get(item, "question", where), answers))
        return records
    for i, item in enumerate(data):
        where = f"{path} record {i}"
        target = _get(item, "targetValue", where)
        answers = [re.sub(r"\\(.)", r"\1", quoted) or bare for quoted, bare in _DESCRIPTION.findall(target)]
        if not answers:
            raise DataError(f"{where} has the targetValue {target!r}; expected '(list (description ...) ...)'.")
        records.append(qa_record(_get(item, "utterance", where), answers))
    return records


def load_nq(path):
    """NQ-open jsonl: {"question", "answer": [aliases]} (EfficientQA's extra fields are ignored)."""
    records = []
    for where, row in _jsonl(path):
        answers = _get(row, "answer", where)
        records.append(qa_record(_get(row, "question", where), [answers] if isinstance(answers, str) else answers))
    return records


def load_triviaqa(path):
    """TriviaQA JSON {"Data": [{"Question", "Answer": {"Value", "NormalizedValue", "Aliases",
    "NormalizedAliases"}}]}. The output is the normalised value, lower case as in the official
    records; every alias counts for exact match. Files without answers load with output None."""
    records = []
    for i, item in enumerate(_get(_json(path), "Data", path)):
        a = item.get("Answer") or {}
        answers = [a.get("NormalizedValue"), a.get("Value")] + a.get("Aliases", []) + a.get("NormalizedAliases", [])
        records.append(qa_record(_get(item, "Question", f"{path} record {i}"), answers))
    return records


def load_tldr(path):
    """OpenAI TL;DR: tldr_3_filtered rows {id, subreddit, title, post, summary}, or
    summarize-from-feedback comparisons {info: {id, post, ...}, summaries: [{text, policy}]}, which
    count once per post and only when a summary is the human reference (policy "ref"). JSONL, or a
    JSON list or object. The input is the post alone, as in the official records."""
    if path.endswith(".jsonl"):
        rows = _jsonl(path)
    else:
        data = _json(path)
        rows = [(f"{path} record {i}", r) for i, r in enumerate(data if isinstance(data, list) else [data])]
    records, seen = [], set()
    for where, row in rows:
        if "info" in row:
            info = _get(row, "info", where)
            refs = [s["text"] for s in _get(row, "summaries", where) if s.get("policy") == "ref"]
            if not refs or info.get("id") in seen:
                continue
            seen.add(info.get("id"))
            post, summary = _get(info, "post", where), refs[0]
        else:
            post, summary = _get(row, "post", where), row.get("summary")
        records.append(make_record("summary", summary and summary.strip(), text=post))  # refs start with a space
    return records


def load_imdb(path):
    """IMDB as an aclImdb split folder (pos/ and neg/ of <id>_<rating>.txt, e.g. aclImdb/test) or a
    file of 'pos<TAB>review' lines (fastNLP's variant). Reviews keep their <br /> tags, as the
    official records do."""
    _check_exists(path)
    names, records = {"pos": "positive", "neg": "negative"}, []
    if not os.path.isdir(path):
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                label, tab, text = line.rstrip("\n").partition("\t")
                if not line.strip():
                    continue
                if not tab or label not in names:
                    raise DataError(f"{path} line {n} is not 'pos<TAB>review' or 'neg<TAB>review'; fix or remove it.")
                records.append(make_record("sentiment", names[label], text=text))
        return records
    if not any(os.path.isdir(os.path.join(path, lab)) for lab in names):
        raise DataError(f"{path} has no pos/ or neg/ folder; point at an aclImdb split folder such as aclImdb/test.")
    for lab in (lab for lab in names if os.path.isdir(os.path.join(path, lab))):
        folder, files = os.path.join(path, lab), []
        for name in os.listdir(folder):
            m = re.fullmatch(r"(\d+)_\d+\.txt", name)
            if not m:
                raise DataError(f"{os.path.join(folder, name)} is not named <id>_<rating>.txt; move it out of {folder}.")
            files.append((int(m.group(1)), name))
        for _, name in sorted(files):
            with open(os.path.join(folder, name), encoding="utf-8-sig") as f:
                records.append(make_record("sentiment", names[lab], text=f.read()))
    return records


@dataclass
class CMETask(Task):
    """A CME evaluation task: a Task plus the loader of its public file format."""
    load: Callable = None  # path -> list of records in the official format
    source: str = ""  # the files load() reads


CME_TASKS = {t.name: t for t in [
    CMETask("oai_sum", "rouge_l", 128, None, load_tldr, "tldr_3_filtered/*.jsonl or summarize-from-feedback comparisons"),
    CMETask("imdb", "accuracy", 8, ("positive", "negative"), load_imdb, "aclImdb/test folder or label<TAB>review file"),
    CMETask("anli", "accuracy", 8, ("entailment", "neutral", "contradiction"), load_anli, "anli_v1.0/R*/{dev,test}.jsonl"),
    CMETask("qqp", "accuracy", 8, ("duplicate", "not duplicate"), load_qqp, "GLUE QQP/{train,dev,test}.tsv"),
    CMETask("rte", "accuracy", 8, ("entailment", "not entailment"), load_rte, "GLUE RTE/{train,dev,test}.tsv"),
    CMETask("winogrande", "accuracy", 4, ("A", "B"), load_winogrande, "winogrande_1.1/{train_*,dev,test}.jsonl"),
    CMETask("arc", "accuracy", 4, tuple("ABCDE"), load_arc, "ARC-V1-Feb2018/ARC-*/ARC-*-{Train,Dev,Test}.jsonl"),
    CMETask("mmlu", "accuracy", 4, tuple("ABCD"), load_mmlu, "data/{dev,test}/<subject>_<split>.csv"),
    CMETask("webqa", "exact_match", 64, None, load_webqa, "WebQA.v1.0/*.ann.json or webquestions.examples.*.json"),
    CMETask("nq", "exact_match", 32, None, load_nq, "nq_open/NQ-open.{train,dev}.jsonl"),
    CMETask("triviaqa", "exact_match", 32, None, load_triviaqa, "triviaqa-rc/qa/*.json"),
]}


def _write_atomic(path, content):
    """Write text or bytes under a temporary name, then rename: a half-written file never looks complete."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)
    os.replace(path + ".tmp", path)


def _jsonl_text(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_eval_set(task_name, raw_path, out_path, limit=None):
    """Load a CME task's raw file (a path, or a list of them, e.g. ANLI's three rounds) and write an
    evaluation set in the official format: a JSON list for .json, JSON lines for .jsonl. Returns
    the number of records written."""
    if task_name not in CME_TASKS:
        raise DataError(f"unknown task {task_name!r}; choose one of {', '.join(CME_TASKS)}.")
    if not out_path.endswith((".json", ".jsonl")):
        raise DataError(f"{out_path} must end in .json (a JSON list) or .jsonl (one record per line).")
    paths = [raw_path] if isinstance(raw_path, (str, os.PathLike)) else list(raw_path)
    records = [r for p in paths for r in CME_TASKS[task_name].load(str(p))]
    unlabelled = sum(r["output"] is None for r in records)
    if unlabelled:
        raise DataError(f"{unlabelled} of {len(records)} records in {', '.join(map(str, paths))} have no label "
                         "(a test split without answers?); build the evaluation set from a labelled split such as dev.")
    records = records[:limit] if limit else records
    text = _jsonl_text(records) if out_path.endswith(".jsonl") else json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    _write_atomic(out_path, text)
    return len(records)


# -----------------------------------------------------------------------------
# mini-CME: a synthetic multi-task suite over an invented world (cities, people, films) whose
# facts only its corpus teaches. Like the CME's 22 sources, the tasks share inputs: fact sentences
# feed the corpus, NLI premises and reviews; one set of questions feeds closed-book QA, multiple
# choice and paraphrase pairs; opinion sentences feed reviews and posts; letters answer both
# multiple choice and fill-the-blank. Each task answers in its own convention (label words,
# letters, "duplicate", a name, a sentence): one low-rank adapter has to juggle them all, which
# is what separate experts can win on.

N_CITIES, N_PEOPLE, N_DIRECTORS, N_FILMS = 40, 100, 20, 60
HELD_OUT = 0.3  # share of facts that only corpus.txt states: the QA and choice test sets ask these
GENRES = ["drama", "comedy", "western", "thriller", "musical", "documentary", "romance", "horror", "mystery", "fantasy"]
JOBS = {"film director": "spends long days on film sets", "painter": "mixes colours all day",
        "sailor": "spends weeks at sea", "doctor": "treats sick people", "teacher": "marks homework every evening",
        "baker": "gets up before dawn to bake bread", "singer": "warms up before every concert",
        "farmer": "watches the sky for rain", "pilot": "flies across the country",
        "lawyer": "argues cases in court", "carpenter": "builds tables and chairs"}
PASTIMES = {"chess": "studies chess openings", "fishing": "owns many fishing rods", "gardening": "grows tomatoes",
            "cycling": "rides a bike everywhere", "knitting": "knits scarves for friends",
            "swimming": "goes to the pool every morning", "rowing": "rows on the lake at dawn",
            "hiking": "owns good walking boots"}
PRODUCTS = ["glass", "silk", "cheese", "clocks", "wine", "paper", "honey", "salt", "lamps", "carpets"]
TITLE_WORDS = ("Silver Last Hidden Broken Golden Quiet Burning Frozen Lonely Secret Distant Crimson".split(),
               "Harbor Lantern Winter Garden River Crown Mirror Road Island Letter Tower Promise".split())
SYLLABLES = "ba be bi bo da de di do ka ke ki ko la le li lo ma me mi mo na ne ni no ra re ri ro sa se si so " \
            "ta te ti to va ve vi vo".split()

# kind -> attribute -> (statements, questions). Statements appear in the corpus and in task inputs;
# questions never appear in the corpus, so QA must link two phrasings of one fact.
ATTRS = {
    "film": {
        "director": (["{e} was directed by {v}.", "{v} directed {e}.", "{v} is the director of {e}."],
                     ["Who directed {e}?", "who is the director of {e}", "Which filmmaker made {e}?"]),
        "year": (["{e} came out in {v}.", "{e} was released in {v}.", "{e} first reached cinemas in {v}."],
                 ["When was {e} released?", "In what year did {e} come out?", "what year did {e} come out"]),
        "genre": (["{e} is a {v}.", "{e} belongs to the {v} genre."], ["What genre is {e}?", "What kind of film is {e}?"]),
        "city": (["{e} was filmed in {v}.", "The cameras for {e} rolled in {v}.", "{e} was shot on location in {v}."],
                 ["Where was {e} filmed?", "In which city was {e} shot?"])},
    "person": {
        "city": (["{e} comes from {v}.", "{e} was born in {v}.", "{v} is the home town of {e}."],
                 ["Where does {e} come from?", "What is the home town of {e}?", "where was {e} born"]),
        "job": (["{e} works as a {v}.", "{e} earns a living as a {v}.", "By trade, {e} is a {v}."],
                ["What does {e} do for a living?", "What is the job of {e}?"]),
        "pastime": (["The favourite pastime of {e} is {v}.", "Of all pastimes, {e} likes {v} best."],
                    ["What is the favourite pastime of {e}?", "Which pastime does {e} like best?"])},
    "city": {
        "region": (["{e} is a city in {v}.", "{e} lies in the region of {v}."],
                   ["In which region is {e}?", "Where is {e} located?"]),
        "river": (["The {v} river flows through {e}.", "{e} stands on the banks of the {v}."],
                  ["Which river flows through {e}?", "What river is {e} on?"]),
        "product": (["{e} is known for its {v}.", "The {v} of {e} is famous across the land."],
                    ["What is {e} known for?", "What is {e} famous for?"])},
}


def _aliases(attr, v):
    """The answers exact match accepts for a fact; the first is the record's output."""
    return {"director": [v, v.split()[-1]], "river": [v, f"{v} river"], "genre": [v, f"{v} film"]}.get(attr, [v])


def _invent(rng, n, taken):
    """n new made-up names, so that no fact can be known from anywhere but the corpus."""
    out = []
    while len(out) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize() + rng.choice(("", "n", "s"))
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def build_world(seed):
    """The entities (dicts of attributes), the facts held out of every task input, and the pools
    that wrong answers are drawn from."""
    rng, taken = random.Random(f"world-{seed}"), set()
    regions, rivers = _invent(rng, 6, taken), _invent(rng, 20, taken)
    cities = [{"kind": "city", "name": c, "region": rng.choice(regions), "river": rng.choice(rivers),
               "product": rng.choice(PRODUCTS)} for c in _invent(rng, N_CITIES, taken)]
    city_names = [c["name"] for c in cities]
    names = zip(_invent(rng, N_PEOPLE, taken), _invent(rng, N_PEOPLE, taken))
    people = [{"kind": "person", "name": f"{first} {last}", "city": rng.choice(city_names),
               "job": "film director" if i < N_DIRECTORS else rng.choice(list(JOBS)[1:]),
               "pastime": rng.choice(list(PASTIMES))} for i, (first, last) in enumerate(names)]
    titles = rng.sample([f"The {a} {b}" for a in TITLE_WORDS[0] for b in TITLE_WORDS[1]], N_FILMS)
    films = [{"kind": "film", "name": t, "director": people[i % N_DIRECTORS]["name"], "genre": rng.choice(GENRES),
              "year": str(rng.randint(1950, 2020)), "city": rng.choice(city_names)} for i, t in enumerate(titles)]
    entities = cities + people + films
    facts = [(e["name"], a) for e in entities for a in ATTRS[e["kind"]]]
    rng.shuffle(facts)
    held = facts[:int(HELD_OUT * len(facts))]
    pools = {"director": [p["name"] for p in people[:N_DIRECTORS]], "year": [str(y) for y in range(1950, 2021)],
             "genre": GENRES, "city": city_names, "job": list(JOBS), "pastime": list(PASTIMES), "region": regions,
             "river": rivers, "product": PRODUCTS}
    return {"entities": entities, "films": films, "cities": city_names, "by_name": {e["name"]: e for e in entities},
            "held": set(held), "facts": {"train": facts[len(held):], "val": held, "test": held}, "pools": pools,
            "story_names": _invent(rng, 40, taken)}  # first names for posts and blanks, never world people


def _statements(e, attr, v=None):
    return [t.format(e=e["name"], v=e[attr] if v is None else v) for t in ATTRS[e["kind"]][attr][0]]


def _questions(e, attr):
    return [t.format(e=e["name"]) for t in ATTRS[e["kind"]][attr][1]]


def _stated(w, e):
    """The attributes of e that task inputs may state (held-out facts live in the corpus only)."""
    return [a for a in ATTRS[e["kind"]] if (e["name"], a) not in w["held"]]


ASPECTS = ["acting", "story", "music", "ending", "camera work", "dialogue", "pacing", "cast"]
GOOD, BAD = "wonderful brilliant moving superb charming clever".split(), "dull awful clumsy boring weak silly".split()
OPENINGS = ["I watched {} last night.", "My friends dragged me to {}.", "I finally caught {} on television."]
FEELINGS = (["The people here are friendly.", "I already love my new street.", "Work has been exciting so far."],
            ["I do not know anyone here yet.", "Most evenings I sit alone in my flat.", "I miss my old friends a lot."])
FILLERS = ["The tickets were expensive.", "It rained the whole week.", "My phone broke on the way home."]
CLOSINGS = ["Am I overthinking this?", "Has anyone else felt this way?", "Any advice would be appreciated."]


def _opinions(rng, positive):
    """Three opinion sentences on different aspects, two or three of them with the given polarity."""
    polarities = [positive] * rng.choice((2, 3))
    polarities += [not positive] * (3 - len(polarities))
    rng.shuffle(polarities)
    out = []
    for p, a in zip(polarities, rng.sample(ASPECTS, 3)):
        good, bad = rng.choice(GOOD), rng.choice(BAD)
        out.append(rng.choice([f"The {a} was {good}.", f"I loved the {a}.", f"The {a} was not {bad} at all."] if p
                              else [f"The {a} was {bad}.", f"I could not stand the {a}.", f"The {a} was not {good}."]))
    return out


def _review(w, rng, positive):
    film = rng.choice(w["films"])
    text = rng.choice(OPENINGS).format(film["name"])
    if _stated(w, film):
        text += " " + rng.choice(_statements(film, rng.choice(_stated(w, film))))
    return text + rng.choice([" ", " ", "<br /><br />"]) + " ".join(_opinions(rng, positive))  # IMDB's <br /> tags


def _post(w, rng, positive):
    """A TL;DR-like first-person post and its reference summary."""
    if rng.random() < 0.5:
        film, rel = rng.choice(w["films"]), rng.choice(["friend", "sister", "brother", "cousin"])
        city = rng.choice([c for c in w["cities"] if c != film["city"]])  # no hint where the film was shot
        post = (f"Last {rng.choice(['Monday', 'Friday', 'Sunday'])} I went to see {film['name']} with my {rel} "
                f"{rng.choice(w['story_names'])} in {city}. " + " ".join(_opinions(rng, positive)))
        summary = f"Saw {film['name']} with my {rel} in {city} and {'loved it' if positive else 'did not like it'}."
    else:
        (a, b), job = rng.sample(w["cities"], 2), rng.choice(list(JOBS))
        post = (f"I ({rng.randint(19, 45)}{rng.choice('mf')}) just moved from {a} to {b} to start a job as a {job}. "
                + " ".join(rng.sample(FEELINGS[0 if positive else 1], 2)))
        summary = f"Moved from {a} to {b} for a {job} job and {'love it so far' if positive else 'feel lonely'}."
    return f"{post} {rng.choice(FILLERS)} {rng.choice(CLOSINGS)}", summary


# One generator per task: (world, rng, index, split) -> record; the index balances the labels.

def gen_sentiment(w, rng, i, split):
    positive = i % 2 == 0
    return make_record("sentiment", "positive" if positive else "negative", rng.choice(TEMPLATES["sentiment"][0]),
                       text=_review(w, rng, positive))


def gen_nli(w, rng, i, split):
    """Entailment restates a premise fact in other words, contradiction changes its value, neutral
    speaks of an attribute the premise does not mention."""
    label = ("entailment", "neutral", "contradiction")[i % 3]
    e = rng.choice([x for x in w["entities"] if len(_stated(w, x)) >= 2])
    premise_attrs = rng.sample(_stated(w, e), 2)
    sentences = [rng.choice(_statements(e, a)) for a in premise_attrs]
    other = rng.choice(w["entities"])
    if other is not e and _stated(w, other) and rng.random() < 0.5:  # a distractor, as in ANLI's long contexts
        sentences.insert(rng.randrange(3), rng.choice(_statements(other, rng.choice(_stated(w, other)))))
    if label == "neutral":  # any value, but never a held-out fact's true one
        attr = rng.choice([a for a in ATTRS[e["kind"]] if a not in premise_attrs])
        value = rng.choice([v for v in w["pools"][attr] if not (v == e[attr] and (e["name"], attr) in w["held"])])
    else:
        attr = rng.choice(premise_attrs)
        value = e[attr] if label == "entailment" else rng.choice([v for v in w["pools"][attr] if v != e[attr]])
    hypothesis = rng.choice([s for s in _statements(e, attr, value) if s not in sentences])
    return make_record("nli", label, rng.choice(TEMPLATES["nli"][0]), premise=" ".join(sentences), hypothesis=hypothesis)


def gen_paraphrase(w, rng, i, split):
    duplicate = i % 2 == 0
    e = rng.choice(w["entities"])
    attr = rng.choice(list(ATTRS[e["kind"]]))
    q1, q2 = rng.sample(_questions(e, attr), 2)
    if not duplicate and rng.random() < 0.5:  # same entity, another attribute
        q2 = rng.choice(_questions(e, rng.choice([a for a in ATTRS[e["kind"]] if a != attr])))
    elif not duplicate:  # same attribute, another entity
        q2 = rng.choice(_questions(rng.choice([x for x in w["entities"] if x["kind"] == e["kind"] and x is not e]), attr))
    return make_record("paraphrase", "duplicate" if duplicate else "not duplicate",
                       rng.choice(TEMPLATES["paraphrase"][0]), text1=q1, text2=q2)


def gen_choice(w, rng, i, split):
    name, attr = rng.choice(w["facts"][split])
    e, position = w["by_name"][name], i % 4
    options = rng.sample([v for v in w["pools"][attr] if v != e[attr]], 3)
    options.insert(position, e[attr])
    return make_record("choice", LETTERS[position], question=rng.choice(_questions(e, attr)), options=options)


def gen_blank(w, rng, i, split):
    """WinoGrande-like: whom does the blank stand for? The names come from outside the world."""
    names, kind = rng.sample(w["story_names"], 2), rng.choice(("job", "pastime", "city"))
    values = rng.sample(w["cities"] if kind == "city" else list(JOBS if kind == "job" else PASTIMES), 2)
    target = rng.randrange(2)
    clue = f"knows the streets of {values[target]} better" if kind == "city" else {**JOBS, **PASTIMES}[values[target]]
    first = {"job": "{} is a {} and {} is a {}", "pastime": "{} loves {} while {} prefers {}",
             "city": "{} grew up in {} but {} grew up in {}"}[kind].format(names[0], values[0], names[1], values[1])
    answer = "AB"[i % 2]
    options = [names[target], names[1 - target]] if answer == "A" else [names[1 - target], names[target]]
    return make_record("blank", answer, rng.choice(TEMPLATES["blank"][0]), sentence=f"{first}, so _ {clue}.",
                       option1=options[0], option2=options[1])


def gen_qa(w, rng, i, split):
    name, attr = rng.choice(w["facts"][split])
    e = w["by_name"][name]
    return qa_record(rng.choice(_questions(e, attr)), _aliases(attr, e[attr]))


def gen_summary(w, rng, i, split):
    post, summary = _post(w, rng, rng.random() < 0.5)
    return make_record("summary", summary, rng.choice(TEMPLATES["summary"][0]), text=post)


SYNTHETIC_TASKS = {t.name: t for t in [
    Task("sentiment", "accuracy", 8, ("positive", "negative")),
    Task("nli", "accuracy", 8, ("entailment", "neutral", "contradiction")),
    Task("paraphrase", "accuracy", 8, ("duplicate", "not duplicate")),
    Task("choice", "accuracy", 4, ("A", "B", "C", "D")),
    Task("blank", "accuracy", 4, ("A", "B")),
    Task("qa", "exact_match", 16),
    Task("summary", "rouge_l", 48),
]}
_GENERATORS = {"sentiment": gen_sentiment, "nli": gen_nli, "paraphrase": gen_paraphrase, "choice": gen_choice,
               "blank": gen_blank, "qa": gen_qa, "summary": gen_summary}


VERDICTS = (["All in all, I liked it.", "I would happily watch it again.", "Well worth a ticket."],
            ["All in all, I did not like it.", "I would not watch it again.", "Not worth a ticket."])


def _story(w, rng):
    """A clue that points to one of two people, the blank task's skill in plain words. It names world
    people, never the story names that the blank task uses, so no test answer is written here."""
    (a, b), kind = rng.sample(w["entities"][N_CITIES:N_CITIES + N_PEOPLE], 2), rng.choice(("job", "pastime", "city"))
    a, b = a["name"].split()[0], b["name"].split()[0]
    values = rng.sample(w["cities"] if kind == "city" else list(JOBS if kind == "job" else PASTIMES), 2)
    first = {"job": "{} is a {} and {} is a {}.", "pastime": "{} loves {} while {} prefers {}.",
             "city": "{} grew up in {} but {} grew up in {}."}[kind].format(a, values[0], b, values[1])
    target = rng.randrange(2)
    clue = f"knows the streets of {values[target]} better" if kind == "city" else {**JOBS, **PASTIMES}[values[target]]
    return f"{first} That is why {(a, b)[target]} {clue}."


def _reasoning(w, rng):
    """A fact restated in other words, or a false claim corrected: the NLI and paraphrase skills
    in plain words (statements only: the QA questions' wording never reaches the corpus)."""
    e = rng.choice(w["entities"])
    attr = rng.choice(list(ATTRS[e["kind"]]))
    s1, s2 = rng.sample(_statements(e, attr), 2)
    if rng.random() < 0.5:
        return f"{s1} In other words: {s2}"
    wrong = rng.choice([v for v in w["pools"][attr] if v != e[attr]])
    return f"Some say that {rng.choice(_statements(e, attr, wrong))} That is wrong. {s1}"


def _corpus(w, rng, n_docs):
    """Plain-text documents, the kind of text a base model is pretrained on: half are encyclopedia
    entries stating every fact of one entity (each entity several times, in varied words); a
    quarter are reviews and posts, ending the way such text does (a verdict, a "TL;DR:" line); a
    quarter reason in plain words (a fact restated, a false claim corrected, a clue that points to
    a person). The tasks' instructions, questions and label words never appear: the base learns
    the skills, and instruction tuning has to map them onto each task's format."""
    docs = []
    for j in range(n_docs // 2):
        e = w["entities"][j % len(w["entities"])]
        facts = [rng.choice(_statements(e, a)) for a in ATTRS[e["kind"]]]
        rng.shuffle(facts)
        if e["kind"] == "person":
            facts.append(f"As a {e['job']}, {e['name'].split()[0]} {JOBS[e['job']]}.")
        docs.append(" ".join(facts))
    for j in range(n_docs // 4):
        positive = rng.random() < 0.5
        if j % 2:
            docs.append(f"{_review(w, rng, positive)} {rng.choice(VERDICTS[0 if positive else 1])}")
        else:
            post, summary = _post(w, rng, positive)
            docs.append(f"{post} TL;DR: {summary}")
    for j in range(n_docs - len(docs)):
        docs.append(_story(w, rng) if j % 3 == 0 else _reasoning(w, rng))
    rng.shuffle(docs)
    return docs


def _train_tokenizer(lines, vocab_size):
    """A LLaMA-like SentencePiece model: BPE, byte fallback (no text is unknown), split digits, no
    normalisation, unk=0 bos=1 eos=2 and no pad id. One thread keeps the result deterministic."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"SentencePiece could not build {vocab_size} pieces ({e}); lower vocab_size or raise "
                         "corpus_docs.") from None
    return model.getvalue()


def make_suite(out_dir, seed=0, n_train_per_task=1500, n_test_per_task=150, n_val_per_task=20, corpus_docs=6000,
               vocab_size=2000):
    """Write mini-CME to out_dir and return its summary:
        train.jsonl         every task's training records, shuffled: the official format plus "task"
        val.jsonl           the same, small (with "answers" for QA)
        test/<task>.jsonl   one evaluation set per task (with "answers" for QA)
        corpus.txt          pretraining text for a tiny base model, documents separated by blank lines
        tokenizer.model     SentencePiece, trained on the corpus and the training records
        suite.json          the summary, written last: its presence means the suite is complete
    The same seed gives byte-identical files. QA and choice test sets ask facts that only corpus.txt
    states; no val or test prompt repeats another prompt of the suite."""
    w = build_world(seed)
    if corpus_docs < 2 * len(w["entities"]):
        raise DataError(f"corpus_docs={corpus_docs} is too small; use at least {2 * len(w['entities'])} so that "
                         "every entity's facts reach the corpus.")
    if os.path.exists(os.path.join(out_dir, "suite.json")):
        os.remove(os.path.join(out_dir, "suite.json"))  # a rebuild cut short must not look complete
    sizes = {"train": n_train_per_task, "val": n_val_per_task, "test": n_test_per_task}
    data = {split: {} for split in sizes}
    for name, generate in _GENERATORS.items():
        seen = set()
        for split, n in sizes.items():
            rng, records = random.Random(f"{seed}-{name}-{split}"), []
            for i in range(n):
                for _ in range(100):  # retry a prompt seen before; a tiny world may run out of new ones
                    record = generate(w, rng, i, split)
                    if split == "train" or (record["instruction"], record["input"]) not in seen:
                        break
                seen.add((record["instruction"], record["input"]))
                records.append(record)
            data[split][name] = records
    train = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"], "task": name}
             for name, records in data["train"].items() for r in records]
    val = [{**r, "task": name} for name, records in data["val"].items() for r in records]
    random.Random(f"{seed}-mix").shuffle(train)
    random.Random(f"{seed}-mix-val").shuffle(val)
    docs = _corpus(w, random.Random(f"{seed}-corpus"), corpus_docs)
    texts = docs + [line for r in train for field in ("instruction", "input", "output") for line in r[field].split("\n")]
    tokenizer = _train_tokenizer([t for t in texts if t], vocab_size)

    for name, records in data["test"].items():
        _write_atomic(os.path.join(out_dir, "test", f"{name}.jsonl"), _jsonl_text(records))
    _write_atomic(os.path.join(out_dir, "train.jsonl"), _jsonl_text(train))
    _write_atomic(os.path.join(out_dir, "val.jsonl"), _jsonl_text(val))
    _write_atomic(os.path.join(out_dir, "corpus.txt"), "\n\n".join(docs) + "\n")
    _write_atomic(os.path.join(out_dir, "tokenizer.model"), tokenizer)
    summary = {"seed": seed, "vocab_size": vocab_size, "corpus_docs": len(docs), "corpus_chars": sum(map(len, docs)),
               "entities": len(w["entities"]), "held_out_facts": len(w["held"]), "train": len(train), "val": len(val),
               "tasks": {name: {"metric": t.metric, "max_new_tokens": t.max_new_tokens,
                                "labels": t.labels and list(t.labels), **{s: len(data[s][name]) for s in sizes}}
                         for name, t in SYNTHETIC_TASKS.items()}}
    _write_atomic(os.path.join(out_dir, "suite.json"), json.dumps(summary, indent=1) + "\n")
    return summary


# -----------------------------------------------------------------------------
# Command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenise JSON / JSONL records into token shards")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="JSON lists or JSONL of records")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model (SentencePiece or tiktoken)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max_len", type=int, default=1024)
    p.add_argument("--val_fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    e = commands.add_parser("eval_set", help="write a CME evaluation set in the official format from a task's raw files")
    e.add_argument("--task", required=True, choices=list(CME_TASKS))
    e.add_argument("--raw", required=True, nargs="+", help="the task's raw file(s), or aclImdb's split folder")
    e.add_argument("--out", required=True, help="output: .json (a list) or .jsonl")
    e.add_argument("--limit", type=int, default=None, help="keep the first N records")
    s = commands.add_parser("suite", help="write the synthetic mini-CME suite (deterministic from the seed)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "eval_set":
            n = write_eval_set(args.task, args.raw, args.out, args.limit)
            print(f"wrote {n} {args.task} records to {args.out}")
        elif args.command == "suite":
            summary = make_suite(args.out, args.seed)
            print(f"mini-CME in {args.out}: {summary['train']} training records over {len(summary['tasks'])} tasks, "
                  f"{summary['corpus_docs']} corpus documents, a {summary['vocab_size']}-piece tokenizer")
        else:
            s = prepare(args.input, args.tokenizer, args.out, args.max_len, args.val_fraction, args.seed, args.workers)
            print(f"{s['records']} records -> {args.out}: train {s['splits']['train']['records']} records "
                  f"({s['splits']['train']['tokens']} tokens), val {s['splits']['val']['records']}; "
                  f"{s['truncated']} truncated, {s['dropped_no_answer']} dropped (answer cut away); dtype {s['dtype']}")
    except (DataError, OSError) as e:
        sys.exit(f"data.py {args.command}: error: {e}")


if __name__ == "__main__":
    main()
