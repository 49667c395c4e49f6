"""
LLaMA 2, 3, 3.1 and 3.2, Qwen2 / Qwen2.5 / Qwen3 and Mistral in one file: the base model that TeamLoRA adapts.

Module names follow Meta's reference code (tok_embeddings, layers.N.attention.wq, ...), so Meta's
consolidated.*.pth checkpoints load with no renaming; Hugging Face checkpoints are renamed and their
q/k rows un-permuted on the way in (see hf_to_meta_qk). Every projection is a plain nn.Linear (bias-free but
for Qwen2's q, k and v) that is only ever called, so an adapter library can swap it for a subclass by name.

The architecture in one breath: token embedding -> n_layers x [RMSNorm -> attention with rotary
position embeddings and grouped-query heads -> residual, RMSNorm -> SwiGLU MLP -> residual] ->
RMSNorm -> output projection to the vocabulary. Qwen2 adds biases to the q, k and v projections
(qkv_bias) and, in its small sizes, reuses the token embedding as the output projection
(tie_embeddings); Qwen3 drops the biases, normalises each head of q and k before the rotation (qk_norm) and
sets its own head width (head_dim); Mistral is this layout exactly, with a sliding attention window in its v0.1
(sequences longer than the window are refused, not silently attended in full). LLaMA 3.1 and 3.2
slow the rotation of their low-frequency pairs (rope_scaling) to stretch an 8K context to 128K.
"""

import contextlib
import glob
import json
import math
import os
import pickle
import re
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: as many as n_heads (plain multi-head attention)
    vocab_size: int = 32000  # Meta's params.json says -1 ("read it from the weights")
    multiple_of: int = 256  # the FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    hidden_dim: Optional[int] = None  # explicit FFN width (HF's intermediate_size); None: Meta's rule
    qkv_bias: bool = False  # Qwen2: the q, k and v projections have biases
    tie_embeddings: bool = False  # the output projection is the token embedding (one tensor)
    sliding_window: Optional[int] = None  # Mistral v0.1: each token sees this many; longer sequences are refused
    # LLaMA 3.1+ (transformers' rope_type "llama3"): (factor, low_freq_factor, high_freq_factor, original context)
    rope_scaling: Optional[tuple] = None
    head_dim: Optional[int] = None  # the width of a head; None: dim / n_heads (Qwen3 sets its own)
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head of q and of k, before the rotation

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and (self.dim % self.n_heads or (self.dim // self.n_heads) % 2):
            raise ValueError(f"dim={self.dim} must split into n_heads={self.n_heads} heads of even width; choose dim "
                             "as a multiple of 2*n_heads")
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: the rotation turns pairs of a head's components")
        if self.rope_scaling is not None:  # a list after a JSON round trip
            self.rope_scaling = tuple(self.rope_scaling)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; each "
                             "key/value head must serve a whole group of query heads")

    @property
    def context(self):
        """The longest sequence this model runs: max_seq_len, or its sliding window where that is shorter."""
        return min(self.max_seq_len, self.sliding_window or self.max_seq_len)

    @property
    def ffn_hidden_dim(self):
        if self.hidden_dim is not None:
            return self.hidden_dim
        # Meta's rule: 2/3 of 4*dim (SwiGLU has three matrices instead of two), scaled, rounded up
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_name(cls, name, **overrides):
        """A preset by name, e.g. ModelArgs.from_name("small", vocab_size=2048)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model name {name!r}; valid names are: {', '.join(PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelArgs field(s) {sorted(unknown)}; valid fields are: "
                             f"{', '.join(f.name for f in fields(cls))}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=4096),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, max_seq_len=4096),
    # the paper's base: LLaMA-2-7B with a vocabulary extended by Chinese tokens
    "chinese-llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=55296, max_seq_len=4096),
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                      ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=8192),
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                        rope_theta=500000.0, max_seq_len=131072, rope_scaling=(8.0, 1.0, 4.0, 8192)),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                        rope_theta=500000.0, max_seq_len=131072, rope_scaling=(32.0, 1.0, 4.0, 8192),
                        tie_embeddings=True),
    "qwen2.5-0.5b": dict(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, vocab_size=151936, hidden_dim=4864,
                         norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768, qkv_bias=True, tie_embeddings=True),
    "qwen2.5-7b": dict(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, vocab_size=152064, hidden_dim=18944,
                       norm_eps=1e-6, rope_theta=1e6, max_seq_len=131072, qkv_bias=True),
    "qwen3-0.6b": dict(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, vocab_size=151936,
                       hidden_dim=3072, norm_eps=1e-6, rope_theta=1e6, max_seq_len=40960, qk_norm=True,
                       tie_embeddings=True),
    "qwen3-8b": dict(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=151936,
                     hidden_dim=12288, norm_eps=1e-6, rope_theta=1e6, max_seq_len=40960, qk_norm=True),
    # the same network as published before post-training, whose config.json gives it 32768 positions, not 40960
    "qwen3-8b-base": dict(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=151936,
                          hidden_dim=12288, norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768, qk_norm=True),
    "mistral-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32000, hidden_dim=14336,
                       rope_theta=10000.0, max_seq_len=32768, sliding_window=4096),  # v0.1
    # small ones for tests and CPU runs (both use grouped-query attention, so it is always exercised)
    "tiny": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=256),
    "small": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, multiple_of=64, max_seq_len=512),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # the mean of squares is computed in float32: in bf16 it loses too many digits
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_cos_sin(positions, head_dim, theta, scaling=None):
    """positions (B, T) or (1, T) -> cos, sin (B, T, 1, head_dim/2) in float32.
    Pair i of a head turns by the angle position * theta^(-2i/head_dim). Computed on the fly rather
    than kept as a buffer, so it survives meta-device builds, .to(bfloat16) and per-row positions.
    scaling (LLaMA 3.1+: factor, low, high, context): a pair whose wavelength exceeds context / low turns
    `factor` times slower, one shorter than context / high as before, and those between blend the two."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    if scaling is not None:
        factor, low, high, context = scaling
        blend = ((context * inv_freq / (2 * math.pi) - low) / (high - low)).clamp(0.0, 1.0)  # context / wavelength
        inv_freq = inv_freq / factor * (1 - blend) + inv_freq * blend
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x, cos, sin):
    """x (B, T, H, hd). Meta's layout: the rotated pairs are adjacent, (x0, x1), (x2, x3), ..."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, hd/2) each
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, T, H, hd/2, 2)
    return rotated.flatten(-2).type_as(x)


def hf_to_meta_qk(w, n_heads):
    """Undo the row permutation Hugging Face's converter applies to wq and wk (pass n_kv_heads for
    wk). HF's rotary code rotates the first half of a head against the second half, so its
    converter moves row 2j of each head to j and row 2j+1 to j + hd/2; this moves them back."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def packed_attention(seq_ids):
    """seq_ids (B, T) -> mask (B, 1, T, T) bool, positions (B, T).
    A token sees the earlier tokens with its own seq_id, and its position is how many those are,
    so positions restart at 0 for every packed sequence. Padding (negative ids) sees only padding,
    never nothing: an all-masked row would give NaN, and NaN values poison later layers."""
    T = seq_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seq_ids.device).tril()
    mask = (seq_ids[:, :, None] == seq_ids[:, None, :]) & causal  # (B, T, T)
    return mask[:, None], mask.sum(-1) - 1


