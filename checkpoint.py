"""
Checkpoints of train.py: what a run saves and how it loads it back, on one process or sharded (FSDP).

    out_dir/ckpt.pt      {"state", "optimizer", "iter", "validated", "config", "rng", "model_args", "base", "data",
                         "tokenizer", "train_seconds"}: an exact resume; validated is False where a stop cut the step's
                         validation short (the resume runs it first); base, data and tokenizer are fingerprints of the
                         base, the shards and the tokenizer; train_seconds the run's training time up to the step, over
                         all its sessions (Clock), or None where not known
    out_dir/adapter.pt   the adapter tensors by name (teamlora.load_adapter_state_dict reads it)
    out_dir/model.pt     full training: {"model_args", "model"}, a base for another run's init_from

Every file is written under a temporary name and renamed (files.write_atomic), ckpt.pt first, so
that a crash leaves each file whole and adapter.pt never ahead of ckpt.pt (a resume writes it again). Everything is
read with weights_only=True: RNG states are stored as tensors and plain values, the config as
plain types, so no file can run code when loaded.
"""
import hashlib
import json
import os
import pickle
import random
import shlex
import sys
import textwrap
import time
import zipfile
from contextlib import suppress
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

import files
import teamlora
from errors import UserError


def init_adapters(model, seed):
    """The adapters' initial values, from one seed on the CPU in module order: the same on any device or sharding."""
    torch.manual_seed(seed)
    return {f"{name}.{n}": t for name, m in model.named_modules() if isinstance(m, teamlora.TeamLoRALinear)
            for n, t in m.initial_lora_state().items()}


def copy_into(model, state):
    """Copy full tensors into the model's parameters; a sharded (DTensor) parameter takes its own
    slice of the tensor, so no rank ever holds the whole model. Refused into merged layers: the update merged into
    their weight would stay there, stale, and merge(False) would take the loaded one out of it instead."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, teamlora.TeamLoRALinear)]
    if merged := [n or "the model" for n, m in layers if m.merged]:
        raise UserError(f"{merged[:3]} hold a merged adapter, which a load would leave in their weight: call "
                        "merge(False) on them before loading a checkpoint into the model.")
    params = dict(model.named_parameters())
    for n, t in state.items():  # p.copy_ would broadcast a smaller tensor without a word
        if n not in params or tuple(t.shape) != tuple(params[n].shape):
            got = f"shape {tuple(params[n].shape)}" if n in params else "no such tensor"
            raise UserError(f"the checkpoint's {n} {tuple(t.shape)} does not fit this model ({got}): load it into a "
                            "model built with the settings it was trained with (model, adapter, r, experts, targets).")
    with torch.no_grad():
        for n, t in state.items():
            p = params[n]
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor
                t = distribute_tensor(t.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(t.to_local())
            else:
                p.copy_(t)


def save_atomic(obj, path):
    try:
        files.write_atomic(path, lambda f: torch.save(obj, f))
    except RuntimeError as e:  # a Ctrl-C inside torch.save's write: its zip writer, closed, fails and hides it
        if isinstance(e.__context__, KeyboardInterrupt):
            raise e.__context__ from None
        raise


def load_pt(path, what):
    """torch.load with weights_only=True, so that no file can run code; a truncated, damaged or foreign file is
    one sentence naming it. Memory-mapped: tensors are read when copied to their place."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise UserError(f"{path} is empty (a copy or a save that did not finish), not a {what}; restore it or start "
                        "from another checkpoint.")
    damaged = (f"{path} is damaged: {{}} (a bit changed on disk or in a copy), so this {what} is not loaded; restore "
               "it from a good copy or start from another checkpoint.")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a Python object: never unpickle it
        if damage := damaged_zip(path):  # a bit flipped in the pickle of a checkpoint of plain tensors
            raise UserError(damaged.format(damage)) from None
        raise UserError(f"{path} holds Python objects beyond tensors and plain values, which could run code when "
                        f"loaded, so it is not loaded as a {what} (a checkpoint of a train.py before weights_only, "
                        "or a crafted file); start the run anew, or resume it with the version that wrote it."
                        ) from None
    except Exception as e:  # zip errors, EOF, OS errors: a file that is not what it claims
        reason = textwrap.shorten(str(e).strip().splitlines()[0], 120) if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable {what} (truncated, corrupt, or not written by train.py: "
                        f"{reason}); restore it or start from another checkpoint.") from None
    if damage := damaged_zip(path):
        raise UserError(damaged.format(damage))
    return state


