"""
The data pipeline: the authors' record format token for token, `prepare` (JSON / JSONL records
-> token shards) and training batches. The tokenizer lives in tokenizer.py, the evaluation tasks in
tasks.py, the synthetic mini-CME suite in minicme.py.

    python data.py prepare --input train.json more.jsonl --tokenizer tokenizer.model --out data/cme

A record is {"instruction", "input", "output"} ("input" may be empty, null or absent), or
{"text"} for a plain document; files are JSON lists or JSONL. The token ids of a record are
those of the authors' build_dataset.py run with transformers 4.30's slow LlamaTokenizer:
    prompt = BOS + tok(instruction ["\\n" + input] + "</s>")    labels -100
    answer = tok(output + eos_text)                             labels = ids
where tok() splits the text on the special tokens' strings (so the literal "</s>" becomes the EOS
id, which raw SentencePiece would not do) and SentencePiece-encodes each piece on its own (each
gets its own dummy-prefix "▁"). Whitespace next to a special token is kept: in the tokenizer files
of LLaMA-2 and Chinese-LLaMA-2 the special tokens are AddedToken(lstrip=False, rstrip=False), and
4.30 strips only around special tokens given as plain strings in special_tokens_map.json.
eos_text is "</s>" for LLaMA-2; for LLaMA-3 it is "<|end_of_text|>", and the prompt's "</s>" (which
build_dataset.py's template hard-codes) is its EOS id too, as with any tokenizer without a "</s>" token (tokenizer.py).

Shards (one set per split, "train" and "val"), read back by TokenDataset:
    {split}.tokens.bin        all token ids back to back (uint16 if vocab_size <= 65536, else uint32)
    {split}.offsets.bin       int64, records + 1 entries: record i is tokens[offsets[i]:offsets[i+1]]
    {split}.prompt_lens.bin   int32: labels are -100 on the first prompt_len tokens of a record
    summary.json              counts per file, dtype, special ids, tokenizer hash, max_len
"""
if __name__ == "__main__":  # before the imports: see errors.start_script (closed streams, Ctrl-C while importing)
    import errors
    errors.start_script()

import json
import os
import re
import shutil
import sys
from collections import deque
from contextlib import ExitStack
from functools import lru_cache

import numpy as np

from errors import Parser, UserError, at_a_terminal, ctrl_c_held, exit_with, listed, run_script
from files import (
    TOO_DEEP,
    blocked_parent,
    ends_in_a_long_integer,
    file_sha256,
    flag_path,
    inside,
    json_kind,
    move_into,
    not_a_folder,
    process_is_running,
    read_json,
    special_file,
    unique_keys,
    value_problem,
    write_atomic,
)
from tokenizer import PROMPT_EOS, Tokenizer

IGNORE_INDEX = -100


# -----------------------------------------------------------------------------
# The authors' record format

_FIX = 'each record must be an object with "instruction", "input" and "output" strings (or just a "text" string)'


