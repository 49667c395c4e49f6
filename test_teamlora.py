"""The specification of the project, as tests: CPU only, a few minutes in all.

    python -m pytest -q test_teamlora.py

Sections: teamlora.py (the layer), model.py (LLaMA), data.py (tokenizer, records, prepare,
batches; then metrics, the CME tasks, the synthetic suite), train.py (the loop), bench.py (a smoke test). Tests that need
../shared/fixtures (the authors' records, the LLaMA-2 tokenizer, CME samples) skip without them;
set TEAMLORA_FIXTURES to point elsewhere."""
import base64
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import teamlora
from data import (CME_TASKS, DataError, SYNTHETIC_TASKS, TEMPLATES, Task, TokenDataset, Tokenizer, accuracy,
    encode_example, epoch_of, evaluate, exact_match, get_batch, global_answer_tokens, global_batch,
    make_record, make_suite, normalize_answer, prepare, qa_record, rouge_l, write_eval_set)
from model import ModelArgs, PRESETS, Transformer, apply_rotary, hf_to_meta_qk, rope_cos_sin
from teamlora import TeamLoRALinear, inject


# ===============================================================================================
# teamlora.py: the layer
# ===============================================================================================

class FFN(nn.Module):
    """A LLaMA-style SwiGLU block with Meta's names, enough to exercise inject()."""

    def __init__(self, dim=16, hidden=40, device=None, dtype=None):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False, device=device, dtype=dtype)
        self.w3 = nn.Linear(dim, hidden, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(hidden, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Stack(nn.Module):
    def __init__(self, n=2, **kw):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"feed_forward": FFN(**kw)}) for _ in range(n))
        self.head = nn.Linear(kw.get("dim", 16), 7, device=kw.get("device"), dtype=kw.get("dtype"))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["feed_forward"](x)
        return self.head(x)


def randomize(layer, seed=0):
    """Give a layer's adapter random, non-trivial values (a fresh B is zero, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_router, layer.lora_M):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return layer


def make_layer(d_in=12, d_out=10, r=8, experts=4, alpha=16.0, competition=True, bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    layer = TeamLoRALinear(base, r=r, experts=experts, alpha=alpha, dropout=0.0, competition=competition,
                           adapter_dtype=dtype)
    return randomize(layer, seed)


def reference_forward(x, W, b, A, B, router, M, k, alpha, competition=True):
    """Eq. 8-13 and the authors' layer, written independently, in float64 and one expert at a time."""
    r = A.shape[0]
    rb = r // k
    scaling = alpha / rb
    z = (x @ A.T) * scaling  # Eq. 8
    out = x @ W.T + (b if b is not None else 0)
    if k == 1:
        return out + z @ B.T
    phi = torch.softmax(x @ router.T, dim=-1)  # Eq. 11
    if competition:
        adj = phi + phi @ M  # Eq. 12, the authors' "diagonal 1" form
        adj = adj / adj.sum(-1, keepdim=True)
    else:
        adj = phi
    omega = k * adj
    for i in range(k):
        h_i = z[..., i * rb:(i + 1) * rb] @ B[:, i * rb:(i + 1) * rb].T  # Eq. 9
        out = out + omega[..., i:i + 1] * h_i  # Eq. 13
    return out


@pytest.mark.parametrize("k,r,shape,competition,bias", [
    (4, 8, (5, 12), True, True), (2, 8, (2, 3, 12), True, False), (8, 16, (1, 7, 12), True, True),
    (4, 8, (3, 12), False, True), (1, 4, (2, 5, 12), True, True), (3, 9, (4, 2, 2, 12), True, True)])
def test_forward_matches_equations_float64(k, r, shape, competition, bias):
    layer = make_layer(r=r, experts=k, competition=competition, bias=bias)
    x = torch.randn(shape, dtype=torch.float64)
    M = layer.lora_M.detach() if layer.lora_M is not None else None
    router = layer.lora_router.detach() if layer.lora_router is not None else None
    ref = reference_forward(x, layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
                            layer.lora_A.detach(), layer.lora_B.detach(), router, M, k, 16.0, competition)
    out = layer(x)
    assert out.shape == shape[:-1] + (10,)
    assert isinstance(out, torch.Tensor)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-12


def _grads(fn, layer, x):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("k,r,shape,competition", [
    (2, 8, (6, 12), True), (4, 16, (2, 5, 12), True), (8, 16, (3, 4, 12), True), (4, 8, (9, 12), False),
    (1, 4, (2, 3, 12), True)])
def test_fused_equals_expert_loop_in_outputs_and_every_gradient(k, r, shape, competition):
    layer = make_layer(r=r, experts=k, competition=competition)
    x = torch.randn(shape, dtype=torch.float64)

    def run(impl):
        def fn(inp):
            out = F.linear(inp, layer.weight, layer.bias)
            delta, _ = impl(inp, layer.lora_A, layer.lora_B, layer.lora_router, layer.lora_M, layer.scaling, 0.0)
            return out + delta
        return _grads(fn, layer, x)

    out_f, gx_f, g_f = run(teamlora.team_lora_delta)
    out_l, gx_l, g_l = run(teamlora.team_lora_delta_loop)
    torch.testing.assert_close(out_f, out_l, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_f, gx_l, rtol=1e-12, atol=1e-12)
    assert g_f.keys() == g_l.keys() and {"lora_A", "lora_B"} <= g_f.keys()
    for n in g_f:
        torch.testing.assert_close(g_f[n], g_l[n], rtol=1e-10, atol=1e-12, msg=n)
    # and the layer's own forward is the fused path
    out_layer, gx_layer, _ = _grads(layer, layer, x)
    torch.testing.assert_close(out_layer, out_f, rtol=0, atol=0)
    torch.testing.assert_close(gx_layer, gx_f, rtol=0, atol=0)


def _has_compiler():
    return any(shutil.which(c) for c in ("g++", "clang++"))


@pytest.mark.skipif(not _has_compiler(), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_equals_eager_trains_and_does_not_recompile_per_length():
    torch._dynamo.reset()
    teamlora._compiled.clear()
    layer = make_layer(d_in=16, d_out=24, r=8, experts=4, dtype=torch.float32)
    compiled = make_layer(d_in=16, d_out=24, r=8, experts=4, dtype=torch.float32)
    compiled.load_state_dict(layer.state_dict())
    compiled.compile = True
    from torch._dynamo.utils import counters
    counters.clear()
    graphs = []
    for T in (5, 9, 13, 31):
        x = torch.randn(2, T, 16)
        out_e, gx_e, g_e = _grads(layer, layer, x)
        out_c, gx_c, g_c = _grads(compiled, compiled, x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx_c, gx_e, rtol=1e-5, atol=1e-5)
        for n in g_e:
            torch.testing.assert_close(g_c[n], g_e[n], rtol=1e-4, atol=1e-5, msg=n)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs == [graphs[0]] * 4, graphs  # compiled once, reused at every length
    teamlora._compiled.clear()


def test_compile_falls_back_to_eager_with_one_warning_without_compiler(monkeypatch):
    teamlora._compiled.clear()
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(teamlora.os, "get_exec_path", lambda env=None: [])  # no compiler anywhere
    layer = make_layer(dtype=torch.float32)
    eager = layer(torch.randn(3, 12)).detach()
    layer.compile = True
    x = torch.randn(3, 12)
    with pytest.warns(UserWarning, match="C\\+\\+ compiler"):
        out1 = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2 = layer(x)  # warned once, not at every call
    torch.testing.assert_close(out1, out2)
    layer.compile = False
    torch.testing.assert_close(out1, layer(x))
    assert eager.shape == out1.shape
    teamlora._compiled.clear()


def test_fresh_adapter_leaves_base_output_unchanged():
    torch.manual_seed(0)
    model = Stack(n=2)
    x = torch.randn(4, 16)
    before = model(x)
    inject(model, ("w1", "w2", "w3"), r=8, experts=4, alpha=16)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_official_initialisation_and_parameter_layout():
    torch.manual_seed(0)
    base = nn.Linear(256, 96, bias=True)
    layer = TeamLoRALinear(base, r=16, experts=4, alpha=32, dropout=0.05)
    assert layer.weight is base.weight and layer.bias is base.bias  # taken over, not copied
    assert isinstance(layer, nn.Linear)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"weight": (96, 256), "bias": (96,), "lora_A": (16, 256), "lora_B": (96, 16),
                      "lora_router": (4, 256), "lora_M": (4, 4)}
    assert layer.scaling == 32 / 4  # alpha / r_B
    assert torch.all(layer.lora_B == 0)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt 5) on fan_in 256
    for p in (layer.lora_A, layer.lora_router):
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    M = layer.lora_M.detach()
    assert torch.all(M.diagonal() == 0)
    off = M[~torch.eye(4, dtype=torch.bool)]
    assert off.abs().max() <= 0.1 and off.abs().min() > 0
    assert all(p.dtype == torch.float32 for n, p in layer.named_parameters() if n.startswith("lora_"))
    # one expert is plain LoRA: no router, no interaction matrix; competition=False: no M
    lora = TeamLoRALinear(nn.Linear(8, 8), r=4, experts=1, alpha=8)
    assert lora.lora_router is None and lora.lora_M is None and lora.scaling == 2.0
    assert TeamLoRALinear(nn.Linear(8, 8), r=4, experts=2, competition=False).lora_M is None


def test_dropout_is_applied_to_the_rank_segments_not_to_x():
    layer = make_layer(dtype=torch.float32)
    layer.dropout = 0.5
    layer.train()
    x = torch.randn(6, 12)
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    z = F.dropout(x @ layer.lora_A.T, 0.5, True) * layer.scaling  # same RNG draw, on z
    omega = layer.last_omega
    zw = (z.view(6, 4, 2) * omega.unsqueeze(-1)).view(6, 8)
    expected = F.linear(x, layer.weight, layer.bias) + zw @ layer.lora_B.T
    torch.testing.assert_close(out, expected)
    layer.eval()
    torch.testing.assert_close(layer(x), reference_forward(
        x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_router, layer.lora_M, 4, 16.0))


class MoELoRA(nn.Module):
    """MoELoRA as paper Eq. 7 defines it: k independent (A_i, B_i) of rank r_B, softmax weights."""

    def __init__(self, base, r_b, k, alpha):
        super().__init__()
        self.base, self.scaling = base, alpha / r_b
        self.A = nn.ParameterList(nn.Parameter(torch.randn(r_b, base.in_features, dtype=torch.float64)) for _ in range(k))
        self.B = nn.ParameterList(nn.Parameter(torch.randn(base.out_features, r_b, dtype=torch.float64)) for _ in range(k))
        self.router = nn.Parameter(torch.randn(k, base.in_features, dtype=torch.float64))

    def forward(self, x):
        w = torch.softmax(x @ self.router.T, -1)
        return self.base(x) + sum(w[..., i:i + 1] * self.scaling * (x @ A.T @ B.T)
                                  for i, (A, B) in enumerate(zip(self.A, self.B)))


@pytest.mark.parametrize("k", [2, 4, 8])
def test_moelora_equals_teamlora_with_stacked_A_without_competition_and_alpha_over_k(k):
    torch.manual_seed(k)
    base = nn.Linear(12, 10, dtype=torch.float64)
    moe = MoELoRA(base, r_b=3, k=k, alpha=16.0)
    team = TeamLoRALinear(base, r=3 * k, experts=k, alpha=16.0 / k, dropout=0.0, competition=False,
                          adapter_dtype=torch.float64)
    with torch.no_grad():
        team.lora_A.copy_(torch.cat(list(moe.A), 0))  # A = [A_1; ...; A_k]
        team.lora_B.copy_(torch.cat(list(moe.B), 1))  # B = [B_1 ... B_k]
        team.lora_router.copy_(moe.router)
    x = torch.randn(5, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(team(x), moe(x), rtol=1e-12, atol=1e-12)


def test_inject_trains_only_adapters_and_the_base_never_moves():
    torch.manual_seed(0)
    model = Stack(n=2)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject(model, ("w1", "w2", "w3"), r=8, experts=4, alpha=16, dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rpartition(".")[2].startswith("lora_") for n in trainable)
    assert sum(isinstance(m, TeamLoRALinear) for m in model.modules()) == 6
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(32, 16), torch.randint(0, 7, (32,))
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y) + 0.01 * teamlora.balance_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    params = dict(model.named_parameters())
    for n, t in base_before.items():
        assert torch.equal(params[n], t), f"base parameter {n} moved"
    for n, t in adapters_before.items():
        assert not torch.equal(params[n], t), f"adapter parameter {n} did not train"
    assert losses[-1] < 0.9 * losses[0]


