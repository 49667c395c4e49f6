"""The specification of teamlora.py, the TeamLoRA layer: its equations against an independent
reference, the fused path against the expert loop, inject, state dicts, the balance loss and the
expert load.

    python -m pytest -q
"""
import copy
import io
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines
import teamlora
from teamlora import TeamLoRALinear, inject


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
def test_forward_and_gradients_match_equations_float64(k, r, shape, competition, bias):
    layer = make_layer(r=r, experts=k, competition=competition, bias=bias)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ref = reference_forward(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_router,
                            layer.lora_M, k, 16.0, competition)
    out = layer(x)
    assert out.shape == shape[:-1] + (10,)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-12
    # every gradient, through autograd of the independent reference (not of the shared expert_weights_t)
    inputs = [x] + [p for n, p in layer.named_parameters() if n.startswith("lora_")]
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    for g_out, g_ref in zip(torch.autograd.grad((out * weights).sum(), inputs),
                            torch.autograd.grad((ref * weights).sum(), inputs)):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-10, atol=1e-12)


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
    out_l, gx_l, g_l = run(baselines.team_lora_delta_loop)
    torch.testing.assert_close(out_f, out_l, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_f, gx_l, rtol=1e-12, atol=1e-12)
    assert g_f.keys() == g_l.keys() and {"lora_A", "lora_B"} <= g_f.keys()
    for n in g_f:
        torch.testing.assert_close(g_f[n], g_l[n], rtol=1e-10, atol=1e-12, msg=n)
    # and the layer's own forward is the fused path
    out_layer, gx_layer, _ = _grads(layer, layer, x)
    torch.testing.assert_close(out_layer, out_f, rtol=0, atol=0)
    torch.testing.assert_close(gx_layer, gx_f, rtol=0, atol=0)


def _router_in_A_reference(x2, A, router):
    """[A; W_r] x^T by plain autograd: the concatenation kept for backward."""
    return torch.cat([A, router]).mm(x2.t())


def test_router_in_A_gradients_in_float64_and_under_bf16_autocast_match_plain_autograd():
    torch.manual_seed(0)
    x2, A, router = (torch.randn(n, 12, dtype=torch.float64, requires_grad=True) for n in (7, 8, 4))
    assert torch.autograd.gradcheck(teamlora._RouterInA.apply, (x2, A, router))
    # under bf16 autocast: the same bf16 GEMMs as autograd's, gradients back in each input's float32
    grad = torch.randn(12, 7).bfloat16()
    ours, ref = ([t.detach().float().requires_grad_() for t in (x2, A, router)] for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_ref = teamlora._RouterInA.apply(*ours), _router_in_A_reference(*ref)
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_ref)
    out.backward(grad)
    out_ref.backward(grad)
    for a, b in zip(ours, ref):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("competition", [True, False])
def test_the_fused_path_differentiates_twice_with_exact_second_derivatives(competition):
    """A gradient penalty or a Hessian-vector product differentiates the gradient again: _RouterInA's backward is
    written in differentiable ops (a @once_differentiable on it would refuse), so every second derivative is exact."""
    layer = make_layer(d_in=3, d_out=2, r=4, experts=2, competition=competition)
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    inputs = (x, *(p for p in (layer.lora_A, layer.lora_B, layer.lora_router, layer.lora_M) if p is not None))
    fused = lambda x, A, B, router, M=None: teamlora.team_lora_delta(x, A, B, router, M, layer.scaling, 0.0)[0]
    assert torch.autograd.gradgradcheck(fused, inputs)