def damaged_zip(path):
    """What is wrong with a torch.save file (a zip) that torch.load read, else None: a record whose bytes differ from
    the CRC-32 saved with them, or a zip directory that only torch's lenient reader gets past. torch.load checks
    neither: a flipped bit in a tensor, or in the directory and a tensor, loaded silently as other weights."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.CRC:  # saved without checksums (torch's config.save.compute_crc32 = False): none to check
                    continue
                try:
                    with z.open(info) as f:  # read once, in 1 MiB chunks (bounded memory); checked at its end
                        while f.read(1 << 20):
                            pass
                except zipfile.BadZipFile:
                    return f"its record {info.filename} does not match the checksum saved with it"
    except Exception as e:  # torch.save writes a zip that any reader reads whole
        return f"its zip directory is not whole ({textwrap.shorten(str(e) or type(e).__name__, 80)})"
    return None


def is_adapter_file(obj):
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and teamlora.is_adapter(k) for k in obj)


CKPT_KEYS = ("state", "optimizer", "iter", "config", "rng", "model_args")


ADAPTER_KEYS = ("adapter", "r", "experts", "alpha", "competition", "targets")  # what adapter.pt does not record


def check_adapter_settings(path, cfg, computes):
    """eval_only of an adapter.pt alone: it holds tensors, not the method or alpha that scale them. The config in the
    results.json beside it (the run's, or an earlier eval_only's) must compute the same: computes(config) is what
    shapes the adapter's function; a change that only names it otherwise (competition None or True) is fine."""
    results = os.path.join(os.path.dirname(path), "results.json")
    try:
        saved = files.read_json(results, fix="")["config"]
        ran = {**cfg, **{k: saved[k] for k in ADAPTER_KEYS if k in saved}}
        differs = computes(ran) != computes(cfg)
    except (ValueError, KeyError, TypeError, ArithmeticError):  # read_json's UserError is a ValueError
        return  # none, or unreadable: the flags alone
    if differs:
        flags = " ".join(f"--{k}={ran[k]}" for k in ADAPTER_KEYS if ran[k] != cfg[k])
        raise UserError(f"{path} was trained with {flags} (says the results.json beside it); score it with those.")


def check_adapter_base(path, base, cfg):
    """eval_only of an adapter.pt alone: it is only right on the base its run trained on, whose fingerprint the
    results.json beside it records (as ckpt.pt does: check_base). One of an older train.py records none, and a base
    not known (None: the dry run's, but for a model.pt of ours) is not checked."""
    try:
        saved = files.read_json(os.path.join(os.path.dirname(path), "results.json"), fix="").get("base")
    except ValueError:  # none, or unreadable (read_json's UserError): the flags alone
        return
    if base is not None and isinstance(saved, str) and saved != base:
        raise UserError(f"the base model at {cfg['init_from']} is not the one {path} was trained on (its weights "
                        "differ from those the results.json beside it records); point --init_from at that base.")


def load_trained_adapter(cfg, model, computes, base=None):
    """eval_only without a checkpoint: out_dir's adapter.pt, the finished run's, into model (only checked where model
    is meta: train.py's dry run, its checks before the demo's pretraining); computes as for check_adapter_settings;
    base: the fingerprint of the base it meets (check_adapter_base), None where not known."""
    path = os.path.join(cfg["out_dir"], "adapter.pt")
    if cfg["adapter"] != "none":  # train.resume_config made sure it is there
        state = load_pt(path, "adapter")
        if not is_adapter_file(state):
            raise UserError(f"{path} is not an adapter written by train.py; point --out_dir at a finished run.")
        check_adapter_settings(path, cfg, computes)
        check_adapter_base(path, base, cfg)
        load_state(model, state, cfg, path)


def is_checkpoint_file(obj):
    """Whether obj (a loaded .pt) is a ckpt.pt of train.py: the run's state, optimizer, step and RNG."""
    return isinstance(obj, dict) and all(k in obj for k in CKPT_KEYS)