def repeat_kv(x, n_rep):
    """(B, Hkv, S, hd) -> (B, Hkv * n_rep, S, hd): query head h uses key/value head h // n_rep."""
    B, Hkv, S, hd = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, S, hd).reshape(B, Hkv * n_rep, S, hd)


class KVCache(nn.Module):
    """Keys and values of every position seen so far, for one layer, preallocated for the batch."""

    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = 0

    def update(self, k, v):
        T = k.shape[2]
        if self.length + T > self.k.shape[2]:  # the slice assignment below would fail with a bare shape error
            raise ValueError(f"the KV cache holds {self.k.shape[2]} positions, {self.length} of them filled: {T} more "
                             "do not fit; build it with max_len at least the prompt plus the new tokens")
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]  # (B, Hkv, S, hd)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k = self.wq(x).view(B, T, H, hd), self.wk(x).view(B, T, Hkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q, cos, sin).transpose(1, 2)  # (B, H, T, hd)
        k = apply_rotary(k, cos, sin).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, S, hd): every position so far, this step's included
            if mask is None and k.shape[2] != T:  # is_causal aligns its triangle top-left: the T new queries would
                # see only the first T keys, not the whole cache; query t sees keys up to S - T + t
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
        if mask is None:
            # plain causal attention: the fast path (flash attention on GPUs)
            y = F.scaled_dot_product_attention(q, repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv), is_causal=True)
        else:
            # the mask is the same for every head, so fold each group of query heads into extra query
            # rows of its key/value head instead of copying K and V (the whole cache, when decoding)
            S = k.shape[2]
            q = q.reshape(B, Hkv, (H // Hkv) * T, hd)  # (B, Hkv, rep*T, hd)
            mask = mask.expand(B, 1, T, S).repeat(1, 1, H // Hkv, 1)  # (B, 1, rep*T, S)
            # reshape, not view: CUDA kernels may return it strided
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * hd))  # (B, T, C)


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)  # gate (HF: gate_proj)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)  # down (HF: down_proj)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)  # up (HF: up_proj)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


@contextlib.contextmanager
def keep_last_omega(module):
    """Activation checkpointing's context for the recompute in backward (`checkpoint(..., use_reentrant=False,
    context_fn=lambda: (contextlib.nullcontext(), keep_last_omega(block)))`; a whole model works too): the
    adapters in `module` keep the `last_omega` of the first forward. The recompute's omega would otherwise stay on
    the adapter until the next forward, and with it the recomputed block's whole autograd graph: every block's
    activations at once (42 GiB against LoRA's 17.6 at LLaMA-2-7B's shape, micro-batch 4 x 1024)."""
    kept = [(m, m.last_omega) for m in module.modules() if hasattr(m, "last_omega")]
    try:
        yield
    finally:
        for m, omega in kept:
            m.last_omega = omega


