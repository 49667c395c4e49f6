"""memory.py: the dry run's arithmetic, term by term at LLaMA-2-7B's shapes, its KV cache against what generate
allocates, its activations against what a block saves for backward, and its total against a measured training step."""
import contextlib
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import bench
import evaluation
import memory
import model
import train
from conftest import needs_distributed_torch

MEMORY_CFG = dict(dtype="bfloat16", fsdp=True, max_len=1024, r=128, experts=4, activation_checkpointing=True,
                  batch_size=128, grad_accum=4, eval_batch_size=64, adapter="teamlora", targets="w1,w2,w3")


def _estimate(n_layers=32, world=8, micro=4, **cfg):
    """memory.estimate at LLaMA-2-7B's shapes, 6.7e9 base and 1e8 trainable parameters."""
    args = SimpleNamespace(dim=4096, ffn_hidden_dim=11008, n_layers=n_layers, vocab_size=32000, n_kv_heads=32,
                           head_dim=128, tie_embeddings=False)
    return memory.estimate(args, 6_700_000_000 * n_layers // 32, 100_000_000, {**MEMORY_CFG, **cfg}, world, micro)


def test_memory_estimate_shards_weights_and_adapter_state_under_fsdp_only():
    n_base, n_train = 6_700_000_000, 100_000_000
    one, eight = _estimate(world=1), _estimate(world=8)
    assert one["weights"] - eight["weights"] == pytest.approx(n_base * 2 * (1 - 1 / 8))
    # the adapter trains in float32: weights, gradients and AdamW's two moments, 4 bytes each, sharded too
    assert one["adapter"] == pytest.approx(n_train * (4 + 4 + 4 + 4))
    assert eight["adapter"] == pytest.approx(one["adapter"] / 8)
    assert (one["activations"], one["logits"]) == (eight["activations"], eight["logits"])  # per micro-batch
    for world in (1, 8):  # DDP: every GPU holds all of it, and from 2 processes on its buckets (4 bytes more)
        ddp = _estimate(world=world, fsdp=False)
        assert ddp["weights"] == pytest.approx(n_base * 2) and ddp["adapter"] == pytest.approx(
            n_train * (16 if world == 1 else 20))
        assert _estimate(world=world, fsdp=False, dtype="float32")["weights"] == pytest.approx(n_base * 4)
    for est in (one, eight, _estimate(fsdp=False, activation_checkpointing=False)):
        assert est["total"] == pytest.approx(est["weights"] + est["adapter"] + est["activations"] + est["logits"])


@pytest.mark.parametrize("name", ["llama3-8b", "llama3.2-1b"])  # untied and tied, a 128k vocabulary
def test_fsdp_weights_are_a_shard_of_everything_plus_the_gathered_root_and_two_blocks(name):
    """Under FSDP2 each GPU holds its 1/world shard of every weight, the root's parameters gathered whole (token
    embedding, output layer, last norm: FSDP2 keeps the root gathered from its forward to the end of backward, as
    test_fsdp2_keeps_the_root_gathered_through_forward_and_backward_and_one_block_at_a_time checks) and about two
    gathered blocks (one in use, one prefetched), each counted here from the model itself, tied embeddings too."""
    args = model.ModelArgs.from_name(name)
    with torch.device("meta"):
        net = model.Transformer(args)
    root = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("layers."))
    block = sum(p.numel() for p in net.layers[0].parameters())
    assert net.num_params() == root + args.n_layers * block
    for world in (1, 8):
        est = memory.estimate(args, net.num_params(), 10**8, MEMORY_CFG, world, 4)
        assert est["weights"] == pytest.approx(net.num_params() * 2 / world + (root + 2 * block) * 2)