def not_a_base(src, obj):
    """The sentence for an init_from .pt (obj, as loaded) that is not a base model.pt: a run's ckpt.pt or adapter.pt
    is named as what it is, with how to go on with that run (in its folder, where the file has its own name there)."""
    def out(name):
        folder = shlex.quote(os.path.dirname(src) or ".")
        return f"--out_dir={folder}" if os.path.basename(src) == name else f"--out_dir=<a folder holding it as {name}>"
    if is_checkpoint_file(obj):  # it has model_args, but the run's weights and optimizer, not a base's weights
        base = os.path.join(os.path.dirname(src), "model.pt")  # a full training run's weights, written beside it
        full = isinstance(obj["config"], dict) and obj["config"].get("adapter") == "none"
        rest = f"score it with --eval_only=True {out('ckpt.pt')}"
        if full and os.path.basename(src) == "ckpt.pt" and os.path.isfile(base):
            rest = f"{rest}, or train on its weights with --init_from={shlex.quote(base)}"
        else:
            rest = f"or {rest}"
        return (f"init_from '{src}' is a run's training checkpoint (ckpt.pt), not a base model; continue that run "
                f"with --init_from=resume {out('ckpt.pt')}, {rest}.")
    if is_adapter_file(obj):
        return (f"init_from '{src}' is an adapter, not a base model; give the base it was trained on (the model.pt "
                "of a full training run, or a Meta or Hugging Face folder), and score the adapter with "
                f"--eval_only=True {out('adapter.pt')}.")
    return (f"init_from '{src}' is not a base model written by train.py (it has no model_args and model); give the "
            "model.pt of a full training run, or a Meta or Hugging Face folder.")


def load_checkpoint(path, use="a resume"):
    """use: what reads it, named if it is not a checkpoint (a resume, a re-scoring, sample.py)."""
    ckpt = load_pt(path, "training checkpoint")
    if is_adapter_file(ckpt):
        raise UserError(f"{path} is an adapter (adapter.pt), not the ckpt.pt that train.py writes beside it; {use} "
                        f"needs that ckpt.pt; {adapter_alone(path)}")
    if not is_checkpoint_file(ckpt):
        raise UserError(f"{path} is not a training checkpoint, not the ckpt.pt that train.py writes beside it; {use} "
                        "needs that ckpt.pt (an adapter alone can be evaluated with python train.py --eval_only=True).")
    if not (isinstance(ckpt["config"], dict) and type(ckpt["iter"]) is int and ckpt["iter"] >= 0
            and isinstance(ckpt["rng"], list) and ckpt["rng"] and isinstance(ckpt.get("base"), (str, type(None)))
            and isinstance(ckpt["state"], dict) and all(isinstance(t, torch.Tensor) for t in ckpt["state"].values())
            and type(ckpt.get("train_seconds")) in (float, int, type(None))):  # a re-scoring writes it to results.json
        raise UserError(f"{path} is damaged: its weights, config, step, random state, base fingerprint or training "
                        "time is not what train.py writes; resume from a copy, or start the run again.")
    return ckpt


def adapter_alone(path):
    """How to score the adapter held by the ckpt.pt at path: as out_dir's adapter.pt (train.py --eval_only=True reads a
    ckpt.pt there first), never by replacing an adapter.pt already there."""
    folder = os.path.dirname(path) or "."
    if os.path.lexists(os.path.join(folder, "adapter.pt")):
        return ("to score it alone, move it to a folder of its own as adapter.pt (the adapter.pt here is another "
                "file) and run python train.py --eval_only=True --out_dir=<that folder> with the flags it was "
                "trained with.")
    return (f"to score it alone, rename it to adapter.pt and run python train.py --eval_only=True "
            f"--out_dir={shlex.quote(folder)} with the flags it was trained with.")


def trained(ckpt, out_dir):
    """{"step", "train_seconds"} of the run whose ckpt.pt this is (None: an adapter.pt alone), which a re-scoring's
    results.json holds as the run's own did: its step, and its training time over all its sessions (Clock). A ckpt.pt
    of an older train.py records no time: the results.json beside it then gives it where it is of the same step. What
    is not known is None, never the re-scoring's own time (study.py's report says it is not known)."""
    if ckpt is None:
        return {"step": None, "train_seconds": None}
    seconds = ckpt.get("train_seconds")
    if seconds is None:
        try:
            results = files.read_json(os.path.join(out_dir, "results.json"), fix="")
        except ValueError:  # none there, or unreadable (read_json's UserError is a ValueError)
            results = {}
        if results.get("step") == ckpt["iter"] and type(results.get("train_seconds")) in (float, int):
            seconds = results["train_seconds"]
    return {"step": ckpt["iter"], "train_seconds": seconds}


