#!/usr/bin/env bash
# Every GPU measurement of the project in one command, under 8 minutes on one H100/H200:
#
#     bash benchmarks/gpu_suite.sh OUTDIR
#
# Steps (each under its own `timeout`; a failing or hanging step never stops the others):
#   gpu_tests       the gpu-marked tests (Triton kernels, ...), FSDP/DeepSpeed ones excepted  110 s
#   kernels_lora    python -m benchmarks.kernels lora (M 2048/8192, 2 shapes, r 16/64)         80 s
#   kernels_nf4     python -m benchmarks.kernels nf4                                             60 s
#   qlora_memory    python -m benchmarks.qlora_memory (Llama-7B shape, seq 2048)                70 s
#   fsdp_deepspeed  tests/test_fsdp_gpu.py: strategy="fsdp", ModelParallelStrategy, DeepSpeed  95 s
# Results go to OUTDIR (one log per step, the benchmarks' JSON/Markdown, steps.tsv and
# summary.md: each target met / not met / not run), then are copied to
# benchmarks/results/<device>/gpu_suite/. Installs nothing. Without CUDA every step is recorded
# as skipped and the script exits 0; GPU_SUITE_DRY_RUN=1 records the plan without running.
set -u
OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
# a reused OUTDIR: this run's outputs only (an earlier run's would read as this one's results)
rm -rf "$OUT/kernels" "$OUT/qlora_memory.jsonl" "$OUT/summary.md" "$OUT"/gpu_tests.* "$OUT"/fsdp_deepspeed.* \
  "$OUT"/kernels_lora.log "$OUT"/kernels_nf4.log "$OUT"/qlora_memory.log
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # deterministic cuBLAS for the determinism test
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
printf 'step\tstatus\tlimit_s\tseconds\tcommand\n' > "$OUT/steps.tsv"

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local status start=$SECONDS rc
  if [ "${GPU_SUITE_DRY_RUN:-0}" = 1 ]; then
    status=planned
  elif [ "$HAS_CUDA" != 1 ]; then
    status="skipped (no CUDA device)"
  else
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
      0) status=ok ;;
      124|137) status="timed out after ${limit} s" ;;
      *) status="failed (exit $rc)" ;;
    esac
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$limit" "$((SECONDS - start))" "$*" >> "$OUT/steps.tsv"
  echo "gpu_suite: $name: $status"
}

step gpu_tests 110 "$PY" -m pytest -q -p no:randomly -m gpu tests --ignore=tests/test_fsdp_gpu.py \
  --junitxml="$OUT/gpu_tests.xml"
# the target size (M=8192, K=N=4096, r=16) and a small sweep around it: the full default sweep
# (6 M x 3 shapes x 3 ranks, about 750 timings plus Triton compiles) does not fit the budget
step kernels_lora 80 "$PY" -m benchmarks.kernels lora --out "$OUT/kernels" --m 2048,8192 \
  --shapes 4096x4096,4096x11008 --ranks 16,64 --no-plot
step kernels_nf4 60 "$PY" -m benchmarks.kernels nf4 --out "$OUT/kernels"
step qlora_memory 70 "$PY" -m benchmarks.qlora_memory --json "$OUT/qlora_memory.jsonl"
step fsdp_deepspeed 95 "$PY" -m pytest -q -p no:randomly -m gpu tests/test_fsdp_gpu.py \
  --junitxml="$OUT/fsdp_deepspeed.xml"

"$PY" -m benchmarks.gpu_summary "$OUT" || echo "gpu_suite: the summary failed" >&2
if [ "${GPU_SUITE_DRY_RUN:-0}" != 1 ] && [ "$HAS_CUDA" = 1 ]; then
  SLUG=$("$PY" -c "import torch; from benchmarks.kernels_nf4 import device_slug; print(device_slug(torch.device('cuda')))")
  mkdir -p "benchmarks/results/$SLUG/gpu_suite"
  cp -r "$OUT"/. "benchmarks/results/$SLUG/gpu_suite/"
  echo "gpu_suite: results copied to benchmarks/results/$SLUG/gpu_suite/"
fi
exit 0