class Transformer(nn.Module):
    def __init__(self, args, gradient_checkpointing=False):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError(f"vocab_size={args.vocab_size} must be positive; set it to the tokenizer's vocabulary "
                             "size")
        self.args = args
        self.gradient_checkpointing = gradient_checkpointing  # recompute each block in backward to save memory
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # tied: no second matrix (a shared Parameter would come apart in to_empty() and sharding)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self):
        """Fresh weights for training from scratch (a no-op on the meta device; call it after
        to_empty() when not loading a checkpoint). GPT-2's scheme: N(0, 0.02), and the projections
        that write into the residual stream scaled down by sqrt(2 * n_layers)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=0.02 / (2 * self.args.n_layers) ** 0.5)
            else:
                nn.init.normal_(p, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def _check_window(self, length, what):
        window = self.args.sliding_window
        if window and length > window:
            raise ValueError(f"{what} is {length} tokens, longer than this model's sliding_window={window}, which is "
                             f"not implemented (attention would reach past it); keep sequences to {window} tokens")

    def head(self, h):
        """Final hidden states -> logits: the output projection, or the token embedding when tied."""
        return self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)

    def trunk(self, tokens, positions, mask=None, caches=None):
        """tokens (B, T), positions (B, T) or (1, T) -> final-normed hidden states (B, T, C). mask None: causal, over
        the caches' earlier positions too (unpadded rows, each of them at the same length)."""
        h = self.tok_embeddings(tokens)  # (B, T, C)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta, self.args.rope_scaling)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and caches is None:
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False, context_fn=lambda layer=layer: (
                    contextlib.nullcontext(), keep_last_omega(layer)))
            else:
                h = layer(h, cos, sin, mask, None if caches is None else caches[i])
        return self.norm(h)

    def forward(self, tokens, targets=None, seq_ids=None, reduction="mean", logits_to_keep=0, loss_only=False):
        """tokens (B, T) -> (logits (B, T, vocab) float32, loss or None). logits_to_keep=n > 0: the logits of the
        last n positions only, (B, n, vocab), for a forward run for its side effects (the adapters' omega): with
        a 128k vocabulary, 64 x 1024 tokens' logits would take 47 GiB (bfloat16, then float32). loss_only=True (with
        targets; training and validation): (None, loss), the output layer run on the labelled positions only, as
        the others add nothing to the loss (an instruction's prompt: most of its tokens).

        targets (B, T) are already aligned with tokens: targets[:, t] is the label for the token that
        follows tokens[:, t] (the caller shifts), and -100 marks positions without a label. The loss
        is the cross-entropy over labelled positions, their mean or (reduction="sum") their sum.
        seq_ids (B, T) packs several sequences in a row: a token attends only to earlier tokens with
        the same seq_id, rotary positions restart at 0 for each, and a negative seq_id is padding."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be a (batch, time) tensor of token ids, got shape {tuple(tokens.shape)}; "
                             "add a batch dimension with tokens[None]")
        B, T = tokens.shape
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.args.max_seq_len}; cut the sequences or "
                             "raise max_seq_len")
        for name, t in (("targets", targets), ("seq_ids", seq_ids)):
            if t is not None and t.shape != tokens.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but tokens have {tuple(tokens.shape)}; give one "
                                 f"{name[:-1]} per token")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r} is not supported; use 'mean' or 'sum'")
        if logits_to_keep and targets is not None:
            raise ValueError("a loss needs the logits of every position; leave logits_to_keep=0 when giving targets")
        if loss_only and targets is None:
            raise ValueError("loss_only=True returns only the loss, and without targets there is none; give targets")
        if seq_ids is None:
            positions, mask = torch.arange(T, device=tokens.device)[None], None  # (1, T)
        else:
            mask, positions = packed_attention(seq_ids)
        if self.args.sliding_window:  # positions.max() syncs with the device: only where a window is set
            self._check_window(T if seq_ids is None else int(positions.max()) + 1, "a sequence")
        h = self.trunk(tokens, positions, mask)
        if loss_only:  # the same loss and gradients: each row's logits, softmax and gradient are its own
            labelled = targets != -100
            return None, F.cross_entropy(self.head(h[labelled]).float(), targets[labelled], reduction=reduction)
        logits = self.head(h[:, -logits_to_keep:] if logits_to_keep else h).float()  # (B, T or logits_to_keep, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)
        return logits, loss

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens, eos_id=None, temperature=0.0, top_p=1.0, seed=None):
        """Continue each prompt (a list of token ids) by up to max_new_tokens tokens; returns only the
        new tokens, each list cut before its first eos_id. temperature 0 is greedy decoding.
        The prompts are left-padded into one batch: padding gets seq_id -1 (so no real token attends to it)
        and each row's rotary positions start at its first real token. Sampling draws from a generator seeded with
        seed (None: the global one): the same seed repeats the same batch's answers, but a row's draws depend on the
        rows beside it, so a prompt sampled alone (as sample.py does) may answer differently than in a batch."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs a non-empty list of non-empty prompts; give each prompt at least one "
                             "token (e.g. BOS)")
        if not (0 <= temperature < math.inf and 0 < top_p <= 1):  # NaN fails both
            raise ValueError(f"temperature={temperature}, top_p={top_p} are out of range; use temperature >= 0 and 0 < "
                             "top_p <= 1")
        if any(not 0 <= t < self.args.vocab_size for p in prompts for t in p):
            raise ValueError(f"a prompt holds a token id outside [0, {self.args.vocab_size}); encode the prompts with "
                             "this model's tokenizer")
        B, P = len(prompts), max(len(p) for p in prompts)
        total = P + max_new_tokens
        if total > self.args.max_seq_len:
            raise ValueError(f"the longest prompt ({P} tokens) plus max_new_tokens={max_new_tokens} exceeds "
                             f"max_seq_len={self.args.max_seq_len}; shorten the prompts or lower max_new_tokens")
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        self._check_window(P + max_new_tokens, "the longest prompt plus max_new_tokens")
        weight = self.tok_embeddings.weight
        device = weight.device
        tokens = torch.zeros(B, P, dtype=torch.long, device=device)
        seq_ids = torch.zeros(B, total, dtype=torch.long, device=device)  # 0: a real token, -1: padding
        for i, p in enumerate(prompts):
            tokens[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            seq_ids[i, :P - len(p)] = -1
        lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        caches = [KVCache(B, total, self.args.n_kv_heads, self.args.head_dim, weight.dtype, device)
                  for _ in self.layers]
        was_training = self.training
        self.eval()  # adapters may hold dropout
        try:
            mask, positions = packed_attention(seq_ids[:, :P])
            logits = self.head(self.trunk(tokens, positions, mask, caches)[:, -1]).float()  # (B, V)
            out, done = [], torch.zeros(B, dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                next_token = sample(logits, temperature, top_p, generator)  # (B,)
                out.append(next_token)
                if eos_id is not None:
                    done |= next_token == eos_id
                    if done.all():
                        break
                if step == max_new_tokens - 1:
                    break
                mask = (seq_ids[:, :P + step + 1] >= 0)[:, None, None, :]  # (B, 1, 1, S)
                positions = (lengths + step)[:, None]  # (B, 1)
                logits = self.head(self.trunk(next_token[:, None], positions, mask, caches)[:, -1]).float()
        finally:
            self.train(was_training)
        results = []
        for row in torch.stack(out, dim=1).tolist():  # (B, steps)
            results.append(row[:row.index(eos_id)] if eos_id in row else row)
        return results

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, max_seq_len=None):
        """Load a Meta directory (params.json + consolidated.*.pth) or a Hugging Face one
        (config.json + *.safetensors or pytorch_model*.bin). Files are memory-mapped and the model is
        built on the meta device, then takes the loaded tensors as its parameters (no second copy).
        dtype (e.g. torch.bfloat16 for 7B) defaults to the checkpoint's own."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            error, what = (NotADirectoryError, "is not a folder") if os.path.exists(path) else (FileNotFoundError,
                                                                                               "does not exist")
            raise error(f"checkpoint directory {path!r} {what}; pass the folder that holds params.json (Meta) or "
                        "config.json (Hugging Face).")
        hf = os.path.exists(os.path.join(path, "config.json"))
        # Mistral's Hugging Face folders also hold its own params.json (beside consolidated.safetensors, not .pth)
        if os.path.exists(os.path.join(path, "params.json")) and (
                not hf or glob.glob(os.path.join(path, "consolidated.*.pth"))):
            args, state = _read_meta(path, dtype, device)
        elif hf:
            args, state = _read_hf(path, dtype, device)
        else:
            raise ValueError(f"{path!r} holds neither params.json (Meta layout) nor config.json (Hugging Face layout); "
                             "point to the folder with the weights (for Meta's files in a Hugging Face download, its "
                             "original/ folder)")
        if max_seq_len is not None:
            args = replace(args, max_seq_len=max_seq_len)
        model = _meta_model(cls, args, state, path)
        model.load_state_dict(state, assign=True)
        return model


def _meta_model(cls, args, state, path):
    """cls(args) on the meta device, which state (name -> tensor) fills exactly; a ValueError naming path when a
    weight is missing, unknown or of another shape. Nothing is allocated before the state is known to fit."""
    try:
        with torch.device("meta"):
            model = cls(args)
    except RuntimeError as e:  # "Storage size calculation overflowed": sizes past any memory
        raise ValueError(f"the configuration of the checkpoint in {path!r} describes a model too large to build "
                         f"({_describe(e)}); fix it or download it again") from None
    expected = {name: t.shape for name, t in model.state_dict().items()}
    for problem, names in (("lacks weights the model needs", expected.keys() - state.keys()),
                           ("has weights this model does not know", state.keys() - expected.keys())):
        if names:
            names = sorted(names)
            listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise ValueError(f"the checkpoint in {path!r} {problem}: {listed}; check that all weight files are "
                             "present and that they belong to a LLaMA model")
    for name in expected:
        if state[name].shape != expected[name]:
            raise ValueError(f"weight {name} has shape {tuple(state[name].shape)} in the checkpoint but the model "
                             f"expects {tuple(expected[name])}; the config and the weights do not match")
    return model


# what a saved model's model_args (dataclasses.asdict of ModelArgs) may hold, as _check_fields reads it
_ARGS = {"dim": ("positive int", False), "n_layers": ("positive int", False), "n_heads": ("positive int", False),
         "vocab_size": ("positive int", False)}
_ARGS_OPTIONAL = {"n_kv_heads": ("positive int", True), "multiple_of": ("positive int", False),
                  "ffn_dim_multiplier": ("positive", True), "norm_eps": ("positive", False),
                  "rope_theta": ("positive", False), "max_seq_len": ("positive int", False),
                  "hidden_dim": ("positive int", True), "qkv_bias": ("bool", False), "tie_embeddings": ("bool", False),
                  "sliding_window": ("positive int", True), "head_dim": ("positive int", True),
                  "qk_norm": ("bool", False)}  # rope_scaling: null or _LLAMA3_ROPE's four numbers


def saved_model(model_args, state, path):
    """(ModelArgs, state) of a model saved as {"model_args": asdict(args), "model": name -> tensor} (train.py's
    model.pt), checked as from_pretrained checks a checkpoint folder, before any memory is allocated: a ValueError
    naming path for a field of the wrong kind, or a weight missing, unknown, of another shape, not floating point or
    holding NaN or inf (a model built from it would train on whatever memory to_empty left)."""
    if not isinstance(model_args, dict) or not isinstance(state, dict) or \
            not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{path} holds no model_args dict beside a dict of named tensors, so it is not a model.pt "
                         "written by train.py; give one, or a Meta or Hugging Face folder")
    where = f"the model_args of {path}"
    unknown = model_args.keys() - {f.name for f in fields(ModelArgs)}
    if unknown:
        raise ValueError(f"{where} has fields this model does not know: {sorted(unknown)[:5]}; give a model.pt "
                         "written by train.py")
    _check_fields(model_args, where, _ARGS, _ARGS_OPTIONAL)
    scaling = model_args.get("rope_scaling")
    if scaling is not None and (not isinstance(scaling, (list, tuple)) or len(scaling) != len(_LLAMA3_ROPE)):
        raise ValueError(f"{where} has rope_scaling={scaling!r} where null or {len(_LLAMA3_ROPE)} numbers belong; "
                         "give a model.pt written by train.py")
    _check_fields(dict(zip(_LLAMA3_ROPE, scaling or ())), where, _LLAMA3_ROPE if scaling else {}, {})
    if scaling and scaling[1] >= scaling[2]:  # the rotation's smoothing would divide by zero or less
        raise ValueError(f"{where} has low_freq_factor={scaling[1]} not below high_freq_factor={scaling[2]} in its "
                         "rope_scaling; give a model.pt written by train.py")
    args = ModelArgs(**model_args)
    _check_layer_count(args.n_layers, state, where, "n_layers", path)
    for name, t in state.items():
        _checked(name, t, path)
    _meta_model(Transformer, args, state, path)
    return args, state


def sample(logits, temperature, top_p, generator=None):
    """logits (B, V) -> next tokens (B,). Top-p keeps the smallest set of most likely tokens whose
    probabilities add up to at least top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    # the best logit moved to 0 first, and the temperature kept a normal float: a tiny one (1e-40) then sends the
    # others to -inf, greedy's limit, where logits / temperature would overflow to inf and softmax give NaN
    scaled = (logits - logits.amax(-1, keepdim=True)) / max(temperature, torch.finfo(logits.dtype).tiny)
    probs = torch.softmax(scaled, dim=-1)  # (B, V)
    probs, order = probs.sort(dim=-1, descending=True)
    if top_p < 1:  # drop a token when the mass above it is already >= top_p (1: keep all, whatever the rounding)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1); multinomial renormalises
    return order.gather(-1, choice).squeeze(-1)


# ----------------------------------------------------------------------------------------------------
# checkpoint reading

# The readers convert each tensor to dtype/device as soon as it is read, so at most one tensor exists
# twice at any time (memory-mapped files are paged in from disk, not copied).

def _check_regular(file):
    """A ValueError naming file when it is there but is not a regular file: opening a named pipe waits for a writer
    forever, and a device such as /dev/zero never ends."""
    if os.path.exists(file) and not os.path.isfile(file):
        what = "a folder" if os.path.isdir(file) else "a named pipe or a device"
        raise ValueError(f"{file} is {what}, not a file; put the checkpoint's own {os.path.basename(file)} there")


def _read_json(file):
    """The JSON object in a checkpoint's configuration file; a ValueError naming the file if it is not one."""
    again = "download it again from the checkpoint's source"
    _check_regular(file)
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON (line {e.lineno}: {e.msg}); {again}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text; {again}") from None
    except RecursionError:
        raise ValueError(f"{file} is nested too deeply to read; {again}") from None
    except ValueError:  # json's own, not a JSONDecodeError
        raise ValueError(f"{file} holds a number too long to read; {again}") from None
    except PermissionError as e:
        raise ValueError(f"{file} cannot be read ({e.strerror}); check that it is a file you may read") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} holds a JSON {type(value).__name__}, not an object; {again}")
    return value