@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_router_in_A_backward_runs_one_gemm_per_gradient_wanted(x_needs_grad):
    """x of the first adapted layer needs no gradient (the embedding is frozen): its GEMM is skipped."""
    x2 = torch.randn(64, 32, requires_grad=x_needs_grad)
    A, router = torch.randn(8, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    out = teamlora._RouterInA.apply(x2, A, router)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(torch.randn_like(out))
    assert sum(e.count for e in prof.key_averages() if e.key == "aten::mm") == 1 + x_needs_grad
    assert (x2.grad is not None) == x_needs_grad and A.grad.shape == A.shape and router.grad.shape == router.shape


def test_the_fused_path_keeps_x_and_the_parameters_for_backward_never_a_concatenation_of_them():
    layer = make_layer(d_in=64, d_out=10, r=8, experts=4, dtype=torch.float32)
    x = torch.randn(5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    big = {tuple(t.shape) for t in saved if t.shape[-1] == 64}  # anything as wide as d_in
    assert big and big <= {(5, 64), (10, 64), (8, 64), (4, 64)}, big  # x, W0, A, W_r: no (12, 64)


@pytest.mark.parametrize("experts", [1, 4])
def test_torch_func_grad_and_vmap_give_autograds_gradients_per_sample_balance_loss_included(experts):
    """torch.func.functional_call ran, but torch.func.grad and vmap (per-sample gradients, meta-learning) refused the
    fused path's autograd.Function ("it must override the setup_context staticmethod"). Each sample's gradient of
    its loss plus balance loss must equal plain autograd's on that sample alone."""
    torch.manual_seed(0)
    model = inject(Stack(n=1, dim=12, dtype=torch.float64), ("w1", "w2"), r=8, experts=experts, alpha=16, dropout=0.0,
                   adapter_dtype=torch.float64)
    for m in model.modules():
        if isinstance(m, TeamLoRALinear):
            randomize(m, seed=len(m.lora_B))
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss(p, xb):
        return torch.func.functional_call(model, p, (xb,)).pow(2).mean() + teamlora.balance_loss(model)

    x = torch.randn(3, 5, 12, dtype=torch.float64)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    whole = torch.func.grad(loss)(params, x)
    for xs, want in [(x[i], {n: g[i] for n, g in per_sample.items()}) for i in range(len(x))] + [(x, whole)]:
        model.zero_grad()
        (model(xs).pow(2).mean() + teamlora.balance_loss(model)).backward()
        for n, p in params.items():
            torch.testing.assert_close(want[n], model.get_parameter(n).grad, rtol=1e-10, atol=1e-12)


def test_activation_checkpointing_recomputes_the_fused_path_exactly_dropout_included():
    """train.py's activation_checkpointing: each block (adapters, _RouterInA and dropout inside) runs again in
    backward; the loss and every adapter gradient equal those of a run without it."""
    from model import ModelArgs, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", n_layers=2)).train()
    inject(model, ("w1", "w2", "w3"), r=8, experts=4, alpha=16, dropout=0.3)
    for m in model.modules():
        if isinstance(m, TeamLoRALinear):
            randomize(m)
    tokens = torch.randint(0, 512, (2, 12))
    results = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        torch.manual_seed(1)  # the same dropout masks in both runs
        loss = model(tokens, tokens.roll(-1, 1))[1]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys() and len(grads) == 2 * 3 * 4
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_activation_checkpointing_frees_each_recomputed_block_and_keeps_the_first_forwards_omega():
    """The recompute in backward sets each adapter's last_omega again; kept on the module, that omega held the
    recomputed block's whole graph until the next forward, so every block's activations lived at once (on an H200
    at LLaMA-2-7B's shape: 42 GiB against LoRA's 17.6). The first forward's omega stays instead, with the balance
    loss's gradients unchanged, and checkpointed TeamLoRA peaks where checkpointed LoRA does."""
    from bench import step_memory
    from model import ModelArgs, Transformer
    peaks = {}
    for experts in (1, 4):
        torch.manual_seed(0)
        model = Transformer(ModelArgs.from_name("tiny", n_layers=8, max_seq_len=128)).train()
        inject(model, ("w1", "w2", "w3"), r=16, experts=experts, alpha=16, dropout=0.0)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        tokens = torch.randint(0, 512, (4, 128))

        def step():
            loss = model(tokens, tokens.roll(-1, 1))[1] + teamlora.balance_loss(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        grads = []
        for ckpt in (False, True):
            model.gradient_checkpointing = ckpt
            loss = model(tokens, tokens.roll(-1, 1))[1] + teamlora.balance_loss(model)
            first = {m: m.last_omega for m in model.modules() if isinstance(m, TeamLoRALinear)}
            grads.append(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))
            assert all(m.last_omega is om for m, om in first.items())  # not the recompute's
        for g, g_ckpt in zip(*grads):
            torch.testing.assert_close(g_ckpt, g, rtol=1e-5, atol=1e-7)
        step()  # AdamW's state exists before the measured step
        peaks[experts] = step_memory(step, model, opt, [tokens], torch.device("cpu"))
    assert peaks[4] < 1.15 * peaks[1], peaks  # the router's (N, k) tensors and k x k M add little; the leak: 3.6x


def test_a_checkpointed_graph_kept_with_retain_graph_backpropagates_twice_as_without_checkpointing():
    """torch enters a checkpoint's recompute context at each backward through its graph: with retain_graph=True (the
    balance loss's gradient taken apart first, then the whole loss's), keep_last_omega is entered a second time, which
    a generator's context refused (AttributeError). Both backward passes give the uncheckpointed gradients."""
    from model import ModelArgs, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", n_layers=2, max_seq_len=32)).train()
    inject(model, ("w1", "w2", "w3"), r=8, experts=4, alpha=16, dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = torch.randint(0, 512, (2, 32))
    results = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        loss = model(tokens, tokens.roll(-1, 1))[1]
        balance = teamlora.balance_loss(model)
        first = {m: m.last_omega for m in model.modules() if isinstance(m, TeamLoRALinear)}
        g_balance = torch.autograd.grad(balance, params, retain_graph=True, allow_unused=True)
        g_all = torch.autograd.grad(loss + 0.01 * balance, params)
        assert all(m.last_omega is om for m, om in first.items())  # the first forward's, after both recomputes
        results.append((g_balance, g_all))
    for plain, ckpt in zip(*results):
        for g, g_ckpt in zip(plain, ckpt):
            assert (g is None) == (g_ckpt is None)
            if g is not None:
                torch.testing.assert_close(g_ckpt, g, rtol=1e-5, atol=1e-7)


def _has_compiler():
    return any(shutil.which(c) for c in ("g++", "clang++"))


@pytest.fixture
def fresh_compile_cache():
    """teamlora._fused_compiled remembers its answer per device type: a test that fills it starts and ends with it
    empty, also when it fails partway (a stale entry, such as the no-compiler fallback, would reach later tests)."""
    teamlora._fused_compiled.cache_clear()
    yield
    teamlora._fused_compiled.cache_clear()


@pytest.mark.skipif(not _has_compiler(), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_equals_eager_trains_and_does_not_recompile_per_length(fresh_compile_cache):
    torch._dynamo.reset()
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


@pytest.mark.skipif(not _has_compiler(), reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("experts", [1, 4])
def test_compiled_fused_path_traces_whole_with_dropout_in_training_and_eval(experts, fresh_compile_cache, monkeypatch):
    """With dropout on, the compiled path is one graph a call: a symbolic `dropout > 0` handed to F.dropout
    as its flag broke every adapted layer's graph in two (so compiling cost time instead of saving it). Graph breaks
    are Dynamo's, before any backend: the layer's torch.compile is handed the eager backend (no C++ built)."""
    from torch._dynamo.utils import counters
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real(fn, backend="eager", **kwargs))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    layer = TeamLoRALinear(nn.Linear(16, 24), r=8, experts=experts, alpha=16, dropout=0.1, compile=True)
    for training in (True, False):
        layer.train(training)
        for length in (5, 7, 9):
            out = layer(torch.randn(2, length, 16, requires_grad=True))
            if training:
                out.sum().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile_falls_back_to_eager_with_one_warning_without_compiler(monkeypatch, fresh_compile_cache):
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


@pytest.mark.parametrize("experts", [1, 4])
def test_layers_made_with_compile_trace_whole_inside_a_compiled_model(experts, fresh_compile_cache):
    """A copier's model built with inject(..., compile=True) and then compiled whole: Dynamo traces the layers' plain
    fused path with the rest, one graph (fullgraph=True; it used to stop at the layer's own compile, its C++ compiler
    check and its cache), with the eager model's outputs and gradients. The eager backend: no C++ compiler needed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = inject(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10)), ("0", "2"), r=8, experts=experts,
                   alpha=16, dropout=0.0, compile=True)
    layers = [randomize(m, seed=i) for i, m in enumerate(model.modules()) if isinstance(m, TeamLoRALinear)]
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for length in (5, 7):
        x = torch.randn(2, length, 12)
        out_c, gx_c, g_c = _grads(compiled, model, x)
        for layer in layers:
            layer.compile = False  # the reference: the fused path run eagerly
        out_e, gx_e, g_e = _grads(model, model, x)
        for layer in layers:
            layer.compile = True
        torch.testing.assert_close(out_c, out_e)
        torch.testing.assert_close(gx_c, gx_e)
        assert g_c.keys() == g_e.keys() and all(torch.allclose(g_c[n], g_e[n]) for n in g_e)


def test_the_compiled_path_is_asked_for_the_inputs_device_type(monkeypatch):
    """One compiled function per device type: a GPU's input gets Triton's graph, never the CPU's (nor the CPU's
    no-compiler fallback and its warning). Shown on the meta device, which every machine has."""
    asked = []
    monkeypatch.setattr(teamlora, "_fused_compiled", lambda device: asked.append(device) or teamlora.team_lora_delta)
    with torch.device("meta"):
        layer = TeamLoRALinear(nn.Linear(16, 24), r=8, experts=4, alpha=16, compile=True)
        out = layer(torch.randn(2, 16))
    assert asked == ["meta"] and out.shape == (2, 24) and out.is_meta


def test_an_empty_cxx_names_no_compiler(monkeypatch, tmp_path):
    """CXX= (set but empty, as a script's unset variable leaves it) is no compiler: joined to a PATH folder it names
    the folder, which os.access finds executable, and a CPU without a compiler would be sent to torch.compile."""
    monkeypatch.setattr(teamlora.torch, "compile", lambda fn, dynamic: object())  # the check, not the compile
    monkeypatch.setattr(teamlora.os, "get_exec_path", lambda env=None: [str(tmp_path)])  # no compiler there
    monkeypatch.setenv("CXX", "")
    teamlora._fused_compiled.cache_clear()
    try:
        with pytest.warns(UserWarning, match="C\\+\\+ compiler"):
            assert teamlora._fused_compiled("cpu") is teamlora.team_lora_delta
    finally:
        teamlora._fused_compiled.cache_clear()


def test_compiler_check_finds_cxx_needs_an_executable_and_only_on_cpu(monkeypatch, tmp_path):
    """The eager fallback is for a CPU with no C++ compiler: one named by CXX counts wherever it is on the PATH, a
    file called g++ that cannot run does not, clang++ counts as g++ does, and a GPU compiles with Triton, no C++
    compiler needed."""
    compiled = object()
    monkeypatch.setattr(teamlora.torch, "compile", lambda fn, dynamic: compiled)  # the check, not the compile
    monkeypatch.setattr(teamlora.os, "get_exec_path", lambda env=None: [str(tmp_path)])
    (tmp_path / "my-c++").write_text("#!/bin/sh\n")
    (tmp_path / "my-c++").chmod(0o755)
    (tmp_path / "g++").write_text("not a program\n")
    (tmp_path / "g++").chmod(0o644)
    teamlora._fused_compiled.cache_clear()
    try:
        monkeypatch.setenv("CXX", "my-c++")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert teamlora._fused_compiled("cpu") is compiled
        teamlora._fused_compiled.cache_clear()
        monkeypatch.delenv("CXX")
        with pytest.warns(UserWarning, match="C\\+\\+ compiler"):
            assert teamlora._fused_compiled("cpu") is teamlora.team_lora_delta
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert teamlora._fused_compiled("cuda") is compiled
            (tmp_path / "clang++").write_text("#!/bin/sh\n")  # a machine with clang++ alone compiles too
            (tmp_path / "clang++").chmod(0o755)
            teamlora._fused_compiled.cache_clear()
            assert teamlora._fused_compiled("cpu") is compiled
    finally:
        teamlora._fused_compiled.cache_clear()


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


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("shape", [(0, 12), (2, 0, 12)])
def test_an_empty_batch_passes_through_like_nn_linear(k, shape):
    layer = make_layer(r=8, experts=k)
    layer.dropout = 0.5  # in training mode, dropout included
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == shape[:-1] + (10,)
    out.sum().backward()
    assert x.grad.shape == shape and float(layer.lora_A.grad.abs().sum()) == 0.0


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("shape", [(3, 0), (0, 0), (0,)])
def test_a_base_with_no_input_features_passes_through_like_nn_linear(k, shape):
    """nn.Linear(0, d) gives its bias for every token: so must the adapted layer, with experts as without (the fused
    path flattened the tokens by reshape(-1, 0), which cannot tell how many there are)."""
    base = nn.Linear(0, 5, dtype=torch.float64)
    layer = TeamLoRALinear(base, r=8, experts=k, dropout=0.5, adapter_dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, base(x), rtol=0, atol=0)
    if k > 1:  # every router logit 0: phi uniform, omega Eq. 12 of it
        want = reference_omega(x.detach(), layer.lora_router.detach(), layer.lora_M.detach())
        torch.testing.assert_close(layer.last_omega, want, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert x.grad.shape == shape


@pytest.mark.parametrize("k", [1, 4])
def test_dropout_is_applied_to_the_rank_segments_not_to_x(k):
    layer = make_layer(experts=k, dtype=torch.float32)
    layer.dropout = 0.5
    layer.train()
    x = torch.randn(6, 12)
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)  # the same RNG draw, on z: laid out as z^T with experts, as z without (plain LoRA)
    z = (F.dropout(layer.lora_A @ x.T, 0.5, True).T if k > 1 else F.dropout(x @ layer.lora_A.T, 0.5, True))
    omega = layer.last_omega if k > 1 else torch.ones(6, 1)
    zw = (z.view(6, k, 8 // k) * omega.unsqueeze(-1)).view(6, 8) * layer.scaling
    expected = F.linear(x, layer.weight, layer.bias) + zw @ layer.lora_B.T
    torch.testing.assert_close(out, expected)
    layer.eval()
    torch.testing.assert_close(layer(x), reference_forward(
        x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_router, layer.lora_M, k, 16.0))


class MoELoRA(nn.Module):
    """MoELoRA as paper Eq. 7 defines it: k independent (A_i, B_i) of rank r_B, softmax weights."""

    def __init__(self, base, r_b, k, alpha):
        super().__init__()
        self.base, self.scaling = base, alpha / r_b
        self.A = nn.ParameterList(nn.Parameter(torch.randn(r_b, base.in_features, dtype=torch.float64))
                                  for _ in range(k))
        self.B = nn.ParameterList(nn.Parameter(torch.randn(base.out_features, r_b, dtype=torch.float64))
                                  for _ in range(k))
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


@pytest.mark.parametrize("k,competition", [(2, True), (4, True), (4, False), (8, False)])
def test_at_equal_alpha_the_update_is_k_times_a_same_rank_loras_and_alpha_over_k_gives_the_loras(k, competition):
    """The README's scale: omega sums to k and the scaling is alpha / r_B, so at equal alpha TeamLoRA's update is k
    times that of a LoRA of the same total rank (an even router, M = 0: every omega_i is 1), and alpha / k keeps
    LoRA's update size. A scaling of alpha / r, or an omega normalised to sum to 1, would make the two equal."""
    team, lora = make_layer(r=2 * k, experts=k, competition=competition), make_layer(r=2 * k, experts=1)
    with torch.no_grad():
        team.lora_A.copy_(lora.lora_A), team.lora_B.copy_(lora.lora_B), team.lora_router.zero_()
        if competition:
            team.lora_M.zero_()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    base = F.linear(x, lora.weight, lora.bias)
    torch.testing.assert_close(team(x) - base, k * (lora(x) - base), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(team.last_omega.sum(-1), torch.full((3, 5), float(k), dtype=torch.float64))
    team.scaling = 16.0 / k / 2  # alpha / k over r_B = 2: as a layer made with alpha / k
    torch.testing.assert_close(team(x), lora(x), rtol=1e-12, atol=1e-12)


def test_a_hook_registered_before_inject_stays_on_the_replaced_layer_and_one_after_it_runs():
    """The README: "Hooks on a replaced layer stay on it, not on its replacement: register them after `inject`"."""
    model, seen = Stack(n=1), []
    before = model.layers[0]["feed_forward"].w1
    before.register_forward_hook(lambda m, args, out: seen.append("before"))
    inject(model, ("w1",), r=4, experts=2, alpha=8)
    model(torch.randn(2, 16))
    assert seen == [] and model.layers[0]["feed_forward"].w1 is not before
    model.layers[0]["feed_forward"].w1.register_forward_hook(lambda m, args, out: seen.append("after"))
    model(torch.randn(2, 16))
    assert seen == ["after"]


def test_inject_trains_only_adapters_and_the_base_never_moves():
    torch.manual_seed(0)
    model = Stack(n=2)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject(model, ("w1", "w2", "w3"), r=8, experts=4, alpha=16, dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rpartition(".")[2].startswith("lora_") for n in trainable)
    assert sum(isinstance(m, TeamLoRALinear) for m in model.modules()) == 6
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # 3e-3: at 1e-2, 4 of 12 seeds diverged on this tiny model (the property tested is training, not a rate)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.1)
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


@pytest.mark.parametrize("cls", [None, baselines.MoELoRALoop], ids=["teamlora", "moelora-loop"])
def test_an_adapter_placed_in_a_model_in_eval_mode_stays_in_eval_mode_so_its_dropout_is_off(cls):
    """Hugging Face's from_pretrained returns a model in eval mode: the layers inject (or TeamLoRALinear itself)
    put in it used to start in training mode, so a model served right after loading its adapter ran the adapter's
    dropout, and two identical forwards differed. A new layer takes the mode of the layer it replaces."""
    torch.manual_seed(0)
    model = Stack(n=1).eval()
    inject(model, ("w1", "w2"), r=8, experts=4, alpha=16, dropout=0.5, competition=False, cls=cls)
    assert not any(m.training for m in model.modules())
    for m in model.modules():
        if isinstance(m, (TeamLoRALinear, baselines.MoELoRALoop)):
            with torch.no_grad():
                m.lora_B.normal_()
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)  # no dropout mask drawn
    model.train()  # and training still turns the dropout on
    assert not torch.equal(model(x), model(x))
    assert not TeamLoRALinear(nn.Linear(16, 8).eval(), r=8, experts=4).training
    assert TeamLoRALinear(nn.Linear(16, 8), r=8, experts=4).training


def test_each_new_layer_takes_the_mode_of_the_layer_it_replaces_not_the_models_shared_ones_included():
    """A model in training mode with one block in eval mode (frozen, say): its layers' adapters start in eval mode,
    the other block's in training mode; a layer shared by a training and an eval place keeps its own mode."""
    model = Stack(n=2).train()
    model.layers[0].eval()
    model.layers[1]["feed_forward"].w3 = model.layers[0]["feed_forward"].w1  # an eval layer, now in two places
    inject(model, ("w1", "w2", "w3"), r=8, experts=4, alpha=16)
    modes = {n: m.training for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, TeamLoRALinear)}
    assert modes == {"layers.0.feed_forward.w1": False, "layers.0.feed_forward.w2": False,
                     "layers.0.feed_forward.w3": False, "layers.1.feed_forward.w1": True,
                     "layers.1.feed_forward.w2": True, "layers.1.feed_forward.w3": False}, modes
    assert model.training and model.layers[1].training


def test_interaction_matrix_off_its_diagonal_is_uniform_on_minus_to_plus_0_1():
    """The official M ~ U(-0.1, 0.1): centred, so no expert starts favoured by the others. A bound check alone
    passes a one-sided U(0, 0.1) draw; 16 experts give 240 draws, whose mean lies within 0.0037 (1 sd) of 0."""
    torch.manual_seed(0)
    M = TeamLoRALinear(nn.Linear(8, 8), r=16, experts=16).lora_M.detach()
    off = M[~torch.eye(16, dtype=torch.bool)]
    assert off.abs().max() <= 0.1 and off.min() < -0.08 and off.max() > 0.08  # both ends reached
    assert off.mean().abs() < 0.02


def test_inject_passes_the_layers_own_options_on_to_every_layer():
    """inject(..., adapter_dtype=..., compile=...) reaches each TeamLoRALinear: a float64 adapter on a float32
    base stays float64 (not the default float32), and compile is set on every layer."""
    model = inject(Stack(n=2), ("w1", "w2"), r=4, experts=2, alpha=8, adapter_dtype=torch.float64, compile=True)
    layers = [m for m in model.modules() if isinstance(m, TeamLoRALinear)]
    assert len(layers) == 4 and all(m.compile for m in layers)
    assert all(p.dtype == torch.float64 for n, p in model.named_parameters() if teamlora.is_adapter(n))
    assert all(m.weight.dtype == torch.float32 for m in layers)
    # and what inject leaves out is the layer's own default, as for a TeamLoRALinear built by hand
    alone = TeamLoRALinear(nn.Linear(16, 40), r=4, experts=2)
    injected = inject(Stack(n=1), "w1", r=4, experts=2, alpha=8).layers[0]["feed_forward"].w1
    assert (injected.dropout, injected.competition) == (alone.dropout, alone.competition)


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
    incomplete = {n: t for n, t in loaded.items() if n != "layers.1.feed_forward.w2.lora_B"}
    with pytest.raises(ValueError, match="missing.*w2.lora_B"):  # a half-loaded adapter would run silently
        teamlora.load_adapter_state_dict(other, incomplete)
    transposed = {**loaded, "layers.0.feed_forward.w1.lora_A": loaded["layers.0.feed_forward.w1.lora_A"].t()}
    before = {n: t.clone() for n, t in teamlora.adapter_state_dict(other).items()}
    with pytest.raises(ValueError, match=r"shape mismatches.*w1.lora_A \(16, 8\) vs model \(8, 16\)"):  # same size
        teamlora.load_adapter_state_dict(other, transposed)
    assert all(torch.equal(t, before[n]) for n, t in teamlora.adapter_state_dict(other).items())


def test_adapter_state_dict_holds_plain_tensors_outside_autograd():
    """A plain name -> tensor dict: no Parameter and nothing that requires grad, so a caller may average or
    scale it (adapter soups) without building a graph through the live parameters; values equal them."""
    model = inject(Stack(n=1), ("w1", "w3"), r=4, experts=2, alpha=8)
    params = dict(model.named_parameters())
    state = teamlora.adapter_state_dict(model)
    assert state.keys() == {n for n in params if teamlora.is_adapter(n)}
    for n, t in state.items():
        assert type(t) is torch.Tensor and not t.requires_grad and torch.equal(t, params[n]), n
    assert not (0.5 * state["layers.0.feed_forward.w1.lora_A"]).requires_grad


def test_an_adapter_saved_from_a_compiled_model_loads_into_a_plain_one_and_back():
    """torch.compile(model) names every parameter `_orig_mod.<name>`: the adapter keeps the model's own names, so
    one trained compiled serves uncompiled, and the other way round."""
    trained = inject(Stack(n=2), ("w1", "w3"), r=8, experts=4, alpha=16)
    for m in trained.modules():
        if isinstance(m, TeamLoRALinear):
            randomize(m, seed=len(m.lora_B))
    compiled = torch.compile(trained)  # only a wrapper until it first runs: nothing is compiled here
    assert all(n.startswith("_orig_mod.") for n, _ in compiled.named_parameters())
    state = teamlora.adapter_state_dict(compiled)
    assert state.keys() == teamlora.adapter_state_dict(trained).keys()
    plain = inject(Stack(n=2), ("w1", "w3"), r=8, experts=4, alpha=16)
    teamlora.load_adapter_state_dict(plain, state)
    assert all(torch.equal(t, state[n]) for n, t in teamlora.adapter_state_dict(plain).items())
    again = torch.compile(inject(Stack(n=2), ("w1", "w3"), r=8, experts=4, alpha=16))
    teamlora.load_adapter_state_dict(again, teamlora.adapter_state_dict(plain))
    assert all(torch.equal(t, state[n]) for n, t in teamlora.adapter_state_dict(again).items())


def test_an_adapter_saved_from_a_model_with_compiled_blocks_loads_into_a_plain_one_and_back():
    """Compiling block by block (block = torch.compile(block)) puts `_orig_mod.` inside the names, not in front:
    the adapter drops it wherever it stands, so the names are the plain model's both ways."""
    def blockwise(model):
        for layer in model.layers:
            layer["feed_forward"] = torch.compile(layer["feed_forward"])  # a wrapper: nothing compiles here
        return model

    trained = blockwise(inject(Stack(n=2), ("w1", "w3"), r=8, experts=4, alpha=16))
    for m in trained.modules():
        if isinstance(m, TeamLoRALinear):
            randomize(m, seed=len(m.lora_B))
    assert any(".feed_forward._orig_mod.w1.lora_A" in n for n, _ in trained.named_parameters())
    state = teamlora.adapter_state_dict(trained)
    plain = inject(Stack(n=2), ("w1", "w3"), r=8, experts=4, alpha=16)
    assert state.keys() == teamlora.adapter_state_dict(plain).keys()
    teamlora.load_adapter_state_dict(plain, state)
    assert all(torch.equal(t, state[n]) for n, t in teamlora.adapter_state_dict(plain).items())
    again = blockwise(inject(Stack(n=2), ("w1", "w3"), r=8, experts=4, alpha=16))
    teamlora.load_adapter_state_dict(again, teamlora.adapter_state_dict(plain))
    assert all(torch.equal(t, state[n]) for n, t in teamlora.adapter_state_dict(again).items())


def test_an_adapter_saved_from_a_ddp_or_checkpoint_wrapped_model_loads_into_a_plain_one_and_back():
    """DistributedDataParallel and DataParallel name every parameter `module.<name>`, torch's checkpoint_wrapper
    (apply_activation_checkpointing) puts `_checkpoint_wrapped_module.` inside the names: the adapter drops them,
    also under torch.compile, so an adapter trained wrapped loads into a plain model and the other way round."""
    cw = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    make = lambda: inject(Stack(n=2), ("w1", "w3"), r=8, experts=4, alpha=16)
    blocks = lambda model: cw.apply_activation_checkpointing(
        model, check_fn=lambda m: isinstance(m, nn.ModuleDict) and "feed_forward" in m) or model
    wrappers = [nn.DataParallel, lambda m: torch.compile(nn.DataParallel(m)),
                lambda m: nn.DataParallel(torch.compile(m)), blocks, lambda m: nn.DataParallel(blocks(m))]
    for wrap in wrappers:
        trained = wrap(make())
        assert any("module." in n for n, _ in trained.named_parameters())
        for m in trained.modules():
            if isinstance(m, TeamLoRALinear):
                randomize(m, seed=len(m.lora_B))
        state = teamlora.adapter_state_dict(trained)
        assert state.keys() == teamlora.adapter_state_dict(make()).keys()
        plain = make()
        teamlora.load_adapter_state_dict(plain, state)
        assert all(torch.equal(t, state[n]) for n, t in teamlora.adapter_state_dict(plain).items())
        again = wrap(make())
        teamlora.load_adapter_state_dict(again, teamlora.adapter_state_dict(plain))
        assert all(torch.equal(t, state[n]) for n, t in teamlora.adapter_state_dict(again).items())


def test_only_a_leading_module_is_dropped_so_a_models_own_modules_named_module_keep_their_names():
    """DDP's `module.` stands in front of every name: one of the model's own modules whose name ends in `module`
    (a "text_module", a "module" inside) keeps its name in the adapter, wrapped or not."""
    make = lambda: inject(nn.ModuleDict({"text_module": nn.ModuleDict({"module": Stack(n=1)})}), ("w1",), r=4,
                          experts=2, alpha=8)
    own = {n for n, _ in make().named_parameters() if teamlora.is_adapter(n)}
    assert "text_module.module.layers.0.feed_forward.w1.lora_A" in own
    assert teamlora.adapter_state_dict(make()).keys() == own
    assert teamlora.adapter_state_dict(nn.DataParallel(make())).keys() == own


def test_load_adapter_state_dict_copies_into_the_models_own_dtype_and_storage():
    """An adapter saved in another precision (float64 here, bfloat16 from a mixed-precision run) is copied into the
    model's tensors: they keep their dtype, and their storage (an optimizer holding them sees the loaded values)."""
    torch.manual_seed(0)
    model = inject(Stack(n=1), ("w1", "w2"), r=4, experts=2, alpha=8)
    own = dict(model.named_parameters())
    storage = {n: p.data_ptr() for n, p in own.items()}
    state = {n: torch.randn(t.shape, dtype=torch.float64) for n, t in teamlora.adapter_state_dict(model).items()}
    teamlora.load_adapter_state_dict(model, state)
    for n, t in state.items():
        assert own[n] is dict(model.named_parameters())[n] and own[n].data_ptr() == storage[n], n
        assert own[n].dtype == torch.float32 and own[n].requires_grad, n
        torch.testing.assert_close(own[n].data, t.float(), rtol=0, atol=0)
    state[n].zero_()  # a copy: the caller's tensors stay the caller's
    assert own[n].abs().sum() > 0


@pytest.mark.parametrize("bad", ["numpy", "meta"])
def test_load_adapter_state_dict_that_fails_overwrites_nothing(bad):
    """A value that cannot be copied (a numpy array, a meta tensor) after good ones: the model keeps its adapter
    whole (before, the tensors ahead of it in the dict were already overwritten when the copy failed)."""
    torch.manual_seed(0)
    model = inject(Stack(n=2), ("w1", "w2"), r=4, experts=2, alpha=8)
    before = {n: t.clone() for n, t in teamlora.adapter_state_dict(model).items()}
    state = {n: t + 1 for n, t in before.items()}
    last = list(state)[-1]
    state[last] = state[last].numpy() if bad == "numpy" else torch.empty(state[last].shape, device="meta")
    with pytest.raises((AttributeError, NotImplementedError, RuntimeError)):
        teamlora.load_adapter_state_dict(model, state)
    for n, t in teamlora.adapter_state_dict(model).items():
        assert torch.equal(t, before[n]), n


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


@pytest.mark.parametrize("slices", [2, 4])
def test_the_balance_loss_of_equal_slices_averages_to_at_least_the_whole_batchs(slices):
    """The README: each of a batch's processes x grad_accum slices computes the balance loss on its own tokens, and
    "smaller slices give a somewhat larger value": per expert, the mean over slices of (mean_tokens omega_f - 1)^2 is
    at least the square of their mean (Jensen). So the slices' average is no lower than the whole batch's."""
    torch.manual_seed(slices)
    model = inject(Stack(n=2), ("w1", "w2", "w3"), r=8, experts=4, alpha=16, dropout=0.0)  # each token's omega fixed
    for m in model.modules():
        if isinstance(m, TeamLoRALinear):
            randomize(m, seed=m.lora_B.shape[0])  # a router that does not balance the experts
    x = torch.randn(8, 4, 16)
    with torch.no_grad():
        model(x)
        whole = teamlora.balance_loss(model)
        parts = [(model(part), teamlora.balance_loss(model))[1] for part in x.chunk(slices)]
    assert whole > 0 and torch.stack(parts).mean() >= whole and torch.stack(parts).mean() > whole * (1 + 1e-6)


def test_balance_loss_over_no_token_is_zero_not_nan():
    """An all-padding micro-batch (every mask entry False) or an empty batch leaves nothing to balance: 0, as for a
    model without adapters, not the NaN of a mean over no token that would make the whole loss NaN."""
    torch.manual_seed(0)
    model = inject(Stack(n=1), ("w1", "w2"), r=8, experts=4, alpha=16, dropout=0.0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = model(x)
    for reduction in ("mean", "sum"):
        loss = teamlora.balance_loss(model, torch.zeros(2, 5, dtype=torch.bool), reduction)
        assert loss.item() == 0.0, reduction
    (out.square().mean() + teamlora.balance_loss(model, torch.zeros(2, 5, dtype=torch.bool))).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model(torch.randn(0, 16))
    assert teamlora.balance_loss(model).item() == 0.0
    model(torch.randn(2, 0, 16))
    assert teamlora.balance_loss(model, torch.zeros(2, 0, dtype=torch.bool), "sum").item() == 0.0
    out = model(torch.randn(2, 5, 16))  # a layer with tokens still counts, as before
    torch.testing.assert_close(teamlora.balance_loss(model), torch.stack(
        [((m.last_omega.reshape(-1, 4).mean(0) - 1) ** 2).mean() for m in model.modules()
         if isinstance(m, TeamLoRALinear)]).mean())


def test_balance_loss_counts_a_layer_whose_mask_keeps_a_single_token():
    """One real token (a batch of one short row) is still a token to balance: each layer's term is that token's
    (omega - 1)^2 over the experts, not left out as if the layer saw no token."""
    torch.manual_seed(0)
    model = inject(Stack(n=2), ("w1", "w2"), r=8, experts=4, alpha=16, dropout=0.0)
    model(torch.randn(2, 5, 16))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3] = True
    per_layer = torch.stack([((m.last_omega[1, 3] - 1) ** 2).mean() for m in model.modules()
                             if isinstance(m, TeamLoRALinear)])
    assert len(per_layer) == 4 and (per_layer > 0).all()
    torch.testing.assert_close(teamlora.balance_loss(model, mask), per_layer.mean())
    torch.testing.assert_close(teamlora.balance_loss(model, mask, "sum"), per_layer.sum())


def test_a_0_1_integer_mask_counts_the_same_tokens_as_a_boolean_one():
    """Callers pass Hugging Face's attention_mask (int64 of 0 and 1) as the mask: it must select tokens as
    the boolean mask does, not index rows 0 and 1 of omega."""
    torch.manual_seed(0)
    model = inject(Stack(n=1), ("w1", "w2"), r=8, experts=4, alpha=16, dropout=0.0)
    for m in model.modules():
        if isinstance(m, TeamLoRALinear):
            randomize(m)
    model(torch.randn(2, 6, 16))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    torch.testing.assert_close(teamlora.balance_loss(model, mask), teamlora.balance_loss(model, mask.bool()))
    for name, load in teamlora.expert_load(model, mask).items():
        torch.testing.assert_close(load, teamlora.expert_load(model, mask.bool())[name], msg=name)


def reference_omega(x, router, M):
    """Eq. 11-12 written out: omega = k * rownorm(phi (I + M)), phi = softmax(x W_r^T)."""
    phi = torch.softmax(x @ router.T, -1)
    adj = phi @ (torch.eye(phi.shape[-1], dtype=phi.dtype) + M)
    return phi.shape[-1] * adj / adj.sum(-1, keepdim=True)


def test_expert_load_is_the_mean_of_omega_over_unmasked_tokens_over_k_per_layer():
    torch.manual_seed(0)
    model = inject(Stack(n=2), ("w1", "w2", "w3"), r=8, experts=4, alpha=16, dropout=0.0)
    inputs = {}
    for name, m in model.named_modules():
        if isinstance(m, TeamLoRALinear):
            randomize(m, seed=len(inputs))
            m.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0].detach()))
    model(torch.randn(2, 6, 16))
    assert set(inputs) == {f"layers.{i}.feed_forward.{w}" for i in range(2) for w in ("w1", "w2", "w3")}
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    for m_arg, keep in ((None, torch.ones(2, 6, dtype=torch.bool)), (mask, mask)):
        load = teamlora.expert_load(model, m_arg)
        assert set(load) == set(inputs)
        for name, x in inputs.items():
            layer = model.get_submodule(name)
            omega = reference_omega(x, layer.lora_router.detach(), layer.lora_M.detach())  # (2, 6, 4)
            want = omega[keep].mean(0) / 4  # the experts' shares over the kept tokens
            torch.testing.assert_close(load[name], want, rtol=1e-5, atol=1e-6, msg=name)
    # the mask matters here: the loads over all tokens and over the kept ones differ
    assert not torch.allclose(teamlora.expert_load(model)["layers.0.feed_forward.w1"],
                              teamlora.expert_load(model, mask)["layers.0.feed_forward.w1"])


