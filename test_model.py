"""model.py: the LLaMA against closed forms and independent references, presets, forward and loss, generation
(reading checkpoint files: test_weights.py, which takes tiny_model and logits_of from here).

    python -m pytest -q
"""
import json
import math
import re
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (
    PRESETS,
    KVCache,
    ModelArgs,
    RMSNorm,
    Transformer,
    apply_rotary,
    packed_attention,
    rope_cos_sin,
    sample,
)


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


@pytest.mark.parametrize("multiplier", [None, 1.3, 1.5])
def test_ffn_width_is_metas_width_rounded_up_to_the_next_multiple(multiplier):
    """Meta's rule: int(2 * 4 * dim / 3), times ffn_dim_multiplier (truncated), rounded UP to a multiple of
    multiple_of, so a width that already is one stays (the published sizes never land on a multiple)."""
    exact = 0
    for dim in range(8, 1032, 8):
        for multiple_of in (8, 32, 256):
            hidden = int(2 * 4 * dim / 3)
            hidden = int(multiplier * hidden) if multiplier else hidden
            got = ModelArgs(dim=dim, n_heads=4, multiple_of=multiple_of, ffn_dim_multiplier=multiplier).ffn_hidden_dim
            assert got % multiple_of == 0 and hidden <= got < hidden + multiple_of, (dim, multiple_of, got)
            exact += got == hidden
    assert exact > 0  # the grid holds widths already on a multiple


def test_published_parameter_counts_on_meta_device():
    with torch.device("meta"):
        assert Transformer(ModelArgs.from_name("llama2-7b")).num_params() == 6_738_415_616
        assert Transformer(ModelArgs.from_name("llama2-13b")).num_params() == 13_015_864_320
        assert Transformer(ModelArgs.from_name("llama3-8b")).num_params() == 8_030_261_248
        assert Transformer(ModelArgs.from_name("llama3.1-8b")).num_params() == 8_030_261_248
        assert Transformer(ModelArgs.from_name("llama3.2-1b")).num_params() == 1_235_814_400
        assert Transformer(ModelArgs.from_name("qwen3-0.6b")).num_params() == 596_049_920
        assert Transformer(ModelArgs.from_name("qwen3-8b")).num_params() == 8_190_735_360
        assert Transformer(ModelArgs.from_name("mistral-7b")).num_params() == 7_241_732_096  # Mistral-7B-v0.1


def test_every_preset_rotates_with_its_familys_published_rope_theta():
    """A model's weights learned its family's rotary base (the config.json or params.json it was published with):
    Qwen2.5 and Qwen3 1e6, LLaMA 3.x 5e5, LLaMA 2 and Mistral-7B-v0.1 1e4. A preset off its family's rotates every
    position at other frequencies, and its logits are wrong without an error."""
    families = {"qwen": 1e6, "llama3": 5e5, "llama2": 1e4, "chinese-llama2": 1e4, "mistral": 1e4}
    for name in PRESETS:
        if name not in ("tiny", "small"):  # ours, trained from scratch
            family = next(f for f in families if name.startswith(f))
            assert ModelArgs.from_name(name).rope_theta == families[family], name


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_counts_parameters_by_closed_form(name):
    a = ModelArgs.from_name(name)
    hd, f = a.head_dim, a.ffn_hidden_dim
    assert hd == a.dim // a.n_heads or name.startswith("qwen3")  # Qwen3 sets its own head width
    per_layer = 2 * a.dim * a.n_heads * hd + 2 * a.dim * a.n_kv_heads * hd + 3 * a.dim * f + 2 * a.dim
    per_layer += (a.n_heads + 2 * a.n_kv_heads) * hd if a.qkv_bias else 0
    per_layer += 2 * hd if a.qk_norm else 0
    with torch.device("meta"):
        model = Transformer(a)
    embeddings = (1 if a.tie_embeddings else 2) * a.vocab_size * a.dim
    assert model.num_params() == embeddings + a.n_layers * per_layer + a.dim


def test_preset_fields_can_be_overridden():
    assert ModelArgs.from_name("small", vocab_size=1234).vocab_size == 1234


# ---------------------------------------------------------------------------------------------------
# rotary embeddings (the Hugging Face q/k layout: test_weights.py)

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
    x = torch.randn(3, 7, 3, 16)  # (B, T, H, hd)
    # row 2: positions a 16-bit float cannot hold exactly, up to LLaMA 3.1's context
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [9, 0, 1, 2, 250, 251, 4000],
                              [2049, 4001, 8191, 30001, 65519, 100003, 131071]])
    ours = apply_rotary(x, *rope_cos_sin(positions, 16, theta))
    torch.testing.assert_close(ours, complex_rope_reference(x, positions, theta), atol=1e-5, rtol=1e-5)


