"""baselines.py: MoELoRA written as a loop over experts, and HydraLoRA, against their equations.

    python -m pytest -q
"""
import copy
import math

import pytest
import torch
import torch.nn as nn

import baselines
import teamlora
from baselines import HydraLoRALinear, MoELoRALoop, moelora_fused_kwargs
from teamlora import TeamLoRALinear


def moelora_reference(x, W, A, B, router, alpha):
    """Eq. 7 written out in the test: k independent pairs (A_i, B_i) of rank r_B, softmax weights."""
    k, r_b = A.shape[0], A.shape[1]
    w = torch.softmax(x @ router.T, -1)
    return x @ W.T + sum(w[..., i:i + 1] * (alpha / r_b) * (x @ A[i].T @ B[i].T) for i in range(k))


@pytest.mark.parametrize("k", [2, 4])
def test_moelora_loop_matches_eq7_and_the_fused_moelora_that_train_py_runs(k):
    torch.manual_seed(k)
    base = nn.Linear(12, 10, bias=False, dtype=torch.float64)
    loop = MoELoRALoop(base, r=3 * k, experts=k, alpha=16.0, dropout=0.0, adapter_dtype=torch.float64)
    with torch.no_grad():
        loop.lora_B.normal_()  # a fresh B is zero, which would hide every bug
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    want = moelora_reference(x, base.weight, loop.lora_A, loop.lora_B, loop.lora_router, 16.0)
    torch.testing.assert_close(loop(x), want, rtol=1e-12, atol=1e-12)
    fused = TeamLoRALinear(base, dropout=0.0, adapter_dtype=torch.float64, **moelora_fused_kwargs(3 * k, k, 16.0))
    with torch.no_grad():
        fused.lora_A.copy_(loop.lora_A.flatten(0, 1))  # A = [A_1; ...; A_k]
        fused.lora_B.copy_(torch.cat(list(loop.lora_B), 1))  # B = [B_1 ... B_k]
        fused.lora_router.copy_(loop.lora_router)
    torch.testing.assert_close(fused(x), want, rtol=1e-12, atol=1e-12)


def test_moelora_loop_injects_like_any_adapter_and_refuses_competition():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    teamlora.inject(model, ("0", "2"), r=4, experts=2, alpha=8.0, competition=False, cls=MoELoRALoop)
    assert type(model[0]) is type(model[2]) is MoELoRALoop  # the class asked for, not TeamLoRALinear's same names
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained == [f"{m}.lora_{p}" for m in ("0", "2") for p in ("A", "B", "router")]
    assert model(torch.randn(3, 8)).shape == (3, 4)
    with pytest.raises(ValueError, match="no interaction matrix"):
        MoELoRALoop(nn.Linear(4, 4), r=4, experts=2, competition=True)


def test_hydralora_r_is_the_rank_of_its_shared_a_like_every_other_adapter():
    layer = HydraLoRALinear(nn.Linear(10, 7), r=4, experts=4, alpha=8.0)
    assert layer.r == 4 and layer.lora_A.shape == (4, 10) and layer.lora_B.shape == (7, 16)
    assert "r=4, experts=4" in repr(layer)
    team = TeamLoRALinear(nn.Linear(10, 7), r=4, experts=4, alpha=8.0)
    assert team.r == team.lora_A.shape[0] == 4  # the same meaning: the rank of the A that tokens go through


def hydralora_reference(x, W, b, A, B, router, alpha):
    """HydraLoRA written out in the test: h = x W^T + b + (alpha / r) sum_i phi_i B_i A x, phi = softmax(x W_r^T),
    one A (r x d_in) and head B_i the i-th d_out x r block of B."""
    r, k = A.shape[0], router.shape[0]
    phi = torch.softmax(x @ router.T, -1)
    z = x @ A.T
    return x @ W.T + b + sum(phi[..., i:i + 1] * (alpha / r) * (z @ B[:, i * r:(i + 1) * r].T) for i in range(k))