@needs_distributed_torch
def test_fsdp2_keeps_the_root_gathered_through_forward_and_backward_and_one_block_at_a_time(tmp_path):
    """The premise of the FSDP weights term, on train.py's wrapping (fully_shard per block, then the root) with
    activation checkpointing: whenever a block runs, forward or backward, the parameters held gathered are the root's
    (embedding, output layer, last norm; the embedding alone when tied) and that block's."""
    script = tmp_path / "gathered.py"
    script.write_text(textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor
        from model import ModelArgs, Transformer
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        for tie in (False, True):
            net = Transformer(ModelArgs.from_name("tiny", n_layers=3, tie_embeddings=tie))
            net.gradient_checkpointing = True
            for block in net.layers:
                fully_shard(block)
            fully_shard(net)
            seen = []
            def gathered(*_, i):
                seen.append((i, sorted({{".".join(n.split(".")[:2 if n.startswith("layers.") else 1])
                                         for n, p in net.named_parameters() if not isinstance(p, DTensor)}})))
            for i, block in enumerate(net.layers):
                block.feed_forward.w2.register_forward_hook(lambda *a, i=i: gathered(i=i))
                block.feed_forward.w2.register_full_backward_hook(lambda *a, i=i: gathered(i=i))
            tokens = torch.randint(0, 512, (2, 8))
            net(tokens, tokens)[1].backward()
            root = ["norm", "tok_embeddings"] + ([] if tie else ["output"])
            assert [i for i, _ in seen] == [0, 1, 2, 2, 1, 0], seen  # forward, then backward
            assert all(names == sorted(root + [f"layers.{{i}}"]) for i, names in seen), seen
        dist.destroy_process_group()
        print("root gathered")
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.abspath(memory.__file__)),
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(memory.__file__))})
    assert out.returncode == 0 and "root gathered" in out.stdout, out.stderr[-2000:]


def test_memory_estimate_activations_grow_with_tokens_and_layers_and_checkpointing_keeps_block_inputs():
    for ckpt in (False, True):
        one, two = _estimate(micro=1, activation_checkpointing=ckpt), _estimate(micro=2, activation_checkpointing=ckpt)
        assert two["activations"] == pytest.approx(2 * one["activations"])
        assert one["logits"] == pytest.approx(1024 * 32000 * 4 * 3) and two["logits"] == pytest.approx(
            2 * one["logits"])  # float32: the log-softmax output, its gradient and the logits' gradient
        assert _estimate(r=256, activation_checkpointing=ckpt)["activations"] > _estimate(
            activation_checkpointing=ckpt)["activations"]  # rank-sized adapter terms
    full = {n: _estimate(n_layers=n, micro=1, activation_checkpointing=False)["activations"] for n in (16, 32)}
    assert full[32] == pytest.approx(2 * full[16])  # without checkpointing every block keeps all it saved
    # with it: each block's bf16 input (dim per token), and one block's full set while it is recomputed
    ckpt = _estimate(micro=1)["activations"]
    assert ckpt == pytest.approx(1024 * 32 * 4096 * 2 + full[32] / 32)
    assert ckpt < full[32] / 4


def test_scoring_estimate_counts_the_kv_cache_generate_allocates(monkeypatch):
    """The dry run's scoring figure: its KV cache is what generate preallocates for eval_batch_size sequences of
    max_len tokens (grouped key/value heads included), counted here on a tiny model with 2 key/value heads for 4
    query heads; at LLaMA-2-7B's shapes it is most of what scoring needs, far above a training step's figure."""
    allocated = []
    real_init = model.KVCache.__init__

    def record(self, *a, **kw):
        real_init(self, *a, **kw)
        allocated.append(self.k.nbytes + self.v.nbytes)
    monkeypatch.setattr(model.KVCache, "__init__", record)
    args = model.ModelArgs.from_name("tiny")
    net = model.Transformer(args).to(torch.bfloat16)
    batch, prompt, new = 3, 20, 12
    net.generate([[1] * prompt] * batch, new)
    cfg = {**MEMORY_CFG, "eval_batch_size": batch, "max_len": prompt + new}
    est = memory.estimate(args, net.num_params(), 1000, cfg, 1, 1)
    assert len(allocated) == args.n_layers and est["kv_cache"] == sum(allocated)
    assert args.n_kv_heads < args.n_heads  # else grouped heads would go unchecked
    big = _estimate()
    assert big["kv_cache"] == 64 * 1024 * 32 * 2 * 4096 * 2 and big["scoring"] > big["kv_cache"] > 5 * big["total"]


@pytest.mark.parametrize("eval_only", [False, True])
@pytest.mark.parametrize("fsdp, world", [(False, 1), (True, 8)])
def test_scoring_holds_the_adapters_float32_weights_and_adam_moments_not_their_gradients(fsdp, world, eval_only):
    """Scoring runs generate on the trained adapter: it holds the adapter's float32 weights (4 bytes a parameter,
    a 1/world shard under FSDP) and, at the end of a run, AdamW's two moments (8 more; the optimizer lives as long
    as the run), not the gradients a training step adds (set to None after each step); a re-scoring (eval_only) has
    no optimizer."""
    args = SimpleNamespace(dim=4096, ffn_hidden_dim=11008, n_layers=32, vocab_size=32000, n_kv_heads=32, head_dim=128,
                           tie_embeddings=False)
    more, cfg = 50_000_000, {**MEMORY_CFG, "fsdp": fsdp, "eval_only": eval_only}
    a, b = (memory.estimate(args, 6_700_000_000, n_train, cfg, world, 4) for n_train in (10**8, 10**8 + more))
    assert b["adapter"] - a["adapter"] == pytest.approx(more * 16 / world)
    assert b["scoring"] - a["scoring"] == pytest.approx(more * (4 if eval_only else 12) / world)


