"""
Fine-tune a LLaMA with TeamLoRA (or LoRA, MoELoRA, HydraLoRA, or full training), from a 2-core
laptop to 8-GPU FSDP. One plain loop, nanoGPT-style:

    python train.py                                   # the built-in demo on the synthetic mini-CME
    python train.py config/cme_llama2_7b.py --dry_run=True         # check a full config, no weights
    torchrun --standalone --nproc_per_node=8 train.py config/cme_llama2_7b.py

Configuration: the defaults below, then config files (plain Python assignments), then --key=value flags, read by
configurator.py (an unknown key or a wrong type is an error naming it). Reading order: main -> train (resume config,
processes, the demo's files) -> run (setup, checkpoint.restore, train_step's loop) -> finish (scores: evaluation.py).
"""
if __name__ == "__main__":  # before the imports: see errors.start_script (closed streams, Ctrl-C while importing)
    import errors
    errors.start_script()

import difflib
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import configurator
import data
import evaluation
import files
import machine
import memory
import minicme
import teamlora
from baselines import HydraLoRALinear, moelora_fused_kwargs
from errors import UserError, at_a_terminal, docstring, run_script
from model import PRESETS, ModelArgs, Transformer, saved_model
from tokenizer import Tokenizer

# -------------------------------------------------------------------------------------------------
# defaults (every key here can be set by a config file or --key=value)
out_dir = "out/demo"
device = "auto"  # auto: cuda when available, else cpu
dtype = "float32"  # or "bfloat16" (fp16 needs loss scaling): the base's (full training: its compute's); adapters fp32
seed = 1337
# data: a folder written by `python data.py prepare`, and a folder of <task>.jsonl evaluation sets
data_dir = "data/mini_cme/tokens"
eval_dir = "data/mini_cme/test"
tokenizer = "data/mini_cme/tokenizer.model"
batch_mode = "pad"  # "pad": whole examples padded to the longest, "pack": several per row
max_len = 256  # tokens per example (pad) or per row (pack)
batch_size = 16  # examples per optimizer step, over all processes and accumulation steps
grad_accum = 1
# model
init_from = "data/mini_cme/base.pt"  # "scratch", "resume", a .pt written by train.py, or a Meta/HF folder
model = "small"  # the ModelArgs preset of init_from="scratch" and of a dry run's base not on disk (the demo's excepted)
activation_checkpointing = False  # recompute each block in backward: activation memory traded for a second forward
compile = False  # torch.compile each transformer block (adapters inside); see bench.py for what it pays
threads = 0  # CPU threads for torch; 0: OMP_NUM_THREADS if set, else the cores not busy at the start (at least 1)
tf32 = True  # CUDA: float32 matmuls (the adapters' under a bf16 base) on TF32 tensor cores; False: IEEE float32
# adapter
adapter = "teamlora"  # "teamlora", "moelora", "hydralora", "lora", or "none" (full training)
targets = "w1,w2,w3"  # the FFN (the paper's setting); add wq,wk,wv,wo for attention
r = 32  # A's rank (the paper's r_A); each expert's B_i has r_B = r / experts (hydralora: each head B_i has all r)
experts = 4  # the paper's k: experts share A, each with its own B_i and router row (adapter=lora: 1)
alpha = 32.0  # scaling = alpha / r_B, the authors': at equal alpha, k times a rank-r LoRA's update (README)
dropout = 0.05
competition = None  # the interaction matrix M; None: the method's own (on for teamlora only)
balance_coef = 0.01  # weight of the load-balancing loss (0 turns it off)
balance_reduction = "mean"  # over adapted layers; the authors' harness: "sum" with balance_coef=1
# optimizer
learning_rate = 1e-3  # chosen for the demo on mini-CME's validation sets (2e-3 scored lower)
min_lr_ratio = 0.0  # cosine decays to learning_rate * min_lr_ratio
weight_decay = 0.0  # AdamW's, on every trainable tensor: A, B, router and M (adapter=none: norms too)
beta1, beta2 = 0.9, 0.999
grad_clip = 1.0
max_iters = 600  # chosen on the validation sets: 800 steps scored the same (RESULTS.md), 35 s slower
lr_decay_iters = None  # the schedule's length; None: max_iters
warmup_iters = 6
# evaluation, checkpoints and logs
eval_interval = 300  # validation loss and a checkpoint every this many steps (and at the end)
eval_iters = 4  # validation batches
eval_only = False  # score out_dir's run, no training (on another eval_dir: into results_<its name>.json)
eval_limit = 100  # test records per task, the first ones (0: all)
eval_batch_size = 64
log_interval = 10  # a log line every this many steps: that step's loss, tokens/s since the line or validation before
load_layers = 2  # the expert load is shown for this many last layers (the paper's Figure 5)
fsdp = False  # under torchrun: FSDP2 instead of DDP
dry_run = False  # build on the meta device, print parameters and a memory estimate, exit
dry_run_world_size = 1  # the processes the dry run plans for: 1, as `python train.py` runs (torchrun: WORLD_SIZE)
overwrite = False  # a new run may replace the run already in out_dir (otherwise that is refused)
# -------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
for _key in DEFAULTS:  # every function reads its cfg dict: a stray global read would fail loudly
    del globals()[_key]


def parse_config(argv):
    """[config/FILE.py] [--key=value ...] -> a full, checked config dict (configurator.py reads it)."""
    if {"-h", "--help"} & set(argv):  # the docstring, then the defaults as this file states them, comments and all
        src = open(__file__, encoding="utf-8").read()
        print(docstring(__file__) + "\n\n" + src[src.index("# defaults"):src.index("DEFAULTS =")].rstrip("-\n# "))
        raise SystemExit(0)
    cfg, explicit = configurator.read(argv, DEFAULTS)
    check_config(cfg)
    cfg["_explicit"] = sorted(explicit)  # what the user set: a resume keeps everything else from the run
    return cfg