def llama3_inv_freq_reference(hd, theta, factor, low, high, context):
    """LLaMA 3.1's frequency rule pair by pair, in Python floats: wavelength 2 pi / f; longer than context / low:
    f / factor; shorter than context / high: f; between: (1 - s) f / factor + s f, s = (context / wavelength - low) /
    (high - low)."""
    out = []
    for i in range(0, hd, 2):
        f = 1.0 / theta ** (i / hd)
        wavelength = 2 * math.pi / f
        if wavelength > context / low:
            out.append(f / factor)
        elif wavelength < context / high:
            out.append(f)
        else:
            s = (context / wavelength - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("hd, theta, scaling", [(16, 1e4, (8.0, 1.0, 4.0, 64)), (64, 5e5, (32.0, 1.0, 4.0, 8192)),
                                                 (32, 1e4, (4.0, 2.0, 8.0, 200))])
def test_llama3_rope_scaling_turns_each_pair_by_its_rule(hd, theta, scaling):
    want = llama3_inv_freq_reference(hd, theta, *scaling)
    assert (want < 1.0 / theta ** (torch.arange(0, hd, 2).double() / hd) - 1e-12).any()  # some pairs slowed
    positions = torch.tensor([[0, 1, 7, 300]])
    cos, sin = rope_cos_sin(positions, hd, theta, scaling)
    angles = positions.double()[..., None] * want  # (1, T, hd/2)
    torch.testing.assert_close(cos[:, :, 0].double(), angles.cos(), atol=2e-5, rtol=0)
    torch.testing.assert_close(sin[:, :, 0].double(), angles.sin(), atol=2e-5, rtol=0)
    plain = rope_cos_sin(positions, hd, theta)[0]
    assert not torch.allclose(cos, plain, atol=1e-3)


# ---------------------------------------------------------------------------------------------------
# building on the meta device, as from_pretrained does (reading the files: test_weights.py)

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

def test_logits_to_keep_gives_the_last_positions_logits_and_no_loss_with_them():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny")).eval()
    tokens = torch.randint(0, 512, (3, 11))
    full = model(tokens)[0]
    for keep in (1, 4):
        logits, loss = model(tokens, logits_to_keep=keep)
        assert logits.shape == (3, keep, full.shape[-1]) and loss is None
        torch.testing.assert_close(logits, full[:, -keep:], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="leave logits_to_keep=0 when giving targets"):
        model(tokens, tokens, logits_to_keep=1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_only_runs_the_output_layer_on_labelled_positions_with_the_same_loss_and_gradients(reduction):
    """Training and validation need only the loss: loss_only=True runs the output layer on the positions with a
    label (an instruction's answer), not on the prompt's, and must give the full path's loss and gradients, for
    the trained adapters and for a trained output layer alike, packed rows included. In float64: float32's GEMMs
    over 6 rows and over 36 round differently with two threads on AVX-512 (3e-9 apart in a gradient of 1e-2)."""
    import teamlora
    torch.manual_seed(0)
    model = teamlora.inject(Transformer(ModelArgs.from_name("tiny")), ("w1", "w2"), r=4, experts=2, alpha=8,
                            dropout=0.0).double()
    model.output.weight.requires_grad_(True)
    with torch.no_grad():  # B starts at 0: move every trained tensor so that each gets a gradient of its own
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.02 * torch.randn_like(p))
    tokens = torch.randint(0, 512, (3, 12))
    targets = torch.full_like(tokens, -100)
    targets[0, 7:10], targets[1, 2:4], targets[2, 11] = tokens[0, 8:11], tokens[1, 3:5], 5
    seq_ids = torch.tensor([[0] * 12, [0] * 4 + [1] * 8, [0] * 9 + [-1] * 3])
    rows = []
    hook = model.output.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    runs = []
    for loss_only in (False, True):
        model.zero_grad()
        logits, loss = model(tokens, targets, seq_ids=seq_ids, reduction=reduction, loss_only=loss_only)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        assert (logits is None) == loss_only
    hook.remove()
    assert rows == [3 * 12, 6]  # every position, then the 6 labelled ones
    (full, full_grads), (only, only_grads) = runs
    torch.testing.assert_close(only, full, rtol=1e-12, atol=0)
    assert full_grads.keys() == only_grads.keys() and "output.weight" in full_grads
    for n in full_grads:
        torch.testing.assert_close(only_grads[n], full_grads[n], rtol=1e-12, atol=1e-15, msg=n)
    with pytest.raises(ValueError, match="without targets there is none"):
        model(tokens, loss_only=True)


def test_loss_only_keeps_label_zero_and_agrees_on_an_unlabelled_batch_and_in_bfloat16():
    """Only -100 marks a position without a label: token id 0 is a word like any other (LLaMA-3's "!"), and
    loss_only must score it as the full path does. A batch with no label at all (every answer cut away) gives the
    full path's loss (sum 0, mean NaN), and in a bfloat16 model the loss is computed in float32 on both paths."""
    torch.manual_seed(0)
    model = tiny_model()
    tokens = torch.randint(0, 512, (2, 9))
    targets = torch.full_like(tokens, -100)
    targets[0, 2:6], targets[1, 4:7] = torch.tensor([0, 7, 0, 511]), 0  # label 0 on most labelled positions
    seq_ids = torch.tensor([[0] * 5 + [1] * 4, [0] * 7 + [-1] * 2])
    for reduction in ("mean", "sum"):
        full = model(tokens, targets, seq_ids=seq_ids, reduction=reduction)[1]
        only = model(tokens, targets, seq_ids=seq_ids, reduction=reduction, loss_only=True)[1]
        torch.testing.assert_close(only, full, rtol=1e-6, atol=0)
        none = torch.full_like(tokens, -100)
        full = model(tokens, none, reduction=reduction)[1]
        only = model(tokens, none, reduction=reduction, loss_only=True)[1]
        torch.testing.assert_close(only, full, rtol=0, atol=0, equal_nan=True)
        assert (full.isnan() if reduction == "mean" else full == 0)
    model = model.to(torch.bfloat16)
    full = model(tokens, targets, seq_ids=seq_ids)[1]
    only = model(tokens, targets, seq_ids=seq_ids, loss_only=True)[1]
    assert full.dtype == only.dtype == torch.float32
    torch.testing.assert_close(only, full, rtol=1e-6, atol=0)


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
            alone, alone_loss = model(tokens[row:row + 1, start:start + n],
                                      targets[row:row + 1, start:start + n], reduction="sum")
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


@pytest.mark.parametrize("packed", [False, True])
def test_gradient_checkpointing_gives_same_loss_and_gradients(packed):
    model = tiny_model().train()
    tokens, targets = torch.randint(0, 512, (2, 10)), torch.randint(0, 512, (2, 10))
    seq_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [-1] * 3]) if packed else None  # the masked path
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(tokens, targets, seq_ids=seq_ids)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_gradient_checkpointing_recomputes_each_block_in_backward_only_when_training_with_grad():
    """gradient_checkpointing=True must actually recompute (each block runs twice per step: the memory it saves);
    without it, in eval mode, under no_grad and in cached generation each block runs once."""
    model = tiny_model()
    calls = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda m, args: calls.append(m))  # recompute may stop early
    tokens = torch.randint(0, 512, (2, 8))
    n = len(model.layers)
    for ckpt, training, grad, want in ((True, True, True, 2 * n), (False, True, True, n), (True, False, True, n),
                                       (True, True, False, n)):
        model.gradient_checkpointing = ckpt
        model.train(training)
        calls.clear()
        with torch.set_grad_enabled(grad):
            loss = model(tokens, tokens.roll(-1, 1))[1]
            if grad:
                loss.backward()
        assert len(calls) == want, (ckpt, training, grad)
        if ckpt and training and grad:  # the recompute: each block again, last first
            assert calls[n:] == list(model.layers)[::-1]
    model.train()
    calls.clear()
    model.generate([[1, 2, 3]], 2)
    assert len(calls) == 2 * n  # the prompt, then one step: once each


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