@pytest.mark.parametrize("k", [2, 3])
def test_hydralora_matches_its_equation_and_leaves_k_times_the_router_softmax_for_the_balance_loss(k):
    """The layer's output against the equation; its omega is TeamLoRA's convention (k phi, summing to k), so
    teamlora.expert_load gives the mean phi and teamlora.balance_loss mean_i (mean k phi_i - 1)^2; competition=True
    has no meaning here and is refused."""
    torch.manual_seed(k)
    base = nn.Linear(12, 10, dtype=torch.float64)
    layer = HydraLoRALinear(base, r=4, experts=k, alpha=6.0, dropout=0.0, adapter_dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_()  # a fresh B is zero, which would hide every bug
        base.bias.normal_()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    want = hydralora_reference(x, base.weight, base.bias, layer.lora_A, layer.lora_B, layer.lora_router, 6.0)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    phi = torch.softmax(x @ layer.lora_router.detach().T, -1).reshape(-1, k)
    model = nn.Sequential(layer)
    torch.testing.assert_close(teamlora.expert_load(model)["0"], phi.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(teamlora.balance_loss(model), ((k * phi.mean(0) - 1) ** 2).mean(), rtol=1e-12,
                               atol=1e-12)
    phi = torch.softmax(x @ layer.lora_router.T, -1).reshape(-1, k)  # and its gradient reaches the router
    (want,) = torch.autograd.grad(((k * phi.mean(0) - 1) ** 2).mean(), layer.lora_router)
    (grad,) = torch.autograd.grad(teamlora.balance_loss(model), layer.lora_router)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="HydraLoRA has no interaction matrix: use competition=False"):
        HydraLoRALinear(nn.Linear(12, 10), r=4, experts=k, competition=True)


def test_hydralora_fresh_initial_state_has_its_own_shapes():
    """train.py initialises every adapter from initial_lora_state(): HydraLoRA's must have its own shapes."""
    layer = HydraLoRALinear(nn.Linear(10, 7), r=3, experts=2)
    state = layer.initial_lora_state()
    assert {n: tuple(t.shape) for n, t in state.items()} == {
        n: tuple(p.shape) for n, p in layer.named_parameters() if n.startswith("lora_")}
    assert (state["lora_B"] == 0).all() and state["lora_A"].abs().sum() > 0


@pytest.mark.parametrize("cls", [HydraLoRALinear, MoELoRALoop])
def test_baselines_drop_out_in_training_only(cls):
    """Dropout on the adapter's input in train mode; none in eval mode, where the output is the
    same function of x on every call and equals the layer's with dropout=0."""
    torch.manual_seed(0)
    base = nn.Linear(10, 7).double()
    layer = cls(base, r=4, experts=2, alpha=6.0, dropout=0.5, adapter_dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_()
    plain = cls(base, r=4, experts=2, alpha=6.0, dropout=0.0, adapter_dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(6, 10, dtype=torch.float64)
    layer.eval()
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-12, atol=1e-12)
    layer.train()
    assert not torch.allclose(layer(x), plain(x))


def test_the_loop_reference_drops_out_z_not_x():
    """team_lora_delta_loop applies dropout to z = x A^T (Eq. 9 and the official file: dropout on z_i), not to x.
    With B = I (d_out = r) each output coordinate is omega_e(j) * scaling * z_j, written out here: with dropout
    every coordinate is either 0 or that value / (1 - p)."""
    torch.manual_seed(0)
    k, r, d_in, p, scaling = 4, 8, 12, 0.5, 2.0
    x, A = torch.randn(6, d_in, dtype=torch.float64), torch.randn(r, d_in, dtype=torch.float64)
    router = torch.randn(k, d_in, dtype=torch.float64)
    M = (torch.rand(k, k, dtype=torch.float64) - 0.5).fill_diagonal_(0.0) / 5
    clean, omega = baselines.team_lora_delta_loop(x, A, torch.eye(r, dtype=torch.float64), router, M, scaling, 0.0)
    torch.testing.assert_close(clean, omega.repeat_interleave(r // k, -1) * scaling * (x @ A.T), rtol=1e-12,
                               atol=1e-12)
    dropped, _ = baselines.team_lora_delta_loop(x, A, torch.eye(r, dtype=torch.float64), router, M, scaling, p)
    kept = dropped != 0
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(dropped[kept], clean[kept] / (1 - p), rtol=1e-12, atol=1e-12)


def test_moelora_loop_draws_each_expert_like_its_own_nn_linear():
    """Each A_i (r_B x d_in) and the router are kaiming-uniform with bound 1 / sqrt(d_in), as nn.Linear(d_in, r_B)
    draws its weight, not as one (k, r_B, d_in) tensor, whose fan-in r_B * d_in would give a sqrt(r_B) times
    smaller A. 512 uniform draws per expert: the largest is within 5% of the bound."""
    torch.manual_seed(0)
    d_in = 64
    layer = MoELoRALoop(nn.Linear(d_in, 8), r=32, experts=4)
    bound = 1 / math.sqrt(d_in)
    for t in (*layer.lora_A, layer.lora_router):
        assert 0.95 * bound < t.abs().max() <= bound


def test_moelora_loop_refuses_a_rank_that_is_not_a_multiple_of_experts():
    """r = 10 over 4 experts would silently train rank 4 * (10 // 4) = 8, as TeamLoRA's layer refuses to."""
    with pytest.raises(ValueError, match=r"needs r a multiple of experts \(got r=10, experts=4"):
        MoELoRALoop(nn.Linear(4, 4), r=10, experts=4)
    assert MoELoRALoop(nn.Linear(4, 4), r=12, experts=4).lora_A.shape == (4, 3, 4)


@pytest.mark.parametrize("experts", [2, 8])
def test_hydralora_shared_a_is_drawn_like_an_nn_linear_of_its_input_width_whatever_the_heads(experts):
    """The shared A (r x d_in) is kaiming-uniform with bound 1 / sqrt(d_in), as nn.Linear(d_in, r) and the layer's own
    initial_lora_state() draw it: the number of heads must not shrink it. 1024 draws: the largest is within 5%."""
    torch.manual_seed(0)
    d_in = 64
    layer = HydraLoRALinear(nn.Linear(d_in, 7), r=16, experts=experts)
    bound = 1 / math.sqrt(d_in)
    for a in (layer.lora_A, layer.initial_lora_state()["lora_A"]):
        assert a.shape == (16, d_in) and 0.95 * bound < a.abs().max() <= bound


def test_a_fresh_moelora_loop_is_its_base_layer():
    """Each B_i starts at zero, as in LoRA: before training the adapted layer computes the base layer exactly, in
    training mode (dropout on) as in eval mode."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double()
    layer = MoELoRALoop(base, r=8, experts=4, alpha=16.0, dropout=0.5, adapter_dtype=torch.float64)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    assert (layer.lora_B == 0).all()
    for mode in (True, False):
        torch.testing.assert_close(layer.train(mode)(x), base(x), rtol=0, atol=0)


def _one_input_width_layer(cls, experts):
    """An adapter on nn.Linear(1, 2) with A a column of ones and each B_i = I (z has 2 coordinates): without dropout
    a token's delta is a multiple of its one input x in both coordinates, so whether x or z = x A^T is dropped
    shows."""
    base = nn.Linear(1, 2, bias=False).double()
    layer = cls(base, r=2, experts=experts, alpha=4.0, dropout=0.5, adapter_dtype=torch.float64)
    with torch.no_grad():
        base.weight.zero_()
        layer.lora_A.fill_(1.0)
        layer.lora_B.copy_(torch.eye(2, dtype=torch.float64).repeat(1, experts).reshape(layer.lora_B.shape))
    x = torch.randn(400, 1, dtype=torch.float64)
    clean = layer.eval()(x)
    torch.manual_seed(0)
    return layer.train()(x), clean


def test_moelora_loop_drops_out_its_input_x_as_eq7_writes_it():
    """MoELoRA: B_i A_i dropout(x). With one input feature a token's whole delta is dropped or kept (scaled by
    1 / (1 - p)), never one coordinate of it."""
    dropped, clean = _one_input_width_layer(MoELoRALoop, experts=1)
    kept = (dropped != 0).all(-1)
    assert kept.any() and (~kept).any() and ((dropped == 0).all(-1) | kept).all()
    torch.testing.assert_close(dropped[kept], clean[kept] / 0.5, rtol=1e-12, atol=1e-12)


def test_moelora_loop_draws_its_own_dropout_mask_for_each_expert():
    """Public MoELoRA calls dropout(x) once per expert: independent masks. With one input feature and B_i the i-th
    unit column, coordinate i of a token's delta is expert i's alone, so some tokens keep one and lose the other."""
    base = nn.Linear(1, 2, bias=False).double()
    layer = MoELoRALoop(base, r=2, experts=2, alpha=4.0, dropout=0.5, adapter_dtype=torch.float64)
    with torch.no_grad():
        base.weight.zero_()
        layer.lora_A.fill_(1.0)
        layer.lora_B.copy_(torch.eye(2, dtype=torch.float64).unsqueeze(-1))  # B_i = e_i
    x = torch.randn(400, 1, dtype=torch.float64)
    clean = layer.eval()(x)
    torch.manual_seed(0)
    dropped = layer.train()(x)
    kept = dropped != 0
    assert (kept.sum(-1) == 1).any() and kept.all(-1).any() and (~kept).all(-1).any()
    torch.testing.assert_close(dropped[kept], clean[kept] / 0.5, rtol=1e-12, atol=1e-12)


def test_hydralora_drops_out_its_shared_z_as_teamloras_layer_does():
    """HydraLoRA, like TeamLoRALinear (Eq. 9), drops out z = x A^T coordinate by coordinate: with one input
    feature some tokens keep one coordinate of their delta and lose the other."""
    dropped, clean = _one_input_width_layer(HydraLoRALinear, experts=2)
    kept = dropped != 0
    assert (kept.sum(-1) == 1).any() and kept.all(-1).any() and (~kept).all(-1).any()
    torch.testing.assert_close(dropped[kept], clean[kept] / 0.5, rtol=1e-12, atol=1e-12)


def test_hydralora_refuses_an_input_of_another_width_in_one_sentence():
    layer = HydraLoRALinear(nn.Linear(12, 7), r=4, experts=2)
    with pytest.raises(ValueError, match=r"HydraLoRALinear expects inputs \(\.\.\., 12\), got \(3, 5\)"):
        layer(torch.randn(3, 5))


@pytest.mark.parametrize("r", [0, -3])
def test_hydralora_names_its_own_rank_when_it_is_not_positive(r):
    """The rank a user gave, not r * experts (TeamLoRA's layer under it would have said r=-12 for r=-3)."""
    with pytest.raises(ValueError, match=rf"HydraLoRA needs a positive rank r for its shared A, got r={r}\.$"):
        HydraLoRALinear(nn.Linear(8, 8), r=r, experts=4, competition=False)


def test_hydralora_with_one_head_is_refused_in_one_sentence_in_the_layer_and_in_train_py():
    """One head needs no router (it is LoRA); the layer would otherwise fail at its first forward."""
    with pytest.raises(ValueError, match="HydraLoRA weighs experts >= 2 heads by a router, got experts=1"):
        HydraLoRALinear(nn.Linear(12, 7), r=4, experts=1)
    import train
    with pytest.raises(train.UserError, match="hydralora weighs experts >= 2 heads, got experts=1.*--adapter=lora"):
        train.parse_config(["--adapter=hydralora", "--experts=1"])
    train.parse_config(["--adapter=hydralora", "--experts=2"])


@pytest.mark.parametrize("cls", [HydraLoRALinear, MoELoRALoop])
def test_baselines_on_a_bf16_base_run_their_float32_adapter_and_return_bf16(cls):
    """As TeamLoRALinear: a bf16 base with float32 adapters (the default) takes bf16 inputs, runs the adapter on
    them cast to float32 and returns the base's dtype; the result is the float64 layer's to bf16 precision."""
    torch.manual_seed(0)
    layer = cls(nn.Linear(12, 10).bfloat16(), r=4, experts=2, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(3, 5, 12, dtype=torch.bfloat16)
    ref = copy.deepcopy(layer).double()(x.double())  # the same layer in float64
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("cls, kw", [(MoELoRALoop, {}), (HydraLoRALinear, dict(competition=False))])
def test_a_baselines_adapters_are_made_on_its_base_layers_device(cls, kw):
    """A base on the meta device (a 7B built before its weights are read) gets adapters there too: none is
    allocated on the CPU beside it."""
    layer = cls(nn.Linear(12, 8, device="meta"), r=4, experts=2, **kw)
    assert {p.device.type for p in layer.parameters()} == {"meta"}


def adapter_of(kind, base, r_b, k, alpha, dtype=torch.float64):
    """One layer of each kind over `base`, dropout off; r_b: each expert's rank (HydraLoRA: its shared A's)."""
    kw = dict(dropout=0.0, adapter_dtype=dtype)
    if kind == "moelora loop":
        return MoELoRALoop(base, r=k * r_b, experts=k, alpha=alpha, **kw)
    if kind == "moelora fused":
        return TeamLoRALinear(base, **kw, **moelora_fused_kwargs(k * r_b, k, alpha))
    return HydraLoRALinear(base, r=r_b, experts=k, alpha=alpha, **kw)


def test_each_baseline_matches_its_equation_written_as_a_plain_per_expert_loop_gradients_included():
    """A seeded fuzz over k, ranks, widths, alphas, biases and train or eval mode (dropout off): MoELoRA (as a loop
    and fused, as train.py runs it) against Eq. 7 and HydraLoRA against its equation, each written here as a loop
    over experts on plain tensors, in float64: the outputs, and the gradients of the input and of every adapter
    tensor (A_i, B_i and the router of the fused MoELoRA taken as the slices of its stacked A and B)."""
    import random
    rng = random.Random(0)
    for case in range(60):
        kind = ("moelora loop", "moelora fused", "hydralora")[case % 3]
        k, r_b, d_in, d_out = rng.randint(2, 6), rng.randint(1, 4), rng.randint(1, 20), rng.randint(1, 20)
        alpha, g = rng.choice([1.0, 7.5, 16.0]), torch.Generator().manual_seed(case)
        torch.manual_seed(case)
        base = nn.Linear(d_in, d_out, bias=rng.random() < 0.5, dtype=torch.float64)
        layer = adapter_of(kind, base, r_b, k, alpha).train(rng.random() < 0.5)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)  # B too: a fresh B is zero
        x = torch.randn(2, rng.randint(1, 4), d_in, dtype=torch.float64, generator=g, requires_grad=True)
        mine = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters() if "lora_" in n}
        xr, W = x.detach().clone().requires_grad_(True), base.weight.detach()
        b = 0.0 if base.bias is None else base.bias.detach()
        A, B, router = mine["lora_A"], mine["lora_B"], mine["lora_router"]
        if kind == "moelora loop":  # A (k, r_B, d_in), B (k, d_out, r_B)
            want = moelora_reference(xr, W, A, B, router, alpha) + b
        elif kind == "moelora fused":  # A = [A_1; ...; A_k] (k r_B, d_in), B = [B_1 ... B_k] (d_out, k r_B)
            want = moelora_reference(xr, W, A.view(k, r_b, d_in), B.view(d_out, k, r_b).transpose(0, 1), router,
                                     alpha) + b
        else:
            want = hydralora_reference(xr, W, b, A, B, router, alpha)
        got = layer(x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{case} {kind}: {m}")
        weights = torch.randn(got.shape, dtype=torch.float64, generator=g)
        (got * weights).sum().backward()
        (want * weights).sum().backward()
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-9)
        for n, p in layer.named_parameters():
            if "lora_" in n:
                torch.testing.assert_close(p.grad, mine[n].grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"{n}: {m}")


KINDS = ("teamlora", "moelora", "hydralora", "lora", "moelora loop")


def model_of(kind, r=8, k=4, seed=0):
    """Two adapted layers of `kind`, injected as train.py injects its adapters (MoELoRALoop: as bench.py does)."""
    import train
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 16))
    if kind == "moelora loop":
        return teamlora.inject(model, ("0", "1"), r=r, experts=k, alpha=8.0, dropout=0.0, competition=False,
                               cls=MoELoRALoop)
    kw = train.adapter_kwargs({"adapter": kind, "r": r, "experts": k, "alpha": 8.0, "competition": None})
    return teamlora.inject(model, ("0", "1"), dropout=0.0, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_each_adapter_kind_round_trips_through_its_state_dict_and_train_pys_checkpoint(kind):
    """adapter_state_dict into load_adapter_state_dict, and train.py's gather_state into load_state (a resume): a
    model built alike (another seed) computes the saved one's function exactly."""
    import checkpoint
    model, x = model_of(kind).eval(), torch.randn(3, 16)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "lora_" in n):
            p.add_(torch.randn_like(p) * 0.3)  # B != 0: a fresh B would hide a tensor not loaded
        want = model(x)
    for load in (lambda m: teamlora.load_adapter_state_dict(m, teamlora.adapter_state_dict(model)),
                 lambda m: checkpoint.load_state(m, checkpoint.gather_state(model, {"adapter": kind}),
                                                 {"adapter": kind}, "ckpt.pt")):
        twin = model_of(kind, seed=1).eval()
        twin.load_state_dict({n: t for n, t in model.state_dict().items() if "lora_" not in n}, strict=False)
        with torch.no_grad():
            assert not torch.equal(twin(x), want)
        load(twin)
        with torch.no_grad():
            assert torch.equal(twin(x), want)


