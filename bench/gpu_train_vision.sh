#!/usr/bin/env bash
# train_vision on GPU: ViT-B/16 (or --shape vit-l-14-336) + adapter 4096->1280, bf16, ZeRO-1, synthetic
# tensors, through the stage's own trainer. Prints samples/s and MFU vs the bf16 peak.
#
#   bench/gpu_train_vision.sh                       # every visible GPU, H100/H200 peak (989 TFLOP/s)
#   bench/gpu_train_vision.sh --peak-tflops 312     # A100
#   bench/gpu_train_vision.sh --batch-size 128 --steps 40
#   bench/gpu_train_vision.sh --dry-run             # tiny sizes on CPU, one process (CI)
#
# Runs in under 8 minutes (hard limit below); the numbers go to docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python
if [[ " $* " == *" --dry-run "* ]]; then
  NPROC=1
else
  NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
  if [[ "$NPROC" -lt 1 ]]; then
    echo "no CUDA GPU found (nvidia-smi -L); use --dry-run for the CPU check" >&2
    exit 2
  fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 470 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  bench/gpu_train_vision.py "$@"