def naive_rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight: eps inside the square root, as in LLaMA."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def naive_attention(attn, x, positions, theta, visible):
    """Grouped-query attention written head by head: query head h reads key/value head h // n_rep,
    each key/value head serving a contiguous group of n_rep query heads (Meta's and HF's layout).
    x (B, T, C), positions (B or 1, T), visible (B, T, T) bool: which keys each query sees."""
    B, T, _ = x.shape
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    n_rep = H // Hkv
    q = complex_rope_reference((x @ attn.wq.weight.T).view(B, T, H, hd), positions, theta)
    k = complex_rope_reference((x @ attn.wk.weight.T).view(B, T, Hkv, hd), positions, theta)
    v = (x @ attn.wv.weight.T).view(B, T, Hkv, hd)
    heads = []
    for h in range(H):
        g = h // n_rep  # the key/value head of query head h
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(hd)  # (B, T, T)
        scores = scores.masked_fill(~visible, float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, :, g])  # (B, T, hd)
    return torch.cat(heads, -1) @ attn.wo.weight.T  # heads side by side, head h at columns h*hd


def naive_llama(model, tokens):
    """The whole LLaMA forward from its parameters, with the naive norm and attention above."""
    a = model.args
    T = tokens.shape[1]
    positions = torch.arange(T)[None]
    visible = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(tokens.shape[0], T, T)
    h = model.tok_embeddings.weight[tokens]
    for layer in model.layers:
        h = h + naive_attention(layer.attention, naive_rms_norm(h, layer.attention_norm.weight, a.norm_eps),
                                positions, a.rope_theta, visible)
        ff, n = layer.feed_forward, naive_rms_norm(h, layer.ffn_norm.weight, a.norm_eps)
        h = h + (F.silu(n @ ff.w1.weight.T) * (n @ ff.w3.weight.T)) @ ff.w2.weight.T
    return naive_rms_norm(h, model.norm.weight, a.norm_eps) @ model.output.weight.T


def test_grouped_query_attention_matches_naive_attention_over_repeated_heads():
    """4 query heads on 2 key/value heads: heads 0, 1 read kv head 0 and heads 2, 3 read kv head 1,
    on the plain causal path, the masked (packed) path and the KV-cache path of decoding."""
    model = tiny_model(seed=6)
    attn, a = model.layers[0].attention, model.args
    assert (attn.n_heads, attn.n_kv_heads) == (4, 2)
    torch.manual_seed(0)
    B, T, P = 2, 9, 5
    x = torch.randn(B, T, a.dim)
    positions = torch.arange(T)[None]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    want = naive_attention(attn, x, positions, a.rope_theta, causal[None].expand(B, T, T))
    cos, sin = rope_cos_sin(positions, a.head_dim, a.rope_theta)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), want, atol=1e-5, rtol=1e-4)  # mask=None
        torch.testing.assert_close(attn(x, cos, sin, mask=causal[None, None].expand(B, 1, T, T)), want,
                                   atol=1e-5, rtol=1e-4)
        # decoding: a prompt of P tokens, then one token at a time against the cached keys and values
        cache = KVCache(B, T, a.n_kv_heads, a.head_dim, torch.float32, "cpu")
        got = [attn(x[:, :P], cos[:, :P], sin[:, :P], causal[None, None, :P, :P].expand(B, 1, P, P), cache)]
        for t in range(P, T):
            step_mask = torch.ones(B, 1, 1, t + 1, dtype=torch.bool)
            got.append(attn(x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], step_mask, cache))
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-5, rtol=1e-4)
    # and the kv heads really differ, so a wrong head assignment would show
    w = attn.wk.weight.view(2, a.head_dim, a.dim)
    assert not torch.allclose(w[0], w[1])


@pytest.mark.parametrize("theta", [10000.0, 500000.0])  # LLaMA 2's and 3's: each rotates q and k by its own
def test_transformer_and_cached_generation_match_a_naive_llama_with_grouped_query_heads(theta):
    model = tiny_model(seed=7, rope_theta=theta)
    assert model.args.n_kv_heads < model.args.n_heads
    tokens = torch.randint(0, model.args.vocab_size, (2, 11))
    torch.testing.assert_close(logits_of(model, tokens), naive_llama(model, tokens), atol=1e-4, rtol=1e-4)
    prompt = torch.randint(0, model.args.vocab_size, (6,)).tolist()
    naive_greedy = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            naive_greedy.append(int(naive_llama(model, torch.tensor([naive_greedy]))[0, -1].argmax()))
    assert model.generate([prompt], 8)[0] == naive_greedy[len(prompt):]