def test_adapter_state_dict_round_trip_and_mismatch_messages(tmp_path):
    torch.manual_seed(0)
    model = inject(Stack(n=2), ("w1", "w2", "w3"), r=8, experts=4, alpha=16)
    for m in model.modules():
        if isinstance(m, TeamLoRALinear):
            randomize(m, seed=len(m.lora_B))
    state = teamlora.adapter_state_dict(model)
    assert state and all(n.rpartition(".")[2].startswith("lora_") for n in state)
    assert "layers.0.feed_forward.w1.lora_A" in state and "layers.0.feed_forward.w1.weight" not in state
    torch.save(state, tmp_path / "adapter.pt")
    loaded = torch.load(tmp_path / "adapter.pt", weights_only=True)

    torch.manual_seed(0)
    other = inject(Stack(n=2), ("w1", "w2", "w3"), r=8, experts=4, alpha=16)
    model.eval(), other.eval()  # no dropout
    x = torch.randn(3, 16)
    assert not torch.allclose(other(x), model(x))
    teamlora.load_adapter_state_dict(other, loaded)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)

    wrong_rank = inject(Stack(n=2), ("w1", "w2", "w3"), r=16, experts=4, alpha=16)
    with pytest.raises(ValueError, match="shape mismatches.*lora_A"):
        teamlora.load_adapter_state_dict(wrong_rank, loaded)
    wrong_targets = inject(Stack(n=2), ("w1",), r=8, experts=4, alpha=16)
    with pytest.raises(ValueError, match="unexpected.*w2"):
        teamlora.load_adapter_state_dict(wrong_targets, loaded)
    no_competition = inject(Stack(n=2), ("w1", "w2", "w3"), r=8, experts=4, alpha=16, competition=False)
    with pytest.raises(ValueError, match="unexpected.*lora_M"):
        teamlora.load_adapter_state_dict(no_competition, loaded)


def _official_balance(omega):
    """The authors' per-layer form on the k-scaled omega, padding included: mean_f (mean_t omega_f - 1/k)^2."""
    k = omega.shape[-1]
    return ((omega.reshape(-1, k).mean(0) - 1.0 / k) ** 2).mean()


def test_balance_loss_zero_when_balanced_positive_otherwise_and_blind_to_masked_tokens():
    layer = make_layer(dtype=torch.float64)
    model = nn.Sequential(layer)
    layer.last_omega = torch.ones(2, 5, 4, dtype=torch.float64)  # perfectly balanced
    assert teamlora.balance_loss(model).item() == 0.0
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    model(x)
    omega = layer.last_omega
    torch.testing.assert_close(omega.sum(-1), torch.full((2, 5), 4.0, dtype=torch.float64))
    loss = teamlora.balance_loss(model)
    assert loss.item() > 0
    # our form is the authors' minus the constant (1 - 1/k)^2: same gradient, zero at balance
    torch.testing.assert_close(loss, _official_balance(omega) - (1 - 1 / 4) ** 2)
    # masked tokens do not count: garbage in padding positions leaves the loss unchanged
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    masked = teamlora.balance_loss(model, mask)
    layer.last_omega = omega.clone()
    layer.last_omega[~mask] = torch.tensor([4.0, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(teamlora.balance_loss(model, mask), masked)
    assert not torch.allclose(teamlora.balance_loss(model), loss)
    # and it is differentiable with respect to the router
    model(x)
    teamlora.balance_loss(model).backward()
    assert layer.lora_router.grad.abs().sum() > 0


def test_balance_loss_mean_and_sum_over_layers():
    torch.manual_seed(0)
    model = inject(Stack(n=2), ("w1", "w2", "w3"), r=8, experts=4, alpha=16)
    model(torch.randn(3, 4, 16))
    per_layer = [((m.last_omega.reshape(-1, 4).mean(0) - 1) ** 2).mean()
                 for m in model.modules() if isinstance(m, TeamLoRALinear)]
    assert len(per_layer) == 6
    torch.testing.assert_close(teamlora.balance_loss(model), torch.stack(per_layer).mean())
    torch.testing.assert_close(teamlora.balance_loss(model, reduction="sum"), torch.stack(per_layer).sum())
    assert teamlora.balance_loss(nn.Linear(2, 2)).item() == 0.0  # no adapters: nothing to balance


def test_expert_load_is_a_distribution_per_layer_and_respects_the_mask():
    torch.manual_seed(0)
    model = inject(Stack(n=2), ("w1", "w2", "w3"), r=8, experts=4, alpha=16)
    for m in model.modules():
        if isinstance(m, TeamLoRALinear):
            randomize(m)
    model(torch.randn(2, 6, 16))
    load = teamlora.expert_load(model)
    assert set(load) == {f"layers.{i}.feed_forward.{w}" for i in range(2) for w in ("w1", "w2", "w3")}
    for v in load.values():
        assert v.shape == (4,) and abs(v.sum().item() - 1) < 1e-5
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 0] = True
    one = teamlora.expert_load(model, mask)["layers.0.feed_forward.w1"]
    first = model.layers[0]["feed_forward"].w1.last_omega[0, 0] / 4
    torch.testing.assert_close(one, first)


def test_row_sum_guard_keeps_outputs_finite_when_phi_I_plus_M_sums_to_zero():
    layer = make_layer(dtype=torch.float64)
    with torch.no_grad():
        layer.lora_M.copy_(-torch.eye(4, dtype=torch.float64))  # phi (I + M) = 0 for every token
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.lora_M.grad).all()


def test_bf16_base_with_fp32_adapters_and_under_autocast():
    torch.manual_seed(0)
    model = Stack(n=1, dtype=torch.bfloat16)
    inject(model, ("w1", "w2", "w3"), r=8, experts=4, alpha=16)
    for m in model.modules():
        if isinstance(m, TeamLoRALinear):
            assert m.weight.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32
            randomize(m)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    w1 = model.layers[0]["feed_forward"].w1
    assert w1.lora_B.grad is not None and w1.lora_B.grad.dtype == torch.float32
    assert w1.last_omega.dtype == torch.float32
    # the same layer in float64 agrees to bf16 precision
    w1.eval()
    ref = reference_forward(x[0].double(), w1.weight.double(), None, w1.lora_A.double(), w1.lora_B.double(),
                            w1.lora_router.double(), w1.lora_M.double(), 4, 16.0)
    assert (w1(x[0]).double() - ref).abs().max() < 0.02 * ref.abs().max()
    w1.train()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.float())
    out.float().sum().backward()
    assert torch.isfinite(w1.lora_A.grad).all() and w1.lora_A.grad.abs().sum() > 0


def test_inject_on_the_meta_device_allocates_nothing_then_materialises():
    with torch.device("meta"):
        model = Stack(n=4, dim=4096, hidden=11008)
    ids = {n: id(p) for n, p in model.named_parameters()}
    inject(model, ("w1", "w2", "w3"), r=64, experts=4, alpha=32)
    params = dict(model.named_parameters())
    assert all(p.is_meta for p in params.values())
    for n, i in ids.items():  # the very same base parameters, not copies
        assert id(params[n]) == i
    n_adapter = sum(p.numel() for n, p in params.items() if p.requires_grad)
    assert n_adapter == 4 * (2 * (64 * 4096 + 11008 * 64 + 4 * 4096 + 16) + (64 * 11008 + 4096 * 64 + 4 * 11008 + 16))
    # real-device materialisation of a small one: to_empty + reset_lora_parameters gives the official init
    with torch.device("meta"):
        small = inject(Stack(n=1), ("w1",), r=8, experts=4, alpha=16)
    small.to_empty(device="cpu")
    w1 = small.layers[0]["feed_forward"].w1
    w1.reset_lora_parameters()
    assert torch.all(w1.lora_B == 0) and torch.all(w1.lora_M.diagonal() == 0)


def test_inject_shares_base_storage_on_a_real_device():
    model = Stack(n=1)
    ptr = model.layers[0]["feed_forward"].w2.weight.data_ptr()
    inject(model, "w2", r=4, experts=2, alpha=8)
    assert model.layers[0]["feed_forward"].w2.weight.data_ptr() == ptr


def test_inject_matches_hugging_face_style_names_by_suffix_only():
    class HFMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
            self.not_up_proj = nn.Linear(8, 8)  # ends with "up_proj" as text, not as a name part

    model = nn.ModuleDict({"mlp": HFMLP()})
    inject(model, ("gate_proj", "up_proj", "down_proj"), r=4, experts=2, alpha=8)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds == {"mlp.gate_proj": "TeamLoRALinear", "mlp.up_proj": "TeamLoRALinear",
                     "mlp.down_proj": "TeamLoRALinear", "mlp.not_up_proj": "Linear"}


