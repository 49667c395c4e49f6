#!/usr/bin/env bash
# The GPU checks in one go, for a session that has one GPU (about 9 minutes on an H200):
#   bash gpu_check.sh [OUT [STEP...]]   # logs in OUT (default out/gpu_check), a summary at the end; STEPs:
#                                       # only these, e.g. two calls under a 10-minute limit each:
#   bash gpu_check.sh OUT bench7b bench7b_nockpt; bash gpu_check.sh OUT fsdp_nccl fsdp_compiled pad_widths \
#       loss_only tests
# In order of importance, each step capped in time so that one slow step cannot starve the rest:
# 1. the 7B-shaped step at full depth (32 blocks, micro-batch 4 x 1024, activation checkpointing): LoRA and
#    TeamLoRA, eager and blocks compiled, tokens/s, MFU, peak memory; 2. the same without checkpointing (no
# recomputed forward: the MFU target's likeliest way); 3. FSDP2 under torchrun on nccl with one process
# (train.py shards under torchrun whatever the number of processes; the first run builds the demo's data and
# base), eager and 4. with compiled blocks (the 7B recipes keep compile off until this has run); 5. step times
# at new padded widths against repeated ones, and a profile of one (the bf16 demo's fine-tuning steps were
# uneven on an H200, its fixed-shape pretraining steps were not); 6. the output layer on answer tokens only
# against every position (train.py's loss_only: its boolean index waits for the GPU once a micro-batch); 7. the
# CUDA tests. Left out, measured on an H100 and an H200 (RESULTS.md): the bf16 demo (`python train.py
# --dtype=bfloat16`) and the small layer (`python bench.py --device=cuda --section=layer`, launch-bound). Steps 1 and 2 print the dry run's memory
# estimate for their setting beside each measured peak ("dry run / peak").
# Each step runs even when one before it failed; the summary says which failed. Run folders go to a
# temporary folder, so OUT holds the logs only.
set -uo pipefail
cd "$(dirname "$0")"
out=${1:-out/gpu_check}
only=("${@:2}")
for name in "${only[@]}"; do
    case $name in bench7b|bench7b_nockpt|fsdp_nccl|fsdp_compiled|pad_widths|loss_only|tests) ;;
        *) echo "gpu_check.sh: unknown step '$name'; the steps: bench7b bench7b_nockpt fsdp_nccl fsdp_compiled" \
               "pad_widths loss_only tests" >&2; exit 2 ;;
    esac
done
runs=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time cap, log to OUT/NAME.log, time it
    local name=$1 cap=$2; shift 2
    if [ ${#only[@]} -gt 0 ] && [[ ! " ${only[*]} " == *" $name "* ]]; then return; fi
    echo "== $name (at most $cap s): $*"
    local t0=$SECONDS
    timeout -k 10 "$cap" "$@" > "$out/$name.log" 2>&1 || failed+=("$name")
    echo "   $((SECONDS - t0)) s; last lines of $out/$name.log:"
    tail -n 14 "$out/$name.log" | sed 's/^/   /'
}
nvidia-smi -L; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
step bench7b 240 python bench.py --device=cuda --section=cuda7b --full7b
# without checkpointing a step holds about 24 GiB more: two resident 7B models, not four, fit an H100's 80 GB
step bench7b_nockpt 240 python bench.py --device=cuda --section=cuda7b --full7b --no-checkpointing --no-compile
step fsdp_nccl 150 torchrun --standalone --nproc_per_node=1 train.py -- --fsdp=True --dtype=bfloat16 \
    --max_iters=200 --out_dir="$runs/fsdp_nccl"
step fsdp_compiled 150 torchrun --standalone --nproc_per_node=1 train.py -- --fsdp=True --compile=True \
    --dtype=bfloat16 --max_iters=200 --out_dir="$runs/fsdp_compiled"
cat > "$runs/pad_widths.py" <<'PROBE'
import statistics, time
import torch
import bench
from model import ModelArgs, Transformer
torch.manual_seed(0)
model = bench.adapt_ffn(Transformer(ModelArgs.from_name("small", max_seq_len=512)).to("cuda", torch.bfloat16),
                        "TeamLoRA fused", 32, 4, torch.float32)
widths = torch.randperm(230)[:24].add(20).tolist()
def step(T):  # a training step's forward and backward at batch 16 x T
    tok = torch.randint(1000, (16, T), device="cuda")
    torch.cuda.synchronize(); t = time.perf_counter()
    model(tok, tok.roll(-1, 1))[1].backward()
    torch.cuda.synchronize(); return time.perf_counter() - t
step(widths[-1])
first, again = [step(T) for T in widths[:-2]], [step(T) for T in widths[:-2]]
print(f"new width: median {1e3 * statistics.median(first):.1f} ms, max {1e3 * max(first):.1f}; the same widths "
      f"again: median {1e3 * statistics.median(again):.1f} ms, max {1e3 * max(again):.1f}")
acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
with torch.profiler.profile(activities=acts) as p:
    step(widths[-2])
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
PROBE
step pad_widths 60 env PYTHONPATH=. python "$runs/pad_widths.py"
step loss_only 60 python bench.py --device=cuda --section=loss
step tests 150 python -m pytest -q -rs -k cuda test_model.py test_teamlora.py test_train.py test_bench.py
echo "failed steps: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