def test_only_layers_that_ran_a_forward_have_an_expert_load():
    """A layer no token has reached yet (a fresh model, a branch this batch skipped) has no load and no balance term."""
    torch.manual_seed(0)
    model = inject(Stack(n=1), ("w1", "w2"), r=8, experts=4, alpha=16, dropout=0.0)
    assert teamlora.expert_load(model) == {} and teamlora.balance_loss(model).item() == 0.0
    w1 = model.layers[0]["feed_forward"].w1
    randomize(w1)
    w1(torch.randn(3, 16))
    assert list(teamlora.expert_load(model)) == ["layers.0.feed_forward.w1"]
    torch.testing.assert_close(teamlora.balance_loss(model), ((w1.last_omega.mean(0) - 1) ** 2).mean())


def test_an_eval_forward_sets_last_omega_so_the_expert_load_describes_that_forward():
    """Evaluation measures the expert load in eval mode: each forward, training or not, leaves its own omega."""
    layer = make_layer()
    model = nn.Sequential(layer)
    model(torch.randn(2, 5, 12, dtype=torch.float64))
    model.eval()
    x = torch.randn(3, 12, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    omega = reference_omega(x, layer.lora_router.detach(), layer.lora_M.detach())
    torch.testing.assert_close(layer.last_omega, omega, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(teamlora.expert_load(model)["0"], omega.mean(0) / 4, rtol=1e-12, atol=1e-12)


def test_expert_load_after_a_training_forward_holds_plain_numbers_outside_autograd():
    """A monitoring read: the shares keep no graph of the forward alive and convert to numbers as they are."""
    layer = make_layer()
    layer(torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True))
    assert layer.last_omega.requires_grad  # the balance loss needs omega's graph ...
    (load,) = teamlora.expert_load(nn.Sequential(layer)).values()
    assert not load.requires_grad and load.grad_fn is None  # ... the load does not
    assert load.numpy().sum() == pytest.approx(1.0)


@pytest.mark.parametrize("experts, competition", [(4, True), (4, False), (1, True)])
def test_the_layers_repr_names_rank_experts_and_whether_it_competes(experts, competition):
    layer = TeamLoRALinear(nn.Linear(8, 6), r=4, experts=experts, competition=competition)
    assert repr(layer).endswith(f"r=4, experts={experts}, competition={competition and experts > 1})")
    assert (layer.lora_M is not None) == layer.competition


@pytest.mark.parametrize("competition", [False, True])
def test_router_softmax_runs_in_float32_under_bf16_autocast(competition):
    """Under autocast the router's logits come out in bf16; omega must still be a float32 softmax of
    them (bf16 keeps 8 bits: a bf16 softmax would miss the sum k by ~1e-2)."""
    layer = make_layer(dtype=torch.float32, competition=competition)
    x = torch.randn(3, 5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    omega = layer.last_omega
    assert omega.dtype == torch.float32
    torch.testing.assert_close(omega.sum(-1), torch.full((3, 5), 4.0), rtol=0, atol=1e-5)
    logits = F.linear(x.bfloat16(), layer.lora_router.detach().bfloat16())  # what autocast's linear gives
    assert logits.dtype == torch.bfloat16
    phi = logits.float().softmax(-1)  # (3, 5, 4) float32
    if not competition:
        torch.testing.assert_close(omega, 4 * phi, rtol=1e-6, atol=1e-6)
    else:  # the mixing by M in float32 too (a bf16 matmul would be only ~1e-2 close)
        adj = phi @ (torch.eye(4) + layer.lora_M.detach())
        torch.testing.assert_close(omega, 4 * adj / adj.sum(-1, keepdim=True), rtol=1e-5, atol=1e-5)


def test_row_sum_guard_keeps_outputs_finite_when_phi_I_plus_M_sums_to_zero():
    layer = make_layer(dtype=torch.float64)
    with torch.no_grad():
        layer.lora_M.copy_(-torch.eye(4, dtype=torch.float64))  # phi (I + M) = 0 for every token
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.lora_M.grad).all()


@pytest.mark.parametrize("delta", [-1e-8, 0.0, 1e-8])
def test_row_sum_guard_sets_a_near_zero_row_sum_to_1e_6_with_its_sign(delta):
    """M = (delta - 1) I makes every row of phi (I + M) = delta * phi sum to delta, inside (-1e-6, 1e-6):
    the guard must divide by 1e-6 with delta's sign (+1e-6 for 0), so omega = k * phi * delta / +-1e-6,
    and the gradient must not flow through the clamped row sum."""
    layer = make_layer(dtype=torch.float64)
    with torch.no_grad():
        layer.lora_M.copy_((delta - 1.0) * torch.eye(4, dtype=torch.float64))
    x = torch.randn(5, 12, dtype=torch.float64)
    phi = torch.softmax(x @ layer.lora_router.detach().T, -1)
    omega = baselines.expert_weights(x, layer.lora_router, layer.lora_M)
    clamped = 1e-6 if delta >= 0 else -1e-6
    torch.testing.assert_close(omega, 4 * phi * delta / clamped, rtol=1e-6, atol=1e-12)
    g = torch.randn(5, 4, dtype=torch.float64)
    (grad_M,) = torch.autograd.grad((omega * g).sum(), layer.lora_M)
    torch.testing.assert_close(grad_M, phi.T @ (4 * g / clamped), rtol=1e-6, atol=1e-6)  # through adj only


@pytest.mark.parametrize("scale", [-2.0, -1.5, -1.01, -0.99, -1 - 3e-6, -1 + 3e-6])
def test_row_sum_guard_leaves_every_row_sum_of_magnitude_above_1e_6_as_it_is(scale):
    """M = scale * I makes phi (I + M) = (1 + scale) phi: every row sums to 1 + scale (-1 .. 0.01, and +-3e-6 just
    outside the guard's band), small or negative but not near 0, so the guard must leave Eq. 12 as it is
    (omega = k phi): neither flip the row sum's sign nor raise a small one. Near 0, 1 + scale keeps ~11 digits."""
    tol = 1e-12 if abs(1 + scale) > 1e-3 else 1e-8
    layer = make_layer(dtype=torch.float64)
    with torch.no_grad():
        layer.lora_M.copy_(scale * torch.eye(4, dtype=torch.float64))
    x = torch.randn(5, 12, dtype=torch.float64)
    omega = baselines.expert_weights(x, layer.lora_router, layer.lora_M)
    torch.testing.assert_close(omega, 4 * torch.softmax(x @ layer.lora_router.T, -1), rtol=tol, atol=tol)
    expected = reference_forward(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_router,
                                 layer.lora_M, k=4, alpha=16.0)
    torch.testing.assert_close(layer(x), expected, rtol=max(tol, 1e-10), atol=max(tol, 1e-10))


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


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter", [torch.float32, torch.bfloat16, torch.float16])
def test_under_autocast_adapters_of_float32_or_autocasts_dtype_run_and_the_other_half_precision_is_refused(
        adapter, autocast):
    """What the README says: under autocast, float32 adapters, or adapters of autocast's own dtype, run in autocast's
    dtype (as nn.Linear does); torch's cat refuses bf16 tensors under fp16 autocast and fp16 under bf16."""
    torch.manual_seed(0)
    layer = randomize(TeamLoRALinear(nn.Linear(12, 10).to(adapter), r=8, experts=4, dropout=0.0, adapter_dtype=adapter))
    x = torch.randn(3, 12, dtype=adapter)
    with torch.autocast("cpu", dtype=autocast):
        if adapter not in (torch.float32, autocast):
            with pytest.raises(RuntimeError, match="autocast"):
                layer(x)
            return
        out = layer(x)
        want = reference_forward(x.double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(),
                                 layer.lora_B.double(), layer.lora_router.double(), layer.lora_M.double(), 4, 16.0)
    assert out.dtype == autocast and (out.double() - want).abs().max() < 0.02 * want.abs().max()


@pytest.mark.parametrize("k", [1, 4])
def test_a_bf16_adapter_runs_and_trains_in_bf16_with_omega_in_float32(k):
    """adapter_dtype=torch.bfloat16 (bench.py's at LLaMA-2-7B's shape): omega stays float32 and the weighted z is cast
    back to the adapter's dtype before B's GEMM; the output matches the equations to bf16 precision."""
    torch.manual_seed(0)
    layer = randomize(TeamLoRALinear(nn.Linear(12, 10).bfloat16(), r=8, experts=k, alpha=16.0, dropout=0.0,
                                     adapter_dtype=torch.bfloat16))
    x = torch.randn(3, 5, 12, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    if k > 1:
        assert layer.last_omega.dtype == torch.float32
    d = lambda t: None if t is None else t.detach().double()
    ref = reference_forward(d(x), d(layer.weight), d(layer.bias), d(layer.lora_A), d(layer.lora_B),
                            d(layer.lora_router), d(layer.lora_M), k, 16.0)
    assert (out.double() - ref).abs().max() < 0.02 * ref.abs().max()
    out.float().sum().backward()
    for p in (x, layer.lora_A, layer.lora_B):
        assert p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casting_the_model_after_inject_casts_the_adapters_while_omega_stays_float32(dtype):
    """model.to(dtype) / .half() after inject is torch's cast of every parameter: the adapters follow (the README
    says so), the router's softmax and omega stay float32, and the model computes the float32 one's function to the
    dtype's precision and trains."""
    torch.manual_seed(0)
    model = inject(Stack(n=2), ("w1", "w2", "w3"), r=8, experts=4, alpha=16, dropout=0.0)
    for m in model.modules():
        if isinstance(m, TeamLoRALinear):
            with torch.no_grad():
                randomize(m, seed=m.lora_B.shape[0]).lora_B.mul_(0.1)
    x = torch.randn(3, 5, 16)
    want = model(x).detach()
    model.to(dtype)
    layer = model.layers[0]["feed_forward"].w1
    out = model(x.to(dtype))
    assert out.dtype == dtype and all(p.dtype == dtype for p in model.parameters())
    assert layer.last_omega.dtype == torch.float32
    torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())
    (out.float().mean() + teamlora.balance_loss(model)).backward()  # gradients within float16's range
    assert layer.lora_A.grad.dtype == dtype and torch.isfinite(layer.lora_A.grad).all()


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


@pytest.mark.parametrize("competition", [True, False])
def test_forward_on_the_meta_device_gives_shapes_only(competition):
    """Shape inference and FLOP counting run a meta-built model on meta inputs: the layer must too."""
    with torch.device("meta"):
        layer = TeamLoRALinear(nn.Linear(16, 24), r=8, experts=4, alpha=16.0, competition=competition)
        out = layer(torch.empty(2, 5, 16))
    assert out.is_meta and out.shape == (2, 5, 24) and layer.last_omega.shape == (2, 5, 4)


def test_reinitialisation_draws_the_same_adapter_on_the_meta_device_as_on_the_cpu():
    """initial_lora_state() draws on the CPU in a fixed order, whatever the parameters' device: the same
    seed gives the same adapter to a layer built on the CPU and to one built on meta, then materialised."""
    base = nn.Linear(12, 10)
    torch.manual_seed(3)
    cpu = TeamLoRALinear(base, r=8, experts=4, alpha=16.0)
    with torch.device("meta"):
        meta = TeamLoRALinear(nn.Linear(12, 10), r=8, experts=4, alpha=16.0)
    meta.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.reset_lora_parameters()
    for name in ("lora_A", "lora_B", "lora_router", "lora_M"):
        assert torch.equal(getattr(cpu, name), getattr(meta, name)), name
    bound = 1 / math.sqrt(12)  # kaiming_uniform(a=sqrt 5) on a fan-in of 12
    assert cpu.lora_A.abs().max() <= bound and cpu.lora_A.abs().max() > bound / 2
    assert (cpu.lora_B == 0).all() and (cpu.lora_M.diagonal() == 0).all() and cpu.lora_M.abs().max() <= 0.1


def test_initialisation_draws_a_then_the_router_then_m_from_the_global_generator():
    """The draws' order is part of every seeded run (the README's demo table among them): A first, as a bias-free
    nn.Linear(d_in, r) draws its weight, then the router, then M's off-diagonal U(-0.1, 0.1); B draws nothing."""
    base = nn.Linear(12, 10)
    torch.manual_seed(7)
    layer = TeamLoRALinear(base, r=8, experts=4, alpha=16.0)
    torch.manual_seed(7)
    A = nn.Linear(12, 8, bias=False).weight.detach()
    router = nn.Linear(12, 4, bias=False).weight.detach()
    M = torch.empty(4, 4).uniform_(-0.1, 0.1).fill_diagonal_(0.0)
    for name, want in (("lora_A", A), ("lora_router", router), ("lora_M", M)):
        assert torch.equal(getattr(layer, name).detach(), want), name


def test_initialisation_draws_the_same_adapter_whatever_the_adapter_dtype():
    """initial_lora_state() draws in float32 whatever adapter_dtype is: the same seed gives a float64 or a bfloat16
    adapter the float32 adapter's values, rounded to its dtype."""
    layers = {}
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        torch.manual_seed(5)
        layers[dtype] = TeamLoRALinear(nn.Linear(12, 10), r=8, experts=4, alpha=16.0, adapter_dtype=dtype)
    for name in ("lora_A", "lora_B", "lora_router", "lora_M"):
        want = getattr(layers[torch.float32], name).detach()
        for dtype in (torch.float64, torch.bfloat16):
            got = getattr(layers[dtype], name).detach()
            assert got.dtype == dtype and torch.equal(got, want.to(dtype)), (name, dtype)


def test_inject_shares_base_storage_on_a_real_device():
    model = Stack(n=1)
    ptr = model.layers[0]["feed_forward"].w2.weight.data_ptr()
    inject(model, "w2", r=4, experts=2, alpha=8)
    assert model.layers[0]["feed_forward"].w2.weight.data_ptr() == ptr


def test_inject_freezes_base_parameters_whose_names_merely_contain_lora_():
    """An adapter tensor is one whose own name starts with `lora_`: a base module named `flora_gate` or a base
    parameter named `flora_scale` or `lorax` stays frozen and out of the adapter state dict."""
    model = Stack(n=1)
    model.flora_gate = nn.Linear(16, 16)
    model.flora_scale = nn.Parameter(torch.ones(16))
    model.lorax = nn.Parameter(torch.ones(16))
    inject(model, ("w1",), r=4, experts=2, alpha=8)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"layers.0.feed_forward.w1.lora_{p}" for p in ("A", "B", "router", "M")}
    assert teamlora.adapter_state_dict(model).keys() == trained
    assert not teamlora.is_adapter("flora_gate.weight") and not teamlora.is_adapter("flora_scale")
    assert not teamlora.is_adapter("lorax")


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


