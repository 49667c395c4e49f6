"""
What TeamLoRA costs, measured against LoRA and MoELoRA: the paper's Figure 4a (training step, inference
forward and peak memory at k = 2, 4, 8 experts of rank r_B each, every variant at the same total rank r = k r_B,
for one FFN-shaped linear and a small LLaMA), then beyond it (k up to 64), decode/prefill speed with the KV cache,
and on CUDA a 7B-shaped block stack in bf16 (tokens/s and MFU).

    python bench.py                      # everything, on the CPU (several minutes)
    python bench.py --quick              # tiny shapes: a smoke test
    python bench.py --section=layer,model --threads=2 --repeats=15
    python bench.py --device=cuda        # bf16, adds the 7B-shaped stack

Machines are noisy, so every repeat runs each variant once (in balanced orders: each variant in each place,
and after each other variant, equally often) and the tables show medians and ratios taken side by side in
one run: compare the ratios, not the milliseconds, across machines. On a CPU shared with other jobs, --threads=1
avoids OpenMP threads waiting on each other (seen here: a model step of 4.7 s with 2 threads, 0.33 s
with 1, while other tests ran).
"""
if __name__ == "__main__":  # before the imports: see errors.start_script (closed streams, Ctrl-C while importing)
    import errors
    errors.start_script()

import argparse
import contextlib
import copy
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import machine
import memory
from baselines import MoELoRALoop, team_lora_delta_loop
from errors import Parser, run_script
from model import ModelArgs, Transformer
from teamlora import TeamLoRALinear, inject

FULL = dict(tokens=2048, d_in=1024, d_out=2752, r_B=16, ks=(2, 4, 8), scale_ks=(16, 32, 64), scale_rank=64,
            model="small", batch=4, seq=256, model_r_B=4, prompts=4, prompt_len=64, new_tokens=32,
            repeats=15, scale_repeats=5, big_shapes=((512, 4096, 11008), (512, 11008, 4096), (1024, 4096, 11008),
                                                      (1024, 11008, 4096)), big_r_B=16, big_repeats=5, share_repeats=5)
QUICK = dict(tokens=64, d_in=32, d_out=88, r_B=2, ks=(2, 4, 8), scale_ks=(16,), scale_rank=16,
             model="tiny", batch=2, seq=16, model_r_B=2, prompts=2, prompt_len=8, new_tokens=4,
             repeats=3, scale_repeats=2, big_shapes=((16, 64, 176),), big_r_B=2, big_repeats=2, share_repeats=2)
SECTIONS = ("layer", "layer7b", "model", "scaling", "decode", "sharing", "loss", "cuda7b")
VARIANTS = ("LoRA", "MoELoRA loop", "TeamLoRA loop", "TeamLoRA fused", "TeamLoRA compiled")
ALPHA, DROPOUT = 32.0, 0.05
# dense bf16 tensor-core peaks (TFLOPS) from the vendors' data sheets; the first name found in the device name wins
PEAK_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10G": 70,
               "RTX 4090": 165, "RTX 3090": 71}


class TeamLoRALoop(TeamLoRALinear):
    """TeamLoRALinear computed by baselines.team_lora_delta_loop: the same parameters and function as
    the fused path, Eq. 9 and 13 one expert at a time."""

    def forward(self, x):
        delta, self.last_omega = team_lora_delta_loop(x.to(self.lora_A.dtype), self.lora_A, self.lora_B,
                                                      self.lora_router, self.lora_M, self.scaling,
                                                      self.dropout if self.training else 0.0)
        return F.linear(x, self.weight, self.bias) + delta.to(x.dtype)


class PlainLoRA(nn.Module):
    """LoRA as a few lines of one's own would write it, independent of teamlora.py: base(x) + B(dropout(A x)) alpha / r,
    LoRA's function (dropout on z = x A^T). Section 1 sets it beside LoRA = TeamLoRALinear(experts=1), the baseline
    every ratio divides by, so a reader sees whether that baseline is a slow one (which would flatter TeamLoRA)."""

    def __init__(self, base, r, experts, alpha, dropout, competition, adapter_dtype):
        super().__init__()
        kw = dict(bias=False, device=base.weight.device, dtype=adapter_dtype)
        self.base, self.drop, self.scaling, self.r, self.experts = base, nn.Dropout(dropout), alpha / r, r, 1
        self.lora_A, self.lora_B = nn.Linear(base.in_features, r, **kw), nn.Linear(r, base.out_features, **kw)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + (self.lora_B(self.drop(self.lora_A(x.to(self.lora_A.weight.dtype)))) * self.scaling).to(
            x.dtype)