def test_activations_count_the_tensors_each_block_keeps_per_token_as_listed():
    """Without checkpointing, what one token keeps per layer with FFN adapters grows by the listed tensors: per unit
    of dim, the two norms' float32 inputs, q, k, v and the attention output in the activation dtype, and the float32
    input of w1 and of w3 (a copy each over a bfloat16 base, one shared over a float32 one); per unit of the FFN's
    hidden width, w1 x, its SiLU and w3 x in the activation dtype and w2's float32 input; and by the adapter's rank-
    and expert-sized terms, so more experts (the router's per-token outputs) keep more too."""
    args = dict(dim=4096, ffn_hidden_dim=11008, n_layers=32, vocab_size=32000, n_kv_heads=32, head_dim=128,
                tie_embeddings=False)
    cfg = {**MEMORY_CFG, "fsdp": False, "activation_checkpointing": False}
    micro, tokens = 2, 2 * cfg["max_len"]

    def acts(changes=(), **cfg_changes):
        shapes = SimpleNamespace(**{**args, **dict(changes)})
        return memory.estimate(shapes, 6_700_000_000, 10**8, {**cfg, **cfg_changes}, 1, micro)["activations"]
    for wbytes, dtype, adapter_inputs in ((2, "bfloat16", 2 * 4), (4, "float32", 4)):
        base = acts(dtype=dtype)
        per_token_layer = tokens * args["n_layers"]
        assert acts({"dim": args["dim"] + 1}, dtype=dtype) - base == pytest.approx(
            per_token_layer * (2 * 4 + 4 * wbytes + adapter_inputs))
        assert acts({"ffn_hidden_dim": args["ffn_hidden_dim"] + 1}, dtype=dtype) - base == pytest.approx(
            per_token_layer * (3 * wbytes + 4))
    more_experts = acts(experts=MEMORY_CFG["experts"] + 4) - acts()
    assert more_experts > 0 and more_experts == pytest.approx(acts(r=MEMORY_CFG["r"] + 4) - acts())
    # one rank more: two float32 values (z and the omega-weighted z) per token in each of the three adapted FFN layers
    assert acts(r=MEMORY_CFG["r"] + 1) - acts() == pytest.approx(tokens * args["n_layers"] * 3 * 2 * 4)


def test_adapters_on_attention_share_the_input_of_wq_wk_and_wv_and_keep_wos_own():
    """wq, wk and wv read one tensor (the normed x), wo another (the attention output): over a float32 base the
    adapters keep one float32 copy of each tensor they read, over a bfloat16 base one per adapted layer."""
    args = SimpleNamespace(dim=4096, ffn_hidden_dim=11008, n_layers=32, vocab_size=32000, n_kv_heads=32, head_dim=128,
                           tie_embeddings=False)
    cfg = {**MEMORY_CFG, "fsdp": False, "activation_checkpointing": False}
    per_token_layer = 2 * cfg["max_len"] * args.n_layers
    z = 2 * 4 * (cfg["r"] + cfg["experts"])  # an adapted layer's float32 z and omega-weighted z

    def acts(targets, dtype):
        return memory.estimate(args, 6_700_000_000, 10**8, {**cfg, "targets": targets, "dtype": dtype}, 1, 2)[
            "activations"]
    for dtype, copies in (("float32", 1), ("bfloat16", 3)):
        assert acts("wq,wk,wv,wo", dtype) - acts("wq,wk,wv", dtype) == pytest.approx(per_token_layer * (
            args.dim * 4 + z))
        assert acts("wq,wk,wv", dtype) - acts("wq", dtype) == pytest.approx(per_token_layer * (
            (copies - 1) * args.dim * 4 + 2 * z))