def test_inject_matches_a_target_that_is_a_direct_child_by_its_whole_name():
    """A target at the top of the model has no dot before its name ("proj", not "x.proj"): matched all the same,
    and a name that merely ends with the target's letters ("out_proj" for "proj") is not."""
    model = nn.ModuleDict({"proj": nn.Linear(8, 8), "out_proj": nn.Linear(8, 8)})
    inject(model, "proj", r=4, experts=2, alpha=8)
    assert isinstance(model["proj"], TeamLoRALinear) and type(model["out_proj"]) is nn.Linear


def test_user_errors_give_one_clear_sentence():
    with pytest.raises(ValueError, match="r to be a positive multiple of experts.*r=10, experts=4"):
        TeamLoRALinear(nn.Linear(4, 4), r=10, experts=4)
    with pytest.raises(ValueError, match="r to be a positive multiple"):
        inject(Stack(), ("w1",), r=6, experts=4, alpha=16)
    with pytest.raises(ValueError, match="needs experts >= 1 .*r=8, experts=0: choose .*e.g. r=8"):
        TeamLoRALinear(nn.Linear(4, 4), r=8, experts=0)  # the message itself must not divide by 0
    linear = r"named like \['layers\.0\.feed_forward\.w1', 'layers\.0\.feed_forward\.w3'"  # no container
    with pytest.raises(ValueError, match="no module name ends with.*'q_proj'.*" + linear):
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

