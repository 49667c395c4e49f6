"""
LLaMA 2, 3, 3.1 and 3.2, Qwen2 / Qwen2.5 / Qwen3 and Mistral in one file: the base model that TeamLoRA adapts.

Module names follow Meta's reference code (tok_embeddings, layers.N.attention.wq, ...), so Meta's consolidated.*.pth
checkpoints load with no renaming; Hugging Face checkpoints are renamed and their q/k rows un-permuted on the way in
(weights.py reads both). Every projection is a plain nn.Linear (bias-free but for Qwen2's q, k and v), only ever
called, so an adapter library can swap it for a subclass by name; a tied output is the embedding's matrix, no Linear.

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
import math
import os
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import weights


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
        weights.check_args(vars(self))  # each field's kind, as in a file: not a ZeroDivisionError, a model of 0 layers
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


def packed_attention(seq_ids):
    """seq_ids (B, T) -> mask (B, 1, T, T) bool, positions (B, T).
    A token sees itself and the earlier tokens with its seq_id, and its position is how many of those earlier ones are,
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


class keep_last_omega:
    """Activation checkpointing's context for the recompute in backward (`checkpoint(..., use_reentrant=False,
    context_fn=lambda: (contextlib.nullcontext(), keep_last_omega(block)))`; a whole model works too): the
    adapters in `module` keep the `last_omega` of the first forward. The recompute's omega would otherwise stay on
    the adapter until the next forward, and with it the recomputed block's whole autograd graph: every block's
    activations at once (42 GiB against LoRA's 17.6 at LLaMA-2-7B's shape, micro-batch 4 x 1024). A class, not a
    generator: torch enters the same context at each backward through a graph kept with retain_graph=True."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.kept = [(m, m.last_omega) for m in self.module.modules() if hasattr(m, "last_omega")]

    def __exit__(self, *exc):
        for m, omega in self.kept:
            m.last_omega = omega


class Transformer(nn.Module):
    def __init__(self, args, gradient_checkpointing=False):
        super().__init__()
        if not isinstance(args, ModelArgs):  # Transformer("tiny"): not an AttributeError on "str" deep inside
            raise ValueError(f"Transformer takes a ModelArgs, got {type(args).__name__} {args!r:.40}; build one with "
                             "ModelArgs(...) or ModelArgs.from_name(...)")
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
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):  # floats: embedding's deep RuntimeError
            raise ValueError(f"tokens must be a (batch, time) tensor of integer token ids, got {tuple(tokens.shape)} "
                             f"{tokens.dtype}; add a batch dimension with tokens[None], convert with .long()")
        B, T = tokens.shape
        vocab = self.args.vocab_size  # checked on the CPU only: on a GPU, reading min and max waits for the device
        if tokens.device.type == "cpu" and tokens.numel() and not (tokens.min() >= 0 and tokens.max() < vocab):
            raise ValueError(f"tokens hold ids outside [0, {vocab}), which the embedding cannot look up; encode the "
                             "text with this model's tokenizer")  # on a GPU: the embedding's device-side assert
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.args.max_seq_len}; cut the sequences or "
                             "raise max_seq_len")
        for name, t in (("targets", targets), ("seq_ids", seq_ids)):
            if t is not None and t.shape != tokens.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but tokens have {tuple(tokens.shape)}; give one "
                                 f"{name[:-1]} per token")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r} is not supported; use 'mean' or 'sum'")
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0 or logits_to_keep and targets is not None:
            raise ValueError(f"logits_to_keep={logits_to_keep!r} must be a count >= 0, and a loss needs the logits of "
                             "every position: leave logits_to_keep=0 when giving targets")  # -n: all but the first n
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
        if not isinstance(prompts, (list, tuple)) or not prompts or \
                any(not hasattr(p, "__len__") or not len(p) for p in prompts):  # a tensor, a flat list of ids
            raise ValueError("generate needs a non-empty list of non-empty prompts, each a list of token ids (a "
                             "tensor's .tolist()); give each prompt at least one token (e.g. BOS)")
        if not hasattr(max_new_tokens, "__index__") or max_new_tokens < 0 or not hasattr(eos_id or 0, "__index__"):
            raise ValueError(f"max_new_tokens={max_new_tokens!r}, eos_id={eos_id!r}: give a whole number >= 0 of new "
                             "tokens and one token id (or None) to stop at")  # a list of ids never matched: no stop
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # not "0.5", not True
        if not (number(temperature) and number(top_p) and 0 <= temperature < math.inf and 0 < top_p <= 1):  # not NaN
            raise ValueError(f"temperature={temperature!r}, top_p={top_p!r} are out of range; use numbers with "
                             "temperature >= 0 and 0 < top_p <= 1")
        if any(not hasattr(t, "__index__") or not 0 <= t < self.args.vocab_size for p in prompts for t in p):
            raise ValueError(f"a prompt holds a token id outside [0, {self.args.vocab_size}) or not a whole number; "
                             "encode the prompts with this model's tokenizer")  # 1.7 would have become token 1
        B, P = len(prompts), max(len(p) for p in prompts)
        total = P + max_new_tokens
        if total > self.args.max_seq_len:
            raise ValueError(f"the longest prompt ({P} tokens) plus max_new_tokens={max_new_tokens} exceeds "
                             f"max_seq_len={self.args.max_seq_len}; shorten the prompts or lower max_new_tokens")
        if max_new_tokens == 0:
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
        (config.json + *.safetensors or pytorch_model*.bin; weights.py reads the files). Files are memory-mapped and
        the model is built on the meta device, then takes the loaded tensors as its parameters (no second copy).
        dtype (e.g. torch.bfloat16 for 7B) defaults to the checkpoint's own (float32 where its weights mix dtypes)."""
        path = os.fspath(path)
        config, state = weights.read(path, dtype, device)
        model = _meta_model(cls, config, state, path, max_seq_len)
        model.load_state_dict(state, assign=True)
        return model if len({t.dtype for t in state.values()}) == 1 else model.float()  # a matmul takes one dtype


