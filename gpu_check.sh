#!/usr/bin/env bash
# The GPU checks in one go, for a session that has one GPU (about 7 minutes on an H100-class GPU):
#   bash gpu_check.sh [OUT]        # logs in OUT (default out/gpu_check), a summary at the end
# In order of importance, each step capped in time so that one slow step cannot starve the rest:
# 1. the 7B-shaped step at full depth (32 blocks, micro-batch 4 x 1024, activation checkpointing): LoRA,
#    TeamLoRA eager and blocks compiled, tokens/s, MFU, peak memory; 2. the bf16 demo from an empty folder;
# 3. FSDP2 under torchrun on nccl with one process (train.py shards under torchrun whatever the number of
# processes); 4. the CUDA tests; 5. the small layer on the GPU (launch-bound). The dry run's memory estimate
# to set beside step 1 needs no GPU:
#   python train.py config/cme_llama2_7b.py --dry_run=True --dry_run_world_size=1 --batch_size=4 \
#       --grad_accum=1 --fsdp=False [--adapter=lora]
# Each step runs even when one before it failed; the summary says which failed. Run folders go to a
# temporary folder, so OUT holds the logs only.
set -uo pipefail
cd "$(dirname "$0")"
out=${1:-out/gpu_check}
runs=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time cap, log to OUT/NAME.log, time it
    local name=$1 cap=$2; shift 2
    echo "== $name (at most $cap s): $*"
    local t0=$SECONDS
    timeout -k 10 "$cap" "$@" > "$out/$name.log" 2>&1 || failed+=("$name")
    echo "   $((SECONDS - t0)) s; last lines of $out/$name.log:"
    tail -n 14 "$out/$name.log" | sed 's/^/   /'
}
nvidia-smi -L; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
step bench7b 240 python bench.py --device=cuda --section=cuda7b --full7b
step demo_bf16 150 python train.py --dtype=bfloat16 --out_dir="$runs/demo_bf16"
step fsdp_nccl 100 torchrun --standalone --nproc_per_node=1 train.py -- --fsdp=True --dtype=bfloat16 \
    --max_iters=200 --out_dir="$runs/fsdp_nccl"
step tests 150 python -m pytest -q -rs -k cuda test_model.py test_teamlora.py test_train.py test_bench.py
step layer 90 python bench.py --device=cuda --section=layer
echo "failed steps: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
