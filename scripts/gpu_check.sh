#!/usr/bin/env bash
# One-shot GPU check of the DINOv2 trainer and `dinoflow bench train-step`: 4-6 minutes on one
# H100/H200 (give it a 600 s limit). Run from anywhere; dinoflow need not be installed (src/ is
# appended to PYTHONPATH unless it is there already).
#
#   bash scripts/gpu_check.sh              # on a CUDA machine
#   bash scripts/gpu_check.sh --cpu-smoke  # tiny sizes on the CPU: imports, arguments, code paths
#   GPU_CHECK_QUICK=1 bash scripts/gpu_check.sh  # ~3 min: trainer CUDA path + bench ViT-S/14, ViT-L/14
#
# Parts: (0) environment; (a) the trainer's CUDA path, a few bf16 steps, tiny ViT and ViT-S/14 at
# 224/98 px, no object store (store=None: no checkpoint written); (b) the bench: full DINOv2 step vs
# backbone, images/s and MFU, ViT-S/14 and ViT-L/14, 2 x 224 + 8 x 98 px crops; (c) peak GPU memory
# (max_memory_allocated) of each, in every JSON line. Optional last: torch.compile of the tiny run.
# Everything goes to ${OUT:-/tmp/gpu_check}/gpu_check.log too; a summary of JSON lines ends it.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [[ "${1:-}" == "--cpu-smoke" ]]; then MODE=cpu; fi
OUT_DIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_check.log
SUMMARY=$OUT_DIR/gpu_check_summary.jsonl
: >"$LOG"
: >"$SUMMARY"
PY=${PYTHON:-python3}
case ":${PYTHONPATH:-}:" in *":src:"* | *":$PWD/src:"*) ;; *) export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src ;; esac
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
finish() { # close the log pipe and let tee write its last lines before the exit status is given
  exec 1>&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  exit "$1"
}

FAILED=()
T_START=$SECONDS

part() { # part NAME TIMEOUT_S CMD...: run, keep its last JSON line, never stop the script
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== $name ($(date +%H:%M:%S), ${SECONDS}s in; limit ${limit}s)"
  local tmp
  tmp=$(mktemp)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$tmp"
  local rc=${PIPESTATUS[0]}
  local last
  last=$(grep '^{' "$tmp" | tail -n 1)
  if [[ $rc -ne 0 ]]; then
    FAILED+=("$name(rc=$rc)")
    echo "!!! $name failed (rc=$rc)"
    echo "{\"part\": \"$name\", \"rc\": $rc}" >>"$SUMMARY"
  elif [[ -n "$last" ]]; then
    echo "{\"part\": \"$name\", \"rc\": 0, \"result\": $last}" >>"$SUMMARY"
  fi
  rm -f "$tmp"
}

