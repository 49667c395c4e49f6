"""
The baselines TeamLoRA is compared with. Both layers are adapters that teamlora.inject(..., cls=...) can place;
balance_loss and expert_load read HydraLoRALinear's omega as TeamLoRA's (MoELoRALoop keeps none).

- MoELoRALoop: MoELoRA (the paper's Eq. 7) the way public implementations write it (MOELoRA-peft,
  HydraLoRA's repository): k independent pairs (A_i, B_i) of rank r_B = r / k, a softmax router, a
  Python loop over the experts. bench.py times it. train.py's adapter="moelora" computes the same
  function fused instead (moelora_fused_kwargs): TeamLoRA's collaboration module with A stacked,
  no competition and alpha / k (equal without dropout: the fused one drops out z, the loop x).
- team_lora_delta_loop: TeamLoRA's Eq. 9 and 13 written literally, one expert at a time: the
  reference that teamlora.team_lora_delta (one GEMM for all experts) is tested against in every
  gradient, and the loop bench.py times.
- HydraLoRALinear: HydraLoRA (Tian et al., NeurIPS 2024), the code the authors' file was forked
  from: one A shared by k heads B_i, each head seeing all of A's output.

In every adapter here, as in TeamLoRALinear, `r` is the rank of the A the tokens go through: the
total rank r_A. TeamLoRA and MoELoRA split it into k experts of r / k; HydraLoRA's heads each have
all r of it, so HydraLoRA(r, k) has k times the B parameters of TeamLoRA(r, k).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from teamlora import TeamLoRALinear, expert_weights_t


def expert_weights(x, router, M):
    """omega, per-token expert weights (..., k) in float32 (or float64) summing to k; M=None: no competition."""
    logits = F.linear(x, router)  # (..., k)
    return expert_weights_t(logits.reshape(-1, logits.shape[-1]).t(), M).t().reshape(logits.shape)


def team_lora_delta_loop(x, A, B, router, M, scaling, dropout):
    """Eq. 9 and 13 written literally, one expert at a time. The readable reference; slower."""
    z = F.dropout(F.linear(x, A), dropout, dropout > 0) * scaling
    if router is None:
        return F.linear(z, B), None
    omega = expert_weights(x, router, M)
    k = omega.shape[-1]
    zs, Bs = z.chunk(k, -1), B.chunk(k, -1)  # z_i (..., r_B), B_i (d_out, r_B)
    delta = sum(omega[..., i:i + 1].to(z.dtype) * F.linear(zs[i], Bs[i]) for i in range(k))
    return delta, omega


def moelora_fused_kwargs(r, experts, alpha):
    """teamlora.inject keywords that compute MoELoRA fused: softmax weights sum to 1 where TeamLoRA's
    omega sums to k, hence alpha / k (the identity test_baselines.py proves)."""
    return dict(r=r, experts=experts, alpha=alpha / experts, competition=False)


class MoELoRALoop(nn.Module):
    """MoELoRA with a loop over the experts: h = x W0^T + b + sum_i softmax(x W_r^T)_i (alpha / r_B) B_i A_i
    dropout(x), a dropout mask per expert. Keeps the base layer's `weight` and `bias`, like TeamLoRALinear; A_i and
    B_i are slices of lora_A (k, r_B, d_in) and lora_B (k, d_out, r_B) so that every adapter name starts with lora_."""

    def __init__(self, base, r=8, experts=4, alpha=16.0, dropout=0.05, competition=False,
                 adapter_dtype=torch.float32):
        super().__init__()
        if competition or experts < 1 or r < experts or r % experts:  # experts first: r % 0 would divide by 0
            raise ValueError(f"MoELoRA has no interaction matrix and needs r a multiple of experts (got r={r}, "
                             f"experts={experts}, competition={competition}): use competition=False, experts >= 1 "
                             "and r = experts * r_B with r_B >= 1.")
        r_B, kw = r // experts, dict(device=base.weight.device, dtype=adapter_dtype)
        self.weight, self.bias, self.in_features = base.weight, base.bias, base.in_features
        self.r, self.experts, self.scaling, self.dropout = r, experts, alpha / r_B, nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(experts, r_B, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(experts, base.out_features, r_B, **kw))
        self.lora_router = nn.Parameter(torch.empty(experts, base.in_features, **kw))
        for t in (*self.lora_A, self.lora_router):  # each A_i as its own nn.Linear would be initialised
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"MoELoRALoop expects inputs (..., {self.in_features}), got {tuple(x.shape)}.")
        out = F.linear(x, self.weight, self.bias)
        x = x.to(self.lora_A.dtype)
        weights = F.linear(x, self.lora_router).softmax(-1)  # (..., k)
        for i in range(self.experts):
            expert = F.linear(F.linear(self.dropout(x), self.lora_A[i]), self.lora_B[i])
            out = out + (expert * self.scaling * weights[..., i:i + 1]).to(out.dtype)
        return out

    def merge(self, merged=True):
        """Refused, as TeamLoRALinear.merge refuses several experts: no single B A folds into the weight."""
        raise ValueError("MoELoRA cannot merge: its router weighs the experts per token (only one expert, LoRA in "
                         "TeamLoRALinear, merges); serve it unmerged.")


class HydraLoRALinear(TeamLoRALinear):
    """HydraLoRA: one A (r x d_in) shared by k heads B_i (d_out x r each, stored side by side as B,
    d_out x k r), weighted by a softmax router: h = x W0^T + b + (alpha / r) sum_i phi_i B_i A x.
    Each head sees all of z = x A^T, where a TeamLoRA expert sees its own r / k slice of it."""

    def __init__(self, base, r=8, experts=4, alpha=16.0, dropout=0.05, competition=False, **kw):
        if competition:
            raise ValueError("HydraLoRA has no interaction matrix: use competition=False.")
        if experts < 2:  # one head needs no router: that is LoRA
            raise ValueError(f"HydraLoRA weighs experts >= 2 heads by a router, got experts={experts}; for one head "
                             "use plain LoRA (TeamLoRALinear with experts=1).")
        if r <= 0:  # checked here: TeamLoRA's own check would name r * experts as the rank
            raise ValueError(f"HydraLoRA needs a positive rank r for its shared A, got r={r}.")
        # TeamLoRA's layer with k heads of width r (B: d_out x k r) and omega summing to k, hence alpha / k
        super().__init__(base, r * experts, experts, alpha / experts, dropout, False, **kw)
        self.r = r
        # r x d_in, shared by every head: rows of a kaiming A (its bound depends on d_in only)
        self.lora_A = nn.Parameter(self.lora_A.detach()[:r].clone())

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"HydraLoRALinear expects inputs (..., {self.in_features}), got {tuple(x.shape)}.")
        out = F.linear(x, self.weight, self.bias)
        xa = x.to(self.lora_A.dtype)
        z = F.dropout(F.linear(xa, self.lora_A), self.dropout, self.training)
        omega = expert_weights(xa, self.lora_router, None)  # k * softmax: TeamLoRA's convention, sums to k
        self.last_omega = omega  # for the balance loss and the expert load
        w = (omega * self.scaling).to(z.dtype)  # k * (alpha / k) / r = alpha / r per head, weights phi_i
        zw = (z.unsqueeze(-2) * w.unsqueeze(-1)).flatten(-2)  # (..., k, r) -> (..., k r): head i gets phi_i z
        return out + F.linear(zw, self.lora_B).to(out.dtype)