def _field(example, key, where, required=True, fix=_FIX):
    """example[key] as a string, or a UserError naming `where`, the problem and `fix`. An optional
    field ("input") may be absent or null: build_dataset.py treats None as empty."""
    if not isinstance(example, dict):
        raise UserError(f"{where} is {json_kind(example)}, not an object; {fix}")
    if required and key not in example:
        lists = [k for k, v in example.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if lists:  # {"data": [records]}: the file holds one JSON object, not a list of records
            raise UserError(f'{where} is one JSON object holding a list of records (under "{lists[0]}"), not a '
                            "record; save that list itself as the file (a JSON list of records) or as JSONL")
        raise UserError(f'{where} has no "{key}"; {fix}')
    value = example.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise UserError(f'{where}: "{key}" is {json_kind(value)}, not a string; {fix}')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\ud800" alone; tokenizers do not
        raise UserError(f'{where}: "{key}" holds a lone surrogate (like "\\ud800"), not valid Unicode; '
                        "fix the text") from None
    return value


def _prompt_ids(tokenizer, example, where):
    instruction, input_ = _field(example, "instruction", where), _field(example, "input", where, required=False)
    prompt = instruction + "\n" + input_ if input_ else instruction
    return tokenizer.encode(prompt + PROMPT_EOS, bos=True, special=True)


def _encode_parts(tokenizer, example, where="record"):
    """(prompt ids, answer ids) of a record. A record with just "text" is a plain document (to
    pretrain a base model): BOS (else EOS) is its prompt and every later token is trained on; special-token
    strings in it ("</s>" between two pieces, as in a pretraining stream) become their ids."""
    if isinstance(example, dict) and "text" in example and not {"instruction", "output"} & example.keys():
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id  # Qwen: no BOS
        return [start], tokenizer.encode(_field(example, "text", where) + tokenizer.eos_text, special=True)
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
    decoder = json.JSONDecoder(object_pairs_hook=unique_keys)  # a key given twice: DuplicateKey, a ValueError
    with open(path, encoding="utf-8-sig") as f:
        buf, pos, line0 = "", 0, 1  # line0: line number of buf[0]

        def fill():  # drop what was read, append the next piece; False at the end of the file
            nonlocal buf, pos, line0
            try:
                piece = f.read(max(_READ, len(buf) - pos))
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8") from None
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
            raise UserError(f"{path} line {line}: {what}; a data file that starts with '[' must be a valid JSON "
                            "list of records (or use JSONL, one record per line)")

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
                except RecursionError:  # too deep in what was read already: more text cannot help
                    fail(pos, f"record {index} {TOO_DEEP}")
                except ValueError as e:  # a key given twice, or an integer of thousands of digits
                    if not ends_in_a_long_integer(buf) or not fill():  # cut by the buffer's end, maybe a float's
                        fail(pos, f"record {index} {value_problem(e)}")
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
    """'list' for a JSON list, 'jsonl' for one object per line; a UserError for anything else."""
    if os.path.isdir(path):
        raise UserError(f"input {path} is a folder, not a file; pass the data files in it (--input {path}/*.jsonl)")
    if what := special_file(path):  # /dev/stdin under a shell pipe, say: prepare reads its inputs from files
        raise UserError(f"input {path} is {what}, not a file; save the records to a file and pass that")
    if not os.path.isfile(path):  # "": --input= with nothing after the "="
        raise UserError(f"input file {path} not found; check the --input path" if path.strip() else
                        "an --input path is empty; give the records' file, e.g. --input data/train.jsonl")
    with open(path, "rb") as f:
        head = b""
        while not head and (piece := f.read(4096)):  # blank lines may fill more than one read
            head = piece.lstrip(b"\xef\xbb\xbf \t\r\n")
        head += f.read(4096) if head else b""
    if re.match(rb"\xff\xfe|\xfe\xff|[\[{]\x00|\x00[\[{]", head):  # a byte-order mark, or "[" / "{" as 2 bytes
        raise UserError(f"{path} is UTF-16 text, not UTF-8; save it as UTF-8")
    if head[:1] == b"[":
        return "list"
    if head[:1] == b"{" and head.splitlines()[0].strip() == b"{":  # never a whole JSONL record
        raise UserError(f"{path} holds one JSON object spread over lines, not a list of records; save the records "
                        "as a JSON list, or as JSONL (one record per line)")
    if head[:1] == b"{":
        return "jsonl"
    what = "is empty" if not head else f"starts with {head[:20]!r}"
    raise UserError(f"{path} {what}; a data file must be a JSON list of records or JSONL (one JSON object per line)")


def _records(path, kind):
    """(where, payload) for each record of a file; JSONL lines stay bytes, parsed by the workers."""
    if kind == "list":
        for i, record in _iter_json_list(path):
            yield f"{path} record {i}", record
        return
    with open(path, "rb") as f:  # lines as text mode reads them (read_jsonl): a lone \r ends one too (old Macs)
        for n, line in enumerate((piece for chunk in f for piece in chunk.splitlines(keepends=True)), 1):
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
NO_MAIN_GUARD = 86  # the exit code of a worker whose start re-ran a script that calls prepare (see prepare)


def _init_worker(tokenizer_path, worker_process=False):
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(tokenizer_path)
    if worker_process:  # it ends with its prepare (kill -9 too) instead of waiting for work forever
        import multiprocessing
        import signal
        import threading
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches it too: prepare's, not its traceback
        parent = multiprocessing.parent_process()
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()


def _encode_chunk(job):
    """Encode a chunk of records; returns arrays of the kept records, or ("error", message)."""
    file_index, items, max_len = job
    tokens, lens, prompt_lens, kept, truncated = [], [], [], [], 0
    for where, payload in items:
        try:
            if isinstance(payload, bytes):
                try:
                    payload = json.loads(payload, object_pairs_hook=unique_keys)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); each line of a "
                                    "JSONL file must be one whole JSON object") from None
                except RecursionError:
                    raise UserError(f"{where} {TOO_DEEP}; fix or remove that record") from None
                except UnicodeDecodeError:
                    raise
                except ValueError as e:  # a key given twice, or an integer of thousands of digits
                    raise UserError(f"{where} {value_problem(e)}; fix or remove that record") from None
            source, target = _encode_parts(_WORKER_TOKENIZER, payload, where)
        except UserError as e:
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
    """map(fn, jobs) over a process pool, in order, with a bounded number of chunks in flight. A worker that dies
    (killed, or by the system for want of memory) stops prepare; multiprocessing.Pool would wait for it forever."""
    if workers <= 1:
        _init_worker(tokenizer_path)
        yield from map(fn, jobs)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    pool = ProcessPoolExecutor(workers, mp.get_context("spawn"), _init_worker, (tokenizer_path, True))
    try:
        pending = deque()
        for job in jobs:
            with ctrl_c_held():  # a worker it starts never sees a Ctrl-C, which is prepare's to take (_init_worker)
                pending.append(pool.submit(fn, job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        started = pool._processes  # its workers by pid, ended ones too, which shutdown forgets but first reaps:
        pool.shutdown(wait=True, cancel_futures=True)  # each one's exit code is known, and tells why the pool broke
        unguarded = any(p.exitcode == NO_MAIN_GUARD for p in list(started.values()))
        raise UserError(f"{getattr(sys.modules['__main__'], '__file__', 'the script')} runs data.prepare again in "
                        "each worker process of prepare as the worker starts (Python's spawn imports the script anew); "
                        "put the script's work under `if __name__ == \"__main__\":`" if unguarded else "a worker "
                        "process of prepare ended before its records were encoded (killed, or by the system for want "
                        "of memory); run prepare again, with fewer --workers if memory is short") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def cores():
    """The CPU cores this process may run on: a SLURM job's or a container's share, not the whole machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    files = [dict(path=os.fsencode(p).decode("utf-8", "backslashreplace"), format=k, records=0, kept=0, tokens=0,
                  truncated=0, dropped_no_answer=0) for p, k in zip(inputs, kinds)]  # Latin-1's é: \xe9
    splits = {s: dict(records=0, tokens=0) for s in ("train", "val")}
    with ExitStack() as stack:
        out = {(s, part): stack.enter_context(open(os.path.join(tmp, f"{s}.{part}.bin"), "wb"))
               for s in splits for part in ("tokens", "offsets", "prompt_lens")}
        for s in splits:
            np.zeros(1, np.int64).tofile(out[s, "offsets"])
        bar = stack.enter_context(tqdm(desc="prepare", unit=" records", disable=quiet or not at_a_terminal()))
        index = 0  # of the record over all inputs
        for result in _map_ordered(_encode_chunk, _chunks(inputs, kinds, max_len), workers, tok.path):
            if isinstance(result, tuple):
                raise UserError(result[1])
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


FORMAT = "teamlora-shards-1"  # summary.json's "format": what tells prepare's summary.json from a user's
PREPARE_FILES = tuple(f"{split}.{part}.bin" for split in ("train", "val")
                      for part in ("tokens", "offsets", "prompt_lens")) + ("summary.json",)


def _is_summary(path):
    """Whether the file at path is a summary.json that prepare wrote."""
    try:
        return read_json(path, fix="").get("format") == FORMAT
    except UserError:
        return False


def _foreign_files(folder, pid=None):
    """The names in `folder` that prepare does not write: folders, links, other names, and a summary.json that
    is not prepare's (one that a user wrote is never replaced); pid: that of a killed prepare's OUT.tmp-PID, where
    the summary.json.tmpPID of a write the kill cut short (files.write_atomic) is prepare's too."""
    def own(name):
        path = os.path.join(folder, name)
        return ((name in PREPARE_FILES or pid and name == f"summary.json.tmp{pid}") and os.path.isfile(path)
                and not os.path.islink(path) and (name != "summary.json" or _is_summary(path)))
    return sorted(name for name in os.listdir(folder) if not own(name))


def _remove_stale_prepare_folders(out_dir, keep):
    """Remove OUT.tmp-PID (and an older version's OUT.tmp-PID.old) folders that a killed prepare left,
    when that process no longer runs and the folder holds nothing but prepare's own files."""
    parent, base = os.path.dirname(out_dir) or ".", os.path.basename(out_dir)
    pattern = re.compile(re.escape(base) + r"\.tmp-(\d+)(\.old)?")
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in sorted(names):
        match = pattern.fullmatch(name)
        folder = os.path.join(parent, name)
        if not match or process_is_running(int(match.group(1))) or os.path.islink(folder) or not os.path.isdir(folder) \
                or _foreign_files(folder, match.group(1)) or any(inside(p, folder) for p in keep):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.exists(folder):
            print(f"data.py prepare: removed a leftover temporary folder {folder} of a prepare (process "
                  f"{match.group(1)}) that no longer runs", file=sys.stderr)


def _check_args(inputs, out_dir, max_len, val_fraction, workers):
    """Refuse settings of prepare that could only fail or lose something, before anything is read."""
    if not inputs:
        raise UserError("no input files; pass at least one --input FILE")
    seen = {}
    for p in inputs:
        if os.path.realpath(p) in seen:  # its records would be in the shards twice
            raise UserError(f"the input {p} is given twice (as {seen[os.path.realpath(p)]} and {p}); pass each "
                            "--input file once")
        seen[os.path.realpath(p)] = p
    if not out_dir or os.path.dirname(os.path.normpath(out_dir)) == os.path.normpath(out_dir):
        raise UserError(f"--out {out_dir!r} is {'empty' if not out_dir else 'the root folder'}; give a folder of "
                        "its own for the shards, e.g. --out data/cme")
    # where --out is made, or OUT.tmp-PID beside an existing one (beside its target, for a link)
    blocker = blocked_parent(os.path.realpath(out_dir) if os.path.lexists(out_dir) else out_dir)
    if blocker:
        how = "written: prepare builds its output beside it, and" if os.path.isdir(out_dir) else "made:"
        raise UserError(f"--out {out_dir} can not be {how} {blocker}; choose another --out")
    if not (isinstance(max_len, int) and max_len >= 2):
        raise UserError(f"max_len must be an integer >= 2, got {max_len!r}")
    if not 0.0 <= val_fraction < 1.0:  # NaN too
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction!r}; give the share of records to hold "
                        "out for validation, e.g. 0.05, or 0 for none")
    if workers is not None and not (isinstance(workers, int) and workers >= 1):
        raise UserError(f"--workers must be a number of processes >= 1, got {workers!r}; leave it out to use "
                        "every core")