_positive, _non_negative, _fraction = (lambda v: v > 0), (lambda v: v >= 0), (lambda v: 0 <= v < 1)
RANGES = [(k, _positive, "positive") for k in ("batch_size", "grad_accum", "max_iters", "max_len", "r", "experts",
                                               "eval_interval", "log_interval", "eval_batch_size", "alpha",
                                               "grad_clip", "dry_run_world_size", "load_layers")] + \
         [(k, _non_negative, "0 or more") for k in ("warmup_iters", "eval_iters", "eval_limit", "balance_coef",
                                                    "weight_decay")] + \
         [(k, _fraction, "in [0, 1)") for k in ("dropout", "beta1", "beta2")] + \
         [("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"), ("threads", lambda v: 0 <= v <= 1024, "in [0, 1024]"),
          ("learning_rate", lambda v: 0 <= v <= 1, "in [0, 1] (an AdamW step moves each weight by about that much)"),
          ("seed", lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
          ("lr_decay_iters", lambda v: v is None or (type(v) is int and v > 0), "None or a positive integer")]


def check_config(cfg):
    for key, value in cfg.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"config key '{key}' must be a finite number, got {value}.")
    for key in ("out_dir", "data_dir", "tokenizer", "init_from"):
        if not str(cfg[key]).strip():
            raise UserError(f"config key '{key}' is empty; give it a path (see the defaults in train.py).")
    files.check_openable_by_torch(cfg, ("out_dir", "tokenizer", "init_from"), ("data_dir", "eval_dir"))
    choices = {"adapter": ("teamlora", "moelora", "hydralora", "lora", "none"), "dtype": ("float32", "bfloat16"),
               "batch_mode": ("pad", "pack"), "balance_reduction": ("mean", "sum"), "model": tuple(PRESETS)}
    if not (cfg["competition"] is None or type(cfg["competition"]) is bool):  # 0 == False, yet `0 is not False`
        raise UserError("config key 'competition' must be True, False or None (the method's own), "
                        f"got {cfg['competition']!r}.")
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise UserError(f"config key '{key}' must be one of {', '.join(allowed)}, got {cfg[key]!r}.")
    for key, ok, valid in RANGES:
        if not ok(cfg[key]):
            raise UserError(f"config key '{key}' must be {valid}, got {cfg[key]!r}.")
    for key, value in cfg.items():  # past int64, numpy and torch cannot count it (sizes, positions, steps)
        if type(value) is int and value >= 2**63:
            raise UserError(f"config key '{key}' must be below 2**63, got {value}.")
    if not re.fullmatch(machine.DEVICES, cfg["device"]):
        raise UserError(f"config key 'device' must be auto, cpu, cuda or cuda:N, got {cfg['device']!r}.")
    if cfg["init_from"] != "resume":  # a resume's unset keys are its run's, not the defaults: resume_config checks
        check_combination(cfg)  # them with its run's (a run of batch_size=12 resumed with --grad_accum=3 is no error)


def check_combination(cfg, fix="lower --batch_size"):
    """The refusals of settings that do not go together: a resume's are checked once merged with its run's."""
    if cfg["eval_only"] and not cfg["eval_dir"]:  # here: a resume's is its run's, unless --eval_dir says otherwise
        raise UserError("eval_only=True scores the run on eval_dir, which is empty; set --eval_dir.")
    if cfg["adapter"] != "none" and not cfg["targets"].strip(" ,"):
        raise UserError("config key 'targets' is empty; name the linear layers to adapt, e.g. --targets=w1,w2,w3.")
    if cfg["competition"] and cfg["adapter"] in ("lora", "none", "hydralora"):
        raise UserError(f"competition=True mixes experts' weights by a learned matrix, which adapter={cfg['adapter']}"
                        " does not have; use adapter=teamlora or moelora, or leave competition at None.")
    steps = max(cfg["max_iters"], cfg["eval_iters"])  # data.py numbers the examples it streams in int64 numpy arrays
    if (steps + data.GROUP_BATCHES) * cfg["batch_size"] >= 2**60:  # of at most 2**63 bytes, up to the last window
        raise UserError(f"batch_size={cfg['batch_size']} streams more examples than numpy indexes; {fix}.")
    if cfg["adapter"] == "hydralora" and cfg["experts"] < 2:
        raise UserError(f"adapter=hydralora weighs experts >= 2 heads, got experts={cfg['experts']}; for one head use "
                        "--adapter=lora.")
    if cfg["adapter"] in ("teamlora", "moelora") and cfg["r"] % cfg["experts"]:
        raise UserError(f"r={cfg['r']} is not a multiple of experts={cfg['experts']}: "
                        "set r = experts * (rank per expert).")
    if cfg["batch_size"] % cfg["grad_accum"]:
        raise UserError(f"batch_size={cfg['batch_size']} must be a multiple of grad_accum={cfg['grad_accum']}.")
    if cfg["learning_rate"] * cfg["weight_decay"] >= 1:  # AdamW's decoupled decay: p *= 1 - lr * weight_decay
        raise UserError(f"learning_rate={cfg['learning_rate']:g} with weight_decay={cfg['weight_decay']:g} zeroes "
                        "every weight or flips its sign at each step (AdamW multiplies them by 1 - learning_rate * "
                        "weight_decay); lower --weight_decay (usually 0 to 0.1) or --learning_rate until their product "
                        "is below 1.")
    for key, (value, what) in multipliers(cfg).items():
        if value > torch.finfo(torch.float32).max:
            raise UserError(f"{key}={cfg[key]:g} makes {what} {value:.3g}, past float32's largest number, so the first "
                            f"step would be nan; lower --{key} ({what} is usually {USUAL[key][1]}).")


# Besides learning_rate, alpha and balance_coef set how large a step's numbers grow: the adapters' output is scaled by
# alpha / r_B, the balance loss by balance_coef. Past float32's largest number (the adapters compute in float32, under
# a bf16 base too) the first step is nan, which check_combination refuses; 10 times past their usual values they are
# named beside learning_rate when a run diverges (check_finite). Usual: a scaling of 1 (the paper's alpha 32 over r_B
# 32) to 4 (the demo's, r_B 8) or 8 (the study's k=8, r_B 4), LoRA's alpha = r or 2 r giving 1 or 2; balance_coef 0.01
# (ours) to 1 (the authors' harness). weight_decay is no suspect: below 1 / learning_rate it only shrinks weights.
USUAL = {"alpha": (8.0, "1 to 8"), "balance_coef": (1.0, "0.01 to 1")}


