"""memory.py: the dry run's arithmetic, term by term at LLaMA-2-7B's shapes, and its KV cache against what
generate allocates."""
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import memory
import model

MEMORY_CFG = dict(dtype="bfloat16", fsdp=True, max_len=1024, r=128, experts=4, activation_checkpointing=True,
                  batch_size=128, grad_accum=4, eval_batch_size=64)


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
    for world in (1, 8):  # DDP: every GPU holds all of it
        ddp = _estimate(world=world, fsdp=False)
        assert ddp["weights"] == pytest.approx(n_base * 2) and ddp["adapter"] == pytest.approx(n_train * 16)
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
        assert one["logits"] == pytest.approx(1024 * 32000 * 4 * 2) and two["logits"] == pytest.approx(
            2 * one["logits"])  # float32 logits and their gradient
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


@pytest.mark.parametrize("fsdp, world", [(False, 1), (True, 8)])
def test_scoring_holds_the_adapters_float32_weights_not_their_gradients_or_adam_moments(fsdp, world):
    """Scoring runs generate on the trained adapter: it holds the adapter's float32 weights (4 bytes a parameter,
    a 1/world shard under FSDP), not the gradients and AdamW moments a training step adds (16 bytes in all)."""
    args = SimpleNamespace(dim=4096, ffn_hidden_dim=11008, n_layers=32, vocab_size=32000, n_kv_heads=32, head_dim=128,
                           tie_embeddings=False)
    more, cfg = 50_000_000, {**MEMORY_CFG, "fsdp": fsdp}
    a, b = (memory.estimate(args, 6_700_000_000, n_train, cfg, world, 4) for n_train in (10**8, 10**8 + more))
    assert b["adapter"] - a["adapter"] == pytest.approx(more * 16 / world)
    assert b["scoring"] - a["scoring"] == pytest.approx(more * 4 / world)


def test_activations_count_the_tensors_each_block_keeps_per_token_as_listed():
    """Without checkpointing, what one token keeps per layer grows by the listed tensors: six of width dim (norms,
    q/k/v, attention output, residual stream) and four of the FFN's hidden width (w1 x, its SiLU, w3 x, their
    product), in the activation dtype; and by the adapter's rank- and expert-sized terms, so more experts (the
    router's per-token outputs) keep more too."""
    args = dict(dim=4096, ffn_hidden_dim=11008, n_layers=32, vocab_size=32000, n_kv_heads=32, head_dim=128,
                tie_embeddings=False)
    cfg = {**MEMORY_CFG, "fsdp": False, "activation_checkpointing": False}
    micro, tokens = 2, 2 * cfg["max_len"]

    def acts(changes=(), **cfg_changes):
        shapes = SimpleNamespace(**{**args, **dict(changes)})
        return memory.estimate(shapes, 6_700_000_000, 10**8, {**cfg, **cfg_changes}, 1, micro)["activations"]
    for wbytes, dtype in ((2, "bfloat16"), (4, "float32")):
        base = acts(dtype=dtype)
        per_token_layer = tokens * args["n_layers"] * wbytes
        assert acts({"dim": args["dim"] + 1}, dtype=dtype) - base == pytest.approx(6 * per_token_layer)
        assert acts({"ffn_hidden_dim": args["ffn_hidden_dim"] + 1}, dtype=dtype) - base == pytest.approx(
            4 * per_token_layer)
    more_experts = acts(experts=MEMORY_CFG["experts"] + 4) - acts()
    assert more_experts > 0 and more_experts == pytest.approx(acts(r=MEMORY_CFG["r"] + 4) - acts())
    # one rank more: two float32 values (z and the omega-weighted z) per token in each of the three adapted FFN layers
    assert acts(r=MEMORY_CFG["r"] + 1) - acts() == pytest.approx(tokens * args["n_layers"] * 3 * 2 * 4)


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