def _check_out_dir(out_dir, inputs, tokenizer_path):
    """Refuse an --out that prepare would not only write its own files into."""
    for what, path in [("input", p) for p in inputs] + [("tokenizer", tokenizer_path)]:
        if os.path.exists(path) and os.path.realpath(path) == os.path.realpath(out_dir):
            raise UserError(f"--out {out_dir} is the {what} {'folder' if os.path.isdir(path) else 'file'} {path}; "
                            "choose another --out, a folder for the shards")
        if os.path.exists(path) and inside(path, out_dir):
            raise UserError(f"the {what} {path} is inside --out {out_dir}, whose files prepare replaces; keep the "
                            "inputs and the tokenizer elsewhere or choose another --out")
    if (kind := not_a_folder(out_dir)) not in (None, "a link to nothing"):  # that one is made at its target
        raise UserError(f"--out {out_dir} is {kind}, not a folder; choose another --out")
    if not os.path.isdir(out_dir):
        return
    if os.path.ismount(os.path.realpath(out_dir)):  # OUT.tmp-PID, beside it, is on another filesystem: no rename
        raise UserError(f"--out {out_dir} is a mount point, and prepare builds its output beside it, on another "
                        f"filesystem; give a folder inside it, e.g. --out {os.path.join(out_dir, 'shards')}")
    foreign = _foreign_files(out_dir)
    if foreign and "summary.json" not in foreign and os.path.isfile(os.path.join(out_dir, "summary.json")):
        raise UserError(f"{out_dir} holds files that prepare did not write ({listed(foreign)}) beside a previous "
                        "prepare's output; move them out or choose another --out")
    if foreign:
        theirs = f'; its summary.json is not prepare\'s (no "format": "{FORMAT}")' if "summary.json" in foreign else ""
        raise UserError(f"{out_dir} exists and is not the output of a previous prepare (it holds "
                        f"{listed(foreign)}{theirs}); choose another --out")
    blocker = blocked_parent(os.path.join(out_dir, "summary.json"))  # found now, not once every record is encoded
    if blocker:
        raise UserError(f"--out {out_dir} can not be written: {blocker}; choose another --out")