def test_a_decoding_loop_of_ones_own_through_trunk_with_caches_and_no_mask_is_causal_over_the_whole_cache():
    """model.trunk(tokens, positions, caches=...) without a mask, as a user's own decoding loop calls it on unpadded
    rows: each new query sees every cached key, not (SDPA's is_causal, aligned top-left) only the first ones."""
    model = tiny_model(seed=8)
    a = model.args
    tokens = torch.randint(0, a.vocab_size, (2, 12))
    want = logits_of(model, tokens)
    caches = [KVCache(2, 12, a.n_kv_heads, a.head_dim, torch.float32, "cpu") for _ in model.layers]
    with torch.no_grad():  # a prompt of 5, one token, then a chunk of 3 (speculative decoding's check), then 3 more
        got = [model.head(model.trunk(tokens[:, s:e], torch.arange(s, e)[None], caches=caches))
               for s, e in ((0, 5), (5, 6), (6, 9), (9, 10), (10, 11), (11, 12))]
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-4, rtol=1e-4)


def test_caches_are_filled_and_read_with_gradient_checkpointing_on_in_training_mode_with_grad():
    """checkpoint() calls a block without its cache: trunk must run each block plainly whenever caches are given,
    or a checkpointing model decoding with grad on (a policy's own rollout) would neither fill nor read them."""
    model, calls = tiny_model(seed=8), []
    a = model.args
    tokens = torch.randint(0, a.vocab_size, (2, 8))
    want = logits_of(model, tokens)
    model.train().gradient_checkpointing = True
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda m, args: calls.append(len(args)))  # 5: the cache passed on
    caches = [KVCache(2, 8, a.n_kv_heads, a.head_dim, torch.float32, "cpu") for _ in model.layers]
    got = torch.cat([model.head(model.trunk(tokens[:, s:e], torch.arange(s, e)[None], caches=caches))
                     for s, e in ((0, 5), (5, 6), (6, 8))], 1)
    assert got.requires_grad and all(c.length == 8 for c in caches) and set(calls) == {5}
    torch.testing.assert_close(got.detach(), want, atol=1e-4, rtol=1e-4)


def test_a_kv_cache_asked_to_hold_more_than_its_length_says_so_in_one_sentence():
    cache = KVCache(1, 4, 2, 8, torch.float32, "cpu")
    cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match=r"^the KV cache holds 4 positions, 3 of them filled: 2 more do not fit; "
                                         r"build it with max_len at least"):
        cache.update(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))
    assert cache.length == 3
    k, _ = cache.update(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8))  # the last position still fits
    assert k.shape == (1, 2, 4, 8) and cache.length == 4


def test_rms_norm_keeps_eps_inside_the_square_root():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=0.1)  # eps comparable to mean(x^2) = 0.01: sqrt(ms + eps) != sqrt(ms) + eps
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = 0.1 * torch.randn(3, 5, 16, dtype=torch.float64)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 0.1) * norm.weight.double()
    torch.testing.assert_close(norm(x.float()).double(), want, atol=1e-6, rtol=1e-5)


def test_rms_norm_of_bf16_rounds_once_after_normalising_in_full_precision():
    """In bf16 the statistics are taken in float32, so the normalised x is rounded to bf16 once: it equals
    the float64 normalisation rounded to bf16 (then times the weight) almost everywhere. Normalising in
    bf16 would round the scale too, moving about a quarter of the elements by one bf16 step."""
    torch.manual_seed(0)
    norm = RMSNorm(1024, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(1024))
    x = (torch.randn(64, 1024) * torch.rand(64, 1) * 10).to(torch.bfloat16)
    xd = x.double()
    want = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * norm.weight
    assert (norm(x) == want).float().mean() > 0.99


def test_initialisation_scales_residual_projections_by_sqrt_two_n_layers():
    """GPT-2's scheme: N(0, 0.02) everywhere, N(0, 0.02 / sqrt(2 n_layers)) for wo and w2, norms 1."""
    torch.manual_seed(0)
    args = ModelArgs(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=1024, multiple_of=64)
    model = Transformer(args)
    residual_std = 0.02 / math.sqrt(2 * 8)  # 0.005, a quarter of 0.02
    groups = {"norm": [], "residual": [], "other": []}
    for name, p in model.named_parameters():
        kind = ("norm" if name.endswith("norm.weight") else
                "residual" if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else "other")
        groups[kind].append(p.detach().flatten())
    assert len(groups["residual"]) == 2 * 8 and len(groups["norm"]) == 2 * 8 + 1
    assert all(torch.equal(p, torch.ones_like(p)) for p in groups["norm"])
    for kind, std in (("residual", residual_std), ("other", 0.02)):
        values = torch.cat(groups[kind])
        assert values.numel() > 500_000  # enough for an estimate within a few parts in a thousand
        assert abs(values.std().item() / std - 1) < 0.02, (kind, values.std().item(), std)
        assert abs(values.mean().item()) < 0.01 * std
    for name, p in model.named_parameters():  # and every tensor on its own, to 5%
        if not name.endswith("norm.weight"):
            std = residual_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
            assert abs(p.std().item() / std - 1) < 0.05, (name, p.std().item(), std)


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
    assert model.generate(prompts, 0) == [[], [], [], []]
    assert batched == [greedy_without_cache(model, p, 15) for p in prompts]


def test_generation_stops_before_eos():
    model = tiny_model(seed=3)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (4, 7)]
    free = model.generate(prompts, 12)
    eos = free[0][3]
    stopped = model.generate(prompts, 12, eos_id=eos)
    assert stopped == [row[:row.index(eos)] if eos in row else row for row in free]
    assert len(stopped[0]) <= 3