def test_scoring_holds_the_ffns_three_hidden_tensors_and_w2s_float32_adapter_input_per_prefill_token():
    """The prefill of eval_batch_size prompts of max_len tokens holds, per token, w1's and w3's outputs and their
    product in the weights' dtype and w2's adapter input in float32: a hidden width more costs that much."""
    args = dict(dim=4096, ffn_hidden_dim=11008, n_layers=32, vocab_size=32000, n_kv_heads=32, head_dim=128,
                tie_embeddings=False)
    for wbytes, dtype in ((2, "bfloat16"), (4, "float32")):
        cfg = {**MEMORY_CFG, "dtype": dtype}
        a, b = (memory.estimate(SimpleNamespace(**{**args, "ffn_hidden_dim": h}), 6_700_000_000, 10**8, cfg, 8, 4)
                for h in (11008, 11009))
        eval_tokens = cfg["eval_batch_size"] * cfg["max_len"]
        assert b["scoring"] - a["scoring"] == pytest.approx(eval_tokens * (3 * wbytes + 4))


def _net(dtype, adapter, targets, n_layers, max_len, ckpt=False, vocab=64, preset="small"):
    """A model with grouped-query attention (the "small" preset: dim 256), built as train.py builds one (float32 for
    full training, adapters on targets), its base parameters, the cfg memory.estimate reads, and train_step's
    autocast."""
    cfg = {**train.DEFAULTS, "dtype": dtype, "adapter": adapter, "targets": targets, "r": 16, "experts": 4,
           "max_len": max_len, "activation_checkpointing": ckpt, "fsdp": False}
    args = model.ModelArgs.from_name(preset, n_layers=n_layers, vocab_size=vocab, max_seq_len=max_len)
    net = model.Transformer(args, gradient_checkpointing=ckpt).to(getattr(torch, dtype if adapter != "none" else
                                                                          "float32"))
    n_base = net.num_params()
    if adapter != "none":
        train.inject_targets(net, cfg)
    autocast = torch.autocast("cpu", torch.bfloat16) if adapter == "none" and dtype == "bfloat16" else \
        contextlib.nullcontext()  # train_step's, for full training in bfloat16
    return net, args, n_base, cfg, autocast


ADAPTERS = [("teamlora", "w1,w2,w3"), ("teamlora", "w1,w2,w3,wq,wk,wv,wo"), ("teamlora", "wq,wv"), ("lora", "w2"),
            ("none", "w1,w2,w3")]


def _saved_bytes(block, x, cos, sin, mask=None, autocast=contextlib.nullcontext(), only=lambda t: True, skip=()):
    """Bytes of the distinct storages that a block's forward saves for backward, of the tensors `only` picks, less
    those of `skip` (weights) and the rotary tables: each kept alive meanwhile, so no later tensor takes its address
    and drops its bytes from the count."""
    saved, shared = {}, {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr(), *skip}

    def pack(t):
        if only(t) and t.untyped_storage().data_ptr() not in shared:
            saved[t.untyped_storage().data_ptr()] = t
        return t
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin, mask)
    return sum(t.untyped_storage().nbytes() for t in saved.values())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("adapter, targets", ADAPTERS)
def test_activations_per_token_and_layer_are_what_a_block_saves_for_backward(dtype, adapter, targets):
    """The tensors one block's autograd graph saves for backward, per token (the weights and autocast's copies of
    them left out: the weights term's), against the estimate's per-layer share: adapters on the FFN, on attention
    too, on attention only, LoRA on w2, and full training, over a bfloat16 and a float32 base. With a bfloat16 base
    each adapted layer keeps its own float32 copy of its input (w1 and w3, wq, wk and wv each cast the same tensor).
    Left out of the estimate: each adapter's dropout mask (float32 on the CPU) and its router's k-wide tensors,
    about r + 5k values per adapted layer, under 6% here."""
    T = 96  # no weight has a dimension of 96: a saved tensor with one is an activation
    net, args, n_base, cfg, autocast = _net(dtype, adapter, targets, n_layers=1, max_len=T)
    cos, sin = model.rope_cos_sin(torch.arange(T)[None], args.head_dim, args.rope_theta)  # shared by every layer
    x = net.tok_embeddings(torch.randint(args.vocab_size, (1, T))).detach().requires_grad_(True)
    kept = _saved_bytes(net.train().layers[0], x, cos, sin, autocast=autocast, only=lambda t: T in t.shape)
    est = memory.estimate(args, n_base, 0, cfg, 1, 1)["activations"]
    assert est == pytest.approx(kept, rel=0.06)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("adapter, targets", [ADAPTERS[0], ADAPTERS[1], ADAPTERS[4]])