@pytest.mark.parametrize("saved,built", [(a, b) for a in KINDS for b in KINDS if a != b])
def test_an_adapter_of_one_kind_is_refused_by_a_model_built_for_another_in_one_sentence(saved, built):
    """Same r and experts: each pair of kinds differs in a tensor's name or shape, which the library's loader and a
    resume's (checkpoint.load_state) name in one sentence with the fix, copying nothing."""
    import checkpoint
    from errors import UserError
    state = teamlora.adapter_state_dict(model_of(saved, seed=1))
    model = model_of(built)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^the adapter does not fit this model \(.*\): inject as in training"):
        teamlora.load_adapter_state_dict(model, state)
    with pytest.raises(UserError, match=r"^the checkpoint's .* does not fit this model .*: (resume|load it) ") as e:
        checkpoint.load_state(model, state, {"adapter": built}, "ckpt.pt")
    assert "\n" not in str(e.value) and str(e.value).endswith(".")  # one sentence
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


@pytest.mark.parametrize("adapter,r,k,competition", [("lora", 32, 4, None), ("teamlora", 64, 8, False),
                                                     ("moelora", 128, 4, None), ("moelora", 96, 3, True),
                                                     ("hydralora", 32, 4, None), ("hydralora", 16, 2, None)])
@pytest.mark.usefixtures("at_a_fresh_root")
def test_the_dry_runs_trainable_parameters_are_each_adapters_own_count(adapter, r, k, competition, capsys):
    """The dry run (meta device) of the LLaMA-2-7B recipe with FFN adapters of each kind prints the parameters of its
    equations, counted here by hand: A, B, the router and M where the method has them (HydraLoRA: B is k heads of
    rank r); and a model built on the CPU with the same keywords holds as many per layer."""
    import train
    from model import ModelArgs
    flags = ["config/cme_llama2_7b.py", "--dry_run=True", "--init_from=nowhere", f"--adapter={adapter}", f"--r={r}",
             f"--experts={k}"] + ([] if competition is None else [f"--competition={competition}"])
    cfg = train.parse_config(flags)
    out = train.train(cfg)
    args = ModelArgs.from_name(cfg["model"])
    k = 1 if adapter == "lora" else k
    m = k * k if adapter == "teamlora" and competition is not False or adapter == "moelora" and competition else 0

    def per(d_in, d_out):  # one adapted linear d_in -> d_out
        if adapter == "hydralora":
            return r * d_in + k * r * d_out + k * d_in
        return r * (d_in + d_out) + (k * d_in if k > 1 else 0) + m
    d, f = args.dim, args.ffn_hidden_dim
    assert out["trainable_params"] == args.n_layers * (2 * per(d, f) + per(f, d))
    assert f"{out['trainable_params']:,} trainable parameters" in capsys.readouterr().out
    small = teamlora.inject(nn.Sequential(nn.Linear(24, 40)), "0", dropout=0.0, **train.adapter_kwargs(cfg))
    assert sum(p.numel() for p in small.parameters() if p.requires_grad) == per(24, 40)