def test_temperature_0_is_greedy_and_takes_the_first_of_tied_best_tokens():
    """Greedy decoding is deterministic: the most likely token, at an exact tie the lowest id, whatever the seed."""
    logits = torch.tensor([[0.0, 3.0, 3.0, -1.0], [2.0, 2.0, 2.0, 2.0]]).repeat(32, 1)
    for seed in range(3):
        got = sample(logits, 0.0, 1.0, torch.Generator().manual_seed(seed))
        assert torch.equal(got, torch.tensor([1, 0]).repeat(32))


def test_sampling_is_seeded_and_tiny_top_p_is_greedy():
    model = tiny_model(seed=4)
    prompts = [[1, 2, 3], [7]]
    a = model.generate(prompts, 10, temperature=1.0, seed=123)
    assert a == model.generate(prompts, 10, temperature=1.0, seed=123)
    assert a != model.generate(prompts, 10, temperature=1.0, seed=124)
    assert model.generate(prompts, 10, temperature=1.0, top_p=1e-6, seed=5) == model.generate(prompts, 10)


def test_a_tiny_temperature_draws_the_most_likely_token_as_greedy_does():
    """Temperature -> 0 tends to greedy: at 1e-40 or 1e-300, where logits / temperature passes float32's range, every
    draw is the most likely token (no NaN from an overflowing softmax), in sample and through generate."""
    logits = torch.tensor([[2.0, 3.0, 1.0], [0.0, -1.0, 0.5], [40.0, 39.99, -40.0]]).repeat(20, 1)
    for temperature in (1e-30, 1e-40, 1e-300, 5e-324):
        got = sample(logits, temperature, 1.0, torch.Generator().manual_seed(0))
        assert torch.equal(got, logits.argmax(-1)), temperature
    model = tiny_model(seed=4)
    prompts = [[1, 2, 3], [7]]
    assert model.generate(prompts, 10, temperature=1e-300, top_p=0.9, seed=0) == model.generate(prompts, 10)


def test_top_p_keeps_the_smallest_set_reaching_it_even_at_an_exact_tie():
    """Probabilities exactly 0.5, 0.25, 0.25: top_p = 0.5 is reached by the first token alone, 0.75 by
    the first two; 1.0 keeps all three."""
    logits = torch.tensor([[0.0, -math.log(2), -math.log(2)]]).repeat(400, 1)
    assert torch.equal(torch.softmax(logits[:1], -1), torch.tensor([[0.5, 0.25, 0.25]]))
    g = torch.Generator().manual_seed(0)
    for top_p, kept in ((0.5, {0}), (0.75, {0, 1}), (1.0, {0, 1, 2})):
        assert set(sample(logits, 1.0, top_p, g).tolist()) == kept, top_p