@pytest.mark.parametrize("r, experts", [(0, 4), (-4, 4), (-3, 1), (2, 4), (10, 4), (3, 2)])
def test_a_rank_that_is_no_positive_multiple_of_experts_is_refused_and_the_rank_suggested_is_accepted(r, experts):
    """r = 0 and a negative multiple of k pass r % k == 0, yet must be refused in the same sentence (not a division by
    r_B = 0 or a negative tensor size); the r the message suggests builds the layer with the same experts."""
    with pytest.raises(ValueError, match=f"r to be a positive multiple of experts, got r={r}, experts={experts}") as e:
        TeamLoRALinear(nn.Linear(4, 4), r=r, experts=experts)
    suggested = int(re.search(r"e\.g\. r=(-?\d+)\)", str(e.value)).group(1))
    layer = TeamLoRALinear(nn.Linear(4, 4), r=suggested, experts=experts)
    assert layer.lora_A.shape[0] == suggested > 0 and suggested % experts == 0


def test_a_rank_or_expert_count_given_as_a_whole_float_builds_the_int_layer_and_a_fraction_is_refused():
    """r=8.0 (a computed or parsed rank) passed the check and failed inside torch.empty with "empty() takes 1
    positional argument but 2 were given", naming neither r nor the fix; experts=2.5 with r=5 passed r % k == 0."""
    base = nn.Linear(12, 10, dtype=torch.float64)
    torch.manual_seed(0)
    want = randomize(TeamLoRALinear(base, r=8, experts=2, alpha=4, dropout=0.0, adapter_dtype=torch.float64))
    torch.manual_seed(0)
    got = randomize(TeamLoRALinear(base, r=8.0, experts=2.0, alpha=4, dropout=0.0, adapter_dtype=torch.float64))
    assert (got.r, got.experts, repr(got)) == (8, 2, repr(want)) and type(got.r) is type(got.experts) is int
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(got(x), want(x), rtol=0, atol=0)
    for r, experts in [(5, 2.5), (8.5, 1), (8.0, 0.5)]:
        with pytest.raises(ValueError, match=f"^TeamLoRA needs experts >= 1 and r to be a positive multiple of "
                                             f"experts, got r={r}, experts={experts}: choose integers"):
            TeamLoRALinear(nn.Linear(4, 4), r=r, experts=experts)


class Int8Linear(nn.Linear):
    """A quantised layer as bitsandbytes' are nn.Linear subclasses: an int8 weight, a scale, a forward of its own."""

    def __init__(self, base):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        scale = base.weight.abs().amax(1) / 127
        self.weight = nn.Parameter((base.weight / scale[:, None]).round().to(torch.int8), requires_grad=False)
        self.bias = base.bias
        self.register_buffer("scale", scale.detach())

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale[:, None], self.bias)


class ScaledHead(nn.Linear):
    """An output layer with a learned per-word logit scale (a float weight, a forward of its own)."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out, bias=False)
        self.logit_scale = nn.Parameter(torch.full((d_out,), 3.0))

    def forward(self, x):
        return super().forward(x) * self.logit_scale


def test_inject_refuses_linear_subclasses_whose_tensors_it_would_lose_before_changing_anything():
    """TeamLoRALinear carries over a float `weight` and `bias` and computes nn.Linear's x W^T + b: a layer holding
    other tensors (a quantised layer's scale, a logit scale, a weight-norm's parts) or a non-float weight would
    lose them, silently (the logit scale) or at the first forward (int8). Refused at inject, in one sentence,
    before any target is replaced."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    uint8 = nn.Linear(16, 8)
    uint8.weight = nn.Parameter(torch.randint(0, 255, (8, 16), dtype=torch.uint8), requires_grad=False)
    for layer, odd in [(Int8Linear(nn.Linear(16, 8)), r"\['weight', 'scale'\]"), (uint8, r"\['weight'\]"),
                       (ScaledHead(16, 8), r"\['logit_scale'\]"),
                       (weight_norm(nn.Linear(16, 8)), r"\['parametrizations.weight.original0'")]:
        model = nn.ModuleDict({"mlp": nn.ModuleDict({"up": nn.Linear(16, 16), "down": layer})})
        before = {n: (type(m), m.training) for n, m in model.named_modules()}
        with pytest.raises(ValueError, match=f"^target module 'mlp.down' is a {type(layer).__name__}, not a plain "
                                             f"nn.Linear \\(its tensors besides a float weight and bias: {odd}"):
            inject(model, ("up", "down"), r=4, experts=2, alpha=8)
        assert {n: (type(m), m.training) for n, m in model.named_modules()} == before  # 'mlp.up' not replaced
        assert all(p.requires_grad for p in model["mlp"]["up"].parameters())
        inject(model, ("up",), r=4, experts=2, alpha=8)  # the retry without the odd layer goes through
        assert isinstance(model["mlp"]["up"], TeamLoRALinear) and model["mlp"]["down"] is layer