@pytest.mark.parametrize("r,experts", [(4, 0), (4, -2), (0, 2), (-4, 2), (1, 2)])
def test_moelora_loop_refuses_experts_or_ranks_below_one_in_one_sentence(r, experts):
    """Not a ZeroDivisionError (r % 0, alpha / 0) or torch's negative-dimension error: one sentence with the fix."""
    with pytest.raises(ValueError, match=rf"^MoELoRA has no interaction matrix and needs r a multiple of experts \(got "
                                         rf"r={r}, experts={experts}, competition=False\): use competition=False, "
                                         r"experts >= 1 and r = experts \* r_B with r_B >= 1\.$"):
        MoELoRALoop(nn.Linear(4, 4), r=r, experts=experts)


def test_moelora_loop_refuses_an_input_of_another_width_in_one_sentence():
    """As TeamLoRALinear and HydraLoRALinear do, not torch's matrix-shape error from inside the loop."""
    with pytest.raises(ValueError, match=r"^MoELoRALoop expects inputs \(\.\.\., 4\), got \(2, 5\)\.$"):
        MoELoRALoop(nn.Linear(4, 4), r=4, experts=2)(torch.randn(2, 5))


@pytest.mark.parametrize("width", [0, 3])
def test_moelora_loop_refuses_a_narrower_input_in_one_sentence_too(width):
    """A narrower input is as wrong as a wider one (a check of `>` alone let it reach torch's matrix-shape error)."""
    with pytest.raises(ValueError, match=rf"^MoELoRALoop expects inputs \(\.\.\., 4\), got \(2, {width}\)\.$"):
        MoELoRALoop(nn.Linear(4, 4), r=4, experts=2)(torch.randn(2, width))