def test_top_p_1_keeps_every_token_even_where_the_running_sum_rounds_to_1_early(monkeypatch):
    """In float32 the two leading probabilities of softmax([0, 0, -20]) already sum to exactly 1, so a top-p cut
    applied at top_p=1 would drop the third token: top_p=1 is plain sampling, every token keeps its probability."""
    logits = torch.tensor([[0.0, 0.0, -20.0]])
    probs = torch.softmax(logits, -1).sort(-1, descending=True).values
    assert probs[0, :2].sum() == 1.0 and probs[0, 2] > 0  # the premise: the rounding happens
    given = []
    draw = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, *a, **k: given.append(p) or draw(p, *a, **k))
    sample(logits, 1.0, 1.0)
    assert torch.equal(given[0], probs)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_draws_from_softmax_of_logits_over_temperature(temperature):
    """Frequencies of many draws against softmax(logits / T), and draw by draw against inverse-CDF
    sampling with the same generator state (torch.multinomial over the probabilities sorted the same way)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    want = torch.softmax(logits / temperature, -1)
    n = 40_000
    draws = sample(logits.expand(n, 5), temperature, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / n
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)  # the binomial std is below 0.0025
    probs, order = want.sort(descending=True)
    ref = order[torch.multinomial(probs.expand(64, 5), 1, generator=torch.Generator().manual_seed(1))[:, 0]]
    assert torch.equal(sample(logits.expand(64, 5), temperature, 1.0, torch.Generator().manual_seed(1)), ref)


def test_generate_restores_training_mode():
    model = tiny_model().train()
    model.generate([[1, 2]], 2)
    assert model.training


# ---------------------------------------------------------------------------------------------------
# errors a user can cause

def test_unknown_preset_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model name 'llama9'.*llama2-7b.*tiny"):
        ModelArgs.from_name("llama9")


def test_bad_inputs_are_reported():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, model.args.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens\\[None\\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="targets has shape"):
        model(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"seq_ids has shape \(1, 4\) but tokens have \(1, 5\)"):
        model(torch.zeros(1, 5, dtype=torch.long), seq_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction='none' is not supported"):  # would return a vector, not a loss
        model(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long), reduction="none")
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate([[1] * 250], 10)
    with pytest.raises(ValueError, match="token id outside"):
        model.generate([[1, 512]], 3)
    with pytest.raises(ValueError, match="non-empty prompts"):
        model.generate([[1], []], 3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    for vocab_size in (0, -1):  # -1: Meta's params.json value, which only the loader may resolve
        with pytest.raises(ValueError, match=f"vocab_size={vocab_size} must be positive"):
            Transformer(ModelArgs.from_name("tiny", vocab_size=vocab_size))


@pytest.mark.parametrize("field, value", [("n_heads", 0), ("n_kv_heads", 0), ("n_layers", -1), ("dim", "64"),
                                          ("dim", 64.0), ("hidden_dim", 0), ("norm_eps", -1e-5),
                                          ("sliding_window", 0), ("max_seq_len", 0), ("qk_norm", "yes")])
def test_model_args_refuse_a_field_of_the_wrong_kind_in_one_sentence_naming_it(field, value):
    # before: n_heads=0 a ZeroDivisionError, n_layers=-1 a model of no layers, norm_eps<0 NaN, a window of 0 ignored
    with pytest.raises(ValueError, match=f"^ModelArgs has {field}={value!r} where .* belongs; pass one$"):
        ModelArgs.from_name("tiny", **{field: value})


def test_forward_refuses_tokens_that_are_not_integer_ids_and_takes_int32_as_long():
    model, tokens = tiny_model(), torch.randint(0, 512, (2, 6))
    for dtype in (torch.float32, torch.bool, torch.uint8):  # uint8 and bool indices: embedding's deep RuntimeError
        with pytest.raises(ValueError, match=f"integer token ids, got \\(2, 6\\) {dtype}; .*\\.long\\(\\)"):
            model(tokens.to(dtype))
    torch.testing.assert_close(model(tokens.int())[0], model(tokens)[0], rtol=0, atol=0)


def test_logits_to_keep_refuses_a_negative_or_fractional_count():
    model, tokens = tiny_model(), torch.randint(0, 512, (2, 6))
    for keep in (-2, 1.5):  # -2 sliced h[:, 2:]: all but the first two positions, silently
        with pytest.raises(ValueError, match=f"logits_to_keep={keep} must be a count >= 0"):
            model(tokens, logits_to_keep=keep)


def test_generate_refuses_prompts_that_are_not_lists_of_whole_token_ids():
    model = tiny_model()
    for prompts in (torch.tensor([[1, 2, 3]]), torch.tensor([1, 2, 3]), [1, 2, 3], iter([[1, 2, 3]])):
        with pytest.raises(ValueError, match="non-empty prompts, each a list of token ids"):
            model.generate(prompts, 3)
    with pytest.raises(ValueError, match="not a whole number"):  # was silently truncated to token 1
        model.generate([[1.7, 2]], 3)
    V = model.args.vocab_size  # the first and last ids are tokens (greedy: the logits' argmax), one past either is not
    assert model.generate([[0, V - 1]], 1) == [[logits_of(model, torch.tensor([[0, V - 1]]))[0, -1].argmax().item()]]
    for outside in (-1, V):
        with pytest.raises(ValueError, match=rf"token id outside \[0, {V}\)"):
            model.generate([[1, outside]], 3)
    import numpy as np
    expected = model.generate([[1, 2, 3]], 3)
    assert model.generate(((1, 2, 3),), 3) == model.generate([np.array([1, 2, 3])], 3) == expected


@pytest.mark.parametrize("max_new_tokens, eos_id", [(-1, None), (1.5, None), (None, None), (3, [2, 3])])
def test_generate_refuses_a_count_below_0_or_fractional_and_a_list_of_eos_ids(max_new_tokens, eos_id):
    # before: -1 answered [[]], a list of eos ids never stopped decoding
    with pytest.raises(ValueError, match=f"max_new_tokens={max_new_tokens!r}, eos_id=.*whole number >= 0"):
        tiny_model().generate([[1, 2]], max_new_tokens, eos_id=eos_id)

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


# ---------------------------------------------------------------------------------------------------
# Qwen2 / Qwen2.5 and Mistral

def test_tied_embeddings_are_one_tensor_and_survive_a_meta_build():
    model = tiny_model(tie_embeddings=True)
    assert "output.weight" not in model.state_dict()
    with torch.device("meta"):
        emptied = Transformer(model.args)
    emptied = emptied.to_empty(device="cpu")
    emptied.load_state_dict(model.state_dict())
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    assert torch.equal(logits_of(emptied, tokens), logits_of(model, tokens))
    hidden = model.trunk(tokens, torch.arange(12)[None])
    torch.testing.assert_close(model.head(hidden), hidden @ model.tok_embeddings.weight.T)


def test_a_sequence_longer_than_the_sliding_window_is_refused_in_one_sentence():
    model = tiny_model(sliding_window=8)
    logits_of(model, torch.randint(0, 100, (1, 8)))  # up to the window: plain causal attention is exact
    with pytest.raises(ValueError, match="a sequence is 9 tokens, longer than this model's sliding_window=8"):
        logits_of(model, torch.randint(0, 100, (1, 9)))
    seq_ids = torch.tensor([[0] * 6 + [1] * 6])  # packed: each sequence within the window is fine
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 12)), seq_ids=seq_ids)
    with pytest.raises(ValueError, match="longest prompt plus max_new_tokens is 10 tokens"):
        model.generate([[1] * 6], 4)


@pytest.mark.parametrize("name, family", [("qwen2.5-0.5b", "Qwen2"), ("qwen2.5-7b", "Qwen2"),
                                          ("mistral-7b", "Mistral"), ("llama3.1-8b", "Llama"),
                                          ("llama3.2-1b", "Llama"), ("qwen3-0.6b", "Qwen3"), ("qwen3-8b", "Qwen3")])
def test_new_presets_count_parameters_as_transformers_builds_them(name, family):
    transformers = pytest.importorskip("transformers")
    a = ModelArgs.from_name(name)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, tie_word_embeddings=a.tie_embeddings,
        head_dim=a.head_dim)
    with torch.device("meta"):
        hf, ours = getattr(transformers, f"{family}ForCausalLM")(config), Transformer(a)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("name", ["llama3.2-1b", "qwen3-0.6b"])
def test_model_args_survive_model_pt_and_json_round_trips(tmp_path, name):
    a = ModelArgs.from_name(name)  # rope_scaling a tuple, head_dim set
    torch.save({"model_args": asdict(a)}, tmp_path / "m.pt")
    assert ModelArgs(**torch.load(tmp_path / "m.pt", weights_only=True)["model_args"]) == a
    assert ModelArgs(**json.loads(json.dumps(asdict(a)))) == a


# ---------------------------------------------------------------------------------------------------
# added from mutation testing

def test_a_packed_sequence_longer_than_the_sliding_window_is_refused():
    """The window bounds each packed sequence's own length (its last position + 1), not the row's."""
    model = tiny_model(sliding_window=8)
    tokens = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        model(tokens, seq_ids=torch.tensor([[0] * 8 + [1] * 4]))  # exactly the window: accepted
        with pytest.raises(ValueError, match="a sequence is 9 tokens, longer than this model's sliding_window=8"):
            model(tokens, seq_ids=torch.tensor([[0] * 3 + [1] * 9]))


def test_generate_decodes_without_dropout_and_keeps_the_callers_mode():
    """Adapters hold dropout: generate on a model in training mode decodes as in eval mode (greedy
    equals recomputing without a cache, in eval mode), then leaves either mode as it found it."""
    import teamlora
    model = tiny_model(seed=8)
    teamlora.inject(model, ("wq", "w2"), r=4, experts=1, alpha=8, dropout=0.5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):  # B starts at zero: a nonzero one makes the adapter (and its dropout) count
                p.copy_(torch.randn_like(p) * 0.5)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (3, 6)]
    model.eval()
    want = [greedy_without_cache(model, p, 8) for p in prompts]
    assert model.generate(prompts, 8) == want
    assert not model.training
    model.train()
    assert model.generate(prompts, 8) == want
    assert model.training


def test_model_args_refuse_heads_that_do_not_split_into_even_widths():
    with pytest.raises(ValueError, match="dim=10 must split into n_heads=4 heads of even width"):
        ModelArgs(dim=10, n_heads=4)  # 10 / 4 is not whole
    with pytest.raises(ValueError, match="dim=12 must split into n_heads=4 heads of even width"):
        ModelArgs(dim=12, n_heads=4)  # heads of 3: rotary pairs cannot form
    assert ModelArgs(dim=16, n_heads=4).head_dim == 4
    with pytest.raises(ValueError, match="head_dim=5 must be even"):  # an explicit width (Qwen3's) is checked too
        ModelArgs(dim=64, n_heads=4, head_dim=5)
    assert ModelArgs(dim=64, n_heads=4, head_dim=6).head_dim == 6


def test_an_unknown_preset_override_is_a_value_error_listing_the_fields():
    with pytest.raises(ValueError, match=r"unknown ModelArgs field\(s\) \['hidden_size'\].*dim, n_layers"):
        ModelArgs.from_name("tiny", hidden_size=64)


def test_packed_attention_matches_a_loop_and_padding_sees_only_padding():
    """Against the rule written out token by token; every row sees at least itself, so no softmax row is
    all masked (which gives NaN on some backends), and a real token never sees padding."""
    seq_ids = torch.tensor([[-1, -1, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, -1, -1], [0] * 7])
    mask, positions = packed_attention(seq_ids)
    B, T = seq_ids.shape
    assert mask.shape == (B, 1, T, T) and positions.shape == (B, T)
    for b in range(B):
        for i in range(T):
            same = [j for j in range(i + 1) if seq_ids[b, j] == seq_ids[b, i]]
            assert mask[b, 0, i].nonzero().flatten().tolist() == same, (b, i)
            assert positions[b, i] == len(same) - 1
    assert mask.any(-1).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cached_generation_works_in_the_models_dtype(dtype, monkeypatch):
    """The KV cache holds the model's dtype: in float64 cached greedy decoding equals recomputing;
    in bfloat16 (how 7B models run) it decodes every step. The sampler always gets float32 logits
    (softmax, temperature and top-p's running sum in bf16 would distort the distribution)."""
    import model as model_module
    sampled, real_sample = [], model_module.sample
    monkeypatch.setattr(model_module, "sample", lambda logits, *a, **kw: (sampled.append(logits.dtype),
                                                                           real_sample(logits, *a, **kw))[1])
    model = tiny_model(seed=1).to(dtype)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (7, 3)]
    got = model.generate(prompts, 10)
    assert sampled == [torch.float32] * 10  # the prompt's step and every decoding step
    if dtype == torch.float64:
        assert got == [greedy_without_cache(model, p, 10) for p in prompts]
    assert [len(row) for row in got] == [10, 10]


