"""
Answer instructions with a run of train.py (nanoGPT's sample.py, for adapters):

    python sample.py --instruction="Which filmmaker made The Silver Harbor?"  # the demo's run, out/demo
    python sample.py --out_dir=out/lora --instruction="..." --input="..."
    python sample.py --records=data/mini_cme/test/qa.jsonl --limit=3        # records in the authors' format

The run's configuration (base, tokenizer, adapter, dtype, tf32) and its adapter come from its ckpt.pt, the
last checkpoint. A prompt is encoded as in training (BOS, the instruction, "\\n" + input when there is
one, "</s>") and answered greedily, or sampled with --temperature and --top_p. For a multi-expert
adapter each answer says which experts the prompt recruited: the mean share of each over the prompt's
tokens in the last load_layers blocks, as in the results table of train.py.
"""
if __name__ == "__main__":  # before the imports: see errors.start_script (closed streams, Ctrl-C while importing)
    import errors
    errors.start_script()

import argparse
import contextlib
import math
import os
import re
import sys

import torch

import checkpoint
import data
import evaluation
import files
import machine
import train
from errors import Parser, UserError, docstring, exit_with, printable, run_script
from tokenizer import Tokenizer

LOADING = dict(eval_only=True, fsdp=False, compile=False, activation_checkpointing=False)  # read, one process, eager