def test_user_errors_give_one_clear_sentence():
    with pytest.raises(ValueError, match="r to be a positive multiple of experts.*r=10, experts=4"):
        TeamLoRALinear(nn.Linear(4, 4), r=10, experts=4)
    with pytest.raises(ValueError, match="r to be a positive multiple"):
        inject(Stack(), ("w1",), r=6, experts=4, alpha=16)
    with pytest.raises(ValueError, match="no module name ends with.*'q_proj'.*w1"):
        inject(Stack(), ("q_proj",), r=8, experts=4, alpha=16)
    with pytest.raises(ValueError, match="'layers.0.feed_forward' is a FFN, not a plain nn.Linear"):
        inject(Stack(), ("feed_forward",), r=8, experts=4, alpha=16)
    twice = inject(Stack(), ("w1",), r=8, experts=4, alpha=16)
    with pytest.raises(ValueError, match="already has an adapter"):
        inject(twice, ("w1",), r=8, experts=4, alpha=16)
    layer = make_layer()
    with pytest.raises(ValueError, match=r"expects inputs \(\.\.\., 12\), got \(3, 5\)"):
        layer(torch.randn(3, 5, dtype=torch.float64))
    layer(torch.randn(2, 3, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask of shape"):
        teamlora.balance_loss(nn.Sequential(layer), torch.ones(3, 2, dtype=torch.bool))

# ===============================================================================================
# model.py: LLaMA
# ===============================================================================================

def tiny_model(seed=0, **overrides):
    """A tiny model whose every weight (norms included) is random, so a swapped or missed tensor shows."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_name("tiny", **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.2) + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def logits_of(model, tokens):
    with torch.no_grad():
        return model(tokens)[0]


# ---------------------------------------------------------------------------------------------------
# arguments and presets

def test_ffn_width_follows_meta_rule_for_published_models():
    # widths of the published checkpoints
    assert ModelArgs.from_name("llama2-7b").ffn_hidden_dim == 11008
    assert ModelArgs.from_name("llama2-13b").ffn_hidden_dim == 13824
    assert ModelArgs.from_name("llama3-8b").ffn_hidden_dim == 14336


def test_published_parameter_counts_on_meta_device():
    with torch.device("meta"):
        assert Transformer(ModelArgs.from_name("llama2-7b")).num_params() == 6_738_415_616
        assert Transformer(ModelArgs.from_name("llama3-8b")).num_params() == 8_030_261_248


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_counts_parameters_by_closed_form(name):
    a = ModelArgs.from_name(name)
    hd, f = a.dim // a.n_heads, a.ffn_hidden_dim
    per_layer = 2 * a.dim * a.n_heads * hd + 2 * a.dim * a.n_kv_heads * hd + 3 * a.dim * f + 2 * a.dim
    with torch.device("meta"):
        model = Transformer(a)
    assert model.num_params() == 2 * a.vocab_size * a.dim + a.n_layers * per_layer + a.dim


def test_preset_fields_can_be_overridden():
    assert ModelArgs.from_name("small", vocab_size=1234).vocab_size == 1234


# ---------------------------------------------------------------------------------------------------
# rotary embeddings and the Hugging Face q/k layout

def complex_rope_reference(x, positions, theta):
    """Meta's formulation: adjacent pairs as complex numbers times exp(i * pos * theta^(-2j/hd)),
    angles in float32 as Meta computes them (at position 4000 float32 angles are off by ~1e-4 rad)."""
    hd = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    angles = positions.float()[..., None] * freqs  # (B, T, hd/2)
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, :, None]).flatten(-2)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_complex_reference(theta):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 16)  # (B, T, H, hd)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [9, 0, 1, 2, 250, 251, 4000]])
    ours = apply_rotary(x, *rope_cos_sin(positions, 16, theta))
    torch.testing.assert_close(ours, complex_rope_reference(x, positions, theta), atol=1e-5, rtol=1e-5)


def meta_to_hf_qk(w, n_heads):
    """HF's converter direction: within each head, even rows first, then odd rows."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return torch.cat([w.view(n_heads, hd, in_dim)[:, 0::2], w.view(n_heads, hd, in_dim)[:, 1::2]], dim=1).reshape(out_dim, in_dim)


def hf_rope(x, positions, theta):
    """HF's rotary: rotate the first half of each head against the second half."""
    hd = x.shape[-1]
    angles = positions.double()[..., None] * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = torch.cat([angles, angles], -1).cos()[:, :, None], torch.cat([angles, angles], -1).sin()[:, :, None]
    rotated = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1)
    return x * cos + rotated * sin


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_hf_permutation_round_trips(n_heads):
    w = torch.randn(n_heads * 8, 12)
    assert torch.equal(hf_to_meta_qk(meta_to_hf_qk(w, n_heads), n_heads), w)
    assert not torch.equal(meta_to_hf_qk(w, n_heads), w)


def test_unpermuted_hf_weights_give_equal_attention_scores():
    torch.manual_seed(0)
    dim, H, Hkv, hd, T = 32, 4, 2, 8, 6
    wq, wk = torch.randn(H * hd, dim, dtype=torch.float64), torch.randn(Hkv * hd, dim, dtype=torch.float64)
    x, positions = torch.randn(1, T, dim, dtype=torch.float64), torch.arange(T)[None]
    wq_hf, wk_hf = meta_to_hf_qk(wq, H), meta_to_hf_qk(wk, Hkv)
    q_hf = hf_rope((x @ wq_hf.T).view(1, T, H, hd), positions, 1e4)
    k_hf = hf_rope((x @ wk_hf.T).view(1, T, Hkv, hd), positions, 1e4)
    cos, sin = rope_cos_sin(positions, hd, 1e4)
    q = apply_rotary((x @ hf_to_meta_qk(wq_hf, H).T).view(1, T, H, hd), cos.double(), sin.double())
    k = apply_rotary((x @ hf_to_meta_qk(wk_hf, Hkv).T).view(1, T, Hkv, hd), cos.double(), sin.double())
    scores_hf = torch.einsum("bthd,bshd->bhts", q_hf, k_hf.repeat_interleave(H // Hkv, dim=2))
    scores = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(H // Hkv, dim=2))
    torch.testing.assert_close(scores, scores_hf, atol=1e-5, rtol=1e-5)  # apply_rotary works in float32


# ---------------------------------------------------------------------------------------------------
# checkpoint loading: directories written by the test from the in-memory model's weights

def write_meta_dir(model, path, embedding_split_dim):
    """Two model-parallel shards as Meta's fairscale layers split them, with rope.freqs and vocab -1."""
    a = model.args
    shards = [{}, {}]
    for name, t in model.state_dict().items():
        if t.dim() == 1:
            parts = [t, t]  # norms are replicated
        elif name.endswith(("wo.weight", "w2.weight")):
            parts = t.chunk(2, dim=1)  # row-parallel
        elif name == "tok_embeddings.weight":
            parts = t.chunk(2, dim=embedding_split_dim)
        else:
            parts = t.chunk(2, dim=0)  # column-parallel
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = torch.randn(a.dim // a.n_heads // 2)
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, vocab_size=-1,
                  multiple_of=a.multiple_of, norm_eps=a.norm_eps, rope_theta=a.rope_theta)
    (path / "params.json").write_text(json.dumps(params))


def hf_state_dict(model):
    a = model.args
    layer_names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                   "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                   "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                   "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                   "ffn_norm": "post_attention_layernorm"}
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for i in range(a.n_layers):
        for meta, hf in layer_names.items():
            t = sd[f"layers.{i}.{meta}.weight"]
            if meta == "attention.wq":
                t = meta_to_hf_qk(t, a.n_heads)
            if meta == "attention.wk":
                t = meta_to_hf_qk(t, a.n_kv_heads)
            out[f"model.layers.{i}.{hf}.weight"] = t.clone()
    return out


def hf_config(model):
    a = model.args
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=a.dim,
                num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                intermediate_size=a.ffn_hidden_dim, vocab_size=a.vocab_size, rms_norm_eps=a.norm_eps,
                rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len, hidden_act="silu",
                tie_word_embeddings=False, torch_dtype="float32")


def write_hf_bin_dir(model, path):
    """pytorch_model-0000{1,2}-of-00002.bin with an index, plus the inv_freq buffers old conversions kept."""
    sd = hf_state_dict(model)
    names = list(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, half in enumerate(halves):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        shard = {n: sd[n] for n in half}
        shard["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.randn(4)
        torch.save(shard, path / file)
        weight_map.update({n: file for n in shard})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(hf_config(model)))


def write_safetensors(tensors, file):
    """The safetensors format by hand: u64 header length, JSON header, then the raw bytes."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


@pytest.mark.parametrize("n_kv_heads", [2, 4])
@pytest.mark.parametrize("embedding_split_dim", [0, 1])  # LLaMA 3 splits the vocabulary, LLaMA 2 the width
def test_meta_sharded_directory_loads_to_identical_logits(tmp_path, n_kv_heads, embedding_split_dim):
    model = tiny_model(n_kv_heads=n_kv_heads, rope_theta=5e5)
    write_meta_dir(model, tmp_path, embedding_split_dim)
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.args.vocab_size == model.args.vocab_size and loaded.args.rope_theta == 5e5
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


@pytest.mark.parametrize("n_kv_heads", [2, 4])
@pytest.mark.parametrize("config_style", ["transformers4", "transformers5"])
def test_hf_sharded_bin_directory_loads_to_identical_logits(tmp_path, n_kv_heads, config_style):
    model = tiny_model(n_kv_heads=n_kv_heads, rope_theta=5e5)
    write_hf_bin_dir(model, tmp_path)
    if config_style == "transformers5":  # rope_theta moved into rope_parameters
        config = json.loads((tmp_path / "config.json").read_text())
        config["rope_parameters"] = {"rope_theta": config.pop("rope_theta"), "rope_type": "default"}
        (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


def test_hf_hand_written_safetensors_loads_to_identical_logits(tmp_path):
    pytest.importorskip("safetensors")
    model = tiny_model()
    write_safetensors(hf_state_dict(model), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    loaded = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


def test_from_pretrained_converts_dtype(tmp_path):
    model = tiny_model()
    write_hf_bin_dir(model, tmp_path)
    loaded = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    tokens = torch.randint(0, model.args.vocab_size, (1, 12))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model.to(torch.bfloat16), tokens))


def test_meta_device_build_then_assign_or_to_empty_is_correct():
    model = tiny_model()
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    with torch.device("meta"):
        assigned, emptied = Transformer(model.args), Transformer(model.args)
    assigned.load_state_dict(model.state_dict(), assign=True)
    emptied = emptied.to_empty(device="cpu")
    emptied.load_state_dict(model.state_dict())
    assert torch.equal(logits_of(assigned, tokens), logits_of(model, tokens))
    assert torch.equal(logits_of(emptied, tokens), logits_of(model, tokens))


# ---------------------------------------------------------------------------------------------------
# forward: causality, packing, loss

def test_changing_a_future_token_never_changes_earlier_logits():
    model = tiny_model()
    tokens = torch.randint(0, model.args.vocab_size, (2, 16))
    seq_ids = torch.tensor([[0] * 16, [0] * 6 + [1] * 10])
    for t in (0, 5, 15):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % model.args.vocab_size
        for ids in (None, seq_ids):
            before, after = model(tokens, seq_ids=ids)[0].detach(), model(changed, seq_ids=ids)[0].detach()
            torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
            assert not torch.allclose(after[:, t], before[:, t])


def test_packed_seq_ids_equal_running_each_example_alone():
    model = tiny_model()
    lengths = [[5, 7, 4], [3, 15]]  # row 0 ends with 2 padding tokens, row 1 with none
    T = 18
    tokens = torch.randint(0, model.args.vocab_size, (2, T))
    targets = torch.randint(0, model.args.vocab_size, (2, T))
    seq_ids = torch.full((2, T), -1)
    targets[0, 16:] = -100
    for row, lens in enumerate(lengths):
        start = 0
        for i, n in enumerate(lens):
            seq_ids[row, start:start + n] = i
            start += n
    logits, loss = model(tokens, targets, seq_ids=seq_ids, reduction="sum")
    expected_loss = 0.0
    for row, lens in enumerate(lengths):
        start = 0
        for n in lens:
            alone, alone_loss = model(tokens[row:row + 1, start:start + n], targets[row:row + 1, start:start + n], reduction="sum")
            torch.testing.assert_close(logits[row, start:start + n], alone[0], atol=1e-5, rtol=1e-5)
            expected_loss += alone_loss
            start += n
    torch.testing.assert_close(loss, expected_loss, atol=1e-4, rtol=1e-5)


def test_loss_is_cross_entropy_over_labelled_positions():
    model = tiny_model()
    tokens = torch.randint(0, model.args.vocab_size, (2, 10))
    targets = torch.randint(0, model.args.vocab_size, (2, 10))
    targets[0, :4] = -100
    targets[1, 7:] = -100
    logits, mean = model(tokens, targets)
    _, total = model(tokens, targets, reduction="sum")
    labelled = targets != -100
    nll = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][labelled]
    torch.testing.assert_close(mean, nll.mean())
    torch.testing.assert_close(total, nll.sum())
    assert model(tokens)[1] is None


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    model = tiny_model().train()
    tokens, targets = torch.randint(0, 512, (2, 10)), torch.randint(0, 512, (2, 10))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(tokens, targets)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_projections_may_be_replaced_by_any_module():
    class Doubled(nn.Module):  # what an adapter library does: swap a Linear for another module
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return 2 * self.linear(x)

    model = tiny_model()
    tokens = torch.randint(0, 512, (1, 8))
    before = logits_of(model, tokens)
    for layer in model.layers:
        layer.feed_forward.w2 = Doubled(layer.feed_forward.w2)
        layer.attention.wq = Doubled(layer.attention.wq)
    assert not torch.allclose(logits_of(model, tokens), before)


# ---------------------------------------------------------------------------------------------------
# generation

def greedy_without_cache(model, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(logits_of(model, torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def test_greedy_with_cache_equals_recomputing_without_cache():
    for n_kv_heads in (2, 4):
        model = tiny_model(seed=1, n_kv_heads=n_kv_heads)
        prompt = torch.randint(0, 512, (9,)).tolist()
        assert model.generate([prompt], 20)[0] == greedy_without_cache(model, prompt, 20)


def test_batched_generation_equals_one_prompt_at_a_time():
    model = tiny_model(seed=2)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (1, 6, 11, 3)]
    batched = model.generate(prompts, 15)
    assert batched == [model.generate([p], 15) [0] for p in prompts]
    assert batched == [greedy_without_cache(model, p, 15) for p in prompts]


def test_generation_stops_before_eos():
    model = tiny_model(seed=3)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (4, 7)]
    free = model.generate(prompts, 12)
    eos = free[0][3]
    stopped = model.generate(prompts, 12, eos_id=eos)
    assert stopped == [row[:row.index(eos)] if eos in row else row for row in free]
    assert len(stopped[0]) <= 3


def test_sampling_is_seeded_and_tiny_top_p_is_greedy():
    model = tiny_model(seed=4)
    prompts = [[1, 2, 3], [7]]
    a = model.generate(prompts, 10, temperature=1.0, seed=123)
    assert a == model.generate(prompts, 10, temperature=1.0, seed=123)
    assert a != model.generate(prompts, 10, temperature=1.0, seed=124)
    assert model.generate(prompts, 10, temperature=1.0, top_p=1e-6, seed=5) == model.generate(prompts, 10)


def test_generate_restores_training_mode():
    model = tiny_model().train()
    model.generate([[1, 2]], 2)
    assert model.training


# ---------------------------------------------------------------------------------------------------
# errors a user can cause

def test_unknown_preset_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model name 'llama9'.*llama2-7b.*tiny"):
        ModelArgs.from_name("llama9")


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Transformer.from_pretrained(tmp_path / "nope")


def test_unknown_layout_is_reported(tmp_path):
    with pytest.raises(ValueError, match="neither params.json.*nor config.json"):
        Transformer.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model = tiny_model()
    sd = hf_state_dict(model)
    del sd["model.layers.1.mlp.up_proj.weight"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    with pytest.raises(ValueError, match=r"lacks weights the model needs: layers\.1\.feed_forward\.w3\.weight"):
        Transformer.from_pretrained(tmp_path)
    sd = hf_state_dict(model)
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"does not know: model\.layers\.0\.mlp\.extra\.weight"):
        Transformer.from_pretrained(tmp_path)


def test_shape_mismatch_names_weight_and_both_shapes(tmp_path):
    model = tiny_model()
    config = hf_config(model)
    config["intermediate_size"] += 32
    torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(config))
    f = model.args.ffn_hidden_dim
    with pytest.raises(ValueError, match=rf"layers\.0\.feed_forward\.w1\.weight has shape \({f}, 64\).*expects \({f + 32}, 64\)"):
        Transformer.from_pretrained(tmp_path)


def test_missing_safetensors_package_says_how_to_install(tmp_path, monkeypatch):
    model = tiny_model()
    write_safetensors(hf_state_dict(model), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes `import safetensors` fail
    with pytest.raises(ImportError, match="pip install safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_llama31_scaled_rope_is_refused(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 8, "use_scaled_rope": True}))
    with pytest.raises(ValueError, match="use_scaled_rope"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_hf_rope_scaling_is_refused(tmp_path, key):
    model = tiny_model()
    config = hf_config(model)
    config[key] = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rotary scaling.*llama3"):
        Transformer.from_pretrained(tmp_path)


def test_bad_inputs_are_reported():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, model.args.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens\\[None\\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="targets has shape"):
        model(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate([[1] * 250], 10)
    with pytest.raises(ValueError, match="token id outside"):
        model.generate([[1, 512]], 3)
    with pytest.raises(ValueError, match="non-empty prompts"):
        model.generate([[1], []], 3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)

# ===============================================================================================
# data.py: tokenizer, the authors' records, prepare, batches
# ===============================================================================================

HERE = Path(__file__).resolve().parent
_candidates = [os.environ.get("TEAMLORA_FIXTURES", ""), HERE / "shared" / "fixtures", HERE.parent / "shared" / "fixtures"]
FIXTURES = next((Path(p) for p in _candidates if p and (Path(p) / "official").is_dir()), None)
needs_fixtures = pytest.mark.skipif(FIXTURES is None, reason="shared/fixtures not found (set TEAMLORA_FIXTURES)")
LLAMA2 = FIXTURES / "tokenizer" / "llama2_tokenizer.model" if FIXTURES else None
OFFICIAL = FIXTURES / "official" / "train_example.json" if FIXTURES else None

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


@needs_fixtures
def test_raw_encode_keeps_special_text_as_text_and_special_encode_does_not(tok):
    assert tok.eos_id not in tok.encode("a</s>b")
    assert tok.encode("a</s>b", special=True) == tok.encode("a") + [tok.eos_id] + tok.encode("b")
    assert tok.decode(tok.encode("a</s>b")) == "a</s>b"


def test_tokenizer_reports_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Tokenizer(tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(DataError, match="neither a SentencePiece model .* nor a tiktoken"):
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
    assert prompt == [tok.bos_id] + tok.encode("hello</s>") and ids[-1] == tok.eos_id  # "</s>" is text here


def test_tiktoken_file_without_the_package_names_pip_install(tmp_path, monkeypatch):
    write_tiktoken_file(tmp_path / "tokenizer.model")
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes `import tiktoken` fail
    with pytest.raises(DataError, match="pip install tiktoken"):
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
])
def test_bad_records_are_named_with_the_fix(tok, example, message):
    with pytest.raises(DataError, match=message + ".*each record must be an object"):
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


@pytest.fixture(scope="module")
def tiny_spm(tmp_path_factory):
    """A SentencePiece model trained in a second, so the error tests need no fixtures."""
    where = tmp_path_factory.mktemp("tiny")
    text = where / "corpus.txt"
    text.write_text("".join(f"the quick brown fox {i} jumps over the lazy dog\n" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(where / "tiny"), vocab_size=300,
                                   bos_id=1, eos_id=2, unk_id=0, byte_fallback=True, minloglevel=2)
    return where / "tiny.model"


GOOD = '{"instruction": "a", "input": "", "output": "b"}'


@pytest.mark.parametrize("name, content, message", [
    ("missing.json", None, "input file .*missing.json not found"),
    ("bad.jsonl", f"{GOOD}\n\n{{\"instruction\": \"a\",\n", r"bad.jsonl line 3: not valid JSON"),
    ("bad.json", f"[\n{GOOD},\n{GOOD},\n{{\"instruction\" \"a\"}}\n]", r"bad.json line 4: record 2 is not valid JSON"),
    ("comma.json", f"[{GOOD} {GOOD}]", r"expected ',' or '\]' after record 0"),
    ("tail.json", f"[{GOOD}] [", r"unexpected text after the closing"),
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
    ("surrogate.jsonl", b'{"instruction": "\\ud800", "output": "b"}\n', r'line 1: "instruction" holds a lone surrogate'),
])
def test_malformed_input_stops_with_file_place_and_fix_and_leaves_nothing(tmp_path, tiny_spm, name, content, message):
    tokenizer = tiny_spm
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        prepare([path], tokenizer, out, workers=1)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_error_deep_in_a_file_with_workers_leaves_no_output(tmp_path, tiny_spm):
    tokenizer = tiny_spm
    path = tmp_path / "long.jsonl"
    path.write_text(f"{GOOD}\n" * 3000 + '{"instruction": "a"}\n' + f"{GOOD}\n" * 10)
    with pytest.raises(DataError, match=r'long.jsonl line 3001 has no "output"'):
        prepare([path], tokenizer, tmp_path / "out", workers=2)
    assert os.listdir(tmp_path) == ["long.jsonl"]


def test_command_line_error_is_one_sentence_without_traceback(tmp_path, tiny_spm):
    tokenizer = tiny_spm
    result = subprocess.run([sys.executable, str(HERE / "data.py"), "prepare", "--input", str(tmp_path / "x.json"),
                             "--tokenizer", str(tokenizer), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
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
    with pytest.raises(DataError, match="not the output of a previous prepare"):
        prepare([path], tokenizer, tmp_path / "mine", workers=1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


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
        assert batch["n_answer_global"] == global_answer_tokens(dataset, step, 6, 4, mode, max_len) \
            == sum(sum(l != -100 for l in labels) for _, labels in want)


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


def test_pad_mode_groups_similar_lengths(dataset):
    ranges = []
    for step in range(data.GROUP_BATCHES):  # one window
        lengths = get_batch(dataset, step, 4, seed=0)["valid"].sum(1)
        ranges.append((int(lengths.min()), int(lengths.max())))
    ranges.sort()
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(ranges, ranges[1:]))
    assert ranges[0][1] < ranges[-1][0]


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
    assert epoch_of(dataset, steps, batch_size) == steps * batch_size / n


def test_batch_size_must_divide_over_ranks(dataset):
    with pytest.raises(DataError, match="batch_size 6 is not divisible by world_size 4"):
        get_batch(dataset, 0, 6, seed=0, rank=0, world_size=4)

# ===============================================================================================
# data.py: metrics, the CME tasks, the synthetic suite
# ===============================================================================================

CME_DIR = str(FIXTURES / "cme") if FIXTURES else "/nonexistent"
needs_cme_fixtures = pytest.mark.skipif(not os.path.isdir(CME_DIR), reason="shared/fixtures not found next to the repo")


# -----------------------------------------------------------------------------------------------
# metrics

def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The  Indian-Ocean! ") == "indianocean"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # "the" only as a whole word
    assert normalize_answer("曹操。") == "曹操"  # Unicode punctuation too


def test_exact_match_takes_the_best_alias_after_normalisation():
    assert exact_match("The Indian Ocean.", ["indian ocean"]) == 1.0
    assert exact_match("sunset blvd", ["Sunset Boulevard", "Sunset Blvd."]) == 1.0
    assert exact_match("Sunset", ["Sunset Boulevard", "Sunset Blvd."]) == 0.0
    assert exact_match("Paris", "paris") == 1.0


@pytest.mark.parametrize("prediction", ["B", "b", "(B)", "(b)", "[B]", "B.", "B)", "B. Paris", "B) Paris",
                                        "B.cellular telephone", "Answer: B", "answer: (B)", "The answer is B",
                                        "The correct option is B.", " B\n"])
def test_accuracy_reads_an_option_letter_in_its_common_forms(prediction):
    assert accuracy(prediction, "B") == 1.0
    assert accuracy(prediction, "C") == 0.0


@pytest.mark.parametrize("prediction", ["A or B", "B or A", "A, B", "A/B", "A and B", "A B", "(A) or (B)"])
def test_accuracy_rejects_a_prediction_naming_two_options(prediction):
    assert accuracy(prediction, "A") == 0.0 and accuracy(prediction, "B") == 0.0


def test_accuracy_does_not_mistake_words_for_option_letters():
    assert accuracy("a dog", "A") == 0.0  # an article
    assert accuracy("Because of gravity", "B") == 0.0
    assert accuracy("", "A") == 0.0
    assert accuracy("B. A city in France", "B") == 1.0  # an "A" later in the answer text is fine


def test_accuracy_on_label_words_ignores_case_punctuation_and_an_answer_prefix():
    for prediction in ["entailment", "Entailment.", "  ENTAILMENT\n", "Answer: entailment", "entailment!"]:
        assert accuracy(prediction, "entailment") == 1.0
    assert accuracy("not_entailment", "not entailment") == 1.0
    assert accuracy("neutral", "entailment") == 0.0


def test_accuracy_rejects_two_labels_and_keeps_duplicate_apart_from_not_duplicate():
    dup = ("duplicate", "not duplicate")
    nli = ("entailment", "neutral", "contradiction")
    assert accuracy("not duplicate", "duplicate", dup) == 0.0
    assert accuracy("duplicate", "not duplicate", dup) == 0.0
    assert accuracy("Not duplicate.", "not duplicate", dup) == 1.0
    assert accuracy("These are not duplicate questions.", "not duplicate", dup) == 1.0  # "duplicate" inside it
    assert accuracy("These are not duplicate questions.", "duplicate", dup) == 0.0
    assert accuracy("entailment or neutral", "entailment", nli) == 0.0
    assert accuracy("It is entailment, not contradiction", "entailment", nli) == 0.0
    assert accuracy("The relationship is entailment.", "entailment", nli) == 1.0  # one label named
    assert accuracy("The relationship is entailment.", "entailment") == 0.0  # no label set: exact only


def test_rouge_l_is_one_for_identical_and_zero_for_disjoint_or_empty_texts():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("The CAT, sat!", "the cat sat") == 1.0  # case and punctuation are not tokens
    assert rouge_l("dogs bark loudly", "the cat sat") == 0.0
    assert rouge_l("", "the cat sat") == 0.0 and rouge_l("the cat", "") == 0.0 and rouge_l("...", "...") == 0.0


def test_rouge_l_on_a_hand_computed_case():
    # tokens: the cat sat on the mat / the cat lay on a mat; LCS = the cat on mat = 4 of 6 and 6
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(2 / 3)
    # LCS(a b c d e, a c e x) = a c e: precision 3/5, recall 3/4
    p, r = 3 / 5, 3 / 4
    assert rouge_l("a b c d e", "a c e x") == pytest.approx(2 * p * r / (p + r))


def test_rouge_l_agrees_with_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])  # default: no stemming
    rng = random.Random(0)
    words = ["the", "Cat", "sat", "on", "mat", "dog's", "it", "2024", "x-ray", "naïve", "Über", "--", "a.b", "!!"]
    cases = [("", "a"), ("...", "..."), ("Hello, World!", "hello world"), ("naïve café", "naive cafe"),
             ("I'm in a LDR, 1 year left.", "In an LDR with 1 year of college left")]
    cases += [(" ".join(rng.choices(words, k=rng.randint(0, 12))), " ".join(rng.choices(words, k=rng.randint(0, 12))))
              for _ in range(300)]
    for prediction, reference in cases:
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure  # score(target, prediction)
        assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12), (prediction, reference)


def test_task_score_reads_the_reference_and_aliases_from_the_record():
    qa = Task("qa", "exact_match", 8)
    record = qa_record("Where is it?", ["Sunset Boulevard", "Sunset Blvd."])
    assert qa.score("sunset blvd", record) == 1.0
    assert qa.score("sunset", record) == 0.0
    assert Task("s", "rouge_l", 8).score("the cat", {"output": "the cat"}) == 1.0
    with pytest.raises(ValueError, match="no reference output"):
        qa.score("x", {"output": None})
    with pytest.raises(ValueError, match="metric"):
        Task("bad", "bleu", 8)


def test_evaluate_is_the_mean_score_times_100_and_needs_one_prediction_per_record():
    task = Task("nli", "accuracy", 8, ("entailment", "neutral", "contradiction"))
    records = [{"output": "entailment"}, {"output": "neutral"}, {"output": "contradiction"}, {"output": "neutral"}]
    assert evaluate(task, ["entailment", "Neutral.", "neutral", "neutral"], records) == 75.0
    with pytest.raises(ValueError, match="one prediction per record"):
        evaluate(task, ["entailment"], records)


# -----------------------------------------------------------------------------------------------
# CME_DIR templates and loaders

def _official_records():
    with open(os.path.join(str(FIXTURES), "official", "train_example.json"), encoding="utf-8") as f:
        return json.load(f)


@needs_cme_fixtures
def test_every_template_phrasing_except_rte_is_copied_from_the_official_records():
    instructions = {r["instruction"] for r in _official_records()}
    for kind, (phrasings, _) in TEMPLATES.items():
        if kind != "rte":
            assert set(phrasings) <= instructions, kind


@needs_cme_fixtures
def test_templates_rebuild_official_records_exactly():
    official = _official_records()
    by_input = {r["input"]: r for r in official}
    nli = next(r for r in official if r["output"] == "neutral" and r["input"].startswith("Sentence 1: Colorz"))
    premise, hypothesis = nli["input"][len("Sentence 1: "):].split("\nSentence 2: ")
    assert make_record("nli", "neutral", nli["instruction"], premise=premise, hypothesis=hypothesis) == nli
    mc = by_input["Question: Which technology was developed most recently?\nChoices: A.cellular telephone, "
                  "B.television, C.refrigerator, D.airplane"]
    assert make_record("choice", "A", question="Which technology was developed most recently?",
                       options=["cellular telephone", "television", "refrigerator", "airplane"]) == mc
    blank = by_input["Sentence: 'Kayla was smarter than Maria, so _ had to look up how to keep vinyl records.'\n"
                     "Option A: 'Kayla'\nOption B: 'Maria'"]
    assert make_record("blank", "B", blank["instruction"], option1="Kayla", option2="Maria",
                       sentence="Kayla was smarter than Maria, so _ had to look up how to keep vinyl records.") == blank
    pair = by_input["Text 1: How do I improve my English speaking?\nText 2: How can I improve my English pronunciation?"]
    assert make_record("paraphrase", "duplicate", text1="How do I improve my English speaking?",
                       text2="How can I improve my English pronunciation?") == pair
    qa = next(r for r in official if r["instruction"] == "where does the movie dazed and confused take place")
    assert {k: v for k, v in qa_record(qa["instruction"], ["Texas"]).items() if k != "answers"} == qa


@needs_cme_fixtures
def test_rte_loader_reads_the_glue_tsv_with_balanced_labels():
    records = CME_TASKS["rte"].load(os.path.join(CME_DIR, "rte", "dev.tsv"))
    assert len(records) == 30
    assert [r["output"] for r in records[:4]] == ["not entailment"] * 3 + ["entailment"]  # indices 57, 81, 115, 129
    assert sum(r["output"] == "entailment" for r in records) == 15
    assert records[0]["input"].startswith("Sentence 1: Workers at the Lufthansa Technik")


@needs_cme_fixtures
def test_qqp_loader_handles_crlf_and_keeps_a_labelless_test_file_loadable():
    dev = CME_TASKS["qqp"].load(os.path.join(CME_DIR, "qqp", "dev.tsv"))  # CRLF line endings
    assert len(dev) == 9 and not any("\r" in r["input"] or "\r" in r["output"] for r in dev)
    assert [r["output"] for r in dev] == ["not duplicate"] * 2 + ["duplicate"] + ["not duplicate"] * 2 + ["duplicate"] * 3 + ["not duplicate"]
    assert dev[0]["input"] == "Text 1: Why are African-Americans so beautiful?\nText 2: Why are hispanics so beautiful?"
    train = CME_TASKS["qqp"].load(os.path.join(CME_DIR, "qqp", "train.tsv"))
    assert len(train) == 9 and train[1]["output"] == "duplicate"
    test = CME_TASKS["qqp"].load(os.path.join(CME_DIR, "qqp", "test.tsv"))
    assert len(test) == 9 and all(r["output"] is None for r in test)


@needs_cme_fixtures
def test_anli_loader_maps_e_n_c_across_the_three_rounds():
    load = CME_TASKS["anli"].load
    r1 = load(os.path.join(CME_DIR, "anli", "R1", "dev.jsonl"))
    assert [r["output"] for r in r1] == ["contradiction", "entailment", "contradiction", "neutral", "contradiction"]
    assert r1[1]["input"].endswith("\nSentence 2: Franco Zeffirelli had a political career")
    rounds = [load(os.path.join(CME_DIR, "anli", f"R{k}", f"{s}.jsonl")) for k in (1, 2, 3) for s in ("dev", "test")]
    assert sum(map(len, rounds)) == 30
    assert {r["output"] for rs in rounds for r in rs} == {"entailment", "neutral", "contradiction"}


@needs_cme_fixtures
def test_winogrande_loader_turns_answers_1_2_into_letters_and_keeps_the_blank():
    dev = CME_TASKS["winogrande"].load(os.path.join(CME_DIR, "winogrande", "dev.jsonl"))
    assert [r["output"] for r in dev] == ["B", "A"]
    assert dev[0]["input"] == ("Sentence: 'Ian volunteered to eat Dennis's menudo after already having a bowl because "
                               "_ despised eating intestine.'\nOption A: 'Ian'\nOption B: 'Dennis'")
    assert [r["output"] for r in CME_TASKS["winogrande"].load(os.path.join(CME_DIR, "winogrande", "train_xl.jsonl"))] == ["A", "B", "B", "A"]
    assert [r["output"] for r in CME_TASKS["winogrande"].load(os.path.join(CME_DIR, "winogrande", "test.jsonl"))] == [None, None]


@needs_cme_fixtures
def test_arc_loader_reads_nested_questions_and_numeric_choice_labels(tmp_path):
    dev = CME_TASKS["arc"].load(os.path.join(CME_DIR, "arc", "ARC-Challenge-Dev.jsonl"))
    assert [r["output"] for r in dev] == ["D", "C"]
    assert dev[1]["input"].endswith("\nChoices: A.fog, B.rain, C.drought, D.tornado")
    numeric = {"id": "x", "question": {"stem": "Which is a gas?", "choices": [
        {"text": "ice", "label": "1"}, {"text": "water", "label": "2"}, {"text": "steam", "label": "3"}]}, "answerKey": "3"}
    (tmp_path / "arc.jsonl").write_text(json.dumps(numeric) + "\n")
    [record] = CME_TASKS["arc"].load(str(tmp_path / "arc.jsonl"))
    assert record["output"] == "C" and record["input"] == "Question: Which is a gas?\nChoices: A.ice, B.water, C.steam"


@needs_cme_fixtures
def test_mmlu_loader_reads_headerless_csv_with_quoted_and_multiline_fields(tmp_path):
    law = CME_TASKS["mmlu"].load(os.path.join(CME_DIR, "mmlu", "professional_law_test.csv"))
    assert len(law) == 10 and [r["output"] for r in law[:3]] == ["C", "B", "D"]
    algebra = CME_TASKS["mmlu"].load(os.path.join(CME_DIR, "mmlu", "abstract_algebra_dev.csv"))
    assert algebra[0]["input"] == ("Question: Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n"
                                   "Choices: A.0, B.1, C.2, D.3") and algebra[0]["output"] == "B"
    assert '"Whenever a person knows' in law[1]["input"]  # CSV's doubled quotes undone
    (tmp_path / "x_test.csv").write_text('"Line one,\nline two ""quoted""?",a,b,c,d,D\nsecond,1,2,3,4,A\n')
    (tmp_path / "y_test.csv").write_bytes("\ufeffq?,a,b,c,d,C\n".encode())  # a byte-order mark, as Excel writes
    records = CME_TASKS["mmlu"].load(str(tmp_path / "x_test.csv"))
    assert records[0]["input"].startswith('Question: Line one,\nline two "quoted"?\nChoices: A.a')
    assert [r["output"] for r in records] == ["D", "A"]
    assert CME_TASKS["mmlu"].load(str(tmp_path / "y_test.csv"))[0]["input"].startswith("Question: q?\n")
    out = str(tmp_path / "mmlu.jsonl")  # one evaluation set from several subjects' files
    assert write_eval_set("mmlu", [str(tmp_path / "x_test.csv"), str(tmp_path / "y_test.csv")], out) == 3


@needs_cme_fixtures
def test_webqa_loader_reads_webquestions_target_values_and_baidu_webqa(tmp_path):
    webq = CME_TASKS["webqa"].load(os.path.join(CME_DIR, "webquestions", "webquestions.examples.test.json"))
    assert len(webq) == 25
    assert webq[0]["answers"] == ["Jamaican Creole English Language", "Jamaican English"]
    assert webq[1]["answers"] == ["Lawyer"]
    franklin = next(r for r in webq if "ben franklin" in r["instruction"])
    assert franklin["answers"] == ["Lightning rod", "Franklin stove", "Bifocals", "Glass harmonica"]
    baidu = {"Q_1": {"question": "三国中谁说出宁教我负天下人", "evidences": {
        "Q_1_0": {"answer": ["曹操"], "evidence": "宁教我负天下人，休教天下人负我。曹操说。"},
        "Q_1_1": {"answer": ["no_answer"], "evidence": "无关。"},
        "Q_1_2": {"answer": ["曹孟德", "曹操"], "evidence": "曹孟德……"}}}}
    (tmp_path / "me_test.ann.json").write_text(json.dumps(baidu, ensure_ascii=False), encoding="utf-8")
    [record] = CME_TASKS["webqa"].load(str(tmp_path / "me_test.ann.json"))
    assert record == {"instruction": "三国中谁说出宁教我负天下人", "input": "", "output": "曹操", "answers": ["曹操", "曹孟德"]}
    assert CME_TASKS["webqa"].score("曹操。", record) == 1.0


@needs_cme_fixtures
def test_nq_and_triviaqa_loaders_keep_every_answer_alias():
    nq = CME_TASKS["nq"].load(os.path.join(CME_DIR, "nq_open", "NQ-open.dev.jsonl"))
    assert len(nq) == 30 and nq[0]["answers"] == ["14 December 1972 UTC", "December 1972"]
    assert nq[0]["instruction"] == "when was the last time anyone was on the moon" and nq[0]["input"] == ""
    assert len(CME_TASKS["nq"].load(os.path.join(CME_DIR, "nq_open", "NQ-open.efficientqa.test.1.1.jsonl"))) == 10
    [trivia] = CME_TASKS["triviaqa"].load(os.path.join(CME_DIR, "triviaqa", "triviaqa_sample.json"))
    assert trivia["instruction"] == "Which Lloyd Webber musical premiered in the US on 10th December 1993?"
    assert trivia["output"] == "sunset boulevard"  # lower case, as the official TriviaQA-style records
    assert {"Sunset Blvd", "West Sunset Boulevard", "sunset bulevard"} <= set(trivia["answers"])
    assert CME_TASKS["triviaqa"].score("Sunset Blvd.", trivia) == 1.0


@needs_cme_fixtures
def test_tldr_loader_takes_the_post_and_the_human_reference_summary():
    [record] = CME_TASKS["oai_sum"].load(os.path.join(CME_DIR, "tldr", "README_comparisons_example.json"))
    with open(os.path.join(CME_DIR, "tldr", "README_comparisons_example.json"), encoding="utf-8") as f:
        row = json.load(f)
    assert record["input"] == row["info"]["post"]
    assert record["output"].startswith("we suspect other party")  # policy "ref", leading space gone
    assert record["instruction"] == TEMPLATES["summary"][0][0]


def test_tldr_loader_reads_tldr_3_filtered_rows(tmp_path):
    rows = [{"id": "t3_1", "subreddit": "advice", "title": "T", "post": "Long post.\n\nMore.", "summary": " short one"},
            {"id": "t3_2", "subreddit": "advice", "title": "U", "post": "Other post.", "summary": " other"}]
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = CME_TASKS["oai_sum"].load(str(tmp_path / "valid.jsonl"))
    assert [(r["input"], r["output"]) for r in records] == [("Long post.\n\nMore.", "short one"), ("Other post.", "other")]


@needs_cme_fixtures
def test_imdb_loader_reads_aclimdb_folders_and_the_fastnlp_tsv():
    records = CME_TASKS["imdb"].load(os.path.join(CME_DIR, "imdb", "aclImdb", "test"))
    assert [r["output"] for r in records] == ["positive", "positive", "negative", "negative"]
    assert [len(r["input"]) for r in records] == [794, 2004, 1179, 1272]  # SOURCES.md's character counts
    assert records[0]["input"].startswith("I went and saw this movie last night")  # pos/0_10.txt comes first
    tsv = CME_TASKS["imdb"].load(os.path.join(CME_DIR, "imdb", "fastnlp_tsv", "dev.txt"))
    assert [r["output"] for r in tsv] == ["negative"] * 4 + ["positive"] * 2
    assert "<br /><br />" in tsv[0]["input"]  # kept, as the official IMDB-style records keep them


@needs_cme_fixtures
def test_write_eval_set_writes_a_json_list_or_jsonl_in_the_official_format(tmp_path):
    rounds = [os.path.join(CME_DIR, "anli", f"R{k}", "test.jsonl") for k in (1, 2, 3)]
    assert write_eval_set("anli", rounds, str(tmp_path / "anli.json")) == 15
    with open(tmp_path / "anli.json", encoding="utf-8") as f:
        records = json.load(f)
    assert len(records) == 15 and all(set(r) == {"instruction", "input", "output"} for r in records)
    assert write_eval_set("nq", os.path.join(CME_DIR, "nq_open", "NQ-open.dev.jsonl"), str(tmp_path / "nq.jsonl"), limit=5) == 5
    lines = (tmp_path / "nq.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["answers"] == ["14 December 1972 UTC", "December 1972"]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


@needs_cme_fixtures
def test_an_eval_set_from_a_labelless_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"9 of 9 records in .*test.tsv have no label .*labelled split"):
        write_eval_set("qqp", os.path.join(CME_DIR, "qqp", "test.tsv"), str(tmp_path / "qqp.json"))
    assert not (tmp_path / "qqp.json").exists()


@needs_cme_fixtures
def test_data_eval_set_command_writes_the_file_or_exits_with_one_line(tmp_path, capsys):
    data.main(["eval_set", "--task", "rte", "--raw", os.path.join(CME_DIR, "rte", "dev.tsv"), "--out", str(tmp_path / "rte.jsonl")])
    assert "wrote 30 rte records" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^data.py eval_set: error: .*nope.tsv does not exist"):
        data.main(["eval_set", "--task", "rte", "--raw", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match=r"x.txt must end in .json"):
        data.main(["eval_set", "--task", "rte", "--raw", os.path.join(CME_DIR, "rte", "dev.tsv"), "--out", str(tmp_path / "x.txt")])


MALFORMED_RAW = [  # task, file name, content, what the message must say
    ("anli", "dev.jsonl", '{"context": "a", "hypothesis": "b", "label": "e"}\n{"context": "a", oops}\n', r"dev.jsonl line 2 is not valid JSON"),
    ("anli", "dev.jsonl", '{"context": "a", "hypothesis": "b", "label": "x"}\n', r"dev.jsonl line 1 has the label 'x'"),
    ("anli", "dev.jsonl", '{"premise": "a", "hypothesis": "b", "label": "e"}\n', r"dev.jsonl line 1 has no 'context' field"),
    ("qqp", "dev.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\r\n1\t2\t3\ta?\t0\r\n", r"dev.tsv line 2 has 5 tab-separated fields"),
    ("rte", "dev.tsv", "index\tpremise\tlabel\n0\ta\tentailment\n", r"dev.tsv has the columns .* needs \['sentence1', 'sentence2'\]"),
    ("mmlu", "x_test.csv", "q,a,b,c,d,A\nq,a,b,c,A\n", r"x_test.csv line 2 has 5 fields"),
    ("mmlu", "x_test.csv", "q,a,b,c,d,E\n", r"x_test.csv line 1 has the label 'E'"),
    ("arc", "arc.jsonl", '{"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "B"}\n', r"arc.jsonl line 1 has the label 'B'"),
    ("winogrande", "dev.jsonl", '{"sentence": "_ x", "option1": "a", "answer": "1"}\n', r"dev.jsonl line 1 has no 'option2' field"),
    ("webqa", "q.json", '[{"utterance": "q", "targetValue": "Paris"}]', r"q.json record 0 has the targetValue 'Paris'"),
    ("webqa", "q.json", '[{"utterance": "q",\n "targetValue": }]', r"q.json line 2 is not valid JSON"),
    ("imdb", "train.txt", "pos\tgreat film\nmaybe\tso-so\n", r"train.txt line 2 is not 'pos<TAB>review'"),
]


@pytest.mark.parametrize("task, name, content, message", MALFORMED_RAW)
def test_a_malformed_raw_file_gives_one_sentence_naming_file_and_line(tmp_path, task, name, content, message):
    path = tmp_path / name
    path.write_bytes(content.encode())
    with pytest.raises(ValueError, match=message) as error:
        CME_TASKS[task].load(str(path))
    text = str(error.value)
    assert "\n" not in text and text.endswith(".") and "; " in text  # what is wrong; what to do


def test_missing_files_and_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl does not exist"):
        CME_TASKS["nq"].load(str(tmp_path / "nope.jsonl"))
    (tmp_path / "aclImdb").mkdir()
    with pytest.raises(ValueError, match=r"aclImdb has no pos/ or neg/ folder; point at .*aclImdb/test"):
        CME_TASKS["imdb"].load(str(tmp_path / "aclImdb"))
    (tmp_path / "aclImdb" / "pos").mkdir()
    (tmp_path / "aclImdb" / "pos" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt is not named <id>_<rating>.txt; move it out of"):
        CME_TASKS["imdb"].load(str(tmp_path / "aclImdb"))
    with pytest.raises(ValueError, match="unknown task 'squad'"):
        write_eval_set("squad", str(tmp_path), str(tmp_path / "x.json"))


def test_the_registry_holds_the_eleven_cme_tasks_with_their_metrics():
    metrics = {name: t.metric for name, t in CME_TASKS.items()}
    assert metrics == {"oai_sum": "rouge_l", "imdb": "accuracy", "anli": "accuracy", "qqp": "accuracy",
                       "rte": "accuracy", "winogrande": "accuracy", "arc": "accuracy", "mmlu": "accuracy",
                       "webqa": "exact_match", "nq": "exact_match", "triviaqa": "exact_match"}


# -----------------------------------------------------------------------------------------------
# the synthetic suite

SUITE_SIZES = dict(n_train_per_task=60, n_test_per_task=40, n_val_per_task=6, corpus_docs=600, vocab_size=800)


def _tree_bytes(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def mini_cme(tmp_path_factory):
    """The built-in demo's suite (default sizes, seed 0) and a small one with another seed."""
    root = tmp_path_factory.mktemp("suite")
    return root, {"default": make_suite(str(root / "default"), seed=0), "small": make_suite(str(root / "small"), seed=1, **SUITE_SIZES)}


BOTH = pytest.mark.parametrize("which", ["default", "small"])


def test_suite_is_byte_identical_for_one_seed_and_different_for_another(tmp_path):
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        make_suite(str(tmp_path / name), seed=seed, **SUITE_SIZES)
    a, b, c = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b"), _tree_bytes(tmp_path / "c")
    assert set(a) == {"train.jsonl", "val.jsonl", "corpus.txt", "tokenizer.model", "suite.json"} | {
        os.path.join("test", f"{t}.jsonl") for t in SYNTHETIC_TASKS}
    assert a == b
    assert all(a[name] != c[name] for name in a if name != "tokenizer.model")


@BOTH
def test_suite_has_every_task_in_every_split_with_string_fields(mini_cme, which):
    root, summaries = mini_cme
    folder, summary = root / which, summaries[which]
    assert len(SYNTHETIC_TASKS) >= 6 and not set(SYNTHETIC_TASKS) & set(CME_TASKS)  # train.py finds tasks by file name
    train, val = _read_jsonl(folder / "train.jsonl"), _read_jsonl(folder / "val.jsonl")
    assert [r["task"] for r in train] != sorted(r["task"] for r in train)  # shuffled
    for split, records in [("train", train), ("val", val)]:
        assert {t: sum(r["task"] == t for r in records) for t in SYNTHETIC_TASKS} == {
            t: summary["tasks"][t][split] for t in SYNTHETIC_TASKS}, split
        assert all(summary["tasks"][t][split] > 0 for t in SYNTHETIC_TASKS)
    for name, task in SYNTHETIC_TASKS.items():
        test = _read_jsonl(folder / "test" / f"{name}.jsonl")
        assert len(test) == summary["tasks"][name]["test"] > 0
        evaluation = test + [r for r in val if r["task"] == name]
        for r in evaluation + [r for r in train if r["task"] == name]:
            assert all(isinstance(r[k], str) for k in ("instruction", "input", "output")) and r["output"]
        if task.metric == "exact_match":  # evaluation records carry every alias
            assert all(r["answers"][0] == r["output"] and all(isinstance(a, str) for a in r["answers"]) for r in evaluation)
    with open(folder / "suite.json", encoding="utf-8") as f:
        assert json.load(f) == summary
    assert summary["train"] == len(train) and summary["val"] == len(val)


@BOTH
def test_suite_labels_are_the_task_labels_and_balanced(mini_cme, which):
    root, _ = mini_cme
    train = _read_jsonl(root / which / "train.jsonl")
    for name, task in SYNTHETIC_TASKS.items():
        if task.labels is None:
            continue
        for records in ([r for r in train if r["task"] == name], _read_jsonl(root / which / "test" / f"{name}.jsonl")):
            counts = [sum(r["output"] == label for r in records) for label in task.labels]
            assert sum(counts) == len(records), name
            assert max(counts) - min(counts) <= 1, (name, counts)


def test_suite_gold_outputs_score_100_under_each_task_metric(mini_cme):
    root, _ = mini_cme
    for name, task in SYNTHETIC_TASKS.items():
        records = _read_jsonl(root / "default" / "test" / f"{name}.jsonl")
        assert evaluate(task, [r["output"] for r in records], records) == 100.0


@BOTH
def test_suite_qa_facts_are_taught_by_the_corpus_in_other_words_and_by_no_task(mini_cme, which):
    root, _ = mini_cme
    corpus = (root / which / "corpus.txt").read_text(encoding="utf-8")
    docs = corpus.split("\n\n")
    train = _read_jsonl(root / which / "train.jsonl")
    sentences = [s for r in train for s in re.split(r"(?<=[.?!])\s+|\n", r["input"] + "\n" + r["output"])]
    for r in _read_jsonl(root / which / "test" / "qa.jsonl"):
        # the entity is the longest run of capitalised words after the question word
        entity = max((m.group() for m in re.finditer(r"[A-Z]\w+(?: [A-Z]\w+)*", r["instruction"]) if m.start() > 0), key=len)
        e, a = re.escape(entity), re.escape(r["output"])
        states = re.compile(rf"\b{e}\b.*\b{a}\b|\b{a}\b.*\b{e}\b")
        assert any(states.search(d) for d in docs), r  # the corpus states the fact ...
        assert r["instruction"] not in corpus  # ... never in the question's words ...
        assert not any(states.search(s) for s in sentences if entity in s and r["output"] in s), r  # ... nor a task


@BOTH
def test_suite_test_prompts_never_repeat_a_training_prompt(mini_cme, which):
    root, _ = mini_cme
    seen = {(r["instruction"], r["input"]) for r in _read_jsonl(root / which / "train.jsonl")}
    for name in SYNTHETIC_TASKS:
        prompts = [(r["instruction"], r["input"]) for r in _read_jsonl(root / which / "test" / f"{name}.jsonl")]
        assert len(set(prompts)) == len(prompts) and not seen & set(prompts), name


@BOTH
def test_suite_tokenizer_is_llama_like_and_every_record_fits_a_256_token_context(mini_cme, which):
    root, summaries = mini_cme
    sp = spm.SentencePieceProcessor(model_file=str(root / which / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.vocab_size() == summaries[which]["vocab_size"]
    text = "Zürich 2024 ☃\nnaïve"
    assert sp.unk_id() not in sp.encode(text) and sp.decode(sp.encode(text)) == text  # byte fallback
    records = _read_jsonl(root / which / "train.jsonl") + _read_jsonl(root / which / "val.jsonl")
    for name in SYNTHETIC_TASKS:
        records += [dict(r, task=name) for r in _read_jsonl(root / which / "test" / f"{name}.jsonl")]
    for r in records:
        prompt = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
        output = len(sp.encode(r["output"])) + 1  # + EOS
        assert 1 + len(sp.encode(prompt)) + 1 + output < 256, r  # BOS prompt EOS output EOS
        assert output <= SYNTHETIC_TASKS[r["task"]].max_new_tokens, r


def test_make_suite_refuses_a_corpus_too_small_for_its_world(tmp_path):
    with pytest.raises(ValueError, match="corpus_docs=10 is too small; use at least"):
        make_suite(str(tmp_path), corpus_docs=10)
    assert not os.listdir(tmp_path)


# ===============================================================================================
# train.py: the loop
# ===============================================================================================

import train  # noqa: E402  (kept next to its tests)

REPO = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def run_data(tmp_path_factory):
    """A small mini-CME suite, its training shards, and a tiny base pretrained on its corpus by
    train.py itself (adapter='none', packed batches): made once for the module."""
    root = tmp_path_factory.mktemp("mini")
    make_suite(str(root), seed=0, n_train_per_task=40, n_test_per_task=6, n_val_per_task=4, corpus_docs=400)
    prepare([str(root / "train.jsonl")], str(root / "tokenizer.model"), str(root / "tokens"), max_len=128,
            val_fraction=0.1, quiet=True)
    docs = [d for d in (root / "corpus.txt").read_text().split("\n\n") if d.strip()]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare([str(root / "corpus.jsonl")], str(root / "tokenizer.model"), str(root / "corpus"), max_len=128, quiet=True)
    pre = train.train(train_cfg(root, root / "pre", "--adapter=none", f"--data_dir={root / 'corpus'}", "--batch_mode=pack",
                                "--batch_size=32", "--eval_dir=", "--max_iters=40", "--eval_interval=40",
                                "--learning_rate=1e-2", "--warmup_iters=4"))
    assert all(p.requires_grad for p in pre["model"].parameters())  # full training trains everything
    assert np.mean(pre["train_losses"][-3:]) < 0.7 * np.mean(pre["train_losses"][:3])
    os.replace(root / "pre" / "model.pt", root / "base.pt")
    return root


def train_cfg(run_data, out, *flags):
    """A tiny, fast configuration on the small suite; flags override it."""
    base = [f"--data_dir={run_data / 'tokens'}", f"--eval_dir={run_data / 'test'}", f"--tokenizer={run_data / 'tokenizer.model'}",
            "--init_from=scratch", "--model=tiny", "--max_len=128", "--batch_size=8", "--max_iters=6", "--eval_interval=3",
            "--eval_iters=1", "--eval_limit=4", "--r=8", "--experts=4", "--learning_rate=3e-3", "--warmup_iters=1",
            f"--out_dir={out}"]
    return train.parse_config(base + list(flags))


def adapters_of(model):
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if teamlora.is_adapter(n)}


def assert_same_adapters(a, b, atol=0.0):
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=n)


def test_config_file_then_flags_override_the_defaults(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("r = 16\nexperts = 8\nlearning_rate = 1  # an int where a float is expected is fine\nadapter = 'lora'\n")
    cfg = train.parse_config([str(cfg_file), "--experts=2", "--targets=w1,w3"])
    assert (cfg["r"], cfg["experts"], cfg["learning_rate"], cfg["adapter"], cfg["targets"]) == (16, 2, 1.0, "lora", "w1,w3")
    assert cfg["alpha"] == train.DEFAULTS["alpha"]
    assert train.parse_config([])["adapter"] == "teamlora"


@pytest.mark.parametrize("argv,message", [
    (["--lerning_rate=1e-3"], r"unknown config key 'lerning_rate' in flag --lerning_rate=1e-3; did you mean 'learning_rate'\?"),
    (["--r=abc"], r"config key 'r' in flag --r=abc must be of type int, got 'abc'"),
    (["--competition=maybe"], r"config key 'competition' must be True, False or None \(the method's own\), got 'maybe'"),
    (["--max_iters=2.5"], r"'max_iters' .* must be of type int, got 2.5"),
    (["config/nope.py"], r"config file 'config/nope.py' does not exist"),
    (["--adapter=dora"], r"'adapter' must be one of teamlora, moelora, hydralora, lora, none, got 'dora'"),
    (["--r=10", "--experts=4"], r"r=10 is not a multiple of experts=4"),
    (["--batch_size=10", "--grad_accum=4"], r"batch_size=10 must be a multiple of grad_accum=4"),
    (["--eval_only"], r"flag '--eval_only' needs a value: write --eval_only=VALUE"),
    (["--dtype=float16"], r"'dtype' must be one of float32, bfloat16"),
])
def test_configuration_errors_name_the_key_in_one_sentence(argv, message, capsys):
    with pytest.raises(train.UserError, match=message):
        train.parse_config(argv)
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_bad_config_file_and_missing_paths_give_one_sentence(tmp_path, run_data):
    bad = tmp_path / "bad.py"
    bad.write_text("r = = 3\n")
    with pytest.raises(train.UserError, match="config file .*bad.py' failed to run"):
        train.parse_config([str(bad)])
    unknown = tmp_path / "unknown.py"
    unknown.write_text("experst = 8\n")
    with pytest.raises(train.UserError, match="unknown config key 'experst' in config file .*; did you mean 'experts'"):
        train.parse_config([str(unknown)])
    with pytest.raises(train.UserError, match="base checkpoint 'nope.pt' does not exist"):
        train.train(train_cfg(run_data, tmp_path / "o", "--init_from=nope.pt"))
    with pytest.raises(train.UserError, match="eval_only: .*adapter.pt does not exist"):
        train.train(train_cfg(run_data, tmp_path / "never", "--eval_only=True"))
    with pytest.raises(train.UserError, match="nothing to resume"):
        train.train(train_cfg(run_data, tmp_path / "empty", "--init_from=resume"))
    with pytest.raises(DataError, match="has no summary.json"):
        train.train(train_cfg(run_data, tmp_path / "o", f"--data_dir={tmp_path}"))


def test_loss_falls_and_only_adapters_change(run_data, tmp_path):
    base = run_data / "base.pt"
    cfg = train_cfg(run_data, tmp_path / "out", f"--init_from={base}", "--max_iters=30", "--eval_interval=30", "--eval_limit=2")
    summary = train.train(cfg)
    losses = summary["train_losses"]
    assert len(losses) == 30 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    state = torch.load(base, weights_only=True)["model"]
    for n, p in summary["model"].named_parameters():
        if teamlora.is_adapter(n):
            assert p.requires_grad
        else:
            assert not p.requires_grad and torch.equal(p.cpu(), state[n]), f"base parameter {n} changed"
    saved = torch.load(tmp_path / "out" / "adapter.pt", weights_only=True)
    assert_same_adapters(saved, adapters_of(summary["model"]))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["scores"]) == set(SYNTHETIC_TASKS) and set(results["expert_load"]) == set(SYNTHETIC_TASKS)
    for load in results["expert_load"].values():
        assert abs(sum(load) - 1) < 1e-4
    lines = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert any("val_loss" in line for line in lines) and all(math.isfinite(line.get("loss", 0)) for line in lines)


def test_gradient_accumulation_equals_one_large_batch(run_data, tmp_path, monkeypatch):
    """The gradients handed to the optimizer, step by step (AdamW is blind to a wrong loss scale,
    so this compares what it is given, not what it makes of it)."""
    real_clip = torch.nn.utils.clip_grad_norm_

    def run(out, *more):
        grads = []

        def capture(params, *a, **k):
            params = list(params)
            grads.append([p.grad.clone() for p in params])
            return real_clip(params, *a, **k)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture)
        train.train(train_cfg(run_data, out, "--dropout=0.0", "--balance_coef=0.0", "--eval_dir=", "--max_iters=3", *more))
        return grads

    one, acc = run(tmp_path / "a"), run(tmp_path / "b", "--grad_accum=4")
    assert len(one) == len(acc) == 3
    for a, b in zip(one[0], acc[0]):  # the same weights, so the same gradient up to float rounding
        assert (b - a).abs().max() <= 1e-5 * a.abs().max()
    assert sum(g.abs().sum() > 0 for g in one[0]) >= 12  # every lora_B (A and the router wait for B != 0)
    # later steps start from weights that AdamW's first step (g / |g|) made differ in the last bits
    final = [torch.load(tmp_path / d / "adapter.pt", weights_only=True) for d in ("a", "b")]
    assert_same_adapters(final[0], final[1], atol=3e-5)  # one AdamW step moves a weight by ~lr = 3e-3


def test_resume_continues_exactly_as_an_uninterrupted_run(run_data, tmp_path):
    flags = ("--dropout=0.1", "--eval_dir=", "--max_iters=6", "--eval_interval=3")
    whole = train.train(train_cfg(run_data, tmp_path / "whole", *flags))
    train.train(train_cfg(run_data, tmp_path / "part", *flags, "--max_iters=3", "--lr_decay_iters=6"))
    resumed = train.train(train.parse_config([f"--out_dir={tmp_path / 'part'}", "--init_from=resume", "--max_iters=6"]))
    assert resumed["step"] == 6
    assert_same_adapters(adapters_of(whole["model"]), adapters_of(resumed["model"]))
    with pytest.raises(train.UserError, match=r"learning_rate, r cannot change when resuming \(the run was learning_rate=0.003, r=8\)"):
        train.train(train.parse_config([f"--out_dir={tmp_path / 'part'}", "--init_from=resume", "--r=16", "--learning_rate=1e-3"]))


def test_validation_uses_the_same_records_for_every_seed(run_data, tmp_path):
    """With lr 0 the adapters stay at B = 0 (the base's function), so only the records could differ."""
    runs = [train.train(train_cfg(run_data, tmp_path / f"s{seed}", "--eval_dir=", "--max_iters=1", "--eval_interval=1",
                                  "--learning_rate=0.0", f"--seed={seed}", f"--init_from={run_data / 'base.pt'}"))
            for seed in (1, 2)]
    assert runs[0]["val_loss"] == pytest.approx(runs[1]["val_loss"], rel=1e-6)


def test_resume_runs_on_the_runs_own_device_unless_told_otherwise(run_data, tmp_path, monkeypatch):
    """Found on a GPU machine: a CPU run resumed with the default device='auto' moved to the GPU."""
    train.train(train_cfg(run_data, tmp_path / "p", "--eval_dir=", "--max_iters=2", "--eval_interval=2", "--device=cpu"))
    seen, real = [], train.setup_distributed
    monkeypatch.setattr(train, "setup_distributed", lambda cfg: (seen.append(cfg["device"]), real(cfg))[1])
    train.train(train.parse_config([f"--out_dir={tmp_path / 'p'}", "--init_from=resume", "--max_iters=3"]))
    train.train(train.parse_config([f"--out_dir={tmp_path / 'p'}", "--init_from=resume", "--max_iters=4", "--device=auto"]))
    assert seen == ["cpu", "auto"]


def test_ctrl_c_writes_a_checkpoint_and_nan_stops_keeping_the_last_good_one(run_data, tmp_path, monkeypatch):
    real_get_batch = data.get_batch

    def interrupt_at_step_4(dataset, step, *a, **k):
        if step == 4:
            raise KeyboardInterrupt
        return real_get_batch(dataset, step, *a, **k)

    monkeypatch.setattr(data, "get_batch", interrupt_at_step_4)
    out = train.train(train_cfg(run_data, tmp_path / "int", "--eval_dir=", "--eval_interval=100"))
    assert out["interrupted"] and torch.load(tmp_path / "int" / "ckpt.pt", weights_only=False)["iter"] == 4
    monkeypatch.setattr(data, "get_batch", real_get_batch)

    real_forward = Transformer.forward

    def nan_from_step_4(self, tokens, targets=None, **k):
        logits, loss = real_forward(self, tokens, targets, **k)
        nan_from_step_4.calls += 1
        return logits, (loss * float("nan") if nan_from_step_4.calls > 3 and loss is not None else loss)
    nan_from_step_4.calls = 0
    monkeypatch.setattr(Transformer, "forward", nan_from_step_4)
    with pytest.raises(train.UserError, match="the loss became nan at step 3; the last good checkpoint .* is kept"):
        train.train(train_cfg(run_data, tmp_path / "nan", "--eval_dir=", "--eval_interval=2", "--eval_iters=0"))
    assert torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=False)["iter"] == 2


def test_eval_only_reloads_the_adapter_and_reproduces_the_scores(run_data, tmp_path):
    first = train.train(train_cfg(run_data, tmp_path / "o", "--max_iters=8", "--eval_interval=8"))
    again = train.train(train_cfg(run_data, tmp_path / "o", "--eval_only=True"))
    assert again["scores"] == first["scores"]
    assert_same_adapters(adapters_of(first["model"]), adapters_of(again["model"]))


def test_moelora_and_lora_configurations_build_the_right_layers():
    cfg = dict(train.DEFAULTS, r=12, experts=3, alpha=24.0)
    moe = TeamLoRALinear(nn.Linear(6, 5), dropout=0.0, **train.adapter_kwargs({**cfg, "adapter": "moelora"}))
    assert moe.lora_M is None and moe.experts == 3 and moe.scaling == (24.0 / 3) / 4  # alpha/k over r_B
    x = torch.randn(4, 6)
    moe(x)
    torch.testing.assert_close(moe.last_omega.sum(-1) * moe.scaling, torch.full((4,), 24.0 / 4))  # MoELoRA: sum_i w_i alpha/r_B
    lora = TeamLoRALinear(nn.Linear(6, 5), **train.adapter_kwargs({**cfg, "adapter": "lora"}))
    assert lora.experts == 1 and lora.lora_router is None and lora.scaling == 24.0 / 12


def test_hydralora_matches_its_equation_in_float64_and_trains_through_train_py(run_data, tmp_path):
    """HydraLoRA: h = x W0^T + b + (alpha / r) sum_i softmax(x Wr^T)_i B_i A x, with one A (r x d_in)
    and k heads B_i (d_out x r) side by side; rebuilt here from the equation."""
    torch.manual_seed(0)
    base = nn.Linear(10, 7).double()
    layer = train.HydraLoRALinear(base, r=3, experts=4, alpha=6.0, dropout=0.0, adapter_dtype=torch.float64)
    assert layer.lora_A.shape == (3, 10) and layer.lora_B.shape == (7, 12) and layer.lora_M is None
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 10, dtype=torch.float64)
    phi = torch.softmax(x @ layer.lora_router.T, -1)
    Ax = x @ layer.lora_A.T
    heads = [Ax @ layer.lora_B[:, 3 * i:3 * (i + 1)].T for i in range(4)]
    want = base(x) + 6.0 / 3 * sum(phi[..., i:i + 1] * heads[i] for i in range(4))
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.last_omega.sum(-1), torch.full((2, 5), 4.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="HydraLoRA has no interaction matrix"):
        train.HydraLoRALinear(nn.Linear(4, 4), r=2, experts=2, competition=True)
    out = train.train(train_cfg(run_data, tmp_path / "h", "--adapter=hydralora", "--r=4"))
    hydra = [m for m in out["model"].modules() if isinstance(m, train.HydraLoRALinear)]
    assert hydra and all(m.lora_A.shape[0] == 4 and m.lora_B.shape[1] == 16 for m in hydra)
    assert any(m.lora_B.abs().sum() > 0 for m in hydra)  # the heads trained
    assert np.mean(out["train_losses"][-2:]) < out["train_losses"][0]
    assert set(out["scores"]) == set(SYNTHETIC_TASKS)


@pytest.mark.parametrize("adapter,competition,has_m", [
    ("teamlora", None, True), ("teamlora", False, False), ("moelora", None, False), ("moelora", True, True),
    ("hydralora", None, False), ("lora", True, False)])
def test_competition_none_means_each_methods_own_choice(adapter, competition, has_m):
    cfg = dict(train.DEFAULTS, adapter=adapter, competition=competition, r=8, experts=4)
    kw = train.adapter_kwargs(cfg)
    layer = (kw.pop("cls", None) or TeamLoRALinear)(nn.Linear(6, 5), **kw)
    assert (layer.lora_M is not None) == has_m


@pytest.mark.parametrize("adapter,r,pct", [("lora", 32, "0.67"), ("lora", 128, "2.68"), ("teamlora", 128, "2.71")])
def test_dry_run_reproduces_the_papers_params_percentages(adapter, r, pct, capsys):
    """Table 2 of the paper, Chinese-LLaMA-2-7B with FFN adapters, counted on the meta device."""
    out = train.train(train.parse_config(["config/cme_llama2_7b.py", "--dry_run=True", "--model=chinese-llama2-7b",
                                          "--init_from=nowhere", f"--adapter={adapter}", f"--r={r}"]))
    assert f"{out['params_pct']:.2f}" == pct
    assert f"= {pct}% of the base" in capsys.readouterr().out


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kw)


