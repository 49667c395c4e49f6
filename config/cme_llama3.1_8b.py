# The CME run on LLaMA-3.1-8B: the LLaMA-2 recipe with LLaMA 3.1's model and tokenizer. Load the
# Hugging Face folder (its config.json gives the rotary scaling that Meta's params.json leaves out:
# the original/ folder is refused); *.safetensors needs pip install safetensors, tokenizer.json
# pip install tokenizers.
#
#   python data.py prepare --input cme/*.json --tokenizer checkpoints/Llama-3.1-8B --out data/cme_llama3.1 --max_len 1024
#   torchrun --standalone --nproc_per_node=8 train.py config/cme_llama3.1_8b.py
#   python train.py config/cme_llama3.1_8b.py --dry_run=True   # parameters and memory, nothing downloaded
import os  # the recipe beside this file, wherever train.py is run from
exec(open(os.path.join(os.path.dirname(__file__), "cme_llama2_7b.py")).read())
out_dir = "out/cme_llama3.1_8b"
init_from = "checkpoints/Llama-3.1-8B"  # the Hugging Face folder (config.json, *.safetensors)
model = "llama3.1-8b"  # only used by --dry_run=True when init_from is not on disk
tokenizer = "checkpoints/Llama-3.1-8B"  # the folder: tokenizer.json and tokenizer_config.json
data_dir = "data/cme_llama3.1"
eval_dir = "data/cme_eval"