def test_a_refused_inject_leaves_every_target_as_it_was_so_a_corrected_retry_works():
    """A refusal after valid matches (q_proj before a non-Linear 'rotary_emb' in a Hugging Face model) used to leave
    those adapted and nothing frozen; the retry then said 'already has an adapter'."""
    model = nn.ModuleDict({"layers": nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(8, 8)}) for _ in range(2)),
                           "rotary_emb": nn.Identity()})
    with pytest.raises(ValueError, match="'rotary_emb' is a Identity, not a plain nn.Linear"):
        inject(model, ("q_proj", "rotary_emb"), r=4, experts=2, alpha=8)
    assert not any(isinstance(m, TeamLoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    inject(model, ("q_proj",), r=4, experts=2, alpha=8)
    assert all(isinstance(layer["q_proj"], TeamLoRALinear) for layer in model["layers"])


class SharedLinear(nn.Module):
    """One nn.Linear used in two places (weight sharing, a recurrent or cross-layer shared projection)."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(8, 8)
        self.enc, self.dec = nn.Sequential(shared, nn.Tanh()), nn.ModuleDict({"proj": shared, "out": nn.Linear(8, 3)})

    def forward(self, x):
        return self.dec["out"](self.dec["proj"](self.enc(x)))


@pytest.mark.parametrize("targets", [("0",), ("proj",), ("0", "proj")])
def test_a_layer_shared_by_two_places_gets_one_adapter_in_both_whichever_place_targets_name(targets):
    """named_modules() lists a shared module once, under its first name: inject used to adapt that place only, so the
    other ran the bare, frozen base (silently, for ("0",)), and a target naming the second place ("proj") was
    refused as matching nothing. A shared layer keeps one adapter, trained by both of its uses."""
    torch.manual_seed(0)
    model = inject(SharedLinear(), targets, r=4, experts=2, alpha=8, dropout=0.0)
    layer = model.enc[0]
    assert isinstance(layer, TeamLoRALinear) and model.dec["proj"] is layer
    randomize(layer)
    x = torch.randn(5, 8)
    want = model.dec["out"](layer(torch.tanh(layer(x))))  # both uses through the one adapted layer, by hand
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    assert not layer(x).equal(F.linear(x, layer.weight, layer.bias))  # the adapter acts, in both places
    assert sorted(teamlora.adapter_state_dict(model)) == [f"enc.0.{n}" for n in ("lora_A", "lora_B", "lora_M",
                                                                                 "lora_router")]
    model(x).sum().backward()  # each use adds to the one adapter's gradient; the base stays frozen
    assert all((p.grad is not None) == teamlora.is_adapter(n) for n, p in model.named_parameters())
    fresh = inject(SharedLinear(), targets, r=4, experts=2, alpha=8, dropout=0.0)
    fresh.load_state_dict(model.state_dict())  # strict: both places' keys, the same tensors
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_a_layer_called_twice_in_one_forward_keeps_its_last_calls_omega_for_the_balance_loss_and_load():
    """The README: "a layer called twice in one forward (shared, or in a loop) keeps its last call's" omega, so the
    balance loss and the expert load describe that call's tokens, not both calls'."""
    torch.manual_seed(0)
    model = inject(SharedLinear(), ("0",), r=4, experts=2, alpha=8, dropout=0.0)
    layer = randomize(model.enc[0])
    x = torch.randn(5, 8)
    second = baselines.expert_weights(torch.tanh(layer(x)), layer.lora_router, layer.lora_M)  # the dec call's input
    model(x)
    torch.testing.assert_close(layer.last_omega, second, rtol=0, atol=0)
    assert not torch.allclose(second, baselines.expert_weights(x, layer.lora_router, layer.lora_M))  # not the first
    torch.testing.assert_close(teamlora.balance_loss(model), ((second.mean(0) - 1) ** 2).mean())
    torch.testing.assert_close(teamlora.expert_load(model)["enc.0"], second.mean(0) / 2)


class OwnForwardLinear(nn.Linear):
    """An nn.Linear subclass holding only `weight` and `bias` with a forward of its own (Falcon's computes
    nn.Linear's; this one, to tell them apart, doubles it)."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_a_linear_subclass_with_only_its_own_forward_is_adapted_and_runs_nn_linears_forward():
    """The README: "a subclass with only its own `forward` (Falcon's) runs nn.Linear's, so leave out one whose
    `forward` computes something else": inject accepts it, and the adapted layer computes x W^T + b + the update."""
    torch.manual_seed(0)
    model = nn.Sequential(OwnForwardLinear(8, 6))
    x = torch.randn(3, 8)
    weight, bias = model[0].weight, model[0].bias
    inject(model, ("0",), r=4, experts=2, alpha=8)
    assert isinstance(model[0], TeamLoRALinear) and model[0].weight is weight and model[0].bias is bias
    torch.testing.assert_close(model(x), F.linear(x, weight, bias), rtol=0, atol=0)  # B = 0: nn.Linear's, not 2x


def test_gpt2s_conv1d_is_refused_at_inject_by_its_name():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match="'transformer.h.0.mlp.c_fc' is a Conv1D, not a plain nn.Linear"):
        inject(model, ("c_fc",), r=4, experts=2, alpha=8)


def test_an_adapted_tied_output_layer_keeps_its_tie_and_leaves_the_embedding_frozen():
    """lm_head in a model with tied embeddings: the adapted layer holds the embedding's own Parameter, so the tie
    holds, both stay frozen, the model's output is the base's until the adapter trains, and it then trains."""
    torch.manual_seed(0)
    model = qwen2_lm()
    embedding, ids = model.model.embed_tokens.weight, torch.randint(50, (2, 7))
    want = model(input_ids=ids).logits.detach()
    inject(model, ("lm_head",), r=8, experts=4, alpha=16, dropout=0.0)
    assert model.lm_head.weight is embedding and not embedding.requires_grad
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"lm_head.lora_{p}" for p in
                                                                          ("A", "B", "router", "M")}
    before = embedding.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(embedding, before) and model.lm_head.lora_B.abs().sum() > 0


def test_a_model_deep_copies_after_a_training_forward_as_for_an_ema_or_swa_copy():
    """last_omega holds a tensor of the last forward's autograd graph, which copy.deepcopy refuses (an EMA model, SWA's
    AveragedModel, a best-so-far copy): the copy leaves it out and computes the same function."""
    torch.manual_seed(0)
    model = inject(Stack(n=2), ("w1", "w2"), r=8, experts=4, alpha=16, dropout=0.0)
    for m in model.modules():
        if isinstance(m, TeamLoRALinear):
            randomize(m, seed=m.lora_B.shape[0])
    x = torch.randn(3, 16)
    loss = model(x).square().mean() + teamlora.balance_loss(model)
    twin = copy.deepcopy(model)
    assert teamlora.expert_load(twin) == {} and teamlora.expert_load(model)  # the original keeps its omega
    loss.backward()  # and its graph
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    assert all(a is not b for a, b in zip(twin.parameters(), model.parameters()))


def test_a_merged_layer_copies_and_pickles_merged_so_the_copy_neither_adds_the_adapter_twice_nor_loses_it():
    """The copy's weight holds the adapter as the original's does: it must say so (merged), or its forward would add
    scaling B A a second time and its merge(False) would leave the update in the weight."""
    layer = make_layer(d_in=24, d_out=20, r=8, experts=1).eval()
    x = torch.randn(5, 24, dtype=torch.float64)
    w0, want = layer.weight.detach().clone(), layer(x).detach()
    layer.merge()
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        assert twin.merged
        torch.testing.assert_close(twin(x), want, rtol=1e-12, atol=1e-12)
        twin.merge(False)
        torch.testing.assert_close(twin.weight.detach(), w0, rtol=1e-12, atol=1e-12)


def test_base_checkpoints_load_into_an_adapted_model_and_its_own_state_dict_round_trips():
    """The contract behind `weight` and `bias`: a base checkpoint loads into an injected model (only the adapter is
    missing), the injected model's whole state dict loads into another and into the plain base (only the adapter
    unexpected)."""
    torch.manual_seed(0)
    base, x = Stack(n=2), torch.randn(3, 16)
    model = inject(Stack(n=2), ("w1", "w2"), r=8, experts=4, alpha=16, dropout=0.0)
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys and result.missing_keys and all(map(teamlora.is_adapter, result.missing_keys))
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # B = 0: the base's function
    for m in model.modules():
        if isinstance(m, TeamLoRALinear):
            randomize(m, seed=m.lora_B.shape[0])
    other = inject(Stack(n=2), ("w1", "w2"), r=8, experts=4, alpha=16, dropout=0.0)
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    result = Stack(n=2).load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys and all(map(teamlora.is_adapter, result.unexpected_keys))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
    want = reference_forward(d(x), d(layer.weight), d(layer.bias), d(layer.lora_A), d(layer.lora_B),
                             d(layer.lora_router),
                             d(layer.lora_M), 4, 16.0)
    torch.testing.assert_close(d(out), want, rtol=2e-2, atol=2e-2)  # bf16 rounding of the output
    xf = x.float().requires_grad_()
    args = (layer.lora_A, layer.lora_B, layer.lora_router, layer.lora_M, layer.scaling, 0.0)
    fused, loop = teamlora.team_lora_delta(xf, *args)[0], baselines.team_lora_delta_loop(xf, *args)[0]
    torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-5)
    g_fused = torch.autograd.grad(fused.square().sum(),
                                  [xf, layer.lora_A, layer.lora_B, layer.lora_router, layer.lora_M])
    g_loop = torch.autograd.grad(loop.square().sum(), [xf, layer.lora_A, layer.lora_B, layer.lora_router, layer.lora_M])
    for a, b in zip(g_fused, g_loop):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    compiled = teamlora._fused_compiled("cuda")
    torch.testing.assert_close(compiled(xf, *args)[0], fused, rtol=1e-5, atol=1e-5)


class HFStyleLM(nn.Module):
    """A tiny causal LM with Hugging Face's FFN names (gate_proj, up_proj, down_proj) and an output with .loss."""

    def __init__(self, vocab=50, dim=16, hidden=40):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.ModuleDict({"mlp": nn.ModuleDict({
            "gate_proj": nn.Linear(dim, hidden, bias=False), "up_proj": nn.Linear(dim, hidden, bias=False),
            "down_proj": nn.Linear(hidden, dim, bias=False)})}) for _ in range(2))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, attention_mask, labels):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            m = layer["mlp"]
            h = h + m["down_proj"](F.silu(m["gate_proj"](h)) * m["up_proj"](h))
        logits = self.lm_head(h)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return type("Output", (), {"loss": loss})()


