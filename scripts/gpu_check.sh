#!/usr/bin/env bash
# One-shot GPU check of the DINOv2 step (issue: GPU efficiency) on one H100/H200. Parts 1-3 (the
# main figures) take about 6 minutes; all parts together at most GPU_CHECK_BUDGET_S (default 480 s):
# give the call 600 s. Parts run in order of importance, each under its own time limit, and one that
# would start with under 30 s of the budget left is skipped, so a cut-off run keeps the first figures.
# Run from anywhere; dinoflow need not be installed (src/ and tools/ go on PYTHONPATH; missing Python
# packages are installed from the wheels in ${GPU_CHECK_WHEELS:-.tools/gpu-wheels}: `make gpu-check-wheels`).
#
#   bash scripts/gpu_check.sh              # on a CUDA machine
#   bash scripts/gpu_check.sh --cpu-smoke  # tiny sizes on the CPU: every part's code path
#   GPU_CHECK_QUICK=1 bash scripts/gpu_check.sh  # the same parts until 210 s are spent
#   GPU_CHECK_PARTS=bench_vitg14_ckpt,bench_vitl14_b64 bash scripts/gpu_check.sh  # only these parts
#
# Parts (bf16, 2 x 224 + 8 x 98 px crops, DINOv2 heads; `dinoflow bench train-step`: full step vs
# backbone alone, images/s, MFU of each, peak memory; variants measured in one process: eager, then
# torch.compile of the blocks, then of the heads and losses too):
#   1 bench_vits14_b128  ViT-S/14, 65,536 prototypes, batch 128: eager, compile, compile+heads, and
#                        the profiler's top CUDA kernels of each                          (~2.5 min)
#   2 bench_vitl14_b32   ViT-L/14, batch 32: eager, compile, compile+heads               (~2 min)
#   3 bench_vitg14_ckpt  ViT-g/14 (giant2, SwiGLU) with the ViT-g heads (131,072 prototypes,
#                        bottleneck 384, separate iBOT head) and activation checkpointing, GPU memory
#                        capped at 78 GiB (an 80 GB card): the largest batch of 128, 96, 64, 48, 32,
#                        16, 8 that fits, its MFU and peak memory                          (~1.5 min)
#   4 bench_vitl14_b64   ViT-L/14, batch 64: eager, compile                               (~1 min)
#   5 train_vits14_opt   the trainer's own loop, 4 steps, ViT-S/14 batch 128 with compile, compiled
#                        heads and activation checkpointing: finite losses, the teacher moves (~1 min)
# Everything goes to ${OUT:-/tmp/gpu_check}/gpu_check.log; gpu_check_summary.jsonl holds one line per
# measured variant ({"part", "rc", "result"}), and a table of the main figures ends the log.
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
for d in src tools; do
  case ":${PYTHONPATH:-}:" in *":$d:"* | *":$PWD/$d:"*) ;; *) export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/$d ;; esac
done
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
finish() { # close the log pipe and let tee write its last lines before the exit status is given
  exec 1>&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  exit "$1"
}

if [[ $MODE == gpu ]]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-480}
  if [[ "${GPU_CHECK_QUICK:-0}" == 1 ]]; then BUDGET=210; fi
else
  BUDGET=${GPU_CHECK_BUDGET_S:-3600} # the smoke runs every part
fi
FAILED=()
T_START=$SECONDS

part() { # part NAME LIMIT_S CMD...: run under min(LIMIT_S, budget left); keep its per-variant JSON
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - T_START)))
  if [[ -n "${GPU_CHECK_PARTS:-}" && ",$GPU_CHECK_PARTS," != *",$name,"* ]]; then return; fi
  echo
  if ((left < 30)); then
    echo "=== $name skipped: ${left}s of the ${BUDGET}s budget left"
    echo "{\"part\": \"$name\", \"skipped\": true}" >>"$SUMMARY"
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name ($(date +%H:%M:%S), $((SECONDS - T_START))s in; limit ${limit}s)"
  local tmp
  tmp=$(mktemp)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$tmp"
  local rc=${PIPESTATUS[0]}
  # one summary line per measured variant (the bench's closing line repeats them: left out)
  local kept=0 line
  while IFS= read -r line; do
    echo "{\"part\": \"$name\", \"rc\": $rc, \"result\": $line}" >>"$SUMMARY"
    kept=$((kept + 1))
  done < <(grep '^{' "$tmp" | grep -v '"variants": \[')
  ((kept)) || echo "{\"part\": \"$name\", \"rc\": $rc}" >>"$SUMMARY"
  if [[ $rc -ne 0 ]]; then
    FAILED+=("$name(rc=$rc)")
    echo "!!! $name failed (rc=$rc; 124: its time limit)"
  fi
  rm -f "$tmp"
}