# what the readers take from a configuration file: key -> (kind, may be null). "positive int" and
# "positive" (a number) must be > 0; "int" is any integer (Meta's vocab_size is -1); "bool" is true or false.
# The Meta tables list every key params.json may have: others are refused, not passed to ModelArgs unchecked.
_META_PARAMS = {"dim": ("positive int", False), "n_layers": ("positive int", False),
                "n_heads": ("positive int", False)}
_META_OPTIONAL = {"n_kv_heads": ("positive int", True), "vocab_size": ("int", False),
                  "multiple_of": ("positive int", False), "ffn_dim_multiplier": ("positive", True),
                  "norm_eps": ("positive", False), "rope_theta": ("positive", False),
                  "max_seq_len": ("positive int", False), "hidden_dim": ("positive int", True),
                  "use_scaled_rope": ("bool", False)}
# what transformers' Mistral, Qwen2 and Qwen3 configs assume for a key config.json leaves out, where LlamaConfig differs
_HF_TYPE_DEFAULTS = {"mistral": {"num_key_value_heads": 8, "max_position_embeddings": 131072, "sliding_window": 4096},
                     "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768},
                     "qwen3": {"num_key_value_heads": 32, "max_position_embeddings": 32768, "head_dim": 128}}
_HF_CONFIG = {"hidden_size": ("positive int", False), "num_hidden_layers": ("positive int", False),
              "num_attention_heads": ("positive int", False), "vocab_size": ("positive int", False),
              "intermediate_size": ("positive int", False)}