# variant -> (layer class, multi-expert: True for k experts, False for 1 (LoRA), keywords)
LAYERS = {"LoRA": (TeamLoRALinear, False, {}), "LoRA, plain code": (PlainLoRA, False, {}),
          "MoELoRA loop": (MoELoRALoop, True, {}),
          "TeamLoRA loop": (TeamLoRALoop, True, {}), "TeamLoRA fused": (TeamLoRALinear, True, {}),
          "TeamLoRA compiled": (TeamLoRALinear, True, dict(compile=True))}


def layer_args(variant, r, k, dtype):
    """(positional, keyword) arguments of the variant's layer class after the base layer, as inject takes them."""
    cls, multi, kw = LAYERS[variant]
    competition = cls is not MoELoRALoop  # MoELoRA has no interaction matrix
    return (r, k if multi else 1, ALPHA, DROPOUT, competition), dict(cls=cls, adapter_dtype=dtype, **kw)


def adapt(base, variant, r, k, dtype):
    """The nn.Linear `base` with the adapter of `variant` (total rank r, k experts) around it."""
    args, kw = layer_args(variant, r, k, dtype)
    return kw.pop("cls")(base, *args, **kw)


def adapt_ffn(model, variant, r, k, dtype):
    """Adapters on every FFN linear (w1, w2, w3: the paper adapts the FFN only), all else frozen."""
    args, kw = layer_args(variant, r, k, dtype)
    return inject(model, ("w1", "w2", "w3"), *args, **kw)


def make_optimizer(module):
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)


# ----------------------------------------------------------------------------------------------------
# measuring

