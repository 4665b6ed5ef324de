#!/usr/bin/env bash
# The GPU checks in one run of at most 9 minutes: the CUDA tests (pytest -k cuda), then the GPU
# benchmarks of BENCHMARKS.md (fused log-probs at 16k and 32k tokens, the sampler against
# transformers' generate on the 1.5B shape with its share of the memory-bandwidth roofline, one RL
# step on the 1.5B shape). Each step has its own time limit (together 540 s); a step that fails or
# runs out of time is recorded and the next one runs. Everything is appended, step by step, to one
# file: $OUT/gpu_check.txt, or gpu_check_out/gpu_check.txt without $OUT, so a run cut short keeps
# what it did. Needs nothing beyond `pip install -r requirements-test.txt` (and bash, coreutils).
#
#   ./gpu_check.sh             # on a machine with an NVIDIA GPU (the roofline knows H100 and H200)
#   ./gpu_check.sh --dry-run   # the same steps at tiny sizes on a CPU, in bf16 where the GPU runs
#                              # bf16 (the CUDA tests are collected and skipped)
set -uo pipefail
cd "$(dirname "$0")"
dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
dir="${OUT:-gpu_check_out}"
mkdir -p "$dir"
log="$dir/gpu_check.txt"
summary=()
failed=0

step() {  # step NAME LIMIT_SECONDS COMMAND...: runs COMMAND under its limit, appends its output to the log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit} s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local note="rc $rc"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note="timed out after ${limit} s (rc $rc)"; fi
  echo "=== $name: $note, $((SECONDS - t0)) s" | tee -a "$log"
  summary+=("$name: $note, $((SECONDS - t0)) s")
  if [ "$rc" -ne 0 ]; then failed=1; fi
}

{
  echo "##### gpu_check.sh $* at $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python -c "import torch, triton, transformers; print('torch', torch.__version__, '| cuda', torch.version.cuda, \
'| available', torch.cuda.is_available(), '| triton', triton.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee -a "$log"

if [ "$dry" -eq 1 ]; then
  step "CUDA tests" 180 python -m pytest -q -rs -k cuda tests
  step "fused log-probs" 90 python bench_kernels.py --n 64 128 --vocab 4096 --hidden 64 --methods naive fused \
    --repeats 1 --dtype bfloat16
  step "sampler vs transformers" 150 python bench_sampler.py --shape tiny --batch 4 --prompt 8 --new 8 --repeat 1 \
    --sequences 0 --dtype bfloat16
  step "one RL step" 120 python bench_rl_step.py --shape tiny --prompts 2 --group 2 --prompt-len 8 --new 8 --steps 1 \
    --dtype bfloat16
else
  step "CUDA tests" 180 python -m pytest -q -rs -k cuda tests
  # issue 4: peak memory at most a tenth of naive, time no worse (bf16, V = 151936, H = 1536)
  step "fused log-probs" 90 python bench_kernels.py --n 16384 32768 --methods naive fused
  # issue 3: at least 3x transformers' generate at batch 64 in bf16, at least 50% of the roofline
  step "sampler vs transformers" 150 python bench_sampler.py --shape 1.5b --batch 64 --prompt 256 --new 256 \
    --repeat 3 --sequences 0
  # issue 6: one RL step on the 1.5B shape (64 responses of 512 tokens), bf16 sampler, FSDP2 group of one
  step "one RL step" 120 python bench_rl_step.py --shape 1.5b --prompts 8 --new 512 --steps 1 --grad-checkpointing
fi

{
  echo "##### summary"
  printf '%s\n' "${summary[@]}"
} | tee -a "$log"
exit "$failed"