_LLAMA3_ROPE = {"factor": ("positive", False), "low_freq_factor": ("positive", False),
                "high_freq_factor": ("positive", False), "original_max_position_embeddings": ("positive int", False)}
_HF_OPTIONAL = {"num_key_value_heads": ("positive int", True), "rms_norm_eps": ("positive", True),
                "rope_theta": ("positive", True), "max_position_embeddings": ("positive int", True),
                "head_dim": ("positive int", True), "tie_word_embeddings": ("bool", True)}


def _check_fields(config, file, required, optional):
    """A ValueError naming the file and the key when a needed key is absent or a value is not of the right kind."""
    for key, (kind, nullable) in {**required, **optional}.items():
        if key not in config:
            if key in required:
                raise ValueError(f"{file} has no {key!r}, which the model needs; download the complete file again "
                                 "from the checkpoint's source")
            continue
        value = config[key]
        if value is None and nullable:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if (not isinstance(value, bool) if kind == "bool" else not number
                or (kind.endswith("int") and not isinstance(value, int))
                or (kind.startswith("positive") and not 0 < value < math.inf)):  # JSON's Infinity, 1e999 too
            want = {"positive int": "a positive integer", "int": "an integer", "positive": "a positive number",
                    "bool": "true or false"}[kind]
            raise ValueError(f"{file} has {key}={value!r} where {want} belongs; fix it or download the file again")