def timed(fn, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def orders(n):
    """Williams' balanced Latin square of n variants, one row a repeat's order: over all rows every variant takes
    every place, and follows every other variant, equally often (n rows; 2n for odd n). A call's time can depend on
    the one just before it (caches, the allocator's state); a plain rotation gave each variant the same predecessor
    in most repeats (TeamLoRA fused after the TeamLoRA loop, LoRA after fused)."""
    first = [0] + [(j + 1) // 2 if j % 2 else n - j // 2 for j in range(1, n)]  # 0, 1, n-1, 2, n-2, ...
    rows = [[(c + i) % n for c in first] for i in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 else rows


def bench(fns, repeats, device, warmup=2):
    """Seconds per call of each fn, one per repeat. Each repeat calls every fn once, in the order of the next
    row of orders(): load from elsewhere, and what ran just before, fall on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):  # AdamW state, compilation, caches
            fn()
    names, times, rows = list(fns), {name: [] for name in fns}, orders(len(fns))
    for rep in range(repeats):
        for j in rows[rep % len(rows)]:
            times[names[j]].append(timed(fns[names[j]], device))
    return times


def ms(times):
    return statistics.median(times) * 1e3


def ratio(times, ref):
    """Median over repeats of the ratio within each repeat: pairs measured seconds apart, so a
    load that comes and goes cancels out better than in a ratio of two medians."""
    return statistics.median(a / b for a, b in zip(times, ref))


def spread(times, ref):
    """The middle half (25th-75th percentile) of the per-repeat ratios: the noise around the median."""
    q = statistics.quantiles([a / b for a, b in zip(times, ref)], n=4) if len(times) > 1 else [times[0] / ref[0]] * 3
    return f"{q[0]:.2f}-{q[2]:.2f}"


def resident_bytes(*tensors):
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2: torch's profiler prints two lines in C++ on every start and stop."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_bytes(fn, resident, device):
    """Bytes alive at the peak of fn(): what was resident when it started, plus the largest rise of
    allocations during it (CUDA: max_memory_allocated; CPU: the allocator's alloc/free events as
    recorded by torch.profiler with profile_memory=True, summed in time order)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return resident + torch.cuda.max_memory_allocated() - before
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = rise = 0
    for _, nbytes in events:
        live += nbytes
        rise = max(rise, live)
    return resident + rise


def layer_steps(layer, x, grad_out, device):
    """(training step, inference forward, peak bytes of a training step) for one adapted linear."""
    opt = make_optimizer(layer)

    def train():
        layer.train()
        layer(x).backward(grad_out)  # the base weight is frozen; x requires grad, as inside a model
        opt.step()
        opt.zero_grad(set_to_none=True)
        x.grad = None

    @torch.inference_mode()
    def infer():
        layer.eval()
        layer(x)

    return train, infer, lambda: step_memory(train, layer, opt, [x, grad_out], device)


def model_steps(model, tokens, targets, device, loss_only=False):
    """(training step, peak bytes of a training step) for a model with adapters."""
    opt = make_optimizer(model)

    def train():
        model.train()
        _, loss = model(tokens, targets, loss_only=loss_only)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return train, lambda: step_memory(train, model, opt, [tokens, targets], device)


def step_memory(train, module, opt, inputs, device):
    """Peak bytes of a training step: the module's tensors, the optimizer state, the inputs, and the
    largest rise during the step."""
    for m in module.modules():  # the last forward's omega would be freed inside the measured step,
        if hasattr(m, "last_omega"):  # which the CPU profiler warns about (it never saw it allocated)
            m.last_omega = None
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return peak_bytes(train, resident_bytes(*inputs, *module.parameters(), *module.buffers(), *state), device)


# ----------------------------------------------------------------------------------------------------
# printing

def table(headers, rows):
    rows = [[h for h in headers]] + [[c if isinstance(c, str) else f"{c:.2f}" for c in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    for j, row in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print()


def check(targets, name, value, limit):
    targets.append([name, f"{value:.2f}", f"<= {limit:.2f}", "met" if value <= limit else "MISSED"])


def cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------------
# sections

def section_layer(cfg, device, dtype, targets):
    print(f"## 1. Layer level: one FFN-shaped linear, N={cfg.tokens} tokens, {cfg.d_in} -> {cfg.d_out}, "
          f"r_B={cfg.r_B}, r = k*r_B, dropout {DROPOUT}, base frozen, x requires grad")
    print("LoRA = TeamLoRALinear(experts=1): dropout on z = xA^T as in TeamLoRA (PEFT's LoRA drops x instead);\n"
          "LoRA, plain code = the same function in a few lines of its own (bench.PlainLoRA), to check the baseline;\n"
          "MoELoRA = a loop over k (A_i, B_i) pairs with dropout on x per expert, as public code does.\n"
          "train = forward + backward + AdamW step over the adapter; memory = peak bytes of a training step;\n"
          f"ms: median of {cfg.repeats} interleaved repeats; x LoRA, x MoELoRA: median of the ratios within each\n"
          "repeat, middle half: their 25th-75th percentiles.\n")
    base = nn.Linear(cfg.d_in, cfg.d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(cfg.tokens, cfg.d_in, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(cfg.tokens, cfg.d_out, device=device, dtype=dtype)
    figure, figure_infer, variants = [], [], (*cfg.variants[:1], "LoRA, plain code", *cfg.variants[1:])
    for k in cfg.ks:
        torch.compiler.reset()  # dynamo compiles once per parameter shape: start each k with a clean budget
        steps = {v: layer_steps(adapt(base, v, k * cfg.r_B, k, dtype), x, grad_out, device) for v in variants}
        train = bench({v: s[0] for v, s in steps.items()}, cfg.repeats, device)
        infer = bench({v: s[1] for v, s in steps.items()}, cfg.repeats, device)
        mem = {v: s[2]() for v, s in steps.items()}
        print(f"k = {k}, r = {k * cfg.r_B}")
        loop = train["MoELoRA loop"]
        table(["variant", "train ms", "x LoRA", "middle half", "x MoELoRA", "middle half", "infer ms", "x LoRA",
               "peak MB", "x LoRA"],
              [[v, ms(train[v]), ratio(train[v], train["LoRA"]), spread(train[v], train["LoRA"]), ratio(train[v], loop),
                spread(train[v], loop), ms(infer[v]), ratio(infer[v], infer["LoRA"]), mem[v] / 2**20,
                mem[v] / mem["LoRA"]] for v in variants])
        figure.append([f"k={k}"] + [ratio(train[v], train["LoRA"]) for v in variants])
        figure_infer.append([f"k={k}"] + [ratio(infer[v], infer["LoRA"]) for v in variants])
        fused = "TeamLoRA fused"
        check(targets, f"layer k={k}: fused train / LoRA", ratio(train[fused], train["LoRA"]), 1.05)
        check(targets, f"layer k={k}: fused / MoELoRA loop vs LoRA / loop",  # within 3% of LoRA's own ratio
              ratio(train[fused], train["MoELoRA loop"]) / ratio(train["LoRA"], train["MoELoRA loop"]), 1.03)
        check(targets, f"layer k={k}: fused infer / LoRA", ratio(infer[fused], infer["LoRA"]), 1.05)
        check(targets, f"layer k={k}: fused peak memory / LoRA", mem[fused] / mem["LoRA"], 1.02)
    print("Figure 4a: training step relative to LoRA (paper: MoELoRA 1.19, 1.62, 2.38; TeamLoRA 1.04, 1.13, 1.50)")
    table(["k"] + list(variants), figure)
    print("Inference forward relative to LoRA (paper: TeamLoRA infers 40% faster than MoELoRA)")
    table(["k"] + list(variants), figure_infer)


def section_layer7b(cfg, device, dtype, targets):
    print(f"## 1b. Layer level at LLaMA-2-7B's FFN shapes: r_B={cfg.big_r_B}, r = k*r_B, training step (forward, "
          f"backward, AdamW), median of {cfg.big_repeats} interleaved repeats, middle half of the per-repeat ratios\n")
    variants = ("LoRA", "MoELoRA loop", "TeamLoRA fused")
    rows = []
    for n, d_in, d_out in cfg.big_shapes:
        base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
        x = torch.randn(n, d_in, device=device, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(n, d_out, device=device, dtype=dtype)
        for k in (2, 4, 8):
            steps = {v: layer_steps(adapt(base, v, k * cfg.big_r_B, k, dtype), x, grad_out, device) for v in variants}
            t = bench({v: s[0] for v, s in steps.items()}, cfg.big_repeats, device, warmup=1)
            mem = {v: steps[v][2]() for v in ("LoRA", "TeamLoRA fused")}
            fused, lora, loop = t["TeamLoRA fused"], t["LoRA"], t["MoELoRA loop"]
            rows.append([f"N={n}, {d_in}->{d_out}", str(k), ms(lora), ms(loop), ms(fused), ratio(fused, lora),
                         spread(fused, lora), ratio(loop, lora), ratio(fused, loop), spread(fused, loop),
                         mem["TeamLoRA fused"] / mem["LoRA"]])
            check(targets, f"7B FFN N={n} {d_in}->{d_out} k={k}: fused train / LoRA", ratio(fused, lora), 1.03)
            check(targets, f"7B FFN N={n} {d_in}->{d_out} k={k}: fused / loop vs LoRA / loop",
                  ratio(fused, loop) / ratio(lora, loop), 1.03)
            check(targets, f"7B FFN N={n} {d_in}->{d_out} k={k}: fused peak memory / LoRA",
                  mem["TeamLoRA fused"] / mem["LoRA"], 1.02)
        del base, x, grad_out
    table(["shape", "k", "LoRA ms", "MoELoRA ms", "fused ms", "fused/LoRA", "middle half", "MoELoRA/LoRA",
           "fused/MoELoRA", "middle half", "peak mem/LoRA"], rows)


def section_model(cfg, device, dtype, targets):
    args = ModelArgs.from_name(cfg.model, max_seq_len=max(cfg.seq, cfg.prompt_len + cfg.new_tokens))
    print(f"## 2. Model level: LLaMA '{cfg.model}' (dim {args.dim}, {args.n_layers} layers, "
          f"FFN {args.ffn_hidden_dim}), "
          f"batch {cfg.batch} x {cfg.seq} tokens, adapters on w1, w2, w3, r_B={cfg.model_r_B}, r = k*r_B")
    print(f"training step (forward with loss, backward, AdamW): ms (median of {cfg.repeats}) and (x LoRA, middle half "
          "of the per-repeat ratios); 'TeamLoRA compiled' compiles the adapter's fused path only, 'blocks compiled'\n"
          "compiles each transformer block with its adapters, as train.py --compile=True does; the last column: peak\n"
          "memory of a TeamLoRA fused step over a LoRA step\n")
    torch.manual_seed(0)
    base = Transformer(args).to(device, dtype)
    tokens = torch.randint(args.vocab_size, (cfg.batch, cfg.seq), device=device)
    rows, variants = [], cfg.variants
    for k in cfg.ks:
        torch.compiler.reset()
        models = {v: adapt_ffn(copy.deepcopy(base), v, k * cfg.model_r_B, k, dtype) for v in variants}
        if "TeamLoRA compiled" in variants:  # train.py --compile=True: every block compiled, adapters inside
            models["blocks compiled"] = adapt_ffn(copy.deepcopy(base), "TeamLoRA fused", k * cfg.model_r_B, k, dtype)
            for block in models["blocks compiled"].layers:
                block.compile(dynamic=True)
        steps = {v: model_steps(m, tokens, tokens.roll(-1, 1), device) for v, m in models.items()}
        train = bench({v: s[0] for v, s in steps.items()}, cfg.repeats, device)
        memory = steps["TeamLoRA fused"][1]() / steps["LoRA"][1]()
        cells = [f"{ms(train[v]):.1f} ({ratio(train[v], train['LoRA']):.2f}x, {spread(train[v], train['LoRA'])})"
                 for v in models]
        rows.append([f"k={k}, r={k * cfg.model_r_B}", *cells, memory])
        check(targets, f"model k={k}: fused train / LoRA", ratio(train["TeamLoRA fused"], train["LoRA"]), 1.05)
        check(targets, f"model k={k}: fused peak memory / LoRA", memory, 1.02)
        if "blocks compiled" in models:
            check(targets, f"model k={k}: blocks compiled / fused eager",
                  ratio(train["blocks compiled"], train["TeamLoRA fused"]), 1.00)
    table(["k"] + list(models) + ["fused peak mem/LoRA"], rows)


def section_scaling(cfg, device, dtype):
    print(f"## 3. Beyond the paper: many experts, training step of the layer of section 1 "
          f"(median of {cfg.scale_repeats})\n")
    base = nn.Linear(cfg.d_in, cfg.d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(cfg.tokens, cfg.d_in, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(cfg.tokens, cfg.d_out, device=device, dtype=dtype)
    variants = ("LoRA", "MoELoRA loop", "TeamLoRA loop", "TeamLoRA fused")
    rows = []
    for regime, ranks in ((f"fixed r={cfg.scale_rank}", [cfg.scale_rank] * len(cfg.scale_ks)),
                          (f"fixed r_B={cfg.r_B}", [k * cfg.r_B for k in cfg.scale_ks])):
        for k, r in zip(cfg.scale_ks, ranks):
            steps = {v: layer_steps(adapt(base, v, r, k, dtype), x, grad_out, device) for v in variants}
            t = bench({v: s[0] for v, s in steps.items()}, cfg.scale_repeats, device, warmup=1)
            mem = {v: steps[v][2]() / 2**20 for v in ("TeamLoRA loop", "TeamLoRA fused")}
            rows.append([regime, str(k), str(r), *[ms(t[v]) for v in variants], ratio(t["TeamLoRA fused"], t["LoRA"]),
                         ratio(t["TeamLoRA loop"], t["TeamLoRA fused"]), mem["TeamLoRA loop"], mem["TeamLoRA fused"]])
    table(["regime", "k", "r", "LoRA ms", "MoELoRA ms", "loop ms", "fused ms", "fused/LoRA", "loop/fused",
           "loop MB", "fused MB"], rows)


def section_decode(cfg, device, dtype):
    args = ModelArgs.from_name(cfg.model, max_seq_len=max(cfg.seq, cfg.prompt_len + cfg.new_tokens))
    k = 4
    print(f"## 4. Prefill and decode with the KV cache (model.generate, greedy): LLaMA '{cfg.model}', "
          f"{cfg.prompts} prompts of {cfg.prompt_len} tokens, {cfg.new_tokens} new tokens, "
          f"FFN adapters r={k * cfg.model_r_B}")
    print("LoRA can be merged into W0 (base cost) or run unmerged; TeamLoRA cannot merge (its router weighs the\n"
          "experts per token), so each adapted linear adds x A^T, the router and z B^T to every decoded token.\n")
    torch.manual_seed(0)
    base = Transformer(args).to(device, dtype).eval()
    models = {"base model": base}
    torch.compiler.reset()
    models.update({v: adapt_ffn(copy.deepcopy(base), v, k * cfg.model_r_B, k, dtype)
                   for v in ("LoRA", "TeamLoRA fused", "TeamLoRA compiled") if v in cfg.variants})
    models["LoRA merged"] = copy.deepcopy(models["LoRA"])
    for m in models["LoRA merged"].modules():
        if isinstance(m, TeamLoRALinear):
            m.merge()  # LoRA folds into W0: the base model's cost
    prompts = torch.randint(args.vocab_size, (cfg.prompts, cfg.prompt_len)).tolist()
    prefill = bench({v: lambda m=m: m.generate(prompts, 1) for v, m in models.items()}, cfg.repeats, device)
    full = bench({v: lambda m=m: m.generate(prompts, cfg.new_tokens) for v, m in models.items()}, cfg.repeats, device)
    # decoding time: generating new_tokens minus generating 1 (the prefill and its sample)
    decode = {v: [a - b for a, b in zip(full[v], prefill[v])] for v in models}
    rows = [[v, cfg.prompts * cfg.prompt_len / statistics.median(prefill[v]), ratio(prefill["base model"], prefill[v]),
             cfg.prompts * (cfg.new_tokens - 1) / statistics.median(decode[v]), ratio(decode["base model"], decode[v])]
            for v in models]
    table(["variant", "prefill tok/s", "speed x base", "decode tok/s", "speed x base"], rows)


def section_sharing(cfg, device, dtype):
    if device.type != "cpu":
        return
    import subprocess
    args = ModelArgs.from_name(cfg.model, max_seq_len=cfg.seq)
    print(f"## 6. Sharing the CPU: the model-level TeamLoRA training step of section 2 (k=4), alone and beside one\n"
          f"other busy process, at each thread count (median of {cfg.share_repeats}; train.py's threads=0 takes the\n"
          "cores not already busy when a run starts)\n")
    torch.manual_seed(0)
    model = adapt_ffn(Transformer(args).to(device, dtype), "TeamLoRA fused", 4 * cfg.model_r_B, 4, dtype)
    tokens = torch.randint(args.vocab_size, (cfg.batch, cfg.seq), device=device)
    step = model_steps(model, tokens, tokens.roll(-1, 1), device)[0]
    threads, counts, rows = torch.get_num_threads(), sorted({1, torch.get_num_threads()}), []
    for busy in (False, True):
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            times = {}
            for n in counts:
                torch.set_num_threads(n)
                times[n] = bench({n: step}, cfg.share_repeats, device, warmup=1)[n]
        finally:
            if neighbour:
                neighbour.kill()
                neighbour.wait()
        rows.append(["one busy neighbour" if busy else "alone"] + [ms(times[n]) for n in counts])
    torch.set_num_threads(threads)
    table(["machine"] + [f"{n} thread(s) ms" for n in counts], rows)


def section_loss(cfg, device, dtype):
    answer, preset_vocab = cfg.seq // 8, ModelArgs.from_name(cfg.model).vocab_size
    print(f"## 7. The loss on the answers only: the model-level TeamLoRA training step of section 2 (k=4), with\n"
          f"instruction-shaped targets (each row's last {answer} of {cfg.seq} positions labelled, the prompt not):\n"
          "the output layer on every position against on the labelled ones (train.py with adapters: loss_only=True);\n"
          f"ms (median of {cfg.repeats}; x every position, middle half) and peak memory, at the preset's vocabulary\n"
          "and at LLaMA-3's\n")
    rows = []
    for vocab in (preset_vocab, 128256):
        torch.manual_seed(0)
        args = ModelArgs.from_name(cfg.model, max_seq_len=cfg.seq, vocab_size=vocab)
        model = adapt_ffn(Transformer(args).to(device, dtype), "TeamLoRA fused", 4 * cfg.model_r_B, 4, dtype)
        tokens = torch.randint(vocab, (cfg.batch, cfg.seq), device=device)
        targets = tokens.roll(-1, 1).masked_fill(torch.arange(cfg.seq, device=device) < cfg.seq - answer, -100)
        steps = {name: model_steps(model, tokens, targets, device, loss_only=only)
                 for name, only in (("every position", False), ("labelled only", True))}
        times = bench({n: s[0] for n, s in steps.items()}, cfg.repeats, device)
        full, only = (times[n] for n in steps)
        peak = {n: s[1]() for n, s in steps.items()}
        rows.append([f"{vocab:,}", ms(full), f"{ms(only):.1f} ({ratio(only, full):.2f}x, {spread(only, full)})",
                     peak["every position"] / 2**20, f"{peak['labelled only'] / 2**20:.1f} "
                     f"({peak['labelled only'] / peak['every position']:.2f}x)"])
    table(["vocabulary", "every position ms", "labelled only ms", "every position peak MiB",
           "labelled only peak MiB"], rows)


def section_cuda7b(cfg, device, peak_tflops):
    """A 7B-shaped stack: 4 blocks by default; --full7b: all 32 blocks, micro-batch 4 x 1024, activation
    checkpointing (--no-checkpointing: none) and fp32 adapters (config/cme_llama2_7b.py's per-GPU setting, on one
    GPU without FSDP). --quick runs a tiny one on the CPU too, as a smoke test of this code."""
    if device.type != "cuda" and not cfg.quick:
        print("## 5. 7B-shaped block stack: skipped (it needs --device=cuda)\n")
        return
    if cfg.quick:
        args, batch, seq, k, r = ModelArgs.from_name("tiny", max_seq_len=128), 2, 128, 4, 16  # batch 2: tok/s counts it
    else:
        n_layers, batch, seq, k, r = (32, 4, 1024, 4, 128) if cfg.full7b else (4, 2, 1024, 4, 64)
        args = ModelArgs.from_name("llama2-7b", n_layers=n_layers, max_seq_len=seq)
    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    peak = peak_tflops or next((p for key, p in PEAK_TFLOPS.items() if key in name), None)
    adapter_dtype = torch.float32 if cfg.full7b else torch.bfloat16
    print(f"## 5. 7B-shaped stack on {name}: bf16, dim {args.dim}, FFN {args.ffn_hidden_dim}, {args.n_layers} "
          f"layers, vocab {args.vocab_size}, batch {batch} x {seq}, FFN adapters r={r} (TeamLoRA k={k}) in "
          f"{str(adapter_dtype)[6:]}, activation checkpointing {'on' if cfg.checkpointing else 'off'}")
    variants = ["LoRA", "TeamLoRA fused"] + ["LoRA blocks compiled", "blocks compiled"] * (
        "TeamLoRA compiled" in cfg.variants)  # each compiled against its own eager and against LoRA's compiled
    torch.compiler.reset()
    models = {}
    for v in variants:  # the same base weights in each, from the same seed
        torch.manual_seed(0)
        with torch.device(device):
            base = Transformer(args, gradient_checkpointing=cfg.checkpointing).to(torch.bfloat16)
        lora = v.startswith("LoRA")
        models[v] = adapt_ffn(base, "LoRA" if lora else "TeamLoRA fused", r, 1 if lora else k, adapter_dtype)
        if v.endswith("blocks compiled"):  # as train.py --compile=True does
            for block in models[v].layers:
                block.compile(dynamic=True)
    tokens = torch.randint(args.vocab_size, (batch, seq), device=device)
    steps = {v: model_steps(m, tokens, tokens.roll(-1, 1), device) for v, m in models.items()}
    train = bench({v: s[0] for v, s in steps.items()}, cfg.repeats, device)
    infer = bench({v: torch.inference_mode()(lambda m=m: m.eval()(tokens)) for v, m in models.items()}, cfg.repeats,
                  device)  # eval: no dropout (each training step puts train mode back)
    # model FLOPs per token: the base is frozen, so training does the forward (2 per weight) and the input
    # gradients (2), no weight gradients; adapters 6 per parameter; causal attention 2*T*dim per layer
    # forward, 3x that to train; recomputed forwards (activation checkpointing) are not counted
    P = sum(m.weight.numel() for m in models["LoRA"].modules() if isinstance(m, nn.Linear))  # base matmuls
    attention = 2 * seq * args.dim * args.n_layers
    rows = []
    for v, m in models.items():
        P_adapter = sum(p.numel() for p in m.parameters() if p.requires_grad)
        tps_train, tps_infer = batch * seq / statistics.median(train[v]), batch * seq / statistics.median(infer[v])
        mfu = [f"{100 * flops * tps / (peak * 1e12):.1f}" if peak else "?" for flops, tps in
               ((4 * P + 6 * P_adapter + 3 * attention, tps_train), (2 * P + 2 * P_adapter + attention, tps_infer))]
        lora = v.startswith("LoRA")  # the dry run's arithmetic for this setting, against the measured peak
        estimate = memory.estimate(args, m.num_params() - P_adapter, P_adapter, dict(
            dtype="bfloat16", fsdp=False, max_len=seq, r=r, experts=1 if lora else k, eval_batch_size=1,
            adapter="lora" if lora else "teamlora", targets="w1,w2,w3", activation_checkpointing=cfg.checkpointing),
            1, batch)["total"]
        measured = steps[v][1]()
        rows.append([v, tps_train, mfu[0], ratio(train[v], train["LoRA"]), tps_infer, mfu[1],
                     ratio(infer[v], infer["LoRA"]), measured / 2**30, estimate / measured])
    unknown = "" if peak else " (unknown peak: pass --peak_tflops)"
    print(f"MFU against {peak if peak else '?'} TFLOPS bf16 dense{unknown}; "
          "FLOPs per token: train 4P + 6P_adapter + 6*T*dim*layers, inference 2P + 2P_adapter + 2*T*dim*layers\n")
    table(["variant", "train tok/s", "MFU %", "time x LoRA", "infer tok/s", "MFU %", "time x LoRA",
           "train peak GiB", "dry run / peak"], rows)
    if "blocks compiled" in models:
        t, i = (ratio(d["blocks compiled"], d["LoRA blocks compiled"]) for d in (train, infer))
        print(f"\nTeamLoRA / LoRA, both with blocks compiled: train {t:.2f}, inference {i:.2f}")


def run_sections(cfg, sections, device, dtype, peak_tflops):
    """Run the chosen sections in order; returns the targets they checked."""
    targets = []
    if "layer" in sections:
        section_layer(cfg, device, dtype, targets)
    if "layer7b" in sections:
        section_layer7b(cfg, device, dtype, targets)
    if "model" in sections:
        section_model(cfg, device, dtype, targets)
    if "scaling" in sections:
        section_scaling(cfg, device, dtype)
    if "decode" in sections:
        section_decode(cfg, device, dtype)
    if "sharing" in sections:
        section_sharing(cfg, device, dtype)
    if "loss" in sections:
        section_loss(cfg, device, dtype)
    if "cuda7b" in sections:
        section_cuda7b(cfg, device, peak_tflops)
    return targets


def main(argv=None):
    parser = Parser(description="TeamLoRA vs LoRA vs MoELoRA: time and memory, side by side.")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a smoke test")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for torch")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (median reported)")
    parser.add_argument("--section", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's bf16 peak, for MFU")
    parser.add_argument("--full7b", action="store_true", help="section cuda7b at LLaMA-2-7B's full depth: 32 "
                        "blocks, micro-batch 4 x 1024, activation checkpointing, fp32 adapters (about 18.6 GiB, by the "
                        "dry run's arithmetic)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="--full7b: activation checkpointing, as the 7B recipes run; --no-checkpointing: none, "
                        "no recomputed forward (about 24 GiB more activations in a step, by the dry run's "
                        "arithmetic)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="CUDA: float32 matmuls (fp32 adapters) on TF32 tensor cores, as train.py's tf32=True")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="include the torch.compile variant (its warm-up compiles for a minute or more on a CPU)")
    args = parser.parse_args(argv)
    sections = args.section.split(",")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}: choose from {','.join(SECTIONS)}")
    if args.threads < 1 or (args.repeats is not None and args.repeats < 1):
        parser.error("--threads and --repeats must be at least 1")
    if args.threads > 1024:  # train.py's limit; torch.set_num_threads(99999) ends the process (a segmentation fault)
        parser.error(f"--threads={args.threads} is more than 1024; give at most one thread per core")
    if args.full7b and "cuda7b" not in sections:
        parser.error(f"--full7b applies to section cuda7b, which --section={args.section} leaves out")
    if args.full7b and args.device != "cuda" and not args.quick:  # section cuda7b skips the CPU: it would be ignored
        parser.error("--full7b applies to section cuda7b, which runs on --device=cuda (or tiny, as --quick's test)")
    if args.device == "cuda" and set(sections) == {"sharing"}:  # it measured nothing and printed nothing there
        parser.error("section sharing times threads sharing a CPU's cores; run it without --device=cuda")
    if not args.checkpointing and not args.full7b:
        parser.error("--no-checkpointing applies to --full7b only (the 4-block stack never checkpoints)")
    if args.peak_tflops is not None and not 0 < args.peak_tflops < float("inf"):
        parser.error(f"--peak_tflops must be a positive number (the GPU's bf16 peak), got {args.peak_tflops}")
    if args.peak_tflops is not None and ("cuda7b" not in sections or args.device != "cuda" and not args.quick):
        parser.error("--peak_tflops applies to section cuda7b's MFU, which runs on --device=cuda (or tiny, as "
                     "--quick's test); give --device=cuda, or leave --peak_tflops out")  # was ignored, minutes later
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"skipped: --device=cuda asks for a GPU but CUDA is not available to this torch ({torch.__version__}); "
              "run without --device=cuda for the CPU benchmark.")
        return
    cfg = SimpleNamespace(**(QUICK if args.quick else FULL), quick=args.quick, full7b=args.full7b,
                          checkpointing=args.full7b and args.checkpointing,
                          variants=[v for v in VARIANTS if args.compile or v != "TeamLoRA compiled"])
    if args.repeats:
        cfg.repeats = cfg.scale_repeats = args.repeats
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"# python {' '.join(sys.argv if argv is None else ['bench.py'] + list(argv))}")
    matmuls = f"{'TF32' if args.tf32 else 'IEEE'} float32 matmuls, " if device.type == "cuda" else ""
    print(f"# {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {dtype}, {matmuls}"
          f"load average {os.getloadavg()[0]:.2f}\n")
    with machine.cuda_matmul_precision(args.tf32) if device.type == "cuda" else contextlib.nullcontext():
        targets = run_sections(cfg, sections, device, dtype, args.peak_tflops)
    if targets:
        print("## Targets (ratios measured side by side in this run)" +
              (": --quick uses tiny shapes, where fixed per-op costs dominate; the targets are for the full run"
               if cfg.quick else ""))
        table(["target", "measured", "limit", ""], targets)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    run_script(main)