class Clock:
    """A run's training time in seconds, over all its sessions: what its ckpt.pt recorded (trained; 0 for a new run,
    None where not known) plus the time since this session's loop started. So a resume reports the run's time, and one
    with no step left to train (a run stopped while it was scored) not its own few milliseconds. The time a killed
    session (kill -9) trained past its last checkpoint is not counted: the resume trains those steps again."""
    now = staticmethod(time.monotonic)  # not the wall clock, which may be set back or forth meanwhile

    def __init__(self, ckpt, out_dir):
        self.before = 0.0 if ckpt is None else trained(ckpt, out_dir)["train_seconds"]
        self.start = self.now()

    def seconds(self):
        return None if self.before is None else self.before + self.now() - self.start


def gather_state(model, cfg):
    """Adapter tensors (or, for full training, all weights) as plain CPU tensors. A collective under
    FSDP: every rank calls it, and only what it returns is gathered (with adapters, not the frozen base)."""
    full = cfg["adapter"] == "none"
    out = {}
    for n, p in model.named_parameters():
        if full or teamlora.is_adapter(n):
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[n] = t.detach().to("cpu", copy=True)
    return out


def fingerprint(weights):
    """A base model's identity, cheap at any size: each tensor's name, shape, dtype and first and last 64 values (a
    page or two of a memory-mapped file), hashed. An adapter is only right on the base it was trained on."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().reshape(-1)
        h.update(f"{name} {tuple(weights[name].shape)} {t.dtype}".encode())
        h.update(torch.cat([t[:64], t[-64:]]).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def data_fingerprint(folder):
    """Token shards' identity, cheap at any size: each .bin file's name, size and first and last 4 KiB, hashed."""
    h = hashlib.sha256()
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".bin")):
        if files.special_file(os.path.join(folder, name)):  # not prepare's; opening a named pipe waits forever
            continue
        with open(os.path.join(folder, name), "rb") as f:
            size = f.seek(0, os.SEEK_END)
            h.update(f"{name} {size}".encode())
            for start in (0, max(0, size - 4096)):
                f.seek(start)
                h.update(f.read(4096))
    return h.hexdigest()[:16]


def check_data(ckpt, data_fp, cfg, path):
    """A resume goes on with the token shards its run trained on (checkpoints of older versions record none)."""
    if ckpt.get("data") not in (None, data_fp):
        raise UserError(f"the token shards in {cfg['data_dir']} are not those this run trained on ({path} records "
                        "others: prepared again since?); put those back, or start a new run.")


def check_base(ckpt, base, cfg, path):
    """A run's adapter meets the base its ckpt.pt recorded (checkpoints of older versions record none)."""
    if cfg["adapter"] != "none" and ckpt.get("base") not in (None, base):
        raise UserError(f"the base model at {cfg['init_from']} is not the one this run trained on (its weights differ "
                        f"from those {path} records); put that base back there, or start a new run.")


def check_tokenizer(ckpt, tok, path):
    """A run's tokenizer file is the one its ckpt.pt recorded (by SHA-256; older checkpoints record none): another
    of the same vocabulary size would turn its prompts into other ids and its answers into other text, unsaid."""
    if ckpt.get("tokenizer") is not None and ckpt["tokenizer"] != files.file_sha256(tok.path):
        raise UserError(f"the tokenizer at {tok.path} is not the one this run was trained with (its SHA-256 differs "
                        f"from the one {path} records); put that tokenizer back there.")


def check_resumed_base_and_tokenizer(ckpt, weights, tok, path, cfg, say=print):
    """A resume's checks of what it reads besides the shards (train.py's dry run): the base's weights (None: not read)
    and the tokenizer (None: not there yet) are those the run's ckpt.pt at path recorded, as restore checks; a
    re-scoring's note of a differing adapter.pt beside ckpt.pt, as restore gives it (say: the dry run's print)."""
    if weights is not None:
        check_base(ckpt, fingerprint(weights), cfg, path)
    if tok is not None:
        check_tokenizer(ckpt, tok, path)
    if cfg["eval_only"]:
        note_other_adapter(cfg, ckpt, path, say)