def multipliers(cfg):
    """key -> (the factor it sets, what that factor is), for each key of USUAL that the run uses."""
    found, kw = {}, adapter_kwargs(cfg)  # teamlora.inject's keywords for the adapter (below)
    if cfg["adapter"] == "hydralora":  # each layer's `scaling`: k heads of width r, weighted alpha / k
        found["alpha"] = (cfg["alpha"] / cfg["experts"] / cfg["r"], "the adapters' scaling")
    elif cfg["adapter"] != "none":  # alpha / r_B (moelora: alpha / k, as baselines.moelora_fused_kwargs gives it)
        found["alpha"] = (kw["alpha"] / (kw["r"] // kw["experts"]), "the adapters' scaling")
    if Run(cfg).multi_expert:  # a router, so a balance loss (Run: below)
        found["balance_coef"] = (cfg["balance_coef"], "the balance loss's weight")
    return found


# -------------------------------------------------------------------------------------------------
# one run's state (where it runs, its device, CPU threads and processes: machine.py)


@dataclass
class Run:
    """What a run's functions share: its configuration, its place among the processes (rank, world), and what setup()
    fills in. Passed around as `r`, which is not the adapter's rank (that is cfg["r"]) nor this process's (r.rank)."""
    cfg: dict
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    tok: Tokenizer = None
    args: ModelArgs = None
    eval_sets: dict = None  # task name -> (Task, records), read before step 1
    resume_with: str = "--init_from=resume"  # what continues this run after an interruption
    base: str = None  # checkpoint.fingerprint of the base weights, recorded in ckpt.pt
    data: str = None  # checkpoint.data_fingerprint of the token shards, recorded in ckpt.pt
    written: int = None  # the step of the last ckpt.pt written (checkpoint.save_checkpoint); adapter.pt may lag it
    unvalidated: int = None  # the step whose validation a stop cut short (validate): its ckpt.pt says so
    clock: checkpoint.Clock = None  # the run's training time over its sessions (run), recorded in each ckpt.pt

    @property
    def master(self):
        return self.rank == 0

    @property
    def multi_expert(self):
        """Whether the adapter weighs several experts per token (a router): balance loss, expert load."""
        return self.cfg["adapter"] in MULTI_EXPERT and self.cfg["experts"] > 1

    def say(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)


# -------------------------------------------------------------------------------------------------
# the model: a base (scratch, a .pt of ours, or Meta/HF weights) plus adapters


MULTI_EXPERT = ("teamlora", "moelora", "hydralora")


def adapter_kwargs(cfg):
    """Keyword arguments of teamlora.inject for cfg's adapter (competition=None: each method's own). MoELoRA (paper
    Eq. 7) runs fused, as TeamLoRA's collaboration module with A stacked and alpha / k (baselines.py)."""
    kind, k, comp = cfg["adapter"], cfg["experts"], cfg["competition"]
    if kind == "lora":
        return dict(r=cfg["r"], experts=1, alpha=cfg["alpha"], competition=False)
    if kind == "moelora":
        return {**moelora_fused_kwargs(cfg["r"], k, cfg["alpha"]), "competition": bool(comp)}
    if kind == "hydralora":
        return dict(r=cfg["r"], experts=k, alpha=cfg["alpha"], competition=bool(comp), cls=HydraLoRALinear)
    return dict(r=cfg["r"], experts=k, alpha=cfg["alpha"], competition=comp is not False)


def scratch_args(cfg, vocab_size):
    return ModelArgs.from_name(cfg["model"], vocab_size=vocab_size, max_seq_len=max(cfg["max_len"], 256))


def base_weights(cfg, vocab_size):
    """(ModelArgs, name -> tensor) of the base, memory-mapped: read only as each tensor is copied to its place."""
    src = cfg["init_from"]
    if src == "scratch":
        args = scratch_args(cfg, vocab_size)
        torch.manual_seed(cfg["seed"])  # the same random base on every rank and every resume
        return args, Transformer(args).state_dict()
    if src.endswith(".pt"):
        if not os.path.isfile(src):
            what = f"is {files.special_file(src)}, not a .pt file" if os.path.exists(src) else "does not exist"
            raise UserError(f"base checkpoint '{src}' {what}; train one (adapter='none') or use init_from='scratch'.")
        ckpt = checkpoint.load_pt(src, "base model")
        if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
            raise UserError(checkpoint.not_a_base(src, ckpt))  # a run's ckpt.pt or adapter.pt: how to go on with it
        return saved_model(ckpt["model_args"], ckpt["model"], src)
    if not os.path.isdir(src):  # a named pipe or a device (/dev/null) too: from_pretrained reads folders only
        what = f"is {files.special_file(src) or 'a file'}" if os.path.exists(src) else "does not exist"
        typo = difflib.get_close_matches(src, ("scratch", "resume"), n=1)
        raise UserError(f"init_from '{src}' {what}; " + (f"did you mean '{typo[0]}'?" if typo else "give a model.pt "
                        "written by train.py, a Meta or Hugging Face folder, 'scratch' or 'resume'."))
    base = from_pretrained(src)  # memory-mapped tensors, not copies
    return base.args, base.state_dict()


def from_pretrained(src, **kw):
    """Transformer.from_pretrained; a missing optional package (safetensors) is one sentence naming it."""
    try:
        return Transformer.from_pretrained(src, **kw)
    except ImportError as e:
        raise UserError(str(e)) from None


def inject_targets(model, cfg):
    """The adapters on cfg's targets, each target's name and width checked before any of its adapters is made."""
    linear = dict.fromkeys(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    for target in dict.fromkeys(t.strip() for t in cfg["targets"].split(",") if t.strip()):
        found = [(n, m) for n, m in model.named_modules() if n == target or n.endswith("." + target)]
        for name, module in [(n, m) for n, m in found if n not in linear][:1]:  # --targets=1: layers.1, a block
            names = ",".join(dict.fromkeys(n.rpartition(".")[2] for n in linear))
            raise UserError(f"target '{target}' names {name}, a {type(module).__name__}, not a linear layer; targets "
                            f"are linear layers' names, this model's: {names} (e.g. --targets=w1,w2,w3).")
        width = min([min(m.in_features, m.out_features) for _, m in found], default=2**63)  # none: inject refuses
        for key in [k for k in ("r", "experts") if adapter_kwargs(cfg)[k] > width]:
            raise UserError(f"{key}={cfg[key]} is more than target {target}'s width of {width} features, where A, B or "
                            f"the router alone would outgrow the weight it adapts; set --{key}={width} or less.")
        teamlora.inject(model, target, dropout=cfg["dropout"], **adapter_kwargs(cfg))


def build_model(cfg, dev, vocab_size, world):
    """(model, ModelArgs, base fingerprint): base + adapters made on the meta device, sharded or not, filled in."""
    args, weights = base_weights(cfg, vocab_size)
    full = cfg["adapter"] == "none"
    with torch.device("meta"):
        model = Transformer(args).to(torch.float32 if full else getattr(torch, cfg["dtype"]))
    model.gradient_checkpointing = cfg["activation_checkpointing"]
    if not full:
        inject_targets(model, cfg)
    if checkpoint.sharded(cfg):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg["dtype"]) if full else None,
                                  reduce_dtype=torch.float32)  # with adapters: as stored; gradient sums fp32
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(dev.type, (world,))  # explicit: FSDP on CPU (gloo) even where a GPU is visible
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    if cfg["compile"]:  # per block, after sharding, as FSDP2 does: names and state dicts stay
        for block in model.layers:
            block.compile(dynamic=True)  # one graph for every sequence length
    model.to_empty(device=dev)  # uninitialised memory, each parameter filled below (the base was checked complete)
    checkpoint.copy_into(model, weights)
    if not full:
        checkpoint.copy_into(model, checkpoint.init_adapters(model, cfg["seed"] + 1))  # + 1: not a scratch base's draws
    return model, args, checkpoint.fingerprint(weights)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# -------------------------------------------------------------------------------------------------
# the learning rate: linear warmup, then cosine decay


def get_lr(step, cfg):
    total = cfg["lr_decay_iters"] or cfg["max_iters"]
    lr, warm = cfg["learning_rate"], cfg["warmup_iters"]
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / (total - warm) if step < total else 1.0  # a decay ending by the warmup's end: done
    return lr * (cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


# -------------------------------------------------------------------------------------------------
# the training loop


RESUME_MAY_CHANGE = ("threads", "max_iters", "eval_only", "eval_limit", "eval_interval", "eval_batch_size",
                     "log_interval", "device", "fsdp", "activation_checkpointing", "compile", "tf32", "out_dir",
                     "learning_rate", "eval_dir", "load_layers",  # load_layers: which blocks' expert load is shown
                     "dry_run", "dry_run_world_size")  # not the run's: a resume is dry-run, for any process count


def saved_config(path, use="a resume", ckpt=None):
    """(config, checkpoint) of the ckpt.pt at path: the config checked again as if typed (a file edited by hand);
    use: what reads it (checkpoint.load_checkpoint); ckpt: the checkpoint, where the caller has read it already."""
    ckpt = ckpt if ckpt is not None else checkpoint.load_checkpoint(path, use)
    saved = {**DEFAULTS, **ckpt["config"]}  # a key added since the run was saved takes its default
    saved.update((k, configurator.typed(k, saved[k], DEFAULTS, path)) for k in DEFAULTS)
    check_config(saved)
    return saved, ckpt


def resume_config(cfg):
    """(cfg, checkpoint or None). A resume, and eval_only on a run with a ckpt.pt, take the run's config from it,
    changed only in the keys of RESUME_MAY_CHANGE the user set (device='cpu' stays on the CPU unless --device says
    otherwise; 'auto' takes the GPU): scored by other settings, an adapter would score wrong."""
    path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if cfg["init_from"] != "resume" and not (cfg["eval_only"] and os.path.isfile(path)):
        adapter = os.path.join(cfg["out_dir"], "adapter.pt")
        if cfg["eval_only"] and cfg["adapter"] != "none" and not os.path.isfile(adapter):  # before the model and data
            what = f"is {kind}, not an adapter" if (kind := files.special_file(adapter)) else "does not exist"
            raise UserError(f"eval_only: {adapter} {what}; train first or point --out_dir at a finished run.")
        return cfg, None
    if not os.path.isfile(path):
        raise UserError(f"nothing to resume: {checkpoint.why_none(path, RUN_FILES)}.")
    saved, ckpt = saved_config(path, "a re-scoring (--eval_only=True)" if cfg["eval_only"] else "a resume")
    changed = [k for k in cfg.get("_explicit", ()) if k != "init_from" and cfg[k] != saved[k]]
    fixed = [k for k in changed if k not in RESUME_MAY_CHANGE]
    if fixed:
        was = ", ".join(f"{k}={saved[k]!r}" for k in fixed)
        raise UserError(f"{', '.join(fixed)} cannot change when resuming or re-scoring (the run was {was}); "
                        f"only {', '.join(RESUME_MAY_CHANGE)} can.")
    cfg = {**saved, **{k: cfg[k] for k in changed + ["dry_run", "dry_run_world_size"]}}  # this command's, not a run's
    files.check_run_paths(cfg, [k for k in ("tokenizer", "init_from") if cfg[k] != minicme.DEMO[k]],  # demo's: rebuilt
                          ran_in=files.folder_ran_in(cfg["out_dir"], saved["out_dir"]))
    check_combination(cfg, "lower --max_iters (a resume keeps its run's batch_size)")
    if cfg["max_iters"] < ckpt["iter"] and not cfg["eval_only"]:
        raise UserError(f"{path} is at step {ckpt['iter']}, past max_iters={cfg['max_iters']}: raise --max_iters to "
                        "train on, or pass --eval_only=True to score it.")
    return cfg, ckpt


def build_demo(cfg, resuming=False):
    """The demo's suite, shards and base, made before the run that uses them (the first `python train.py` builds
    them, later ones reuse them): nothing is downloaded. Returns the pretraining's summary if it was interrupted."""
    minicme.check_demo(cfg)  # damaged files, a tokenizer of one's own with the demo's shards: before anything is built
    try:
        pretrain = minicme.build_demo_data(cfg)
        for key in ("tokenizer", "eval_dir"):
            if cfg[key] == minicme.DEMO[key] and not os.path.exists(cfg[key]):
                raise UserError(f"{cfg[key]} not found")
    except (minicme.Busy, minicme.Unwritable):  # another first run builds them now, or none can: deleting is no fix
        raise
    except (UserError, FileNotFoundError) as e:  # data.py's messages name its flags; the demo's files are ours
        raise minicme.incomplete(e) from None
    if pretrain:
        check_before_pretraining(cfg, pretrain, resuming)
        print(f"no base model yet: pretraining a tiny LLaMA on {minicme.ROOT}/corpus.txt first "
              "(once, a few minutes)...")
        stopped = os.path.isfile(os.path.join(pretrain["out_dir"], "ckpt.pt"))  # an interrupted pretraining
        # overwrite: a finished pretraining left its log.jsonl (a user who deleted base.pt wants a new one)
        pre, ckpt = resume_config({**DEFAULTS, **pretrain, "device": cfg["device"],
                                   "init_from": "resume" if stopped else "scratch", "overwrite": not stopped})
        threads = torch.get_num_threads()  # the run's; a resumed pretraining keeps its own, as every resume does
        pre["threads"] = pre["threads"] or threads
        torch.set_num_threads(pre["threads"])
        try:
            dev = torch.device(machine.resolve_device(cfg))
            summary = run(Run(pre, device=dev, resume_with="the same command"), ckpt)
        finally:
            torch.set_num_threads(threads)
        if summary.get("interrupted"):  # run() said to run the same command again (from its checkpoint, if any)
            return summary
        os.replace(os.path.join(pretrain["out_dir"], "model.pt"), cfg["init_from"])
        os.remove(os.path.join(pretrain["out_dir"], "ckpt.pt"))  # done: the base is the result
        print(f"base model written to {cfg['init_from']}; now fine-tuning")


def check_before_pretraining(cfg, pre, resuming):
    """setup's checks on a meta model shaped as the demo's base (`pre`): a bad setting costs seconds, not minutes."""
    r = Run(cfg, device=torch.device("meta"))
    train_ds, val_ds = read_inputs(r, resuming)
    r.args = scratch_args(pre, Tokenizer(pre["tokenizer"]).vocab_size)
    with torch.device("meta"):
        model = Transformer(r.args)
        if cfg["adapter"] != "none":
            inject_targets(model, cfg)
    preflight(r, train_ds, val_ds)
    if cfg["eval_only"] and not resuming:  # scored by out_dir's adapter.pt: it must be there, and fit
        load_trained_adapter(r, model)


def train(cfg):
    """Run one configuration, under torchrun or not; returns a summary dict (also what tests read)."""
    cfg, ckpt = resume_config(cfg)
    rank, world, dev = machine.setup_distributed(cfg)
    cfg = machine.keep_slices(cfg, ckpt, machine.dry_run_world(cfg) if cfg["dry_run"] else world, rank == 0)
    threads = torch.get_num_threads()  # the caller's (a notebook's, a test's): given back when the run ends
    cfg = machine.use_cpu_threads(cfg, dev)
    try:
        with machine.sigterm_as_ctrl_c():  # the loop (run) takes it over: StopAfterStep
            if cfg["dry_run"]:  # on every rank, as a run's checks are: a refusal is each one's exit code; rank 0 says
                return check_full_config(cfg, Run(cfg, rank).say, ckpt)
            machine.check_batch_split(cfg, world)
            if rank == 0 and (stopped := build_demo(cfg, resuming=ckpt is not None)):
                return stopped  # the demo's pretraining, interrupted
            if world > 1:
                dist.barrier()
            with machine.cuda_matmul_precision(cfg["tf32"]) if dev.type == "cuda" else nullcontext():
                return run(Run(cfg, rank, world, dev), ckpt)
    finally:
        torch.set_num_threads(threads)
        files.let_go(cfg["out_dir"])  # held by claim_out_dir (rank 0): the run has ended
        if dist.is_initialized():
            dist.destroy_process_group()


RUN_FILES = ("ckpt.pt", "adapter.pt", "model.pt", "results.json")


def claim_out_dir(r, resuming, take=False):
    """Before a run trains or is re-scored: out_dir must not hold another run (unless overwrite=True replaces it) and
    must be writable. take (rank 0, once the run is sure to start) first holds out_dir until the run ends (files.hold;
    train lets go), checks it again, then removes the old run's files that overwrite=True replaces."""
    out, src, own = r.cfg["out_dir"], r.cfg["init_from"], resuming or r.cfg["eval_only"]  # own: out_dir's run is this
    # held before any check or removal; hold removes the temporaries of writes a kill cut short, the log's too
    if take and (busy := files.hold(out, RUN_FILES + ("log.jsonl",) + evaluation.rescorings(out))):
        raise UserError(f"out_dir {out} is in use by {busy}; wait for that run to end"
                        f"{'' if r.cfg['eval_only'] else ', or choose another --out_dir'}.")
    if kind := files.not_a_folder(out):
        raise UserError(f"out_dir {out} is {kind}, not a folder; choose another --out_dir.")
    for key, what in (("data_dir", "token shards"), ("eval_dir", "evaluation sets")):  # the run's files would mix in
        if r.cfg[key] and os.path.isdir(out) and os.path.isdir(r.cfg[key]) and os.path.samefile(out, r.cfg[key]):
            raise UserError(f"out_dir {out} is the {key}, and the run's files would land among its {what}; choose "
                            "another --out_dir.")
    found = [f for f in RUN_FILES + ("log.jsonl",) + evaluation.rescorings(out) if os.path.lexists(os.path.join(out, f))
             and not (f == "log.jsonl" and checkpoint.logged_nothing(out))]
    for f in found:
        if not os.path.isfile(os.path.join(out, f)):
            raise UserError(f"{os.path.join(out, f)} is not a file, but the run writes its {f} there; move it "
                            "away or choose another --out_dir.")
    if found and not own and not r.cfg["overwrite"]:
        then = "continue it with --init_from=resume, " if "ckpt.pt" in found else ""  # none: nothing to resume
        raise UserError(f"{out} already holds a run ({', '.join(found)}); {then}choose another --out_dir, or pass "
                        "--overwrite=True to replace it.")
    if found and not own and any(os.path.isfile(src) and os.path.samefile(src, os.path.join(out, f)) for f in found):
        raise UserError(f"init_from {src} is the run in {out} that overwrite=True would replace; copy it elsewhere "
                        "or choose another --out_dir.")
    # out_dir, or the folder to hold it (made once the run is sure to start: a refusal leaves nothing), takes files;
    # a re-scoring writes its results.json there
    if r.master and (blocker := files.blocked_parent(os.path.join(out, "ckpt.pt"))):
        fix = "copy the run to a folder you can write and point --out_dir at it" if own else \
            "choose another --out_dir"
        raise UserError(f"out_dir {out} can not be written: {blocker}; {fix}.")
    for f in found if take and not own else []:  # overwrite=True: nothing of the old run stays beside the new one
        os.remove(os.path.join(out, f))


def preflight(r, train_ds, val_ds):
    """What the run will need, checked before step 1 rather than hours into it."""
    cfg = r.cfg
    r.tok.check_base_vocabulary(r.args.vocab_size)
    for ds, name in ((train_ds, "training"), (val_ds, "validation")):  # no answer token: a val loss of 0 / 0
        if ds is not None and not ds.answered(cfg["max_len"]).any():
            raise UserError(f"max_len={cfg['max_len']} cuts away the answer of every {name} record (the shortest "
                            f"prompt has {int(ds.prompt_lens.min())} tokens): raise --max_len"
                            + (" or set --eval_iters=0." if ds is val_ds else "."))
    check_fits(r, r.args, max([int(ds.lengths.max(initial=0)) for ds in (train_ds, val_ds) if ds is not None]))


def check_fits(r, args, longest):
    """What must fit the base (args): a row, max_len tokens packed or the longest record's padded (cut to max_len);
    load_layers, the blocks whose expert load is shown; each evaluation set's prompts beside its answers."""
    cfg, context = r.cfg, args.context
    if min(longest if cfg["batch_mode"] == "pad" else cfg["max_len"], cfg["max_len"]) > context:
        raise UserError(f"max_len={cfg['max_len']} makes rows longer than the {context} tokens the base model "
                        f"attends over: set --max_len={context} or less.")
    if r.multi_expert and cfg["load_layers"] > args.n_layers:
        raise UserError(f"load_layers={cfg['load_layers']} but the model has {args.n_layers} layers; set "
                        f"--load_layers={args.n_layers} or less.")
    for name, (task, _) in r.eval_sets.items():
        if task.max_new_tokens > context - 2:  # a prompt cut to 1 token would be BOS alone, without its "</s>"
            raise UserError(f"evaluation set {name} generates up to {task.max_new_tokens} tokens, which leaves no room "
                            f"for its prompts (2 tokens at least: BOS and \"</s>\") in the base model's {context} "
                            "tokens; leave it out of --eval_dir.")


def datasets(cfg, tok):  # (training split, validation split or None: prepared without one, or eval_iters=0)
    train_ds = data.TokenDataset(cfg["data_dir"], "train")
    train_ds.check_tokenizer(tok)  # the shards' own: refused in seconds, not after minutes of reading a base
    has_val = train_ds.summary["splits"].get("val", {}).get("records") and cfg["eval_iters"] > 0
    return train_ds, data.TokenDataset(cfg["data_dir"], "val") if has_val else None


def read_inputs(r, resuming):
    """setup's first checks, in the order the demo's pretraining and the dry run (check_full_config) meet them too."""
    claim_out_dir(r, resuming)  # a re-scoring's refusal too comes now, not after the scoring
    r.tok = Tokenizer(r.cfg["tokenizer"])
    train_ds, val_ds = datasets(r.cfg, r.tok)
    r.eval_sets = evaluation.load_eval_sets(r.cfg) if r.cfg["eval_dir"] else {}  # before a 7B base's minutes
    return train_ds, val_ds


def setup(r, resuming):
    """Tokenizer, data, model and optimizer of a run: model (for forward and backward) is raw, the Transformer, or
    raw in DDP under torchrun without FSDP; adapters, state dicts and the optimizer read raw."""
    cfg = r.cfg
    train_ds, val_ds = read_inputs(r, resuming)
    r.data = checkpoint.data_fingerprint(cfg["data_dir"])
    raw, r.args, r.base = build_model(cfg, r.device, r.tok.vocab_size, r.world)
    preflight(r, train_ds, val_ds)
    if warning := train_ds.cut_warning(cfg["max_len"]):
        r.say(warning, file=sys.stderr)
    if cfg["fsdp"] and not dist.is_initialized():  # the recipes' setting, run without torchrun: not an error
        r.say("note: fsdp=True shards only under torchrun; this one process holds the whole model", file=sys.stderr)
    if r.master:  # only now: a setting the checks above refuse leaves the old run whole
        claim_out_dir(r, resuming, take=True)
    model = raw
    if r.world > 1 and not cfg["fsdp"]:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(raw, device_ids=[r.device.index] if r.device.type == "cuda" else None)
    opt = torch.optim.AdamW(trainable(raw), lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                            weight_decay=cfg["weight_decay"])
    return train_ds, val_ds, model, raw, opt


def load_trained_adapter(r, raw):
    """eval_only without a checkpoint: the finished run's adapter.pt into raw (only checked where raw is meta)."""
    checkpoint.load_trained_adapter(r.cfg, raw, lambda c: (adapter_kwargs(c), c["targets"]), base=r.base)


def slice_seed(seed, step, part):
    """The random seed of slice `part` of global batch `step`: dropout draws the same masks for that slice whether
    a rank or an accumulation step computes it, and on a resume (like data.get_batch's rows)."""
    return int(np.random.SeedSequence([seed, step, part]).generate_state(1, np.uint64)[0])


def check_finite(what, value, step, cfg):
    """Stop a run that diverged before its next optimizer step or checkpoint: the last one saved stays good. Named
    besides learning_rate: the settings far past their usual values (USUAL), which a resume keeps."""
    if not math.isfinite(value):
        far = " or ".join(f"--{k} ({named} is {v:.3g}, usually {USUAL[k][1]})" for k, (v, named)
                          in multipliers(cfg).items() if v > 10 * USUAL[k][0])
        if os.path.isfile(os.path.join(cfg["out_dir"], "ckpt.pt")):  # a resume keeps all of them but learning_rate
            anew = f", or start again in another --out_dir with a lower {far}" if far else ""
            kept = (f"the last good checkpoint in {cfg['out_dir']} is kept: resume it with --init_from=resume and a "
                    f"lower --learning_rate{anew}")
        else:
            kept = "nothing was saved yet: start again with a lower --learning_rate" + (f" or {far}" if far else "")
        raise UserError(f"the {what} became {value} at step {step}; {kept}.")


def train_step(r, model, raw, opt, dataset, step):
    """One optimizer step on global batch `step`, cut into processes x grad_accum equal slices (the same slices and
    dropout masks, so the same result, for 1 process with accumulation as for several without). Returns (the mean
    cross-entropy over the batch's answer tokens, balance loss aside; learning rate; real tokens over all ranks)."""
    cfg, accum = r.cfg, r.cfg["grad_accum"]
    lr = get_lr(step, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    full_bf16 = cfg["adapter"] == "none" and cfg["dtype"] == "bfloat16"
    autocast = torch.autocast(r.device.type, torch.bfloat16) if full_bf16 else nullcontext()
    balance = cfg["balance_coef"] > 0 and r.multi_expert
    totals = torch.zeros(2, device=r.device)  # (sum of answer-token losses, real tokens) on this rank
    for micro in range(accum):
        part = r.rank * accum + micro  # which slice of the global batch
        b = data.get_batch(dataset, step, cfg["batch_size"], cfg["seed"], part, r.world * accum,
                           cfg["batch_mode"], cfg["max_len"], pad_id=r.tok.pad_id, device=r.device)
        torch.manual_seed(slice_seed(cfg["seed"], step, part))  # its dropout masks, like its rows: (seed, step, part)
        last = micro == accum - 1
        if checkpoint.sharded(cfg):
            model.set_requires_gradient_sync(last)
        elif r.world > 1:
            model.require_backward_grad_sync = last
        with autocast:  # the output layer on answer positions only, unless adapted (evaluation.loss_only); full
            # training keeps all (on text, as in pretraining, nearly all are labelled; its gradient rounds otherwise)
            ce = model(b["tokens"], b["labels"], seq_ids=b.get("seq_ids"), reduction="sum",
                       loss_only=evaluation.loss_only(cfg))[1]  # not the logits: held, they would outlive backward
        loss = ce * r.world / max(b["n_answer_global"], 1)  # slices summed, processes averaged: the batch's mean
        if balance:  # each slice's own, on its tokens: their mean (/ accum here, / world by DDP and FSDP's average)
            loss = loss + cfg["balance_coef"] * teamlora.balance_loss(raw, b["valid"], cfg["balance_reduction"]) / accum
        loss.backward()
        totals += torch.stack([ce.detach().float(), b["valid"].sum().float()])
    ce_sum, n_tokens = evaluation.all_reduce_sum(totals, r.world).tolist()
    train_loss = ce_sum / max(b["n_answer_global"], 1)  # the whole batch's answer tokens, the same in every slice
    check_finite("loss", train_loss, step, cfg)
    norm = torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], cfg["grad_clip"])  # the trainable ones
    check_finite("gradient norm", float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm), step, cfg)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return train_loss, lr, n_tokens


