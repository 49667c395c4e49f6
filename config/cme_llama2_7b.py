# The paper's CME run (Table 2) as far as its setting is known: LLaMA-2-7B (the paper used Chinese-LLaMA-2-7B:
# point init_from, tokenizer and prepare's --tokenizer at it; model="chinese-llama2-7b" dry-runs it without weights),
# TeamLoRA on the FFN (w1, w2, w3) with 4 experts of rank 32, lr 2e-4, alpha 32, dropout 0.05, one epoch,
# cosine schedule with 3% warmup, bf16, sequences of at most 1024 tokens.
#
#   python data.py prepare --input cme/*.json --tokenizer checkpoints/Llama-2-7b/tokenizer.model --out data/cme --max_len 1024
#   torchrun --standalone --nproc_per_node=8 train.py config/cme_llama2_7b.py
out_dir = "out/cme_llama2_7b"
init_from = "checkpoints/Llama-2-7b"  # a Meta folder (params.json) or a Hugging Face one (config.json)
model = "llama2-7b"  # only used by --dry_run=True when init_from is not on disk
tokenizer = "checkpoints/Llama-2-7b/tokenizer.model"
data_dir = "data/cme"
eval_dir = "data/cme_eval"  # <task>.jsonl files written by `python tasks.py`
dtype = "bfloat16"
fsdp = True
activation_checkpointing = True  # False: no recomputed forward, about 30.5 GiB a GPU, not 6.4 (the dry run's estimate)
compile = False  # True: 0.73x the eager step time on one H200 at this shape (RESULTS.md); not yet run with FSDP on nccl
max_len = 1024
batch_mode = "pad"

adapter = "teamlora"
targets = "w1,w2,w3"
r = 128  # 4 experts x r_B = 32
experts = 4
alpha = 32.0
dropout = 0.05

# 2.5M records, global batch 128 (8 GPUs x 4 per micro-batch x 4 accumulation steps): one epoch
batch_size = 128
grad_accum = 4
dry_run_world_size = 8  # --dry_run=True plans for the 8 GPUs of the torchrun command above
max_iters = 2_500_000 // 128
warmup_iters = int(0.03 * max_iters)
learning_rate = 2e-4
eval_interval = 1000
eval_iters = 20
eval_limit = 0  # every test record
eval_batch_size = 64