def load_run(out_dir, device="auto", max_new_tokens=0):
    """(model in eval mode, train.Run) of the run in out_dir as its ckpt.pt left it; max_new_tokens that leave a
    prompt no room are refused before the model is built (minutes for a 7B base), from the shape ckpt.pt holds."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        kind = data.special_file(path)  # a folder named ckpt.pt was called missing
        what = (f"{out_dir} is a file, not a folder" if os.path.isfile(out_dir) else
                f"{path} is {kind}, not a checkpoint" if kind else f"{path} does not exist")
        raise UserError(f"{what}; point --out_dir at the folder of a run of train.py.")
    ckpt = checkpoint.load_checkpoint(path, "sample.py")
    try:  # checked again, as a resume checks it
        saved, ckpt = train.saved_config(path, ckpt=ckpt)
    except UserError as e:  # worded for train.py's flags and config files, which sample.py does not take
        problem = without_fix(str(e).replace(f" in {path}", ""), ckpt["config"].values())
        raise UserError(f"{path} holds a run config that train.py refuses ({problem}); if it was edited, put back "
                        "the run's own value, else train the run again.") from None
    try:  # the shape the model will have; a damaged one is left out: the model is built from the run's base
        context = train.ModelArgs(**ckpt["model_args"]).context
    except (TypeError, ValueError):
        context = None
    if max_new_tokens and context is not None:
        prompt_room(max_new_tokens, context)
    cfg = {**saved, "device": device, **LOADING}
    files.check_run_paths(cfg, ("tokenizer", "init_from"), "sample.py", files.folder_ran_in(out_dir, saved["out_dir"]))
    r = train.Run(cfg, device=torch.device(machine.resolve_device(cfg)), tok=Tokenizer(cfg["tokenizer"]))
    checkpoint.check_tokenizer(ckpt, r.tok, path)  # as checkpoint.restore does (a resume, a re-scoring)
    model, r.args, base = train.build_model(cfg, r.device, r.tok.vocab_size, world=1)
    checkpoint.check_base(ckpt, base, cfg, path)
    checkpoint.load_state(model, ckpt["state"], cfg, path)
    if ckpt["iter"] < cfg["max_iters"]:  # stopped by Ctrl-C, or still training: its answers are not the run's last
        print(f"note: the run in {out_dir} is at step {ckpt['iter']} of its {cfg['max_iters']} (it stopped, or is "
              "still training); these are that step's answers.", file=sys.stderr)
    return model.eval(), r


def without_fix(sentence, values):
    """The problem that train.py's refusal `sentence` names, without the fix after its first "; ": that "; " is looked
    for outside the config `values` that it quotes, whose own "; " cut a value short."""
    masked = sentence
    for text in {t for v in values for t in (repr(v), str(v)) if "; " in t and t.strip("; ")}:
        masked = masked.replace(text, "\0" * len(text))  # as long as it was: a cut in it is one in the sentence
    return sentence[:masked.find("; ") if "; " in masked else len(sentence)].rstrip(".")


def prompt_room(max_new_tokens, context):
    """The positions a prompt gets beside max_new_tokens in a model that runs `context`: 2 at least, BOS and "</s>"."""
    if context - max_new_tokens < 2:
        raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in this model's {context} "
                        "positions; lower --max_new_tokens.")
    return context - max_new_tokens


def answer(model, r, record, max_new_tokens, temperature=0.0, top_p=1.0, seed=0):
    """(answer text, expert load (k,) or None, whether the prompt was cut) for one record."""
    room = prompt_room(max_new_tokens, r.args.context)  # a sliding-window model runs no longer sequences (as scoring)
    full = data.encode_prompt(r.tok, record)
    ids = evaluation.prompt_ids(r.tok, record, room)
    # model.sample compares top_p with float32 sums, where one below float32's range (1e-300) is 0 and drops every
    # token (a traceback); float32's least normal value keeps the likeliest token alone, as any top_p that small does
    top_p = max(top_p, torch.finfo(torch.float32).tiny)
    # on CUDA, float32 matmuls as the run's own scoring ran them (train.py: TF32 unless tf32=False), not torch's IEEE
    with machine.cuda_matmul_precision(r.cfg["tf32"]) if r.device.type == "cuda" else contextlib.nullcontext():
        where = model.tok_embeddings.weight.device  # the model's, as generate takes it
        evaluation.run_checked(model, torch.tensor([ids], device=where), r)  # NaN outputs: said, not answered
        new = model.generate([ids], max_new_tokens, eos_id=r.tok.eos_id, temperature=temperature, top_p=top_p,
                             seed=seed)[0]
        load = evaluation.task_expert_load(model, [ids], r) if r.multi_expert else None
    return r.tok.decode(new), load, len(ids) < len(full)


def shown(text):
    """A record's or an answer's text as printed: its lines and tabs as they are, other control characters escaped."""
    return printable(text, keep="\n\t")


def records_of(args):
    """The records to answer: --instruction (with --input), then the first --limit of --records."""
    records = [{"instruction": args.instruction, "input": args.input}] if args.instruction is not None else []
    if not args.records:
        return records
    if not os.path.isfile(args.records):
        what = f"is {kind}, not a file" if (kind := data.special_file(args.records)) else "does not exist"  # <(...)
        raise UserError(f"--records file {args.records} {what}; give a JSONL or JSON list of records.")
    read = []
    for n, (where, record) in enumerate(data.read_records(args.records)):
        if args.limit and n == args.limit:
            break
        for key in ("instruction", "input", "output"):  # now, naming the line, not once records before it are answered
            data._field(record, key, where, required=key == "instruction", fix="give records in the authors' format, "
                        '"instruction", "input" and "output" strings ("input" and "output" may be absent).')
        read.append(record)
    if not read:  # a JSON list of none ([]): nothing answered, nothing said
        raise UserError(f"--records file {args.records} holds no records; give a JSONL or JSON list of records.")
    return records + read


def check_args(parser, args):
    """The flags' own errors, before any file is read (parser.error: one sentence, exit 2)."""
    if args.records is not None and not args.records.strip():  # --records= would answer --instruction alone
        parser.error("--records is empty; give a JSONL or JSON list of records, or leave --records out")
    for flag in ("instruction", "input"):  # bytes of argv that are not UTF-8 arrive as lone surrogates
        try:
            (getattr(args, flag) or "").encode("utf-8")
        except UnicodeEncodeError:
            if problem := files.locale_problem():  # argv's bytes may well be UTF-8, which the locale does not decode
                parser.error(f"--{flag} holds {problem[0]}; {problem[1]}")
            parser.error(f"--{flag} holds bytes that are not UTF-8 text; give it in UTF-8, the terminal's encoding")
    if args.instruction is None and not args.records:
        parser.error("give --instruction (and --input) or --records")
    if args.input and args.instruction is None:  # records_of would drop it: each record has its own input
        parser.error("--input goes with --instruction; a --records file gives each record's own \"input\"")
    if args.limit is not None and not args.records:  # records_of counts only --records' records: it would be ignored
        parser.error("--limit counts the records of --records; give --records with it, or leave --limit out")
    if not args.out_dir.strip():  # os.path.join("", "ckpt.pt") would read the ckpt.pt of the current folder
        parser.error(f"--out_dir is empty; give the folder of a run of train.py, such as "
                     f"--out_dir={train.DEFAULTS['out_dir']}")
    if args.max_new_tokens <= 0:
        parser.error(f"--max_new_tokens={args.max_new_tokens} is not positive; give the number of tokens to generate "
                     "for each answer, e.g. 64")
    if (args.limit or 0) < 0:
        parser.error(f"--limit={args.limit} is negative; give the number of records to answer, or 0 to answer them all")
    if not 0 <= args.temperature < math.inf:  # NaN fails it too, as in Transformer.generate
        parser.error(f"--temperature={args.temperature} is not a finite number >= 0; give 0 for greedy decoding, or a "
                     "positive number such as 0.7 to sample")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top_p={args.top_p} is outside (0, 1]; give the share of probability to sample from, such as "
                     "0.9, or 1 for every token")
    if args.seed is not None and not 0 <= args.seed < 2**63:  # torch.manual_seed's range
        parser.error(f"--seed={args.seed} is outside [0, 2**63), the seeds torch takes; give one from 0 to 2**63 - 1")
    if not re.fullmatch(machine.DEVICES, args.device):
        parser.error(f"--device={printable(args.device)} is not a device; give auto, cpu, cuda or cuda:N (N: the "
                     "GPU's number)")
    if args.temperature == 0 and (args.top_p != 1 or args.seed is not None):  # greedy decoding would ignore it
        flag = "--top_p" if args.top_p != 1 else "--seed"
        parser.error(f"{flag} applies to sampling only: give --temperature > 0 with it (temperature 0 is greedy)")