echo "=== environment ($MODE; budget ${BUDGET}s)"
if [[ $MODE == gpu ]]; then nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true; fi
WHEELS=${GPU_CHECK_WHEELS:-.tools/gpu-wheels}
if ! $PY -c "import pydantic, pydantic_settings, minio, timm" 2>/dev/null; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=${TMPDIR:-/tmp}/gpu_check_site
    echo "installing the missing Python packages from $WHEELS into $SITE"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH=$SITE:$PYTHONPATH
  else
    echo "pydantic/minio/timm missing and no wheels in $WHEELS ('make gpu-check-wheels' fetches them)"
  fi
fi
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
ALL=(--variants eager,compile,compile+heads)
if [[ $MODE == gpu ]]; then
  DEV=(--device cuda --precision bf16)
  CROPS=(--global-px 224 --local-px 98 --local-crops 8)
  REPS=(--reps 5 --warmup 2)
  S=(--backbone vit_small_p14 "${CROPS[@]}")
  L=(--backbone vit_large_p14 "${CROPS[@]}")
  G=(--backbone vit_giant2_p14 "${CROPS[@]}" --head-prototypes 131072 --head-bottleneck-dim 384 --ibot-separate-head)
  part bench_vits14_b128 180 "$PY" "${BENCH[@]}" "${DEV[@]}" "${S[@]}" --batch 128 "${REPS[@]}" "${ALL[@]}" --profile
  part bench_vitl14_b32 180 "$PY" "${BENCH[@]}" "${DEV[@]}" "${L[@]}" --batch 32 "${REPS[@]}" "${ALL[@]}"
  part bench_vitg14_ckpt 150 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "$PY" "${BENCH[@]}" "${DEV[@]}" "${G[@]}" --batch 128,96,64,48,32,16,8 \
    --activation-checkpointing --memory-cap-gib 78 --flops-batch 2 --reps 3 --warmup 1
  part bench_vitl14_b64 120 "$PY" "${BENCH[@]}" "${DEV[@]}" "${L[@]}" --batch 64 "${REPS[@]}" --variants eager,compile
  # batch 128 as in part 1: its compiled graphs come from inductor's cache
  part train_vits14_opt 90 "$PY" "${TRAIN[@]}" "${DEV[@]}" "${S[@]}" --batch 128 --steps 4 --compile \
    --compile-heads --activation-checkpointing
else
  # the same parts and flags at tiny sizes (ViT-S/14 with its 65,536-prototype head on 56/28 px crops)
  DEV=(--device cpu --precision fp32 --threads 2)
  REPS=(--reps 1 --warmup 0)
  S=(--backbone vit_small_p14 --global-px 56 --local-px 28 --local-crops 2 --flops-batch 1)
  T=(--backbone vit_test_p4_28 --global-px 28 --local-px 12 --local-crops 2)
  part bench_vits14_b128 600 "$PY" "${BENCH[@]}" "${DEV[@]}" "${S[@]}" --batch 2 "${REPS[@]}" "${ALL[@]}" --profile
  part bench_vitl14_b32 300 "$PY" "${BENCH[@]}" "${DEV[@]}" "${T[@]}" --batch 8 "${REPS[@]}" "${ALL[@]}"
  part bench_vitg14_ckpt 120 "$PY" "${BENCH[@]}" "${DEV[@]}" "${T[@]}" --head-prototypes 256 --ibot-separate-head \
    --batch 16,8 --activation-checkpointing --memory-cap-gib 78 --flops-batch 2 --reps 1 --warmup 1
  part bench_vitl14_b64 300 "$PY" "${BENCH[@]}" "${DEV[@]}" "${T[@]}" --batch 16 "${REPS[@]}" --variants eager,compile
  part train_vits14_opt 300 "$PY" "${TRAIN[@]}" "${DEV[@]}" "${T[@]}" --batch 8 --steps 3 --compile \
    --compile-heads --activation-checkpointing
fi

echo
echo "=== summary (${SECONDS}s; one JSON line per measured variant in $SUMMARY)"
$PY - "$SUMMARY" <<'EOF'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
cols = ("variant", "batch", "images_per_second", "mfu", "backbone_mfu", "train_step_ratio",
        "max_memory_allocated_gib")
print(f"{'part':<20}" + "".join(f"{c[:16]:>17}" for c in cols))
for r in rows:
    res = r.get("result", {})
    cells = [res.get(c, "") for c in cols] if res else ["skipped" if r.get("skipped") else f"rc={r.get('rc')}"]
    print(f"{r['part']:<20}" + "".join(f"{str(c):>17}" for c in cells))
EOF
if ((${#FAILED[@]})); then
  echo "FAILED: ${FAILED[*]}"
  finish 1
fi
echo "all parts passed"
finish 0
