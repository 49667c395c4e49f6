"""
Scoring a run of train.py: its validation loss, then each task's score by batched greedy generation
on the evaluation sets in eval_dir (tasks.py and minicme.py write them), and the share of the experts
each task's prompts recruit (the paper's Figure 5). The functions that run the model take train.py's
Run (`r`): the config, this process's rank among `world`, the device, tokenizer, model shape and
evaluation sets. Under torchrun each rank runs its own share, in as many batches as every other rank (under FSDP
each to the full length too: its all-gathers need every rank's forward); the sums are all-reduced, the answers gathered.
score does it all for train.py: the scores into its summary, the table printed, results.json written (results_path).
"""
import contextlib
import json
import os
import re

import torch
import torch.distributed as dist

import checkpoint
import data
import files
import machine
import minicme
import tasks
import teamlora
from errors import UserError


def all_reduce_sum(t, world):
    """t summed over the processes, in place (nothing to do on one)."""
    if world > 1:
        dist.all_reduce(t)
    return t


def loss_only(cfg):
    """Whether training and validation run the output layer on answer positions only (the same loss and gradients,
    less memory): with adapters, unless the output layer is adapted, as its omega must cover every real token. Full
    training keeps every position (train.train_step says why)."""
    return cfg["adapter"] != "none" and "output" not in [t.strip() for t in cfg["targets"].split(",")]


@torch.no_grad()
def val_loss(model, val, r, stop=None):
    """Mean cross-entropy over the answer tokens of eval_iters validation batches, each cut into the training's
    micro-batches (processes x grad_accum slices), so validating needs no more memory than a training step. A stop
    (machine.StopAfterStep: Ctrl-C or SIGTERM on any process) ends it before its next batch, returning None: at 7B it
    takes tens of seconds, and the step's checkpoint, after it, must come within the 30 to 60 s that a cluster often
    leaves between its SIGTERM and its SIGKILL."""
    cfg, accum = r.cfg, r.cfg["grad_accum"]
    model.eval()
    totals = torch.zeros(2, device=r.device)  # (sum of token losses, answer tokens)
    for i in range(cfg["eval_iters"]):
        if stop is not None and stop.agreed(r.device, r.world):  # once a batch: under torchrun, an all-reduce
            model.train()
            return None
        for micro in range(accum):
            # seed 0, not the run's: the same validation records for every seed, so val losses compare
            b = data.get_batch(val, i, cfg["batch_size"], 0, r.rank * accum + micro, r.world * accum,
                               cfg["batch_mode"], cfg["max_len"], device=r.device)
            _, ce = model(b["tokens"], b["labels"], seq_ids=b.get("seq_ids"), reduction="sum",
                          loss_only=loss_only(cfg))  # as train_step
            totals += torch.stack([ce.float(), (b["labels"] != -100).sum().float()])
    model.train()
    ce_sum, n = all_reduce_sum(totals, r.world).tolist()
    return ce_sum / max(n, 1)


ALL_TASKS = {**minicme.SYNTHETIC_TASKS, **tasks.CME_TASKS}


def task_of(name):
    if name not in ALL_TASKS:
        raise UserError(f"no task named '{name}' (from the file name {name}.jsonl); tasks are: {', '.join(ALL_TASKS)}.")
    return ALL_TASKS[name]


_EVAL_FIX = ('an evaluation record needs "instruction" and "output" strings ("input" may be empty) and, for QA, '
             '"answers" as a list of strings; write evaluation sets with python tasks.py.')


def check_eval_record(record, where, task=None):
    """The record, if it holds every field that its prompt and its task's scorer read, and a reference that the
    task's metric can score against; else a UserError naming `where` (file and line), so that it stops the run before
    training, not after it."""
    if record.get("output") is None:
        raise UserError(f'{where} is not an evaluation record: it has no "output" (the reference); {_EVAL_FIX}')
    for key in ("instruction", "input", "output"):
        data._field(record, key, where, required=key != "input", fix=_EVAL_FIX)
    answers = record.get("answers") or []  # the aliases exact match accepts; none: the output alone
    if not isinstance(answers, list):
        raise UserError(f'{where}: "answers" is {data.json_kind(answers)}, not a list of strings; {_EVAL_FIX}')
    for answer in answers:
        if not isinstance(answer, str):
            raise UserError(f'{where}: "answers" holds {data.json_kind(answer)} where only strings belong; '
                            f"{_EVAL_FIX}")
    if task is not None and (why := task.blank_reference(record)):  # a blank reference scored 100 or 0 unsaid
        raise UserError(f"{where} can not be scored as {task.name}: {why}; give it a reference that {task.metric} "
                        "reads, or remove the record.")
    if task is not None and (why := task.stray_label(record)):  # a typo scored, and counted in the chance level
        raise UserError(f'{where} can not be scored as {task.name}: {why}; write the label meant, one of those, '
                        'as its "output", or remove the record.')
    return record