def _flags(run_data, out, *more):
    return [f"--data_dir={run_data / 'tokens'}", "--eval_dir=", f"--tokenizer={run_data / 'tokenizer.model'}",
            "--init_from=scratch", "--model=tiny", "--max_len=128", "--batch_size=8", "--max_iters=4", "--eval_interval=2",
            "--eval_iters=1", "--r=8", "--dropout=0.0", "--device=cpu", f"--out_dir={out}", *more]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_torchrun_equals_one_process(run_data, tmp_path, mode):
    """The global batch is cut the same way for 2 processes as for 1 process with 2 accumulation
    steps, so the adapters must agree to float rounding (gloo on CPU)."""
    one = _run([sys.executable, "train.py", *_flags(run_data, tmp_path / "one", "--grad_accum=2")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--",
                *_flags(run_data, tmp_path / "two", f"--fsdp={mode == 'fsdp'}")])  # "--": torchrun would eat --r=8
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "adapter.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "adapter.pt", weights_only=True)
    assert_same_adapters(a, b, atol=1e-6)
    assert any(t.abs().sum() > 0 for n, t in b.items() if n.endswith("lora_B"))  # it trained


def test_kill_9_mid_run_keeps_a_good_checkpoint_and_resume_matches(run_data, tmp_path):
    import signal
    import time as _time
    flags = _flags(run_data, tmp_path / "killed", "--max_iters=40", "--eval_interval=1", "--dropout=0.1")
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpt = tmp_path / "killed" / "ckpt.pt"
    deadline = _time.time() + 120
    while _time.time() < deadline and not (ckpt.exists() and torch.load(ckpt, weights_only=False)["iter"] >= 3):
        _time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # at any moment: checkpoints are written every step
    proc.wait()
    state = torch.load(ckpt, weights_only=False)  # the last good checkpoint loads
    assert 3 <= state["iter"] < 40
    resumed = _run([sys.executable, "train.py", f"--out_dir={tmp_path / 'killed'}", "--init_from=resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = _run([sys.executable, "train.py", *_flags(run_data, tmp_path / "whole", "--max_iters=40", "--eval_interval=40",
                                                      "--dropout=0.1")])
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert_same_adapters(torch.load(tmp_path / "killed" / "adapter.pt", weights_only=True),
                         torch.load(tmp_path / "whole" / "adapter.pt", weights_only=True))


