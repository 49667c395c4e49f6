# The CME run on Qwen3-8B (base): the LLaMA-2 recipe with Qwen3's model and tokenizer. The Hugging
# Face folder loads as is (no biases; q and k normalised per head; heads of 128 over a width of 4096);
# its tokenizer.json needs the tokenizers package (pip install tokenizers), and the prompt's "</s>"
# becomes Qwen's EOS (Qwen has no BOS). FFN adapters: w1, w3, w2 are gate_proj, up_proj, down_proj.
#
#   python data.py prepare --input cme/*.json --tokenizer checkpoints/Qwen3-8B-Base --out data/cme_qwen3 --max_len 1024
#   torchrun --standalone --nproc_per_node=8 train.py config/cme_qwen3_8b.py
#   python train.py config/cme_qwen3_8b.py --dry_run=True   # parameters and memory, nothing downloaded
import os  # the recipe beside this file, wherever train.py is run from
exec(open(os.path.join(os.path.dirname(__file__), "cme_llama2_7b.py")).read())
out_dir = "out/cme_qwen3_8b"
init_from = "checkpoints/Qwen3-8B-Base"  # the Hugging Face folder (config.json, *.safetensors)
model = "qwen3-8b-base"  # only used by --dry_run=True when init_from is not on disk
tokenizer = "checkpoints/Qwen3-8B-Base"  # the folder: tokenizer.json and tokenizer_config.json
data_dir = "data/cme_qwen3"
eval_dir = "data/cme_eval"
targets = "w1,w2,w3"  # gate_proj, down_proj, up_proj