echo "=== environment ($MODE)"
if [[ $MODE == gpu ]]; then nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true; fi
$PY - <<'EOF'
import sys, torch, timm
print("python", sys.version.split()[0], "| torch", torch.__version__, "| timm", timm.__version__)
print("cuda available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
import pydantic, dinoflow.train.trainer, dinoflow_tools.bench.train_step  # noqa: E401,F401  (imports resolve)
print("pydantic", pydantic.VERSION, "| dinoflow imports OK")
EOF
[[ $? -eq 0 ]] || FAILED+=("imports")

TRAIN=(scripts/gpu_check_train.py)
BENCH=(-m dinoflow_tools.bench.train_step)
if [[ $MODE == gpu && "${GPU_CHECK_QUICK:-0}" == 1 ]]; then
  # a short lease (~3 min): the trainer's CUDA path once, then the bench for ViT-S/14 and ViT-L/14
  DEV=(--device cuda --precision bf16)
  BARGS=(--global-px 224 --local-px 98 --local-crops 8 --reps 3 --warmup 1)
  part train_tiny 45 "$PY" "${TRAIN[@]}" "${DEV[@]}" --backbone vit_small_p7_28 --batch 128 --steps 5
  part bench_vits14_b128 60 "$PY" "${BENCH[@]}" "${DEV[@]}" --backbone vit_small_p14 "${BARGS[@]}" --batch 128
  part bench_vitl14_b32 70 "$PY" "${BENCH[@]}" "${DEV[@]}" --backbone vit_large_p14 "${BARGS[@]}" --batch 32
elif [[ $MODE == gpu ]]; then
  DEV=(--device cuda --precision bf16)
  # (a) the trainer's CUDA path (5 / 4 steps, bf16 autocast, single process)
  part train_tiny 60 "$PY" "${TRAIN[@]}" "${DEV[@]}" --backbone vit_small_p7_28 --batch 128 --steps 5
  part train_vits14 90 "$PY" "${TRAIN[@]}" "${DEV[@]}" --backbone vit_small_p14 \
    --global-px 224 --local-px 98 --batch 64 --steps 4
  # (b) + (c) the bench, ViT-S/14 and ViT-L/14, 2 x 224 + 8 x 98 px (DINOv2 defaults), 65,536 prototypes
  BARGS=(--global-px 224 --local-px 98 --local-crops 8 --reps 5 --warmup 2)
  part bench_vits14_b128 90 "$PY" "${BENCH[@]}" "${DEV[@]}" --backbone vit_small_p14 "${BARGS[@]}" --batch 128
  part bench_vitl14_b32 100 "$PY" "${BENCH[@]}" "${DEV[@]}" --backbone vit_large_p14 "${BARGS[@]}" --batch 32
  # the issue's CPU-shaped step on the GPU (tiny ViT, 2 x 28 + 6 x 14 px, batch 128): ratio only
  part bench_tiny_cuda 60 "$PY" "${BENCH[@]}" "${DEV[@]}" --backbone vit_small_p7_28 --batch 128 --reps 7
  # optional, while time is left (~6 min in all): ViT-L/14 at batch 64, then torch.compile
  if ((SECONDS - T_START < 220)); then
    part bench_vitl14_b64 90 "$PY" "${BENCH[@]}" "${DEV[@]}" --backbone vit_large_p14 "${BARGS[@]}" --batch 64
  else
    echo "skipping ViT-L/14 batch 64: $((SECONDS - T_START))s used"
  fi
  if ((SECONDS - T_START < 270)); then
    part train_tiny_compile 90 "$PY" "${TRAIN[@]}" "${DEV[@]}" --backbone vit_small_p7_28 --batch 128 \
      --steps 6 --compile
  else
    echo "skipping the torch.compile run: $((SECONDS - T_START))s used"
  fi
else
  DEV=(--device cpu --precision fp32 --threads 2)
  part train_tiny 120 "$PY" "${TRAIN[@]}" "${DEV[@]}" --backbone vit_test_p4_28 --global-px 28 \
    --local-px 12 --batch 8 --steps 3
  part train_vits14 180 "$PY" "${TRAIN[@]}" "${DEV[@]}" --backbone vit_small_p14 --global-px 56 \
    --local-px 28 --local-crops 2 --batch 2 --steps 2
  part bench_vits14 180 "$PY" "${BENCH[@]}" "${DEV[@]}" --backbone vit_small_p14 --global-px 224 \
    --local-px 98 --local-crops 2 --batch 2 --reps 1 --warmup 0 --flops-batch 1
  part bench_tiny 120 "$PY" "${BENCH[@]}" "${DEV[@]}" --backbone vit_test_p4_28 --global-px 28 \
    --local-px 12 --batch 8 --reps 2 --warmup 1
fi

echo
echo "=== summary (${SECONDS}s; JSON per part in $SUMMARY)"
cat "$SUMMARY"
if ((${#FAILED[@]})); then
  echo "FAILED: ${FAILED[*]}"
  finish 1
fi
echo "all parts passed"
finish 0
