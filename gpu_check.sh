#!/usr/bin/env bash
# The GPU checks in one go, for a session that has one GPU (an estimated 8 minutes on an H100-class GPU):
#   bash gpu_check.sh [OUT]        # logs in OUT (default out/gpu_check), a summary at the end
# 1. the CUDA tests; 2. the 7B-shaped step at full depth (32 blocks, micro-batch 4 x 1024, activation
# checkpointing): LoRA, TeamLoRA eager and blocks compiled, tokens/s, MFU, peak memory, beside the dry run's
# memory estimate for the same setting; 3. the bf16 demo from an empty folder; 4. FSDP2 under torchrun on
# nccl with one process (train.py shards under torchrun whatever the number of processes).
# Each step runs even when one before it failed; the summary says which failed.
set -uo pipefail
cd "$(dirname "$0")"
out=${1:-out/gpu_check}
mkdir -p "$out"
failed=()
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, time it
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" > "$out/$name.log" 2>&1 || failed+=("$name")
    echo "   $((SECONDS - t0)) s; last lines of $out/$name.log:"
    tail -n 12 "$out/$name.log" | sed 's/^/   /'
}
nvidia-smi -L; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
step tests python -m pytest -q -rs -k cuda test_model.py test_teamlora.py test_train.py test_bench.py
step dryrun_teamlora python train.py config/cme_llama2_7b.py --dry_run=True --dry_run_world_size=1 \
    --batch_size=4 --grad_accum=1 --fsdp=False
step dryrun_lora python train.py config/cme_llama2_7b.py --dry_run=True --dry_run_world_size=1 \
    --batch_size=4 --grad_accum=1 --fsdp=False --adapter=lora
step bench7b python bench.py --device=cuda --section=cuda7b --full7b
step demo_bf16 python train.py --dtype=bfloat16 --out_dir="$out/demo_bf16"
step fsdp_nccl torchrun --standalone --nproc_per_node=1 train.py -- --fsdp=True --dtype=bfloat16 --max_iters=200 \
    --out_dir="$out/fsdp_nccl"
echo "failed steps: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