def _meta_model(cls, config, state, path, max_seq_len=None):
    """cls(ModelArgs(**config)) on the meta device, which state (name -> tensor) fills exactly; a ValueError naming path
    when the fields do not fit together, a weight is missing, unknown or misshapen, or rotary angles pass float32.
    Nothing is allocated before all fits."""
    try:  # fields each of the right kind (weights.py checked them) that do not fit together: say which file or folder
        args = ModelArgs(**config)
    except ValueError as e:
        raise ValueError(f"the configuration in {path!r} does not fit together: {e}") from None
    args = args if max_seq_len is None else replace(args, max_seq_len=max_seq_len)
    try:
        with torch.device("meta"):
            model = cls(args)
    except (RuntimeError, TypeError) as e:  # "Storage size calculation overflowed"; TypeError: a size past int64
        raise ValueError(f"the configuration of the checkpoint in {path!r} describes a model too large to build "
                         f"({weights.describe(e)}); fix it or download it again") from None
    expected = {name: t.shape for name, t in model.state_dict().items()}
    for problem, names in (("lacks weights the model needs", expected.keys() - state.keys()),
                           ("has weights this model does not know", state.keys() - expected.keys())):
        if names:
            names = sorted(names)
            listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise ValueError(f"the checkpoint in {path!r} {problem}: {listed}; check that all weight files are "
                             "present and that they belong to a LLaMA, Qwen or Mistral model")
    for name in expected:
        if state[name].shape != expected[name]:
            raise ValueError(f"weight {name} has shape {tuple(state[name].shape)} in the checkpoint but the model "
                             f"expects {tuple(expected[name])}; the configuration in {path!r} does not fit its weights")
    ends = torch.tensor([[0, args.context - 1]], device="cpu")  # head_dim fits the weights: no huge arange
    if not rope_cos_sin(ends, args.head_dim, args.rope_theta, args.rope_scaling)[0].isfinite().all():
        raise ValueError(f"the configuration in {path!r} has rope_theta={args.rope_theta} and rope_scaling="
                         f"{args.rope_scaling}, whose rotation angles pass float32 (a NaN loss at once); fix them")
    return model


def saved_model(model_args, state, path):
    """(ModelArgs, state) of a model saved as {"model_args": asdict(args), "model": name -> tensor} (train.py's
    model.pt), checked as from_pretrained checks a checkpoint folder, before any memory is allocated: a ValueError
    naming path for a field of the wrong kind or a weight not floating point or holding NaN or inf (check_saved), for
    fields that do not fit together, or a weight missing (a model built without it would train on whatever memory
    to_empty left), unknown or misshapen."""
    weights.check_saved(model_args, state, path, {f.name for f in fields(ModelArgs)})
    return _meta_model(Transformer, model_args, state, path).args, state


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
