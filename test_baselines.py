"""baselines.py: MoELoRA written as a loop over experts, and HydraLoRA, against their equations.

    python -m pytest -q
"""
import pytest
import torch
import torch.nn as nn

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