def _describe(error):
    """The first sentence of an exception's message, short: what a loader said about a broken file."""
    text = str(error).split("WeightsUnpickler error:")[-1].strip().split("\n")[0].split(". ")[0].rstrip(".")
    return text[:120] or type(error).__name__


def _torch_load(file):
    """The dict of tensors in a torch.save file, memory-mapped (weights_only: no file can run code); a
    ValueError naming the file when it is truncated, foreign, or holds other Python objects."""
    try:
        try:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "_use_new_zipfile_serialization" not in str(e):
                raise
            # the legacy (pre-1.6, non-zip) format cannot be memory-mapped: read it into memory
            state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (PermissionError, IsADirectoryError) as e:
        raise ValueError(f"{file} cannot be read ({e.strerror}); check that it is a weight file you may read") from None
    except Exception as e:  # zip, unpickling, EOF, and OSError(EINVAL) from mmap on a cut file
        # a class: "Unsupported global: GLOBAL x.y was not an allowed global"; os, sys: "unsupported GLOBAL x.y whose"
        found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(e), re.IGNORECASE)
        if found and isinstance(e, pickle.UnpicklingError):  # weights_only refused a class: more than tensors
            raise ValueError(f"{file} holds Python objects besides tensors ({found.group(1)}), which are not loaded "
                             "because loading them could run code; use a checkpoint of plain tensors (e.g. its "
                             ".safetensors)") from None
        raise ValueError(f"{file} is truncated or not a PyTorch checkpoint ({_describe(e)}); "
                         "download it again") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a dict of named tensors, so it is not a "
                         "LLaMA weight file; point to the checkpoint's weight files")
    return state


def _read_meta(path, dtype, device):
    params_file = os.path.join(path, "params.json")
    params = _read_json(params_file)
    _check_fields(params, params_file, _META_PARAMS, _META_OPTIONAL)
    if params.pop("use_scaled_rope", False):
        raise ValueError(f"{path!r} is a LLaMA 3.1+ checkpoint (use_scaled_rope), whose params.json does not give its "
                         "rotary scaling; load its Hugging Face folder (config.json) instead")
    unknown = params.keys() - _META_PARAMS.keys() - _META_OPTIONAL.keys()
    if unknown:
        raise ValueError(f"params.json in {path!r} has fields this model does not know: {sorted(unknown)}; only the "
                         "keys of Meta's LLaMA 2 and LLaMA 3 params.json are supported (for others load the Hugging "
                         "Face folder)")
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not files:
        raise FileNotFoundError(f"{path!r} has params.json but no consolidated.*.pth weight files; put the weights in "
                                "the same folder")
    shards = [_open_weights(f) for f in files]
    _check_layer_count(params["n_layers"], [n for s in shards for n in s], params_file, "n_layers", path)
    state = {}
    for name in dict.fromkeys(n for s in shards for n in s):  # every shard's names: one only the last has too
        if name == "rope.freqs":  # precomputed rotary frequencies in old checkpoints; we compute them
            continue
        parts = [s.get(name) for s in shards]
        if len(parts) > 1 and (any(p is None or p.shape != parts[0].shape for p in parts) or parts[0].dim() == 0):
            shapes = ", ".join(f"{os.path.basename(f)} {'none' if p is None else tuple(p.shape)}"
                               for f, p in zip(files, parts))
            raise ValueError(f"weight {name} is not split into equal slices of at least one dimension across the "
                             f"shards in {path!r} ({shapes}); download the consolidated.*.pth files again")
        parts = [_checked(name, p, f) for f, p in zip(files, parts)]
        if len(parts) == 1 or parts[0].dim() == 1:  # a single shard, or a norm (replicated on every shard)
            t = parts[0]
        else:
            t = torch.cat(parts, dim=_meta_split_dim(name, parts[0], params["dim"]))
        state[name] = t.to(device=device, dtype=dtype)
    if params.get("vocab_size", -1) <= 0:  # -1 in Meta's files: the embedding's row count says it
        if "tok_embeddings.weight" not in state:
            raise ValueError(f"the checkpoint in {path!r} lacks weights the model needs: tok_embeddings.weight; check "
                             "that all weight files are present")
        params["vocab_size"] = state["tok_embeddings.weight"].shape[0]
    # params.json does not give the context length: LLaMA 3 (rope_theta 500000) was trained on 8192
    # tokens, LLaMA 2 on 4096; from_pretrained(max_seq_len=...) overrides this
    params.setdefault("max_seq_len", 8192 if params.get("rope_theta", 1e4) >= 5e5 else 4096)
    return ModelArgs(**params), state