def validate(r, model, val_ds, step, stop, log, train_loss=None):
    """Step `step`'s validation loss, printed and logged. A stop ends it between batches (evaluation.val_loss): the
    run stops with the step's checkpoint, which says so (checkpoint.stop_run), and a resume validates it first (run)."""
    vl = evaluation.val_loss(model, val_ds, r, stop)
    if vl is None:
        r.unvalidated = step
        raise KeyboardInterrupt
    check_finite("validation loss", vl, step, r.cfg)
    if r.master:
        trained = "" if train_loss is None else f"train loss {train_loss:.4f}, "  # None: a resume's first
        tqdm.write(f"step {step}: {trained}val loss {vl:.4f}")
        log.write(json.dumps({"step": step, "val_loss": vl}) + "\n")
    return vl


def run(r, ckpt=None):
    """One run: set up, resume, train with periodic validation and checkpoints, then evaluate."""
    cfg = r.cfg
    train_ds, val_ds, model, raw, opt = setup(r, ckpt is not None)
    n_train = sum(p.numel() for p in trainable(raw))
    n_base = sum(p.numel() for n, p in raw.named_parameters() if not teamlora.is_adapter(n))
    r.say(f"{cfg['adapter']}: {n_train:,} trainable parameters ({100 * n_train / n_base:.2f}% of the {n_base:,} "
          f"of the base), {len(train_ds):,} training records, {r.world} process(es) on {r.device}"
          + (f" ({torch.get_num_threads()} thread(s))" if r.device.type == "cpu" else ""))
    step = checkpoint.restore(r, raw, opt, ckpt) if ckpt is not None else 0
    summary = {"config": cfg, "model": raw, "trainable_params": n_train, "base_params": n_base, "base": r.base}
    if cfg["eval_only"]:
        if ckpt is None:
            load_trained_adapter(r, raw)
        return finish(r, model, summary | checkpoint.trained(ckpt, cfg["out_dir"]), val_ds)  # the run's step and time

    log = checkpoint.open_log(cfg["out_dir"], step, ckpt and ckpt.get("validated") is False) if r.master else None
    interactive = r.master and at_a_terminal()  # a SLURM or nohup log gets one line per log_interval instead
    bar = tqdm(total=cfg["max_iters"], initial=step, disable=not interactive, dynamic_ncols=True, desc="train")
    losses, r.clock = [], checkpoint.Clock(ckpt, cfg["out_dir"])
    saved = step if ckpt else None  # the last checkpoint's step; the last step's: no step left for a stop to end
    stop = machine.StopAfterStep(r.master, trained=lambda: saved == cfg["max_iters"]).install()
    try:
        if ckpt is not None and ckpt.get("validated") is False:  # cut short by a stop: first, as the run had it
            summary["val_loss"] = validate(r, model, val_ds, step, stop, log)
            checkpoint.save_checkpoint(r, raw, opt, step)
            if stop.agreed(r.device, r.world):
                raise KeyboardInterrupt
        since, tokens = time.time(), 0  # since the last log line or validation: what tokens/s averages over
        while step < cfg["max_iters"]:
            train_loss, lr, n_tokens = train_step(r, model, raw, opt, train_ds, step)
            step += 1
            losses.append(train_loss)
            tokens += n_tokens
            tok_s = tokens / max(time.time() - since, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            if r.master and (step % cfg["log_interval"] == 0 or step == cfg["max_iters"]):
                log.write(json.dumps({"step": step, "loss": train_loss, "lr": lr, "tokens_per_s": tok_s,
                                      "time": time.time()}) + "\n")  # line-buffered: each line reaches the file at once
                if not interactive:
                    print(f"step {step}/{cfg['max_iters']}: loss {train_loss:.4f}, lr {lr:.2e}, {tok_s:,.0f} tokens/s",
                          flush=True)
            if step % cfg["log_interval"] == 0:
                since, tokens = time.time(), 0
            if step % cfg["eval_interval"] == 0 or step == cfg["max_iters"]:
                if val_ds is not None:
                    summary["val_loss"] = validate(r, model, val_ds, step, stop, log, train_loss)
                checkpoint.save_checkpoint(r, raw, opt, step)
                since, tokens, saved = time.time(), 0, step
            if stop.agreed(r.device, r.world):  # Ctrl-C or SIGTERM on any process: all stop after this same step
                raise KeyboardInterrupt  # and save it below
        summary.update(train_losses=losses, step=step, train_seconds=r.clock.seconds())
        bar.close()
        return finish(r, model, summary, val_ds, stop)  # the scoring gives the signals back: a stop now is its own
    except KeyboardInterrupt:  # a stop in the loop (or a second Ctrl-C before the scoring gave the signals back)
        bar.close()
        return {**summary, "interrupted": True, "step": checkpoint.stop_run(r, raw, opt, stop, step, saved)}
    finally:
        stop.restore()
        bar.close()
        if log:
            log.close()


def finish(r, model, summary, val_ds=None, stop=None):
    """Score the run on its evaluation sets: evaluation.score prints the table and writes results.json (stop: the
    loop's, whose signals it gives back, see there)."""
    if r.cfg["eval_dir"] and not evaluation.score(model, r, val_ds, summary, stop):  # stopped, saying how to score
        return {**summary, "interrupted": True}  # main exits as after a stop in training
    return summary


# -------------------------------------------------------------------------------------------------
# dry run: a full configuration checked on the meta device, without weights or GPUs


def check_full_config(cfg, say=print, ckpt=None):
    """The run's checks in the order it meets them (check_batch_split, build_demo, read_inputs, build_model, preflight,
    checkpoint.restore: ckpt is a resume's), of what is there without weights: with two faults, the run's first."""
    world, micro = machine.dry_run_split(cfg)
    minicme.check_demo(cfg)  # as build_demo does first, in the run's sentences
    r = Run(cfg)
    claim_out_dir(r, ckpt is not None)
    # as read_inputs, of what is there (the README's recipe may be dry-run before its steps 1 and 2 make the shards and
    # the evaluation sets); as preflight, the tokenizer against the base's vocabulary: not a preset's, no run reads it
    tok = Tokenizer(cfg["tokenizer"]) if os.path.exists(cfg["tokenizer"]) else None
    made_with = minicme.shards_made_with(cfg["data_dir"])
    if tok and made_with:
        data.check_made_with(cfg["data_dir"], made_with, tok)
    r.eval_sets = evaluation.load_eval_sets(cfg) if cfg["eval_dir"] and os.path.exists(cfg["eval_dir"]) else {}
    src, vocab, weights = cfg["init_from"], "", None  # vocab: from scratch, what sized the embedding
    demo = src == minicme.DEMO["init_from"] and not os.path.exists(src)  # the run pretrains it first (build_demo)
    made = {**cfg, **minicme.PRETRAIN} if demo else cfg  # the settings of a base made from scratch
    name = made["model"] if src == "scratch" or not os.path.exists(src) else src  # a preset: a base not on disk
    if src == "scratch" or demo:  # as in a run, the keyword, never a folder so named; sized by the tokenizer
        size = os.path.exists(made["tokenizer"]) and Tokenizer(made["tokenizer"]).vocab_size
        args = scratch_args(made, size or (minicme.VOCAB_SIZE if demo else ModelArgs.from_name(name).vocab_size))
        why = f"that of {made['tokenizer']}" if size else "that of the tokenizer the demo builds first" if demo else \
            f"the preset's, until the tokenizer {cfg['tokenizer']} is there"
        vocab = f", vocabulary {args.vocab_size:,} ({why})"
        name = f"{name} (the demo's base, pretrained first)" if demo else name
    elif not os.path.exists(src) and not difflib.get_close_matches(src, ("scratch", "resume"), n=1):  # a typo: below
        args = ModelArgs.from_name(name)
    elif os.path.isdir(src):
        with torch.device("meta"):
            args = from_pretrained(src, device="meta").args
    else:  # ours: its model_args (weights mapped, read once: NaN check); else refused, as by a run
        args, weights = base_weights(cfg, None)
    with torch.device("meta"):
        model = Transformer(args)
    n_base = model.num_params()
    if cfg["adapter"] != "none":
        inject_targets(model, cfg)
    if tok and src != "scratch" and (demo or os.path.exists(src)):
        tok.check_base_vocabulary(args.vocab_size)
    check_fits(r, args, longest=0)  # packed rows; padded ones depend on records the dry run has not read
    if cfg["eval_only"] and ckpt is None and (src == "scratch" or demo or os.path.exists(src)):  # not a preset's
        r.base = None if weights is None else checkpoint.fingerprint(weights)  # ours, read: a folder's is unread
        load_trained_adapter(r, model)  # as a run scores it: out_dir's adapter.pt, read, fitted to the model, its base
    if ckpt is not None:  # as checkpoint.restore: the base (ours: a folder's is unread) and tokenizer ckpt.pt recorded
        checkpoint.check_resumed_base_and_tokenizer(ckpt, weights, tok, f"{cfg['out_dir']}/ckpt.pt", cfg, say)
    n_train = sum(p.numel() for p in trainable(model))
    est = memory.addressable(memory.estimate(args, n_base, n_train, cfg, world, micro), cfg, micro)
    say(f"model {name}: {n_base:,} base parameters, "
        f"{args.n_layers} layers, dim {args.dim}, FFN {args.ffn_hidden_dim}{vocab}")
    what = "none (full training)" if cfg["adapter"] == "none" else f"{cfg['adapter']} (r={cfg['r']}" + \
        (f", experts={cfg['experts']}" if cfg["adapter"] in MULTI_EXPERT else "") + f", targets={cfg['targets']})"
    say(f"adapter {what}: {n_train:,} trainable parameters = {100 * n_train / n_base:.2f}% of the base (the paper's "
        "Params%)")
    gib = {k: f"{v / 2**30:.1f}" for k, v in est.items()}
    say(f"per GPU with {world} GPU{'s' * (world > 1)}, micro-batch {micro} x {cfg['max_len']} tokens, "
        f"{'FSDP' if cfg['fsdp'] else 'DDP' if world > 1 else 'one process'}, activation checkpointing "
        f"{'on' if cfg['activation_checkpointing'] else 'off'}: about {gib['total']} GiB "
        f"(weights {gib['weights']}, adapter + AdamW {gib['adapter']}, activations {gib['activations']}, "
        f"logits up to {est['logits'] / 2**30:.1f}); a rough estimate, not a measurement")
    say(f"scoring, eval_batch_size {cfg['eval_batch_size']} x up to {cfg['max_len']} tokens: about {gib['scoring']} "
        f"GiB per GPU, {gib['kv_cache']} of it the KV cache; lower eval_batch_size where a GPU holds less")
    if busy := files.held_by(cfg["out_dir"]):  # as claim_out_dir's hold would refuse it, seen without holding it
        say(f"note: out_dir {cfg['out_dir']} is in use by {busy}: the run itself is refused until that one ends")
    return {"base_params": n_base, "trainable_params": n_train, "params_pct": 100 * n_train / n_base, "memory": est}


# -------------------------------------------------------------------------------------------------


def main(argv=None):
    code, cfg = 0, {}
    machine.end_with_study()  # a run of a study that was killed stops with it
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
        code = (machine.first_failure() or machine.INTERRUPTED) if train(cfg).get("interrupted") else 0
    except (UserError, ValueError, FileNotFoundError) as e:
        if os.environ.get("TEAMLORA_DEBUG"):
            raise
        code = machine.fail(f"train.py: error: {e}", 2)  # as the other scripts name themselves (errors.exit_with)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not machine.out_of_memory(e):
            machine.wait_to_be_stopped(2)  # torchrun: a collective that lost a process which failed first
            raise
        oom = e if isinstance(e, evaluation.ScoringOutOfMemory) else machine.out_of_memory_fix(cfg)
        code = machine.fail(f"train.py: error: {oom}", 3)
    except KeyboardInterrupt:  # outside the loop, under torchrun: it stops every process (Ctrl-C, SIGTERM, a failure)
        if "RANK" not in os.environ:
            raise
        code = machine.first_failure() or machine.INTERRUPTED  # another process's failure stopped it: its code
    machine.leave(code)


if __name__ == "__main__":
    run_script(main)