def test_the_estimate_bounds_the_measured_peak_of_a_training_step_closely(dtype, ckpt, adapter, targets):
    """The dry run's total against the peak of one training step as train.py runs it (the output layer on the
    labelled positions, backward, AdamW), measured as bench.py's memory section measures it (step_memory: what is
    resident plus the allocator's largest rise), on 4 blocks at 512 tokens. The terms are summed though not all
    alive at once (the logits' gradients and the recomputed block come at different times, the adapters' gradients
    late), which covers what the estimate leaves out as long as the logits term exceeds it: a forward's temporaries
    (an adapted layer's float32 output beside the base's, about 8 bytes per token and hidden unit, which the
    recompute adds to one block's set), and the gradients in flight. A vocabulary of 512 words gives 12 * 512 bytes
    of logits per token against 8 * 704 (LLaMA-2: 12 * 32000 against 8 * 11008). So at most 10% under the peak
    (the adapters' dropout masks and router tensors), and at most 20% over it."""
    net, args, n_base, cfg, autocast = _net(dtype, adapter, targets, n_layers=4, max_len=512, ckpt=ckpt, vocab=512)
    assert 12 * args.vocab_size > 8 * args.ffn_hidden_dim
    tokens = torch.randint(args.vocab_size, (1, 512))
    opt = bench.make_optimizer(net)

    def step():
        with autocast:
            net.train()(tokens, tokens.roll(-1, 1), loss_only=evaluation.loss_only(cfg))[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # AdamW's moments exist, as in every step but the first
    measured = bench.step_memory(step, net, opt, [tokens], torch.device("cpu"))
    est = memory.estimate(args, n_base, sum(p.numel() for p in train.trainable(net)), cfg, 1, 1)
    assert 0.9 < est["total"] / measured < 1.2, (est, measured)


def test_full_training_counts_its_float32_weights_once():
    """Full training trains the float32 model itself: the estimate's weights and trained terms together are its
    weights, their gradients and AdamW's two moments, as held after a step's backward (no second copy of the
    weights beside the trained term's; a bfloat16 run adds autocast's copies, alive from the forward to backward)."""
    net, args, n_base, cfg, _ = _net("float32", "none", "", n_layers=2, max_len=32)
    opt = bench.make_optimizer(net)
    tokens = torch.randint(args.vocab_size, (1, 32))
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        net(tokens, tokens.roll(-1, 1))[1].backward()
        opt.step()
    held = [*net.parameters(), *(p.grad for p in net.parameters()), *(t for s in opt.state.values() for t in
                                                                      s.values() if t.dim())]
    est = memory.estimate(args, n_base, sum(p.numel() for p in train.trainable(net)), cfg, 1, 1)
    assert est["weights"] + est["adapter"] == bench.resident_bytes(*held)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_logits_term_is_the_peak_of_the_cross_entropys_backward(dtype):
    """At a vocabulary far wider than the model the logits are most of what a step adds: the float32 log-softmax
    output, its gradient and the logits' gradient, alive together as backward starts (12 bytes per token and word),
    measured on one dim-64 block with 8192 words, every position labelled; within 5% (the block's activations, a
    twentieth of the rise, are the estimate's other term here)."""
    net, args, n_base, cfg, _ = _net(dtype, "teamlora", "w1,w2,w3", n_layers=1, max_len=256, vocab=8192, preset="tiny")
    tokens = torch.randint(args.vocab_size, (1, 256))
    trained = train.trainable(net)

    def forward_backward():
        net.train()(tokens, tokens.roll(-1, 1), loss_only=evaluation.loss_only(cfg))[1].backward()
        for p in trained:
            p.grad = None
    forward_backward()
    rise = bench.peak_bytes(forward_backward, 0, torch.device("cpu")) - 4 * sum(p.numel() for p in trained)
    est = memory.estimate(args, n_base, 0, cfg, 1, 1)
    assert est["logits"] + est["activations"] == pytest.approx(rise, rel=0.05)


def test_targets_are_read_as_train_py_injects_them_spaces_and_qualified_names_too():
    """train.py strips each target and adapts every layer whose name ends with it: "w1, w2" and
    "feed_forward.w1,feed_forward.w2" adapt what "w1,w2" does, so the estimate counts the same adapted inputs."""
    for plain, written in (("w1,w2,w3", " w1, w2 ,w3 "), ("w1,w2,w3,wq,wv", "feed_forward.w1,feed_forward.w2,"
                                                           "feed_forward.w3,attention.wq,attention.wv")):
        for dtype in ("bfloat16", "float32"):
            assert _estimate(targets=written, dtype=dtype) == _estimate(targets=plain, dtype=dtype)
        assert _estimate(targets=written)["activations"] != _estimate(targets="w1")["activations"]


@pytest.mark.parametrize("world", [1, 8])
def test_full_training_under_fsdp_holds_only_the_gathered_bfloat16_copies_beside_its_float32_shard(world):
    """Under FSDP full training's float32 weights are a shard of the trained term: the weights term adds only the
    bfloat16 copies FSDP gathers (the root and about two blocks), what an adapter run holds beyond its base's shard."""
    full, adapted = _estimate(world=world, adapter="none"), _estimate(world=world)
    assert full["weights"] == pytest.approx(adapted["weights"] - 6_700_000_000 * 2 / world)
    assert _estimate(world=1, adapter="none")["weights"] == pytest.approx(_estimate(world=8, adapter="none")["weights"])


def test_full_bfloat16_training_counts_autocasts_copies_of_the_weights_that_backward_keeps():
    """A full bfloat16 run without FSDP trains a float32 model under autocast, which casts each linear layer's weight
    to bfloat16 once per forward; backward keeps those copies: the weights term is their size, measured here on the
    tensors one forward saves (the embedding and the norms, not cast, are under 3% of the base here)."""
    T = 96
    net, args, n_base, cfg, autocast = _net("bfloat16", "none", "w1,w2,w3", n_layers=2, max_len=T)
    shapes = {s for p in net.parameters() for s in (tuple(p.shape), tuple(p.shape)[::-1])}  # saved transposed too
    copies = {}

    def pack(t):
        if t.dtype == torch.bfloat16 and tuple(t.shape) in shapes:
            copies[t.untyped_storage().data_ptr()] = t  # kept alive: no later tensor takes its address
        return t
    tokens = torch.randint(args.vocab_size, (1, T))
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net.train()(tokens, tokens.roll(-1, 1))
    est = memory.estimate(args, n_base, n_base, cfg, 1, 1)
    assert est["weights"] == pytest.approx(sum(s.untyped_storage().nbytes() for s in copies.values()), rel=0.03)


@pytest.mark.parametrize("adapter, dtype, fsdp", [("none", "bfloat16", False), ("none", "bfloat16", True),
                                                  ("none", "float32", False), ("teamlora", "bfloat16", False),
                                                  ("teamlora", "float32", True)])
def test_checkpointing_keeps_each_blocks_input_in_the_dtype_the_run_gives_the_residual_stream(adapter, dtype, fsdp):
    """With activation checkpointing each block keeps its input: in float32 for full bfloat16 training without FSDP
    (a float32 model under autocast), in the weights' dtype otherwise (FSDP's param_dtype casts a full run's weights
    to bfloat16, here by .to). The estimate with checkpointing minus one block's set is n_layers of them per token."""
    net, args, _, cfg, autocast = _net(dtype, adapter, "w1,w2,w3", n_layers=2, max_len=16)
    if fsdp and adapter == "none":
        net = net.to(getattr(torch, dtype))
    seen = []
    net.layers[1].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].element_size()))
    with autocast:
        net.train()(torch.randint(args.vocab_size, (1, 16)))
    shapes = SimpleNamespace(dim=4096, ffn_hidden_dim=11008, n_layers=32, vocab_size=32000, n_kv_heads=32,
                             head_dim=128, tie_embeddings=False)
    cfg = {**MEMORY_CFG, "dtype": dtype, "adapter": adapter, "fsdp": fsdp}
    ckpt, whole = (memory.estimate(shapes, 6_700_000_000, 10**8, {**cfg, "activation_checkpointing": c}, 8, 1)
                   ["activations"] for c in (True, False))
    assert ckpt - whole / 32 == pytest.approx(1024 * 32 * 4096 * seen[0])