def _meta_split_dim(name, part, dim):
    # Meta's model-parallel shards (fairscale): column-parallel layers (wq, wk, wv, w1, w3, output)
    # split their output rows, row-parallel ones (wo, w2) their input columns. The embedding is
    # split along the embedding dim in LLaMA 2 and along the vocabulary in LLaMA 3.
    if name.endswith(("wo.weight", "w2.weight")):
        return 1
    if name == "tok_embeddings.weight":
        return 0 if part.shape[1] == dim else 1
    return 0


_HF_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
_HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm",  # Qwen3
}


def _hf_to_meta_name(name):
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m and m.group(2) in _HF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    if name.endswith(".weight") and name[:-len(".weight")] in _HF_NAMES:
        return _HF_NAMES[name[:-len(".weight")]] + ".weight"
    return name  # unknown: reported as unexpected


def _read_hf(path, dtype, device):
    config_file = os.path.join(path, "config.json")
    config = _read_json(config_file)
    unsupported = {"model_type": ("llama", "mistral", "qwen2", "qwen3", None), "hidden_act": ("silu", None),
                   "attention_bias": (False, None), "mlp_bias": (False, None), "use_sliding_window": (False, None)}
    for key, allowed in unsupported.items():
        if config.get(key) not in allowed:
            raise ValueError(f"config.json in {path!r} has {key}={config[key]!r}, which this model does not implement; "
                             "LLaMA 2/3/3.1/3.2, Qwen2/Qwen2.5/Qwen3 and Mistral checkpoints are supported")
    # keys a config leaves out take transformers' defaults for its model type (LLaMA's: in the code below)
    config = {**_HF_TYPE_DEFAULTS.get(config.get("model_type"), {}), **config}
    qwen2 = config.get("model_type") == "qwen2"  # q, k, v with biases
    qwen3 = config.get("model_type") == "qwen3"  # q and k normalised per head
    window = None if qwen2 or qwen3 else config.get("sliding_window")  # Qwen's: off (use_sliding_window, above)
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise ValueError(f"{config_file} has sliding_window={window!r} where a positive integer or null belongs; "
                         "fix it or download the file again")
    # transformers 5 writes rope_parameters (rope_theta inside); older versions rope_theta and rope_scaling. Read
    # as transformers 5 reads them: a rope_scaling replaces rope_parameters whole, and a rope_theta inside the one
    # read overrides the top-level rope_theta
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{config_file} has rotary settings {rope!r} where an object belongs; fix it or download "
                         "the file again")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        read = (" (its rope_scaling, which transformers reads instead of its rope_parameters)"
                if config.get("rope_scaling") and config.get("rope_parameters") else "")
        raise ValueError(f"config.json in {path!r} asks for rotary scaling {rope!r}{read}, which this model does not "
                         "implement (only LLaMA 3.1's \"llama3\"); use a checkpoint without it")
    _check_fields(config, config_file, _HF_CONFIG, _HF_OPTIONAL)
    _check_fields(rope, config_file, _LLAMA3_ROPE if kind == "llama3" else {}, {"rope_theta": ("positive", True)})
    scaling = tuple(rope[k] for k in _LLAMA3_ROPE) if kind == "llama3" else None
    if scaling and scaling[1] >= scaling[2]:
        raise ValueError(f"{config_file} has low_freq_factor={scaling[1]} not below high_freq_factor={scaling[2]} in "
                         "its rotary scaling; fix it or download the file again")
    n_heads = config["num_attention_heads"]
    # LlamaConfig's defaults where a key is absent (rms_norm_eps 1e-6, max_position_embeddings 2048)
    args = ModelArgs(dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
                     hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps") or 1e-6,
                     rope_theta=rope.get("rope_theta") or config.get("rope_theta") or 10000.0,
                     max_seq_len=config.get("max_position_embeddings") or 2048, qkv_bias=qwen2,
                     tie_embeddings=bool(config.get("tie_word_embeddings")), sliding_window=window,
                     rope_scaling=scaling, head_dim=config.get("head_dim"), qk_norm=qwen3)
    shards = {file: _open_weights(os.path.join(path, file)) for file in _hf_weight_files(path)}
    _check_layer_count(args.n_layers, [n for s in shards.values() for n in s], config_file, "num_hidden_layers", path)
    state, source, unknown = {}, {}, {}  # source: the file each weight came from
    for file, tensors in shards.items():
        for hf_name, t in tensors.items():
            if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer that older conversions saved
                continue
            name = _hf_to_meta_name(hf_name)
            if name == hf_name:  # not a Hugging Face name, even where it is one of Meta's (Mistral's consolidated.*)
                unknown[hf_name] = file
                continue
            if hf_name in source:  # no rule says which copy is meant (reading in order would take the last)
                raise ValueError(f"weight {hf_name} is in both {source[hf_name]} and {file} in {path!r}; remove the "
                                 "file that does not belong to this checkpoint or download the checkpoint again")
            source[hf_name] = file
            t = _checked(hf_name, t, os.path.join(path, file))
            if name.endswith(("attention.wq.weight", "attention.wk.weight", "attention.wq.bias", "attention.wk.bias")):
                heads = args.n_heads if ".wq." in name else args.n_kv_heads
                rows = t if t.dim() == 2 else t[:, None]  # a bias permutes like a one-column weight
                if rows.shape == (heads * args.head_dim, args.dim if t.dim() == 2 else 1):  # else: a shape mismatch
                    t = hf_to_meta_qk(rows, heads).reshape(t.shape)
            if name.endswith(("q_norm.weight", "k_norm.weight")) and t.shape == (args.head_dim,):
                t = hf_to_meta_qk(t[:, None], 1).reshape(t.shape)  # a head's components, moved as its rows are
            state[name] = t.to(device=device, dtype=dtype)
    if unknown:  # Meta-layout names would otherwise be taken as they stand, their q/k rows permuted as HF's
        names = sorted(unknown)
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ValueError(f"the checkpoint in {path!r} has weights this model does not know: {listed} (in "
                         f"{', '.join(sorted(set(unknown.values())))}); keep only the Hugging Face weight files of a "
                         "LLaMA, Qwen or Mistral model in that folder")
    if args.tie_embeddings:
        state.pop("output.weight", None)  # tied: the embedding serves both (some files store the copy)
    return args, state