@pytest.mark.parametrize("k", [1, 4])
def test_moelora_loop_refuses_to_merge_in_one_sentence_as_teamloras_layer_refuses_several_experts(k):
    """No single B A folds MoELoRA into its weight (the router weighs the experts per token): merge() and merge(False)
    are a ValueError with the fix, as TeamLoRALinear's with several experts (train.py's fused MoELoRA) is, not an
    AttributeError; nothing changes."""
    loop, x = model_of("moelora loop", k=k).eval(), torch.randn(3, 16)
    with torch.no_grad():
        want, before = loop(x), {n: t.clone() for n, t in loop.state_dict().items()}
    for merged in (True, False):
        with pytest.raises(ValueError, match=r"^MoELoRA cannot merge: its router weighs the experts per token \(only "
                                             r"one expert, LoRA in TeamLoRALinear, merges\); serve it unmerged\.$"):
            loop[0].merge(merged)
        if k > 1:
            with pytest.raises(ValueError, match=r"^only one expert \(LoRA\) can merge"):
                model_of("moelora", k=k)[0].merge(merged)
    assert all(torch.equal(t, before[n]) for n, t in loop.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loop(x), want)


def test_a_teamlora_adapter_without_competition_is_scored_as_moelora_only_where_it_computes_the_same(tmp_path):
    """adapter.pt holds tensors only (TeamLoRA without competition and train.py's fused MoELoRA have the same names
    and shapes); the results.json beside it records the method. Scored as MoELoRA at the alpha it was trained with
    (MoELoRA's update is alpha / k), a function of its own, it is refused naming the method it was trained with; at k
    times that alpha the two are the same function, which a model of each computes from the same tensors: scored."""
    import json

    import checkpoint
    import train
    from errors import UserError
    computes = lambda c: (train.adapter_kwargs(c), c["targets"])  # as train.py's eval_only passes it
    ran = {**train.DEFAULTS, "adapter": "teamlora", "competition": False}
    other = {**ran, "adapter": "moelora", "competition": None}
    same = {**other, "alpha": ran["alpha"] * ran["experts"]}
    (tmp_path / "results.json").write_text(json.dumps({"config": ran}))
    path = str(tmp_path / "adapter.pt")
    with pytest.raises(UserError, match=r" was trained with --adapter=teamlora --competition=False \(says the "
                                        r"results.json beside it\); score it with those\.$"):
        checkpoint.check_adapter_settings(path, other, computes)
    assert checkpoint.check_adapter_settings(path, same, computes) is None
    x, state, outputs = torch.randn(3, 16), model_of("moelora", seed=1)[:1].state_dict(), []
    for t in state.values():
        t.add_(torch.randn_like(t) * 0.3)  # B != 0
    for cfg in (ran, other, same):
        kw = train.adapter_kwargs({**cfg, "r": 8, "experts": 4})
        model = teamlora.inject(nn.Sequential(nn.Linear(16, 12)), "0", dropout=0.0, **kw).eval()
        model.load_state_dict(state)  # the same base and adapter in each
        with torch.no_grad():
            outputs.append(model(x))
    assert not torch.allclose(outputs[0], outputs[1], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(outputs[0], outputs[2], rtol=1e-6, atol=1e-6)
