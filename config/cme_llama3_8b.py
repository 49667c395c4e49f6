# The CME run on LLaMA-3-8B (the paper's second base): the LLaMA-2 recipe with LLaMA-3's model
# and tokenizer (a tiktoken file: pip install tiktoken).
#
#   python data.py prepare --input cme/*.json --tokenizer checkpoints/Meta-Llama-3-8B/original/tokenizer.model --out data/cme_llama3 --max_len 1024
#   torchrun --standalone --nproc_per_node=8 train.py config/cme_llama3_8b.py
import os  # the recipe beside this file, wherever train.py is run from
exec(open(os.path.join(os.path.dirname(__file__), "cme_llama2_7b.py")).read())
out_dir = "out/cme_llama3_8b"
init_from = "checkpoints/Meta-Llama-3-8B/original"
model = "llama3-8b"
tokenizer = "checkpoints/Meta-Llama-3-8B/original/tokenizer.model"
data_dir = "data/cme_llama3"
eval_dir = "data/cme_eval"