def _hf_weight_files(path):
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index)
        if os.path.exists(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError(f"{index} has no \"weight_map\" of weight names to file names; download it again "
                                 "from the checkpoint's source")
            outside = next(((n, f) for n, f in weight_map.items() if os.path.basename(f) != f), None)
            if outside:  # "../x", "/x" or "sub/x" would be read from outside the checkpoint folder
                raise ValueError(f"{index} maps {outside[0]} to {outside[1]!r}, which is not a plain file name in its "
                                 "folder; download the index again from the checkpoint's source")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise FileNotFoundError(f"{index} names weight files that are not in {path!r}: {', '.join(missing)}; "
                                        "download them into the same folder")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, single)):
            return [single]
    # transformers names its files model*.safetensors; Mistral's folders add consolidated.safetensors (Meta's names)
    files = (sorted(glob.glob(os.path.join(path, "model*.safetensors")))
             or sorted(glob.glob(os.path.join(path, "*.safetensors")))
             or sorted(glob.glob(os.path.join(path, "pytorch_model*.bin"))))
    if not files:
        raise FileNotFoundError(f"{path!r} has config.json but no *.safetensors or pytorch_model*.bin weight files; "
                                "put the weights in the same folder")
    return [os.path.basename(f) for f in files]


def _check_layer_count(n_layers, names, config_file, key, path):
    """A ValueError when the configuration declares another number of layers than the weights' names hold: checked
    before the model is built, as an absurd count (100000) would build modules until memory runs out."""
    held = 1 + max((int(m.group(1)) for n in names if (m := re.match(r"(?:model\.)?layers\.(\d+)\.", n))), default=-1)
    if held != n_layers:
        span = f"{held} (layers.0 .. layers.{held - 1})" if held else "none"
        raise ValueError(f"{config_file} says {n_layers} layers but the weights in {path!r} hold {span}; fix {key}"
                         + (" or download the missing weight files" if held < n_layers else ""))


def _open_weights(file):
    """name -> tensor of one weight file, memory-mapped where the format allows: its names, with no data read yet."""
    _check_regular(file)
    return _read_safetensors(file) if file.endswith(".safetensors") else _torch_load(file)


def _checked(name, t, file):
    """t; a ValueError naming the file and the tensor when it is not floating point (a quantised checkpoint) or
    holds NaN or inf (a damaged one)."""
    if not t.is_floating_point():
        raise ValueError(f"weight {name} in {file} holds {t.dtype} values, which this model does not take "
                         "(quantised checkpoints are not supported); use the checkpoint's floating-point weights")
    if not torch.isfinite(t.sum(dtype=torch.float32)):  # one pass, no copy: a NaN or inf makes the sum one
        raise ValueError(f"weight {name} in {file} holds NaN or inf values, so the download is damaged; download "
                         "it again")
    return t


def _read_safetensors(file):
    """name -> tensor of a safetensors file, memory-mapped."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError(f"reading {file} needs the safetensors package: pip install safetensors (or load Meta's "
                          "consolidated.*.pth files, e.g. the original/ folder of a Hugging Face "
                          "download)") from None
    if not os.path.isfile(file):  # safetensors reports a missing file without its name
        raise FileNotFoundError(f"weight file {file} does not exist; download it into the checkpoint folder")
    try:
        with safe_open(file, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # SafetensorError: a cut or foreign file
        raise ValueError(f"{file} is truncated or not a safetensors file ({_describe(e)}); "
                         "download it again") from None