def prepare(inputs, tokenizer_path, out_dir, max_len=1024, val_fraction=0.0, seed=0, workers=None, quiet=False):
    """Tokenise JSON / JSONL record files into token shards in out_dir; returns the summary dict.
    Records go to "val" with probability val_fraction (by a hash of seed and record index). Records
    whose answer is cut away entirely by max_len are dropped (they give no loss), counted, and
    warned about on stderr. The output is written to a temporary folder OUT.tmp-PID next to out_dir
    (next to its target, when out_dir is a link: a rename can not cross filesystems, so a mount point is
    refused), then moved in file by file (files.move_into), summary.json last, once the others are on disk, so a
    failure or a power cut leaves nothing that looks complete; only prepare's own files in out_dir are replaced,
    and an out_dir with other files is refused.
    Temporary folders of killed prepares are removed. workers: processes (default: data.cores());
    quiet: no progress bar (warnings still go to stderr)."""
    inputs = [str(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    tokenizer_path, out_dir = str(tokenizer_path), str(out_dir)
    _check_args(inputs, out_dir, max_len, val_fraction, workers)
    if (workers or cores()) > 1 and getattr(__import__("multiprocessing").current_process(), "_inheriting", False):
        os._exit(NO_MAIN_GUARD)  # a worker re-running a script with no main guard as it starts: _map_ordered says so
    out_dir = out_dir.rstrip("/\\")
    real = os.path.realpath(out_dir)  # a link's target (made or not): the output is built beside it, where a rename
    # into it can reach (beside the link, on another disk, every rename would fail at the end)
    _remove_stale_prepare_folders(real, inputs + [tokenizer_path])
    _check_out_dir(out_dir, inputs, tokenizer_path)
    kinds = [_file_kind(p) for p in inputs]  # a missing or odd file fails before any work
    tok = Tokenizer(tokenizer_path)
    workers = workers or cores()

    tmp = f"{real}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):  # left by this process id before: a reused id, or an earlier call interrupted
        if os.path.islink(tmp) or not os.path.isdir(tmp) or _foreign_files(tmp):
            raise UserError(f"{tmp} exists and is not a temporary folder of prepare; move it away")
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        files, splits, dtype = _write_shards(tmp, inputs, kinds, tok, max_len, val_fraction, seed, workers, quiet)
        records, dropped = sum(f["records"] for f in files), sum(f["dropped_no_answer"] for f in files)
        if splits["train"]["records"] + splits["val"]["records"] == 0:
            if records:
                raise UserError(f"no records left to train on: max_len {max_len} cut away the answer of all "
                                f"{records} records; raise --max_len")
            raise UserError(f"no records in {listed(inputs)}; check the inputs")
        if splits["train"]["records"] == 0:
            raise UserError(f"--val_fraction {val_fraction} put all {splits['val']['records']} records in val, "
                            "leaving none to train on; lower --val_fraction or add records")
        if dropped:
            print(f"warning: {dropped} of {records} records {'was' if dropped == 1 else 'were'} dropped because "
                  f"max_len {max_len} cut their answer away entirely; raise --max_len to keep them", file=sys.stderr)
        sha256 = file_sha256(tok.path)
        summary = dict(format=FORMAT, max_len=max_len, val_fraction=val_fraction, seed=seed, dtype=dtype,
                       vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                       tokenizer=dict(path=tok.path, kind=tok.kind, sha256=sha256), splits=splits, files=files,
                       **{k: sum(f[k] for f in files) for k in ("records", "truncated", "dropped_no_answer")})
        write_atomic(os.path.join(tmp, "summary.json"), json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
        move_into(tmp, real, PREPARE_FILES)  # summary.json last, once the shards are on disk
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


# -----------------------------------------------------------------------------
# JSONL, read and written by every script

def read_jsonl(path):
    """(where, object) for each non-empty line of a JSON-lines file; a broken line or one that is not an
    object is one sentence naming the file and the line."""
    if what := special_file(path):  # opening a named pipe waits for a writer forever; /dev/zero never ends
        raise UserError(f"{path} is {what}, not a file; give a JSONL file (one JSON object per line).")
    try:
        f = open(path, encoding="utf-8-sig")
    except OSError as e:  # a loop of links, a file not ours to read, one removed since it was listed
        raise UserError(f"{path} can not be read ({e.strerror or e}); give a JSONL file that you may read.") from None
    n = 0
    with f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line, object_pairs_hook=unique_keys)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {n} is not valid JSON ({e.msg}); fix or remove that line.") from None
                except RecursionError:
                    raise UserError(f"{path} line {n} {TOO_DEEP}; fix or remove that line.") from None
                except ValueError as e:  # a key given twice, or an integer of thousands of digits
                    raise UserError(f"{path} line {n} {value_problem(e)}; fix or remove that line.") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path} line {n} is not a JSON object; each line must hold one record.")
                yield f"{path} line {n}", obj
        except UnicodeDecodeError as e:
            where = f"after line {n}" if n else "in its first lines"  # text is decoded a block of lines at a time
            raise UserError(f"{path} is not UTF-8 text ({where}: {e.reason}); save it as UTF-8.") from None


def read_records(path):
    """(where, object) for each record of a JSON list or JSONL file, parsed; a broken one is one sentence."""
    if _file_kind(path) == "list":
        return ((f"{path} record {i}", record) for i, record in _iter_json_list(path))
    return read_jsonl(path)


def write_jsonl(path, records):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# -----------------------------------------------------------------------------
# Batches

def read_summary(path, split=None):
    """summary.json of a prepare output, checked for what TokenDataset needs (split: one it holds, "train" with
    records); else a UserError."""
    summary_path = os.path.join(path, "summary.json")
    if not os.path.isdir(path):  # a file here is no output of prepare, which would refuse it as its --out
        what = "is a file, not a folder of token shards" if os.path.exists(path) else "does not exist"
        raise UserError(f"{path} {what}; point at the --out folder of python data.py prepare")
    if not os.path.exists(summary_path):  # a folder or a named pipe of that name is read_json's to name
        raise UserError(f"{path} has no summary.json; make it with: python data.py prepare --out {path} ...")
    # delete it: prepare keeps a summary.json that is not its own (a user's file, for all it can tell)
    again = f"delete it and run prepare again (python data.py prepare --out {path} ...)"
    summary = read_json(summary_path, again)
    for key, ok, want in (("splits", lambda v: isinstance(v, dict), "an object"),
                          ("dtype", lambda v: v in ("uint16", "uint32"), '"uint16" or "uint32"'),
                          ("max_len", lambda v: type(v) is int and v >= 2, "an integer >= 2"),
                          ("pad_id", lambda v: type(v) is int and v >= 0, "a token id")):
        if key not in summary:
            raise UserError(f'{summary_path} has no "{key}"; {again}')
        if not ok(summary[key]):
            raise UserError(f'{summary_path} has "{key}": {summary[key]!r} where {want} belongs; {again}')
    for name, counts in summary["splits"].items():
        for key in ("records", "tokens"):
            if not isinstance(counts, dict) or type(counts.get(key)) is not int or counts[key] < 0:
                raise UserError(f'{summary_path} gives no record and token counts for the split "{name}"; {again}')
    if split is not None and split not in summary["splits"]:
        raise UserError(f"{path} has no split {split!r}; the splits are {list(summary['splits'])}")
    if split == "train" and not summary["splits"]["train"]["records"]:  # before step 1, and in train.py's dry run
        raise UserError(f"{path} has no training records; prepare it with a smaller --val_fraction or more records.")
    return summary


def check_made_with(path, summary, tok, tokens=()):
    """Refuse a tokenizer other than the one the shards in path (summary: their summary.json) were made with, before
    any id reaches the model: by its SHA-256, or where summary.json lacks it (older outputs) by its vocabulary size, or
    by the shards' largest id (tokens: none where the dry run reads no shard); and one whose BOS or EOS differs."""
    made = summary.get("tokenizer") if isinstance(summary.get("tokenizer"), dict) else {}
    size, theirs = summary.get("vocab_size"), str(made.get("path", "path unknown"))
    theirs += f", {size:,} tokens" if type(size) is int else ""
    if made.get("sha256"):
        same = made["sha256"] == file_sha256(tok.path)
    elif type(size) is int:
        same = size == tok.vocab_size
    else:
        top = int(tokens.max()) if len(tokens) else -1
        same, theirs = top < tok.vocab_size, f"{theirs}; the shards hold the id {top:,}"
    if not same:
        raise UserError(f"tokenizer {tok.path} ({tok.vocab_size:,} tokens) is not the one {path} was made with "
                        f"({theirs}); pass that one, or run data.py prepare again with this one.")
    for key in ("bos_id", "eos_id"):  # the same tokenizer.json, beside a tokenizer_config.json that changed them
        if made.get("sha256") and key in summary and summary[key] != getattr(tok, key):
            raise UserError(f"{path} was made with the {key[:3].upper()} id {summary[key]}, but tokenizer {tok.path} "
                            f"gives {getattr(tok, key)} (its tokenizer_config.json changed?); pass the files it was "
                            "made with, or run data.py prepare again with these.")


class TokenDataset:
    """The records of one split of a prepare output: ds[i] -> (ids, prompt_len), ids a uint array view.
    Opening checks every shard against summary.json, so a truncated or foreign file stops with its name
    instead of training on part of the data."""

    def __init__(self, path, split="train"):
        self.path = path = os.fspath(path)
        self.summary = read_summary(path, split)
        self.max_len, self.pad_id = self.summary["max_len"], self.summary["pad_id"]
        self.split_name = {"train": "training", "val": "validation"}.get(split, split)
        records, tokens = self.summary["splits"][split]["records"], self.summary["splits"][split]["tokens"]
        dtype = np.dtype(self.summary["dtype"])
        again = f"run prepare again (python data.py prepare --out {path} ...)"
        name = lambda part: os.path.join(path, f"{split}.{part}.bin")

        def check_size(part, count, item):
            file = name(part)
            if not os.path.isfile(file):
                raise UserError(f"{file} is missing; {again}")
            size = os.path.getsize(file)
            if size != count * item.itemsize:
                raise UserError(f"{file} holds {size:,} bytes where summary.json's {records:,} {split} records "
                                f"need {count * item.itemsize:,} ({count:,} {item.name} values); the file is "
                                f"truncated or from another run; {again}")
            return file

        self.offsets = np.fromfile(check_size("offsets", records + 1, np.dtype(np.int64)), np.int64)  # in memory
        self.prompt_lens = np.fromfile(check_size("prompt_lens", records, np.dtype(np.int32)), np.int32)
        self.lengths = np.diff(self.offsets)
        if self.offsets[0] != 0 or (self.lengths < 1).any() or self.offsets[-1] != tokens:
            raise UserError(f"{name('offsets')} does not hold offsets from 0 rising to the {tokens:,} tokens that "
                            f"summary.json gives (found {self.offsets[0]} to {self.offsets[-1]}); {again}")
        if ((self.prompt_lens < 1) | (self.prompt_lens >= self.lengths)).any():
            raise UserError(f"{name('prompt_lens')} holds prompt lengths that leave a record no answer token; {again}")
        check_size("tokens", tokens, dtype)
        self.tokens = np.memmap(name("tokens"), dtype, mode="r") if tokens else np.zeros(0, dtype)

    def answered(self, max_len):
        """Which records keep an answer token when cut to max_len."""
        return np.minimum(self.lengths, max_len) > np.maximum(self.prompt_lens, 1)

    def cut_warning(self, max_len):
        """What a run's max_len loses of these records (None: nothing): whole answers it cuts away, or records cut
        when prepared at a shorter max_len than the run's, which it cannot make whole again."""
        if (cut := int((~self.answered(max_len)).sum())):  # prepare drops them at its own max_len, not at a run's
            return (f"warning: max_len={max_len} cuts away the whole answer of {cut:,} of {len(self):,} "
                    f"{self.split_name} records, which then teach nothing; raise --max_len to keep them.")
        shorter = self.summary.get("truncated")
        if max_len > self.max_len and type(shorter) is int and shorter > 0:
            return (f"warning: prepare cut {shorter:,} of the records in {self.path} at max_len={self.max_len}, "
                    f"and max_len={max_len} cannot make them whole; to keep them, prepare it again with "
                    f"--max_len {max_len}.")
        return None

    def check_tokenizer(self, tok):  # check_made_with; the largest id in the shards decides where summary.json can not
        check_made_with(self.path, self.summary, tok, self.tokens)

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
    lengths) within each epoch's part of it (a window longer than an epoch would put an example's
    copies side by side, several in one batch), then its batches shuffled (so the loss does not see
    short-to-long sweeps)."""
    size = batch_size * GROUP_BATCHES
    ex = _stream(len(dataset), seed, window * size, (window + 1) * size)
    epoch = np.arange(window * size, (window + 1) * size) // len(dataset)
    ex = ex[np.lexsort((dataset.lengths[ex], epoch))].reshape(GROUP_BATCHES, batch_size)
    return ex[np.random.default_rng([seed, window, 1]).permutation(GROUP_BATCHES)]


def global_batch(dataset, step, batch_size, seed, mode="pad"):
    """Indices of the examples of global batch `step`: a function of (seed, step) only."""
    if len(dataset) == 0:
        raise UserError("the dataset split has no records; run prepare with more data or another split")
    if mode == "pad":
        return _sorted_window(dataset, seed, step // GROUP_BATCHES, batch_size)[step % GROUP_BATCHES]
    return _stream(len(dataset), seed, step * batch_size, (step + 1) * batch_size)


def _answer_tokens(dataset, examples, max_len):
    """Label positions that are not -100: predictions of answer tokens within the first max_len."""
    lengths = np.minimum(dataset.lengths[examples], max_len or np.iinfo(np.int64).max)
    return int(np.maximum(lengths - np.maximum(dataset.prompt_lens[examples], 1), 0).sum())


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
        raise UserError(f"mode must be 'pad' or 'pack', got {mode!r}")
    if batch_size % world_size:
        raise UserError(f"batch_size {batch_size} is not divisible by world_size {world_size}; "
                        "the global batch is split evenly over ranks, so choose a multiple")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside 0..{world_size - 1}")
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
# Command line

def main(argv=None):
    parser = Parser(prog="data.py", description="Tokenise JSON / JSONL records into token shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenise JSON / JSONL records into token shards")
    p.add_argument("--input", nargs="+", required=True, type=flag_path, metavar="FILE",
                   help="JSON lists or JSONL of records")
    p.add_argument("--tokenizer", required=True, type=flag_path,
                   help="tokenizer.model (SentencePiece or tiktoken), or a folder with a Hugging Face tokenizer.json")
    p.add_argument("--out", required=True, type=flag_path, help="output directory")
    p.add_argument("--max_len", type=int, default=1024)
    p.add_argument("--val_fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: every core it may use)")
    args = parser.parse_args(argv)
    args.workers = args.workers and min(args.workers, cores())  # more processes than cores only wait
    try:
        s = prepare(args.input, args.tokenizer, args.out, args.max_len, args.val_fraction, args.seed, args.workers)
    except UserError as e:
        exit_with(e, f"data.py {args.command}: ")
    except OSError as e:  # a full disk, say: prepare has removed its temporary folder (OUT.tmp-PID)
        exit_with(f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}; prepare removed what it had written: "
                  "free space there (or make it writable) and run it again", f"data.py {args.command}: ")
    print(f"{s['records']} records -> {args.out}: train {s['splits']['train']['records']} records "
          f"({s['splits']['train']['tokens']} tokens), val {s['splits']['val']['records']}; "
          f"{s['truncated']} truncated, {s['dropped_no_answer']} dropped (answer cut away); dtype {s['dtype']}")


if __name__ == "__main__":
    run_script(main)