def main(argv=None):
    parser = Parser(prog="sample.py", description=docstring(__file__),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=data.flag_path, default=train.DEFAULTS["out_dir"],
                        help="the folder of a run of train.py")
    parser.add_argument("--instruction", help="the instruction to answer")
    parser.add_argument("--input", default="", help="the record's input, appended to the instruction after a newline")
    parser.add_argument("--records", type=data.flag_path,
                        help="a JSONL (or JSON list) file of {instruction, input, output} records")
    parser.add_argument("--limit", type=int, help="answer the first this many of --records (default 10; 0: all)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding")
    parser.add_argument("--top_p", type=float, default=1.0, help="sampling only (temperature > 0)")
    parser.add_argument("--seed", type=int, help="the sampling seed (temperature > 0; default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    check_args(parser, args)
    args.seed = 0 if args.seed is None else args.seed  # sampling's seed when none is given
    args.limit = 10 if args.limit is None else args.limit  # None: not given, which --records alone may be
    threads = torch.get_num_threads()  # the caller's (a notebook's, a test's): given back when main returns
    try:
        files.check_openable_by_torch({"out_dir": args.out_dir}, ("out_dir",))  # a name torch.load can open
        records = records_of(args)
        model, r = load_run(args.out_dir, args.device, args.max_new_tokens)
        if r.device.type == "cpu":
            torch.set_num_threads(machine.cpu_threads({"threads": 0}))
        for record in records:
            text, load, cut = answer(model, r, record, args.max_new_tokens, args.temperature, args.top_p, args.seed)
            print(f"### Instruction: {shown(record['instruction'])}")
            if record.get("input"):
                print(f"### Input: {shown(record['input'])}")
            if cut:
                print(f"(the prompt was cut to its start and end: the model has {r.args.context} positions)")
            print(shown(text))
            if record.get("output") is not None:
                print(f"(expected: {shown(record['output'])})")
            if load is not None:
                shares = "  ".join(f"e{i} {v:.2f}" for i, v in enumerate(load.tolist()))
                print(f"(experts, last {r.cfg['load_layers']} layers; even = {1 / len(load):.2f}: {shares})")
    except (UserError, ValueError, FileNotFoundError) as e:  # weights.py's missing weight file, as train.py takes it
        exit_with(str(e), "sample.py: ")  # a str: exit_with's words for an OSError are about writing
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    run_script(main)
