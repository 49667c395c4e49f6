# The CME run on Qwen2.5-7B (the base TalkLoRA, ACL 2026, compares TeamLoRA on): the LLaMA-2 recipe
# with Qwen2.5's model and tokenizer. The Hugging Face folder loads as is (q/k/v biases, rope_theta
# 1e6); its tokenizer.json needs the tokenizers package (pip install tokenizers), and the prompt's
# "</s>" becomes Qwen's EOS, <|endoftext|> (Qwen has no BOS). FFN adapters: w1, w3, w2 are Hugging
# Face's gate_proj, up_proj, down_proj.
#
#   python data.py prepare --input cme/*.json --tokenizer checkpoints/Qwen2.5-7B --out data/cme_qwen2.5 --max_len 1024
#   torchrun --standalone --nproc_per_node=8 train.py config/cme_qwen2.5_7b.py
#   python train.py config/cme_qwen2.5_7b.py --dry_run=True   # parameters and memory, nothing downloaded
import os  # the recipe beside this file, wherever train.py is run from
exec(open(os.path.join(os.path.dirname(__file__), "cme_llama2_7b.py")).read())
out_dir = "out/cme_qwen2.5_7b"
init_from = "checkpoints/Qwen2.5-7B"  # the Hugging Face folder (config.json, *.safetensors)
model = "qwen2.5-7b"  # only used by --dry_run=True when init_from is not on disk
tokenizer = "checkpoints/Qwen2.5-7B"  # the folder: tokenizer.json and tokenizer_config.json
data_dir = "data/cme_qwen2.5"
eval_dir = "data/cme_eval"
targets = "w1,w2,w3"  # gate_proj, down_proj, up_proj