def test_the_demo_builds_its_data_and_base_from_nothing(tmp_path, monkeypatch, capsys):
    """`python train.py` with no arguments, in an empty folder, with the pretraining shrunk."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(train.PRETRAIN, "max_iters", 3)
    monkeypatch.setitem(train.PRETRAIN, "model", "tiny")
    cfg = train.parse_config(["--max_iters=2", "--eval_limit=2", "--model=tiny"])
    summary = train.train(cfg)
    out = capsys.readouterr().out
    assert "building the synthetic mini-CME suite" in out and "pretraining a tiny LLaMA" in out
    assert (tmp_path / "data/mini_cme/base.pt").is_file() and (tmp_path / "out/demo/adapter.pt").is_file()
    assert set(summary["scores"]) == set(SYNTHETIC_TASKS) and "expert load" in out
    assert torch.load(tmp_path / "data/mini_cme/base.pt", weights_only=True)["model_args"]["dim"] == 64
    train.train(cfg)  # a second run reuses everything
    assert "building" not in capsys.readouterr().out


# ===============================================================================================
# bench.py: a smoke test (the measurements themselves are the benchmark's, never a test's)
# ===============================================================================================

import bench  # noqa: E402


def test_quick_run_prints_every_section_with_every_variant(capsys):
    bench.main(["--quick", "--no-compile", "--threads=1"])  # compile's warm-up alone takes a minute
    out = capsys.readouterr().out
    for header in ("## 1. Layer level", "## 2. Model level", "## 3. Beyond the paper", "## 4. Prefill and decode",
                   "## 5. 7B-shaped", "## Targets"):
        assert header in out, header
    layer, model = out.split("## 2.")[0], out.split("## 2.")[1].split("## 3.")[0]
    variants = ("LoRA", "MoELoRA loop", "TeamLoRA loop", "TeamLoRA fused")
    for variant in variants:  # a row in the table of each k (2, 4, 8)
        assert sum(line.startswith(variant + "  ") for line in layer.splitlines()) == 3, variant
    for section in (layer.split("Figure 4a")[1], model):  # a column in the summaries
        header = next(line for line in section.splitlines() if line.startswith("k  "))
        assert all(v in header for v in variants), header
    assert "TeamLoRA compiled" not in out
    assert "nan" not in out.lower()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is missing")
def test_cuda_without_a_gpu_skips_with_one_sentence(capsys):
    bench.main(["--device=cuda"])
    out = capsys.readouterr().out.strip()
    assert out.startswith("skipped:") and "CUDA is not available" in out and len(out.splitlines()) == 1


def test_unknown_section_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--section=layer,speed"])
    assert e.value.code == 2 and "unknown section" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------
# study.py: the mini-CME study's pipeline, end to end on the small suite

import study  # noqa: E402


def test_study_runs_end_to_end_and_its_tables_are_the_runs_means(run_data, tmp_path, capsys):
    out = tmp_path / "study"
    flags = [f"--data_dir={run_data / 'tokens'}", f"--eval_dir={run_data / 'test'}", f"--tokenizer={run_data / 'tokenizer.model'}",
             f"--init_from={run_data / 'base.pt'}", "--max_len=128", "--batch_size=8", "--eval_limit=4", "--r=8",
             "--eval_batch_size=32", f"--out={out}", "--seeds=2", "--steps=3", "--runs=lora32,hydralora,teamlora"]
    results = study.main(flags)
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert report.strip() in printed
    for name in ("lora32", "hydralora", "teamlora"):
        assert len(results[name]) == 2 and all(len(r["curve"]) > 0 for r in results[name])
    # a cell of the report is the mean and standard deviation of the runs' own results.json
    scores = [json.loads((out / f"teamlora-seed{s}" / "results.json").read_text())["scores"] for s in (1, 2)]
    task = sorted(scores[0])[0]
    m, sd = np.mean([s[task] for s in scores]), np.std([s[task] for s in scores], ddof=1)
    row = next(line for line in report.splitlines() if line.startswith("| TeamLoRA 4x8 |"))
    assert row.split(" | ")[2] == f"{m:.1f}±{sd:.1f}"
    assert "| MoELoRA 4x8 | (not run) |" in report  # rows of runs not made are marked, never dropped
    assert "| LoRA r=32 |" in report and ("within the seed spread" in report or "exceeds the seed spread" in report)
    assert "T = TeamLoRA 4x8" in report and "expert load of TeamLoRA 4x8" in report
    # rerunning finds every run finished and only reprints the tables
    study.main(flags)
    assert capsys.readouterr().out.count("done before") == 6
    # a run stopped after its checkpoint (Ctrl-C) but before its scores is resumed, not redone
    first = json.loads((out / "lora32-seed1" / "results.json").read_text())
    (out / "lora32-seed1" / "results.json").unlink()
    study.main(flags)
    assert capsys.readouterr().out.count("done before") == 5
    assert "resumed from" in (out / "lora32-seed1" / "stdout.txt").read_text()
    assert json.loads((out / "lora32-seed1" / "results.json").read_text())["scores"] == first["scores"]


def test_study_rejects_unknown_runs_and_train_keys(capsys):
    with pytest.raises(SystemExit):
        study.main(["--runs=lora32,dora"])
    assert "unknown run(s) dora" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--seeds=three"])
    assert "--seeds must be a whole number, got 'three'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--learning_rat=1e-3", "--report"])
    assert "unknown config key 'learning_rat'" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------
# CUDA: the same properties on a GPU (skipped without one; CI has none)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_model_matches_the_cpu_with_packing_masks_and_cached_generation():
    cpu, gpu = tiny_model(seed=5), tiny_model(seed=5).cuda()
    tokens = torch.randint(0, 512, (3, 17))
    seq_ids = torch.tensor([[0] * 9 + [1] * 8, [0] * 17, [0] * 4 + [1] * 6 + [2] * 7])  # the masked (packed) path
    for kw in ({}, {"seq_ids": seq_ids}):
        want = cpu(tokens, **kw)[0]
        got = gpu(tokens.cuda(), **{k: v.cuda() for k, v in kw.items()})[0]
        torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (1, 6, 11)]
    uncached = []
    for p in prompts:  # greedy decoding that recomputes the whole sequence at every step
        tokens = list(p)
        for _ in range(10):
            tokens.append(int(logits_of(gpu, torch.tensor([tokens], device="cuda"))[0, -1].argmax()))
        uncached.append(tokens[len(p):])
    assert gpu.generate(prompts, 10) == uncached


@cuda
def test_cuda_bf16_base_with_fp32_adapter_matches_the_equations_fused_loop_and_compiled():
    torch.manual_seed(0)
    base = nn.Linear(64, 48).cuda().to(torch.bfloat16)
    layer = TeamLoRALinear(base, r=16, experts=4, alpha=16.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(4, 9, 64, device="cuda").to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    d = lambda t: t.detach().double().cpu()
    want = reference_forward(d(x), d(layer.weight), d(layer.bias), d(layer.lora_A), d(layer.lora_B), d(layer.lora_router),
                             d(layer.lora_M), 4, 16.0)
    torch.testing.assert_close(d(out), want, rtol=2e-2, atol=2e-2)  # bf16 rounding of the output
    xf = x.float().requires_grad_()
    args = (layer.lora_A, layer.lora_B, layer.lora_router, layer.lora_M, layer.scaling, 0.0)
    fused, loop = teamlora.team_lora_delta(xf, *args)[0], teamlora.team_lora_delta_loop(xf, *args)[0]
    torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-5)
    g_fused = torch.autograd.grad(fused.square().sum(), [xf, layer.lora_A, layer.lora_B, layer.lora_router, layer.lora_M])
    g_loop = torch.autograd.grad(loop.square().sum(), [xf, layer.lora_A, layer.lora_B, layer.lora_router, layer.lora_M])
    for a, b in zip(g_fused, g_loop):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    compiled = teamlora._fused_compiled("cuda")
    torch.testing.assert_close(compiled(xf, *args)[0], fused, rtol=1e-5, atol=1e-5)


@cuda
def test_cuda_bfloat16_training_learns_and_scores(run_data, tmp_path):
    out = train.train(train_cfg(run_data, tmp_path / "c", "--device=cuda", "--dtype=bfloat16", "--max_iters=12",
                                "--adapter=teamlora"))
    params = dict(out["model"].named_parameters())
    assert params["layers.0.feed_forward.w1.weight"].dtype == torch.bfloat16 and params["layers.0.feed_forward.w1.weight"].is_cuda
    assert params["layers.0.feed_forward.w1.lora_A"].dtype == torch.float32
    assert np.mean(out["train_losses"][-3:]) < np.mean(out["train_losses"][:3])
    assert set(out["scores"]) == set(SYNTHETIC_TASKS)