@pytest.mark.parametrize("eos", [9, 0])  # 0: an EOS numbered 0 stops decoding too (not read as "no EOS")
def test_generation_stops_once_every_row_has_emitted_eos(monkeypatch, eos):
    """A scripted sampler: row 0 emits EOS at step 1 then goes on, row 1 at step 3. Decoding stops after
    step 3 (one prefill and three decode passes through the trunk), each row cut before its EOS."""
    script = torch.tensor([[5, eos, 6, 7, 8, 5, 6, 7], [5, 6, 7, eos, 8, 5, 6, 7]])  # (B, steps)
    steps = iter(script.T)
    monkeypatch.setattr("model.sample", lambda logits, temperature, top_p, generator=None: next(steps))
    model = tiny_model()
    passes = []
    model.norm.register_forward_hook(lambda module, args, out: passes.append(1))
    assert model.generate([[1, 2], [3]], 8, eos_id=eos) == [[5], [5, 6, 7]]
    assert len(passes) == 4
    steps, passes[:] = iter(script.T), []  # without EOS: the last token is sampled, never fed back
    assert model.generate([[1, 2], [3]], 3) == script[:, :3].tolist()
    assert len(passes) == 3


def test_max_seq_len_is_the_longest_sequence_accepted():
    model = tiny_model(max_seq_len=16)
    tokens = torch.randint(0, 512, (1, 16))
    assert logits_of(model, tokens).shape == (1, 16, 512)
    assert len(model.generate([[1] * 10], 6)[0]) == 6  # 10 + 6 = 16 positions
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        model.generate([[1] * 10], 7)


