"""What a run needs in memory per GPU, by arithmetic: train.py's dry run prints it before any weight is read (and
refuses, by addressable, one no 64-bit machine could hold), and bench.py sets it beside the peaks it measures. Rough
by design: the big terms only."""

# a block's linear layers by the tensor they read: wq, wk and wv one, wo one, w1 and w3 one, w2 one (FFN-wide)
LINEAR_INPUTS = (("wq", "wk", "wv"), ("wo",), ("w1", "w3"), ("w2",))


def estimate(args, n_base, n_train, cfg, world, micro):
    """Bytes per GPU of each big term, of their total, and of scoring: back-of-the-envelope arithmetic."""
    wbytes = 2 if cfg["dtype"] == "bfloat16" else 4
    full = cfg["adapter"] == "none"  # full training: float32 weights, run in bfloat16 by autocast or FSDP's casts
    root = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2) + args.dim  # embeddings, output, last norm
    per_layer = (n_base - root) / max(args.n_layers, 1)
    # the base in its dtype; full training's float32 weights are the trained term's, so for it this holds only copies:
    # a bfloat16 run's autocast copies of the linear layers' weights, and FSDP's gathered weights (in the run's dtype)
    if cfg["fsdp"]:  # a shard of everything, plus the gathered root (FSDP2 keeps it from its forward to the end of
        # backward: 2 GiB for LLaMA-3-8B in bf16) and about two gathered blocks (one in use, one prefetched)
        weights = (0 if full else n_base * wbytes / world) + (root + 2 * per_layer) * wbytes
    else:
        weights = 0 if full and wbytes == 4 else n_base * wbytes
    trained_bytes = n_train * 4 / (world if cfg["fsdp"] else 1)  # the trained tensors in float32 (FSDP: a shard)
    adapter = trained_bytes * 4  # with their gradients and AdamW's 2 moments
    if world > 1 and not cfg["fsdp"]:  # DDP's buckets: a second float32 copy of the gradients, kept for the whole run
        adapter += n_train * 4
    tokens = micro * cfg["max_len"]
    dim, hidden = args.dim, args.ffn_hidden_dim
    stream = 4 if full and not cfg["fsdp"] else wbytes  # the residual stream's bytes (autocast: a float32 model's)
    # per token and layer, what backward keeps: the two norms' float32 inputs (and outputs, where their weights
    # train), q, k and v (repeated to every query head), the attention output and the SwiGLU's w1 x, its SiLU and
    # w3 x (in the activation dtype)
    per_token_layer = 2 * dim * (4 + (stream if full else 0)) + (4 * dim + 3 * hidden) * wbytes
    if cfg.get("batch_mode") == "pack":  # attention gets a mask, which model.py folds into a key/value head's rows
        # (a row of max_len per query head of the group), cast to the activation dtype: in place of the copies of k
        # and v repeated to every query head, each layer keeps k and v as they are and that mask
        rows = args.n_heads // args.n_kv_heads
        per_token_layer += (rows * cfg["max_len"] - 2 * (dim - args.n_kv_heads * args.head_dim)) * wbytes
    # the input of each trained linear layer, an adapter's in float32 (full training: the activation dtype), one copy
    # per layer where each casts its input (x.to in an adapter over a bfloat16 base, autocast), else one per tensor
    block = {name for group in LINEAR_INPUTS for name in group}
    trained = block if full else block & {t.strip().rpartition(".")[2] for t in cfg["targets"].split(",")}
    kept = wbytes if full else 4
    for group in LINEAR_INPUTS:
        n = len(trained.intersection(group))
        per_token_layer += (n if stream != kept else min(n, 1)) * (hidden if group == ("w2",) else dim) * kept
    # and each adapted layer's float32 z and omega-weighted z (r values each; HydraLoRA's weighted z: k r, as each of
    # its heads weighs all of z) and two of k values (router); the output layer's are left out
    weighted = cfg["r"] * (cfg["experts"] if cfg["adapter"] == "hydralora" else 1)
    per_token_layer += 0 if full else len(trained) * 4 * (cfg["r"] + weighted + 2 * cfg["experts"])
    if cfg["activation_checkpointing"]:  # each block's input, and one block's full set while it is recomputed
        activations = tokens * (args.n_layers * dim * stream + per_token_layer)
    else:
        activations = tokens * args.n_layers * per_token_layer
    # float32 log-softmax output, its gradient and the logits' gradient, alive together as backward starts; at most:
    # with adapters (the output layer unadapted) train.py runs it on the labelled positions only
    logits = tokens * args.vocab_size * 4 * 3
    total = weights + adapter + activations + logits
    # scoring: generate preallocates keys and values for a batch of prompts + answers (at most max_len tokens
    # here), and the prefill holds the FFN's hidden tensors (w1's, w3's, their product; w2's adapter input float32);
    # of the trained term, scoring at a run's end keeps all but the gradients (AdamW's moments and DDP's buckets live
    # as long as the run); a re-scoring (eval_only) has the trained weights alone
    eval_tokens = cfg["eval_batch_size"] * cfg["max_len"]
    kv_cache = eval_tokens * args.n_layers * 2 * args.n_kv_heads * args.head_dim * wbytes
    held = trained_bytes if cfg.get("eval_only") else adapter - trained_bytes
    scoring = weights + held + kv_cache + eval_tokens * args.ffn_hidden_dim * (3 * wbytes + 4)
    return {"weights": weights, "adapter": adapter, "activations": activations, "logits": logits, "total": total,
            "kv_cache": kv_cache, "scoring": scoring}


ADDRESSABLE = 2**64  # bytes: no 64-bit machine can address more, let alone hold it


def addressable(est, cfg, micro):
    """The estimate est as it is, unless training or scoring would need more bytes per GPU than a 64-bit machine can
    address: then a ValueError, one sentence naming the sizes and their flags (a max_len or batch near 2**63 passes
    train.py's range checks, and the run itself cuts records to max_len)."""
    training = ("total", f"a micro-batch of {micro} rows", "--max_len (longer records are cut to it) or --batch_size")
    scoring = ("scoring", f"scoring {cfg['eval_batch_size']} prompts", "--eval_batch_size or --max_len")
    for term, what, fix in (training, scoring):
        if est[term] >= ADDRESSABLE:
            raise ValueError(f"{what} of up to max_len={cfg['max_len']} tokens would need about {est[term]:.1e} bytes "
                             f"per GPU, more than a 64-bit machine can address; lower {fix}.")
    return est