def qwen2_lm():
    """A tiny random Qwen2ForCausalLM built by transformers (q/k/v biases, tied embeddings)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(config)


def llama_lm():
    """A tiny random LlamaForCausalLM built by transformers (untied embeddings, no biases)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def readme_recipe():
    """The code block of the README's "Use TeamLoRA in your own project", as a user copies it."""
    readme = (Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Use TeamLoRA in your own project"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("\n```", section.index("```python"))]


def test_the_readmes_word_on_torchs_own_transformer_layers_keeps_their_adapters_on():
    """torch's nn.TransformerEncoderLayer adapted on out_proj, linear1 and linear2: nn.MultiheadAttention never calls
    out_proj (its adapter gets no gradient), and in eval mode the layer's fast path skips linear1 and linear2, so the
    adapted model scores as the base did, silently; the README names both, and its line turns the fast path off."""
    readme = " ".join((Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8").split())
    section = readme[readme.index("## Use TeamLoRA in your own project"):readme.index("**Activation checkpointing.**")]
    said = re.search(r"`nn\.MultiheadAttention` reads `out_proj`'s.*?`(torch\.backends\.mha\.[^`]*)`", section)
    assert said and "`nn.TransformerEncoderLayer`" in said.group(0), "the README does not warn of torch's layers"
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        base = model.eval()(x)
    inject(model, ("out_proj", "linear1", "linear2"), r=4, experts=2, alpha=8, dropout=0.0)
    for i, m in enumerate(m for m in model.modules() if isinstance(m, TeamLoRALinear)):
        randomize(m, seed=i)
    trained = model.train()(x)
    trained.sum().backward()
    got_grad = {n.rpartition(".lora_")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert got_grad == {f"layers.{i}.{name}" for i in range(2) for name in ("linear1", "linear2")}
    was = torch.backends.mha.get_fastpath_enabled()
    try:
        with torch.no_grad():
            assert torch.equal(model.eval()(x), base)  # the fast path: the adapters are off
            exec(said.group(1), {"torch": torch})  # the README's line, as written
            torch.testing.assert_close(model.eval()(x), trained.detach())
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


@pytest.mark.parametrize("make_model", [HFStyleLM, qwen2_lm], ids=["hf-style", "qwen2"])
def test_the_readmes_example_runs_as_written_on_a_hugging_face_style_model(tmp_path, monkeypatch, capsys,
                                                                           make_model):
    code = readme_recipe()
    torch.manual_seed(0)
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(50, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones(2, 7, dtype=torch.long), "labels": ids}
    monkeypatch.chdir(tmp_path)
    namespace = {"model": model, "batch": batch, "torch": torch}
    exec(compile(code, "README.md", "exec"), namespace)
    model, optimizer = namespace["model"], namespace["optimizer"]
    assert torch.isfinite(namespace["loss"]) and (tmp_path / "adapter.pt").is_file()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(teamlora.is_adapter(n) and "mlp" in n for n in trained)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trained)
    optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n not in trained)
    printed = capsys.readouterr().out
    assert "layers.0.mlp.gate_proj" in printed and "layers.1.mlp.down_proj" in printed


@pytest.mark.parametrize("form", ["activation", "gradient"])
@pytest.mark.parametrize("make_model, dropout", [(qwen2_lm, 0.0), (llama_lm, 0.05)], ids=["qwen2", "llama-dropout"])
def test_the_readmes_checkpointing_recipe_keeps_the_first_forwards_omega_in_a_hugging_face_model(make_model, dropout,
                                                                                                 form):
    """Transformers checkpoints non-reentrantly: with the README's context_fn the recompute leaves each adapter's
    first-forward omega in place (its graph is freed), and the gradients equal those of a run without
    checkpointing, the balance loss's over the padded batch's real tokens included (the recompute draws the first
    forward's dropout masks again). Both of the README's forms, each where the installed transformers has it: the
    current activation_checkpointing_enable, and the older transformers' gradient_checkpointing_enable (the only one
    before 5.2x, so on Python 3.10, whose newest transformers is 5.20; this test failed there)."""
    import contextlib

    from model import keep_last_omega
    readme = " ".join((Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8").split())
    start = readme.index("`model.activation_checkpointing_enable(") + 1
    recipe = readme[start:readme.index("`", start)]  # the README's line, run as written
    if form == "gradient":  # the README's older form with the same {...}: gradient_checkpointing_kwargs={...}
        older = readme.split("(older transformers: `", 1)[1].split("`")[0]
        recipe = "model." + older.replace("{...}", recipe[recipe.index("(") + 1:-1])
    torch.manual_seed(0)
    model = make_model()
    if not hasattr(model, f"{form}_checkpointing_enable"):
        pytest.skip(f"this transformers has no {form}_checkpointing_enable")
    model = teamlora.inject(model, ("gate_proj", "up_proj", "down_proj"), r=8, experts=4, alpha=16, dropout=dropout)
    for m in model.modules():
        if isinstance(m, TeamLoRALinear):
            randomize(m)
    model.train()
    ids, mask = torch.randint(50, (2, 7)), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for ckpt in (False, True):
        if ckpt:
            with warnings.catch_warnings():  # transformers 5.24 calls the older form deprecated
                warnings.simplefilter("ignore", FutureWarning)
                exec(recipe, {"model": model, "contextlib": contextlib, "keep_last_omega": keep_last_omega})
            assert model.model.layers[0].gradient_checkpointing
        torch.manual_seed(1)  # the same dropout masks in both runs
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        loss = out.loss + 0.01 * teamlora.balance_loss(model, mask=mask.bool())
        first = {m: m.last_omega for m in model.modules() if isinstance(m, TeamLoRALinear)}
        assert all(om.grad_fn is not None for om in first.values())
        grads.append(torch.autograd.grad(loss, trained))
        assert all(m.last_omega is om for m, om in first.items())
    for g, g_ckpt in zip(*grads):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-5, atol=1e-7)


def test_the_readmes_recipe_trains_a_llama_from_pretrained_and_its_adapter_reloads_onto_the_saved_base(
        tmp_path, monkeypatch, capsys):
    """A user's path with transformers: from_pretrained (which returns eval mode), the README's block, then more steps
    of its loss. The adapters train in train mode (dropout on), the loss on the batch falls, the base stays bit for
    bit, the base checkpoint loads with only the lora_ tensors missing, and adapter.pt on a freshly loaded and
    injected base gives the trained model's logits exactly."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama_lm().save_pretrained(tmp_path / "base")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask = torch.randint(1, 64, (2, 8)), torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    monkeypatch.chdir(tmp_path)
    namespace = {"model": model, "batch": batch, "torch": torch}
    exec(compile(readme_recipe(), "README.md", "exec"), namespace)
    model, optimizer = namespace["model"], namespace["optimizer"]
    capsys.readouterr()
    adapted = [m for m in model.modules() if isinstance(m, TeamLoRALinear)]
    assert len(adapted) == 6 and all(m.training and m.dropout > 0 for m in adapted)
    with torch.no_grad():
        first = model.eval()(**batch).loss
    model.train()
    optimizer.param_groups[0]["lr"] = 1e-2  # a few steps to see the loss move
    for _ in range(5):
        optimizer.step()
        optimizer.zero_grad()
        loss = model(**batch).loss + 0.01 * teamlora.balance_loss(model, mask=batch["attention_mask"].bool())
        loss.backward()
    model.eval()
    with torch.no_grad():
        assert model(**batch).loss < first
        logits = model(**batch).logits
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not teamlora.is_adapter(n))
    torch.save(teamlora.adapter_state_dict(model), "adapter.pt")
    fresh = inject(transformers.LlamaForCausalLM(model.config), ("gate_proj", "up_proj", "down_proj"), r=64,
                   experts=4, alpha=32)
    loaded = fresh.load_state_dict(transformers.LlamaForCausalLM.from_pretrained("base").state_dict(), strict=False)
    assert set(loaded.missing_keys) == set(teamlora.adapter_state_dict(fresh)) and not loaded.unexpected_keys
    teamlora.load_adapter_state_dict(fresh, torch.load("adapter.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**batch).logits, logits)


def test_a_merged_lora_in_a_llama_saves_a_checkpoint_the_plain_model_serves_and_unmerges_to_the_base(tmp_path):
    """Serving with transformers: LoRA merged into a LLaMA's FFN linears; save_pretrained writes the merged weights
    (the unused lora_ tensors beside them), which a plain LlamaForCausalLM.from_pretrained serves with the adapted
    model's logits; merge(False) gives the base's weights back, to float rounding."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = inject(llama_lm(), ("gate_proj", "up_proj", "down_proj"), r=8, experts=1, alpha=16).eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not teamlora.is_adapter(n)}
    ids = torch.randint(64, (2, 7))
    with torch.no_grad():
        base_logits = model(ids).logits
        layers = [randomize(m) for m in model.modules() if isinstance(m, TeamLoRALinear)]
        want = model(ids).logits
        assert (want - base_logits).abs().max() > 1e-2  # a real update to serve
        for layer in layers:
            layer.merge()
        model.save_pretrained(tmp_path)
        plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
        assert not any(isinstance(m, TeamLoRALinear) for m in plain.modules())
        torch.testing.assert_close(plain(ids).logits, want, rtol=1e-5, atol=1e-5)
        for layer in layers:
            layer.merge(False)
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], rtol=1e-6, atol=1e-6)


def test_generate_with_a_kv_cache_applies_the_adapters_at_every_step_and_leaves_the_last_steps_omega():
    """Hugging Face's generate() on an adapted LLaMA: the prompt's forward, then one token per forward on the KV cache.
    Every step's scores equal a forward over the whole sequence; afterwards last_omega (so the balance loss and the
    expert load) is the last step's, (batch, 1, k): that of the last token fed in, the one before the last generated
    (test_after_generate_each_layer_keeps_the_omega_of_the_last_token_fed_in), and generate's (batch, all tokens)
    mask is refused."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = inject(transformers.LlamaForCausalLM(config), ("gate_proj", "up_proj", "down_proj"), r=8, experts=4,
                   alpha=16)
    for m in model.modules():
        if isinstance(m, TeamLoRALinear):
            randomize(m, seed=m.lora_B.shape[0])
    model.eval()
    layer, shapes = model.model.layers[0].mlp.gate_proj, []
    hook = layer.register_forward_hook(lambda m, args, out: shapes.append(tuple(m.last_omega.shape)))
    prompt = torch.randint(1, 64, (2, 5))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    hook.remove()
    assert shapes == [(2, 5, 4), (2, 1, 4), (2, 1, 4), (2, 1, 4)] and layer.last_omega.shape == (2, 1, 4)
    load = teamlora.expert_load(model)
    assert len(load) == 6 and all(torch.isclose(v.sum(), torch.tensor(1.0)) for v in load.values())
    assert teamlora.balance_loss(model) > 0
    with pytest.raises(ValueError, match=r"mask of shape \(2, 9\) does not match the tokens \(2, 1\)"):
        teamlora.balance_loss(model, mask=torch.ones_like(out.sequences, dtype=torch.bool))
    with torch.no_grad():
        logits = model(out.sequences).logits
    for step, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, logits[:, 4 + step], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("new_tokens", [1, 4])
def test_after_generate_each_layer_keeps_the_omega_of_the_last_token_fed_in(new_tokens):
    """The README: after generate() on a KV cache, balance_loss and expert_load read the omega of the last token fed in,
    the one before the last generated (which is sampled from the last step's logits and never run), or the whole
    prompt's where it generated one token; it said "the last decoded token's", which reads as the last generated.
    model.py's generate against one forward over the prompt and the answer: each layer's kept omega is that forward's
    at those positions."""
    from model import ModelArgs, Transformer
    readme = " ".join((Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8").split())
    assert ("(after `generate()` on a KV cache, the omega of the last token it fed in, the one before the last "
            "generated, which is never run; of the whole prompt where it generated one token)") in readme
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16,
                                  max_seq_len=64)).double()
    layers = [randomize(m, seed=i) for i, m in enumerate(inject(model, ("wq", "w1", "w2"), r=8, experts=4, alpha=16.0,
                                                                  dropout=0.0).modules())
              if isinstance(m, TeamLoRALinear)]
    prompt = [3, 14, 15, 9, 2]
    answer = model.generate([prompt], new_tokens)[0]
    kept = [layer.last_omega for layer in layers]
    with torch.no_grad():
        model(torch.tensor([prompt + answer]))
    last_fed = len(prompt) + new_tokens - 2  # the answer's last token is at len(prompt) + new_tokens - 1
    fed = slice(0, len(prompt)) if new_tokens == 1 else slice(last_fed, last_fed + 1)
    assert len(answer) == new_tokens and len(layers) == 6
    for layer, omega in zip(layers, kept):  # omega is float32 (the router's softmax), the cache's rounding its own
        torch.testing.assert_close(omega, layer.last_omega[:, fed], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lora_merges_into_the_weight_and_unmerges_to_float_tolerance(dtype):
    layer = make_layer(d_in=24, d_out=20, r=8, experts=1, dtype=dtype)  # randomize: B != 0, a real update
    layer.eval()
    x = torch.randn(5, 24, dtype=dtype)
    w0, unmerged = layer.weight.detach().clone(), layer(x).detach()
    layer.merge()
    want = x @ (w0 + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()).T + layer.bias.detach()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), unmerged, **tol)  # merged: the same function ...
    torch.testing.assert_close(layer(x), want, **tol)      # ... computed by the base GEMM alone
    merged_weight = layer.weight.detach().clone()
    delta = (layer.lora_B.detach().double() @ layer.lora_A.detach().double()) * layer.scaling
    assert torch.equal(merged_weight, w0 + delta.to(dtype))  # B A in float64, rounded once to the weight's dtype
    layer.merge()  # merging twice changes nothing
    assert torch.equal(layer.weight, merged_weight)
    with torch.no_grad():
        layer.lora_B.zero_()  # the adapter is no longer read
    torch.testing.assert_close(layer(x), unmerged, **tol)
    with torch.no_grad():
        layer.lora_B.copy_(make_layer(d_in=24, d_out=20, r=8, experts=1, dtype=dtype).lora_B)
    layer.merge(False)
    torch.testing.assert_close(layer.weight.detach(), w0, **tol)
    torch.testing.assert_close(layer(x), unmerged, **tol)


def test_lora_on_a_bf16_weight_merges_to_bf16_precision_and_unmerges_within_one_bf16_step():
    """A float32 LoRA over a bf16 base (the serving case): merge() rounds scaling B A into the bf16 weight, so the
    merged layer computes the float64 function to bf16 precision; merge(False) rounds again as it takes the update
    out, so each weight comes back within one bf16 step (8 significant bits) of the base, not bit for bit."""
    torch.manual_seed(0)
    layer = TeamLoRALinear(nn.Linear(64, 48).bfloat16(), r=8, experts=1, alpha=16.0, dropout=0.0).eval()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)  # an update about a tenth of the weights' size
    w0, bias = layer.weight.detach().double().clone(), layer.bias.detach().double()
    delta = layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    x = torch.randn(5, 64).bfloat16()
    want = x.double() @ (w0 + delta).T + bias  # the float64 reference of the adapted layer
    for merged in (False, True):
        layer.merge(merged)
        assert (layer(x).double() - want).abs().max() < 2 ** -7 * want.abs().max()
    w1 = layer.weight.detach().double().clone()
    layer.merge(False)
    w2 = layer.weight.detach().double()
    step = torch.ldexp(torch.ones_like(w0), torch.frexp(torch.maximum(w0.abs(), w1.abs())).exponent - 8)
    assert ((w2 - w0).abs() <= step).all() and (w2 != w0).any()  # one bf16 step of the larger, at most


def test_loading_an_adapter_into_a_merged_layer_is_refused_until_it_is_unmerged():
    """A merged layer's weight holds its adapter: a load would serve the old one, and unmerging would then subtract
    the new one from the base."""
    model = nn.Sequential(make_layer(d_in=24, d_out=20, r=8, experts=1))
    w0, other = model[0].weight.detach().clone(), {k: torch.randn_like(v) for k, v in
                                                   teamlora.adapter_state_dict(model).items()}
    model[0].merge()
    before = {k: v.clone() for k, v in teamlora.adapter_state_dict(model).items()}
    with pytest.raises(ValueError, match=r"\['0'\] hold a merged adapter: call merge\(False\) on them before"):
        teamlora.load_adapter_state_dict(model, other)
    assert all(torch.equal(v, before[k]) for k, v in teamlora.adapter_state_dict(model).items())
    model[0].merge(False)
    torch.testing.assert_close(model[0].weight.detach(), w0)
    teamlora.load_adapter_state_dict(model, other)
    assert all(torch.equal(v, other[k]) for k, v in teamlora.adapter_state_dict(model).items())


def test_reinitialising_a_merged_layer_is_refused_as_it_would_strand_the_merged_update_in_the_weight():
    """A merged weight holds scaling B A; resetting the adapter (B = 0) would leave that update in the base for
    good, as merge(False) would then subtract nothing."""
    layer = make_layer(d_in=24, d_out=20, r=8, experts=1, dtype=torch.float32)
    w0 = layer.weight.detach().clone()
    layer.merge()
    merged = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"^\['the layer'\] hold a merged adapter: call merge\(False\)"):
        layer.reset_lora_parameters()
    assert torch.equal(layer.weight, merged) and layer.lora_B.abs().sum() > 0
    layer.merge(False)
    layer.reset_lora_parameters()
    torch.testing.assert_close(layer.weight.detach(), w0)
    assert (layer.lora_B == 0).all()


def test_a_load_refused_for_merged_layers_names_those_layers_and_only_those():
    model = nn.Sequential(*(make_layer(d_in=24, d_out=20, r=8, experts=1, seed=i) for i in range(3)))
    for i in (0, 2):
        model[i].merge()
    with pytest.raises(ValueError, match=r"^\['0', '2'\] hold a merged adapter"):
        teamlora.load_adapter_state_dict(model, teamlora.adapter_state_dict(model))


@pytest.mark.parametrize("competition", [True, False])
def test_several_experts_refuse_to_merge_in_one_sentence(competition):
    """Without competition (train.py's fused MoELoRA) the router still weighs the experts per token: no merge."""
    layer = make_layer(experts=4, competition=competition)
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="only one expert \\(LoRA\\) can merge; the router weighs these 4 per token"):
        layer.merge()
    assert torch.equal(layer.weight, w0) and not layer.merged


def test_the_layer_drops_into_a_llava_language_model_unchanged():
    """The paper's Table 6 adapts LLaVA-1.5: a tiny random LLaVA built by transformers, adapters in its
    language model's FFN only; a few steps on one image-text batch lower the loss and leave the
    vision tower and the projector bit-identical."""
    transformers = pytest.importorskip("transformers")
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=30, patch_size=15, projection_dim=32)
    text = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=63,
                                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if "vision_tower" in n or "multi_modal_projector" in n}
    assert frozen
    inject(model, ("gate_proj", "up_proj", "down_proj"), r=8, experts=4, alpha=16.0, dropout=0.0)
    adapted = [n for n, m in model.named_modules() if isinstance(m, TeamLoRALinear)]
    assert len(adapted) == 6 and all("language_model" in n for n in adapted)  # 2 layers x 3; the CLIP MLPs are fc1/fc2
    image_tokens = (30 // 15) ** 2  # patches; the default strategy drops CLS
    ids = torch.cat([torch.full((2, image_tokens), 63), torch.randint(1, 60, (2, 10))], dim=1)
    labels = ids.masked_fill(ids == 63, -100)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 3, 30, 30),
                 labels=labels)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(10):
        loss = model(**batch).loss + 0.01 * teamlora.balance_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0] and losses[-1] == min(losses), losses  # the adapters learn the batch
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("k", [1, 4])
def test_strided_inputs_give_what_their_contiguous_copies_give_and_one_token_works_unbatched(k):
    """As nn.Linear: a transposed, sliced or channels_last input (an NHWC feature map) is read by its strides, and
    a 1-D input is one token, whose omega is (k,)."""
    layer, x = make_layer(experts=k), torch.randn(6, 2, 3, 24, dtype=torch.float64)
    for strided in (x[..., ::2].transpose(0, 1), x[..., :12].contiguous(memory_format=torch.channels_last)):
        assert not strided.is_contiguous()
        torch.testing.assert_close(layer(strided), layer(strided.contiguous()), rtol=1e-12, atol=1e-12)
    one = layer(x[0, 0, 0, :12])
    assert one.shape == (10,) and (k == 1 or layer.last_omega.shape == (k,))
    torch.testing.assert_close(one, layer(x[0, 0, 0, None, :12])[0], rtol=1e-12, atol=1e-12)


