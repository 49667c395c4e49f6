"""What a run needs in memory per GPU, by arithmetic: train.py's dry run prints it before any weight is read,
and bench.py sets it beside the peaks it measures. Rough by design: the big terms only."""


def estimate(args, n_base, n_train, cfg, world, micro):
    """Bytes per GPU of each big term, of their total, and of scoring: back-of-the-envelope arithmetic."""
    wbytes = 2 if cfg["dtype"] == "bfloat16" else 4
    root = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2) + args.dim  # embeddings, output, last norm
    per_layer = (n_base - root) / max(args.n_layers, 1)
    if cfg["fsdp"]:  # a shard of everything, plus the gathered root (FSDP2 keeps it from its forward to the end of
        # backward: 2 GiB for LLaMA-3-8B in bf16) and about two gathered blocks (one in use, one prefetched)
        weights = n_base * wbytes / world + (root + 2 * per_layer) * wbytes
    else:
        weights = n_base * wbytes
    adapter = n_train * 16 / (world if cfg["fsdp"] else 1)  # fp32 weights, gradients and two AdamW moments
    tokens = micro * cfg["max_len"]
    # per token and layer, what backward keeps (in the activation dtype): norms, q/k/v, attention output, the
    # SwiGLU's four hidden-size tensors (w1 x, its SiLU, w3 x, their product), the residual stream; and the
    # adapters' float32 z and omega-weighted z (r + k values each) in the three FFN layers that the recipes adapt
    per_token_layer = (6 * args.dim + 4 * args.ffn_hidden_dim) * wbytes + 4 * 3 * (cfg["r"] + cfg["experts"]) * 2
    if cfg["activation_checkpointing"]:
        activations = tokens * (args.n_layers * args.dim * wbytes + per_token_layer)
    else:
        activations = tokens * args.n_layers * per_token_layer
    logits = tokens * args.vocab_size * 4 * 2  # float32 logits and their gradient, at most: labelled positions only
    total = weights + adapter + activations + logits
    # scoring: generate preallocates keys and values for a batch of prompts + answers (at most max_len tokens
    # here), and the prefill holds the FFN's hidden tensors (w1's, w3's, their product; w2's adapter input float32)
    eval_tokens = cfg["eval_batch_size"] * cfg["max_len"]
    kv_cache = eval_tokens * args.n_layers * 2 * args.n_kv_heads * args.head_dim * wbytes
    scoring = weights + adapter / 4 + kv_cache + eval_tokens * args.ffn_hidden_dim * (3 * wbytes + 4)
    return {"weights": weights, "adapter": adapter, "activations": activations, "logits": logits, "total": total,
            "kv_cache": kv_cache, "scoring": scoring}