@pytest.mark.parametrize("temperature, top_p", [(-0.5, 1.0), (1.0, 0.0), (1.0, 1.5), (float("nan"), 1.0),
                                                (float("inf"), 1.0), ("0.5", 1.0), (True, 1.0), (1.0, "1")])
def test_generate_refuses_a_negative_temperature_or_top_p_outside_0_1(temperature, top_p):
    # before: a string was a TypeError from a comparison, True was taken for temperature 1
    with pytest.raises(ValueError, match=re.escape(f"temperature={temperature!r}, top_p={top_p!r} are out of range")):
        tiny_model().generate([[1, 2]], 3, temperature=temperature, top_p=top_p)


def test_transformer_refuses_what_is_not_a_model_args_in_one_sentence():
    for args in ("tiny", None, {"dim": 64}):  # before: an AttributeError on str, NoneType or dict
        with pytest.raises(ValueError, match=f"^Transformer takes a ModelArgs, got {type(args).__name__} .*from_name"):
            Transformer(args)


def test_forward_on_the_cpu_refuses_token_ids_outside_the_vocabulary():
    model = tiny_model()
    V = model.args.vocab_size
    for bad in (V, -1):  # before: the embedding's IndexError "index out of range in self"
        tokens = torch.randint(0, V, (2, 6))
        tokens[1, 3] = bad
        with pytest.raises(ValueError, match=f"^tokens hold ids outside \\[0, {V}\\).*tokenizer$"):
            model(tokens)
    edges = torch.tensor([[0, V - 1]])
    assert model(edges)[0].shape == (1, 2, V) and model(edges[:, :0])[0].shape == (1, 0, V)  # the ends, no token


@pytest.mark.parametrize("scaling, what", [((8.0,), "where null or 4 numbers belong"), ("8", "where null or 4"),
                                           ((8.0, 4.0, 1.0, 8192), "low_freq_factor=4.0 not below"),
                                           ((8.0, 1.0, 4.0, 8192.5), "original_max_position_embeddings=8192.5"),
                                           ((0.0, 1.0, 4.0, 8192), "factor=0.0 where a positive number")])
def test_model_args_refuse_a_rope_scaling_that_is_not_four_fitting_numbers(scaling, what):
    # before: accepted here, and a wrong length failed only at the first forward, deep in rope_cos_sin
    with pytest.raises(ValueError, match=f"^ModelArgs has .*{re.escape(what)}.*; pass one$"):
        ModelArgs.from_name("tiny", rope_scaling=scaling)
    assert ModelArgs.from_name("tiny", rope_scaling=[8.0, 1.0, 4.0, 8192]).rope_scaling == (8.0, 1.0, 4.0, 8192)


def test_initialisation_zeroes_the_qkv_biases():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", qkv_bias=True))
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    assert len(biases) == 3 * model.args.n_layers
    assert all(torch.equal(p, torch.zeros_like(p)) for p in biases)


def test_init_weights_after_to_empty_sets_every_parameter_as_a_fresh_build_does():
    """init_weights is what its docstring says to call after to_empty(): there RMSNorm's own ones are gone, so it
    must set the norms to 1 itself, the biases to 0, and leave nothing as to_empty found it."""
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name("tiny", qkv_bias=True))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # whatever memory to_empty left, made visible
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name


def test_model_args_defaults_are_the_llama2_7b_preset():
    """A field a Meta params.json leaves out takes ModelArgs' default, which is LLaMA-2-7B's, as in Meta's own
    ModelArgs: the defaults and the preset are one configuration."""
    assert ModelArgs() == ModelArgs.from_name("llama2-7b")


def test_each_presets_norm_eps_is_its_familys():
    """Qwen's config.json files say rms_norm_eps 1e-6; LLaMA's and Mistral's, 1e-5 (ModelArgs' default)."""
    for name in PRESETS:
        assert ModelArgs.from_name(name).norm_eps == (1e-6 if name.startswith("qwen") else 1e-5), name


# ---------------------------------------------------------------------------------------------------
# checkpoint.py (train.py's checkpoints; the rest of its tests are in test_train.py and test_data.py)

def test_a_cuda_runs_rng_state_restores_the_cuda_generator_and_a_cpu_run_never_touches_cuda(tmp_path, monkeypatch):
    """CUDA's generator (dropout on the GPU) is saved and restored for a CUDA run, through a weights_only file,
    on the run's own device; a CPU run never asks CUDA for it (that would start a CUDA context). CUDA is
    stood in for, so this runs anywhere."""
    import checkpoint
    cuda_state, asked, restored = torch.arange(16, dtype=torch.uint8), [], []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda dev: (asked.append(dev), cuda_state.clone())[1])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, dev: restored.append((state, dev)))
    cpu, gpu, file = torch.device("cpu"), torch.device("cuda", 1), str(tmp_path / "rng.pt")
    checkpoint.save_atomic({"cpu": checkpoint.rng_state(cpu), "gpu": checkpoint.rng_state(gpu)}, file)
    assert asked == [gpu]
    states = checkpoint.load_pt(file, "test file")
    checkpoint.set_rng_state(states["cpu"], cpu)
    assert restored == []
    checkpoint.set_rng_state(states["gpu"], gpu)
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_state) and restored[0][1] == gpu


def test_fsdp_shards_only_under_torchrun(monkeypatch):
    """fsdp=True without a process group (plain python train.py) trains one unsharded model instead of
    calling fully_shard, which needs one; under torchrun it shards, even with one process."""
    import checkpoint
    for initialized in (False, True):
        monkeypatch.setattr(checkpoint.dist, "is_initialized", lambda: initialized)
        assert checkpoint.sharded({"fsdp": True}) == initialized
        assert not checkpoint.sharded({"fsdp": False})