def test_an_adapter_saved_with_a_wrappers_prefix_is_refused_naming_the_prefixed_and_the_expected_names():
    """A state dict filtered by hand from a DDP or compiled model (`module.`, `_orig_mod.` in front) does not fit: the
    error lists both spellings, and nothing is copied."""
    model, saved = nn.Sequential(make_layer()), teamlora.adapter_state_dict(nn.Sequential(make_layer(seed=1)))
    before = {n: t.clone() for n, t in teamlora.adapter_state_dict(model).items()}
    for prefix in ("module.", "_orig_mod."):
        with pytest.raises(ValueError, match=rf"missing \['0\.lora_A'.*unexpected \['{re.escape(prefix)}0\.lora_A"):
            teamlora.load_adapter_state_dict(model, {prefix + n: t for n, t in saved.items()})
    assert all(torch.equal(t, before[n]) for n, t in teamlora.adapter_state_dict(model).items())


def test_merge_and_unmerge_across_dtypes_shapes_alphas_and_biases_keep_the_function_and_give_the_base_back():
    """A seeded fuzz of LoRA's serving path: over float32, bfloat16, float16 and float64 bases, adapters of the base's
    dtype or float32, any widths, ranks, alphas, with and without bias, the merged layer computes the float64
    reference base + scaling B A to the base's precision; merge() twice, merge(False) twice and merge(False) without a
    merge change nothing (bit for bit); merge(False) gives each weight back within one step of its dtype; and the
    adapter saved while merged reloads into a fresh layer (unmerged) that computes what the layer did unmerged."""
    import random
    rng, bits = random.Random(0), {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
    for case in range(48):
        dtype = (torch.float32, torch.bfloat16, torch.float16, torch.float64)[case % 4]
        d_in, d_out, r, bias = rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 12), rng.random() < 0.5
        kw = dict(r=r, experts=1, alpha=rng.choice([0.5, 3.7, 16.0, 64.0]), dropout=rng.choice([0.0, 0.1]),
                  adapter_dtype=rng.choice([torch.float32, dtype]))
        torch.manual_seed(case)
        layer = TeamLoRALinear(nn.Linear(d_in, d_out, bias=bias).to(dtype), **kw).train(rng.random() < 0.5)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02)
        x, w0 = torch.randn(2, rng.randint(1, 5), d_in).to(dtype), layer.weight.detach().clone()
        with torch.no_grad():
            unmerged = layer.eval()(x)
        layer.train(case % 2 == 0)
        want = x.double() @ (w0.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()).T
        want = want + (layer.bias.double() if bias else 0)
        layer.merge(False)
        assert torch.equal(layer.weight, w0) and not layer.merged, case  # nothing to take out
        layer.merge()
        merged_weight = layer.weight.detach().clone()
        layer.merge()
        assert torch.equal(layer.weight, merged_weight) and layer.merged, case
        with torch.no_grad():
            served = layer(x)
        assert served.dtype == dtype, case
        tol = 2.0 ** -bits[dtype] * 8 * d_in ** 0.5 * (1 + want.abs().max().item())  # a few roundings per product
        assert (served.double() - want).abs().max() <= tol, (case, dtype)
        fresh = TeamLoRALinear(nn.Linear(d_in, d_out, bias=bias).to(dtype), **kw).eval()
        with torch.no_grad():
            fresh.weight.copy_(w0)
            fresh.bias is None or fresh.bias.copy_(layer.bias)
        teamlora.load_adapter_state_dict(fresh, {n: t.clone() for n, t in teamlora.adapter_state_dict(layer).items()})
        with torch.no_grad():
            assert torch.equal(fresh(x), unmerged), case
        layer.merge(False)
        back = layer.weight.detach().clone()
        layer.merge(False)
        assert torch.equal(layer.weight, back) and not layer.merged, case
        larger = torch.maximum(w0.double().abs(), merged_weight.double().abs()).float()
        step = torch.ldexp(torch.ones_like(larger), torch.frexp(larger).exponent - bits[dtype]).double()
        assert ((back.double() - w0.double()).abs() <= step).all(), (case, dtype)  # one rounding of the larger


def test_training_a_merged_lora_is_refused_in_one_sentence_while_serving_it_merged_works_in_any_mode():
    """A merged layer's forward is the base GEMM alone: a training step through it would give the adapter no gradient
    (AdamW skips it: the loss, silently, does not move) and drop no dropout, so a training-mode forward with gradients
    is refused; serving (eval(), no_grad, inference_mode, a frozen adapter) runs merged, and unmerged it trains."""
    layer, x = make_layer(d_in=24, d_out=20, r=8, experts=1, dtype=torch.float32), torch.randn(5, 24)
    with torch.no_grad():
        want = layer.eval()(x)
    layer.train().merge()
    with pytest.raises(ValueError, match=r"^a merged LoRA would not train: merge\(False\) to train it, or eval\(\) to "
                                         r"serve it\.$"):
        layer(x)
    for serve in (torch.no_grad, torch.inference_mode):
        with serve():
            torch.testing.assert_close(layer(x), want)
    torch.testing.assert_close(layer.eval()(x), want)
    layer.lora_A.requires_grad_(False)
    torch.testing.assert_close(layer.train()(x), want)  # the adapter frozen: only the merged base could be trained
    layer.lora_A.requires_grad_(True)
    layer.merge(False)
    layer(x).square().sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_greedy_generation_merged_equals_unmerged_and_unmerged_again(dtype):
    """model.py's KV-cache generation with LoRA on various targets (a tied head among the bases), merged for serving:
    the same greedy tokens as unmerged, and again after merge(False); a model left in training mode too (generate
    decodes in eval mode, in inference mode, where a merged layer serves)."""
    import random

    from model import ModelArgs, Transformer
    rng = random.Random(dtype.itemsize)
    for case in range(4):
        torch.manual_seed(case)
        args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, max_seq_len=64,
                         tie_embeddings=case % 2 == 0)
        model = Transformer(args).to(dtype)
        targets = (("w1", "w2", "w3"), ("wq", "wv"), ("wo",), ("w1", "wq", "wk", "wv", "wo", "w2", "w3"))[case % 4]
        inject(model, targets, r=rng.choice([2, 4, 8]), experts=1, alpha=rng.choice([4.0, 16.0]), dropout=0.1)
        layers = [randomize(m, seed=i) for i, m in enumerate(model.modules()) if isinstance(m, TeamLoRALinear)]
        model.train(case % 3 == 0)
        prompts = [[rng.randrange(50) for _ in range(rng.randint(1, 6))] for _ in range(3)]
        unmerged = model.generate(prompts, 8)
        for layer in layers:
            layer.merge()
        assert model.generate(prompts, 8) == unmerged, case
        for layer in layers:
            layer.merge(False)
        assert model.generate(prompts, 8) == unmerged, case


def test_a_checkpoint_gathered_from_a_merged_model_resumes_into_a_fresh_one_computing_the_unmerged_function():
    """train.py's checkpoint of a model whose LoRA layers are merged (checkpoint.gather_state: the lora_ tensors, not
    the merged weights) loads (checkpoint.load_state) into a freshly injected model over the same base, which then
    computes what the unmerged model did."""
    import checkpoint
    model = inject(Stack(dtype=torch.float64), ("w1", "w2", "w3"), r=4, experts=1, alpha=8.0, dropout=0.0)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not teamlora.is_adapter(n)}
    layers = [randomize(m, seed=i) for i, m in enumerate(model.modules()) if isinstance(m, TeamLoRALinear)]
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        want = model.eval()(x)
    for layer in layers:
        layer.merge()
    state = checkpoint.gather_state(model, {"adapter": "lora"})
    assert set(state) == set(teamlora.adapter_state_dict(model))  # the adapter only, never the merged weights
    fresh = inject(Stack(dtype=torch.float64), ("w1", "w2", "w3"), r=4, experts=1, alpha=8.0, dropout=0.0)
    fresh.load_state_dict(base, strict=False)
    checkpoint.load_state(fresh, state, {"adapter": "lora"}, "ckpt.pt")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), want, rtol=1e-12, atol=1e-12)


def test_a_checkpoint_loaded_into_a_merged_model_is_refused_naming_the_merged_layers_until_they_unmerge():
    """checkpoint.copy_into (load_state: train.py's resume, sample.py) into a merged LoRA would leave the merged update
    in the weight and merge(False) would then take the loaded one out: the base wrong for good. Refused in one
    sentence, adapter-only or whole, as load_adapter_state_dict refuses it, copying nothing; after merge(False) the
    same state loads and the model computes the loaded adapter over its base."""
    import checkpoint
    from errors import UserError
    lora = lambda: inject(Stack(dtype=torch.float64), ("w1", "w2", "w3"), r=4, experts=1, alpha=8.0, dropout=0.0)
    model, twin, x = lora().eval(), lora().eval(), torch.randn(3, 16, dtype=torch.float64)
    layers = {n: randomize(m, i) for i, (n, m) in enumerate(model.named_modules()) if isinstance(m, TeamLoRALinear)}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not teamlora.is_adapter(n)}
    other = {n: torch.randn_like(t) * 0.3 for n, t in teamlora.adapter_state_dict(model).items()}
    twin.load_state_dict({**base, **other})  # the base with the other adapter: what the load must give
    merged = list(layers)[1::2]
    for n in merged:
        layers[n].merge()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    for state, cfg in ((other, {"adapter": "lora"}), ({**base, **other}, {"adapter": "none"})):
        with pytest.raises(UserError, match=rf"^{re.escape(str(merged[:3]))} hold a merged adapter, which a load "
                                            r"would leave in their weight: call merge\(False\) on them before"):
            checkpoint.load_state(model, state, cfg, "ckpt.pt")
        assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    for n in merged:
        layers[n].merge(False)
    checkpoint.load_state(model, other, {"adapter": "lora"}, "ckpt.pt")
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=1e-12, atol=1e-12)
    for n, p in model.named_parameters():
        if n in base:
            torch.testing.assert_close(p.detach(), base[n], rtol=1e-12, atol=1e-12)


def test_a_merged_models_state_dict_serves_in_the_plain_base_and_counts_the_update_twice_in_an_adapted_one():
    """The README: a merged layer's state_dict() holds the merged weight: loaded into the plain base it computes the
    adapted function (only the lora_ tensors unexpected); loaded into an adapted, unmerged model (every name fits, so
    nothing warns) the update counts twice: the base's output plus twice the adapter's."""
    x, plain = torch.randn(5, 12, dtype=torch.float64), nn.Sequential(nn.Linear(12, 10, dtype=torch.float64))
    model = nn.Sequential(make_layer(d_in=12, d_out=10, r=4, experts=1, seed=1)).eval()
    with torch.no_grad():
        base, adapted = F.linear(x, model[0].weight, model[0].bias), model(x)
    assert (adapted - base).abs().max() > 1e-2  # a real update
    model[0].merge()
    state = model.state_dict()
    assert set(plain.load_state_dict(state, strict=False).unexpected_keys) == set(teamlora.adapter_state_dict(model))
    fresh = nn.Sequential(make_layer(d_in=12, d_out=10, r=4, experts=1, seed=2)).eval()
    fresh.load_state_dict(state)  # strict: the names and shapes all fit
    with torch.no_grad():
        torch.testing.assert_close(plain(x), adapted, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fresh(x), base + 2 * (adapted - base), rtol=1e-12, atol=1e-12)
