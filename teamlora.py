"""TeamLoRA (Lin et al., ACL 2025, arXiv 2408.09856) as a drop-in replacement for nn.Linear.

    h = x W0^T + b + sum_i omega_i(x) * scaling * z_i B_i^T          (Eq. 13)
    z = dropout(x A^T) split into k segments z_i of width r_B = r/k    (Eq. 8, 9: collaboration)
    omega = k * P / rowsum(P),  P = phi (I + M),  phi = softmax(x W_r^T)   (Eq. 11, 12: competition)

One shared A (r x d_in) feeds k experts B_i (d_out x r_B), B = [B_1 ... B_k]: as sum_i omega_i z_i B_i^T = (z * omega
repeated r_B times) B^T, two GEMMs and a d_in -> k router cost one LoRA. omega sums to k, the scaling is alpha / r_B
(the authors'): at equal alpha, k times a rank-r LoRA's update; tune each method's lr. Torch only; loops: baselines.py.
"""
import functools
import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-6  # smallest magnitude allowed for the row sum of phi (I + M), sign kept (see expert_weights_t)


def expert_weights_t(logits_t, M):
    """omega^T from router logits^T = W_r x^T, both (k, N): tokens last (as (N, k), the softmax is 15-30x slower)."""
    phi = logits_t.to(torch.promote_types(logits_t.dtype, torch.float32)).softmax(0)  # Eq. 11: phi^T (k, N)
    if M is None:  # no M: collaboration only (Table 4), or MoELoRA
        return phi * phi.shape[0]
    with torch.autocast("cpu" if phi.is_meta else phi.device.type, enabled=False):  # meta has no autocast
        adj = torch.addmm(phi, M.t().to(phi.dtype), phi)  # Eq. 12, P^T = (phi + phi M)^T: one GEMM, kept float32
    s = adj.sum(0, keepdim=True)  # a learned M can push it through 0: a magnitude under EPS becomes EPS, sign kept
    return adj / torch.where(s.abs() < EPS, torch.where(s < 0, -EPS, EPS), s) * phi.shape[0]  # 0 -> +EPS