def load_eval_sets(cfg, key="eval_dir"):
    """task name -> (Task, records) for each <task>.jsonl in cfg[key] (study.py: val_dir too), every record checked
    (check_eval_record)."""
    folder = cfg[key]
    if not os.path.isdir(folder):
        what = "is a file, not a folder of <task>.jsonl files" if os.path.exists(folder) else "does not exist"
        raise UserError(f"{key} '{folder}' {what}; write one with python tasks.py, or set --{key}.")
    files = sorted(f for f in os.listdir(folder) if not f.startswith("."))  # hidden: macOS's ._qa.jsonl, an editor's
    lists = [f for f in files if f.endswith(".json")]  # tasks.py writes a JSON list for --out NAME.json
    if lists:
        raise UserError(f"{key} '{folder}' holds {lists[0]}: evaluation sets are JSONL, one record per line; "
                        f"write them with python tasks.py --out {os.path.join(folder, '<task>.jsonl')}.")
    names = [f[:-6] for f in files if f.endswith(".jsonl")]
    if not names:
        raise UserError(f"{key} '{folder}' holds no <task>.jsonl files.")
    sets = {}
    for name in names:
        task, path = task_of(name), os.path.join(folder, name + ".jsonl")
        records = [check_eval_record(record, where, task) for where, record in data.read_jsonl(path)]
        if not records:
            raise UserError(f"{path} holds no records; write it again with python tasks.py, or remove it.")
        sets[name] = (task, records[:cfg["eval_limit"]] if cfg["eval_limit"] else records)
    return sets


