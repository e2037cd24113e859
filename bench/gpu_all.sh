#!/usr/bin/env bash
# Every GPU check, as one script for one short GPU lease (docs/benchmarks.md records its output).
#
#   bench/gpu_all.sh            # on a machine with a CUDA GPU
#
# 1. the machine: GPU, driver, torch, bf16 support (what llm2clip's precision resolution reads);
# 2. bench/gpu_train_vision.sh: ViT-B/16 + adapter, bf16, ZeRO-1, batch 256 per GPU (the reference
#    setting), then batch 512 with ZeRO-2 and gradient checkpointing (the memory-saving setting);
# 3. the tests marked `gpu` (pytest -m gpu).
#
# A machine without our pins (the lent GPU machines have torch/transformers but not DeepSpeed or
# pydantic) installs wheels from .whl/ when that folder exists (see docs/benchmarks.md for how it
# was filled). Results also go to $OUT when that variable is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-$(mktemp -d)}
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 PYTHON=$PY
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'EOF'
import torch, transformers
from llm2clip.train.engine import resolve_precision
dev = torch.device("cuda")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}, capability {torch.cuda.get_device_capability()}, "
      f"auto precision -> {resolve_precision('auto', dev)}")
EOF

status=0
echo "== train_vision, batch 256/GPU, ZeRO-1"
bash bench/gpu_train_vision.sh 2>&1 | grep -v "^\[20[0-9][0-9]-" | tee "$OUT/gpu_train_vision_b256.log" | tail -4 || status=1
echo "== train_vision, batch 512/GPU, ZeRO-2, gradient checkpointing"
bash bench/gpu_train_vision.sh --batch-size 512 --zero-stage 2 --gradient-checkpointing --steps 40 2>&1 \
  | grep -v "^\[20[0-9][0-9]-" | tee "$OUT/gpu_train_vision_b512.log" | tail -4 || status=1
echo "== pytest -m gpu"
timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/unit/text/test_packed.py 2>&1 | tail -15 || status=1
exit $status