class _RouterInA(torch.autograd.Function):
    """z^T, logits^T = [A; W_r] x^T: one GEMM reads x, one writes grad x. Plain autograd would keep the concatenation
    [A; W_r] until backward (+2% peak memory at 11008 -> 4096, k = 8); this backward builds it again instead."""
    generate_vmap_rule, setup_context = True, staticmethod(lambda ctx, inputs, out: ctx.save_for_backward(*inputs))

    @staticmethod
    def forward(x2, A, router):  # no ctx (setup_context saves x2, A, router): torch.func's grad and vmap can run it
        return torch.cat([A, router]).mm(x2.t())  # (r + k, N): a GEMM to (N, r + k) pads r + k to the SIMD width

    @staticmethod
    def backward(ctx, grad):  # out = W x2^T, W = [A; W_r]: grad x2 = grad^T @ W (N, d_in), grad W = grad @ x2
        x2, A, router = ctx.saved_tensors  # W, rebuilt below, is freed before grad W; autograd casts the grads back
        grad_x = grad.t().mm(torch.cat([A, router]).to(grad.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, *grad.mm(x2.to(grad.dtype)).split([A.shape[0], router.shape[0]])  # grad A, grad W_r


def team_lora_delta(x, A, B, router, M, scaling, dropout):
    """The fused adapter path: x (..., d_in) -> (delta (..., d_out), omega (..., k); None for one expert)."""
    if router is None:  # one expert: plain LoRA. Dropout behind an `if`: as F.dropout's training flag, a
        z = F.linear(x, A)  # compiled graph's symbolic `dropout > 0` would break it in two
        return F.linear((F.dropout(z, dropout) if dropout > 0 else z) * scaling, B), None
    (r, k), lead = (A.shape[0], router.shape[0]), x.shape[:-1]
    zt, logits_t = _RouterInA.apply(x.reshape(lead.numel(), x.shape[-1]), A, router).split([r, k])
    zt = F.dropout(zt, dropout) if dropout > 0 else zt  # Eq. 9's dropout: on z_i, not x
    omega_t = expert_weights_t(logits_t, M)  # (k, N); Eq. 13's scaling joins it below: k products per token, not r
    zw = (zt.view(k, r // k, -1) * (omega_t * scaling).to(zt.dtype).unsqueeze(1)).view(r, -1)  # (r, N): z_i omega_i
    return F.linear(zw.t(), B).view(*lead, B.shape[0]), omega_t.t().reshape(*lead, k)  # Eq. 9 + 13: one GEMM


@functools.cache  # the fused path compiled once per device type; eager on a CPU without a C++ compiler
def _fused_compiled(device_type):
    cxx = [os.path.join(d, c) for d in os.get_exec_path() for c in (os.environ.get("CXX"), "g++", "clang++") if c]
    if device_type == "cpu" and not any(os.access(c, os.X_OK) for c in cxx):
        warnings.warn("TeamLoRA: torch.compile on CPU needs a C++ compiler (install g++ or set CXX); running eagerly.")
        return team_lora_delta
    return torch.compile(team_lora_delta, dynamic=True)  # dynamic: one graph for every sequence length


class TeamLoRALinear(nn.Linear):
    """nn.Linear plus a TeamLoRA adapter, on the base's `weight` and `bias` (never copied): base checkpoints load."""

    def __init__(self, base: nn.Linear, r=8, experts=4, alpha=16.0, dropout=0.05, competition=True,
                 adapter_dtype=torch.float32, compile=False):  # compile: the fused path (inlined in a compiled model)
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second base weight
        if (k := max(experts, 1)) != experts or r <= 0 or r % k or k % 1:  # k >= 1: the message divides r by it
            raise ValueError(f"TeamLoRA needs experts >= 1 and r to be a positive multiple of experts, got r={r}, "
                             f"experts={experts}: choose integers r = experts * r_B (e.g. r={k * max(1, r // k)}).")
        self.in_features, self.out_features, self.training = base.in_features, base.out_features, base.training
        self.weight, self.bias, kw = base.weight, base.bias, dict(device=base.weight.device, dtype=adapter_dtype)
        self.r, self.experts, self.competition = int(r), int(experts), competition and experts > 1  # whole: 8.0 is 8
        self.scaling, self.dropout, self.compile = alpha / (r // experts), dropout, compile  # the authors' alpha / r_B
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, **kw))  # [B_1 ... B_k]
        self.lora_router = nn.Parameter(torch.empty(self.experts, self.in_features, **kw)) if experts > 1 else None
        self.lora_M = nn.Parameter(torch.empty(self.experts, self.experts, **kw)) if self.competition else None
        self.last_omega, self.merged = None, False  # omega (..., k) of the last forward: balance loss, load
        self.reset_lora_parameters()

    def initial_lora_state(self):
        """The authors' initialisation, drawn on the CPU in a fixed order: the same whatever the device or sharding."""
        kaiming = lambda p: nn.init.kaiming_uniform_(torch.empty(p.shape), a=math.sqrt(5))
        M = lambda p: torch.empty(p.shape).uniform_(-0.1, 0.1).fill_diagonal_(0.0)  # U(-0.1, 0.1), zero diagonal
        init = {"lora_A": kaiming, "lora_B": lambda p: torch.zeros(p.shape), "lora_router": kaiming, "lora_M": M}
        return {n: f(getattr(self, n)) for n, f in init.items() if getattr(self, n) is not None}  # B = 0: no change

    def reset_lora_parameters(self):
        """(Re)initialise the adapter in place, e.g. after `to_empty()` on a meta-built model; refused while merged."""
        load_adapter_state_dict(self, self.initial_lora_state())

    @torch.no_grad()
    def merge(self, merged=True):
        """Fold LoRA (one expert) into `weight`: serve at the base's cost; merge(False) unfolds it (to load another)."""
        if self.lora_router is not None:
            raise ValueError(f"only one expert (LoRA) can merge; the router weighs these {self.experts} per token.")
        if merged != self.merged:
            delta = (self.lora_B.double() @ self.lora_A.double()) * self.scaling
            self.weight += (delta if merged else -delta).to(self.weight.dtype)
            self.merged = merged

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"TeamLoRALinear expects inputs (..., {self.in_features}), got {tuple(x.shape)}.")
        if self.merged:  # for inference: the adapter is inside weight, where training (no gradient, no dropout) is lost
            if self.training and torch.is_grad_enabled() and self.lora_A.requires_grad:
                raise ValueError("a merged LoRA would not train: merge(False) to train it, or eval() to serve it.")
            return F.linear(x, self.weight, self.bias)
        fused = team_lora_delta if not self.compile or torch.compiler.is_compiling() else _fused_compiled(x.device.type)
        delta, self.last_omega = fused(x.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.lora_router,
                                       self.lora_M, self.scaling, self.dropout if self.training else 0.0)
        out = F.linear(x, self.weight, self.bias)  # after the adapter, so backward computes the base's grad x
        return out + delta.to(out.dtype)  # first and adds the adapter's into it in place

    def extra_repr(self):
        return f"{super().extra_repr()}, r={self.r}, experts={self.experts}, competition={self.competition}"

    def __getstate__(self):  # copy.deepcopy, pickle: not the last forward's omega, a tensor of its autograd graph
        return {**super().__getstate__(), "last_omega": None}


def inject(model, targets, r, experts, alpha, dropout=0.05, competition=True, cls=None, **kw):
    """Replace every nn.Linear whose name ends with one of `targets` (e.g. ("w1", "w2", "w3") or ("gate_proj",
    "up_proj", "down_proj")) by TeamLoRALinear(it, r, ..., **kw) (or `cls`), freeze all else. experts=1: LoRA."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    every = list(model.named_modules(remove_duplicate=False))  # a module used in two places: under both names
    found = {id(m): (n, m) for n, m in every if any(n == t or n.endswith("." + t) for t in targets)}  # each once
    if not found:
        raise ValueError(f"no module name ends with any of targets={list(targets)}; linear layers of this model are "
                         f"named like {[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]}.")
    for name, module in found.values():  # every target checked before any is replaced: a refusal changes nothing
        odd = [n for n, t in module.state_dict().items() if n not in ("weight", "bias") or not t.is_floating_point()]
        if odd or not isinstance(module, nn.Linear):  # TeamLoRALinear keeps a float weight and bias, nothing else
            what = "already has an adapter" if isinstance(module, TeamLoRALinear) else f"is a {type(module).__name__}"
            raise ValueError(f"target module '{name}' {what}, not a plain nn.Linear (its tensors besides a float "
                             f"weight and bias: {odd[:3]}): leave it out of targets (dequantise a quantised one).")
    new = {i: (cls or TeamLoRALinear)(m, r, experts, alpha, dropout, competition, **kw) for i, (_, m) in found.items()}
    for name, m in [(n, m) for n, m in every if id(m) in new]:  # each place of each, targeted or not: one adapter
        model.set_submodule(name, new[id(m)].train(m.training))  # keeps the replaced layer's mode
    for n, p in model.named_parameters():
        p.requires_grad_(is_adapter(n))
    return model


def is_adapter(name):
    return name.rpartition(".")[2].startswith("lora_")


def adapter_state_dict(model):
    """Adapter tensors by name less wrappers' parts (torch.compile's, checkpoint_wrapper's, DDP's `module.`)."""
    return {n.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "").removeprefix("module."): p.detach()
            for n, p in model.named_parameters() if is_adapter(n)}


def load_adapter_state_dict(model, state):
    """Copy adapter tensors into an injected model, wrapped or not; names and shapes must match exactly."""
    if merged := [n or "the layer" for n, m in model.named_modules() if isinstance(m, TeamLoRALinear) and m.merged]:
        raise ValueError(f"{merged[:3]} hold a merged adapter: call merge(False) on them before loading another.")
    missing, unexpected = sorted((own := adapter_state_dict(model)).keys() - state), sorted(state.keys() - own)
    shapes = [f"{n} {tuple(state[n].shape)} vs model {tuple(own[n].shape)}"
              for n in sorted(own.keys() & state.keys()) if state[n].shape != own[n].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"the adapter does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"shape mismatches {shapes[:3]}): inject as in training (targets, r, experts, competition).")
    for mine, t in [(own[n], t.to(own[n].device, own[n].dtype)) for n, t in state.items()]:  # all converted first:
        mine.copy_(t)  # a value that cannot be (a numpy array, a meta tensor) fails before anything is overwritten


def _omegas(model, mask):
    """(name, omega of valid tokens (N, k)) for every multi-expert layer that ran a forward."""
    for name, m in model.named_modules():
        if isinstance(m, TeamLoRALinear) and (om := m.last_omega) is not None:
            if mask is not None and mask.shape != om.shape[:-1]:
                raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the tokens {tuple(om.shape[:-1])}.")
            yield name, (om if mask is None else om[mask.to(om.device, torch.bool)]).reshape(-1, om.shape[-1])


def balance_loss(model, mask=None, reduction="mean"):
    """The authors' balance loss, per layer mean_f (mean_tokens(omega_f) - 1)^2 (their 1/k for 1 only adds (1 - 1/k)^2:
    omega sums to k), averaged (summed: their harness) over layers; `mask` (True: real) drops padding."""
    per_layer = [((om.mean(0) - 1.0) ** 2).mean() for _, om in _omegas(model, mask) if len(om)] or [torch.zeros(())]
    return torch.stack(per_layer).sum() if reduction == "sum" else torch.stack(per_layer).mean()  # no token: 0


@torch.no_grad()
def expert_load(model, mask=None):
    """name -> share of the k experts (mean omega / k, sums to 1) over the last forward's tokens (mask: real ones)."""
    return {n: om.mean(0) / om.shape[-1] for n, om in _omegas(model, mask)}