@pytest.mark.parametrize("fsdp, world", [(False, 1), (True, 8)])
def test_scoring_holds_the_base_weights_that_training_holds(fsdp, world):
    """Scoring runs generate on the same base, so a larger base raises scoring's figure as much as the weights term."""
    a = _estimate(world=world, fsdp=fsdp)
    args = SimpleNamespace(dim=4096, ffn_hidden_dim=11008, n_layers=32, vocab_size=32000, n_kv_heads=32, head_dim=128,
                           tie_embeddings=False)
    b = memory.estimate(args, 7_000_000_000, 100_000_000, {**MEMORY_CFG, "fsdp": fsdp}, world, 4)
    assert b["weights"] > a["weights"] and b["scoring"] - a["scoring"] == pytest.approx(b["weights"] - a["weights"])


def test_the_trained_term_is_the_trained_tensors_their_gradients_adams_moments_and_ddps_buckets(tmp_path):
    """The adapter + AdamW term, and what of it scoring at a run's end still holds, counted on models built as
    train.py builds them, every adapter kind over a bfloat16 and a float32 base, full training too: the trained
    tensors, their gradients after a backward and AdamW's two moments after a step (its step counters, one scalar per
    tensor, left out), and under DDP (more than one process, no FSDP) the buckets its reducer allocates when it wraps
    the model, a second copy of the gradients (torch's default, gradient_as_bucket_view=False), here as its reducer
    reports them on one gloo process. The weights term is the frozen base."""
    script = tmp_path / "trained.py"
    script.write_text(textwrap.dedent(f"""
        import json, torch, torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        import model, train
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        rows = []
        for adapter in ("teamlora", "lora", "moelora", "hydralora", "none"):
            for dtype in ("bfloat16", "float32"):
                cfg = {{**train.DEFAULTS, "adapter": adapter, "dtype": dtype, "targets": "w1,wq,wo,output", "r": 8}}
                args = model.ModelArgs.from_name("tiny", n_layers=2)
                net = model.Transformer(args).to(torch.float32 if adapter == "none" else getattr(torch, dtype))
                n_base = net.num_params()
                if adapter != "none":
                    train.inject_targets(net, cfg)
                trained = train.trainable(net)
                ddp = DDP(net)  # as train.py wraps it; its reducer's own account of the buckets it allocated:
                buckets = sum(int(n) for n in ddp._get_ddp_logging_data()["bucket_sizes"].replace(",", " ").split())
                opt = torch.optim.AdamW(trained, lr=1e-3)
                tokens = torch.randint(args.vocab_size, (2, 16))
                ddp(tokens, tokens.roll(-1, 1))[1].backward()
                grads = sum(p.grad.nbytes for p in trained)
                opt.step()
                moments = sum(t.nbytes for s in opt.state.values() for t in s.values() if t.dim())
                opt.zero_grad(set_to_none=True)  # as train_step leaves each step: scoring meets no gradient
                assert all(p.grad is None for p in trained)
                rows.append(dict(cfg=cfg, n_base=n_base, n_train=sum(p.numel() for p in trained),
                                 frozen=sum(p.nbytes for p in net.parameters() if not p.requires_grad),
                                 trained=sum(p.nbytes for p in trained) + grads + moments, buckets=buckets,
                                 moments=moments))
        dist.destroy_process_group()
        print(json.dumps(rows))
    """))
    here = os.path.dirname(os.path.abspath(memory.__file__))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=here,
                         env={**os.environ, "PYTHONPATH": here})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.splitlines()[-1])
    assert len(rows) == 10 and all(row["buckets"] > 0 for row in rows)
    args = model.ModelArgs.from_name("tiny", n_layers=2)
    for row in rows:
        cfg = {**row["cfg"], "fsdp": False}
        one, ddp = (memory.estimate(args, row["n_base"], row["n_train"], cfg, world, 1) for world in (1, 2))
        assert one["adapter"] == row["trained"] and ddp["adapter"] == row["trained"] + row["buckets"], row
        # scoring at a run's end: AdamW's moments (and DDP's buckets) are still alive; a re-scoring has neither
        rescore_one, rescore_ddp = (memory.estimate(args, row["n_base"], row["n_train"], {**cfg, "eval_only": True},
                                                    world, 1) for world in (1, 2))
        assert one["scoring"] - rescore_one["scoring"] == row["moments"], row
        assert ddp["scoring"] - rescore_ddp["scoring"] == row["moments"] + row["buckets"], row
        if cfg["adapter"] != "none":
            assert one["weights"] == ddp["weights"] == row["frozen"], row


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_packed_rows_keep_each_layers_attention_mask_for_backward(dtype):
    """batch_mode="pack" gives attention a mask (model.packed_attention), which each layer folds to its query heads'
    rows (n_heads / n_kv_heads times max_len per token), casts to the activation dtype and saves for backward, in
    place of k and v repeated to every query head (kept unrepeated): what one block saves with it less what it saves
    without is the estimate's difference between pack and pad, on a model with grouped-query attention (where the
    mask of a short row costs less than the repeated k and v; a long one, more)."""
    T = 96
    net, args, n_base, cfg, autocast = _net(dtype, "teamlora", "w1,w2,w3", n_layers=1, max_len=T)
    assert args.n_heads > args.n_kv_heads
    seq_ids = (torch.arange(T) // 24)[None]  # four examples in the row
    mask, positions = model.packed_attention(seq_ids)
    x = net.tok_embeddings(torch.randint(args.vocab_size, (1, T))).detach().requires_grad_(True)
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    kept = {}
    for mode, (m, pos) in (("pad", (None, torch.arange(T)[None])), ("pack", (mask, positions))):
        cos, sin = model.rope_cos_sin(pos, args.head_dim, args.rope_theta)
        torch.manual_seed(0)
        kept[mode] = _saved_bytes(net.train().layers[0], x, cos, sin, m, autocast=autocast, skip=weights)
    pad, packed = (memory.estimate(args, n_base, 0, {**cfg, "batch_mode": mode}, 1, 1)["activations"]
                   for mode in ("pad", "pack"))
    assert kept["pack"] - kept["pad"] == packed - pad != 0


@pytest.mark.parametrize("adapter", ["teamlora", "moelora", "hydralora"])
def test_a_rank_more_keeps_what_the_adapters_weighted_z_adds_per_token(adapter):
    """A TeamLoRA (or fused MoELoRA) layer keeps z = x A^T and its omega-weighted copy, r values each; HydraLoRA's
    heads each weigh all of z, so its weighted z is k r wide: what one block saves for backward grows with r by as
    much as the estimate does, measured with adapters on w1, w2 and w3 and no dropout (its mask is left out)."""
    T = 96
    args = model.ModelArgs.from_name("small", n_layers=1, vocab_size=64, max_seq_len=T)
    cos, sin = model.rope_cos_sin(torch.arange(T)[None], args.head_dim, args.rope_theta)

    def saved_and_estimated(r):
        cfg = {**train.DEFAULTS, "adapter": adapter, "targets": "w1,w2,w3", "r": r, "experts": 4, "dropout": 0.0,
               "max_len": T, "fsdp": False}
        net = model.Transformer(args)
        n_base = net.num_params()
        train.inject_targets(net, cfg)
        x = net.tok_embeddings(torch.randint(args.vocab_size, (1, T))).detach().requires_grad_(True)
        kept = _saved_bytes(net.train().layers[0], x, cos, sin, only=lambda t: T in t.shape)
        return kept, memory.estimate(args, n_base, 0, cfg, 1, 1)["activations"]
    (kept, est), (kept_more, est_more) = saved_and_estimated(16), saved_and_estimated(20)
    assert kept_more - kept == est_more - est > 0


@pytest.mark.parametrize("key", ["max_len", "eval_batch_size", "batch_size"])
def test_a_size_no_64_bit_machine_can_address_is_refused_naming_its_flag_and_any_less_is_estimated(key):
    """A max_len or eval_batch_size near 2**63 (in check_config's range) printed an estimate of 10**16 GiB per GPU:
    from 2**64 bytes, what a 64-bit machine can address, training's or scoring's size is refused, naming the flag."""
    def sized(value):  # (estimate, config) with key at value; batch_size: the micro-batch, on one GPU
        cfg = {**MEMORY_CFG, key: value}
        micro = value if key == "batch_size" else 4
        return _estimate(micro=micro, world=1, **cfg), cfg, micro

    def needs(value):
        est = sized(value)[0]
        return max(est["total"], est["scoring"])

    low, high = MEMORY_CFG[key], 2**63 - 1  # the largest value still below 2**64 bytes, by bisection
    assert needs(low) < memory.ADDRESSABLE <= needs(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if needs(mid) < memory.ADDRESSABLE else (low, mid)
    est, cfg, micro = sized(low)
    assert memory.addressable(est, cfg, micro) is est
    for huge in (high, 2**63 - 1):
        refused = rf"\b{huge}\b.* more than a 64-bit machine can address; lower .*--{key}\b"
        with pytest.raises(ValueError, match=refused):
            memory.addressable(*sized(huge))


def test_addressable_refuses_from_2_to_the_64_bytes_of_training_or_of_scoring_and_takes_a_byte_less():
    """A 64-bit address names 2**64 bytes at most: an estimate of exactly that many is refused, one byte less is not,
    for the training total and for the scoring peak alike."""
    cfg = {**MEMORY_CFG, "max_len": 8, "eval_batch_size": 2}
    below = {"total": 2**64 - 1, "scoring": 2**64 - 1}
    assert memory.addressable(below, cfg, 4) is below
    for term, what in (("total", "a micro-batch of 4 rows"), ("scoring", "scoring 2 prompts")):
        with pytest.raises(ValueError, match=rf"^{what} of up to max_len=8 tokens would need about 1\.8e\+19 bytes"):
            memory.addressable({**below, term: 2**64}, cfg, 4)