def load_state(model, state, cfg, path):
    """A checkpoint's adapter (or weights) into the model. train.py stops a run whose loss or gradients left the
    finite numbers before it saves that step, so a NaN or an infinity here is damage: answers would be noise."""
    if bad := [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]:
        raise UserError(f"{path} holds NaN or infinite values ({', '.join(bad[:3])}), which train.py never saves: it "
                        "is damaged; restore it from a copy, or train again.")
    if cfg["adapter"] != "none":
        own = {n for n, _ in model.named_parameters() if teamlora.is_adapter(n)}
        if own != set(state):
            raise UserError(f"the checkpoint's adapter does not fit this model ({len(state)} tensors vs {len(own)}): "
                            "resume with the same adapter, r, experts, competition and targets.")
    copy_into(model, state)


def logged_nothing(out_dir):
    """Whether out_dir's log.jsonl is an empty file: left by a new run that failed (out of memory at step 1) or was
    stopped before it logged a step. It holds nothing to lose: the next run may start there without --overwrite."""
    path = os.path.join(out_dir, "log.jsonl")  # a link: the run would write through it, into a file of the user's
    return os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) == 0


def why_none(path, run_files):
    """Why there is no checkpoint at path to resume, and what to do instead. A run killed (kill -9, the out-of-memory
    killer) or stopped at once before its first checkpoint left only the log.jsonl of its first steps, which a new
    run in its out_dir replaces only when asked: the fix says so, rather than a start that is refused in turn."""
    if kind := files.special_file(path):
        return f"{path} is {kind}, not a checkpoint; start a run with another init_from"
    out_dir = os.path.dirname(path)
    finished = [f for f in run_files if os.path.lexists(os.path.join(out_dir, f))]  # a run's result: never replaced
    if not finished and os.path.isfile(os.path.join(out_dir, "log.jsonl")) and not logged_nothing(out_dir):
        return (f"{path} does not exist (the run stopped before its first checkpoint); start it again with its own "
                "init_from and --overwrite=True, which replaces its log.jsonl")
    return f"{path} does not exist; start a run with another init_from"


def open_log(out_dir, step, unvalidated=False):
    """out_dir/log.jsonl, opened to log the steps after `step`: a new run's anew, a resume's for appending, without
    the lines of later steps that a kill or a second Ctrl-C left past the checkpoint. The resume logs those steps
    again, and a curve whose steps repeat would misalign study.py's mean over seeds. A last line cut short (no
    newline: its write was cut) goes too, else the next line would be glued to it and the log could not be read.
    unvalidated (the checkpoint's validation was cut short): the resume validates `step` first, so a validation of
    it already logged goes too (a resume that validated it, then was killed before its checkpoint said so)."""
    path = os.path.join(out_dir, "log.jsonl")
    if step and os.path.isfile(path):
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines(keepends=True)
        kept = [line for line in lines if logged_step(line) <= step and line.endswith("\n")
                and not (unvalidated and logged_step(line) == step and is_validation(line))]
        if kept != lines:
            files.write_atomic(path, "".join(kept).encode("utf-8", "surrogateescape"))
    return open(path, "a" if step else "w", buffering=1, encoding="utf-8")


def logged_step(line):
    """The step of a log.jsonl line; 0 for a line that names none (kept: not a later step's)."""
    try:
        step = json.loads(line).get("step", 0)
    except (ValueError, AttributeError, RecursionError):
        return 0
    return step if type(step) is int else 0


def is_validation(line):
    """Whether a log.jsonl line is a validation's (train.validate writes its step and val_loss)."""
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(entry, dict) and "val_loss" in entry


def sharded(cfg):
    """Whether FSDP2 shards the model: under torchrun with fsdp=True, even with one process."""
    return cfg["fsdp"] and dist.is_initialized()