def eager():
    """Blocks compiled by --compile=True run eagerly inside (torch >= 2.6): decoding would recompile them at
    every step (the KV cache's length is a static int to Dynamo) until Dynamo's recompile limit."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance else contextlib.nullcontext()


def prompt_ids(tok, record, room):
    """The prompt's ids, cut to `room` tokens. room >= 2 (train.py's setup and sample.py check it), so a cut
    prompt keeps its first token (BOS; a tokenizer without one, as Qwen's, the instruction's first) and its closing
    "</s>", after which the model was trained to answer."""
    ids = data.encode_prompt(tok, record)
    return ids if len(ids) <= room else ids[:1] + ids[len(ids) - room + 1:]  # keep the start and the end


def generate_all(model, prompts, max_new, r):
    """Greedy answers for every prompt, sharded over ranks. Every rank runs the same count of equal-size batches; under
    FSDP on several ranks each to the full length too (its blocks' all-gathers pair up), else a batch stops early."""
    tok, batch, fsdp = r.tok, r.cfg["eval_batch_size"], checkpoint.sharded(r.cfg)
    mine = list(range(r.rank, len(prompts), r.world)) or [0]  # fewer prompts than ranks: the first, again
    per_rank = -(-len(prompts) // r.world)
    mine += mine[:1] * (per_rank - len(mine))  # pad with a repeat so every rank has per_rank prompts
    mine.sort(key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    out, stop = {}, None if fsdp and r.world > 1 else tok.eos_id  # ranks under FSDP: every forward on every rank
    raw = model.module if hasattr(model, "module") else model
    if fsdp:  # FSDP2 takes the module of the first forward for its root: an eval_only run's first must be the root's
        with torch.no_grad(), eager():  # (not a block's inside generate), or the expert load's forward after it fails
            raw(torch.zeros(1, 1, dtype=torch.long, device=r.device), logits_to_keep=1)
        raw.unshard()  # generate calls the root's own modules directly, outside its forward hook
    try:
        for s in range(0, per_rank, batch):
            idx = mine[s:s + batch]
            with eager():
                gen = raw.generate([prompts[i] for i in idx], max_new, eos_id=stop)
            for i, g in zip(idx, gen):
                out[i] = tok.decode(g[:g.index(tok.eos_id)] if tok.eos_id in g else g)
    finally:
        if fsdp:
            raw.reshard()
    if r.world > 1:
        parts = [None] * r.world
        dist.all_gather_object(parts, out)
        out = {i: t for p in parts for i, t in p.items()}
    return [out[i] for i in range(len(prompts))]


@torch.no_grad()
def run_checked(model, tokens, r):
    """model(tokens) for its side effects (the adapters' omega), stopped where its outputs are NaN or infinite. The
    weights were checked finite when read (checkpoint.load_state), but values large enough to overflow pass that
    check, and then every greedy answer is token 0 (" ⁇ "), sampling fails in torch.multinomial, and every score is
    0 beside an expert load of NaN: said instead, before anything is answered or scored."""
    with eager():  # compiled blocks: no compile for each width of prompts (the answers' decoding runs eagerly too)
        logits, _ = model(tokens, logits_to_keep=1)  # no (prompts, width, vocab) logits: the last position's suffice
    if not torch.isfinite(logits).all():
        raise UserError(f"the run in {r.cfg['out_dir']} gives NaN or infinite outputs, though its weights are finite: "
                        "some are so large that they overflow, so its checkpoint or its base is damaged; restore "
                        "them from a copy, or train again.")


@torch.no_grad()
def task_expert_load(model, prompts, r):
    """Mean expert share over the prompt tokens of every prompt of a task, averaged over the adapted layers of the
    last `load_layers` blocks: which experts each task recruits (the paper's Figure 5). The prompts run eval_batch_size
    at a time, each layer's shares pooled over all their tokens: the batch size bounds memory, not what is counted."""
    raw = model.module if hasattr(model, "module") else model
    n_layers = r.args.n_layers  # the blocks' layers only: an adapted output layer ran on one position, not `valid`
    blocks = [raw.layers[i] for i in range(n_layers - r.cfg["load_layers"], n_layers)]
    was_training = model.training
    model.eval()
    shares, count, batch = 0, 0, r.cfg["eval_batch_size"]
    for s in range(0, len(prompts), batch):
        part = prompts[s:s + batch]
        width = max(len(p) for p in part)
        tokens = torch.zeros(len(part), width, dtype=torch.long, device=r.device)
        valid = torch.zeros(len(part), width, dtype=torch.bool, device=r.device)
        for i, p in enumerate(part):
            tokens[i, :len(p)] = torch.tensor(p)
            valid[i, :len(p)] = True
        run_checked(model, tokens, r)  # run for the adapters' omega
        loads = [v for block in blocks for v in teamlora.expert_load(block, valid).values()]
        if not loads:  # no adapted layer in those blocks (--targets=output): none in any batch
            break
        n = int(valid.sum())  # each layer's mean over this batch's tokens, weighted by their count
        shares, count = shares + torch.stack(loads) * n, count + n
    model.train(was_training)
    return (shares / count).mean(0).cpu() if count else None


class ScoringOutOfMemory(MemoryError):
    """Out of memory while scoring a run whose adapters are saved: train.main prints its own fix."""


def kept(cfg):
    """(what of the run is saved where, the command that scores it): said where its scoring does not end (stopped, out
    of memory, or results.json not written)."""
    what = "weights" if cfg["adapter"] == "none" else "adapters"
    again = "the same command" if cfg["eval_only"] else "the same command plus --eval_only=True"
    return f"the trained {what} are saved in {cfg['out_dir']}", again


def score(model, r, val_ds, summary, stop=None):
    """Score a trained run on its evaluation sets: its validation loss where summary has none (a re-scoring, or a
    resume with no step left to train), each task's score and expert load put in summary, the table printed and
    results.json written (results_path). True once done; False where Ctrl-C or SIGTERM stopped it before that file
    was written (every CME test record on a 7B takes hours), said with the command that scores what the run saved
    (kept). stop: the training loop's machine.StopAfterStep, its signals given back here, inside the try, not before:
    a stop asked since the loop's last step, or at any moment after it, is this one's, never a KeyboardInterrupt that
    names no command."""
    saved, again = kept(r.cfg)
    try:
        if stop is not None:
            stop.restore()
            if stop.agreed(r.device, r.world):  # asked after the loop's last look, on any process
                raise KeyboardInterrupt
        if val_ds is not None and "val_loss" not in summary:
            summary["val_loss"] = val_loss(model, val_ds, r)
        scores, loads = evaluate(model, r)
        chance = {name: tasks.chance_level(task, records) for name, (task, records) in r.eval_sets.items()}
        summary.update(scores=scores, chance=chance, expert_load={k: v.tolist() for k, v in loads.items()})
        if r.master:
            print_results(scores, chance, loads, r.cfg)
            results = {k: v for k, v in summary.items() if k not in ("train_losses", "model")}
            path = results_path(r.cfg)  # a re-scoring on other sets keeps the run's results.json
            try:
                files.write_atomic(path, json.dumps(results, indent=1))
            except OSError as e:  # a full disk: the scores are printed above, the adapters saved
                raise UserError(f"could not write {path} ({e.strerror or e}); {saved}: free space there, then score "
                                f"them again with {again}.") from None
        return True
    except KeyboardInterrupt:  # said once, by whichever process was stopped first (a SIGTERM may reach one alone)
        if machine.stopped_first(r.master):
            print(f"\nstopped while scoring: {saved}; score them with {again}")
        return False
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not machine.out_of_memory(e):
            raise
        batch = r.cfg["eval_batch_size"]  # generate's KV cache grows with it: the dry run prints what it needs
        flags = ("" if r.cfg["eval_only"] else "--eval_only=True ") + f"--eval_batch_size={max(batch // 4, 1)}"
        raise ScoringOutOfMemory(f"out of memory while scoring with eval_batch_size={batch}; {saved}: score them "
                                 f"with the same command plus {flags}.") from e


def evaluate(model, r):
    """(task -> score, task -> expert load) on the evaluation sets in eval_dir."""
    scores, loads = {}, {}
    for name, (task, records) in r.eval_sets.items():
        room = r.args.context - task.max_new_tokens  # a sliding-window model runs no longer sequences
        prompts = [prompt_ids(r.tok, rec, room) for rec in records]
        run_checked(model, torch.tensor(prompts[:1], device=r.device), r)  # before hours of generating
        scores[name] = tasks.evaluate(task, generate_all(model, prompts, task.max_new_tokens, r), records)
        if r.multi_expert:  # every process runs the same prompts (FSDP needs each in the forward): the same load
            load = task_expert_load(model, prompts, r)
            if load is not None:  # None: no adapted layer in the last load_layers blocks (--targets=output)
                loads[name] = load
    return scores, loads


def same_folder(a, b):
    """Whether two eval_dir settings name one folder: the same files where both exist, else the same path."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one was moved or deleted since: its path is all there is to compare
        return os.path.abspath(a) == os.path.abspath(b)


def _results_config(path):
    """The config a results file of train.py records, or {} (none there, damaged, or not train.py's)."""
    try:
        config = files.read_json(path, fix="")["config"] if os.path.isfile(path) else {}
    except (ValueError, KeyError, TypeError):  # read_json's UserError is a ValueError
        return {}
    return config if isinstance(config, dict) else {}


def results_path(cfg):
    """The file a scoring writes: out_dir/results.json, unless this is a re-scoring (eval_only) on other evaluation
    sets than those the results.json there was scored on, whose scores it must not replace: then results_<eval_dir's
    name>.json, said on stdout (a later re-scoring on a folder of that name replaces it: it is that one's own). A
    re-scoring on the same sets replaces results.json (it finishes a run whose scoring ran out of memory), as does any
    scoring where results.json is missing or damaged, or names no eval_dir."""
    own = os.path.join(cfg["out_dir"], "results.json")
    scored_on = _results_config(own).get("eval_dir") if cfg["eval_only"] else None
    if not isinstance(scored_on, str) or not scored_on or "\0" in scored_on or same_folder(scored_on, cfg["eval_dir"]):
        return own
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.abspath(cfg["eval_dir"])))[:100].strip("._")
    path = os.path.join(cfg["out_dir"], f"results_{name or 'eval'}.json")  # ASCII: a name any filesystem takes
    print(f"scores on {cfg['eval_dir']} go to {path}; {own} keeps those on {scored_on}")
    return path


def results_problem(res, more=()):
    """Why the numbers of a results.json (score's, and the run's counts that train.py adds) and `more` read beside
    them (study.py: the loss curve) are not what its readers can compute with, or None (a KeyError where one is
    missing): one edited by hand, whose 1e308 or "50" failed study.py's tables with a traceback."""
    seconds = res["train_seconds"]  # None: not known (a re-scoring that could not know it)
    for value in (res["trainable_params"], res["base_params"], 0 if seconds is None else seconds,
                  res["config"]["seed"], *more):  # float() would take "8"; a nan or 10**400 overflowed
        if type(value) not in (int, float) or not 0 <= value < 2**63:
            return f"{value!r} is not a number from 0 to 2**63"
    if not res["base_params"]:  # the tables divide by it
        return "its base model has 0 parameters"
    percent = lambda v: type(v) in (int, float) and 0 <= v <= 100  # a nan fails both comparisons, a huge int too
    scores, chance, loads = res["scores"], res.get("chance", {}), res.get("expert_load") or {}
    if not isinstance(scores, dict) or not scores or not isinstance(chance, dict) or not isinstance(loads, dict):
        return "its scores, chance levels or expert loads are not a table of tasks"
    for what, table in (("score", scores), ("chance level", chance)):
        for task, value in table.items():
            if not percent(value):
                return f"the {what} of {task} is {value!r}, not a percentage from 0 to 100"
    if missing := [task for task in scores if chance and task not in chance]:
        return f"it has no chance level of {', '.join(missing)}"
    for task, load in loads.items():  # each expert's share of the task's tokens
        if not (isinstance(load, list) and load and all(type(v) in (int, float) and 0 <= v <= 1 for v in load)):
            return f"the expert load of {task} is {str(load)[:40]}, not a list of shares from 0 to 1"
    return None


def rescorings(out_dir):
    """The names of the files that re-scorings on other evaluation sets wrote in out_dir (results_path), or were
    writing when they were killed (files.write_atomic's NAME.tmpPID is there), told by their config (eval_only): a
    results_notes.json of the user's own is not the run's, to be replaced with it. An empty temporary counts too: a
    write killed before its bytes, or a power cut that lost them, leaves one, and it holds nothing to lose; but not
    beside a file of its name that is no re-scoring's (its name alone would make the user's file the run's)."""
    try:
        names = sorted(os.listdir(out_dir))
    except OSError:  # none yet, or not ours to list
        return ()
    found = set()
    for name in names:
        match, path = re.fullmatch(r"(results_.+\.json)(\.tmp[1-9][0-9]*)?", name), os.path.join(out_dir, name)
        with contextlib.suppress(OSError):  # gone meanwhile: the run that holds out_dir removed its temporary
            if match and (_results_config(path).get("eval_only") is True
                          or match[2] and os.path.isfile(path) and not os.path.getsize(path)
                          and not os.path.lexists(os.path.join(out_dir, match[1]))):
                found.add(match[1])
    return tuple(sorted(found))


def print_results(scores, chance, loads, cfg):
    name_w = max(len(n) for n in scores)
    print(f"\n{'task':<{name_w}}  metric       score  chance   lift")
    rows = [(name, task_of(name).metric, value, chance[name]) for name, value in scores.items()]
    rows.append(("average", "", sum(scores.values()) / len(scores), sum(chance.values()) / len(chance)))
    for name, metric, value, base in rows:
        print(f"{name:<{name_w}}  {metric:<11} {value:6.1f} {base:7.1f} {value - base:+6.1f}")
    if cfg["eval_limit"]:  # a score over part of a test set must say so beside it
        print(f"(each task scored on its first {cfg['eval_limit']} records at most: eval_limit={cfg['eval_limit']}; "
              "0 scores every record)")
    if loads:
        print(f"\nexpert load over each task's prompt tokens (last {cfg['load_layers']} layers; "
              f"even = {1 / cfg['experts']:.2f})")
        for name, load in loads.items():
            bars = "  ".join(f"e{i} {'█' * round(v * 20):<20} {v:.2f}" for i, v in enumerate(load.tolist()))
            print(f"{name:<{name_w}}  {bars}")