def optimizer_state(model, opt, is_sharded):
    if is_sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def by_name(model, opt, state):
    """An unsharded run's optimizer state (keyed by position) keyed by parameter name, as FSDP2's loader reads it
    (which leaves positions unmatched, so a run resumed with fsdp=True would fail); FSDP2's own state as it is."""
    if not all(isinstance(k, int) for k in state["state"]):
        return state
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for g in opt.param_groups for p in g["params"]]
    return {"state": {order[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}


def set_optimizer_state(model, opt, state, is_sharded):
    if is_sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        state = by_name(model, opt, state)
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def set_training_state(raw, opt, ckpt, r, path):
    """A checkpoint's optimizer state, and the random state of this rank (a resume on more processes than the run had:
    rank 0's for the new ones); one that does not load is a damaged ckpt.pt, said in one sentence."""
    try:
        set_optimizer_state(raw, opt, ckpt["optimizer"], sharded(r.cfg))
        set_rng_state(ckpt["rng"][r.rank] if r.rank < len(ckpt["rng"]) else ckpt["rng"][0], r.device)
    except UserError:
        raise
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:  # edited by hand, another program's
        raise UserError(f"{path} is damaged: its optimizer or random state does not load ({type(e).__name__}: {e}); "
                        "resume from a copy, or start the run again.") from None


def restore(r, raw, opt, ckpt):
    """Put a checkpoint's adapter (or weights), optimizer and RNG state back (r: train.Run); returns its step."""
    path = f"{r.cfg['out_dir']}/ckpt.pt"
    check_base(ckpt, r.base, r.cfg, path)
    if not r.cfg["eval_only"]:  # scoring reads the evaluation sets, not the shards (their tokenizer: train.datasets)
        check_data(ckpt, r.data, r.cfg, path)
    check_tokenizer(ckpt, r.tok, path)
    load_state(raw, ckpt["state"], r.cfg, path)
    set_training_state(raw, opt, ckpt, r, path)
    if r.cfg["eval_only"] and r.master:
        note_other_adapter(r.cfg, ckpt, path, r.say)
    if r.master and not r.cfg["eval_only"]:  # a kill between the two writes left the adapter (or model.pt) behind
        save_weights(r, ckpt["state"])
        warn_older_masks(r, ckpt, path)
    step, last = ckpt["iter"], r.cfg["max_iters"]
    if r.cfg["eval_only"]:
        note = f", before its last ({last}): the run stopped, or is still training" if step < last else ""
    else:  # a run stopped while it was scored resumes to be scored
        note = ", its last: nothing to train, scoring it (raise --max_iters to train on)" if step == last else ""
    r.say(f"resumed from {path} at step {step}{note}")
    return step


def warn_older_masks(r, ckpt, path):
    """A train.py older than 4 December drew a resumed run's dropout masks on from the random state ckpt.pt holds;
    this one draws each slice's from (seed, step, slice). Such a run trains on soundly, but not as that version's
    would have (nor as an uninterrupted run): said, as keep_slices says it of other process counts. Its ckpt.pt is
    known by its config, which lacks tf32 (a key added late on 3 December, two hours before the change)."""
    training = r.cfg["adapter"] != "none" and r.cfg["dropout"] > 0 and ckpt["iter"] < r.cfg["max_iters"]
    if training and "tf32" not in ckpt["config"]:
        r.say(f"warning: {path} was written by a train.py older than 4 December, which drew dropout masks on from the "
              "random state it saved; this one draws them from (seed, step), so the run goes on with other dropout "
              "masks than that version's would (train it again from the start to match an uninterrupted run).",
              file=sys.stderr)


def note_other_adapter(cfg, ckpt, path, say):
    """A re-scoring scores ckpt.pt's adapter (checked against the base ckpt.pt records). An adapter.pt beside it that
    differs (left behind by a save a stop cut short, or copied in from another run, of another base perhaps) is not
    what is scored: said, so that its scores are not taken for that file's; it is left as it is."""
    other = os.path.join(cfg["out_dir"], "adapter.pt")
    if cfg["adapter"] == "none" or not os.path.isfile(other):
        return
    try:
        state = load_pt(other, "adapter")
        same = state.keys() == ckpt["state"].keys() and all(torch.equal(t, ckpt["state"][n]) for n, t in state.items())
    except (UserError, AttributeError, TypeError, RuntimeError):  # unreadable, or not tensors by name
        same = False
    if not same:
        say(f"note: scoring the adapter in {path} (step {ckpt['iter']}), not the {other} beside it, which differs "
            "(left behind by a stopped save, or copied in from another run); to score that adapter.pt alone, move "
            f"ckpt.pt out of {cfg['out_dir']}", file=sys.stderr)


def rng_state(dev):
    """Every generator's state as tensors and plain values (what weights_only=True can load back). The
    CUDA generator only for a CUDA run: asking for it would start CUDA in a CPU run (a GPU context, and
    CPU numerics that differ before and after, so a resume would not match)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss],
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}


def set_rng_state(s, dev):
    """A state edited by hand is a ValueError, which the resume says is a damaged ckpt.pt."""
    try:
        torch.set_rng_state(s["torch"])
        name, keys, pos, has_gauss, gauss = s["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(s["python"])
        if s["cuda"] is not None and dev.type == "cuda":
            torch.cuda.set_rng_state(s["cuda"], dev)
    except (RuntimeError, AttributeError) as e:  # a generator's state of another size, a list for a tensor
        raise ValueError(f"a random state does not load: {e}") from None


def save_weights(r, state):
    """adapter.pt (name -> tensor, for teamlora.load_adapter_state_dict), or model.pt for full training."""
    if r.cfg["adapter"] == "none":
        save_atomic({"model_args": asdict(r.args), "model": state}, os.path.join(r.cfg["out_dir"], "model.pt"))
    else:
        save_atomic(state, os.path.join(r.cfg["out_dir"], "adapter.pt"))


def save_checkpoint(r, raw, opt, step, validated=True):
    """ckpt.pt, then adapter.pt (or model.pt), of step `step`; validated=False: a stop cut the step's validation short
    (train.validate), which a resume then runs first."""
    cfg = r.cfg
    if sharded(cfg):  # FSDP2 keeps the root's parameters unsharded after a forward without backward (validation):
        raw.reshard()  # its sharded ones are the optimizer's, which the optimizer's state is looked up by
    state = gather_state(raw, cfg)
    opt_state = optimizer_state(raw, opt, sharded(cfg))
    rngs = [None] * r.world
    if r.world > 1:
        dist.all_gather_object(rngs, rng_state(r.device))  # each rank's generators (dropout reseeds per slice,
        # train.slice_seed: these keep anything random a user adds outside a step exact on resume)
    else:
        rngs = [rng_state(r.device)]
    if r.master:  # ckpt.pt first: the adapter (or model) is never ahead of it, and a resume rewrites it
        path = os.path.join(cfg["out_dir"], "ckpt.pt")
        try:
            files.fsync_file(os.path.join(cfg["out_dir"], "log.jsonl"))  # the steps it covers survive a power cut
            save_atomic({"state": state, "optimizer": opt_state, "iter": step, "validated": validated, "config": cfg,
                         "rng": rngs, "model_args": asdict(r.args), "base": r.base, "data": r.data,
                         "tokenizer": None if r.tok is None else files.file_sha256(r.tok.path),
                         "train_seconds": None if r.clock is None else r.clock.seconds()}, path)
            r.written = step  # the run's checkpoint now, though a second Ctrl-C may yet stop adapter.pt's write
            save_weights(r, state)
        except OSError as e:  # a full disk or a folder made read-only: each file stays as it was
            then = (f"continue from the last checkpoint written with {r.resume_with}" if os.path.isfile(path) else
                    "start the run again with --overwrite=True")
            raise UserError(f"could not write the checkpoint of step {step} to {cfg['out_dir']} "
                            f"({e.strerror or e}); free space there (or make it writable), then {then}.") from None
    if r.world > 1:
        dist.barrier()


def stop_run(r, raw, opt, stop, step, saved):
    """After Ctrl-C or SIGTERM: the checkpoint of step `step`, the last finished, unless a second Ctrl-C stopped a step,
    or a save before its ckpt.pt was written (atomically: step `saved`'s stands). Returns the run's checkpoint step."""
    if not stop.forced and saved != step:
        with suppress(KeyboardInterrupt):
            save_checkpoint(r, raw, opt, step, validated=r.unvalidated != step)
            saved = step
    saved = step if r.written == step else saved  # a save cut short after ckpt.pt: a resume writes adapter.pt again
    if r.written == step:
        r.say(f"\ninterrupted: checkpoint of step {step} written to {r.cfg['out_dir']}; continue with {r.resume_with}")
    elif saved is not None:  # the one resumed from, its validation again cut short; or a second Ctrl-C's
        r.say(f"\n{'stopped at once' if stop.forced else 'interrupted'}: the checkpoint of step {saved} in "
              f"{r.cfg['out_dir']} is kept; continue with {r.resume_with}")
    else:  # a new run stopped before its first checkpoint: its log.jsonl is there, in the way if a step is in it
        same = r.resume_with == "the same command" or logged_nothing(r.cfg["out_dir"])
        again = "the same command" if same else "the run with --overwrite=True"
        r.say(f"\nstopped at once, before the run wrote a checkpoint: start {again}")
    return saved or 0
